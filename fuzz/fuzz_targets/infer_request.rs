//! KServe V2 inference requests as the runtime reads them off the network:
//! JSON, optionally followed by binary tensor data. Nothing panics, and a
//! request that parses holds, for every input, exactly as many elements as
//! its shape says.
//!
//! The first two bytes (little-endian) are the `Inference-Header-Content-Length`
//! header, `0xffff` meaning no header; the rest is the body.
#![no_main]

// The runtime's own source file, see fuzz/Cargo.toml.
#[allow(dead_code)]
#[path = "../../runtime/src/v2.rs"]
mod v2;

use v2::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((header, body)) = data.split_first_chunk::<2>() else { return };
    let header_len = match u16::from_le_bytes(*header) {
        0xffff => None,
        n => Some(usize::from(n)),
    };
    if let Ok(request) = parse_request(body, header_len) {
        for input in &request.inputs {
            let elements = input.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            assert_eq!(
                elements,
                Some(input.data.len()),
                "input {:?} has shape {:?} but {} elements",
                input.name,
                input.shape,
                input.data.len()
            );
        }
    }
});
