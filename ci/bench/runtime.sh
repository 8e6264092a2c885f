#!/usr/bin/env bash
# Benchmark: the model runtime beside onnxruntime, in one run.
#
#   ci/bench/runtime.sh            (after ci/setup.sh; BENCH_SECONDS=2 per model and side)
#
# 1. Latency per reference model (.cache/models), batch 1, at 1 and 2 threads:
#    the engine in-process (the `reference_latency` test, built for musl
#    like the device binary and with its allocator; N engine threads) and
#    onnxruntime from .cache/venv (intra_op_num_threads = N), model by model,
#    alternating, so a busy machine disturbs both sides alike. Each side's
#    median over BENCH_SECONDS, BENCH_ROUNDS times (default 5) in turn; the
#    lowest median of each side is kept, so a slow spell of a shared host
#    during one side's turn does not decide the ratio.
# 2. Idle RSS of the static musl basalt-runtime serving one model, beyond the
#    model's bytes (the .onnx size), for each model.
# 3. Throughput (wrk, 10 s each) at 1, 4 and 16 connections against the
#    running server, per model, binary tensors as tritonclient sends them.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
models=$root/.cache/models
python=$root/.cache/venv/bin/python
seconds=${BENCH_SECONDS:-2}
rounds=${BENCH_ROUNDS:-5}
names=(${BENCH_MODELS:-mlp cnn mobilenetv3 resnet18 transformer})

if [ ! -x "$python" ] || [ ! -f "$models/resnet18.onnx" ]; then
    echo "runtime bench: no .cache/venv or reference models; run ci/setup.sh first" >&2
    exit 1
fi
command -v wrk >/dev/null || apt-get install -y wrk >/dev/null

work=$(mktemp -d /tmp/basalt-runtime-bench.XXXXXX)
server=
. ci/bench/lib.sh
trap 'bench_stop_runtime; rm -rf "$work"' EXIT

cargo test --release --locked --target x86_64-unknown-linux-musl -p basalt-runtime --test reference --no-run 2>/dev/null
cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-runtime --bin basalt-runtime 2>/dev/null
cargo build --release --locked -p basalt --bin basalt 2>/dev/null
target=${CARGO_TARGET_DIR:-$root/target}
runtime=$target/x86_64-unknown-linux-musl/release/basalt-runtime

# onnxruntime's side: the same batch-1 input, warm-up, then runs for BENCH_SECONDS.
cat >"$work/ort.py" <<'EOF'
import json, sys, time
import numpy as np
import onnxruntime as ort
models, name, threads, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ref = json.load(open(f"{models}/{name}.ref.json"))
types = {"FP32": np.float32, "INT64": np.int64}
feeds = {k: np.array(v["data"], dtype=types[v["datatype"]]).reshape(v["shape"])[:1]
         for k, v in ref["inputs"].items()}
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(f"{models}/{name}.onnx", opts, providers=["CPUExecutionProvider"])
for _ in range(3):
    sess.run(None, feeds)
times, start = [], time.perf_counter()
while len(times) < 10 or (time.perf_counter() - start < seconds and len(times) < 5000):
    t = time.perf_counter()
    sess.run(None, feeds)
    times.append(time.perf_counter() - t)
times.sort()
print(f"{times[len(times) // 2] * 1e3:.4f}")
EOF

# The lowest of the numbers on stdin, one per word.
lowest() { tr ' ' '\n' | awk 'NF && (m == "" || $1 < m) { m = $1 } END { print m }'; }

# The kernels differ by vector width (AVX-512, AVX2), so the CPU is part of the result.
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
isa=$(grep -qw avx512f /proc/cpuinfo && echo AVX-512 || { grep -qw avx2 /proc/cpuinfo && echo AVX2 || echo "no AVX2"; })
echo "== host: $cpu, $isa, $(nproc) cores"
echo "== latency, batch 1 (lowest of $rounds medians, ms; ratio = basalt / onnxruntime)"
printf '%-12s %7s %10s %12s %7s\n' model threads basalt onnxruntime ratio
for threads in 1 2; do
    for name in "${names[@]}"; do
        ours= theirs=
        for _ in $(seq "$rounds"); do
            ours+=" $(RAYON_NUM_THREADS=$threads BENCH_MODELS=$name BENCH_SECONDS=$seconds \
                cargo test --release --locked -q --target x86_64-unknown-linux-musl \
                -p basalt-runtime --test reference reference_latency \
                -- --ignored --nocapture 2>/dev/null | awk '$1 == "latency" { print $3 }')"
            theirs+=" $("$python" "$work/ort.py" "$models" "$name" "$threads" "$seconds")"
        done
        ours=$(lowest <<<"$ours")
        theirs=$(lowest <<<"$theirs")
        ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')
        printf '%-12s %7s %10s %12s %7s\n' "$name" "$threads" "$ours" "$theirs" "${ratio}x"
    done
done

# A signed bundle per model, and a key the runtime trusts.
mkdir -p "$work/keys"
"$target/release/basalt" keygen --out "$work/keys/bench" >/dev/null
for name in "${names[@]}"; do
    mkdir -p "$work/models-$name"
    "$target/release/basalt" model bundle "$models/$name.onnx" --config "$models/$name.model.toml" \
        --key "$work/keys/bench.key" --out "$work/models-$name/$name.basalt" >/dev/null
done

bench_post_lua "$work/post.lua"
port=18500
start_server() { # model
    port=$((port + 1))
    bench_start_runtime "$runtime" "$port" "$work/models-$1" "$work/keys" "$work/server.log"
}

echo
echo "== idle RSS of $runtime (static musl), after load and one inference"
printf '%-12s %10s %10s %14s\n' model rss_mib model_mib beyond_model_mib
for name in "${names[@]}"; do
    bench_body "$models/$name.ref.json" "$work/body-$name"
    start_server "$name"
    curl -sf -o /dev/null -H "Inference-Header-Content-Length: $(cat "$work/body-$name.len")" \
        --data-binary "@$work/body-$name.bin" "http://127.0.0.1:$port/v2/models/$name/infer"
    sleep 2 # the runtime returns its cached buffers after 1 s without requests
    rss=$(bench_rss_kib "$server")
    onnx=$(stat -c %s "$models/$name.onnx")
    awk -v r="$rss" -v o="$onnx" -v n="$name" \
        'BEGIN { printf "%-12s %10.1f %10.1f %14.1f\n", n, r / 1024, o / 1048576, r / 1024 - o / 1048576 }'
    bench_stop_runtime
done

echo
echo "== throughput (wrk, 10 s, 1 thread per connection up to 2), requests/s"
printf '%-12s %12s %12s %12s\n' model "1 conn" "4 conn" "16 conn"
for name in "${names[@]}"; do
    start_server "$name"
    row=$(printf '%-12s' "$name")
    for conns in 1 4 16; do
        threads=$((conns < 2 ? conns : 2))
        out=$(BODY="$work/body-$name.bin" HEAD_LEN=$(cat "$work/body-$name.len") \
            wrk -t "$threads" -c "$conns" -d 10s -s "$work/post.lua" \
            "http://127.0.0.1:$port/v2/models/$name/infer")
        rps=$(awk '/^Requests\/sec/ { printf "%.0f", $2 }' <<<"$out")
        statuses=$(awk '/^statuses/ { $1 = ""; print }' <<<"$out")
        row+=$(printf ' %12s' "$rps")
        echo "   $name $conns conn: $rps req/s, answers by status:$statuses" >&2
    done
    echo "$row"
    bench_stop_runtime
done
