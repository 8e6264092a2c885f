//! Child processes: starting them with their output on a pipe, signalling
//! their process groups, and reaping them.
//!
//! Nothing here keeps state about which process is which; the supervisor
//! does that. This module only turns requests into system calls.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The `PATH` every child starts with; a service's `env` adds to it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Code(i32),
    /// A signal with this number ended it.
    Signal(i32),
}

impl ExitStatus {
    /// The status as a shell reports it: the exit code, or 128 + the signal
    /// number for a death by signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }

    /// True for `exit(0)`.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "status {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s} (status {})", 128 + s),
        }
    }
}

/// The result of one non-blocking `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// A child ended and is gone now.
    Child {
        /// Its process id.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
    },
    /// Children exist, but none has ended.
    NoneReady,
    /// There are no children at all (`ECHILD`).
    NoChildren,
}

fn wait_nohang(pid: libc::pid_t) -> Reaped {
    loop {
        let mut raw: libc::c_int = 0;
        // libc directly rather than nix's `waitpid`: nix turns a status it
        // cannot map to its `Signal` enum (a real-time signal) into an
        // error after the kernel has already reaped the child, and then the
        // pid would be lost.
        // SAFETY: `raw` is a valid out-pointer for the duration of the call.
        let pid = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
        if pid == 0 {
            return Reaped::NoneReady;
        }
        if pid < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                // ECHILD, or an error that would repeat forever: either way
                // there is nothing more to reap now.
                _ => return Reaped::NoChildren,
            }
        }
        let status = if libc::WIFEXITED(raw) {
            ExitStatus::Code(libc::WEXITSTATUS(raw))
        } else if libc::WIFSIGNALED(raw) {
            ExitStatus::Signal(libc::WTERMSIG(raw))
        } else {
            // Stopped or continued: not an exit. Without WUNTRACED the
            // kernel does not report these, but do not misreport one.
            continue;
        };
        return Reaped::Child { pid: pid.unsigned_abs(), status };
    }
}

/// Reaps one ended child, whichever it is (`waitpid(-1, WNOHANG)`). Call
/// it until it stops returning [`Reaped::Child`]: one SIGCHLD may stand for
/// many children, orphans re-parented to PID 1 among them.
pub fn reap_any() -> Reaped {
    wait_nohang(-1)
}

/// Reaps `pid` if it has ended, without touching other children. Host tests
/// use it so that parallel tests never reap each other's children.
pub fn reap(pid: u32) -> Reaped {
    match libc::pid_t::try_from(pid) {
        Ok(p) if p > 0 => wait_nohang(p),
        _ => Reaped::NoChildren,
    }
}

/// The two signals the supervisor sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: please stop.
    Term,
    /// SIGKILL: stop now.
    Kill,
}

impl StopSignal {
    fn nix(self) -> Signal {
        match self {
            StopSignal::Term => Signal::SIGTERM,
            StopSignal::Kill => Signal::SIGKILL,
        }
    }
}

/// Sends `sig` to the process group `pid` leads (every child is started as
/// the leader of its own group, so this reaches what it forked too). Falls
/// back to the process alone if it has left its group.
pub fn signal_group(pid: u32, sig: StopSignal) -> io::Result<()> {
    let raw =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if raw <= 1 {
        // Never signal PID 1's own group or "every process" by accident.
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    match kill(Pid::from_raw(-raw), sig.nix()) {
        Ok(()) => Ok(()),
        Err(Errno::ESRCH) => kill(Pid::from_raw(raw), sig.nix()).map_err(io_err),
        Err(e) => Err(io_err(e)),
    }
}

/// Sends `sig` to every process but PID 1 (`kill(-1, sig)`): at shutdown,
/// this reaches the orphans no service accounts for.
pub fn signal_all(sig: StopSignal) -> io::Result<()> {
    kill(Pid::from_raw(-1), sig.nix()).map_err(io_err)
}

/// Makes the calling process adopt orphaned descendants, as PID 1 does by
/// nature. Host tests use it to exercise orphan reaping without being PID 1.
pub fn set_child_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io_err)
}

/// A pipe that collects one service's stdout and stderr across restarts.
///
/// PID 1 keeps both ends: the read end to poll, the write end so the pipe
/// outlives each run of the service (no end-of-file between restarts, and
/// one fixed descriptor to poll). Children get duplicates of the write end.
#[derive(Debug)]
pub struct OutputPipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl OutputPipe {
    /// Creates the pipe; the read end is non-blocking, the write end stays
    /// blocking because the children share it and expect ordinary writes.
    pub fn new() -> io::Result<OutputPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io_err)?;
        fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io_err)?;
        Ok(OutputPipe { read, write })
    }

    /// The read end, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Reads what is there: `Ok(None)` when the pipe is empty.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match nix::unistd::read(&self.read, buf) {
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(io_err(e)),
            }
        }
    }
}

/// Starts `argv` as the leader of a new process group, with stdin from
/// `/dev/null`, stdout and stderr into `output`, the working directory `/`,
/// and an environment of [`DEFAULT_PATH`] plus `env`. Returns its pid.
///
/// The child starts with an empty signal mask and SIGPIPE at its default,
/// although PID 1 blocks every signal and ignores SIGPIPE.
/// A program that cannot be executed is an error here, not an exit status.
pub fn spawn(
    argv: &[String],
    env: &BTreeMap<String, String>,
    output: &OutputPipe,
) -> io::Result<u32> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .envs(env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(output.write.try_clone()?))
        .stderr(Stdio::from(output.write.try_clone()?))
        .process_group(0);
    // PID 1 blocks every signal and ignores SIGPIPE (the standard library
    // does at start-up), and a child inherits both. The standard library
    // undoes that for children with glibc but not with musl, where a
    // service would then shrug off SIGTERM. Undo it here, between fork and
    // exec, with async-signal-safe calls only.
    // SAFETY: the closure only calls sigemptyset, sigprocmask and signal.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            Ok(())
        });
    }
    // Dropping the `Child` neither waits for nor kills it; PID 1's reaper
    // collects it by pid.
    let child = cmd.spawn()?;
    Ok(child.id())
}

/// Asks PID 1 for an orderly reboot (SIGINT, as Ctrl-Alt-Del does): it
/// stops every service, syncs, unmounts and reboots.
pub fn request_reboot() -> io::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), nix::sys::signal::Signal::SIGINT)
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(pid: u32) -> ExitStatus {
        for _ in 0..500 {
            if let Reaped::Child { status, .. } = reap(pid) {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{pid} did not exit");
    }

    #[test]
    fn spawns_with_output_on_the_pipe_and_reports_status() {
        let pipe = OutputPipe::new().unwrap();
        let mut env = BTreeMap::new();
        env.insert("GREETING".to_string(), "hi".to_string());
        let argv: Vec<String> =
            ["/bin/sh", "-c", "echo $GREETING; echo err >&2; exit 3"].map(String::from).to_vec();
        let pid = spawn(&argv, &env, &pipe).unwrap();
        assert_eq!(wait(pid), ExitStatus::Code(3));
        let mut buf = [0u8; 64];
        let n = pipe.read(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], b"hi\nerr\n");
        assert_eq!(pipe.read(&mut buf).unwrap(), None, "empty pipe reads as None, not EOF");
    }

    #[test]
    fn signal_death_is_128_plus_n() {
        let pipe = OutputPipe::new().unwrap();
        let argv: Vec<String> = ["/bin/sleep", "30"].map(String::from).to_vec();
        let pid = spawn(&argv, &BTreeMap::new(), &pipe).unwrap();
        signal_group(pid, StopSignal::Kill).unwrap();
        let status = wait(pid);
        assert_eq!(status, ExitStatus::Signal(9));
        assert_eq!(status.code(), 137);
        assert_eq!(status.to_string(), "signal 9 (status 137)");
    }

    #[test]
    fn children_start_with_an_empty_signal_mask() {
        // PID 1 blocks every signal; a child that inherited that mask would
        // ignore SIGTERM at shutdown. Block some in this test's thread (the
        // mask is per thread) and look at what the child has.
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
        let mut old = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old)).unwrap();
        let pipe = OutputPipe::new().unwrap();
        let argv: Vec<String> = ["/bin/sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status"]
            .map(String::from)
            .to_vec();
        let spawned = spawn(&argv, &BTreeMap::new(), &pipe);
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None).unwrap();
        assert_eq!(wait(spawned.unwrap()), ExitStatus::Code(0));
        let mut buf = [0u8; 256];
        let n = pipe.read(&mut buf).unwrap().unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        let field = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(field("SigBlk:"), 0, "{text}");
        // Bit n-1 stands for signal n.
        let pipe_term = 1 << (libc::SIGPIPE - 1) | 1 << (libc::SIGTERM - 1);
        assert_eq!(field("SigIgn:") & pipe_term, 0, "{text}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let pipe = OutputPipe::new().unwrap();
        let argv = vec!["/nonexistent/program".to_string()];
        assert!(spawn(&argv, &BTreeMap::new(), &pipe).is_err());
        assert!(spawn(&[], &BTreeMap::new(), &pipe).is_err());
    }

    #[test]
    fn refuses_to_signal_init_or_everyone() {
        assert!(signal_group(0, StopSignal::Term).is_err());
        assert!(signal_group(1, StopSignal::Term).is_err());
    }
}
