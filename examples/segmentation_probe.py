"""Semantic segmentation on frozen SigLIP 2 features: a linear probe and a multi-layer FPN head.

    python examples/segmentation_probe.py                   # random small tower, CPU, about a minute
    python examples/segmentation_probe.py --model google/siglip2-base-patch16-512   # a real tower (Hub access)

The script draws a dataset of shapes (a red disc, a green striped square, a blue dotted triangle) on textured
backgrounds, with per-pixel masks; encodes every image once with the frozen tower (caching the tapped layers);
trains both heads on the cached features; reports mIoU and pixel accuracy on held-out images against the
majority-class baseline; and saves a picture of image / truth / linear probe / FPN head.
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from siglip2_encoder import ImageProcessor, ProcessorConfig, SigLIP2Encoder
from siglip2_encoder.integrations.heads import FPNHead, LinearProbeHead, default_taps, mean_iou, pixel_accuracy

logger = logging.getLogger("segmentation_probe")
CLASSES = ("background", "red disc", "green striped square", "blue dotted triangle")
PALETTE = np.array([[40, 40, 40], [230, 60, 60], [60, 200, 80], [70, 100, 240]], dtype=np.uint8)


def draw(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image with 1 to 3 shapes on a textured background, and its (size, size) class mask."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = rng.integers(90, 200, 3)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 16)
    waves = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)[..., None]
    pixels = np.clip(base + 30 * waves + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image, mask = Image.fromarray(pixels), Image.new("L", (size, size), 0)
    for _ in range(rng.integers(1, 4)):
        label = int(rng.integers(1, 4))
        r = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(r, size - r, 2)
        box = [cx - r, cy - r, cx + r, cy + r]
        shape = Image.new("L", (size, size), 0)
        pen = ImageDraw.Draw(shape)
        if label == 1:
            pen.ellipse(box, fill=255)
        elif label == 2:
            pen.rectangle(box, fill=255)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
        inside = np.asarray(shape) > 0
        colour = np.array([[230, 60, 60], [60, 200, 80], [70, 100, 240]][label - 1])
        fill = np.tile(colour, (size, size, 1)).astype(np.int16)
        if label == 2:  # stripes
            fill[(yy // 4) % 2 == 0] //= 2
        elif label == 3:  # dots
            fill[((yy % 6) < 2) & ((xx % 6) < 2)] = 255
        array = np.asarray(image).copy()
        array[inside] = np.clip(fill[inside], 0, 255)
        image = Image.fromarray(array)
        mask_array = np.asarray(mask).copy()
        mask_array[inside] = label
        mask = Image.fromarray(mask_array)
    return np.asarray(image), np.asarray(mask).astype(np.int64)


def encode(model: SigLIP2Encoder, processor: ImageProcessor, images: list[np.ndarray], taps: tuple, batch: int = 16):
    """Cached tapped feature maps: one (N, D, h, w) tensor per tap."""
    hidden = [t for t in taps if t is not None]
    parts: list[list[torch.Tensor]] = [[] for _ in taps]
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            out = model(
                **processor(images[start : start + batch]), layers=hidden, return_last=None in taps, return_pooled=False
            )
            for i, tap in enumerate(taps):
                parts[i].append(out.feature_map(tap))
    return [torch.cat(p) for p in parts]


def train_head(head: nn.Module, features: list[torch.Tensor], masks: torch.Tensor, epochs: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    size = tuple(masks.shape[-2:])
    for epoch in range(epochs):
        head.train()
        order, total = torch.randperm(len(masks), generator=generator), 0.0
        for start in range(0, len(masks), 16):
            index = order[start : start + 16]
            loss = nn.functional.cross_entropy(head([f[index] for f in features], size), masks[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        if (epoch + 1) % max(1, epochs // 4) == 0:
            logger.info("  epoch %d: loss %.3f", epoch + 1, total / len(masks))


def predict(head: nn.Module, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    head.eval()
    with torch.no_grad():
        return torch.cat(
            [head([f[i : i + 32] for f in features], size).argmax(1) for i in range(0, len(features[0]), 32)]
        )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or folder (default: random small tower, patch 8 at 128 px)")
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--picture", default="segmentation_probe.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.model:
        model = SigLIP2Encoder.from_pretrained(args.model)
    else:
        logger.warning("RANDOM tower weights (small SigLIP 2 shape, patch 8): pass --model for a real tower")
        torch.manual_seed(0)
        model = SigLIP2Encoder.from_preset(
            "siglip2-base-patch16-224",
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=6,
            num_attention_heads=4,
            patch_size=8,
            image_size=args.size,
        )
    model.freeze().eval()
    config = model.processor_config
    processor = ImageProcessor(
        ProcessorConfig(
            image_size=(args.size, args.size),
            resample=config.resample,
            image_mean=config.image_mean,
            image_std=config.image_std,
        )
    )
    rng = np.random.default_rng(0)
    data = [draw(args.size, rng) for _ in range(args.train + args.test)]
    images, masks = [d[0] for d in data], torch.from_numpy(np.stack([d[1] for d in data]))
    taps = default_taps(model.config.num_hidden_layers)
    logger.info("%d train / %d test images; encoding once, taps %s and the final tokens", args.train, args.test, taps)
    features = encode(model, processor, images, (*taps, None))
    train, test = slice(0, args.train), slice(args.train, None)
    width, k = model.config.hidden_size, len(CLASSES)

    torch.manual_seed(0)
    probe = LinearProbeHead(width, k)
    logger.info("linear probe on the final tokens")
    train_head(probe, [features[-1][train]], masks[train], args.epochs, lr=1e-2)
    fpn = FPNHead(width, k, num_taps=len(taps), width=64)
    logger.info("FPN head on layers %s", taps)
    train_head(fpn, [f[train] for f in features[:-1]], masks[train], args.epochs, lr=2e-3)

    size = (args.size, args.size)
    truth = masks[test]
    results = {}
    majority = torch.zeros_like(truth)  # background everywhere
    for name, pred in (
        ("majority class", majority),
        ("linear probe", predict(probe, [features[-1][test]], size)),
        ("FPN head", predict(fpn, [f[test] for f in features[:-1]], size)),
    ):
        results[name] = mean_iou(pred, truth, k)
        logger.info("%-15s mIoU %.3f  pixel accuracy %.3f", name, results[name], pixel_accuracy(pred, truth))
        if name == "linear probe":
            probe_pred = pred
        if name == "FPN head":
            fpn_pred = pred
    row = [images[args.train], PALETTE[truth[0].numpy()], PALETTE[probe_pred[0].numpy()], PALETTE[fpn_pred[0].numpy()]]
    gap = np.full((args.size, 6, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([x for pair in zip(row, [gap] * 4) for x in pair][:-1], axis=1)).save(args.picture)
    logger.info("image | truth | linear probe | FPN head written to %s", args.picture)
    return results


if __name__ == "__main__":
    main()
