//! Which bootloader back-end this device runs, chosen from the
//! [`BootloaderConfig`] the builder wrote, with the partitions it works on
//! mounted only while it is used (so a power cut at any other time finds
//! every FAT clean).
//!
//! - systemd-boot: the ESP (PARTLABEL `esp`), as [`EspLocation`] mounts it;
//! - rpi-tryboot: partition 1 (`autoboot`, with `autoboot.txt`) and the
//!   two slots' boot partitions (`boot_a`, `boot_b`), mounted read-write
//!   under one folder, and the firmware's device-tree node for the
//!   partition it booted and the tryboot flag;
//! - u-boot: the boot partition (PARTLABEL `esp`, with each slot's kernel
//!   and initrd in `/<slot>/`), mounted as systemd-boot's ESP is, and the
//!   redundant environment at the offsets the board gave, on the device it
//!   named (e.g. `/dev/mmcblk0`), read and written in place.
//!
//! PID 1 and the update agent each have their own mount folder, so that
//! neither unmounts what the other is using. All mounting goes through
//! [`platform::mount`].

use std::path::{Path, PathBuf};

use basalt_bundle::config::{BootloaderConfig, BootloaderKind};
use basalt_bundle::layout::RPI_AUTOBOOT_LABEL;
use basalt_bundle::slot::Slot;

use crate::assess::{AssessError, Bootloader, EspLocation, SystemdBoot};
use crate::pending_try::TryView;
use crate::platform;
use crate::tryboot::{Tryboot, TrybootLocation};
use crate::uboot::{EnvCopy, EnvLocation, UBoot};

/// Where the Raspberry Pi firmware tells the OS what it booted.
pub const FIRMWARE_NODE: &str = "/proc/device-tree/chosen/bootloader";

/// Where a process mounts a back-end's partitions: one folder for an ESP
/// or U-Boot boot partition, another under which a Pi's `autoboot`,
/// `boot_a` and `boot_b` go. PID 1 and the update agent each have their
/// own, so their mounts never meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountBases {
    /// The boot partition's mount point (systemd-boot, U-Boot).
    pub boot: &'static str,
    /// The folder of a Pi's three FAT partitions.
    pub tryboot: &'static str,
}

/// PID 1's mounts (stage 1 and stage 2).
pub const PID1_MOUNTS: MountBases =
    MountBases { boot: basalt_bundle::config::ESP_MOUNT, tryboot: "/run/basalt/tryboot" };

/// The Raspberry Pi partitions to mount and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrybootMounts {
    /// `/sys/class/block`.
    pub sys_class_block: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
    /// The folder under which `autoboot`, `boot_a` and `boot_b` are
    /// mounted.
    pub mount_base: PathBuf,
    /// Slot a's and slot b's partition numbers, as `autoboot.txt` counts.
    pub partitions: [u32; 2],
    /// The firmware's device-tree node ([`FIRMWARE_NODE`]).
    pub firmware: PathBuf,
}

/// The bootloader back-end of this device.
#[derive(Debug, Clone)]
pub enum Backend {
    /// systemd-boot on the ESP.
    SystemdBoot(EspLocation),
    /// The Raspberry Pi firmware's tryboot.
    Tryboot(TrybootMounts),
    /// U-Boot's boot counting: the boot partition, mounted like the ESP,
    /// and the environment; `None` when the image's config names no
    /// environment (every use then fails, saying so).
    UBoot(EspLocation, Option<EnvLocation>),
}

/// The environment's two copies on the device `config` names.
pub fn uboot_env(config: &BootloaderConfig) -> Option<EnvLocation> {
    let e = config.uboot_env.as_ref()?;
    let copy = |offset| EnvCopy { path: PathBuf::from(&e.device), offset, size: e.size };
    Some(EnvLocation { primary: copy(e.offset), redundant: Some(copy(e.offset_redund)) })
}

impl Backend {
    /// The back-end `config` names, its partitions found in
    /// `sys_class_block` with nodes under `dev`, mounted at (systemd-boot)
    /// or under (rpi-tryboot) `mount_base`; U-Boot's boot partition is
    /// mounted at `mount_base` too. A Pi config without partition
    /// numbers takes slot a's at 2 and slot b's at 3, the image's layout.
    pub fn from_config(
        config: &BootloaderConfig,
        sys_class_block: &Path,
        dev: &Path,
        mount_base: &Path,
        firmware: &Path,
    ) -> Backend {
        match config.kind {
            BootloaderKind::SystemdBoot => Backend::SystemdBoot(EspLocation {
                sys_class_block: sys_class_block.to_path_buf(),
                dev: dev.to_path_buf(),
                mount_point: mount_base.to_path_buf(),
            }),
            BootloaderKind::RpiTryboot => Backend::Tryboot(TrybootMounts {
                sys_class_block: sys_class_block.to_path_buf(),
                dev: dev.to_path_buf(),
                mount_base: mount_base.to_path_buf(),
                partitions: config.boot_partitions.unwrap_or([2, 3]),
                firmware: firmware.to_path_buf(),
            }),
            BootloaderKind::UBoot => Backend::UBoot(
                EspLocation {
                    sys_class_block: sys_class_block.to_path_buf(),
                    dev: dev.to_path_buf(),
                    mount_point: mount_base.to_path_buf(),
                },
                uboot_env(config),
            ),
        }
    }

    /// The back-end of a running device: `config` read by the caller
    /// from the image, sysfs and `/dev`, its partitions mounted under
    /// `mounts`' folder for the back-end's kind.
    pub fn on_device(config: &BootloaderConfig, mounts: &MountBases) -> Backend {
        let base = match config.kind {
            BootloaderKind::SystemdBoot | BootloaderKind::UBoot => mounts.boot,
            BootloaderKind::RpiTryboot => mounts.tryboot,
        };
        Backend::from_config(
            config,
            Path::new("/sys/class/block"),
            Path::new("/dev"),
            Path::new(base),
            Path::new(FIRMWARE_NODE),
        )
    }

    /// The `reboot(2)` argument that starts a try, when the back-end needs
    /// one (the Pi's `0 tryboot`); systemd-boot tries a new entry on any
    /// boot, and U-Boot boots the slot the environment selects on any.
    pub fn reboot_to_try(&self) -> Option<&'static str> {
        match self {
            Backend::SystemdBoot(_) | Backend::UBoot(..) => None,
            Backend::Tryboot(_) => Some(crate::tryboot::TRYBOOT_ARG),
        }
    }

    /// What the firmware reported for this boot and which slot
    /// `autoboot.txt` arms, for [`crate::pending_try`]; `None` for a
    /// back-end that tries a new slot on any boot.
    pub fn try_view(&self) -> Result<Option<TryView>, AssessError> {
        match self {
            Backend::SystemdBoot(_) | Backend::UBoot(..) => Ok(None),
            Backend::Tryboot(m) => m.with_mounted(|loc| Tryboot::new(loc)?.try_view().map(Some)),
        }
    }

    /// Mounts the back-end's partitions, runs `f` with the back-end (which
    /// reports `booted` as the booted slot, or, on a Pi, what the firmware
    /// says), then flushes and unmounts them.
    pub fn with_bootloader<T, E: From<AssessError>>(
        &self,
        booted: Option<Slot>,
        f: impl FnOnce(&mut dyn Bootloader) -> Result<T, E>,
    ) -> Result<T, E> {
        match self {
            Backend::SystemdBoot(esp) => esp.with_mounted(|at| {
                let mut bl = SystemdBoot::new(at, booted);
                f(&mut bl)
            }),
            Backend::Tryboot(m) => m.with_mounted(|loc| {
                let mut bl = Tryboot::new(loc)?;
                f(&mut bl)
            }),
            Backend::UBoot(_, None) => Err(E::from(AssessError::Refused(
                "the image's bootloader config names u-boot but no environment \
                 ([uboot_env]); rebuild the image for a board with [uboot]"
                    .into(),
            ))),
            Backend::UBoot(boot, Some(env)) => boot.with_mounted(|at| {
                let mut bl = UBoot::new(env.clone(), at, booted);
                f(&mut bl)
            }),
        }
    }
}

impl TrybootMounts {
    /// Where each partition goes: `(PARTLABEL, mount point)`, partition 1
    /// first.
    pub fn mount_points(&self) -> [(&'static str, PathBuf); 3] {
        [
            (RPI_AUTOBOOT_LABEL, self.mount_base.join(RPI_AUTOBOOT_LABEL)),
            (Slot::A.rpi_boot_partlabel(), self.mount_base.join(Slot::A.rpi_boot_partlabel())),
            (Slot::B.rpi_boot_partlabel(), self.mount_base.join(Slot::B.rpi_boot_partlabel())),
        ]
    }

    /// The back-end's view of the mounted partitions.
    pub fn location(&self) -> TrybootLocation {
        let [(_, config), (_, a), (_, b)] = self.mount_points();
        TrybootLocation {
            config,
            boot: [a, b],
            partitions: self.partitions,
            firmware: self.firmware.clone(),
        }
    }

    /// Mounts partition 1 and both slots' boot partitions read-write, runs
    /// `f`, flushes and unmounts what was mounted, even when `f` or a later
    /// mount failed.
    pub fn with_mounted<T, E: From<AssessError>>(
        &self,
        f: impl FnOnce(TrybootLocation) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut mounted: Vec<PathBuf> = Vec::new();
        let mut result = Ok(());
        for (label, at) in self.mount_points() {
            match self.mount_one(label, &at) {
                Ok(()) => mounted.push(at),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let out = match result {
            Ok(()) => f(self.location()),
            Err(e) => Err(E::from(e)),
        };
        for at in mounted.iter().rev() {
            let _ = platform::mount::sync_fs(at);
            if platform::mount::unmount(at, false).is_err() {
                // Something still holds it; detach it so it goes when released.
                let _ = platform::mount::unmount(at, true);
            }
        }
        out
    }

    fn mount_one(&self, label: &'static str, at: &Path) -> Result<(), AssessError> {
        use platform::mount::MountFlags;
        let sys = self.sys_class_block.clone();
        let dev = match platform::block::find_by_partlabel(&sys, label) {
            Ok(Some(d)) => d.node(&self.dev),
            Ok(None) => return Err(AssessError::NoBootPartition { label, sys }),
            Err(source) => return Err(AssessError::ListBlock { sys, source }),
        };
        let flags = MountFlags::MS_NOSUID | MountFlags::MS_NODEV | MountFlags::MS_NOEXEC;
        let _ = std::fs::create_dir_all(at);
        platform::mount::mount(&dev.to_string_lossy(), at, "vfat", flags, None)
            .map_err(|source| AssessError::Mount { dev: dev.clone(), at: at.to_path_buf(), source })
    }
}

/// Reads the image's bootloader config from `path`; a missing file means
/// systemd-boot (images built before the file existed, and every UEFI
/// image). A file that cannot be read or parsed is an error for the
/// caller to report.
pub fn read_config(path: &Path) -> Result<BootloaderConfig, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => BootloaderConfig::from_toml(&text).map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BootloaderConfig::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pi() -> BootloaderConfig {
        BootloaderConfig {
            kind: BootloaderKind::RpiTryboot,
            boot_partitions: Some([2, 3]),
            uboot_env: None,
        }
    }

    #[test]
    fn the_config_chooses_the_back_end() {
        let (sys, dev, base, fw) =
            (Path::new("/s"), Path::new("/d"), Path::new("/run/x"), Path::new("/fw"));
        let b = Backend::from_config(&BootloaderConfig::default(), sys, dev, base, fw);
        let Backend::SystemdBoot(esp) = &b else { panic!("{b:?}") };
        assert_eq!(esp.mount_point, base);
        assert_eq!(b.reboot_to_try(), None);

        let b = Backend::from_config(&pi(), sys, dev, base, fw);
        let Backend::Tryboot(m) = &b else { panic!("{b:?}") };
        assert_eq!(b.reboot_to_try(), Some("0 tryboot"));
        let loc = m.location();
        assert_eq!(loc.config, Path::new("/run/x/autoboot"));
        assert_eq!(loc.boot, [PathBuf::from("/run/x/boot_a"), PathBuf::from("/run/x/boot_b")]);
        assert_eq!((loc.partitions, loc.firmware.as_path()), ([2, 3], fw));
        let odd = BootloaderConfig { boot_partitions: Some([5, 6]), ..pi() };
        let Backend::Tryboot(m) = Backend::from_config(&odd, sys, dev, base, fw) else { panic!() };
        assert_eq!(m.partitions, [5, 6]);

        let b = Backend::from_config(&uboot(), sys, dev, base, fw);
        let Backend::UBoot(boot, Some(env)) = &b else { panic!("{b:?}") };
        assert_eq!((boot.mount_point.as_path(), boot.dev.as_path()), (base, dev));
        assert_eq!(b.reboot_to_try(), None);
        assert!(b.try_view().unwrap().is_none());
        let copy = |offset| EnvCopy { path: "/dev/mmcblk0".into(), offset, size: 0x4000 };
        assert_eq!(env.primary, copy(0x3F8000));
        assert_eq!(env.redundant, Some(copy(0x3FC000)));
    }

    fn uboot() -> BootloaderConfig {
        BootloaderConfig {
            kind: BootloaderKind::UBoot,
            boot_partitions: None,
            uboot_env: Some(basalt_bundle::config::UbootEnvConfig {
                device: "/dev/mmcblk0".into(),
                offset: 0x3F8000,
                offset_redund: 0x3FC000,
                size: 0x4000,
            }),
        }
    }

    /// A u-boot config without its environment runs nothing and says why;
    /// the boot partition is looked for by the ESP's label.
    #[test]
    fn a_uboot_config_without_its_environment_or_partition_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(&sys).unwrap();
        let bare = BootloaderConfig { uboot_env: None, ..uboot() };
        let b = Backend::from_config(&bare, &sys, dir.path(), dir.path(), dir.path());
        let r: Result<(), AssessError> = b.with_bootloader(Some(Slot::A), |_| Ok(()));
        assert!(r.unwrap_err().to_string().contains("no environment"));
        let b = Backend::from_config(&uboot(), &sys, dir.path(), dir.path(), dir.path());
        let r: Result<(), AssessError> = b.with_bootloader(Some(Slot::A), |_| Ok(()));
        assert!(r.unwrap_err().to_string().contains("\"esp\""));
        std::fs::write(dir.path().join("bootloader.toml"), uboot().to_toml()).unwrap();
        assert_eq!(read_config(&dir.path().join("bootloader.toml")), Ok(uboot()));
    }

    #[test]
    fn the_config_file_is_read_or_defaults_when_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootloader.toml");
        assert_eq!(read_config(&path), Ok(BootloaderConfig::default()));
        std::fs::write(&path, pi().to_toml()).unwrap();
        assert_eq!(read_config(&path), Ok(pi()));
        std::fs::write(&path, "kind = \"lilo\"\n").unwrap();
        assert!(read_config(&path).unwrap_err().contains("bootloader.toml"));
    }

    /// Without the partitions on the disk, nothing runs and the error
    /// names the missing label (a development boot, or the wrong board).
    #[test]
    fn a_missing_boot_partition_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(sys.join("vda1")).unwrap();
        std::fs::write(sys.join("vda1/uevent"), "MAJOR=254\nMINOR=1\nDEVNAME=vda1\nPARTNAME=esp\n")
            .unwrap();
        let b = Backend::from_config(&pi(), &sys, dir.path(), dir.path(), dir.path());
        let mut ran = false;
        let r: Result<(), AssessError> = b.with_bootloader(Some(Slot::A), |_| {
            ran = true;
            Ok(())
        });
        let e = r.unwrap_err().to_string();
        assert!(!ran);
        assert!(e.contains("\"autoboot\""), "{e}");
    }
}
