"""Loading, saving and publishing the vision tower: where :class:`~siglip2_encoder.SigLIP2Encoder` comes from and
goes to (a checkpoint, a preset, a big_vision ``.npz``; a transformers folder; the Hub), apart from what it computes
(``model.py``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ..checkpoints.big_vision import read_big_vision
from ..checkpoints.folders import read_checkpoint, write_checkpoint
from ..checkpoints.hf_format import hf_loading
from ..checkpoints.hub import CheckpointSource, FromPretrainedMixin
from ..checkpoints.publish import HubMixin, ModelCardInfo, hub_id
from ..checkpoints.strict import build_loaded, check_plain, foreign_modules
from ..config import EncoderConfig, ProcessorConfig
from ..presets import get_preset

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TowerIOMixin"]


class TowerIOMixin(FromPretrainedMixin, HubMixin):
    """``from_pretrained`` / ``from_source``, ``from_preset``, ``from_big_vision``, ``save_pretrained`` and the Hub
    card of a tower class built as ``cls(config, processor_config)``."""

    config: EncoderConfig
    processor_config: ProcessorConfig

    @classmethod
    def from_preset(
        cls, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None, **overrides
    ) -> Self:
        """A tower of a released architecture (see :func:`~siglip2_encoder.list_presets`) with random weights.

        ``overrides`` replace config fields, e.g. ``num_hidden_layers=2`` for a quick test. The features are
        meaningless; use :meth:`from_pretrained` for real ones.
        """
        preset = get_preset(name)
        config = preset.config.replace(**overrides)
        with torch.device(device or "cpu"):
            model = cls(config, ProcessorConfig.default_for(config, resample=preset.resample))
        return model.to(dtype=dtype) if dtype is not None else model

    @classmethod
    def from_source(
        cls, source: CheckpointSource, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> Self:
        """The vision tower of a SigLIP / SigLIP 2 checkpoint (``from_pretrained(name_or_path)`` with a Hub id or a
        local folder), in eval().

        Accepts transformers' ``siglip``, ``siglip2`` (image-text; the text tower is skipped) and
        ``siglip_vision_model``, ``siglip2_vision_model`` (vision-only) checkpoints, stored as ``model.safetensors``,
        sharded safetensors with an index (only the shards holding vision weights are read), or
        ``pytorch_model.bin``. Loading is strict: missing or unexpected vision weights raise an error listing them.
        ``dtype=None`` keeps the stored dtype.
        """
        stored = read_checkpoint(source, dtype=dtype)
        return build_loaded(
            lambda: cls(stored.config, stored.processor_config), stored.state_dict, str(source), "tower", device
        )

    @classmethod
    def from_big_vision(
        cls,
        path: str | os.PathLike,
        *,
        image_size: int | None = None,
        processor_config: ProcessorConfig | None = None,
        device: str | torch.device | None = None,
    ) -> Self:
        """Load the image tower of a big_vision ``.npz`` (Google's original SigLIP / SigLIP 2 release format), strictly.

        The architecture is read from the weights' shapes
        (:func:`~siglip2_encoder.checkpoints.big_vision.config_from_big_vision`);
        give ``image_size`` where the native size is not grid x patch (So400m/14 at 384). ``processor_config``
        defaults to big_vision's SigLIP preprocessing for the tower (resize, values to [-1, 1]).
        """
        stored = read_big_vision(path, image_size=image_size)
        processor = processor_config or stored.processor_config
        return build_loaded(lambda: cls(stored.config, processor), stored.state_dict, str(path), "tower", device)

    @property
    def base_checkpoint(self) -> str | None:
        return self.name_or_path

    def model_card_info(self) -> ModelCardInfo:
        """What :meth:`push_to_hub`'s model card says of this tower."""
        c = self.config
        size = f"NaFlex, {c.num_patches} position entries" if c.naflex else f"{c.image_size} px"
        transformers_class, arguments = hf_loading(c)
        return ModelCardInfo(
            title=f"SigLIP vision tower ({c.num_hidden_layers} layers, width {c.hidden_size}, patch {c.patch_size})",
            summary="A SigLIP / SigLIP 2 vision tower saved by siglip2-encoder, in transformers' format.",
            details=[
                ("base checkpoint", self.name_or_path or "none (random initialisation)"),
                ("architecture", f"{size}, {c.hidden_act}, {'with' if c.use_head else 'without'} attention-pool head"),
                ("preprocessing", str(self.processor_config)),
            ],
            snippet=(
                'from siglip2_encoder import ImageProcessor, SigLIP2Encoder\n\ntower = SigLIP2Encoder.from_pretrained("'
                '{repo_id}")\nprocessor = ImageProcessor.from_pretrained("{repo_id}")\n'
            ),
            transformers_snippet=f"from transformers import {transformers_class}\n\n"
            f'model = {transformers_class}.from_pretrained("{{repo_id}}"{arguments})\n',
            base_model=hub_id(self.name_or_path),
            tags=("siglip", "vision", "feature-extraction"),
            library_name="transformers",
            pipeline_tag="image-feature-extraction",
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json, model.safetensors and preprocessor_config.json that transformers'
        ``SiglipVisionModel`` / ``Siglip2VisionModel`` and :meth:`from_pretrained` both load."""
        check_plain(self, lambda: type(self)(self.config), "cannot save")
        write_checkpoint(save_directory, self.config, self.state_dict(), self.processor_config)

    def foreign_modules(self) -> list[tuple[str, str]]:
        """(name, qualified type) of every outermost module that is not the tower's own (LoRA wrappers, quantized or
        prepacked layers, ...): their weights do not have transformers' layout."""
        with torch.device("meta"):
            return foreign_modules(self, type(self)(self.config))
