"""``SigLIP2Model``: both towers and the learned temperature and bias: image-text logits as in the SigLIP papers.

logits = image_embeds @ text_embeds.T * exp(logit_scale) + logit_bias, on L2-normalised features; sigmoid of a
logit is the probability that the image and the text belong together (no softmax over the texts).

Module names are transformers' ``SiglipModel`` / ``Siglip2Model`` ones (``vision_model.*``, ``text_model.*``,
``logit_scale``, ``logit_bias``): state dicts move between the two unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig, ProcessorConfig, TextConfig
from .convert import check_state_dict, read_model_checkpoint, write_model_checkpoint
from .hub import CheckpointSource
from .inputs import Grids
from .model import SigLIP2Encoder
from .text import SigLIP2TextEncoder

__all__ = ["ModelOutput", "SigLIP2Model"]


@dataclass
class ModelOutput:
    """Attributes:
    logits_per_image: (B_images, B_texts) scaled and shifted cosine similarities.
    logits_per_text: (B_texts, B_images), its transpose.
    image_embeds: (B_images, D) L2-normalised image features.
    text_embeds: (B_texts, D) L2-normalised text features.
    """

    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class SigLIP2Model(nn.Module):
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

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> SigLIP2Model:
        """Load a transformers ``siglip`` / ``siglip2`` image-text checkpoint (Hub id or folder, single file,
        sharded or ``.bin``), strictly, in eval(). For the vision tower alone, ``SigLIP2Encoder.from_pretrained``
        reads only its own shards."""
        source = CheckpointSource(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        stored = read_model_checkpoint(source, dtype=dtype)
        with torch.device("meta"):
            model = cls(stored.vision_config, stored.text_config, stored.processor_config)
        check_state_dict(model.state_dict(), stored.state_dict, str(source), what="image-text model")
        model.load_state_dict(stored.state_dict, strict=True, assign=True)
        return model.to(device=device).eval() if device is not None else model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write a folder that transformers' ``SiglipModel`` (fixed-resolution) / ``Siglip2Model`` (NaFlex) and
        :meth:`from_pretrained` load."""
        foreign = self.vision_model.foreign_modules()
        if foreign or any(type(m).__module__.startswith("peft") for m in self.text_model.modules()):
            raise ValueError("cannot save LoRA-wrapped towers as a plain checkpoint: merge_and_unload() first")
        write_model_checkpoint(
            save_directory,
            self.vision_model.config,
            self.text_model.config,
            self.state_dict(),
            self.vision_model.processor_config,
        )

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
        return self.text_model(input_ids, attention_mask).pooler_output

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B_images, B_texts) logits of already computed features (normalised here)."""
        image, text = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        return image @ text.T.to(image.dtype) * self.logit_scale.exp() + self.logit_bias

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        spatial_shapes: Grids | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits of every image against every text."""
        image = F.normalize(self.get_image_features(pixel_values, spatial_shapes, pixel_attention_mask), dim=-1)
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_text = text @ image.T.to(text.dtype) * self.logit_scale.exp() + self.logit_bias
        return ModelOutput(logits_per_text.T, logits_per_text, image, text)
