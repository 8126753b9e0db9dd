"""Image preprocessing matching each checkpoint's own ``preprocessor_config.json``.

* fixed-resolution: resize to (height, width) with the checkpoint's filter, rescale to [0, 1], normalize.
* NaFlex: resize to the largest size within ``max_num_patches`` that keeps the aspect ratio (transformers' rule,
  :func:`naflex_size`), rescale, normalize, cut into patches, pad to a common length with a validity mask.

Resizing uses torchvision's antialiased kernels on uint8 tensors, the operations of transformers' default
(torchvision) image processors, so sizes and pixels agree with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from .config import EncoderConfig
from .embeddings import patchify

if TYPE_CHECKING:
    import os

__all__ = ["ImageProcessor", "ProcessorConfig", "ProcessedImage", "ProcessedImages", "naflex_size", "ImageInput"]

ImageInput = Image.Image | np.ndarray | torch.Tensor

_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as transformers stores them
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class ProcessorConfig:
    """Preprocessing of one checkpoint. Set ``image_size`` (fixed-resolution) or ``max_num_patches`` (NaFlex)."""

    image_size: tuple[int, int] | None = (224, 224)  # fixed-resolution target (height, width)
    max_num_patches: int | None = None  # NaFlex: patch budget per image
    patch_size: int = 16  # NaFlex patch side; unused by fixed-resolution processing
    resample: str = "bilinear"  # resize filter: "bilinear" or "bicubic"
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1]
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        if (self.image_size is None) == (self.max_num_patches is None):
            raise ValueError(
                f"set exactly one of image_size (fixed-resolution) and max_num_patches (NaFlex), got "
                f"image_size={self.image_size!r}, max_num_patches={self.max_num_patches!r}"
            )
        if self.image_size is not None:
            if len(self.image_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in self.image_size):
                raise ValueError(f"image_size must be (height, width) of positive ints, got {self.image_size!r}")
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if self.max_num_patches is not None and (not isinstance(self.max_num_patches, int) or self.max_num_patches < 1):
            raise ValueError(f"max_num_patches must be a positive int, got max_num_patches={self.max_num_patches!r}")
        if not isinstance(self.patch_size, int) or self.patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got patch_size={self.patch_size!r}")
        if self.resample not in _INTERPOLATION:
            raise ValueError(f"resample must be one of {sorted(_INTERPOLATION)}, got resample={self.resample!r}")
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {name}={getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got image_std={self.image_std}")

    @property
    def naflex(self) -> bool:
        return self.max_num_patches is not None

    @classmethod
    def default_for(cls, config: EncoderConfig, resample: str = "bilinear") -> ProcessorConfig:
        """SigLIP 2's preprocessing for a tower: native size, or a budget equal to the position grid's size."""
        if config.naflex:
            return cls(
                image_size=None, max_num_patches=config.num_patches, patch_size=config.patch_size, resample=resample
            )
        return cls(image_size=(config.image_size, config.image_size), patch_size=config.patch_size, resample=resample)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], patch_size: int) -> ProcessorConfig:
        """From transformers' ``preprocessor_config.json`` (``SiglipImageProcessor`` or ``Siglip2ImageProcessor``)."""
        resample = hf.get("resample", 2 if "max_num_patches" in hf else 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(
                f"preprocessor_config.json has resample={resample!r}; supported: {_PIL_RESAMPLE} (PIL's codes)"
            )
        common = dict(
            resample=_PIL_RESAMPLE[resample],
            image_mean=tuple(hf.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(hf.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=hf.get("rescale_factor", 1 / 255),
            do_resize=hf.get("do_resize", True),
            do_rescale=hf.get("do_rescale", True),
            do_normalize=hf.get("do_normalize", True),
        )
        if "max_num_patches" in hf or "Siglip2" in hf.get("image_processor_type", ""):
            return cls(
                image_size=None,
                max_num_patches=hf.get("max_num_patches", 256),
                patch_size=hf.get("patch_size", patch_size),
                **common,
            )
        size = hf.get("size", {"height": 224, "width": 224})
        if not {"height", "width"} <= set(size):
            raise ValueError(f"preprocessor_config.json size must give height and width, got size={size!r}")
        return cls(image_size=(size["height"], size["width"]), patch_size=patch_size, **common)

    def to_hf(self) -> dict[str, Any]:
        """transformers' ``preprocessor_config.json`` for this preprocessing."""
        out: dict[str, Any] = {
            "do_resize": self.do_resize,
            "resample": {v: k for k, v in _PIL_RESAMPLE.items()}[self.resample],
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        if self.naflex:
            return {
                "image_processor_type": "Siglip2ImageProcessor",
                "patch_size": self.patch_size,
                "max_num_patches": self.max_num_patches,
                **out,
            }
        height, width = self.image_size
        return {
            "image_processor_type": "SiglipImageProcessor",
            "do_convert_rgb": True,
            "size": {"height": height, "width": width},
            **out,
        }


class ProcessedImage(NamedTuple):
    """One preprocessed image, before batching.

    Attributes:
        pixels: (3, H, W) for fixed-resolution processing; (h * w, p * p * 3) patches for NaFlex.
        grid: the NaFlex patch grid (h, w); None for fixed-resolution processing.
        original_size: the input's (height, width).
    """

    pixels: torch.Tensor
    grid: tuple[int, int] | None
    original_size: tuple[int, int]


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The NaFlex resize target: aspect ratio kept, both sides multiples of the patch size (at least one patch),
    as many patches as fit in ``max_num_patches``.

    This is transformers' rule, a bisection on the scale factor to 1e-5, kept so that sizes agree with it exactly.
    """

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        mid = (low + high) / 2
        if (side(mid, height) / patch_size) * (side(mid, width) / patch_size) <= max_num_patches:
            low = mid
        else:
            high = mid
    return side(low, height), side(low, width)


@dataclass
class ProcessedImages:
    """A batch ready for the encoder: ``model(**batch)`` works.

    Attributes:
        pixel_values: (B, 3, H, W) for fixed-resolution; (B, L, p * p * 3) patches for NaFlex, zero-padded.
        spatial_shapes: (B, 2) long, each image's token grid (h, w) (NaFlex) or None (fixed-resolution).
        pixel_attention_mask: (B, L) bool, True for real patches (NaFlex) or None.
        original_sizes: each input image's (height, width) before resizing.
    """

    pixel_values: torch.Tensor
    spatial_shapes: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None
    original_sizes: list[tuple[int, int]] | None = None

    def keys(self) -> list[str]:
        """The encoder's input names that are set (so ``**batch`` passes exactly those)."""
        return [k for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask") if getattr(self, k) is not None]

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ProcessedImages:
        """Move the tensors; ``dtype`` applies to ``pixel_values`` only."""
        move = {k: getattr(self, k).to(device) for k in self.keys()}
        move["pixel_values"] = move["pixel_values"].to(dtype=dtype)
        return replace(self, **move)


def _to_chw(image: ImageInput, index: int) -> torch.Tensor:
    """One image as a (3, H, W) uint8 tensor, or float32 tensor in [0, 1]; transparency composited onto white."""
    where = f"image {index}"
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where} is empty ({image.width}x{image.height})")
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim == 3:  # numpy images are (H, W, C), PIL's layout
            image = np.moveaxis(image, -1, 0)
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):  # tensors are (C, H, W), torch's layout
        tensor = image.detach().cpu()
    else:
        raise TypeError(f"{where} is a {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor")
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        layout = "(H, W, C)" if isinstance(image, np.ndarray) else "(C, H, W)"
        raise ValueError(
            f"{where} has shape {tuple(image.shape)}; expected {layout} with 1, 3 or 4 channels, or (H, W)"
        )
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"{where} is empty (shape {tuple(image.shape)})")
    if tensor.dtype != torch.uint8:
        if not tensor.is_floating_point():
            raise TypeError(f"{where} has dtype {tensor.dtype}; pass uint8 (0-255) or float (0-1) pixels")
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where} contains NaN or Inf values")
        if tensor.min() < 0 or tensor.max() > 1:
            raise ValueError(
                f"{where} is float with values in [{tensor.min():.3g}, {tensor.max():.3g}]; float pixels must lie in "
                f"[0, 1] (divide 0-255 values by 255, or pass uint8)"
            )
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:  # RGBA: composite onto white, as for PIL images
        scale = 255.0 if tensor.dtype == torch.uint8 else 1.0
        rgb, alpha = tensor[:3].float(), tensor[3:].float() / scale
        blended = rgb * alpha + scale * (1 - alpha)
        tensor = blended.round().to(torch.uint8) if scale == 255.0 else blended
    return tensor.contiguous()


class ImageProcessor:
    """Turns images into the encoder's inputs, following a :class:`ProcessorConfig`.

    Images may be PIL images, numpy arrays (H, W, C) or (H, W), or torch tensors (C, H, W) or (H, W); uint8 pixels
    (0-255) or floats already in [0, 1]; 1 (grey), 3 (RGB) or 4 (RGBA, composited onto white) channels.
    """

    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"ImageProcessor({self.config})"

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> ImageProcessor:
        """The processor of a checkpoint (Hub id or local folder), from its ``preprocessor_config.json``."""
        from .checkpoint import _read_json, _read_tower_config, _Source

        source = _Source(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        config = _read_tower_config(source)
        processor = _read_json(source, "preprocessor_config.json")
        if processor is None:
            return cls(ProcessorConfig.default_for(config))
        return cls(ProcessorConfig.from_hf(processor, patch_size=config.patch_size))

    @classmethod
    def from_preset(cls, name: str) -> ImageProcessor:
        """The default preprocessing of a preset architecture (see :func:`~siglip2_encoder.list_presets`)."""
        from .presets import get_preset

        preset = get_preset(name)
        return cls(ProcessorConfig.default_for(preset.config, resample=preset.resample))

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        max_num_patches: int | None = None,
        pad_to_max: bool = False,
    ) -> ProcessedImages:
        """Preprocess one image or a list of images.

        Args:
            images: one image or a sequence of them.
            max_num_patches: NaFlex only: this call's patch budget per image, instead of the configured one.
            pad_to_max: NaFlex only: pad every image to the budget (transformers' layout) instead of to the
                longest image of the batch.
        """
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        items = [self.process_one(image, max_num_patches=max_num_patches, index=i) for i, image in enumerate(images)]
        return self.collate(items, max_num_patches=max_num_patches if pad_to_max else None, pad_to_max=pad_to_max)

    def process_one(self, image: ImageInput, *, max_num_patches: int | None = None, index: int = 0) -> ProcessedImage:
        """Preprocess one image (errors name it as image ``index``); :meth:`collate` batches the results."""
        config = self.config
        if max_num_patches is not None and not config.naflex:
            raise ValueError("max_num_patches applies to NaFlex checkpoints only; this processor has a fixed size")
        tensor = _to_chw(image, index)
        size = (int(tensor.shape[1]), int(tensor.shape[2]))
        if not config.naflex:
            return ProcessedImage(self._resize_normalize(tensor, config.image_size), None, size)
        budget = self._budget(max_num_patches)
        h, w, p = *size, config.patch_size
        if config.do_resize:
            h, w = naflex_size(h, w, p, budget)
        elif h % p or w % p or (h // p) * (w // p) > budget:
            raise ValueError(
                f"with do_resize=False, images must be multiples of {p} within {budget} patches, got {h}x{w}"
            )
        patches = patchify(self._resize_normalize(tensor, (h, w))[None], p)[0]
        return ProcessedImage(patches, (h // p, w // p), size)

    def collate(
        self, items: Sequence[ProcessedImage], *, max_num_patches: int | None = None, pad_to_max: bool = False
    ) -> ProcessedImages:
        """Batch :meth:`process_one` results (NaFlex: padded to the longest image, or to the budget)."""
        sizes = [item.original_size for item in items]
        if not self.config.naflex:
            return ProcessedImages(torch.stack([item.pixels for item in items]), original_sizes=sizes)
        length = self._budget(max_num_patches) if pad_to_max else max(len(item.pixels) for item in items)
        pixel_values = torch.zeros(len(items), length, items[0].pixels.shape[1])
        mask = torch.zeros(len(items), length, dtype=torch.bool)
        for i, item in enumerate(items):
            pixel_values[i, : len(item.pixels)] = item.pixels
            mask[i, : len(item.pixels)] = True
        shapes = torch.tensor([item.grid for item in items], dtype=torch.long)
        return ProcessedImages(pixel_values, shapes, mask, sizes)

    def _budget(self, max_num_patches: int | None) -> int:
        budget = max_num_patches or self.config.max_num_patches
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"max_num_patches must be a positive int, got {budget!r}")
        return budget

    def _resize_normalize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(3, H, W) uint8 or [0, 1] float -> (3, *size) float32, normalized."""
        config = self.config
        if config.do_resize and tuple(image.shape[1:]) != tuple(size):
            image = tvF.resize(image, list(size), interpolation=_INTERPOLATION[config.resample], antialias=True)
        elif not config.do_resize and tuple(image.shape[1:]) != tuple(size):
            raise ValueError(
                f"with do_resize=False, images must already be {size[0]}x{size[1]}, got "
                f"{image.shape[1]}x{image.shape[2]}"
            )
        scale = config.rescale_factor if image.dtype == torch.uint8 and config.do_rescale else 1.0
        image = image.float()
        if not config.do_normalize:
            return image * scale if scale != 1.0 else image
        # (x * scale - mean) / std computed as (x - mean / scale) / (std / scale), as transformers fuses it.
        mean = torch.tensor(config.image_mean)[:, None, None] * (1.0 / scale)
        std = torch.tensor(config.image_std)[:, None, None] * (1.0 / scale)
        return (image - mean) / std
