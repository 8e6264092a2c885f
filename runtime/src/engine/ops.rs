//! Operators: parsing a node's attributes at load time, evaluating it at run time.

use candle_core::{DType, Device, Tensor};

use super::kernels::{self, AutoPad, ConvAttrs, ConvTransposeAttrs, PoolAttrs, PoolKind, Window};
use super::load::{tensor_from_proto, MAX_ELEMENTS};
use super::math;
use super::proto::{attribute_type, data_type, AttributeProto, NodeProto};
use super::winograd;
use super::LoadError;

/// Operators of the default ONNX domain the engine runs.
pub const SUPPORTED_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "GreaterOrEqual",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LayerNormalization",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "Pad",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "TopK",
    "Transpose",
    "Unsqueeze",
    "Where",
];

/// An operator failure, as text for the caller to wrap with the node's name.
#[derive(Debug)]
pub(crate) struct OpError(pub String);

impl From<candle_core::Error> for OpError {
    fn from(e: candle_core::Error) -> Self {
        OpError(e.to_string())
    }
}

pub(crate) type R<T> = Result<T, OpError>;

fn err<T>(msg: impl Into<String>) -> R<T> {
    Err(OpError(msg.into()))
}

/// Elementwise binary operators (numpy broadcasting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    Equal,
    Less,
    Greater,
    LessOrEqual,
    GreaterOrEqual,
    And,
    Or,
}

/// Elementwise unary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnOp {
    Relu,
    Sigmoid,
    Tanh,
    Erf,
    Neg,
    Abs,
    Sqrt,
    Exp,
    Log,
    Reciprocal,
    Floor,
    Ceil,
    Not,
}

/// Reductions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReduceKind {
    Mean,
    Sum,
    Max,
    Min,
}

/// Slice before opset 10: `starts`, `ends`, `axes` as attributes.
#[derive(Debug, Clone)]
pub(crate) struct SliceAttrs {
    starts: Vec<i64>,
    ends: Vec<i64>,
    axes: Option<Vec<i64>>,
}

/// A node's operator with its attributes, checked at load time.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    /// Binary, or variadic for Max/Min/Sum.
    Binary(BinOp),
    Unary(UnOp),
    Clip {
        min: Option<f32>,
        max: Option<f32>,
    },
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Gelu {
        tanh: bool,
    },
    Softmax {
        axis: i64,
        legacy: bool,
        log: bool,
    },
    Conv(ConvAttrs),
    /// A Conv whose weight input was replaced at load time by its Winograd transform
    /// (see [`winograd`]).
    WinogradConv(ConvAttrs),
    /// A Conv whose weight input was laid out at load time for its products (see
    /// [`kernels::pack_weights`]).
    PackedConv(ConvAttrs),
    BatchNorm {
        epsilon: f32,
    },
    Pool(PoolKind, PoolAttrs),
    GlobalPool(PoolKind),
    Flatten {
        axis: i64,
    },
    Reshape {
        allowzero: bool,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Concat {
        axis: i64,
    },
    /// `axes` from the attribute (before opset 13) or the second input.
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Gather {
        axis: i64,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Cast {
        to: DType,
    },
    Identity,
    LayerNorm {
        axis: i64,
        epsilon: f32,
    },
    Reduce {
        kind: ReduceKind,
        axes: Option<Vec<i64>>,
        keepdims: bool,
        noop_empty: bool,
    },
    /// Attribute form (before opset 10): starts, ends, axes.
    Slice {
        attrs: Option<SliceAttrs>,
    },
    Split {
        axis: i64,
        split: Option<Vec<i64>>,
        outputs: usize,
    },
    Where,
    Expand,
    ConstantOfShape {
        value: Tensor,
    },
    Range,
    Constant(Tensor),
    ArgMax {
        axis: i64,
        keepdims: bool,
        last: bool,
    },
    ConvTranspose(ConvTransposeAttrs),
    /// `pads` and `value` are attributes before opset 11, inputs after.
    Pad {
        mode: PadMode,
        pads: Option<Vec<i64>>,
        value: f32,
    },
    /// Inputs: X, roi, scales, sizes (opset 11+), or X, scales (opset 10).
    Resize {
        mode: ResizeMode,
        coord: CoordMode,
        scales_input: usize,
    },
    /// `k` is an attribute before opset 10, an input after.
    TopK {
        k: Option<i64>,
        axis: i64,
        largest: bool,
    },
}

impl Op {
    /// The operator's name as the engine runs it, with the kind of a Binary or Unary
    /// (`Conv`, `WinogradConv`, `Binary(Add)`): for [`super::Model::profile`].
    pub(crate) fn label(&self) -> String {
        let text = format!("{self:?}");
        let end = text.find([' ', '{', ',']).unwrap_or(text.len());
        let head = &text[..end];
        match head.find('(') {
            Some(open) if !head.ends_with(')') => head[..open].to_string(),
            _ => head.to_string(),
        }
    }
}

/// Resize's interpolation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResizeMode {
    Nearest(NearestMode),
    Linear,
}

/// How Resize rounds in nearest mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

/// How Resize maps an output coordinate to an input coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CoordMode {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
}

/// How Pad fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

/// Reads a node's attributes with type checks.
struct Attrs<'a> {
    node: &'a NodeProto,
    name: &'a str,
}

impl<'a> Attrs<'a> {
    fn bad(&self, reason: impl Into<String>) -> LoadError {
        LoadError::BadNode {
            node: self.name.to_string(),
            op: self.node.op_type.clone(),
            reason: reason.into(),
        }
    }

    fn get(&self, name: &str, ty: i32) -> Result<Option<&'a AttributeProto>, LoadError> {
        let Some(a) = self.node.attribute.iter().find(|a| a.name == name) else {
            return Ok(None);
        };
        if !a.ref_attr_name.is_empty() {
            return Err(self.bad(format!("attribute `{name}` refers to a function attribute")));
        }
        if a.r#type != 0 && a.r#type != ty {
            return Err(self.bad(format!("attribute `{name}` has the wrong type {}", a.r#type)));
        }
        Ok(Some(a))
    }

    fn int(&self, name: &str, default: i64) -> Result<i64, LoadError> {
        Ok(self.get(name, attribute_type::INT)?.map_or(default, |a| a.i))
    }

    fn float(&self, name: &str, default: f32) -> Result<f32, LoadError> {
        Ok(self.get(name, attribute_type::FLOAT)?.map_or(default, |a| a.f))
    }

    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, LoadError> {
        Ok(self.get(name, attribute_type::INTS)?.map(|a| a.ints.clone()))
    }

    fn floats(&self, name: &str) -> Result<Option<Vec<f32>>, LoadError> {
        Ok(self.get(name, attribute_type::FLOATS)?.map(|a| a.floats.clone()))
    }

    fn string(&self, name: &str) -> Result<Option<String>, LoadError> {
        Ok(self
            .get(name, attribute_type::STRING)?
            .map(|a| String::from_utf8_lossy(&a.s).into_owned()))
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>, LoadError> {
        match self.get(name, attribute_type::TENSOR)? {
            Some(a) => match &a.t {
                Some(t) => Ok(Some(tensor_from_proto(t)?)),
                None => Err(self.bad(format!("attribute `{name}` holds no tensor"))),
            },
            None => Ok(None),
        }
    }

    fn usizes(&self, name: &str) -> Result<Option<Vec<usize>>, LoadError> {
        match self.ints(name)? {
            Some(v) => v
                .iter()
                .map(|&x| usize::try_from(x))
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
                .map_err(|_| self.bad(format!("attribute `{name}` has a negative value: {v:?}"))),
            None => Ok(None),
        }
    }

    fn arity(&self, min: usize, max: usize) -> Result<(), LoadError> {
        let n = self.node.input.len();
        if n < min || n > max {
            return Err(self.bad(format!("takes {min} to {max} inputs, has {n}")));
        }
        for (i, input) in self.node.input.iter().enumerate().take(min) {
            if input.is_empty() {
                return Err(self.bad(format!("input {i} is required but empty")));
            }
        }
        Ok(())
    }

    fn single_output(&self) -> Result<(), LoadError> {
        if self.node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return Err(self.bad("only the first output is supported; remove the others"));
        }
        Ok(())
    }

    fn window(&self, conv: bool) -> Result<Window, LoadError> {
        let auto_pad = match self.string("auto_pad")?.as_deref() {
            None | Some("NOTSET") | Some("") => AutoPad::NotSet,
            Some("SAME_UPPER") => AutoPad::SameUpper,
            Some("SAME_LOWER") => AutoPad::SameLower,
            Some("VALID") => AutoPad::Valid,
            Some(other) => return Err(self.bad(format!("unknown auto_pad `{other}`"))),
        };
        let kernel_shape = self.usizes("kernel_shape")?;
        if !conv && kernel_shape.is_none() {
            return Err(self.bad("kernel_shape is required"));
        }
        if let Some(k) = &kernel_shape {
            if k.is_empty() || k.len() > 2 {
                return Err(
                    self.bad(format!("kernel_shape {k:?}: only 1-D and 2-D windows are supported"))
                );
            }
        }
        Ok(Window {
            auto_pad,
            kernel_shape,
            strides: self.usizes("strides")?,
            dilations: self.usizes("dilations")?,
            pads: self.usizes("pads")?,
            ceil_mode: self.int("ceil_mode", 0)? != 0,
        })
    }
}

/// Parses and validates one node for the given default-domain opset.
pub(crate) fn parse(node: &NodeProto, opset: i64, name: &str) -> Result<Op, LoadError> {
    let a = Attrs { node, name };
    let binary = |op: BinOp| -> Result<Op, LoadError> {
        a.arity(2, 2)?;
        Ok(Op::Binary(op))
    };
    let unary = |op: UnOp| -> Result<Op, LoadError> {
        a.arity(1, 1)?;
        Ok(Op::Unary(op))
    };
    let variadic = |op: BinOp| -> Result<Op, LoadError> {
        a.arity(1, usize::MAX)?;
        if node.input.iter().any(String::is_empty) {
            return Err(a.bad("empty input name"));
        }
        Ok(Op::Binary(op))
    };
    let reduce = |kind: ReduceKind, axes_input_since: i64| -> Result<Op, LoadError> {
        let from_input = opset >= axes_input_since;
        a.arity(1, if from_input { 2 } else { 1 })?;
        Ok(Op::Reduce {
            kind,
            axes: if from_input { None } else { a.ints("axes")? },
            keepdims: a.int("keepdims", 1)? != 0,
            noop_empty: a.int("noop_with_empty_axes", 0)? != 0,
        })
    };
    let op = match node.op_type.as_str() {
        "Gemm" => {
            a.arity(2, 3)?;
            Op::Gemm {
                alpha: a.float("alpha", 1.0)?,
                beta: a.float("beta", 1.0)?,
                trans_a: a.int("transA", 0)? != 0,
                trans_b: a.int("transB", 0)? != 0,
            }
        }
        "MatMul" => {
            a.arity(2, 2)?;
            Op::MatMul
        }
        "Add" => binary(BinOp::Add)?,
        "Sub" => binary(BinOp::Sub)?,
        "Mul" => binary(BinOp::Mul)?,
        "Div" => binary(BinOp::Div)?,
        "Pow" => binary(BinOp::Pow)?,
        "Equal" => binary(BinOp::Equal)?,
        "Less" => binary(BinOp::Less)?,
        "Greater" => binary(BinOp::Greater)?,
        "LessOrEqual" => binary(BinOp::LessOrEqual)?,
        "GreaterOrEqual" => binary(BinOp::GreaterOrEqual)?,
        "And" => binary(BinOp::And)?,
        "Or" => binary(BinOp::Or)?,
        "Max" => variadic(BinOp::Max)?,
        "Min" => variadic(BinOp::Min)?,
        "Sum" => variadic(BinOp::Add)?,
        "Relu" => unary(UnOp::Relu)?,
        "Sigmoid" => unary(UnOp::Sigmoid)?,
        "Tanh" => unary(UnOp::Tanh)?,
        "Erf" => unary(UnOp::Erf)?,
        "Neg" => unary(UnOp::Neg)?,
        "Abs" => unary(UnOp::Abs)?,
        "Sqrt" => unary(UnOp::Sqrt)?,
        "Exp" => unary(UnOp::Exp)?,
        "Log" => unary(UnOp::Log)?,
        "Reciprocal" => unary(UnOp::Reciprocal)?,
        "Floor" => unary(UnOp::Floor)?,
        "Ceil" => unary(UnOp::Ceil)?,
        "Not" => unary(UnOp::Not)?,
        "Clip" => {
            if opset >= 11 {
                a.arity(1, 3)?;
                Op::Clip { min: None, max: None }
            } else {
                a.arity(1, 1)?;
                Op::Clip {
                    min: Some(a.float("min", f32::MIN)?),
                    max: Some(a.float("max", f32::MAX)?),
                }
            }
        }
        "HardSigmoid" => {
            a.arity(1, 1)?;
            Op::HardSigmoid { alpha: a.float("alpha", 0.2)?, beta: a.float("beta", 0.5)? }
        }
        "HardSwish" => unary(UnOp::Relu).map(|_| Op::HardSwish)?,
        "Gelu" => {
            a.arity(1, 1)?;
            match a.string("approximate")?.as_deref() {
                None | Some("none") => Op::Gelu { tanh: false },
                Some("tanh") => Op::Gelu { tanh: true },
                Some(other) => return Err(a.bad(format!("unknown approximate `{other}`"))),
            }
        }
        "Softmax" | "LogSoftmax" => {
            a.arity(1, 1)?;
            let legacy = opset < 13;
            Op::Softmax {
                axis: a.int("axis", if legacy { 1 } else { -1 })?,
                legacy,
                log: node.op_type == "LogSoftmax",
            }
        }
        "Conv" => {
            a.arity(2, 3)?;
            let group = a.int("group", 1)?;
            let group = usize::try_from(group)
                .ok()
                .filter(|g| *g > 0)
                .ok_or_else(|| a.bad(format!("group must be positive, is {group}")))?;
            Op::Conv(ConvAttrs { window: a.window(true)?, group, activation: None })
        }
        "BatchNormalization" => {
            a.arity(5, 5)?;
            a.single_output()?;
            if a.int("training_mode", 0)? != 0 {
                return Err(a.bad("training_mode=1 is not supported; export in eval mode"));
            }
            Op::BatchNorm { epsilon: a.float("epsilon", 1e-5)? }
        }
        "MaxPool" | "AveragePool" => {
            a.arity(1, 1)?;
            a.single_output()?;
            let window = a.window(false)?;
            let kind = if node.op_type == "MaxPool" { PoolKind::Max } else { PoolKind::Average };
            if kind == PoolKind::Average
                && window.dilations.as_ref().is_some_and(|d| d.iter().any(|&d| d != 1))
            {
                return Err(a.bad("dilations other than 1 are not supported for AveragePool"));
            }
            if a.int("storage_order", 0)? != 0 {
                return Err(a.bad("storage_order=1 is not supported"));
            }
            Op::Pool(
                kind,
                PoolAttrs { window, count_include_pad: a.int("count_include_pad", 0)? != 0 },
            )
        }
        "GlobalAveragePool" => unary(UnOp::Relu).map(|_| Op::GlobalPool(PoolKind::Average))?,
        "GlobalMaxPool" => unary(UnOp::Relu).map(|_| Op::GlobalPool(PoolKind::Max))?,
        "Flatten" => {
            a.arity(1, 1)?;
            Op::Flatten { axis: a.int("axis", 1)? }
        }
        "Reshape" => {
            a.arity(2, 2)?;
            Op::Reshape { allowzero: a.int("allowzero", 0)? != 0 }
        }
        "Transpose" => {
            a.arity(1, 1)?;
            Op::Transpose { perm: a.ints("perm")? }
        }
        "Concat" => {
            a.arity(1, usize::MAX)?;
            Op::Concat {
                axis: a
                    .get("axis", attribute_type::INT)?
                    .map(|x| x.i)
                    .ok_or_else(|| a.bad("attribute `axis` is required"))?,
            }
        }
        "Squeeze" | "Unsqueeze" => {
            let from_input = opset >= 13;
            a.arity(1, if from_input { 2 } else { 1 })?;
            let axes = if from_input { None } else { a.ints("axes")? };
            if node.op_type == "Squeeze" {
                Op::Squeeze { axes }
            } else {
                if !from_input && axes.is_none() {
                    return Err(a.bad("attribute `axes` is required"));
                }
                if from_input && node.input.get(1).is_none_or(String::is_empty) {
                    return Err(a.bad("input `axes` is required"));
                }
                Op::Unsqueeze { axes }
            }
        }
        "Gather" => {
            a.arity(2, 2)?;
            Op::Gather { axis: a.int("axis", 0)? }
        }
        "Shape" => {
            a.arity(1, 1)?;
            Op::Shape {
                start: a.int("start", 0)?,
                end: a.get("end", attribute_type::INT)?.map(|x| x.i),
            }
        }
        "Cast" => {
            a.arity(1, 1)?;
            let to = a.int("to", 0)?;
            let to = match i32::try_from(to).unwrap_or(0) {
                data_type::FLOAT | data_type::DOUBLE => DType::F32,
                data_type::INT64 | data_type::INT32 => DType::I64,
                data_type::BOOL => DType::U8,
                other => {
                    return Err(a.bad(format!(
                        "cast to {} is not supported; FLOAT, DOUBLE, INT64, INT32 and BOOL are",
                        data_type::name(other)
                    )))
                }
            };
            Op::Cast { to }
        }
        "Identity" => unary(UnOp::Relu).map(|_| Op::Identity)?,
        "Dropout" => {
            a.arity(1, 3)?;
            a.single_output()?;
            Op::Identity
        }
        "LayerNormalization" => {
            a.arity(2, 3)?;
            Op::LayerNorm { axis: a.int("axis", -1)?, epsilon: a.float("epsilon", 1e-5)? }
        }
        "ReduceMean" => reduce(ReduceKind::Mean, 18)?,
        "ReduceMax" => reduce(ReduceKind::Max, 18)?,
        "ReduceMin" => reduce(ReduceKind::Min, 18)?,
        "ReduceSum" => reduce(ReduceKind::Sum, 13)?,
        "Slice" => {
            if opset >= 10 {
                a.arity(3, 5)?;
                Op::Slice { attrs: None }
            } else {
                a.arity(1, 1)?;
                let starts = a.ints("starts")?.ok_or_else(|| a.bad("`starts` is required"))?;
                let ends = a.ints("ends")?.ok_or_else(|| a.bad("`ends` is required"))?;
                Op::Slice { attrs: Some(SliceAttrs { starts, ends, axes: a.ints("axes")? }) }
            }
        }
        "Split" => {
            a.arity(1, if opset >= 13 { 2 } else { 1 })?;
            let outputs = node.output.len();
            if outputs == 0 {
                return Err(a.bad("has no outputs"));
            }
            if let Some(n) = a.get("num_outputs", attribute_type::INT)? {
                if usize::try_from(n.i).ok() != Some(outputs) {
                    return Err(a.bad(format!("num_outputs {} but {outputs} outputs", n.i)));
                }
            }
            Op::Split { axis: a.int("axis", 0)?, split: a.ints("split")?, outputs }
        }
        "Where" => {
            a.arity(3, 3)?;
            Op::Where
        }
        "Expand" => {
            a.arity(2, 2)?;
            Op::Expand
        }
        "ConstantOfShape" => {
            a.arity(1, 1)?;
            let value = match a.tensor("value")? {
                Some(t) if t.elem_count() == 1 => {
                    t.flatten_all().map_err(|e| a.bad(e.to_string()))?
                }
                Some(_) => return Err(a.bad("`value` must hold one element")),
                None => {
                    Tensor::zeros(1, DType::F32, &Device::Cpu).map_err(|e| a.bad(e.to_string()))?
                }
            };
            Op::ConstantOfShape { value }
        }
        "Range" => {
            a.arity(3, 3)?;
            Op::Range
        }
        "Constant" => {
            a.arity(0, 0)?;
            let dev = &Device::Cpu;
            let t = if let Some(t) = a.tensor("value")? {
                t
            } else if let Some(v) = a.get("value_float", attribute_type::FLOAT)? {
                Tensor::new(v.f, dev).map_err(|e| a.bad(e.to_string()))?
            } else if let Some(v) = a.floats("value_floats")? {
                Tensor::new(v, dev).map_err(|e| a.bad(e.to_string()))?
            } else if let Some(v) = a.get("value_int", attribute_type::INT)? {
                Tensor::new(v.i, dev).map_err(|e| a.bad(e.to_string()))?
            } else if let Some(v) = a.ints("value_ints")? {
                Tensor::new(v, dev).map_err(|e| a.bad(e.to_string()))?
            } else {
                return Err(a.bad(
                    "needs a `value`, `value_float(s)` or `value_int(s)` attribute; sparse and \
                     string constants are not supported",
                ));
            };
            Op::Constant(t)
        }
        "ArgMax" => {
            a.arity(1, 1)?;
            Op::ArgMax {
                axis: a.int("axis", 0)?,
                keepdims: a.int("keepdims", 1)? != 0,
                last: a.int("select_last_index", 0)? != 0,
            }
        }
        "ConvTranspose" => {
            a.arity(2, 3)?;
            let group = a.int("group", 1)?;
            let group = usize::try_from(group)
                .ok()
                .filter(|g| *g > 0)
                .ok_or_else(|| a.bad(format!("group must be positive, is {group}")))?;
            Op::ConvTranspose(ConvTransposeAttrs {
                window: a.window(true)?,
                group,
                output_padding: a.usizes("output_padding")?,
                output_shape: a.usizes("output_shape")?,
            })
        }
        "Pad" => {
            let from_input = opset >= 11;
            a.arity(if from_input { 2 } else { 1 }, if from_input { 4 } else { 1 })?;
            let mode = match a.string("mode")?.as_deref() {
                None | Some("constant") => PadMode::Constant,
                Some("reflect") => PadMode::Reflect,
                Some("edge") => PadMode::Edge,
                Some("wrap") => PadMode::Wrap,
                Some(other) => return Err(a.bad(format!("unknown mode `{other}`"))),
            };
            let pads = if from_input {
                None
            } else {
                Some(a.ints("pads")?.ok_or_else(|| a.bad("attribute `pads` is required"))?)
            };
            Op::Pad { mode, pads, value: a.float("value", 0.0)? }
        }
        "Resize" => {
            let v10 = opset < 11;
            a.arity(if v10 { 2 } else { 1 }, if v10 { 2 } else { 4 })?;
            if a.int("antialias", 0)? != 0 {
                return Err(a.bad("antialias=1 is not supported"));
            }
            if a.ints("axes")?.is_some() {
                return Err(a.bad("the `axes` attribute is not supported; give all scales"));
            }
            match a.string("keep_aspect_ratio_policy")?.as_deref() {
                None | Some("stretch") => {}
                Some(other) => {
                    return Err(
                        a.bad(format!("keep_aspect_ratio_policy `{other}` is not supported"))
                    )
                }
            }
            let nearest = match a.string("nearest_mode")?.as_deref() {
                _ if v10 => NearestMode::Floor,
                None | Some("round_prefer_floor") => NearestMode::RoundPreferFloor,
                Some("round_prefer_ceil") => NearestMode::RoundPreferCeil,
                Some("floor") => NearestMode::Floor,
                Some("ceil") => NearestMode::Ceil,
                Some(other) => return Err(a.bad(format!("unknown nearest_mode `{other}`"))),
            };
            let mode = match a.string("mode")?.as_deref() {
                None | Some("nearest") => ResizeMode::Nearest(nearest),
                Some("linear") => ResizeMode::Linear,
                Some(other) => {
                    return Err(
                        a.bad(format!("mode `{other}` is not supported; nearest and linear are"))
                    )
                }
            };
            let coord = match a.string("coordinate_transformation_mode")?.as_deref() {
                _ if v10 => CoordMode::Asymmetric,
                None | Some("half_pixel") => CoordMode::HalfPixel,
                Some("half_pixel_symmetric") => CoordMode::HalfPixelSymmetric,
                Some("pytorch_half_pixel") => CoordMode::PytorchHalfPixel,
                Some("align_corners") => CoordMode::AlignCorners,
                Some("asymmetric") => CoordMode::Asymmetric,
                Some(other) => {
                    return Err(
                        a.bad(format!("coordinate_transformation_mode `{other}` is not supported"))
                    )
                }
            };
            Op::Resize { mode, coord, scales_input: if v10 { 1 } else { 2 } }
        }
        "TopK" => {
            let from_input = opset >= 10;
            a.arity(if from_input { 2 } else { 1 }, if from_input { 2 } else { 1 })?;
            // `sorted=0` allows any order; sorted output is one of them.
            Op::TopK {
                k: if from_input { None } else { Some(a.int("k", 0)?) },
                axis: a.int("axis", -1)?,
                largest: a.int("largest", 1)? != 0,
            }
        }
        other => {
            return Err(LoadError::UnsupportedOp { op: other.to_string(), node: name.to_string() })
        }
    };
    Ok(op)
}

fn req<'a>(args: &[Option<&'a Tensor>], i: usize) -> R<&'a Tensor> {
    match args.get(i) {
        Some(Some(t)) => Ok(t),
        _ => err(format!("input {i} is missing")),
    }
}

fn opt<'a>(args: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    args.get(i).copied().flatten()
}

fn axis_index(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

fn f32_data(t: &Tensor) -> R<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

fn i64_data(t: &Tensor, what: &str) -> R<Vec<i64>> {
    if t.dtype() != DType::I64 {
        return err(format!("{what} must be INT64, got {:?}", t.dtype()));
    }
    Ok(t.flatten_all()?.to_vec1()?)
}

fn scalar_f32(t: &Tensor, what: &str) -> R<f32> {
    match f32_data(t)?.as_slice() {
        [v] => Ok(*v),
        _ => err(format!("{what} must hold one value, has shape {:?}", t.dims())),
    }
}

fn elements(dims: &[usize]) -> R<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| OpError(format!("shape {dims:?} has more than {MAX_ELEMENTS} elements")))
}

fn broadcast_shape(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= rank { a.get(i + a.len() - rank).copied() } else { None };
        let db = if i + b.len() >= rank { b.get(i + b.len() - rank).copied() } else { None };
        let (da, db) = (da.unwrap_or(1), db.unwrap_or(1));
        *o = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return err(format!("shapes {a:?} and {b:?} do not broadcast"));
        };
    }
    elements(&out)?;
    Ok(out)
}

fn same_dtype(a: &Tensor, b: &Tensor) -> R<()> {
    if a.dtype() == b.dtype() {
        Ok(())
    } else {
        err(format!("inputs have different types {:?} and {:?}", a.dtype(), b.dtype()))
    }
}

/// Broadcasts both to a common shape, contiguous.
fn broadcast_pair(a: &Tensor, b: &Tensor) -> R<(Tensor, Tensor, Vec<usize>)> {
    let shape = broadcast_shape(a.dims(), b.dims())?;
    let a = a.broadcast_as(shape.as_slice())?.contiguous()?;
    let b = b.broadcast_as(shape.as_slice())?.contiguous()?;
    Ok((a, b, shape))
}

fn zip_i64(a: &Tensor, b: &Tensor, f: impl Fn(i64, i64) -> R<i64>) -> R<Tensor> {
    let (a, b, shape) = broadcast_pair(a, b)?;
    let (a, b): (Vec<i64>, Vec<i64>) = (a.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?);
    let out = a.iter().zip(&b).map(|(&x, &y)| f(x, y)).collect::<R<Vec<i64>>>()?;
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
}

fn zip_f32(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> R<Tensor> {
    let (a, b, shape) = broadcast_pair(a, b)?;
    let (a, b): (Vec<f32>, Vec<f32>) = (a.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?);
    let out: Vec<f32> = a.iter().zip(&b).map(|(&x, &y)| f(x, y)).collect();
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
}

/// Elements per task of the elementwise loops split across threads.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// `f(a, b)` elementwise on the engine's threads, when both have the output's shape or
/// one of them is broadcast over trailing dimensions only (a per-channel scale or bias,
/// a scalar); `None` for other broadcasts. candle-core's own loops for large tensors run
/// on a thread pool of its own, which would compete with the engine's workers.
fn zip_broadcast_f32(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync + Copy,
) -> R<Option<Tensor>> {
    let shape = broadcast_shape(a.dims(), b.dims())?;
    // Which operand is full, and how the other covers it: each of its values repeated over
    // `inner` trailing elements, or (`inner` = 0) the whole of it repeated along the
    // leading dimensions (a bias over the last axes).
    let (full_is_a, inner) = if a.dims() == b.dims() {
        (true, 1)
    } else if a.dims() == shape.as_slice() {
        match repeats_over_suffix(b.dims(), &shape).or(tiles_suffix(b.dims(), &shape)) {
            Some(inner) => (true, inner),
            None => return Ok(None),
        }
    } else if b.dims() == shape.as_slice() {
        match repeats_over_suffix(a.dims(), &shape).or(tiles_suffix(a.dims(), &shape)) {
            Some(inner) => (false, inner),
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    let (full, small) = if full_is_a { (a, b) } else { (b, a) };
    let data = kernels::with_f32(full, |xs| {
        kernels::with_f32(small, |ys| {
            let mut out = vec![0f32; xs.len()];
            let total = xs.len();
            kernels::for_each_chunk(
                &mut out,
                ELEMENTWISE_CHUNK,
                total,
                || (),
                |_, i, out| {
                    let start = i * ELEMENTWISE_CHUNK;
                    let xs = xs.get(start..start + out.len()).unwrap_or_default();
                    if inner == 1 && ys.len() == total {
                        let ys = ys.get(start..start + out.len()).unwrap_or_default();
                        for ((o, &x), &y) in out.iter_mut().zip(xs).zip(ys) {
                            *o = if full_is_a { f(x, y) } else { f(y, x) };
                        }
                        return;
                    }
                    if inner == 0 {
                        // Runs of the small operand's length, read from its start.
                        let period = ys.len().max(1);
                        let mut done = 0;
                        while done < out.len() {
                            let at = (start + done) % period;
                            let run = (period - at).min(out.len() - done);
                            let (o, x) = (&mut out[done..done + run], &xs[done..done + run]);
                            let y = ys.get(at..at + run).unwrap_or_default();
                            if full_is_a {
                                o.iter_mut().zip(x).zip(y).for_each(|((o, &x), &y)| *o = f(x, y));
                            } else {
                                o.iter_mut().zip(x).zip(y).for_each(|((o, &x), &y)| *o = f(y, x));
                            }
                            done += run;
                        }
                        return;
                    }
                    // Runs of `inner` elements that share one value of the small operand.
                    let mut done = 0;
                    while done < out.len() {
                        let at = start + done;
                        let run = (inner - at % inner).min(out.len() - done);
                        let y = ys.get(at / inner).copied().unwrap_or(0.0);
                        let (o, x) = (&mut out[done..done + run], &xs[done..done + run]);
                        if full_is_a {
                            o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x, y));
                        } else {
                            o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(y, x));
                        }
                        done += run;
                    }
                },
            );
            Ok(out)
        })
    })?;
    Ok(Some(Tensor::from_vec(data, shape, &Device::Cpu)?))
}

/// When `small` (leading 1s aside) is the trailing dimensions of `shape`, so that broadcast
/// it repeats whole along the leading ones: `Some(0)`, the marker for that pattern in
/// [`zip_broadcast_f32`].
fn tiles_suffix(small: &[usize], shape: &[usize]) -> Option<usize> {
    let first = small.iter().position(|&d| d != 1).unwrap_or(small.len());
    let tail = &small[first..];
    (!tail.is_empty() && shape.ends_with(tail)).then_some(0)
}

/// When `small`, broadcast to `shape`, repeats each of its elements over the trailing
/// dimensions of `shape` where it has extent 1 and matches `shape` before them: how many
/// elements each value covers.
fn repeats_over_suffix(small: &[usize], shape: &[usize]) -> Option<usize> {
    let pad = shape.len().checked_sub(small.len())?;
    let dims: Vec<usize> = std::iter::repeat_n(1, pad).chain(small.iter().copied()).collect();
    // The leading dimensions it spans must match exactly, except leading 1s of both.
    let kept = dims.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    if dims[..kept] != shape[..kept] {
        return None;
    }
    Some(shape[kept..].iter().product::<usize>().max(1))
}

fn map_f32(t: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> R<Tensor> {
    map_chunks(t, |out, from| out.iter_mut().zip(from).for_each(|(o, &v)| *o = f(v)))
}

/// Runs `f(out, from)` on matching chunks of a new tensor and `t`, across the engine's
/// threads when `t` is large.
fn map_chunks(t: &Tensor, f: impl Fn(&mut [f32], &[f32]) + Sync) -> R<Tensor> {
    let data: Vec<f32> = kernels::with_f32(t, |xs| {
        let mut out = vec![0f32; xs.len()];
        kernels::for_each_chunk(
            &mut out,
            ELEMENTWISE_CHUNK,
            xs.len(),
            || (),
            |_, i, out| f(out, xs.get(i * ELEMENTWISE_CHUNK..).unwrap_or_default()),
        );
        Ok(out)
    })?;
    Ok(Tensor::from_vec(data, t.dims(), &Device::Cpu)?)
}

/// [`map_f32`] for the functions of [`math`], whose loops vectorize.
fn map_math(t: &Tensor, func: math::Func) -> R<Tensor> {
    map_chunks(t, |out, from| math::map(func, out, from))
}

/// A Conv (any of its forms, `op`) that may carry the other operand of an Add fused into
/// it at load time (its fourth input, see `load::fuse_residual_adds`): `run` runs the
/// Conv's kernel, which adds a residual of the output's shape itself (see
/// [`kernels::conv`]). One of another shape or type (the Add broadcasts it) is added as
/// the Add would have, and the Conv's activation applied after.
fn conv_with_residual(
    op: &Op,
    x: &Tensor,
    w: &Tensor,
    attrs: &ConvAttrs,
    residual: Option<&Tensor>,
    run: impl Fn(&ConvAttrs, Option<&[f32]>) -> R<Tensor>,
) -> R<Tensor> {
    let Some(residual) = residual else { return run(attrs, None) };
    let (m, kernel) = match (op, w.dims()) {
        (Op::WinogradConv(_), &[_, _, m]) => (m, vec![3, 3]),
        (_, [m, _, kernel @ ..]) => (*m, kernel.to_vec()),
        _ => (0, Vec::new()),
    };
    let fits = residual.dtype() == DType::F32
        && kernels::conv_output_dims(x.dims(), m, &kernel, &attrs.window)
            .is_ok_and(|dims| dims == residual.dims());
    if fits {
        return kernels::with_f32(residual, |r| run(attrs, Some(r)));
    }
    let plain = ConvAttrs { activation: None, ..attrs.clone() };
    let sum = binary(BinOp::Add, &run(&plain, None)?, residual)?;
    match attrs.activation {
        Some(act) => map_f32(&sum, move |v| act.apply(v)),
        None => Ok(sum),
    }
}

fn binary(op: BinOp, a: &Tensor, b: &Tensor) -> R<Tensor> {
    use BinOp::*;
    if op == Pow {
        // The exponent may be of another type (opset 12+); the result has the base's type.
        if a.dtype() != DType::F32 {
            return err("Pow is supported on FLOAT bases");
        }
        let b = b.to_dtype(DType::F32)?;
        return match zip_broadcast_f32(a, &b, f32::powf)? {
            Some(out) => Ok(out),
            None => zip_f32(a, &b, f32::powf),
        };
    }
    same_dtype(a, b)?;
    let dtype = a.dtype();
    match op {
        Equal => return Ok(a.broadcast_eq(b)?),
        Less => return Ok(a.broadcast_lt(b)?),
        Greater => return Ok(a.broadcast_gt(b)?),
        LessOrEqual => return Ok(a.broadcast_le(b)?),
        GreaterOrEqual => return Ok(a.broadcast_ge(b)?),
        And | Or => {
            if dtype != DType::U8 {
                return err("And/Or need BOOL inputs");
            }
            return Ok(if op == And { a.broadcast_minimum(b)? } else { a.broadcast_maximum(b)? });
        }
        _ => {}
    }
    if dtype == DType::F32 {
        let out = match op {
            Add => zip_broadcast_f32(a, b, |x, y| x + y)?,
            Sub => zip_broadcast_f32(a, b, |x, y| x - y)?,
            Mul => zip_broadcast_f32(a, b, |x, y| x * y)?,
            Div => zip_broadcast_f32(a, b, |x, y| x / y)?,
            _ => None,
        };
        if let Some(out) = out {
            return Ok(out);
        }
    }
    match dtype {
        DType::F32 => Ok(match op {
            Add => a.broadcast_add(b)?,
            Sub => a.broadcast_sub(b)?,
            Mul => a.broadcast_mul(b)?,
            Div => a.broadcast_div(b)?,
            Max => a.broadcast_maximum(b)?,
            Min => a.broadcast_minimum(b)?,
            _ => return err("unsupported operator"),
        }),
        // Integer arithmetic is shape arithmetic: own loops, wrapping, checked division.
        DType::I64 => zip_i64(a, b, |x, y| match op {
            Add => Ok(x.wrapping_add(y)),
            Sub => Ok(x.wrapping_sub(y)),
            Mul => Ok(x.wrapping_mul(y)),
            Div => x.checked_div(y).ok_or_else(|| OpError("integer division by zero".into())),
            Max => Ok(x.max(y)),
            Min => Ok(x.min(y)),
            _ => Err(OpError("unsupported operator".into())),
        }),
        other => err(format!("arithmetic on {other:?} is not supported")),
    }
}

fn unary(op: UnOp, x: &Tensor) -> R<Tensor> {
    use UnOp::*;
    match (op, x.dtype()) {
        (Not, DType::U8) => return Ok((x.ones_like()? - x)?),
        (Not, _) => return err("Not needs a BOOL input"),
        (Neg, DType::I64) => {
            let v: Vec<i64> = x.flatten_all()?.to_vec1()?;
            let v: Vec<i64> = v.into_iter().map(i64::wrapping_neg).collect();
            return Ok(Tensor::from_vec(v, x.dims(), &Device::Cpu)?);
        }
        (Abs, DType::I64) => {
            let v: Vec<i64> = x.flatten_all()?.to_vec1()?;
            let v: Vec<i64> = v.into_iter().map(i64::wrapping_abs).collect();
            return Ok(Tensor::from_vec(v, x.dims(), &Device::Cpu)?);
        }
        (Relu, DType::I64) => {
            let v: Vec<i64> = x.flatten_all()?.to_vec1()?;
            let v: Vec<i64> = v.into_iter().map(|v| v.max(0)).collect();
            return Ok(Tensor::from_vec(v, x.dims(), &Device::Cpu)?);
        }
        (_, DType::F32) => {}
        (_, other) => return err(format!("{op:?} needs a FLOAT input, got {other:?}")),
    }
    Ok(match op {
        // On the engine's threads (candle-core's own loops have a pool of their own).
        Relu => map_f32(x, |v| v.max(0.0))?,
        Sigmoid => map_math(x, math::Func::Sigmoid)?,
        Tanh => map_f32(x, f32::tanh)?,
        Erf => map_math(x, math::Func::Erf)?,
        Neg => map_f32(x, |v| -v)?,
        Abs => map_f32(x, f32::abs)?,
        Sqrt => map_f32(x, f32::sqrt)?,
        Exp => map_math(x, math::Func::Exp)?,
        Log => map_f32(x, f32::ln)?,
        Reciprocal => map_f32(x, |v| 1.0 / v)?,
        Floor => map_f32(x, f32::floor)?,
        Ceil => map_f32(x, f32::ceil)?,
        Not => return err("Not needs a BOOL input"),
    })
}

fn f32_only(t: &Tensor, what: &str) -> R<()> {
    if t.dtype() == DType::F32 {
        Ok(())
    } else {
        err(format!("{what} must be FLOAT, got {:?}", t.dtype()))
    }
}

fn gemm(args: &[Option<&Tensor>], alpha: f32, beta: f32, ta: bool, tb: bool) -> R<Tensor> {
    let (a, b) = (req(args, 0)?, req(args, 1)?);
    f32_only(a, "A")?;
    f32_only(b, "B")?;
    if a.rank() != 2 || b.rank() != 2 {
        return err(format!("A and B must be 2-D, got {:?} and {:?}", a.dims(), b.dims()));
    }
    if tb && !ta {
        if let Some(y) = gemm_by_rows(a, b, opt(args, 2), alpha, beta)? {
            return Ok(y);
        }
    }
    let a = if ta { a.t()? } else { a.clone() };
    let b = if tb { b.t()? } else { b.clone() };
    let (Some(&k1), Some(&k2)) = (a.dims().get(1), b.dims().first()) else {
        return err("A and B must be 2-D");
    };
    if k1 != k2 {
        return err(format!(
            "A' {:?} and B' {:?} have different inner dimensions",
            a.dims(),
            b.dims()
        ));
    }
    let mut y = match small_batched_matmul(&a, &b)? {
        Some(y) => y,
        None => a.matmul(&b)?,
    };
    if alpha != 1.0 {
        y = y.affine(f64::from(alpha), 0.0)?;
    }
    if let Some(c) = opt(args, 2) {
        f32_only(c, "C")?;
        let c = if beta != 1.0 { c.affine(f64::from(beta), 0.0)? } else { c.clone() };
        broadcast_shape(y.dims(), c.dims())?;
        y = y.broadcast_add(&c)?;
    }
    Ok(y)
}

/// Below this many rows of `A`, [`gemm_by_rows`] computes `A B^T` as dot products.
const GEMM_BY_ROWS_MAX_M: usize = 8;

/// `alpha A B^T + beta C` for a Gemm with `transB` (a dense layer: `B` is `[n, k]`, one
/// row per output) and few rows of `A`: each output is the dot product of two contiguous
/// rows, so `B` is read in place instead of being transposed on every call, and the bias
/// is added in the same pass. `None` when the shapes are not that case.
fn gemm_by_rows(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    alpha: f32,
    beta: f32,
) -> R<Option<Tensor>> {
    let ((m, k), (n, kb)) = match (a.dims(), b.dims()) {
        (&[m, k], &[n, kb]) => ((m, k), (n, kb)),
        _ => return Ok(None),
    };
    if m > GEMM_BY_ROWS_MAX_M || k != kb {
        return Ok(None);
    }
    let c = match c {
        None => None,
        Some(c) => {
            f32_only(c, "C")?;
            broadcast_shape(&[m, n], c.dims())?;
            Some(c.broadcast_as((m, n))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
        }
    };
    let mut out = vec![0f32; m * n];
    kernels::with_f32(a, |av| {
        kernels::with_f32(b, |bv| {
            let rows = av.chunks_exact(k.max(1)).take(m);
            for (row, out) in rows.zip(out.chunks_exact_mut(n.max(1))) {
                // B's rows in runs, across threads when B is large (a classifier's weights
                // are megabytes, read once per call: two cores read them faster).
                kernels::for_each_chunk(
                    out,
                    DOTS_PER_TASK,
                    n * k,
                    || (),
                    |_, i, out| {
                        let cols = bv.get(i * DOTS_PER_TASK * k..).unwrap_or_default();
                        pulp::Arch::new().dispatch(Dots { row, cols, alpha, out });
                    },
                );
            }
            Ok(())
        })
    })?;
    if let Some(c) = c {
        for (o, v) in out.iter_mut().zip(c) {
            *o += beta * v;
        }
    }
    Ok(Some(Tensor::from_vec(out, (m, n), &Device::Cpu)?))
}

/// Outputs of a [`gemm_by_rows`] row per task when it is split across threads.
const DOTS_PER_TASK: usize = 64;

/// `out[j] = alpha * dot(row, cols[j])` for B's rows `cols` (each as long as `row`),
/// compiled for the CPU's vector width: outside such a dispatch an auto-vectorized dot
/// builds for the baseline x86-64 (4 lanes, no fused multiply-add), and a classifier's
/// weights were read twice as slowly.
struct Dots<'a> {
    row: &'a [f32],
    cols: &'a [f32],
    alpha: f32,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Dots<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Dots { row, cols, alpha, out } = self;
        for (o, col) in out.iter_mut().zip(cols.chunks_exact(row.len().max(1))) {
            *o = alpha * dot_in(simd, row, col);
        }
    }
}

/// The dot product of two equally long rows in four vector sums, so the multiply-adds
/// do not wait on each other.
#[inline(always)]
fn dot_in<S: pulp::Simd>(simd: S, x: &[f32], y: &[f32]) -> f32 {
    let ((xv, xt), (yv, yt)) = (S::as_simd_f32s(x), S::as_simd_f32s(y));
    let zero = simd.splat_f32s(0.0);
    let mut sums = [zero; 4];
    let (xc, yc) = (xv.chunks_exact(4), yv.chunks_exact(4));
    for (x, y) in xc.remainder().iter().zip(yc.remainder()) {
        sums[0] = simd.mul_add_e_f32s(*x, *y, sums[0]);
    }
    for (x, y) in xc.zip(yc) {
        for ((s, &x), &y) in sums.iter_mut().zip(x).zip(y) {
            *s = simd.mul_add_e_f32s(x, y, *s);
        }
    }
    let total = simd.add_f32s(simd.add_f32s(sums[0], sums[1]), simd.add_f32s(sums[2], sums[3]));
    let tail: f32 = xt.iter().zip(yt).map(|(a, b)| a * b).sum();
    simd.reduce_sum_f32s(total) + tail
}

/// The most multiply-adds [`small_batched_matmul`] takes: beyond it, candle's matmul, which
/// reads transposed operands in place instead of copying them, is faster.
const SMALL_MATMUL_MAX_WORK: usize = 1 << 18;

/// Batched matmul of `[..., m, k]` by `[..., k, n]` with broadcast batch dimensions, when
/// the whole product is small (attention heads, small dense layers): each product on the
/// calling thread, without candle's per-call set-up; `None` when it is not small.
fn small_batched_matmul(a: &Tensor, b: &Tensor) -> R<Option<Tensor>> {
    let (ad, bd) = (a.dims(), b.dims());
    let (ra, rb) = (ad.len(), bd.len());
    if ra < 2 || rb < 2 {
        return Ok(None);
    }
    let (m, k, n) = (ad[ra - 2], ad[ra - 1], bd[rb - 1]);
    let batch_shape = broadcast_shape(&ad[..ra - 2], &bd[..rb - 2])?;
    let batch: usize = batch_shape.iter().product();
    let work = batch.saturating_mul(m).saturating_mul(k).saturating_mul(n);
    if work > SMALL_MATMUL_MAX_WORK {
        return Ok(None);
    }
    let mut a_shape = batch_shape.clone();
    a_shape.extend([m, k]);
    let mut b_shape = batch_shape.clone();
    b_shape.extend([k, n]);
    let a = a.broadcast_as(a_shape)?.contiguous()?;
    let b = b.broadcast_as(b_shape)?.contiguous()?;
    let mut out = vec![0f32; batch * m * n];
    kernels::with_f32(&a, |av| {
        kernels::with_f32(&b, |bv| {
            for (i, o) in out.chunks_exact_mut((m * n).max(1)).enumerate().take(batch) {
                let (Some(x), Some(y)) =
                    (av.get(i * m * k..(i + 1) * m * k), bv.get(i * k * n..(i + 1) * k * n))
                else {
                    return err("matmul operand shorter than its shape");
                };
                kernels::sgemm(m, n, k, x, y, o, false)?;
            }
            Ok(())
        })
    })?;
    let mut out_shape = batch_shape;
    out_shape.extend([m, n]);
    Ok(Some(Tensor::from_vec(out, out_shape, &Device::Cpu)?))
}

fn matmul(a: &Tensor, b: &Tensor) -> R<Tensor> {
    f32_only(a, "A")?;
    f32_only(b, "B")?;
    if a.rank() == 0 || b.rank() == 0 {
        return err("MatMul inputs must have at least one dimension");
    }
    let a_vec = a.rank() == 1;
    let b_vec = b.rank() == 1;
    let a = if a_vec { a.unsqueeze(0)? } else { a.clone() };
    let b = if b_vec { b.unsqueeze(1)? } else { b.clone() };
    let (ad, bd) = (a.dims(), b.dims());
    let (Some(&k1), Some(&k2)) = (ad.last(), bd.get(bd.len().saturating_sub(2))) else {
        return err("bad shapes");
    };
    if k1 != k2 {
        return err(format!("shapes {ad:?} and {bd:?} have different inner dimensions"));
    }
    broadcast_shape(&ad[..ad.len() - 2], &bd[..bd.len() - 2])?;
    let mut y = if let Some(y) = small_batched_matmul(&a, &b)? {
        y
    } else if ad.len() == 2 && bd.len() == 2 {
        a.matmul(&b)?
    } else if bd.len() == 2 {
        // A batch of rows times one matrix: one big matmul.
        let rows = ad.iter().take(ad.len() - 1).product::<usize>();
        let mut dims = ad.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = bd.get(1).copied().unwrap_or(0);
        }
        a.reshape((rows, k1))?.matmul(&b)?.reshape(dims)?
    } else {
        a.contiguous()?.broadcast_matmul(&b.contiguous()?)?
    };
    if b_vec {
        y = y.squeeze(y.rank() - 1)?;
    }
    if a_vec {
        y = y.squeeze(y.rank().saturating_sub(if b_vec { 1 } else { 2 }))?;
    }
    Ok(y)
}

/// Softmax / LogSoftmax in one pass per row over the f32 data: no intermediate tensors,
/// which dominate the cost at the sizes of attention scores.
fn softmax(x: &Tensor, axis: i64, legacy: bool, log: bool) -> R<Tensor> {
    f32_only(x, "input")?;
    let rank = x.rank();
    if rank == 0 {
        return err("Softmax needs at least one dimension");
    }
    let dims = x.dims().to_vec();
    // Rows of `len` values, `inner` apart: (outer, len, inner).
    let (len, inner) = if legacy {
        let a = if axis < 0 { axis + rank as i64 } else { axis };
        if !(0..=rank as i64).contains(&a) {
            return err(format!("axis {axis} is out of range for rank {rank}"));
        }
        (dims.iter().skip(a as usize).product::<usize>(), 1)
    } else {
        let a = axis_index(axis, rank)?;
        (dims.get(a).copied().unwrap_or(1), dims.iter().skip(a + 1).product::<usize>())
    };
    let mut out = kernels::with_f32(x, |xs| Ok(xs.to_vec()))?;
    let block = len * inner;
    if block > 0 && inner == 1 {
        // Rows of consecutive values (the last axis): in place, all in one pass.
        math::softmax_rows(&mut out, len, log);
    } else if block > 0 {
        let mut row = vec![0f32; len];
        for values in out.chunks_exact_mut(block) {
            for i in 0..inner {
                for (r, v) in row.iter_mut().zip(values.iter().skip(i).step_by(inner)) {
                    *r = *v;
                }
                softmax_row(&mut row, log);
                for (v, r) in values.iter_mut().skip(i).step_by(inner).zip(&row) {
                    *v = *r;
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
}

fn softmax_row(row: &mut [f32], log: bool) {
    math::softmax_rows(row, row.len(), log);
}

/// Per-channel scale and shift of an inference-mode BatchNormalization.
fn bn_scale_shift(
    scale: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f32,
) -> R<(Vec<f32>, Vec<f32>)> {
    let (s, b, m, v) = (f32_data(scale)?, f32_data(bias)?, f32_data(mean)?, f32_data(var)?);
    let c = s.len();
    if b.len() != c || m.len() != c || v.len() != c {
        return err("scale, B, mean and var must have the same length");
    }
    let mut mul = Vec::with_capacity(c);
    let mut add = Vec::with_capacity(c);
    for i in 0..c {
        let (s, b, m, v) = (s[i], b[i], m[i], v[i]);
        let k = s / (v + epsilon).sqrt();
        mul.push(k);
        add.push(b - m * k);
    }
    Ok((mul, add))
}

/// `W' = W * k`, `b' = (b - mean) * k + beta` with `k = gamma / sqrt(var + eps)`.
pub(crate) fn fold_bn_into_conv(
    w: &Tensor,
    b: Option<&Tensor>,
    scale: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f32,
) -> R<(Tensor, Tensor)> {
    f32_only(w, "Conv weight")?;
    let (mul, add) = bn_scale_shift(scale, bias, mean, var, epsilon)?;
    let m = w.dims().first().copied().unwrap_or(0);
    if mul.len() != m {
        return err(format!("{} BatchNormalization channels for {m} Conv outputs", mul.len()));
    }
    let mut shape = vec![1usize; w.rank()];
    if let Some(first) = shape.first_mut() {
        *first = m;
    }
    let k = Tensor::from_vec(mul.clone(), shape, &Device::Cpu)?;
    let new_w = w.broadcast_mul(&k)?;
    let old_b = match b {
        Some(b) => f32_data(b)?,
        None => vec![0.0; m],
    };
    if old_b.len() != m {
        return err("Conv bias length differs from its output channels");
    }
    let new_b: Vec<f32> = (0..m).map(|i| old_b[i] * mul[i] + add[i]).collect();
    Ok((new_w, Tensor::from_vec(new_b, m, &Device::Cpu)?))
}

fn batch_norm(args: &[Option<&Tensor>], epsilon: f32) -> R<Tensor> {
    let x = req(args, 0)?;
    f32_only(x, "X")?;
    let (mul, add) =
        bn_scale_shift(req(args, 1)?, req(args, 2)?, req(args, 3)?, req(args, 4)?, epsilon)?;
    let c = x.dims().get(1).copied().unwrap_or(0);
    if x.rank() < 2 || mul.len() != c {
        return err(format!("X {:?} does not have {} channels", x.dims(), mul.len()));
    }
    let mut shape = vec![1usize; x.rank()];
    if let Some(d) = shape.get_mut(1) {
        *d = c;
    }
    let k = Tensor::from_vec(mul, shape.as_slice(), &Device::Cpu)?;
    let s = Tensor::from_vec(add, shape.as_slice(), &Device::Cpu)?;
    Ok(x.broadcast_mul(&k)?.broadcast_add(&s)?)
}

fn global_pool(x: &Tensor, kind: PoolKind) -> R<Tensor> {
    f32_only(x, "X")?;
    let dims = x.dims();
    if dims.len() < 3 {
        return err(format!("X must be N x C x spatial, got {dims:?}"));
    }
    let (n, c) = (dims[0], dims[1]);
    let flat = x.reshape((n, c, dims[2..].iter().product::<usize>()))?;
    let y = match kind {
        PoolKind::Average => flat.mean_keepdim(2)?,
        PoolKind::Max => flat.max_keepdim(2)?,
    };
    let mut out = vec![n, c];
    out.extend(std::iter::repeat_n(1, dims.len() - 2));
    Ok(y.reshape(out)?)
}

fn reshape(x: &Tensor, shape: &Tensor, allowzero: bool) -> R<Tensor> {
    let want = i64_data(shape, "shape")?;
    let dims = x.dims();
    let mut out = Vec::with_capacity(want.len());
    let mut infer = None;
    for (i, &d) in want.iter().enumerate() {
        out.push(match d {
            0 if !allowzero => match dims.get(i) {
                Some(&v) => v,
                None => {
                    return err(format!("shape {want:?} copies dimension {i}, input is {dims:?}"))
                }
            },
            -1 if infer.is_none() => {
                infer = Some(i);
                1
            }
            d if d >= 0 => d as usize,
            _ => return err(format!("invalid shape {want:?}")),
        });
    }
    let total = x.elem_count();
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return err(format!("cannot reshape {dims:?} into {want:?}"));
        }
        if let Some(slot) = out.get_mut(i) {
            *slot = total / known;
        }
    }
    if elements(&out)? != total {
        return err(format!("cannot reshape {dims:?} ({total} elements) into {want:?}"));
    }
    Ok(x.reshape(out)?)
}

fn transpose(x: &Tensor, perm: &Option<Vec<i64>>) -> R<Tensor> {
    let rank = x.rank();
    let perm: Vec<usize> = match perm {
        Some(p) => p.iter().map(|&a| axis_index(a, rank)).collect::<R<_>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = vec![false; rank];
    for &p in &perm {
        match seen.get_mut(p) {
            Some(s) if !*s => *s = true,
            _ => return err(format!("perm {perm:?} is not a permutation of rank {rank}")),
        }
    }
    if perm.len() != rank {
        return err(format!("perm {perm:?} is not a permutation of rank {rank}"));
    }
    Ok(x.permute(perm)?)
}

fn axes_from(
    args: &[Option<&Tensor>],
    index: usize,
    attr: &Option<Vec<i64>>,
) -> R<Option<Vec<i64>>> {
    match opt(args, index) {
        Some(t) => Ok(Some(i64_data(t, "axes")?)),
        None => Ok(attr.clone()),
    }
}

fn squeeze(x: &Tensor, axes: Option<Vec<i64>>) -> R<Tensor> {
    let dims = x.dims();
    let out: Vec<usize> = match axes {
        None => dims.iter().copied().filter(|&d| d != 1).collect(),
        Some(axes) => {
            let axes: Vec<usize> =
                axes.iter().map(|&a| axis_index(a, dims.len())).collect::<R<_>>()?;
            for &a in &axes {
                if dims.get(a) != Some(&1) {
                    return err(format!("cannot squeeze axis {a} of shape {dims:?}: not 1"));
                }
            }
            dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
        }
    };
    Ok(x.reshape(out)?)
}

fn unsqueeze(x: &Tensor, axes: &[i64]) -> R<Tensor> {
    let rank = x.rank() + axes.len();
    let mut axes: Vec<usize> = axes.iter().map(|&a| axis_index(a, rank)).collect::<R<_>>()?;
    axes.sort_unstable();
    if axes.windows(2).any(|w| w[0] == w[1]) {
        return err(format!("axes {axes:?} repeat"));
    }
    let mut src = x.dims().iter();
    let out: Vec<usize> = (0..rank)
        .map(|i| if axes.contains(&i) { 1 } else { src.next().copied().unwrap_or(1) })
        .collect();
    Ok(x.reshape(out)?)
}

fn gather(data: &Tensor, indices: &Tensor, axis: i64) -> R<Tensor> {
    let axis = axis_index(axis, data.rank())?;
    let dims = data.dims();
    let n = dims.get(axis).copied().unwrap_or(0) as i64;
    let idx = i64_data(indices, "indices")?;
    let idx: Vec<i64> = idx
        .into_iter()
        .map(|i| {
            let j = if i < 0 { i + n } else { i };
            if (0..n).contains(&j) {
                Ok(j)
            } else {
                err(format!("index {i} is out of range for axis {axis} of size {n}"))
            }
        })
        .collect::<R<_>>()?;
    let count = idx.len();
    let flat = Tensor::from_vec(idx, count, &Device::Cpu)?;
    let picked = data.contiguous()?.index_select(&flat, axis)?;
    let mut out: Vec<usize> = dims[..axis].to_vec();
    out.extend_from_slice(indices.dims());
    out.extend_from_slice(&dims[axis + 1..]);
    Ok(picked.reshape(out)?)
}

fn cast(x: &Tensor, to: DType) -> R<Tensor> {
    if x.dtype() == to {
        return Ok(x.clone());
    }
    if to == DType::U8 {
        let zero = Tensor::zeros((), x.dtype(), &Device::Cpu)?;
        return Ok(x.broadcast_ne(&zero)?);
    }
    Ok(x.to_dtype(to)?)
}

fn layer_norm(args: &[Option<&Tensor>], axis: i64, epsilon: f32) -> R<Vec<Tensor>> {
    let x = req(args, 0)?;
    f32_only(x, "X")?;
    let dims = x.dims().to_vec();
    let axis = axis_index(axis, dims.len())?;
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis..].iter().product();
    let scale = req(args, 1)?;
    broadcast_shape(&dims, scale.dims())?;
    let bias = opt(args, 2);
    if let Some(b) = bias {
        broadcast_shape(&dims, b.dims())?;
    }
    let mut stat_dims = dims[..axis].to_vec();
    stat_dims.extend(std::iter::repeat_n(1, dims.len() - axis));
    // Scale and bias over exactly the normalized axes (the usual case): one pass per row.
    let per_row = |t: &Tensor| {
        t.dtype() == DType::F32
            && t.elem_count() == inner
            && t.dims().iter().rev().zip(dims.iter().rev()).all(|(a, b)| a == b)
    };
    if inner > 0 && per_row(scale) && bias.is_none_or(per_row) {
        let gamma = f32_data(scale)?;
        let beta = match bias {
            Some(b) => f32_data(b)?,
            None => vec![0.0; inner],
        };
        let mut out = kernels::with_f32(x, |xs| Ok(xs.to_vec()))?;
        let (means, invs) = math::layer_norm_rows(&mut out, &gamma, &beta, epsilon);
        return Ok(vec![
            Tensor::from_vec(out, dims.as_slice(), &Device::Cpu)?,
            Tensor::from_vec(means, stat_dims.as_slice(), &Device::Cpu)?,
            Tensor::from_vec(invs, stat_dims.as_slice(), &Device::Cpu)?,
        ]);
    }
    let x2 = x.reshape((outer, inner))?;
    let mean = x2.mean_keepdim(1)?;
    let centered = x2.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(1)?;
    let inv = (var + f64::from(epsilon))?.sqrt()?.recip()?;
    let mut y = centered.broadcast_mul(&inv)?.reshape(dims.as_slice())?;
    y = y.broadcast_mul(scale)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(vec![y, mean.reshape(stat_dims.as_slice())?, inv.reshape(stat_dims.as_slice())?])
}

fn reduce(
    x: &Tensor,
    kind: ReduceKind,
    axes: Option<Vec<i64>>,
    keepdims: bool,
    noop: bool,
) -> R<Tensor> {
    let rank = x.rank();
    let axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => {
            let mut v: Vec<usize> = a.iter().map(|&a| axis_index(a, rank)).collect::<R<_>>()?;
            v.sort_unstable();
            v.dedup();
            v
        }
        _ if noop => return Ok(x.clone()),
        _ => (0..rank).collect(),
    };
    if kind == ReduceKind::Mean {
        f32_only(x, "X")?;
    }
    let mut y = x.clone();
    for &a in &axes {
        y = match kind {
            ReduceKind::Sum => y.sum_keepdim(a)?,
            ReduceKind::Mean => y.mean_keepdim(a)?,
            ReduceKind::Max => y.max_keepdim(a)?,
            ReduceKind::Min => y.min_keepdim(a)?,
        };
    }
    if keepdims {
        return Ok(y);
    }
    let out: Vec<usize> =
        y.dims().iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
    Ok(y.reshape(out)?)
}

fn slice(
    x: &Tensor,
    starts: &[i64],
    ends: &[i64],
    axes: Option<Vec<i64>>,
    steps: Option<Vec<i64>>,
) -> R<Tensor> {
    let rank = x.rank();
    if starts.len() != ends.len() {
        return err("starts and ends have different lengths");
    }
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| axis_index(a, rank)).collect::<R<_>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if axes.len() != starts.len() || steps.len() != starts.len() {
        return err("starts, ends, axes and steps must have the same length");
    }
    let mut y = x.clone();
    for (((&start, &end), &axis), &step) in starts.iter().zip(ends).zip(&axes).zip(&steps) {
        let d = y.dims().get(axis).copied().unwrap_or(0) as i64;
        if step == 0 {
            return err("steps must not be 0");
        }
        let fix = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (s, e) = (fix(start), fix(end));
        let (s, e) = if step > 0 {
            (s.clamp(0, d), e.clamp(0, d))
        } else {
            (s.clamp(0, (d - 1).max(0)), e.clamp(-1, d - 1))
        };
        if step == 1 {
            y = y.narrow(axis, s as usize, (e - s).max(0) as usize)?;
            continue;
        }
        let mut idx = Vec::new();
        let mut i = s;
        while (step > 0 && i < e) || (step < 0 && i > e) {
            idx.push(i);
            i = match i.checked_add(step) {
                Some(v) => v,
                None => break,
            };
        }
        let n = idx.len();
        y = y.contiguous()?.index_select(&Tensor::from_vec(idx, n, &Device::Cpu)?, axis)?;
    }
    Ok(y)
}

fn split(x: &Tensor, axis: i64, sizes: Option<Vec<i64>>, outputs: usize) -> R<Vec<Tensor>> {
    let axis = axis_index(axis, x.rank())?;
    let d = x.dims().get(axis).copied().unwrap_or(0);
    let sizes: Vec<usize> = match sizes {
        Some(s) => s
            .iter()
            .map(|&v| usize::try_from(v).map_err(|_| OpError(format!("negative split {v}"))))
            .collect::<R<_>>()?,
        None => {
            let chunk = d.div_ceil(outputs.max(1));
            (0..outputs).map(|i| chunk.min(d.saturating_sub(i * chunk))).collect()
        }
    };
    if sizes.len() != outputs || sizes.iter().sum::<usize>() != d {
        return err(format!(
            "split {sizes:?} does not divide dimension {d} into {outputs} outputs"
        ));
    }
    let mut start = 0;
    let mut out = Vec::with_capacity(outputs);
    for s in sizes {
        out.push(x.narrow(axis, start, s)?);
        start += s;
    }
    Ok(out)
}

fn where_op(c: &Tensor, x: &Tensor, y: &Tensor) -> R<Tensor> {
    same_dtype(x, y)?;
    let c = if c.dtype() == DType::U8 { c.clone() } else { cast(c, DType::U8)? };
    let shape = broadcast_shape(&broadcast_shape(c.dims(), x.dims())?, y.dims())?;
    let c = c.broadcast_as(shape.as_slice())?.contiguous()?;
    let x = x.broadcast_as(shape.as_slice())?.contiguous()?;
    let y = y.broadcast_as(shape.as_slice())?.contiguous()?;
    Ok(c.where_cond(&x, &y)?)
}

fn shape_dims(t: &Tensor) -> R<Vec<usize>> {
    i64_data(t, "shape")?
        .iter()
        .map(|&v| usize::try_from(v).map_err(|_| OpError(format!("negative dimension {v}"))))
        .collect()
}

fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> R<Tensor> {
    same_dtype(start, limit)?;
    same_dtype(start, delta)?;
    match start.dtype() {
        DType::I64 => {
            let one = |t: &Tensor| -> R<i64> {
                match i64_data(t, "Range input")?.as_slice() {
                    [v] => Ok(*v),
                    _ => err("Range inputs must be scalars"),
                }
            };
            let (s, l, d) = (one(start)?, one(limit)?, one(delta)?);
            if d == 0 {
                return err("delta must not be 0");
            }
            let n = (l as i128 - s as i128 + d as i128 - d.signum() as i128) / d as i128;
            let n = usize::try_from(n.max(0)).unwrap_or(usize::MAX);
            elements(&[n])?;
            let v: Vec<i64> = (0..n as i64).map(|i| s.wrapping_add(i.wrapping_mul(d))).collect();
            Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
        }
        DType::F32 => {
            let (s, l, d) = (
                scalar_f32(start, "start")?,
                scalar_f32(limit, "limit")?,
                scalar_f32(delta, "delta")?,
            );
            let n = ((l - s) / d).ceil();
            if !n.is_finite() {
                return err("Range length is not finite");
            }
            let n = n.max(0.0) as usize;
            elements(&[n])?;
            let v: Vec<f32> = (0..n).map(|i| s + i as f32 * d).collect();
            Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
        }
        other => err(format!("Range on {other:?} is not supported")),
    }
}

fn arg_max(x: &Tensor, axis: i64, keepdims: bool, last: bool) -> R<Tensor> {
    let axis = axis_index(axis, x.rank())?;
    let y = if last {
        // The last maximum of x is the first maximum of x reversed along the axis.
        let d = x.dims().get(axis).copied().unwrap_or(0);
        let rev: Vec<i64> = (0..d as i64).rev().collect();
        let flipped =
            x.contiguous()?.index_select(&Tensor::from_vec(rev, d, &Device::Cpu)?, axis)?;
        let first = flipped.argmax_keepdim(axis)?.to_dtype(DType::I64)?;
        let top = Tensor::full(d as i64 - 1, first.dims(), &Device::Cpu)?;
        (top - first)?
    } else {
        x.argmax_keepdim(axis)?.to_dtype(DType::I64)?
    };
    if keepdims {
        Ok(y)
    } else {
        Ok(y.squeeze(axis)?)
    }
}

/// Runs one operator on its inputs (`None` for omitted optional inputs).
pub(crate) fn eval(op: &Op, args: &[Option<&Tensor>]) -> R<Vec<Tensor>> {
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            one(gemm(args, *alpha, *beta, *trans_a, *trans_b)?)
        }
        Op::MatMul => one(matmul(req(args, 0)?, req(args, 1)?)?),
        Op::Binary(b) => {
            let mut acc = req(args, 0)?.clone();
            for i in 1..args.len() {
                acc = binary(*b, &acc, req(args, i)?)?;
            }
            one(acc)
        }
        Op::Unary(u) => one(unary(*u, req(args, 0)?)?),
        Op::Clip { min, max } => {
            let x = req(args, 0)?;
            let lo = match opt(args, 1) {
                Some(t) => Some(scalar_f32(t, "min")?),
                None => *min,
            };
            let hi = match opt(args, 2) {
                Some(t) => Some(scalar_f32(t, "max")?),
                None => *max,
            };
            match x.dtype() {
                DType::F32 => {
                    let (lo, hi) = (lo.unwrap_or(f32::NEG_INFINITY), hi.unwrap_or(f32::INFINITY));
                    one(map_f32(x, |v| v.max(lo).min(hi))?)
                }
                DType::I64 => {
                    let v = i64_data(x, "input")?;
                    let (lo, hi) =
                        (lo.map_or(i64::MIN, |v| v as i64), hi.map_or(i64::MAX, |v| v as i64));
                    let v: Vec<i64> = v.into_iter().map(|v| v.max(lo).min(hi)).collect();
                    one(Tensor::from_vec(v, x.dims(), &Device::Cpu)?)
                }
                other => err(format!("Clip on {other:?} is not supported")),
            }
        }
        Op::HardSigmoid { alpha, beta } => {
            let x = req(args, 0)?;
            f32_only(x, "X")?;
            let (a, b) = (*alpha, *beta);
            one(map_f32(x, |v| (a * v + b).clamp(0.0, 1.0))?)
        }
        Op::HardSwish => {
            let x = req(args, 0)?;
            f32_only(x, "X")?;
            one(map_f32(x, |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0))?)
        }
        Op::Gelu { tanh } => {
            let x = req(args, 0)?;
            f32_only(x, "X")?;
            one(if *tanh { x.gelu()? } else { map_math(x, math::Func::Gelu)? })
        }
        Op::Softmax { axis, legacy, log } => one(softmax(req(args, 0)?, *axis, *legacy, *log)?),
        Op::Conv(attrs) | Op::PackedConv(attrs) | Op::WinogradConv(attrs) => {
            let (x, w, b) = (req(args, 0)?, req(args, 1)?, opt(args, 2));
            let run = |attrs: &ConvAttrs, residual: Option<&[f32]>| match op {
                Op::WinogradConv(_) => winograd::conv(x, w, b, attrs, residual),
                _ => kernels::conv(x, w, b, attrs, matches!(op, Op::PackedConv(_)), residual),
            };
            one(conv_with_residual(op, x, w, attrs, opt(args, 3), run)?)
        }
        Op::BatchNorm { epsilon } => one(batch_norm(args, *epsilon)?),
        Op::Pool(kind, attrs) => one(kernels::pool(req(args, 0)?, *kind, attrs)?),
        Op::GlobalPool(kind) => one(global_pool(req(args, 0)?, *kind)?),
        Op::Flatten { axis } => {
            let x = req(args, 0)?;
            let rank = x.rank() as i64;
            let a = if *axis < 0 { axis + rank } else { *axis };
            if !(0..=rank).contains(&a) {
                return err(format!("axis {axis} is out of range for rank {rank}"));
            }
            let outer: usize = x.dims().iter().take(a as usize).product();
            let inner: usize = x.dims().iter().skip(a as usize).product();
            one(x.reshape((outer, inner))?)
        }
        Op::Reshape { allowzero } => one(reshape(req(args, 0)?, req(args, 1)?, *allowzero)?),
        Op::Transpose { perm } => one(transpose(req(args, 0)?, perm)?),
        Op::Concat { axis } => {
            let inputs: Vec<&Tensor> = args.iter().flatten().copied().collect();
            let first = inputs.first().ok_or_else(|| OpError("no inputs".into()))?;
            let axis = axis_index(*axis, first.rank())?;
            for t in &inputs {
                same_dtype(first, t)?;
                let ok = t.rank() == first.rank()
                    && t.dims()
                        .iter()
                        .zip(first.dims())
                        .enumerate()
                        .all(|(i, (a, b))| i == axis || a == b);
                if !ok {
                    return err(format!(
                        "cannot concatenate {:?} and {:?} on axis {axis}",
                        first.dims(),
                        t.dims()
                    ));
                }
            }
            one(Tensor::cat(&inputs, axis)?)
        }
        Op::Squeeze { axes } => one(squeeze(req(args, 0)?, axes_from(args, 1, axes)?)?),
        Op::Unsqueeze { axes } => {
            let axes =
                axes_from(args, 1, axes)?.ok_or_else(|| OpError("axes are required".into()))?;
            one(unsqueeze(req(args, 0)?, &axes)?)
        }
        Op::Gather { axis } => one(gather(req(args, 0)?, req(args, 1)?, *axis)?),
        Op::Shape { start, end } => {
            let dims = req(args, 0)?.dims();
            let r = dims.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (s, e) = (clamp(*start), clamp(end.unwrap_or(r)));
            let v: Vec<i64> =
                dims.get(s..e.max(s)).unwrap_or_default().iter().map(|&d| d as i64).collect();
            let n = v.len();
            one(Tensor::from_vec(v, n, &Device::Cpu)?)
        }
        Op::Cast { to } => one(cast(req(args, 0)?, *to)?),
        Op::Identity => one(req(args, 0)?.clone()),
        Op::LayerNorm { axis, epsilon } => layer_norm(args, *axis, *epsilon),
        Op::Reduce { kind, axes, keepdims, noop_empty } => {
            one(reduce(req(args, 0)?, *kind, axes_from(args, 1, axes)?, *keepdims, *noop_empty)?)
        }
        Op::Slice { attrs } => {
            let x = req(args, 0)?;
            match attrs {
                Some(sa) => one(slice(x, &sa.starts, &sa.ends, sa.axes.clone(), None)?),
                None => {
                    let s = i64_data(req(args, 1)?, "starts")?;
                    let e = i64_data(req(args, 2)?, "ends")?;
                    let a = opt(args, 3).map(|t| i64_data(t, "axes")).transpose()?;
                    let st = opt(args, 4).map(|t| i64_data(t, "steps")).transpose()?;
                    one(slice(x, &s, &e, a, st)?)
                }
            }
        }
        Op::Split { axis, split: attr, outputs } => {
            let sizes = match opt(args, 1) {
                Some(t) => Some(i64_data(t, "split")?),
                None => attr.clone(),
            };
            split(req(args, 0)?, *axis, sizes, *outputs)
        }
        Op::Where => one(where_op(req(args, 0)?, req(args, 1)?, req(args, 2)?)?),
        Op::Expand => {
            let x = req(args, 0)?;
            let shape = broadcast_shape(x.dims(), &shape_dims(req(args, 1)?)?)?;
            one(x.broadcast_as(shape)?)
        }
        Op::ConstantOfShape { value } => {
            let dims = shape_dims(req(args, 0)?)?;
            let n = elements(&dims)?;
            one(value.broadcast_as(n)?.contiguous()?.reshape(dims)?)
        }
        Op::Range => one(range(req(args, 0)?, req(args, 1)?, req(args, 2)?)?),
        Op::Constant(t) => one(t.clone()),
        Op::ArgMax { axis, keepdims, last } => {
            one(arg_max(req(args, 0)?, *axis, *keepdims, *last)?)
        }
        Op::ConvTranspose(attrs) => {
            one(kernels::conv_transpose(req(args, 0)?, req(args, 1)?, opt(args, 2), attrs)?)
        }
        Op::Pad { mode, pads, value } => {
            let x = req(args, 0)?;
            let pads = match pads {
                Some(p) => p.clone(),
                None => i64_data(req(args, 1)?, "pads")?,
            };
            let fill = match opt(args, 2) {
                Some(v) if v.elem_count() == 1 => v.to_dtype(x.dtype())?.flatten_all()?,
                Some(v) => return err(format!("constant_value has shape {:?}", v.dims())),
                None => Tensor::new(&[*value], &Device::Cpu)?.to_dtype(x.dtype())?,
            };
            let axes = opt(args, 3).map(|t| i64_data(t, "axes")).transpose()?;
            one(pad(x, *mode, &pads, &fill, axes)?)
        }
        Op::Resize { mode, coord, scales_input } => {
            let x = req(args, 0)?;
            let scales =
                opt(args, *scales_input).map(f32_data).transpose()?.filter(|s| !s.is_empty());
            let sizes = opt(args, scales_input + 1)
                .map(|t| i64_data(t, "sizes"))
                .transpose()?
                .filter(|s| !s.is_empty());
            one(resize(x, *mode, *coord, scales, sizes)?)
        }
        Op::TopK { k, axis, largest } => {
            let k = match k {
                Some(k) => *k,
                None => match i64_data(req(args, 1)?, "K")?.as_slice() {
                    [k] => *k,
                    _ => return err("K must hold one value"),
                },
            };
            top_k(req(args, 0)?, k, *axis, *largest)
        }
    }
}

fn pad(
    x: &Tensor,
    mode: PadMode,
    pads: &[i64],
    fill: &Tensor,
    axes: Option<Vec<i64>>,
) -> R<Tensor> {
    let rank = x.rank();
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| axis_index(a, rank)).collect::<R<_>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return err(format!("pads has {} values, expected {}", pads.len(), 2 * axes.len()));
    }
    let mut y = x.clone();
    for (i, &axis) in axes.iter().enumerate() {
        let (b, e) =
            (pads.get(i).copied().unwrap_or(0), pads.get(i + axes.len()).copied().unwrap_or(0));
        let d = y.dims().get(axis).copied().unwrap_or(0) as i64;
        // Negative pads crop.
        let (cb, ce) = ((-b).max(0), (-e).max(0));
        if cb + ce > d {
            return err(format!("pads {pads:?} crop more than dimension {d}"));
        }
        if cb + ce > 0 {
            y = y.narrow(axis, cb as usize, (d - cb - ce) as usize)?;
        }
        let (b, e) = (b.max(0), e.max(0));
        if b == 0 && e == 0 {
            continue;
        }
        let d = y.dims().get(axis).copied().unwrap_or(0) as i64;
        let mut shape = y.dims().to_vec();
        if let Some(s) = shape.get_mut(axis) {
            *s = (d + b + e) as usize;
        }
        elements(&shape)?;
        if mode == PadMode::Constant {
            let mut parts = Vec::with_capacity(3);
            for (len, body) in [(b, false), (0, true), (e, false)] {
                if body {
                    parts.push(y.clone());
                } else if len > 0 {
                    let mut s = y.dims().to_vec();
                    if let Some(v) = s.get_mut(axis) {
                        *v = len as usize;
                    }
                    parts.push(fill.reshape(())?.broadcast_as(s)?.contiguous()?);
                }
            }
            y = Tensor::cat(&parts, axis)?;
            continue;
        }
        if d == 0 {
            return err("cannot reflect, repeat or wrap an empty dimension");
        }
        let idx: Vec<i64> = (-b..d + e)
            .map(|j| match mode {
                PadMode::Edge => j.clamp(0, d - 1),
                PadMode::Wrap => j.rem_euclid(d),
                _ if d == 1 => 0,
                _ => {
                    let r = j.rem_euclid(2 * (d - 1));
                    if r >= d {
                        2 * (d - 1) - r
                    } else {
                        r
                    }
                }
            })
            .collect();
        let n = idx.len();
        y = y.contiguous()?.index_select(&Tensor::from_vec(idx, n, &Device::Cpu)?, axis)?;
    }
    Ok(y)
}

fn resize(
    x: &Tensor,
    mode: ResizeMode,
    coord: CoordMode,
    scales: Option<Vec<f32>>,
    sizes: Option<Vec<i64>>,
) -> R<Tensor> {
    let dims = x.dims().to_vec();
    let rank = dims.len();
    let (outs, scales): (Vec<usize>, Vec<f32>) = match (sizes, scales) {
        (Some(sizes), _) => {
            if sizes.len() != rank {
                return err(format!("sizes {sizes:?} do not match rank {rank}"));
            }
            let outs: Vec<usize> = sizes
                .iter()
                .map(|&v| usize::try_from(v).map_err(|_| OpError(format!("negative size {v}"))))
                .collect::<R<_>>()?;
            let scales =
                outs.iter().zip(&dims).map(|(&o, &i)| o as f32 / i.max(1) as f32).collect();
            (outs, scales)
        }
        (None, Some(scales)) => {
            if scales.len() != rank || scales.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
                return err(format!("scales {scales:?} must be {rank} positive numbers"));
            }
            let outs = dims.iter().zip(&scales).map(|(&d, &s)| (d as f32 * s).floor() as usize);
            (outs.collect(), scales)
        }
        (None, None) => return err("Resize needs scales or sizes"),
    };
    elements(&outs)?;
    let mut y = x.clone();
    for axis in 0..rank {
        let (Some(&input), Some(&out), Some(&scale)) =
            (dims.get(axis), outs.get(axis), scales.get(axis))
        else {
            continue;
        };
        if input == out && scale == 1.0 {
            continue;
        }
        if input == 0 {
            return err("cannot resize an empty dimension");
        }
        let source = |o: usize| -> f32 {
            let o = o as f32;
            match coord {
                CoordMode::HalfPixel => (o + 0.5) / scale - 0.5,
                CoordMode::PytorchHalfPixel if out > 1 => (o + 0.5) / scale - 0.5,
                CoordMode::PytorchHalfPixel => 0.0,
                CoordMode::AlignCorners if out > 1 => o * (input - 1) as f32 / (out - 1) as f32,
                CoordMode::AlignCorners => 0.0,
                CoordMode::Asymmetric => o / scale,
                CoordMode::HalfPixelSymmetric => {
                    let adjustment = out as f32 / (scale * input as f32);
                    let center = input as f32 / 2.0;
                    center * (1.0 - adjustment) + (o + 0.5) / scale - 0.5
                }
            }
        };
        let last = (input - 1) as i64;
        let y_c = y.contiguous()?;
        y = match mode {
            ResizeMode::Nearest(rounding) => {
                let idx: Vec<i64> = (0..out)
                    .map(|o| {
                        let s = source(o);
                        let r = match rounding {
                            NearestMode::RoundPreferFloor if s.fract() == 0.5 => s.floor(),
                            NearestMode::RoundPreferFloor | NearestMode::RoundPreferCeil => {
                                s.round()
                            }
                            NearestMode::Floor => s.floor(),
                            NearestMode::Ceil => s.ceil(),
                        };
                        (r as i64).clamp(0, last)
                    })
                    .collect();
                y_c.index_select(&Tensor::from_vec(idx, out, &Device::Cpu)?, axis)?
            }
            ResizeMode::Linear => {
                f32_only(x, "X")?;
                let mut lo = Vec::with_capacity(out);
                let mut hi = Vec::with_capacity(out);
                let mut w = Vec::with_capacity(out);
                for o in 0..out {
                    let s = source(o).clamp(0.0, last as f32);
                    let i0 = (s.floor() as i64).clamp(0, last);
                    lo.push(i0);
                    hi.push((i0 + 1).min(last));
                    w.push(s - i0 as f32);
                }
                let a = y_c.index_select(&Tensor::from_vec(lo, out, &Device::Cpu)?, axis)?;
                let b = y_c.index_select(&Tensor::from_vec(hi, out, &Device::Cpu)?, axis)?;
                let mut wshape = vec![1usize; rank];
                if let Some(v) = wshape.get_mut(axis) {
                    *v = out;
                }
                let w = Tensor::from_vec(w, wshape, &Device::Cpu)?;
                a.broadcast_add(&(b - &a)?.broadcast_mul(&w)?)?
            }
        };
    }
    Ok(y)
}

fn top_k(x: &Tensor, k: i64, axis: i64, largest: bool) -> R<Vec<Tensor>> {
    f32_only(x, "X")?;
    let rank = x.rank();
    let axis = axis_index(axis, rank)?;
    let d = x.dims().get(axis).copied().unwrap_or(0);
    let k = usize::try_from(k)
        .ok()
        .filter(|&k| k <= d)
        .ok_or_else(|| OpError(format!("K={k} must be between 0 and the axis size {d}")))?;
    let last = rank - 1;
    let moved = x.transpose(axis, last)?.contiguous()?;
    let data = f32_data(&moved)?;
    let rows = data.len().checked_div(d).unwrap_or(0);
    let mut values = Vec::with_capacity(rows * k);
    let mut indices = Vec::with_capacity(rows * k);
    let mut order: Vec<usize> = Vec::with_capacity(d);
    for row in data.chunks_exact(d.max(1)).take(rows) {
        order.clear();
        order.extend(0..d);
        // Stable sort: equal values keep the lower index first.
        if largest {
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
        } else {
            order.sort_by(|&i, &j| row[i].total_cmp(&row[j]));
        }
        for &i in order.iter().take(k) {
            values.push(row.get(i).copied().unwrap_or(0.0));
            indices.push(i as i64);
        }
    }
    let mut dims = moved.dims().to_vec();
    if let Some(l) = dims.last_mut() {
        *l = k;
    }
    let values = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?;
    let indices = Tensor::from_vec(indices, dims.as_slice(), &Device::Cpu)?;
    Ok(vec![
        values.transpose(axis, last)?.contiguous()?,
        indices.transpose(axis, last)?.contiguous()?,
    ])
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
