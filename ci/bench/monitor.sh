#!/usr/bin/env bash
# Benchmark: what the model statistics (per-feature moments, training-range
# counts and drift bins of every input and output) cost on the served
# inference path, beside the inference alone. Target: <= 2 % on the MLP.
#
#   ci/bench/monitor.sh [MODEL...]     (mlp by default; after ci/setup.sh)
#
# Runs the `monitor_overhead` timing test (release build, one thread),
# BENCH_SECONDS (default 3) per model, the two paths alternating run by run.
set -euo pipefail
cd "$(dirname "$0")/../.."
models=("${@:-mlp}")
if [ ! -f .cache/models/mlp.onnx ]; then
  echo "monitor bench: no reference models; run ci/setup.sh first" >&2
  exit 1
fi
cargo test --release --locked -p basalt-runtime --test reference --no-run 2>/dev/null
for m in "${models[@]}"; do
  BENCH_MODEL=$m RAYON_NUM_THREADS=1 cargo test --release --locked -q -p basalt-runtime \
    --test reference -- --ignored --exact monitor_overhead --nocapture 2>/dev/null \
    | awk '/^monitor /{printf "monitor %s: inference %.4f ms, with statistics %.4f ms: overhead %+.2f %% (%d runs each); the statistics alone %.2f us\n", $2, $4, $6, $8, $9, $11 * 1000}'
done
