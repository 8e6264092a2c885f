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

/// Syncs and restarts, handing `arg` to the firmware: `reboot(2)` with
/// `LINUX_REBOOT_CMD_RESTART2`, as `reboot "0 tryboot"` does to ask the
/// Raspberry Pi firmware for one try of `autoboot.txt`'s `[tryboot]`
/// partition. Only returns if the kernel refused (or `arg` holds a NUL).
pub fn restart_with_argument(arg: &str) -> io::Error {
    let Ok(arg) = std::ffi::CString::new(arg) else {
        return io::Error::new(io::ErrorKind::InvalidInput, "a reboot argument cannot hold NUL");
    };
    nix::unistd::sync();
    // SAFETY: the magic numbers and command are the kernel's, and `arg` is
    // a NUL-terminated string that outlives the call. nix offers no
    // RESTART2.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::LINUX_REBOOT_MAGIC1,
            libc::LINUX_REBOOT_MAGIC2,
            libc::LINUX_REBOOT_CMD_RESTART2,
            arg.as_ptr(),
        )
    };
    if rc == 0 {
        // The machine is restarting; nothing here runs in practice.
        return io::Error::other("reboot(2) returned");
    }
    io::Error::last_os_error()
}
