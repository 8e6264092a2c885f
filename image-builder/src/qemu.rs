//! Booting an image in QEMU: `basalt run` for people, [`Machine`] for tests.
//!
//! UEFI firmware (OVMF) boots the disk as a real machine would: firmware,
//! systemd-boot, kernel, basalt-init. Each machine gets a private copy of
//! the firmware variable store so runs do not leak boot state into each
//! other. Acceleration is TCG: it works everywhere, and KVM is not needed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Why QEMU could not be run.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The disk or its report could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No machine description for this disk.
    #[error("{0}")]
    NoMachine(String),
    /// QEMU could not be started.
    #[error(
        "cannot start {binary}: {source}; install qemu-system-x86 and ovmf, or \
         qemu-system-arm and qemu-efi-aarch64 (ci/setup.sh does)"
    )]
    Spawn {
        /// The QEMU program.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// The QEMU monitor did not answer.
    #[error("QEMU monitor: {0}")]
    Monitor(std::io::Error),
}

/// Size of each flash bank of QEMU's arm `virt` machine.
const VIRT_FLASH_BYTES: u64 = 64 << 20;

/// Pads a private flash image to [`VIRT_FLASH_BYTES`] (zero bytes at the
/// end, which the firmware's variable store does not use).
fn pad_flash(path: &Path) -> Result<(), QemuError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| QemuError::Read { path: path.to_path_buf(), source })?;
    let len =
        f.metadata().map_err(|source| QemuError::Read { path: path.to_path_buf(), source })?;
    if len.len() < VIRT_FLASH_BYTES {
        f.set_len(VIRT_FLASH_BYTES)
            .map_err(|source| QemuError::Read { path: path.to_path_buf(), source })?;
    }
    Ok(())
}

/// The emulated machine, as a board describes it and a build report
/// records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// The QEMU program.
    pub binary: String,
    /// `-machine`.
    pub machine: String,
    /// `-cpu`.
    pub cpu: Option<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// UEFI firmware code.
    pub firmware_code: PathBuf,
    /// UEFI variable store template.
    pub firmware_vars: PathBuf,
    /// Guest TCP ports to forward to the same port on 127.0.0.1.
    pub ports: Vec<u16>,
}

/// Options for one machine.
#[derive(Debug, Clone)]
pub struct MachineOptions {
    /// The machine.
    pub spec: MachineSpec,
    /// The disk image, used in place.
    pub disk: PathBuf,
    /// Exit instead of rebooting (tests that watch one boot).
    pub no_reboot: bool,
    /// Copy the console to our stdout.
    pub echo: bool,
    /// Copy the console to this file.
    pub console_log: Option<PathBuf>,
}

/// A running QEMU with its serial console captured.
pub struct Machine {
    child: Child,
    console: Arc<(Mutex<Vec<u8>>, Condvar)>,
    monitor: PathBuf,
    _state: tempfile::TempDir,
}

impl Machine {
    /// Starts QEMU.
    pub fn start(opts: &MachineOptions) -> Result<Machine, QemuError> {
        let state = tempfile::Builder::new()
            .prefix("basalt-qemu-")
            .tempdir()
            .map_err(|source| QemuError::Read { path: std::env::temp_dir(), source })?;
        let vars = state.path().join("vars.fd");
        std::fs::copy(&opts.spec.firmware_vars, &vars)
            .map_err(|source| QemuError::Read { path: opts.spec.firmware_vars.clone(), source })?;
        let mut code = opts.spec.firmware_code.clone();
        if opts.spec.machine == "virt" || opts.spec.machine.starts_with("virt-") {
            // The arm `virt` machine maps each flash bank at exactly 64 MiB
            // and refuses smaller images: pad private copies.
            pad_flash(&vars)?;
            let len = std::fs::metadata(&code)
                .map_err(|source| QemuError::Read { path: code.clone(), source })?
                .len();
            if len < VIRT_FLASH_BYTES {
                let copy = state.path().join("code.fd");
                std::fs::copy(&code, &copy)
                    .map_err(|source| QemuError::Read { path: code.clone(), source })?;
                pad_flash(&copy)?;
                code = copy;
            }
        }
        let monitor = state.path().join("monitor.sock");
        let mut cmd = Command::new(&opts.spec.binary);
        cmd.args(["-accel", "tcg", "-machine", &opts.spec.machine, "-smp", "1"]);
        if let Some(cpu) = &opts.spec.cpu {
            cmd.args(["-cpu", cpu]);
        }
        cmd.args(["-m", &opts.spec.memory_mib.to_string()])
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display()))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw,cache=unsafe", opts.disk.display()));
        let mut netdev = "user,id=net0".to_string();
        for p in &opts.spec.ports {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{p}-:{p}"));
        }
        cmd.args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"])
            .args(["-display", "none", "-serial", "stdio"])
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()));
        if opts.no_reboot {
            cmd.arg("-no-reboot");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        // QEMU dies with us: a `basalt run` ended by SIGTERM or SIGKILL (not
        // only by Ctrl-C, which reaches the whole process group) must not
        // leave a machine behind holding the forwarded ports.
        let parent = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe and touch no
        // memory of ours.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // We may have died before the prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|source| QemuError::Spawn { binary: opts.spec.binary.clone(), source })?;
        let console = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        if let Some(mut out) = child.stdout.take() {
            let console = console.clone();
            let echo = opts.echo;
            let mut log = opts.console_log.as_ref().and_then(|p| std::fs::File::create(p).ok());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if echo {
                        let mut so = std::io::stdout();
                        let _ = so.write_all(&buf[..n]);
                        let _ = so.flush();
                    }
                    if let Some(f) = log.as_mut() {
                        let _ = f.write_all(&buf[..n]);
                    }
                    let (lock, cv) = &*console;
                    if let Ok(mut c) = lock.lock() {
                        c.extend_from_slice(&buf[..n]);
                    }
                    cv.notify_all();
                }
                let (_, cv) = &*console;
                cv.notify_all();
            });
        }
        Ok(Machine { child, console, monitor, _state: state })
    }

    /// Everything the console printed so far.
    pub fn console(&self) -> String {
        let (lock, _) = &*self.console;
        lock.lock().map(|c| String::from_utf8_lossy(&c).into_owned()).unwrap_or_default()
    }

    /// Waits until the console has printed `marker` at least `count` times
    /// in all, or `timeout` passes, or QEMU exits. True if seen.
    pub fn wait_for_count(&mut self, marker: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().matches(marker).count() >= count {
                return true;
            }
            if Instant::now() >= deadline || self.has_exited() {
                // One last look: output may land just before exit.
                std::thread::sleep(Duration::from_millis(100));
                return self.console().matches(marker).count() >= count;
            }
            let (lock, cv) = &*self.console;
            if let Ok(g) = lock.lock() {
                let _ = cv.wait_timeout(g, Duration::from_millis(200));
            }
        }
    }

    /// Waits until the console has printed `marker`. True if seen.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> bool {
        self.wait_for_count(marker, 1, timeout)
    }

    fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends a command to the QEMU monitor (e.g. `sendkey ctrl-alt-delete`).
    pub fn monitor(&self, command: &str) -> Result<(), QemuError> {
        let mut s = UnixStream::connect(&self.monitor).map_err(QemuError::Monitor)?;
        s.write_all(format!("{command}\n").as_bytes()).map_err(QemuError::Monitor)?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// Waits for QEMU to exit; `None` if it is still running at `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(128));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops QEMU at once.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options of `basalt run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The disk image.
    pub disk: PathBuf,
    /// A board, when the disk has no report beside it.
    pub board: Option<String>,
    /// Succeed when the console prints this.
    pub until: Option<String>,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// More ports to forward.
    pub extra_ports: Vec<u16>,
    /// Copy of the console.
    pub console_log: Option<PathBuf>,
    /// Show the console on stdout.
    pub echo: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// QEMU exited with this code.
    Exited(i32),
    /// The `until` marker appeared.
    MarkerSeen,
    /// The timeout passed first.
    TimedOut,
    /// A signal (Ctrl-C, `kill`) stopped the run; the machine was stopped
    /// and its firmware state removed.
    Stopped(i32),
}

/// The signal that asked `basalt run` to stop, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_stop_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a request that the run loop sees,
/// so the machine and its temporary firmware copies go away with us
/// instead of being left in the temporary directory. A signal we were
/// started with ignored (`nohup`, a background job of a script) stays
/// ignored.
fn catch_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction structs are fully initialised.
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) == 0
                && current.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = note_stop_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

fn stop_signal() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// The machine a disk was built for, from `report.json` beside it or from
/// a board.
pub fn machine_for_disk(disk: &Path, board: Option<&str>) -> Result<MachineSpec, QemuError> {
    if let Some(spec) = board {
        let path = crate::plan::find_board(spec, Path::new(".")).ok_or_else(|| {
            QemuError::NoMachine(format!("board `{spec}` not found; give a board file path"))
        })?;
        let src = crate::diag::Source::read(&path)
            .map_err(|source| QemuError::Read { path: path.clone(), source })?;
        let b: crate::board::Board =
            src.parse().map_err(|d| QemuError::NoMachine(d.to_string()))?;
        return spec_of_board(&b, &[], None)
            .ok_or_else(|| QemuError::NoMachine(format!("board `{spec}` has no [qemu] section")));
    }
    let report = disk.with_file_name("report.json");
    let text = std::fs::read_to_string(&report)
        .map_err(|source| QemuError::Read { path: report.clone(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        QemuError::NoMachine(format!("{} is not a build report: {e}", report.display()))
    })?;
    let machine = v.get("machine").cloned().unwrap_or(serde_json::Value::Null);
    serde_json::from_value(machine).map_err(|_| {
        QemuError::NoMachine(format!(
            "{} names no QEMU machine (its board cannot run in QEMU); pass --board",
            report.display()
        ))
    })
}

/// The machine of a board, with the recipe's ports and memory.
pub fn spec_of_board(
    b: &crate::board::Board,
    ports: &[u16],
    memory_mib: Option<u32>,
) -> Option<MachineSpec> {
    let q = b.qemu.as_ref()?;
    Some(MachineSpec {
        binary: q.binary.clone(),
        machine: q.machine.clone(),
        cpu: q.cpu.clone(),
        memory_mib: memory_mib.unwrap_or(q.memory_mib),
        firmware_code: q.firmware_code.clone(),
        firmware_vars: q.firmware_vars.clone(),
        ports: ports.to_vec(),
    })
}

/// `basalt run`: boots the disk and shows its console until QEMU exits,
/// the marker appears or the timeout passes.
pub fn run_disk(opts: &RunOptions) -> Result<Outcome, QemuError> {
    std::fs::metadata(&opts.disk)
        .map_err(|source| QemuError::Read { path: opts.disk.clone(), source })?;
    let mut spec = machine_for_disk(&opts.disk, opts.board.as_deref())?;
    for p in &opts.extra_ports {
        if !spec.ports.contains(p) {
            spec.ports.push(*p);
        }
    }
    if !spec.ports.is_empty() {
        eprintln!(
            "basalt: forwarding {}",
            spec.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(", ")
        );
    }
    eprintln!("basalt: booting {} under QEMU (TCG); Ctrl-C stops it", opts.disk.display());
    catch_stop_signals();
    let mut m = Machine::start(&MachineOptions {
        spec,
        disk: opts.disk.clone(),
        no_reboot: false,
        echo: opts.echo,
        console_log: opts.console_log.clone(),
    })?;
    let deadline = opts.timeout.map(|t| Instant::now() + t);
    let tick = Duration::from_millis(200);
    loop {
        let seen = match &opts.until {
            Some(marker) => m.wait_for(marker, tick),
            None => false,
        };
        // A signal first: Ctrl-C also reaches QEMU, which then exits.
        if let Some(signal) = stop_signal() {
            m.kill();
            return Ok(Outcome::Stopped(signal));
        }
        if seen {
            m.kill();
            return Ok(Outcome::MarkerSeen);
        }
        let wait = if opts.until.is_some() { Duration::ZERO } else { tick };
        if let Some(code) = m.wait_exit(wait) {
            return Ok(Outcome::Exited(code));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Outcome::TimedOut);
        }
    }
}
