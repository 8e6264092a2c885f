//! Loading kernel modules with `finit_module(2)`, without modprobe.
//!
//! The builder resolves `modules.dep` on the host and writes the board's
//! modules in load order, so stage 1 only loads files: no alias lookup, no
//! dependency walk, no `/lib/modules` index on the device.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

/// `MODULE_INIT_COMPRESSED_FILE` (Linux 6.4+): the kernel decompresses the
/// file itself. nix 0.32 does not name it.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// What loading one module did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// The module was loaded now.
    New,
    /// A module of that name was already loaded (`EEXIST`): a dependency
    /// listed twice, or a second stage-1 run. Not an error.
    AlreadyPresent,
}

/// The `finit_module` flags for the module file at `path`: a compressed
/// module (`.ko.zst`, `.ko.xz`, `.ko.gz`) asks the kernel to decompress it.
pub fn init_flags(path: &Path) -> ModuleInitFlags {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if [".ko.zst", ".ko.xz", ".ko.gz"].iter().any(|ext| name.ends_with(ext)) {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    }
}

/// Loads the module file at `path` with no parameters.
pub fn load(path: &Path) -> io::Result<Loaded> {
    let file = File::open(path)?;
    match finit_module(&file, c"" as &CStr, init_flags(path)) {
        Ok(()) => Ok(Loaded::New),
        Err(Errno::EEXIST) => Ok(Loaded::AlreadyPresent),
        Err(e) => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

/// What to do about a module the kernel refused, when the refusal is
/// about its signature: `EKEYREJECTED` (`module.sig_enforce`) or `EPERM`
/// (lockdown, e.g. under UEFI Secure Boot). Empty otherwise.
pub fn refusal_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EKEYREJECTED) | Some(libc::EPERM) => {
            " (the kernel requires signed modules, as under Secure Boot: build the image \
             with [kernel] module_signatures = \"keep\")"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_refusal_says_how_to_build_instead() {
        for errno in [libc::EKEYREJECTED, libc::EPERM] {
            let hint = refusal_hint(&io::Error::from_raw_os_error(errno));
            assert!(hint.contains("module_signatures = \"keep\""), "{errno}: {hint}");
        }
        assert_eq!(refusal_hint(&io::Error::from_raw_os_error(libc::ENOENT)), "");
    }

    #[test]
    fn only_compressed_modules_ask_the_kernel_to_decompress() {
        assert!(init_flags(Path::new("/lib/modules/k/virtio.ko")).is_empty());
        assert_eq!(init_flags(Path::new("/lib/modules/k/virtio.ko.zst")).bits(), 4);
        assert_eq!(init_flags(Path::new("x.ko.xz")).bits(), 4);
        assert!(init_flags(Path::new("zst.ko")).is_empty());
    }

    #[test]
    fn a_missing_file_is_an_error_with_its_errno() {
        let err = load(Path::new("/nonexistent/basalt-test.ko")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }
}
