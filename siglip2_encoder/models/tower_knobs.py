"""The vision tower's switches for training and inference - freezing, gradient checkpointing, the attention
backend, compiling, precision - and the properties they read, apart from the forward pass (``model.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .attention import attention_backend_names

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TowerKnobsMixin"]


class TowerKnobsMixin:
    """Switches of a tower module with ``encoder`` (the layers), ``embeddings`` and ``post_layernorm``."""

    def freeze(self) -> Self:
        """Stop gradients to every parameter (a frozen feature extractor). Returns self."""
        self.requires_grad_(False)
        return self

    def unfreeze(self) -> Self:
        """Let every parameter train again. Returns self."""
        self.requires_grad_(True)
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in the backward pass (non-reentrant), trading compute for memory."""
        self.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing = False

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the layers recompute their activations in the backward pass (the flag lives on ``encoder``)."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled

    @property
    def attention_backend(self) -> str:
        """How packed attention runs: "auto" (default) or a name in :data:`~siglip2_encoder.models.attention.
        ATTENTION_BACKENDS` ("sdpa", "varlen", "flash_attn", "flex")."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if name not in attention_backend_names():
            raise ValueError(f"attention_backend must be one of {attention_backend_names()}, got {name!r}")
        self._attention_backend = name

    def compile_layers(self, **kwargs) -> Self:
        """``torch.compile`` each encoder layer (``kwargs`` go to it); the Python that packs and routes tokens stays
        eager. New batch layouts (sizes, NaFlex grid mixes) compile again. Returns self."""
        for layer in self.encoder.layers:
            layer.compile(**kwargs)
        return self

    def set_precision(self, dtype: torch.dtype, *, keep_embeddings_fp32: bool = True) -> Self:
        """Cast the tower to ``dtype`` (e.g. torch.bfloat16 on a GPU), by default keeping the patch and position
        embeddings in fp32: pixels are embedded and position grids resized in full precision, and the sum is cast
        once before the first layer. Returns self."""
        self.to(dtype=dtype)
        if keep_embeddings_fp32:
            self.embeddings.float()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype pixel values are converted to (that of the patch embedding)."""
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The dtype the encoder layers compute in (differs from :attr:`dtype` after :meth:`set_precision`)."""
        return self.post_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers
