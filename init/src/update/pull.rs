//! Pull: the agent polls its repository's channel file, and when it names
//! a version for this device, downloads the bundle (resuming over HTTP
//! Range after a cut) to the data partition and installs it.
//!
//! Every poll: `GET channels/<channel>.toml` with `If-None-Match`, then
//! its `.sig`; the channel is verified against the trusted keys before it
//! is parsed, then checked for expiry, board, version, the versions that
//! failed here, and this device's rollout bucket. The ETag is remembered
//! only once a channel file has been dealt with, so a download that broke
//! is tried again at the next poll.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use basalt_bundle::channel::{
    channel_path, model_channel_path, signature_path_for, verify_channel,
};
use basalt_bundle::config::{UpdateConfig, AGENT_STATE_DIR};

use crate::fetch::{self, Fetched, Url};
use crate::update::agent::Machine;
use crate::update::api::{reboot_soon, Shared};
use crate::update::models;

/// Largest channel or signature file fetched.
const MAX_CHANNEL_BYTES: usize = 64 * 1024;

/// The device's rollout identity: `machine-id` in `dir`, made of 16 random
/// bytes the first time.
pub fn machine_id(dir: &Path) -> String {
    let path = dir.join("machine-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return id.to_string();
        }
    }
    let mut bytes = [0u8; 16];
    let _ = getrandom::fill(&mut bytes);
    let id = hex::encode(bytes);
    let _ = std::fs::create_dir_all(dir);
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, format!("{id}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
    id
}

/// A random delay up to `max_ms`.
fn jitter(max_ms: u64) -> Duration {
    if max_ms == 0 {
        return Duration::ZERO;
    }
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    Duration::from_millis(u64::from_le_bytes(b) % max_ms)
}

/// Polls forever.
pub async fn poller<M: Machine + Send + 'static>(shared: Arc<Shared<M>>, cfg: UpdateConfig) {
    let Some(repo) = cfg.repository.clone() else { return };
    let base = match Url::parse(&repo) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("repository {repo}: {e}; not polling");
            return;
        }
    };
    let mut last_message = String::new();
    let mut model_etags: HashMap<String, String> = HashMap::new();
    let mut model_messages: HashMap<String, String> = HashMap::new();
    let mut first = true;
    loop {
        let wait = if first {
            Duration::from_secs(2) + jitter(cfg.poll_jitter_ms.min(5000))
        } else {
            Duration::from_millis(cfg.poll_interval_ms) + jitter(cfg.poll_jitter_ms)
        };
        first = false;
        tokio::time::sleep(wait).await;
        if shared.busy() {
            continue;
        }
        let message = match poll_once(&shared, &base, &cfg).await {
            Ok(m) => m,
            Err(e) => Some(e),
        };
        if let Some(message) = message.filter(|m| *m != last_message) {
            println!("{message}");
            last_message = message;
        }
        for name in &cfg.models {
            if shared.busy() {
                break;
            }
            let message = match poll_model(&shared, &base, &cfg, name, &mut model_etags).await {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => e,
            };
            if model_messages.get(name) != Some(&message) {
                println!("{message}");
                model_messages.insert(name.clone(), message);
            }
        }
    }
}

/// A channel file and its signatures, as fetched (not yet verified).
struct ChannelFile {
    url: Url,
    bytes: Vec<u8>,
    sig: Vec<u8>,
    etag: Option<String>,
}

/// Fetches the channel file at `path` of the repository with
/// `If-None-Match: etag`, then its `.sig`; `None` when it has not changed.
async fn fetch_channel(
    base: &Url,
    path: &str,
    etag: Option<&str>,
) -> Result<Option<ChannelFile>, String> {
    let url = base.join(path).map_err(|e| e.to_string())?;
    let sig_url = base.join(&signature_path_for(path)).map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(30);
    let (bytes, etag) = match fetch::get_small(&url, etag, MAX_CHANNEL_BYTES, timeout).await {
        Ok(Fetched::NotModified) => return Ok(None),
        Ok(Fetched::Body { bytes, etag }) => (bytes, etag),
        Err(e) => return Err(format!("poll {url}: {e}")),
    };
    let sig = match fetch::get_small(&sig_url, None, MAX_CHANNEL_BYTES, timeout).await {
        Ok(Fetched::Body { bytes, .. }) => bytes,
        Ok(Fetched::NotModified) => return Err(format!("{sig_url}: unexpected 304")),
        Err(e) => return Err(format!("poll {sig_url}: {e}")),
    };
    Ok(Some(ChannelFile { url, bytes, sig, etag }))
}

/// One poll of a model's channel; `Ok(Some(message))` for news worth a
/// line. The ETag is remembered once the channel file was dealt with.
async fn poll_model<M: Machine + Send + 'static>(
    shared: &Arc<Shared<M>>,
    base: &Url,
    cfg: &UpdateConfig,
    name: &str,
    etags: &mut HashMap<String, String>,
) -> Result<Option<String>, String> {
    let Some(settings) = shared.models.clone() else { return Ok(None) };
    let path = model_channel_path(name, &cfg.channel).map_err(|e| e.to_string())?;
    let (trust, machine_id, now) = {
        let agent = shared.agent.lock().map_err(|_| "agent state poisoned".to_string())?;
        (agent.trust().clone(), agent.machine_id().to_string(), agent.machine().now())
    };
    let Some(ChannelFile { url, bytes, sig, etag: new_etag }) =
        fetch_channel(base, &path, etags.get(name).map(String::as_str)).await?
    else {
        return Ok(None);
    };
    let remember = |etags: &mut HashMap<String, String>| {
        if let Some(e) = &new_etag {
            etags.insert(name.to_string(), e.clone());
        }
    };
    let channel = verify_channel(&bytes, &sig, &trust).map_err(|e| format!("{url}: {e}"))?;
    match models::check_channel(&channel, name, &settings, now, &machine_id) {
        Ok(None) => {}
        Ok(Some(why)) => {
            remember(etags);
            return Ok(Some(why));
        }
        Err(e) => {
            remember(etags);
            return Err(e);
        }
    }
    let on_disk = basalt_bundle::model::version_dir(&settings.store, name, &channel.version)
        .join(basalt_bundle::model::BUNDLE_FILE);
    if on_disk.is_file() {
        // Installed before but not taken by the runtime (it was down, say):
        // only the load is asked again.
        let answer = models::load(&settings.runtime, name, models::LOAD_TIMEOUT).await?;
        let message = settled(name, &channel.version, &answer)?;
        remember(etags);
        return Ok(Some(message));
    }
    let bundle_url = base.join(&channel.bundle).map_err(|e| e.to_string())?;
    let dir = &settings.downloads;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let partial = dir.join(format!("model-{}-{}.basalt.partial", channel.name, channel.version));
    println!(
        "downloading model {} {} from {bundle_url} ({} bytes)",
        channel.name, channel.version, channel.size
    );
    let downloading = std::time::Instant::now();
    fetch::download(&bundle_url, &partial, channel.size, &channel.sha256, 20, &mut |_| {})
        .await
        .map_err(|e| format!("download {bundle_url}: {e}"))?;
    println!(
        "model {} {}: downloaded in {:.0} ms",
        channel.name,
        channel.version,
        models::ms_since(downloading)
    );
    if let Err(e) = models::check_bundle_file(&partial, &channel, &settings) {
        let _ = std::fs::remove_file(&partial);
        remember(etags);
        return Err(e);
    }
    let answer = install_and_load(shared, &settings, &trust, partial.clone()).await;
    let _ = std::fs::remove_file(&partial);
    let message = answer?;
    remember(etags);
    Ok(Some(message))
}

/// Installs a downloaded model bundle and asks the runtime to load it;
/// the message says what the runtime answered.
async fn install_and_load<M: Machine + Send + 'static>(
    shared: &Arc<Shared<M>>,
    settings: &models::ModelSettings,
    trust: &basalt_bundle::archive::Trust,
    file: PathBuf,
) -> Result<String, String> {
    if !shared.begin() {
        return Err("an update is being installed already".into());
    }
    let s = settings.clone();
    let t = trust.clone();
    let installing = std::time::Instant::now();
    let installed = tokio::task::spawn_blocking(move || {
        let input = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        models::install(&s, std::io::BufReader::with_capacity(1 << 20, input), &t)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string());
    shared.end();
    let installed = installed??;
    println!(
        "model {} {}: installed (signatures and sha256 checked, synced) in {:.0} ms",
        installed.name,
        installed.version,
        models::ms_since(installing)
    );
    let answer = models::load(&settings.runtime, &installed.name, models::LOAD_TIMEOUT).await?;
    settled(&installed.name, &installed.version, &answer)
}

/// The message of a load answer that settles the version: 200 (taken) or
/// 400 (failed, which the runtime records, so it is not offered again).
/// Any other answer (busy, unknown model) is an error, so the channel is
/// looked at again at the next poll.
fn settled(
    name: &str,
    version: &semver::Version,
    answer: &models::LoadAnswer,
) -> Result<String, String> {
    let message = models::describe(name, version, answer);
    match answer.status {
        200 | 400 => Ok(message),
        _ => Err(message),
    }
}

/// One poll; `Ok(Some(message))` for news worth a line on the console.
async fn poll_once<M: Machine + Send + 'static>(
    shared: &Arc<Shared<M>>,
    base: &Url,
    cfg: &UpdateConfig,
) -> Result<Option<String>, String> {
    let path = channel_path(&cfg.channel).map_err(|e| e.to_string())?;
    let (etag, trust, machine_id) = {
        let agent = shared.agent.lock().map_err(|_| "agent state poisoned".to_string())?;
        (agent.state().channel_etag.clone(), agent.trust().clone(), agent.machine_id().to_string())
    };
    let Some(ChannelFile { url, bytes, sig, etag: new_etag }) =
        fetch_channel(base, &path, etag.as_deref()).await?
    else {
        return Ok(None);
    };
    let sh = shared.clone();
    let seen_etag = new_etag.clone();
    let decision = tokio::task::spawn_blocking(move || {
        let mut agent = sh.agent.lock().map_err(|_| "agent state poisoned".to_string())?;
        let channel = match verify_channel(&bytes, &sig, &trust) {
            Ok(c) => c,
            Err(e) => return Err(agent.refuse(format!("channel {path}: {e}"))),
        };
        match agent.check_channel(&channel, &machine_id) {
            Ok(true) => Ok(Some(channel)),
            Ok(false) => {
                agent.remember_channel_etag(seen_etag.clone());
                Ok(None)
            }
            Err(e) => {
                agent.remember_channel_etag(seen_etag.clone());
                Err(agent.refuse(format!("channel {}: {e}", channel.channel)))
            }
        }
    })
    .await
    .map_err(|e| e.to_string())??;
    let Some(channel) = decision else {
        return Ok(Some(format!("{url}: nothing to install for this device")));
    };
    let bundle_url = base.join(&channel.bundle).map_err(|e| e.to_string())?;
    let dir = PathBuf::from(AGENT_STATE_DIR).join("download");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let partial = dir.join(format!("{}-{}.basalt.partial", channel.name, channel.version));
    println!(
        "downloading {} {} from {bundle_url} ({} bytes)",
        channel.name, channel.version, channel.size
    );
    let stats =
        fetch::download(&bundle_url, &partial, channel.size, &channel.sha256, 20, &mut |_| {})
            .await
            .map_err(|e| format!("download {bundle_url}: {e}"))?;
    println!(
        "downloaded {} bytes in {} request(s), resumed from {}",
        stats.bytes_fetched, stats.requests, stats.resumed_from
    );
    if !shared.begin() {
        return Err("an update is being installed already".into());
    }
    let sh = shared.clone();
    let file = partial.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut agent = sh.agent.lock().map_err(|_| "agent state poisoned".to_string())?;
        let input = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let r = agent.install(std::io::BufReader::with_capacity(1 << 20, input));
        if r.is_ok() {
            agent.remember_channel_etag(new_etag);
        }
        r.map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string());
    shared.end();
    let _ = std::fs::remove_file(&partial);
    let done = result??;
    if shared.reboot {
        reboot_soon();
    }
    Ok(Some(format!("installed {} into slot {} ({})", done.version, done.slot, done.entry)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::models::tests::{agent, model_bundle, save_state, serve, settings};
    use basalt_bundle::channel::{Channel, FORMAT_VERSION};
    use basalt_bundle::keys::SigningKey;
    use basalt_bundle::model::{Failure, ModelState};
    use basalt_bundle::signature::{sign, SignatureFile};
    use sha2::{Digest, Sha256};
    use std::sync::Mutex;

    const NOW: i64 = 1_800_000_000;

    /// Puts `bundle` on `repo`'s channel of model `name`, as `basalt
    /// publish` does.
    fn publish(repo: &Path, key: &SigningKey, name: &str, version: &str, bundle: &[u8]) {
        let rel = format!("bundles/models/{name}-{version}.basalt");
        std::fs::create_dir_all(repo.join("bundles/models")).unwrap();
        std::fs::write(repo.join(&rel), bundle).unwrap();
        let ch = Channel {
            format: FORMAT_VERSION,
            channel: "stable".into(),
            name: name.into(),
            version: version.parse().unwrap(),
            bundle: rel,
            sha256: hex::encode(Sha256::digest(bundle)),
            size: bundle.len() as u64,
            compatible: vec!["any".into()],
            published: basalt_bundle::civil::unix_to_datetime(NOW - 10),
            expires: basalt_bundle::civil::unix_to_datetime(NOW + 1000),
            rollout: 100,
        };
        let path = model_channel_path(name, "stable").unwrap();
        let text = ch.to_toml();
        let mut sigs = SignatureFile::default();
        sigs.add(sign(text.as_bytes(), key));
        std::fs::create_dir_all(repo.join(&path).parent().unwrap()).unwrap();
        std::fs::write(repo.join(&path), &text).unwrap();
        std::fs::write(repo.join(signature_path_for(&path)), sigs.to_toml().unwrap()).unwrap();
    }

    fn config() -> UpdateConfig {
        UpdateConfig {
            threshold: 1,
            listen: "127.0.0.1:0".into(),
            token_file: None,
            repository: None,
            channel: "stable".into(),
            poll_interval_ms: 1000,
            poll_jitter_ms: 0,
            reboot: false,
            models: vec!["wq".into()],
            runtime: String::new(),
        }
    }

    #[tokio::test]
    async fn a_model_channel_is_pulled_installed_and_loaded() {
        let key = SigningKey::generate().unwrap();
        let repo = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let agent_dir = tempfile::tempdir().unwrap();
        let root = repo.path().to_path_buf();
        let repo_seen = Arc::new(Mutex::new(Vec::new()));
        let base = serve(
            move |line| {
                let path = line.split(' ').nth(1).unwrap_or("/").trim_start_matches('/');
                match std::fs::read(root.join(path)) {
                    Ok(bytes) => (200, bytes),
                    Err(_) => (404, b"not found".to_vec()),
                }
            },
            repo_seen.clone(),
        )
        .await;
        let runtime_seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new((
            200u16,
            r#"{"name":"wq","version":"1.1.0","state":"watching","watch_seconds":30}"#.to_string(),
        )));
        let runtime =
            crate::update::models::tests::fake_runtime(answer.clone(), runtime_seen.clone()).await;
        let shared = Arc::new(
            Shared::new(agent(&key, agent_dir.path()), None, false)
                .with_models(settings(store.path(), &runtime)),
        );
        let base = Url::parse(&base).unwrap();
        let cfg = config();
        let mut etags = HashMap::new();
        let poll = |etags: &mut HashMap<String, String>| {
            let (shared, base, cfg) = (shared.clone(), base.clone(), cfg.clone());
            let mut e = std::mem::take(etags);
            async move {
                let r = poll_model(&shared, &base, &cfg, "wq", &mut e).await;
                (r, e)
            }
        };
        let bundles = |seen: &Mutex<Vec<String>>| {
            seen.lock().unwrap().iter().filter(|l| l.contains("/bundles/")).count()
        };

        // Nothing published yet: the poll says why.
        let (r, e) = poll(&mut etags).await;
        etags = e;
        assert!(r.unwrap_err().contains("404"));

        publish(repo.path(), &key, "wq", "1.1.0", &model_bundle(&key, "wq", "1.1.0", "any"));
        let (r, e) = poll(&mut etags).await;
        etags = e;
        let msg = r.unwrap().unwrap();
        assert!(msg.contains("wq 1.1.0") && msg.contains("watching"), "{msg}");
        assert!(store.path().join("wq/1.1.0/model.basalt").is_file());
        assert_eq!(*runtime_seen.lock().unwrap(), ["POST /v2/repository/models/wq/load HTTP/1.1"]);
        assert_eq!(bundles(&repo_seen), 1);

        // A busy runtime: the version is offered again at the next poll,
        // from the disk.
        *answer.lock().unwrap() = (409, r#"{"error":"busy"}"#.to_string());
        let (r, e) = poll(&mut etags).await;
        etags = e;
        assert!(r.unwrap_err().contains("(409)"));
        *answer.lock().unwrap() =
            (200, r#"{"name":"wq","version":"1.1.0","state":"watching"}"#.to_string());
        let (r, e) = poll(&mut etags).await;
        etags = e;
        assert!(r.unwrap().unwrap().contains("watching"));
        assert_eq!(runtime_seen.lock().unwrap().len(), 3);
        assert_eq!(bundles(&repo_seen), 1);

        // The runtime now serves it: nothing more to do.
        save_state(
            store.path(),
            &ModelState { serving: Some("1.1.0".parse().unwrap()), ..ModelState::default() },
        );
        let (r, e) = poll(&mut etags).await;
        etags = e;
        assert!(r.unwrap().unwrap().contains("not newer"));
        assert_eq!(runtime_seen.lock().unwrap().len(), 3);

        // A version that failed here is not downloaded again.
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
        publish(repo.path(), &key, "wq", "1.2.0", &model_bundle(&key, "wq", "1.2.0", "any"));
        let (r, e) = poll(&mut etags).await;
        etags = e;
        assert!(r.unwrap().unwrap().contains("failed on this device"));
        assert_eq!(bundles(&repo_seen), 1);

        // An OS bundle, or another model, on the model's channel: refused
        // before anything is installed, and the runtime is not called.
        let os = crate::update::testing::bundle(
            &crate::update::testing::version("1.3.0", 1, 4096),
            "qemu-x86_64",
            &[&key],
        );
        let os_bundle = os.clone();
        publish(repo.path(), &key, "wq", "1.3.0", &os_bundle);
        let (r, e) = poll(&mut etags).await;
        etags = e;
        let err = r.unwrap_err();
        assert!(err.contains("not a model"), "{err}");
        publish(repo.path(), &key, "wq", "1.4.0", &model_bundle(&key, "pump", "1.4.0", "any"));
        let (r, _) = poll(&mut etags).await;
        let err = r.unwrap_err();
        assert!(err.contains("the bundle is pump 1.4.0"), "{err}");
        assert_eq!(runtime_seen.lock().unwrap().len(), 3);
        assert_eq!(basalt_bundle::model::installed_versions(store.path(), "wq").len(), 1);
    }
}
