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
from .layers import MLP, Attention, EncoderLayer, Workspace
from .output import EncoderOutput
from .packing import ATTENTION_BACKENDS, AttentionBackend, Packing, resolve_backend
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
        self.attention_backend = "auto"
        # Use the in-place inference path of each layer when autograd records nothing (see layers.py); set False to
        # run the reference path everywhere (the tests compare the two).
        self.fast_inference = True
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
    def attention_backend(self) -> str:
        """How packed attention runs: "auto" (default), "sdpa", "varlen", "flash_attn" or "flex" (see
        :mod:`~siglip2_encoder.packing`)."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: AttentionBackend) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
        self._attention_backend = name

    def fuse_qkv(self, enabled: bool = True) -> SigLIP2Encoder:
        """Run the q, k, v projections as one GEMM in the inference path. Returns self.

        Keeps a stacked copy of the q, k, v weights per layer (rebuilt when they change): 3 * D^2 more weights per
        layer, about a quarter of a layer's. On a 2-core CPU one big GEMM was not faster than three (see
        benchmarks/RESULTS.md), so it is off by default; it pays where kernel launches dominate (small batches on a
        GPU).
        """
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_qkv = enabled
                module._fused = None
        return self

    def prepack_for_cpu(self, enabled: bool = True) -> SigLIP2Encoder:
        """Run the inference path's GEMMs through oneDNN on weights prepacked into its blocked layout, with GELU and
        the residual adds fused in. Returns self.

        Costs a second copy of every encoder-layer weight (rebuilt when the weights change): roughly double the
        tower's memory. Pays at small batches, where the stock GEMM (MKL) is furthest from its peak: 1.17x at batch 1
        on B/16-224 on a 2-core CPU (benchmarks/RESULTS.md). Forward passes of more than
        ``layers.PREPACK_MAX_TOKENS`` tokens, where it was measured slower, and other devices keep the default path.
        """
        if enabled and not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            raise ValueError(
                f"prepack_for_cpu needs PyTorch built with oneDNN (mkldnn); torch {torch.__version__} is not"
            )
        for layer in self.encoder.layers:
            layer.prepack = enabled
            layer._prepacked = None
        return self

    def compile_layers(self, **kwargs) -> SigLIP2Encoder:
        """``torch.compile`` each encoder layer (``kwargs`` go to it); the Python that packs and routes tokens stays
        eager. New batch layouts (sizes, NaFlex grid mixes) compile again. Returns self."""
        for layer in self.encoder.layers:
            layer.compile(**kwargs)
        return self

    def clear_caches(self) -> None:
        """Drop the cached resized position grids, fused q, k, v weights and prepacked weights. Needed only after
        writing weights through ``.data`` (which bypasses the version counters the caches check); they rebuild on
        the next call."""
        self.embeddings.clear_cache()
        for module in self.modules():
            if isinstance(module, Attention):
                module._fused = None
            elif isinstance(module, EncoderLayer):
                module._prepacked = None

    def set_precision(self, dtype: torch.dtype, *, keep_embeddings_fp32: bool = True) -> SigLIP2Encoder:
        """Cast the tower to ``dtype`` (e.g. torch.bfloat16 on a GPU), by default keeping the patch and position
        embeddings in fp32: pixels are embedded and position grids resized in full precision, and the sum is cast
        once before the first layer. Returns self."""
        self.to(dtype=dtype)
        if keep_embeddings_fp32:
            self.embeddings.float()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype pixel values are converted to (that of the patch embedding)."""
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The dtype the encoder layers compute in (differs from :attr:`dtype` after :meth:`set_precision`)."""
        return self.post_layernorm.weight.dtype

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
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        spatial_shapes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Packing]:
        """Validate the inputs (see :meth:`forward`) and embed them.

        Returns:
            (T, D) packed embeddings of the real tokens of every image, and the :class:`Packing` that says where
            each image's tokens are.
        """
        if isinstance(pixel_values, (list, tuple)):
            if positions is not None:
                raise ValueError("positions apply to a (B, C, H, W) batch, not to a list of images")
            return self._embed_list(list(pixel_values), spatial_shapes)
        _check_pixels(pixel_values)
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
            if spatial_shapes is not None and _as_grids(spatial_shapes) != [grid] * b:
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
            packing = Packing.from_grids([grid] * b, pixel_values.device)
            return self._embed_batch(pixel_values, positions).reshape(-1, self.config.hidden_size), packing

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
        if pixel_attention_mask is not None:
            counts = torch.tensor([h * w for h, w in grids], device=pixel_values.device)
            mask = torch.arange(length, device=pixel_values.device) < counts[:, None]  # (B, L)
            if not torch.equal(pixel_attention_mask.to(torch.bool), mask):
                raise ValueError(
                    "pixel_attention_mask must mark exactly the first h*w patches of each image as valid "
                    "(as spatial_shapes says); pass the processor's mask unchanged, or leave it out"
                )
        packing = Packing.from_grids(grids, pixel_values.device, length)
        return self.embeddings(packing.pack(pixel_values), packing.packed_grids), packing

    def _embed_batch(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images of one size -> (B, N, D)."""
        if not self.config.naflex:
            return self.embeddings(images, positions)
        p = self.config.patch_size
        b, _, height, width = images.shape
        grid = (height // p, width // p)
        patches = patchify(images[..., : grid[0] * p, : grid[1] * p], p)  # (B, N, p*p*C)
        if positions is not None:
            positions = positions.expand(b, *positions.shape[-2:]).reshape(-1, positions.shape[-1])
        x = self.embeddings(patches.reshape(-1, patches.shape[-1]), [grid] * b, positions)
        return x.view(b, -1, x.shape[-1])

    def _embed_list(self, images: list[torch.Tensor], spatial_shapes) -> tuple[torch.Tensor, Packing]:
        """A list of (C, H_i, W_i) images of any sizes -> (T, D) packed embeddings; images of one size run together."""
        if not images:
            raise ValueError("pixel_values is an empty list; pass at least one (C, H, W) image")
        p, c = self.config.patch_size, self.config.num_channels
        for i, image in enumerate(images):
            _check_pixels(image)
            if image.ndim != 3 or image.shape[0] != c or image.shape[1] < p or image.shape[2] < p:
                raise ValueError(
                    f"image {i} of the list has shape {tuple(image.shape)}; each must be ({c}, H, W) with H and W "
                    f"at least the patch size {p}"
                )
        grids = [(image.shape[1] // p, image.shape[2] // p) for image in images]
        if spatial_shapes is not None and _as_grids(spatial_shapes) != grids:
            raise ValueError(f"spatial_shapes {_as_grids(spatial_shapes)} disagree with the images' grids {grids}")
        packing = Packing.from_grids(grids, images[0].device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[1:]), []).append(i)
        per_image: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
        for indices in by_size.values():
            embedded = self._embed_batch(torch.stack([images[i] for i in indices]))
            for i, tokens in zip(indices, embedded):
                per_image[i] = tokens
        return torch.cat([per_image[i] for i in packing.order]), packing

    def forward(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        spatial_shapes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        *,
        layers: Sequence[int] = (),
        return_last: bool = True,
        return_pooled: bool | None = None,
        positions: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode images.

        Images with different token counts run packed: every layer sees only real tokens and attention is
        block-diagonal per image (:mod:`~siglip2_encoder.packing`); outputs come back padded in input order.

        Args:
            pixel_values: (B, C, H, W); a list of (C, H_i, W_i) images of any sizes; or for NaFlex towers
                (B, L, p * p * C) patches (see the class docstring).
            spatial_shapes: (B, 2) per-image token grids (h, w); required for patchified NaFlex input.
            pixel_attention_mask: (B, L) validity of patchified NaFlex input; derived from spatial_shapes if absent.
            layers: hidden states to return, transformers' indexing (0 = embeddings, i = after layer i,
                -1 = last layer before post-layernorm, -2 = penultimate).
            return_last: compute ``last_hidden_state`` (all layers + post-layernorm).
            return_pooled: compute ``pooler_output`` with the attention-pooling head; None means "if the tower has a
                head".
            positions: (h * w, D) or (B, h * w, D) position embeddings to add instead of the tower's own, for
                (B, C, H, W) input; tiled inference gives each tile its window of the whole image's positions
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

        x, packing = self.embed(pixel_values, spatial_shapes, pixel_attention_mask, positions)
        # Contiguous: the conv embedding comes out transposed, and layer norm and in-place GEMMs would copy it.
        x = x.to(self.encoder_dtype).contiguous()
        backend = resolve_backend(
            self.attention_backend, x.device, x.dtype, self.config.attention_dropout if self.training else 0.0
        )
        # The in-place inference path may only run when autograd records nothing.
        recording = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.encoder.parameters())
        )
        workspace = Workspace() if self.fast_inference and not recording else None

        def snapshot(t: torch.Tensor) -> torch.Tensor:
            """Padded copy of packed tokens that later in-place layers cannot change."""
            out = packing.unpack(t)
            return out.clone() if workspace is not None and packing.uniform else out

        hidden: dict[int, torch.Tensor] = {}
        if 0 in wanted:
            hidden.update(dict.fromkeys(wanted[0], snapshot(x)))
        for i, layer in enumerate(self.encoder.layers[:depth], start=1):
            if workspace is None and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, packing, backend, use_reentrant=False)
            else:
                x = layer(x, packing, backend, workspace)
            if i in wanted:
                hidden.update(dict.fromkeys(wanted[i], snapshot(x)))

        last = pooled = None
        if run_to_end:
            last = self.post_layernorm(x)
            if return_pooled:
                pooled = self.head(last, packing)
            last = packing.unpack(last) if return_last else None
        return EncoderOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=hidden,
            spatial_shapes=torch.tensor(packing.grids, dtype=torch.long, device=x.device).reshape(-1, 2),
            attention_mask=packing.mask(),
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


def _check_pixels(pixel_values: object) -> None:
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        got = getattr(pixel_values, "dtype", type(pixel_values).__name__)
        raise TypeError(
            f"pixel_values must be a floating-point torch.Tensor (or a list of them), got {got}; "
            f"use siglip2_encoder.ImageProcessor to turn images into pixel_values"
        )
