"""A LLaVA-style vision-language model: our encoder -> a projector -> any Hugging Face causal LM.

* :class:`VisionLanguageModel` scatters the projected image tokens into the LM's input embeddings; ``forward``
  returns the LM loss, ``generate`` runs Hugging Face generation (greedy, sampling, KV cache).
* :class:`TrainingStage` says which parts train (projector, LM, tower; full or LoRA); :func:`apply_stage` sets it.

Its batches come from :class:`~.vlm_processor.VLMProcessor` (with :func:`~.vlm_processor.add_image_token`; both
importable from here too, as the model's own); export to / import from transformers'
``LlavaForConditionalGeneration`` lives in :mod:`.llava_export`, saving and loading in this library's format in
:mod:`.vlm_io`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import MLPConfig, Projector, ProjectorConfig, VisionFeatures, build_projector
from ..models.lora import EncoderLoRAConfig, add_lora, trainable_parameters
from ..models.model import SigLIP2Encoder
from ..models.token_merging import TokenMerging, merged_forward
from .anyres import AnyResTiling
from .lfm2_splitting import Lfm2VlSplitting
from .reduction import TokenPruning
from .splitting import ImageSplitting
from .vlm_io import VLMIOMixin
from .vlm_processor import IGNORE_INDEX, VLMProcessor, add_image_token, image_grids

__all__ = [
    "IGNORE_INDEX",
    "STAGE_1",
    "STAGE_2",
    "TrainingStage",
    "VLMProcessor",
    "VisionLanguageModel",
    "add_image_token",
    "apply_stage",
]

logger = logging.getLogger(__name__)

# the export whose format holds each kind of splitting
_SPLITTING_EXPORTS = {ImageSplitting: "export_idefics3", Lfm2VlSplitting: "export_lfm2_vl"}


def _check_tiling(tiling: AnyResTiling, tower: SigLIP2Encoder, projector: Projector) -> None:
    """Refuse a tower or projector that AnyRes tiling cannot reassemble."""
    config = tower.config
    if config.naflex or config.image_size != tiling.tile or config.patch_size != tiling.patch_size:
        raise ValueError(
            f"AnyRes tiling of {tiling.tile} px tiles and patch {tiling.patch_size} needs a fixed-resolution tower of "
            f"that input; this tower takes {'NaFlex patches' if config.naflex else config.image_size} with patch "
            f"{config.patch_size}"
        )
    side = tiling.side
    if projector.num_tokens((side, side)) != side * side:
        raise ValueError(
            f"AnyRes tiling reassembles one token per patch; the {projector.config.kind} projector turns a "
            f"{side}x{side} view into {projector.num_tokens((side, side))} tokens: use a tokenwise one (mlp, linear)"
        )


def _check_splitting(
    splitting: ImageSplitting | Lfm2VlSplitting, tower: SigLIP2Encoder, tiling: AnyResTiling | None
) -> None:
    """Refuse a tower that the splitting cannot feed, and tiling beside it (a splitting is a tiling of its own)."""
    if tiling is not None:
        raise ValueError("image splitting is a tiling of its own: give a model splitting or tiling, not both")
    if isinstance(splitting, Lfm2VlSplitting):
        splitting.check(tower.processor_config)
    elif not isinstance(splitting, ImageSplitting):
        raise TypeError(f"splitting must be an ImageSplitting or an Lfm2VlSplitting, got {type(splitting).__name__}")
    elif tower.config.image_size != splitting.tile:
        raise ValueError(
            f"image splitting into {splitting.tile} px views needs a fixed-resolution tower of that input; this "
            f"tower takes {tower.config.image_size or 'NaFlex patches'}"
        )


def _check_reduction(
    reduction: TokenPruning | TokenMerging,
    tower: SigLIP2Encoder,
    projector: Projector,
    tiling: AnyResTiling | None,
    splitting: ImageSplitting | Lfm2VlSplitting | None,
) -> None:
    """Refuse what token reduction cannot serve: no pooling head to rank by, a projector that needs the grid; for
    merging, several layers or a depth other than the projector's layer."""
    if isinstance(reduction, TokenMerging):
        layers = projector.config.layers
        if len(layers) != 1 or tower.config.naflex:
            raise ValueError(
                f"token merging gives one hidden state of a fixed-resolution tower; the projector reads {layers} of a "
                f"{'NaFlex' if tower.config.naflex else 'fixed-resolution'} tower"
            )
        depth = tower.config.num_hidden_layers if layers[0] is None else tower.layer_index(layers[0])
        if reduction.depth != depth:
            raise ValueError(
                f"the projector reads hidden state {depth} (layer {layers[0]}), merged {depth} times; build the "
                f"merging with TokenMerging({reduction.r}, depth={depth}), got depth={reduction.depth}"
            )
    elif not tower.config.use_head:
        raise ValueError("token reduction ranks tokens by the tower's pooling head, and this tower has none")
    if projector.num_tokens((2, 3)) != 6 or tiling is not None or splitting is not None:
        raise ValueError(
            f"token reduction leaves tokens without a grid: it needs a tokenwise projector (mlp, linear; got "
            f"{projector.config.kind}) and no tiling or splitting"
        )


def _tiling_inputs(
    image_sizes: torch.Tensor | None, image_tiled: torch.Tensor | None
) -> tuple[list[tuple[int, int]], list[bool]]:
    if image_sizes is None or image_tiled is None:
        raise ValueError("a model with AnyRes tiling needs image_sizes and image_tiled with its views (VLMProcessor)")
    return [(int(h), int(w)) for h, w in image_sizes.tolist()], [bool(t) for t in image_tiled.tolist()]


class VisionLanguageModel(VLMIOMixin, nn.Module):
    """vision tower -> projector -> language model, composed in plain code.

    Args:
        vision_tower: the encoder (frozen, LoRA-wrapped or trainable).
        projector: maps the tower's tokens to the LM's width; its ``config.layers`` picks the tower layers.
        language_model: any ``AutoModelForCausalLM`` (Llama, Qwen2, Gemma, ...).
        image_token_id: the placeholder token id (see :func:`add_image_token`).
        tiling: LLaVA-OneVision's or LLaVA-NeXT's AnyRes tiling (:mod:`.anyres`): each image is seen as several
            views whose projected tokens are reassembled, with a learned ``image_newline`` (D_lm,) after each row. It
            needs a fixed-resolution tower whose input is the tile, and a projector that keeps one token per patch.
        splitting: Idefics3's image splitting (:mod:`.splitting`; a fixed-resolution tower whose input is the tile)
            or LFM2-VL's (:mod:`.lfm2_splitting`; a NaFlex tower sized by LFM2-VL's rule), which the model's processor
            applies: the views are images to the model, which keeps the setting so that its saves and exports
            preprocess as it was trained.
        reduction: fewer tokens per image for the LLM: after the tower (:class:`~.reduction.TokenPruning`, which
            needs the tower's pooling head) or inside it (:class:`~siglip2_encoder.models.token_merging.TokenMerging`,
            ToMe, whose ``depth`` must be the projector's layer); either needs a tokenwise projector.
    """

    def __init__(
        self,
        vision_tower: SigLIP2Encoder,
        projector: Projector,
        language_model: PreTrainedModel,
        image_token_id: int,
        tiling: AnyResTiling | None = None,
        splitting: ImageSplitting | Lfm2VlSplitting | None = None,
        reduction: TokenPruning | TokenMerging | None = None,
    ) -> None:
        super().__init__()
        width = language_model.get_input_embeddings().embedding_dim
        if projector.config.out_features != width:
            raise ValueError(
                f"the projector emits {projector.config.out_features} channels but the language model's width is "
                f"{width}; build the projector with out_features={width}"
            )
        if projector.config.in_features != vision_tower.config.hidden_size:
            raise ValueError(
                f"the projector takes {projector.config.in_features} channels but the tower's width is "
                f"{vision_tower.config.hidden_size}; build it with in_features={vision_tower.config.hidden_size}"
            )
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.name_or_path: str | None = None  # the folder or repo it was loaded from
        self.tiling, self.splitting, self.reduction = tiling, splitting, reduction
        if reduction is not None:
            _check_reduction(reduction, vision_tower, projector, tiling, splitting)
        self.image_newline = None if tiling is None else nn.Parameter(torch.randn(width) / math.sqrt(width))
        if tiling is not None:
            _check_tiling(tiling, vision_tower, projector)
        if splitting is not None:
            _check_splitting(splitting, vision_tower, tiling)

    @classmethod
    def build(
        cls,
        vision_tower: str | os.PathLike | SigLIP2Encoder,
        language_model: str | os.PathLike | PretrainedConfig | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        projector: ProjectorConfig | None = None,
        image_token: str = "<image>",
        tiling: AnyResTiling | None = None,
        splitting: ImageSplitting | Lfm2VlSplitting | None = None,
        reduction: TokenPruning | TokenMerging | None = None,
    ) -> tuple[VisionLanguageModel, VLMProcessor]:
        """Assemble a model and its batch processor from names or objects.

        Args:
            vision_tower: a SigLIP / SigLIP 2 Hub id or folder, or an encoder.
            language_model: a causal LM's Hub id or folder, its config (random init), or the model.
            tokenizer: the LM's tokenizer; the image token (and a pad token) are added to it.
            projector: its config; widths are filled in when left at 0. Default: LLaVA's 2-layer MLP on layer -2.
            image_token: the placeholder string.
            tiling: AnyRes tiling (e.g. ``AnyResTiling.onevision(tile, patch_size)`` for the tower's input and patch;
                default: one view per image).
            splitting: Idefics3's image splitting (``ImageSplitting(tile=<the tower's input>, longest_edge=...)``;
                add Idefics3's tokens to the tokenizer first, :func:`~.idefics3_export.add_idefics3_tokens`), or
                LFM2-VL's (``Lfm2VlSplitting()``; its tokens: :func:`~.lfm2_vl_export.add_lfm2_vl_tokens`).
            reduction: token reduction after the tower (``TokenPruning(dominant, contextual)``).
        """
        if not isinstance(vision_tower, SigLIP2Encoder):
            vision_tower = SigLIP2Encoder.from_pretrained(vision_tower)
        if isinstance(language_model, PretrainedConfig):
            language_model = AutoModelForCausalLM.from_config(language_model)
        elif not isinstance(language_model, PreTrainedModel):
            language_model = AutoModelForCausalLM.from_pretrained(language_model)
        image_token_id = add_image_token(tokenizer, language_model, image_token)
        width = language_model.get_input_embeddings().embedding_dim
        config = projector or MLPConfig(in_features=vision_tower.config.hidden_size, out_features=width)
        built = build_projector(config)
        model = cls(vision_tower, built, language_model, image_token_id, tiling, splitting, reduction)
        return model, VLMProcessor.for_model(model, tokenizer, image_token=image_token)

    def image_features(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_tiled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All images' projected tokens, concatenated in image order: (sum of per-image counts, D_lm). With tiling,
        ``pixel_values`` holds every image's views, all through the tower in one batch, reassembled per image."""
        if isinstance(self.reduction, TokenMerging):
            merged = merged_forward(self.tower, pixel_values, self.reduction, self.projector.config.layers[0])
            features = VisionFeatures(merged.tokens, [(1, merged.tokens.shape[1])] * len(merged.tokens))
            return torch.cat(self.projector(features).per_image())
        out = self.vision_tower(
            pixel_values,
            spatial_shapes,
            pixel_attention_mask,
            layers=self.projector.config.layers,
            return_last=isinstance(self.reduction, TokenPruning),
            return_pooled=False,
        )
        if isinstance(self.reduction, TokenPruning):
            config = self.projector.config
            features = VisionFeatures.from_output(out, config.layers, config.combine)
            weights = self.tower.head.probe_weights(out.last_hidden_state, out.attention_mask)
            return torch.cat(self.projector(self.reduction.reduce_batch(features, weights)).per_image())
        per_view = self.projector(out).per_image()
        if self.tiling is None:
            return torch.cat(per_view)
        sizes, tiled = _tiling_inputs(image_sizes, image_tiled)
        return self.tiling.reassemble_all(torch.stack(per_view), sizes, tiled, self.image_newline)

    def inputs_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_tiled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, D_lm) LM input embeddings with the image tokens scattered over the placeholders.

        The counts are checked before the tower runs: placeholders must equal the projector's tokens for the images.
        """
        placeholders = input_ids == self.image_token_id
        found = int(placeholders.sum())
        expected, images = 0, 0
        if pixel_values is not None and self.tiling is not None:
            sizes, tiled = _tiling_inputs(image_sizes, image_tiled)
            expected, images = sum(self.tiling.num_tokens(h, w, tiled=t) for (h, w), t in zip(sizes, tiled)), len(sizes)
        elif pixel_values is not None:
            grids = image_grids(pixel_values, spatial_shapes, self.tower.config.patch_size)
            counts = [self.projector.num_tokens(grid) for grid in grids]
            if self.reduction is not None:
                counts = [self.reduction.num_tokens(count) for count in counts]
            expected, images = sum(counts), len(grids)
        if found != expected:
            raise ValueError(
                f"input_ids hold {found} image placeholder tokens but the {images} image(s) give {expected} tokens; "
                f"build batches with VLMProcessor, which expands each <image> to its image's token count"
            )
        embed = self.language_model.get_input_embeddings()
        embeds = embed(input_ids.masked_fill(placeholders, 0))
        if expected:
            features = self.image_features(pixel_values, spatial_shapes, pixel_attention_mask, image_sizes, image_tiled)
            embeds = embeds.masked_scatter(placeholders[..., None], features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_tiled: torch.Tensor | None = None,
        **lm_kwargs: Any,
    ) -> Any:
        """The language model's output (``loss`` when ``labels`` are given, ``logits``) on the merged inputs."""
        embeds = self.inputs_embeds(
            input_ids, pixel_values, spatial_shapes, pixel_attention_mask, image_sizes, image_tiled
        )
        if attention_mask is not None and "position_ids" not in lm_kwargs:
            # Positions count real tokens only, so left-padded samples start at 0 like unpadded ones.
            lm_kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_tiled: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Hugging Face ``generate`` on the merged inputs (any decoding: greedy, sampling, beams; KV cache).

        Returns:
            (B, new tokens): the generated ids only, without the prompt.
        """
        embeds = self.inputs_embeds(
            input_ids, pixel_values, spatial_shapes, pixel_attention_mask, image_sizes, image_tiled
        )
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ---------------------------------------------------------------------------------------------- adapters

    def merge_lora(self) -> VisionLanguageModel:
        """Fold LoRA adapters of the tower and the LM into their weights (for saving or fast inference)."""
        if isinstance(self.vision_tower, PeftModel):
            self.vision_tower = self.vision_tower.merge_and_unload()
        if isinstance(self.language_model, PeftModel):
            self.language_model = self.language_model.merge_and_unload()
        return self

    def check_exportable(
        self,
        action: str,
        *,
        tiling: bool,
        splitting: type[ImageSplitting | Lfm2VlSplitting] | None = None,
        letterboxes: tuple[str, ...] = (),
    ) -> None:
        """Refuse ``action`` (an export) for what transformers' VLM of that format cannot do: unmerged LoRA, token
        reduction after the tower, (unless ``tiling``) AnyRes tiling with its ``image_newline``, image splitting
        other than ``splitting``'s (the kind that format's processor does), and a letterboxing processor other than
        ``letterboxes``."""
        self.check_merged(action)
        letterbox = self.tower.processor_config.letterbox
        if letterbox is not None and letterbox not in letterboxes:
            raise ValueError(
                f"{action}: the tower's processor letterboxes images (letterbox={letterbox!r}), which that format's "
                f"processor does not: its model would see other pixels; train with "
                f"processor_config.at_size(processor_config.image_size) (no letterbox), or save it with save_pretrained"
            )
        if self.splitting is not None and not (splitting is not None and isinstance(self.splitting, splitting)):
            raise ValueError(
                f"{action}: this model splits its images ({type(self.splitting).__name__}), which that format's "
                f"processor does not do: its model would see other views; export it with "
                f"{_SPLITTING_EXPORTS[type(self.splitting)]}, or save it with save_pretrained"
            )
        if self.reduction is not None:
            raise ValueError(
                f"{action}: this model reduces its image tokens after the tower ({self.reduction}), which that "
                f"format's model does not do: its LLM would get other tokens; save it with save_pretrained"
            )
        if self.tiling is not None and not tiling:
            raise ValueError(
                f"{action}: this model tiles its images (AnyRes) and learns an image_newline, which that format does "
                f"not hold; save it with save_pretrained"
            )


# --------------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class TrainingStage:
    """Which parts of a :class:`VisionLanguageModel` train. Everything not named here is frozen."""

    projector: bool = True
    language_model: Literal["frozen", "full", "lora"] = "frozen"
    vision_tower: Literal["frozen", "full", "lora"] = "frozen"
    lm_lora: dict[str, Any] = field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
    tower_lora: EncoderLoRAConfig = field(default_factory=EncoderLoRAConfig)

    def __post_init__(self) -> None:
        for name in ("language_model", "vision_tower"):
            if getattr(self, name) not in ("frozen", "full", "lora"):
                raise ValueError(f"{name} must be 'frozen', 'full' or 'lora', got {name}={getattr(self, name)!r}")


STAGE_1 = TrainingStage()  # LLaVA stage 1: align the projector, everything else frozen
STAGE_2 = TrainingStage(language_model="full")  # LLaVA stage 2: projector + LM, tower frozen


def _train_active_adapters(model: nn.Module) -> None:
    """Make the active adapters of every peft layer in ``model`` trainable (the rest stays as the caller froze it)."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(module.active_adapters)


def apply_stage(model: VisionLanguageModel, stage: TrainingStage) -> dict[str, tuple[int, int]]:
    """Freeze and unfreeze for ``stage`` (adding LoRA adapters it asks for) and return (trainable, total)
    parameter counts per part."""
    model.requires_grad_(False)
    model.projector.requires_grad_(stage.projector)
    if stage.language_model == "full":
        model.language_model.requires_grad_(True)
    elif stage.language_model == "lora":
        if not isinstance(model.language_model, PeftModel):
            model.language_model = get_peft_model(model.language_model, LoraConfig(**stage.lm_lora))
        _train_active_adapters(model.language_model)
    if stage.vision_tower == "full":
        model.vision_tower.requires_grad_(True)
    elif stage.vision_tower == "lora":
        if not isinstance(model.vision_tower, PeftModel):
            model.vision_tower = add_lora(model.vision_tower, stage.tower_lora)
        _train_active_adapters(model.vision_tower)
    counts = {
        part: trainable_parameters(getattr(model, part)) for part in ("vision_tower", "projector", "language_model")
    }
    logger.info(
        "stage: projector %s, language model %s, tower %s; trainable %s",
        "trained" if stage.projector else "frozen",
        stage.language_model,
        stage.vision_tower,
        ", ".join(f"{k} {t:,} of {n:,}" for k, (t, n) in counts.items()),
    )
    return counts
