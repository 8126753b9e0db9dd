"""The ``"triton"`` loss backend's kernels, run by Triton's CPU interpreter: values and gradients equal the
whole-matrix reference in the cases tests/test_loss.py checks the torch backend with. Not collected on its own:
tests/test_loss.py runs it in a process with TRITON_INTERPRET=1 (Triton reads it once, when it is imported)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loss import CASES, check_against_the_reference, check_bf16, inputs  # noqa: E402

from siglip2_encoder.models.loss import sigmoid_loss  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run with TRITON_INTERPRET=1 (tests/test_loss.py does)")


@pytest.mark.parametrize(("batch", "tile"), CASES)
@pytest.mark.parametrize("bias", [-10.0, 0.0], ids=["bias", "no bias"])
def test_the_triton_kernels_equal_the_reference(batch, tile, bias):
    check_against_the_reference(batch, tile, bias, "triton")


def test_bf16_inputs_accumulate_in_fp32():
    check_bf16("triton", 1e-2)  # d(logits) in bf16 for the products too: a bf16 rounding each


def test_mixed_dtypes_are_refused():
    image, text, scale, bias = inputs(4)
    message = (
        "^the triton loss backend takes fp32, fp16 or bf16 embeddings of one dtype, got torch.bfloat16 and "
        "torch.float32$"
    )
    with pytest.raises(TypeError, match=message):
        sigmoid_loss(image.bfloat16(), text, scale, bias, backend="triton")
