"""Saving, loading and publishing a :class:`~.llava.VisionLanguageModel` in this library's own format, apart from
what the model computes (``llava.py``): ``vision_tower/``, ``projector/``, ``language_model/`` (and ``tokenizer/``)
folders, ``vlm_config.json`` (image token id, tiling, splitting, token reduction) and the learned ``image_newline``.
Transformers' formats are written by :mod:`.llava_export`, :mod:`.idefics3_export` and :mod:`.lfm2_vl_export`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import Projector, load_projector
from ..checkpoints.hub import CheckpointSource, FromPretrainedMixin
from ..checkpoints.publish import HubMixin, ModelCardInfo, hub_id
from ..files import write_atomic
from ..models.model import SigLIP2Encoder
from ..models.token_merging import TokenMerging
from .anyres import AnyResTiling
from .lfm2_splitting import Lfm2VlSplitting
from .reduction import TokenPruning
from .splitting import ImageSplitting

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CONFIG_FILE", "NEWLINE_FILE", "REDUCTIONS", "SPLITTINGS", "VLMIOMixin"]

CONFIG_FILE = "vlm_config.json"
NEWLINE_FILE = "image_newline.safetensors"
# How a saved model names its token reduction (vlm_config.json's "reduction" "kind").
REDUCTIONS: dict[str, type[TokenPruning] | type[TokenMerging]] = {"pruning": TokenPruning, "merging": TokenMerging}
# How it names its image splitting ("splitting" "kind"; files written before LFM2-VL's have none: Idefics3's).
SPLITTINGS: dict[str, type[ImageSplitting] | type[Lfm2VlSplitting]] = {
    "idefics3": ImageSplitting,
    "lfm2_vl": Lfm2VlSplitting,
}


class VLMIOMixin(FromPretrainedMixin, HubMixin):
    """``save_pretrained`` / ``from_pretrained`` (``from_source``), the LoRA check before a save, and the Hub card, of
    a model class built as ``cls(vision_tower, projector, language_model, image_token_id, tiling, splitting,
    reduction)``."""

    vision_tower: SigLIP2Encoder | PeftModel
    projector: Projector
    language_model: PreTrainedModel | PeftModel
    image_token_id: int
    tiling: AnyResTiling | None
    splitting: ImageSplitting | Lfm2VlSplitting | None
    reduction: TokenPruning | TokenMerging | None
    image_newline: nn.Parameter | None

    @property
    def tower(self) -> SigLIP2Encoder:
        """The encoder itself, inside a LoRA wrapper if there is one."""
        tower = self.vision_tower
        return tower.get_base_model() if isinstance(tower, PeftModel) else tower

    def check_merged(self, action: str) -> None:
        """Refuse ``action`` (``"cannot save"``, ...) while the tower or the LM holds LoRA adapters: their weights
        are not yet in the layout a checkpoint has."""
        wrapped = [name for name in ("vision_tower", "language_model") if isinstance(getattr(self, name), PeftModel)]
        if wrapped:
            raise ValueError(
                f"{action}: the {' and the '.join(wrapped)} hold LoRA adapters; call merge_lora() first, or save the "
                f"adapters with their own save_pretrained"
            )

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Write ``vision_tower/``, ``projector/``, ``language_model/`` (and ``tokenizer/``) plus vlm_config.json."""
        self.check_merged("cannot save")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.vision_tower.save_pretrained(folder / "vision_tower")
        self.projector.save_pretrained(folder / "projector")
        self.language_model.save_pretrained(folder / "language_model")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / "tokenizer")
        config: dict[str, Any] = {"image_token_id": self.image_token_id}
        if self.splitting is not None:
            kind = next(k for k, cls in SPLITTINGS.items() if isinstance(self.splitting, cls))
            config["splitting"] = {"kind": kind, **asdict(self.splitting)}
        if self.reduction is not None:
            kind = next(k for k, cls in REDUCTIONS.items() if isinstance(self.reduction, cls))
            config["reduction"] = {"kind": kind, **asdict(self.reduction)}
        if self.tiling is not None:
            config["tiling"] = asdict(self.tiling)
            save_file({"image_newline": self.image_newline.detach().contiguous()}, folder / NEWLINE_FILE)
        write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())

    @property
    def base_checkpoint(self) -> str | None:
        """The language model's checkpoint: a VLM carries its LM's license."""
        return getattr(self.language_model, "name_or_path", None) or None

    def model_card_info(self) -> ModelCardInfo:
        """What :meth:`push_to_hub`'s model card says of this VLM (its own format; ``export_llava`` for
        transformers')."""
        projector = self.projector.config
        return ModelCardInfo(
            title=f"LLaVA-style VLM: SigLIP tower + {projector.kind} projector + {type(self.language_model).__name__}",
            summary="A vision-language model built with siglip2-encoder: a SigLIP vision tower, a projector and a "
            "causal language model, saved in this library's format (vision_tower/, projector/, language_model/).",
            details=[
                ("vision tower", self.tower.name_or_path or "none (random initialisation)"),
                ("projector", f"{projector.kind}, tower layers {projector.layers}"),
                ("language model", self.base_checkpoint or "none (random initialisation)"),
                ("image token id", str(self.image_token_id)),
            ],
            snippet="from siglip2_encoder.integrations.llava import VisionLanguageModel\n\n"
            'model = VisionLanguageModel.from_pretrained("{repo_id}")\n',
            base_model=hub_id(self.base_checkpoint),
            tags=("siglip", "image-text-to-text", "llava"),
            pipeline_tag="image-text-to-text",
        )

    @classmethod
    def from_source(
        cls, source: CheckpointSource, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> Self:
        """A folder written by :meth:`save_pretrained` (``from_pretrained(name_or_path)``: the folder, or a Hub repo
        of one, its cache first)."""
        folder = source.snapshot()
        if not (folder / CONFIG_FILE).is_file():
            raise ValueError(f"{folder} has no {CONFIG_FILE}; was it written by VisionLanguageModel.save_pretrained?")
        config = json.loads((folder / CONFIG_FILE).read_text())
        lm_config = AutoConfig.from_pretrained(folder / "language_model")
        tiling, splitting, reduction = config.get("tiling"), config.get("splitting"), config.get("reduction")
        model = cls(
            SigLIP2Encoder.from_pretrained(folder / "vision_tower", dtype=dtype),
            load_projector(folder / "projector"),
            AutoModelForCausalLM.from_pretrained(folder / "language_model", config=lm_config, dtype=dtype),
            config["image_token_id"],
            None if tiling is None else AnyResTiling(**tiling),
            None if splitting is None else SPLITTINGS[splitting.pop("kind", "idefics3")](**splitting),
            None if reduction is None else REDUCTIONS[reduction.pop("kind")](**reduction),
        )
        if model.image_newline is not None:
            with torch.no_grad():
                model.image_newline.copy_(load_file(folder / NEWLINE_FILE)["image_newline"])
        return model if device is None else model.to(device)
