//! Model updates on the device: versions installed into the store, loaded
//! beside the running one, switched to under load, watched and rolled
//! back, and power cuts at every step. The model versions come from
//! `tests/data/make_update_models.py` (onnx and onnxruntime from
//! `.cache/venv`); the engine that runs them is the real one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use basalt_bundle::archive::{write_bundle, Trust};
use basalt_bundle::keys::SigningKey;
use basalt_bundle::manifest::{BundleKind, Compression, Manifest, PayloadInfo};
use basalt_bundle::model::{
    bundle_bytes, install, CutDisk, Disk, ModelState, NewBundle, StdDisk, Trial,
};
use basalt_bundle::signature::{sign, SignatureFile};
use basalt_runtime::repository::{Catalog, RepoError, Settings};
use basalt_runtime::server::{serve, Limits, Server};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The model versions, made once per test run.
fn versions() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under the target folder, not /tmp (version 5 is 12 MB), made in
        // a folder of this process and renamed file by file into a shared
        // one: the models are the same bytes every time, and a run beside
        // this one never reads a half-written file.
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = tmp.join("update-models");
        let mine = tmp.join(format!("update-models.{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&mine).unwrap();
        let python = root().join(".cache/venv/bin/python");
        assert!(python.is_file(), "no {}; run ci/setup.sh", python.display());
        let out = Command::new(python)
            .arg(root().join("runtime/tests/data/make_update_models.py"))
            .arg(&mine)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for e in std::fs::read_dir(&mine).unwrap() {
            let e = e.unwrap();
            std::fs::rename(e.path(), dir.join(e.file_name())).unwrap();
        }
        std::fs::remove_dir(&mine).unwrap();
        dir
    })
}

/// A signed bundle of version `v`, with `extra` appended to its model.toml.
fn bundle(key: &SigningKey, v: &str, extra: &str) -> Vec<u8> {
    let onnx = std::fs::read(versions().join(format!("{v}.onnx"))).unwrap();
    let mut config = std::fs::read_to_string(versions().join(format!("{v}.model.toml"))).unwrap();
    config.push_str(extra);
    let b = NewBundle {
        name: "demo",
        version: &v.parse().unwrap(),
        compatible: &[],
        created: 1_700_000_000,
        onnx: &onnx,
        model_toml: config.as_bytes(),
        level: 3,
    };
    bundle_bytes(&b, std::slice::from_ref(key)).unwrap()
}

struct Device {
    key: Arc<SigningKey>,
    store: PathBuf,
    _dir: tempfile::TempDir,
}

impl Device {
    fn new() -> Device {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("models");
        Device { key: Arc::new(SigningKey::generate().unwrap()), store, _dir: dir }
    }

    fn trust(&self) -> Trust {
        Trust { keys: vec![self.key.public()], threshold: 1 }
    }

    fn install(&self, v: &str, extra: &str) {
        install(&self.store, &bundle(&self.key, v, extra)[..], &self.trust(), 3, &StdDisk).unwrap();
    }

    fn catalog(&self, boot: &str, disk: Arc<dyn Disk>) -> Catalog {
        let settings = Settings {
            store: Some(self.store.clone()),
            baked: Vec::new(),
            trust: self.trust(),
            boot_id: boot.into(),
        };
        Catalog::open(settings, Box::new(basalt_runtime::backend::load_onnx), disk)
    }

    fn serving(&self, catalog: &Catalog) -> Option<String> {
        catalog.find("demo", None).filter(|s| s.ready()).map(|s| s.version.clone())
    }
}

fn start(catalog: Catalog) -> SocketAddr {
    let server = Arc::new(Server::new(Arc::new(catalog), Limits::default()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            serve(tokio::net::TcpListener::from_std(listener).unwrap(), server).await;
        });
    });
    addr
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status =
        String::from_utf8_lossy(&out[..split]).split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = &out[split + 4..];
    let v = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into()));
    (status, v)
}

fn infer(addr: SocketAddr, x: f32) -> (u16, Value) {
    let body = format!(
        r#"{{"inputs":[{{"name":"x","shape":[1,4],"datatype":"FP32","data":[{x},{x},{x},{x}]}}]}}"#
    );
    http(addr, "POST", "/v2/models/demo/infer", body.as_bytes())
}

fn status(addr: SocketAddr) -> Value {
    let (c, v) = http(addr, "GET", "/v2/repository/models/demo", b"");
    assert_eq!(c, 200, "{v}");
    v
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Eight clients infer without pause while version 2 is loaded, tested
/// and switched to: no request fails, and each client sees version 1's
/// answers, then version 2's, never back.
#[test]
fn the_switch_under_load_fails_no_request() {
    let d = Device::new();
    d.install("1.0.0", "");
    let addr = start(d.catalog("boot", Arc::new(StdDisk)));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let (code, v) = infer(addr, 1.0);
                    assert_eq!(code, 200, "{v}");
                    let version = v["model_version"].as_str().unwrap().to_string();
                    let y = v["outputs"][0]["data"][0].as_f64().unwrap();
                    seen.push((version, y));
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let feature = "[[monitor.feature]]\nrange = [0.0, 0.5]\nbins = [0.5]\nexpected = [0.5, 0.5]\n";
    let monitor = format!("[[monitor]]\ntensor = \"x\"\n{}", feature.repeat(4));
    d.install("2.0.0", &format!("[watch]\nwindow = 0.5\n{monitor}"));
    let (code, v) = http(addr, "POST", "/v2/repository/models/demo/load", b"");
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["version"].as_str(), v["state"].as_str()), (Some("2.0.0"), Some("watching")));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let mut total = [0usize; 2];
    for c in clients {
        let seen = c.join().unwrap();
        let mut new = false;
        for (version, y) in &seen {
            match version.as_str() {
                "1.0.0" => {
                    assert!(!new, "a client went back to 1.0.0: {seen:?}");
                    assert_eq!(*y, 4.0);
                    total[0] += 1;
                }
                "2.0.0" => {
                    new = true;
                    assert_eq!(*y, 8.0);
                    total[1] += 1;
                }
                other => panic!("version {other}"),
            }
        }
    }
    assert!(total[0] > 0 && total[1] > 0, "{total:?}");
    wait_for("2.0.0 kept", || status(addr)["last"]["result"] == "serving");
    let s = status(addr);
    assert_eq!((s["serving"].as_str(), s["fallback"].as_str()), (Some("2.0.0"), Some("1.0.0")));
    let (state, _) = ModelState::load(&d.store, "demo");
    assert_eq!(state.serving, Some("2.0.0".parse().unwrap()));
    // The previous version still answers by its version.
    let body = br#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,1,1,1]}]}"#;
    let (c, v) = http(addr, "POST", "/v2/models/demo/versions/1.0.0/infer", body);
    assert_eq!((c, v["outputs"][0]["data"][0].as_f64()), (200, Some(4.0)), "{v}");
    println!("requests on 1.0.0: {}, on 2.0.0: {}", total[0], total[1]);

    // Every request sent x = 1: above the training range [0, 0.5], all in
    // the upper bin, against training shares of one half each.
    let (c, stats) = http(addr, "GET", "/v2/models/demo/versions/2.0.0/stats", b"");
    assert_eq!(c, 200, "{stats}");
    let f = &stats["model_stats"][0]["monitor"]["inputs"][0]["features"][3];
    let n = f["count"].as_u64().unwrap();
    assert_eq!(n as usize, total[1], "{f}");
    assert_eq!((f["mean"].as_f64(), f["variance"].as_f64()), (Some(1.0), Some(0.0)), "{f}");
    assert_eq!(f["out_of_range"].as_u64(), Some(n), "{f}");
    let floor = 1e-4f64;
    let want = (floor - 0.5) * (floor / 0.5).ln() + (1.0 - 0.5) * (1.0f64 / 0.5).ln();
    assert!((f["psi"].as_f64().unwrap() - want).abs() < 1e-12, "{f} vs {want}");
    let out = &stats["model_stats"][0]["monitor"]["outputs"][0]["features"][0];
    assert_eq!(out["mean"].as_f64(), Some(8.0), "{out}");
    let metrics = metrics_text(addr);
    let series =
        r#"basalt_model_feature_psi{model="demo",version="2.0.0",tensor="x",feature="3"} "#;
    let value: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series}in\n{metrics}"))
        .parse()
        .unwrap();
    assert!((value - want).abs() < 1e-12, "{value} vs {want}");
}

/// v3 fails its test vector, v4 passes it and fails live requests, v5
/// passes it and is too slow: each ends with v2 serving, its reason
/// recorded and shown, and none is loaded or installed again.
#[test]
fn failing_versions_roll_back_and_are_never_retried() {
    let d = Device::new();
    d.install("1.0.0", "");
    d.install("2.0.0", "[watch]\nwindow = 0\n");
    let addr = start(d.catalog("boot", Arc::new(StdDisk)));
    wait_for("2.0.0 serving", || status(addr)["serving"] == "2.0.0");
    for _ in 0..30 {
        assert_eq!(infer(addr, 1.0).0, 200);
    }

    // v3: its test vector fails; nothing switches, and /v2/health/ready
    // stays as it was.
    d.install("3.0.0", "");
    let (c, v) = http(addr, "POST", "/v2/repository/models/demo/load", b"");
    assert_eq!(c, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("test vector"), "{v}");
    assert_eq!(http(addr, "GET", "/v2/health/ready", b"").0, 200);
    assert_eq!(infer(addr, 1.0).1["model_version"], "2.0.0");
    let (c, v) = http(addr, "GET", "/v2/models/demo/versions/3.0.0/ready", b"");
    assert_eq!(c, 503, "{v}");
    let (c, v) = http(addr, "POST", "/v2/repository/models/demo/load", b"");
    assert_eq!((c, v["state"].as_str()), (200, Some("unchanged")), "{v}");

    // v4: passes its test vector, then fails requests whose x is outside
    // its table: rolled back on the error rate.
    d.install("4.0.0", "[watch]\nwindow = 60\nmin_requests = 5\n");
    let (c, v) = http(addr, "POST", "/v2/repository/models/demo/load", b"");
    assert_eq!((c, v["state"].as_str()), (200, Some("watching")), "{v}");
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(infer(addr, 5.0).0);
    }
    assert!(codes.contains(&500), "{codes:?}");
    wait_for("the rollback of 4.0.0", || status(addr)["serving"] == "2.0.0");
    let s = status(addr);
    assert_eq!(s["last"]["result"], "rolled-back", "{s}");
    assert!(s["last"]["message"].as_str().unwrap().contains("error rate"), "{s}");
    assert_eq!(infer(addr, 1.0).1["model_version"], "2.0.0");

    // v5: the same answers, too slow against v2's p99.
    d.install("5.0.0", "[watch]\nwindow = 2\nmin_requests = 10\nmax_latency_ratio = 3.0\n");
    let (c, v) = http(addr, "POST", "/v2/repository/models/demo/load", b"");
    assert_eq!((c, v["state"].as_str()), (200, Some("watching")), "{v}");
    for _ in 0..10 {
        let (c, v) = infer(addr, 1.0);
        assert_eq!(c, 200, "{v}");
    }
    wait_for("the rollback of 5.0.0", || status(addr)["serving"] == "2.0.0");
    let s = status(addr);
    assert!(s["last"]["message"].as_str().unwrap().contains("p99"), "{s}");

    // Each failure is recorded with its reason, refused by the installer
    // and by the runtime, after a restart too.
    let failed: Vec<(String, String)> = s["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["version"].as_str().unwrap().into(), f["reason"].as_str().unwrap().into()))
        .collect();
    let versions: Vec<&str> = failed.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(versions, ["3.0.0", "4.0.0", "5.0.0"], "{failed:?}");
    let (c, v) = http(addr, "POST", "/v2/repository/models/demo/load", b"");
    assert_eq!(
        (c, v["state"].as_str(), v["version"].as_str()),
        (200, Some("unchanged"), Some("2.0.0"))
    );
    let e = install(&d.store, &bundle(&d.key, "4.0.0", "")[..], &d.trust(), 3, &StdDisk);
    assert!(e.unwrap_err().to_string().contains("failed on this device"));
    let again = d.catalog("boot-2", Arc::new(StdDisk));
    assert_eq!(d.serving(&again).as_deref(), Some("2.0.0"));
    assert_eq!(again.load_newest("demo").unwrap().state, "unchanged");

    // The index shows each version's role; the metrics count the
    // rollbacks and pass promtool.
    let (_, index) = http(addr, "GET", "/v2/repository/index", b"");
    let roles: Vec<(String, String)> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["version"].as_str().unwrap().into(), e["role"].as_str().unwrap().into()))
        .collect();
    assert!(roles.contains(&("2.0.0".into(), "serving".into())), "{roles:?}");
    assert!(roles.contains(&("5.0.0".into(), "failed".into())), "{roles:?}");
    let metrics = metrics_text(addr);
    assert!(
        metrics.contains(r#"basalt_model_updates_total{model="demo",result="rolled-back"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"basalt_model_serving{model="demo",version="2.0.0"} 1"#));
}

fn metrics_text(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let text = out.split_once("\r\n\r\n").unwrap().1.to_string();
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
    text
}

/// A trial left unfinished by a crash of this boot is refused when the
/// runtime comes back; one cut by a reboot is tried again.
#[test]
fn a_crash_refuses_the_version_on_trial_a_reboot_retries_it() {
    let d = Device::new();
    d.install("1.0.0", "");
    d.install("2.0.0", "[watch]\nwindow = 0\n");
    let trial = |boot: &str| ModelState {
        serving: Some("1.0.0".parse().unwrap()),
        trying: Some(Trial { version: "2.0.0".parse().unwrap(), boot_id: boot.into(), since: 1 }),
        ..Default::default()
    };
    trial("boot-1").save(&d.store, "demo", &StdDisk).unwrap();
    let c = d.catalog("boot-2", Arc::new(StdDisk));
    assert_eq!(d.serving(&c).as_deref(), Some("1.0.0"));
    assert_eq!(c.load_newest("demo").unwrap().serving.as_deref(), Some("2.0.0"));

    trial("boot-3").save(&d.store, "demo", &StdDisk).unwrap();
    let c = d.catalog("boot-3", Arc::new(StdDisk));
    assert_eq!(d.serving(&c).as_deref(), Some("1.0.0"));
    assert_eq!(c.load_newest("demo").unwrap().state, "unchanged");
    let (state, _) = ModelState::load(&d.store, "demo");
    assert!(state.failure(&"2.0.0".parse().unwrap()).unwrap().reason.contains("stopped"));
}

/// Power cut after every single change, first of the install of v2, then
/// of the runtime's switch to it: a fresh start serves v1 or v2, never
/// nothing, and ends on v2 once it is told to load.
#[test]
fn a_power_cut_at_any_step_leaves_a_version_serving() {
    let base = Device::new();
    base.install("1.0.0", "");
    drop(base.catalog("boot-0", Arc::new(StdDisk)));
    let v2 = bundle(&base.key, "2.0.0", "[watch]\nwindow = 0\n");
    let copy = |to: &Path| {
        let out = Command::new("cp").arg("-a").arg(&base.store).arg(to).output().unwrap();
        assert!(out.status.success());
    };
    let scratch = tempfile::tempdir().unwrap();

    // The install, by the update agent.
    let counting = CutDisk::new(u64::MAX);
    let store = scratch.path().join("count");
    copy(&store);
    install(&store, &v2[..], &base.trust(), 3, &counting).unwrap();
    let total = counting.calls();
    assert!(total >= 6, "{total}");
    for n in 0..total {
        let store = scratch.path().join(format!("install-{n}"));
        copy(&store);
        let disk = CutDisk::new(n);
        assert!(install(&store, &v2[..], &base.trust(), 3, &disk).is_err());
        assert!(disk.was_cut());
        let d = Device { key: base.key.clone(), store, _dir: tempfile::tempdir().unwrap() };
        let c = d.catalog("boot-1", Arc::new(StdDisk));
        assert_eq!(d.serving(&c).as_deref(), Some("1.0.0"), "install cut {n}");
        c.load_newest("demo").unwrap();
        let now = d.serving(&c).unwrap();
        assert!(now == "1.0.0" || now == "2.0.0", "install cut {n}: {now}");
    }

    // The switch, by the runtime: trial recorded, loaded, kept.
    let store = scratch.path().join("switch-count");
    copy(&store);
    install(&store, &v2[..], &base.trust(), 3, &StdDisk).unwrap();
    let d = Device { key: base.key.clone(), store, _dir: tempfile::tempdir().unwrap() };
    let counting = Arc::new(CutDisk::new(u64::MAX));
    let c = d.catalog("boot-1", counting.clone());
    c.load_newest("demo").unwrap();
    let total = counting.calls();
    assert!(total >= 8, "{total}");
    for n in 0..total {
        let store = scratch.path().join(format!("switch-{n}"));
        copy(&store);
        install(&store, &v2[..], &base.trust(), 3, &StdDisk).unwrap();
        let d = Device { key: base.key.clone(), store, _dir: tempfile::tempdir().unwrap() };
        let disk = Arc::new(CutDisk::new(n));
        let c = d.catalog("boot-1", disk.clone());
        let _ = c.load_newest("demo");
        assert!(disk.was_cut(), "switch cut {n}");
        drop(c);
        let after = d.catalog("boot-2", Arc::new(StdDisk));
        let first = d.serving(&after).unwrap_or_else(|| panic!("switch cut {n}: nothing serves"));
        assert!(first == "1.0.0" || first == "2.0.0", "switch cut {n}: {first}");
        after.load_newest("demo").unwrap();
        assert_eq!(d.serving(&after).as_deref(), Some("2.0.0"), "switch cut {n}");
    }
}

#[test]
fn loading_an_unknown_model_is_404_and_a_busy_one_409() {
    let d = Device::new();
    d.install("1.0.0", "");
    let c = d.catalog("boot", Arc::new(StdDisk));
    assert!(matches!(c.load_newest("nope"), Err(RepoError::Unknown(_))));
    let addr = start(c);
    let (code, v) = http(addr, "POST", "/v2/repository/models/nope/load", b"");
    assert_eq!(code, 404, "{v}");
    d.install("2.0.0", "[watch]\nwindow = 60\n");
    assert_eq!(http(addr, "POST", "/v2/repository/models/demo/load", b"").0, 200);
    let (code, v) = http(addr, "POST", "/v2/repository/models/demo/load", b"");
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("watch window"), "{v}");
}

/// The cost of the statistics on the reference MLP, batch 1: the same
/// inferences with and without `Monitor::observe`, interleaved in one
/// run. Not a pass/fail test; run it in release:
/// `cargo test --release -p basalt-runtime --test updates statistics_overhead -- --ignored --nocapture`.
#[test]
#[ignore]
fn statistics_overhead_on_the_mlp() {
    use basalt_runtime::monitor::Monitor;
    use basalt_runtime::v2::{Data, Tensor};
    let onnx = std::fs::read(root().join(".cache/models/mlp.onnx")).expect("run ci/setup.sh");
    let backend = basalt_runtime::backend::load_onnx(&onnx).unwrap();
    let monitor = Monitor::new(&[], &backend.inputs(), &backend.outputs()).unwrap();
    let inputs: Vec<Tensor> = (0..64)
        .map(|i| Tensor {
            name: "features".into(),
            shape: vec![1, 32],
            data: Data::F32((0..32).map(|j| ((i * 32 + j) % 17) as f32 * 0.1).collect()),
        })
        .collect();
    let run = |with: bool, t: &Tensor| {
        let start = Instant::now();
        let out = backend.infer(std::slice::from_ref(t)).unwrap();
        if with {
            monitor.observe(std::slice::from_ref(t), &out);
        }
        start.elapsed().as_secs_f64()
    };
    for t in &inputs {
        run(true, t);
        run(false, t);
    }
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..20_000 {
        let t = &inputs[round % inputs.len()];
        if round % 2 == 0 {
            on.push(run(true, t));
            off.push(run(false, t));
        } else {
            off.push(run(false, t));
            on.push(run(true, t));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mon, moff) = (mean(&on), mean(&off));
    let (a, b) = (median(&mut on), median(&mut off));

    // The whole request, for scale: one keep-alive connection to the
    // server with the MLP, JSON in and out, statistics on.
    let d = Device::new();
    let key = &d.key;
    let onnx_bundle = {
        let config = std::fs::read(root().join(".cache/models/mlp.model.toml")).unwrap();
        let manifest = Manifest {
            format: 1,
            kind: BundleKind::Model,
            name: "mlp".into(),
            version: "1.0.0".parse().unwrap(),
            compatible: vec!["any".into()],
            created: basalt_bundle::civil::unix_to_datetime(1_700_000_000),
            os: None,
            payloads: vec![
                PayloadInfo::describe("model.onnx", &onnx, Compression::None, None),
                PayloadInfo::describe("model.toml", &config, Compression::None, None),
            ],
        }
        .to_toml();
        let mut sigs = SignatureFile::default();
        sigs.add(sign(manifest.as_bytes(), key));
        let payloads: [(&str, &[u8]); 2] = [("model.onnx", &onnx), ("model.toml", &config)];
        let sig = sigs.to_toml().unwrap();
        write_bundle(Vec::new(), manifest.as_bytes(), sig.as_bytes(), &payloads, 1).unwrap()
    };
    install(&d.store, &onnx_bundle[..], &d.trust(), 3, &StdDisk).unwrap();
    let addr = start(d.catalog("boot", Arc::new(StdDisk)));
    let x: Vec<String> = (0..32).map(|j| format!("{}", j as f32 * 0.1)).collect();
    let body = format!(
        r#"{{"inputs":[{{"name":"features","shape":[1,32],"datatype":"FP32","data":[{}]}}]}}"#,
        x.join(",")
    );
    let request = format!(
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = std::io::BufReader::new(TcpStream::connect(addr).unwrap());
    conn.get_ref().set_nodelay(true).unwrap();
    let mut one = || {
        let t = Instant::now();
        conn.get_mut().write_all(request.as_bytes()).unwrap();
        let mut len = 0;
        loop {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut conn, &mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut b = vec![0; len];
        conn.read_exact(&mut b).unwrap();
        t.elapsed().as_secs_f64()
    };
    for _ in 0..200 {
        one();
    }
    let mut whole: Vec<f64> = (0..5000).map(|_| one()).collect();
    let req = median(&mut whole);
    println!(
        "whole request over HTTP (JSON, keep-alive): median {:.1} us; the statistics' {:.2} us are \
         {:.2} % of it",
        req * 1e6,
        (a - b) * 1e6,
        (a - b) / req * 100.0
    );
    println!(
        "mlp batch 1, 20000 inferences each: median {:.2} us with statistics, {:.2} us without \
         ({:+.2} %); mean {:.2} us vs {:.2} us ({:+.2} %)",
        a * 1e6,
        b * 1e6,
        (a / b - 1.0) * 100.0,
        mon * 1e6,
        moff * 1e6,
        (mon / moff - 1.0) * 100.0
    );
}

/// A bundle damaged on disk is not loaded and not refused for good: the
/// next install of the same version replaces it, and it loads.
#[test]
fn a_damaged_install_is_reported_and_can_be_installed_again() {
    let d = Device::new();
    d.install("1.0.0", "");
    let c = d.catalog("boot", Arc::new(StdDisk));
    d.install("2.0.0", "[watch]\nwindow = 0\n");
    let file = d.store.join("demo/2.0.0/model.basalt");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let e = c.load_newest("demo").unwrap_err();
    assert!(e.to_string().contains("was not loaded"), "{e}");
    assert_eq!(d.serving(&c).as_deref(), Some("1.0.0"));
    let (state, _) = ModelState::load(&d.store, "demo");
    assert_eq!(state.last.unwrap().result, "damaged");
    assert!(state.failures.is_empty());
    let again = install(
        &d.store,
        &bundle(&d.key, "2.0.0", "[watch]\nwindow = 0\n")[..],
        &d.trust(),
        3,
        &StdDisk,
    )
    .unwrap();
    assert!(!again.already);
    assert_eq!(c.load_newest("demo").unwrap().state, "serving");
    assert_eq!(d.serving(&c).as_deref(), Some("2.0.0"));
}

/// When the kept version cannot serve at start, its fallback does, not a
/// newer version that never had its trial.
#[test]
fn a_broken_kept_version_falls_back_at_start() {
    let d = Device::new();
    // 4.0.0 passes its test vector: only the order keeps it out.
    for v in ["1.0.0", "2.0.0", "4.0.0"] {
        d.install(v, "");
    }
    let state = ModelState {
        serving: Some("2.0.0".parse().unwrap()),
        fallback: Some("1.0.0".parse().unwrap()),
        ..Default::default()
    };
    state.save(&d.store, "demo", &StdDisk).unwrap();
    std::fs::write(d.store.join("demo/2.0.0/model.basalt"), b"not a bundle").unwrap();
    let c = d.catalog("boot", Arc::new(StdDisk));
    assert_eq!(d.serving(&c).as_deref(), Some("1.0.0"));
}
