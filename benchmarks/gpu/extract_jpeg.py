"""End-to-end extraction from JPEG files: is it bound by decoding? Prints a Markdown section.

    python benchmarks/gpu/extract_jpeg.py --device cuda --dtype bf16            # on a GPU machine (run.sh does this)
    python benchmarks/gpu/extract_jpeg.py --device cpu --dtype fp32 --images 16 --layers 1 --workers 1  # dry run

Three rates on the same generated JPEG files (smooth colour fields + noise, 640x480, quality 90) and the same
random-weight tower:

* the tower alone on pixels already on the device (the ceiling);
* ``extract`` as users run it: PIL decoding (EXIF orientation applied) and the checkpoint's preprocessing in
  --workers processes, the tower on the device, features written to safetensors shards;
* decoding on the GPU: ``torchvision.io.decode_jpeg(device="cuda")`` on batches of file bytes, then the same resize
  (torchvision, antialiased) and normalisation on the GPU. torchvision 0.29 deprecates it for TorchCodec; it applies
  no EXIF orientation; its IDCT and upsampling differ from libjpeg's, so pixels differ from PIL's: the section reports
  by how much (0-255 units after preprocessing) and what that does to the pooled features (cosine similarity).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from siglip2_encoder import ImageProcessor, SigLIP2Encoder
from siglip2_encoder.data.processor import resize
from siglip2_encoder.pipeline.extract import extract
from siglip2_encoder.pipeline.settings import ExtractSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _write(job: tuple[str, int]) -> None:
    path, seed = job
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    phase = rng.uniform(0, 6, 3)
    base = np.stack([np.sin(xx / (20 + 7 * c) + yy / (30 + 5 * c) + phase[c]) for c in range(3)], -1) * 90 + 128
    noise = rng.integers(-12, 13, base.shape, dtype=np.int16)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpegs(folder: Path, count: int) -> list[str]:
    """``count`` different 640x480 JPEG files, written by a process per core."""
    paths = [str(folder / f"{i:05d}.jpg") for i in range(count)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write, [(path, i) for i, path in enumerate(paths)], chunksize=16))
    return paths


def gpu_preprocess(data: list[torch.Tensor], processor: ImageProcessor, device: torch.device) -> torch.Tensor:
    """File bytes -> (B, 3, H, W) normalised pixels, decoded and resized on ``device``."""
    config = processor.config
    decoded = torchvision.io.decode_jpeg(data, device=device, mode=torchvision.io.ImageReadMode.RGB)
    resized = torch.stack([resize(image, config.image_size, config.resample) for image in decoded]).float()
    mean = torch.tensor(config.image_mean, device=device)[:, None, None] / config.rescale_factor
    std = torch.tensor(config.image_std, device=device)[:, None, None] / config.rescale_factor
    return (resized - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-base-patch16-224")
    parser.add_argument("--layers", type=int, help="fewer encoder layers (dry runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=12, help="decoding processes for extract")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scratch = tempfile.TemporaryDirectory(prefix="jpeg_bench_")  # deleted when the program ends
    folder = Path(scratch.name)
    paths = write_jpegs(folder, args.images)
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    torch.manual_seed(0)
    tower = SigLIP2Encoder.from_preset(args.preset, **overrides)
    processor = ImageProcessor(tower.processor_config)
    model = tower.to(device).set_precision(dtype).eval()

    # The ceiling: the tower on pixels already there.
    pixels = torch.randn(args.batch_size, 3, *processor.config.image_size, device=device)
    with torch.inference_mode():
        model(pixels)
        sync()
        start = time.perf_counter()
        for _ in range(max(1, args.images // args.batch_size)):
            model(pixels)
        sync()
    tower_rate = max(1, args.images // args.batch_size) * args.batch_size / (time.perf_counter() - start)

    settings = ExtractSettings(model=args.preset, random_weights=True, device=args.device, dtype=args.dtype,
                               batch_size=args.batch_size)  # fmt: skip
    start = time.perf_counter()
    extract(paths, folder / "features", model, processor, settings, num_workers=args.workers, progress=False)
    extract_rate = len(paths) / (time.perf_counter() - start)

    blobs = [torchvision.io.read_file(path) for path in paths]  # bytes read up front: decoding is what is measured
    with torch.inference_mode():
        model(gpu_preprocess(blobs[: args.batch_size], processor, device))  # warm-up
        sync()
        start = time.perf_counter()
        for i in range(0, len(blobs), args.batch_size):
            model(gpu_preprocess(blobs[i : i + args.batch_size], processor, device))
        sync()
        gpu_rate = len(blobs) / (time.perf_counter() - start)

        sample = paths[:32]
        on_cpu = processor([Image.open(path).convert("RGB") for path in sample])["pixel_values"].to(device)
        on_gpu = gpu_preprocess(blobs[:32], processor, device)
        std = torch.tensor(processor.config.image_std, device=device)[:, None, None] / processor.config.rescale_factor
        difference = ((on_gpu - on_cpu) * std).abs()  # in 0-255 units
        cosine = F.cosine_similarity(model(on_cpu).pooler_output.float(), model(on_gpu).pooler_output.float())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        "\n".join(
            [
                f"### Extraction from JPEG files: {args.preset}, {where}, {args.dtype}",
                "",
                f"{len(paths)} JPEG files 640x480, batch {args.batch_size}, {args.workers} decoding processes for "
                f"extract; torch {torch.__version__}, torchvision {torchvision.__version__}.",
                "",
                "| path | images/s | of the tower alone |",
                "|---|---|---|",
                f"| the tower alone, pixels on the device | {tower_rate:.0f} | 100% |",
                f"| `extract`: PIL decoding in {args.workers} processes | {extract_rate:.0f} | "
                f"{100 * extract_rate / tower_rate:.0f}% |",
                f"| decode_jpeg on the {device.type} + resize there | {gpu_rate:.0f} | "
                f"{100 * gpu_rate / tower_rate:.0f}% |",
                "",
                f"Pixels, {device.type} decoding vs PIL ({len(sample)} images, after resize, 0-255 units): mean |diff| "
                f"{difference.mean():.2f}, max {difference.max():.1f}; pooled features' cosine similarity min "
                f"{cosine.min():.5f}, mean {cosine.mean():.5f}.",
            ]
        )
    )


if __name__ == "__main__":
    main()
