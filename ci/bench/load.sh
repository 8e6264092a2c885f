#!/usr/bin/env bash
# Load test of the model runtime (not part of CI: it takes LOAD_SECONDS).
#
#   ci/bench/load.sh [MODEL]       (after ci/setup.sh; MODEL defaults to mobilenetv3)
#
# The static musl basalt-runtime serves one reference model from a signed
# bundle; wrk sends it LOAD_CONNECTIONS (64) concurrent inference requests
# (binary tensors, as tritonclient sends them) for LOAD_SECONDS (30) while
# the process's RSS is sampled every second. Passes when every answer is 200
# or 503 (the queue in front of the engine is full), the process is still up
# and answering afterwards, and RSS stays flat: the last sample is within
# LOAD_RSS_SLACK_MIB (8) of the one taken 5 s into the run, once the
# buffers of a full queue exist. RSS 3 s after the load (the runtime
# returns its cached buffers after 1 s idle) is shown too.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
models=$root/.cache/models
python=$root/.cache/venv/bin/python
model=${1:-mobilenetv3}
seconds=${LOAD_SECONDS:-30}
connections=${LOAD_CONNECTIONS:-64}
slack_mib=${LOAD_RSS_SLACK_MIB:-8}

if [ ! -x "$python" ] || [ ! -f "$models/$model.onnx" ]; then
    echo "load: no .cache/venv or no model $model in $models; run ci/setup.sh first" >&2
    exit 1
fi
command -v wrk >/dev/null || apt-get install -y wrk >/dev/null

work=$(mktemp -d /tmp/basalt-load.XXXXXX)
server=
. ci/bench/lib.sh
trap 'bench_stop_runtime; rm -rf "$work"' EXIT

cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-runtime --bin basalt-runtime 2>/dev/null
cargo build --release --locked -p basalt --bin basalt 2>/dev/null
target=${CARGO_TARGET_DIR:-$root/target}
runtime=$target/x86_64-unknown-linux-musl/release/basalt-runtime

mkdir -p "$work/keys" "$work/models"
"$target/release/basalt" keygen --out "$work/keys/load" >/dev/null
"$target/release/basalt" model bundle "$models/$model.onnx" --config "$models/$model.model.toml" \
    --key "$work/keys/load.key" --out "$work/models/$model.basalt" >/dev/null

bench_body "$models/$model.ref.json" "$work/body"
bench_post_lua "$work/post.lua"
port=18600
bench_start_runtime "$runtime" "$port" "$work/models" "$work/keys" "$work/server.log"
rss_kib() { bench_rss_kib "$server"; }
idle=$(rss_kib)

BODY="$work/body.bin" HEAD_LEN=$(cat "$work/body.len") \
    wrk -t 2 -c "$connections" -d "${seconds}s" --timeout 10s -s "$work/post.lua" \
    "http://127.0.0.1:$port/v2/models/$model/infer" >"$work/wrk.out" &
wrk_pid=$!
samples=()
while kill -0 "$wrk_pid" 2>/dev/null; do
    samples+=("$(rss_kib)")
    sleep 1
done
wait "$wrk_pid"
cat "$work/wrk.out"
sleep 3
after=$(rss_kib)

status=0
alive=yes
kill -0 "$server" 2>/dev/null && curl -sf "http://127.0.0.1:$port/v2/health/live" >/dev/null || alive=no
statuses=$(awk '/^statuses/ { $1 = ""; print }' "$work/wrk.out")
others=$(tr ' ' '\n' <<<"$statuses" | awk -F: 'NF == 2 && $1 != 200 && $1 != 503 { n += $2 } END { print n + 0 }')
total=$(tr ' ' '\n' <<<"$statuses" | awk -F: 'NF == 2 { n += $2 } END { print n + 0 }')
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
early=${samples[5]:-${samples[0]:-0}}
last=${samples[${#samples[@]}-1]:-0}
peak=$(printf '%s\n' "${samples[@]}" | sort -n | tail -1)
growth=$(awk -v a="$early" -v b="$last" 'BEGIN { printf "%.1f", (b - a) / 1024 }')

echo "model $model, $connections connections, ${seconds}s"
echo "answers by status:$statuses (total $total, other than 200/503: $others)"
echo "process alive and live afterwards: $alive"
echo "RSS MiB: idle $(mib "$idle"), at 5 s $(mib "$early"), peak $(mib "$peak"), last $(mib "$last"); growth after 5 s $growth; 3 s after the load $(mib "$after")"
echo "RSS samples (MiB, 1/s): $(for s in "${samples[@]}"; do printf '%s ' "$(mib "$s")"; done)"

[ "$total" -gt 0 ] || { echo "load: FAIL: no answers"; status=1; }
[ "$others" -eq 0 ] || { echo "load: FAIL: answers other than 200 and 503"; status=1; }
[ "$alive" = yes ] || { echo "load: FAIL: the runtime is not up after the run"; status=1; }
awk -v g="$growth" -v s="$slack_mib" 'BEGIN { exit !(g <= s) }' \
    || { echo "load: FAIL: RSS grew by $growth MiB (allowed $slack_mib)"; status=1; }
[ "$status" -eq 0 ] && echo "load: ok"
exit "$status"
