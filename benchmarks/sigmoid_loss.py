"""Memory and time of the sigmoid loss, forward + backward, fp32 on the CPU, on the same embeddings: the whole-matrix
reference, the tiled loss, open_clip's ``SigLipLoss`` (the installed release, 3.3.0: the whole matrix) and open_clip's
chunked loss (``chunk_size``, merged on its main branch after 3.3.0, not released: written here from its PR 1145's
description - the logits a chunk of images at a time, autograd keeping every chunk's intermediates); then the ring
per rank at 1 / 2 / 4 ranks (torchrun, gloo), ours and open_clip's ``SigLipLoss(world_size=N)`` (its default
"bidir" exchange). Each case runs in its own process, whose peak resident set above its baseline is the memory
figure (the whole-matrix losses only up to the batch that fits under ~12 GiB).

    python benchmarks/sigmoid_loss.py --batches 4096 16384 --reference-up-to 16384
    python benchmarks/sigmoid_loss.py --batches --ring-batch 4096 --ranks 1 2 4       # the rings only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F


def open_clip_chunked(image, text, scale, bias, chunk: int) -> torch.Tensor:
    """open_clip main's ``SigLipLoss(chunk_size=...)`` as its PR 1145 describes it: the (chunk, B) logits of one
    chunk of images at a time, summed; plain autograd, so every chunk's intermediates stay for backward."""
    total = image.new_zeros(())
    for start in range(0, len(image), chunk):
        logits = image[start : start + chunk] @ text.T * scale.exp() + bias
        labels = -torch.ones_like(logits)
        labels[:, start : start + chunk].diagonal().fill_(1.0)
        total = total - F.logsigmoid(labels * logits).sum()
    return total / len(image)


def case(name: str, batch: int, width: int, tile: int) -> dict:
    """In this process (one rank of a torchrun job for the rings): one warm-up-free forward + backward; seconds and
    peak RSS growth (MiB)."""
    import torch.distributed as dist
    from open_clip.loss import SigLipLoss

    from siglip2_encoder.models.loss import ring_sigmoid_loss, sigmoid_loss, sigmoid_loss_reference

    ring = name.startswith("ring")
    if ring:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ring else (0, 1)
    g = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(batch, width, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, width, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor([2.3], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    losses = {
        "reference": lambda: sigmoid_loss_reference(image, text, scale, bias),
        "tiled": lambda: sigmoid_loss(image, text, scale, bias, tile=tile),
        "open_clip 3.3.0": lambda: SigLipLoss()(image, text, scale.exp(), bias),
        "open_clip chunked": lambda: open_clip_chunked(image, text, scale, bias, tile),
        "ring, ours": lambda: ring_sigmoid_loss(image, text, scale, bias, tile=tile),
        "ring, open_clip": lambda: SigLipLoss(rank=rank, world_size=world)(image, text, scale.exp(), bias),
    }
    if ring:
        dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = losses[name]()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    if ring:
        dist.destroy_process_group()
    return {"loss": name, "batch": batch, "seconds": seconds, "peak_mib": peak, "value": float(loss)}


def run_case(name: str, batch: int, args: argparse.Namespace, ranks: int = 0) -> list[dict]:
    """One case in fresh processes (``ranks`` > 0: a torchrun job); each process's result."""
    launcher = [sys.executable]
    if ranks:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = [*launcher, __file__, "--case", name, str(batch), "--width", str(args.width), "--tile", str(args.tile)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, ranks)))}
    stdout = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--ring-batch", type=int, default=4096, help="pairs per rank in the ring cases")
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4], help="ring sizes (none: no ring cases)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--reference-up-to", type=int, default=16384, help="largest batch the reference runs at")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case[0], int(args.case[1]), args.width, args.tile)))
        return
    print(f"{date.today()}, {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| B | loss | seconds | peak memory (MiB) |\n|---|---|---|---|")
    for batch in args.batches:
        values = {}
        for name in ("reference", "open_clip 3.3.0", "open_clip chunked", "tiled"):
            if name != "tiled" and batch > args.reference_up_to:
                continue
            (result,) = run_case(name, batch, args)
            values[name] = result["value"]
            print(f"| {batch:,} | {name} | {result['seconds']:.2f} | {result['peak_mib']:,.0f} |")
        if max(values.values()) - min(values.values()) > 1e-4 * abs(values["tiled"]):
            raise SystemExit(f"the losses disagree at B = {batch}: {values}")
    if args.ranks:
        print("\n| ranks | loss | pairs per rank | seconds (slowest rank) | peak memory per rank (MiB, largest) |")
        print("|---|---|---|---|---|")
    for ranks in args.ranks:
        for name in ("ring, ours", "ring, open_clip"):
            results = run_case(name, args.ring_batch, args, ranks)
            seconds, peak = max(r["seconds"] for r in results), max(r["peak_mib"] for r in results)
            print(f"| {ranks} | {name} | {args.ring_batch:,} | {seconds:.2f} | {peak:,.0f} |")


if __name__ == "__main__":
    main()
