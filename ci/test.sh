#!/usr/bin/env bash
# Installs what is needed and runs every test: formatting, lints, unit and
# integration tests, then the QEMU scenarios of ci/e2e.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh

echo "== device programs (static, musl)"
cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-init -p basalt-runtime --bins

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

echo "== unit and integration tests"
cargo test --locked --workspace

echo "== fuzzing (each target of fuzz/ for ${FUZZ_SECONDS:-20} s)"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash ci/fuzz.sh

echo "== system tests (QEMU)"
# Two files of scenarios, each run one scenario at a time, both at once: a
# TCG guest keeps one core busy, and the machine has two. The files forward
# disjoint host ports (ci/e2e/README.md lists them), so they never collide.
# --workspace: the features of the test build above, so nothing is rebuilt.
cargo test --locked --workspace --test e2e --test e2e_update --no-run
logs=$(mktemp -d)
pids=()
for suite in e2e e2e_update; do
  cargo test --locked --workspace --test "$suite" -- --ignored --test-threads=1 \
    >"$logs/$suite.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in 0 1; do wait "${pids[$i]}" || failed=1; done
for suite in e2e e2e_update; do
  echo "-- $suite"
  cat "$logs/$suite.log"
done
rm -rf "$logs"
if [ "$failed" != 0 ]; then
  echo "system tests failed; each scenario's console is in \$TMPDIR/basalt-e2e-<scenario>.log" >&2
  exit 1
fi
