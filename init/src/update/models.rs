//! Model updates: model bundles on their own channels
//! (`channels/models/<name>/<channel>.toml`), installed into the model
//! store on the data partition and handed to the runtime without a reboot.
//!
//! The agent verifies a model channel as it does an OS channel (signatures
//! and threshold, expiry, version order, board, rollout), downloads the
//! bundle resumably, checks that the bundle is the model it asked for
//! (kind `model`, name and version of the channel: a repository cannot
//! feed an OS bundle or another model into a model's channel), installs it
//! with [`basalt_bundle::model::install`] and asks the runtime to load it
//! (`POST <runtime>/v2/repository/models/<name>/load`). The runtime runs
//! the test vector, switches, watches, and records the outcome in the
//! model's `state.toml`; a version recorded there as failed is never
//! downloaded again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use basalt_bundle::archive::{self, Trust};
use basalt_bundle::channel::Channel;
use basalt_bundle::manifest::BundleKind;
use basalt_bundle::model::{self, Failure, ModelState, ModelStoreError, Outcome, StdDisk};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::fetch::Url;

/// Largest runtime answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// How long the runtime may take to load, test and switch a model.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// The board name a model bundle uses to run anywhere.
pub const ANY_BOARD: &str = "any";

/// Where models go and who loads them.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// The model store (`/data/models`).
    pub store: PathBuf,
    /// The runtime's base URL.
    pub runtime: String,
    /// The models followed on channels.
    pub names: Vec<String>,
    /// This device's board, for the bundles' `compatible`.
    pub board: String,
    /// Where bundles are downloaded to before they are installed.
    pub downloads: PathBuf,
}

/// One model in `GET /v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    /// The model's name.
    pub name: String,
    /// The version serving, if any.
    pub serving: Option<String>,
    /// The version kept loaded to switch back to.
    pub fallback: Option<String>,
    /// A version being loaded, tested or watched.
    pub trying: Option<String>,
    /// The last update attempt and why it ended as it did.
    pub last_update: Option<Outcome>,
    /// Versions that failed here and are never installed again.
    pub failed: Vec<Failure>,
    /// Versions on disk.
    pub installed: Vec<String>,
    /// A problem reading the model's state, if any.
    pub warning: Option<String>,
}

/// The status of every model followed or installed.
pub fn status(settings: &ModelSettings) -> Vec<ModelStatus> {
    let mut names = settings.names.clone();
    for n in model::installed_models(&settings.store) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let (state, warning) = ModelState::load(&settings.store, &name);
            ModelStatus {
                serving: state.serving.as_ref().map(ToString::to_string),
                fallback: state.fallback.as_ref().map(ToString::to_string),
                trying: state.trying.as_ref().map(|t| t.version.to_string()),
                last_update: state.last,
                failed: state.failures,
                installed: model::installed_versions(&settings.store, &name)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                warning,
                name,
            }
        })
        .collect()
}

/// Whether a (verified) model channel offers `name` a version to install
/// here: `Ok(Some(reason))` says why not (nothing to do, not an error),
/// `Err` that the channel is wrong, `Ok(None)` to go ahead.
pub fn check_channel(
    ch: &Channel,
    name: &str,
    settings: &ModelSettings,
    now: i64,
    machine_id: &str,
) -> Result<Option<String>, String> {
    if ch.is_expired(now) {
        return Err(format!(
            "model channel {name}/{} expired at {}; the repository must re-sign it \
             (`basalt publish`) — an old channel file may be a replay",
            ch.channel, ch.expires
        ));
    }
    if ch.name != name {
        return Err(format!(
            "the channel of model {name} offers {} {}; republish the right bundle on it",
            ch.name, ch.version
        ));
    }
    check_compatible(name, &ch.version, &ch.compatible, &settings.board)?;
    let (state, _) = ModelState::load(&settings.store, name);
    if let Some(f) = state.failure(&ch.version) {
        return Ok(Some(format!(
            "{name} {} failed on this device ({}); waiting for a newer version",
            ch.version, f.reason
        )));
    }
    // Against the serving version only: a version installed but never
    // taken by the runtime (it was down) is offered to it again.
    if let Some(current) = state.serving.clone().filter(|c| ch.version <= *c) {
        return Ok(Some(format!("{name} {} is not newer than {current}", ch.version)));
    }
    if state.trying.as_ref().is_some_and(|t| t.version == ch.version) {
        return Ok(Some(format!("{name} {} is being tried", ch.version)));
    }
    if !ch.includes(machine_id) {
        return Ok(Some(format!("{name} {}: this device is outside the rollout", ch.version)));
    }
    Ok(None)
}

fn check_compatible(
    name: &str,
    version: &semver::Version,
    compatible: &[String],
    board: &str,
) -> Result<(), String> {
    if compatible.iter().any(|b| b == ANY_BOARD || b == board) {
        Ok(())
    } else {
        Err(format!(
            "{name} {version} is for board(s) {}, this device is {board}; bundle the model \
             for this board (or for any)",
            compatible.join(", ")
        ))
    }
}

/// Checks, before installing, that a downloaded bundle is the model
/// version its channel named: kind `model`, same name and version, for
/// this board. Its signatures are checked by the install.
pub fn check_bundle_file(
    path: &Path,
    ch: &Channel,
    settings: &ModelSettings,
) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, m, _) = archive::peek(std::io::BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if m.kind != BundleKind::Model {
        return Err(format!(
            "the channel of model {} points at {} {}, a {:?} bundle, not a model; republish it",
            ch.name, m.name, m.version, m.kind
        ));
    }
    if m.name != ch.name || m.version != ch.version {
        return Err(format!(
            "the channel offers {} {} but the bundle is {} {}; republish it",
            ch.name, ch.version, m.name, m.version
        ));
    }
    check_compatible(&m.name, &m.version, &m.compatible, &settings.board)
}

/// Installs a model bundle into the store (signatures against `trust`,
/// keeping [`model::DEFAULT_KEEP`] versions besides the pinned ones).
pub fn install(
    settings: &ModelSettings,
    bundle: impl Read,
    trust: &Trust,
) -> Result<model::Installed, ModelStoreError> {
    model::install(&settings.store, bundle, trust, model::DEFAULT_KEEP, &StdDisk)
}

/// The runtime's answer to a load request.
#[derive(Debug, Clone, Serialize)]
pub struct LoadAnswer {
    /// Its HTTP status.
    pub status: u16,
    /// Its JSON body (or the text, as a string, if it was not JSON).
    pub body: serde_json::Value,
    /// Milliseconds from the request to the whole answer: the runtime's
    /// verify, load, test vector and switch, and the call itself.
    pub took_ms: f64,
}

/// Asks the runtime at `runtime` to load the newest installed version of
/// `name`: `POST /v2/repository/models/<name>/load`.
pub async fn load(runtime: &str, name: &str, timeout: Duration) -> Result<LoadAnswer, String> {
    if !model::valid_name(name) {
        return Err(format!("{name:?} cannot name a model"));
    }
    let base = Url::parse(runtime).map_err(|e| e.to_string())?;
    let url = base.join(&format!("v2/repository/models/{name}/load")).map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((url.host(), url.port()))
            .await
            .map_err(|e| format!("{url}: cannot connect: {e}; is basalt-runtime running?"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = http::Request::post(url.path())
            .header(http::header::HOST, host_header(&url))
            .header(http::header::CONTENT_LENGTH, "0")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{url}: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("{url}: {e}"))?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{url}: {e}"))?;
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > MAX_ANSWER {
                    return Err(format!("{url}: the answer is over {MAX_ANSWER} bytes"));
                }
                bytes.extend_from_slice(&data);
            }
        }
        driver.abort();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        Ok(LoadAnswer { status, body, took_ms: start.elapsed().as_secs_f64() * 1e3 })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}: no answer in {} s", timeout.as_secs()))?
}

/// `host[:port]`, as the `Host` header writes it.
fn host_header(url: &Url) -> String {
    let host =
        if url.host().contains(':') { format!("[{}]", url.host()) } else { url.host().to_string() };
    if url.port() == 80 {
        host
    } else {
        format!("{host}:{}", url.port())
    }
}

/// One line for people about a load answer.
pub fn describe(name: &str, version: &semver::Version, answer: &LoadAnswer) -> String {
    let field = |k: &str| answer.body.get(k).and_then(|v| v.as_str()).unwrap_or("");
    match answer.status {
        200 => format!(
            "model {name} {version}: runtime says {} (version {}) after {:.0} ms{}",
            field("state"),
            field("version"),
            answer.took_ms,
            steps(&answer.body).map(|s| format!(" ({s})")).unwrap_or_default()
        ),
        s => {
            let why = match &answer.body {
                serde_json::Value::String(s) => s.clone(),
                b => {
                    let e = field("error");
                    if e.is_empty() {
                        b.to_string()
                    } else {
                        e.to_string()
                    }
                }
            };
            format!("model {name} {version}: the runtime refused it ({s}): {why}")
        }
    }
}

/// The runtime's own timings in a load answer, in words.
fn steps(body: &serde_json::Value) -> Option<String> {
    let t = body.get("timings")?;
    let ms = |k: &str| t.get(k).and_then(serde_json::Value::as_f64);
    Some(format!(
        "verify {:.1} ms, load {:.1} ms, test vector {:.1} ms, switch {:.1} ms",
        ms("verify_ms")?,
        ms("load_ms")?,
        ms("test_vector_ms")?,
        ms("switch_ms")?
    ))
}

/// Milliseconds since `start`, for the log lines that time an update.
pub fn ms_since(start: std::time::Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::assess::Bootloader;
    use crate::update::agent::{Agent, Machine, UpdateError};
    use crate::update::api::{self, Shared};
    use crate::update::state::StateFile;
    use crate::update::testing;
    use basalt_bundle::keys::SigningKey;
    use basalt_bundle::model::{bundle_bytes, NewBundle};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const NOW: i64 = 1_800_000_000;

    pub(crate) fn model_bundle(
        key: &SigningKey,
        name: &str,
        version: &str,
        compatible: &str,
    ) -> Vec<u8> {
        let onnx = testing::bytes(7, 4096);
        let toml = format!(
            "name = \"{name}\"\nversion = \"{version}\"\n[test]\ntolerance = 1e-4\n\
             [[test.input]]\nname = \"x\"\ndatatype = \"FP32\"\nshape = [1]\ndata = [1.0]\n\
             [[test.output]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [1]\ndata = [2.0]\n"
        );
        let b = NewBundle {
            name,
            version: &version.parse().unwrap(),
            compatible: &[compatible.to_string()],
            created: 1_700_000_000,
            onnx: &onnx,
            model_toml: toml.as_bytes(),
            level: 3,
        };
        bundle_bytes(&b, std::slice::from_ref(key)).unwrap()
    }

    pub(crate) fn settings(store: &Path, runtime: &str) -> ModelSettings {
        ModelSettings {
            store: store.to_path_buf(),
            runtime: runtime.to_string(),
            names: vec!["wq".into()],
            board: "qemu-x86_64".into(),
            downloads: store.join(".downloads"),
        }
    }

    fn channel(name: &str, version: &str) -> Channel {
        Channel {
            format: 1,
            channel: "stable".into(),
            name: name.into(),
            version: version.parse().unwrap(),
            bundle: format!("bundles/models/{name}-{version}.basalt"),
            sha256: "ab".repeat(32),
            size: 1,
            compatible: vec!["any".into()],
            published: basalt_bundle::civil::unix_to_datetime(NOW - 10),
            expires: basalt_bundle::civil::unix_to_datetime(NOW + 1000),
            rollout: 100,
        }
    }

    pub(crate) fn save_state(store: &Path, state: &ModelState) {
        state.save(store, "wq", &StdDisk).unwrap();
    }

    #[test]
    fn model_channels_are_checked_like_os_channels() {
        let store = tempfile::tempdir().unwrap();
        let s = settings(store.path(), "http://127.0.0.1:1");
        let check = |ch: &Channel| check_channel(ch, "wq", &s, NOW, "m");
        assert_eq!(check(&channel("wq", "1.0.0")), Ok(None));
        let mut expired = channel("wq", "1.0.0");
        expired.expires = basalt_bundle::civil::unix_to_datetime(NOW);
        assert!(check(&expired).unwrap_err().contains("expired"));
        assert!(check(&channel("other", "1.0.0")).unwrap_err().contains("offers other"));
        let mut board = channel("wq", "1.0.0");
        board.compatible = vec!["rpi4".into()];
        assert!(check(&board).unwrap_err().contains("rpi4"));
        board.compatible = vec!["rpi4".into(), "qemu-x86_64".into()];
        assert_eq!(check(&board), Ok(None));
        let mut outside = channel("wq", "1.0.0");
        outside.rollout = 0;
        assert!(check(&outside).unwrap().unwrap().contains("outside the rollout"));

        save_state(
            store.path(),
            &ModelState {
                serving: Some("1.1.0".parse().unwrap()),
                failures: vec![Failure {
                    version: "1.3.0".parse().unwrap(),
                    reason: "test vector: y[0] = 9, expected 2".into(),
                    at: NOW,
                }],
                ..ModelState::default()
            },
        );
        assert!(check(&channel("wq", "1.1.0")).unwrap().unwrap().contains("not newer"));
        assert!(check(&channel("wq", "1.0.0")).unwrap().unwrap().contains("not newer"));
        let failed = check(&channel("wq", "1.3.0")).unwrap().unwrap();
        assert!(failed.contains("failed on this device") && failed.contains("test vector"));
        assert_eq!(check(&channel("wq", "1.2.0")), Ok(None));
    }

    #[test]
    fn a_model_channel_takes_only_its_own_model_bundle() {
        let key = SigningKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), "http://127.0.0.1:1");
        let write = |bytes: &[u8]| {
            let p = dir.path().join("b.basalt");
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let ch = channel("wq", "1.2.0");
        let good = write(&model_bundle(&key, "wq", "1.2.0", "any"));
        assert_eq!(check_bundle_file(&good, &ch, &s), Ok(()));
        let os = testing::bundle(&testing::version("1.2.0", 1, 4096), "qemu-x86_64", &[&key]);
        let e = check_bundle_file(&write(&os), &ch, &s).unwrap_err();
        assert!(e.contains("not a model"), "{e}");
        let e = check_bundle_file(&write(&model_bundle(&key, "pump", "1.2.0", "any")), &ch, &s)
            .unwrap_err();
        assert!(e.contains("bundle is pump 1.2.0"), "{e}");
        let e = check_bundle_file(&write(&model_bundle(&key, "wq", "1.1.0", "any")), &ch, &s)
            .unwrap_err();
        assert!(e.contains("bundle is wq 1.1.0"), "{e}");
        let e = check_bundle_file(&write(&model_bundle(&key, "wq", "1.2.0", "rpi4")), &ch, &s)
            .unwrap_err();
        assert!(e.contains("rpi4"), "{e}");
        assert!(check_bundle_file(&write(b"junk"), &ch, &s).is_err());
    }

    pub(crate) struct NoBoot;

    impl Machine for NoBoot {
        fn booted_slot(&self) -> Option<basalt_bundle::slot::Slot> {
            None
        }
        fn boot_id(&self) -> String {
            "boot".into()
        }
        fn with_bootloader<T>(
            &self,
            _: &mut dyn FnMut(&mut dyn Bootloader) -> Result<T, UpdateError>,
        ) -> Result<T, UpdateError> {
            Err(UpdateError::Machine("no bootloader in this test".into()))
        }
        fn root_device(&self, _: basalt_bundle::slot::Slot) -> Result<PathBuf, UpdateError> {
            Err(UpdateError::Machine("no disk in this test".into()))
        }
        fn now(&self) -> i64 {
            NOW
        }
    }

    pub(crate) fn agent(key: &SigningKey, dir: &Path) -> Agent<NoBoot> {
        let image = testing::image_config("1.0.0", "qemu-x86_64");
        let trust = Trust { keys: vec![key.public()], threshold: 1 };
        Agent::new(NoBoot, image, trust, StateFile::in_dir(dir))
    }

    /// A one-request-per-connection HTTP server: records each request
    /// line and answers what `answer` gives for it.
    pub(crate) async fn serve(
        answer: impl Fn(&str) -> (u16, Vec<u8>) + Send + 'static,
        seen: Arc<Mutex<Vec<String>>>,
    ) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let line = text.lines().next().unwrap_or("").to_string();
                let (status, body) = answer(&line);
                seen.lock().unwrap().push(line);
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.write_all(&body).await;
            }
        });
        format!("http://{addr}/")
    }

    /// A stand-in for the runtime's load endpoint, answering with the
    /// status and body set in `answer`.
    pub(crate) async fn fake_runtime(
        answer: Arc<Mutex<(u16, String)>>,
        seen: Arc<Mutex<Vec<String>>>,
    ) -> String {
        let url = serve(
            move |_| {
                let (status, body) = answer.lock().unwrap().clone();
                (status, body.into_bytes())
            },
            seen,
        )
        .await;
        url.trim_end_matches('/').to_string()
    }

    async fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer secret-token-1234\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn a_pushed_model_is_installed_and_handed_to_the_runtime() {
        let key = SigningKey::generate().unwrap();
        let stranger = SigningKey::generate().unwrap();
        let store = tempfile::tempdir().unwrap();
        let agent_dir = tempfile::tempdir().unwrap();
        let answer = Arc::new(Mutex::new((
            200u16,
            r#"{"name":"wq","version":"1.1.0","previous":null,"state":"watching","watch_seconds":30}"#
                .to_string(),
        )));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let runtime = fake_runtime(answer.clone(), seen.clone()).await;
        let shared = Arc::new(
            Shared::new(agent(&key, agent_dir.path()), Some("secret-token-1234".into()), false)
                .with_models(settings(store.path(), &runtime)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(api::serve(listener, shared));

        let b11 = model_bundle(&key, "wq", "1.1.0", "any");
        let (code, body) = request(&addr, "POST", "/v1/models", &b11).await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["installed"]["version"], "1.1.0");
        assert_eq!(v["runtime"]["body"]["state"], "watching");
        assert!(v["message"].as_str().unwrap().contains("watching"), "{body}");
        assert!(store.path().join("wq/1.1.0/model.basalt").is_file());
        assert_eq!(*seen.lock().unwrap(), ["POST /v2/repository/models/wq/load HTTP/1.1"]);

        // Refused bundles never reach the runtime.
        let os = testing::bundle(&testing::version("1.2.0", 1, 4096), "qemu-x86_64", &[&key]);
        let theirs = model_bundle(&stranger, "wq", "1.2.0", "any");
        for (bytes, says) in [(os, "not a model"), (theirs, "sign")] {
            let (code, body) = request(&addr, "POST", "/v1/models", &bytes).await;
            assert_eq!(code, 400, "{body}");
            assert!(body.contains(says), "{says}: {body}");
        }
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(!store.path().join("wq/1.2.0").exists());

        // The runtime refuses 1.2.0 (its test vector fails): the agent
        // answers with the runtime's status and reason; the runtime records
        // the failure and the agent then refuses the version for good.
        *answer.lock().unwrap() =
            (400, r#"{"error":"wq 1.2.0 failed its test vector: y[0] = 9, expected 2"}"#.into());
        let b12 = model_bundle(&key, "wq", "1.2.0", "any");
        let (code, body) = request(&addr, "POST", "/v1/models", &b12).await;
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("failed its test vector"), "{body}");
        save_state(
            store.path(),
            &ModelState {
                serving: Some("1.1.0".parse().unwrap()),
                failures: vec![Failure {
                    version: "1.2.0".parse().unwrap(),
                    reason: "test vector: y[0] = 9, expected 2".into(),
                    at: NOW,
                }],
                ..ModelState::default()
            },
        );
        let (code, body) = request(&addr, "POST", "/v1/models", &b12).await;
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("failed on this device before"), "{body}");
        assert_eq!(seen.lock().unwrap().len(), 2);

        let (code, body) = request(&addr, "GET", "/v1/status", b"").await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let m = &v["models"][0];
        assert_eq!(m["name"], "wq");
        assert_eq!(m["serving"], "1.1.0");
        assert_eq!(m["failed"][0]["version"], "1.2.0");
        assert!(m["failed"][0]["reason"].as_str().unwrap().contains("test vector"));

        // A runtime that is down: installed, 502, the reason said.
        let s = settings(store.path(), "http://127.0.0.1:1");
        let e = load(&s.runtime, "wq", Duration::from_secs(5)).await.unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
    }
}
