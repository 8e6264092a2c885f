#!/usr/bin/env bash
# Benchmark: the same recipe on two boards. recipes/gateway.toml built for
# qemu-x86_64 and for qemu-aarch64 (warm inputs: kernels unpacked in the
# cache, device programs built), and each image booted under TCG from the
# firmware's start to `boot blessed`, side by side.
#
#   ci/bench/boards.sh [RUNS]     (3 by default; after ci/setup.sh)
#
# Reports medians:
#   build:   `basalt build` wall time (release build of basalt)
#   blessed: `basalt run --until "boot blessed"` wall time: QEMU's start,
#            UEFI firmware (OVMF / AAVMF), systemd-boot, kernel, stage 1,
#            services, the runtime's model test vector, bless_after (2 s)
# and the ratio aarch64 / x86-64 for each. Both guests run under TCG on
# this x86-64 host, so the aarch64 numbers include the cost of translating
# another instruction set; on an arm64 board the device runs natively.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
export SOURCE_DATE_EPOCH=1700000000 MTOOLS_SKIP_CHECK=1
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  cargo build --release --locked --target "$t" -p basalt-init -p basalt-runtime --bins 2>/dev/null
done
cargo build --release --locked -p basalt 2>/dev/null
work=$(mktemp -d /tmp/basalt-boards-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
quiet() { "$@" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }; }
secs() { python3 -c 'import sys,time; print(f"{time.time():.3f}")'; }

declare -A build blessed
for board in qemu-x86_64 qemu-aarch64; do
  # Warm the kernel cache once (the first build of a board unpacks its
  # kernel package).
  quiet target/release/basalt build recipes/gateway.toml --board "$board" --out "$work/$board"
  b=() ; s=()
  for i in $(seq "$runs"); do
    rm -rf "$work/$board"
    t0=$(secs)
    quiet target/release/basalt build recipes/gateway.toml --board "$board" --out "$work/$board"
    t1=$(secs)
    b+=("$(python3 -c "print($t1 - $t0)")")
    t0=$(secs)
    if ! target/release/basalt run "$work/$board/disk.img" --until "boot blessed" --timeout 300 \
        --console-log "$work/console-$board-$i.txt" >/dev/null 2>&1; then
      echo "boards bench: $board did not get blessed; console:" >&2
      cat "$work/console-$board-$i.txt" >&2
      exit 1
    fi
    t1=$(secs)
    s+=("$(python3 -c "print($t1 - $t0)")")
  done
  build[$board]=$(printf '%s\n' "${b[@]}" | median)
  blessed[$board]=$(printf '%s\n' "${s[@]}" | median)
  printf 'boards %-13s build %6.2f s   firmware to blessed %6.1f s   (median of %d)\n' \
    "$board" "${build[$board]}" "${blessed[$board]}" "$runs"
done
python3 -c "print('boards ratio aarch64/x86-64: build %.2fx, firmware to blessed %.2fx' % (${build[qemu-aarch64]} / ${build[qemu-x86_64]}, ${blessed[qemu-aarch64]} / ${blessed[qemu-x86_64]}))"
