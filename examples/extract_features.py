"""Extract SigLIP 2 features from images: pooled features, final patch tokens and the LLaVA-style layer -2.

    python examples/extract_features.py --model google/siglip2-so400m-patch14-384 photo.jpg
    python examples/extract_features.py --random-weights siglip2-so400m-patch14-384   # offline, meaningless features

Without image paths, a generated picture is used. Features are written to a safetensors file.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from siglip2_encoder import CheckpointError, ImageProcessor, SigLIP2Encoder, list_presets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files (default: one generated picture)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="google/siglip2-so400m-patch14-384", help="Hub id or local folder")
    source.add_argument("--random-weights", metavar="PRESET", choices=list_presets(), help="no download; fake weights")
    parser.add_argument("--layer", type=int, default=-2, help="hidden state to save besides the final tokens")
    parser.add_argument("--out", default="features.safetensors")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.random_weights:
        logging.warning("RANDOM WEIGHTS (%s): the features are meaningless", args.random_weights)
        model = SigLIP2Encoder.from_preset(args.random_weights).eval()
        processor = ImageProcessor.from_preset(args.random_weights)
    else:
        try:
            model = SigLIP2Encoder.from_pretrained(args.model)
            processor = ImageProcessor.from_pretrained(args.model)
        except CheckpointError as err:
            raise SystemExit(f"error: {err}\nOffline? Run with --random-weights siglip2-so400m-patch14-384") from None

    if args.images:
        images = [Image.open(path) for path in args.images]
    else:
        yy, xx = np.mgrid[0:300, 0:400]
        images = [np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)]
    with torch.inference_mode():
        out = model(**processor(images), layers=[args.layer])
    features = {
        "pooled": out.pooler_output,
        "tokens": out.last_hidden_state,
        f"layer{args.layer}": out.tokens(args.layer),
    }
    for name, tensor in features.items():
        logging.info("%-8s %s", name, tuple(tensor.shape))
    save_file({k: v.contiguous() for k, v in features.items()}, args.out)
    logging.info("token grids %s, written to %s", out.grids, args.out)


if __name__ == "__main__":
    main()
