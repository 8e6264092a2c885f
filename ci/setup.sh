#!/usr/bin/env bash
# Installs everything basalt needs on a fresh Debian machine, and fetches the
# reference kernel. Idempotent: run it as often as you like.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

packages=(
  qemu-system-x86 ovmf systemd-boot-efi   # boot images: emulator, UEFI, bootloader
  qemu-system-arm qemu-efi-aarch64        # the aarch64 boards: emulator, UEFI (AAVMF)
  gcc-aarch64-linux-gnu musl-dev:arm64    # C code of the aarch64 device programs (zstd): aarch64-linux-musl-gcc
  squashfs-tools cryptsetup-bin dosfstools mtools gdisk e2fsprogs bmap-tools  # judges of our formats
  kmod cpio zstd xz-utils openssl procps  # module and initramfs inspection; keys; pkill
  musl-tools                              # static device binaries (crates that compile C)
  nginx-light                             # serves update repositories in the pull scenarios
  prometheus                              # promtool judges the runtime's /metrics
  libubootenv-tool                        # fw_printenv/fw_setenv judge the U-Boot environment we write
  python3 python3-venv                    # test models, reference outputs, KServe client (ci/models)
)
# arm64 packages are only downloaded (the arm64 kernel and systemd-boot),
# never installed: their lists come with the foreign architecture.
updated=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: adding the arm64 architecture to apt (for apt-get download)"
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -q
  updated=1
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  [ "$updated" = 1 ] || $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
done

# The reference kernels: Debian's cloud kernels, the versioned packages the
# meta packages depend on, kept under stable names for the board files.
kdir=.cache/kernel
mkdir -p "$kdir"
for arch in amd64 arm64; do
  [ ! -e "$kdir/linux-image-cloud-$arch.deb" ] || continue
  [ -n "$(ls /var/lib/apt/lists/*Packages 2>/dev/null | head -n1)" ] || $SUDO apt-get update -q
  pkg=$(apt-cache depends "linux-image-cloud-$arch:$arch" | awk '/Depends: linux-image-/{print $2; exit}')
  pkg=${pkg%%:*}
  if [ -z "$pkg" ]; then
    echo "setup: cannot find the versioned package of linux-image-cloud-$arch (apt-get update?)" >&2
    exit 1
  fi
  echo "setup: fetching $pkg"
  (cd "$kdir" && apt-get download -q "$pkg:$arch")
  deb=$(ls -t "$kdir"/"$pkg"_*_"$arch".deb | head -n1)
  ln -sf "$(basename "$deb")" "$kdir/linux-image-cloud-$arch.deb"
done
# systemd-boot for arm64 (the aarch64 boards' bootloader), from Debian's
# systemd-boot-efi:arm64, unpacked here rather than installed.
sdir=.cache/systemd-boot
if [ ! -s "$sdir/systemd-bootaa64.efi" ]; then
  mkdir -p "$sdir"
  tmp=$(mktemp -d)
  echo "setup: fetching systemd-boot-efi:arm64"
  (cd "$tmp" && apt-get download -q systemd-boot-efi:arm64)
  dpkg-deb -x "$tmp"/systemd-boot-efi_*_arm64.deb "$tmp/root"
  cp "$tmp/root/usr/lib/systemd/boot/efi/systemd-bootaa64.efi" "$sdir/systemd-bootaa64.efi.tmp"
  mv "$sdir/systemd-bootaa64.efi.tmp" "$sdir/systemd-bootaa64.efi"
  rm -rf "$tmp"
fi
# The Python environment of the model runtime's tests, from Debian's python3
# and the pins in ci/models/requirements.txt; reinstalled when the pins change.
venv=.cache/venv
req=ci/models/requirements.txt
req_hash=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$req_hash" ]; then
  echo "setup: creating $venv from $req"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$req_hash" >"$venv/.requirements.sha256"
fi

# The test models and their reference outputs: remade when one is missing, or
# when the script or the environment that made them changed.
mdir=.cache/models
models_hash=$(cat ci/models/make_models.py "$venv/.requirements.sha256" | sha256sum | cut -d' ' -f1)
models_ok=1
for m in mlp cnn mobilenetv3 resnet18 transformer; do
  [ -s "$mdir/$m.onnx" ] && [ -s "$mdir/$m.ref.json" ] && [ -s "$mdir/$m.model.toml" ] || models_ok=0
done
if [ "$models_ok" = 0 ] || [ "$(cat "$mdir/.make_models.sha256" 2>/dev/null)" != "$models_hash" ]; then
  echo "setup: making test models in $mdir"
  rm -f "$mdir/.make_models.sha256"
  "$venv/bin/python" ci/models/make_models.py "$mdir"
  echo "$models_hash" >"$mdir/.make_models.sha256"
fi

# A development signing key for the reference images (recipes/gateway.toml
# signs its baked-in model with it and trusts it): made here, on this
# machine, never committed. Production keys come from `basalt keygen`.
keys=.cache/keys
if [ ! -s "$keys/dev.key" ] || [ ! -s "$keys/dev.pub" ]; then
  mkdir -p "$keys"
  (umask 077 && openssl genpkey -algorithm ed25519 -out "$keys/dev.key.tmp") && mv "$keys/dev.key.tmp" "$keys/dev.key"
  openssl pkey -in "$keys/dev.key" -pubout -out "$keys/dev.pub"
  echo "setup: made the development key $keys/dev.key"
fi

echo "setup: ok (kernels $(readlink "$kdir/linux-image-cloud-amd64.deb") $(readlink "$kdir/linux-image-cloud-arm64.deb"), $("$venv/bin/python" -c 'import onnxruntime; print("onnxruntime", onnxruntime.__version__)'))"
