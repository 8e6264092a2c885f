//! The engine behind the server: protocol tensors in, candle tensors
//! through [`crate::engine::Model`], protocol tensors out.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor as CTensor};

use crate::engine::{DataType, Dim, Model, RunError};
use crate::server::{Backend, InferError, TensorMeta};
use crate::v2::{Data, Datatype, Tensor};

/// A loaded ONNX model.
pub struct OnnxBackend {
    model: Model,
    inputs: Vec<TensorMeta>,
    outputs: Vec<TensorMeta>,
}

fn meta(spec: &crate::engine::TensorSpec) -> TensorMeta {
    TensorMeta {
        name: spec.name.clone(),
        datatype: match spec.datatype {
            DataType::F32 => Datatype::F32,
            DataType::I64 => Datatype::I64,
        },
        shape: spec
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                Dim::Dynamic(_) => -1,
            })
            .collect(),
    }
}

/// Loads an ONNX file (the [`crate::store::Loader`] of the runtime).
pub fn load_onnx(bytes: &[u8]) -> Result<Arc<dyn Backend>, String> {
    let model = Model::load(bytes).map_err(|e| e.to_string())?;
    let inputs = model.inputs().iter().map(meta).collect();
    let outputs = model.outputs().iter().map(meta).collect();
    Ok(Arc::new(OnnxBackend { model, inputs, outputs }))
}

fn to_candle(t: &Tensor) -> Result<CTensor, InferError> {
    let bad = |e: candle_core::Error| InferError::BadInput(format!("input {:?}: {e}", t.name));
    match &t.data {
        Data::F32(v) => CTensor::from_slice(v, t.shape.as_slice(), &Device::Cpu).map_err(bad),
        Data::I64(v) => CTensor::from_slice(v, t.shape.as_slice(), &Device::Cpu).map_err(bad),
        Data::F64(v) => CTensor::from_slice(v, t.shape.as_slice(), &Device::Cpu).map_err(bad),
        Data::I32(v) => {
            let v: Vec<i64> = v.iter().map(|&x| i64::from(x)).collect();
            CTensor::from_vec(v, t.shape.as_slice(), &Device::Cpu).map_err(bad)
        }
        Data::U8(v) => CTensor::from_slice(v, t.shape.as_slice(), &Device::Cpu).map_err(bad),
        Data::Bool(_) => Err(InferError::BadInput(format!(
            "input {:?}: BOOL inputs are not supported by this engine",
            t.name
        ))),
    }
}

fn from_candle(name: String, t: &CTensor) -> Result<Tensor, InferError> {
    let fail = |e: candle_core::Error| InferError::Failed(format!("output {name:?}: {e}"));
    let shape = t.dims().to_vec();
    let flat = t.flatten_all().map_err(fail)?;
    let data = match t.dtype() {
        DType::F32 => Data::F32(flat.to_vec1::<f32>().map_err(fail)?),
        DType::F64 => Data::F64(flat.to_vec1::<f64>().map_err(fail)?),
        DType::I64 => Data::I64(flat.to_vec1::<i64>().map_err(fail)?),
        DType::U8 => Data::U8(flat.to_vec1::<u8>().map_err(fail)?),
        other => {
            let f = flat.to_dtype(DType::F32).map_err(fail)?;
            let _ = other;
            Data::F32(f.to_vec1::<f32>().map_err(fail)?)
        }
    };
    Ok(Tensor { name, shape, data })
}

impl Backend for OnnxBackend {
    fn inputs(&self) -> Vec<TensorMeta> {
        self.inputs.clone()
    }

    fn outputs(&self) -> Vec<TensorMeta> {
        self.outputs.clone()
    }

    fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferError> {
        if let Some(extra) = inputs.iter().find(|t| !self.inputs.iter().any(|w| w.name == t.name)) {
            let names: Vec<&str> = self.inputs.iter().map(|w| w.name.as_str()).collect();
            return Err(InferError::BadInput(format!(
                "the model has no input {:?}; its inputs: {}",
                extra.name,
                names.join(", ")
            )));
        }
        for want in &self.inputs {
            let Some(got) = inputs.iter().find(|t| t.name == want.name) else {
                return Err(InferError::BadInput(format!("input {:?} is missing", want.name)));
            };
            if got.data.datatype() != want.datatype {
                return Err(InferError::BadInput(format!(
                    "input {:?} is {}, the model takes {}",
                    want.name,
                    got.data.datatype(),
                    want.datatype
                )));
            }
        }
        let converted: Vec<(String, CTensor)> = inputs
            .iter()
            .map(|t| Ok((t.name.clone(), to_candle(t)?)))
            .collect::<Result<_, InferError>>()?;
        let named: Vec<(&str, CTensor)> =
            converted.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let outputs = self.model.run(&named).map_err(|e| match e {
            RunError::BadInput { .. } => InferError::BadInput(e.to_string()),
            other => InferError::Failed(other.to_string()),
        })?;
        outputs.into_iter().map(|(n, t)| from_candle(n, &t)).collect()
    }
}
