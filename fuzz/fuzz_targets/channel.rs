//! Channel metadata: parsing on its own (with a round trip), and
//! verify-then-parse with the input split into the file and its `.sig`.
#![no_main]

use basalt_bundle::channel::{verify_channel, Channel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(channel) = Channel::parse(data) {
        let again = Channel::parse(channel.to_toml().as_bytes());
        assert_eq!(again.ok().as_ref(), Some(&channel), "the channel does not round-trip");
        let _ = channel.is_expired(0);
        let _ = channel.includes("machine");
    }
    // The first two bytes choose where the channel file ends and its
    // signature file begins.
    if let [a, b, rest @ ..] = data {
        let split = usize::from(u16::from_le_bytes([*a, *b])) % (rest.len() + 1);
        let (file, sig) = rest.split_at(split);
        let _ = verify_channel(file, sig, basalt_fuzz::trust());
    }
});
