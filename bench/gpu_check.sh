#!/usr/bin/env bash
# The one GPU command (docs/gpu.md): kernel checks, kernel tests, micro-benchmarks, end-to-end targets.
# Usage: bash bench/gpu_check.sh [--seed N] [--skip tests micro] ...   (results under $OUT or ./gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 -m dinfill.bench.gpu_check --out "${OUT:-gpu-check}" "$@"
