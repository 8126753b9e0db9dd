"""Aria-style views, each image on its own grid: this library (its processor's patches, the tower run packed: every
layer sees only real tokens) vs transformers (AriaImageProcessor's padded batch, the Idefics3 tower with the patch
mask Aria's model builds from it), on the same random weights and images. Prints a Markdown section.

    python benchmarks/own_grids.py               # So400m/14 width at Aria's 490 px side, 27 layers
    python benchmarks/own_grids.py --layers 6    # a shallower tower (say so)

Images: a 4:3 landscape, a 3:4 portrait, a 16:9 frame and a square photo size (grids 27x35, 35x27, 24x35, 35x35:
3,955 real patches of the 4,900 the padded batch holds). Each row: the median of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import numpy as np
import torch
import transformers
from timing import median_seconds
from transformers import AriaImageProcessor, Idefics3VisionConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

from siglip2_encoder import ImageProcessor, SigLIP2Encoder

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14)
SIZES = [(480, 640), (640, 480), (1080, 1920), (800, 800)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/own_grids_tower")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Idefics3VisionConfig(**SO400M, num_hidden_layers=args.layers, image_size=490)
    theirs = Idefics3VisionTransformer._from_config(config, attn_implementation="sdpa").eval()
    theirs.save_pretrained(args.out)
    image_processor = AriaImageProcessor(max_image_size=490)
    image_processor.save_pretrained(args.out)
    ours = SigLIP2Encoder.from_pretrained(args.out).eval()
    processor = ImageProcessor.from_pretrained(args.out)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]

    def their_inputs():
        batch = image_processor(images, return_tensors="pt")
        mask = batch["pixel_mask"].unfold(1, 14, 14).unfold(2, 14, 14).sum((-1, -2)) > 0  # as AriaModel builds it
        return batch["pixel_values"], mask

    pixels, mask = their_inputs()
    inputs = processor(images)
    with torch.inference_mode():
        want = theirs(pixels, patch_attention_mask=mask).last_hidden_state
        got = ours(**inputs, return_pooled=False).last_hidden_state
        error = max(
            (got[i, : h * w] - want[i][mask[i].flatten()]).abs().max().item()
            for i, (h, w) in enumerate(inputs.spatial_shapes.tolist())
        )
        tower_theirs = median_seconds(lambda: theirs(pixels, patch_attention_mask=mask), args.repeats)
        tower_ours = median_seconds(lambda: ours(**inputs, return_pooled=False), args.repeats)
    prep_theirs = median_seconds(their_inputs, args.repeats)
    prep_ours = median_seconds(lambda: processor(images), args.repeats)
    real, padded = int(inputs.pixel_attention_mask.sum()), mask.numel()
    print(
        f"### Aria's views, each image on its own grid: So400m/14 width, {args.layers} layers, 490 px side, "
        f"{len(images)} images, cpu, fp32\n\n"
        f"{date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__} (sdpa). {real} real patches of the "
        f"{padded} transformers' padded batch holds; real tokens differ by at most {error:.1e}.\n"
    )
    print("| step | transformers (s) | ours (s) | ours faster |\n|---|---|---|---|")
    print(f"| tower | {tower_theirs:.2f} | {tower_ours:.2f} | {tower_theirs / tower_ours:.2f}x |")
    print(f"| preprocessing | {prep_theirs:.3f} | {prep_ours:.3f} | {prep_theirs / prep_ours:.2f}x |")


if __name__ == "__main__":
    main()
