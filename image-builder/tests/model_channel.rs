//! `basalt publish` of a model bundle: it lands on the model's own channel
//! (`channels/models/<name>/<channel>.toml`) and under `bundles/models/`,
//! never on an OS channel, and the channel file verifies as a device
//! checks it.

use std::path::Path;
use std::process::{Command, Output};

use basalt_bundle::channel::{verify_channel, FORMAT_VERSION};
use basalt_bundle::keys::PublicKey;
use basalt_bundle::signature::Trust;

fn basalt(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(args)
        .current_dir(dir)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("run basalt")
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn model_files(dir: &Path, name: &str, version: &str) {
    // The ir_version field first, as every ONNX ModelProto starts.
    std::fs::write(dir.join("m.onnx"), [0x08, 0x07, 0x12, 0x00]).unwrap();
    std::fs::write(
        dir.join("model.toml"),
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\n[test]\ntolerance = 1e-4\n\
             [[test.input]]\nname = \"x\"\ndatatype = \"FP32\"\nshape = [1]\ndata = [1.0]\n\
             [[test.output]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [1]\ndata = [2.0]\n"
        ),
    )
    .unwrap();
}

#[test]
fn a_model_is_published_on_its_own_channel() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(basalt(d, &["keygen", "--out", "fleet"]));
    model_files(d, "water-quality", "1.2.0");
    ok(basalt(d, &["model", "bundle", "m.onnx", "--config", "model.toml", "--key", "fleet.key"]));
    ok(basalt(
        d,
        &["publish", "water-quality-1.2.0.basalt", "--repo", "repo", "--key", "fleet.key"],
    ));
    let repo = d.join("repo");
    let bundle = repo.join("bundles/models/water-quality-1.2.0.basalt");
    assert_eq!(
        std::fs::read(&bundle).unwrap(),
        std::fs::read(d.join("water-quality-1.2.0.basalt")).unwrap()
    );
    assert!(!repo.join("channels/stable.toml").exists(), "a model must not take the OS channel");
    assert!(!repo.join("bundles/water-quality-1.2.0.basalt").exists());

    let path = repo.join("channels/models/water-quality/stable.toml");
    let bytes = std::fs::read(&path).unwrap();
    let sig = std::fs::read(repo.join("channels/models/water-quality/stable.toml.sig")).unwrap();
    let key = PublicKey::from_pem(&std::fs::read_to_string(d.join("fleet.pub")).unwrap()).unwrap();
    let trust = Trust { keys: vec![key], threshold: 1 };
    let ch = verify_channel(&bytes, &sig, &trust).unwrap();
    assert_eq!(ch.format, FORMAT_VERSION);
    assert_eq!(ch.name, "water-quality");
    assert_eq!(ch.version.to_string(), "1.2.0");
    assert_eq!(ch.bundle, "bundles/models/water-quality-1.2.0.basalt");
    assert_eq!(ch.compatible, vec!["any".to_string()]);
    assert_eq!(ch.size, std::fs::metadata(&bundle).unwrap().len());

    // A second model on a beta channel keeps its own files.
    model_files(d, "pump-wear", "0.1.0");
    ok(basalt(d, &["model", "bundle", "m.onnx", "--config", "model.toml", "--key", "fleet.key"]));
    ok(basalt(
        d,
        &[
            "publish",
            "pump-wear-0.1.0.basalt",
            "--repo",
            "repo",
            "--channel",
            "beta",
            "--key",
            "fleet.key",
        ],
    ));
    assert!(repo.join("channels/models/pump-wear/beta.toml").exists());
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "another model's channel changed");
}

/// The recipe of ci/e2e/030-model-update with `edit` applied, its paths
/// made absolute, in `dir`.
fn recipe_with(dir: &Path, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("ci/e2e/030-model-update/recipe.toml"))
        .unwrap()
        .replace("../../../", &format!("{}/", root.display()))
        .replace("../keys/", &format!("{}/ci/e2e/keys/", root.display()));
    let path = dir.join("recipe.toml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

#[test]
fn a_recipe_names_models_and_a_runtime_the_device_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let opts = basalt::plan::PlanOptions {
        cache_dir: basalt::plan::default_cache_dir(),
        ..Default::default()
    };
    let plan = |edit: &dyn Fn(String) -> String| {
        basalt::plan::resolve(&recipe_with(dir.path(), edit), &opts).map_err(|e| e.to_string())
    };
    let cases: [(&dyn Fn(String) -> String, &str); 3] = [
        (&|t| t.replace("models = [\"mlp\"]", "models = [\"-mlp\"]"), "not a model name"),
        (&|t| t.replace("models = [\"mlp\"]", "models = [\"a/b\"]"), "not a model name"),
        (
            &|t| t.replace("runtime = \"http://127.0.0.1:17800\"", "runtime = \"ftp://x\""),
            "http://",
        ),
    ];
    for (edit, says) in cases {
        let err = plan(edit).unwrap_err();
        assert!(err.contains(says), "{says}: {err}");
    }
    match plan(&|t| t) {
        Ok(_) => {}
        // A machine without the device programs built cannot plan an image
        // with the agent; the checks above come before that.
        Err(e) if e.contains("basalt-agent") || e.contains("basalt-runtime") => {}
        Err(e) => panic!("{e}"),
    }
}
