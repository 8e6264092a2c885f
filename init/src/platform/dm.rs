//! Device-mapper through its ioctls, without libdevmapper or udev.
//!
//! Stage 1 needs exactly one thing from device-mapper: a read-only
//! `verity` device over the slot's root partition. That takes three
//! ioctls on `/dev/mapper/control` (create the device, load its table,
//! resume it), each carrying a `struct dm_ioctl` from
//! `<linux/dm-ioctl.h>` (interface version 4) followed by its payload.
//!
//! The request is built as plain bytes, field by field at the offsets of the
//! `#[repr(C)]` mirrors below, so the layout is checked by host tests and
//! the only `unsafe` is the `ioctl(2)` call itself.

use std::fs::File;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};

/// The ioctl "magic" of device-mapper (`DM_IOCTL`).
const DM_IOCTL: u8 = 0xfd;
/// Interface major version; the kernel refuses any other.
const DM_VERSION_MAJOR: u32 = 4;
/// Length of `dm_ioctl.name`, NUL included.
pub const DM_NAME_LEN: usize = 128;
/// Length of `dm_ioctl.uuid`, NUL included.
pub const DM_UUID_LEN: usize = 129;
/// Length of `dm_target_spec.target_type`, NUL included.
pub const DM_MAX_TYPE_NAME: usize = 16;

/// `DM_READONLY_FLAG`: the table opens its devices read-only and the
/// mapped disk is marked read-only. dm-verity refuses a writable table.
pub const DM_READONLY_FLAG: u32 = 1 << 0;
/// `DM_SUSPEND_FLAG`: with `DM_DEV_SUSPEND`, suspend; without it, resume
/// (which is what makes a freshly loaded table live).
pub const DM_SUSPEND_FLAG: u32 = 1 << 1;

/// The misc device number of `/dev/mapper/control` (10:236).
pub const CONTROL_MAJOR: u64 = 10;
/// See [`CONTROL_MAJOR`].
pub const CONTROL_MINOR: u64 = 236;

/// Mirror of the kernel's `struct dm_ioctl` (312 bytes, no hidden padding).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DmIoctl {
    /// Interface version the caller was built for; the kernel writes its own.
    pub version: [u32; 3],
    /// Size of the whole buffer: this header, the payload and room for output.
    pub data_size: u32,
    /// Offset of the payload from the start of this header.
    pub data_start: u32,
    /// Number of `dm_target_spec`s in the payload of a table load.
    pub target_count: u32,
    /// Output: how many openers the device has.
    pub open_count: i32,
    /// `DM_*_FLAG` bits, in and out.
    pub flags: u32,
    /// Event number or udev cookie; unused here.
    pub event_nr: u32,
    /// Explicit padding to align `dev`.
    pub padding: u32,
    /// Output: the device number, in the kernel's `huge_encode_dev` form.
    pub dev: u64,
    /// Device name, NUL-terminated.
    pub name: [u8; DM_NAME_LEN],
    /// Device uuid, NUL-terminated; empty here.
    pub uuid: [u8; DM_UUID_LEN],
    /// Start of the data area (padding when the payload starts later).
    pub data: [u8; 7],
}

/// Mirror of the kernel's `struct dm_target_spec` (40 bytes); its
/// NUL-terminated parameter string follows it directly.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DmTargetSpec {
    /// First sector (512 bytes) of the mapped device this target covers.
    pub sector_start: u64,
    /// Number of sectors it covers.
    pub length: u64,
    /// Output only.
    pub status: i32,
    /// Bytes from the start of this spec to the next one.
    pub next: u32,
    /// Target type (`verity`), NUL-padded.
    pub target_type: [u8; DM_MAX_TYPE_NAME],
}

/// Size of the header; the payload starts here (it is already a multiple
/// of 8, as the target specs need).
const HEADER_LEN: usize = size_of::<DmIoctl>();
const SPEC_LEN: usize = size_of::<DmTargetSpec>();

/// The device-mapper commands stage 1 uses (`DM_*_CMD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `DM_DEV_CREATE`: a new, empty mapped device.
    DevCreate = 3,
    /// `DM_DEV_REMOVE`: remove a mapped device.
    DevRemove = 4,
    /// `DM_DEV_SUSPEND`: suspend, or resume without [`DM_SUSPEND_FLAG`].
    DevSuspend = 6,
    /// `DM_TABLE_LOAD`: load the inactive table.
    TableLoad = 9,
}

impl Command {
    /// The name from `<linux/dm-ioctl.h>`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Command::DevCreate => "DM_DEV_CREATE",
            Command::DevRemove => "DM_DEV_REMOVE",
            Command::DevSuspend => "DM_DEV_SUSPEND",
            Command::TableLoad => "DM_TABLE_LOAD",
        }
    }

    /// The ioctl request number: `_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`.
    pub fn request(self) -> nix::sys::ioctl::ioctl_num_type {
        nix::request_code_readwrite!(DM_IOCTL, self as u8, HEADER_LEN)
    }
}

/// One line of a device-mapper table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector covered.
    pub sector_start: u64,
    /// Number of sectors covered.
    pub length: u64,
    /// Target type, e.g. `verity`.
    pub target_type: String,
    /// The target's parameter string.
    pub params: String,
}

/// A device number as `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevNum {
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
}

impl DevNum {
    /// Decodes the `dev` field the kernel fills in (`huge_encode_dev`, the
    /// same encoding as userspace `dev_t`).
    pub fn from_kernel(dev: u64) -> DevNum {
        DevNum { major: nix::sys::stat::major(dev), minor: nix::sys::stat::minor(dev) }
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Copies `s` into a fixed, NUL-terminated field; refuses what does not fit
/// or contains a NUL (the kernel would silently read a different name).
fn put_cstr(field: &mut [u8], s: &str, what: &str) -> io::Result<()> {
    if s.len() >= field.len() || s.as_bytes().contains(&0) {
        return Err(invalid(format!("{what} {s:?} is too long or contains NUL")));
    }
    field[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(b)
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(b)
}

fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Serializes a request: the header for device `name` with `flags`,
/// followed by `targets` (empty except for a table load).
///
/// Each target spec is followed by its NUL-terminated parameters, padded so
/// the next spec starts 8-byte aligned, as the kernel requires.
pub fn encode(name: &str, flags: u32, targets: &[Target]) -> io::Result<Vec<u8>> {
    let mut payload = Vec::new();
    for t in targets {
        let params_len = align8(t.params.len() + 1);
        let mut spec = vec![0u8; SPEC_LEN + params_len];
        put_u64(&mut spec, offset_of!(DmTargetSpec, sector_start), t.sector_start);
        put_u64(&mut spec, offset_of!(DmTargetSpec, length), t.length);
        let next = u32::try_from(spec.len()).map_err(|_| invalid("table too large".into()))?;
        put_u32(&mut spec, offset_of!(DmTargetSpec, next), next);
        let ty = offset_of!(DmTargetSpec, target_type);
        put_cstr(&mut spec[ty..ty + DM_MAX_TYPE_NAME], &t.target_type, "target type")?;
        if t.params.as_bytes().contains(&0) {
            return Err(invalid(format!("target parameters {:?} contain NUL", t.params)));
        }
        spec[SPEC_LEN..SPEC_LEN + t.params.len()].copy_from_slice(t.params.as_bytes());
        payload.extend_from_slice(&spec);
    }

    let mut buf = vec![0u8; HEADER_LEN + payload.len()];
    let too_large = || invalid("request too large".into());
    let version = offset_of!(DmIoctl, version);
    // Minor and patch 0: the kernel accepts any caller minor up to its own.
    put_u32(&mut buf, version, DM_VERSION_MAJOR);
    let data_size = u32::try_from(buf.len()).map_err(|_| too_large())?;
    put_u32(&mut buf, offset_of!(DmIoctl, data_size), data_size);
    put_u32(&mut buf, offset_of!(DmIoctl, data_start), HEADER_LEN as u32);
    put_u32(
        &mut buf,
        offset_of!(DmIoctl, target_count),
        u32::try_from(targets.len()).map_err(|_| too_large())?,
    );
    put_u32(&mut buf, offset_of!(DmIoctl, flags), flags);
    let n = offset_of!(DmIoctl, name);
    if name.is_empty() || name.contains('/') {
        return Err(invalid(format!("device name {name:?} is empty or contains '/'")));
    }
    put_cstr(&mut buf[n..n + DM_NAME_LEN], name, "device name")?;
    buf[HEADER_LEN..].copy_from_slice(&payload);
    Ok(buf)
}

/// What the kernel wrote back into the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The kernel's interface version.
    pub version: [u32; 3],
    /// Flags out (e.g. whether an active table is present).
    pub flags: u32,
    /// The mapped device's number.
    pub dev: DevNum,
}

/// Reads the output fields of a header written by the kernel.
pub fn decode_reply(buf: &[u8]) -> io::Result<Reply> {
    if buf.len() < HEADER_LEN {
        return Err(invalid(format!("reply of {} bytes is shorter than dm_ioctl", buf.len())));
    }
    let v = offset_of!(DmIoctl, version);
    Ok(Reply {
        version: [get_u32(buf, v), get_u32(buf, v + 4), get_u32(buf, v + 8)],
        flags: get_u32(buf, offset_of!(DmIoctl, flags)),
        dev: DevNum::from_kernel(get_u64(buf, offset_of!(DmIoctl, dev))),
    })
}

/// An open `/dev/mapper/control`.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Opens the control node at `path`, first creating it (10:236) if
    /// devtmpfs has not, e.g. because `/dev` is not a devtmpfs.
    pub fn open(path: &Path) -> io::Result<Control> {
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            mknod(
                path,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o600),
                makedev(CONTROL_MAJOR, CONTROL_MINOR),
            )
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        }
        let file = File::options().read(true).write(true).open(path)?;
        Ok(Control { file })
    }

    /// Sends one command and returns the kernel's reply.
    pub fn call(
        &self,
        cmd: Command,
        name: &str,
        flags: u32,
        targets: &[Target],
    ) -> io::Result<Reply> {
        let mut buf = encode(name, flags, targets)?;
        // SAFETY: `buf` is a live, writable allocation of `data_size` bytes
        // starting with a valid `dm_ioctl` header, and `data_size` is what
        // the kernel reads and writes back at most. The kernel copies with
        // copy_from_user/copy_to_user, so the byte buffer needs no alignment.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd.request(), buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        decode_reply(&buf)
    }

    /// `DM_DEV_CREATE`: a new mapped device `name`, without a table yet.
    pub fn create(&self, name: &str) -> io::Result<Reply> {
        self.call(Command::DevCreate, name, 0, &[])
    }

    /// `DM_TABLE_LOAD`: loads `targets` as the inactive table of `name`,
    /// read-only with [`DM_READONLY_FLAG`].
    pub fn load_table(&self, name: &str, targets: &[Target], read_only: bool) -> io::Result<Reply> {
        let flags = if read_only { DM_READONLY_FLAG } else { 0 };
        self.call(Command::TableLoad, name, flags, targets)
    }

    /// `DM_DEV_SUSPEND` without [`DM_SUSPEND_FLAG`]: swaps the loaded table
    /// in and makes the device usable. Returns its device number.
    pub fn resume(&self, name: &str, read_only: bool) -> io::Result<Reply> {
        let flags = if read_only { DM_READONLY_FLAG } else { 0 };
        self.call(Command::DevSuspend, name, flags, &[])
    }

    /// `DM_DEV_REMOVE`: removes `name` (used to clean up a half-made device).
    pub fn remove(&self, name: &str) -> io::Result<Reply> {
        self.call(Command::DevRemove, name, 0, &[])
    }
}

/// Creates block device node `path` for `dev` if it does not exist, as
/// libdevmapper does when no udev runs (devtmpfs only names it `dm-N`).
pub fn make_block_node(path: &Path, dev: DevNum) -> io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    mknod(path, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), makedev(dev.major, dev.minor))
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel_header_layout() {
        // Offsets from <linux/dm-ioctl.h> on every Linux ABI (no pointers,
        // u64 fields naturally aligned).
        assert_eq!(size_of::<DmIoctl>(), 312);
        assert_eq!(offset_of!(DmIoctl, version), 0);
        assert_eq!(offset_of!(DmIoctl, data_size), 12);
        assert_eq!(offset_of!(DmIoctl, data_start), 16);
        assert_eq!(offset_of!(DmIoctl, target_count), 20);
        assert_eq!(offset_of!(DmIoctl, open_count), 24);
        assert_eq!(offset_of!(DmIoctl, flags), 28);
        assert_eq!(offset_of!(DmIoctl, event_nr), 32);
        assert_eq!(offset_of!(DmIoctl, padding), 36);
        assert_eq!(offset_of!(DmIoctl, dev), 40);
        assert_eq!(offset_of!(DmIoctl, name), 48);
        assert_eq!(offset_of!(DmIoctl, uuid), 176);
        assert_eq!(offset_of!(DmIoctl, data), 305);
        assert_eq!(size_of::<DmTargetSpec>(), 40);
        assert_eq!(offset_of!(DmTargetSpec, sector_start), 0);
        assert_eq!(offset_of!(DmTargetSpec, length), 8);
        assert_eq!(offset_of!(DmTargetSpec, status), 16);
        assert_eq!(offset_of!(DmTargetSpec, next), 20);
        assert_eq!(offset_of!(DmTargetSpec, target_type), 24);
    }

    #[test]
    fn request_numbers_match_the_c_macros() {
        // _IOWR(0xfd, nr, struct dm_ioctl) = 0xc138fdNN.
        assert_eq!(Command::DevCreate.request() as u32, 0xc138_fd03);
        assert_eq!(Command::DevRemove.request() as u32, 0xc138_fd04);
        assert_eq!(Command::DevSuspend.request() as u32, 0xc138_fd06);
        assert_eq!(Command::TableLoad.request() as u32, 0xc138_fd09);
    }

    #[test]
    fn a_create_request_is_a_bare_header() {
        let buf = encode("rootfs_a-verity", 0, &[]).unwrap();
        assert_eq!(buf.len(), 312);
        assert_eq!(get_u32(&buf, 0), 4);
        assert_eq!(get_u32(&buf, 4), 0);
        assert_eq!(get_u32(&buf, 12), 312);
        assert_eq!(get_u32(&buf, 16), 312);
        assert_eq!(get_u32(&buf, 20), 0);
        assert_eq!(&buf[48..63], b"rootfs_a-verity");
        assert!(buf[63..312].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_table_load_carries_aligned_target_specs() {
        let params = "1 254:2 254:2 4096 4096 2 3 sha256 ab cd".to_string();
        assert_eq!(params.len(), 40);
        let t = Target { sector_start: 0, length: 16, target_type: "verity".into(), params };
        let buf = encode("x", DM_READONLY_FLAG, &[t]).unwrap();
        // 40 bytes of params + NUL, padded to 48.
        assert_eq!(buf.len(), 312 + 40 + 48);
        assert_eq!(get_u32(&buf, 12), 400);
        assert_eq!(get_u32(&buf, 16), 312);
        assert_eq!(get_u32(&buf, 20), 1);
        assert_eq!(get_u32(&buf, 28), DM_READONLY_FLAG);
        assert_eq!(&buf[48..50], b"x\0");
        let spec = &buf[312..];
        assert_eq!(get_u64(spec, 0), 0);
        assert_eq!(get_u64(spec, 8), 16);
        assert_eq!(get_u32(spec, 16), 0);
        assert_eq!(get_u32(spec, 20), 88);
        assert_eq!(&spec[24..40], b"verity\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(&spec[40..80], b"1 254:2 254:2 4096 4096 2 3 sha256 ab cd");
        assert!(spec[80..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel_sees_them() {
        assert!(encode("", 0, &[]).is_err());
        assert!(encode("a/b", 0, &[]).is_err());
        assert!(encode(&"n".repeat(128), 0, &[]).is_err());
        assert!(encode(&"n".repeat(127), 0, &[]).is_ok());
        let t = Target {
            sector_start: 0,
            length: 8,
            target_type: "a-type-name-too-long".into(),
            params: String::new(),
        };
        assert!(encode("x", 0, &[t]).is_err());
    }

    #[test]
    fn replies_decode_the_kernel_device_number() {
        let mut buf = encode("x", 0, &[]).unwrap();
        put_u32(&mut buf, 4, 47);
        put_u32(&mut buf, 28, 1 << 5);
        // huge_encode_dev(MKDEV(253, 300)): minor low byte, major << 8,
        // minor high bits << 12.
        put_u64(&mut buf, 40, (300 & 0xff) | (253 << 8) | ((300 & !0xff) << 12));
        let r = decode_reply(&buf).unwrap();
        assert_eq!(r.version, [4, 47, 0]);
        assert_eq!(r.flags, 1 << 5);
        assert_eq!(r.dev, DevNum { major: 253, minor: 300 });
        assert_eq!(r.dev.to_string(), "253:300");
        assert!(decode_reply(&buf[..100]).is_err());
    }
}
