//! Partition labels and type GUIDs of a basalt disk.
//!
//! The type GUIDs follow the Discoverable Partitions Specification, so that
//! generic tools (`systemd-dissect`, `sgdisk -p`) recognise each partition.

use crate::guid::Guid;

/// PARTLABEL of the EFI system partition.
pub const ESP_LABEL: &str = "esp";
/// PARTLABEL of root slot `a`.
pub const ROOTFS_A_LABEL: &str = "rootfs_a";
/// PARTLABEL of root slot `b`.
pub const ROOTFS_B_LABEL: &str = "rootfs_b";
/// PARTLABEL of the persistent data partition, mounted at `/data`.
pub const DATA_LABEL: &str = "data";
/// PARTLABEL of a Raspberry Pi image's first partition, the small FAT
/// partition that holds `autoboot.txt`.
pub const RPI_AUTOBOOT_LABEL: &str = "autoboot";
/// PARTLABEL of slot `a`'s FAT boot partition on a Raspberry Pi image.
pub const RPI_BOOT_A_LABEL: &str = "boot_a";
/// PARTLABEL of slot `b`'s FAT boot partition on a Raspberry Pi image.
pub const RPI_BOOT_B_LABEL: &str = "boot_b";

/// Type GUID of an EFI system partition.
pub const ESP_TYPE: Guid = Guid::from_str_const("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
/// Type GUID of a Microsoft basic data partition: the Raspberry Pi
/// bootloader looks for its FAT partitions on a GPT disk among basic data
/// and EFI system partitions only.
pub const BASIC_DATA_TYPE: Guid = Guid::from_str_const("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7");
/// Type GUID of a generic Linux filesystem (used for `data`).
pub const LINUX_DATA_TYPE: Guid = Guid::from_str_const("0fc63daf-8483-4772-8e79-3d69d8477de4");
/// Type GUID of an x86-64 root partition.
pub const ROOT_X86_64_TYPE: Guid = Guid::from_str_const("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
/// Type GUID of an arm64 root partition.
pub const ROOT_ARM64_TYPE: Guid = Guid::from_str_const("b921b045-1df0-41c3-af44-4c6f280d3fae");

/// CPU architectures basalt builds images for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// 64-bit x86 (`x86_64-unknown-linux-musl` binaries).
    X86_64,
    /// 64-bit ARM (`aarch64-unknown-linux-musl` binaries).
    Aarch64,
}

impl Arch {
    /// The Discoverable Partitions type GUID of a root partition for this arch.
    pub fn root_type(self) -> Guid {
        match self {
            Arch::X86_64 => ROOT_X86_64_TYPE,
            Arch::Aarch64 => ROOT_ARM64_TYPE,
        }
    }

    /// The Rust target triple of the static device binaries.
    pub fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// The name of the removable-media boot file UEFI firmware looks for.
    pub fn efi_boot_file(self) -> &'static str {
        match self {
            Arch::X86_64 => "BOOTX64.EFI",
            Arch::Aarch64 => "BOOTAA64.EFI",
        }
    }

    /// The architecture's name as written in board files.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}
