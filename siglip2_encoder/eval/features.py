"""Image features for evaluation tasks, through ``extract``'s folders: written once, read back by every later run
(other templates, captions or probe settings encode no image again), resumed when interrupted; and the versions a
result records."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

from ..data.processor import ImageProcessor
from ..models.model import SigLIP2Encoder
from ..pipeline.extract import extract
from ..pipeline.settings import ExtractSettings
from ..pipeline.store import ExtractedFeatures, has_output

__all__ = ["image_features", "versions"]

logger = logging.getLogger(__name__)


def image_features(
    tower: SigLIP2Encoder,
    name: str,
    paths: Sequence[str],
    folder: str | os.PathLike,
    *,
    processor: ImageProcessor | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool | None = None,
) -> tuple[list[int], torch.Tensor, int]:
    """The pooled features of ``paths`` by ``tower`` (checkpoint ``name``), through the features ``folder``:
    (indices of the paths that could be read, their features (n, D), how many images were encoded now).

    The images that could not be read are left out, with a warning; none readable is a ``ValueError``.
    """
    folder = Path(folder)
    settings = ExtractSettings(model=name, pooled=True, batch_size=batch_size, device=device)
    processor = processor or ImageProcessor(tower.processor_config)
    summary = extract(
        list(paths), folder, tower, processor, settings, resume=has_output(folder), num_workers=num_workers,
        progress=progress,
    )  # fmt: skip
    names, pooled = ExtractedFeatures.open(folder).pooled()
    row = {path: i for i, path in enumerate(names)}
    kept = [i for i, path in enumerate(paths) if path in row]
    if not kept:
        raise ValueError(f"none of the {len(paths)} images could be read; see {folder}/manifest.jsonl")
    if len(kept) < len(paths):
        logger.warning("%d of %d images could not be read; they are left out (see %s)", len(paths) - len(kept),
                       len(paths), folder)  # fmt: skip
    return kept, pooled[[row[paths[i]] for i in kept]], summary.done


def versions() -> dict[str, str]:
    """The versions a result was measured with."""
    found = {}
    for name in ("siglip2-encoder", "torch", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found | {"python": platform.python_version()}
