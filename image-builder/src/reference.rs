//! The recipe and board reference, generated from the documented fields of
//! [`crate::recipe`] and [`crate::board`], so that each key is documented
//! exactly once, where it is defined.

use schemars::Schema;
use serde_json::Value;

/// The JSON schema of a recipe.
pub fn recipe_schema() -> Schema {
    schemars::schema_for!(crate::recipe::Recipe)
}

/// The JSON schema of a board.
pub fn board_schema() -> Schema {
    schemars::schema_for!(crate::board::Board)
}

fn type_of(v: &Value) -> String {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        return r.rsplit('/').next().unwrap_or(r).to_string();
    }
    if let Some(t) = v.get("type") {
        let t = match t {
            Value::String(s) => s.clone(),
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .filter(|s| *s != "null")
                .collect::<Vec<_>>()
                .join(" | "),
            _ => String::new(),
        };
        if t == "array" {
            if let Some(items) = v.get("items") {
                return format!("array of {}", type_of(items));
            }
        }
        return t;
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = v.get(key).and_then(Value::as_array) {
            return alts
                .iter()
                .map(type_of)
                .filter(|t| t != "null")
                .collect::<Vec<_>>()
                .join(" | ");
        }
    }
    "any".into()
}

/// Keys that have no description: each must be documented at its field.
pub fn undocumented(schema: &Schema) -> Vec<String> {
    let mut missing = Vec::new();
    let root = schema.as_value();
    let mut objects = vec![("(top)".to_string(), root.clone())];
    if let Some(defs) = root.get("$defs").and_then(Value::as_object) {
        for (name, def) in defs {
            objects.push((name.clone(), def.clone()));
        }
    }
    for (name, obj) in objects {
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (key, p) in props {
                if p.get("description").and_then(Value::as_str).unwrap_or("").is_empty() {
                    missing.push(format!("{name}.{key}"));
                }
            }
        }
    }
    missing
}

fn section(out: &mut String, title: &str, obj: &Value) {
    out.push_str(&format!("\n### {title}\n\n"));
    if let Some(d) = obj.get("description").and_then(Value::as_str) {
        out.push_str(&format!("{}\n\n", d.replace('\n', " ")));
    }
    let Some(props) = obj.get("properties").and_then(Value::as_object) else { return };
    let required: Vec<&str> = obj
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str("| key | type | required | default | meaning |\n|---|---|---|---|---|\n");
    for (key, p) in props {
        let default = p.get("default").map(|d| format!("`{d}`")).unwrap_or_default();
        let desc = p.get("description").and_then(Value::as_str).unwrap_or("").replace('\n', " ");
        let req = if required.contains(&key.as_str()) { "yes" } else { "" };
        out.push_str(&format!("| `{key}` | {} | {req} | {default} | {desc} |\n", type_of(p)));
    }
}

fn document(out: &mut String, title: &str, schema: &Schema) {
    let root = schema.as_value();
    out.push_str(&format!("\n## {title}\n"));
    section(out, "top level", root);
    if let Some(defs) = root.get("$defs").and_then(Value::as_object) {
        for (name, def) in defs {
            if def.get("properties").is_some() {
                section(out, name, def);
            } else if let Some(d) = def.get("description").and_then(Value::as_str) {
                out.push_str(&format!("\n### {name}\n\n{}\n", d.replace('\n', " ")));
            }
        }
    }
}

/// `docs/reference.md`.
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# Recipe and board reference\n\n\
         Generated from the definitions in `image-builder/src/recipe.rs` and \
         `image-builder/src/board.rs` by `cargo test -p basalt --lib reference` \
         (set `BASALT_UPDATE_DOCS=1` to rewrite it); do not edit by hand.\n\n\
         Unknown keys are errors. Paths to host files are relative to the file \
         that names them. Recipe sections are processed in this order: `image`, \
         `kernel`, `dir`, `file`, `tarball`, then `service`, `network`, `boot`, \
         `run`; within a list, entries are applied in the order written, and a \
         path may be added only once.\n",
    );
    document(&mut out, "Recipe", &recipe_schema());
    document(&mut out, "Board", &board_schema());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_documented() {
        let mut missing = undocumented(&recipe_schema());
        missing.extend(undocumented(&board_schema()));
        assert!(missing.is_empty(), "keys without a doc comment: {missing:?}");
    }

    #[test]
    fn reference_md_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference.md");
        let want = reference_markdown();
        if std::env::var_os("BASALT_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/reference.md is stale: run `BASALT_UPDATE_DOCS=1 cargo test -p basalt --lib reference`"
        );
    }
}
