#!/usr/bin/env bash
# Benchmark: boot times under TCG, basalt-init beside a hello-world init on
# the same kernel, in one run. Both boot the same way (QEMU direct kernel
# boot, same kernel, same command line), so the difference is the init.
#
#   ci/bench/boot.sh [RUNS]     (after ci/setup.sh)
#
# Each measure is taken on two guest clocks:
#   wall:   TCG's default, the guest clock follows the host's; a busy host
#           makes every number larger, and the runs scatter.
#   icount: -icount shift=0, the guest clock advances 1 ns per emulated
#           instruction (a 1 GIPS CPU, the order of one core of an edge
#           SoC): the same image gives the same numbers on any host, so a
#           change shows its own effect.
# Reports, as medians (guest clock, /proc/uptime):
#   kernel-to-init: kernel start -> the init's first instruction
#   stage 1:        stage 1 start -> switch_root (modules, verity, mounts)
#   services:       stage 1 start -> all services started
#   blessed:        stage 1 start -> boot blessed (includes bless_after)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-5}
export SOURCE_DATE_EPOCH=1700000000 MTOOLS_SKIP_CHECK=1

cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-init -p basalt-runtime --bins 2>/dev/null
cargo build --release --locked -p basalt 2>/dev/null
work=$(mktemp -d /tmp/basalt-boot-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
target/release/basalt build recipes/minimal.toml --out "$work/img" 2>/dev/null

# Kernel and initrd out of the image's ESP (partition 1 at 1 MiB).
esp_mib=$(python3 -c "import json;r=json.load(open('$work/img/report.json'));p=[p for p in r['partitions'] if p['label']=='esp'][0];print(p['offset']//1048576, p['size']//1048576)")
set -- $esp_mib
dd if="$work/img/disk.img" of="$work/esp.img" bs=1M skip="$1" count="$2" status=none
mcopy -i "$work/esp.img" ::/a/vmlinuz "$work/vmlinuz"
mcopy -i "$work/esp.img" ::/a/initrd "$work/initrd"
cmdline="console=ttyS0,115200 quiet panic=10 basalt.slot=a"

# The hello-world init, in an initramfs of its own.
mkdir -p "$work/hello/proc"
musl-gcc -static -O2 -o "$work/hello/init" ci/bench/hello-init.c
(cd "$work/hello" && find . | cpio -o -H newc --quiet | zstd -q -9 > "$work/hello.initrd")

boot() { # initrd disk marker: prints the console up to the marker
  local log="$work/console.txt"
  : > "$log"
  qemu-system-x86_64 -accel tcg $clock -machine q35 -cpu max -m 512 -smp 1 \
    -kernel "$work/vmlinuz" -initrd "$1" -append "$cmdline" \
    -drive "file=$2,if=virtio,format=raw,cache=unsafe" -display none -serial "file:$log" \
    -monitor none -no-reboot -nic none 2>/dev/null &
  local pid=$! waited=0
  until grep -q "$3" "$log" || [ "$waited" -ge 1200 ]; do sleep 0.1; waited=$((waited + 1)); done
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  tr -d '\r' < "$log"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
num() { grep -o "$1" | head -n1 | grep -o '[0-9]*\.[0-9]*' | head -n1; }

report() { # clock-name
  local h k s1 svc bl mods own
  h=$(median < "$work/hello.txt")
  k=$(awk '{print $1}' "$work/basalt.txt" | median)
  s1=$(awk '{print $2}' "$work/basalt.txt" | median)
  svc=$(awk '{print $3}' "$work/basalt.txt" | median)
  bl=$(awk '{print $4}' "$work/basalt.txt" | median)
  mods=$(awk '{print $5}' "$work/basalt.txt" | median)
  own=$(awk '{print $3 * 1000 - $5}' "$work/basalt.txt" | median)
  cat <<REPORT
== guest clock: $1 (runs: $runs, QEMU TCG, direct kernel boot, medians)
hello-world init, kernel-to-init:   ${h} s
basalt-init, kernel-to-init:        ${k} s   (ratio $(echo "scale=2; $k / $h" | bc)x)
basalt-init stage 1 (to switch_root): ${s1} ms
basalt-init stage 1 -> services:    ${svc} s
  of which loading modules (finit_module: the kernel linking and initialising drivers): ${mods} ms
  of which basalt-init's own work (the rest):                     ${own} ms
basalt-init stage 1 -> blessed:     ${bl} s   (bless_after is 2 s in recipes/minimal.toml)
module signatures: $(python3 -c "import json;print(json.load(open('$work/img/report.json'))['module_signatures'])")
REPORT
}

for mode in wall icount; do
  clock=""; [ "$mode" = icount ] && clock="-icount shift=0"
  : > "$work/hello.txt"; : > "$work/basalt.txt"
  for i in $(seq "$runs"); do
    boot "$work/hello.initrd" "$work/img/disk.img" "hello-init: kernel up" | num 'kernel up [0-9.]*' >> "$work/hello.txt"
    cp --sparse=always "$work/img/disk.img" "$work/run.img"
    log=$(boot "$work/initrd" "$work/run.img" "boot blessed")
    k=$(echo "$log" | num 'kernel up [0-9.]* s')
    s1=$(echo "$log" | grep -o 'mounted in [0-9]* ms' | grep -o '[0-9]*')
    svc=$(echo "$log" | grep 'all services started' | grep -o 'uptime [0-9.]*' | grep -o '[0-9.]*$')
    bl=$(echo "$log" | grep 'boot blessed' | grep -o 'uptime [0-9.]*' | grep -o '[0-9.]*$')
    # Time spent inside finit_module, stage 1's and stage 2's.
    mods=$(echo "$log" | grep -o 'modules in [0-9]* ms' | grep -o '[0-9]* ms' | grep -o '[0-9]*' | paste -sd+ | bc)
    echo "$k $s1 $(echo "$svc - $k" | bc) $(echo "$bl - $k" | bc) $mods" >> "$work/basalt.txt"
    [ -n "${BOOT_BENCH_LOG:-}" ] && echo "$log" > "$BOOT_BENCH_LOG.$mode.$i"
  done
  report "$mode"
done
