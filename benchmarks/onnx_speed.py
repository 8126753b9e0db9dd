"""onnxruntime on the exported tower vs this library's PyTorch path, CPU, same weights and inputs, same run.

    python benchmarks/onnx_speed.py [--preset siglip2-base-patch16-224]

Outputs are checked equal (atol 1e-4) before timing; median of 5 timed runs after one warm-up, batch 1 and 8,
pooled features.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import onnxruntime
import torch

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.export.onnx_export import export_onnx


def median_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-base-patch16-224")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SigLIP2Encoder.from_preset(args.preset).eval()
    size = model.config.image_size
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {args.preset}"
    )
    print("| batch | ours (PyTorch) s | onnxruntime s | onnxruntime vs ours |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tower.onnx")
        export_onnx(model, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for batch in (1, 8):
            x = torch.randn(batch, 3, size, size)
            with torch.inference_mode():
                want = model(x).pooler_output.numpy()
            got = session.run(None, {"pixel_values": x.numpy()})[0]
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

            def ours(x=x):
                with torch.inference_mode():
                    model(x)

            theirs = median_seconds(lambda x=x: session.run(None, {"pixel_values": x.numpy()}))
            mine = median_seconds(ours)
            print(f"| {batch} | {mine:.3f} | {theirs:.3f} | {mine / theirs:.2f}x |")


if __name__ == "__main__":
    main()
