//! The try a Raspberry Pi still owes an installed slot, kept on the data
//! partition so that a power cut between an install and its reboot loses
//! nothing.
//!
//! systemd-boot tries a new entry on any boot. The Pi firmware runs
//! `autoboot.txt`'s `[tryboot]` partition only on a `reboot "0 tryboot"`,
//! and a normal boot (a power cut, a power-off) runs `[all]`. So after an
//! install has armed a slot the update agent writes [`TRY_MARKER`],
//! naming the slot and the version armed, and PID 1 works from it:
//!
//! - **at every reboot** ([`reboot_argument`]): while the marker owes a
//!   try no reboot has asked for (`reboots=0`), the reboot passes `0
//!   tryboot`, counted in the marker (`reboots=1`) just before
//!   `reboot(2)`;
//! - **at every boot, before services start** ([`at_boot`]), from the
//!   firmware's report (the tryboot flag, the partition booted) and
//!   `autoboot.txt`:
//!
//! | the boot | the marker | PID 1 |
//! |---|---|---|
//! | with the flag, into the armed slot | names it | removes it: the try is happening, and a failed try is never repeated |
//! | without the flag | names the armed slot, `reboots=0` | the try never started (cut or power-off before the reboot): keeps it and, once per install (`retries`), reboots with `0 tryboot` when this boot is blessed |
//! | without the flag | names the armed slot, `reboots=1` | a tryboot reboot was asked and this is not the try: the try ended before stage 2 (a hang, a reset); removes it, the agent reports the rollback |
//! | any | names a slot `autoboot.txt` no longer arms, or another version | stale (blessed, marked bad, reinstalled): removes it |
//!
//! The update agent does not report a rollback while the marker names its
//! pending install (slot and version). Every write goes through
//! [`crate::update::cut`]: a temporary file, flushed, renamed over the
//! marker, the folder flushed.

use std::io;
use std::path::{Path, PathBuf};

use basalt_bundle::slot::Slot;

use crate::update::cut;

/// The marker on a device: on the data partition, beside the agent's
/// state (`/data/basalt/agent`), because `/run` does not survive a power
/// cut.
pub const TRY_MARKER: &str = "/data/basalt/reboot-to-try";

/// What the marker records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryMarker {
    /// The slot the install armed.
    pub slot: Slot,
    /// The version installed there.
    pub version: String,
    /// Reboots PID 1 passed `0 tryboot` since the install (0 or 1).
    pub reboots: u32,
    /// Automatic re-tries PID 1 asked for after a boot found the try had
    /// not started (0 or 1: never more than one per install).
    pub retries: u32,
}

impl TryMarker {
    /// The marker an install of `version` into `slot` leaves.
    pub fn new(slot: Slot, version: &str) -> TryMarker {
        TryMarker { slot, version: version.to_string(), reboots: 0, retries: 0 }
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        format!(
            "slot={}\nversion={}\nreboots={}\nretries={}\n",
            self.slot, self.version, self.reboots, self.retries
        )
    }

    /// Reads the file's text; `None` when a field is missing or wrong.
    pub fn parse(text: &str) -> Option<TryMarker> {
        let (mut slot, mut version, mut reboots, mut retries) = (None, None, None, None);
        for line in text.lines() {
            match line.split_once('=') {
                Some(("slot", v)) => slot = v.parse::<Slot>().ok(),
                Some(("version", v)) if !v.is_empty() => version = Some(v.to_string()),
                Some(("reboots", v)) => reboots = v.parse().ok(),
                Some(("retries", v)) => retries = v.parse().ok(),
                _ => {}
            }
        }
        Some(TryMarker { slot: slot?, version: version?, reboots: reboots?, retries: retries? })
    }
}

/// Why the marker could not be read, written or removed.
#[derive(Debug, thiserror::Error)]
pub enum TryMarkerError {
    /// Reading it failed.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The marker.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// It holds no slot, version and counts (a write cut short by hand,
    /// or another program's file).
    #[error("{} is damaged", path.display())]
    Damaged {
        /// The marker.
        path: PathBuf,
    },
    /// Writing it failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The marker.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Removing it failed.
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        /// The marker.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Whether a marker file is there (read or not).
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Reads the marker; `Ok(None)` when there is none.
pub fn read(path: &Path) -> Result<Option<TryMarker>, TryMarkerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => TryMarker::parse(&text)
            .map(Some)
            .ok_or_else(|| TryMarkerError::Damaged { path: path.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TryMarkerError::Read { path: path.to_path_buf(), source }),
    }
}

fn temporary(path: &Path) -> PathBuf {
    path.with_extension("tmp")
}

/// Writes the marker atomically: a temporary file, flushed, renamed over
/// the marker, the folder flushed (created first if missing).
pub fn write(path: &Path, marker: &TryMarker) -> Result<(), TryMarkerError> {
    let err = |source| TryMarkerError::Write { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temporary(path);
    cut::create_dir_all(dir).map_err(err)?;
    let mut file = cut::create(&tmp).map_err(err)?;
    cut::write_all(&mut file, marker.to_text().as_bytes()).map_err(err)?;
    cut::sync(&file).map_err(err)?;
    drop(file);
    cut::rename(&tmp, path).map_err(err)?;
    cut::sync_dir(dir).map_err(err)
}

/// Removes the marker (and a temporary file left by a cut) and flushes
/// the folder; nothing to remove is not an error.
pub fn remove(path: &Path) -> Result<(), TryMarkerError> {
    let err = |source| TryMarkerError::Remove { path: path.to_path_buf(), source };
    if !exists(path) && !exists(&temporary(path)) {
        return Ok(());
    }
    cut::remove(path).map_err(err)?;
    cut::remove(&temporary(path)).map_err(err)?;
    cut::sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(err)
}

/// Whether the marker names `slot` and `version`: the agent's pending
/// install still waits for its try.
pub fn names(path: &Path, slot: Slot, version: &str) -> bool {
    matches!(read(path), Ok(Some(m)) if m.slot == slot && m.version == version)
}

/// What the firmware reported for this boot and what `autoboot.txt`
/// arms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryView {
    /// The firmware's tryboot flag.
    pub tried: bool,
    /// The slot the firmware booted, if it is a slot's partition.
    pub booted: Option<Slot>,
    /// The slot `[tryboot]` names, on trial (neither committed nor bad),
    /// with its version.
    pub armed: Option<(Slot, String)>,
}

/// What a marker means at boot; see the module's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// This boot is the try: remove the marker.
    Started,
    /// The try never started: keep the marker and re-try once.
    Retry,
    /// The try never started, and the one automatic re-try is spent:
    /// keep the marker; the next reboot of any kind tries it.
    Wait,
    /// A tryboot reboot was asked and this boot is not the try: the try
    /// ended before stage 2. Remove the marker.
    GaveUp,
    /// The slot is no longer armed with that version: remove the marker.
    Stale,
}

/// Decides what `marker` means for the boot `view` describes.
pub fn decide(marker: &TryMarker, view: &TryView) -> Decision {
    let armed = view.armed.as_ref().is_some_and(|(s, v)| *s == marker.slot && *v == marker.version);
    if !armed {
        Decision::Stale
    } else if view.tried && view.booted == Some(marker.slot) {
        Decision::Started
    } else if marker.reboots > 0 {
        Decision::GaveUp
    } else if marker.retries == 0 {
        Decision::Retry
    } else {
        Decision::Wait
    }
}

/// What [`at_boot`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtBoot {
    /// No marker.
    NoMarker,
    /// A damaged marker, removed.
    Damaged,
    /// The marker and what was done about it.
    Marker(TryMarker, Decision),
}

impl AtBoot {
    /// Whether PID 1 should reboot with the try argument once this boot
    /// is blessed.
    pub fn retry(&self) -> bool {
        matches!(self, AtBoot::Marker(_, Decision::Retry))
    }

    /// A line for the console, if there is something to say.
    pub fn message(&self) -> Option<String> {
        let (m, d) = match self {
            AtBoot::NoMarker => return None,
            AtBoot::Damaged => {
                return Some(format!("{TRY_MARKER} was damaged; removed it"));
            }
            AtBoot::Marker(m, d) => (m, d),
        };
        let what = format!("{} in slot {}", m.version, m.slot);
        Some(match d {
            Decision::Started => format!("this boot is the try of {what}"),
            Decision::Retry => format!(
                "the try of {what} never started (power cut or power-off before its reboot); \
                 rebooting to try it once this boot is blessed"
            ),
            Decision::Wait => format!(
                "the try of {what} has still not started and was re-tried once already; the next \
                 reboot will try it"
            ),
            Decision::GaveUp => format!(
                "the try of {what} was started and ended before stage 2; the committed slot runs"
            ),
            Decision::Stale => format!("{what} is no longer armed; its try marker is removed"),
        })
    }
}

/// PID 1's step at boot, before services start: reads the marker at
/// `path`, decides from `view`, and removes the marker or counts the
/// re-try (flushed before this returns). An error means no automatic
/// re-try this boot.
pub fn at_boot(path: &Path, view: &TryView) -> Result<AtBoot, TryMarkerError> {
    let marker = match read(path) {
        Ok(Some(m)) => m,
        Ok(None) => {
            // A temporary file left by a cut before the rename.
            remove(path)?;
            return Ok(AtBoot::NoMarker);
        }
        Err(TryMarkerError::Damaged { .. }) => {
            remove(path)?;
            return Ok(AtBoot::Damaged);
        }
        Err(e) => return Err(e),
    };
    let decision = decide(&marker, view);
    match decision {
        Decision::Started | Decision::GaveUp | Decision::Stale => remove(path)?,
        Decision::Retry => {
            write(path, &TryMarker { retries: marker.retries + 1, ..marker.clone() })?
        }
        Decision::Wait => {}
    }
    Ok(AtBoot::Marker(marker, decision))
}

/// The argument PID 1's reboot passes to the firmware: the back-end's
/// try argument (`arg`, `None` for a back-end that tries on any boot)
/// when the marker owes a try no reboot has asked for yet, else none.
/// That reboot is counted in the marker first; when the count cannot be
/// written, or a reboot already asked (a marker stage 2 could not settle),
/// the reboot is plain, so a failed try is never repeated. Only the
/// back-end's own argument is ever passed, never the marker's content.
pub fn reboot_argument(
    arg: Option<&'static str>,
    path: &Path,
) -> Result<Option<&'static str>, TryMarkerError> {
    let Some(arg) = arg else { return Ok(None) };
    let Some(marker) = read(path)? else { return Ok(None) };
    if marker.reboots > 0 {
        return Ok(None);
    }
    write(path, &TryMarker { reboots: 1, ..marker })?;
    Ok(Some(arg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(tried: bool, booted: Slot, armed: Option<(Slot, &str)>) -> TryView {
        TryView { tried, booted: Some(booted), armed: armed.map(|(s, v)| (s, v.to_string())) }
    }

    #[test]
    fn the_marker_round_trips_and_needs_every_field() {
        let m = TryMarker { reboots: 1, ..TryMarker::new(Slot::B, "1.1.0") };
        assert_eq!(m.to_text(), "slot=b\nversion=1.1.0\nreboots=1\nretries=0\n");
        assert_eq!(TryMarker::parse(&m.to_text()), Some(m));
        assert_eq!(TryMarker::parse("slot=b\nversion=1.1.0\nreboots=0\n"), None);
        assert_eq!(TryMarker::parse("slot=c\nversion=1\nreboots=0\nretries=0\n"), None);
    }

    #[test]
    fn each_boot_decides_from_the_flag_the_slot_and_the_counts() {
        let m = TryMarker::new(Slot::B, "1.1.0");
        let armed = Some((Slot::B, "1.1.0"));
        assert_eq!(decide(&m, &view(true, Slot::B, armed)), Decision::Started);
        assert_eq!(decide(&m, &view(false, Slot::A, armed)), Decision::Retry);
        let retried = TryMarker { retries: 1, ..m.clone() };
        assert_eq!(decide(&retried, &view(false, Slot::A, armed)), Decision::Wait);
        let asked = TryMarker { reboots: 1, ..m.clone() };
        assert_eq!(decide(&asked, &view(false, Slot::A, armed)), Decision::GaveUp);
        assert_eq!(decide(&asked, &view(true, Slot::B, armed)), Decision::Started);
        // Blessed, marked bad, or re-armed with another version.
        assert_eq!(decide(&m, &view(false, Slot::B, None)), Decision::Stale);
        assert_eq!(decide(&m, &view(false, Slot::A, Some((Slot::B, "1.2.0")))), Decision::Stale);
        assert_eq!(decide(&m, &view(false, Slot::B, Some((Slot::A, "1.1.0")))), Decision::Stale);
    }

    #[test]
    fn a_try_reboot_needs_the_marker_and_a_back_end_that_asks_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("basalt/reboot-to-try");
        assert_eq!(reboot_argument(Some("0 tryboot"), &path).unwrap(), None);
        write(&path, &TryMarker::new(Slot::B, "1.1.0")).unwrap();
        assert_eq!(reboot_argument(None, &path).unwrap(), None);
        assert_eq!(read(&path).unwrap().unwrap().reboots, 0);
        assert_eq!(reboot_argument(Some("0 tryboot"), &path).unwrap(), Some("0 tryboot"));
        assert_eq!(read(&path).unwrap().unwrap().reboots, 1);
        // Asked once already: never again for this install.
        assert_eq!(reboot_argument(Some("0 tryboot"), &path).unwrap(), None);
        assert!(names(&path, Slot::B, "1.1.0"));
        assert!(!names(&path, Slot::B, "1.2.0"));
        std::fs::write(&path, "anything").unwrap();
        let e = reboot_argument(Some("0 tryboot"), &path).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    #[test]
    fn at_boot_removes_damaged_and_half_written_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reboot-to-try");
        let v = view(false, Slot::A, Some((Slot::B, "1.1.0")));
        assert_eq!(at_boot(&path, &v).unwrap(), AtBoot::NoMarker);
        std::fs::write(temporary(&path), "slot=b\n").unwrap();
        assert_eq!(at_boot(&path, &v).unwrap(), AtBoot::NoMarker);
        assert!(!exists(&temporary(&path)));
        std::fs::write(&path, "slot=b\n").unwrap();
        assert_eq!(at_boot(&path, &v).unwrap(), AtBoot::Damaged);
        assert!(!exists(&path));
    }
}
