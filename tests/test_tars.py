"""WebDataset tar shards as extract's input: streamed by webdataset, each sample's key its id, corrupt members and
broken shards recorded, the rest extracted with the features the same images give as files; under torchrun too."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from siglip2_encoder import ExtractedFeatures
from siglip2_encoder.cli import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, main


def png(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """s-0.tar: 3 images and a corrupt one; s-1.tar: 2 images and a sample without one; files/: the good images."""
    folder = tmp_path_factory.mktemp("tars")
    (folder / "files").mkdir()
    layout = {0: ["a", "b", "bad", "c"], 1: ["d", "textonly", "e"]}
    for shard, keys in layout.items():
        with wds.TarWriter(str(folder / f"s-{shard}.tar")) as writer:
            for i, key in enumerate(keys):
                sample = {"__key__": key, "txt": f"caption {key}"}
                if key == "bad":
                    sample["jpg"] = b"not an image at all"
                elif key != "textonly":
                    sample["png"] = png(10 * shard + i, (24 + 8 * i, 40))
                    (folder / "files" / f"{key}.png").write_bytes(sample["png"])
                writer.write(sample)
    return folder


def options(checkpoint: Path, output: Path) -> list[str]:
    return ["--model", str(checkpoint), "--tokens", "--batch-size", "2", "--shard-size", "2", "-o", str(output)]


def test_tar_samples_give_the_features_of_the_same_files(shards, tiny_checkpoint, tmp_path):
    spec = str(shards / "s-{0..1}.tar")
    assert main(["extract", "--tar", spec, *options(tiny_checkpoint, tmp_path / "tar")]) == EXIT_PARTIAL
    assert main(["extract", str(shards / "files"), *options(tiny_checkpoint, tmp_path / "files")]) == EXIT_OK
    got, want = ExtractedFeatures.open(tmp_path / "tar"), ExtractedFeatures.open(tmp_path / "files")
    assert [(r["path"], r["tar"].rsplit("/", 1)[-1], r["member"]) for r in got.rows] == [
        ("a", "s-0.tar", 0), ("b", "s-0.tar", 1), ("bad", "s-0.tar", 2), ("c", "s-0.tar", 3),
        ("d", "s-1.tar", 0), ("textonly", "s-1.tar", 1), ("e", "s-1.tar", 2),
    ]  # fmt: skip
    failed = {r["path"]: r["error"] for r in got.rows if r["status"] == "failed"}
    assert failed.keys() == {"bad", "textonly"}
    assert failed["bad"].startswith(f"{shards / 's-0.tar'}:bad.jpg: not an image")
    assert failed["textonly"] == f"{shards / 's-1.tar'}:textonly: the sample has no image member (it has txt)"
    for row in want.rows:
        key = Path(row["path"]).stem
        torch.testing.assert_close(got.tokens(key), want.tokens(row["path"]), atol=1e-5, rtol=0)
    names, pooled = got.pooled()
    assert names == ["a", "b", "c", "d", "e"]
    # Batched otherwise (the failures take batch places): equal to float rounding, not bit for bit.
    torch.testing.assert_close(pooled, want.pooled()[1], atol=1e-5, rtol=0)


def test_pipe_specs_broken_shards_and_resume(shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "broken.tar").write_bytes((shards / "s-1.tar").read_bytes()[:1500])  # cut inside its first sample
    assert main(["extract", "--tar", f"pipe:cat {shards / 's-0.tar'}", *options(tiny_checkpoint, out)]) == EXIT_PARTIAL
    resumed = ["extract", "--tar", f"pipe:cat {shards / 's-0.tar'}", "--tar", str(tmp_path / "broken.tar")]
    assert main([*resumed, *options(tiny_checkpoint, out), "--resume"]) == EXIT_PARTIAL
    rows = ExtractedFeatures.open(out).rows
    assert [r["path"] for r in rows] == ["a", "b", "bad", "c", str(tmp_path / "broken.tar")]
    assert rows[-1]["error"].startswith(f"{tmp_path / 'broken.tar'}: cannot read the tar shard:")


def test_two_ranks_over_tar_shards_equal_one_process(shards, tiny_checkpoint, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    spec = str(shards / "s-{0..1}.tar")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "siglip2_encoder.cli", "extract", "--tar", spec, *options(tiny_checkpoint, tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == EXIT_OK, result.stderr
    assert "2 inputs failed; they are listed in" in result.stderr  # rank 0 names the whole folder's failures
    assert main(["extract", "--tar", spec, *options(tiny_checkpoint, tmp_path / "one")]) == EXIT_PARTIAL
    got, want = ExtractedFeatures.open(tmp_path / "two"), ExtractedFeatures.open(tmp_path / "one")
    manifest = [json.loads(line) for line in (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()]
    assert [r["path"] for r in manifest] == [r["path"] for r in want.rows]
    for row in want.ok:
        assert torch.equal(got.tokens(row["path"]), want.tokens(row["path"]))


def test_tar_and_files_together_are_refused(shards, tiny_checkpoint, tmp_path, caplog):
    assert (
        main(["extract", str(shards / "files"), "--tar", str(shards / "s-0.tar"), *options(tiny_checkpoint, tmp_path)])
        == 2
    )
    assert caplog.messages[-1] == (
        "error: --tar reads tar shards: give either --tar or image files / folders / --file-list, not both"
    )


def test_the_library_takes_a_tar_source_and_refuses_one_bare_path(shards, tiny_checkpoint, tmp_path):
    from siglip2_encoder import ImageProcessor, SigLIP2Encoder
    from siglip2_encoder.pipeline.extract import extract
    from siglip2_encoder.pipeline.settings import ExtractSettings
    from siglip2_encoder.pipeline.sources import TarSource

    model, processor = SigLIP2Encoder.from_pretrained(tiny_checkpoint), ImageProcessor.from_pretrained(tiny_checkpoint)
    settings = ExtractSettings(model=str(tiny_checkpoint), batch_size=2, shard_size=2)
    summary = extract(TarSource([str(shards / "s-{0..1}.tar")]), tmp_path / "tar", model, processor, settings)
    assert (summary.done, summary.failed) == (5, 2)
    files = sorted(str(p) for p in (shards / "files").iterdir())
    extract(files, tmp_path / "files", model, processor, settings)
    got, want = ExtractedFeatures.open(tmp_path / "tar").pooled(), ExtractedFeatures.open(tmp_path / "files").pooled()
    assert got[0] == [Path(p).stem for p in want[0]]
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match=r"^inputs must be a list of paths or an input source, got one path: pass \["):
        extract(files[0], tmp_path / "one", model, processor, settings)


def test_image_caption_pairs_embed_both_and_export_as_clip_retrieval_does(zero_shot_dir, tmp_path, caplog):
    """An image-text checkpoint embeds each sample's caption (txt, or json "caption") beside its image, as
    transformers' get_text_features / get_image_features; export-npy writes img_emb + text_emb + both columns."""
    import pyarrow.parquet as pq
    from test_retrieval import transformers_features

    rng = np.random.default_rng(5)
    captions = {"a": "a red square", "b": "Two dogs", "d": "a café at night"}
    with wds.TarWriter(str(tmp_path / "pairs.tar")) as writer:
        for key in ("a", "b", "c", "d"):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
            sample = {"__key__": key, "png": buffer.getvalue()}
            if key == "d":
                sample["json"] = json.dumps({"caption": captions[key], "width": 32}).encode()
            elif key in captions:
                sample["txt"] = captions[key]
            writer.write(sample)
            (tmp_path / f"{key}.png").write_bytes(sample["png"])
    args = ["extract", "--tar", str(tmp_path / "pairs.tar"), "--model", str(zero_shot_dir), "--batch-size", "2"]
    caplog.set_level("INFO", logger="siglip2_encoder")
    assert main([*args, "-o", str(tmp_path / "out")]) == EXIT_PARTIAL
    assert "embedding each sample's caption with the text tower of" in caplog.text
    store = ExtractedFeatures.open(tmp_path / "out")
    assert [(r["path"], r["status"], r["caption"]) for r in store.rows] == [
        ("a", "ok", "a red square"), ("b", "ok", "Two dogs"), ("c", "failed", None), ("d", "ok", "a café at night")
    ]  # fmt: skip
    assert (
        "pairs.tar:c: the sample has no caption (a txt member, or json with a 'caption'; it has png)"
        in (store.rows[2]["error"])
    )
    texts = [captions[k] for k in "abd"]
    want_text, want_image = transformers_features(zero_shot_dir, texts, [str(tmp_path / f"{k}.png") for k in "abd"])
    caption_features = torch.cat([t for _, t, _ in store.iter_shards("caption_pooled")])
    torch.testing.assert_close(torch.nn.functional.normalize(caption_features, dim=-1), want_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.nn.functional.normalize(store.pooled()[1], dim=-1), want_image, atol=1e-5, rtol=0)

    assert (
        main(["export-npy", "--features", str(tmp_path / "out"), "-o", str(tmp_path / "npy"), "--save-dtype", "fp32"])
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "npy" / "text_emb" / "text_emb_0.npy"), want_text.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "npy" / "img_emb" / "img_emb_0.npy"), want_image.numpy(), atol=1e-5)
    assert pq.read_table(tmp_path / "npy" / "metadata" / "metadata_0.parquet").to_pydict() == {
        "image_path": ["a", "b", "d"], "caption": texts
    }  # fmt: skip

    assert main([*args, "-o", str(tmp_path / "images"), "--no-captions"]) == EXIT_OK  # c's image too, no texts
    assert len(ExtractedFeatures.open(tmp_path / "images").ok) == 4
    assert main([*args, "-o", str(tmp_path / "images"), "--resume"]) == EXIT_FATAL
    changed = "caption_padding_mask: None -> False, captions: False -> True"
    assert f"--resume with other settings than the first run ({changed})" in caplog.text
