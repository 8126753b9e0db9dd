"""Strict loading, the one check every loader makes: each weight the model expects, with its shape, and none it
does not (:func:`check_state_dict`, :func:`build_loaded`); and :func:`foreign_modules`, which finds what a model
holds beyond its checkpoint layout (LoRA wrappers, quantized or prepacked layers)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from .hub import CheckpointError

__all__ = ["build_loaded", "check_plain", "check_state_dict", "foreign_modules"]


def foreign_modules(model: torch.nn.Module, reference: torch.nn.Module) -> list[tuple[str, str]]:
    """(name, qualified type) of every outermost module of ``model`` whose type differs from ``reference``'s module
    of that name (LoRA wrappers, quantized or prepacked layers): their weights do not have the checkpoint layout.
    ``reference`` is the plain model of the same config (build it on the meta device: it costs no memory)."""
    own = {name: type(m) for name, m in reference.named_modules()}
    foreign: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        inside = foreign and name.startswith(foreign[-1][0] + ".")
        if own.get(name) is not type(module) and not inside:
            foreign.append((name, f"{type(module).__module__}.{type(module).__qualname__}"))
    return foreign


def check_state_dict(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str, what: str = "tower"
) -> None:
    """Strict loading: raise :class:`CheckpointError` listing missing, unexpected and misshapen weights.

    ``expected`` is the model's own state dict (shapes only are read; a model on the meta device will do).
    """
    for key, tensor in state.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"weight {key} in {source} has shape {tuple(tensor.shape)}, but the config implies "
                f"{tuple(expected[key].shape)}"
            )
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = [
            f"missing: {show(missing)}" if missing else "",
            f"unexpected: {show(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(
            f"the weights in {source} do not match the {what} its config describes "
            f"({'; '.join(p for p in parts if p)}). Is this a SigLIP / SigLIP 2 checkpoint, and is config.json its own?"
        )


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def build_loaded(
    build: Callable[[], ModuleT],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    what: str,
    device: str | torch.device | None = None,
) -> ModuleT:
    """``build()`` on the meta device, checked strictly against ``state_dict`` and given its tensors (no random
    initialisation, no copy), moved to ``device``, in eval(): the last step of every ``from_pretrained``."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model.state_dict(), state_dict, source, what=what)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device).eval() if device is not None else model.eval()


def check_plain(
    model: torch.nn.Module, build_reference: Callable[[], torch.nn.Module], action: str, what: str = "tower"
) -> None:
    """Refuse ``action`` (``"cannot save"``, ``"quantize needs a plain tower"``, ...) on a model that holds more than
    its checkpoint layout: modules of other types than the plain model ``build_reference()`` builds (LoRA wrappers,
    prepacked layers; :func:`foreign_modules`), or quantized weights (tensor subclasses). The reference is built on
    the meta device: it costs no memory.

    Raises:
        ValueError: naming how many modules or weights, the first ones, and what to do instead.
    """
    with torch.device("meta"):
        reference = build_reference()
    foreign = foreign_modules(model, reference)
    if foreign:
        shown = ", ".join(f"{name} ({kind})" for name, kind in foreign[:3])
        raise ValueError(
            f"{action}: {len(foreign)} module(s) are not the {what}'s own, e.g. {shown}. Merge "
            f"LoRA adapters first (merge_and_unload()) or save them with the PeftModel's save_pretrained; a "
            f"prepack_for_cpu() copy is for inference: use the {what} it was made from"
        )
    quantized = [name for name, p in model.named_parameters() if type(p) is not torch.nn.Parameter]
    if quantized:
        raise ValueError(
            f"{action}: {len(quantized)} weights are quantized (e.g. {quantized[0]}); a quantize() copy is for "
            f"inference: use the {what} it was made from"
        )
