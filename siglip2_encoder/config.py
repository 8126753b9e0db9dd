"""Pure configs: the architecture of the SigLIP / SigLIP 2 towers, and how images are preprocessed.

:class:`TransformerConfig` holds what every tower's encoder layers take; :class:`EncoderConfig` (the vision tower)
and :class:`TextConfig` (the text tower) add their own fields. :class:`EncoderConfig` describes both vision families:

* fixed-resolution checkpoints (SigLIP 1 and SigLIP 2 "FixRes"): a conv patch embedding and a learned
  ``(image_size / patch_size) ** 2`` position table; set ``image_size``.
* NaFlex checkpoints (SigLIP 2): a linear patch embedding over patchified pixels and a learned square position grid
  of ``num_patches`` entries, resized per image; set ``num_patches``.

Field names follow transformers' ``SiglipVisionConfig`` / ``Siglip2VisionConfig`` (and their defaults), so configs
convert one to one (:mod:`~siglip2_encoder.checkpoints.hf_format`). This module imports nothing but the standard
library.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = [
    "EncoderConfig",
    "LETTERBOXES",
    "NAFLEX_NUM_PATCHES",
    "POSITION_LOOKUPS",
    "ProcessorConfig",
    "RESAMPLE_FILTERS",
    "SUPPORTED_ACTIVATIONS",
    "TextConfig",
    "TransformerConfig",
    "check_positive_ints",
]

# transformers' names for the activations SigLIP checkpoints use; timm's "gelu_tanh" is the same function.
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
# transformers' Siglip2VisionConfig default: a 16x16 learned position grid.
NAFLEX_NUM_PATCHES = 256
RESAMPLE_FILTERS = ("bilinear", "bicubic", "lanczos")  # lanczos: Idefics3 / SmolVLM (torchvision >= 0.27)
# How a NaFlex processor picks each image's patch grid: "siglip2", the largest aspect-keeping grid within
# max_num_patches (transformers' Siglip2ImageProcessor); "smart", LFM2-VL's smart_resize (Qwen2-VL's rule): each side
# rounded to a multiple of grid_multiple patches, then scaled into [min_num_patches, max_num_patches].
NAFLEX_RESIZES = ("siglip2", "smart")
LETTERBOX_MIN_SIDE = 14  # DeepSeek-VL's processor's min_size default
# The letterboxes (ProcessorConfig.letterbox): resizes keeping each image's aspect ratio, then a pad to image_size,
# each as one model family's processor does it.
LETTERBOXES = (
    # DeepSeek-VL's: the longest side resized to the square's side, the other rounded half to even (at least
    # letterbox_min_side pixels); centred on the mean colour (letterbox_color), padded before rescaling
    "deepseek_vl",
    # DeepSeek-VL hybrid's low-resolution view: the same into a letterbox_canvas square first (its high_res_size),
    # which is then resized to image_size
    "deepseek_vl_hybrid",
    # pi0's (PI0ImageProcessor): fitted within image_size, both sides floored; padded at the bottom and right with
    # zeros after normalizing (the mean colour for a mean of 0.5 and a std of 0.5)
    "pi0",
    # Idefics2's (Idefics2ImageProcessor): images whose longest side exceeds image_size's are shrunk to it, the other
    # side truncated; each side then raised to at least letterbox_min_side (its shortest_edge). Its tower masks the
    # padding and every patch it reaches into: here each image is read on its own grid of whole patches.
    "idefics2",
    # Aria's (AriaImageProcessor): the longest side resized to image_size's, the other truncated and at least
    # letterbox_min_side (its min_image_size); padded at the bottom and right with black, its tower masking the
    # patches of padding only: here each image, padded with black to whole patches, is read on its own grid.
    "aria",
    # Phi-4-multimodal's global view (Phi4MultimodalImageProcessor): resized keeping the aspect ratio (bilinear) onto
    # a white canvas of up to letterbox_max_tiles squares of image_size (its dynamic_hd crops), normalized, then that
    # canvas resized to image_size (the processor's filter, without antialiasing, as it does)
    "phi4",
)
_MIN_SIDE_LETTERBOXES = ("deepseek_vl", "deepseek_vl_hybrid", "idefics2", "aria")
# Letterboxes whose images are read each on its own grid (the tower masks the padding): their processor gives
# patches and grids, as a NaFlex processor does.
OWN_GRID_LETTERBOXES = ("idefics2", "aria")
# How a fixed-resolution tower finds position embeddings for a grid other than its native one: "interpolate" resizes
# the table bicubically (SigLIP, transformers' interpolate_pos_encoding); "buckets" looks each patch's fractional
# coordinate up in the table (NaViT's scheme, Idefics3's and SmolVLM's towers).
POSITION_LOOKUPS = ("interpolate", "buckets")


def check_positive_ints(config: Any, *names: str) -> None:
    """Raise ValueError naming the first of ``config``'s fields ``names`` that is not a positive int."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


@dataclass(frozen=True)
class TransformerConfig:
    """The fields every tower's stack of pre-norm encoder layers takes (transformers' names and defaults)."""

    hidden_size: int = 768  # width D of every token
    intermediate_size: int = 3072  # MLP hidden width
    num_hidden_layers: int = 12  # number of encoder layers
    num_attention_heads: int = 12  # heads per attention layer; must divide hidden_size
    hidden_act: str = "gelu_pytorch_tanh"  # one of SUPPORTED_ACTIVATIONS
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0  # only active in train()

    def __post_init__(self) -> None:
        check_positive_ints(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads must divide hidden_size, got num_attention_heads={self.num_attention_heads}, "
                f"hidden_size={self.hidden_size}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {SUPPORTED_ACTIVATIONS}, got hidden_act={self.hidden_act!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got layer_norm_eps={self.layer_norm_eps!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got attention_dropout={self.attention_dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with ``changes`` applied (and validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EncoderConfig(TransformerConfig):
    """Hyperparameters of one vision tower.

    Exactly one of ``image_size`` (fixed-resolution) and ``num_patches`` (NaFlex) is set.
    """

    num_channels: int = 3  # input image channels
    patch_size: int = 16  # side of a square patch, in pixels
    image_size: int | None = 224  # fixed-resolution: native side length in pixels; None for NaFlex
    num_patches: int | None = None  # NaFlex: entries of the square learned position grid (256 = 16x16)
    use_head: bool = True  # whether the attention-pooling (MAP) head exists
    position_lookup: str = "interpolate"  # fixed-resolution grids other than the native one: one of POSITION_LOOKUPS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "num_channels", "patch_size")
        if self.position_lookup not in POSITION_LOOKUPS:
            raise ValueError(
                f"position_lookup must be one of {POSITION_LOOKUPS}, got position_lookup={self.position_lookup!r}"
            )
        if self.position_lookup != "interpolate" and self.num_patches is not None:
            raise ValueError(
                f"position_lookup={self.position_lookup!r} is for fixed-resolution towers; NaFlex towers resize their "
                f"grid bilinearly (leave position_lookup='interpolate')"
            )
        if (self.image_size is None) == (self.num_patches is None):
            raise ValueError(
                "set exactly one of image_size (fixed-resolution checkpoints) and num_patches (NaFlex checkpoints), "
                f"got image_size={self.image_size!r}, num_patches={self.num_patches!r}"
            )
        if self.image_size is not None:
            check_positive_ints(self, "image_size")
            # So400m/14 at 384 has a 27x27 grid: the last 384 - 27 * 14 = 6 pixel rows and columns are not seen.
            if self.image_size < self.patch_size:
                raise ValueError(
                    f"image_size must be at least patch_size, got image_size={self.image_size}, "
                    f"patch_size={self.patch_size}"
                )
        if self.num_patches is not None:
            check_positive_ints(self, "num_patches")
            if math.isqrt(self.num_patches) ** 2 != self.num_patches:
                raise ValueError(
                    f"num_patches must be a positive perfect square (the position grid is square), "
                    f"got num_patches={self.num_patches!r}"
                )

    @property
    def naflex(self) -> bool:
        """True for NaFlex towers (linear patch embedding, per-image resized position grid)."""
        return self.num_patches is not None

    @property
    def position_grid(self) -> int:
        """Side of the learned square position grid (27 for So400m/14 at 384, 16 for NaFlex)."""
        if self.num_patches is not None:
            return math.isqrt(self.num_patches)
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig(TransformerConfig):
    """Hyperparameters of one text tower (transformers' ``SiglipTextConfig`` / ``Siglip2TextConfig``)."""

    vocab_size: int = 32000  # token embedding rows (SigLIP 2's Gemma vocabulary: 256000)
    max_position_embeddings: int = 64  # the longest text, in tokens; SigLIP pads every text to this length
    projection_size: int | None = None  # width of the pooled feature after the head; None = hidden_size

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "vocab_size", "max_position_embeddings")
        if self.projection_size is not None:
            check_positive_ints(self, "projection_size")

    @property
    def output_size(self) -> int:
        """Width of the pooled text feature (the head's output)."""
        return self.projection_size or self.hidden_size


@dataclass(frozen=True)
class ProcessorConfig:
    """Preprocessing of one checkpoint. Set ``image_size`` (fixed-resolution) or ``max_num_patches`` (NaFlex)."""

    image_size: tuple[int, int] | None = (224, 224)  # fixed-resolution target (height, width)
    max_num_patches: int | None = None  # NaFlex: patch budget per image
    patch_size: int = 16  # the patch side where images are cut into patches (NaFlex, OWN_GRID_LETTERBOXES)
    resample: str = "bilinear"  # resize filter, one of RESAMPLE_FILTERS
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1]
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    naflex_resize: str = "siglip2"  # NaFlex: the grid rule, one of NAFLEX_RESIZES
    min_num_patches: int | None = None  # "smart" only: the patch floor
    grid_multiple: int = 1  # "smart" only: grid sides are multiples of this (LFM2-VL's downsample_factor)
    # Fixed-resolution: keep each image's aspect ratio and pad it to image_size, one of LETTERBOXES (whose processor
    # it reproduces). None: every image resized to image_size, its aspect ratio not kept.
    letterbox: str | None = None
    # The short side's floor of DeepSeek-VL's, Idefics2's and Aria's letterboxes (min_size, shortest_edge,
    # min_image_size); the default is DeepSeek-VL's 14: their processor files give Idefics2's and Aria's
    letterbox_min_side: int = LETTERBOX_MIN_SIDE
    # "deepseek_vl_hybrid" only: the side of the square images are letterboxed into first (its high_res_size)
    letterbox_canvas: int | None = None
    # "phi4" only: the most squares of image_size its canvas holds (Phi-4-multimodal's dynamic_hd)
    letterbox_max_tiles: int | None = None

    def __post_init__(self) -> None:
        if (self.image_size is None) == (self.max_num_patches is None):
            raise ValueError(
                f"set exactly one of image_size (fixed-resolution) and max_num_patches (NaFlex), got "
                f"image_size={self.image_size!r}, max_num_patches={self.max_num_patches!r}"
            )
        if self.image_size is not None:
            size = self.image_size
            if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size):
                raise ValueError(f"image_size must be (height, width) of positive ints, got image_size={size!r}")
            object.__setattr__(self, "image_size", tuple(size))
        if self.max_num_patches is not None:
            check_positive_ints(self, "max_num_patches")
        check_positive_ints(self, "patch_size")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {list(RESAMPLE_FILTERS)}, got resample={self.resample!r}")
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {name}={getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got image_std={self.image_std}")
        if self.naflex_resize not in NAFLEX_RESIZES:
            raise ValueError(f"naflex_resize must be one of {NAFLEX_RESIZES}, got naflex_resize={self.naflex_resize!r}")
        if self.naflex_resize == "smart":
            if self.max_num_patches is None:
                raise ValueError("naflex_resize='smart' is a NaFlex rule: set max_num_patches, not image_size")
            check_positive_ints(self, "min_num_patches", "grid_multiple")
        elif self.min_num_patches is not None or self.grid_multiple != 1:
            raise ValueError(
                f"min_num_patches and grid_multiple apply to naflex_resize='smart' only, got "
                f"min_num_patches={self.min_num_patches!r}, grid_multiple={self.grid_multiple!r}"
            )
        self._check_letterbox()

    def _check_letterbox(self) -> None:
        letterbox = self.letterbox
        if letterbox is not None and (not isinstance(letterbox, str) or letterbox not in LETTERBOXES):
            raise ValueError(f"letterbox must be one of {list(LETTERBOXES)} or None, got letterbox={letterbox!r}")
        if letterbox not in _MIN_SIDE_LETTERBOXES and self.letterbox_min_side != LETTERBOX_MIN_SIDE:
            raise ValueError(
                f"letterbox_min_side applies with letterbox={', '.join(map(repr, _MIN_SIDE_LETTERBOXES))} only, got "
                f"letterbox={letterbox!r}, letterbox_min_side={self.letterbox_min_side!r}"
            )
        if (letterbox == "deepseek_vl_hybrid") != (self.letterbox_canvas is not None):
            raise ValueError(
                f"letterbox_canvas is the first square of letterbox='deepseek_vl_hybrid' and applies to it only: set "
                f"both or neither, got letterbox={letterbox!r}, letterbox_canvas={self.letterbox_canvas!r}"
            )
        if (letterbox == "phi4") != (self.letterbox_max_tiles is not None):
            raise ValueError(
                f"letterbox_max_tiles is the canvas of letterbox='phi4' and applies to it only: set both or neither, "
                f"got letterbox={letterbox!r}, letterbox_max_tiles={self.letterbox_max_tiles!r}"
            )
        if letterbox is None:
            return
        if self.image_size is None or not self.do_resize:
            raise ValueError(
                f"letterbox={letterbox!r} resizes images to fit image_size: it needs image_size and do_resize=True, "
                f"got image_size={self.image_size!r}, do_resize={self.do_resize!r}"
            )
        if letterbox == "pi0":
            return
        if self.image_size[0] != self.image_size[1]:
            raise ValueError(
                f"letterbox={letterbox!r} fits images into a square: it needs a square image_size, got "
                f"image_size={self.image_size!r}"
            )
        if letterbox == "phi4":
            check_positive_ints(self, "letterbox_max_tiles")
            return
        check_positive_ints(self, "letterbox_min_side")
        if letterbox == "deepseek_vl_hybrid":
            check_positive_ints(self, "letterbox_canvas")
        side = self.letterbox_canvas or self.image_size[0]
        if self.letterbox_min_side > side:
            raise ValueError(
                f"letterbox_min_side must be at most the square's side {side}, got "
                f"letterbox_min_side={self.letterbox_min_side}"
            )
        if letterbox == "idefics2" and self.letterbox_min_side < self.patch_size:
            raise ValueError(  # Idefics2's tower would see a side of no whole patch
                f"letterbox='idefics2' needs letterbox_min_side of at least the patch size {self.patch_size}, got "
                f"letterbox_min_side={self.letterbox_min_side}"
            )

    @property
    def naflex(self) -> bool:
        return self.max_num_patches is not None

    @property
    def own_grids(self) -> bool:
        """Whether each image is read on its own patch grid, the processor giving (B, L, p * p * C) patches with
        ``spatial_shapes``: NaFlex, and the letterboxes whose tower masks the padding (Idefics2's, Aria's)."""
        return self.naflex or self.letterbox in OWN_GRID_LETTERBOXES

    @property
    def letterbox_color(self) -> tuple[int, ...]:
        """DeepSeek-VL's letterboxes' padding, RGB 0-255: the mean colour, truncated, as DeepSeek-VL's processor
        takes it."""
        return tuple(int(mean * 255) for mean in self.image_mean)

    @classmethod
    def default_for(cls, config: EncoderConfig, resample: str = "bilinear") -> ProcessorConfig:
        """SigLIP 2's preprocessing for a tower: native size, or a budget equal to the position grid's size."""
        if config.naflex:
            return cls(
                image_size=None, max_num_patches=config.num_patches, patch_size=config.patch_size, resample=resample
            )
        return cls(image_size=(config.image_size, config.image_size), patch_size=config.patch_size, resample=resample)

    def replace(self, **changes: Any) -> ProcessorConfig:
        return replace(self, **changes)

    def at_size(self, size: tuple[int, int]) -> ProcessorConfig:
        """This preprocessing (filter, rescaling, normalization) resizing every image to ``size`` (height, width)."""
        return replace(
            self,
            image_size=size,
            max_num_patches=None,
            do_resize=True,
            naflex_resize="siglip2",
            min_num_patches=None,
            grid_multiple=1,
            letterbox=None,
            letterbox_min_side=LETTERBOX_MIN_SIDE,
            letterbox_canvas=None,
            letterbox_max_tiles=None,
        )
