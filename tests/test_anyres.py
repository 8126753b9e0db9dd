"""AnyRes tiling against transformers' LLaVA-OneVision: its image processor (views, pixel for pixel), its processor's
token count, and a tiny ``LlavaOnevisionModel``'s ``get_image_features`` (the reassembled LLM tokens)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import random_images
from PIL import Image
from test_llava import LM, TOWER, make_tokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionModel,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    SiglipVisionConfig,
)

from siglip2_encoder import ImageProcessor, ProcessorConfig, SigLIP2Encoder
from siglip2_encoder.adapters import MLPConfig, PixelShuffleConfig, build_projector
from siglip2_encoder.integrations.anyres import AnyResTiling
from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor, add_image_token

TILE, PATCH = 32, 8  # a view of 4 x 4 tokens
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
GRIDS = [(r, c) for r in range(1, 7) for c in range(1, 7)]
# (height, width): wide, tall, square, the 1152x768 scaled down (2 x 3 tiles), small, and large enough to be
# shrunk past anyres_max_9 (6 x 6 tiles).
SIZES = [(40, 150), (170, 45), (64, 64), (64, 96), (20, 25), (190, 185), (100, 33), (33, 100), (150, 160)]


def tiling(max_tiles: int = 9, tile: int = TILE) -> AnyResTiling:
    return AnyResTiling.onevision(tile=tile, patch_size=PATCH, max_tiles=max_tiles, grids=GRIDS)


def processors(tile: int = TILE):
    config = ProcessorConfig((tile, tile), patch_size=PATCH, resample="bicubic", image_mean=MEAN, image_std=STD)
    ours = ImageProcessor(config)
    pinpoints = [[r * tile, c * tile] for r, c in GRIDS]
    theirs = LlavaOnevisionImageProcessor(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    return ours, theirs


def test_views_equal_transformers_image_processor():
    ours, theirs = processors()
    images = random_images(0, SIZES)
    want = theirs(images, return_tensors="pt")  # one image per sample: each is tiled
    for i, image in enumerate(images):
        got = tiling().views(image, ours)
        assert want["image_sizes"][i].tolist() == list(image.shape[:2])
        assert len(got) == tiling().num_views(*image.shape[:2]) > 1
        torch.testing.assert_close(got, want["pixel_values"][i, : len(got)], atol=1e-5, rtol=0)
    assert tiling().grid(64, 96) == (2, 3)  # the 1152x768 image, scaled: 7 views

    together = theirs([images[:3]], return_tensors="pt")  # three images in one sample: none is tiled
    for i, image in enumerate(images[:3]):
        got = tiling().views(image, ours, tiled=False)
        assert got.shape == (1, 3, TILE, TILE)
        torch.testing.assert_close(got, together["pixel_values"][i], atol=1e-5, rtol=0)  # (images, 1 view, ...)


@pytest.mark.parametrize("max_tiles", [9, 2])
def test_token_counts_equal_transformers_processor(max_tiles):
    _, image_processor = processors()
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(8, 400, 2)) for _ in range(40)]
    shrunk = 0
    for h, w in sizes:
        want = processor._get_number_of_features(h, w, TILE, TILE)
        assert tiling(max_tiles).num_tokens(h, w) == want, (h, w)
        kept = tiling(max_tiles)._kept(h, w)
        shrunk += kept[:2] != kept[2:]
    assert shrunk > 3  # the shrink past anyres_max_N is exercised
    assert tiling(max_tiles).num_tokens(100, 40, tiled=False) == processor.num_image_tokens + 1


def test_next_token_counts_equal_transformers_processor():
    pinpoints = [[r * TILE, c * TILE] for r, c in GRIDS]
    images = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                     image_grid_pinpoints=pinpoints)  # fmt: skip
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaNextProcessor(images, tokenizer, patch_size=PATCH, vision_feature_select_strategy="full")
    strategy = AnyResTiling(TILE, PATCH, tuple(map(tuple, pinpoints)), "llava_next", None)
    rng = np.random.default_rng(1)
    for h, w in SIZES + [tuple(int(v) for v in rng.integers(8, 400, 2)) for _ in range(40)]:
        assert strategy.num_tokens(h, w) == processor._get_number_of_features(h, w, TILE, TILE), (h, w)
        assert strategy.tiles(alone=False)  # NeXT tiles images that share their sample too


def onevision_model(max_tiles: int, tile: int) -> LlavaOnevisionModel:
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TOWER, image_size=tile, patch_size=PATCH).to_dict(),
        text_config=LlamaConfig(vocab_size=64, **LM).to_dict(),
        image_grid_pinpoints=[[r * tile, c * tile] for r, c in GRIDS],
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaOnevisionModel(config).eval()


@pytest.mark.parametrize(("max_tiles", "tile"), [(9, TILE), (2, TILE), (2, 36)])
def test_reassembled_features_equal_llava_onevision(max_tiles, tile, tmp_path):
    """All views of all images through our tower in one forward, transformers' projector, our reassembly: the
    features transformers' get_image_features gives for the same images (tiled alone, or three in a sample). Tile 36
    with patch 8, like So400m/14 at 384: the tile is no multiple of the patch."""
    theirs = onevision_model(max_tiles, tile)
    theirs.vision_tower.save_pretrained(tmp_path)
    tower = SigLIP2Encoder.from_pretrained(tmp_path).eval()
    ours_processor, their_processor = processors(tile)
    images = random_images(1, SIZES)
    for samples in ([[image] for image in images], [images[:3]]):
        inputs = their_processor(samples, return_tensors="pt")
        with torch.no_grad():
            want = theirs.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                batch_num_images=inputs["batch_num_images"], vision_feature_layer=-1,
                vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{max_tiles}",
            ).pooler_output  # fmt: skip
            tiled = len(samples[0]) == 1
            flat = [image for sample in samples for image in sample]
            assert len(want) == len(flat)
            views = [tiling(max_tiles, tile).views(image, ours_processor, tiled=tiled) for image in flat]
            tokens = tower(torch.cat(views), layers=[-1], return_pooled=False).hidden_states[-1]  # one forward
            projected = theirs.multi_modal_projector(tokens).split([len(v) for v in views])
            for image, features, expected in zip(flat, projected, want):
                h, w = image.shape[:2]
                got = tiling(max_tiles, tile).reassemble(features, h, w, theirs.image_newline, tiled=tiled)
                assert len(got) == tiling(max_tiles, tile).num_tokens(h, w, tiled=tiled)
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match=re.escape("tile 6 is smaller than patch_size 8")):
        AnyResTiling(6, 8, ((6, 6),))
    with pytest.raises(ValueError, match=re.escape("grid_pinpoints must be (height, width) multiples of the tile 32")):
        AnyResTiling(32, 8, ((32, 48),))
    with pytest.raises(ValueError, match=re.escape("max_tiles must be a positive int, got max_tiles=0")):
        AnyResTiling(32, 8, ((32, 32),), max_tiles=0)
    ours, _ = processors()
    wrong = ImageProcessor(ProcessorConfig(image_size=(48, 48)))
    with pytest.raises(ValueError, match=re.escape("the processor makes (48, 48) images; the views are 32 px")):
        tiling().views(random_images(0, [(40, 40)])[0], wrong)
    with pytest.raises(ValueError, match=re.escape("a 64x96 image has 7 views of 16 tokens, got features of shape")):
        tiling().reassemble(torch.zeros(6, 16, 48), 64, 96, torch.zeros(48))


# (family, max_tiles): OneVision at anyres_max_9 and _2 (its grid shrunk), LLaVA-NeXT (never shrunk).
FAMILIES = [("llava_onevision", 9), ("llava_onevision", 2), ("llava_next", None)]


def tiled_vlm_and_transformers(family: str, max_tiles: int | None, tmp_path, lm_sizes: dict = LM):
    """A tiny transformers LLaVA-OneVision or LLaVA-NeXT model (``lm_sizes``: its Llama's) and our tiled
    VisionLanguageModel with its weights, our processor with the family's image processor settings, and transformers'
    image processor."""
    tokenizer = make_tokenizer()
    image_token_id = add_image_token(tokenizer)
    torch.manual_seed(0)
    pinpoints = [[r * TILE, c * TILE] for r, c in GRIDS]
    common = dict(
        vision_config=SiglipVisionConfig(**TOWER, image_size=TILE, patch_size=PATCH).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tokenizer), **lm_sizes, tie_word_embeddings=False).to_dict(),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_token_index=image_token_id,
    )
    image_processor, their_images = processors()
    if family == "llava_next":
        theirs = LlavaNextForConditionalGeneration(LlavaNextConfig(**common)).eval()
        # NeXT's processor: shortest edge and crop at the tile (its defaults, 224, do not fit a SigLIP tower)
        their_images = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                               image_grid_pinpoints=pinpoints)  # fmt: skip
        strategy = AnyResTiling(TILE, PATCH, tuple(map(tuple, pinpoints)), "llava_next", None)
    else:
        aspect = f"anyres_max_{max_tiles}"
        theirs = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**common, vision_aspect_ratio=aspect))
        theirs = theirs.eval()
        strategy = tiling(max_tiles)
    theirs.model.vision_tower.save_pretrained(tmp_path / "tower")
    their_images.save_pretrained(tmp_path / "tower")  # the tower's preprocessing: the family's (bicubic, CLIP's mean)
    lm = LlamaForCausalLM(theirs.config.text_config)
    lm.model.load_state_dict(theirs.model.language_model.state_dict())
    lm.lm_head.load_state_dict(theirs.lm_head.state_dict())
    widths = dict(in_features=TOWER["hidden_size"], out_features=lm_sizes["hidden_size"])
    projector = build_projector(MLPConfig(**widths, layers=(-1,)))
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    for ours, source in zip(linears, (theirs.model.multi_modal_projector.linear_1,
                                      theirs.model.multi_modal_projector.linear_2), strict=True):  # fmt: skip
        ours.load_state_dict(source.state_dict())
    model = VisionLanguageModel(SigLIP2Encoder.from_pretrained(tmp_path / "tower"), projector, lm.eval(),
                                image_token_id, strategy).eval()  # fmt: skip
    with torch.no_grad():
        model.image_newline.copy_(theirs.model.image_newline)
    assert model.tower.processor_config == image_processor.config
    processor = VLMProcessor(tokenizer, image_processor, projector, PATCH, tiling=strategy)
    return model, processor, theirs, their_images


def their_inputs(family: str, their_images, images: list[list]) -> dict:
    """transformers' image inputs for per-sample image lists (text-only samples have none)."""
    samples = [sample for sample in images if sample]
    if family == "llava_next":  # NeXT takes a flat list: every image is tiled
        hf = their_images([image for sample in samples for image in sample], return_tensors="pt")
        return {"pixel_values": hf["pixel_values"], "image_sizes": hf["image_sizes"]}
    hf = their_images(samples, return_tensors="pt")
    return {key: hf[key] for key in ("pixel_values", "image_sizes", "batch_num_images")}


@pytest.mark.parametrize(("family", "max_tiles"), FAMILIES)
def test_a_tiled_vlm_gives_transformers_logits_and_greedy_ids(family, max_tiles, tmp_path):
    """Wide, tall and square images, one alone in each sample, two sharing a sample (tiled by NeXT, not by
    OneVision), a text-only sample; left-padded: logits on every real position and greedy ids equal transformers'."""
    model, processor, theirs, their_images = tiled_vlm_and_transformers(family, max_tiles, tmp_path)
    pics = random_images(4, [(40, 150), (170, 45), (64, 64), (100, 33), (33, 100)])
    prompts = ["<image> describe image", "what is <image> it", "<image> what colour is <image>", "what shape",
               "<image> the shape"]  # fmt: skip
    images = [[pics[0]], [pics[1]], [pics[3], pics[4]], [], [pics[2]]]
    batch = processor(prompts, images, padding_side="left")
    assert batch["image_tiled"].tolist() == [True, True, family == "llava_next", family == "llava_next", True]
    hf = their_inputs(family, their_images, images)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        got = model(**batch).logits
        want = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                      **hf).logits  # fmt: skip
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    ids = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=5, do_sample=False)
    their_ids = theirs.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **hf,
                                max_new_tokens=5, do_sample=False)  # fmt: skip
    assert ids.tolist() == their_ids[:, batch["input_ids"].shape[1] :].tolist()


def test_a_tiled_vlm_saves_loads_and_refuses_what_it_cannot_do(tmp_path):
    from siglip2_encoder.integrations.idefics3_export import export_idefics3

    model, processor, _, _ = tiled_vlm_and_transformers("llava_onevision", 9, tmp_path)
    batch = processor(["<image> describe image"], [random_images(5, [(50, 120)])])
    model.save_pretrained(tmp_path / "saved")
    again = VisionLanguageModel.from_pretrained(tmp_path / "saved").eval()
    assert again.tiling == model.tiling and torch.equal(again.image_newline, model.image_newline)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match=re.escape("cannot export to Idefics3's format: this model tiles its images")):
        export_idefics3(model, tmp_path / "export")
    with pytest.raises(ValueError, match=re.escape("a model with tiling or splitting takes images only")):
        processor(["<video>"], [[]], videos=[[random_images(0, [(40, 40)])]])
    with pytest.raises(ValueError, match=re.escape("needs image_sizes and image_tiled with its views")):
        model(batch["input_ids"], pixel_values=batch["pixel_values"])
    pooling = build_projector(PixelShuffleConfig(in_features=TOWER["hidden_size"], out_features=LM["hidden_size"]))
    assert pooling.num_tokens((4, 4)) == 4
    with pytest.raises(ValueError, match=re.escape("the pixel_shuffle projector turns a 4x4 view into 4 tokens")):
        VisionLanguageModel(model.tower, pooling, model.language_model, model.image_token_id, model.tiling)
    with pytest.raises(ValueError, match=re.escape("give max_tiles=None with llava_next; got family='llava_next'")):
        AnyResTiling(TILE, PATCH, ((TILE, TILE),), "llava_next", 9)


@pytest.mark.parametrize(("family", "max_tiles"), [FAMILIES[1], FAMILIES[2]])
def test_a_tiled_checkpoint_imports_whole_and_exports_back_to_run_in_transformers(family, max_tiles, tmp_path):
    """transformers' checkpoint -> import_llava (tiling, image_newline, processor settings) -> the same logits; then
    export_llava -> transformers alone (AutoProcessor + chat template + generate) gives our input ids, views and
    greedy tokens."""
    from test_llava import run_as_the_card_says

    from siglip2_encoder.integrations.llava_export import export_llava, import_llava

    model, processor, theirs, their_images = tiled_vlm_and_transformers(family, max_tiles, tmp_path)
    theirs.save_pretrained(tmp_path / "checkpoint")
    their_images.save_pretrained(tmp_path / "checkpoint")
    imported = import_llava(tmp_path / "checkpoint").eval()
    assert imported.tiling == model.tiling and torch.equal(imported.image_newline, model.image_newline)
    assert imported.tower.processor_config == processor.image_processor.config  # bicubic, CLIP's mean and std
    pics = random_images(6, [(60, 170), (90, 40)])
    batch = processor(["<image> describe image", "what is <image> it"], [[pics[0]], [pics[1]]])
    for_model = VLMProcessor.for_model(imported, processor.tokenizer)  # the imported model's own processor
    again_batch = for_model(["<image> describe image", "what is <image> it"], [[pics[0]], [pics[1]]])
    assert all(torch.equal(again_batch[k], batch[k]) for k in batch)
    with torch.no_grad():
        torch.testing.assert_close(imported(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)

    export_llava(model, tmp_path / "exported", processor.tokenizer)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == family and config.get("vision_aspect_ratio", "anyres_max_2") == "anyres_max_2"
    image = Image.fromarray(random_images(7, [(50, 130)])[0])
    inputs, generated = run_as_the_card_says(tmp_path / "exported", image, "what colour is the shape")
    ours = processor(["<image> what colour is the shape"], [[image]])
    assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"][0], ours["pixel_values"], atol=1e-5, rtol=0)
    assert generated == model.generate(**ours, max_new_tokens=8, do_sample=False).tolist()
    again = import_llava(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_a_next_processor_that_crops_its_views_is_refused(tmp_path):
    from siglip2_encoder.integrations.llava_export import import_llava

    _, _, theirs, _ = tiled_vlm_and_transformers("llava_next", None, tmp_path)
    theirs.save_pretrained(tmp_path / "checkpoint")
    pinpoints = [[r * TILE, c * TILE] for r, c in GRIDS]
    LlavaNextImageProcessor(image_grid_pinpoints=pinpoints).save_pretrained(tmp_path / "checkpoint")  # crop 224
    with pytest.raises(ValueError, match=re.escape("the LLaVA-NeXT image processor crops every view to")):
        import_llava(tmp_path / "checkpoint")
