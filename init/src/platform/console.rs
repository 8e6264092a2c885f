//! The console PID 1 writes to.
//!
//! The kernel opens `/dev/console` as fds 0, 1 and 2 of init, but only if
//! that node exists in the initramfs; otherwise init starts with them
//! closed and every message is lost. Stage 1 reattaches them once devtmpfs
//! is mounted.

use std::fs::File;
use std::io;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Points each of fds 0, 1 and 2 that is closed at `console`; `proc_fd` is
/// `/proc/self/fd`, which says which are open. Returns how many it attached.
pub fn attach_closed_stdio(console: &Path, proc_fd: &Path) -> io::Result<usize> {
    let mut attached = 0;
    for fd in 0..=2 {
        if proc_fd.join(fd.to_string()).symlink_metadata().is_ok() {
            continue;
        }
        // open(2) returns the lowest free descriptor, and every closed one
        // below `fd` was filled by an earlier round, so this lands on `fd`.
        let file =
            File::options().read(true).write(true).custom_flags(libc::O_NOCTTY).open(console)?;
        // std opens with O_CLOEXEC; the next init must inherit its stdio.
        fcntl(&file, FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let got = file.into_raw_fd();
        if got != fd {
            return Err(io::Error::other(format!(
                "{} opened as fd {got}, not {fd}",
                console.display()
            )));
        }
        attached += 1;
    }
    Ok(attached)
}

/// Waits until what was written to stderr has gone out of the serial line,
/// so a last message before `reboot(2)` is not cut off. Does nothing when
/// stderr is not a terminal.
pub fn drain_stderr() {
    let _ = nix::sys::termios::tcdrain(io::stderr());
}
