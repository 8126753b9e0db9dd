"""The text tower and the image-text model against transformers' SiglipModel / Siglip2Model on the same weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TEXT, VISION, perturb
from transformers import (
    AutoModel,
    Siglip2Config,
    Siglip2Model,
    Siglip2TextConfig,
    Siglip2TextModel,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextModel,
)

from siglip2_encoder import CheckpointError, SigLIP2Encoder
from siglip2_encoder.config import EncoderConfig, TextConfig
from siglip2_encoder.data.processor import patchify
from siglip2_encoder.models.joint import SigLIP2Model
from siglip2_encoder.models.text import SigLIP2TextEncoder

IDS = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(3, 16, dtype=torch.long)
MASK[1, 10:] = 0
MASK[2, 4:] = 0
MASK[0, 15] = 0  # the pooled position itself a padding key, with 15 real tokens


@pytest.fixture(scope="module", params=["siglip", "siglip2"])
def image_text_dir(request, tmp_path_factory) -> Path:
    """A transformers image-text checkpoint: SiglipModel (fixed resolution) or Siglip2Model (NaFlex)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "siglip2":
        model = Siglip2Model(Siglip2Config(text_config=TEXT, vision_config=VISION | dict(num_patches=16)))
    else:
        model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION | dict(image_size=32)))
    perturb(model, seed=4).save_pretrained(folder)
    return folder


def reference(folder: Path) -> torch.nn.Module:
    """transformers' model for the folder, chosen by transformers from its config (SiglipModel or Siglip2Model)."""
    return AutoModel.from_pretrained(folder).eval()


def reference_inputs(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if not SigLIP2Encoder.from_pretrained(folder).config.naflex:
        return {"pixel_values": x}
    grids = torch.tensor([[x.shape[-2] // 8, x.shape[-1] // 8]] * len(x))
    mask = torch.ones(len(x), int(grids[0].prod()), dtype=torch.long)
    return {"pixel_values": patchify(x, 8), "spatial_shapes": grids, "pixel_attention_mask": mask}


@pytest.mark.parametrize("generation", ["siglip", "siglip2"])
@pytest.mark.parametrize("mask", [None, MASK], ids=["no mask", "padding mask"])
@pytest.mark.parametrize("fast", [True, False], ids=["inference path", "reference path"])
def test_text_tower_equals_transformers(generation, mask, fast):
    config_class, model_class = {
        "siglip": (SiglipTextConfig, SiglipTextModel),
        "siglip2": (Siglip2TextConfig, Siglip2TextModel),
    }[generation]
    torch.manual_seed(0)
    theirs = perturb(model_class(config_class(**TEXT, projection_size=24)), seed=1)
    ours = SigLIP2TextEncoder(TextConfig(**TEXT, projection_size=24)).eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if k != "embeddings.position_ids"}, strict=True)
    ours.fast_inference = fast
    with torch.no_grad():
        want, got = theirs(input_ids=IDS, attention_mask=mask), ours(IDS, mask)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=0)
    with torch.no_grad():  # pooled only: with a mask, just the real tokens and the last position run
        pooled_only = ours(IDS, mask, return_last=False)
    assert pooled_only.last_hidden_state is None
    torch.testing.assert_close(pooled_only.pooler_output, want.pooler_output, atol=1e-5, rtol=0)


def test_pooled_only_text_features_equal_the_full_run_for_every_mask_shape():
    torch.manual_seed(0)
    tower = perturb(SigLIP2TextEncoder(TextConfig(**TEXT)), seed=3).eval()
    mask = torch.tensor([[1] * 16, [1] * 3 + [0] * 13, [0] * 16, [1, 0] * 8])  # full, short, none real, holes
    ids = IDS[:1].repeat(4, 1)
    for rows in ([0, 1, 3], [0, 1, 2, 3]):  # compacted; with a text of no real token, the full run
        with torch.no_grad():
            full = tower(ids[rows], mask[rows]).pooler_output
            pooled = tower(ids[rows], mask[rows], return_last=False).pooler_output
        torch.testing.assert_close(pooled, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("mask", [None, MASK], ids=["no mask", "padding mask"])
def test_pooled_only_text_features_train_as_transformers_last_layer_at_the_pooled_position(layers, mask):
    """Features only (``return_last=False``, the path of the loss and ``get_text_features``): the last layer computes
    just the pooled position, in training too; the features and every weight's gradient equal transformers'.
    A hook on the last layer sees its whole output as before."""
    torch.manual_seed(0)
    config = TEXT | dict(num_hidden_layers=layers)
    theirs = perturb(SiglipTextModel(SiglipTextConfig(**config)), seed=5).train()
    ours = SigLIP2TextEncoder(TextConfig(**config)).train()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if k != "embeddings.position_ids"}, strict=True)
    want = theirs(input_ids=IDS, attention_mask=mask).pooler_output
    got = ours(IDS, mask, return_last=False).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, atol=1e-5, rtol=0, msg=name)

    seen = []
    ours.encoder.layers[-1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        hooked = ours.eval()(IDS, mask, return_last=False).pooler_output
    torch.testing.assert_close(hooked, want, atol=1e-5, rtol=0)
    assert len(seen) == 1 and seen[0][-1] == TEXT["hidden_size"] and seen[0][0] > len(IDS), seen


def test_image_text_logits_and_features_equal_transformers(image_text_dir):
    theirs, ours = reference(image_text_dir), SigLIP2Model.from_pretrained(image_text_dir)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs = reference_inputs(image_text_dir, x)
    with torch.no_grad():
        want = theirs(input_ids=IDS, **inputs)
        got = ours(IDS, x)
        image = ours.get_image_features(x)
        text = ours.get_text_features(IDS, MASK)
        want_image = theirs.get_image_features(**inputs).pooler_output
        want_text = theirs.get_text_features(input_ids=IDS, attention_mask=MASK).pooler_output
    assert got.logits_per_image.shape == (2, 3)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits_per_text, want.logits_per_text, atol=1e-4, rtol=0)
    torch.testing.assert_close(image, want_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(text, want_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours.logits(image, ours.get_text_features(IDS)), want.logits_per_image, atol=1e-4, rtol=0
    )


def test_saved_model_loads_in_transformers_and_back(image_text_dir, tmp_path):
    ours = SigLIP2Model.from_pretrained(image_text_dir)
    ours.save_pretrained(tmp_path)
    theirs, original = reference(tmp_path), reference(image_text_dir)
    assert type(theirs) is type(original) and theirs.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(theirs.state_dict()[k], original.state_dict()[k]) for k in original.state_dict())
    again = SigLIP2Model.from_pretrained(tmp_path)
    assert again.vision_model.processor_config == ours.vision_model.processor_config
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    tower = SigLIP2Encoder.from_pretrained(tmp_path)  # one tower alone still loads from the joint folder
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in ours.vision_model.state_dict().items())
    text = theirs.config.text_config  # no special token id outside the vocabulary (transformers warns at load)
    ids = [text.bos_token_id, text.eos_token_id, text.pad_token_id]
    assert all(i is None or 0 <= i < text.vocab_size for i in ids), ids


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda t: t(IDS.float()), ValueError, "input_ids must be a (B, L) integer tensor of token ids, got (3, 16)"),
        (
            lambda t: t(torch.zeros(1, 17, dtype=torch.long)),
            ValueError,
            "texts of 17 tokens; this tower takes 1 to 16 (max_position_embeddings): truncate them",
        ),
        (
            lambda t: t(IDS, MASK[:, :8]),
            ValueError,
            "attention_mask of shape (3, 8) must match input_ids (3, 16)",
        ),
    ],
    ids=["float ids", "too long", "mask shape"],
)
def test_bad_text_input_is_refused_with_its_exact_message(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call(SigLIP2TextEncoder(TextConfig(**TEXT)))


def test_bad_model_configs_and_checkpoints_are_refused(fixed_dir):
    vision = EncoderConfig(**VISION, image_size=32)
    with pytest.raises(ValueError, match=re.escape("needs the vision tower's pooling head; got use_head=False")):
        SigLIP2Model(vision.replace(use_head=False), TextConfig(**TEXT))
    with pytest.raises(ValueError, match=re.escape("set text_config.projection_size=32")):
        SigLIP2Model(vision, TextConfig(**TEXT, projection_size=24))
    message = "config.json has model_type='siglip_vision_model', which has no text tower"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        SigLIP2Model.from_pretrained(fixed_dir)


def test_peft_adapters_on_the_text_tower_move_to_transformers(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    tower = SigLIP2TextEncoder(TextConfig(**TEXT))
    base = SiglipTextModel(SiglipTextConfig(**TEXT))
    base.load_state_dict(tower.state_dict(), strict=True)  # the same base weights
    with torch.no_grad():
        plain = base.eval()(input_ids=IDS, attention_mask=MASK).pooler_output
    ours = get_peft_model(tower, LoraConfig(r=2, target_modules=["q_proj", "fc2"]))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        want, got = theirs(input_ids=IDS, attention_mask=MASK).pooler_output, ours.eval()(IDS, MASK).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-3), "the adapter must change the output"


def open_clip_text_tower(model: SiglipModel) -> torch.nn.Module:
    """open_clip's SigLIP text tower (its ``ViT-*-SigLIP*`` text config: no mask, last position, a head with bias)
    with the weights of transformers' ``model``."""
    from functools import partial

    from open_clip.transformer import LayerNorm, TextTransformer

    config, text = model.config.text_config, model.text_model
    tower = TextTransformer(
        context_length=config.max_position_embeddings,
        vocab_size=config.vocab_size,
        width=config.hidden_size,
        heads=config.num_attention_heads,
        layers=config.num_hidden_layers,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        output_dim=config.projection_size,
        no_causal_mask=True,
        pool_type="last",
        proj_bias=True,
        act_layer=partial(torch.nn.GELU, approximate="tanh"),
        norm_layer=partial(LayerNorm, eps=config.layer_norm_eps),
    )
    state = {
        "token_embedding.weight": text.embeddings.token_embedding.weight,
        "positional_embedding": text.embeddings.position_embedding.weight,
        "ln_final.weight": text.final_layer_norm.weight,
        "ln_final.bias": text.final_layer_norm.bias,
        "text_projection.weight": text.head.weight,
        "text_projection.bias": text.head.bias,
    }
    for i, layer in enumerate(text.encoder.layers):
        block, attention = f"transformer.resblocks.{i}.", layer.self_attn
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        state[block + "attn.in_proj_weight"] = torch.cat([p.weight for p in projections])
        state[block + "attn.in_proj_bias"] = torch.cat([p.bias for p in projections])
        pairs = {"ln_1": layer.layer_norm1, "ln_2": layer.layer_norm2, "attn.out_proj": attention.out_proj}
        pairs |= {"mlp.c_fc": layer.mlp.fc1, "mlp.c_proj": layer.mlp.fc2}
        for name, module in pairs.items():
            state[f"{block}{name}.weight"], state[f"{block}{name}.bias"] = module.weight, module.bias
    tower.load_state_dict(state, strict=True)
    return tower.eval()


def test_texts_are_encoded_as_the_models_were_trained_every_position_attended(zero_shot_dir):
    """By default texts carry no padding mask, as big_vision trained both generations: the features equal open_clip's
    SigLIP text tower (which reproduces the papers' numbers) and transformers' on the ids alone; the tokenizer's mask
    (``padding_mask=True``, which transformers' pipeline applies) gives other features. Texts are padded at their
    end even by a tokenizer that pads on the left."""
    from siglip2_encoder.data.tokenizer import TextTokenizer

    texts = ["a photo of a cat.", "a dog", "This is a red car"]
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    tokens = TextTokenizer.from_pretrained(zero_shot_dir)(texts)
    assert tokens.attention_mask is None
    theirs = SiglipModel.from_pretrained(zero_shot_dir).eval()
    with torch.no_grad():
        ours = model.get_text_features(tokens.input_ids)
        torch.testing.assert_close(ours, open_clip_text_tower(theirs)(tokens.input_ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours, theirs.get_text_features(tokens.input_ids).pooler_output, atol=1e-5, rtol=0)
        masked = TextTokenizer.from_pretrained(zero_shot_dir, padding_mask=True)(texts)
        assert masked.attention_mask is not None and masked.attention_mask[1].sum() == 2  # "a", "dog"
        with_mask = model.get_text_features(masked.input_ids, masked.attention_mask)
    assert (ours - with_mask).abs().amax() > 1e-2, "the padding mask changes the features"
    left = TextTokenizer.from_pretrained(zero_shot_dir)
    left.tokenizer.padding_side = "left"  # transformers 5's Siglip2Tokenizer pads on the left
    torch.testing.assert_close(left(texts).input_ids, tokens.input_ids, atol=0, rtol=0)


def test_classify_with_the_padding_mask_equals_transformers_zero_shot_pipeline(zero_shot_dir):
    from PIL import Image
    from transformers import pipeline

    from siglip2_encoder.data.tokenizer import TextTokenizer

    classifier = pipeline("zero-shot-image-classification", model=str(zero_shot_dir))
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    tokenizer = TextTokenizer.from_pretrained(zero_shot_dir, padding_mask=True)  # as transformers runs the texts
    labels = ["cat", "dog", "red car", "apple tree"]
    rng = torch.Generator().manual_seed(2)
    images = [Image.fromarray(torch.randint(0, 256, (40, 50, 3), generator=rng).byte().numpy()) for _ in range(3)]
    label_set = model.encode_labels(labels, tokenizer, canonicalize=False)  # texts as the pipeline gives them
    ours = model.classify(images, label_set)
    assert model.classify(images, labels, tokenizer=tokenizer, canonicalize=False) == ours  # encoded on the fly
    for image, got in zip(images, ours):
        want = classifier(image, candidate_labels=labels)
        assert [r["label"] for r in got] == [r["label"] for r in want]
        for a, b in zip(got, want):
            assert abs(a["score"] - b["score"]) < 1e-4
    assert [len(r) for r in model.classify(images, label_set, top_k=2)] == [2, 2, 2]


def test_a_saved_model_carries_its_tokenizer_and_transformers_pipeline_then_runs_it_as_trained(
    zero_shot_dir, tmp_path, caplog
):
    """save_pretrained writes the checkpoint's own tokenizer, set to give no padding mask and to pad on the right (as
    transformers' SigLIP 2 conversion writes it): transformers' zero-shot pipeline on the saved folder then ranks and
    scores as our default ``classify`` (texts as trained), where on the original folder it applies the mask."""
    from PIL import Image
    from transformers import AutoTokenizer, pipeline

    from siglip2_encoder.data.tokenizer import TextTokenizer

    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    model.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (saved.model_input_names, saved.padding_side) == (["input_ids"], "right")
    labels, image = ["cat", "dog", "red car", "apple tree"], Image.new("RGB", (40, 30), (200, 40, 90))
    ours = model.classify(image, labels, canonicalize=False)[0]
    for folder, same in ((tmp_path / "saved", True), (zero_shot_dir, False)):
        theirs = pipeline("zero-shot-image-classification", model=str(folder))(image, candidate_labels=labels)
        gap = max(abs(a["score"] - next(b["score"] for b in theirs if b["label"] == a["label"])) for a in ours)
        assert (gap < 1e-4) == same, (folder, gap)
    assert "holds no tokenizer" not in caplog.text

    random = SigLIP2Model(model.vision_model.config, model.text_model.config)
    with caplog.at_level("WARNING", logger="siglip2_encoder.models.joint"):
        random.save_pretrained(tmp_path / "random")
    message = "holds no tokenizer: transformers' pipeline and vLLM need one; pass tokenizer=TextTokenizer(...)"
    assert f"{tmp_path / 'random'} {message}" in caplog.text
    random.save_pretrained(tmp_path / "given", tokenizer=TextTokenizer(saved))
    assert (tmp_path / "given" / "tokenizer_config.json").is_file()
    message = "tokenizer must be a TextTokenizer, got a TokenizersBackend: wrap a transformers tokenizer as "
    with pytest.raises(TypeError, match=re.escape(message + "TextTokenizer(tokenizer)")):
        random.save_pretrained(tmp_path / "bad", tokenizer=saved)


def test_a_saved_siglip2_tokenizer_lowercases_in_transformers_as_trained(zero_shot_dir, tmp_path):
    """A tokenizer that lowercases here (SigLIP 2's) is saved with a lowercasing normalizer, as transformers 5's
    Siglip2Tokenizer has: transformers' pipeline on the folder scores texts in capitals as our classify does; the
    caller's tokenizer is left as it was. A tokenizer without a tokenizers backend cannot hold it: refused."""
    from conftest import tiny_tokenizer
    from PIL import Image
    from transformers import AutoTokenizer, pipeline

    from siglip2_encoder.data.tokenizer import TextTokenizer

    model, lower = SigLIP2Model.from_pretrained(zero_shot_dir), TextTokenizer(tiny_tokenizer(), lowercase=True)
    model.save_pretrained(tmp_path / "saved", tokenizer=lower)
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved("A PHOTO OF A CAT")["input_ids"] == saved("a photo of a cat")["input_ids"]
    assert lower.tokenizer("A")["input_ids"] != lower.tokenizer("a")["input_ids"]  # still the caller's own
    labels, image = ["CAT", "A DOG", "Red Car"], Image.new("RGB", (30, 40), (20, 140, 90))
    ours = model.classify(image, labels, tokenizer=lower, canonicalize=False)[0]
    theirs = pipeline("zero-shot-image-classification", model=str(tmp_path / "saved"))(image, candidate_labels=labels)
    assert [r["label"] for r in ours] == [r["label"] for r in theirs]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs)) < 1e-4

    class Slow:  # a tokenizer of transformers' Python classes: no tokenizers backend
        pass

    message = "a Slow cannot be saved to lowercase texts (no tokenizers backend); save TextTokenizer(tokenizer, "
    with pytest.raises(TypeError, match=re.escape(message + "lowercase=False) and lowercase texts before tokenizing")):
        TextTokenizer(Slow(), lowercase=True).save_pretrained(tmp_path / "slow")


def test_classify_files_ranks_as_transformers_pipeline_and_keeps_a_bad_file_in_place(zero_shot_dir, tmp_path):
    from PIL import Image
    from transformers import pipeline

    from siglip2_encoder.data.tokenizer import TextTokenizer
    from siglip2_encoder.pipeline.classify import classify_files

    classifier = pipeline("zero-shot-image-classification", model=str(zero_shot_dir))
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    tokenizer = TextTokenizer.from_pretrained(zero_shot_dir, padding_mask=True)  # as transformers runs the texts
    labels = ["cat", "dog", "red car"]
    for i in range(3):
        Image.new("RGB", (40 + 10 * i, 30), (70 * i, 100, 200)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths = [str(tmp_path / n) for n in ("img0.png", "broken.png", "img1.png", "img2.png")]
    label_set = model.encode_labels(labels, tokenizer, canonicalize=False)  # as the pipeline
    rows = list(classify_files(paths, model, label_set, batch_size=2))
    assert [(r["path"], r["status"]) for r in rows] == [
        (paths[0], "ok"), (paths[1], "failed"), (paths[2], "ok"), (paths[3], "ok")
    ]  # fmt: skip
    assert "broken.png" in rows[1]["error"]
    for row in (rows[0], rows[2], rows[3]):
        want = classifier(Image.open(row["path"]), candidate_labels=labels)
        assert [r["label"] for r in row["labels"]] == [r["label"] for r in want]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(row["labels"], want)) < 1e-4
    with pytest.raises(ValueError, match=re.escape("batch_size must be a positive int, got batch_size=0")):
        list(classify_files(paths, model, label_set, batch_size=0))


def test_classify_reads_the_checkpoints_own_tokenizer_once_when_first_needed(
    zero_shot_dir, image_text_dir, tmp_path, monkeypatch
):
    import transformers
    from conftest import hub_cache
    from PIL import Image

    from siglip2_encoder.data.tokenizer import TextTokenizer

    images = [Image.new("RGB", (40, 30), (200, 30 * i, 10)) for i in range(2)]
    labels = ["cat", "dog", "red car"]
    want = SigLIP2Model.from_pretrained(zero_shot_dir).classify(
        images, labels, tokenizer=TextTokenizer.from_pretrained(zero_shot_dir)
    )
    real, calls = transformers.AutoTokenizer.from_pretrained, []
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append((a, k)) or real(*a, **k)
    )
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    assert calls == []  # not read with the model
    assert model.classify(images, labels) == want
    assert model.classify(images, model.encode_labels(labels)) == want and len(calls) == 1

    # A Hub id, read from the local cache only: the tokenizer comes with the same options as the weights.
    files = {p.name: p.read_bytes() for p in zero_shot_dir.iterdir() if p.is_file()}
    hub_cache(tmp_path / "cache", "google/siglip-test", files)
    cached = SigLIP2Model.from_pretrained("google/siglip-test", cache_dir=tmp_path / "cache", local_files_only=True)
    assert cached.classify(images, labels) == want
    assert calls[-1][1]["local_files_only"] is True and calls[-1][1]["cache_dir"] == tmp_path / "cache"

    message = f"label names need a tokenizer and this model {image_text_dir} has no tokenizer: pass tokenizer="
    with pytest.raises(ValueError, match=re.escape(message)):
        SigLIP2Model.from_pretrained(image_text_dir).classify(images, labels)
    fresh = SigLIP2Model(model.vision_model.config, model.text_model.config)
    with pytest.raises(ValueError, match="this model was not loaded from a checkpoint: pass tokenizer="):
        fresh.classify(images, labels)


def test_prompt_ensembles_average_normalised_embeddings(zero_shot_dir):
    from siglip2_encoder.data.tokenizer import TextTokenizer

    model, tokenizer = SigLIP2Model.from_pretrained(zero_shot_dir), TextTokenizer.from_pretrained(zero_shot_dir)
    templates = ["This is a photo of {}.", "a sketch of {}"]
    both = model.encode_labels(["cat", "dog"], tokenizer, templates, canonicalize=False)
    each = [model.encode_labels(["cat", "dog"], tokenizer, [t], canonicalize=False).embeddings for t in templates]
    want = torch.nn.functional.normalize(each[0] + each[1], dim=-1)
    torch.testing.assert_close(both.embeddings, want, atol=1e-6, rtol=0)
    assert both.templates == tuple(templates) and torch.allclose(both.embeddings.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize(
    ("labels", "templates", "message"),
    [
        ([], ["{}"], "labels must be a non-empty list of strings, got []"),
        ("cat", ["{}"], "labels must be a non-empty list of strings, got 'cat'"),
        (["cat", ""], ["{}"], "every label must be a non-empty string, got ''"),
        (["cat", 3], ["{}"], "every label must be a non-empty string, got 3"),
        (["cat", "dog", "cat"], ["{}"], "labels must be distinct, got ['cat'] more than once"),
        (["cat"], ["a photo"], "a template must hold '{}' once, where the label goes; got 'a photo'"),
        (["cat"], [], "templates must be a non-empty list of strings, got []"),
    ],
    ids=["no labels", "one string", "empty label", "non-string label", "duplicates", "template without {}", "none"],
)
def test_bad_labels_are_refused_with_their_exact_message(zero_shot_dir, labels, templates, message):
    from siglip2_encoder.data.tokenizer import TextTokenizer

    model, tokenizer = SigLIP2Model.from_pretrained(zero_shot_dir), TextTokenizer.from_pretrained(zero_shot_dir)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.encode_labels(labels, tokenizer, templates)


def test_tokenizer_pads_to_64_lowercases_when_asked_and_warns_once_on_truncation(zero_shot_dir, caplog):
    from siglip2_encoder.data.tokenizer import TextTokenizer

    plain, lower = (
        TextTokenizer.from_pretrained(zero_shot_dir),
        TextTokenizer.from_pretrained(zero_shot_dir, lowercase=True),
    )
    assert plain.lowercase is False  # not a Gemma tokenizer: SigLIP 1 conventions
    tokens = plain(["A PHOTO OF A BIRD", "a photo of a bird"])
    assert tokens.input_ids.shape == (2, 64) and not torch.equal(tokens.input_ids[0], tokens.input_ids[1])
    lowered = lower(["A PHOTO OF A BIRD", "a photo of a bird"])
    assert torch.equal(lowered.input_ids[0], lowered.input_ids[1])
    plain(["cat " * 70, "dog " * 80])
    plain(["cat " * 90])
    assert caplog.text.count("is truncated to 64") == 1


def test_classify_command_prints_writes_jsonl_and_records_bad_files(zero_shot_dir, fixed_dir, tmp_path, capsys, caplog):
    import json

    from PIL import Image

    from siglip2_encoder.cli import EXIT_FATAL, EXIT_PARTIAL, EXIT_USAGE, main
    from siglip2_encoder.data.tokenizer import TextTokenizer

    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 100, 200)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    images = [str(tmp_path / n) for n in ("img0.png", "img1.png", "broken.png")]
    out = tmp_path / "labels.jsonl"
    args = ["classify", *images, "--labels", "cat", "dog", "red car", "--model", str(zero_shot_dir), "-k", "2"]
    assert main([*args, "--jsonl", str(out)]) == EXIT_PARTIAL
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"] and "broken.png" in rows[2]["error"]
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    want = model.classify(
        [Image.open(p).convert("RGB") for p in images[:2]],
        ["cat", "dog", "red car"],
        tokenizer=TextTokenizer.from_pretrained(zero_shot_dir),
        top_k=2,
    )
    assert [r["labels"] for r in rows[:2]] == want
    assert f"{images[0]}\n  {want[0][0]['score']:.4f}  {want[0][0]['label']}" in capsys.readouterr().out

    assert main(["classify", images[0], "--model", str(zero_shot_dir)]) == EXIT_USAGE
    assert "no labels: give them with --labels A B C or --labels-file FILE" in caplog.text
    assert main(["classify", images[0], "--labels", "cat", "--random-weights", "base-patch16-224"]) == EXIT_USAGE
    assert "classify needs the checkpoint's tokenizer" in caplog.text
    assert main(["classify", images[0], "--labels", "cat", "cat", "--model", str(zero_shot_dir)]) == EXIT_USAGE
    assert "--labels / --template: labels must be distinct, got ['cat'] more than once" in caplog.text
    assert main(["classify", images[0], "--labels", "cat", "--model", str(fixed_dir)]) == EXIT_FATAL
    assert "which has no text tower" in caplog.text


def test_a_model_with_a_lora_wrapped_text_tower_is_not_saved_as_a_plain_one(image_text_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = SigLIP2Model.from_pretrained(image_text_dir)
    model.text_model = get_peft_model(model.text_model, LoraConfig(r=2, target_modules=["q_proj"])).base_model.model
    with pytest.raises(
        ValueError,
        match=r"cannot save: 3 module\(s\) are not the model's own, e.g. text_model.encoder.layers.0.self_attn.q_proj "
        r"\(peft",
    ):
        model.save_pretrained(tmp_path)


def test_sigmoid_loss_equals_transformers_and_splits_into_device_blocks(image_text_dir):
    from siglip2_encoder.models.loss import sigmoid_loss, sigmoid_loss_block

    theirs, ours = reference(image_text_dir), SigLIP2Model.from_pretrained(image_text_dir)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = theirs(input_ids=IDS, **reference_inputs(image_text_dir, x), return_loss=True).loss
        got = ours(IDS, x, return_loss=True)
    torch.testing.assert_close(got.loss, want, atol=1e-4, rtol=1e-5)
    # Two "devices" of 4 pairs each: own blocks plus the other's texts as negatives sum to the whole batch's loss.
    generator = torch.Generator().manual_seed(6)
    image, text = (torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1) for _ in range(2))
    scale, bias = torch.tensor([2.3]), torch.tensor([-10.0])
    halves = [(image[:4], text[:4]), (image[4:], text[4:])]
    blocks = sum(
        sigmoid_loss_block(i, t, scale, bias, matches_on_diagonal=(a == b))
        for a, (i, _) in enumerate(halves)
        for b, (_, t) in enumerate(halves)
    )
    torch.testing.assert_close(blocks / 8, sigmoid_loss(image, text, scale, bias), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match=re.escape("must be square, got (4, 3)")):
        sigmoid_loss_block(image[:4], text[:3], scale, bias, matches_on_diagonal=True)


def test_lora_on_the_joint_model_goes_into_the_chosen_towers_and_moves_to_transformers(image_text_dir, tmp_path):
    from peft import PeftModel

    from siglip2_encoder.models.lora import EncoderLoRAConfig, add_lora

    config = EncoderLoRAConfig(r=2, modules=("q_proj", "fc2"), encoder_layers=1)
    ours = add_lora(SigLIP2Model.from_pretrained(image_text_dir), config, towers=["text"])
    adapted = sorted({n.split(".lora_")[0] for n, p in ours.named_parameters() if p.requires_grad})
    assert adapted == [f"base_model.model.text_model.encoder.layers.2.{m}" for m in ("mlp.fc2", "self_attn.q_proj")]
    both = add_lora(SigLIP2Model.from_pretrained(image_text_dir), config)
    assert {n.split(".")[2] for n, p in both.named_parameters() if p.requires_grad} == {"vision_model", "text_model"}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(reference(image_text_dir), tmp_path / "adapter").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=IDS, attention_mask=MASK, **reference_inputs(image_text_dir, x)).logits_per_image
        got = ours.eval()(IDS, x, MASK).logits_per_image
        plain = SigLIP2Model.from_pretrained(image_text_dir)(IDS, x, MASK).logits_per_image
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-3), "the adapter must change the logits"
    message = "towers must be distinct names out of ['vision', 'text'], got ['image']"
    with pytest.raises(ValueError, match=re.escape(message)):
        add_lora(SigLIP2Model.from_pretrained(image_text_dir), config, towers=["image"])
    message = "towers=['text'] applies to a SigLIP2Model; a SigLIP2Encoder is one tower"
    with pytest.raises(ValueError, match=re.escape(message)):
        add_lora(SigLIP2Encoder.from_pretrained(image_text_dir), config, towers=["text"])


def test_sigmoid_loss_steps_with_lora_on_both_towers_follow_peft_on_transformers(image_text_dir, tmp_path):
    """25 AdamW steps on the sigmoid loss, LoRA on both towers: the same losses, step by step, as peft's LoRA on
    transformers' model from the same weights and the same initial adapter; and the loss falls."""
    from peft import PeftModel

    from siglip2_encoder.models.lora import EncoderLoRAConfig, add_lora

    torch.manual_seed(0)
    ours = add_lora(
        SigLIP2Model.from_pretrained(image_text_dir), EncoderLoRAConfig(r=4, alpha=8.0, modules=("q_proj", "v_proj"))
    )
    assert all(p.requires_grad == ("lora_" in n) for n, p in ours.named_parameters())
    ours.save_pretrained(tmp_path / "adapter")  # the initial adapter, for transformers' model to start from
    theirs = PeftModel.from_pretrained(reference(image_text_dir), tmp_path / "adapter", is_trainable=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ids = IDS[:1].repeat(4, 1)
    ids[:, 0] = torch.arange(4)  # four different texts
    steps = {
        "ours": (ours, lambda: ours(input_ids=ids, pixel_values=x, return_loss=True).loss),
        "theirs": (theirs, lambda: theirs(input_ids=ids, return_loss=True, **reference_inputs(image_text_dir, x)).loss),
    }
    losses = {}
    for name, (model, step) in steps.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        losses[name] = []
        for _ in range(25):
            loss = step()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["theirs"]), atol=1e-4, rtol=0)
    assert losses["ours"][-1] < 0.9 * losses["ours"][0], losses["ours"]


def test_the_models_loss_keeps_nothing_of_size_batch_squared_for_backward(image_text_dir):
    # The returned logits are (B, B), but nothing of that size may stay in the graph: the tiled loss keeps O(B x D),
    # and the logits' own graph (a gradient for logit_scale) would otherwise keep their (B, B) product.
    model, batch = SigLIP2Model.from_pretrained(image_text_dir).train(), 37
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    ids = IDS[:1].repeat(batch, 1)
    ids[:, 0] = torch.arange(batch)
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(input_ids=ids, pixel_values=x, return_loss=True)
    assert shapes and not [s for s in shapes if s.count(batch) == 2], shapes  # none is (B, B)
    logits = output.logits_per_image
    scale_grad, bias_grad = torch.autograd.grad(logits.sum(), (model.logit_scale, model.logit_bias))
    cosines = torch.nn.functional.normalize(output.image_embeds, dim=-1) @ output.text_embeds.T
    torch.testing.assert_close(scale_grad, (cosines * model.logit_scale.exp()).sum().reshape(1), rtol=1e-5, atol=1e-4)
    assert bias_grad.item() == batch * batch
