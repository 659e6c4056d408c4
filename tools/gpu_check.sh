#!/usr/bin/env bash
# The GPU measurements of this repository in one run of at most 8 minutes: each part has its own
# timeout (they add up to 475 s), parts are independent (one failing or timing out does not stop
# the rest), the most important first: the CUDA tests; the paper-size distill step (P = 256,
# R = 128) eager at B = 8 and 32, compiled at B = 32 and 8; packed vs padded rows at sizes that fit
# a 24 GB and an 80 GB GPU; chunked KD memory and the fused loss; static-cache generation. Logs go to OUT_DIR (default: a new folder under
# ${TMPDIR:-/tmp}, never inside the repository), a log per part, and one table at the end.
# --cpu: every part at tiny sizes on the CPU but the compiled ones (CI runs it: 1-3 minutes),
# so the script itself is known to work before a GPU ever runs it.
#   bash tools/gpu_check.sh [--cpu] [OUT_DIR]
set -uo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then sed -n '2,10p' "$0" | cut -c3-; exit 0; fi
cpu=0
if [[ "${1:-}" == --cpu ]]; then cpu=1; shift; fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
out=${1:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
out="$(realpath -m "$out")"
case "$out/" in "$repo"/*) echo "gpu_check.sh: OUT_DIR $out is inside the repository; give a" \
    "folder outside it" >&2; exit 2;; esac
mkdir -p "$out"
cd "$repo"
: > "$out/summary.txt"
if (( cpu )); then
    echo "CPU mode: tiny sizes" > "$out/machine.txt"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/machine.txt" 2>&1
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    >> "$out/machine.txt" 2>&1
run() {             # run NAME SECONDS CMD...: output to OUT/NAME.txt, a row of the summary table
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    local last
    last=$(grep -E '^\| (paper|pack|kd_memory|decode)' "$out/$name.txt" | tail -n 2 | cut -c1-150 \
           | tr '\n' ' ')
    [[ $rc == 124 ]] && last="timed out after ${limit} s"
    [[ -z "$last" ]] && last=$(tail -n 1 "$out/$name.txt" | cut -c1-150)
    echo "| $name | $rc | $((SECONDS - t0)) | $last |" >> "$out/summary.txt"
}
bench=(python tools/bench.py)
if (( cpu )); then
    # the CUDA tests skip without a GPU: their CPU counterparts (the same forms on the CPU)
    run cuda_tests 120 python -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py \
        tests/test_cuda.py
    paper=(--only=paper --device=cpu --size=tiny --P=16 --R=8 --steps=1 --warmup=0)
    run paper_B8 60 "${bench[@]}" "${paper[@]}" --B=8
    run paper_B32 60 "${bench[@]}" "${paper[@]}" --B=32
    run pack_24GB 60 "${bench[@]}" --only=pack --device=cpu --size=tiny --B=4 --max_len=256 \
        --steps=1
    run kd_memory 60 "${bench[@]}" --only=kd_memory --device=cpu --kd_tokens=64
    run decode 60 "${bench[@]}" --only=decode --device=cpu
else
    run cuda_tests 150 python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        tests/test_gpu_paths.py
    paper=(--only=paper --device=cuda --P=256 --R=128 --steps=10 --warmup=3)
    run paper_B8 35 "${bench[@]}" "${paper[@]}" --B=8
    run paper_B32 45 "${bench[@]}" "${paper[@]}" --B=32
    run paper_B32_compile 75 "${bench[@]}" "${paper[@]}" --B=32 --compile
    run paper_B8_compile 50 "${bench[@]}" "${paper[@]}" --B=8 --compile
    # image splitting makes 76-131 views a row at --max_len=2048: B = 4 fits 24 GB, 12 fits 80 GB
    run pack_24GB 40 "${bench[@]}" --only=pack --device=cuda --B=4 --max_len=2048 --steps=3
    run pack_80GB 30 "${bench[@]}" --only=pack --device=cuda --B=12 --max_len=2048 --steps=3
    run kd_memory 25 "${bench[@]}" --only=kd_memory --device=cuda
    run decode 25 "${bench[@]}" --only=decode --device=cuda
fi
echo
cat "$out/machine.txt"
echo
echo "| part | exit | seconds | result |"
echo "|---|---|---|---|"
cat "$out/summary.txt"
echo
echo "logs: $out"
! grep -qv '^| [A-Za-z0-9_]* | 0 |' "$out/summary.txt"
