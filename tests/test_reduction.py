"""Token reduction after the tower (VisionZip-style dominant + contextual tokens, ranked by the pooling head's
attention): the head's attention equals transformers' ``nn.MultiheadAttention`` weights, the reduction equals a
brute-force one written here from the paper's description, and a VLM's features equal that recipe applied to
transformers' tower."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import random_images
from test_llava import TOWER, make_vlm
from transformers import AutoImageProcessor, Siglip2VisionModel, SiglipVisionModel

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor
from siglip2_encoder.integrations.reduction import TokenPruning


def brute_force(features: torch.Tensor, weights: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip as its paper describes it, token by token: the most-attended tokens kept; the rest, evenly spaced
    targets, every other token added to the target it is most similar to, each target the mean of its group."""
    n = len(features)
    if n <= dominant + contextual:
        return features
    order = sorted(range(n), key=lambda i: -float(weights[i]))
    kept = sorted(order[:dominant])
    rest = [i for i in range(n) if i not in kept]
    step = len(rest) // contextual
    targets = [rest[j * step] for j in range(contextual)]
    groups = {t: [t] for t in targets}
    for i in rest:
        if i in groups:
            continue
        similarity = [float(F.cosine_similarity(features[i], features[t], dim=0)) for t in targets]
        groups[targets[max(range(contextual), key=lambda j: similarity[j])]].append(i)
    merged = [features[groups[t]].mean(0) for t in targets]
    return torch.cat([features[kept], torch.stack(merged)])


@pytest.mark.parametrize("checkpoint", ["fixed_dir", "naflex_dir"])
def test_the_heads_attention_is_transformers_multihead_attention_weights(checkpoint, request):
    folder = request.getfixturevalue(checkpoint)
    naflex = checkpoint == "naflex_dir"
    theirs = (Siglip2VisionModel if naflex else SiglipVisionModel).from_pretrained(folder).eval()
    ours = SigLIP2Encoder.from_pretrained(folder)
    if naflex:
        inputs = AutoImageProcessor.from_pretrained(folder)(
            random_images(0, [(30, 100), (64, 64)]), return_tensors="pt"
        )
        mask = inputs["pixel_attention_mask"].bool()
    else:
        inputs, mask = {"pixel_values": torch.randn(3, 3, 36, 36, generator=torch.Generator().manual_seed(0))}, None
    with torch.no_grad():
        tokens = theirs(**inputs).last_hidden_state
        head = theirs.head
        probe = head.probe.expand(len(tokens), -1, -1)
        _, want = head.attention(probe, tokens, tokens, key_padding_mask=None if mask is None else ~mask,
                                 need_weights=True)  # fmt: skip
        got = ours.head.probe_weights(tokens, mask)
    torch.testing.assert_close(got, want[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("n", "dominant", "contextual"), [(64, 10, 6), (64, 60, 4), (50, 3, 11), (9, 5, 5)])
def test_the_reduction_is_the_brute_force_one(n, dominant, contextual):
    generator = torch.Generator().manual_seed(n + dominant)
    features = torch.randn(n, 12, generator=generator)
    weights = torch.rand(n, generator=generator).softmax(0)
    got = TokenPruning(dominant, contextual).reduce(features, weights)
    assert len(got) == TokenPruning(dominant, contextual).num_tokens(n) == min(n, dominant + contextual)
    torch.testing.assert_close(got, brute_force(features, weights, dominant, contextual), atol=1e-6, rtol=0)


def test_a_vlm_with_reduction_gets_the_recipe_applied_to_transformers_tower(tmp_path):
    """The model's image features: transformers' hidden state -2, reduced by the brute force with transformers'
    head weights on its final tokens, through our projector; the processor's counts equal the features' rows."""
    built, processor, tokenizer = make_vlm()
    reduction = TokenPruning(5, 3)
    model = VisionLanguageModel(built.tower, built.projector, built.language_model, built.image_token_id,
                                reduction=reduction).eval()  # fmt: skip
    reduced = VLMProcessor(tokenizer, processor.image_processor, model.projector, 8, reduction=reduction)
    pics = random_images(3, [(40, 70), (60, 30)])
    batch = reduced(["<image> describe image", "what is <image> it"], [[pics[0]], [pics[1]]])
    assert (batch["input_ids"] == model.image_token_id).sum() == 2 * 8  # 16 tokens per 4 x 4 image -> 8
    model.tower.save_pretrained(tmp_path)
    theirs = SiglipVisionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = model.image_features(batch["pixel_values"])
        out = theirs(batch["pixel_values"], output_hidden_states=True)
        probe = theirs.head.probe.expand(2, -1, -1)
        _, weights = theirs.head.attention(probe, out.last_hidden_state, out.last_hidden_state, need_weights=True)
        hidden = out.hidden_states[-2]
        want = torch.cat([model.projector.proj(brute_force(hidden[b], weights[b, 0], 5, 3)) for b in range(2)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        logits = model(**batch).logits  # the counts fit: the placeholders take the reduced features
    assert logits.shape[:2] == batch["input_ids"].shape

    model.save_pretrained(tmp_path / "saved")
    assert VisionLanguageModel.from_pretrained(tmp_path / "saved").reduction == reduction


def test_what_reduction_cannot_serve_is_refused(tmp_path):
    from siglip2_encoder.integrations.idefics3_export import export_idefics3
    from siglip2_encoder.integrations.llava_export import export_llava

    built, _, _ = make_vlm()
    model = VisionLanguageModel(built.tower, built.projector, built.language_model, built.image_token_id,
                                reduction=TokenPruning(4, 4))  # fmt: skip
    for export, fmt in ((export_llava, "LLaVA's"), (export_idefics3, "Idefics3's")):
        message = f"cannot export to {fmt} format: this model reduces its image tokens after the tower"
        with pytest.raises(ValueError, match=re.escape(message)):
            export(model, tmp_path)
    shuffled, _, _ = make_vlm(projector="pixel_shuffle")
    with pytest.raises(ValueError, match=re.escape("it needs a tokenwise projector (mlp, linear; got pixel_shuffle)")):
        VisionLanguageModel(
            shuffled.tower, shuffled.projector, shuffled.language_model, 5, reduction=TokenPruning(4, 4)
        )
    headless = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", **TOWER, use_head=False)
    with pytest.raises(
        ValueError, match=re.escape("ranks tokens by the tower's pooling head, and this tower has none")
    ):
        VisionLanguageModel(headless, built.projector, built.language_model, 5, reduction=TokenPruning(4, 4))
    with pytest.raises(ValueError, match=re.escape("contextual must be a positive int, got contextual=0")):
        TokenPruning(4, 0)
