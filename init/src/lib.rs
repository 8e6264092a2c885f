//! basalt-init: PID 1 of every basalt image, and the small programs the
//! image runs beside it.
//!
//! Stage 1 ([`stage1`]) runs from the initramfs: it loads the board's
//! modules, finds the slot's root partition, sets up dm-verity, mounts the
//! root and the data partition, and switches root. Stage 2 ([`stage2`]) is
//! the same binary as `/sbin/init` of the root filesystem: it mounts the
//! API filesystems, sets up the network, supervises the services
//! ([`supervisor`]) and blesses the boot once they are healthy
//! ([`assess`]).
//!
//! With `network.mode = "dhcp"`, the DHCP client ([`dhcp`]) runs as a
//! supervised service (`basalt-init dhcp IFACE`), never inside PID 1.
//!
//! The update agent fetches channel files and bundles over HTTP with
//! [`fetch`], on a tokio current-thread runtime of its own; no HTTP runs
//! in PID 1.
//!
//! Every call into the kernel goes through [`platform`], so the rest runs in
//! host tests against a temp dir.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod assess;
pub mod backend;
pub mod dhcp;
pub mod fetch;
pub mod health;
pub mod network;
pub mod pending_try;
pub mod platform;
pub mod stage1;
pub mod stage2;
pub mod supervisor;
pub mod tryboot;
pub mod uboot;
pub mod update;
