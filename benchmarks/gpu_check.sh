#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the CUDA tests, then the GPU snapshot-stall benchmark, and print its tables.
#   bash benchmarks/gpu_check.sh            # GPU states of 1 and 4 GiB (a few minutes)
#   bash benchmarks/gpu_check.sh --full     # adds 16 GiB (needs ~40 GiB of free host RAM for pinned buffers)
# Needs the project importable with its test extra (pip install -e ".[test]") and a CUDA build of torch.
# PYTHON picks the interpreter (default python3); results go to $OUT (default bench-results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:-bench-results/gpu}"
mkdir -p "$out"
"$py" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False; run this on a machine with a CUDA GPU")
print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
PY
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_snapshot.py -rs
if [[ "${1:-}" == "--full" ]]; then sizes="1024 4096 16384"; else sizes="1024 4096"; fi
# Large matrices (64 MiB weights, about 64 tensors per GiB of state) and CPU states for the same machine:
"$py" -m benchmarks.staging --cpu-sizes 64 512 --gpu-sizes $sizes --rounds 5 --monai-rounds 1 --out "$out/wide"
# Many small tensors (4 MiB weights, about 500 tensors per GiB): the per-tensor cost of issuing copies.
"$py" -m benchmarks.staging --cpu-sizes --gpu-sizes 4096 --gpu-width 1024 --rounds 5 --monai-rounds 0 \
    --out "$out/narrow"
