//! What the fuzz targets share: the key they trust.
//!
//! The private key below is a fixed test key, public on purpose so that
//! the seed corpus can be signed with it; it must never be trusted by a
//! device. With a fixed trusted key, mutations of a signed seed that keep
//! its manifest and signature reach the payload code.

use std::sync::OnceLock;

use basalt_bundle::keys::SigningKey;
use basalt_bundle::signature::Trust;

/// The fuzzing key (PKCS#8 PEM). Test use only.
pub const FUZZ_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIGi+63z3oyxQdGioVS/1igXWcMfK7j/Nqi032tA594S+
-----END PRIVATE KEY-----
";

/// The fuzzing key.
pub fn fuzz_key() -> SigningKey {
    match SigningKey::from_pkcs8_pem(FUZZ_KEY_PEM) {
        Ok(key) => key,
        Err(e) => panic!("the built-in fuzzing key does not load: {e}"),
    }
}

/// The trust the targets check against: the fuzzing key, threshold 1.
pub fn trust() -> &'static Trust {
    static TRUST: OnceLock<Trust> = OnceLock::new();
    TRUST.get_or_init(|| Trust { keys: vec![fuzz_key().public()], threshold: 1 })
}
