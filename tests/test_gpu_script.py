"""benchmarks/gpu/run.sh cannot rot between the sessions that have a GPU: its --dry-run runs every step on this CPU
with tiny models, and each must succeed and write its section."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import triton_interpreter_refusal

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "2", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""
    assert result.returncode == 0, result.stdout + log[-3000:]
    steps = dict(line.split(" ", 1) for line in (tmp_path / "summary.txt").read_text().splitlines())
    assert list(steps) == ["versions", "cuda_tests", "so400m", "extract", "loss"]
    assert all(status.startswith("rc=0 ") for status in steps.values()), steps
    assert "torch varlen attention:" in (tmp_path / "versions.md").read_text()
    assert "skipped" in (tmp_path / "cuda_tests.md").read_text()  # no CUDA here: each cuda test skips, none fails
    throughput = (tmp_path / "so400m.md").read_text()
    assert "| NaFlex mixed | 8 |" in throughput and "| tokens + pooled | 2 | 196 | timm |" in throughput
    assert "| decode_jpeg on the cpu + resize there |" in (tmp_path / "extract.md").read_text()
    loss = (tmp_path / "loss.md").read_text()  # the triton kernels by Triton's interpreter, each against the reference
    assert "| tiled 64, torch |" in loss and "| reference (whole matrix) |" in loss
    reason = triton_interpreter_refusal()  # where Triton's interpreter cannot run, the script says why
    refused = f"tiled, triton: not run (loss backend 'triton' {reason}"
    assert ("| tiled 64, triton |" if reason is None else refused) in loss


def test_the_gpu_script_reruns_only_the_steps_named(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    command = ["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run", "--only", "versions,loss"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split(" ", 1)[0] for line in (tmp_path / "summary.txt").read_text().splitlines()]
    assert steps == ["versions", "loss"]
    wrong = subprocess.run([*command[:3], "--only", "loss,speed"], capture_output=True, text=True, timeout=60, env=env)
    assert wrong.returncode == 2
    assert wrong.stderr == "--only speed: no such step; the steps are versions,cuda_tests,so400m,b16,extract,loss\n"
