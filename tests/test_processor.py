"""Preprocessing parity with transformers' image processors, and input handling."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import random_images
from PIL import Image
from transformers import (
    Lfm2VlImageProcessor,
    Siglip2ImageProcessor,
    Siglip2ImageProcessorPil,
    SiglipImageProcessor,
    SiglipImageProcessorPil,
)
from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

from siglip2_encoder import (
    CheckpointError,
    EncoderConfig,
    ImageProcessor,
    ProcessorConfig,
    naflex_size,
    processor_config_from_hf,
    processor_config_to_hf,
    smart_size,
)

SIZES = [(37, 53), (224, 224), (13, 301), (480, 64), (1, 1), (5, 700), (333, 333), (90, 17)]


def fixed(resample: str, size=(48, 40)) -> tuple[ImageProcessor, dict]:
    ours = ImageProcessor(ProcessorConfig(image_size=size, resample=resample))
    return ours, dict(size={"height": size[0], "width": size[1]}, resample={"bilinear": 2, "bicubic": 3}[resample])


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_fixed_resolution_equals_transformers_torchvision_backend(resample):
    ours, kwargs = fixed(resample)
    images = random_images(0, SIZES)
    want = SiglipImageProcessor(**kwargs)(images, return_tensors="pt", input_data_format="channels_last")[
        "pixel_values"
    ]
    got = ours(images).pixel_values
    assert got.shape == want.shape == (len(SIZES), 3, 48, 40)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_fixed_resolution_close_to_transformers_pil_backend(resample):
    """PIL rounds differently (bilinear: at most 1 of 255 levels) and its bicubic kernel is a = -0.5 where torch's
    is a = -0.75, which differs at sharp edges (here at most 7 levels, on under 1% of values)."""
    ours, kwargs = fixed(resample)
    images = random_images(1, SIZES)
    want = SiglipImageProcessorPil(**kwargs)(images, return_tensors="pt", input_data_format="channels_last")
    levels = (ours(images).pixel_values - want["pixel_values"]).abs() * 127.5  # [-1, 1] back to 0-255 levels
    assert levels.mean() < 0.1
    if resample == "bilinear":
        assert levels.max() <= 1.001
    else:
        assert levels.max() <= 8.001 and (levels > 1.001).float().mean() < 0.01


@pytest.mark.parametrize("budget", [1, 7, 64, 256, 1024])
def test_naflex_sizes_and_patches_equal_transformers(budget):
    images = random_images(2, SIZES)
    want = Siglip2ImageProcessor(patch_size=16, max_num_patches=budget)(
        images, return_tensors="pt", input_data_format="channels_last"
    )
    got = ImageProcessor(ProcessorConfig(image_size=None, max_num_patches=budget, patch_size=16))(
        images, pad_to_max=True
    )
    assert got.spatial_shapes.tolist() == want["spatial_shapes"].tolist()
    assert got.pixel_attention_mask.dtype == want["pixel_attention_mask"].dtype == torch.int32
    assert torch.equal(got.pixel_attention_mask, want["pixel_attention_mask"])
    torch.testing.assert_close(got.pixel_values, want["pixel_values"], atol=1e-6, rtol=0)
    pil = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=budget)(
        images, return_tensors="pt", input_data_format="channels_last"
    )
    assert (got.pixel_values - pil["pixel_values"]).abs().max() * 127.5 <= 1.001


def test_naflex_size_rule_matches_transformers_on_many_shapes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 4000, size=2))
        patch, budget = int(rng.choice([14, 16])), int(rng.integers(1, 4097))
        assert naflex_size(h, w, patch, budget) == get_image_size_for_max_num_patches(h, w, patch, budget)
        th, tw = naflex_size(h, w, patch, budget)
        assert th % patch == tw % patch == 0 and (th // patch) * (tw // patch) <= max(budget, 1)


def test_input_kinds_give_the_same_pixels():
    ours, _ = fixed("bilinear")
    array = random_images(3, [(50, 60)])[0]
    reference = ours(array).pixel_values
    for image in (
        Image.fromarray(array),
        torch.from_numpy(array).permute(2, 0, 1),
        array / 255.0,
        torch.from_numpy(array).permute(2, 0, 1).float() / 255,
    ):
        torch.testing.assert_close(ours(image).pixel_values, reference, atol=0.02, rtol=0)
    batch = ours([array, Image.fromarray(array)])
    assert batch.pixel_values.shape == (2, 3, 48, 40) and batch.original_sizes == [(50, 60), (50, 60)]


def test_grey_and_transparent_images():
    ours, _ = fixed("bilinear")
    grey = np.full((20, 30), 100, np.uint8)
    out = ours([grey, Image.fromarray(grey), grey[..., None]]).pixel_values
    assert torch.allclose(out, torch.full_like(out, 100 / 255 * 2 - 1), atol=1e-5)
    rgba = np.zeros((20, 30, 4), np.uint8)  # fully transparent black -> white
    for image in (rgba, Image.fromarray(rgba, "RGBA")):
        assert torch.allclose(ours(image).pixel_values, torch.ones(1, 3, 48, 40))


def test_bad_inputs_raise_with_the_reason():
    ours, _ = fixed("bilinear")
    cases = [
        (np.zeros((0, 10, 3), np.uint8), ValueError, "empty"),
        (np.zeros((10, 10, 2), np.uint8), ValueError, "1, 3 or 4 channels"),
        (np.zeros((10, 10, 3), np.int32), TypeError, "dtype"),
        (np.full((10, 10, 3), np.nan, np.float32), ValueError, "NaN or Inf"),
        (np.full((10, 10, 3), 2.0, np.float32), ValueError, r"\[0, 1\]"),
        (torch.zeros(10, 10, 3), ValueError, r"\(C, H, W\)"),
        ("image.png", TypeError, "PIL image, a numpy array or a torch tensor"),
    ]
    for image, error, message in cases:
        with pytest.raises(error, match=message):
            ours([np.zeros((8, 8, 3), np.uint8), image])
    with pytest.raises(ValueError, match="no images"):
        ours([])
    with pytest.raises(ValueError, match="NaFlex checkpoints only"):
        ours(np.zeros((8, 8, 3), np.uint8), max_num_patches=4)


def test_config_validation_and_hf_round_trip():
    with pytest.raises(ValueError, match="exactly one of image_size"):
        ProcessorConfig(image_size=None)
    with pytest.raises(ValueError, match="resample"):
        ProcessorConfig(resample="nearest")
    with pytest.raises(ValueError, match="image_std"):
        ProcessorConfig(image_std=(0.5, 0.0, 0.5))
    fixed_tower = EncoderConfig(image_size=384, patch_size=14)
    naflex_tower = EncoderConfig(image_size=None, num_patches=256, patch_size=14)
    for config, tower in (
        (ProcessorConfig(image_size=(384, 384), resample="bicubic", patch_size=14), fixed_tower),
        (ProcessorConfig(image_size=None, max_num_patches=729, patch_size=14), naflex_tower),
    ):
        assert processor_config_from_hf(processor_config_to_hf(config), tower) == config


def test_smart_size_is_lfm2_vls_smart_resize_on_many_shapes():
    """Sizes (half-way roundings, both budget branches, extreme shapes) equal LFM2-VL's own smart_resize."""
    theirs = Lfm2VlImageProcessor()
    rng = np.random.default_rng(0)
    shapes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (300, 2))]
    shapes += [(16, 16), (48, 80), (80, 112), (1, 1), (1, 4000), (512, 512), (1024, 768)]
    for least, most, factor, patch in [(64, 256, 2, 16), (2, 6, 2, 8), (16, 64, 3, 14), (4, 9, 1, 16)]:
        for h, w in shapes:
            w_bar, h_bar = theirs.smart_resize(h, w, factor, least, most, patch)
            assert smart_size(h, w, patch, factor, least * factor**2, most * factor**2) == (h_bar, w_bar), (h, w)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(naflex_resize="qwen"), "naflex_resize must be one of ('siglip2', 'smart'), got naflex_resize='qwen'"),
        (dict(naflex_resize="smart", min_num_patches=4), "naflex_resize='smart' is a NaFlex rule: set max_num_patches"),
        (dict(image_size=None, max_num_patches=64, naflex_resize="smart"), "min_num_patches must be a positive int"),
        (dict(min_num_patches=4), "min_num_patches and grid_multiple apply to naflex_resize='smart' only"),
        (dict(grid_multiple=2), "min_num_patches and grid_multiple apply to naflex_resize='smart' only"),
    ],
)
def test_bad_naflex_rules_are_refused(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ProcessorConfig(**changes)


def test_a_smart_rule_lfm2_vl_cannot_express_is_refused_on_save():
    config = ProcessorConfig(
        image_size=None, max_num_patches=30, min_num_patches=8, naflex_resize="smart", grid_multiple=2
    )
    message = (
        "transformers' Lfm2VlImageProcessor counts its budgets in tokens of grid_multiple**2 = 4 patches; "
        "min_num_patches=8 and max_num_patches=30 must be multiples of 4"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        processor_config_to_hf(config)


@pytest.mark.parametrize(
    ("settings", "naflex", "message"),
    [
        ({"resample": 0}, False, r"resample=0; supported: \{1: 'lanczos', 2: 'bilinear', 3: 'bicubic'\}"),
        ({"image_processor_type": "CLIPImageProcessor"}, False, "the image processor is 'CLIPImageProcessor'"),
        ({"image_processor_type": "Siglip2ImageProcessor"}, False, "but the tower is fixed-resolution"),
        ({"image_processor_type": "SiglipImageProcessor"}, True, "but the tower is NaFlex"),
        ({"patch_size": 16}, True, "cuts 16-pixel patches but the tower's patch_size is 14"),
        ({"size": {"shortest_edge": 8}}, False, "size must give height and width"),
        (
            {"image_processor_type": "Idefics3ImageProcessor", "max_image_size": {"height": 8}},
            False,
            r"max_image_size must give longest_edge, got max_image_size=\{'height': 8\}",
        ),
        ({"image_std": [0.5, 0, 0.5]}, False, "image_std must not contain 0"),
    ],
)
def test_bad_processor_settings_are_refused(settings, naflex, message):
    tower = EncoderConfig(image_size=None if naflex else 28, num_patches=256 if naflex else None, patch_size=14)
    with pytest.raises(CheckpointError, match=message):
        processor_config_from_hf(settings, tower)
