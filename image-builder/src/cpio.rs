//! The initramfs as a cpio archive in the "new ASCII" (`070701`, newc)
//! format, the only one the kernel unpacks.
//!
//! The archive is built from a [`Tree`] in its sorted order, with inode
//! numbers counted from 1 and every header field taken from the tree, so
//! the same tree always gives the same bytes. Compression (zstd) is the
//! caller's business.

use crate::tree::{Meta, Node, NodeKind, Tree};

const MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that ends the archive.
const TRAILER: &str = "TRAILER!!!";
/// newc aligns each header+name and each file body to 4 bytes.
const ALIGN: usize = 4;

/// Why a tree cannot be written as newc.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpioError {
    /// newc stores times in 32 bits.
    #[error(
        "{path}: modification time {mtime} is past 2106-02-07, the newc limit: set \
         SOURCE_DATE_EPOCH (or the entry's time) to an earlier date"
    )]
    MtimeOutOfRange {
        /// The entry.
        path: String,
        /// Its time, seconds since the epoch.
        mtime: u64,
    },
    /// newc stores sizes in 32 bits.
    #[error(
        "{path} is {size} bytes, larger than the 4 GiB newc allows per file: keep it out of the \
         initramfs and put it in the root filesystem"
    )]
    TooLarge {
        /// The entry.
        path: String,
        /// Its content size in bytes.
        size: usize,
    },
    /// The mode carries bits other than permissions.
    #[error(
        "{path}: mode {mode:#o} has bits outside 0o7777: give only permission bits, the entry's \
         kind sets its file type"
    )]
    BadMode {
        /// The entry.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// More entries than 32-bit inode numbers can count.
    #[error("the tree has more entries than newc's 32-bit inode numbers can count: split it")]
    TooManyEntries,
}

/// The `S_IFMT` part of a newc mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileType {
    Dir,
    Regular,
    Symlink,
}

impl FileType {
    fn of(kind: &NodeKind) -> FileType {
        match kind {
            NodeKind::Dir => FileType::Dir,
            NodeKind::File(_) => FileType::Regular,
            NodeKind::Symlink(_) => FileType::Symlink,
        }
    }

    fn mode_bits(self) -> u32 {
        match self {
            FileType::Dir => 0o040_000,
            FileType::Regular => 0o100_000,
            FileType::Symlink => 0o120_000,
        }
    }

    /// A directory's `.` and its entry in the parent; nothing in a
    /// generated tree is hard-linked.
    fn nlink(self) -> u32 {
        match self {
            FileType::Dir => 2,
            FileType::Regular | FileType::Symlink => 1,
        }
    }
}

/// The fields of a newc header that basalt sets; device numbers and the
/// checksum are always 0.
#[derive(Debug, Default)]
struct Header {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    filesize: u32,
}

impl Header {
    /// Appends the header, `name` and their padding to `out`.
    fn write(&self, name: &str, out: &mut Vec<u8>) {
        // namesize counts the terminating NUL; it always fits 32 bits since
        // tree paths come from memory far smaller than 4 GiB.
        let namesize = (name.len() + 1) as u32;
        let fields = [
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.mtime,
            self.filesize,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            namesize,
            0, // check: only used by the "070702" variant
        ];
        out.extend_from_slice(MAGIC);
        for field in fields {
            out.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(out);
    }
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(ALIGN), 0);
}

/// The header of one tree entry, checked against newc's limits.
fn header(path: &str, node: &Node, ino: u32, body: &[u8]) -> Result<Header, CpioError> {
    let Meta { uid, gid, mode, mtime } = node.meta;
    if mode & !0o7777 != 0 {
        return Err(CpioError::BadMode { path: path.to_string(), mode });
    }
    let mtime = u32::try_from(mtime)
        .map_err(|_| CpioError::MtimeOutOfRange { path: path.to_string(), mtime })?;
    let filesize = u32::try_from(body.len())
        .map_err(|_| CpioError::TooLarge { path: path.to_string(), size: body.len() })?;
    let file_type = FileType::of(&node.kind);
    Ok(Header {
        ino,
        mode: file_type.mode_bits() | mode,
        uid,
        gid,
        nlink: file_type.nlink(),
        mtime,
        filesize,
    })
}

/// Writes every entry of `tree` as a newc archive.
///
/// The root directory is written as `.`, as `find . | cpio -o` does, so its
/// owner, mode and time reach the unpacked rootfs too; other names have no
/// leading `/` (`init`, `lib/modules/...`). Symlink targets are the
/// entries' content, as newc defines.
pub fn write_newc(tree: &Tree) -> Result<Vec<u8>, CpioError> {
    let mut out = Vec::with_capacity(tree.file_bytes() as usize + tree.len() * 128);
    for (ino, (path, node)) in (1u32..).zip(tree.iter()) {
        if ino == u32::MAX {
            return Err(CpioError::TooManyEntries);
        }
        let name = match path.strip_prefix('/') {
            Some("") | None => ".",
            Some(relative) => relative,
        };
        let body: &[u8] = match &node.kind {
            NodeKind::Dir => &[],
            NodeKind::File(data) => data,
            NodeKind::Symlink(target) => target.as_bytes(),
        };
        header(path, node, ino, body)?.write(name, &mut out);
        out.extend_from_slice(body);
        pad(&mut out);
    }
    Header { nlink: 1, ..Header::default() }.write(TRAILER, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::{Command, Stdio};

    use super::*;
    use crate::tree::Origin;

    const T: u64 = 1_700_000_000;

    fn sample_tree() -> Tree {
        let mut t = Tree::new(Meta::root(0o755, T));
        let o = || Origin::Build;
        t.add_file("/init", b"#!basalt-init\n".to_vec(), Meta::root(0o755, T), o()).unwrap();
        t.add_file("/etc/empty", vec![], Meta::root(0o644, T + 1), o()).unwrap();
        t.add_file("/etc/odd", vec![7u8; 5], Meta::root(0o600, T + 2), o()).unwrap();
        t.add_file("/bin/suid", vec![1, 2, 3], Meta::root(0o4755, T), o()).unwrap();
        t.add_dir("/data", Meta { uid: 1000, gid: 1001, mode: 0o1770, mtime: T + 3 }, o()).unwrap();
        t.add_file(
            "/lib/modules/6.6.0/kernel/drivers/net/virtio_net.ko",
            vec![0xAB; 4099],
            Meta { uid: 0, gid: 0, mode: 0o644, mtime: T + 4 },
            o(),
        )
        .unwrap();
        t.add_symlink("/sbin/init", "../init", Meta::root(0o777, T), o()).unwrap();
        t
    }

    fn cpio(args: &[&str], dir: &std::path::Path, archive: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cpio not found: install it (Debian: apt-get install cpio) to run this test");
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "cpio {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Splits an archive into (name, header fields) by the newc rules.
    fn parse(archive: &[u8]) -> Vec<(String, [u32; 13])> {
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(at % 4, 0, "header at {at} is not 4-byte aligned");
            assert_eq!(&archive[at..at + 6], MAGIC);
            let mut fields = [0u32; 13];
            for (i, field) in fields.iter_mut().enumerate() {
                let hex = std::str::from_utf8(&archive[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                *field = u32::from_str_radix(hex, 16).unwrap();
            }
            let name_len = fields[11] as usize;
            let name = &archive[at + 110..at + 110 + name_len];
            assert_eq!(name.last(), Some(&0));
            let name = String::from_utf8(name[..name_len - 1].to_vec()).unwrap();
            at = (at + 110 + name_len).next_multiple_of(4);
            at = (at + fields[6] as usize).next_multiple_of(4);
            let done = name == TRAILER;
            entries.push((name, fields));
            if done {
                assert_eq!(at, archive.len(), "bytes after the trailer");
                return entries;
            }
        }
    }

    #[test]
    fn headers_follow_newc_rules() {
        let tree = sample_tree();
        let archive = write_newc(&tree).unwrap();
        let entries = parse(&archive);
        assert_eq!(entries.len(), tree.len() + 1);
        for ((_, node), (name, f)) in tree.iter().zip(&entries) {
            let Meta { uid, gid, mode, mtime } = node.meta;
            assert_eq!([f[1] & 0o7777, f[2], f[3], f[5]], [mode, uid, gid, mtime as u32], "{name}");
        }
        let names: Vec<_> = entries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], ".");
        assert_eq!(names.last(), Some(&TRAILER));
        assert!(names.iter().all(|n| !n.starts_with('/')));
        for (i, (name, f)) in entries.iter().enumerate() {
            let [ino, mode, _, _, nlink, _, _, devmaj, devmin, rdevmaj, rdevmin, _, check] = *f;
            if name == TRAILER {
                assert_eq!((ino, mode, nlink), (0, 0, 1));
                continue;
            }
            assert_eq!(ino as usize, i + 1, "inodes count from 1 in archive order");
            let want_nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
            assert_eq!(nlink, want_nlink, "{name}");
            assert_eq!([devmaj, devmin, rdevmaj, rdevmin, check], [0; 5]);
        }
    }

    #[test]
    fn cpio_lists_modes_and_owners() {
        let archive = write_newc(&sample_tree()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let listing = cpio(&["-itvn", "--quiet"], dir.path(), &archive);
        let rows: Vec<Vec<&str>> =
            listing.lines().map(|l| l.split_whitespace().collect()).collect();
        // `cpio -itvn` columns: mode, links, uid, gid, size, month, day,
        // year or time, name[, ->, target].
        let row = |name: &str| {
            rows.iter()
                .find(|cols| cols.get(8) == Some(&name))
                .unwrap_or_else(|| panic!("{name} not listed in:\n{listing}"))
        };
        let fields = |name: &str| {
            let cols = row(name);
            (cols[0], cols[2], cols[3], cols[4])
        };
        assert_eq!(fields("."), ("drwxr-xr-x", "0", "0", "0"));
        assert_eq!(fields("bin/suid"), ("-rwsr-xr-x", "0", "0", "3"));
        assert_eq!(fields("data"), ("drwxrwx--T", "1000", "1001", "0"));
        assert_eq!(fields("etc/odd"), ("-rw-------", "0", "0", "5"));
        assert_eq!(fields("init"), ("-rwxr-xr-x", "0", "0", "14"));
        assert_eq!(row("sbin/init")[0], "lrwxrwxrwx");
        assert_eq!(&row("sbin/init")[9..], ["->", "../init"]);
        assert_eq!(rows.len(), sample_tree().len());
    }

    #[test]
    fn cpio_extracts_identical_content() {
        let tree = sample_tree();
        let archive = write_newc(&tree).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("root");
        std::fs::create_dir(&out).unwrap();
        cpio(&["-idm", "--quiet", "--no-absolute-filenames"], &out, &archive);
        // Owners are restored only when extracting as root.
        let as_root = std::fs::metadata(dir.path()).unwrap().uid() == 0;

        for (path, node) in tree.iter().filter(|(p, _)| *p != "/") {
            let on_disk = out.join(&path[1..]);
            let meta = std::fs::symlink_metadata(&on_disk).unwrap();
            match &node.kind {
                NodeKind::Dir => assert!(meta.is_dir(), "{path}"),
                NodeKind::File(data) => {
                    assert_eq!(&std::fs::read(&on_disk).unwrap(), data.as_ref(), "{path}");
                }
                NodeKind::Symlink(target) => {
                    assert_eq!(std::fs::read_link(&on_disk).unwrap().to_str(), Some(&**target));
                }
            }
            if !meta.is_symlink() {
                assert_eq!(meta.permissions().mode() & 0o7777, node.meta.mode, "{path}");
            }
            // GNU cpio sets a directory's time before extracting into it, so
            // only file times survive; headers_follow_newc_rules checks the
            // directories' recorded times.
            if meta.is_file() {
                assert_eq!(meta.mtime() as u64, node.meta.mtime, "{path}");
            }
            if as_root {
                assert_eq!((meta.uid(), meta.gid()), (node.meta.uid, node.meta.gid), "{path}");
            }
        }
    }

    #[test]
    fn the_same_tree_gives_the_same_bytes() {
        assert_eq!(write_newc(&sample_tree()).unwrap(), write_newc(&sample_tree()).unwrap());
    }

    #[test]
    fn values_newc_cannot_hold_are_refused() {
        let mut t = Tree::new(Meta::root(0o755, 0));
        t.add_file("/late", vec![], Meta::root(0o644, 1 << 32), Origin::Build).unwrap();
        assert!(matches!(write_newc(&t), Err(CpioError::MtimeOutOfRange { .. })));

        let mut t = Tree::new(Meta::root(0o755, 0));
        t.add_file("/typed", vec![], Meta::root(0o100_644, 0), Origin::Build).unwrap();
        assert!(matches!(write_newc(&t), Err(CpioError::BadMode { .. })));
    }
}
