"""Time to the LLM's first token with and without token reduction (VisionZip-style pruning after the tower): a
So400m/14-384 tower, an MLP projector and a Qwen2-0.5B-shaped Llama (random weights), one 384 x 384 image and a
16-word prompt, fp32. Prints a Markdown section.

    python benchmarks/reduction.py                 # 729 tokens vs pruned to 256 / 128 / 64
    python benchmarks/reduction.py --lm-layers 4   # a shallower LM (say so)

Each row: the median of --repeats runs after a warm-up of the whole path - preprocessing excluded - from pixels to the
first generated token's logits (the tower, the pooling head's ranking when pruning, the projector, the LM's prefill).
Random weights say nothing of accuracy; the logits' cosine to the unreduced run is printed only to show the path runs.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.adapters import MLPConfig, build_projector
from siglip2_encoder.integrations.llava import VisionLanguageModel
from siglip2_encoder.integrations.reduction import TokenPruning

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
VISIONZIP = ((216, 40), (108, 20), (54, 10))  # (dominant, contextual): VisionZip's 256, 128 and 64 tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-so400m-patch14-384")
    parser.add_argument("--lm-layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    tower = SigLIP2Encoder.from_preset(args.preset).eval()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, num_hidden_layers=args.lm_layers, **QWEN2_05B)).eval()
    projector = build_projector(MLPConfig(in_features=tower.config.hidden_size, out_features=lm.config.hidden_size))
    side = tower.config.position_grid
    pixels = torch.randn(1, 3, tower.config.image_size, tower.config.image_size)
    text = torch.randint(10, 32000, (1, 16))

    def run(reduction: TokenPruning | None) -> tuple[float, torch.Tensor, int]:
        model = VisionLanguageModel(tower, projector, lm, image_token_id=1, reduction=reduction).eval()
        count = side * side if reduction is None else reduction.num_tokens(side * side)
        ids = torch.cat([torch.ones(1, count, dtype=torch.long), text], dim=1)

        def first_token() -> torch.Tensor:
            return model(ids, pixel_values=pixels).logits[0, -1]

        first_token()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            logits = first_token()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2], logits, count

    with torch.inference_mode():
        base, base_logits, tokens = run(None)
        rows = [f"| none | {tokens} | {base:.2f} | 1.00x | 1.000 |"]
        for dominant, contextual in VISIONZIP:
            seconds, logits, count = run(TokenPruning(dominant, contextual))
            cosine = torch.nn.functional.cosine_similarity(logits, base_logits, dim=0)
            rows.append(
                f"| {dominant} + {contextual} | {count} | {seconds:.2f} | {base / seconds:.2f}x | {cosine:.3f} |"
            )
    print(
        "\n".join(
            [
                f"### Time to the first token with token reduction: {args.preset} + a Qwen2-0.5B-shaped Llama "
                f"({args.lm_layers} layers), cpu, fp32",
                "",
                f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
                f"transformers {transformers.__version__}. One image, 16 text tokens, random weights; median of "
                f"{args.repeats} after a warm-up.",
                "",
                "| kept (dominant + contextual) | image tokens to the LLM | seconds to the first token | faster by "
                "| logits' cosine to no reduction (random weights) |",
                "|---|---|---|---|---|",
                *rows,
            ]
        )
    )


if __name__ == "__main__":
    main()
