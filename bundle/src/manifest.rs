//! `manifest.toml`: what a bundle holds and how to check it.
//!
//! ```toml
//! format = 1
//! kind = "os"                      # or "model"
//! name = "minimal"
//! version = "1.1.0"                # semver
//! compatible = ["qemu-x86_64"]     # board names, at least one
//! created = 2026-11-25T13:00:00Z
//!
//! [os]                             # kind = "os" only
//! cmdline = "console=ttyS0 quiet"  # without basalt.slot=, the device adds it
//! tries = 3                        # boot tries of a new slot, 1..=16
//!
//! [[payload]]
//! name = "vmlinuz"
//! size = 8123456                   # bytes of the content after decompression
//! sha256 = "<64 lowercase hex>"    # of the content after decompression
//! compression = "zstd"             # or "none"
//! ```
//!
//! An OS bundle carries exactly `vmlinuz`, `initrd` and `rootfs`, in that
//! order; `rootfs` is the squashfs with its verity superblock and hash tree,
//! the exact bytes written to the partition, and carries its
//! [`VerityParams`] in a `[payload.verity]` table.
//!
//! The manifest is parsed only after its signatures verified (see
//! [`crate::archive::BundleReader::open`]), but parsing still assumes hostile
//! input: size capped, unknown keys refused, every name and digest checked,
//! so a signed mistake cannot make the device write outside a bundle's
//! payloads or misread them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::value::Datetime;

use crate::config::VerityParams;

/// The manifest format this version writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest accepted `manifest.toml`, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// Largest accepted number of payloads.
pub const MAX_PAYLOADS: usize = 16;

/// Longest accepted bundle name and board name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest accepted plain name (see [`is_plain_name`]): the size of a ustar
/// name field.
pub const MAX_PLAIN_NAME_LEN: usize = 100;

/// Fewest and most boot tries a new slot may get.
pub const TRIES_RANGE: std::ops::RangeInclusive<u32> = 1..=16;

/// Longest accepted kernel command line, in bytes; x86's `COMMAND_LINE_SIZE`
/// is 2048 and the device appends `basalt.slot=`.
pub const MAX_CMDLINE_LEN: usize = 1024;

/// The payloads of an OS bundle, in order.
pub const OS_PAYLOADS: [&str; 3] = ["vmlinuz", "initrd", "rootfs"];

/// The payload of an OS bundle that carries verity parameters.
pub const ROOTFS_PAYLOAD: &str = "rootfs";

/// Names of the bundle's own entries, which no payload may take.
pub const RESERVED_NAMES: [&str; 2] = ["manifest.toml", "manifest.sig"];

/// The kernel parameter the device adds to name the slot it boots.
pub const SLOT_PARAMETER: &str = "basalt.slot=";

/// What a bundle installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleKind {
    /// An operating system: kernel, initramfs and root filesystem for the
    /// inactive slot.
    Os,
    /// A model for the runtime.
    Model,
}

impl std::fmt::Display for BundleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BundleKind::Os => "os",
            BundleKind::Model => "model",
        })
    }
}

/// How a payload is stored in the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// One zstd frame, with its content checksum.
    Zstd,
    /// The content as is.
    None,
}

/// The `[os]` table of an OS bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsInfo {
    /// Kernel command line, without `basalt.slot=` (the device adds it).
    pub cmdline: String,
    /// How many times the device tries to boot the new slot before it falls
    /// back to the old one, 1 to 16.
    pub tries: u32,
}

/// One `[[payload]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    /// Name of the payload, and of its entry in the bundle (see
    /// [`is_plain_name`]).
    pub name: String,
    /// Size of the content after decompression, in bytes.
    pub size: u64,
    /// sha256 of the content after decompression, 64 lowercase hexadecimal
    /// characters.
    pub sha256: String,
    /// How the content is stored in the bundle.
    pub compression: Compression,
    /// dm-verity parameters, for an OS bundle's `rootfs` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityParams>,
}

impl PayloadInfo {
    /// The entry of `content` (uncompressed): its size and sha256.
    pub fn describe(
        name: &str,
        content: &[u8],
        compression: Compression,
        verity: Option<VerityParams>,
    ) -> PayloadInfo {
        PayloadInfo {
            name: name.to_owned(),
            size: content.len() as u64,
            sha256: hex::encode(Sha256::digest(content)),
            compression,
            verity,
        }
    }
}

/// The whole `manifest.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version, [`FORMAT_VERSION`].
    pub format: u32,
    /// What the bundle installs.
    pub kind: BundleKind,
    /// Image or model name.
    pub name: String,
    /// Version; a device refuses versions older than what it runs.
    pub version: semver::Version,
    /// Boards the bundle runs on, at least one.
    pub compatible: Vec<String>,
    /// When the bundle was made; an offset datetime such as
    /// `2026-11-25T13:00:00Z`.
    pub created: Datetime,
    /// Boot parameters, for [`BundleKind::Os`] only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsInfo>,
    /// The payloads, in the order the bundle stores them.
    #[serde(rename = "payload", default)]
    pub payloads: Vec<PayloadInfo>,
}

/// Why a `manifest.toml` is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file is larger than [`MAX_MANIFEST_BYTES`].
    #[error(
        "manifest.toml is {size} bytes, more than the {max} allowed; the bundle is damaged or \
         hostile, rebuild it with `basalt bundle`"
    )]
    TooLarge {
        /// The size of the file.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The file is not UTF-8 text.
    #[error("manifest.toml is not UTF-8 text; the bundle is damaged, rebuild it")]
    NotUtf8,
    /// The file is not the expected TOML.
    #[error("manifest.toml is not a valid manifest: {0}; rebuild the bundle with `basalt bundle`")]
    Toml(#[source] toml::de::Error),
    /// The manifest was written by a newer basalt.
    #[error(
        "manifest.toml has format {found}, this basalt reads format {}: the bundle was made by a \
         newer basalt; update the device first",
        FORMAT_VERSION
    )]
    NewerFormat {
        /// The format found.
        found: u32,
    },
    /// The format number is older than any basalt wrote.
    #[error(
        "manifest.toml has format {found}, which no basalt writes (expected {}); rebuild the \
         bundle with `basalt bundle`",
        FORMAT_VERSION
    )]
    UnknownFormat {
        /// The format found.
        found: u32,
    },
    /// The bundle name is empty, too long or has other characters.
    #[error(
        "manifest.toml: name {0:?} is not 1 to 64 characters of A-Z a-z 0-9 . _ -; fix the \
         recipe's name and rebuild"
    )]
    BadName(String),
    /// `compatible` is empty.
    #[error(
        "manifest.toml: compatible lists no board, so no device could install the bundle; \
         rebuild it for a board"
    )]
    NoBoard,
    /// A board name is empty, too long or has other characters.
    #[error(
        "manifest.toml: board {0:?} in compatible is not 1 to 64 characters of A-Z a-z 0-9 . _ \
         -; fix the board name and rebuild"
    )]
    BadBoard(String),
    /// `created` is not a date and time with an offset.
    #[error(
        "manifest.toml: created = {0} is not a date and time with an offset, e.g. \
         2026-11-25T13:00:00Z; rebuild the bundle with `basalt bundle`"
    )]
    BadCreated(String),
    /// More than [`MAX_PAYLOADS`] payloads.
    #[error("manifest.toml lists {count} payloads, at most {max} are allowed; split the bundle")]
    TooManyPayloads {
        /// Number of payloads.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A payload name is not a plain file name.
    #[error(
        "manifest.toml: payload name {0:?} is not a plain file name (1 to 100 characters of A-Z \
         a-z 0-9 . _ -, not `.`, `..` or starting with `-`); rename the payload and rebuild"
    )]
    BadPayloadName(String),
    /// A payload takes the name of the bundle's own entries.
    #[error(
        "manifest.toml: a payload may not be named {0:?}, the bundle's own entry; rename the \
         payload and rebuild"
    )]
    ReservedPayloadName(String),
    /// Two payloads have one name.
    #[error("manifest.toml lists payload {0:?} twice; give each payload its own name")]
    DuplicatePayload(String),
    /// A payload's sha256 is not 64 lowercase hexadecimal characters.
    #[error(
        "manifest.toml: payload {payload:?} has sha256 {value:?}, not 64 lowercase hexadecimal \
         characters; rebuild the bundle"
    )]
    BadSha256 {
        /// The payload.
        payload: String,
        /// The value, cut to a printable length.
        value: String,
    },
    /// An OS bundle without `[os]`.
    #[error("manifest.toml: kind = \"os\" needs an [os] table with cmdline and tries; rebuild")]
    MissingOs,
    /// `[os]` in a bundle of another kind.
    #[error("manifest.toml: an [os] table is only for kind = \"os\", this is kind = \"{0}\"")]
    UnexpectedOs(BundleKind),
    /// `tries` out of range.
    #[error("manifest.toml: [os] tries = {0}, must be 1 to 16; fix the recipe and rebuild")]
    BadTries(u32),
    /// The command line names the slot, which is the device's job.
    #[error(
        "manifest.toml: [os] cmdline contains `basalt.slot=`; the device adds it for the slot it \
         boots, remove it from the recipe"
    )]
    SlotInCmdline,
    /// The command line is too long or has control characters.
    #[error(
        "manifest.toml: [os] cmdline is longer than {max} bytes or has control characters; \
         shorten it to printable text"
    )]
    BadCmdline {
        /// The limit.
        max: usize,
    },
    /// An OS bundle's payloads are not vmlinuz, initrd, rootfs.
    #[error(
        "manifest.toml: an OS bundle carries exactly the payloads vmlinuz, initrd, rootfs in this \
         order, found [{}]; rebuild it with `basalt bundle`",
        found.join(", ")
    )]
    OsPayloads {
        /// The payload names found.
        found: Vec<String>,
    },
    /// The rootfs payload of an OS bundle has no verity parameters.
    #[error(
        "manifest.toml: payload \"rootfs\" needs a [payload.verity] table; rebuild the bundle"
    )]
    MissingVerity,
    /// Verity parameters on a payload that is not an OS bundle's rootfs.
    #[error(
        "manifest.toml: payload {0:?} has a [payload.verity] table, which only an OS bundle's \
         rootfs may have"
    )]
    UnexpectedVerity(String),
    /// The verity parameters are malformed.
    #[error(
        "manifest.toml: payload {payload:?} has bad verity parameters: {what}; rebuild the bundle"
    )]
    BadVerity {
        /// The payload.
        payload: String,
        /// What is wrong.
        what: &'static str,
    },
}

impl Manifest {
    /// Reads a `manifest.toml` and checks everything that does not depend
    /// on the device (see the module documentation).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: bytes.len(), max: MAX_MANIFEST_BYTES });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ManifestError::NotUtf8)?;
        // The format first, so that a newer manifest gets "update the
        // device" rather than a complaint about a key this version does not
        // know.
        #[derive(Deserialize)]
        struct FormatOnly {
            format: Option<u32>,
        }
        if let Ok(FormatOnly { format: Some(found) }) = toml::from_str::<FormatOnly>(text) {
            check_format(found)?;
        }
        let manifest: Manifest = toml::from_str(text).map_err(ManifestError::Toml)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the rules of [`Manifest::parse`] on a manifest built in
    /// memory, before it is written and signed.
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_format(self.format)?;
        if !is_short_name(&self.name) {
            return Err(ManifestError::BadName(shorten(&self.name)));
        }
        if self.compatible.is_empty() {
            return Err(ManifestError::NoBoard);
        }
        if let Some(board) = self.compatible.iter().find(|b| !is_short_name(b)) {
            return Err(ManifestError::BadBoard(shorten(board)));
        }
        if crate::civil::datetime_to_unix(&self.created).is_none() {
            return Err(ManifestError::BadCreated(self.created.to_string()));
        }
        if self.payloads.len() > MAX_PAYLOADS {
            return Err(ManifestError::TooManyPayloads {
                count: self.payloads.len(),
                max: MAX_PAYLOADS,
            });
        }
        for (i, payload) in self.payloads.iter().enumerate() {
            if !is_plain_name(&payload.name) {
                return Err(ManifestError::BadPayloadName(shorten(&payload.name)));
            }
            if RESERVED_NAMES.contains(&payload.name.as_str()) {
                return Err(ManifestError::ReservedPayloadName(payload.name.clone()));
            }
            if self.payloads[..i].iter().any(|p| p.name == payload.name) {
                return Err(ManifestError::DuplicatePayload(payload.name.clone()));
            }
            if !is_sha256_hex(&payload.sha256) {
                return Err(ManifestError::BadSha256 {
                    payload: payload.name.clone(),
                    value: shorten(&payload.sha256),
                });
            }
            if let Some(verity) = &payload.verity {
                check_verity(&payload.name, verity)?;
            }
        }
        match (self.kind, &self.os) {
            (BundleKind::Os, None) => return Err(ManifestError::MissingOs),
            (BundleKind::Os, Some(os)) => {
                if !TRIES_RANGE.contains(&os.tries) {
                    return Err(ManifestError::BadTries(os.tries));
                }
                if os.cmdline.contains(SLOT_PARAMETER) {
                    return Err(ManifestError::SlotInCmdline);
                }
                if os.cmdline.len() > MAX_CMDLINE_LEN || os.cmdline.chars().any(char::is_control) {
                    return Err(ManifestError::BadCmdline { max: MAX_CMDLINE_LEN });
                }
                let names: Vec<&str> = self.payloads.iter().map(|p| p.name.as_str()).collect();
                if names != OS_PAYLOADS {
                    return Err(ManifestError::OsPayloads {
                        found: names.into_iter().map(str::to_owned).collect(),
                    });
                }
                for payload in &self.payloads {
                    match (payload.name == ROOTFS_PAYLOAD, payload.verity.is_some()) {
                        (true, false) => return Err(ManifestError::MissingVerity),
                        (false, true) => {
                            return Err(ManifestError::UnexpectedVerity(payload.name.clone()))
                        }
                        _ => {}
                    }
                }
            }
            (kind, Some(_)) => return Err(ManifestError::UnexpectedOs(kind)),
            (_, None) => {
                if let Some(p) = self.payloads.iter().find(|p| p.verity.is_some()) {
                    return Err(ManifestError::UnexpectedVerity(p.name.clone()));
                }
            }
        }
        Ok(())
    }

    /// Writes the manifest as TOML. The bytes written are the bytes signed;
    /// a device never re-serialises a manifest.
    pub fn to_toml(&self) -> String {
        // Every field has a TOML form (strings, integers, a datetime, arrays
        // of tables after the plain keys), so serialising cannot fail.
        toml::to_string(self).unwrap_or_else(|e| unreachable!("a Manifest is always TOML: {e}"))
    }

    /// The payload named `name`.
    pub fn payload(&self, name: &str) -> Option<&PayloadInfo> {
        self.payloads.iter().find(|p| p.name == name)
    }

    /// The `created` time as Unix seconds; `None` only for a manifest that
    /// did not go through [`Manifest::parse`] or [`Manifest::validate`].
    pub fn created_unix(&self) -> Option<i64> {
        crate::civil::datetime_to_unix(&self.created)
    }
}

fn check_format(found: u32) -> Result<(), ManifestError> {
    match found {
        FORMAT_VERSION => Ok(()),
        f if f > FORMAT_VERSION => Err(ManifestError::NewerFormat { found: f }),
        f => Err(ManifestError::UnknownFormat { found: f }),
    }
}

fn check_verity(payload: &str, verity: &VerityParams) -> Result<(), ManifestError> {
    let bad = |what| Err(ManifestError::BadVerity { payload: payload.to_owned(), what });
    if !is_sha256_hex(&verity.root_hash) {
        return bad("root_hash is not 64 lowercase hexadecimal characters");
    }
    let salt_ok = verity.salt.len() <= 512
        && verity.salt.len().is_multiple_of(2)
        && verity.salt.bytes().all(is_lower_hex);
    if !salt_ok {
        return bad("salt is not lowercase hexadecimal of at most 256 bytes");
    }
    if verity.algorithm != "sha256" {
        return bad("algorithm is not sha256");
    }
    let block_ok = |b: u32| b.is_power_of_two() && (512..=65536).contains(&b);
    if !block_ok(verity.data_block_size) || !block_ok(verity.hash_block_size) {
        return bad("block sizes must be powers of two from 512 to 65536");
    }
    Ok(())
}

/// Whether `s` may name a payload, a tar entry or a path segment: 1 to 100
/// bytes of `A-Z a-z 0-9 . _ -`, not `.` or `..`, not starting with `-` (so
/// it never reads as an option).
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PLAIN_NAME_LEN
        && s != "."
        && s != ".."
        && !s.starts_with('-')
        && s.bytes().all(is_name_byte)
}

/// Whether `s` is a bundle or board name: 1 to 64 bytes of
/// `A-Z a-z 0-9 . _ -`.
pub(crate) fn is_short_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.bytes().all(is_name_byte)
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// Whether `s` is a sha256 digest in 64 lowercase hexadecimal characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

/// Cuts hostile values before they go into an error message.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verity() -> VerityParams {
        VerityParams {
            root_hash: "ab".repeat(32),
            salt: "cd".repeat(32),
            algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 100,
            hash_offset: 409_600,
        }
    }

    fn os_manifest() -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            kind: BundleKind::Os,
            name: "minimal".into(),
            version: semver::Version::new(1, 1, 0),
            compatible: vec!["qemu-x86_64".into()],
            created: "2026-11-25T13:00:00Z".parse().unwrap(),
            os: Some(OsInfo { cmdline: "console=ttyS0 quiet".into(), tries: 3 }),
            payloads: vec![
                PayloadInfo::describe("vmlinuz", b"kernel", Compression::Zstd, None),
                PayloadInfo::describe("initrd", b"initrd", Compression::None, None),
                PayloadInfo::describe("rootfs", b"root", Compression::Zstd, Some(verity())),
            ],
        }
    }

    fn reparse(m: &Manifest) -> Result<Manifest, ManifestError> {
        Manifest::parse(m.to_toml().as_bytes())
    }

    #[test]
    fn round_trip() {
        let m = os_manifest();
        let text = m.to_toml();
        assert!(text.contains("created = 2026-11-25T13:00:00Z"), "{text}");
        assert!(text.contains("[[payload]]"), "{text}");
        assert!(text.contains("[payload.verity]"), "{text}");
        assert!(text.contains("version = \"1.1.0\""), "{text}");
        let back = Manifest::parse(text.as_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.payload("rootfs").unwrap().verity, Some(verity()));
        assert!(back.payload("nope").is_none());
        assert_eq!(back.created_unix(), Some(1_795_611_600));
    }

    #[test]
    fn describe_hashes_the_content() {
        let p = PayloadInfo::describe("x", b"abc", Compression::None, None);
        assert_eq!(p.size, 3);
        assert_eq!(p.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn model_bundle_round_trip() {
        let m = Manifest {
            kind: BundleKind::Model,
            os: None,
            payloads: vec![
                PayloadInfo::describe("model.onnx", b"onnx", Compression::Zstd, None),
                PayloadInfo::describe("model.toml", b"toml", Compression::None, None),
            ],
            ..os_manifest()
        };
        assert_eq!(reparse(&m).unwrap(), m);
        assert!(m.to_toml().contains("kind = \"model\""));
    }

    #[test]
    fn newer_format_says_update_the_device() {
        let text = os_manifest().to_toml().replace("format = 1", "format = 2");
        let err = Manifest::parse(text.as_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::NewerFormat { found: 2 }), "{err}");
        assert!(err.to_string().contains("update the device first"), "{err}");
        // Even with keys this version does not know.
        let text = format!("{text}\n[future]\nx = 1\n");
        let err = Manifest::parse(text.as_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::NewerFormat { .. }), "{err}");
        let text = os_manifest().to_toml().replace("format = 1", "format = 0");
        assert!(matches!(
            Manifest::parse(text.as_bytes()),
            Err(ManifestError::UnknownFormat { found: 0 })
        ));
    }

    #[test]
    fn plain_names() {
        for good in ["rootfs", "model.onnx", "a", "a-b_c.1", ".hidden", &"x".repeat(100)] {
            assert!(is_plain_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-rf",
            "a/b",
            "../x",
            "/etc/passwd",
            "a\0b",
            "a b",
            "é",
            &"x".repeat(101),
        ] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn invalid_manifests_are_refused() {
        type Edit = fn(&mut Manifest);
        let cases: Vec<(Edit, &str)> = vec![
            (|m| m.name = String::new(), "name"),
            (|m| m.name = "a/b".into(), "name"),
            (|m| m.name = "x".repeat(65), "name"),
            (|m| m.compatible.clear(), "no board"),
            (|m| m.compatible.push("bad board".into()), "board"),
            (|m| m.payloads[0].name = "../vmlinuz".into(), "plain"),
            (|m| m.payloads[1].name = "vmlinuz".into(), "twice"),
            (|m| m.payloads[1].name = "manifest.sig".into(), "own entry"),
            (|m| m.payloads[0].sha256 = "AB".repeat(32), "sha256"),
            (|m| m.payloads[0].sha256 = "ab".repeat(31), "sha256"),
            (|m| m.os = None, "[os]"),
            (|m| m.os.as_mut().unwrap().tries = 0, "tries"),
            (|m| m.os.as_mut().unwrap().tries = 17, "tries"),
            (|m| m.os.as_mut().unwrap().cmdline = "quiet basalt.slot=a".into(), "basalt.slot="),
            (|m| m.os.as_mut().unwrap().cmdline = "a\nb".into(), "control"),
            (|m| m.payloads.swap(0, 1), "exactly"),
            (|m| drop(m.payloads.pop()), "exactly"),
            (|m| m.payloads[2].verity = None, "verity"),
            (|m| m.payloads[0].verity = Some(verity()), "verity"),
            (|m| m.payloads[2].verity.as_mut().unwrap().root_hash = "00".into(), "root_hash"),
            (|m| m.payloads[2].verity.as_mut().unwrap().salt = "x".into(), "salt"),
            (|m| m.payloads[2].verity.as_mut().unwrap().algorithm = "md5".into(), "sha256"),
            (|m| m.payloads[2].verity.as_mut().unwrap().data_block_size = 0, "block"),
            (|m| m.created = "2026-11-25T13:00:00".parse().unwrap(), "offset"),
            (|m| m.kind = BundleKind::Model, "only for kind"),
            (
                |m| {
                    m.kind = BundleKind::Model;
                    m.os = None;
                },
                "verity",
            ),
            (
                |m| {
                    m.kind = BundleKind::Model;
                    m.os = None;
                    m.payloads = (0..17)
                        .map(|i| {
                            PayloadInfo::describe(&format!("p{i}"), b"", Compression::None, None)
                        })
                        .collect();
                },
                "at most 16",
            ),
        ];
        for (i, (edit, needle)) in cases.iter().enumerate() {
            let mut m = os_manifest();
            edit(&mut m);
            assert!(m.validate().is_err(), "case {i} validated");
            let err = reparse(&m).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(needle), "case {i}: {msg:?} lacks {needle:?}");
        }
    }

    #[test]
    fn hostile_text_is_refused() {
        let good = os_manifest().to_toml();
        let big = vec![b'#'; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(Manifest::parse(&big), Err(ManifestError::TooLarge { .. })));
        assert!(matches!(Manifest::parse(b"\xff"), Err(ManifestError::NotUtf8)));
        for text in [
            format!("{good}\nextra = 1\n"),
            good.replace("kind = \"os\"", "kind = \"firmware\""),
            good.replace("compression = \"zstd\"", "compression = \"xz\""),
            good.replace("version = \"1.1.0\"", "version = \"1.1\""),
            good.replace("tries = 3", "tries = 3\nfoo = 1"),
            good.replace("size = 6", "size = -6"),
            "format = 1\n".to_owned(),
            "[[[".to_owned(),
            String::new(),
        ] {
            assert!(Manifest::parse(text.as_bytes()).is_err(), "accepted {text}");
        }
        // No byte flip or truncation panics.
        let bytes = good.as_bytes();
        for i in 0..bytes.len() {
            let mut m = bytes.to_vec();
            m[i] ^= 0x01;
            let _ = Manifest::parse(&m);
            let _ = Manifest::parse(&bytes[..i]);
        }
    }
}
