//! System tests: build an image, boot it in QEMU (TCG, OVMF, systemd-boot),
//! read the serial console, check one behaviour each. They take tens of
//! seconds each, so they are opt-in for `cargo test` (`--ignored`) and
//! always on in CI (`ci/test.sh`). Scenario inputs live in `ci/e2e/NNN-*/`.

mod common;

use std::time::Duration;

use basalt::qemu::{Machine, MachineOptions};
use common::root;

fn boot(disk: &std::path::Path, report: &basalt::build::Report, tag: &str) -> Machine {
    let spec = report.machine.clone().expect("the board has a QEMU machine");
    let log = std::env::temp_dir().join(format!("basalt-e2e-{tag}.log"));
    eprintln!("console of {tag}: {}", log.display());
    Machine::start(&MachineOptions {
        spec,
        disk: disk.to_path_buf(),
        no_reboot: true,
        echo: false,
        console_log: Some(log),
    })
    .unwrap()
}

fn expect(m: &mut Machine, marker: &str, secs: u64) {
    if !m.wait_for(marker, Duration::from_secs(secs)) {
        panic!("`{marker}` did not appear within {secs} s; console:\n{}", m.console());
    }
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_001_boot_blesses_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = common::build(&root().join("recipes/minimal.toml"), &out);
    let disk = out.join("disk.img");
    let mut m = boot(&disk, &report, "001-boot");
    expect(&mut m, "[hello] hello from basalt", 120);
    expect(&mut m, "boot blessed: slot a", 60);
    // Ctrl-Alt-Del reaches PID 1 as SIGINT: an orderly shutdown, then a
    // reboot that -no-reboot turns into QEMU's exit.
    m.monitor("sendkey ctrl-alt-delete").unwrap();
    expect(&mut m, "shutdown complete", 60);
    let code = m.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "QEMU did not exit cleanly; console:\n{}", m.console());
    let console = m.console();
    assert!(!console.contains("FATAL"), "{console}");
    drop(m);

    let info = basalt::inspect::inspect(&disk).unwrap();
    let files: Vec<&str> = info.entries.iter().map(|e| e.file.as_str()).collect();
    assert_eq!(files, ["a.conf"], "the boot was not blessed on disk");
}
