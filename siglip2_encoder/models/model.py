"""``SigLIP2Encoder``: the SigLIP / SigLIP 2 vision tower as a feature extractor.

patch + position embeddings -> N pre-norm encoder layers -> post-layernorm -> attention-pooling head.
The forward pass runs only as far as the outputs asked for need: a request for layer -2 alone stops before the last
layer and skips the post-layernorm and the head.

The parts live in their own files (``embeddings``, ``layers``, ``head``; the kernels in ``attention``; the input
formats in ``inputs``); this file composes them, loads and saves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..checkpoints.convert import (
    build_loaded,
    foreign_modules,
    read_big_vision,
    read_checkpoint,
    write_checkpoint,
)
from ..checkpoints.hub import CheckpointSource, FromPretrainedMixin
from ..checkpoints.publish import HubMixin, ModelCardInfo, hub_id
from ..config import EncoderConfig, ProcessorConfig
from ..data.processor import patchify
from ..output import EncoderOutput, Layer, tokens_to_map
from ..presets import get_preset
from .attention import attention_backend_names, select_attention_backend
from .embeddings import FixedResolutionEmbeddings, NaFlexEmbeddings
from .head import MultiheadAttentionPoolingHead
from .inputs import Grids, TowerInput, parse_inputs
from .layers import Encoder
from .packing import Packing
from .recipes import Recipe, get_recipe

__all__ = ["SigLIP2Encoder"]


@dataclass(frozen=True)
class _Request:
    """What one forward pass must compute."""

    hidden: dict[int, list[int]]  # hidden-state index 0..L -> the keys it was requested under
    last: bool  # last_hidden_state
    pooled: bool  # pooler_output
    depth: int  # layers to run


class SigLIP2Encoder(FromPretrainedMixin, HubMixin, nn.Module):
    """The SigLIP / SigLIP 2 vision tower.

    Build it from a checkpoint with :meth:`from_pretrained`, from a named architecture with random weights with
    :meth:`from_preset`, or from an :class:`~siglip2_encoder.EncoderConfig`.

    Inputs (what :class:`~siglip2_encoder.ImageProcessor` produces):

    * fixed-resolution towers: ``pixel_values`` (B, C, H, W); the token grid is (H // p, W // p). Sizes other than
      the native one interpolate the position embeddings as transformers' ``interpolate_pos_encoding=True``.
    * NaFlex towers: ``pixel_values`` (B, L, p * p * C) patchified and padded, with ``spatial_shapes`` (B, 2) giving
      each image's grid (h, w) and optionally ``pixel_attention_mask`` (B, L). (B, C, H, W) images are accepted too
      and patchified here.
    * either: a list of (C, H_i, W_i) images of any sizes, run packed.

    Args:
        config: the architecture.
        processor_config: how images are preprocessed for this tower (``save_pretrained`` writes it); default:
            SigLIP 2's for the architecture.
    """

    def __init__(self, config: EncoderConfig, processor_config: ProcessorConfig | None = None) -> None:
        super().__init__()
        processor_config = processor_config or ProcessorConfig.default_for(config)
        if processor_config.naflex != config.naflex or (
            config.naflex and processor_config.patch_size != config.patch_size
        ):
            raise ValueError(
                f"processor_config {processor_config} does not fit this {'NaFlex' if config.naflex else 'fixed'} "
                f"tower with patch_size={config.patch_size}; use ProcessorConfig.default_for(config)"
            )
        self.config = config
        self.processor_config = processor_config
        self.embeddings = NaFlexEmbeddings(config) if config.naflex else FixedResolutionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = MultiheadAttentionPoolingHead(config) if config.use_head else None
        self.attention_backend = "auto"
        # Use the in-place inference path of each layer when autograd records nothing (see layers.py); set False to
        # run the reference path everywhere (the tests compare the two).
        self.fast_inference = True
        self.name_or_path: str | None = None  # the checkpoint it was loaded from (a model card's base)
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
        preset = get_preset(name)
        config = preset.config.replace(**overrides)
        with torch.device(device or "cpu"):
            model = cls(config, ProcessorConfig.default_for(config, resample=preset.resample))
        return model.to(dtype=dtype) if dtype is not None else model

    @classmethod
    def from_source(
        cls, source: CheckpointSource, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> SigLIP2Encoder:
        """The vision tower of a SigLIP / SigLIP 2 checkpoint (``from_pretrained(name_or_path)`` with a Hub id or a
        local folder), in eval().

        Accepts transformers' ``siglip``, ``siglip2`` (image-text; the text tower is skipped) and
        ``siglip_vision_model``, ``siglip2_vision_model`` (vision-only) checkpoints, stored as ``model.safetensors``,
        sharded safetensors with an index (only the shards holding vision weights are read), or
        ``pytorch_model.bin``. Loading is strict: missing or unexpected vision weights raise an error listing them.
        ``dtype=None`` keeps the stored dtype.
        """
        stored = read_checkpoint(source, dtype=dtype)
        return build_loaded(
            lambda: cls(stored.config, stored.processor_config), stored.state_dict, str(source), "tower", device
        )

    @classmethod
    def from_big_vision(
        cls,
        path: str | os.PathLike,
        *,
        image_size: int | None = None,
        processor_config: ProcessorConfig | None = None,
        device: str | torch.device | None = None,
    ) -> SigLIP2Encoder:
        """Load the image tower of a big_vision ``.npz`` (Google's original SigLIP / SigLIP 2 release format), strictly.

        The architecture is read from the weights' shapes
        (:func:`~siglip2_encoder.checkpoints.convert.config_from_big_vision`);
        give ``image_size`` where the native size is not grid x patch (So400m/14 at 384). ``processor_config``
        defaults to big_vision's SigLIP preprocessing for the tower (resize, values to [-1, 1]).
        """
        stored = read_big_vision(path, image_size=image_size)
        processor = processor_config or stored.processor_config
        return build_loaded(lambda: cls(stored.config, processor), stored.state_dict, str(path), "tower", device)

    @property
    def base_checkpoint(self) -> str | None:
        return self.name_or_path

    def model_card_info(self) -> ModelCardInfo:
        """What :meth:`push_to_hub`'s model card says of this tower."""
        c = self.config
        size = f"NaFlex, {c.num_patches} position entries" if c.naflex else f"{c.image_size} px"
        transformers_class = (
            "AutoModel" if c.position_lookup == "buckets" else "Siglip2VisionModel" if c.naflex else "SiglipVisionModel"
        )
        return ModelCardInfo(
            title=f"SigLIP vision tower ({c.num_hidden_layers} layers, width {c.hidden_size}, patch {c.patch_size})",
            summary="A SigLIP / SigLIP 2 vision tower saved by siglip2-encoder, in transformers' format.",
            details=[
                ("base checkpoint", self.name_or_path or "none (random initialisation)"),
                ("architecture", f"{size}, {c.hidden_act}, {'with' if c.use_head else 'without'} attention-pool head"),
                ("preprocessing", str(self.processor_config)),
            ],
            snippet=(
                'from siglip2_encoder import ImageProcessor, SigLIP2Encoder\n\ntower = SigLIP2Encoder.from_pretrained("'
                '{repo_id}")\nprocessor = ImageProcessor.from_pretrained("{repo_id}")\n'
            ),
            transformers_snippet=f"from transformers import {transformers_class}\n\n"
            f'model = {transformers_class}.from_pretrained("{{repo_id}}")\n',
            base_model=hub_id(self.name_or_path),
            tags=("siglip", "vision", "feature-extraction"),
            library_name="transformers",
            pipeline_tag="image-feature-extraction",
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json, model.safetensors and preprocessor_config.json that transformers'
        ``SiglipVisionModel`` / ``Siglip2VisionModel`` and :meth:`from_pretrained` both load."""
        foreign = self.foreign_modules()
        if foreign:
            shown = ", ".join(f"{name} ({kind})" for name, kind in foreign[:3])
            raise ValueError(
                f"cannot save: {len(foreign)} module(s) are not the tower's own, e.g. {shown}. Merge LoRA adapters "
                f"first (merge_and_unload()) or save them with the PeftModel's save_pretrained; a prepack_for_cpu() "
                f"copy cannot be saved: save the tower it was made from"
            )
        quantized = [name for name, p in self.named_parameters() if type(p) is not nn.Parameter]
        if quantized:
            raise ValueError(
                f"cannot save: {len(quantized)} weights are quantized (e.g. {quantized[0]}); a quantize() copy is for "
                f"inference: save the tower it was made from"
            )
        write_checkpoint(save_directory, self.config, self.state_dict(), self.processor_config)

    def foreign_modules(self) -> list[tuple[str, str]]:
        """(name, qualified type) of every outermost module that is not the tower's own (LoRA wrappers, quantized or
        prepacked layers, ...): their weights do not have transformers' layout."""
        with torch.device("meta"):
            return foreign_modules(self, SigLIP2Encoder(self.config))

    def reset_parameters(self) -> None:
        """Random initialisation following the reference implementations (each part's ``reset_parameters``)."""
        self.embeddings.reset_parameters()
        for layer in self.encoder.layers:
            layer.reset_parameters()
        self.post_layernorm.reset_parameters()
        if self.head is not None:
            self.head.reset_parameters()

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
        self.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing = False

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the layers recompute their activations in the backward pass (the flag lives on ``encoder``)."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled

    @property
    def attention_backend(self) -> str:
        """How packed attention runs: "auto" (default) or a name in :data:`~siglip2_encoder.models.attention.
        ATTENTION_BACKENDS` ("sdpa", "varlen", "flash_attn", "flex")."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if name not in attention_backend_names():
            raise ValueError(f"attention_backend must be one of {attention_backend_names()}, got {name!r}")
        self._attention_backend = name

    def compile_layers(self, **kwargs) -> SigLIP2Encoder:
        """``torch.compile`` each encoder layer (``kwargs`` go to it); the Python that packs and routes tokens stays
        eager. New batch layouts (sizes, NaFlex grid mixes) compile again. Returns self."""
        for layer in self.encoder.layers:
            layer.compile(**kwargs)
        return self

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
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(
                f"layer index {index!r} must be an int (a hidden-state index) or None (last_hidden_state), "
                f"not {type(index).__name__}"
            )
        if not -(n + 1) <= index <= n:
            raise ValueError(
                f"layer index {index!r} is out of range for a {n}-layer tower: use 0 (embeddings) to {n} "
                f"(last layer), or -1 (last layer) to {-(n + 1)} (embeddings); None means last_hidden_state"
            )
        return index % (n + 1)

    def _request(self, layers: Layer | Sequence[Layer], return_last: bool, return_pooled: bool | None) -> _Request:
        layers = [layers] if layers is None or isinstance(layers, int) else list(layers)
        hidden: dict[int, list[int]] = {}
        for index in layers:
            if index is not None:
                hidden.setdefault(self.layer_index(index), []).append(index)
        if return_pooled is None:
            return_pooled = self.head is not None
        elif return_pooled and self.head is None:
            raise ValueError("this tower has no attention-pooling head (use_head=False); pass return_pooled=False")
        last = return_last or None in layers
        if not (last or return_pooled or hidden):
            raise ValueError("nothing to compute: request layers=[...], return_last=True or return_pooled=True")
        depth = self.config.num_hidden_layers if last or return_pooled else max(hidden)
        return _Request(hidden, last, return_pooled, depth)

    def embed(self, inputs: TowerInput) -> torch.Tensor:
        """Validated inputs (:func:`~siglip2_encoder.models.inputs.parse_inputs`) -> (T, D) packed embeddings."""
        packing = inputs.packing
        if inputs.patches is not None:
            return self.embeddings(inputs.patches, packing.packed_grids)
        embedded = [(indices, self._embed_images(images, inputs.positions)) for indices, images in inputs.groups]
        if len(embedded) == 1 and packing.order == embedded[0][0]:
            return embedded[0][1].flatten(0, 1)
        per_image = {i: tokens for indices, batch in embedded for i, tokens in zip(indices, batch)}
        return torch.cat([per_image[i] for i in packing.order])

    def _embed_images(self, images: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """(B, C, H, W) images of one size -> (B, N, D)."""
        if not self.config.naflex:
            return self.embeddings(images, positions)
        p = self.config.patch_size
        b, _, height, width = images.shape
        grid = (height // p, width // p)
        patches = patchify(images[..., : grid[0] * p, : grid[1] * p], p)  # (B, N, p*p*C)
        if positions is not None:
            positions = positions.expand(b, *positions.shape[-2:]).flatten(0, 1)
        return self.embeddings(patches.flatten(0, 1), [grid] * b, positions).unflatten(0, (b, -1))

    def forward_layers(
        self, x: torch.Tensor, packing: Packing, keep: Mapping[int, Sequence[int]], depth: int
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Run the first ``depth`` layers on packed (T, D) embeddings.

        Returns:
            The hidden states ``keep`` asks for (index 0..L -> the keys to file it under), each padded (B, N, D), and
            the (T, D) packed output of layer ``depth``.
        """
        dropout = self.config.attention_dropout if self.training else 0.0
        attend = select_attention_backend(self.attention_backend, x.device, x.dtype, dropout).prepare(packing)
        hidden: dict[int, torch.Tensor] = {}

        def snapshot(i: int, tokens: torch.Tensor, in_place: bool) -> None:
            if i in keep:
                out = packing.unpack(tokens)  # a view when every image has the same length: copy what changes
                hidden.update(dict.fromkeys(keep[i], out.clone() if in_place and packing.uniform else out))

        return hidden, self.encoder(x, attend, depth, self.fast_inference, snapshot)

    def forward(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        spatial_shapes: Grids | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        *,
        layers: Layer | Sequence[Layer] = (),
        return_last: bool = True,
        return_pooled: bool | None = None,
        positions: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode images.

        Images with different token counts run packed: every layer sees only real tokens and attention is
        block-diagonal per image (:mod:`~siglip2_encoder.models.packing`); outputs come back padded in input order.

        Args:
            pixel_values: (B, C, H, W); a list of (C, H_i, W_i) images of any sizes; or for NaFlex towers
                (B, L, p * p * C) patches (see the class docstring).
            spatial_shapes: (B, 2) per-image token grids (h, w); required for patchified NaFlex input.
            pixel_attention_mask: (B, L) validity of patchified NaFlex input; derived from spatial_shapes if absent.
            layers: outputs to return: hidden states in transformers' indexing (0 = embeddings, i = after layer i,
                -1 = last layer before post-layernorm, -2 = penultimate), and None for ``last_hidden_state``.
            return_last: compute ``last_hidden_state`` (all layers + post-layernorm) even if None is not in layers.
            return_pooled: compute ``pooler_output`` with the attention-pooling head; None means "if the tower has a
                head".
            positions: (h * w, D) or (B, h * w, D) position embeddings to add instead of the tower's own, for
                (B, C, H, W) input; tiled inference gives each tile its window of the whole image's positions
                (:meth:`position_embeddings`).

        Returns:
            :class:`~siglip2_encoder.EncoderOutput`; padding tokens are zero in every returned token tensor.
        """
        request = self._request(layers, return_last, return_pooled)
        inputs = parse_inputs(self.config, pixel_values, spatial_shapes, pixel_attention_mask, positions)
        packing = inputs.packing
        # Contiguous: the conv embedding comes out transposed, and layer norm and in-place GEMMs would copy it.
        x = self.embed(inputs).to(self.encoder_dtype).contiguous()
        hidden, x = self.forward_layers(x, packing, request.hidden, request.depth)
        last = pooled = None
        if request.last or request.pooled:
            x = self.post_layernorm(x)
            pooled = self.head(x, packing) if request.pooled else None
            last = packing.unpack(x) if request.last else None
        return EncoderOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=hidden,
            spatial_shapes=torch.tensor(packing.grids, dtype=torch.long, device=x.device).reshape(-1, 2),
            attention_mask=packing.mask(),
        )

    def features(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        spatial_shapes: Grids | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        *,
        recipe: str | Recipe,
    ) -> torch.Tensor:
        """The (B, N, D) tokens a VLM's projector receives from this tower, by the VLM's recipe
        (:mod:`~siglip2_encoder.models.recipes`: ``"llava"``, ``"paligemma"``, ``"idefics3"``, ...), computing no more
        layers than it needs. Inputs as in :meth:`forward`; padding tokens are zero."""
        layer = get_recipe(recipe).layer
        output = self(
            pixel_values, spatial_shapes, pixel_attention_mask, layers=[layer], return_last=False, return_pooled=False
        )
        return output.tokens(layer)

    def forward_features(self, pixel_values: torch.Tensor | Sequence[torch.Tensor], **inputs) -> torch.Tensor:
        """timm's ``forward_features``: the final (B, N, D) tokens after the post-layernorm (``inputs`` as in
        :meth:`forward`: spatial_shapes, pixel_attention_mask, positions)."""
        return self(pixel_values, **inputs, return_pooled=False).last_hidden_state

    def forward_head(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """timm's ``forward_head``: (B, N, D) final tokens (with their (B, N) validity mask if padded) -> (B, D)
        attention-pooled features."""
        if self.head is None:
            raise ValueError("this tower has no attention-pooling head (use_head=False)")
        b, n, _ = tokens.shape
        counts = [n] * b if attention_mask is None else attention_mask.sum(1).tolist()
        packing = Packing.from_grids([(1, int(c)) for c in counts], tokens.device, n)
        return self.head(packing.pack(tokens), packing)

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
            feats = [tokens_to_map(f, out.grids[0]).contiguous() for f in feats]
        if intermediates_only:
            return feats
        return out.last_hidden_state, feats
