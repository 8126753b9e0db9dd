"""int8 inference (torchao) vs fp32: speed and the fidelity of the features, in one run on the same weights.

    python benchmarks/quantization.py [--preset siglip2-base-patch16-224] [--images 200]

Random weights (no download here), generated images (smooth shapes plus noise). Fidelity: cosine similarity of
pooled features and of patch tokens to fp32; agreement of each image's nearest neighbour among the others (pooled
features, cosine) with fp32's; agreement of the top-1 "label" among 100 fixed random unit vectors standing in for a
zero-shot label set. Speed: median of 3 timed forward passes after a warm-up, batch 1 and 8.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from siglip2_encoder import ImageProcessor, SigLIP2Encoder
from siglip2_encoder.export.quantize import quantize


def images(count: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        yy, xx = np.mgrid[0:size, 0:size]
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.1, 0.3) * size
        colour = rng.integers(0, 256, 3)
        base = np.where(((xx - cx) ** 2 + (yy - cy) ** 2 < r**2)[..., None], colour, rng.integers(0, 256, 3))
        out.append(np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8))
    return out


def seconds(model: SigLIP2Encoder, x: torch.Tensor) -> float:
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return float(np.median(times))


def features(model: SigLIP2Encoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pooled, tokens = [], []
    with torch.inference_mode():
        for batch in pixels.split(16):
            out = model(batch)
            pooled.append(out.pooler_output)
            tokens.append(out.last_hidden_state)
    return torch.cat(pooled), torch.cat(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-base-patch16-224")
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SigLIP2Encoder.from_preset(args.preset).eval()
    processor = ImageProcessor.from_preset(args.preset)
    size = model.config.image_size
    pixels = processor(images(args.images, size)).pixel_values
    labels = F.normalize(torch.randn(100, model.config.hidden_size, generator=torch.Generator().manual_seed(1)), dim=-1)
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.preset}, {args.images} images"
    )
    print(
        "| scheme | batch 1 s | vs fp32 | batch 8 s | vs fp32 | cos pooled (min / mean) | cos tokens (min / mean) "
        "| NN agreement | top-1 agreement |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    pooled32, tokens32 = features(model, pixels)
    base = {b: seconds(model, pixels[:b]) for b in (1, 8)}

    def neighbours(pooled: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(pooled, dim=-1) @ F.normalize(pooled, dim=-1).T
        return sims.fill_diagonal_(-2).argmax(1)

    nn32, top32 = neighbours(pooled32), (F.normalize(pooled32, dim=-1) @ labels.T).argmax(1)
    for scheme in ("fp32", "int8-weight", "int8"):
        candidate = model if scheme == "fp32" else quantize(model, scheme)
        times = {b: seconds(candidate, pixels[:b]) for b in (1, 8)}
        pooled, tokens = features(candidate, pixels)
        cp = F.cosine_similarity(pooled, pooled32)
        ct = F.cosine_similarity(tokens, tokens32, dim=-1)
        nn_agree = (neighbours(pooled) == nn32).float().mean().item()
        top_agree = ((F.normalize(pooled, dim=-1) @ labels.T).argmax(1) == top32).float().mean().item()
        print(
            f"| {scheme} | {times[1]:.3f} | {base[1] / times[1]:.2f}x | {times[8]:.3f} | {base[8] / times[8]:.2f}x | "
            f"{cp.min():.5f} / {cp.mean():.5f} | {ct.min():.5f} / {ct.mean():.5f} | {nn_agree:.3f} | {top_agree:.3f} |"
        )


if __name__ == "__main__":
    main()
