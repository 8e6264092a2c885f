//! The board: everything about the hardware an image runs on, so that a
//! recipe stays the same across boards.

use std::path::PathBuf;

use basalt_bundle::config::{BootloaderConfig, BootloaderKind, UbootEnvConfig};
use basalt_bundle::layout::Arch;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::diag::{with_help, Diagnostic, Located, Source};

/// A board file (`boards/<name>.toml`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Board {
    /// The board's name, as recipes and bundles refer to it.
    pub name: Located<String>,
    /// CPU architecture: `x86_64` or `aarch64`.
    #[schemars(with = "String")]
    pub arch: Arch,
    /// Bootloader back-end: `systemd-boot` (UEFI, Automatic Boot
    /// Assessment), `u-boot` (`bootcount`/`bootlimit`/`altbootcmd` in a
    /// redundant environment; needs `[uboot]`) or `rpi-tryboot` (the
    /// Raspberry Pi 4/5 firmware's `autoboot.txt` and tryboot; needs
    /// `[tryboot]`). basalt-init runs all three and `basalt build` lays
    /// out an image for each (docs/boards.md).
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
    /// The board's kernel: what an image for this board boots unless the
    /// recipe's `[kernel]` names its own (`deb`, or `vmlinuz` with
    /// `modules_dir`). The kernel is per architecture, so it belongs here
    /// and a recipe stays the same across boards.
    #[serde(default)]
    pub kernel: Option<BoardKernelSection>,
    /// Firmware and bootloader files.
    #[serde(default)]
    pub firmware: FirmwareSection,
    /// Partition sizes.
    pub disk: DiskSection,
    /// How `basalt run` emulates the board; absent for boards QEMU cannot
    /// run.
    #[serde(default)]
    pub qemu: Option<QemuSection>,
    /// Where U-Boot keeps its environment; required with
    /// `bootloader = "u-boot"`.
    #[serde(default)]
    pub uboot: Option<UbootSection>,
    /// The Raspberry Pi's slot partitions; required with
    /// `bootloader = "rpi-tryboot"`.
    #[serde(default)]
    pub tryboot: Option<TrybootSection>,
}

/// The bootloader back-ends a board may name.
pub const BOOTLOADERS: [&str; 3] = ["systemd-boot", "u-boot", "rpi-tryboot"];

/// What a buildable board boots with, as [`Board::buildable_bootloader`]
/// found it.
#[derive(Debug, Clone, Copy)]
pub enum BootFirmware<'a> {
    /// systemd-boot: its EFI binary (`[firmware] systemd_boot`).
    SystemdBoot(&'a Located<PathBuf>),
    /// The Raspberry Pi firmware: the firmware files and `config.txt`
    /// lines of `[tryboot]`.
    Tryboot(&'a TrybootSection),
    /// U-Boot, the board's own: where its environment is (`[uboot]`).
    UBoot(&'a UbootSection),
}

/// The partition numbers of slot a's and slot b's boot partitions in the
/// image `basalt build` lays out for `rpi-tryboot` (partition 1 holds
/// `autoboot.txt`).
pub const TRYBOOT_PARTITIONS: [u32; 2] = [2, 3];

impl Board {
    /// Whether the board boots with the Raspberry Pi firmware's tryboot.
    pub fn is_rpi_tryboot(&self) -> bool {
        self.bootloader.value == "rpi-tryboot"
    }

    /// Whether the board boots with U-Boot and its `[uboot]` environment.
    pub fn is_uboot(&self) -> bool {
        self.bootloader.value == "u-boot"
    }

    /// What the device is told about its bootloader back-end (stage 1's
    /// slot config and the root filesystem's bootloader config).
    pub fn bootloader_config(&self) -> BootloaderConfig {
        match (&self.tryboot, self.is_rpi_tryboot()) {
            (Some(t), true) => BootloaderConfig {
                kind: BootloaderKind::RpiTryboot,
                boot_partitions: Some(t.boot_partitions.value),
                uboot_env: None,
            },
            _ => match (&self.uboot, self.is_uboot()) {
                (Some(u), true) => BootloaderConfig {
                    kind: BootloaderKind::UBoot,
                    boot_partitions: None,
                    uboot_env: Some(UbootEnvConfig {
                        device: u.env_device.value.clone(),
                        offset: u.env_offset.value,
                        offset_redund: u.env_offset_redund.value,
                        size: u.env_size.value,
                    }),
                },
                _ => BootloaderConfig::default(),
            },
        }
    }

    /// Checks that the board's bootloader is one basalt knows, with the
    /// section it needs, and that `basalt build` can lay out its image;
    /// returns what it boots with. `src` is the board file, for the
    /// error's place.
    pub fn buildable_bootloader(&self, src: &Source) -> Result<BootFirmware<'_>, Diagnostic> {
        let bl = &self.bootloader;
        let needs = |what: &str| {
            with_help(
                src.error(
                    bl.span.clone(),
                    format!("bootloader `{}` needs a {what} section", bl.value),
                ),
                "see docs/boards.md and docs/reference.md",
            )
        };
        match bl.value.as_str() {
            "systemd-boot" => self
                .firmware
                .systemd_boot
                .as_ref()
                .map(BootFirmware::SystemdBoot)
                .ok_or_else(|| {
                    with_help(
                        src.error(bl.span.clone(), "systemd-boot needs [firmware] systemd_boot"),
                        "name the EFI binary, e.g. \
                             /usr/lib/systemd/boot/efi/systemd-bootx64.efi (Debian's \
                             systemd-boot-efi)",
                    )
                }),
            "rpi-tryboot" => {
                let t = self.tryboot.as_ref().ok_or_else(|| needs("[tryboot]"))?;
                if t.boot_partitions.value != TRYBOOT_PARTITIONS {
                    return Err(with_help(
                        src.error(
                            t.boot_partitions.span.clone(),
                            format!(
                                "`basalt build` puts slot a's boot partition at {} and slot \
                                 b's at {}",
                                TRYBOOT_PARTITIONS[0], TRYBOOT_PARTITIONS[1]
                            ),
                        ),
                        format!("write boot_partitions = {TRYBOOT_PARTITIONS:?}"),
                    ));
                }
                for line in &t.config {
                    let key = line.value.trim_start().to_ascii_lowercase();
                    let own = ["kernel=", "initramfs", "cmdline=", "os_prefix="]
                        .into_iter()
                        .find(|k| key.starts_with(k));
                    if let Some(own) = own {
                        return Err(with_help(
                            src.error(
                                line.span.clone(),
                                format!("`{own}` in [tryboot] config would override basalt's"),
                            ),
                            "basalt writes kernel=, initramfs and cmdline.txt for each slot; \
                             remove this line",
                        ));
                    }
                    if line.value.contains(['\n', '\r']) {
                        return Err(with_help(
                            src.error(line.span.clone(), "a [tryboot] config line holds a newline"),
                            "give each config.txt line as its own string",
                        ));
                    }
                }
                if self.arch != Arch::Aarch64 {
                    return Err(with_help(
                        src.error(bl.span.clone(), "rpi-tryboot boots 64-bit ARM kernels only"),
                        "write arch = \"aarch64\"",
                    ));
                }
                Ok(BootFirmware::Tryboot(t))
            }
            "u-boot" => {
                let u = self.uboot.as_ref().ok_or_else(|| needs("[uboot]"))?;
                u.check(src)?;
                if self.arch != Arch::Aarch64 {
                    return Err(with_help(
                        src.error(bl.span.clone(), "u-boot boards boot 64-bit ARM kernels (booti)"),
                        "write arch = \"aarch64\"",
                    ));
                }
                Ok(BootFirmware::UBoot(u))
            }
            _ => Err(with_help(
                src.error(bl.span.clone(), "unknown bootloader back-end"),
                format!("the back-ends are: {}", BOOTLOADERS.join(", ")),
            )),
        }
    }
}

/// `[uboot]`: the redundant U-Boot environment, with the numbers U-Boot
/// was built with. Check them with `fw_printenv` and an `fw_env.config`
/// of the same values.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UbootSection {
    /// The device that holds the environment on the target, e.g.
    /// `/dev/mmcblk0`.
    pub env_device: Located<String>,
    /// Byte offset of the first copy (`CONFIG_ENV_OFFSET`).
    pub env_offset: Located<u64>,
    /// Byte offset of the second copy (`CONFIG_ENV_OFFSET_REDUND`); both
    /// copies are required, so a power cut during a write leaves one
    /// whole.
    pub env_offset_redund: Located<u64>,
    /// Size of each copy in bytes (`CONFIG_ENV_SIZE`).
    pub env_size: Located<u64>,
    /// Variables of the board's built-in environment that `bootcmd`
    /// needs and that would otherwise be lost, since U-Boot takes a valid
    /// environment on the card instead of its built-in one: typically
    /// `kernel_addr_r` and `ramdisk_addr_r`, e.g. `{ kernel_addr_r =
    /// "0x40400000", ramdisk_addr_r = "0x48000000" }`. basalt's own
    /// variables (`basalt_*`, `bootcmd`, `altbootcmd`, `bootargs`,
    /// `bootcount`, `bootlimit`, `upgrade_available`) cannot be given.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, Located<String>>,
}

/// The variables basalt's environment owns, which `[uboot] env` cannot
/// set (besides every `basalt_*`).
pub const UBOOT_OWN_VARS: [&str; 6] =
    ["bootcmd", "altbootcmd", "bootargs", "bootcount", "bootlimit", "upgrade_available"];

/// The bytes at the start of a disk that the protective MBR, the primary
/// GPT header and its 128 entries take (LBA 0 to 33).
pub const GPT_PRIMARY_BYTES: u64 = 34 * 512;

/// The smallest environment U-Boot is built with (`CONFIG_ENV_SIZE`
/// defaults are 8 KiB and up; below 1 KiB basalt's variables do not fit).
pub const MIN_ENV_SIZE: u64 = 1024;

impl UbootSection {
    /// Where the first partition may start: the first 1 MiB boundary at or
    /// after the end of both copies (never before 1 MiB).
    pub fn first_partition_offset(&self) -> u64 {
        let end = (self.env_offset.value + self.env_size.value)
            .max(self.env_offset_redund.value + self.env_size.value);
        end.div_ceil(crate::gpt::ALIGNMENT).max(1) * crate::gpt::ALIGNMENT
    }

    /// Checks the numbers: a size of whole sectors that holds basalt's
    /// variables, copies on sector boundaries, clear of the partition table
    /// and of each other. (The partitions start after both copies, see
    /// [`UbootSection::first_partition_offset`].)
    pub fn check(&self, src: &Source) -> Result<(), Diagnostic> {
        let size = self.env_size.value;
        if size < MIN_ENV_SIZE || !size.is_multiple_of(512) {
            return Err(with_help(
                src.error(
                    self.env_size.span.clone(),
                    format!("env_size {size:#x} is not a whole number of 512-byte sectors of at least {MIN_ENV_SIZE:#x}"),
                ),
                "set it to the CONFIG_ENV_SIZE the board's U-Boot was built with (e.g. 0x4000)",
            ));
        }
        for key in [&self.env_offset, &self.env_offset_redund] {
            if !key.value.is_multiple_of(512) {
                return Err(with_help(
                    src.error(key.span.clone(), format!("{:#x} is not on a 512-byte sector", key.value)),
                    "use the offset the board's U-Boot was built with; it is a whole number of sectors",
                ));
            }
            if key.value < GPT_PRIMARY_BYTES {
                return Err(with_help(
                    src.error(
                        key.span.clone(),
                        format!(
                            "a copy at {:#x} would overwrite the partition table (the first \
                             {GPT_PRIMARY_BYTES:#x} bytes of the disk)",
                            key.value
                        ),
                    ),
                    format!("move it to {GPT_PRIMARY_BYTES:#x} or later, and the board's U-Boot with it"),
                ));
            }
        }
        for (name, value) in &self.env {
            let own = name.starts_with("basalt_") || UBOOT_OWN_VARS.contains(&name.as_str());
            if own || name.is_empty() || name.contains(['=', '\0']) || value.value.contains('\0') {
                return Err(with_help(
                    src.error(
                        value.span.clone(),
                        format!("[uboot] env cannot set `{name}`: basalt writes it or U-Boot cannot store it"),
                    ),
                    "give only variables of the board's own U-Boot, such as kernel_addr_r",
                ));
            }
        }
        let (a, b) = (self.env_offset.value, self.env_offset_redund.value);
        if a.abs_diff(b) < size {
            return Err(with_help(
                src.error(
                    self.env_offset_redund.span.clone(),
                    format!(
                        "the second copy at {b:#x} overlaps the first ({a:#x} to {:#x})",
                        a + size
                    ),
                ),
                format!(
                    "set env_offset_redund to {:#x} or later (env_offset + env_size), or below \
                     env_offset by at least env_size",
                    a + size
                ),
            ));
        }
        Ok(())
    }
}

/// `[tryboot]`: the Raspberry Pi's partitions and firmware. Partition 1
/// is a small FAT partition holding `autoboot.txt`; each slot has its own
/// FAT boot partition with the firmware files, `config.txt`, the kernel,
/// the initramfs and `cmdline.txt`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrybootSection {
    /// The partition numbers of slot a's and slot b's boot partitions, as
    /// `boot_partition` in `autoboot.txt` counts them (from 1). The image
    /// `basalt build` writes has them at `[2, 3]`.
    pub boot_partitions: Located<[u32; 2]>,
    /// The firmware files every slot's boot partition holds, relative to
    /// the board file: on a Pi 4 `start4.elf`, `fixup4.dat`, the board's
    /// device tree (`bcm2711-rpi-4-b.dtb`) and the `overlays` folder; on a
    /// Pi 5 (its EEPROM holds the firmware) the device tree
    /// (`bcm2712-rpi-5-b.dtb`) and `overlays`. They come from the `boot/`
    /// folder of Raspberry Pi's firmware repository, which the user
    /// supplies. A file goes to the partition's top level under its own
    /// name; a folder goes there with everything in it.
    pub firmware: Vec<Located<PathBuf>>,
    /// Lines added to each slot's `config.txt` after basalt's own
    /// (`arm_64bit=1`, `kernel=vmlinuz`, `initramfs initrd followkernel`),
    /// e.g. `enable_uart=1` for a serial console. Lines that would choose
    /// another kernel, initramfs, command line or folder (`kernel=`,
    /// `initramfs`, `cmdline=`, `os_prefix=`) are refused: each slot's
    /// partition must boot its own files.
    #[serde(default)]
    pub config: Vec<Located<String>>,
}

fn default_root_wait() -> crate::duration::Duration {
    crate::duration::Duration(10_000)
}

/// `[kernel]` of a board: the default kernel of its images. Paths are
/// relative to the board file. Give either `deb`, or `vmlinuz` with
/// `modules_dir`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BoardKernelSection {
    /// A Debian kernel package (`linux-image-*.deb`) of the board's
    /// architecture, e.g. `../.cache/kernel/linux-image-cloud-arm64.deb`
    /// (ci/setup.sh fetches Debian's cloud kernels there).
    #[serde(default)]
    pub deb: Option<Located<PathBuf>>,
    /// A kernel image file, instead of `deb`.
    #[serde(default)]
    pub vmlinuz: Option<Located<PathBuf>>,
    /// The `lib/modules/<release>` folder that goes with `vmlinuz`.
    #[serde(default)]
    pub modules_dir: Option<Located<PathBuf>>,
}

/// `[firmware]`: files the bootloader needs.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FirmwareSection {
    /// The systemd-boot EFI binary of the board's architecture
    /// (`systemd-bootx64.efi`, `systemd-bootaa64.efi`), installed as the
    /// removable-media boot file (`EFI/BOOT/BOOTX64.EFI`,
    /// `EFI/BOOT/BOOTAA64.EFI`); required with
    /// `bootloader = "systemd-boot"`.
    #[serde(default)]
    pub systemd_boot: Option<Located<PathBuf>>,
}

/// `[disk]`: partition sizes in MiB. Each root slot must hold the largest
/// root filesystem (squashfs plus its hash tree) the device will ever
/// install, so leave room for growth.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// The FAT boot partition that holds the kernels and initrds: the EFI
    /// system partition (FAT32, at least 34 MiB: bootloader and both
    /// slots' kernels) with systemd-boot and U-Boot; each slot's boot
    /// partition with `rpi-tryboot`.
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
    /// UEFI firmware code (read-only), e.g. OVMF_CODE or AAVMF_CODE.
    pub firmware_code: PathBuf,
    /// UEFI variable store template; each run gets a private copy. On
    /// `-machine virt` (arm) QEMU wants both flash images at 64 MiB:
    /// smaller ones are padded in the private copies.
    pub firmware_vars: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every board in boards/ parses; `basalt build` accepts the
    /// systemd-boot ones and refuses the others with a reason.
    #[test]
    fn every_board_file_parses_and_says_whether_it_builds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let src = Source::read(&path).unwrap();
            let board: Board = src.parse().unwrap_or_else(|e| panic!("{e}"));
            let verdict = board.buildable_bootloader(&src);
            match board.bootloader.value.as_str() {
                "systemd-boot" => {
                    let verdict = verdict.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let BootFirmware::SystemdBoot(sd_boot) = verdict else {
                        panic!("{}: {verdict:?}", path.display())
                    };
                    // The EFI binary must be the board's architecture.
                    let file = sd_boot.value.file_name().unwrap().to_string_lossy().into_owned();
                    let want = match board.arch {
                        Arch::X86_64 => "systemd-bootx64.efi",
                        Arch::Aarch64 => "systemd-bootaa64.efi",
                    };
                    assert_eq!(file, want, "{}", path.display());
                }
                "rpi-tryboot" => {
                    let verdict = verdict.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let BootFirmware::Tryboot(t) = verdict else {
                        panic!("{}: {verdict:?}", path.display())
                    };
                    // A device tree in every Pi's list; start4.elf only on a Pi 4 (a Pi 5
                    // starts from its EEPROM).
                    let names: Vec<_> = t
                        .firmware
                        .iter()
                        .map(|f| f.value.file_name().unwrap().to_string_lossy().into_owned())
                        .collect();
                    assert!(names.iter().any(|n| n.ends_with(".dtb")), "{names:?}");
                    let pi4 = names.iter().any(|n| n == "bcm2711-rpi-4-b.dtb");
                    assert_eq!(names.iter().any(|n| n == "start4.elf"), pi4, "{names:?}");
                }
                "u-boot" => {
                    let verdict = verdict.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let BootFirmware::UBoot(u) = verdict else {
                        panic!("{}: {verdict:?}", path.display())
                    };
                    assert!(u.first_partition_offset() >= u.env_offset_redund.value);
                }
                other => panic!("{}: bootloader {other}", path.display()),
            }
            seen.push(board.name.value.clone());
        }
        seen.sort();
        for name in ["qemu-aarch64", "qemu-x86_64", "rpi4", "rpi5", "uboot-arm64", "uefi-arm64"] {
            assert!(seen.iter().any(|s| s == name), "{name} missing from {seen:?}");
        }
    }

    #[test]
    fn a_bootloader_without_its_section_is_an_error() {
        let text = "name = \"x\"\narch = \"aarch64\"\nbootloader = \"u-boot\"\n\
                    [disk]\nesp_mib = 64\nroot_mib = 64\ndata_mib = 64\n";
        let src = Source { path: "x.toml".into(), text: text.into() };
        let board: Board = src.parse().unwrap();
        let e = board.buildable_bootloader(&src).unwrap_err().to_string();
        assert!(e.contains("needs a [uboot] section"), "{e}");
        let src = Source { text: text.replace("u-boot", "grub"), ..src };
        let board: Board = src.parse().unwrap();
        let e = board.buildable_bootloader(&src).unwrap_err().to_string();
        assert!(e.contains("unknown bootloader back-end"), "{e}");
        assert!(e.contains("systemd-boot, u-boot, rpi-tryboot"), "{e}");
        let src = Source { text: text.replace("u-boot", "systemd-boot"), ..src };
        let board: Board = src.parse().unwrap();
        let e = board.buildable_bootloader(&src).unwrap_err().to_string();
        assert!(e.contains("needs [firmware] systemd_boot"), "{e}");
        let pi = text.replace("u-boot", "rpi-tryboot");
        let src = Source { text: pi.clone(), ..src };
        let board: Board = src.parse().unwrap();
        let e = board.buildable_bootloader(&src).unwrap_err().to_string();
        assert!(e.contains("needs a [tryboot] section"), "{e}");
        // The firmware list is required, and the layout fixes the partitions.
        let src = Source { text: format!("{pi}[tryboot]\nboot_partitions = [2, 3]\n"), ..src };
        let e = src.parse::<Board>().unwrap_err().to_string();
        assert!(e.contains("firmware"), "{e}");
        let t = "[tryboot]\nboot_partitions = [3, 4]\nfirmware = [\"x.dtb\"]\n";
        let src = Source { text: format!("{pi}{t}"), ..src };
        let board: Board = src.parse().unwrap();
        let e = board.buildable_bootloader(&src).unwrap_err().to_string();
        assert!(e.contains("slot a's boot partition at 2"), "{e}");
        let src = Source { text: format!("{pi}{t}").replace("[3, 4]", "[2, 3]"), ..src };
        let board: Board = src.parse().unwrap();
        assert!(matches!(board.buildable_bootloader(&src), Ok(BootFirmware::Tryboot(_))));
        for bad in ["kernel=other.img", " initramfs x followkernel", "a\nb"] {
            let with = format!("{}config = [{bad:?}]\n", src.text);
            let s2 = Source { text: with, ..src.clone() };
            let board: Board = s2.parse().unwrap();
            let e = board.buildable_bootloader(&s2).unwrap_err().to_string();
            assert!(e.contains("override basalt's") || e.contains("newline"), "{bad}: {e}");
        }
        let src = Source { text: src.text.replace("aarch64", "x86_64"), ..src };
        let board: Board = src.parse().unwrap();
        let e = board.buildable_bootloader(&src).unwrap_err().to_string();
        assert!(e.contains("64-bit ARM kernels only"), "{e}");
    }

    #[test]
    fn uboot_environments_that_collide_are_refused_at_their_key() {
        let base = "name = \"x\"\narch = \"aarch64\"\nbootloader = \"u-boot\"\n\
                    [disk]\nesp_mib = 64\nroot_mib = 64\ndata_mib = 64\n[uboot]\n\
                    env_device = \"/dev/mmcblk0\"\n";
        let with = |a: &str, b: &str, size: &str| Source {
            path: "u.toml".into(),
            text: format!("{base}env_offset = {a}\nenv_offset_redund = {b}\nenv_size = {size}\n"),
        };
        let src = with("0x3F8000", "0x3FC000", "0x4000");
        let board: Board = src.parse().unwrap();
        let Ok(BootFirmware::UBoot(u)) = board.buildable_bootloader(&src) else { panic!() };
        assert_eq!(u.first_partition_offset(), 4 << 20);
        let src = with("0x400000", "0x404000", "0x4000");
        let board: Board = src.parse().unwrap();
        let Ok(BootFirmware::UBoot(u)) = board.buildable_bootloader(&src) else { panic!() };
        assert_eq!(u.first_partition_offset(), 5 << 20);
        for (a, b, size, key, want) in [
            (
                "0x3F8000",
                "0x3FA000",
                "0x4000",
                "env_offset_redund = 0x3FA000",
                "overlaps the first",
            ),
            ("0x3F8000", "0x3FC000", "0x4100", "env_size = 0x4100", "512-byte sectors"),
            ("0x3F8000", "0x3FC000", "0x200", "env_size = 0x200", "512-byte sectors"),
            ("0x2000", "0x3FC000", "0x2000", "env_offset = 0x2000", "partition table"),
            ("0x3F8000", "0x3FC001", "0x2000", "env_offset_redund = 0x3FC001", "sector"),
        ] {
            let src = with(a, b, size);
            let board: Board = src.parse().unwrap();
            let e = board.buildable_bootloader(&src).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
            let line = src.text.find(key).map(|at| src.text[..at].lines().count() + 1).unwrap();
            assert!(e.contains(&format!("u.toml:{line}")), "{key} (line {line}): {e}");
        }
        let src = Source {
            text: with("0x3F8000", "0x3FC000", "0x4000").text.replace("aarch64", "x86_64"),
            ..src_of(base)
        };
        let board: Board = src.parse().unwrap();
        assert!(board.buildable_bootloader(&src).unwrap_err().to_string().contains("booti"));
    }

    fn src_of(text: &str) -> Source {
        Source { path: "u.toml".into(), text: text.into() }
    }
}
