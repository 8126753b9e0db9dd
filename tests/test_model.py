"""Behaviour of the tower itself: early exit, invariances, output views, training knobs, input errors."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY, random_images

from siglip2_encoder import EncoderConfig, ImageProcessor, ProcessorConfig, SigLIP2Encoder
from siglip2_encoder.data.processor import patchify

FIXED_CFG = EncoderConfig(**TINY, image_size=32, patch_size=8)
NAFLEX_CFG = EncoderConfig(**TINY, image_size=None, num_patches=16, patch_size=8)


def tower(config: EncoderConfig, seed: int = 0) -> SigLIP2Encoder:
    torch.manual_seed(seed)
    return SigLIP2Encoder(config).eval()


def naflex_inputs(images, budget=24, pad_to_max=False):
    processor = ImageProcessor(ProcessorConfig(image_size=None, max_num_patches=budget, patch_size=8))
    return processor(images, pad_to_max=pad_to_max)


def count_layer_calls(model: SigLIP2Encoder) -> list[int]:
    calls = []
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    return calls


@pytest.mark.parametrize("config", [FIXED_CFG, NAFLEX_CFG], ids=["fixed", "naflex"])
def test_early_exit_runs_only_needed_layers_and_matches_full_run(config):
    model = tower(config)
    x = torch.randn(2, 3, 32, 32)
    calls = count_layer_calls(model)
    head_calls = []
    model.head.register_forward_hook(lambda *_: head_calls.append(1))
    model.post_layernorm.register_forward_hook(lambda *_: head_calls.append(1))
    with torch.no_grad():
        full = model(x, layers=[1, -2, -1])
        assert calls == [0, 1, 2] and len(head_calls) == 2
        calls.clear(), head_calls.clear()
        early = model(x, layers=[-2], return_last=False, return_pooled=False)
    assert calls == [0, 1], "layer -2 of 3 must not run the last layer"
    assert head_calls == [], "no post-layernorm or head without last/pooled outputs"
    assert early.last_hidden_state is None and early.pooler_output is None
    assert torch.equal(early.hidden_states[-2], full.hidden_states[-2])
    assert list(early.hidden_states) == [-2]


def test_hidden_state_indexing_follows_transformers():
    model = tower(FIXED_CFG)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x, layers=[0, -4, 3, -1, 2, -2])
    assert torch.equal(out.hidden_states[0], out.hidden_states[-4])  # 0 = embeddings = -(L+1)
    assert torch.equal(out.hidden_states[3], out.hidden_states[-1])  # L = last layer = -1
    assert torch.equal(out.hidden_states[2], out.hidden_states[-2])
    assert torch.allclose(model.post_layernorm(out.hidden_states[-1]), out.last_hidden_state)


def test_batch_invariance_and_determinism():
    model = tower(FIXED_CFG)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        batch = model(x)
        again = model(x)
        alone = [model(x[i : i + 1]) for i in range(5)]
    assert torch.equal(batch.pooler_output, again.pooler_output)
    for i, out in enumerate(alone):
        torch.testing.assert_close(out.pooler_output[0], batch.pooler_output[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.last_hidden_state[0], batch.last_hidden_state[i], atol=1e-5, rtol=0)


def test_naflex_padding_invariance():
    """An image's features do not depend on padding length or on the other images of its batch."""
    model = tower(NAFLEX_CFG)
    images = random_images(3, [(64, 64), (100, 20), (8, 8)])  # grids of 16, 20 and 16 patches
    with torch.no_grad():
        longest = model(**naflex_inputs(images))
        to_max = model(**naflex_inputs(images, budget=24, pad_to_max=True))
        alone = [model(**naflex_inputs([image])) for image in images]
    assert longest.last_hidden_state.shape[1] < to_max.last_hidden_state.shape[1] == 24
    for i in range(len(images)):
        torch.testing.assert_close(longest.pooler_output[i], to_max.pooler_output[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(longest.pooler_output[i], alone[i].pooler_output[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(longest.per_image()[i], alone[i].per_image()[0], atol=1e-5, rtol=0)
    # Garbage in the padding must not leak into real tokens or pooling.
    inputs = naflex_inputs(images)
    noisy = inputs.pixel_values.clone()
    noisy[~inputs.pixel_attention_mask.bool()] = 1e3
    with torch.no_grad():
        polluted = model(noisy, inputs.spatial_shapes, inputs.pixel_attention_mask)
    assert torch.equal(polluted.pooler_output, longest.pooler_output)
    assert torch.equal(polluted.last_hidden_state, longest.last_hidden_state)


def test_output_views_for_variable_grids():
    model = tower(NAFLEX_CFG)
    inputs = naflex_inputs(random_images(4, [(30, 100), (100, 20)]))
    with torch.no_grad():
        out = model(**inputs, layers=[-2])
    grids = [tuple(g) for g in inputs.spatial_shapes.tolist()]
    assert out.grids == grids and out.token_counts == [h * w for h, w in grids]
    tokens, mask = out.padded(-2)
    assert mask.tolist() == inputs.pixel_attention_mask.tolist()
    maps = out.feature_maps(-2)
    for b, (h, w) in enumerate(grids):
        assert maps[b].shape == (32, h, w)
        # Row-major: token r * w + c sits at map[:, r, c]; a h/w swap would fail on these non-square grids.
        assert torch.equal(maps[b][:, h - 1, 0], tokens[b, (h - 1) * w])
        assert torch.equal(maps[b][:, 0, w - 1], tokens[b, w - 1])
    with pytest.raises(ValueError, match="different token grids"):
        out.feature_map()
    with pytest.raises(ValueError, match="layer 3 was not requested"):
        out.per_image(3)


def test_feature_map_and_forward_intermediates_non_square():
    model = tower(FIXED_CFG)
    x = torch.randn(2, 3, 24, 40)  # 3 x 5 grid
    with torch.no_grad():
        out = model(x, layers=[1, 2, 3])
        final, inter = model.forward_intermediates(x, indices=[0, 1])
        only = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True, norm=True)
    fmap = out.feature_map(1)
    assert fmap.shape == (2, 32, 3, 5)
    assert torch.equal(fmap.flatten(2).transpose(1, 2), out.hidden_states[1])
    assert torch.equal(inter[0], fmap) and torch.equal(inter[1], out.feature_map(2))
    assert torch.equal(final, out.last_hidden_state)
    assert len(only) == 2  # the last 2 blocks: transformers' hidden states 2 and 3, post-layernormed
    torch.testing.assert_close(only[0], model.post_layernorm(out.hidden_states[2]))
    torch.testing.assert_close(only[1], model.post_layernorm(out.hidden_states[3]))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="block indices"):
        model.forward_intermediates(x, indices=[3])


def test_naflex_accepts_images_directly():
    model = tower(NAFLEX_CFG)
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        direct = model(x)
        patched = model(patchify(x, 8), spatial_shapes=[(5, 3), (5, 3)])
    assert torch.equal(direct.pooler_output, patched.pooler_output)
    assert direct.attention_mask is None and direct.grids == [(5, 3), (5, 3)]


def test_gradient_checkpointing_gives_same_gradients_and_freeze():
    model = tower(FIXED_CFG).train()
    x = torch.randn(2, 3, 32, 32)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(x).pooler_output.square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    assert model.freeze() is model and not any(p.requires_grad for p in model.parameters())
    assert not model(x).pooler_output.requires_grad
    assert all(p.requires_grad for p in model.unfreeze().parameters())


def test_no_grad_is_not_forced_inside_forward():
    model = tower(FIXED_CFG)
    out = model(torch.randn(1, 3, 32, 32), layers=[-2])
    assert out.pooler_output.requires_grad and out.hidden_states[-2].requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype):
    for config in (FIXED_CFG, NAFLEX_CFG):
        model = tower(config)
        x = torch.randn(2, 3, 24, 40)
        with torch.no_grad():
            ref = model(x).pooler_output
            half = model.to(dtype)(x.to(dtype))
        assert half.pooler_output.dtype == dtype and model.dtype == dtype
        torch.testing.assert_close(half.pooler_output.float(), ref, atol=0.1, rtol=0.05)


def test_attention_dropout_only_in_training():
    model = tower(FIXED_CFG.replace(attention_dropout=0.5))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).pooler_output, model(x).pooler_output)
        model.train()
        assert not torch.equal(model(x).pooler_output, model(x).pooler_output)


X = torch.zeros(1, 3, 32, 32)
PATCHES = torch.zeros(1, 16, 192)
BAD_INPUTS = [
    (
        "uint8 pixels",
        "fixed",
        (X.to(torch.uint8),),
        {},
        TypeError,
        "pixel_values must be a floating-point torch.Tensor (or a list of them), got torch.uint8; use "
        "siglip2_encoder.ImageProcessor to turn images into pixel_values",
    ),
    (
        "4 channels",
        "fixed",
        (torch.zeros(1, 4, 32, 32),),
        {},
        ValueError,
        "pixel_values of shape (1, 4, 32, 32) must be (B, 3, H, W) with H and W at least the patch size 8; "
        "ImageProcessor prepares images",
    ),
    (
        "smaller than a patch",
        "fixed",
        (torch.zeros(1, 3, 4, 32),),
        {},
        ValueError,
        "pixel_values of shape (1, 3, 4, 32) must be (B, 3, H, W) with H and W at least the patch size 8; "
        "ImageProcessor prepares images",
    ),
    (
        "spatial_shapes that disagree",
        "fixed",
        (X,),
        {"spatial_shapes": [(2, 2)]},
        ValueError,
        "spatial_shapes [(2, 2)] disagree with the image size 32x32 (grid (4, 4)); drop spatial_shapes or fix it",
    ),
    (
        "patches on a fixed tower without their grids",
        "fixed",
        (PATCHES,),
        {},
        ValueError,
        "patchified pixel_values need spatial_shapes (B, 2): each image's grid (h, w)",
    ),
    (
        "a 2-D tensor",
        "fixed",
        (PATCHES[0],),
        {},
        ValueError,
        "pixel_values of shape (16, 192) is not (B, C, H, W), a list of (C, H, W) images, or (B, L, p*p*C) patches "
        "with spatial_shapes for this tower",
    ),
    (
        "patches without grids",
        "naflex",
        (PATCHES,),
        {},
        ValueError,
        "patchified pixel_values need spatial_shapes (B, 2): each image's grid (h, w)",
    ),
    (
        "a grid longer than the patches",
        "naflex",
        (PATCHES,),
        {"spatial_shapes": [(5, 4)]},
        ValueError,
        "spatial_shapes [(5, 4)] must give one grid (h >= 1, w >= 1, h * w <= 16) per image for 1 images",
    ),
    (
        "patches of the wrong size",
        "naflex",
        (torch.zeros(1, 16, 100),),
        {"spatial_shapes": [(4, 4)]},
        ValueError,
        "patchified pixel_values must have p*p*C = 192 values per patch, got 100",
    ),
    (
        "a mask that disagrees with the grids",
        "naflex",
        (PATCHES,),
        {"spatial_shapes": [(2, 4)], "pixel_attention_mask": torch.ones(1, 16)},
        ValueError,
        "pixel_attention_mask must mark exactly the first h*w patches of each image as valid (as spatial_shapes "
        "says); pass the processor's mask unchanged, or leave it out",
    ),
    (
        "nothing requested",
        "fixed",
        (X,),
        {"return_last": False, "return_pooled": False},
        ValueError,
        "nothing to compute: request layers=[...], return_last=True or return_pooled=True",
    ),
    (
        "an empty list",
        "fixed",
        ([],),
        {},
        ValueError,
        "pixel_values is an empty list; pass at least one (C, H, W) image",
    ),
    (
        "a grey image in a list",
        "fixed",
        ([torch.zeros(3, 32, 32), torch.zeros(1, 32, 32)],),
        {},
        ValueError,
        "image 1 of the list has shape (1, 32, 32); each must be (3, H, W) with H and W at least the patch size 8",
    ),
    (
        "positions of the wrong shape",
        "fixed",
        (X,),
        {"positions": torch.zeros(3, 32)},
        ValueError,
        "positions must be (h * w, D) = (16, 32) or (B, h * w, D) for this 4x4 grid, got (3, 32)",
    ),
    (
        "positions for a list",
        "fixed",
        ([torch.zeros(3, 32, 32)],),
        {"positions": torch.zeros(16, 32)},
        ValueError,
        "positions apply to a (B, C, H, W) batch, not to a list of images",
    ),
    (
        "a layer past the last",
        "fixed",
        (X,),
        {"layers": [4]},
        ValueError,
        "layer index 4 is out of range for a 3-layer tower: use 0 (embeddings) to 3 (last layer), or -1 (last "
        "layer) to -4 (embeddings); None means last_hidden_state",
    ),
    (
        "a layer before the embeddings",
        "fixed",
        (X,),
        {"layers": [-5]},
        ValueError,
        "layer index -5 is out of range for a 3-layer tower",
    ),
    (
        "a float layer",
        "fixed",
        (X,),
        {"layers": [1.0]},
        TypeError,
        "layer index 1.0 must be an int (a hidden-state index) or None (last_hidden_state), not float",
    ),
    (
        "a bool layer",
        "fixed",
        (X,),
        {"layers": [True]},
        TypeError,
        "layer index True must be an int (a hidden-state index) or None (last_hidden_state), not bool",
    ),
    (
        "pooling without a head",
        "headless",
        (X,),
        {"return_pooled": True},
        ValueError,
        "this tower has no attention-pooling head (use_head=False); pass return_pooled=False",
    ),
]


@pytest.mark.parametrize(
    ("kind", "args", "kwargs", "error", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_refused_with_its_exact_message(kind, args, kwargs, error, message):
    config = {"fixed": FIXED_CFG, "naflex": NAFLEX_CFG, "headless": FIXED_CFG.replace(use_head=False)}[kind]
    with pytest.raises(error, match=re.escape(message)):
        tower(config)(*args, **kwargs)


def test_headless_tower_returns_no_pooled_output():
    model = tower(FIXED_CFG.replace(use_head=False))
    assert model.head is None and not any(n.startswith("head.") for n in model.state_dict())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.pooler_output is None and out.last_hidden_state.shape == (1, 16, 32)


def test_every_part_initialises_itself_as_the_reference_does():
    model = tower(FIXED_CFG.replace(hidden_size=64, num_attention_heads=4), seed=3)
    bound = (6 / (64 + 64)) ** 0.5  # xavier-uniform for a 64 x 64 weight
    for linear in (model.head.attention.out_proj, model.encoder.layers[0].self_attn.out_proj):
        assert torch.all(linear.bias == 0) and linear.weight.abs().max() <= bound
        assert linear.weight.std() > 0.8 * bound / 3**0.5  # uniform(-b, b) has std b / sqrt(3)
    fc1 = model.encoder.layers[0].mlp.fc1
    assert 0 < fc1.bias.abs().max() < 1e-5
    assert torch.all(model.head.attention.in_proj_bias == 0)
