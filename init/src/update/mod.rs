//! The update side of the device: installing a signed OS bundle into the
//! inactive slot so that the bootloader tries it once, and nothing else.
//!
//! This code runs in the update agent, a service PID 1 supervises, never in
//! PID 1 itself: it parses bundles that come from the network.

pub mod agent;
pub mod api;
pub mod cut;
pub mod device;
pub mod install;
pub mod models;
pub mod pull;
pub mod run;
pub mod state;
#[cfg(test)]
pub mod testing;
