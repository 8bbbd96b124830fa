#!/usr/bin/env bash
# The first command to run on a GPU machine (about 8 minutes on one H200; make gpu-check does the same):
#   1. the GPU tests (pytest -m gpu: CUDA precision, no host sync inside a training step, ...);
#   2. bench.py at the paper's shapes in bf16 and in fp32: ms per step, MFU against a matmul peak measured
#      on the same GPU, peak memory at the paper's diffusion batch of 20, DDIM-50 and DDPM-300 seconds per
#      volume;
#   3. 300 steps of 03 and of 04 at the paper's shapes and widths on phantoms (256×256×32): the losses fall;
#   4. scripts/gpu_summary.py: one JSON and one markdown table, each figure against its target (diffusion
#      >= 35 % MFU, VQ-GAN >= 15 %, DDIM-50 <= 1 s and DDPM-300 <= 5 s per volume, the paper's chain for one
#      model <= 8 h).
# Outputs: runs/gpu_check/ (summary.json, summary.md, bench_*.json, the two training logs), data/gpu_check/.
#
#   bash scripts/gpu_check.sh           # on the GPU machine
#   DRY=1 bash scripts/gpu_check.sh     # print the commands only (anywhere; a test runs it)
#
# The 03 run has no LPIPS term unless LPIPS=DIR names the VGG16/LPIPS weights (a GPU machine is often
# offline); bench.py times the step with LPIPS (random weights cost the same).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DRY=${DRY:-0}
OUT=${OUT:-runs/gpu_check}
DATA=${DATA:-data/gpu_check}
STEPS=${STEPS:-300}

run() {  # print a command, then run it (DRY=1: print only)
    echo "+ $*"
    if [ "$DRY" != 1 ]; then "$@"; fi
}

if [ "$DRY" != 1 ]; then
    mkdir -p "$OUT"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
        'error: no CUDA device: gpu_check.sh is for a GPU machine (DRY=1 prints its commands)')"
fi
PERCEPTUAL=(--perceptual-weight 0)
if [ -n "${LPIPS:-}" ]; then PERCEPTUAL=(--perceptual-weights "$LPIPS"); fi

run "$PY" -m pytest -q -m gpu --junitxml "$OUT/gpu_tests.xml"
run "$PY" bench.py --precision bf16 --out "$OUT/bench_bf16.json"
run "$PY" bench.py --precision fp32 --only vqgan diffusion --out "$OUT/bench_fp32.json"
run "$PY" 00_phantoms.py --out "$DATA/raw" --n 8 --seed 0
run "$PY" 01_preprocess.py --images "$DATA/raw/images" --labels "$DATA/raw/labels" --out "$DATA/prep" \
    --dataset abdomenct1k --organ 4 --n-test 2 --overwrite
run "$PY" 02_masks.py --prep "$DATA/prep" --method labels --organ 4 --tumour 5 --overwrite
run "$PY" 03_vqgan.py --prep "$DATA/prep" --out "$OUT/vqgan" --steps "$STEPS" --disc-start $((STEPS / 2)) \
    --log-every 25 --save-every "$STEPS" "${PERCEPTUAL[@]}" --fresh
run "$PY" 04_diffusion.py --prep "$DATA/prep" --vqgan "$OUT/vqgan/ckpt.pt" --out "$OUT/diffusion" \
    --steps "$STEPS" --log-every 25 --save-every "$STEPS" --n-preview 0 --fresh
run "$PY" scripts/gpu_summary.py --out "$OUT"
