"""The ``"triton"`` loss backend's kernels, run by Triton's CPU interpreter: values and gradients equal the
whole-matrix reference in the cases tests/test_loss.py checks the torch backend with. Not collected on its own:
tests/test_loss.py runs it in a process with TRITON_INTERPRET=1 (Triton reads it once, when it is imported)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_loss import CASES, check_against_the_reference, check_half, inputs  # noqa: E402

from siglip2_encoder.models.loss import sigmoid_loss  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run with TRITON_INTERPRET=1 (tests/test_loss.py does)")


@pytest.mark.parametrize(("batch", "tile"), CASES)
@pytest.mark.parametrize("bias", [-10.0, 0.0], ids=["bias", "no bias"])
def test_the_triton_kernels_equal_the_reference(batch, tile, bias):
    check_against_the_reference(batch, tile, bias, "triton")


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_half_inputs_accumulate_in_fp32(dtype, tolerance):
    # d(logits) in half precision for the products too: a rounding each. fp16 runs tl.dot on half operands as a GPU
    # does; the interpreter's bf16 dot is widened to fp32 first (see loss_triton._launch)
    check_half("triton", dtype, tolerance)


def test_mixed_dtypes_are_refused():
    image, text, scale, bias = inputs(4)
    message = (
        "^the triton loss backend takes fp32, fp16 or bf16 embeddings of one dtype, got torch.bfloat16 and "
        "torch.float32$"
    )
    with pytest.raises(TypeError, match=message):
        sigmoid_loss(image.bfloat16(), text, scale, bias, backend="triton")
