"""Dense features for segmentation and depth: (D, h, w) maps at an image's own aspect ratio, from any layers,
directly or by sliding-window (tiled) inference for images too large to encode at once.

* :func:`feature_maps`: NaFlex towers by patch budget; fixed-resolution towers resized to the aspect-preserving size
  within the same token budget, their position embeddings interpolated. Optionally upsampled to pixels.
* :func:`tiled_feature_maps`: square tiles with overlap, each given its window of the whole image's position
  embeddings (so a tile's tokens know where in the image they are), blended with weights that fall towards tile
  edges. Memory grows with the tile, not the image: attention is quadratic in tokens, so a 2048x1536 image at
  patch 16 (12288 tokens) costs about 12288^2 attention entries per head and layer at once, while 512-pixel tiles
  with 128 overlap need 1024^2 each, for about 20 tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import ImageInput, image_to_tensor
from ..data.processor import ImageProcessor, naflex_size
from ..models.model import SigLIP2Encoder
from ..output import Layer

__all__ = ["feature_maps", "pca_rgb", "prepare_image", "tile_starts", "tiled_feature_maps"]


def prepare_image(
    model: SigLIP2Encoder, image: ImageInput, max_tokens: int | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image as a (1, 3, H, W) normalized tensor at its own aspect ratio, with H and W multiples of the patch
    size and (H/p) * (W/p) <= ``max_tokens`` (default: the tower's native token count); and its original size.

    ``max_tokens=0`` keeps the image's own size, rounded to multiples of the patch size (for tiling).
    """
    p = model.config.patch_size
    original = tuple(image_to_tensor(image).shape[1:])
    budget = max_tokens if max_tokens is not None else model.config.position_grid**2
    if budget == 0:
        size = (max(p, round(original[0] / p) * p), max(p, round(original[1] / p) * p))
    else:
        size = naflex_size(*original, p, budget)
    resize = model.processor_config.at_size(size)
    return ImageProcessor(resize)(image).pixel_values, original


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(D, h, w) -> (D, H, W) bilinear."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def feature_maps(
    model: SigLIP2Encoder,
    image: ImageInput,
    *,
    layers: Sequence[Layer] = (None,),
    max_tokens: int | None = None,
    upsample: bool = False,
) -> dict[Layer, torch.Tensor]:
    """(D, h, w) feature maps of one image at its aspect ratio, keyed by layer.

    Args:
        model: the tower.
        image: PIL image, array (H, W, C) or tensor (C, H, W).
        layers: ``None`` = final tokens (after post-layernorm); ints = hidden states (transformers' indexing).
        max_tokens: token budget (default: the tower's native count, e.g. 729 for So400m/14-384).
        upsample: resize the maps bilinearly to the image's pixel size (D, H, W).
    """
    pixels, original = prepare_image(model, image, max_tokens)
    with torch.inference_mode():
        out = model(pixels.to(model.device, model.dtype), layers=layers, return_last=False, return_pooled=False)
    maps = {layer: out.feature_maps(layer)[0] for layer in layers}
    return {k: _upsample(v, original) for k, v in maps.items()} if upsample else maps


def _window(n: int, ramp: int) -> torch.Tensor:
    """Blend weights along one tile side of n tokens: 1 in the middle, falling linearly over ``ramp`` tokens to
    1 / (ramp + 1) at the edges, so overlapping tiles hand over smoothly and every token keeps some weight."""
    i = torch.arange(n, dtype=torch.float32)
    return (torch.minimum(i + 1, n - i).clamp(max=ramp + 1)) / (ramp + 1)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Where tiles of side ``tile`` start along a side of ``length`` with ``stride`` between them: the last one ends
    at the edge, and a side no longer than one tile gets one tile at 0."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    return starts if starts[-1] == length - tile else [*starts, length - tile]


def tiled_feature_maps(
    model: SigLIP2Encoder,
    image: ImageInput,
    *,
    tile: int = 384,
    overlap: int = 96,
    layers: Sequence[Layer] = (None,),
    max_tokens: int = 0,
    batch_size: int = 8,
    upsample: bool = False,
) -> dict[Layer, torch.Tensor]:
    """Sliding-window feature maps of a large image, keyed by layer: each (D, h, w) for the whole image.

    Args:
        tile: tile side in pixels (rounded down to the patch size); an image that fits in one tile is encoded
            directly, with identical results.
        overlap: pixels shared by neighbouring tiles (rounded down to the patch size); more overlap, smoother maps,
            more tiles.
        max_tokens: 0 = the image's own resolution (rounded to the patch size); otherwise resize within this budget.
        batch_size: tiles encoded together.
        layers, upsample: as in :func:`feature_maps`.
    """
    p = model.config.patch_size
    tile_tokens, overlap_tokens = tile // p, overlap // p
    if tile_tokens < 1 or not 0 <= overlap_tokens < tile_tokens:
        raise ValueError(f"need patch size <= tile and 0 <= overlap < tile, got tile={tile}, overlap={overlap}, p={p}")
    pixels, original = prepare_image(model, image, max_tokens)
    pixels = pixels.to(model.device, model.dtype)
    gh, gw = pixels.shape[-2] // p, pixels.shape[-1] // p
    th, tw = min(tile_tokens, gh), min(tile_tokens, gw)
    positions = model.position_embeddings((gh, gw)).reshape(gh, gw, -1)
    windows = [
        (r, c)
        for r in tile_starts(gh, th, th - overlap_tokens or 1)
        for c in tile_starts(gw, tw, tw - overlap_tokens or 1)
    ]
    weight = (_window(th, overlap_tokens)[:, None] * _window(tw, overlap_tokens)[None, :]).to(pixels.device)
    sums: dict[Layer, torch.Tensor] = {}
    total = torch.zeros(gh, gw, device=pixels.device)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        crops = torch.cat([pixels[..., r * p : (r + th) * p, c * p : (c + tw) * p] for r, c in chunk])
        pos = torch.stack([positions[r : r + th, c : c + tw].reshape(th * tw, -1) for r, c in chunk])
        with torch.inference_mode():
            out = model(crops, layers=layers, return_last=False, return_pooled=False, positions=pos)
        for layer in layers:
            maps = out.feature_map(layer).float()  # (n, D, th, tw)
            acc = sums.setdefault(layer, torch.zeros(maps.shape[1], gh, gw, device=pixels.device))
            for (r, c), m in zip(chunk, maps):
                acc[:, r : r + th, c : c + tw] += m * weight
        for r, c in chunk:
            total[r : r + th, c : c + tw] += weight
    maps = {layer: (acc / total).to(model.encoder_dtype) for layer, acc in sums.items()}
    return {k: _upsample(v, original) for k, v in maps.items()} if upsample else maps


def pca_rgb(features: torch.Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
    """The first three principal components of a feature map as an RGB picture, the usual look at dense features.

    Args:
        features: (D, h, w) patch features (e.g. one of :func:`feature_maps`).
        size: (H, W) to upsample to (bilinear); None keeps (h, w).

    Returns:
        (H, W, 3) uint8: component i in channel i, each scaled to its 1st-99th percentile. A component's sign is
        arbitrary (as in any PCA), so colours may swap between runs of different software, not between runs of this.
    """
    d, h, w = features.shape
    tokens = features.reshape(d, h * w).T.float()
    tokens = tokens - tokens.mean(0)
    _, _, v = torch.linalg.svd(tokens, full_matrices=False)
    components = tokens @ v[:3].T  # (h * w, 3)
    low, high = torch.quantile(components, 0.01, dim=0), torch.quantile(components, 0.99, dim=0)
    components = ((components - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    grid = components.T.reshape(1, 3, h, w)
    if size is not None:
        grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return (grid[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
