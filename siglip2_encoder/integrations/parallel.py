"""Training the LLaVA-style VLM (or the tower) on several processes: DDP and FSDP2, as torchrun or
``accelerate launch`` start them. PyTorch does the work; this module only says where the model's repeated blocks
are and which parameters a forward pass never reaches.

* :func:`fully_shard_vlm`: FSDP2's ``fully_shard`` on every encoder layer of the tower, every decoder layer of the
  language model (the classes transformers declares in ``_no_split_modules``), then the whole model; mixed precision
  through ``mp_policy``.
* :func:`ddp_vlm`: ``DistributedDataParallel`` with ``find_unused_parameters`` set exactly when needed: the tower
  stops at the deepest layer its projector reads (layer -2 skips the last layer, the post-layernorm and the head),
  so those weights, when trainable, get no gradient.

Both give, per step, the parameters a single process gets on the combined batch when every rank's loss is the mean
over the same number of label tokens (tested on CPU with gloo, with full tower training and LoRA); with unequal
counts, pass the LM ``num_items_in_batch`` (the combined batch's predicted tokens) and scale the loss by the number of
ranks, as ``examples/train_vlm.py`` does. Checkpoints:
``torch.distributed.checkpoint`` (sharded, resumable on another number of ranks) or :func:`full_state_dict`
(gathered on rank 0, which saves it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .llava import VisionLanguageModel

__all__ = ["ddp_vlm", "decoder_layers", "full_state_dict", "fully_shard_vlm", "unused_parameters"]


def decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    """The language model's repeated blocks: the modules of the classes its transformers class declares
    unsplittable (``_no_split_modules``, e.g. ``LlamaDecoderLayer``), found under a peft wrapper too."""
    base = language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model
    if not isinstance(base, PreTrainedModel) or not base._no_split_modules:
        raise ValueError(
            f"{type(base).__name__} declares no _no_split_modules, so its decoder layers are unknown; shard it "
            f"yourself with torch.distributed.fsdp.fully_shard"
        )
    names = set(base._no_split_modules)
    return [module for module in base.modules() if type(module).__name__ in names]


def fully_shard_vlm(
    model: VisionLanguageModel,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> VisionLanguageModel:
    """Apply FSDP2 to ``model`` in place (per encoder layer, per LM decoder layer, then the root) and return it.

    Args:
        mesh: a ``DeviceMesh``; None = all ranks of the default process group on the current device type.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 parameters, fp32 reductions).
        reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3; False: ZeRO-2).
    """
    from torch.distributed.fsdp import fully_shard

    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for layer in [*model.tower.encoder.layers, *decoder_layers(model.language_model)]:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def unused_parameters(model: VisionLanguageModel) -> list[str]:
    """Names of the trainable parameters the model's forward never reaches: the tower's layers past the deepest
    one its projector reads, its post-layernorm and head when the projector reads hidden states only."""
    tower, layers = model.tower, model.projector.config.layers
    unused_prefixes: list[str] = []
    if None not in layers:
        depth = max(tower.layer_index(layer) for layer in layers)
        unused_prefixes = [f"encoder.layers.{i}." for i in range(depth, tower.config.num_hidden_layers)]
        unused_prefixes += ["post_layernorm.", "head."]
    elif tower.head is not None:
        unused_prefixes = ["head."]
    own = {id(p): name for name, p in tower.named_parameters()}
    names = []
    for name, parameter in model.named_parameters():
        tower_name = own.get(id(parameter))
        if parameter.requires_grad and tower_name is not None and tower_name.startswith(tuple(unused_prefixes)):
            names.append(name)
    return names


def ddp_vlm(model: VisionLanguageModel, **kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **kwargs)``, with ``find_unused_parameters`` on exactly when
    :func:`unused_parameters` finds trainable weights the forward skips (DDP would otherwise wait for their
    gradients forever)."""
    kwargs.setdefault("find_unused_parameters", bool(unused_parameters(model)))
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of a (possibly FSDP2-sharded) model, gathered into rank 0's CPU memory (a
    collective: call it on every rank; the others get an empty dict). Save it from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
