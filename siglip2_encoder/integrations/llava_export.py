"""Export to and import from transformers' ``LlavaForConditionalGeneration`` format, and, for models with AnyRes
tiling, LLaVA-OneVision's and LLaVA-NeXT's (the same parts plus ``image_newline`` and the tiling settings).

What fits LLaVA's format, and why the rest does not:

* the tower must be fixed-resolution: LLaVA calls its vision tower with ``pixel_values`` alone, while NaFlex
  towers need ``spatial_shapes`` and a patch mask;
* the projector must be ``mlp`` with depth 2 and hidden width = the LM's width (LLaVA's ``linear_1``, GELU,
  ``linear_2``), or ``linear`` (written as ``linear_1`` = the layer, activation "linear", ``linear_2`` = identity;
  transformers runs it, vLLM's LLaVA does not: its activation registry has no "linear").
  Pixel-shuffle, pooling and resampler projectors change the token count, which LLaVA's projector cannot;
* the projector must read hidden states (integer layers, concatenated): LLaVA selects ``hidden_states[layer]``,
  which never holds the post-layernorm ``last_hidden_state``;
* LoRA adapters must be merged first (``VisionLanguageModel.merge_lora``);
* DeepSeek-VL's letterbox (``ProcessorConfig(letterbox="deepseek_vl")``) is written as its image processor, which
  ``LlavaProcessor`` takes as any other; with AnyRes tiling it is refused (the tiled families' processors stretch
  their base view), as is pi0's letterbox (not tested in LLaVA's consumers).

Exported folders run in transformers alone (``AutoProcessor`` + ``apply_chat_template`` + ``generate``) and give the
same logits and greedy generations as the model they came from (tested with Llama and Qwen2 language models).
llama.cpp's converter takes the language model; it has no SigLIP mmproj for LLaVA, and none is written here, since
llama.cpp would preprocess its images as LLaVA-1.5's (padded square), not as SigLIP's (docs/vlm.md: llama.cpp).
"""

from __future__ import annotations

import logging
import os
import re

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    DeepseekVLImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    SiglipImageProcessor,
)

from ..adapters import LinearConfig, LinearProjector, MLPConfig, MLPProjector, build_projector
from ..checkpoints.folders import read_processor_config
from ..checkpoints.hf_format import config_from_hf, config_to_hf, convert_hf_state_dict, processor_config_to_hf
from ..checkpoints.hub import CheckpointSource
from ..checkpoints.publish import HubMixin, ModelCardInfo
from ..checkpoints.strict import build_loaded
from ..models.model import SigLIP2Encoder
from .anyres import AnyResTiling
from .hf_export import (
    check_tokenizer,
    checkpoint_folder,
    language_model_from,
    language_model_weights,
    plain_chat_template,
    text_config,
    write_export,
)
from .llava import VisionLanguageModel

__all__ = ["LlavaExport", "export_llava", "import_llava"]

logger = logging.getLogger(__name__)


# The processors a LLaVA export writes for a tower without tiling, by the type its settings name.
_IMAGE_PROCESSORS = {"SiglipImageProcessor": SiglipImageProcessor, "DeepseekVLImageProcessor": DeepseekVLImageProcessor}


def _check_exportable(model: VisionLanguageModel) -> None:
    letterboxes = ("deepseek_vl",) if model.tiling is None else ()
    model.check_exportable("cannot export to LLaVA's format", tiling=True, letterboxes=letterboxes)
    if model.tower.config.naflex:
        raise ValueError(
            "NaFlex towers cannot be exported to LLaVA's format: LLaVA calls its vision tower with pixel_values "
            "only, but NaFlex needs spatial_shapes and a patch mask. Use VisionLanguageModel.save_pretrained"
        )
    config = model.projector.config
    if isinstance(model.projector, MLPProjector):
        if config.depth != 2 or (config.hidden_features or config.out_features) != config.out_features:
            raise ValueError(
                f"LLaVA's projector is linear -> GELU -> linear with hidden width = the LM's width; this MLP has "
                f"depth={config.depth}, hidden_features={config.hidden_features}"
            )
    elif not isinstance(model.projector, LinearProjector):
        raise ValueError(
            f"a {config.kind!r} projector cannot be exported to LLaVA's format, whose projector keeps one token per "
            f"patch (linear or 2-layer MLP only); use VisionLanguageModel.save_pretrained"
        )
    if isinstance(model.projector, LinearProjector):
        logger.warning(
            "a linear projector exports with projector_hidden_act='linear', which transformers runs and vLLM's LLaVA "
            "refuses (\"Activation function 'linear' is not supported.\"); for vLLM, build the model with an mlp "
            "projector"
        )
    if None in config.layers or config.combine != "concat":
        raise ValueError(
            f"LLaVA feeds its projector hidden states (integer layers, concatenated); this projector has "
            f"layers={config.layers}, combine={config.combine!r}"
        )


def _linears(projector: MLPProjector) -> list[nn.Linear]:
    """The projector MLP's linear layers, in order."""
    return [m for m in projector.proj.modules() if isinstance(m, nn.Linear)]


def export_llava(
    model: VisionLanguageModel,
    directory: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    chat_template: str | None = None,
) -> None:
    """Write ``model`` as a transformers checkpoint that ``AutoProcessor`` + ``apply_chat_template`` + ``generate`` run
    as they are: the model's files as transformers writes them, ``preprocessor_config.json`` and, given the tokenizer,
    the processor's files. The format follows the model: ``LlavaForConditionalGeneration`` for one view per image;
    with AnyRes tiling, its family's (``LlavaOnevisionForConditionalGeneration`` or
    ``LlavaNextForConditionalGeneration``: ``image_newline``, the pinpoints, OneVision's ``anyres_max_N``, the
    family's image processor and processor).

    Args:
        model: a fixed-resolution VLM with a linear or 2-layer MLP projector on hidden states (LoRA merged).
        directory: the folder to write.
        tokenizer: the tokenizer the model was built with (it must hold the image token at the model's id).
        chat_template: the processor's Jinja chat template; default :func:`plain_chat_template`, which renders a
            conversation as :class:`VLMProcessor` prompts are written (``<image> what colour is it ?``). Give your
            own when the model was trained on another prompt format.

    Raises ``ValueError`` naming the reason for configurations LLaVA cannot express and for a tokenizer that does
    not fit the model."""
    _check_exportable(model)
    image_token = None if tokenizer is None else check_tokenizer(tokenizer, model.language_model, model.image_token_id)
    tower, tiling, fields = model.tower, model.tiling, _config_fields(model)
    state = _weights(model, fields["tie_word_embeddings"])
    settings = processor_config_to_hf(tower.processor_config)
    options = dict(
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        image_token=image_token,
        chat_template=chat_template or (plain_chat_template(image_token) if image_token else None),
    )
    if tiling is None:
        config = LlavaConfig(**fields, image_seq_length=tower.config.position_grid**2)
        image_processor = _IMAGE_PROCESSORS[settings["image_processor_type"]].from_dict(settings)
        patch = tower.config.patch_size
        write_export(directory, LlavaForConditionalGeneration, config, state, image_processor, LlavaProcessor,
                     tokenizer, patch_size=patch, num_additional_image_tokens=0, **options)  # fmt: skip
        return
    pinpoints = [list(p) for p in tiling.grid_pinpoints]
    state["model.image_newline"] = model.image_newline.detach()
    settings |= {"image_grid_pinpoints": pinpoints}
    if tiling.family == "llava_next":
        config = LlavaNextConfig(**fields, image_grid_pinpoints=pinpoints, image_seq_length=tiling.side**2)
        # NeXT's processor crops each view to crop_size (224 by default): here the views are the tiles themselves.
        image_processor = LlavaNextImageProcessor.from_dict(settings | {"do_center_crop": False, "crop_size": None})
        write_export(directory, LlavaNextForConditionalGeneration, config, state, image_processor, LlavaNextProcessor,
                     tokenizer, patch_size=tiling.patch_size, num_additional_image_tokens=0, **options)  # fmt: skip
        return
    aspect = f"anyres_max_{tiling.max_tiles}"
    _warn_of_vllm_onevision(tiling.max_tiles)
    config = LlavaOnevisionConfig(
        **fields,
        # No video path here: an id no token has, so that no text is taken for a clip placeholder.
        video_token_index=model.language_model.get_input_embeddings().num_embeddings,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=aspect,
    )
    image_processor = LlavaOnevisionImageProcessor.from_dict(settings)
    write_export(directory, LlavaOnevisionForConditionalGeneration, config, state, image_processor,
                 LlavaOnevisionProcessor, tokenizer, video_processor=LlavaOnevisionVideoProcessor(),
                 num_image_tokens=tiling.side**2, vision_aspect_ratio=aspect, **options)  # fmt: skip


def _warn_of_vllm_onevision(max_tiles: int) -> None:
    """What vLLM's LLaVA-OneVision (0.32, tested) does with a OneVision export: it also takes videos, for which the
    export has no token, and it counts and merges image tokens as anyres_max_9 whatever the config says."""
    logger.warning(
        "vLLM's LLaVA-OneVision also takes videos, which this export has no token for: start vLLM with "
        "limit_mm_per_prompt={'video': 0} (--limit-mm-per-prompt '{\"video\": 0}'), or its start-up stops with "
        "'Mismatch in `video` token count'"
    )
    if max_tiles != 9:
        logger.warning(
            "vLLM's LLaVA-OneVision reduces image tokens as anyres_max_9 whatever vision_aspect_ratio says: with "
            "anyres_max_%d, an image whose tiles hold more tokens than %d tiles do is reduced to other token counts "
            "in vLLM than in transformers, with no error; build the tiling with max_tiles=9 for vLLM",
            max_tiles,
            min(max_tiles, 9),
        )


def _config_fields(model: VisionLanguageModel) -> dict:
    """The config fields LLaVA and LLaVA-OneVision share: towers, image token, the projector's layers and kind."""
    tower, projector, lm = model.tower, model.projector, model.language_model
    layers = list(projector.config.layers)
    return dict(
        vision_config={k: v for k, v in config_to_hf(tower.config).items() if k != "architectures"},
        text_config=text_config(lm),
        image_token_index=model.image_token_id,
        vision_feature_layer=layers[0] if len(layers) == 1 else layers,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        projector_hidden_act="gelu" if isinstance(projector, MLPProjector) else "linear",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )


def _weights(model: VisionLanguageModel, tied: bool) -> dict[str, torch.Tensor]:
    state = {f"model.vision_tower.{k}": v for k, v in model.tower.state_dict().items()}
    state |= _projector_weights(model.projector)
    return state | language_model_weights(model.language_model, "model.language_model.", tied)


def _projector_weights(projector: LinearProjector | MLPProjector) -> dict[str, torch.Tensor]:
    """The projector as LLaVA's ``multi_modal_projector``: linear_1, GELU, linear_2 (a linear projector: linear_1,
    then an identity linear_2 under LLaVA's "linear" activation)."""
    if isinstance(projector, MLPProjector):
        first, second = _linears(projector)
        linear_1, linear_2 = (first.weight, first.bias), (second.weight, second.bias)
    else:
        width = projector.config.out_features
        linear_1 = (projector.proj.weight, projector.proj.bias)
        linear_2 = (torch.eye(width, dtype=projector.proj.weight.dtype), projector.proj.bias.new_zeros(width))
    prefix = "model.multi_modal_projector"
    return {
        f"{prefix}.{name}.{kind}": value
        for name, pair in (("linear_1", linear_1), ("linear_2", linear_2))
        for kind, value in zip(("weight", "bias"), pair)
    }


# What the LLaVA variants add to LLaVA's vision path, which VisionLanguageModel does not represent; transformers would
# load their folders into LlavaForConditionalGeneration dropping it, with only a logged warning.
_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
}
_NOT_REPRESENTED = {
    "llava_next_video": "the learned image_newline token, anyres tiling and the pooling of video frames",
}


# The model card's transformers code: the exported folder's own processor, chat template and generate.
TRANSFORMERS_SNIPPET = """from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("{repo_id}")
model = AutoModelForImageTextToText.from_pretrained("{repo_id}")
image = Image.new("RGB", (640, 480), "red")  # or Image.open("photo.jpg")
content = [{{"type": "image", "image": image}}, {{"type": "text", "text": "describe"}}]
conversation = [{{"role": "user", "content": content}}]
inputs = processor.apply_chat_template(
    conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
new_tokens = model.generate(**inputs, max_new_tokens=20)[:, inputs["input_ids"].shape[1] :]
answer = processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
"""


class LlavaExport(HubMixin):
    """A :class:`VisionLanguageModel` in transformers' LLaVA format, to publish: ``LlavaExport(model,
    tokenizer).push_to_hub(repo_id)`` uploads what :func:`export_llava` writes, with a model card."""

    def __init__(self, model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        _check_exportable(model)
        self.model, self.tokenizer = model, tokenizer

    @property
    def base_checkpoint(self) -> str | None:
        return self.model.base_checkpoint

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        export_llava(self.model, folder, self.tokenizer)

    def model_card_info(self) -> ModelCardInfo:
        own = self.model.model_card_info()
        return ModelCardInfo(
            title=own.title.replace("LLaVA-style VLM", "LLaVA (transformers' format)"),
            summary="A LLaVA vision-language model built with siglip2-encoder and exported to transformers' "
            "LlavaForConditionalGeneration format: it loads without this library.",
            details=own.details,
            snippet="from siglip2_encoder.integrations.llava_export import import_llava\n\n"
            'model = import_llava("{repo_id}")\n',
            transformers_snippet=TRANSFORMERS_SNIPPET,
            base_model=own.base_model,
            tags=own.tags,
            library_name="transformers",
            pipeline_tag="image-text-to-text",
        )


def import_llava(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> VisionLanguageModel:
    """Load a transformers LLaVA (``model_type="llava"``), LLaVA-OneVision (``"llava_onevision"``) or LLaVA-NeXT
    (``"llava_next"``) checkpoint with a SigLIP vision tower - a folder or a Hub repo - into a
    :class:`VisionLanguageModel`, the latter two with their AnyRes tiling and ``image_newline``. Other families
    (LLaVA-NeXT-Video, ...) are refused, naming what would be lost; ``SigLIP2Encoder.from_pretrained`` loads their
    towers. OneVision's video path (frames pooled bilinearly) has no place here: the imported model refuses clips."""
    directory, model_type = checkpoint_folder(name_or_path, revision, token, local_files_only)
    if model_type not in _MODEL_CLASSES:
        what = _NOT_REPRESENTED.get(model_type, "a different architecture")
        raise ValueError(
            f"{directory} is a {model_type!r} checkpoint, not one of {tuple(_MODEL_CLASSES)}: importing it would drop "
            f"{what}. Load its vision tower alone with SigLIP2Encoder.from_pretrained({str(directory)!r})"
        )
    llava = _MODEL_CLASSES[model_type].from_pretrained(directory, dtype=dtype or torch.float32)
    config = llava.config
    _check_importable(config)
    tiling = None if model_type == "llava" else _tiling(config, model_type, directory)
    tower_config = config_from_hf(config.vision_config.to_dict())
    processor = read_processor_config(CheckpointSource(directory), tower_config, views=tiling is not None)
    state = convert_hf_state_dict(llava.model.vision_tower.state_dict())
    tower = build_loaded(lambda: SigLIP2Encoder(tower_config, processor), state, f"{directory}", "vision tower")
    projector = _import_projector(config, llava.model.multi_modal_projector, tower_config.hidden_size)
    lm = language_model_from(llava, llava.model.language_model, config.text_config)
    model = VisionLanguageModel(tower.to(llava.dtype), projector.to(llava.dtype), lm, config.image_token_id, tiling)
    if tiling is not None:
        model.image_newline = nn.Parameter(llava.model.image_newline.detach().clone())
    return model


def _tiling(config: LlavaOnevisionConfig | LlavaNextConfig, family: str, directory: str | os.PathLike) -> AnyResTiling:
    """A OneVision or NeXT checkpoint's tiling: its pinpoints, and OneVision's N of ``anyres_max_N``. A NeXT image
    processor that crops its views (``crop_size`` other than the tile) is refused: those views are not the tiles."""
    vision = config.vision_config
    pinpoints = tuple(tuple(p) for p in config.image_grid_pinpoints)
    if family == "llava_next":
        images = AutoImageProcessor.from_pretrained(directory)
        crop = getattr(images, "crop_size", None) or {}
        if images.do_center_crop and (crop.get("height"), crop.get("width")) != (vision.image_size,) * 2:
            raise ValueError(
                f"the LLaVA-NeXT image processor crops every view to {crop} but the tower takes "
                f"{vision.image_size} px: its views are not the tiles; set do_center_crop false or crop_size to the "
                f"tower's size in {directory}'s processor settings"
            )
        return AnyResTiling(vision.image_size, vision.patch_size, pinpoints, "llava_next", None)
    match = re.fullmatch(r"anyres_max_(\d+)", config.vision_aspect_ratio or "")
    if match is None:
        raise ValueError(f"vision_aspect_ratio={config.vision_aspect_ratio!r} is not of the form 'anyres_max_N'")
    return AnyResTiling(vision.image_size, vision.patch_size, pinpoints, "llava_onevision", int(match[1]))


def _check_importable(config: LlavaConfig) -> None:
    """Refuse what a VisionLanguageModel cannot hold: a non-SigLIP tower, a dropped CLS token, bias-free projectors."""
    if config.vision_config.model_type != "siglip_vision_model":
        raise ValueError(f"the LLaVA vision tower is {config.vision_config.model_type!r}, not a SigLIP tower")
    if config.vision_feature_select_strategy != "full":
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} drops a CLS token that "
            f"SigLIP towers do not have; only 'full' is supported"
        )
    if not config.multimodal_projector_bias:
        raise ValueError("projectors without bias (multimodal_projector_bias=False) are not supported")


def _import_projector(config: LlavaConfig, source: nn.Module, tower_width: int) -> LinearProjector | MLPProjector:
    """LLaVA's ``multi_modal_projector`` as our projector on the same layers: a 2-layer MLP (GELU), or one linear
    layer for the "linear" activation (linear_2 after linear_1, multiplied out)."""
    layers = config.vision_feature_layer
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    common = dict(in_features=tower_width, out_features=config.text_config.hidden_size, layers=layers)
    if config.projector_hidden_act == "gelu":
        projector = build_projector(MLPConfig(depth=2, **common))
        for ours, theirs in zip(_linears(projector), (source.linear_1, source.linear_2)):
            ours.load_state_dict(theirs.state_dict())
        return projector
    if config.projector_hidden_act == "linear":
        projector = build_projector(LinearConfig(**common))
        with torch.no_grad():  # linear_2(linear_1(x)) as one layer
            projector.proj.weight.copy_(source.linear_2.weight @ source.linear_1.weight)
            projector.proj.bias.copy_(source.linear_2.weight @ source.linear_1.bias + source.linear_2.bias)
        return projector
    raise ValueError(
        f"projector_hidden_act={config.projector_hidden_act!r}: only 'gelu' (exact GELU, our mlp) and 'linear' "
        f"are supported"
    )
