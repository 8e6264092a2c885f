//! Raspberry Pi 4/5 images (`bootloader = "rpi-tryboot"`), which cannot
//! boot here: the layout is checked byte by byte against the firmware's
//! documented rules (GPT with FAT partitions of the basic data type,
//! `autoboot.txt` on partition 1 and at most 512 bytes, a whole boot set
//! in each slot's partition), each FAT by `fsck.fat -n` and mtools, and the
//! device's own tryboot back-end (basalt-init) runs against the
//! partitions' files.
//!
//! The Pi's firmware files cannot be fetched here: the tests make
//! stand-ins, and boot Debian's arm64 cloud kernel (ci/setup.sh fetches
//! it), a real arm64 `Image`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use basalt::build::Report;
use basalt::plan::{self, PlanOptions};
use basalt_bundle::config::{
    BootloaderConfig, SlotConfig, BOOTLOADER_CONFIG_PATH, SLOT_CONFIG_PATH,
};
use basalt_bundle::entry::EntryState;
use basalt_bundle::Slot;
use basalt_init::assess::Bootloader;
use basalt_init::backend::Backend;
use basalt_init::tryboot::{Tryboot, TrybootLocation};
use basalt_init::update::agent::UpdateError;
use common::{
    arm64_board_table, assert_gpt, build_plan, ok, root, run, small_recipe, write_toml, Fat, SDE,
};

/// Stand-in firmware: what the firmware files would be, with the device
/// tree's magic, and an overlays folder.
fn firmware(dir: &Path) -> PathBuf {
    let fw = dir.join("rpi-firmware");
    fs::create_dir_all(fw.join("overlays")).unwrap();
    fs::write(fw.join("start4.elf"), b"stand-in start4.elf\x00\x01\x02".repeat(300)).unwrap();
    fs::write(fw.join("fixup4.dat"), b"stand-in fixup4.dat").unwrap();
    let mut dtb = vec![0xd0, 0x0d, 0xfe, 0xed];
    dtb.extend_from_slice(b"stand-in bcm2711-rpi-4-b.dtb");
    fs::write(fw.join("bcm2711-rpi-4-b.dtb"), dtb).unwrap();
    fs::write(fw.join("overlays/disable-bt.dtbo"), b"stand-in overlay").unwrap();
    fs::write(fw.join("overlays/README"), b"overlays").unwrap();
    fw
}

/// boards/rpi4.toml with the stand-in firmware, Debian's arm64 cloud
/// kernel and the modules that kernel has (it has no Pi drivers), written
/// to `dir/rpi4.toml`.
fn board(dir: &Path, fw: &Path) -> PathBuf {
    board_named(dir, fw, "rpi4", &["start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "overlays"])
}

/// boards/`name`.toml made buildable here, as [`board`] does; `names` are
/// the firmware files the real board lists.
fn board_named(dir: &Path, fw: &Path, name: &str, names: &[&str]) -> PathBuf {
    let mut t = arm64_board_table(name);
    let tb = t["tryboot"].as_table_mut().unwrap();
    // The real board names the same files.
    let listed: Vec<String> = tb["firmware"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| Path::new(v.as_str().unwrap()).file_name().unwrap().to_string_lossy().into())
        .collect();
    assert_eq!(listed, names);
    let files = names.iter().map(|n| fw.join(n).display().to_string().into()).collect();
    tb.insert("firmware".into(), toml::Value::Array(files));
    write_toml(dir, &format!("{name}.toml"), &t)
}

/// A small recipe without a kernel of its own (it takes the board's).
fn recipe(dir: &Path, board: &Path) -> PathBuf {
    small_recipe(dir, "pi-test", board)
}

struct Built {
    dir: tempfile::TempDir,
    report: Report,
    plan: basalt::plan::Plan,
    fw: PathBuf,
}

impl Built {
    fn disk(&self) -> PathBuf {
        self.dir.path().join("out/disk.img")
    }

    fn offset(&self, index: u32) -> u64 {
        self.report.partitions.iter().find(|p| p.index == index).unwrap().offset
    }

    /// FAT partition `index`, read by mtools straight from the disk image.
    fn fat(&self, index: u32) -> Fat {
        Fat::at(&self.disk(), self.offset(index))
    }

    /// A file of FAT partition `index`.
    fn mread(&self, index: u32, file: &str) -> Vec<u8> {
        self.fat(index).read(file)
    }

    /// Whether partition `index` has `file`.
    fn has(&self, index: u32, file: &str) -> bool {
        self.fat(index).has(file)
    }

    /// Copies FAT partition `index`'s files into a new folder.
    fn unpack(&self, index: u32, name: &str) -> PathBuf {
        self.fat(index).unpack(&self.dir.path().join(name))
    }
}

fn build_pi(version: &str, key: Option<&Path>) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let fw = firmware(dir.path());
    let board = board(dir.path(), &fw);
    let recipe = recipe(dir.path(), &board);
    let (plan, report) = build_plan(&recipe, version, None, key, &dir.path().join("out"));
    Built { dir, report, plan, fw }
}

#[test]
fn the_layout_follows_the_firmware_rules() {
    let b = build_pi("1.0.0", None);
    let disk = b.disk();

    // GPT, checked by sgdisk; partitions numbered from 1 as boot_partition
    // counts them, the FAT ones typed basic data (the bootloader looks at
    // basic data and EFI system partitions of a GPT disk).
    let want = [
        ("autoboot", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
        ("boot_a", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
        ("boot_b", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
        ("rootfs_a", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
        ("rootfs_b", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
        ("data", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
    ];
    assert_gpt(&disk, &want);
    let p = ok(Command::new("sgdisk").arg("-p").arg(&disk));
    assert!(!p.contains("\n   7 "), "{p}");
    // The protective MBR: one 0xEE entry covering the disk, the signature.
    let mbr = fs::read(&disk).unwrap()[..512].to_vec();
    assert_eq!(mbr[450], 0xee);
    assert_eq!(&mbr[510..], &[0x55, 0xaa]);

    // Each FAT partition passes fsck.fat -n.
    for p in b.report.partitions.iter().filter(|p| p.index <= 3) {
        let img = b.dir.path().join(format!("p{}.img", p.index));
        common::extract(&disk, p.offset, p.size, &img);
        let fsck = run(Command::new("fsck.fat").arg("-n").arg(&img));
        assert!(fsck.status.success(), "p{}: {}", p.index, String::from_utf8_lossy(&fsck.stdout));
    }

    // Partition 1: autoboot.txt only, in the documented form, committing
    // partition 2.
    let autoboot = b.mread(1, "autoboot.txt");
    assert_eq!(
        String::from_utf8(autoboot.clone()).unwrap(),
        "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=2\n"
    );
    assert!(autoboot.len() <= 512);
    assert!(!b.has(1, "config.txt"));

    // Partition 2: the whole boot set of slot a.
    let config = String::from_utf8(b.mread(2, "config.txt")).unwrap();
    let lines: Vec<&str> = config.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            "[all]",
            "arm_64bit=1",
            "kernel=vmlinuz",
            "initramfs initrd followkernel",
            "enable_uart=1"
        ]
    );
    let cmdline = String::from_utf8(b.mread(2, "cmdline.txt")).unwrap();
    assert_eq!(cmdline, "console=serial0,115200 quiet panic=10 basalt.slot=a\n");
    assert_eq!(cmdline, format!("{} basalt.slot=a\n", b.plan.cmdline));
    assert_eq!(b.mread(2, "basalt.txt"), b"image=pi-test\nversion=1.0.0\n");
    let kernel = b.mread(2, "vmlinuz");
    assert_eq!(&kernel[56..60], b"ARM\x64", "an arm64 Image");
    assert_eq!(kernel, basalt::kimage::unpack(fs::read(&b.plan.kernel.vmlinuz).unwrap()).unwrap());
    let initrd = b.mread(2, "initrd");
    assert_eq!(&initrd[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd");
    assert_eq!(initrd.len() as u64, b.report.slot_a.initrd_bytes);
    for (f, src) in [
        ("start4.elf", "start4.elf"),
        ("fixup4.dat", "fixup4.dat"),
        ("bcm2711-rpi-4-b.dtb", "bcm2711-rpi-4-b.dtb"),
        ("overlays/disable-bt.dtbo", "overlays/disable-bt.dtbo"),
        ("overlays/README", "overlays/README"),
    ] {
        for p in [2, 3] {
            assert_eq!(b.mread(p, f), fs::read(b.fw.join(src)).unwrap(), "p{p} {f}");
        }
    }

    // Partition 3: slot b is empty, but boots once an update adds its
    // kernel: the same firmware and config.txt, no kernel, no basalt.txt.
    assert_eq!(b.mread(3, "config.txt"), config.as_bytes());
    for f in ["vmlinuz", "initrd", "cmdline.txt", "basalt.txt"] {
        assert!(!b.has(3, f), "p3 has {f}");
    }
    assert_eq!(b.report.slot_a.entry, "boot_a:/basalt.txt");

    // The device is told its back-end: stage 1 in the initramfs's slot
    // config, stage 2 and the agent in the root filesystem; both choose
    // the tryboot back-end with partitions 2 and 3.
    let cpio = zstd::stream::decode_all(&initrd[..]).unwrap();
    let slot = basalt::inspect::cpio_file(&cpio, SLOT_CONFIG_PATH).unwrap();
    let slot = SlotConfig::from_toml(&String::from_utf8(slot).unwrap()).unwrap();
    let rootfs = b.dir.path().join("rootfs_a.img");
    let a = b.report.partitions.iter().find(|p| p.label == "rootfs_a").unwrap();
    common::extract(&disk, a.offset, a.size, &rootfs);
    let text = ok(Command::new("unsquashfs").arg("-cat").arg(&rootfs).arg(BOOTLOADER_CONFIG_PATH));
    let config = BootloaderConfig::from_toml(&text).unwrap();
    assert_eq!(slot.bootloader, config);
    let p = Path::new("/x");
    let Backend::Tryboot(m) = Backend::from_config(&config, p, p, p, p) else {
        panic!("{config:?}")
    };
    assert_eq!(m.partitions, [2, 3]);

    // `basalt inspect` reads the Pi's layout: slot a's basalt.txt as its
    // entry, committed, and its root verified against its initramfs.
    let info = basalt::inspect::inspect(&disk).unwrap();
    assert_eq!(info.entries.len(), 1);
    let e = &info.entries[0];
    assert_eq!(
        (e.file.as_str(), e.slot, e.state.as_str()),
        ("boot_a:/basalt.txt", Slot::A, "good")
    );
    assert_eq!(info.slots[0].version.as_deref(), Some("1.0.0"));
    assert_eq!(info.slots[0].root_verified, Some(true));
    assert_eq!((info.slots[1].version.as_ref(), info.slots[1].rootfs_present), (None, false));

    // The same inputs give the same bytes.
    let again = build_pi("1.0.0", None);
    assert_eq!(again.report.disk.sha256, b.report.disk.sha256);
}

/// The device's tryboot back-end, run on the partitions' files, finds
/// slot a committed and good, and an install into slot b goes where the
/// firmware looks for it.
#[test]
fn the_device_back_end_reads_the_image() {
    let b = build_pi("1.0.0", None);
    let node = b.dir.path().join("chosen-bootloader");
    fs::create_dir_all(&node).unwrap();
    let boot = |partition: u32, tryboot: bool| {
        fs::write(node.join("partition"), partition.to_be_bytes()).unwrap();
        fs::write(node.join("tryboot"), u32::from(tryboot).to_be_bytes()).unwrap();
    };
    let loc = TrybootLocation {
        config: b.unpack(1, "p1"),
        boot: [b.unpack(2, "p2"), b.unpack(3, "p3")],
        partitions: [2, 3],
        firmware: node.clone(),
    };
    boot(2, false);
    let mut bl = Tryboot::new(loc.clone()).unwrap();
    assert_eq!((bl.booted_slot(), bl.tried()), (Some(Slot::A), false));
    assert_eq!(bl.entry_state(Slot::A).unwrap(), EntryState::Good);
    assert_eq!(bl.mark(Slot::A).unwrap().to_string(), "[all] boot_partition=2");
    let slots = bl.slots().unwrap();
    assert_eq!(slots.len(), 1, "slot b is empty");
    assert_eq!((slots[0].slot, slots[0].version.as_str()), (Slot::A, "1.0.0"));
    // A normal boot's blessing writes nothing.
    let before = fs::read(loc.config.join("autoboot.txt")).unwrap();
    assert!(!bl.bless(Slot::A).unwrap().changed());
    assert_eq!(fs::read(loc.config.join("autoboot.txt")).unwrap(), before);
    // Marking the only good slot bad is refused: nothing else would boot.
    let e = bl.mark_bad(Slot::A).unwrap_err().to_string();
    assert!(e.contains("nothing to boot"), "{e}");
    assert_eq!(bl.reboot_to_try(), Some("0 tryboot"));
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let fw = firmware(dir.path());
    let board = board(dir.path(), &fw);
    let recipe = recipe(dir.path(), &board);
    let opts = PlanOptions {
        source_date_epoch: SDE,
        cache_dir: plan::default_cache_dir(),
        ..Default::default()
    };
    let resolve = || plan::resolve(&recipe, &opts).map(|_| ()).map_err(|e| format!("{e:?}"));

    // A missing firmware file names the file and the key.
    fs::remove_file(fw.join("fixup4.dat")).unwrap();
    let e = resolve().unwrap_err();
    assert!(e.contains("fixup4.dat") && e.contains("does not exist"), "{e}");
    assert!(e.contains("[tryboot] firmware"), "{e}");
    fs::write(fw.join("fixup4.dat"), b"x").unwrap();

    // A firmware file that would replace basalt's own config.txt.
    let text = fs::read_to_string(&board).unwrap();
    let mut t: toml::Table = text.parse().unwrap();
    fs::write(fw.join("config.txt"), b"kernel=other\n").unwrap();
    let list = t["tryboot"]["firmware"].as_array().unwrap().clone();
    let mut list = list;
    list.push(fw.join("config.txt").display().to_string().into());
    t["tryboot"].as_table_mut().unwrap().insert("firmware".into(), toml::Value::Array(list));
    fs::write(&board, toml::to_string(&t).unwrap()).unwrap();
    let plan = plan::resolve(&recipe, &opts).unwrap_or_else(|e| panic!("{e}"));
    let e = basalt::build::build(&plan, None, &dir.path().join("out"), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.txt") && e.contains("[tryboot] config"), "{e}");
    fs::write(&board, &text).unwrap();

    // A kernel of another architecture.
    let amd64 = root().join(".cache/kernel/linux-image-cloud-amd64.deb");
    let r = fs::read_to_string(&recipe).unwrap();
    fs::write(&recipe, format!("{r}\n[kernel]\ndeb = \"{}\"\n", amd64.display())).unwrap();
    let e = resolve().unwrap_err();
    assert!(e.contains("x86_64 kernel") && e.contains("is aarch64"), "{e}");
}

/// The device as the update agent sees it: the Pi's partitions as
/// folders, the root partitions as files, the firmware's device-tree node.
struct PiDevice {
    loc: TrybootLocation,
    roots: [PathBuf; 2],
    /// What the agent asked the next reboot to pass to the firmware.
    armed: std::cell::Cell<Option<&'static str>>,
}

impl PiDevice {
    /// The device a factory image makes: partitions 1 to 3 unpacked, slot
    /// a's root copied, slot b's empty, booted normally from partition 2.
    fn flash(b: &Built) -> PiDevice {
        let node = b.dir.path().join("chosen-bootloader");
        fs::create_dir_all(&node).unwrap();
        let loc = TrybootLocation {
            config: b.unpack(1, "p1"),
            boot: [b.unpack(2, "p2"), b.unpack(3, "p3")],
            partitions: [2, 3],
            firmware: node,
        };
        let roots = [b.dir.path().join("rootfs_a"), b.dir.path().join("rootfs_b")];
        let a = b.report.partitions.iter().find(|p| p.label == "rootfs_a").unwrap();
        common::extract(&b.disk(), a.offset, a.size, &roots[0]);
        fs::File::create(&roots[1]).unwrap().set_len(a.size).unwrap();
        let dev = PiDevice { loc, roots, armed: Default::default() };
        dev.power_on(2, false);
        dev
    }

    /// What the firmware tells the OS: the partition it booted and the
    /// tryboot flag.
    fn power_on(&self, partition: u32, tryboot: bool) {
        fs::write(self.loc.firmware.join("partition"), partition.to_be_bytes()).unwrap();
        fs::write(self.loc.firmware.join("tryboot"), u32::from(tryboot).to_be_bytes()).unwrap();
    }

    fn tryboot(&self) -> Tryboot {
        Tryboot::new(self.loc.clone()).unwrap()
    }
}

impl basalt_init::update::agent::Machine for PiDevice {
    fn booted_slot(&self) -> Option<Slot> {
        self.tryboot().booted_slot()
    }
    fn boot_id(&self) -> String {
        "boot-1".into()
    }
    fn with_bootloader<T>(
        &self,
        f: &mut dyn FnMut(&mut dyn Bootloader) -> Result<T, UpdateError>,
    ) -> Result<T, UpdateError> {
        let mut bl =
            Tryboot::new(self.loc.clone()).map_err(|e| UpdateError::Machine(e.to_string()))?;
        f(&mut bl)
    }
    fn root_device(&self, slot: Slot) -> Result<PathBuf, UpdateError> {
        Ok(self.roots[usize::from(slot == Slot::B)].clone())
    }
    fn now(&self) -> i64 {
        SDE as i64 + 3600
    }
    fn arm_try_reboot(&self, arg: &'static str) -> Result<(), UpdateError> {
        self.armed.set(Some(arg));
        Ok(())
    }
}

/// An update bundle built for rpi4 installs into slot b's boot partition
/// and root partition through the device's tryboot back-end; the firmware
/// then tries partition 3 on a `0 tryboot` reboot, where it is blessed.
/// A device of another board refuses it before writing anything.
#[test]
fn an_rpi4_bundle_installs_into_the_other_boot_partition() {
    use basalt_init::update::agent::Agent;
    use basalt_init::update::state::StateFile;

    let keys = tempfile::tempdir().unwrap();
    let (key_file, trust) = common::fresh_key(keys.path());

    let factory = build_pi("1.0.0", None);
    let update = build_pi("1.1.0", Some(&key_file));
    let bundle = update.dir.path().join("out/update.basalt");
    assert_eq!(update.report.update_bundle.as_ref().unwrap().version, "1.1.0");
    // `basalt bundle DIR` reads the same content back from a Pi image.
    let from_disk = basalt::ota::OsContent::from_output(&update.dir.path().join("out")).unwrap();
    assert_eq!(from_disk.cmdline, update.plan.cmdline);
    assert_eq!(from_disk.board, "rpi4");

    // A qemu-aarch64 device refuses the rpi4 bundle before writing.
    let dev = PiDevice::flash(&factory);
    let mut other = factory.plan.image_config.clone();
    other.board = "qemu-aarch64".into();
    let state = factory.dir.path().join("agent-other");
    let mut agent = Agent::new(dev, other, trust.clone(), StateFile::in_dir(&state));
    let e = agent.install(fs::File::open(&bundle).unwrap()).unwrap_err();
    assert!(e.refused_before_writing(), "{e}");
    assert!(e.to_string().contains("rpi4"), "{e}");
    let dev = agent.machine();
    assert_eq!(dev.armed.get(), None);
    assert!(!dev.loc.boot[1].join("basalt.txt").exists());
    assert!(!dev.loc.boot[1].join("vmlinuz").exists());

    // The Pi takes it: slot b's partition gets the kernel, initramfs,
    // command line and basalt.txt, its root the verity-covered rootfs, and
    // autoboot.txt arms partition 3 for one try.
    let dev = PiDevice::flash(&factory);
    let image = factory.plan.image_config.clone();
    let state = factory.dir.path().join("agent");
    let mut agent = Agent::new(dev, image, trust, StateFile::in_dir(&state));
    let done = agent.install(fs::File::open(&bundle).unwrap()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((done.slot, done.version.as_str()), (Slot::B, "1.1.0"));
    assert_eq!(done.entry, "[tryboot] boot_partition=3");
    let dev = agent.machine();
    let p3 = &dev.loc.boot[1];
    assert_eq!(fs::read(p3.join("vmlinuz")).unwrap(), update.mread(2, "vmlinuz"));
    assert_eq!(fs::read(p3.join("initrd")).unwrap(), update.mread(2, "initrd"));
    assert_eq!(
        fs::read_to_string(p3.join("cmdline.txt")).unwrap(),
        format!("{} basalt.slot=b\n", update.plan.cmdline)
    );
    assert_eq!(
        fs::read_to_string(p3.join("basalt.txt")).unwrap(),
        "image=pi-test\nversion=1.1.0\n"
    );
    // The factory's firmware and config.txt stay as they were.
    assert_eq!(fs::read(p3.join("start4.elf")).unwrap(), factory.mread(3, "start4.elf"));
    assert_eq!(fs::read(p3.join("config.txt")).unwrap(), factory.mread(3, "config.txt"));
    let root_b = fs::read(&dev.roots[1]).unwrap();
    let sq = update.report.slot_a.squashfs_bytes as usize;
    let a = update.report.partitions.iter().find(|p| p.label == "rootfs_a").unwrap();
    let mut want = vec![0u8; sq];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = fs::File::open(update.disk()).unwrap();
        f.seek(SeekFrom::Start(a.offset)).unwrap();
        f.read_exact(&mut want).unwrap();
    }
    assert_eq!(&root_b[..sq], &want[..], "slot b's root is 1.1.0's squashfs");
    assert_eq!(
        fs::read_to_string(dev.loc.config.join("autoboot.txt")).unwrap(),
        "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
    );

    // The agent asked for the reboot that tries it; a plain reset still
    // runs slot a, the `0 tryboot` reboot runs b, whose blessing commits
    // partition 3.
    assert_eq!(dev.armed.get(), Some("0 tryboot"));
    dev.power_on(3, true);
    let mut bl = dev.tryboot();
    assert_eq!((bl.booted_slot(), bl.tried()), (Some(Slot::B), true));
    assert_eq!(bl.entry_state(Slot::B).unwrap(), EntryState::Indeterminate);
    bl.bless(Slot::B).unwrap();
    assert_eq!(
        fs::read_to_string(dev.loc.config.join("autoboot.txt")).unwrap(),
        "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=3\n"
    );
    assert_eq!(bl.entry_state(Slot::A).unwrap(), EntryState::Good);
}

/// The Pi 5 starts from its EEPROM: its slot partitions hold the device
/// tree, the overlays and config.txt, and no start*.elf.
#[test]
fn an_rpi5_image_has_no_start_elf() {
    let dir = tempfile::tempdir().unwrap();
    let fw = firmware(dir.path());
    fs::write(fw.join("bcm2712-rpi-5-b.dtb"), [0xd0, 0x0d, 0xfe, 0xed, 5]).unwrap();
    let board = board_named(dir.path(), &fw, "rpi5", &["bcm2712-rpi-5-b.dtb", "overlays"]);
    let recipe = recipe(dir.path(), &board);
    let opts = PlanOptions {
        source_date_epoch: SDE,
        cache_dir: plan::default_cache_dir(),
        ..Default::default()
    };
    let plan = plan::resolve(&recipe, &opts).unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("out");
    let report =
        basalt::build::build(&plan, None, &out, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.board, "rpi5");
    let b = Built { dir, report, plan, fw };
    for p in [2, 3] {
        assert!(b.has(p, "config.txt") && b.has(p, "bcm2712-rpi-5-b.dtb"), "p{p}");
        assert!(b.has(p, "overlays/disable-bt.dtbo"), "p{p}");
        assert!(!b.has(p, "start4.elf") && !b.has(p, "fixup4.dat"), "p{p}");
    }
    assert!(b.has(2, "vmlinuz") && !b.has(3, "vmlinuz"));
    assert_eq!(
        b.mread(1, "autoboot.txt"),
        b"[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=2\n"
    );
}
