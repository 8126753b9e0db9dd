"""Parity with transformers, the reference implementation: same checkpoint, same inputs, same numbers (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXED, NAFLEX, NAFLEX_BUDGET, TINY, perturb, random_images
from transformers import (
    AutoImageProcessor,
    Siglip2Config,
    Siglip2Model,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from siglip2_encoder import ImageProcessor, SigLIP2Encoder

ATOL = 1e-5  # tighter than the 1e-4 the project promises
LAYERS = [0, 1, 2, -2, -1]
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=99,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("size", [(36, 36), (48, 48), (24, 64), (64, 16)])
def test_fixed_resolution_matches_transformers(fixed_dir, attn, size):
    ref = SiglipVisionModel.from_pretrained(fixed_dir, attn_implementation=attn).eval()
    ours = SigLIP2Encoder.from_pretrained(fixed_dir)
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x, interpolate_pos_encoding=size != (36, 36), output_hidden_states=True)
        got = ours(x, layers=LAYERS)
    assert_close(got.last_hidden_state, want.last_hidden_state)
    assert_close(got.pooler_output, want.pooler_output)
    for i in LAYERS:
        assert_close(got.hidden_states[i], want.hidden_states[i])
    assert got.grids == [(size[0] // 8, size[1] // 8)] * 3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_naflex_mixed_aspect_ratios_match_transformers(naflex_dir, attn):
    ref = Siglip2VisionModel.from_pretrained(naflex_dir, attn_implementation=attn).eval()
    ours = SigLIP2Encoder.from_pretrained(naflex_dir)
    processor = AutoImageProcessor.from_pretrained(naflex_dir)
    images = random_images(0, [(30, 100), (64, 64), (100, 20), (9, 9), (200, 33)])
    for budget in (NAFLEX_BUDGET, 7, 40):
        inputs = processor(images, max_num_patches=budget, return_tensors="pt")
        with torch.no_grad():
            want = ref(**inputs, output_hidden_states=True)
            got = ours(**inputs, layers=LAYERS)
        mask = inputs["pixel_attention_mask"].bool()
        assert got.grids == [tuple(s) for s in inputs["spatial_shapes"].tolist()]
        assert len(set(got.grids)) > 1, "the batch must mix grids"
        assert_close(got.last_hidden_state[mask], want.last_hidden_state[mask])
        assert_close(got.pooler_output, want.pooler_output)
        for i in LAYERS:
            assert_close(got.hidden_states[i][mask], want.hidden_states[i][mask])
        assert got.last_hidden_state[~mask].abs().sum() == 0, "padding tokens are zeroed"


@pytest.mark.parametrize("naflex", [False, True])
def test_image_text_checkpoint_loads_its_vision_tower(tmp_path, naflex):
    torch.manual_seed(0)
    if naflex:
        ref = perturb(Siglip2Model(Siglip2Config(text_config=TEXT, vision_config=NAFLEX)))
    else:
        ref = perturb(SiglipModel(SiglipConfig(text_config=TEXT, vision_config=FIXED)))
    ref.save_pretrained(tmp_path)
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert ours.config.naflex == naflex
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        if naflex:
            from siglip2_encoder.data.processor import patchify

            patches = patchify(x, 8)
            shapes = torch.tensor([[4, 5], [4, 5]])
            mask = torch.ones(2, 20, dtype=torch.long)
            want = ref.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        else:
            want = ref.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
        got = ours(x)
    assert_close(got.pooler_output, want.pooler_output)
    assert_close(got.last_hidden_state, want.last_hidden_state)


@pytest.mark.parametrize("which", ["fixed", "naflex"])
def test_end_to_end_image_to_features(request, which):
    """image -> our processor -> our encoder == image -> transformers' processor -> transformers' model."""
    folder = request.getfixturevalue(f"{which}_dir")
    model_cls = SiglipVisionModel if which == "fixed" else Siglip2VisionModel
    ref, ref_processor = model_cls.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)
    ours, processor = SigLIP2Encoder.from_pretrained(folder), ImageProcessor.from_pretrained(folder)
    images = random_images(1, [(50, 70), (120, 31), (36, 36), (17, 90)])
    with torch.no_grad():
        want = ref(**ref_processor(images, return_tensors="pt"))
        got = ours(**processor(images))
    assert_close(got.pooler_output, want.pooler_output)
    for b, tokens in enumerate(got.per_image()):
        assert_close(tokens, want.last_hidden_state[b, : len(tokens)])


def test_save_pretrained_loads_in_transformers(tmp_path):
    for config, ref_cls in (
        (dict(TINY, image_size=32, patch_size=8), SiglipVisionModel),
        (dict(TINY, image_size=None, num_patches=16, patch_size=8), Siglip2VisionModel),
    ):
        torch.manual_seed(0)
        ours = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **config).eval()
        folder = tmp_path / ref_cls.__name__
        ours.save_pretrained(folder)
        ref = ref_cls.from_pretrained(folder).eval()
        ref_processor = AutoImageProcessor.from_pretrained(folder)
        images = random_images(2, [(40, 40), (32, 64)])
        inputs = ref_processor(images, return_tensors="pt")
        with torch.no_grad():
            want, got = ref(**inputs), ours(**ImageProcessor.from_pretrained(folder)(images))
        assert_close(got.pooler_output, want.pooler_output)
