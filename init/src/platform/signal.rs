//! What PID 1's event loop waits on: signals read through a `signalfd`,
//! `poll` over descriptors, and the boot-time clock.
//!
//! PID 1 blocks every signal and reads them as data, so no signal handler
//! ever runs in the middle of the supervisor's bookkeeping.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::time::{clock_gettime, ClockId};

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A signal PID 1 acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// SIGCHLD: one or more children ended.
    Child,
    /// SIGTERM: power off in order.
    Terminate,
    /// SIGPWR: the power is failing; power off in order.
    PowerFail,
    /// SIGINT: Ctrl-Alt-Del (once routed to init); reboot in order.
    Interrupt,
    /// Any other signal, by number; ignored.
    Other(u32),
}

/// Every signal blocked and readable from one descriptor.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks every signal for this thread and opens a non-blocking
    /// `signalfd` for all of them. Children still start with an empty mask
    /// (see [`crate::platform::process::spawn`]).
    pub fn block_all() -> io::Result<Signals> {
        let all = SigSet::all();
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&all), None).map_err(io_err)?;
        let fd = SignalFd::with_flags(&all, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(io_err)?;
        Ok(Signals { fd })
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The next pending signal, or `None` when there is none.
    pub fn read(&self) -> io::Result<Option<Received>> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => return Ok(Some(classify(info.ssi_signo))),
                Ok(None) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
    }
}

fn classify(signo: u32) -> Received {
    let is = |s: Signal| i32::try_from(signo).ok() == Some(s as i32);
    if is(Signal::SIGCHLD) {
        Received::Child
    } else if is(Signal::SIGTERM) {
        Received::Terminate
    } else if is(Signal::SIGPWR) {
        Received::PowerFail
    } else if is(Signal::SIGINT) {
        Received::Interrupt
    } else {
        Received::Other(signo)
    }
}

/// Time since the kernel started (`CLOCK_BOOTTIME`, the clock behind
/// `/proc/uptime`). Every timer in stage 2 is on this clock, so the
/// "uptime" in console messages and the supervisor's timers agree.
pub fn now() -> Duration {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => Duration::from(ts),
        // CLOCK_BOOTTIME exists since Linux 2.6.39; the monotonic clock is
        // the same but for time spent suspended.
        Err(_) => clock_gettime(ClockId::CLOCK_MONOTONIC).map(Duration::from).unwrap_or_default(),
    }
}

/// Waits until one of `fds` is readable (or hung up), or `timeout` passes
/// (`None`: no limit). Sets `ready[i]` for each descriptor that is; an
/// interrupted wait counts as a timeout.
pub fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
    ready: &mut Vec<bool>,
) -> io::Result<()> {
    let mut pollfds: Vec<PollFd<'_>> =
        fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
    let timeout = match timeout {
        None => PollTimeout::NONE,
        // Round up, so a timer 0.4 ms away does not spin at 0 ms.
        Some(t) => {
            let ms = t.as_micros().div_ceil(1000);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    };
    ready.clear();
    ready.resize(fds.len(), false);
    match nix::poll::poll(&mut pollfds, timeout) {
        Ok(_) => {}
        Err(Errno::EINTR) => return Ok(()),
        Err(e) => return Err(io_err(e)),
    }
    let wake = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
    for (slot, pfd) in ready.iter_mut().zip(&pollfds) {
        *slot = pfd.revents().is_some_and(|r| r.intersects(wake));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_signals_init_acts_on() {
        assert_eq!(classify(Signal::SIGCHLD as u32), Received::Child);
        assert_eq!(classify(Signal::SIGTERM as u32), Received::Terminate);
        assert_eq!(classify(Signal::SIGPWR as u32), Received::PowerFail);
        assert_eq!(classify(Signal::SIGINT as u32), Received::Interrupt);
        assert_eq!(classify(Signal::SIGHUP as u32), Received::Other(1));
    }

    #[test]
    fn clock_moves_forward() {
        let a = now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(now() > a);
    }

    #[test]
    fn poll_times_out_and_sees_data() {
        let pipe = crate::platform::process::OutputPipe::new().unwrap();
        let mut ready = Vec::new();
        poll_readable(&[pipe.fd()], Some(Duration::from_millis(5)), &mut ready).unwrap();
        assert_eq!(ready, [false]);
        // Writing needs the write end, which only children get; a child
        // writing one line is the realistic case.
        let argv: Vec<String> = ["/bin/sh", "-c", "echo x"].map(String::from).to_vec();
        let pid = crate::platform::process::spawn(&argv, &Default::default(), &pipe).unwrap();
        poll_readable(&[pipe.fd()], Some(Duration::from_secs(5)), &mut ready).unwrap();
        assert_eq!(ready, [true]);
        while crate::platform::process::reap(pid) == crate::platform::process::Reaped::NoneReady {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
