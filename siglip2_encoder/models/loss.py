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

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["ring_sigmoid_loss", "sigmoid_loss", "sigmoid_loss_block", "sigmoid_loss_reference"]


def sigmoid_loss_reference(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """The loss of a batch of matching pairs written out whole, as transformers' ``SiglipModel(return_loss=True)``:
    the readable reference the tiled :func:`sigmoid_loss` is tested against. Keeps about 17.5 x B^2 bytes for
    backward (the (B, B) logits and their intermediates)."""
    logits = image_embeds @ text_embeds.T * logit_scale.exp() + logit_bias  # (B, B)
    signs = 2 * torch.eye(len(logits), dtype=logits.dtype, device=logits.device) - 1  # +1 matches, -1 the rest
    return -F.logsigmoid(signs * logits).sum() / len(logits)


def _tiles(rows: int, cols: int, tile: int) -> Iterator[tuple[slice, slice]]:
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            yield slice(i, min(i + tile, rows)), slice(j, min(j + tile, cols))


def _signs(logits: torch.Tensor, rows: slice, cols: slice, diagonal: bool) -> torch.Tensor:
    """+1 where text j matches image i (j == i, with ``diagonal``), -1 elsewhere, for one tile."""
    if not diagonal or rows.stop <= cols.start or cols.stop <= rows.start:  # the tile misses the diagonal
        return -torch.ones_like(logits)
    i = torch.arange(rows.start, rows.stop, device=logits.device)[:, None]
    j = torch.arange(cols.start, cols.stop, device=logits.device)[None, :]
    return torch.where(i == j, 1.0, -1.0).to(logits.dtype)


class _TiledSigmoidLoss(torch.autograd.Function):
    """The summed sigmoid loss of an (images x texts) block, one (tile x tile) piece of the logits at a time, in
    fp32 whatever the inputs' precision. Backward recomputes each tile's logits instead of keeping them: what it
    saves is the two embedding matrices and the two scalars, O(B x D), nothing of size B^2."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, diagonal: bool, tile: int):  # noqa: ANN001
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.diagonal, ctx.tile = diagonal, tile
        scale, bias = logit_scale.float().exp().reshape(()), logit_bias.float().reshape(())
        total = torch.zeros((), dtype=torch.float32, device=image.device)
        for rows, cols in _tiles(len(image), len(text), tile):
            logits = image[rows].float() @ text[cols].float().T * scale + bias
            total += -F.logsigmoid(_signs(logits, rows, cols, diagonal) * logits).sum()
        return total

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        scale, bias = logit_scale.float().exp().reshape(()), logit_bias.float().reshape(())
        grad_image = torch.zeros(image.shape, dtype=torch.float32, device=image.device)
        grad_text = torch.zeros(text.shape, dtype=torch.float32, device=text.device)
        grad_scale = torch.zeros((), dtype=torch.float32, device=image.device)
        grad_bias = torch.zeros((), dtype=torch.float32, device=image.device)
        for rows, cols in _tiles(len(image), len(text), ctx.tile):
            x, y = image[rows].float(), text[cols].float()
            cosine = x @ y.T
            signs = _signs(cosine, rows, cols, ctx.diagonal)
            # d/dlogit of -log sigmoid(s * logit) = -s * sigmoid(-s * logit)
            d_logits = -signs * torch.sigmoid(-signs * (cosine * scale + bias))
            grad_image[rows] += d_logits @ y * scale
            grad_text[cols] += d_logits.T @ x * scale
            grad_scale += (d_logits * cosine).sum() * scale
            grad_bias += d_logits.sum()
        return (
            (grad * grad_image).to(image.dtype),
            (grad * grad_text).to(text.dtype),
            (grad * grad_scale).reshape(logit_scale.shape).to(logit_scale.dtype),
            (grad * grad_bias).reshape(logit_bias.shape).to(logit_bias.dtype),
            None,
            None,
        )


# The tile loop is Python over a batch-dependent number of tiles, which torch.compile would unroll for every batch
# size: the loss runs eagerly inside a compiled model (its two GEMMs per tile are what costs).
@torch.compiler.disable
def sigmoid_loss_block(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    matches_on_diagonal: bool,
    tile: int = 1024,
) -> torch.Tensor:
    """Sum over an (images x texts) block of ``-log sigmoid(z * (exp(logit_scale) * cos + logit_bias))``, computed
    ``tile`` x ``tile`` logits at a time and recomputed in backward (memory O((B + C) x D), not O(B x C)).

    Args:
        image_embeds: (B, D) L2-normalised image features.
        text_embeds: (C, D) L2-normalised text features.
        logit_scale, logit_bias: the model's learnable log-temperature and bias, (1,) each.
        matches_on_diagonal: text i belongs to image i (B == C); False for a block of another device's texts,
            which are all negatives.
        tile: rows and columns of logits computed at once (memory per tile: a few tile^2 fp32 values).

    Returns:
        A scalar, fp32: the block's summed loss (divide by the number of images of the whole batch).
    """
    if matches_on_diagonal and len(image_embeds) != len(text_embeds):
        shape = (len(image_embeds), len(text_embeds))
        raise ValueError(f"a block with matches on its diagonal must be square, got {shape}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got tile={tile!r}")
    return _TiledSigmoidLoss.apply(image_embeds, text_embeds, logit_scale, logit_bias, matches_on_diagonal, tile)


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    tile: int = 1024,
) -> torch.Tensor:
    """The loss of a batch of matching pairs (image i with text i): summed over pairs, divided by the batch size,
    as transformers' ``SiglipModel(..., return_loss=True)``; tiled (see :func:`sigmoid_loss_block`), so the memory
    it keeps for backward grows with B x D, never B^2."""
    block = sigmoid_loss_block(image_embeds, text_embeds, logit_scale, logit_bias, True, tile)
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
