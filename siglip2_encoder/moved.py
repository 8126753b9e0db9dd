"""Modules that moved in 0.2.0, when the package was grouped into rooms by concern (docs/architecture.md):
importing an old path raises an ``ImportError`` naming the new one. The package is at 0.x, so old paths
get no aliases: an alias would keep two names for one module alive, and a clear error costs one edit."""

from __future__ import annotations

import importlib.abc
import sys

__all__ = ["MOVED", "MovedModuleFinder", "install"]

# convert.py became one module per format; most of its functions import from the package itself too.
CONVERT_SPLIT = (
    "siglip2_encoder.checkpoints.hf_format (transformers), .timm_format, .big_vision, .strict (check_state_dict, "
    "build_loaded) or .folders (read_checkpoint, write_checkpoint)"
)
MOVED = {  # old module -> where it lives now
    "siglip2_encoder.hub": "siglip2_encoder.checkpoints.hub",
    "siglip2_encoder.convert": CONVERT_SPLIT,
    "siglip2_encoder.checkpoints.convert": CONVERT_SPLIT,
    "siglip2_encoder.publish": "siglip2_encoder.checkpoints.publish",
    "siglip2_encoder.images": "siglip2_encoder.data.images",
    "siglip2_encoder.processor": "siglip2_encoder.data.processor",
    "siglip2_encoder.tokenizer": "siglip2_encoder.data.tokenizer",
    "siglip2_encoder.video": "siglip2_encoder.data.video",
    "siglip2_encoder.attention": "siglip2_encoder.models.attention",
    "siglip2_encoder.packing": "siglip2_encoder.models.packing",
    "siglip2_encoder.layers": "siglip2_encoder.models.layers",
    "siglip2_encoder.embeddings": "siglip2_encoder.models.embeddings",
    "siglip2_encoder.head": "siglip2_encoder.models.head",
    "siglip2_encoder.inputs": "siglip2_encoder.models.inputs",
    "siglip2_encoder.model": "siglip2_encoder.models.model",
    "siglip2_encoder.text": "siglip2_encoder.models.text",
    "siglip2_encoder.joint": "siglip2_encoder.models.joint",
    "siglip2_encoder.loss": "siglip2_encoder.models.loss",
    "siglip2_encoder.lora": "siglip2_encoder.models.lora",
    "siglip2_encoder.recipes": "siglip2_encoder.models.recipes",
    "siglip2_encoder.flops": "siglip2_encoder.models.flops",
    "siglip2_encoder.onnx_export": "siglip2_encoder.export.onnx_export",
    "siglip2_encoder.quantize": "siglip2_encoder.export.quantize",
    "siglip2_encoder.onednn": "siglip2_encoder.export.onednn",
    "siglip2_encoder.extract": "siglip2_encoder.pipeline.extract",
    "siglip2_encoder.store": "siglip2_encoder.pipeline.store",
    "siglip2_encoder.faiss_index": "siglip2_encoder.pipeline.faiss_index",
    "siglip2_encoder.index_ready": "siglip2_encoder.pipeline.index_ready",
    "siglip2_encoder.retrieval": "siglip2_encoder.pipeline.retrieval",
    "siglip2_encoder.distributed": "siglip2_encoder.pipeline.distributed",
    "siglip2_encoder.integrations.serve": "siglip2_encoder.serve.app",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Asked only for modules no other finder found (it sits last on ``sys.meta_path``): a moved one raises."""

    def find_spec(self, fullname: str, path=None, target=None) -> None:
        new = MOVED.get(fullname)
        if new is not None:
            raise ImportError(
                f"{fullname} moved to {new} in siglip2-encoder 0.2.0: import it from there", name=fullname
            )
        return None


def install() -> None:
    """Put the finder last on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
