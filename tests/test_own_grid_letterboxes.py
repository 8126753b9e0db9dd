"""The letterboxes whose tower masks the padding: each image read on its own grid of patches, as transformers'
``Idefics2ImageProcessor`` ("idefics2": shrunk within longest_edge, sides raised to shortest_edge, whole patches only)
and ``AriaImageProcessor`` ("aria": the longest side to max_image_size, padded with black to whole patches) prepare
it for their towers. The oracles: those processors, their own size rule, and AutoImageProcessor on what we save (the
towers themselves: test_vlm_import)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import random_images
from transformers import AriaImageProcessor, AutoImageProcessor, Idefics2ImageProcessor
from transformers.image_processing_utils import SizeDict
from transformers.models.idefics2.image_processing_idefics2 import get_resize_output_image_size

from siglip2_encoder import (
    CheckpointError,
    EncoderConfig,
    ExtractedFeatures,
    ImageProcessor,
    ProcessorConfig,
    SigLIP2Encoder,
)
from siglip2_encoder.checkpoints.hf_format import processor_config_from_hf, processor_config_to_hf
from siglip2_encoder.cli import EXIT_OK, main
from siglip2_encoder.data.processor import idefics2_size, unpatchify

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
IDEFICS2_TOWER = EncoderConfig(image_size=32, patch_size=8, position_lookup="buckets", use_head=False, **TINY)
ARIA_TOWER = EncoderConfig(image_size=490, patch_size=14, position_lookup="buckets", use_head=False, **TINY)
CLIP = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
# wide and tall over the longest edge, partial patches, under the shortest edge, slivers, the longest edge itself
IDEFICS2_SIZES = [(20, 50), (45, 30), (24, 27), (10, 10), (300, 8), (5, 100), (32, 32), (33, 31)]
# wide (the short side at its floor), tall with a partial patch column, square, upscaled, slivers, over 980
ARIA_SIZES = [(300, 700), (600, 500), (490, 490), (200, 150), (20, 900), (1000, 9), (1200, 1100)]


def their_views(
    theirs, images: list, mask_key: str, patch: int, whole: bool
) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """Each image's patch grid as their tower's mask counts it (``whole``: patches all image, as Idefics2's;
    otherwise any image, as Aria's) and its pixels on that grid, from their processor's padded batch."""
    out = theirs(images, return_tensors="pt")
    pixels, masks = out["pixel_values"], out[mask_key]
    if pixels.ndim == 5:  # Idefics2's: (samples, images per sample, C, H, W), the list one sample
        pixels, masks = pixels[0], masks[0]
    views = []
    for image, mask in zip(pixels, masks):
        counts = mask.unfold(0, patch, patch).unfold(1, patch, patch).sum((-1, -2))
        real = counts == patch * patch if whole else counts > 0
        grid = (int(real[:, 0].sum()), int(real[0].sum()))
        assert int(real.sum()) == grid[0] * grid[1]  # a top-left block
        views.append((grid, image[:, : grid[0] * patch, : grid[1] * patch]))
    return views


def assert_same_views(ours: ImageProcessor, theirs_views: list, images: list) -> None:
    batch = ours(images)
    p = ours.config.patch_size
    assert batch.spatial_shapes.tolist() == [list(grid) for grid, _ in theirs_views]
    for i, (grid, want) in enumerate(theirs_views):
        n = grid[0] * grid[1]
        assert batch.pixel_attention_mask[i].tolist() == [1] * n + [0] * (batch.pixel_values.shape[1] - n)
        torch.testing.assert_close(unpatchify(batch.pixel_values[i, :n], grid, p), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"size": {"shortest_edge": 8, "longest_edge": 40}, "resample": 3},
        {"size": {"shortest_edge": 16, "longest_edge": 32}, **CLIP, "resample": 1},
    ],
)
def test_idefics2s_view_equals_its_processor_pixel_for_pixel(settings):
    settings = {"size": {"shortest_edge": 16, "longest_edge": 32}} | settings
    theirs = Idefics2ImageProcessor(**settings)
    ours = ImageProcessor(processor_config_from_hf(theirs.to_dict(), IDEFICS2_TOWER))
    edges = settings["size"]
    assert (ours.config.letterbox, ours.config.letterbox_min_side) == ("idefics2", edges["shortest_edge"])
    assert ours.config.image_size == (edges["longest_edge"],) * 2
    images = random_images(0, IDEFICS2_SIZES)
    assert_same_views(ours, their_views(theirs, images, "pixel_attention_mask", 8, whole=True), images)


def test_idefics2_size_is_its_rule_on_many_shapes():
    generator = torch.Generator().manual_seed(0)
    shapes = torch.randint(1, 3000, (300, 2), generator=generator).tolist()
    shapes += [[980, 980], [981, 980], [980, 981], [1, 5000], [5000, 1], [378, 377]]
    for shortest, longest in [(378, 980), (16, 32), (100, 101)]:
        size = SizeDict(shortest_edge=shortest, longest_edge=longest)
        for h, w in shapes:
            want = get_resize_output_image_size(torch.empty(1, 1, 1).expand(3, h, w), size)
            assert idefics2_size(h, w, longest, shortest) == tuple(want), (h, w)


@pytest.mark.parametrize(
    "settings",
    [{}, {"min_image_size": 100, "resample": 2}, {"max_image_size": 980, "min_image_size": 28, **CLIP}],
)
def test_arias_view_equals_its_processor_pixel_for_pixel(settings):
    """Partial patches keep their black padding, normalized as the image (Aria pads before normalizing)."""
    theirs = AriaImageProcessor(**{"max_image_size": 490} | settings)
    ours = ImageProcessor(processor_config_from_hf(theirs.to_dict(), ARIA_TOWER))
    assert (ours.config.letterbox, ours.config.letterbox_min_side) == ("aria", theirs.min_image_size)
    assert ours.config.image_size == (theirs.max_image_size,) * 2
    images = random_images(1, ARIA_SIZES)
    assert_same_views(ours, their_views(theirs, images, "pixel_mask", 14, whole=False), images)


@pytest.mark.parametrize(
    ("tower", "config", "kind", "mask_key", "sizes"),
    [
        (
            IDEFICS2_TOWER,
            ProcessorConfig(image_size=(32, 32), patch_size=8, letterbox="idefics2", letterbox_min_side=12),
            Idefics2ImageProcessor,
            "pixel_attention_mask",
            IDEFICS2_SIZES,
        ),
        (
            ARIA_TOWER,
            ProcessorConfig(
                image_size=(490, 490), patch_size=14, resample="bicubic", letterbox="aria", letterbox_min_side=100
            ),
            AriaImageProcessor,
            "pixel_mask",
            ARIA_SIZES,
        ),
    ],
    ids=["idefics2", "aria"],
)
def test_a_saved_tower_is_their_processor_in_transformers(tower, config, kind, mask_key, sizes, tmp_path):
    """save_pretrained writes the letterbox as transformers' processor of that family: AutoImageProcessor loads it and
    gives our views, and the folder loads back with the same preprocessing."""
    SigLIP2Encoder(tower, config).save_pretrained(tmp_path)
    theirs = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(theirs, kind)
    images = random_images(2, sizes)
    whole = config.letterbox == "idefics2"
    assert_same_views(ImageProcessor(config), their_views(theirs, images, mask_key, tower.patch_size, whole), images)
    assert ImageProcessor.from_pretrained(tmp_path).config == config
    assert processor_config_from_hf(processor_config_to_hf(config), tower) == config


def test_a_fixed_tower_reads_patches_as_the_images_they_cut():
    """The processor's patches of own-grid images run as those images given as a list (one path, the conv's)."""
    config = ProcessorConfig(image_size=(32, 32), patch_size=8, letterbox="idefics2", letterbox_min_side=8)
    tower = SigLIP2Encoder(IDEFICS2_TOWER, config).eval()
    batch = ImageProcessor(config)(random_images(3, [(20, 50), (32, 32), (8, 9)]))
    images = [
        unpatchify(pixels[: h * w], (h, w), 8) for pixels, (h, w) in zip(batch.pixel_values, batch.spatial_shapes)
    ]
    with torch.no_grad():
        got, want = tower(**batch), tower(images)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert got.grids == want.grids == [(1, 4), (4, 4), (1, 1)]


@pytest.mark.parametrize(
    ("letterbox", "text"),
    [
        (
            "idefics2",
            "aspect ratio kept, the longest side at most 32, each side at least 14, each image on its own grid of "
            "whole patches, bilinear",
        ),
        (
            "aria",
            "aspect ratio kept, the longest side 32, the other at least 14, padded with black to whole patches, each "
            "image on its own grid, bilinear",
        ),
    ],
)
def test_info_says_how_the_images_are_read(letterbox, text, tmp_path, capsys):
    config = ProcessorConfig(image_size=(32, 32), patch_size=8, letterbox=letterbox)
    SigLIP2Encoder(IDEFICS2_TOWER, config).save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == EXIT_OK
    assert f"preprocessing    {text}, mean [0.5, 0.5, 0.5]" in capsys.readouterr().out


def test_extract_writes_each_images_own_grid(tmp_path):
    """The main job on an Idefics2-style folder: each image's tokens on its own grid, as the tower gives them."""
    from PIL import Image

    config = ProcessorConfig(image_size=(32, 32), patch_size=8, letterbox="idefics2", letterbox_min_side=8)
    model = SigLIP2Encoder(IDEFICS2_TOWER, config).eval()
    model.save_pretrained(tmp_path / "tower")
    images = random_images(4, [(20, 50), (32, 32), (45, 30)])
    (tmp_path / "images").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    args = ["extract", str(tmp_path / "images"), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "tower")]
    assert main([*args, "--tokens", "--batch-size", "2"]) == EXIT_OK
    features = ExtractedFeatures.open(tmp_path / "out")
    with torch.no_grad():
        want = model(**ImageProcessor(config)(images))
    for row, tokens in zip(sorted(features.ok, key=lambda row: row["path"]), want.feature_maps()):
        assert tuple(row["grid"]) == tuple(tokens.shape[1:])
        torch.testing.assert_close(features.feature_map(row["path"]), tokens, atol=1e-5, rtol=0)
    assert [tuple(row["grid"]) for row in sorted(features.ok, key=lambda row: row["path"])] == [(1, 4), (4, 4), (4, 2)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"image_processor_type": "Idefics2ImageProcessor", "size": {"height": 32, "width": 32}},
            "the image processor's size must give shortest_edge and longest_edge, got size={'height': 32, 'width': 32}",
        ),
        (
            {"image_processor_type": "Idefics2ImageProcessor", "size": {"shortest_edge": 4, "longest_edge": 32}},
            "invalid image processor settings: letterbox='idefics2' needs letterbox_min_side of at least the patch "
            "size 8, got letterbox_min_side=4",
        ),
        (
            {"image_processor_type": "Idefics2ImageProcessor", "do_resize": False},
            "invalid image processor settings: letterbox='idefics2' resizes images to fit image_size: it needs "
            "image_size and do_resize=True, got image_size=(980, 980), do_resize=False",
        ),
        (
            {"image_processor_type": "AriaImageProcessor", "min_image_size": 1000},
            "invalid image processor settings: letterbox_min_side must be at most the square's side 980, got "
            "letterbox_min_side=1000",
        ),
    ],
)
def test_settings_not_reproduced_are_refused(settings, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        processor_config_from_hf(settings, IDEFICS2_TOWER)


def test_a_tower_refuses_an_own_grid_processor_of_another_patch_size():
    config = ProcessorConfig(image_size=(32, 32), patch_size=16, letterbox="aria", letterbox_min_side=16)
    message = "does not fit this fixed tower with patch_size=8; use ProcessorConfig.default_for(config)"
    with pytest.raises(ValueError, match=re.escape(message)):
        SigLIP2Encoder(IDEFICS2_TOWER, config)


def test_arias_crops_are_named_in_a_warning(caplog):
    """With split_image, Aria's processor makes crops and no view of the whole image: the warning says so."""
    import logging

    with caplog.at_level(logging.WARNING):
        config = processor_config_from_hf(
            {"image_processor_type": "AriaImageProcessor", "split_image": True}, ARIA_TOWER
        )
    assert config.letterbox == "aria"
    assert (
        "the image processor AriaImageProcessor with split_image cuts each image into crops, each then a view, and "
        "makes no view of the whole image; here the whole image, as it is without split_image"
    ) in caplog.text
