//! FAT32: the writer that makes the EFI System Partition, and a small reader
//! for `basalt inspect`.
//!
//! The ESP is read by UEFI firmware and systemd-boot, then mounted
//! read-write by the device's vfat driver, which renames entries for boot
//! counting. So the writer aims at the filesystem `mkfs.fat` plus the kernel
//! would have produced, checked in tests by `fsck.vfat -n` and mtools:
//! always FAT32 (never a FAT16 in disguise), `.` and `..` as plain 8.3
//! entries, long names with correct short aliases and checksums.
//!
//! Output is deterministic: entries are sorted (by the bytes of their long
//! names, so `EFI` comes before `a`), every timestamp comes from one input
//! time, clusters are handed out in a fixed order, and each file is
//! contiguous. Nothing here touches the host's filesystem.
//!
//! Not owned here: the partition table (see [`crate::gpt`]) and what goes
//! into the ESP (the build decides that).

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Cursor, Seek, SeekFrom, Write};

/// Bytes per sector. Firmware and every tool default to 512; 4K-sector FAT
/// images are a compatibility risk with nothing to gain for an ESP.
const SECTOR: u64 = 512;
/// `mkfs.fat` and Windows use 32 reserved sectors on FAT32; the boot
/// sector, FSInfo and their backups live there.
const RESERVED_SECTORS: u32 = 32;
const NUM_FATS: u32 = 2;
const FSINFO_SECTOR: u32 = 1;
const BACKUP_BOOT_SECTOR: u32 = 6;
/// Below this many clusters, the FAT type rule of Microsoft's specification
/// (followed by firmware and `fsck.fat`) calls the volume FAT16, whatever
/// the boot sector says.
const MIN_CLUSTERS: u32 = 65525;
/// Cluster numbers from 0x0FFFFFF7 up are reserved (bad, end of chain).
const MAX_CLUSTERS: u32 = 0x0FFF_FFF4;
const FIRST_CLUSTER: u32 = 2;
/// End-of-chain value; Linux and `mkfs.fat` write this one of the range.
const END_OF_CHAIN: u32 = 0x0FFF_FFFF;
const BAD_CLUSTER: u32 = 0x0FFF_FFF7;
/// FAT32 entries are 28 bits; the top four are reserved.
const ENTRY_MASK: u32 = 0x0FFF_FFFF;
const MEDIA_FIXED_DISK: u8 = 0xF8;
/// The largest file FAT can describe: the size field is 32 bits.
const MAX_FILE_SIZE: u64 = u32::MAX as u64;
/// Directories are capped at 65536 entries of 32 bytes.
const MAX_DIR_SLOTS: u64 = 65536;
const MIB: u64 = 1 << 20;

const DIR_ENTRY: usize = 32;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
/// Read-only | hidden | system | volume id: the mark of a long-name entry.
const ATTR_LONG_NAME: u8 = 0x0F;
/// Windows NT's "base is lower case" and "extension is lower case" flags
/// in byte 12; written by mtools and Windows, read here.
const CASE_LOWER_BASE: u8 = 0x08;
const CASE_LOWER_EXT: u8 = 0x10;
const LFN_LAST: u8 = 0x40;
const LFN_CHARS: usize = 13;
/// Byte offsets of the 13 UCS-2 characters inside a long-name entry.
const LFN_OFFSETS: [usize; LFN_CHARS] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
const DELETED: u8 = 0xE5;
/// A short name starting with 0xE5 is stored with 0x05 so that it does not
/// read as deleted.
const KANJI_E5: u8 = 0x05;
/// Longest long name, in UTF-16 units.
const MAX_LONG_NAME: usize = 255;
/// Characters a long name may not hold (besides control characters); the
/// same list the Linux vfat driver and Windows refuse.
const BAD_LONG_CHARS: &str = "\"*/:<>?\\|";
/// Punctuation allowed in short names besides letters and digits.
const SHORT_PUNCT: &[u8] = b"!#$%&'()-@^_`{}~";

/// One file of the filesystem. Directories are implied by the paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatFile<'a> {
    /// `/`-separated path without a leading slash, e.g.
    /// `EFI/BOOT/BOOTX64.EFI`. Names keep their case; lookups on FAT are
    /// case-insensitive, so two names that differ only in case collide.
    pub path: String,
    /// The file's content.
    pub data: &'a [u8],
}

impl<'a> FatFile<'a> {
    /// A file at `path` holding `data`.
    pub fn new(path: impl Into<String>, data: &'a [u8]) -> FatFile<'a> {
        FatFile { path: path.into(), data }
    }
}

/// Size and identity of the filesystem to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatOptions {
    /// Size of the filesystem (the partition) in bytes, a multiple of 512,
    /// from about 33 MiB (the FAT32 minimum) to 2 TiB.
    pub size_bytes: u64,
    /// The volume serial number, shown as `XXXX-XXXX` (what
    /// `/dev/disk/by-uuid` uses). Derive it from the image identity for
    /// reproducible builds.
    pub volume_id: u32,
    /// Volume label, at most 11 ASCII characters; lower case is turned to
    /// upper case (FAT labels are upper case). Empty for no label.
    pub label: String,
    /// Unix seconds (UTC) for every creation, modification and access time.
    /// FAT counts from 1980 to 2107; times outside are clamped.
    pub mtime: u64,
    /// First LBA of the partition on its disk (the BPB's hidden sectors),
    /// or 0 when unknown. Only DOS-era boot code reads it.
    pub hidden_sectors: u32,
}

/// A name and kind found by [`FatReader::list_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntryInfo {
    /// The long name, or the short name with its case flags applied when
    /// the entry has no long name.
    pub name: String,
    /// Whether the entry is a directory.
    pub is_dir: bool,
    /// Size in bytes (0 for directories).
    pub size: u64,
}

/// Why a FAT image could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FatError {
    /// The size cannot hold a FAT32 with the content.
    #[error(
        "the ESP needs at least {} MiB ({need} bytes) but is {have} bytes; \
         raise the esp size in the board file",
        .need.div_ceil(MIB)
    )]
    TooSmall {
        /// Smallest size found that holds the content, in bytes.
        need: u64,
        /// The size asked for, in bytes.
        have: u64,
    },
    /// The size is beyond what FAT32 with 512-byte sectors addresses.
    #[error(
        "an ESP of {size} bytes is larger than FAT32 allows (2 TiB); \
         lower the esp size in the board file"
    )]
    TooLarge {
        /// The size asked for, in bytes.
        size: u64,
    },
    /// The size is not a whole number of sectors.
    #[error("an ESP of {size} bytes is not a multiple of 512 bytes; round the esp size")]
    Unaligned {
        /// The size asked for, in bytes.
        size: u64,
    },
    /// A file is larger than a FAT file may be.
    #[error(
        "{path} is {size} bytes, but a file on FAT holds at most 4 GiB - 1; \
         split it or keep it off the ESP"
    )]
    FileTooLarge {
        /// The file's path.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
    /// A path or name that FAT cannot store.
    #[error("cannot put {path:?} on the ESP: {reason}")]
    BadName {
        /// The offending path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two paths name the same entry, or one is both a file and a folder.
    #[error(
        "{path:?} is given twice (FAT names ignore case) or is both a file \
         and a folder; give each ESP path once"
    )]
    Duplicate {
        /// The second path given.
        path: String,
    },
    /// A directory holds more entries than FAT allows.
    #[error("folder {dir:?} has too many entries for FAT (65536 slots); spread the files out")]
    TooManyEntries {
        /// The directory's path.
        dir: String,
    },
    /// The volume label cannot be stored.
    #[error("volume label {label:?} {reason}; fix the esp label")]
    BadLabel {
        /// The label asked for.
        label: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The image being read is not a sound FAT32.
    #[error("the FAT image is damaged or not FAT32 ({0}); rebuild it, or run fsck.vfat -n on it")]
    Corrupt(String),
    /// The path does not exist in the image.
    #[error("{path:?} is not in the FAT image")]
    NotFound {
        /// The path looked up.
        path: String,
    },
    /// A directory was expected.
    #[error("{path:?} in the FAT image is a file, not a folder")]
    NotADirectory {
        /// The path looked up.
        path: String,
    },
    /// A file was expected.
    #[error("{path:?} in the FAT image is a folder, not a file")]
    IsADirectory {
        /// The path looked up.
        path: String,
    },
    /// Writing the image failed.
    #[error("writing the FAT image failed: {0}")]
    Io(#[from] io::Error),
}

/// Writes a FAT32 filesystem of `opts.size_bytes` holding `files` and
/// returns its bytes.
///
/// The same inputs always give the same bytes.
pub fn write_fat32(files: &[FatFile<'_>], opts: &FatOptions) -> Result<Vec<u8>, FatError> {
    let plan = Plan::new(files, opts)?;
    let size = usize::try_from(opts.size_bytes)
        .map_err(|_| FatError::TooLarge { size: opts.size_bytes })?;
    let mut out = Cursor::new(vec![0u8; size]);
    plan.write(&mut out)?;
    Ok(out.into_inner())
}

/// Writes the same filesystem as [`write_fat32`] to `out`, starting at its
/// current position and ending `opts.size_bytes` later.
///
/// Boot sectors, FATs, directories and files are written in full; free
/// clusters are skipped with a seek, so a fresh file stays sparse and stale
/// bytes left there do no harm (free clusters are never read). Nothing is
/// written when the inputs are refused.
pub fn write_fat32_to<W: Write + Seek>(
    files: &[FatFile<'_>],
    opts: &FatOptions,
    out: &mut W,
) -> Result<(), FatError> {
    Plan::new(files, opts)?.write(out)
}

/// Geometry of one FAT32 volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    total_sectors: u32,
    sectors_per_cluster: u32,
    /// Sectors of one FAT.
    fat_sectors: u32,
    /// Data clusters, numbered from 2.
    clusters: u32,
}

impl Layout {
    /// Picks the geometry for a volume of `total_sectors`, or `None` when
    /// it is too small for FAT32.
    ///
    /// 4 KiB clusters are preferred: they match the page size and flash
    /// blocks, and keep the FAT small. Smaller ESPs fall back to smaller
    /// clusters rather than drop under the FAT32 cluster minimum; very
    /// large ones go up to 32 KiB to stay under the maximum.
    fn for_sectors(total_sectors: u32) -> Option<Layout> {
        [8, 16, 32, 64, 4, 2, 1]
            .into_iter()
            .filter_map(|spc| Layout::with_cluster(total_sectors, spc))
            .find(|l| (MIN_CLUSTERS..=MAX_CLUSTERS).contains(&l.clusters))
    }

    fn with_cluster(total_sectors: u32, spc: u32) -> Option<Layout> {
        let total = u64::from(total_sectors);
        let reserved = u64::from(RESERVED_SECTORS);
        let spc64 = u64::from(spc);
        // Sized for every cluster the volume could have before the FATs
        // take their share: a few sectors too many at worst, never too few.
        let upper = total.checked_sub(reserved)? / spc64;
        let mut fat = ((upper + 2) * 4).div_ceil(SECTOR);
        // Grow the FATs until the data region starts on a cluster
        // boundary, as `mkfs.fat` does, so clusters line up with the
        // flash pages beneath a 1 MiB-aligned partition.
        while !(reserved + u64::from(NUM_FATS) * fat).is_multiple_of(spc64) {
            fat += 1;
        }
        let data_start = reserved + u64::from(NUM_FATS) * fat;
        let clusters = total.checked_sub(data_start)? / spc64;
        Some(Layout {
            total_sectors,
            sectors_per_cluster: spc,
            fat_sectors: u32::try_from(fat).ok()?,
            clusters: u32::try_from(clusters).ok()?,
        })
    }

    fn cluster_bytes(&self) -> u64 {
        u64::from(self.sectors_per_cluster) * SECTOR
    }

    fn data_start_bytes(&self) -> u64 {
        u64::from(RESERVED_SECTORS + NUM_FATS * self.fat_sectors) * SECTOR
    }

    fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_bytes())
    }
}

/// A directory being built: its entries by long name, which sorts them.
#[derive(Default)]
struct TreeDir<'a> {
    entries: BTreeMap<String, TreeNode<'a>>,
    /// Upper-cased names, because FAT lookups ignore case.
    folded: HashSet<String>,
}

enum TreeNode<'a> {
    Dir(TreeDir<'a>),
    File(&'a [u8]),
}

/// One directory as it will be written.
struct DirPlan<'a> {
    path: String,
    entries: Vec<EntryPlan<'a>>,
    /// Index of the parent in [`Plan::dirs`]; `None` for the root.
    parent: Option<usize>,
    first_cluster: u32,
    clusters: u32,
}

struct EntryPlan<'a> {
    long: String,
    short: [u8; 11],
    /// Whether long-name entries precede the short entry.
    lfn: bool,
    kind: EntryKind<'a>,
    /// First cluster of a file (0 when empty); directories use their
    /// [`DirPlan::first_cluster`].
    first_cluster: u32,
}

enum EntryKind<'a> {
    Dir(usize),
    File(&'a [u8]),
}

impl EntryPlan<'_> {
    fn slots(&self) -> u64 {
        let lfn = if self.lfn { lfn_entries(&self.long) } else { 0 };
        lfn as u64 + 1
    }
}

/// Everything decided before the first byte is written.
struct Plan<'a> {
    layout: Layout,
    /// Directories in pre-order; the root is first.
    dirs: Vec<DirPlan<'a>>,
    /// Clusters handed out: 2 up to, not including, this one.
    next_free: u32,
    label: Option<[u8; 11]>,
    stamp: DosTime,
    opts: FatOptions,
}

impl<'a> Plan<'a> {
    fn new(files: &[FatFile<'a>], opts: &FatOptions) -> Result<Plan<'a>, FatError> {
        let size = opts.size_bytes;
        if !size.is_multiple_of(SECTOR) {
            return Err(FatError::Unaligned { size });
        }
        let total_sectors =
            u32::try_from(size / SECTOR).map_err(|_| FatError::TooLarge { size })?;
        let label = label_bytes(&opts.label)?;
        let root = build_tree(files)?;
        let mut dirs = Vec::new();
        flatten(root, String::new(), None, &mut dirs)?;
        let root_label = u64::from(label.is_some());

        let fits = |layout: &Layout| -> bool {
            let mut need = 0u64;
            for (i, dir) in dirs.iter().enumerate() {
                need += layout.clusters_for(dir_bytes(dir, i == 0, root_label)).max(1);
                for e in &dir.entries {
                    if let EntryKind::File(data) = e.kind {
                        need += layout.clusters_for(data.len() as u64);
                    }
                }
            }
            need <= u64::from(layout.clusters)
        };
        let layout = match Layout::for_sectors(total_sectors) {
            Some(layout) if fits(&layout) => layout,
            _ => {
                // Search upward, a MiB at a time, from where the content
                // could start to fit, for the size to report.
                let content: u64 = dirs
                    .iter()
                    .flat_map(|d| &d.entries)
                    .map(|e| match e.kind {
                        EntryKind::File(data) => data.len() as u64,
                        EntryKind::Dir(_) => 0,
                    })
                    .sum();
                let mut mib = (size / MIB + 1).max(content / MIB).max(32);
                loop {
                    let Ok(sectors) = u32::try_from(mib * MIB / SECTOR) else {
                        return Err(FatError::TooLarge { size: mib * MIB });
                    };
                    if Layout::for_sectors(sectors).is_some_and(|l| fits(&l)) {
                        return Err(FatError::TooSmall { need: mib * MIB, have: size });
                    }
                    mib += 1;
                }
            }
        };

        let mut plan = Plan {
            layout,
            dirs,
            next_free: FIRST_CLUSTER,
            label,
            stamp: DosTime::from_unix(opts.mtime),
            opts: opts.clone(),
        };
        plan.allocate();
        Ok(plan)
    }

    /// Hands out clusters: all directories first, so the metadata firmware
    /// walks sits together, then every file, each in one contiguous run.
    fn allocate(&mut self) {
        let layout = self.layout;
        let root_label = u64::from(self.label.is_some());
        let mut next = FIRST_CLUSTER;
        for (i, dir) in self.dirs.iter_mut().enumerate() {
            let n = layout.clusters_for(dir_bytes(dir, i == 0, root_label)).max(1) as u32;
            dir.first_cluster = next;
            dir.clusters = n;
            next += n;
        }
        for dir in &mut self.dirs {
            for e in &mut dir.entries {
                if let EntryKind::File(data) = e.kind {
                    let n = layout.clusters_for(data.len() as u64) as u32;
                    if n > 0 {
                        e.first_cluster = next;
                        next += n;
                    }
                }
            }
        }
        self.next_free = next;
    }

    /// Cluster runs in order: `(first, count)`.
    fn runs(&self) -> Vec<(u32, u32)> {
        let mut runs: Vec<(u32, u32)> =
            self.dirs.iter().map(|d| (d.first_cluster, d.clusters)).collect();
        for e in self.dirs.iter().flat_map(|d| &d.entries) {
            if let EntryKind::File(data) = e.kind {
                if e.first_cluster != 0 {
                    runs.push((
                        e.first_cluster,
                        self.layout.clusters_for(data.len() as u64) as u32,
                    ));
                }
            }
        }
        runs
    }

    fn write<W: Write + Seek>(&self, out: &mut W) -> Result<(), FatError> {
        let base = out.stream_position()?;
        let end = base + self.opts.size_bytes;

        out.write_all(&self.reserved_region())?;

        let fat = self.fat_used();
        let fat_bytes = u64::from(self.layout.fat_sectors) * SECTOR;
        for _ in 0..NUM_FATS {
            out.write_all(&fat)?;
            write_zeros(out, fat_bytes - fat.len() as u64)?;
        }
        let data_at = out.stream_position()? - base;
        debug_assert_eq!(data_at, self.layout.data_start_bytes(), "FATs end where data starts");

        let cluster = self.layout.cluster_bytes();
        for (i, dir) in self.dirs.iter().enumerate() {
            let bytes = self.dir_content(i);
            out.write_all(&bytes)?;
            write_zeros(out, u64::from(dir.clusters) * cluster - bytes.len() as u64)?;
        }
        for e in self.dirs.iter().flat_map(|d| &d.entries) {
            if let EntryKind::File(data) = e.kind {
                out.write_all(data)?;
                let len = data.len() as u64;
                write_zeros(out, self.layout.clusters_for(len) * cluster - len)?;
            }
        }

        // Free clusters are skipped, but the last sector is written so the
        // destination ends up exactly as long as the volume.
        let pos = out.stream_position()?;
        if pos < end {
            let start = pos.max(end - SECTOR);
            out.seek(SeekFrom::Start(start))?;
            write_zeros(out, end - start)?;
        }
        out.flush()?;
        Ok(())
    }

    /// The 32 reserved sectors: boot sector, FSInfo, and their backups.
    fn reserved_region(&self) -> Vec<u8> {
        let mut region = vec![0u8; RESERVED_SECTORS as usize * SECTOR as usize];
        let boot = self.boot_sector();
        let info = self.fsinfo();
        for first in [0, BACKUP_BOOT_SECTOR] {
            let at = first as usize * SECTOR as usize;
            region[at..at + 512].copy_from_slice(&boot);
            let at = (first + FSINFO_SECTOR) as usize * SECTOR as usize;
            region[at..at + 512].copy_from_slice(&info);
        }
        region
    }

    fn boot_sector(&self) -> [u8; 512] {
        let l = &self.layout;
        let mut b = [0u8; 512];
        // A short jump over the BPB; firmware checks for 0xEB or 0xE9 to
        // tell a FAT boot sector from an MBR.
        b[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
        // Microsoft's specification recommends this OEM name as the one
        // every FAT driver accepts; some embedded drivers check it.
        b[3..11].copy_from_slice(b"MSWIN4.1");
        put16(&mut b, 11, SECTOR as u16);
        b[13] = l.sectors_per_cluster as u8;
        put16(&mut b, 14, RESERVED_SECTORS as u16);
        b[16] = NUM_FATS as u8;
        // Root entry count, 16-bit total sectors and 16-bit FAT size stay
        // 0: that is what marks the BPB as FAT32.
        b[21] = MEDIA_FIXED_DISK;
        // A fake geometry, as for any LBA disk; nothing reads it.
        put16(&mut b, 24, 63);
        put16(&mut b, 26, 255);
        put32(&mut b, 28, self.opts.hidden_sectors);
        put32(&mut b, 32, l.total_sectors);
        put32(&mut b, 36, l.fat_sectors);
        // Flags 0: both FATs are mirrored and active. Version 0.0.
        put32(&mut b, 44, FIRST_CLUSTER);
        put16(&mut b, 48, FSINFO_SECTOR as u16);
        put16(&mut b, 50, BACKUP_BOOT_SECTOR as u16);
        b[64] = 0x80;
        // Byte 65 is the dirty flag Linux sets while mounted; 0 is clean.
        b[66] = 0x29;
        put32(&mut b, 67, self.opts.volume_id);
        b[71..82].copy_from_slice(self.label.as_ref().unwrap_or(b"NO NAME    "));
        b[82..90].copy_from_slice(b"FAT32   ");
        // Should a BIOS ever try to boot the partition: ask it for the next
        // boot device (int 18h), else halt.
        b[90..95].copy_from_slice(&[0xCD, 0x18, 0xF4, 0xEB, 0xFD]);
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    fn fsinfo(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        put32(&mut b, 0, 0x4161_5252);
        put32(&mut b, 484, 0x6141_7272);
        let used = self.next_free - FIRST_CLUSTER;
        put32(&mut b, 488, self.layout.clusters - used);
        // The hint holds the last cluster handed out: `mkfs.fat` writes it
        // so, and Linux starts its search just after it.
        put32(&mut b, 492, self.next_free - 1);
        put32(&mut b, 508, 0xAA55_0000);
        b
    }

    /// The start of one FAT, up to the last cluster in use; the rest of it
    /// is zero (free).
    fn fat_used(&self) -> Vec<u8> {
        let mut entries = vec![0u32; self.next_free as usize];
        // Entry 0 repeats the media byte; entry 1 has the "clean" and
        // "no I/O error" bits set, as after a clean unmount.
        entries[0] = 0x0FFF_FF00 | u32::from(MEDIA_FIXED_DISK);
        entries[1] = END_OF_CHAIN;
        for (first, count) in self.runs() {
            let last = first + count - 1;
            for c in first..last {
                entries[c as usize] = c + 1;
            }
            entries[last as usize] = END_OF_CHAIN;
        }
        entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    /// The directory's entries, without the zero padding to its clusters.
    fn dir_content(&self, i: usize) -> Vec<u8> {
        let dir = &self.dirs[i];
        let mut out = Vec::new();
        match dir.parent {
            None => {
                if let Some(label) = &self.label {
                    out.extend_from_slice(&short_entry(label, ATTR_VOLUME_ID, 0, 0, self.stamp));
                }
            }
            Some(parent) => {
                out.extend_from_slice(&short_entry(
                    b".          ",
                    ATTR_DIRECTORY,
                    dir.first_cluster,
                    0,
                    self.stamp,
                ));
                // FAT32 quirk: `..` of a directory in the root points to
                // cluster 0, not to the root's real cluster.
                let up = if parent == 0 { 0 } else { self.dirs[parent].first_cluster };
                out.extend_from_slice(&short_entry(
                    b"..         ",
                    ATTR_DIRECTORY,
                    up,
                    0,
                    self.stamp,
                ));
            }
        }
        for e in &dir.entries {
            if e.lfn {
                out.extend_from_slice(&lfn_entries_bytes(&e.long, &e.short));
            }
            let (attr, cluster, size) = match e.kind {
                EntryKind::Dir(d) => (ATTR_DIRECTORY, self.dirs[d].first_cluster, 0),
                EntryKind::File(data) => (ATTR_ARCHIVE, e.first_cluster, data.len() as u32),
            };
            out.extend_from_slice(&short_entry(&e.short, attr, cluster, size, self.stamp));
        }
        out
    }
}

/// Bytes of directory entries in `dir`, including `.`/`..` or the label.
fn dir_bytes(dir: &DirPlan<'_>, is_root: bool, root_label: u64) -> u64 {
    let fixed = if is_root { root_label } else { 2 };
    (fixed + dir.entries.iter().map(EntryPlan::slots).sum::<u64>()) * DIR_ENTRY as u64
}

fn build_tree<'a>(files: &[FatFile<'a>]) -> Result<TreeDir<'a>, FatError> {
    let mut root = TreeDir::default();
    for file in files {
        let size = file.data.len() as u64;
        if size > MAX_FILE_SIZE {
            return Err(FatError::FileTooLarge { path: file.path.clone(), size });
        }
        let parts: Vec<&str> = file.path.split('/').collect();
        for part in &parts {
            check_long_name(&file.path, part)?;
        }
        let dup = || FatError::Duplicate { path: file.path.clone() };
        let (name, dirs) = parts.split_last().ok_or_else(dup)?;
        let mut dir = &mut root;
        for part in dirs {
            if !dir.entries.contains_key(*part) {
                if !dir.folded.insert(part.to_uppercase()) {
                    return Err(dup());
                }
                dir.entries.insert(part.to_string(), TreeNode::Dir(TreeDir::default()));
            }
            dir = match dir.entries.get_mut(*part) {
                Some(TreeNode::Dir(d)) => d,
                _ => return Err(dup()),
            };
        }
        if !dir.folded.insert(name.to_uppercase()) {
            return Err(dup());
        }
        dir.entries.insert(name.to_string(), TreeNode::File(file.data));
    }
    Ok(root)
}

fn check_long_name(path: &str, name: &str) -> Result<(), FatError> {
    let bad = |reason| Err(FatError::BadName { path: path.to_string(), reason });
    if name.is_empty() {
        return bad("empty path component (leading, trailing or doubled `/`)");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not allowed in ESP paths");
    }
    if name.chars().any(|c| c < ' ' || BAD_LONG_CHARS.contains(c)) {
        return bad("FAT names may not hold control characters or any of \" * : < > ? \\ |");
    }
    // Windows and Linux drop trailing dots (and Windows trailing spaces)
    // when they look a name up, so such a name cannot be opened by name.
    if name.ends_with('.') || name.ends_with(' ') {
        return bad("FAT names may not end in a dot or a space");
    }
    if name.encode_utf16().count() > MAX_LONG_NAME {
        return bad("FAT names are at most 255 characters");
    }
    Ok(())
}

/// Turns the tree into directories in pre-order, choosing short names.
fn flatten<'a>(
    tree: TreeDir<'a>,
    path: String,
    parent: Option<usize>,
    dirs: &mut Vec<DirPlan<'a>>,
) -> Result<usize, FatError> {
    let index = dirs.len();
    dirs.push(DirPlan { path, entries: Vec::new(), parent, first_cluster: 0, clusters: 0 });
    let names: Vec<&String> = tree.entries.keys().collect();
    let shorts = short_names(&names)
        .map_err(|reason| FatError::BadName { path: dirs[index].path.clone(), reason })?;
    let mut entries = Vec::with_capacity(tree.entries.len());
    for ((long, node), (short, lfn)) in tree.entries.into_iter().zip(shorts) {
        let kind = match node {
            TreeNode::File(data) => EntryKind::File(data),
            TreeNode::Dir(sub) => {
                let sub_path = if dirs[index].path.is_empty() {
                    long.clone()
                } else {
                    format!("{}/{long}", dirs[index].path)
                };
                EntryKind::Dir(flatten(sub, sub_path, Some(index), dirs)?)
            }
        };
        entries.push(EntryPlan { long, short, lfn, kind, first_cluster: 0 });
    }
    let dir = &mut dirs[index];
    dir.entries = entries;
    let is_root = parent.is_none();
    // The label slot is counted whether or not there is one: a bound.
    if dir_bytes(dir, is_root, 1) / DIR_ENTRY as u64 > MAX_DIR_SLOTS {
        return Err(FatError::TooManyEntries { dir: dir.path.clone() });
    }
    Ok(index)
}

/// Short names for the entries of one directory, and whether each needs
/// long-name entries.
///
/// Names that are already valid upper-case 8.3 names are stored as they
/// are. Names that fit 8.3 once upper-cased keep that short name and get a
/// long name for their case, as the Linux vfat driver stores them by
/// default. Every other name gets Microsoft's basis name with a `~N` tail,
/// the lowest N not taken in this directory.
fn short_names(names: &[&String]) -> Result<Vec<([u8; 11], bool)>, &'static str> {
    let mut taken: HashSet<[u8; 11]> = HashSet::new();
    let mut out: Vec<Option<([u8; 11], bool)>> = vec![None; names.len()];
    // Exact names first, so a generated alias can never take the name
    // another entry has as its own.
    for (i, name) in names.iter().enumerate() {
        if let Some(short) = exact_short_name(name) {
            let upper = name.chars().all(|c| !c.is_ascii_lowercase());
            taken.insert(short);
            out[i] = Some((short, !upper));
        }
    }
    for (i, name) in names.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let (primary, ext) = basis_name(name);
        let found = (1..1_000_000u32).find_map(|n| {
            let tail = format!("~{n}");
            let keep = primary.len().min(8 - tail.len());
            let mut short = [b' '; 11];
            short[..keep].copy_from_slice(&primary[..keep]);
            short[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
            short[8..8 + ext.len()].copy_from_slice(&ext);
            taken.insert(short).then_some(short)
        });
        out[i] = Some((found.ok_or("too many similar names in one folder")?, true));
    }
    Ok(out.into_iter().flatten().collect())
}

fn short_char_ok(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || SHORT_PUNCT.contains(&c)
}

/// The 8.3 name `name` is, ignoring case, if it is one.
fn exact_short_name(name: &str) -> Option<[u8; 11]> {
    let upper = name.to_ascii_uppercase();
    let (base, ext) = match upper.split_once('.') {
        Some((base, ext)) => (base, ext),
        None => (upper.as_str(), ""),
    };
    let ok = |s: &str, max: usize| s.len() <= max && s.bytes().all(short_char_ok);
    if base.is_empty() || !ok(base, 8) || !ok(ext, 3) || (name.contains('.') && ext.is_empty()) {
        return None;
    }
    let mut short = [b' '; 11];
    short[..base.len()].copy_from_slice(base.as_bytes());
    short[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(short)
}

/// Microsoft's basis-name algorithm: upper-case, replace what 8.3 cannot
/// hold with `_`, drop spaces and leading dots, keep up to 8 characters
/// before the first dot and 3 after the last.
fn basis_name(name: &str) -> (Vec<u8>, Vec<u8>) {
    let mapped: Vec<u8> = name
        .trim_start_matches(['.', ' '])
        .chars()
        .filter(|&c| c != ' ')
        .map(|c| {
            let u = c.to_ascii_uppercase();
            match u8::try_from(u) {
                Ok(b) if b == b'.' || short_char_ok(b) => b,
                _ => b'_',
            }
        })
        .collect();
    let last_dot = mapped.iter().rposition(|&b| b == b'.');
    let primary_end = mapped.iter().position(|&b| b == b'.').unwrap_or(mapped.len());
    let mut primary: Vec<u8> = mapped[..primary_end].iter().copied().take(8).collect();
    if primary.is_empty() {
        primary.push(b'_');
    }
    let ext = match last_dot {
        Some(d) => mapped[d + 1..].iter().copied().filter(|&b| b != b'.').take(3).collect(),
        None => Vec::new(),
    };
    (primary, ext)
}

fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |sum, &b| ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b))
}

fn lfn_entries(long: &str) -> usize {
    long.encode_utf16().count().div_ceil(LFN_CHARS)
}

/// The long-name entries that precede a short entry, last part first.
fn lfn_entries_bytes(long: &str, short: &[u8; 11]) -> Vec<u8> {
    let units: Vec<u16> = long.encode_utf16().collect();
    let count = units.len().div_ceil(LFN_CHARS);
    let checksum = lfn_checksum(short);
    let mut out = Vec::with_capacity(count * DIR_ENTRY);
    for seq in (1..=count).rev() {
        let mut e = [0u8; DIR_ENTRY];
        e[0] = seq as u8 | if seq == count { LFN_LAST } else { 0 };
        e[11] = ATTR_LONG_NAME;
        e[13] = checksum;
        for (j, &off) in LFN_OFFSETS.iter().enumerate() {
            let at = (seq - 1) * LFN_CHARS + j;
            // One NUL ends a name that does not fill its last entry; the
            // slots after it are 0xFFFF.
            let unit = match at.cmp(&units.len()) {
                std::cmp::Ordering::Less => units[at],
                std::cmp::Ordering::Equal => 0,
                std::cmp::Ordering::Greater => 0xFFFF,
            };
            put16(&mut e, off, unit);
        }
        out.extend_from_slice(&e);
    }
    out
}

fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, t: DosTime) -> [u8; 32] {
    let mut e = [0u8; DIR_ENTRY];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    e[13] = t.tenths;
    put16(&mut e, 14, t.time);
    put16(&mut e, 16, t.date);
    put16(&mut e, 18, t.date);
    put16(&mut e, 20, (cluster >> 16) as u16);
    put16(&mut e, 22, t.time);
    put16(&mut e, 24, t.date);
    put16(&mut e, 26, cluster as u16);
    put32(&mut e, 28, size);
    e
}

fn label_bytes(label: &str) -> Result<Option<[u8; 11]>, FatError> {
    if label.is_empty() {
        return Ok(None);
    }
    let bad = |reason| Err(FatError::BadLabel { label: label.to_string(), reason });
    if label.len() > 11 {
        return bad("is longer than 11 characters");
    }
    let upper = label.to_ascii_uppercase();
    if !upper.bytes().all(|b| b == b' ' || short_char_ok(b)) {
        return bad("may only hold letters, digits, spaces and ! # $ % & ' ( ) - @ ^ _ ` { } ~");
    }
    if upper.starts_with(' ') {
        return bad("may not start with a space");
    }
    let mut out = [b' '; 11];
    out[..upper.len()].copy_from_slice(upper.as_bytes());
    Ok(Some(out))
}

/// A timestamp in FAT's format: local time by convention, UTC here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DosTime {
    date: u16,
    time: u16,
    /// Hundredths of a second beyond `time`'s two-second resolution, 0-199.
    tenths: u8,
}

impl DosTime {
    fn from_unix(secs: u64) -> DosTime {
        let min = crate::civil::days_from_civil(1980, 1, 1) as u64 * 86400;
        let max = crate::civil::days_from_civil(2108, 1, 1) as u64 * 86400 - 1;
        let secs = secs.clamp(min, max);
        let (y, m, d) = crate::civil::civil_from_days((secs / 86400) as i64);
        let rem = secs % 86400;
        let (hour, minute, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
        DosTime {
            date: (((y - 1980) as u16) << 9) | ((m as u16) << 5) | d as u16,
            time: ((hour as u16) << 11) | ((minute as u16) << 5) | (sec / 2) as u16,
            tenths: (sec % 2 * 100) as u8,
        }
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn write_zeros<W: Write>(out: &mut W, mut n: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let chunk = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..chunk])?;
        n -= chunk as u64;
    }
    Ok(())
}

/// Reads files out of a FAT32 image held in memory, such as the ESP of a
/// finished basalt image or one made by `mkfs.vfat`.
///
/// Paths are `/`-separated and looked up as FAT does, ignoring case. Every
/// offset is checked, so a damaged image gives [`FatError::Corrupt`], never
/// a panic.
#[derive(Clone)]
pub struct FatReader<'a> {
    bytes: &'a [u8],
    cluster_bytes: u64,
    fat_start: u64,
    data_start: u64,
    clusters: u32,
    root_cluster: u32,
    volume_id: u32,
    label: [u8; 11],
}

/// Geometry only: the image itself would flood a log.
impl std::fmt::Debug for FatReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FatReader")
            .field("len", &self.bytes.len())
            .field("cluster_bytes", &self.cluster_bytes)
            .field("clusters", &self.clusters)
            .field("root_cluster", &self.root_cluster)
            .field("volume_id", &format_args!("{:08X}", self.volume_id))
            .finish_non_exhaustive()
    }
}

/// A directory entry as stored, with its long name resolved.
#[derive(Debug, Clone)]
struct RawEntry {
    name: String,
    short: String,
    is_dir: bool,
    size: u32,
    cluster: u32,
}

impl<'a> FatReader<'a> {
    /// Checks the boot sector of `bytes`, a whole FAT32 partition.
    pub fn new(bytes: &'a [u8]) -> Result<FatReader<'a>, FatError> {
        let corrupt = |what: &str| Err(FatError::Corrupt(what.to_string()));
        let Some(b) = bytes.get(..512) else {
            return corrupt("shorter than one sector");
        };
        if b[510..512] != [0x55, 0xAA] {
            return corrupt("no boot sector signature");
        }
        let sector = u64::from(get16(b, 11));
        let spc = u64::from(b[13]);
        let reserved = u64::from(get16(b, 14));
        let fats = u64::from(b[16]);
        let total16 = get16(b, 19);
        let fat16 = get16(b, 22);
        let total = u64::from(get32(b, 32));
        let fat_sectors = u64::from(get32(b, 36));
        if ![512, 1024, 2048, 4096].contains(&sector) || !spc.is_power_of_two() || spc > 128 {
            return corrupt("impossible sector or cluster size");
        }
        if get16(b, 17) != 0 || total16 != 0 || fat16 != 0 || fat_sectors == 0 {
            return corrupt("not FAT32 (FAT12/16 fields are set)");
        }
        if reserved == 0 || fats == 0 {
            return corrupt("no reserved sectors or no FAT");
        }
        if total.checked_mul(sector).is_none_or(|len| len > bytes.len() as u64) {
            return corrupt("image shorter than its boot sector says");
        }
        // With mirroring off, bits 0-3 name the one FAT in use.
        let flags = get16(b, 40);
        let active = if flags & 0x80 != 0 { u64::from(flags & 0x0F) } else { 0 };
        if active >= fats {
            return corrupt("active FAT out of range");
        }
        let data_start_sectors = reserved + fats * fat_sectors;
        let Some(data_sectors) = total.checked_sub(data_start_sectors) else {
            return corrupt("FATs larger than the volume");
        };
        let clusters = data_sectors / spc;
        if clusters < u64::from(MIN_CLUSTERS) || clusters > u64::from(MAX_CLUSTERS) {
            return corrupt("cluster count outside FAT32's range");
        }
        if (clusters + 2) * 4 > fat_sectors * sector {
            return corrupt("FAT too small for the clusters");
        }
        let mut label = [0u8; 11];
        label.copy_from_slice(&b[71..82]);
        Ok(FatReader {
            bytes,
            cluster_bytes: spc * sector,
            fat_start: (reserved + active * fat_sectors) * sector,
            data_start: data_start_sectors * sector,
            clusters: clusters as u32,
            root_cluster: get32(b, 44),
            volume_id: get32(b, 67),
            label,
        })
    }

    /// The volume serial number.
    pub fn volume_id(&self) -> u32 {
        self.volume_id
    }

    /// The volume label: from the root directory's label entry, as Linux
    /// and Windows read it, else from the boot sector; empty when unset.
    pub fn label(&self) -> Result<String, FatError> {
        let mut label = self.label;
        let root = self.cluster_chain(self.root_cluster)?;
        'scan: for cluster in root {
            for e in self.cluster(cluster)?.chunks_exact(DIR_ENTRY) {
                if e[0] == 0 {
                    break 'scan;
                }
                if e[0] != DELETED && e[11] & 0x3F != ATTR_LONG_NAME && e[11] & ATTR_VOLUME_ID != 0
                {
                    label.copy_from_slice(&e[..11]);
                    break 'scan;
                }
            }
        }
        let text = String::from_utf8_lossy(&label).trim_end().to_string();
        Ok(if text == "NO NAME" { String::new() } else { text })
    }

    /// The entries of the directory at `path` (`""` or `/` for the root),
    /// in on-disk order, without `.` and `..`.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntryInfo>, FatError> {
        let cluster = self.dir_cluster(path)?;
        Ok(self
            .entries(cluster)?
            .into_iter()
            .map(|e| DirEntryInfo { name: e.name, is_dir: e.is_dir, size: u64::from(e.size) })
            .collect())
    }

    /// The content of the file at `path`.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, FatError> {
        let (parent, name) = match path.trim_matches('/').rsplit_once('/') {
            Some((parent, name)) => (parent, name),
            None => ("", path.trim_matches('/')),
        };
        let entry = self.lookup(self.dir_cluster(parent)?, name, path)?;
        if entry.is_dir {
            return Err(FatError::IsADirectory { path: path.to_string() });
        }
        let size = u64::from(entry.size);
        if size == 0 {
            return Ok(Vec::new());
        }
        // Bounds the loop below too: each cluster read adds bytes.
        if size > u64::from(self.clusters) * self.cluster_bytes {
            return Err(FatError::Corrupt(format!("{path} is larger than the volume")));
        }
        let mut out = Vec::with_capacity(entry.size as usize);
        let mut cluster = entry.cluster;
        loop {
            let want = (size - out.len() as u64).min(self.cluster_bytes) as usize;
            out.extend_from_slice(&self.cluster(cluster)?[..want]);
            if out.len() as u64 == size {
                return Ok(out);
            }
            cluster = match self.fat_entry(cluster)? {
                next if next >= BAD_CLUSTER => {
                    return Err(FatError::Corrupt(format!(
                        "{path} is {size} bytes but its cluster chain ends at {}",
                        out.len()
                    )))
                }
                next => next,
            };
        }
    }

    /// The first cluster of the directory at `path`.
    fn dir_cluster(&self, path: &str) -> Result<u32, FatError> {
        let mut cluster = self.root_cluster;
        for name in path.split('/').filter(|p| !p.is_empty()) {
            let entry = self.lookup(cluster, name, path)?;
            if !entry.is_dir {
                return Err(FatError::NotADirectory { path: path.to_string() });
            }
            // `..` pointing at the root is stored as 0.
            cluster = if entry.cluster == 0 { self.root_cluster } else { entry.cluster };
        }
        Ok(cluster)
    }

    fn lookup(&self, dir: u32, name: &str, path: &str) -> Result<RawEntry, FatError> {
        let entries = self.entries(dir)?;
        let folded = name.to_lowercase();
        let found = entries.iter().position(|e| e.name == name).or_else(|| {
            entries
                .iter()
                .position(|e| e.name.to_lowercase() == folded || e.short.to_lowercase() == folded)
        });
        match found {
            Some(i) => Ok(entries[i].clone()),
            None => Err(FatError::NotFound { path: path.to_string() }),
        }
    }

    /// The entries of the directory starting at `first`, long names
    /// resolved; long-name entries that do not match their short entry are
    /// ignored, as every FAT driver does.
    fn entries(&self, first: u32) -> Result<Vec<RawEntry>, FatError> {
        let mut out = Vec::new();
        // Long-name parts gathered so far: (checksum, next expected
        // sequence number, parts by sequence number).
        let mut lfn: Option<(u8, u8, Vec<[u16; LFN_CHARS]>)> = None;
        for cluster in self.cluster_chain(first)? {
            for e in self.cluster(cluster)?.chunks_exact(DIR_ENTRY) {
                match e[0] {
                    0 => return Ok(out),
                    DELETED => {
                        lfn = None;
                        continue;
                    }
                    _ => {}
                }
                if e[11] & 0x3F == ATTR_LONG_NAME {
                    let seq = e[0] & 0x1F;
                    let mut units = [0u16; LFN_CHARS];
                    for (u, &off) in units.iter_mut().zip(&LFN_OFFSETS) {
                        *u = get16(e, off);
                    }
                    lfn = match lfn.take() {
                        _ if e[0] & LFN_LAST != 0 && seq > 0 => {
                            let mut parts = vec![[0u16; LFN_CHARS]; usize::from(seq)];
                            parts[usize::from(seq) - 1] = units;
                            Some((e[13], seq - 1, parts))
                        }
                        Some((sum, expect, mut parts))
                            if seq > 0 && seq == expect && sum == e[13] =>
                        {
                            parts[usize::from(seq) - 1] = units;
                            Some((sum, seq - 1, parts))
                        }
                        _ => None,
                    };
                    continue;
                }
                let attr = e[11];
                let gathered = lfn.take();
                if attr & ATTR_VOLUME_ID != 0 || e[0] == b'.' {
                    continue;
                }
                let mut short = [0u8; 11];
                short.copy_from_slice(&e[..11]);
                let short_text = short_display(&short, e[12]);
                let name = match gathered {
                    Some((sum, 0, parts)) if sum == lfn_checksum(&short) => {
                        let units: Vec<u16> =
                            parts.iter().flatten().copied().take_while(|&u| u != 0).collect();
                        String::from_utf16_lossy(&units)
                    }
                    _ => short_text.clone(),
                };
                out.push(RawEntry {
                    name,
                    short: short_text,
                    is_dir: attr & ATTR_DIRECTORY != 0,
                    size: get32(e, 28),
                    cluster: (u32::from(get16(e, 20)) << 16) | u32::from(get16(e, 26)),
                });
            }
        }
        Ok(out)
    }

    fn cluster_chain(&self, first: u32) -> Result<Vec<u32>, FatError> {
        let mut chain = vec![first];
        let mut cluster = first;
        loop {
            match self.fat_entry(cluster)? {
                next if next >= 0x0FFF_FFF8 => return Ok(chain),
                next => {
                    if chain.len() > self.clusters as usize {
                        return Err(FatError::Corrupt(format!("cluster chain at {first} loops")));
                    }
                    chain.push(next);
                    cluster = next;
                }
            }
        }
    }

    fn check_cluster(&self, cluster: u32) -> Result<(), FatError> {
        if cluster < FIRST_CLUSTER || cluster - FIRST_CLUSTER >= self.clusters {
            return Err(FatError::Corrupt(format!("cluster {cluster} out of range")));
        }
        Ok(())
    }

    fn fat_entry(&self, cluster: u32) -> Result<u32, FatError> {
        self.check_cluster(cluster)?;
        let at = self.fat_start + u64::from(cluster) * 4;
        let b = self.slice(at, 4)?;
        let value = get32(b, 0) & ENTRY_MASK;
        match value {
            0 | 1 => Err(FatError::Corrupt(format!("cluster {cluster} is in a chain but free"))),
            BAD_CLUSTER => Err(FatError::Corrupt(format!("cluster {cluster} is marked bad"))),
            next if next >= 0x0FFF_FFF8 => Ok(next),
            next => self.check_cluster(next).map(|()| next),
        }
    }

    fn cluster(&self, cluster: u32) -> Result<&'a [u8], FatError> {
        self.check_cluster(cluster)?;
        let at = self.data_start + u64::from(cluster - FIRST_CLUSTER) * self.cluster_bytes;
        self.slice(at, self.cluster_bytes)
    }

    fn slice(&self, at: u64, len: u64) -> Result<&'a [u8], FatError> {
        let bytes: &'a [u8] = self.bytes;
        usize::try_from(at)
            .ok()
            .zip(usize::try_from(at + len).ok())
            .and_then(|(start, end)| bytes.get(start..end))
            .ok_or_else(|| FatError::Corrupt(format!("offset {at} beyond the image")))
    }
}

/// A short name as text, with the NT lower-case flags applied.
fn short_display(short: &[u8; 11], case: u8) -> String {
    let mut base: Vec<u8> = short[..8].to_vec();
    if base[0] == KANJI_E5 {
        base[0] = DELETED;
    }
    let text = |bytes: &[u8], lower: bool| -> String {
        let s: String = bytes.iter().map(|&b| char::from(b)).collect();
        let s = s.trim_end().to_string();
        if lower {
            s.to_ascii_lowercase()
        } else {
            s
        }
    };
    let base = text(&base, case & CASE_LOWER_BASE != 0);
    let ext = text(&short[8..], case & CASE_LOWER_EXT != 0);
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::{Command, Output};

    const MTIME: u64 = 1_700_000_000;

    fn opts(size_bytes: u64) -> FatOptions {
        FatOptions {
            size_bytes,
            volume_id: 0x1234_ABCD,
            label: "ESP".to_string(),
            mtime: MTIME,
            hidden_sectors: 2048,
        }
    }

    /// Noise in which every 512-byte block starts with its own number, so
    /// a misplaced or repeated cluster shows. Cheap to make: tests run
    /// unoptimised.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let noise: Vec<u8> = (0..8192)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        let mut out = Vec::with_capacity(len + 512);
        for block in 0u64.. {
            if out.len() >= len {
                break;
            }
            let at = (block as usize * 24) % (noise.len() - 512);
            out.extend_from_slice(&(block ^ (seed << 48)).to_le_bytes());
            out.extend_from_slice(&noise[at..at + 504]);
        }
        out.truncate(len);
        out
    }

    struct Esp {
        kernel: Vec<u8>,
        initrd: Vec<u8>,
        efi: Vec<u8>,
    }

    impl Esp {
        /// Built once: making 17 MiB of pattern is most of a test's time.
        fn new() -> &'static Esp {
            static ESP: std::sync::OnceLock<Esp> = std::sync::OnceLock::new();
            ESP.get_or_init(|| Esp {
                kernel: pattern(14 * MIB as usize + 123, 1),
                initrd: pattern(3 * MIB as usize + 7, 2),
                efi: pattern(100 * 1024 + 5, 3),
            })
        }

        fn files(&self) -> Vec<FatFile<'_>> {
            vec![
                FatFile::new("EFI/BOOT/BOOTX64.EFI", &self.efi),
                FatFile::new("loader/loader.conf", b"timeout 0\n"),
                FatFile::new(
                    "loader/entries/a+3.conf",
                    b"title basalt\nversion 1.0.0\nsort-key basalt\nlinux /a/vmlinuz\n\
                      initrd /a/initrd\noptions basalt.slot=a\n",
                ),
                FatFile::new("a/vmlinuz", &self.kernel),
                FatFile::new("a/initrd", &self.initrd),
                FatFile::new("a/empty", b""),
                FatFile::new("Mixed Case Name With Spaces.txt", b"hello"),
            ]
        }
    }

    fn run(cmd: &mut Command) -> Output {
        cmd.env("MTOOLS_SKIP_CHECK", "1");
        cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
    }

    fn text(out: &Output) -> String {
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// `fsck.vfat -n` must pass and say nothing beyond its banner and the
    /// summary line.
    fn assert_fsck_clean(img: &Path) {
        let out = run(Command::new("fsck.vfat").arg("-n").arg("-V").arg(img));
        let said = text(&out);
        assert!(out.status.success(), "fsck.vfat failed:\n{said}");
        for line in said.lines() {
            let known = line.starts_with("fsck.fat ")
                || line.starts_with("Starting check/repair pass.")
                || line.starts_with("Starting verification pass.")
                || line.starts_with(&format!("{}: ", img.display())) && line.contains(" files, ");
            assert!(known, "fsck.vfat complained: {line:?}\n{said}");
        }
    }

    fn temp_image(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("esp.img");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn esp_passes_fsck_and_mtools_reads_it_back() {
        let esp = Esp::new();
        let files = esp.files();
        let img = write_fat32(&files, &opts(40 * MIB)).unwrap();
        let (dir, path) = temp_image(&img);
        assert_fsck_clean(&path);

        let listing = run(Command::new("mdir").args(["-/", "-b", "-i"]).arg(&path).arg("::"));
        assert!(listing.status.success(), "{}", text(&listing));
        let listed: Vec<String> =
            String::from_utf8_lossy(&listing.stdout).lines().map(str::to_string).collect();
        for f in &files {
            let want = format!("::/{}", f.path);
            assert!(listed.contains(&want), "mdir lacks {want}: {listed:?}");
        }

        let conf =
            run(Command::new("mtype").arg("-i").arg(&path).arg("::/loader/entries/a+3.conf"));
        assert!(conf.status.success(), "{}", text(&conf));
        assert_eq!(conf.stdout, files[2].data);

        for (src, data) in [("::/a/vmlinuz", &esp.kernel), ("::/EFI/BOOT/BOOTX64.EFI", &esp.efi)] {
            let copy = dir.path().join("copy");
            let out = run(Command::new("mcopy").args(["-n", "-i"]).arg(&path).arg(src).arg(&copy));
            assert!(out.status.success(), "{}", text(&out));
            assert!(std::fs::read(&copy).unwrap() == *data, "{src} differs");
        }

        // The label is both in the boot sector (minfo) and in the root
        // directory (mlabel), and they agree.
        let info = text(&run(Command::new("minfo").arg("-i").arg(&path).arg("::")));
        assert!(info.contains("disk label=\"ESP        \""), "{info}");
        assert!(info.contains("serial number: 1234ABCD"), "{info}");
        let label = text(&run(Command::new("mlabel").args(["-s", "-i"]).arg(&path).arg("::")));
        assert_eq!(label.trim(), "Volume label is ESP", "{label}");
    }

    #[test]
    fn boot_counter_rename_keeps_fsck_clean() {
        let esp = Esp::new();
        let img = write_fat32(&esp.files(), &opts(40 * MIB)).unwrap();
        let (_dir, path) = temp_image(&img);
        let out = run(Command::new("mren")
            .args(["-i"])
            .arg(&path)
            .args(["::/loader/entries/a+3.conf", "::/loader/entries/a+2-1.conf"]));
        assert!(out.status.success(), "{}", text(&out));
        assert_fsck_clean(&path);

        let renamed = std::fs::read(&path).unwrap();
        let reader = FatReader::new(&renamed).unwrap();
        let names: Vec<String> =
            reader.list_dir("loader/entries").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a+2-1.conf"]);
    }

    #[test]
    fn reader_reads_what_the_writer_wrote() {
        let esp = Esp::new();
        let files = esp.files();
        let img = write_fat32(&files, &opts(40 * MIB)).unwrap();
        let reader = FatReader::new(&img).unwrap();
        for f in &files {
            assert_eq!(reader.read_file(&f.path).unwrap(), f.data, "{}", f.path);
        }
        let root = reader.list_dir("").unwrap();
        let names: Vec<&str> = root.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["EFI", "Mixed Case Name With Spaces.txt", "a", "loader"]);
        assert!(root[0].is_dir && !root[1].is_dir && root[1].size == 5);
        let a = reader.list_dir("/a/").unwrap();
        assert_eq!(
            a,
            [
                DirEntryInfo { name: "empty".into(), is_dir: false, size: 0 },
                DirEntryInfo {
                    name: "initrd".into(),
                    is_dir: false,
                    size: esp.initrd.len() as u64
                },
                DirEntryInfo {
                    name: "vmlinuz".into(),
                    is_dir: false,
                    size: esp.kernel.len() as u64
                },
            ]
        );
        // FAT lookups ignore case, and short aliases resolve too.
        assert_eq!(reader.read_file("efi/boot/bootx64.efi").unwrap(), esp.efi);
        assert_eq!(reader.read_file("LOADER/ENTRIES/A_3~1.CON").unwrap(), files[2].data);
        assert_eq!(reader.label().unwrap(), "ESP");
        assert_eq!(reader.volume_id(), 0x1234_ABCD);
        assert!(matches!(reader.read_file("a"), Err(FatError::IsADirectory { .. })));
        assert!(matches!(reader.list_dir("a/vmlinuz"), Err(FatError::NotADirectory { .. })));
        assert!(matches!(reader.read_file("a/nope"), Err(FatError::NotFound { .. })));
    }

    #[test]
    fn short_names_follow_fat_rules() {
        let img = write_fat32(
            &[
                FatFile::new("EFI/BOOT/BOOTX64.EFI", b"x"),
                FatFile::new("loader/entries/a+3.conf", b"x"),
                FatFile::new("loader/entries/a+2-1.conf", b"x"),
                FatFile::new("loader/entries/A_3~1.CON", b"x"),
                FatFile::new("loader/loader.conf", b"x"),
                FatFile::new("vmlinuz", b"x"),
            ],
            &opts(40 * MIB),
        )
        .unwrap();
        let reader = FatReader::new(&img).unwrap();
        let shorts = |path: &str| -> Vec<(String, String)> {
            let cluster = reader.dir_cluster(path).unwrap();
            reader.entries(cluster).unwrap().into_iter().map(|e| (e.name, e.short)).collect()
        };
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        };
        assert_eq!(shorts("EFI/BOOT"), pairs(&[("BOOTX64.EFI", "BOOTX64.EFI")]));
        // The exact name keeps `A_3~1.CON`, so the alias moves on to ~2.
        assert_eq!(
            shorts("loader/entries"),
            pairs(&[
                ("A_3~1.CON", "A_3~1.CON"),
                ("a+2-1.conf", "A_2-1~1.CON"),
                ("a+3.conf", "A_3~2.CON"),
            ])
        );
        assert_eq!(
            shorts(""),
            pairs(&[("EFI", "EFI"), ("loader", "LOADER"), ("vmlinuz", "VMLINUZ")])
        );
        assert_eq!(shorts("loader")[1], ("loader.conf".into(), "LOADER~1.CON".into()));

        // Names already in upper-case 8.3 carry no long-name entries.
        let root = reader.cluster(reader.root_cluster).unwrap();
        assert_eq!(&root[..11], b"ESP        ");
        assert_eq!(&root[32..43], b"EFI        ");
        assert_eq!(root[32 + 11], ATTR_DIRECTORY);
    }

    #[test]
    fn dot_entries_are_plain_and_dotdot_of_top_level_is_zero() {
        let img =
            write_fat32(&[FatFile::new("loader/entries/x.conf", b"x")], &opts(40 * MIB)).unwrap();
        let reader = FatReader::new(&img).unwrap();
        let loader = reader.dir_cluster("loader").unwrap();
        let entries = reader.dir_cluster("loader/entries").unwrap();
        let d = reader.cluster(loader).unwrap();
        assert_eq!(&d[..11], b".          ");
        assert_eq!(&d[32..43], b"..         ");
        assert_eq!(u32::from(get16(d, 26)), loader);
        assert_eq!(get16(d, 32 + 26), 0);
        let d = reader.cluster(entries).unwrap();
        assert_eq!(u32::from(get16(d, 32 + 26)), loader);
    }

    #[test]
    fn long_name_entries_are_laid_out_as_windows_does() {
        let short = *b"A_3~1   CON";
        let sum = lfn_checksum(&short);
        let e = lfn_entries_bytes("a+3.conf", &short);
        assert_eq!(e.len(), 32);
        assert_eq!((e[0], e[11], e[12], e[13]), (0x41, ATTR_LONG_NAME, 0, sum));
        assert_eq!(get16(&e, 26), 0, "long-name entries have no cluster");
        let units: Vec<u16> = LFN_OFFSETS.iter().map(|&o| get16(&e, o)).collect();
        let mut want: Vec<u16> = "a+3.conf".encode_utf16().collect();
        want.push(0);
        want.resize(13, 0xFFFF);
        assert_eq!(units, want);

        // Exactly 13 units: no terminator. 14: a second entry, stored first.
        let e = lfn_entries_bytes("thirteen.char", &short);
        assert_eq!(e.len(), 32);
        assert_eq!(get16(&e, 30), u16::from(b'r'));
        let e = lfn_entries_bytes("fourteen.chars", &short);
        assert_eq!((e.len(), e[0], e[32]), (64, 0x42, 0x01));
        assert_eq!((get16(&e, 1), get16(&e, 3), get16(&e, 5)), (u16::from(b's'), 0, 0xFFFF));

        // The checksum Microsoft's specification gives, spelled out.
        let mut want = 0u8;
        for b in short {
            want = (if want & 1 == 1 { 0x80u8 } else { 0 }).wrapping_add(want >> 1).wrapping_add(b);
        }
        assert_eq!(sum, want);
    }

    #[test]
    fn names_beyond_ascii_round_trip() {
        let names =
            ["caf\u{e9} \u{1F600}.txt", "\u{65e5}\u{672c}\u{8a9e}", ".hidden", "my.file.tar.gz"];
        let files: Vec<FatFile<'_>> =
            names.iter().map(|n| FatFile::new(*n, n.as_bytes())).collect();
        let img = write_fat32(&files, &opts(40 * MIB)).unwrap();
        let reader = FatReader::new(&img).unwrap();
        let entries = reader.entries(reader.root_cluster).unwrap();
        let got: Vec<(&str, &str)> =
            entries.iter().map(|e| (e.name.as_str(), e.short.as_str())).collect();
        assert_eq!(
            got,
            [
                (".hidden", "HIDDEN~1"),
                ("caf\u{e9} \u{1F600}.txt", "CAF__~1.TXT"),
                ("my.file.tar.gz", "MY~1.GZ"),
                ("\u{65e5}\u{672c}\u{8a9e}", "___~1"),
            ]
        );
        for n in names {
            assert_eq!(reader.read_file(n).unwrap(), n.as_bytes());
        }
        let (_d, path) = temp_image(&img);
        assert_fsck_clean(&path);
    }

    #[test]
    fn writes_are_reproducible() {
        let esp = Esp::new();
        let a = write_fat32(&esp.files(), &opts(40 * MIB)).unwrap();
        let mut reversed = esp.files();
        reversed.reverse();
        let b = write_fat32(&reversed, &opts(40 * MIB)).unwrap();
        assert!(a == b, "same content in another order gave other bytes");
    }

    #[test]
    fn timestamps_are_dos_time_in_utc() {
        // 2023-11-14 22:13:20 UTC.
        let t = DosTime::from_unix(MTIME);
        assert_eq!(t.date, (43 << 9) | (11 << 5) | 14);
        assert_eq!(t.time, (22 << 11) | (13 << 5) | 10);
        assert_eq!(t.tenths, 0);
        assert_eq!(DosTime::from_unix(MTIME + 1).tenths, 100);
        // Before 1980 clamps to FAT's epoch.
        assert_eq!(DosTime::from_unix(0), DosTime { date: (1 << 5) | 1, time: 0, tenths: 0 });
        let latest = DosTime::from_unix(u64::MAX);
        assert_eq!(latest.date >> 9, 127);
    }

    #[test]
    fn layouts_are_valid_fat32_across_sizes() {
        let mut sizes: Vec<u64> = (33..=1100).step_by(7).map(|m| m * MIB).collect();
        sizes.extend([2 * 1024 * MIB, 64 * 1024 * MIB, (u64::from(u32::MAX)) * SECTOR]);
        for size in sizes {
            let l = Layout::for_sectors((size / SECTOR) as u32).unwrap();
            assert!(l.clusters >= MIN_CLUSTERS && l.clusters <= MAX_CLUSTERS, "{size}: {l:?}");
            assert!(u64::from(l.clusters + 2) * 4 <= u64::from(l.fat_sectors) * SECTOR);
            assert!(l.data_start_bytes().is_multiple_of(l.cluster_bytes()), "{size}: {l:?}");
            let end = l.data_start_bytes() + u64::from(l.clusters) * l.cluster_bytes();
            assert!(end <= size, "{size}: {l:?}");
            // The FATs are sized for the clusters, not much beyond.
            let spare = u64::from(l.fat_sectors) * SECTOR / 4 - u64::from(l.clusters);
            assert!(spare < u64::from(l.clusters) / 50 + 1024, "{size}: {l:?}");
        }
        assert_eq!(
            Layout::for_sectors((256 * MIB / SECTOR) as u32).unwrap().sectors_per_cluster,
            4
        );
        assert_eq!(
            Layout::for_sectors((1024 * MIB / SECTOR) as u32).unwrap().sectors_per_cluster,
            8
        );
    }

    #[test]
    fn smallest_fat32_passes_fsck() {
        let err = write_fat32(&[], &opts(32 * MIB)).unwrap_err();
        let FatError::TooSmall { need, have } = err else { panic!("{err}") };
        assert_eq!((need, have), (33 * MIB, 32 * MIB));
        let img = write_fat32(&[FatFile::new("a", b"x")], &opts(need)).unwrap();
        let (_dir, path) = temp_image(&img);
        assert_fsck_clean(&path);
    }

    #[test]
    fn too_small_for_content_says_how_much_is_needed() {
        let kernel = vec![0x5A; 40 * MIB as usize];
        let err = write_fat32(&[FatFile::new("a/vmlinuz", &kernel)], &opts(40 * MIB)).unwrap_err();
        let FatError::TooSmall { need, have: _ } = err else { panic!("{err}") };
        assert_eq!(need, 41 * MIB);
        assert!(err.to_string().contains("at least 41 MiB"), "{err}");
        assert!(err.to_string().contains("raise the esp size in the board file"), "{err}");
        write_fat32(&[FatFile::new("a/vmlinuz", &kernel)], &opts(need)).unwrap();
    }

    #[test]
    fn bad_names_and_sizes_are_refused() {
        let bad = [
            "", "/EFI", "a//b", "a/", "a/../b", "a/./b", "x:y", "x?", "a\\b", "tab\tx", "dot.",
            "sp ",
        ];
        for path in bad {
            let err = write_fat32(&[FatFile::new(path, b"x")], &opts(40 * MIB)).unwrap_err();
            assert!(matches!(err, FatError::BadName { .. }), "{path:?}: {err}");
        }
        let long = "x".repeat(256);
        assert!(matches!(
            write_fat32(&[FatFile::new(long, b"x")], &opts(40 * MIB)),
            Err(FatError::BadName { .. })
        ));
        for pair in [["a", "A"], ["a", "a/b"], ["a/b", "a"], ["x/y", "x/y"]] {
            let files = [FatFile::new(pair[0], b"x"), FatFile::new(pair[1], b"y")];
            let err = write_fat32(&files, &opts(40 * MIB)).unwrap_err();
            assert!(matches!(err, FatError::Duplicate { .. }), "{pair:?}: {err}");
        }
        assert!(matches!(write_fat32(&[], &opts(40 * MIB + 1)), Err(FatError::Unaligned { .. })));
        assert!(matches!(write_fat32(&[], &opts(3 << 40)), Err(FatError::TooLarge { .. })));
        let mut o = opts(40 * MIB);
        o.label = "TWELVE CHARS".into();
        assert!(matches!(write_fat32(&[], &o), Err(FatError::BadLabel { .. })));
        o.label = "a.b".into();
        assert!(matches!(write_fat32(&[], &o), Err(FatError::BadLabel { .. })));
    }

    #[test]
    fn one_gib_volume_is_sparse_and_clean() {
        let esp = Esp::new();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("esp.img");
        let mut file = std::fs::File::create(&path).unwrap();
        let mut o = opts(1024 * MIB);
        o.label = "esp-b".into();
        o.mtime = 0;
        write_fat32_to(&esp.files(), &o, &mut file).unwrap();
        drop(file);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1024 * MIB);
        // Free clusters were skipped: only about the content is allocated.
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 64 * MIB, "{} bytes allocated", meta.blocks() * 512);
        assert_fsck_clean(&path);
        let copy = dir.path().join("vmlinuz");
        let out = run(Command::new("mcopy").arg("-i").arg(&path).arg("::/a/vmlinuz").arg(&copy));
        assert!(out.status.success(), "{}", text(&out));
        assert!(std::fs::read(&copy).unwrap() == esp.kernel);
        let label = text(&run(Command::new("mlabel").args(["-s", "-i"]).arg(&path).arg("::")));
        assert_eq!(label.trim(), "Volume label is ESP-B", "{label}");
    }

    #[test]
    fn writer_starts_at_the_partition_offset_over_stale_bytes() {
        let esp = Esp::new();
        let mut disk = Cursor::new(vec![0xA5u8; (MIB + 40 * MIB) as usize]);
        disk.set_position(MIB);
        write_fat32_to(&esp.files(), &opts(40 * MIB), &mut disk).unwrap();
        let disk = disk.into_inner();
        assert!(disk[..MIB as usize] == vec![0xA5; MIB as usize], "wrote before the partition");
        let part = &disk[MIB as usize..];
        let clean = write_fat32(&esp.files(), &opts(40 * MIB)).unwrap();
        assert_eq!(part.len(), clean.len());
        // Everything up to the last used cluster is written; free clusters
        // keep the stale bytes, save the last sector, written for length.
        let plan = Plan::new(&esp.files(), &opts(40 * MIB)).unwrap();
        let used = (plan.layout.data_start_bytes()
            + u64::from(plan.next_free - FIRST_CLUSTER) * plan.layout.cluster_bytes())
            as usize;
        let last = part.len() - SECTOR as usize;
        assert!(part[..used] == clean[..used], "metadata or content differs");
        assert!(part[used..last] == vec![0xA5; last - used], "free clusters were written");
        assert!(part[last..] == [0; SECTOR as usize]);
        let (_d, img) = temp_image(part);
        assert_fsck_clean(&img);
    }

    #[test]
    fn reads_what_mkfs_and_mcopy_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("mkfs.img");
        let out = run(Command::new("mkfs.vfat")
            .args(["-F", "32", "-n", "MKFS", "-i", "0badcafe", "-C"])
            .arg(&img)
            .arg((64 * 1024).to_string()));
        assert!(out.status.success(), "{}", text(&out));

        let big = pattern(300 * 1024 + 1, 4);
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("loader/entries/a+3.conf", b"title a\n".to_vec()),
            ("loader/entries/b+0-3.conf", b"title b\n".to_vec()),
            ("loader/loader.conf", b"timeout 0\n".to_vec()),
            ("readme.txt", b"lower-case 8.3\n".to_vec()),
            ("UPPER.TXT", b"upper\n".to_vec()),
            ("A name that needs three long-name entries.bin", big.clone()),
            ("empty", Vec::new()),
        ];
        let run_ok = |cmd: &mut Command| {
            let out = run(cmd);
            assert!(out.status.success(), "{cmd:?}: {}", text(&out));
        };
        run_ok(Command::new("mmd").arg("-i").arg(&img).args(["::/loader", "::/loader/entries"]));
        for (i, (path, data)) in files.iter().enumerate() {
            let src = dir.path().join(format!("src{i}"));
            std::fs::write(&src, data).unwrap();
            run_ok(Command::new("mcopy").arg("-i").arg(&img).arg(&src).arg(format!("::/{path}")));
        }
        // Leave a deleted entry and its long name behind.
        run_ok(Command::new("mdel").arg("-i").arg(&img).arg("::/loader/entries/b+0-3.conf"));

        let bytes = std::fs::read(&img).unwrap();
        let reader = FatReader::new(&bytes).unwrap();
        assert_eq!(reader.label().unwrap(), "MKFS");
        assert_eq!(reader.volume_id(), 0x0bad_cafe);
        for (path, data) in &files {
            if path.starts_with("loader/entries/b") {
                continue;
            }
            assert_eq!(&reader.read_file(path).unwrap(), data, "{path}");
        }
        let mut root: Vec<String> =
            reader.list_dir("/").unwrap().into_iter().map(|e| e.name).collect();
        root.sort();
        assert_eq!(
            root,
            [
                "A name that needs three long-name entries.bin",
                "UPPER.TXT",
                "empty",
                "loader",
                "readme.txt"
            ]
        );
        let entries = reader.list_dir("loader/entries").unwrap();
        assert_eq!(entries, [DirEntryInfo { name: "a+3.conf".into(), is_dir: false, size: 8 }]);
    }

    #[test]
    fn reader_refuses_garbage_without_panicking() {
        assert!(matches!(FatReader::new(&[0u8; 100]), Err(FatError::Corrupt(_))));
        assert!(matches!(FatReader::new(&[0u8; 4096]), Err(FatError::Corrupt(_))));
        let img = write_fat32(&[FatFile::new("a/b", b"x")], &opts(40 * MIB)).unwrap();
        assert!(matches!(FatReader::new(&img[..MIB as usize]), Err(FatError::Corrupt(_))));
        // A FAT whose root chain loops onto itself.
        let mut looped = img.clone();
        let fat = RESERVED_SECTORS as usize * 512;
        looped[fat + 8..fat + 12].copy_from_slice(&2u32.to_le_bytes());
        let reader = FatReader::new(&looped).unwrap();
        assert!(matches!(reader.list_dir(""), Err(FatError::Corrupt(_))));
    }
}
