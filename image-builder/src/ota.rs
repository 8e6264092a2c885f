//! OTA on the host: OS bundles from a build, extra signatures, and the
//! static update repository (`basalt bundle`, `sign`, `verify`,
//! `publish`).
//!
//! A repository is a folder any HTTP server can serve:
//!
//! ```text
//! bundles/<name>-<version>.basalt
//! channels/<channel>.toml        signed channel file: version, bundle, sha256, size, expiry, rollout
//! channels/<channel>.toml.sig
//! bundles/models/<name>-<version>.basalt          model bundles
//! channels/models/<name>/<channel>.toml (+ .sig)  a model's channels
//! ```

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use basalt_bundle::archive::{self, BundleReader, Trust};
use basalt_bundle::channel::{self, Channel};
use basalt_bundle::civil;
use basalt_bundle::config::VerityParams;
use basalt_bundle::keys::{PublicKey, SigningKey};
use basalt_bundle::manifest::{
    BundleKind, Compression, Manifest, OsInfo, PayloadInfo, FORMAT_VERSION,
};
use basalt_bundle::signature::{self, SignatureFile};
use sha2::{Digest, Sha256};

use crate::build::SlotArtifacts;
use crate::plan::Plan;

/// The file name of the bundle a build writes beside the image.
pub const BUNDLE_FILE: &str = "update.basalt";

/// The zstd level of payloads: the root filesystem is compressed already,
/// so a higher level buys little and costs build time.
pub const LEVEL: i32 = 3;

/// Why an OTA step failed.
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    /// A file could not be read or written.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A key file is not usable.
    #[error("{}: {message}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The bundle is not valid.
    #[error("{}: {source}", path.display())]
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// Why.
        #[source]
        source: archive::BundleError,
    },
    /// Something else is wrong; the message says what to do.
    #[error("{0}")]
    Other(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OtaError + 'a {
    move |source| OtaError::Io { what, path: path.to_path_buf(), source }
}

/// Reads a private key (PKCS#8 PEM, ours or OpenSSL's).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, OtaError> {
    let pem = fs::read_to_string(path).map_err(io_err("read the key", path))?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| OtaError::Key { path: path.to_path_buf(), message: e.to_string() })
}

/// Reads a public key (PEM).
pub fn read_public_key(path: &Path) -> Result<PublicKey, OtaError> {
    let pem = fs::read_to_string(path).map_err(io_err("read the key", path))?;
    PublicKey::from_pem(&pem)
        .map_err(|e| OtaError::Key { path: path.to_path_buf(), message: e.to_string() })
}

/// The bytes of a slot's root partition: the squashfs, zeros up to the
/// verity hash offset, the verity superblock and tree.
pub fn rootfs_payload(squashfs: &[u8], hash_area: &[u8], verity: &VerityParams) -> Vec<u8> {
    let at = (verity.hash_offset as usize).max(squashfs.len());
    let mut out = Vec::with_capacity(at + hash_area.len());
    out.extend_from_slice(squashfs);
    out.resize(at, 0);
    out.extend_from_slice(hash_area);
    out
}

/// One OS version's content, ready to bundle.
pub struct OsContent {
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: semver::Version,
    /// The board it runs on.
    pub board: String,
    /// Kernel command line without `basalt.slot=`.
    pub cmdline: String,
    /// Boot tries of a new slot.
    pub tries: u32,
    /// Creation time (Unix seconds; `SOURCE_DATE_EPOCH` of the build).
    pub created: u64,
    /// The kernel.
    pub vmlinuz: Vec<u8>,
    /// The initramfs.
    pub initrd: Vec<u8>,
    /// The root partition's bytes ([`rootfs_payload`]).
    pub rootfs: Vec<u8>,
    /// Its verity parameters.
    pub verity: VerityParams,
}

impl OsContent {
    /// The content of slot a of a build.
    pub fn from_build(plan: &Plan, art: &SlotArtifacts) -> OsContent {
        OsContent {
            name: plan.name.clone(),
            version: plan.version.clone(),
            board: plan.board.name.value.clone(),
            cmdline: plan.cmdline.clone(),
            tries: plan.tries,
            created: plan.source_date_epoch,
            vmlinuz: art.vmlinuz.to_vec(),
            initrd: art.initrd.clone(),
            rootfs: rootfs_payload(&art.squashfs, &art.hash_area, &art.verity),
            verity: art.verity.clone(),
        }
    }

    /// The content of slot a of a build output folder (`disk.img` and
    /// `report.json`), as `basalt bundle DIR` bundles it. The disk may have
    /// been booted since: slot a's partition and files never change, and
    /// the root hash is checked against the one its initramfs carries.
    pub fn from_output(dir: &Path) -> Result<OsContent, OtaError> {
        use basalt_bundle::config::{SlotConfig, SLOT_CONFIG_PATH};
        use basalt_bundle::entry::{BootEntryName, EntryConf, ENTRIES_DIR};
        use basalt_bundle::layout::{ESP_LABEL, ROOTFS_A_LABEL, RPI_BOOT_A_LABEL};
        use basalt_bundle::slot::Slot;
        use basalt_bundle::tryboot::{CMDLINE_TXT, INITRD_FILE, KERNEL_FILE};
        let report_path = dir.join("report.json");
        let text = fs::read_to_string(&report_path).map_err(io_err("read", &report_path))?;
        let bad = |what: &str| {
            OtaError::Other(format!(
                "{} has no valid {what}; is {} a `basalt build` output folder?",
                report_path.display(),
                dir.display()
            ))
        };
        let report: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad("JSON"))?;
        let field = |k: &str| report[k].as_str().map(str::to_string).ok_or_else(|| bad(k));
        let name = field("name")?;
        let version = semver::Version::parse(&field("version")?).map_err(|_| bad("version"))?;
        let board = field("board")?;
        let created =
            report["source_date_epoch"].as_u64().ok_or_else(|| bad("source_date_epoch"))?;
        let slot_a = &report["slot_a"];
        let verity: VerityParams =
            serde_json::from_value(slot_a["verity"].clone()).map_err(|_| bad("slot_a.verity"))?;
        let tree =
            slot_a["hash_tree_bytes"].as_u64().ok_or_else(|| bad("slot_a.hash_tree_bytes"))?;
        let tries = slot_a["entry"]
            .as_str()
            .and_then(BootEntryName::parse)
            .and_then(|e| e.counter)
            .map_or(3, |c| c.tries_left().max(1));

        let disk = dir.join("disk.img");
        let mut f = fs::File::open(&disk).map_err(io_err("read", &disk))?;
        let (_, parts) = crate::gpt::read(&mut f)
            .map_err(|e| OtaError::Other(format!("{}: {e}", disk.display())))?;
        let part = |label: &str| {
            parts.iter().find(|p| p.label == label).cloned().ok_or_else(|| {
                OtaError::Other(format!("{} has no partition {label:?}", disk.display()))
            })
        };
        let inspect_err = |e: crate::inspect::InspectError| OtaError::Other(e.to_string());
        // A Raspberry Pi image keeps slot a's files in its own boot
        // partition; every other image on the ESP.
        let pi = parts.iter().any(|p| p.label == RPI_BOOT_A_LABEL);
        let boot = part(if pi { RPI_BOOT_A_LABEL } else { ESP_LABEL })?;
        let boot_bytes = crate::inspect::read_at(&mut f, &disk, boot.offset, boot.size as usize)
            .map_err(inspect_err)?;
        let fat = crate::fat::FatReader::new(&boot_bytes)
            .map_err(|e| OtaError::Other(format!("{}: {}: {e}", disk.display(), boot.label)))?;
        let file = |p: &str| {
            fat.read_file(p).map_err(|e| {
                OtaError::Other(format!("{}: {} {p}: {e}", disk.display(), boot.label))
            })
        };
        let uboot = serde_json::from_value::<basalt_bundle::config::UbootEnvConfig>(
            report["uboot_env"].clone(),
        )
        .ok();
        let mut tries = tries;
        let (vmlinuz, initrd, options) = if pi {
            let cmdline = String::from_utf8_lossy(&file(CMDLINE_TXT)?).into_owned();
            (file(KERNEL_FILE)?, file(INITRD_FILE)?, cmdline)
        } else if let Some(u) = uboot {
            // A U-Boot image: slot a's command line is in the environment
            // (the first copy with a valid CRC; both hold the same).
            let env = [u.offset, u.offset_redund]
                .into_iter()
                .filter_map(|at| {
                    let block = crate::inspect::read_at(&mut f, &disk, at, u.size as usize).ok()?;
                    basalt_bundle::uboot::Env::from_block(&block, true).ok()?.1
                })
                .next()
                .ok_or_else(|| {
                    OtaError::Other(format!("{}: no valid U-Boot environment", disk.display()))
                })?;
            let args = basalt_bundle::uboot::args_var(Slot::A);
            let options = env.get(&args).map(str::to_string).ok_or_else(|| {
                OtaError::Other(format!("{}: the U-Boot environment has no {args}", disk.display()))
            })?;
            tries = u32::try_from(env.get_ulong(basalt_bundle::uboot::BOOTLIMIT, 3).max(1))
                .unwrap_or(3);
            (file("a/vmlinuz")?, file("a/initrd")?, options)
        } else {
            let entry = fat
                .list_dir(ENTRIES_DIR)
                .unwrap_or_default()
                .into_iter()
                .find(|e| BootEntryName::parse(&e.name).is_some_and(|n| n.slot == Slot::A))
                .ok_or_else(|| {
                    OtaError::Other(format!("{}: no boot entry for slot a", disk.display()))
                })?;
            let conf = EntryConf::parse(&String::from_utf8_lossy(&file(&format!(
                "{ENTRIES_DIR}/{}",
                entry.name
            ))?))
            .ok_or_else(|| {
                OtaError::Other(format!("{}: unreadable entry {}", disk.display(), entry.name))
            })?;
            (file("a/vmlinuz")?, file("a/initrd")?, conf.options)
        };
        let cmdline: Vec<&str> =
            options.split_whitespace().filter(|w| !w.starts_with("basalt.slot=")).collect();
        let carried = zstd::stream::decode_all(&initrd[..])
            .ok()
            .and_then(|cpio| crate::inspect::cpio_file(&cpio, SLOT_CONFIG_PATH))
            .and_then(|t| SlotConfig::from_toml(&String::from_utf8_lossy(&t)).ok())
            .map(|c| c.verity.root_hash);
        if carried.as_deref() != Some(verity.root_hash.as_str()) {
            return Err(OtaError::Other(format!(
                "{}: slot a's initramfs carries root hash {carried:?}, report.json says {};                  the folder mixes two builds — build again",
                dir.display(),
                verity.root_hash
            )));
        }
        let root = part(ROOTFS_A_LABEL)?;
        let len = verity.hash_offset + tree;
        let rootfs = crate::inspect::read_at(&mut f, &disk, root.offset, len as usize)
            .map_err(inspect_err)?;
        Ok(OsContent {
            name,
            version,
            board,
            cmdline: cmdline.join(" "),
            tries,
            created,
            vmlinuz,
            initrd,
            rootfs,
            verity,
        })
    }

    /// The manifest describing this content.
    pub fn manifest(&self) -> Manifest {
        let describe = |name: &str, data: &[u8], verity: Option<VerityParams>| {
            PayloadInfo::describe(name, data, Compression::Zstd, verity)
        };
        Manifest {
            format: FORMAT_VERSION,
            kind: BundleKind::Os,
            name: self.name.clone(),
            version: self.version.clone(),
            compatible: vec![self.board.clone()],
            created: civil::unix_to_datetime(self.created as i64),
            os: Some(OsInfo { cmdline: self.cmdline.clone(), tries: self.tries }),
            payloads: vec![
                describe("vmlinuz", &self.vmlinuz, None),
                describe("initrd", &self.initrd, None),
                describe("rootfs", &self.rootfs, Some(self.verity.clone())),
            ],
        }
    }
}

/// What a written bundle holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BundleSummary {
    /// The file.
    pub path: PathBuf,
    /// Image name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Its size in bytes.
    pub size: u64,
    /// sha256 of the whole file.
    pub sha256: String,
    /// Key ids that signed it.
    pub signed_by: Vec<String>,
}

/// Writes `bytes` to `path` through a temporary file beside it.
///
/// A file that replaces another gets a modification time at least one
/// whole second later than the old one's: web servers such as nginx make a
/// file's ETag from its size and its mtime in seconds, so a channel file
/// republished within the same second at the same size (rollout 5 -> 6)
/// would otherwise keep its ETag, and devices asking `If-None-Match` would
/// be told 304 and never see it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OtaError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err("create a file in", dir))?;
    tmp.write_all(bytes).map_err(io_err("write", path))?;
    if let Some(later) =
        fs::metadata(path).ok().and_then(|m| m.modified().ok()).and_then(later_than)
    {
        tmp.as_file().set_modified(later).map_err(io_err("set the time of", path))?;
    }
    tmp.as_file().sync_all().map_err(io_err("sync", path))?;
    tmp.persist(path).map_err(|e| OtaError::Io {
        what: "write",
        path: path.into(),
        source: e.error,
    })?;
    Ok(())
}

/// A time in a later whole second than `old`, if now is not one already.
fn later_than(old: std::time::SystemTime) -> Option<std::time::SystemTime> {
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    };
    let old = secs(old);
    (secs(std::time::SystemTime::now()) <= old)
        .then(|| std::time::UNIX_EPOCH + std::time::Duration::from_secs(old + 1))
}

fn sha256_file(path: &Path) -> Result<(u64, String), OtaError> {
    let mut f = fs::File::open(path).map_err(io_err("read", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io_err("read", path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

/// Writes an OS bundle of `content`, signed by every key in `keys`.
pub fn write_os_bundle(
    content: &OsContent,
    keys: &[SigningKey],
    out: &Path,
) -> Result<BundleSummary, OtaError> {
    if keys.is_empty() {
        return Err(OtaError::Other("a bundle needs at least one signing key".into()));
    }
    let manifest = content.manifest().to_toml();
    let mut sigs = SignatureFile::default();
    for k in keys {
        sigs.add(signature::sign(manifest.as_bytes(), k));
    }
    let sig_text = sigs.to_toml().map_err(|e| OtaError::Other(e.to_string()))?;
    let compress = |data: &[u8], what: &str| {
        archive::compress(data, LEVEL)
            .map_err(|e| OtaError::Other(format!("cannot compress the {what}: {e}")))
    };
    let vmlinuz = compress(&content.vmlinuz, "kernel")?;
    let initrd = compress(&content.initrd, "initrd")?;
    let rootfs = compress(&content.rootfs, "root filesystem")?;
    let payloads: [(&str, &[u8]); 3] =
        [("vmlinuz", &vmlinuz), ("initrd", &initrd), ("rootfs", &rootfs)];
    let bytes = archive::write_bundle(
        Vec::new(),
        manifest.as_bytes(),
        sig_text.as_bytes(),
        &payloads,
        content.created,
    )
    .map_err(io_err("write", out))?;
    write_atomic(out, &bytes)?;
    Ok(BundleSummary {
        path: out.to_path_buf(),
        name: content.name.clone(),
        version: content.version.to_string(),
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&bytes)),
        signed_by: keys.iter().map(|k| k.public().key_id()).collect(),
    })
}

/// `basalt sign`: adds (or renews) `key`'s signature on a bundle, in place.
pub fn sign_bundle(path: &Path, key: &SigningKey) -> Result<Vec<String>, OtaError> {
    let input = fs::File::open(path).map_err(io_err("read", path))?;
    let mut out = Vec::new();
    let mut ids = Vec::new();
    archive::replace_signatures(io::BufReader::new(input), &mut out, |manifest, mut sigs| {
        sigs.add(signature::sign(manifest, key));
        ids = sigs.signatures.iter().map(|s| s.key_id.clone()).collect();
        Ok::<_, std::convert::Infallible>(sigs)
    })
    .map_err(|e| match e {
        archive::ReplaceError::Bundle(source) => {
            OtaError::Bundle { path: path.to_path_buf(), source }
        }
        archive::ReplaceError::Sign(never) => match never {},
    })?;
    write_atomic(path, &out)?;
    Ok(ids)
}

/// What `basalt verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verified {
    /// The manifest.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Compatible boards.
    pub compatible: Vec<String>,
    /// Key ids whose signature was accepted.
    pub signed_by: Vec<String>,
    /// Payloads with their sizes.
    pub payloads: Vec<(String, u64)>,
}

/// `basalt verify`: checks signatures as a device would, then every
/// payload against the manifest.
pub fn verify_bundle(path: &Path, trust: &Trust) -> Result<Verified, OtaError> {
    let input = fs::File::open(path).map_err(io_err("read", path))?;
    let berr = |source| OtaError::Bundle { path: path.to_path_buf(), source };
    let mut reader = BundleReader::open(io::BufReader::new(input), trust).map_err(berr)?;
    let m = reader.manifest().clone();
    let signed_by = reader.signed_by().to_vec();
    let mut payloads = Vec::new();
    while let Some(mut p) = reader.next_payload().map_err(berr)? {
        let name = p.info().name.clone();
        let n = io::copy(&mut p, &mut io::sink())
            .map_err(|e| OtaError::Other(format!("{}: payload {name:?}: {e}", path.display())))?;
        payloads.push((name, n));
    }
    reader.finish().map_err(berr)?;
    Ok(Verified {
        name: m.name,
        version: m.version.to_string(),
        compatible: m.compatible,
        signed_by,
        payloads,
    })
}

/// `basalt publish` options.
pub struct Publish<'a> {
    /// The bundle.
    pub bundle: &'a Path,
    /// The repository folder.
    pub repo: &'a Path,
    /// The channel name.
    pub channel: &'a str,
    /// Percentage of devices that take it.
    pub rollout: u8,
    /// How long the channel file stays valid, in seconds.
    pub expires_in: u64,
    /// Keys that sign the channel file.
    pub keys: &'a [SigningKey],
    /// The time of publishing (Unix seconds).
    pub now: u64,
}

/// `basalt publish`: copies the bundle into `bundles/` and writes the
/// signed channel file that points at it. A model bundle goes to
/// `bundles/models/` and its channel to `channels/models/<name>/`, so an
/// OS channel never points at a model nor one model's channel at another.
pub fn publish(p: &Publish<'_>) -> Result<Channel, OtaError> {
    if p.keys.is_empty() {
        return Err(OtaError::Other("publishing needs at least one --key".into()));
    }
    if p.rollout > 100 {
        return Err(OtaError::Other(format!("rollout {} is above 100 percent", p.rollout)));
    }
    let input = fs::File::open(p.bundle).map_err(io_err("read", p.bundle))?;
    let (_, manifest, _) = archive::peek(io::BufReader::new(input))
        .map_err(|source| OtaError::Bundle { path: p.bundle.to_path_buf(), source })?;
    let (size, sha256) = sha256_file(p.bundle)?;
    let is_model = manifest.kind == BundleKind::Model;
    let rel = if is_model {
        format!("bundles/models/{}-{}.basalt", manifest.name, manifest.version)
    } else {
        format!("bundles/{}-{}.basalt", manifest.name, manifest.version)
    };
    let dest = p.repo.join(&rel);
    if dest.exists() {
        let (_, have) = sha256_file(&dest)?;
        if have != sha256 {
            return Err(OtaError::Other(format!(
                "{} exists with other content; a published version is never replaced — \
                 publish a new version instead",
                dest.display()
            )));
        }
    } else {
        let bytes = fs::read(p.bundle).map_err(io_err("read", p.bundle))?;
        write_atomic(&dest, &bytes)?;
    }
    let ch = Channel {
        format: channel::FORMAT_VERSION,
        channel: p.channel.to_string(),
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        bundle: rel,
        sha256,
        size,
        compatible: manifest.compatible.clone(),
        published: civil::unix_to_datetime(p.now as i64),
        expires: civil::unix_to_datetime((p.now + p.expires_in) as i64),
        rollout: p.rollout,
    };
    let text = ch.to_toml();
    // Check what a device will check, before anything is replaced.
    Channel::parse(text.as_bytes()).map_err(|e| OtaError::Other(e.to_string()))?;
    let mut sigs = SignatureFile::default();
    for k in p.keys {
        sigs.add(signature::sign(text.as_bytes(), k));
    }
    let sig_text = sigs.to_toml().map_err(|e| OtaError::Other(e.to_string()))?;
    let path = if is_model {
        channel::model_channel_path(&manifest.name, p.channel)
    } else {
        channel::channel_path(p.channel)
    }
    .map_err(|e| OtaError::Other(e.to_string()))?;
    let file = p.repo.join(&path);
    write_atomic(&file, text.as_bytes())?;
    write_atomic(&p.repo.join(channel::signature_path_for(&path)), sig_text.as_bytes())?;
    Ok(ch)
}

/// A model version ready to bundle: its ONNX file and its `model.toml`.
pub struct ModelContent {
    /// The parsed `model.toml`.
    pub config: basalt_bundle::model::ModelConfig,
    /// Its bytes, as they go into the bundle.
    pub config_bytes: Vec<u8>,
    /// The ONNX file.
    pub onnx: Vec<u8>,
}

impl ModelContent {
    /// Reads and checks the two files.
    pub fn from_files(onnx: &Path, config: &Path) -> Result<ModelContent, OtaError> {
        let config_bytes = fs::read(config).map_err(io_err("read", config))?;
        let parsed = basalt_bundle::model::ModelConfig::parse(&config_bytes)
            .map_err(|e| OtaError::Other(format!("{}: {e}", config.display())))?;
        let onnx_bytes = fs::read(onnx).map_err(io_err("read", onnx))?;
        // An ONNX file is a protobuf ModelProto; its first field is
        // ir_version (field 1, varint): tag byte 0x08.
        if onnx_bytes.first() != Some(&0x08) {
            return Err(OtaError::Other(format!(
                "{} does not look like an ONNX model (a ModelProto starts with ir_version)",
                onnx.display()
            )));
        }
        Ok(ModelContent { config: parsed, config_bytes, onnx: onnx_bytes })
    }
}

/// Writes a signed model bundle (`model.onnx` + `model.toml`); the bundle
/// bytes are returned too, for images that carry it.
pub fn model_bundle_bytes(
    content: &ModelContent,
    keys: &[SigningKey],
    compatible: &[String],
    created: u64,
) -> Result<Vec<u8>, OtaError> {
    if keys.is_empty() {
        return Err(OtaError::Other("a model bundle needs at least one signing key".into()));
    }
    let b = basalt_bundle::model::NewBundle {
        name: &content.config.name,
        version: &content.config.version,
        compatible,
        created,
        onnx: &content.onnx,
        model_toml: &content.config_bytes,
        level: LEVEL,
    };
    basalt_bundle::model::bundle_bytes(&b, keys)
        .map_err(|e| OtaError::Other(format!("cannot write the model bundle: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtime_secs(path: &Path) -> u64 {
        let t = fs::metadata(path).unwrap().modified().unwrap();
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    /// nginx's ETag is the size and the mtime in seconds: a republished
    /// channel of the same size must not keep it.
    #[test]
    fn a_file_replaced_within_a_second_gets_a_later_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("channels/stable.toml");
        write_atomic(&path, b"rollout = 5\n").unwrap();
        let first = mtime_secs(&path);
        write_atomic(&path, b"rollout = 6\n").unwrap();
        let second = mtime_secs(&path);
        write_atomic(&path, b"rollout = 7\n").unwrap();
        let third = mtime_secs(&path);
        assert!(first < second && second < third, "{first} {second} {third}");
        assert_eq!(fs::read(&path).unwrap(), b"rollout = 7\n");
    }
}
