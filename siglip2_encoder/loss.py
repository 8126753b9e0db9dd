"""The SigLIP pairwise sigmoid loss (Zhai et al. 2023), written block by block.

Every image-text pair is a binary problem: its logit ``t * cos + b`` should be high for a matching pair and low for
any other. The loss of a batch is the sum over all pairs of ``-log sigmoid(z * logit)`` (z = +1 for matches, -1
otherwise), divided by the number of images.

:func:`sigmoid_loss_block` computes one (images x texts) block. A batch on one device is one block with its matches
on the diagonal (:func:`sigmoid_loss`); across devices, each device adds its own block and then, for every other
device's texts in turn, a block of negatives only (the paper's device-by-device scheme: no all-gather of the full
similarity matrix). The sums are the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sigmoid_loss", "sigmoid_loss_block"]


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
