#!/usr/bin/env bash
# The GPU measurements of this repository in one run (README "Tests and limitations"): the CUDA
# tests (fused attention kernels with SDPA's math kernel disabled, CPU == CUDA steps, no host
# sync between prefill and continuation), then the paper-size distill step at B = 8 and 32
# (P = 256, R = 128; eager, --compile), packed vs padded, and the loader at 512 px. Sized for
# about 8 minutes of one GPU (each part has a timeout); written to gpu_check/, a log per part.
#   bash tools/gpu_check.sh [OUT_DIR]
set -uo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then sed -n '2,7p' "$0" | cut -c3-; exit 0; fi
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$out/gpu.txt"
run() {               # run NAME CMD...: its output to OUT/NAME.txt, its status in the summary
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$out/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
}
run cuda_tests timeout 240 python -m pytest -q tests/test_cuda.py tests/test_gpu_paths.py
for B in 8 32; do
    run paper_B${B} timeout 120 python tools/bench.py --only=paper --device=cuda --B=$B --P=256 \
        --R=128 --steps=10
    run paper_B${B}_compile timeout 240 python tools/bench.py --only=paper --device=cuda --B=$B \
        --P=256 --R=128 --steps=10 --compile
done
run pack timeout 120 python tools/bench.py --only=pack --device=cuda --B=16 --max_len=2048 \
    --steps=3
run handoff timeout 60 python tools/bench.py --only=handoff --device=cuda
run kd_memory timeout 60 python tools/bench.py --only=kd_memory --device=cuda
run loader timeout 120 python tools/bench.py --only=loader --loader_workers=0,4,8
tail -n 3 "$out"/*.txt
