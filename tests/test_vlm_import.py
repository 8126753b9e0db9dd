"""The SigLIP tower of VLM checkpoints (PaliGemma, Gemma 3, LLaVA) loads alone, strictly, in transformers 4's and 5's
key layouts, and equals the VLM's own vision tower in transformers on the same random weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import keep_only_shards_of, perturb
from safetensors.torch import load_file, save_file
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipImageProcessor,
)

from siglip2_encoder import CheckpointError, ImageProcessor, SigLIP2Encoder

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
LM = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
LM = LM | dict(head_dim=8, vocab_size=300)


def build(family: str) -> tuple[torch.nn.Module, object]:
    """A tiny random VLM of the family, with the image processor it ships with."""
    torch.manual_seed(0)
    if family == "paligemma":  # PaliGemma's tower has no pooling head
        config = PaliGemmaConfig(
            vision_config=TOWER | dict(image_size=32, vision_use_head=False), text_config=LM, projection_dim=16
        )
        return PaliGemmaForConditionalGeneration(config), SiglipImageProcessor(size={"height": 32, "width": 32})
    if family == "gemma3":
        config = Gemma3Config(vision_config=TOWER | dict(image_size=32), text_config=LM, mm_tokens_per_image=4)
        return Gemma3ForConditionalGeneration(config), Gemma3ImageProcessor(size={"height": 32, "width": 32})
    vision = TOWER | dict(image_size=32, model_type="siglip_vision_model")
    config = LlavaConfig(vision_config=vision, text_config=LM | dict(model_type="llama"))
    return LlavaForConditionalGeneration(config), SiglipImageProcessor(size={"height": 32, "width": 32})


# The tower's key prefix in each layout: 5.x saves, the Hub's 4.x checkpoints, 4.52+ saves (after the `model.`
# refactor), 5.x module names.
LAYOUTS = {
    "transformers 5": "vision_tower.",
    "transformers 4": "vision_tower.vision_model.",
    "transformers 4.52": "model.vision_tower.vision_model.",
    "module names": "model.vision_tower.",
}


def relayout(folder: Path, prefix: str) -> None:
    """Rewrite a transformers 5 save (``vision_tower.*``) with the tower under ``prefix``, the projector and language
    model untouched."""
    state = load_file(folder / "model.safetensors")
    renamed = {re.sub(r"^vision_tower\.", prefix, k): v for k, v in state.items()}
    assert renamed != state
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["paligemma", "gemma3", "llava"])
def test_vlm_tower_equals_the_vlms_own_vision_tower(family, layout, tmp_path):
    vlm, image_processor = build(family)
    vlm = perturb(vlm, seed=5).eval()
    vlm.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    if LAYOUTS[layout] != "vision_tower.":
        relayout(tmp_path, LAYOUTS[layout])
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert ours.config.use_head == (family != "paligemma")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vlm.model.vision_tower(pixel_values=x)
        got = ours(x)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=0)
    if family != "paligemma":
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor.config.image_size == (32, 32)
    assert processor.config.resample == ("bilinear" if family == "gemma3" else "bicubic")


def test_only_the_shards_holding_the_tower_are_read(tmp_path):
    vlm, _ = build("paligemma")
    vlm.save_pretrained(tmp_path, max_shard_size="20KB")
    keep_only_shards_of(tmp_path, "vision_tower.")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = vlm.eval().model.vision_tower(pixel_values=x).last_hidden_state
        got = SigLIP2Encoder.from_pretrained(tmp_path)(x).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_vlm_with_another_tower_or_pan_and_scan_is_refused(tmp_path):
    LlavaConfig(text_config=LM | dict(model_type="llama")).save_pretrained(tmp_path / "clip")  # a CLIP tower
    message = (
        "config.json is a 'llava' checkpoint whose vision tower is 'clip_vision_model', not a SigLIP tower "
        "(siglip_vision_model or siglip2_vision_model); load it with the library of its own tower"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        SigLIP2Encoder.from_pretrained(tmp_path / "clip")
    vlm, _ = build("gemma3")
    vlm.save_pretrained(tmp_path / "gemma3")
    Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=True).save_pretrained(tmp_path / "gemma3")
    with pytest.raises(CheckpointError, match=re.escape("crops pan-and-scan views (do_pan_and_scan=true)")):
        ImageProcessor.from_pretrained(tmp_path / "gemma3")
