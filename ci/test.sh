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
cargo test --locked -p basalt --test e2e --test e2e_update -- --ignored --test-threads=1
