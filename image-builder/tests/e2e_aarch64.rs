//! System test of the aarch64 board (040): the gateway built for
//! `qemu-aarch64` boots under `qemu-system-aarch64` (TCG, `virt`,
//! Cortex-A72, AAVMF, systemd-boot), blesses its slot, answers an
//! inference from tritonclient through the forwarded port, refuses a bundle
//! built for another board, and takes one OTA update that boots and is
//! blessed. Host ports 17900 (the update agent's API) and 17980 (the
//! runtime), which no other file uses (ci/e2e/README.md). Needs the device
//! binaries for aarch64-unknown-linux-musl, the arm64 kernel and
//! systemd-boot, the models and the Python of `.cache/venv` (ci/setup.sh).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basalt::build::Report;
use basalt::plan::{self, PlanOptions};
use basalt::qemu::Machine;
use common::{boot, expect, root, SDE};
use serde_json::Value;

const API: u16 = 17900;
const RUNTIME: u16 = 17980;
const RECIPE: &str = "ci/e2e/040-aarch64/recipe.toml";

fn keys() -> PathBuf {
    root().join("ci/e2e/keys")
}

/// One HTTP/1.1 request to the agent's forwarded API; status and body.
fn http(method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let token = std::fs::read_to_string(keys().join("agent.token"))?;
    let mut s = TcpStream::connect(("127.0.0.1", API))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: device\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        token.trim(),
        body.len()
    );
    s.write_all(head.as_bytes())?;
    // A refused bundle may be answered before the whole body is sent.
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

/// `GET /v1/status`, retried until the agent answers.
fn status(m: &Machine) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match http("GET", "/v1/status", b"") {
            Ok((200, body)) => return serde_json::from_str(&body).unwrap(),
            r if Instant::now() > deadline => {
                panic!("no status from the agent: {r:?}; console:\n{}", m.console())
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Pushes a bundle to `POST /v1/update`; the status and the answer.
fn push(m: &Machine, bundle: &[u8]) -> (u16, Value) {
    status(m);
    let (code, body) = http("POST", "/v1/update", bundle)
        .unwrap_or_else(|e| panic!("push failed: {e}; console:\n{}", m.console()));
    (code, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

struct Built {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    report: Report,
}

/// Builds the scenario's recipe at `version` for `board` (the recipe's
/// own when `None`), signed with the test key.
fn build(version: &str, board: Option<&str>) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let opts = PlanOptions {
        board: board.map(str::to_string),
        source_date_epoch: SDE,
        cache_dir: plan::default_cache_dir(),
        version: Some(version.parse().unwrap()),
        signing_key: Some(keys().join("test.key")),
        ..Default::default()
    };
    let t = Instant::now();
    let plan = plan::resolve(&root().join(RECIPE), &opts).unwrap_or_else(|e| panic!("{e}"));
    let report =
        basalt::build::build(&plan, None, &out, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("built {version} for {}: {:.1} s", report.board, t.elapsed().as_secs_f64());
    Built { disk: out.join("disk.img"), report, _dir: dir }
}

fn bundle_of(b: &Built) -> Vec<u8> {
    std::fs::read(b.disk.with_file_name("update.basalt")).unwrap()
}

/// Boots the disk and waits for the blessing; prints the time from QEMU's
/// start (the firmware) to the blessing.
fn boot_blessed(disk: &Path, report: &Report, tag: &str, slot: &str) -> Machine {
    let t = Instant::now();
    let mut m = boot(disk, report, tag);
    expect(&mut m, "[runtime] model mlp 1.0.0: loaded, test vector passed", 600);
    expect(&mut m, &format!("boot blessed: slot {slot}"), 300);
    eprintln!("{tag}: firmware to blessed: {:.1} s", t.elapsed().as_secs_f64());
    m
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_040_the_gateway_on_aarch64_serves_refuses_another_board_and_updates() {
    let v1 = build("1.0.0", None);
    assert_eq!((v1.report.board.as_str(), v1.report.arch.as_str()), ("qemu-aarch64", "aarch64"));
    let machine = v1.report.machine.as_ref().expect("qemu-aarch64 has a QEMU machine");
    assert_eq!(machine.binary, "qemu-system-aarch64");
    let v2 = bundle_of(&build("1.1.0", None));
    // The same recipe for the x86-64 board: only the board differs.
    let x86_board = root().join("boards/qemu-x86_64.toml");
    let x86 = build("1.2.0", Some(x86_board.to_str().unwrap()));
    assert_eq!(x86.report.arch, "x86_64");
    let x86 = bundle_of(&x86);

    let mut m = boot_blessed(&v1.disk, &v1.report, "040-aarch64-boot1", "a");
    let python = root().join(".cache/venv/bin/python");
    assert!(python.is_file(), "no {}; run ci/setup.sh", python.display());
    let out = std::process::Command::new(&python)
        .arg(root().join("ci/models/interop.py"))
        .arg(format!("http://127.0.0.1:{RUNTIME}"))
        .arg("mlp")
        .arg(root().join(".cache/models/mlp.ref.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tritonclient against the aarch64 gateway: {}{}\nconsole:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.console()
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));

    // A bundle for another board is refused (409: it is a valid bundle,
    // for another device) before anything is written.
    let (code, answer) = push(&m, &x86);
    assert_eq!(code, 409, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("qemu-x86_64") && error.contains("qemu-aarch64"), "{answer}");

    let (code, answer) = push(&m, &v2);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["installed"]["slot"], "b", "{answer}");
    expect(&mut m, "shutdown complete, rebooting", 300);
    assert!(m.wait_exit(Duration::from_secs(60)).is_some(), "QEMU did not end:\n{}", m.console());

    let mut m = boot_blessed(&v1.disk, &v1.report, "040-aarch64-boot2", "b");
    expect(&mut m, "[update-agent] updated 1.0.0 -> 1.1.0", 120);
    let s = status(&m);
    assert_eq!(s["version"], "1.1.0", "{s}");
    assert_eq!(s["booted_slot"], "b", "{s}");
    assert_eq!(s["blessed"], true, "{s}");
    assert!(!m.console().contains("FATAL"), "{}", m.console());
}
