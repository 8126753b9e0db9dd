"""ONNX export of the vision tower: one dense graph with dynamic batch and dynamic grids, checked by onnxruntime.

:class:`ExportGraph` runs the tower's own layers on a padded batch without packing or per-image Python: NaFlex
position grids are resized inside the graph (each image's bilinear, antialiased weights built from its
``spatial_shapes`` as tensors, the same weights :mod:`~siglip2_encoder.models.embeddings` uses), fixed-resolution tables
are resized bicubically to the input's grid (exactly the table at the native size), and bucketed tables (Idefics3's)
are read at each patch's fractional coordinate, optionally of each image's real patches under a ``patch_attention_mask``
as ``Idefics3VisionTransformer`` takes it, or of each image's own grid for the patches that Idefics2's and Aria's
letterboxes give. Padding tokens are masked in attention and in the pooling head, so a padded image gives what it
gives alone.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import key_padding_attention
from ..models.embeddings import antialiased_bilinear_weights, bucket_boundaries, fractional_buckets
from ..models.model import SigLIP2Encoder
from ..models.text import SigLIP2TextEncoder

__all__ = ["ExportGraph", "TextExportGraph", "export_onnx", "export_text_onnx"]


class ExportGraph(nn.Module):
    """The tower as one exportable graph.

    Args:
        tower: the encoder (its weights are used, not copied).
        output: "pooled" (B, D), "tokens" (B, N, D) after the post-layernorm, or an int hidden-state index.
    """

    def __init__(self, tower: SigLIP2Encoder, output: str | int = "pooled") -> None:
        super().__init__()
        if output == "pooled" and tower.head is None:
            raise ValueError("this tower has no attention-pooling head; export output='tokens' or a layer")
        if not (output in ("pooled", "tokens") or isinstance(output, int) and not isinstance(output, bool)):
            raise ValueError(f"output must be 'pooled', 'tokens' or a hidden-state index, got output={output!r}")
        self.tower, self.output = tower, output
        self.depth = tower.config.num_hidden_layers if not isinstance(output, int) else tower.layer_index(output)
        self.bucketed = tower.config.position_lookup == "buckets"
        # Built here, as the tower builds them, and stored in the graph: a Range op in the graph rounds otherwise.
        self.register_buffer("boundaries", bucket_boundaries(tower.embeddings.grid), persistent=False)

    def _positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """(B, L, D) NaFlex positions for each image's grid, for L tokens (padding slots: any finite value)."""
        table = self.tower.embeddings.table().float()  # (g, g, D)
        grid = table.shape[0]
        heights, widths = spatial_shapes[:, :1], spatial_shapes[:, 1:]  # (B, 1) each
        # Padding slots take the last real token's position: finite values, never attended to.
        index = torch.minimum(torch.arange(length, device=spatial_shapes.device)[None], heights * widths - 1)
        rows = antialiased_bilinear_weights(heights, index // widths, grid)  # (B, L, g)
        columns = antialiased_bilinear_weights(widths, index % widths, grid)
        both = (rows[..., :, None] * columns[..., None, :]).flatten(2)  # (B, L, g * g)
        return (both @ table.flatten(0, 1)).to(table.dtype)

    def _bucketed_positions(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """(B, h * w, D) positions of a bucketed tower for a (B, h, w) bool patch mask: each image's real patches
        (the top-left block its mask keeps) read the cells of their own grid, padding patches cell 0, as
        ``Idefics3VisionEmbeddings`` does."""
        embeddings = self.tower.embeddings
        length_h, length_w = patch_mask.shape[1:]
        rows = fractional_buckets(patch_mask[:, :, 0].sum(1), length_h, self.boundaries)  # (B, h)
        columns = fractional_buckets(patch_mask[:, 0].sum(1), length_w, self.boundaries)  # (B, w)
        ids = (rows[:, :, None] * embeddings.grid + columns[:, None, :]).flatten(1)
        return F.embedding(torch.where(patch_mask.flatten(1), ids, 0), embeddings.table().flatten(0, 1))

    def _own_grid_positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """(B, L, D) positions of a bucketed tower for patches of each image's own grid (padding slots: the last
        real token's), each patch reading the cell of its fractional coordinate on its image's grid."""
        embeddings = self.tower.embeddings
        heights, widths = spatial_shapes[:, :1], spatial_shapes[:, 1:]  # (B, 1) each
        index = torch.minimum(torch.arange(length, device=spatial_shapes.device)[None], heights * widths - 1)
        rows = fractional_buckets(heights[:, 0], length, self.boundaries).gather(1, index // widths)  # (B, L)
        columns = fractional_buckets(widths[:, 0], length, self.boundaries).gather(1, index % widths)
        return F.embedding(rows * embeddings.grid + columns, embeddings.table().flatten(0, 1))

    def _pool(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The attention-pooling head on (B, L, D) tokens."""
        head = self.tower.head
        batch, length, width = x.shape
        heads = head.attention.num_heads
        w_q, w_kv = head.attention.in_proj_weight.split([width, 2 * width])
        b_q, b_kv = head.attention.in_proj_bias.split([width, 2 * width])
        q = F.linear(head.probe[0], w_q, b_q).view(1, heads, 1, width // heads).expand(batch, -1, -1, -1)
        k, v = F.linear(x, w_kv, b_kv).view(batch, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
        pooled = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(batch, width)
        pooled = head.attention.out_proj(pooled)
        return pooled + head.mlp(head.layernorm(pooled))

    def forward(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        patch_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fixed-resolution: ``pixel_values`` (B, C, H, W), for bucketed towers optionally with a
        ``patch_attention_mask`` (B, H/p, W/p) of each image's real patches. NaFlex, and bucketed towers whose
        processor reads each image on its own grid: (B, L, p * p * C) patches with ``spatial_shapes`` (B, 2) and
        ``pixel_attention_mask`` (B, L)."""
        tower, embeddings = self.tower, self.tower.embeddings
        pixel_values = pixel_values.to(embeddings.patch_embedding.weight.dtype)
        valid = zeroed = None  # (B, L) tokens attended to as keys; tokens zeroed in the output
        if tower.config.naflex:
            x = embeddings.patch_embedding(pixel_values)
            x = x + self._positions(spatial_shapes, pixel_values.shape[1]).to(x.dtype)
            valid = zeroed = pixel_attention_mask.bool()
        elif pixel_values.ndim == 3:  # the conv as a linear map of patchify's (row, column, channel) layout
            conv = embeddings.patch_embedding
            x = F.linear(pixel_values, conv.weight.permute(0, 2, 3, 1).flatten(1), conv.bias)
            x = x + self._own_grid_positions(spatial_shapes, pixel_values.shape[1]).to(x.dtype)
            valid = zeroed = pixel_attention_mask.bool()
        elif self.bucketed:
            x = embeddings.patch_embedding(pixel_values)  # (B, D, h, w)
            if patch_attention_mask is None:
                patch_attention_mask = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool, device=x.device)
            patch_mask = patch_attention_mask.bool()
            x = x.flatten(2).transpose(1, 2) + self._bucketed_positions(patch_mask).to(x.dtype)
            # Idefics3's connector reads every patch, padding ones included: they keep the values its tower gives them.
            valid = patch_mask.flatten(1)
        else:
            x = embeddings.patch_embedding(pixel_values)
            table = embeddings.table().permute(2, 0, 1)[None]  # (1, D, g, g)
            positions = F.interpolate(table, size=x.shape[-2:], mode="bicubic", align_corners=False)
            x = (x + positions).flatten(2).transpose(1, 2)
        batch, length, width = x.shape
        keep = valid if valid is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
        attend = key_padding_attention(keep)
        x = x.reshape(batch * length, width)
        for layer in tower.encoder.layers[: self.depth]:
            x = layer(x, attend)
        x = x.view(batch, length, width)
        if self.output != "pooled":
            x = x if isinstance(self.output, int) else tower.post_layernorm(x)
            return x if zeroed is None else x * zeroed[..., None]
        # (B, 1, 1, L): padding keys are not pooled over either
        return self._pool(tower.post_layernorm(x), None if valid is None else valid[:, None, None, :])


def export_onnx(
    tower: SigLIP2Encoder,
    path: str | os.PathLike,
    *,
    output: str | int = "pooled",
    patch_attention_mask: bool = False,
    opset: int = 18,
) -> None:
    """Write ``tower`` as an ONNX model at ``path`` (torch.onnx's exporter), dynamic in batch and grid, taking what
    the tower's processor gives: ``pixel_values`` (B, C, H, W), or for NaFlex (and Idefics2's and Aria's letterboxes,
    each image on its own grid) ``pixel_values`` (B, L, p*p*C), ``spatial_shapes`` (B, 2) int64 and
    ``pixel_attention_mask`` (B, L) int32 (as both processors, ours and transformers', give NaFlex's); output
    ``features`` as :class:`ExportGraph` ``output`` says. ``patch_attention_mask=True`` (towers with bucketed
    positions: Idefics3's, SmolVLM's, Aria's, Phi-4-multimodal's) takes transformers' layout instead: (B, C, H, W)
    images and a (B, H/p, W/p) bool input of each image's real patches, as ``Idefics3VisionTransformer`` takes it:
    padding patches are not attended to and keep the values that tower gives them."""
    _check_exporter()
    bucketed = tower.config.position_lookup == "buckets"
    if patch_attention_mask and not bucketed:
        raise ValueError(
            f"patch_attention_mask=True is for towers with bucketed positions (Idefics3's); this tower has "
            f"position_lookup={tower.config.position_lookup!r} and takes whole images: leave it False"
        )
    own_grids = tower.processor_config.own_grids and not patch_attention_mask
    if own_grids and not tower.config.naflex and not bucketed:
        raise ValueError(
            f"the tower's processor gives patches of each image's own grid (letterbox="
            f"{tower.processor_config.letterbox!r}), which a graph of its bicubic positions cannot read; set "
            f"tower.processor_config = tower.processor_config.at_size(tower.processor_config.image_size) to export "
            f"one size"
        )
    graph = ExportGraph(tower, output).eval()
    inputs, shapes = _example_inputs(tower, "patches" if own_grids else "mask" if patch_attention_mask else "images")
    with torch.no_grad():
        torch.onnx.export(
            graph,
            (),
            str(path),
            kwargs=inputs,
            input_names=list(inputs),
            output_names=["features"],
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
        )


def _example_inputs(tower: SigLIP2Encoder, layout: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Inputs to trace the graph with and their dynamic dimensions: "patches" (NaFlex, or a bucketed tower read on
    each image's own grid), "mask" (images and transformers' patch mask) or "images"."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    p, channels = tower.config.patch_size, tower.config.num_channels
    if layout == "patches":
        length = torch.export.Dim("length", min=1, max=65536)
        inputs = {
            "pixel_values": torch.zeros(2, 6, p * p * channels),
            "spatial_shapes": torch.tensor([[2, 3], [1, 4]]),
            "pixel_attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.int32),
        }
        shapes = {"pixel_values": {0: batch, 1: length}, "spatial_shapes": {0: batch}}
        return inputs, shapes | {"pixel_attention_mask": {0: batch, 1: length}}
    if layout == "mask":
        side = tower.config.image_size // p
        rows, columns = (torch.export.Dim(name, min=1, max=8192 // p) for name in ("rows", "columns"))
        inputs = {
            "pixel_values": torch.zeros(2, channels, side * p, side * p),
            "patch_attention_mask": torch.ones(2, side, side, dtype=torch.bool),
        }
        shapes = {"pixel_values": {0: batch, 2: p * rows, 3: p * columns}}
        return inputs, shapes | {"patch_attention_mask": {0: batch, 1: rows, 2: columns}}
    side = tower.config.image_size
    height, width = torch.export.Dim("height", min=p, max=8192), torch.export.Dim("width", min=p, max=8192)
    return {"pixel_values": torch.zeros(2, channels, side, side)}, {"pixel_values": {0: batch, 2: height, 3: width}}


class TextExportGraph(nn.Module):
    """The text tower as one exportable graph: (B, L) ``input_ids`` (and, if given, ``attention_mask``) -> (B, P)
    pooled features (the last position through the head, as :class:`~siglip2_encoder.SigLIP2TextEncoder`)."""

    def __init__(self, tower: SigLIP2TextEncoder) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        tower = self.tower
        x = tower.embeddings(input_ids)  # (B, L, D)
        batch, length, width = x.shape
        # Without a mask every position attends to every other, as SigLIP was trained.
        keys = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = tower.encoder(x.reshape(batch * length, width), key_padding_attention(keys), fast=False)
        return tower.head(tower.final_layer_norm(x).view(batch, length, width)[:, -1])


def export_text_onnx(
    tower: SigLIP2TextEncoder, path: str | os.PathLike, *, padding_mask: bool = False, opset: int = 18
) -> None:
    """Write the text tower as an ONNX model at ``path``, dynamic in batch and text length (up to
    ``max_position_embeddings``): input ``input_ids`` (B, L) int64, output ``features`` (B, P), every position
    attended as SigLIP was trained (feed it texts padded to 64: ``TextTokenizer``'s ids, or the tokenizer of a folder
    ``SigLIP2Model.save_pretrained`` wrote, whose output is ``input_ids`` alone). ``padding_mask=True`` adds an
    ``attention_mask`` (B, L) input whose padding keys are ignored, as transformers applies a tokenizer's mask."""
    _check_exporter()
    graph = TextExportGraph(tower).eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=2, max=tower.config.max_position_embeddings)
    example: tuple[torch.Tensor, ...] = (torch.ones(2, 4, dtype=torch.long),)
    names = ["input_ids"]
    if padding_mask:
        example, names = (*example, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])), [*names, "attention_mask"]
    with torch.no_grad():
        torch.onnx.export(
            graph,
            example,
            str(path),
            input_names=names,
            output_names=["features"],
            dynamic_shapes=tuple({0: batch, 1: length} for _ in names),
            opset_version=opset,
            dynamo=True,
        )


def _check_exporter() -> None:
    try:
        import onnxscript  # noqa: F401  torch.onnx's exporter needs it
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript") from None
