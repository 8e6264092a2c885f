//! Test support shared by the update module's tests: OS versions made of
//! pseudo-random files, a disk (ESP folder and partition files) in a temp
//! dir, signed bundles, and a check of what the next boot would run.

#![allow(missing_docs)] // test support, not API

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use basalt_bundle::archive::{compress, write_bundle};
use basalt_bundle::config::VerityParams;
use basalt_bundle::entry::{systemd_boot_pick, BootEntryName, EntryConf, ENTRIES_DIR};
use basalt_bundle::keys::SigningKey;
use basalt_bundle::manifest::{BundleKind, Compression, Manifest, OsInfo, PayloadInfo};
use basalt_bundle::signature::{sign, SignatureFile};
use basalt_bundle::slot::Slot;

use crate::assess::SystemdBoot;
use crate::update::install::{write_slot, InstallError, Payloads};

/// One OS version's files.
pub struct Version {
    pub version: &'static str,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    pub root: Vec<u8>,
}

pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn version(version: &'static str, seed: u64, root_len: usize) -> Version {
    Version {
        version,
        kernel: bytes(seed, 24 << 10),
        initrd: bytes(seed + 1, 8 << 10),
        root: bytes(seed + 2, root_len),
    }
}

pub const ROOT_CAPACITY: u64 = 3 << 20;
pub const CMDLINE: &str = "console=ttyS0";

pub struct Disk {
    _dir: tempfile::TempDir,
    pub esp: PathBuf,
    pub roots: [PathBuf; 2],
}

/// A disk where slot a runs `a` (blessed) and slot b holds `b`, if
/// given, under the entry name `b_entry`.
pub fn factory(a: &Version, b: Option<(&Version, &str)>) -> Disk {
    // tmpfs where there is one: thousands of installs flush thousands
    // of times, which tmpfs makes free.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
    let dir = dir.unwrap();
    let esp = dir.path().join("esp");
    let roots = [dir.path().join("rootfs_a"), dir.path().join("rootfs_b")];
    fs::create_dir_all(esp.join(ENTRIES_DIR)).unwrap();
    let put = |slot: Slot, v: &Version, entry: &str| {
        let conf = EntryConf::for_slot(slot, "img", v.version, CMDLINE);
        fs::write(esp.join(ENTRIES_DIR).join(entry), conf.to_text()).unwrap();
        fs::create_dir_all(esp.join(slot.esp_dir())).unwrap();
        fs::write(esp.join(slot.esp_dir()).join("vmlinuz"), &v.kernel).unwrap();
        fs::write(esp.join(slot.esp_dir()).join("initrd"), &v.initrd).unwrap();
        let root = &roots[usize::from(slot == Slot::B)];
        fs::write(root, &v.root).unwrap();
    };
    put(Slot::A, a, "a.conf");
    if let Some((b, entry)) = b {
        put(Slot::B, b, entry);
    }
    for root in &roots {
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(root);
        f.unwrap().set_len(ROOT_CAPACITY).unwrap();
    }
    Disk { _dir: dir, esp, roots }
}

pub struct Mem<'a> {
    items: Vec<(&'static str, &'a [u8])>,
}

impl Payloads for Mem<'_> {
    fn next_payload(&mut self) -> Result<Option<(String, u64, Box<dyn Read + '_>)>, InstallError> {
        if self.items.is_empty() {
            return Ok(None);
        }
        let (name, data) = self.items.remove(0);
        Ok(Some((name.to_string(), data.len() as u64, Box::new(data))))
    }
}

pub fn payloads(v: &Version) -> Mem<'_> {
    Mem { items: vec![("vmlinuz", &v.kernel), ("initrd", &v.initrd), ("rootfs", &v.root)] }
}

/// The whole install of `v` into slot b, as the agent does it.
pub fn install(disk: &Disk, v: &Version, chunk: usize) -> Result<BootEntryName, InstallError> {
    let mut bl = SystemdBoot::new(&disk.esp, Some(Slot::A));
    write_slot(&mut bl, Slot::B, &disk.roots[1], &mut payloads(v), chunk)?;
    let conf = EntryConf::for_slot(Slot::B, "img", v.version, CMDLINE);
    bl.prefer_for_one_try(Slot::B, &conf, 3)
}

/// What the next boot runs: the slot systemd-boot picks, checked file
/// by file against the version its entry names.
pub fn next_boot<'v>(disk: &Disk, known: &[&'v Version]) -> Result<&'v Version, String> {
    let bl = SystemdBoot::new(&disk.esp, None);
    let entries = bl.entries().map_err(|e| e.to_string())?;
    let versions: Vec<(BootEntryName, String)> =
        entries.iter().map(|(n, c)| (*n, c.version.clone())).collect();
    let pick = systemd_boot_pick(&versions).ok_or("no boot entry at all")?;
    let (_, conf) = entries.iter().find(|(n, _)| n == pick).ok_or("entry vanished")?;
    let v = known
        .iter()
        .find(|v| v.version == conf.version)
        .ok_or(format!("entry {pick} names unknown version {}", conf.version))?;
    let slot = pick.slot;
    let expected = EntryConf::for_slot(slot, "img", v.version, CMDLINE);
    if *conf != expected {
        return Err(format!("entry {pick} is not the entry of {}: {conf:?}", v.version));
    }
    let dir = disk.esp.join(slot.esp_dir());
    let kernel = fs::read(dir.join("vmlinuz")).map_err(|e| format!("{pick}: kernel: {e}"))?;
    let initrd = fs::read(dir.join("initrd")).map_err(|e| format!("{pick}: initrd: {e}"))?;
    let root = fs::read(&disk.roots[usize::from(slot == Slot::B)]).unwrap();
    if kernel != v.kernel || initrd != v.initrd || !root.starts_with(&v.root) {
        return Err(format!("{pick} boots {} with files of another version", v.version));
    }
    Ok(v)
}

/// A signed OS bundle of `v` for `board`.
pub fn bundle(v: &Version, board: &str, keys: &[&SigningKey]) -> Vec<u8> {
    let verity = VerityParams {
        root_hash: "ab".repeat(32),
        salt: "cd".repeat(32),
        algorithm: "sha256".into(),
        data_block_size: 4096,
        hash_block_size: 4096,
        data_blocks: 1,
        hash_offset: 4096,
    };
    let manifest = Manifest {
        format: 1,
        kind: BundleKind::Os,
        name: "img".into(),
        version: v.version.parse().unwrap(),
        compatible: vec![board.to_string()],
        created: basalt_bundle::civil::unix_to_datetime(1_700_000_000),
        os: Some(OsInfo { cmdline: CMDLINE.into(), tries: 3 }),
        payloads: vec![
            PayloadInfo::describe("vmlinuz", &v.kernel, Compression::Zstd, None),
            PayloadInfo::describe("initrd", &v.initrd, Compression::Zstd, None),
            PayloadInfo::describe("rootfs", &v.root, Compression::Zstd, Some(verity)),
        ],
    };
    let text = manifest.to_toml();
    let mut sigs = SignatureFile::default();
    for k in keys {
        sigs.add(sign(text.as_bytes(), k));
    }
    let sig = sigs.to_toml().unwrap();
    let z = |d: &[u8]| compress(d, 3).unwrap();
    let (k, i, r) = (z(&v.kernel), z(&v.initrd), z(&v.root));
    let payloads: [(&str, &[u8]); 3] = [("vmlinuz", &k), ("initrd", &i), ("rootfs", &r)];
    write_bundle(Vec::new(), text.as_bytes(), sig.as_bytes(), &payloads, 1_700_000_000).unwrap()
}

/// The image configuration of a test device: `version` of image `img`
/// for `board`, with nothing else set.
pub fn image_config(version: &str, board: &str) -> basalt_bundle::config::ImageConfig {
    use basalt_bundle::config::{BootConfig, ImageConfig, NetworkConfig};
    ImageConfig {
        name: "img".into(),
        version: version.into(),
        board: board.into(),
        hostname: "h".into(),
        modules: Vec::new(),
        network: NetworkConfig::default(),
        update: None,
        boot: BootConfig { bless_after_ms: 1, bless_deadline_ms: 2, stop_timeout_ms: 3 },
        services: Vec::new(),
    }
}
