//! Stage 1 (placeholder until its implementation lands).

/// Runs stage 1.
pub fn run() -> ! {
    fail("stage 1 is not implemented yet")
}

/// Prints one line on the console and reboots.
pub fn fail(msg: &str) -> ! {
    eprintln!("basalt-init: {msg}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
