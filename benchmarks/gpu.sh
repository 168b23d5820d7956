#!/usr/bin/env bash
# The GPU check in one command (CUDA-only tests, 7B-shape benchmarks, a short SmolLM2 training).
# Needs the project's dependencies installed (no network). Writes under benchmarks/results/ by default.
#   bash benchmarks/gpu.sh [--output-dir DIR] [--smoke] [--steps tests,bench,train]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m rosa_peft.bench.gpu_check "$@"
