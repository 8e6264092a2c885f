#!/usr/bin/env bash
# Benchmark: time from `basalt publish` of a model version to the device
# serving it, on the QEMU image of scenario 030 (TCG), split into its steps.
# One boot, then UPDATES versions published one after the other, each kept
# at once (no watch window), against nginx on the host's loopback, as a
# fleet's web server would serve them.
#
#   ci/bench/model-update.sh [UPDATES]     (5 by default; after ci/setup.sh)
#
# The split of each update and the medians:
#   poll wait       publish -> the device's first fetch of the new channel
#                   file, from nginx's log ($msec): the host's clock on both
#                   ends (the guest's clock starts from a one-second RTC)
#   download        the agent's download of the bundle (resumable, sha256)
#   install+verify  the agent's install into /data/models: signatures,
#                   sha256, written to a temporary folder, synced, renamed
#   load request    the agent's POST /v2/repository/models/mlp/load, whole;
#                   within it the runtime's own steps:
#     verify        the bundle read again: signatures, sha256 of payloads
#     load          the engine's plan from the ONNX file
#     test vector   the test vector run beside the serving version
#     switch        state.toml recorded (synced) and the swap
# All but the poll wait are durations the device measured and printed on
# its console (the agent's and the runtime's lines).
set -euo pipefail
cd "$(dirname "$0")/../.."
export SOURCE_DATE_EPOCH=1700000000 MTOOLS_SKIP_CHECK=1
cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-init -p basalt-runtime --bins 2>/dev/null
log=$(mktemp /tmp/basalt-model-update-bench.XXXXXX)
trap 'rm -f "$log"' EXIT
if ! BASALT_BENCH_UPDATES=${1:-5} cargo test --locked -p basalt --test bench_model_update -- \
    --ignored --nocapture >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "model-update bench failed; the console is in \$TMPDIR/basalt-e2e-bench-model-update.log" >&2
  exit 1
fi
grep '^model-update' "$log"
