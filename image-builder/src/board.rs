//! The board: everything about the hardware an image runs on, so that a
//! recipe stays the same across boards.

use std::path::PathBuf;

use basalt_bundle::layout::Arch;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::diag::Located;

/// A board file (`boards/<name>.toml`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Board {
    /// The board's name, as recipes and bundles refer to it.
    pub name: Located<String>,
    /// CPU architecture: `x86_64` or `aarch64`.
    #[schemars(with = "String")]
    pub arch: Arch,
    /// Bootloader back-end: `systemd-boot`.
    pub bootloader: Located<String>,
    /// Kernel command line every image on this board gets (console,
    /// panic behaviour); `basalt.slot=` is added per slot.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Modules stage 1 loads from the initramfs, in this order (each
    /// after its dependencies): the disk driver, dm-verity, squashfs, and
    /// what the ESP needs (vfat and its code pages).
    #[serde(default)]
    pub stage1_modules: Vec<Located<String>>,
    /// Modules stage 2 loads from the root filesystem, each after its dependencies, e.g. the network driver.
    #[serde(default)]
    pub modules: Vec<Located<String>>,
    /// How long stage 1 waits for the root partition to appear.
    #[serde(default = "default_root_wait")]
    pub root_wait: crate::duration::Duration,
    /// Firmware and bootloader files.
    pub firmware: FirmwareSection,
    /// Partition sizes.
    pub disk: DiskSection,
    /// How `basalt run` emulates the board; absent for boards QEMU cannot
    /// run.
    #[serde(default)]
    pub qemu: Option<QemuSection>,
}

fn default_root_wait() -> crate::duration::Duration {
    crate::duration::Duration(10_000)
}

/// `[firmware]`: files the bootloader needs.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FirmwareSection {
    /// The systemd-boot EFI binary, installed as the removable-media boot
    /// file (`EFI/BOOT/BOOTX64.EFI`).
    pub systemd_boot: Located<PathBuf>,
}

/// `[disk]`: partition sizes in MiB. Each root slot must hold the largest
/// root filesystem (squashfs plus its hash tree) the device will ever
/// install, so leave room for growth.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// EFI system partition (FAT32, at least 34 MiB): bootloader and two
    /// kernels with their initrds.
    pub esp_mib: Located<u64>,
    /// Each of the two root slots.
    pub root_mib: Located<u64>,
    /// The persistent data partition (ext4).
    pub data_mib: Located<u64>,
    /// Total disk size; the image is exactly this big when set (the data
    /// partition does not grow to fill it).
    #[serde(default)]
    pub total_mib: Option<Located<u64>>,
}

/// `[qemu]`: the emulated machine for `basalt run` and the tests.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QemuSection {
    /// The QEMU program, e.g. `qemu-system-x86_64`.
    pub binary: String,
    /// `-machine` value, e.g. `q35`.
    pub machine: String,
    /// `-cpu` value, e.g. `max`.
    #[serde(default)]
    pub cpu: Option<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// UEFI firmware code (read-only), e.g. OVMF_CODE.
    pub firmware_code: PathBuf,
    /// UEFI variable store template; each run gets a private copy.
    pub firmware_vars: PathBuf,
}
