//! The GUID Partition Table of a disk image: placing partitions, writing the
//! protective MBR and both table copies, and reading them back for
//! `basalt inspect`.
//!
//! This module owns only the table. Partition contents are written by the
//! caller at the offsets [`plan`] returns, into the same sparse file, so a
//! disk of gigabytes costs only the bytes actually written. Labels and type
//! GUIDs come from `basalt_bundle::layout`; nothing here knows which
//! partition is which.
//!
//! Every partition starts and ends on a 1 MiB boundary, so that partitions
//! line up with the erase blocks of flash media and partitioning tools find
//! nothing to warn about.

use std::io::{self, Read, Seek, SeekFrom, Write};

use basalt_bundle::Guid;

/// Bytes per logical block. The SD cards, eMMC and USB sticks the gateways
/// boot from all report 512, and a disk image has no device to ask.
pub const SECTOR_SIZE: u64 = 512;
/// Granularity of partition starts, partition sizes and the disk size.
pub const ALIGNMENT: u64 = 1 << 20;
/// Longest partition name GPT can hold, in UTF-16 code units.
pub const MAX_LABEL_UNITS: usize = 36;
/// Number of partition entries in each table copy. 128 is the minimum the
/// UEFI specification allows and what every tool writes.
pub const ENTRY_COUNT: u32 = 128;

const ENTRY_SIZE: u32 = 128;
const ENTRIES_BYTES: usize = (ENTRY_COUNT * ENTRY_SIZE) as usize;
const ENTRIES_SECTORS: u64 = ENTRIES_BYTES as u64 / SECTOR_SIZE;
const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION_1_0: u32 = 0x0001_0000;
const HEADER_SIZE: u32 = 92;
/// Largest entry array `read` accepts, so that a damaged header whose CRC
/// happens to match cannot make it allocate gigabytes.
const MAX_ENTRIES_BYTES: u64 = 4 << 20;

/// One partition as the recipe and board ask for it; [`plan`] places it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    /// PARTLABEL, at most [`MAX_LABEL_UNITS`] UTF-16 code units.
    pub label: String,
    /// Partition type GUID (see `basalt_bundle::layout`).
    pub type_guid: Guid,
    /// Unique partition GUID (PARTUUID).
    pub guid: Guid,
    /// Requested size; rounded up to [`ALIGNMENT`].
    pub size_bytes: u64,
}

/// The partitions of a disk, in on-disk order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    /// Disk GUID of the table.
    pub disk_guid: Guid,
    /// Partitions, placed one after the other in this order and numbered
    /// from 1.
    pub partitions: Vec<PartitionSpec>,
    /// Size of the whole disk, a multiple of [`ALIGNMENT`]; `None` makes the
    /// disk just big enough for the partitions and the backup table.
    pub disk_size: Option<u64>,
    /// Where the first partition starts, a multiple of [`ALIGNMENT`];
    /// `None` is 1 MiB. A U-Boot board keeps its environment in front of
    /// it.
    pub first_offset: Option<u64>,
}

/// A partition with its place on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedPartition {
    /// Partition number, from 1, as in `/dev/sda2` or `sgdisk -i 2`.
    pub index: u32,
    /// PARTLABEL.
    pub label: String,
    /// Partition type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID (PARTUUID).
    pub guid: Guid,
    /// Byte offset of the first byte from the start of the disk.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Why a partition table could not be planned, written or read.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// The partitions and both table copies do not fit the requested disk.
    #[error(
        "the partitions need a disk of at least {needed} bytes ({} MiB), but the disk size is \
         {disk_size} bytes ({} MiB): raise the disk size or shrink the partitions",
        .needed / ALIGNMENT,
        .disk_size / ALIGNMENT
    )]
    DoesNotFit {
        /// Smallest disk size that would hold the layout.
        needed: u64,
        /// The disk size asked for.
        disk_size: u64,
    },
    /// A requested start of the first partition is not a whole number of
    /// MiB from 1 MiB up.
    #[error(
        "the first partition cannot start at byte {0}: give a whole number of MiB, at least 1"
    )]
    UnalignedFirstOffset(u64),
    /// A requested disk size is not a whole number of MiB.
    #[error("disk size {0} bytes is not a multiple of 1 MiB: round it to a whole number of MiB")]
    UnalignedDiskSize(u64),
    /// A label does not fit GPT's 36 UTF-16 code units.
    #[error(
        "partition label {label:?} is {units} UTF-16 code units long; GPT holds at most 36: \
         shorten it"
    )]
    LabelTooLong {
        /// The label.
        label: String,
        /// Its length in UTF-16 code units.
        units: usize,
    },
    /// A partition was asked for with no size.
    #[error("partition {label:?} has size 0: give it a size of at least 1 MiB or remove it")]
    ZeroSize {
        /// The partition's label.
        label: String,
    },
    /// More partitions than the table has entries.
    #[error("{0} partitions requested, but a GPT holds at most 128: remove some")]
    TooManyPartitions(usize),
    /// The sizes add up past what a `u64` byte count can express.
    #[error("the partition sizes add up to more than 16 EiB: check the sizes in the layout")]
    SizeOverflow,
    /// [`write_headers`] was given a placement [`plan`] would not produce.
    #[error("partition {index} {problem}: place partitions with gpt::plan")]
    BadPlacement {
        /// Partition number.
        index: u32,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// [`write_headers`] was given a disk size that cannot hold a GPT.
    #[error(
        "disk size {0} bytes is not a whole number of 512-byte sectors large enough for a GPT: \
         take the disk size from gpt::plan"
    )]
    BadDiskSize(u64),
    /// The image file is already longer than the disk it should hold.
    #[error(
        "the image file is already {len} bytes, longer than the {disk_size}-byte disk: write \
         the table into a new, empty file"
    )]
    FileTooLong {
        /// Current length of the file.
        len: u64,
        /// The disk size.
        disk_size: u64,
    },
    /// Writing the table failed.
    #[error("cannot write the partition table: {0} (is the disk full?)")]
    Write(#[source] io::Error),
    /// Reading the table failed.
    #[error("cannot read the partition table: {0}")]
    Read(#[source] io::Error),
    /// Neither table copy is valid.
    #[error(
        "no valid GPT: primary: {primary}; backup: {backup}. This is not a disk image, or both \
         tables are damaged: rebuild or re-download the image"
    )]
    NoValidTable {
        /// What is wrong with the primary copy.
        primary: TableDefect,
        /// What is wrong with the backup copy.
        backup: TableDefect,
    },
}

/// What makes one copy of the table unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableDefect {
    /// The disk cannot even hold the header where it should be.
    #[error("the disk is too small to hold a GPT")]
    DiskTooSmall,
    /// No `EFI PART` signature.
    #[error("no `EFI PART` signature at LBA {0}")]
    NoSignature(u64),
    /// A header size outside what the specification allows.
    #[error("header size {0} is outside 92..=512")]
    HeaderSize(u32),
    /// The header's CRC does not match its content.
    #[error("header checksum is {stored:#010x} but the header hashes to {computed:#010x}")]
    HeaderChecksum {
        /// Value stored in the header.
        stored: u32,
        /// Value computed over the header.
        computed: u32,
    },
    /// The header does not say it lives where it was found.
    #[error("header read from LBA {read_at} says it is at LBA {claims}")]
    Misplaced {
        /// Where it was read.
        read_at: u64,
        /// Where it says it is.
        claims: u64,
    },
    /// The entry array is unusable as described.
    #[error("entry array: {0}")]
    EntryArray(&'static str),
    /// The entry array's CRC does not match its content.
    #[error("entry array checksum is {stored:#010x} but the entries hash to {computed:#010x}")]
    EntriesChecksum {
        /// Value stored in the header.
        stored: u32,
        /// Value computed over the entries.
        computed: u32,
    },
    /// The header's usable area is empty or extends past the disk.
    #[error("usable area LBA {first}-{last} is empty or extends past the end of the disk")]
    UsableArea {
        /// First usable LBA as the header gives it.
        first: u64,
        /// Last usable LBA as the header gives it.
        last: u64,
    },
    /// An entry whose range is empty or outside the usable area.
    #[error("partition {0} lies outside the usable area or ends before it starts")]
    BadEntry(u32),
}

/// Where each GPT structure lies on a disk of a given number of sectors.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    sectors: u64,
}

impl Geometry {
    const PRIMARY_HEADER: u64 = 1;
    const PRIMARY_ENTRIES: u64 = 2;
    const FIRST_USABLE: u64 = Self::PRIMARY_ENTRIES + ENTRIES_SECTORS;

    /// `None` when the disk cannot hold the MBR, both tables and one
    /// usable sector.
    fn of_disk(disk_size: u64) -> Option<Geometry> {
        let sectors = disk_size / SECTOR_SIZE;
        let fits = sectors > Self::FIRST_USABLE + ENTRIES_SECTORS + 1;
        (fits && disk_size.is_multiple_of(SECTOR_SIZE)).then_some(Geometry { sectors })
    }

    fn backup_header(self) -> u64 {
        self.sectors - 1
    }

    fn backup_entries(self) -> u64 {
        self.backup_header() - ENTRIES_SECTORS
    }

    fn last_usable(self) -> u64 {
        self.backup_entries() - 1
    }
}

/// Bytes after the last usable sector: the backup entries and header.
const BACKUP_BYTES: u64 = (ENTRIES_SECTORS + 1) * SECTOR_SIZE;

fn round_up(bytes: u64) -> Option<u64> {
    bytes.div_ceil(ALIGNMENT).checked_mul(ALIGNMENT)
}

fn label_units(label: &str) -> usize {
    label.encode_utf16().count()
}

fn check_label(label: &str) -> Result<(), GptError> {
    let units = label_units(label);
    if units > MAX_LABEL_UNITS {
        return Err(GptError::LabelTooLong { label: label.to_string(), units });
    }
    Ok(())
}

/// Places the partitions one after the other from 1 MiB (or the layout's
/// `first_offset`), each rounded up to
/// a whole MiB, and returns them with the disk size.
pub fn plan(layout: &DiskLayout) -> Result<(Vec<PlacedPartition>, u64), GptError> {
    if layout.partitions.len() > ENTRY_COUNT as usize {
        return Err(GptError::TooManyPartitions(layout.partitions.len()));
    }
    // The primary table ends at LBA 33, so the first aligned start is 1 MiB.
    let mut next = match layout.first_offset {
        None => ALIGNMENT,
        Some(at) if at < ALIGNMENT || !at.is_multiple_of(ALIGNMENT) => {
            return Err(GptError::UnalignedFirstOffset(at))
        }
        Some(at) => at,
    };
    let mut placed = Vec::with_capacity(layout.partitions.len());
    for (index, spec) in (1..).zip(&layout.partitions) {
        check_label(&spec.label)?;
        if spec.size_bytes == 0 {
            return Err(GptError::ZeroSize { label: spec.label.clone() });
        }
        let size = round_up(spec.size_bytes).ok_or(GptError::SizeOverflow)?;
        placed.push(PlacedPartition {
            index,
            label: spec.label.clone(),
            type_guid: spec.type_guid,
            guid: spec.guid,
            offset: next,
            size,
        });
        next = next.checked_add(size).ok_or(GptError::SizeOverflow)?;
    }
    let needed = next.checked_add(BACKUP_BYTES).and_then(round_up).ok_or(GptError::SizeOverflow)?;
    let disk_size = match layout.disk_size {
        None => needed,
        Some(size) if !size.is_multiple_of(ALIGNMENT) => {
            return Err(GptError::UnalignedDiskSize(size))
        }
        Some(size) if size < needed => {
            return Err(GptError::DoesNotFit { needed, disk_size: size })
        }
        Some(size) => size,
    };
    Ok((placed, disk_size))
}

/// Little-endian fields at fixed offsets of an on-disk structure.
struct Fields<'a>(&'a mut [u8]);

impl Fields<'_> {
    fn put(&mut self, at: usize, bytes: &[u8]) {
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn put_u32(&mut self, at: usize, value: u32) {
        self.put(at, &value.to_le_bytes());
    }

    fn put_u64(&mut self, at: usize, value: u64) {
        self.put(at, &value.to_le_bytes());
    }
}

fn get<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[at..at + N]);
    out
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(get(buf, at))
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(get(buf, at))
}

/// The MBR in sector 0 that makes MBR-only tools see one partition of
/// unknown type covering the disk, instead of free space to reuse.
struct ProtectiveMbr {
    disk_sectors: u64,
}

impl ProtectiveMbr {
    const RECORD: usize = 446;
    const OS_TYPE_GPT: u8 = 0xEE;
    /// CHS address of LBA 1, as the UEFI specification fixes it.
    const START_CHS: [u8; 3] = [0x00, 0x02, 0x00];
    /// "Too large for CHS", which every disk over 8 GiB is and which the
    /// specification allows for any size.
    const END_CHS: [u8; 3] = [0xFF, 0xFF, 0xFF];

    fn encode(&self) -> [u8; SECTOR_SIZE as usize] {
        let mut sector = [0u8; SECTOR_SIZE as usize];
        // The MBR's 32-bit size field cannot describe disks past 2 TiB; the
        // specification says to saturate it.
        let covered = u32::try_from(self.disk_sectors - 1).unwrap_or(u32::MAX);
        let mut f = Fields(&mut sector);
        let r = Self::RECORD;
        f.put(r + 1, &Self::START_CHS);
        f.put(r + 4, &[Self::OS_TYPE_GPT]);
        f.put(r + 5, &Self::END_CHS);
        f.put_u32(r + 8, 1);
        f.put_u32(r + 12, covered);
        f.put(510, &[0x55, 0xAA]);
        sector
    }
}

/// A GPT header (UEFI specification, table 5-5).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries_crc: u32,
}

impl Header {
    const CRC_AT: usize = 16;

    fn encode(&self) -> [u8; SECTOR_SIZE as usize] {
        let mut sector = [0u8; SECTOR_SIZE as usize];
        let mut f = Fields(&mut sector);
        f.put(0, SIGNATURE);
        f.put_u32(8, REVISION_1_0);
        f.put_u32(12, HEADER_SIZE);
        f.put_u64(24, self.my_lba);
        f.put_u64(32, self.alternate_lba);
        f.put_u64(40, self.first_usable);
        f.put_u64(48, self.last_usable);
        f.put(56, &self.disk_guid.to_gpt_bytes());
        f.put_u64(72, self.entries_lba);
        f.put_u32(80, self.entry_count);
        f.put_u32(84, self.entry_size);
        f.put_u32(88, self.entries_crc);
        let crc = Self::crc(&sector[..HEADER_SIZE as usize]);
        Fields(&mut sector).put_u32(Self::CRC_AT, crc);
        sector
    }

    /// CRC32 of the header with its own CRC field taken as zero.
    fn crc(header: &[u8]) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header[..Self::CRC_AT]);
        hasher.update(&[0; 4]);
        hasher.update(&header[Self::CRC_AT + 4..]);
        hasher.finalize()
    }

    /// Checks signature, size, CRC and location of the header read from
    /// sector `read_at`.
    fn decode(sector: &[u8], read_at: u64) -> Result<Header, TableDefect> {
        if &sector[..8] != SIGNATURE {
            return Err(TableDefect::NoSignature(read_at));
        }
        let size = get_u32(sector, 12);
        if !(HEADER_SIZE..=SECTOR_SIZE as u32).contains(&size) {
            return Err(TableDefect::HeaderSize(size));
        }
        let stored = get_u32(sector, Self::CRC_AT);
        let computed = Self::crc(&sector[..size as usize]);
        if stored != computed {
            return Err(TableDefect::HeaderChecksum { stored, computed });
        }
        let header = Header {
            my_lba: get_u64(sector, 24),
            alternate_lba: get_u64(sector, 32),
            first_usable: get_u64(sector, 40),
            last_usable: get_u64(sector, 48),
            disk_guid: Guid::from_gpt_bytes(get(sector, 56)),
            entries_lba: get_u64(sector, 72),
            entry_count: get_u32(sector, 80),
            entry_size: get_u32(sector, 84),
            entries_crc: get_u32(sector, 88),
        };
        if header.my_lba != read_at {
            return Err(TableDefect::Misplaced { read_at, claims: header.my_lba });
        }
        Ok(header)
    }
}

/// One partition entry (UEFI specification, table 5-6).
struct Entry {
    type_guid: Guid,
    guid: Guid,
    first_lba: u64,
    /// Inclusive, as the specification defines it.
    last_lba: u64,
    name: String,
}

impl Entry {
    const NAME_AT: usize = 56;

    fn encode(&self) -> [u8; ENTRY_SIZE as usize] {
        let mut raw = [0u8; ENTRY_SIZE as usize];
        let mut f = Fields(&mut raw);
        f.put(0, &self.type_guid.to_gpt_bytes());
        f.put(16, &self.guid.to_gpt_bytes());
        f.put_u64(32, self.first_lba);
        f.put_u64(40, self.last_lba);
        // Attributes (offset 48) stay 0: basalt's slot state lives in boot
        // entry names, not in GPT attribute bits.
        for (i, unit) in self.name.encode_utf16().take(MAX_LABEL_UNITS).enumerate() {
            f.put(Self::NAME_AT + 2 * i, &unit.to_le_bytes());
        }
        raw
    }

    /// `None` for an unused entry (all-zero type GUID).
    fn decode(raw: &[u8]) -> Option<Entry> {
        if raw[..16].iter().all(|b| *b == 0) {
            return None;
        }
        let units: Vec<u16> = raw[Self::NAME_AT..Self::NAME_AT + 2 * MAX_LABEL_UNITS]
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
            .take_while(|unit| *unit != 0)
            .collect();
        Some(Entry {
            type_guid: Guid::from_gpt_bytes(get(raw, 0)),
            guid: Guid::from_gpt_bytes(get(raw, 16)),
            first_lba: get_u64(raw, 32),
            last_lba: get_u64(raw, 40),
            name: String::from_utf16_lossy(&units),
        })
    }
}

fn check_placement(geometry: Geometry, parts: &[PlacedPartition]) -> Result<(), GptError> {
    if parts.len() > ENTRY_COUNT as usize {
        return Err(GptError::TooManyPartitions(parts.len()));
    }
    let mut by_offset: Vec<&PlacedPartition> = parts.iter().collect();
    by_offset.sort_by_key(|p| p.offset);
    let mut used = [false; ENTRY_COUNT as usize];
    let mut free_from = Geometry::FIRST_USABLE * SECTOR_SIZE;
    for part in by_offset {
        let bad = |problem| Err(GptError::BadPlacement { index: part.index, problem });
        check_label(&part.label)?;
        let slot = match part.index.checked_sub(1) {
            Some(slot) if slot < ENTRY_COUNT => slot as usize,
            _ => return bad("has a number outside 1..=128"),
        };
        if std::mem::replace(&mut used[slot], true) {
            return bad("is numbered twice");
        }
        if part.size == 0
            || !part.offset.is_multiple_of(SECTOR_SIZE)
            || !part.size.is_multiple_of(SECTOR_SIZE)
        {
            return bad("is empty or not a whole number of sectors");
        }
        if part.offset < free_from {
            return bad("overlaps the primary table or the partition before it");
        }
        free_from = part.offset.saturating_add(part.size);
        if free_from > (geometry.last_usable() + 1) * SECTOR_SIZE {
            return bad("runs into the backup table at the end of the disk");
        }
    }
    Ok(())
}

fn entry_array(parts: &[PlacedPartition]) -> Vec<u8> {
    let mut array = vec![0u8; ENTRIES_BYTES];
    for part in parts {
        let entry = Entry {
            type_guid: part.type_guid,
            guid: part.guid,
            first_lba: part.offset / SECTOR_SIZE,
            last_lba: (part.offset + part.size) / SECTOR_SIZE - 1,
            name: part.label.clone(),
        };
        let at = (part.index as usize - 1) * ENTRY_SIZE as usize;
        array[at..at + ENTRY_SIZE as usize].copy_from_slice(&entry.encode());
    }
    array
}

/// Writes the protective MBR, the primary table at LBA 1-33 and the backup
/// table in the last 33 sectors of a `disk_size`-byte disk.
///
/// The file should be new or hold only partition contents: the space
/// between the tables is left untouched, so it stays a hole unless the
/// caller writes there. Writing the backup header, the disk's last sector,
/// is what gives the file its full length. Output depends only on the
/// arguments.
pub fn write_headers(
    file: &mut (impl Write + Seek),
    disk_size: u64,
    disk_guid: Guid,
    parts: &[PlacedPartition],
) -> Result<(), GptError> {
    let geometry = Geometry::of_disk(disk_size).ok_or(GptError::BadDiskSize(disk_size))?;
    check_placement(geometry, parts)?;
    let len = file.seek(SeekFrom::End(0)).map_err(GptError::Write)?;
    if len > disk_size {
        return Err(GptError::FileTooLong { len, disk_size });
    }

    let entries = entry_array(parts);
    let entries_crc = crc32fast::hash(&entries);
    let primary = Header {
        my_lba: Geometry::PRIMARY_HEADER,
        alternate_lba: geometry.backup_header(),
        first_usable: Geometry::FIRST_USABLE,
        last_usable: geometry.last_usable(),
        disk_guid,
        entries_lba: Geometry::PRIMARY_ENTRIES,
        entry_count: ENTRY_COUNT,
        entry_size: ENTRY_SIZE,
        entries_crc,
    };
    let backup = Header {
        my_lba: geometry.backup_header(),
        alternate_lba: Geometry::PRIMARY_HEADER,
        entries_lba: geometry.backup_entries(),
        ..primary.clone()
    };

    let mut head = Vec::with_capacity((Geometry::FIRST_USABLE * SECTOR_SIZE) as usize);
    head.extend_from_slice(&ProtectiveMbr { disk_sectors: geometry.sectors }.encode());
    head.extend_from_slice(&primary.encode());
    head.extend_from_slice(&entries);
    let mut tail = entries;
    tail.extend_from_slice(&backup.encode());

    let mut put = |at: u64, bytes: &[u8]| -> io::Result<()> {
        file.seek(SeekFrom::Start(at))?;
        file.write_all(bytes)
    };
    put(0, &head).map_err(GptError::Write)?;
    put(geometry.backup_entries() * SECTOR_SIZE, &tail).map_err(GptError::Write)?;
    file.flush().map_err(GptError::Write)
}

fn read_at(file: &mut (impl Read + Seek), at: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads and checks one table copy whose header is at `header_lba`. The
/// outer error is I/O, the inner one a defect of this copy.
fn read_copy(
    file: &mut (impl Read + Seek),
    geometry: Geometry,
    header_lba: u64,
) -> io::Result<Result<(Guid, Vec<PlacedPartition>), TableDefect>> {
    let sector = read_at(file, header_lba * SECTOR_SIZE, SECTOR_SIZE as usize)?;
    let header = match Header::decode(&sector, header_lba) {
        Ok(header) => header,
        Err(defect) => return Ok(Err(defect)),
    };
    if header.first_usable > header.last_usable || header.last_usable >= geometry.sectors {
        let (first, last) = (header.first_usable, header.last_usable);
        return Ok(Err(TableDefect::UsableArea { first, last }));
    }
    if header.entry_size < ENTRY_SIZE || !header.entry_size.is_multiple_of(8) {
        return Ok(Err(TableDefect::EntryArray("entry size is below 128 or not a multiple of 8")));
    }
    let array_bytes = u64::from(header.entry_count) * u64::from(header.entry_size);
    let array_end = header
        .entries_lba
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(array_bytes));
    if array_bytes > MAX_ENTRIES_BYTES
        || array_end.is_none_or(|end| end > geometry.sectors * SECTOR_SIZE)
    {
        return Ok(Err(TableDefect::EntryArray(
            "it is too large or lies past the end of the disk",
        )));
    }
    let array = read_at(file, header.entries_lba * SECTOR_SIZE, array_bytes as usize)?;
    let computed = crc32fast::hash(&array);
    if computed != header.entries_crc {
        return Ok(Err(TableDefect::EntriesChecksum { stored: header.entries_crc, computed }));
    }

    let mut parts = Vec::new();
    for (index, raw) in (1..).zip(array.chunks_exact(header.entry_size as usize)) {
        let Some(entry) = Entry::decode(raw) else { continue };
        let usable = header.first_usable..=header.last_usable;
        if entry.last_lba < entry.first_lba
            || !usable.contains(&entry.first_lba)
            || !usable.contains(&entry.last_lba)
        {
            return Ok(Err(TableDefect::BadEntry(index)));
        }
        parts.push(PlacedPartition {
            index,
            label: entry.name,
            type_guid: entry.type_guid,
            guid: entry.guid,
            offset: entry.first_lba * SECTOR_SIZE,
            size: (entry.last_lba - entry.first_lba + 1) * SECTOR_SIZE,
        });
    }
    Ok(Ok((header.disk_guid, parts)))
}

/// Reads the disk GUID and partitions of a disk image, checking signature,
/// header CRC and entry-array CRC. The primary copy is preferred; when it
/// is damaged the backup at the end of the disk is used.
pub fn read(file: &mut (impl Read + Seek)) -> Result<(Guid, Vec<PlacedPartition>), GptError> {
    let len = file.seek(SeekFrom::End(0)).map_err(GptError::Read)?;
    let Some(geometry) = Geometry::of_disk(len - len % SECTOR_SIZE) else {
        return Err(GptError::NoValidTable {
            primary: TableDefect::DiskTooSmall,
            backup: TableDefect::DiskTooSmall,
        });
    };
    let primary =
        match read_copy(file, geometry, Geometry::PRIMARY_HEADER).map_err(GptError::Read)? {
            Ok(table) => return Ok(table),
            Err(defect) => defect,
        };
    match read_copy(file, geometry, geometry.backup_header()).map_err(GptError::Read)? {
        Ok(table) => Ok(table),
        Err(backup) => Err(GptError::NoValidTable { primary, backup }),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::process::{Command, Output};

    use basalt_bundle::layout::{
        DATA_LABEL, ESP_LABEL, ESP_TYPE, LINUX_DATA_TYPE, ROOTFS_A_LABEL, ROOTFS_B_LABEL,
        ROOT_X86_64_TYPE,
    };

    use super::*;

    const MIB: u64 = ALIGNMENT;

    fn spec(label: &str, type_guid: Guid, mib: u64) -> PartitionSpec {
        PartitionSpec {
            label: label.to_string(),
            type_guid,
            guid: Guid::derived("test-part", label),
            size_bytes: mib * MIB,
        }
    }

    fn basalt_layout(disk_size: Option<u64>) -> DiskLayout {
        DiskLayout {
            disk_guid: Guid::derived("test-disk", "gpt"),
            partitions: vec![
                spec(ESP_LABEL, ESP_TYPE, 64),
                spec(ROOTFS_A_LABEL, ROOT_X86_64_TYPE, 256),
                spec(ROOTFS_B_LABEL, ROOT_X86_64_TYPE, 256),
                spec(DATA_LABEL, LINUX_DATA_TYPE, 128),
            ],
            disk_size,
            first_offset: None,
        }
    }

    /// Plans `layout` and writes its table into a new file in `dir`.
    fn write_image(dir: &tempfile::TempDir, layout: &DiskLayout) -> std::path::PathBuf {
        let (parts, disk_size) = plan(layout).unwrap();
        let path = dir.path().join("disk.img");
        let mut file = File::create(&path).unwrap();
        write_headers(&mut file, disk_size, layout.disk_guid, &parts).unwrap();
        path
    }

    fn sgdisk(args: &[&str], image: &std::path::Path) -> String {
        let out: Output = Command::new("sgdisk")
            .args(args)
            .arg(image)
            .output()
            .expect("sgdisk not found: install gdisk to run the GPT tests");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "sgdisk {args:?} failed: {text}");
        text
    }

    #[test]
    fn plan_aligns_every_start_and_size_to_one_mib() {
        let mut layout = basalt_layout(None);
        layout.partitions[0].size_bytes = 1;
        layout.partitions[1].size_bytes = MIB + 1;
        let (parts, disk_size) = plan(&layout).unwrap();
        let placed: Vec<_> =
            parts.iter().map(|p| (p.index, p.offset / MIB, p.size / MIB)).collect();
        assert_eq!(placed, [(1, 1, 1), (2, 2, 2), (3, 4, 256), (4, 260, 128)]);
        // The backup table needs 33 sectors after the last partition, which
        // rounds up to one more MiB.
        assert_eq!(disk_size, 389 * MIB);
    }

    #[test]
    fn plan_refuses_long_labels_zero_sizes_and_unaligned_disks() {
        let mut layout = basalt_layout(None);
        layout.partitions[0].label = "é".repeat(36);
        assert!(plan(&layout).is_ok(), "36 UTF-16 units fit, whatever their UTF-8 length");
        // Outside the basic plane a character takes two UTF-16 units.
        layout.partitions[0].label = "\u{1F600}".repeat(18) + "x";
        assert!(matches!(plan(&layout), Err(GptError::LabelTooLong { units: 37, .. })));

        let mut layout = basalt_layout(None);
        layout.partitions[3].size_bytes = 0;
        let err = plan(&layout).unwrap_err();
        assert!(matches!(&err, GptError::ZeroSize { label } if label == DATA_LABEL), "{err}");

        let layout = basalt_layout(Some(1000 * MIB + 1));
        assert!(matches!(plan(&layout), Err(GptError::UnalignedDiskSize(_))));
    }

    #[test]
    fn a_layout_too_big_for_the_disk_says_how_much_is_needed() {
        let err = plan(&basalt_layout(Some(512 * MIB))).unwrap_err();
        // 1 MiB before the first partition, 704 MiB of partitions, 1 MiB for
        // the backup table.
        assert!(
            matches!(err, GptError::DoesNotFit { needed, disk_size } if needed == 706 * MIB && disk_size == 512 * MIB),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("706 MiB") && message.contains("512 MiB"), "{message}");

        let (_, disk_size) = plan(&basalt_layout(Some(706 * MIB))).unwrap();
        assert_eq!(disk_size, 706 * MIB);
    }

    #[test]
    fn sgdisk_accepts_the_table_and_sees_our_labels_and_guids() {
        let dir = tempfile::tempdir().unwrap();
        let layout = basalt_layout(Some(1024 * MIB));
        let image = write_image(&dir, &layout);
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 1024 * MIB);

        let verify = sgdisk(&["-v"], &image);
        assert!(verify.contains("No problems found"), "{verify}");

        let print = sgdisk(&["-p"], &image);
        let upper = |g: Guid| g.to_string().to_uppercase();
        assert!(print.contains(&format!("Disk identifier (GUID): {}", upper(layout.disk_guid))));
        // `sgdisk -p` rows: number, start, end, size, code, name.
        for (number, start, end, size, name) in [
            (1, 2048, 133119, "64.0 MiB", ESP_LABEL),
            (2, 133120, 657407, "256.0 MiB", ROOTFS_A_LABEL),
            (3, 657408, 1181695, "256.0 MiB", ROOTFS_B_LABEL),
            (4, 1181696, 1443839, "128.0 MiB", DATA_LABEL),
        ] {
            let found = print.lines().any(|line| {
                let cols: Vec<_> = line.split_whitespace().collect();
                cols.len() >= 7
                    && cols[0] == number.to_string()
                    && cols[1] == start.to_string()
                    && cols[2] == end.to_string()
                    && format!("{} {}", cols[3], cols[4]) == size
                    && cols[6] == name
            });
            assert!(found, "partition {number} not as expected in:\n{print}");
        }

        let info = sgdisk(&["-i", "2"], &image);
        let rootfs_a = &layout.partitions[1];
        assert!(info.contains(&format!("Partition GUID code: {}", upper(ROOT_X86_64_TYPE))));
        assert!(info.contains(&format!("Partition unique GUID: {}", upper(rootfs_a.guid))));
        assert!(info.contains("Partition name: 'rootfs_a'"), "{info}");
    }

    #[test]
    fn read_round_trips_what_write_headers_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let layout = basalt_layout(None);
        let image = write_image(&dir, &layout);
        let (parts, _) = plan(&layout).unwrap();
        let read_back = read(&mut File::open(&image).unwrap()).unwrap();
        assert_eq!(read_back, (layout.disk_guid, parts));
    }

    #[test]
    fn a_damaged_primary_header_falls_back_to_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let layout = basalt_layout(None);
        let image = write_image(&dir, &layout);
        let expected = read(&mut File::open(&image).unwrap()).unwrap();

        let mut file = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
        // One byte of the disk GUID in the primary header.
        file.seek(SeekFrom::Start(SECTOR_SIZE + 60)).unwrap();
        file.write_all(&[0x5a]).unwrap();
        assert_eq!(read(&mut file).unwrap(), expected);

        // With the backup's entry array damaged too, nothing is left to trust.
        let (_, disk_size) = plan(&layout).unwrap();
        file.seek(SeekFrom::Start(disk_size - BACKUP_BYTES)).unwrap();
        file.write_all(&[0x5a]).unwrap();
        let err = read(&mut file).unwrap_err();
        assert!(
            matches!(
                err,
                GptError::NoValidTable {
                    primary: TableDefect::HeaderChecksum { .. },
                    backup: TableDefect::EntriesChecksum { .. },
                }
            ),
            "{err}"
        );
    }

    /// A U-Boot board's environment sits in front of the first partition.
    #[test]
    fn the_first_partition_starts_where_the_layout_says() {
        let mut layout = basalt_layout(None);
        layout.first_offset = Some(4 * MIB);
        let (parts, _) = plan(&layout).unwrap();
        assert_eq!(parts[0].offset, 4 * MIB);
        assert_eq!(parts[1].offset, 68 * MIB);
        for bad in [0, MIB / 2, 3 * MIB / 2] {
            layout.first_offset = Some(bad);
            let e = plan(&layout).unwrap_err().to_string();
            assert!(e.contains("whole number of MiB"), "{bad}: {e}");
        }
    }

    #[test]
    fn output_is_deterministic() {
        let small = DiskLayout {
            disk_guid: Guid::derived("test-disk", "small"),
            partitions: vec![spec("one", LINUX_DATA_TYPE, 1), spec("two", ESP_TYPE, 2)],
            disk_size: None,
            first_offset: None,
        };
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let a = std::fs::read(write_image(&first, &small)).unwrap();
        let b = std::fs::read(write_image(&second, &small)).unwrap();
        assert_eq!(a.len() as u64, 5 * MIB);
        assert!(a == b);
    }

    #[test]
    fn write_headers_refuses_overlapping_partitions() {
        let (mut parts, disk_size) = plan(&basalt_layout(None)).unwrap();
        parts[2].offset -= MIB;
        let err = write_headers(
            &mut io::Cursor::new(Vec::new()),
            disk_size,
            Guid::derived("d", "d"),
            &parts,
        )
        .unwrap_err();
        assert!(matches!(err, GptError::BadPlacement { index: 3, .. }), "{err}");
    }
}
