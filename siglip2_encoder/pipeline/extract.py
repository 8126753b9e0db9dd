"""Feature extraction over many image files: resumable, crash-safe, never stopped by one bad file; and text
embeddings of a list of texts into the same layout (:func:`embed_texts`), so both sides of a retrieval set come from
one tool.

Inputs are split into blocks of ``shard_size``; each block becomes one committed shard (see :mod:`.store`). Images
are decoded and preprocessed in worker processes while the model runs. A file that cannot be used is recorded in
the manifest with its reason and the run goes on, also when it kills the worker decoding it (a decoder crash, the
system's out-of-memory killer). One run writes a folder at a time.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import check_positive_ints
from ..data.images import DEFAULT_MAX_PIXELS, image_extensions, load_image, load_image_bytes
from ..data.processor import ImageProcessor, ProcessedImage
from ..data.tokenizer import TextTokenizer
from ..data.video import VIDEO_EXTENSIONS, VideoFrame, expand_video, read_frame
from ..errors import Arg, ArgumentError
from ..export.quantize import QUANTIZATIONS, quantize
from ..files import write_atomic
from ..models.model import SigLIP2Encoder
from ..models.text import SigLIP2TextEncoder
from .distributed import Ranks
from .store import (
    LOCK_FILE,
    RUN_FILE,
    TEXT_INPUTS,
    ShardWriter,
    close_inherited_locks,
    committed_rows,
    has_output,
    next_shard_index,
    read_rows,
    sole_writer,
    write_manifest,
)

__all__ = [
    "ExtractSettings",
    "ExtractSummary",
    "TextEmbedSettings",
    "discover_inputs",
    "embed_texts",
    "expand_tar_specs",
    "expand_videos",
    "extract_features",
    "extract_tar_features",
]

RESUME, OVERWRITE = Arg("resume", "resume=True"), Arg("overwrite", "overwrite=True")
logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. inside a folder we may not read: recorded as an input, whose reading then fails
        return False


def _scan(root: Path, extensions: frozenset[str], skipped: defaultdict[str, list[str]]) -> list[str]:
    """Files under ``root`` (symlinked folders followed, each real folder once) with an extension in ``extensions``."""
    found: list[str] = []
    seen: set[str] = set()

    def unreadable(err: OSError) -> None:
        skipped["unreadable folders"].append(f"{err.filename} ({err.strerror})")

    for folder, subfolders, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or two links to one folder
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()
        for name in subfolders:
            if Path(name).suffix.lower() in extensions:
                skipped["folders named like images (searched, not read)"].append(os.path.join(folder, name))
        for name in files:
            path = os.path.join(folder, name)
            if Path(name).suffix.lower() in extensions:
                found.append(path)
            else:
                skipped[f"files with an extension Pillow cannot open ({Path(name).suffix or 'none'})"].append(path)
    return sorted(found)


def read_file_list(file_list: str | os.PathLike) -> list[str]:
    """One path per line, exactly as written (no comments, no stripping of spaces); empty lines are skipped and a
    line's trailing carriage return (Windows line ends) is dropped."""
    lines = Path(file_list).read_text().split("\n")
    return [line.removesuffix("\r") for line in lines if line.removesuffix("\r")]


def discover_inputs(
    specs: Sequence[str], file_list: str | os.PathLike | None = None, *, videos: bool = False
) -> list[str]:
    """Expand image files, folders, glob patterns and a text file of paths (:func:`read_file_list`) into one list, in
    the order given, without duplicates.

    Folders are searched recursively (symlinked folders too), in sorted order, for files whose extension the
    installed Pillow can open (and, with ``videos``, video files); what is skipped is logged with counts and reasons.
    A path that does not exist is kept, so that the run records it as failed instead of dropping it unseen.
    """
    extensions = image_extensions() | (VIDEO_EXTENSIONS if videos else frozenset())
    skipped: defaultdict[str, list[str]] = defaultdict(list)
    found: list[str] = []
    for spec in specs:
        path = Path(spec)
        if _is_dir(path):
            found += _scan(path, extensions, skipped)
        elif not os.path.lexists(spec) and glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                logger.warning("the pattern %r matches no file", spec)
            found += matches
        else:
            found.append(spec)
    if file_list is not None:
        found += read_file_list(file_list)
    for reason, paths in skipped.items():
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        logger.warning("skipped %d %s: %s", len(paths), reason, shown)
    return list(dict.fromkeys(found))


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
    lowercase: bool  # as the tokenizer applied it (SigLIP 2: True by default)
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


@dataclass(frozen=True)
class _Decode:
    """Decodes and preprocesses one image: a file by its index in ``paths``, or a task ``(name, encoded bytes)``
    (a tar member, sent to the worker); any failure becomes its reason (a string)."""

    paths: Sequence[str | VideoFrame]
    processor: ImageProcessor
    settings: ExtractSettings

    def name(self, task: int | tuple[str, bytes]) -> str:
        return task[0] if isinstance(task, tuple) else str(self.paths[task])

    def __call__(self, task: int | tuple[str, bytes] | str) -> ProcessedImage | str:
        if isinstance(task, str):  # an input known to have failed before decoding (a tar sample without image)
            return task
        options = dict(exif_transpose=self.settings.exif_transpose, max_pixels=self.settings.max_pixels)
        try:
            source = task if isinstance(task, tuple) else self.paths[task]
            if isinstance(source, tuple):
                pixels = load_image_bytes(source[1], source[0], **options)
            elif isinstance(source, VideoFrame):
                pixels = read_frame(source)
            else:
                pixels = load_image(source, **options)
            return self.processor.process_one(pixels, max_num_patches=self.settings.max_num_patches)
        except (ValueError, TypeError, OSError) as err:  # load_image / process_one report bad inputs so
            return str(err)
        except Exception as err:  # anything else one image provokes is still that image's failure
            return f"{self.name(task)}: {type(err).__name__}: {err}"


# The worker's decoder, installed once per worker process (not sent with every task).
_worker_decode: Callable[[int | tuple[str, bytes]], ProcessedImage | str] | None = None


def _start_worker(decode: _Decode) -> None:
    global _worker_decode
    close_inherited_locks()
    _worker_decode = decode
    torch.set_num_threads(1)  # the workers share the CPU with the model
    parent = os.getppid()

    def exit_with_parent() -> None:  # a killed run's workers would otherwise wait for tasks forever
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _decode_in_worker(task: int | tuple[str, bytes]) -> ProcessedImage | str:
    return _worker_decode(task)


WORKER_DIED = (
    "the process decoding this file died (killed by the system, e.g. out of memory, or a crash in an image "
    "decoder); the file was tried alone and killed its process again"
)


class _Decoder:
    """Decodes items in worker processes, a bounded number ahead, yielding them in order.

    When a worker dies, every item not yet finished is tried again alone in a fresh process: an item that kills
    that one too becomes a failure (:data:`WORKER_DIED`), the others their normal results. ProcessPoolExecutor
    (rather than a DataLoader, whose worker deaths surface as exceptions raised from a signal handler anywhere in
    the main process) reports a death on the futures of the items it hit.
    """

    def __init__(self, decode: _Decode, num_workers: int, ahead: int) -> None:
        self.decode, self.num_workers, self.ahead = decode, num_workers, max(ahead, num_workers)

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker, initargs=(self.decode,)
        )

    def _alone(self, task: int | tuple[str, bytes]) -> ProcessedImage | str:
        with self._pool(1) as pool:
            try:
                return pool.submit(_decode_in_worker, task).result()
            except BrokenProcessPool:
                return f"{self.decode.name(task)}: {WORKER_DIED}"

    def __call__(self, tasks: Iterable[int | tuple[str, bytes]]) -> Iterator[ProcessedImage | str]:
        """The results for ``tasks`` (read lazily: a tar stream is never held whole), in their order."""
        if self.num_workers == 0:
            yield from map(self.decode, tasks)
            return
        source = iter(tasks)
        todo: deque = deque()
        pending: deque[tuple[int | tuple[str, bytes], Future]] = deque()
        pool = self._pool(self.num_workers)
        try:
            while True:
                while len(todo) + len(pending) < self.ahead and (task := next(source, _END)) is not _END:
                    todo.append(task)
                if not (todo or pending):
                    return
                try:
                    while todo:
                        pending.append((todo[0], pool.submit(_decode_in_worker, todo[0])))
                        todo.popleft()
                    result = pending[0][1].result()
                except BrokenProcessPool:  # from result(), or from submit() once the pool noticed a death
                    pool.shutdown(cancel_futures=True)
                    for task, future in pending:
                        finished = future.done() and not future.cancelled() and future.exception() is None
                        yield future.result() if finished else self._alone(task)
                    pending.clear()
                    pool = self._pool(self.num_workers)
                    continue
                pending.popleft()
                yield result
        finally:
            pool.shutdown(cancel_futures=True)


_END = object()  # the end of a task stream


def _prepare_output(
    folder: Path, settings: ExtractSettings | TextEmbedSettings, *, resume: bool, overwrite: bool
) -> list[dict]:
    """Check the (locked) output folder and start or continue its run; returns the rows already committed.

    A folder holding only temporary files of an interrupted write (a kill before ``run.json`` was renamed into
    place, say) counts as empty, so every interruption leaves a folder that a plain run or ``resume`` accepts.
    """
    record = json.dumps(asdict(settings), indent=2, sort_keys=True).encode()
    if has_output(folder):
        if resume:
            if not (folder / RUN_FILE).is_file():
                raise ValueError(f"{folder} is not an extraction folder (no {RUN_FILE}); cannot resume into it")
            previous = json.loads((folder / RUN_FILE).read_text())
            identity = job_identity(settings)
            changed = sorted(k for k, v in identity.items() if json.loads(json.dumps(v)) != previous.get(k))
            if changed:
                detail = ", ".join(f"{k}: {previous.get(k)!r} -> {getattr(settings, k)!r}" for k in changed)
                raise ArgumentError(
                    RESUME, f" with other settings than the first run ({detail}); use the same settings"
                )
            return committed_rows(folder)
        if not overwrite:
            raise ArgumentError(
                f"{folder} already holds output; pass ", RESUME, " to continue it or ", OVERWRITE, " to replace it"
            )
    for entry in folder.iterdir():  # what an overwrite replaces, or an interrupted write left; not the lock
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    write_atomic(folder / RUN_FILE, record)
    return []


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


Task = int | tuple[str, bytes] | str  # a file's index, a tar member (name, bytes), or an input's failure reason


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
            done_rows = _prepare_output(folder, settings, resume=resume, overwrite=overwrite)
        ranks.barrier()  # rank 0 has checked the settings and removed a crashed run's leftovers
        if not ranks.main:
            done_rows = read_rows(folder)
        yield _Run(folder, ranks, done_rows, next_shard_index(folder))


def _run_stream(
    run: _Run,
    inputs: Iterable[tuple[dict[str, Any], Task]],
    shards: Iterator[int],
    total: int | None,
    model: SigLIP2Encoder,
    processor: ImageProcessor,
    settings: ExtractSettings,
    decode: _Decode,
    num_workers: int,
    progress: bool | None,
    summary: ExtractSummary,
) -> None:
    """Decode ``inputs`` (each a row's first fields and its decoding task), encode them batch by batch and commit
    every ``shard_size`` of them as the next shard number from ``shards``."""
    started = time.monotonic()
    # Half precision keeps the patch and position embeddings in fp32 (and the pixels fed to them).
    device = run.ranks.device(settings.device)
    model = model.to(device=device).set_precision(DTYPES[settings.dtype]).eval()
    if settings.quantize is not None:
        model = quantize(model, settings.quantize)
    writer = ShardWriter(run.folder, DTYPES[settings.save_dtype], run_options(settings))
    stubs: deque[dict[str, Any]] = deque()  # the rows of the tasks the decoder has taken, in order

    def tasks() -> Iterator[Task]:
        for stub, task in inputs:
            stubs.append(stub)
            yield task

    decoded = _Decoder(decode, num_workers, ahead=2 * settings.batch_size)(tasks())
    show = (sys.stderr.isatty() if progress is None else progress) and run.ranks.main
    rows: list[dict[str, Any]] = []
    features: list[dict[str, torch.Tensor]] = []
    with tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True) as bar:
        while True:
            items = [item for _, item in zip(range(min(settings.batch_size, settings.shard_size - len(rows))), decoded)]
            batch_rows = [stubs.popleft() | _outcome(item) for item in items]
            good = [item for item in items if not isinstance(item, str)]
            if good:
                features += _encode(model, processor, good, settings, batch_rows, device)
            summary.failures += [(row["path"], row["error"]) for row in batch_rows if row["error"]]
            summary.done += len(good)
            summary.failed += len(items) - len(good)
            rows += batch_rows
            bar.update(len(items))
            bar.set_postfix(failed=summary.failed, refresh=False)
            if rows and (len(rows) == settings.shard_size or not items):
                writer.write(rows, features, next(shards))
                rows, features = [], []
            if not items:
                break
    summary.seconds = time.monotonic() - started


def _finish_run(run: _Run, summary: ExtractSummary, position: Callable[[dict[str, Any]], Any]) -> None:
    """After every rank's last commit, rank 0 writes the manifest (rows sorted by ``position``: input order) and
    counts the other ranks' failures."""
    run.ranks.barrier()
    if run.ranks.main:
        rows = read_rows(run.folder)
        write_manifest(run.folder, sorted(rows, key=position))
        failed = sum(r["status"] == "failed" for r in rows)
        summary.failed_elsewhere = failed - summary.failed - summary.failed_before


def _stub(source: str | VideoFrame) -> dict[str, Any]:
    """A row's first fields: the input's id, and for a video frame its video and time."""
    if isinstance(source, VideoFrame):
        return {"path": str(source), "video": source.path, "time": source.time}
    return {"path": source}


def expand_videos(paths: Sequence[str], settings: ExtractSettings) -> list[str | VideoFrame]:
    """``paths`` with every video file (by extension, :data:`~siglip2_encoder.data.video.VIDEO_EXTENSIONS`) replaced by
    the frames ``settings.video_fps`` / ``video_frames`` take from it (a video that cannot be opened becomes one
    failed input); unchanged when neither is set."""
    if settings.video_fps is None and settings.video_frames is None:
        return list(paths)
    out: list[str | VideoFrame] = []
    for path in paths:
        if Path(path).suffix.lower() in VIDEO_EXTENSIONS:
            out += expand_video(path, fps=settings.video_fps, num_frames=settings.video_frames)
        else:
            out.append(path)
    return out


def extract_features(
    paths: Sequence[str | VideoFrame],
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
) -> ExtractSummary:
    """Extract features of ``paths`` into the folder ``output`` (layout in :mod:`siglip2_encoder.pipeline.store`).

    Args:
        paths: image files (and video frames, see :func:`expand_videos`), in the order their rows take in the
            manifest.
        model, processor: the encoder (moved to ``settings.device`` / ``settings.dtype`` here) and its processor.
        settings: what to extract and how.
        resume: continue an interrupted run in ``output``: committed shards are kept, nothing done is redone.
        overwrite: replace an existing ``output``; without it or ``resume`` an existing output is an error.
        num_workers: worker processes decoding images while the model runs (0 = in this process, where a file that
            crashes its decoder ends the run).
        progress: show a progress bar; None = only when stderr is a terminal.
        ranks: the processes of a distributed job (``Ranks.from_env()`` under torchrun), all called with the same
            arguments: the inputs still to do are cut into blocks of ``shard_size``, block j going to rank
            j % world, written as shard ``first + j`` by whichever rank has it; rank 0 checks the folder first and
            writes the merged manifest last. The folder is the one a single process would write, shard for shard.

    Raises:
        ValueError: the folder is being written by another run, holds output (without ``resume`` or
            ``overwrite``), or holds a run with other settings; the ranks were given different inputs.
    """
    ranks = ranks or Ranks()
    names = [str(p) for p in paths]
    with _start_run(output, settings, ranks, resume=resume, overwrite=overwrite) as run:
        ranks.check_same(names, "inputs")
        done = {row["path"] for row in run.done_rows}
        pending = [p for p, name in zip(paths, names) if name not in done]
        size = settings.shard_size
        mine = [j for j in range(-(-len(pending) // size)) if ranks.owns(j)]
        inputs = ((_stub(pending[i]), i) for j in mine for i in range(j * size, min((j + 1) * size, len(pending))))
        summary = ExtractSummary(
            skipped=len(paths) - len(pending), failed_before=sum(r["status"] == "failed" for r in run.done_rows)
        )
        total = sum(min(size, len(pending) - j * size) for j in mine)
        decode = _Decode(pending, processor, settings)
        shards = (run.first + j for j in mine)
        _run_stream(run, inputs, shards, total, model, processor, settings, decode, num_workers, progress, summary)
        order = {name: i for i, name in enumerate(names)}
        _finish_run(run, summary, lambda row: order.get(row["path"], len(order)))
        return summary


def expand_tar_specs(specs: Sequence[str]) -> list[str]:
    """Tar shard specs -> shard URLs, in order: local paths, brace patterns (``shards-{000..099}.tar``), ``pipe:``
    commands and URLs that webdataset opens (``file://``, fsspec's schemes), expanded by webdataset."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise ImportError("tar shard input needs webdataset: pip install 'siglip2-encoder[webdataset]'") from None
    return [url for spec in specs for url in expand_urls(spec)]


def _tar_inputs(
    urls: Sequence[str], done: set[tuple[str, str]], extensions: frozenset[str]
) -> Iterator[tuple[dict[str, Any], Task]]:
    """(row fields, task) for every sample of the tar shards ``urls`` not in ``done`` ((tar, key) pairs), read by
    webdataset in order. A sample without an image member, or a shard that cannot be read (from where it breaks),
    becomes a failure."""
    import webdataset as wds

    for url in urls:
        broken: list[BaseException] = []
        samples = wds.WebDataset(  # the handler keeps the error and goes on with the next shard
            url,
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
            handler=lambda err, broken=broken: broken.append(err) or True,
        )
        for member, sample in enumerate(samples):
            key = sample["__key__"]
            if (url, key) in done:
                continue
            stub = {"path": key, "tar": url, "member": member}
            images = [name for name in sample if "." + name.rsplit(".", 1)[-1].lower() in extensions]
            if images:
                yield stub, (f"{url}:{key}.{images[0]}", sample[images[0]])
            else:
                others = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
                yield stub, f"{url}:{key}: the sample has no image member (it has {others})"
        if broken and (url, url) not in done:
            yield {"path": url, "tar": url, "member": None}, f"{url}: cannot read the tar shard: {broken[0]}"


def extract_tar_features(
    specs: Sequence[str],
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
) -> ExtractSummary:
    """:func:`extract_features` for WebDataset tar shards (streamed by the ``webdataset`` package, never unpacked).

    Each sample's first image member (by extension) is extracted; its row has the sample's key as ``path``, the
    shard URL as ``tar`` and its position in the shard as ``member``. A corrupt image, a sample without an image and
    a shard that breaks off are recorded as failures; the rest is extracted. Under torchrun shard URL i goes to
    rank i % world; ``resume`` skips the (tar, key) pairs already committed, with any number of ranks.

    Args:
        specs: shard specs (see :func:`expand_tar_specs`).
    """
    ranks = ranks or Ranks()
    urls = expand_tar_specs(specs)
    with _start_run(output, settings, ranks, resume=resume, overwrite=overwrite) as run:
        ranks.check_same(urls, "tar shards")
        done = {(row.get("tar"), row["path"]) for row in run.done_rows}
        mine = [url for i, url in enumerate(urls) if ranks.owns(i)]
        inputs = _tar_inputs(mine, done, image_extensions())
        summary = ExtractSummary(
            skipped=len(run.done_rows), failed_before=sum(r["status"] == "failed" for r in run.done_rows)
        )
        shards = (run.first + k * ranks.world + ranks.rank for k in itertools.count())
        decode = _Decode([], processor, settings)
        _run_stream(run, inputs, shards, None, model, processor, settings, decode, num_workers, progress, summary)
        order = {url: i for i, url in enumerate(urls)}

        def position(row: dict[str, Any]) -> tuple[int, float]:
            member = row.get("member")
            return order.get(row.get("tar"), len(order)), member if member is not None else float("inf")

        _finish_run(run, summary, position)
        return summary


def _encode(
    model: SigLIP2Encoder,
    processor: ImageProcessor,
    items: list[ProcessedImage],
    settings: ExtractSettings,
    rows: list[dict[str, Any]],
    device: str,
) -> list[dict[str, torch.Tensor]]:
    """Run one batch; returns each image's features and fills in the ok rows' grids."""
    inputs = processor.collate(items).to(device, model.dtype)
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
    the layout of :func:`extract_features`, one ``pooled`` (n, D) per shard, rows ``{"text": ..., "status": "ok",
    "shard": ..., "row": ...}`` in input order (repeated texts keep their own rows).

    ``resume`` continues after the committed rows, which must be the first texts of ``texts``, in order.
    """
    if tokenizer.lowercase != settings.lowercase:
        raise ValueError(f"the tokenizer lowercases={tokenizer.lowercase}, the settings say {settings.lowercase}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}; texts must be strings")
    folder = Path(output)
    with sole_writer(folder):
        done_rows = _prepare_output(folder, settings, resume=resume, overwrite=overwrite)
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
