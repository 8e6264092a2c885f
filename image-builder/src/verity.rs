//! The dm-verity hash tree of a root filesystem, as `veritysetup format`
//! writes it: format version 1, sha256, 4096-byte data and hash blocks, a
//! salt, and the on-disk verity superblock.
//!
//! The hash area (superblock, then the tree) is appended to the filesystem
//! in the same partition, so a slot is one partition that an update writes
//! in one pass and no second partition per slot is needed. The superblock
//! is kept (the kernel does not read it) so that `veritysetup verify` and
//! `veritysetup open` on a device or an image file need only the root hash
//! and the offset; the kernel table is built from [`VerityParams`], whose
//! root hash the signed initramfs carries.
//!
//! This module only writes; the device's kernel is the verifier.

use basalt_bundle::config::VerityParams;
use sha2::{Digest, Sha256};

/// Size of a data block and of a hash block, in bytes.
pub const BLOCK_SIZE: usize = 4096;

/// The hash algorithm, as dm-verity and `veritysetup` name it.
pub const ALGORITHM: &str = "sha256";

const DIGEST_SIZE: usize = 32;
/// Digests per hash block.
const FANOUT: usize = BLOCK_SIZE / DIGEST_SIZE;

/// The result of [`build_verity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityOutput {
    /// The parameters to pass to the kernel (and to record in the slot's
    /// configuration).
    pub params: VerityParams,
    /// The superblock block followed by the hash tree, to be written at
    /// `params.hash_offset` of the partition, right after the data.
    pub hash_area: Vec<u8>,
}

/// Data that cannot be covered by a hash tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerityError {
    /// The data is empty.
    #[error("cannot build a dm-verity tree over no data; give the filesystem image")]
    Empty,
    /// The data does not end on a block boundary.
    #[error(
        "data length {len} is not a multiple of {BLOCK_SIZE}; pad the filesystem image \
         with zeros to a whole number of {BLOCK_SIZE}-byte blocks"
    )]
    Unaligned {
        /// The data length in bytes.
        len: usize,
    },
}

/// Builds the dm-verity superblock and hash tree over `data`.
///
/// `data.len()` must be a non-zero multiple of [`BLOCK_SIZE`]; the hash
/// area goes right after it, so `params.hash_offset` is `data.len()`. The
/// salt and uuid are inputs, not random, so that builds are reproducible.
pub fn build_verity(
    data: &[u8],
    salt: &[u8; 32],
    uuid: [u8; 16],
) -> Result<VerityOutput, VerityError> {
    if data.is_empty() {
        return Err(VerityError::Empty);
    }
    if !data.len().is_multiple_of(BLOCK_SIZE) {
        return Err(VerityError::Unaligned { len: data.len() });
    }
    let data_blocks = (data.len() / BLOCK_SIZE) as u64;

    // levels[0] hashes the data, each next level hashes the one below,
    // until one block remains. A single data block needs no level at all:
    // the root hash is its own hash, as in veritysetup.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    if data.len() > BLOCK_SIZE {
        levels.push(hash_level(salt, data));
    }
    while let Some(below) = levels.last().filter(|level| level.len() > BLOCK_SIZE) {
        let next = hash_level(salt, below);
        levels.push(next);
    }
    let top = levels.last().map_or(data, Vec::as_slice);
    let root_hash = hash_block(salt, top);

    // The kernel expects the top level first, right after the superblock,
    // and the level over the data last.
    let tree_len: usize = levels.iter().map(Vec::len).sum();
    let mut hash_area = Vec::with_capacity(BLOCK_SIZE + tree_len);
    hash_area.extend_from_slice(&superblock(salt, uuid, data_blocks));
    for level in levels.iter().rev() {
        hash_area.extend_from_slice(level);
    }

    let params = VerityParams {
        root_hash: hex::encode(root_hash),
        salt: hex::encode(salt),
        algorithm: ALGORITHM.to_string(),
        data_block_size: BLOCK_SIZE as u32,
        hash_block_size: BLOCK_SIZE as u32,
        data_blocks,
        hash_offset: data.len() as u64,
    };
    Ok(VerityOutput { params, hash_area })
}

/// Format version 1 hashes the salt first, then the block.
fn hash_block(salt: &[u8], block: &[u8]) -> [u8; DIGEST_SIZE] {
    Sha256::new().chain_update(salt).chain_update(block).finalize().into()
}

/// The digests of `input`'s blocks, packed [`FANOUT`] to a hash block, the
/// last block zero-padded.
fn hash_level(salt: &[u8], input: &[u8]) -> Vec<u8> {
    let mut level = Vec::with_capacity((input.len() / BLOCK_SIZE).div_ceil(FANOUT) * BLOCK_SIZE);
    for block in input.chunks_exact(BLOCK_SIZE) {
        level.extend_from_slice(&hash_block(salt, block));
    }
    level.resize(level.len().next_multiple_of(BLOCK_SIZE), 0);
    level
}

/// cryptsetup's `struct verity_sb` (512 bytes, little-endian), in a whole
/// hash block because the tree starts on the next block boundary.
///
/// ```text
///   0  signature[8]     "verity\0\0"
///   8  version u32      1
///  12  hash_type u32    1 (normal; 0 is Chrome OS)
///  16  uuid[16]
///  32  algorithm[32]    NUL-padded name
///  64  data_block_size u32
///  68  hash_block_size u32
///  72  data_blocks u64
///  80  salt_size u16
///  82  _pad1[6]
///  88  salt[256]
/// 344  _pad2[168]
/// ```
fn superblock(salt: &[u8], uuid: [u8; 16], data_blocks: u64) -> [u8; BLOCK_SIZE] {
    let mut sb = [0u8; BLOCK_SIZE];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&1u32.to_le_bytes());
    sb[16..32].copy_from_slice(&uuid);
    sb[32..32 + ALGORITHM.len()].copy_from_slice(ALGORITHM.as_bytes());
    sb[64..68].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    use super::*;
    use crate::squashfs::write_squashfs;
    use crate::tree::{Meta, Origin, Tree};

    const SALT: [u8; 32] = *b"basalt-test-salt-0123456789abcde";
    const UUID: [u8; 16] = [
        0x6c, 0x1d, 0x39, 0x8e, 0x2b, 0x4f, 0x4a, 0x51, 0x9d, 0x0e, 0x7e, 0x11, 0x42, 0xa3, 0x5c,
        0x07,
    ];
    const UUID_TEXT: &str = "6c1d398e-2b4f-4a51-9d0e-7e1142a35c07";

    /// Every block different, so a tree that hashes the wrong block or in
    /// the wrong order cannot match.
    fn patterned(blocks: usize) -> Vec<u8> {
        let mut data = vec![0u8; blocks * BLOCK_SIZE];
        for (i, block) in data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            for (j, byte) in block.iter_mut().enumerate() {
                *byte = (i.wrapping_mul(31) ^ j.wrapping_mul(7) ^ (i >> 8)) as u8;
            }
        }
        data
    }

    fn veritysetup(args: &[&str]) -> Output {
        Command::new("veritysetup").args(args).output().unwrap()
    }

    fn ok(out: &Output) -> bool {
        out.status.success()
    }

    fn write(path: &Path, parts: &[&[u8]]) {
        std::fs::write(path, parts.concat()).unwrap();
    }

    fn verify(file: &Path, out: &VerityOutput) -> Output {
        let file = file.to_str().unwrap();
        let offset = format!("--hash-offset={}", out.params.hash_offset);
        veritysetup(&["verify", file, file, &out.params.root_hash, &offset])
    }

    /// Our tree, checked three ways by veritysetup: it verifies, it is
    /// byte-identical to veritysetup's own, and a flipped data byte fails.
    fn judge(blocks: usize, tree_blocks: usize) {
        let data = patterned(blocks);
        let out = build_verity(&data, &SALT, UUID).unwrap();
        assert_eq!(out.hash_area.len(), (1 + tree_blocks) * BLOCK_SIZE, "{blocks} blocks");
        assert_eq!(out.params.data_blocks, blocks as u64);
        assert_eq!(out.params.hash_offset, data.len() as u64);
        assert_eq!(out.params.hash_start_block(), blocks as u64 + 1);

        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.img");
        write(&ours, &[&data, &out.hash_area]);
        let verified = verify(&ours, &out);
        assert!(ok(&verified), "{blocks} blocks: {verified:?}");

        let theirs: PathBuf = dir.path().join("theirs.img");
        write(&theirs, &[&data]);
        let t = theirs.to_str().unwrap();
        let formatted = veritysetup(&[
            "format",
            t,
            t,
            &format!("--salt={}", hex::encode(SALT)),
            &format!("--uuid={UUID_TEXT}"),
            &format!("--hash-offset={}", data.len()),
        ]);
        assert!(ok(&formatted), "{formatted:?}");
        let printed = String::from_utf8(formatted.stdout).unwrap();
        let root = printed.lines().find_map(|l| l.strip_prefix("Root hash:")).unwrap().trim();
        assert_eq!(root, out.params.root_hash, "{blocks} blocks: root hash");
        let their_area = std::fs::read(&theirs).unwrap().split_off(data.len());
        assert_eq!(their_area.len(), out.hash_area.len(), "{blocks} blocks: hash area length");
        assert!(their_area == out.hash_area, "{blocks} blocks: hash areas differ");

        let mut tampered = data.clone();
        let victim = tampered.len() - BLOCK_SIZE / 2;
        tampered[victim] ^= 0x01;
        write(&ours, &[&tampered, &out.hash_area]);
        assert!(!ok(&verify(&ours, &out)), "{blocks} blocks: a flipped byte went unnoticed");
    }

    #[test]
    fn one_block_has_no_tree_and_matches_veritysetup() {
        judge(1, 0);
    }

    #[test]
    fn one_level_matches_veritysetup() {
        judge(2, 1);
        judge(FANOUT, 1);
    }

    #[test]
    fn two_levels_match_veritysetup() {
        judge(200, 2 + 1);
    }

    #[test]
    fn three_levels_match_veritysetup() {
        // 64 MiB and one block: one past the most two levels can cover.
        judge(FANOUT * FANOUT + 1, 129 + 2 + 1);
    }

    #[test]
    fn level_sizes_follow_the_fanout() {
        let tree_blocks = |blocks: usize| {
            let out = build_verity(&vec![0; blocks * BLOCK_SIZE], &SALT, UUID).unwrap();
            out.hash_area.len() / BLOCK_SIZE - 1
        };
        assert_eq!(tree_blocks(1), 0);
        assert_eq!(tree_blocks(2), 1);
        assert_eq!(tree_blocks(128), 1);
        assert_eq!(tree_blocks(129), 2 + 1);
        assert_eq!(tree_blocks(200), 2 + 1);
    }

    #[test]
    fn bad_lengths_are_refused() {
        assert_eq!(build_verity(&[], &SALT, UUID), Err(VerityError::Empty));
        assert_eq!(
            build_verity(&[0; 4097], &SALT, UUID),
            Err(VerityError::Unaligned { len: 4097 })
        );
    }

    #[test]
    fn a_squashfs_root_with_its_tree_verifies() {
        let mut tree = Tree::new(Meta::root(0o755, 1_700_000_000));
        let meta = Meta::root(0o644, 1_700_000_000);
        tree.add_file("/etc/hostname", b"gw\n".to_vec(), meta, Origin::Build).unwrap();
        tree.add_file("/usr/lib/blob", patterned(50), meta, Origin::Build).unwrap();
        let image = write_squashfs(&tree, 1_700_000_000).unwrap();
        let out = build_verity(&image, &SALT, UUID).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("slot.img");
        write(&file, &[&image, &out.hash_area]);
        let verified = verify(&file, &out);
        assert!(ok(&verified), "{verified:?}");
        // The filesystem is still readable with the tree after it.
        let listed = Command::new("unsquashfs").arg("-l").arg(&file).output().unwrap();
        assert!(ok(&listed), "{listed:?}");
        assert!(String::from_utf8_lossy(&listed.stdout).contains("squashfs-root/usr/lib/blob"));
    }
}
