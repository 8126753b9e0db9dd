"""Where an extraction's images come from: files (folders, glob patterns, file lists, video frames) or WebDataset tar
shards. A source says which inputs a rank does, in which shards, what each input's manifest row starts with, and
the input order the final manifest follows; it decodes nothing (that is :mod:`.decoding` and :mod:`.extract`).

Each input becomes a task for the decoding workers: a path, a :class:`~siglip2_encoder.data.video.VideoFrame`, a
:class:`TarMember` (its bytes travel with it), or :class:`Failed` (an input known to be unusable before decoding).
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..data.images import image_extensions
from ..data.video import VIDEO_EXTENSIONS, VideoFrame, expand_video
from .distributed import Ranks

__all__ = [
    "Failed",
    "FileSource",
    "InputSource",
    "Share",
    "TarMember",
    "TarSource",
    "Task",
    "discover_inputs",
    "expand_tar_specs",
    "expand_videos",
    "read_file_list",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TarMember:
    """An image member of a tar sample: ``name`` (``url:key.ext``, its id in messages) and its encoded bytes."""

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Failed:
    """An input that failed before decoding (a tar sample without an image, a shard that broke off): its reason."""

    reason: str

    def __str__(self) -> str:
        return self.reason


Task = str | VideoFrame | TarMember | Failed


@dataclass
class Share:
    """One rank's part of a job: ``inputs`` (each a row's first fields and its task, read lazily), the shard numbers
    its blocks are committed as, how many inputs it has (None: unknown before reading, as for tar streams), and how
    many inputs of the whole job an earlier run has done."""

    inputs: Iterator[tuple[dict[str, Any], Task]]
    shards: Iterator[int]
    total: int | None
    skipped: int


@runtime_checkable
class InputSource(Protocol):
    """What :func:`~siglip2_encoder.pipeline.extract.extract` needs of its inputs."""

    captions: bool  # every row it gives an image for carries its text as ``caption``

    def check_same(self, ranks: Ranks) -> None:
        """Refuse ranks that were given different inputs."""

    def share(self, done_rows: list[dict[str, Any]], ranks: Ranks, shard_size: int, first: int) -> Share:
        """This rank's inputs that are not in ``done_rows``, committed from shard number ``first`` on."""

    def position(self, row: dict[str, Any]) -> Any:
        """A row's sort key in the final manifest: the input order."""


def _stub(source: str | VideoFrame) -> dict[str, Any]:
    """A row's first fields: the input's id, and for a video frame its video and time."""
    if isinstance(source, VideoFrame):
        return {"path": str(source), "video": source.path, "time": source.time}
    return {"path": source}


@dataclass
class FileSource:
    """Image files (and video frames, see :func:`expand_videos`), in the order their rows take in the manifest.

    The inputs still to do are cut into blocks of ``shard_size``; block j goes to rank j % world and is written as
    shard ``first + j``, so the folder is the one a single process would write, shard for shard."""

    paths: Sequence[str | VideoFrame]
    captions = False  # files come without texts

    def __post_init__(self) -> None:
        self.names = [str(p) for p in self.paths]
        self.order = {name: i for i, name in enumerate(self.names)}

    def check_same(self, ranks: Ranks) -> None:
        ranks.check_same(self.names, "inputs")

    def share(self, done_rows: list[dict[str, Any]], ranks: Ranks, shard_size: int, first: int) -> Share:
        done = {row["path"] for row in done_rows}
        pending = [p for p, name in zip(self.paths, self.names) if name not in done]
        mine = [j for j in range(-(-len(pending) // shard_size)) if ranks.owns(j)]
        blocks = [pending[j * shard_size : (j + 1) * shard_size] for j in mine]
        inputs = ((_stub(p), p) for block in blocks for p in block)
        total = sum(map(len, blocks))
        return Share(inputs, (first + j for j in mine), total, skipped=len(self.paths) - len(pending))

    def position(self, row: dict[str, Any]) -> int:
        return self.order.get(row["path"], len(self.order))


@dataclass
class TarSource:
    """WebDataset tar shards, streamed by the ``webdataset`` package (never unpacked).

    Each sample's first image member (by extension) is its input; its row has the sample's key as ``path``, the
    shard URL as ``tar`` and its position in the shard as ``member``, and its caption as ``caption`` (the ``txt``
    member, else a ``json`` member's ``"caption"``; None without either). A sample without an image and a shard that
    breaks off become failures. Shard URL i goes to rank i % world; a resumed run skips the (tar, key) pairs
    already committed, with any number of ranks.

    Args:
        specs: shard specs (see :func:`expand_tar_specs`).
        captions: the captions are extracted too (clip-retrieval's image-caption pairs): a sample without one is
            then a failure, so that every extracted image has its text.
    """

    specs: Sequence[str]
    captions: bool = False

    def __post_init__(self) -> None:
        self.urls = expand_tar_specs(self.specs)
        self.order = {url: i for i, url in enumerate(self.urls)}

    def check_same(self, ranks: Ranks) -> None:
        ranks.check_same(self.urls, "tar shards")

    def share(self, done_rows: list[dict[str, Any]], ranks: Ranks, shard_size: int, first: int) -> Share:
        done = {(row.get("tar"), row["path"]) for row in done_rows}
        mine = [url for i, url in enumerate(self.urls) if ranks.owns(i)]
        shards = (first + k * ranks.world + ranks.rank for k in itertools.count())
        inputs = _tar_inputs(mine, done, image_extensions(), self.captions)
        return Share(inputs, shards, None, skipped=len(done_rows))

    def position(self, row: dict[str, Any]) -> tuple[int, float]:
        member = row.get("member")
        return self.order.get(row.get("tar"), len(self.order)), member if member is not None else float("inf")


def expand_tar_specs(specs: Sequence[str]) -> list[str]:
    """Tar shard specs -> shard URLs, in order: local paths, brace patterns (``shards-{000..099}.tar``), ``pipe:``
    commands and URLs that webdataset opens (``file://``, fsspec's schemes), expanded by webdataset."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise ImportError("tar shard input needs webdataset: pip install 'siglip2-encoder[webdataset]'") from None
    return [url for spec in specs for url in expand_urls(spec)]


def _caption(sample: dict[str, Any]) -> str | None:
    """A WebDataset sample's caption: its ``txt`` member (UTF-8), else its ``json`` member's ``"caption"``."""
    try:
        if isinstance(sample.get("txt"), bytes):
            return sample["txt"].decode("utf-8")
        if isinstance(sample.get("json"), bytes):
            caption = json.loads(sample["json"]).get("caption")
            return caption if isinstance(caption, str) else None
    except (UnicodeDecodeError, ValueError, AttributeError):  # undecodable text, invalid JSON, a JSON list
        return None
    return None


def _tar_inputs(
    urls: Sequence[str], done: set[tuple[str, str]], extensions: frozenset[str], captions: bool
) -> Iterator[tuple[dict[str, Any], Task]]:
    """(row fields, task) for every sample of the tar shards ``urls`` not in ``done`` ((tar, key) pairs), read by
    webdataset in order. A sample without an image member (with ``captions``: or without a caption), or a shard that
    cannot be read (from where it breaks), becomes a failure."""
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
            stub = {"path": key, "tar": url, "member": member, "caption": _caption(sample)}
            images = [name for name in sample if "." + name.rsplit(".", 1)[-1].lower() in extensions]
            others = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
            if not images:
                yield stub, Failed(f"{url}:{key}: the sample has no image member (it has {others})")
            elif captions and stub["caption"] is None:
                yield (
                    stub,
                    Failed(
                        f"{url}:{key}: the sample has no caption (a txt member, or json with a 'caption'; it has "
                        f"{others}); extract without captions to take its image alone"
                    ),
                )
            else:
                yield stub, TarMember(f"{url}:{key}.{images[0]}", sample[images[0]])
        if broken and (url, url) not in done:
            yield {"path": url, "tar": url, "member": None}, Failed(f"{url}: cannot read the tar shard: {broken[0]}")


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


def expand_videos(
    paths: Sequence[str], *, fps: float | None = None, num_frames: int | None = None
) -> list[str | VideoFrame]:
    """``paths`` with every video file (by extension, :data:`~siglip2_encoder.data.video.VIDEO_EXTENSIONS`) replaced by
    the frames taken every ``1 / fps`` seconds, or ``num_frames`` evenly spaced (a video that cannot be opened becomes
    one failed input); unchanged when neither is set."""
    if fps is None and num_frames is None:
        return list(paths)
    out: list[str | VideoFrame] = []
    for path in paths:
        if Path(path).suffix.lower() in VIDEO_EXTENSIONS:
            out += expand_video(path, fps=fps, num_frames=num_frames)
        else:
            out.append(path)
    return out
