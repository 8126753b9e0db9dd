"""LFM2-VL's image splitting against transformers: ``Lfm2VlImageProcessor(do_image_splitting=True)`` (views pixel for
pixel, grids, masks, rows and columns) and ``Lfm2VlProcessor`` (the prompt around each image), at LFM2-VL's own
settings; what cannot be split is refused."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import random_images
from test_llava import make_tokenizer
from transformers import Lfm2VlImageProcessor, Lfm2VlProcessor

from siglip2_encoder import ImageProcessor, ProcessorConfig
from siglip2_encoder.integrations.lfm2_splitting import IMAGE_END, IMAGE_START, THUMBNAIL_TOKEN, Lfm2VlSplitting

# LFM2-VL's processor: 16 px patches, 2 x 2 unshuffle, 64 to 256 tokens per view
CONFIG = ProcessorConfig(
    image_size=None,
    patch_size=16,
    max_num_patches=1024,
    naflex_resize="smart",
    min_num_patches=256,
    grid_multiple=2,
    resample="bilinear",
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
)
# below the threshold (also a thin one), just under and just over it, wide, tall, extreme, and grids of equal aspect
# (2:1 and 4:2, 2x2 and 3x3) that the image's area decides between
SIZES = [(300, 400), (704, 704), (736, 736), (700, 1000), (1500, 600), (640, 3000), (600, 1200), (1000, 2000),
         (1024, 1024), (1500, 1500), (33, 2000)]  # fmt: skip
SETTINGS = [
    Lfm2VlSplitting(),  # LFM2-VL's defaults
    Lfm2VlSplitting(tile=256, min_tiles=3, max_tiles=7, use_thumbnail=False, max_pixels_tolerance=1.0),
]


def theirs(splitting: Lfm2VlSplitting) -> Lfm2VlImageProcessor:
    return Lfm2VlImageProcessor(
        tile_size=splitting.tile,
        min_tiles=splitting.min_tiles,
        max_tiles=splitting.max_tiles,
        use_thumbnail=splitting.use_thumbnail,
        max_pixels_tolerance=splitting.max_pixels_tolerance,
    )


@pytest.mark.parametrize(("splitting", "split_images"), list(zip(SETTINGS, [8, 9], strict=True)))
def test_views_equal_transformers_image_processor(splitting, split_images):
    processor, reference = ImageProcessor(CONFIG), theirs(splitting)
    images = random_images(0, SIZES)
    split = 0
    for image in images:
        want = reference(image, return_tensors="pt", return_row_col_info=True)
        rows, cols = splitting.grid(*image.shape[:2], CONFIG)
        assert (max(rows, 1), max(cols, 1)) == (int(want["image_rows"][0]), int(want["image_cols"][0]))
        views = splitting.views(image, processor)
        assert len(views) == len(want["pixel_values"]) == (rows * cols + splitting.use_thumbnail if rows else 1)
        got = processor.collate(views, max_num_patches=want["pixel_values"].shape[1], pad_to_max=True)
        torch.testing.assert_close(got.spatial_shapes, want["spatial_shapes"], atol=0, rtol=0)
        torch.testing.assert_close(got.pixel_attention_mask, want["pixel_attention_mask"], atol=0, rtol=0)
        torch.testing.assert_close(got.pixel_values, want["pixel_values"], atol=1e-6, rtol=0)
        split += rows > 0
    assert split == split_images  # all but the smallest (and, at a tolerance of 2, the one just under it)


@pytest.mark.parametrize(("low", "high"), [(2, 10), (2, 2), (3, 7), (2, 12), (4, 30)])
def test_the_grids_tried_are_transformers_in_its_order(low, high):
    assert Lfm2VlSplitting(min_tiles=low, max_tiles=high).ratios() == Lfm2VlImageProcessor()._target_ratios(low, high)


@pytest.mark.parametrize("splitting", SETTINGS)
def test_the_prompt_is_lfm2_vl_processors(splitting):
    reference = theirs(splitting)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([IMAGE_START, IMAGE_END, *splitting.row_col_tokens()], special_tokens=True)
    processor = Lfm2VlProcessor(reference, tokenizer)
    tile_tokens = (splitting.tile // 32) ** 2
    for image in random_images(1, SIZES):
        rows, cols = splitting.grid(*image.shape[:2], CONFIG)
        before, after = splitting.prompt(rows, cols)
        h, w = ImageProcessor(CONFIG).process_one(image).grid  # the one view, or the thumbnail
        counts = [tile_tokens] * (rows * cols) + ([(h // 2) * (w // 2)] if splitting.use_thumbnail or not rows else [])
        ours = "".join(text + "<image>" * n for text, n in zip(before, counts, strict=True)) + after
        inputs = reference(image, return_row_col_info=True)
        assert ours == processor.replace_image_token(inputs, 0, use_image_special_tokens=True)


def test_the_prompts_tags():
    splitting = Lfm2VlSplitting(max_tiles=3)
    assert splitting.prompt(0, 0) == ([IMAGE_START], IMAGE_END)
    tags = ["<|img_row_1_col_1|>", "<|img_row_1_col_2|>", "<|img_row_2_col_1|>", "<|img_row_2_col_2|>"]
    assert splitting.prompt(2, 2) == ([IMAGE_START + tags[0], *tags[1:], THUMBNAIL_TOKEN], IMAGE_END)
    assert len(splitting.row_col_tokens()) == 3 * 3 + 1  # the tags a 3 x 3 grid can need, and the thumbnail's


def test_bad_settings_are_refused():
    message = (
        "LFM2-VL splits an image into 2 or more tiles: need 2 <= min_tiles <= max_tiles, got min_tiles=1, "
        "max_tiles=4 (for one view per image, use no splitting)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        Lfm2VlSplitting(min_tiles=1, max_tiles=4)
    with pytest.raises(ValueError, match=re.escape("got min_tiles=5, max_tiles=4")):
        Lfm2VlSplitting(min_tiles=5, max_tiles=4)
    with pytest.raises(ValueError, match=re.escape("tile must be a positive int, got tile=0")):
        Lfm2VlSplitting(tile=0)
    with pytest.raises(TypeError, match=re.escape("use_thumbnail must be a bool, got 1")):
        Lfm2VlSplitting(use_thumbnail=1)
    with pytest.raises(ValueError, match=re.escape("max_pixels_tolerance must be positive, got 0")):
        Lfm2VlSplitting(max_pixels_tolerance=0)
    message = (
        "tile=500 must be a multiple of patch_size * grid_multiple = 32, so that each tile's grid unshuffles whole"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        Lfm2VlSplitting(tile=500).check(CONFIG)
    message = (
        "LFM2-VL's splitting needs a NaFlex tower sized by its smart rule; this one has naflex_resize='siglip2' "
        "(image_size=None): give the tower processor_config.replace(naflex_resize='smart', min_num_patches=..., "
        "grid_multiple=...)"
    )
    siglip2 = ProcessorConfig(image_size=None, patch_size=16, max_num_patches=256)
    with pytest.raises(ValueError, match=re.escape(message)):
        Lfm2VlSplitting().views(random_images(0, [(40, 40)])[0], ImageProcessor(siglip2))


def test_models_and_exports_refuse_a_splitting_they_cannot_do(tmp_path):
    """Each splitting needs its kind of tower, and no tiling beside it; an export whose format's processor does
    another splitting (or none) refuses the model, since its model would see other views."""
    from test_lfm2_vl_export import lfm2_vl_model
    from test_llava import make_vlm

    from siglip2_encoder.integrations.anyres import AnyResTiling
    from siglip2_encoder.integrations.idefics3_export import export_idefics3
    from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor
    from siglip2_encoder.integrations.llava_export import export_llava
    from siglip2_encoder.integrations.splitting import ImageSplitting

    fixed, _, _ = make_vlm()
    parts = (fixed.tower, fixed.projector, fixed.language_model, fixed.image_token_id)
    message = "LFM2-VL's splitting needs a NaFlex tower sized by its smart rule; this one has naflex_resize='siglip2'"
    with pytest.raises(ValueError, match=re.escape(message)):
        VisionLanguageModel(*parts, splitting=Lfm2VlSplitting())
    tiling = AnyResTiling.onevision(32, 8)
    message = "image splitting is a tiling of its own: give a model splitting or tiling, not both"
    with pytest.raises(ValueError, match=re.escape(message)):
        VisionLanguageModel(*parts, tiling=tiling, splitting=ImageSplitting(32, 96))
    with pytest.raises(TypeError, match=re.escape("splitting must be an ImageSplitting or an Lfm2VlSplitting, got")):
        VisionLanguageModel(*parts, splitting=tiling)
    split, processor, tokenizer = lfm2_vl_model(splitting=Lfm2VlSplitting(tile=32, max_tiles=3))
    naflex = (split.tower, split.projector, split.language_model, split.image_token_id)
    message = "image splitting into 32 px views needs a fixed-resolution tower of that input; this tower takes NaFlex"
    with pytest.raises(ValueError, match=re.escape(message)):
        VisionLanguageModel(*naflex, splitting=ImageSplitting(32, 96))
    message = "max_num_patches does not apply with splitting, which sizes each view itself"
    with pytest.raises(ValueError, match=re.escape(message)):
        processor(["<image>"], [random_images(0, [(40, 40)])], max_num_patches=8)
    message = (
        "cannot export to Idefics3's format: this model splits its images (Lfm2VlSplitting), which that format's "
        "processor does not do: its model would see other views; export it with export_lfm2_vl, or save it with "
        "save_pretrained"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_idefics3(split, tmp_path, tokenizer)
    idefics3 = VisionLanguageModel(*parts, splitting=ImageSplitting(32, 96))
    message = (
        "cannot export to LLaVA's format: this model splits its images (ImageSplitting), which that format's "
        "processor does not do: its model would see other views; export it with export_idefics3"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_llava(idefics3, tmp_path)
    with pytest.raises(ValueError, match=re.escape("leave image_start, image_end and tiling unset")):
        VLMProcessor.for_model(split, tokenizer, image_start=IMAGE_START)


def test_tiles_without_a_thumbnail_need_no_view_of_the_whole_image():
    """Without the thumbnail, an image too long to fit the budget as one view (40 x 30000: 2 x 876 patches) is still
    split as transformers splits it: only its tiles are made."""
    splitting = Lfm2VlSplitting(use_thumbnail=False)
    (image,) = random_images(0, [(40, 30000)])
    want = theirs(splitting)(image, return_tensors="pt")
    with pytest.raises(ValueError, match="its aspect ratio is too extreme for this processor"):
        ImageProcessor(CONFIG).process_one(image)
    views = splitting.views(image, ImageProcessor(CONFIG))
    assert len(views) == len(want["pixel_values"]) == 10
    got = ImageProcessor(CONFIG).collate(views, max_num_patches=want["pixel_values"].shape[1], pad_to_max=True)
    torch.testing.assert_close(got.pixel_values, want["pixel_values"], atol=1e-6, rtol=0)
