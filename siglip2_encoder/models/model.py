"""``SigLIP2Encoder``: the SigLIP / SigLIP 2 vision tower as a feature extractor.

patch + position embeddings -> N pre-norm encoder layers -> post-layernorm -> attention-pooling head.
The forward pass runs only as far as the outputs asked for need: a request for layer -2 alone stops before the last
layer and skips the post-layernorm and the head.

The parts live in their own files (``embeddings``, ``layers``, ``head``; the kernels in ``attention``; the input
formats in ``inputs``); this file composes them into the forward trio (``forward_features``, ``forward_head``,
``forward``). Loading and saving are in ``tower_io``, the training and inference switches in ``tower_knobs``,
timm's ``forward_intermediates`` in ``intermediates``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import EncoderConfig, ProcessorConfig
from ..data.processor import patchify
from ..output import EncoderOutput, Layer
from .attention import select_attention_backend
from .embeddings import FixedResolutionEmbeddings, NaFlexEmbeddings
from .head import MultiheadAttentionPoolingHead
from .inputs import Grids, TowerInput, parse_inputs
from .intermediates import ForwardIntermediatesMixin
from .layers import Encoder
from .packing import Packing
from .recipes import Recipe, get_recipe
from .tower_io import TowerIOMixin
from .tower_knobs import TowerKnobsMixin

__all__ = ["SigLIP2Encoder"]


@dataclass(frozen=True)
class _Request:
    """What one forward pass must compute."""

    hidden: dict[int, list[int]]  # hidden-state index 0..L -> the keys it was requested under
    last: bool  # last_hidden_state
    pooled: bool  # pooler_output
    depth: int  # layers to run


class SigLIP2Encoder(TowerIOMixin, TowerKnobsMixin, ForwardIntermediatesMixin, nn.Module):
    """The SigLIP / SigLIP 2 vision tower.

    Build it from a checkpoint with :meth:`from_pretrained`, from a named architecture with random weights with
    :meth:`from_preset`, or from an :class:`~siglip2_encoder.EncoderConfig`.

    Inputs (what :class:`~siglip2_encoder.ImageProcessor` produces):

    * fixed-resolution towers: ``pixel_values`` (B, C, H, W); the token grid is (H // p, W // p). Sizes other than
      the native one interpolate the position embeddings as transformers' ``interpolate_pos_encoding=True``.
    * NaFlex towers: ``pixel_values`` (B, L, p * p * C) patchified and padded, with ``spatial_shapes`` (B, 2) giving
      each image's grid (h, w) and optionally ``pixel_attention_mask`` (B, L). (B, C, H, W) images are accepted too
      and patchified here.
    * either: a list of (C, H_i, W_i) images of any sizes, run packed; or patches as for NaFlex (fixed-resolution
      towers read each image's patches as that image: the processor's output for Idefics2's and Aria's letterboxes).

    Args:
        config: the architecture.
        processor_config: how images are preprocessed for this tower (``save_pretrained`` writes it); default:
            SigLIP 2's for the architecture.
    """

    def __init__(self, config: EncoderConfig, processor_config: ProcessorConfig | None = None) -> None:
        super().__init__()
        processor_config = processor_config or ProcessorConfig.default_for(config)
        patches = processor_config.own_grids or processor_config.letterbox == "phi4"  # Phi-4's masks count patches
        if processor_config.naflex != config.naflex or (patches and processor_config.patch_size != config.patch_size):
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

    def reset_parameters(self) -> None:
        """Random initialisation following the reference implementations (each part's ``reset_parameters``)."""
        self.embeddings.reset_parameters()
        for layer in self.encoder.layers:
            layer.reset_parameters()
        self.post_layernorm.reset_parameters()
        if self.head is not None:
            self.head.reset_parameters()

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
            pixel_values: (B, C, H, W); a list of (C, H_i, W_i) images of any sizes; or (B, L, p * p * C) patches
                (see the class docstring).
            spatial_shapes: (B, 2) per-image token grids (h, w); required for patchified input.
            pixel_attention_mask: (B, L) validity of patchified input; derived from spatial_shapes if absent.
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
