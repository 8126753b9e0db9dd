"""Parity with timm's SigLIP ViT (the second reference implementation) through the weight converters."""

from __future__ import annotations

import pytest
import timm
import torch

from siglip2_encoder import EncoderConfig, SigLIP2Encoder, convert_timm_state_dict, to_timm_state_dict


def timm_siglip() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_base_patch16_siglip_224",
        pretrained=False,
        num_classes=0,
        embed_dim=32,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        img_size=32,
        patch_size=8,
        act_layer="gelu_tanh",
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


def test_round_trip_to_timm_names():
    reference = timm_siglip()
    state = reference.state_dict()
    back = to_timm_state_dict(convert_timm_state_dict(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="no timm name"):
        to_timm_state_dict({"mystery.weight": torch.zeros(1)})
