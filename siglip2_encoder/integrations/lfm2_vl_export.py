"""Export to transformers' ``Lfm2VlForConditionalGeneration`` format (LFM2-VL's architecture): the format for VLMs
built on a NaFlex tower, which LLaVA's and Idefics3's formats cannot hold.

What fits LFM2-VL's format, and why the rest does not:

* the tower must be NaFlex, and its processor must size images by LFM2-VL's rule (``ProcessorConfig(naflex_resize=
  "smart", grid_multiple=factor, ...)``, :func:`~siglip2_encoder.data.processor.smart_size`): LFM2-VL's processor
  knows no other, and its grids must be multiples of the unshuffle factor;
* the projector must be ``pixel_shuffle`` with depth 2 on the final tokens (``layers=(None,)``): LFM2-VL's projector
  is exactly pixel unshuffle by ``downsample_factor``, then, with ``norm`` (``projector_use_layernorm``), a
  LayerNorm, then linear, GELU, linear, on ``last_hidden_state``;
* no AnyRes tiling, Idefics3 splitting or token reduction; LoRA adapters merged first. LFM2-VL's own splitting
  (:class:`~.lfm2_splitting.Lfm2VlSplitting`: large images as tiles and a thumbnail) is written as its processor's
  ``do_image_splitting`` and its settings.

LFM2-VL's processor writes each image into the prompt as ``<|image_start|>``, its ``<image>`` tokens, then
``<|image_end|>`` (split images: each tile's tokens after ``<|img_row_r_col_c|>``, the thumbnail's after
``<|img_thumbnail|>``). :func:`add_lfm2_vl_tokens` adds these tokens to the tokenizer and the LM, and
``VLMProcessor(..., image_start=IMAGE_START, image_end=IMAGE_END)`` (or ``VLMProcessor(..., splitting=splitting)``)
writes them as LFM2-VL's processor does; the export refuses a tokenizer without them. Without splitting the written
processor does not tile (``do_image_splitting=False``): each image is one view, as here.

Exported folders run in transformers alone - ``AutoProcessor`` + ``apply_chat_template`` + ``generate``, and the
``image-text-to-text`` pipeline - with the same prompt tokens, patches and greedy tokens as the model they came from
(tested with a Llama and an LFM2 language model: transformers' LFM2-VL takes any causal LM). vLLM's LFM2-VL takes
LFM2 language models only; it starts on the export and builds our prompts (tested; docs/vlm.md says why its tokens
are not compared).

llama.cpp's converter (``convert_hf_to_gguf.py``, and ``--mmproj``) converts the folder as it is, and llama.cpp runs
it as LFM2-VL's own where :func:`llama_cpp_differences` names nothing (LFM2-VL's processor settings, 16 px patches,
a tied language model); the export logs what it names (docs/vlm.md: llama.cpp).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import (
    Lfm2VlConfig,
    Lfm2VlForConditionalGeneration,
    Lfm2VlImageProcessor,
    Lfm2VlProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..adapters import PixelShuffleConfig, PixelShuffleProjector, build_projector
from ..checkpoints.folders import read_checkpoint
from ..checkpoints.hf_format import config_to_hf, processor_config_to_hf
from ..checkpoints.hub import CheckpointSource
from ..checkpoints.strict import build_loaded
from ..models.model import SigLIP2Encoder
from .hf_export import (
    check_tokenizer,
    checkpoint_folder,
    language_model_from,
    language_model_weights,
    llama_cpp_pixel_values,
    plain_chat_template,
    text_config,
    write_export,
)
from .lfm2_splitting import IMAGE_END, IMAGE_START, Lfm2VlSplitting
from .llava import VisionLanguageModel, add_image_token

__all__ = [
    "IMAGE_END",
    "IMAGE_START",
    "add_lfm2_vl_tokens",
    "export_lfm2_vl",
    "import_lfm2_vl",
    "llama_cpp_differences",
]

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # LFM2-VL's placeholder (transformers' Lfm2VlProcessor's default)
# What llama.cpp's LFM2-VL path always does (its converter and libmtmd, as vendored by llama-cpp-python 0.3.36):
# LFM2-VL's default processor, whatever the exported one says.
LLAMA_CPP_PATCH = 16
LLAMA_CPP_SPLITTING = Lfm2VlSplitting()
LLAMA_CPP_TOKENS = (64, 256)  # the tokens of a view, after the 2 x 2 unshuffle


def add_lfm2_vl_tokens(
    tokenizer: PreTrainedTokenizerBase,
    language_model: PreTrainedModel | None = None,
    splitting: Lfm2VlSplitting | None = None,
) -> int:
    """Add LFM2-VL's ``<|image_start|>`` and ``<|image_end|>`` (with ``splitting`` its ``<|img_row_r_col_c|>`` tags
    and ``<|img_thumbnail|>``) and the ``<image>`` placeholder to ``tokenizer`` (an LFM2 tokenizer has them already),
    resize the LM's embeddings, and return the image token's id. Build the batches with ``VLMProcessor(...,
    image_start=IMAGE_START, image_end=IMAGE_END)``, or ``VLMProcessor(..., splitting=splitting)``."""
    tags = [] if splitting is None else splitting.row_col_tokens()
    tokenizer.add_tokens([IMAGE_START, IMAGE_END, *tags], special_tokens=True)
    return add_image_token(tokenizer, language_model, IMAGE_TOKEN)


def llama_cpp_differences(model: VisionLanguageModel) -> list[str]:
    """What llama.cpp's LFM2-VL path would do differently from transformers with this model's export, one sentence
    each; empty when it takes the model as LFM2-VL's own (tested against llama.cpp's own code: tests/test_gguf.py).

    llama.cpp does not read the processor's settings: it sizes every view within 64 to 256 tokens, splits images over
    twice that into 512 px tiles (2 to 10) and a thumbnail, resizes bilinearly, divides by 255 and normalises; its
    converter reads 16 px patches and leaves only the language model's own weights out of the projector file. Some
    images it prepares otherwise whatever the model (docs/vlm.md: llama.cpp): it fits an image into its tile grid with
    padding where transformers stretches it, and rounds a size halfway between two grid steps up where transformers
    rounds it to the even one."""
    differences = []
    tower, processor = model.tower.config, model.tower.processor_config
    if tower.patch_size != LLAMA_CPP_PATCH:
        differences.append(
            f"the tower cuts {tower.patch_size} px patches, and llama.cpp's converter reads LFM2-VL's "
            f"{LLAMA_CPP_PATCH} px ones: it cannot convert the tower"
        )
    if model.splitting is None:
        differences.append(
            "the model sees each image as one view, and llama.cpp splits large ones into tiles and a thumbnail: build "
            "it with Lfm2VlSplitting() (docs/vlm.md: LFM2-VL image splitting)"
        )
    elif model.splitting != LLAMA_CPP_SPLITTING:
        differences.append(
            f"the model splits with {model.splitting}, and llama.cpp with LFM2-VL's defaults, {LLAMA_CPP_SPLITTING}: "
            f"it cuts other tiles"
        )
    tokens = processor.grid_multiple**2
    budget = (processor.min_num_patches // tokens, processor.max_num_patches // tokens)
    if budget != LLAMA_CPP_TOKENS or processor.grid_multiple != 2:
        differences.append(
            f"the tower's processor sizes views within {budget[0]} to {budget[1]} tokens of {processor.grid_multiple}"
            f" x {processor.grid_multiple} patches, and llama.cpp within {LLAMA_CPP_TOKENS[0]} to "
            f"{LLAMA_CPP_TOKENS[1]} of 2 x 2: its views have other sizes"
        )
    if processor.resample != "bilinear":
        differences.append(
            f"the tower's processor resizes with {processor.resample!r}, and llama.cpp always bilinearly: its views "
            f"get other pixels"
        )
    differences += llama_cpp_pixel_values(processor)
    if not getattr(model.language_model.config, "tie_word_embeddings", False):
        differences.append(
            "the language model has an output layer of its own (its embeddings are not tied), which llama.cpp's "
            "converter cannot leave out of the projector file: --mmproj stops at 'lm_head.weight' (LFM2-VL's "
            "language models tie theirs)"
        )
    return differences


def _check_exportable(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    action = "cannot export to LFM2-VL's format"
    model.check_exportable(action, tiling=False, splitting=Lfm2VlSplitting)
    tower, projector = model.tower, model.projector
    if not tower.config.naflex:
        raise ValueError(
            f"{action}: LFM2-VL's tower is NaFlex and this one is fixed-resolution; export it with export_llava or "
            f"export_idefics3"
        )
    if not isinstance(projector, PixelShuffleProjector):
        raise ValueError(
            f"{action}: LFM2-VL's projector is pixel unshuffle then linear, GELU, linear; a "
            f"{projector.config.kind!r} projector cannot be written as it"
        )
    config = projector.config
    if config.depth != 2 or config.layers != (None,):
        raise ValueError(
            f"{action}: LFM2-VL's projector is two linear layers on the final tokens; this one has depth="
            f"{config.depth}, layers={config.layers} (build it with depth=2, layers=(None,), e.g. "
            f"get_recipe('lfm2_vl').projector_config(...))"
        )
    processing = tower.processor_config
    if processing.naflex_resize != "smart" or processing.grid_multiple != config.factor:
        raise ValueError(
            f"{action}: LFM2-VL's processor sizes images by its smart_resize rule, with grids in multiples of the "
            f"unshuffle factor ({config.factor}); this tower's processor has naflex_resize="
            f"{processing.naflex_resize!r}, grid_multiple={processing.grid_multiple}: give the tower "
            f"processor_config.replace(naflex_resize='smart', min_num_patches=..., grid_multiple={config.factor}) "
            f"and train with it"
        )
    if tokenizer is not None:
        tags = [] if model.splitting is None else model.splitting.row_col_tokens()
        image_token = check_tokenizer(
            tokenizer, model.language_model, model.image_token_id, (IMAGE_START, IMAGE_END, *tags)
        )
        if image_token != IMAGE_TOKEN:
            raise ValueError(
                f"{action}: the model's image token is {image_token!r}, but LFM2-VL's processor writes "
                f"{IMAGE_TOKEN!r}; build the model with add_lfm2_vl_tokens(tokenizer, language_model, splitting)"
            )


def _image_processor(tower: SigLIP2Encoder, splitting: Lfm2VlSplitting | None) -> Lfm2VlImageProcessor:
    """LFM2-VL's image processor doing what ours does: the tower's sizing rule, and the splitting (or none)."""
    settings = processor_config_to_hf(tower.processor_config)
    if splitting is not None:
        settings.update(
            do_image_splitting=True,
            tile_size=splitting.tile,
            min_tiles=splitting.min_tiles,
            max_tiles=splitting.max_tiles,
            use_thumbnail=splitting.use_thumbnail,
            max_pixels_tolerance=splitting.max_pixels_tolerance,
        )
    return Lfm2VlImageProcessor.from_dict(settings)


def export_lfm2_vl(
    model: VisionLanguageModel,
    directory: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    chat_template: str | None = None,
) -> None:
    """Write ``model`` as a transformers LFM2-VL checkpoint that ``AutoProcessor`` + ``apply_chat_template`` +
    ``generate`` run as they are: the model's files as transformers writes them, ``preprocessor_config.json`` and,
    given the tokenizer, the ``Lfm2VlProcessor``'s files.

    Args:
        model: a NaFlex VLM with LFM2-VL's projector and processor (see the module's docstring; LoRA merged).
        directory: the folder to write.
        tokenizer: the tokenizer the model was built with, holding LFM2-VL's tokens (:func:`add_lfm2_vl_tokens`).
        chat_template: the processor's Jinja chat template; default
            :func:`~siglip2_encoder.integrations.hf_export.plain_chat_template` (``<image> what colour is it ?``).

    Raises ``ValueError`` naming the reason for configurations LFM2-VL cannot express and for a tokenizer that does
    not fit the model."""
    _check_exportable(model, tokenizer)
    for difference in llama_cpp_differences(model):
        logger.warning("llama.cpp would run this export otherwise than transformers: %s", difference)
    tower, projector, lm = model.tower, model.projector, model.language_model
    first, second = (m for m in projector.proj if isinstance(m, nn.Linear))
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    text = text_config(lm)
    if text.get("model_type") == "lfm2":
        # vLLM (0.32) sizes LFM2's convolutions and MLPs from conv_dim and block_dim, which the Hub's LFM2 configs
        # carry and transformers 5 does not write: both are the hidden size (the weights have that width).
        for name in ("conv_dim", "block_dim"):
            text.setdefault(name, text["hidden_size"])
    # LFM2-VL reads the final tokens: its towers have no pooling head (vLLM's refuses head weights); none is written.
    vision = config_to_hf(tower.config.replace(use_head=False))
    config = Lfm2VlConfig(
        vision_config={k: v for k, v in vision.items() if k != "architectures"},
        text_config=text,
        image_token_id=model.image_token_id,
        projector_hidden_act="gelu",
        projector_hidden_size=first.out_features,
        projector_bias=projector.config.bias,
        projector_use_layernorm=projector.config.norm,
        downsample_factor=projector.config.factor,
        tie_word_embeddings=tied,
    )
    state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items() if not k.startswith("head.")}
    parts = {"linear_1": first, "linear_2": second} | ({} if projector.norm is None else {"layer_norm": projector.norm})
    for name, module in parts.items():
        state |= {f"model.multi_modal_projector.{name}.{k}": v for k, v in module.state_dict().items()}
    state |= language_model_weights(lm, "model.language_model.", tied)
    write_export(
        directory,
        Lfm2VlForConditionalGeneration,
        config,
        state,
        _image_processor(tower, model.splitting),
        Lfm2VlProcessor,
        tokenizer,
        chat_template=chat_template or (plain_chat_template(IMAGE_TOKEN) if tokenizer is not None else None),
    )


def import_lfm2_vl(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> VisionLanguageModel:
    """Load a transformers LFM2-VL checkpoint (``model_type="lfm2_vl"``; a folder or a Hub repo) whole into a
    :class:`VisionLanguageModel`: the NaFlex tower with LFM2-VL's sizing rule, the projector as a ``pixel_shuffle``
    one (depth 2; its LayerNorm as ``norm``), the language model, the image token, and the splitting its processor
    does (``do_image_splitting``: :attr:`VisionLanguageModel.splitting`, an :class:`~.lfm2_splitting.Lfm2VlSplitting`).
    Build its batches with ``VLMProcessor.for_model(model, tokenizer)`` (without splitting, with
    ``image_start=IMAGE_START, image_end=IMAGE_END`` too)."""
    directory, model_type = checkpoint_folder(name_or_path, revision, token, local_files_only)
    if model_type != "lfm2_vl":
        raise ValueError(f"{directory} is a {model_type!r} checkpoint, not 'lfm2_vl'")
    lfm2 = Lfm2VlForConditionalGeneration.from_pretrained(directory, dtype=dtype or torch.float32)
    config = lfm2.config
    if config.projector_hidden_act != "gelu":
        raise ValueError(
            f"{directory}'s projector uses projector_hidden_act={config.projector_hidden_act!r}; the pixel_shuffle "
            f"projector's MLP uses exact GELU ('gelu') only"
        )
    # Either way the processor is reproduced (its splitting, or its one view): no "not reproduced" warning.
    stored = read_checkpoint(CheckpointSource(directory), dtype=lfm2.dtype, views=True)
    if stored.processor_config.naflex_resize != "smart":
        raise ValueError(
            f"{directory} has no LFM2-VL image processor file (preprocessor_config.json or processor_config.json), "
            f"whose sizing rule the model was trained with"
        )
    images = Lfm2VlImageProcessor.from_pretrained(directory)
    splitting = None
    # transformers splits when do_image_splitting is set, unless min_tiles == max_tiles == 1
    if images.do_image_splitting and not images.min_tiles == images.max_tiles == 1:
        try:
            splitting = Lfm2VlSplitting(
                images.tile_size, images.min_tiles, images.max_tiles, images.use_thumbnail, images.max_pixels_tolerance
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{directory}'s image processor: {err}") from None
    tower = build_loaded(lambda: SigLIP2Encoder(stored.config, stored.processor_config), stored.state_dict,
                         str(directory), "vision tower")  # fmt: skip
    theirs = lfm2.model.multi_modal_projector
    projector = build_projector(PixelShuffleConfig(
        in_features=tower.config.hidden_size, out_features=config.text_config.hidden_size, layers=(None,),
        factor=config.downsample_factor, depth=2, hidden_features=config.projector_hidden_size,
        bias=config.projector_bias, norm=config.projector_use_layernorm,
    )).to(lfm2.dtype)  # fmt: skip
    first, second = (m for m in projector.proj if isinstance(m, nn.Linear))
    first.load_state_dict(theirs.linear_1.state_dict())
    second.load_state_dict(theirs.linear_2.state_dict())
    if projector.norm is not None:
        projector.norm.load_state_dict(theirs.layer_norm.state_dict())
    lm = language_model_from(lfm2, lfm2.model.language_model, config.text_config)
    return VisionLanguageModel(tower, projector, lm, config.image_token_id, splitting=splitting)
