#!/usr/bin/env bash
# llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py) for tests/test_gguf.py,
# from the llama-cpp-python sdist on PyPI, which vendors llama.cpp's tree: the registries reach PyPI, not GitHub.
# Pinned, so every run converts with the same code. Usage: bash tests/fetch_llama_cpp.sh DEST (default .venv/llama.cpp)
set -euo pipefail
version=0.3.36
dest=${1:-.venv/llama.cpp}
if [ -f "$dest/convert_hf_to_gguf.py" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
mkdir -p "$dest"
tree="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$dest" --strip-components=3 \
    "$tree/convert_hf_to_gguf.py" "$tree/conversion" "$tree/gguf-py" "$tree/LICENSE"
