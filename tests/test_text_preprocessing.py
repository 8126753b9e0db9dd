"""Text preprocessing as the SigLIP papers' evaluators do it: big_vision's canonicalisation (checked against
open_clip's copy of big_vision's function, code we did not write), applied by default to zero-shot class names and
templates; free text lowercased for SigLIP 2 only, its family read from the checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch
from open_clip.tokenizer import canonicalize_text as open_clip_canonicalize

from siglip2_encoder import SigLIP2Model, TextTokenizer
from siglip2_encoder.checkpoints.hub import CheckpointSource
from siglip2_encoder.data.tokenizer import canonicalize_text, is_siglip2_checkpoint

CORPUS = [
    "",
    "   ",
    "A Photo of a CAT.",
    "golden_retriever",
    "it’s a dog — isn't it?",  # unicode apostrophe and dash are kept, ASCII ' and ? are not
    "tench, Tinca tinca",
    "This is a photo of {}.",
    "a {} in {braces} {",
    "tab\there\u00a0nbsp\u2003em-space\nnewline",
    'C++ & C# (languages) @home #1 50% $5 ~x^2 <b> [i] |pipe| \\back/ `tick` "q" ;:',
    "Ünïcödé ÇAFÉ, ǅ title-case",
    "__init__.py",
]


@pytest.mark.parametrize("keep", [None, "{}", ","])
def test_canonicalize_text_equals_big_visions_rule(keep):
    for text in CORPUS:
        assert canonicalize_text(text, keep) == open_clip_canonicalize(text, keep_punctuation_exact_string=keep), text


def test_canonical_zero_shot_equals_the_canonical_texts_given_as_they_are(zero_shot_dir):
    """Class names lose punctuation and case and keep their first alias; templates keep {}; what is encoded equals
    those texts encoded without canonicalisation. The labels shown are the ones given."""
    model, tokenizer = SigLIP2Model.from_pretrained(zero_shot_dir), TextTokenizer.from_pretrained(zero_shot_dir)
    given = model.encode_labels(["Red_Car!", "cat, felis catus", "A dog"], tokenizer, ["This is a photo of {}.", "{}"])
    plain = model.encode_labels(
        ["red car", "cat", "a dog"], tokenizer, ["this is a photo of {}", "{}"], canonicalize=False
    )
    torch.testing.assert_close(given.embeddings, plain.embeddings, atol=0, rtol=0)
    assert given.labels == ("Red_Car!", "cat, felis catus", "A dog") and given.texts == ("red car", "cat", "a dog")
    assert given.templates == ("this is a photo of {}", "{}") and given.canonicalize and not plain.canonicalize
    different = model.encode_labels(["Red_Car!", "cat, felis catus", "A dog"], tokenizer, canonicalize=False)
    assert not torch.allclose(different.embeddings, given.embeddings[:, :], atol=1e-3)  # it changes the numbers


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["cat", "!!!"], "label '!!!' is empty once canonicalised; pass canonicalize=False to keep it as given"),
        (["Cat", "cat."], "labels 'Cat' and 'cat.' are the same text once canonicalised ('cat'); rename one, or pass "),
    ],
    ids=["empty", "duplicates"],
)
def test_labels_that_canonicalisation_merges_or_empties_are_refused(zero_shot_dir, labels, message):
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.encode_labels(labels)


def test_the_family_comes_from_the_checkpoint_and_free_text_keeps_punctuation(zero_shot_dir, tmp_path):
    """SigLIP 2 is a 'siglip2' model type or a Gemma-vocabulary tokenizer named in tokenizer_config.json, whatever
    class transformers builds; its free text is lowercased with punctuation kept."""
    assert not is_siglip2_checkpoint(CheckpointSource(zero_shot_dir))
    assert TextTokenizer.from_pretrained(zero_shot_dir).preprocessing == "raw"
    folder = tmp_path / "gemma_named"
    folder.mkdir()
    for path in zero_shot_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "GemmaTokenizer"}))
    assert is_siglip2_checkpoint(CheckpointSource(folder))
    naflex = tmp_path / "naflex"
    naflex.mkdir()
    (naflex / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    assert is_siglip2_checkpoint(CheckpointSource(naflex))

    raw = TextTokenizer.from_pretrained(zero_shot_dir)
    lower = TextTokenizer.from_pretrained(zero_shot_dir, lowercase=True)
    canonical = TextTokenizer.from_pretrained(zero_shot_dir, canonicalize=True)
    assert (lower.preprocessing, canonical.preprocessing) == ("lower", "canonical")
    text = "A PHOTO OF A BIRD"
    assert torch.equal(lower([text]).input_ids, raw([text.lower()]).input_ids)
    assert torch.equal(canonical(["A photo, of a cat."]).input_ids, raw(["a photo of a cat"]).input_ids)
    assert not torch.equal(lower(["a photo of a cat."]).input_ids, raw(["a photo of a cat"]).input_ids)  # "." kept
    with pytest.raises(ValueError, match=re.escape("preprocessing must be one of ['raw', 'lower', 'canonical']")):
        TextTokenizer.from_preprocessing(raw.tokenizer, "lowercase")


def test_one_option_on_every_command_recorded_in_the_results(zero_shot_dir, tmp_path, caplog):
    from PIL import Image

    from siglip2_encoder import ExtractedFeatures
    from siglip2_encoder.cli import EXIT_OK, EXIT_USAGE, main

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "red.png")
    image = str(tmp_path / "red.png")
    model, tokenizer = SigLIP2Model.from_pretrained(zero_shot_dir), TextTokenizer.from_pretrained(zero_shot_dir)
    pixels = Image.open(image).convert("RGB")
    for option, canonical in ((None, True), ("raw", False)):
        extra = [] if option is None else ["--text-preprocessing", option]
        out = tmp_path / f"labels-{option}.jsonl"
        command = ["classify", image, "--labels", "Red_Car!", "cat", "--model", str(zero_shot_dir), "--jsonl", str(out)]
        assert main([*command, *extra]) == EXIT_OK
        row = json.loads(out.read_text())
        assert row["text_preprocessing"] == ("canonical" if canonical else "raw")
        want = model.classify(pixels, ["Red_Car!", "cat"], tokenizer=tokenizer, canonicalize=canonical)[0]
        assert [r["label"] for r in row["labels"]] == [r["label"] for r in want]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(row["labels"], want)) < 1e-5

    command = ["embed-text", "A Cat.", "--model", str(zero_shot_dir), "-o", str(tmp_path / "texts")]
    assert main([*command, "--text-preprocessing", "canonical"]) == EXIT_OK
    store = ExtractedFeatures.open(tmp_path / "texts")
    assert store.settings["text_preprocessing"] == "canonical"
    tokens = TextTokenizer.from_pretrained(zero_shot_dir)(["a cat"])
    with torch.no_grad():
        want = model.get_text_features(tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(store.pooled()[1], want, atol=1e-5, rtol=0)

    assert main([*command[:-1], str(tmp_path / "other"), "--no-lowercase"]) == EXIT_USAGE
    assert "--no-lowercase is --text-preprocessing raw since 0.2.0" in caplog.text
    assert main(["search", "a cat", "--features", str(tmp_path / "texts"), "--text-preprocessing", "lower"]) == 0


def test_label_encoding_shows_progress_over_many_templates(zero_shot_dir, capsys):
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    model.encode_labels(["a cat", "a dog"], templates=["a photo of {}", "{}"], progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "template" in err
    model.encode_labels(["a cat", "a dog"], templates=["{}"], progress=True)  # one template: no bar
    assert capsys.readouterr().err == ""
