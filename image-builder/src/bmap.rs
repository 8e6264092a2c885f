//! The block map (`.bmap`, format 2.0) that lets `bmaptool copy` flash a
//! sparse disk image by writing only its mapped blocks, each range checked
//! against a SHA-256.
//!
//! Mapped ranges are the file's data extents as the filesystem reports them
//! through `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`, the same source
//! `bmaptool create` uses, rather than a scan for all-zero blocks. A block
//! left out of the map is not written, so the device keeps whatever it held
//! before. That makes holes mean "content does not matter" and written
//! zeros mean "must be zero": the unused slots of the GPT entry array are
//! zeros its CRC covers, and a zero scan would drop them and leave stale
//! bytes there on a reused card. Image writers must therefore write zeros
//! wherever zeros matter. Reading holes costs nothing either way, and on a
//! filesystem that does not report holes every block is simply mapped.

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Block size of the map. 4 KiB is what `bmaptool create` uses and what
/// the filesystems holding the image allocate in.
pub const BLOCK_SIZE: u64 = 4096;
const FORMAT_VERSION: &str = "2.0";
/// Length of a hex SHA-256, which the file checksum placeholder matches.
const SHA256_HEX_LEN: usize = 64;

/// Why a block map could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BmapError {
    /// The image could not be opened or its size read.
    #[error("cannot open image {path}: {source} (was the image built?)")]
    OpenImage {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The filesystem refused to report the image's data extents.
    #[error("cannot find the data extents of {path}: {source}")]
    FindExtents {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading mapped data for its checksum failed.
    #[error("cannot read {path} at byte {offset}: {source} (was it changed while mapping?)")]
    ReadImage {
        /// The image.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An empty image has no blocks; `bmaptool` cannot copy it.
    #[error("image {0} is empty: build the disk image before its block map")]
    EmptyImage(PathBuf),
}

/// An inclusive range of mapped blocks, as the `<Range>` element has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockRange {
    first: u64,
    last: u64,
}

impl BlockRange {
    fn blocks(self) -> u64 {
        self.last - self.first + 1
    }

    /// The image bytes of this range; the last block of an image whose size
    /// is not a multiple of the block size is short.
    fn bytes(self, image_size: u64) -> std::ops::Range<u64> {
        self.first * BLOCK_SIZE..((self.last + 1) * BLOCK_SIZE).min(image_size)
    }
}

/// Which way `lseek` should look from an offset.
#[derive(Debug, Clone, Copy)]
enum Extent {
    Data,
    Hole,
}

/// The first offset at or after `offset` that starts `what`; `None` when
/// there is no data at or after `offset`.
fn seek_extent(file: &File, offset: u64, what: Extent) -> io::Result<Option<u64>> {
    let whence = match what {
        Extent::Data => libc::SEEK_DATA,
        Extent::Hole => libc::SEEK_HOLE,
    };
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
    // SAFETY: lseek takes no pointers; the descriptor is valid while `file`
    // is borrowed. It moves the file position, which nothing here relies on
    // since all reads are positioned (`read_exact_at`).
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // ENXIO: no data at or after `offset`.
        Some(libc::ENXIO) => Ok(None),
        _ => Err(err),
    }
}

/// The blocks holding data extents, merged into maximal ranges.
fn mapped_ranges(file: &File, image_size: u64) -> io::Result<Vec<BlockRange>> {
    let mut ranges: Vec<BlockRange> = Vec::new();
    let mut pos = 0;
    while pos < image_size {
        let Some(data) = seek_extent(file, pos, Extent::Data)? else { break };
        if data >= image_size {
            break;
        }
        let hole = seek_extent(file, data, Extent::Hole)?.unwrap_or(image_size).min(image_size);
        if hole <= data {
            // Only a file changing under us makes lseek contradict itself.
            return Err(io::Error::other("extents changed while being read"));
        }
        let range = BlockRange { first: data / BLOCK_SIZE, last: (hole - 1) / BLOCK_SIZE };
        match ranges.last_mut() {
            // Extents smaller than a block can share one, and adjacent ones
            // read as one range.
            Some(prev) if prev.last + 1 >= range.first => prev.last = prev.last.max(range.last),
            _ => ranges.push(range),
        }
        pos = hole;
    }
    Ok(ranges)
}

/// The SHA-256 of a range of the file; the bytes also go into `whole`, the
/// hash of the entire image.
fn sha256_of(file: &File, bytes: std::ops::Range<u64>, whole: &mut Sha256) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = bytes.start;
    while at < bytes.end {
        let n = (bytes.end - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        whole.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Feeds `len` zero bytes (a hole) into `whole` without reading the file:
/// holes read as zeros, and reading them would make the kernel zero-fill
/// page after page of cache for nothing.
fn hash_zeros(whole: &mut Sha256, mut len: u64) {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        whole.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// What [`write_bmap`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    /// The `.bmap` XML.
    pub xml: String,
    /// SHA-256 of the whole image (hex), computed in the same pass.
    pub image_sha256: String,
}

/// Makes the bmap XML for the image at `image`.
///
/// The `BmapFileChecksum` element holds the SHA-256 of the whole XML as it
/// reads with that element's value replaced by 64 `0`s, which is how
/// `bmaptool` verifies it.
pub fn write_bmap(image: &Path) -> Result<BlockMap, BmapError> {
    let open_error = |source| BmapError::OpenImage { path: image.to_path_buf(), source };
    let file = File::open(image).map_err(open_error)?;
    let image_size = file.metadata().map_err(open_error)?.len();
    if image_size == 0 {
        return Err(BmapError::EmptyImage(image.to_path_buf()));
    }
    let ranges = mapped_ranges(&file, image_size)
        .map_err(|source| BmapError::FindExtents { path: image.to_path_buf(), source })?;
    let blocks = image_size.div_ceil(BLOCK_SIZE);
    let mapped: u64 = ranges.iter().map(|r| r.blocks()).sum();

    let placeholder = "0".repeat(SHA256_HEX_LEN);
    let mut xml = String::new();
    // Writing into a String cannot fail, so the fmt::Results are dropped.
    let _ = writeln!(xml, "<?xml version=\"1.0\" ?>");
    let _ = writeln!(xml, "<bmap version=\"{FORMAT_VERSION}\">");
    for (name, value) in [
        ("ImageSize", image_size.to_string()),
        ("BlockSize", BLOCK_SIZE.to_string()),
        ("BlocksCount", blocks.to_string()),
        ("MappedBlocksCount", mapped.to_string()),
        ("ChecksumType", "sha256".to_string()),
        ("BmapFileChecksum", placeholder.clone()),
    ] {
        let _ = writeln!(xml, "    <{name}> {value} </{name}>");
    }
    xml.push_str("    <BlockMap>\n");
    let mut whole = Sha256::new();
    let mut hashed = 0;
    for range in ranges {
        let bytes = range.bytes(image_size);
        let offset = bytes.start;
        hash_zeros(&mut whole, offset - hashed);
        hashed = bytes.end;
        let chksum = sha256_of(&file, bytes, &mut whole)
            .map_err(|source| BmapError::ReadImage { path: image.to_path_buf(), offset, source })?;
        let _ = writeln!(
            xml,
            "        <Range chksum=\"{chksum}\"> {}-{} </Range>",
            range.first, range.last
        );
    }
    xml.push_str("    </BlockMap>\n</bmap>\n");
    hash_zeros(&mut whole, image_size - hashed);

    let file_checksum = hex::encode(Sha256::digest(xml.as_bytes()));
    Ok(BlockMap {
        xml: xml.replacen(&placeholder, &file_checksum, 1),
        image_sha256: hex::encode(whole.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::process::Command;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A 16 MiB sparse image with holes between: two blocks at the start, a
    /// 100-byte write, an explicitly written zero block, a three-block run
    /// and the disk's last bytes.
    fn sparse_image(dir: &Path) -> PathBuf {
        let path = dir.join("disk.img");
        let mut file = File::create(&path).unwrap();
        let mut put = |at: u64, bytes: &[u8]| {
            file.seek(SeekFrom::Start(at)).unwrap();
            file.write_all(bytes).unwrap();
        };
        put(0, &[0x11; 8192]);
        put(5 * MIB, &[0x22; 100]);
        put(5 * MIB + 3 * BLOCK_SIZE, &[0; BLOCK_SIZE as usize]);
        put(9 * MIB, &(0..=255).cycle().take(3 * BLOCK_SIZE as usize).collect::<Vec<u8>>());
        put(16 * MIB - 10, b"last bytes");
        path
    }

    fn bmaptool_copy(bmap: &Path, image: &Path, dest: &Path) -> std::process::Output {
        Command::new("bmaptool")
            .arg("copy")
            .arg("--bmap")
            .args([bmap, image, dest])
            .output()
            .expect("bmaptool not found: install bmap-tools to run this test")
    }

    fn element(xml: &str, name: &str) -> String {
        let open = format!("<{name}>");
        let start = xml.find(&open).unwrap() + open.len();
        let end = xml[start..].find('<').unwrap() + start;
        xml[start..end].trim().to_string()
    }

    #[test]
    fn the_map_lists_written_blocks_only() {
        let dir = tempfile::tempdir().unwrap();
        let xml = write_bmap(&sparse_image(dir.path())).unwrap().xml;
        let ranges: Vec<String> = xml
            .lines()
            .filter(|l| l.contains("<Range"))
            .map(|l| l.split('>').nth(1).unwrap().split('<').next().unwrap().trim().to_string())
            .collect();
        let b = |mib: u64| mib * MIB / BLOCK_SIZE;
        let expected = [
            "0-1".to_string(),
            format!("{}-{}", b(5), b(5)),
            // Explicit zeros are data: the block stays mapped.
            format!("{}-{}", b(5) + 3, b(5) + 3),
            format!("{}-{}", b(9), b(9) + 2),
            format!("{}-{}", b(16) - 1, b(16) - 1),
        ];
        assert_eq!(ranges, expected);
        assert_eq!(element(&xml, "ImageSize"), (16 * MIB).to_string());
        assert_eq!(element(&xml, "BlocksCount"), b(16).to_string());
        assert_eq!(element(&xml, "MappedBlocksCount"), "8");
    }

    #[test]
    fn the_file_checksum_covers_the_xml_with_its_own_value_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let xml = write_bmap(&sparse_image(dir.path())).unwrap().xml;
        let stored = element(&xml, "BmapFileChecksum");
        let zeroed = xml.replacen(&stored, &"0".repeat(64), 1);
        assert_eq!(hex::encode(Sha256::digest(zeroed.as_bytes())), stored);
    }

    #[test]
    fn bmaptool_copies_the_image_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path());
        let bmap = dir.path().join("disk.bmap");
        std::fs::write(&bmap, write_bmap(&image).unwrap().xml).unwrap();
        let dest = dir.path().join("dest.img");
        let out = bmaptool_copy(&bmap, &image, &dest);
        assert!(out.status.success(), "bmaptool: {}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read(&dest).unwrap() == std::fs::read(&image).unwrap());
    }

    #[test]
    fn bmaptool_refuses_an_image_changed_after_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path());
        let bmap = dir.path().join("disk.bmap");
        std::fs::write(&bmap, write_bmap(&image).unwrap().xml).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
        file.write_all_at(&[0x99], 9 * MIB + 5).unwrap();

        let out = bmaptool_copy(&bmap, &image, &dir.path().join("dest.img"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("checksum mismatch"), "{stderr}");
    }

    #[test]
    fn an_empty_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.img");
        File::create(&path).unwrap();
        assert!(matches!(write_bmap(&path), Err(BmapError::EmptyImage(_))));
    }

    #[test]
    fn the_image_hash_equals_a_hash_of_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path());
        let want = hex::encode(Sha256::digest(std::fs::read(&image).unwrap()));
        assert_eq!(write_bmap(&image).unwrap().image_sha256, want);
    }
}
