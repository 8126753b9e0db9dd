"""The tower's three input formats, validated and brought to one form before anything runs.

* (B, C, H, W) images of one size (either tower kind; NaFlex towers patchify them);
* a list of (C, H_i, W_i) images of any sizes (either tower kind), run packed;
* patches (B, L, p * p * C) with ``spatial_shapes`` (B, 2) and optionally ``pixel_attention_mask`` (B, L), as
  transformers' ``Siglip2ImageProcessor`` makes them for NaFlex towers, and this library's processor for the
  letterboxes whose images are read on their own grids (Idefics2's, Aria's; fixed-resolution towers read each such
  image as a (C, h * p, w * p) image of the list form).

:func:`parse_inputs` returns a :class:`TowerInput`: where each image's tokens go
(:class:`~siglip2_encoder.models.packing.Packing`) and the pixels, as groups of equal-size images or as packed patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import EncoderConfig
from ..data.processor import unpatchify
from .packing import Packing

__all__ = ["Grids", "TowerInput", "as_grids", "parse_inputs"]

Grids = torch.Tensor | Sequence[tuple[int, int]]


@dataclass(frozen=True)
class TowerInput:
    """Validated tower input.

    Attributes:
        packing: each image's token grid and place in the packed sequence.
        groups: (input indices, (G, C, H, W) images of one size) for image input; empty for patch input.
        patches: (T, p * p * C) patchified pixels in packed order, for NaFlex patch input; else None.
        positions: (N, D) or (B, N, D) position embeddings replacing the tower's own, for a (B, C, H, W) batch.
    """

    packing: Packing
    groups: tuple[tuple[tuple[int, ...], torch.Tensor], ...] = ()
    patches: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def as_grids(spatial_shapes: Grids) -> list[tuple[int, int]]:
    """(B, 2) tensor or sequence of (h, w) -> list of int pairs."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _check_pixels(pixel_values: object) -> None:
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        got = getattr(pixel_values, "dtype", type(pixel_values).__name__)
        raise TypeError(
            f"pixel_values must be a floating-point torch.Tensor (or a list of them), got {got}; "
            f"use siglip2_encoder.ImageProcessor to turn images into pixel_values"
        )


def _image_list(config: EncoderConfig, images: list[torch.Tensor], spatial_shapes: Grids | None) -> TowerInput:
    if not images:
        raise ValueError("pixel_values is an empty list; pass at least one (C, H, W) image")
    p, c = config.patch_size, config.num_channels
    for i, image in enumerate(images):
        _check_pixels(image)
        if image.ndim != 3 or image.shape[0] != c or image.shape[1] < p or image.shape[2] < p:
            raise ValueError(
                f"image {i} of the list has shape {tuple(image.shape)}; each must be ({c}, H, W) with H and W "
                f"at least the patch size {p}"
            )
    grids = [(image.shape[1] // p, image.shape[2] // p) for image in images]
    if spatial_shapes is not None and as_grids(spatial_shapes) != grids:
        raise ValueError(f"spatial_shapes {as_grids(spatial_shapes)} disagree with the images' grids {grids}")
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[1:]), []).append(i)
    groups = tuple((tuple(indices), torch.stack([images[i] for i in indices])) for indices in by_size.values())
    return TowerInput(Packing.from_grids(grids, images[0].device), groups)


def _image_batch(
    config: EncoderConfig, images: torch.Tensor, spatial_shapes: Grids | None, positions: torch.Tensor | None
) -> TowerInput:
    p, c = config.patch_size, config.num_channels
    b, channels, height, width = images.shape
    if channels != c or height < p or width < p:
        raise ValueError(
            f"pixel_values of shape {tuple(images.shape)} must be (B, {c}, H, W) with H and W at least the patch "
            f"size {p}; ImageProcessor prepares images"
        )
    # As in the reference conv, the last H % p rows and W % p columns fall outside every patch.
    grid = (height // p, width // p)
    if spatial_shapes is not None and as_grids(spatial_shapes) != [grid] * b:
        raise ValueError(
            f"spatial_shapes {as_grids(spatial_shapes)} disagree with the image size {height}x{width} "
            f"(grid {grid}); drop spatial_shapes or fix it"
        )
    want = (grid[0] * grid[1], config.hidden_size)
    if positions is not None and tuple(positions.shape) not in (want, (b, *want)):
        raise ValueError(
            f"positions must be (h * w, D) = {want} or (B, h * w, D) for this {grid[0]}x{grid[1]} grid, "
            f"got {tuple(positions.shape)}"
        )
    return TowerInput(Packing.from_grids([grid] * b, images.device), ((tuple(range(b)), images),), None, positions)


def _patch_grids(
    config: EncoderConfig, patches: torch.Tensor, spatial_shapes: Grids | None, mask: torch.Tensor | None
) -> list[tuple[int, int]]:
    """Each image's grid of (B, L, p * p * C) patches, checked against their width, length and mask."""
    p, c = config.patch_size, config.num_channels
    b, length, dim = patches.shape
    if dim != c * p * p:
        raise ValueError(f"patchified pixel_values must have p*p*C = {c * p * p} values per patch, got {dim}")
    if spatial_shapes is None:
        raise ValueError("patchified pixel_values need spatial_shapes (B, 2): each image's grid (h, w)")
    grids = as_grids(spatial_shapes)
    if len(grids) != b or any(h < 1 or w < 1 or h * w > length for h, w in grids):
        raise ValueError(
            f"spatial_shapes {grids} must give one grid (h >= 1, w >= 1, h * w <= {length}) per image for {b} images"
        )
    if mask is not None:
        counts = torch.tensor([h * w for h, w in grids], device=patches.device)
        expected = torch.arange(length, device=patches.device) < counts[:, None]  # (B, L)
        if mask.shape != expected.shape or not torch.equal(mask.to(torch.bool), expected):
            raise ValueError(
                "pixel_attention_mask must mark exactly the first h*w patches of each image as valid "
                "(as spatial_shapes says); pass the processor's mask unchanged, or leave it out"
            )
    return grids


def parse_inputs(
    config: EncoderConfig,
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    spatial_shapes: Grids | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> TowerInput:
    """Validate the inputs of :meth:`SigLIP2Encoder.forward <siglip2_encoder.SigLIP2Encoder.forward>`; errors say
    what shape was expected and how to get it."""
    if isinstance(pixel_values, (list, tuple)):
        if positions is not None:
            raise ValueError("positions apply to a (B, C, H, W) batch, not to a list of images")
        return _image_list(config, list(pixel_values), spatial_shapes)
    _check_pixels(pixel_values)
    if pixel_values.ndim == 4:
        return _image_batch(config, pixel_values, spatial_shapes, positions)
    if positions is not None:
        raise ValueError("positions apply to (B, C, H, W) images only")
    if pixel_values.ndim != 3:
        raise ValueError(
            f"pixel_values of shape {tuple(pixel_values.shape)} is not (B, C, H, W), a list of (C, H, W) images, or "
            f"(B, L, p*p*C) patches with spatial_shapes for this tower"
        )
    grids = _patch_grids(config, pixel_values, spatial_shapes, pixel_attention_mask)
    if not config.naflex:
        # Patches of images read on their own grids (Idefics2's and Aria's letterboxes) are those images again for a
        # conv patch embedding, which then runs exactly as on a list of images.
        p, c = config.patch_size, config.num_channels
        images = [unpatchify(pixel_values[i, : h * w], (h, w), p, c) for i, (h, w) in enumerate(grids)]
        return _image_list(config, images, None)
    packing = Packing.from_grids(grids, pixel_values.device, pixel_values.shape[1])
    return TowerInput(packing, patches=packing.pack(pixel_values))
