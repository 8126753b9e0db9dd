"""WebDataset shards as evaluation data, in CLIP_benchmark's layout (``clip_benchmark_export_wds``, the ``wds_*``
datasets on the Hugging Face Hub)::

    DATASET/classnames.txt                            one class name per line, in label order
    DATASET/zeroshot_classification_templates.txt     (pass it as --templates to use it)
    DATASET/test/nshards.txt, DATASET/test/0.tar, ...  samples: an image (webp/png/jpg) + ``cls`` (its label index)
                                                       or, for retrieval, + ``txt`` (its captions, one per line)

A split folder (``DATASET/test``) or shard specs (``shards-{000..009}.tar``) name the data; the images are read by
``extract``'s :class:`~siglip2_encoder.pipeline.sources.TarSource`, and each sample is known by its id
``"<shard url>:<key>"`` (:func:`sample_id`), as ``extract``'s manifest rows name it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pipeline.sources import expand_tar_specs

__all__ = ["ShardSet", "is_shard_spec", "open_shards", "sample_id", "shard_sizes"]


def sample_id(row: dict[str, Any]) -> str:
    """The id of an ``extract`` manifest row: ``"<shard url>:<key>"`` for a tar sample, else the image's path."""
    return f"{row['tar']}:{row['path']}" if row.get("tar") is not None else row["path"]


@dataclass(frozen=True)
class ShardSet:
    """Shards of one split: their URLs, and the folder holding ``classnames.txt`` (None: shard specs given)."""

    urls: tuple[str, ...]
    metadata: Path | None

    def samples(self, wanted: str) -> Iterator[tuple[str, bytes]]:
        """(sample id, the bytes of its ``wanted`` member) for every sample, in shard order.

        Raises:
            ValueError: a sample lacks the member, or a shard cannot be read (the evaluation would leave out an
                unknown part of the data).
        """
        import webdataset as wds

        for url in self.urls:
            broken: list[BaseException] = []
            samples = wds.WebDataset(  # the handler keeps the error so that it is raised with the shard's name
                url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
                handler=lambda err, broken=broken: broken.append(err) or False,
            )  # fmt: skip
            for sample in samples:
                if not isinstance(sample.get(wanted), bytes):
                    members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
                    raise ValueError(f"{url}:{sample['__key__']}: no {wanted!r} member (it has {members})")
                yield f"{url}:{sample['__key__']}", sample[wanted]
            if broken:
                raise ValueError(f"{url}: cannot read the tar shard: {broken[0]}")

    def class_names(self) -> list[str] | None:
        """The lines of ``classnames.txt`` beside the split folder (CLIP_benchmark's), None without one."""
        file = self.metadata / "classnames.txt" if self.metadata is not None else None
        if file is None or not file.is_file():
            return None
        return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def shard_sizes(urls: tuple[str, ...]) -> dict[str, int]:
    """Each shard's size in bytes (-1: not a local file), for fingerprints."""
    return {url: os.stat(url).st_size if os.path.isfile(url) else -1 for url in urls}


def _split_shards(folder: Path) -> list[str]:
    """The shards of a split folder: 0 .. nshards-1 (``nshards.txt``), else every ``*.tar``, sorted."""
    count = folder / "nshards.txt"
    if count.is_file():
        return [str(folder / f"{i}.tar") for i in range(int(count.read_text().strip()))]
    return sorted(str(path) for path in folder.glob("*.tar"))


def _holds_shards(folder: Path) -> bool:
    return (folder / "nshards.txt").is_file() or any(folder.glob("*.tar"))


def _splits(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _holds_shards(p))


def is_shard_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names WebDataset shards: a split folder holding ``*.tar`` or ``nshards.txt`` (or a dataset
    folder of such splits, which :func:`open_shards` refuses, naming them), a ``.tar`` file, a brace pattern, a
    ``pipe:`` command or a URL."""
    text, path = str(spec), Path(spec)
    if path.is_dir():
        return _holds_shards(path) or bool(_splits(path))
    return text.endswith(".tar") or "{" in text or text.startswith("pipe:") or "://" in text


def open_shards(spec: str | os.PathLike) -> ShardSet:
    """The :class:`ShardSet` of a split folder or shard specs (see :func:`is_shard_spec`).

    Raises:
        ValueError: a dataset folder was given instead of its split folder, or the spec names no shard.
    """
    path = Path(spec)
    splits = _splits(path) if path.is_dir() and not _holds_shards(path) else []
    if splits:
        raise ValueError(f"{spec} holds the splits {', '.join(splits)}: give one, e.g. {path / splits[0]}")
    if path.is_dir():
        urls, metadata = _split_shards(path), path.parent
    else:
        urls, metadata = expand_tar_specs([str(spec)]), None
    if not urls:
        raise ValueError(f"{spec} names no tar shard")
    return ShardSet(tuple(urls), metadata)
