"""Feature extraction over many image files: resumable, crash-safe, never stopped by one bad file.

Inputs are split into blocks of ``shard_size``; each block becomes one committed shard (see :mod:`.store`). Images
are decoded and preprocessed in DataLoader workers while the model runs. A file that cannot be used is recorded in
the manifest with its reason and the run goes on.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .files import write_atomic
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image
from .model import SigLIP2Encoder
from .processor import ImageProcessor, ProcessedImage
from .store import RUN_FILE, ShardWriter, committed_rows, write_manifest

__all__ = ["ExtractSettings", "ExtractSummary", "discover_inputs", "extract_features"]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def discover_inputs(specs: Sequence[str], file_list: str | os.PathLike | None = None) -> list[str]:
    """Expand image files, folders (recursive, sorted, common image extensions), glob patterns and a text file of
    paths (one per line) into one list, in the order given, without duplicates.

    A path that does not exist is kept, so that the run records it as failed instead of dropping it unseen.
    """
    found: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
            found += sorted(str(p) for p in files)
        elif not path.exists() and glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                logger.warning("the pattern %r matches no file", spec)
            found += matches
        else:
            found.append(spec)
    if file_list is not None:
        lines = Path(file_list).read_text().splitlines()
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that determines the extracted numbers; a resumed run must use the same."""

    model: str  # Hub id, local folder, or preset name with random_weights
    random_weights: bool = False
    pooled: bool = True  # the attention-pooled feature (B, D)
    last_hidden_state: bool = False  # final tokens after post-layernorm
    layers: tuple[int, ...] = ()  # hidden states, transformers' indexing (-2 = penultimate)
    save_dtype: str = "fp32"  # storage: fp32, fp16 or bf16
    dtype: str = "fp32"  # compute
    device: str = "cpu"
    batch_size: int = 32
    max_num_patches: int | None = None  # NaFlex patch budget; None = the checkpoint's
    shard_size: int = 1024  # inputs per shard
    exif_transpose: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {name}={getattr(self, name)}")
        for name in ("save_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if not (self.pooled or self.last_hidden_state or self.layers):
            raise ValueError("nothing to extract: ask for pooled features, the final tokens, or some layers")
        object.__setattr__(self, "layers", tuple(self.layers))

    def token_features(self) -> list[tuple[str, int | None]]:
        """(stored name, layer) of every token feature: None = last_hidden_state, ints = hidden states."""
        last = [("last_hidden_state", None)] if self.last_hidden_state else []
        return last + [(f"hidden_state_{i}", i) for i in self.layers]

    @property
    def feature_names(self) -> list[str]:
        return (["pooled"] if self.pooled else []) + [name for name, _ in self.token_features()]


@dataclass
class ExtractSummary:
    done: int = 0  # extracted in this run
    skipped: int = 0  # already in the output (resume)
    failed: int = 0  # recorded as failed in this run
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"done {self.done}, skipped {self.skipped}, failed {self.failed}, {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s"
        )


class _Images(Dataset):
    """Decodes and preprocesses one file per item, in a worker; a failure becomes its reason."""

    def __init__(self, paths: list[str], processor: ImageProcessor, settings: ExtractSettings) -> None:
        self.paths, self.processor, self.settings = paths, processor, settings

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, ProcessedImage | str]:
        try:
            pixels = load_image(
                self.paths[index], exif_transpose=self.settings.exif_transpose, max_pixels=self.settings.max_pixels
            )
            return index, self.processor.process_one(pixels, max_num_patches=self.settings.max_num_patches)
        except (ValueError, TypeError, OSError) as err:  # load_image / process_one report bad inputs so
            return index, str(err)


def _batch_plan(num_items: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Index batches that never straddle a shard, so a resumed run batches every shard as an uninterrupted one."""
    batches = []
    for start in range(0, num_items, shard_size):
        stop = min(start + shard_size, num_items)
        batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    return batches


def _prepare_output(folder: Path, settings: ExtractSettings, *, resume: bool, overwrite: bool) -> list[dict]:
    """Create or check the output folder; returns the rows already committed (resume)."""
    record = json.dumps(asdict(settings), indent=2, sort_keys=True).encode()
    if folder.exists() and any(folder.iterdir()):
        if resume:
            if not (folder / RUN_FILE).is_file():
                raise ValueError(f"{folder} is not an extraction folder (no {RUN_FILE}); cannot resume into it")
            previous = json.loads((folder / RUN_FILE).read_text())
            changed = sorted(k for k, v in asdict(settings).items() if json.loads(json.dumps(v)) != previous.get(k))
            if changed:
                detail = ", ".join(f"{k}: {previous.get(k)!r} -> {getattr(settings, k)!r}" for k in changed)
                raise ValueError(f"--resume with other settings than the first run ({detail}); use the same options")
            return committed_rows(folder)
        if not overwrite:
            raise ValueError(
                f"{folder} already holds output; pass --resume to continue it or --overwrite to replace it"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / RUN_FILE, record)
    return []


def extract_features(
    paths: Sequence[str],
    output: str | os.PathLike,
    model: SigLIP2Encoder,
    processor: ImageProcessor,
    settings: ExtractSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool | None = None,
) -> ExtractSummary:
    """Extract features of ``paths`` into the folder ``output`` (layout in :mod:`siglip2_encoder.store`).

    Args:
        paths: image files, in the order their rows take in the manifest.
        model, processor: the encoder (moved to ``settings.device`` / ``settings.dtype`` here) and its processor.
        settings: what to extract and how.
        resume: continue an interrupted run in ``output``: committed shards are kept, nothing done is redone.
        overwrite: replace an existing ``output``; without it or ``resume`` an existing output is an error.
        num_workers: DataLoader workers decoding images while the model runs (0 = in this process).
        progress: show a progress bar; None = only when stderr is a terminal.
    """
    folder = Path(output)
    done_rows = _prepare_output(folder, settings, resume=resume, overwrite=overwrite)
    done = {row["path"] for row in done_rows}
    pending = [p for p in paths if p not in done]
    summary = ExtractSummary(skipped=len(paths) - len(pending))
    started = time.monotonic()

    # Half precision keeps the patch and position embeddings in fp32 (and the pixels fed to them).
    model = model.to(device=settings.device).set_precision(DTYPES[settings.dtype]).eval()
    writer = ShardWriter(folder, DTYPES[settings.save_dtype])
    plan = _batch_plan(len(pending), settings.shard_size, settings.batch_size)
    loader = DataLoader(
        _Images(pending, processor, settings),
        batch_sampler=plan,
        num_workers=num_workers,
        collate_fn=list,
        persistent_workers=False,
    )
    rows: list[dict[str, Any]] = []
    features: list[dict[str, torch.Tensor]] = []
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(pending), unit="img", disable=not show, dynamic_ncols=True) as bar:
        for batch in loader:
            good = [(i, item) for i, item in batch if not isinstance(item, str)]
            for i, item in batch:
                row = {
                    "path": pending[i],
                    "status": "ok",
                    "error": None,
                    "shard": None,
                    "row": None,
                    "original_size": None,
                    "grid": None,
                }
                if isinstance(item, str):
                    row.update(status="failed", error=item)
                    summary.failures.append((pending[i], item))
                else:
                    row["original_size"] = list(item.original_size)
                rows.append(row)
            if good:
                features += _encode(model, processor, [item for _, item in good], settings, rows[-len(batch) :])
            summary.done += len(good)
            summary.failed += len(batch) - len(good)
            bar.update(len(batch))
            bar.set_postfix(failed=summary.failed, refresh=False)
            if (batch[-1][0] + 1) % settings.shard_size == 0 or batch[-1][0] + 1 == len(pending):
                writer.write(rows, features)
                done_rows += rows
                rows, features = [], []
    order = {p: i for i, p in enumerate(paths)}
    write_manifest(folder, sorted(done_rows, key=lambda r: order.get(r["path"], len(order))))
    summary.seconds = time.monotonic() - started
    return summary


def _encode(
    model: SigLIP2Encoder,
    processor: ImageProcessor,
    items: list[ProcessedImage],
    settings: ExtractSettings,
    rows: list[dict[str, Any]],
) -> list[dict[str, torch.Tensor]]:
    """Run one batch; returns each image's features and fills in the ok rows' grids."""
    inputs = processor.collate(items).to(settings.device, model.dtype)
    with torch.inference_mode():
        out = model(
            **inputs, layers=settings.layers, return_last=settings.last_hidden_state, return_pooled=settings.pooled
        )
    per_image: list[dict[str, torch.Tensor]] = [{} for _ in items]
    if settings.pooled:
        for f, pooled in zip(per_image, out.pooler_output):
            f["pooled"] = pooled
    for name, layer in settings.token_features():
        for f, tokens in zip(per_image, out.per_image(layer)):
            f[name] = tokens
    for row, grid in zip((r for r in rows if r["status"] == "ok"), out.grids):
        row["grid"] = list(grid)
    return per_image
