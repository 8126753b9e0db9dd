"""The text tower and zero-shot classification vs transformers, on the same random weights and inputs.

    python benchmarks/zero_shot.py                     # both sections (~10 min on a 2-core CPU)
    python benchmarks/zero_shot.py --sections text

* text: our ``SigLIP2TextEncoder`` vs transformers' ``SiglipTextModel`` (sdpa), SigLIP 2 B/16's text tower shape
  (width 768, 12 layers, Gemma's 256k vocabulary), batches of 64-token texts, without a mask (as the models were
  trained, and what ``TextTokenizer`` gives by default) and with the padding mask of texts of 5 to 15 tokens (what
  transformers' tokenizers give, ``padding_mask=True``). Ours twice:
  with every token's output (``last_hidden_state``, as transformers always computes), and features only
  (``return_last=False``, what ``get_text_features``, zero-shot labels and ``embed-text`` use: the last layer at the
  pooled position only, and with a mask only the real tokens and that position run). Outputs checked equal (atol
  1e-4) first.
* classify: 200 images against 100 labels: ``SigLIP2Model.classify`` (labels encoded once, images in batches of 32)
  vs ``pipeline("zero-shot-image-classification")`` on the same checkpoint folder (which runs the text tower on
  all 100 labels for every image). Smaller towers (width 384, 6 layers each) keep the pipeline's run to minutes;
  the ratio grows with the text tower's size. Rankings and scores checked equal (atol 1e-4) on 3 images first.

Median of --repeats after a warm-up call (the pipeline: one timed pass over all images after a warm-up image).
Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from timing import median_seconds
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTextConfig, SiglipTextModel

from siglip2_encoder import SigLIP2Model, TextConfig, TextTokenizer
from siglip2_encoder.models.text import SigLIP2TextEncoder

B16_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def text_section(batch_sizes: list[int], repeats: int) -> list[str]:
    torch.manual_seed(0)
    theirs = SiglipTextModel(SiglipTextConfig(vocab_size=256000, max_position_embeddings=64, **B16_TEXT)).eval()
    ours = SigLIP2TextEncoder(TextConfig(vocab_size=256000, max_position_embeddings=64, **B16_TEXT)).eval()
    state = {k: v for k, v in theirs.state_dict().items() if k != "text_model.embeddings.position_ids"}
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()}, strict=True)
    rows = []
    for batch in batch_sizes:
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(1, 256000, (batch, 64), generator=generator)
        lengths = torch.randint(5, 16, (batch,), generator=generator)
        mask = (torch.arange(64)[None] < lengths[:, None]).long()
        for name, m in (("no mask", None), ("padding mask", mask)):
            with torch.inference_mode():
                want = theirs(input_ids=ids, attention_mask=m).pooler_output
                error = max(
                    (ours(ids, m, return_last=last).pooler_output - want).abs().max().item() for last in (True, False)
                )
                if error > 1e-4:
                    raise SystemExit(f"text features differ by {error}")
                t_theirs = median_seconds(lambda: theirs(input_ids=ids, attention_mask=m), repeats)  # noqa: B023
                t_all = median_seconds(lambda: ours(ids, m), repeats)  # noqa: B023
                t_pooled = median_seconds(lambda: ours(ids, m, return_last=False), repeats)  # noqa: B023
            rows.append(
                f"| {batch} | {name} | {batch / t_theirs:.1f} | {batch / t_all:.1f} | {t_theirs / t_all:.2f}x | "
                f"{batch / t_pooled:.1f} | {t_theirs / t_pooled:.2f}x | {error:.1e} |"
            )
            print(rows[-1], flush=True)
    header = [
        "| batch | mask | transformers (texts/s) | ours, all tokens (texts/s) | vs it | ours, features only (texts/s) "
        "| vs it | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return header + rows


def checkpoint(folder: Path, labels: list[str]) -> None:
    """A random SiglipModel checkpoint with a word-level tokenizer and an image processor: what the pipeline loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["This is a photo of a"] + labels
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    width = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6)
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(labels) + 16, max_position_embeddings=64, **width),
        vision_config=dict(image_size=224, patch_size=16, **width),
    )
    SiglipModel(config).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)


def classify_section(num_images: int, num_labels: int, folder: Path) -> list[str]:
    from transformers import pipeline

    labels = [f"thing{i}" for i in range(num_labels)]
    checkpoint(folder, labels)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(200, 400)), int(rng.integers(200, 400)), 3), np.uint8))
        for _ in range(num_images)
    ]
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    model, tokenizer = SigLIP2Model.from_pretrained(folder), TextTokenizer.from_pretrained(folder)
    as_transformers = TextTokenizer.from_pretrained(folder, padding_mask=True)  # the pipeline's texts, for the check
    label_set = model.encode_labels(labels, as_transformers, canonicalize=False)
    for image, got in zip(images[:3], model.classify(images[:3], label_set)):
        want = classifier(image, candidate_labels=labels)
        if [r["label"] for r in got] != [r["label"] for r in want] or any(
            abs(a["score"] - b["score"]) > 1e-4 for a, b in zip(got, want)
        ):
            raise SystemExit("classify differs from the pipeline")

    def ours() -> None:
        label_set = model.encode_labels(labels, tokenizer)  # timed: computing the labels is part of the work
        for start in range(0, num_images, 32):
            model.classify(images[start : start + 32], label_set)

    t_ours = median_seconds(ours, repeats=3)
    classifier(images[0], candidate_labels=labels)  # warm-up
    start = time.perf_counter()
    for image in images:
        classifier(image, candidate_labels=labels)
    t_theirs = time.perf_counter() - start
    return [
        "| implementation | seconds | images/s | ours vs it |",
        "|---|---|---|---|",
        f"| ours: `classify` with labels encoded once | {t_ours:.1f} | {num_images / t_ours:.1f} | 1.00x |",
        f"| transformers zero-shot pipeline | {t_theirs:.1f} | {num_images / t_theirs:.2f} | "
        f"{t_theirs / t_ours:.1f}x |",
    ]


def eval_section(num_images: int, num_labels: int, pipeline_images: int, root: Path) -> list[str]:
    """``eval zeroshot`` (cold: images extracted, labels x 80 templates encoded) vs CLIP_benchmark's zero-shot
    classifier + classification loop on transformers' SiglipModel (the same work: texts once, images once), and the
    pipeline, which can take one template: its time for ``pipeline_images`` images, extrapolated to all images and
    the 80 templates."""
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from transformers import AutoModel, AutoTokenizer, pipeline

    from siglip2_encoder.eval.datasets import load_labelled
    from siglip2_encoder.eval.features import Encoding
    from siglip2_encoder.eval.prompts import TEMPLATE_SETS
    from siglip2_encoder.eval.zeroshot import evaluate_zeroshot

    labels = [f"thing{i}" for i in range(num_labels)]
    checkpoint(root / "model", labels)
    rng = np.random.default_rng(0)
    for i in range(num_images):
        (root / "data" / labels[i % num_labels]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), np.uint8)).save(
            root / "data" / labels[i % num_labels] / f"{i}.png"
        )
    data = load_labelled(root / "data")
    templates = TEMPLATE_SETS["clip_paper"]
    model = SigLIP2Model.from_pretrained(root / "model")
    start = time.perf_counter()
    encoding = Encoding(num_workers=1)
    ours = evaluate_zeroshot(model, data, templates, root / "features", canonicalize=False, encoding=encoding)
    t_ours = time.perf_counter() - start

    theirs, processor = (
        AutoModel.from_pretrained(root / "model").eval(),
        SiglipImageProcessor.from_pretrained(root / "model"),
    )
    tokenizer = AutoTokenizer.from_pretrained(root / "model")

    class Clip(torch.nn.Module):
        def encode_image(self, pixels):
            return theirs.get_image_features(pixel_values=pixels).pooler_output

        def encode_text(self, tokens):
            return theirs.get_text_features(**tokens).pooler_output

    class Images(torch.utils.data.Dataset):
        classes = data.classes

        def __len__(self):
            return len(data.paths)

        def __getitem__(self, i):
            pixels = processor(Image.open(data.paths[i]).convert("RGB"), return_tensors="pt")["pixel_values"][0]
            return pixels, data.labels[i]

    start = time.perf_counter()
    classifier = zero_shot_classifier(
        Clip(),  # texts as SigLIP was trained, and as ours: padded to 64, no padding mask
        lambda t: tokenizer(t, padding="max_length", max_length=64, return_attention_mask=False, return_tensors="pt"),
        list(data.classes),
        [t.replace("{}", "{c}") for t in templates], "cpu", amp=False,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(Images(), batch_size=32)
    logits, targets = run_classification(Clip(), classifier, loader, "cpu", amp=False)
    t_cb = time.perf_counter() - start
    if int((logits.argmax(1) == targets).sum()) / len(targets) != ours["metrics"]["top1"]:
        raise SystemExit("eval zeroshot's top-1 differs from CLIP_benchmark's on the same model and data")

    classify = pipeline("zero-shot-image-classification", model=str(root / "model"))
    images = [Image.open(p) for p in data.paths[:pipeline_images]]
    classify(images[0], candidate_labels=list(data.classes))  # warm-up
    start = time.perf_counter()
    for image in images:
        classify(image, candidate_labels=list(data.classes))
    t_pipeline = (time.perf_counter() - start) / pipeline_images * num_images * len(templates)
    return [
        "| implementation | seconds | ours vs it |",
        "|---|---|---|",
        f"| ours: `eval zeroshot` (extract + {num_labels} x {len(templates)} texts + metrics) | {t_ours:.1f} | 1.00x |",
        f"| CLIP_benchmark: zero_shot_classifier + run_classification, transformers' SiglipModel | {t_cb:.1f} | "
        f"{t_cb / t_ours:.1f}x |",
        f"| transformers pipeline, {len(templates)} templates (extrapolated from {pipeline_images} images x 1 "
        f"template) | {t_pipeline:.0f} | {t_pipeline / t_ours:.0f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["text", "classify"], choices=["text", "classify", "eval"])
    parser.add_argument("--pipeline-images", type=int, default=10, help="eval: images the pipeline is timed on")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--labels", type=int, default=100)
    args = parser.parse_args()
    header = (
        f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Same random weights and inputs for both; outputs checked equal "
        f"(atol 1e-4) before timing."
    )
    if "text" in args.sections:
        table = text_section(args.batch_sizes, args.repeats)
        print("\n### Text tower: SigLIP 2 B/16 text shape, 64-token texts, cpu, fp32\n\n" + header + "\n")
        print("\n".join(table))
    scratch = tempfile.TemporaryDirectory(prefix="zero_shot_bench_")  # checkpoints and images, deleted at the end
    if "classify" in args.sections:
        table = classify_section(args.images, args.labels, Path(scratch.name) / "classify")
        print(
            f"\n### Zero-shot classification: {args.images} images x {args.labels} labels, towers of width 384 and "
            f"6 layers, 224 px, cpu, fp32\n\n" + header + "\n"
        )
        print("\n".join(table))

    if "eval" in args.sections:
        table = eval_section(args.images, args.labels, args.pipeline_images, Path(scratch.name) / "eval")
        print(
            f"\n### eval zeroshot: {args.images} images x {args.labels} classes x 80 templates, towers of width 384 "
            f"and 6 layers, 224 px, cpu, fp32\n\n" + header + "\n"
        )
        print("\n".join(table))
    scratch.cleanup()


if __name__ == "__main__":
    main()
