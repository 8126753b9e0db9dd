"""Feature extraction over many images: resumable, crash-safe, never stopped by one bad input.

:func:`extract` takes an input source (:mod:`.sources`: files, video frames, tar shards), decodes and preprocesses
its images in worker processes (:mod:`.decoding`) while the model runs, and commits every ``shard_size`` inputs as
one shard of the output folder (:mod:`.store`). An input that cannot be used is recorded in the manifest with its
reason and the run goes on, also when it kills the worker decoding it (a decoder crash, the system's out-of-memory
killer). One run writes a folder at a time; under torchrun every rank writes its share of the same folder.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.images import load_image, load_image_bytes
from ..data.processor import ImageProcessor, ProcessedImage
from ..data.tokenizer import TextTokenizer
from ..data.video import VideoFrame, read_frame
from ..export.quantize import quantize
from ..models.model import SigLIP2Encoder
from ..models.text import SigLIP2TextEncoder
from .decoding import DecodingPool
from .distributed import Ranks
from .settings import DTYPES, ExtractSettings, ExtractSummary, job_identity, run_options
from .sources import Failed, FileSource, InputSource, TarMember, Task
from .store import ShardWriter, next_shard_index, prepare_output, read_rows, sole_writer, write_manifest

__all__ = ["TextTower", "extract"]


@dataclass(frozen=True)
class _Decode:
    """Decodes and preprocesses one task's image (run in the decoding workers); any failure becomes its reason."""

    processor: ImageProcessor
    settings: ExtractSettings

    def __call__(self, task: Task) -> ProcessedImage | str:
        if isinstance(task, Failed):
            return task.reason
        options = dict(exif_transpose=self.settings.exif_transpose, max_pixels=self.settings.max_pixels)
        try:
            if isinstance(task, TarMember):
                pixels = load_image_bytes(task.data, task.name, **options)
            elif isinstance(task, VideoFrame):
                pixels = read_frame(task)
            else:
                pixels = load_image(task, **options)
            return self.processor.process_one(pixels, max_num_patches=self.settings.max_num_patches)
        except (ValueError, TypeError, OSError) as err:  # load_image / process_one report bad inputs so
            return str(err)
        except Exception as err:  # anything else one image provokes is still that image's failure
            return f"{task}: {type(err).__name__}: {err}"


def _outcome(item: ProcessedImage | str) -> dict[str, Any]:
    """A manifest row's fields for one decoded input (shard, row and grid are filled in when it is written)."""
    failed = isinstance(item, str)
    return {
        "status": "failed" if failed else "ok",
        "error": item if failed else None,
        "shard": None,
        "row": None,
        "original_size": None if failed else list(item.original_size),
        "grid": None,
    }


@dataclass
class _Run:
    """One rank's share of an extraction: the folder is checked and locked (by rank 0), its committed rows read."""

    folder: Path
    ranks: Ranks
    done_rows: list[dict[str, Any]]
    first: int  # the number of the first shard this run writes


@contextmanager
def _start_run(
    output: str | os.PathLike, settings: ExtractSettings, ranks: Ranks, *, resume: bool, overwrite: bool
) -> Iterator[_Run]:
    """Rank 0 locks and checks the folder (settings, leftovers) while the others wait; then every rank reads the
    committed rows. The lock is held until the block ends."""
    ranks.start()
    folder = Path(output)
    with sole_writer(folder) if ranks.main else nullcontext():
        if ranks.main:
            # The working directory says where relative input paths lie (the service serves the images from there).
            record, identity = asdict(settings) | {"working_dir": os.getcwd()}, job_identity(settings)
            done_rows = prepare_output(folder, record, identity, resume=resume, overwrite=overwrite)
        ranks.barrier()  # rank 0 has checked the settings and removed a crashed run's leftovers
        if not ranks.main:
            done_rows = read_rows(folder)
        yield _Run(folder, ranks, done_rows, next_shard_index(folder))


def _decoded(
    inputs: Iterator[tuple[dict[str, Any], Task]], pool: DecodingPool
) -> Iterator[tuple[dict[str, Any], ProcessedImage | str]]:
    """(row fields, decoded image or failure reason) per input, in order; the pool sees the tasks only."""
    stubs: deque[dict[str, Any]] = deque()  # the rows of the tasks the pool has taken, in order

    def tasks() -> Iterator[Task]:
        for stub, task in inputs:
            stubs.append(stub)
            yield task

    for item in pool(tasks()):
        yield stubs.popleft(), item


@dataclass(frozen=True)
class TextTower:
    """The text tower and tokenizer that embed each input's caption (``ExtractSettings.captions``), as
    ``caption_pooled`` beside the image's features: the pair clip-retrieval's ``--enable_text`` writes."""

    model: SigLIP2TextEncoder
    tokenizer: TextTokenizer


@dataclass(frozen=True)
class _Encoder:
    """Runs one batch of decoded images (and their captions) through the towers."""

    model: SigLIP2Encoder
    processor: ImageProcessor
    settings: ExtractSettings
    device: str
    text: TextTower | None

    @classmethod
    def on(
        cls,
        device: str,
        model: SigLIP2Encoder,
        processor: ImageProcessor,
        settings: ExtractSettings,
        text: TextTower | None,
    ) -> _Encoder:
        """The towers moved to ``device`` in the settings' precision (half precision keeps the patch and position
        embeddings in fp32, and the pixels fed to them), quantized if asked, in eval()."""
        model = model.to(device=device).set_precision(DTYPES[settings.dtype]).eval()
        if settings.quantize is not None:
            model = quantize(model, settings.quantize)
        if text is not None:
            text = replace(text, model=text.model.to(device=device, dtype=DTYPES[settings.dtype]).eval())
        return cls(model, processor, settings, device, text)

    def __call__(self, items: list[ProcessedImage], rows: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Each image's features; fills in the grids of ``rows``' ok rows (one per item, in order)."""
        settings = self.settings
        inputs = self.processor.collate(items).to(self.device, self.model.dtype)
        with torch.inference_mode():
            out = self.model(
                **inputs, layers=settings.layers, return_last=settings.last_hidden_state, return_pooled=settings.pooled
            )
        per_image: list[dict[str, torch.Tensor]] = [{} for _ in items]
        if settings.pooled:
            for f, pooled in zip(per_image, out.pooler_output):
                f["pooled"] = pooled
        for name, layer in settings.token_features():
            for f, tokens in zip(per_image, out.per_image(layer)):
                f[name] = tokens
        ok = [r for r in rows if r["status"] == "ok"]
        for row, grid in zip(ok, out.grids):
            row["grid"] = list(grid)
        if self.text is not None:
            tokens = self.text.tokenizer([row["caption"] for row in ok])
            mask = None if tokens.attention_mask is None else tokens.attention_mask.to(self.device)
            with torch.inference_mode():
                captions = self.text.model(tokens.input_ids.to(self.device), mask, return_last=False).pooler_output
            for f, caption in zip(per_image, captions):
                f["caption_pooled"] = caption
        return per_image


def _check_captions(settings: ExtractSettings, source: InputSource, text: TextTower | None) -> None:
    if settings.captions != (text is not None):
        raise ValueError(
            f"settings.captions={settings.captions} but text={'given' if text else None}: captions need the text "
            f"tower and tokenizer (text=TextTower(model, tokenizer)), and only settings.captions=True uses them"
        )
    if text is not None and text.tokenizer.padding_mask != settings.caption_padding_mask:
        raise ValueError(
            f"the captions' tokenizer has padding_mask={text.tokenizer.padding_mask}, the settings say "
            f"caption_padding_mask={settings.caption_padding_mask}"
        )
    if settings.captions and not source.captions:
        raise ValueError(
            f"settings.captions=True needs a source that gives captions (TarSource(specs, captions=True)), got a "
            f"{type(source).__name__}"
        )


def _blocks(
    decoded: Iterator[tuple[dict[str, Any], ProcessedImage | str]],
    encode: _Encoder,
    summary: ExtractSummary,
    bar: tqdm,
) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]]:
    """Encode the decoded inputs batch by batch; yields (rows, features) for every ``shard_size`` of them (the last
    block may be shorter), counting what succeeded and failed in ``summary``."""
    batch_size, shard_size = encode.settings.batch_size, encode.settings.shard_size
    rows: list[dict[str, Any]] = []
    features: list[dict[str, torch.Tensor]] = []
    while True:
        items = list(itertools.islice(decoded, min(batch_size, shard_size - len(rows))))
        batch_rows = [stub | _outcome(item) for stub, item in items]
        good = [item for _, item in items if not isinstance(item, str)]
        if good:
            features += encode(good, batch_rows)
        summary.failures += [(row["path"], row["error"]) for row in batch_rows if row["error"]]
        summary.done += len(good)
        summary.failed += len(items) - len(good)
        rows += batch_rows
        bar.update(len(items))
        bar.set_postfix(failed=summary.failed, refresh=False)
        if rows and (len(rows) == shard_size or not items):
            yield rows, features
            rows, features = [], []
        if not items:
            return


def _finish_run(run: _Run, summary: ExtractSummary, source: InputSource) -> None:
    """After every rank's last commit, rank 0 writes the manifest (rows in input order) and counts the other ranks'
    failures."""
    run.ranks.barrier()
    if run.ranks.main:
        rows = read_rows(run.folder)
        write_manifest(run.folder, sorted(rows, key=source.position))
        failed = sum(r["status"] == "failed" for r in rows)
        summary.failed_elsewhere = failed - summary.failed - summary.failed_before


def extract(
    inputs: InputSource | Sequence[str | VideoFrame],
    output: str | os.PathLike,
    model: SigLIP2Encoder,
    processor: ImageProcessor,
    settings: ExtractSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool | None = None,
    ranks: Ranks | None = None,
    text: TextTower | None = None,
) -> ExtractSummary:
    """Extract features of ``inputs`` into the folder ``output`` (layout in :mod:`siglip2_encoder.pipeline.store`).

    Args:
        inputs: a source (:class:`~.sources.FileSource`, :class:`~.sources.TarSource`), or image files and video
            frames (see :func:`~.sources.expand_videos`) in the order their rows take in the manifest.
        model, processor: the encoder (moved to ``settings.device`` / ``settings.dtype`` here) and its processor.
        settings: what to extract and how.
        resume: continue an interrupted run in ``output``: committed shards are kept, nothing done is redone. The
            settings that identify the features must match the first run's; device and batch size may change.
        overwrite: replace an existing ``output``; without it or ``resume`` an existing output is an error.
        num_workers: worker processes decoding images while the model runs (0 = in this process, where a file that
            crashes its decoder ends the run).
        progress: show a progress bar; None = only when stderr is a terminal.
        ranks: the processes of a distributed job (``Ranks.from_env()`` under torchrun), all called with the same
            arguments: each writes its share of the inputs (see the source), rank 0 checks the folder first and
            writes the merged manifest last.
        text: with ``settings.captions``, the text tower and tokenizer that embed each input's caption (the
            source must give captions: ``TarSource(specs, captions=True)``).

    Raises:
        ValueError: the folder is being written by another run, holds output (without ``resume`` or
            ``overwrite``), or holds a run with other settings; the ranks were given different inputs.
    """
    if isinstance(inputs, (str, os.PathLike)):
        raise TypeError(f"inputs must be a list of paths or an input source, got one path: pass [{inputs!r}]")
    source = inputs if isinstance(inputs, InputSource) else FileSource(inputs)
    _check_captions(settings, source, text)
    ranks = ranks or Ranks()
    with _start_run(output, settings, ranks, resume=resume, overwrite=overwrite) as run:
        source.check_same(ranks)
        share = source.share(run.done_rows, ranks, settings.shard_size, run.first)
        failed_before = sum(r["status"] == "failed" for r in run.done_rows)
        summary = ExtractSummary(skipped=share.skipped, failed_before=failed_before)
        started = time.monotonic()
        encode = _Encoder.on(ranks.device(settings.device), model, processor, settings, text)
        pool = DecodingPool(_Decode(processor, settings), num_workers, ahead=2 * settings.batch_size)
        writer = ShardWriter(run.folder, DTYPES[settings.save_dtype], run_options(settings))
        show = (sys.stderr.isatty() if progress is None else progress) and ranks.main
        with tqdm(total=share.total, unit="img", disable=not show, dynamic_ncols=True) as bar:
            for rows, features in _blocks(_decoded(share.inputs, pool), encode, summary, bar):
                writer.write(rows, features, next(share.shards))
        summary.seconds = time.monotonic() - started
        _finish_run(run, summary, source)
        return summary
