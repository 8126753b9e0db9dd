"""What an extraction job computes and how it runs: :class:`ExtractSettings` (images) and :class:`TextEmbedSettings`
(texts), each split by field metadata into the job's identity (checked when a run resumes) and its run options
(device, batch size: free to change), and the :class:`ExtractSummary` a job returns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..config import check_positive_ints
from ..data.images import DEFAULT_MAX_PIXELS
from ..data.tokenizer import TEXT_PREPROCESSING
from ..export.quantize import QUANTIZATIONS
from .store import TEXT_INPUTS

__all__ = ["DTYPES", "ExtractSettings", "ExtractSummary", "TextEmbedSettings", "job_identity", "run_options"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# Marks the settings that say how a job runs, not what it computes: a resumed run may change them. Features are not
# bitwise invariant to them (batch 8 vs 1 differs by ~1e-6 in fp32 on CPU; GPU kernels likewise), so each shard
# records the ones it was written with (its safetensors metadata).
RUN_OPTION = {"run_option": True}


def job_identity(settings: ExtractSettings | TextEmbedSettings) -> dict[str, Any]:
    """The settings that identify a job's features (model, features, dtypes, preprocessing): what resuming checks."""
    return {f.name: getattr(settings, f.name) for f in fields(settings) if not f.metadata.get("run_option")}


def run_options(settings: ExtractSettings | TextEmbedSettings) -> dict[str, str]:
    """How the job runs (device, batch size), as text for a shard's metadata."""
    return {f.name: str(getattr(settings, f.name)) for f in fields(settings) if f.metadata.get("run_option")}


@dataclass(frozen=True)
class ExtractSettings:
    """What to extract and how: the fields marked ``RUN_OPTION`` (device, batch size) only say how the job runs and
    may change when it resumes; every other field identifies its features, and a resumed run must keep it."""

    model: str  # Hub id, local folder, or preset name with random_weights
    random_weights: bool = False
    pooled: bool = True  # the attention-pooled feature (B, D)
    last_hidden_state: bool = False  # final tokens after post-layernorm
    layers: tuple[int, ...] = ()  # hidden states, transformers' indexing (-2 = penultimate)
    save_dtype: str = "fp32"  # storage: fp32, fp16 or bf16
    dtype: str = "fp32"  # compute
    device: str = field(default="cpu", metadata=RUN_OPTION)
    batch_size: int = field(default=32, metadata=RUN_OPTION)
    max_num_patches: int | None = None  # NaFlex patch budget; None = the checkpoint's
    shard_size: int = 1024  # inputs per shard
    exif_transpose: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    video_fps: float | None = None  # videos: frames taken every 1 / video_fps seconds
    video_frames: int | None = None  # videos: this many frames, evenly spaced
    quantize: str | None = None  # torchao quantization of the encoder layers (one of QUANTIZATIONS); fp32 compute
    captions: bool = False  # each input's caption through the text tower too (``caption_pooled``; tar shards)
    # captions only: whether their tokenizer's padding mask is applied (``TextTokenizer.padding_mask``; False, as
    # SigLIP was trained, is what captions get when it is left None)
    caption_padding_mask: bool | None = None

    def __post_init__(self) -> None:
        check_positive_ints(self, "batch_size", "shard_size", "max_pixels")
        if self.video_fps is not None and self.video_frames is not None:
            raise ValueError(
                f"give at most one of video_fps and video_frames, got video_fps={self.video_fps}, "
                f"video_frames={self.video_frames}"
            )
        if self.video_fps is not None and not self.video_fps > 0:
            raise ValueError(f"video_fps must be > 0, got video_fps={self.video_fps!r}")
        if self.video_frames is not None:
            check_positive_ints(self, "video_frames")
        if self.quantize is not None:
            if self.quantize not in QUANTIZATIONS:
                raise ValueError(f"quantize must be one of {sorted(QUANTIZATIONS)}, got quantize={self.quantize!r}")
            if self.dtype != "fp32":
                raise ValueError(f"quantize runs the rest of the tower in fp32; got dtype={self.dtype!r} with it")
        if self.max_num_patches is not None:
            check_positive_ints(self, "max_num_patches")
        for name in ("save_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if not (self.pooled or self.last_hidden_state or self.layers):
            raise ValueError("nothing to extract: ask for pooled features, the final tokens, or some layers")
        if self.caption_padding_mask is not None and not self.captions:
            raise ValueError(
                f"caption_padding_mask={self.caption_padding_mask} is for captions; set captions=True or leave it None"
            )
        if self.captions and self.caption_padding_mask is None:
            object.__setattr__(self, "caption_padding_mask", False)
        object.__setattr__(self, "layers", tuple(self.layers))

    def token_features(self) -> list[tuple[str, int | None]]:
        """(stored name, layer) of every token feature: None = last_hidden_state, ints = hidden states."""
        last = [("last_hidden_state", None)] if self.last_hidden_state else []
        return last + [(f"hidden_state_{i}", i) for i in self.layers]

    @property
    def feature_names(self) -> list[str]:
        return (["pooled"] if self.pooled else []) + [name for name, _ in self.token_features()]


@dataclass(frozen=True)
class TextEmbedSettings:
    """What ``embed-text`` computes and how; as :class:`ExtractSettings`, a resumed run may change its run options."""

    model: str  # Hub id or local folder of an image-text (or text-only) checkpoint
    text_preprocessing: str  # as the tokenizer applied it: raw, lower (SigLIP 2's default) or canonical
    padding_mask: bool = False  # the tokenizer's padding mask applied (TextTokenizer.padding_mask); not as trained
    inputs: str = TEXT_INPUTS  # marks the folder as texts for its readers
    save_dtype: str = "fp32"
    dtype: str = "fp32"
    device: str = field(default="cpu", metadata=RUN_OPTION)
    batch_size: int = field(default=256, metadata=RUN_OPTION)
    shard_size: int = 65536  # texts per shard

    def __post_init__(self) -> None:
        check_positive_ints(self, "batch_size", "shard_size")
        for name in ("save_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.text_preprocessing not in TEXT_PREPROCESSING:
            raise ValueError(
                f"text_preprocessing must be one of {list(TEXT_PREPROCESSING)}, got {self.text_preprocessing!r}"
            )
        if self.inputs != TEXT_INPUTS:
            raise ValueError(f"inputs must be {TEXT_INPUTS!r}, got {self.inputs!r}")


@dataclass
class ExtractSummary:
    done: int = 0  # extracted in this run
    skipped: int = 0  # already in the output (resume)
    failed: int = 0  # recorded as failed in this run
    failed_before: int = 0  # recorded as failed by the earlier run a resumed run continues
    failed_elsewhere: int = 0  # rank 0 of a distributed run: recorded as failed by the other ranks
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    unit: str = "images"

    @property
    def per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed_total(self) -> int:
        """Inputs of the whole output folder that failed: this run's, the earlier run's it resumed, and (rank 0 of
        a distributed run) the other ranks'."""
        return self.failed + self.failed_before + self.failed_elsewhere

    def __str__(self) -> str:
        before = f" (+{self.failed_before} in the earlier run)" if self.failed_before else ""
        before += f" (+{self.failed_elsewhere} on other ranks)" if self.failed_elsewhere else ""
        return (
            f"done {self.done}, skipped {self.skipped}, failed {self.failed}{before}, {self.seconds:.1f} s, "
            f"{self.per_second:.2f} {self.unit}/s"
        )
