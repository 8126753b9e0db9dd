#!/usr/bin/env bash
# The packages benchmarks/gpu/run.sh compares with that the GPU machine lacks, as wheels under
# benchmarks/gpu/wheels/ (ignored by git): run here, where PyPI is reachable, then carry that folder to the device
# (the device tool's `carry`). run.sh unpacks them into a temporary folder on PYTHONPATH; it installs nothing.
#   siglip-kernel 0.1.2: fused Triton kernels for the SigLIP loss (pure Python, Apache-2.0), the loss's GPU peer.
set -eu
cd "$(dirname "$0")"
python -m pip download --quiet --no-deps --dest wheels "siglip-kernel==0.1.2"
ls wheels
