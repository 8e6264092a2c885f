//! The hardware watchdog (`/dev/watchdog`): if PID 1 stops feeding it, the
//! board resets.
//!
//! Opening the device arms it. PID 1 feeds it from its event loop, so a
//! hung loop (not just a dead process) resets the machine. At an orderly
//! shutdown PID 1 writes the magic `V` before closing, which tells drivers
//! that support it not to fire.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The standard device node.
pub const WATCHDOG_DEV: &str = "/dev/watchdog";

mod ioctls {
    // WDIOC_SETTIMEOUT = _IOWR('W', 6, int), from <linux/watchdog.h>.
    nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);
}

/// An open, armed watchdog.
#[derive(Debug)]
pub struct Watchdog {
    file: File,
}

impl Watchdog {
    /// Opens (and so arms) the watchdog at `path`; `Ok(None)` if the board
    /// has none.
    pub fn open(path: &Path) -> io::Result<Option<Watchdog>> {
        match OpenOptions::new().write(true).open(path) {
            Ok(file) => Ok(Some(Watchdog { file })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Asks for a timeout of `secs` seconds; returns the timeout the driver
    /// actually set (drivers round to what the hardware can do).
    pub fn set_timeout(&self, secs: u32) -> io::Result<u32> {
        let mut t = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
        // SAFETY: the descriptor is open and `t` outlives the call.
        unsafe { ioctls::wdioc_settimeout(self.file.as_raw_fd(), &mut t) }
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        Ok(u32::try_from(t).unwrap_or(secs))
    }

    /// Resets the countdown. Any byte but `V` feeds without disarming.
    pub fn feed(&mut self) -> io::Result<()> {
        self.file.write_all(b"\0")
    }

    /// Writes the magic `V` and closes, so the watchdog does not fire while
    /// the machine powers off or reboots.
    pub fn disarm(mut self) -> io::Result<()> {
        self.file.write_all(b"V")
        // `self.file` closes here.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_watchdog_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Watchdog::open(&dir.path().join("watchdog")).unwrap().is_none());
    }

    #[test]
    fn feeding_and_disarming_write_the_protocol_bytes() {
        // A plain file stands in for the device: the byte protocol is the
        // same, only the timeout ioctl needs the real driver.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        std::fs::write(&path, b"").unwrap();
        let mut w = Watchdog::open(&path).unwrap().unwrap();
        w.feed().unwrap();
        assert!(w.set_timeout(30).is_err(), "a regular file has no watchdog ioctl");
        w.disarm().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"\0V");
    }
}
