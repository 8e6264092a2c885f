//! System tests: build an image, boot it in QEMU (TCG, OVMF, systemd-boot),
//! read the serial console, check one behaviour each. They take tens of
//! seconds each, so they are opt-in for `cargo test` (`--ignored`) and
//! always on in CI (`ci/test.sh`). Scenario inputs live in `ci/e2e/NNN-*/`.

mod common;

use std::time::Duration;

use basalt::qemu::Machine;
use common::{boot, expect, root};

/// One scenario's image: built into a temp dir that lives as long as it.
struct Scenario {
    _dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    report: basalt::build::Report,
}

/// Builds `recipe` (relative to the workspace) into slot a and, if given,
/// `slot_b` into slot b.
fn scenario(recipe: &str, slot_b: Option<&str>) -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let b = slot_b.map(|r| root().join(r));
    let report = common::build_ab(&root().join(recipe), b.as_deref(), &out);
    Scenario { disk: out.join("disk.img"), report, _dir: dir }
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_001_boot_blesses_and_powers_off() {
    let Scenario { disk, report, .. } = &scenario("recipes/minimal.toml", None);
    let mut m = boot(disk, report, "001-boot");
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

    let info = basalt::inspect::inspect(disk).unwrap();
    let files: Vec<&str> = info.entries.iter().map(|e| e.file.as_str()).collect();
    assert_eq!(files, ["a.conf"], "the boot was not blessed on disk");
}

/// The restart delays the supervisor announced, in seconds, in order.
fn restart_delays(console: &str, service: &str) -> Vec<f64> {
    console
        .lines()
        .filter(|l| l.contains(&format!("basalt-init: {service} exited")))
        .filter_map(|l| l.split("; restart ").nth(1))
        .filter_map(|r| r.split(" in ").nth(1))
        .filter_map(|r| r.trim_end_matches(" s").trim().parse().ok())
        .collect()
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_002_crash_restart_with_backoff_and_no_zombies() {
    let Scenario { disk, report, .. } = &scenario("ci/e2e/002-crash-restart/recipe.toml", None);
    let mut m = boot(disk, report, "002-crash-restart");
    let crash = "[crasher] demo: crashing with code 1";
    if !m.wait_for_count(crash, 51, Duration::from_secs(240)) {
        panic!("fewer than 51 crashes; console:\n{}", m.console());
    }
    // After 50 restarts, PID 1 still reaps: the zombie counter reports 0.
    let seen = m.console().matches("zombies] demo:").count();
    if !m.wait_for_count("zombies] demo:", seen + 2, Duration::from_secs(30)) {
        panic!("the zombie counter stopped; console:\n{}", m.console());
    }
    expect(&mut m, "boot blessed: slot a", 60);
    let console = m.console();
    let delays = restart_delays(&console, "crasher");
    assert!(delays.len() >= 50, "{} restarts announced:\n{console}", delays.len());
    assert!(delays.windows(2).all(|w| w[1] >= w[0]), "delays shrink: {delays:?}");
    assert!(delays[4] > delays[0] * 8.0, "delays do not grow: {delays:?}");
    assert!(delays.iter().all(|d| *d <= 0.32 + 1e-9), "delay beyond its cap: {delays:?}");
    // Complete lines only: the console may have been read mid-line.
    let complete = &console[..console.rfind('\n').unwrap_or(0)];
    let last_counts: Vec<&str> = complete
        .lines()
        .map(str::trim_end)
        .filter(|l| l.contains("zombies] demo:"))
        .rev()
        .take(2)
        .collect();
    assert!(last_counts.iter().all(|l| l.ends_with(" 0 zombies")), "{last_counts:?}");
    assert!(!console.contains("FATAL") && !console.contains("Kernel panic"), "{console}");
}

/// Boots `disk` again and again (each reboot ends QEMU) until `marker`
/// appears; returns the consoles of all boots.
fn boot_until(
    disk: &std::path::Path,
    report: &basalt::build::Report,
    tag: &str,
    marker: &str,
    boots: usize,
) -> Vec<String> {
    let mut consoles = Vec::new();
    for n in 1..=boots {
        let mut m = boot(disk, report, &format!("{tag}-boot{n}"));
        let seen = m.wait_for(marker, Duration::from_secs(120));
        consoles.push(m.console());
        if seen {
            return consoles;
        }
        assert!(
            m.wait_exit(Duration::from_secs(60)).is_some(),
            "boot {n} neither reached `{marker}` nor rebooted:\n{}",
            m.console()
        );
    }
    panic!("`{marker}` not seen in {boots} boots; last console:\n{}", consoles.last().unwrap());
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_003_unhealthy_slot_is_marked_bad_and_the_other_slot_boots() {
    let Scenario { disk, report, .. } =
        &scenario("ci/e2e/003-unhealthy/recipe.toml", Some("ci/e2e/fallback.toml"));
    let consoles = boot_until(disk, report, "003-unhealthy", "boot blessed: slot b", 3);
    assert_eq!(consoles.len(), 2, "expected one failed boot of a, then b");
    assert!(consoles[0].contains("image unhealthy 2.0.0"), "{}", consoles[0]);
    assert!(consoles[0].contains("required service sick is not healthy"), "{}", consoles[0]);
    assert!(consoles[0].contains("marked bad"), "{}", consoles[0]);
    assert!(consoles[1].contains("image fallback 0.1.0"), "{}", consoles[1]);
    let info = basalt::inspect::inspect(disk).unwrap();
    let a = info.entries.iter().find(|e| e.file.starts_with('a')).unwrap();
    let b = info.entries.iter().find(|e| e.file.starts_with('b')).unwrap();
    assert_eq!((a.state.as_str(), a.tries_left), ("bad", Some(0)), "{:?}", info.entries);
    assert_eq!(b.file, "b.conf");
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_004_a_flipped_byte_in_the_root_fs_falls_back_to_the_other_slot() {
    let Scenario { disk, report, .. } =
        &scenario("recipes/minimal.toml", Some("ci/e2e/fallback.toml"));
    // One byte of the squashfs superblock: it is read at mount, so the
    // failure is certain, and dm-verity must refuse it.
    let a = report.partitions.iter().find(|p| p.label == "rootfs_a").unwrap();
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(disk).unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(a.offset + 8)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(a.offset + 8)).unwrap();
        f.write_all(&[b[0] ^ 0x01]).unwrap();
    }
    let consoles = boot_until(disk, report, "004-verity", "boot blessed: slot b", 5);
    // Verification failures repeat, so stage 1 gives the slot up at once:
    // one failed boot, not one per remaining try.
    assert_eq!(consoles.len(), 2, "expected one failed boot of a, then b");
    let failed = &consoles[0];
    assert!(failed.contains("dm-verity refused") && failed.contains("FATAL"), "{failed}");
    assert!(failed.contains("failed verification: entry a+2-1.conf -> a+0-3.conf"), "{failed}");
    assert!(!failed.contains("boot blessed"), "{failed}");
    assert!(consoles.last().unwrap().contains("image fallback 0.1.0"));
    let info = basalt::inspect::inspect(disk).unwrap();
    assert!(info.entries.iter().any(|e| e.file == "b.conf"), "{:?}", info.entries);
    assert!(!info.entries.iter().any(|e| e.file == "a.conf"), "{:?}", info.entries);
}

/// One HTTP GET over a plain TcpStream; returns the status line.
fn http_get_status(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply.lines().next().unwrap_or_default().to_string())
}

/// GETs /healthz on the host's forwarded `port`, retrying for up to 20 s
/// (the guest's service may still be starting), and asserts a 200.
fn assert_healthz_answers_200(m: &Machine, port: u16) {
    let addr = format!("127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        match http_get_status(&addr, "/healthz") {
            Ok(s) if !s.is_empty() => break s,
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(500))
            }
            r => panic!("no HTTP answer on {addr}: {r:?}; console:\n{}", m.console()),
        }
    };
    assert!(status.contains(" 200 "), "{status}; console:\n{}", m.console());
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_005_dhcp_address_and_forwarded_port() {
    let Scenario { disk, report, .. } = &scenario("ci/e2e/005-network/recipe.toml", None);
    let ports = &report.machine.as_ref().expect("a QEMU machine").ports;
    assert_eq!(ports, &[18080], "the recipe's port is not forwarded");
    let mut m = boot(disk, report, "005-network");
    expect(&mut m, "dhcp: eth0 10.0.2.15", 120);
    expect(&mut m, "boot blessed: slot a", 60);
    // From the host, through QEMU's forwarding to the guest's 0.0.0.0:18080.
    assert_healthz_answers_200(&m, 18080);
    let console = m.console();
    assert!(console.contains("dhcp: eth0 10.0.2.15/24 via 10.0.2.2"), "{console}");
    assert!(!console.contains("cannot load module"), "{console}");
    assert!(!console.contains("FATAL"), "{console}");
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_005_static_address_and_forwarded_port() {
    let Scenario { disk, report, .. } = &scenario("ci/e2e/005-network/static.toml", None);
    let mut m = boot(disk, report, "005-network-static");
    expect(&mut m, "network: eth0 10.0.2.15/24 via 10.0.2.2 (static)", 120);
    expect(&mut m, "boot blessed: slot a", 60);
    assert_healthz_answers_200(&m, 18081);
    let console = m.console();
    assert!(!console.contains("[dhcp]"), "{console}");
    assert!(!console.contains("FATAL"), "{console}");
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_020_the_gateway_serves_tritonclient_through_the_forwarded_port() {
    let Scenario { disk, report, .. } = &scenario("recipes/gateway.toml", None);
    let mut m = boot(disk, report, "020-serve");
    // Blessing waits for the runtime's readiness, which waits for the
    // model's test vector.
    expect(&mut m, "[runtime] model mlp 1.0.0: loaded, test vector passed", 120);
    expect(&mut m, "boot blessed: slot a", 60);
    let python = root().join(".cache/venv/bin/python");
    assert!(python.is_file(), "no {}; run ci/setup.sh", python.display());
    let out = std::process::Command::new(&python)
        .arg(root().join("ci/models/interop.py"))
        .arg("http://127.0.0.1:8000")
        .arg("mlp")
        .arg(root().join(".cache/models/mlp.ref.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tritonclient against the gateway: {}{}\nconsole:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.console()
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(!m.console().contains("FATAL"), "{}", m.console());
}

/// The children of `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // The fields after the command name (which may hold spaces) are
        // state and parent pid.
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        if rest.split_whitespace().nth(1) == Some(&pid.to_string()) {
            found.push(child);
        }
    }
    found
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
#[ignore = "boots QEMU; run with --ignored (ci/test.sh does)"]
fn e2e_001_basalt_run_killed_leaves_nothing_behind() {
    let Scenario { disk, .. } = &scenario("recipes/minimal.toml", None);
    let log = disk.with_file_name("console.log");
    // SIGKILL cannot be caught, so the firmware copies stay behind: in a
    // directory of this test's own, which it removes.
    let killed_tmp = tempfile::tempdir().unwrap();
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_basalt"))
        .arg("run")
        .arg(disk)
        .arg("--console-log")
        .arg(&log)
        .env("TMPDIR", killed_tmp.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("basalt-init") {
        assert!(std::time::Instant::now() < deadline, "the image did not reach basalt-init");
        std::thread::sleep(Duration::from_millis(200));
    }
    let qemu = children_of(run.id());
    assert_eq!(qemu.len(), 1, "expected QEMU as the only child of basalt run: {qemu:?}");
    // Should this test fail, the QEMU it left must not outlive it (it would
    // hold the test's output open).
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            if alive(self.0) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &self.0.to_string()])
                    .status();
            }
        }
    }
    let _reap = Reap(qemu[0]);
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(qemu[0]) {
        assert!(std::time::Instant::now() < deadline, "QEMU {} outlived basalt run", qemu[0]);
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGTERM (what scripts and service managers send): `basalt run` stops
    // QEMU itself and removes the firmware copies it made.
    let tmp = tempfile::tempdir().unwrap();
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_basalt"))
        .arg("run")
        .arg(disk)
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let qemu = loop {
        let qemu = children_of(run.id());
        if !qemu.is_empty() {
            break qemu;
        }
        assert!(std::time::Instant::now() < deadline, "basalt run started no QEMU");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _reap = Reap(qemu[0]);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "no firmware state made");
    let term =
        std::process::Command::new("kill").args(["-TERM", &run.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "basalt run should exit 143 on SIGTERM");
    assert!(!alive(qemu[0]), "QEMU {} outlived basalt run", qemu[0]);
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "basalt run left {left:?} behind");
}
