"""The transformers model types and image processors whose checkpoints hold a SigLIP-architecture tower, as tables:
SigLIP's own (image-text, vision-only, text-only), the VLM families (where their tower's weights live in the key
layouts transformers writes, and how their configs and weight names differ from SigLIP's), and what this library
reproduces of each image processor. Adding a family is rows here (and a test with its transformers class)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ARIA_MIN_SIDE",
    "CODED_TOWERS",
    "FAMILY_FIELDS",
    "IDEFICS2_EDGES",
    "IMAGE_TEXT_TYPES",
    "KEY_RENAMES",
    "MLP_RATIO_TYPES",
    "NESTED_VISION_CONFIGS",
    "PHI4_MAX_TILES",
    "PROCESSOR_TYPES",
    "ProcessorKind",
    "REQUIRED_SETTINGS",
    "TEXT_TYPES",
    "TOWER_EXTRAS",
    "VISION_TYPES",
    "VLM_TYPES",
]

# model_type -> whether the vision tower is NaFlex.
IMAGE_TEXT_TYPES = {"siglip": False, "siglip2": True}
VISION_TYPES = {
    "siglip_vision_model": False,
    "siglip2_vision_model": True,
    "idefics3_vision": False,  # Idefics3VisionTransformer: SigLIP without the head, bucketed positions
    "smolvlm_vision": False,  # SmolVLMVisionTransformer: the same tower
    "idefics2_vision": False,  # Idefics2VisionTransformer: the same tower
    "granite_docling_vision": False,  # GraniteDoclingVisionModel: SigLIP without the head, and its connector
    "janus_vision_model": False,  # JanusVisionModel: SigLIP without the head, exact GELU, its own names
    "phi4_multimodal_vision": False,  # Phi4MultimodalVisionModel: bucketed positions and a head
}
TEXT_TYPES = ("siglip_text_model", "siglip2_text_model")  # text-only checkpoints (SiglipTextModel, ...)
# Vision types whose architecture differs from SigLIP's in ways their config.json does not say: the fields fixed here.
# Their other defaults differ from SiglipVisionConfig's too, so their configs are read through transformers.
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "idefics3_vision": {"use_head": False, "position_lookup": "buckets"},
    "smolvlm_vision": {"use_head": False, "position_lookup": "buckets"},
    "idefics2_vision": {"use_head": False, "position_lookup": "buckets"},
    "granite_docling_vision": {"use_head": False},  # 512 px tiles only: positions are SigLIP's own
    "janus_vision_model": {"use_head": False},
    "phi4_multimodal_vision": {"use_head": True, "position_lookup": "buckets"},
}
# Vision types whose config gives the MLP's width as a ratio of hidden_size (mlp_ratio), not as intermediate_size.
MLP_RATIO_TYPES = ("janus_vision_model",)
# Vision types with options SigLIP's architecture lacks -> the value each must have (others are refused by name).
REQUIRED_SETTINGS: dict[str, dict[str, Any]] = {
    "janus_vision_model": {"use_qk_norm": False, "attention_bias": True},
}
_SIGLIP_TOWER_PREFIXES = (  # 4.x before and after its ``model.`` refactor, 5.x in memory and as saved
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
)
_SIGLIP_MODEL_PREFIXES = (  # the same for towers named vision_model
    "model.vision_model.vision_model.",
    "vision_model.vision_model.",
    "model.vision_model.",
    "vision_model.",
)
_PI0_PREFIXES = tuple(
    outer + inner + prefix
    for outer in ("model.", "")
    for inner in ("paligemma_with_expert.paligemma.model.", "paligemma_with_expert.paligemma.", "vlm.")
    for prefix in ("vision_tower.vision_model.", "vision_tower.")
)
_PHI4_PREFIXES = tuple(
    outer + "embed_tokens_extend.image_embed.img_processor." for outer in ("model.", "")
)  # fmt: skip
# VLMs that hold a SigLIP-architecture vision tower (its architecture in ``vision_config``) -> where that tower's
# weights live in the key layouts transformers writes. Longest first: the first prefix a key starts with names it; the
# language model's and the projector's keys start with none and are not read.
VLM_TYPES: dict[str, tuple[str, ...]] = {
    "paligemma": _SIGLIP_TOWER_PREFIXES,
    "gemma3": _SIGLIP_TOWER_PREFIXES,
    # ShieldGemma 2: Gemma 3 inside a classifier, whose own ``model.`` comes first in every layout
    "shieldgemma2": tuple("model." + prefix for prefix in _SIGLIP_TOWER_PREFIXES),
    # T5Gemma 2: Gemma 3's tower in the encoder (T5Gemma2ForConditionalGeneration, then T5Gemma2Model)
    "t5gemma2": (
        "model.encoder.vision_tower.vision_model.",
        "encoder.vision_tower.vision_model.",
        "model.encoder.vision_tower.",
        "encoder.vision_tower.",
    ),
    "llava": _SIGLIP_TOWER_PREFIXES,
    "llava_next": _SIGLIP_TOWER_PREFIXES,
    "llava_onevision": _SIGLIP_TOWER_PREFIXES,
    "lfm2_vl": _SIGLIP_TOWER_PREFIXES,
    "aya_vision": _SIGLIP_TOWER_PREFIXES,
    "cohere2_vision": _SIGLIP_TOWER_PREFIXES,
    "idefics3": ("model.vision_model.",),
    "smolvlm": ("model.vision_model.",),
    "idefics2": ("model.vision_model.",),
    "aria": _SIGLIP_TOWER_PREFIXES,  # Aria: Idefics3's tower class (idefics3_vision) as its vision_tower
    # Phi-4-multimodal, in transformers' format and as the Hub's main branch holds it (remote code, phi4mm): the tower
    # is its image embedding's img_processor in both
    "phi4_multimodal": _PHI4_PREFIXES,
    "phi4mm": _PHI4_PREFIXES,
    # DeepSeek-VL (1.3B: a SigLIP-L tower)
    "deepseek_vl": _SIGLIP_MODEL_PREFIXES,
    "deepseek_vl_hybrid": _SIGLIP_MODEL_PREFIXES,  # the hybrid 7B: its low-resolution tower (SAM's is not read)
    # Granite Docling (granite-for-docling): Idefics3's layout, its connector inside the tower (TOWER_EXTRAS)
    "granite_docling": ("model.vision_model.", "vision_model."),
    # Janus / Janus-Pro (understanding tower; its generation VQ model is not read): DeepSeek-VL's processor
    "janus": ("model.vision_model.", "vision_model."),
    "modernvbert": _SIGLIP_MODEL_PREFIXES,  # ModernVBERT: Idefics3's processor and connector around a SigLIP tower
    "ultravbert": _SIGLIP_MODEL_PREFIXES,  # UltraVBERT: ModernVBERT's model around another text encoder
    # the retrievers: PaliGemma (ColPali) and ModernVBERT (ColModernVBERT) under ``vlm.``
    "colpali": tuple("vlm." + prefix for prefix in _SIGLIP_TOWER_PREFIXES),
    "colmodernvbert": tuple("vlm." + prefix for prefix in _SIGLIP_MODEL_PREFIXES),
    # pi0 and pi0.5, the robot policies: PaliGemma in PI0Model as ``vlm``; the Hub's (LeRobot's) files keep
    # openpi's ``paligemma_with_expert.paligemma`` (PaliGemmaForConditionalGeneration, before and after its
    # ``model.`` refactor), under the policy's ``model.`` and without it, which transformers also saves.
    "pi0": _PI0_PREFIXES,
    "pi05": _PI0_PREFIXES,
}

# VLMs whose config.json describes no tower (remote code that fixes it) -> the vision type whose transformers defaults
# are that tower: transformers' own conversion of phi4mm builds Phi4MultimodalVisionConfig() for it.
CODED_TOWERS: dict[str, str] = {"phi4mm": "phi4_multimodal_vision"}

# VLMs whose tower's config is not their config's ``vision_config`` -> the attributes leading to it.
NESTED_VISION_CONFIGS: dict[str, tuple[str, ...]] = {
    "t5gemma2": ("encoder", "vision_config"),
    "colpali": ("vlm_config", "vision_config"),
    "colmodernvbert": ("vlm_config", "vision_config"),
    "pi0": ("vlm_config", "vision_config"),
    "pi05": ("vlm_config", "vision_config"),
}

# Model types whose towers name a weight otherwise -> (their part of the key, ours), replaced after the prefix.
_JANUS_NAMES = ((".self_attn.projection_layer.", ".self_attn.out_proj."),)
KEY_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"janus": _JANUS_NAMES, "janus_vision_model": _JANUS_NAMES}

# Model types whose checkpoints hold weights under the tower's prefix that are not the tower's -> their key prefixes
# (after the tower's), skipped by name. A head ("head.") is skipped only where the tower has none.
TOWER_EXTRAS: dict[str, tuple[str, ...]] = {
    "granite_docling": ("connector.",),  # its DeepStack connector, which reads layers the tower returns
    "granite_docling_vision": ("connector.",),
    # the SigLIP head of the tower it was made from, which transformers drops (_keys_to_ignore_on_load_unexpected)
    "ultravbert": ("head.",),
}


_SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class ProcessorKind:
    """What this library reproduces of one transformers image processor, and the class's defaults for the settings a
    processor file may omit (transformers fills them from the class; so must we: several VLM processors default to
    CLIP's mean and std, not SigLIP's)."""

    naflex: bool
    resample: int  # PIL code
    # The view's (height, width) (Idefics3's: one max_image_size tile); None for NaFlex, and where the default is no
    # square (LLaVA-NeXT's shortest edge: the tower's square is its base view).
    size: tuple[int, int] | None = (224, 224)
    max_num_patches: int | None = None  # NaFlex: the patch budget
    # LFM2-VL's smart_resize rule instead of SigLIP 2's, with its (min_image_tokens, max_image_tokens,
    # downsample_factor) defaults: budgets in tokens after its downsample_factor x downsample_factor unshuffle.
    smart_resize: tuple[int, int, int] | None = None
    mean_std: tuple[tuple[float, ...], tuple[float, ...]] = _SIGLIP_MEAN_STD
    # What the processor does beyond one SigLIP view (tiles, aspect-preserving resizes), which is not reproduced: this
    # library preprocesses the single view named here, exactly, and says so in a warning when loading.
    beyond: str = ""
    # The setting that turns those other views on, and its default; None: they are always on.
    beyond_setting: tuple[str, bool] | None = None
    # Each image resized keeping its aspect ratio and padded (with do_pad, its default; Idefics2's and Aria's tower
    # masks the padding): one of config.LETTERBOXES
    letterbox: str | None = None
    # The view is resized whatever do_resize says (Idefics3's: do_resize is only the longest-edge resize before it,
    # and without splitting every image is then resized to max_image_size; LFM2-VL's always resizes).
    always_resized: bool = False

    def does_more(self, settings: Mapping[str, Any]) -> bool:
        """Whether a processor with these settings makes views beyond the single one reproduced."""
        if self.beyond_setting is None:
            return bool(self.beyond)
        name, default = self.beyond_setting
        return bool(settings.get(name, default))


_IDEFICS3_VIEWS = (
    "splits each image into tiles after an aspect-preserving LANCZOS resize; here each image is resized (LANCZOS) "
    "to one tile of max_image_size pixels, and images already of that size are preprocessed exactly as its tiles"
)
IDEFICS2_EDGES = (378, 980)  # Idefics2ImageProcessor's default size: (shortest_edge, longest_edge)
ARIA_MIN_SIDE = 336  # AriaImageProcessor's default min_image_size
_IDEFICS2_VIEWS = "with do_image_splitting adds 4 crops of each image before it; here the whole image only"
_ARIA_VIEWS = (
    "with split_image cuts each image into crops, each then a view, and makes no view of the whole image; here the "
    "whole image, as it is without split_image"
)
_PHI4_VIEWS = (
    "resizes each image keeping its aspect ratio onto a grid of up to dynamic_hd crops of size (padded with white), "
    "and adds a global view, that canvas resized to size; here the global view only"
)
_PHI4MM_VIEWS = (
    _PHI4_VIEWS + ", as transformers' Phi4MultimodalImageProcessor makes it (the remote code resizes with PIL: its "
    "pixels can differ slightly)"
)
_ANYRES_VIEWS = (
    "adds anyres tiles (image_grid_pinpoints) to the base view; here the base view only: the image resized to the "
    "tower's native square"
)
_TILES_AND_THUMBNAIL = (
    "crops each image into tiles (crop_to_patches: between min_patches and max_patches tiles of size, by aspect "
    "ratio) followed by a thumbnail; here the thumbnail only: the image resized to size"
)


def _tiles_and_thumbnail(size: int, tiles_by_default: bool) -> ProcessorKind:
    """A processor that, with crop_to_patches, adds tiles before its thumbnail; CLIP's mean and std, bicubic."""
    setting = ("crop_to_patches", tiles_by_default)
    return ProcessorKind(
        False, 3, (size, size), mean_std=_CLIP_MEAN_STD, beyond=_TILES_AND_THUMBNAIL, beyond_setting=setting
    )


PHI4_MAX_TILES = 36  # Phi4MultimodalImageProcessor's default dynamic_hd
_DEEPSEEK_VL = ProcessorKind(False, 3, (384, 384), mean_std=_CLIP_MEAN_STD, letterbox="deepseek_vl")

# image_processor_type -> what is reproduced of it; transformers 4 named its torchvision processors "...Fast".
PROCESSOR_TYPES: dict[str, ProcessorKind] = {}
for _name, _kind in {
    "SiglipImageProcessor": ProcessorKind(False, 3),
    "Siglip2ImageProcessor": ProcessorKind(True, 2, size=None, max_num_patches=256),
    "Gemma3ImageProcessor": ProcessorKind(False, 2),  # SigLIP's, bilinear, plus an optional pan-and-scan
    "Idefics3ImageProcessor": ProcessorKind(False, 1, (364, 364), beyond=_IDEFICS3_VIEWS, always_resized=True),
    "SmolVLMImageProcessor": ProcessorKind(False, 1, (364, 364), beyond=_IDEFICS3_VIEWS, always_resized=True),
    # Idefics3's, its tile count capped (max_image_tiles) by lowering the longest edge: the same single tile
    "UltraVBertImageProcessor": ProcessorKind(False, 1, (512, 512), beyond=_IDEFICS3_VIEWS, always_resized=True),
    "Idefics2ImageProcessor": ProcessorKind(
        False, 2, (980, 980), beyond=_IDEFICS2_VIEWS, beyond_setting=("do_image_splitting", False), letterbox="idefics2"
    ),
    "AriaImageProcessor": ProcessorKind(
        False,
        3,
        (980, 980),
        beyond=_ARIA_VIEWS,
        beyond_setting=("split_image", False),
        letterbox="aria",
        always_resized=True,
    ),
    "Phi4MultimodalImageProcessor": ProcessorKind(False, 3, (448, 448), beyond=_PHI4_VIEWS, letterbox="phi4"),
    "Phi4MMImageProcessor": ProcessorKind(False, 3, (448, 448), beyond=_PHI4MM_VIEWS, letterbox="phi4"),
    "DeepseekVLImageProcessor": _DEEPSEEK_VL,
    "JanusImageProcessor": _DEEPSEEK_VL,  # DeepSeek-VL's, renamed
    # its hybrid's low-resolution view (pixel_values; the high-resolution one is for its SAM tower)
    "DeepseekVLHybridImageProcessor": ProcessorKind(
        False, 3, (384, 384), mean_std=_CLIP_MEAN_STD, letterbox="deepseek_vl_hybrid"
    ),
    "PI0ImageProcessor": ProcessorKind(False, 3, letterbox="pi0"),  # pi0's and pi0.5's (transformers' PI0Processor)
    "LlavaNextImageProcessor": ProcessorKind(False, 3, None, mean_std=_CLIP_MEAN_STD, beyond=_ANYRES_VIEWS),
    "LlavaOnevisionImageProcessor": ProcessorKind(False, 3, (384, 384), mean_std=_CLIP_MEAN_STD, beyond=_ANYRES_VIEWS),
    "Lfm2VlImageProcessor": ProcessorKind(
        True,
        2,
        None,
        smart_resize=(64, 256, 2),
        beyond="cuts images over max_image_tokens x max_pixels_tolerance into tile_size tiles followed by a "
        "thumbnail (do_image_splitting); here that thumbnail, by its smart_resize rule: the only view of the others "
        "(import_lfm2_vl loads the whole VLM with its splitting)",
        beyond_setting=("do_image_splitting", True),
        always_resized=True,
    ),
    # Aya Vision's (transformers names it for GOT-OCR 2, whose processor it is) and Command A Vision's
    "GotOcr2ImageProcessor": _tiles_and_thumbnail(384, tiles_by_default=False),
    "Cohere2VisionImageProcessor": _tiles_and_thumbnail(512, tiles_by_default=True),
    # Granite Docling's: GOT-OCR 2's tiling of a page (its dense_* settings choose only the tiles)
    "GraniteDoclingImageProcessor": _tiles_and_thumbnail(512, tiles_by_default=True),
}.items():
    PROCESSOR_TYPES[_name] = PROCESSOR_TYPES[_name + "Fast"] = _kind
