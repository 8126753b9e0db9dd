"""Whole checkpoints in and out: a :class:`~.hub.CheckpointSource` (a folder or Hub repo) -> :class:`Checkpoint` (a
vision tower: config, weights under the tower's names, preprocessing) or :class:`ModelCheckpoint` (an image-text
model), reading only the weight files (and shards) that hold what is asked for; and the folders transformers'
``SiglipVisionModel`` / ``Siglip2VisionModel`` / ``SiglipModel`` / ``Siglip2Model`` load, written atomically."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import EncoderConfig, ProcessorConfig, TextConfig
from ..files import write_atomic
from .hf_format import (
    VISION_PREFIX,
    KeyMap,
    config_from_hf,
    config_to_hf,
    model_key,
    processor_config_from_hf,
    processor_config_to_hf,
    text_config_from_hf,
    text_config_to_hf,
    text_key,
    tower_keys,
)
from .hub import CheckpointError, CheckpointSource

__all__ = [
    "Checkpoint",
    "checkpoint_format",
    "ModelCheckpoint",
    "PROCESSOR_FILES",
    "WEIGHT_FILES",
    "read_checkpoint",
    "read_config",
    "read_model_checkpoint",
    "read_processor_config",
    "read_state_dict",
    "read_text_checkpoint",
    "read_text_config",
    "write_checkpoint",
    "write_model_checkpoint",
]

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# transformers 5 saves a processor's settings in processor_config.json under "image_processor"; older versions and
# image processors saved alone write preprocessor_config.json.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class ModelCheckpoint:
    """An image-text model as stored: both towers' architectures, every weight (transformers' names), preprocessing."""

    vision_config: EncoderConfig
    text_config: TextConfig
    state_dict: dict[str, torch.Tensor]
    processor_config: ProcessorConfig


@dataclass(frozen=True)
class Checkpoint:
    """A vision tower as stored: architecture, weights under the tower's names, and its preprocessing."""

    config: EncoderConfig
    state_dict: dict[str, torch.Tensor]
    processor_config: ProcessorConfig


def _missing_config(source: CheckpointSource) -> CheckpointError:
    """The error for a source without ``config.json``, naming open_clip's layout when it is that."""
    if source.get("open_clip_config.json") is not None:
        return CheckpointError(
            f"{source} is an open_clip checkpoint (open_clip_config.json, no config.json); build it with "
            f"open_clip.create_model_and_transforms and take its image tower with "
            f"siglip2_encoder.integrations.timm_models.from_open_clip(model)"
        )
    return source.missing("config.json; is it a transformers SigLIP checkpoint?")


def read_config(source: CheckpointSource) -> EncoderConfig:
    """The tower's config from the source's ``config.json``."""
    hf_config = source.read_json("config.json")
    if hf_config is None:
        raise _missing_config(source)
    try:
        return config_from_hf(hf_config)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"config.json of {source} is not a valid SigLIP config: {err}") from None


def read_processor_config(source: CheckpointSource, tower: EncoderConfig, views: bool = False) -> ProcessorConfig:
    """The checkpoint's preprocessing, from whichever layout transformers wrote; SigLIP 2's defaults for the tower
    (with a warning) only when the source has no processor file at all. ``views``: see
    :func:`~.hf_format.processor_config_from_hf`."""
    for filename in PROCESSOR_FILES:
        settings = source.read_json(filename)
        if settings is None:
            continue
        if filename == "processor_config.json":
            settings = settings.get("image_processor")
            if not isinstance(settings, dict):
                continue  # a processor file without image settings (e.g. a tokenizer-only processor)
        try:
            return processor_config_from_hf(settings, tower, views)
        except CheckpointError as err:
            raise CheckpointError(f"{filename} of {source}: {err}") from None
    default = ProcessorConfig.default_for(tower)
    logger.warning("%s has no %s; using the SigLIP 2 defaults %s", source, " or ".join(PROCESSOR_FILES), default)
    return default


def _shard_names(index_file: Path, select: KeyMap) -> list[str]:
    """The shard files of a sharded checkpoint that hold weights ``select`` keeps."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return sorted({file for key, file in weight_map.items() if select(key)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index_file} is not a valid checkpoint index (needs a 'weight_map'): {err}") from err


def _weight_files(source: CheckpointSource, select: KeyMap) -> list[Path]:
    """The files holding the weights ``select`` keeps: one file, or the shards of a sharded checkpoint holding them."""
    for name in WEIGHT_FILES:
        path = source.get(name)
        if path is None:
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = {shard: source.get(shard) for shard in _shard_names(path, select)}
        absent = [shard for shard, file in shards.items() if file is None]
        if absent:
            raise source.missing(f"shards {', '.join(absent)} listed in {name}")
        return list(shards.values())
    raise source.missing(f"weight file (none of {', '.join(WEIGHT_FILES)})")


def _read_tensors(files: list[Path], select: KeyMap) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for the weights ``select`` keeps, from safetensors or torch pickles; others are not read."""
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        if (name := select(key)) is not None:
                            yield name, f.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"cannot read {file} (truncated or not a safetensors file?): {err}") from None
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # a pickle with code objects, or a corrupt file: say which file
                raise CheckpointError(f"cannot read {file} with torch.load(weights_only=True): {err}") from err
            yield from ((name, value) for key, value in state.items() if (name := select(key)) is not None)


def read_checkpoint(source: CheckpointSource, *, dtype: torch.dtype | None = None, views: bool = False) -> Checkpoint:
    """Read a transformers SigLIP / SigLIP 2 checkpoint's vision tower, or the SigLIP tower of a VLM checkpoint
    (:data:`VLM_TYPES`: only the shards holding it are read); ``dtype=None`` keeps the stored dtype. ``views``: the
    caller reproduces the VLM processor's other views (see :func:`read_processor_config`)."""
    config = read_config(source)
    select = tower_keys(source.read_json("config.json").get("model_type"), config)
    processor = read_processor_config(source, config, views)
    return Checkpoint(config, read_state_dict(source, select, dtype), processor)


def read_text_config(source: CheckpointSource) -> TextConfig:
    """The text tower's config from the source's ``config.json`` (image-text or text-only)."""
    hf_config = source.read_json("config.json")
    if hf_config is None:
        raise _missing_config(source)
    try:
        return text_config_from_hf(hf_config)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"config.json of {source} is not a valid SigLIP text config: {err}") from None


def read_text_checkpoint(
    source: CheckpointSource, *, dtype: torch.dtype | None = None
) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """The text tower of an image-text or text-only checkpoint: its config and weights (the tower's names), reading
    only the shards that hold them."""
    return read_text_config(source), read_state_dict(source, text_key, dtype)


def read_model_checkpoint(source: CheckpointSource, *, dtype: torch.dtype | None = None) -> ModelCheckpoint:
    """Read a transformers ``siglip`` / ``siglip2`` image-text checkpoint: both towers, ``logit_scale`` and
    ``logit_bias``."""
    text = read_text_config(source)
    vision = read_config(source)
    state = read_state_dict(source, model_key, dtype)
    return ModelCheckpoint(vision, text, state, read_processor_config(source, vision))


def write_model_checkpoint(
    folder: str | os.PathLike,
    vision_config: EncoderConfig,
    text_config: TextConfig,
    state_dict: Mapping[str, torch.Tensor],
    processor_config: ProcessorConfig,
) -> None:
    """Write an image-text folder that transformers' ``SiglipModel`` / ``Siglip2Model`` loads (NaFlex towers make a
    SigLIP 2 checkpoint, fixed-resolution ones a SigLIP one: transformers' SigLIP 2 model is the NaFlex one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    siglip2 = vision_config.naflex
    vision = {k: v for k, v in config_to_hf(vision_config).items() if k != "architectures"}
    hf_config = {
        "architectures": ["Siglip2Model" if siglip2 else "SiglipModel"],
        "model_type": "siglip2" if siglip2 else "siglip",
        "vision_config": vision,
        "text_config": text_config_to_hf(text_config, siglip2),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomic(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_atomic(folder / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
    processor = processor_config_to_hf(processor_config)
    write_atomic(folder / "preprocessor_config.json", (json.dumps(processor, indent=2) + "\n").encode())


def read_state_dict(source: CheckpointSource, select: KeyMap, dtype: torch.dtype | None = None) -> dict:
    """The weights ``select`` keeps (renamed by it), opening only the files that hold them."""
    files = _weight_files(source, select)
    return {key: tensor.to(dtype) if dtype is not None else tensor for key, tensor in _read_tensors(files, select)}


def write_checkpoint(
    folder: str | os.PathLike,
    config: EncoderConfig,
    state_dict: Mapping[str, torch.Tensor],
    processor_config: ProcessorConfig,
) -> None:
    """Write config.json, model.safetensors and preprocessor_config.json, each atomically.

    Keys get transformers' ``vision_model.`` prefix, the layout of Google's Hub checkpoints, which every transformers
    version loads; a tower with bucketed positions is written as ``Idefics3VisionTransformer`` (with a head,
    ``Phi4MultimodalVisionModel``) saves itself, unprefixed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    hf_config = config_to_hf(config)
    if len(dtypes) == 1:
        hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    prefix = "" if config.position_lookup == "buckets" else VISION_PREFIX
    state = {prefix + k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomic(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_atomic(folder / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
    processor = processor_config_to_hf(processor_config)
    write_atomic(folder / "preprocessor_config.json", (json.dumps(processor, indent=2) + "\n").encode())


def checkpoint_format(source: str) -> str:
    """What a checkpoint path or id holds, judged without loading it: ``"big_vision"`` (an ``.npz`` file), ``"timm"``
    (a folder whose ``config.json`` names an ``architecture``, as timm's pretrained configs do, or timm's ``hf-hub:``
    scheme) or ``"hf"`` (anything else: a transformers folder or Hub id, whose reader then names what is wrong)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        return "big_vision"
    config = path / "config.json"
    if config.is_file():
        try:
            return "timm" if "architecture" in json.loads(config.read_text()) else "hf"
        except (ValueError, OSError):
            return "hf"  # the transformers reader names what is wrong with it
    return "timm" if source.startswith("hf-hub:") else "hf"
