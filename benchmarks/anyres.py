"""AnyRes tiling through the tower: one image's views packed in one forward vs one view at a time vs transformers'
``LlavaOnevisionModel.get_image_features``, on the same random weights and pixels. Prints a Markdown section.

    python benchmarks/anyres.py                        # So400m/14-384, the issue's 1152x768 image (7 views)
    python benchmarks/anyres.py --layers 6 --repeats 1  # fewer layers, to fit a short session (say so)

Each run ends with the LLM tokens (after transformers' projector, the same module for both): ours are checked equal
to transformers' (atol 1e-4) before timing. Median of --repeats after a warm-up call.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import numpy as np
import torch
import transformers
from timing import median_seconds
from transformers import LlamaConfig, LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionModel

from siglip2_encoder import ImageProcessor, ProcessorConfig, SigLIP2Encoder, config_to_hf
from siglip2_encoder.integrations.anyres import AnyResTiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-so400m-patch14-384")
    parser.add_argument("--layers", type=int, help="fewer encoder layers than the preset")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    tower = SigLIP2Encoder.from_preset(args.preset, use_head=False, **overrides).eval()
    c = tower.config
    tiling = AnyResTiling.onevision(tile=c.image_size, patch_size=c.patch_size)
    vision = {k: v for k, v in config_to_hf(c).items() if k != "architectures"}
    hf = LlavaOnevisionModel(
        LlavaOnevisionConfig(
            vision_config=vision,
            text_config=LlamaConfig(
                vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
            ).to_dict(),  # fmt: skip
            image_grid_pinpoints=[list(p) for p in tiling.grid_pinpoints],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    ).eval()
    hf.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    processor = ImageProcessor(ProcessorConfig((c.image_size,) * 2, patch_size=c.patch_size, resample="bicubic",
                                               image_mean=mean, image_std=std))  # fmt: skip
    pinpoints = [list(p) for p in tiling.grid_pinpoints]
    their_images = LlavaOnevisionImageProcessor(size={"height": c.image_size, "width": c.image_size},
                                                image_grid_pinpoints=pinpoints)  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    views = tiling.views(image, processor)
    inputs = their_images([image], return_tensors="pt")
    newline = hf.image_newline

    def ours_packed():
        tokens = tower(views, layers=[-1], return_last=False, return_pooled=False).hidden_states[-1]
        return tiling.reassemble(hf.multi_modal_projector(tokens), args.height, args.width, newline)

    def ours_one_at_a_time():
        tokens = [tower(v[None], layers=[-1], return_last=False, return_pooled=False).hidden_states[-1] for v in views]
        return tiling.reassemble(hf.multi_modal_projector(torch.cat(tokens)), args.height, args.width, newline)

    def theirs():
        return hf.get_image_features(**inputs, vision_feature_layer=-1, vision_feature_select_strategy="full",
                                     vision_aspect_ratio=f"anyres_max_{tiling.max_tiles}").pooler_output[0]  # fmt: skip

    with torch.inference_mode():
        want = theirs()
        torch.testing.assert_close(ours_packed(), want, atol=1e-4, rtol=0)
        seconds = {
            "ours, all views packed in one forward": median_seconds(ours_packed, args.repeats),
            "ours, one view at a time": median_seconds(ours_one_at_a_time, args.repeats),
            "transformers LlavaOnevisionModel.get_image_features": median_seconds(theirs, args.repeats),
        }
    base = seconds["ours, all views packed in one forward"]
    depth = f"{c.num_hidden_layers} layers" + (" (fewer than the preset's)" if args.layers else "")
    lines = [
        f"### AnyRes (OneVision): one {args.width}x{args.height} image, {args.preset}, {depth}, cpu, fp32",
        "",
        f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}. {len(views)} views x {tiling.side**2} tokens through the tower, "
        f"{len(want)} LLM tokens; ours checked equal to transformers' (atol 1e-4). Median of {args.repeats} after a "
        f"warm-up.",
        "",
        "| path | seconds | ours packed faster by |",
        "|---|---|---|",
        *(f"| {name} | {s:.2f} | {s / base:.2f}x |" for name, s in seconds.items()),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
