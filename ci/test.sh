#!/usr/bin/env bash
# Installs what is needed and runs every test: formatting, lints, unit and
# integration tests, then the QEMU scenarios of ci/e2e.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh

# A run from a clean clone never builds twice: incremental state would only
# take disk (1.3 GB of the test build).
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi

echo "== device programs (static, musl)"
cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-init -p basalt-runtime --bins
echo "== device programs for aarch64 (static, musl; scenario 040 boots them)"
cargo build --release --locked --target aarch64-unknown-linux-musl -p basalt-init -p basalt-runtime --bins

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

echo "== unit and integration tests"
cargo test --locked --workspace

echo "== fuzzing (each target of fuzz/ for ${FUZZ_SECONDS:-20} s)"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash ci/fuzz.sh

echo "== system tests (QEMU)"
# Three files of scenarios in two lanes, each file one scenario at a time:
# a TCG guest keeps one core busy, and the machine has two. e2e.rs is the
# shorter file, so the aarch64 scenario (e2e_aarch64.rs) follows it in its
# lane. The files forward disjoint host ports (ci/e2e/README.md lists
# them), so they never collide.
# --workspace: the features of the test build above, so nothing is rebuilt.
cargo test --locked --workspace --test e2e --test e2e_update --test e2e_aarch64 --no-run
logs=$(mktemp -d)
suite() {
  cargo test --locked --workspace --test "$1" -- --ignored --test-threads=1 >"$logs/$1.log" 2>&1
}
(e2e=0; suite e2e || e2e=1; suite e2e_aarch64 || exit 1; exit "$e2e") &
lane1=$!
suite e2e_update &
lane2=$!
failed=0
wait "$lane1" || failed=1
wait "$lane2" || failed=1
for s in e2e e2e_update e2e_aarch64; do
  echo "-- $s"
  cat "$logs/$s.log"
done
rm -rf "$logs"
if [ "$failed" != 0 ]; then
  echo "system tests failed; each scenario's console is in \$TMPDIR/basalt-e2e-<scenario>.log" >&2
  exit 1
fi
