"""Export of a pixel-shuffle VLM to transformers' Idefics3 format: Idefics3ForConditionalGeneration loads it and gives
the same logits on the same inputs; what the format cannot express is refused with the reason."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import perturb
from test_llava import images, make_vlm
from transformers import Idefics3ForConditionalGeneration

from siglip2_encoder.adapters import PixelShuffleConfig, build_projector
from siglip2_encoder.integrations.idefics3_export import export_idefics3


def test_export_to_idefics3_gives_the_same_logits(tmp_path):
    model, processor, tokenizer = make_vlm(projector="idefics3")
    perturb(model, seed=3)
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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(naflex=True), "NaFlex towers cannot be exported to Idefics3's format"),
        (dict(projector="mlp"), "a 'mlp' projector cannot be exported to it"),
        (
            dict(projector="pixel_shuffle"),
            "this projector has depth=1, bias=True, layers=(-2,) (build it with depth=1, bias=False, layers=(None,)",
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
