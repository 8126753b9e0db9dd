"""Export of a pixel-shuffle VLM to transformers' Idefics3 format: Idefics3ForConditionalGeneration loads it and gives
the same logits on the same inputs, and transformers alone (AutoProcessor, chat template, generate) gives the same
prompt, pixels and generated tokens; what the format cannot express is refused with the reason."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import perturb
from PIL import Image
from test_llava import TOWER, images, make_vlm, run_as_the_card_says
from transformers import Idefics3ForConditionalGeneration

from siglip2_encoder import ImageProcessor, SigLIP2Encoder
from siglip2_encoder.adapters import PixelShuffleConfig, build_projector
from siglip2_encoder.integrations.idefics3_export import IMAGE_END, IMAGE_START, add_idefics3_tokens, export_idefics3
from siglip2_encoder.integrations.llava import VLMProcessor, add_image_token


def make_idefics3_vlm(tokenizer=None):
    """A VLM built for Idefics3's format: its tokens in the tokenizer and the LM, its text around each image."""
    model, _, tokenizer = make_vlm(projector="idefics3", tokenizer=tokenizer)
    assert add_idefics3_tokens(tokenizer, model.language_model) == model.image_token_id
    perturb(model, seed=3)
    image_processor = ImageProcessor(model.tower.processor_config)
    processor = VLMProcessor(
        tokenizer, image_processor, model.projector, patch_size=8, image_start=IMAGE_START, image_end=IMAGE_END
    )
    return model, processor, tokenizer


def test_export_to_idefics3_gives_the_same_logits(tmp_path):
    model, processor, tokenizer = make_idefics3_vlm()
    export_idefics3(model, tmp_path, tokenizer)
    theirs = Idefics3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = processor(["what colour is <image> the shape", "<image> describe image"], [images(1, 5), images(1, 6)])
    assert (batch["input_ids"] == model.image_token_id).sum() == 2 * 4  # a 4x4 grid shuffled by 2: 4 tokens
    with torch.no_grad():
        ours = model(**batch).logits
        want = theirs(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"][:, None],  # (samples, images per sample, C, H, W)
        ).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], want[real], atol=1e-4, rtol=0)


def test_an_idefics3_export_runs_in_transformers_end_to_end(tmp_path):
    model, processor, tokenizer = make_idefics3_vlm()
    export_idefics3(model, tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert "architectures" not in config["vision_config"]  # llama.cpp's --mmproj would pick SiglipVisionModel
    assert config["_pad_token_id"] == tokenizer.pad_token_id < len(tokenizer)  # not Idefics3Config's 128002
    image = Image.fromarray(images(1, 5, sizes=[(30, 50)])[0])
    inputs, theirs = run_as_the_card_says(tmp_path, image, "what colour is the shape")
    batch = processor(["<image> what colour is the shape"], [[image]])
    wrapped = tokenizer.convert_tokens_to_ids(["<s>", "<fake_token_around_image>", "<global-img>"])
    assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()
    assert batch["input_ids"][0, :3].tolist() == wrapped and (batch["input_ids"] == model.image_token_id).sum() == 4
    torch.testing.assert_close(inputs["pixel_values"][:, 0], batch["pixel_values"], atol=1e-6, rtol=0)
    assert theirs == model.generate(**batch, max_new_tokens=8, do_sample=False).tolist()


def test_a_tokenizer_without_idefics3s_tokens_is_refused(tmp_path):
    model, _, tokenizer = make_vlm(projector="idefics3")
    lacks = "the tokenizer lacks <fake_token_around_image>, <global-img>, <end_of_utterance>, which this format's"
    with pytest.raises(ValueError, match=re.escape(lacks)):
        export_idefics3(model, tmp_path, tokenizer)
    add_idefics3_tokens(tokenizer, model.language_model)
    model.image_token_id = add_image_token(tokenizer, model.language_model, "<img>")
    with pytest.raises(ValueError, match=re.escape("the model's image token is '<img>', but Idefics3's processor")):
        export_idefics3(model, tmp_path, tokenizer)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(naflex=True), "NaFlex towers cannot be exported to Idefics3's format"),
        (dict(projector="mlp"), "a 'mlp' projector cannot be exported to it"),
        (
            dict(projector="pixel_shuffle"),
            "this projector has depth=1, bias=True, norm=False, layers=(-2,) (build it with depth=1, bias=False, "
            "layers=(None,)",
        ),
    ],
)
def test_what_idefics3_cannot_express_is_refused(change, message, tmp_path):
    model, _, _ = make_vlm(**change)
    with pytest.raises(ValueError, match=re.escape(message)):
        export_idefics3(model, tmp_path)


def test_a_grid_the_factor_does_not_divide_is_refused(tmp_path):
    model, _, _ = make_vlm(projector="idefics3")
    model.projector = build_projector(
        PixelShuffleConfig(in_features=32, out_features=48, layers=(None,), depth=1, bias=False, factor=3)
    )
    with pytest.raises(ValueError, match=re.escape("4x4 grid is not divisible by factor=3")):
        export_idefics3(model, tmp_path)


def test_a_tower_that_would_read_other_position_cells_in_idefics3_is_refused(tmp_path):
    """Idefics3's tower looks positions up by buckets even at its native grid, which at a 38x38 grid reads a
    neighbour's cell for some patches: an interpolating tower of that grid would give other features there."""
    model, _, _ = make_vlm(projector="idefics3")
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **TOWER, patch_size=8, image_size=8 * 38)
    model.vision_tower = tower
    message = (
        "Idefics3's tower looks positions up by buckets, which at this tower's native 38x38 grid read a neighbour's "
        "cell for some patches (float32 coordinates), where this tower reads its table as is: transformers would "
        "compute other features. Export a tower of another image size, or one trained with position_lookup='buckets'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_idefics3(model, tmp_path)
