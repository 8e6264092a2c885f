//! basalt-runtime: the model server of a basalt gateway.
//!
//! Not built yet: the engine, the model store and the Open Inference
//! Protocol server arrive with their own issue. The crate exists so the
//! workspace has its final shape.
#![deny(missing_docs)]
