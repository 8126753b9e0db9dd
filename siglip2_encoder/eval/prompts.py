"""Prompt templates for zero-shot classification, as named sets: each a tuple of strings with one ``{}`` where the
class name goes.

* ``clip_paper``: the 80 ImageNet templates of the CLIP paper (Radford et al. 2021), which big_vision's zero-shot
  evaluator calls ``clip_paper`` (``prompt_engineering_constants``) and open_clip ``OPENAI_IMAGENET_TEMPLATES``.
* ``clip_best``: the 7 of them that CLIP's notebook found best (big_vision's ``clip_best``).
* ``class_name_only``: the class name alone (big_vision's ``class_name_only``).
* ``pipeline``: transformers' zero-shot pipeline's single template.

:func:`load_templates` takes a set's name or a text file of templates, one per line.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..models.joint import DEFAULT_TEMPLATE

__all__ = ["TEMPLATE_SETS", "load_templates"]

CLIP_PAPER = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

CLIP_BEST = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "clip_paper": CLIP_PAPER,
    "clip_best": CLIP_BEST,
    "class_name_only": ("{}",),
    "pipeline": (DEFAULT_TEMPLATE,),
}


def load_templates(name_or_file: str | os.PathLike) -> tuple[str, ...]:
    """A named set of :data:`TEMPLATE_SETS`, or a text file with one template per line (empty lines skipped), the
    class name's place written ``{}`` or, as in CLIP_benchmark's files, ``{c}``."""
    if str(name_or_file) in TEMPLATE_SETS:
        return TEMPLATE_SETS[str(name_or_file)]
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(
            f"templates {str(name_or_file)!r} is neither a named set ({', '.join(TEMPLATE_SETS)}) nor a file of "
            f"templates, one per line"
        )
    # CLIP_benchmark's files (zeroshot_classification_templates.txt) write the class name's place as {c}
    templates = tuple(line.strip().replace("{c}", "{}") for line in path.read_text().splitlines() if line.strip())
    if not templates:
        raise ValueError(f"{path} holds no templates; write one per line, each with {{}} for the class name")
    return templates
