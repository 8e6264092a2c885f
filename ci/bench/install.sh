#!/usr/bin/env bash
# Benchmark: installing a root filesystem payload from a signed bundle into
# a file-backed slot (the device agent's code path: tar stream, signature,
# zstd, sha256, write, fsync) beside `zstd -d | tee >(sha256sum) | dd
# conv=fsync` of the same zstd frame, in one run, reported as a ratio.
#
#   ci/bench/install.sh [RUNS]     (BENCH_MIB=128 by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v zstd >/dev/null || bash ci/setup.sh
BENCH_RUNS=${1:-5} cargo bench --locked -p basalt-init --bench install 2>/dev/null
