"""`eval zeroshot`: metrics equal scikit-learn's; the whole task equals CLIP_benchmark's zero-shot classifier and
classification loop run on transformers' SiglipModel (its own processor and tokenizer) for the same images, class
names and templates; features are cached so that a second evaluation encodes no image."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from siglip2_encoder import SigLIP2Model
from siglip2_encoder.cli import EXIT_OK, EXIT_USAGE, main
from siglip2_encoder.eval.datasets import load_labelled
from siglip2_encoder.eval.prompts import TEMPLATE_SETS, load_templates
from siglip2_encoder.eval.zeroshot import evaluate_zeroshot, zeroshot_metrics

CLASSES = ["a cat", "a dog", "a red car", "an apple tree", "a bird", "a photo"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ROOT/<class>/<image>: 5 images for each of 6 classes (folder names with underscores)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name.replace(" ", "_")).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            pixels[..., c % 3] = 40 * c  # some class signal in the pixels
            Image.fromarray(pixels).save(root / name.replace(" ", "_") / f"{i}.png")
    return root


@pytest.mark.parametrize("classes", [3, 12])
def test_metrics_equal_sklearns(classes):
    """top-k accuracy and balanced accuracy by scikit-learn (CLIP_benchmark 1.6.2's own ``accuracy`` cannot run
    under NumPy 2: it calls float() on a 1-element array)."""
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    g = torch.Generator().manual_seed(classes)
    targets = torch.randint(0, classes, (300,), generator=g)
    logits = torch.randn(300, classes, generator=g)
    logits[torch.arange(300), targets] += 1.2  # better than chance, not perfect
    ours = zeroshot_metrics(logits, targets, tuple(f"c{i}" for i in range(classes)))
    everyone = list(range(classes))
    assert ours["top1"] == pytest.approx(top_k_accuracy_score(targets, logits, k=1, labels=everyone), abs=1e-12)
    if classes >= 5:
        assert ours["top5"] == pytest.approx(top_k_accuracy_score(targets, logits, k=5, labels=everyone), abs=1e-12)
    else:
        assert ours["top5"] is None
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, logits.argmax(1)), abs=1e-12)
    assert 0.3 < ours["top1"] < 0.9
    planted = zeroshot_metrics(torch.eye(classes)[targets], targets, tuple(map(str, range(classes))))  # known answers
    assert planted["top1"] == planted["mean_per_class_recall"] == 1.0
    names = tuple(map(str, range(classes)))
    shuffled = zeroshot_metrics(torch.eye(classes)[targets[torch.randperm(300, generator=g)]], targets, names)
    assert abs(shuffled["top1"] - 1 / classes) < 0.1  # chance


def test_template_sets_are_clips():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    assert TEMPLATE_SETS["clip_paper"] == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    assert TEMPLATE_SETS["clip_best"] == tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
    assert len(TEMPLATE_SETS["clip_paper"]) == 80


def test_zeroshot_equals_clip_benchmarks_evaluation_of_transformers(zero_shot_dir, image_folder, tmp_path):
    """CLIP_benchmark's zero_shot_classifier + run_classification on transformers' SiglipModel (its own processor and
    tokenizer), against ours with the texts as given (no canonicalisation): the same numbers."""
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
    from transformers import AutoModel, AutoTokenizer, SiglipImageProcessor

    from siglip2_encoder import TextTokenizer

    data = load_labelled(image_folder, None).with_classes(CLASSES)
    templates = ("a photo of {}.", "{}")
    theirs_model = AutoModel.from_pretrained(zero_shot_dir).eval()
    processor = SiglipImageProcessor.from_pretrained(zero_shot_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(zero_shot_dir)

    class Clip(torch.nn.Module):  # the interface CLIP_benchmark calls
        def encode_image(self, pixels):
            return theirs_model.get_image_features(pixel_values=pixels).pooler_output

        def encode_text(self, tokens):
            return theirs_model.get_text_features(**tokens).pooler_output

    class Images(torch.utils.data.Dataset):
        classes = CLASSES

        def __len__(self):
            return len(data.paths)

        def __getitem__(self, i):
            pixels = processor(Image.open(data.paths[i]).convert("RGB"), return_tensors="pt")["pixel_values"][0]
            return pixels, data.labels[i]

    def tokenize(texts):  # SigLIP's texts as trained: padded to 64, no padding mask
        return hf_tokenizer(
            texts, padding="max_length", max_length=64, return_attention_mask=False, return_tensors="pt"
        )

    loader = torch.utils.data.DataLoader(Images(), batch_size=8)
    cb_templates = [t.replace("{}", "{c}") for t in templates]
    classifier = zero_shot_classifier(Clip(), tokenize, CLASSES, cb_templates, "cpu", amp=False)
    logits, targets = run_classification(Clip(), classifier, loader, "cpu", amp=False)
    everyone = list(range(len(CLASSES)))
    want = {
        "acc1": top_k_accuracy_score(targets, logits, k=1, labels=everyone),
        "acc5": top_k_accuracy_score(targets, logits, k=5, labels=everyone),
        "mean_per_class_recall": balanced_accuracy_score(targets, logits.argmax(1)),
    }

    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    raw = TextTokenizer.from_pretrained(zero_shot_dir, lowercase=False)
    got = evaluate_zeroshot(model, data, templates, tmp_path / "features", tokenizer=raw, canonicalize=False)
    metrics = got["metrics"]
    assert metrics["top1"] == pytest.approx(want["acc1"], abs=1e-12)
    assert metrics["top5"] == pytest.approx(want["acc5"], abs=1e-12)
    assert metrics["mean_per_class_recall"] == pytest.approx(want["mean_per_class_recall"], abs=1e-12)
    assert 0 < metrics["top5"] < 1 and got["dataset"]["evaluated"] == 30


def test_eval_command_writes_a_result_and_reuses_the_features(zero_shot_dir, image_folder, tmp_path, capsys, caplog):
    out = tmp_path / "result.json"
    command = ["eval", "zeroshot", str(image_folder), "--model", str(zero_shot_dir), "-o", str(out), "--workers", "0"]
    assert main([*command, "--templates", "clip_best"]) == EXIT_OK
    first = json.loads(out.read_text())
    assert first["task"] == "zeroshot" and first["dataset"]["images"] == 30 and first["dataset"]["classes"] == 6
    assert first["settings"]["canonicalize"] and first["settings"]["images_encoded_now"] == 30
    assert first["settings"]["templates"][0] == "itap of a {}"  # canonical: no full stop
    assert set(first["per_class_recall"]) == {name.replace(" ", "_") for name in CLASSES}
    assert {"siglip2-encoder", "torch", "transformers", "python"} <= set(first["versions"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", "top-1", "top-5", "mean/class"]
    assert table[1].split()[1:] == [
        f"{100 * first['metrics'][k]:.2f}" for k in ("top1", "top5", "mean_per_class_recall")
    ]

    assert main([*command, "--templates", "pipeline", "--text-preprocessing", "raw"]) == EXIT_OK
    second = json.loads(out.read_text())
    assert second["settings"]["images_encoded_now"] == 0  # the features folder was reused
    assert second["dataset"]["fingerprint"] == first["dataset"]["fingerprint"]
    assert second["settings"]["templates"] == ["This is a photo of {}."] and not second["settings"]["canonicalize"]

    assert main(["eval", "zeroshot", str(tmp_path / "nowhere"), "--model", str(zero_shot_dir), "-o", str(out)]) == 2
    assert "give a folder per class (ROOT/<class>/<image>), a .csv / .jsonl of path,label or WebDataset shards" in (
        caplog.text
    )
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n")
    assert main([*command, "--class-names", str(names)]) == EXIT_USAGE
    assert "2 class names for 6 classes; give one per class, in order" in caplog.text
    assert main([*command, "--templates", "clip_worst"]) == EXIT_USAGE
    assert "templates 'clip_worst' is neither a named set (clip_paper, clip_best, class_name_only, pipeline)" in (
        caplog.text
    )


def test_a_table_of_paths_and_labels(tmp_path, image_folder):
    rows = [{"path": str(p.relative_to(image_folder)), "label": p.parent.name} for p in image_folder.rglob("*.png")]
    (image_folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = load_labelled(image_folder / "labels.jsonl")
    folder = load_labelled(image_folder)
    assert table.classes == folder.classes and sorted(zip(table.paths, table.labels)) == sorted(
        zip(folder.paths, folder.labels)
    )
    (image_folder / "labels.jsonl").unlink()
    (tmp_path / "bad.jsonl").write_text('{"path": "x.png"}\n')
    with pytest.raises(ValueError, match=re.escape("bad.jsonl row 1: each row needs 'path' and 'label'")):
        load_labelled(tmp_path / "bad.jsonl")
    assert load_templates("class_name_only") == ("{}",)


def clip_benchmark_shards(image_folder, root):
    """The image folder as CLIP_benchmark's own converter writes it (clip_benchmark_export_wds): ROOT/test/{0..3}.tar
    with cls labels, classnames.txt and the templates with {c}."""
    from clip_benchmark.webdataset_builder import convert_dataset, path_to_bytes

    folder = load_labelled(image_folder)

    class Files(torch.utils.data.Dataset):
        classes = CLASSES
        templates = ["a photo of {c}.", "{c}"]

        def __len__(self):
            return len(folder.paths)

        def __getitem__(self, i):
            return folder.paths[i], folder.labels[i]

    convert_dataset(Files(), "test", str(root), transform=path_to_bytes, max_count=8, verbose=False)
    return root


def test_clip_benchmark_shards_give_the_folders_numbers(zero_shot_dir, image_folder, tmp_path):
    shards = load_labelled(clip_benchmark_shards(image_folder, tmp_path / "wds") / "test")
    folder = load_labelled(image_folder).with_classes(CLASSES)
    assert shards.classes == tuple(CLASSES) and shards.named and len(shards.shards) == 4
    assert shards.labels == folder.labels and shards.paths[0] == f"{tmp_path}/wds/test/0.tar:s0000000"
    templates = load_templates(tmp_path / "wds" / "zeroshot_classification_templates.txt")
    assert templates == ("a photo of {}.", "{}")

    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    want = evaluate_zeroshot(model, folder, templates, tmp_path / "folder-features")
    got = evaluate_zeroshot(model, shards, templates, tmp_path / "shard-features")
    assert got["metrics"] == want["metrics"] and got["per_class_recall"] == want["per_class_recall"]
    assert got["dataset"]["evaluated"] == 30 and got["dataset"]["fingerprint"] != want["dataset"]["fingerprint"]
    again = evaluate_zeroshot(model, shards, ("{}",), tmp_path / "shard-features")
    assert again["settings"]["images_encoded_now"] == 0 and again["dataset"] == got["dataset"]


def test_the_eval_commands_on_shards(zero_shot_dir, tiny_checkpoint, image_folder, tmp_path, caplog):
    wds = clip_benchmark_shards(image_folder, tmp_path / "wds")
    out = tmp_path / "result.json"
    options = ["--model", str(zero_shot_dir), "-o", str(out), "--workers", "0"]
    assert main(["eval", "zeroshot", str(wds / "test"), *options]) == EXIT_OK
    assert json.loads(out.read_text())["dataset"]["evaluated"] == 30
    assert main(["eval", "zeroshot", str(wds), *options]) == EXIT_USAGE
    assert f"{wds} holds the splits test: give one, e.g. {wds}/test" in caplog.text
    (wds / "classnames.txt").unlink()
    assert main(["eval", "zeroshot", f"{wds}/test/{{0..3}}.tar", *options]) == EXIT_USAGE
    assert "the shards have no classnames.txt beside their split folder; give --class-names FILE" in caplog.text

    command = ["eval", "probe", "--train", f"{wds}/test/{{0..3}}.tar", "--test", str(image_folder), "-o", str(out)]
    assert main([*command, "--model", str(tiny_checkpoint), "--workers", "0"]) == EXIT_USAGE  # names differ
    assert "train and test name different classes: ('0', '1', '2', '3', '4')" in caplog.text
    command[-3] = f"{wds}/test"
    assert main([*command, "--model", str(tiny_checkpoint), "--workers", "0", "--class-names", str(wds)]) == 2
    names = tmp_path / "names.txt"
    names.write_text("\n".join(sorted(p.name for p in image_folder.iterdir())))
    assert main([*command, "--model", str(tiny_checkpoint), "--workers", "0", "--class-names", str(names)]) == 0
    result = json.loads(out.read_text())
    assert result["dataset"]["train_images"] == result["dataset"]["test_images"] == 30
    assert result["metrics"]["linear_top1"] > 0.5  # the same images


def test_bad_shards_are_refused_naming_the_sample(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        sink.write({"__key__": "a", "png": b"x", "cls": b"0"})
        sink.write({"__key__": "b", "png": b"x", "txt": b"a cat"})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/0.tar:b: no 'cls' member (it has png, txt)")):
        load_labelled(tmp_path / "0.tar")
    with wds.TarWriter(str(tmp_path / "1.tar")) as sink:
        sink.write({"__key__": "a", "png": b"x", "cls": b"cat"})
    with pytest.raises(ValueError, match=re.escape("1.tar:a: the cls member must hold a class index, got b'cat'")):
        load_labelled(tmp_path / "1.tar")
    (tmp_path / "2.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/2.tar: cannot read the tar shard")):
        load_labelled(tmp_path / "2.tar")
    with pytest.raises(ValueError, match=re.escape("none-0.tar: cannot read the tar shard: [Errno 2] No such file")):
        load_labelled(tmp_path / "none-{0..1}.tar")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "nshards.txt").write_text("0\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/empty names no tar shard")):
        load_labelled(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- retrieval

CAPTIONS = [
    ["a cat", "This is a photo of a cat."],
    ["a dog"],
    ["a red car", "a photo of a red car", "sketch of a car"],
    ["an apple tree"],
    ["A PHOTO OF A BIRD", "a bird"],
    ["sketch of a dog", "a photo of a dog"],
]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """6 images with 1-3 captions each, as a Karpathy-split JSON list (BLIP / LAVIS's layout)."""
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(1)
    rows = []
    for i, captions in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": captions})
    (root / "test.json").write_text(json.dumps(rows))
    return root


def test_recall_equals_clip_benchmarks_counting():
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    from siglip2_encoder.eval.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=-1)
    text_image = torch.tensor([i for i in range(40) for _ in range(1 + i % 5)])  # 1 to 5 captions per image
    texts = torch.nn.functional.normalize(
        images[text_image] + 0.4 * torch.randn(len(text_image), 16, generator=g), dim=-1
    )
    ours = retrieval_metrics(images, texts, text_image)
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_image] = True
    for k in (1, 5, 10):
        image_hits = (batchify(recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
        text_hits = (batchify(recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(image_hits, abs=1e-6)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(text_hits, abs=1e-6)
    assert 0.2 < ours["image_retrieval_recall@1"] < 0.9
    planted = retrieval_metrics(images, images[text_image], text_image)
    assert planted["image_retrieval_recall@1"] == planted["text_retrieval_recall@1"] == 1.0


def test_retrieval_equals_clip_benchmarks_evaluation_of_transformers(zero_shot_dir, captioned, tmp_path):
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate
    from transformers import AutoModel, AutoTokenizer, SiglipImageProcessor

    from siglip2_encoder.eval.retrieval import evaluate_retrieval, load_captioned

    data = load_captioned(captioned / "test.json")
    theirs = AutoModel.from_pretrained(zero_shot_dir).eval()
    processor = SiglipImageProcessor.from_pretrained(zero_shot_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(zero_shot_dir)

    class Clip(torch.nn.Module):
        def encode_image(self, pixels):
            return theirs.get_image_features(pixel_values=pixels).pooler_output

        def encode_text(self, tokens):
            return theirs.get_text_features(**tokens).pooler_output

    def batches():
        for start in range(0, len(data.paths), 4):
            paths = data.paths[start : start + 4]
            pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
            yield pixels, [list(c) for c in data.captions[start : start + 4]]

    def tokenize(texts):  # SigLIP's texts as trained: padded to 64, no padding mask
        return hf_tokenizer(
            texts, padding="max_length", max_length=64, return_attention_mask=False, return_tensors="pt"
        )

    want = evaluate(Clip(), list(batches()), tokenize, "cpu", amp=False, recall_k_list=[1, 5])  # k <= 6 images
    got = evaluate_retrieval(SigLIP2Model.from_pretrained(zero_shot_dir), data, tmp_path / "features")
    assert got["settings"]["text_preprocessing"] == "raw"  # a SigLIP 1 checkpoint: captions as given
    for key, value in want.items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert got["dataset"]["captions"] == got["dataset"]["evaluated_captions"] == 11


def test_caption_files_in_three_layouts_and_the_eval_command(zero_shot_dir, captioned, tmp_path, capsys):
    from siglip2_encoder.eval.retrieval import load_captioned

    karpathy = load_captioned(captioned / "test.json")
    coco = {
        "images": [{"id": 10 + i, "file_name": f"{i}.png"} for i in range(len(CAPTIONS))],
        "annotations": [{"image_id": 10 + i, "caption": c} for i, cs in enumerate(CAPTIONS) for c in cs],
    }
    (captioned / "coco.json").write_text(json.dumps(coco))
    (captioned / "pairs.jsonl").write_text(
        "".join(json.dumps({"image": f"{i}.png", "caption": c}) + "\n" for i, cs in enumerate(CAPTIONS) for c in cs)
    )
    assert load_captioned(captioned / "coco.json") == karpathy == load_captioned(captioned / "pairs.jsonl")
    assert karpathy.captions[2] == tuple(CAPTIONS[2])

    out = tmp_path / "coco.json"
    command = ["eval", "retrieval", str(captioned / "pairs.jsonl"), "--model", str(zero_shot_dir), "-o", str(out)]
    assert main([*command, "--workers", "0"]) == EXIT_OK
    result = json.loads(out.read_text())
    assert result["task"] == "retrieval" and result["settings"]["images_encoded_now"] == 6
    assert set(result["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert capsys.readouterr().out.splitlines()[0].split()[:3] == ["model", "T->I", "R@1"]
    assert main([*command, "--text-preprocessing", "lower"]) == EXIT_OK
    assert json.loads(out.read_text())["settings"] == result["settings"] | {
        "text_preprocessing": "lower", "images_encoded_now": 0
    }  # fmt: skip


def test_retrieval_shards_as_clip_benchmark_writes_them(zero_shot_dir, captioned, tmp_path, caplog):
    from clip_benchmark.webdataset_builder import convert_retrieval_dataset, path_to_bytes

    from siglip2_encoder.eval.retrieval import evaluate_retrieval, load_captioned

    files = load_captioned(captioned / "test.json")
    pairs = [(path, list(captions)) for path, captions in zip(files.paths, files.captions)]
    convert_retrieval_dataset(pairs, "test", str(tmp_path / "wds"), transform=path_to_bytes, max_count=4, verbose=False)
    shards = load_captioned(tmp_path / "wds" / "test")
    assert shards.captions == files.captions and len(shards.shards) == 2
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    want = evaluate_retrieval(model, files, tmp_path / "file-features")
    got = evaluate_retrieval(model, shards, tmp_path / "shard-features")
    assert got["metrics"] == want["metrics"] and got["dataset"]["evaluated_captions"] == 11

    out = tmp_path / "result.json"
    command = ["eval", "retrieval", str(tmp_path / "wds" / "test"), "--model", str(zero_shot_dir), "-o", str(out)]
    assert main([*command, "--images", str(captioned)]) == EXIT_USAGE
    assert "--images applies to JSON annotations; the shards" in caplog.text
    assert main([*command, "--workers", "0", "--features", str(tmp_path / "shard-features")]) == EXIT_OK
    assert json.loads(out.read_text())["settings"]["images_encoded_now"] == 0


# ---------------------------------------------------------------------------------------------- probes


def clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 24, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, 5, (n,), generator=g)
    return centres[labels] + 1.6 * torch.randn(n, 24, generator=g), labels


def test_the_linear_probe_is_sklearns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    from siglip2_encoder.eval.probe import fit_logistic, linear_probe

    x, y = clusters(400, 0)
    x_test, y_test = clusters(400, 1)
    for penalty in (1e-3, 1e-1):
        ours = fit_logistic(x, y, 5, penalty)
        theirs = LogisticRegression(C=1 / (penalty * len(x)), max_iter=10_000, tol=1e-10).fit(x.double().numpy(), y)
        with torch.no_grad():
            probabilities = ours(x_test.double()).softmax(1).numpy()
        np.testing.assert_allclose(probabilities, theirs.predict_proba(x_test.double().numpy()), atol=1e-3)
    result = linear_probe(x, y, x_test, y_test, 5)
    mean, std = x.double().mean(0), x.double().std(0)
    sklearn = LogisticRegression(C=1 / (result["penalty"] * len(x)), max_iter=10_000).fit((x - mean) / std, y)
    assert abs(result["top1"] - sklearn.score(((x_test - mean) / std).numpy(), y_test.numpy())) <= 0.01
    assert 0.4 < result["top1"] < 1 and len(result["validation_top1"]) == 7


def test_knn_is_dinos_weighted_vote_by_brute_force():
    from siglip2_encoder.eval.probe import knn_predict

    x, y = clusters(300, 2)
    x_test, _ = clusters(50, 3)
    for k in (10, 20):
        got = knn_predict(x, y, x_test, 5, k, chunk=16)
        a = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
        b = x_test.numpy() / np.linalg.norm(x_test.numpy(), axis=1, keepdims=True)
        for i, query in enumerate(b):
            similarity = a @ query
            nearest = np.argsort(-similarity)[:k]
            votes = np.zeros(5)
            np.add.at(votes, y.numpy()[nearest], np.exp(similarity[nearest] / 0.07))
            assert got[i] == votes.argmax()


def test_the_probe_command_on_folders(image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "probe.json"
    command = ["eval", "probe", "--train", str(image_folder), "--test", str(image_folder), "-o", str(out)]
    assert main([*command, "--model", str(tiny_checkpoint), "--workers", "0"]) == EXIT_OK
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == {"linear_top1", "knn10_top1", "knn20_top1"}
    assert result["dataset"]["train_images"] == result["dataset"]["test_images"] == 30
    assert result["settings"]["images_encoded_now"] == 60
    assert result["metrics"]["linear_top1"] > 0.5  # the same images: a linear probe fits them
    # the task names run the same command, on the features already written
    assert main(["eval", "knn", *command[2:], "--model", str(tiny_checkpoint)]) == EXIT_OK
    again = json.loads(out.read_text())
    assert again["metrics"] == result["metrics"] and again["settings"]["images_encoded_now"] == 0


# ---------------------------------------------------------------------------------------------- segmentation


def blocks(root, count: int, seed: int):
    """Images of 4 x 4 blocks of 16 px, each one of three colours (with noise); masks: the colour's index, and a
    1-pixel border of 255 (ignored)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])
    for i in range(count):
        classes = rng.integers(0, 3, (4, 4))
        mask = np.kron(classes, np.ones((16, 16), dtype=np.int64))
        pixels = colours[mask] + rng.integers(-20, 20, (64, 64, 3))
        mask[0, :] = 255
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i}.png")
    return root


def test_mean_iou_is_sklearns_jaccard_over_the_dataset():
    from sklearn.metrics import jaccard_score

    from siglip2_encoder.eval.segmentation import mean_iou

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 5000)
    predicted = np.where(rng.random(5000) < 0.6, truth, rng.integers(0, 5, 5000))  # class 4: predicted only
    confusion = torch.bincount(torch.tensor(truth * 6 + predicted), minlength=36).view(6, 6)
    miou, per_class = mean_iou(confusion)
    present = sorted(set(truth) | set(predicted))
    assert miou == pytest.approx(jaccard_score(truth, predicted, labels=present, average="macro"), abs=1e-12)
    assert per_class[5] is None and per_class[4] == 0.0


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "fixed_dir"])
def test_a_linear_head_on_tokens_segments_generated_blocks(checkpoint, request, tmp_path, caplog):
    train, test = blocks(tmp_path / "train", 16, 0), blocks(tmp_path / "test", 6, 1)
    out = tmp_path / "seg.json"
    command = ["eval", "segmentation", "--train", str(train), "--test", str(test), "--num-classes", "3"]
    command += ["--model", str(request.getfixturevalue(checkpoint)), "-o", str(out), "--workers", "0"]
    assert main([*command, "--epochs", "30", "--layer", "-2"]) == EXIT_OK
    result = json.loads(out.read_text())
    assert result["metrics"]["miou"] > 0.6, result  # chance is about 1/3 of that
    assert result["settings"]["layer"] == -2 and result["dataset"]["test_images"] == 6
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(test / "masks" / "0.png")
    assert main([*command, "--epochs", "1", "--layer", "-2"]) == EXIT_USAGE
    assert "0.png: a mask holds one class index per pixel, below 3 or 255; got values [7]" in caplog.text
