"""The letterbox (``ProcessorConfig(letterbox=True)``): each image resized keeping its aspect ratio and padded to the
square with the mean colour, as transformers' DeepSeek-VL image processor does; DeepSeek-VL's SigLIP tower loads
with it. The oracle: transformers' ``DeepseekVLImageProcessor`` and ``DeepseekVLForConditionalGeneration``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import perturb, random_images
from PIL import Image
from test_llava import make_vlm, run_as_the_card_says
from test_vlm_import import build, move_tower
from transformers import AutoImageProcessor
from transformers import DeepseekVLImageProcessor as Theirs

from siglip2_encoder import CheckpointError, EncoderConfig, ImageProcessor, ProcessorConfig, SigLIP2Encoder
from siglip2_encoder.checkpoints.hf_format import processor_config_from_hf, processor_config_to_hf
from siglip2_encoder.data.processor import letterbox_size
from siglip2_encoder.integrations.idefics3_export import export_idefics3
from siglip2_encoder.integrations.llava import VLMProcessor
from siglip2_encoder.integrations.llava_export import export_llava, import_llava
from siglip2_encoder.integrations.timm_models import save_timm

TOWER = EncoderConfig(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
# wide, tall, square, odd margins, smaller than the square (upscaled), a short side below min_size (14 px)
SIZES = [(20, 50), (50, 20), (40, 40), (33, 31), (31, 64), (5, 9), (8, 300), (300, 8), (21, 22)]


def ours_for(theirs: Theirs) -> ImageProcessor:
    return ImageProcessor(processor_config_from_hf(theirs.to_dict(), TOWER))


@pytest.mark.parametrize("settings", [{}, {"min_size": 4}, {"image_mean": [0.5, 0.5, 0.5], "resample": 2}])
def test_letterbox_equals_deepseek_vls_processor_pixel_for_pixel(settings):
    theirs = Theirs(size={"height": 32, "width": 32}, **settings)
    ours = ours_for(theirs)
    assert ours.config.letterbox and ours.config.letterbox_min_side == settings.get("min_size", 14)
    assert ours.config.letterbox_color == tuple(theirs.background_color)
    images = random_images(0, SIZES)
    want = theirs(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours(images).pixel_values, want, atol=1e-6, rtol=0)


def test_the_padding_of_float_images_is_the_same_colour():
    """Images given as floats in [0, 1] are padded with the colour in those units: the margins equal theirs."""
    theirs = Theirs(size={"height": 32, "width": 32})
    image = random_images(1, [(16, 32)])[0]
    want = theirs(image, return_tensors="pt")["pixel_values"][0]
    got = ours_for(theirs)(image.astype(np.float32) / 255).pixel_values[0]
    margins = torch.ones(32, 32, dtype=torch.bool)
    margins[8:24] = False  # the image: 16 rows, centred
    torch.testing.assert_close(got[:, margins], want[:, margins], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, ~margins], want[:, ~margins], atol=2e-2, rtol=0)  # resized in float vs uint8


def test_letterbox_size_keeps_the_aspect_ratio_rounding_half_to_even():
    assert letterbox_size(100, 200, 32, 14) == (16, 32)
    assert letterbox_size(20, 64, 32, 1) == (10, 32)
    assert letterbox_size(27, 64, 32, 1) == (14, 32)  # 13.5 rounds to even, as Python's round (DeepSeek-VL's)
    assert letterbox_size(5, 300, 32, 14) == (14, 32)


def test_a_saved_letterbox_tower_is_deepseek_vls_processor_in_transformers(tmp_path):
    """save_pretrained writes DeepseekVLImageProcessor settings: AutoImageProcessor preprocesses as we do, and they
    load back as the same config."""
    config = ProcessorConfig(
        image_size=(32, 32), patch_size=8, resample="bicubic", letterbox=True, letterbox_min_side=6
    )
    SigLIP2Encoder(TOWER, config).save_pretrained(tmp_path)
    theirs = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(theirs, Theirs) and theirs.min_size == 6
    images = random_images(2, SIZES)
    want = theirs(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ImageProcessor(config)(images).pixel_values, want, atol=1e-6, rtol=0)
    assert ImageProcessor.from_pretrained(tmp_path).config == config
    assert processor_config_from_hf(processor_config_to_hf(config), TOWER) == config


@pytest.mark.parametrize(
    "layout", ["model.vision_model.", "model.vision_model.vision_model.", "vision_model.", "vision_model.vision_model."]
)
def test_deepseek_vls_tower_and_processor_load_and_equal_theirs(layout, tmp_path):
    """DeepSeek-VL's SigLIP tower (5.x saves it under model.vision_model.; the others: 4.x and its model's layouts)
    equals theirs, head included; its processor loads as the letterbox; image -> ours equals image -> theirs."""
    vlm = perturb(build("deepseek_vl")[0], seed=5).eval()
    vlm.save_pretrained(tmp_path)
    Theirs(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    move_tower(tmp_path, "model.vision_model.", layout)
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert ours.processor_config.letterbox and ours.config.use_head
    images = random_images(3, [(20, 50), (64, 30)])
    pixels = Theirs.from_pretrained(tmp_path)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = vlm.model.vision_model(pixels)
        got = ours(ImageProcessor(ours.processor_config)(images).pixel_values)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)


def test_a_processor_without_padding_is_refused():
    settings = Theirs(size={"height": 32, "width": 32}, do_pad=False).to_dict()
    message = (
        "the image processor 'DeepseekVLImageProcessor' has do_pad=false: each image keeps its own aspect ratio and "
        "size, which this library does not reproduce (its views are squares); set do_pad true, its default"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        processor_config_from_hf(settings, TOWER)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(image_size=(32, 48), letterbox=True),
            "letterbox=True fits images into a square: it needs a square image_size and do_resize=True, got "
            "image_size=(32, 48), do_resize=True",
        ),
        (
            dict(image_size=None, max_num_patches=64, letterbox=True),
            "letterbox=True fits images into a square: it needs a square image_size and do_resize=True, got "
            "image_size=None, do_resize=True",
        ),
        (
            dict(letterbox=True, do_resize=False),
            "letterbox=True fits images into a square: it needs a square image_size and do_resize=True, got "
            "image_size=(224, 224), do_resize=False",
        ),
        (dict(letterbox_min_side=4), "letterbox_min_side applies with letterbox=True only, got letterbox_min_side=4"),
        (
            dict(letterbox=True, letterbox_min_side=300),
            "letterbox_min_side must be at most the square's side 224, got letterbox_min_side=300",
        ),
        (
            dict(letterbox=True, letterbox_min_side=0),
            "letterbox_min_side must be a positive int, got letterbox_min_side=0",
        ),
        (dict(letterbox=1), "letterbox must be a bool, got letterbox=1"),
    ],
)
def test_bad_letterbox_settings_are_refused(fields, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        ProcessorConfig(**fields)


def letterbox_vlm():
    """test_llava's LLaVA-style VLM whose tower's processor letterboxes (a short side of 4 px at least)."""
    model, _, tokenizer = make_vlm()
    perturb(model, seed=3)
    model.tower.processor_config = model.tower.processor_config.replace(letterbox=True, letterbox_min_side=4)
    processor = VLMProcessor(tokenizer, ImageProcessor(model.tower.processor_config), model.projector, patch_size=8)
    return model, processor, tokenizer


def test_a_letterbox_llava_export_runs_in_transformers_and_imports_back(tmp_path):
    """export_llava writes the letterbox as DeepSeek-VL's image processor, which LlavaProcessor takes: transformers
    alone (AutoProcessor + chat template + generate, and the pipeline) gives our prompt, pixels and greedy tokens on a
    wide image; import_llava gives the model back, letterbox and all."""
    model, processor, tokenizer = letterbox_vlm()
    export_llava(model, tmp_path, tokenizer)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), Theirs)
    image = Image.fromarray(random_images(4, [(20, 50)])[0])
    inputs, theirs = run_as_the_card_says(tmp_path, image, "what colour is the shape")
    batch = processor(["<image> what colour is the shape"], [[image]])
    assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], batch["pixel_values"], atol=1e-6, rtol=0)
    assert theirs == model.generate(**batch, max_new_tokens=8, do_sample=False).tolist()
    again = import_llava(tmp_path)
    assert again.tower.processor_config == model.tower.processor_config


def test_formats_that_cannot_letterbox_refuse_a_letterbox_tower(tmp_path):
    model, _, tokenizer = make_vlm(projector="idefics3")
    model.tower.processor_config = model.tower.processor_config.replace(letterbox=True)
    message = (
        "cannot export to Idefics3's format: the tower's processor letterboxes images (letterbox=True, DeepSeek-VL's), "
        "which that format's processor does not: its model would see other pixels; train with "
        "processor_config.replace(letterbox=False), or save it with save_pretrained"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_idefics3(model, tmp_path / "idefics3", tokenizer)
    message = (
        "save_timm: the tower's processor letterboxes images (letterbox=True, DeepSeek-VL's), which timm's transforms "
        "do not reproduce; save it with save_pretrained (transformers' DeepseekVLImageProcessor does)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        save_timm(model.tower, tmp_path / "timm")
    assert not (tmp_path / "idefics3").exists() and not (tmp_path / "timm").exists()
