"""The SigLIP pairwise sigmoid loss (Zhai et al. 2023), written block by block.

Every image-text pair is a binary problem: its logit ``t * cos + b`` should be high for a matching pair and low for
any other. The loss of a batch is the sum over all pairs of ``-log sigmoid(z * logit)`` (z = +1 for matches, -1
otherwise), divided by the number of images.

:func:`sigmoid_loss_block` computes one (images x texts) block. A batch on one device is one block with its matches
on the diagonal (:func:`sigmoid_loss`); across devices, each device adds its own block and then, for every other
device's texts in turn, a block of negatives only (the paper's device-by-device scheme: no all-gather of the full
similarity matrix). The sums are the same either way: :func:`ring_sigmoid_loss` is that scheme on the ranks of a
torch.distributed job, texts passed to the next rank W - 1 times, and again in backward with their gradients.

Both compute the logits in tiles and recompute them in backward (autograd Functions): what they keep for backward
is the embeddings and two scalars, O(B x D) per rank, never B^2 and never more with more ranks.
:func:`sigmoid_loss_reference` is the whole-matrix form, the readable reference the tests compare with.

What one tile computes comes from a registry of :class:`LossBackend` s, as attention's kernels do (``backend=``):

* ``"torch"``: fp32 matrix products and element-wise ops (the default; any device).
* ``"triton"``: one Triton kernel per tile for the logits and the loss (forward) or the logits' gradient (backward),
  the products in the inputs' precision with fp32 accumulation (bf16 tensor cores); the gradient's two products are
  cuBLAS's (:mod:`~siglip2_encoder.models.loss_triton`). Needs CUDA and triton, or Triton's CPU interpreter
  (``TRITON_INTERPRET=1``), which is how it is tested here.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

import numpy
import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "LOSS_BACKENDS",
    "LossBackend",
    "loss_backend_names",
    "register_loss_backend",
    "ring_sigmoid_loss",
    "select_loss_backend",
    "sigmoid_loss",
    "sigmoid_loss_block",
    "sigmoid_loss_reference",
]


def sigmoid_loss_reference(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """The loss of a batch of matching pairs written out whole, as transformers' ``SiglipModel(return_loss=True)``:
    the readable reference the tiled :func:`sigmoid_loss` is tested against. Keeps about 17.5 x B^2 bytes for
    backward (the (B, B) logits and their intermediates)."""
    logits = image_embeds @ text_embeds.T * logit_scale.exp() + logit_bias  # (B, B)
    signs = 2 * torch.eye(len(logits), dtype=logits.dtype, device=logits.device) - 1  # +1 matches, -1 the rest
    return -F.logsigmoid(signs * logits).sum() / len(logits)


def _check_tile(tile: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got tile={tile!r}")


def _tiles(rows: int, cols: int, tile: int) -> Iterator[tuple[slice, slice]]:
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            yield slice(i, min(i + tile, rows)), slice(j, min(j + tile, cols))


def _scalars(logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(logit_scale) and logit_bias as fp32 0-d tensors."""
    return logit_scale.float().exp().reshape(()), logit_bias.float().reshape(())


# One tile: images x (m, D), texts y (n, D), the fp32 0-d scale (exp of logit_scale) and bias, and where the matches
# lie: text j matches image i when j - i == offset, no match in the tile when offset is None.
TileSum = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int | None], torch.Tensor]
# -> (d_logits (m, n), sum(d_logits * cosine), sum(d_logits)): the tile's loss differentiated by its logits.
TileGrads = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int | None],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True)
class LossBackend:
    """How one (images x texts) tile of the sigmoid loss is computed; the tile loop, the recomputation in backward
    and the ring are the same for every backend.

    Attributes:
        name: the registry key, the ``backend=`` of :func:`sigmoid_loss` and :func:`ring_sigmoid_loss`.
        tile_sum: the tile's summed loss, an fp32 0-d tensor.
        tile_grads: the tile's d(loss)/d(logits) (fp32, or the inputs' half precision for half-precision products)
            with its sums weighted by the cosines and plain, both fp32 0-d tensors.
        cuda_only: runs on CUDA tensors only (or on the CPU under Triton's interpreter, ``TRITON_INTERPRET=1``).
        module: a module that must be importable, and how to get it.
        check: a further reason the backend cannot run on a device (installed versions, say), or None if it can.
    """

    name: str
    tile_sum: TileSum
    tile_grads: TileGrads
    cuda_only: bool = False
    module: tuple[str, str] | None = None
    check: Callable[[torch.device], str | None] | None = None

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``, or None if it can."""
        if self.module is not None and importlib.util.find_spec(self.module[0]) is None:
            return f"needs {self.module[0]} ({self.module[1]})"
        if self.cuda_only and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"needs a CUDA device, got {device.type} (TRITON_INTERPRET=1 runs it on the CPU, slowly, for tests)"
        return None if self.check is None else self.check(device)


LOSS_BACKENDS: dict[str, LossBackend] = {}


def register_loss_backend(backend: LossBackend) -> LossBackend:
    """Make ``backend`` selectable by its name."""
    LOSS_BACKENDS[backend.name] = backend
    return backend


def loss_backend_names() -> tuple[str, ...]:
    """The registered backends' names: the choices of ``backend=``."""
    return tuple(LOSS_BACKENDS)


def select_loss_backend(name: str, device: torch.device) -> LossBackend:
    """The backend called ``name``, if it can run on ``device``; ValueError naming the choices or the reason."""
    if name not in LOSS_BACKENDS:
        raise ValueError(f"unknown loss backend {name!r}; choose one of {', '.join(LOSS_BACKENDS)}")
    reason = LOSS_BACKENDS[name].unavailable(device)
    if reason is not None:
        raise ValueError(f"loss backend {name!r} {reason}; use backend='torch'")
    return LOSS_BACKENDS[name]


def _signs(logits: torch.Tensor, offset: int | None) -> torch.Tensor:
    """+1 where text j matches image i (j - i == offset), -1 elsewhere, for one tile."""
    if offset is None:
        return -torch.ones_like(logits)
    i = torch.arange(logits.shape[0], device=logits.device)[:, None]
    j = torch.arange(logits.shape[1], device=logits.device)[None, :]
    return torch.where(j - i == offset, 1.0, -1.0).to(logits.dtype)


def _torch_tile_sum(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int | None
) -> torch.Tensor:
    logits = x.float() @ y.float().T * scale + bias
    return -F.logsigmoid(_signs(logits, offset) * logits).sum()


def _torch_tile_grads(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cosine = x.float() @ y.float().T
    signs = _signs(cosine, offset)
    # d/dlogit of -log sigmoid(s * logit) = -s * sigmoid(-s * logit)
    d_logits = -signs * torch.sigmoid(-signs * (cosine * scale + bias))
    return d_logits, (d_logits * cosine).sum(), d_logits.sum()


def _triton_tile_sum(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int | None
) -> torch.Tensor:
    from . import loss_triton  # imports triton: only when this backend runs

    return loss_triton.tile_sum(x, y, scale, bias, offset)


def _triton_tile_grads(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import loss_triton

    return loss_triton.tile_grads(x, y, scale, bias, offset)


def _major_minor(version: str) -> tuple[int, int]:
    """(3, 6) for "3.6.0", "3.6.0+git1234" or "3.6rc1"."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _triton_interpreter_refusal(device: torch.device) -> str | None:
    """Triton's CPU interpreter before 3.7 turns scalar kernel arguments into 1-element arrays and calls int() on
    them, which NumPy 2.5 refuses: the kernels would stop with an InterpreterError on their first loop."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    for distribution in ("triton", "pytorch-triton"):  # PyTorch's nightly builds ship the latter
        try:
            triton_version = metadata.version(distribution)
            break
        except metadata.PackageNotFoundError:
            continue
    else:
        return None
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy.__version__) >= (2, 5):
        return (
            f"under TRITON_INTERPRET=1 needs triton >= 3.7 or numpy < 2.5 (installed: triton {triton_version}, "
            f"numpy {numpy.__version__}; older interpreters cannot run under NumPy 2.5)"
        )
    return None


register_loss_backend(LossBackend("torch", _torch_tile_sum, _torch_tile_grads))
register_loss_backend(
    LossBackend(
        "triton",
        _triton_tile_sum,
        _triton_tile_grads,
        cuda_only=True,
        module=("triton", "pip install triton"),
        check=_triton_interpreter_refusal,
    )
)


def _match_offset(rows: slice, cols: slice, diagonal: bool) -> int | None:
    """Where a tile's matches lie (see TileSum), None when the block has none or the tile misses its diagonal."""
    if not diagonal or rows.stop <= cols.start or cols.stop <= rows.start:
        return None
    return rows.start - cols.start


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32: half-precision products on CUDA (cuBLAS with fp32 output), else
    the operands in fp32."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _block_sum(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    diagonal: bool,
    tile: int,
    backend: LossBackend,
) -> torch.Tensor:
    """The block's summed loss, fp32, one (tile x tile) piece of the logits at a time."""
    total = torch.zeros((), dtype=torch.float32, device=image.device)
    for rows, cols in _tiles(len(image), len(text), tile):
        total += backend.tile_sum(image[rows], text[cols], scale, bias, _match_offset(rows, cols, diagonal))
    return total


def _block_grads(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    diagonal: bool,
    tile: int,
    backend: LossBackend,
    grad_image: torch.Tensor,
    grad_text: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(block sum) / d(image, text) added into ``grad_image`` and ``grad_text`` (fp32, the inputs' shapes), each
    tile's logits recomputed; returns d / d(logit_scale, logit_bias), fp32 scalars."""
    grad_scale = torch.zeros((), dtype=torch.float32, device=image.device)
    grad_bias = torch.zeros((), dtype=torch.float32, device=image.device)
    for rows, cols in _tiles(len(image), len(text), tile):
        x, y = image[rows], text[cols]
        d_logits, d_cosine_sum, d_sum = backend.tile_grads(x, y, scale, bias, _match_offset(rows, cols, diagonal))
        grad_image[rows] += _mm(d_logits, y) * scale
        grad_text[cols] += _mm(d_logits.T, x) * scale
        grad_scale += d_cosine_sum * scale  # d logit / d logit_scale = exp(logit_scale) * cosine
        grad_bias += d_sum
    return grad_scale, grad_bias


def _zeros(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device)


def _cast_grads(grad, grads, image, text, logit_scale, logit_bias):  # noqa: ANN001, ANN202
    """``grad`` x each fp32 gradient, in its input's dtype and shape."""
    return tuple((grad * g).reshape(x.shape).to(x.dtype) for g, x in zip(grads, (image, text, logit_scale, logit_bias)))


class _TiledSigmoidLoss(torch.autograd.Function):
    """The summed sigmoid loss of an (images x texts) block, one (tile x tile) piece of the logits at a time, in
    fp32 whatever the inputs' precision. Backward recomputes each tile's logits instead of keeping them: what it
    saves is the two embedding matrices and the two scalars, O(B x D), nothing of size B^2."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, diagonal: bool, tile: int, backend: LossBackend):  # noqa: ANN001
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.diagonal, ctx.tile, ctx.backend = diagonal, tile, backend
        return _block_sum(image, text, *_scalars(logit_scale, logit_bias), diagonal, tile, backend)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        grad_image, grad_text = _zeros(image), _zeros(text)
        scale, bias = _scalars(logit_scale, logit_bias)
        scalars = _block_grads(image, text, scale, bias, ctx.diagonal, ctx.tile, ctx.backend, grad_image, grad_text)
        grads = (grad_image, grad_text, *scalars)
        return (*_cast_grads(grad, grads, image, text, logit_scale, logit_bias), None, None, None)


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
    backend: str = "torch",
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
        backend: what computes a tile, a name in :data:`LOSS_BACKENDS` (``"torch"``, ``"triton"``).

    Returns:
        A scalar, fp32: the block's summed loss (divide by the number of images of the whole batch).
    """
    if matches_on_diagonal and len(image_embeds) != len(text_embeds):
        shape = (len(image_embeds), len(text_embeds))
        raise ValueError(f"a block with matches on its diagonal must be square, got {shape}")
    _check_tile(tile)
    chosen = select_loss_backend(backend, image_embeds.device)
    return _TiledSigmoidLoss.apply(
        image_embeds, text_embeds, logit_scale, logit_bias, matches_on_diagonal, tile, chosen
    )


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    tile: int = 1024,
    backend: str = "torch",
) -> torch.Tensor:
    """The loss of a batch of matching pairs (image i with text i): summed over pairs, divided by the batch size,
    as transformers' ``SiglipModel(..., return_loss=True)``; tiled (see :func:`sigmoid_loss_block`), so the memory
    it keeps for backward grows with B x D, never B^2."""
    block = sigmoid_loss_block(image_embeds, text_embeds, logit_scale, logit_bias, True, tile, backend)
    return block / image_embeds.shape[0]


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


def _exchange(tensor: torch.Tensor, to: int, source: int, into: torch.Tensor) -> list:
    """Send ``tensor`` to rank ``to`` and receive ``into`` (a buffer of its shape) from ``source``, without waiting:
    the requests to wait on."""
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, to), dist.P2POp(dist.irecv, into, source)])


class _RingSigmoidLoss(torch.autograd.Function):
    """This rank's images against every rank's texts, the texts passed round the ring one block at a time.

    Forward keeps two text blocks at most (the one scored, the one arriving: the next transfer overlaps the tiles of
    the current one) and saves only this rank's embeddings and the scalars. Backward sends the text blocks round
    again, recomputing each block's tiles, with the gradient of each block travelling beside it; after the last hop
    every block's gradient reaches its owner. Blocks and travelling gradients arrive in two buffers each, used in
    turn (a buffer is received into while the other is sent or scored), and gradients are accumulated in place: the
    memory per rank does not grow with the number of ranks, allocations included."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, tile: int, backend: LossBackend):  # noqa: ANN001
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.tile, ctx.backend = tile, backend
        rank, world = dist.get_rank(), dist.get_world_size()
        to, source = (rank + 1) % world, (rank - 1) % world
        scale, bias = _scalars(logit_scale, logit_bias)
        total = torch.zeros((), dtype=torch.float32, device=image.device)
        block, buffers = text.contiguous(), (torch.empty_like(text), torch.empty_like(text))
        for step in range(world - 1):
            arriving = buffers[step % 2]
            requests = _exchange(block, to, source, arriving)
            total += _block_sum(image, block, scale, bias, step == 0, tile, backend)  # while the block moves on
            for request in requests:
                request.wait()
            block = arriving
        return total + _block_sum(image, block, scale, bias, world == 1, tile, backend)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        rank, world = dist.get_rank(), dist.get_world_size()
        to, source = (rank + 1) % world, (rank - 1) % world
        scale, bias = _scalars(logit_scale, logit_bias)
        grad_image, grad_text = _zeros(image), _zeros(text)
        grad_scale, grad_bias = _block_grads(
            image, text, scale, bias, True, ctx.tile, ctx.backend, grad_image, grad_text
        )
        block, buffers = text.contiguous(), (torch.empty_like(text), torch.empty_like(text))
        travelling = (_zeros(text), _zeros(text))  # the block's gradient so far, beside it
        for step in range(world - 1):
            arriving, carried = buffers[step % 2], travelling[(step + 1) % 2]
            requests = _exchange(block, to, source, arriving) + _exchange(travelling[step % 2], to, source, carried)
            for request in requests:
                request.wait()
            block = arriving
            # this rank's images' gradient for the block's texts, added to what the block carries to its owner
            d_scale, d_bias = _block_grads(image, block, scale, bias, False, ctx.tile, ctx.backend, grad_image, carried)
            grad_scale += d_scale
            grad_bias += d_bias
        if world > 1:  # one more hop: each block's gradient, summed over the other ranks, reaches its owner
            returned = travelling[world % 2]
            for request in _exchange(travelling[(world - 1) % 2], to, source, returned):
                request.wait()
            grad_text += returned
        grads = (grad_image, grad_text, grad_scale, grad_bias)
        return (*_cast_grads(grad, grads, image, text, logit_scale, logit_bias), None, None)


def ring_sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    tile: int = 1024,
    backend: str = "torch",
) -> torch.Tensor:
    """The sigmoid loss of the combined batch of every rank's matching pairs, computed device by device.

    Each rank scores its images against its own texts (matches on the diagonal), then against every other rank's
    texts as they come round the ring (negatives only), ``tile`` x ``tile`` logits at a time; backward passes the
    texts round again, recomputing (see :class:`_RingSigmoidLoss`). Per rank, memory is this rank's embeddings and
    two text blocks, whatever the number of ranks; no full similarity matrix exists anywhere. Every rank must hold
    the same number of pairs (else ValueError), and every rank must call backward (the blocks travel in lockstep).

    Returns:
        This rank's share of the combined loss, times the number of ranks: the ranks' values average to the
        combined batch's loss, and DDP's averaging of gradients then gives exactly the combined batch's gradients
        (tested against :func:`sigmoid_loss_reference` on the whole batch, values and gradients).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, tile, backend)
    _check_same_shape(text_embeds)
    _check_tile(tile)
    chosen = select_loss_backend(backend, image_embeds.device)
    total = _RingSigmoidLoss.apply(image_embeds, text_embeds, logit_scale, logit_bias, tile, chosen)
    return total / image_embeds.shape[0]  # = world * total / (world * batch)
