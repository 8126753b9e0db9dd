"""The sigmoid loss on a GPU, forward + backward, on the same embeddings: peak memory and time of the whole-matrix
reference, the tiled loss with each tile backend (``torch``: fp32 products; ``triton``: the kernels of
``models/loss_triton.py``, bf16 products), and siglip-kernel's ``fused_siglip_loss`` (its default routing) when it
is importable - a pure-Python wheel carried to the device (``benchmarks/gpu/fetch_wheels.sh``; ``run.sh`` unpacks
it). Then the same losses at a smaller batch against the fp32 reference: the loss's and gradients' largest errors.

    python benchmarks/gpu/loss.py --device cuda --dtype bf16 --batch 65536 --check-batch 8192
    TRITON_INTERPRET=1 python benchmarks/gpu/loss.py --device cpu --dtype fp32 --batch 256 --check-batch 64 \\
        --width 32 --tile 64 --repeats 1       # the dry run: Triton's interpreter on the CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from siglip2_encoder.models.loss import select_loss_backend, sigmoid_loss, sigmoid_loss_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def embeddings(batch: int, width: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Matching L2-normalised pairs and SigLIP's initial log-temperature and bias (fp32 scalars), with gradients."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, width, generator=g), dim=-1)
    text = F.normalize(image + torch.randn(batch, width, generator=g), dim=-1)
    scalars = torch.tensor(2.3026), torch.tensor(-10.0)  # log(10), -10
    return [t.to(device, dtype if t.dim() else torch.float32).requires_grad_() for t in (image, text, *scalars)]


def losses(tile: int, device: str) -> dict[str, Loss]:
    found: dict[str, Loss] = {"reference (whole matrix)": sigmoid_loss_reference}
    for backend in ("torch", "triton"):
        try:
            select_loss_backend(backend, torch.device(device))
        except ValueError as error:
            print(f"- tiled, {backend}: not run ({error})")
            continue
        found[f"tiled {tile}, {backend}"] = lambda *a, b=backend: sigmoid_loss(*a, tile=tile, backend=b)
    if importlib.util.find_spec("siglip_kernel") is None or device != "cuda":
        print(
            "- siglip-kernel: not run (needs the siglip_kernel package, from benchmarks/gpu/fetch_wheels.sh, and CUDA)"
        )
    else:
        from siglip_kernel import fused_siglip_loss

        found["siglip-kernel (auto)"] = lambda i, t, s, b: fused_siglip_loss(i, t, s.reshape(()), b.reshape(()))
    return found


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(loss: Loss, inputs: list[torch.Tensor], device: str, repeats: int) -> tuple[float, float | None]:
    """Median seconds of forward + backward, and the peak CUDA memory above the inputs, MiB (None on the CPU)."""
    seconds = []
    for _ in range(repeats + 1):  # the first run compiles the kernels
        for t in inputs:
            t.grad = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        sync(device)
        start = time.perf_counter()
        loss(*inputs).backward()
        sync(device)
        seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    return statistics.median(seconds[1:]), peak


def errors(loss: Loss, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """The loss's relative error and the gradients' largest error relative to their largest value, against the
    fp32 reference on the same values."""
    exact = [t.detach().float().requires_grad_() for t in inputs]
    want = sigmoid_loss_reference(*exact)
    want_grads = torch.autograd.grad(want, exact)
    got = loss(*inputs)
    got_grads = torch.autograd.grad(got, inputs)
    grad_error = max(
        ((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(got_grads, want_grads)
    )
    return abs(got.item() - want.item()) / abs(want.item()), grad_error


def failed(error: Exception) -> str:
    """A table cell: the error's type and the first line of its message."""
    return f"failed: {type(error).__name__}: {error}".splitlines()[0][:160].replace("|", "/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--check-batch", type=int, default=8192)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tile", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-up-to", type=int, default=65536, help="largest batch for the whole matrix")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"# The sigmoid loss, forward + backward, {args.dtype}, D = {args.width}, on {args.device}\n")
    found = losses(args.tile, args.device)
    print(
        f"\n| loss | B = {args.batch:,}: ms | peak MiB | B = {args.check_batch:,}: loss rel. error | grad rel. error |"
    )
    print("|---|---|---|---|---|")
    big = embeddings(args.batch, args.width, dtype, args.device)
    small = embeddings(args.check_batch, args.width, dtype, args.device, seed=1)
    status = 0
    for name, loss in found.items():
        # One device call runs every row: a row that fails (out of memory, a peer's kernel that does not build on
        # this Triton) says why in its cells, the next row still runs, and the exit status is 1.
        try:
            if name.startswith("reference") and args.batch > args.reference_up_to:
                timing = "not run (--reference-up-to) | -"
            else:
                seconds, peak = measure(loss, big, args.device, args.repeats)
                timing = f"{seconds * 1e3:,.1f} | {'-' if peak is None else f'{peak:,.0f}'}"
        except Exception as error:
            timing, status = f"{failed(error)} | -", 1
        try:
            loss_error, grad_error = errors(loss, small)
            checked = f"{loss_error:.1e} | {grad_error:.1e}"
        except Exception as error:
            checked, status = f"{failed(error)} | -", 1
        for t in big + small:
            t.grad = None
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"| {name} | {timing} | {checked} |", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
