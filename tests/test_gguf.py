"""The VLM exports through llama.cpp's own converter (``convert_hf_to_gguf.py`` from the llama-cpp-python sdist, which
README's test command puts into .venv/llama.cpp): the Idefics3 export converts to a text GGUF and an mmproj GGUF,
the LLaVA export to a text GGUF, the LFM2-VL export to both, each holding our weights under llama.cpp's names (read
back with llama.cpp's own gguf-py); the LLaVA export's SigLIP mmproj is refused by the converter, as docs/vlm.md
says.

Then llama.cpp runs them: llama-cpp-python, built from the same sdist by README's test command, binds llama.cpp's
libllama (the text GGUF's logits) and libmtmd (its multimodal library: the image's views, the text between them and
each view's features from the mmproj GGUF), the code llama.cpp's own ``llama-mtmd-cli`` and server run; and the two
programs themselves, built from the same tree, answer as users run them."""

from __future__ import annotations

import base64
import codecs
import contextlib
import ctypes
import dataclasses
import io
import logging
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port, wait_until_ready
from PIL import Image
from test_idefics3_export import make_idefics3_vlm
from test_llava import WORDS, images, make_vlm
from test_splitting import split_vlm as splitting_vlm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from siglip2_encoder.integrations.idefics3_export import export_idefics3, llama_cpp_differences
from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor
from siglip2_encoder.integrations.llava_export import export_llava

LLAMA_CPP = Path(__file__).resolve().parents[1] / ".venv" / "llama.cpp"
MTMD_CLI = LLAMA_CPP / "bin" / "llama-mtmd-cli"
SERVER = LLAMA_CPP / "bin" / "llama-server"


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


def llama_tokenizer(newlines: bool = False) -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer (BPE with byte fallback, the 256 byte tokens), trained offline on the tests' words:
    llama.cpp's converter reads its vocabulary (a word-level one it cannot). With ``newlines``, ``"\\n"`` and
    ``"\\n\\n"`` are entries of their own, before the byte tokens, as in vocabularies with newline tokens (byte-level
    BPE ones; llama.cpp's Idefics3 path is written for SmolVLM's)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>", *(["\n", "\n\n"] if newlines else []), *(f"<0x{i:02X}>" for i in range(256))]
    backend.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(special_tokens=special, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def convert(folder: Path, out: Path, *options: str, outtype: str = "f32") -> subprocess.CompletedProcess:
    """llama.cpp's converter on ``folder``, weights kept in fp32 (so that they compare exactly) unless ``outtype``
    says otherwise (the converter's own default is f16)."""
    command = [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out)]
    return subprocess.run(
        [*command, "--outtype", outtype, *options], capture_output=True, text=True, timeout=300, check=False
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


# ----------------------------------------------------------------------------------------------- llama.cpp runs them


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python's bindings of libllama and libmtmd (README's test command builds them)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    llama_cpp.llama_backend_init()
    return llama_cpp, mtmd_cpp


def split_vlm(resample: str, tokenizer=None) -> tuple[VisionLanguageModel, VLMProcessor, PreTrainedTokenizerFast]:
    """test_splitting's VLM built for Idefics3 as SmolVLM is (32 px tiles of images resized to a longest edge of 96
    px, a global view), with ``resample`` resizing and a Llama-style tokenizer, which the converter reads."""
    model, processor, tokenizer = splitting_vlm(96, tokenizer or llama_tokenizer(), resample)
    return model.eval(), processor, tokenizer


def export_and_convert(model, tokenizer, folder: Path, outtype: str = "f32") -> tuple[Path, Path]:
    """The Idefics3 export converted by llama.cpp: (text GGUF, mmproj GGUF)."""
    export_idefics3(model, folder / "hf", tokenizer)
    for options, out in [((), "text.gguf"), (("--mmproj",), "mmproj.gguf")]:
        result = convert(folder / "hf", folder / out, *options, outtype=outtype)
        assert result.returncode == 0, result.stderr[-2000:]
    return folder / "text.gguf", folder / "mmproj.gguf"


@dataclasses.dataclass
class LlamaCpp:
    """llama.cpp on the two GGUFs, on the CPU: the bindings, libmtmd's context, the LM's context (fp32 KV cache)."""

    lib: Any
    mtmd: Any
    context: Any
    lm_context: Any
    width: int
    vocab: int


@contextlib.contextmanager
def load_llama_cpp(llama_cpp, text: Path, mmproj: Path, n_ctx: int = 256):
    lib, mtmd = llama_cpp
    lm = lib.llama_model_load_from_file(str(text).encode(), lib.llama_model_default_params())
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup = False, 2, False
    context = mtmd.mtmd_init_from_file(str(mmproj).encode(), lm, params)
    lm_params = lib.llama_context_default_params()
    lm_params.n_ctx = lm_params.n_batch = n_ctx
    lm_params.type_k = lm_params.type_v = lib.GGML_TYPE_F32  # llama.cpp's default, f16, rounds keys and values
    lm_params.n_threads = lm_params.n_threads_batch = 2
    lm_context = lib.llama_init_from_model(lm, lm_params)
    assert lm and context and lm_context, "llama.cpp could not load the GGUFs"
    vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(lm))
    try:
        yield LlamaCpp(lib, mtmd, context, lm_context, lib.llama_model_n_embd(lm), vocab)
    finally:
        lib.llama_free(lm_context)
        mtmd.mtmd_free(context)
        lib.llama_model_free(lm)


@contextlib.contextmanager
def mtmd_chunks(run: LlamaCpp, image: np.ndarray, prompt: str = "", add_special: bool = False):
    """libmtmd's prompt for ``prompt`` with one (H, W, 3) uint8 image before it: its chunks (text or image), as
    (is_image, chunk) in prompt order, and the chunk list."""
    mtmd = run.mtmd
    height, wide, _ = image.shape
    bitmap = mtmd.mtmd_bitmap_init(wide, height, (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes()))
    chunks = mtmd.mtmd_input_chunks_init()
    full = mtmd.mtmd_default_marker() + prompt.encode()
    text = mtmd.mtmd_input_text(text=full, text_len=len(full), add_special=add_special, parse_special=True)
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    try:
        assert mtmd.mtmd_tokenize(run.context, chunks, ctypes.byref(text), bitmaps, 1) == 0
        parts = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            parts.append((mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE, chunk))
        yield parts, chunks
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


def text_ids(run: LlamaCpp, chunk) -> list[int]:
    """A text chunk's token ids (-1 where llama.cpp found no vocabulary entry)."""
    count = ctypes.c_size_t()
    ids = run.mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
    return [ids[j] for j in range(count.value)]


def mtmd_views(run: LlamaCpp, image: np.ndarray) -> tuple[list[np.ndarray], list[list[int]]]:
    """libmtmd on one image: each view's features (tokens, D_lm) in prompt order, and the text chunks' ids."""
    views, texts = [], []
    with mtmd_chunks(run, image) as (parts, _):
        for is_image, chunk in parts:
            if not is_image:
                texts.append(text_ids(run, chunk))
                continue
            assert run.mtmd.mtmd_encode_chunk(run.context, chunk) == 0
            n = run.mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            out = np.ctypeslib.as_array(run.mtmd.mtmd_get_output_embd(run.context), shape=(n * run.width,))
            views.append(out.reshape(n, run.width).copy())
    return views, texts


def mtmd_generate(
    run: LlamaCpp, image: np.ndarray, prompt: str, image_token_id: int, steps: int
) -> tuple[list[int], np.ndarray, list[int]]:
    """llama.cpp's run of an image then ``prompt`` (BOS first), as llama-mtmd-cli runs it: the prompt's ids (with
    ``image_token_id`` for each image embedding), the logits after it, and ``steps`` greedy tokens."""
    lib = run.lib
    lib.llama_memory_clear(lib.llama_get_memory(run.lm_context), True)

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(run.lm_context, -1), shape=(run.vocab,)).copy()

    with mtmd_chunks(run, image, prompt, add_special=True) as (parts, chunks):
        ids = []
        for is_image, chunk in parts:
            count = run.mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            ids += [image_token_id] * count if is_image else text_ids(run, chunk)
        end = ctypes.byref(lib.llama_pos(0))
        batch = lib.llama_n_batch(run.lm_context)
        assert run.mtmd.mtmd_helper_eval_chunks(run.context, run.lm_context, chunks, 0, 0, batch, True, end) == 0
    first = logits()
    generated = [int(first.argmax())]
    for _ in range(steps - 1):
        assert lib.llama_decode(run.lm_context, lib.llama_batch_get_one((lib.llama_token * 1)(generated[-1]), 1)) == 0
        generated.append(int(logits().argmax()))
    return ids, first, generated


def our_views(model, processor, image: np.ndarray) -> tuple[torch.Tensor, list[int]]:
    """Our features per view (views, tokens, D_lm) and our prompt's ids for ``image`` alone."""
    batch = processor(["<image>"], [[image]])
    with torch.no_grad():
        features = model.image_features(batch["pixel_values"])
    return features.view(len(batch["pixel_values"]), -1, features.shape[-1]), batch["input_ids"][0].tolist()


def test_llama_cpp_runs_a_split_idefics3_export_with_our_views_and_features(llama_cpp, tmp_path):
    """libmtmd on the export of a model with splitting and Lanczos resizing: as many views as ours, in our order
    (tiles row by row, the global view last), with our row / column tags, each view's features ours within 3e-2
    (values up to ~3; measured 1.9e-2: llama.cpp's Lanczos is Pillow's, ours transformers' (torchvision's), 1-2
    levels apart on these random pixels) and within 5e-3 where the tiles are cut without resizing (measured 2.3e-3:
    ggml's kernels)."""
    model, processor, tokenizer = split_vlm("lanczos")
    text, mmproj = export_and_convert(model, tokenizer, tmp_path)
    tags = set(tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"]))
    tags |= set(tokenizer.convert_tokens_to_ids(model.splitting.row_col_tokens()))
    with load_llama_cpp(llama_cpp, text, mmproj) as run:
        for size in [(96, 96), (40, 150), (170, 45), (300, 200), (20, 20)]:
            image = images(1, 9, sizes=[size])[0]
            views, texts = mtmd_views(run, image)
            ours, ids = our_views(model, processor, image)
            assert len(views) == len(ours) > 1, size
            assert [i for chunk in texts for i in chunk if i in tags] == [i for i in ids if i in tags], size
            for i, (theirs, want) in enumerate(zip(views, ours)):
                unresized = size == (96, 96) and i < len(ours) - 1
                np.testing.assert_allclose(theirs, want, atol=5e-3 if unresized else 3e-2, rtol=0, err_msg=f"{size}")
    # This Llama-2-style vocabulary has no "\n\n" entry: llama.cpp writes an invalid id before the global view,
    # which is what llama_cpp_differences warns of (a SmolVLM tokenizer has both entries).
    assert texts[-2][0] == -1
    (difference,) = llama_cpp_differences(model, tokenizer)
    assert "the tokenizer does not write '\\n' or '\\n\\n' as the one token llama.cpp puts there" in difference


def test_llama_cpp_resizes_with_lanczos_whatever_the_processor_says_and_the_export_warns(llama_cpp, tmp_path, caplog):
    """A tower resizing bilinearly: llama.cpp's views get other pixels (features off by far more than the Lanczos
    model's 3e-2; measured 0.5 to 2.4), which the export logs; a model without splitting is warned of too
    (llama.cpp always splits)."""
    model, processor, tokenizer = split_vlm("bilinear")
    with caplog.at_level(logging.WARNING, logger="siglip2_encoder.integrations.idefics3_export"):
        text, mmproj = export_and_convert(model, tokenizer, tmp_path)
    assert "llama.cpp would run this export otherwise than transformers: the tower's processor resizes with " in (
        caplog.text
    )
    image = images(1, 9, sizes=[(40, 150)])[0]
    with load_llama_cpp(llama_cpp, text, mmproj) as run:
        views, _ = mtmd_views(run, image)
    ours, _ = our_views(model, processor, image)
    assert len(views) == len(ours) and max(np.abs(v - o.numpy()).max() for v, o in zip(views, ours)) > 0.2
    unsplit, _, tokenizer = make_idefics3_vlm(llama_tokenizer())
    assert any("llama.cpp always splits it" in d for d in llama_cpp_differences(unsplit, tokenizer))


@pytest.mark.parametrize(("newlines", "outtype"), [("first", "f32"), ("first", "f16"), ("added", "f32")])
def test_where_llama_cpp_differences_is_empty_llama_cpp_runs_our_whole_prompt(llama_cpp, tmp_path, newlines, outtype):
    """libmtmd + libllama on an image then text, as llama-mtmd-cli runs them. With "\\n" and "\\n\\n" as the first
    vocabulary entries reading so (as byte-level BPE vocabularies have them), llama_cpp_differences is empty, and on one
    row of tiles, several rows, several rows and columns llama.cpp's prompt is ours id for id, its logits after it ours
    within 5e-3 (measured 2e-3: the views' features; 2.4e-3 from the converter's default f16 GGUFs) and its 6 greedy
    tokens ours. With those entries added after the byte tokens, llama.cpp writes a row's "\\n" as the byte token
    "<0x0A>": the function names it, and a prompt with several rows of tiles holds other ids than ours."""
    tokenizer = llama_tokenizer(newlines=newlines == "first")
    if newlines == "added":
        tokenizer.add_tokens(["\n", "\n\n"])
    model, processor, tokenizer = split_vlm("lanczos", tokenizer)
    differences = llama_cpp_differences(model, tokenizer)
    text, mmproj = export_and_convert(model, tokenizer, tmp_path, outtype)
    prompt = " what colour is the shape"
    with load_llama_cpp(llama_cpp, text, mmproj) as run:
        for size in [(40, 150), (170, 45), (300, 200)]:
            image = images(1, 9, sizes=[size])[0]
            ids, logits, generated = mtmd_generate(run, image, prompt, model.image_token_id, steps=6)
            batch = processor([f"<image>{prompt}"], [[image]])
            if differences:
                assert (ids == batch["input_ids"][0].tolist()) == (size == (40, 150)), size  # one row: no "\\n"
                continue
            assert ids == batch["input_ids"][0].tolist(), size
            with torch.no_grad():
                ours = model(**batch).logits[0, -1].numpy()
            np.testing.assert_allclose(logits, ours, atol=5e-3, rtol=0, err_msg=f"{size}")
            assert generated == model.generate(**batch, max_new_tokens=6, do_sample=False)[0].tolist(), size
    if newlines == "added":
        (difference,) = differences
        assert difference.startswith("the tokenizer does not write '\\n' as the one token llama.cpp puts there")
    else:
        assert differences == []


def test_llama_cpp_differences_names_unnormalised_pixels():
    """llama.cpp maps pixels to [0, 1] and normalises whatever the processor says."""
    model, _, _ = split_vlm("lanczos")
    model.tower.processor_config = dataclasses.replace(model.tower.processor_config, do_normalize=False)
    (difference,) = llama_cpp_differences(model)
    assert difference.startswith("the tower's processor has do_rescale=True, rescale_factor=0.00392156862745098, ")
    assert "do_normalize=False, and llama.cpp always divides pixels by 255 and normalises them" in difference


def test_llama_cpp_differences_names_a_grid_where_idefics3s_buckets_skip_cells():
    """llama.cpp's Idefics3 path adds the position table as it is; Idefics3's buckets at a 38x38 grid do not."""
    from siglip2_encoder import SigLIP2Encoder

    model, _, _ = split_vlm("lanczos")
    tower = SigLIP2Encoder(model.tower.config.replace(image_size=8 * 38, position_lookup="buckets"))
    tower.processor_config = model.tower.processor_config
    model.vision_tower = tower
    assert llama_cpp_differences(model) == [
        "llama.cpp reads the position table cell by cell at the tower's native 38x38 grid, where Idefics3's bucketed "
        "lookup reads a neighbour's cell for some patches at this grid: its features differ"
    ]


def test_llama_cpp_runs_the_text_gguf_with_our_language_models_logits(llama_cpp, tmp_path):
    """libllama on the text GGUF of the Idefics3 export: the logits of our language model on the same ids (fp32
    GGUF and KV cache; 1e-5, measured 5e-7)."""
    model, _, tokenizer = make_idefics3_vlm(llama_tokenizer())
    text, _ = export_and_convert(model, tokenizer, tmp_path)
    ids = tokenizer("what colour is the shape")["input_ids"]
    from llama_cpp import Llama

    f32 = llama_cpp[0].GGML_TYPE_F32  # the KV cache in fp32 (llama.cpp's default, f16, rounds keys and values)
    llm = Llama(model_path=str(text), n_ctx=32, logits_all=True, n_threads=2, type_k=f32, type_v=f32, verbose=False)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ours = model.language_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ llama.cpp's programs, as users run them


NO_GDB = {"GGML_NO_BACKTRACE": "1"}  # on an abort ggml would attach gdb to print the backtrace


def converse(command: list[str], lines: list[str], timeout: float = 120) -> list[bytes]:
    """``llama-mtmd-cli`` in its chat mode: each of ``lines`` typed once the program asks for one (``"\\n> "``); what
    it wrote before each question, the last after the last line. (Its single-turn mode, ``-p`` with ``--image``,
    exits without waiting for its logging thread, which writes the answer: with stdout a pipe, 6 of 8 runs here lost
    some or all of it. In chat mode it waits for the next line with everything written.)"""
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ | NO_GDB
    )
    deadline, replies, out = time.monotonic() + timeout, [], b""
    try:
        for line in [*lines, None]:
            while not out.endswith(b"\n> "):
                if not select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise AssertionError(f"llama-mtmd-cli asked nothing within {timeout} s after {out!r}")
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"llama-mtmd-cli exited with {process.wait()} after {out!r}")
                out += chunk
            replies.append(out)
            out = b""
            if line is not None:
                process.stdin.write(line.encode() + b"\n")
                process.stdin.flush()
    finally:
        process.stdin.close()  # end of input: the program leaves its chat loop
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    return replies


def printed(tokenizer, ids: list[int]) -> bytes:
    """What llama.cpp prints for ``ids`` of the tests' Llama-style vocabulary: a byte token's byte, any other token's
    text with its "▁" as a space (transformers' ``decode`` writes U+FFFD for a byte that is not UTF-8 on its own)."""
    pieces = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", token)
        pieces.append(bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode())
    return b"".join(pieces)


@pytest.fixture(scope="module")
def f16_export(tmp_path_factory) -> tuple[VisionLanguageModel, VLMProcessor, PreTrainedTokenizerFast, Path, Path]:
    """A model for which llama_cpp_differences is empty, its processor and tokenizer, and its export converted to
    GGUFs as the converter does by default (f16): (..., text GGUF, mmproj GGUF)."""
    model, processor, tokenizer = split_vlm("lanczos", llama_tokenizer(newlines=True))
    assert llama_cpp_differences(model, tokenizer) == []
    text, mmproj = export_and_convert(model, tokenizer, tmp_path_factory.mktemp("f16"), outtype="f16")
    return model, processor, tokenizer, text, mmproj


def test_llama_mtmd_cli_answers_with_our_greedy_tokens(f16_export, tmp_path):
    """llama.cpp's own program on the converter's default (f16) GGUFs of a model for which llama_cpp_differences is
    empty, with its defaults (f16 KV cache) but greedy and 6 tokens, as a user runs it: ``llama-mtmd-cli -m text.gguf
    --mmproj mmproj.gguf --jinja``, then ``/image <file>`` and a question. On one row of tiles, several rows, and rows
    and columns its answer is our model's ``generate`` on ``<image>`` + the question, byte for byte: the exported chat
    template rendered by llama.cpp's Jinja engine, its image marker and its BOS give our prompt."""
    model, processor, tokenizer, text, mmproj = f16_export
    command = [str(MTMD_CLI), "-m", str(text), "--mmproj", str(mmproj), "--jinja", "--temp", "0", "-n", "6", "-t", "2"]
    question = "what colour is the shape"
    for size in [(40, 150), (170, 45), (300, 200)]:
        image = images(1, 9, sizes=[size])[0]
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.fromarray(image).save(path)
        ours = model.generate(**processor([f"<image>{question}"], [[image]]), max_new_tokens=6, do_sample=False)
        *_, answer = converse(command, [f"/image {path}", question])
        assert answer == f"{question}\n\n".encode() + printed(tokenizer, ours[0].tolist()) + b"\n> ", size  # echo first


def test_llama_mtmd_cli_needs_jinja_for_the_exported_chat_template(f16_export, tmp_path):
    """Without ``--jinja`` llama-mtmd-cli formats prompts with its built-in templates only, which do not include the
    export's (``<image> question``, the way VLMProcessor writes prompts): it stops, naming the flag."""
    *_, text, mmproj = f16_export
    path = tmp_path / "image.png"
    Image.fromarray(images(1, 9, sizes=[(40, 150)])[0]).save(path)
    command = [str(MTMD_CLI), "-m", str(text), "--mmproj", str(mmproj), "--image", str(path), "-p", "what colour"]
    result = subprocess.run(command, capture_output=True, timeout=120, check=False, env=os.environ | NO_GDB)
    assert result.returncode != 0
    assert b"this custom template is not supported, try using --jinja" in result.stderr


@contextlib.contextmanager
def llama_server(text: Path, mmproj: Path):
    """llama-server on the two GGUFs with its defaults (Jinja chat templates, f16 KV cache, prompt caching), on a free
    loopback port; its address once it is ready."""
    port = free_port()
    command = [str(SERVER), "-m", str(text), "--mmproj", str(mmproj), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "-t", "2", "-c", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | NO_GDB
    )
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{address}/health", server, lambda: server.stderr.read().decode()[-2000:])
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_llama_server_answers_openai_chat_requests_with_our_greedy_tokens(f16_export):
    """llama-server, llama.cpp's OpenAI-compatible server, on the converter's default (f16) GGUFs with its defaults:
    a chat completion of one user message, an image part then a text part (greedy, 6 tokens). The server puts the
    image's marker where the image part is and the text right after it, and renders the message with the exported
    template: the text " what colour is the shape" gives our prompt ``<image> what colour is the shape`` (what
    transformers' ``apply_chat_template`` writes for an image then "what colour is the shape"), "what colour is the
    shape" ours without the space. Its prompt has as many tokens as ours, its answer is our ``generate``'s, on one row
    of tiles, several rows, and rows and columns (as text: a byte that is not UTF-8 is U+FFFD, and the server leaves
    out a character the answer ends before finishing)."""
    model, processor, tokenizer, text, mmproj = f16_export
    cases = [((40, 150), " what colour is the shape"), ((170, 45), " what colour is the shape")]
    cases += [((300, 200), " what colour is the shape"), ((40, 150), "what colour is the shape")]
    with llama_server(text, mmproj) as address:
        for size, question in cases:
            image = images(1, 9, sizes=[size])[0]
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
            parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
            request = {"messages": [{"role": "user", "content": parts}], "temperature": 0, "max_tokens": 6}
            reply = httpx.post(f"{address}/v1/chat/completions", json=request, timeout=120).json()
            batch = processor([f"<image>{question}"], [[image]])
            ours = model.generate(**batch, max_new_tokens=6, do_sample=False)[0].tolist()
            assert reply["usage"]["prompt_tokens"] == batch["input_ids"].shape[1], (size, question)
            answer = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(printed(tokenizer, ours))
            assert reply["choices"][0]["message"]["content"] == answer, (size, question)


# ------------------------------------------------------------------------------------------------------ LFM2-VL


def lfm2_vl_gguf(folder: Path, **changes) -> tuple[VisionLanguageModel, VLMProcessor, Any, Path, Path]:
    """A VLM of LFM2-VL's geometry, as llama.cpp's LFM2-VL path takes it: 16 px patches, 16 x 16 positions,
    LFM2-VL's processor (64 to 256 tokens per view, bilinear) and splitting, its projector with the LayerNorm, a tied
    Llama LM and a Llama-style tokenizer; ``changes`` replace the tower processor's settings. Exported, then
    converted by llama.cpp: (model, processor, tokenizer, text GGUF, mmproj GGUF)."""
    from conftest import perturb
    from test_llava import LM, TOWER
    from transformers import LlamaConfig, LlamaForCausalLM

    from siglip2_encoder import SigLIP2Encoder, get_recipe
    from siglip2_encoder.adapters import build_projector
    from siglip2_encoder.integrations.lfm2_splitting import Lfm2VlSplitting
    from siglip2_encoder.integrations.lfm2_vl_export import add_lfm2_vl_tokens, export_lfm2_vl

    torch.manual_seed(0)
    tokenizer = llama_tokenizer()
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **TOWER, image_size=None, num_patches=256)
    tower.processor_config = tower.processor_config.replace(
        naflex_resize="smart", min_num_patches=256, max_num_patches=1024, grid_multiple=2, resample="bilinear",
        **changes,
    )  # fmt: skip
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LM, tie_word_embeddings=True))
    splitting = Lfm2VlSplitting()
    image_token_id = add_lfm2_vl_tokens(tokenizer, lm, splitting)
    projector = build_projector(get_recipe("lfm2_vl").projector_config(32, LM["hidden_size"], norm=True))
    model = VisionLanguageModel(tower, projector, lm.eval(), image_token_id, splitting=splitting)
    model = perturb(model, seed=3).eval()
    export_lfm2_vl(model, folder / "hf", tokenizer)
    for options, out in [((), "text.gguf"), (("--mmproj",), "mmproj.gguf")]:
        result = convert(folder / "hf", folder / out, *options)
        assert result.returncode == 0, result.stderr[-2000:]
    processor = VLMProcessor.for_model(model, tokenizer)
    return model, processor, tokenizer, folder / "text.gguf", folder / "mmproj.gguf"


def our_naflex_views(model, processor, image: np.ndarray) -> tuple[list[torch.Tensor], list[int]]:
    """Our features per view (each (tokens, D_lm)) and our prompt's ids for ``image`` alone, for a NaFlex model."""
    batch = processor(["<image>"], [[image]])
    with torch.no_grad():
        features = model.image_features(batch["pixel_values"], batch["spatial_shapes"], batch["pixel_attention_mask"])
    counts = [model.projector.num_tokens((h, w)) for h, w in batch["spatial_shapes"].tolist()]
    return list(features.split(counts)), batch["input_ids"][0].tolist()


def test_an_lfm2_vl_export_converts_with_llama_cpp(gguf_reader, tmp_path):
    """llama.cpp's converter takes the LFM2-VL export of a model it runs as LFM2-VL's own (llama_cpp_differences
    names nothing): the text GGUF holds LFM2-VL's tokens at our ids, the mmproj GGUF the tower's and the projector's
    weights (its LayerNorm too) and the unshuffle factor."""
    from siglip2_encoder.integrations.lfm2_splitting import IMAGE_END, IMAGE_START, THUMBNAIL_TOKEN
    from siglip2_encoder.integrations.lfm2_vl_export import llama_cpp_differences

    model, _, tokenizer, text, mmproj = lfm2_vl_gguf(tmp_path)
    assert llama_cpp_differences(model) == []
    tokens = gguf_reader(text).fields["tokenizer.ggml.tokens"].contents()
    for token in ("<image>", IMAGE_START, IMAGE_END, THUMBNAIL_TOKEN, "<|img_row_2_col_3|>"):
        assert tokens[tokenizer.convert_tokens_to_ids(token)] == token  # what llama.cpp's LFM2-VL path looks up
    reader = gguf_reader(mmproj)
    got, meta = tensors(reader), fields(reader)
    assert meta["clip.projector_type"] == "lfm2" and meta["clip.vision.projector.scale_factor"] == 2
    tower, projector = model.tower, model.projector
    first, second = (m for m in projector.proj if isinstance(m, torch.nn.Linear))
    patches = tower.embeddings.patch_embedding.weight.detach().view(-1, 16, 16, 3).permute(0, 3, 1, 2)
    for name, want in [
        ("v.patch_embd.weight", patches),
        ("v.position_embd.weight", tower.embeddings.position_embedding.weight),
        ("mm.input_norm.weight", projector.norm.weight),
        ("mm.1.weight", first.weight),
        ("mm.2.bias", second.bias),
    ]:
        torch.testing.assert_close(got[name], want.detach(), atol=0, rtol=0, msg=name)


def test_llama_cpp_runs_an_lfm2_vl_export_with_our_views_and_greedy_tokens(llama_cpp, tmp_path):
    """libmtmd on the export: for each image, as many views as ours, with our token counts and our tags (tiles row
    by row, the thumbnail last), and each view's features ours within 3e-2 (values up to ~2; measured 1e-3 where
    tiles are cut without resizing: ggml's kernels; up to 1.1e-2 where resized: llama.cpp's bilinear filter) where
    llama.cpp prepares our view: the tiles of an image whose aspect ratio is its grid's, and every thumbnail. A whole
    prompt on such an image gives our prompt ids, our logits (within 1e-2) and our greedy tokens. Where the aspect
    ratio is not the grid's, llama.cpp pads the image to the grid's where transformers stretches it, so its tiles
    differ (by about the features' own size); and it rounds a size halfway between two grid steps up (300 x 400:
    9 x 13 tokens; transformers 9 x 12)."""
    from siglip2_encoder.integrations.lfm2_splitting import IMAGE_END, IMAGE_START

    model, processor, tokenizer, text, mmproj = lfm2_vl_gguf(tmp_path)
    tags = set(tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END, *model.splitting.row_col_tokens()]))
    with load_llama_cpp(llama_cpp, text, mmproj, n_ctx=2048) as run:
        for size, grid, same in [
            ((1024, 1024), (2, 2), True),  # tiles cut without resizing
            ((1500, 600), (5, 2), True),  # resized to 2560 x 1024: the same aspect ratio
            ((40, 60), (0, 0), True),  # one view
            ((700, 1000), (2, 3), False),  # padded by llama.cpp, stretched by transformers
        ]:
            image = images(1, 9, sizes=[size])[0]
            views, texts = mtmd_views(run, image)
            ours, ids = our_naflex_views(model, processor, image)
            assert model.splitting.grid(*size, model.tower.processor_config) == grid
            assert [len(v) for v in views] == [len(o) for o in ours], size
            assert [i for chunk in texts for i in chunk if i in tags] == [i for i in ids if i in tags], size
            tiles = len(ours) - 1 if grid[0] else 0
            for i, (theirs, want) in enumerate(zip(views, ours, strict=True)):
                gap = np.abs(theirs - want.numpy()).max()
                assert gap < 3e-2 if same or i == tiles else gap > 0.5, (size, i, gap)
        ours, _ = our_naflex_views(model, processor, images(1, 9, sizes=[(300, 400)])[0])
        views, _ = mtmd_views(run, images(1, 9, sizes=[(300, 400)])[0])
        assert (len(ours[0]), len(views[0])) == (9 * 12, 9 * 13)

        image = images(1, 9, sizes=[(1024, 1024)])[0]
        prompt = " what colour is the shape"
        theirs_ids, logits, generated = mtmd_generate(run, image, prompt, model.image_token_id, steps=4)
    batch = processor([f"<image>{prompt}"], [[image]])
    assert theirs_ids == batch["input_ids"][0].tolist()
    with torch.no_grad():
        want = model(**batch).logits[0, -1]
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-2, rtol=0)  # measured 2.9e-3
    assert generated == model.generate(**batch, max_new_tokens=4, do_sample=False)[0].tolist()


def test_lfm2_vl_llama_cpp_differences_name_what_llama_cpp_does_otherwise():
    """What the LFM2-VL export warns of, for a model llama.cpp would run otherwise than transformers: its processor's
    settings other than LFM2-VL's, patches other than 16 px, no splitting or other splitting settings, and an LM
    whose output layer is its own."""
    from test_lfm2_vl_export import lfm2_vl_model

    from siglip2_encoder.integrations.lfm2_splitting import Lfm2VlSplitting
    from siglip2_encoder.integrations.lfm2_vl_export import llama_cpp_differences

    model, _, _ = lfm2_vl_model(splitting=Lfm2VlSplitting(tile=32, max_tiles=3))
    model.tower.processor_config = model.tower.processor_config.replace(resample="bicubic")
    differences = llama_cpp_differences(model)
    assert [d.split(",")[0] for d in differences] == [
        "the tower cuts 8 px patches",
        "the model splits with Lfm2VlSplitting(tile=32",
        "the tower's processor sizes views within 1 to 4 tokens of 2 x 2 patches",
        "the tower's processor resizes with 'bicubic'",
        "the language model has an output layer of its own (its embeddings are not tied)",
    ]
    model, _, _ = lfm2_vl_model()
    assert "the model sees each image as one view" in llama_cpp_differences(model)[1]
