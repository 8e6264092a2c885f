//! What the update scenarios (e2e_update.rs) and the model-update
//! benchmark (bench_model_update.rs) share: the forwarded device APIs,
//! image builds with the test keys, nginx serving a repository, the model
//! versions of 030/031 and the split of a model update's time.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basalt::build::Report;
use basalt::qemu::Machine;
use serde_json::Value;

use crate::common::{build_version, expect, root};

pub const API: u16 = 17400;
/// The model runtime (basalt-runtime), in scenarios 030 and 031.
pub const RUNTIME: u16 = 17800;

pub fn keys() -> PathBuf {
    root().join("ci/e2e/keys")
}

pub fn token() -> String {
    std::fs::read_to_string(keys().join("agent.token")).unwrap().trim().to_string()
}

/// One HTTP/1.1 request to the forwarded API; returns status and body.
pub fn http(method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    http_at(API, method, path, body)
}

/// One HTTP/1.1 request to a forwarded port; returns status and body.
pub fn http_at(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: device\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        token(),
        body.len()
    );
    s.write_all(head.as_bytes())?;
    // A refused bundle may be answered before the whole body is sent; the
    // answer is still there to read.
    let _ = s.write_all(body);
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// `GET /v1/status`, retried until the agent answers (it starts after the
/// network).
pub fn status(m: &Machine) -> Value {
    status_at(API, m, 60)
}

/// `GET /v1/status` of the agent forwarded on `port`, retried for `secs`.
pub fn status_at(port: u16, m: &Machine, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match http_at(port, "GET", "/v1/status", b"") {
            Ok((200, body)) => return serde_json::from_str(&body).unwrap(),
            r if Instant::now() > deadline => {
                panic!("no status from the agent: {r:?}; console:\n{}", m.console())
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Pushes a bundle; returns the status and the answer.
pub fn push(m: &Machine, bundle: &[u8], query: &str) -> (u16, Value) {
    push_at(API, m, bundle, query)
}

/// Pushes a bundle to the agent forwarded on `port`; returns the status and
/// the answer.
pub fn push_at(port: u16, m: &Machine, bundle: &[u8], query: &str) -> (u16, Value) {
    status_at(port, m, 120);
    let (code, body) = http_at(port, "POST", &format!("/v1/update{query}"), bundle)
        .unwrap_or_else(|e| panic!("push failed: {e}; console:\n{}", m.console()));
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (code, v)
}

pub struct Built {
    pub _dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub report: Report,
}

pub fn build(recipe: &str, version: &str) -> Built {
    build_on(recipe, version, None)
}

/// Builds `recipe` (relative to the project) at `version` for `board` (a
/// board file; the recipe's own when `None`), signed with the test key.
pub fn build_on(recipe: &str, version: &str, board: Option<&Path>) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let t = Instant::now();
    let key = keys().join("test.key");
    let report = build_version(&root().join(recipe), version, board, Some(&key), &out);
    eprintln!("built {version} for {}: {:.1} s", report.board, t.elapsed().as_secs_f64());
    Built { disk: out.join("disk.img"), report, _dir: dir }
}

pub fn bundle_of(b: &Built) -> Vec<u8> {
    std::fs::read(b.disk.with_file_name("update.basalt")).unwrap()
}

/// Waits for QEMU to end after the agent's reboot.
pub fn rebooted(m: &mut Machine) {
    expect(m, "shutdown complete, rebooting", 120);
    assert!(m.wait_exit(Duration::from_secs(60)).is_some(), "QEMU did not end:\n{}", m.console());
}

pub fn entries(disk: &Path) -> Vec<(String, String)> {
    let info = basalt::inspect::inspect(disk).unwrap();
    info.entries.into_iter().map(|e| (e.file, e.version)).collect()
}

pub const REPO_PORT: u16 = 17480;

/// nginx serving `root` on 127.0.0.1:`port`, as a fleet's web server
/// would; stopped on drop.
pub struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(root: &Path, port: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               log_format timed '$msec \"$request\" $status $body_bytes_sent $request_time';\n\
               access_log {d}/access.log timed;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               types {{ text/plain toml sig; application/octet-stream basalt; }}\n\
               server {{ listen 127.0.0.1:{port}; root {}; }}\n\
             }}\n",
            root.display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = std::process::Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .spawn()
            .expect("nginx (ci/setup.sh installs nginx-light)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, _dir: dir }
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn publish(
    bundle: &Path,
    repo: &Path,
    rollout: u8,
    expires_in: u64,
) -> basalt_bundle::channel::Channel {
    let key = basalt::ota::read_signing_key(&keys().join("test.key")).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    basalt::ota::publish(&basalt::ota::Publish {
        bundle,
        repo,
        channel: "stable",
        rollout,
        expires_in,
        keys: &[key],
        now,
    })
    .unwrap()
}

pub const MODEL_RECIPE: &str = "ci/e2e/030-model-update/recipe.toml";

/// The versions of model mlp the scenarios publish (2.0.0, 3.0.0, 4.0.0:
/// `ci/e2e/030-model-update/make_versions.py` says what each is), made
/// with onnx and onnxruntime from `.cache/venv`.
pub struct Versions {
    dir: tempfile::TempDir,
}

impl Versions {
    pub fn make() -> Versions {
        let dir = tempfile::tempdir().unwrap();
        let python = root().join(".cache/venv/bin/python");
        assert!(python.is_file(), "no {}; run ci/setup.sh", python.display());
        let out = std::process::Command::new(python)
            .arg(root().join("ci/e2e/030-model-update/make_versions.py"))
            .arg(root().join(".cache/models"))
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Versions { dir }
    }

    /// `<version>.ref.json`: the reference input and that version's output.
    pub fn reference(&self, version: &str) -> PathBuf {
        self.dir.path().join(format!("{version}.ref.json"))
    }

    /// A bundle of `model` (a version made here) as `version`, signed by
    /// test.key, with `watch` appended to its model.toml.
    pub fn bundle(&self, model: &str, version: &str, watch: &str) -> PathBuf {
        let dir = self.dir.path();
        let config = std::fs::read_to_string(dir.join(format!("{model}.model.toml")))
            .unwrap()
            .replacen(&format!("version = \"{model}\""), &format!("version = \"{version}\""), 1);
        let config_path = dir.join(format!("mlp-{version}.model.toml"));
        std::fs::write(&config_path, format!("{config}\n{watch}")).unwrap();
        let content =
            basalt::ota::ModelContent::from_files(&dir.join(format!("{model}.onnx")), &config_path)
                .unwrap_or_else(|e| panic!("{e}"));
        let key = basalt::ota::read_signing_key(&keys().join("test.key")).unwrap();
        let bytes = basalt::ota::model_bundle_bytes(&content, &[key], &[], 1_700_000_000).unwrap();
        let out = dir.join(format!("mlp-{version}.basalt"));
        std::fs::write(&out, bytes).unwrap();
        out
    }
}

/// Puts a model bundle on model channel `stable` (channels/models/mlp/).
pub fn publish_model(bundle: &Path, repo: &Path) -> basalt_bundle::channel::Channel {
    publish(bundle, repo, 100, 3600)
}

/// The agent's view of model `mlp`, once it has one.
pub fn mlp_status(m: &Machine) -> Value {
    let s = status(m);
    s["models"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "mlp").cloned())
        .unwrap_or(Value::Null)
}

/// Waits until the agent says `version` serves (kept by the runtime).
pub fn wait_serving(m: &Machine, version: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let mlp = mlp_status(m);
        if mlp["serving"] == version {
            return mlp;
        }
        if Instant::now() > deadline {
            panic!("{version} is not serving after {secs} s: {mlp}\nconsole:\n{}", m.console());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// tritonclient (ci/models/interop.py) against the forwarded runtime:
/// live, ready, metadata, and the outputs of `reference` from binary and
/// JSON tensors.
pub fn tritonclient(m: &Machine, reference: &Path) {
    tritonclient_at(RUNTIME, m, reference)
}

/// [`tritonclient`] against the runtime forwarded on `port`.
pub fn tritonclient_at(port: u16, m: &Machine, reference: &Path) {
    let python = root().join(".cache/venv/bin/python");
    assert!(python.is_file(), "no {}; run ci/setup.sh", python.display());
    let out = std::process::Command::new(&python)
        .arg(root().join("ci/models/interop.py"))
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("mlp")
        .arg(reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tritonclient against the device, {}: {}{}\nconsole:\n{}",
        reference.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.console()
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
}

/// A JSON inference of mlp on the forwarded runtime with `features`
/// ([N, 32], row-major): status and answer.
pub fn infer(features: &[f32]) -> (u16, Value) {
    let body = serde_json::json!({"inputs": [{
        "name": "features", "datatype": "FP32",
        "shape": [features.len() / 32, 32], "data": features,
    }]});
    let (code, text) =
        http_at(RUNTIME, "POST", "/v2/models/mlp/infer", body.to_string().as_bytes()).unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Infers the reference input of `reference`; checks that `version`
/// answered with that file's outputs (1e-4 relative).
pub fn answers_as(reference: &Path, version: &str) {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let floats = |v: &Value| -> Vec<f64> {
        v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let input: Vec<f32> = floats(&r["inputs"]["features"]).iter().map(|&x| x as f32).collect();
    let (code, answer) = infer(&input);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["model_version"], version, "{answer}");
    let want = floats(&r["outputs"]["quality"]);
    let got = floats(&answer["outputs"][0]);
    assert_eq!(got.len(), want.len(), "{answer}");
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4 * w.abs() + 1e-5, "{got:?} vs {version}'s {want:?}");
    }
}

/// Waits for a whole console line holding `marker` (the console may be
/// read mid-line); returns the line.
pub fn expect_line(m: &mut Machine, marker: &str, secs: u64) -> String {
    expect(m, marker, secs);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let console = m.console();
        let at = console.find(marker).unwrap_or(0);
        if let Some(end) = console[at..].find('\n') {
            return console[at..at + end].trim_end().to_string();
        }
        assert!(Instant::now() < deadline, "`{marker}` line never ended:\n{console}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The console line of the guest's `service` that starts with `start`,
/// from there.
pub fn line_of(console: &str, service: &str, start: &str) -> Option<String> {
    let prefix = format!("[{service}] {start}");
    console.lines().find_map(|l| l.find(&prefix).map(|at| l[at..].trim_end().to_string()))
}

/// The number before ` ms` after `label` in `line`.
pub fn ms_after(line: &str, label: &str) -> Option<f64> {
    let rest = &line[line.find(label)? + label.len()..];
    rest.trim_start().split(" ms").next()?.trim().parse().ok()
}

/// Where the time from `basalt publish` to the device serving a version
/// went. The poll wait comes from the repository server's log (the
/// device's first fetch of the new channel file), on the host's clock
/// like the publish time; the device's own clock cannot time it (under
/// TCG it starts from a one-second RTC). The rest are durations the
/// device measured and printed: the agent's download, its install
/// (signatures and sha256 checked, written, synced) and the round trip of
/// its load request; within that, the runtime's verify, load, test vector
/// and switch.
#[derive(Debug, Clone, Copy)]
pub struct Split {
    pub poll_wait: f64,
    pub download: f64,
    pub install: f64,
    pub verify: f64,
    pub load: f64,
    pub test_vector: f64,
    pub switch: f64,
    pub load_call: f64,
}

impl Split {
    /// Reads the split of `version` (published at `published`, Unix
    /// seconds) from the console and nginx's log.
    pub fn of(console: &str, access_log: &str, version: &str, published: f64) -> Split {
        let model = format!("model mlp {version}: ");
        let line = |service: &str, what: &str| {
            line_of(console, service, &format!("{model}{what}"))
                .unwrap_or_else(|| panic!("no `{model}{what}` line of {service} in:\n{console}"))
        };
        let runtime = line("runtime", "verified in");
        let answer = line("update-agent", "runtime says");
        let channel_fetched = access_log
            .lines()
            .filter(|l| {
                l.contains("GET /channels/models/mlp/stable.toml ") && l.contains("\" 200 ")
            })
            .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .find(|&t| t >= published)
            .unwrap_or_else(|| panic!("no fetch of the channel after {published}:\n{access_log}"));
        let num = |l: &str, label: &str| {
            ms_after(l, label).unwrap_or_else(|| panic!("no `{label} N ms` in {l:?}"))
        };
        Split {
            poll_wait: (channel_fetched - published) * 1e3,
            download: num(&line("update-agent", "downloaded"), "downloaded in"),
            install: num(&line("update-agent", "installed"), ") in"),
            verify: num(&runtime, "verified in"),
            load: num(&runtime, "loaded in"),
            test_vector: num(&runtime, "test vector in"),
            switch: num(&runtime, "switched in"),
            load_call: num(&answer, "after"),
        }
    }

    pub fn total(&self) -> f64 {
        self.poll_wait + self.download + self.install + self.load_call
    }

    pub fn line(&self) -> String {
        format!(
            "poll wait {:.0} ms, download {:.1} ms, install+verify {:.1} ms, load request {:.1} ms \
             (runtime: verify {:.1} ms, load {:.1} ms, test vector {:.1} ms, switch {:.1} ms); \
             total {:.0} ms",
            self.poll_wait,
            self.download,
            self.install,
            self.load_call,
            self.verify,
            self.load,
            self.test_vector,
            self.switch,
            self.total()
        )
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The boot has not restarted: one kernel start, one runtime start, one
/// blessing, QEMU still running.
pub fn same_boot(m: &mut Machine) {
    let console = m.console();
    assert_eq!(console.matches("stage 1: ").count(), 1, "{console}");
    assert_eq!(console.matches("[runtime] serving on http://").count(), 1, "{console}");
    assert_eq!(console.matches("boot blessed").count(), 1, "{console}");
    assert!(m.wait_exit(Duration::from_millis(100)).is_none(), "QEMU ended");
    assert_eq!(status(m)["booted_slot"], "a");
}
