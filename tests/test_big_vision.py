"""big_vision ``.npz`` checkpoints (Google's original release format) load into ours; the oracle is timm's own
big_vision loader reading the same file into timm's SigLIP ViT / NaFlexViT."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
from test_timm import timm_siglip
from timm.models.vision_transformer import _load_weights

from siglip2_encoder import CheckpointError, SigLIP2Encoder
from siglip2_encoder.checkpoints.big_vision import config_from_big_vision, read_npz


def big_vision_arrays(model: torch.nn.Module, *, stacked: bool, prefix: str = "params/img/") -> dict[str, np.ndarray]:
    """timm SigLIP ViT weights in big_vision's naming and layouts (flax kernels (in, out), heads split out, conv
    kernels HWIO), with a text tower's key beside them; ``stacked``: scanned layers, one array per weight."""
    n = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    heads = model.blocks[0].attn.num_heads
    width = model.embed_dim
    out: dict[str, np.ndarray] = {"params/txt/Embed_0/embedding": np.zeros((5, 4), np.float32), "params/t": np.ones(1)}

    def attention(path: str, q, kv_or_qkv, proj, fused: bool) -> dict[str, np.ndarray]:
        w, b = kv_or_qkv
        parts = dict(zip(("query", "key", "value"), zip(w.chunk(3), b.chunk(3)))) if fused else {}
        if not fused:
            parts = {"query": q} | dict(zip(("key", "value"), zip(w.chunk(2), b.chunk(2))))
        arrays = {}
        for name, (weight, bias) in parts.items():
            arrays[f"{path}{name}/kernel"] = n(weight.T.reshape(width, heads, -1))
            arrays[f"{path}{name}/bias"] = n(bias.reshape(heads, -1))
        arrays[f"{path}out/kernel"] = n(proj.weight.T.reshape(heads, -1, width))
        arrays[f"{path}out/bias"] = n(proj.bias)
        return arrays

    embeds = getattr(model, "embeds", None)
    if embeds is not None:  # NaFlexViT: a Dense over flattened (p, p, C) patches, an HWC position grid
        out[prefix + "embedding/kernel"] = n(embeds.proj.weight.T)
        out[prefix + "embedding/bias"] = n(embeds.proj.bias)
        out[prefix + "pos_embedding"] = n(embeds.pos_embed[0])
    else:
        out[prefix + "embedding/kernel"] = n(model.patch_embed.proj.weight.permute(2, 3, 1, 0))
        out[prefix + "embedding/bias"] = n(model.patch_embed.proj.bias)
        out[prefix + "pos_embedding"] = n(model.pos_embed)
    out[prefix + "Transformer/encoder_norm/scale"] = n(model.norm.weight)
    out[prefix + "Transformer/encoder_norm/bias"] = n(model.norm.bias)
    per_layer: list[dict[str, np.ndarray]] = []
    for block in model.blocks:
        arrays = {
            "LayerNorm_0/scale": n(block.norm1.weight),
            "LayerNorm_0/bias": n(block.norm1.bias),
            "LayerNorm_1/scale": n(block.norm2.weight),
            "LayerNorm_1/bias": n(block.norm2.bias),
        }
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            arrays[f"MlpBlock_0/Dense_{r}/kernel"] = n(fc.weight.T)
            arrays[f"MlpBlock_0/Dense_{r}/bias"] = n(fc.bias)
        qkv = (block.attn.qkv.weight, block.attn.qkv.bias)
        arrays |= attention("MultiHeadDotProductAttention_0/", None, qkv, block.attn.proj, fused=True)
        per_layer.append(arrays)
    if stacked:
        for key in per_layer[0]:
            out[f"{prefix}Transformer/encoderblock/{key}"] = np.stack([layer[key] for layer in per_layer])
    else:
        for i, arrays in enumerate(per_layer):
            out |= {f"{prefix}Transformer/encoderblock_{i}/{k}": v for k, v in arrays.items()}
    pool = model.attn_pool
    if pool is not None:
        head = prefix + "MAPHead_0/"
        out[head + "probe"] = n(pool.latent)
        out[head + "LayerNorm_0/scale"], out[head + "LayerNorm_0/bias"] = n(pool.norm.weight), n(pool.norm.bias)
        for r, fc in enumerate((pool.mlp.fc1, pool.mlp.fc2)):
            out[f"{head}MlpBlock_0/Dense_{r}/kernel"], out[f"{head}MlpBlock_0/Dense_{r}/bias"] = (
                n(fc.weight.T),
                n(fc.bias),
            )
        q = (pool.q.weight, pool.q.bias)
        out |= attention(head + "MultiHeadDotProductAttention_0/", q, (pool.kv.weight, pool.kv.bias), pool.proj, False)
    return out


def timm_naflex() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "naflexvit_base_patch16_siglip",
        pretrained=False,
        num_classes=0,
        embed_dim=32,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        patch_size=8,
        pos_embed_grid_size=(4, 4),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("stacked", [True, False], ids=["scanned layers", "one block per layer"])
def test_big_vision_npz_equals_timms_big_vision_loader(stacked, tmp_path):
    source = timm_siglip()
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_arrays(source, stacked=stacked))
    oracle = timm_siglip()
    with torch.no_grad():
        for p in oracle.parameters():
            p.zero_()
        _load_weights(oracle, str(path))
    ours = SigLIP2Encoder.from_big_vision(path)
    assert (ours.config.image_size, ours.config.patch_size, ours.config.num_hidden_layers) == (32, 8, 3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_tokens = oracle.forward_features(x)
        want = oracle.forward_head(want_tokens)
        got = ours(x)
        torch.testing.assert_close(want, source.forward_head(source.forward_features(x)), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.last_hidden_state, want_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooler_output, want, atol=1e-5, rtol=0)


def test_big_vision_naflex_npz_equals_timms_naflexvit_loader(tmp_path):
    source = timm_naflex()
    path = tmp_path / "naflex.npz"
    np.savez(path, **big_vision_arrays(source, stacked=True))
    oracle = timm_naflex()
    with torch.no_grad():
        for p in oracle.parameters():
            p.zero_()
        _load_weights(oracle, str(path))
    ours = SigLIP2Encoder.from_big_vision(path)
    assert ours.config.naflex and ours.config.num_patches == 16
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 40)]  # grids 4x4 and 2x5
    with torch.no_grad():
        got = ours(images)
        for b, image in enumerate(images):
            want = oracle.forward_features(image[None])
            h, w = got.grids[b]
            torch.testing.assert_close(got.last_hidden_state[b, : h * w], want[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(got.pooler_output[b], oracle.forward_head(want)[0], atol=1e-5, rtol=0)


def test_image_size_can_differ_from_grid_times_patch(tmp_path):
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_arrays(timm_siglip(), stacked=True))
    assert config_from_big_vision(read_npz(path), image_size=36).image_size == 36  # like So400m/14 at 384


def test_npz_without_an_image_tower_is_refused(tmp_path):
    np.savez(tmp_path / "text.npz", **{"params/txt/Embed_0/embedding": np.zeros((5, 4), np.float32)})
    message = (
        "not a big_vision SigLIP image tower: no embedding/kernel under any of ['params/img/', 'img/', 'params/', '']"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        SigLIP2Encoder.from_big_vision(tmp_path / "text.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {tmp_path / 'bad.npz'} as an .npz file")):
        SigLIP2Encoder.from_big_vision(tmp_path / "bad.npz")
