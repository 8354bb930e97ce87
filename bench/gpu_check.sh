#!/usr/bin/env bash
# The GPU rows of docs/BENCHMARKS.md ("Real model sizes"), on one NVIDIA GPU (written for one H200), in one go:
# install the [cuda] extra, run the CUDA-only tests, then bench/scale.py on the 1B and 8B shapes in bf16 and NF4 with
# a whole 64-record job per row. Goals: >= 40% MFU for the 8B bf16 training step; the 8B job (default engine, 64
# records) under 10 minutes including evaluation; the 8B NF4 peak under 24 GB.
#   bash bench/gpu_check.sh [OUT_DIR]          # about 10 minutes on an H200; everything it prints goes to OUT_DIR
set -euo pipefail
out="${1:-var/gpu_check}"
mkdir -p "$out"
python3 -m venv .venv 2>/dev/null || true
.venv/bin/pip install --quiet -e ".[cuda,test]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
.venv/bin/pytest -m cuda -q tests/engine/test_cuda.py 2>&1 | tee "$out/pytest_cuda.txt"
.venv/bin/python -m bench.scale --rows 1b:bf16,1b:nf4,8b:bf16 --job --threads 8 \
    --work-dir "$out/models" 2>&1 | tee "$out/scale.txt"
# the 4-bit goal is a 24 GB card: FILA's Fisher pass takes as many layers as half the budget holds
.venv/bin/python -m bench.scale --rows 8b:nf4 --job --memory-gib 24 --threads 8 --work-dir "$out/models" \
    2>&1 | tee "$out/scale_nf4_24gb.txt"
.venv/bin/python -m bench.scale --rows 8b:bf16 --checkpointing --threads 8 --work-dir "$out/models" \
    2>&1 | tee "$out/scale_checkpointing.txt"
