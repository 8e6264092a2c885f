//! Health checks (placeholder until its implementation lands).

/// The `health-http` applet.
pub fn main(_args: &[String]) -> u8 {
    2
}
