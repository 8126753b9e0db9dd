"""Index-ready files from an extracted folder: the layout clip-retrieval writes and autofaiss / clip-retrieval read.

    out/
      img_emb/img_emb_0.npy           (n, D) L2-normalised pooled features (text_emb/text_emb_0.npy for texts)
      metadata/metadata_0.parquet     one row per vector, same order: image_path (or caption for texts)
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


def _blocks(features: ExtractedFeatures, rows_per_file: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(names, vectors) of up to ``rows_per_file`` rows at a time, in the folder's row order."""
    names: list[str] = []
    parts: list[torch.Tensor] = []
    for rows, tensor, _ in features.iter_shards("pooled"):
        names += [features.name(row) for row in rows]
        parts.append(tensor)
        while len(names) >= rows_per_file:
            block = torch.cat(parts)
            yield names[:rows_per_file], block[:rows_per_file]
            names, parts = names[rows_per_file:], [block[rows_per_file:]]
    if names:
        yield names, torch.cat(parts)


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
    kind, column = ("text", "caption") if features.inputs == TEXT_INPUTS else ("img", "image_path")
    embeddings, metadata = output / f"{kind}_emb", output / "metadata"
    for folder in (embeddings, metadata):
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("*.npy"), *folder.glob("*.parquet")]:
            old.unlink()
    width = len(str(max(0, (len(features.ok) - 1) // rows_per_file)))
    written = 0
    for number, (names, vectors) in enumerate(_blocks(features, rows_per_file)):
        suffix = str(number).zfill(width)
        array = F.normalize(vectors.float(), dim=-1).numpy().astype(NPY_DTYPES[dtype])
        buffer = io.BytesIO()
        np.save(buffer, array)
        write_atomic(embeddings / f"{kind}_emb_{suffix}.npy", buffer.getvalue())
        table = pyarrow.table({column: names})
        write_atomic(metadata / f"metadata_{suffix}.parquet", lambda tmp: pyarrow.parquet.write_table(table, tmp))  # noqa: B023
        written += len(names)
    logger.info("wrote %d vectors to %s (%s_emb/, metadata/)", written, output, kind)
    return written
