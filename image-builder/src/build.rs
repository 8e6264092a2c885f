//! Turning a [`Plan`] into artifacts: the disk image, its report, its
//! `.bmap` and its SBOM.
//!
//! Order matters: the squashfs comes first, then its verity tree, whose
//! root hash goes into the initramfs, which goes onto the ESP, which goes
//! into the disk. Everything is written into a temporary folder beside the
//! output and renamed at the end, so a failed build leaves nothing behind.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use basalt_bundle::config::{SlotConfig, VerityParams, SLOT_CONFIG_PATH};
use basalt_bundle::entry::{BootEntryName, EntryConf, ENTRIES_DIR};
use basalt_bundle::layout::{self, Arch};
use basalt_bundle::{Guid, Slot};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::gpt::{DiskLayout, PartitionSpec};
use crate::plan::Plan;
use crate::tree::{Meta, NodeKind, Origin, Tree};
use crate::{bmap, cpio, ext4, fat, gpt, sbom, squashfs, verity};

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The squashfs could not be written.
    #[error(transparent)]
    Squashfs(#[from] squashfs::SquashfsError),
    /// The verity tree could not be built.
    #[error(transparent)]
    Verity(#[from] verity::VerityError),
    /// The initramfs could not be written.
    #[error(transparent)]
    Cpio(#[from] cpio::CpioError),
    /// The ESP could not be written.
    #[error("the ESP: {0}")]
    Fat(#[from] fat::FatError),
    /// A FAT partition other than the ESP could not be written.
    #[error("the {label} partition: {source}")]
    FatPartition {
        /// Its PARTLABEL.
        label: String,
        /// Why.
        source: fat::FatError,
    },
    /// A Raspberry Pi boot partition could not be filled.
    #[error(transparent)]
    Rpi(#[from] crate::rpi::RpiError),
    /// The U-Boot environment could not be written.
    #[error(transparent)]
    Uboot(#[from] crate::uboot::UbootError),
    /// The partition table could not be written.
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    /// The data partition could not be made.
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    /// The bmap could not be written.
    #[error(transparent)]
    Bmap(#[from] bmap::BmapError),
    /// The update bundle could not be written.
    #[error("the update bundle: {0}")]
    Ota(String),
    /// A root filesystem does not fit its slot.
    #[error("the root filesystem needs {needed_mib} MiB (squashfs and hash tree) but a slot has {have_mib} MiB; raise [disk] root_mib in {board}")]
    RootTooBig {
        /// MiB needed.
        needed_mib: u64,
        /// MiB available.
        have_mib: u64,
        /// The board file.
        board: String,
    },
    /// A module file could not be read or is malformed.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    /// The initramfs tree is inconsistent.
    #[error("initramfs: {0}")]
    Tree(#[from] crate::tree::TreeError),
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The two slots were planned for different boards.
    #[error("slot a is for board {a} but slot b for {b}; build both for the same board")]
    SlotBBoard {
        /// Slot a's board.
        a: String,
        /// Slot b's board.
        b: String,
    },
    /// The output folder exists and is not a previous build.
    #[error("refusing to replace {0}: it exists and is not a basalt output folder (no report.json); choose another --out or remove it")]
    ForeignOutput(PathBuf),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |source| BuildError::Io { what, path: path.to_path_buf(), source }
}

/// One slot's content: what goes into its root partition and onto the ESP.
#[derive(Debug, Clone)]
pub struct SlotArtifacts {
    /// The squashfs image, padded to 4 KiB.
    pub squashfs: Vec<u8>,
    /// The verity superblock and tree, to write right after the squashfs.
    pub hash_area: Vec<u8>,
    /// Verity parameters (root hash, offsets).
    pub verity: VerityParams,
    /// The compressed initramfs.
    pub initrd: Vec<u8>,
    /// The initramfs tree (for the SBOM).
    pub initrd_tree: Tree,
    /// The kernel image.
    pub vmlinuz: Arc<Vec<u8>>,
}

impl SlotArtifacts {
    /// Bytes the slot's root partition must hold.
    pub fn root_bytes(&self) -> u64 {
        (self.squashfs.len() + self.hash_area.len()) as u64
    }
}

/// Builds the root filesystem, its verity tree and the matching initramfs.
pub fn build_slot(plan: &Plan) -> Result<SlotArtifacts, BuildError> {
    let sde = plan.source_date_epoch;
    let identity = plan.identity();
    let squashfs = squashfs::write_squashfs(&plan.rootfs, sde)?;
    let salt: [u8; 32] = Sha256::digest(format!("verity salt\0{identity}").as_bytes()).into();
    let uuid = *Guid::derived("verity", &identity).as_bytes();
    let v = verity::build_verity(&squashfs, &salt, uuid)?;

    let mut tree = Tree::new(Meta::root(0o755, sde));
    let init = fs::read(&plan.init_binary).map_err(io("cannot read", &plan.init_binary))?;
    tree.add_file("/init", init, Meta::root(0o755, sde), Origin::Build)?;
    for d in ["/proc", "/sys", "/dev", "/newroot"] {
        tree.add_dir(d, Meta::root(0o755, sde), Origin::Build)?;
    }
    let mut modules = Vec::new();
    for m in &plan.stage1_modules {
        let bytes = plan.kernel.read_module(&m.rel_path, plan.module_signatures)?;
        let path = format!("/lib/modules/{}/{}", plan.kernel.release, m.rel_path.display());
        tree.add_file(
            &path,
            bytes,
            Meta::root(0o644, sde),
            Origin::Kernel(plan.kernel.origin.clone()),
        )?;
        modules.push(path);
    }
    let slot_config = SlotConfig {
        image: plan.name.clone(),
        version: plan.version.to_string(),
        kernel_release: plan.kernel.release.clone(),
        modules,
        root_wait_ms: plan.board.root_wait.as_millis(),
        verity: v.params.clone(),
        root_fstype: "squashfs".into(),
        data_fstype: "ext4".into(),
        bootloader: plan.board.bootloader_config(),
    };
    tree.add_file(
        SLOT_CONFIG_PATH,
        slot_config.to_toml().into_bytes(),
        Meta::root(0o644, sde),
        Origin::Build,
    )?;
    let cpio = cpio::write_newc(&tree)?;
    let initrd = zstd::bulk::compress(&cpio, 9)
        .map_err(io("cannot compress the initramfs", Path::new("initrd")))?;
    let vmlinuz =
        fs::read(&plan.kernel.vmlinuz).map_err(io("cannot read", &plan.kernel.vmlinuz))?;
    // UEFI loads a PE image: a gzip-compressed arm64 kernel (as some
    // distributions ship it for GRUB) is stored unpacked.
    let vmlinuz = crate::kimage::unpack(vmlinuz)
        .map_err(io("cannot unpack the kernel image", &plan.kernel.vmlinuz))?;
    Ok(SlotArtifacts {
        squashfs,
        hash_area: v.hash_area,
        verity: v.params,
        initrd,
        initrd_tree: tree,
        vmlinuz: Arc::new(vmlinuz),
    })
}

/// What `report.json` says about a build.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// Board name.
    pub board: String,
    /// Architecture.
    pub arch: String,
    /// Kernel release.
    pub kernel_release: String,
    /// `stripped` or `kept`: the signatures appended to module files.
    pub module_signatures: String,
    /// Timestamp of every file in the image.
    pub source_date_epoch: u64,
    /// The disk image.
    pub disk: DiskReport,
    /// Partitions in table order.
    pub partitions: Vec<PartitionReport>,
    /// Slot `a` (the factory slot).
    pub slot_a: SlotReport,
    /// Slot `b`, when the build filled it too.
    pub slot_b: Option<SlotReport>,
    /// Size of the root filesystem.
    pub rootfs: RootfsReport,
    /// The QEMU machine `basalt run` boots this image in, if the board
    /// has one.
    pub machine: Option<crate::qemu::MachineSpec>,
    /// The signed OTA bundle of slot a's image, when the build had a
    /// signing key.
    pub update_bundle: Option<crate::ota::BundleSummary>,
    /// A U-Boot image's environment: both copies' offsets in `disk.img`
    /// and their size (`device` is where the board keeps them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uboot_env: Option<basalt_bundle::config::UbootEnvConfig>,
    /// Wall time of each build step, in milliseconds.
    pub timings_ms: Vec<(String, u64)>,
}

/// The disk file.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// File name inside the output folder.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the whole file.
    pub sha256: String,
    /// Disk GUID.
    pub guid: String,
}

/// One partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    /// Number, from 1.
    pub index: u32,
    /// PARTLABEL.
    pub label: String,
    /// Type GUID.
    pub type_guid: String,
    /// Unique GUID.
    pub guid: String,
    /// Byte offset.
    pub offset: u64,
    /// Byte size.
    pub size: u64,
}

/// A filled root slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotReport {
    /// Image version in the slot.
    pub version: String,
    /// Boot entry file name on the ESP.
    pub entry: String,
    /// Bytes of squashfs data (the verity data area).
    pub squashfs_bytes: u64,
    /// Bytes of verity superblock and tree.
    pub hash_tree_bytes: u64,
    /// Bytes of the compressed initramfs.
    pub initrd_bytes: u64,
    /// Verity parameters.
    pub verity: VerityParams,
}

/// What the root filesystem holds.
#[derive(Debug, Clone, Serialize)]
pub struct RootfsReport {
    /// Entries (files, dirs, links).
    pub entries: usize,
    /// Bytes of file content.
    pub file_bytes: u64,
    /// File bytes that are kernel modules.
    pub module_bytes: u64,
    /// File bytes minus kernel modules: the OS's own overhead.
    pub os_overhead_bytes: u64,
}

/// Writes `data` into `file` at `offset`: every byte up to the last
/// non-zero 4 KiB block, zeros included, so the `.bmap` maps them (a FAT's
/// free-cluster table and a verity-covered filesystem must read back
/// exactly even when the image is flashed over a used card). Only the
/// all-zero tail, free space, stays a hole.
pub fn write_part(file: &mut fs::File, offset: u64, data: &[u8]) -> std::io::Result<()> {
    const BLOCK: usize = 4096;
    let used = data
        .chunks(BLOCK)
        .rposition(|c| c.iter().any(|b| *b != 0))
        .map_or(0, |i| ((i + 1) * BLOCK).min(data.len()));
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&data[..used])
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// One slot as it goes onto the disk: which slot, the plan it was built
/// from, its artifacts and its boot entry's file name.
pub struct FilledSlot<'a> {
    /// The slot.
    pub slot: Slot,
    /// The plan of the image in it.
    pub plan: &'a Plan,
    /// Its root filesystem, verity tree, initramfs and kernel.
    pub art: SlotArtifacts,
    /// Its boot entry's file name (`a+3.conf`).
    pub entry: String,
}

/// The ESP's files for the given slots.
pub fn esp_files(
    arch: Arch,
    sd_boot: &[u8],
    slots: &[FilledSlot<'_>],
    loader_conf: &[u8],
) -> Vec<(String, Vec<u8>)> {
    let boot_file = format!("EFI/BOOT/{}", arch.efi_boot_file());
    let mut files = vec![
        (boot_file, sd_boot.to_vec()),
        ("loader/loader.conf".to_string(), loader_conf.to_vec()),
    ];
    for FilledSlot { slot, plan, art, entry: entry_name } in slots {
        let conf = EntryConf::for_slot(*slot, &plan.name, &plan.version.to_string(), &plan.cmdline);
        files.push((format!("{ENTRIES_DIR}/{entry_name}"), conf.to_text().into_bytes()));
        files.extend(slot_kernel_files(*slot, art));
    }
    files
}

/// A filled slot's kernel and initramfs as the ESP and U-Boot's boot
/// partition hold them: `/<slot>/vmlinuz` and `/<slot>/initrd`.
pub fn slot_kernel_files(slot: Slot, art: &SlotArtifacts) -> Vec<(String, Vec<u8>)> {
    vec![
        (format!("{}/vmlinuz", slot.esp_dir()), art.vmlinuz.to_vec()),
        (format!("{}/initrd", slot.esp_dir()), art.initrd.clone()),
    ]
}

/// `loader.conf`: boot at once, and no `default` line, because a default
/// would override the boot counters and keep booting a bad slot.
pub const LOADER_CONF: &str = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n";

/// Builds the root filesystem of `plan` for `slot` and checks it fits.
fn fill_slot<'a>(
    slot: Slot,
    plan: &'a Plan,
    root_size: u64,
    board: &Plan,
    log: &mut dyn FnMut(&str),
) -> Result<FilledSlot<'a>, BuildError> {
    let art = build_slot(plan)?;
    log(&format!(
        "slot {slot}: {} {}, {} entries, squashfs {} + hash tree {}; root hash {}",
        plan.name,
        plan.version,
        plan.rootfs.len(),
        mib(art.squashfs.len() as u64),
        mib(art.hash_area.len() as u64),
        art.verity.root_hash
    ));
    if art.root_bytes() > root_size {
        return Err(BuildError::RootTooBig {
            needed_mib: art.root_bytes().div_ceil(1 << 20),
            have_mib: board.board.disk.root_mib.value,
            board: board.board_path.display().to_string(),
        });
    }
    let entry = BootEntryName::on_trial(slot, plan.tries).to_string();
    Ok(FilledSlot { slot, plan, art, entry })
}

fn slot_report(f: &FilledSlot<'_>) -> SlotReport {
    SlotReport {
        version: f.plan.version.to_string(),
        entry: f.entry.clone(),
        squashfs_bytes: f.art.squashfs.len() as u64,
        hash_tree_bytes: f.art.hash_area.len() as u64,
        initrd_bytes: f.art.initrd.len() as u64,
        verity: f.art.verity.clone(),
    }
}

/// A FAT partition of the disk and its files.
struct FatPart {
    label: String,
    type_guid: Guid,
    size: u64,
    volume_label: &'static str,
    files: Vec<(String, Vec<u8>)>,
}

/// The FAT partitions that come first on the disk: the ESP with
/// systemd-boot, or the Raspberry Pi's `autoboot.txt` partition and its
/// two slot boot partitions. The Pi's slots report their `basalt.txt` as
/// their entry.
fn fat_partitions(plan: &Plan, slots: &mut [FilledSlot<'_>]) -> Result<Vec<FatPart>, BuildError> {
    let esp_size = plan.board.disk.esp_mib.value << 20;
    if let (true, Some(t)) = (plan.board.is_rpi_tryboot(), &plan.board.tryboot) {
        let firmware = crate::rpi::firmware_files(t, &plan.board_path)?;
        let mut parts = vec![FatPart {
            label: layout::RPI_AUTOBOOT_LABEL.into(),
            type_guid: layout::BASIC_DATA_TYPE,
            size: crate::rpi::AUTOBOOT_MIB << 20,
            volume_label: "AUTOBOOT",
            files: crate::rpi::autoboot_files()?,
        }];
        for slot in Slot::ALL {
            let filled = slots.iter_mut().find(|f| f.slot == slot);
            let config: Vec<String> = t.config.iter().map(|l| l.value.clone()).collect();
            let files = crate::rpi::boot_partition_files(&firmware, &config, filled.as_deref());
            if let Some(f) = filled {
                f.entry =
                    format!("{}:/{}", slot.rpi_boot_partlabel(), basalt_bundle::tryboot::SLOT_TXT);
            }
            parts.push(FatPart {
                label: slot.rpi_boot_partlabel().into(),
                type_guid: layout::BASIC_DATA_TYPE,
                size: esp_size,
                volume_label: if slot == Slot::A { "BOOT_A" } else { "BOOT_B" },
                files,
            });
        }
        return Ok(parts);
    }
    if plan.board.is_uboot() {
        for f in slots.iter_mut() {
            f.entry = crate::uboot::entry_name(f.slot);
        }
        return Ok(vec![FatPart {
            label: layout::ESP_LABEL.into(),
            type_guid: layout::BASIC_DATA_TYPE,
            size: esp_size,
            volume_label: "BOOT",
            files: crate::uboot::boot_files(slots),
        }]);
    }
    // plan() refuses a board without it.
    let sd_boot_rel = plan.board.firmware.systemd_boot.as_ref().map(|l| l.value.clone());
    let sd_boot_path =
        plan.board_path.parent().unwrap_or(Path::new(".")).join(sd_boot_rel.unwrap_or_default());
    let sd_boot = fs::read(&sd_boot_path).map_err(io("cannot read", &sd_boot_path))?;
    Ok(vec![FatPart {
        label: layout::ESP_LABEL.into(),
        type_guid: layout::ESP_TYPE,
        size: esp_size,
        volume_label: "ESP",
        files: esp_files(plan.board.arch, &sd_boot, slots, LOADER_CONF.as_bytes()),
    }])
}

/// The `[uboot]` section of a U-Boot board.
fn uboot_section(plan: &Plan) -> Option<&crate::board::UbootSection> {
    plan.board.uboot.as_ref().filter(|_| plan.board.is_uboot())
}

/// Builds the image described by `plan` into `out`; slot `b` stays empty
/// unless `slot_b` gives the plan of a second image to put there (for
/// tests of fallback, and for factory images that ship a known-good
/// fallback).
pub fn build(
    plan: &Plan,
    slot_b: Option<&Plan>,
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Report, BuildError> {
    let mut timings = Vec::new();
    let mut step = |name: &str, start: Instant| {
        timings.push((name.to_string(), start.elapsed().as_millis() as u64))
    };
    let identity = plan.identity();
    let sde = plan.source_date_epoch;
    let root_size = plan.board.disk.root_mib.value << 20;

    let t = Instant::now();
    let mut slots = vec![fill_slot(Slot::A, plan, root_size, plan, log)?];
    if let Some(b) = slot_b {
        if b.board.name.value != plan.board.name.value {
            return Err(BuildError::SlotBBoard {
                a: plan.board.name.value.clone(),
                b: b.board.name.value.clone(),
            });
        }
        slots.push(fill_slot(Slot::B, b, root_size, plan, log)?);
    }
    step("rootfs+verity+initrd", t);

    let t = Instant::now();
    let fat_parts = fat_partitions(plan, &mut slots)?;
    step("boot files", t);
    // The output goes to a temporary folder beside `out`.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.tmp-",
            out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ))
        .tempdir_in(parent)
        .map_err(io("cannot create a folder in", parent))?;

    let data_size = plan.board.disk.data_mib.value << 20;
    let t = Instant::now();
    let root_type = plan.board.arch.root_type();
    let part = |label: &str, type_guid: Guid, size_bytes: u64| PartitionSpec {
        label: label.to_string(),
        type_guid,
        guid: Guid::derived("partition", &format!("{identity}\0{label}")),
        size_bytes,
    };
    let mut partitions: Vec<PartitionSpec> =
        fat_parts.iter().map(|f| part(&f.label, f.type_guid, f.size)).collect();
    partitions.extend([
        part(layout::ROOTFS_A_LABEL, root_type, root_size),
        part(layout::ROOTFS_B_LABEL, root_type, root_size),
        part(layout::DATA_LABEL, layout::LINUX_DATA_TYPE, data_size),
    ]);
    let layout = DiskLayout {
        disk_guid: Guid::derived("disk", &identity),
        partitions,
        disk_size: plan.board.disk.total_mib.as_ref().map(|t| t.value << 20),
        first_offset: uboot_section(plan).map(|u| u.first_partition_offset()),
    };
    let (placed, disk_size) = gpt::plan(&layout)?;
    let mut fat_images = Vec::new();
    for f in &fat_parts {
        let offset = placed.iter().find(|p| p.label == f.label).map_or(0, |p| p.offset);
        let files: Vec<fat::FatFile<'_>> =
            f.files.iter().map(|(p, d)| fat::FatFile::new(p.clone(), d)).collect();
        let vol = Guid::derived(&format!("{}-volume", f.label), &identity);
        let vol = vol.as_bytes();
        let image = fat::write_fat32(
            &files,
            &fat::FatOptions {
                size_bytes: f.size,
                volume_id: u32::from_le_bytes([vol[0], vol[1], vol[2], vol[3]]),
                label: f.volume_label.into(),
                mtime: sde,
                hidden_sectors: u32::try_from(offset / gpt::SECTOR_SIZE).unwrap_or(0),
            },
        )
        .map_err(|source| BuildError::FatPartition { label: f.label.clone(), source })?;
        log(&format!("{}: {} files", f.label, files.len()));
        fat_images.push((f.label.as_str(), image));
    }
    let disk_path = tmp.path().join("disk.img");
    let mut disk = fs::File::create(&disk_path).map_err(io("cannot create", &disk_path))?;
    disk.set_len(disk_size).map_err(io("cannot size", &disk_path))?;
    gpt::write_headers(&mut disk, disk_size, layout.disk_guid, &placed)?;
    if let Some(u) = uboot_section(plan) {
        let env = crate::uboot::initial_env(u, &slots);
        let board = plan.board_path.display().to_string();
        for (offset, copy) in crate::uboot::env_copies(u, &env, &board)? {
            write_part(&mut disk, offset, &copy).map_err(io("cannot write", &disk_path))?;
        }
        log(&format!(
            "U-Boot environment: {} variables at {:#x} and {:#x}",
            env.iter().count(),
            u.env_offset.value,
            u.env_offset_redund.value
        ));
    }
    for p in &placed {
        let w = |disk: &mut fs::File, off: u64, bytes: &[u8]| {
            write_part(disk, off, bytes).map_err(io("cannot write", &disk_path))
        };
        match p.label.as_str() {
            label if fat_images.iter().any(|(l, _)| *l == label) => {
                if let Some((_, image)) = fat_images.iter().find(|(l, _)| *l == label) {
                    w(&mut disk, p.offset, image)?;
                }
            }
            label => {
                if let Some(f) = slots.iter().find(|f| f.slot.root_partlabel() == label) {
                    w(&mut disk, p.offset, &f.art.squashfs)?;
                    let hash_at = p.offset + f.art.verity.hash_offset;
                    w(&mut disk, hash_at, &f.art.hash_area)?;
                }
            }
        }
    }
    drop(disk);
    if let Some(p) = placed.iter().find(|p| p.label == layout::DATA_LABEL) {
        let uuid = Guid::derived("data-fs", &identity);
        ext4::make_ext4(&disk_path, p.offset, p.size, layout::DATA_LABEL, uuid, sde)?;
    }
    step("disk", t);

    let t = Instant::now();
    let block_map = bmap::write_bmap(&disk_path)?;
    let disk_sha = block_map.image_sha256;
    fs::write(tmp.path().join("disk.img.bmap"), block_map.xml)
        .map_err(io("cannot write", tmp.path()))?;

    let extra: Vec<sbom::ExtraFile<'_>> = fat_parts
        .iter()
        .flat_map(|f| f.files.iter().map(move |(p, d)| (&f.label, p, d)))
        .filter(|(_, p, _)| *p != "initrd" && !p.ends_with("/initrd"))
        .map(|(label, p, d)| sbom::ExtraFile {
            name: format!("{label}:/{p}"),
            data: d,
            origin: if p.ends_with("vmlinuz") {
                Origin::Kernel(plan.kernel.origin.clone())
            } else {
                Origin::Build
            },
        })
        .collect();
    let sbom_json = sbom::spdx_json(&sbom::SbomInput {
        name: &plan.name,
        version: &plan.version.to_string(),
        created: sbom::rfc3339(sde),
        kernel_package: plan.kernel.package.as_ref().map(|(n, v)| (n.as_str(), v.as_str())),
        trees: vec![("rootfs:", &plan.rootfs), ("initrd:", &slots[0].art.initrd_tree)],
        extra,
    });
    let sbom_text = serde_json::to_string_pretty(&sbom_json).unwrap_or_default();
    fs::write(tmp.path().join("sbom.spdx.json"), sbom_text)
        .map_err(io("cannot write", tmp.path()))?;
    step("bmap+sbom", t);

    let update_bundle = match &plan.signing_key {
        Some(key_path) => {
            let t = Instant::now();
            let key = crate::ota::read_signing_key(key_path)
                .map_err(|e| BuildError::Ota(e.to_string()))?;
            let content = crate::ota::OsContent::from_build(plan, &slots[0].art);
            let file = tmp.path().join(crate::ota::BUNDLE_FILE);
            let mut summary = crate::ota::write_os_bundle(&content, &[key], &file)
                .map_err(|e| BuildError::Ota(e.to_string()))?;
            summary.path = PathBuf::from(crate::ota::BUNDLE_FILE);
            log(&format!(
                "{}: {} {}, {}, signed by {}",
                crate::ota::BUNDLE_FILE,
                summary.name,
                summary.version,
                mib(summary.size),
                summary.signed_by.join(", ")
            ));
            step("bundle", t);
            Some(summary)
        }
        None => None,
    };

    let module_bytes: u64 = plan
        .rootfs
        .iter()
        .filter(|(p, _)| p.starts_with("/lib/modules/"))
        .map(|(_, n)| if let NodeKind::File(d) = &n.kind { d.len() as u64 } else { 0 })
        .sum();
    let report = Report {
        name: plan.name.clone(),
        version: plan.version.to_string(),
        board: plan.board.name.value.clone(),
        arch: match plan.board.arch {
            Arch::X86_64 => "x86_64".into(),
            Arch::Aarch64 => "aarch64".into(),
        },
        kernel_release: plan.kernel.release.clone(),
        module_signatures: match plan.module_signatures {
            crate::kernel::ModuleSignatures::Strip => "stripped".into(),
            crate::kernel::ModuleSignatures::Keep => "kept".into(),
        },
        source_date_epoch: sde,
        disk: DiskReport {
            file: "disk.img".into(),
            size: disk_size,
            sha256: disk_sha,
            guid: layout.disk_guid.to_string(),
        },
        partitions: placed
            .iter()
            .map(|p| PartitionReport {
                index: p.index,
                label: p.label.clone(),
                type_guid: p.type_guid.to_string(),
                guid: p.guid.to_string(),
                offset: p.offset,
                size: p.size,
            })
            .collect(),
        slot_a: slot_report(&slots[0]),
        slot_b: slots.get(1).map(slot_report),
        rootfs: RootfsReport {
            entries: plan.rootfs.len(),
            file_bytes: plan.rootfs.file_bytes(),
            module_bytes,
            os_overhead_bytes: plan.rootfs.file_bytes() - module_bytes,
        },
        machine: crate::qemu::spec_of_board(&plan.board, &plan.ports, plan.memory_mib),
        update_bundle,
        uboot_env: plan.board.bootloader_config().uboot_env,
        timings_ms: timings,
    };
    let report_text = serde_json::to_string_pretty(&report).unwrap_or_default();
    fs::write(tmp.path().join("report.json"), report_text)
        .map_err(io("cannot write", tmp.path()))?;

    // Replace a previous build only; never a folder we did not make.
    if out.exists() {
        let empty = fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty && !out.join("report.json").exists() {
            return Err(BuildError::ForeignOutput(out.to_path_buf()));
        }
        fs::remove_dir_all(out).map_err(io("cannot replace", out))?;
    }
    let kept = tmp.keep();
    fs::rename(&kept, out).map_err(io("cannot move the finished build to", out))?;
    log(&format!(
        "disk: {} ({}), sha256 {}",
        out.join("disk.img").display(),
        mib(disk_size),
        report.disk.sha256
    ));
    Ok(report)
}
