"""Forward throughput of this tower vs transformers (sdpa, eager) and timm, same weights, same inputs, one run.

    python benchmarks/throughput.py                                   # So400m/14-384 (slow on a 2-core CPU)
    python benchmarks/throughput.py --preset siglip2-base-patch16-224 --batch-sizes 1 8

Measures (median of --repeats after a warm-up), checks every peer's outputs agree with ours first, and prints a
Markdown section for benchmarks/RESULTS.md:

1. final tokens + pooled features, per batch size: images/s, achieved GFLOP/s, ratio to us;
2. LLaVA-style features (hidden state -2, no pooling) vs transformers with ``output_hidden_states=True``;
3. the roofline: measured fp32 GEMM GFLOP/s of this machine, and our model FLOP utilisation against it.

FLOPs come from :func:`siglip2_encoder.flops.encoder_flops` (multiply-add = 2, attention included).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import timm
import torch
import transformers

from siglip2_encoder import SigLIP2Encoder, to_timm_state_dict
from siglip2_encoder.checkpoint import config_to_hf
from siglip2_encoder.flops import encoder_flops


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    seconds = timed(lambda: a @ b, repeats, device)
    return 2 * size**3 / seconds / 1e9


def build(preset: str, device: torch.device):
    """Ours, transformers (sdpa, eager) and timm with the same random weights."""
    torch.manual_seed(0)
    ours = SigLIP2Encoder.from_preset(preset).to(device).eval()
    hf_config = transformers.SiglipVisionConfig(
        **{k: v for k, v in config_to_hf(ours.config).items() if k not in ("architectures", "model_type")}
    )
    peers = {}
    for attn in ("sdpa", "eager"):
        hf = transformers.SiglipVisionModel(hf_config.__class__(**hf_config.to_dict(), attn_implementation=attn))
        hf.load_state_dict(ours.state_dict(), strict=True)
        peers[f"transformers {attn}"] = hf.to(device).eval()
    c = ours.config
    vit = timm.create_model(
        "vit_base_patch16_siglip_224",
        pretrained=False,
        num_classes=0,
        embed_dim=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_ratio=c.intermediate_size / c.hidden_size,
        img_size=c.image_size,
        patch_size=c.patch_size,
        act_layer="gelu_tanh",
    )
    vit.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
    peers["timm"] = vit.to(device).eval()
    return ours, peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-so400m-patch14-384")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    ours, peers = build(args.preset, device)
    c = ours.config
    tokens = c.position_grid**2
    flops_full = encoder_flops(c, tokens)
    flops_llava = encoder_flops(c, tokens, layers=c.num_hidden_layers - 1, pooled=False)
    gemm = gemm_gflops(device)

    lines = [
        f"### Forward throughput: {args.preset} ({tokens} tokens), {args.device}, fp32",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}. Same random weights "
        f"and inputs for all; outputs checked equal (atol 1e-4) before timing. Median of {args.repeats} runs. "
        f"Measured fp32 GEMM (2048^3): {gemm:.0f} GFLOP/s.",
        "",
        "| task | batch | implementation | images/s | GFLOP/s | % of GEMM | ours vs it |",
        "|---|---|---|---|---|---|---|",
    ]

    def rows(task: str, batch: int, runs: dict, flops: int) -> list[str]:
        """Time each run and render its table row, with the ratio of its time to ours."""
        seconds = {name: timed(fn, args.repeats, device) for name, fn in runs.items()}
        out = []
        for name, s in seconds.items():
            rate = flops * batch / s / 1e9
            out.append(
                f"| {task} | {batch} | {name} | {batch / s:.2f} | {rate:.0f} | {100 * rate / gemm:.0f}% | "
                f"{s / seconds['ours']:.2f}x |"
            )
        return out

    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, c.image_size, c.image_size, device=device)
            mine = ours(x)
            want = peers["transformers sdpa"](x)
            torch.testing.assert_close(mine.pooler_output, want.pooler_output, atol=1e-4, rtol=0)
            torch.testing.assert_close(mine.pooler_output, peers["timm"](x), atol=1e-4, rtol=0)
            runs = {"ours": lambda x=x: ours(x)}
            runs.update({name: (lambda m=m, x=x: m(x)) for name, m in peers.items()})
            lines += rows("tokens + pooled", batch, runs, flops_full)

            llava = {
                "ours": lambda x=x: ours(x, layers=[-2], return_last=False, return_pooled=False),
                "transformers sdpa": lambda x=x: peers["transformers sdpa"](x, output_hidden_states=True),
            }
            ref = peers["transformers sdpa"](x, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(llava["ours"]().hidden_states[-2], ref, atol=1e-4, rtol=0)
            lines += rows("LLaVA layer -2", batch, llava, flops_llava)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
