"""What every projector shares: its input (vision tokens with their grids), its output (LLM-width tokens with exact
per-image counts), a config base class, save / load, and the registry that maps a config's ``kind`` to its class."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints.hub import CheckpointSource
from ..checkpoints.publish import HubMixin, ModelCardInfo
from ..config import check_positive_ints
from ..files import write_atomic
from ..output import EncoderOutput

__all__ = [
    "PROJECTORS",
    "ProjectedTokens",
    "Projector",
    "ProjectorConfig",
    "VisionFeatures",
    "build_projector",
    "load_projector",
    "mlp",
]

CONFIG_FILE, WEIGHTS_FILE = "projector_config.json", "projector.safetensors"


@dataclass
class VisionFeatures:
    """Vision tokens ready for a projector.

    Attributes:
        tokens: (B, N, C) tokens, padded to the longest image; C = width x layers when layers are concatenated.
        grids: each image's token grid (h, w); image b's tokens are its first h * w rows, row-major.
        mask: (B, N) bool, True for real tokens; None when every token is real.
    """

    tokens: torch.Tensor
    grids: list[tuple[int, int]]
    mask: torch.Tensor | None = None

    @classmethod
    def from_output(
        cls, output: EncoderOutput, layers: Sequence[int | None] = (-2,), combine: str = "concat"
    ) -> VisionFeatures:
        """Select and combine encoder layers: ``None`` = ``last_hidden_state`` (after post-layernorm), an int = a
        hidden state in transformers' indexing (-2 = penultimate); ``combine`` = "concat" (on channels) or "mean"."""
        parts = [output.tokens(layer) for layer in layers]
        if combine == "concat":
            tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        elif combine == "mean":
            tokens = torch.stack(parts).mean(0)
        else:
            raise ValueError(f"combine must be 'concat' or 'mean', got {combine!r}")
        return cls(tokens, output.grids, output.attention_mask)

    @property
    def token_counts(self) -> list[int]:
        return [h * w for h, w in self.grids]

    def per_image(self) -> list[torch.Tensor]:
        """Image b's tokens as (h_b, w_b, C)."""
        return [self.tokens[b, : h * w].reshape(h, w, -1) for b, (h, w) in enumerate(self.grids)]


@dataclass
class ProjectedTokens:
    """A projector's output.

    Attributes:
        tokens: (B, M, D) LLM-width tokens, padded to the longest image with zeros.
        token_counts: image b's number of tokens; an LM inserts exactly this many placeholders for it.
        mask: (B, M) bool, True for real tokens; None when every image has M tokens.
    """

    tokens: torch.Tensor
    token_counts: list[int]
    mask: torch.Tensor | None = None

    def per_image(self) -> list[torch.Tensor]:
        """Image b's tokens (token_counts[b], D)."""
        return [self.tokens[b, :n] for b, n in enumerate(self.token_counts)]

    @classmethod
    def pack(cls, per_image: Sequence[torch.Tensor]) -> ProjectedTokens:
        """Pad per-image (n_b, D) tensors into one batch."""
        counts = [len(t) for t in per_image]
        longest = max(counts)
        if all(n == longest for n in counts):
            return cls(torch.stack(list(per_image)), counts)
        tokens = per_image[0].new_zeros(len(per_image), longest, per_image[0].shape[-1])
        mask = torch.zeros(len(per_image), longest, dtype=torch.bool, device=tokens.device)
        for b, t in enumerate(per_image):
            tokens[b, : len(t)] = t
            mask[b, : len(t)] = True
        return cls(tokens, counts, mask)


@dataclass(frozen=True)
class ProjectorConfig:
    """Fields every projector has. Subclasses add their own and set the class variable ``kind``."""

    kind: ClassVar[str] = ""
    in_features: int = 1152  # vision tower width D (of one layer)
    out_features: int = 4096  # language model width
    layers: tuple[int | None, ...] = (-2,)  # encoder layers fed in: None = last_hidden_state, int = hidden state
    combine: str = "concat"  # several layers: "concat" on channels or "mean"

    def __post_init__(self) -> None:
        check_positive_ints(self, "in_features", "out_features")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or any(not (layer is None or isinstance(layer, int)) for layer in self.layers):
            raise ValueError(f"layers must be a non-empty sequence of ints or None, got layers={self.layers!r}")
        if self.combine not in ("concat", "mean"):
            raise ValueError(f"combine must be 'concat' or 'mean', got combine={self.combine!r}")

    @property
    def input_width(self) -> int:
        """Channels the projector receives: in_features times the number of layers if concatenated."""
        return self.in_features * (len(self.layers) if self.combine == "concat" else 1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


class Projector(HubMixin, nn.Module):
    """Base class: vision tokens with grids in, LLM-width tokens with exact per-image counts out."""

    config_class: ClassVar[type[ProjectorConfig]] = ProjectorConfig

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """Tokens this projector emits for an image with token grid (h, w), without running it."""
        raise NotImplementedError

    def project(self, features: VisionFeatures) -> ProjectedTokens:
        raise NotImplementedError

    def forward(self, features: VisionFeatures | EncoderOutput) -> ProjectedTokens:
        """Project :class:`VisionFeatures`, or an :class:`~siglip2_encoder.EncoderOutput` from which the configured
        layers are selected (request them with ``encoder(..., layers=config.layers)``)."""
        if isinstance(features, EncoderOutput):
            features = VisionFeatures.from_output(features, self.config.layers, self.config.combine)
        width = features.tokens.shape[-1]
        if width != self.config.input_width:
            raise ValueError(
                f"{type(self).__name__} expects {self.config.input_width} channels per token (in_features="
                f"{self.config.in_features} x {len(self.config.layers)} layers, {self.config.combine}), got {width}"
            )
        out = self.project(features)
        expected = [self.num_tokens(grid) for grid in features.grids]
        if out.token_counts != expected:  # a bug in a projector, not user input
            raise RuntimeError(f"{type(self).__name__} emitted {out.token_counts} tokens, promised {expected}")
        return out

    def model_card_info(self) -> ModelCardInfo:
        """What :meth:`push_to_hub`'s model card says of this projector."""
        c = self.config
        return ModelCardInfo(
            title=f"{type(self).__name__}: {c.input_width} -> {c.out_features} channels",
            summary="A vision-to-language projector for SigLIP towers, saved by siglip2-encoder.",
            details=[("kind", c.kind), ("tower layers read", str(c.layers))]
            + [(k, str(v)) for k, v in c.to_dict().items() if k not in ("kind", "layers")],
            snippet='from siglip2_encoder.adapters import load_projector\n\nprojector = load_projector("{repo_id}")\n',
            tags=("siglip", "projector"),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``projector_config.json`` and ``projector.safetensors``; :func:`load_projector` reads them."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
        write_atomic(folder / CONFIG_FILE, (json.dumps(self.config.to_dict(), indent=2) + "\n").encode())


PROJECTORS: dict[str, type[Projector]] = {}


def register(cls: type[Projector]) -> type[Projector]:
    """Class decorator: make ``cls`` buildable from configs of kind ``cls.config_class.kind``."""
    PROJECTORS[cls.config_class.kind] = cls
    return cls


def build_projector(config: ProjectorConfig) -> Projector:
    """A freshly initialised projector for ``config`` (dispatch on its ``kind``)."""
    if config.kind not in PROJECTORS:
        raise ValueError(f"no projector of kind {config.kind!r}; known kinds: {sorted(PROJECTORS)}")
    return PROJECTORS[config.kind](config)


def load_projector(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Projector:
    """Load a projector saved with :meth:`Projector.save_pretrained` from a folder or a Hub repo (its cache first;
    strict: weights must match exactly)."""
    source = CheckpointSource(
        name_or_path, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    folder = source.snapshot()
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{folder} has no {CONFIG_FILE}; was it written by Projector.save_pretrained?")
    raw = json.loads((folder / CONFIG_FILE).read_text())
    kind = raw.pop("kind", None)
    if kind not in PROJECTORS:
        raise ValueError(f"{folder / CONFIG_FILE} has kind={kind!r}; known kinds: {sorted(PROJECTORS)}")
    cls = PROJECTORS[kind]
    known = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{folder / CONFIG_FILE} has fields {unknown} that {cls.config_class.__name__} lacks")
    projector = cls(cls.config_class(**raw))
    projector.load_state_dict(load_file(folder / WEIGHTS_FILE, device=str(device or "cpu")), strict=True)
    return projector


def mlp(in_features: int, hidden: int, out_features: int, depth: int, bias: bool = True) -> nn.Sequential:
    """depth 1: one linear layer; depth n: n linear layers with GELU between (LLaVA-1.5's ``mlp2x_gelu`` is
    depth 2 with hidden = out_features); ``bias=False``: linear layers without bias."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got depth={depth}")
    widths = [in_features] + [hidden] * (depth - 1) + [out_features]
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
    return nn.Sequential(*layers)
