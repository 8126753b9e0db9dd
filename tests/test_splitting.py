"""Idefics3 / SmolVLM image splitting against transformers: ``Idefics3ImageProcessor(do_image_splitting=True)``
(views pixel for pixel, rows and columns) and ``Idefics3Processor`` (the prompt around each image)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import random_images
from test_llava import make_tokenizer
from transformers import Idefics3ImageProcessor, Idefics3Processor

from siglip2_encoder import ImageProcessor, ProcessorConfig
from siglip2_encoder.integrations.splitting import ImageSplitting

TILE, PATCH = 32, 8
# wide, tall, square, tiny (upscaled), one tile exactly, odd sizes
SIZES = [(40, 150), (170, 45), (64, 64), (9, 13), (32, 32), (33, 100), (101, 37), (200, 199)]


def processors(tile: int = TILE, longest: int = 4 * TILE):
    ours = ImageProcessor(ProcessorConfig((tile, tile), patch_size=PATCH, resample="lanczos"))
    theirs = Idefics3ImageProcessor(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                                    do_image_splitting=True)  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize("longest", [4 * TILE, 3 * TILE + 5, TILE])
def test_views_equal_transformers_image_processor(longest):
    ours, theirs = processors(longest=longest)
    splitting = ImageSplitting(TILE, longest)
    images = random_images(0, SIZES)
    want = theirs([[image] for image in images], return_tensors="pt", return_row_col_info=True)
    split = 0
    for i, image in enumerate(images):
        got = splitting.views(image, ours)
        rows, cols = splitting.grid(*image.shape[:2])
        assert (rows, cols) == (want["rows"][i][0], want["cols"][i][0])
        assert len(got) == splitting.num_views(*image.shape[:2])
        torch.testing.assert_close(got, want["pixel_values"][i, : len(got)], atol=1e-5, rtol=0)
        split += rows > 0
    assert split == (len(images) if longest > TILE else 0)  # a longest edge of one tile splits nothing


def test_the_prompt_is_idefics3_processors():
    _, image_processor = processors()
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<global-img>"]})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4)
    splitting = ImageSplitting(TILE, 4 * TILE)
    for h, w in SIZES:
        rows, cols = splitting.grid(h, w)
        before, after = splitting.prompt(rows, cols)
        assert len(before) == splitting.num_views(h, w)
        ours = "".join(text + "<image>" * 4 for text in before) + after
        assert ours == processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match=re.escape("tile must be a positive int, got tile=0")):
        ImageSplitting(0, 128)
    with pytest.raises(ValueError, match=re.escape("the processor makes (48, 48) images; the views are 32 px")):
        ImageSplitting(TILE, 128).views(random_images(0, [(40, 40)])[0], ImageProcessor(ProcessorConfig((48, 48))))


def split_vlm(longest: int, tokenizer=None, resample: str | None = None):
    """A VLM built for Idefics3's format with image splitting: Idefics3's tokens and row / column tags; ``tokenizer``
    and the tower's ``resample`` filter replace the tests' defaults when given."""
    from conftest import perturb
    from test_llava import make_vlm

    from siglip2_encoder.integrations.idefics3_export import add_idefics3_tokens
    from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor

    built, _, tokenizer = make_vlm(projector="idefics3", tokenizer=tokenizer)
    if resample is not None:
        built.tower.processor_config = dataclasses.replace(built.tower.processor_config, resample=resample)
    splitting = ImageSplitting(TILE, longest)
    image_token_id = add_idefics3_tokens(tokenizer, built.language_model, splitting)
    model = VisionLanguageModel(built.tower, built.projector, built.language_model, image_token_id, splitting=splitting)
    perturb(model, seed=3)
    image_processor = ImageProcessor(model.tower.processor_config)
    return model, VLMProcessor(tokenizer, image_processor, model.projector, PATCH, splitting=splitting), tokenizer


@pytest.mark.parametrize("size", [(40, 150), (170, 45), (20, 20)])
def test_a_split_idefics3_export_runs_in_transformers_end_to_end(size, tmp_path):
    """The export with splitting: transformers alone (AutoProcessor + chat template + generate) gives our input ids,
    every view's pixels and our greedy tokens; saved and loaded, the model keeps its splitting."""
    from PIL import Image
    from test_llava import run_as_the_card_says

    from siglip2_encoder.integrations.idefics3_export import export_idefics3
    from siglip2_encoder.integrations.llava import VisionLanguageModel

    model, processor, tokenizer = split_vlm(3 * TILE)
    export_idefics3(model, tmp_path / "exported", tokenizer)
    image = Image.fromarray(random_images(8, [size])[0])
    inputs, generated = run_as_the_card_says(tmp_path / "exported", image, "what colour is the shape")
    ours = processor(["<image> what colour is the shape"], [[image]])
    assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()
    assert len(ours["pixel_values"]) == ImageSplitting(TILE, 3 * TILE).num_views(*size) > 1  # small ones upscaled
    torch.testing.assert_close(inputs["pixel_values"][0], ours["pixel_values"], atol=1e-5, rtol=0)
    assert generated == model.generate(**ours, max_new_tokens=8, do_sample=False).tolist()
    model.save_pretrained(tmp_path / "saved")
    assert VisionLanguageModel.from_pretrained(tmp_path / "saved").splitting == model.splitting
    config = tmp_path / "saved" / "vlm_config.json"
    saved = json.loads(config.read_text())
    assert saved["splitting"].pop("kind") == "idefics3"
    config.write_text(json.dumps(saved))  # as written before LFM2-VL's splitting: no kind, Idefics3's
    assert VisionLanguageModel.from_pretrained(tmp_path / "saved").splitting == model.splitting


@pytest.mark.parametrize("splitting", [True, False])
def test_an_idefics3_checkpoint_imports_whole(splitting, tmp_path):
    """export_idefics3 (which transformers runs as ours, tests above) -> import_idefics3: the tower with its
    preprocessing, the connector, the LM, the image token and the splitting come back; the same logits."""
    from test_idefics3_export import make_idefics3_vlm

    from siglip2_encoder.integrations.idefics3_export import IMAGE_END, IMAGE_START, export_idefics3, import_idefics3
    from siglip2_encoder.integrations.llava import VLMProcessor

    model, processor, tokenizer = split_vlm(3 * TILE) if splitting else make_idefics3_vlm()
    export_idefics3(model, tmp_path, tokenizer)
    imported = import_idefics3(tmp_path).eval()
    assert imported.splitting == model.splitting and imported.image_token_id == model.image_token_id
    assert imported.tower.processor_config == model.tower.processor_config
    framing = {} if splitting else dict(image_start=IMAGE_START, image_end=IMAGE_END)
    again = VLMProcessor.for_model(imported, tokenizer, **framing)
    pics = random_images(9, [(40, 90), (64, 30)])
    batch = processor(["<image> describe image", "what is <image> it"], [[pics[0]], [pics[1]]])
    assert again(["<image> describe image", "what is <image> it"], [[pics[0]], [pics[1]]])["input_ids"].equal(
        batch["input_ids"]
    )
    with torch.no_grad():
        torch.testing.assert_close(imported(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=0)


def test_split_batches_give_transformers_logits(tmp_path):
    """Two samples, one with two images, left-padded: transformers' processor on the export gives our ids and
    Idefics3ForConditionalGeneration our logits on every real position."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from siglip2_encoder.integrations.idefics3_export import export_idefics3

    model, processor, tokenizer = split_vlm(3 * TILE)
    export_idefics3(model, tmp_path, tokenizer)
    theirs_processor = AutoProcessor.from_pretrained(tmp_path)
    theirs = Idefics3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    pics = random_images(10, [(40, 150), (90, 60), (20, 30)])
    prompts = ["<image> describe image", "what is <image> and <image>"]
    images = [[pics[0]], [pics[1], pics[2]]]
    ours = processor(prompts, images, padding_side="left")
    texts = ["<s>" + prompt for prompt in prompts]  # BOS as text, as the chat template writes it
    inputs = theirs_processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()
    positions = (ours["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        got = model.eval()(**ours).logits
        want = theirs(**inputs, position_ids=positions).logits
    real = ours["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
