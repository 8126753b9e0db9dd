"""The ``siglip2-encoder`` command line, run as a real subprocess where exit codes and crashes matter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from corpus import make_corpus
from PIL import Image

from siglip2_encoder import ExtractedFeatures, ImageProcessor, SigLIP2Encoder, load_image
from siglip2_encoder.cli import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main

CLI = [sys.executable, "-m", "siglip2_encoder.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_bad_files_are_reported_and_good_ones_written(tmp_path, tiny_checkpoint):
    good, bad = make_corpus(tmp_path / "corpus")
    listing = tmp_path / "more.txt"
    missing = str(tmp_path / "missing.jpg")
    listing.write_text(f"{tmp_path / 'corpus' / 'folder.png'}\n{missing}\n")
    out = tmp_path / "out"
    result = run_cli(
        "extract",
        str(tmp_path / "corpus"),
        "--file-list",
        str(listing),
        "-o",
        str(out),
        "--model",
        str(tiny_checkpoint),
        "--tokens",
        "--layers",
        "-2",
        "--max-pixels",
        "100000",
        "--batch-size",
        "3",
        "--shard-size",
        "4",
        "--workers",
        "2",
    )
    assert result.returncode == EXIT_PARTIAL, result.stderr
    rows = {row["path"]: row for row in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert set(rows) == set(good) | set(bad) | {missing}
    for path in good:
        assert rows[path]["status"] == "ok" and rows[path]["shard"], rows[path]
    for path, word in {**bad, missing: "No such file"}.items():
        assert rows[path]["status"] == "failed" and word in rows[path]["error"], rows[path]
        assert path in result.stderr or rows[path]["error"] in result.stderr
    assert "failed 7" in result.stderr and f"done {len(good)}" in result.stderr
    store = ExtractedFeatures.open(out)
    paths, pooled = store.pooled()
    assert paths == [p for p in rows if rows[p]["status"] == "ok"] and pooled.shape == (len(good), 32)
    h, w = rows[good[0]]["grid"]
    assert store.feature_map(good[0], "hidden_state_-2").shape == (32, h, w)


# Runs the command line in a subprocess that SIGKILLs itself at an exact write step: after shard 0 is committed, or
# after shard 1's features are written but before its commit record.
KILLING_CLI = """
import os, signal, sys
from siglip2_encoder import cli
from siglip2_encoder.pipeline import store

point = os.environ["KILL_AT"]
commit, write_atomic = store.ShardWriter.write, store.write_atomic

def write(self, rows, features, index=None):
    commit(self, rows, features, index)
    if point == "after-commit":
        os.kill(os.getpid(), signal.SIGKILL)

def atomic(path, data):
    if point == "before-commit" and path.name == "shard-00001.jsonl":
        os.kill(os.getpid(), signal.SIGKILL)
    write_atomic(path, data)

store.ShardWriter.write, store.write_atomic = write, atomic
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("kill_at", "committed"), [("after-commit", 1), ("before-commit", 1)])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_checkpoint, photos, kill_at, committed):
    inputs = photos * 2  # 12 files (copies: the same path twice would count once)
    folder = tmp_path / "many"
    folder.mkdir()
    for i, path in enumerate(inputs):
        (folder / f"{i:02d}.png").write_bytes(Path(path).read_bytes())
    common = [str(folder), "--model", str(tiny_checkpoint), "--tokens", "--batch-size", "2", "--shard-size", "2"]
    common += ["--workers", "1"]

    reference = run_cli("extract", *common, "-o", str(tmp_path / "reference"))
    assert reference.returncode == EXIT_OK, reference.stderr

    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AT": kill_at}
    killed = subprocess.run(
        [sys.executable, "-c", KILLING_CLI, "extract", *common, "-o", str(interrupted)], env=env, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30  # the killed run's decoding workers look for their parent every second
    while subprocess.run(["pgrep", "-f", str(interrupted)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "decoding workers outlived their run"
        time.sleep(0.2)
    assert len(list(interrupted.glob("shard-*.jsonl"))) == committed
    leftovers = {p.name for p in interrupted.glob("shard-*.safetensors")}
    assert leftovers == (
        {"shard-00000.safetensors", "shard-00001.safetensors"}
        if kill_at == "before-commit"
        else {"shard-00000.safetensors"}
    )

    refused = run_cli("extract", *common, "-o", str(interrupted))
    assert refused.returncode == EXIT_FATAL and "--resume" in refused.stderr
    resumed = run_cli("extract", *common, "-o", str(interrupted), "--resume")
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert f"skipped {2 * committed}" in resumed.stderr
    assert not list(interrupted.glob(".*.tmp"))

    want, got = ExtractedFeatures.open(tmp_path / "reference"), ExtractedFeatures.open(interrupted)
    assert [r["path"] for r in got.rows] == [r["path"] for r in want.rows]
    assert (interrupted / "manifest.jsonl").read_text() == (tmp_path / "reference" / "manifest.jsonl").read_text()
    for row in want.rows:
        for name in ("last_hidden_state",):
            assert torch.equal(got.tokens(row["path"], name), want.tokens(row["path"], name))
    assert torch.equal(got.pooled()[1], want.pooled()[1])
    changed = run_cli("extract", *common, "-o", str(interrupted), "--resume", "--save-dtype", "fp16")
    assert changed.returncode == EXIT_FATAL and "save_dtype" in changed.stderr


def test_features_equal_the_library_api(tmp_path, tiny_checkpoint, photos):
    assert (
        main(
            [
                "-q",
                "extract",
                *photos,
                "-o",
                str(tmp_path / "out"),
                "--model",
                str(tiny_checkpoint),
                "--tokens",
                "--layers",
                "-2",
                "1",
                "--workers",
                "0",
                "--max-num-patches",
                "20",
            ]
        )
        == EXIT_OK
    )
    store = ExtractedFeatures.open(tmp_path / "out")
    model, processor = SigLIP2Encoder.from_pretrained(tiny_checkpoint), ImageProcessor.from_pretrained(tiny_checkpoint)
    for path in photos:
        with torch.no_grad():
            want = model(**processor(load_image(path), max_num_patches=20), layers=[-2, 1])
        torch.testing.assert_close(store.tokens(path), want.per_image()[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(store.tokens(path, "hidden_state_-2"), want.per_image(-2)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(store.tokens(path, "hidden_state_1"), want.per_image(1)[0], atol=1e-5, rtol=0)
    paths, pooled = store.pooled()
    assert paths == photos
    with torch.no_grad():
        want = model(**processor([load_image(p) for p in photos], max_num_patches=20)).pooler_output
    torch.testing.assert_close(pooled, want, atol=1e-5, rtol=0)


def test_similarity_pca_and_info(tmp_path, tiny_checkpoint, photos, capsys):
    out = tmp_path / "out"
    assert main(["-q", "extract", *photos, "-o", str(out), "--model", str(tiny_checkpoint), "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", "--image", photos[3], "--features", str(out), "-k", "3"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[1].endswith(photos[3]) and lines[1].startswith("  1.0000")
    assert main(["similarity", photos[3], "--features", str(out), "-k", "3"]) == EXIT_OK  # the alias, saying so
    assert capsys.readouterr().out.splitlines() == lines

    picture = tmp_path / "pca.png"
    assert main(["pca", photos[0], "-o", str(picture), "--model", str(tiny_checkpoint)]) == EXIT_OK
    with Image.open(picture) as image:
        assert image.height == 60 and image.width > 2 * 80

    assert main(["info", "--model", str(tiny_checkpoint)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "NaFlex ViT: width 32, 3 layers" in text and "GFLOPs / image" in text and "parameters" in text
    assert main(["info", "--list"]) == EXIT_OK and "siglip2-so400m-patch14-384" in capsys.readouterr().out


def test_fatal_errors_are_one_line_with_a_way_out(tmp_path, photos, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example.invalid")
    assert main(["extract", photos[0], "-o", str(tmp_path / "a")]) == EXIT_FATAL
    assert "or run the same command with --random-weights siglip2-so400m-patch14-384 (offline" in caplog.text
    caplog.clear()
    assert main(["extract", photos[0], "-o", str(tmp_path / "a"), "--model", "someone/custom-siglip"]) == EXIT_FATAL
    assert "--random-weights siglip2" not in caplog.text and "`siglip2-encoder info --list` shows" in caplog.text
    assert not (tmp_path / "a").exists(), "nothing is written before the model loads"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nothing-*.png"], "no input images: give files, folders, glob patterns, --file-list or --tar"),
        (
            ["{photo}", "--random-weights", "base-patch16-224", "--max-num-patches", "64"],
            "--max-num-patches applies to NaFlex checkpoints; siglip2-base-patch16-224 has a fixed resolution",
        ),
        (["{photo}", "--random-weights", "base-patch16-224", "--layers", "13"], "--layers 13: layer index 13 is out"),
        (["{photo}", "--device", "cuda"], "--device cuda: this machine has no CUDA device; use --device cpu"),
        (["{photo}", "--device", "foo"], "--device 'foo' is not a device; use cpu, cuda or cuda:N"),
        (["{photo}", "--device", "mps"], "--device mps: this machine has no MPS device; use --device cpu"),
        (["{photo}", "--file-list", "{tmp}/missing.txt"], "--file-list {tmp}/missing.txt: no such file"),
        (["{photo}", "--file-list", "{tmp}"], "--file-list {tmp} is a folder; give a text file"),
        (["{photo}", "-o", "{photo}"], "-o {photo} is a file; give a folder"),
    ],
    ids=["no inputs", "budget on fixed", "layer", "cuda", "foo", "mps", "missing list", "list folder", "-o file"],
)
def test_bad_command_lines_exit_2_with_one_line_before_writing(tmp_path, photos, caplog, args, message):
    fill = {"photo": photos[0], "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    if "--random-weights" not in args:
        args += ["--random-weights", "base-patch16-naflex"]
    assert main(["extract", *args]) == EXIT_USAGE
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message.format(**fill)}"), errors
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [["--max-num-patches", "0"], ["--max-num-patches", "-3"], ["--batch-size", "0"], ["--resume", "--overwrite"]],
    ids=["budget 0", "budget -3", "batch 0", "resume and overwrite"],
)
def test_options_out_of_range_are_refused_by_the_parser(tmp_path, photos, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", photos[0], "-o", str(tmp_path / "out"), "--random-weights", "base-patch16-naflex", *args])
    assert exit_info.value.code == EXIT_USAGE
    assert "error: argument" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_random_weights_are_labelled_and_reproducible(tmp_path, photos, caplog):
    args = ["extract", photos[0], "--random-weights", "base-patch16-224", "--workers", "0"]
    assert main([*args, "-o", str(tmp_path / "a")]) == EXIT_OK
    assert "RANDOM WEIGHTS" in caplog.text and "meaningless" in caplog.text
    assert main([*args, "-o", str(tmp_path / "b")]) == EXIT_OK
    a, b = ExtractedFeatures.open(tmp_path / "a"), ExtractedFeatures.open(tmp_path / "b")
    assert torch.equal(a.pooled()[1], b.pooled()[1])
    assert a.settings["random_weights"] is True


def test_quiet_works_before_and_after_the_command():
    from siglip2_encoder.cli import build_parser

    parser = build_parser()
    base = ["extract", "a.png", "-o", "out"]
    assert parser.parse_args(base).quiet is False
    assert parser.parse_args(["-q", *base]).quiet is True
    assert parser.parse_args([*base, "-q"]).quiet is True
    assert parser.parse_args(["info", "--list", "--quiet"]).quiet is True
    assert parser.parse_args(["similarity", "q.png", "--features", "f", "-q"]).quiet is True
