"""Export to transformers' ``Idefics3ForConditionalGeneration`` format (Idefics3, and SmolVLM's architecture).

What fits Idefics3's format, and why the rest does not:

* the tower must be fixed-resolution (Idefics3's vision model is a conv-embedding SigLIP tower without a head; the
  head's weights are not written) with a square grid that the shuffle factor divides (Idefics3 reshapes the tokens
  to a square before shuffling);
* the projector must be ``pixel_shuffle`` with depth 1 and ``bias=False`` on the final tokens (``layers=(None,)``):
  Idefics3's connector is exactly pixel shuffle then one linear layer without bias, on ``last_hidden_state``;
* LoRA adapters must be merged first (``VisionLanguageModel.merge_lora``).

Idefics3's tower reads positions at each patch's fractional coordinate for grids smaller than its native one, so a
tower that interpolates positions is only exact at its native size, which is what this library's processor (and
Idefics3's, tile by tile) feeds it; the export says so in a warning.

Exported folders load with ``Idefics3ForConditionalGeneration.from_pretrained(folder)`` and give the same logits as
the model they came from (tested with a Llama language model).
"""

from __future__ import annotations

import logging
import os

from peft import PeftModel
from transformers import Idefics3Config, PreTrainedTokenizerBase

from ..adapters import PixelShuffleProjector
from ..convert import config_to_hf
from .hf_export import language_model_weights, write_export
from .llava import VisionLanguageModel

__all__ = ["export_idefics3"]

logger = logging.getLogger(__name__)


def _check_exportable(model: VisionLanguageModel) -> None:
    if isinstance(model.vision_tower, PeftModel) or isinstance(model.language_model, PeftModel):
        raise ValueError("merge LoRA adapters before exporting: model.merge_lora()")
    tower = model.tower.config
    if tower.naflex:
        raise ValueError("NaFlex towers cannot be exported to Idefics3's format, whose tower is fixed-resolution")
    projector = model.projector
    if not isinstance(projector, PixelShuffleProjector):
        raise ValueError(
            f"Idefics3's connector is pixel shuffle then one linear layer; a {projector.config.kind!r} projector "
            f"cannot be exported to it"
        )
    config = projector.config
    if config.depth != 1 or config.bias or config.layers != (None,):
        raise ValueError(
            f"Idefics3's connector is one linear layer without bias on the final tokens; this projector has "
            f"depth={config.depth}, bias={config.bias}, layers={config.layers} (build it with depth=1, bias=False, "
            f"layers=(None,), e.g. get_recipe('idefics3').projector_config(...))"
        )
    if tower.position_grid % config.factor:
        raise ValueError(
            f"Idefics3 shuffles a square grid by scale_factor; the tower's {tower.position_grid}x"
            f"{tower.position_grid} grid is not divisible by factor={config.factor}"
        )


def export_idefics3(
    model: VisionLanguageModel, directory: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None
) -> None:
    """Write ``model`` as a transformers Idefics3 checkpoint (config.json, safetensors, preprocessor_config.json and
    the tokenizer if given). Raises ``ValueError`` naming the reason for configurations Idefics3 cannot express."""
    _check_exportable(model)
    tower, projector, lm = model.tower, model.projector, model.language_model
    if tower.config.position_lookup != "buckets":
        logger.warning(
            "Idefics3's tower looks positions up by buckets for images smaller than %dx%d pixels, where this tower "
            "interpolates: the export is exact at the native size (each tile of Idefics3's processor)",
            tower.config.image_size,
            tower.config.image_size,
        )
    vision = config_to_hf(tower.config.replace(use_head=False, position_lookup="buckets"))
    config = Idefics3Config(
        vision_config={k: v for k, v in vision.items() if k != "architectures"},
        text_config=lm.config.to_dict(),
        scale_factor=projector.config.factor,
        image_token_id=model.image_token_id,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    state = {f"model.vision_model.{k}": v for k, v in tower.state_dict().items() if not k.startswith("head.")}
    (linear,) = projector.proj
    state["model.connector.modality_projection.proj.weight"] = linear.weight
    state |= language_model_weights(lm, "model.text_model.", config.tie_word_embeddings)
    write_export(directory, config, state, tower.processor_config, tokenizer)
