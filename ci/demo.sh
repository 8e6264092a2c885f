#!/usr/bin/env bash
# The demo: builds the reference image (recipes/minimal.toml on the
# qemu-x86_64 board) and boots it in QEMU with its console on this
# terminal. Ctrl-C stops the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh
cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-init --bins
cargo build --release --locked -p basalt
basalt=target/release/basalt

"$basalt" build recipes/minimal.toml --out out/minimal
"$basalt" inspect out/minimal/disk.img
if [ -t 0 ] && [ -t 1 ]; then
  exec "$basalt" run out/minimal/disk.img
else
  # Not on a terminal (CI, a pipe): stop once the boot is blessed.
  exec "$basalt" run out/minimal/disk.img --until "boot blessed" --timeout 300
fi
