#!/usr/bin/env bash
# llama.cpp for tests/test_gguf.py, from the llama-cpp-python sdist on PyPI, which vendors llama.cpp's tree (the
# registries reach PyPI, not GitHub). Pinned, so every run converts and runs with the same code:
# - its HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py) into DEST;
# - llama-cpp-python itself, built from that sdist into the active environment: its bindings load libllama and
#   libmtmd (llama.cpp's multimodal library), which the tests run the converted GGUFs with;
# - llama.cpp's own programs, llama-mtmd-cli (its multimodal command line) and llama-server (its OpenAI-compatible
#   server), built from the same tree into DEST/bin (linked statically, without the server's web page).
# The builds take about 5 and 7 minutes on 2 cores (a C++ compiler and CMake); each is skipped when its result is there.
# Usage: bash tests/install_llama_cpp.sh DEST (default .venv/llama.cpp)
set -euo pipefail
version=0.3.36
dest=${1:-.venv/llama.cpp}
installed=$(python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)
programs=(llama-mtmd-cli llama-server)
built=true
for program in "${programs[@]}"; do [ -x "$dest/bin/$program" ] || built=false; done
if [ -f "$dest/convert_hf_to_gguf.py" ] && [ "$installed" = "$version" ] && $built; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
sdist="$tmp/llama_cpp_python-$version.tar.gz"
mkdir -p "$dest"
tree="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$sdist" -C "$dest" --strip-components=3 \
    "$tree/convert_hf_to_gguf.py" "$tree/conversion" "$tree/gguf-py" "$tree/LICENSE"
jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
if [ "$installed" != "$version" ]; then
    CMAKE_BUILD_PARALLEL_LEVEL=$jobs pip install -q "$sdist"
fi
if ! $built; then
    tar -xzf "$sdist" -C "$tmp"
    options=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF
        -DLLAMA_USE_PREBUILT_UI=OFF)
    cmake -S "$tmp/$tree" -B "$tmp/build" "${options[@]}" > "$tmp/cmake.log" 2>&1 ||
        { tail -50 "$tmp/cmake.log"; exit 1; }
    cmake --build "$tmp/build" --target "${programs[@]}" -j "$jobs" > "$tmp/build.log" 2>&1 ||
        { tail -50 "$tmp/build.log"; exit 1; }
    mkdir -p "$dest/bin"
    for program in "${programs[@]}"; do cp "$tmp/build/bin/$program" "$dest/bin/"; done
fi
