"""Forward throughput and memory of this tower vs transformers (sdpa, eager) and timm: same weights, same inputs.

    python benchmarks/throughput.py                       # So400m/14-384 + So400m/16 NaFlex (slow on a 2-core CPU)
    python benchmarks/throughput.py --preset siglip2-base-patch16-224 --naflex-preset siglip2-base-patch16-naflex
    python benchmarks/throughput.py --sections naflex scaling --repeats 1

Every section first checks that each peer's outputs agree with ours (atol 1e-4), then times the median of
--repeats calls after a warm-up call, and measures peak memory in one more call. It prints a Markdown section for
benchmarks/RESULTS.md:

* fixed: final tokens + pooled features per batch size (ours; ours with oneDNN-prepacked weights on CPU; ours with
  compiled layers if --compile; transformers sdpa and eager; timm);
* llava: hidden state -2 without pooling (ours: early exit) vs transformers with ``output_hidden_states=True``;
* naflex: one batch mixing aspect ratios and patch budgets of 64 to 1024 (ours packed) vs transformers' padded
  batch, and vs transformers one image at a time;
* scaling: one image of 256 to 4096 tokens (fixed-resolution tower at larger inputs, position embeddings
  interpolated), time and memory;
* the roofline: fp32 GEMM GFLOP/s of this machine measured in the same run; each row's model FLOP utilisation
  against it. FLOPs come from :func:`siglip2_encoder.models.flops.encoder_flops` (multiply-add = 2, attention included)
  and count useful work only: padding tokens a peer computes are not credited.

Peak memory is what the forward pass allocates on top of what was allocated before it (weights and inputs): on
CPU the largest running total of PyTorch allocations, taken from the profiler's memory events; on CUDA
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import timm
import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from siglip2_encoder import SigLIP2Encoder, config_to_hf, prepack_for_cpu, to_timm_state_dict
from siglip2_encoder.models.flops import encoder_flops

SECTIONS = ("fixed", "llava", "naflex", "scaling")
# (patch budget, aspect ratio h:w) of the mixed NaFlex batch.
NAFLEX_MIX = [(64, 1.0), (128, 0.75), (256, 16 / 9), (256, 1.0), (576, 0.5), (576, 4 / 3), (1024, 1.0), (1024, 9 / 21)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB that ``fn()`` allocates at its peak, beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return peak / 2**20


def gemm_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, repeats, device)
    return 2 * size**3 / seconds / 1e9


def hf_config(ours: SigLIP2Encoder, attn: str):
    cls = transformers.Siglip2VisionConfig if ours.config.naflex else transformers.SiglipVisionConfig
    fields = {k: v for k, v in config_to_hf(ours.config).items() if k not in ("architectures", "model_type")}
    return cls(**fields, attn_implementation=attn)


def build(preset: str, device: torch.device, dtype: torch.dtype, peers: tuple[str, ...], layers: int | None = None):
    """Ours and the requested peers with the same random weights, in eval mode, on ``device`` in ``dtype``
    (``layers``: fewer encoder layers than the preset, for dry runs)."""
    torch.manual_seed(0)
    ours = SigLIP2Encoder.from_preset(preset, **({} if layers is None else {"num_hidden_layers": layers}))
    ours = ours.to(device).eval()
    naflex = ours.config.naflex
    models = {}
    for attn in ("sdpa", "eager"):
        if f"transformers {attn}" in peers:
            cls = transformers.Siglip2VisionModel if naflex else transformers.SiglipVisionModel
            hf = cls(hf_config(ours, attn))
            hf.load_state_dict(ours.state_dict(), strict=True)
            models[f"transformers {attn}"] = hf.to(device=device, dtype=dtype).eval()
    if "timm" in peers and not naflex:
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
            dynamic_img_size=True,
        )
        vit.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
        models["timm"] = vit.to(device=device, dtype=dtype).eval()
    if dtype != torch.float32:
        ours.set_precision(dtype)
    if device.type == "cpu" and dtype == torch.float32 and "prepacked" in peers:
        models["ours, prepacked"] = prepack_for_cpu(ours)
    return ours, models


class Report:
    """Times and measures runs; renders them as a Markdown table once the GEMM roofline is final."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.table: list[tuple[list[str], float | None]] = []  # row cells, with the row's GFLOP/s for "% of GEMM"

    def rows(self, task: str, batch: int, tokens: str, runs: dict[str, Callable], flops: int) -> dict[str, float]:
        """``runs`` maps implementation names to calls, "ours" first; ``flops`` is the useful work of one call.
        Returns each run's peak MiB."""
        seconds, memory = {}, {}
        for name, fn in runs.items():
            seconds[name] = timed(fn, self.args.repeats, self.device)
            memory[name] = peak_mib(fn, self.device)
        for name in runs:
            rate = flops / seconds[name] / 1e9
            cells = [task, str(batch), tokens, name, f"{batch / seconds[name]:.2f}", f"{rate:.0f}"]
            self.table.append((cells + [f"{memory[name]:.0f}", f"{seconds[name] / seconds['ours']:.2f}x"], rate))
            # The table prints at the end (its "% of GEMM" waits for the last roofline measurement): each row also
            # goes to stderr now, so a run stopped by a time limit still leaves its figures in the log.
            print(" | ".join(self.table[-1][0]), file=sys.stderr, flush=True)
        return memory

    def memory_ratio(self, task: str, batch: int, tokens: str, ratio: float) -> None:
        self.table.append(
            ([task, str(batch), tokens, "peak memory ours / transformers", "", "", f"{ratio:.2f}", ""], None)
        )

    def markdown(self, gemm: float) -> list[str]:
        lines = [
            "| task | batch | tokens/image | implementation | images/s | GFLOP/s | % of GEMM | peak MiB "
            "| ours faster by |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for cells, rate in self.table:
            percent = "" if rate is None else f"{100 * rate / gemm:.0f}%"
            lines.append("| " + " | ".join(cells[:6] + [percent] + cells[6:]) + " |")
        return lines


def check(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """fp32: equal within 1e-4. fp16 / bf16: a sanity check at the half type's rounding through a deep random tower
    (5% of the reference's largest value); parity proper is tested in fp32 (tests/test_parity.py)."""
    if ours.dtype == torch.float32:
        atol, rtol = 1e-4, 0.0
    else:
        atol, rtol = 0.05 * max(1.0, ref.float().abs().max().item()), 0.05
    torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def fixed_sections(args, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    wanted = ("prepacked", "transformers sdpa", *args.eager, "timm")
    ours, peers = build(args.preset, device, dtype, wanted, args.layers)
    prepacked = peers.pop("ours, prepacked", None)
    c = ours.config
    tokens = c.position_grid**2
    compiled = None
    if args.compile:
        torch.manual_seed(0)
        overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
        compiled = SigLIP2Encoder.from_preset(args.preset, **overrides).to(device).eval().compile_layers()
    with torch.inference_mode():
        for batch in args.batch_sizes:
            # 378 for So400m/14-384: the pixels the 384 input's patches cover (timm's dynamic size wants a multiple).
            side = c.position_grid * c.patch_size
            x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
            if "fixed" in args.sections:
                mine = ours(x)
                want = peers["transformers sdpa"](x)
                check(mine.last_hidden_state, want.last_hidden_state, "transformers tokens")
                check(mine.pooler_output, want.pooler_output, "transformers pooled")
                check(mine.pooler_output, peers["timm"](x), "timm pooled")
                runs = {"ours": lambda x=x: ours(x)}
                if prepacked is not None:
                    check(prepacked(x).pooler_output, mine.pooler_output, "prepacked")
                    runs["ours, prepacked"] = lambda x=x: prepacked(x)
                if compiled is not None:
                    check(compiled(x).pooler_output, mine.pooler_output, "compiled")
                    runs["ours, compiled layers"] = lambda x=x: compiled(x)
                runs.update({name: (lambda m=m, x=x: m(x)) for name, m in peers.items()})
                report.rows("tokens + pooled", batch, str(tokens), runs, batch * encoder_flops(c, tokens))
            if "llava" in args.sections:
                hf = peers["transformers sdpa"]
                llava = {
                    name: (lambda x=x, m=m: m(x, layers=[-2], return_last=False, return_pooled=False))
                    for name, m in (("ours", ours), ("ours, prepacked", prepacked))
                    if m is not None
                }
                llava["transformers sdpa"] = lambda x=x, hf=hf: hf(x, output_hidden_states=True)
                check(llava["ours"]().hidden_states[-2], hf(x, output_hidden_states=True).hidden_states[-2], "layer -2")
                flops = batch * encoder_flops(c, tokens, layers=c.num_hidden_layers - 1, pooled=False)
                memory = report.rows("LLaVA layer -2", batch, str(tokens), llava, flops)
                report.memory_ratio("LLaVA layer -2", batch, str(tokens), memory["ours"] / memory["transformers sdpa"])
        if "scaling" in args.sections:
            for n in args.tokens:
                side = math.isqrt(n) * c.patch_size
                x = torch.randn(1, 3, side, side, device=device, dtype=dtype)
                hf, vit = peers["transformers sdpa"], peers["timm"]
                mine = ours(x)
                check(mine.pooler_output, hf(x, interpolate_pos_encoding=True).pooler_output, "scaling")
                # timm resizes positions with its own antialiased bicubic (another kernel): timed, not compared.
                runs = {"ours": lambda x=x: ours(x)}
                if prepacked is not None:
                    runs["ours, prepacked"] = lambda x=x: prepacked(x)
                runs |= {
                    "transformers sdpa": lambda x=x, hf=hf: hf(x, interpolate_pos_encoding=True),
                    "timm": lambda x=x, vit=vit: vit(x),
                }
                report.rows("scaling", 1, str(n), runs, encoder_flops(c, n))


def naflex_grid(budget: int, aspect: float) -> tuple[int, int]:
    """The largest (h, w) grid with h / w close to ``aspect`` and h * w <= budget."""
    h = max(1, round(math.sqrt(budget * aspect)))
    return h, max(1, budget // h)


def naflex_section(args, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    ours, peers = build(args.naflex_preset, device, dtype, ("prepacked", "transformers sdpa", *args.eager), args.layers)
    prepacked = peers.pop("ours, prepacked", None)
    c = ours.config
    grids = [naflex_grid(budget, aspect) for budget, aspect in NAFLEX_MIX]
    length = max(budget for budget, _ in NAFLEX_MIX)
    counts = torch.tensor([h * w for h, w in grids])
    mask = (torch.arange(length) < counts[:, None]).to(device)
    pixels = torch.randn(len(grids), length, c.num_channels * c.patch_size**2, device=device, dtype=dtype)
    pixels[~mask] = 0
    inputs = {
        "pixel_values": pixels,
        "spatial_shapes": torch.tensor(grids, device=device),
        "pixel_attention_mask": mask,
    }
    singles = [
        {
            "pixel_values": pixels[b : b + 1, :n],
            "spatial_shapes": torch.tensor([grid], device=device),
            "pixel_attention_mask": mask[b : b + 1, :n],
        }
        for b, (grid, n) in enumerate(zip(grids, counts.tolist()))
    ]
    with torch.inference_mode():
        mine = ours(**inputs)
        for name, hf in peers.items():
            want = hf(**inputs)
            check(mine.last_hidden_state[mask], want.last_hidden_state[mask], f"{name} tokens")
            check(mine.pooler_output, want.pooler_output, f"{name} pooled")
        runs = {"ours": lambda: ours(**inputs)}
        if prepacked is not None:
            check(prepacked(**inputs).pooler_output, mine.pooler_output, "prepacked")
            runs["ours, prepacked"] = lambda: prepacked(**inputs)
        runs.update({f"{name}, padded batch": (lambda hf=hf: hf(**inputs)) for name, hf in peers.items()})
        hf = peers["transformers sdpa"]
        runs["transformers sdpa, one image at a time"] = lambda: [hf(**single) for single in singles]
        flops = sum(encoder_flops(c, n) for n in counts.tolist())
        tokens = f"{min(counts.tolist())}-{max(counts.tolist())} (mean {counts.float().mean():.0f})"
        report.rows("NaFlex mixed", len(grids), tokens, runs, flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-so400m-patch14-384", help="fixed-resolution tower")
    parser.add_argument("--naflex-preset", default="siglip2-so400m-patch16-naflex")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 576, 1024, 2304, 4096], help="scaling")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile'd layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--no-eager", action="store_true", help="leave out transformers eager (slow at large batches)")
    parser.add_argument("--layers", type=int, help="fewer encoder layers than the presets (dry runs)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the square GEMM measured as the ceiling")
    args = parser.parse_args()
    args.eager = () if args.no_eager else ("transformers eager",)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gemm = gemm_gflops(device, dtype, args.gemm_size)
    report = Report(args, device)
    if {"fixed", "llava", "scaling"} & set(args.sections):
        fixed_sections(args, report, device, dtype)
    if "naflex" in args.sections:
        naflex_section(args, report, device, dtype)
    # The roofline is the better of a measurement before and one after: a single one can catch a busy moment.
    gemm = max(gemm, gemm_gflops(device, dtype, args.gemm_size))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        "\n".join(
            [
                f"### Forward throughput: {args.preset} / {args.naflex_preset}, {args.device}, {args.dtype}",
                "",
                f"{date.today()}, {where}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
                f"transformers {transformers.__version__}, timm {timm.__version__}. Same random weights and inputs "
                f"for all; outputs checked equal before timing (fp32: atol 1e-4; fp16 / bf16: within 5%). Median "
                f"of {args.repeats} runs after a warm-up. Measured {args.dtype} GEMM ({args.gemm_size}^3): "
                f"{gemm:.0f} GFLOP/s. Sections: {' '.join(args.sections)}.",
                "",
                *report.markdown(gemm),
            ]
        )
    )


if __name__ == "__main__":
    main()
