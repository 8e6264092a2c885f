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

/// Makes an ext4 filesystem of `size_bytes` labelled `label` in the file
/// `path` (created or truncated), deterministic for a given `uuid` and
/// `mtime`.
pub fn make_ext4(
    path: &Path,
    size_bytes: u64,
    label: &str,
    uuid: Guid,
    mtime: u64,
) -> Result<(), Ext4Error> {
    let file = std::fs::File::create(path)
        .map_err(|source| Ext4Error::Read { path: path.display().to_string(), source })?;
    file.set_len(size_bytes)
        .map_err(|source| Ext4Error::Read { path: path.display().to_string(), source })?;
    drop(file);
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", label, "-U"])
        .arg(uuid.to_string())
        // The directory hash seed is random unless given. Lazy inode-table
        // and journal initialisation mean ext4 never trusts an unwritten
        // block to read as zero, so the image may stay sparse and a
        // `.bmap` flash over a used card is still correct.
        .arg("-E")
        .arg(format!("hash_seed={uuid},lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0"))
        .arg(path)
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
        let a = dir.path().join("a.ext4");
        let b = dir.path().join("b.ext4");
        make_ext4(&a, 32 << 20, "data", uuid, 1_700_000_000).unwrap();
        make_ext4(&b, 32 << 20, "data", uuid, 1_700_000_000).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
        let fsck = Command::new("e2fsck").arg("-fn").arg(&a).output().unwrap();
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    }
}
