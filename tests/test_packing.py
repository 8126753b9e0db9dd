"""Packed variable-length execution and the inference fast paths: each equals the reference path and transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import Siglip2VisionModel, SiglipVisionModel

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.models.attention import select_attention_backend
from siglip2_encoder.models.packing import Packing

ATOL = 1e-5
# A 1-token image, very elongated ones, two grids with one token count (4x5, 5x4), repeats, and a full 4x4 grid.
GRIDS = [(4, 5), (1, 1), (1, 40), (5, 4), (40, 1), (4, 4), (1, 1), (3, 7)]
LAYERS = [0, 1, -2]


def naflex_batch(grids, length=None, seed=0):
    """transformers-style padded NaFlex input with random pixels for these grids."""
    length = length or max(h * w for h, w in grids)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(grids), length, 8 * 8 * 3, generator=generator)
    counts = torch.tensor([h * w for h, w in grids])
    mask = torch.arange(length) < counts[:, None]
    pixels[~mask] = 0
    return {"pixel_values": pixels, "spatial_shapes": torch.tensor(grids), "pixel_attention_mask": mask.long()}


def run(model, inputs, fast=True, layers=LAYERS):
    model.fast_inference = fast
    with torch.no_grad():
        return model(**inputs, layers=layers)


def assert_outputs_close(got, want, mask=None, atol=ATOL):
    pairs = [(got.last_hidden_state, want.last_hidden_state), (got.pooler_output, want.pooler_output)]
    pairs += [(got.hidden_states[i], want.hidden_states[i]) for i in LAYERS]
    for ours, ref in pairs:
        assert ours.shape == ref.shape
        if mask is not None and ours.ndim == 3:
            ours, ref = ours[mask], ref[mask]
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


def test_packing_layout():
    packing = Packing.from_grids(GRIDS, "cpu", length=45)
    counts = [h * w for h, w in GRIDS]
    assert [counts[i] for i in packing.order] == sorted(counts)
    assert packing.num_tokens == sum(counts) and packing.max_tokens == 40
    assert [r[1:] for r in packing.runs] == [(2, 1), (1, 16), (2, 20), (1, 21), (2, 40)]
    assert packing.cu_seqlens.tolist() == [0, *torch.tensor(sorted(counts)).cumsum(0).tolist()]
    padded = torch.randn(len(GRIDS), 45, 3)
    mask = packing.mask()
    padded[~mask] = 0
    assert torch.equal(packing.unpack(packing.pack(padded)), padded)
    assert torch.equal(packing.to_input_order(torch.arange(8)[list(packing.order)]), torch.arange(8))


@pytest.mark.parametrize("batch", [GRIDS, [(3, 7)], [(1, 1)]], ids=["mixed", "one-image", "one-token"])
def test_packed_naflex_matches_transformers_and_the_reference_path(naflex_dir, batch):
    ours = SigLIP2Encoder.from_pretrained(naflex_dir)
    ref = Siglip2VisionModel.from_pretrained(naflex_dir, attn_implementation="sdpa").eval()
    inputs = naflex_batch(batch, length=45)
    with torch.no_grad():
        want = ref(**inputs, output_hidden_states=True)
    want.hidden_states = dict(enumerate(want.hidden_states)) | {-2: want.hidden_states[-2]}
    mask = inputs["pixel_attention_mask"].bool()
    fast, reference = run(ours, inputs), run(ours, inputs, fast=False)
    assert_outputs_close(fast, want, mask)
    assert_outputs_close(reference, want, mask)
    assert_outputs_close(fast, reference, atol=ATOL)  # padding rows included: zero in both
    assert fast.last_hidden_state.shape[1] == 45 and fast.grids == batch


def test_each_image_is_independent_of_its_batch(naflex_dir):
    ours = SigLIP2Encoder.from_pretrained(naflex_dir)
    packed = run(ours, naflex_batch(GRIDS))
    for b, grid in enumerate(GRIDS):
        inputs = naflex_batch(GRIDS)
        alone = run(ours, {k: v[b : b + 1] for k, v in inputs.items()} | {"spatial_shapes": torch.tensor([grid])})
        n = grid[0] * grid[1]
        torch.testing.assert_close(packed.last_hidden_state[b, :n], alone.last_hidden_state[0, :n], atol=ATOL, rtol=0)
        torch.testing.assert_close(packed.pooler_output[b], alone.pooler_output[0], atol=ATOL, rtol=0)


def test_list_of_fixed_resolution_images_at_several_sizes_matches_transformers(fixed_dir):
    ours = SigLIP2Encoder.from_pretrained(fixed_dir)
    ref = SiglipVisionModel.from_pretrained(fixed_dir, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(0)
    sizes = [(36, 36), (16, 64), (8, 8), (36, 36), (64, 16), (24, 40)]
    images = [torch.randn(3, *size, generator=generator) for size in sizes]
    for fast in (True, False):
        got = run(ours, {"pixel_values": images}, fast=fast)
        assert got.grids == [(h // 8, w // 8) for h, w in sizes]
        for b, image in enumerate(images):
            with torch.no_grad():
                want = ref(image[None], interpolate_pos_encoding=True, output_hidden_states=True)
            n = got.token_counts[b]
            for layer in LAYERS:
                torch.testing.assert_close(
                    got.hidden_states[layer][b, :n], want.hidden_states[layer][0], atol=ATOL, rtol=0
                )
            torch.testing.assert_close(got.per_image()[b], want.last_hidden_state[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(got.pooler_output[b], want.pooler_output[0], atol=ATOL, rtol=0)


def test_list_input_on_a_naflex_tower_equals_patchified_input(naflex_dir):
    ours = SigLIP2Encoder.from_pretrained(naflex_dir)
    images = [torch.randn(3, 8 * h, 8 * w) for h, w in GRIDS]
    from_list = run(ours, {"pixel_values": images})
    per_image = [run(ours, {"pixel_values": image[None]}) for image in images]
    for b, single in enumerate(per_image):
        n = from_list.token_counts[b]
        torch.testing.assert_close(from_list.last_hidden_state[b, :n], single.last_hidden_state[0], atol=ATOL, rtol=0)


def test_flex_backend_equals_sdpa(naflex_dir):
    ours = SigLIP2Encoder.from_pretrained(naflex_dir)
    inputs = naflex_batch(GRIDS)
    sdpa = run(ours, inputs)
    ours.attention_backend = "flex"
    with pytest.warns(UserWarning, match="torch.compile"):  # eager flex attention materialises the scores
        flex = run(ours, inputs)
    assert_outputs_close(flex, sdpa)


def test_auto_backend_is_sdpa_on_cpu():
    cpu = torch.device("cpu")
    assert select_attention_backend("auto", cpu, torch.float32, 0.0).name == "sdpa"
    assert select_attention_backend("auto", cpu, torch.bfloat16, 0.0).name == "sdpa"


@pytest.mark.parametrize(
    ("name", "dtype", "dropout", "message"),
    [
        ("varlen", torch.bfloat16, 0.0, "'varlen' needs a CUDA device and fp16 or bf16, got cpu and torch.bfloat16"),
        ("flash_attn", torch.float16, 0.0, "'flash_attn' needs a CUDA device and fp16 or bf16, got cpu"),
        ("flex", torch.float32, 0.1, "'flex' has no attention dropout \\(got dropout 0.1\\)"),
        (
            "xformers",
            torch.float32,
            0.0,
            "'xformers' is not one of \\('auto', 'sdpa', 'varlen', 'flash_attn', 'flex'\\)",
        ),
    ],
)
def test_backend_that_cannot_run_is_refused(name, dtype, dropout, message):
    with pytest.raises(ValueError, match=message):
        select_attention_backend(name, torch.device("cpu"), dtype, dropout)


def test_attention_backend_setter_names_the_choices():
    model = SigLIP2Encoder.from_preset("siglip2-base-patch16-naflex", num_hidden_layers=1)
    with pytest.raises(ValueError, match="attention_backend must be one of \\('auto', 'sdpa'"):
        model.attention_backend = "xformers"


def test_packed_gradients_equal_per_image_gradients(naflex_dir):
    """Training on a packed mixed batch gives the gradients of the same images run one by one.

    In float64: the two sum the same terms in another order, which in float32 moves gradients of size ~50 by up to
    6.5e-5 (torch 2.11) - noise that would hide a real difference; in float64 the noise is ~1e-13."""
    ours = SigLIP2Encoder.from_pretrained(naflex_dir).double().train()
    grids = [(4, 5), (1, 1), (5, 4), (2, 9)]
    inputs = naflex_batch(grids)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    ours(**inputs).pooler_output.square().sum().backward()
    packed = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    for b, grid in enumerate(grids):
        single = {k: v[b : b + 1] for k, v in inputs.items()} | {"spatial_shapes": torch.tensor([grid])}
        ours(**single).pooler_output.square().sum().backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, atol=1e-10, rtol=0, msg=name)
    assert packed["embeddings.position_embedding.weight"].abs().sum() > 0  # not served from the frozen cache


def test_inference_path_keeps_requested_hidden_states_intact(fixed_dir):
    """The inference path updates tokens in place; every hidden state handed out must be a snapshot."""
    ours = SigLIP2Encoder.from_pretrained(fixed_dir)
    inputs = {"pixel_values": torch.randn(2, 3, 36, 36)}
    every = [0, 1, 2, 3]
    fast, reference = run(ours, inputs, layers=every), run(ours, inputs, fast=False, layers=every)
    for i in every:
        torch.testing.assert_close(fast.hidden_states[i], reference.hidden_states[i], atol=ATOL, rtol=0)
    assert not torch.equal(fast.hidden_states[1], fast.hidden_states[2])


def test_lora_wrappers_and_hooks_take_the_reference_path(fixed_dir):
    ours = SigLIP2Encoder.from_pretrained(fixed_dir)
    calls = []
    ours.encoder.layers[1].mlp.fc1.register_forward_hook(lambda *_: calls.append(1))
    run(ours, {"pixel_values": torch.randn(1, 3, 36, 36)})
    assert calls == [1]


def test_bf16_keeps_embeddings_in_fp32(fixed_dir):
    ours = SigLIP2Encoder.from_pretrained(fixed_dir)
    x = torch.randn(2, 3, 36, 36)
    want = run(ours, {"pixel_values": x})
    ours.set_precision(torch.bfloat16)
    assert ours.dtype == torch.float32 and ours.encoder_dtype == torch.bfloat16
    assert ours.embeddings.position_embedding.weight.dtype == torch.float32
    got = run(ours, {"pixel_values": x})
    assert got.last_hidden_state.dtype == torch.bfloat16
    torch.testing.assert_close(got.pooler_output.float(), want.pooler_output, atol=0.1, rtol=0.05)
