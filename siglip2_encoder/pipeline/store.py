"""The on-disk layout of extracted features: safetensors shards plus a JSON-lines manifest.

    out/
      run.json               settings of the run (model, features, dtype, ...; and its working directory); a resumed
                             run must match the settings that identify its features
      shard-00000.safetensors features of a block of inputs
      shard-00000.jsonl      one row per input of that block: the shard's commit record
      ...
      manifest.jsonl         all rows in input order, written when a run ends
      .lock                  held (flock) by the one run writing the folder; names its process

A shard is committed by renaming its ``.jsonl`` into place after its ``.safetensors``; both are written to a
temporary file first, flushed to disk before the rename, and the folder after it (:func:`~siglip2_encoder.files.
write_atomic`). A crash or power loss therefore leaves only whole, committed shards, plus at most one uncommitted
``.safetensors`` and temporary files, which a resumed run deletes and redoes.

A folder of text embeddings (``embed-text``) has the same layout, ``"inputs": "texts"`` in ``run.json`` and rows
with ``text`` where image rows have ``path``.

Each shard holds ``pooled`` (n, D) for the n images that succeeded (and ``caption_pooled`` (n, D), their captions'
text features, when captions were extracted from tar shards), and for token features (``last_hidden_state``,
``hidden_state_<layer>``) the tokens of all n images packed as (sum of h*w, D), with ``token_offsets`` (n + 1,)
marking where each image's tokens start.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import Arg, ArgumentError
from ..files import write_atomic

__all__ = [
    "ExtractedFeatures",
    "ShardWriter",
    "TEXT_INPUTS",
    "close_inherited_locks",
    "committed_rows",
    "has_output",
    "next_shard_index",
    "prepare_output",
    "read_rows",
    "sole_writer",
    "write_manifest",
]

RUN_FILE = "run.json"
TEXT_INPUTS = "texts"  # run.json's "inputs" of a folder of text embeddings (``embed-text``); absent: images
MANIFEST = "manifest.jsonl"
SHARD_GLOB = "shard-*.jsonl"
LOCK_FILE = ".lock"
RESUME, OVERWRITE = Arg("resume", "resume=True"), Arg("overwrite", "overwrite=True")
_held_locks: set[int] = set()  # descriptors of the locks this process holds


@contextmanager
def sole_writer(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the block: a second writer is refused, naming the process that writes.

    The lock is ``flock`` on ``.lock``: the system releases it when the process ends, however it ends. A forked
    child shares it until it closes its copy of the descriptor: worker processes call :func:`close_inherited_locks`
    first, so that a killed run's workers cannot keep its folder locked.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    _held_locks.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ArgumentError(
                f"{folder} is being written by another extract run (process {other}); wait for it to end, or write "
                f"to another ",
                Arg("output", "output"),
                " folder",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)


def close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors (the parent keeps its locks)."""
    for fd in list(_held_locks):
        os.close(fd)
    _held_locks.clear()


def has_output(folder: Path) -> bool:
    """True if the folder holds anything but its lock and temporary files of an interrupted write."""
    return folder.is_dir() and any(p.name != LOCK_FILE and not _temporary(p) for p in folder.iterdir())


def _temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """Rows of every committed shard, in shard order (nothing is changed)."""
    rows = []
    for record in sorted(folder.glob(SHARD_GLOB)):
        rows.extend(json.loads(line) for line in record.read_text().splitlines() if line)
    return rows


def committed_rows(folder: Path) -> list[dict[str, Any]]:
    """Rows of every committed shard, in shard order; removes uncommitted leftovers of a crashed run."""
    rows = read_rows(folder)
    committed = {r["shard"] for r in rows if r["shard"]}
    for leftover in [*folder.glob("shard-*.safetensors"), *folder.glob(".*.tmp")]:
        if _temporary(leftover) or leftover.name not in committed:
            leftover.unlink()
    return rows


def prepare_output(
    folder: Path, record: dict[str, Any], identity: dict[str, Any], *, resume: bool, overwrite: bool
) -> list[dict[str, Any]]:
    """Check the (locked) output folder and start or continue its run; returns the rows already committed.

    Args:
        record: the run's settings, written as ``run.json`` when the run starts.
        identity: the part of ``record`` that identifies the features; a resumed run must match it (the rest, how
            the job runs, may change).
        resume, overwrite: continue the run in ``folder`` / replace what it holds; without either, a folder with
            output is refused.

    A folder holding only temporary files of an interrupted write (a kill before ``run.json`` was renamed into
    place, say) counts as empty, so every interruption leaves a folder that a plain run or ``resume`` accepts.
    """
    if has_output(folder):
        if resume:
            if not (folder / RUN_FILE).is_file():
                raise ValueError(f"{folder} is not an extraction folder (no {RUN_FILE}); cannot resume into it")
            previous = json.loads((folder / RUN_FILE).read_text())
            changed = sorted(k for k, v in identity.items() if json.loads(json.dumps(v)) != previous.get(k))
            if changed:
                detail = ", ".join(f"{k}: {previous.get(k)!r} -> {identity[k]!r}" for k in changed)
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
    write_atomic(folder / RUN_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    return []


class ShardWriter:
    """Collects per-image features and writes them as numbered shards, each recording ``run`` (how it was computed:
    device, batch size) in its safetensors metadata."""

    def __init__(self, folder: Path, dtype: torch.dtype, run: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.dtype = dtype
        self.run = dict(run or {})
        self.next_index = next_shard_index(folder)

    def write(
        self, rows: list[dict[str, Any]], features: list[dict[str, torch.Tensor]], index: int | None = None
    ) -> None:
        """Commit one shard: number ``index`` (the ranks of a distributed run number their blocks), or the next.

        Args:
            rows: manifest rows for every input of the block, in input order; rows with ``status == "ok"`` get their
                ``shard`` and ``row`` filled in here, in the order of ``features``.
            features: for each successful input, name -> tensor: vectors (D,) such as ``pooled`` and
                ``caption_pooled``, stored stacked (n, D); token features (h * w, D), stored packed.
        """
        index = self.next_index if index is None else index
        name = f"shard-{index:05d}"
        ok = [row for row in rows if row["status"] == "ok"]
        if len(ok) != len(features):
            raise ValueError(f"{len(ok)} successful rows but {len(features)} feature sets")
        for i, row in enumerate(ok):
            row["shard"], row["row"] = f"{name}.safetensors", i
        if features:
            tensors: dict[str, torch.Tensor] = {}
            for key in features[0]:
                parts = [f[key].to(self.dtype).cpu() for f in features]
                vector = parts[0].ndim == 1  # one (D,) vector per input, or (tokens, D) per input
                tensors[key] = torch.stack(parts) if vector else torch.cat(parts)
                if not vector and "token_offsets" not in tensors:
                    counts = torch.tensor([0] + [len(p) for p in parts])
                    tensors["token_offsets"] = counts.cumsum(0)
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            target = self.folder / f"{name}.safetensors"
            try:
                write_atomic(target, lambda tmp: save_file(tensors, tmp, metadata=self.run or None))
            except SafetensorError as err:  # safetensors reports a full disk or a failed write this way
                raise OSError(f"cannot write {target}: {err}") from None
        write_atomic(self.folder / f"{name}.jsonl", _jsonl(rows))  # the commit
        self.next_index = max(self.next_index, index + 1)


def next_shard_index(folder: Path) -> int:
    """One past the highest committed shard number: ranks commit out of order, so counting would reuse a name."""
    return max((int(p.name[len("shard-") : -len(".jsonl")]) + 1 for p in folder.glob(SHARD_GLOB)), default=0)


def write_manifest(folder: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(folder / MANIFEST, _jsonl(rows))


@dataclass
class ExtractedFeatures:
    """Read access to an extraction folder.

    Attributes:
        folder: the output folder.
        settings: the run's ``run.json``.
        rows: one manifest row per input, in input order (``status`` "ok" or "failed").
    """

    folder: Path
    settings: dict[str, Any]
    rows: list[dict[str, Any]]

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ExtractedFeatures:
        folder = Path(folder)
        if not (folder / RUN_FILE).is_file():
            raise ValueError(f"{folder} is not an extraction folder (no {RUN_FILE}); run `siglip2-encoder extract`")
        rows = read_rows(folder)
        if (folder / MANIFEST).is_file():  # input order, which a resumed distributed run's shard order is not
            order = {line: i for i, line in enumerate((folder / MANIFEST).read_text().splitlines())}
            rows.sort(key=lambda row: order.get(json.dumps(row), len(order)))
        return cls(folder, json.loads((folder / RUN_FILE).read_text()), rows)

    @property
    def working_dir(self) -> Path | None:
        """The directory the extraction ran in, against which relative input paths resolve (None: a folder written
        before 0.2.0, which did not record it)."""
        folder = self.settings.get("working_dir")
        return Path(folder) if folder else None

    @property
    def inputs(self) -> str:
        """ "images" (a folder written by ``extract``) or "texts" (``embed-text``)."""
        return self.settings.get("inputs", "images")

    def name(self, row: dict[str, Any]) -> str:
        """What a row stands for: its image's path, or its text."""
        return row["text"] if self.inputs == TEXT_INPUTS else row["path"]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] == "ok"]

    def _row(self, path: str) -> dict[str, Any]:
        for row in self.rows:
            if row["path"] == path:
                if row["status"] != "ok":
                    raise ValueError(f"{path} failed during extraction: {row['error']}")
                return row
        raise KeyError(f"{path} is not in {self.folder}")

    def shard_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Shard file -> its successful rows, in the order :meth:`iter_shards` reads them (no feature file opened)."""
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for row in self.ok:
            by_shard.setdefault(row["shard"], []).append(row)
        return by_shard

    def iter_shards(self, name: str) -> Iterator[tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor | None]]:
        """(rows, tensor, token_offsets) per shard for feature ``name``."""
        for shard, rows in self.shard_rows().items():
            with safe_open(self.folder / shard, framework="pt") as f:
                if name not in f.keys():
                    raise KeyError(f"feature {name!r} was not extracted; available: {sorted(f.keys())}")
                offsets = f.get_tensor("token_offsets") if "token_offsets" in f.keys() else None
                yield rows, f.get_tensor(name), offsets

    def dimension(self, name: str = "pooled") -> int:
        """The width D of feature ``name``."""
        for row in self.ok:
            with safe_open(self.folder / row["shard"], framework="pt") as f:
                if name not in f.keys():
                    raise KeyError(f"feature {name!r} was not extracted; available: {sorted(f.keys())}")
                return f.get_slice(name).get_shape()[-1]
        raise ValueError(f"{self.folder} holds no features")

    def pooled(self) -> tuple[list[str], torch.Tensor]:
        """Paths (texts, for text embeddings) of the successful inputs and their pooled features (n, D), in input
        order."""
        paths, parts = [], []
        for rows, tensor, _ in self.iter_shards("pooled"):
            paths += [self.name(row) for row in rows]
            parts.append(tensor)
        return paths, torch.cat(parts) if parts else torch.empty(0)

    def tokens(self, path: str, name: str = "last_hidden_state") -> torch.Tensor:
        """One image's tokens (h * w, D) of feature ``name`` (e.g. ``"hidden_state_-2"``)."""
        row = self._row(path)
        with safe_open(self.folder / row["shard"], framework="pt") as f:
            if name not in f.keys():
                raise KeyError(f"feature {name!r} was not extracted; available: {sorted(f.keys())}")
            offsets = f.get_tensor("token_offsets")
            return f.get_slice(name)[int(offsets[row["row"]]) : int(offsets[row["row"] + 1])]

    def feature_map(self, path: str, name: str = "last_hidden_state") -> torch.Tensor:
        """One image's tokens as a (D, h, w) map."""
        h, w = self._row(path)["grid"]
        return self.tokens(path, name).T.reshape(-1, h, w)
