//! Errors that point at a place in a TOML file: file, line, column and key,
//! with the line shown and the value underlined.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};

/// A value read from TOML together with where it stood in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Byte range of the value in the file.
    pub span: Range<usize>,
}

impl<T> Located<T> {
    /// A value that came from no file (defaults, tests).
    pub fn unplaced(value: T) -> Located<T> {
        Located { value, span: 0..0 }
    }
}

impl<T> std::ops::Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = toml::Spanned::<T>::deserialize(d)?;
        let span = s.span();
        Ok(Located { value: s.into_inner(), span })
    }
}

impl<T: JsonSchema> JsonSchema for Located<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(g)
    }
}

/// A TOML source file kept for error messages.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file's path as the user gave it.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

/// An error at a place in a TOML file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// `path:line:column`.
    pub location: String,
    /// What is wrong.
    pub message: String,
    /// The offending line with the value underlined.
    pub snippet: String,
    /// What to do about it.
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)?;
        if !self.snippet.is_empty() {
            write!(f, "\n{}", self.snippet)?;
        }
        if let Some(h) = &self.help {
            write!(f, "\n  = help: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

impl Source {
    /// Reads a file.
    pub fn read(path: &Path) -> std::io::Result<Source> {
        Ok(Source { path: path.to_path_buf(), text: std::fs::read_to_string(path)? })
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
        (line, col)
    }

    /// A diagnostic pointing at `span`.
    pub fn error(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = self.line_col(span.start);
        let snippet = if span.end > span.start || !self.text.is_empty() {
            let text_line = self.text.lines().nth(line - 1).unwrap_or("");
            let width = span.end.saturating_sub(span.start).max(1);
            let width = width.min(text_line.len().saturating_sub(col - 1).max(1));
            let gutter = line.to_string().len();
            format!(
                "{:gutter$} |\n{line} | {text_line}\n{:gutter$} | {}{}",
                "",
                "",
                " ".repeat(col - 1),
                "^".repeat(width)
            )
        } else {
            String::new()
        };
        Diagnostic {
            location: format!("{}:{line}:{col}", self.path.display()),
            message: message.into(),
            snippet,
            help: None,
        }
    }

    /// Parses the text as TOML into `T`, turning serde's error into a
    /// diagnostic at the offending key.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        toml::from_str(&self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().to_string();
            let mut d = self.error(span, message);
            if d.message.contains("unknown field") {
                d.help = Some(
                    "check the spelling; every key is listed in docs/reference.md".to_string(),
                );
            }
            d
        })
    }
}

/// Adds a help line to a diagnostic.
pub fn with_help(mut d: Diagnostic, help: impl Into<String>) -> Diagnostic {
    d.help = Some(help.into());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        name: Located<String>,
        size: u32,
    }

    fn src(text: &str) -> Source {
        Source { path: "r.toml".into(), text: text.into() }
    }

    #[test]
    fn unknown_key_points_at_its_line() {
        let e = src("name = \"x\"\nsize = 1\nszie = 2\n").parse::<T>().unwrap_err();
        assert!(e.location.starts_with("r.toml:3:"), "{e}");
        assert!(e.message.contains("unknown field `szie`"), "{e}");
        assert!(e.snippet.contains("szie = 2"), "{e}");
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        let e = src("name = \"x\"\nsize = \"big\"\n").parse::<T>().unwrap_err();
        assert_eq!(e.location, "r.toml:2:8", "{e}");
    }

    #[test]
    fn located_values_carry_their_span() {
        let s = src("size = 1\nname = \"hello\"\n");
        let t: T = s.parse().unwrap();
        let d = s.error(t.name.span.clone(), "bad");
        assert_eq!(d.location, "r.toml:2:8");
        assert!(d.snippet.ends_with("^^^^^^^"), "{}", d.snippet);
    }
}
