//! The root filesystem [`Tree`] as a zstd-compressed squashfs image.
//!
//! The image is built in memory and is reproducible: the tree is walked in
//! its sorted order, every entry (the root directory included) gets exactly
//! the owner, mode and time of its [`Meta`], the superblock time is the
//! caller's `SOURCE_DATE_EPOCH`, and nothing of the build host (its clock,
//! its users, its file order) reaches the output. No extended attributes are
//! written; the images need none.
//!
//! The output is padded to a multiple of [`VERITY_BLOCK_SIZE`] because
//! dm-verity covers the partition in 4096-byte blocks and its hash tree is
//! appended right after the filesystem (see [`crate::verity`]).

use std::io::Cursor;

use backhand::compression::{CompressionOptions, Compressor, Zstd};
use backhand::{
    BackhandError, FilesystemCompressor, FilesystemReader, FilesystemWriter, Id, NodeHeader,
};

use crate::tree::{Meta, Node, NodeKind, Tree};

/// Size of a squashfs data block: the mksquashfs default, a good trade of
/// compression ratio against read amplification for small files.
pub const BLOCK_SIZE: u32 = 128 * 1024;

/// zstd level, the one mksquashfs uses by default, so image sizes compare
/// with what users of other build systems know.
pub const ZSTD_LEVEL: u32 = 15;

/// The image length is a multiple of this, the dm-verity data block size.
pub const VERITY_BLOCK_SIZE: usize = 4096;

/// The permission bits a squashfs inode can hold.
const PERMISSION_BITS: u32 = 0o7777;

/// A tree that cannot be written as squashfs.
#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    /// The tree has no root directory.
    #[error("the tree has no root directory `/`; build it with `Tree::new`")]
    NoRootDirectory,
    /// A mode has bits beyond permissions, setuid, setgid and sticky.
    #[error(
        "{path}: mode {mode:#o} has bits outside 0o7777; give only permission, setuid, setgid \
         and sticky bits (the entry's type comes from its kind)"
    )]
    BadMode {
        /// The entry.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// An entry's time does not fit squashfs' unsigned 32-bit seconds.
    #[error(
        "{path}: time {mtime} is after 2106-02-07, the last time squashfs can store; \
         give the entry an earlier time"
    )]
    EntryTimeOutOfRange {
        /// The entry.
        path: String,
        /// Its modification time, seconds since the epoch.
        mtime: u64,
    },
    /// The build time does not fit squashfs' unsigned 32-bit seconds.
    #[error(
        "build time {mtime} is after 2106-02-07, the last time squashfs can store; \
         set SOURCE_DATE_EPOCH to an earlier time"
    )]
    BuildTimeOutOfRange {
        /// The requested superblock time, seconds since the epoch.
        mtime: u64,
    },
    /// Preparing the image with the root directory's metadata failed.
    #[error("cannot prepare the squashfs root directory: {source}; please report this as a bug")]
    PrepareRoot {
        /// What the squashfs library reported.
        #[source]
        source: BackhandError,
    },
    /// An entry was refused by the squashfs library.
    #[error("cannot add {path} to the squashfs image: {source}")]
    AddEntry {
        /// The entry.
        path: String,
        /// What the squashfs library reported.
        #[source]
        source: BackhandError,
    },
    /// Writing the image failed.
    #[error("cannot write the squashfs image: {source}; please report this as a bug")]
    Write {
        /// What the squashfs library reported.
        #[source]
        source: BackhandError,
    },
}

/// Writes `tree` as a squashfs image and returns its bytes, padded with
/// zeros to a multiple of [`VERITY_BLOCK_SIZE`].
///
/// `mtime` (normally `SOURCE_DATE_EPOCH`) becomes the superblock's creation
/// time; entries keep their own times. The same tree and `mtime` always give
/// the same bytes.
pub fn write_squashfs(tree: &Tree, mtime: u64) -> Result<Vec<u8>, SquashfsError> {
    let build_time =
        u32::try_from(mtime).map_err(|_| SquashfsError::BuildTimeOutOfRange { mtime })?;
    let root = match tree.get("/") {
        Some(Node { kind: NodeKind::Dir, meta, .. }) => header("/", meta)?,
        _ => return Err(SquashfsError::NoRootDirectory),
    };

    let seed = root_seed(root).map_err(|source| SquashfsError::PrepareRoot { source })?;
    let mut fs = FilesystemWriter::from_fs_reader(&seed)
        .map_err(|source| SquashfsError::PrepareRoot { source })?;
    fs.set_compressor(compressor().map_err(|source| SquashfsError::PrepareRoot { source })?);
    fs.set_block_size(BLOCK_SIZE);
    fs.set_time(build_time);
    fs.set_no_duplicate_files(true);
    fs.set_emit_compression_options(true);
    // We pad ourselves below: backhand's padding adds a whole block even
    // when the image already ends on a boundary.
    fs.set_no_padding();

    for (path, node) in tree.iter().filter(|(path, _)| *path != "/") {
        let header = header(path, &node.meta)?;
        let added = match &node.kind {
            NodeKind::Dir => fs.push_dir(path, header),
            NodeKind::File(data) => fs.push_file(Cursor::new(data.as_slice()), path, header),
            NodeKind::Symlink(target) => fs.push_symlink(target.as_str(), path, header),
        };
        added.map_err(|source| SquashfsError::AddEntry { path: path.to_string(), source })?;
    }

    let mut out = Cursor::new(Vec::with_capacity(estimated_size(tree)));
    fs.write(&mut out).map_err(|source| SquashfsError::Write { source })?;
    let mut image = out.into_inner();
    image.resize(image.len().next_multiple_of(VERITY_BLOCK_SIZE), 0);
    Ok(image)
}

/// The squashfs inode header for one entry, refusing what squashfs cannot
/// hold instead of truncating it.
fn header(path: &str, meta: &Meta) -> Result<NodeHeader, SquashfsError> {
    if meta.mode & !PERMISSION_BITS != 0 {
        return Err(SquashfsError::BadMode { path: path.to_string(), mode: meta.mode });
    }
    let mtime = u32::try_from(meta.mtime).map_err(|_| SquashfsError::EntryTimeOutOfRange {
        path: path.to_string(),
        mtime: meta.mtime,
    })?;
    // Fits: checked against 0o7777 above.
    let permissions = (meta.mode & PERMISSION_BITS) as u16;
    Ok(NodeHeader::new(permissions, meta.uid, meta.gid, mtime))
}

/// zstd at [`ZSTD_LEVEL`], with the level recorded in the image as
/// mksquashfs does.
fn compressor() -> Result<FilesystemCompressor, BackhandError> {
    FilesystemCompressor::new(
        Compressor::Zstd,
        Some(CompressionOptions::Zstd(Zstd { compression_level: ZSTD_LEVEL })),
    )
}

/// An empty filesystem whose root directory carries `root`'s owner, mode
/// and time, to start the real image from.
///
/// backhand's writer can set the root's mode, uid and gid but not its time,
/// and does not enter a root-only uid or gid in the id table (the write
/// then fails). Its reader exposes both, and a writer made from a reader
/// keeps them, so we write an empty image, fix the root there and start
/// from it. The seed holds no data: it costs one tiny write and read.
fn root_seed(root: NodeHeader) -> Result<FilesystemReader<'static>, BackhandError> {
    let mut empty = FilesystemWriter::default();
    empty.set_compressor(compressor()?);
    let mut bytes = Cursor::new(Vec::new());
    empty.write(&mut bytes)?;
    bytes.set_position(0);

    let mut seed = FilesystemReader::from_reader(bytes)?;
    seed.root.root_mut().header = root;
    for id in [root.uid, root.gid] {
        if !seed.id_table.iter().any(|known| known.num == id) {
            seed.id_table.push(Id::new(id));
        }
    }
    Ok(seed)
}

/// A capacity guess for the output buffer, so large trees are not copied
/// on every doubling.
fn estimated_size(tree: &Tree) -> usize {
    usize::try_from(tree.file_bytes()).unwrap_or(0).saturating_add(tree.len() * 64)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::tree::Origin;

    /// 2024-03-09 16:05:17 UTC: seconds not zero, so a dropped or rounded
    /// second shows up in the extracted files.
    const T: u64 = 1_710_000_317;

    /// Deterministic bytes that do not compress away, so large files really
    /// span several data blocks.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn meta(uid: u32, gid: u32, mode: u32, mtime: u64) -> Meta {
        Meta { uid, gid, mode, mtime }
    }

    /// Dirs, empty and small and multi-block files, symlinks, setuid and
    /// private modes, several times, and a root directory whose owner no
    /// other entry has (backhand's writer alone would lose it).
    fn sample_tree() -> Tree {
        let o = || Origin::Build;
        let mut t = Tree::new(meta(1000, 100, 0o751, T + 60));
        t.add_dir("/etc", meta(0, 0, 0o755, T), o()).unwrap();
        t.add_file("/etc/hostname", b"gw\n".to_vec(), meta(0, 0, 0o644, T + 1), o()).unwrap();
        t.add_file("/etc/empty", Vec::new(), meta(0, 0, 0o600, T + 2), o()).unwrap();
        t.add_dir("/data", meta(1001, 101, 0o700, T + 86_400), o()).unwrap();
        t.add_file("/data/.keep", Vec::new(), meta(1001, 101, 0o640, T + 3), o()).unwrap();
        t.add_file("/usr/bin/init", noise(1_500_000, 7), meta(0, 0, 0o4755, T + 4), o()).unwrap();
        t.add_file("/usr/bin/tool", noise(200_000, 9), meta(0, 50, 0o2711, T + 5), o()).unwrap();
        t.add_file("/usr/bin-x", b"x".to_vec(), meta(2, 3, 0o755, T + 3600), o()).unwrap();
        t.add_dir("/tmp", meta(0, 0, 0o1777, T), o()).unwrap();
        t.add_symlink("/sbin", "usr/bin", meta(0, 0, 0o777, T + 7), o()).unwrap();
        t.add_symlink("/etc/init", "/usr/bin/init", meta(5, 6, 0o777, T + 8), o()).unwrap();
        t.add_file("/etc/zeros", vec![0; 300_000], meta(0, 0, 0o444, T + 9), o()).unwrap();
        t.add_file("/etc/hostname2", b"gw\n".to_vec(), meta(7, 7, 0o600, T + 10), o()).unwrap();
        t
    }

    fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn run(cmd: &mut Command) -> std::process::Output {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `ls -l` style type and permission string, as unsquashfs prints it.
    fn mode_string(node: &Node) -> String {
        let mode = node.meta.mode;
        let kind = match node.kind {
            NodeKind::Dir => 'd',
            NodeKind::File(_) => '-',
            NodeKind::Symlink(_) => 'l',
        };
        let bit = |m: u32, c: char| if mode & m != 0 { c } else { '-' };
        let special =
            |x: u32, s: u32, lower: char, upper: char| match (mode & x != 0, mode & s != 0) {
                (true, true) => lower,
                (false, true) => upper,
                (true, false) => 'x',
                (false, false) => '-',
            };
        [
            kind,
            bit(0o400, 'r'),
            bit(0o200, 'w'),
            special(0o100, 0o4000, 's', 'S'),
            bit(0o040, 'r'),
            bit(0o020, 'w'),
            special(0o010, 0o2000, 's', 'S'),
            bit(0o004, 'r'),
            bit(0o002, 'w'),
            special(0o001, 0o1000, 't', 'T'),
        ]
        .iter()
        .collect()
    }

    /// `YYYY-MM-DD HH:MM` in UTC, by the usual days-to-civil-date arithmetic.
    fn utc_minutes(secs: u64) -> String {
        let (y, m, d) = crate::civil::civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
    }

    /// One line of `unsquashfs -lln`, split into what we compare.
    #[derive(Debug, PartialEq, Eq)]
    struct Listed {
        mode: String,
        owner: String,
        size: Option<u64>,
        time: String,
        target: Option<String>,
    }

    fn parse_listing(text: &str) -> BTreeMap<String, Listed> {
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                assert!(cols.len() >= 6, "unexpected line {line:?}");
                let name_at = line.find("squashfs-root").unwrap();
                let name = &line[name_at..];
                let (name, target) = match name.split_once(" -> ") {
                    Some((n, t)) => (n, Some(t.to_string())),
                    None => (name, None),
                };
                let path = match name.strip_prefix("squashfs-root") {
                    Some("") => "/".to_string(),
                    Some(p) => p.to_string(),
                    None => panic!("unexpected name {name:?}"),
                };
                let mode = cols[0].to_string();
                let size =
                    if mode.starts_with('d') { None } else { Some(cols[2].parse().unwrap()) };
                let entry = Listed {
                    mode,
                    owner: cols[1].to_string(),
                    size,
                    time: format!("{} {}", cols[3], cols[4]),
                    target,
                };
                (path, entry)
            })
            .collect()
    }

    fn expected_listing(tree: &Tree) -> BTreeMap<String, Listed> {
        tree.iter()
            .map(|(path, node)| {
                let (size, target) = match &node.kind {
                    NodeKind::Dir => (None, None),
                    NodeKind::File(d) => (Some(d.len() as u64), None),
                    NodeKind::Symlink(t) => (Some(t.len() as u64), Some(t.clone())),
                };
                let listed = Listed {
                    mode: mode_string(node),
                    owner: format!("{}/{}", node.meta.uid, node.meta.gid),
                    size,
                    time: utc_minutes(node.meta.mtime),
                    target,
                };
                (path.to_string(), listed)
            })
            .collect()
    }

    #[test]
    fn unsquashfs_lists_every_entry_with_its_owner_mode_and_time() {
        let tree = sample_tree();
        let image = write_squashfs(&tree, T + 1234).unwrap();
        assert_eq!(image.len() % VERITY_BLOCK_SIZE, 0);
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "root.sqfs", &image);

        let out = run(Command::new("unsquashfs").env("TZ", "UTC").arg("-lln").arg(&file));
        let listed = parse_listing(&String::from_utf8(out.stdout).unwrap());
        let expected = expected_listing(&tree);
        assert_eq!(listed.len(), tree.len());
        for (path, want) in &expected {
            assert_eq!(listed.get(path), Some(want), "entry {path}");
        }
        assert_eq!(listed, expected);

        let out = run(Command::new("unsquashfs").arg("-mkfs-time").arg(&file));
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), (T + 1234).to_string());
    }

    #[test]
    fn unsquashfs_extracts_the_tree_bytes_and_exact_times() {
        let tree = sample_tree();
        let image = write_squashfs(&tree, T).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "root.sqfs", &image);
        let dest = dir.path().join("x");
        run(Command::new("unsquashfs").arg("-no-xattrs").arg("-q").arg("-d").arg(&dest).arg(&file));

        for (path, node) in tree.iter() {
            let on_disk = dest.join(path.trim_start_matches('/'));
            let md = std::fs::symlink_metadata(&on_disk).unwrap();
            assert_eq!(md.mtime() as u64, node.meta.mtime, "time of {path}");
            match &node.kind {
                NodeKind::Dir => assert!(md.is_dir(), "{path}"),
                NodeKind::File(data) => {
                    assert!(md.is_file(), "{path}");
                    assert_eq!(std::fs::read(&on_disk).unwrap(), **data, "content of {path}");
                }
                NodeKind::Symlink(target) => {
                    let read = std::fs::read_link(&on_disk).unwrap();
                    assert_eq!(read.to_str(), Some(target.as_str()), "{path}");
                }
            }
            if !matches!(node.kind, NodeKind::Symlink(_)) {
                assert_eq!(md.mode() & 0o7777, node.meta.mode, "mode of {path}");
            }
            // unsquashfs sets owners only when it runs as root.
            if running_as_root() {
                assert_eq!((md.uid(), md.gid()), (node.meta.uid, node.meta.gid), "{path}");
            }
        }

        // `-cat` reads through the same inodes without touching the host's
        // permissions, a second route to the contents.
        let out = run(Command::new("unsquashfs").arg("-cat").arg(&file).arg("usr/bin/init"));
        assert_eq!(out.stdout, noise(1_500_000, 7));
    }

    fn running_as_root() -> bool {
        std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
    }

    #[test]
    fn two_writes_are_byte_identical() {
        let tree = sample_tree();
        let a = write_squashfs(&tree, T).unwrap();
        let b = write_squashfs(&tree.clone(), T).unwrap();
        assert!(a == b, "two writes of the same tree differ");
        let c = write_squashfs(&tree, T + 1).unwrap();
        assert!(a != c, "the build time must reach the superblock");
    }

    #[test]
    fn an_empty_tree_is_a_valid_image() {
        let tree = Tree::new(meta(0, 0, 0o755, T));
        let image = write_squashfs(&tree, T).unwrap();
        assert_eq!(image.len(), VERITY_BLOCK_SIZE);
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "empty.sqfs", &image);
        let out = run(Command::new("unsquashfs").env("TZ", "UTC").arg("-lln").arg(&file));
        let listed = parse_listing(&String::from_utf8(out.stdout).unwrap());
        assert_eq!(listed, expected_listing(&tree));
    }

    #[test]
    fn what_squashfs_cannot_hold_is_refused() {
        let mut tree = Tree::new(meta(0, 0, 0o755, T));
        tree.add_file("/f", vec![], meta(0, 0, 0o100644, T), Origin::Build).unwrap();
        let err = write_squashfs(&tree, T).unwrap_err();
        assert!(matches!(err, SquashfsError::BadMode { ref path, mode: 0o100644 } if path == "/f"));

        let mut tree = Tree::new(meta(0, 0, 0o755, T));
        tree.add_file("/f", vec![], meta(0, 0, 0o644, 1 << 32), Origin::Build).unwrap();
        let err = write_squashfs(&tree, T).unwrap_err();
        assert!(matches!(err, SquashfsError::EntryTimeOutOfRange { ref path, .. } if path == "/f"));

        let tree = Tree::new(meta(0, 0, 0o755, T));
        let err = write_squashfs(&tree, 1 << 32).unwrap_err();
        assert!(matches!(err, SquashfsError::BuildTimeOutOfRange { .. }));
        assert!(err.to_string().contains("SOURCE_DATE_EPOCH"));
    }
}
