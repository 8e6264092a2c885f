//! `basalt inspect` on a built image: the model bundles baked into each
//! slot, read back from the slot's squashfs. The image is the model
//! scenarios' gateway (`ci/e2e/030-model-update/recipe.toml`) with a second
//! model added; it needs the device binaries (musl release build), the
//! kernel and the reference models of ci/setup.sh.

mod common;

use std::process::Command;

use basalt_bundle::keys::PublicKey;
use common::{ok, root};

#[test]
fn inspect_lists_the_models_baked_into_each_slot() {
    let dir = tempfile::tempdir().unwrap();
    let recipe_dir = root().join("ci/e2e/030-model-update");
    let text = std::fs::read_to_string(recipe_dir.join("recipe.toml")).unwrap();
    // The same recipe from another folder (absolute paths), with the CNN
    // baked in beside the MLP.
    let abs = |rel: &str| recipe_dir.join(rel).display().to_string();
    let text = text
        .replace("\"../../../", &format!("\"{}/", abs("../../..")))
        .replace("\"../keys/", &format!("\"{}/", abs("../keys")))
        .replacen(
            "[update]",
            &format!(
                "[[model]]\nonnx = \"{0}/cnn.onnx\"\nconfig = \"{0}/cnn.model.toml\"\n\n[update]",
                root().join(".cache/models").display()
            ),
            1,
        );
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(&recipe, text).unwrap();
    let out = dir.path().join("out");
    common::build(&recipe, &out);
    let disk = out.join("disk.img");

    let key = std::fs::read_to_string(root().join("ci/e2e/keys/test.pub")).unwrap();
    let key_id = PublicKey::from_pem(&key).unwrap().key_id();
    let info = basalt::inspect::inspect(&disk).unwrap();
    let models: Vec<(String, String, String, Vec<String>)> = info.slots[0]
        .models
        .iter()
        .map(|m| (m.name.clone(), m.version.clone(), m.path.clone(), m.signed_by.clone()))
        .collect();
    let want = |name: &str| {
        (
            name.to_string(),
            "1.0.0".to_string(),
            format!("/usr/share/basalt/models/{name}-1.0.0.basalt"),
            vec![key_id.clone()],
        )
    };
    assert_eq!(models, [want("cnn"), want("mlp")]);
    assert_eq!(info.slots[0].models_problem, None);
    for m in &info.slots[0].models {
        assert!(m.size > 1000, "{m:?}");
    }
    // Slot b is empty at the factory: no models, and no error either.
    assert!(info.slots[1].models.is_empty());
    assert_eq!(info.slots[1].models_problem, None);

    let bin = env!("CARGO_BIN_EXE_basalt");
    let text = ok(Command::new(bin).arg("inspect").arg(&disk));
    assert!(text.contains("model mlp 1.0.0 (/usr/share/basalt/models/mlp-1.0.0.basalt"), "{text}");
    assert!(text.contains(&format!("signed by {key_id})")), "{text}");
    assert!(text.contains("model cnn 1.0.0"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(Command::new(bin).arg("inspect").arg("--json").arg(&disk)))
            .unwrap();
    assert_eq!(json["slots"][0]["models"][1]["name"], "mlp", "{json}");
    assert_eq!(json["slots"][0]["models"][1]["version"], "1.0.0", "{json}");
    assert!(text.contains("root verified"), "{text}");
    assert_eq!(info.slots[0].root_verified, Some(true));

    // A root that does not match its root hash, as a cut install or a
    // modified partition leaves it: said so, and no models read from it.
    // One byte flipped in the middle of the filesystem, then everything
    // after the squashfs superblock zeroed (an install cut early).
    let part = info.partitions.iter().find(|p| p.label == "rootfs_a").unwrap();
    let mut bytes = std::fs::read(&disk).unwrap();
    let at = part.offset as usize;
    // The superblock's bytes_used (offset 40).
    let used = u64::from_le_bytes(bytes[at + 40..at + 48].try_into().unwrap()) as usize;
    bytes[at + used / 2] ^= 0x01;
    let flipped = dir.path().join("flipped.img");
    std::fs::write(&flipped, &bytes).unwrap();
    bytes[at + 96..at + used].fill(0);
    let cut = dir.path().join("cut.img");
    std::fs::write(&cut, &bytes).unwrap();
    for disk in [flipped, cut] {
        let info = basalt::inspect::inspect(&disk).unwrap();
        assert_eq!(info.slots[0].root_verified, Some(false), "{}", disk.display());
        assert!(info.slots[0].models.is_empty(), "{}", disk.display());
        let text = ok(Command::new(bin).arg("inspect").arg(&disk));
        assert!(text.contains("DOES NOT MATCH"), "{text}");
    }
}
