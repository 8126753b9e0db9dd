"""timm SigLIP ViTs, NaFlexViTs and open_clip SigLIP image towers, both ways, with the activation each carries:
outputs equal timm's / open_clip's own on the same weights; timm's own transforms of a saved tower preprocess as
ours."""

from __future__ import annotations

import re

import numpy as np
import open_clip
import pytest
import timm
import timm.data
import torch
from conftest import FIXED, perturb
from PIL import Image
from test_big_vision import timm_naflex
from test_timm import timm_siglip

from siglip2_encoder import ImageProcessor, SigLIP2Encoder
from siglip2_encoder.integrations.timm_models import from_open_clip, from_timm, load_timm, save_timm, to_timm


@pytest.mark.parametrize(("act", "hidden_act"), [("gelu", "gelu"), ("gelu_tanh", "gelu_pytorch_tanh")])
def test_timm_vit_converts_with_its_activation(act, hidden_act):
    reference = timm_siglip(act_layer=act)
    ours = from_timm(reference)
    assert ours.config.hidden_act == hidden_act and ours.config.image_size == 32
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = reference.forward_features(x)
        torch.testing.assert_close(ours(x).last_hidden_state, tokens, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x).pooler_output, reference.forward_head(tokens), atol=1e-5, rtol=0)


def test_timm_naflexvit_converts_both_ways(tmp_path):
    reference = timm_naflex()
    ours = from_timm(reference)
    assert ours.config.naflex and ours.config.num_patches == 16
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 40), torch.randn(3, 48, 8)]
    with torch.no_grad():
        got = ours(images)
        for b, image in enumerate(images):
            h, w = got.grids[b]
            want = reference.forward_features(image[None])
            torch.testing.assert_close(got.last_hidden_state[b, : h * w], want[0], atol=1e-5, rtol=0)
    save_timm(ours, tmp_path)
    theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        for image in images:
            want = ours([image]).pooler_output
            torch.testing.assert_close(
                theirs.forward_head(theirs.forward_features(image[None])), want, atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_our_tower_saved_for_timm_loads_in_timm_with_equal_outputs(hidden_act, tmp_path):
    ours = SigLIP2Encoder.from_preset(
        "siglip-so400m-patch14-384",
        hidden_size=32,
        intermediate_size=75,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=42,
        hidden_act=hidden_act,
    ).eval()
    save_timm(ours, tmp_path)
    theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert theirs.blocks[0].mlp.fc1.out_features == 75
    x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            theirs.forward_head(theirs.forward_features(x)), ours(x).pooler_output, atol=1e-5, rtol=0
        )
    back = load_timm(tmp_path)
    assert back.config == ours.config and back.processor_config.image_size == (42, 42)
    assert to_timm(ours).state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("preset", ["siglip-so400m-patch14-384", "siglip2-base-patch16-224"])  # bicubic, bilinear
def test_timms_own_transforms_of_a_saved_tower_preprocess_as_the_checkpoint_does(preset, tmp_path):
    ours = SigLIP2Encoder.from_preset(
        preset, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=42
    )
    save_timm(ours, tmp_path)
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    config = timm.data.resolve_data_config({}, model=model)
    assert (config["crop_pct"], config["crop_mode"]) == (1.0, "squash")  # the whole image, aspect not kept
    transform = timm.data.create_transform(**config)
    rng = np.random.default_rng(0)
    for h, w in [(30, 50), (480, 640), (42, 42), (200, 90), (1000, 37)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = ImageProcessor(ours.processor_config)([image]).pixel_values[0]
        # PIL's resize (timm) vs torchvision's on the uint8 tensor (transformers, ours) round apart: measured at
        # most 2 uint8 levels, i.e. 2/255 of the [0, 1] range, 4/255 after normalising by std 0.5.
        torch.testing.assert_close(transform(image), want, atol=2 / 255 / 0.5 + 1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "hidden_act"), [("ViT-B-16-SigLIP", "gelu"), ("ViT-B-32-SigLIP2-256", "gelu_pytorch_tanh")]
)
def test_open_clip_siglip_image_tower_equals_open_clips(name, hidden_act):
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    ours = from_open_clip(model)
    assert ours.config.hidden_act == hidden_act  # open_clip's SigLIP 1 towers use exact GELU, its SigLIP 2 ones tanh
    size = ours.config.image_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.encode_image(x)
        torch.testing.assert_close(ours(x).pooler_output, want, atol=1e-4, rtol=0)
        # The activation matters: the other GELU gives another answer.
        other = SigLIP2Encoder(ours.config.replace(hidden_act="gelu" if hidden_act != "gelu" else "gelu_pytorch_tanh"))
        other.load_state_dict(ours.state_dict())
        assert (other.eval()(x).pooler_output - want).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "part"),
    [
        (dict(class_token=True), "a class token (class_token=True)"),
        (dict(reg_tokens=2), "register tokens (reg_tokens > 0)"),
        (dict(num_classes=10), "a classifier head (num_classes > 0)"),
        (dict(init_values=0.1), "layer scale (init_values)"),
        (dict(qk_norm=True), "q/k norms (qk_norm=True)"),
        (dict(global_pool="max"), "global_pool='max' (SigLIP pools with 'map'; '' and 'avg' load without a head)"),
    ],
)
def test_timm_models_the_tower_cannot_express_are_refused(kwargs, part):
    model = timm_siglip(**kwargs)
    message = f"the timm model has {part}, which the SigLIP tower does not; it cannot be converted"
    with pytest.raises(ValueError, match=re.escape(message)):
        from_timm(model)


def test_towers_timm_cannot_express_are_refused():
    ours = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", num_hidden_layers=1, layer_norm_eps=1e-5)
    with pytest.raises(ValueError, match=re.escape("timm's SigLIP ViTs use layer_norm_eps=1e-06, this tower 1e-05")):
        to_timm(ours)
    buckets = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", num_hidden_layers=1, position_lookup="buckets")
    with pytest.raises(ValueError, match=re.escape("timm has no ViT with position_lookup='buckets'")):
        to_timm(buckets)
    with pytest.raises(TypeError, match="expected a timm VisionTransformer or NaFlexVit, got Linear"):
        from_timm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", timm.list_models("*siglip*"))
def test_every_timm_siglip_variant_converts_with_its_own_activation(name):
    """Each registered variant, shrunk in width and depth but with its own activation, patch size and pooling."""
    torch.manual_seed(0)
    shrink = dict(embed_dim=32, depth=2, num_heads=4)
    if name.startswith("naflexvit"):
        reference = timm.create_model(name, pretrained=False, num_classes=0, pos_embed_grid_size=(3, 3), **shrink)
    else:
        reference = timm.create_model(name, pretrained=False, num_classes=0, img_size=64, **shrink)
    reference = perturb(reference, seed=1)
    ours = from_timm(reference)
    assert ours.config.use_head == ("_gap_" not in name)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = reference.forward_features(x)
        got = ours([x[0]]) if ours.config.naflex else ours(x)
        torch.testing.assert_close(got.last_hidden_state, tokens, atol=1e-5, rtol=0)
        if ours.config.use_head:
            torch.testing.assert_close(got.pooler_output, reference.forward_head(tokens), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(got.last_hidden_state.mean(1), reference.forward_head(tokens), atol=1e-5, rtol=0)


def test_from_pretrained_names_the_loader_for_timm_and_open_clip_folders(tmp_path):
    from siglip2_encoder.checkpoints.hub import CheckpointError

    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **FIXED)
    save_timm(tower, tmp_path / "timm")
    architecture = to_timm(tower).default_cfg["architecture"]
    with pytest.raises(CheckpointError) as error:
        SigLIP2Encoder.from_pretrained(tmp_path / "timm")
    assert str(error.value) == (
        f"config.json is timm's (architecture={architecture!r}), not transformers'; load it with "
        f"siglip2_encoder.integrations.timm_models.load_timm, or convert it once: "
        f"`siglip2-encoder convert SRC DST --to hf`"
    )
    folder = tmp_path / "open_clip"
    folder.mkdir()  # the layout of open_clip's Hub repos (e.g. timm/ViT-B-16-SigLIP2)
    (folder / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 768}}')
    with pytest.raises(CheckpointError) as error:
        SigLIP2Encoder.from_pretrained(folder)
    assert str(error.value) == (
        f"{folder} is an open_clip checkpoint (open_clip_config.json, no config.json); build it with "
        f"open_clip.create_model_and_transforms and take its image tower with "
        f"siglip2_encoder.integrations.timm_models.from_open_clip(model)"
    )
