//! Update-repository channel metadata: `channels/<channel>.toml`.
//!
//! ```toml
//! format = 1
//! channel = "stable"
//! name = "minimal"
//! version = "1.1.0"
//! bundle = "bundles/minimal-1.1.0.basalt"   # relative to the repository root
//! sha256 = "<hex of the whole bundle file>"
//! size = 12345678
//! compatible = ["qemu-x86_64"]
//! published = 2026-11-25T13:00:00Z
//! expires = 2026-12-25T13:00:00Z
//! rollout = 100                              # percent of devices, 0..=100
//! ```
//!
//! The file is signed by `channels/<channel>.toml.sig`, a
//! [`SignatureFile`] over its exact bytes, verified before the file is
//! parsed ([`verify_channel`]). The size and sha256 of the whole bundle
//! let a device stop a download that runs past the signed size (endless
//! data) before the bundle's own signatures are reachable; the expiry
//! stops a mirror from freezing a fleet on old metadata; the rollout
//! percentage stages an update across the fleet with a bucket per device
//! that stays put, so raising the percentage only adds devices.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::value::Datetime;

use crate::civil::datetime_to_unix;
use crate::manifest::{is_plain_name, is_sha256_hex, is_short_name, shorten};
use crate::signature::{SignatureFile, SignatureFileError, Trust, VerifyError};

/// The channel format this version writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest accepted channel file, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 64 * 1024;

/// Longest accepted bundle path, in bytes.
pub const MAX_BUNDLE_PATH_LEN: usize = 1024;

/// The domain separator of [`rollout_bucket`], so that the bucket of a
/// device is no digest used anywhere else.
const ROLLOUT_DOMAIN: &[u8] = b"basalt-rollout\0";

/// A channel's metadata: which bundle it points to, until when, for which
/// share of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// Format version, [`FORMAT_VERSION`].
    pub format: u32,
    /// The channel's name, the file's stem (`stable`).
    pub channel: String,
    /// Image or model name of the bundle.
    pub name: String,
    /// Version of the bundle.
    pub version: semver::Version,
    /// Path of the bundle relative to the repository root, `/`-separated
    /// plain names.
    pub bundle: String,
    /// sha256 of the whole bundle file, 64 lowercase hexadecimal
    /// characters.
    pub sha256: String,
    /// Size of the whole bundle file in bytes.
    pub size: u64,
    /// Boards the bundle runs on, at least one.
    pub compatible: Vec<String>,
    /// When the channel file was published.
    pub published: Datetime,
    /// After this time the file is stale and a device refuses it.
    pub expires: Datetime,
    /// Percentage of devices the update is offered to, 0 to 100.
    pub rollout: u8,
}

/// Why channel metadata is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The file is larger than [`MAX_CHANNEL_BYTES`].
    #[error(
        "the channel file is {size} bytes, more than the {max} allowed; the repository is \
         damaged or hostile, republish the channel"
    )]
    TooLarge {
        /// The size of the file.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The file is not UTF-8 text.
    #[error(
        "the channel file is not UTF-8 text; the repository is damaged, republish the channel"
    )]
    NotUtf8,
    /// The file is not the expected TOML.
    #[error("the channel file is not valid: {0}; republish the channel")]
    Toml(#[source] toml::de::Error),
    /// The file was written by a newer basalt.
    #[error(
        "the channel file has format {found}, this basalt reads format {}: it was published by a \
         newer basalt; update the device first",
        FORMAT_VERSION
    )]
    NewerFormat {
        /// The format found.
        found: u32,
    },
    /// The format number is older than any basalt wrote.
    #[error(
        "the channel file has format {found}, which no basalt writes (expected {}); republish \
         the channel",
        FORMAT_VERSION
    )]
    UnknownFormat {
        /// The format found.
        found: u32,
    },
    /// A channel name is not a plain name.
    #[error(
        "channel name {0:?} is not 1 to 64 characters of A-Z a-z 0-9 . _ - (and not `.`, `..` or \
         starting with `-`); pick another name"
    )]
    BadChannelName(String),
    /// The bundle name is not acceptable.
    #[error("the channel file names bundle {0:?}, not 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// The bundle path is not a relative path of plain names.
    #[error(
        "the channel file's bundle path {0:?} is not a relative path of plain names (no `..`, \
         no leading `/`, no empty segments); republish the channel"
    )]
    BadBundlePath(String),
    /// sha256 is not 64 lowercase hexadecimal characters.
    #[error(
        "the channel file's sha256 {0:?} is not 64 lowercase hexadecimal characters; republish \
         the channel"
    )]
    BadSha256(String),
    /// `compatible` is empty.
    #[error("the channel file lists no compatible board; republish the channel")]
    NoBoard,
    /// A board name is not acceptable.
    #[error("the channel file lists board {0:?}, not 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadBoard(String),
    /// A time is not a date and time with an offset.
    #[error(
        "the channel file's {field} = {value} is not a date and time with an offset, e.g. \
         2026-11-25T13:00:00Z; republish the channel"
    )]
    BadTime {
        /// `published` or `expires`.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// `expires` is not after `published`.
    #[error(
        "the channel file expires ({expires}) no later than it was published ({published}); \
         republish it with a later expiry"
    )]
    ExpiresBeforePublished {
        /// The publication time.
        published: String,
        /// The expiry time.
        expires: String,
    },
    /// `rollout` is above 100.
    #[error(
        "the channel file's rollout = {0} is not a percentage 0 to 100; republish the channel"
    )]
    BadRollout(u8),
    /// The `.sig` file is malformed.
    #[error("the channel's signature file cannot be read: {0}")]
    Signatures(#[source] SignatureFileError),
    /// The signatures do not reach the trust threshold.
    #[error("the channel file is not signed by enough trusted keys: {0}")]
    Verify(#[source] VerifyError),
}

impl Channel {
    /// Reads a channel file and checks its fields. Does not verify
    /// signatures; a device uses [`verify_channel`].
    pub fn parse(bytes: &[u8]) -> Result<Channel, ChannelError> {
        if bytes.len() > MAX_CHANNEL_BYTES {
            return Err(ChannelError::TooLarge { size: bytes.len(), max: MAX_CHANNEL_BYTES });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ChannelError::NotUtf8)?;
        #[derive(Deserialize)]
        struct FormatOnly {
            format: Option<u32>,
        }
        if let Ok(FormatOnly { format: Some(found) }) = toml::from_str::<FormatOnly>(text) {
            check_format(found)?;
        }
        let channel: Channel = toml::from_str(text).map_err(ChannelError::Toml)?;
        channel.validate()?;
        Ok(channel)
    }

    /// Checks the rules of [`Channel::parse`] on a channel built in memory,
    /// before it is written and signed.
    pub fn validate(&self) -> Result<(), ChannelError> {
        check_format(self.format)?;
        check_channel_name(&self.channel)?;
        if !is_short_name(&self.name) {
            return Err(ChannelError::BadName(shorten(&self.name)));
        }
        if !is_bundle_path(&self.bundle) {
            return Err(ChannelError::BadBundlePath(shorten(&self.bundle)));
        }
        if !is_sha256_hex(&self.sha256) {
            return Err(ChannelError::BadSha256(shorten(&self.sha256)));
        }
        if self.compatible.is_empty() {
            return Err(ChannelError::NoBoard);
        }
        if let Some(board) = self.compatible.iter().find(|b| !is_short_name(b)) {
            return Err(ChannelError::BadBoard(shorten(board)));
        }
        let time = |field, value: &Datetime| {
            datetime_to_unix(value).ok_or(ChannelError::BadTime { field, value: value.to_string() })
        };
        let published = time("published", &self.published)?;
        let expires = time("expires", &self.expires)?;
        if expires <= published {
            return Err(ChannelError::ExpiresBeforePublished {
                published: self.published.to_string(),
                expires: self.expires.to_string(),
            });
        }
        if self.rollout > 100 {
            return Err(ChannelError::BadRollout(self.rollout));
        }
        Ok(())
    }

    /// Writes the channel file as TOML; these bytes are what gets signed.
    pub fn to_toml(&self) -> String {
        // Strings, integers, datetimes and an array of strings always have
        // a TOML form.
        toml::to_string(self).unwrap_or_else(|e| unreachable!("a Channel is always TOML: {e}"))
    }

    /// Whether the file is stale at `now_unix` (Unix seconds): at or after
    /// `expires`. An unreadable expiry counts as expired.
    pub fn is_expired(&self, now_unix: i64) -> bool {
        datetime_to_unix(&self.expires).is_none_or(|expires| now_unix >= expires)
    }

    /// Whether the device `machine_id` is in the rollout:
    /// its [`rollout_bucket`] is below the percentage.
    pub fn includes(&self, machine_id: &str) -> bool {
        rollout_bucket(&self.channel, machine_id) < self.rollout
    }
}

fn check_format(found: u32) -> Result<(), ChannelError> {
    match found {
        FORMAT_VERSION => Ok(()),
        f if f > FORMAT_VERSION => Err(ChannelError::NewerFormat { found: f }),
        f => Err(ChannelError::UnknownFormat { found: f }),
    }
}

fn check_channel_name(channel: &str) -> Result<(), ChannelError> {
    if is_plain_name(channel) && is_short_name(channel) {
        Ok(())
    } else {
        Err(ChannelError::BadChannelName(shorten(channel)))
    }
}

/// Whether `path` is a relative `/`-separated path of plain names.
fn is_bundle_path(path: &str) -> bool {
    path.len() <= MAX_BUNDLE_PATH_LEN && path.split('/').all(is_plain_name)
}

/// The rollout bucket of a device in a channel, 0 to 99: the first 8 bytes
/// of sha256(`basalt-rollout\0` + channel + `\0` + machine id), big-endian,
/// modulo 100.
///
/// It depends on nothing but the channel and the device, so a device keeps
/// its bucket from one release to the next: raising the percentage keeps
/// every device already included and adds more. Other channels shuffle the
/// fleet differently, so the same devices are not always first.
pub fn rollout_bucket(channel: &str, machine_id: &str) -> u8 {
    let digest = Sha256::new()
        .chain_update(ROLLOUT_DOMAIN)
        .chain_update(channel.as_bytes())
        .chain_update([0u8])
        .chain_update(machine_id.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 2^64 mod 100 is 16, so the modulo bias is below 1e-18.
    (u64::from_be_bytes(first) % 100) as u8
}

/// Verifies `sig_bytes` (the `.sig` file) over the exact `bytes` of a
/// channel file against `trust`, and only then parses the file.
pub fn verify_channel(
    bytes: &[u8],
    sig_bytes: &[u8],
    trust: &Trust,
) -> Result<Channel, ChannelError> {
    let signatures = SignatureFile::parse(sig_bytes).map_err(ChannelError::Signatures)?;
    trust.verify(bytes, &signatures).map_err(ChannelError::Verify)?;
    Channel::parse(bytes)
}

/// The path of a channel's file in a repository, `channels/<channel>.toml`.
pub fn channel_path(channel: &str) -> Result<String, ChannelError> {
    check_channel_name(channel)?;
    Ok(format!("channels/{channel}.toml"))
}

/// The path of a model channel's file in a repository,
/// `channels/models/<name>/<channel>.toml`: models have channels of their
/// own, beside the OS's, so that a model is published and rolled out
/// without an OS release.
pub fn model_channel_path(name: &str, channel: &str) -> Result<String, ChannelError> {
    if !(is_plain_name(name) && is_short_name(name)) {
        return Err(ChannelError::BadName(shorten(name)));
    }
    check_channel_name(channel)?;
    Ok(format!("channels/models/{name}/{channel}.toml"))
}

/// The path of the signature file of `path`: `path` + `.sig`.
pub fn signature_path_for(path: &str) -> String {
    format!("{path}.sig")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use crate::signature::sign;

    fn channel() -> Channel {
        Channel {
            format: FORMAT_VERSION,
            channel: "stable".into(),
            name: "minimal".into(),
            version: semver::Version::new(1, 1, 0),
            bundle: "bundles/minimal-1.1.0.basalt".into(),
            sha256: "ab".repeat(32),
            size: 12_345_678,
            compatible: vec!["qemu-x86_64".into()],
            published: "2026-11-25T13:00:00Z".parse().unwrap(),
            expires: "2026-12-25T13:00:00Z".parse().unwrap(),
            rollout: 100,
        }
    }

    #[test]
    fn round_trip() {
        let c = channel();
        let text = c.to_toml();
        assert!(text.contains("published = 2026-11-25T13:00:00Z"), "{text}");
        assert_eq!(Channel::parse(text.as_bytes()).unwrap(), c);
    }

    #[test]
    fn invalid_channels_are_refused() {
        type Edit = fn(&mut Channel);
        let cases: Vec<(Edit, &str)> = vec![
            (|c| c.channel = "..".into(), "channel name"),
            (|c| c.channel = "a/b".into(), "channel name"),
            (|c| c.channel = String::new(), "channel name"),
            (|c| c.name = "a b".into(), "names bundle"),
            (|c| c.bundle = "/bundles/x.basalt".into(), "bundle path"),
            (|c| c.bundle = "../x.basalt".into(), "bundle path"),
            (|c| c.bundle = "bundles/../../x".into(), "bundle path"),
            (|c| c.bundle = "bundles//x".into(), "bundle path"),
            (|c| c.bundle = "bundles/x/".into(), "bundle path"),
            (|c| c.bundle = String::new(), "bundle path"),
            (|c| c.bundle = "bundles\\x".into(), "bundle path"),
            (|c| c.sha256 = "AB".repeat(32), "sha256"),
            (|c| c.compatible.clear(), "no compatible"),
            (|c| c.compatible = vec!["a/b".into()], "board"),
            (|c| c.rollout = 101, "rollout"),
            (|c| c.expires = c.published, "expires"),
            (|c| c.expires = "2026-11-24T13:00:00Z".parse().unwrap(), "expires"),
            (|c| c.published = "2026-11-25".parse().unwrap(), "published"),
            (|c| c.expires = "2026-12-25T13:00:00".parse().unwrap(), "expires"),
            (|c| c.format = 2, "update the device first"),
            (|c| c.format = 0, "no basalt writes"),
        ];
        for (i, (edit, needle)) in cases.iter().enumerate() {
            let mut c = channel();
            edit(&mut c);
            assert!(c.validate().is_err(), "case {i} validated");
            let err = Channel::parse(c.to_toml().as_bytes()).unwrap_err();
            assert!(err.to_string().contains(needle), "case {i}: {err} lacks {needle:?}");
        }
        let good = channel().to_toml();
        for text in [
            format!("{good}extra = 1\n"),
            good.replace("rollout = 100", "rollout = 300"),
            good.replace("rollout = 100", "rollout = -1"),
            good.replace("size = 12345678", "size = -1"),
            "[[[".into(),
            String::new(),
        ] {
            assert!(Channel::parse(text.as_bytes()).is_err(), "accepted {text}");
        }
        assert!(matches!(
            Channel::parse(&vec![b' '; MAX_CHANNEL_BYTES + 1]),
            Err(ChannelError::TooLarge { .. })
        ));
        assert!(matches!(Channel::parse(b"\xff"), Err(ChannelError::NotUtf8)));
        let text = format!("{}\nfuture = 1\n", good.replace("format = 1", "format = 7"));
        assert!(matches!(
            Channel::parse(text.as_bytes()),
            Err(ChannelError::NewerFormat { found: 7 })
        ));
    }

    #[test]
    fn expiry() {
        let c = channel();
        let expires = datetime_to_unix(&c.expires).unwrap();
        assert!(!c.is_expired(datetime_to_unix(&c.published).unwrap()));
        assert!(!c.is_expired(expires - 1));
        assert!(c.is_expired(expires));
        assert!(c.is_expired(i64::MAX));
        let mut local = channel();
        local.expires = "2026-12-25T13:00:00".parse().unwrap();
        assert!(local.is_expired(0), "an unreadable expiry must count as expired");
    }

    #[test]
    fn rollout_buckets_are_uniform_and_stable() {
        let mut counts = [0u32; 100];
        for i in 0..10_000 {
            let bucket = rollout_bucket("stable", &format!("machine-{i:032x}"));
            assert!(bucket < 100);
            counts[usize::from(bucket)] += 1;
        }
        // 100 expected per bucket; a fair hash stays well inside 50..=160
        // (about 6 standard deviations).
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min >= 50 && *max <= 160, "min {min} max {max}");
        // Deciles hold about 1000 each.
        for decile in counts.chunks(10) {
            let n: u32 = decile.iter().sum();
            assert!((850..=1150).contains(&n), "decile {n}");
        }
        // Stable, and channel-dependent.
        assert_eq!(rollout_bucket("stable", "abc"), rollout_bucket("stable", "abc"));
        let moved = (0..100)
            .filter(|i| {
                let id = format!("m{i}");
                rollout_bucket("stable", &id) != rollout_bucket("beta", &id)
            })
            .count();
        assert!(moved > 80, "{moved}");
        // Not a plain concatenation: the separator matters.
        assert_ne!(
            (0..50).map(|i| rollout_bucket("ab", &format!("c{i}"))).collect::<Vec<_>>(),
            (0..50).map(|i| rollout_bucket("a", &format!("bc{i}"))).collect::<Vec<_>>()
        );
    }

    #[test]
    fn rollout_is_monotone() {
        let mut c = channel();
        let ids: Vec<String> = (0..2000).map(|i| format!("{i:x}")).collect();
        let included =
            |c: &Channel| ids.iter().filter(|id| c.includes(id)).cloned().collect::<Vec<_>>();
        c.rollout = 0;
        assert!(included(&c).is_empty());
        c.rollout = 10;
        let at10 = included(&c);
        c.rollout = 50;
        let at50 = included(&c);
        c.rollout = 100;
        assert_eq!(included(&c).len(), ids.len());
        assert!((120..=280).contains(&at10.len()), "{}", at10.len());
        assert!((850..=1150).contains(&at50.len()), "{}", at50.len());
        assert!(at10.iter().all(|id| at50.contains(id)), "a device left the rollout");
    }

    #[test]
    fn verify_then_parse() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let trust = Trust { keys: vec![key.public()], threshold: 1 };
        let bytes = channel().to_toml().into_bytes();
        let mut sigs = SignatureFile::default();
        sigs.add(sign(&bytes, &key));
        let sig_bytes = sigs.to_toml().unwrap().into_bytes();
        assert_eq!(verify_channel(&bytes, &sig_bytes, &trust).unwrap(), channel());
        // Another key, a modified file, a garbage .sig.
        let mut theirs = SignatureFile::default();
        theirs.add(sign(&bytes, &other));
        let theirs = theirs.to_toml().unwrap().into_bytes();
        assert!(matches!(verify_channel(&bytes, &theirs, &trust), Err(ChannelError::Verify(_))));
        let mut modified = bytes.clone();
        modified[bytes.len() - 3] ^= 1;
        assert!(matches!(
            verify_channel(&modified, &sig_bytes, &trust),
            Err(ChannelError::Verify(_))
        ));
        assert!(matches!(verify_channel(&bytes, b"[[[", &trust), Err(ChannelError::Signatures(_))));
        // A signed but invalid file is still refused, after verification.
        let bad = channel().to_toml().replace("rollout = 100", "rollout = 101").into_bytes();
        let mut sigs = SignatureFile::default();
        sigs.add(sign(&bad, &key));
        let sig_bytes = sigs.to_toml().unwrap().into_bytes();
        assert!(matches!(
            verify_channel(&bad, &sig_bytes, &trust),
            Err(ChannelError::BadRollout(101))
        ));
    }

    #[test]
    fn paths() {
        assert_eq!(channel_path("stable").unwrap(), "channels/stable.toml");
        assert_eq!(signature_path_for("channels/stable.toml"), "channels/stable.toml.sig");
        for bad in ["", ".", "..", "a/b", "-x", "a b", &"x".repeat(65)] {
            assert!(channel_path(bad).is_err(), "{bad:?}");
            assert!(model_channel_path(bad, "stable").is_err(), "{bad:?}");
            assert!(model_channel_path("water-quality", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            model_channel_path("water-quality", "stable").unwrap(),
            "channels/models/water-quality/stable.toml"
        );
    }
}
