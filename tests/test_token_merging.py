"""ToMe inside the tower: the bipartite matching equals a brute force written here from the paper (every A x B pair
scored), proportional attention makes a merged token count as the tokens it stands for, the counts are exact, and
merging nothing, a merged layer is the tower's own."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.models.token_merging import TokenMerging, bipartite_merge, merged_forward, merged_layer


def brute_force(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int):
    """One image: every A token (even position) scored against every B token (odd) by cosine; the r A tokens with
    the highest best score merged into their best B token, size-weighted; kept A tokens, then B tokens, in order."""
    a, b = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    best = {}
    for i in a:
        scores = [float(F.cosine_similarity(metric[i], metric[j], dim=0)) for j in b]
        best[i] = (max(scores), b[scores.index(max(scores))])
    merged = sorted(a, key=lambda i: -best[i][0])[: min(r, len(x) // 2)]
    groups = {j: [j] for j in b}
    for i in merged:
        groups[best[i][1]].append(i)
    order = [[i] for i in a if i not in merged] + [groups[j] for j in b]
    sizes = torch.stack([size[g].sum() for g in order])
    tokens = torch.stack([(x[g] * size[g][:, None]).sum(0) for g in order]) / sizes[:, None]
    return tokens, sizes


@pytest.mark.parametrize(("n", "r"), [(16, 3), (17, 8), (9, 20), (64, 13)])
def test_the_matching_is_the_brute_force_one(n, r):
    g = torch.Generator().manual_seed(n * r)
    x, metric = torch.randn(2, n, 6, generator=g), torch.randn(2, n, 4, generator=g)
    size = torch.randint(1, 4, (2, n), generator=g).float()
    tokens, sizes = bipartite_merge(x, metric, size, r)
    assert tokens.shape == (2, n - min(r, n // 2), 6)
    for image in range(2):
        want_tokens, want_sizes = brute_force(x[image], metric[image], size[image], r)
        torch.testing.assert_close(tokens[image], want_tokens, atol=1e-6, rtol=0)
        torch.testing.assert_close(sizes[image], want_sizes, atol=0, rtol=0)


def test_a_bfloat16_merge_is_the_float32_merge_rounded_once():
    g = torch.Generator().manual_seed(5)
    x, metric = torch.randn(2, 33, 8, generator=g).bfloat16(), torch.randn(2, 33, 4, generator=g)
    size = torch.randint(1, 4, (2, 33), generator=g).float()
    tokens, sizes = bipartite_merge(x, metric, size, 7)
    want_tokens, want_sizes = bipartite_merge(x.float(), metric, size, 7)
    assert tokens.dtype == torch.bfloat16 and torch.equal(tokens, want_tokens.bfloat16())
    assert torch.equal(sizes, want_sizes)


def test_a_merged_token_attends_as_the_tokens_it_stands_for():
    """Proportional attention: tokens x with the first three of size 2 give, for every token, what x with those
    three duplicated gives (same layer, no merging)."""
    tower = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", num_hidden_layers=1, hidden_size=32,
                                       intermediate_size=64, num_attention_heads=4)  # fmt: skip
    layer = tower.encoder.layers[0]
    x = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    size = torch.ones(1, 10)
    size[0, :3] = 2
    duplicated = torch.cat([x, x[:, :3]], dim=1)
    with torch.no_grad():
        small, _ = merged_layer(layer, x, size, r=0)
        large, _ = merged_layer(layer, duplicated, torch.ones(1, 13), r=0)
    torch.testing.assert_close(small, large[:, :10], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [None, -2, 0])
def test_counts_are_exact_and_a_little_merging_keeps_the_pooled_feature_close(fixed_dir, layer):
    tower = SigLIP2Encoder.from_pretrained(fixed_dir)
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tower(x, layers=[layer])
        got = merged_forward(tower, x, TokenMerging(1), layer, return_pooled=True)
        none = merged_forward(tower, x, TokenMerging(10**6), layer=0)  # embeddings: nothing merged yet
    torch.testing.assert_close(none.tokens, tower(x, layers=[0]).hidden_states[0], atol=1e-6, rtol=0)
    depth = 3 if layer is None else tower.layer_index(layer)
    assert got.tokens.shape[1] == TokenMerging(1).num_tokens(16, depth) == 16 - depth
    assert torch.equal(got.sizes.sum(1), torch.full((2,), 16.0))  # every patch is in exactly one token
    # r merges per layer change the tokens; the pooled feature stays close to the unmerged one (1 of 16 per layer)
    cosine = F.cosine_similarity(got.pooled, want.pooler_output, dim=-1)
    assert bool((cosine > 0.9).all()) and not torch.allclose(got.pooled, want.pooler_output, atol=1e-4)


def test_a_merged_layer_merging_nothing_is_the_towers_layer(fixed_dir):
    """Sizes 1 (a zero bias) and r = 0: the merged layer computes what the tower's layer computes."""
    tower = SigLIP2Encoder.from_pretrained(fixed_dir)
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer = tower.encoder.layers[0]
        embedded = tower(x, layers=[0]).hidden_states[0]
        got, _ = merged_layer(layer, embedded, torch.ones(2, 16), r=0)
        want = tower(x, layers=[1]).hidden_states[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_what_merging_cannot_take_is_refused(naflex_dir):
    with pytest.raises(ValueError, match=re.escape("r must be a positive int, got r=0")):
        TokenMerging(0)
    tower = SigLIP2Encoder.from_pretrained(naflex_dir)
    with pytest.raises(ValueError, match=re.escape("token merging takes fixed-resolution batches (B, C, H, W)")):
        merged_forward(tower, torch.zeros(1, 16, 192), TokenMerging(2))


def test_a_vlm_with_merging_feeds_the_merged_tokens_with_exact_counts(tmp_path):
    """The model's image features are merged_forward's tokens at the projector's layer through the projector; the
    processor inserts the exact counts; the setting is saved; a depth other than the projector's layer is refused."""
    from conftest import random_images
    from test_llava import make_vlm

    from siglip2_encoder.integrations.llava import VisionLanguageModel, VLMProcessor

    built, processor, tokenizer = make_vlm()  # 3 layers, projector on layer -2: hidden state 2
    merging = TokenMerging(3, depth=2)
    model = VisionLanguageModel(built.tower, built.projector, built.language_model, built.image_token_id,
                                reduction=merging).eval()  # fmt: skip
    merged = VLMProcessor(tokenizer, processor.image_processor, model.projector, 8, reduction=merging)
    pics = random_images(3, [(40, 70), (60, 30)])
    batch = merged(["<image> describe image", "what is <image> it"], [[pics[0]], [pics[1]]])
    assert (batch["input_ids"] == model.image_token_id).sum() == 2 * (16 - 3 - 3)
    with torch.no_grad():
        got = model.image_features(batch["pixel_values"])
        tokens = merged_forward(model.tower, batch["pixel_values"], merging, layer=-2).tokens
        torch.testing.assert_close(got, model.projector.proj(tokens).flatten(0, 1), atol=1e-6, rtol=0)
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    model.save_pretrained(tmp_path)
    assert VisionLanguageModel.from_pretrained(tmp_path).reduction == merging
    with pytest.raises(ValueError, match=re.escape("build the merging with TokenMerging(3, depth=2), got depth=3")):
        VisionLanguageModel(built.tower, built.projector, built.language_model, 5, reduction=TokenMerging(3, 3))


def test_the_in_place_path_equals_the_reference_path(fixed_dir):
    """Without autograd, merged_forward runs the tower's in-place GEMMs; with it, the plain modules: the same."""
    tower = SigLIP2Encoder.from_pretrained(fixed_dir)
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(4))
    merging = TokenMerging(2)
    with torch.no_grad():
        fast = merged_forward(tower, x, merging, layer=-2)
        fast_pooled = merged_forward(tower, x, merging, layer=1, return_pooled=True)
    reference = merged_forward(tower, x.requires_grad_(), merging, layer=-2)
    reference_pooled = merged_forward(tower, x, merging, layer=1, return_pooled=True)
    torch.testing.assert_close(fast.tokens, reference.tokens.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_pooled.tokens, reference_pooled.tokens.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_pooled.pooled, reference_pooled.pooled.detach(), atol=1e-5, rtol=0)
    assert torch.equal(fast.sizes, reference.sizes)
