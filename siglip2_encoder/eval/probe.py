"""Frozen-feature probes on pooled image features: a linear probe (multinomial logistic regression with an L2
penalty chosen on a validation split, as CLIP_benchmark and DINOv2 sweep theirs) and the weighted k-nearest-neighbour
classifier of DINO (cosine similarity, votes weighted by exp(similarity / 0.07)).

Features come from :mod:`.features` (``extract`` folders, one for the training images and one for the test images):
another probe setting never encodes an image again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..models.model import SigLIP2Encoder
from .datasets import LabelledImages
from .features import DEFAULT_ENCODING, Encoding, image_features, versions

__all__ = ["PENALTIES", "evaluate_probes", "fit_logistic", "knn_predict"]

PENALTIES = tuple(10.0**e for e in range(-6, 1))  # the L2 penalties the linear probe tries
KNN_K = (10, 20)
KNN_TEMPERATURE = 0.07  # DINO's


def knn_predict(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, classes: int, k: int, chunk: int = 1024
) -> torch.Tensor:
    """DINO's weighted kNN: each test feature's ``k`` most cosine-similar training features vote for their class
    with weight exp(similarity / 0.07); (N_test,) predicted classes. One chunk of test features at a time."""
    train, out = F.normalize(train.float(), dim=-1), []
    for start in range(0, len(test), chunk):
        similarity = F.normalize(test[start : start + chunk].float(), dim=-1) @ train.T
        best, index = similarity.topk(min(k, len(train)), dim=1)
        votes = torch.zeros(len(best), classes).scatter_add_(1, train_labels[index], (best / KNN_TEMPERATURE).exp())
        out.append(votes.argmax(1))
    return torch.cat(out)


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, classes: int, penalty: float) -> torch.nn.Linear:
    """Multinomial logistic regression minimising mean cross-entropy + penalty / 2 * ||W||^2 (the bias is not
    penalised), by full-batch L-BFGS in float64: scikit-learn's ``LogisticRegression(C=1 / (penalty * n))``."""
    x = features.double()
    model = torch.nn.Linear(x.shape[1], classes).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), labels) + penalty / 2 * model.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def _split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices: ``fraction`` of each class held out (at least one image of a class with two)."""
    g = torch.Generator().manual_seed(seed)
    held, kept = [], []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n = int(len(members) * fraction) if len(members) > 1 else 0
        held.append(members[: max(n, 1 if len(members) > 1 else 0)])
        kept.append(members[len(held[-1]) :])
    return torch.cat(kept), torch.cat(held)


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return int((predicted == labels).sum()) / len(labels)


def linear_probe(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, classes: int,
    penalties: Sequence[float] = PENALTIES,
) -> dict[str, Any]:  # fmt: skip
    """The penalty with the best accuracy on a validation split (20% of each class of the training set), refit on
    the whole training set, scored on the test set. Features are standardised with the training set's statistics."""
    mean, std = train.double().mean(0), train.double().std(0).clamp_min(1e-12)
    train, test = (train.double() - mean) / std, (test.double() - mean) / std
    fit, held = _split(train_labels, 0.2)
    scores = {}
    for penalty in penalties:
        probe = fit_logistic(train[fit], train_labels[fit], classes, penalty)
        with torch.no_grad():
            scores[penalty] = _accuracy(probe(train[held]).argmax(1), train_labels[held])
    best = max(penalties, key=lambda p: (scores[p], p))  # ties: the stronger penalty
    probe = fit_logistic(train, train_labels, classes, best)
    with torch.no_grad():
        top1 = _accuracy(probe(test).argmax(1), test_labels)
    return {"top1": top1, "penalty": best, "validation_top1": {str(p): s for p, s in scores.items()}}


def evaluate_probes(
    tower: SigLIP2Encoder,
    name: str,
    train: LabelledImages,
    test: LabelledImages,
    features: str | os.PathLike,
    *,
    encoding: Encoding = DEFAULT_ENCODING,
) -> dict[str, Any]:
    """Linear-probe and kNN accuracy of ``tower``'s pooled features: a JSON-ready result. ``features`` is the folder
    holding ``train/`` and ``test/`` feature folders; the two sets must name the same classes."""
    if train.classes != test.classes:
        raise ValueError(f"train and test name different classes: {train.classes[:5]} ... vs {test.classes[:5]} ...")
    kept_train, x_train, encoded = image_features(tower, name, train.paths, f"{features}/train", encoding, train.shards)
    kept_test, x_test, encoded_test = image_features(tower, name, test.paths, f"{features}/test", encoding, test.shards)
    y_train = torch.tensor([train.labels[i] for i in kept_train])
    y_test = torch.tensor([test.labels[i] for i in kept_test])
    classes = len(train.classes)
    metrics = {f"knn{k}_top1": _accuracy(knn_predict(x_train, y_train, x_test, classes, k), y_test) for k in KNN_K}
    linear = linear_probe(x_train, y_train, x_test, y_test, classes)
    return {
        "task": "probe",
        "metrics": {"linear_top1": linear["top1"]} | metrics,
        "model": name,
        "dataset": {
            "train_fingerprint": train.fingerprint(),
            "test_fingerprint": test.fingerprint(),
            "train_images": len(kept_train),
            "test_images": len(kept_test),
            "failed": len(train.paths) - len(kept_train) + len(test.paths) - len(kept_test),
            "classes": classes,
        },
        "settings": {
            "linear_penalty": linear["penalty"],
            "linear_validation_top1": linear["validation_top1"],
            "knn_temperature": KNN_TEMPERATURE,
            "features": str(features),
            "images_encoded_now": encoded + encoded_test,
        },
        "versions": versions(),
    }
