"""Train a small LLaVA-style VLM on CPU: our SigLIP 2 tower + an MLP projector + a small causal LM.

    python examples/train_vlm.py                      # offline: random-init tower and Llama, under a minute on 2 cores
    python examples/train_vlm.py --tower google/siglip2-base-patch16-224 --lm Qwen/Qwen2.5-0.5B   # with Hub access
    torchrun --nproc-per-node 2 examples/train_vlm.py  # data-parallel (DDP): each rank takes its share of a batch
    python examples/train_vlm.py --format lfm2-vl      # a NaFlex tower, LFM2-VL's projector and export (~1 min)

The script draws images of coloured shapes, builds a word-level tokenizer for its own vocabulary (no download),
trains the projector and the language model (stage 2; the tower stays frozen) on captions and questions about
colour and shape, prints the loss as it falls, and then asks questions about new images and reports accuracy
against chance. Finally it exports the model to transformers' LLaVA format and checks that
``LlavaForConditionalGeneration`` answers the same. With ``--format lfm2-vl`` the tower is NaFlex (each image at
its own aspect ratio, sized by LFM2-VL's rule), the projector LFM2-VL's (2 x 2 pixel unshuffle, LayerNorm, 2-layer
MLP), and the export transformers' LFM2-VL format, checked the same way with ``Lfm2VlForConditionalGeneration``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from siglip2_encoder import ImageProcessor, SigLIP2Encoder, get_recipe
from siglip2_encoder.adapters import MLPConfig, build_projector
from siglip2_encoder.integrations.lfm2_vl_export import IMAGE_END, IMAGE_START, add_lfm2_vl_tokens, export_lfm2_vl
from siglip2_encoder.integrations.llava import (
    IGNORE_INDEX,
    STAGE_2,
    VisionLanguageModel,
    VLMProcessor,
    add_image_token,
    apply_stage,
)
from siglip2_encoder.integrations.llava_export import export_llava
from siglip2_encoder.integrations.parallel import ddp_vlm
from siglip2_encoder.pipeline.distributed import Ranks

logger = logging.getLogger("train_vlm")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {  # prompt -> how to answer it from (colour, shape)
    "<image> what colour is the shape ?": lambda colour, shape: colour,
    "<image> what shape is it ?": lambda colour, shape: shape,
    "<image> describe the image .": lambda colour, shape: f"a {colour} {shape}",
}


def draw(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    grey = int(rng.integers(150, 256))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r, 2)
    fill = tuple(int(np.clip(c + rng.integers(-25, 25), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return np.asarray(image)


def dataset(n: int, seed: int) -> list[tuple[np.ndarray, str, str]]:
    """(image, prompt, answer) samples, every question kind for every image."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        image = draw(colour, shape, rng)
        samples += [(image, prompt, answer(colour, shape)) for prompt, answer in QUESTIONS.items()]
    return samples


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over this task's words, built offline."""
    words = {w for prompt in QUESTIONS for w in prompt.split() if w != "<image>"} | set(COLOURS) | set(SHAPES) | {"a"}
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build(args: argparse.Namespace) -> tuple[VisionLanguageModel, VLMProcessor, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    lfm2_vl = args.format == "lfm2-vl"
    if args.tower:
        tower = SigLIP2Encoder.from_pretrained(args.tower)
    else:
        logger.warning("RANDOM tower weights (a small SigLIP 2 shape): pass --tower for a real one")
        tower = SigLIP2Encoder.from_preset(
            "siglip2-base-patch16-224",
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=None if lfm2_vl else 64,
            num_patches=64 if lfm2_vl else None,
        )
    if lfm2_vl:  # LFM2-VL's sizing rule, grids in multiples of the 2 x 2 unshuffle: 4 x 4 patches per image here
        tower.processor_config = tower.processor_config.replace(
            naflex_resize="smart", min_num_patches=16, max_num_patches=64, grid_multiple=2
        )
    image_processor = ImageProcessor(tower.processor_config)
    if args.lm:
        tokenizer, lm = AutoTokenizer.from_pretrained(args.lm), AutoModelForCausalLM.from_pretrained(args.lm)
    else:
        tokenizer = word_tokenizer()
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=3,
            )
        )
    image_token_id = add_lfm2_vl_tokens(tokenizer, lm) if lfm2_vl else add_image_token(tokenizer, lm)
    width, tower_width = lm.get_input_embeddings().embedding_dim, tower.config.hidden_size
    if lfm2_vl:
        config = get_recipe("lfm2_vl").projector_config(tower_width, width, norm=True)
    else:
        config = MLPConfig(in_features=tower_width, out_features=width, layers=(-2,))
    projector = build_projector(config)
    model = VisionLanguageModel(tower.eval(), projector, lm, image_token_id)
    text = dict(image_start=IMAGE_START, image_end=IMAGE_END) if lfm2_vl else {}
    processor = VLMProcessor(tokenizer, image_processor, projector, patch_size=tower.config.patch_size, **text)
    return model, processor, tokenizer


def answer(model: VisionLanguageModel, processor: VLMProcessor, samples, batch: int = 32) -> list[str]:
    """Greedy answers, decoded."""
    model.eval()
    out = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        inputs = processor([p for _, p, _ in chunk], [[im] for im, _, _ in chunk], padding_side="left")
        ids = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        out += [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", help="Hub id or folder of a SigLIP 2 checkpoint (default: random small tower)")
    parser.add_argument("--lm", help="Hub id or folder of a causal LM (default: random small Llama, own tokenizer)")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--test-images", type=int, default=60)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--format",
        choices=("llava", "lfm2-vl"),
        default="llava",
        help="llava: a fixed-resolution tower, an MLP projector, LLaVA's export; lfm2-vl: a NaFlex tower, LFM2-VL's "
        "projector and export",
    )
    args = parser.parse_args(argv)
    ranks = Ranks.from_env()
    logging.basicConfig(level=logging.INFO if ranks.main else logging.WARNING, format="%(message)s")

    model, processor, tokenizer = build(args)
    train, test = dataset(args.train_images, seed=0), dataset(args.test_images, seed=1)
    counts = apply_stage(model, STAGE_2)
    logger.info(
        "%d training and %d test samples; trainable: projector %s, LM %s, tower %s",
        len(train),
        len(test),
        *(f"{counts[k][0]:,}" for k in ("projector", "language_model", "vision_tower")),
    )

    # Under torchrun (or accelerate launch) every rank builds the same model and draws the same batches, takes its
    # share of each, and DDP averages the gradients; one process is the same code with a world of one.
    ranks.start()
    if ranks.distributed:
        logger.info("data-parallel (DDP) over %d ranks", ranks.world)
    trained = ddp_vlm(model) if ranks.distributed else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    warmup = max(0.1, 2 / args.steps)  # OneCycleLR needs a warm-up of 2+ steps
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=warmup)
    rng, started, losses = np.random.default_rng(2), time.monotonic(), []
    for step in range(1, args.steps + 1):
        model.train()
        chunk = ranks.share([train[i] for i in rng.choice(len(train), args.batch_size, replace=False)])
        batch = processor([p for _, p, _ in chunk], [[im] for im, _, _ in chunk], [a for _, _, a in chunk])
        # The LM's loss is a sum over label tokens divided by num_items_in_batch: the combined batch's count of
        # predicted tokens (labels shift by one), times the ranks since DDP averages, makes each step that of one
        # process on the whole batch, whatever the answers' lengths on each rank.
        predicted = ranks.sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = trained(**batch, num_items_in_batch=predicted).loss * ranks.world
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(ranks.mean(loss))
        if step % max(1, args.steps // 10) == 0 or step == 1:
            logger.info("step %4d  loss %.4f  (%.0f s)", step, np.mean(losses[-20:]), time.monotonic() - started)

    results: dict[str, float] = {"first_loss": losses[0], "final_loss": float(np.mean(losses[-20:]))}
    if not ranks.main:  # the ranks hold the same weights: rank 0 evaluates and exports
        return results
    replies = answer(model, processor, test)
    for (prompt, _), chance in zip(QUESTIONS.items(), (1 / len(COLOURS), 1 / len(SHAPES), 1 / (len(COLOURS) * 3))):
        pairs = [(reply, a) for reply, (_, p, a) in zip(replies, test) if p == prompt]
        accuracy = float(np.mean([reply == a for reply, a in pairs]))
        results[prompt] = accuracy
        logger.info(
            "held-out %-40s accuracy %.2f (chance %.2f)  e.g. %r -> %r",
            prompt,
            accuracy,
            chance,
            pairs[0][1],
            pairs[0][0],
        )

    with tempfile.TemporaryDirectory() as folder:
        export = export_lfm2_vl if args.format == "lfm2-vl" else export_llava
        export(model, folder, tokenizer)
        from transformers import AutoModelForImageTextToText

        exported = AutoModelForImageTextToText.from_pretrained(folder).eval()
        inputs = processor([p for _, p, _ in test[:6]], [[im] for im, _, _ in test[:6]], padding_side="left")
        ours = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        theirs = exported.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        same = ours.tolist() == theirs[:, inputs["input_ids"].shape[1] :].tolist()
    logger.info(
        "exported to %s format: transformers' %s answers %s",
        args.format,
        type(exported).__name__,
        "the same" if same else "DIFFERENTLY",
    )
    results["export_same"] = float(same)
    return results


if __name__ == "__main__":
    main()
