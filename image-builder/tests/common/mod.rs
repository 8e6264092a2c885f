//! Shared set-up of the integration tests: paths, building images through
//! the library, running external judges.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use basalt::build::Report;
use basalt::plan::{self, PlanOptions};
use basalt::qemu::{Machine, MachineOptions};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The fixed build time of every test image.
pub const SDE: u64 = 1_700_000_000;

/// Resolves a recipe into a plan, with the test build time.
pub fn resolve(recipe: &Path) -> basalt::plan::Plan {
    let opts = PlanOptions {
        board: None,
        source_date_epoch: SDE,
        cache_dir: plan::default_cache_dir(),
        ..Default::default()
    };
    plan::resolve(recipe, &opts).unwrap_or_else(|e| panic!("{e}"))
}

/// Resolves and builds a recipe into `out`.
pub fn build(recipe: &Path, out: &Path) -> Report {
    build_ab(recipe, None, out)
}

/// Builds `recipe` into slot a and, if given, `slot_b` into slot b.
pub fn build_ab(recipe: &Path, slot_b: Option<&Path>, out: &Path) -> Report {
    let a = resolve(recipe);
    let b = slot_b.map(resolve);
    basalt::build::build(&a, b.as_ref(), out, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command and returns its output; panics if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies `len` bytes at `offset` of `file` into a new file.
pub fn extract(file: &Path, offset: u64, len: u64, dest: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    std::fs::write(dest, buf).unwrap();
}

/// Boots `disk` in QEMU (headless; a reboot ends QEMU), with its console
/// kept in `$TMPDIR/basalt-e2e-<tag>.log`.
pub fn boot(disk: &Path, report: &Report, tag: &str) -> Machine {
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

/// Waits for `marker` on the console; panics with the console if it does
/// not come within `secs`.
pub fn expect(m: &mut Machine, marker: &str, secs: u64) {
    if !m.wait_for(marker, std::time::Duration::from_secs(secs)) {
        panic!("`{marker}` did not appear within {secs} s; console:\n{}", m.console());
    }
}

/// Resolves and builds `recipe` at `version` for `board` (the recipe's
/// own when `None`), signing its bundle with `key` if given.
pub fn build_version(
    recipe: &Path,
    version: &str,
    board: Option<&Path>,
    key: Option<&Path>,
    out: &Path,
) -> Report {
    let opts = PlanOptions {
        board: board.map(|b| b.display().to_string()),
        source_date_epoch: SDE,
        cache_dir: plan::default_cache_dir(),
        version: Some(version.parse().unwrap()),
        signing_key: key.map(Path::to_path_buf),
        ..Default::default()
    };
    let plan = plan::resolve(recipe, &opts).unwrap_or_else(|e| panic!("{e}"));
    basalt::build::build(&plan, None, out, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"))
}
