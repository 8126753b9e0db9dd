"""Projectors: shapes and exact token counts over fixed and variable grids, layer selection, save / load."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY

from siglip2_encoder import ImageProcessor, ProcessorConfig, SigLIP2Encoder
from siglip2_encoder.adapters import (
    LinearConfig,
    MLPConfig,
    PixelShuffleConfig,
    PoolConfig,
    ProjectedTokens,
    ResamplerConfig,
    VisionFeatures,
    build_projector,
    load_projector,
    pixel_shuffle,
)

D, OUT = 32, 24
CONFIGS = {
    "linear": LinearConfig(in_features=D, out_features=OUT),
    "mlp": MLPConfig(in_features=D, out_features=OUT, layers=(-2, 1)),
    "mlp3": MLPConfig(in_features=D, out_features=OUT, depth=3, hidden_features=40, layers=(None,)),
    "pixel_shuffle": PixelShuffleConfig(in_features=D, out_features=OUT, factor=2),
    "pixel_shuffle3_mlp": PixelShuffleConfig(in_features=D, out_features=OUT, factor=3, depth=2, layers=(-1, -2)),
    "pool_avg": PoolConfig(in_features=D, out_features=OUT),
    "pool_bilinear": PoolConfig(in_features=D, out_features=OUT, mode="bilinear", layers=(-2, -3), combine="mean"),
    "resampler": ResamplerConfig(in_features=D, out_features=OUT, num_queries=5, num_heads=4, depth=2),
}
EXPECTED = {  # tokens for grids (3, 9), (7, 4), (1, 1), (5, 1)
    "linear": [27, 28, 1, 5],
    "mlp": [27, 28, 1, 5],
    "mlp3": [27, 28, 1, 5],
    "pixel_shuffle": [10, 8, 1, 3],
    "pixel_shuffle3_mlp": [3, 6, 1, 2],
    "pool_avg": [10, 8, 1, 3],
    "pool_bilinear": [10, 8, 1, 3],
    "resampler": [5, 5, 5, 5],
}


@pytest.fixture(scope="module")
def encoder() -> SigLIP2Encoder:
    torch.manual_seed(0)
    return SigLIP2Encoder.from_preset("siglip2-base-patch16-naflex", **TINY).eval()


@pytest.fixture(scope="module")
def variable(encoder):
    """Grids (3, 9), (7, 4), (1, 1), (5, 1)."""
    images = [torch.rand(3, 48, 144), torch.rand(3, 112, 64), torch.rand(3, 16, 16), torch.rand(3, 80, 16)]
    processor = ImageProcessor(ProcessorConfig(image_size=None, max_num_patches=28, patch_size=16, do_resize=False))
    with torch.no_grad():
        out = encoder(**processor(images), layers=[-1, -2, -3, 1])
    assert out.grids == [(3, 9), (7, 4), (1, 1), (5, 1)]
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_token_counts_shapes_and_batch_independence(name, encoder, variable):
    torch.manual_seed(0)
    projector = build_projector(CONFIGS[name]).eval()
    features = VisionFeatures.from_output(variable, projector.config.layers, projector.config.combine)
    with torch.no_grad():
        out = projector(variable)
        alone = [
            projector(VisionFeatures(features.tokens[b : b + 1, : h * w], [(h, w)]))
            for b, (h, w) in enumerate(features.grids)
        ]
    assert out.token_counts == EXPECTED[name] == [projector.num_tokens(g) for g in variable.grids]
    assert out.tokens.shape == (4, max(EXPECTED[name]), OUT)
    for b, n in enumerate(out.token_counts):
        torch.testing.assert_close(out.per_image()[b], alone[b].per_image()[0], atol=1e-5, rtol=0)
        assert out.tokens[b, n:].abs().sum() == 0, "padding rows are zero"
    if len(set(out.token_counts)) > 1:
        assert out.mask.sum(1).tolist() == out.token_counts


@pytest.mark.parametrize("name", CONFIGS)
def test_fixed_grid_batches_have_no_mask(name):
    torch.manual_seed(0)
    config = CONFIGS[name]
    projector = build_projector(config)
    features = VisionFeatures(torch.randn(3, 16, config.input_width), [(4, 4)] * 3)
    out = projector(features)
    assert out.mask is None and out.tokens.shape == (3, projector.num_tokens((4, 4)), OUT)


@pytest.mark.parametrize("name", CONFIGS)
def test_save_and_load_round_trip(name, tmp_path, variable):
    torch.manual_seed(0)
    projector = build_projector(CONFIGS[name]).eval()
    projector.save_pretrained(tmp_path)
    loaded = load_projector(tmp_path).eval()
    assert loaded.config == projector.config and type(loaded) is type(projector)
    with torch.no_grad():
        assert torch.equal(loaded(variable).tokens, projector(variable).tokens)


def test_pixel_shuffle_equals_idefics3s():
    """transformers' Idefics3 / SmolVLM connector is the reference token order for square grids."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    tokens = torch.randn(2, 6 * 6, 5)
    want = Idefics3Connector.pixel_shuffle(None, tokens, scale_factor=2)  # (2, 9, 20)
    projector = build_projector(PixelShuffleConfig(in_features=5, out_features=7, factor=2, layers=(None,)))
    got = torch.stack([pixel_shuffle(grid, 2) for grid in VisionFeatures(tokens, [(6, 6)] * 2).per_image()])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(projector(VisionFeatures(tokens, [(6, 6)] * 2)).tokens, projector.proj(want))


@pytest.mark.parametrize("grid", [(6, 6), (5, 5), (3, 3)])
def test_bilinear_pool_equals_llava_onevisions(grid):
    """LLaVA-OneVision's apply_pooling (transformers) on a square grid, odd sides included."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    h, w = grid
    tokens = torch.randn(2, h * w, 4)
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=h * 14, patch_size=14))
    want = LlavaOnevisionModel.apply_pooling(SimpleNamespace(config=config), tokens)
    projector = build_projector(PoolConfig(in_features=4, out_features=4, mode="bilinear", depth=1, layers=(None,)))
    with torch.no_grad():  # make the MLP the identity, leaving the pooling
        projector.proj[0].weight.copy_(torch.eye(4))
        projector.proj[0].bias.zero_()
        got = projector(VisionFeatures(tokens, [grid] * 2))
    assert got.token_counts == [want.shape[1]] * 2
    torch.testing.assert_close(got.tokens, want, atol=1e-6, rtol=0)


def test_pixel_shuffle_pads_grids_the_factor_does_not_divide():
    grid = torch.arange(3 * 5 * 2, dtype=torch.float32).reshape(3, 5, 2)  # (h, w, C)
    out = pixel_shuffle(grid, 2)
    assert out.shape == (2 * 3, 2 * 2 * 2)
    # Output token 0 holds the 2x2 block of tokens (0,0), (0,1), (1,0), (1,1), row-major, C channels each.
    assert out[0].tolist() == torch.cat([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]).tolist()
    # Token (0, 2) of the 2x3 output covers column 4 and the zero padding column 5.
    assert out[2].tolist() == torch.cat([grid[0, 4], torch.zeros(2), grid[1, 4], torch.zeros(2)]).tolist()
    assert out[5, 2:].abs().sum() == 0 and out[5, :2].tolist() == grid[2, 4].tolist()  # bottom-right: 1 real token


def test_average_pool_averages_the_tokens_a_block_holds():
    projector = build_projector(PoolConfig(in_features=1, out_features=1, depth=1, layers=(None,)))
    torch.nn.init.ones_(projector.proj[0].weight)
    torch.nn.init.zeros_(projector.proj[0].bias)
    grid = torch.arange(15, dtype=torch.float32).reshape(1, 15, 1)  # a 3 x 5 grid
    out = projector(VisionFeatures(grid, [(3, 5)])).per_image()[0][:, 0]
    values = grid.reshape(3, 5)
    assert out[0] == values[:2, :2].mean() and out[2] == values[:2, 4].mean() and out[5] == values[2, 4]


def test_multi_layer_input_concat_and_mean(encoder, variable):
    concat = VisionFeatures.from_output(variable, (-2, 1), "concat")
    assert concat.tokens.shape[-1] == 2 * D
    assert torch.equal(concat.tokens[..., :D], variable.hidden_states[-2])
    mean = VisionFeatures.from_output(variable, (-2, 1), "mean")
    torch.testing.assert_close(mean.tokens, (variable.hidden_states[-2] + variable.hidden_states[1]) / 2)
    last = VisionFeatures.from_output(variable, (None,))
    assert torch.equal(last.tokens, variable.last_hidden_state)
    with pytest.raises(ValueError, match="layer 5 was not requested"):
        VisionFeatures.from_output(variable, (5,))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LinearConfig(in_features=0, out_features=4), "in_features must be a positive int, got in_features=0"),
        (lambda: MLPConfig(in_features=4, out_features=4, depth=0), "depth must be a positive int, got depth=0"),
        (
            lambda: PoolConfig(in_features=4, out_features=4, mode="max"),
            "mode must be 'avg' or 'bilinear', got mode='max'",
        ),
        (
            lambda: PixelShuffleConfig(in_features=4, out_features=4, factor=0),
            "factor must be a positive int, got factor=0",
        ),
        (
            lambda: ResamplerConfig(in_features=4, out_features=10, num_heads=4),
            "num_heads must divide out_features, got num_heads=4, out_features=10",
        ),
        (
            lambda: LinearConfig(in_features=4, out_features=4, layers=()),
            "layers must be a non-empty sequence of ints or None, got layers=()",
        ),
        (
            lambda: LinearConfig(in_features=4, out_features=4, combine="sum"),
            "combine must be 'concat' or 'mean', got combine='sum'",
        ),
    ],
    ids=["in_features", "depth", "mode", "factor", "num_heads", "layers", "combine"],
)
def test_bad_projector_config_is_refused_with_its_exact_message(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_input_and_file_errors(variable, tmp_path):
    projector = build_projector(CONFIGS["mlp"])  # expects 2 layers concatenated
    with pytest.raises(ValueError, match="expects 64 channels per token"):
        projector(VisionFeatures.from_output(variable, (-2,)))
    with pytest.raises(ValueError, match="no projector_config.json"):
        load_projector(tmp_path)
    (tmp_path / "projector_config.json").write_text(json.dumps({"kind": "qformer"}))
    with pytest.raises(ValueError, match="kind='qformer'"):
        load_projector(tmp_path)


def test_pack_pads_variable_counts():
    packed = ProjectedTokens.pack([torch.ones(2, 3), torch.ones(4, 3)])
    assert packed.tokens.shape == (2, 4, 3) and packed.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert packed.tokens[0, 2:].abs().sum() == 0
