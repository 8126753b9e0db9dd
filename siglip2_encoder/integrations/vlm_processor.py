"""The batches of a LLaVA-style model (:mod:`.llava`): prompts with ``<image>`` / ``<video>`` placeholders, their
images, clips and targets, turned into token ids, labels and image inputs.

* :func:`add_image_token` adds the image placeholder token to a tokenizer and resizes the LM's embeddings.
* :class:`VLMProcessor` turns (prompt, images, target) samples into a batch: each ``<image>`` placeholder is
  expanded to exactly the projector's token count for that image (after tiling, splitting or token reduction),
  prompt and image positions are masked out of the labels, padding goes left or right.
* :func:`image_grids`: each image's token grid, known before the tower runs (the model scatters by it too).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import Projector
from ..data.images import ImageInput, image_to_tensor
from ..data.processor import ImageProcessor, ProcessedImage
from ..models.token_merging import TokenMerging
from .anyres import AnyResTiling
from .lfm2_splitting import Lfm2VlSplitting
from .reduction import TokenPruning
from .splitting import ImageSplitting

__all__ = ["IGNORE_INDEX", "VLMProcessor", "add_image_token", "image_grids"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions without loss: prompt, image tokens, padding


def add_image_token(
    tokenizer: PreTrainedTokenizerBase, language_model: PreTrainedModel | None = None, token: str = "<image>"
) -> int:
    """Add ``token`` as a special token (if missing), resize the LM's embeddings to the new vocabulary, and return
    the token's id. A pad token is added too when the tokenizer has none (batching needs one)."""
    added = tokenizer.add_tokens([token], special_tokens=True)
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if language_model is not None and len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer))
    if added:
        logger.info("added %d special token(s); vocabulary is now %d", added, len(tokenizer))
    return tokenizer.convert_tokens_to_ids(token)


def image_grids(
    pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None, patch_size: int
) -> list[tuple[int, int]]:
    """Each image's token grid, known before the tower runs."""
    if spatial_shapes is not None:
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if pixel_values.ndim != 4:
        raise ValueError("patchified pixel_values need spatial_shapes")
    return [(pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)] * len(pixel_values)


class VLMProcessor:
    """Builds model batches from samples of text with ``<image>`` placeholders, images, and optional targets.

    Args:
        tokenizer: any Hugging Face tokenizer that knows the image token (see :func:`add_image_token`).
        image_processor: the encoder's :class:`~siglip2_encoder.ImageProcessor`.
        projector: decides how many tokens each image becomes.
        patch_size: the encoder's patch size (fixed-resolution grids are H // p x W // p).
        image_token: the placeholder string of an image in prompts.
        video_token: the placeholder string of a clip (plain text: it becomes its frames' image placeholders).
        image_start: text before each image's (and each frame's) tokens, e.g. Idefics3's
            ``<fake_token_around_image><global-img>`` (see :mod:`.idefics3_export`); empty for LLaVA.
        image_end: text after each image's tokens, e.g. Idefics3's ``<fake_token_around_image>``.
        tiling: LLaVA-OneVision's or LLaVA-NeXT's AnyRes tiling (the model's :attr:`VisionLanguageModel.tiling`):
            each image becomes its views (OneVision tiles only an image alone in its sample; see :mod:`.anyres`).
        splitting: Idefics3's or LFM2-VL's image splitting (the model's :attr:`VisionLanguageModel.splitting`): each
            image becomes its tiles and a global view (or thumbnail), each an image to the tower, with that model's
            text around them (see :mod:`.splitting`, :mod:`.lfm2_splitting`); ``image_start`` / ``image_end`` stay
            empty, the splitting writes that text.
        reduction: the model's :attr:`VisionLanguageModel.reduction`: each image costs its reduced token count.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImageProcessor,
        projector: Projector,
        patch_size: int,
        image_token: str = "<image>",
        video_token: str = "<video>",
        image_start: str = "",
        image_end: str = "",
        tiling: AnyResTiling | None = None,
        splitting: ImageSplitting | Lfm2VlSplitting | None = None,
        reduction: TokenPruning | TokenMerging | None = None,
    ) -> None:
        self.tokenizer, self.image_processor, self.projector = tokenizer, image_processor, projector
        self.patch_size, self.image_token, self.video_token = patch_size, image_token, video_token
        self.image_start, self.image_end = image_start, image_end
        self.tiling, self.splitting, self.reduction = tiling, splitting, reduction
        if splitting is not None and (image_start or image_end or tiling is not None):
            raise ValueError(
                "splitting writes its model's own text around each view and is a tiling of its own: leave "
                "image_start, image_end and tiling unset"
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; call add_image_token(tokenizer, lm) first")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; add_image_token adds one")

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase, **options: Any) -> VLMProcessor:
        """The processor of ``model`` (a :class:`~.llava.VisionLanguageModel`): its tower's preprocessing, projector
        and patch size, and its tiling, splitting and token reduction, so that none can differ from the model's
        (``options``: ``image_token``, ``video_token``, ``image_start`` / ``image_end``)."""
        tower = model.tower
        return cls(
            tokenizer, ImageProcessor(tower.processor_config), model.projector, tower.config.patch_size,
            tiling=model.tiling, splitting=model.splitting, reduction=model.reduction, **options,
        )  # fmt: skip

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _visuals(
        self,
        pieces: list[list[str]],
        images: Sequence[Sequence[ImageInput]],
        videos: Sequence[Sequence[Sequence[ImageInput]]],
    ) -> tuple[list[ImageInput], list[list[int]]]:
        """Every image and frame in placeholder order, and per sample how many of them each placeholder stands for
        (1 for an image, its frames for a clip); counts are checked against the placeholders."""
        flat: list[ImageInput] = []
        frames_per_placeholder: list[list[int]] = []
        for b, (parts, sample_images, sample_videos) in enumerate(zip(pieces, images, videos)):
            placeholders = parts[1::2]
            expected = ((self.image_token, sample_images, "image"), (self.video_token, sample_videos, "video"))
            for token, given, what in expected:
                count = placeholders.count(token)
                if count != len(given):
                    raise ValueError(
                        f"sample {b} has {count} {token} placeholder(s) but {len(given)} {what}(s); "
                        f"put one placeholder in the prompt per {what}"
                    )
            next_image, next_video, sizes = iter(sample_images), iter(sample_videos), []
            for token in placeholders:
                clip = [next(next_image)] if token == self.image_token else list(next(next_video))
                if not clip:
                    raise ValueError(f"sample {b} has a video without frames; give each clip at least one")
                flat += clip
                sizes.append(len(clip))
            frames_per_placeholder.append(sizes)
        return flat, frames_per_placeholder

    def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[ImageInput]] | None = None,
        targets: Sequence[str] | None = None,
        *,
        videos: Sequence[Sequence[Sequence[ImageInput]]] | None = None,
        padding_side: Literal["left", "right"] = "right",
        max_num_patches: int | None = None,
    ) -> dict[str, Any]:
        """Args:
            prompts: one text per sample; each ``<image>`` in it stands for the sample's next image, each
                ``<video>`` for its next clip.
            images: per sample, its images in placeholder order (an empty list for text-only samples).
            targets: per sample, the text to learn (labels); None for generation batches.
            videos: per sample, its clips in ``<video>`` order, each a sequence of frames (e.g. from
                :func:`~siglip2_encoder.data.video.read_frame`): a clip becomes its frames' tokens one frame after the
                other, each frame reduced by the projector as an image is (pooled or shuffled), as LLaVA-Video does.
            padding_side: "right" for training, "left" for batched generation.
            max_num_patches: NaFlex patch budget for this batch.

        Returns:
            ``input_ids``, ``attention_mask`` (B, T), ``labels`` (B, T) when targets are given, and the image
            inputs (``pixel_values`` and, for NaFlex, ``spatial_shapes``, ``pixel_attention_mask``; with tiling, the
            views (V, 3, tile, tile) with ``image_sizes`` (N, 2) and ``image_tiled`` (N,)) when any: images and
            frames in the order their placeholders appear.
        """
        images = images if images is not None else [[] for _ in prompts]
        videos = videos if videos is not None else [[] for _ in prompts]
        if (
            len(images) != len(prompts)
            or len(videos) != len(prompts)
            or (targets is not None and len(targets) != len(prompts))
        ):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(images)} image lists, {len(videos)} video lists and "
                f"{'no' if targets is None else len(targets)} targets; give one of each per sample"
            )
        split = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")
        pieces = [split.split(prompt) for prompt in prompts]  # text, placeholder, text, ...
        flat, frames_per_placeholder = self._visuals(pieces, images, videos)
        batch, image_ids = self._image_inputs(flat, images, videos, max_num_patches)
        remaining = iter(image_ids)  # each image's (or frame's) ids, in placeholder order
        samples = [
            self._sample_ids(parts, sizes, remaining, None if targets is None else targets[b])
            for b, (parts, sizes) in enumerate(zip(pieces, frames_per_placeholder))
        ]
        input_ids, attention_mask, labels = _pad(samples, self.tokenizer.pad_token_id, padding_side)
        batch.update(input_ids=input_ids, attention_mask=attention_mask)
        if targets is not None:
            batch["labels"] = labels
        return batch

    def _image_inputs(
        self,
        flat: list[ImageInput],
        images: Sequence[Sequence[ImageInput]],
        videos: Sequence[Sequence[Sequence[ImageInput]]],
        max_num_patches: int | None,
    ) -> tuple[dict[str, Any], list[list[int]]]:
        """The model's image inputs for ``flat`` (every image and frame, in placeholder order) and, for each, the
        ids that stand for it in the prompt (its image tokens and the text around them)."""
        if not flat:
            return {}, []
        if (self.tiling is not None or self.splitting is not None) and any(videos):
            raise ValueError("a model with tiling or splitting takes images only; give clips to a model without them")
        if self.splitting is not None:
            if max_num_patches is not None:
                raise ValueError("max_num_patches does not apply with splitting, which sizes each view itself")
            return self._split(self.splitting, flat)
        start, end = self._text_ids(self.image_start), self._text_ids(self.image_end)
        if self.tiling is not None:
            tiled = [self.tiling.tiles(len(sample) == 1) for sample in images for _ in sample]
            batch, counts = self._tiled(self.tiling, flat, tiled)
        else:
            inputs = self.image_processor(flat, **({"max_num_patches": max_num_patches} if max_num_patches else {}))
            grids = image_grids(inputs.pixel_values, inputs.spatial_shapes, self.patch_size)
            batch, counts = {key: inputs[key] for key in inputs.keys()}, [self.projector.num_tokens(g) for g in grids]
            if self.reduction is not None:
                counts = [self.reduction.num_tokens(count) for count in counts]
        return batch, [start + [self.image_token_id] * count + end for count in counts]

    def _split(
        self, splitting: ImageSplitting | Lfm2VlSplitting, images: list[ImageInput]
    ) -> tuple[dict[str, Any], list[list[int]]]:
        """Every image's views (each an image to the tower) and its ids: its model's text around each view's
        tokens."""
        views: list[ProcessedImage] = []
        ids = []
        for i, image in enumerate(images):
            pixels = image_to_tensor(image, i)
            size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
            if isinstance(splitting, ImageSplitting):
                own = [ProcessedImage(view, None, size) for view in splitting.views(pixels, self.image_processor)]
                side = splitting.tile // self.patch_size
                counts, grid = [self.projector.num_tokens((side, side))] * len(own), splitting.grid(*size)
            else:
                own = splitting.views(pixels, self.image_processor)
                counts = [self.projector.num_tokens(view.grid) for view in own]
                grid = splitting.grid(*size, self.image_processor.config)
            before, after = splitting.prompt(*grid)
            tokens = [self._text_ids(text) + [self.image_token_id] * n for text, n in zip(before, counts, strict=True)]
            ids.append([t for view in tokens for t in view] + self._text_ids(after))
            views += own
        batch = self.image_processor.collate(views)
        return {key: batch[key] for key in batch.keys()}, ids

    def _tiled(
        self, tiling: AnyResTiling, images: list[ImageInput], tiled: list[bool]
    ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The views of every image (its tiles too where ``tiled``), their sizes, and each image's token count."""
        pixels = [image_to_tensor(image, i) for i, image in enumerate(images)]
        sizes = [(int(p.shape[-2]), int(p.shape[-1])) for p in pixels]
        views = [tiling.views(p, self.image_processor, tiled=t) for p, t in zip(pixels, tiled)]
        batch = {
            "pixel_values": torch.cat(views),
            "image_sizes": torch.tensor(sizes, dtype=torch.long),
            "image_tiled": torch.tensor(tiled),
        }
        return batch, [tiling.num_tokens(h, w, tiled=t) for (h, w), t in zip(sizes, tiled)]

    def _sample_ids(
        self, parts: list[str], sizes: list[int], image_ids: Iterator[list[int]], target: str | None
    ) -> tuple[list[int], list[int]]:
        """One sample's (ids, labels): BOS, its texts with each placeholder's image ids between them (the next
        ``sizes[i]`` of ``image_ids`` for placeholder i), then the target and EOS, the only tokens with labels."""
        tok = self.tokenizer
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        for i, segment in enumerate(parts[0::2]):
            if i:  # the placeholder before this text: its images' (or frames') ids
                for visual in itertools.islice(image_ids, sizes[i - 1]):
                    ids += visual
            ids += self._text_ids(segment)
        labels = [IGNORE_INDEX] * len(ids)
        if target is not None:
            answer = self._text_ids(target) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
            ids, labels = ids + answer, labels + answer
        return ids, labels


def _pad(
    samples: list[tuple[list[int], list[int]]], pad_id: int, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T): the samples' (ids, labels) padded on ``padding_side``."""
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, lab) in enumerate(samples):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, span] = torch.tensor(ids)
        labels[b, span] = torch.tensor(lab)
        attention_mask[b, span] = 1
    return input_ids, attention_mask, labels
