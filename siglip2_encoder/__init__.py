"""siglip2-encoder: the SigLIP 2 (and SigLIP) vision tower as a frozen or LoRA-tunable feature extractor, and the
image-text model around it.

Importing the package loads torch, torchvision, Pillow and safetensors; transformers, peft and timm are imported
only by the modules that use them (``models.lora``, ``integrations``).

The package is grouped by concern, each folder importing only from those below it: the base (``config``,
``presets``, ``output``, ``files``), ``checkpoints``, ``data``, ``adapters``, ``models``, ``export``, ``pipeline``,
``integrations``, ``eval``, ``serve`` and ``cli``; each folder's docstring says what lives there.
"""

from .checkpoints.hf_format import (
    config_from_hf,
    config_to_hf,
    convert_hf_state_dict,
    processor_config_from_hf,
    processor_config_to_hf,
    text_config_from_hf,
    text_config_to_hf,
)
from .checkpoints.hub import CheckpointError, CheckpointSource, HubUnreachableError
from .checkpoints.timm_format import convert_timm_state_dict, to_timm_state_dict
from .config import EncoderConfig, ProcessorConfig, TextConfig
from .data.images import ImageLoadError, load_image
from .data.processor import ImageProcessor, ProcessedImage, ProcessedImages, naflex_size, smart_size
from .data.tokenizer import TextTokenizer, TokenizedTexts
from .export.onednn import prepack_for_cpu
from .models.joint import LabelSet, ModelOutput, SigLIP2Model
from .models.model import SigLIP2Encoder
from .models.recipes import RECIPES, Recipe, get_recipe, list_recipes
from .models.text import SigLIP2TextEncoder, TextOutput
from .moved import install
from .output import EncoderOutput
from .pipeline.store import ExtractedFeatures
from .presets import PRESETS, Preset, get_preset, list_presets

install()  # old module paths (before 0.2.0) raise an ImportError naming the new one

__version__ = "0.2.0"

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
    "smart_size",
    "text_config_from_hf",
    "text_config_to_hf",
    "to_timm_state_dict",
]
