"""Each VLM's feature recipe returns exactly the tokens that VLM's projector receives in its own transformers code
(the projector's input, hooked) on the same random weights; prismatic's against timm's get_intermediate_layers."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import perturb
from test_timm import CONFIG, timm_siglip
from test_vlm_import import build, naflex_inputs, vision_tower

from siglip2_encoder import RECIPES, Recipe, SigLIP2Encoder, convert_timm_state_dict, get_recipe
from siglip2_encoder.adapters import LinearConfig, MLPConfig, PixelShuffleConfig, PoolConfig, build_projector
from siglip2_encoder.adapters.base import VisionFeatures
from siglip2_encoder.adapters.pixel_shuffle import pixel_shuffle


def inner_model(vlm: torch.nn.Module) -> torch.nn.Module:
    """The model under the head: the retrievers (ColPali, ColModernVBERT) wrap theirs as ``vlm``, the policies (pi0,
    pi0.5) as their model's ``vlm``."""
    model = vlm.vlm if hasattr(vlm, "vlm") else vlm.model
    return getattr(model, "vlm", model)


def projector_of(vlm: torch.nn.Module) -> torch.nn.Module:
    # ShieldGemma 2 holds Gemma 3's model one level deeper, T5Gemma 2 its projector in the encoder
    model = inner_model(vlm)
    for holder in (model, getattr(model, "model", None), getattr(model, "encoder", None)):
        for name in ("multi_modal_projector", "connector", "aligner"):
            if hasattr(holder, name):
                return getattr(holder, name)
    raise AssertionError(type(model))


def projector_input(vlm: torch.nn.Module, family: str, **inputs) -> torch.Tensor:
    """What the VLM's projector receives in its get_image_features (LFM2-VL: what it reads from the tower, which it
    rearranges into the projector's input)."""
    captured = []
    hooked = vision_tower(vlm) if family == "lfm2_vl" else projector_of(vlm)
    if family == "lfm2_vl":
        handle = hooked.register_forward_hook(lambda m, a, out: captured.append(out.last_hidden_state))
    else:
        handle = hooked.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    # T5Gemma 2's model has no get_image_features: the VLM's runs its encoder's
    get_image_features = getattr(inner_model(vlm), "get_image_features", None) or vlm.get_image_features
    with torch.no_grad():
        get_image_features(**inputs)
    handle.remove()
    return captured[0]


FAMILY_RECIPES = {
    "llava": "llava",
    "llava_next": "llava",
    "llava_onevision": "llava_onevision",
    "paligemma": "paligemma",
    "gemma3": "gemma3",
    "shieldgemma2": "gemma3",
    "t5gemma2": "gemma3",
    "deepseek_vl": "deepseek_vl",
    "janus": "deepseek_vl",
    "colpali": "paligemma",
    "pi0": "paligemma",
    "pi05": "paligemma",
    "modernvbert": "modernvbert",
    "colmodernvbert": "modernvbert",
    "ultravbert": "modernvbert",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
    "lfm2_vl": "lfm2_vl",
    "aya_vision": "aya_vision",
    "cohere2_vision": "cohere2_vision",
}


@pytest.mark.parametrize("family", list(FAMILY_RECIPES))
def test_recipe_gives_what_the_vlms_projector_receives(family, tmp_path):
    vlm, _ = build(family)
    vlm = perturb(vlm, seed=7).eval()
    if family in ("llava", "llava_next"):  # SigLIP LLaVAs keep every token ("default" would drop a real patch)
        vlm.config.vision_feature_select_strategy = "full"
    vlm.save_pretrained(tmp_path)
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    if family == "lfm2_vl":
        inputs = naflex_inputs(4)
        mask = inputs["pixel_attention_mask"].bool()
        want = projector_input(vlm, family, **inputs)[mask]
        got = ours.features(**inputs, recipe=FAMILY_RECIPES[family])[mask]
    else:
        if family in ("llava_next", "llava_onevision"):  # one image: its base view and one 32x32 tile
            inputs = dict(pixel_values=pixels[None], image_sizes=torch.tensor([[32, 32]]))
        elif family in ("idefics3", "smolvlm", "modernvbert", "colmodernvbert", "ultravbert"):  # one sample, 2 images
            inputs = dict(pixel_values=pixels[None])
        else:
            inputs = dict(pixel_values=pixels)
        want = projector_input(vlm, family, **inputs)
        got = ours.features(pixels, recipe=FAMILY_RECIPES[family])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["aya_vision", "cohere2_vision"])
def test_pixel_shuffle_orders_tokens_and_channels_as_the_vlms_projector_does(family):
    """As for Idefics3's (test_adapters): a pixel_shuffle projector's linear layers see these VLMs' channel order."""
    projector = projector_of(build(family)[0])
    tokens = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(6))  # two 4 x 4 grids
    theirs = projector.pixel_shuffle(tokens).reshape(2, 4, 128)
    ours = torch.stack([pixel_shuffle(grid.reshape(4, 4, 32), 2) for grid in tokens])
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_a_pixel_shuffle_projector_with_norm_is_lfm2_vls_on_its_weights():
    """depth 2 with norm: LFM2-VL's projector (unshuffle, LayerNorm, linear, GELU, linear), same outputs."""
    theirs = perturb(projector_of(build("lfm2_vl")[0]), seed=4)  # the norm's weights away from 1 and 0 too
    assert theirs.use_layer_norm
    config = get_recipe("lfm2_vl").projector_config(32, 16, hidden_features=theirs.linear_1.out_features, norm=True)
    ours = build_projector(config)
    names = {"norm": "layer_norm", "proj.0": "linear_1", "proj.2": "linear_2"}
    state = theirs.state_dict()
    ours.load_state_dict({k: state[names[k.rsplit(".", 1)[0]] + k[k.rindex(".") :]] for k in ours.state_dict()})
    tokens = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(8))  # a 4 x 4 grid
    with torch.no_grad():
        want = theirs(tokens.reshape(1, 4, 4, 32)).reshape(1, 4, 16)
        got = ours(VisionFeatures(tokens, [(4, 4)])).tokens
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prismatic_recipe_is_timms_second_to_last_block():
    reference = timm_siglip()
    ours = SigLIP2Encoder(CONFIG).eval()
    ours.load_state_dict(convert_timm_state_dict(reference.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        (want,) = reference.get_intermediate_layers(x, n={len(reference.blocks) - 2})
        got = ours.features(x, recipe="prismatic")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_features_run_only_the_layers_a_recipe_needs():
    ours = SigLIP2Encoder(CONFIG).eval()
    ran = []
    for i, layer in enumerate(ours.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    post = []
    ours.post_layernorm.register_forward_hook(lambda *_: post.append(1))
    with torch.no_grad():
        ours.features(torch.randn(1, 3, 32, 32), recipe="llava")
    assert ran == [0, 1] and not post  # 3 layers: hidden state -2 is the second layer's output


@pytest.mark.parametrize(
    ("name", "config", "tokens"),
    [
        ("llava", MLPConfig(in_features=32, out_features=48, layers=(-2,), depth=2), 16),
        ("paligemma", LinearConfig(in_features=32, out_features=48, layers=(None,)), 16),
        ("gemma3", PoolConfig(in_features=32, out_features=48, layers=(None,), factor=4, mode="avg", depth=1), 1),
        (
            "idefics3",
            PixelShuffleConfig(in_features=32, out_features=48, layers=(None,), factor=2, depth=1, bias=False),
            4,
        ),
        ("lfm2_vl", PixelShuffleConfig(in_features=32, out_features=48, layers=(None,), factor=2, depth=2), 4),
    ],
)
def test_projectors_built_for_a_recipe_have_its_shape(name, config, tokens):
    built = get_recipe(name).projector_config(32, 48)
    assert built == config
    assert build_projector(built).num_tokens((4, 4)) == tokens


def test_bad_recipes_are_refused():
    with pytest.raises(ValueError, match=re.escape(f"unknown recipe 'llava2'; known recipes: {', '.join(RECIPES)}")):
        get_recipe("llava2")
    with pytest.raises(ValueError, match=re.escape("reduction must be one of (None, 'pixel_shuffle', 'avg_pool')")):
        Recipe("mine", None, "unshuffle", 2)
    with pytest.raises(ValueError, match=re.escape("factor is set exactly when there is a reduction")):
        Recipe("mine", None, "avg_pool")


def test_the_modernvbert_recipes_projector_is_modernvberts_connector_on_its_weights():
    """ModernVBERT's connector (Idefics3's pixel shuffle, then a linear without bias): the recipe's projector at the
    checkpoint's pixel_shuffle_factor gives the same tokens on the same weight."""
    theirs = perturb(projector_of(build("modernvbert")[0]), seed=4)
    config = get_recipe("modernvbert").projector_config(32, 16, factor=theirs.pixel_shuffle_factor)
    ours = build_projector(config)
    (name,) = ours.state_dict()  # one weight: no bias
    ours.load_state_dict({name: theirs.modality_projection.weight})
    tokens = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(8))  # two 4 x 4 grids
    with torch.no_grad():
        torch.testing.assert_close(ours(VisionFeatures(tokens, [(4, 4)] * 2)).tokens, theirs(tokens), atol=1e-5, rtol=0)
