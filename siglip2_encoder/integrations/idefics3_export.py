"""Export to transformers' ``Idefics3ForConditionalGeneration`` format (Idefics3, and SmolVLM's architecture).

What fits Idefics3's format, and why the rest does not:

* the tower must be fixed-resolution (Idefics3's vision model is a conv-embedding SigLIP tower without a head; the
  head's weights are not written) with a square grid that the shuffle factor divides (Idefics3 reshapes the tokens
  to a square before shuffling);
* the projector must be ``pixel_shuffle`` with depth 1 and ``bias=False`` on the final tokens (``layers=(None,)``):
  Idefics3's connector is exactly pixel shuffle then one linear layer without bias, on ``last_hidden_state``;
* LoRA adapters must be merged first (``VisionLanguageModel.merge_lora``).

Idefics3's tower reads positions at each patch's fractional coordinate for grids smaller than its native one, so a
tower that interpolates positions is only exact at its native size, which is what this library's processor (and
Idefics3's, tile by tile) feeds it; the export says so in a warning.

Idefics3's processor writes each image into the prompt as ``<fake_token_around_image><global-img>``, its tokens, then
``<fake_token_around_image>``. A model that is to run in transformers as it ran here must have been trained with the
same text around its images: :func:`add_idefics3_tokens` adds these tokens to the tokenizer and the LM, and
``VLMProcessor(..., image_start=IMAGE_START, image_end=IMAGE_END)`` writes them as Idefics3's processor does. The
export refuses a tokenizer without them.

Exported folders run in transformers alone - ``AutoProcessor`` + ``apply_chat_template`` +
``Idefics3ForConditionalGeneration.generate`` - and give the same prompt tokens, pixels and generated tokens as the
model they came from (tested with a Llama language model). The processor splits images as the model does: with the
model's :class:`~.splitting.ImageSplitting` (``do_image_splitting=True``: tiles, a global view, row / column tags),
else without (each image one view resized to the tower's size).

llama.cpp's ``convert_hf_to_gguf.py`` converts the folder as it is: the language model, and with ``--mmproj`` the
tower and connector (``text_config.architectures`` names the LM's class, as real SmolVLM repos do), and llama.cpp
runs them: for a model with splitting and Lanczos resizing, its views and their features are ours, and
``llama-mtmd-cli --jinja`` and ``llama-server`` answer as the model does (without ``--jinja`` the command line refuses
the exported chat template). What it would do otherwise for a given model, :func:`llama_cpp_differences` says, and
the export logs (docs/vlm.md: llama.cpp).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..adapters import PixelShuffleConfig, PixelShuffleProjector, build_projector
from ..checkpoints.folders import read_checkpoint
from ..checkpoints.hf_format import config_to_hf, processor_config_to_hf
from ..checkpoints.hub import CheckpointSource
from ..checkpoints.strict import build_loaded
from ..models.embeddings import buckets_keep_native_grid
from ..models.model import SigLIP2Encoder
from .hf_export import (
    check_tokenizer,
    checkpoint_folder,
    language_model_from,
    language_model_weights,
    llama_cpp_pixel_values,
    plain_chat_template,
    text_config,
    write_export,
)
from .llava import VisionLanguageModel, add_image_token
from .splitting import FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, ImageSplitting

__all__ = [
    "IMAGE_END",
    "IMAGE_START",
    "add_idefics3_tokens",
    "export_idefics3",
    "import_idefics3",
    "llama_cpp_differences",
]

logger = logging.getLogger(__name__)

# The tokens Idefics3's processor writes (transformers' Idefics3Processor): around each image, and after each turn.
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_TOKEN = "<image>"  # Idefics3's processor knows no other placeholder
IMAGE_START = FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN  # before an unsplit image's tokens
IMAGE_END = FAKE_IMAGE_TOKEN  # after them


def add_idefics3_tokens(
    tokenizer: PreTrainedTokenizerBase,
    language_model: PreTrainedModel | None = None,
    splitting: ImageSplitting | None = None,
) -> int:
    """Add Idefics3's special tokens (``<fake_token_around_image>``, ``<global-img>``, ``<end_of_utterance>``, with
    ``splitting`` its ``<row_r_col_c>`` tags) and the ``<image>`` placeholder to ``tokenizer``, resize the LM's
    embeddings, and return the image token's id. Build the batches with ``VLMProcessor(..., image_start=IMAGE_START,
    image_end=IMAGE_END)``, or ``VLMProcessor(..., splitting=splitting)``."""
    tags = [] if splitting is None else splitting.row_col_tokens()
    tokenizer.add_tokens([FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE, *tags], special_tokens=True)
    return add_image_token(tokenizer, language_model, IMAGE_TOKEN)


def llama_cpp_differences(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase | None = None) -> list[str]:
    """What llama.cpp's Idefics3 path (``libmtmd``) would do differently from transformers with this model's export,
    one sentence each; empty when it runs the model as transformers does (tested against llama.cpp's own code:
    tests/test_gguf.py).

    llama.cpp does not read the processor's settings: it always splits (tiles plus a global view, at the longest
    edge the converter writes), always resizes with Lanczos, always divides by 255 and normalises, and writes the
    text between the views as the first vocabulary entries that read so (``"\\n"`` after a row, ``"\\n\\n"`` before
    the global view)."""
    differences = []
    if model.splitting is None:
        differences.append(
            "the model sees each image as one view, and llama.cpp always splits it into tiles plus a global view: "
            "build it with ImageSplitting (docs/vlm.md: Idefics3 image splitting)"
        )
    processor = model.tower.processor_config
    if processor.resample != "lanczos":
        differences.append(
            f"the tower's processor resizes with {processor.resample!r}, and llama.cpp always resizes with Lanczos: "
            f"its views get other pixels; train with resample='lanczos', as Idefics3 and SmolVLM do"
        )
    differences += llama_cpp_pixel_values(processor)
    grid = model.tower.config.position_grid
    if not buckets_keep_native_grid(grid):
        differences.append(
            f"llama.cpp reads the position table cell by cell at the tower's native {grid}x{grid} grid, where "
            f"Idefics3's bucketed lookup reads a neighbour's cell for some patches at this grid: its features differ"
        )
    if tokenizer is not None:
        other = [text for text in ("\n", "\n\n") if not _llama_cpp_token(tokenizer, text)]
        if other:
            differences.append(
                f"the tokenizer does not write {' or '.join(map(repr, other))} as the one token llama.cpp puts there "
                f"(the first vocabulary entry that reads so; an invalid id where none does): its prompts hold other "
                f"ids"
            )
    return differences


def _llama_cpp_token(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether ``tokenizer`` writes ``text`` as the token llama.cpp's Idefics3 path inserts for it: one token, and no
    entry before it that reads ``text`` (llama.cpp takes the first)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and text not in tokenizer.batch_decode([[i] for i in range(ids[0])])


def _warn_of_differences(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Log what Idefics3's tower in transformers and llama.cpp would compute otherwise than this model."""
    tower = model.tower.config
    if tower.position_lookup != "buckets":
        logger.warning(
            "Idefics3's tower looks positions up by buckets for images smaller than %dx%d pixels, where this tower "
            "interpolates: the export is exact at the native size (each tile of Idefics3's processor)",
            tower.image_size,
            tower.image_size,
        )
    for difference in llama_cpp_differences(model, tokenizer):
        logger.warning("llama.cpp would run this export otherwise than transformers: %s", difference)


def _check_exportable(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    model.check_exportable("cannot export to Idefics3's format", tiling=False, splitting=ImageSplitting)
    tower = model.tower.config
    if tower.naflex:
        raise ValueError("NaFlex towers cannot be exported to Idefics3's format, whose tower is fixed-resolution")
    projector = model.projector
    if not isinstance(projector, PixelShuffleProjector):
        raise ValueError(
            f"Idefics3's connector is pixel shuffle then one linear layer; a {projector.config.kind!r} projector "
            f"cannot be exported to it"
        )
    config = projector.config
    if config.depth != 1 or config.bias or config.norm or config.layers != (None,):
        raise ValueError(
            f"Idefics3's connector is one linear layer without bias or norm on the final tokens; this projector has "
            f"depth={config.depth}, bias={config.bias}, norm={config.norm}, layers={config.layers} (build it with "
            f"depth=1, bias=False, layers=(None,), e.g. get_recipe('idefics3').projector_config(...))"
        )
    if tower.position_lookup != "buckets" and not buckets_keep_native_grid(tower.position_grid):
        raise ValueError(
            f"Idefics3's tower looks positions up by buckets, which at this tower's native {tower.position_grid}x"
            f"{tower.position_grid} grid read a neighbour's cell for some patches (float32 coordinates), where this "
            f"tower reads its table as is: transformers would compute other features. Export a tower of another "
            f"image size, or one trained with position_lookup='buckets'"
        )
    if tower.position_grid % config.factor:
        raise ValueError(
            f"Idefics3 shuffles a square grid by scale_factor; the tower's {tower.position_grid}x"
            f"{tower.position_grid} grid is not divisible by factor={config.factor}"
        )
    if tokenizer is not None:
        tags = [] if model.splitting is None else model.splitting.row_col_tokens()
        image_token = check_tokenizer(
            tokenizer,
            model.language_model,
            model.image_token_id,
            (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE, *tags),
        )
        if image_token != IMAGE_TOKEN:
            raise ValueError(
                f"the model's image token is {image_token!r}, but Idefics3's processor writes {IMAGE_TOKEN!r}; build "
                f"the model with add_idefics3_tokens(tokenizer, language_model)"
            )


def _image_processor(tower: SigLIP2Encoder, splitting: ImageSplitting | None) -> Idefics3ImageProcessor:
    """Idefics3's image processor doing what ours does: with ``splitting``, the longest-edge resize, the tiles and the
    global view; without, one view per image, resized to the tower's size (no aspect-preserving resize first, no
    tiles); then rescaled and normalised as the tower's checkpoint says."""
    settings = processor_config_to_hf(tower.processor_config)
    kept = ("resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
    edge = {"longest_edge": tower.config.image_size}
    return Idefics3ImageProcessor(
        **{k: settings[k] for k in kept},
        do_convert_rgb=True,
        do_resize=splitting is not None,
        size=edge if splitting is None else {"longest_edge": splitting.longest_edge},
        do_image_splitting=splitting is not None,
        max_image_size=edge,
    )


def export_idefics3(
    model: VisionLanguageModel,
    directory: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    chat_template: str | None = None,
) -> None:
    """Write ``model`` as a transformers Idefics3 checkpoint that ``AutoProcessor`` + ``apply_chat_template`` +
    ``Idefics3ForConditionalGeneration.generate`` run as they are: the model's files as transformers writes them,
    ``preprocessor_config.json`` and, given the tokenizer, the ``Idefics3Processor``'s files.

    Args:
        model: a fixed-resolution VLM with Idefics3's connector (see the module's docstring; LoRA merged).
        directory: the folder to write.
        tokenizer: the tokenizer the model was built with, holding Idefics3's tokens (:func:`add_idefics3_tokens`).
        chat_template: the processor's Jinja chat template; default
            :func:`~siglip2_encoder.integrations.hf_export.plain_chat_template` (``<image> what colour is it ?``).

    Raises ``ValueError`` naming the reason for configurations Idefics3 cannot express and for a tokenizer that
    does not fit the model."""
    _check_exportable(model, tokenizer)
    _warn_of_differences(model, tokenizer)
    tower, projector, lm = model.tower, model.projector, model.language_model
    vision = config_to_hf(tower.config.replace(use_head=False, position_lookup="buckets"))
    config = Idefics3Config(
        vision_config={k: v for k, v in vision.items() if k != "architectures"},
        text_config=text_config(lm),
        scale_factor=projector.config.factor,
        image_token_id=model.image_token_id,
        pad_token_id=lm.config.pad_token_id if tokenizer is None else tokenizer.pad_token_id,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    state = {f"model.vision_model.{k}": v for k, v in tower.state_dict().items() if not k.startswith("head.")}
    (linear,) = projector.proj
    state["model.connector.modality_projection.proj.weight"] = linear.weight
    state |= language_model_weights(lm, "model.text_model.", config.tie_word_embeddings)
    grid = tower.config.position_grid // projector.config.factor
    write_export(
        directory,
        Idefics3ForConditionalGeneration,
        config,
        state,
        _image_processor(tower, model.splitting),
        Idefics3Processor,
        tokenizer,
        image_seq_len=grid * grid,
        chat_template=chat_template or (plain_chat_template(IMAGE_TOKEN) if tokenizer is not None else None),
    )


def import_idefics3(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> VisionLanguageModel:
    """Load a transformers Idefics3 checkpoint (``model_type="idefics3"``; a folder or a Hub repo) whole into a
    :class:`VisionLanguageModel`: the tower (with the image processor's settings), the connector as a pixel-shuffle
    projector, the language model, the image token, and the image splitting its processor does
    (``do_image_splitting``: :attr:`VisionLanguageModel.splitting`). Build its batches with
    ``VLMProcessor(tokenizer, ImageProcessor(model.tower.processor_config), model.projector, patch_size,
    splitting=model.splitting)`` (without splitting: ``image_start=IMAGE_START, image_end=IMAGE_END``)."""
    directory, model_type = checkpoint_folder(name_or_path, revision, token, local_files_only)
    if model_type != "idefics3":
        raise ValueError(f"{directory} is a {model_type!r} checkpoint, not 'idefics3'")
    images = Idefics3ImageProcessor.from_pretrained(directory)
    edge = images.max_image_size["longest_edge"]
    splitting = ImageSplitting(edge, images.size["longest_edge"]) if images.do_image_splitting else None
    if splitting is None and images.do_resize and images.size.get("longest_edge") != edge:
        raise ValueError(
            f"{directory}'s processor resizes the longest edge to {images.size['longest_edge']} px before its one "
            f"view of {edge} px, which is not reproduced; set do_resize false or size to max_image_size there"
        )
    idefics = Idefics3ForConditionalGeneration.from_pretrained(directory, dtype=dtype or torch.float32)
    config = idefics.config
    # Either way the processor is reproduced (its splitting, or its one view): no "not reproduced" warning.
    stored = read_checkpoint(CheckpointSource(directory), dtype=idefics.dtype, views=True)
    tower = build_loaded(lambda: SigLIP2Encoder(stored.config, stored.processor_config), stored.state_dict,
                         str(directory), "vision tower")  # fmt: skip
    if tower.config.image_size != edge:
        raise ValueError(f"the tower takes {tower.config.image_size} px but the processor's views are {edge} px")
    factor, width = config.scale_factor, tower.config.hidden_size
    projector = build_projector(PixelShuffleConfig(
        in_features=width, out_features=config.text_config.hidden_size, factor=factor, depth=1, bias=False,
        layers=(None,),
    ))  # fmt: skip
    (linear,) = projector.proj
    linear.load_state_dict(idefics.model.connector.modality_projection.proj.state_dict())
    lm = language_model_from(idefics, idefics.model.text_model, config.text_config)
    return VisionLanguageModel(tower, projector.to(idefics.dtype), lm, config.image_token_id, splitting=splitting)
