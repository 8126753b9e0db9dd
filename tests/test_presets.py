"""The same checks over every released architecture (shrunk in width and depth), and one at full size."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import random_images
from transformers import AutoImageProcessor, Siglip2VisionModel, SiglipVisionModel

from siglip2_encoder import EncoderConfig, ImageProcessor, SigLIP2Encoder, config_to_hf, get_preset, list_presets
from siglip2_encoder.models.flops import num_parameters

SHRINK = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)


def test_preset_table_is_complete_and_consistent():
    names = list_presets()
    for expected in (
        "siglip2-so400m-patch14-384",
        "siglip2-so400m-patch16-512",
        "siglip2-giant-opt-patch16-384",
        "siglip2-base-patch32-256",
        "siglip2-large-patch16-512",
        "siglip2-so400m-patch16-naflex",
    ):
        assert expected in names
    so400m = get_preset("google/siglip2-so400m-patch14-384")
    assert so400m.hub_id == "google/siglip2-so400m-patch14-384"
    assert (so400m.config.hidden_size, so400m.config.num_hidden_layers, so400m.config.position_grid) == (1152, 27, 27)
    assert get_preset("siglip2-giant-opt-patch16-256").config.intermediate_size == 6144
    with pytest.raises(ValueError, match="unknown preset 'vit-huge'.*siglip2-base-patch16-224"):
        get_preset("vit-huge")


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_runs_and_loads_in_transformers(name, tmp_path):
    preset = get_preset(name)
    torch.manual_seed(0)
    model = SigLIP2Encoder.from_preset(name, **SHRINK).eval()
    assert model.config == preset.config.replace(**SHRINK)
    processor = ImageProcessor.from_preset(name)
    inputs = processor(random_images(0, [(60, 90), (120, 40)]))
    with torch.no_grad():
        out = model(**inputs, layers=[-2])
    grid = preset.config.position_grid
    if preset.config.naflex:
        assert max(out.token_counts) <= preset.processor_config.max_num_patches == 256
    else:
        assert out.grids == [(grid, grid)] * 2 and out.last_hidden_state.shape == (2, grid * grid, 32)
    assert out.pooler_output.shape == (2, 32) and torch.isfinite(out.pooler_output).all()

    model.save_pretrained(tmp_path)
    ref_cls = Siglip2VisionModel if preset.config.naflex else SiglipVisionModel
    ref = ref_cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = ref(
            **AutoImageProcessor.from_pretrained(tmp_path)(random_images(0, [(60, 90), (120, 40)]), return_tensors="pt")
        )
    torch.testing.assert_close(out.pooler_output, want.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("use_head", [True, False])
def test_num_parameters_counts_the_weights(name, use_head):
    config = get_preset(name).config.replace(use_head=use_head)
    with torch.device("meta"):
        ours = SigLIP2Encoder(config)
        reference_class = Siglip2VisionModel if config.naflex else SiglipVisionModel
        reference = reference_class(reference_class.config_class(**config_to_hf(config)))
    assert num_parameters(config) == sum(p.numel() for p in ours.parameters()) == reference.num_parameters()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(image_size=None, num_patches=None),
            "set exactly one of image_size (fixed-resolution checkpoints) and num_patches (NaFlex checkpoints), got "
            "image_size=None, num_patches=None",
        ),
        (
            dict(num_patches=256),
            "set exactly one of image_size (fixed-resolution checkpoints) and num_patches (NaFlex checkpoints), got "
            "image_size=224, num_patches=256",
        ),
        (
            dict(image_size=None, num_patches=200),
            "num_patches must be a positive perfect square (the position grid is square), got num_patches=200",
        ),
        (
            dict(hidden_size=100, num_attention_heads=12),
            "num_attention_heads must divide hidden_size, got num_attention_heads=12, hidden_size=100",
        ),
        (dict(hidden_act="relu"), "hidden_act must be one of ('gelu_pytorch_tanh', 'gelu'), got hidden_act='relu'"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int, got num_hidden_layers=0"),
        (dict(patch_size=2.5), "patch_size must be a positive int, got patch_size=2.5"),
        (dict(image_size=8, patch_size=16), "image_size must be at least patch_size, got image_size=8, patch_size=16"),
        (dict(attention_dropout=1.5), "attention_dropout must be in [0, 1), got attention_dropout=1.5"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps must be > 0, got layer_norm_eps=0.0"),
    ],
    ids=lambda v: None if isinstance(v, str) else ",".join(v),
)
def test_bad_config_is_refused_with_its_exact_message(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EncoderConfig(**fields)


@pytest.mark.slow
def test_full_size_so400m_patch14_384_runs_one_image_on_cpu():
    torch.manual_seed(0)
    model = SigLIP2Encoder.from_preset("siglip2-so400m-patch14-384").eval()
    assert sum(p.numel() for p in model.parameters()) > 400e6
    inputs = ImageProcessor.from_preset("siglip2-so400m-patch14-384")(random_images(0, [(480, 640)]))
    with torch.no_grad():
        out = model(**inputs, layers=[-2])
    assert out.last_hidden_state.shape == (1, 729, 1152) and out.hidden_states[-2].shape == (1, 729, 1152)
    assert out.pooler_output.shape == (1, 1152) and torch.isfinite(out.pooler_output).all()
