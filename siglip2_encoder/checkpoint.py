"""Checkpoint conversion and I/O: transformers' SigLIP / SigLIP 2 folders and Hub repos, in and out.

* :func:`config_from_hf` / :func:`config_to_hf`: ``config.json`` <-> :class:`~siglip2_encoder.EncoderConfig`.
* :func:`convert_hf_state_dict`: a transformers state dict (image-text or vision-only, with or without the
  ``vision_model.`` prefix) -> this tower's state dict. The text tower is dropped by name, explicitly.
* :func:`load_pretrained` / :func:`save_pretrained`: strict loading (missing or unexpected weights raise, listing
  their names) and writing folders that transformers loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import EncoderConfig

if TYPE_CHECKING:
    from .model import SigLIP2Encoder

__all__ = [
    "CheckpointError",
    "HubUnreachableError",
    "config_from_hf",
    "config_to_hf",
    "convert_hf_state_dict",
    "convert_timm_state_dict",
    "load_pretrained",
    "save_pretrained",
    "to_timm_state_dict",
]

logger = logging.getLogger(__name__)

_IMAGE_TEXT_TYPES = {"siglip": False, "siglip2": True}  # model_type -> NaFlex vision tower
_VISION_TYPES = {"siglip_vision_model": False, "siglip2_vision_model": True}
_VISION_PREFIX = "vision_model."
# Weights of an image-text checkpoint that are not the vision tower; skipped by name, never silently.
_NON_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias")
# Non-persistent buffers that older transformers versions wrote into checkpoints.
_IGNORED_BUFFERS = ("embeddings.position_ids",)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the tower; the message says which file or weights."""


class HubUnreachableError(CheckpointError):
    """The Hub could not be reached (or offline mode is on) and the file is not in the local cache."""

    def __init__(self, repo_id: str, reason: str) -> None:
        self.repo_id, self.reason = repo_id, reason
        super().__init__(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({reason}). Without Hub access, download the "
            f"checkpoint elsewhere and pass its local folder, e.g. "
            f"SigLIP2Encoder.from_pretrained('/path/to/{repo_id.split('/')[-1]}'); for an architecture with random "
            f"weights, use SigLIP2Encoder.from_preset(name)"
        )


# ----------------------------------------------------------------------------------------------------- configs


def config_from_hf(hf_config: dict[str, Any]) -> EncoderConfig:
    """The vision tower's config from a transformers ``config.json`` (image-text or vision-only).

    Fields missing from the file take transformers' defaults, as transformers itself does.
    """
    model_type = hf_config.get("model_type")
    if model_type in _IMAGE_TEXT_TYPES:
        vision = hf_config.get("vision_config") or {}
        naflex = _IMAGE_TEXT_TYPES[model_type]
    elif model_type in _VISION_TYPES:
        vision = hf_config
        naflex = _VISION_TYPES[model_type]
    else:
        raise CheckpointError(
            f"config.json has model_type={model_type!r}; expected one of "
            f"{sorted([*_IMAGE_TEXT_TYPES, *_VISION_TYPES])} (a SigLIP or SigLIP 2 checkpoint)"
        )
    patch = vision.get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise CheckpointError(f"only square patches are supported, got patch_size={patch}")
        patch = patch[0]
    fields = dict(
        hidden_size=vision.get("hidden_size", 768),
        intermediate_size=vision.get("intermediate_size", 3072),
        num_hidden_layers=vision.get("num_hidden_layers", 12),
        num_attention_heads=vision.get("num_attention_heads", 12),
        num_channels=vision.get("num_channels", 3),
        patch_size=patch,
        hidden_act=vision.get("hidden_act", "gelu_pytorch_tanh"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        attention_dropout=float(vision.get("attention_dropout", 0.0)),
        use_head=vision.get("vision_use_head", True) is not False,
    )
    if naflex:
        return EncoderConfig(image_size=None, num_patches=vision.get("num_patches", 256), **fields)
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"only square native resolutions are supported, got image_size={size}")
        size = size[0]
    return EncoderConfig(image_size=size, **fields)


def config_to_hf(config: EncoderConfig) -> dict[str, Any]:
    """A vision-only transformers ``config.json`` (``SiglipVisionModel`` or ``Siglip2VisionModel``)."""
    out: dict[str, Any] = {
        "architectures": ["Siglip2VisionModel" if config.naflex else "SiglipVisionModel"],
        "model_type": "siglip2_vision_model" if config.naflex else "siglip_vision_model",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_channels": config.num_channels,
        "patch_size": config.patch_size,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "attention_dropout": config.attention_dropout,
        "vision_use_head": config.use_head,
    }
    out["num_patches" if config.naflex else "image_size"] = config.num_patches or config.image_size
    return out


# ----------------------------------------------------------------------------------------------------- weights


def _vision_key(key: str) -> str | None:
    """The tower's name for a checkpoint key, or None for a weight that is known not to belong to it."""
    if key.startswith(_NON_VISION_PREFIXES):
        return None
    key = key.removeprefix(_VISION_PREFIX)
    return None if key in _IGNORED_BUFFERS else key


def convert_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SigLIP / SigLIP 2 weights -> this tower's names (the same names, minus prefix and text tower)."""
    out = {}
    for key, value in state_dict.items():
        name = _vision_key(key)
        if name is not None:
            out[name] = value
    return out


# Prefixes that differ only by name between timm's SigLIP VisionTransformer (global_pool="map") and this tower;
# "{}" stands for a layer number.
_TIMM_NAMES = [
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{}.norm1.", "encoder.layers.{}.layer_norm1."),
    ("blocks.{}.norm2.", "encoder.layers.{}.layer_norm2."),
    ("blocks.{}.attn.proj.", "encoder.layers.{}.self_attn.out_proj."),
    ("blocks.{}.mlp.", "encoder.layers.{}.mlp."),
    ("norm.", "post_layernorm."),
    ("attn_pool.proj.", "head.attention.out_proj."),
    ("attn_pool.norm.", "head.layernorm."),
    ("attn_pool.mlp.", "head.mlp."),
]


def _rename(key: str, source: int) -> str | None:
    """``key`` renamed by :data:`_TIMM_NAMES`, reading pairs from side ``source`` (0 = timm, 1 = ours)."""
    for pair in _TIMM_NAMES:
        pattern = re.escape(pair[source]).replace(r"\{\}", r"(\d+)")
        if m := re.match(pattern, key):
            return pair[1 - source].format(*m.groups()) + key[m.end() :]
    return None


def convert_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm SigLIP ViT weights (``vit_*_siglip_*``: no class token, ``global_pool="map"``) -> this tower's names.

    timm fuses q, k, v (``attn.qkv``) and, in the pooling head, k and v (``attn_pool.kv``); they are split or
    joined here. Unknown keys are passed through, so strict loading names them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            out["embeddings.position_embedding.weight"] = value[0]
        elif key == "attn_pool.latent":
            out["head.probe"] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
        elif m := re.fullmatch(r"attn_pool\.q\.(weight|bias)", key):
            out[f"head.attention.in_proj_{m[1]}"] = torch.cat([value, state_dict[f"attn_pool.kv.{m[1]}"]])
        elif not re.fullmatch(r"attn_pool\.kv\.(weight|bias)", key):
            out[_rename(key, 0) or key] = value
    return out


def to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This tower's weights -> timm's SigLIP ViT names (the inverse of :func:`convert_timm_state_dict`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif key == "head.probe":
            out["attn_pool.latent"] = value
        elif m := re.fullmatch(r"head\.attention\.in_proj_(weight|bias)", key):
            out[f"attn_pool.q.{m[1]}"], out[f"attn_pool.kv.{m[1]}"] = value.split(
                [len(value) // 3, 2 * len(value) // 3]
            )
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            parts = [state_dict[f"encoder.layers.{m[1]}.self_attn.{n}_proj.{m[2]}"] for n in "qkv"]
            out[f"blocks.{m[1]}.attn.qkv.{m[2]}"] = torch.cat(parts)
        elif not re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)", key):
            name = _rename(key, 1)
            if name is None:
                raise ValueError(f"no timm name for weight {key!r}")
            out[name] = value
    return out


def _check_keys(expected: Iterable[str], found: Iterable[str], source: str) -> None:
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = [
            f"missing: {show(missing)}" if missing else "",
            f"unexpected: {show(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(
            f"the weights in {source} do not match the vision tower its config.json describes "
            f"({'; '.join(p for p in parts if p)}). Is this a SigLIP / SigLIP 2 checkpoint, and is config.json its own?"
        )


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(tower key, tensor) for the vision weights in safetensors or torch pickles; other tensors are not read."""
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = _vision_key(key)
                    if name is not None:
                        yield name, f.get_tensor(key)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # a pickle with code objects, or a corrupt file: say which file
                raise CheckpointError(f"cannot read {file} with torch.load(weights_only=True): {err}") from err
            yield from convert_hf_state_dict(state).items()


def _shard_names(index_file: Path) -> list[str]:
    """The shard files of a sharded checkpoint that hold vision weights."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{index_file} is not a valid checkpoint index (needs a 'weight_map'): {err}") from err
    return sorted({file for key, file in weight_map.items() if _vision_key(key)})


# ----------------------------------------------------------------------------------------------------- resolving


class _Source:
    """A local folder or a Hub repo, fetching files on demand."""

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        token: str | bool | None,
        local_files_only: bool,
    ) -> None:
        self.path = Path(name_or_path).expanduser()
        self.is_local = self.path.is_dir()
        if not self.is_local and (self.path.exists() or str(name_or_path).startswith((".", "/", "~"))):
            raise CheckpointError(
                f"{str(name_or_path)!r} is not a folder; pass the folder that holds config.json and the weights"
            )
        self.repo_id = str(name_or_path)
        self.kwargs = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)

    def __str__(self) -> str:
        return str(self.path) if self.is_local else f"Hub repo {self.repo_id!r}"

    def get(self, filename: str) -> Path | None:
        """The local path of ``filename``, or None if the folder / repo has no such file."""
        if self.is_local:
            file = self.path / filename
            return file if file.is_file() else None
        return _hub_download(self.repo_id, filename, **self.kwargs)


def _hub_download(repo_id: str, filename: str, **kwargs: Any) -> Path | None:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # The cache first: no network at all when the file is there.
        return Path(hf_hub_download(repo_id, filename, **{**kwargs, "local_files_only": True}))
    except LocalEntryNotFoundError:
        if kwargs["local_files_only"] or constants.HF_HUB_OFFLINE:
            raise HubUnreachableError(repo_id, f"{filename} is not in the local cache and offline mode is on") from None
    except HFValidationError as err:
        raise CheckpointError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id: {err}") from None
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        # huggingface_hub retries unreachable hosts for ~20 s; an unresolvable one fails here at once instead.
        socket.getaddrinfo(host, 443)
    except OSError as err:
        raise HubUnreachableError(repo_id, f"cannot resolve {host}: {err}") from None
    try:
        return Path(hf_hub_download(repo_id, filename, **kwargs))
    except LocalEntryNotFoundError as err:  # a subclass of EntryNotFoundError: the network, not the file
        raise HubUnreachableError(repo_id, str(err).splitlines()[0]) from None
    except EntryNotFoundError:
        return None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise CheckpointError(
            f"cannot access {repo_id!r} (revision {kwargs['revision'] or 'main'}) on the Hub: "
            f"{str(err).splitlines()[0]}. Check the id and revision; for gated or private repos log in or pass token="
        ) from None


def _read_json(source: _Source, filename: str) -> dict[str, Any] | None:
    file = source.get(filename)
    if file is None:
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as err:
        raise CheckpointError(f"{filename} of {source} is not valid JSON: {err}") from err


def _read_tower_config(source: _Source) -> EncoderConfig:
    hf_config = _read_json(source, "config.json")
    if hf_config is None:
        raise CheckpointError(f"{source} has no config.json; is it a transformers SigLIP checkpoint?")
    return config_from_hf(hf_config)


def load_pretrained(
    cls: type[SigLIP2Encoder],
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> SigLIP2Encoder:
    """See :meth:`SigLIP2Encoder.from_pretrained`. ``dtype=None`` keeps the stored dtype; the model is in eval()."""
    from .processor import ProcessorConfig

    source = _Source(
        name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    config = _read_tower_config(source)

    found = next(((name, path) for name in _WEIGHT_FILES if (path := source.get(name)) is not None), None)
    if found is None:
        raise CheckpointError(f"{source} has none of the weight files {', '.join(_WEIGHT_FILES)}")
    name, path = found
    files = [path]
    if name.endswith(".index.json"):
        files = [source.get(shard) for shard in _shard_names(path)]
        if None in files:
            raise CheckpointError(f"{source}: {name} lists shards that do not exist")

    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _read_tensors(files):
        if key in expected and tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"weight {key} in {source} has shape {tuple(tensor.shape)}, but config.json implies "
                f"{tuple(expected[key].shape)}"
            )
        state[key] = tensor.to(dtype) if dtype is not None else tensor
    _check_keys(expected, state, str(source))
    model.load_state_dict(state, strict=True, assign=True)
    processor_config = _read_json(source, "preprocessor_config.json")
    model.processor_config = (
        ProcessorConfig.from_hf(processor_config, patch_size=config.patch_size)
        if processor_config is not None
        else ProcessorConfig.default_for(config)
    )
    if processor_config is None:
        logger.warning(
            "%s has no preprocessor_config.json; using the SigLIP 2 defaults %s", source, model.processor_config
        )
    return model.to(device=device).eval() if device is not None else model.eval()


def save_pretrained(model: SigLIP2Encoder, save_directory: str | os.PathLike) -> None:
    """See :meth:`SigLIP2Encoder.save_pretrained`. Keys are written with transformers' ``vision_model.`` prefix,
    the layout of Google's Hub checkpoints, which every transformers version loads."""
    wrapped = [k for k in model.state_dict() if ".base_layer." in k or ".lora_" in k]
    if wrapped:
        raise ValueError(
            f"the tower holds LoRA layers ({wrapped[0]}, ...): save the adapter with the PeftModel's save_pretrained, "
            f"and the base before add_lora, or merge first with merge_and_unload()"
        )
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model.config) | {"dtype": str(model.dtype).removeprefix("torch.")}
    state = {_VISION_PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _write_atomic(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _write_atomic(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2) + "\n"))
    processor = json.dumps(model.processor_config.to_hf(), indent=2) + "\n"
    _write_atomic(folder / "preprocessor_config.json", lambda tmp: Path(tmp).write_text(processor))


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)
