//! The Open Inference Protocol (KServe V2) on the wire: inference requests
//! and responses as JSON, with the binary tensor data extension.
//!
//! A request body is JSON, optionally followed by binary tensor data; the
//! `Inference-Header-Content-Length` header then says where the JSON ends.
//! An input whose `parameters.binary_data_size` is set takes that many
//! bytes (little-endian, row-major) from the binary part, in input order.
//! An output is returned binary when its `parameters.binary_data` is true,
//! or when the request's `parameters.binary_data_output` is (tritonclient
//! sets it when it names no outputs); otherwise as a flat JSON array.
//!
//! Everything here reads untrusted bytes: sizes are checked against the
//! shape before anything is allocated from them, and every problem is a
//! [`ProtocolError`] with a message for the client, never a panic.

use std::fmt;

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// A tensor element type, by its protocol name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Datatype {
    /// `BOOL`, one byte per element.
    Bool,
    /// `UINT8`.
    U8,
    /// `INT32`.
    I32,
    /// `INT64`.
    I64,
    /// `FP32`.
    F32,
    /// `FP64`.
    F64,
}

impl Datatype {
    /// Parses a protocol name (`FP32`).
    pub fn parse(s: &str) -> Option<Datatype> {
        Some(match s {
            "BOOL" => Datatype::Bool,
            "UINT8" => Datatype::U8,
            "INT32" => Datatype::I32,
            "INT64" => Datatype::I64,
            "FP32" => Datatype::F32,
            "FP64" => Datatype::F64,
            _ => return None,
        })
    }

    /// The protocol name.
    pub fn name(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::U8 => "UINT8",
            Datatype::I32 => "INT32",
            Datatype::I64 => "INT64",
            Datatype::F32 => "FP32",
            Datatype::F64 => "FP64",
        }
    }

    /// Bytes per element in the binary encoding.
    pub fn size(self) -> usize {
        match self {
            Datatype::Bool | Datatype::U8 => 1,
            Datatype::I32 | Datatype::F32 => 4,
            Datatype::I64 | Datatype::F64 => 8,
        }
    }
}

impl fmt::Display for Datatype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Tensor elements, in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// `BOOL`.
    Bool(Vec<bool>),
    /// `UINT8`.
    U8(Vec<u8>),
    /// `INT32`.
    I32(Vec<i32>),
    /// `INT64`.
    I64(Vec<i64>),
    /// `FP32`.
    F32(Vec<f32>),
    /// `FP64`.
    F64(Vec<f64>),
}

impl Data {
    /// The element type.
    pub fn datatype(&self) -> Datatype {
        match self {
            Data::Bool(_) => Datatype::Bool,
            Data::U8(_) => Datatype::U8,
            Data::I32(_) => Datatype::I32,
            Data::I64(_) => Datatype::I64,
            Data::F32(_) => Datatype::F32,
            Data::F64(_) => Datatype::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Data::Bool(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian bytes, as the binary extension sends them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn collect<T, const N: usize>(v: &[T], f: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
            let mut out = Vec::with_capacity(v.len() * N);
            for x in v {
                out.extend_from_slice(&f(x));
            }
            out
        }
        match self {
            Data::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
            Data::U8(v) => v.clone(),
            Data::I32(v) => collect(v, |x| x.to_le_bytes()),
            Data::I64(v) => collect(v, |x| x.to_le_bytes()),
            Data::F32(v) => collect(v, |x| x.to_le_bytes()),
            Data::F64(v) => collect(v, |x| x.to_le_bytes()),
        }
    }

    /// Reads `bytes` (exactly elements × size, checked by the caller).
    fn from_le_bytes(dt: Datatype, bytes: &[u8]) -> Result<Data, String> {
        fn chunks<T, const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        Ok(match dt {
            Datatype::Bool => Data::Bool(
                bytes
                    .iter()
                    .map(|&b| match b {
                        0 => Ok(false),
                        1 => Ok(true),
                        _ => Err(format!("a BOOL byte is 0 or 1, not {b}")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Datatype::U8 => Data::U8(bytes.to_vec()),
            Datatype::I32 => Data::I32(chunks(bytes, i32::from_le_bytes)),
            Datatype::I64 => Data::I64(chunks(bytes, i64::from_le_bytes)),
            Datatype::F32 => Data::F32(chunks(bytes, f32::from_le_bytes)),
            Datatype::F64 => Data::F64(chunks(bytes, f64::from_le_bytes)),
        })
    }

    /// The elements as a flat JSON array.
    pub fn to_json(&self) -> Value {
        match self {
            Data::Bool(v) => json!(v),
            Data::U8(v) => json!(v),
            Data::I32(v) => json!(v),
            Data::I64(v) => json!(v),
            // JSON has no NaN or infinity; they become null.
            Data::F32(v) => Value::Array(
                v.iter()
                    .map(|x| {
                        serde_json::Number::from_f64(f64::from(*x))
                            .map_or(Value::Null, Value::Number)
                    })
                    .collect(),
            ),
            Data::F64(v) => Value::Array(
                v.iter()
                    .map(|x| serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number))
                    .collect(),
            ),
        }
    }
}

/// One named tensor of a request or response.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Its name in the model.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its elements.
    pub data: Data,
}

/// A request or response the protocol cannot carry; the message is for
/// the client (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    /// The output's name.
    pub name: String,
    /// Whether to send it binary.
    pub binary: bool,
}

/// A parsed inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's id, echoed back.
    pub id: Option<String>,
    /// The inputs, in request order.
    pub inputs: Vec<Tensor>,
    /// The outputs asked for; empty means all.
    pub outputs: Vec<RequestedOutput>,
    /// Send outputs binary unless an output says otherwise.
    pub binary_output: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RawInput>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// Largest number of elements of one tensor (2^31), far above any edge
/// model's input, so a hostile shape cannot ask for a huge allocation.
pub const MAX_ELEMENTS: usize = 1 << 31;

fn elements(name: &str, shape: &[i64]) -> Result<(Vec<usize>, usize), ProtocolError> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut n: usize = 1;
    for &d in shape {
        let Ok(d) = usize::try_from(d) else {
            return err(format!("input {name:?}: shape {shape:?} has a negative dimension"));
        };
        n = match n.checked_mul(d) {
            Some(n) if n <= MAX_ELEMENTS => n,
            _ => return err(format!("input {name:?}: shape {shape:?} is too large")),
        };
        dims.push(d);
    }
    Ok((dims, n))
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>, limit: usize) -> bool {
    match v {
        Value::Array(items) => items.iter().all(|i| flatten(i, out, limit)),
        other => {
            out.push(other);
            out.len() <= limit
        }
    }
}

fn json_data(name: &str, dt: Datatype, data: &Value, n: usize) -> Result<Data, ProtocolError> {
    let mut flat = Vec::new();
    if !flatten(data, &mut flat, n) || flat.len() != n {
        return err(format!(
            "input {name:?}: its shape holds {n} elements but `data` has {}",
            if flat.len() > n { "more".to_string() } else { flat.len().to_string() }
        ));
    }
    let bad = |i: usize, v: &Value| {
        ProtocolError(format!("input {name:?}: element {i} ({v}) is not a valid {dt} value"))
    };
    let ints = |lo: i64, hi: i64| -> Result<Vec<i64>, ProtocolError> {
        flat.iter()
            .enumerate()
            .map(|(i, v)| v.as_i64().filter(|x| (lo..=hi).contains(x)).ok_or_else(|| bad(i, v)))
            .collect()
    };
    Ok(match dt {
        Datatype::Bool => Data::Bool(
            flat.iter()
                .enumerate()
                .map(|(i, v)| v.as_bool().ok_or_else(|| bad(i, v)))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::U8 => Data::U8(ints(0, 255)?.into_iter().map(|x| x as u8).collect()),
        Datatype::I32 => Data::I32(
            ints(i64::from(i32::MIN), i64::from(i32::MAX))?.into_iter().map(|x| x as i32).collect(),
        ),
        Datatype::I64 => Data::I64(ints(i64::MIN, i64::MAX)?),
        Datatype::F32 => Data::F32(
            flat.iter()
                .enumerate()
                .map(|(i, v)| v.as_f64().map(|x| x as f32).ok_or_else(|| bad(i, v)))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::F64 => Data::F64(
            flat.iter()
                .enumerate()
                .map(|(i, v)| v.as_f64().ok_or_else(|| bad(i, v)))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn param_bool(p: &Option<Map<String, Value>>, key: &str) -> Result<Option<bool>, ProtocolError> {
    match p.as_ref().and_then(|m| m.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => err(format!("parameter {key:?} must be true or false, not {v}")),
    }
}

/// Parses a request body; `header_len` is the value of
/// `Inference-Header-Content-Length`, if the request had one.
pub fn parse_request(
    body: &[u8],
    header_len: Option<usize>,
) -> Result<InferRequest, ProtocolError> {
    let (json_part, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return err(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            ))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let raw: RawRequest = serde_json::from_slice(json_part)
        .map_err(|e| ProtocolError(format!("the request is not valid inference JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(raw.inputs.len());
    for input in &raw.inputs {
        let name = &input.name;
        if inputs.iter().any(|t: &Tensor| t.name == *name) {
            return err(format!("input {name:?} is given twice"));
        }
        let Some(dt) = Datatype::parse(&input.datatype) else {
            return err(format!(
                "input {name:?}: datatype {:?} is not supported (BOOL, UINT8, INT32, INT64, FP32, FP64)",
                input.datatype
            ));
        };
        let (shape, n) = elements(name, &input.shape)?;
        let binary_size = match input.parameters.as_ref().and_then(|m| m.get("binary_data_size")) {
            None => None,
            Some(v) => match v.as_u64() {
                Some(s) => Some(s),
                None => {
                    return err(format!("input {name:?}: binary_data_size must be a byte count"))
                }
            },
        };
        let data = match (binary_size, &input.data) {
            (Some(_), Some(_)) => {
                return err(format!(
                    "input {name:?} has both `data` and binary_data_size; give one"
                ))
            }
            (Some(size), None) => {
                let want = (n as u64) * dt.size() as u64;
                if size != want {
                    return err(format!(
                        "input {name:?}: binary_data_size is {size} but {n} {dt} elements take {want} bytes"
                    ));
                }
                if (binary.len() as u64) < size {
                    return err(format!(
                        "input {name:?}: binary_data_size is {size} but only {} bytes of binary data are left",
                        binary.len()
                    ));
                }
                let (mine, rest) = binary.split_at(size as usize);
                binary = rest;
                Data::from_le_bytes(dt, mine)
                    .map_err(|e| ProtocolError(format!("input {name:?}: {e}")))?
            }
            (None, Some(data)) => json_data(name, dt, data, n)?,
            (None, None) => {
                return err(format!("input {name:?} has no `data` and no binary_data_size"))
            }
        };
        inputs.push(Tensor { name: name.clone(), shape, data });
    }
    if !binary.is_empty() {
        return err(format!("{} bytes of binary data are not claimed by any input", binary.len()));
    }
    let binary_output = param_bool(&raw.parameters, "binary_data_output")?.unwrap_or(false);
    let mut outputs = Vec::new();
    for o in raw.outputs.unwrap_or_default() {
        let binary = param_bool(&o.parameters, "binary_data")?.unwrap_or(binary_output);
        outputs.push(RequestedOutput { name: o.name, binary });
    }
    Ok(InferRequest { id: raw.id, inputs, outputs, binary_output })
}

/// An encoded response: the body, and the JSON length when binary data
/// follows it (the value of `Inference-Header-Content-Length`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The whole body.
    pub body: Vec<u8>,
    /// Length of its JSON part, when there is a binary part.
    pub header_len: Option<usize>,
}

/// Encodes a response: each output binary or as JSON, as `binary` says.
pub fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: &[(Tensor, bool)],
) -> Encoded {
    let mut binary = Vec::new();
    let mut items = Vec::with_capacity(outputs.len());
    for (t, as_binary) in outputs {
        let mut o = Map::new();
        o.insert("name".into(), json!(t.name));
        o.insert("datatype".into(), json!(t.data.datatype().name()));
        o.insert("shape".into(), json!(t.shape));
        if *as_binary {
            let bytes = t.data.to_le_bytes();
            o.insert("parameters".into(), json!({ "binary_data_size": bytes.len() }));
            binary.extend_from_slice(&bytes);
        } else {
            o.insert("data".into(), t.data.to_json());
        }
        items.push(Value::Object(o));
    }
    let mut r = Map::new();
    r.insert("model_name".into(), json!(model));
    r.insert("model_version".into(), json!(version));
    if let Some(id) = id {
        r.insert("id".into(), json!(id));
    }
    r.insert("outputs".into(), Value::Array(items));
    let mut body = serde_json::to_vec(&Value::Object(r)).unwrap_or_default();
    if binary.is_empty() {
        return Encoded { body, header_len: None };
    }
    let header_len = body.len();
    body.extend_from_slice(&binary);
    Encoded { body, header_len: Some(header_len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_inputs_nested_or_flat() {
        let body = br#"{"id":"7","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]},
            {"name":"t","shape":[3],"datatype":"INT64","data":[1,-2,3]}],
            "outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let r = parse_request(body, None).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.inputs[0].shape, [2, 2]);
        assert_eq!(r.inputs[0].data, Data::F32(vec![1.0, 2.0, 3.0, 4.5]));
        assert_eq!(r.inputs[1].data, Data::I64(vec![1, -2, 3]));
        assert_eq!(r.outputs, [RequestedOutput { name: "y".into(), binary: true }]);
    }

    #[test]
    fn binary_inputs_in_order() {
        let json = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},
            {"name":"b","shape":[1],"datatype":"INT64","parameters":{"binary_data_size":8}}],
            "parameters":{"binary_data_output":true}}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2f32).to_le_bytes());
        body.extend_from_slice(&42i64.to_le_bytes());
        let r = parse_request(&body, Some(json.len())).unwrap();
        assert_eq!(r.inputs[0].data, Data::F32(vec![1.5, -2.0]));
        assert_eq!(r.inputs[1].data, Data::I64(vec![42]));
        assert!(r.binary_output);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases: &[(&[u8], Option<usize>, &str)] = &[
            (b"{", None, "not valid inference JSON"),
            (br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#, None, "holds 3 elements"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP16","data":[1]}]}"#, None, "not supported"),
            (br#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#, None, "negative"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}]}"#, None, "not a valid INT64"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#, None, "not a valid FP32"),
            (br#"{"inputs":[{"name":"x","shape":[4294967296,4294967296],"datatype":"FP32","data":[]}]}"#, None, "too large"),
            (br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#, Some(200), "body has only"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#, None, "no `data`"),
            (br#"{"inputs":[],"extra":1}"#, None, "unknown field"),
        ];
        for (body, len, says) in cases {
            let e = parse_request(body, *len).unwrap_err().0;
            assert!(e.contains(says), "{says}: {e}");
        }
        // Binary size must match the shape, and cover the data there is.
        let json = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[0; 4]);
        let e = parse_request(&body, Some(json.len())).unwrap_err().0;
        assert!(e.contains("take 8 bytes"), "{e}");
        let json = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[0; 6]);
        let e = parse_request(&body, Some(json.len())).unwrap_err().0;
        assert!(e.contains("not claimed"), "{e}");
    }

    #[test]
    fn responses_mix_json_and_binary() {
        let y = Tensor { name: "y".into(), shape: vec![2], data: Data::F32(vec![1.0, 2.5]) };
        let z = Tensor { name: "z".into(), shape: vec![1], data: Data::I64(vec![7]) };
        let e = encode_response("m", "1", Some("x"), &[(y.clone(), false), (z.clone(), true)]);
        let n = e.header_len.unwrap();
        let v: Value = serde_json::from_slice(&e.body[..n]).unwrap();
        assert_eq!(v["outputs"][0]["data"], json!([1.0, 2.5]));
        assert_eq!(v["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert_eq!(&e.body[n..], &7i64.to_le_bytes());
        let e = encode_response("m", "1", None, &[(y, false)]);
        assert_eq!(e.header_len, None);
    }
}
