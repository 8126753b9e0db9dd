"""The sigmoid loss's tiles as Triton kernels: the ``"triton"`` backend of :mod:`~siglip2_encoder.models.loss`.

Forward: one kernel per tile computes each (BLOCK_M x BLOCK_N) piece of the cosines over the width in the inputs'
precision with fp32 accumulation (``tl.dot``: bf16 / fp16 tensor cores; fp32 inputs in full fp32, never TF32), adds
the scale and bias and sums ``-log sigmoid`` in registers: no logits are written anywhere, each program writes one
partial sum. Backward: the same kernel recomputes the cosines and writes the tile's d(loss)/d(logits), in the inputs'
precision, with its two partial sums; the gradient's two products (d_logits @ texts, d_logits.T @ images) are
cuBLAS's, in :mod:`~siglip2_encoder.models.loss`. Partial sums are added in a fixed order: the result is the same
from run to run.

Needs CUDA (or Triton's CPU interpreter, ``TRITON_INTERPRET=1``: how the tests check these kernels against the
whole-matrix reference, exactly as written; a GPU compiles the same code).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["compile_tile_kernel", "tile_grads", "tile_sum"]


@triton.jit
def _cosines(
    x_ptr, y_ptr, rows, cols, m, n, width,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32 dot products of image rows ``rows`` with text rows ``cols`` (0 outside the tile)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, width, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * width + ks[None, :], mask=(rows[:, None] < m) & (ks[None, :] < width), other=0.0
        )
        y = tl.load(
            y_ptr + cols[:, None] * width + ks[None, :], mask=(cols[:, None] < n) & (ks[None, :] < width), other=0.0
        )
        if WIDEN:  # bf16 under Triton's CPU interpreter, whose bf16 dot is wrong: fp32 products, exact for bf16
            x, y = x.to(tl.float32), y.to(tl.float32)
        if IEEE:  # fp32 inputs: full precision (tl.dot would take TF32's 10-bit mantissa)
            acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(y), acc)
    return acc


@triton.jit
def _signs(rows, cols, offset, MATCHES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """+1 where text j matches image i (j - i == offset), -1 elsewhere."""
    if MATCHES:
        return tl.where(cols[None, :] - rows[:, None] == offset, 1.0, -1.0)
    return tl.full((BLOCK_M, BLOCK_N), -1.0, tl.float32)


@triton.jit
def _softplus(z):
    """log(1 + exp(z)), stable for any z; log1p written out (log(w) * u / (w - 1), exact where 1 + u rounds)
    because a plain log(1 + u) loses the tiny losses of confident negatives, most of a SigLIP batch."""
    u = tl.exp(-tl.abs(z))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * u / tl.where(w == 1.0, 1.0, w - 1.0))  # no 0 / 0, even unused
    return tl.maximum(z, 0.0) + log1p


# A batch's last tile is smaller and the diagonal's offset moves: one compiled kernel for every size and offset.
@triton.jit(do_not_specialize=["m", "n", "offset"])
def _tile_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, d_ptr, partial_ptr, m, n, width, offset,
    GRADS: tl.constexpr, MATCHES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) piece of a tile: its summed loss into partial_ptr[pid]; with GRADS instead, its
    d(loss)/d(logits) into d_ptr (m, n) and sum(d * cosine), sum(d) into partial_ptr[pid, 0 / 1]."""
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cosine = _cosines(x_ptr, y_ptr, rows, cols, m, n, width, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, WIDEN)
    signs = _signs(rows, cols, offset, MATCHES, BLOCK_M, BLOCK_N)
    logits = cosine * tl.load(scale_ptr) + tl.load(bias_ptr)
    valid = (rows[:, None] < m) & (cols[None, :] < n)
    if GRADS:
        d = tl.where(valid, -signs * tl.sigmoid(-signs * logits), 0.0)  # d/dlogit of -log sigmoid(s * logit)
        tl.store(d_ptr + rows[:, None] * n + cols[None, :], d.to(d_ptr.dtype.element_ty), mask=valid)
        tl.store(partial_ptr + 2 * pid, tl.sum(tl.sum(d * cosine, 1), 0))
        tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.sum(d, 1), 0))
    else:
        loss = _softplus(-signs * logits)  # -log sigmoid(s * logit)
        tl.store(partial_ptr + pid, tl.sum(tl.sum(tl.where(valid, loss, 0.0), 1), 0))


def _launch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Contiguous operands and the launch settings for their precision (tl.dot needs blocks of at least 16)."""
    if x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"the triton loss backend takes fp32, fp16 or bf16 embeddings of one dtype, got {x.dtype} and {y.dtype}"
        )
    if len(x) * len(y) >= 2**31 or max(len(x), len(y)) * x.shape[1] >= 2**31:
        raise ValueError(
            f"the triton loss backend indexes with 32-bit offsets: a tile of {len(x)} x {len(y)} logits of width "
            f"{x.shape[1]} is too large; use tile <= 32768"
        )
    return x.contiguous(), y.contiguous(), _settings(x.dtype)


def _settings(dtype: torch.dtype) -> dict:
    """The kernel's block sizes and precision flags for ``dtype``, with its launch options (tl.dot needs blocks of at
    least 16)."""
    half = dtype != torch.float32
    # Triton's interpreter holds bf16 as uint16 and multiplies those in tl.dot (measured: errors of 1e10)
    widen = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    blocks = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8} if half else {
        "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}  # fmt: skip
    return {**blocks, "IEEE": not half or widen, "WIDEN": widen, "num_stages": 3}


def _run(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int | None, grads: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Launch the kernel over the tile: (d_logits or None, the programs' partial sums)."""
    x, y, settings = _launch(x, y)
    grid = (triton.cdiv(len(x), settings["BLOCK_M"]), triton.cdiv(len(y), settings["BLOCK_N"]))
    partial = torch.empty(grid[0] * grid[1], 2 if grads else 1, dtype=torch.float32, device=x.device)
    d_logits = torch.empty(len(x), len(y), dtype=x.dtype, device=x.device) if grads else partial  # unused: partial
    _tile_kernel[grid](x, y, scale, bias, d_logits, partial, len(x), len(y), x.shape[1], offset or 0, GRADS=grads,
                       MATCHES=offset is not None, **settings)  # fmt: skip
    return (d_logits if grads else None), partial


def tile_sum(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int | None
) -> torch.Tensor:
    """The tile's summed ``-log sigmoid(s * (scale * x @ y.T + bias))``, fp32 0-d.

    Args:
        x: (m, D) images; y: (n, D) texts, one dtype (fp32, fp16 or bf16).
        scale, bias: fp32 0-d tensors on the same device (read by the kernel: no host synchronisation).
        offset: text j matches image i when j - i == offset; None: no match in the tile.
    """
    return _run(x, y, scale, bias, offset, grads=False)[1].sum()


def tile_grads(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile's d(loss)/d(logits), (m, n) in the inputs' dtype, with sum(d * cosine) and sum(d), fp32 0-d (the
    arguments as :func:`tile_sum`'s)."""
    d_logits, partial = _run(x, y, scale, bias, offset, grads=True)
    d_cosine_sum, d_sum = partial.sum(0)
    return d_logits, d_cosine_sum, d_sum


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_tile_kernel(dtype: torch.dtype, *, grads: bool, matches: bool = True, capability: int = 90) -> Any:
    """The tile kernel compiled ahead of time, with the settings a launch on ``dtype`` embeddings uses, for an NVIDIA
    GPU of compute ``capability`` (90: Hopper, 80: Ampere) and a width divisible by 16, on any machine, GPU or not
    (Triton's LLVM and the ptxas its wheel carries). Returns Triton's compiled kernel: ``.asm["ptx"]``,
    ``.asm["cubin"]``, ``.metadata.shared``. How the tests check, without a GPU, that the compiled path builds and
    what it multiplies on."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("TRITON_INTERPRET=1 runs the kernels in Triton's interpreter; unset it to compile them")
    settings = _settings(dtype)
    options = {"num_warps": settings.pop("num_warps"), "num_stages": settings.pop("num_stages")}
    constants = {**settings, "GRADS": grads, "MATCHES": matches}
    names = _tile_kernel.arg_names
    signature = {
        name: "constexpr" if name in constants else f"*{_TRITON_TYPES[dtype]}" if name in ("x_ptr", "y_ptr", "d_ptr")
        else "*fp32" if name.endswith("_ptr") else "i32"
        for name in names
    }  # fmt: skip
    # As a launch specialises them: 16-byte aligned tensors and a width divisible by 16 (768, 1152, ...)
    aligned = {(names.index(k),): [["tt.divisibility", 16]] for k in names if k.endswith("_ptr") or k == "width"}
    constexprs = {(names.index(k),): v for k, v in constants.items()}
    source = ASTSource(_tile_kernel, signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
