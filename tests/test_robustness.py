"""Loading real checkpoint layouts, and extract on bad inputs and under faults: what a new user met, fixed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, hub_cache
from corpus import make_corpus
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast, Siglip2ImageProcessor, Siglip2Processor

from siglip2_encoder import CheckpointError, ExtractedFeatures, ImageProcessor, SigLIP2Encoder
from siglip2_encoder.cli import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, main
from siglip2_encoder.files import write_atomic
from siglip2_encoder.pipeline import extract as extract_module
from siglip2_encoder.pipeline.decoding import WORKER_DIED
from siglip2_encoder.pipeline.extract import extract as extract_features
from siglip2_encoder.pipeline.settings import ExtractSettings
from siglip2_encoder.pipeline.sources import discover_inputs
from siglip2_encoder.pipeline.store import sole_writer

CLI = [sys.executable, "-m", "siglip2_encoder.cli"]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ the Hub cache


def sharded(folder: Path) -> dict[str, bytes]:
    """The checkpoint in ``folder`` as an index and two shards (the layout of google/siglip2-giant-opt-*)."""
    state = load_file(folder / "model.safetensors")
    keys = sorted(state)
    files, weight_map = {}, {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        name = f"model-0000{i}-of-00002.safetensors"
        tmp = folder.parent / f"{folder.name}-{name}"
        save_file({k: state[k] for k in part}, tmp)
        files[name] = tmp.read_bytes()
        weight_map.update(dict.fromkeys(part, name))
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


@pytest.mark.parametrize("layout", ["sharded", "sharded, cached no-exist marker", "bin only"])
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "local_files_only"])
def test_cached_repos_load_by_id_offline(fixed_dir, tmp_path, monkeypatch, layout, offline):
    import huggingface_hub

    files = {name: (fixed_dir / name).read_bytes() for name in ("config.json", "preprocessor_config.json")}
    if layout == "bin only":
        buffer = tmp_path / "weights.bin"
        torch.save(load_file(fixed_dir / "model.safetensors"), buffer)
        files["pytorch_model.bin"] = buffer.read_bytes()
    else:
        files |= sharded(fixed_dir)
    missing = ("model.safetensors",) if "marker" in layout else ()
    hub_cache(tmp_path / "cache", "google/siglip2-test", files, missing)
    kwargs = {"cache_dir": tmp_path / "cache"}
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        kwargs["local_files_only"] = True
    model = SigLIP2Encoder.from_pretrained("google/siglip2-test", **kwargs)
    assert same_weights(model, SigLIP2Encoder.from_pretrained(fixed_dir))
    assert ImageProcessor.from_pretrained("google/siglip2-test", **kwargs).config == model.processor_config


def test_offline_without_any_weights_in_the_cache_names_offline_mode(fixed_dir, tmp_path):
    hub_cache(tmp_path / "cache", "google/siglip2-test", {"config.json": (fixed_dir / "config.json").read_bytes()})
    message = "model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json) is "
    with pytest.raises(CheckpointError, match=re.escape(message) + "not in the local cache and offline mode is on"):
        SigLIP2Encoder.from_pretrained("google/siglip2-test", cache_dir=tmp_path / "cache", local_files_only=True)


def test_transformers_5_processor_file_is_read(naflex_dir, tmp_path):
    """transformers 5 saves a processor as processor_config.json (settings under "image_processor") only."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(naflex_dir, folder)
    (folder / "preprocessor_config.json").unlink()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=None, tokenizer_object=_tiny_tokenizer(), pad_token="<pad>")
    image_processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=100, image_mean=[0.4, 0.5, 0.6])
    Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    assert (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").exists()
    for config in (
        ImageProcessor.from_pretrained(folder).config,
        SigLIP2Encoder.from_pretrained(folder).processor_config,
    ):
        assert config.max_num_patches == 100 and config.image_mean == (0.4, 0.5, 0.6)
    inputs = ImageProcessor.from_pretrained(folder)(np.zeros((70, 110, 3), np.uint8))
    want = image_processor(np.zeros((70, 110, 3), np.uint8), return_tensors="pt")
    assert inputs.spatial_shapes.tolist() == want["spatial_shapes"].tolist()
    assert int(inputs.pixel_attention_mask.sum()) == int(want["pixel_attention_mask"].sum())


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "model.safetensors").write_bytes(b""), "cannot read .*model.safetensors \\(truncated or not"),
        (
            lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
            "cannot read .*model.safetensors \\(truncated or not",
        ),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json of .* must hold a JSON object, got a list"),
        (lambda f: (f / "config.json").write_text("{"), "config.json of .* is not valid JSON"),
    ],
    ids=["0-byte weights", "truncated weights", "config is a list", "config is not JSON"],
)
def test_damaged_checkpoints_fail_with_a_checkpoint_error(fixed_dir, tmp_path, damage, message):
    folder = tmp_path / "damaged"
    shutil.copytree(fixed_dir, folder)
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        SigLIP2Encoder.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ extract


@pytest.fixture(scope="module")
def headless(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **TINY, image_size=32, use_head=False).save_pretrained(
        folder
    )
    return folder


def photos(folder: Path, count: int = 6) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 50 - 4 * i, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_headless_tower_extracts_tokens_and_says_so(tmp_path, headless, caplog):
    images = photos(tmp_path / "in", 2)
    assert main(["extract", *images, "-o", str(tmp_path / "out"), "--model", str(headless), "--workers", "0"]) == 0
    assert "has no attention-pooling head: saving the final tokens (--tokens) instead" in caplog.text
    store = ExtractedFeatures.open(tmp_path / "out")
    assert store.settings["pooled"] is False and store.settings["last_hidden_state"] is True
    assert store.tokens(images[0]).shape == (4, 32)  # a 2 x 2 grid: 32-pixel images, 16-pixel patches


def test_files_get_the_permissions_of_ordinary_files(tmp_path, tiny_checkpoint):
    old = os.umask(0o022)
    try:
        assert (
            main(["extract", *photos(tmp_path / "in", 2), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint)])
            == 0
        )
    finally:
        os.umask(old)
    for name in ("shard-00000.safetensors", "shard-00000.jsonl", "run.json", "manifest.jsonl"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


def test_writes_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_atomic(tmp_path / "data.bin", b"x")
    assert synced == [str(tmp_path / ".data.bin.tmp"), str(tmp_path)]


def test_a_file_that_kills_its_decoding_worker_is_recorded_and_the_run_goes_on(tmp_path, tiny_checkpoint, monkeypatch):
    images = photos(tmp_path / "in", 6)
    poison = images[2]
    load = extract_module.load_image

    def dying_load(path, **kwargs):
        if str(path) == poison:
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return load(path, **kwargs)

    monkeypatch.setattr(extract_module, "load_image", dying_load)  # forked workers inherit it
    model, processor = SigLIP2Encoder.from_pretrained(tiny_checkpoint), ImageProcessor.from_pretrained(tiny_checkpoint)
    settings = ExtractSettings(model=str(tiny_checkpoint), batch_size=2, shard_size=4)
    summary = extract_features(images, tmp_path / "out", model, processor, settings, num_workers=2)
    assert (summary.done, summary.failed) == (5, 1)
    rows = {row["path"]: row for row in ExtractedFeatures.open(tmp_path / "out").rows}
    assert rows[poison]["status"] == "failed" and WORKER_DIED in rows[poison]["error"]
    clean = [p for p in images if p != poison]
    reference = extract_features(clean, tmp_path / "ref", model, processor, settings, num_workers=0)
    assert reference.done == 5
    got, want = ExtractedFeatures.open(tmp_path / "out").pooled(), ExtractedFeatures.open(tmp_path / "ref").pooled()
    assert got[0] == want[0] == clean  # batches differ (the poison left a gap), so values agree to rounding
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_library_errors_name_python_arguments_and_the_cli_its_options(tmp_path, tiny_checkpoint, caplog):
    images = photos(tmp_path / "in", 2)
    model, processor = SigLIP2Encoder.from_pretrained(tiny_checkpoint), ImageProcessor.from_pretrained(tiny_checkpoint)
    settings = ExtractSettings(model=str(tiny_checkpoint), batch_size=2)
    extract_features(images, tmp_path / "out", model, processor, settings)
    message = (
        f"{tmp_path / 'out'} already holds output; pass resume=True to continue it or overwrite=True to replace it"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        extract_features(images, tmp_path / "out", model, processor, settings)
    with pytest.raises(ValueError, match=re.escape("resume=True with other settings than the first run (save_dtype")):
        extract_features(images, tmp_path / "out", model, processor, replace(settings, save_dtype="fp16"), resume=True)
    assert main(["extract", *images, "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]) == EXIT_FATAL
    assert "already holds output; pass --resume to continue it or --overwrite to replace it" in caplog.text


def test_a_run_resumes_with_another_batch_size_and_each_shard_records_its_own(tmp_path, tiny_checkpoint):
    """Batch size and device say how a job runs, not what it computes: resuming may change them. Features are not
    bitwise batch-invariant, so the resumed folder equals an uninterrupted run within fp32 rounding (atol 1e-5),
    and bitwise at one batch size (the kill-and-resume tests)."""
    images = photos(tmp_path / "in", 6)
    model, processor = SigLIP2Encoder.from_pretrained(tiny_checkpoint), ImageProcessor.from_pretrained(tiny_checkpoint)
    settings = ExtractSettings(model=str(tiny_checkpoint), batch_size=2, shard_size=2)
    extract_features(images, tmp_path / "ref", model, processor, settings)
    extract_features(images[:2], tmp_path / "out", model, processor, settings)  # as a run stopped after shard 0
    summary = extract_features(images, tmp_path / "out", model, processor, replace(settings, batch_size=3), resume=True)
    assert (summary.skipped, summary.done) == (2, 4)
    got, want = ExtractedFeatures.open(tmp_path / "out").pooled(), ExtractedFeatures.open(tmp_path / "ref").pooled()
    assert got[0] == want[0] == images
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    runs = [safe_open(tmp_path / "out" / f"shard-0000{i}.safetensors", "pt").metadata() for i in range(3)]
    assert runs == [{"device": "cpu", "batch_size": "2"}] + [{"device": "cpu", "batch_size": "3"}] * 2


def test_a_second_writer_is_refused_naming_the_first(tmp_path, tiny_checkpoint, caplog):
    out = tmp_path / "out"
    with sole_writer(out):
        code = main(
            ["extract", *photos(tmp_path / "in", 2), "-o", str(out), "--model", str(tiny_checkpoint), "--resume"]
        )
    assert code == EXIT_FATAL
    assert f"is being written by another extract run (process {os.getpid()}); wait for it to end" in caplog.text
    assert main(["extract", *photos(tmp_path / "in", 2), "-o", str(out), "--model", str(tiny_checkpoint)]) == EXIT_OK


def test_a_resumed_run_with_failures_recorded_earlier_exits_3(tmp_path, tiny_checkpoint):
    images = [*photos(tmp_path / "in", 3), str(tmp_path / "missing.png")]
    args = ["extract", *images, "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--workers", "0"]
    assert main(args) == EXIT_PARTIAL
    assert main([*args, "--resume"]) == EXIT_PARTIAL


@pytest.mark.parametrize("resume", [False, True])
def test_a_kill_before_run_json_is_renamed_leaves_a_usable_folder(tmp_path, tiny_checkpoint, resume):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".run.json.tmp").write_text("{")  # what a kill between writing and renaming run.json leaves
    args = ["extract", *photos(tmp_path / "in", 2), "-o", str(out), "--model", str(tiny_checkpoint), "--workers", "0"]
    assert main([*args, *(["--resume"] if resume else [])]) == EXIT_OK
    assert not (out / ".run.json.tmp").exists() and len(ExtractedFeatures.open(out).ok) == 2


def test_a_full_disk_is_one_line_and_keeps_committed_shards(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    from safetensors import SafetensorError

    from siglip2_encoder.pipeline import store

    real_save, calls = store.save_file, []

    def filling_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(store, "save_file", filling_save)
    args = ["extract", *photos(tmp_path / "in", 4), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    assert main([*args, "--shard-size", "2", "--workers", "0"]) == EXIT_FATAL
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "rerun with --resume" in errors[0]
    monkeypatch.setattr(store, "save_file", real_save)
    assert main([*args, "--shard-size", "2", "--workers", "0", "--resume"]) == EXIT_OK
    assert len(ExtractedFeatures.open(tmp_path / "out").ok) == 4


def test_folder_scans_take_what_pillow_opens_and_report_what_they_skip(tmp_path, caplog):
    root = tmp_path / "scan"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a.tga")
    Image.new("RGB", (8, 8)).save(root / "sub" / "b.ppm")
    Image.new("RGB", (8, 8)).save(root / "c.JPG")
    (root / "notes.txt").write_text("not an image")
    (root / "folder.jpg").mkdir()
    Image.new("RGB", (8, 8)).save(root / "folder.jpg" / "inside.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "linked.png")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    found = discover_inputs([str(root)])
    names = sorted(Path(p).name for p in found)
    assert names == ["a.tga", "b.ppm", "c.JPG", "inside.png", "linked.png"]
    assert "skipped 1 files with an extension Pillow cannot open (.txt)" in caplog.text
    assert "skipped 1 folders named like images (searched, not read)" in caplog.text


def test_file_list_lines_are_paths_exactly(tmp_path):
    (tmp_path / "#note.png").touch()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path}/#note.png\n\n{tmp_path}/ spaced.bmp\r\n")
    assert discover_inputs([], listing) == [f"{tmp_path}/#note.png", f"{tmp_path}/ spaced.bmp"]


def test_bad_corpus_run_has_no_traceback_no_silent_skip_and_no_lost_row(tmp_path, tiny_checkpoint):
    good, bad = make_corpus(tmp_path / "corpus")
    corpus = tmp_path / "corpus"
    os.mkfifo(corpus / "pipe.jpg")  # opening it would block forever
    bad[str(corpus / "pipe.jpg")] = "is a FIFO (named pipe), not an image file"
    (corpus / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    bad[str(corpus / "dangling.png")] = "No such file"
    Image.new("RGB", (1, 100_000)).save(corpus / "needle.png")  # a tiny file, an extreme aspect ratio
    good.append(str(corpus / "needle.png"))
    Image.new("RGB", (9, 9)).save(corpus / "odd.tga")
    good.append(str(corpus / "odd.tga"))
    args = [
        "extract",
        str(corpus),
        "-o",
        str(tmp_path / "out"),
        "--model",
        str(tiny_checkpoint),
        "--max-pixels",
        "150000",
    ]
    result = subprocess.run(
        [*CLI, *args, "--batch-size", "3", "--shard-size", "4", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert "Traceback" not in result.stderr
    rows = {r["path"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    scanned_bad = {p: w for p, w in bad.items() if not p.endswith("folder.png")}  # a folder is searched, not read
    assert set(rows) == set(good) | set(scanned_bad)
    for path in good:
        assert rows[path]["status"] == "ok", rows[path]
    for path, word in scanned_bad.items():
        assert rows[path]["status"] == "failed" and word in rows[path]["error"], rows[path]
    assert "skipped 1 folders named like images" in result.stderr


PEAK_MEMORY = """
import resource, sys
from PIL import Image
from siglip2_encoder import ImageProcessor, load_image

Image.new("L", (1, 4_000_000), 128).save(sys.argv[1])  # a 4 KB PNG: 1 pixel wide, 4,000,000 tall
processor = ImageProcessor.from_preset(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = processor(load_image(sys.argv[1]))
print(out.pixel_values.shape[0], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("preset", ["siglip2-base-patch16-224", "siglip2-base-patch16-naflex"])
def test_preprocessing_a_sliver_costs_what_the_output_costs(tmp_path, preset):
    """Resizing 4,000,000 x 1 to 224 x 224 in one antialiased call holds a 4,000,000 x 224 image (2.7 GB)."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, str(tmp_path / "sliver.png"), preset], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    images, grown_mib = map(int, result.stdout.split())
    assert images == 1 and grown_mib < 400, f"preprocessing grew the process by {grown_mib} MiB"


def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_work(
    tmp_path, tiny_checkpoint, monkeypatch, caplog
):
    # Tests run as root, whom permissions do not stop: the check itself is what is tested.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    args = ["extract", *photos(tmp_path / "in", 1), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    assert main(args) == EXIT_FATAL
    assert f"error: cannot write the output folder {tmp_path / 'out'}: {tmp_path} is not writable" in caplog.text


def test_an_input_inside_an_unreadable_folder_is_recorded(tmp_path, monkeypatch):
    locked = tmp_path / "locked" / "a.png"
    real_is_dir = Path.is_dir

    def is_dir(path: Path) -> bool:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_dir(path)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    assert discover_inputs([str(locked)]) == [str(locked)]  # kept: reading it then fails with its reason
