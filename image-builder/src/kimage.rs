//! The kernel image file: which architecture it is for, and the form UEFI
//! loads.
//!
//! A kernel that UEFI boots (through systemd-boot) is a PE/COFF file: the
//! x86 `bzImage` and the arm64 `Image` both carry a PE header with the
//! machine type. Some distributions ship the arm64 `Image` gzip-compressed
//! as `vmlinuz` (GRUB unpacks it; Debian's is not compressed); systemd-boot
//! does not unpack it, so the build stores it unpacked.

use std::io::{self, Read};

use basalt_bundle::layout::Arch;

/// Largest unpacked kernel image accepted (a gzip bomb stops here).
const MAX_IMAGE: u64 = 256 << 20;

/// The PE machine type of x86-64.
const PE_AMD64: u16 = 0x8664;
/// The PE machine type of arm64.
const PE_ARM64: u16 = 0xaa64;

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// The kernel image as UEFI loads it: a gzip-compressed image is
/// unpacked, anything else is returned as it is.
pub fn unpack(bytes: Vec<u8>) -> io::Result<Vec<u8>> {
    if !is_gzip(&bytes) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..]).take(MAX_IMAGE + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_IMAGE {
        return Err(io::Error::other(format!(
            "the kernel image unpacks to more than {} MiB",
            MAX_IMAGE >> 20
        )));
    }
    Ok(out)
}

/// The first `len` bytes of the kernel image as UEFI loads it (unpacked
/// only as far as needed).
pub fn head(bytes: &[u8], len: usize) -> io::Result<Vec<u8>> {
    if !is_gzip(bytes) {
        return Ok(bytes[..bytes.len().min(len)].to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).take(len as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// Bytes of [`head`] that [`arch`] needs.
pub const HEAD_LEN: usize = 4096;

/// The architecture of an unpacked kernel image, from its PE header;
/// `None` if it has no PE header UEFI could load or is for another
/// machine.
pub fn arch(image: &[u8]) -> Option<Arch> {
    if !image.starts_with(b"MZ") {
        return None;
    }
    let at = |o: usize, n: usize| image.get(o..o + n);
    let pe = u32::from_le_bytes(at(0x3c, 4)?.try_into().ok()?) as usize;
    if at(pe, 4)? != b"PE\0\0" {
        return None;
    }
    match u16::from_le_bytes(at(pe + 4, 2)?.try_into().ok()?) {
        PE_AMD64 => Some(Arch::X86_64),
        PE_ARM64 => Some(Arch::Aarch64),
        _ => None,
    }
}

/// Whether an unpacked kernel image carries the arm64 `Image` header's
/// magic (`ARM\x64` at byte 56, Documentation/arch/arm64/booting.rst):
/// what the Raspberry Pi firmware loads, with or without the EFI stub's PE
/// header that UEFI needs.
pub fn is_arm64_image(image: &[u8]) -> bool {
    image.get(56..60) == Some(b"ARM\x64".as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal PE header of `machine`, as the kernels' EFI stubs have.
    fn pe(machine: u16) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        b[0x84..0x86].copy_from_slice(&machine.to_le_bytes());
        b
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn the_pe_machine_names_the_arch_also_inside_gzip() {
        assert_eq!(arch(&pe(PE_AMD64)), Some(Arch::X86_64));
        assert_eq!(arch(&pe(PE_ARM64)), Some(Arch::Aarch64));
        assert_eq!(arch(&pe(0x14c)), None, "i386");
        assert_eq!(arch(b"\x7fELF not a PE file"), None);
        let mut bad = pe(PE_ARM64);
        bad[0x3c..0x40].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert_eq!(arch(&bad), None, "PE offset past the end");
        let packed = gzip(&pe(PE_ARM64));
        assert_eq!(arch(&head(&packed, HEAD_LEN).unwrap()), Some(Arch::Aarch64));
        assert_eq!(unpack(packed).unwrap(), pe(PE_ARM64));
        assert_eq!(unpack(pe(PE_AMD64)).unwrap(), pe(PE_AMD64));
    }

    #[test]
    fn the_arm64_image_magic_is_at_byte_56() {
        let mut image = vec![0u8; 64];
        assert!(!is_arm64_image(&image));
        image[56..60].copy_from_slice(b"ARM\x64");
        assert!(is_arm64_image(&image));
        assert!(!is_arm64_image(&image[..58]));
    }

    /// The kernels ci/setup.sh fetches.
    #[test]
    fn debian_cloud_kernels_are_of_their_arch() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cache = crate::plan::default_cache_dir();
        for (deb, want) in [
            (".cache/kernel/linux-image-cloud-amd64.deb", Arch::X86_64),
            (".cache/kernel/linux-image-cloud-arm64.deb", Arch::Aarch64),
        ] {
            let deb = root.join(deb);
            assert!(deb.exists(), "no {}: run ci/setup.sh, which fetches it", deb.display());
            let k = crate::kernel::load_deb(&deb, &cache).unwrap();
            let bytes = std::fs::read(&k.vmlinuz).unwrap();
            assert_eq!(arch(&head(&bytes, HEAD_LEN).unwrap()), Some(want), "{}", deb.display());
            let image = unpack(bytes).unwrap();
            assert_eq!(arch(&image), Some(want), "{}", deb.display());
            assert_eq!(is_arm64_image(&image), want == Arch::Aarch64, "{}", deb.display());
        }
    }
}
