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
    build_plan(recipe, version, board, key, out).1
}

/// [`build_version`], returning the plan too.
pub fn build_plan(
    recipe: &Path,
    version: &str,
    board: Option<&Path>,
    key: Option<&Path>,
    out: &Path,
) -> (basalt::plan::Plan, Report) {
    let opts = PlanOptions {
        board: board.map(|b| b.display().to_string()),
        source_date_epoch: SDE,
        cache_dir: plan::default_cache_dir(),
        version: Some(version.parse().unwrap()),
        signing_key: key.map(Path::to_path_buf),
        ..Default::default()
    };
    let plan = plan::resolve(recipe, &opts).unwrap_or_else(|e| panic!("{e}"));
    let report =
        basalt::build::build(&plan, None, out, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    (plan, report)
}

/// `boards/<name>.toml` made buildable here: Debian's arm64 cloud kernel
/// (ci/setup.sh fetches it) as its `[kernel]`, and only modules that
/// kernel has (a real board's drivers are not in it).
pub fn arm64_board_table(name: &str) -> toml::Table {
    let text = std::fs::read_to_string(root().join(format!("boards/{name}.toml"))).unwrap();
    let mut t: toml::Table = text.parse().unwrap();
    let deb = root().join(".cache/kernel/linux-image-cloud-arm64.deb");
    assert!(deb.exists(), "{} missing: run ci/setup.sh", deb.display());
    let mut kernel = toml::Table::new();
    kernel.insert("deb".into(), deb.display().to_string().into());
    t.insert("kernel".into(), kernel.into());
    let mods = |m: &[&str]| toml::Value::Array(m.iter().map(|s| (*s).into()).collect());
    t.insert("stage1_modules".into(), mods(&["dm-verity", "squashfs", "vfat", "nls_cp437"]));
    t.insert("modules".into(), mods(&[]));
    t
}

/// Writes `t` to `dir/file`; returns the path.
pub fn write_toml(dir: &Path, file: &str, t: &toml::Table) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, toml::to_string(t).unwrap()).unwrap();
    path
}

/// `recipes/minimal.toml` named `name` for `board`, without a kernel of
/// its own (it takes the board's), written to `dir/<name>.toml`.
pub fn small_recipe(dir: &Path, name: &str, board: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("recipes/minimal.toml")).unwrap();
    let mut t: toml::Table = text.parse().unwrap();
    t.remove("kernel");
    let image = t["image"].as_table_mut().unwrap();
    image.insert("name".into(), name.into());
    image.insert("board".into(), board.display().to_string().into());
    write_toml(dir, &format!("{name}.toml"), &t)
}

/// A FAT partition at a byte offset of a disk image, read with mtools.
pub struct Fat {
    img: String,
}

impl Fat {
    /// The FAT filesystem at `offset` of `disk`.
    pub fn at(disk: &Path, offset: u64) -> Fat {
        Fat { img: format!("{}@@{offset}", disk.display()) }
    }

    /// One file's bytes.
    pub fn read(&self, file: &str) -> Vec<u8> {
        let out = run(Command::new("mcopy").env("MTOOLS_SKIP_CHECK", "1").args([
            "-n",
            "-i",
            &self.img,
            &format!("::{file}"),
            "-",
        ]));
        assert!(out.status.success(), "mcopy {file}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// Whether `file` is there, as mtools lists it.
    pub fn has(&self, file: &str) -> bool {
        run(Command::new("mdir").env("MTOOLS_SKIP_CHECK", "1").args([
            "-i",
            &self.img,
            &format!("::{file}"),
        ]))
        .status
        .success()
    }

    /// Copies every file into `to` (made if need be); returns it.
    pub fn unpack(&self, to: &Path) -> PathBuf {
        std::fs::create_dir_all(to).unwrap();
        ok(Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-n", "-i", &self.img, "::*"])
            .arg(to));
        to.to_path_buf()
    }
}

/// The disk's GPT judged by `sgdisk`: no problems (`-v`), and partition
/// `n` (from 1) of type and name `want[n - 1]`.
pub fn assert_gpt(disk: &Path, want: &[(&str, &str)]) {
    let v = ok(Command::new("sgdisk").arg("-v").arg(disk));
    assert!(v.contains("No problems found"), "{v}");
    for (i, (name, ty)) in want.iter().enumerate() {
        let n = i + 1;
        let info = ok(Command::new("sgdisk").args(["-i", &n.to_string()]).arg(disk));
        assert!(info.contains(&format!("Partition GUID code: {ty}")), "p{n}: {info}");
        assert!(info.contains(&format!("Partition name: '{name}'")), "p{n}: {info}");
    }
}

/// A new signing key written as PEM to `dir/key.pem`, and a trust of it
/// alone.
pub fn fresh_key(dir: &Path) -> (PathBuf, basalt_bundle::Trust) {
    let key = basalt_bundle::keys::SigningKey::generate().unwrap();
    let file = dir.join("key.pem");
    std::fs::write(&file, key.to_pkcs8_pem().unwrap()).unwrap();
    let trust = basalt_bundle::Trust { keys: vec![key.public()], threshold: 1 };
    (file, trust)
}
