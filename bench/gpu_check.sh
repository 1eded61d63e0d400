#!/usr/bin/env bash
# The one GPU command (docs/gpu.md), under 6 minutes: kernel checks, the end-to-end targets in ms per problem,
# agreement, the forward and sampling phases, micro-benchmarks, kernel tests (python -m dinfill.bench.gpu_check -h).
# Usage: bash bench/gpu_check.sh [--seed N] [--baselines short|full|none] [--skip tests micro] ...
# Results under $OUT or ./gpu-check. From a copy without .git, set DINFILL_GIT_REV=<sha> so records say which.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 -m dinfill.bench.gpu_check --out "${OUT:-gpu-check}" "$@"
