"""Index-ready files from an extracted folder: the layout clip-retrieval writes and autofaiss / clip-retrieval read.

    out/
      img_emb/img_emb_0.npy           (n, D) L2-normalised pooled features (text_emb/text_emb_0.npy for texts)
      text_emb/text_emb_0.npy         (n, D) the same rows' captions, when they were extracted (tar shards)
      metadata/metadata_0.parquet     one row per vector, same order: image_path (and caption), or caption for texts
      ...

File numbers are zero-padded to one width, so name order is row order. Only inputs that succeeded are written
(failed ones stay listed in the folder's manifest). ``autofaiss build_index --embeddings out/img_emb`` or
``clip-retrieval index --embeddings_folder out`` then builds an index without code. Parquet needs ``pyarrow`` (the
``parquet`` extra).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import Arg, ArgumentError
from ..files import write_atomic
from .store import TEXT_INPUTS, ExtractedFeatures

__all__ = ["NPY_DTYPES", "export_index_ready"]

logger = logging.getLogger(__name__)

NPY_DTYPES = {"fp16": np.float16, "fp32": np.float32}  # clip-retrieval writes fp16


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("parquet needs pyarrow: pip install 'siglip2-encoder[parquet]' (or pyarrow)") from None
    return pyarrow


def _blocks(
    features: ExtractedFeatures, names: tuple[str, ...], rows_per_file: int
) -> Iterator[tuple[list[dict], list[torch.Tensor]]]:
    """(rows, one tensor per feature in ``names``) of up to ``rows_per_file`` rows at a time, in the folder's row
    order."""
    rows: list[dict] = []
    parts: list[list[torch.Tensor]] = [[] for _ in names]
    for shards in zip(*(features.iter_shards(name) for name in names)):
        rows += shards[0][0]
        for part, (_, tensor, _) in zip(parts, shards):
            part.append(tensor)
        while len(rows) >= rows_per_file:
            blocks = [torch.cat(part) for part in parts]
            yield rows[:rows_per_file], [block[:rows_per_file] for block in blocks]
            rows, parts = rows[rows_per_file:], [[block[rows_per_file:]] for block in blocks]
    if rows:
        yield rows, [torch.cat(part) for part in parts]


def _npy(vectors: torch.Tensor, dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, F.normalize(vectors.float(), dim=-1).numpy().astype(NPY_DTYPES[dtype]))
    return buffer.getvalue()


def export_index_ready(
    features: ExtractedFeatures,
    output: str | os.PathLike,
    *,
    dtype: str = "fp16",
    rows_per_file: int = 250_000,
    overwrite: bool = False,
) -> int:
    """Write the folder's pooled features as clip-retrieval's ``*_emb/*.npy`` + ``metadata/*.parquet``.

    Args:
        features: an ``extract`` (images) or ``embed-text`` (texts) folder.
        output: the folder to write; it must not hold files unless ``overwrite``.
        dtype: ``"fp16"`` (clip-retrieval's choice) or ``"fp32"``.
        rows_per_file: vectors per file (memory holds one file's worth).

    Returns:
        The number of vectors written.
    """
    pyarrow = _pyarrow()
    if dtype not in NPY_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(NPY_DTYPES)}, got {dtype!r}")
    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows_per_file must be a positive int, got {rows_per_file!r}")
    if features.inputs != TEXT_INPUTS and not features.settings.get("pooled"):
        raise ArgumentError(f"{features.folder} holds no pooled features; extract ", Arg("pooled", "with pooled=True"))
    if not features.ok:
        raise ValueError(f"{features.folder} holds no successfully extracted {features.inputs}")
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ArgumentError(
            f"{output} already holds files; pass ",
            Arg("overwrite", "overwrite=True"),
            " to replace them, or another ",
            Arg("output", "output"),
            " folder",
        )
    # (folder, feature) pairs, and the metadata columns: row -> value
    if features.inputs == TEXT_INPUTS:
        outputs, columns = [("text", "pooled")], {"caption": features.name}
    else:
        outputs, columns = [("img", "pooled")], {"image_path": features.name}
        if features.settings.get("captions"):  # image-caption pairs: clip-retrieval's --enable_text layout
            outputs.append(("text", "caption_pooled"))
            columns["caption"] = lambda row: row["caption"]
    for folder in [output / f"{kind}_emb" for kind, _ in outputs] + [output / "metadata"]:
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("*.npy"), *folder.glob("*.parquet")]:
            old.unlink()
    width = len(str(max(0, (len(features.ok) - 1) // rows_per_file)))
    written = 0
    for number, (rows, vectors) in enumerate(_blocks(features, tuple(name for _, name in outputs), rows_per_file)):
        suffix = str(number).zfill(width)
        for (kind, _), block in zip(outputs, vectors):
            write_atomic(output / f"{kind}_emb" / f"{kind}_emb_{suffix}.npy", _npy(block, dtype))
        table = pyarrow.table({column: [value(row) for row in rows] for column, value in columns.items()})
        write_atomic(output / "metadata" / f"metadata_{suffix}.parquet", partial(pyarrow.parquet.write_table, table))
        written += len(rows)
    folders = ", ".join(f"{kind}_emb/" for kind, _ in outputs)
    logger.info("wrote %d rows to %s (%s, metadata/)", written, output, folders)
    return written
