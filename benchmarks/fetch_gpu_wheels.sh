#!/usr/bin/env bash
# Run HERE (network) before a GPU lease: downloads the wheels the offline device machine lacks
# into .whl/ (git-ignored; pass carry=[".whl"] to the device tool so they travel):
#   - cmake, only used if the device's cmake is below pyproject's floor (gpu_session.sh step 1);
#   - the fused cross-entropy peers of bench_margin_ce.py, pure-Python Triton packages:
#     liger-kernel (fused linear cross-entropy) and cut-cross-entropy. Installed there with
#     --no-deps into a temporary folder (their torch / triton are the device's own).
# faiss GPU cannot travel (its CUDA 12 runtime wheels are far over the carry limit): the faiss
# rows of bench_search.py skip there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$ROOT/.whl"
PIP="${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: -d $ROOT/.whl"
$PIP --python-version 3.12 --platform manylinux_2_17_x86_64 cmake
$PIP liger-kernel cut-cross-entropy
ls -la "$ROOT/.whl"
du -sh "$ROOT/.whl"
