//! Mounting, unmounting and switching root.

use std::io;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

/// Flags for [`mount`], re-exported so callers need not name `nix`.
pub use nix::mount::MsFlags as MountFlags;

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Creates `target` if needed and mounts `source` there.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    nix::mount::mount(Some(source), target, Some(fstype), flags, data).map_err(io_err)
}

/// Moves the mount at `from` to `to` (`MS_MOVE`).
pub fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(io_err)
}

/// Remounts `target` read-only.
pub fn remount_readonly(target: &Path) -> io::Result<()> {
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(io_err)
}

/// Unmounts `target`; with `lazy`, detaches it even if busy.
pub fn unmount(target: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy { MntFlags::MNT_DETACH } else { MntFlags::empty() };
    nix::mount::umount2(target, flags).map_err(io_err)
}

/// Makes `new_root` the root of the filesystem tree and changes into it,
/// as `switch_root` does: move it over `/`, then chroot.
///
/// The caller moves `/dev`, `/proc`, `/sys` and `/run` below `new_root`
/// first, and execs the next init afterwards.
pub fn switch_root(new_root: &Path) -> io::Result<()> {
    nix::unistd::chdir(new_root).map_err(io_err)?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(io_err)?;
    nix::unistd::chroot(".").map_err(io_err)?;
    nix::unistd::chdir("/").map_err(io_err)
}

/// Flushes every filesystem's dirty data to disk.
pub fn sync_all() {
    nix::unistd::sync();
}

/// Lines of `/proc/self/mounts` as (source, target, fstype) triples, in
/// mount order.
pub fn mounts(proc_mounts: &Path) -> io::Result<Vec<(String, String, String)>> {
    let text = std::fs::read_to_string(proc_mounts)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect())
}

/// Flushes the filesystem that holds `path` (`syncfs`), e.g. the ESP after
/// renaming a boot entry, without waiting for every other filesystem.
pub fn sync_fs(path: &Path) -> io::Result<()> {
    let dir = std::fs::File::open(path)?;
    nix::unistd::syncfs(&dir).map_err(io_err)
}

/// True if something is mounted exactly at `target`, per `proc_mounts`.
pub fn is_mounted(proc_mounts: &Path, target: &Path) -> bool {
    let Some(target) = target.to_str() else { return false };
    mounts(proc_mounts).map(|m| m.iter().any(|(_, t, _)| t == target)).unwrap_or(false)
}

/// Whether `path` is on a RAM-backed filesystem (tmpfs or ramfs), as the
/// initramfs is. Stage 1 checks this before it deletes the initramfs's
/// files, so that a mistaken run can never empty a disk.
pub fn is_ram_backed(path: &Path) -> io::Result<bool> {
    /// `RAMFS_MAGIC` from `<linux/magic.h>`; nix does not name it.
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let fs = nix::sys::statfs::statfs(path).map_err(io_err)?;
    let ty = fs.filesystem_type();
    #[allow(clippy::unnecessary_cast)] // fs_type_t is i64 on glibc, u64 or u32 elsewhere
    let raw = ty.0 as i64;
    Ok(ty == nix::sys::statfs::TMPFS_MAGIC || raw == RAMFS_MAGIC)
}
