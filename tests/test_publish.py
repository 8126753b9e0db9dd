"""Publishing: the folder and model card each push_to_hub would upload (tower, image-text model, projector, LoRA
adapter, VLM in its own and in LLaVA's format), the cards' code run as written, the upload handed to
huggingface_hub, and the Hub-id loading of what the cards name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import hub_cache, perturb
from huggingface_hub import ModelCard
from test_llava import make_vlm

from siglip2_encoder import EncoderConfig, SigLIP2Encoder, SigLIP2Model
from siglip2_encoder.adapters import LinearConfig, build_projector, load_projector
from siglip2_encoder.checkpoints.publish import TRAINING_DATA_PLACEHOLDER
from siglip2_encoder.integrations.llava import VisionLanguageModel
from siglip2_encoder.integrations.llava_export import LlavaExport
from siglip2_encoder.models.lora import EncoderLoRAConfig, LoRAAdapter, add_lora


def card_code(folder: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)


def run_card(folder: Path) -> list[dict]:
    """Run every code block of the card (written for repo_id = the folder itself); their namespaces."""
    spaces = []
    for code in card_code(folder):
        space: dict = {}
        exec(code, space)
        spaces.append(space)
    return spaces


def test_a_towers_card_carries_the_base_license_and_its_code_loads_it(fixed_dir, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (base / name).write_bytes((fixed_dir / name).read_bytes())
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    tower = SigLIP2Encoder.from_pretrained(base)
    out = tmp_path / "out"
    tower.save_for_hub(out, str(out))
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and "siglip2-encoder" in card.data.tags
    # transformers loads the folder: the Hub shows its code and widget for the task
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "image-feature-extraction")
    assert TRAINING_DATA_PLACEHOLDER in card.text and f"| base checkpoint | {base} |" in card.text
    ours, theirs = run_card(out)
    x = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        want = tower(x).pooler_output
        torch.testing.assert_close(ours["tower"](x).pooler_output, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs["model"].eval()(x).pooler_output, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_head", [False, True])
def test_a_bucketed_towers_card_loads_it_in_transformers(use_head, tmp_path):
    """A tower with bucketed positions (Idefics3's; with a head, Phi-4-multimodal's) is saved as transformers'
    Idefics3VisionTransformer / Phi4MultimodalVisionModel, and its card's transformers code loads it, with the eager
    attention the latter needs, equal to ours; so does its LoRA adapter's card."""
    config = EncoderConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        use_head=use_head, position_lookup="buckets",
    )  # fmt: skip
    tower = perturb(SigLIP2Encoder(config), seed=3).eval()
    tower.save_pretrained(tmp_path / "base")
    tower = SigLIP2Encoder.from_pretrained(tmp_path / "base")
    tower.save_for_hub(tmp_path / "tower", str(tmp_path / "tower"), license="mit")
    ours, theirs = run_card(tmp_path / "tower")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tower(x).last_hidden_state
        torch.testing.assert_close(theirs["model"].eval()(x).last_hidden_state, want, atol=1e-4, rtol=0)
    expected = "Phi4MultimodalVisionModel" if use_head else "Idefics3VisionTransformer"
    assert type(theirs["model"]).__name__ == expected
    adapter = LoRAAdapter(add_lora(tower, EncoderLoRAConfig(r=4)))
    adapter.save_for_hub(tmp_path / "adapter", str(tmp_path / "adapter"), license="mit")
    _, theirs = run_card(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(theirs["model"].eval()(x).last_hidden_state, want, atol=1e-4, rtol=0)


def test_every_publishable_writes_a_card_whose_code_runs(zero_shot_dir, tmp_path):
    vlm, _, tokenizer = make_vlm()
    SigLIP2Encoder.from_preset(
        "siglip2-base-patch16-224",
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    ).save_pretrained(tmp_path / "base")
    tower = SigLIP2Encoder.from_pretrained(tmp_path / "base")  # the adapter's card names it as its base
    adapter = LoRAAdapter(add_lora(tower, EncoderLoRAConfig(r=4)))
    cases = {
        "model": SigLIP2Model.from_pretrained(zero_shot_dir),
        "projector": build_projector(LinearConfig(in_features=32, out_features=16)),
        "adapter": adapter,
        "vlm": vlm,
        "llava": LlavaExport(vlm, tokenizer),
    }
    shown = {  # the library whose code the Hub shows (this one only for formats only it reads), the task
        "model": ("transformers", "zero-shot-image-classification"),
        "projector": ("siglip2-encoder", None),
        "adapter": ("peft", "image-feature-extraction"),
        "vlm": ("siglip2-encoder", "image-text-to-text"),
        "llava": ("transformers", "image-text-to-text"),
    }
    for name, publishable in cases.items():
        folder = tmp_path / name
        publishable.save_for_hub(folder, str(folder), license="mit", training_data="shapes I drew")
        card = ModelCard.load(folder / "README.md")
        assert card.data.license == "mit" and "shapes I drew" in card.text, name
        assert (card.data.library_name, card.data.pipeline_tag) == shown[name], name
        spaces = run_card(folder)
        assert len(spaces) == (1 if name in ("projector", "vlm") else 2), name
        loaded = [v for space in spaces for v in space.values() if isinstance(v, torch.nn.Module)]
        assert loaded, name


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(monkeypatch, fixed_dir):
    calls = {}

    def upload_folder(*, folder_path, repo_id, revision, token, commit_message):
        calls["upload"] = (sorted(os.listdir(folder_path)), repo_id, revision, token, commit_message)
        calls["card"] = Path(folder_path, "README.md").read_text()
        return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "create_branch", lambda repo_id, **kw: calls.setdefault("branch", kw))
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    tower = SigLIP2Encoder.from_pretrained(fixed_dir)
    url = tower.push_to_hub("me/tiny", token="t", private=True, revision="v1", license="apache-2.0")
    assert url == "https://hub/commit/1"
    assert calls["repo"] == ("me/tiny", {"token": "t", "private": True, "exist_ok": True})
    assert calls["branch"] == {"branch": "v1", "token": "t", "exist_ok": True}
    files, repo, revision, token, message = calls["upload"]
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert (repo, revision, token, message) == ("me/tiny", "v1", "t", "Upload with siglip2-encoder")
    assert 'SigLIP2Encoder.from_pretrained("me/tiny")' in calls["card"]


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, as a download would cache them."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_projectors_and_vlms_load_by_hub_id_from_the_cache_offline(tmp_path):
    projector = build_projector(LinearConfig(in_features=32, out_features=16))
    projector.save_pretrained(tmp_path / "projector")
    vlm, _, tokenizer = make_vlm()
    vlm.save_pretrained(tmp_path / "vlm", tokenizer)
    hub_cache(tmp_path / "cache", "me/projector", folder_files(tmp_path / "projector"))
    hub_cache(tmp_path / "cache", "me/vlm", folder_files(tmp_path / "vlm"))
    options = {"cache_dir": tmp_path / "cache", "local_files_only": True}
    again = load_projector("me/projector", **options)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), projector.state_dict().values()))
    os.environ["HF_HUB_CACHE"] = str(tmp_path / "cache")  # the LM's and tower's loaders read the same cache
    try:
        back = VisionLanguageModel.from_pretrained("me/vlm", local_files_only=True, cache_dir=tmp_path / "cache")
    finally:
        del os.environ["HF_HUB_CACHE"]
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), vlm.state_dict().values()))
    with pytest.raises(Exception, match="me/absent"):
        load_projector("me/absent", **options)
