//! A device reading a bundle: open with the fuzzing key, read every
//! payload, finish. Nothing may panic, and a payload that reads to its end
//! must have yielded exactly its declared size.
#![no_main]

use std::io::Read;

use basalt_bundle::archive::{peek, BundleReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peek(data);
    let Ok(mut reader) = BundleReader::open(data, basalt_fuzz::trust()) else { return };
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.next_payload() {
            Ok(Some(mut payload)) => {
                let declared = payload.info().size;
                let mut total = 0u64;
                loop {
                    match payload.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                    assert!(total <= declared, "yielded more than declared");
                }
                assert_eq!(total, declared, "ended short of the declared size");
            }
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let _ = reader.finish();
});
