"""Is the working tree slower than an earlier revision? Both run in one process, on the same weights and inputs,
timed alternately so that machine noise hits both alike.

    python benchmarks/regression.py --against e3e52f7
    python benchmarks/regression.py --against HEAD~3 --preset siglip2-so400m-patch14-384 --rounds 5

The earlier revision's package is taken with ``git archive`` into a temporary folder and imported under another
name (its imports are relative). Each case is timed ``--rounds`` times per version, alternating which runs first;
the report gives each version's median time and the median of the per-round ratios (earlier / now: above 1, the
working tree is faster). Outputs are checked equal first (atol 1e-4).
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import siglip2_encoder

ROOT = Path(__file__).resolve().parents[1]


def import_revision(revision: str, folder: Path):
    """The package as it was at ``revision``, imported as ``siglip2_encoder_<short hash>``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "siglip2_encoder"], capture_output=True, check=True
    ).stdout
    short = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", revision], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    name = f"siglip2_encoder_{short}"
    (folder / "siglip2_encoder").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name), short


def cases(preset: str, naflex_preset: str) -> list[tuple[str, str, dict, dict]]:
    """(name, preset, inputs, forward keyword arguments)."""
    generator = torch.Generator().manual_seed(0)
    size = siglip2_encoder.get_preset(preset).config.image_size
    mixed = [torch.rand(3, 16 * h, 16 * w, generator=generator) for h, w in [(8, 8), (4, 16), (16, 16), (32, 32)] * 2]
    out = []
    for batch in (1, 8):
        x = torch.rand(batch, 3, size, size, generator=generator)
        out.append((f"tokens + pooled, batch {batch}", preset, {"pixel_values": x}, {}))
    out.append(("LLaVA layer -2, batch 8", preset, {"pixel_values": x}, {"layers": [-2], "return_last": False}))
    out.append(("NaFlex mixed, 8 images", naflex_preset, {"pixel_values": mixed}, {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the earlier git revision")
    parser.add_argument("--preset", default="siglip2-base-patch16-224")
    parser.add_argument("--naflex-preset", default="siglip2-base-patch16-naflex")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        earlier, short = import_revision(args.against, Path(folder))
        print(f"### Regression check: working tree vs {short}, cpu, fp32, {torch.get_num_threads()} threads\n")
        print(f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__}; {args.rounds} alternating rounds per case.\n")
        print(f"| case | {short} ms | now ms | {short} / now (median of rounds) |")
        print("|---|---|---|---|")
        for name, preset, inputs, kwargs in cases(args.preset, args.naflex_preset):
            torch.manual_seed(0)
            now = siglip2_encoder.SigLIP2Encoder.from_preset(preset).eval()
            then = earlier.SigLIP2Encoder.from_preset(preset).eval()
            then.load_state_dict(now.state_dict())
            with torch.inference_mode():
                a, b = then(**inputs, **kwargs), now(**inputs, **kwargs)
                for x, y in ((a.pooler_output, b.pooler_output), (a.hidden_states.get(-2), b.hidden_states.get(-2))):
                    if x is not None:
                        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
                times: dict[str, list[float]] = {"then": [], "now": []}
                for r in range(args.rounds):
                    order = [("then", then), ("now", now)] if r % 2 == 0 else [("now", now), ("then", then)]
                    for key, model in order:
                        started = time.perf_counter()
                        model(**inputs, **kwargs)
                        times[key].append(time.perf_counter() - started)
            ratios = [t / n for t, n in zip(times["then"], times["now"])]
            then_ms, now_ms = (1e3 * statistics.median(times[k]) for k in ("then", "now"))
            print(f"| {name} | {then_ms:.0f} | {now_ms:.0f} | {statistics.median(ratios):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
