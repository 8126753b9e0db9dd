"""The SigLIP pairwise sigmoid loss (Zhai et al. 2023), written block by block.

Every image-text pair is a binary problem: its logit ``t * cos + b`` should be high for a matching pair and low for
any other. The loss of a batch is the sum over all pairs of ``-log sigmoid(z * logit)`` (z = +1 for matches, -1
otherwise), divided by the number of images.

:func:`sigmoid_loss_block` computes one (images x texts) block. A batch on one device is one block with its matches
on the diagonal (:func:`sigmoid_loss`); across devices, each device adds its own block and then, for every other
device's texts in turn, a block of negatives only (the paper's device-by-device scheme: no all-gather of the full
similarity matrix). The sums are the same either way: :func:`ring_sigmoid_loss` is that scheme on the ranks of a
torch.distributed job, texts passed to the next rank W - 1 times, gradients passed back the other way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["ring_sigmoid_loss", "sigmoid_loss", "sigmoid_loss_block"]


def sigmoid_loss_block(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    matches_on_diagonal: bool,
) -> torch.Tensor:
    """Sum over an (images x texts) block of ``-log sigmoid(z * (exp(logit_scale) * cos + logit_bias))``.

    Args:
        image_embeds: (B, D) L2-normalised image features.
        text_embeds: (C, D) L2-normalised text features.
        logit_scale, logit_bias: the model's learnable log-temperature and bias, (1,) each.
        matches_on_diagonal: text i belongs to image i (B == C); False for a block of another device's texts,
            which are all negatives.

    Returns:
        A scalar: the block's summed loss (divide by the number of images of the whole batch).
    """
    logits = image_embeds @ text_embeds.T * logit_scale.exp() + logit_bias  # (B, C)
    signs = -torch.ones_like(logits)
    if matches_on_diagonal:
        if logits.shape[0] != logits.shape[1]:
            raise ValueError(f"a block with matches on its diagonal must be square, got {tuple(logits.shape)}")
        signs.diagonal().fill_(1.0)
    return -F.logsigmoid(signs * logits).sum()


def sigmoid_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """The loss of a batch of matching pairs (image i with text i): summed over pairs, divided by the batch size,
    as transformers' ``SiglipModel(..., return_loss=True)``."""
    block = sigmoid_loss_block(image_embeds, text_embeds, logit_scale, logit_bias, matches_on_diagonal=True)
    return block / image_embeds.shape[0]


def _exchange(tensor: torch.Tensor, to: int, source: int) -> torch.Tensor:
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), to), dist.P2POp(dist.irecv, received, source)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _check_same_shape(text_embeds: torch.Tensor) -> None:
    """Raise ValueError on every rank unless all ranks hold texts of one shape: the ring's receive buffers take the
    shape of the rank's own texts (gloo aborts on a mismatch; other backends may not notice)."""
    shape = torch.tensor(text_embeds.shape, device=text_embeds.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(other, shapes[0]) for other in shapes):
        found = ", ".join(f"rank {r}: {tuple(other.tolist())}" for r, other in enumerate(shapes))
        raise ValueError(
            f"ring_sigmoid_loss needs the same number of pairs (and width) on every rank, got {found}; give every "
            f"rank an equal share of the batch"
        )


class _PassOn(torch.autograd.Function):
    """Send to the next rank, receive from the previous one; gradients travel back the opposite way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        return _exchange(tensor, (rank + 1) % world, (rank - 1) % world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        return _exchange(grad, (rank - 1) % world, (rank + 1) % world)


def ring_sigmoid_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """The sigmoid loss of the combined batch of every rank's matching pairs, computed device by device.

    Each rank scores its images against its own texts (matches on the diagonal), then against every other rank's
    texts as they come round the ring (negatives only); no rank holds more than two rank-batches of texts, and no
    full similarity matrix exists anywhere. Every rank must hold the same number of pairs (else ValueError).

    Returns:
        This rank's share of the combined loss, times the number of ranks: the ranks' values average to the
        combined batch's loss, and DDP's averaging of gradients then gives exactly the combined batch's gradients
        (tested against :func:`sigmoid_loss` on the whole batch, values and gradients).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        _check_same_shape(text_embeds)
    total = sigmoid_loss_block(image_embeds, text_embeds, logit_scale, logit_bias, matches_on_diagonal=True)
    texts = text_embeds
    for _ in range(world - 1):
        texts = _PassOn.apply(texts)
        total = total + sigmoid_loss_block(image_embeds, texts, logit_scale, logit_bias, matches_on_diagonal=False)
    return total / image_embeds.shape[0]  # = world * total / (world * batch)
