"""Text preprocessing for the SigLIP text towers: the checkpoint's own tokenizer, used as the models were trained.

* Every text is padded to 64 tokens (``padding="max_length"``): the tower pools the last position, so the pad
  token there is part of the model (SigLIP 2's Gemma tokenizer pads with id 0, SigLIP 1's T5 tokenizer with
  ``</s>``, id 1). Longer texts are truncated, with a warning the first time.
* SigLIP 2 was trained on lowercased text (Tschannen et al. 2025: "transforming the text to lower case before
  tokenization"), but its checkpoints name ``GemmaTokenizer``, which does not lowercase; so texts are lowercased
  by default for SigLIP 2 tokenizers (Gemma's) and kept as they are for SigLIP 1 ones. ``lowercase=False``
  reproduces transformers' zero-shot pipeline exactly.

transformers is imported here, not by the core: only text users pay for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..checkpoints.hub import CheckpointSource

__all__ = ["TextTokenizer", "TokenizedTexts"]

logger = logging.getLogger(__name__)

MAX_LENGTH = 64  # both SigLIP generations were trained on 64-token texts


@dataclass
class TokenizedTexts:
    """Attributes:
    input_ids: (B, 64) token ids.
    attention_mask: (B, 64) 1 for real tokens, or None when the tokenizer gives none (SigLIP 1's).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None


class TextTokenizer:
    """Wraps a Hugging Face tokenizer with SigLIP's conventions (see the module docstring).

    Args:
        tokenizer: a transformers tokenizer (the checkpoint's).
        lowercase: lowercase texts first; None = yes for Gemma tokenizers (SigLIP 2), no otherwise.
        max_length: tokens per text.
    """

    def __init__(self, tokenizer, *, lowercase: bool | None = None, max_length: int = MAX_LENGTH) -> None:
        if lowercase is None:
            from transformers import GemmaTokenizer

            lowercase = isinstance(tokenizer, GemmaTokenizer)
        self.tokenizer, self.lowercase, self.max_length = tokenizer, lowercase, max_length
        self._warned = False

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, lowercase: bool | None = None, **kwargs):
        """The checkpoint's tokenizer through ``AutoTokenizer`` (``kwargs`` go to it: revision, cache_dir, ...)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name_or_path, **kwargs), lowercase=lowercase)

    @classmethod
    def from_source(cls, source: CheckpointSource, *, lowercase: bool | None = None) -> TextTokenizer | None:
        """The tokenizer a checkpoint holds, read with the source's Hub options (revision, cache, token, offline);
        None when it holds none (no ``tokenizer_config.json``)."""
        if source.get("tokenizer_config.json") is None:
            return None
        from transformers import AutoTokenizer

        location = source.path if source.is_local else source.repo_id
        options = dict(revision=source.revision, cache_dir=source.cache_dir, token=source.token)
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=source.offline, **options)
        return cls(tokenizer, lowercase=lowercase)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer({type(self.tokenizer).__name__}, lowercase={self.lowercase}, max_length={self.max_length})"
        )

    def __call__(self, texts: str | Sequence[str]) -> TokenizedTexts:
        """Tokenize one text or a list: (B, 64) ids (and mask, if the tokenizer makes one)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}; texts must be strings")
        if self.lowercase:
            texts = [text.lower() for text in texts]
        if not self._warned:
            longest = max((len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]), default=0)
            if longest > self.max_length:
                self._warned = True
                logger.warning(
                    "a text of %d tokens is truncated to %d, the length SigLIP was trained on (warned once)",
                    longest,
                    self.max_length,
                )
        out = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return TokenizedTexts(out["input_ids"], out.get("attention_mask"))
