//! The server with the real engine on 127.0.0.1: the reference MLP in a
//! signed model bundle, the Open Inference Protocol judged by curl-free
//! raw HTTP here, by tritonclient in `interop`, and `/metrics` by promtool.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use basalt_bundle::archive::Trust;
use basalt_bundle::keys::SigningKey;
use basalt_bundle::model::{bundle_bytes, NewBundle, StdDisk};
use basalt_runtime::repository::{Catalog, Settings};
use basalt_runtime::server::{serve, Limits, Server};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn models() -> PathBuf {
    let dir = root().join(".cache/models");
    assert!(
        dir.join("mlp.onnx").is_file(),
        "no reference models in {}; run ci/setup.sh",
        dir.display()
    );
    dir
}

/// A signed model bundle of `name` from `.cache/models`, with `toml`
/// replacing its model.toml when given.
fn bundle(name: &str, key: &SigningKey, toml: Option<&str>) -> Vec<u8> {
    let onnx = std::fs::read(models().join(format!("{name}.onnx"))).unwrap();
    let config = match toml {
        Some(t) => t.as_bytes().to_vec(),
        None => std::fs::read(models().join(format!("{name}.model.toml"))).unwrap(),
    };
    let b = NewBundle {
        name,
        version: &"1.0.0".parse().unwrap(),
        compatible: &[],
        created: 1_700_000_000,
        onnx: &onnx,
        model_toml: &config,
        level: 3,
    };
    bundle_bytes(&b, std::slice::from_ref(key)).unwrap()
}

/// Starts a server over the bundles in a temp dir; returns its address.
fn start(
    bundles: &[(&str, Vec<u8>)],
    key: &SigningKey,
    limits: Limits,
) -> (SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (file, bytes) in bundles {
        std::fs::write(dir.path().join(file), bytes).unwrap();
    }
    let trust = Trust { keys: vec![key.public()], threshold: 1 };
    let settings = Settings {
        store: None,
        baked: vec![dir.path().to_path_buf()],
        trust,
        boot_id: "test".into(),
    };
    let catalog =
        Catalog::open(settings, Box::new(basalt_runtime::backend::load_onnx), Arc::new(StdDisk));
    let server = Arc::new(Server::new(Arc::new(catalog), limits));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            serve(l, server).await;
        });
    });
    (addr, dir)
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status =
        String::from_utf8_lossy(&out[..split]).split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, out[split + 4..].to_vec())
}

fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into()))
}

#[test]
fn protocol_endpoints_and_errors() {
    let key = SigningKey::generate().unwrap();
    let (addr, _d) = start(&[("mlp.basalt", bundle("mlp", &key, None))], &key, Limits::default());
    assert_eq!(http(addr, "GET", "/v2/health/live", "", b"").0, 200);
    assert_eq!(http(addr, "GET", "/v2/health/ready", "", b"").0, 200);
    let (code, meta) = http(addr, "GET", "/v2/models/mlp", "", b"");
    assert_eq!(code, 200);
    let meta = json(&meta);
    assert_eq!(meta["inputs"][0]["name"], "features", "{meta}");
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 32]), "{meta}");
    assert_eq!(http(addr, "GET", "/v2/models/mlp/versions/1.0.0/ready", "", b"").0, 200);
    assert_eq!(http(addr, "GET", "/v2/models/nope/ready", "", b"").0, 404);
    assert_eq!(http(addr, "GET", "/v2/models/mlp/versions/9/ready", "", b"").0, 404);

    let ok = br#"{"inputs":[{"name":"features","shape":[1,32],"datatype":"FP32","data":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}]}"#;
    let (code, body) = http(addr, "POST", "/v2/models/mlp/infer", "", ok);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_eq!(v["outputs"][0]["name"], "quality");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 1]));

    for (body, code, says) in [
        (&b"{not json"[..], 400, "not valid"),
        (
            br#"{"inputs":[{"name":"features","shape":[1,31],"datatype":"FP32","data":[1]}]}"#,
            400,
            "elements",
        ),
        (
            br#"{"inputs":[{"name":"features","shape":[1,1],"datatype":"INT64","data":[1]}]}"#,
            400,
            "FP32",
        ),
        (
            br#"{"inputs":[{"name":"other","shape":[1],"datatype":"FP32","data":[1]}]}"#,
            400,
            "other",
        ),
    ] {
        let (c, b) = http(addr, "POST", "/v2/models/mlp/infer", "", body);
        let e = json(&b);
        assert_eq!(c, code, "{e}");
        assert!(e["error"].as_str().unwrap_or_default().contains(says), "{says}: {e}");
    }
    assert_eq!(http(addr, "POST", "/v2/models/nope/infer", "", ok).0, 404);
    assert_eq!(http(addr, "GET", "/v2/models/mlp/infer", "", b"").0, 405);
    let (code, stats) = http(addr, "GET", "/v2/models/mlp/stats", "", b"");
    assert_eq!(code, 200);
    let stats = json(&stats);
    assert!(
        stats["model_stats"][0]["inference_stats"]["success"]["count"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

#[test]
fn limits_answer_413_and_503_at_once() {
    let key = SigningKey::generate().unwrap();
    let limits = Limits { max_body: 64, concurrency: 1, max_queue: 0 };
    let (addr, _d) = start(&[("mlp.basalt", bundle("mlp", &key, None))], &key, limits);
    let (c, _) = http(addr, "POST", "/v2/models/mlp/infer", "", &[b' '; 100]);
    assert_eq!(c, 413);
    let small = br#"{"inputs":[]}"#;
    let (c, b) = http(addr, "POST", "/v2/models/mlp/infer", "", small);
    assert_eq!(c, 503, "{}", String::from_utf8_lossy(&b));
}

#[test]
fn a_model_failing_its_test_vector_or_signed_by_a_stranger_is_not_served() {
    let key = SigningKey::generate().unwrap();
    let stranger = SigningKey::generate().unwrap();
    let good = std::fs::read_to_string(models().join("mlp.model.toml")).unwrap();
    // Change the first expected output, keeping the element count: the
    // model no longer matches its test vector.
    let out_at = good.find("[[test.output]]").unwrap();
    let data_at = out_at + good[out_at..].find("data = [").unwrap() + "data = [".len();
    let rest = &good[data_at..];
    let end = rest.find([',', ']']).unwrap();
    let fixed_len = format!("{}1234.5{}", &good[..data_at], &rest[end..]);
    let (addr, _d) = start(
        &[
            ("mlp.basalt", bundle("mlp", &key, Some(&fixed_len))),
            ("cnn.basalt", bundle("cnn", &stranger, None)),
        ],
        &key,
        Limits::default(),
    );
    let (c, b) = http(addr, "GET", "/v2/health/ready", "", b"");
    let e = json(&b);
    assert_eq!(c, 503, "{e}");
    assert!(e["error"].as_str().unwrap().contains("test vector"), "{e}");
    assert!(e["error"].as_str().unwrap().contains("signature"), "{e}");
    let (c, _) = http(addr, "POST", "/v2/models/mlp/infer", "", br#"{"inputs":[]}"#);
    assert_eq!(c, 503);
}

#[test]
fn metrics_pass_promtool() {
    let key = SigningKey::generate().unwrap();
    let (addr, _d) = start(&[("mlp.basalt", bundle("mlp", &key, None))], &key, Limits::default());
    let ok = br#"{"inputs":[{"name":"features","shape":[1,32],"datatype":"FP32","data":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}]}"#;
    assert_eq!(http(addr, "POST", "/v2/models/mlp/infer", "", ok).0, 200);
    let _ = http(addr, "POST", "/v2/models/mlp/infer", "", b"{");
    let (c, text) = http(addr, "GET", "/metrics", "", b"");
    assert_eq!(c, 200);
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("basalt_inference_requests_total{model=\"mlp\",version=\"1.0.0\",outcome=\"success\"} 1"), "{text}");
    assert!(text.contains("basalt_inference_duration_seconds_bucket"), "{text}");
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (ci/setup.sh installs Debian's prometheus)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// tritonclient, unchanged, against the server: live, ready, metadata and
/// infer (binary and JSON), compared with onnxruntime's outputs.
#[test]
fn tritonclient_interop() {
    let key = SigningKey::generate().unwrap();
    let mut bundles = Vec::new();
    for m in ["mlp", "cnn", "transformer"] {
        bundles.push((format!("{m}.basalt"), bundle(m, &key, None)));
    }
    let refs: Vec<(&str, Vec<u8>)> = bundles.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let (addr, _d) = start(&refs, &key, Limits::default());
    let python = root().join(".cache/venv/bin/python");
    assert!(python.is_file(), "no {}; run ci/setup.sh", python.display());
    for m in ["mlp", "cnn", "transformer"] {
        let out = Command::new(&python)
            .arg(root().join("ci/models/interop.py"))
            .arg(format!("http://{addr}"))
            .arg(m)
            .arg(models().join(format!("{m}.ref.json")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "interop {m}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
