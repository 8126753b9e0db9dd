"""siglip2-encoder: the SigLIP 2 (and SigLIP) vision tower as a frozen or LoRA-tunable feature extractor."""

from .checkpoint import CheckpointError, config_from_hf, config_to_hf, convert_hf_state_dict
from .config import EncoderConfig
from .model import SigLIP2Encoder
from .output import EncoderOutput
from .presets import PRESETS, Preset, get_preset, list_presets
from .processor import ImageProcessor, ProcessedImages, ProcessorConfig, naflex_size

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EncoderConfig",
    "EncoderOutput",
    "ImageProcessor",
    "PRESETS",
    "Preset",
    "ProcessedImages",
    "ProcessorConfig",
    "SigLIP2Encoder",
    "config_from_hf",
    "config_to_hf",
    "convert_hf_state_dict",
    "get_preset",
    "list_presets",
    "naflex_size",
]
