"""LoRA fine-tuning of the SigLIP 2 tower with a linear head, on a shapes dataset the script draws itself.

    python examples/lora_classification.py                       # random base weights, small preset, CPU, ~1 min
    python examples/lora_classification.py --model google/siglip2-base-patch16-224   # a real checkpoint
    torchrun --nproc-per-node 2 examples/lora_classification.py   # data-parallel (DDP): each batch split over ranks

Steps: draw a few hundred images of 4 texture classes (random colours, periods, phases; a random shape on top);
train a linear probe on the frozen tower ("before"); add LoRA to the last layers and train it with a fresh head
("after"); save the adapter and head, load them into a fresh tower, and check the predictions are identical.

Under torchrun every rank draws the same batches and takes its share of each; each rank's loss is its share of the
combined batch's summed loss, so DDP's averaged gradients are the combined batch's and the steps are those of one
process (whatever the split of a short last batch). Rank 0 evaluates and saves.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from siglip2_encoder import ImageProcessor, SigLIP2Encoder
from siglip2_encoder.models.lora import EncoderLoRAConfig, add_lora
from siglip2_encoder.pipeline.distributed import Ranks

logger = logging.getLogger("lora_classification")
CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard")


def draw_dataset(per_class: int, size: int, seed: int) -> tuple[list[np.ndarray], torch.Tensor]:
    """Two-colour textures (the class) of random colours, period and phase, each with a randomly coloured shape
    (circle, square or triangle) drawn over it as a distractor; and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for label, texture in enumerate(CLASSES):
        for _ in range(per_class):
            period, phase = rng.uniform(8, 20), rng.uniform(0, 20)
            rows, cols = ((yy + phase) % period) < period / 2, ((xx + phase) % period) < period / 2
            pattern = {
                "horizontal stripes": rows,
                "vertical stripes": cols,
                "diagonal stripes": ((xx + yy + phase) % period) < period / 2,
                "checkerboard": rows ^ cols,
            }[texture]
            pixels = np.where(pattern[..., None], rng.integers(0, 256, 3), rng.integers(0, 256, 3)).astype(np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            r = rng.uniform(0.15, 0.3) * size
            cx, cy = rng.uniform(r, size - r, 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = rng.integers(3)
            if shape == 0:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif shape == 1:
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            images.append(np.asarray(image))
            labels.append(label)
    return images, torch.tensor(labels)


class Classifier(nn.Module):
    """The tower's pooled features through a head, as one module: DDP wraps (and synchronises) both."""

    def __init__(self, tower: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits of the processed images ``inputs``."""
        return self.head(self.tower(**inputs).pooler_output)


def accuracy(model: nn.Module, head: nn.Module, processor: ImageProcessor, images, labels, batch: int = 64) -> float:
    return float((predict(model, head, processor, images, batch) == labels).float().mean())


def predict(model: nn.Module, head: nn.Module, processor: ImageProcessor, images, batch: int = 64) -> torch.Tensor:
    model.eval()
    classifier = Classifier(model, head)
    with torch.inference_mode():
        logits = [classifier(**processor(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(logits).argmax(-1)


def train(
    model: nn.Module,
    head: nn.Module,
    processor: ImageProcessor,
    images,
    labels,
    epochs: int,
    lr_head: float,
    ranks: Ranks,
    lr_tower: float = 0.0,
) -> list[float]:
    """AdamW on the head and on whatever the tower has trainable (LoRA), with separate learning rates: the
    adapters move the features the head reads, so they step more carefully. Returns each epoch's mean loss."""
    groups = [{"params": list(head.parameters()), "lr": lr_head}]
    tower = [p for p in model.parameters() if p.requires_grad]
    if tower:
        groups.append({"params": tower, "lr": lr_tower})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    classifier = Classifier(model, head)
    trained = DistributedDataParallel(classifier) if ranks.distributed else classifier
    generator, losses = torch.Generator().manual_seed(0), []
    for epoch in range(epochs):
        classifier.train()
        order, total, seen = torch.randperm(len(images), generator=generator).tolist(), 0.0, 0
        for start in range(0, len(images), 32):
            batch = order[start : start + 32]
            if len(batch) < ranks.world:  # a short last batch some rank would get nothing of
                continue
            index = ranks.share(batch)
            logits = trained(**processor([images[i] for i in index]))
            # This rank's share of the combined batch's mean loss, times the number of ranks (DDP averages).
            loss = nn.functional.cross_entropy(logits, labels[index], reduction="sum") * ranks.world / len(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, seen = total + ranks.mean(loss) * len(batch), seen + len(batch)
        losses.append(total / seen)
        logger.info("  epoch %d: loss %.4f", epoch + 1, losses[-1])
    return losses


def new_head(width: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(CLASSES)))


def build(args: argparse.Namespace) -> tuple[SigLIP2Encoder, ImageProcessor]:
    if args.model:
        return SigLIP2Encoder.from_pretrained(args.model), ImageProcessor.from_pretrained(args.model)
    torch.manual_seed(0)
    model = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", image_size=args.size, num_hidden_layers=4)
    logger.warning(
        "RANDOM base weights (SigLIP 2 B/16 shape, 4 layers, %dpx): pass --model for a real tower", args.size
    )
    return model, ImageProcessor(model.processor_config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or local folder (default: random weights, small preset)")
    parser.add_argument("--per-class", type=int, default=150, help="images per class (3/4 train, 1/4 test)")
    parser.add_argument("--size", type=int, default=64, help="image side for the random-weight preset")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of the LoRA adapters")
    parser.add_argument("--lora-layers", type=int, default=4, help="adapt the last N encoder layers")
    parser.add_argument("--lr-head", type=float, default=3e-3, help="learning rate of the linear heads")
    parser.add_argument("--out", help="folder for the adapter and head (default: a temporary one, deleted at the end)")
    args = parser.parse_args(argv)
    if args.out:
        return run(args, Path(args.out))
    # Without --out the saved files are checked, then deleted with their folder: nothing is left behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="lora_classification_") as scratch:
        return run(args, Path(scratch))


def run(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Train, evaluate, save the adapter and head in ``out`` and check that they reload (rank 0); the metrics."""
    ranks = Ranks.from_env()
    logging.basicConfig(level=logging.INFO if ranks.main else logging.WARNING, format="%(message)s")
    ranks.start()
    if ranks.distributed:
        logger.info("data-parallel (DDP) over %d ranks", ranks.world)

    images, labels = draw_dataset(args.per_class, 96, seed=0)
    test = np.arange(len(images)) % 4 == 0
    train_x, test_x = [im for im, t in zip(images, test) if not t], [im for im, t in zip(images, test) if t]
    train_y, test_y = labels[~torch.from_numpy(test)], labels[torch.from_numpy(test)]
    logger.info("%d training and %d test images of %s", len(train_x), len(test_x), ", ".join(CLASSES))

    model, processor = build(args)
    width = model.config.hidden_size
    probe = new_head(width)
    model.freeze()
    logger.info("before: a linear probe on the frozen tower")
    train(model, probe, processor, train_x, train_y, args.epochs, args.lr_head, ranks)
    if ranks.main:
        before = accuracy(model, probe, processor, test_x, test_y)
        logger.info("before: test accuracy %.3f (chance %.3f)", before, 1 / len(CLASSES))
        if not args.model:  # random weights: keep the base to reload it; a real checkpoint is reloaded by name
            model.save_pretrained(out / "base")
    lora = add_lora(
        model,
        EncoderLoRAConfig(
            r=args.rank,
            alpha=2.0 * args.rank,
            encoder_layers=args.lora_layers,
            modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        ),
    )
    head = new_head(width)
    logger.info("after: LoRA on the last %d layers + a linear head", args.lora_layers)
    losses = train(lora, head, processor, train_x, train_y, args.epochs, args.lr_head, ranks, args.lr)
    if not ranks.main:  # the ranks hold the same weights: rank 0 evaluates and saves
        return {"final_loss": losses[-1]}
    after = accuracy(lora, head, processor, test_x, test_y)
    logger.info("after: test accuracy %.3f", after)

    lora.save_pretrained(out / "adapter")
    torch.save(head.state_dict(), out / "head.pt")
    reloaded = _reload(args.model or out / "base", out, width)
    same = bool(torch.equal(predict(lora, head, processor, test_x), predict(*reloaded, processor, test_x)))
    logger.info("adapter and head saved in %s; reloaded: %s predictions", out, "identical" if same else "DIFFERENT")
    if not same:
        raise SystemExit("reloaded predictions differ")
    return {
        "before": before,
        "after": after,
        "chance": 1 / len(CLASSES),
        "identical_after_reload": float(same),
        "final_loss": losses[-1],
    }


def _reload(base_model: str | Path, out: Path, width: int) -> tuple[nn.Module, nn.Module]:
    from peft import PeftModel

    base = SigLIP2Encoder.from_pretrained(base_model)
    head = new_head(width)
    head.load_state_dict(torch.load(out / "head.pt", weights_only=True))
    return PeftModel.from_pretrained(base, out / "adapter"), head


if __name__ == "__main__":
    main()
