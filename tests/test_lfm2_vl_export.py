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

from siglip2_encoder import ImageProcessor, SigLIP2Encoder, get_recipe
from siglip2_encoder.adapters import MLPConfig, PixelShuffleConfig, build_projector
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
):
    """A NaFlex VLM built for LFM2-VL's format: 8 px patches, grids of multiples of 2 within 4 to 16 patches; a Llama
    or LFM2 language model of test_llava's sizes (or ``lm_sizes``)."""
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
    image_token_id = add_lfm2_vl_tokens(tokenizer, language_model)
    width = sizes["hidden_size"]
    recipe = get_recipe("lfm2_vl").projector_config(32, width, hidden_features=40, norm=norm)
    connector = build_projector(projector or recipe)
    model = perturb(VisionLanguageModel(tower, connector, language_model.eval(), image_token_id), seed=3).eval()
    processor = VLMProcessor(
        tokenizer, ImageProcessor(tower.processor_config), connector, 8, image_start=IMAGE_START, image_end=IMAGE_END
    )
    return model, processor, tokenizer


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
    """An LFM2-VL checkpoint (the export, its processor set to tile as LFM2-VL's own checkpoints do) imports whole:
    the same projector, and on an image below the tiling threshold transformers' prompt ids and logits; loading
    warns that large images are not tiled here."""
    model, _, tokenizer = lfm2_vl_model(norm=True)
    export_lfm2_vl(model, tmp_path, tokenizer)
    for name in ("processor_config.json", "preprocessor_config.json"):
        settings = json.loads((tmp_path / name).read_text())
        images = settings.get("image_processor", settings)
        images |= dict(do_image_splitting=True, min_tiles=2, max_tiles=10)
        (tmp_path / name).write_text(json.dumps(settings))
    with caplog.at_level(logging.WARNING):
        imported = import_lfm2_vl(tmp_path)
    assert "here that thumbnail, by its smart_resize rule" in caplog.text
    assert imported.projector.config == model.projector.config
    assert imported.tower.processor_config == model.tower.processor_config
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 40, 3), dtype=np.uint8))  # not tiled
    processor = VLMProcessor.for_model(imported, tokenizer, image_start=IMAGE_START, image_end=IMAGE_END)
    ours = processor([f"<image> {QUESTION}"], [[image]])
    theirs = AutoProcessor.from_pretrained(tmp_path)(images=[image], text=[f"<s><image> {QUESTION}"])
    assert theirs["input_ids"] == ours["input_ids"].tolist()
    transformers_model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = transformers_model(**{k: torch.as_tensor(v) for k, v in theirs.items()}).logits
        torch.testing.assert_close(imported(**ours).logits, want, atol=1e-5, rtol=0)


def test_import_lfm2_vl_refuses_other_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} is a 'llava' checkpoint, not 'lfm2_vl'")):
        import_lfm2_vl(tmp_path)
