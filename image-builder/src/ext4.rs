//! The data partition: an empty ext4 filesystem made by `mke2fs` on a
//! regular file.
//!
//! `mke2fs` writes a regular file without root or loop devices, and with a
//! fixed UUID, hash seed and time it writes the same bytes every time, so
//! there is no reason to carry an ext4 writer of our own.

use std::path::Path;
use std::process::Command;

use basalt_bundle::Guid;

/// An error making the filesystem.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// `mke2fs` could not be started.
    #[error("cannot run mke2fs: {0}; install e2fsprogs (ci/setup.sh does)")]
    Spawn(std::io::Error),
    /// `mke2fs` failed.
    #[error("mke2fs failed: {0}")]
    Failed(String),
    /// The result could not be read back.
    #[error("cannot read the ext4 image {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Makes an ext4 filesystem of `size_bytes` labelled `label` at byte
/// `offset` of the existing file `path` (a disk image already at least
/// `offset + size_bytes` long), deterministic for a given `uuid` and
/// `mtime`. Writing in place spares a copy of the partition, and mke2fs
/// writes only metadata, so the image stays sparse.
pub fn make_ext4(
    path: &Path,
    offset: u64,
    size_bytes: u64,
    label: &str,
    uuid: Guid,
    mtime: u64,
) -> Result<(), Ext4Error> {
    let len = std::fs::metadata(path)
        .map_err(|source| Ext4Error::Read { path: path.display().to_string(), source })?
        .len();
    if len < offset + size_bytes {
        return Err(Ext4Error::Failed(format!(
            "{} is {len} bytes, too short for {size_bytes} bytes at {offset}",
            path.display()
        )));
    }
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", label, "-U"])
        .arg(uuid.to_string())
        // The directory hash seed is random unless given. Lazy inode-table
        // and journal initialisation mean ext4 never trusts an unwritten
        // block to read as zero, so the image may stay sparse and a
        // `.bmap` flash over a used card is still correct.
        .arg("-E")
        .arg(format!(
            "offset={offset},hash_seed={uuid},lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0"
        ))
        .arg(path)
        .arg(format!("{}k", size_bytes / 1024))
        .env("E2FSPROGS_FAKE_TIME", mtime.to_string())
        .env("SOURCE_DATE_EPOCH", mtime.to_string())
        .output()
        .map_err(Ext4Error::Spawn)?;
    if !out.status.success() {
        return Err(Ext4Error::Failed(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_inputs_give_the_same_bytes_and_e2fsck_is_clean() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = Guid::derived("test", "data");
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        for f in [&a, &b] {
            std::fs::File::create(f).unwrap().set_len(40 << 20).unwrap();
            make_ext4(f, 4 << 20, 32 << 20, "data", uuid, 1_700_000_000).unwrap();
        }
        let bytes = std::fs::read(&a).unwrap();
        assert!(bytes == std::fs::read(&b).unwrap());
        assert!(bytes[..4 << 20].iter().all(|x| *x == 0), "wrote before its offset");
        assert!(bytes[36 << 20..].iter().all(|x| *x == 0), "wrote past its end");
        let part = dir.path().join("part.img");
        std::fs::write(&part, &bytes[4 << 20..36 << 20]).unwrap();
        let fsck = Command::new("e2fsck").arg("-fn").arg(&part).output().unwrap();
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    }

    #[test]
    fn a_file_too_short_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("short.img");
        std::fs::File::create(&f).unwrap().set_len(8 << 20).unwrap();
        assert!(make_ext4(&f, 0, 32 << 20, "data", Guid::derived("t", "d"), 0).is_err());
    }
}
