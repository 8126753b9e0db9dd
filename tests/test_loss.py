"""The tiled sigmoid loss: values and gradients equal the whole-matrix reference (itself equal to transformers'
loss, tests/test_joint.py) for any batch and tile size, fp32 and bf16, and what it keeps for backward grows with
B x D, never B^2 (counted with autograd's saved-tensor hooks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from siglip2_encoder.models.loss import sigmoid_loss, sigmoid_loss_reference


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


@pytest.mark.parametrize(("batch", "tile"), [(1, 1), (7, 3), (7, 7), (64, 16), (64, 24), (1000, 256), (1000, 1024)])
@pytest.mark.parametrize("bias", [-10.0, 0.0], ids=["bias", "no bias"])
def test_values_and_gradients_equal_the_reference(batch, tile, bias):
    args = inputs(batch, bias=bias)
    want, want_grads = value_and_grads(sigmoid_loss_reference, *args)
    got, got_grads = value_and_grads(sigmoid_loss, *args, tile=tile)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_bf16_inputs_accumulate_in_fp32():
    args = inputs(300, width=32, dtype=torch.bfloat16)
    got, grads = value_and_grads(sigmoid_loss, *args, tile=128)
    exact = [a.detach().float().requires_grad_() for a in args]  # the same bf16 values, computed in fp32
    want, want_grads = value_and_grads(sigmoid_loss_reference, *exact)
    assert got.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32 accumulation: no bf16 error in the value
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.float(), w, atol=1e-2, rtol=1e-2)  # rounded to bf16 once, at the end


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
