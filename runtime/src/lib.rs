//! basalt-runtime: the model server of a basalt gateway.
//!
//! [`engine`] loads ONNX models and runs them on the CPU, on candle-core.
//! [`store`] reads signed model bundles and runs each model's test vector
//! before it serves; [`repository`] decides which version of each model
//! serves, switches to new ones and rolls them back; [`monitor`] keeps
//! the statistics of what the models see; [`backend`] connects the engine
//! to the server.
//! [`server`] speaks the Open Inference Protocol (KServe V2) over HTTP,
//! [`v2`] its wire format (JSON and binary tensors), [`metrics`] the
//! Prometheus metrics. [`alloc`] is the binary's allocator, which keeps
//! freed large buffers for the next inference.
#![deny(missing_docs)]

pub mod alloc;
pub mod backend;
pub mod engine;
pub mod metrics;
pub mod monitor;
pub mod repository;
pub mod server;
pub mod store;
pub mod v2;
