//! U-Boot images (`bootloader = "u-boot"`), which cannot boot here: the
//! layout is judged by the tools that read it (`sgdisk -v`, `fsck.fat -n`,
//! mtools), the environment by `fw_printenv` and `fw_setenv` through an
//! `fw_env.config` naming the disk image at the board's offsets, and the
//! device's own U-Boot back-end (basalt-init) runs on the image's
//! environment and boot partition, through an OTA install.
//!
//! The kernel is Debian's arm64 cloud kernel (ci/setup.sh fetches it), a
//! real arm64 `Image` as `booti` loads it.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use basalt::build::Report;
use basalt::plan::{self, PlanOptions};
use basalt_bundle::config::{
    BootloaderConfig, BootloaderKind, SlotConfig, BOOTLOADER_CONFIG_PATH, SLOT_CONFIG_PATH,
};
use basalt_bundle::entry::EntryState;
use basalt_bundle::uboot::{ALTBOOTCMD, BOOTCMD};
use basalt_bundle::Slot;
use basalt_init::assess::Bootloader;
use basalt_init::backend::Backend;
use basalt_init::uboot::{EnvCopy, EnvLocation, EnvStore, UBoot};
use basalt_init::update::agent::UpdateError;
use common::{
    arm64_board_table, assert_gpt, build_plan, ok, run, small_recipe, write_toml, Fat, SDE,
};

const ENV_OFFSET: u64 = 0x3F8000;
const ENV_OFFSET_REDUND: u64 = 0x3FC000;
const ENV_SIZE: u64 = 0x4000;

/// boards/uboot-arm64.toml with Debian's arm64 cloud kernel and the
/// modules that kernel has, written to `dir/uboot-arm64.toml`; `edit`
/// changes its table first.
fn board(dir: &Path, edit: impl FnOnce(&mut toml::Table)) -> PathBuf {
    let mut t = arm64_board_table("uboot-arm64");
    // The real board's numbers.
    let u = t["uboot"].as_table().unwrap();
    assert_eq!(u["env_offset"].as_integer(), Some(ENV_OFFSET as i64));
    assert_eq!(u["env_offset_redund"].as_integer(), Some(ENV_OFFSET_REDUND as i64));
    assert_eq!(u["env_size"].as_integer(), Some(ENV_SIZE as i64));
    let mut env = toml::Table::new();
    env.insert("kernel_addr_r".into(), "0x40400000".into());
    env.insert("ramdisk_addr_r".into(), "0x48000000".into());
    t["uboot"].as_table_mut().unwrap().insert("env".into(), env.into());
    edit(&mut t);
    write_toml(dir, "uboot-arm64.toml", &t)
}

/// A small recipe without a kernel of its own (it takes the board's).
fn recipe(dir: &Path, board: &Path) -> PathBuf {
    small_recipe(dir, "uboot-test", board)
}

struct Built {
    dir: tempfile::TempDir,
    report: Report,
    plan: basalt::plan::Plan,
}

impl Built {
    fn disk(&self) -> PathBuf {
        self.dir.path().join("out/disk.img")
    }

    fn part(&self, label: &str) -> &basalt::build::PartitionReport {
        self.report.partitions.iter().find(|p| p.label == label).unwrap()
    }

    /// The boot partition, read by mtools straight from the disk image.
    fn boot(&self) -> Fat {
        Fat::at(&self.disk(), self.part("esp").offset)
    }

    /// A file of the boot partition.
    fn mread(&self, file: &str) -> Vec<u8> {
        self.boot().read(file)
    }

    fn has(&self, file: &str) -> bool {
        self.boot().has(file)
    }

    /// The boot partition's files, copied into a new folder.
    fn unpack_boot(&self, name: &str) -> PathBuf {
        self.boot().unpack(&self.dir.path().join(name))
    }
}

fn build(version: &str, key: Option<&Path>) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let board = board(dir.path(), |_| {});
    let recipe = recipe(dir.path(), &board);
    let (plan, report) = build_plan(&recipe, version, None, key, &dir.path().join("out"));
    Built { dir, report, plan }
}

/// An `fw_env.config` naming both copies in `file` at the board's
/// offsets.
fn fw_env_config(dir: &Path, file: &Path) -> PathBuf {
    let config = dir.join("fw_env.config");
    let f = file.display();
    let text =
        format!("{f} {ENV_OFFSET:#x} {ENV_SIZE:#x}\n{f} {ENV_OFFSET_REDUND:#x} {ENV_SIZE:#x}\n");
    fs::write(&config, text).unwrap();
    config
}

fn fw_printenv(config: &Path) -> Vec<(String, String)> {
    ok(Command::new("fw_printenv").arg("-c").arg(config))
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn location(file: &Path) -> EnvLocation {
    let copy = |offset| EnvCopy { path: file.to_path_buf(), offset, size: ENV_SIZE };
    EnvLocation { primary: copy(ENV_OFFSET), redundant: Some(copy(ENV_OFFSET_REDUND)) }
}

fn ours(file: &Path) -> Vec<(String, String)> {
    let (env, _) = EnvStore::new(location(file)).read().unwrap();
    env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    v.sort();
    v
}

#[test]
fn the_layout_and_environment_are_what_uboot_and_fw_printenv_read() {
    let b = build("1.0.0", None);
    let disk = b.disk();

    // GPT, checked by sgdisk, with the partitions after the environment.
    let want = [
        ("esp", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
        ("rootfs_a", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
        ("rootfs_b", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
        ("data", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
    ];
    assert_gpt(&disk, &want);
    assert_eq!(b.report.partitions.len(), 4);
    let first = b.report.partitions.iter().map(|p| p.offset).min().unwrap();
    assert_eq!(first, 4 << 20);
    assert!(ENV_OFFSET_REDUND + ENV_SIZE <= first);

    // The boot partition passes fsck.fat -n and holds slot a's kernel and
    // initramfs, as the ESP layout writes them; slot b is empty.
    let esp = b.part("esp");
    let img = b.dir.path().join("boot.img");
    common::extract(&disk, esp.offset, esp.size, &img);
    let fsck = run(Command::new("fsck.fat").arg("-n").arg(&img));
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    let kernel = b.mread("/a/vmlinuz");
    assert_eq!(&kernel[56..60], b"ARM\x64", "an arm64 Image for booti");
    assert_eq!(kernel, basalt::kimage::unpack(fs::read(&b.plan.kernel.vmlinuz).unwrap()).unwrap());
    let initrd = b.mread("/a/initrd");
    assert_eq!(&initrd[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd");
    assert_eq!(initrd.len() as u64, b.report.slot_a.initrd_bytes);
    assert!(!b.has("/b/vmlinuz") && !b.has("/b/initrd"));
    assert!(!b.has("/EFI") && !b.has("/loader"));
    assert_eq!(b.report.slot_a.entry, "env:basalt_version_a");

    // fw_printenv reads exactly the initial variables from the disk image.
    let config = fw_env_config(b.dir.path(), &disk);
    let args = format!("{} basalt.slot=a", b.plan.cmdline);
    let tries = b.plan.tries.to_string();
    let expect = pairs(&[
        ("altbootcmd", ALTBOOTCMD),
        ("basalt_args_a", &args),
        ("basalt_bootpart", "mmc 0:1"),
        ("basalt_slot", "a"),
        ("basalt_version_a", "1.0.0"),
        ("bootcmd", BOOTCMD),
        ("bootlimit", &tries),
        ("kernel_addr_r", "0x40400000"),
        ("ramdisk_addr_r", "0x48000000"),
    ]);
    assert_eq!(fw_printenv(&config), expect);
    assert_eq!(ours(&disk), expect);
    assert!(args.starts_with("console=ttyAMA0,115200 quiet panic=10"), "{args}");
    // Both copies hold it: with the first one torn, the second is read.
    let torn = b.dir.path().join("torn.img");
    fs::copy(&disk, &torn).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(&torn).unwrap();
        f.seek(SeekFrom::Start(ENV_OFFSET + 100)).unwrap();
        f.write_all(b"torn").unwrap();
    }
    let torn_config = b.dir.path().join("torn");
    fs::create_dir_all(&torn_config).unwrap();
    assert_eq!(fw_printenv(&fw_env_config(&torn_config, &torn)), expect);
    assert_eq!(ours(&torn), expect);

    // fw_setenv writes one variable; our reader reads it, and the
    // partition table is untouched.
    ok(Command::new("fw_setenv")
        .arg("-c")
        .arg(&config)
        .args(["basalt_test", "written by fw_setenv"]));
    let (env, _) = EnvStore::new(location(&disk)).read().unwrap();
    assert_eq!(env.get("basalt_test"), Some("written by fw_setenv"));
    assert_eq!(env.get("basalt_slot"), Some("a"));
    let v = ok(Command::new("sgdisk").arg("-v").arg(&disk));
    assert!(v.contains("No problems found"), "{v}");

    // The device is told its back-end: stage 1 in the initramfs, stage 2
    // and the agent in the root filesystem; both choose U-Boot with the
    // board's environment.
    let cpio = zstd::stream::decode_all(&initrd[..]).unwrap();
    let slot = basalt::inspect::cpio_file(&cpio, SLOT_CONFIG_PATH).unwrap();
    let slot = SlotConfig::from_toml(&String::from_utf8(slot).unwrap()).unwrap();
    let rootfs = b.dir.path().join("rootfs_a.img");
    let a = b.part("rootfs_a");
    common::extract(&disk, a.offset, a.size, &rootfs);
    let text = ok(Command::new("unsquashfs").arg("-cat").arg(&rootfs).arg(BOOTLOADER_CONFIG_PATH));
    let bl: BootloaderConfig = BootloaderConfig::from_toml(&text).unwrap();
    assert_eq!(slot.bootloader, bl);
    assert_eq!(bl.kind, BootloaderKind::UBoot);
    let p = Path::new("/x");
    let Backend::UBoot(boot, Some(env)) = Backend::from_config(&bl, p, p, p, p) else {
        panic!("{bl:?}")
    };
    assert_eq!(boot.mount_point, p);
    assert_eq!(env, location(Path::new("/dev/mmcblk0")));

    // `basalt inspect` reads the slots from the environment: slot a good,
    // its root verified against its initramfs.
    let info = basalt::inspect::inspect(&disk).unwrap();
    assert_eq!(info.entries.len(), 1);
    let e = &info.entries[0];
    assert_eq!(
        (e.file.as_str(), e.slot, e.state.as_str(), e.version.as_str()),
        ("env:basalt_version_a", Slot::A, "good", "1.0.0")
    );
    assert_eq!(info.slots[0].root_verified, Some(true));
    assert_eq!((info.slots[1].version.as_ref(), info.slots[1].rootfs_present), (None, false));

    // The same inputs give the same bytes.
    let again = build("1.0.0", None);
    assert_eq!(again.report.disk.sha256, b.report.disk.sha256);
}

/// The device as the update agent sees it: the card's first 4 MiB (both
/// environment copies) as a file, the boot partition as a folder, the
/// root partitions as files, booted from slot a.
struct UbootDevice {
    card: PathBuf,
    boot: PathBuf,
    roots: [PathBuf; 2],
    booted: Slot,
}

impl UbootDevice {
    fn flash(b: &Built) -> UbootDevice {
        let card = b.dir.path().join("card");
        common::extract(&b.disk(), 0, 4 << 20, &card);
        let boot = b.unpack_boot("boot");
        let roots = [b.dir.path().join("rootfs_a"), b.dir.path().join("rootfs_b")];
        let a = b.part("rootfs_a");
        common::extract(&b.disk(), a.offset, a.size, &roots[0]);
        fs::File::create(&roots[1]).unwrap().set_len(a.size).unwrap();
        UbootDevice { card, boot, roots, booted: Slot::A }
    }

    fn uboot(&self) -> UBoot {
        UBoot::new(location(&self.card), &self.boot, Some(self.booted))
    }
}

impl basalt_init::update::agent::Machine for UbootDevice {
    fn booted_slot(&self) -> Option<Slot> {
        Some(self.booted)
    }
    fn boot_id(&self) -> String {
        "boot-1".into()
    }
    fn with_bootloader<T>(
        &self,
        f: &mut dyn FnMut(&mut dyn Bootloader) -> Result<T, UpdateError>,
    ) -> Result<T, UpdateError> {
        f(&mut self.uboot())
    }
    fn root_device(&self, slot: Slot) -> Result<PathBuf, UpdateError> {
        Ok(self.roots[usize::from(slot == Slot::B)].clone())
    }
    fn now(&self) -> i64 {
        SDE as i64 + 3600
    }
}

/// basalt-init's U-Boot back-end finds slot a selected and good in the
/// image's environment; an update bundle installs into slot b's folder of
/// the boot partition and root partition and puts b on trial
/// (`upgrade_available=1`, `bootcount=0`), as `fw_printenv` reads it.
#[test]
fn the_device_back_end_reads_the_image_and_installs_into_slot_b() {
    use basalt_init::update::agent::Agent;
    use basalt_init::update::state::StateFile;

    let keys = tempfile::tempdir().unwrap();
    let (key_file, trust) = common::fresh_key(keys.path());

    let factory = build("1.0.0", None);
    let update = build("1.1.0", Some(&key_file));
    let bundle = update.dir.path().join("out/update.basalt");
    // `basalt bundle DIR` reads the same content back from a U-Boot image:
    // slot a's files from the boot partition, its command line and tries
    // from the environment.
    let out = update.dir.path().join("out");
    let from_disk = basalt::ota::OsContent::from_output(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(from_disk.cmdline, update.plan.cmdline);
    assert_eq!((from_disk.board.as_str(), from_disk.tries), ("uboot-arm64", update.plan.tries));
    assert_eq!(from_disk.vmlinuz, update.mread("/a/vmlinuz"));
    assert_eq!(from_disk.initrd, update.mread("/a/initrd"));

    let dev = UbootDevice::flash(&factory);
    let mut bl = dev.uboot();
    assert_eq!(bl.entry_state(Slot::A).unwrap(), EntryState::Good);
    assert_eq!(bl.mark(Slot::A).unwrap().to_string(), "basalt_slot=a");
    let slots = bl.slots().unwrap();
    assert_eq!(slots.len(), 1, "slot b is empty");
    assert_eq!((slots[0].slot, slots[0].version.as_str()), (Slot::A, "1.0.0"));
    // A normal boot's blessing writes nothing.
    let before = fs::read(&dev.card).unwrap();
    assert!(!bl.bless(Slot::A).unwrap().changed());
    assert_eq!(fs::read(&dev.card).unwrap(), before);
    let e = bl.mark_bad(Slot::A).unwrap_err().to_string();
    assert!(e.contains("nothing to boot"), "{e}");

    let image = factory.plan.image_config.clone();
    let state = factory.dir.path().join("agent");
    let mut agent = Agent::new(dev, image, trust, StateFile::in_dir(&state));
    let done = agent.install(fs::File::open(&bundle).unwrap()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((done.slot, done.version.as_str()), (Slot::B, "1.1.0"));
    let tries = factory.plan.tries;
    assert_eq!(
        done.entry,
        format!("basalt_slot=b upgrade_available=1 bootcount=0 bootlimit={tries}")
    );
    let dev = agent.machine();
    assert_eq!(fs::read(dev.boot.join("b/vmlinuz")).unwrap(), update.mread("/a/vmlinuz"));
    assert_eq!(fs::read(dev.boot.join("b/initrd")).unwrap(), update.mread("/a/initrd"));
    assert_eq!(fs::read(dev.boot.join("a/vmlinuz")).unwrap(), factory.mread("/a/vmlinuz"));
    let sq = update.report.slot_a.squashfs_bytes as usize;
    let root_b = fs::read(&dev.roots[1]).unwrap();
    let mut want = vec![0u8; sq];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = fs::File::open(update.disk()).unwrap();
        f.seek(SeekFrom::Start(update.part("rootfs_a").offset)).unwrap();
        f.read_exact(&mut want).unwrap();
    }
    assert_eq!(&root_b[..sq], &want[..], "slot b's root is 1.1.0's squashfs");

    // fw_printenv reads the trial from the card.
    let config = fw_env_config(factory.dir.path(), &dev.card);
    let env = fw_printenv(&config);
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("basalt_slot"), Some("b"));
    assert_eq!(get("upgrade_available"), Some("1"));
    assert_eq!(get("bootcount"), Some("0"));
    assert_eq!(get("bootlimit"), Some(tries.to_string().as_str()));
    assert_eq!(get("basalt_version_a"), Some("1.0.0"));
    assert_eq!(get("basalt_version_b"), Some("1.1.0"));
    let args_b = format!("{} basalt.slot=b", update.plan.cmdline);
    assert_eq!(get("basalt_args_b"), Some(args_b.as_str()));
    assert_eq!(get("bootcmd"), Some(BOOTCMD));
    assert_eq!(get("altbootcmd"), Some(ALTBOOTCMD));
    assert_eq!(env, ours(&dev.card));

    // Booted into b on trial, the blessing ends the trial.
    let mut bl = UBoot::new(location(&dev.card), &dev.boot, Some(Slot::B));
    assert_eq!(bl.entry_state(Slot::B).unwrap(), EntryState::Indeterminate);
    bl.bless(Slot::B).unwrap();
    let env = fw_printenv(&config);
    assert!(env.iter().all(|(k, _)| k != "upgrade_available" && k != "bootcount"), "{env:?}");
    assert_eq!(bl.entry_state(Slot::A).unwrap(), EntryState::Good);
    assert_eq!(bl.entry_state(Slot::B).unwrap(), EntryState::Good);
}

#[test]
fn bad_boards_are_clear_errors_at_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PlanOptions {
        source_date_epoch: SDE,
        cache_dir: plan::default_cache_dir(),
        ..Default::default()
    };
    let try_board = |edit: &dyn Fn(&mut toml::Table)| {
        let board = board(dir.path(), |t| edit(t));
        let recipe = recipe(dir.path(), &board);
        plan::resolve(&recipe, &opts).map(|_| ()).map_err(|e| format!("{e}"))
    };
    let set = |key: &'static str, v: i64| {
        move |t: &mut toml::Table| {
            t["uboot"].as_table_mut().unwrap().insert(key.into(), v.into());
        }
    };

    // Overlapping copies.
    let e = try_board(&set("env_offset_redund", 0x3FA000)).unwrap_err();
    assert!(e.contains("overlaps the first") && e.contains("env_offset_redund"), "{e}");
    assert!(e.contains("uboot-arm64.toml:"), "{e}");
    // A size that is not whole sectors.
    let e = try_board(&set("env_size", 0x4100)).unwrap_err();
    assert!(e.contains("env_size") && e.contains("512-byte sectors"), "{e}");
    // A variable basalt owns.
    let e = try_board(&|t: &mut toml::Table| {
        let env = t["uboot"]["env"].as_table().unwrap().clone();
        let mut env = env;
        env.insert("bootcmd".into(), "boot".into());
        t["uboot"].as_table_mut().unwrap().insert("env".into(), env.into());
    })
    .unwrap_err();
    assert!(e.contains("cannot set `bootcmd`"), "{e}");
    // A copy over the partition table.
    let e = try_board(&set("env_offset", 0x1000)).unwrap_err();
    assert!(e.contains("partition table"), "{e}");
    // No [uboot] at all.
    let e = try_board(&|t: &mut toml::Table| {
        t.remove("uboot");
    })
    .unwrap_err();
    assert!(e.contains("needs a [uboot] section"), "{e}");
    // Further from the partition table, the partitions move up.
    try_board(&|t: &mut toml::Table| {
        set("env_offset", 0x400000)(t);
        set("env_offset_redund", 0x404000)(t);
    })
    .unwrap();
}
