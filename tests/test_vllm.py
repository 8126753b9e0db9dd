"""The LLaVA export in vLLM, the server many users deploy VLMs with: its offline ``LLM.chat`` (the chat template,
the processor and the model its OpenAI server runs) on the exported folder, in vLLM's own environment (README's test
command makes it: tests/install_vllm.sh, vLLM 0.32.0 built for CPUs), against our model on the same image and text."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import perturb
from PIL import Image
from test_llava import TOWER, images, make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from siglip2_encoder import ImageProcessor, SigLIP2Encoder
from siglip2_encoder.adapters import LinearConfig, MLPConfig, build_projector
from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor, add_image_token
from siglip2_encoder.integrations.llava_export import export_llava

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "vllm" / "bin" / "python"
# vLLM's CPU attention takes head sizes of 32 and up: the LM's heads are 32 wide here (test_llava's are 12)
LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def vllm_chat(folder: Path, conversations: list[tuple[Path, str]], tmp_path: Path, tokens: int) -> list[dict]:
    """vLLM's chat on ``folder``: for each (image file, text), the prompt's ids and ``tokens`` greedy ids."""
    assert VLLM_PYTHON.is_file(), "README's test command makes vLLM's environment (tests/install_vllm.sh)"
    request = {"model": str(folder), "max_tokens": tokens}
    request["conversations"] = [{"image": str(image), "text": text} for image, text in conversations]
    (tmp_path / "request.json").write_text(json.dumps(request))
    command = [str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_chat.py"))]
    command += [str(tmp_path / "request.json"), str(tmp_path / "result.json")]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}  # 1 GiB (its default takes 4)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
    output = (result.stdout + result.stderr).splitlines()  # vLLM logs to stdout, its engine's errors too
    errors = dict.fromkeys(line.split("] ")[-1].strip() for line in output if "Error" in line)  # the causes
    assert result.returncode == 0, "\n".join(errors)
    return json.loads((tmp_path / "result.json").read_text())


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

    question, conversations, ours = "what colour is the shape", [], []
    for i, size in enumerate([(30, 50), (64, 64)]):
        image = images(1, 5 + i, sizes=[size])[0]
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        conversations.append((tmp_path / f"{i}.png", question))
        batch = processor([f"<image> {question}"], [[image]])
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[0].tolist()
        ours.append({"prompt": batch["input_ids"][0].tolist(), "generated": generated})
    assert vllm_chat(tmp_path / "export", conversations, tmp_path, tokens=6) == ours


def test_vllm_refuses_a_linear_projector_as_export_llava_warns(tmp_path):
    """vLLM's LLaVA takes the projector's activation from its own registry, which has no "linear": the export of a
    ``linear`` projector (which transformers runs) stops in vLLM, as export_llava's warning says."""
    model, _, tokenizer = llava_vlm(LinearConfig(in_features=32, out_features=64, layers=(-1,)))
    export_llava(model, tmp_path / "export", tokenizer)
    image = tmp_path / "image.png"
    Image.fromarray(images(1, 5)[0]).save(image)
    with pytest.raises(AssertionError, match="Activation function 'linear' is not supported"):
        vllm_chat(tmp_path / "export", [(image, "what colour is the shape")], tmp_path, tokens=1)
