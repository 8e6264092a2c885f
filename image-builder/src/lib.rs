//! The basalt host tool: a recipe and a board in, a flashable A/B disk
//! image out.
//!
//! The build runs in two steps, as ripgrep and mkosi do: [`recipe`] and
//! [`board`] read the user's TOML into plain structs, and [`plan`] resolves
//! them into one [`plan::Plan`] (inputs read and hashed, sizes computed),
//! which [`build`] turns into artifacts. Each on-disk format is a module of
//! its own, judged in tests by the real tool that reads it.
#![deny(missing_docs)]

pub mod bmap;
pub mod board;
pub mod build;
pub use basalt_bundle::civil;
pub mod cpio;
pub mod diag;
pub mod digest;
pub mod duration;
pub mod ext4;
pub mod fat;
pub mod gpt;
pub mod inspect;
pub mod kernel;
pub mod kimage;
pub mod ota;
pub mod plan;
pub mod qemu;
pub mod recipe;
pub mod reference;
pub mod rpi;
pub mod sbom;
pub mod serve;
pub mod squashfs;
pub mod tree;
pub mod uboot;
pub mod verity;
