"""Dense features: maps at native aspect ratio, tiled inference, heads, metrics, and the transformers Backbone API."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoBackbone, SiglipVisionModel, UperNetConfig, UperNetForSemanticSegmentation

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.integrations.backbone import SigLIP2Backbone, SigLIP2BackboneConfig
from siglip2_encoder.integrations.dense import feature_maps, prepare_image, tiled_feature_maps
from siglip2_encoder.integrations.heads import (
    DenseModel,
    FPNHead,
    LinearProbeHead,
    default_taps,
    mean_iou,
    pixel_accuracy,
    rmse,
    scale_invariant_loss,
)

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)


@pytest.fixture(scope="module", params=["siglip2-base-patch16-224", "siglip2-base-patch16-naflex"])
def tower(request) -> SigLIP2Encoder:
    torch.manual_seed(0)
    return SigLIP2Encoder.from_preset(request.param, **SMALL).eval()


def test_feature_maps_keep_the_aspect_ratio_and_match_the_tokens(tower):
    image = torch.rand(3, 100, 300)  # 1:3
    maps = feature_maps(tower, image, layers=(None, -2), max_tokens=48)
    pixels, original = prepare_image(tower, image, 48)
    assert original == (100, 300) and pixels.shape[-2:] == (64, 192)  # 4 x 12 tokens: 1:3 within 48
    with torch.no_grad():
        out = tower(pixels, layers=[-2])
    tokens = out.hidden_states[-2][0]  # (48, D), row-major over the 4 x 12 grid
    assert maps[-2].shape == (64, 4, 12)
    assert torch.equal(maps[-2][:, 3, 0], tokens[3 * 12]) and torch.equal(maps[-2][:, 0, 11], tokens[11])
    assert feature_maps(tower, image, max_tokens=48, upsample=True)[None].shape == (64, 100, 300)


def test_tiled_inference_equals_direct_for_one_tile_and_matches_it_inside_larger_images(tower):
    small = torch.rand(3, 100, 150)
    pixels, _ = prepare_image(tower, small, 0)
    with torch.no_grad():
        direct = tower(pixels, layers=[2])
    tiled = tiled_feature_maps(tower, small, tile=512, overlap=64, layers=(None, 2))
    torch.testing.assert_close(tiled[None], direct.feature_map()[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(tiled[2], direct.feature_map(2)[0], atol=1e-6, rtol=0)

    big = torch.rand(3, 320, 480, generator=torch.Generator().manual_seed(1))
    pixels, _ = prepare_image(tower, big, 0)
    with torch.no_grad():
        direct = tower(pixels, layers=[2])
    tiled = tiled_feature_maps(tower, big, tile=160, overlap=48, layers=(None, 2), batch_size=4)
    inner = (slice(None), slice(3, -3), slice(3, -3))  # away from the image borders
    for layer in (2, None):
        want = direct.feature_map(layer)[0]
        assert tiled[layer].shape == want.shape == (64, 20, 30)
        cosine = torch.nn.functional.cosine_similarity(tiled[layer][inner], want[inner], dim=0)
        assert cosine.mean() > 0.9, (layer, cosine.mean())  # README states this tolerance
    with pytest.raises(ValueError, match="overlap < tile"):
        tiled_feature_maps(tower, big, tile=160, overlap=160)


def test_heads_shapes_and_dense_model_segmentation_and_depth():
    torch.manual_seed(0)
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **SMALL, image_size=64).eval()
    x = torch.rand(2, 3, 64, 96)
    taps = default_taps(4)
    assert taps == (1, 2, 3, 4) and default_taps(27) == (7, 14, 20, 27)
    fpn = DenseModel(tower, FPNHead(64, 5, num_taps=len(taps), width=16), taps)
    logits = fpn(x)
    assert logits.shape == (2, 5, 64, 96)
    loss = fpn.loss(logits, torch.randint(0, 5, (2, 64, 96)))
    loss.backward()
    assert tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0  # end to end unless frozen
    probe = DenseModel(tower, LinearProbeHead(64, 3), (None,)).eval()
    with torch.no_grad():
        one = probe(x[:1])
        torch.testing.assert_close(probe.predict_sliding(x[:1], tile=128, overlap=32), one)  # fits one tile
        assert probe.predict_sliding(torch.rand(1, 3, 64, 160), tile=64, overlap=16).shape == (1, 3, 64, 160)
    depth = DenseModel(tower, LinearProbeHead(64, 1), (None,), task="depth")
    target = torch.rand(2, 64, 96) + 0.5
    assert torch.isfinite(depth.loss(depth(x), target))
    assert scale_invariant_loss(target.log() + 0.3, target, target > 0, lam=1.0).abs() < 1e-6
    assert rmse(target.log(), target) < 1e-5
    with pytest.raises(ValueError, match="1 to 4 taps"):
        FPNHead(64, 3, num_taps=5)
    with pytest.raises(ValueError, match="built for 4 taps"):
        fpn.head([torch.rand(1, 64, 4, 6)], (64, 96))
    with pytest.raises(ValueError, match="out of range"):
        DenseModel(tower, LinearProbeHead(64, 3), (9,))


def test_metrics():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    # class 0: 1 / 2, class 1: 2 / 3, class 2: 2 / 2; pixels 255 ignored
    assert mean_iou(pred, target, 3) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert pixel_accuracy(pred, target) == pytest.approx(5 / 6)


def test_backbone_conventions_and_upernet_training_step():
    config = SigLIP2BackboneConfig(**SMALL, image_size=64, patch_size=16, out_indices=[1, 2, 4])
    assert config.out_features == ["stage1", "stage2", "stage4"] and config.stage_names[0] == "stem"
    with pytest.raises(ValueError, match="out_indices"):
        SigLIP2BackboneConfig(**SMALL, out_indices=[2, 1])
    with pytest.raises(ValueError, match="out_features"):
        SigLIP2BackboneConfig(**SMALL, out_features=["stage9"])
    backbone = AutoBackbone.from_config(config)
    assert isinstance(backbone, SigLIP2Backbone) and backbone.channels == [64, 64, 64]
    maps = backbone(torch.rand(2, 3, 64, 96)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 6)] * 3

    torch.manual_seed(0)
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **SMALL, image_size=64).eval()
    wrapped = SigLIP2Backbone.from_encoder(tower, out_indices=[4]).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        want = tower(x).feature_map()  # the last layer after post-layernorm
        torch.testing.assert_close(wrapped(x).feature_maps[0], want, atol=1e-6, rtol=0)

    upernet = UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=config, num_labels=4, hidden_size=32, auxiliary_in_channels=64)
    )
    out = upernet(pixel_values=torch.rand(2, 3, 64, 96), labels=torch.randint(0, 4, (2, 64, 96)))
    assert out.logits.shape == (2, 4, 64, 96)
    out.loss.backward()
    assert upernet.backbone.encoder.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_backbone_hidden_states_follow_transformers(fixed_dir):
    """Like transformers' ViT backbones: the embeddings plus every layer, whatever out_indices selects; and the
    values are transformers' SiglipVisionModel hidden states on the same weights."""
    tower = SigLIP2Encoder.from_pretrained(fixed_dir)
    backbone = SigLIP2Backbone.from_encoder(tower, out_indices=[2]).eval()
    reference = SiglipVisionModel.from_pretrained(fixed_dir).eval()
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        out = backbone(x, output_hidden_states=True)
        want = reference(x, output_hidden_states=True).hidden_states
        plain = backbone(x)
        as_tuple = backbone(x, output_hidden_states=True, return_dict=False)
    assert len(out.hidden_states) == len(want) == 4 and len(out.feature_maps) == 1
    for ours, theirs in zip(out.hidden_states, want):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert plain.hidden_states is None and len(as_tuple) == 2 and len(as_tuple[1]) == 4
    backbone.config.output_hidden_states = True  # the config's default applies when the call says nothing
    with torch.no_grad():
        assert len(backbone(x).hidden_states) == 4


@pytest.mark.slow
def test_segmentation_example_probe_learns(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import segmentation_probe

    results = segmentation_probe.main(
        ["--train", "48", "--test", "16", "--size", "64", "--epochs", "12", "--picture", str(tmp_path / "seg.png")]
    )
    assert results["linear probe"] > results["majority class"] + 0.2
    assert results["FPN head"] > results["majority class"] + 0.2
    assert (tmp_path / "seg.png").stat().st_size > 0


def test_pca_rgb_puts_the_strongest_directions_in_red_green_blue():
    """Features made of three known orthogonal directions with decreasing variance: channel i follows the
    coefficient of direction i (up to PCA's sign), whatever the other 61 dimensions do at small scale."""
    from siglip2_encoder.integrations.dense import pca_rgb

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g))[0][:, :3]  # orthonormal columns
    coefficients = torch.randn(12 * 10, 3, generator=g) * torch.tensor([9.0, 4.0, 2.0])
    tokens = coefficients @ basis.T + 0.01 * torch.randn(120, 64, generator=g)
    picture = pca_rgb(tokens.T.reshape(64, 12, 10))
    assert picture.shape == (12, 10, 3) and picture.dtype == np.uint8
    for i in range(3):
        channel = torch.from_numpy(picture[..., i].reshape(-1).astype(np.float32))
        correlation = torch.corrcoef(torch.stack([channel, coefficients[:, i]]))[0, 1]
        assert abs(correlation) > 0.95, (i, correlation)
    assert pca_rgb(tokens.T.reshape(64, 12, 10), size=(48, 40)).shape == (48, 40, 3)
