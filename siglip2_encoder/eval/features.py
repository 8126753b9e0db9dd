"""Image features for evaluation tasks, through ``extract``'s folders: written once, read back by every later run
(other templates, captions or probe settings encode no image again), resumed when interrupted; and the versions a
result records."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..data.processor import ImageProcessor
from ..models.model import SigLIP2Encoder
from ..pipeline.extract import extract
from ..pipeline.settings import ExtractSettings
from ..pipeline.sources import TarSource
from ..pipeline.store import ExtractedFeatures, has_output
from .shards import sample_id

__all__ = ["DEFAULT_ENCODING", "Encoding", "encode_images", "image_features", "readable", "versions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoding:
    """How an evaluation encodes its images (``extract``'s options): the preprocessing (default the tower's own),
    images per forward pass, the device, decoding worker processes, and a progress bar (None: when stderr is a
    terminal)."""

    processor: ImageProcessor | None = None
    batch_size: int = 32
    device: str = "cpu"
    num_workers: int = 0
    progress: bool | None = None


DEFAULT_ENCODING = Encoding()


def encode_images(
    tower: SigLIP2Encoder,
    name: str,
    paths: Sequence[str],
    folder: str | os.PathLike,
    encoding: Encoding = DEFAULT_ENCODING,
    shards: Sequence[str] = (),
    **features: Any,
) -> tuple[ExtractedFeatures, int]:
    """``extract`` of ``paths`` (or of the WebDataset ``shards``, whose sample ids ``paths`` then are) by ``tower``
    (checkpoint ``name``) into ``folder`` as ``encoding`` says, resumed when it holds a run;
    ``features`` are :class:`~siglip2_encoder.pipeline.settings.ExtractSettings` fields (``pooled``,
    ``last_hidden_state``, ``layers``, ``max_num_patches``). Returns the folder, read back, and how many images
    were encoded now."""
    settings = ExtractSettings(model=name, batch_size=encoding.batch_size, device=encoding.device, **features)
    processor = encoding.processor or ImageProcessor(tower.processor_config)
    inputs = TarSource(shards) if shards else list(paths)
    summary = extract(
        inputs, folder, tower, processor, settings, resume=has_output(Path(folder)),
        num_workers=encoding.num_workers, progress=encoding.progress,
    )  # fmt: skip
    return ExtractedFeatures.open(folder), summary.done


def readable(store: ExtractedFeatures, paths: Sequence[str]) -> list[int]:
    """The indices of ``paths`` (image paths or sample ids) whose images were extracted; the others are left out,
    with a warning."""
    done = {sample_id(row) for row in store.ok}
    kept = [i for i, path in enumerate(paths) if path in done]
    if not kept:
        raise ValueError(f"none of the {len(paths)} images could be read; see {store.folder}/manifest.jsonl")
    if len(kept) < len(paths):
        logger.warning("%d of %d images could not be read; they are left out (see %s)", len(paths) - len(kept),
                       len(paths), store.folder)  # fmt: skip
    return kept


def image_features(
    tower: SigLIP2Encoder,
    name: str,
    paths: Sequence[str],
    folder: str | os.PathLike,
    encoding: Encoding = DEFAULT_ENCODING,
    shards: Sequence[str] = (),
) -> tuple[list[int], torch.Tensor, int]:
    """The pooled features of ``paths`` (as :func:`encode_images`): (indices of the paths that could be read, their
    features (n, D), how many images were encoded now)."""
    store, encoded = encode_images(tower, name, paths, folder, encoding, shards, pooled=True)
    kept = readable(store, paths)
    ids, parts = [], []
    for rows, tensor, _ in store.iter_shards("pooled"):
        ids += [sample_id(row) for row in rows]
        parts.append(tensor)
    row = {path: i for i, path in enumerate(ids)}
    return kept, torch.cat(parts)[[row[paths[i]] for i in kept]], encoded


def versions() -> dict[str, str]:
    """The versions a result was measured with."""
    found = {}
    for name in ("siglip2-encoder", "torch", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found | {"python": platform.python_version()}
