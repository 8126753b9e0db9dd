"""``SigLIP2Model``: both towers and the learned temperature and bias: image-text logits as in the SigLIP papers.

logits = image_embeds @ text_embeds.T * exp(logit_scale) + logit_bias, on L2-normalised features; sigmoid of a
logit is the probability that the image and the text belong together (no softmax over the texts).

Module names are transformers' ``SiglipModel`` / ``Siglip2Model`` ones (``vision_model.*``, ``text_model.*``,
``logit_scale``, ``logit_bias``): state dicts move between the two unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..checkpoints.folders import read_model_checkpoint, write_model_checkpoint
from ..checkpoints.hub import CheckpointSource, FromPretrainedMixin
from ..checkpoints.publish import HubMixin, ModelCardInfo, hub_id
from ..checkpoints.strict import build_loaded, check_plain
from ..config import EncoderConfig, ProcessorConfig, TextConfig
from ..data.images import ImageInput
from ..data.processor import ImageProcessor
from ..data.tokenizer import TextTokenizer, canonicalize_text
from .inputs import Grids
from .loss import sigmoid_loss
from .model import SigLIP2Encoder
from .text import SigLIP2TextEncoder

__all__ = ["LabelSet", "ModelOutput", "SigLIP2Model"]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "This is a photo of {}."  # transformers' zero-shot pipeline's


@dataclass(frozen=True)
class LabelSet:
    """Labels encoded once for zero-shot classification (see :meth:`SigLIP2Model.encode_labels`).

    Attributes:
        labels: the label names, in the order of ``embeddings``' rows.
        templates: the prompt templates averaged into each label's embedding.
        embeddings: (K, D) L2-normalised text embeddings.
    """

    labels: tuple[str, ...]
    templates: tuple[str, ...]
    embeddings: torch.Tensor
    texts: tuple[str, ...] = ()  # what each label became in the prompts (canonical, first alias)
    canonicalize: bool = False  # whether labels and templates went through big_vision's rule


def _check_labels(labels: Sequence[str], templates: Sequence[str]) -> None:
    if isinstance(labels, str) or not labels:
        raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"every label must be a non-empty string, got {label!r}")
    duplicates = sorted({label for label in labels if list(labels).count(label) > 1})
    if duplicates:
        raise ValueError(f"labels must be distinct, got {duplicates} more than once")
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty list of strings, got {templates!r}")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"a template must hold '{{}}' once, where the label goes; got {template!r}")


def _check_canonical(labels: Sequence[str], texts: Sequence[str]) -> None:
    """Labels must stay distinct and non-empty after canonicalisation."""
    for label, text in zip(labels, texts):
        if not text:
            raise ValueError(
                f"label {label!r} is empty once canonicalised; pass canonicalize=False to keep it as given"
            )
    seen: dict[str, str] = {}
    for label, text in zip(labels, texts):
        if text in seen:
            raise ValueError(
                f"labels {seen[text]!r} and {label!r} are the same text once canonicalised ({text!r}); rename one, "
                f"or pass canonicalize=False"
            )
        seen[text] = label


@dataclass
class ModelOutput:
    """Attributes:
    logits_per_image: (B_images, B_texts) scaled and shifted cosine similarities.
    logits_per_text: (B_texts, B_images), its transpose.
    image_embeds: (B_images, D) L2-normalised image features.
    text_embeds: (B_texts, D) L2-normalised text features.
    loss: the pairwise sigmoid loss (:func:`~siglip2_encoder.models.loss.sigmoid_loss`) when asked for.
    """

    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    loss: torch.Tensor | None = None  # the sigmoid loss, with return_loss=True (image i matches text i)


class SigLIP2Model(FromPretrainedMixin, HubMixin, nn.Module):
    """The SigLIP / SigLIP 2 image-text model.

    Args:
        vision_config: the vision tower; it needs its attention-pooling head (``use_head=True``).
        text_config: the text tower; its ``output_size`` must equal the vision tower's width.
        processor_config: image preprocessing (default: SigLIP 2's for the vision tower).
    """

    def __init__(
        self, vision_config: EncoderConfig, text_config: TextConfig, processor_config: ProcessorConfig | None = None
    ) -> None:
        super().__init__()
        if not vision_config.use_head:
            raise ValueError("an image-text model needs the vision tower's pooling head; got use_head=False")
        if text_config.output_size != vision_config.hidden_size:
            raise ValueError(
                f"the text features ({text_config.output_size} wide) must match the image features "
                f"({vision_config.hidden_size}); set text_config.projection_size={vision_config.hidden_size}"
            )
        self.vision_model = SigLIP2Encoder(vision_config, processor_config)
        self.text_model = SigLIP2TextEncoder(text_config)
        # The SigLIP paper's initialisation: temperature 10 (log 10), bias -10.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))
        self.name_or_path: str | None = None  # the checkpoint it was loaded from (a model card's base)
        self.source: CheckpointSource | None = None  # where its tokenizer is read from, when first needed
        self._tokenizer: TextTokenizer | None = None

    @classmethod
    def from_source(
        cls, source: CheckpointSource, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> SigLIP2Model:
        """A transformers ``siglip`` / ``siglip2`` image-text checkpoint (``from_pretrained(name_or_path)``: Hub id or
        folder; single file, sharded or ``.bin``), strictly, in eval(). For the vision tower alone,
        ``SigLIP2Encoder.from_pretrained`` reads only its own shards."""
        stored = read_model_checkpoint(source, dtype=dtype)
        model = build_loaded(
            lambda: cls(stored.vision_config, stored.text_config, stored.processor_config),
            stored.state_dict,
            str(source),
            "image-text model",
            device,
        )
        model.source = source
        return model

    @property
    def tokenizer(self) -> TextTokenizer:
        """The checkpoint's own tokenizer, read when first asked for (with the Hub options the model was loaded
        with); what :meth:`encode_labels` and :meth:`classify` use unless given another.

        Raises:
            ValueError: the model was not loaded from a checkpoint, or its checkpoint holds no tokenizer.
        """
        tokenizer = self._checkpoint_tokenizer()
        if tokenizer is None:
            where = "was not loaded from a checkpoint" if self.source is None else f"{self.source} has no tokenizer"
            raise ValueError(
                f"label names need a tokenizer and this model {where}: pass "
                f"tokenizer=TextTokenizer.from_pretrained(...)"
            )
        return tokenizer

    def _checkpoint_tokenizer(self) -> TextTokenizer | None:
        """The checkpoint's own tokenizer, read once; None when the model has no checkpoint or it holds none."""
        if self._tokenizer is None and self.source is not None:
            self._tokenizer = TextTokenizer.from_source(self.source)
        return self._tokenizer

    @property
    def base_checkpoint(self) -> str | None:
        return self.name_or_path

    def model_card_info(self) -> ModelCardInfo:
        """What :meth:`push_to_hub`'s model card says of this image-text model."""
        v, t = self.vision_model.config, self.text_model.config
        return ModelCardInfo(
            title=f"SigLIP image-text model ({v.num_hidden_layers} vision, {t.num_hidden_layers} text layers)",
            summary="A SigLIP / SigLIP 2 image-text model saved by siglip2-encoder, in transformers' format: "
            "zero-shot classification and image-text retrieval.",
            details=[
                ("base checkpoint", self.name_or_path or "none (random initialisation)"),
                (
                    "vision tower",
                    f"width {v.hidden_size}, patch {v.patch_size}, {'NaFlex' if v.naflex else v.image_size}",
                ),
                ("text tower", f"width {t.hidden_size}, vocabulary {t.vocab_size}, {t.max_position_embeddings} tokens"),
            ],
            snippet='from siglip2_encoder import SigLIP2Model\n\nmodel = SigLIP2Model.from_pretrained("{repo_id}")\n',
            transformers_snippet=(
                'from transformers import AutoModel\n\nmodel = AutoModel.from_pretrained("{repo_id}")\n'
            ),
            base_model=hub_id(self.name_or_path),
            tags=("siglip", "zero-shot-image-classification"),
            library_name="transformers",
            pipeline_tag="zero-shot-image-classification",
        )

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer: TextTokenizer | None = None) -> None:
        """Write a folder that transformers' ``SiglipModel`` (fixed-resolution) / ``Siglip2Model`` (NaFlex) and
        :meth:`from_pretrained` load, with a tokenizer: ``tokenizer``, or the checkpoint's own when the model was
        loaded from one that holds it (:meth:`TextTokenizer.save_pretrained`: transformers then encodes texts as
        SigLIP was trained). With one, transformers' zero-shot pipeline and vLLM take the folder whole; without, a
        warning says so."""
        check_plain(self, lambda: type(self)(self.vision_model.config, self.text_model.config), "cannot save", "model")
        if tokenizer is not None and not isinstance(tokenizer, TextTokenizer):
            raise TypeError(
                f"tokenizer must be a TextTokenizer, got a {type(tokenizer).__name__}: wrap a transformers tokenizer "
                f"as TextTokenizer(tokenizer)"
            )
        if tokenizer is None:
            tokenizer = self._checkpoint_tokenizer()
        write_model_checkpoint(
            save_directory,
            self.vision_model.config,
            self.text_model.config,
            self.state_dict(),
            self.vision_model.processor_config,
        )
        if tokenizer is None:
            logger.warning(
                "%s holds no tokenizer: transformers' pipeline and vLLM need one; pass tokenizer=TextTokenizer(...)",
                save_directory,
            )
        else:
            tokenizer.save_pretrained(save_directory)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        spatial_shapes: Grids | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D) pooled image features (not normalised), as transformers' ``get_image_features(...).pooler_output``."""
        return self.vision_model(pixel_values, spatial_shapes, pixel_attention_mask, return_last=False).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) text features (not normalised), as transformers' ``get_text_features(...).pooler_output``."""
        return self.text_model(input_ids, attention_mask, return_last=False).pooler_output

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B_images, B_texts) logits of image and text features (normalised here; already normalised ones stay
        the same): ``cos * exp(logit_scale) + logit_bias``, the one place they are computed. The scale multiplies
        the texts before the product, not the (B, B) product after it: backward then keeps O(B x D) of this graph,
        not the product (for the scale's gradient) - what the tiled loss saves would be moot beside it."""
        image, text = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        return image @ (text * self.logit_scale.exp()).to(image.dtype).T + self.logit_bias

    def encode_labels(
        self,
        labels: Sequence[str],
        tokenizer: TextTokenizer | None = None,
        templates: Sequence[str] = (DEFAULT_TEMPLATE,),
        *,
        canonicalize: bool = True,
        progress: bool | None = None,
    ) -> LabelSet:
        """Each label's text embedding, averaged over ``templates`` (prompt ensembling) and normalised;
        ``tokenizer`` defaults to the checkpoint's own (:attr:`tokenizer`).

        With ``canonicalize`` (the default, as the SigLIP papers' zero-shot evaluator), class names and templates go
        through :func:`~siglip2_encoder.data.tokenizer.canonicalize_text` first - templates keep their ``{}``, and of
        a class name's comma-separated aliases (``"tench, Tinca tinca"``) the first is used, as big_vision's
        ``first_class_name_only``. ``canonicalize=False`` uses them as given: transformers' zero-shot pipeline.

        Computed once: pass the result to :meth:`classify` for any number of images and calls. It is a snapshot of
        the text tower's weights: encode again after training them. ``progress``: a bar over the templates (None:
        when stderr is a terminal and there are several).
        """
        _check_labels(labels, templates)
        tokenizer = tokenizer or self.tokenizer
        texts = list(labels)
        if canonicalize:
            texts = [canonicalize_text(label, keep=",").split(",")[0].strip() for label in labels]
            templates = [canonicalize_text(template, keep="{}") for template in templates]
            _check_canonical(labels, texts)
        per_template = []
        with torch.inference_mode():
            show = (sys.stderr.isatty() if progress is None else progress) and len(templates) > 1
            for template in tqdm(templates, unit="template", disable=not show):
                tokens = tokenizer([template.format(text) for text in texts])
                mask = None if tokens.attention_mask is None else tokens.attention_mask.to(self.text_model.device)
                features = self.get_text_features(tokens.input_ids.to(self.text_model.device), mask)
                per_template.append(F.normalize(features.float(), dim=-1))
        embeddings = (
            per_template[0] if len(per_template) == 1 else F.normalize(torch.stack(per_template).mean(0), dim=-1)
        )
        return LabelSet(tuple(labels), tuple(templates), embeddings, tuple(texts), canonicalize)

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: LabelSet | Sequence[str],
        *,
        tokenizer: TextTokenizer | None = None,
        template: str | Sequence[str] = DEFAULT_TEMPLATE,
        processor: ImageProcessor | None = None,
        top_k: int | None = None,
        canonicalize: bool = True,
    ) -> list[list[dict[str, float | str]]]:
        """Zero-shot classification: per image, ``[{"score": p, "label": name}, ...]`` highest first, as transformers'
        ``pipeline("zero-shot-image-classification")`` returns (sigmoid probabilities: they need not sum to 1).

        Args:
            images: one image or a list (anything :class:`~siglip2_encoder.ImageProcessor` takes).
            labels: a :class:`LabelSet` from :meth:`encode_labels` (fast: the text tower does not run), or label
                names, encoded here with ``tokenizer`` (default: the checkpoint's own) and ``template`` (one
                template, or several to average).
            processor: image preprocessing (default: the checkpoint's).
            top_k: keep this many labels per image (default all).
            canonicalize: label names go through big_vision's rule first (see :meth:`encode_labels`); False
                reproduces transformers' zero-shot pipeline.
        """
        if not isinstance(labels, LabelSet):
            templates = [template] if isinstance(template, str) else template
            labels = self.encode_labels(labels, tokenizer, templates, canonicalize=canonicalize)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int, got top_k={top_k!r}")
        processor = processor or ImageProcessor(self.vision_model.processor_config)
        inputs = processor(images).to(self.vision_model.device, self.vision_model.dtype)
        with torch.inference_mode():
            logits = self.logits(self.get_image_features(**inputs).float(), labels.embeddings.to(self.device))
        results = []
        for scores in torch.sigmoid(logits).tolist():
            ranked = sorted(zip(scores, labels.labels), key=lambda pair: -pair[0])[:top_k]
            results.append([{"score": score, "label": label} for score, label in ranked])
        return results

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        spatial_shapes: Grids | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
    ) -> ModelOutput:
        """Logits of every image against every text; with ``return_loss``, the sigmoid loss of the batch, where
        image i and text i are the matching pairs (fine-tuning: LoRA on either tower works through peft)."""
        image = F.normalize(self.get_image_features(pixel_values, spatial_shapes, pixel_attention_mask), dim=-1)
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1).to(image.dtype)
        logits_per_image = self.logits(image, text)
        loss = sigmoid_loss(image, text, self.logit_scale, self.logit_bias) if return_loss else None
        return ModelOutput(logits_per_image, logits_per_image.T, image, text, loss)
