#!/usr/bin/env bash
# The demo: builds the reference gateway (recipes/gateway.toml on the
# qemu-x86_64 board: basalt-runtime serving a signed ONNX model), boots it in
# QEMU with its console on this terminal, and once the boot is blessed asks
# it for an inference from the host with the stock KServe V2 client
# (tritonclient) through the forwarded port 127.0.0.1:8000. On a terminal
# the gateway keeps running until Ctrl-C; otherwise the demo ends there.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh
cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-init -p basalt-runtime --bins
cargo build --release --locked -p basalt
basalt=target/release/basalt

"$basalt" build recipes/gateway.toml --out out/gateway
"$basalt" inspect out/gateway/disk.img

log=$(mktemp /tmp/basalt-demo.XXXXXX.log)
"$basalt" run out/gateway/disk.img --console-log "$log" &
run=$!
# On SIGTERM `basalt run` stops QEMU (its child, holding the forwarded
# ports) and removes the firmware copies it made.
stop() {
  kill "$run" 2>/dev/null || true
  wait "$run" 2>/dev/null || true
  rm -f "$log"
}
trap stop EXIT

for _ in $(seq 300); do
  grep -q "boot blessed" "$log" && break
  kill -0 "$run" 2>/dev/null || break
  sleep 1
done
if ! grep -q "boot blessed" "$log"; then
  echo "demo: the gateway did not come up; its console is above" >&2
  exit 1
fi

echo
echo "== from the host: tritonclient asks the gateway for an inference (127.0.0.1:8000)"
.cache/venv/bin/python ci/models/interop.py http://127.0.0.1:8000 mlp .cache/models/mlp.ref.json
curl -s http://127.0.0.1:8000/metrics | grep '^basalt_inference_requests_total' || true

if [ -t 0 ] && [ -t 1 ]; then
  echo "== the gateway keeps running (API on 127.0.0.1:8000); Ctrl-C stops it"
  wait "$run"
fi
