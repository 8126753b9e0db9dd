"""Extraction by several processes under torchrun (gloo on CPU, launched by the tests): the folder equals a
single-process run's, a killed rank loses only its uncommitted block, and a resume may use another number of
ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from siglip2_encoder import ExtractedFeatures

# A rank that SIGKILLs itself right after committing its first shard, under torchrun.
KILLING_RANK = """
import os, signal, sys
from siglip2_encoder import cli
from siglip2_encoder.pipeline import store

commit = store.ShardWriter.write

def write(self, rows, features, index=None):
    commit(self, rows, features, index)
    if os.environ.get("RANK") == os.environ["KILL_RANK"]:
        os.kill(os.getpid(), signal.SIGKILL)

store.ShardWriter.write = write
sys.exit(cli.main(sys.argv[1:]))
"""


def run(args: list[str], nproc: int, script: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``siglip2-encoder ARGS`` in one process, or under torchrun with ``nproc`` processes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    target = [str(script)] if script else ["-m", "siglip2_encoder.cli"]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]
    else:
        command = [sys.executable, *target]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def many(photos, tmp_path_factory) -> Path:
    """14 image files: 7 blocks of 2."""
    folder = tmp_path_factory.mktemp("many")
    for i, path in enumerate(photos * 2 + photos[:2]):
        (folder / f"{i:02d}.png").write_bytes(Path(path).read_bytes())
    return folder


def options(many: Path, checkpoint: Path, output: Path) -> list[str]:
    return [
        "extract",
        str(many),
        "--model",
        str(checkpoint),
        "--tokens",
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--workers",
        "1",
        "-o",
        str(output),
    ]


def assert_same_features(got: ExtractedFeatures, want: ExtractedFeatures) -> None:
    assert [r["path"] for r in got.rows] == [r["path"] for r in want.rows]
    for row in want.rows:
        assert torch.equal(got.tokens(row["path"]), want.tokens(row["path"]))
    assert torch.equal(got.pooled()[1], want.pooled()[1])


@pytest.fixture(scope="module")
def reference(many, tiny_checkpoint, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "out"
    result = run(options(many, tiny_checkpoint, output), nproc=1)
    assert result.returncode == 0, result.stderr
    return output


def test_two_ranks_write_the_folder_one_process_writes(many, tiny_checkpoint, reference, tmp_path):
    output = tmp_path / "two"
    result = run(options(many, tiny_checkpoint, output), nproc=2)
    assert result.returncode == 0, result.stderr
    assert "rank 1 of 2" in result.stderr
    shards = sorted(p.name for p in reference.glob("shard-*"))
    assert sorted(p.name for p in output.glob("shard-*")) == shards and len(shards) == 14
    for name in shards:
        if name.endswith(".safetensors"):  # byte for byte: the same tensors in the same shards
            want, got = load_file(reference / name), load_file(output / name)
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        else:
            assert (output / name).read_text() == (reference / name).read_text()
    assert (output / "manifest.jsonl").read_text() == (reference / "manifest.jsonl").read_text()
    assert_same_features(ExtractedFeatures.open(output), ExtractedFeatures.open(reference))


@pytest.mark.parametrize("resume_ranks", [1, 2, 3])
def test_a_killed_rank_loses_only_its_block_and_a_resume_may_change_the_ranks(
    many, tiny_checkpoint, reference, tmp_path, resume_ranks
):
    output = tmp_path / "killed"
    script = tmp_path / "killing.py"
    script.write_text(KILLING_RANK)
    killed = run(options(many, tiny_checkpoint, output), nproc=2, script=script, KILL_RANK="1")
    assert killed.returncode != 0
    committed = {p.name: p.read_bytes() for p in output.glob("shard-*.jsonl")}
    assert "shard-00001.jsonl" in committed  # rank 1's first block, committed before it died
    features = {p.name: p.stat().st_mtime_ns for p in output.glob("shard-*.safetensors")}

    resumed = run([*options(many, tiny_checkpoint, output), "--resume"], nproc=resume_ranks)
    assert resumed.returncode == 0, resumed.stderr
    done = sum(len(b.decode().splitlines()) for b in committed.values())
    assert f"skipped {done}" in resumed.stderr  # each rank skips what was committed
    for name, record in committed.items():  # nothing committed was redone or rewritten
        assert (output / name).read_bytes() == record
        safetensors = name.replace(".jsonl", ".safetensors")
        if safetensors in features:
            assert (output / safetensors).stat().st_mtime_ns == features[safetensors]
    got = ExtractedFeatures.open(output)
    assert len(got.rows) == 14 and not list(output.glob(".*.tmp"))
    assert_same_features(got, ExtractedFeatures.open(reference))
    manifest = [json.loads(line)["path"] for line in (output / "manifest.jsonl").read_text().splitlines()]
    assert manifest == sorted(manifest)  # input order, though the resumed shards are numbered after the others


def test_ranks_given_different_inputs_are_refused(many, tiny_checkpoint, tmp_path):
    script = tmp_path / "uneven.py"
    script.write_text(
        "import os, sys\nfrom siglip2_encoder import cli\n"
        "args = sys.argv[1:]\nif os.environ['RANK'] == '1':\n    args[1] = args[1] + '/00.png'\n"
        "sys.exit(cli.main(args))\n"
    )
    result = run(options(many, tiny_checkpoint, tmp_path / "out"), nproc=2, script=script)
    assert result.returncode != 0
    assert "the ranks see different inputs (rank 0: 14, rank 1: 1)" in result.stderr


def test_a_batch_is_shared_round_robin_and_one_process_keeps_it_all():
    from siglip2_encoder.pipeline.distributed import Ranks

    batch = list(range(7))
    assert [Ranks(rank, 3).share(batch) for rank in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Ranks().share(batch) == batch
    assert Ranks().mean(torch.tensor([2.5], requires_grad=True)) == Ranks().sum(torch.tensor(2.5)) == 2.5


def test_a_batch_smaller_than_the_ranks_is_refused():
    from siglip2_encoder.pipeline.distributed import Ranks

    with pytest.raises(ValueError) as error:
        Ranks(0, 4).share([1, 2, 3], "batch of pairs")
    assert str(error.value) == (
        "a batch of pairs of 3 cannot be shared by 4 ranks (each needs at least one item); make it at least 4 or "
        "launch fewer processes"
    )
