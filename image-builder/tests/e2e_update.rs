//! System tests of OTA updates: push, pull, rollback, refusals and power
//! cuts, each booting real images in QEMU (TCG, OVMF, systemd-boot), and
//! of model updates (030, 031). The update agent's API is reached through
//! QEMU's forwarding of 127.0.0.1:17400, the model runtime's through
//! 127.0.0.1:17800; the disk file persists across QEMU runs, so a reboot
//! (which ends QEMU here) is followed by a new boot of the same disk.
//! Inputs live in `ci/e2e/01x-*/`, `ci/e2e/030-model-update/` and
//! `ci/e2e/keys/`; 030 and 031 also need the reference models in
//! `.cache/models` and the Python of `.cache/venv` (ci/setup.sh).

mod common;
mod device;

use std::time::Duration;

use basalt::qemu::Machine;
use common::{boot, expect, root};
use device::*;
use serde_json::Value;

const RECIPE: &str = "ci/e2e/010-update/recipe.toml";

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

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_030_a_model_published_on_its_channel_is_pulled_and_served_without_a_reboot() {
    let v1 = build(MODEL_RECIPE, "1.0.0");
    let versions = Versions::make();
    let repo = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(repo.path(), REPO_PORT);

    let mut m = boot(&v1.disk, &v1.report, "030-model-update");
    expect(&mut m, "boot blessed: slot a", 180);
    assert_eq!(status(&m)["version"], "1.0.0");
    tritonclient(&m, &root().join(".cache/models/mlp.ref.json"));

    // 2.0.0 (other weights, other outputs) on the model's channel. The
    // watch window is short so that the scenario sees it kept; it gets no
    // request in it, so no rule can judge it on a cold first request.
    let v2 = versions.bundle("2.0.0", "2.0.0", "[watch]\nwindow = 3\nmin_requests = 1\n");
    let published = unix_now();
    let ch = publish_model(&v2, repo.path());
    assert_eq!(ch.bundle, "bundles/models/mlp-2.0.0.basalt");
    expect_line(&mut m, "[update-agent] model mlp 2.0.0: runtime says watching", 120);
    let split = Split::of(&m.console(), &nginx.access_log(), "2.0.0", published);
    eprintln!("publish -> serving 2.0.0: {}", split.line());

    // Kept after its watch window, with the baked 1.0.0 as the fallback;
    // tritonclient sees 2.0.0's outputs.
    let mlp = wait_serving(&m, "2.0.0", 60);
    assert_eq!(mlp["fallback"], "1.0.0", "{mlp}");
    assert_eq!(mlp["last_update"]["version"], "2.0.0", "{mlp}");
    assert_eq!(mlp["last_update"]["result"], "serving", "{mlp}");
    tritonclient(&m, &versions.reference("2.0.0"));
    answers_as(&versions.reference("2.0.0"), "2.0.0");
    let log = nginx.access_log();
    assert!(log.contains("GET /channels/models/mlp/stable.toml"), "{log}");
    assert_eq!(log.matches("GET /bundles/models/mlp-2.0.0.basalt").count(), 1, "{log}");

    // No reboot, and the runtime was not restarted either.
    same_boot(&mut m);
}

/// 031: from 2.0.0 (pushed to the agent's `POST /v1/models`), a 3.0.0
/// whose test vector fails and a 4.0.0 that passes it but fails live
/// requests, both pulled from the model's channel: each ends with 2.0.0
/// serving, its reason in the agent's status and the runtime's index,
/// and neither is fetched or loaded again when the channel offers it
/// anew.
#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_031_failing_model_versions_roll_back_and_are_not_retried() {
    let v1 = build(MODEL_RECIPE, "1.0.0");
    let versions = Versions::make();
    let repo = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(repo.path(), REPO_PORT);
    let v2 = versions.bundle("2.0.0", "2.0.0", "[watch]\nwindow = 0\n");
    let v3 = versions.bundle("3.0.0", "3.0.0", "");
    let v4 = versions.bundle(
        "4.0.0",
        "4.0.0",
        "[watch]\nwindow = 120\nmin_requests = 5\nmax_error_rate = 0.1\n",
    );

    let mut m = boot(&v1.disk, &v1.report, "031-model-rollback");
    expect(&mut m, "boot blessed: slot a", 180);
    status(&m);
    let (code, body) = http("POST", "/v1/models", &std::fs::read(&v2).unwrap()).unwrap();
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["installed"]["version"], "2.0.0", "{answer}");
    assert_eq!(answer["runtime"]["body"]["state"], "serving", "{answer}");
    answers_as(&versions.reference("2.0.0"), "2.0.0");

    // 3.0.0: the runtime runs its test vector beside 2.0.0 and refuses it.
    publish_model(&v3, repo.path());
    expect(&mut m, "[update-agent] model mlp 3.0.0: the runtime refused it (400)", 60);
    let mlp = mlp_status(&m);
    assert_eq!(mlp["serving"], "2.0.0", "{mlp}");
    assert_eq!(mlp["last_update"]["result"], "failed", "{mlp}");
    answers_as(&versions.reference("2.0.0"), "2.0.0");

    // 4.0.0: passes its test vector, is switched to and watched; live
    // requests whose features leave [-4, 4) fail on it; past 10 % errors
    // over 5 requests the runtime switches back to 2.0.0.
    publish_model(&v4, repo.path());
    expect(&mut m, "[update-agent] model mlp 4.0.0: runtime says watching", 60);
    answers_as(&versions.reference("2.0.0"), "4.0.0");
    let field_data = vec![6.5f32; 32];
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (code, answer) = infer(&field_data);
        codes.push(code);
        if code == 200 {
            assert_eq!(answer["model_version"], "2.0.0", "{answer}");
        }
    }
    assert!(codes.contains(&500), "{codes:?}");
    expect(&mut m, "[runtime] model mlp 4.0.0: rolled back to 2.0.0: error rate", 30);
    answers_as(&versions.reference("2.0.0"), "2.0.0");
    let (code, answer) = infer(&field_data);
    assert_eq!((code, &answer["model_version"]), (200, &Value::from("2.0.0")), "{answer}");

    // Each failure with its reason: in the agent's status...
    let mlp = mlp_status(&m);
    assert_eq!(mlp["serving"], "2.0.0", "{mlp}");
    assert_eq!(mlp["last_update"]["result"], "rolled-back", "{mlp}");
    let failed: Vec<(String, String)> = mlp["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["version"].as_str().unwrap().into(), f["reason"].as_str().unwrap().into()))
        .collect();
    assert_eq!(failed.len(), 2, "{mlp}");
    assert_eq!(failed[0].0, "3.0.0");
    assert!(failed[0].1.contains("test vector"), "{failed:?}");
    assert_eq!(failed[1].0, "4.0.0");
    assert!(failed[1].1.contains("rolled back to 2.0.0: error rate"), "{failed:?}");
    // ...and in the runtime's repository index.
    let (code, index) = http_at(RUNTIME, "GET", "/v2/repository/index", b"").unwrap();
    assert_eq!(code, 200, "{index}");
    let index: Value = serde_json::from_str(&index).unwrap();
    let entry = |v: &str| {
        index
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["version"] == v)
            .cloned()
            .unwrap_or_else(|| panic!("no {v} in the runtime's index {index}"))
    };
    assert_eq!(entry("2.0.0")["role"], "serving", "{index}");
    assert_eq!(entry("3.0.0")["role"], "failed", "{index}");
    assert!(entry("3.0.0")["reason"].as_str().unwrap().contains("test vector"), "{index}");
    assert_eq!(entry("4.0.0")["role"], "failed", "{index}");
    assert!(entry("4.0.0")["reason"].as_str().unwrap().contains("error rate"), "{index}");

    // Neither is retried: offered again on the channel (a new channel
    // file each time), the agent refuses each from what it remembers and
    // fetches no bundle; the runtime, asked to load, has nothing newer.
    for (bundle, version) in [(&v3, "3.0.0"), (&v4, "4.0.0")] {
        publish_model(bundle, repo.path());
        expect(&mut m, &format!("[update-agent] mlp {version} failed on this device"), 30);
    }
    let (code, body) = http_at(RUNTIME, "POST", "/v2/repository/models/mlp/load", b"").unwrap();
    assert_eq!(code, 200, "{body}");
    let load: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((&load["state"], &load["version"]), (&"unchanged".into(), &"2.0.0".into()));
    let log = nginx.access_log();
    assert_eq!(log.matches("GET /bundles/models/mlp-3.0.0.basalt").count(), 1, "{log}");
    assert_eq!(log.matches("GET /bundles/models/mlp-4.0.0.basalt").count(), 1, "{log}");
    assert_eq!(mlp_status(&m)["failed"].as_array().unwrap().len(), 2);
    same_boot(&mut m);
}
