//! `manifest.sig`: signatures over the exact bytes of `manifest.toml`.
//!
//! The file is TOML with one `[[signature]]` table per key:
//!
//! ```toml
//! [[signature]]
//! key_id = "3f0c9e1b2a4d5c6e7f8091a2b3c4d5e6"
//! algorithm = "ed25519"
//! value = "<128 lowercase hex characters: the 64-byte signature>"
//! ```
//!
//! The signature covers the manifest bytes as they are in the bundle, never a
//! re-serialisation, so that what is verified is exactly what is parsed
//! afterwards. Several signatures allow a threshold of keys and key rotation:
//! a new key signs next to the old one until every device trusts it.
//!
//! The file arrives from the network before anything is trusted, so parsing
//! caps its size and its number of entries and checks the shape of every
//! field; nothing here panics on any input.

use serde::{Deserialize, Serialize};

use crate::keys::{is_key_id, PublicKey, SigningKey};

/// Largest accepted `manifest.sig`, in bytes. A few hundred bytes per
/// signature make this room for far more keys than any threshold needs.
pub const MAX_SIGNATURE_FILE_BYTES: usize = 64 * 1024;

/// Largest accepted number of `[[signature]]` entries.
pub const MAX_SIGNATURES: usize = 64;

/// The `algorithm` value of an ed25519 signature, the only one this version
/// verifies.
pub const ALGORITHM_ED25519: &str = "ed25519";

/// Length of an ed25519 signature `value`: 64 bytes in hexadecimal.
const ED25519_VALUE_HEX_LEN: usize = 128;

/// Longest accepted `algorithm` name; names are short words.
const MAX_ALGORITHM_LEN: usize = 32;

/// One `[[signature]]` table of `manifest.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    /// The id of the key that made the signature (see
    /// [`PublicKey::key_id`]).
    pub key_id: String,
    /// The signature algorithm; [`ALGORITHM_ED25519`].
    pub algorithm: String,
    /// The signature, for ed25519 64 bytes as 128 lowercase hexadecimal
    /// characters.
    pub value: String,
}

impl SignatureEntry {
    /// The 64 signature bytes, when this is a well-formed ed25519 entry.
    pub fn ed25519_bytes(&self) -> Option<[u8; 64]> {
        if self.algorithm != ALGORITHM_ED25519 || self.value.len() != ED25519_VALUE_HEX_LEN {
            return None;
        }
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(&self.value, &mut bytes).ok()?;
        Some(bytes)
    }
}

/// The whole `manifest.sig` file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// The signatures, in file order.
    #[serde(rename = "signature", default)]
    pub signatures: Vec<SignatureEntry>,
}

/// Why a `manifest.sig` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SignatureFileError {
    /// The file is larger than [`MAX_SIGNATURE_FILE_BYTES`].
    #[error(
        "manifest.sig is {size} bytes, more than the {max} allowed; the bundle is damaged or \
         hostile, rebuild it with `basalt bundle`"
    )]
    TooLarge {
        /// The size of the file.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The file is not UTF-8 text.
    #[error("manifest.sig is not UTF-8 text; the bundle is damaged, rebuild it")]
    NotUtf8,
    /// The file is not the expected TOML.
    #[error("manifest.sig is not a valid signature file: {0}")]
    Toml(#[source] toml::de::Error),
    /// The file has more than [`MAX_SIGNATURES`] entries.
    #[error(
        "manifest.sig has {count} signatures, more than the {max} allowed; drop signatures of \
         retired keys"
    )]
    TooMany {
        /// The number of entries.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An entry's `key_id` is not 32 lowercase hexadecimal characters.
    #[error(
        "signature {index} of manifest.sig has key_id {key_id:?}, not 32 lowercase hexadecimal \
         characters as `basalt keygen` prints"
    )]
    BadKeyId {
        /// Position of the entry, from 1.
        index: usize,
        /// The offending value, cut to a printable length.
        key_id: String,
    },
    /// An entry's `algorithm` is empty or too long to be a name.
    #[error("signature {index} of manifest.sig has an invalid algorithm name {algorithm:?}")]
    BadAlgorithm {
        /// Position of the entry, from 1.
        index: usize,
        /// The offending value, cut to a printable length.
        algorithm: String,
    },
    /// An ed25519 entry's `value` is not 128 hexadecimal characters.
    #[error(
        "signature {index} of manifest.sig (key {key_id}) has a value that is not 128 \
         hexadecimal characters (64 bytes); re-sign the manifest"
    )]
    BadValue {
        /// Position of the entry, from 1.
        index: usize,
        /// The key id of the entry.
        key_id: String,
    },
    /// Serialising the file failed.
    #[error("could not write manifest.sig as TOML: {0}")]
    Serialize(#[source] toml::ser::Error),
}

/// Why a manifest's signatures are not enough.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A threshold of 0 would accept an unsigned manifest.
    #[error("a signature threshold of 0 would accept unsigned bundles; use 1 or more")]
    ZeroThreshold,
    /// There are fewer distinct trusted keys than the threshold, so no file
    /// could ever pass.
    #[error(
        "the threshold is {threshold} signatures but only {trusted} distinct trusted keys are \
         given; add trusted keys or lower the threshold"
    )]
    ThresholdAboveKeys {
        /// The required number of signatures.
        threshold: usize,
        /// The number of distinct trusted keys.
        trusted: usize,
    },
    /// Fewer than `threshold` trusted keys signed the manifest validly.
    #[error(
        "{valid} valid signature(s) by trusted keys, {threshold} required; trusted key ids \
         tried: [{}]; failed to verify: [{}]; ignored, not trusted: [{}]. Sign the manifest \
         with more trusted keys, or check that the bundle was not modified",
        tried.join(", "),
        invalid.join(", "),
        untrusted.join(", ")
    )]
    BelowThreshold {
        /// Number of distinct trusted keys with a valid signature.
        valid: usize,
        /// The required number.
        threshold: usize,
        /// Trusted key ids that had a signature entry, valid or not.
        tried: Vec<String>,
        /// Trusted key ids whose signature did not verify.
        invalid: Vec<String>,
        /// Key ids in the file that are not trusted.
        untrusted: Vec<String>,
    },
}

impl SignatureFile {
    /// Reads a `manifest.sig`, refusing oversized or malformed input.
    ///
    /// Entries with an algorithm other than ed25519 are kept (a later
    /// version may add one next to ed25519) and ignored by [`verify`].
    pub fn parse(bytes: &[u8]) -> Result<Self, SignatureFileError> {
        if bytes.len() > MAX_SIGNATURE_FILE_BYTES {
            return Err(SignatureFileError::TooLarge {
                size: bytes.len(),
                max: MAX_SIGNATURE_FILE_BYTES,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| SignatureFileError::NotUtf8)?;
        let file: SignatureFile = toml::from_str(text).map_err(SignatureFileError::Toml)?;
        if file.signatures.len() > MAX_SIGNATURES {
            return Err(SignatureFileError::TooMany {
                count: file.signatures.len(),
                max: MAX_SIGNATURES,
            });
        }
        for (i, entry) in file.signatures.iter().enumerate() {
            let index = i + 1;
            if !is_key_id(&entry.key_id) {
                return Err(SignatureFileError::BadKeyId { index, key_id: shorten(&entry.key_id) });
            }
            let algorithm_ok = !entry.algorithm.is_empty()
                && entry.algorithm.len() <= MAX_ALGORITHM_LEN
                && entry.algorithm.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !algorithm_ok {
                return Err(SignatureFileError::BadAlgorithm {
                    index,
                    algorithm: shorten(&entry.algorithm),
                });
            }
            if entry.algorithm == ALGORITHM_ED25519 && entry.ed25519_bytes().is_none() {
                return Err(SignatureFileError::BadValue { index, key_id: entry.key_id.clone() });
            }
        }
        Ok(file)
    }

    /// Writes the file as TOML, one `[[signature]]` table per entry.
    pub fn to_toml(&self) -> Result<String, SignatureFileError> {
        toml::to_string(self).map_err(SignatureFileError::Serialize)
    }

    /// Adds a signature. A signature by a key that already signed (same key
    /// id and algorithm) replaces the old one, in place; others are kept.
    pub fn add(&mut self, entry: SignatureEntry) {
        match self
            .signatures
            .iter_mut()
            .find(|e| e.key_id == entry.key_id && e.algorithm == entry.algorithm)
        {
            Some(existing) => *existing = entry,
            None => self.signatures.push(entry),
        }
    }
}

/// Cuts hostile field values before they go into an error message.
fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

/// The keys a device trusts and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// The trusted public keys.
    pub keys: Vec<PublicKey>,
    /// How many distinct keys of `keys` must have signed, at least 1.
    pub threshold: usize,
}

impl Trust {
    /// Checks `file`'s signatures of `message` against these keys; see
    /// [`verify`]. Returns the ids of the keys that verified.
    pub fn verify(&self, message: &[u8], file: &SignatureFile) -> Result<Vec<String>, VerifyError> {
        verify(message, file, &self.keys, self.threshold)
    }
}

/// Signs the exact bytes of a manifest.
pub fn sign(manifest: &[u8], key: &SigningKey) -> SignatureEntry {
    SignatureEntry {
        key_id: key.public().key_id(),
        algorithm: ALGORITHM_ED25519.to_owned(),
        value: hex::encode(key.sign_bytes(manifest)),
    }
}

/// Checks that at least `threshold` distinct keys of `trusted` made a valid
/// signature of `manifest`, and returns their key ids in file order.
///
/// Entries by keys not in `trusted`, and entries of other algorithms, are
/// ignored: a bundle may carry signatures for other fleets or for keys being
/// rotated in. Several entries of one key count once. A trusted key whose
/// entry does not verify does not count, and is named in the error.
pub fn verify(
    manifest: &[u8],
    file: &SignatureFile,
    trusted: &[PublicKey],
    threshold: usize,
) -> Result<Vec<String>, VerifyError> {
    if threshold == 0 {
        return Err(VerifyError::ZeroThreshold);
    }
    // Key ids once, so a key listed twice in the trusted set cannot count
    // twice either.
    let mut keys: Vec<(String, &PublicKey)> = Vec::new();
    for key in trusted {
        let id = key.key_id();
        if !keys.iter().any(|(k, _)| *k == id) {
            keys.push((id, key));
        }
    }
    if keys.len() < threshold {
        return Err(VerifyError::ThresholdAboveKeys { threshold, trusted: keys.len() });
    }

    let mut valid: Vec<String> = Vec::new();
    let mut tried: Vec<String> = Vec::new();
    let mut untrusted: Vec<String> = Vec::new();
    for entry in &file.signatures {
        let Some((id, key)) = keys.iter().find(|(k, _)| *k == entry.key_id) else {
            if !untrusted.contains(&entry.key_id) {
                untrusted.push(shorten(&entry.key_id));
            }
            continue;
        };
        if !tried.contains(id) {
            tried.push(id.clone());
        }
        if valid.contains(id) {
            continue;
        }
        let ok = entry.ed25519_bytes().is_some_and(|sig| key.verify_bytes(manifest, &sig));
        if ok {
            valid.push(id.clone());
        }
    }
    if valid.len() < threshold {
        let invalid = tried.iter().filter(|id| !valid.contains(id)).cloned().collect();
        return Err(VerifyError::BelowThreshold {
            valid: valid.len(),
            threshold,
            tried,
            invalid,
            untrusted,
        });
    }
    Ok(valid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const MANIFEST: &[u8] = b"format = 1\nkind = \"os\"\nname = \"demo\"\nversion = \"1.0.0\"\n";

    fn file_of(entries: Vec<SignatureEntry>) -> SignatureFile {
        SignatureFile { signatures: entries }
    }

    #[test]
    fn sign_verify_round_trip_through_toml() {
        let key = SigningKey::generate().unwrap();
        let mut file = SignatureFile::default();
        file.add(sign(MANIFEST, &key));
        let text = file.to_toml().unwrap();
        assert!(text.contains("[[signature]]"), "{text}");
        let back = SignatureFile::parse(text.as_bytes()).unwrap();
        assert_eq!(back, file);
        let ids = verify(MANIFEST, &back, &[key.public()], 1).unwrap();
        assert_eq!(ids, vec![key.public().key_id()]);
    }

    #[test]
    fn flipped_manifest_byte_fails() {
        let key = SigningKey::generate().unwrap();
        let file = file_of(vec![sign(MANIFEST, &key)]);
        for i in 0..MANIFEST.len() {
            let mut m = MANIFEST.to_vec();
            m[i] ^= 0x01;
            let err = verify(&m, &file, &[key.public()], 1).unwrap_err();
            assert!(matches!(err, VerifyError::BelowThreshold { valid: 0, .. }), "{err}");
        }
    }

    #[test]
    fn flipped_signature_byte_fails() {
        let key = SigningKey::generate().unwrap();
        let entry = sign(MANIFEST, &key);
        let mut bytes = entry.ed25519_bytes().unwrap();
        bytes[10] ^= 0x80;
        let bad = SignatureEntry { value: hex::encode(bytes), ..entry };
        let err = verify(MANIFEST, &file_of(vec![bad]), &[key.public()], 1).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&key.public().key_id()), "{msg}");
        assert!(msg.contains("0 valid"), "{msg}");
    }

    #[test]
    fn threshold_two() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::generate().unwrap();
        let trusted = [a.public(), b.public()];
        let mut file = file_of(vec![sign(MANIFEST, &a)]);
        let err = verify(MANIFEST, &file, &trusted, 2).unwrap_err();
        match &err {
            VerifyError::BelowThreshold { valid, threshold, tried, .. } => {
                assert_eq!((*valid, *threshold), (1, 2));
                assert_eq!(tried, &vec![a.public().key_id()]);
            }
            other => panic!("{other}"),
        }
        file.add(sign(MANIFEST, &b));
        assert_eq!(file.signatures.len(), 2);
        let ids = verify(MANIFEST, &file, &trusted, 2).unwrap();
        assert_eq!(ids, vec![a.public().key_id(), b.public().key_id()]);
    }

    #[test]
    fn same_key_counts_once() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::generate().unwrap();
        let entry = sign(MANIFEST, &a);
        // Twice in the file, and the key twice in the trusted set.
        let file = file_of(vec![entry.clone(), entry]);
        let text = file.to_toml().unwrap();
        let parsed = SignatureFile::parse(text.as_bytes()).unwrap();
        let err = verify(MANIFEST, &parsed, &[a.public(), a.public(), b.public()], 2).unwrap_err();
        assert!(matches!(err, VerifyError::BelowThreshold { valid: 1, .. }), "{err}");
        let err = verify(MANIFEST, &parsed, &[a.public(), a.public()], 2).unwrap_err();
        assert!(matches!(err, VerifyError::ThresholdAboveKeys { trusted: 1, .. }), "{err}");
    }

    #[test]
    fn add_keeps_others_and_replaces_same_key() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::generate().unwrap();
        let mut file = SignatureFile::default();
        file.add(sign(b"old", &a));
        file.add(sign(MANIFEST, &b));
        file.add(sign(MANIFEST, &a));
        assert_eq!(file.signatures.len(), 2);
        assert_eq!(file.signatures[0].key_id, a.public().key_id());
        verify(MANIFEST, &file, &[a.public(), b.public()], 2).unwrap();
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let a = SigningKey::generate().unwrap();
        let stranger = SigningKey::generate().unwrap();
        let file = file_of(vec![sign(MANIFEST, &stranger), sign(MANIFEST, &a)]);
        assert_eq!(verify(MANIFEST, &file, &[a.public()], 1).unwrap(), vec![a.public().key_id()]);
        let only_stranger = file_of(vec![sign(MANIFEST, &stranger)]);
        let err = verify(MANIFEST, &only_stranger, &[a.public()], 1).unwrap_err();
        assert!(err.to_string().contains(&stranger.public().key_id()), "{err}");
    }

    #[test]
    fn zero_threshold_is_refused() {
        let a = SigningKey::generate().unwrap();
        let file = file_of(vec![sign(MANIFEST, &a)]);
        let err = verify(MANIFEST, &file, &[a.public()], 0).unwrap_err();
        assert!(matches!(err, VerifyError::ZeroThreshold));
        let empty = SignatureFile::parse(b"").unwrap();
        assert!(verify(MANIFEST, &empty, &[a.public()], 1).is_err());
    }

    #[test]
    fn hostile_files_are_refused() {
        let a = SigningKey::generate().unwrap();
        let good = sign(MANIFEST, &a);
        let big = vec![b'#'; MAX_SIGNATURE_FILE_BYTES + 1];
        assert!(matches!(SignatureFile::parse(&big), Err(SignatureFileError::TooLarge { .. })));
        let many = file_of(vec![good.clone(); MAX_SIGNATURES + 1]).to_toml().unwrap();
        assert!(matches!(
            SignatureFile::parse(many.as_bytes()),
            Err(SignatureFileError::TooMany { .. })
        ));
        assert!(matches!(SignatureFile::parse(b"\xff\xfe"), Err(SignatureFileError::NotUtf8)));
        let cases = [
            "[[signature]]\nkey_id = \"x\"\nalgorithm = \"ed25519\"\nvalue = \"00\"\n".to_owned(),
            format!("[[signature]]\nkey_id = \"{}\"\nalgorithm = \"ed25519\"\nvalue = \"00\"\n", good.key_id),
            format!("[[signature]]\nkey_id = \"{}\"\nalgorithm = \"\"\nvalue = \"00\"\n", good.key_id),
            format!("[[signature]]\nkey_id = \"{}\"\nalgorithm = \"ed25519\"\nvalue = \"{}\"\nextra = 1\n", good.key_id, good.value),
            format!("[[signature]]\nkey_id = \"{}\"\nalgorithm = \"ed25519\"\nvalue = \"{}\"\n", good.key_id.to_uppercase(), good.value),
            format!("[[signature]]\nkey_id = \"{}\"\nalgorithm = \"ed25519\"\nvalue = \"{}\"\n", good.key_id, "zz".repeat(64)),
            "signature = 3\n".to_owned(),
            "[[signature]]\n".to_owned(),
            "[[[".to_owned(),
        ];
        for case in &cases {
            assert!(SignatureFile::parse(case.as_bytes()).is_err(), "accepted {case:?}");
        }
        // Every truncation and every single-byte flip of a good file either
        // fails to parse or fails to verify; none panics.
        let text = file_of(vec![good]).to_toml().unwrap();
        let bytes = text.as_bytes();
        // Dropping only the final newline leaves a complete file.
        for cut in 0..text.trim_end().len() {
            if let Ok(f) = SignatureFile::parse(&bytes[..cut]) {
                assert!(verify(MANIFEST, &f, &[a.public()], 1).is_err(), "cut {cut}");
            }
        }
        for i in 0..bytes.len() {
            let mut m = bytes.to_vec();
            m[i] ^= 0x01;
            if let Ok(f) = SignatureFile::parse(&m) {
                // A flip inside a TOML comment-free file can only survive
                // parsing if it changes a value, which must then not verify,
                // or the algorithm, which is then ignored.
                assert!(verify(MANIFEST, &f, &[a.public()], 1).is_err(), "flip {i}");
            }
        }
    }

    #[test]
    fn openssl_signature_verifies_and_ours_verifies_with_openssl() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl is installed (Debian package openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out
        };
        std::fs::write(dir.path().join("manifest.toml"), MANIFEST).unwrap();
        run(&["genpkey", "-algorithm", "ed25519", "-out", "k.pem"]);
        run(&["pkey", "-in", "k.pem", "-pubout", "-out", "pub.pem"]);
        let out = run(&["pkeyutl", "-sign", "-rawin", "-inkey", "k.pem", "-in", "manifest.toml"]);
        let public =
            PublicKey::from_pem(&std::fs::read_to_string(dir.path().join("pub.pem")).unwrap())
                .unwrap();
        let entry = SignatureEntry {
            key_id: public.key_id(),
            algorithm: ALGORITHM_ED25519.to_owned(),
            value: hex::encode(&out.stdout),
        };
        let file =
            SignatureFile::parse(file_of(vec![entry]).to_toml().unwrap().as_bytes()).unwrap();
        verify(MANIFEST, &file, &[public], 1).unwrap();

        // Ours, with the same key, checked by OpenSSL; ed25519 is
        // deterministic, so the bytes are the same too.
        let key =
            SigningKey::from_pkcs8_pem(&std::fs::read_to_string(dir.path().join("k.pem")).unwrap())
                .unwrap();
        let ours = sign(MANIFEST, &key).ed25519_bytes().unwrap();
        assert_eq!(&ours[..], &out.stdout[..]);
        let mine = SigningKey::generate().unwrap();
        std::fs::write(dir.path().join("mine.pub"), mine.public().to_pem().unwrap()).unwrap();
        let sig = sign(MANIFEST, &mine).ed25519_bytes().unwrap();
        std::fs::write(dir.path().join("sig.bin"), sig).unwrap();
        run(&[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "mine.pub",
            "-rawin",
            "-in",
            "manifest.toml",
            "-sigfile",
            "sig.bin",
        ]);
    }
}
