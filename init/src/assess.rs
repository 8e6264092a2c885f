//! Boot assessment: deciding whether this boot is good, and telling the
//! bootloader.
//!
//! The decision ([`Assessor`]) is pure: once every `required` service has
//! been healthy without a break for `boot.bless_after_ms`, the boot is
//! good; if that has not happened `boot.bless_deadline_ms` after stage 2
//! started, it failed. With no required service, the boot is good
//! `bless_after_ms` after stage 2 started.
//!
//! Acting on it goes through the [`Bootloader`] trait, one back-end per
//! bootloader. [`SystemdBoot`] renames Type #1 entries on the ESP the way
//! `systemd-bless-boot` does: `a+2-1.conf` becomes `a.conf` (good) or
//! `a+0-3.conf` (bad, so systemd-boot prefers the other slot).
//! [`crate::uboot::UBoot`] keeps the same states in the U-Boot environment
//! (`bootcount`, `bootlimit`, `upgrade_available`, `altbootcmd`), and
//! [`crate::tryboot::Tryboot`] in the Raspberry Pi firmware's
//! `autoboot.txt`. The update agent uses the same trait to install a slot
//! and prefer it for one try (see [`crate::update::install`]).
//!
//! What a failed boot does depends on the entry ([`fail_boot`]): an entry on
//! trial is marked bad and the machine reboots into the other slot; an entry
//! blessed by an earlier boot stays blessed and the machine stays up (a
//! known-good slot is not thrown away for what may be a transient fault);
//! an entry already bad is left alone (rebooting would only loop).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use basalt_bundle::config::BootConfig;
use basalt_bundle::entry::{BootEntryName, EntryConf, EntryState, ENTRIES_DIR};
use basalt_bundle::slot::{Slot, UnknownSlot};

use crate::platform;
use crate::supervisor::{Secs, ServiceId, Supervisor};
use crate::update::cut;
use crate::update::install::{copy_payload, io_err, InstallError};

/// The GPT partition label of the ESP.
pub const ESP_PARTLABEL: &str = "esp";

/// Why the bootloader could not be read or told.
#[derive(Debug, thiserror::Error)]
pub enum AssessError {
    /// No partition labelled `esp` exists: this machine does not boot
    /// through systemd-boot from our disk (a development boot).
    #[error("no partition labelled \"{ESP_PARTLABEL}\" in {}", sys.display())]
    NoEsp {
        /// The sysfs directory searched.
        sys: PathBuf,
    },
    /// A Raspberry Pi image's boot partition is missing from the disk:
    /// this machine does not boot from our disk (a development boot), or
    /// the image was built for another board.
    #[error("no partition labelled \"{label}\" in {}", sys.display())]
    NoBootPartition {
        /// The PARTLABEL looked for.
        label: &'static str,
        /// The sysfs directory searched.
        sys: PathBuf,
    },
    /// Listing block devices failed.
    #[error("cannot list block devices in {}: {source}", sys.display())]
    ListBlock {
        /// The sysfs directory.
        sys: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Mounting the ESP failed (is the vfat module loaded?).
    #[error("cannot mount the ESP {} on {} (vfat; stage 1 loads its modules): {source}", dev.display(), at.display())]
    Mount {
        /// The device.
        dev: PathBuf,
        /// The mount point.
        at: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Listing the entries directory failed.
    #[error("cannot read boot entries in {}: {source}", dir.display())]
    ReadEntries {
        /// The entries directory.
        dir: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// No entry for the slot exists.
    #[error("no boot entry for slot {slot} in {}", dir.display())]
    NoEntry {
        /// The slot.
        slot: Slot,
        /// The entries directory.
        dir: PathBuf,
    },
    /// More than one entry for the slot exists; renaming one could shadow
    /// the other, so nothing is touched.
    #[error("several boot entries for slot {slot} in {}: {names}; remove all but one", dir.display())]
    Ambiguous {
        /// The slot.
        slot: Slot,
        /// The entries directory.
        dir: PathBuf,
        /// The entries found.
        names: String,
    },
    /// Renaming the entry failed.
    #[error("cannot rename {from} to {to} in {}: {source}", dir.display())]
    Rename {
        /// The entries directory.
        dir: PathBuf,
        /// Old name.
        from: BootEntryName,
        /// New name.
        to: BootEntryName,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Flushing the rename to disk failed.
    #[error("cannot flush {} to disk: {source}", dir.display())]
    Sync {
        /// The entries directory.
        dir: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the bootloader's own state (the U-Boot
    /// environment, `autoboot.txt`, the firmware's device-tree values)
    /// failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The bootloader's state is not what the back-end can read or use.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file or device.
        path: PathBuf,
        /// What is wrong and what to do about it.
        reason: String,
    },
    /// The operation would leave the machine with nothing to boot, or
    /// contradicts what the bootloader booted.
    #[error("{0}")]
    Refused(String),
}

/// How a bootloader records one slot, in one short line for messages and
/// status: systemd-boot's entry file name (`b+2-1.conf`), the U-Boot
/// variables that select it, the `autoboot.txt` partition that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMark(String);

impl SlotMark {
    /// A mark with this text.
    pub fn new(text: impl Into<String>) -> SlotMark {
        SlotMark(text.into())
    }
}

impl From<BootEntryName> for SlotMark {
    fn from(name: BootEntryName) -> SlotMark {
        SlotMark(name.to_string())
    }
}

impl fmt::Display for SlotMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One slot as the bootloader records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    /// The slot.
    pub slot: Slot,
    /// The version installed there.
    pub version: String,
    /// Good, on trial or bad.
    pub state: EntryState,
    /// How the bootloader records it.
    pub mark: SlotMark,
}

/// What a bootloader is told about a slot it is to try: the image in it
/// and the kernel command line (without `basalt.slot=`, which every
/// back-end adds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBoot {
    /// The image's name.
    pub image: String,
    /// The image's version.
    pub version: String,
    /// The bundle's kernel command line.
    pub cmdline: String,
}

impl SlotBoot {
    /// The full kernel command line of `slot`: the bundle's, then
    /// `basalt.slot=`.
    pub fn cmdline_for(&self, slot: Slot) -> String {
        if self.cmdline.is_empty() {
            format!("basalt.slot={slot}")
        } else {
            format!("{} basalt.slot={slot}", self.cmdline)
        }
    }
}

/// A slot's mark before and after an operation; equal when nothing
/// changed (and then nothing was written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The mark it had.
    pub from: SlotMark,
    /// The mark it has now.
    pub to: SlotMark,
}

impl Change {
    /// A change from `from` to `to`.
    pub fn new(from: impl Into<SlotMark>, to: impl Into<SlotMark>) -> Change {
        Change { from: from.into(), to: to.into() }
    }

    /// Whether anything was actually written.
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changed() {
            write!(f, "{} -> {}", self.from, self.to)
        } else {
            write!(f, "{}, unchanged", self.from)
        }
    }
}

/// What PID 1 and the update agent need from a bootloader: report the
/// booted slot and each slot's state, install a slot, prefer it for one
/// try, bless it, mark it bad.
///
/// Every write a back-end makes goes through [`crate::update::cut`], so
/// tests can cut power after each one; after any cut the bootloader boots
/// a whole slot.
pub trait Bootloader {
    /// The slot that was booted, if known.
    fn booted_slot(&self) -> Option<Slot>;
    /// What the bootloader makes of `slot`.
    fn entry_state(&self, slot: Slot) -> Result<EntryState, AssessError>;
    /// How the bootloader records `slot` now.
    fn mark(&self, slot: Slot) -> Result<SlotMark, AssessError>;
    /// Marks `slot` good; a no-op (no write) for a slot already good.
    fn bless(&mut self, slot: Slot) -> Result<Change, AssessError>;
    /// Marks `slot` bad, so the bootloader prefers the other slot; a no-op
    /// for a slot already bad.
    fn mark_bad(&mut self, slot: Slot) -> Result<Change, AssessError>;
    /// Starts installing `slot`: makes it unbootable (on the disk before
    /// this returns) and removes its boot files.
    fn begin_install(&mut self, slot: Slot) -> Result<(), InstallError>;
    /// Writes one of `slot`'s boot files (`vmlinuz`, `initrd`) from
    /// `content`, in writes of `chunk` bytes, so that the file under its
    /// final name is always whole; returns its size.
    fn install_file(
        &mut self,
        slot: Slot,
        name: &str,
        content: &mut dyn Read,
        chunk: usize,
    ) -> Result<u64, InstallError>;
    /// Makes the installed `slot` the one the next boot tries, `tries`
    /// times before the bootloader gives up on it (a back-end whose
    /// bootloader grants one try only ignores `tries`); `boot` describes
    /// it.
    fn prefer_for_one_try(
        &mut self,
        slot: Slot,
        boot: &SlotBoot,
        tries: u32,
    ) -> Result<SlotMark, InstallError>;
    /// Every installed slot as the bootloader sees it, with its version
    /// (slots being installed or never installed are left out).
    fn slots(&self) -> Result<Vec<SlotRecord>, AssessError>;
    /// The argument the reboot that starts a try must hand the firmware
    /// (`reboot(2)` with `LINUX_REBOOT_CMD_RESTART2`), when a plain reboot
    /// would not try the slot [`Bootloader::prefer_for_one_try`] chose.
    fn reboot_to_try(&self) -> Option<&'static str> {
        None
    }
}

/// Reads `basalt.slot=` from a kernel command line (the last one wins, as
/// for kernel parameters). `Ok(None)` if there is none.
pub fn slot_from_cmdline(cmdline: &str) -> Result<Option<Slot>, UnknownSlot> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("basalt.slot="))
        .next_back()
        .map(str::parse)
        .transpose()
}

/// systemd-boot's Automatic Boot Assessment on an ESP mounted at a path.
#[derive(Debug, Clone)]
pub struct SystemdBoot {
    esp: PathBuf,
    booted: Option<Slot>,
}

impl SystemdBoot {
    /// The back-end for the ESP mounted at `esp`; `booted` is the slot from
    /// the kernel command line ([`slot_from_cmdline`]).
    pub fn new(esp: &Path, booted: Option<Slot>) -> SystemdBoot {
        SystemdBoot { esp: esp.to_path_buf(), booted }
    }

    fn dir(&self) -> PathBuf {
        self.esp.join(ENTRIES_DIR)
    }

    /// Every basalt entry file on the ESP, parsed.
    fn list(&self) -> Result<Vec<BootEntryName>, AssessError> {
        let dir = self.dir();
        let read = std::fs::read_dir(&dir)
            .map_err(|source| AssessError::ReadEntries { dir: dir.clone(), source })?;
        let mut found = Vec::new();
        for entry in read {
            let entry =
                entry.map_err(|source| AssessError::ReadEntries { dir: dir.clone(), source })?;
            if let Some(parsed) = entry.file_name().to_str().and_then(BootEntryName::parse) {
                found.push(parsed);
            }
        }
        Ok(found)
    }

    /// The one entry for `slot`.
    pub fn find(&self, slot: Slot) -> Result<BootEntryName, AssessError> {
        let found: Vec<BootEntryName> =
            self.list()?.into_iter().filter(|e| e.slot == slot).collect();
        let dir = self.dir();
        match found.as_slice() {
            [] => Err(AssessError::NoEntry { slot, dir }),
            [one] => Ok(*one),
            many => {
                let mut names: Vec<String> = many.iter().map(ToString::to_string).collect();
                names.sort();
                Err(AssessError::Ambiguous { slot, dir, names: names.join(", ") })
            }
        }
    }

    fn rename(&self, from: BootEntryName, to: BootEntryName) -> Result<Change, AssessError> {
        let done = Change::new(from, to);
        if from == to {
            return Ok(done);
        }
        let dir = self.dir();
        std::fs::rename(dir.join(from.to_string()), dir.join(to.to_string()))
            .map_err(|source| AssessError::Rename { dir: dir.clone(), from, to, source })?;
        // The rename must reach the disk before anything else can happen
        // (a reboot at the deadline, a power cut): fsync the directory,
        // then the whole FAT, whose allocation table the directory alone
        // does not cover.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .and_then(|()| platform::mount::sync_fs(&dir))
            .map_err(|source| AssessError::Sync { dir, source })?;
        Ok(done)
    }

    /// Writes `slot`'s entry with a try counter of `tries`: systemd-boot's
    /// own form of [`Bootloader::prefer_for_one_try`], taking the entry
    /// file's content.
    pub fn prefer_for_one_try(
        &mut self,
        slot: Slot,
        entry: &EntryConf,
        tries: u32,
    ) -> Result<BootEntryName, InstallError> {
        let dir = self.dir();
        let name = BootEntryName::on_trial(slot, tries.max(1));
        // The temporary name does not end in `.conf`, so systemd-boot never
        // reads a half-written entry.
        let tmp = format!("{}.tmp", BootEntryName::blessed(slot));
        replace_file(&dir, &tmp, &name.to_string(), entry.to_text().as_bytes())?;
        Ok(name)
    }

    /// Every slot's entry file with its content (slots without an entry
    /// are left out).
    pub fn entries(&self) -> Result<Vec<(BootEntryName, EntryConf)>, AssessError> {
        let dir = self.dir();
        let mut out = Vec::new();
        for name in self.list()? {
            let path = dir.join(name.to_string());
            let text = std::fs::read_to_string(&path)
                .map_err(|source| AssessError::ReadEntries { dir: path.clone(), source })?;
            if let Some(conf) = EntryConf::parse(&text) {
                out.push((name, conf));
            }
        }
        out.sort_by_key(|(n, _)| n.slot);
        Ok(out)
    }
}

/// Writes `bytes` to `dir/tmp`, flushes it, renames it to `dir/name` and
/// flushes the directory and its filesystem: the file under its final
/// name is always whole, the old one or the new one.
pub fn replace_file(dir: &Path, tmp: &str, name: &str, bytes: &[u8]) -> Result<(), InstallError> {
    let (tmp, path) = (dir.join(tmp), dir.join(name));
    let mut file = cut::create(&tmp).map_err(io_err("create", &tmp))?;
    cut::write_all(&mut file, bytes).map_err(io_err("write", &tmp))?;
    cut::sync(&file).map_err(io_err("flush", &tmp))?;
    drop(file);
    cut::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
    flush_dir(dir)
}

/// Flushes a directory and the whole filesystem under it (on FAT the
/// directory alone does not cover the allocation table).
pub fn flush_dir(dir: &Path) -> Result<(), InstallError> {
    cut::sync_dir(dir).and_then(|()| platform::mount::sync_fs(dir)).map_err(io_err("flush", dir))
}

/// Writes the boot file `dir/name` from `content` in writes of `chunk`
/// bytes under a temporary name, flushed, then renamed into place; returns
/// its size.
pub fn install_boot_file(
    dir: &Path,
    name: &str,
    content: &mut dyn Read,
    chunk: usize,
) -> Result<u64, InstallError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file = cut::create(&tmp).map_err(io_err("create", &tmp))?;
    let n = copy_payload(name, content, &mut file, &tmp, u64::MAX, chunk)?;
    cut::sync(&file).map_err(io_err("flush", &tmp))?;
    drop(file);
    cut::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
    flush_dir(dir)?;
    Ok(n)
}

/// Removes `names` (and their `.tmp` forms) from `dir`, creating `dir` if
/// needed, and flushes it.
pub fn clear_boot_files(dir: &Path, names: &[&str]) -> Result<(), InstallError> {
    cut::create_dir_all(dir).map_err(io_err("create", dir))?;
    for name in names {
        for file in [name.to_string(), format!("{name}.tmp")] {
            let path = dir.join(file);
            cut::remove(&path).map_err(io_err("remove", &path))?;
        }
    }
    flush_dir(dir)
}

impl Bootloader for SystemdBoot {
    fn booted_slot(&self) -> Option<Slot> {
        self.booted
    }

    fn entry_state(&self, slot: Slot) -> Result<EntryState, AssessError> {
        Ok(self.find(slot)?.state())
    }

    fn mark(&self, slot: Slot) -> Result<SlotMark, AssessError> {
        Ok(self.find(slot)?.into())
    }

    fn bless(&mut self, slot: Slot) -> Result<Change, AssessError> {
        let entry = self.find(slot)?;
        self.rename(entry, entry.bless())
    }

    fn mark_bad(&mut self, slot: Slot) -> Result<Change, AssessError> {
        let entry = self.find(slot)?;
        if entry.state() == EntryState::Bad {
            return Ok(Change::new(entry, entry));
        }
        self.rename(entry, entry.mark_bad())
    }

    fn begin_install(&mut self, slot: Slot) -> Result<(), InstallError> {
        if self.booted == Some(slot) {
            return Err(InstallError::Bootloader(format!(
                "refusing to install into slot {slot}: it is the slot running now"
            )));
        }
        let dir = self.dir();
        cut::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let entries = self.list().map_err(|e| InstallError::Bootloader(e.to_string()))?;
        for entry in entries.into_iter().filter(|e| e.slot == slot) {
            let path = dir.join(entry.to_string());
            cut::remove(&path).map_err(io_err("remove", &path))?;
        }
        // A cut install can leave a temporary entry behind.
        let tmp = dir.join(format!("{}.tmp", BootEntryName::blessed(slot)));
        cut::remove(&tmp).map_err(io_err("remove", &tmp))?;
        flush_dir(&dir)?;
        clear_boot_files(&self.esp.join(slot.esp_dir()), &["vmlinuz", "initrd"])
    }

    fn install_file(
        &mut self,
        slot: Slot,
        name: &str,
        content: &mut dyn Read,
        chunk: usize,
    ) -> Result<u64, InstallError> {
        install_boot_file(&self.esp.join(slot.esp_dir()), name, content, chunk)
    }

    fn prefer_for_one_try(
        &mut self,
        slot: Slot,
        boot: &SlotBoot,
        tries: u32,
    ) -> Result<SlotMark, InstallError> {
        let entry = EntryConf::for_slot(slot, &boot.image, &boot.version, &boot.cmdline);
        SystemdBoot::prefer_for_one_try(self, slot, &entry, tries).map(SlotMark::from)
    }

    fn slots(&self) -> Result<Vec<SlotRecord>, AssessError> {
        Ok(self
            .entries()?
            .into_iter()
            .map(|(name, conf)| SlotRecord {
                slot: name.slot,
                version: conf.version,
                state: name.state(),
                mark: name.into(),
            })
            .collect())
    }
}

/// What was done about a failed boot; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailOutcome {
    /// The entry was on trial and is now bad: reboot into the other slot.
    MarkedBad(Change),
    /// The entry was blessed by an earlier boot and stays so.
    KeptGood(SlotMark),
    /// The entry was already bad; the bootloader found nothing better.
    AlreadyBad(SlotMark),
}

impl FailOutcome {
    /// Whether PID 1 should reboot now.
    pub fn reboot(&self) -> bool {
        matches!(self, FailOutcome::MarkedBad(_))
    }
}

/// Acts on a failed boot of `slot`: marks an entry on trial bad, leaves
/// good and bad entries alone.
pub fn fail_boot(bl: &mut dyn Bootloader, slot: Slot) -> Result<FailOutcome, AssessError> {
    match bl.entry_state(slot)? {
        EntryState::Indeterminate => Ok(FailOutcome::MarkedBad(bl.mark_bad(slot)?)),
        EntryState::Good => Ok(FailOutcome::KeptGood(bl.mark(slot)?)),
        EntryState::Bad => {
            let r = bl.mark_bad(slot)?;
            Ok(FailOutcome::AlreadyBad(r.to))
        }
    }
}

/// What to do about the boot now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not decided yet; look again by `until` (or at the next event).
    Wait {
        /// When the verdict may change without any event.
        until: Duration,
    },
    /// The boot is good.
    Bless,
    /// The boot failed, for this reason.
    Fail {
        /// Which service and its last state, in one line.
        reason: String,
    },
}

/// The bless / fail decision over time.
#[derive(Debug, Clone)]
pub struct Assessor {
    started: Duration,
    bless_after: Duration,
    deadline: Duration,
    broken: Option<String>,
}

impl Assessor {
    /// An assessment that began at `started` (stage 2's start) under
    /// `boot`'s times.
    pub fn new(started: Duration, boot: &BootConfig) -> Assessor {
        Assessor {
            started,
            bless_after: Duration::from_millis(boot.bless_after_ms),
            deadline: started + Duration::from_millis(boot.bless_deadline_ms),
            broken: None,
        }
    }

    /// An assessment that can only fail, at `deadline`, for `reason`: the
    /// image configuration could not be read, so no service can prove the
    /// boot good.
    pub fn broken(started: Duration, deadline: Duration, reason: String) -> Assessor {
        Assessor {
            started,
            bless_after: Duration::ZERO,
            deadline: started + deadline,
            broken: Some(reason),
        }
    }

    /// When the boot fails if it is not blessed by then.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The verdict at `now`, given the services' health.
    pub fn decide(&self, now: Duration, sup: &Supervisor) -> Verdict {
        if let Some(reason) = &self.broken {
            return if now >= self.deadline {
                Verdict::Fail { reason: reason.clone() }
            } else {
                Verdict::Wait { until: self.deadline }
            };
        }
        let mut bless_at = self.started + self.bless_after;
        let mut unhealthy: Option<ServiceId> = None;
        let mut latest: Option<(ServiceId, Duration)> = None;
        for (id, since) in sup.required() {
            match since {
                None => {
                    unhealthy.get_or_insert(id);
                }
                Some(t) if t + self.bless_after > bless_at => {
                    bless_at = t + self.bless_after;
                    latest = Some((id, t));
                }
                Some(_) => {}
            }
        }
        if unhealthy.is_none() && now >= bless_at {
            return Verdict::Bless;
        }
        if now >= self.deadline {
            let reason = match (unhealthy, latest) {
                (Some(id), _) => format!(
                    "required service {} is not healthy: {}",
                    sup.name(id),
                    sup.describe(id, now)
                ),
                (None, Some((id, t))) => format!(
                    "required service {} has been healthy for only {} of the {} needed",
                    sup.name(id),
                    Secs(now.saturating_sub(t)),
                    Secs(self.bless_after)
                ),
                (None, None) => format!(
                    "bless_deadline_ms ({}) is shorter than bless_after_ms ({})",
                    Secs(self.deadline.saturating_sub(self.started)),
                    Secs(self.bless_after)
                ),
            };
            return Verdict::Fail { reason };
        }
        let until = if unhealthy.is_none() { bless_at.min(self.deadline) } else { self.deadline };
        Verdict::Wait { until }
    }
}

/// Where to find and mount the ESP.
#[derive(Debug, Clone)]
pub struct EspLocation {
    /// `/sys/class/block`.
    pub sys_class_block: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
    /// Where to mount it ([`basalt_bundle::config::ESP_MOUNT`]).
    pub mount_point: PathBuf,
}

impl EspLocation {
    /// The device node of the partition labelled `esp`.
    pub fn device(&self) -> Result<PathBuf, AssessError> {
        let sys = self.sys_class_block.clone();
        match platform::block::find_by_partlabel(&sys, ESP_PARTLABEL) {
            Ok(Some(dev)) => Ok(dev.node(&self.dev)),
            Ok(None) => Err(AssessError::NoEsp { sys }),
            Err(source) => Err(AssessError::ListBlock { sys, source }),
        }
    }

    /// Mounts the ESP, runs `f` on its mount point, flushes and unmounts
    /// it. The ESP stays mounted only this long, so a power cut at any
    /// other time finds the FAT clean.
    pub fn with_mounted<T, E: From<AssessError>>(
        &self,
        f: impl FnOnce(&Path) -> Result<T, E>,
    ) -> Result<T, E> {
        use platform::mount::MountFlags;
        let dev = self.device()?;
        let at = self.mount_point.clone();
        let flags = MountFlags::MS_NOSUID | MountFlags::MS_NODEV | MountFlags::MS_NOEXEC;
        let source = dev.to_string_lossy();
        let _ = std::fs::create_dir_all(&at);
        platform::mount::mount(&source, &at, "vfat", flags, None)
            .map_err(|source| AssessError::Mount { dev: dev.clone(), at: at.clone(), source })?;
        let result = f(&at);
        let _ = platform::mount::sync_fs(&at);
        if platform::mount::unmount(&at, false).is_err() {
            // Something still holds it; detach it so it goes when released.
            let _ = platform::mount::unmount(&at, true);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::process::ExitStatus;
    use crate::supervisor::fake::{ms, opts, service, FakeControl};
    use crate::supervisor::Purpose;
    use basalt_bundle::config::{HealthCheck, HealthProbe, ServiceConfig};

    fn esp(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join(ENTRIES_DIR);
        std::fs::create_dir_all(&e).unwrap();
        for (name, text) in entries {
            std::fs::write(e.join(name), text).unwrap();
        }
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join(ENTRIES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn boot(after: u64, deadline: u64) -> BootConfig {
        BootConfig { bless_after_ms: after, bless_deadline_ms: deadline, stop_timeout_ms: 1000 }
    }

    fn required_with_check() -> ServiceConfig {
        let mut s = service("web");
        s.required = true;
        s.health = Some(HealthCheck {
            probe: HealthProbe::Command(vec!["/bin/true".into()]),
            interval_ms: 100,
            timeout_ms: 50,
        });
        s
    }

    #[test]
    fn bless_renames_the_booted_entry_and_nothing_else() {
        let dir = esp(&[("a+2-1.conf", "title A\n"), ("b.conf", "title B\n"), ("debian.conf", "")]);
        let mut sb = SystemdBoot::new(dir.path(), Some(Slot::A));
        assert_eq!(sb.booted_slot(), Some(Slot::A));
        assert_eq!(sb.entry_state(Slot::A).unwrap(), EntryState::Indeterminate);
        let r = sb.bless(Slot::A).unwrap();
        assert_eq!(r.to_string(), "a+2-1.conf -> a.conf");
        assert_eq!(names(dir.path()), ["a.conf", "b.conf", "debian.conf"]);
        let text = std::fs::read_to_string(dir.path().join(ENTRIES_DIR).join("a.conf")).unwrap();
        assert_eq!(text, "title A\n");
        assert_eq!(sb.entry_state(Slot::A).unwrap(), EntryState::Good);
    }

    #[test]
    fn already_blessed_entry_is_untouched() {
        let dir = esp(&[("a.conf", "title A\n"), ("b+0-3.conf", "")]);
        let before = std::fs::metadata(dir.path().join(ENTRIES_DIR).join("a.conf")).unwrap();
        let mut sb = SystemdBoot::new(dir.path(), Some(Slot::A));
        let r = sb.bless(Slot::A).unwrap();
        assert!(!r.changed());
        assert_eq!(r.to_string(), "a.conf, unchanged");
        // A failed boot of a known-good entry does not mark it bad.
        assert_eq!(
            fail_boot(&mut sb, Slot::A).unwrap(),
            FailOutcome::KeptGood(BootEntryName::blessed(Slot::A).into())
        );
        assert_eq!(names(dir.path()), ["a.conf", "b+0-3.conf"]);
        let after = std::fs::metadata(dir.path().join(ENTRIES_DIR).join("a.conf")).unwrap();
        assert_eq!(before.modified().unwrap(), after.modified().unwrap());
        // Nor is a bad entry renamed again.
        let out = fail_boot(&mut sb, Slot::B).unwrap();
        assert!(!out.reboot());
        assert_eq!(names(dir.path()), ["a.conf", "b+0-3.conf"]);
    }

    #[test]
    fn missing_and_ambiguous_entries_are_errors() {
        let dir = esp(&[("a+1.conf", ""), ("a.conf", "")]);
        let mut sb = SystemdBoot::new(dir.path(), None);
        let err = sb.bless(Slot::A).unwrap_err();
        assert!(err.to_string().contains("several boot entries for slot a"), "{err}");
        assert!(err.to_string().contains("a+1.conf, a.conf"), "{err}");
        assert!(matches!(sb.mark_bad(Slot::B), Err(AssessError::NoEntry { slot: Slot::B, .. })));
        assert_eq!(names(dir.path()), ["a+1.conf", "a.conf"]);
    }

    #[test]
    fn deadline_marks_the_entry_bad_and_says_why() {
        let dir = esp(&[("a+2-1.conf", ""), ("b.conf", "")]);
        let mut sup = Supervisor::new(&[required_with_check()], opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        let assessor = Assessor::new(ms(0), &boot(1000, 5000));
        // Its checks keep failing.
        for t in [100u64, 300, 500] {
            ctl.now = ms(t);
            sup.on_tick(ms(t), &mut ctl);
            sup.check_output(0, b"connection refused\n");
            let check = ctl.last(0, Purpose::HealthCheck);
            sup.on_exit(check, ExitStatus::Code(1), ms(t + 10), &mut ctl);
        }
        assert_eq!(assessor.decide(ms(4999), &sup), Verdict::Wait { until: ms(5000) });
        let Verdict::Fail { reason } = assessor.decide(ms(5000), &sup) else { panic!() };
        assert!(
            reason.starts_with("required service web is not healthy: running for 5.00 s (pid 101), unhealthy: health check failed with status 1: connection refused"),
            "{reason}"
        );
        let mut sb = SystemdBoot::new(dir.path(), Some(Slot::A));
        let out = fail_boot(&mut sb, Slot::A).unwrap();
        assert!(out.reboot());
        assert_eq!(names(dir.path()), ["a+0-3.conf", "b.conf"]);
    }

    #[test]
    fn flapping_service_resets_the_healthy_timer() {
        let mut sup = Supervisor::new(&[required_with_check()], opts());
        let mut ctl = FakeControl::default();
        sup.start(ms(0), &mut ctl);
        let assessor = Assessor::new(ms(0), &boot(1000, 60_000));
        let pass = |sup: &mut Supervisor, ctl: &mut FakeControl, t: u64| {
            ctl.now = ms(t);
            sup.on_tick(ms(t), ctl);
            let check = ctl.last(0, Purpose::HealthCheck);
            sup.on_exit(check, ExitStatus::Code(0), ms(t + 5), ctl);
        };
        pass(&mut sup, &mut ctl, 100);
        assert_eq!(assessor.decide(ms(500), &sup), Verdict::Wait { until: ms(1105) });
        // It crashes before 1 s of health: no blessing at 1105.
        ctl.now = ms(900);
        sup.on_exit(ctl.last(0, Purpose::Service), ExitStatus::Code(1), ms(900), &mut ctl);
        assert_eq!(assessor.decide(ms(1105), &sup), Verdict::Wait { until: ms(60_000) });
        // Restarted at 1000, healthy again at 1105: blessed 1 s after that.
        ctl.now = ms(1000);
        sup.on_tick(ms(1000), &mut ctl);
        pass(&mut sup, &mut ctl, 1100);
        assert_eq!(assessor.decide(ms(2104), &sup), Verdict::Wait { until: ms(2105) });
        assert_eq!(assessor.decide(ms(2105), &sup), Verdict::Bless);
    }

    #[test]
    fn without_required_services_bless_after_the_delay() {
        let mut sup = Supervisor::new(&[service("optional")], opts());
        sup.start(ms(0), &mut FakeControl::default());
        let assessor = Assessor::new(ms(300), &boot(2000, 10_000));
        assert_eq!(assessor.decide(ms(2299), &sup), Verdict::Wait { until: ms(2300) });
        assert_eq!(assessor.decide(ms(2300), &sup), Verdict::Bless);
    }

    #[test]
    fn refused_required_service_fails_the_boot() {
        let mut bad = required_with_check();
        bad.after = vec!["nope".into()];
        let mut sup = Supervisor::new(&[bad], opts());
        sup.start(ms(0), &mut FakeControl::default());
        let assessor = Assessor::new(ms(0), &boot(100, 1000));
        let Verdict::Fail { reason } = assessor.decide(ms(1000), &sup) else { panic!() };
        assert_eq!(
            reason,
            "required service web is not healthy: refused: after names \"nope\", which is not a service"
        );
    }

    #[test]
    fn broken_configuration_fails_at_its_deadline() {
        let sup = Supervisor::new(&[], opts());
        let a = Assessor::broken(ms(100), ms(1000), "image.toml is not valid".into());
        assert_eq!(a.decide(ms(500), &sup), Verdict::Wait { until: ms(1100) });
        assert_eq!(
            a.decide(ms(1100), &sup),
            Verdict::Fail { reason: "image.toml is not valid".into() }
        );
    }

    #[test]
    fn slot_comes_from_the_command_line() {
        assert_eq!(
            slot_from_cmdline("console=ttyS0 basalt.slot=b quiet\n").unwrap(),
            Some(Slot::B)
        );
        assert_eq!(slot_from_cmdline("basalt.slot=a basalt.slot=b").unwrap(), Some(Slot::B));
        assert_eq!(slot_from_cmdline("console=ttyS0").unwrap(), None);
        assert!(slot_from_cmdline("basalt.slot=c").is_err());
    }

    #[test]
    fn no_esp_partition_is_reported_as_such() {
        let sys = tempfile::tempdir().unwrap();
        let loc = EspLocation {
            sys_class_block: sys.path().to_path_buf(),
            dev: "/dev".into(),
            mount_point: sys.path().join("esp"),
        };
        let err = loc.with_mounted(|_| Ok(())).unwrap_err();
        assert!(matches!(err, AssessError::NoEsp { .. }));
        assert!(err.to_string().starts_with("no partition labelled \"esp\" in "), "{err}");
    }
}
