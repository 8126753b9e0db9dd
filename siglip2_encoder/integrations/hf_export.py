"""What every export of a :class:`~siglip2_encoder.integrations.llava.VisionLanguageModel` to a transformers VLM
format shares: the language model's weights under the VLM's prefix, and the folder written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..config import ProcessorConfig
from ..convert import processor_config_to_hf
from ..files import write_atomic

__all__ = ["language_model_weights", "write_export"]


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


def write_export(
    directory: str | os.PathLike,
    config: PretrainedConfig,
    state: dict[str, torch.Tensor],
    processor_config: ProcessorConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """config.json, the (sharded) safetensors, preprocessor_config.json, and the tokenizer if given."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_torch_state_dict({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder)
    processor = processor_config_to_hf(processor_config)
    write_atomic(folder / "preprocessor_config.json", (json.dumps(processor, indent=2) + "\n").encode())
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
