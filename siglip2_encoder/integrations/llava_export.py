"""Export to and import from transformers' ``LlavaForConditionalGeneration`` format, and, for models with AnyRes
tiling, ``LlavaOnevisionForConditionalGeneration``'s (the same parts plus ``image_newline`` and the tiling settings).

What fits LLaVA's format, and why the rest does not:

* the tower must be fixed-resolution: LLaVA calls its vision tower with ``pixel_values`` alone, while NaFlex
  towers need ``spatial_shapes`` and a patch mask;
* the projector must be ``mlp`` with depth 2 and hidden width = the LM's width (LLaVA's ``linear_1``, GELU,
  ``linear_2``), or ``linear`` (written as ``linear_1`` = the layer, activation "linear", ``linear_2`` = identity).
  Pixel-shuffle, pooling and resampler projectors change the token count, which LLaVA's projector cannot;
* the projector must read hidden states (integer layers, concatenated): LLaVA selects ``hidden_states[layer]``,
  which never holds the post-layernorm ``last_hidden_state``;
* LoRA adapters must be merged first (``VisionLanguageModel.merge_lora``).

Exported folders run in transformers alone (``AutoProcessor`` + ``apply_chat_template`` + ``generate``) and give the
same logits and greedy generations as the model they came from (tested with Llama and Qwen2 language models).
llama.cpp's converter takes the language model; it has no SigLIP mmproj for LLaVA, and none is written here, since
llama.cpp would preprocess its images as LLaVA-1.5's (padded square), not as SigLIP's (docs/vlm.md: llama.cpp).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
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
from .hf_export import check_tokenizer, language_model_weights, plain_chat_template, text_config, write_export
from .llava import VisionLanguageModel

__all__ = ["LlavaExport", "export_llava", "export_llava_onevision", "import_llava"]


def _check_exportable(model: VisionLanguageModel) -> None:
    model.check_merged("cannot export to LLaVA's format")
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
    """Write ``model`` as a transformers LLaVA checkpoint that ``AutoProcessor`` + ``apply_chat_template`` +
    ``LlavaForConditionalGeneration.generate`` run as they are: the model's files as transformers writes them,
    ``preprocessor_config.json`` and, given the tokenizer, the ``LlavaProcessor``'s files.

    Args:
        model: a fixed-resolution VLM with a linear or 2-layer MLP projector on hidden states (LoRA merged).
        directory: the folder to write.
        tokenizer: the tokenizer the model was built with (it must hold the image token at the model's id).
        chat_template: the processor's Jinja chat template; default :func:`plain_chat_template`, which renders a
            conversation as :class:`VLMProcessor` prompts are written (``<image> what colour is it ?``). Give your
            own when the model was trained on another prompt format.

    Raises ``ValueError`` naming the reason for configurations LLaVA cannot express and for a tokenizer that does
    not fit the model."""
    model.check_untiled("cannot export to LLaVA's format (export_llava_onevision writes tiled models)")
    _check_exportable(model)
    image_token = None if tokenizer is None else check_tokenizer(tokenizer, model.language_model, model.image_token_id)
    tower = model.tower
    config = LlavaConfig(**_config_fields(model), image_seq_length=tower.config.position_grid**2)
    write_export(
        directory,
        LlavaForConditionalGeneration,
        config,
        _weights(model, config.tie_word_embeddings),
        SiglipImageProcessor.from_dict(processor_config_to_hf(tower.processor_config)),
        LlavaProcessor,
        tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token=image_token,
        chat_template=chat_template or (plain_chat_template(image_token) if image_token else None),
    )


def export_llava_onevision(
    model: VisionLanguageModel,
    directory: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    chat_template: str | None = None,
) -> None:
    """Write a model with AnyRes tiling (:mod:`.anyres`) as a transformers LLaVA-OneVision checkpoint, which
    ``AutoProcessor`` + ``apply_chat_template`` + ``LlavaOnevisionForConditionalGeneration.generate`` run as they are:
    :func:`export_llava`'s files, with ``image_newline``, the pinpoints and ``anyres_max_N`` in the config, and the
    OneVision image processor and processor (``num_image_tokens``, ``vision_aspect_ratio``). Same arguments and
    refusals as :func:`export_llava`; a model without tiling is refused (export it with :func:`export_llava`)."""
    tiling = model.tiling
    if tiling is None:
        raise ValueError("the model has no AnyRes tiling: export it to LLaVA's format with export_llava")
    _check_exportable(model)
    image_token = None if tokenizer is None else check_tokenizer(tokenizer, model.language_model, model.image_token_id)
    pinpoints = [list(p) for p in tiling.grid_pinpoints]
    config = LlavaOnevisionConfig(
        **_config_fields(model),
        # No video path here: an id no token has, so that no text is taken for a clip placeholder.
        video_token_index=model.language_model.get_input_embeddings().num_embeddings,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=f"anyres_max_{tiling.max_tiles}",
    )
    state = _weights(model, config.tie_word_embeddings) | {"model.image_newline": model.image_newline.detach()}
    settings = processor_config_to_hf(model.tower.processor_config) | {"image_grid_pinpoints": pinpoints}
    write_export(
        directory,
        LlavaOnevisionForConditionalGeneration,
        config,
        state,
        LlavaOnevisionImageProcessor.from_dict(settings),
        LlavaOnevisionProcessor,
        tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=tiling.side**2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{tiling.max_tiles}",
        image_token=image_token,
        chat_template=chat_template or (plain_chat_template(image_token) if image_token else None),
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
_NOT_REPRESENTED = {
    "llava_next": "the learned image_newline token and anyres tiling (image_grid_pinpoints)",
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
    """Load a transformers LLaVA (``model_type="llava"``) or LLaVA-OneVision (``"llava_onevision"``: with its
    AnyRes tiling and ``image_newline``) checkpoint with a SigLIP vision tower - a folder or a Hub repo - into a
    :class:`VisionLanguageModel`. LLaVA-NeXT checkpoints are refused (their tiling is not reproduced yet);
    ``SigLIP2Encoder.from_pretrained`` loads their towers. OneVision's video path (frames pooled bilinearly) has no
    place here: the imported model refuses clips."""
    source = CheckpointSource(name_or_path, revision=revision, token=token, local_files_only=local_files_only)
    directory = source.snapshot() if not source.is_local else name_or_path
    config_file = Path(directory) / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if model_type not in ("llava", "llava_onevision"):
        what = _NOT_REPRESENTED.get(model_type, "a different architecture")
        raise ValueError(
            f"{directory} is a {model_type!r} checkpoint, not 'llava' or 'llava_onevision': importing it would drop "
            f"{what}. Load its vision tower alone with SigLIP2Encoder.from_pretrained({str(directory)!r})"
        )
    onevision = model_type == "llava_onevision"
    cls = LlavaOnevisionForConditionalGeneration if onevision else LlavaForConditionalGeneration
    llava = cls.from_pretrained(directory, dtype=dtype or torch.float32)
    config = llava.config
    _check_importable(config)
    tiling = _tiling(config) if onevision else None
    tower_config = config_from_hf(config.vision_config.to_dict())
    processor = read_processor_config(CheckpointSource(directory), tower_config, views=onevision)
    state = convert_hf_state_dict(llava.model.vision_tower.state_dict())
    tower = build_loaded(lambda: SigLIP2Encoder(tower_config, processor), state, f"{directory}", "vision tower")
    projector = _import_projector(config, llava.model.multi_modal_projector, tower_config.hidden_size)
    lm = AutoModelForCausalLM.from_config(config.text_config, dtype=llava.dtype)
    prefix = f"{lm.base_model_prefix}."
    state = {prefix + k: v for k, v in llava.model.language_model.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight
    lm.load_state_dict(state, strict=True)
    model = VisionLanguageModel(tower.to(llava.dtype), projector.to(llava.dtype), lm, config.image_token_id, tiling)
    if tiling is not None:
        model.image_newline = nn.Parameter(llava.model.image_newline.detach().clone())
    return model


def _tiling(config: LlavaOnevisionConfig) -> AnyResTiling:
    """A OneVision config's tiling: its pinpoints, and N of ``anyres_max_N``."""
    match = re.fullmatch(r"anyres_max_(\d+)", config.vision_aspect_ratio or "")
    if match is None:
        raise ValueError(f"vision_aspect_ratio={config.vision_aspect_ratio!r} is not of the form 'anyres_max_N'")
    vision = config.vision_config
    pinpoints = tuple(tuple(p) for p in config.image_grid_pinpoints)
    return AnyResTiling(vision.image_size, vision.patch_size, pinpoints, int(match[1]))


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
