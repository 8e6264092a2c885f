//! Formats that the basalt host tool and the device both read.
//!
//! This crate owns every byte layout that crosses from the build host to a
//! device: partition labels and type GUIDs, slot names, the names of boot
//! entries with their try counters, and the configuration files the builder
//! writes into an image for `basalt-init` to read. It also owns the signing
//! keys of update bundles (ed25519, in the PEM formats OpenSSL uses), their
//! key ids, and `manifest.sig`, the signatures over a bundle's manifest with
//! the threshold check a device runs before it trusts a bundle.
//!
//! OTA updates live here too: [`manifest`] (what a bundle holds),
//! [`archive`] (the `*.basalt` tar stream, its writer and the device's
//! streaming, verifying reader) and [`channel`] (the signed metadata of an
//! update repository, with expiry and staged rollout). [`model`] is the
//! `model.toml` of model bundles, with its test vector. [`civil`] converts
//! the dates these formats carry. [`tryboot`] is the Raspberry Pi's
//! `autoboot.txt` and the files basalt keeps in each slot's boot partition.
//! [`uboot`] is the U-Boot environment's block format and basalt's
//! variables in it.
//!
//! It does no I/O beyond reading and writing the streams it is given (no
//! network; files only in [`model::install`], the installed-model layout
//! that the update agent writes and the runtime reads), and holds no policy: the builder decides what to
//! write and sign, the device decides which keys it trusts, which versions
//! and boards it accepts, and what to do with a bundle.
#![deny(missing_docs)]

pub mod archive;
pub mod channel;
pub mod civil;
pub mod config;
pub mod entry;
pub mod guid;
pub mod keys;
pub mod layout;
pub mod manifest;
pub mod model;
pub mod signature;
pub mod slot;
pub mod tryboot;
pub mod uboot;

pub use archive::{BundleError, BundleReader, Payload};
pub use channel::{Channel, ChannelError};
pub use config::{ImageConfig, SlotConfig};
pub use entry::{BootEntryName, EntryConf, EntryState, TriesCounter};
pub use guid::Guid;
pub use manifest::{BundleKind, Compression, Manifest, ManifestError, PayloadInfo};
pub use signature::Trust;
pub use slot::Slot;
