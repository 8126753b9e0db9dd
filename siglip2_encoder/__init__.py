"""siglip2-encoder: the SigLIP 2 (and SigLIP) vision tower as a frozen or LoRA-tunable feature extractor, and the
image-text model around it.

Importing the package loads torch, torchvision, Pillow and safetensors; transformers, peft and timm are imported
only by the modules that use them (``lora``, ``integrations``).
"""

from .config import EncoderConfig, ProcessorConfig, TextConfig
from .convert import (
    config_from_hf,
    config_to_hf,
    convert_hf_state_dict,
    convert_timm_state_dict,
    processor_config_from_hf,
    processor_config_to_hf,
    text_config_from_hf,
    text_config_to_hf,
    to_timm_state_dict,
)
from .hub import CheckpointError, CheckpointSource, HubUnreachableError
from .images import ImageLoadError, load_image
from .joint import LabelSet, ModelOutput, SigLIP2Model
from .model import SigLIP2Encoder
from .onednn import prepack_for_cpu
from .output import EncoderOutput
from .presets import PRESETS, Preset, get_preset, list_presets
from .processor import ImageProcessor, ProcessedImage, ProcessedImages, naflex_size
from .recipes import RECIPES, Recipe, get_recipe, list_recipes
from .store import ExtractedFeatures
from .text import SigLIP2TextEncoder, TextOutput
from .tokenizer import TextTokenizer, TokenizedTexts

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "EncoderConfig",
    "EncoderOutput",
    "ExtractedFeatures",
    "HubUnreachableError",
    "ImageLoadError",
    "ImageProcessor",
    "LabelSet",
    "ModelOutput",
    "PRESETS",
    "Preset",
    "ProcessedImage",
    "ProcessedImages",
    "ProcessorConfig",
    "RECIPES",
    "Recipe",
    "SigLIP2Encoder",
    "SigLIP2Model",
    "SigLIP2TextEncoder",
    "TextConfig",
    "TextOutput",
    "TextTokenizer",
    "TokenizedTexts",
    "config_from_hf",
    "config_to_hf",
    "convert_hf_state_dict",
    "convert_timm_state_dict",
    "get_preset",
    "get_recipe",
    "list_presets",
    "list_recipes",
    "load_image",
    "naflex_size",
    "prepack_for_cpu",
    "processor_config_from_hf",
    "processor_config_to_hf",
    "text_config_from_hf",
    "text_config_to_hf",
    "to_timm_state_dict",
]
