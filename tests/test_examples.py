"""The examples run end to end (shrunk so the suite stays fast)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.mark.slow
def test_lora_classification_example_trains_saves_and_reloads(tmp_path):
    import lora_classification

    metrics = lora_classification.main(
        ["--per-class", "80", "--epochs", "8", "--size", "32", "--lora-layers", "2", "--out", str(tmp_path)]
    )
    assert metrics["identical_after_reload"] == 1.0
    assert metrics["after"] > metrics["chance"] + 0.05, metrics  # 80 test images: 0.40 when written, chance 0.25
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and (tmp_path / "head.pt").is_file()


@pytest.mark.slow
def test_train_vlm_example_learns_and_exports():
    import train_vlm

    results = train_vlm.main(["--steps", "40", "--train-images", "24", "--test-images", "6", "--batch-size", "12"])
    assert results["final_loss"] < results["first_loss"]
    assert results["llava_export_same"] == 1.0
