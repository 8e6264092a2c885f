//! `basalt inspect`: what a disk image holds, read back from the image
//! itself (partition table, ESP, boot entries, each slot's initramfs, and
//! the model bundles baked into each slot's root filesystem).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use basalt_bundle::config::{SlotConfig, SLOT_CONFIG_PATH};
use basalt_bundle::entry::{BootEntryName, EntryConf, EntryState, ENTRIES_DIR};
use basalt_bundle::layout::{ESP_LABEL, RPI_AUTOBOOT_LABEL};
use basalt_bundle::tryboot::{Autoboot, SlotTxt, AUTOBOOT, INITRD_FILE, SLOT_TXT};
use basalt_bundle::Slot;
use serde::Serialize;

use crate::plan::MODELS_DIR;
use crate::{fat, gpt};

/// Why an image could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The partition table is unreadable.
    #[error("{0}")]
    Gpt(#[from] gpt::GptError),
    /// The ESP is unreadable.
    #[error("the ESP: {0}")]
    Fat(#[from] fat::FatError),
    /// The image is not a basalt image.
    #[error("{0}")]
    NotBasalt(String),
}

/// What an image holds.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// Disk GUID.
    pub disk_guid: String,
    /// Partitions.
    pub partitions: Vec<PartInfo>,
    /// Boot entries on the ESP.
    pub entries: Vec<EntryInfo>,
    /// What each slot holds.
    pub slots: Vec<SlotInfo>,
}

/// One partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartInfo {
    /// Number.
    pub index: u32,
    /// PARTLABEL.
    pub label: String,
    /// Type GUID.
    pub type_guid: String,
    /// Byte offset.
    pub offset: u64,
    /// Byte size.
    pub size: u64,
}

/// One boot entry.
#[derive(Debug, Clone, Serialize)]
pub struct EntryInfo {
    /// File name.
    pub file: String,
    /// Slot it boots.
    pub slot: Slot,
    /// `good`, `trying` or `bad`.
    pub state: String,
    /// Tries left, if on trial.
    pub tries_left: Option<u32>,
    /// Tries used, if on trial.
    pub tries_done: Option<u32>,
    /// The version the entry says it boots.
    pub version: String,
}

/// One slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotInfo {
    /// The slot.
    pub slot: Slot,
    /// Image name and version from the slot's initramfs, if it has one.
    pub image: Option<String>,
    /// Version.
    pub version: Option<String>,
    /// Verity root hash.
    pub root_hash: Option<String>,
    /// Whether the root partition holds a squashfs.
    pub rootfs_present: bool,
    /// Whether the root filesystem matches the root hash of the slot's
    /// initramfs (its dm-verity tree recomputed here); `None` when either
    /// is missing. A slot whose install was cut, or whose partition was
    /// modified, does not match.
    pub root_verified: Option<bool>,
    /// The model bundles baked into the root filesystem
    /// (`/usr/share/basalt/models`), by file name.
    pub models: Vec<ModelInfo>,
    /// Why the root filesystem could not be read for its models, if so.
    pub models_problem: Option<String>,
}

/// A model bundle baked into a slot, as its manifest says (its signatures
/// are listed, not checked: the device checks them against its keys).
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The bundle's path in the root filesystem.
    pub path: String,
    /// The model's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The ids of the keys that signed it.
    pub signed_by: Vec<String>,
    /// The bundle's size in bytes.
    pub size: u64,
}

/// The filesystem data of a root partition at `offset` of `disk`, if it
/// matches `verity` (the dm-verity tree over it recomputed, its root hash
/// compared); `Ok(None)` when it does not match.
fn verified_root(
    f: &mut File,
    disk: &Path,
    offset: u64,
    size: u64,
    verity: &basalt_bundle::config::VerityParams,
) -> Result<Option<Vec<u8>>, InspectError> {
    let len = verity.data_blocks.saturating_mul(u64::from(verity.data_block_size));
    let salt: Option<[u8; 32]> = hex::decode(&verity.salt).ok().and_then(|s| s.try_into().ok());
    let (Some(salt), true) = (salt, len > 0 && len <= size) else { return Ok(None) };
    let data = read_at(f, disk, offset, len as usize)?;
    let matches = crate::verity::build_verity(&data, &salt, [0; 16])
        .is_ok_and(|v| v.params.root_hash == verity.root_hash);
    Ok(matches.then_some(data))
}

/// The model bundles in `squashfs`, a verified root filesystem.
fn baked_models(squashfs: Vec<u8>) -> Result<Vec<ModelInfo>, String> {
    use backhand::{FilesystemReader, InnerNode};
    let fs = FilesystemReader::from_reader(std::io::Cursor::new(squashfs))
        .map_err(|e| format!("the root filesystem: {e}"))?;
    let dir = Path::new(MODELS_DIR).strip_prefix("/").unwrap_or(Path::new(MODELS_DIR));
    let mut out = Vec::new();
    for node in fs.files() {
        let InnerNode::File(file) = &node.inner else { continue };
        let path = node.fullpath.strip_prefix("/").unwrap_or(&node.fullpath);
        if path.parent() != Some(dir) || path.extension().is_none_or(|x| x != "basalt") {
            continue;
        }
        let shown = format!("/{}", path.display());
        let (_, manifest, signatures) = basalt_bundle::archive::peek(fs.file(file).reader())
            .map_err(|e| format!("{shown}: {e}"))?;
        out.push(ModelInfo {
            path: shown,
            name: manifest.name,
            version: manifest.version.to_string(),
            signed_by: signatures.signatures.into_iter().map(|s| s.key_id).collect(),
            size: file.file_len() as u64,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Reads one file out of a newc cpio archive.
pub fn cpio_file(archive: &[u8], want: &str) -> Option<Vec<u8>> {
    let want = want.trim_start_matches('/');
    let mut at = 0usize;
    let field = |a: &[u8], i: usize| -> Option<usize> {
        usize::from_str_radix(std::str::from_utf8(a.get(i..i + 8)?).ok()?, 16).ok()
    };
    loop {
        let h = archive.get(at..at + 110)?;
        if &h[..6] != b"070701" {
            return None;
        }
        let size = field(h, 54)?;
        let namesize = field(h, 94)?;
        let name = archive.get(at + 110..at + 110 + namesize.checked_sub(1)?)?;
        let data_start = (at + 110 + namesize).div_ceil(4) * 4;
        if name == b"TRAILER!!!" {
            return None;
        }
        if name == want.as_bytes() {
            return archive.get(data_start..data_start + size).map(<[u8]>::to_vec);
        }
        at = (data_start + size).div_ceil(4) * 4;
    }
}

/// Reads `len` bytes of `f` at `offset`.
pub fn read_at(
    f: &mut File,
    path: &Path,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, InspectError> {
    let err = |source| InspectError::Read { path: path.to_path_buf(), source };
    f.seek(SeekFrom::Start(offset)).map_err(err)?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).map_err(err)?;
    Ok(buf)
}

/// Inspects a disk image.
pub fn inspect(disk: &Path) -> Result<ImageInfo, InspectError> {
    let mut f =
        File::open(disk).map_err(|source| InspectError::Read { path: disk.into(), source })?;
    let (guid, parts) = gpt::read(&mut f)?;
    // A Raspberry Pi image keeps each slot's files in its own boot
    // partition and selects them in `autoboot.txt`; every other image has
    // them on the ESP with one boot entry per slot.
    if parts.iter().any(|p| p.label == RPI_AUTOBOOT_LABEL) {
        let mut fat_of = |label: &str| -> Result<Option<Vec<u8>>, InspectError> {
            match parts.iter().find(|p| p.label == label) {
                Some(p) => Ok(Some(read_at(&mut f, disk, p.offset, p.size as usize)?)),
                None => Ok(None),
            }
        };
        let autoboot = fat_of(RPI_AUTOBOOT_LABEL)?.unwrap_or_default();
        let autoboot = fat::FatReader::new(&autoboot)?
            .read_file(AUTOBOOT)
            .ok()
            .and_then(|t| Autoboot::parse(&String::from_utf8_lossy(&t)).ok());
        let (mut entries, mut initrds) = (Vec::new(), Vec::new());
        for slot in Slot::ALL {
            let bytes = fat_of(slot.rpi_boot_partlabel())?.unwrap_or_default();
            let Ok(reader) = fat::FatReader::new(&bytes) else {
                initrds.push(None);
                continue;
            };
            initrds.push(reader.read_file(INITRD_FILE).ok());
            let txt = reader
                .read_file(SLOT_TXT)
                .ok()
                .and_then(|t| SlotTxt::parse(&String::from_utf8_lossy(&t)));
            let (Some(txt), Some(a)) = (txt, autoboot) else { continue };
            let n = crate::rpi::boot_partition(slot);
            let state = if txt.bad {
                "bad"
            } else if a.all != n && a.tryboot == n {
                "trying"
            } else {
                "good"
            };
            entries.push(EntryInfo {
                file: format!("{}:/{SLOT_TXT}", slot.rpi_boot_partlabel()),
                slot,
                state: state.to_string(),
                tries_left: None,
                tries_done: None,
                version: txt.version,
            });
        }
        let slots = slot_infos(&mut f, disk, &parts, |slot| {
            initrds.get(usize::from(slot == Slot::B)).cloned().flatten()
        })?;
        return Ok(image_info(guid, &parts, entries, slots));
    }
    let esp = parts.iter().find(|p| p.label == ESP_LABEL).ok_or_else(|| {
        InspectError::NotBasalt(format!(
            "{} has no partition labelled `{ESP_LABEL}`: not a basalt image",
            disk.display()
        ))
    })?;
    let esp_bytes = read_at(&mut f, disk, esp.offset, esp.size as usize)?;
    let reader = fat::FatReader::new(&esp_bytes)?;
    let mut entries = Vec::new();
    for e in reader.list_dir(ENTRIES_DIR).unwrap_or_default() {
        let Some(name) = BootEntryName::parse(&e.name) else { continue };
        let conf = reader
            .read_file(&format!("{ENTRIES_DIR}/{}", e.name))
            .ok()
            .and_then(|b| EntryConf::parse(&String::from_utf8_lossy(&b)));
        entries.push(EntryInfo {
            file: e.name.clone(),
            slot: name.slot,
            state: match name.state() {
                EntryState::Good => "good",
                EntryState::Indeterminate => "trying",
                EntryState::Bad => "bad",
            }
            .to_string(),
            tries_left: name.counter.map(|c| c.tries_left()),
            tries_done: name.counter.map(|c| c.tries_done()),
            version: conf.map(|c| c.version).unwrap_or_default(),
        });
    }
    // A U-Boot image has no entries: its slots are described in the
    // environment, whose place each slot's initramfs carries.
    let uboot_env = Slot::ALL
        .iter()
        .filter_map(|slot| reader.read_file(&format!("{}/initrd", slot.esp_dir())).ok())
        .filter_map(|z| zstd::stream::decode_all(&z[..]).ok())
        .filter_map(|cpio| cpio_file(&cpio, SLOT_CONFIG_PATH))
        .filter_map(|t| SlotConfig::from_toml(&String::from_utf8_lossy(&t)).ok())
        .find_map(|c| c.bootloader.uboot_env);
    if let Some(u) = uboot_env {
        entries.extend(uboot_entries(&mut f, disk, &u)?);
    }
    let slots = slot_infos(&mut f, disk, &parts, |slot| {
        reader.read_file(&format!("{}/initrd", slot.esp_dir())).ok()
    })?;
    Ok(image_info(guid, &parts, entries, slots))
}

/// Each installed slot of a U-Boot image, from the environment U-Boot
/// would load (of the copies with a valid CRC, the newer): selected and
/// on trial (`trying`, with `bootlimit` and `bootcount`), `bad`, or
/// `good`. Named `env:basalt_version_<slot>`, as the build report names
/// them.
fn uboot_entries(
    f: &mut File,
    disk: &Path,
    u: &basalt_bundle::config::UbootEnvConfig,
) -> Result<Vec<EntryInfo>, InspectError> {
    use basalt_bundle::uboot::{self, Env};
    let mut best: Option<(u8, Env)> = None;
    for at in [u.offset, u.offset_redund] {
        let block = read_at(f, disk, at, u.size as usize)?;
        if let Ok((flag, Some(env))) = Env::from_block(&block, true) {
            if best.as_ref().is_none_or(|(b, _)| uboot::flag_newer(flag, *b)) {
                best = Some((flag, env));
            }
        }
    }
    let Some((_, env)) = best else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for slot in Slot::ALL {
        let Some(version) = env.get(&uboot::version_var(slot)) else { continue };
        let selected = env.get(uboot::SLOT_VAR) == Some(slot.name());
        let trial = selected && env.get_ulong(uboot::UPGRADE_AVAILABLE, 0) != 0;
        let (limit, count) =
            (env.get_ulong(uboot::BOOTLIMIT, 0), env.get_ulong(uboot::BOOTCOUNT, 0));
        let state = if env.get(&uboot::bad_var(slot)).is_some() {
            "bad"
        } else if trial {
            "trying"
        } else {
            "good"
        };
        let narrow = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        out.push(EntryInfo {
            file: format!("env:{}", uboot::version_var(slot)),
            slot,
            state: state.to_string(),
            tries_left: trial.then(|| narrow(limit.saturating_sub(count))),
            tries_done: trial.then(|| narrow(count)),
            version: version.to_string(),
        });
    }
    Ok(out)
}

/// What each slot holds: its initramfs (from `initrd_of`) says the image,
/// version and root hash, which its root partition is checked against.
fn slot_infos(
    f: &mut File,
    disk: &Path,
    parts: &[gpt::PlacedPartition],
    initrd_of: impl Fn(Slot) -> Option<Vec<u8>>,
) -> Result<Vec<SlotInfo>, InspectError> {
    let mut slots = Vec::new();
    for slot in Slot::ALL {
        let cfg = initrd_of(slot)
            .and_then(|z| zstd::stream::decode_all(&z[..]).ok())
            .and_then(|cpio| cpio_file(&cpio, SLOT_CONFIG_PATH))
            .and_then(|t| SlotConfig::from_toml(&String::from_utf8_lossy(&t)).ok());
        let root = parts.iter().find(|p| p.label == slot.root_partlabel());
        let rootfs_present = match root {
            Some(p) => read_at(f, disk, p.offset, 4)? == b"hsqs",
            None => false,
        };
        // The models are read only from a root that matches its root
        // hash: a cut install leaves a squashfs header over garbage.
        let root_data = match (root.filter(|_| rootfs_present), &cfg) {
            (Some(p), Some(c)) => Some(verified_root(f, disk, p.offset, p.size, &c.verity)?),
            _ => None,
        };
        let root_verified = root_data.as_ref().map(Option::is_some);
        let (models, models_problem) = match root_data {
            Some(Some(data)) => match baked_models(data) {
                Ok(m) => (m, None),
                Err(e) => (Vec::new(), Some(e)),
            },
            _ => (Vec::new(), None),
        };
        slots.push(SlotInfo {
            slot,
            image: cfg.as_ref().map(|c| c.image.clone()),
            version: cfg.as_ref().map(|c| c.version.clone()),
            root_hash: cfg.as_ref().map(|c| c.verity.root_hash.clone()),
            rootfs_present,
            root_verified,
            models,
            models_problem,
        });
    }
    Ok(slots)
}

fn image_info(
    guid: basalt_bundle::Guid,
    parts: &[gpt::PlacedPartition],
    entries: Vec<EntryInfo>,
    slots: Vec<SlotInfo>,
) -> ImageInfo {
    ImageInfo {
        disk_guid: guid.to_string(),
        partitions: parts
            .iter()
            .map(|p| PartInfo {
                index: p.index,
                label: p.label.clone(),
                type_guid: p.type_guid.to_string(),
                offset: p.offset,
                size: p.size,
            })
            .collect(),
        entries,
        slots,
    }
}

impl ImageInfo {
    /// A human-readable summary.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "disk {}", self.disk_guid);
        let _ = writeln!(s, "partitions:");
        for p in &self.partitions {
            let _ = writeln!(
                s,
                "  {} {:<9} offset {:>6} MiB  size {:>6} MiB  type {}",
                p.index,
                p.label,
                p.offset >> 20,
                p.size >> 20,
                p.type_guid
            );
        }
        let _ = writeln!(s, "boot entries:");
        if self.entries.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        for e in &self.entries {
            let tries = match (e.tries_left, e.tries_done) {
                (Some(l), Some(d)) => format!(" ({l} tries left, {d} used)"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  {:<12} slot {} version {} {}{}",
                e.file, e.slot, e.version, e.state, tries
            );
        }
        let _ = writeln!(s, "slots:");
        for sl in &self.slots {
            match (&sl.image, &sl.version, &sl.root_hash) {
                (Some(i), Some(v), Some(h)) => {
                    let root = match (sl.rootfs_present, sl.root_verified) {
                        (false, _) => " (root partition EMPTY)",
                        (true, Some(false)) => {
                            " (root partition DOES NOT MATCH it: an install was cut, or the \
                             partition was modified; the device will not boot this slot)"
                        }
                        (true, _) => ", root verified",
                    };
                    let _ = writeln!(s, "  {}: {i} {v}, root hash {h}{root}", sl.slot);
                }
                _ => {
                    let _ = writeln!(s, "  {}: empty", sl.slot);
                }
            }
            for m in &sl.models {
                let _ = writeln!(
                    s,
                    "     model {} {} ({}, {} bytes, signed by {})",
                    m.name,
                    m.version,
                    m.path,
                    m.size,
                    if m.signed_by.is_empty() { "nobody".into() } else { m.signed_by.join(", ") }
                );
            }
            if let Some(p) = &sl.models_problem {
                let _ = writeln!(s, "     models: cannot list them: {p}");
            }
        }
        s
    }
}
