"""What the machine holds, checked before anything runs (benchmarks/gpu/run.sh's first step): prints a Markdown
section; exits 1 when this package or torch cannot be imported, or (without --dry-run) when there is no CUDA device."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from importlib import metadata


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="a CPU machine is expected")
    args = parser.parse_args()
    import torch

    import siglip2_encoder  # from the working tree (PYTHONPATH): nothing is installed there

    cuda = torch.cuda.is_available()
    lines = [
        "### The machine",
        "",
        f"- GPU: {torch.cuda.get_device_name(0) if cuda else 'none'}; CUDA {torch.version.cuda}; "
        f"Python {platform.python_version()}; siglip2-encoder from {siglip2_encoder.__file__}",
        "- " + ", ".join(f"{name} {version(name)}" for name in
                         ("torch", "torchvision", "transformers", "timm", "peft", "triton", "onnxruntime",
                          "siglip-kernel")),
        f"- torch varlen attention: {importlib.util.find_spec('torch.nn.attention.varlen') is not None}; "
        f"flash-attn: {version('flash-attn')}; NCCL: {torch.distributed.is_nccl_available()}",
    ]  # fmt: skip
    print("\n".join(lines))
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
