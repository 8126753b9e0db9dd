"""The tiled sigmoid loss: values and gradients equal the whole-matrix reference (itself equal to transformers'
loss, tests/test_joint.py) for any batch and tile size, fp32 and bf16, with either tile backend (the Triton kernels
run by Triton's CPU interpreter here), and what it keeps for backward grows with B x D, never B^2 (counted with
autograd's saved-tensor hooks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F
from conftest import triton_interpreter_refusal

from siglip2_encoder.models.loss import select_loss_backend, sigmoid_loss, sigmoid_loss_reference


def inputs(batch: int, width: int = 16, seed: int = 0, bias: float = -10.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, width, generator=g), dim=-1).to(dtype).requires_grad_()
    text = F.normalize(torch.randn(batch, width, generator=g) + image.detach().float(), dim=-1).to(dtype)
    scale = torch.tensor([2.3], dtype=dtype, requires_grad=True)
    return image, text.requires_grad_(), scale, torch.tensor([bias], dtype=dtype, requires_grad=True)


def value_and_grads(loss_fn, image, text, scale, bias, **kwargs):
    loss = loss_fn(image, text, scale, bias, **kwargs)
    grads = torch.autograd.grad(loss, (image, text, scale, bias))
    return loss.detach(), grads


CASES = [(1, 1), (7, 3), (7, 7), (64, 16), (64, 24), (1000, 256), (1000, 1024)]


def check_against_the_reference(batch, tile, bias, backend):
    args = inputs(batch, bias=bias)
    want, want_grads = value_and_grads(sigmoid_loss_reference, *args)
    got, got_grads = value_and_grads(sigmoid_loss, *args, tile=tile, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("batch", "tile"), CASES)
@pytest.mark.parametrize("bias", [-10.0, 0.0], ids=["bias", "no bias"])
def test_values_and_gradients_equal_the_reference(batch, tile, bias):
    check_against_the_reference(batch, tile, bias, "torch")


def check_half(backend: str, dtype: torch.dtype, grad_tolerance: float):
    args = inputs(300, width=32, dtype=dtype)
    got, grads = value_and_grads(sigmoid_loss, *args, tile=128, backend=backend)
    exact = [a.detach().float().requires_grad_() for a in args]  # the same half values, computed in fp32
    want, want_grads = value_and_grads(sigmoid_loss_reference, *exact)
    assert got.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32 accumulation: no half error in the value
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.float(), w, atol=grad_tolerance, rtol=grad_tolerance)


def test_bf16_inputs_accumulate_in_fp32():
    check_half("torch", torch.bfloat16, 1e-2)  # rounded to bf16 once, at the end


def test_the_triton_kernels_run_by_tritons_interpreter_equal_the_reference():
    """tests/triton_interpreted.py in a process of its own: Triton reads TRITON_INTERPRET once, when it is imported."""
    if reason := triton_interpreter_refusal():
        pytest.skip(f"the triton loss backend {reason}")
    script = Path(__file__).with_name("triton_interpreted.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)], capture_output=True, text=True,
        timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert f"{2 * len(CASES) + 3} passed" in result.stdout, result.stdout[-2000:]


def test_loss_backends_refuse_what_they_cannot_run(monkeypatch):
    args = inputs(4)
    with pytest.raises(ValueError, match="^unknown loss backend 'cuda'; choose one of torch, triton$"):
        sigmoid_loss(*args, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = (
        "loss backend 'triton' needs a CUDA device, got cpu (TRITON_INTERPRET=1 runs it on the CPU, slowly, for "
        "tests); use backend='torch'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        select_loss_backend("triton", torch.device("cpu"))
    from siglip2_encoder.models import loss_triton

    rows = torch.zeros(46341, 1)  # 46341^2 > 2^31
    message = (
        "^the triton loss backend indexes with 32-bit offsets: a tile of 46341 x 46341 logits of width 1 is too "
        "large; use tile <= 32768$"
    )
    with pytest.raises(ValueError, match=message):
        loss_triton.tile_sum(rows, rows, torch.tensor(1.0), torch.tensor(0.0), None)


def test_the_triton_backend_refuses_an_interpreter_that_cannot_run_it(monkeypatch):
    """Triton < 3.7's CPU interpreter under NumPy >= 2.5 stops in the kernels' first loop: refused before, naming
    both versions. (Nothing here imports triton: the kernels must not be decorated under TRITON_INTERPRET=1.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(numpy, "__version__", "2.5.0")
    installed = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "3.6.0" if name == "triton" else installed(name))
    message = (
        "loss backend 'triton' under TRITON_INTERPRET=1 needs triton >= 3.7 or numpy < 2.5 (installed: triton 3.6.0, "
        "numpy 2.5.0; older interpreters cannot run under NumPy 2.5); use backend='torch'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        select_loss_backend("triton", torch.device("cpu"))
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert select_loss_backend("triton", torch.device("cpu")).name == "triton"


def saved_bytes(loss_fn, *args, **kwargs) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(*args, **kwargs)
    return total


def test_memory_kept_for_backward_has_no_batch_squared_term():
    batch, width = 4096, 768
    args = inputs(batch, width=width)
    bound = 2 * batch * width * 4 + 4096  # the two embedding matrices and the scalars
    assert saved_bytes(sigmoid_loss, *args) <= bound
    assert saved_bytes(sigmoid_loss_reference, *args) > 4 * batch * batch * 4  # the test can fail: B^2 terms
    with pytest.raises(ValueError, match="tile must be a positive int, got tile=0"):
        sigmoid_loss(*args, tile=0)


@pytest.mark.parametrize(
    ("dtype", "capability", "multiplier"),
    [(torch.bfloat16, 90, "wgmma.mma_async"), (torch.float16, 80, "mma.sync"), (torch.float32, 90, None)],
    ids=["bf16-hopper", "fp16-ampere", "fp32-hopper"],
)
@pytest.mark.parametrize("grads", [False, True], ids=["forward", "backward"])
def test_the_triton_kernels_compile_for_hopper_and_ampere(dtype, capability, multiplier, grads, tmp_path):
    """Compiled here as a launch would on a GPU (Triton's LLVM and the ptxas its wheel carries): the compiled path
    builds, half products run on tensor cores with fp32 accumulation, fp32 ones in full fp32 (no TF32), the loads are
    pipelined, and nothing spills from registers."""
    import triton

    from siglip2_encoder.models.loss_triton import compile_tile_kernel

    kernel = compile_tile_kernel(dtype, grads=grads, capability=capability)
    ptx = kernel.asm["ptx"]
    if multiplier is None:
        assert "mma" not in ptx and "tf32" not in ptx
    else:
        operand = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
        assert multiplier in ptx and f".f32.{operand}.{operand}" in ptx
    assert "cp.async" in ptx and kernel.metadata.shared <= 160 * 1024  # fits an A100's shared memory too
    (tmp_path / "kernel.ptx").write_text(ptx)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    info = subprocess.run(
        [str(ptxas), "-arch", arch, "-v", str(tmp_path / "kernel.ptx"), "-o", str(tmp_path / "kernel.cubin")],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    assert "0 bytes spill stores, 0 bytes spill loads" in info, info
