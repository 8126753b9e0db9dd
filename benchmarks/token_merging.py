"""ToMe inside the tower: encoder time to LLaVA's layer -2 features with r tokens merged per layer, against the same
tower without merging, on the same random weights and images. Prints a Markdown section.

    python benchmarks/token_merging.py                  # So400m/14-384, batch 1 and 8, r = 8 / 13 / 16
    python benchmarks/token_merging.py --batch-sizes 1  # shorter

Also the cosine similarity of the pooled features (the head attending proportionally) to the unmerged ones: on
random weights it measures how far merging moves the output, not accuracy. FLOPs count each layer's real tokens
(:func:`siglip2_encoder.models.flops.encoder_flops`, each layer at its input count; the MLP after a merge runs on
fewer, so the true ideal is a little higher): "FLOPs saved" is the speed-up a perfect kernel would give.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import torch
import torch.nn.functional as F
from timing import median_seconds

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.models.flops import encoder_flops
from siglip2_encoder.models.token_merging import TokenMerging, merged_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-so400m-patch14-384")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--r", type=int, nargs="+", default=[8, 13, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    tower = SigLIP2Encoder.from_preset(args.preset).eval()
    c = tower.config
    n, depth = c.position_grid**2, c.num_hidden_layers - 1
    one_layer = encoder_flops(c, n, layers=1, pooled=False) - encoder_flops(c, n, layers=0, pooled=False)
    rows = []
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, c.image_size, c.image_size)
            base = median_seconds(
                lambda x=x: tower(x, layers=[-2], return_last=False, return_pooled=False), args.repeats
            )
            pooled = tower(x).pooler_output
            rows.append(f"| {batch} | none | {n} | {base:.2f} | 1.00x | 1.00x | 1.000 |")
            for r in args.r:
                merging = TokenMerging(r)
                counts = merging.counts(n, depth)
                seconds = median_seconds(lambda x=x, m=merging: merged_forward(tower, x, m, layer=-2), args.repeats)
                merged = merged_forward(tower, x, merging, return_pooled=True).pooled
                cosine = F.cosine_similarity(merged, pooled, dim=-1).mean()
                # per layer, the cost of its input tokens relative to the full count (linear + attention terms)
                flops = sum(
                    encoder_flops(c, k, layers=1, pooled=False) - encoder_flops(c, k, layers=0, pooled=False)
                    for k in counts[:-1]
                )
                ideal = one_layer * depth / flops
                rows.append(
                    f"| {batch} | {r} | {counts[-1]} | {seconds:.2f} | {base / seconds:.2f}x | {ideal:.2f}x "
                    f"| {cosine:.3f} |"
                )
    print(
        "\n".join(
            [
                f"### ToMe in the tower: {args.preset} to LLaVA's layer -2, cpu, fp32",
                "",
                f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}. "
                f"Random weights; median of {args.repeats} after a warm-up. Without merging: the tower's own fast "
                f"path; with: `merged_forward` (SDPA with the size bias).",
                "",
                "| batch | r | tokens at layer -2 | seconds | faster by | FLOPs saved (ideal) "
                "| pooled cosine to unmerged (random weights) |",
                "|---|---|---|---|---|---|---|",
                *rows,
            ]
        )
    )


if __name__ == "__main__":
    main()
