"""The dense linear probe of the SigLIP 2 paper: a linear layer (with a BatchNorm) on frozen patch tokens of any layer,
its logits upsampled bilinearly to the label size, trained with cross-entropy (index 255 ignored) and scored by mean
intersection-over-union over the test set (intersections and unions summed over all images, as mmsegmentation
counts them).

Data: ``ROOT/images/<name>.<ext>`` with ``ROOT/masks/<name>.png`` holding each pixel's class index. Tokens are
cached in ``extract`` folders (``train/``, ``test/``): another head setting encodes no image again. NaFlex towers
see each image at its own aspect ratio within the patch budget; fixed-resolution towers at their native size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.images import image_extensions
from ..integrations.heads import LinearProbeHead
from ..models.model import SigLIP2Encoder
from ..pipeline.store import ExtractedFeatures
from .features import DEFAULT_ENCODING, Encoding, encode_images, readable, versions

__all__ = ["SegmentationSet", "evaluate_segmentation", "load_segmentation", "mean_iou"]

IGNORE = 255


@dataclass(frozen=True)
class SegmentationSet:
    """Images and their index masks (same order)."""

    images: tuple[str, ...]
    masks: tuple[str, ...]


def load_segmentation(root: str | os.PathLike) -> SegmentationSet:
    """``ROOT/images/*`` paired by name with ``ROOT/masks/*.png``; an image without its mask is refused."""
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise ValueError(f"{root}: the layout is ROOT/images/<name>.<ext> with ROOT/masks/<name>.png")
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in image_extensions())
    masks = [root / "masks" / f"{p.stem}.png" for p in images]
    missing = [str(m) for m in masks if not m.is_file()]
    if missing or not images:
        found = f"{len(missing)} images have no mask, e.g. {missing[0]}" if missing else "no images"
        raise ValueError(f"{root}: {found}")
    return SegmentationSet(tuple(map(str, images)), tuple(map(str, masks)))


def _mask(path: str, num_classes: int) -> torch.Tensor:
    """(H, W) class indices, each below ``num_classes`` or 255 (ignored)."""
    with Image.open(path) as image:
        mask = torch.from_numpy(np.array(image, dtype=np.int64))
    bad = mask[(mask >= num_classes) & (mask != IGNORE)]
    if mask.ndim != 2 or len(bad):
        found = f"values {sorted(set(bad.tolist()))[:5]}" if len(bad) else f"shape {tuple(mask.shape)}"
        raise ValueError(f"{path}: a mask holds one class index per pixel, below {num_classes} or 255; got {found}")
    return mask


def mean_iou(confusion: torch.Tensor) -> tuple[float, list[float | None]]:
    """(mIoU, per-class IoU) from a (K, K) confusion matrix (rows: truth, columns: prediction), over the classes
    that appear in the truth or the predictions (a class in neither has no IoU)."""
    intersection = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - intersection
    per_class = [float(i / u) if u > 0 else None for i, u in zip(intersection, union)]
    present = [iou for iou in per_class if iou is not None]
    return sum(present) / len(present), per_class


def _pairs(
    store: ExtractedFeatures, feature: str, data: SegmentationSet, num_classes: int, shuffle: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(token map (D, h, w), mask (H, W)) of each extracted image, read one shard at a time (never the whole set in
    memory); with ``shuffle``, each shard's images in a random order."""
    masks = dict(zip(data.images, data.masks))
    for rows, tensor, offsets in store.iter_shards(feature):
        order = range(len(rows)) if shuffle is None else torch.randperm(len(rows), generator=shuffle).tolist()
        for k in order:
            h, w = rows[k]["grid"]
            tokens = tensor[int(offsets[k]) : int(offsets[k + 1])].float()
            yield tokens.T.reshape(-1, h, w), _mask(masks[rows[k]["path"]], num_classes)


def _train(head: LinearProbeHead, pairs: Callable[[torch.Generator], Iterable], epochs: int, show: bool) -> None:
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    head.train()
    for _ in tqdm(range(epochs), unit="epoch", disable=not show):
        for fmap, mask in pairs(g):
            logits = head([fmap[None]], tuple(mask.shape))
            loss = F.cross_entropy(logits, mask[None], ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval()


def evaluate_segmentation(
    tower: SigLIP2Encoder,
    name: str,
    train: SegmentationSet,
    test: SegmentationSet,
    num_classes: int,
    features: str | os.PathLike,
    *,
    layer: int | None = None,
    epochs: int = 10,
    max_num_patches: int | None = None,
    encoding: Encoding = DEFAULT_ENCODING,
) -> dict[str, Any]:
    """mIoU of a linear head on ``tower``'s tokens of ``layer`` (None: the final tokens after post-layernorm;
    ints: hidden states, -2 = penultimate), trained ``epochs`` times over ``train``: a JSON-ready result."""
    tokens = {"last_hidden_state": True} if layer is None else {"layers": (layer,)}
    feature = "last_hidden_state" if layer is None else f"hidden_state_{layer}"
    options = dict(pooled=False, max_num_patches=max_num_patches, **tokens)
    train_store, encoded = encode_images(tower, name, train.images, f"{features}/train", encoding, **options)
    test_store, encoded_test = encode_images(tower, name, test.images, f"{features}/test", encoding, **options)
    kept_train, kept_test = readable(train_store, train.images), readable(test_store, test.images)
    head = LinearProbeHead(train_store.dimension(feature), num_classes)
    show = encoding.progress if encoding.progress is not None else False
    _train(head, lambda g: _pairs(train_store, feature, train, num_classes, g), epochs, show)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for fmap, mask in _pairs(test_store, feature, test, num_classes, None):
            predicted = head([fmap[None]], tuple(mask.shape))[0].argmax(0)
            keep = mask != IGNORE
            confusion += torch.bincount(mask[keep] * num_classes + predicted[keep], minlength=num_classes**2).view(
                num_classes, num_classes
            )
    miou, per_class = mean_iou(confusion)
    return {
        "task": "segmentation",
        "metrics": {"miou": miou, "pixel_accuracy": float(confusion.diag().sum() / confusion.sum())},
        "per_class_iou": per_class,
        "model": name,
        "dataset": {"train_images": len(kept_train), "test_images": len(kept_test), "classes": num_classes},
        "settings": {
            "layer": layer,
            "epochs": epochs,
            "max_num_patches": max_num_patches,
            "features": str(features),
            "images_encoded_now": encoded + encoded_test,
        },
        "versions": versions(),
    }
