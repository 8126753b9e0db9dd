"""The VLM exports through llama.cpp's own converter (``convert_hf_to_gguf.py`` from the llama-cpp-python sdist, which
README's test command fetches into .venv/llama.cpp): the Idefics3 export converts to a text GGUF and an mmproj GGUF,
the LLaVA export to a text GGUF, each holding our weights under llama.cpp's names (read back with llama.cpp's own
gguf-py); the LLaVA export's SigLIP mmproj is refused by the converter, as docs/vlm.md says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_idefics3_export import make_idefics3_vlm
from test_llava import WORDS, make_vlm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from siglip2_encoder.integrations.idefics3_export import export_idefics3
from siglip2_encoder.integrations.llava_export import export_llava

LLAMA_CPP = Path(__file__).resolve().parents[1] / ".venv" / "llama.cpp"


@pytest.fixture(scope="module")
def gguf_reader():
    """llama.cpp's GGUFReader, from the same tree as the converter."""
    assert (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(), "README's test command fetches llama.cpp's converter"
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(LLAMA_CPP / "gguf-py"))
    return GGUFReader


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer (BPE with byte fallback, the 256 byte tokens), trained offline on the tests' words:
    llama.cpp's converter reads its vocabulary (a word-level one it cannot)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    backend.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(special_tokens=special, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def convert(folder: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """llama.cpp's converter on ``folder``, weights kept in fp32 so they compare exactly."""
    command = [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out)]
    return subprocess.run(
        [*command, "--outtype", "f32", *options], capture_output=True, text=True, timeout=300, check=False
    )


def tensors(reader) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")}


def check_text_gguf(reader, model, tokenizer) -> None:
    """The LM's weights (those llama.cpp stores unpermuted), its vocabulary and the chat template."""
    lm = model.language_model
    got, meta = tensors(reader), fields(reader)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["llama.vocab_size"] == len(tokenizer) == lm.get_input_embeddings().num_embeddings
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[model.image_token_id] == "<image>" and tokens[tokenizer.pad_token_id] == "<pad>"
    assert meta["tokenizer.chat_template"].startswith("{{- bos_token or '' -}}")
    layer = lm.model.layers[1]
    for name, want in [
        ("token_embd.weight", lm.model.embed_tokens.weight),
        ("output.weight", lm.lm_head.weight),
        ("blk.1.attn_v.weight", layer.self_attn.v_proj.weight),
        ("blk.1.ffn_down.weight", layer.mlp.down_proj.weight),
        ("output_norm.weight", lm.model.norm.weight),
    ]:
        torch.testing.assert_close(got[name], want.detach(), atol=0, rtol=0, msg=name)


def test_an_idefics3_export_converts_with_llama_cpp(gguf_reader, tmp_path):
    model, _, tokenizer = make_idefics3_vlm(llama_tokenizer())
    export_idefics3(model, tmp_path / "hf", tokenizer)
    for options, out in [((), "text.gguf"), (("--mmproj",), "mmproj.gguf")]:
        result = convert(tmp_path / "hf", tmp_path / out, *options)
        assert result.returncode == 0, result.stderr[-2000:]
    text = gguf_reader(tmp_path / "text.gguf")
    check_text_gguf(text, model, tokenizer)
    tokens = text.fields["tokenizer.ggml.tokens"].contents()
    for token in ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>"):
        assert tokens[tokenizer.convert_tokens_to_ids(token)] == token  # what llama.cpp's Idefics3 path looks up

    reader = gguf_reader(tmp_path / "mmproj.gguf")
    got, meta = tensors(reader), fields(reader)
    tower = model.tower
    assert meta["clip.projector_type"] == "idefics3" and meta["clip.vision.projector.scale_factor"] == 2
    shape = ("clip.vision.image_size", "clip.vision.patch_size", "clip.vision.block_count")
    assert [meta[key] for key in shape] == [32, 8, 3]
    assert meta["clip.vision.image_mean"] == [0.5, 0.5, 0.5] and meta["clip.use_gelu"]
    layer = tower.encoder.layers[2]
    for name, want in [
        ("v.patch_embd.weight", tower.embeddings.patch_embedding.weight),
        ("v.position_embd.weight", tower.embeddings.position_embedding.weight),
        ("v.blk.2.attn_q.weight", layer.self_attn.q_proj.weight),
        ("v.blk.2.ffn_up.weight", layer.mlp.fc1.weight),
        ("v.post_ln.weight", tower.post_layernorm.weight),
        ("mm.model.fc.weight", model.projector.proj[0].weight),
    ]:
        torch.testing.assert_close(got[name], want.detach(), atol=0, rtol=0, msg=name)
    assert not any(name.startswith("blk.") for name in got)  # the LM stays in the text GGUF


def test_a_llava_export_converts_its_language_model_and_not_its_siglip_mmproj(gguf_reader, tmp_path):
    model, _, tokenizer = make_vlm(tokenizer=llama_tokenizer())
    export_llava(model, tmp_path / "hf", tokenizer)
    result = convert(tmp_path / "hf", tmp_path / "text.gguf")
    assert result.returncode == 0, result.stderr[-2000:]
    check_text_gguf(gguf_reader(tmp_path / "text.gguf"), model, tokenizer)
    # llama.cpp maps transformers' LLaVA vision towers of Pixtral only (docs/vlm.md: why no mmproj is written here)
    result = convert(tmp_path / "hf", tmp_path / "mmproj.gguf", "--mmproj")
    assert result.returncode != 0 and "Unsupported model type: siglip_vision_model" in result.stderr
