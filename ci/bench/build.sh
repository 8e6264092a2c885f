#!/usr/bin/env bash
# Benchmark: warm build time of recipes/minimal.toml beside what a user would
# do instead on this machine (debootstrap --variant=minbase of Debian, then
# mksquashfs of that tree), in one run, reported as a ratio; plus the OS
# overhead of the image (rootfs bytes minus kernel modules and models).
#
#   ci/bench/build.sh [RUNS]      (needs root for debootstrap; ci/setup.sh first)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-5}
export SOURCE_DATE_EPOCH=1700000000

command -v debootstrap >/dev/null && command -v bc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap bc >/dev/null
cargo build --release --locked --target x86_64-unknown-linux-musl -p basalt-init -p basalt-runtime --bins 2>/dev/null
cargo build --release --locked -p basalt 2>/dev/null
basalt=target/release/basalt
work=$(mktemp -d /tmp/basalt-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Warm: the kernel package is unpacked into the cache by the first build.
"$basalt" build recipes/minimal.toml --out "$work/warmup" 2>/dev/null
for i in $(seq "$runs"); do
  t0=$(now); "$basalt" build recipes/minimal.toml --out "$work/b$i" 2>/dev/null; t1=$(now)
  echo "$t1 - $t0" | bc
done > "$work/basalt.times"
basalt_s=$(median < "$work/basalt.times")

# The other route. Cold: as a user runs it, downloading the packages (they
# land in a cache folder). Warm: again, from that cache, so only unpacking,
# configuring and compressing count.
mirror=http://deb.debian.org/debian
mkdir -p "$work/debs"
route() { # rootfs-folder
  debootstrap --variant=minbase --cache-dir="$work/debs" bookworm "$1" "$mirror" >/dev/null
  mksquashfs "$1" "$1.sqfs" -comp zstd -noappend -quiet >/dev/null
}
t0=$(now); route "$work/cold"; t1=$(now)
cold_s=$(echo "$t1 - $t0" | bc)
t0=$(now); route "$work/rootfs"; t1=$(now)
deb_s=$(echo "$t1 - $t0" | bc)
deb_bytes=$(stat -c %s "$work/rootfs.sqfs")

overhead=$(python3 -c "import json;r=json.load(open('$work/b1/report.json'));print(r['rootfs']['os_overhead_bytes'])")
squash=$(python3 -c "import json;r=json.load(open('$work/b1/report.json'));print(r['slot_a']['squashfs_bytes'])")
ratio=$(echo "scale=1; $deb_s / $basalt_s" | bc)
cold_ratio=$(echo "scale=1; $cold_s / $basalt_s" | bc)
cat <<REPORT
warm basalt build (median of $runs):       ${basalt_s} s
debootstrap minbase + mksquashfs, cold:    ${cold_s} s   (ratio ${cold_ratio}x)
debootstrap minbase + mksquashfs, cached:  ${deb_s} s   (ratio ${ratio}x)
basalt rootfs squashfs:                    ${squash} bytes
debootstrap minbase squashfs:              ${deb_bytes} bytes
basalt OS overhead (rootfs minus modules): ${overhead} bytes
REPORT
