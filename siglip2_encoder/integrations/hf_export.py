"""What every export of a :class:`~siglip2_encoder.integrations.llava.VisionLanguageModel` to a transformers VLM
format shares: the language model's weights under the VLM's prefix, the checks that the tokenizer fits the model, a
chat template, and the folder, written by transformers itself so that it holds every file and field transformers'
``save_pretrained`` writes (``architectures``, ``generation_config.json``, ``processor_config.json``, the chat
template): the programs that read such folders (transformers' Auto classes, vLLM, llama.cpp's converter) find what
they look for."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Siglip2VisionModel,
    SiglipVisionModel,
)
from transformers.image_processing_utils import BaseImageProcessor

from ..checkpoints.hub import CheckpointSource
from ..config import ProcessorConfig

__all__ = [
    "check_tokenizer",
    "checkpoint_folder",
    "language_model_from",
    "language_model_weights",
    "llama_cpp_pixel_values",
    "plain_chat_template",
    "text_config",
    "write_export",
]

logger = logging.getLogger(__name__)

_SIGLIP_VISION_MODELS = (SiglipVisionModel, Siglip2VisionModel)


def language_model_weights(lm: PreTrainedModel, prefix: str, tied: bool) -> dict[str, torch.Tensor]:
    """A causal LM's weights as a VLM holds them: its base model under ``prefix`` (e.g. ``model.language_model.``),
    ``lm_head.weight`` unless tied to the input embeddings."""
    base = f"{lm.base_model_prefix}."
    state: dict[str, torch.Tensor] = {}
    for key, value in lm.state_dict().items():
        if key.startswith(base):
            state[prefix + key[len(base) :]] = value
        elif key == "lm_head.weight":
            if not tied:
                state[key] = value
        else:
            raise ValueError(f"unexpected language model weight {key!r}: only '<{base}...>' and lm_head are mapped")
    return state


def language_model_from(vlm: PreTrainedModel, base: nn.Module, text: PretrainedConfig) -> PreTrainedModel:
    """The causal LM a transformers VLM holds, as a model of its own: built from the VLM's ``text_config``, holding
    ``base`` (the VLM's language model without its head) and the VLM's ``lm_head``, strictly; in the VLM's dtype."""
    lm = AutoModelForCausalLM.from_config(text, dtype=vlm.dtype)
    state = {f"{lm.base_model_prefix}.{k}": v for k, v in base.state_dict().items()}
    state["lm_head.weight"] = vlm.lm_head.weight
    lm.load_state_dict(state, strict=True)
    return lm.eval()


def checkpoint_folder(
    name_or_path: str | os.PathLike, revision: str | None, token: str | bool | None, local_files_only: bool
) -> tuple[Path, str | None]:
    """A VLM checkpoint's local folder (downloaded first when it is a Hub repo) and its ``config.json``'s
    ``model_type`` (None without one)."""
    source = CheckpointSource(name_or_path, revision=revision, token=token, local_files_only=local_files_only)
    directory = Path(source.snapshot() if not source.is_local else name_or_path)
    return directory, (source.read_json("config.json") or {}).get("model_type")


def text_config(lm: PreTrainedModel) -> dict:
    """The LM's config as a VLM's ``text_config``, naming the LM's class in ``architectures`` as real VLM repos do:
    llama.cpp's converter picks the text model's class from it (without it, from the VLM's top-level class, which
    it knows for vision only)."""
    return lm.config.to_dict() | {"architectures": [type(lm).__name__]}


def check_tokenizer(
    tokenizer: PreTrainedTokenizerBase, lm: PreTrainedModel, image_token_id: int, required: tuple[str, ...] = ()
) -> str:
    """The image token's string, after checking that ``tokenizer`` is the model's: the image token is one token
    of it with the model's id, every ``required`` token exists, and every id fits the LM's embedding table."""
    rows = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the language model's embedding table has {rows} rows; "
            f"resize it with language_model.resize_token_embeddings(len(tokenizer)) and train the new rows"
        )
    image_token = tokenizer.convert_ids_to_tokens(image_token_id) if image_token_id < len(tokenizer) else None
    if image_token is None or tokenizer.convert_tokens_to_ids(image_token) != image_token_id:
        raise ValueError(
            f"the model's image token id {image_token_id} is not a token of this tokenizer; pass the tokenizer the "
            f"model was built with (add_image_token gives the id)"
        )
    unk = tokenizer.unk_token_id
    missing = [t for t in required if tokenizer.convert_tokens_to_ids(t) in (None, unk)]
    if missing:
        raise ValueError(f"the tokenizer lacks {', '.join(missing)}, which this format's processor writes into prompts")
    return image_token


def llama_cpp_pixel_values(processor: ProcessorConfig) -> list[str]:
    """What llama.cpp's vision paths (libmtmd) compute otherwise from this processor's pixels: they always divide by
    255 and normalise with the exported mean and std."""
    if processor.do_rescale and processor.do_normalize and math.isclose(processor.rescale_factor, 1 / 255):
        return []
    return [
        f"the tower's processor has do_rescale={processor.do_rescale}, rescale_factor={processor.rescale_factor}, "
        f"do_normalize={processor.do_normalize}, and llama.cpp always divides pixels by 255 and normalises them with "
        f"the exported mean and std: its views get other values"
    ]


def plain_chat_template(image_token: str) -> str:
    """A Jinja chat template that renders a conversation the way :class:`VLMProcessor` prompts are written: the BOS
    token (if any), then every message's parts in order - ``image_token`` for an image, the text for a text - joined
    by single spaces, the EOS token after each assistant message. ``[{"role": "user", "content": [{"type": "image"},
    {"type": "text", "text": "what colour is it ?"}]}]`` renders as ``<s><image> what colour is it ?``."""
    return (
        "{{- bos_token or '' -}}"
        "{%- for message in messages -%}"
        "{%- if not loop.first %} {% endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if not loop.first %} {% endif -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{- {json.dumps(image_token)} -}}}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{- eos_token or '' -}}{%- endif -%}"
        "{%- endfor -%}"
    )


def _save_model(
    folder: Path, model_class: type[PreTrainedModel], config: PretrainedConfig, state: dict[str, torch.Tensor]
) -> None:
    """Build ``model_class`` without allocating (meta device), take ``state``'s tensors strictly, and let
    transformers write the model: config.json with ``architectures``, generation_config.json, the safetensors."""
    with torch.device("meta"):
        model = model_class(config)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)  # missing: checked below, after tying
    if unexpected:
        raise ValueError(f"{model_class.__name__} has no weights named {sorted(unexpected)}")
    model.tie_weights()  # a tied lm_head is not in ``state``: it takes the input embeddings' tensor
    untouched = sorted(name for name, p in model.named_parameters() if p.is_meta)
    if untouched:
        raise ValueError(f"the export gives no values for {model_class.__name__}'s weights {untouched}")
    model.eval().save_pretrained(folder, state_dict=_hub_layout(model))


def _hub_layout(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """``model``'s weights under the names the Hub's checkpoints use. transformers 5 holds a SigLIP vision model's
    weights without its ``vision_model.`` level and saves them so (``vision_tower.embeddings...``); it reads both, but
    vLLM (0.32) reads only the Hub's ``vision_tower.vision_model.embeddings...`` and refuses the other."""
    towers = [f"{name}." for name, module in model.named_modules() if isinstance(module, _SIGLIP_VISION_MODELS)]
    state = {}
    for key, value in model.state_dict().items():
        tower = next((t for t in towers if key.startswith(t)), None)
        state[key if tower is None else f"{tower}vision_model.{key[len(tower) :]}"] = value
    return state


def write_export(
    directory: str | os.PathLike,
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    state: dict[str, torch.Tensor],
    image_processor: BaseImageProcessor,
    processor_class: type[ProcessorMixin],
    tokenizer: PreTrainedTokenizerBase | None,
    **processor_options,
) -> None:
    """The model (see :func:`_save_model`), ``preprocessor_config.json`` (what transformers 4 and llama.cpp's
    converter read) and, given the tokenizer, ``processor_class``'s files: the tokenizer, ``processor_config.json``
    (the image processor nested in it, as transformers 5 writes it) and ``chat_template.jinja``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    _save_model(folder, model_class, config, state)
    image_processor.save_pretrained(folder)
    if tokenizer is None:
        logger.warning(
            "no tokenizer given: %s holds the model and its image processor, but AutoProcessor needs the tokenizer "
            "too; pass tokenizer= to write it with the processor and its chat template",
            folder,
        )
        return
    # A copy: some processors add their special tokens to the tokenizer they are given.
    processor_class(image_processor, copy.deepcopy(tokenizer), **processor_options).save_pretrained(folder)
