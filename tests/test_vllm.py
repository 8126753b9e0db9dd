"""The LLaVA exports (LLaVA, LLaVA-OneVision, LLaVA-NeXT), the Idefics3 and the LFM2-VL exports in vLLM, the server
many users deploy VLMs with: its offline ``LLM.chat`` (the chat template, the processor and the model its OpenAI server
runs) on the exported folder, in vLLM's own environment (README's test command makes it: tests/install_vllm.sh, vLLM
0.32.0 built for CPUs), against our model on the same images and text. And a saved image-text model in vLLM's pooling
runner (``LLM.embed``) and its OpenAI server's ``/v1/embeddings``, against our features."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import perturb
from PIL import Image
from test_llava import TOWER, images, make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from siglip2_encoder import EncoderConfig, ImageProcessor, ProcessorConfig, SigLIP2Encoder, SigLIP2Model, TextConfig
from siglip2_encoder.adapters import LinearConfig, MLPConfig, build_projector
from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor, add_image_token
from siglip2_encoder.integrations.llava_export import export_llava

pytestmark = pytest.mark.slow  # each test starts vLLM: ~35 s

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "vllm" / "bin" / "python"
# vLLM's CPU attention takes head sizes of 32 and up: the LM's heads are 32 wide here (test_llava's are 12)
LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def run_in_vllm(script: str, request: dict, tmp_path: Path) -> Any:
    """``script`` (a file beside this one) run by vLLM's Python on ``request``; its result. A failed run fails the
    test, naming the errors vLLM logged."""
    assert VLLM_PYTHON.is_file(), "README's test command makes vLLM's environment (tests/install_vllm.sh)"
    (tmp_path / "request.json").write_text(json.dumps(request))
    command = [str(VLLM_PYTHON), str(Path(__file__).with_name(script))]
    command += [str(tmp_path / "request.json"), str(tmp_path / "result.json")]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}  # 1 GiB (its default takes 4)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
    output = (result.stdout + result.stderr).splitlines()  # vLLM logs to stdout, its engine's errors too
    errors = dict.fromkeys(line.strip() for line in output if "Error" in line)  # the causes, not the whole log
    assert result.returncode == 0, "\n".join(errors)
    return json.loads((tmp_path / "result.json").read_text())


def vllm_chat(
    folder: Path, conversations: list[tuple[Path, str]], tmp_path: Path, tokens: int, **options
) -> list[dict]:
    """vLLM's chat on ``folder`` (``options``: more of ``vllm.LLM``'s arguments): for each (image file, text), the
    prompt's ids and ``tokens`` greedy ids."""
    request = {"model": str(folder), "max_tokens": tokens, "options": options}
    request["conversations"] = [{"image": str(image), "text": text} for image, text in conversations]
    return run_in_vllm("vllm_chat.py", request, tmp_path)


def llava_vlm(projector: MLPConfig | LinearConfig) -> tuple[VisionLanguageModel, VLMProcessor, Any]:
    """A LLaVA-style model: a fixed-resolution SigLIP tower, ``projector``, a Llama LM; its processor and tokenizer."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **TOWER, patch_size=8, image_size=32)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LM, tie_word_embeddings=False))
    image_token_id = add_image_token(tokenizer, lm)
    model = perturb(VisionLanguageModel(tower, build_projector(projector), lm, image_token_id), seed=3)
    processor = VLMProcessor(tokenizer, ImageProcessor(tower.processor_config), model.projector, patch_size=8)
    return model, processor, tokenizer


def test_vllm_chats_with_a_llava_export_as_our_model_does(tmp_path):
    """A LLaVA-style model (SigLIP tower, 2-layer MLP projector on layer -2, Llama LM) exported with
    ``export_llava``: vLLM loads the folder as it is, and for an image then "what colour is the shape", on a
    non-square and a square image, its prompt is ours id for id (BOS, the image's tokens, the text) and its 6 greedy
    tokens are our ``generate``'s (fp32)."""
    model, processor, tokenizer = llava_vlm(MLPConfig(in_features=32, out_features=64, layers=(-2,)))
    export_llava(model, tmp_path / "export", tokenizer)

    conversations, ours = ask(model, processor, [(30, 50), (64, 64)], tmp_path)
    assert vllm_chat(tmp_path / "export", conversations, tmp_path, tokens=6) == ours


def test_vllm_chats_with_a_letterbox_llava_export_as_our_model_does(tmp_path):
    """The same with the tower's processor letterboxing (DeepSeek-VL's image processor in the export): vLLM's prompts
    and greedy tokens are ours on a wide and a tall image."""
    model, _, tokenizer = llava_vlm(MLPConfig(in_features=32, out_features=64, layers=(-2,)))
    model.tower.processor_config = model.tower.processor_config.replace(letterbox="deepseek_vl", letterbox_min_side=4)
    processor = VLMProcessor(tokenizer, ImageProcessor(model.tower.processor_config), model.projector, patch_size=8)
    export_llava(model, tmp_path / "export", tokenizer)

    conversations, ours = ask(model, processor, [(30, 50), (64, 20)], tmp_path)
    assert vllm_chat(tmp_path / "export", conversations, tmp_path, tokens=6) == ours


def ask(model, processor, sizes: list[tuple[int, int]], tmp_path: Path) -> tuple[list[tuple[Path, str]], list[dict]]:
    """An image of each size then "what colour is the shape": the conversations for vLLM (image files, text) and
    our model's prompt ids and 6 greedy tokens for each."""
    question, conversations, ours = "what colour is the shape", [], []
    for i, size in enumerate(sizes):
        image = images(1, 5 + i, sizes=[size])[0]
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        conversations.append((tmp_path / f"{i}.png", question))
        batch = processor([f"<image> {question}"], [[image]])
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[0].tolist()
        ours.append({"prompt": batch["input_ids"][0].tolist(), "generated": generated})
    return conversations, ours


def test_vllm_refuses_a_linear_projector_as_export_llava_warns(tmp_path):
    """vLLM's LLaVA takes the projector's activation from its own registry, which has no "linear": the export of a
    ``linear`` projector (which transformers runs) stops in vLLM, as export_llava's warning says."""
    model, _, tokenizer = llava_vlm(LinearConfig(in_features=32, out_features=64, layers=(-1,)))
    export_llava(model, tmp_path / "export", tokenizer)
    image = tmp_path / "image.png"
    Image.fromarray(images(1, 5)[0]).save(image)
    with pytest.raises(AssertionError, match="Activation function 'linear' is not supported"):
        vllm_chat(tmp_path / "export", [(image, "what colour is the shape")], tmp_path, tokens=1)


NO_VIDEO = {"limit_mm_per_prompt": {"video": 0}}  # what export_llava's warning tells OneVision users


def tiled_export(family: str, max_tiles: int | None, tmp_path: Path, caplog) -> tuple[VisionLanguageModel, Any]:
    """test_anyres's tiled model (32 px tiles, grids up to 6 x 6) with this file's LM, exported with export_llava."""
    from test_anyres import tiled_vlm_and_transformers

    model, processor, _, _ = tiled_vlm_and_transformers(family, max_tiles, tmp_path, lm_sizes=LM)
    perturb(model, seed=2)  # greedy tokens that differ between the images
    with caplog.at_level(logging.WARNING, logger="siglip2_encoder.integrations.llava_export"):
        export_llava(model, tmp_path / "export", processor.tokenizer)
    return model, processor


@pytest.mark.parametrize(("family", "max_tiles"), [("llava_onevision", 9), ("llava_next", None)])
def test_vllm_chats_with_tiled_exports_as_our_model_does(family, max_tiles, tmp_path, caplog):
    """LLaVA-OneVision (anyres_max_9) and LLaVA-NeXT exports: on a wide image (2 x 5 tiles, unpadded) and a square one,
    vLLM's prompt is ours id for id (the base view's, the tiles' and the row ends' tokens) and its 6 greedy tokens
    ours. OneVision runs with videos off, as the export's warning says."""
    model, processor = tiled_export(family, max_tiles, tmp_path, caplog)
    assert ("limit_mm_per_prompt={'video': 0}" in caplog.text) == (family == "llava_onevision")
    conversations, ours = ask(model, processor, [(50, 130), (64, 64)], tmp_path)
    assert vllm_chat(tmp_path / "export", conversations, tmp_path, tokens=6, **NO_VIDEO) == ours


def test_vllm_onevision_stops_at_start_up_without_videos_off(tmp_path, caplog):
    """vLLM's start-up measures a video prompt, for which the OneVision export has no token: as the export warns."""
    model, processor = tiled_export("llava_onevision", 9, tmp_path, caplog)
    conversations, _ = ask(model, processor, [(64, 64)], tmp_path)
    with pytest.raises(AssertionError, match="Mismatch in `video` token count"):
        vllm_chat(tmp_path / "export", conversations, tmp_path, tokens=1)


def test_vllm_reduces_onevision_tokens_as_anyres_max_9_as_the_export_warns(tmp_path, caplog):
    """With anyres_max_2, transformers and we reduce a 2 x 5 tile image's tokens to about 2 tiles' worth; vLLM reduces
    them as anyres_max_9 (not at all here), so its prompt is longer than ours, with no error."""
    model, processor = tiled_export("llava_onevision", 2, tmp_path, caplog)
    assert "reduces image tokens as anyres_max_9 whatever vision_aspect_ratio says: with anyres_max_2" in caplog.text
    conversations, ours = ask(model, processor, [(50, 130)], tmp_path)
    (theirs,) = vllm_chat(tmp_path / "export", conversations, tmp_path, tokens=1, **NO_VIDEO)
    assert len(theirs["prompt"]) > len(ours[0]["prompt"])


def test_vllm_chats_with_a_split_idefics3_export_as_our_model_does(tmp_path):
    """The Idefics3 export (SmolVLM-style: 32 px tiles of images resized to a longest edge of 96 px, then the global
    view; a pixel-shuffle connector; a Llama LM): vLLM's prompt is ours id for id (every tile's tokens and row / column
    tags) and its 6 greedy tokens ours, on a wide image (split) and a small one (one tile, upscaled)."""
    from siglip2_encoder import get_recipe
    from siglip2_encoder.integrations.idefics3_export import add_idefics3_tokens, export_idefics3
    from siglip2_encoder.integrations.splitting import ImageSplitting

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **TOWER, patch_size=8, image_size=32)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LM, tie_word_embeddings=False))
    splitting = ImageSplitting(32, 96)
    image_token_id = add_idefics3_tokens(tokenizer, lm, splitting)
    connector = build_projector(get_recipe("idefics3").projector_config(32, 64))
    model = perturb(VisionLanguageModel(tower, connector, lm, image_token_id, splitting=splitting), seed=3).eval()
    processor = VLMProcessor(tokenizer, ImageProcessor(tower.processor_config), connector, 8, splitting=splitting)
    export_idefics3(model, tmp_path / "export", tokenizer)

    conversations, ours = ask(model, processor, [(40, 150), (20, 20)], tmp_path)
    assert vllm_chat(tmp_path / "export", conversations, tmp_path, tokens=6) == ours


@pytest.mark.parametrize(("split", "lengths"), [(False, [11, 9, 10]), (True, [27, 9, 21])])
def test_vllm_runs_an_lfm2_vl_export_with_our_prompt(split, lengths, tmp_path):
    """The LFM2-VL export of a NaFlex VLM with an LFM2 language model (vLLM's LFM2-VL takes no other) starts in vLLM,
    and on a wide image, a tiny one and a large one its prompt is ours id for id (<|image_start|>, the image's
    tokens by LFM2-VL's sizing rule, <|image_end|>; with LFM2-VL's splitting, the wide and the large image as tiles,
    each after its <|img_row_r_col_c|>, and a thumbnail after <|img_thumbnail|>). Its tokens are not compared: vLLM
    0.32's LFM2 on the CPU gives other log-probabilities than transformers' on a plain LFM2 checkpoint already (no
    export involved; 0.1-0.3 apart on a tiny random one), where transformers' LFM2-VL gives ours
    (test_lfm2_vl_export)."""
    from test_lfm2_vl_export import lfm2_vl_model

    from siglip2_encoder.integrations.lfm2_splitting import Lfm2VlSplitting
    from siglip2_encoder.integrations.lfm2_vl_export import export_lfm2_vl

    splitting = Lfm2VlSplitting(tile=32, max_tiles=3) if split else None
    model, processor, tokenizer = lfm2_vl_model("lfm2", lm_sizes=LM, splitting=splitting)
    export_lfm2_vl(model, tmp_path / "export", tokenizer)
    conversations, ours = ask(model, processor, [(30, 90), (6, 9), (200, 150)], tmp_path)
    theirs = vllm_chat(tmp_path / "export", conversations, tmp_path, tokens=1)
    assert [t["prompt"] for t in theirs] == [o["prompt"] for o in ours]
    assert [len(o["prompt"]) for o in ours] == lengths  # unsplit: 3, 1 and 2 image tokens


def image_text_folder(folder: Path, naflex: bool) -> SigLIP2Model:
    """An image-text model saved by ``SigLIP2Model.save_pretrained`` with a tokenizer (heads 32 wide, vLLM's CPU
    attention's least): fixed-resolution (transformers' ``SiglipModel``) or NaFlex (``Siglip2Model``)."""
    from conftest import tiny_tokenizer

    from siglip2_encoder.data.tokenizer import TextTokenizer

    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    grid = dict(image_size=None, num_patches=16) if naflex else dict(image_size=32)
    processor = ProcessorConfig(image_size=None, max_num_patches=16, patch_size=8) if naflex else None
    vision = EncoderConfig(**sizes, patch_size=8, **grid)
    text = TextConfig(**sizes, vocab_size=len(tiny_tokenizer()), max_position_embeddings=64)
    model = perturb(SigLIP2Model(vision, text, processor or ProcessorConfig(image_size=(32, 32))), seed=7).eval()
    model.save_pretrained(folder, tokenizer=TextTokenizer(tiny_tokenizer()))
    return model


def test_vllm_embeds_a_saved_image_text_model_as_ours_given_texts_padded_to_64(tmp_path):
    """vLLM's pooling runner on ``SigLIP2Model.save_pretrained``'s folder (vLLM's ``SiglipEmbeddingModel``, with the
    folder's processor and tokenizer): images, texts padded to 64 tokens (``tokenization_kwargs``) and the ids
    ``TextTokenizer`` makes embed as our features, L2-normalised (1e-5), as SigLIP was trained (no padding mask).
    Texts as given, which vLLM does not pad, embed otherwise, with no error."""
    import torch.nn.functional as F

    from siglip2_encoder.data.tokenizer import TextTokenizer

    model = image_text_folder(tmp_path / "model", naflex=False)
    texts = ["a photo of a cat", "a dog", "an apple tree"]
    rng = np.random.default_rng(0)
    files = [tmp_path / f"image{i}.png" for i in range(2)]
    for file, (h, w) in zip(files, [(40, 50), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(file)
    tokens = TextTokenizer.from_pretrained(tmp_path / "model")(texts)
    padded = {"padding": "max_length", "max_length": 64}
    request = {"model": str(tmp_path / "model"), "texts": texts, "tokenization_kwargs": padded}
    request |= {"ids": tokens.input_ids.tolist(), "images": [str(f) for f in files]}
    theirs = {k: torch.tensor(v) for k, v in run_in_vllm("vllm_embed.py", request, tmp_path).items()}
    with torch.no_grad():
        text = F.normalize(model.get_text_features(tokens.input_ids), dim=-1)
        pixels = ImageProcessor.from_pretrained(tmp_path / "model")([Image.open(f) for f in files])
        image = F.normalize(model.get_image_features(**pixels), dim=-1)
    torch.testing.assert_close(theirs["texts"], text, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs["ids"], text, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs["images"], image, atol=1e-5, rtol=0)

    request |= {"tokenization_kwargs": None, "ids": [], "images": []}
    unpadded = torch.tensor(run_in_vllm("vllm_embed.py", request, tmp_path)["texts"])
    assert (unpadded * text).sum(-1).max() < 0.9, "vLLM's unpadded texts are not the model's texts"


def serve_embeddings(folder: Path, requests: list[dict], tmp_path: Path) -> list[list[list[float]]]:
    """vLLM's OpenAI server (``vllm serve FOLDER --runner pooling``, as users start it) on ``folder``: each request
    POSTed to its ``/v1/embeddings``, the embeddings it answers. The server is stopped whatever happens."""
    import httpx
    from conftest import free_port, wait_until_ready

    assert VLLM_PYTHON.is_file(), "README's test command makes vLLM's environment (tests/install_vllm.sh)"
    url = f"http://127.0.0.1:{(port := free_port())}"
    # `vllm serve`'s server module: the command itself reads the version of a package named vllm, and the CPU build
    # installed here is named vllm-cpu
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--runner", "pooling", "--dtype", "float32"]
    command += ["--enforce-eager", "--max-model-len", "64", "--seed", "0", "--host", "127.0.0.1", "--port", str(port)]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_ready(f"{url}/health", server, lambda: (tmp_path / "server.log").read_text()[-3000:], timeout=300)
        answers = [httpx.post(f"{url}/v1/embeddings", json=body, timeout=60) for body in requests]
        return [[item["embedding"] for item in answer.raise_for_status().json()["data"]] for answer in answers]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_vllm_server_embeds_a_saved_image_text_model_as_ours(tmp_path):
    """``vllm serve`` on ``SigLIP2Model.save_pretrained``'s folder, its ``/v1/embeddings`` as users call it: texts
    with ``"padding": "max_length"``, token ids as ``input``, an image as a chat message (an ``image_url`` data
    URI) embed as our features, L2-normalised (1e-5). Texts without the padding field embed otherwise."""
    import base64

    import torch.nn.functional as F

    from siglip2_encoder.data.tokenizer import TextTokenizer

    model = image_text_folder(tmp_path / "model", naflex=False)
    texts = ["a photo of a cat", "a dog"]
    ids = TextTokenizer.from_pretrained(tmp_path / "model")(texts).input_ids
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    uri = "data:image/png;base64," + base64.b64encode((tmp_path / "image.png").read_bytes()).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}
    model_name = str(tmp_path / "model")
    requests = [
        {"model": model_name, "input": texts, "padding": "max_length"},
        {"model": model_name, "input": ids.tolist()},
        {"model": model_name, "messages": [message]},
        {"model": model_name, "input": texts},
    ]
    padded, given_ids, images, unpadded = (torch.tensor(a) for a in serve_embeddings(model_name, requests, tmp_path))
    with torch.no_grad():
        text = F.normalize(model.get_text_features(ids), dim=-1)
        pixels = ImageProcessor.from_pretrained(tmp_path / "model")([Image.open(tmp_path / "image.png")])
        ours_image = F.normalize(model.get_image_features(**pixels), dim=-1)
    torch.testing.assert_close(padded, text, atol=1e-5, rtol=0)
    torch.testing.assert_close(given_ids, text, atol=1e-5, rtol=0)
    torch.testing.assert_close(images, ours_image, atol=1e-5, rtol=0)
    assert (unpadded * text).sum(-1).max() < 0.9, "vLLM's unpadded texts are not the model's texts"


def test_vllm_stops_at_start_up_on_a_naflex_image_text_model(tmp_path):
    """vLLM 0.32 has no NaFlex SigLIP 2 embedding model: its transformers backend takes the folder and stops."""
    image_text_folder(tmp_path / "model", naflex=True)
    request = {"model": str(tmp_path / "model"), "texts": ["a dog"], "tokenization_kwargs": None}
    request |= {"ids": [], "images": []}
    with pytest.raises(AssertionError, match="'Siglip2Processor' object has no attribute '_get_num_multimodal_tokens'"):
        run_in_vllm("vllm_embed.py", request, tmp_path)
