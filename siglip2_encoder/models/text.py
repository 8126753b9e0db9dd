"""``SigLIP2TextEncoder``: the SigLIP / SigLIP 2 text tower.

token + position embeddings -> N pre-norm encoder layers (the vision tower's :class:`~siglip2_encoder.models.layers.
Encoder`, with its inference path) -> final layer norm -> the last position's token -> ``head`` (a linear layer).

Module names are transformers' (``embeddings.token_embedding``, ``embeddings.position_embedding``,
``encoder.layers.N....``, ``final_layer_norm``, ``head``), so state dicts and peft adapters move between the two.
SigLIP pools the **last position**, whatever it holds: both generations were trained on texts padded to 64 tokens,
so the pad token there is part of the model. Tokenize with ``padding="max_length"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.folders import read_text_checkpoint
from ..checkpoints.hub import CheckpointSource, FromPretrainedMixin
from ..checkpoints.strict import build_loaded
from ..config import TextConfig
from .attention import key_padding_attention, select_attention_backend
from .layers import Encoder
from .packing import Packing

__all__ = ["SigLIP2TextEncoder", "TextEmbeddings", "TextOutput"]


@dataclass
class TextOutput:
    """Attributes:
    last_hidden_state: (B, L, D) tokens after the final layer norm (None when not asked for).
    pooler_output: (B, P) the text feature: the last position's token through the head.
    """

    last_hidden_state: torch.Tensor | None
    pooler_output: torch.Tensor


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for table in (self.token_embedding.weight, self.position_embedding.weight):
            nn.init.normal_(table, std=1 / math.sqrt(table.shape[1]))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D)."""
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class SigLIP2TextEncoder(FromPretrainedMixin, nn.Module):
    """The SigLIP / SigLIP 2 text tower.

    Args:
        config: the architecture.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.output_size)
        # See SigLIP2Encoder.fast_inference.
        self.fast_inference = True
        self.name_or_path: str | None = None  # the checkpoint it was loaded from
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(1/sqrt(D)) embeddings, each layer's own initialisation, xavier-uniform head with zero bias."""
        self.embeddings.reset_parameters()
        for layer in self.encoder.layers:
            layer.reset_parameters()
        self.final_layer_norm.reset_parameters()
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_source(
        cls, source: CheckpointSource, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> SigLIP2TextEncoder:
        """The text tower alone, strictly, in eval(): from an image-text ``siglip`` / ``siglip2`` checkpoint (only
        the shards holding text weights are read) or a text-only ``siglip_text_model`` / ``siglip2_text_model`` one;
        ``from_pretrained(name_or_path)`` takes a Hub id or folder."""
        config, state_dict = read_text_checkpoint(source, dtype=dtype)
        return build_loaded(lambda: cls(config), state_dict, str(source), "text tower", device)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_last: bool = True
    ) -> TextOutput:
        """Encode tokenized texts.

        Args:
            input_ids: (B, L) token ids, L <= ``max_position_embeddings``.
            attention_mask: (B, L), 1 for real tokens; padding keys are then ignored (padding positions are still
                computed: pooling reads the last one). transformers passes the tokenizer's mask the same way.
            return_last: compute ``last_hidden_state``. Without it, the last layer computes only the pooled
                position (the others give keys and values), and with a padding mask only the real tokens and the
                pooled last position run through the layers: no other position is ever read (padding keys are
                masked), so the pooled feature is the same at a fraction of the cost for short texts.

        Returns:
            :class:`TextOutput` (``last_hidden_state`` None without ``return_last``).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, L) integer tensor of token ids, got {got}")
        batch, length = input_ids.shape
        if not 1 <= length <= self.config.max_position_embeddings:
            raise ValueError(
                f"texts of {length} tokens; this tower takes 1 to {self.config.max_position_embeddings} "
                f"(max_position_embeddings): truncate them with the tokenizer (max_length=64, truncation=True)"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        x = self.embeddings(input_ids)  # (B, L, D)
        pooled_at = torch.full((batch,), length - 1, device=x.device)
        dropout = self.config.attention_dropout if self.training else 0.0
        if attention_mask is None or bool(attention_mask.all()):
            attention_mask = None
            packing = Packing.from_grids([(1, length)] * batch, x.device)
            attend = select_attention_backend("auto", x.device, x.dtype, dropout).prepare(packing)
        else:
            if not return_last and bool(attention_mask.any(1).all()):
                x, attention_mask, pooled_at = _real_tokens_and_last(x, attention_mask)
            attend = key_padding_attention(attention_mask)
        last = self.encoder.layers[-1]
        # a hook on the last layer expects its whole output: run it whole then
        at_pooled_only = not return_last and not last.has_hooks()
        depth = len(self.encoder.layers) - at_pooled_only
        x = self.encoder(x.flatten(0, 1).contiguous(), attend, depth=depth, fast=self.fast_inference)
        x = x.unflatten(0, (batch, -1))
        if at_pooled_only:
            pooled = self.final_layer_norm(last.forward_at(x, pooled_at, attention_mask))
        else:
            x = self.final_layer_norm(x)
            pooled = x[torch.arange(batch, device=x.device), pooled_at]
        return TextOutput(last_hidden_state=x if return_last else None, pooler_output=self.head(pooled))


def _real_tokens_and_last(
    x: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each text's real tokens and its last position, moved to the front in order, the rest cut to the longest.

    Args:
        x: (B, L, D) embedded tokens.
        attention_mask: (B, L), 1 for real tokens; every text has one.

    Returns:
        (B, L', D) tokens, their (B, L') mask (the last position keeps its own value: a padding key stays masked;
        the filler after each text is masked), and (B,) where each text's last position now is.
    """
    keep = attention_mask.bool().clone()
    keep[:, -1] = True
    counts = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]
    tokens = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    return tokens, attention_mask.gather(1, order), counts - 1
