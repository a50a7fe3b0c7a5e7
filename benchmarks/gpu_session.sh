#!/usr/bin/env bash
# The one script a session with a GPU lease runs on the device machine (repository root):
# build there, run the CUDA tests and the CUDA benchmarks, write ONE JSON with every figure.
#
#   BCT_FAST_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_session.sh      # here: pass the commit
#
# Output: $OUT (device tool) or benchmarks/results/: gpu_<date>.json, build.log, tests.log.
# Commit the JSON under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export CUDAARCHS="${CUDAARCHS:-native}"  # on the GPU machine itself, native is right

echo "== build (CUDAARCHS=$CUDAARCHS)"
$PY -m pip install --no-build-isolation --no-deps -Cbuild-dir=build/gpu -v . >"$RESULTS/build.log" 2>&1
BUILD_RC=$?
tail -3 "$RESULTS/build.log"

echo "== tests (all, CUDA ones included)"
$PY -m pytest tests -q -p no:cacheprovider --junitxml="$RESULTS/tests.xml" >"$RESULTS/tests.log" 2>&1
TEST_RC=$?
tail -5 "$RESULTS/tests.log"

echo "== CUDA benchmarks"
$PY -m pytest benchmarks -q -p no:cacheprovider -m cuda --benchmark-only \
  --benchmark-json="$RESULTS/bench_raw.json" >"$RESULTS/bench.log" 2>&1
BENCH_RC=$?
tail -5 "$RESULTS/bench.log"

$PY benchmarks/collect_results.py --out "$RESULTS/gpu_${STAMP}.json" --bench "$RESULTS/bench_raw.json" \
  --tests "$RESULTS/tests.xml" --commit "${BCT_FAST_COMMIT:-unknown}" \
  --rc build=$BUILD_RC tests=$TEST_RC bench=$BENCH_RC
rm -f "$RESULTS/bench_raw.json" "$RESULTS/tests.xml"
exit $(( BUILD_RC || TEST_RC || BENCH_RC ))
