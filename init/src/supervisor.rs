//! Supervision of an image's services: start order, restarts with backoff,
//! health checks, and stopping in reverse order.
//!
//! [`Supervisor`] is a state machine without side effects of its own. Each
//! event comes in as a method call carrying the current time (`now`, on one
//! monotonic clock); whatever it wants done to processes goes out through
//! the [`Control`] trait. Stage 2 drives it from its `poll` loop with real
//! processes ([`Launcher`]); tests drive it with a fake clock and a fake
//! [`Control`], or with real children in a temp dir.
//!
//! # Rules, in the order they apply
//!
//! 1. **Validation** ([`Supervisor::new`]). A service is *refused* (never
//!    started, reported in one line) if its name is empty, repeated or not
//!    `[A-Za-z0-9._-]` (it names the log file), its command is empty or not
//!    an absolute path, its health probe is malformed, or its `after` names
//!    an unknown service, itself, a cycle, or a refused service. The valid
//!    rest still runs: PID 1 must come up to report the error, and a
//!    refused `required` service keeps the boot from being blessed, so the
//!    bootloader falls back to the previous slot.
//! 2. **Start order**. Services start in a topological order of `after`
//!    that keeps the recipe's order where `after` leaves it free. A service
//!    starts once each service it is `after` has *been ready*: started, or,
//!    if that service has a health check, healthy at least once. `after`
//!    gates the first start only; restarts are not held back, and a
//!    dependency that dies later does not stop its dependents.
//! 3. **Restarts**. `always` restarts after every exit, `on-failure` after
//!    a non-zero status or a signal (or a failed exec), `never` not at all.
//!    The first restart waits `restart_delay_ms` (at least
//!    [`MIN_RESTART_DELAY`]); each further one doubles the wait up to
//!    `restart_delay_max_ms`. A run that lasted at least
//!    [`Options::stable_after`] (10 s in stage 2) counts as stable: the
//!    next restart waits `restart_delay_ms` again.
//! 4. **Health**. A service without a health check is healthy while it
//!    runs. With one, the check runs as a child process (never inside PID
//!    1): `interval_ms` after the service starts, then `interval_ms` after
//!    each check ends. Exit 0 within `timeout_ms` is healthy; anything else
//!    (a non-zero exit, or a check killed at its timeout) is unhealthy. One
//!    failure ends "healthy since". An unhealthy service is not restarted:
//!    health gates dependents and boot blessing only.
//! 5. **Stop** ([`Supervisor::begin_stop`]). Restarts and checks stop. A
//!    service gets SIGTERM (to its process group) once no running service
//!    is `after` it, so services stop in reverse start order and
//!    independent ones stop together; each gets SIGKILL if it is still
//!    running [`Options::stop_timeout`] after its SIGTERM.
//! 6. **Output** ([`Launcher`]). Each service has one pipe for its stdout
//!    and stderr, kept open by PID 1 across restarts and read in the poll
//!    loop (non-blocking, a bounded amount per round). Each line goes to
//!    the console as `[name] line` and to `<log dir>/<name>.log`, which
//!    rotates to `<name>.log.1` at a size limit. Lines longer than
//!    [`MAX_LINE`] are split. A health check's output is not shown; its
//!    last line explains a failed check in messages.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use basalt_bundle::config::{HealthProbe, RestartPolicy, ServiceConfig};

use crate::platform::process::{self, ExitStatus, OutputPipe, StopSignal};

/// A service, by its index in the configuration's service list.
pub type ServiceId = usize;

/// The shortest restart delay, whatever the configuration says, so a
/// service that fails at once cannot make PID 1 fork in a tight loop.
pub const MIN_RESTART_DELAY: Duration = Duration::from_millis(10);
/// The shortest health-check interval.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// The longest line of service output passed on as one line; longer lines
/// are split, so a service that never writes a newline cannot make PID 1
/// buffer without bound.
pub const MAX_LINE: usize = 1024;
/// The longest health-check output line kept for messages.
const MAX_CHECK_LINE: usize = 200;

static EMPTY_ENV: BTreeMap<String, String> = BTreeMap::new();

/// What a process is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The service itself.
    Service,
    /// One run of its health check.
    HealthCheck,
}

/// A process the supervisor wants started.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    /// Whose process it is.
    pub service: ServiceId,
    /// The service itself or its health check.
    pub purpose: Purpose,
    /// Program (absolute path) and arguments.
    pub argv: &'a [String],
    /// Environment added to the default `PATH`.
    pub env: &'a BTreeMap<String, String>,
}

/// The side effects the supervisor needs, so that its logic runs without
/// processes in tests.
pub trait Control {
    /// Starts a process as the leader of its own process group; its output
    /// goes to the service's channel for `req.purpose`. Returns its pid.
    fn spawn(&mut self, req: &SpawnRequest<'_>) -> io::Result<u32>;
    /// Sends a signal to the process group led by `pid`.
    fn signal(&mut self, pid: u32, sig: StopSignal) -> io::Result<()>;
    /// Reports an event (`basalt-init: ...` on the console), about
    /// `service` if given.
    fn note(&mut self, now: Duration, service: Option<ServiceId>, msg: &str);
}

/// Settings that come from outside the service list.
#[derive(Debug, Clone)]
pub struct Options {
    /// The program run as `PROGRAM health-http URL TIMEOUT_MS` for HTTP
    /// probes: the running `basalt-init` itself.
    pub health_http_program: String,
    /// A run at least this long resets the restart backoff.
    pub stable_after: Duration,
    /// Time between SIGTERM and SIGKILL at shutdown.
    pub stop_timeout: Duration,
}

/// Seconds with two decimals, as console messages show durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} s", self.0.as_secs_f64())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Not started yet: waiting for the supervisor to start, or for the
    /// services it is `after`.
    Waiting,
    Running {
        pid: u32,
        since: Duration,
    },
    /// Exited; restarts at `at`.
    Restarting {
        at: Duration,
    },
    /// Exited and stays down (restart policy, or shutdown).
    Done,
    /// Invalid configuration; never started.
    Refused,
}

#[derive(Debug)]
struct CheckRun {
    pid: u32,
    deadline: Duration,
    /// Killed at its timeout; its exit status no longer matters.
    timed_out: bool,
    /// The service it checked has exited; the result is meaningless.
    stale: bool,
}

#[derive(Debug)]
struct Health {
    argv: Vec<String>,
    interval: Duration,
    timeout: Duration,
    next_at: Option<Duration>,
    running: Option<CheckRun>,
    healthy_since: Option<Duration>,
    last_failure: Option<String>,
    output: LineSplitter,
    last_line: String,
}

#[derive(Debug)]
struct Service {
    cfg: ServiceConfig,
    deps: Vec<ServiceId>,
    refused: Option<String>,
    run: Run,
    base_delay: Duration,
    max_delay: Duration,
    next_delay: Duration,
    restarts: u32,
    last_exit: Option<ExitStatus>,
    started_once: bool,
    ready_once: bool,
    health: Option<Health>,
    term_at: Option<Duration>,
    killed: bool,
}

impl Service {
    fn pid(&self) -> Option<u32> {
        match self.run {
            Run::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    fn healthy_since(&self) -> Option<Duration> {
        match (self.run, &self.health) {
            (Run::Running { since, .. }, None) => Some(since),
            (Run::Running { .. }, Some(h)) => h.healthy_since,
            _ => None,
        }
    }
}

/// The supervisor: every service's state, driven by events.
#[derive(Debug)]
pub struct Supervisor {
    services: Vec<Service>,
    order: Vec<ServiceId>,
    opts: Options,
    started: bool,
    stopping: bool,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn check_one(cfg: &ServiceConfig) -> Option<String> {
    if !valid_name(&cfg.name) {
        return Some(format!(
            "name {:?} is not 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . or -)",
            cfg.name
        ));
    }
    match cfg.command.first() {
        None => return Some("command is empty".into()),
        Some(p) if !p.starts_with('/') => {
            return Some(format!("command {p:?} is not an absolute path"))
        }
        Some(_) => {}
    }
    match cfg.health.as_ref().map(|h| &h.probe) {
        Some(HealthProbe::Command(c)) if !c.first().is_some_and(|p| p.starts_with('/')) => {
            Some("health probe command is empty or not an absolute path".into())
        }
        Some(HealthProbe::Http(url)) if !url.starts_with("http://") => {
            Some(format!("health probe URL {url:?} does not start with http://"))
        }
        _ => None,
    }
}

/// Shortest `after` path from `from` back to itself among `live` services.
fn find_cycle(deps: &[Vec<ServiceId>], live: &[bool], from: ServiceId) -> Option<Vec<ServiceId>> {
    let mut parent: Vec<Option<ServiceId>> = vec![None; deps.len()];
    let mut queue = std::collections::VecDeque::new();
    queue.push_back(from);
    while let Some(n) = queue.pop_front() {
        for &d in &deps[n] {
            if !live[d] {
                continue;
            }
            if d == from {
                let mut path = Vec::new();
                let mut cur = n;
                while cur != from {
                    path.push(cur);
                    cur = parent[cur]?;
                }
                path.push(from);
                path.reverse();
                path.push(from);
                return Some(path);
            }
            if parent[d].is_none() && d != from {
                parent[d] = Some(n);
                queue.push_back(d);
            }
        }
    }
    None
}

/// Validates the services and computes the start order. Returns each
/// service's dependencies, its refusal reason if any, and the order of the
/// valid ones.
fn plan(cfgs: &[ServiceConfig]) -> (Vec<Vec<ServiceId>>, Vec<Option<String>>, Vec<ServiceId>) {
    let n = cfgs.len();
    let mut refused: Vec<Option<String>> = cfgs.iter().map(check_one).collect();
    for i in 0..n {
        if refused[i].is_none() && cfgs[..i].iter().any(|c| c.name == cfgs[i].name) {
            refused[i] = Some(format!("name {:?} is used by an earlier service", cfgs[i].name));
        }
    }
    let index = |name: &str| cfgs.iter().position(|c| c.name == name);
    let mut deps: Vec<Vec<ServiceId>> = vec![Vec::new(); n];
    for (i, cfg) in cfgs.iter().enumerate() {
        for name in &cfg.after {
            match index(name) {
                Some(d) if d == i => {
                    if refused[i].is_none() {
                        refused[i] = Some(format!("it is after itself ({name:?})"));
                    }
                }
                Some(d) => {
                    if !deps[i].contains(&d) {
                        deps[i].push(d);
                    }
                }
                None => {
                    if refused[i].is_none() {
                        refused[i] = Some(format!("after names {name:?}, which is not a service"));
                    }
                }
            }
        }
    }
    let propagate = |refused: &mut Vec<Option<String>>| loop {
        let mut changed = false;
        for i in 0..n {
            if refused[i].is_some() {
                continue;
            }
            if let Some(&d) = deps[i].iter().find(|&&d| refused[d].is_some()) {
                refused[i] = Some(format!("it is after {:?}, which is refused", cfgs[d].name));
                changed = true;
            }
        }
        if !changed {
            break;
        }
    };
    propagate(&mut refused);

    // Kahn's algorithm, always taking the lowest index that is ready, so
    // the recipe's order holds wherever `after` allows.
    let mut order = Vec::with_capacity(n);
    let mut placed = vec![false; n];
    loop {
        let next = (0..n)
            .find(|&i| refused[i].is_none() && !placed[i] && deps[i].iter().all(|&d| placed[d]));
        match next {
            Some(i) => {
                placed[i] = true;
                order.push(i);
            }
            None => break,
        }
    }
    // What is left is on a cycle, or after something that is.
    let live: Vec<bool> = (0..n).map(|i| refused[i].is_none() && !placed[i]).collect();
    for i in 0..n {
        if !live[i] {
            continue;
        }
        if let Some(path) = find_cycle(&deps, &live, i) {
            let names: Vec<&str> = path.iter().map(|&j| cfgs[j].name.as_str()).collect();
            refused[i] = Some(format!("its after forms a cycle: {}", names.join(" -> ")));
        }
    }
    propagate(&mut refused);
    (deps, refused, order)
}

impl Supervisor {
    /// Validates `services` and prepares them; nothing starts until
    /// [`Supervisor::start`]. Refused services are kept (to report on)
    /// but never started; see [`Supervisor::refused`].
    pub fn new(services: &[ServiceConfig], opts: Options) -> Supervisor {
        let (deps, refused, order) = plan(services);
        let services = services
            .iter()
            .zip(deps)
            .zip(refused)
            .map(|((cfg, deps), refused)| {
                let base_delay = Duration::from_millis(cfg.restart_delay_ms).max(MIN_RESTART_DELAY);
                let max_delay = Duration::from_millis(cfg.restart_delay_max_ms).max(base_delay);
                let health = cfg.health.as_ref().map(|h| Health {
                    argv: match &h.probe {
                        HealthProbe::Command(c) => c.clone(),
                        HealthProbe::Http(url) => vec![
                            opts.health_http_program.clone(),
                            "health-http".into(),
                            url.clone(),
                            h.timeout_ms.to_string(),
                        ],
                    },
                    interval: Duration::from_millis(h.interval_ms).max(MIN_CHECK_INTERVAL),
                    timeout: Duration::from_millis(h.timeout_ms.max(1)),
                    next_at: None,
                    running: None,
                    healthy_since: None,
                    last_failure: None,
                    output: LineSplitter::new(MAX_CHECK_LINE),
                    last_line: String::new(),
                });
                Service {
                    run: if refused.is_some() { Run::Refused } else { Run::Waiting },
                    cfg: cfg.clone(),
                    deps,
                    refused,
                    base_delay,
                    max_delay,
                    next_delay: base_delay,
                    restarts: 0,
                    last_exit: None,
                    started_once: false,
                    ready_once: false,
                    health,
                    term_at: None,
                    killed: false,
                }
            })
            .collect();
        Supervisor { services, order, opts, started: false, stopping: false }
    }

    /// Refused services with the reason, in configuration order.
    pub fn refused(&self) -> impl Iterator<Item = (&str, &str)> {
        self.services.iter().filter_map(|s| Some((s.cfg.name.as_str(), s.refused.as_deref()?)))
    }

    /// The valid services in start order.
    pub fn start_order(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|&i| self.services[i].cfg.name.as_str())
    }

    /// Number of services, refused ones included.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// True when the configuration lists no services.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The name of service `id`.
    pub fn name(&self, id: ServiceId) -> &str {
        self.services.get(id).map_or("?", |s| s.cfg.name.as_str())
    }

    /// Whether service `id` has a health check (and so a check channel).
    pub fn has_check(&self, id: ServiceId) -> bool {
        self.services.get(id).is_some_and(|s| s.health.is_some())
    }

    /// Starts whatever can start now.
    pub fn start(&mut self, now: Duration, ctl: &mut dyn Control) {
        self.started = true;
        self.advance(now, ctl);
    }

    /// True once every valid service has been started at least once.
    pub fn all_started(&self) -> bool {
        self.services.iter().all(|s| s.refused.is_some() || s.started_once)
    }

    /// Every pid the supervisor is waiting for: services and checks.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.services.iter().flat_map(|s| {
            let check = s.health.as_ref().and_then(|h| h.running.as_ref()).map(|c| c.pid);
            s.pid().into_iter().chain(check)
        })
    }

    /// The process id of service `id`, while it runs.
    pub fn pid(&self, id: ServiceId) -> Option<u32> {
        self.services.get(id).and_then(Service::pid)
    }

    /// Whose process `pid` is, if it is one of ours.
    pub fn owner(&self, pid: u32) -> Option<(ServiceId, Purpose)> {
        self.services.iter().enumerate().find_map(|(i, s)| {
            if s.pid() == Some(pid) {
                Some((i, Purpose::Service))
            } else if s.health.as_ref().and_then(|h| h.running.as_ref()).map(|c| c.pid) == Some(pid)
            {
                Some((i, Purpose::HealthCheck))
            } else {
                None
            }
        })
    }

    /// Since when service `id` has been healthy without a break, if it is
    /// now.
    pub fn healthy_since(&self, id: ServiceId) -> Option<Duration> {
        self.services.get(id).and_then(Service::healthy_since)
    }

    /// The `required` services with their "healthy since" (refused ones
    /// are never healthy).
    pub fn required(&self) -> impl Iterator<Item = (ServiceId, Option<Duration>)> + '_ {
        self.services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.cfg.required)
            .map(|(i, s)| (i, s.healthy_since()))
    }

    /// How many times service `id` has been restarted.
    pub fn restarts(&self, id: ServiceId) -> u32 {
        self.services.get(id).map_or(0, |s| s.restarts)
    }

    /// One line on the state of service `id`, for messages such as why a
    /// boot was not blessed.
    pub fn describe(&self, id: ServiceId, now: Duration) -> String {
        let Some(s) = self.services.get(id) else { return "no such service".into() };
        let mut out = match s.run {
            Run::Refused => format!("refused: {}", s.refused.as_deref().unwrap_or("?")),
            Run::Waiting => {
                let waiting: Vec<&str> = s
                    .deps
                    .iter()
                    .filter(|&&d| !self.services[d].ready_once)
                    .map(|&d| self.services[d].cfg.name.as_str())
                    .collect();
                if waiting.is_empty() {
                    "not started yet".into()
                } else {
                    format!("not started: waiting for {}", waiting.join(", "))
                }
            }
            Run::Running { pid, since } => {
                format!("running for {} (pid {pid})", Secs(now.saturating_sub(since)))
            }
            Run::Restarting { at } => format!(
                "exited with {}, restarting in {}",
                s.last_exit.map_or("a failed start".into(), |e| e.to_string()),
                Secs(at.saturating_sub(now))
            ),
            Run::Done => match s.last_exit {
                Some(e) => format!("exited with {e}, not restarted"),
                None => "failed to start, not restarted".into(),
            },
        };
        if s.restarts > 0 {
            out.push_str(&format!(", {} restarts", s.restarts));
        }
        if let (Run::Running { .. }, Some(h)) = (s.run, &s.health) {
            match (h.healthy_since, &h.last_failure) {
                (Some(t), _) => {
                    out.push_str(&format!(", healthy for {}", Secs(now.saturating_sub(t))))
                }
                (None, Some(why)) => out.push_str(&format!(", unhealthy: {why}")),
                (None, None) => out.push_str(", no health check passed yet"),
            }
        }
        out
    }

    /// The next time something is due (a restart, a check, a check or stop
    /// timeout), for the event loop's poll timeout.
    pub fn next_deadline(&self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut consider = |t: Duration| next = Some(next.map_or(t, |n: Duration| n.min(t)));
        for s in &self.services {
            if let Run::Restarting { at } = s.run {
                if !self.stopping {
                    consider(at);
                }
            }
            if let Some(h) = &s.health {
                match &h.running {
                    Some(c) if !c.timed_out => consider(c.deadline),
                    Some(_) => {}
                    None => {
                        if let (Some(t), false) = (h.next_at, self.stopping) {
                            consider(t);
                        }
                    }
                }
            }
            if let (Some(t), false, Run::Running { .. }) = (s.term_at, s.killed, s.run) {
                consider(t + self.opts.stop_timeout);
            }
        }
        next
    }

    /// Time has passed: start, restart, check or kill what is due.
    pub fn on_tick(&mut self, now: Duration, ctl: &mut dyn Control) {
        self.advance(now, ctl);
    }

    /// A child ended (reaped by the caller). Returns whose it was, or
    /// `None` for a pid the supervisor does not know (an orphan).
    pub fn on_exit(
        &mut self,
        pid: u32,
        status: ExitStatus,
        now: Duration,
        ctl: &mut dyn Control,
    ) -> Option<(ServiceId, Purpose)> {
        let owner = self.owner(pid)?;
        match owner {
            (id, Purpose::Service) => {
                let since = match self.services[id].run {
                    Run::Running { since, .. } => since,
                    _ => now,
                };
                self.services[id].last_exit = Some(status);
                self.after_exit(id, Some(status), since, now, ctl);
            }
            (id, Purpose::HealthCheck) => self.check_done(id, status, now, ctl),
        }
        self.advance(now, ctl);
        Some(owner)
    }

    /// Output of service `id`'s health check, as read from its channel.
    /// Only the last line is kept, for messages.
    pub fn check_output(&mut self, id: ServiceId, bytes: &[u8]) {
        if let Some(h) = self.services.get_mut(id).and_then(|s| s.health.as_mut()) {
            let last = &mut h.last_line;
            h.output.push(bytes, |line| {
                if !line.is_empty() {
                    *last = String::from_utf8_lossy(line).into_owned();
                }
            });
        }
    }

    /// Begins an orderly stop of everything; see the module docs. Call
    /// [`Supervisor::on_tick`] and [`Supervisor::on_exit`] as before until
    /// [`Supervisor::is_stopped`].
    pub fn begin_stop(&mut self, now: Duration, ctl: &mut dyn Control) {
        self.stopping = true;
        self.advance(now, ctl);
    }

    /// True once stopping and no service or check process is left.
    pub fn is_stopped(&self) -> bool {
        self.stopping && self.pids().next().is_none()
    }

    fn deps_ready(&self, id: ServiceId) -> bool {
        self.services[id].deps.iter().all(|&d| self.services[d].ready_once)
    }

    fn advance(&mut self, now: Duration, ctl: &mut dyn Control) {
        if !self.started {
            return;
        }
        if self.stopping {
            self.advance_stop(now, ctl);
            return;
        }
        for k in 0..self.order.len() {
            let id = self.order[k];
            let due = match self.services[id].run {
                Run::Waiting => self.deps_ready(id),
                Run::Restarting { at } => at <= now,
                _ => false,
            };
            if due {
                self.launch(id, now, ctl);
            }
            self.advance_check(id, now, ctl);
        }
    }

    fn advance_check(&mut self, id: ServiceId, now: Duration, ctl: &mut dyn Control) {
        let s = &mut self.services[id];
        let running = matches!(s.run, Run::Running { .. });
        let Some(h) = s.health.as_mut() else { return };
        if let Some(c) = h.running.as_mut() {
            if !c.timed_out && c.deadline <= now {
                c.timed_out = true;
                // The exit arrives later; the check counts as failed then.
                if let Err(e) = ctl.signal(c.pid, StopSignal::Kill) {
                    ctl.note(
                        now,
                        Some(id),
                        &format!("cannot kill health check of {}: {e}", s.cfg.name),
                    );
                }
            }
            return;
        }
        let Some(at) = h.next_at else { return };
        if !running || at > now {
            return;
        }
        h.next_at = None;
        let req = SpawnRequest {
            service: id,
            purpose: Purpose::HealthCheck,
            argv: &h.argv,
            env: &EMPTY_ENV,
        };
        match ctl.spawn(&req) {
            Ok(pid) => {
                h.running = Some(CheckRun {
                    pid,
                    deadline: now + h.timeout,
                    timed_out: false,
                    stale: false,
                })
            }
            Err(e) => {
                let why = format!("cannot run health check: {e}");
                if h.last_failure.as_deref() != Some(why.as_str()) {
                    ctl.note(now, Some(id), &format!("{}: {why}", s.cfg.name));
                }
                h.healthy_since = None;
                h.last_failure = Some(why);
                h.next_at = Some(now + h.interval);
            }
        }
    }

    fn launch(&mut self, id: ServiceId, now: Duration, ctl: &mut dyn Control) {
        let s = &mut self.services[id];
        let req = SpawnRequest {
            service: id,
            purpose: Purpose::Service,
            argv: &s.cfg.command,
            env: &s.cfg.env,
        };
        match ctl.spawn(&req) {
            Ok(pid) => {
                s.run = Run::Running { pid, since: now };
                s.started_once = true;
                if let Some(h) = s.health.as_mut() {
                    h.healthy_since = None;
                    h.next_at = Some(now + h.interval);
                } else {
                    s.ready_once = true;
                }
                let msg = if s.restarts == 0 {
                    format!("started {} (pid {pid})", s.cfg.name)
                } else {
                    format!("restarted {} (pid {pid}, restart {})", s.cfg.name, s.restarts)
                };
                ctl.note(now, Some(id), &msg);
            }
            Err(e) => {
                ctl.note(now, Some(id), &format!("cannot start {}: {e}", s.cfg.name));
                s.last_exit = None;
                self.after_exit(id, None, now, now, ctl);
            }
        }
    }

    /// The service's process is gone (`status`), or never came to be
    /// (`None`): decide about a restart.
    fn after_exit(
        &mut self,
        id: ServiceId,
        status: Option<ExitStatus>,
        since: Duration,
        now: Duration,
        ctl: &mut dyn Control,
    ) {
        let stable_after = self.opts.stable_after;
        let stopping = self.stopping;
        let s = &mut self.services[id];
        if let Some(h) = s.health.as_mut() {
            h.healthy_since = None;
            h.next_at = None;
            if let Some(c) = h.running.as_mut() {
                if !c.stale && !c.timed_out {
                    let _ = ctl.signal(c.pid, StopSignal::Kill);
                }
                c.stale = true;
            }
        }
        let ran = now.saturating_sub(since);
        let how = match status {
            Some(st) => format!("{} exited with {st} after {}", s.cfg.name, Secs(ran)),
            None => format!("{} did not start", s.cfg.name),
        };
        if stopping {
            s.run = Run::Done;
            if status.is_some() {
                ctl.note(now, Some(id), &how);
            }
            return;
        }
        let failed = status.is_none_or(|st| !st.success());
        let restart = match s.cfg.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        if !restart {
            s.run = Run::Done;
            let policy = match s.cfg.restart {
                RestartPolicy::Never => "restart = never",
                _ => "restart = on-failure",
            };
            ctl.note(now, Some(id), &format!("{how}; not restarted ({policy})"));
            if !s.ready_once {
                self.note_blocked(id, now, ctl);
            }
            return;
        }
        if ran >= stable_after {
            s.next_delay = s.base_delay;
        }
        let delay = s.next_delay;
        s.next_delay = (delay * 2).min(s.max_delay);
        s.restarts += 1;
        s.run = Run::Restarting { at: now + delay };
        ctl.note(now, Some(id), &format!("{how}; restart {} in {}", s.restarts, Secs(delay)));
    }

    /// Service `id` is down for good without ever having been ready: say
    /// which services will therefore never start.
    fn note_blocked(&self, id: ServiceId, now: Duration, ctl: &mut dyn Control) {
        for (j, s) in self.services.iter().enumerate() {
            if s.run == Run::Waiting && s.deps.contains(&id) {
                ctl.note(
                    now,
                    Some(j),
                    &format!(
                        "{} will not start: it is after {}, which stopped before it was ready",
                        s.cfg.name, self.services[id].cfg.name
                    ),
                );
            }
        }
    }

    fn check_done(
        &mut self,
        id: ServiceId,
        status: ExitStatus,
        now: Duration,
        ctl: &mut dyn Control,
    ) {
        let s = &mut self.services[id];
        let running = matches!(s.run, Run::Running { .. });
        let name = s.cfg.name.as_str();
        let Some(h) = s.health.as_mut() else { return };
        let Some(run) = h.running.take() else { return };
        let last = &mut h.last_line;
        h.output.flush(|line| {
            if !line.is_empty() {
                *last = String::from_utf8_lossy(line).into_owned();
            }
        });
        let last_line = std::mem::take(&mut h.last_line);
        if run.stale || !running || self.stopping {
            return;
        }
        h.next_at = Some(now + h.interval);
        if !run.timed_out && status.success() {
            if h.healthy_since.is_none() {
                h.healthy_since = Some(now);
                let up = match s.run {
                    Run::Running { since, .. } => now.saturating_sub(since),
                    _ => Duration::ZERO,
                };
                ctl.note(
                    now,
                    Some(id),
                    &format!("{name} is healthy ({} after its start)", Secs(up)),
                );
            }
            h.last_failure = None;
            s.ready_once = true;
            return;
        }
        let mut why = if run.timed_out {
            format!("health check timed out after {}", Secs(h.timeout))
        } else {
            format!("health check failed with {status}")
        };
        if !last_line.is_empty() {
            why.push_str(": ");
            why.push_str(&last_line);
        }
        if h.healthy_since.take().is_some() {
            ctl.note(now, Some(id), &format!("{name} is unhealthy: {why}"));
        } else if h.last_failure.as_deref() != Some(why.as_str()) {
            ctl.note(now, Some(id), &format!("{name} is not healthy yet: {why}"));
        }
        h.last_failure = Some(why);
    }

    fn advance_stop(&mut self, now: Duration, ctl: &mut dyn Control) {
        let timeout = self.opts.stop_timeout;
        for k in (0..self.order.len()).rev() {
            let id = self.order[k];
            // Checks go first: they only matter while the service runs.
            if let Some(c) = self.services[id].health.as_mut().and_then(|h| h.running.as_mut()) {
                if !c.stale && !c.timed_out {
                    let _ = ctl.signal(c.pid, StopSignal::Kill);
                    c.stale = true;
                }
            }
            match self.services[id].run {
                Run::Waiting | Run::Restarting { .. } => self.services[id].run = Run::Done,
                Run::Running { pid, .. } => {
                    let dependents_running =
                        self.services.iter().any(|d| d.deps.contains(&id) && d.pid().is_some());
                    let s = &mut self.services[id];
                    match s.term_at {
                        None if !dependents_running => {
                            s.term_at = Some(now);
                            ctl.note(
                                now,
                                Some(id),
                                &format!("stopping {} (pid {pid})", s.cfg.name),
                            );
                            if let Err(e) = ctl.signal(pid, StopSignal::Term) {
                                ctl.note(
                                    now,
                                    Some(id),
                                    &format!("cannot stop {}: {e}", s.cfg.name),
                                );
                            }
                        }
                        Some(t) if !s.killed && now >= t + timeout => {
                            s.killed = true;
                            ctl.note(
                                now,
                                Some(id),
                                &format!(
                                    "{} did not stop within {}; killing it",
                                    s.cfg.name,
                                    Secs(timeout)
                                ),
                            );
                            if let Err(e) = ctl.signal(pid, StopSignal::Kill) {
                                ctl.note(
                                    now,
                                    Some(id),
                                    &format!("cannot kill {}: {e}", s.cfg.name),
                                );
                            }
                        }
                        _ => {}
                    }
                }
                Run::Done | Run::Refused => {}
            }
        }
    }
}

/// Splits a byte stream into lines of at most `max` bytes without
/// allocating past `max`: a longer line comes out in pieces. A trailing
/// `\r` is dropped.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

impl LineSplitter {
    /// A splitter for lines of at most `max` bytes (at least 1).
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter { buf: Vec::new(), max: max.max(1) }
    }

    /// Appends to the partial line; returns whether it filled up and was
    /// emitted.
    fn append(&mut self, mut data: &[u8], emit: &mut dyn FnMut(&[u8])) -> bool {
        let mut emitted = false;
        while !data.is_empty() {
            let room = self.max - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            emitted = false;
            if self.buf.len() == self.max {
                emit(trim_cr(&self.buf));
                self.buf.clear();
                emitted = true;
            }
        }
        emitted
    }

    /// Feeds `bytes`; calls `emit` for each complete line, without the
    /// newline.
    pub fn push(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let line = &rest[..pos];
                    rest = &rest[pos + 1..];
                    if self.buf.is_empty() && line.len() <= self.max {
                        emit(trim_cr(line));
                    } else {
                        let split_at_end = self.append(line, &mut emit);
                        if !split_at_end || !self.buf.is_empty() {
                            emit(trim_cr(&self.buf));
                        }
                        self.buf.clear();
                    }
                }
                None => {
                    self.append(rest, &mut emit);
                    break;
                }
            }
        }
    }

    /// Emits a partial line, if any (the writer exited without a newline).
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            emit(trim_cr(&self.buf));
            self.buf.clear();
        }
    }
}

/// A service's log file, `<dir>/<name>.log`, rotated to `<name>.log.1`
/// when it would grow past a limit, so the data partition never fills up
/// with logs: at most twice the limit per service.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    old: PathBuf,
    file: Option<File>,
    size: u64,
    limit: u64,
    line: Vec<u8>,
}

impl RotatingLog {
    /// A log for `name` in `dir`, opened (and `dir` created) on the first
    /// write.
    pub fn new(dir: &Path, name: &str, limit: u64) -> RotatingLog {
        RotatingLog {
            path: dir.join(format!("{name}.log")),
            old: dir.join(format!("{name}.log.1")),
            file: None,
            size: 0,
            limit,
            line: Vec::with_capacity(MAX_LINE + 32),
        }
    }

    /// The current log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        self.file.as_mut().ok_or_else(|| io::Error::other("log file not open"))
    }

    /// Appends `line`, stamped with the time since boot.
    pub fn write_line(&mut self, now: Duration, line: &[u8]) -> io::Result<()> {
        self.line.clear();
        let _ = write!(self.line, "[{:>6}.{:03}] ", now.as_secs(), now.subsec_millis());
        self.line.extend_from_slice(line);
        self.line.push(b'\n');
        let len = self.line.len() as u64;
        self.open()?;
        if self.size > 0 && self.size + len > self.limit {
            self.file = None;
            std::fs::rename(&self.path, &self.old)?;
            self.open()?;
        }
        let line = std::mem::take(&mut self.line);
        let res = self.open().and_then(|f| f.write_all(&line));
        self.line = line;
        res?;
        self.size += len;
        Ok(())
    }

    /// Closes the file (before `/data` is unmounted).
    pub fn close(&mut self) {
        self.file = None;
    }
}

/// Where [`Launcher`] writes service logs.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Directory of the `<name>.log` files (`/data/log` on a device).
    pub dir: PathBuf,
    /// Size at which a log rotates.
    pub limit: u64,
}

/// The real [`Control`]: starts processes with [`process::spawn`], gives
/// each service one output pipe and one health-check pipe kept across
/// restarts, and passes service output to the console as `[name] line` and
/// to the service's [`RotatingLog`].
///
/// Stage 2 uses it with the console; host tests with a `Vec<u8>`.
#[derive(Debug)]
pub struct Launcher<W: Write> {
    names: Vec<String>,
    pipes: Vec<[Option<OutputPipe>; 2]>,
    splitters: Vec<LineSplitter>,
    logs: Vec<Option<RotatingLog>>,
    log_failed: Vec<bool>,
    console: W,
    line: Vec<u8>,
}

/// A pipe [`Launcher`] reads: which service, and what for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel {
    /// The service.
    pub service: ServiceId,
    /// Its own output or its health check's.
    pub purpose: Purpose,
}

fn slot(purpose: Purpose) -> usize {
    match purpose {
        Purpose::Service => 0,
        Purpose::HealthCheck => 1,
    }
}

impl<W: Write> Launcher<W> {
    /// A launcher for the services of `sup`, writing to `console` and, if
    /// given, to log files.
    pub fn new(sup: &Supervisor, console: W, logs: Option<LogSettings>) -> Launcher<W> {
        let n = sup.len();
        Launcher {
            names: (0..n).map(|i| sup.name(i).to_string()).collect(),
            pipes: (0..n).map(|_| [None, None]).collect(),
            splitters: (0..n).map(|_| LineSplitter::new(MAX_LINE)).collect(),
            logs: (0..n)
                .map(|i| logs.as_ref().map(|l| RotatingLog::new(&l.dir, sup.name(i), l.limit)))
                .collect(),
            log_failed: vec![false; n],
            console,
            line: Vec::with_capacity(MAX_LINE + 80),
        }
    }

    /// The console writer (tests read what was written).
    pub fn console(&self) -> &W {
        &self.console
    }

    /// Writes `basalt-init: {msg}` as one line on the console.
    pub fn say(&mut self, msg: &str) {
        self.line.clear();
        self.line.extend_from_slice(b"basalt-init: ");
        self.line.extend_from_slice(msg.as_bytes());
        self.line.push(b'\n');
        // One write per line, so lines from PID 1 never interleave with
        // kernel messages mid-line more than the console forces; an error
        // writing to the console has nowhere to be reported.
        let _ = self.console.write_all(&self.line);
        let _ = self.console.flush();
    }

    /// Every open pipe, to poll.
    pub fn channels(&self) -> Vec<(Channel, BorrowedFd<'_>)> {
        let mut out = Vec::new();
        for (service, pair) in self.pipes.iter().enumerate() {
            for (purpose, pipe) in [Purpose::Service, Purpose::HealthCheck].into_iter().zip(pair) {
                if let Some(p) = pipe {
                    out.push((Channel { service, purpose }, p.fd()));
                }
            }
        }
        out
    }

    fn log_line(&mut self, now: Duration, service: ServiceId, line: &[u8]) {
        let Some(Some(log)) = self.logs.get_mut(service) else { return };
        if self.log_failed[service] {
            return;
        }
        if let Err(e) = log.write_line(now, line) {
            // Once per boot: a full or missing /data must not flood the
            // console; the console still gets every line.
            self.log_failed[service] = true;
            let msg =
                format!("not logging {} to {}: {e}", self.names[service], log.path().display());
            self.say(&msg);
        }
    }

    fn service_line(&mut self, now: Duration, service: ServiceId, line: &[u8]) {
        self.line.clear();
        self.line.push(b'[');
        self.line.extend_from_slice(self.names[service].as_bytes());
        self.line.extend_from_slice(b"] ");
        self.line.extend_from_slice(line);
        self.line.push(b'\n');
        let _ = self.console.write_all(&self.line);
        let _ = self.console.flush();
        self.log_line(now, service, line);
    }

    /// Reads what channel `ch` has (a bounded amount per call, so one noisy
    /// service cannot starve the loop) and passes it on: service output to
    /// console and log, check output to `sup`.
    pub fn read(&mut self, ch: Channel, now: Duration, sup: &mut Supervisor) {
        let mut buf = [0u8; 4096];
        for _ in 0..16 {
            let Some(Some(pipe)) = self.pipes.get(ch.service).map(|p| &p[slot(ch.purpose)]) else {
                return;
            };
            let n = match pipe.read(&mut buf) {
                Ok(Some(n)) if n > 0 => n,
                // Empty, end of file (cannot happen while PID 1 holds the
                // write end) or an error: nothing more now.
                _ => return,
            };
            match ch.purpose {
                Purpose::HealthCheck => sup.check_output(ch.service, &buf[..n]),
                Purpose::Service => {
                    let mut splitter =
                        std::mem::replace(&mut self.splitters[ch.service], LineSplitter::new(1));
                    splitter.push(&buf[..n], |line| self.service_line(now, ch.service, line));
                    self.splitters[ch.service] = splitter;
                }
            }
        }
    }

    /// Reads every channel (before reaping, so output written before an
    /// exit is shown before the exit).
    pub fn drain(&mut self, now: Duration, sup: &mut Supervisor) {
        let chans: Vec<Channel> = self.channels().into_iter().map(|(c, _)| c).collect();
        for ch in chans {
            self.read(ch, now, sup);
        }
    }

    /// Shows a partial last line of `service` (it exited mid-line).
    pub fn flush_partial(&mut self, now: Duration, service: ServiceId) {
        if service >= self.splitters.len() {
            return;
        }
        let mut splitter = std::mem::replace(&mut self.splitters[service], LineSplitter::new(1));
        splitter.flush(|line| self.service_line(now, service, line));
        self.splitters[service] = splitter;
    }

    /// Closes every log file.
    pub fn close_logs(&mut self) {
        for log in self.logs.iter_mut().flatten() {
            log.close();
        }
    }
}

impl<W: Write> Control for Launcher<W> {
    fn spawn(&mut self, req: &SpawnRequest<'_>) -> io::Result<u32> {
        let pair = self
            .pipes
            .get_mut(req.service)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown service"))?;
        let pipe = &mut pair[slot(req.purpose)];
        if pipe.is_none() {
            *pipe = Some(OutputPipe::new()?);
        }
        let pipe = pipe.as_ref().ok_or_else(|| io::Error::other("pipe vanished"))?;
        process::spawn(req.argv, req.env, pipe)
    }

    fn signal(&mut self, pid: u32, sig: StopSignal) -> io::Result<()> {
        process::signal_group(pid, sig)
    }

    fn note(&mut self, now: Duration, service: Option<ServiceId>, msg: &str) {
        self.say(msg);
        if let Some(id) = service {
            let mut line = Vec::with_capacity(msg.len() + 13);
            line.extend_from_slice(b"basalt-init: ");
            line.extend_from_slice(msg.as_bytes());
            self.log_line(now, id, &line);
        }
    }
}

/// A scripted [`Control`] for tests: hands out pids, records what was
/// asked of it.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    #[derive(Debug, Default)]
    pub(crate) struct FakeControl {
        pub next_pid: u32,
        pub spawned: Vec<(u32, ServiceId, Purpose, Duration)>,
        pub signals: Vec<(u32, StopSignal)>,
        pub notes: Vec<String>,
        pub fail_spawn: bool,
        pub now: Duration,
    }

    impl Control for FakeControl {
        fn spawn(&mut self, req: &SpawnRequest<'_>) -> io::Result<u32> {
            if self.fail_spawn {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            self.next_pid += 1;
            let pid = 100 + self.next_pid;
            self.spawned.push((pid, req.service, req.purpose, self.now));
            Ok(pid)
        }
        fn signal(&mut self, pid: u32, sig: StopSignal) -> io::Result<()> {
            self.signals.push((pid, sig));
            Ok(())
        }
        fn note(&mut self, _now: Duration, _service: Option<ServiceId>, msg: &str) {
            self.notes.push(msg.to_string());
        }
    }

    impl FakeControl {
        /// The pid of the last process started for `service`/`purpose`.
        pub fn last(&self, service: ServiceId, purpose: Purpose) -> u32 {
            self.spawned
                .iter()
                .rev()
                .find(|(_, s, p, _)| *s == service && *p == purpose)
                .map(|(pid, ..)| *pid)
                .expect("nothing spawned")
        }
    }

    pub(crate) fn service(name: &str) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            command: vec![format!("/usr/bin/{name}")],
            env: BTreeMap::new(),
            restart: RestartPolicy::OnFailure,
            restart_delay_ms: 100,
            restart_delay_max_ms: 1000,
            after: vec![],
            health: None,
            required: false,
        }
    }

    pub(crate) fn opts() -> Options {
        Options {
            health_http_program: "/sbin/init".into(),
            stable_after: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
        }
    }

    pub(crate) fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use basalt_bundle::config::HealthCheck;

    fn with_check(mut s: ServiceConfig, interval: u64, timeout: u64) -> ServiceConfig {
        s.health = Some(HealthCheck {
            probe: HealthProbe::Command(vec!["/bin/true".into()]),
            interval_ms: interval,
            timeout_ms: timeout,
        });
        s
    }

    fn after(mut s: ServiceConfig, deps: &[&str]) -> ServiceConfig {
        s.after = deps.iter().map(|d| d.to_string()).collect();
        s
    }

    fn tick(sup: &mut Supervisor, ctl: &mut FakeControl, t: u64) {
        ctl.now = ms(t);
        sup.on_tick(ms(t), ctl);
    }

    fn exit_of(
        sup: &mut Supervisor,
        ctl: &mut FakeControl,
        id: ServiceId,
        purpose: Purpose,
        code: i32,
        t: u64,
    ) {
        let pid = ctl.last(id, purpose);
        exit(sup, ctl, pid, code, t);
    }

    fn exit(sup: &mut Supervisor, ctl: &mut FakeControl, pid: u32, code: i32, t: u64) {
        ctl.now = ms(t);
        assert!(sup.on_exit(pid, ExitStatus::Code(code), ms(t), ctl).is_some());
    }

    #[test]
    fn start_order_follows_after_and_keeps_recipe_order_elsewhere() {
        let cfgs = [
            after(service("web"), &["db", "cache"]),
            service("db"),
            after(service("cache"), &["db"]),
            service("ntp"),
        ];
        let sup = Supervisor::new(&cfgs, opts());
        assert_eq!(sup.start_order().collect::<Vec<_>>(), ["db", "cache", "web", "ntp"]);
        assert_eq!(sup.refused().count(), 0);
    }

    #[test]
    fn cycles_unknown_names_and_their_dependents_are_refused_the_rest_runs() {
        let cfgs = [
            after(service("a"), &["b"]),
            after(service("b"), &["a"]),
            after(service("c"), &["a"]),
            after(service("d"), &["nope"]),
            service("ok"),
            after(service("self"), &["self"]),
            service("ok"),
            ServiceConfig { command: vec!["relative".into()], ..service("rel") },
            service("../evil"),
        ];
        let mut sup = Supervisor::new(&cfgs, opts());
        let refused: BTreeMap<&str, &str> = sup.refused().collect();
        assert_eq!(refused["a"], "its after forms a cycle: a -> b -> a");
        assert_eq!(refused["b"], "its after forms a cycle: b -> a -> b");
        assert_eq!(refused["c"], "it is after \"a\", which is refused");
        assert_eq!(refused["d"], "after names \"nope\", which is not a service");
        assert_eq!(refused["self"], "it is after itself (\"self\")");
        assert!(refused["rel"].contains("not an absolute path"));
        assert!(refused["../evil"].contains("is not 1-64 characters"));
        assert_eq!(sup.refused().filter(|(n, _)| *n == "ok").count(), 1, "second ok refused");
        assert_eq!(sup.start_order().collect::<Vec<_>>(), ["ok"]);
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        assert_eq!(ctl.spawned.len(), 1);
        assert_eq!(ctl.spawned[0].1, 4);
        assert!(sup.all_started(), "refused services do not hold up 'all started'");
        assert!(sup.describe(0, ms(0)).starts_with("refused: its after forms a cycle"));
    }

    #[test]
    fn restart_backoff_doubles_to_the_cap_and_resets_after_a_stable_run() {
        let cfgs = [service("crash")];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        let mut t = 0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let pid = ctl.last(0, Purpose::Service);
            t += 50;
            exit(&mut sup, &mut ctl, pid, 1, t);
            let next = sup.next_deadline().unwrap();
            delays.push((next - ms(t)).as_millis());
            // Nothing happens before the deadline...
            tick(&mut sup, &mut ctl, t + 1);
            assert_eq!(ctl.last(0, Purpose::Service), pid);
            // ...and the restart happens at it.
            t = next.as_millis() as u64;
            tick(&mut sup, &mut ctl, t);
            assert_ne!(ctl.last(0, Purpose::Service), pid);
        }
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(sup.restarts(0), 6);
        // A run of 10 s counts as stable: back to the first delay.
        let pid = ctl.last(0, Purpose::Service);
        t += 10_000;
        exit(&mut sup, &mut ctl, pid, 1, t);
        assert_eq!(sup.next_deadline(), Some(ms(t + 100)));
        assert!(ctl
            .notes
            .iter()
            .any(|n| n == "crash exited with status 1 after 0.05 s; restart 2 in 0.20 s"));
    }

    #[test]
    fn restart_policies() {
        let cfgs = [
            ServiceConfig { restart: RestartPolicy::Always, ..service("always") },
            ServiceConfig { restart: RestartPolicy::OnFailure, ..service("onfail") },
            ServiceConfig { restart: RestartPolicy::Never, ..service("never") },
        ];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        for id in 0..3 {
            exit_of(&mut sup, &mut ctl, id, Purpose::Service, 0, 10);
        }
        tick(&mut sup, &mut ctl, 1000);
        let starts = |id| ctl.spawned.iter().filter(|s| s.1 == id).count();
        assert_eq!([starts(0), starts(1), starts(2)], [2, 1, 1]);
        // A signal death is a failure: on-failure restarts it.
        ctl.now = ms(1000);
        let pid = ctl.last(0, Purpose::Service);
        sup.on_exit(pid, ExitStatus::Signal(9), ms(1000), &mut ctl);
        assert!(ctl.notes.iter().any(|n| n.contains("exited with signal 9 (status 137)")));
        assert!(sup.describe(2, ms(1000)).contains("exited with status 0, not restarted"));
    }

    #[test]
    fn failed_spawn_counts_as_failure_and_is_retried() {
        let cfgs = [service("missing")];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl { fail_spawn: true, ..Default::default() };
        sup.start(ms(0), &mut ctl);
        assert!(ctl.notes[0].starts_with("cannot start missing:"));
        assert_eq!(sup.next_deadline(), Some(ms(100)));
        ctl.fail_spawn = false;
        tick(&mut sup, &mut ctl, 100);
        assert!(sup.pid(0).is_some());
    }

    #[test]
    fn after_waits_for_health_then_starts() {
        let cfgs = [with_check(service("db"), 500, 200), after(service("web"), &["db"])];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        assert_eq!(ctl.spawned.len(), 1, "web waits for db to be healthy");
        assert!(sup.describe(1, ms(0)).contains("waiting for db"));
        assert!(!sup.all_started());
        // First check at the interval; it fails: still waiting.
        tick(&mut sup, &mut ctl, 500);
        let check = ctl.last(0, Purpose::HealthCheck);
        exit(&mut sup, &mut ctl, check, 1, 520);
        assert_eq!(ctl.spawned.iter().filter(|s| s.1 == 1).count(), 0);
        // Next check 500 ms after the last one ended; it passes.
        assert_eq!(sup.next_deadline(), Some(ms(1020)));
        tick(&mut sup, &mut ctl, 1020);
        exit_of(&mut sup, &mut ctl, 0, Purpose::HealthCheck, 0, 1030);
        assert_eq!(sup.healthy_since(0), Some(ms(1030)));
        assert_eq!(ctl.spawned.last().unwrap().1, 1, "web started once db is healthy");
        assert!(sup.all_started());
        assert_eq!(sup.healthy_since(1), Some(ms(1030)), "no check: healthy while running");
    }

    #[test]
    fn slow_check_is_killed_at_its_timeout_and_counts_as_failure() {
        let cfgs = [with_check(service("svc"), 100, 50)];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        tick(&mut sup, &mut ctl, 100);
        exit_of(&mut sup, &mut ctl, 0, Purpose::HealthCheck, 0, 110);
        assert_eq!(sup.healthy_since(0), Some(ms(110)));
        tick(&mut sup, &mut ctl, 210);
        let check = ctl.last(0, Purpose::HealthCheck);
        assert_eq!(sup.next_deadline(), Some(ms(260)));
        tick(&mut sup, &mut ctl, 260);
        assert_eq!(ctl.signals, [(check, StopSignal::Kill)]);
        // Even a zero status after the kill is a failure.
        ctl.now = ms(261);
        sup.on_exit(check, ExitStatus::Signal(9), ms(261), &mut ctl);
        assert_eq!(sup.healthy_since(0), None);
        assert!(ctl
            .notes
            .iter()
            .any(|n| n == "svc is unhealthy: health check timed out after 0.05 s"));
    }

    #[test]
    fn check_output_explains_a_failure() {
        let cfgs = [with_check(service("svc"), 100, 50)];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        tick(&mut sup, &mut ctl, 100);
        sup.check_output(0, b"health-http: connection ");
        sup.check_output(0, b"refused");
        exit_of(&mut sup, &mut ctl, 0, Purpose::HealthCheck, 1, 110);
        assert!(sup.describe(0, ms(120)).ends_with(
            "unhealthy: health check failed with status 1: health-http: connection refused"
        ));
    }

    #[test]
    fn http_probe_runs_the_applet() {
        let mut s = service("web");
        s.health = Some(HealthCheck {
            probe: HealthProbe::Http("http://127.0.0.1:8080/healthz".into()),
            interval_ms: 100,
            timeout_ms: 300,
        });
        let sup = Supervisor::new(&[s], opts());
        let h = sup.services[0].health.as_ref().unwrap();
        assert_eq!(h.argv, ["/sbin/init", "health-http", "http://127.0.0.1:8080/healthz", "300"]);
    }

    #[test]
    fn flapping_service_restarts_its_healthy_time() {
        let cfgs = [ServiceConfig { required: true, ..with_check(service("svc"), 100, 50) }];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        tick(&mut sup, &mut ctl, 100);
        exit_of(&mut sup, &mut ctl, 0, Purpose::HealthCheck, 0, 105);
        assert_eq!(sup.required().collect::<Vec<_>>(), [(0, Some(ms(105)))]);
        // A check is running when the service dies: its result is ignored.
        tick(&mut sup, &mut ctl, 205);
        let stale = ctl.last(0, Purpose::HealthCheck);
        exit_of(&mut sup, &mut ctl, 0, Purpose::Service, 1, 210);
        assert_eq!(sup.required().collect::<Vec<_>>(), [(0, None)]);
        exit(&mut sup, &mut ctl, stale, 0, 211);
        assert_eq!(sup.healthy_since(0), None);
        tick(&mut sup, &mut ctl, 310);
        tick(&mut sup, &mut ctl, 410);
        exit_of(&mut sup, &mut ctl, 0, Purpose::HealthCheck, 0, 415);
        assert_eq!(sup.healthy_since(0), Some(ms(415)));
    }

    #[test]
    fn stop_goes_in_reverse_order_and_kills_after_the_timeout() {
        let cfgs = [service("db"), after(service("web"), &["db"]), service("ntp")];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        let [db, web, ntp] = [0, 1, 2].map(|i| ctl.last(i, Purpose::Service));
        ctl.now = ms(1000);
        sup.begin_stop(ms(1000), &mut ctl);
        // ntp and web have no running dependents; db waits for web.
        assert_eq!(ctl.signals, [(ntp, StopSignal::Term), (web, StopSignal::Term)]);
        exit(&mut sup, &mut ctl, web, 143, 1100);
        assert_eq!(ctl.signals.last(), Some(&(db, StopSignal::Term)));
        exit(&mut sup, &mut ctl, db, 0, 1200);
        // ntp ignores SIGTERM: SIGKILL 5 s after its SIGTERM.
        assert_eq!(sup.next_deadline(), Some(ms(6000)));
        tick(&mut sup, &mut ctl, 6000);
        assert_eq!(ctl.signals.last(), Some(&(ntp, StopSignal::Kill)));
        assert!(!sup.is_stopped());
        ctl.now = ms(6001);
        sup.on_exit(ntp, ExitStatus::Signal(9), ms(6001), &mut ctl);
        assert!(sup.is_stopped());
        assert_eq!(ctl.spawned.len(), 3, "nothing restarted during shutdown");
    }

    #[test]
    fn unknown_pids_are_orphans() {
        let mut sup = Supervisor::new(&[service("a")], opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        assert_eq!(sup.on_exit(4242, ExitStatus::Code(0), ms(1), &mut ctl), None);
    }

    #[test]
    fn never_ready_dependency_is_reported() {
        let cfgs = [
            ServiceConfig { restart: RestartPolicy::Never, ..with_check(service("db"), 100, 50) },
            after(service("web"), &["db"]),
        ];
        let mut sup = Supervisor::new(&cfgs, opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        exit_of(&mut sup, &mut ctl, 0, Purpose::Service, 1, 10);
        assert!(ctl.notes.iter().any(|n| n.starts_with("web will not start: it is after db")));
    }

    fn split_all(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(String::from_utf8_lossy(l).into_owned()));
        }
        s.flush(|l| out.push(String::from_utf8_lossy(l).into_owned()));
        out
    }

    #[test]
    fn line_splitter_joins_chunks_and_bounds_lines() {
        assert_eq!(split_all(8, &[b"ab", b"c\nde\r\n", b"f"]), ["abc", "de", "f"]);
        assert_eq!(split_all(4, &[b"abcdefghij\nx\n"]), ["abcd", "efgh", "ij", "x"]);
        assert_eq!(split_all(4, &[b"ab", b"cd\n"]), ["abcd"], "exactly full: no empty line");
        assert_eq!(split_all(4, &[b"abcd\n"]), ["abcd"]);
        assert_eq!(split_all(4, &[b"\n\n"]), ["", ""]);
    }

    #[test]
    fn log_rotates_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::new(&dir.path().join("log"), "svc", 64);
        for i in 0..10 {
            log.write_line(ms(1500), format!("line {i}").as_bytes()).unwrap();
        }
        let cur = std::fs::read_to_string(dir.path().join("log/svc.log")).unwrap();
        let old = std::fs::read_to_string(dir.path().join("log/svc.log.1")).unwrap();
        assert!(cur.len() <= 64 && old.len() <= 64);
        assert!(cur.ends_with("[     1.500] line 9\n"), "{cur}");
        assert!(old.contains("line 7"), "{old}");
    }

    #[test]
    fn secs_format() {
        assert_eq!(Secs(ms(2314)).to_string(), "2.31 s");
    }
}
