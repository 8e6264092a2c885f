//! The agent's memory across reboots, on the data partition: the update
//! waiting for its first boot, the outcome of the last one, and the
//! versions that failed on this device and must not be installed again.
//!
//! Written atomically (temporary file, flush, rename, flush the folder),
//! so a power cut leaves the old state or the new one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use basalt_bundle::slot::Slot;
use serde::{Deserialize, Serialize};

use crate::update::cut;

/// An installed version waiting to be booted and blessed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// The version installed.
    pub version: String,
    /// The version that was running when it was installed.
    pub from: String,
    /// The slot it went into.
    pub slot: Slot,
    /// The kernel's boot id when it was installed, to tell "not rebooted
    /// yet" from "rebooted and fell back".
    pub boot_id: String,
    /// When it was installed (Unix seconds).
    pub at: i64,
}

/// What the last update attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Result {
    /// Installed into the other slot; waiting for the reboot.
    Installed,
    /// The new version booted and was blessed.
    Updated,
    /// The new version did not become healthy; the bootloader went back.
    RolledBack,
    /// The bundle was refused before anything was written.
    Refused,
    /// The install started and stopped on an error; the running slot is
    /// untouched.
    Failed,
}

/// The outcome of the last update attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// What happened.
    pub result: Result,
    /// The version running before.
    #[serde(default)]
    pub from: Option<String>,
    /// The version offered.
    #[serde(default)]
    pub to: Option<String>,
    /// One line for people: "updated 1.0.0 -> 1.1.0", or the error.
    pub message: String,
    /// When (Unix seconds).
    pub at: i64,
}

/// Everything the agent remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    /// An install waiting for its boot.
    #[serde(default)]
    pub pending: Option<Pending>,
    /// The last attempt.
    #[serde(default)]
    pub last: Option<Outcome>,
    /// Versions that were installed here and did not become healthy.
    #[serde(default)]
    pub failed_versions: Vec<String>,
    /// The ETag of the channel file last seen, for `If-None-Match`.
    #[serde(default)]
    pub channel_etag: Option<String>,
}

/// Where the state lives and how it is kept.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file `state.toml` in `dir`.
    pub fn in_dir(dir: &Path) -> StateFile {
        StateFile { path: dir.join("state.toml") }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state. A missing file is a fresh state; a damaged one is
    /// moved aside (`state.toml.damaged`) and reported, and the agent
    /// starts fresh rather than refusing every update forever.
    pub fn load(&self) -> (AgentState, Option<String>) {
        match fs::read_to_string(&self.path) {
            Ok(text) => match toml::from_str(&text) {
                Ok(state) => (state, None),
                Err(e) => {
                    let aside = self.path.with_extension("toml.damaged");
                    let _ = fs::rename(&self.path, &aside);
                    let msg = format!(
                        "{} is damaged ({e}); moved to {} and starting fresh",
                        self.path.display(),
                        aside.display()
                    );
                    (AgentState::default(), Some(msg))
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => (AgentState::default(), None),
            Err(e) => {
                (AgentState::default(), Some(format!("cannot read {}: {e}", self.path.display())))
            }
        }
    }

    /// Writes the state atomically.
    pub fn save(&self, state: &AgentState) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let text = toml::to_string(state).map_err(io::Error::other)?;
        let tmp = self.path.with_extension("toml.tmp");
        let mut f = cut::create(&tmp)?;
        cut::write_all(&mut f, text.as_bytes())?;
        cut::sync(&f)?;
        drop(f);
        cut::rename(&tmp, &self.path)?;
        cut::sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_survives_damage() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(&dir.path().join("agent"));
        assert_eq!(file.load(), (AgentState::default(), None));
        let state = AgentState {
            pending: Some(Pending {
                version: "1.1.0".into(),
                from: "1.0.0".into(),
                slot: Slot::B,
                boot_id: "x".into(),
                at: 5,
            }),
            last: Some(Outcome {
                result: Result::Installed,
                from: Some("1.0.0".into()),
                to: Some("1.1.0".into()),
                message: "installed".into(),
                at: 5,
            }),
            failed_versions: vec!["0.9.0".into()],
            channel_etag: Some("\"e\"".into()),
        };
        file.save(&state).unwrap();
        assert_eq!(file.load(), (state, None));
        fs::write(file.path(), "pending = 3").unwrap();
        let (fresh, warning) = file.load();
        assert_eq!(fresh, AgentState::default());
        assert!(warning.unwrap().contains("damaged"));
        assert!(dir.path().join("agent/state.toml.damaged").exists());
    }
}
