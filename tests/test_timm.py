"""Parity with timm's SigLIP ViT (the second reference implementation) through the weight converters."""

from __future__ import annotations

import pytest
import timm
import torch

from siglip2_encoder import EncoderConfig, SigLIP2Encoder, convert_timm_state_dict, to_timm_state_dict


def timm_siglip(**kwargs) -> torch.nn.Module:
    kwargs = {"num_classes": 0, "act_layer": "gelu_tanh"} | kwargs
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_base_patch16_siglip_224",
        pretrained=False,
        embed_dim=32,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        img_size=32,
        patch_size=8,
        **kwargs,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


CONFIG = EncoderConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)


def test_timm_weights_give_timm_outputs():
    reference = timm_siglip()
    ours = SigLIP2Encoder(CONFIG).eval()
    ours.load_state_dict(convert_timm_state_dict(reference.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = reference.forward_features(x)
        pooled = reference.forward_head(tokens)
        _, inter = reference.forward_intermediates(x, indices=[0, 1])
        out = ours(x, layers=[1, 2])
        _, ours_inter = ours.forward_intermediates(x, indices=[0, 1])
    torch.testing.assert_close(out.last_hidden_state, tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=0)
    for a, b in zip(ours_inter, inter):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(indices=[0, 2], norm=True, output_fmt="NCHW"),
        dict(indices=2, norm=False, output_fmt="NLC"),
        dict(indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True),
        dict(indices=None, output_fmt="NCHW", intermediates_only=True),
    ],
)
def test_forward_intermediates_equals_timms_on_non_square_images(kwargs):
    reference = timm_siglip(dynamic_img_size=True)
    # timm resizes position embeddings with antialiased (PIL-style) bicubic, transformers and we without: a zero
    # table makes both resizes exact, so this compares the intermediates' indexing, norm and layout alone.
    torch.nn.init.zeros_(reference.pos_embed)
    ours = SigLIP2Encoder(CONFIG).eval()
    ours.load_state_dict(convert_timm_state_dict(reference.state_dict()), strict=True)
    x = torch.randn(2, 3, 24, 40)  # a 3 x 5 grid, position embeddings interpolated in both
    with torch.no_grad():
        want = reference.forward_intermediates(x, **kwargs)
        got = ours.forward_intermediates(x, **kwargs)
    if not kwargs.get("intermediates_only"):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
        got, want = got[1], want[1]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_round_trip_to_timm_names():
    reference = timm_siglip()
    state = reference.state_dict()
    back = to_timm_state_dict(convert_timm_state_dict(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="no timm name"):
        to_timm_state_dict({"mystery.weight": torch.zeros(1)})
