"""Image-text retrieval recall, counted as CLIP_benchmark and big_vision count it: an image with several captions
is one image query (hit when any of its captions is in the top k) and each caption one text query (hit when its
image is in the top k); ``image_retrieval_recall@k`` is over the captions (text -> image), ``text_retrieval_recall@k``
over the images (image -> text).

Captions go through the model's text preprocessing only, as big_vision's retrieval evaluators feed them (for
SigLIP 2: lowercased, punctuation kept). Image features are cached in an ``extract`` folder, as for zero-shot.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.tokenizer import TextTokenizer
from ..models.joint import SigLIP2Model
from .datasets import fingerprint
from .features import DEFAULT_ENCODING, Encoding, image_features, versions
from .shards import is_shard_spec, open_shards, shard_sizes

__all__ = ["CaptionedImages", "evaluate_retrieval", "load_captioned", "retrieval_metrics"]

RECALL_AT = (1, 5, 10)


@dataclass(frozen=True)
class CaptionedImages:
    """Images with one or more captions each: ``captions[i]`` are image i's."""

    paths: tuple[str, ...]
    captions: tuple[tuple[str, ...], ...]
    shards: tuple[str, ...] = ()  # the WebDataset shards holding the images, whose sample ids ``paths`` then are

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.captions) or not self.paths:
            raise ValueError(
                f"{len(self.paths)} images and {len(self.captions)} caption lists: give one list per image"
            )
        empty = [path for path, texts in zip(self.paths, self.captions) if not texts]
        if empty:
            raise ValueError(f"{len(empty)} images have no caption, e.g. {empty[0]}")

    def fingerprint(self) -> str:
        """:func:`~.datasets.fingerprint` of the images with their captions (and the shards' sizes)."""
        header = ["captions", shard_sizes(self.shards)]
        return fingerprint(self.paths, self.captions, header if self.shards else "captions")


def _shard_captions(spec: str | os.PathLike) -> CaptionedImages:
    """Samples with an image and a ``txt`` member holding its captions, one per line (CLIP_benchmark's retrieval
    shards)."""
    shards = open_shards(spec)
    ids, captions = [], []
    for sample, data in shards.samples("txt"):
        try:
            captions.append(tuple(data.decode("utf-8").splitlines()))  # as CLIP_benchmark reads them
        except UnicodeDecodeError:
            raise ValueError(f"{sample}: the txt member is not UTF-8 text") from None
        ids.append(sample)
    return CaptionedImages(tuple(ids), tuple(captions), shards.urls)


def load_captioned(annotations: str | os.PathLike, images: str | os.PathLike | None = None) -> CaptionedImages:
    """Captions from COCO's captions JSON (``images`` with ``id`` / ``file_name``, ``annotations`` with ``image_id``
    / ``caption``), a JSON list of ``{"image": path, "caption": text or [texts]}`` (the Karpathy-split files of
    COCO and Flickr30k as BLIP and LAVIS ship them), JSON lines of such rows (several rows per image allowed), or
    WebDataset shards whose ``txt`` members hold each image's captions, one per line (CLIP_benchmark's layout, see
    :mod:`.shards`). Relative image paths resolve against ``images`` (default: the annotation file's folder)."""
    if is_shard_spec(annotations):
        if images is not None:
            raise ValueError(f"the shards {annotations} hold their images; images={images!r} applies to JSON files")
        return _shard_captions(annotations)
    file = Path(annotations)
    root = Path(images) if images is not None else file.parent
    text = file.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if file.suffix == ".jsonl" else None
    if rows is None:
        loaded = json.loads(text)
        if isinstance(loaded, dict) and {"images", "annotations"} <= loaded.keys():
            names = {image["id"]: image["file_name"] for image in loaded["images"]}
            rows = [{"image": names[a["image_id"]], "caption": a["caption"]} for a in loaded["annotations"]]
        else:
            rows = loaded
    if not isinstance(rows, list):
        raise ValueError(f"{file}: expected COCO captions, a list of image/caption rows, or JSON lines of them")
    grouped: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise ValueError(f"{file} row {i + 1}: each row needs 'image' and 'caption'")
        captions = [row["caption"]] if isinstance(row["caption"], str) else list(row["caption"])
        grouped.setdefault(str(root / row["image"]), []).extend(captions)
    return CaptionedImages(tuple(grouped), tuple(tuple(c) for c in grouped.values()))


def _top(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """(Q, k) the ids of each query's k best keys, best first, scoring one chunk of queries at a time."""
    out = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.T  # (chunk, K)
        out.append(scores.topk(min(k, keys.shape[0]), dim=1).indices)
    return torch.cat(out)


def retrieval_metrics(
    images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, recall_at: Sequence[int] = RECALL_AT
) -> dict[str, float]:
    """Recall@k both ways for L2-normalised ``images`` (I, D) and ``texts`` (T, D), caption t belonging to image
    ``text_image[t]``: ``image_retrieval_recall@k`` (per caption: its image in the top k images) and
    ``text_retrieval_recall@k`` (per image: any of its captions in the top k captions). Memory: one chunk of scores
    at a time, never the whole (T, I) matrix."""
    top = max(recall_at)
    images_of_texts = _top(texts, images, top)  # (T, top) image ids
    texts_of_images = _top(images, texts, top)  # (I, top) text ids
    text_hits = images_of_texts == text_image[:, None]
    image_hits = text_image[texts_of_images] == torch.arange(len(images))[:, None]
    metrics = {}
    for k in recall_at:
        metrics[f"image_retrieval_recall@{k}"] = int(text_hits[:, :k].any(1).sum()) / len(texts)
        metrics[f"text_retrieval_recall@{k}"] = int(image_hits[:, :k].any(1).sum()) / len(images)
    return metrics


def _embed_texts(
    model: SigLIP2Model, tokenizer: TextTokenizer, texts: list[str], batch_size: int, progress: bool | None
) -> torch.Tensor:
    parts = []
    show = sys.stderr.isatty() if progress is None else progress
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), unit="batch", desc="captions", disable=not show):
            tokens = tokenizer(texts[start : start + batch_size])
            mask = None if tokens.attention_mask is None else tokens.attention_mask.to(model.device)
            parts.append(model.get_text_features(tokens.input_ids.to(model.device), mask).float().cpu())
    return F.normalize(torch.cat(parts), dim=-1)


def evaluate_retrieval(
    model: SigLIP2Model,
    data: CaptionedImages,
    features: str | os.PathLike,
    *,
    tokenizer: TextTokenizer | None = None,
    encoding: Encoding = DEFAULT_ENCODING,
) -> dict[str, Any]:
    """Recall@1/5/10 both ways of ``model`` on ``data``: a JSON-ready result as :func:`evaluate_zeroshot`'s.

    Args:
        features: the image features folder (written, or read when it holds them: nothing re-encoded).
        tokenizer: default the checkpoint's own, with its family's text preprocessing (SigLIP 2: lowercase).

    An image that cannot be read is left out with its captions, and counted in ``dataset.failed``.
    """
    name = model.name_or_path or "unnamed model"
    kept, pooled, encoded = image_features(model.vision_model, name, data.paths, features, encoding, data.shards)
    tokenizer = tokenizer or model.tokenizer
    texts = [caption for i in kept for caption in data.captions[i]]
    text_image = torch.tensor([j for j, i in enumerate(kept) for _ in data.captions[i]])
    text_features = _embed_texts(model.to(encoding.device), tokenizer, texts, encoding.batch_size, encoding.progress)
    metrics = retrieval_metrics(F.normalize(pooled.float(), dim=-1), text_features, text_image)
    return {
        "task": "retrieval",
        "metrics": metrics,
        "model": name,
        "dataset": {
            "fingerprint": data.fingerprint(),
            "images": len(data.paths),
            "captions": sum(map(len, data.captions)),
            "evaluated_images": len(kept),
            "evaluated_captions": len(texts),
            "failed": len(data.paths) - len(kept),
        },
        "settings": {
            "text_preprocessing": tokenizer.preprocessing,
            "features": str(features),
            "images_encoded_now": encoded,
        },
        "versions": versions(),
    }
