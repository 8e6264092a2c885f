//! Stage 2: PID 1 of the root filesystem.
//!
//! In order: mount the API filesystems that are missing (stage 1 moves
//! `/dev`, `/proc`, `/sys` and `/run` in; a root booted straight from an
//! initramfs has none), make sure the console is attached, block all
//! signals into a `signalfd`, route Ctrl-Alt-Del to SIGINT, read
//! [`IMAGE_CONFIG_PATH`], load the image's modules, set the host name,
//! bring up loopback (and a static address), open the
//! watchdog, start the [`Supervisor`] and assess the boot ([`crate::assess`]).
//! Then one `poll` loop over the `signalfd` and the services' output pipes,
//! with a timeout from the next timer, until SIGTERM or SIGPWR (power off)
//! or SIGINT (Ctrl-Alt-Del: reboot), or a failed boot assessment (reboot).
//!
//! On a Raspberry Pi, before services start, the try an install left
//! owed is settled ([`crate::pending_try`]): removed as this boot's try
//! begins, or, when a power cut came before the reboot that would have
//! tried it, asked for again (once) by a reboot as soon as this boot is
//! blessed.
//!
//! Shutdown: services stop in reverse order (SIGTERM, SIGKILL after
//! `boot.stop_timeout_ms`), then every remaining process gets the same,
//! then sync, unmount the ESP and `/data`, disarm the watchdog, and
//! `reboot(2)`.
//!
//! Network: loopback always (health checks use 127.0.0.1), and
//! `/run/resolv.conf` from `network.dns`. A static address (and default
//! route) is set here, after the modules, once the interface appears
//! (bounded wait); failures are console lines, never fatal. DHCP is not
//! done here: it parses network input, so it runs as the supervised `dhcp`
//! service ([`crate::dhcp`]) the builder adds.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use basalt_bundle::config::{
    parse_cidr, parse_gateway, AddressError, ImageConfig, NetworkConfig, NetworkMode,
    BOOTLOADER_CONFIG_PATH, DATA_MOUNT, ESP_MOUNT, IMAGE_CONFIG_PATH,
};
use basalt_bundle::slot::Slot;

use crate::assess::{self, AssessError, Assessor, FailOutcome, Verdict};
use crate::backend::{self, Backend};
use crate::network::{self, INTERFACE_WAIT, RESOLV_CONF, SYS_CLASS_NET};
use crate::pending_try::{self, TRY_MARKER};
use crate::platform::mount::{self, MountFlags};
use crate::platform::process::{self, Reaped, StopSignal};
use crate::platform::reboot::{self, Halt};
use crate::platform::signal::{self, Received, Signals};
use crate::platform::watchdog::{Watchdog, WATCHDOG_DEV};
use crate::platform::{console, kmod, net};
use crate::supervisor::{Launcher, LogSettings, Options, Purpose, Secs, Supervisor};

/// Where service logs go: `/data/log/<name>.log`.
pub const LOG_DIR: &str = "/data/log";
/// A service log rotates to `<name>.log.1` at this size.
pub const LOG_LIMIT: u64 = 256 * 1024;
/// A service that ran this long before exiting restarts after its first
/// delay again.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Watchdog timeout asked of the driver, in seconds.
pub const WATCHDOG_TIMEOUT_S: u32 = 30;
/// How often PID 1 feeds the watchdog.
pub const WATCHDOG_FEED: Duration = Duration::from_secs(5);
/// With an unreadable image configuration, how long after stage 2 starts
/// the boot is declared failed (so a fresh slot falls back).
pub const BROKEN_CONFIG_DEADLINE: Duration = Duration::from_secs(30);
/// Stop timeout when the configuration could not be read.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The loop wakes at least this often even with no timer due.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Without a signalfd, children are reaped on every wake-up, this often.
const NO_SIGNALFD_WAIT: Duration = Duration::from_millis(500);

/// Why a step of stage 2's set-up failed. None of these stops PID 1: each
/// is reported and stage 2 goes on with what works.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// An API filesystem could not be mounted.
    #[error("cannot mount {fstype} on {target}: {source}")]
    Mount {
        /// Filesystem type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The image configuration could not be read.
    #[error("cannot read {path}: {source}")]
    ReadConfig {
        /// Its path.
        path: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The image configuration is not valid.
    #[error(transparent)]
    ParseConfig(#[from] basalt_bundle::config::ConfigError),
}

fn say(msg: &str) {
    let line = format!("basalt-init: {msg}\n");
    // One write per line; a console error has nowhere to be reported.
    let _ = io::stderr().write_all(line.as_bytes());
}

/// The API filesystems, in mount order: (source, target, type, flags, data).
fn api_filesystems() -> [(&'static str, &'static str, &'static str, MountFlags, &'static str); 7] {
    let hard = MountFlags::MS_NOSUID | MountFlags::MS_NODEV | MountFlags::MS_NOEXEC;
    let soft = MountFlags::MS_NOSUID | MountFlags::MS_NODEV;
    [
        ("proc", "/proc", "proc", hard, ""),
        ("sysfs", "/sys", "sysfs", hard, ""),
        ("devtmpfs", "/dev", "devtmpfs", MountFlags::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MountFlags::MS_NOSUID | MountFlags::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", soft, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", soft, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", soft, "mode=1777"),
    ]
}

/// Mounts what is not mounted yet. Quiet: the console may not be attached
/// until `/dev` is there, so errors are returned for later.
fn mount_api_filesystems() -> Vec<SetupError> {
    let mut errors = Vec::new();
    let proc_mounts = Path::new("/proc/self/mounts");
    for (source, target, fstype, flags, data) in api_filesystems() {
        let present = if target == "/proc" {
            Path::new("/proc/self").exists()
        } else {
            mount::is_mounted(proc_mounts, Path::new(target))
        };
        if present {
            continue;
        }
        let data = (!data.is_empty()).then_some(data);
        if let Err(source_err) = mount::mount(source, Path::new(target), fstype, flags, data) {
            errors.push(SetupError::Mount { fstype, target, source: source_err });
        }
    }
    errors
}

fn read_config() -> Result<ImageConfig, SetupError> {
    let text = std::fs::read_to_string(IMAGE_CONFIG_PATH)
        .map_err(|source| SetupError::ReadConfig { path: IMAGE_CONFIG_PATH, source })?;
    Ok(ImageConfig::from_toml(&text)?)
}

/// Loads the image's stage-2 modules (the network driver, for one). A
/// module that fails is reported and skipped: a missing driver costs that
/// device, not the boot.
fn load_modules(cfg: &ImageConfig) {
    if cfg.modules.is_empty() {
        return;
    }
    let t = std::time::Instant::now();
    for m in &cfg.modules {
        if let Err(e) = kmod::load(Path::new(m)) {
            say(&format!("cannot load module {m}: {e}{}", kmod::refusal_hint(&e)));
        }
    }
    say(&format!("loaded {} modules in {} ms", cfg.modules.len(), t.elapsed().as_millis()));
}

fn setup_network(cfg: &ImageConfig) {
    if let Err(e) = net::set_hostname(&cfg.hostname) {
        say(&format!("cannot set the host name to {:?}: {e}", cfg.hostname));
    }
    match net::interface_up("lo") {
        Ok(()) => {}
        Err(e) => say(&format!("cannot bring up loopback: {e}; HTTP health checks will fail")),
    }
    // With DHCP, the `dhcp` service writes it from the lease unless the
    // image names its own servers; either way, only one writer.
    if !cfg.network.dns.is_empty() {
        if let Err(e) = network::write_resolv_conf(Path::new(RESOLV_CONF), &cfg.network.dns) {
            say(&format!("cannot write {RESOLV_CONF}: {e}"));
        }
    }
    match cfg.network.mode {
        NetworkMode::None => {}
        // The client parses network input, so it runs as a supervised
        // service (added by the builder), not here.
        NetworkMode::Dhcp => {}
        NetworkMode::Static => {
            if let Err(e) = setup_static(&cfg.network) {
                say(&format!("network: {e}; only loopback is up"));
            }
        }
    }
}

/// Why a static address could not be set.
#[derive(Debug, thiserror::Error)]
pub enum StaticNetError {
    /// The image names no interface.
    #[error("static mode without an interface")]
    NoInterface,
    /// The image names no address.
    #[error("static mode without an address")]
    NoAddress,
    /// The address or gateway does not parse.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The interface did not show up in time (no driver, wrong name).
    #[error("interface {0} did not appear within {1:?}")]
    Missing(String, Duration),
    /// The kernel refused a step.
    #[error(transparent)]
    Io(#[from] network::NetIoError),
}

fn setup_static(n: &NetworkConfig) -> Result<(), StaticNetError> {
    let iface = n.interface.as_deref().ok_or(StaticNetError::NoInterface)?;
    let (addr, prefix) = parse_cidr(n.address.as_deref().ok_or(StaticNetError::NoAddress)?)?;
    let gateway = n.gateway.as_deref().map(parse_gateway).transpose()?;
    // The driver was loaded just now; its interface registers a moment later.
    if !network::wait_for_interface(Path::new(SYS_CLASS_NET), iface, INTERFACE_WAIT) {
        return Err(StaticNetError::Missing(iface.to_string(), INTERFACE_WAIT));
    }
    network::configure_ipv4(iface, addr, prefix, gateway)?;
    let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    say(&format!("network: {iface} {addr}/{prefix}{via} (static)"));
    Ok(())
}

fn health_http_program() -> String {
    // The running binary, by name if it can be named (nicer in `ps`),
    // else through /proc: after a fork the child's /proc/self/exe is this
    // same binary.
    match std::env::current_exe() {
        Ok(p) if p.is_file() => p.to_string_lossy().into_owned(),
        _ => "/proc/self/exe".to_string(),
    }
}

enum Assessment {
    /// Nothing to assess: no slot on the command line.
    Off,
    Pending(Assessor),
    Done,
}

enum Phase {
    /// Services are stopping.
    Services,
    /// Services are down; remaining processes got SIGTERM (then SIGKILL
    /// at `kill_at`).
    Stragglers { kill_at: Duration, killed: bool },
}

struct Shutdown {
    how: Halt,
    phase: Phase,
    /// Past this, shutdown goes on even if something would not die (a
    /// process stuck in the kernel ignores SIGKILL).
    give_up_at: Duration,
}

struct Init {
    started: Duration,
    sup: Supervisor,
    launcher: Launcher<io::Stderr>,
    signals: Option<Signals>,
    watchdog: Option<Watchdog>,
    next_feed: Duration,
    assessment: Assessment,
    assess_wake: Option<Duration>,
    slot: Option<Slot>,
    backend: Backend,
    /// The installed slot's try never started (see
    /// [`crate::pending_try`]): reboot with the try argument once this
    /// boot is blessed.
    retry_try: bool,
    stop_timeout: Duration,
    shutdown: Option<Shutdown>,
    announced_started: bool,
    orphans: u64,
}

/// The bootloader back-end the image's [`BOOTLOADER_CONFIG_PATH`] names;
/// systemd-boot when the file is absent. An unreadable file is reported
/// and taken as systemd-boot, whose ESP such an image lacks, so the
/// blessing fails with that reason and the bootloader falls back.
fn choose_backend() -> Backend {
    let config = backend::read_config(Path::new(BOOTLOADER_CONFIG_PATH)).unwrap_or_else(|e| {
        say(&format!("{e}; taking systemd-boot"));
        Default::default()
    });
    Backend::on_device(&config, &backend::PID1_MOUNTS)
}

/// Settles the try an install left on a Raspberry Pi
/// ([`crate::pending_try::at_boot`]); returns whether to reboot with the
/// try argument once this boot is blessed. Nothing is mounted without a
/// marker.
fn settle_pending_try(backend: &Backend) -> bool {
    let path = Path::new(TRY_MARKER);
    if !pending_try::exists(path) && !pending_try::exists(&path.with_extension("tmp")) {
        return false;
    }
    let view = match backend.try_view() {
        Ok(Some(view)) => view,
        Ok(None) => return false,
        Err(e) => {
            say(&format!("cannot read the tryboot state: {e}; {TRY_MARKER} is left as it is"));
            return false;
        }
    };
    match pending_try::at_boot(path, &view) {
        Ok(found) => {
            if let Some(msg) = found.message() {
                say(&msg);
            }
            found.retry()
        }
        Err(e) => {
            say(&format!("{e}; no automatic try this boot"));
            false
        }
    }
}

/// Runs stage 2. Never returns: PID 1 ends in `reboot(2)`.
pub fn run() -> ! {
    let started = signal::now();
    let mount_errors = mount_api_filesystems();
    let attached =
        console::attach_closed_stdio(Path::new("/dev/console"), Path::new("/proc/self/fd"));
    say(&format!("stage 2 starting (uptime {})", Secs(started)));
    match attached {
        Ok(0) => {}
        Ok(_) => say("console was not open; attached /dev/console"),
        Err(e) => say(&format!("cannot open /dev/console: {e}")),
    }
    for e in &mount_errors {
        say(&e.to_string());
    }

    let signals = match Signals::block_all() {
        Ok(s) => Some(s),
        Err(e) => {
            say(&format!("cannot read signals through a signalfd: {e}; reaping by polling"));
            None
        }
    };
    if let Err(e) = reboot::route_ctrl_alt_del_to_init() {
        say(&format!("cannot route Ctrl-Alt-Del to init: {e}"));
    }

    let slot = match std::fs::read_to_string("/proc/cmdline") {
        Ok(text) => match assess::slot_from_cmdline(&text) {
            Ok(Some(slot)) => Some(slot),
            Ok(None) => {
                say("no basalt.slot= on the kernel command line; boot assessment is off");
                None
            }
            Err(e) => {
                say(&format!(
                    "basalt.slot= on the kernel command line: {e}; boot assessment is off"
                ));
                None
            }
        },
        Err(e) => {
            say(&format!("cannot read /proc/cmdline: {e}; boot assessment is off"));
            None
        }
    };

    let config = read_config();
    let (services, stop_timeout, assessor) = match &config {
        Ok(cfg) => {
            say(&format!(
                "image {} {} for {} (slot {})",
                cfg.name,
                cfg.version,
                cfg.board,
                slot.map_or("unknown".to_string(), |s| s.to_string())
            ));
            load_modules(cfg);
            setup_network(cfg);
            (
                cfg.services.as_slice(),
                Duration::from_millis(cfg.boot.stop_timeout_ms),
                Assessor::new(started, &cfg.boot),
            )
        }
        Err(e) => {
            let reason =
                format!("the image configuration is unusable: {}", e.to_string().trim_end());
            say(&format!("{reason}; no services will run"));
            (
                &[][..],
                DEFAULT_STOP_TIMEOUT,
                Assessor::broken(started, BROKEN_CONFIG_DEADLINE, reason),
            )
        }
    };

    let sup = Supervisor::new(
        services,
        Options {
            health_http_program: health_http_program(),
            stable_after: STABLE_AFTER,
            stop_timeout,
        },
    );
    for (name, why) in sup.refused() {
        say(&format!("service {name:?} refused: {why}; it will not run"));
    }
    let order: Vec<&str> = sup.start_order().collect();
    if !order.is_empty() {
        say(&format!("start order: {}", order.join(", ")));
    }
    let launcher = Launcher::new(
        &sup,
        io::stderr(),
        Some(LogSettings { dir: PathBuf::from(LOG_DIR), limit: LOG_LIMIT }),
    );

    let watchdog = match Watchdog::open(Path::new(WATCHDOG_DEV)) {
        Ok(Some(w)) => {
            match w.set_timeout(WATCHDOG_TIMEOUT_S) {
                Ok(t) => say(&format!("watchdog {WATCHDOG_DEV} armed, timeout {t} s")),
                Err(e) => {
                    say(&format!("watchdog {WATCHDOG_DEV} armed; cannot set its timeout: {e}"))
                }
            }
            Some(w)
        }
        Ok(None) => None,
        Err(e) => {
            say(&format!("cannot open {WATCHDOG_DEV}: {e}"));
            None
        }
    };

    let assessment = match slot {
        Some(_) => Assessment::Pending(assessor),
        None => Assessment::Off,
    };
    let backend = choose_backend();
    // Before services start (the update agent is one of them): the try
    // marker is settled, or removed as this boot's try begins.
    let retry_try = settle_pending_try(&backend);
    let mut init = Init {
        started,
        sup,
        launcher,
        signals,
        watchdog,
        next_feed: started,
        assessment,
        assess_wake: None,
        slot,
        backend,
        retry_try,
        stop_timeout,
        shutdown: None,
        // With no usable configuration there is nothing to announce.
        announced_started: config.is_err(),
        orphans: 0,
    };
    let now = signal::now();
    init.sup.start(now, &mut init.launcher);
    init.run_loop()
}

impl Init {
    fn say(&mut self, msg: &str) {
        self.launcher.say(msg);
    }

    /// "(uptime X s, stage 2 +Y s)": since the kernel started (the clock
    /// behind /proc/uptime) and since stage 2 started.
    fn times(&self, now: Duration) -> String {
        format!("uptime {}, stage 2 +{}", Secs(now), Secs(now.saturating_sub(self.started)))
    }

    fn run_loop(&mut self) -> ! {
        let mut ready = Vec::new();
        let mut chans = Vec::new();
        loop {
            let now = signal::now();
            self.sup.on_tick(now, &mut self.launcher);
            if !self.announced_started && self.sup.all_started() && self.shutdown.is_none() {
                self.announced_started = true;
                let msg = format!("all services started ({})", self.times(now));
                self.say(&msg);
            }
            self.assess_step(now);
            self.feed_watchdog(now);
            if let Some(how) = self.shutdown_step(now) {
                self.finish(how);
            }

            let timeout = self.next_wakeup(now);
            let signal_ready = {
                let channels = self.launcher.channels();
                let mut fds = Vec::with_capacity(channels.len() + 1);
                if let Some(s) = &self.signals {
                    fds.push(s.fd());
                }
                fds.extend(channels.iter().map(|(_, fd)| *fd));
                if let Err(e) = signal::poll_readable(&fds, Some(timeout), &mut ready) {
                    say(&format!("poll failed: {e}"));
                    // Do not spin if poll keeps failing.
                    std::thread::sleep(Duration::from_millis(100));
                }
                let skip = usize::from(self.signals.is_some());
                chans.clear();
                chans.extend(
                    channels
                        .iter()
                        .zip(ready.iter().skip(skip))
                        .filter(|(_, r)| **r)
                        .map(|((c, _), _)| *c),
                );
                self.signals.is_none() || ready.first().copied().unwrap_or(false)
            };
            let now = signal::now();
            for &ch in &chans {
                self.launcher.read(ch, now, &mut self.sup);
            }
            if signal_ready {
                self.handle_signals(now);
            }
        }
    }

    fn next_wakeup(&self, now: Duration) -> Duration {
        let mut next = now + if self.signals.is_some() { MAX_WAIT } else { NO_SIGNALFD_WAIT };
        let mut consider = |t: Option<Duration>| {
            if let Some(t) = t {
                next = next.min(t);
            }
        };
        consider(self.sup.next_deadline());
        consider(self.assess_wake);
        consider(self.watchdog.as_ref().map(|_| self.next_feed));
        match &self.shutdown {
            Some(Shutdown { phase: Phase::Stragglers { kill_at, .. }, give_up_at, .. }) => {
                consider(Some(*kill_at));
                consider(Some(*give_up_at));
            }
            Some(Shutdown { give_up_at, .. }) => consider(Some(*give_up_at)),
            None => {}
        }
        next.saturating_sub(now)
    }

    fn handle_signals(&mut self, now: Duration) {
        let mut child = self.signals.is_none();
        let mut requests = Vec::new();
        if let Some(signals) = &self.signals {
            // Bounded: at most one read per pending signal kind and a few
            // more; the rest wait for the next round.
            for _ in 0..64 {
                match signals.read() {
                    Ok(Some(Received::Child)) => child = true,
                    Ok(Some(Received::Terminate)) => requests.push((Halt::PowerOff, "SIGTERM")),
                    Ok(Some(Received::PowerFail)) => requests.push((Halt::PowerOff, "SIGPWR")),
                    Ok(Some(Received::Interrupt)) => {
                        requests.push((Halt::Reboot, "Ctrl-Alt-Del (SIGINT)"))
                    }
                    Ok(Some(Received::Other(_))) => {}
                    Ok(None) => break,
                    Err(e) => {
                        say(&format!("reading signals failed: {e}"));
                        break;
                    }
                }
            }
        }
        if child {
            self.reap(now);
        }
        for (how, why) in requests {
            self.request_shutdown(how, now, why);
        }
    }

    /// Reaps every ended child; returns whether no children are left.
    fn reap(&mut self, now: Duration) -> bool {
        // Output written before an exit is shown before the exit.
        self.launcher.drain(now, &mut self.sup);
        loop {
            match process::reap_any() {
                Reaped::Child { pid, status } => match self.sup.owner(pid) {
                    Some((id, Purpose::Service)) => {
                        self.launcher.flush_partial(now, id);
                        self.sup.on_exit(pid, status, now, &mut self.launcher);
                    }
                    Some((_, Purpose::HealthCheck)) => {
                        self.sup.on_exit(pid, status, now, &mut self.launcher);
                    }
                    // An orphan re-parented to PID 1: nothing to do but
                    // collect it, so it does not stay a zombie.
                    None => self.orphans += 1,
                },
                Reaped::NoneReady => return false,
                Reaped::NoChildren => return true,
            }
        }
    }

    fn request_shutdown(&mut self, how: Halt, now: Duration, why: &str) {
        if self.shutdown.is_some() {
            self.say(&format!("{why}: already shutting down"));
            return;
        }
        let verb = match how {
            Halt::PowerOff => "power off",
            Halt::Reboot => "reboot",
        };
        let msg = format!("{why}: stopping services to {verb} ({})", self.times(now));
        self.say(&msg);
        // Each service may take the full stop timeout, one dependency level
        // after another; beyond that something ignores SIGKILL.
        let levels = u32::try_from(self.sup.len()).unwrap_or(u32::MAX).saturating_add(2);
        let give_up_at = now + self.stop_timeout.saturating_mul(levels) + Duration::from_secs(5);
        self.shutdown = Some(Shutdown { how, phase: Phase::Services, give_up_at });
        self.sup.begin_stop(now, &mut self.launcher);
    }

    /// Advances an orderly shutdown; returns how to halt once it is done.
    fn shutdown_step(&mut self, now: Duration) -> Option<Halt> {
        let sd = self.shutdown.as_ref()?;
        let (how, give_up_at) = (sd.how, sd.give_up_at);
        match sd.phase {
            Phase::Services => {
                if !self.sup.is_stopped() && now < give_up_at {
                    return None;
                }
                if !self.sup.is_stopped() {
                    self.say("some services did not stop even after SIGKILL; going on");
                }
                // Whatever is left is not a service: orphans, daemons a
                // service forked off. They get the same treatment.
                let _ = process::signal_all(StopSignal::Term);
                let next = Phase::Stragglers { kill_at: now + self.stop_timeout, killed: false };
                if let Some(sd) = self.shutdown.as_mut() {
                    sd.phase = next;
                }
                if self.reap(now) {
                    return Some(how);
                }
                None
            }
            Phase::Stragglers { kill_at, killed } => {
                if self.reap(now) || now >= give_up_at {
                    return Some(how);
                }
                if now >= kill_at && !killed {
                    self.say("processes left after SIGTERM; sending SIGKILL");
                    let _ = process::signal_all(StopSignal::Kill);
                    if let Some(sd) = self.shutdown.as_mut() {
                        sd.phase = Phase::Stragglers { kill_at, killed: true };
                    }
                }
                None
            }
        }
    }

    fn finish(&mut self, how: Halt) -> ! {
        let now = signal::now();
        self.launcher.drain(now, &mut self.sup);
        self.launcher.close_logs();
        // While an install's try is owed (the marker on /data, so read and
        // counted before /data is unmounted), a Pi's reboot carries the
        // firmware's argument (`0 tryboot`).
        let try_arg = match how {
            Halt::Reboot => {
                match pending_try::reboot_argument(
                    self.backend.reboot_to_try(),
                    Path::new(TRY_MARKER),
                ) {
                    Ok(arg) => arg,
                    Err(e) => {
                        self.say(&format!("{e}; rebooting plainly, without the try"));
                        None
                    }
                }
            }
            Halt::PowerOff => None,
        };
        mount::sync_all();
        let proc_mounts = Path::new("/proc/self/mounts");
        for target in [ESP_MOUNT, DATA_MOUNT] {
            let target = Path::new(target);
            if !mount::is_mounted(proc_mounts, target) {
                continue;
            }
            if let Err(e) = mount::unmount(target, false) {
                // Busy: at least make it clean on disk.
                let ro = mount::remount_readonly(target);
                let msg = format!(
                    "cannot unmount {}: {e}; {}",
                    target.display(),
                    if ro.is_ok() {
                        "remounted read-only"
                    } else {
                        "could not remount it read-only either"
                    }
                );
                self.say(&msg);
            }
        }
        mount::sync_all();
        if self.orphans > 0 {
            let msg = format!("reaped {} orphaned processes during this boot", self.orphans);
            self.say(&msg);
        }
        let msg = match how {
            Halt::PowerOff => format!("shutdown complete, powering off ({})", self.times(now)),
            Halt::Reboot => format!("shutdown complete, rebooting ({})", self.times(now)),
        };
        self.say(&msg);
        if let Some(w) = self.watchdog.take() {
            if let Err(e) = w.disarm() {
                self.say(&format!("cannot disarm the watchdog: {e}"));
            }
        }
        if let Some(arg) = try_arg {
            self.say(&format!("rebooting with \"{arg}\" to try the installed slot"));
            console::drain_stderr();
            let err = reboot::restart_with_argument(arg);
            self.say(&format!("reboot(2) with \"{arg}\" failed: {err}; rebooting plainly"));
        }
        // The last lines must leave the serial line before the machine goes.
        console::drain_stderr();
        let err = reboot::halt(how);
        self.say(&format!("reboot(2) failed: {err}; halting here"));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    fn feed_watchdog(&mut self, now: Duration) {
        let Some(w) = self.watchdog.as_mut() else { return };
        if now < self.next_feed {
            return;
        }
        self.next_feed = now + WATCHDOG_FEED;
        if let Err(e) = w.feed() {
            self.say(&format!("cannot feed the watchdog: {e}"));
        }
    }

    fn assess_step(&mut self, now: Duration) {
        self.assess_wake = None;
        if self.shutdown.is_some() {
            return;
        }
        let Assessment::Pending(assessor) = &self.assessment else { return };
        let Some(slot) = self.slot else { return };
        match assessor.decide(now, &self.sup) {
            Verdict::Wait { until } => self.assess_wake = Some(until),
            Verdict::Bless => {
                self.assessment = Assessment::Done;
                self.bless(slot, now);
                if std::mem::take(&mut self.retry_try) {
                    self.request_shutdown(Halt::Reboot, now, "the installed slot's try is owed");
                }
            }
            Verdict::Fail { reason } => {
                self.assessment = Assessment::Done;
                self.fail(slot, now, &reason);
            }
        }
    }

    fn bless(&mut self, slot: Slot, now: Duration) {
        let result = self.backend.with_bootloader(Some(slot), |bl| bl.bless(slot));
        let times = self.times(now);
        let msg = match result {
            Ok(r) if r.changed() => {
                format!("boot blessed: slot {slot} (entry {} -> {}) ({times})", r.from, r.to)
            }
            Ok(r) => format!("boot blessed: slot {slot} (entry {} was already blessed) ({times})", r.from),
            Err(e @ (AssessError::NoEsp { .. } | AssessError::NoBootPartition { .. })) => format!(
                "boot is healthy ({times}) but cannot be blessed: {e} (expected only when booted without a basalt disk)"
            ),
            Err(e) => format!(
                "boot is healthy ({times}) but cannot be blessed: {e}; the bootloader will treat this try as failed"
            ),
        };
        self.say(&msg);
    }

    fn fail(&mut self, slot: Slot, now: Duration, reason: &str) {
        let msg =
            format!("boot of slot {slot} failed its assessment ({}): {reason}", self.times(now));
        self.say(&msg);
        let result = self.backend.with_bootloader(Some(slot), |bl| assess::fail_boot(bl, slot));
        match result {
            Ok(FailOutcome::MarkedBad(r)) => {
                self.say(&format!("boot entry {r}: marked bad; rebooting into the other slot"));
                self.request_shutdown(Halt::Reboot, now, "failed boot");
            }
            Ok(FailOutcome::KeptGood(e)) => self.say(&format!(
                "boot entry {e} was blessed by an earlier boot; keeping it and staying up"
            )),
            Ok(FailOutcome::AlreadyBad(e)) => {
                self.say(&format!("boot entry {e} is already marked bad; staying up"))
            }
            Err(e @ (AssessError::NoEsp { .. } | AssessError::NoBootPartition { .. })) => {
                self.say(&format!("cannot mark the boot bad: {e}; staying up"))
            }
            Err(e) => {
                self.say(&format!(
                    "cannot mark the boot bad: {e}; rebooting so the bootloader's try counter decides"
                ));
                self.request_shutdown(Halt::Reboot, now, "failed boot");
            }
        }
    }
}
