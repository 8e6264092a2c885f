//! System tests of OTA updates: push, pull, rollback, refusals and power
//! cuts, each booting real images in QEMU (TCG, OVMF, systemd-boot). The
//! update agent's API is reached through QEMU's forwarding of
//! 127.0.0.1:17400; the disk file persists across QEMU runs, so a reboot
//! (which ends QEMU here) is followed by a new boot of the same disk.
//! Inputs live in `ci/e2e/01x-*/`, `ci/e2e/030-model-update/` and
//! `ci/e2e/keys/`; 030 also needs the reference models in `.cache/models`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basalt::build::Report;
use basalt::qemu::Machine;
use common::{boot, build_version, expect, root};
use serde_json::Value;

const API: u16 = 17400;
const RECIPE: &str = "ci/e2e/010-update/recipe.toml";

fn keys() -> PathBuf {
    root().join("ci/e2e/keys")
}

fn token() -> String {
    std::fs::read_to_string(keys().join("agent.token")).unwrap().trim().to_string()
}

/// One HTTP/1.1 request to the forwarded API; returns status and body.
fn http(method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", API))?;
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
fn status(m: &Machine) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
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

/// Pushes a bundle; returns the status and the answer.
fn push(m: &Machine, bundle: &[u8], query: &str) -> (u16, Value) {
    status(m);
    let (code, body) = http("POST", &format!("/v1/update{query}"), bundle)
        .unwrap_or_else(|e| panic!("push failed: {e}; console:\n{}", m.console()));
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (code, v)
}

struct Built {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    report: Report,
}

fn build(recipe: &str, version: &str) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = build_version(&root().join(recipe), version, Some(&keys().join("test.key")), &out);
    Built { disk: out.join("disk.img"), report, _dir: dir }
}

fn bundle_of(b: &Built) -> Vec<u8> {
    std::fs::read(b.disk.with_file_name("update.basalt")).unwrap()
}

/// Waits for QEMU to end after the agent's reboot.
fn rebooted(m: &mut Machine) {
    expect(m, "shutdown complete, rebooting", 120);
    assert!(m.wait_exit(Duration::from_secs(60)).is_some(), "QEMU did not end:\n{}", m.console());
}

fn entries(disk: &Path) -> Vec<(String, String)> {
    let info = basalt::inspect::inspect(disk).unwrap();
    info.entries.into_iter().map(|e| (e.file, e.version)).collect()
}

/// v1 trusts test.key; v2 (signed by test.key) trusts only other.key: a
/// key rotation. v3 then needs other.key's signature.
#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_010_pushed_updates_land_in_b_then_a_across_a_key_rotation() {
    const ROTATED: &str = "ci/e2e/010-update/rotated.toml";
    let v1 = build(RECIPE, "1.0.0");
    let v2 = bundle_of(&build(ROTATED, "1.1.0"));
    let v3_built = build(ROTATED, "1.2.0");
    let v3_old_key = bundle_of(&v3_built);
    let v3_path = v3_built.disk.with_file_name("update.basalt");
    let other = basalt::ota::read_signing_key(&keys().join("other.key")).unwrap();
    basalt::ota::sign_bundle(&v3_path, &other).unwrap();
    let v3 = std::fs::read(&v3_path).unwrap();

    let mut m = boot(&v1.disk, &v1.report, "010-update-boot1");
    expect(&mut m, "boot blessed: slot a", 120);
    let (code, answer) = push(&m, &v2, "");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["installed"]["slot"], "b", "{answer}");
    assert_eq!(answer["installed"]["entry"], "b+3.conf", "{answer}");
    rebooted(&mut m);

    let mut m = boot(&v1.disk, &v1.report, "010-update-boot2");
    expect(&mut m, "boot blessed: slot b", 120);
    expect(&mut m, "[update-agent] updated 1.0.0 -> 1.1.0", 30);
    let s = status(&m);
    assert_eq!(s["version"], "1.1.0", "{s}");
    assert_eq!(s["booted_slot"], "b", "{s}");
    assert_eq!(s["blessed"], true, "{s}");
    assert_eq!(s["last_update"]["result"], "updated", "{s}");

    // The old key alone no longer installs anything.
    let (code, answer) = push(&m, &v3_old_key, "");
    assert_eq!(code, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("signature"), "{answer}");
    let (code, answer) = push(&m, &v3, "");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["installed"]["slot"], "a", "{answer}");
    rebooted(&mut m);

    let mut m = boot(&v1.disk, &v1.report, "010-update-boot3");
    expect(&mut m, "boot blessed: slot a", 120);
    expect(&mut m, "[update-agent] updated 1.1.0 -> 1.2.0", 30);
    let s = status(&m);
    assert_eq!(s["version"], "1.2.0", "{s}");
    m.monitor("sendkey ctrl-alt-delete").unwrap();
    rebooted(&mut m);
    drop(m);
    let want = [("a.conf".to_string(), "1.2.0".to_string()), ("b.conf".into(), "1.1.0".into())];
    assert_eq!(entries(&v1.disk), want);
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_011_a_version_that_never_gets_healthy_is_rolled_back_and_refused_again() {
    let v1 = build(RECIPE, "1.0.0");
    let broken = bundle_of(&build("ci/e2e/011-rollback/broken.toml", "2.0.0"));

    let mut m = boot(&v1.disk, &v1.report, "011-rollback-boot1");
    expect(&mut m, "boot blessed: slot a", 120);
    let (code, answer) = push(&m, &broken, "");
    assert_eq!(code, 200, "{answer}");
    rebooted(&mut m);

    // 2.0.0 boots from b, its required service never gets healthy, the
    // deadline marks the entry bad and reboots.
    let mut m = boot(&v1.disk, &v1.report, "011-rollback-boot2");
    expect(&mut m, "image update-test 2.0.0", 120);
    expect(&mut m, "b+2-1.conf -> b+0-3.conf", 120);
    assert!(m.wait_exit(Duration::from_secs(60)).is_some(), "no reboot:\n{}", m.console());

    // The bootloader alone goes back to a.
    let mut m = boot(&v1.disk, &v1.report, "011-rollback-boot3");
    expect(&mut m, "boot blessed: slot a", 120);
    expect(&mut m, "[update-agent] rolled back: 2.0.0 did not become healthy", 30);
    let s = status(&m);
    assert_eq!(s["version"], "1.0.0", "{s}");
    assert_eq!(s["last_update"]["result"], "rolled-back", "{s}");
    assert_eq!(s["failed_versions"], serde_json::json!(["2.0.0"]), "{s}");

    let (code, answer) = push(&m, &broken, "");
    assert_eq!(code, 409, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("rolled back"), "{answer}");
    let s = status(&m);
    assert_eq!(s["slots"][1]["state"], "bad", "{s}");
}

const PULL_RECIPE: &str = "ci/e2e/013-pull/recipe.toml";
const REPO_PORT: u16 = 17480;

/// nginx serving `root` on 127.0.0.1:`port`, as a fleet's web server
/// would; stopped on drop.
struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(root: &Path, port: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               access_log {d}/access.log;\n\
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

    fn access_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish(
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

/// The offset and length of a tar member's data in a bundle.
fn member(bundle: &[u8], name: &str) -> (usize, usize) {
    let mut at = 0;
    while at + 512 <= bundle.len() {
        let h = &bundle[at..at + 512];
        let n = String::from_utf8_lossy(&h[..100]).trim_end_matches('\0').to_string();
        let size_text = String::from_utf8_lossy(&h[124..136]);
        let size =
            usize::from_str_radix(size_text.trim_matches(|c: char| c == '\0' || c == ' '), 8)
                .unwrap_or(0);
        if n == name {
            return (at + 512, size);
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    panic!("no member {name} in the bundle");
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_012_bad_bundles_and_an_expired_channel_are_refused_and_change_nothing() {
    let v1 = build(PULL_RECIPE, "1.0.0");
    let good = build(PULL_RECIPE, "1.1.0");
    let good_bundle = bundle_of(&good);

    let mut flipped = good_bundle.clone();
    let (at, len) = member(&flipped, "rootfs");
    flipped[at + len / 2] ^= 0x40;

    let content = basalt::ota::OsContent::from_output(good.disk.parent().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other = basalt::ota::read_signing_key(&keys().join("other.key")).unwrap();
    let test = basalt::ota::read_signing_key(&keys().join("test.key")).unwrap();
    let unknown_signer = dir.path().join("unknown.basalt");
    basalt::ota::write_os_bundle(&content, &[other], &unknown_signer).unwrap();
    let mut old = basalt::ota::OsContent::from_output(good.disk.parent().unwrap()).unwrap();
    old.version = "0.9.0".parse().unwrap();
    let older = dir.path().join("older.basalt");
    basalt::ota::write_os_bundle(&old, &[test], &older).unwrap();
    let test = basalt::ota::read_signing_key(&keys().join("test.key")).unwrap();
    let mut foreign = basalt::ota::OsContent::from_output(good.disk.parent().unwrap()).unwrap();
    foreign.board = "rpi4".into();
    let other_board = dir.path().join("rpi4.basalt");
    basalt::ota::write_os_bundle(&foreign, &[test], &other_board).unwrap();

    // An expired channel in a repository served by nginx.
    let repo = tempfile::tempdir().unwrap();
    let staged = dir.path().join("good.basalt");
    std::fs::write(&staged, &good_bundle).unwrap();
    publish(&staged, repo.path(), 100, 1);
    let _nginx = Nginx::start(repo.path(), REPO_PORT);
    std::thread::sleep(Duration::from_secs(2));

    let mut m = boot(&v1.disk, &v1.report, "012-refused");
    expect(&mut m, "boot blessed: slot a", 120);
    expect(&mut m, "expired", 60);
    let s = status(&m);
    assert_eq!(s["last_update"]["result"], "refused", "{s}");
    assert!(s["last_update"]["message"].as_str().unwrap().contains("expired"), "{s}");

    let cases: [(&str, Vec<u8>, u16, &str); 4] = [
        ("flipped byte", flipped, 400, "rootfs"),
        ("unknown signer", std::fs::read(&unknown_signer).unwrap(), 400, "signature"),
        ("older version", std::fs::read(&older).unwrap(), 409, "not newer"),
        ("other board", std::fs::read(&other_board).unwrap(), 409, "rpi4"),
    ];
    for (what, bundle, want, says) in cases {
        let (code, answer) = push(&m, &bundle, "?reboot=false");
        let error = answer["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(code, want, "{what}: {answer}");
        assert!(error.contains(says), "{what}: {error}");
        let s = status(&m);
        assert_eq!(s["version"], "1.0.0", "{what}: {s}");
        assert_eq!(s["pending"], Value::Null, "{what}: {s}");
        eprintln!("{what}: {code} {error}");
    }
    m.monitor("sendkey ctrl-alt-delete").unwrap();
    rebooted(&mut m);
    drop(m);
    // Slot a was blessed by its boot; slot b never got an entry.
    assert_eq!(entries(&v1.disk), [("a.conf".to_string(), "1.0.0".to_string())]);
    let info = basalt::inspect::inspect(&v1.disk).unwrap();
    let a = info.slots.iter().find(|s| s.slot.name() == "a").unwrap();
    assert_eq!(a.version.as_deref(), Some("1.0.0"));
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_013_the_device_pulls_from_nginx_when_the_rollout_includes_it() {
    let v1 = build(PULL_RECIPE, "1.0.0");
    let v2 = build(PULL_RECIPE, "1.1.0");
    let bundle = v2.disk.with_file_name("update.basalt");
    let repo = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(repo.path(), REPO_PORT);

    let mut m = boot(&v1.disk, &v1.report, "013-pull-boot1");
    expect(&mut m, "boot blessed: slot a", 120);
    let s = status(&m);
    let bucket = s["rollout_bucket"].as_u64().expect("a rollout bucket") as u8;
    // A rollout up to the bucket excludes the device...
    publish(&bundle, repo.path(), bucket, 3600);
    expect(&mut m, "nothing to install for this device", 60);
    assert_eq!(status(&m)["pending"], Value::Null);
    // ...one more percent includes it.
    publish(&bundle, repo.path(), bucket + 1, 3600);
    expect(&mut m, "[update-agent] downloading update-test 1.1.0", 60);
    rebooted(&mut m);

    let mut m = boot(&v1.disk, &v1.report, "013-pull-boot2");
    expect(&mut m, "boot blessed: slot b", 120);
    expect(&mut m, "[update-agent] updated 1.0.0 -> 1.1.0", 30);
    let log = nginx.access_log();
    assert!(log.contains("GET /channels/stable.toml"), "{log}");
    assert!(log.contains("GET /bundles/update-test-1.1.0.basalt"), "{log}");
    // Later polls see the same channel file: 304, nothing downloaded again.
    std::thread::sleep(Duration::from_secs(5));
    let log = nginx.access_log();
    assert!(log.contains("\" 304 "), "{log}");
    assert_eq!(log.matches("GET /bundles/").count(), 1, "{log}");
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_014_power_cuts_during_an_install_always_leave_a_good_slot() {
    let v1 = build(RECIPE, "1.0.0");
    let v2 = bundle_of(&build(RECIPE, "1.1.0"));
    // Moments into the push, from "before the first byte is written" to
    // "around the new entry"; a time-seeded offset moves them each run.
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let jitter = u64::from(seed.subsec_millis()) % 400;
    let mut outcomes = Vec::new();
    for (n, cut_ms) in [200u64, 1500, 4000].into_iter().enumerate() {
        let cut_ms = cut_ms + jitter;
        let mut m = boot(&v1.disk, &v1.report, &format!("014-power-cut-{n}"));
        let slot = blessed_slot(&mut m);
        outcomes.push(slot.clone());
        if slot == "b" {
            // An earlier push finished before its cut: the update is whole.
            break;
        }
        let body = v2.clone();
        status(&m);
        let pusher = std::thread::spawn(move || http("POST", "/v1/update?reboot=false", &body));
        std::thread::sleep(Duration::from_millis(cut_ms));
        m.kill();
        let _ = pusher.join();
        eprintln!("cut {n} at {cut_ms} ms");
    }
    // Whatever was cut, the next boot runs a whole slot and blesses it.
    let mut m = boot(&v1.disk, &v1.report, "014-power-cut-final");
    let slot = blessed_slot(&mut m);
    outcomes.push(slot);
    assert!(!m.console().contains("FATAL"), "{}", m.console());
    eprintln!("slots booted after each cut: {outcomes:?}");
}

/// Waits for the boot to be blessed; checks that the slot runs the version
/// its entry promises (a: 1.0.0, b: 1.1.0); returns the slot.
fn blessed_slot(m: &mut Machine) -> String {
    // The slot letter and the rest of the line: the console may have been
    // read mid-line.
    expect(m, "boot blessed: slot ", 120);
    expect(m, ") (uptime", 10);
    let console = m.console();
    let slot = console
        .lines()
        .filter_map(|l| l.split("boot blessed: slot ").nth(1))
        .find_map(|rest| rest.get(..1).map(str::to_string))
        .unwrap_or_else(|| panic!("no blessed slot in:\n{console}"));
    let s = status(m);
    let want = if slot == "a" { "1.0.0" } else { "1.1.0" };
    assert_eq!(s["version"], want, "slot {slot}: {s}");
    assert_eq!(s["booted_slot"], slot.as_str(), "{s}");
    slot
}

const MODEL_RECIPE: &str = "ci/e2e/030-model-update/recipe.toml";

/// The reference MLP's bundle at `version`, signed by test.key, with a
/// short watch window so the scenario sees the version kept.
fn mlp_bundle(version: &str, dir: &Path) -> PathBuf {
    mlp_bundle_with(version, dir, false)
}

/// [`mlp_bundle`], with a test vector whose expected output is wrong when
/// `wrong_output`.
fn mlp_bundle_with(version: &str, dir: &Path, wrong_output: bool) -> PathBuf {
    let models = root().join(".cache/models");
    let mut config = std::fs::read_to_string(models.join("mlp.model.toml")).unwrap().replacen(
        "version = \"1.0.0\"",
        &format!("version = \"{version}\""),
        1,
    );
    if wrong_output {
        // The last `data = [` is the expected output's.
        let at = config.rfind("data = [").unwrap() + "data = [".len();
        config.insert_str(at, "1000");
    }
    let config = format!("{config}\n[watch]\nwindow = 5\nmin_requests = 1\n");
    let config_path = dir.join(format!("mlp-{version}.model.toml"));
    std::fs::write(&config_path, config).unwrap();
    let content = basalt::ota::ModelContent::from_files(&models.join("mlp.onnx"), &config_path)
        .unwrap_or_else(|e| panic!("{e}"));
    let key = basalt::ota::read_signing_key(&keys().join("test.key")).unwrap();
    let bytes = basalt::ota::model_bundle_bytes(&content, &[key], &[], 1_700_000_000).unwrap();
    let out = dir.join(format!("mlp-{version}.basalt"));
    std::fs::write(&out, bytes).unwrap();
    out
}

/// The agent's view of model `mlp`, once it has one.
fn mlp_status(m: &Machine) -> Value {
    let s = status(m);
    s["models"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "mlp").cloned())
        .unwrap_or(Value::Null)
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_030_a_model_published_on_its_channel_is_pulled_and_served_without_a_reboot() {
    let v1 = build(MODEL_RECIPE, "1.0.0");
    let dir = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(repo.path(), REPO_PORT);

    let mut m = boot(&v1.disk, &v1.report, "030-model-update");
    expect(&mut m, "boot blessed: slot a", 180);
    let before = status(&m);
    assert_eq!(before["version"], "1.0.0", "{before}");

    let v2 = mlp_bundle("2.0.0", dir.path());
    let key = basalt::ota::read_signing_key(&keys().join("test.key")).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let published = Instant::now();
    let ch = basalt::ota::publish(&basalt::ota::Publish {
        bundle: &v2,
        repo: repo.path(),
        channel: "stable",
        rollout: 100,
        expires_in: 3600,
        keys: &[key],
        now,
    })
    .unwrap();
    assert_eq!(ch.bundle, "bundles/models/mlp-2.0.0.basalt");
    expect(&mut m, "[update-agent] downloading model mlp 2.0.0", 60);
    let downloading = published.elapsed();
    expect(&mut m, "[update-agent] model mlp 2.0.0: runtime says", 120);
    // For the benchmark: the poll wait, then download, install, load,
    // test vector and switch, as the host sees them.
    eprintln!(
        "publish -> download started {:.2} s, -> switched {:.2} s",
        downloading.as_secs_f64(),
        published.elapsed().as_secs_f64()
    );

    // Kept after its watch window, with the baked 1.0.0 as the fallback.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mlp = loop {
        let mlp = mlp_status(&m);
        if mlp["serving"] == "2.0.0" || Instant::now() > deadline {
            break mlp;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(mlp["serving"], "2.0.0", "{mlp}\nconsole:\n{}", m.console());
    assert_eq!(mlp["last_update"]["version"], "2.0.0", "{mlp}");
    let log = nginx.access_log();
    assert!(log.contains("GET /channels/models/mlp/stable.toml"), "{log}");
    assert_eq!(log.matches("GET /bundles/models/mlp-2.0.0.basalt").count(), 1, "{log}");

    // A push of the next version through the agent's API answers with the
    // runtime's own result.
    let v3 = std::fs::read(mlp_bundle("3.0.0", dir.path())).unwrap();
    let (code, body) = http("POST", "/v1/models", &v3).unwrap();
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["installed"]["version"], "3.0.0", "{answer}");
    assert_eq!(answer["runtime"]["body"]["version"], "3.0.0", "{answer}");

    // A version whose test vector fails: refused by the runtime with the
    // reason, 3.0.0 keeps serving, and the agent never fetches it again.
    let v4 = mlp_bundle_with("4.0.0", dir.path(), true);
    let key = basalt::ota::read_signing_key(&keys().join("test.key")).unwrap();
    basalt::ota::publish(&basalt::ota::Publish {
        bundle: &v4,
        repo: repo.path(),
        channel: "stable",
        rollout: 100,
        expires_in: 3600,
        keys: &[key],
        now,
    })
    .unwrap();
    expect(&mut m, "[update-agent] model mlp 4.0.0: the runtime refused it (400)", 60);
    std::thread::sleep(Duration::from_secs(6));
    let mlp = mlp_status(&m);
    assert_eq!(mlp["serving"], "3.0.0", "{mlp}");
    let failed = mlp["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{mlp}");
    assert_eq!(failed[0]["version"], "4.0.0", "{mlp}");
    assert!(failed[0]["reason"].as_str().unwrap().contains("test vector"), "{mlp}");
    let log = nginx.access_log();
    assert_eq!(log.matches("GET /bundles/models/mlp-4.0.0.basalt").count(), 1, "{log}");

    // No reboot: the same boot, still in slot a, never blessed twice.
    let after = status(&m);
    assert_eq!(after["booted_slot"], "a", "{after}");
    assert_eq!(m.console().matches("boot blessed").count(), 1, "{}", m.console());
    assert!(m.wait_exit(Duration::from_millis(100)).is_none(), "QEMU ended");
}
