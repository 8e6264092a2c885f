//! The update agent's decisions: what to accept, where to write it, and
//! what to report. The HTTP side ([`crate::update::api`]) and the poller
//! call into this; everything here runs on a host in tests, with a temp
//! dir for the ESP and files for the partitions.

use std::io::Read;
use std::path::PathBuf;

use basalt_bundle::archive::{BundleError, BundleReader, Trust};
use basalt_bundle::channel::Channel;
use basalt_bundle::config::ImageConfig;
use basalt_bundle::entry::{compare_versions, EntryState};
use basalt_bundle::manifest::{BundleKind, Manifest};
use basalt_bundle::slot::Slot;
use serde::Serialize;

use crate::assess::{AssessError, Bootloader, SlotBoot};
use crate::pending_try::{self, TryMarker};
use crate::update::install::{self, BundlePayloads, InstallError};
use crate::update::state::{self, AgentState, Outcome, Pending, StateFile};

/// Why an update was not installed. The running slot is untouched in
/// every case.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The bundle's signatures, format or content are wrong.
    #[error("{0}")]
    Bundle(#[from] BundleError),
    /// The bundle is well signed but not for this device now.
    #[error("{0}")]
    Refused(String),
    /// Writing the new slot failed.
    #[error("{0}")]
    Install(#[from] InstallError),
    /// The bootloader could not be read.
    #[error("{0}")]
    Bootloader(#[from] AssessError),
    /// Another update is being installed.
    #[error("an update is being installed already; try again when it is done")]
    Busy,
    /// The machine cannot tell what it is running.
    #[error("{0}")]
    Machine(String),
}

impl UpdateError {
    /// Whether the bundle was refused before anything was written.
    pub fn refused_before_writing(&self) -> bool {
        matches!(self, UpdateError::Bundle(_) | UpdateError::Refused(_) | UpdateError::Busy)
    }
}

/// What the agent needs from the machine it runs on.
pub trait Machine {
    /// The slot this boot runs, from the kernel command line.
    fn booted_slot(&self) -> Option<Slot>;
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    fn boot_id(&self) -> String;
    /// Runs `f` with the bootloader (on a device: with the ESP mounted).
    fn with_bootloader<T>(
        &self,
        f: &mut dyn FnMut(&mut dyn Bootloader) -> Result<T, UpdateError>,
    ) -> Result<T, UpdateError>;
    /// The block device (or, in tests, file) of `slot`'s root partition.
    fn root_device(&self, slot: Slot) -> Result<PathBuf, UpdateError>;
    /// The time, in Unix seconds.
    fn now(&self) -> i64;
    /// Told that the next reboot must pass `arg` to the firmware (`0
    /// tryboot` on a Raspberry Pi) to try the slot an install armed;
    /// called only when the bootloader needs such an argument, after the
    /// try marker ([`Machine::try_marker`]) is written. A device needs
    /// nothing more: PID 1 reads the marker when it reboots.
    fn arm_try_reboot(&self, arg: &'static str) -> Result<(), UpdateError> {
        let _ = arg;
        Ok(())
    }
    /// Where the agent records the try an install still needs
    /// ([`crate::pending_try`]), on a machine whose bootloader tries a
    /// slot only on a reboot that asks for it; `None` where there is no
    /// such record (the try reboot is then only [`Machine::arm_try_reboot`]).
    fn try_marker(&self) -> Option<PathBuf> {
        None
    }
}

/// One slot as `GET /v1/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    /// `a` or `b`.
    pub slot: Slot,
    /// The version its entry names.
    pub version: String,
    /// How the bootloader records it: the entry file (`b+2-1.conf`) for
    /// systemd-boot.
    pub entry: String,
    /// `good`, `trying` or `bad`.
    pub state: &'static str,
    /// Whether this boot runs it.
    pub booted: bool,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Image name.
    pub image: String,
    /// The version running.
    pub version: String,
    /// The board.
    pub board: String,
    /// The slot running.
    pub booted_slot: Option<Slot>,
    /// Whether the running slot is blessed.
    pub blessed: bool,
    /// Both slots' entries.
    pub slots: Vec<SlotStatus>,
    /// An installed version waiting for its boot.
    pub pending: Option<Pending>,
    /// The last update attempt.
    pub last_update: Option<Outcome>,
    /// Versions that failed here and are refused.
    pub failed_versions: Vec<String>,
    /// This device's rollout identity.
    pub machine_id: String,
    /// The channel followed, if the device polls a repository.
    pub channel: Option<String>,
    /// This device's rollout bucket (0..100) on that channel: a channel
    /// published with `rollout` above it includes the device.
    pub rollout_bucket: Option<u8>,
    /// Problems reading the bootloader or the state, if any.
    pub warnings: Vec<String>,
}

/// What a successful install did.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    /// The version now in the other slot.
    pub version: String,
    /// The version running.
    pub from: String,
    /// The slot written.
    pub slot: Slot,
    /// Its new boot entry.
    pub entry: String,
    /// Key ids whose signatures were accepted.
    pub signed_by: Vec<String>,
    /// Bytes written (boot files and root filesystem).
    pub bytes: u64,
}

/// The agent: the image it runs in, the keys it trusts, its state.
pub struct Agent<M: Machine> {
    machine: M,
    image: ImageConfig,
    trust: Trust,
    state_file: StateFile,
    state: AgentState,
    warnings: Vec<String>,
    chunk: usize,
    machine_id: String,
    channel: Option<String>,
}

fn state_word(s: EntryState) -> &'static str {
    match s {
        EntryState::Good => "good",
        EntryState::Indeterminate => "trying",
        EntryState::Bad => "bad",
    }
}

impl<M: Machine> Agent<M> {
    /// An agent for the image described by `image`, trusting `trust`, with
    /// its state in `state_file`.
    pub fn new(machine: M, image: ImageConfig, trust: Trust, state_file: StateFile) -> Agent<M> {
        let (state, warning) = state_file.load();
        Agent {
            machine,
            image,
            trust,
            state_file,
            state,
            warnings: warning.into_iter().collect(),
            chunk: install::CHUNK,
            machine_id: String::new(),
            channel: None,
        }
    }

    /// Sets the write size (tests use small ones to get many cut points).
    pub fn with_chunk(mut self, chunk: usize) -> Agent<M> {
        self.chunk = chunk;
        self
    }

    /// The machine.
    pub fn machine(&self) -> &M {
        &self.machine
    }

    /// The booted slot's name, for messages (`?` when unknown).
    pub fn machine_slot_name(&self) -> &'static str {
        self.machine.booted_slot().map_or("?", |s| s.name())
    }

    /// The keys the agent trusts.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// This device's rollout identity.
    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// Sets the rollout identity and the channel followed, for status.
    pub fn with_identity(mut self, machine_id: String, channel: Option<String>) -> Agent<M> {
        self.machine_id = machine_id;
        self.channel = channel;
        self
    }

    /// Remembers the ETag of a channel file dealt with.
    pub fn remember_channel_etag(&mut self, etag: Option<String>) {
        if self.state.channel_etag != etag {
            self.state.channel_etag = etag;
            self.save();
        }
    }

    /// Records a refusal that happened outside [`Agent::install`] (a
    /// channel file) unless it is the one recorded already; returns the
    /// message.
    pub fn refuse(&mut self, message: String) -> String {
        let same = self.state.last.as_ref().is_some_and(|l| l.message == message);
        if !same {
            self.record(state::Result::Refused, None, message.clone());
        }
        message
    }

    /// How many keys the agent trusts.
    pub fn trusted_keys(&self) -> usize {
        self.trust.keys.len()
    }

    /// The remembered state.
    pub fn state(&self) -> &AgentState {
        &self.state
    }

    fn save(&mut self) {
        if let Err(e) = self.state_file.save(&self.state) {
            let w = format!("cannot save {}: {e}", self.state_file.path().display());
            eprintln!("{w}");
            self.warnings.push(w);
        }
    }

    fn record(&mut self, result: state::Result, to: Option<String>, message: String) {
        self.state.last = Some(Outcome {
            result,
            from: Some(self.image.version.clone()),
            to,
            message,
            at: self.machine.now(),
        });
        self.save();
    }

    /// Turns a pending install into its outcome once the boot tells:
    /// "updated 1.0.0 -> 1.1.0" when the new slot runs blessed, "rolled
    /// back" when a later boot runs the old slot again. Returns the new
    /// outcome's message, if any.
    pub fn reconcile(&mut self) -> Option<String> {
        let pending = self.state.pending.clone()?;
        let booted = self.machine.booted_slot()?;
        if booted == pending.slot && self.image.version == pending.version {
            let state = self.machine.with_bootloader(&mut |bl| Ok(bl.entry_state(booted)?)).ok()?;
            if state != EntryState::Good {
                return None;
            }
            self.state.pending = None;
            let msg = format!("updated {} -> {}", pending.from, pending.version);
            self.state.last = Some(Outcome {
                result: state::Result::Updated,
                from: Some(pending.from),
                to: Some(pending.version),
                message: msg.clone(),
                at: self.machine.now(),
            });
            self.save();
            return Some(msg);
        }
        if pending.boot_id == self.machine.boot_id() {
            // Installed during this boot; the reboot has not happened yet.
            return None;
        }
        if self.try_not_started(&pending) {
            // A power cut or power-off came before the reboot that tries
            // it; PID 1 asks for the try again.
            return None;
        }
        self.state.pending = None;
        let msg = format!(
            "rolled back: {} did not become healthy in slot {}; {} runs again and {} will not \
             be installed again",
            pending.version, pending.slot, self.image.version, pending.version
        );
        if !self.state.failed_versions.contains(&pending.version) {
            self.state.failed_versions.push(pending.version.clone());
        }
        self.state.last = Some(Outcome {
            result: state::Result::RolledBack,
            from: Some(pending.from),
            to: Some(pending.version),
            message: msg.clone(),
            at: self.machine.now(),
        });
        self.save();
        Some(msg)
    }

    /// Whether `pending`'s try has not started yet: the try marker still
    /// names it. PID 1 settles the marker before services start (removed
    /// as the try starts, when it is stale, and when it gives up on it),
    /// so it is not checked against the bootloader again here: the
    /// reconciler asks every second, and that would mount the boot
    /// partitions as often.
    fn try_not_started(&self, pending: &Pending) -> bool {
        let Some(marker) = self.machine.try_marker() else { return false };
        pending_try::names(&marker, pending.slot, &pending.version)
    }

    /// `GET /v1/status`.
    pub fn status(&mut self) -> Status {
        self.reconcile();
        let booted = self.machine.booted_slot();
        let mut warnings = self.warnings.clone();
        let records = self.machine.with_bootloader(&mut |bl| Ok(bl.slots()?)).unwrap_or_else(|e| {
            warnings.push(format!("cannot read the boot entries: {e}"));
            Vec::new()
        });
        let slots: Vec<SlotStatus> = records
            .into_iter()
            .map(|r| SlotStatus {
                slot: r.slot,
                version: r.version,
                entry: r.mark.to_string(),
                state: state_word(r.state),
                booted: Some(r.slot) == booted,
            })
            .collect();
        let blessed = slots.iter().any(|s| s.booted && s.state == "good");
        Status {
            image: self.image.name.clone(),
            version: self.image.version.clone(),
            board: self.image.board.clone(),
            booted_slot: booted,
            blessed,
            slots,
            pending: self.state.pending.clone(),
            last_update: self.state.last.clone(),
            failed_versions: self.state.failed_versions.clone(),
            machine_id: self.machine_id.clone(),
            channel: self.channel.clone(),
            rollout_bucket: self
                .channel
                .as_ref()
                .map(|c| basalt_bundle::channel::rollout_bucket(c, &self.machine_id)),
            warnings,
        }
    }

    /// Whether an offered version may be installed here: newer than the
    /// running one (in semver and in the bootloader's order), for this
    /// board, not failed here before.
    pub fn check_offer(
        &self,
        name: &str,
        version: &semver::Version,
        compatible: &[String],
    ) -> Result<(), UpdateError> {
        let running = semver::Version::parse(&self.image.version).map_err(|e| {
            UpdateError::Machine(format!(
                "running version {:?} is not semver: {e}",
                self.image.version
            ))
        })?;
        if !compatible.contains(&self.image.board) {
            return Err(UpdateError::Refused(format!(
                "{name} {version} is for board(s) {}, this device is {}; build the bundle for this board",
                compatible.join(", "),
                self.image.board
            )));
        }
        if *version <= running {
            return Err(UpdateError::Refused(format!(
                "{name} {version} is not newer than the running {running}; basalt never installs \
                 a version at or below the running one (publish a higher version)"
            )));
        }
        let v = version.to_string();
        if compare_versions(&v, &self.image.version) != std::cmp::Ordering::Greater {
            return Err(UpdateError::Refused(format!(
                "{v} sorts at or below {running} for the bootloader, which compares versions \
                 like systemd-boot (a semver pre-release such as 1.1.0-rc1 sorts above 1.1.0 \
                 there); use a plain version"
            )));
        }
        if self.state.failed_versions.contains(&v) {
            return Err(UpdateError::Refused(format!(
                "{name} {v} failed to become healthy on this device before and was rolled back; \
                 publish a fixed, higher version"
            )));
        }
        Ok(())
    }

    fn check_manifest(&self, m: &Manifest) -> Result<(), UpdateError> {
        if m.kind != BundleKind::Os {
            return Err(UpdateError::Refused(format!(
                "{} {} is a {:?} bundle; this endpoint installs OS bundles",
                m.name, m.version, m.kind
            )));
        }
        self.check_offer(&m.name, &m.version, &m.compatible)
    }

    /// Checks a channel file (already verified against the trusted keys):
    /// expiry, board, version, rollout. `Ok(true)` when its version should
    /// be installed, `Ok(false)` when this device is outside the rollout.
    pub fn check_channel(&self, ch: &Channel, machine_id: &str) -> Result<bool, UpdateError> {
        if ch.is_expired(self.machine.now()) {
            return Err(UpdateError::Refused(format!(
                "channel {} expired at {}; the repository must re-sign it (`basalt publish`) \
                 — an old channel file may be a replay",
                ch.channel, ch.expires
            )));
        }
        if ch.version.to_string() == self.image.version {
            return Ok(false);
        }
        self.check_offer(&ch.name, &ch.version, &ch.compatible)?;
        Ok(ch.includes(machine_id))
    }

    /// Verifies and installs an OS bundle read from `input` into the
    /// other slot, and makes it the next boot's choice. Nothing is written
    /// before the signatures verified and the manifest was accepted; the
    /// new entry is written only once every payload matched.
    pub fn install(&mut self, input: impl Read) -> Result<Installed, UpdateError> {
        let result = self.try_install(input);
        match &result {
            Ok(done) => {
                let msg = format!(
                    "installed {} into slot {} ({}); it boots next",
                    done.version, done.slot, done.entry
                );
                self.state.pending = Some(Pending {
                    version: done.version.clone(),
                    from: done.from.clone(),
                    slot: done.slot,
                    boot_id: self.machine.boot_id(),
                    at: self.machine.now(),
                });
                self.record(state::Result::Installed, Some(done.version.clone()), msg);
            }
            Err(e) => {
                let kind = if e.refused_before_writing() {
                    state::Result::Refused
                } else {
                    state::Result::Failed
                };
                if !matches!(e, UpdateError::Busy) {
                    self.record(kind, None, e.to_string());
                }
            }
        }
        result
    }

    fn try_install(&mut self, input: impl Read) -> Result<Installed, UpdateError> {
        let booted = self.machine.booted_slot().ok_or_else(|| {
            UpdateError::Machine(
                "the kernel command line has no basalt.slot=, so the free slot is unknown".into(),
            )
        })?;
        let target = booted.other();
        let running_state = self.machine.with_bootloader(&mut |bl| Ok(bl.entry_state(booted)?))?;
        if running_state != EntryState::Good {
            return Err(UpdateError::Refused(format!(
                "the running version {} (slot {booted}) is still on trial; an update can be \
                 installed once it is blessed",
                self.image.version
            )));
        }
        let reader = BundleReader::open(input, &self.trust)?;
        let manifest = reader.manifest().clone();
        self.check_manifest(&manifest)?;
        let os = manifest
            .os
            .clone()
            .ok_or_else(|| UpdateError::Refused("the OS bundle has no [os] table".into()))?;
        let signed_by = reader.signed_by().to_vec();
        let root = self.machine.root_device(target)?;
        let chunk = self.chunk;
        let version = manifest.version.to_string();
        let boot = SlotBoot {
            image: manifest.name.clone(),
            version: version.clone(),
            cmdline: os.cmdline.clone(),
        };
        let mut reader = Some(reader);
        let (written, entry, try_arg) = self.machine.with_bootloader(&mut |bl| {
            let Some(mut r) = reader.take() else {
                return Err(UpdateError::Machine("the bundle was consumed already".into()));
            };
            let written =
                install::write_slot(bl, target, &root, &mut BundlePayloads(&mut r), chunk)?;
            r.finish()?;
            let entry = bl.prefer_for_one_try(target, &boot, os.tries)?;
            Ok((written, entry, bl.reboot_to_try()))
        })?;
        if let Some(arg) = try_arg {
            // After the slot is armed: a marker always names an armed slot
            // (a cut between the two leaves the slot armed and no marker,
            // and the agent has recorded no pending install yet).
            if let Some(marker) = self.machine.try_marker() {
                pending_try::write(&marker, &TryMarker::new(target, &version)).map_err(|e| {
                    UpdateError::Machine(format!(
                        "{e}; the slot is armed, but only a reboot with \"{arg}\" tries it"
                    ))
                })?;
            }
            self.machine.arm_try_reboot(arg)?;
        }
        Ok(Installed {
            version,
            from: self.image.version.clone(),
            slot: target,
            entry: entry.to_string(),
            signed_by,
            bytes: written.boot_bytes + written.root_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assess::SystemdBoot;
    use crate::update::cut;
    use crate::update::testing::*;
    use basalt_bundle::entry::ENTRIES_DIR;
    use basalt_bundle::keys::SigningKey;
    use std::path::Path;

    struct TestMachine<'d> {
        disk: &'d Disk,
        booted: Slot,
        boot_id: &'static str,
    }

    impl Machine for TestMachine<'_> {
        fn booted_slot(&self) -> Option<Slot> {
            Some(self.booted)
        }
        fn boot_id(&self) -> String {
            self.boot_id.to_string()
        }
        fn with_bootloader<T>(
            &self,
            f: &mut dyn FnMut(&mut dyn Bootloader) -> Result<T, UpdateError>,
        ) -> Result<T, UpdateError> {
            f(&mut SystemdBoot::new(&self.disk.esp, Some(self.booted)))
        }
        fn root_device(&self, slot: Slot) -> Result<PathBuf, UpdateError> {
            Ok(self.disk.roots[usize::from(slot == Slot::B)].clone())
        }
        fn now(&self) -> i64 {
            1_800_000_000
        }
    }

    fn image(version: &str) -> ImageConfig {
        image_config(version, "qemu-x86_64")
    }

    fn agent<'d>(
        disk: &'d Disk,
        state: &Path,
        version: &str,
        booted: Slot,
        boot_id: &'static str,
        key: &SigningKey,
    ) -> Agent<TestMachine<'d>> {
        let trust = Trust { keys: vec![key.public()], threshold: 1 };
        let machine = TestMachine { disk, booted, boot_id };
        Agent::new(machine, image(version), trust, StateFile::in_dir(state))
    }

    /// Renames slot `slot`'s entry as systemd-boot and PID 1 would.
    fn rename_entry(disk: &Disk, from: &str, to: &str) {
        let dir = disk.esp.join(ENTRIES_DIR);
        std::fs::rename(dir.join(from), dir.join(to)).unwrap();
    }

    /// Every file of the disk, for "nothing changed" checks.
    fn snapshot(disk: &Disk) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![disk.esp.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
                }
            }
        }
        for r in &disk.roots {
            out.push((r.display().to_string(), std::fs::read(r).unwrap()));
        }
        out.sort();
        out
    }

    #[test]
    fn an_update_boots_is_blessed_and_is_reported() {
        let key = SigningKey::generate().unwrap();
        let (v1, v2) = (version("1.0.0", 1, 64 << 10), version("1.1.0", 2, 96 << 10));
        let disk = factory(&v1, None);
        let state = tempfile::tempdir().unwrap();
        let mut a = agent(&disk, state.path(), "1.0.0", Slot::A, "boot1", &key);
        let done = a.install(&bundle(&v2, "qemu-x86_64", &[&key])[..]).unwrap();
        assert_eq!((done.slot, done.entry.as_str()), (Slot::B, "b+3.conf"));
        assert_eq!(next_boot(&disk, &[&v1, &v2]).unwrap().version, "1.1.0");
        let s = a.status();
        assert_eq!(s.pending.as_ref().unwrap().version, "1.1.0");
        assert_eq!(s.last_update.as_ref().unwrap().result, state::Result::Installed);
        let states: Vec<(Slot, &str)> = s.slots.iter().map(|x| (x.slot, x.state)).collect();
        assert_eq!(states, [(Slot::A, "good"), (Slot::B, "trying")]);
        // Not rebooted yet: nothing to report.
        assert_eq!(a.reconcile(), None);

        // The reboot: systemd-boot counts a try, the boot is blessed.
        rename_entry(&disk, "b+3.conf", "b.conf");
        let mut b = agent(&disk, state.path(), "1.1.0", Slot::B, "boot2", &key);
        assert_eq!(b.reconcile().as_deref(), Some("updated 1.0.0 -> 1.1.0"));
        let s = b.status();
        assert!(s.blessed && s.pending.is_none());
        assert_eq!(s.last_update.unwrap().result, state::Result::Updated);
    }

    #[test]
    fn a_rollback_is_reported_and_that_version_is_refused_after() {
        let key = SigningKey::generate().unwrap();
        let (v1, v2) = (version("1.0.0", 1, 4096), version("1.1.0", 2, 8192));
        let disk = factory(&v1, None);
        let state = tempfile::tempdir().unwrap();
        let b2 = bundle(&v2, "qemu-x86_64", &[&key]);
        agent(&disk, state.path(), "1.0.0", Slot::A, "boot1", &key).install(&b2[..]).unwrap();
        // 1.1.0 failed its boot; the bootloader went back to a.
        rename_entry(&disk, "b+3.conf", "b+0-3.conf");
        let mut a = agent(&disk, state.path(), "1.0.0", Slot::A, "boot3", &key);
        let msg = a.reconcile().unwrap();
        assert!(msg.starts_with("rolled back: 1.1.0 did not become healthy"), "{msg}");
        assert_eq!(a.state().failed_versions, ["1.1.0"]);
        let before = snapshot(&disk);
        let err = a.install(&b2[..]).unwrap_err();
        assert!(matches!(err, UpdateError::Refused(_)), "{err}");
        assert!(err.to_string().contains("rolled back"), "{err}");
        assert_eq!(snapshot(&disk), before);
        assert_eq!(a.status().last_update.unwrap().result, state::Result::Refused);
    }

    #[test]
    fn refused_bundles_change_nothing_on_the_disk() {
        let key = SigningKey::generate().unwrap();
        let stranger = SigningKey::generate().unwrap();
        let v1 = version("1.0.0", 1, 4096);
        let disk = factory(&v1, None);
        let state = tempfile::tempdir().unwrap();
        let mut a = agent(&disk, state.path(), "1.0.0", Slot::A, "boot1", &key);
        let before = snapshot(&disk);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (bundle(&version("1.0.0", 3, 4096), "qemu-x86_64", &[&key]), "not newer"),
            (bundle(&version("0.9.0", 3, 4096), "qemu-x86_64", &[&key]), "not newer"),
            (bundle(&version("1.1.0", 3, 4096), "rpi4", &[&key]), "rpi4"),
            (bundle(&version("1.1.0", 3, 4096), "qemu-x86_64", &[&stranger]), "signature"),
            (b"not a bundle at all".to_vec(), "bundle"),
        ];
        for (bytes, says) in cases {
            let err = a.install(&bytes[..]).unwrap_err();
            assert!(err.refused_before_writing(), "{err}");
            assert!(err.to_string().contains(says), "{says}: {err}");
            assert_eq!(snapshot(&disk), before, "{says}");
        }
        // A semver pre-release sorts above its release for systemd-boot:
        // going from 1.1.0-rc1 to 1.1.0 would keep booting the old slot.
        let state2 = tempfile::tempdir().unwrap();
        let mut rc = agent(&disk, state2.path(), "1.1.0-rc1", Slot::A, "boot1", &key);
        let err = rc.install(&bundle(&version("1.1.0", 3, 4096), "qemu-x86_64", &[&key])[..]);
        assert!(err.unwrap_err().to_string().contains("for the bootloader"));
        assert_eq!(snapshot(&disk), before);
        // A running slot still on trial takes no update.
        rename_entry(&disk, "a.conf", "a+2-1.conf");
        let err = a.install(&bundle(&version("1.1.0", 3, 4096), "qemu-x86_64", &[&key])[..]);
        assert!(err.unwrap_err().to_string().contains("still on trial"));
    }

    #[test]
    fn a_payload_that_does_not_match_its_manifest_leaves_the_old_slot_booting() {
        let key = SigningKey::generate().unwrap();
        let (v1, v2) = (version("1.0.0", 1, 4096), version("1.1.0", 2, 64 << 10));
        let disk = factory(&v1, None);
        let state = tempfile::tempdir().unwrap();
        let mut b2 = bundle(&v2, "qemu-x86_64", &[&key]);
        let n = b2.len();
        // A byte in the middle of the last payload (the root filesystem).
        b2[n - 2048 - 4096] ^= 0x10;
        let mut a = agent(&disk, state.path(), "1.0.0", Slot::A, "boot1", &key);
        let err = a.install(&b2[..]).unwrap_err();
        assert!(!err.refused_before_writing(), "{err}");
        assert_eq!(next_boot(&disk, &[&v1, &v2]).unwrap().version, "1.0.0");
        assert_eq!(a.status().last_update.unwrap().result, state::Result::Failed);
    }

    /// The whole agent install of a real bundle, cut after every single
    /// change it makes (the agent's state file included): the next boot
    /// always runs a whole version.
    #[test]
    fn a_cut_anywhere_in_an_agent_install_leaves_a_bootable_slot() {
        let key = SigningKey::generate().unwrap();
        let (v1, v2) = (version("1.0.0", 1, 4096), version("1.1.0", 2, 2 << 20));
        let b2 = bundle(&v2, "qemu-x86_64", &[&key]);
        let run = |disk: &Disk, state: &Path| {
            agent(disk, state, "1.0.0", Slot::A, "boot1", &key).with_chunk(2048).install(&b2[..])
        };
        let (done, total) = cut::count(|| {
            let state = tempfile::tempdir().unwrap();
            run(&factory(&v1, None), state.path())
        });
        done.unwrap();
        assert!(total >= 1000, "only {total} cut points");
        let mut new = 0;
        for n in 0..total {
            let disk = factory(&v1, None);
            let state = tempfile::tempdir().unwrap();
            let (_, was_cut) = cut::with_budget(n, || run(&disk, state.path()));
            assert!(was_cut, "cut {n}");
            match next_boot(&disk, &[&v1, &v2]) {
                Ok(v) if v.version == "1.1.0" => new += 1,
                Ok(_) => {}
                Err(e) => panic!("cut {n}: {e}"),
            }
        }
        assert!(new < 10, "{new}");
    }
}
