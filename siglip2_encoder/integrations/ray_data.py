"""The encoder in Ray Data: :class:`EncodeImages`, a callable class for ``Dataset.map_batches`` that loads the model
once per actor and turns a batch of images into features.

    ds = ray.data.read_images("photos/", include_paths=True)         # columns "image", "path"
    ds = ds.map_batches(
        EncodeImages,
        fn_constructor_kwargs={"model": "google/siglip2-so400m-patch14-384", "device": "cuda"},
        batch_size=64, num_gpus=0.5, concurrency=4,                     # GPU fraction, actors
    )
    ds.write_parquet("features/")                                      # or iterate, or write_numpy

Input columns, by what the batch holds: ``image`` (decoded pixels, as ``read_images`` gives), ``path`` (files,
decoded here with :func:`~siglip2_encoder.load_image`) or ``bytes`` (encoded images). A row whose image cannot be
used keeps its place: its ``error`` says why and its features are NaN, so nothing is dropped unseen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.images import ImageLoadError, load_image, load_image_bytes
from ..data.processor import ImageProcessor
from ..models.model import SigLIP2Encoder
from ..pipeline.settings import DTYPES

__all__ = ["EncodeImages", "paths_dataset"]


class EncodeImages:
    """``map_batches`` callable: images in, ``pooled`` (B, D) features (and ``last_hidden_state`` per row if asked
    for) and ``error`` out, beside the batch's own columns.

    Args:
        model: Hub id or folder (as ``SigLIP2Encoder.from_pretrained``), loaded once per actor.
        device: where the actor runs the model (``"cuda"`` with ``num_gpus`` on ``map_batches``).
        dtype: compute precision, "fp32", "fp16" or "bf16" (patch and position embeddings stay fp32).
        tokens: also return each image's final tokens (h * w, D).
        max_num_patches: NaFlex patch budget; None = the checkpoint's.
        random_weights: build this preset with random weights instead of loading ``model`` (tests, offline runs).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
        tokens: bool = False,
        max_num_patches: int | None = None,
        random_weights: str | None = None,
    ) -> None:
        if (model is None) == (random_weights is None):
            raise ValueError("give exactly one of model (a Hub id or folder) and random_weights (a preset name)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got dtype={dtype!r}")
        if random_weights is not None:
            torch.manual_seed(0)
            encoder, processor = SigLIP2Encoder.from_preset(random_weights), ImageProcessor.from_preset(random_weights)
        else:
            encoder, processor = SigLIP2Encoder.from_pretrained(model), ImageProcessor.from_pretrained(model)
        self.model = encoder.to(device=device).set_precision(DTYPES[dtype]).eval()
        self.processor, self.device, self.tokens, self.max_num_patches = processor, device, tokens, max_num_patches
        if self.model.head is None:
            raise ValueError(f"{model or random_weights} has no attention-pooling head: pooled features need one")

    def _images(self, batch: dict[str, Any]) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Each row's pixels (None if unusable) and error."""
        if "image" in batch:
            return list(batch["image"]), [None] * len(batch["image"])
        if "path" in batch:
            sources, read = batch["path"], load_image
        elif "bytes" in batch:
            sources, read = batch["bytes"], lambda data: load_image_bytes(bytes(data), "bytes")
        else:
            raise ValueError(f"the batch has columns {sorted(batch)}; EncodeImages reads 'image', 'path' or 'bytes'")
        images, errors = [], []
        for source in sources:
            try:
                images.append(read(source))
                errors.append(None)
            except ImageLoadError as err:
                images.append(None)
                errors.append(str(err))
        return images, errors

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, errors = self._images(batch)
        good = [i for i, image in enumerate(images) if image is not None]
        width = self.model.config.hidden_size
        pooled = np.full((len(images), width), np.nan, dtype=np.float32)
        tokens: list[np.ndarray] = [np.full((0, width), np.nan, dtype=np.float32) for _ in images]
        if good:
            kwargs = {"max_num_patches": self.max_num_patches} if self.max_num_patches else {}
            inputs = self.processor([images[i] for i in good], **kwargs).to(self.device, self.model.dtype)
            with torch.inference_mode():
                out = self.model(**inputs, return_last=self.tokens, return_pooled=True)
            pooled[good] = out.pooler_output.float().cpu().numpy()
            if self.tokens:
                for i, t in zip(good, out.per_image(None)):
                    tokens[i] = t.float().cpu().numpy()
        result = dict(batch) | {"pooled": pooled, "error": np.array(errors, dtype=object)}
        if self.tokens:
            result["last_hidden_state"] = tokens
        return result


def paths_dataset(paths: Sequence[str]):
    """A Ray dataset of one ``path`` column, for files decoded by :class:`EncodeImages` itself (bad files then
    become rows with an error instead of failing Ray's reader)."""
    import ray.data

    return ray.data.from_items([{"path": str(p)} for p in paths])
