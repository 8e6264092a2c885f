//! The only place in basalt-init that calls `nix` or `libc`.
//!
//! Everything above this module takes paths, file descriptors and clocks as
//! arguments, so it can be tested on a host without root.

pub mod block;
pub mod console;
pub mod dm;
pub mod kmod;
pub mod mount;
pub mod net;
pub mod process;
pub mod reboot;
pub mod signal;
pub mod watchdog;
