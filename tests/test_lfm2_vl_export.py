"""The LFM2-VL export: a NaFlex VLM (SigLIP 2 NaFlex tower sized by LFM2-VL's rule, pixel unshuffle + 2-layer MLP,
a Llama or LFM2 language model) written as transformers' ``Lfm2VlForConditionalGeneration`` runs in transformers
alone with our prompt ids, patches and greedy tokens."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from conftest import perturb
from PIL import Image
from test_llava import LM, TOWER, make_tokenizer, run_as_the_card_says
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Lfm2Config,
    Lfm2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from siglip2_encoder import SigLIP2Encoder, get_recipe
from siglip2_encoder.adapters import MLPConfig, PixelShuffleConfig, build_projector
from siglip2_encoder.integrations.lfm2_splitting import Lfm2VlSplitting
from siglip2_encoder.integrations.lfm2_vl_export import (
    IMAGE_END,
    IMAGE_START,
    add_lfm2_vl_tokens,
    export_lfm2_vl,
    import_lfm2_vl,
)
from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor, add_image_token

QUESTION = "what colour is the shape"


def lfm2_vl_model(
    lm: str = "llama",
    projector: PixelShuffleConfig | MLPConfig | None = None,
    smart: bool = True,
    lm_sizes: dict | None = None,
    norm: bool = False,
    splitting: Lfm2VlSplitting | None = None,
):
    """A NaFlex VLM built for LFM2-VL's format: 8 px patches, grids of multiples of 2 within 4 to 16 patches; a Llama
    or LFM2 language model of test_llava's sizes (or ``lm_sizes``); with ``splitting``, LFM2-VL's splitting."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    tower = SigLIP2Encoder.from_preset(
        "siglip2-base-patch16-224", **TOWER, patch_size=8, image_size=None, num_patches=16
    )
    if smart:
        tower.processor_config = tower.processor_config.replace(
            naflex_resize="smart", min_num_patches=4, grid_multiple=2
        )
    sizes = lm_sizes or LM
    if lm == "llama":
        language_model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **sizes, tie_word_embeddings=False))
    else:
        layers = dict(num_hidden_layers=2, layer_types=["conv", "full_attention"])
        language_model = Lfm2ForCausalLM(Lfm2Config(vocab_size=len(tokenizer), **(sizes | layers)))
    image_token_id = add_lfm2_vl_tokens(tokenizer, language_model, splitting)
    width = sizes["hidden_size"]
    recipe = get_recipe("lfm2_vl").projector_config(32, width, hidden_features=40, norm=norm)
    connector = build_projector(projector or recipe)
    model = VisionLanguageModel(tower, connector, language_model.eval(), image_token_id, splitting=splitting)
    model = perturb(model, seed=3).eval()
    text = {} if splitting is not None else dict(image_start=IMAGE_START, image_end=IMAGE_END)
    return model, VLMProcessor.for_model(model, tokenizer, **text), tokenizer


@pytest.mark.parametrize(("lm", "norm"), [("llama", False), ("lfm2", False), ("llama", True)])
def test_an_lfm2_vl_export_runs_in_transformers_end_to_end(lm, norm, tmp_path):
    """transformers alone (AutoProcessor + chat template + generate, and the pipeline) on the export: our prompt ids
    (BOS, <|image_start|>, the image's tokens, <|image_end|>, the text), our patches, grids and greedy tokens, on a
    wide image, a tiny one (scaled up to the floor) and a large one (scaled down into the budget); with and without
    the projector's LayerNorm."""
    model, processor, tokenizer = lfm2_vl_model(lm, norm=norm)
    export_lfm2_vl(model, tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Lfm2VlForConditionalGeneration"]
    assert config["projector_use_layernorm"] == norm
    rng = np.random.default_rng(1)
    for size in [(30, 90), (6, 9), (200, 150)]:
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        inputs, generated = run_as_the_card_says(tmp_path, image, QUESTION)
        ours = processor([f"<image> {QUESTION}"], [[image]])
        assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()
        torch.testing.assert_close(inputs["spatial_shapes"], ours["spatial_shapes"], atol=0, rtol=0)
        real = ours["pixel_attention_mask"][0].bool()
        torch.testing.assert_close(inputs["pixel_values"][0, : int(real.sum())], ours["pixel_values"][0, real])
        assert generated == model.generate(**ours, max_new_tokens=8, do_sample=False).tolist()


@pytest.mark.parametrize("lm", ["llama", "lfm2"])
def test_a_splitting_lfm2_vl_export_runs_in_transformers_end_to_end(lm, tmp_path):
    """With LFM2-VL's splitting, transformers alone on the export tiles as the model does: our prompt ids (each
    tile's tokens after its <|img_row_r_col_c|>, the thumbnail's after <|img_thumbnail|>), every view's patches and
    grid, and our greedy tokens; on a wide image, a tall one, and one below the threshold (one view)."""
    splitting = Lfm2VlSplitting(tile=32, min_tiles=2, max_tiles=3)  # few tags: a tiny LM would say little else
    model, processor, tokenizer = lfm2_vl_model(lm, splitting=splitting)
    export_lfm2_vl(model, tmp_path, tokenizer)
    images = AutoProcessor.from_pretrained(tmp_path).image_processor
    assert (images.do_image_splitting, images.tile_size, images.min_tiles, images.max_tiles) == (True, 32, 2, 3)
    rng = np.random.default_rng(1)
    for size, grid in [((30, 100), (1, 3)), ((130, 60), (2, 1)), ((40, 30), (0, 0))]:
        assert splitting.grid(*size, model.tower.processor_config) == grid
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        inputs, generated = run_as_the_card_says(tmp_path, image, QUESTION)
        ours = processor([f"<image> {QUESTION}"], [[image]])
        assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()
        torch.testing.assert_close(inputs["spatial_shapes"], ours["spatial_shapes"], atol=0, rtol=0)
        assert len(ours["spatial_shapes"]) == grid[0] * grid[1] + 1  # the tiles and the thumbnail, or one view
        for view, real in enumerate(ours["pixel_attention_mask"].bool()):
            torch.testing.assert_close(
                inputs["pixel_values"][view, : int(real.sum())], ours["pixel_values"][view, real]
            )
        assert generated == model.generate(**ours, max_new_tokens=8, do_sample=False).tolist()


def test_the_exported_prompt_wraps_each_image_as_lfm2_vls_processor_does(tmp_path):
    model, processor, tokenizer = lfm2_vl_model()
    export_lfm2_vl(model, tmp_path, tokenizer)
    image = np.zeros((30, 90, 3), np.uint8)  # 2 x 6 patches after the rule: 3 tokens after the 2 x 2 unshuffle
    ids = processor([f"<image> {QUESTION}"], [[image]])["input_ids"][0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<s>", IMAGE_START, "<image>", "<image>", "<image>", IMAGE_END, *QUESTION.split()]


def test_what_lfm2_vls_format_cannot_hold_is_refused(tmp_path):
    model, _, tokenizer = lfm2_vl_model(smart=False)
    message = (
        "cannot export to LFM2-VL's format: LFM2-VL's processor sizes images by its smart_resize rule, with grids in "
        "multiples of the unshuffle factor (2); this tower's processor has naflex_resize='siglip2', grid_multiple=1"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_lfm2_vl(model, tmp_path, tokenizer)
    model, _, tokenizer = lfm2_vl_model(projector=MLPConfig(in_features=32, out_features=48, layers=(None,)))
    message = "a 'mlp' projector cannot be written as it"
    with pytest.raises(ValueError, match=re.escape(message)):
        export_lfm2_vl(model, tmp_path, tokenizer)
    model, _, tokenizer = lfm2_vl_model(projector=PixelShuffleConfig(in_features=32, out_features=48, layers=(-2,)))
    message = "LFM2-VL's projector is two linear layers on the final tokens; this one has depth=1, layers=(-2,)"
    with pytest.raises(ValueError, match=re.escape(message)):
        export_lfm2_vl(model, tmp_path, tokenizer)
    model, _, _ = lfm2_vl_model()
    plain = make_tokenizer()  # <image> at the model's id, but other tokens where LFM2-VL's should be
    plain.add_tokens(["<a>", "<b>"], special_tokens=True)
    add_image_token(plain, None)
    message = "the tokenizer lacks <|image_start|>, <|image_end|>, which this format's processor writes into prompts"
    with pytest.raises(ValueError, match=re.escape(message)):
        export_lfm2_vl(model, tmp_path, plain)


def test_a_fixed_resolution_vlm_is_sent_to_the_other_exports(tmp_path):
    from test_llava import make_vlm

    model, _, tokenizer = make_vlm(projector="pixel_shuffle")
    message = (
        "LFM2-VL's tower is NaFlex and this one is fixed-resolution; export it with export_llava or export_idefics3"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_lfm2_vl(model, tmp_path, tokenizer)


def test_an_lfm2_vl_checkpoint_imports_whole(tmp_path, caplog):
    """An LFM2-VL checkpoint whose processor splits, as LFM2-VL's own do (the export of a model with splitting),
    imports whole, its splitting included, without a warning: the same projector and processor, and on an image it
    tiles and one it does not, transformers' prompt ids and logits."""
    splitting = Lfm2VlSplitting(tile=32, max_tiles=3)
    model, _, tokenizer = lfm2_vl_model(norm=True, splitting=splitting)
    export_lfm2_vl(model, tmp_path, tokenizer)
    with caplog.at_level(logging.WARNING):
        imported = import_lfm2_vl(tmp_path)
    assert "smart_resize rule" not in caplog.text
    assert imported.splitting == splitting
    assert imported.projector.config == model.projector.config
    assert imported.tower.processor_config == model.tower.processor_config
    processor = VLMProcessor.for_model(imported, tokenizer)
    transformers_model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    rng = np.random.default_rng(2)
    for size, views in [((60, 90), 3), ((20, 40), 1)]:  # 1 x 2 tiles and the thumbnail; one view
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        ours = processor([f"<image> {QUESTION}"], [[image]])
        assert len(ours["spatial_shapes"]) == views
        theirs = AutoProcessor.from_pretrained(tmp_path)(images=[image], text=[f"<s><image> {QUESTION}"])
        assert theirs["input_ids"] == ours["input_ids"].tolist()
        with torch.no_grad():
            want = transformers_model(**{k: torch.as_tensor(v) for k, v in theirs.items()}).logits
            torch.testing.assert_close(imported(**ours).logits, want, atol=1e-5, rtol=0)


def test_split_batches_give_transformers_logits(tmp_path):
    """Two samples, one with two images (one split, one not), left-padded: transformers' processor on the export gives
    our ids, views and grids, and Lfm2VlForConditionalGeneration our logits on every real position. The model saves
    and loads with its splitting."""
    model, processor, tokenizer = lfm2_vl_model(splitting=Lfm2VlSplitting(tile=32, max_tiles=3))
    export_lfm2_vl(model, tmp_path / "export", tokenizer)
    rng = np.random.default_rng(4)
    pics = [
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in [(40, 110), (90, 60), (20, 30)]
    ]
    prompts = ["<image> describe image", "what is <image> and <image>"]
    images = [[pics[0]], [pics[1], pics[2]]]
    ours = processor(prompts, images, padding_side="left")
    assert len(ours["spatial_shapes"]) == 4 + 3 + 1  # 1 x 3 tiles and a thumbnail, 2 x 1 and one, one view
    texts = ["<s>" + prompt for prompt in prompts]  # BOS as text, as the chat template writes it
    theirs = AutoProcessor.from_pretrained(tmp_path / "export")
    inputs = theirs(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(inputs["spatial_shapes"], ours["spatial_shapes"], atol=0, rtol=0)
    positions = (ours["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    transformers_model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        got = model(**ours).logits
        want = transformers_model(**inputs, position_ids=positions).logits
    real = ours["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path / "saved")
    assert VisionLanguageModel.from_pretrained(tmp_path / "saved").splitting == model.splitting


def test_a_checkpoint_splitting_into_one_tile_is_refused(tmp_path):
    """LFM2-VL's processor with min_tiles=1 can pick one tile, then counts the thumbnail's tokens for it: refused."""
    model, _, tokenizer = lfm2_vl_model()
    export_lfm2_vl(model, tmp_path, tokenizer)
    for name in ("processor_config.json", "preprocessor_config.json"):
        settings = json.loads((tmp_path / name).read_text())
        settings.get("image_processor", settings).update(do_image_splitting=True, min_tiles=1, max_tiles=4)
        (tmp_path / name).write_text(json.dumps(settings))
    message = (
        f"{tmp_path}'s image processor: LFM2-VL splits an image into 2 or more tiles: need 2 <= min_tiles <= "
        f"max_tiles, got min_tiles=1, max_tiles=4 (for one view per image, use no splitting)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        import_lfm2_vl(tmp_path)


def test_import_lfm2_vl_refuses_other_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} is a 'llava' checkpoint, not 'lfm2_vl'")):
        import_lfm2_vl(tmp_path)
