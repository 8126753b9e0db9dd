"""Scaling of `extract` with the number of processes (torchrun), and the cost of the final merge.

    python benchmarks/scaling.py                                   # 1 and 2 processes (the 2-core VM)
    python benchmarks/scaling.py --procs 1 2 4 8 --device cuda     # on a bigger machine

Every run extracts the same generated images with the same random-weight tower (siglip2-base-patch16-224, pooled
features) into a fresh folder. With P processes each gets cores / P threads (OMP_NUM_THREADS), as torchrun would,
so 1 process uses all cores and P processes share them. Throughput counts images over the wall time of the whole
command (model loading and process start included) and over the extraction itself (the slowest rank's, from its
summary line). "vs 1 process" is the rate over the 1-process rate: where the processes share one machine's cores
that is the whole gain (linear would be 1.00x); on P devices linear would be P x. The merge benchmark times what
rank 0 does after the last block: read every shard's rows, sort them into input order, write manifest.jsonl, for
1M rows in 1,000 shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from siglip2_encoder.pipeline.store import ShardWriter, read_rows, write_manifest


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = rng.integers(180, 400, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def run_extract(images: Path, output: Path, procs: int, device: str, batch: int) -> tuple[float, float]:
    """(wall seconds of the command, seconds of the slowest rank's extraction)."""
    threads = max(1, (os.cpu_count() or 1) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cli = ["-m", "siglip2_encoder.cli", "extract", str(images), "-o", str(output), "--random-weights"]
    cli += ["siglip2-base-patch16-224", "--batch-size", str(batch), "--shard-size", str(4 * batch), "--workers", "1"]
    cli += ["--device", device]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *cli]
    else:
        command = [sys.executable, *cli]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    seconds = [float(s) for s in re.findall(r"done \d+, .*?, ([\d.]+) s,", result.stderr)]
    return wall, max(seconds)


def merge_seconds(rows: int, shards: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        writer = ShardWriter(path, torch.float16)
        per = rows // shards
        for s in range(shards):
            block = [
                {"path": f"/data/images/{s:05d}/{i:06d}.jpg", "status": "ok", "error": None, "shard": None, "row": None}
                for i in range(per)
            ]
            writer.write(block, [{"pooled": torch.zeros(4)} for _ in block], s)
        order = {row["path"]: i for i, row in enumerate(read_rows(path))}
        started = time.perf_counter()
        merged = read_rows(path)
        write_manifest(path, sorted(merged, key=lambda r: order[r["path"]]))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--merge-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images"
        images.mkdir()
        make_images(images, args.images)
        base = None
        print("| processes | threads each | wall s | images/s (wall) | extraction s | images/s | vs 1 process |")
        print("|---|---|---|---|---|---|---|")
        for procs in args.procs:
            wall, extraction = run_extract(images, Path(folder) / f"out{procs}", procs, args.device, args.batch_size)
            rate = args.images / extraction
            base = base or rate
            threads = max(1, (os.cpu_count() or 1) // procs)
            print(
                f"| {procs} | {threads} | {wall:.1f} | {args.images / wall:.2f} | {extraction:.1f} | {rate:.2f} | "
                f"{rate / base:.2f}x |"
            )
            manifest = (Path(folder) / f"out{procs}" / "manifest.jsonl").read_text().splitlines()
            assert len(manifest) == args.images and all(json.loads(r)["status"] == "ok" for r in manifest)
    print(f"merge of {args.merge_rows:,} rows in 1,000 shards: {merge_seconds(args.merge_rows, 1000):.2f} s")


if __name__ == "__main__":
    main()
