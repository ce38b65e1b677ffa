#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the CUDA tests, then the GPU snapshot-stall benchmark, and print one table.
#   bash benchmarks/gpu_check.sh            # GPU states of 1 and 4 GiB (a few minutes)
#   bash benchmarks/gpu_check.sh --full     # adds 16 GiB (needs ~48 GiB of free host RAM for pinned buffers)
# Needs the project installed with its test extra (pip install -e ".[test]") and a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False; run this on a machine with a CUDA GPU")
print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
PY
python -m pytest -q tests/test_cuda.py tests/test_snapshot.py -rs
if [[ "${1:-}" == "--full" ]]; then sizes="1024 4096 16384"; else sizes="1024 4096"; fi
python -m benchmarks.staging --cpu-sizes 512 --gpu-sizes $sizes --rounds 5 --out "${OUT:-bench-results}"
