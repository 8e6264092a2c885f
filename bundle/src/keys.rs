//! Ed25519 signing keys, public keys and key ids.
//!
//! Keys are stored in the PEM formats OpenSSL reads and writes, so that an
//! operator can make, inspect or back up keys with the tools they already
//! trust:
//!
//! - a private key is a PKCS#8 `PRIVATE KEY` document, written as version 1
//!   (RFC 5208, no public key inside). Version 2 (RFC 5958), which carries the
//!   public key too, is what `ed25519-dalek` writes by default, and OpenSSL
//!   3.0 refuses it. Both versions are read.
//! - a public key is a SubjectPublicKeyInfo `PUBLIC KEY` document, as
//!   `openssl pkey -pubout` writes it.
//!
//! A key id names a public key in `manifest.sig` and in trusted key sets; see
//! [`PublicKey::key_id`].

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::Signer;
use sha2::{Digest, Sha256};

/// Number of bytes of the sha256 digest that make up a key id.
///
/// 16 bytes (128 bits) keep ids short enough to read in a TOML file while a
/// collision between two keys of one fleet stays out of reach.
pub const KEY_ID_BYTES: usize = 16;

/// Length of a key id in hexadecimal characters.
pub const KEY_ID_HEX_LEN: usize = KEY_ID_BYTES * 2;

/// What went wrong while reading, writing or making a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not a PKCS#8 ed25519 private key.
    #[error(
        "not an ed25519 private key in PKCS#8 PEM ({0}); expected a `-----BEGIN PRIVATE KEY-----` \
         file as written by `basalt keygen` or `openssl genpkey -algorithm ed25519`"
    )]
    PrivateKeyPem(#[source] ed25519_dalek::pkcs8::Error),
    /// The private key could not be encoded.
    #[error("could not encode the private key as PKCS#8 PEM ({0})")]
    EncodePrivateKey(#[source] ed25519_dalek::pkcs8::Error),
    /// The text is not a SubjectPublicKeyInfo ed25519 public key.
    #[error(
        "not an ed25519 public key in PEM ({0}); expected a `-----BEGIN PUBLIC KEY-----` file as \
         written by `basalt keygen` or `openssl pkey -in KEY -pubout`"
    )]
    PublicKeyPem(#[source] ed25519_dalek::pkcs8::spki::Error),
    /// The public key could not be encoded.
    #[error("could not encode the public key as PEM ({0})")]
    EncodePublicKey(#[source] ed25519_dalek::pkcs8::spki::Error),
    /// The 32 bytes are not a valid ed25519 public key.
    #[error("the 32 bytes are not a valid ed25519 public key ({0}); the key file is damaged")]
    InvalidPublicKey(#[source] ed25519_dalek::SignatureError),
    /// The operating system gave no random bytes.
    #[error(
        "the operating system random number generator failed ({0}); a key cannot be made \
         without it, retry on a system with a working getrandom(2) or /dev/urandom"
    )]
    Random(getrandom::Error),
}

/// An ed25519 private key that signs manifests.
///
/// The secret bytes are wiped from memory when the key is dropped (the
/// `zeroize` feature of `ed25519-dalek`).
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    // Never print the secret: only which key it is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.public().key_id()).finish()
    }
}

impl SigningKey {
    /// Makes a new key from 32 bytes of the operating system's random
    /// number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut secret = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
        getrandom::fill(&mut secret).map_err(KeyError::Random)?;
        let inner = ed25519_dalek::SigningKey::from_bytes(&secret);
        // The dalek key holds its own copy; wipe ours.
        secret.fill(0);
        Ok(Self { inner })
    }

    /// Reads a PKCS#8 PEM private key, version 1 (OpenSSL's) or version 2
    /// (with the public key inside, which must then match).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let inner =
            ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map_err(KeyError::PrivateKeyPem)?;
        Ok(Self { inner })
    }

    /// Writes the key as a PKCS#8 version 1 PEM document with `\n` line
    /// endings.
    ///
    /// Version 1 on purpose: OpenSSL 3.0 refuses the version 2 document that
    /// `ed25519-dalek` writes by default, and the public key is derived from
    /// the secret anyway.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let bytes = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.inner.to_bytes(),
            public_key: None,
        };
        let pem = bytes.to_pkcs8_pem(LineEnding::LF).map_err(KeyError::EncodePrivateKey)?;
        Ok(pem.as_str().to_owned())
    }

    /// The public half of this key.
    pub fn public(&self) -> PublicKey {
        PublicKey { inner: self.inner.verifying_key() }
    }

    /// Signs `message` (deterministic, RFC 8032) and returns the 64-byte
    /// signature.
    pub fn sign_bytes(&self, message: &[u8]) -> [u8; ed25519_dalek::SIGNATURE_LENGTH] {
        self.inner.sign(message).to_bytes()
    }
}

/// An ed25519 public key that verifies manifest signatures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    inner: ed25519_dalek::VerifyingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey").field("key_id", &self.key_id()).finish()
    }
}

impl PublicKey {
    /// Reads a SubjectPublicKeyInfo PEM public key (`-----BEGIN PUBLIC
    /// KEY-----`), as `openssl pkey -pubout` writes it.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let inner = ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
            .map_err(KeyError::PublicKeyPem)?;
        Ok(Self { inner })
    }

    /// Writes the key as a SubjectPublicKeyInfo PEM document with `\n` line
    /// endings, byte for byte what `openssl pkey -pubout` writes.
    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.inner.to_public_key_pem(LineEnding::LF).map_err(KeyError::EncodePublicKey)
    }

    /// Makes a key from its 32 raw bytes (RFC 8032 encoding).
    pub fn from_raw(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let inner =
            ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(KeyError::InvalidPublicKey)?;
        Ok(Self { inner })
    }

    /// The 32 raw bytes of the key (RFC 8032 encoding).
    pub fn to_raw(&self) -> [u8; 32] {
        self.inner.to_bytes()
    }

    /// The key id: the first [`KEY_ID_BYTES`] (16) bytes of the sha256 of the
    /// 32 raw public key bytes, as 32 lowercase hexadecimal characters.
    ///
    /// The digest is over the raw key, not over its PEM or DER text, so the
    /// id does not depend on how the key file was written. To compute it by
    /// hand: `openssl pkey -pubin -in KEY.pub -outform DER | tail -c 32 |
    /// sha256sum | cut -c1-32`.
    pub fn key_id(&self) -> String {
        let digest = Sha256::digest(self.inner.as_bytes());
        hex::encode(&digest[..KEY_ID_BYTES])
    }

    /// Checks a 64-byte signature of `message` with the strict rules of
    /// `ed25519-dalek` (no small-order keys, canonical signatures only), so
    /// that one message and key admit exactly one valid signature.
    pub fn verify_bytes(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.inner.verify_strict(message, &sig).is_ok()
    }
}

/// Whether `s` has the shape of a key id: 32 lowercase hexadecimal
/// characters.
pub fn is_key_id(s: &str) -> bool {
    s.len() == KEY_ID_HEX_LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn openssl(args: &[&str], dir: &std::path::Path) -> std::process::Output {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    #[test]
    fn private_key_round_trip() {
        let key = SigningKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.public(), key.public());
        assert_eq!(back.to_pkcs8_pem().unwrap(), pem);
    }

    #[test]
    fn private_key_is_pkcs8_v1() {
        let key = SigningKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        // A v1 ed25519 key is 48 bytes of DER: 64 base64 characters on one
        // line. A v2 key with the public key inside would be longer.
        let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert_eq!(body, vec![body[0]]);
        assert_eq!(body[0].len(), 64);
        // Version field: INTEGER 0 right after the outer SEQUENCE header.
        assert!(body[0].starts_with("MC4CAQAw"), "{pem}");
    }

    #[test]
    fn reads_pkcs8_v2() {
        // What ed25519-dalek writes by default must still load.
        let key = SigningKey::generate().unwrap();
        let v2 = key.inner.to_pkcs8_pem(LineEnding::LF).unwrap();
        let back = SigningKey::from_pkcs8_pem(&v2).unwrap();
        assert_eq!(back.public(), key.public());
    }

    #[test]
    fn public_key_round_trip_and_id() {
        let key = SigningKey::generate().unwrap();
        let public = key.public();
        let pem = public.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(PublicKey::from_pem(&pem).unwrap(), public);
        let id = public.key_id();
        assert!(is_key_id(&id), "{id}");
        let expected = Sha256::digest(public.to_raw());
        assert_eq!(id, hex::encode(&expected[..16]));
        assert_eq!(PublicKey::from_raw(&public.to_raw()).unwrap(), public);
    }

    #[test]
    fn garbage_is_refused_with_a_hint() {
        let err = SigningKey::from_pkcs8_pem("hello").unwrap_err();
        assert!(err.to_string().contains("openssl genpkey"), "{err}");
        let err =
            PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                .unwrap_err();
        assert!(err.to_string().contains("-pubout"), "{err}");
        // A private key is not a public key.
        let key = SigningKey::generate().unwrap();
        assert!(PublicKey::from_pem(&key.to_pkcs8_pem().unwrap()).is_err());
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let key = SigningKey::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains(&key.public().key_id()));
        assert!(!shown.contains(&hex::encode(key.inner.to_bytes())));
    }

    #[test]
    fn openssl_key_loads_and_public_keys_agree() {
        let dir = tempfile::tempdir().unwrap();
        openssl(&["genpkey", "-algorithm", "ed25519", "-out", "k.pem"], dir.path());
        let pubout = openssl(&["pkey", "-in", "k.pem", "-pubout"], dir.path());
        let pem = std::fs::read_to_string(dir.path().join("k.pem")).unwrap();
        let key = SigningKey::from_pkcs8_pem(&pem).unwrap();
        let theirs =
            PublicKey::from_pem(&String::from_utf8(pubout.stdout.clone()).unwrap()).unwrap();
        assert_eq!(key.public(), theirs);
        // Ours is byte for byte what OpenSSL writes, for both halves.
        assert_eq!(key.public().to_pem().unwrap().as_bytes(), &pubout.stdout[..]);
        assert_eq!(key.to_pkcs8_pem().unwrap(), pem);
    }

    #[test]
    fn openssl_accepts_our_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        std::fs::write(dir.path().join("ours.pem"), key.to_pkcs8_pem().unwrap()).unwrap();
        openssl(&["pkey", "-in", "ours.pem", "-noout"], dir.path());
        let pubout = openssl(&["pkey", "-in", "ours.pem", "-pubout"], dir.path());
        assert_eq!(key.public().to_pem().unwrap().as_bytes(), &pubout.stdout[..]);
    }
}
