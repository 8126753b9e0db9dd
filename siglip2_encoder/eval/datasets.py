"""Labelled image sets for evaluation: a folder per class (torchvision's ImageFolder layout), a table of (path,
label) rows (CSV with a header, or JSON lines), or WebDataset shards in CLIP_benchmark's layout (:mod:`.shards`),
with a fingerprint that says which images and labels a result was measured on."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.images import image_extensions
from .shards import is_shard_spec, open_shards, shard_sizes

__all__ = ["LabelledImages", "fingerprint", "load_labelled"]


def fingerprint(paths: Sequence[str], annotations: Sequence[Any], header: Any) -> str:
    """sha256 of ``header`` (JSON) and every (path, its annotation, file size): equal fingerprints, equal data
    (sizes catch a replaced file without reading it)."""
    digest = hashlib.sha256(json.dumps(header).encode())
    for path, annotation in zip(paths, annotations):
        size = os.stat(path).st_size if os.path.isfile(path) else -1
        digest.update(f"{path}\t{json.dumps(annotation)}\t{size}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class LabelledImages:
    """Images with one class each.

    Attributes:
        paths: image files, or with ``shards`` the samples' ids (:func:`~.shards.sample_id`).
        labels: each image's class, an index into ``classes``.
        classes: class names, in label order (what zero-shot encodes).
        shards: the WebDataset shards holding the images (empty: ``paths`` are files).
        named: False when ``classes`` are only the label indices (shards without ``classnames.txt``): zero-shot
            refuses them.
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    shards: tuple[str, ...] = ()
    named: bool = True

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if not self.paths:
            raise ValueError("no labelled images")
        bad = [label for label in self.labels if not 0 <= label < len(self.classes)]
        if bad:
            raise ValueError(f"labels must index the {len(self.classes)} classes, got {sorted(set(bad))[:5]}")

    def fingerprint(self) -> str:
        """:func:`fingerprint` of the images with their labels and the class names (and the shards' sizes)."""
        header = [self.classes, shard_sizes(self.shards)]
        return fingerprint(self.paths, self.labels, header if self.shards else self.classes)

    def with_classes(self, names: list[str]) -> LabelledImages:
        """The same images with the class names ``names`` (e.g. readable names for WordNet ids), in label order."""
        if len(names) != len(self.classes):
            raise ValueError(f"{len(names)} class names for {len(self.classes)} classes; give one per class, in order")
        return LabelledImages(self.paths, self.labels, tuple(names), self.shards)


def _image_folder(root: Path) -> LabelledImages:
    """A sub-folder per class, sorted by name (torchvision's ImageFolder order); image files below each."""
    extensions = image_extensions()
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders; the layout is ROOT/<class>/<image>")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for folder, subfolders, files in os.walk(root / name, followlinks=True):
            subfolders.sort()
            for file in sorted(files):
                if Path(file).suffix.lower() in extensions:
                    paths.append(os.path.join(folder, file))
                    labels.append(label)
    return LabelledImages(tuple(paths), tuple(labels), tuple(classes))


def _table(file: Path) -> LabelledImages:
    """Rows with ``path`` and ``label`` (a class name); classes sorted by name; relative paths resolve against the
    table's folder."""
    if file.suffix == ".csv":
        with file.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"path", "label"} <= row.keys():
            raise ValueError(f"{file} row {i + 1}: each row needs 'path' and 'label', got {row!r}"[:300])
    classes = sorted({str(row["label"]) for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    paths = tuple(str(file.parent / row["path"]) for row in rows)
    return LabelledImages(paths, tuple(index[str(row["label"])] for row in rows), tuple(classes))


def _shards(spec: str | os.PathLike) -> LabelledImages:
    """Samples with an image and a ``cls`` member (the label index, as text); classes from ``classnames.txt`` beside
    the split folder, else unnamed (the indices)."""
    shards = open_shards(spec)
    ids, labels = [], []
    for sample, data in shards.samples("cls"):
        try:
            labels.append(int(data.decode().strip()))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{sample}: the cls member must hold a class index, got {data[:20]!r}") from None
        ids.append(sample)
    names = shards.class_names()
    if names is None:
        classes, named = tuple(str(i) for i in range(max(labels, default=-1) + 1)), False
    else:
        classes, named = tuple(names), True
    return LabelledImages(tuple(ids), tuple(labels), classes, shards.urls, named)


def load_labelled(spec: str | os.PathLike, class_names: str | os.PathLike | None = None) -> LabelledImages:
    """A folder per class, a ``.csv`` / ``.jsonl`` table, or WebDataset shards (a split folder of CLIP_benchmark's
    layout or shard specs, see :mod:`.shards`); ``class_names``: a text file with one readable name per class, in
    label order (sorted folder or label names, or the label indices), to encode instead of the folder or label names
    (or the shards' ``classnames.txt``)."""
    path = Path(spec)
    if is_shard_spec(spec):
        data = _shards(spec)
    elif path.is_dir():
        data = _image_folder(path)
    elif path.is_file() and path.suffix in (".csv", ".jsonl"):
        data = _table(path)
    else:
        raise ValueError(
            f"{spec}: give a folder per class (ROOT/<class>/<image>), a .csv / .jsonl of path,label or WebDataset "
            f"shards (a split folder of .tar files, or shards-{{000..009}}.tar)"
        )
    if class_names is not None:
        names = [line.strip() for line in Path(class_names).read_text().splitlines() if line.strip()]
        data = data.with_classes(names)
    return data
