"""Tiny random transformers checkpoints, saved with ``save_pretrained``: the oracles every parity test loads."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
# 36 = 4 * 8 + 4: like So400m/14 at 384, the native size is not a multiple of the patch size.
FIXED = dict(TINY, image_size=36, patch_size=8)
NAFLEX = dict(TINY, num_patches=16, patch_size=8)
NAFLEX_BUDGET = 24
# Image-text checkpoints: a text tower and a vision tower of the same width.
TEXT = dict(TINY, vocab_size=50, max_position_embeddings=16)
VISION = dict(TINY, num_hidden_layers=2, patch_size=8)


def free_port() -> int:
    """A loopback port that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, log: Callable[[], str], timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200; fail with ``log()`` if ``process`` (its server) exits first, or after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, log()
        assert time.monotonic() < deadline, f"{url} did not answer within {timeout} s"
        time.sleep(0.2)


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised biases and unit norms are exercised too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def keep_only_shards_of(folder: Path, prefix: str) -> None:
    """Delete the shards of a sharded checkpoint that hold no weight whose name starts with ``prefix``: a loader
    that still works never read them."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {file for key, file in weight_map.items() if key.startswith(prefix)}
    others = set(weight_map.values()) - needed
    assert others, f"the test needs shards without {prefix} weights"
    for shard in others:
        (folder / shard).unlink()


def triton_interpreter_refusal() -> str | None:
    """Why the ``"triton"`` loss backend cannot run under Triton's CPU interpreter (``TRITON_INTERPRET=1``) with the
    installed versions, or None: the tests that run the kernels that way skip with it."""
    from siglip2_encoder.models.loss import LOSS_BACKENDS

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        return LOSS_BACKENDS["triton"].unavailable(torch.device("cpu"))


def random_images(seed: int, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """uint8 (H, W, 3) images with smooth structure plus noise, so resizing filters matter."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (3 + c) + yy / (5 + c)) for c in range(3)], -1) * 100 + 128
        out.append(np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def fixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers ``SiglipVisionModel`` folder (config, safetensors, bicubic SiglipImageProcessor)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_fixed")
    perturb(SiglipVisionModel(SiglipVisionConfig(**FIXED)), seed=1).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 36, "width": 36}, resample=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def naflex_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers ``Siglip2VisionModel`` folder with a ``Siglip2ImageProcessor``."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_naflex")
    perturb(Siglip2VisionModel(Siglip2VisionConfig(**NAFLEX)), seed=2).save_pretrained(folder)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=NAFLEX_BUDGET).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny NaFlex tower saved by this library (random weights), for command-line and extraction tests."""
    from siglip2_encoder import SigLIP2Encoder

    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    SigLIP2Encoder.from_preset("siglip2-base-patch16-naflex", **TINY).save_pretrained(folder)
    return folder


def tiny_tokenizer():
    """A word-level tokenizer trained offline on the words the tests use."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["This is a photo of a cat.", "a dog", "a red car", "an apple tree", "A PHOTO OF A BIRD", "sketch of"]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="session")
def zero_shot_dir(tmp_path_factory) -> Path:
    """A SiglipModel checkpoint with its tokenizer and image processor: what transformers' pipeline loads."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("zero_shot")
    text = TEXT | dict(max_position_embeddings=64)  # the pipeline pads to 64, as SigLIP was trained
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=VISION | dict(image_size=32)))
    perturb(model, seed=7).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(60, 80), (90, 30), (48, 48), (20, 100), (75, 50), (33, 66)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


def hub_cache(cache: Path, repo: str, files: dict[str, bytes], missing: tuple[str, ...] = ()) -> None:
    """huggingface_hub's cache layout: blobs by hash, a snapshot of symlinks (names may hold subfolders), refs/main,
    and .no_exist markers."""
    root = cache / f"models--{repo.replace('/', '--')}"
    revision = "1" * 40
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    for name in missing:
        marker = root / ".no_exist" / revision / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
