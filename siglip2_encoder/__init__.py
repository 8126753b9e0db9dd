"""siglip2-encoder: the SigLIP 2 (and SigLIP) vision tower as a frozen or LoRA-tunable feature extractor."""

from .checkpoint import (
    CheckpointError,
    HubUnreachableError,
    config_from_hf,
    config_to_hf,
    convert_hf_state_dict,
    convert_timm_state_dict,
    to_timm_state_dict,
)
from .config import EncoderConfig
from .images import ImageLoadError, load_image
from .model import SigLIP2Encoder
from .output import EncoderOutput
from .presets import PRESETS, Preset, get_preset, list_presets
from .processor import ImageProcessor, ProcessedImage, ProcessedImages, ProcessorConfig, naflex_size
from .store import ExtractedFeatures

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EncoderConfig",
    "EncoderOutput",
    "ExtractedFeatures",
    "HubUnreachableError",
    "ImageLoadError",
    "ImageProcessor",
    "PRESETS",
    "Preset",
    "ProcessedImage",
    "ProcessedImages",
    "ProcessorConfig",
    "SigLIP2Encoder",
    "config_from_hf",
    "config_to_hf",
    "convert_hf_state_dict",
    "convert_timm_state_dict",
    "get_preset",
    "list_presets",
    "load_image",
    "naflex_size",
    "to_timm_state_dict",
]
