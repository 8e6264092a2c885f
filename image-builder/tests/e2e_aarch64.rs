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
mod device;

use std::path::Path;
use std::time::{Duration, Instant};

use basalt::build::Report;
use basalt::qemu::Machine;
use common::{boot, expect, root};
use device::{build_on, bundle_of, push_at, status_at, tritonclient_at};

/// The update agent's API, forwarded.
const API: u16 = 17900;
/// The runtime, forwarded.
const RUNTIME: u16 = 17980;
const RECIPE: &str = "ci/e2e/040-aarch64/recipe.toml";

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
    let v1 = build_on(RECIPE, "1.0.0", None);
    assert_eq!((v1.report.board.as_str(), v1.report.arch.as_str()), ("qemu-aarch64", "aarch64"));
    let machine = v1.report.machine.as_ref().expect("qemu-aarch64 has a QEMU machine");
    assert_eq!(machine.binary, "qemu-system-aarch64");
    let v2 = bundle_of(&build_on(RECIPE, "1.1.0", None));
    // The same recipe for the x86-64 board: only the board differs.
    let x86_board = root().join("boards/qemu-x86_64.toml");
    let x86 = build_on(RECIPE, "1.2.0", Some(&x86_board));
    assert_eq!(x86.report.arch, "x86_64");
    let x86 = bundle_of(&x86);

    let mut m = boot_blessed(&v1.disk, &v1.report, "040-aarch64-boot1", "a");
    tritonclient_at(RUNTIME, &m, &root().join(".cache/models/mlp.ref.json"));

    // A bundle for another board is refused (409: it is a valid bundle,
    // for another device) before anything is written.
    let (code, answer) = push_at(API, &m, &x86, "");
    assert_eq!(code, 409, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("qemu-x86_64") && error.contains("qemu-aarch64"), "{answer}");

    let (code, answer) = push_at(API, &m, &v2, "");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["installed"]["slot"], "b", "{answer}");
    expect(&mut m, "shutdown complete, rebooting", 300);
    assert!(m.wait_exit(Duration::from_secs(60)).is_some(), "QEMU did not end:\n{}", m.console());

    let mut m = boot_blessed(&v1.disk, &v1.report, "040-aarch64-boot2", "b");
    expect(&mut m, "[update-agent] updated 1.0.0 -> 1.1.0", 120);
    let s = status_at(API, &m, 120);
    assert_eq!(s["version"], "1.1.0", "{s}");
    assert_eq!(s["booted_slot"], "b", "{s}");
    assert_eq!(s["blessed"], true, "{s}");
    assert!(!m.console().contains("FATAL"), "{}", m.console());
}
