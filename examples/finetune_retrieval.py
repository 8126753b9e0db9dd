"""Sigmoid-loss fine-tuning of the image-text model with LoRA, on captioned shapes the script draws itself.

    python examples/finetune_retrieval.py                  # random weights, a small model, CPU, ~10 s
    python examples/finetune_retrieval.py --model google/siglip2-base-patch16-224    # a real checkpoint
    torchrun --nproc-per-node 2 examples/finetune_retrieval.py   # data-parallel: the batch split over the ranks

Steps: draw images of coloured shapes on random backgrounds, each captioned "a <colour> <shape>"; measure retrieval
on held-out pairs (image-to-text recall@1 over the distinct captions, text-to-image recall@5); add LoRA to both
towers (``add_lora(model, towers=...)``) and train it with the pairwise sigmoid loss; measure again; merge the
adapters, save the model (a folder transformers' SiglipModel loads) and check the reloaded model retrieves exactly
the same.

Under torchrun every rank draws the same batch and encodes its share of the pairs (DDP); the loss is
``ring_sigmoid_loss``: each rank's images against its own texts, then against the other ranks' texts passed round
the ring, so every image still meets every text of the combined batch, and the steps are those of one process on
the whole batch. One process runs the same code with a world of one (where the ring loss is the plain sigmoid loss).

With random weights (the default: no download here) the towers start from noise, so "before" is near chance and
the adapters learn the domain from scratch; the point is that the loss, the adapters and the saving work end to
end. A real run starts from a checkpoint (``--model``), whose tokenizer is used instead of the word-level one built
here, and needs real image-text pairs of the target domain, a GPU and many more steps.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel

from siglip2_encoder import EncoderConfig, ImageProcessor, SigLIP2Model, TextConfig, TextTokenizer
from siglip2_encoder.models.lora import EncoderLoRAConfig, add_lora
from siglip2_encoder.models.loss import loss_backend_names, ring_sigmoid_loss
from siglip2_encoder.pipeline.distributed import Ranks
from siglip2_encoder.pipeline.retrieval import top_k

logger = logging.getLogger("finetune_retrieval")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("circle", "square", "triangle")
CAPTIONS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]


def draw_pairs(count: int, size: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``count`` images of a random captioned shape (random place, size, grey background) and their captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 200, 1).repeat(3)))
        draw = ImageDraw.Draw(image)
        r = rng.uniform(0.2, 0.35) * size
        cx, cy = rng.uniform(r, size - r, 2)
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        images.append(np.asarray(image))
        captions.append(f"a {colour} {shape}")
    return images, captions


def word_tokenizer() -> TextTokenizer:
    """A word-level tokenizer over the captions' words (a real checkpoint has its own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CAPTIONS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")
    return TextTokenizer(wrapped)


def build(args: argparse.Namespace) -> tuple[SigLIP2Model, TextTokenizer, ImageProcessor]:
    if args.model:
        model = SigLIP2Model.from_pretrained(args.model)
        return model, TextTokenizer.from_pretrained(args.model), ImageProcessor(model.vision_model.processor_config)
    torch.manual_seed(0)
    width = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    vision = EncoderConfig(image_size=args.size, patch_size=8, **width)
    tokenizer = word_tokenizer()
    model = SigLIP2Model(vision, TextConfig(vocab_size=len(tokenizer.tokenizer), **width))
    logger.warning(
        "RANDOM weights (width 128, 4 layers per tower, %dpx): pass --model for a real checkpoint", args.size
    )
    return model.eval(), tokenizer, ImageProcessor(model.vision_model.processor_config)


def embed(model, tokenizer, processor, images, texts, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image and (T, D) text features."""
    model.eval()
    with torch.inference_mode():
        image = [model.get_image_features(**processor(images[i : i + batch])) for i in range(0, len(images), batch)]
        tokens = tokenizer(texts)
        text = model.get_text_features(tokens.input_ids, tokens.attention_mask)
    return torch.cat(image), text


def recall(model, tokenizer, processor, images, captions) -> dict[str, float]:
    """Image-to-text recall@1 over the distinct captions, and text-to-image recall@5: the share of captions whose
    5 nearest held-out images include one of theirs."""
    distinct = sorted(set(captions))
    image, text = embed(model, tokenizer, processor, images, distinct)
    _, best_text = top_k(image, text, 1)
    image_to_text = np.mean([distinct[i] == c for i, c in zip(best_text[:, 0].tolist(), captions)])
    _, best_images = top_k(text, image, 5)
    text_to_image = np.mean([any(captions[j] == t for j in row) for t, row in zip(distinct, best_images.tolist())])
    return {"image_to_text_r1": float(image_to_text), "text_to_image_r5": float(text_to_image)}


def train(model, tokenizer, processor, images, captions, steps: int, batch: int, lr: float, ranks: Ranks, backend: str):
    """AdamW on what is trainable (the adapters), the sigmoid loss on random batches of distinct captions: two
    images with one caption in a batch would be told they do not match each other's text. Returns the losses of
    the combined batches."""
    batch = min(batch, len(set(captions)))
    if batch % ranks.world:  # the ring loss needs as many pairs on every rank
        raise ValueError(
            f"--batch-size {batch} does not split evenly over {ranks.world} ranks; make it a multiple of {ranks.world}"
        )
    trained = DistributedDataParallel(model) if ranks.distributed else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng, losses = np.random.default_rng(1), []
    by_caption = {c: [i for i, x in enumerate(captions) if x == c] for c in set(captions)}
    model.train()
    for step in range(steps):
        chosen = rng.choice(sorted(by_caption), size=batch, replace=False)
        index = ranks.share([int(rng.choice(by_caption[c])) for c in chosen])
        tokens = tokenizer([captions[i] for i in index])
        outputs = trained(
            input_ids=tokens.input_ids,
            pixel_values=processor([images[i] for i in index]).pixel_values,
            attention_mask=tokens.attention_mask,
        )
        embeds = outputs.image_embeds, outputs.text_embeds
        loss = ring_sigmoid_loss(*embeds, model.logit_scale, model.logit_bias, backend=backend)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(ranks.mean(loss))
        if (step + 1) % 25 == 0:
            logger.info("  step %d: loss %.4f", step + 1, np.mean(losses[-25:]))
    return losses


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or local folder of an image-text checkpoint (default: random)")
    parser.add_argument("--train-pairs", type=int, default=600)
    parser.add_argument("--test-pairs", type=int, default=120)
    parser.add_argument("--size", type=int, default=32, help="image side for the random-weight model")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--batch-size", type=int, default=12, help="pairs per step, all ranks together (at most one per caption)"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--loss-backend", choices=loss_backend_names(), default="torch", help="what computes the loss's tiles"
    )
    parser.add_argument("--towers", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--out", help="folder for the fine-tuned model (default: a temporary one, deleted at the end)")
    args = parser.parse_args(argv)
    if args.out:
        return run(args, Path(args.out))
    # Without --out the saved files are checked, then deleted with their folder: nothing is left behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="finetune_retrieval_") as scratch:
        return run(args, Path(scratch))


def run(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Train, evaluate, save the fine-tuned model in ``out`` and check that they reload (rank 0); the metrics."""
    ranks = Ranks.from_env()
    logging.basicConfig(level=logging.INFO if ranks.main else logging.WARNING, format="%(message)s")
    ranks.start()
    if ranks.distributed:
        logger.info("data-parallel (DDP) over %d ranks", ranks.world)

    model, tokenizer, processor = build(args)
    size = processor.config.image_size[0] if processor.config.image_size else args.size
    train_images, train_captions = draw_pairs(args.train_pairs, size, seed=0)
    test_images, test_captions = draw_pairs(args.test_pairs, size, seed=1)
    logger.info("%d training and %d held-out pairs, %d captions", len(train_images), len(test_images), len(CAPTIONS))

    # Only rank 0 reports: the other ranks skip the evaluations (their log shows warnings only).
    before = recall(model, tokenizer, processor, test_images, test_captions) if ranks.main else {}
    logger.info("before: %s (chance: %.3f / %.3f)", before, 1 / len(CAPTIONS), 5 / len(CAPTIONS))
    config = EncoderLoRAConfig(r=args.rank, alpha=2.0 * args.rank, modules=("q_proj", "v_proj", "fc1", "fc2"))
    lora = add_lora(model, config, towers=args.towers)
    losses = train(
        lora,
        tokenizer,
        processor,
        train_images,
        train_captions,
        args.steps,
        args.batch_size,
        args.lr,
        ranks,
        args.loss_backend,
    )
    results = {"first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:]))}
    if not ranks.main:  # the ranks hold the same weights: rank 0 evaluates and saves
        return results
    after = recall(lora, tokenizer, processor, test_images, test_captions)
    logger.info("after:  %s", after)

    merged = lora.merge_and_unload()
    merged.save_pretrained(out / "model", tokenizer=tokenizer)  # with it, transformers' pipeline and vLLM take it
    reloaded = SigLIP2Model.from_pretrained(out / "model")
    same = recall(reloaded, TextTokenizer.from_pretrained(out / "model"), processor, test_images, test_captions)
    logger.info("saved in %s; reloaded: %s", out / "model", "the same recall" if same == after else "DIFFERENT")
    if same != after:
        raise SystemExit("the reloaded model retrieves differently")
    return {
        **{f"before_{k}": v for k, v in before.items()},
        **{f"after_{k}": v for k, v in after.items()},
        **results,
    }


if __name__ == "__main__":
    main()
