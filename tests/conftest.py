"""Tiny random transformers checkpoints, saved with ``save_pretrained``: the oracles every parity test loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
# 36 = 4 * 8 + 4: like So400m/14 at 384, the native size is not a multiple of the patch size.
FIXED = dict(TINY, image_size=36, patch_size=8)
NAFLEX = dict(TINY, num_patches=16, patch_size=8)
NAFLEX_BUDGET = 24


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised biases and unit norms are exercised too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def random_images(seed: int, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """uint8 (H, W, 3) images with smooth structure plus noise, so resizing filters matter."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (3 + c) + yy / (5 + c)) for c in range(3)], -1) * 100 + 128
        out.append(np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def fixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers ``SiglipVisionModel`` folder (config, safetensors, bicubic SiglipImageProcessor)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_fixed")
    perturb(SiglipVisionModel(SiglipVisionConfig(**FIXED)), seed=1).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 36, "width": 36}, resample=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def naflex_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers ``Siglip2VisionModel`` folder with a ``Siglip2ImageProcessor``."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_naflex")
    perturb(Siglip2VisionModel(Siglip2VisionConfig(**NAFLEX)), seed=2).save_pretrained(folder)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=NAFLEX_BUDGET).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny NaFlex tower saved by this library (random weights), for command-line and extraction tests."""
    from siglip2_encoder import SigLIP2Encoder

    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    SigLIP2Encoder.from_preset("siglip2-base-patch16-naflex", **TINY).save_pretrained(folder)
    return folder
