//! Stage 2 (placeholder until its implementation lands).

/// Runs stage 2.
pub fn run() -> ! {
    crate::stage1::fail("stage 2 is not implemented yet")
}
