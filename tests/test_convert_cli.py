"""``siglip2-encoder convert``: a tower between transformers', timm's and big_vision's formats, strictly; each
result is loaded by the other library and compared with the source's own outputs."""

from __future__ import annotations

import logging

import numpy as np
import timm
import torch
from conftest import perturb
from test_big_vision import big_vision_arrays
from test_timm import timm_siglip
from test_vlm_import import build, vision_tower
from transformers import SiglipVisionModel

from siglip2_encoder.cli import EXIT_FATAL, EXIT_OK, EXIT_USAGE, main
from siglip2_encoder.integrations.timm_models import from_timm, save_timm

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_vlms_tower_converts_to_timm(tmp_path):
    vlm, processor = build("paligemma")
    vlm = perturb(vlm, seed=3).eval()
    vlm.save_pretrained(tmp_path / "paligemma")
    processor.save_pretrained(tmp_path / "paligemma")
    assert main(["convert", str(tmp_path / "paligemma"), str(tmp_path / "timm"), "--to", "timm"]) == EXIT_OK
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        want = vision_tower(vlm)(pixel_values=X).last_hidden_state
        torch.testing.assert_close(theirs.forward_features(X), want, atol=1e-4, rtol=0)


def test_big_vision_npz_converts_to_transformers(tmp_path):
    source = timm_siglip()
    np.savez(tmp_path / "siglip.npz", **big_vision_arrays(source, stacked=True))
    assert main(["convert", str(tmp_path / "siglip.npz"), str(tmp_path / "hf"), "--to", "hf"]) == EXIT_OK
    theirs = SiglipVisionModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(X).pooler_output, source.forward_head(source.forward_features(X)), atol=1e-5, rtol=0
        )


def test_a_timm_folder_converts_to_transformers(tmp_path):
    source = timm_siglip()
    save_timm(from_timm(source), tmp_path / "timm")
    assert main(["convert", str(tmp_path / "timm"), str(tmp_path / "hf"), "--to", "hf"]) == EXIT_OK
    theirs = SiglipVisionModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X).last_hidden_state, source.forward_features(X), atol=1e-5, rtol=0)


def test_bad_conversions_are_one_line_errors(tmp_path, caplog):
    vlm, processor = build("idefics3")
    vlm.save_pretrained(tmp_path / "idefics3")
    processor.save_pretrained(tmp_path / "idefics3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (
            ["--to", "timm", "--image-size", "36"],
            tmp_path / "a",
            EXIT_USAGE,
            f"--image-size is for big_vision .npz sources; {tmp_path / 'idefics3'} is read as hf",
        ),
        (
            ["--to", "hf"],
            tmp_path / "full",
            EXIT_USAGE,
            f"{tmp_path / 'full'} exists and is not empty; pass --overwrite to write into it",
        ),
        (
            ["--to", "timm"],
            tmp_path / "b",
            EXIT_FATAL,
            "--to timm: timm has no ViT with position_lookup='buckets' (Idefics3's buckets)",
        ),
    ]
    for options, destination, code, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["convert", str(tmp_path / "idefics3"), str(destination), *options]) == code
        assert caplog.messages[-1] == f"error: {message}"
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
