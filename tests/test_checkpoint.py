"""Loading and saving: every file layout transformers writes, strictness, and clear errors without the Hub."""

from __future__ import annotations

import json
import shutil
import time

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SiglipVisionModel

from siglip2_encoder import CheckpointError, ImageProcessor, SigLIP2Encoder, config_from_hf, config_to_hf


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("which", ["fixed", "naflex"])
def test_round_trip_ours_to_ours(request, tmp_path, which):
    folder = request.getfixturevalue(f"{which}_dir")
    model = SigLIP2Encoder.from_pretrained(folder)
    model.save_pretrained(tmp_path)
    again = SigLIP2Encoder.from_pretrained(tmp_path)
    assert again.config == model.config and same_weights(model, again)
    assert again.processor_config == model.processor_config
    assert ImageProcessor.from_pretrained(tmp_path).config == ImageProcessor.from_pretrained(folder).config
    assert set(p.name for p in tmp_path.iterdir()) == {"config.json", "model.safetensors", "preprocessor_config.json"}


def test_round_trip_transformers_to_ours_to_transformers(fixed_dir, tmp_path):
    ref = SiglipVisionModel.from_pretrained(fixed_dir)
    SigLIP2Encoder.from_pretrained(fixed_dir).save_pretrained(tmp_path)
    back = SiglipVisionModel.from_pretrained(tmp_path)
    assert same_weights(ref, back)
    assert all(k.startswith("vision_model.") for k in load_file(tmp_path / "model.safetensors"))


def test_sharded_safetensors_and_pytorch_bin(fixed_dir, tmp_path):
    reference = SigLIP2Encoder.from_pretrained(fixed_dir)
    state = load_file(fixed_dir / "model.safetensors")
    keys = sorted(state)
    # Sharded, with an image-text style prefix and a text tower that must be skipped.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(fixed_dir / "config.json", sharded)
    halves = {
        "model-00001-of-00003.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00003.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, part in halves.items():
        save_file({f"vision_model.{k}": state[k] for k in part}, sharded / name)
        weight_map.update({f"vision_model.{k}": name for k in part})
    # A text-only shard that must not even be opened: it is not a valid file.
    (sharded / "model-00003-of-00003.safetensors").write_bytes(b"not a safetensors file")
    weight_map["text_model.embeddings.token_embedding.weight"] = "model-00003-of-00003.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert same_weights(SigLIP2Encoder.from_pretrained(sharded), reference)

    pickled = tmp_path / "bin"
    pickled.mkdir()
    shutil.copy(fixed_dir / "config.json", pickled)
    torch.save({**state, "logit_scale": torch.ones(1)}, pickled / "pytorch_model.bin")
    model = SigLIP2Encoder.from_pretrained(pickled, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert same_weights(model, reference.to(torch.bfloat16))


def test_strict_loading_lists_missing_and_unexpected_weights(fixed_dir, tmp_path):
    shutil.copy(fixed_dir / "config.json", tmp_path)
    state = load_file(fixed_dir / "model.safetensors")
    state.pop("encoder.layers.1.mlp.fc2.weight")
    state["encoder.layers.9.mlp.fc2.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        SigLIP2Encoder.from_pretrained(tmp_path)
    assert "missing: encoder.layers.1.mlp.fc2.weight" in str(err.value)
    assert "unexpected: encoder.layers.9.mlp.fc2.weight" in str(err.value)

    state = load_file(fixed_dir / "model.safetensors")
    state["post_layernorm.weight"] = torch.zeros(7)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"post_layernorm.weight .* shape \(7,\)"):
        SigLIP2Encoder.from_pretrained(tmp_path)


def test_folder_errors(fixed_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        SigLIP2Encoder.from_pretrained(tmp_path)
    shutil.copy(fixed_dir / "config.json", tmp_path)
    with pytest.raises(
        CheckpointError, match=r"has no weight file \(none of model.safetensors, model.safetensors.index.json"
    ):
        SigLIP2Encoder.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder"):
        SigLIP2Encoder.from_pretrained(fixed_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="is not a folder"):
        SigLIP2Encoder.from_pretrained("./no/such/folder")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(CheckpointError, match="model_type='clip_vision_model'"):
        SigLIP2Encoder.from_pretrained(tmp_path)


def test_unreachable_hub_fails_fast_with_a_pointer_to_local_folders(monkeypatch, tmp_path):
    # An endpoint that can never resolve (RFC 2606), so the test means the same on machines with network access.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example.invalid")
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"local folder.*from_pretrained\('/path/to/siglip2-base-patch16-224'\)"):
        SigLIP2Encoder.from_pretrained("google/siglip2-base-patch16-224", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="offline mode"):
        SigLIP2Encoder.from_pretrained("google/siglip2-base-patch16-224", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(CheckpointError, match="local folder"):
        ImageProcessor.from_pretrained("google/siglip2-base-patch16-224", cache_dir=tmp_path, local_files_only=True)
    assert time.monotonic() - started < 15, "must not hang on retries"


def test_hub_cache_is_used_without_network(fixed_dir, tmp_path):
    """A checkpoint in the Hub cache loads by its id with no network (as after an earlier download)."""
    repo = "google/siglip2-tiny-test"
    snapshot = tmp_path / "models--google--siglip2-tiny-test" / "snapshots" / ("0" * 40)
    shutil.copytree(fixed_dir, snapshot)
    (tmp_path / "models--google--siglip2-tiny-test" / "refs").mkdir()
    (tmp_path / "models--google--siglip2-tiny-test" / "refs" / "main").write_text("0" * 40)
    model = SigLIP2Encoder.from_pretrained(repo, cache_dir=tmp_path)
    assert same_weights(model, SigLIP2Encoder.from_pretrained(fixed_dir))


def test_config_conversion_round_trips_and_defaults():
    for hf in (
        {
            "model_type": "siglip_vision_model",
            "image_size": 384,
            "patch_size": 14,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
        },
        {"model_type": "siglip2_vision_model", "num_patches": 256, "patch_size": 16, "vision_use_head": False},
    ):
        config = config_from_hf(hf)
        assert config_from_hf(config_to_hf(config)) == config
    # Image-text configs: the vision tower comes from vision_config; missing fields take transformers' defaults.
    config = config_from_hf({"model_type": "siglip", "vision_config": {"image_size": 256}})
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.naflex) == (768, 12, 256, False)
    assert config_from_hf({"model_type": "siglip2", "vision_config": {}}).num_patches == 256
