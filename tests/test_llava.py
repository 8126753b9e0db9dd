"""The LLaVA-style VLM: batching, merging image tokens, training stages, save / load, and exchange with
transformers' LlavaForConditionalGeneration (Llama and Qwen2 language models)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from conftest import perturb
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    pipeline,
)

from siglip2_encoder import ImageProcessor, SigLIP2Encoder
from siglip2_encoder.adapters import LinearConfig, MLPConfig, PixelShuffleConfig, build_projector
from siglip2_encoder.integrations.idefics3_export import export_idefics3
from siglip2_encoder.integrations.llava import (
    IGNORE_INDEX,
    STAGE_1,
    STAGE_2,
    TrainingStage,
    VisionLanguageModel,
    VLMProcessor,
    add_image_token,
    apply_stage,
)
from siglip2_encoder.integrations.llava_export import export_llava, import_llava

WORDS = list(dict.fromkeys("what colour is the shape a red green blue circle square it describe image and".split()))
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
LM = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_vlm(lm_cls=LlamaForCausalLM, lm_config_cls=LlamaConfig, projector="mlp", naflex=False, seed=0, tokenizer=None):
    torch.manual_seed(seed)
    tokenizer = tokenizer or make_tokenizer()
    tower_fields = dict(TOWER, patch_size=8) | (
        dict(image_size=None, num_patches=16) if naflex else dict(image_size=32)
    )
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **tower_fields).eval()
    lm = lm_cls(lm_config_cls(vocab_size=len(tokenizer), **LM, tie_word_embeddings=False)).eval()
    image_token_id = add_image_token(tokenizer, lm)
    configs = {
        "mlp": MLPConfig(in_features=32, out_features=48, layers=(-2,)),
        "mlp2layers": MLPConfig(in_features=32, out_features=48, layers=(-2, 1)),
        "linear": LinearConfig(in_features=32, out_features=48, layers=(-1,)),
        "pixel_shuffle": PixelShuffleConfig(in_features=32, out_features=48),
        "idefics3": PixelShuffleConfig(in_features=32, out_features=48, layers=(None,), depth=1, bias=False),
    }
    model = VisionLanguageModel(tower, build_projector(configs[projector]), lm, image_token_id)
    processor = VLMProcessor(tokenizer, ImageProcessor(tower.processor_config), model.projector, patch_size=8)
    return model, processor, tokenizer


def images(n, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    sizes = sizes or [(40, 40)] * n
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes[:n]]


def test_placeholders_expand_to_each_images_token_count_and_labels_are_masked():
    model, processor, tokenizer = make_vlm(projector="pixel_shuffle", naflex=True)
    pics = images(3, sizes=[(40, 120), (120, 40), (40, 40)])
    batch = processor(
        ["<image> describe image", "what colour is <image> and <image>", "what colour is the shape"],
        [[pics[0]], [pics[1], pics[2]], []],
        ["a red circle", "red and blue", "blue"],
    )
    grids = [tuple(g) for g in batch["spatial_shapes"].tolist()]
    counts = [model.projector.num_tokens(g) for g in grids]
    placeholders = (batch["input_ids"] == model.image_token_id).sum(1).tolist()
    assert placeholders == [counts[0], counts[1] + counts[2], 0] and len(set(counts)) > 1
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for b, target in enumerate(["a red circle", "red and blue", "blue"]):
        learned = labels[b][labels[b] != IGNORE_INDEX].tolist()
        assert learned == tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert (labels[b][ids[b] == model.image_token_id] == IGNORE_INDEX).all()
        assert (labels[b][mask[b] == 0] == IGNORE_INDEX).all()
    assert (mask[:, 0] == 1).all() and (mask.sum(1) < mask.shape[1]).any()  # right padding
    # The second sample: text, its first image's tokens, text, its second image's tokens, in order.
    row = ids[1][mask[1] == 1].tolist()
    first = row.index(model.image_token_id)
    assert row[first : first + counts[1]] == [model.image_token_id] * counts[1]
    assert row[first + counts[1]] == tokenizer.convert_tokens_to_ids("and")

    left = processor(["<image> describe image", "what colour"], [[pics[0]], []], padding_side="left")
    assert (left["attention_mask"][:, -1] == 1).all() and left["attention_mask"][1, 0] == 0


def test_mismatched_placeholders_fail_before_any_compute():
    model, processor, _ = make_vlm()
    with pytest.raises(ValueError, match="sample 0 has 2 <image> placeholder"):
        processor(["<image> and <image>"], [images(1)])
    with pytest.raises(ValueError, match="one of each per sample"):
        processor(["a", "b"], [images(1)])
    batch = processor(["<image> describe image"], [images(1)])
    calls = []
    model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="hold 15 image placeholder tokens but the 1 image"):
        model(batch["input_ids"][:, 2:], pixel_values=batch["pixel_values"])  # drops <s> and one image token
    assert calls == [], "the tower must not run on a mismatched batch"
    with pytest.raises(ValueError, match="has no '<video>' token"):
        VLMProcessor(processor.tokenizer, processor.image_processor, model.projector, 8, image_token="<video>")


def test_image_tokens_land_on_the_placeholders():
    model, processor, _ = make_vlm()
    batch = processor(["what colour is <image> the shape"], [images(1)])
    with torch.no_grad():
        embeds = model.inputs_embeds(batch["input_ids"], batch["pixel_values"])
        features = model.image_features(batch["pixel_values"])
        text = model.language_model.get_input_embeddings()(batch["input_ids"])
    where = batch["input_ids"][0] == model.image_token_id
    assert torch.equal(embeds[0, where], features) and torch.equal(embeds[0, ~where], text[0, ~where])


def test_left_and_right_padding_give_the_same_logits():
    model, processor, _ = make_vlm()
    prompts, pics = ["<image> describe image", "what colour is the shape <image> a"], [images(1, 1), images(1, 2)]
    with torch.no_grad():
        right, left = (processor(prompts, pics, padding_side=side) for side in ("right", "left"))
        out_r, out_l = model(**right).logits, model(**left).logits
    for b in range(2):
        torch.testing.assert_close(
            out_r[b][right["attention_mask"][b] == 1], out_l[b][left["attention_mask"][b] == 1], atol=1e-5, rtol=0
        )


def test_generate_batched_left_padding_equals_one_by_one():
    model, processor, _ = make_vlm()
    prompts, pics = ["<image> describe image", "what colour is the shape <image>"], [images(1, 1), images(1, 2)]
    batch = processor(prompts, pics, padding_side="left")
    together = model.generate(**batch, max_new_tokens=5, do_sample=False)
    for b in range(2):
        alone = model.generate(**processor([prompts[b]], [pics[b]]), max_new_tokens=5, do_sample=False)
        assert together[b].tolist() == alone[0].tolist()
    sampled = model.generate(**batch, min_new_tokens=4, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (2, 4)


def trained_parts(model, batch, stage, steps=3):
    apply_stage(model, stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    changed = {n.split(".")[0] for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    lora = {n.split(".")[0] for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    return changed, lora, losses


def test_training_stages_train_only_what_they_name():
    model, processor, _ = make_vlm()
    batch = processor(["<image> describe image"] * 2, [images(1, 3), images(1, 4)], ["a red circle", "a blue square"])
    changed, _, losses = trained_parts(model, batch, STAGE_1, steps=8)
    assert changed == {"projector"} and losses[-1] < losses[0]
    changed, _, losses = trained_parts(model, batch, STAGE_2)
    assert changed == {"projector", "language_model"}
    model, processor, _ = make_vlm()
    stage = TrainingStage(
        projector=False,
        language_model="lora",
        vision_tower="lora",
        lm_lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    changed, lora, _ = trained_parts(model, batch, stage)
    assert lora == {"vision_tower", "language_model"}
    frozen = [n for n, p in model.named_parameters() if "lora_" not in n and p.requires_grad]
    assert frozen == [], frozen
    held = "the vision_tower and the language_model hold LoRA adapters; call merge_lora() first"
    with pytest.raises(ValueError, match=re.escape(f"cannot save: {held}")):
        model.save_pretrained("/nonexistent")
    with pytest.raises(ValueError, match=re.escape(f"cannot export to LLaVA's format: {held}")):
        export_llava(model, "/nonexistent")
    with pytest.raises(ValueError, match=re.escape(f"cannot export to Idefics3's format: {held}")):
        export_idefics3(model, "/nonexistent")
    with pytest.raises(ValueError, match="language_model must be"):
        TrainingStage(language_model="half")


def test_save_and_load_round_trip(tmp_path):
    model, processor, tokenizer = make_vlm(projector="pixel_shuffle", naflex=True)
    batch = processor(["<image> describe image"], [images(1, sizes=[(30, 90)])])
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("lm_cls", "lm_config_cls"), [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)]
)
@pytest.mark.parametrize("projector", ["mlp", "mlp2layers", "linear"])
def test_export_to_transformers_llava_gives_the_same_logits_and_generation(
    tmp_path, caplog, lm_cls, lm_config_cls, projector
):
    model, processor, tokenizer = make_vlm(lm_cls, lm_config_cls, projector)
    with caplog.at_level(logging.WARNING, logger="siglip2_encoder.integrations.llava_export"):
        export_llava(model, tmp_path, tokenizer)
    # vLLM's LLaVA builds its projector's activation from its own registry, which has no "linear"
    assert ("vLLM's LLaVA refuses" in caplog.text) == (projector == "linear")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = processor(["what colour is <image> the shape", "<image> describe image"], [images(1, 5), images(1, 6)])
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = llava(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        ).logits
    real = batch["attention_mask"].bool()  # padding positions differ: we count positions over real tokens only
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)
    single = processor(["what colour is <image> the shape"], [images(1, 5)])
    generated = model.generate(**single, max_new_tokens=6, do_sample=False)
    reference = llava.generate(**single, max_new_tokens=6, do_sample=False)[:, single["input_ids"].shape[1] :]
    assert generated.tolist() == reference.tolist()

    back = import_llava(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, ours, atol=1e-5, rtol=0)
    assert back.image_token_id == model.image_token_id and back.projector.config.layers == model.projector.config.layers


def run_as_the_card_says(folder, image, text: str) -> tuple[dict, list[list[int]]]:
    """transformers alone on an exported folder: AutoProcessor + chat template + generate; its inputs and the
    generated tokens. The image-text-to-text pipeline (what the Hub offers for the card's pipeline tag) must say the
    same text."""
    processor = AutoProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    pipe = pipeline("image-text-to-text", model=str(folder))
    (said,) = pipe(text=conversation, generate_kwargs={"max_new_tokens": 8, "do_sample": False}, return_full_text=False)
    assert said["generated_text"].strip() == processor.decode(generated[0], skip_special_tokens=True).strip() != ""
    return inputs, generated.tolist()


def test_a_llava_export_runs_in_transformers_end_to_end(tmp_path):
    model, processor, tokenizer = make_vlm()
    perturb(model, seed=3)
    export_llava(model, tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]  # what vLLM and llama.cpp dispatch on
    assert "architectures" not in config["vision_config"]
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:  # the Hub's names, which vLLM reads
        towers = {key.split(".")[1] for key in weights.keys() if key.startswith("vision_tower.")}
    assert towers == {"vision_model"}
    image = Image.fromarray(images(1, 5, sizes=[(30, 50)])[0])
    inputs, theirs = run_as_the_card_says(tmp_path, image, "what colour is the shape")
    batch = processor(["<image> what colour is the shape"], [[image]])
    assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()  # BOS, 16 image tokens, the text
    torch.testing.assert_close(inputs["pixel_values"], batch["pixel_values"], atol=1e-6, rtol=0)
    assert theirs == model.generate(**batch, max_new_tokens=8, do_sample=False).tolist()


def test_the_default_chat_template_writes_prompts_as_vlm_processor_takes_them(tmp_path):
    model, _, tokenizer = make_vlm()
    export_llava(model, tmp_path, tokenizer)
    processor = AutoProcessor.from_pretrained(tmp_path)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is it"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a circle"}]},
        {"role": "user", "content": "and the colour"},
    ]
    assert processor.apply_chat_template(conversation) == "<s><image> what shape is it a circle</s> and the colour"
    export_llava(model, tmp_path / "own", tokenizer, chat_template="{% for m in messages %}Q: {% endfor %}")
    assert AutoProcessor.from_pretrained(tmp_path / "own").apply_chat_template(conversation) == "Q: Q: Q: "


def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path):
    model, _, tokenizer = make_vlm()
    with pytest.raises(ValueError, match=re.escape("the model's image token id 18 is not a token of this tokenizer")):
        export_llava(model, tmp_path, make_tokenizer())
    tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=re.escape("the tokenizer has 21 tokens but the language model's embedding")):
        export_llava(model, tmp_path, tokenizer)
    assert not tmp_path.joinpath("config.json").exists()


def test_configurations_llava_cannot_express_are_refused(tmp_path):
    for kwargs, message in [
        (dict(naflex=True), "NaFlex towers cannot be exported"),
        (dict(projector="pixel_shuffle"), "'pixel_shuffle' projector cannot be exported"),
    ]:
        model, _, _ = make_vlm(**kwargs)
        with pytest.raises(ValueError, match=message):
            export_llava(model, tmp_path)
    model, _, _ = make_vlm()
    model.projector = build_projector(MLPConfig(in_features=32, out_features=48, layers=(None,)))
    with pytest.raises(ValueError, match="integer layers"):
        export_llava(model, tmp_path)
    model.projector = build_projector(MLPConfig(in_features=32, out_features=48, depth=3))
    with pytest.raises(ValueError, match="depth=3"):
        export_llava(model, tmp_path)


def test_add_image_token_resizes_embeddings_and_width_checks():
    tokenizer = make_tokenizer()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LM))
    token_id = add_image_token(tokenizer, lm)
    assert token_id == len(tokenizer) - 2 and tokenizer.pad_token == "<pad>"
    assert lm.get_input_embeddings().num_embeddings == len(tokenizer)
    assert add_image_token(tokenizer, lm) == token_id  # idempotent
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **TOWER, image_size=32, patch_size=8)
    with pytest.raises(ValueError, match="out_features=48"):
        VisionLanguageModel(tower, build_projector(MLPConfig(in_features=32, out_features=64)), lm, token_id)


def test_build_from_names_and_configs(tmp_path):
    torch.manual_seed(0)
    SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **TOWER, image_size=32, patch_size=8).save_pretrained(
        tmp_path / "tower"
    )
    tokenizer = make_tokenizer()
    model, processor = VisionLanguageModel.build(
        tmp_path / "tower", LlamaConfig(vocab_size=len(tokenizer), **LM), tokenizer
    )
    assert model.projector.config.out_features == 48 and model.projector.config.layers == (-2,)
    assert model.language_model.get_input_embeddings().num_embeddings == len(tokenizer)
    batch = processor(["<image> describe image"], [images(1)], ["a red circle"])
    assert torch.isfinite(model(**batch).loss)


def test_a_video_is_its_frames_reduced_by_the_projector_in_order():
    model, processor, _ = make_vlm(projector="pixel_shuffle")  # 4x4 grids shuffled by 2: 4 tokens a frame
    frames = images(3, seed=9)
    still = images(1, seed=10)
    video = processor(["what happens in <video> then <image> it"], [still], ["a red circle"], videos=[[frames]])
    as_images = processor(["what happens in <image><image><image> then <image> it"], [frames + still], ["a red circle"])
    assert (video["input_ids"] == model.image_token_id).sum() == 4 * 4
    assert torch.equal(video["input_ids"], as_images["input_ids"])
    assert torch.equal(video["pixel_values"], as_images["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(**video).logits, model(**as_images).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"sample 0 has 1 <video> placeholder\(s\) but 0 video\(s\)"):
        processor(["describe <video>"], [[]])
    with pytest.raises(ValueError, match="sample 0 has a video without frames"):
        processor(["describe <video>"], [[]], videos=[[[]]])
