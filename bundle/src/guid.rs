//! GUIDs as GPT stores them, and GUIDs derived from an image's identity.

use std::fmt;

use sha2::{Digest, Sha256};

/// A GUID, held in its textual (big-endian) byte order.
///
/// GPT stores the first three fields little-endian ("mixed endian");
/// [`Guid::to_gpt_bytes`] does that conversion so no caller swaps bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid([u8; 16]);

const fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("invalid hex digit in GUID literal"),
    }
}

impl Guid {
    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` at compile time.
    ///
    /// Only for literals: a malformed literal fails the build.
    pub const fn from_str_const(s: &str) -> Guid {
        let b = s.as_bytes();
        assert!(b.len() == 36, "a GUID literal has 36 characters");
        let mut out = [0u8; 16];
        let mut i = 0;
        let mut o = 0;
        while i < 36 {
            if b[i] == b'-' {
                i += 1;
                continue;
            }
            out[o] = hex_val(b[i]) << 4 | hex_val(b[i + 1]);
            o += 1;
            i += 2;
        }
        assert!(o == 16, "a GUID literal has 32 hex digits");
        Guid(out)
    }

    /// Parses a GUID from text, for values read at run time.
    pub fn parse(s: &str) -> Option<Guid> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if s.len() != 36 || hex.len() != 32 {
            return None;
        }
        let bytes = hex::decode(hex).ok()?;
        Some(Guid(bytes.try_into().ok()?))
    }

    /// A GUID derived from a name, so that rebuilding the same image gives
    /// the same disk and partition GUIDs (RFC 9562 version 8, SHA-256 based).
    pub fn derived(namespace: &str, name: &str) -> Guid {
        let digest = Sha256::new()
            .chain_update(namespace.as_bytes())
            .chain_update([0u8])
            .chain_update(name.as_bytes())
            .finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        out[6] = (out[6] & 0x0f) | 0x80;
        out[8] = (out[8] & 0x3f) | 0x80;
        Guid(out)
    }

    /// The 16 bytes in textual order.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The 16 bytes as GPT stores them (first three fields little-endian).
    pub fn to_gpt_bytes(&self) -> [u8; 16] {
        let b = self.0;
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }

    /// Reads a GUID stored in GPT byte order.
    pub fn from_gpt_bytes(g: [u8; 16]) -> Guid {
        Guid([
            g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13],
            g[14], g[15],
        ])
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(f, "{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp_guid_has_the_known_gpt_encoding() {
        let esp = Guid::from_str_const("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(
            esp.to_gpt_bytes(),
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        assert_eq!(Guid::from_gpt_bytes(esp.to_gpt_bytes()), esp);
        assert_eq!(esp.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(Guid::parse(&esp.to_string()), Some(esp));
    }

    #[test]
    fn derived_guids_are_stable_and_distinct() {
        let a = Guid::derived("disk", "minimal 1.0.0");
        assert_eq!(a, Guid::derived("disk", "minimal 1.0.0"));
        assert_ne!(a, Guid::derived("disk", "minimal 1.0.1"));
        assert_ne!(a, Guid::derived("part", "minimal 1.0.0"));
        assert_eq!(a.as_bytes()[6] >> 4, 8);
    }
}
