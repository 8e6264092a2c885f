//! Ending the machine: power off, reboot, and the Ctrl-Alt-Del setting.

use std::io;

use nix::sys::reboot::{reboot, set_cad_enabled, RebootMode};

/// How the machine should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// Restart; the bootloader picks the next entry.
    Reboot,
    /// Switch off.
    PowerOff,
}

/// Makes Ctrl-Alt-Del send SIGINT to PID 1 instead of rebooting at once,
/// so it starts an orderly shutdown.
pub fn route_ctrl_alt_del_to_init() -> io::Result<()> {
    set_cad_enabled(false).map_err(|e| io::Error::from_raw_os_error(e as i32))
}

/// Syncs and ends the machine. Only returns if the kernel refused.
pub fn halt(how: Halt) -> io::Error {
    nix::unistd::sync();
    let mode = match how {
        Halt::Reboot => RebootMode::RB_AUTOBOOT,
        Halt::PowerOff => RebootMode::RB_POWER_OFF,
    };
    match reboot(mode) {
        Ok(never) => match never {},
        Err(e) => io::Error::from_raw_os_error(e as i32),
    }
}
