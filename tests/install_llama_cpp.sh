#!/usr/bin/env bash
# llama.cpp for tests/test_gguf.py, from the llama-cpp-python sdist on PyPI, which vendors llama.cpp's tree (the
# registries reach PyPI, not GitHub). Pinned, so every run converts and runs with the same code:
# - its HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py) into DEST;
# - llama-cpp-python itself, built from that sdist into the active environment: its bindings load libllama and
#   libmtmd (llama.cpp's multimodal library), which the tests run the converted GGUFs with. The build takes about
#   5 minutes on 2 cores (a C++ compiler and CMake); it is skipped when that version is installed.
# Usage: bash tests/install_llama_cpp.sh DEST (default .venv/llama.cpp)
set -euo pipefail
version=0.3.36
dest=${1:-.venv/llama.cpp}
installed=$(python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)
if [ -f "$dest/convert_hf_to_gguf.py" ] && [ "$installed" = "$version" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
sdist="$tmp/llama_cpp_python-$version.tar.gz"
mkdir -p "$dest"
tree="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$sdist" -C "$dest" --strip-components=3 \
    "$tree/convert_hf_to_gguf.py" "$tree/conversion" "$tree/gguf-py" "$tree/LICENSE"
if [ "$installed" != "$version" ]; then
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} pip install -q "$sdist"
fi
