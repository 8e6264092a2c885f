#!/usr/bin/env bash
# Installs everything basalt needs on a fresh Debian machine, and fetches the
# reference kernel. Idempotent: run it as often as you like.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

packages=(
  qemu-system-x86 ovmf systemd-boot-efi   # boot images: emulator, UEFI, bootloader
  squashfs-tools cryptsetup-bin dosfstools mtools gdisk e2fsprogs bmap-tools  # judges of our formats
  kmod cpio zstd xz-utils                 # module and initramfs inspection
  musl-tools                              # static device binaries (crates that compile C)
  nginx-light                             # serves update repositories in the pull scenarios
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
  || rustup target add x86_64-unknown-linux-musl

# The reference kernel: Debian's cloud kernel, the versioned package the
# meta package depends on, kept under a stable name for the recipes.
kdir=.cache/kernel
mkdir -p "$kdir"
if [ ! -e "$kdir/linux-image-cloud-amd64.deb" ]; then
  [ -n "$(ls /var/lib/apt/lists/*Packages 2>/dev/null | head -n1)" ] || $SUDO apt-get update -q
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  if [ -z "$pkg" ]; then
    echo "setup: cannot find the versioned package of linux-image-cloud-amd64 (apt-get update?)" >&2
    exit 1
  fi
  echo "setup: fetching $pkg"
  (cd "$kdir" && apt-get download -q "$pkg")
  deb=$(ls -t "$kdir"/"$pkg"_*.deb | head -n1)
  ln -sf "$(basename "$deb")" "$kdir/linux-image-cloud-amd64.deb"
fi
echo "setup: ok (kernel $(readlink "$kdir/linux-image-cloud-amd64.deb"))"
