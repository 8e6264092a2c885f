//! `manifest.toml` parsing: nothing panics, and what parses writes back to
//! the same manifest.
#![no_main]

use basalt_bundle::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::parse(data) {
        let again = Manifest::parse(manifest.to_toml().as_bytes());
        assert_eq!(again.ok().as_ref(), Some(&manifest), "the manifest does not round-trip");
    }
});
