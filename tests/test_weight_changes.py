"""No weight change can leave a fast path running on stale weights.

Each case warms up every fast path (the in-place inference path, NaFlex position resizing, a prepack_for_cpu copy),
then changes the weights the same way in our tower and in transformers' (peft adapter operations, load_state_dict,
.to(), an optimizer step, parameter replacement, writes through .data) and compares: our fast path, our reference
path and transformers must agree.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import Siglip2VisionModel, SiglipVisionModel

from siglip2_encoder import SigLIP2Encoder, prepack_for_cpu
from siglip2_encoder.models.lora import EncoderLoRAConfig, add_lora

ATOL = 1e-4
GRIDS = [(4, 5), (1, 7), (3, 3)]


def canonical(name: str) -> str:
    """A parameter's name without peft's and transformers' prefixes: the same in both models."""
    return name.replace("base_model.model.", "").replace("vision_model.", "")


def noise(name: str, shape: torch.Size, scale: float = 0.05) -> torch.Tensor:
    """Seeded by the canonical name, so both models get the same values."""
    generator = torch.Generator().manual_seed(zlib.crc32(canonical(name).encode()))
    return torch.randn(shape, generator=generator) * scale


def inputs(naflex: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if not naflex:
        return {"pixel_values": torch.randn(2, 3, 36, 36, generator=generator)}
    length = max(h * w for h, w in GRIDS)
    counts = torch.tensor([h * w for h, w in GRIDS])
    mask = torch.arange(length) < counts[:, None]
    pixels = torch.randn(len(GRIDS), length, 8 * 8 * 3, generator=generator) * mask[..., None]
    return {"pixel_values": pixels, "spatial_shapes": torch.tensor(GRIDS), "pixel_attention_mask": mask.long()}


def outputs(model: torch.nn.Module, naflex: bool, ours: bool, fast: bool = True) -> dict[str, torch.Tensor]:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if ours:
        base.fast_inference = fast
    with torch.no_grad():
        if ours:
            out = model(**inputs(naflex), layers=[-2])
            hidden = out.hidden_states[-2]
        else:
            out = model(**inputs(naflex), output_hidden_states=True)
            hidden = out.hidden_states[-2]
    mask = inputs(naflex).get("pixel_attention_mask")
    keep = (lambda t: t[mask.bool()]) if mask is not None else (lambda t: t)
    return {"pooled": out.pooler_output, "last": keep(out.last_hidden_state), "hidden -2": keep(hidden)}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=f"{what}: {key}")


def randomize_adapter(model: torch.nn.Module, adapter: str) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".lora_B.{adapter}." in name or f".lora_A.{adapter}." in name:
                p.copy_(noise(name, p.shape, 0.2))


def add_second_adapter(model: PeftModel) -> PeftModel:
    # Encoder layers only: the pooling head's out_proj is a LoRA no-op in transformers (nn.MultiheadAttention).
    targets = r".*encoder\.layers\.\d+\.(mlp\.fc1|self_attn\.out_proj)"
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    randomize_adapter(model, "second")
    return model


def op_merge(m):
    m.merge_adapter()
    return m


def op_unmerge(m):
    m.merge_adapter()
    m.unmerge_adapter()
    return m


def op_merge_and_unload(m):
    return m.merge_and_unload()


def op_set_adapter(m):
    add_second_adapter(m).set_adapter("second")
    return m


def op_disable_adapter(m):
    m.base_model.disable_adapter_layers()
    return m


def op_delete_adapter(m):
    add_second_adapter(m).set_adapter("second")
    m.delete_adapter("second")
    m.set_adapter("default")
    return m


def op_merge_unmerge_and_delete(m):
    m.merge_adapter()
    m.unmerge_adapter()
    add_second_adapter(m).set_adapter("second")
    m.delete_adapter("default")
    return m


def op_load_state_dict(m):
    m = m.merge_and_unload()
    m.load_state_dict({k: v + noise(k, v.shape) for k, v in m.state_dict().items()})
    return m


def op_to_bf16_and_back(m):
    return m.merge_and_unload().to(torch.bfloat16).to(torch.float32)  # lossy: every weight changes


def op_optimizer_step(m):
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    for name, p in trainable:
        p.grad = noise(name, p.shape)
    torch.optim.SGD([p for _, p in trainable], lr=1.0).step()
    return m.merge_and_unload()


def op_replace_parameters(m):
    m = m.merge_and_unload()
    for name, module in m.named_modules():
        if name.endswith("mlp.fc1"):
            module.weight = torch.nn.Parameter(module.weight + noise(name, module.weight.shape))
    return m


def op_data_writes(m):
    m = m.merge_and_unload()
    for name, p in m.named_parameters():
        if name.endswith("weight"):
            p.data += noise(name, p.shape)  # in place through .data: no version counter sees it
        else:
            p.data = p.data + noise(name, p.shape)  # a new tensor through .data
    return m


OPS = [
    op_merge,
    op_unmerge,
    op_merge_and_unload,
    op_set_adapter,
    op_disable_adapter,
    op_delete_adapter,
    op_merge_unmerge_and_delete,
    op_load_state_dict,
    op_to_bf16_and_back,
    op_optimizer_step,
    op_replace_parameters,
    op_data_writes,
]


@pytest.mark.parametrize("which", ["fixed", "naflex"])
@pytest.mark.parametrize("op", OPS, ids=[op.__name__.removeprefix("op_") for op in OPS])
def test_fast_paths_follow_every_weight_change(request, tmp_path, which, op):
    folder = request.getfixturevalue(f"{which}_dir")
    naflex = which == "naflex"
    reference_class = Siglip2VisionModel if naflex else SiglipVisionModel

    base = SigLIP2Encoder.from_pretrained(folder)
    before = outputs(base, naflex, ours=True)
    prepacked = prepack_for_cpu(base)  # a separate copy, made before the change
    assert_same(outputs(prepacked, naflex, ours=True), before, "prepacked copy before the change")

    ours = add_lora(base, EncoderLoRAConfig(r=4, modules=("q_proj", "v_proj", "fc2"), encoder_layers=2))
    randomize_adapter(ours, "default")
    ours.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(reference_class.from_pretrained(folder), tmp_path, is_trainable=True).eval()
    warm = outputs(ours, naflex, ours=True)  # warm every fast path up on the old weights

    ours, theirs = op(ours), op(theirs)
    want = outputs(theirs, naflex, ours=False)
    stale = [old for old in (before, warm) if torch.allclose(want["pooled"], old["pooled"], atol=1e-3)]
    assert len(stale) < 2, "the weights must change: stale weights would then give another output"
    assert_same(outputs(ours, naflex, ours=True), want, "fast path vs transformers")
    assert_same(outputs(ours, naflex, ours=True, fast=False), want, "reference path vs transformers")
    # The copy made before is a snapshot: untouched by the change. A new copy follows it.
    assert_same(outputs(prepacked, naflex, ours=True), before, "prepacked copy after the change")
    if isinstance(ours, SigLIP2Encoder):
        assert_same(outputs(prepack_for_cpu(ours), naflex, ours=True), want, "new prepacked copy vs transformers")


def test_deepcopy_of_towers_and_prepacked_copies(fixed_dir):
    """EMA teachers and evaluation snapshots deep-copy models."""
    tower = SigLIP2Encoder.from_pretrained(fixed_dir)
    prepacked = prepack_for_cpu(tower)
    want = outputs(tower, False, ours=True)
    for model in (copy.deepcopy(tower), copy.deepcopy(prepacked), copy.deepcopy(copy.deepcopy(prepacked))):
        assert_same(outputs(model, False, ours=True), want, type(model).__name__)
    ema = copy.deepcopy(tower)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    assert_same(outputs(tower, False, ours=True), want, "the original after changing its copy")


def test_prepacked_copy_is_inference_only_and_refuses_what_it_cannot_hold(fixed_dir, tmp_path):
    tower = SigLIP2Encoder.from_pretrained(fixed_dir)
    prepacked = prepack_for_cpu(tower)
    assert not any(p.requires_grad for p in prepacked.parameters()) and not prepacked.training
    with pytest.raises(ValueError, match=r"a prepack_for_cpu\(\) tower runs inference only"):
        prepacked.fast_inference = False
        prepacked(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match=r"cannot save: 3 module\(s\) are not the tower's own"):
        prepacked.save_pretrained(tmp_path)
    wrapped = add_lora(tower, EncoderLoRAConfig(r=2, modules=("q_proj",), encoder_layers=1))
    with pytest.raises(TypeError, match="got PeftModel; for a LoRA-wrapped tower pass its merge_and_unload()"):
        prepack_for_cpu(wrapped)
    with pytest.raises(
        ValueError,
        match=r"plain tower: 1 module\(s\) are not the tower's own, e.g. encoder.layers.2.self_attn.q_proj "
        r"\(peft.tuners",
    ):
        prepack_for_cpu(wrapped.get_base_model())
    with pytest.raises(ValueError, match="packs fp32 CPU towers; this one is torch.bfloat16 on cpu"):
        prepack_for_cpu(SigLIP2Encoder.from_pretrained(fixed_dir, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="takes a SigLIP2Encoder, got Linear;"):
        prepack_for_cpu(torch.nn.Linear(2, 2))


def test_lora_wrapped_tower_cannot_be_saved_as_a_plain_one(fixed_dir, tmp_path):
    wrapped = add_lora(SigLIP2Encoder.from_pretrained(fixed_dir), EncoderLoRAConfig(r=2, modules=("fc1",)))
    message = r"cannot save: 3 module\(s\) are not the tower's own, e.g. encoder.layers.0.mlp.fc1 \(peft.tuners.lora"
    with pytest.raises(ValueError, match=message):
        wrapped.get_base_model().save_pretrained(tmp_path)
