"""The tower as a transformers Backbone (``BackboneMixin`` conventions), buildable by ``AutoBackbone`` and usable
inside transformers' ``UperNetForSemanticSegmentation``.

Stages are the tower's hidden states: ``stem`` = the embeddings (hidden state 0), ``stageN`` = the output of layer
N, so ``out_indices`` use transformers' hidden-state indexing. Feature maps are NCHW at stride = patch size, all with
``hidden_size`` channels; ``apply_layernorm`` passes them through the post-layernorm first (the default, as for
transformers' DINOv2 backbone).

DPT: ``DPTForDepthEstimation`` with a backbone expects ViT hidden states with a CLS token for its readout; SigLIP
has none, so it is not supported. Depth works with this library's :class:`~siglip2_encoder.integrations.heads.
DenseModel` (task="depth") instead.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoBackbone, AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from ..config import EncoderConfig
from ..models.model import SigLIP2Encoder
from ..output import tokens_to_map

__all__ = ["SigLIP2BackboneConfig", "SigLIP2Backbone"]

# The tower's architecture fields, declared once in EncoderConfig; a backbone has no pooling head.
_TOWER_FIELDS = [f for f in fields(EncoderConfig) if f.name != "use_head"]


@strict
class SigLIP2BackboneConfig(BackboneConfigMixin, PreTrainedConfig):
    """The backbone's outputs, plus the tower's architecture fields as keyword arguments: every field of
    :class:`~siglip2_encoder.EncoderConfig` but ``use_head``, with its defaults (e.g. ``hidden_size=768``)."""

    model_type = "siglip2_encoder_backbone"

    apply_layernorm: bool = True
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        for field in _TOWER_FIELDS:
            setattr(self, field.name, kwargs.pop(field.name, field.default))
        self.encoder_config()  # validates the architecture fields, naming a bad one
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    @classmethod
    def from_encoder_config(cls, config: EncoderConfig, **kwargs) -> SigLIP2BackboneConfig:
        return cls(**{f.name: getattr(config, f.name) for f in _TOWER_FIELDS}, **kwargs)

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(**{f.name: getattr(self, f.name) for f in _TOWER_FIELDS}, use_head=False)


class SigLIP2Backbone(BackboneMixin, PreTrainedModel):
    """(B, 3, H, W) -> ``BackboneOutput.feature_maps``: one (B, D, H/p, W/p) map per ``out_features`` stage; with
    ``output_hidden_states``, ``hidden_states`` holds the embeddings and every layer's output (num_layers + 1
    tensors of (B, N, D)), whatever the stages, as transformers' ViT backbones (e.g. ``Dinov2Backbone``) do."""

    config_class = SigLIP2BackboneConfig
    base_model_prefix = "siglip2_backbone"
    main_input_name = "pixel_values"
    has_attentions = False

    def __init__(self, config: SigLIP2BackboneConfig) -> None:
        super().__init__(config)
        self.encoder = SigLIP2Encoder(config.encoder_config())
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The encoder initialises itself; transformers' generic initialisation must not overwrite it."""

    @classmethod
    def from_encoder(cls, encoder: SigLIP2Encoder, **config_kwargs) -> SigLIP2Backbone:
        """A backbone around a loaded tower's weights (its attention-pooling head is dropped), e.g.
        ``SigLIP2Backbone.from_encoder(SigLIP2Encoder.from_pretrained(...), out_indices=[7, 14, 21, 27])``."""
        backbone = cls(SigLIP2BackboneConfig.from_encoder_config(encoder.config, **config_kwargs))
        backbone.load_encoder(encoder)
        return backbone

    def load_encoder(self, encoder: SigLIP2Encoder) -> None:
        """Copy a tower's weights in (strict, except for the pooling head a backbone does not have)."""
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
        self.encoder.load_state_dict(state, strict=True)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        if output_attentions:
            raise ValueError("SigLIP2Backbone does not return attention weights (it uses fused attention)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        stages = [self.stage_names.index(name) for name in self.out_features]
        every = list(range(self.config.num_hidden_layers + 1))
        out = self.encoder(
            pixel_values, layers=every if output_hidden_states else stages, return_last=False, return_pooled=False
        )
        maps = []
        for stage in stages:
            tokens = out.hidden_states[stage]
            if self.config.apply_layernorm:
                tokens = self.encoder.post_layernorm(tokens)
            maps.append(tokens_to_map(tokens, out.grids[0]).contiguous())
        hidden = tuple(out.hidden_states[i] for i in every) if output_hidden_states else None
        if return_dict is False:
            return (tuple(maps),) + ((hidden,) if hidden is not None else ())
        return BackboneOutput(feature_maps=tuple(maps), hidden_states=hidden)


# Registered when this module is imported, i.e. when a user asks for the backbone: then AutoBackbone and the
# models that build their backbone from a config (UperNet) find it.
AutoConfig.register(SigLIP2BackboneConfig.model_type, SigLIP2BackboneConfig, exist_ok=True)
AutoBackbone.register(SigLIP2BackboneConfig, SigLIP2Backbone, exist_ok=True)
