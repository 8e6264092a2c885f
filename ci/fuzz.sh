#!/usr/bin/env bash
# Fuzzes the formats a device reads from the network (bundle, manifest,
# channel metadata, the model runtime's inference requests), each target
# for FUZZ_SECONDS seconds (default 30), on the stable toolchain without
# sanitizers (`-s none`: safe Rust needs no AddressSanitizer, and
# -Zsanitizer would need nightly). Each run starts
# from fuzz/seeds/<target> (valid inputs signed with the fuzzing key) and
# what it has found before in fuzz/corpus/<target>; a crash leaves its
# input in fuzz/artifacts/<target> and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-30}"
targets=(bundle_reader manifest channel infer_request)

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

root="$PWD/fuzz"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${seconds}s"
    mkdir -p "$root/corpus/$target"
    # libFuzzer prints a line for every new input it finds: keep them out of
    # the log unless the run fails, then show its end (the crash and input).
    if ! cargo fuzz run --fuzz-dir "$root" -s none "$target" \
        "$root/corpus/$target" "$root/seeds/$target" \
        -- -max_total_time="$seconds" >"$log" 2>&1; then
        tail -n 80 "$log"
        echo "fuzz: $target failed; its input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    grep -E '^Done [0-9]+ runs' "$log" || tail -n 3 "$log"
done
