//! From protobuf bytes to an execution plan: decode, convert weights, sort, fold, plan.

use std::collections::{HashMap, HashSet, VecDeque};

use candle_core::{Device, Tensor};
use prost::Message;

use super::kernels::{self, Activation};
use super::ops::{self, BinOp, Op, OpError, UnOp};
use super::proto::{data_type, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use super::winograd;
use super::{DataType, Dim, LoadError, Model, Step, TensorSpec};

/// IR versions read: 3 (ONNX 1.0 with opsets) to 11 (ONNX 1.18).
const IR_VERSIONS: (i64, i64) = (3, 11);
/// Default-domain opsets whose operator semantics the engine follows.
const OPSETS: (i64, i64) = (7, 21);
/// Largest constant accepted, in elements (1 GiB of f32), so a malformed size fails cleanly.
pub(crate) const MAX_ELEMENTS: usize = 1 << 28;

/// Converts a `TensorProto` into a candle tensor: f32, i64, or u8 for booleans.
///
/// DOUBLE becomes f32 and INT32 becomes i64: the engine computes in those types.
pub(crate) fn tensor_from_proto(t: &TensorProto) -> Result<Tensor, LoadError> {
    let name = if t.name.is_empty() { "<unnamed>".to_string() } else { t.name.clone() };
    let bad = |reason: String| LoadError::BadTensor { tensor: name.clone(), reason };
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err(LoadError::ExternalData { tensor: name.clone() });
    }
    let mut dims = Vec::with_capacity(t.dims.len());
    let mut count: usize = 1;
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| bad(format!("negative dimension {d}")))?;
        count = count.checked_mul(d).filter(|c| *c <= MAX_ELEMENTS).ok_or_else(|| {
            bad(format!("shape {:?} has more than {MAX_ELEMENTS} elements", t.dims))
        })?;
        dims.push(d);
    }
    let raw = &t.raw_data;
    let check_len = |len: usize, what: &str| {
        if len == count {
            Ok(())
        } else {
            Err(bad(format!(
                "{what} holds {len} elements but the shape {:?} needs {count}",
                t.dims
            )))
        }
    };
    let dev = &Device::Cpu;
    // The raw bytes, once their length is checked; `None` when the typed field holds the data.
    let from_raw = |width: usize| -> Result<Option<&[u8]>, LoadError> {
        if raw.is_empty() && count > 0 {
            return Ok(None);
        }
        if raw.len() != count * width {
            return Err(bad(format!(
                "raw_data has {} bytes but the shape {:?} needs {}",
                raw.len(),
                t.dims,
                count * width
            )));
        }
        Ok(Some(raw))
    };
    fn le<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        raw.chunks_exact(N).map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            b
        })
    }
    let tensor = match t.data_type {
        data_type::FLOAT => {
            let data: Vec<f32> = match from_raw(4)? {
                Some(raw) => le::<4>(raw).map(f32::from_le_bytes).collect(),
                None => {
                    check_len(t.float_data.len(), "float_data")?;
                    t.float_data.clone()
                }
            };
            Tensor::from_vec(data, dims, dev)
        }
        data_type::DOUBLE => {
            let data: Vec<f32> = match from_raw(8)? {
                Some(raw) => le::<8>(raw).map(|b| f64::from_le_bytes(b) as f32).collect(),
                None => {
                    check_len(t.double_data.len(), "double_data")?;
                    t.double_data.iter().map(|&v| v as f32).collect()
                }
            };
            Tensor::from_vec(data, dims, dev)
        }
        data_type::INT64 => {
            let data: Vec<i64> = match from_raw(8)? {
                Some(raw) => le::<8>(raw).map(i64::from_le_bytes).collect(),
                None => {
                    check_len(t.int64_data.len(), "int64_data")?;
                    t.int64_data.clone()
                }
            };
            Tensor::from_vec(data, dims, dev)
        }
        data_type::INT32 => {
            let data: Vec<i64> = match from_raw(4)? {
                Some(raw) => le::<4>(raw).map(|b| i64::from(i32::from_le_bytes(b))).collect(),
                None => {
                    check_len(t.int32_data.len(), "int32_data")?;
                    t.int32_data.iter().map(|&v| i64::from(v)).collect()
                }
            };
            Tensor::from_vec(data, dims, dev)
        }
        data_type::BOOL => {
            let data: Vec<u8> = match from_raw(1)? {
                Some(raw) => raw.iter().map(|&b| u8::from(b != 0)).collect(),
                None => {
                    check_len(t.int32_data.len(), "int32_data")?;
                    t.int32_data.iter().map(|&v| u8::from(v != 0)).collect()
                }
            };
            Tensor::from_vec(data, dims, dev)
        }
        other => {
            return Err(LoadError::UnsupportedTensorType {
                tensor: name.clone(),
                data_type: data_type::name(other),
            })
        }
    };
    tensor.map_err(|e| bad(e.to_string()))
}

fn spec_of(info: &ValueInfoProto, kind: &'static str) -> Result<TensorSpec, LoadError> {
    let bad = |reason: String| LoadError::BadSpec { kind, name: info.name.clone(), reason };
    let tensor_type =
        info.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).ok_or_else(|| {
            bad("is not declared as a tensor; only tensor values are served".into())
        })?;
    let datatype = match tensor_type.elem_type {
        data_type::FLOAT => DataType::F32,
        data_type::INT64 => DataType::I64,
        other => {
            return Err(bad(format!(
                "has element type {}; this runtime serves FLOAT and INT64 tensors: add a Cast",
                data_type::name(other)
            )))
        }
    };
    let shape = tensor_type
        .shape
        .as_ref()
        .ok_or_else(|| bad("declares no shape; export the model with its shapes".into()))?;
    let mut dims = Vec::with_capacity(shape.dim.len());
    for d in &shape.dim {
        dims.push(match (&d.dim_value, &d.dim_param) {
            (Some(v), _) => Dim::Fixed(
                usize::try_from(*v).map_err(|_| bad(format!("has negative dimension {v}")))?,
            ),
            (None, Some(p)) => Dim::Dynamic(p.clone()),
            (None, None) => Dim::Dynamic(String::new()),
        });
    }
    Ok(TensorSpec { name: info.name.clone(), datatype, shape: dims })
}

fn node_name(node: &NodeProto, index: usize) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(out) = node.output.first().filter(|o| !o.is_empty()) {
        format!("{} (output `{out}`)", node.op_type)
    } else {
        format!("#{index} {}", node.op_type)
    }
}

/// A node during planning, with value names still as strings.
struct Pending {
    name: String,
    op_type: String,
    op: Op,
    inputs: Vec<Option<String>>,
    outputs: Vec<Option<String>>,
}

pub(crate) fn load(bytes: &[u8]) -> Result<Model, LoadError> {
    // Decoding from `Bytes` lets every raw_data field borrow the one buffer.
    let buffer = bytes::Bytes::copy_from_slice(bytes);
    let model = ModelProto::decode(buffer).map_err(|e| LoadError::Decode(e.to_string()))?;
    if model.ir_version < IR_VERSIONS.0 || model.ir_version > IR_VERSIONS.1 {
        return Err(LoadError::IrVersion {
            found: model.ir_version,
            min: IR_VERSIONS.0,
            max: IR_VERSIONS.1,
        });
    }
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .ok_or(LoadError::NoOpset)?;
    if opset < OPSETS.0 || opset > OPSETS.1 {
        return Err(LoadError::Opset { found: opset, min: OPSETS.0, max: OPSETS.1 });
    }
    let graph = model.graph.as_ref().ok_or(LoadError::NoGraph)?;
    plan(graph, opset)
}

fn plan(graph: &GraphProto, opset: i64) -> Result<Model, LoadError> {
    // Constants by name: initializers first, then whatever folding produces.
    let mut constants: HashMap<String, Tensor> = HashMap::new();
    for init in &graph.initializer {
        constants.insert(init.name.clone(), tensor_from_proto(init)?);
    }
    // Inputs that are also initializers are overridable defaults in ONNX; served models
    // keep their weights, so those stay constants.
    let mut inputs = Vec::new();
    let mut defined: HashSet<String> = constants.keys().cloned().collect();
    for info in &graph.input {
        if constants.contains_key(&info.name) {
            continue;
        }
        if !defined.insert(info.name.clone()) {
            return Err(LoadError::DuplicateValue {
                value: info.name.clone(),
                node: "graph input".into(),
            });
        }
        inputs.push(spec_of(info, "input")?);
    }

    let mut pending = Vec::with_capacity(graph.node.len());
    for (index, node) in graph.node.iter().enumerate() {
        let name = node_name(node, index);
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(LoadError::UnsupportedDomain { domain: node.domain.clone(), node: name });
        }
        let op = ops::parse(node, opset, &name)?;
        let opt = |s: &String| if s.is_empty() { None } else { Some(s.clone()) };
        pending.push(Pending {
            name,
            op_type: node.op_type.clone(),
            op,
            inputs: node.input.iter().map(opt).collect(),
            outputs: node.output.iter().map(opt).collect(),
        });
    }

    let order = topo_order(&pending, &defined)?;
    let mut sorted: Vec<Pending> = Vec::with_capacity(pending.len());
    let mut slots: Vec<Option<Pending>> = pending.into_iter().map(Some).collect();
    for i in order {
        if let Some(p) = slots.get_mut(i).and_then(Option::take) {
            sorted.push(p);
        }
    }

    let graph_outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut nodes = fold_constants(sorted, &mut constants)?;
    nodes = fold_batch_norms(nodes, &mut constants, &graph_outputs)?;
    nodes = fuse_residual_adds(nodes, &graph_outputs);
    nodes = fuse_activations(nodes, &constants, &graph_outputs);
    nodes = drop_dead(nodes, &graph_outputs);
    prepare_conv_weights(&mut nodes, &mut constants, &graph_outputs)?;

    // Value slots: inputs, then constants still read, then node outputs.
    let mut slot_of: HashMap<String, usize> = HashMap::new();
    let slot = |name: &str, map: &mut HashMap<String, usize>| -> usize {
        let next = map.len();
        *map.entry(name.to_string()).or_insert(next)
    };
    let input_slots: Vec<usize> = inputs.iter().map(|s| slot(&s.name, &mut slot_of)).collect();
    let mut used: HashSet<&str> = graph_outputs.iter().copied().collect();
    for n in &nodes {
        used.extend(n.inputs.iter().flatten().map(String::as_str));
    }
    let mut kept_constants = Vec::new();
    let mut constant_names: Vec<&String> = constants.keys().collect();
    constant_names.sort();
    for name in constant_names {
        if used.contains(name.as_str()) && !slot_of.contains_key(name) {
            let s = slot(name, &mut slot_of);
            if let Some(t) = constants.get(name) {
                kept_constants.push((s, t.clone()));
            }
        }
    }
    let mut outputs = Vec::with_capacity(graph.output.len());
    let mut output_slots = Vec::with_capacity(graph.output.len());
    let produced: HashSet<&str> =
        nodes.iter().flat_map(|n| n.outputs.iter().flatten().map(String::as_str)).collect();
    for info in &graph.output {
        let spec = spec_of(info, "output")?;
        if !slot_of.contains_key(&info.name) && !produced.contains(info.name.as_str()) {
            return Err(LoadError::BadSpec {
                kind: "output",
                name: info.name.clone(),
                reason: "no node, input or initializer defines it; export the model again".into(),
            });
        }
        outputs.push(spec);
        output_slots.push(slot(&info.name, &mut slot_of));
    }

    let mut steps = Vec::with_capacity(nodes.len());
    for n in nodes {
        let inputs = n.inputs.iter().map(|i| i.as_ref().map(|i| slot(i, &mut slot_of))).collect();
        let outputs = n.outputs.iter().map(|o| o.as_ref().map(|o| slot(o, &mut slot_of))).collect();
        steps.push(Step {
            name: n.name,
            op_type: n.op_type,
            op: n.op,
            inputs,
            outputs,
            free_after: Vec::new(),
        });
    }
    plan_lifetimes(&mut steps, &input_slots, &kept_constants, &output_slots);

    Ok(Model {
        inputs,
        outputs,
        input_slots,
        output_slots,
        slot_count: slot_of.len(),
        constants: kept_constants,
        steps,
    })
}

/// Kahn's algorithm; errors name the node with an undefined input or on a cycle.
fn topo_order(nodes: &[Pending], defined: &HashSet<String>) -> Result<Vec<usize>, LoadError> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for out in n.outputs.iter().flatten() {
            if defined.contains(out) || producer.insert(out.as_str(), i).is_some() {
                return Err(LoadError::DuplicateValue { value: out.clone(), node: n.name.clone() });
            }
        }
    }
    let mut waiting = vec![0usize; nodes.len()];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for input in n.inputs.iter().flatten() {
            if let Some(&p) = producer.get(input.as_str()) {
                if let (Some(w), Some(r)) = (waiting.get_mut(i), readers.get_mut(p)) {
                    *w += 1;
                    r.push(i);
                }
            } else if !defined.contains(input) {
                return Err(LoadError::UndefinedInput {
                    node: n.name.clone(),
                    input: input.clone(),
                });
            }
        }
    }
    let mut ready: VecDeque<usize> =
        waiting.iter().enumerate().filter(|(_, w)| **w == 0).map(|(i, _)| i).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &r in readers.get(i).map(Vec::as_slice).unwrap_or_default() {
            if let Some(w) = waiting.get_mut(r) {
                *w -= 1;
                if *w == 0 {
                    ready.push_back(r);
                }
            }
        }
    }
    if order.len() < nodes.len() {
        let stuck = waiting.iter().position(|w| *w > 0).and_then(|i| nodes.get(i));
        return Err(LoadError::Cycle { node: stuck.map(|n| n.name.clone()).unwrap_or_default() });
    }
    Ok(order)
}

/// Evaluates, in order, every node whose inputs are all constants.
fn fold_constants(
    nodes: Vec<Pending>,
    constants: &mut HashMap<String, Tensor>,
) -> Result<Vec<Pending>, LoadError> {
    let mut kept = Vec::with_capacity(nodes.len());
    for n in nodes {
        let all_const = n.inputs.iter().flatten().all(|i| constants.contains_key(i));
        if !all_const {
            kept.push(n);
            continue;
        }
        let args: Vec<Option<&Tensor>> =
            n.inputs.iter().map(|i| i.as_ref().and_then(|i| constants.get(i))).collect();
        let fold_err = |reason: String| LoadError::Fold {
            node: n.name.clone(),
            op: n.op_type.clone(),
            reason,
        };
        let results = ops::eval(&n.op, &args).map_err(|e| fold_err(e.0))?;
        let mut results = results.into_iter();
        for out in &n.outputs {
            let value = results.next();
            if let Some(name) = out {
                let value = value.ok_or_else(|| fold_err("produced too few outputs".into()))?;
                constants.insert(name.clone(), value);
            }
        }
    }
    Ok(kept)
}

/// Folds `BatchNormalization(Conv(x, W, b))` into `Conv(x, W', b')` when the Conv's output
/// feeds nothing else and all parameters are constants.
fn fold_batch_norms(
    nodes: Vec<Pending>,
    constants: &mut HashMap<String, Tensor>,
    graph_outputs: &[&str],
) -> Result<Vec<Pending>, LoadError> {
    let readers = reader_counts(&nodes);
    let mut producer: HashMap<String, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in n.outputs.iter().flatten() {
            producer.insert(o.clone(), i);
        }
    }
    let names: HashSet<String> =
        nodes.iter().flat_map(|n| n.inputs.iter().chain(&n.outputs).flatten().cloned()).collect();
    let mut nodes: Vec<Option<Pending>> = nodes.into_iter().map(Some).collect();
    for bn_index in 0..nodes.len() {
        let Some(Some(bn)) = nodes.get(bn_index) else { continue };
        let Op::BatchNorm { epsilon } = bn.op else { continue };
        let Some(Some(x)) = bn.inputs.first() else { continue };
        let Some(&conv_index) = producer.get(x) else { continue };
        if readers.get(x.as_str()).copied() != Some(1) || graph_outputs.contains(&x.as_str()) {
            continue;
        }
        let Some(Some(conv)) = nodes.get(conv_index) else { continue };
        if !matches!(conv.op, Op::Conv(_)) || conv.outputs.len() != 1 {
            continue;
        }
        let param = |k: usize| bn.inputs.get(k).cloned().flatten().and_then(|n| constants.get(&n));
        let (Some(scale), Some(bias), Some(mean), Some(var)) =
            (param(1), param(2), param(3), param(4))
        else {
            continue;
        };
        let Some(Some(w_name)) = conv.inputs.get(1) else { continue };
        let Some(w) = constants.get(w_name) else { continue };
        let conv_bias = match conv.inputs.get(2) {
            Some(Some(b)) => match constants.get(b) {
                Some(b) => Some(b),
                None => continue,
            },
            _ => None,
        };
        let folded = ops::fold_bn_into_conv(w, conv_bias, scale, bias, mean, var, epsilon);
        let (new_w, new_b) = match folded {
            Ok(v) => v,
            Err(e) => {
                return Err(LoadError::Fold {
                    node: bn.name.clone(),
                    op: "BatchNormalization".into(),
                    reason: e.0,
                })
            }
        };
        let bn_out = bn.outputs.first().cloned().flatten();
        // Fresh names: one weight may feed several Convs, each with its own BatchNorm.
        let fresh = |base: String| {
            let mut name = base;
            while constants.contains_key(&name) || names.contains(&name) {
                name.push('_');
            }
            name
        };
        let w_key = fresh(format!("{w_name}::bn_folded"));
        let b_key = fresh(format!("{w_name}::bn_folded_bias"));
        constants.insert(w_key.clone(), new_w);
        constants.insert(b_key.clone(), new_b);
        if let Some(Some(conv)) = nodes.get_mut(conv_index) {
            conv.inputs.truncate(1);
            conv.inputs.push(Some(w_key));
            conv.inputs.push(Some(b_key));
            conv.outputs = vec![bn_out];
        }
        if let Some(slot) = nodes.get_mut(bn_index) {
            *slot = None;
        }
    }
    Ok(nodes.into_iter().flatten().collect())
}

/// The activation a node computes, if it can run inside a Conv's output pass.
fn activation_of(node: &Pending, constants: &HashMap<String, Tensor>) -> Option<Activation> {
    let bound = |i: usize| -> Option<Option<f32>> {
        match node.inputs.get(i) {
            None | Some(None) => Some(None),
            Some(Some(name)) => {
                let t = constants.get(name)?;
                let v: Vec<f32> =
                    t.to_dtype(candle_core::DType::F32).ok()?.flatten_all().ok()?.to_vec1().ok()?;
                match v.as_slice() {
                    [v] => Some(Some(*v)),
                    _ => None,
                }
            }
        }
    };
    match &node.op {
        Op::Unary(UnOp::Relu) => Some(Activation::Relu),
        Op::HardSwish => Some(Activation::HardSwish),
        Op::HardSigmoid { alpha, beta } => {
            Some(Activation::HardSigmoid { alpha: *alpha, beta: *beta })
        }
        Op::Clip { min, max } => {
            let lo = bound(1)?.or(*min).unwrap_or(f32::NEG_INFINITY);
            let hi = bound(2)?.or(*max).unwrap_or(f32::INFINITY);
            Some(Activation::Clip { min: lo, max: hi })
        }
        _ => None,
    }
}

/// Fuses `Act(Conv(..))` into the Conv when the Conv's output feeds only the activation.
fn fuse_activations(
    nodes: Vec<Pending>,
    constants: &HashMap<String, Tensor>,
    graph_outputs: &[&str],
) -> Vec<Pending> {
    let readers = reader_counts(&nodes);
    let producer = producers(&nodes);
    let mut nodes: Vec<Option<Pending>> = nodes.into_iter().map(Some).collect();
    for act_index in 0..nodes.len() {
        let Some(Some(act_node)) = nodes.get(act_index) else { continue };
        let Some(act) = activation_of(act_node, constants) else { continue };
        let Some(Some(x)) = act_node.inputs.first() else { continue };
        let Some(&conv_index) = producer.get(x) else { continue };
        if readers.get(x.as_str()).copied() != Some(1) || graph_outputs.contains(&x.as_str()) {
            continue;
        }
        let out = act_node.outputs.first().cloned().flatten();
        let Some(Some(conv)) = nodes.get_mut(conv_index) else { continue };
        let Op::Conv(attrs) = &mut conv.op else { continue };
        if attrs.activation.is_some() {
            continue;
        }
        attrs.activation = Some(act);
        conv.outputs = vec![out];
        if let Some(slot) = nodes.get_mut(act_index) {
            *slot = None;
        }
    }
    nodes.into_iter().flatten().collect()
}

/// Fuses `Add(Conv(..), r)` (either operand order) into the Conv, as its fourth input, when
/// the Conv's output feeds only the Add and `r` is ready before the Conv runs: the Conv adds
/// `r` in its output pass, before an activation that [`fuse_activations`] then fuses too
/// (a ResNet block's `Relu(Add(Conv(..), shortcut))` becomes one node). The shapes are
/// checked when it runs; an `r` the Add would broadcast is added as the Add would (see
/// `ops::conv_with_residual`).
fn fuse_residual_adds(nodes: Vec<Pending>, graph_outputs: &[&str]) -> Vec<Pending> {
    let readers = reader_counts(&nodes);
    let producer = producers(&nodes);
    let mut nodes: Vec<Option<Pending>> = nodes.into_iter().map(Some).collect();
    for add_index in 0..nodes.len() {
        let Some(Some(add)) = nodes.get(add_index) else { continue };
        let (Op::Binary(BinOp::Add), [Some(a), Some(b)]) = (&add.op, add.inputs.as_slice()) else {
            continue;
        };
        let fusable = |conv_out: &String, other: &String| -> Option<usize> {
            let &conv_index = producer.get(conv_out)?;
            let Some(Some(conv)) = nodes.get(conv_index) else { return None };
            let Op::Conv(attrs) = &conv.op else { return None };
            let ready = producer.get(other).is_none_or(|&p| p < conv_index);
            (attrs.activation.is_none()
                && conv.inputs.len() <= 3
                && readers.get(conv_out.as_str()) == Some(&1)
                && !graph_outputs.contains(&conv_out.as_str())
                && ready)
                .then_some(conv_index)
        };
        let Some((conv_index, residual)) =
            fusable(a, b).map(|i| (i, b.clone())).or_else(|| fusable(b, a).map(|i| (i, a.clone())))
        else {
            continue;
        };
        let out = add.outputs.first().cloned().flatten();
        let Some(Some(conv)) = nodes.get_mut(conv_index) else { continue };
        conv.inputs.resize(3, None);
        conv.inputs.push(Some(residual));
        conv.outputs = vec![out];
        if let Some(slot) = nodes.get_mut(add_index) {
            *slot = None;
        }
    }
    nodes.into_iter().flatten().collect()
}

/// The index of the node that produces each value.
fn producers(nodes: &[Pending]) -> HashMap<String, usize> {
    let mut producer = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in n.outputs.iter().flatten() {
            producer.insert(o.clone(), i);
        }
    }
    producer
}

/// How many node inputs read each value.
fn reader_counts(nodes: &[Pending]) -> HashMap<String, usize> {
    let mut readers: HashMap<String, usize> = HashMap::new();
    for n in nodes {
        for i in n.inputs.iter().flatten() {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    readers
}

/// Lays out the weights of each Conv whose weight is a constant only it reads, once, for
/// the kernel that will run it (so the model holds one copy of those weights, not two):
/// the ones [`winograd::eligible`] accepts become [`Op::WinogradConv`] with transformed
/// weights, the others (but depthwise) [`Op::PackedConv`] with weights in panels.
fn prepare_conv_weights(
    nodes: &mut [Pending],
    constants: &mut HashMap<String, Tensor>,
    graph_outputs: &[&str],
) -> Result<(), LoadError> {
    let readers = reader_counts(nodes);
    let mut chosen = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let Op::Conv(_) = &n.op else { continue };
        let Some(Some(w_name)) = n.inputs.get(1) else { continue };
        if readers.get(w_name.as_str()) == Some(&1)
            && !graph_outputs.contains(&w_name.as_str())
            && constants.get(w_name).is_some_and(|w| w.dtype() == candle_core::DType::F32)
        {
            chosen.push(i);
        }
    }
    for i in chosen {
        let Some(n) = nodes.get_mut(i) else { continue };
        let (Op::Conv(attrs), Some(Some(w_name))) = (&n.op, n.inputs.get(1)) else { continue };
        let Some(w) = constants.get(w_name) else { continue };
        let fold_err = |e: OpError| LoadError::Fold {
            node: n.name.clone(),
            op: n.op_type.clone(),
            reason: e.0,
        };
        let (op, weight) = if winograd::eligible(attrs, w.dims()) {
            (Op::WinogradConv(attrs.clone()), winograd::transform_weights(w).map_err(fold_err)?)
        } else {
            match kernels::pack_weights(w, attrs).map_err(fold_err)? {
                Some(packed) => (Op::PackedConv(attrs.clone()), packed),
                None => continue,
            }
        };
        constants.insert(w_name.clone(), weight);
        n.op = op;
    }
    Ok(())
}

/// Removes nodes none of whose outputs is read (after folding some may feed nothing).
fn drop_dead(nodes: Vec<Pending>, graph_outputs: &[&str]) -> Vec<Pending> {
    let mut needed: HashSet<String> = graph_outputs.iter().map(|s| s.to_string()).collect();
    let mut keep = vec![false; nodes.len()];
    for (i, n) in nodes.iter().enumerate().rev() {
        if n.outputs.iter().flatten().any(|o| needed.contains(o)) {
            if let Some(k) = keep.get_mut(i) {
                *k = true;
            }
            needed.extend(n.inputs.iter().flatten().cloned());
        }
    }
    nodes.into_iter().zip(keep).filter(|(_, k)| *k).map(|(n, _)| n).collect()
}

/// Records, for each slot a step reads or writes, the step after which nothing needs it.
fn plan_lifetimes(
    steps: &mut [Step],
    input_slots: &[usize],
    constants: &[(usize, Tensor)],
    output_slots: &[usize],
) {
    let keep: HashSet<usize> =
        output_slots.iter().chain(constants.iter().map(|(s, _)| s)).copied().collect();
    let mut last_use: HashMap<usize, usize> = HashMap::new();
    for &s in input_slots {
        last_use.insert(s, 0);
    }
    for (i, step) in steps.iter().enumerate() {
        for s in step.inputs.iter().chain(&step.outputs).flatten() {
            last_use.insert(*s, i);
        }
    }
    let mut by_step: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (slot, step) in last_use {
        if !keep.contains(&slot) {
            if let Some(list) = by_step.get_mut(step) {
                list.push(slot);
            }
        }
    }
    for (step, mut list) in steps.iter_mut().zip(by_step) {
        list.sort_unstable();
        step.free_after = list;
    }
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
