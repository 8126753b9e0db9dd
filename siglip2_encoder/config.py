"""Architecture config of the SigLIP / SigLIP 2 vision tower.

One frozen dataclass describes both families:

* fixed-resolution checkpoints (SigLIP 1 and SigLIP 2 "FixRes"): a conv patch embedding and a learned
  ``(image_size / patch_size) ** 2`` position table; set ``image_size``.
* NaFlex checkpoints (SigLIP 2): a linear patch embedding over patchified pixels and a learned square position grid
  of ``num_patches`` entries, resized per image; set ``num_patches``.

Field names follow transformers' ``SiglipVisionConfig`` / ``Siglip2VisionConfig`` so that configs convert one to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["EncoderConfig", "SUPPORTED_ACTIVATIONS", "check_positive_ints"]

# transformers' names for the activations SigLIP checkpoints use; timm's "gelu_tanh" is the same function.
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


def check_positive_ints(config: Any, *names: str) -> None:
    """Raise ValueError naming the first of ``config``'s fields ``names`` that is not a positive int."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


@dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of one vision tower.

    Exactly one of ``image_size`` (fixed-resolution) and ``num_patches`` (NaFlex) is set.
    """

    hidden_size: int = 768  # width D of every token
    intermediate_size: int = 3072  # MLP hidden width
    num_hidden_layers: int = 12  # number of encoder layers
    num_attention_heads: int = 12  # heads per attention layer; must divide hidden_size
    num_channels: int = 3  # input image channels
    patch_size: int = 16  # side of a square patch, in pixels
    image_size: int | None = 224  # fixed-resolution: native side length in pixels; None for NaFlex
    num_patches: int | None = None  # NaFlex: entries of the square learned position grid (256 = 16x16)
    hidden_act: str = "gelu_pytorch_tanh"  # one of SUPPORTED_ACTIVATIONS
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0  # only active in train()
    use_head: bool = True  # whether the attention-pooling (MAP) head exists

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "patch_size",
        )
        if (self.image_size is None) == (self.num_patches is None):
            raise ValueError(
                "set exactly one of image_size (fixed-resolution checkpoints) and num_patches (NaFlex checkpoints), "
                f"got image_size={self.image_size!r}, num_patches={self.num_patches!r}"
            )
        if self.image_size is not None:
            if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size <= 0:
                raise ValueError(f"image_size must be a positive int, got image_size={self.image_size!r}")
            # So400m/14 at 384 has a 27x27 grid: the last 384 - 27 * 14 = 6 pixel rows and columns are not seen.
            if self.image_size < self.patch_size:
                raise ValueError(
                    f"image_size must be at least patch_size, got image_size={self.image_size}, "
                    f"patch_size={self.patch_size}"
                )
        if self.num_patches is not None:
            if (
                not isinstance(self.num_patches, int)
                or self.num_patches <= 0
                or math.isqrt(self.num_patches) ** 2 != (self.num_patches)
            ):
                raise ValueError(
                    f"num_patches must be a positive perfect square (the position grid is square), "
                    f"got num_patches={self.num_patches!r}"
                )
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
    def naflex(self) -> bool:
        """True for NaFlex towers (linear patch embedding, per-image resized position grid)."""
        return self.num_patches is not None

    @property
    def position_grid(self) -> int:
        """Side of the learned square position grid (27 for So400m/14 at 384, 16 for NaFlex)."""
        if self.num_patches is not None:
            return math.isqrt(self.num_patches)
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> EncoderConfig:
        """A copy with ``changes`` applied (and validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
