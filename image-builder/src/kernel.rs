//! Kernel input: a Debian kernel package or a kernel image with its modules
//! folder, and the closure of the modules an image needs.
//!
//! A `.deb` is read in Rust (ar, then the compressed data tar) and unpacked
//! once into a cache keyed by the package's sha256, so warm builds do not
//! decompress a hundred megabytes of modules again. Module dependencies
//! come from each module's own `.modinfo` section (`depends=`), because
//! Debian's package ships no `modules.dep`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// An error reading the kernel input.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file could not be read.
    #[error("cannot read kernel input {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The `.deb` is not a Debian package or not a kernel package.
    #[error("{path} is not a kernel package: {why}; give a linux-image-*.deb (e.g. `apt-get download linux-image-cloud-amd64`'s dependency) or `vmlinuz` plus `modules_dir`")]
    NotKernelPackage {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// The cache could not be written.
    #[error("cannot write the kernel cache {path}: {source}; check that the folder is writable or set XDG_CACHE_HOME")]
    Cache {
        /// The cache folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A module asked for is not part of this kernel.
    #[error("module `{name}` is not in kernel {release}{hint}")]
    UnknownModule {
        /// The module name.
        name: String,
        /// The kernel release.
        release: String,
        /// Close matches, if any.
        hint: String,
    },
    /// A module file is not an ELF object with a `.modinfo` section.
    #[error("module {path} is not a valid kernel module: {why}")]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// The kernel of an image, unpacked.
#[derive(Debug, Clone)]
pub struct KernelFiles {
    /// Kernel release (`6.1.0-56-cloud-amd64`).
    pub release: String,
    /// Path of the kernel image.
    pub vmlinuz: PathBuf,
    /// The `lib/modules/<release>` folder.
    pub modules_root: PathBuf,
    /// Package name and version, when it came from a `.deb`.
    pub package: Option<(String, String)>,
    /// What the SBOM names as the origin of kernel files.
    pub origin: String,
    /// The kernel's build configuration (`boot/config-<release>`), when
    /// the input has one.
    pub config: Option<String>,
}

/// The marker `scripts/sign-file` writes after a module's signature.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature` before the marker: algorithm, hash, id type,
/// signer and key id lengths, 3 bytes of padding, the signature's length
/// (big-endian u32).
const SIGNATURE_INFO_LEN: usize = 12;

/// What the build does with the signatures appended to module files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleSignatures {
    /// Store modules without their signature: the kernel then skips a
    /// PKCS#7 check per module, which is most of `finit_module`'s time on
    /// a slow CPU. The modules are no less trusted: stage 1's come from the
    /// initramfs, as the init itself does, and stage 2's from the root
    /// filesystem under dm-verity.
    Strip,
    /// Store modules as the kernel package has them.
    Keep,
}

/// The module file `bytes` without the signature `sign-file` appended; a
/// module without one is returned whole. A marker whose length field does
/// not fit the file is an error.
pub fn strip_signature(bytes: &[u8]) -> Result<&[u8], String> {
    let Some(head) = bytes.strip_suffix(SIGNATURE_MAGIC) else {
        return Ok(bytes);
    };
    let info_at = head
        .len()
        .checked_sub(SIGNATURE_INFO_LEN)
        .ok_or("its signature marker has no signature information before it")?;
    let info = &head[info_at..];
    let len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    info_at
        .checked_sub(len)
        .map(|end| &head[..end])
        .ok_or_else(|| format!("its signature claims {len} bytes, more than the file holds"))
}

/// Why the kernel would refuse a module without its signature, judged
/// from its build configuration and command line; `None` when it loads
/// one (marking itself tainted, nothing else). An unknown configuration
/// counts as refusing.
pub fn signatures_required(config: Option<&str>, cmdline: &[String]) -> Option<String> {
    let Some(config) = config else {
        return Some("the kernel input has no build configuration (boot/config-*)".into());
    };
    let set = |key: &str| config.lines().any(|l| l.trim() == format!("{key}=y"));
    for key in [
        "CONFIG_MODULE_SIG_FORCE",
        "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY",
        "CONFIG_LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY",
    ] {
        if set(key) {
            return Some(format!("the kernel is built with {key}=y"));
        }
    }
    let enforcing = |arg: &str| {
        arg == "module.sig_enforce"
            || arg == "module.sig_enforce=1"
            || arg.starts_with("module.sig_enforce=y")
            || arg == "lockdown=integrity"
            || arg == "lockdown=confidentiality"
    };
    cmdline
        .iter()
        .flat_map(|a| a.split_whitespace())
        .find(|a| enforcing(a))
        .map(|a| format!("the kernel command line has `{a}`"))
}

impl KernelFiles {
    /// A module file of this kernel (`rel` below its modules folder) as the
    /// image stores it.
    pub fn read_module(&self, rel: &Path, sigs: ModuleSignatures) -> Result<Vec<u8>, KernelError> {
        let path = self.modules_root.join(rel);
        let bytes = fs::read(&path).map_err(read_err(&path))?;
        match sigs {
            ModuleSignatures::Keep => Ok(bytes),
            ModuleSignatures::Strip => strip_signature(&bytes)
                .map(<[u8]>::to_vec)
                .map_err(|why| KernelError::BadModule { path, why }),
        }
    }
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |source| KernelError::Read { path: path.to_path_buf(), source }
}

fn not_kernel(path: &Path, why: impl Into<String>) -> KernelError {
    KernelError::NotKernelPackage { path: path.to_path_buf(), why: why.into() }
}

fn decompressor<'a>(name: &str, r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    Ok(if name.ends_with(".xz") {
        Box::new(xz2::read::XzDecoder::new(r))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(r)?)
    } else if name.ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(r))
    } else {
        Box::new(r)
    })
}

/// Control fields of a package: (`Package`, `Version`).
fn read_control(path: &Path, member: &str, data: &[u8]) -> Result<(String, String), KernelError> {
    let mut tar = tar::Archive::new(decompressor(member, data).map_err(read_err(path))?);
    for entry in tar.entries().map_err(read_err(path))? {
        let mut entry = entry.map_err(read_err(path))?;
        let name = entry.path().map_err(read_err(path))?.to_string_lossy().into_owned();
        if name.trim_start_matches("./") == "control" {
            let mut text = String::new();
            entry.read_to_string(&mut text).map_err(read_err(path))?;
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
                    .unwrap_or_default()
            };
            return Ok((field("Package:"), field("Version:")));
        }
    }
    Err(not_kernel(path, "its control archive has no control file"))
}

/// Unpacks a kernel `.deb` into `cache_root/kernels-v2/<sha256>/` (once)
/// and returns its files. (`v2`: the unpacked layout holds the kernel's
/// `config`; an older cache lacks it.)
pub fn load_deb(deb: &Path, cache_root: &Path) -> Result<KernelFiles, KernelError> {
    let digest = crate::digest::sha256_file(deb).map_err(read_err(deb))?;
    let dir = cache_root.join("kernels-v2").join(&digest);
    if !dir.join("complete").exists() {
        unpack_deb(deb, &dir)?;
    }
    let text = |name: &str| fs::read_to_string(dir.join(name)).map_err(read_err(&dir));
    let release = text("release")?.trim().to_string();
    let package = text("package")?;
    let (name, version) = package.split_once(' ').unwrap_or((&package, ""));
    Ok(KernelFiles {
        vmlinuz: dir.join("vmlinuz"),
        modules_root: dir.join("modules"),
        package: Some((name.to_string(), version.trim().to_string())),
        origin: format!("{name} {}", version.trim()),
        release,
        config: fs::read_to_string(dir.join("config")).ok(),
    })
}

fn unpack_deb(deb: &Path, dir: &Path) -> Result<(), KernelError> {
    let cache_err = |source| KernelError::Cache { path: dir.to_path_buf(), source };
    let parent = dir.parent().unwrap_or(dir);
    fs::create_dir_all(parent).map_err(cache_err)?;
    let tmp = tempfile::Builder::new().prefix(".unpack-").tempdir_in(parent).map_err(cache_err)?;

    let file = fs::File::open(deb).map_err(read_err(deb))?;
    let mut archive = ar::Archive::new(file);
    let mut package = None;
    let mut release = None;
    while let Some(member) = archive.next_entry() {
        let mut member = member.map_err(|e| not_kernel(deb, format!("not an ar archive ({e})")))?;
        let name = String::from_utf8_lossy(member.header().identifier()).into_owned();
        if name.starts_with("control.tar") {
            let mut data = Vec::new();
            member.read_to_end(&mut data).map_err(read_err(deb))?;
            let (pkg, version) = read_control(deb, &name, &data)?;
            if !pkg.starts_with("linux-image-") {
                return Err(not_kernel(deb, format!("its package name is `{pkg}`")));
            }
            package = Some(format!("{pkg} {version}"));
        } else if name.starts_with("data.tar") {
            let reader = decompressor(&name, &mut member).map_err(read_err(deb))?;
            release = Some(unpack_data(deb, reader, tmp.path())?);
        }
    }
    let package = package.ok_or_else(|| not_kernel(deb, "it has no control archive"))?;
    let release = release.ok_or_else(|| not_kernel(deb, "it has no data archive"))?;
    let release =
        release.ok_or_else(|| not_kernel(deb, "it holds no boot/vmlinuz-* kernel image"))?;
    if !tmp.path().join("modules").is_dir() {
        return Err(not_kernel(deb, format!("it holds no lib/modules/{release}")));
    }
    fs::write(tmp.path().join("release"), &release).map_err(cache_err)?;
    fs::write(tmp.path().join("package"), &package).map_err(cache_err)?;
    fs::write(tmp.path().join("complete"), "").map_err(cache_err)?;
    let tmp_path = tmp.keep();
    // Another build may have unpacked the same package meanwhile; either
    // copy is complete, so keep whichever landed first.
    if fs::rename(&tmp_path, dir).is_err() {
        let _ = fs::remove_dir_all(&tmp_path);
    }
    Ok(())
}

/// Unpacks `boot/vmlinuz-*` and `lib/modules/<release>/` from a data tar;
/// returns the release, if a kernel image was found.
fn unpack_data(deb: &Path, reader: impl Read, out: &Path) -> Result<Option<String>, KernelError> {
    let cache_err = |source| KernelError::Cache { path: out.to_path_buf(), source };
    let mut tar = tar::Archive::new(reader);
    let mut release = None;
    for entry in tar.entries().map_err(read_err(deb))? {
        let mut entry = entry.map_err(read_err(deb))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(read_err(deb))?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./");
        let path = path.strip_prefix("usr/").unwrap_or(path);
        if path.starts_with("boot/config-") {
            let mut f = fs::File::create(out.join("config")).map_err(cache_err)?;
            io::copy(&mut entry, &mut f).map_err(read_err(deb))?;
        } else if let Some(rel) = path.strip_prefix("boot/vmlinuz-") {
            release = Some(rel.to_string());
            let mut f = fs::File::create(out.join("vmlinuz")).map_err(cache_err)?;
            io::copy(&mut entry, &mut f).map_err(read_err(deb))?;
        } else if let Some(rest) = path.strip_prefix("lib/modules/") {
            let Some((_, inner)) = rest.split_once('/') else { continue };
            if inner.split('/').any(|c| c == ".." || c.is_empty()) {
                continue;
            }
            let dest = out.join("modules").join(inner);
            if let Some(p) = dest.parent() {
                fs::create_dir_all(p).map_err(cache_err)?;
            }
            let mut f = fs::File::create(&dest).map_err(cache_err)?;
            io::copy(&mut entry, &mut f).map_err(read_err(deb))?;
        }
    }
    Ok(release)
}

/// A kernel given as files: `vmlinuz` and its `lib/modules/<release>`;
/// its build configuration is `config-<release>` (as in `/boot`) or
/// `config` beside `vmlinuz`, if there.
pub fn load_files(vmlinuz: &Path, modules_dir: &Path) -> Result<KernelFiles, KernelError> {
    fs::metadata(vmlinuz).map_err(read_err(vmlinuz))?;
    fs::metadata(modules_dir).map_err(read_err(modules_dir))?;
    let release =
        modules_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(KernelFiles {
        vmlinuz: vmlinuz.to_path_buf(),
        modules_root: modules_dir.to_path_buf(),
        package: None,
        origin: format!("kernel files {}", vmlinuz.display()),
        config: [format!("config-{release}"), "config".to_string()]
            .iter()
            .find_map(|n| fs::read_to_string(vmlinuz.with_file_name(n)).ok()),
        release,
    })
}

/// The modules of one kernel, by name.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    release: String,
    root: PathBuf,
    /// Module name (with `_`) → path relative to the modules root.
    by_name: BTreeMap<String, PathBuf>,
    /// Modules built into the kernel (`modules.builtin`).
    builtin: BTreeSet<String>,
}

/// One module of a closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Module name, with `_`.
    pub name: String,
    /// Path relative to the modules root (`kernel/fs/squashfs/squashfs.ko`).
    pub rel_path: PathBuf,
}

/// `modprobe` treats `-` and `_` in module names as the same.
pub fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

fn module_name_of(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_suffix(".ko").or_else(|| file.strip_suffix(".ko.xz"))?;
    Some(normalize(stem))
}

impl ModuleIndex {
    /// Walks the modules folder of `kernel`.
    pub fn scan(kernel: &KernelFiles) -> Result<ModuleIndex, KernelError> {
        let root = &kernel.modules_root;
        let mut by_name = BTreeMap::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).map_err(read_err(&dir))? {
                let entry = entry.map_err(read_err(&dir))?;
                let path = entry.path();
                let ft = entry.file_type().map_err(read_err(&path))?;
                if ft.is_dir() {
                    stack.push(path);
                } else if let Some(name) = module_name_of(&path) {
                    let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    by_name.insert(name, rel);
                }
            }
        }
        let builtin = fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name_of(Path::new(l)))
            .collect();
        Ok(ModuleIndex { release: kernel.release.clone(), root: root.clone(), by_name, builtin })
    }

    /// The modules root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True if the kernel has this module built in.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// The module's direct dependencies, from its `.modinfo`.
    pub fn depends(&self, name: &str) -> Result<Vec<String>, KernelError> {
        let rel = self.lookup(name)?;
        let path = self.root.join(rel);
        let bytes = fs::read(&path).map_err(read_err(&path))?;
        let modinfo = elf_section(&bytes, ".modinfo")
            .map_err(|why| KernelError::BadModule { path: path.clone(), why })?;
        Ok(modinfo
            .split(|b| *b == 0)
            .filter_map(|kv| kv.strip_prefix(b"depends="))
            .flat_map(|v| String::from_utf8_lossy(v).split(',').map(normalize).collect::<Vec<_>>())
            .filter(|d| !d.is_empty())
            .collect())
    }

    fn lookup(&self, name: &str) -> Result<&PathBuf, KernelError> {
        let n = normalize(name);
        self.by_name.get(&n).ok_or_else(|| {
            let close: Vec<&str> = self
                .by_name
                .keys()
                .filter(|k| k.contains(&n) || n.contains(k.as_str()) && k.len() > 3)
                .take(5)
                .map(String::as_str)
                .collect();
            let hint = if close.is_empty() {
                "; check the name with `modinfo` on the kernel's modules".to_string()
            } else {
                format!("; did you mean {}?", close.join(", "))
            };
            KernelError::UnknownModule {
                name: name.to_string(),
                release: self.release.clone(),
                hint,
            }
        })
    }

    /// `names` and everything they depend on, each dependency before the
    /// modules that need it, in the order first asked. Built-in modules are
    /// satisfied without a file.
    pub fn closure<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<ModuleFile>, KernelError> {
        let mut out = Vec::new();
        let mut done = BTreeSet::new();
        for name in names {
            self.visit(&normalize(name), &mut done, &mut Vec::new(), &mut out)?;
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        out: &mut Vec<ModuleFile>,
    ) -> Result<(), KernelError> {
        if done.contains(name) || path.iter().any(|p| p == name) {
            return Ok(());
        }
        if !self.by_name.contains_key(name) && self.is_builtin(name) {
            done.insert(name.to_string());
            return Ok(());
        }
        let rel = self.lookup(name)?.clone();
        path.push(name.to_string());
        for dep in self.depends(name)? {
            self.visit(&dep, done, path, out)?;
        }
        path.pop();
        done.insert(name.to_string());
        out.push(ModuleFile { name: name.to_string(), rel_path: rel });
        Ok(())
    }
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The bytes of a named section of a 64-bit little-endian ELF file (both
/// x86-64 and arm64 modules are).
fn elf_section<'a>(elf: &'a [u8], want: &str) -> Result<&'a [u8], String> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let bad = || "truncated ELF section table".to_string();
    let shoff = le_u64(elf, 0x28).ok_or_else(bad)? as usize;
    let shentsize = le_u16(elf, 0x3a).ok_or_else(bad)? as usize;
    let shnum = le_u16(elf, 0x3c).ok_or_else(bad)? as usize;
    let shstrndx = le_u16(elf, 0x3e).ok_or_else(bad)? as usize;
    let section = |i: usize| -> Option<(u32, &'a [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = le_u32(elf, h)?;
        let off = le_u64(elf, h + 24)? as usize;
        let size = le_u64(elf, h + 32)? as usize;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, strtab) = section(shstrndx).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name_off, data) = section(i).ok_or_else(bad)?;
        let name = strtab.get(name_off as usize..).unwrap_or(&[]);
        let name = name.split(|b| *b == 0).next().unwrap_or(&[]);
        if name == want.as_bytes() {
            return Ok(data);
        }
    }
    Err(format!("no {want} section"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(body: &[u8], sig: &[u8]) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend_from_slice(sig);
        v.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        v.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        v.extend_from_slice(SIGNATURE_MAGIC);
        v
    }

    #[test]
    fn a_signature_is_cut_off_exactly_and_an_unsigned_module_kept_whole() {
        let body = b"\x7fELF module body";
        assert_eq!(strip_signature(&signed(body, &[7; 300])).unwrap(), body);
        assert_eq!(strip_signature(&signed(body, &[])).unwrap(), body);
        assert_eq!(strip_signature(body).unwrap(), body);
    }

    #[test]
    fn a_signature_longer_than_the_file_is_an_error() {
        let mut bad = signed(b"abc", &[1; 10]);
        let at = bad.len() - SIGNATURE_MAGIC.len() - 4;
        bad[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(strip_signature(&bad).unwrap_err().contains("1000 bytes"));
        assert!(strip_signature(SIGNATURE_MAGIC).is_err());
    }

    #[test]
    fn signatures_are_required_by_a_forcing_config_or_command_line() {
        let debian = "CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n\
                      CONFIG_LOCK_DOWN_KERNEL_FORCE_NONE=y\nCONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT=y\n";
        assert_eq!(signatures_required(Some(debian), &["quiet".into()]), None);
        let forced = format!("{debian}CONFIG_MODULE_SIG_FORCE=y\n");
        assert!(signatures_required(Some(&forced), &[]).unwrap().contains("SIG_FORCE"));
        let locked = format!("{debian}CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY=y\n");
        assert!(signatures_required(Some(&locked), &[]).unwrap().contains("INTEGRITY"));
        for arg in ["module.sig_enforce=1", "lockdown=integrity", "quiet lockdown=confidentiality"]
        {
            let why = signatures_required(Some(debian), &[arg.to_string()]).unwrap();
            assert!(why.contains("command line"), "{arg}: {why}");
        }
        assert!(signatures_required(Some(debian), &["module.sig_enforce=0".into()]).is_none());
        assert!(signatures_required(None, &[]).unwrap().contains("no build configuration"));
    }

    #[test]
    fn rejects_what_is_not_elf() {
        assert!(elf_section(b"not an elf", ".modinfo").is_err());
        assert!(elf_section(b"\x7fELF\x02\x01", ".modinfo").is_err());
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize("dm-verity"), "dm_verity");
        assert_eq!(module_name_of(Path::new("a/b/nls_iso8859-1.ko")).unwrap(), "nls_iso8859_1");
        assert_eq!(module_name_of(Path::new("a/b/x.txt")), None);
    }
}
