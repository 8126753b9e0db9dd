"""``SigLIP2Encoder``: the SigLIP / SigLIP 2 vision tower as a feature extractor.

patch + position embeddings -> N pre-norm encoder layers -> post-layernorm -> attention-pooling head.
The forward pass runs only as far as the outputs asked for need: a request for layer -2 alone stops before the last
layer and skips the post-layernorm and the head.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import EncoderConfig
from .embeddings import FixedResolutionEmbeddings, NaFlexEmbeddings, patchify
from .head import MultiheadAttentionPoolingHead
from .layers import MLP, Attention, EncoderLayer
from .output import EncoderOutput
from .processor import ProcessorConfig

__all__ = ["SigLIP2Encoder"]


class Encoder(nn.Module):
    """The stack of encoder layers (named ``encoder.layers.N`` as in transformers)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])


class SigLIP2Encoder(nn.Module):
    """The SigLIP / SigLIP 2 vision tower.

    Build it from a checkpoint with :meth:`from_pretrained`, from a named architecture with random weights with
    :meth:`from_preset`, or from an :class:`~siglip2_encoder.EncoderConfig`.

    Inputs (what :class:`~siglip2_encoder.ImageProcessor` produces):

    * fixed-resolution towers: ``pixel_values`` (B, C, H, W); the token grid is (H // p, W // p). Sizes other than
      the native one interpolate the position embeddings as transformers' ``interpolate_pos_encoding=True``.
    * NaFlex towers: ``pixel_values`` (B, L, p * p * C) patchified and padded, with ``spatial_shapes`` (B, 2) giving
      each image's grid (h, w) and optionally ``pixel_attention_mask`` (B, L). (B, C, H, W) images are accepted too
      and patchified here.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = NaFlexEmbeddings(config) if config.naflex else FixedResolutionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = MultiheadAttentionPoolingHead(config) if config.use_head else None
        self.gradient_checkpointing = False
        # How images are preprocessed for this tower; from_pretrained sets the checkpoint's own, save_pretrained
        # writes it as preprocessor_config.json.
        self.processor_config = ProcessorConfig.default_for(config)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_preset(
        cls, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None, **overrides
    ) -> SigLIP2Encoder:
        """A tower of a released architecture (see :func:`~siglip2_encoder.list_presets`) with random weights.

        ``overrides`` replace config fields, e.g. ``num_hidden_layers=2`` for a quick test. The features are
        meaningless; use :meth:`from_pretrained` for real ones.
        """
        from .presets import get_preset

        preset = get_preset(name)
        with torch.device(device or "cpu"):
            model = cls(preset.config.replace(**overrides))
        model.processor_config = ProcessorConfig.default_for(model.config, resample=preset.resample)
        return model.to(dtype=dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> SigLIP2Encoder:
        """Load the vision tower of a SigLIP / SigLIP 2 checkpoint: a Hub id or a local folder.

        Accepts transformers' ``siglip``, ``siglip2`` (image-text; the text tower is skipped) and
        ``siglip_vision_model``, ``siglip2_vision_model`` (vision-only) checkpoints, stored as ``model.safetensors``,
        sharded safetensors with an index, or ``pytorch_model.bin``. Loading is strict: missing or unexpected vision
        weights raise an error listing them.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(
            cls,
            name_or_path,
            revision=revision,
            dtype=dtype,
            device=device,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json, model.safetensors and preprocessor_config.json that transformers'
        ``SiglipVisionModel`` / ``Siglip2VisionModel`` and :meth:`from_pretrained` both load."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initialisation following the reference implementations (lecun-normal patch embedding, xavier
        attention and MLP weights, normal(1/sqrt(D)) positions)."""
        width = self.config.hidden_size
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                for linear in module.children():
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.normal_(linear.bias, std=1e-6 if isinstance(module, MLP) else 0.0)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        patch = self.embeddings.patch_embedding
        fan_in = patch.weight[0].numel()
        nn.init.trunc_normal_(patch.weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
        nn.init.zeros_(patch.bias)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=1 / math.sqrt(width))
        if self.head is not None:
            nn.init.xavier_uniform_(self.head.probe.view(1, -1))
            nn.init.xavier_uniform_(self.head.attention.in_proj_weight)
            nn.init.zeros_(self.head.attention.in_proj_bias)

    # ----------------------------------------------------------------------------------------------- training knobs

    def freeze(self) -> SigLIP2Encoder:
        """Stop gradients to every parameter (a frozen feature extractor). Returns self."""
        self.requires_grad_(False)
        return self

    def unfreeze(self) -> SigLIP2Encoder:
        """Let every parameter train again. Returns self."""
        self.requires_grad_(True)
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in the backward pass (non-reentrant), trading compute for memory."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    # ----------------------------------------------------------------------------------------------- forward

    def layer_index(self, index: int) -> int:
        """Turn a hidden-state index (transformers' convention, negatives from the end) into 0..num_layers."""
        n = self.config.num_hidden_layers
        if isinstance(index, bool) or not isinstance(index, int) or not -(n + 1) <= index <= n:
            raise ValueError(
                f"layer index {index!r} is out of range for a {n}-layer tower: use 0 (embeddings) to {n} "
                f"(last layer), or -1 (last layer) to {-(n + 1)} (embeddings)"
            )
        return index % (n + 1)

    def embed(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor | None]:
        """Validate the inputs and embed them (``positions``: see :meth:`forward`).

        Returns:
            (B, N, D) embeddings, each image's grid (h, w), and a (B, N) bool validity mask or None if all valid.
        """
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            got = getattr(pixel_values, "dtype", type(pixel_values).__name__)
            raise TypeError(
                f"pixel_values must be a floating-point torch.Tensor, got {got}; "
                f"use siglip2_encoder.ImageProcessor to turn images into pixel_values"
            )
        p, c = self.config.patch_size, self.config.num_channels
        if pixel_values.ndim == 4:
            b, channels, height, width = pixel_values.shape
            if channels != c or height < p or width < p:
                raise ValueError(
                    f"pixel_values of shape {tuple(pixel_values.shape)} must be (B, {c}, H, W) with H and W at least "
                    f"the patch size {p}; ImageProcessor prepares images"
                )
            # As in the reference conv, the last H % p rows and W % p columns fall outside every patch.
            grid = (height // p, width // p)
            grids = [grid] * b
            if spatial_shapes is not None and _as_grids(spatial_shapes) != grids:
                raise ValueError(
                    f"spatial_shapes {_as_grids(spatial_shapes)} disagree with the image size {height}x{width} "
                    f"(grid {grid}); drop spatial_shapes or fix it"
                )
            want = (grid[0] * grid[1], self.config.hidden_size)
            if positions is not None and tuple(positions.shape) not in (want, (b, *want)):
                raise ValueError(
                    f"positions must be (h * w, D) = {want} or (B, h * w, D) for this {grid[0]}x{grid[1]} grid, "
                    f"got {tuple(positions.shape)}"
                )
            if self.config.naflex:
                pixels = pixel_values[..., : grid[0] * p, : grid[1] * p]
                return self.embeddings(patchify(pixels, p), grids, positions), grids, None
            return self.embeddings(pixel_values, positions), grids, None

        if positions is not None:
            raise ValueError("positions apply to (B, C, H, W) images only")
        if pixel_values.ndim != 3 or not self.config.naflex:
            want = (
                "(B, L, p*p*C) patches with spatial_shapes, or (B, C, H, W)" if self.config.naflex else "(B, C, H, W)"
            )
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} is not {want} for this tower")
        b, length, dim = pixel_values.shape
        if dim != c * p * p:
            raise ValueError(f"patchified pixel_values must have p*p*C = {c * p * p} values per patch, got {dim}")
        if spatial_shapes is None:
            raise ValueError("patchified pixel_values need spatial_shapes (B, 2): each image's grid (h, w)")
        grids = _as_grids(spatial_shapes)
        if len(grids) != b or any(h < 1 or w < 1 or h * w > length for h, w in grids):
            raise ValueError(
                f"spatial_shapes {grids} must give one grid (h >= 1, w >= 1, h * w <= {length}) per image for "
                f"{b} images"
            )
        counts = torch.tensor([h * w for h, w in grids], device=pixel_values.device)
        mask = torch.arange(length, device=pixel_values.device) < counts[:, None]  # (B, L)
        if pixel_attention_mask is not None and not torch.equal(pixel_attention_mask.to(torch.bool), mask):
            raise ValueError(
                "pixel_attention_mask must mark exactly the first h*w patches of each image as valid "
                "(as spatial_shapes says); pass the processor's mask unchanged, or leave it out"
            )
        return self.embeddings(pixel_values, grids), grids, None if bool(mask.all()) else mask

    def forward(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        *,
        layers: Sequence[int] = (),
        return_last: bool = True,
        return_pooled: bool | None = None,
        positions: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode images.

        Args:
            pixel_values: (B, C, H, W), or for NaFlex towers (B, L, p * p * C) patches (see the class docstring).
            spatial_shapes: (B, 2) per-image token grids (h, w); required for patchified NaFlex input.
            pixel_attention_mask: (B, L) validity of patchified NaFlex input; derived from spatial_shapes if absent.
            layers: hidden states to return, transformers' indexing (0 = embeddings, i = after layer i,
                -1 = last layer before post-layernorm, -2 = penultimate).
            return_last: compute ``last_hidden_state`` (all layers + post-layernorm).
            return_pooled: compute ``pooler_output`` with the attention-pooling head; None means "if the tower has a
                head".
            positions: (h * w, D) or (B, h * w, D) position embeddings to add instead of the tower's own, for
                (B, C, H, W) input;
                tiled inference gives each tile its window of the whole image's positions
                (:meth:`position_embeddings`).

        Returns:
            :class:`~siglip2_encoder.EncoderOutput`; padding tokens are zero in every returned token tensor.
        """
        if isinstance(layers, int):
            layers = (layers,)
        wanted: dict[int, list[int]] = {}
        for index in layers:
            wanted.setdefault(self.layer_index(index), []).append(index)
        if return_pooled is None:
            return_pooled = self.head is not None
        elif return_pooled and self.head is None:
            raise ValueError("this tower has no attention-pooling head (use_head=False); pass return_pooled=False")
        run_to_end = return_last or return_pooled
        if not (run_to_end or wanted):
            raise ValueError("nothing to compute: request layers=[...], return_last=True or return_pooled=True")
        depth = self.config.num_hidden_layers if run_to_end else max(wanted)

        x, grids, mask = self.embed(pixel_values, spatial_shapes, pixel_attention_mask, positions)
        keep = _zero_padding if mask is not None else lambda t, m: t
        hidden: dict[int, torch.Tensor] = {}
        if 0 in wanted:
            hidden.update(dict.fromkeys(wanted[0], keep(x, mask)))
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N) keys to attend to
        for i, layer in enumerate(self.encoder.layers[:depth], start=1):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
            if i in wanted:
                hidden.update(dict.fromkeys(wanted[i], keep(x, mask)))

        last = pooled = None
        if run_to_end:
            last = self.post_layernorm(x)
            if return_pooled:
                pooled = self.head(last, mask)
            last = keep(last, mask) if return_last else None
        shapes = torch.tensor(grids, dtype=torch.long, device=x.device).reshape(-1, 2)
        return EncoderOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=hidden,
            spatial_shapes=shapes,
            attention_mask=mask,
        )

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (h * w, D) position embeddings the tower adds for an (h, w) token grid."""
        return self.embeddings.positions(*grid)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` for (B, C, H, W) images, so timm-style dense heads can use this tower.

        Indices follow timm, not transformers: block indices 0..num_layers-1 (block i's output is transformers'
        hidden state i + 1); an int n takes the last n blocks; None takes all. ``norm`` applies the post-layernorm
        to each intermediate. Returns the intermediates, preceded by the final post-layernorm tokens (B, N, D)
        unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        n = self.config.num_hidden_layers
        if indices is None:
            indices = n
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices} must take between 1 and {n} last blocks")
            blocks = list(range(n - indices, n))
        else:
            blocks = [i + n if i < 0 else i for i in indices]
            if any(not 0 <= i < n for i in blocks):
                raise ValueError(f"block indices {list(indices)} must lie in [{-n}, {n - 1}]")
        # Blocks past the last one asked for never run here, so stop_early changes nothing.
        out = self(x, layers=[i + 1 for i in blocks], return_last=not intermediates_only, return_pooled=False)
        feats = [out.hidden_states[i + 1] for i in blocks]
        if norm:
            feats = [self.post_layernorm(f) for f in feats]
        if output_fmt == "NCHW":
            h, w = out.grids[0]
            feats = [f.reshape(f.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for f in feats]
        if intermediates_only:
            return feats
        return out.last_hidden_state, feats


def _as_grids(spatial_shapes: torch.Tensor | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, D) with the rows where the (B, N) mask is False set to zero."""
    return x.masked_fill(~mask[..., None], 0.0)
