"""Heads for dense prediction on the tower's feature maps, the models that join them, losses and metrics.

* :class:`LinearProbeHead`: the SigLIP 2 paper's dense protocol, a linear layer (1x1 conv) on frozen patch
  features, upsampled to the label resolution.
* :class:`FPNHead`: a simple feature pyramid (ViTDet) over several layers, fused top-down (FPN) and upsampled.
  It taps :func:`default_taps` by default: four evenly spaced layers, ending with the last, because early ViT
  layers keep local detail (edges, texture) and late ones carry semantics; DPT and ViTDet tap the same way.
* :class:`DenseModel`: encoder + head for ``"segmentation"`` (cross-entropy, mIoU, pixel accuracy) or ``"depth"``
  (scale-invariant log loss, RMSE), with sliding-window prediction for large images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..models.model import SigLIP2Encoder
from ..output import Layer
from .dense import tile_starts

__all__ = [
    "DenseModel",
    "FPNHead",
    "LinearProbeHead",
    "default_taps",
    "mean_iou",
    "pixel_accuracy",
    "rmse",
    "scale_invariant_loss",
]


def default_taps(num_layers: int) -> tuple[int, ...]:
    """Four evenly spaced hidden-state indices ending with the last layer: (7, 14, 20, 27) for So400m's 27."""
    return tuple(sorted({max(1, round(num_layers * k / 4)) for k in (1, 2, 3, 4)}))


class LinearProbeHead(nn.Module):
    """(B, D, h, w) -> (B, K, H, W): a 1x1 convolution, then bilinear upsampling to the label size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)  # features of a frozen tower vary in scale per channel
        self.classifier = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``features``: one (B, D, h, w) map (the last of the sequence is used); ``size``: output (H, W)."""
        logits = self.classifier(self.norm(features[-1]))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


_SCALES = {1: [1], 2: [2, 1], 3: [4, 2, 1], 4: [4, 2, 1, 0.5]}  # per tap, shallow to deep, relative to the grid


class FPNHead(nn.Module):
    """Multi-layer head: each tapped map is resampled to its own scale (x4, x2, x1, x1/2 of the token grid, as in
    ViTDet's simple feature pyramid), fused top-down, summed at the finest scale, and classified per pixel."""

    def __init__(self, in_channels: int, out_channels: int, num_taps: int = 4, width: int = 128) -> None:
        super().__init__()
        if num_taps not in _SCALES:
            raise ValueError(f"FPNHead takes 1 to 4 taps, got num_taps={num_taps}")
        scales = _SCALES[num_taps]
        self.resample = nn.ModuleList(self._resampler(in_channels, width, s) for s in scales)
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in scales)
        self.classifier = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, out_channels, 1)
        )

    @staticmethod
    def _resampler(in_channels: int, width: int, scale: float) -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 1)]
        if scale > 1:
            for _ in range(int(scale).bit_length() - 1):  # x2 per transposed conv
                layers += [nn.ConvTranspose2d(width, width, 2, stride=2), nn.GELU()]
        elif scale < 1:
            layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        return nn.Sequential(*layers)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``features``: the tapped (B, D, h, w) maps, shallow to deep; ``size``: output (H, W)."""
        if len(features) != len(self.resample):
            raise ValueError(f"FPNHead was built for {len(self.resample)} taps, got {len(features)} feature maps")
        levels = [resample(f) for resample, f in zip(self.resample, features)]
        top = levels[-1]
        fused = [self.smooth[-1](top)]
        for i in range(len(levels) - 2, -1, -1):  # top-down: coarse to fine
            top = levels[i] + F.interpolate(top, size=levels[i].shape[-2:], mode="bilinear", align_corners=False)
            fused.append(self.smooth[i](top))
        finest = fused[-1].shape[-2:]
        x = sum(F.interpolate(f, size=finest, mode="bilinear", align_corners=False) for f in fused)
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


class DenseModel(nn.Module):
    """Encoder + dense head.

    Args:
        encoder: the tower; call ``encoder.freeze()`` for the frozen-feature protocol.
        head: :class:`LinearProbeHead` (taps one layer) or :class:`FPNHead` (several).
        taps: layers fed to the head, shallow to deep; ``None`` = final tokens after post-layernorm.
        task: ``"segmentation"`` (head emits class logits) or ``"depth"`` (one channel, log depth).
    """

    def __init__(
        self,
        encoder: SigLIP2Encoder,
        head: nn.Module,
        taps: Sequence[Layer] = (None,),
        task: Literal["segmentation", "depth"] = "segmentation",
    ) -> None:
        super().__init__()
        if task not in ("segmentation", "depth"):
            raise ValueError(f"task must be 'segmentation' or 'depth', got {task!r}")
        for tap in taps:
            if tap is not None:
                encoder.layer_index(tap)
        self.encoder, self.head, self.taps, self.task = encoder, head, tuple(taps), task

    def features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The tapped (B, D, h, w) maps of (B, 3, H, W) images."""
        out = self.encoder(pixel_values, layers=self.taps, return_last=False, return_pooled=False)
        return [out.feature_map(t) for t in self.taps]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, H, W) class logits, or (B, 1, H, W) log depth."""
        return self.head(self.features(pixel_values), pixel_values.shape[-2:])

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """Cross-entropy on (B, H, W) class ids, or the scale-invariant loss on (B, H, W) depths (0 = no depth)."""
        if self.task == "segmentation":
            return F.cross_entropy(prediction, target.long(), ignore_index=ignore_index)
        return scale_invariant_loss(prediction[:, 0], target, target > 0)

    @torch.no_grad()
    def predict_sliding(self, pixel_values: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """Logits (or log depth) of a large (1, 3, H, W) image from overlapping tiles, averaged where they overlap.
        H, W and ``tile`` are in pixels; tiles never leave the image."""
        _, _, height, width = pixel_values.shape
        stride = max(1, tile - overlap)
        rows, cols = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
        total, count = None, torch.zeros(1, 1, height, width, device=pixel_values.device)
        for r in rows:
            for c in cols:
                crop = pixel_values[..., r : r + tile, c : c + tile]
                out = self(crop)
                total = torch.zeros(1, out.shape[1], height, width, device=out.device) if total is None else total
                total[..., r : r + crop.shape[-2], c : c + crop.shape[-1]] += out
                count[..., r : r + crop.shape[-2], c : c + crop.shape[-1]] += 1
        return total / count


def scale_invariant_loss(log_pred: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor, lam: float = 0.5):
    """Eigen et al. (2014): mean(d^2) - lam * mean(d)^2 with d = log_pred - log(depth), over valid pixels."""
    d = log_pred[valid] - torch.log(depth[valid])
    return (d**2).mean() - lam * d.mean() ** 2


def rmse(log_pred: torch.Tensor, depth: torch.Tensor) -> float:
    """Root mean squared error in depth units over pixels with depth > 0."""
    valid = depth > 0
    return float(((log_pred.exp()[valid] - depth[valid]) ** 2).mean().sqrt())


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """Mean intersection-over-union over the classes present in ``target`` or ``pred``."""
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    ious = []
    for k in range(num_classes):
        union = ((pred == k) | (target == k)).sum()
        if union > 0:
            ious.append(float(((pred == k) & (target == k)).sum()) / float(union))
    return sum(ious) / len(ious) if ious else 0.0


def pixel_accuracy(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> float:
    keep = target != ignore_index
    return float((pred[keep] == target[keep]).float().mean())
