"""The letterboxes (``ProcessorConfig(letterbox=...)``): each image resized keeping its aspect ratio and padded, as
transformers' DeepSeek-VL image processor does ("deepseek_vl": to the square, centred on the mean colour) and as its
pi0 one does ("pi0": at the bottom and right, with normalized zeros); the SigLIP towers of DeepSeek-VL, pi0 and
pi0.5 load with them. The oracles: transformers' ``DeepseekVLImageProcessor``, ``PI0ImageProcessor``,
``DeepseekVLForConditionalGeneration``, ``PI0ForConditionalGeneration`` and ``PI05ForConditionalGeneration``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import perturb, random_images
from PIL import Image
from test_llava import make_vlm, run_as_the_card_says
from test_vlm_import import build, move_tower, vision_tower
from transformers import AutoImageProcessor, Phi4MultimodalImageProcessor, PI0ImageProcessor
from transformers import DeepseekVLHybridImageProcessor as Hybrid
from transformers import DeepseekVLImageProcessor as Theirs
from transformers.image_utils import get_image_size_for_max_height_width

from siglip2_encoder import CheckpointError, EncoderConfig, ImageProcessor, ProcessorConfig, SigLIP2Encoder
from siglip2_encoder.checkpoints.hf_format import processor_config_from_hf, processor_config_to_hf
from siglip2_encoder.cli import EXIT_OK, main
from siglip2_encoder.data.processor import fit_size, letterbox_size, phi4_canvas
from siglip2_encoder.integrations.idefics3_export import export_idefics3
from siglip2_encoder.integrations.llava import VLMProcessor
from siglip2_encoder.integrations.llava_export import export_llava, import_llava
from siglip2_encoder.integrations.timm_models import save_timm

TOWER = EncoderConfig(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
# wide, tall, square, odd margins, smaller than the square (upscaled), a short side below min_size (14 px)
LETTERBOX_KINDS = "['deepseek_vl', 'deepseek_vl_hybrid', 'pi0', 'idefics2', 'aria', 'phi4']"
SIZES = [(20, 50), (50, 20), (40, 40), (33, 31), (31, 64), (5, 9), (8, 300), (300, 8), (21, 22)]


def ours_for(theirs: Theirs | Hybrid | PI0ImageProcessor) -> ImageProcessor:
    return ImageProcessor(processor_config_from_hf(theirs.to_dict(), TOWER))


@pytest.mark.parametrize("settings", [{}, {"min_size": 4}, {"image_mean": [0.5, 0.5, 0.5], "resample": 2}])
def test_letterbox_equals_deepseek_vls_processor_pixel_for_pixel(settings):
    theirs = Theirs(size={"height": 32, "width": 32}, **settings)
    ours = ours_for(theirs)
    assert ours.config.letterbox == "deepseek_vl" and ours.config.letterbox_min_side == settings.get("min_size", 14)
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


def saved_as_theirs(config: ProcessorConfig, folder, kind: type, sizes: list, seed: int):
    """save_pretrained writes transformers' ``kind`` settings: AutoImageProcessor loads that class and preprocesses as
    we do, and the file loads back as the same config. Returns their processor."""
    SigLIP2Encoder(TOWER, config).save_pretrained(folder)
    theirs = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(theirs, kind)
    images = random_images(seed, sizes)
    want = theirs(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ImageProcessor(config)(images).pixel_values, want, atol=1e-6, rtol=0)
    assert ImageProcessor.from_pretrained(folder).config == config
    return theirs


def test_a_saved_letterbox_tower_is_deepseek_vls_processor_in_transformers(tmp_path):
    config = ProcessorConfig(
        image_size=(32, 32), patch_size=8, resample="bicubic", letterbox="deepseek_vl", letterbox_min_side=6
    )
    assert saved_as_theirs(config, tmp_path, Theirs, SIZES, seed=2).min_size == 6
    assert processor_config_from_hf(processor_config_to_hf(config), TOWER) == config


@pytest.mark.parametrize(
    "settings",
    [
        {},  # its first square larger than the view, as its 1024 and 384
        {"high_res_size": {"height": 24, "width": 24}, "min_size": 4},  # smaller: upscaled to the view
        {"resample": 2, "high_res_resample": 2, "image_mean": [0.5] * 3, "high_res_image_mean": [0.5] * 3},
    ],
)
def test_deepseek_vl_hybrids_low_resolution_view_equals_its_processor_pixel_for_pixel(settings):
    """DeepSeek-VL hybrid's processor letterboxes each image into its high_res_size square, then resizes that square
    to size: its pixel_values (the SigLIP tower's view) equal ours."""
    settings = {"high_res_size": {"height": 64, "width": 64}} | settings
    theirs = Hybrid(size={"height": 32, "width": 32}, **settings)
    ours = ours_for(theirs)
    assert ours.config.letterbox == "deepseek_vl_hybrid"
    assert ours.config.letterbox_canvas == settings["high_res_size"]["height"]
    images = random_images(10, SIZES)
    want = theirs(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours(images).pixel_values, want, atol=1e-6, rtol=0)


def test_a_saved_deepseek_vl_hybrid_view_is_its_processor_in_transformers(tmp_path):
    config = ProcessorConfig(
        image_size=(32, 32),
        patch_size=8,
        resample="bicubic",
        letterbox="deepseek_vl_hybrid",
        letterbox_canvas=48,
        letterbox_min_side=6,
    )
    assert saved_as_theirs(config, tmp_path, Hybrid, SIZES, seed=11).high_res_size.height == 48


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"high_res_resample": 2},
            "the image processor resizes into its high_res_size square with high_res_resample=2 and then with "
            "resample=3; this library uses one filter: set them equal",
        ),
        (
            {"high_res_image_mean": [0.5, 0.5, 0.5]},
            "the image processor pads its high_res_size square with [127, 127, 127] (high_res_image_mean) and its "
            "view with [122, 116, 104] (image_mean); this library pads with one colour: set the means equal",
        ),
        (
            {"high_res_size": {"height": 64, "width": 48}},
            "the image processor's high_res_size must be a square, got high_res_size={'height': 64, 'width': 48}",
        ),
    ],
)
def test_deepseek_vl_hybrid_settings_not_reproduced_are_refused(settings, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        processor_config_from_hf({"image_processor_type": "DeepseekVLHybridImageProcessor"} | settings, TOWER)


# (family, where its tower's keys are moved from 5.x's model.vision_model., None: as saved): DeepSeek-VL in 5.x's, 4.x's
# and its model's layouts, its hybrid's SigLIP tower (beside SAM's, not read), pi0 and pi0.5 as transformers saves them
# (test_vlm_import has their other layouts)
LETTERBOX_TOWERS = [
    ("deepseek_vl", "model.vision_model."),
    ("deepseek_vl", "model.vision_model.vision_model."),
    ("deepseek_vl", "vision_model."),
    ("deepseek_vl", "vision_model.vision_model."),
    ("deepseek_vl_hybrid", "model.vision_model."),
    ("janus", "model.vision_model."),  # Janus / Janus-Pro: DeepSeek-VL's processor
    ("janus", "vision_model."),
    ("deepseek_vl_hybrid", "vision_model.vision_model."),
    ("pi0", None),
    ("pi05", None),
]
LETTERBOX_OF = {"deepseek_vl": "deepseek_vl", "deepseek_vl_hybrid": "deepseek_vl_hybrid", "janus": "deepseek_vl"}
LETTERBOX_OF |= {"pi0": "pi0", "pi05": "pi0"}


@pytest.mark.parametrize(("family", "layout"), LETTERBOX_TOWERS)
def test_a_letterbox_familys_tower_and_processor_give_its_features(family, layout, tmp_path):
    """The tower loads with its processor as the family's letterbox, and equals theirs (head included where there is
    one): image -> ours equals image -> their processor -> their tower (the hybrid's: its low-resolution view)."""
    vlm, processor = build(family)
    vlm = perturb(vlm, seed=5).eval()
    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    if layout is not None:
        move_tower(tmp_path, "model.vision_model.", layout)
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert ours.processor_config.letterbox == LETTERBOX_OF[family]
    assert ours.config.use_head == family.startswith("deepseek_vl")
    images = random_images(3, [(20, 50), (64, 30)])
    pixels = type(processor).from_pretrained(tmp_path)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = vision_tower(vlm)(pixels)
        got = ours(ImageProcessor(ours.processor_config)(images).pixel_values)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=0)
    if ours.config.use_head:
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)


def test_a_processor_without_padding_is_refused():
    settings = Theirs(size={"height": 32, "width": 32}, do_pad=False).to_dict()
    message = (
        "the image processor 'DeepseekVLImageProcessor' has do_pad=false: each image keeps its own aspect ratio and "
        "size, which this library does not reproduce (its views have one size); set do_pad true, its default"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        processor_config_from_hf(settings, TOWER)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(image_size=(32, 48), letterbox="deepseek_vl"),
            "letterbox='deepseek_vl' fits images into a square: it needs a square image_size, got image_size=(32, 48)",
        ),
        (
            dict(image_size=None, max_num_patches=64, letterbox="pi0"),
            "letterbox='pi0' resizes images to fit image_size: it needs image_size and do_resize=True, got "
            "image_size=None, do_resize=True",
        ),
        (
            dict(letterbox="deepseek_vl", do_resize=False),
            "letterbox='deepseek_vl' resizes images to fit image_size: it needs image_size and do_resize=True, got "
            "image_size=(224, 224), do_resize=False",
        ),
        (
            dict(letterbox_min_side=4),
            "letterbox_min_side applies with letterbox='deepseek_vl', 'deepseek_vl_hybrid', 'idefics2', 'aria' only, "
            "got "
            "letterbox=None, letterbox_min_side=4",
        ),
        (
            dict(letterbox="pi0", letterbox_min_side=4),
            "letterbox_min_side applies with letterbox='deepseek_vl', 'deepseek_vl_hybrid', 'idefics2', 'aria' only, "
            "got "
            "letterbox='pi0', letterbox_min_side=4",
        ),
        (
            dict(letterbox="deepseek_vl", letterbox_canvas=64),
            "letterbox_canvas is the first square of letterbox='deepseek_vl_hybrid' and applies to it only: set both "
            "or neither, got letterbox='deepseek_vl', letterbox_canvas=64",
        ),
        (
            dict(letterbox="deepseek_vl_hybrid"),
            "letterbox_canvas is the first square of letterbox='deepseek_vl_hybrid' and applies to it only: set both "
            "or neither, got letterbox='deepseek_vl_hybrid', letterbox_canvas=None",
        ),
        (
            dict(letterbox="deepseek_vl_hybrid", letterbox_canvas=0),
            "letterbox_canvas must be a positive int, got letterbox_canvas=0",
        ),
        (
            dict(letterbox="deepseek_vl_hybrid", letterbox_canvas=64, letterbox_min_side=100),
            "letterbox_min_side must be at most the square's side 64, got letterbox_min_side=100",
        ),
        (
            dict(letterbox="deepseek_vl", letterbox_min_side=300),
            "letterbox_min_side must be at most the square's side 224, got letterbox_min_side=300",
        ),
        (
            dict(letterbox="deepseek_vl", letterbox_min_side=0),
            "letterbox_min_side must be a positive int, got letterbox_min_side=0",
        ),
        (
            dict(letterbox="phi4"),
            "letterbox_max_tiles is the canvas of letterbox='phi4' and applies to it only: set both or neither, got "
            "letterbox='phi4', letterbox_max_tiles=None",
        ),
        (
            dict(letterbox="pi0", letterbox_max_tiles=4),
            "letterbox_max_tiles is the canvas of letterbox='phi4' and applies to it only: set both or neither, got "
            "letterbox='pi0', letterbox_max_tiles=4",
        ),
        (
            dict(letterbox="phi4", letterbox_max_tiles=0),
            "letterbox_max_tiles must be a positive int, got letterbox_max_tiles=0",
        ),
        (
            dict(image_size=(32, 48), letterbox="phi4", letterbox_max_tiles=4),
            "letterbox='phi4' fits images into a square: it needs a square image_size, got image_size=(32, 48)",
        ),
        (dict(letterbox=True), f"letterbox must be one of {LETTERBOX_KINDS} or None, got letterbox=True"),
        (dict(letterbox="centre"), f"letterbox must be one of {LETTERBOX_KINDS} or None, got letterbox='centre'"),
    ],
)
def test_bad_letterbox_settings_are_refused(fields, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        ProcessorConfig(**fields)


# wide, tall, square, odd margins, upscaled, slivers (a side of 2 px), already the size
PI0_SIZES = [(20, 50), (50, 20), (40, 40), (33, 31), (31, 64), (5, 9), (7, 100), (100, 7), (32, 32), (63, 17)]


def pi0_processor(height: int = 32, width: int = 32, **settings) -> PI0ImageProcessor:
    size = {"max_height": height, "max_width": width}
    return PI0ImageProcessor(size=size, pad_size={"height": height, "width": width}, **settings)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"height": 24, "width": 40, "resample": 2},
        {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
        {"do_normalize": False},
    ],
)
def test_pi0s_letterbox_equals_its_processor_pixel_for_pixel(settings):
    """pi0's processor fits each image within size (both sides floored) and pads it at the bottom and right with
    zeros after normalizing: ours equals it on every kind of image, and under other sizes and settings."""
    theirs = pi0_processor(**settings)
    ours = ours_for(theirs)
    box = (settings.get("height", 32), settings.get("width", 32))
    assert ours.config.letterbox == "pi0" and ours.config.image_size == box
    images = random_images(6, PI0_SIZES)
    want = theirs(images, return_tensors="pt")["pixel_values"]
    got = ours(images).pixel_values
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for pixels, size in zip(got, PI0_SIZES):  # zeros below and right of the image, the image elsewhere
        height, width = fit_size(*size, *box)
        assert (pixels[:, height:] == 0).all() and (pixels[:, :, width:] == 0).all()
        assert (pixels[:, :height, :width] != 0).any(dim=0).float().mean() > 0.9


def test_fit_size_is_transformers_rule():
    sizes = [(h, w) for h in (1, 3, 7, 31, 32, 33, 100, 224, 225, 999) for w in (1, 5, 32, 47, 224, 640, 1001)]
    for height, width in sizes:
        for box in ((32, 32), (224, 224), (24, 40)):
            assert fit_size(height, width, *box) == get_image_size_for_max_height_width((height, width), *box)


def test_pi0s_letterbox_refuses_an_image_it_would_empty():
    message = "image 1 (1x100) fits 32x32 as 0x32, an empty image: its aspect ratio is too extreme for this processor"
    with pytest.raises(ValueError, match=re.escape(message)):
        ours_for(pi0_processor())(random_images(7, [(10, 10), (1, 100)]))


def test_a_saved_pi0_letterbox_tower_is_pi0s_processor_in_transformers(tmp_path):
    config = ProcessorConfig(image_size=(24, 40), patch_size=8, resample="bicubic", letterbox="pi0")
    saved_as_theirs(config, tmp_path, PI0ImageProcessor, PI0_SIZES, seed=8)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"size": {"max_height": 32, "max_width": 32}, "pad_size": {"height": 40, "width": 40}},
            "the image processor fits images within 32x32 (size) and pads them to pad_size={'height': 40, 'width': "
            "40}; this library pads them to the size they fit within: set pad_size to {'height': 32, 'width': 32}",
        ),
        (
            {"size": {"height": 32, "width": 32}},
            "the image processor's size must give max_height and max_width, got size={'height': 32, 'width': 32}",
        ),
        (
            {"do_pad": False},
            "the image processor 'PI0ImageProcessor' has do_pad=false: each image keeps its own aspect ratio and size",
        ),
    ],
)
def test_pi0_processor_settings_not_reproduced_are_refused(settings, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        processor_config_from_hf({"image_processor_type": "PI0ImageProcessor"} | settings, TOWER)


@pytest.mark.parametrize(
    ("letterbox", "text"),
    [
        ("deepseek_vl", "resize to 32x32, aspect ratio kept, centred, padded with [127, 127, 127], bicubic"),
        ("pi0", "resize to 32x32, aspect ratio kept, padded at the bottom and right with normalized zeros, bicubic"),
        (
            "deepseek_vl_hybrid",
            "resize to 32x32, aspect ratio kept, centred in a 64x64 square padded with [127, 127, 127], then "
            "resized, bicubic",
        ),
        (
            "phi4",
            "resize to 32x32, aspect ratio kept on a white canvas of up to 6 squares of 32 (Phi-4-multimodal's global "
            "view), bicubic",
        ),
    ],
)
def test_info_says_how_a_letterbox_pads(letterbox, text, tmp_path, capsys):
    canvas = 64 if letterbox == "deepseek_vl_hybrid" else None
    tiles = 6 if letterbox == "phi4" else None
    config = ProcessorConfig(
        image_size=(32, 32),
        patch_size=8,
        resample="bicubic",
        letterbox=letterbox,
        letterbox_canvas=canvas,
        letterbox_max_tiles=tiles,
    )
    SigLIP2Encoder(TOWER, config).save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == EXIT_OK
    assert f"preprocessing    {text}, mean [0.5, 0.5, 0.5]" in capsys.readouterr().out


def letterbox_vlm():
    """test_llava's LLaVA-style VLM whose tower's processor letterboxes (a short side of 4 px at least)."""
    model, _, tokenizer = make_vlm()
    perturb(model, seed=3)
    model.tower.processor_config = model.tower.processor_config.replace(letterbox="deepseek_vl", letterbox_min_side=4)
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


@pytest.mark.parametrize("letterbox", ["deepseek_vl", "pi0"])
def test_formats_that_cannot_letterbox_refuse_a_letterbox_tower(letterbox, tmp_path):
    model, _, tokenizer = make_vlm(projector="idefics3")
    model.tower.processor_config = model.tower.processor_config.replace(letterbox=letterbox)
    message = (
        f"cannot export to Idefics3's format: the tower's processor letterboxes images (letterbox={letterbox!r}), "
        "which that format's processor does not: its model would see other pixels; train with "
        "processor_config.at_size(processor_config.image_size) (no letterbox), or save it with save_pretrained"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_idefics3(model, tmp_path / "idefics3", tokenizer)
    message = (
        f"save_timm: the tower's processor letterboxes images (letterbox={letterbox!r}), which timm's transforms do "
        "not reproduce; save it with save_pretrained (transformers' image processor for it does)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        save_timm(model.tower, tmp_path / "timm")
    assert not (tmp_path / "idefics3").exists() and not (tmp_path / "timm").exists()


@pytest.mark.parametrize(("letterbox", "canvas"), [("pi0", None), ("deepseek_vl_hybrid", 64)])
def test_llava_exports_refuse_the_other_letterboxes(letterbox, canvas, tmp_path):
    """LLaVA's format takes DeepSeek-VL's letterbox only (its processor tested in LLaVA's consumers)."""
    model, _, tokenizer = make_vlm()
    config = model.tower.processor_config.replace(letterbox=letterbox, letterbox_canvas=canvas)
    model.tower.processor_config = config
    message = f"cannot export to LLaVA's format: the tower's processor letterboxes images (letterbox={letterbox!r})"
    with pytest.raises(ValueError, match=re.escape(message)):
        export_llava(model, tmp_path / "llava", tokenizer)
    assert not (tmp_path / "llava").exists()


# Phi-4-multimodal's global view: wide, tall, square, odd, a canvas of more squares than it holds (closest ratio),
# smaller than a square (upscaled), already the size
PHI4_SIZES = [(20, 50), (50, 20), (40, 40), (33, 31), (100, 40), (120, 40), (10, 10), (64, 96), (32, 32)]


def phi4_processor(**settings) -> Phi4MultimodalImageProcessor:
    return Phi4MultimodalImageProcessor(**{"size": {"height": 32, "width": 32}, "patch_size": 8} | settings)


@pytest.mark.parametrize(
    "settings",
    [{"dynamic_hd": 6}, {"dynamic_hd": 1}, {"resample": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073]}, {}],
)
def test_phi4s_global_view_equals_its_processor_pixel_for_pixel(settings):
    """Phi-4-multimodal's processor resizes each image (bilinear) onto a white canvas of squares, normalizes it and
    resizes the canvas to its size without antialiasing: ours equals that global view on every kind of image."""
    theirs = phi4_processor(**settings)
    ours = ours_for(theirs)
    assert (ours.config.letterbox, ours.config.letterbox_max_tiles) == ("phi4", settings.get("dynamic_hd", 36))
    images = random_images(11, PHI4_SIZES)
    want = theirs(images, return_tensors="pt")["image_pixel_values"][:, 0]
    torch.testing.assert_close(ours(images).pixel_values, want, atol=1e-6, rtol=0)


def test_phi4_canvas_is_its_layout_on_many_shapes():
    theirs = phi4_processor()
    generator = torch.Generator().manual_seed(0)
    shapes = torch.randint(1, 3000, (300, 2), generator=generator).tolist() + [[448, 448], [449, 448], [12, 3000]]
    for side, tiles in [(448, 36), (32, 6), (32, 1), (14, 9)]:
        for h, w in shapes:
            try:
                (columns, rows), (new_w, new_h), _ = theirs._get_crop_layout(h, w, side, max_num=tiles)
                want = ((new_h, new_w), (side * rows, side * columns))
            except ValueError:
                want = None
            try:
                got = phi4_canvas(h, w, side, tiles)
            except ValueError:
                got = None
            assert got == want, (h, w, side, tiles)


def test_phi4s_view_refuses_an_image_it_would_refuse():
    message = (
        "image 1 (5x300) would be resized to 3x192 on its 32x192 canvas, a side under 10 pixels: its aspect ratio is "
        "too extreme for Phi-4-multimodal's processor; crop it"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ours_for(phi4_processor(dynamic_hd=6))(random_images(7, [(10, 10), (5, 300)]))
    with pytest.raises(ValueError, match="the aspect ratio is very extreme"):
        phi4_processor(dynamic_hd=6)(random_images(7, [(5, 300)]))


def test_a_saved_phi4_global_view_is_its_processor_in_transformers(tmp_path):
    config = ProcessorConfig(
        image_size=(32, 32), patch_size=8, resample="bicubic", letterbox="phi4", letterbox_max_tiles=6
    )
    SigLIP2Encoder(TOWER, config).save_pretrained(tmp_path)
    theirs = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(theirs, Phi4MultimodalImageProcessor) and theirs.dynamic_hd == 6 and theirs.patch_size == 8
    images = random_images(12, PHI4_SIZES)
    want = theirs(images, return_tensors="pt")["image_pixel_values"][:, 0]
    torch.testing.assert_close(ImageProcessor(config)(images).pixel_values, want, atol=1e-6, rtol=0)
    assert ImageProcessor.from_pretrained(tmp_path).config == config
    message = "does not fit this fixed tower with patch_size=8; use ProcessorConfig.default_for(config)"
    with pytest.raises(ValueError, match=re.escape(message)):
        SigLIP2Encoder(TOWER, config.replace(patch_size=14))


def test_phi4s_tower_gives_its_global_views_features(tmp_path):
    """image -> ours (its processor's global view, its tower, hidden state -2 pooled 2x2) equals image -> its
    processor's global view -> the image embedding's get_img_features, on a wide and a tall image."""
    vlm, image_processor = build("phi4_multimodal")
    vlm = perturb(vlm, seed=6).eval()
    vlm.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    ours = SigLIP2Encoder.from_pretrained(tmp_path).eval()
    assert ours.processor_config.letterbox == "phi4"
    images = random_images(13, [(20, 50), (100, 40)])
    global_views = image_processor(images, return_tensors="pt")["image_pixel_values"][:, 0]
    with torch.no_grad():
        tokens = ours(**ImageProcessor(ours.processor_config)(images), layers=[-2]).tokens(-2)
        want = vlm.model.embed_tokens_extend.image_embed.get_img_features(global_views)
    pooled = torch.nn.functional.avg_pool2d(tokens.reshape(2, 4, 4, 32).permute(0, 3, 1, 2), 2)
    torch.testing.assert_close(pooled.flatten(2).transpose(1, 2), want, atol=1e-4, rtol=0)
