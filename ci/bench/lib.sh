# Shared by the runtime benchmarks (runtime.sh, load.sh): source it after
# setting `work` (a scratch folder) and `python` (the .cache/venv one).

# bench_body REF_JSON OUT: writes OUT.bin, the request tritonclient sends
# for the reference input's batch-1 slice (JSON header, then the tensors'
# little-endian bytes), and OUT.len, the header's length.
bench_body() {
    "$python" - "$1" "$2" <<'EOF'
import json, sys
import numpy as np
ref, out = json.load(open(sys.argv[1])), sys.argv[2]
types = {"FP32": np.float32, "INT64": np.int64}
inputs, blobs = [], []
for k, v in ref["inputs"].items():
    a = np.array(v["data"], dtype=types[v["datatype"]]).reshape(v["shape"])[:1]
    blob = a.astype(a.dtype.newbyteorder("<")).tobytes()
    inputs.append({"name": k, "shape": list(a.shape), "datatype": v["datatype"],
                   "parameters": {"binary_data_size": len(blob)}})
    blobs.append(blob)
head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
open(out + ".bin", "wb").write(head + b"".join(blobs))
open(out + ".len", "w").write(str(len(head)))
EOF
}

# bench_post_lua OUT: a wrk script that posts $BODY with the header length
# $HEAD_LEN and prints `statuses 200:N 503:M` and `socket_errors N` at the
# end (each wrk thread has its own Lua state, so counts are summed there).
bench_post_lua() {
    cat >"$1" <<'EOF'
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Inference-Header-Content-Length"] = os.getenv("HEAD_LEN")
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init() statuses = {} end
function response(status) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary)
  local all = {}
  for _, t in ipairs(threads) do
    for s, n in pairs(t:get("statuses")) do all[s] = (all[s] or 0) + n end
  end
  local parts = {}
  for s, n in pairs(all) do table.insert(parts, s .. ":" .. n) end
  table.sort(parts)
  io.write("statuses " .. table.concat(parts, " ") .. "\n")
  io.write("socket_errors " .. summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout .. "\n")
end
EOF
}

# bench_start_runtime RUNTIME PORT MODELS_DIR KEYS_DIR LOG: starts the
# runtime serving MODELS_DIR on 127.0.0.1:PORT, sets `server` to its pid,
# and returns once it is ready; exits with its log if it never is.
bench_start_runtime() {
    "$1" --listen "127.0.0.1:$2" --models "$3" --store none --keys "$4" >"$5" 2>&1 &
    server=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$2/v2/health/ready" >/dev/null && return 0
        kill -0 "$server" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench: the runtime did not become ready:" >&2
    cat "$5" >&2
    exit 1
}

# bench_stop_runtime: stops the server `bench_start_runtime` started.
bench_stop_runtime() {
    if [ -n "${server:-}" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        server=
    fi
}

# bench_rss_kib PID: resident set size in KiB (0 once the process is gone).
bench_rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
