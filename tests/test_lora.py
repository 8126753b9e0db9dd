"""LoRA through peft: freezing, no-op at init, live adapters, peft's save / merge / disable / named adapters, and
adapter exchange with transformers' SiglipVisionModel in both directions."""

from __future__ import annotations

import re

import pytest
import torch
from peft import AutoPeftModel, LoraConfig, PeftModel, get_peft_model
from test_weight_changes import inputs
from transformers import SiglipVisionModel

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.models.lora import EncoderLoRAConfig, LoRAAdapter, add_lora, trainable_parameters

X = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(0))


def randomize_lora(model: torch.nn.Module, seed: int = 0, adapter: str = "default") -> None:
    """Give the adapter's LoRA B matrices values, so it changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def pooled(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).pooler_output


def lora_names(model: torch.nn.Module) -> list[str]:
    return sorted({n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n})


def test_add_lora_freezes_the_rest_and_is_a_no_op_at_init(fixed_dir):
    base = SigLIP2Encoder.from_pretrained(fixed_dir)
    before = pooled(base)
    config = EncoderLoRAConfig(r=4, modules=("q_proj", "v_proj", "fc1"), encoder_layers=2)
    model = add_lora(base, config)
    targets = lora_names(model)
    assert targets == sorted(f"base_model.model.{t}" for t in config.target_modules(3))
    assert all(".layers.1." in t or ".layers.2." in t for t in targets) and not any("head" in t for t in targets)
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * (4 * (32 + 32) * 2 + 4 * (32 + 64))  # per layer: q, v (32->32), fc1 (32->64)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    torch.testing.assert_close(pooled(model), before, atol=1e-6, rtol=0)  # the LoRA layers take the reference path


def test_every_adapter_is_live(fixed_dir):
    model = add_lora(
        SigLIP2Encoder.from_pretrained(fixed_dir),
        EncoderLoRAConfig(r=2, modules=tuple(["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])),
    )
    reference = pooled(model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():  # random, not constant: LayerNorm would cancel a constant shift across channels
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
            assert not torch.allclose(pooled(model), reference, atol=1e-6), f"{name} has no effect"
            with torch.no_grad():
                p.zero_()


def test_save_load_merge_disable_and_named_adapters(fixed_dir, tmp_path):
    model = add_lora(SigLIP2Encoder.from_pretrained(fixed_dir), EncoderLoRAConfig(r=4))
    randomize_lora(model, seed=1)
    adapted, base = pooled(model), pooled(SigLIP2Encoder.from_pretrained(fixed_dir))
    assert not torch.allclose(adapted, base, atol=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    loaded = PeftModel.from_pretrained(SigLIP2Encoder.from_pretrained(fixed_dir), tmp_path / "adapter")
    torch.testing.assert_close(pooled(loaded), adapted, atol=1e-6, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(pooled(loaded), base, atol=1e-6, rtol=0)
    loaded.merge_adapter()
    torch.testing.assert_close(pooled(loaded), adapted, atol=1e-5, rtol=0)
    loaded.unmerge_adapter()
    torch.testing.assert_close(pooled(loaded), adapted, atol=1e-5, rtol=0)
    merged = loaded.merge_and_unload()
    assert isinstance(merged, SigLIP2Encoder) and not lora_names(merged)
    torch.testing.assert_close(pooled(merged), adapted, atol=1e-5, rtol=0)

    two = add_lora(model, EncoderLoRAConfig(r=2, modules=("fc2",), encoder_layers=(-1,)), adapter_name="second")
    randomize_lora(two, seed=2, adapter="second")
    two.set_adapter("second")
    second = pooled(two)
    two.set_adapter("default")
    torch.testing.assert_close(pooled(two), adapted, atol=1e-6, rtol=0)
    assert not torch.allclose(second, adapted, atol=1e-4)
    with pytest.raises(ValueError, match="exists already"):
        add_lora(two, adapter_name="second")


def test_adapter_from_transformers_loads_into_ours(fixed_dir, tmp_path):
    hf = get_peft_model(
        SiglipVisionModel.from_pretrained(fixed_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc2"]),
    )
    randomize_lora(hf, seed=3)
    hf.eval()
    with torch.no_grad():
        want = hf(pixel_values=X).pooler_output
    hf.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(SigLIP2Encoder.from_pretrained(fixed_dir), tmp_path)
    assert len(lora_names(ours)) == len(lora_names(hf))
    torch.testing.assert_close(pooled(ours), want, atol=1e-5, rtol=0)


def test_our_adapter_loads_into_transformers(fixed_dir, tmp_path):
    ours = add_lora(SigLIP2Encoder.from_pretrained(fixed_dir), EncoderLoRAConfig(r=4, modules=("k_proj", "fc1")))
    randomize_lora(ours, seed=4)
    ours.save_pretrained(tmp_path)
    hf = PeftModel.from_pretrained(SiglipVisionModel.from_pretrained(fixed_dir), tmp_path).eval()
    with torch.no_grad():
        want = hf(pixel_values=X).pooler_output
    torch.testing.assert_close(pooled(ours), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("naflex", [False, True])
def test_a_published_adapter_loads_with_peft_auto_peft_model_alone(naflex, fixed_dir, naflex_dir, tmp_path):
    base = naflex_dir if naflex else fixed_dir
    ours = add_lora(SigLIP2Encoder.from_pretrained(base), EncoderLoRAConfig(r=4, modules=("q_proj", "fc2"))).eval()
    randomize_lora(ours, seed=5)
    LoRAAdapter(ours).save_pretrained(tmp_path)
    # peft reads the base class from auto_mapping and the base from base_model_name_or_path: no code of ours.
    theirs = AutoPeftModel.from_pretrained(tmp_path).eval()
    assert type(theirs.get_base_model()).__name__ == ("Siglip2VisionModel" if naflex else "SiglipVisionModel")
    with torch.no_grad():
        want, got = ours(**inputs(naflex)).pooler_output, theirs(**inputs(naflex)).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def saved_activation_bytes(model: torch.nn.Module) -> int:
    """Bytes autograd keeps for the backward pass of one forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(X).pooler_output.square().sum().backward()
    return total


def test_gradient_checkpointing_with_frozen_base(fixed_dir):
    model = add_lora(SigLIP2Encoder.from_pretrained(fixed_dir), EncoderLoRAConfig(r=4)).train()
    randomize_lora(model)  # with B = 0, A gets no gradient

    def lora_grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(X).pooler_output.square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, plain_bytes = lora_grads(), saved_activation_bytes(model)
    model.get_base_model().gradient_checkpointing_enable()
    checkpointed, checkpointed_bytes = lora_grads(), saved_activation_bytes(model)
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(r=0), "r must be a positive int, got r=0"),
        (dict(alpha=0), "alpha must be > 0, got alpha=0"),
        (dict(dropout=1.0), "dropout must be in [0, 1), got dropout=1.0"),
        (
            dict(modules=("qkv",)),
            "modules must be a non-empty subset of ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'], "
            "got ['qkv']",
        ),
    ],
    ids=lambda v: None if isinstance(v, str) else ",".join(v),
)
def test_bad_lora_config_is_refused_with_its_exact_message(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EncoderLoRAConfig(**fields)


@pytest.mark.parametrize(
    ("encoder_layers", "message"),
    [
        (4, "encoder_layers=4 must take between 1 and 3 last layers"),
        ((0, 3), "encoder_layers=(0, 3) must be indices in [-3, 2]"),
    ],
)
def test_bad_layer_selection_is_refused_with_its_exact_message(encoder_layers, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EncoderLoRAConfig(encoder_layers=encoder_layers).layer_indices(3)


def test_layer_selection_and_model_type():
    assert EncoderLoRAConfig(encoder_layers=(0, -1)).layer_indices(3) == [0, 2]
    assert EncoderLoRAConfig(encoder_layers=2).layer_indices(3) == [1, 2]
    with pytest.raises(
        TypeError, match="add_lora takes a SigLIP2Encoder, a SigLIP2Model or a PeftModel around one, got Linear"
    ):
        add_lora(torch.nn.Linear(2, 2))
