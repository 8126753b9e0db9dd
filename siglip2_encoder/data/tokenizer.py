"""Text preprocessing for the SigLIP text towers: the checkpoint's own tokenizer, used as the models were trained.

* Every text is padded at its end to 64 tokens (``padding="max_length"``, whatever the tokenizer's
  ``padding_side``): the tower pools the last position, so the pad token there is part of the model (SigLIP 2's Gemma
  tokenizer pads with id 0, SigLIP 1's T5 tokenizer with ``</s>``, id 1). Longer texts are truncated, with a warning
  the first time.
* No padding mask: the tower attends all 64 positions, padding included, as both generations were trained
  (big_vision's text encoder has no mask; open_clip and vLLM run the models so, and transformers' own SigLIP 2
  conversion saves its tokenizers with ``model_input_names=["input_ids"]`` for that reason). transformers 5's
  tokenizer classes return a mask unless a checkpoint's ``tokenizer_config.json`` lists ``model_input_names``
  without it, and transformers applies it (``model(**tokenizer(...))``, its zero-shot pipeline): not the trained
  model. ``padding_mask=True`` returns the tokenizer's mask (if it makes one), to reproduce transformers.
* SigLIP 2 was trained on lowercased text (Tschannen et al. 2025: "transforming the text to lower case before
  tokenization"), but its fixed-resolution checkpoints name ``GemmaTokenizer``, which does not lowercase; so texts are
  lowercased by default for SigLIP 2 checkpoints and kept as they are for SigLIP 1 ones. The family is read from the
  checkpoint (its ``config.json`` and ``tokenizer_config.json``), not from the class transformers builds: transformers
  5 loads a NaFlex folder's tokenizer as ``Siglip2Tokenizer``, which lowercases by itself.
* :func:`canonicalize_text` is the text rule of the paper's own zero-shot evaluator (big_vision,
  ``big_vision/evaluators/proj/image_text/prompt_engineering.py``, ``_canonicalize``), which the zero-shot path
  applies to class names and templates by default. ``TextTokenizer(canonicalize=True)`` applies it to every text.

The three settings, one name everywhere (``text_preprocessing``; ``--text-preprocessing`` on the command line):
``"raw"`` (texts as given: transformers' zero-shot pipeline), ``"lower"`` (lowercased, punctuation kept: SigLIP 2's
free text, as big_vision's retrieval evaluators feed captions) and ``"canonical"`` (the rule above).

transformers is imported here, not by the core: only text users pay for it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints.hub import CheckpointError, CheckpointSource
from ..files import write_atomic

__all__ = ["TEXT_PREPROCESSING", "TextTokenizer", "TokenizedTexts", "canonicalize_text", "is_siglip2_checkpoint"]

logger = logging.getLogger(__name__)

MAX_LENGTH = 64  # both SigLIP generations were trained on 64-token texts
TEXT_PREPROCESSING = ("raw", "lower", "canonical")
_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)  # ASCII only, as big_vision: "’" and "—" stay
# SigLIP 2's tokenizers (Gemma's vocabulary), as a checkpoint's tokenizer_config.json names them.
_SIGLIP2_TOKENIZERS = ("GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer")


def canonicalize_text(text: str, keep: str | None = None) -> str:
    """big_vision's zero-shot text rule (``prompt_engineering._canonicalize``): underscores become spaces, every
    ASCII punctuation character (``string.punctuation``) is deleted except inside the exact string ``keep`` (``"{}"``
    for templates, ``","`` between a class name's aliases), then lowercase, and any run of whitespace (Unicode's:
    tabs, non-breaking spaces) becomes one space, stripped at both ends.

    open_clip applies the same rule to every text of its SigLIP models, after ``ftfy`` and ``html.unescape``: it
    turns "it’s" into "its" where this (and big_vision) keeps the "’"."""
    text = text.replace("_", " ")
    parts = text.split(keep) if keep else [text]
    text = (keep or "").join(part.translate(_DROP_PUNCTUATION) for part in parts)
    return " ".join(text.lower().split())


def is_siglip2_checkpoint(source: CheckpointSource) -> bool:
    """Whether a checkpoint is SigLIP 2's (trained on lowercased text): a ``siglip2`` model type, or a tokenizer of
    Gemma's vocabulary (the fixed-resolution SigLIP 2 checkpoints are ``siglip`` models with a Gemma tokenizer)."""
    config = source.read_json("config.json") or {}
    tokenizer = source.read_json("tokenizer_config.json") or {}
    return config.get("model_type") in ("siglip2", "siglip2_text_model") or (
        tokenizer.get("tokenizer_class") in _SIGLIP2_TOKENIZERS
    )


@dataclass
class TokenizedTexts:
    """Attributes:
    input_ids: (B, 64) token ids.
    attention_mask: None: every position is attended, as SigLIP was trained. With ``padding_mask=True``, the
        tokenizer's (B, 64) mask, 1 for real tokens (None if it makes none).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None


class TextTokenizer:
    """Wraps a Hugging Face tokenizer with SigLIP's conventions (see the module docstring).

    Args:
        tokenizer: a transformers tokenizer (the checkpoint's).
        lowercase: lowercase texts first; None = yes for SigLIP 2 tokenizers (Gemma's vocabulary), no otherwise
            (:meth:`from_pretrained` reads the family from the checkpoint instead).
        canonicalize: apply :func:`canonicalize_text` to every text (which lowercases too).
        max_length: tokens per text.
        padding_mask: return the tokenizer's padding mask, which transformers applies and SigLIP was not trained
            with (see the module docstring); False (the default) encodes texts as the models were trained.
    """

    def __init__(
        self,
        tokenizer,
        *,
        lowercase: bool | None = None,
        canonicalize: bool = False,
        max_length: int = MAX_LENGTH,
        padding_mask: bool = False,
    ) -> None:
        if lowercase is None:
            lowercase = type(tokenizer).__name__ in _SIGLIP2_TOKENIZERS
        self.tokenizer, self.lowercase, self.canonicalize = tokenizer, lowercase, canonicalize
        self.max_length, self.padding_mask = max_length, padding_mask
        self._warned = False

    @classmethod
    def from_preprocessing(cls, tokenizer, preprocessing: str, *, padding_mask: bool = False) -> TextTokenizer:
        """``tokenizer`` with one of :data:`TEXT_PREPROCESSING` (``"raw"``, ``"lower"``, ``"canonical"``)."""
        if preprocessing not in TEXT_PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {list(TEXT_PREPROCESSING)}, got {preprocessing!r}")
        lowercase, canonicalize = preprocessing != "raw", preprocessing == "canonical"
        return cls(tokenizer, lowercase=lowercase, canonicalize=canonicalize, padding_mask=padding_mask)

    @property
    def preprocessing(self) -> str:
        """What is done to each text before tokenizing: one of :data:`TEXT_PREPROCESSING`."""
        return "canonical" if self.canonicalize else "lower" if self.lowercase else "raw"

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        lowercase: bool | None = None,
        canonicalize: bool = False,
        padding_mask: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> TextTokenizer:
        """The checkpoint's tokenizer (a folder or Hub repo, with the Hub options of ``from_pretrained`` elsewhere);
        ``lowercase=None`` lowercases for SigLIP 2 checkpoints (:func:`is_siglip2_checkpoint`).

        Raises:
            CheckpointError: the checkpoint holds no tokenizer.
        """
        source = CheckpointSource(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        tokenizer = cls.from_source(source, lowercase=lowercase, canonicalize=canonicalize, padding_mask=padding_mask)
        if tokenizer is None:
            raise CheckpointError(
                f"{source} has no tokenizer (no tokenizer_config.json); give an image-text checkpoint"
            )
        return tokenizer

    @classmethod
    def from_source(
        cls,
        source: CheckpointSource,
        *,
        lowercase: bool | None = None,
        canonicalize: bool = False,
        padding_mask: bool = False,
    ) -> TextTokenizer | None:
        """The tokenizer a checkpoint holds, read with the source's Hub options (revision, cache, token, offline);
        None when it holds none (no ``tokenizer_config.json``)."""
        if source.get("tokenizer_config.json") is None:
            return None
        from transformers import AutoTokenizer

        location = source.path if source.is_local else source.repo_id
        options = dict(revision=source.revision, cache_dir=source.cache_dir, token=source.token)
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=source.offline, **options)
        lowercase = is_siglip2_checkpoint(source) if lowercase is None else lowercase
        return cls(tokenizer, lowercase=lowercase, canonicalize=canonicalize, padding_mask=padding_mask)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer's files so that transformers (and vLLM, which reads them) encodes texts as SigLIP was
        trained: its ``tokenizer_config.json`` says ``model_input_names: ["input_ids"]`` (no padding mask) and
        ``padding_side: "right"``, as transformers' SigLIP 2 conversion writes them, and a tokenizer that lowercases
        here (SigLIP 2's) gets a lowercasing normalizer in ``tokenizer.json``, as transformers 5's
        ``Siglip2Tokenizer`` has. transformers' zero-shot pipeline (which pads to 64) then gives this library's text
        features of the same texts, canonicalisation aside (not a tokenizer setting: apply
        :func:`canonicalize_text` to class names yourself).

        Raises:
            TypeError: lowercasing asked of a tokenizer without a ``tokenizers`` backend, which cannot hold it.
        """
        folder = Path(folder)
        tokenizer = self.tokenizer
        if self.preprocessing != "raw":
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise TypeError(
                    f"a {type(tokenizer).__name__} cannot be saved to lowercase texts (no tokenizers backend); save "
                    f"TextTokenizer(tokenizer, lowercase=False) and lowercase texts before tokenizing them"
                )
            from tokenizers import normalizers

            tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own normalizer
            backend = tokenizer.backend_tokenizer
            rest = [] if backend.normalizer is None else [backend.normalizer]
            backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
        tokenizer.save_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config |= {"model_input_names": ["input_ids"], "padding_side": "right"}
        write_atomic(folder / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())

    def __repr__(self) -> str:
        name = type(self.tokenizer).__name__
        mask = ", padding_mask=True" if self.padding_mask else ""
        return f"TextTokenizer({name}, preprocessing={self.preprocessing!r}, max_length={self.max_length}{mask})"

    def __call__(self, texts: str | Sequence[str]) -> TokenizedTexts:
        """Tokenize one text or a list: (B, 64) ids (and, with ``padding_mask``, the tokenizer's mask)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}; texts must be strings")
        if self.canonicalize:
            texts = [canonicalize_text(text) for text in texts]
        elif self.lowercase:
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
        # Padding at the end whatever the tokenizer's padding_side (transformers 5's Siglip2Tokenizer pads on the
        # left unless its config says otherwise): the models were trained with it there, and pool the last position.
        out = self.tokenizer(
            texts,
            padding="max_length",
            padding_side="right",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return TokenizedTexts(out["input_ids"], out.get("attention_mask") if self.padding_mask else None)
