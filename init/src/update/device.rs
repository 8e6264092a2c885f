//! The agent's [`Machine`] on a real device: the kernel command line,
//! sysfs for the partitions, the ESP mounted only while it is used.

use std::path::{Path, PathBuf};

use basalt_bundle::slot::Slot;

use crate::assess::{slot_from_cmdline, Bootloader, EspLocation, SystemdBoot};
use crate::platform;
use crate::update::agent::{Machine, UpdateError};

/// Where the agent mounts the ESP (PID 1 uses its own mount point).
pub const AGENT_ESP_MOUNT: &str = "/run/basalt/agent-esp";

/// The running device.
#[derive(Debug, Clone)]
pub struct Device {
    booted: Option<Slot>,
    esp: EspLocation,
}

impl Device {
    /// Reads the booted slot from `/proc/cmdline`.
    pub fn new() -> Device {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Device {
            booted: slot_from_cmdline(&cmdline).ok().flatten(),
            esp: EspLocation {
                sys_class_block: PathBuf::from("/sys/class/block"),
                dev: PathBuf::from("/dev"),
                mount_point: PathBuf::from(AGENT_ESP_MOUNT),
            },
        }
    }
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
        let booted = self.booted;
        self.esp.with_mounted(|at: &Path| {
            let mut bl = SystemdBoot::new(at, booted);
            f(&mut bl)
        })
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
