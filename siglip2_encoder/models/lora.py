"""LoRA on the tower (or both towers of the image-text model) through peft, in one call.

The adapters are ordinary peft LoRA adapters on modules named as in transformers' ``SiglipVisionModel``
(``encoder.layers.N.self_attn.q_proj`` ...), so an adapter trained on transformers' tower loads into this one and
the other way round, with peft's own save / load / merge / unmerge / disable and named adapters.

Only encoder layers are targeted, never the attention-pooling head: transformers runs that head through
``nn.MultiheadAttention``, which reads ``out_proj.weight`` directly, so a LoRA there would train in one
implementation and do nothing in the other.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..checkpoints.hf_format import hf_loading
from ..checkpoints.publish import HubMixin, ModelCardInfo, hub_id
from ..files import write_atomic
from .joint import SigLIP2Model
from .model import SigLIP2Encoder

__all__ = ["LORA_MODULES", "EncoderLoRAConfig", "LoRAAdapter", "add_lora", "trainable_parameters"]

logger = logging.getLogger(__name__)

LORA_MODULES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


@dataclass(frozen=True)
class EncoderLoRAConfig:
    """Where and how big the LoRA adapters are."""

    r: int = 16  # rank
    alpha: float = 16.0  # scale = alpha / r
    dropout: float = 0.0  # dropout on the adapter input
    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")  # any of LORA_MODULES
    # Which entries of encoder.layers (the module names' 0-based numbering, not hidden-state indices): None = all;
    # an int n = the last n; a tuple = indices, negatives from the end (-1 is the last layer).
    encoder_layers: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got r={self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got alpha={self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        object.__setattr__(self, "modules", tuple(self.modules))
        unknown = [m for m in self.modules if m not in LORA_MODULES]
        if unknown or not self.modules:
            raise ValueError(f"modules must be a non-empty subset of {list(LORA_MODULES)}, got {list(self.modules)}")
        if isinstance(self.encoder_layers, list):
            object.__setattr__(self, "encoder_layers", tuple(self.encoder_layers))

    def layer_indices(self, num_layers: int) -> list[int]:
        """The 0-based encoder layers that get adapters, for a tower of ``num_layers``."""
        if self.encoder_layers is None:
            return list(range(num_layers))
        if isinstance(self.encoder_layers, int):
            if not 1 <= self.encoder_layers <= num_layers:
                raise ValueError(
                    f"encoder_layers={self.encoder_layers} must take between 1 and {num_layers} last layers"
                )
            return list(range(num_layers - self.encoder_layers, num_layers))
        indices = sorted({i % num_layers for i in self.encoder_layers if -num_layers <= i < num_layers})
        if len(indices) != len(set(self.encoder_layers)) or not indices:
            raise ValueError(
                f"encoder_layers={self.encoder_layers} must be indices in [{-num_layers}, {num_layers - 1}]"
            )
        return indices

    def target_modules(self, num_layers: int, prefix: str = "") -> list[str]:
        """Full module names, e.g. ``encoder.layers.26.self_attn.q_proj``: they match nothing in the head.
        ``prefix`` names the tower in a joint model (``"text_model."``)."""
        layers = self.layer_indices(num_layers)
        return [f"{prefix}encoder.layers.{i}.{LORA_MODULES[m]}" for i in layers for m in self.modules]

    def to_peft(self, tower_layers: Mapping[str, int]) -> LoraConfig:
        """peft's config for towers given as module prefix -> number of encoder layers (``{"": 27}``: one tower)."""
        targets = [t for prefix, n in tower_layers.items() for t in self.target_modules(n, prefix)]
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, bias="none"
        )


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


TOWERS = {"vision": "vision_model.", "text": "text_model."}  # SigLIP2Model's towers -> their module prefixes


def _tower_layers(model: nn.Module, towers: Sequence[str] | None) -> dict[str, int]:
    """Module prefix -> encoder layers, for each tower the adapter goes into."""
    if isinstance(model, SigLIP2Encoder):
        if towers is not None:
            raise ValueError(f"towers={towers!r} applies to a SigLIP2Model; a SigLIP2Encoder is one tower")
        return {"": model.num_layers}
    if not isinstance(model, SigLIP2Model):
        raise TypeError(
            f"add_lora takes a SigLIP2Encoder, a SigLIP2Model or a PeftModel around one, got {type(model).__name__}"
        )
    towers = tuple(TOWERS) if towers is None else tuple(towers)
    if not towers or any(t not in TOWERS for t in towers) or len(set(towers)) != len(towers):
        raise ValueError(f"towers must be distinct names out of {list(TOWERS)}, got {list(towers)}")
    return {TOWERS[t]: len(getattr(model, TOWERS[t][:-1]).encoder.layers) for t in towers}


def add_lora(
    model: SigLIP2Encoder | SigLIP2Model | PeftModel,
    config: EncoderLoRAConfig | None = None,
    adapter_name: str = "default",
    *,
    towers: Sequence[str] | None = None,
) -> PeftModel:
    """Add a LoRA adapter to the tower (or to the towers of an image-text model) and freeze everything else.

    Args:
        model: a :class:`~siglip2_encoder.SigLIP2Encoder` or :class:`~siglip2_encoder.SigLIP2Model`, or a PeftModel
            around one to add another named adapter.
        config: ranks, modules and layers (default: rank 16 on q, k, v, out of every layer); ``encoder_layers``
            counts in each tower.
        adapter_name: the adapter's name (several can live side by side; ``set_adapter`` picks the active one).
        towers: for a SigLIP2Model, ``"vision"``, ``"text"`` or both (the default); the temperature and bias stay
            frozen, as everything but the adapters.

    Returns:
        The peft model; call it like the model. ``save_pretrained`` writes peft's standard adapter format, whose
        module names are transformers' (``text_model.encoder.layers.N...``), so it loads into their model too.
    """
    config = config or EncoderLoRAConfig()
    layers = _tower_layers(model.get_base_model() if isinstance(model, PeftModel) else model, towers)
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; choose another adapter_name")
        model.add_adapter(adapter_name, config.to_peft(layers))
        peft_model = model
    else:
        peft_model = get_peft_model(model, config.to_peft(layers), adapter_name=adapter_name)
    trainable, total = trainable_parameters(peft_model)
    logger.info(
        "LoRA %r: r=%d on %s of %s layers; trainable %d of %d parameters (%.2f%%)",
        adapter_name,
        config.r,
        "/".join(config.modules),
        " + ".join(str(len(config.layer_indices(n))) for n in layers.values()),
        trainable,
        total,
        100 * trainable / total,
    )
    return peft_model


class LoRAAdapter(HubMixin):
    """A LoRA-wrapped tower (from :func:`add_lora`) as a publishable adapter: peft's own files
    (``adapter_config.json``, ``adapter_model.safetensors``), with a card naming the base and the LoRA settings."""

    def __init__(self, tower: PeftModel) -> None:
        if not isinstance(tower, PeftModel) or not isinstance(tower.get_base_model(), SigLIP2Encoder):
            raise TypeError(f"expected a tower wrapped by add_lora (a peft PeftModel), got {type(tower).__name__}")
        self.tower = tower

    @property
    def base_checkpoint(self) -> str | None:
        return self.tower.get_base_model().name_or_path

    @property
    def transformers_class(self) -> str:
        """transformers' class of the base tower, which loads it from its folder (``SiglipVisionModel``, ...)."""
        return hf_loading(self.tower.get_base_model().config)[0]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """peft's files, with ``auto_mapping`` naming transformers' class of the base tower: peft records this
        library's class, which ``AutoPeftModel.from_pretrained`` refuses to import (outside its allowlist); with
        transformers' class it loads the base checkpoint and the adapter without this library."""
        self.tower.save_pretrained(folder)
        mapping = {"base_model_class": self.transformers_class, "parent_library": "transformers"}
        for config_file in Path(folder).rglob("adapter_config.json"):  # one per adapter
            config = json.loads(config_file.read_text())
            config["auto_mapping"] = mapping
            write_atomic(config_file, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())

    def model_card_info(self) -> ModelCardInfo:
        config = self.tower.peft_config[self.tower.active_adapter]
        base = self.base_checkpoint
        shown = base or "BASE_CHECKPOINT"  # the card says to replace it when the base was not a checkpoint
        targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else config.target_modules
        transformers_class, arguments = hf_loading(self.tower.get_base_model().config)
        return ModelCardInfo(
            title=f"LoRA adapter (r={config.r}) for a SigLIP vision tower",
            summary="A LoRA adapter for a SigLIP / SigLIP 2 vision tower, trained with siglip2-encoder and saved by "
            "peft; its module names are transformers', so it loads on transformers' tower too.",
            details=[
                ("base checkpoint", base or "not a saved checkpoint: replace BASE_CHECKPOINT in the code below"),
                ("LoRA", f"r={config.r}, lora_alpha={config.lora_alpha}, lora_dropout={config.lora_dropout}"),
                ("target modules", f"{len(targets)} modules" if len(targets) > 6 else str(targets)),
            ],
            snippet="from peft import PeftModel\nfrom siglip2_encoder import SigLIP2Encoder\n\n"
            f'tower = PeftModel.from_pretrained(SigLIP2Encoder.from_pretrained("{shown}"), "{{repo_id}}")\n',
            transformers_snippet=f"from peft import PeftModel\nfrom transformers import {transformers_class}\n\n"
            f'model = PeftModel.from_pretrained({transformers_class}.from_pretrained("{shown}"{arguments}), '
            '"{repo_id}")\n',
            base_model=hub_id(base),
            tags=("siglip", "lora", "peft"),
            library_name="peft",
            pipeline_tag="image-feature-extraction",
        )
