//! `model.toml`: what a model bundle says about its model, and the test
//! vector the runtime runs before it serves it.
//!
//! A model bundle (kind `model`) holds two payloads: [`MODEL_ONNX`] and
//! [`MODEL_TOML`]:
//!
//! ```toml
//! name = "water-quality"
//! version = "1.0.0"
//! description = "virtual sensor: water quality from 32 probe features"
//!
//! [test]
//! tolerance = 1e-4          # relative, per element
//! absolute = 1e-5           # differences below this always pass
//! [[test.input]]
//! name = "features"
//! datatype = "FP32"
//! shape = [1, 32]
//! data = [0.1, ...]
//! [[test.output]]
//! name = "quality"
//! datatype = "FP32"
//! shape = [1, 1]
//! data = [0.42]
//! ```

use serde::{Deserialize, Serialize};

/// The ONNX payload of a model bundle.
pub const MODEL_ONNX: &str = "model.onnx";
/// The description payload of a model bundle.
pub const MODEL_TOML: &str = "model.toml";
/// Largest `model.toml` accepted.
pub const MAX_MODEL_TOML: usize = 16 << 20;

/// `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use (`/v2/models/<name>`).
    pub name: String,
    /// The version (`/v2/models/<name>/versions/<version>`), semver.
    pub version: semver::Version,
    /// What it is, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The test vector run before the model serves.
    pub test: TestVector,
}

/// An input and the outputs it must give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestVector {
    /// Largest relative difference per element.
    pub tolerance: f64,
    /// Differences below this pass whatever the relative one.
    #[serde(default = "default_absolute")]
    pub absolute: f64,
    /// The inputs.
    #[serde(rename = "input")]
    pub inputs: Vec<TestTensor>,
    /// The expected outputs.
    #[serde(rename = "output")]
    pub outputs: Vec<TestTensor>,
}

fn default_absolute() -> f64 {
    1e-5
}

/// One tensor of a test vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestTensor {
    /// Name.
    pub name: String,
    /// Protocol datatype (`FP32`, `INT64`, ...).
    pub datatype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f64>,
}

/// Why a `model.toml` is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ModelConfigError {
    /// Over [`MAX_MODEL_TOML`].
    #[error("model.toml is {0} bytes; the limit is {MAX_MODEL_TOML}")]
    TooLarge(usize),
    /// Not TOML of this shape.
    #[error("model.toml: {0}")]
    Toml(String),
    /// A value is out of place.
    #[error("model.toml: {0}")]
    Invalid(String),
}

impl ModelConfig {
    /// Parses and checks a `model.toml`.
    pub fn parse(bytes: &[u8]) -> Result<ModelConfig, ModelConfigError> {
        if bytes.len() > MAX_MODEL_TOML {
            return Err(ModelConfigError::TooLarge(bytes.len()));
        }
        let text =
            std::str::from_utf8(bytes).map_err(|_| ModelConfigError::Toml("not UTF-8".into()))?;
        let c: ModelConfig =
            toml::from_str(text).map_err(|e| ModelConfigError::Toml(e.to_string()))?;
        let bad = |m: String| Err(ModelConfigError::Invalid(m));
        let name_ok = !c.name.is_empty()
            && c.name.len() <= 64
            && c.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !c.name.starts_with('.');
        if !name_ok {
            return bad(format!("name {:?}: use 1-64 letters, digits, `-`, `_`, `.`", c.name));
        }
        let t = &c.test;
        if !(t.tolerance.is_finite()
            && t.tolerance >= 0.0
            && t.absolute.is_finite()
            && t.absolute >= 0.0)
        {
            return bad("test.tolerance and test.absolute are numbers of 0 or more".into());
        }
        if t.inputs.is_empty() || t.outputs.is_empty() {
            return bad(
                "the test vector needs at least one [[test.input]] and one [[test.output]]".into(),
            );
        }
        for x in t.inputs.iter().chain(&t.outputs) {
            let n = x.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if n != Some(x.data.len()) {
                return bad(format!(
                    "test tensor {:?}: shape {:?} does not hold the {} elements of data",
                    x.name,
                    x.shape,
                    x.data.len()
                ));
            }
        }
        Ok(c)
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "wq"
version = "1.0.0"
[test]
tolerance = 1e-4
[[test.input]]
name = "x"
datatype = "FP32"
shape = [1, 2]
data = [1.0, 2.0]
[[test.output]]
name = "y"
datatype = "FP32"
shape = [1]
data = [3.0]
"#;

    #[test]
    fn parses_and_round_trips() {
        let c = ModelConfig::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(c.test.absolute, 1e-5);
        assert_eq!(ModelConfig::parse(c.to_toml().as_bytes()).unwrap(), c);
    }

    #[test]
    fn refuses_what_cannot_work() {
        for (edit, says) in [
            (GOOD.replace("\"wq\"", "\"../x\""), "name"),
            (GOOD.replace("shape = [1, 2]", "shape = [1, 3]"), "does not hold"),
            (GOOD.replace("tolerance = 1e-4", "tolerance = -1"), "tolerance"),
            (GOOD.replace("version = \"1.0.0\"", "version = \"one\""), "version"),
            (GOOD.replace("[test]", "extra = 1\n[test]"), "unknown field"),
        ] {
            let e = ModelConfig::parse(edit.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }
}
