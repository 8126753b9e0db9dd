"""Projectors from vision tokens to a language model's width, behind one interface.

Every projector takes :class:`VisionFeatures` (or an :class:`~siglip2_encoder.EncoderOutput`) and returns
:class:`ProjectedTokens` with exact per-image token counts; :meth:`Projector.num_tokens` gives a count without
running the projector. Build one from its config with :func:`build_projector`; save with ``save_pretrained`` and
load with :func:`load_projector`.

| kind | config | used by |
|---|---|---|
| ``linear`` | :class:`LinearConfig` | PaliGemma |
| ``mlp`` | :class:`MLPConfig` | LLaVA-1.5 (``mlp2x_gelu``) |
| ``pixel_shuffle`` | :class:`PixelShuffleConfig` | Idefics3, SmolVLM, nanoVLM |
| ``pool`` | :class:`PoolConfig` | LLaVA-OneVision |
| ``resampler`` | :class:`ResamplerConfig` | Flamingo, Qwen-VL, Idefics2 |
"""

from .base import (
    PROJECTORS,
    ProjectedTokens,
    Projector,
    ProjectorConfig,
    VisionFeatures,
    build_projector,
    load_projector,
)
from .pixel_shuffle import PixelShuffleConfig, PixelShuffleProjector, pixel_shuffle
from .pool import PoolConfig, PoolProjector
from .resampler import ResamplerConfig, ResamplerProjector
from .tokenwise import LinearConfig, LinearProjector, MLPConfig, MLPProjector

__all__ = [
    "PROJECTORS",
    "LinearConfig",
    "LinearProjector",
    "MLPConfig",
    "MLPProjector",
    "PixelShuffleConfig",
    "PixelShuffleProjector",
    "PoolConfig",
    "PoolProjector",
    "ProjectedTokens",
    "Projector",
    "ProjectorConfig",
    "ResamplerConfig",
    "ResamplerProjector",
    "VisionFeatures",
    "build_projector",
    "load_projector",
    "pixel_shuffle",
]
