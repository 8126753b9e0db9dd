"""Zero-shot classification of many image files: batch by batch, in input order, a file that cannot be read recorded
with its reason instead of ending the run (``siglip2-encoder classify``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from ..data.images import ImageLoadError, load_image
from ..data.processor import ImageProcessor
from ..models.joint import LabelSet, SigLIP2Model

__all__ = ["classify_files"]

logger = logging.getLogger(__name__)


def classify_files(
    paths: Sequence[str],
    model: SigLIP2Model,
    labels: LabelSet,
    *,
    processor: ImageProcessor | None = None,
    batch_size: int = 32,
    top_k: int | None = None,
    progress: bool | None = None,
) -> Iterator[dict]:
    """One row per path, in input order: ``{"path", "status": "ok", "labels": [{"score", "label"}, ...]}`` (as
    :meth:`~siglip2_encoder.SigLIP2Model.classify` ranks them) or ``{"path", "status": "failed", "error"}`` for a file
    :func:`~siglip2_encoder.load_image` cannot read (logged, and the run goes on).

    Args:
        labels: from :meth:`~siglip2_encoder.SigLIP2Model.encode_labels` (encoded once for all images).
        progress: a progress bar over batches; None = only when stderr is a terminal.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
    processor = processor or ImageProcessor(model.vision_model.processor_config)
    show = sys.stderr.isatty() if progress is None else progress
    for start in tqdm(range(0, len(paths), batch_size), disable=not show, unit="batch"):
        batch = paths[start : start + batch_size]
        rows: list[dict] = [{} for _ in batch]  # input order; each filled in below
        loaded, where = [], []
        for i, path in enumerate(batch):
            try:
                loaded.append(load_image(path))
                where.append(i)
            except ImageLoadError as err:
                rows[i] = {"path": path, "status": "failed", "error": str(err)}
                logger.warning("failed: %s", err)
        if loaded:
            for i, ranked in zip(where, model.classify(loaded, labels, processor=processor, top_k=top_k)):
                rows[i] = {"path": batch[i], "status": "ok", "labels": ranked}
        yield from rows
