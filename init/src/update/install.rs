//! Writing a new OS version into the inactive slot.
//!
//! The order is what makes a power cut at any moment harmless:
//!
//! 1. [`Bootloader::begin_install`] makes the target slot unbootable (its
//!    boot entry goes first, flushed) and clears its boot files;
//! 2. the kernel and initrd go onto the ESP under temporary names, flushed,
//!    then renamed; the root filesystem goes straight into the slot's
//!    partition, flushed; every payload is checked against its sha256 as
//!    it streams through (the bundle reader refuses to end a payload whose
//!    hash or size is wrong);
//! 3. only when every payload matched, the bundle ended cleanly and
//!    everything is on the disk does [`Bootloader::prefer_for_one_try`]
//!    write the slot's new entry, with a try counter.
//!
//! Until step 3 the target slot has no entry, so the bootloader can only
//! boot the running slot, whose entry and files are never touched.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use basalt_bundle::archive::BundleReader;
use basalt_bundle::slot::Slot;

use crate::assess::Bootloader;
use crate::update::cut;

/// The size of one write when streaming a payload to its destination.
pub const CHUNK: usize = 1 << 20;

/// Why an install stopped. The running slot is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or device could not be read, written or flushed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Reading a payload from the bundle failed: a damaged or modified
    /// bundle, or a connection that broke.
    #[error("payload {name:?}: {source}")]
    Payload {
        /// The payload.
        name: String,
        /// The reader's error (hash or size mismatch, truncation, ...).
        #[source]
        source: io::Error,
    },
    /// A payload does not fit its destination.
    #[error(
        "payload {name:?} is {size} bytes but {} holds {capacity}; this bundle was built for a \
         board with larger partitions",
        path.display()
    )]
    TooBig {
        /// The payload.
        name: String,
        /// Its size.
        size: u64,
        /// The room there is.
        capacity: u64,
        /// The destination.
        path: PathBuf,
    },
    /// The bundle carries a payload this version does not know where to
    /// write.
    #[error("unknown payload {0:?} in an OS bundle (expected vmlinuz, initrd, rootfs)")]
    UnknownPayload(String),
    /// The bundle ended without a payload every OS slot needs.
    #[error("the bundle has no {0:?} payload")]
    MissingPayload(&'static str),
    /// The bundle stream is wrong between payloads.
    #[error("{0}")]
    Bundle(String),
    /// The bootloader cannot be told (its own error).
    #[error("{0}")]
    Bootloader(String),
}

/// Maps an `io::Error` of `what` on `path`.
pub fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io { what, path: path.to_path_buf(), source }
}

/// The payloads of a bundle, in bundle order.
pub trait Payloads {
    /// The next payload's name, declared size and content; `None` after the
    /// last. A payload's reader returns end-of-file only once its content
    /// has been checked against the manifest.
    #[allow(clippy::type_complexity)]
    fn next_payload(&mut self) -> Result<Option<(String, u64, Box<dyn Read + '_>)>, InstallError>;
}

/// What [`write_slot`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Bytes of kernel and initrd written to the ESP.
    pub boot_bytes: u64,
    /// Bytes written to the root partition.
    pub root_bytes: u64,
}

/// Steps 1 and 2 of the install (see the module docs): clears `slot`, then
/// streams every payload to its place. The caller checks that the bundle
/// ended cleanly and then calls [`Bootloader::prefer_for_one_try`].
pub fn write_slot(
    bl: &mut dyn Bootloader,
    slot: Slot,
    root_device: &Path,
    payloads: &mut dyn Payloads,
    chunk: usize,
) -> Result<Written, InstallError> {
    bl.begin_install(slot)?;
    let mut written = Written::default();
    let mut seen = [false; 3];
    while let Some((name, size, mut content)) = payloads.next_payload()? {
        match name.as_str() {
            "vmlinuz" | "initrd" => {
                written.boot_bytes += bl.install_file(slot, &name, &mut content, chunk)?;
                seen[usize::from(name == "initrd")] = true;
            }
            "rootfs" => {
                written.root_bytes =
                    write_partition(root_device, &name, size, &mut content, chunk)?;
                seen[2] = true;
            }
            _ => return Err(InstallError::UnknownPayload(name)),
        }
    }
    for (seen, name) in seen.iter().zip(["vmlinuz", "initrd", "rootfs"]) {
        if !seen {
            return Err(InstallError::MissingPayload(name));
        }
    }
    Ok(written)
}

/// Fills `buf` from `r` as far as it can; returns the bytes read (less than
/// `buf.len()` only at the end).
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Copies a payload into `out` in writes of `chunk` bytes, never more than
/// `capacity` bytes; returns the bytes copied. The payload's reader
/// reaching its end means its hash matched.
pub fn copy_payload(
    name: &str,
    content: &mut dyn Read,
    out: &mut std::fs::File,
    path: &Path,
    capacity: u64,
    chunk: usize,
) -> Result<u64, InstallError> {
    let mut buf = vec![0u8; chunk.max(512)];
    let mut total = 0u64;
    loop {
        let n = read_full(content, &mut buf)
            .map_err(|source| InstallError::Payload { name: name.to_string(), source })?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if total > capacity {
            return Err(InstallError::TooBig {
                name: name.to_string(),
                size: total,
                capacity,
                path: path.to_path_buf(),
            });
        }
        cut::write_all(out, &buf[..n]).map_err(io_err("write", path))?;
    }
}

/// Streams the root filesystem into a partition (or, in tests, a file of
/// the partition's size) and flushes it.
pub fn write_partition(
    device: &Path,
    name: &str,
    size: u64,
    content: &mut dyn Read,
    chunk: usize,
) -> Result<u64, InstallError> {
    let mut dev = OpenOptions::new().write(true).open(device).map_err(io_err("open", device))?;
    let capacity = dev.seek(SeekFrom::End(0)).map_err(io_err("measure", device))?;
    if size > capacity {
        return Err(InstallError::TooBig {
            name: name.to_string(),
            size,
            capacity,
            path: device.to_path_buf(),
        });
    }
    dev.seek(SeekFrom::Start(0)).map_err(io_err("seek in", device))?;
    let n = copy_payload(name, content, &mut dev, device, capacity, chunk)?;
    cut::sync(&dev).map_err(io_err("flush", device))?;
    Ok(n)
}

/// A bundle's payloads, for [`install::write_slot`].
pub struct BundlePayloads<'a, R: Read>(pub &'a mut BundleReader<R>);

impl<R: Read> Payloads for BundlePayloads<'_, R> {
    fn next_payload(&mut self) -> Result<Option<(String, u64, Box<dyn Read + '_>)>, InstallError> {
        match self.0.next_payload() {
            Ok(Some(p)) => {
                let (name, size) = (p.info().name.clone(), p.info().size);
                Ok(Some((name, size, Box::new(p))))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(InstallError::Bundle(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assess::SystemdBoot;
    use crate::update::testing::*;
    use basalt_bundle::entry::ENTRIES_DIR;
    use std::fs;

    #[test]
    fn an_install_makes_the_new_slot_boot_next() {
        let (v1, v2) = (version("1.0.0", 1, 64 << 10), version("1.1.0", 2, 96 << 10));
        let disk = factory(&v1, None);
        assert_eq!(next_boot(&disk, &[&v1]).unwrap().version, "1.0.0");
        let entry = install(&disk, &v2, CHUNK).unwrap();
        assert_eq!(entry.to_string(), "b+3.conf");
        assert_eq!(next_boot(&disk, &[&v1, &v2]).unwrap().version, "1.1.0");
        // No temporary file is left behind.
        for dir in [disk.esp.join(ENTRIES_DIR), disk.esp.join("b")] {
            for e in fs::read_dir(dir).unwrap() {
                let name = e.unwrap().file_name().into_string().unwrap();
                assert!(!name.ends_with(".tmp"), "{name}");
            }
        }
    }

    #[test]
    fn never_installs_into_the_running_slot() {
        let v1 = version("1.0.0", 1, 4096);
        let disk = factory(&v1, None);
        let mut bl = SystemdBoot::new(&disk.esp, Some(Slot::B));
        let err = write_slot(&mut bl, Slot::B, &disk.roots[1], &mut payloads(&v1), CHUNK);
        assert!(err.unwrap_err().to_string().contains("running now"));
    }

    #[test]
    fn a_root_too_big_for_the_partition_is_refused_before_writing() {
        let (v1, big) = (version("1.0.0", 1, 4096), version("2.0.0", 3, 4 << 20));
        let disk = factory(&v1, None);
        let before = fs::read(&disk.roots[1]).unwrap();
        let err = install(&disk, &big, CHUNK).unwrap_err();
        assert!(matches!(err, InstallError::TooBig { .. }), "{err}");
        assert_eq!(fs::read(&disk.roots[1]).unwrap(), before);
        assert_eq!(next_boot(&disk, &[&v1]).unwrap().version, "1.0.0");
    }

    /// A power cut after every single change an install makes: the next
    /// boot always runs a whole, matching version (the old one until the
    /// new entry exists, the new one after), and a second install after
    /// any cut completes.
    #[test]
    fn a_cut_after_any_write_leaves_a_bootable_slot() {
        let v09 = version("0.9.0", 9, 80 << 10);
        let v1 = version("1.0.0", 1, 64 << 10);
        let v2 = version("1.1.0", 2, 2 << 20);
        let known = [&v09, &v1, &v2];
        let chunk = 2048;
        let (done, total) =
            cut::count(|| install(&factory(&v1, Some((&v09, "b.conf"))), &v2, chunk));
        done.unwrap();
        assert!(total >= 1000, "only {total} cut points");
        let (mut old, mut new) = (0, 0);
        for n in 0..=total {
            let disk = factory(&v1, Some((&v09, "b.conf")));
            let (result, was_cut) = cut::with_budget(n, || install(&disk, &v2, chunk));
            assert_eq!(was_cut, n < total, "cut {n}");
            if was_cut {
                let err = result.unwrap_err().to_string();
                assert!(err.contains(cut::CUT), "cut {n}: {err}");
            }
            match next_boot(&disk, &known) {
                Ok(v) if v.version == "1.0.0" => old += 1,
                Ok(v) if v.version == "1.1.0" => new += 1,
                Ok(v) => panic!("cut {n}: boots {}", v.version),
                Err(e) => panic!("cut {n}: {e}"),
            }
            if n % 101 == 0 {
                install(&disk, &v2, CHUNK).unwrap();
                assert_eq!(next_boot(&disk, &known).unwrap().version, "1.1.0", "cut {n}");
            }
        }
        // The new version boots only once its entry is in place: after the
        // last few changes of the install.
        assert!((1..8).contains(&new), "{new} cut points boot the new version");
        assert_eq!(old + new, total + 1);
    }
}
