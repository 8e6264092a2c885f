//! The supervisor with real child processes, driven the way stage 2 drives
//! it (poll the output pipes, reap with `waitpid(-1, WNOHANG)`, tick), in a
//! temp dir and without root.
//!
//! The tests share one process-wide reaper, so they take a lock and run one
//! at a time; the process is made a child subreaper so that orphans come
//! back to it as they would to PID 1.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use basalt_bundle::config::{HealthCheck, HealthProbe, RestartPolicy, ServiceConfig};
use basalt_init::platform::process::{self, Reaped};
use basalt_init::platform::signal;
use basalt_init::supervisor::{Launcher, LogSettings, Options, Purpose, Supervisor};

static LOCK: Mutex<()> = Mutex::new(());

const INIT: &str = env!("CARGO_BIN_EXE_basalt-init");
const DEMO: &str = env!("CARGO_BIN_EXE_basalt-demo");

fn service(name: &str, command: &[&str]) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        restart: RestartPolicy::OnFailure,
        restart_delay_ms: 50,
        restart_delay_max_ms: 400,
        after: vec![],
        health: None,
        required: false,
    }
}

fn sh(name: &str, script: &str) -> ServiceConfig {
    service(name, &["/bin/sh", "-c", script])
}

struct Harness {
    sup: Supervisor,
    launcher: Launcher<Vec<u8>>,
    logs: tempfile::TempDir,
    pids: Vec<u32>,
    orphans: u32,
}

impl Harness {
    fn new(cfgs: &[ServiceConfig], stop_timeout: Duration) -> Harness {
        process::set_child_subreaper().unwrap();
        let logs = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(
            cfgs,
            Options {
                health_http_program: INIT.into(),
                stable_after: Duration::from_secs(10),
                stop_timeout,
            },
        );
        let launcher = Launcher::new(
            &sup,
            Vec::new(),
            Some(LogSettings { dir: logs.path().join("log"), limit: 256 * 1024 }),
        );
        let mut h = Harness { sup, launcher, logs, pids: Vec::new(), orphans: 0 };
        h.sup.start(signal::now(), &mut h.launcher);
        h.record_pids();
        h
    }

    fn record_pids(&mut self) {
        for pid in self.sup.pids() {
            if !self.pids.contains(&pid) {
                self.pids.push(pid);
            }
        }
    }

    /// One round of stage 2's loop, without the signalfd: wake at the next
    /// timer or after 10 ms.
    fn step(&mut self) {
        let now = signal::now();
        let wait = self
            .sup
            .next_deadline()
            .map_or(Duration::from_millis(10), |t| t.saturating_sub(now))
            .min(Duration::from_millis(10));
        let mut ready = Vec::new();
        let ready_chans: Vec<_> = {
            let chans = self.launcher.channels();
            let fds: Vec<_> = chans.iter().map(|(_, fd)| *fd).collect();
            signal::poll_readable(&fds, Some(wait), &mut ready).unwrap();
            chans.iter().zip(&ready).filter(|(_, r)| **r).map(|((c, _), _)| *c).collect()
        };
        let now = signal::now();
        for ch in ready_chans {
            self.launcher.read(ch, now, &mut self.sup);
        }
        self.launcher.drain(now, &mut self.sup);
        while let Reaped::Child { pid, status } = process::reap_any() {
            match self.sup.owner(pid) {
                Some((id, Purpose::Service)) => {
                    self.launcher.flush_partial(now, id);
                    self.sup.on_exit(pid, status, now, &mut self.launcher);
                }
                Some(_) => {
                    self.sup.on_exit(pid, status, now, &mut self.launcher);
                }
                None => self.orphans += 1,
            }
        }
        self.sup.on_tick(signal::now(), &mut self.launcher);
        self.record_pids();
    }

    fn run_until(&mut self, limit: Duration, cond: impl Fn(&Harness) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(start.elapsed() < limit, "timed out; console:\n{}", self.console());
            self.step();
        }
    }

    fn stop(&mut self) {
        self.sup.begin_stop(signal::now(), &mut self.launcher);
        self.run_until(Duration::from_secs(10), |h| h.sup.is_stopped());
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(self.launcher.console()).into_owned()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join("log").join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// Every process we started is gone, not a zombie: `waitpid` no longer
    /// knows it.
    fn assert_all_reaped(&self) {
        for &pid in &self.pids {
            assert_eq!(process::reap(pid), Reaped::NoChildren, "pid {pid} not reaped");
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists() || is_not_ours(pid),
                "{pid} is left"
            );
        }
    }
}

/// The pid was reused by an unrelated process (its parent is not us).
fn is_not_ours(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1));
    ppid != Some(&std::process::id().to_string())
}

/// Uptime stamps (seconds) of log lines that contain `needle`.
fn stamps(log: &str, needle: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.trim().parse().ok())
        .collect()
}

#[test]
fn crashing_service_restarts_with_growing_delays_and_nothing_is_left_behind() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = Harness::new(&[sh("crash", "echo crash run; exit 3")], Duration::from_secs(2));
    h.run_until(Duration::from_secs(10), |h| h.sup.restarts(0) >= 6);
    h.stop();
    let console = h.console();
    assert!(console.contains("[crash] crash run\n"), "{console}");
    assert!(console.contains("crash exited with status 3 after "), "{console}");
    for (n, delay) in [(1, "0.05"), (2, "0.10"), (3, "0.20"), (4, "0.40"), (5, "0.40")] {
        let want = format!("; restart {n} in {delay} s\n");
        assert!(console.contains(&want), "missing {want:?} in\n{console}");
    }
    // The log file's time stamps show the waits really grew.
    let log = h.log("crash");
    let starts = stamps(&log, "basalt-init: restarted crash");
    let exits = stamps(&log, "basalt-init: crash exited");
    assert!(starts.len() >= 5, "{log}");
    for (i, want) in [0.05, 0.10, 0.20, 0.40, 0.40].iter().enumerate() {
        let waited = starts[i] - exits[i];
        assert!(waited >= want - 0.002, "restart {} after {waited} s, want {want}\n{log}", i + 1);
    }
    assert!(log.contains("] crash run\n"), "{log}");
    h.assert_all_reaped();
}

#[test]
fn after_waits_for_a_command_health_check() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ready");
    let mut db = sh("db", &format!("sleep 0.3; touch {}; exec sleep 30", flag.display()));
    db.health = Some(HealthCheck {
        probe: HealthProbe::Command(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("test -e {}", flag.display()),
        ]),
        interval_ms: 50,
        timeout_ms: 1000,
    });
    let mut web = service("web", &["/bin/sleep", "30"]);
    web.after = vec!["db".into()];
    let mut h = Harness::new(&[web, db], Duration::from_secs(2));
    assert_eq!(h.sup.start_order().collect::<Vec<_>>(), ["db", "web"]);
    assert!(h.sup.pid(0).is_none(), "web waits for db");
    h.run_until(Duration::from_secs(10), |h| h.sup.pid(0).is_some());
    let healthy_at = h.sup.healthy_since(1).expect("db healthy before web starts");
    assert!(flag.exists());
    h.stop();
    let console = h.console();
    let at = |s: &str| console.find(s).unwrap_or_else(|| panic!("no {s:?} in\n{console}"));
    assert!(at("db is healthy") < at("started web"));
    assert!(at("stopping web") < at("stopping db"), "reverse order:\n{console}");
    assert!(healthy_at > std::time::Duration::ZERO);
    h.assert_all_reaped();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_check(port: u16) -> Option<HealthCheck> {
    Some(HealthCheck {
        probe: HealthProbe::Http(format!("http://127.0.0.1:{port}/healthz")),
        interval_ms: 100,
        timeout_ms: 1000,
    })
}

#[test]
fn http_health_checks_run_the_applet_as_a_child() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (good, bad) = (free_port(), free_port());
    let mut hello =
        service("hello", &[DEMO, "hello", "--port", &good.to_string(), "--every-ms", "100"]);
    hello.health = http_check(good);
    let mut sick = service("sick", &[DEMO, "unhealthy", "--port", &bad.to_string()]);
    sick.health = http_check(bad);
    let mut h = Harness::new(&[hello, sick], Duration::from_secs(2));
    h.run_until(Duration::from_secs(10), |h| {
        h.sup.healthy_since(0).is_some() && h.console().contains("sick is not healthy yet")
    });
    h.stop();
    let console = h.console();
    assert!(console.contains("[hello] hello from basalt\n"), "{console}");
    assert!(console.contains("hello is healthy"), "{console}");
    assert!(
        console.contains(&format!(
            "sick is not healthy yet: health check failed with status 1: health-http: \
             http://127.0.0.1:{bad}/healthz: HTTP/1.0 503 Service Unavailable"
        )),
        "{console}"
    );
    h.assert_all_reaped();
}

#[test]
fn output_is_prefixed_bounded_and_logged() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let script =
        "echo one; echo two >&2; head -c 3000 /dev/zero | tr '\\0' x; echo; printf partial; exit 0";
    let mut h = Harness::new(&[sh("talk", script)], Duration::from_secs(2));
    h.run_until(Duration::from_secs(10), |h| h.console().contains("not restarted"));
    let console = h.console();
    assert!(console.contains("[talk] one\n[talk] two\n"), "{console}");
    let xs: Vec<usize> = console
        .lines()
        .filter(|l| l.starts_with("[talk] x"))
        .map(|l| l.len() - "[talk] ".len())
        .collect();
    assert_eq!(xs, [1024, 1024, 952], "long lines are split at 1024 bytes");
    assert!(
        console.contains("[talk] partial\nbasalt-init: talk exited with status 0"),
        "{console}"
    );
    let log = h.log("talk");
    assert!(log.contains("] one\n") && log.contains("] partial\n"), "{log}");
    h.stop();
    h.assert_all_reaped();
}

#[test]
fn stop_kills_what_ignores_sigterm_and_orphans_are_reaped() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let stubborn = sh("stubborn", "trap '' TERM; while :; do sleep 0.05; done");
    let mut parent = sh("parent", "sleep 0.2 & exit 0");
    parent.restart = RestartPolicy::Never;
    let mut h = Harness::new(&[stubborn, parent], Duration::from_millis(300));
    // The backgrounded sleep outlives its shell and comes back to us.
    h.run_until(Duration::from_secs(5), |h| h.orphans >= 1);
    let started = Instant::now();
    h.stop();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let console = h.console();
    assert!(console.contains("stubborn did not stop within 0.30 s; killing it"), "{console}");
    assert!(console.contains("stubborn exited with signal 9 (status 137)"), "{console}");
    h.assert_all_reaped();
}
