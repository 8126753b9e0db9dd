"""Each VLM's feature recipe, by name: which tokens of the SigLIP tower its projector receives.

Users get the layer wrong constantly (LLaVA takes hidden state -2, PaliGemma the final tokens after the
post-layernorm, LLaVA-OneVision -1 of a tower whose last layer was already removed), so each VLM's choice is declared
once here, with its source, and :meth:`SigLIP2Encoder.features(images, recipe=name)
<siglip2_encoder.SigLIP2Encoder.features>` returns exactly that tensor. Projectors built for a recipe
(:meth:`Recipe.projector_config`) default to its token reduction and layer.

Each recipe was checked against its VLM's own transformers code path on random weights (the projector's input,
hooked), except ``prismatic``, which transformers does not implement: it was checked against timm's
``get_intermediate_layers``, the call Prismatic / OpenVLA make.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters import LinearConfig, MLPConfig, PixelShuffleConfig, PoolConfig, ProjectorConfig
from ..config import check_positive_ints

__all__ = ["RECIPES", "REDUCTIONS", "Recipe", "get_recipe", "list_recipes"]

# What a VLM's projector does to the token grid before its linear layers.
REDUCTIONS = (
    None,
    "pixel_shuffle",  # s x s blocks -> one token of s * s * D channels (Idefics3, SmolVLM, LFM2-VL, Aya Vision)
    "avg_pool",  # s x s average pooling (Gemma 3)
)


@dataclass(frozen=True)
class Recipe:
    """Which tokens of the tower one VLM feeds its projector. No VLM here reads the attention-pooling head.

    Attributes:
        name: the registry key.
        layer: transformers' hidden-state index (-2 = penultimate, before any norm), or None for the final tokens
            after the post-layernorm (``last_hidden_state``).
        reduction: the token reduction the VLM's projector applies before its linear layers, one of REDUCTIONS.
        factor: the reduction's block side; transformers' default for the VLM's config where checkpoints differ.
        image_size: the view the VLM feeds a fixed-resolution tower, where every checkpoint of the family uses one;
            None = the checkpoint's own preprocessing.
        depth: linear layers in the VLM's projector (1 = one linear layer, 2 = linear, GELU, linear).
        bias: whether those linear layers have biases (Idefics3's and SmolVLM's have none).
        source: where the choice is made in the VLM's code.
    """

    name: str
    layer: int | None
    reduction: str | None = None
    factor: int | None = None
    image_size: int | None = None
    depth: int = 2
    bias: bool = True
    source: str = ""

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got reduction={self.reduction!r}")
        if (self.reduction is None) != (self.factor is None):
            raise ValueError(
                f"factor is set exactly when there is a reduction, got reduction={self.reduction!r}, "
                f"factor={self.factor!r}"
            )
        if self.factor is not None:
            check_positive_ints(self, "factor")
        check_positive_ints(self, "depth")

    @property
    def post_layernorm(self) -> bool:
        """Whether the projector receives tokens after the tower's post-layernorm."""
        return self.layer is None

    def projector_config(self, in_features: int, out_features: int, **changes) -> ProjectorConfig:
        """The projector config of this recipe's shape: its layer, reduction and depth (``changes`` override)."""
        common = dict(in_features=in_features, out_features=out_features, layers=(self.layer,), depth=self.depth)
        if self.reduction == "pixel_shuffle":
            return PixelShuffleConfig(**common | dict(factor=self.factor, bias=self.bias) | changes)
        if self.reduction == "avg_pool":
            return PoolConfig(**common | dict(factor=self.factor, mode="avg") | changes)
        if self.depth == 1:
            common.pop("depth")
            return LinearConfig(**common | changes)
        return MLPConfig(**common | changes)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("llava", -2, source="LLaVA-1.5 / LLaVA-NeXT: vision_feature_layer=-2, select strategy 'full'"),
        Recipe(
            "llava_onevision",
            -1,
            image_size=384,
            source="LLaVA-OneVision: vision_feature_layer=-1 of its 26-layer So400m tower (the 27th removed)",
        ),
        Recipe("paligemma", None, depth=1, source="PaliGemma / PaliGemma 2: last_hidden_state, no head"),
        Recipe(
            "gemma3",
            None,
            "avg_pool",
            4,
            image_size=896,
            depth=1,
            source="Gemma 3: last_hidden_state, 4x4 average pooling to mm_tokens_per_image=256",
        ),
        Recipe(
            "idefics3",
            None,
            "pixel_shuffle",
            2,
            depth=1,
            bias=False,
            source="Idefics3: last_hidden_state, pixel shuffle by scale_factor (2)",
        ),
        Recipe(
            "smolvlm",
            None,
            "pixel_shuffle",
            2,
            depth=1,
            bias=False,
            source="SmolVLM: last_hidden_state, pixel shuffle by scale_factor (transformers' default 2; 3 or 4 in "
            "some checkpoints: set factor)",
        ),
        Recipe(
            "lfm2_vl",
            None,
            "pixel_shuffle",
            2,
            source="LFM2-VL: last_hidden_state of its NaFlex tower, 2x2 pixel unshuffle (downsample_factor)",
        ),
        Recipe(
            "aya_vision",
            -1,
            "pixel_shuffle",
            2,
            source="Aya Vision: vision_feature_layer=-1 of its 26-layer tower (no post-layernorm), pixel shuffle by "
            "downsample_factor (2), then LayerNorm and a SwiGLU MLP",
        ),
        Recipe(
            "cohere2_vision",
            None,
            "pixel_shuffle",
            2,
            source="Command A Vision: last_hidden_state, pixel shuffle by downsample_factor (2), then a SwiGLU MLP",
        ),
        Recipe(
            "modernvbert",
            None,
            "pixel_shuffle",
            4,
            depth=1,
            bias=False,
            source="ModernVBERT / ColModernVBERT / UltraVBERT: last_hidden_state, pixel shuffle by "
            "pixel_shuffle_factor (4), then a linear without bias (UltraVBERT: and an RMSNorm)",
        ),
        Recipe(
            "deepseek_vl",
            None,
            image_size=384,
            source="DeepSeek-VL (1.3B), Janus / Janus-Pro: last_hidden_state of the 384 px letterboxed view, aligner "
            "linear-GELU-linear",
        ),
        Recipe("prismatic", -2, source="Prismatic / OpenVLA: the second-to-last block's output, no norm"),
    ]
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A recipe by name (see :func:`list_recipes`), or the given :class:`Recipe` as is."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)} (or pass a Recipe)")
    return RECIPES[recipe]


def list_recipes() -> list[str]:
    return list(RECIPES)
