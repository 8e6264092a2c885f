//! The agent's process: configuration, keys, the API, the reconciler and
//! the poller, on one tokio thread (installs run on a blocking thread).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use basalt_bundle::archive::Trust;
use basalt_bundle::config::{
    ImageConfig, UpdateConfig, AGENT_STATE_DIR, IMAGE_CONFIG_PATH, MODEL_STORE_DIR,
    TRUSTED_KEYS_DIR,
};
use basalt_bundle::keys::PublicKey;

use crate::update::agent::Agent;
use crate::update::api::{self, Shared};
use crate::update::device::Device;
use crate::update::models::ModelSettings;
use crate::update::state::StateFile;

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The image configuration is missing or wrong.
    #[error("cannot read {IMAGE_CONFIG_PATH}: {0}")]
    Config(String),
    /// The image takes no updates.
    #[error("{IMAGE_CONFIG_PATH} has no [update] table; this image was built without `[update]`")]
    NoUpdate,
    /// No trusted key could be read.
    #[error("trusted keys in {TRUSTED_KEYS_DIR}: {0}")]
    Keys(String),
    /// The API cannot listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token file cannot be read.
    #[error("cannot read the API token {path}: {source}")]
    Token {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The async runtime cannot start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Reads every `*.pub` in `dir`.
pub fn load_trust(dir: &Path, threshold: usize) -> Result<Trust, StartError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StartError::Keys(e.to_string()))?;
    let mut keys = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| StartError::Keys(e.to_string()))?.path();
        if path.extension().is_some_and(|e| e == "pub") {
            let pem = std::fs::read_to_string(&path)
                .map_err(|e| StartError::Keys(format!("{}: {e}", path.display())))?;
            let key = PublicKey::from_pem(&pem)
                .map_err(|e| StartError::Keys(format!("{}: {e}", path.display())))?;
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err(StartError::Keys("no *.pub file".into()));
    }
    Ok(Trust { keys, threshold })
}

/// The agent's configuration from the image.
pub fn load_config() -> Result<(ImageConfig, UpdateConfig), StartError> {
    let text = std::fs::read_to_string(IMAGE_CONFIG_PATH)
        .map_err(|e| StartError::Config(e.to_string()))?;
    let image = ImageConfig::from_toml(&text).map_err(|e| StartError::Config(e.to_string()))?;
    let update = image.update.clone().ok_or(StartError::NoUpdate)?;
    Ok((image, update))
}

/// Runs the agent until the process is stopped.
pub fn run() -> Result<(), StartError> {
    let (image, update) = load_config()?;
    let trust = load_trust(Path::new(TRUSTED_KEYS_DIR), update.threshold)?;
    let token = match &update.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| StartError::Token { path: path.clone(), source })?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let state = StateFile::in_dir(Path::new(AGENT_STATE_DIR));
    let machine_id = crate::update::pull::machine_id(Path::new(AGENT_STATE_DIR));
    let channel = update.repository.as_ref().map(|_| update.channel.clone());
    let agent =
        Agent::new(Device::new(), image.clone(), trust, state).with_identity(machine_id, channel);
    println!(
        "{} {} in slot {}; {} trusted key(s), threshold {}",
        image.name,
        image.version,
        agent.machine_slot_name(),
        agent.trusted_keys(),
        update.threshold
    );
    let models = ModelSettings {
        store: PathBuf::from(MODEL_STORE_DIR),
        runtime: update.runtime.clone(),
        names: update.models.clone(),
        board: image.board.clone(),
        downloads: Path::new(AGENT_STATE_DIR).join("download"),
    };
    let shared = Arc::new(Shared::new(agent, token, update.reboot).with_models(models));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&update.listen)
            .await
            .map_err(|source| StartError::Listen { addr: update.listen.clone(), source })?;
        println!("API on http://{}/v1/status", update.listen);
        // One thread: the API, the reconciler and the poller take turns.
        let poll = async {
            if update.repository.is_some() {
                crate::update::pull::poller(shared.clone(), update.clone()).await;
            }
        };
        tokio::join!(api::serve(listener, shared.clone()), reconciler(shared.clone()), poll);
        Ok(())
    })
}

/// Reports the outcome of a pending install once the boot tells (the new
/// slot blessed, or the old one back).
async fn reconciler<M: crate::update::agent::Machine + Send + 'static>(shared: Arc<Shared<M>>) {
    loop {
        let sh = shared.clone();
        let done = tokio::task::spawn_blocking(move || {
            let Ok(mut agent) = sh.agent.lock() else { return true };
            if let Some(msg) = agent.reconcile() {
                println!("{msg}");
            }
            agent.state().pending.is_none()
        })
        .await
        .unwrap_or(true);
        let wait = if done { 30 } else { 1 };
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}
