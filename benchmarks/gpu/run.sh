#!/usr/bin/env bash
# Every CUDA path and every GPU figure, in one call to a lent GPU machine, within 8 minutes:
#
#   benchmarks/gpu/run.sh              # on the GPU machine: writes under $OUT (the device tool's folder)
#   benchmarks/gpu/run.sh --dry-run    # the same steps on this CPU with tiny models (tests/test_gpu_script.py)
#   benchmarks/gpu/run.sh --only cuda_tests,loss   # just these steps: a rerun of what failed, in less device time
#
# Installs nothing and reaches no network: the package runs from the working tree (PYTHONPATH), and the peers the
# machine lacks come as wheels in benchmarks/gpu/wheels/ (benchmarks/gpu/fetch_wheels.sh, run here first; carry that
# folder), unpacked into a temporary folder on PYTHONPATH. Each step has its
# own time limit and writes its output to $OUT/<step>.md (stderr to $OUT/log.txt); $OUT/summary.txt says each
# step's exit status and seconds. A step that fails or runs out of time does not stop the next one.
set -u
cd "$(dirname "$0")/../.."
STEPS=",versions,cuda_tests,so400m,b16,extract,loss,"
DRY=0 ONLY=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --only) ONLY=",${2:-},"; shift ;;
        *) echo "unknown option $1: use --dry-run and/or --only STEP[,STEP...]" >&2; exit 2 ;;
    esac
    shift
done
for name in ${ONLY//,/ }; do
    if [[ $STEPS != *",$name,"* ]]; then
        echo "--only $name: no such step; the steps are ${STEPS:1:-1}" >&2
        exit 2
    fi
done
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}  # the GPU machine's torch is its python3 (it may have no `python`)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WHEELS=$(mktemp -d)
for wheel in benchmarks/gpu/wheels/*.whl; do
    [[ -e $wheel ]] && "$PY" -m zipfile -e "$wheel" "$WHEELS" && PYTHONPATH="$PYTHONPATH:$WHEELS"
done
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, stdout to $OUT/NAME.md
    local name=$1 limit=$2 start=$SECONDS
    [[ -n $ONLY && $ONLY != *",$name,"* ]] && return 0
    shift 2
    echo "== $name: $*" >> "$OUT/log.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.md" 2>> "$OUT/log.txt"
    echo "$name rc=$? seconds=$((SECONDS - start)) limit=$limit" >> "$OUT/summary.txt"
}

if [[ $DRY == 1 ]]; then
    step versions 60 "$PY" benchmarks/gpu/versions.py --dry-run
    step cuda_tests 120 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
    step so400m 120 "$PY" benchmarks/throughput.py --device cpu --dtype fp32 --layers 1 --no-eager \
        --preset siglip2-base-patch16-224 --naflex-preset siglip2-base-patch16-naflex --sections fixed naflex \
        --batch-sizes 1 2 --repeats 1 --gemm-size 256
    step extract 120 "$PY" benchmarks/gpu/extract_jpeg.py --device cpu --dtype fp32 --layers 1 --images 16 \
        --batch-size 8 --workers 1
    step loss 120 env TRITON_INTERPRET=1 "$PY" benchmarks/gpu/loss.py --device cpu --dtype fp32 --batch 256 \
        --check-batch 64 --width 32 --tile 64 --repeats 1
else
    # 30 + 120 + 150 + 60 + 75 + 45 s at most: under 8 minutes.
    step versions 30 "$PY" benchmarks/gpu/versions.py
    step cuda_tests 120 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -rs
    step so400m 150 "$PY" benchmarks/throughput.py --device cuda --dtype bf16 --no-eager \
        --preset siglip2-so400m-patch14-384 --naflex-preset siglip2-so400m-patch16-naflex --sections fixed naflex \
        --batch-sizes 1 64 256 --repeats 5 --gemm-size 8192
    step b16 60 "$PY" benchmarks/throughput.py --device cuda --dtype bf16 --no-eager \
        --preset siglip2-base-patch16-224 --sections fixed --batch-sizes 1 64 256 --repeats 5 --gemm-size 8192
    step extract 75 "$PY" benchmarks/gpu/extract_jpeg.py --device cuda --dtype bf16 --images 8192 \
        --batch-size 256 --workers 14
    step loss 45 "$PY" benchmarks/gpu/loss.py --device cuda --dtype bf16 --batch 65536 --check-batch 8192 \
        --width 768 --tile 4096 --repeats 3
fi
cat "$OUT/summary.txt"
! grep -qv " rc=0 " "$OUT/summary.txt"
