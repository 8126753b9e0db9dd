"""Zero-shot classification accuracy, measured as CLIP_benchmark and big_vision measure it: each image's class is
the label whose (template-averaged) text embedding scores highest; top-1 / top-5 accuracy over the images, and
recall per class with its mean (CLIP_benchmark's ``mean_per_class_recall``, scikit-learn's balanced accuracy).

Image features go through :func:`~siglip2_encoder.pipeline.extract.extract` into a features folder and are read
back from it: a second evaluation with other templates, class names or text preprocessing encodes no image again,
and an interrupted one resumes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..data.tokenizer import TextTokenizer
from ..models.joint import SigLIP2Model
from .datasets import LabelledImages
from .features import DEFAULT_ENCODING, Encoding, image_features, versions

__all__ = ["evaluate_zeroshot", "zeroshot_metrics"]


def zeroshot_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy of ``logits`` (N, C) against ``targets`` (N,): ``top1``, ``top5`` (None under 5 classes), and the
    recall of each class with an image (``per_class_recall``) and their mean (``mean_per_class_recall``)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, k), best first
    hits = ranked == targets[:, None]
    predicted, n = ranked[:, 0], len(targets)
    per_class = {}  # counts in ints, ratios in Python floats: the numbers do not depend on the tensors' dtype
    for c, name in enumerate(classes):
        members = targets == c
        if members.any():  # a class without images has no recall (as balanced accuracy skips it)
            per_class[name] = int((predicted[members] == c).sum()) / int(members.sum())
    return {
        "top1": int(hits[:, :1].any(1).sum()) / n,
        "top5": int(hits[:, :5].any(1).sum()) / n if len(classes) >= 5 else None,
        "mean_per_class_recall": sum(per_class.values()) / len(per_class),
        "per_class_recall": per_class,
    }


def evaluate_zeroshot(
    model: SigLIP2Model,
    data: LabelledImages,
    templates: tuple[str, ...],
    features: str | os.PathLike,
    *,
    tokenizer: TextTokenizer | None = None,
    canonicalize: bool = True,
    encoding: Encoding = DEFAULT_ENCODING,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``data`` with ``templates``: a JSON-ready result (``metrics``,
    ``per_class_recall``, ``model``, ``dataset`` with its fingerprint, ``settings``, ``versions``).

    Args:
        features: the features folder the images' pooled features are written to, or read from when it holds them
            already (an ``extract`` folder of the same model: resumed, nothing re-encoded).
        tokenizer: default the checkpoint's own (``model.tokenizer``).
        canonicalize: class names and templates through big_vision's rule, as the SigLIP papers' evaluator.
        encoding: how the images are encoded (:class:`~.features.Encoding`).

    Raises:
        ValueError: ``data`` has no class names (:attr:`~.datasets.LabelledImages.named`).

    An image that cannot be read is left out of the metrics and counted in ``dataset.failed`` (with a warning).
    """
    if not data.named:
        raise ValueError(
            "the images' classes have no names (shards without classnames.txt) and zero-shot encodes the names: "
            "give them with data.with_classes(names), one per class in label order"
        )
    name = model.name_or_path or "unnamed model"
    kept, pooled, encoded = image_features(model.vision_model, name, data.paths, features, encoding, data.shards)
    tokenizer = tokenizer or model.tokenizer
    labels = model.encode_labels(
        list(data.classes), tokenizer, templates, canonicalize=canonicalize, progress=encoding.progress
    )
    with torch.inference_mode():
        logits = model.logits(pooled.to(model.device, torch.float32), labels.embeddings.to(model.device))
    targets = torch.tensor([data.labels[i] for i in kept], device=logits.device)
    metrics = zeroshot_metrics(logits.float(), targets, data.classes)
    return {
        "task": "zeroshot",
        "metrics": {k: v for k, v in metrics.items() if k != "per_class_recall"},
        "per_class_recall": metrics["per_class_recall"],
        "model": name,
        "dataset": {
            "fingerprint": data.fingerprint(),
            "images": len(data.paths),
            "evaluated": len(kept),
            "failed": len(data.paths) - len(kept),
            "classes": len(data.classes),
        },
        "settings": {
            "templates": list(labels.templates),
            "canonicalize": canonicalize,
            "text_preprocessing": tokenizer.preprocessing,
            "features": str(features),
            "images_encoded_now": encoded,
        },
        "versions": versions(),
    }
