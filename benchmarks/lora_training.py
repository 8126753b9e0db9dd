"""Training-step time and peak memory: LoRA vs full fine-tuning, with and without gradient checkpointing.

    python benchmarks/lora_training.py                      # SigLIP 2 B/16-224, batch 8, CPU
    python benchmarks/lora_training.py --preset siglip2-so400m-patch14-384 --device cuda --batch-size 32

Each setting runs in a fresh subprocess, so its peak memory is its own: peak resident memory (CPU) or
``torch.cuda.max_memory_allocated`` (GPU), and the bytes autograd saved for the backward pass of one step.
A step = forward (pooled features), a cross-entropy loss on a linear head, backward, AdamW update.
Random weights: time and memory do not depend on the values.
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

SETTINGS = [("full", False), ("full", True), ("lora", False), ("lora", True)]


def run_one(args: argparse.Namespace) -> dict:
    from siglip2_encoder import SigLIP2Encoder
    from siglip2_encoder.models.lora import EncoderLoRAConfig, add_lora, trainable_parameters

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = SigLIP2Encoder.from_preset(args.preset).to(device)
    if args.mode == "lora":
        model = add_lora(
            model, EncoderLoRAConfig(r=16, modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
        )
    base = model.get_base_model() if args.mode == "lora" else model
    if args.checkpointing:
        base.gradient_checkpointing_enable()
    model.train()
    head = torch.nn.Linear(base.config.hidden_size, 10).to(device)
    optimizer = torch.optim.AdamW([p for p in [*model.parameters(), *head.parameters()] if p.requires_grad], lr=1e-4)
    size = base.config.image_size
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    def step(count_saved: bool = False) -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved else _null():
            loss = torch.nn.functional.cross_entropy(head(model(x).pooler_output), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(count_saved=True)  # warm-up, and one count of saved activations
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    trainable, total = trainable_parameters(model)
    return {
        "step_s": sorted(times)[len(times) // 2],
        "peak_mib": peak / 2**20,
        "saved_mib": saved / 2**20,
        "trainable": trainable,
        "total": total,
    }


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-base-patch16-224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # set for the subprocesses
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_one(args)))
        return

    rows = []
    for mode, checkpointing in SETTINGS:
        command = [
            sys.executable,
            __file__,
            "--preset",
            args.preset,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--mode",
            mode,
        ]
        command += ["--checkpointing"] if checkpointing else []
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append((mode, checkpointing, result))
        print(f"{mode:5s} checkpointing={checkpointing!s:5s} {result}", file=sys.stderr)

    full = rows[0][2]
    memory = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak resident memory (process)"
    lines = [
        f"### LoRA vs full fine-tuning: {args.preset}, batch {args.batch_size}, {args.device}",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. LoRA: r=16 on q, k, v, out, fc1, fc2 of every layer. Median of {args.steps} "
        f"steps after one warm-up step. Memory: {memory}; saved = activations autograd keeps for backward.",
        "",
        "| setting | trainable params | step time (s) | vs full | peak memory (MiB) | saved activations (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, checkpointing, r in rows:
        name = f"{'LoRA' if mode == 'lora' else 'full fine-tuning'}{' + checkpointing' if checkpointing else ''}"
        lines.append(
            f"| {name} | {r['trainable'] / 1e6:.2f} M of {r['total'] / 1e6:.1f} M | {r['step_s']:.2f} | "
            f"{r['step_s'] / full['step_s']:.2f}x | {r['peak_mib']:.0f} | {r['saved_mib']:.0f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
