"""Text embeddings of a list of texts into the layout of :mod:`.store` (``embed-text``), so both sides of a
retrieval set come from one tool."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.tokenizer import TextTokenizer
from ..errors import ArgumentError
from ..models.text import SigLIP2TextEncoder
from .settings import DTYPES, ExtractSummary, TextEmbedSettings, job_identity, run_options
from .store import RESUME, ShardWriter, prepare_output, sole_writer, write_manifest

__all__ = ["embed_texts"]


def embed_texts(
    texts: Sequence[str],
    output: str | os.PathLike,
    model: SigLIP2TextEncoder,
    tokenizer: TextTokenizer,
    settings: TextEmbedSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ExtractSummary:
    """Text embeddings (the text tower's pooled output, as ``get_text_features``) of ``texts`` into ``output``:
    the layout of :func:`~siglip2_encoder.pipeline.extract.extract`, one ``pooled`` (n, D) per shard, rows
    ``{"text": ..., "status": "ok", "shard": ..., "row": ...}`` in input order (repeated texts keep their own rows).

    ``resume`` continues after the committed rows, which must be the first texts of ``texts``, in order.
    """
    _check_tokenizer(tokenizer, settings)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}; texts must be strings")
    folder = Path(output)
    with sole_writer(folder):
        done_rows = prepare_output(folder, asdict(settings), job_identity(settings), resume=resume, overwrite=overwrite)
        for i, row in enumerate(done_rows):
            if i >= len(texts) or row.get("text") != texts[i]:
                given = repr(texts[i]) if i < len(texts) else "nothing"
                raise ArgumentError(
                    RESUME,
                    f" with other texts than the first run: its text {i} is {row.get('text')!r}, now {given}; give "
                    f"the same texts in the same order (more may follow)",
                )
        pending = texts[len(done_rows) :]
        summary = ExtractSummary(skipped=len(done_rows), unit="texts")
        started = time.monotonic()
        model = model.to(device=settings.device, dtype=DTYPES[settings.dtype]).eval()
        writer = ShardWriter(folder, DTYPES[settings.save_dtype], run_options(settings))
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=len(pending), unit="text", disable=not show, dynamic_ncols=True) as bar:
            for start in range(0, len(pending), settings.shard_size):
                block = pending[start : start + settings.shard_size]
                features = []
                for b in range(0, len(block), settings.batch_size):
                    tokens = tokenizer(block[b : b + settings.batch_size])
                    mask = None if tokens.attention_mask is None else tokens.attention_mask.to(settings.device)
                    with torch.inference_mode():
                        features += model(
                            tokens.input_ids.to(settings.device), mask, return_last=False
                        ).pooler_output.unbind()
                    bar.update(len(tokens.input_ids))
                rows = [{"text": text, "status": "ok", "error": None, "shard": None, "row": None} for text in block]
                writer.write(rows, [{"pooled": f} for f in features])
                done_rows += rows
                summary.done += len(block)
        write_manifest(folder, done_rows)
        summary.seconds = time.monotonic() - started
        return summary


def _check_tokenizer(tokenizer: TextTokenizer, settings: TextEmbedSettings) -> None:
    """The tokenizer must encode texts as the settings (recorded in run.json) say."""
    if tokenizer.preprocessing != settings.text_preprocessing:
        raise ValueError(
            f"the tokenizer's preprocessing is {tokenizer.preprocessing!r}, the settings say "
            f"text_preprocessing={settings.text_preprocessing!r}"
        )
    if tokenizer.padding_mask != settings.padding_mask:
        raise ValueError(
            f"the tokenizer's padding_mask is {tokenizer.padding_mask}, the settings say "
            f"padding_mask={settings.padding_mask}"
        )
