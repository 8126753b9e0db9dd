"""Memory and time of the sigmoid loss, forward + backward, fp32 on the CPU: the whole-matrix reference against the
tiled loss, on the same embeddings. Each case runs in its own process, whose peak resident set above its baseline
is the memory figure (the reference is run only up to the batch that fits under ~12 GiB).

    python benchmarks/sigmoid_loss.py --batches 4096 16384 --reference-up-to 16384
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F


def case(name: str, batch: int, width: int, tile: int) -> dict:
    """In this process: one warm-up-free forward + backward; seconds and peak RSS growth (MiB)."""
    from siglip2_encoder.models.loss import sigmoid_loss, sigmoid_loss_reference

    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, width, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, width, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor([2.3], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if name == "reference":
        loss = sigmoid_loss_reference(image, text, scale, bias)
    else:
        loss = sigmoid_loss(image, text, scale, bias, tile=tile)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"loss": name, "batch": batch, "seconds": seconds, "peak_mib": peak, "value": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--reference-up-to", type=int, default=16384, help="largest batch the reference runs at")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: run one case here
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case[0], int(args.case[1]), args.width, args.tile)))
        return
    print(f"{date.today()}, {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| B | loss | seconds | peak memory (MiB) |\n|---|---|---|---|")
    for batch in args.batches:
        for name in ("reference", "tiled"):
            if name == "reference" and batch > args.reference_up_to:
                continue
            command = [sys.executable, __file__, "--case", name, str(batch), "--width", str(args.width)]
            result = json.loads(subprocess.run(command + ["--tile", str(args.tile)], capture_output=True, text=True,
                                               check=True).stdout)  # fmt: skip
            print(f"| {batch} | {name} | {result['seconds']:.2f} | {result['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
