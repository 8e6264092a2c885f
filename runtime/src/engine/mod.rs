//! The ONNX executor: loads a model once, then runs it on candle-core tensors on the CPU.
//!
//! Loading does all the work that does not depend on the request: the protobuf is parsed
//! once, weights become tensors once, nodes are sorted, constant subgraphs are evaluated,
//! BatchNormalization is folded into the Conv before it, every operator and its attributes
//! are checked, and the last use of each intermediate is recorded so [`Model::run`] drops
//! it as soon as nothing needs it. What this module does not own: model files, signatures
//! and the inference protocol.

mod kernels;
mod load;
mod math;
mod ops;
mod panels;
pub(crate) mod proto;
mod team;
#[cfg(test)]
mod testutil;
mod winograd;

use std::fmt;

use candle_core::{DType, Tensor};

use team::Team;

pub use ops::SUPPORTED_OPS;

/// Element type of a model input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DataType {
    /// 32-bit float (`FP32`).
    F32,
    /// 64-bit signed integer (`INT64`).
    I64,
}

impl DataType {
    /// The candle dtype that holds this type.
    pub fn dtype(self) -> DType {
        match self {
            DataType::F32 => DType::F32,
            DataType::I64 => DType::I64,
        }
    }

    /// The data type for a candle dtype, if the engine exchanges it.
    pub fn from_dtype(dtype: DType) -> Option<DataType> {
        match dtype {
            DType::F32 => Some(DataType::F32),
            DType::I64 => Some(DataType::I64),
            _ => None,
        }
    }
}

impl fmt::Display for DataType {
    /// The KServe V2 name: `FP32`, `INT64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataType::F32 => "FP32",
            DataType::I64 => "INT64",
        })
    }
}

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A size every request must have.
    Fixed(usize),
    /// A size chosen per request; the string is the model's name for it (may be empty).
    Dynamic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic(name) if name.is_empty() => f.write_str("?"),
            Dim::Dynamic(name) => f.write_str(name),
        }
    }
}

/// Name, element type and shape of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// The name requests use.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Shape, outermost dimension first.
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The bytes are not an ONNX protobuf.
    #[error("the model is not a valid ONNX protobuf ({0}); check that the file is complete")]
    Decode(String),
    /// The IR version is outside the supported range.
    #[error(
        "the model has ONNX IR version {found}; this runtime reads IR versions {min} to {max}: \
         export it again with a matching onnx version"
    )]
    IrVersion {
        /// The model's IR version.
        found: i64,
        /// Lowest supported.
        min: i64,
        /// Highest supported.
        max: i64,
    },
    /// The model imports no opset of the default domain.
    #[error("the model imports no opset of the default ONNX domain; export it with opset 7 to 21")]
    NoOpset,
    /// The default-domain opset is outside the supported range.
    #[error(
        "the model uses opset {found} of the default ONNX domain; this runtime supports opsets \
         {min} to {max}: export it again with an opset in that range"
    )]
    Opset {
        /// The model's opset.
        found: i64,
        /// Lowest supported.
        min: i64,
        /// Highest supported.
        max: i64,
    },
    /// A node uses an operator domain other than the default one.
    #[error(
        "node `{node}` uses operator domain `{domain}`; only the default ONNX domain is \
         supported: export the model without custom or contrib operators"
    )]
    UnsupportedDomain {
        /// The domain.
        domain: String,
        /// The node.
        node: String,
    },
    /// The model has no graph.
    #[error("the model has no graph; export it again")]
    NoGraph,
    /// A tensor keeps its data outside the model file.
    #[error(
        "tensor `{tensor}` keeps its data in an external file; save the model with its weights \
         inside (onnx.save_model(..., save_as_external_data=False))"
    )]
    ExternalData {
        /// The tensor.
        tensor: String,
    },
    /// A constant tensor has an element type the engine does not hold.
    #[error(
        "tensor `{tensor}` has element type {data_type}; this runtime reads FLOAT, DOUBLE, \
         INT64, INT32 and BOOL constants: convert the model's weights to one of those"
    )]
    UnsupportedTensorType {
        /// The tensor.
        tensor: String,
        /// ONNX name of its element type.
        data_type: &'static str,
    },
    /// A constant tensor's data does not match its shape or type.
    #[error("tensor `{tensor}` is malformed: {reason}; export the model again")]
    BadTensor {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A node uses an operator the engine does not implement.
    #[error(
        "node `{node}` uses operator `{op}`, which this runtime does not support; export the \
         model with supported operators (see basalt_runtime::engine::SUPPORTED_OPS)"
    )]
    UnsupportedOp {
        /// The operator.
        op: String,
        /// The node.
        node: String,
    },
    /// A node's attributes or input count are invalid or unsupported.
    #[error("node `{node}` ({op}): {reason}")]
    BadNode {
        /// The node.
        node: String,
        /// Its operator.
        op: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A node reads a value nothing defines.
    #[error(
        "node `{node}` reads `{input}`, which no node, graph input or initializer defines; \
         the graph is incomplete: export it again"
    )]
    UndefinedInput {
        /// The node.
        node: String,
        /// The missing value.
        input: String,
    },
    /// Two nodes (or a node and an input) define the same value.
    #[error(
        "value `{value}` is defined twice (again by node `{node}`); ONNX values are defined once"
    )]
    DuplicateValue {
        /// The value.
        value: String,
        /// The node that defines it again.
        node: String,
    },
    /// The graph has a cycle.
    #[error("node `{node}` is part of a cycle; an ONNX graph must be acyclic")]
    Cycle {
        /// A node on the cycle.
        node: String,
    },
    /// A graph input or output declaration cannot be served.
    #[error("graph {kind} `{name}`: {reason}")]
    BadSpec {
        /// `input` or `output`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Evaluating a node whose inputs are all constants failed.
    #[error("node `{node}` ({op}) failed on its constant inputs: {reason}; the model is invalid")]
    Fold {
        /// The node.
        node: String,
        /// Its operator.
        op: String,
        /// What failed.
        reason: String,
    },
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// An input is missing, unknown, or has the wrong type or shape.
    #[error("input `{input}`: {reason}")]
    BadInput {
        /// The input's name.
        input: String,
        /// What was expected.
        reason: String,
    },
    /// An operator failed on the values it got.
    #[error("node `{node}` ({op}) failed: {reason}")]
    Op {
        /// The node.
        node: String,
        /// Its operator.
        op: String,
        /// What failed.
        reason: String,
    },
}

/// What [`Model::profile`] returns.
#[derive(Debug)]
pub struct Profile {
    /// The graph outputs, as [`Model::run`] returns them.
    pub outputs: Vec<(String, Tensor)>,
    /// How long each node took, in the order the nodes ran.
    pub nodes: Vec<NodeTime>,
}

/// What [`Model::profile`] hands each node's step, output shape and time to.
type NodeObserver<'a> = dyn FnMut(&Step, &[usize], std::time::Duration) + 'a;

/// How long one node took in [`Model::profile`].
#[derive(Debug, Clone)]
pub struct NodeTime {
    /// The node's name (a fused node keeps the name of its first node).
    pub node: String,
    /// The operator as the engine runs it, after fusion (`Conv`, `WinogradConv`, ...).
    pub op: String,
    /// The shape of its first output.
    pub shape: Vec<usize>,
    /// Wall time of the node's evaluation.
    pub elapsed: std::time::Duration,
}

/// One node of the execution plan.
#[derive(Debug)]
struct Step {
    name: String,
    op_type: String,
    op: ops::Op,
    /// Value slots read; `None` for an omitted optional input.
    inputs: Vec<Option<usize>>,
    /// Value slots written; `None` for an omitted optional output.
    outputs: Vec<Option<usize>>,
    /// Slots whose last reader is this step: dropped right after it runs.
    free_after: Vec<usize>,
}

/// A loaded ONNX model, ready to run. `Send + Sync`: one model serves concurrent requests.
#[derive(Debug)]
pub struct Model {
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    input_slots: Vec<usize>,
    output_slots: Vec<usize>,
    slot_count: usize,
    constants: Vec<(usize, Tensor)>,
    steps: Vec<Step>,
}

impl Model {
    /// Parses and prepares an ONNX model held in memory.
    pub fn load(onnx: &[u8]) -> Result<Model, LoadError> {
        load::load(onnx)
    }

    /// The inputs a request must give, in the model's order.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// The outputs a run returns, in the model's order.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Number of nodes left to run after constant folding and fusion.
    pub fn node_count(&self) -> usize {
        self.steps.len()
    }

    /// Runs the graph; checks each input's name, dtype and shape against the spec first
    /// (RunError::BadInput with a message naming the input and what was expected).
    ///
    /// Returns every graph output, in the order of [`Model::outputs`].
    pub fn run(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>, RunError> {
        self.run_here(inputs, None)
    }

    /// Runs the graph as [`Model::run`] does and also returns how long each node took, in
    /// the order the nodes ran: where a model's time goes, node by node.
    pub fn profile(&self, inputs: &[(&str, Tensor)]) -> Result<Profile, RunError> {
        let mut times = Vec::with_capacity(self.steps.len());
        let outputs = self.run_here(
            inputs,
            Some(&mut |step, shape, elapsed| {
                times.push(NodeTime {
                    node: step.name.clone(),
                    op: step.op.label(),
                    shape: shape.to_vec(),
                    elapsed,
                })
            }),
        )?;
        Ok(Profile { outputs, nodes: times })
    }

    /// Runs the graph, timing each node for `observe` when it is given (a plain run
    /// reads no clock).
    fn run_here(
        &self,
        inputs: &[(&str, Tensor)],
        mut observe: Option<&mut NodeObserver<'_>>,
    ) -> Result<Vec<(String, Tensor)>, RunError> {
        // From the first loop large enough to split, the engine's workers spin for the
        // rest of the run, so each later loop is handed out in about a microsecond instead
        // of waking a sleeping thread (50-100 us on a small VM). A model with no such loop
        // does not wake them at all: its loops run on the calling thread.
        let _run = Team::current(Team::run);
        let mut slots: Vec<Option<Tensor>> = vec![None; self.slot_count];
        for (slot, tensor) in &self.constants {
            if let Some(s) = slots.get_mut(*slot) {
                *s = Some(tensor.clone());
            }
        }
        self.bind_inputs(inputs, &mut slots)?;
        for step in &self.steps {
            let args: Vec<Option<&Tensor>> = step
                .inputs
                .iter()
                .map(|i| i.and_then(|i| slots.get(i).and_then(|t| t.as_ref())))
                .collect();
            let op_err = |reason: String| RunError::Op {
                node: step.name.clone(),
                op: step.op_type.clone(),
                reason,
            };
            if step.inputs.iter().zip(&args).any(|(i, a)| i.is_some() && a.is_none()) {
                return Err(op_err("an input value was released too early".into()));
            }
            let started = observe.is_some().then(std::time::Instant::now);
            let results = ops::eval(&step.op, &args).map_err(|e| op_err(e.0))?;
            if let (Some(observe), Some(started)) = (observe.as_mut(), started) {
                observe(step, results.first().map_or(&[], |t| t.dims()), started.elapsed());
            }
            let mut results = results.into_iter();
            for out in &step.outputs {
                let value = results.next();
                if let Some(slot) = out {
                    let value = value.ok_or_else(|| op_err("produced too few outputs".into()))?;
                    if let Some(s) = slots.get_mut(*slot) {
                        *s = Some(value);
                    }
                }
            }
            for slot in &step.free_after {
                if let Some(s) = slots.get_mut(*slot) {
                    *s = None;
                }
            }
        }
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for (spec, slot) in self.outputs.iter().zip(&self.output_slots) {
            let value = slots.get(*slot).and_then(|t| t.clone()).ok_or_else(|| RunError::Op {
                node: spec.name.clone(),
                op: "output".into(),
                reason: "the graph did not produce this output".into(),
            })?;
            outputs.push((spec.name.clone(), value));
        }
        Ok(outputs)
    }

    fn bind_inputs(
        &self,
        inputs: &[(&str, Tensor)],
        slots: &mut [Option<Tensor>],
    ) -> Result<(), RunError> {
        let bad = |input: &str, reason: String| RunError::BadInput { input: input.into(), reason };
        for (name, tensor) in inputs {
            let Some(index) = self.inputs.iter().position(|s| s.name == *name) else {
                let names: Vec<&str> = self.inputs.iter().map(|s| s.name.as_str()).collect();
                return Err(bad(
                    name,
                    format!("the model has no such input; its inputs are {names:?}"),
                ));
            };
            let (spec, slot) = match (self.inputs.get(index), self.input_slots.get(index)) {
                (Some(spec), Some(slot)) => (spec, *slot),
                _ => return Err(bad(name, "the model has no such input".into())),
            };
            if inputs.iter().filter(|(n, _)| n == name).count() > 1 {
                return Err(bad(name, "given more than once; give each input once".into()));
            }
            if !tensor.device().is_cpu() {
                return Err(bad(name, "the tensor must be on the CPU".into()));
            }
            if tensor.dtype() != spec.datatype.dtype() {
                let got = DataType::from_dtype(tensor.dtype())
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| format!("{:?}", tensor.dtype()));
                return Err(bad(name, format!("expected datatype {}, got {got}", spec.datatype)));
            }
            let dims = tensor.dims();
            let shape_ok = dims.len() == spec.shape.len()
                && dims.iter().zip(&spec.shape).all(|(d, s)| match s {
                    Dim::Fixed(n) => d == n,
                    Dim::Dynamic(_) => true,
                });
            if !shape_ok {
                return Err(bad(
                    name,
                    format!("expected shape {}, got {:?}", spec.shape_text(), dims),
                ));
            }
            if let Some(s) = slots.get_mut(slot) {
                *s = Some(tensor.clone());
            }
        }
        for spec in &self.inputs {
            if !inputs.iter().any(|(n, _)| *n == spec.name) {
                return Err(bad(
                    &spec.name,
                    format!(
                        "missing; the model needs it as {} with shape {}",
                        spec.datatype,
                        spec.shape_text()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn model_is_send_and_sync() {
        assert_send_sync::<Model>();
    }

    #[test]
    fn datatype_display_uses_kserve_names() {
        assert_eq!(DataType::F32.to_string(), "FP32");
        assert_eq!(DataType::I64.to_string(), "INT64");
    }
}
