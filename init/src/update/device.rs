//! The agent's [`Machine`] on a real device: the kernel command line,
//! sysfs for the partitions, the bootloader back-end the image names with
//! its partitions mounted only while it is used.

use std::path::{Path, PathBuf};

use basalt_bundle::slot::Slot;

use basalt_bundle::config::{BootloaderConfig, BOOTLOADER_CONFIG_PATH};

use crate::assess::{slot_from_cmdline, Bootloader};
use crate::backend::{self, Backend, MountBases};
use crate::pending_try::TRY_MARKER;
use crate::platform;
use crate::update::agent::{Machine, UpdateError};

/// Where the agent mounts the ESP (PID 1 uses its own mount point).
pub const AGENT_ESP_MOUNT: &str = "/run/basalt/agent-esp";
/// Where the agent mounts a Raspberry Pi's `autoboot`, `boot_a` and
/// `boot_b` partitions (PID 1 uses its own folder).
pub const AGENT_TRYBOOT_MOUNT: &str = "/run/basalt/agent-tryboot";

/// The running device.
#[derive(Debug, Clone)]
pub struct Device {
    booted: Option<Slot>,
    backend: Backend,
    /// Why the image's bootloader config could not be read, if it could
    /// not: every bootloader operation then fails with this reason.
    config_error: Option<String>,
}

impl Device {
    /// Reads the booted slot from `/proc/cmdline` and the back-end from
    /// the image's [`BOOTLOADER_CONFIG_PATH`].
    pub fn new() -> Device {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let (config, config_error) =
            match backend::read_config(std::path::Path::new(BOOTLOADER_CONFIG_PATH)) {
                Ok(c) => (c, None),
                Err(e) => (BootloaderConfig::default(), Some(e)),
            };
        Device {
            booted: slot_from_cmdline(&cmdline).ok().flatten(),
            backend: device_backend(&config),
            config_error,
        }
    }

    /// The bootloader back-end the agent works with.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}

/// The agent's back-end for `config`: its partitions mounted in the
/// agent's own folders.
pub fn device_backend(config: &BootloaderConfig) -> Backend {
    Backend::on_device(config, &MountBases { boot: AGENT_ESP_MOUNT, tryboot: AGENT_TRYBOOT_MOUNT })
}

impl Default for Device {
    fn default() -> Self {
        Device::new()
    }
}

impl Machine for Device {
    fn booted_slot(&self) -> Option<Slot> {
        self.booted
    }

    fn boot_id(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn with_bootloader<T>(
        &self,
        f: &mut dyn FnMut(&mut dyn Bootloader) -> Result<T, UpdateError>,
    ) -> Result<T, UpdateError> {
        if let Some(e) = &self.config_error {
            return Err(UpdateError::Machine(e.clone()));
        }
        self.backend.with_bootloader(self.booted, |bl| f(bl))
    }

    fn try_marker(&self) -> Option<PathBuf> {
        self.backend.reboot_to_try().map(|_| PathBuf::from(TRY_MARKER))
    }

    fn root_device(&self, slot: Slot) -> Result<PathBuf, UpdateError> {
        let sys = Path::new("/sys/class/block");
        match platform::block::find_by_partlabel(sys, slot.root_partlabel()) {
            Ok(Some(dev)) => Ok(dev.node(Path::new("/dev"))),
            Ok(None) => Err(UpdateError::Machine(format!(
                "no partition labelled {:?}; this disk has no slot {slot}",
                slot.root_partlabel()
            ))),
            Err(e) => Err(UpdateError::Machine(format!("cannot list block devices: {e}"))),
        }
    }

    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_bundle::config::BootloaderKind;

    /// The agent mounts the back-end's partitions in its own folders, so
    /// that PID 1's mounts (under `/run/basalt/esp` and
    /// `/run/basalt/tryboot`) are never unmounted under it.
    #[test]
    fn the_agent_chooses_its_back_end_from_the_config() {
        let b = device_backend(&BootloaderConfig::default());
        let Backend::SystemdBoot(esp) = &b else { panic!("{b:?}") };
        assert_eq!(esp.mount_point, Path::new(AGENT_ESP_MOUNT));
        let pi = BootloaderConfig {
            kind: BootloaderKind::RpiTryboot,
            boot_partitions: Some([2, 3]),
            uboot_env: None,
        };
        let b = device_backend(&pi);
        let Backend::Tryboot(m) = &b else { panic!("{b:?}") };
        assert_eq!(m.location().config, Path::new(AGENT_TRYBOOT_MOUNT).join("autoboot"));
        assert_eq!(m.firmware, Path::new(backend::FIRMWARE_NODE));
        assert_eq!(b.reboot_to_try(), Some("0 tryboot"));
        let dev = Device { booted: None, backend: b, config_error: None };
        assert_eq!(dev.try_marker(), Some(PathBuf::from(TRY_MARKER)));
        let dev = Device { backend: device_backend(&BootloaderConfig::default()), ..dev };
        assert_eq!(dev.try_marker(), None);
        assert_ne!(AGENT_TRYBOOT_MOUNT, crate::backend::PID1_MOUNTS.tryboot);

        // U-Boot: the boot partition where the agent mounts the ESP, the
        // environment on the board's device, no try marker.
        let env = basalt_bundle::config::UbootEnvConfig {
            device: "/dev/mmcblk1".into(),
            offset: 0x3F8000,
            offset_redund: 0x3FC000,
            size: 0x4000,
        };
        let uboot = BootloaderConfig {
            kind: BootloaderKind::UBoot,
            boot_partitions: None,
            uboot_env: Some(env),
        };
        let b = device_backend(&uboot);
        let Backend::UBoot(boot, Some(loc)) = &b else { panic!("{b:?}") };
        assert_eq!(boot.mount_point, Path::new(AGENT_ESP_MOUNT));
        assert_eq!(loc.primary.path, Path::new("/dev/mmcblk1"));
        let dev = Device { backend: b, ..dev };
        assert_eq!(dev.try_marker(), None);
    }
}
