//! The Raspberry Pi back-end (Pi 4 and 5 firmware): one FAT boot
//! partition per slot, chosen by `autoboot.txt` on the first FAT
//! partition, and the firmware's one-shot `tryboot` flag.
//!
//! `autoboot.txt` always reads
//!
//! ```text
//! [all]
//! tryboot_a_b=1
//! boot_partition=N
//! [tryboot]
//! boot_partition=M
//! ```
//!
//! `N` is the committed slot's partition: every normal boot runs it. `M`
//! is the partition a `reboot "0 tryboot"` runs, once. The firmware's
//! rules this relies on (Raspberry Pi documentation, "autoboot.txt" and
//! "Fail-safe OS updates (TRYBOOT)"):
//!
//! - `autoboot.txt` is limited to 512 bytes and supports the `[all]` and
//!   `[tryboot]` filters; `[tryboot]` passes only when the system was
//!   booted with the tryboot flag set;
//! - with `tryboot_a_b=1` the firmware loads the normal `config.txt` from
//!   the partition selected, so the switch is made per partition;
//! - `reboot "0 tryboot"` sets the flag (`0`: the default partition, which
//!   `autoboot.txt` then chooses); the firmware clears the flag before it
//!   starts, so a crash or reset during the try boots `[all]` again;
//! - the firmware reports the partition it booted and whether tryboot was
//!   set in `/proc/device-tree/chosen/bootloader/partition` and `.../tryboot`
//!   (32-bit big-endian integers).
//!
//! So: preferring a slot for one try writes `[tryboot]`; the reboot must
//! pass `0 tryboot` ([`Bootloader::reboot_to_try`]), which the try marker
//! on the data partition owes until the try starts, across power cuts
//! ([`crate::pending_try`]); blessing rewrites `[all]` to the running
//! slot. A try that does not get blessed ends with the next reset of any
//! kind. `autoboot.txt` is only ever replaced whole: a new file, flushed,
//! renamed over the old one, the directory flushed.
//!
//! Each slot's partition also holds `basalt.txt` (the image and version
//! installed, and `state=bad` once the slot failed); it is removed first
//! when a slot is reinstalled and written last, so a slot without it is
//! never offered to the firmware.

use std::io::Read;
use std::path::{Path, PathBuf};

use basalt_bundle::entry::EntryState;
use basalt_bundle::slot::Slot;

use crate::assess::{
    clear_boot_files, install_boot_file, replace_file, AssessError, Bootloader, Change, SlotBoot,
    SlotMark, SlotRecord,
};
use crate::pending_try::TryView;
use crate::update::install::InstallError;

use basalt_bundle::tryboot::{cmdline_txt, SlotTxt};
pub use basalt_bundle::tryboot::{Autoboot, AUTOBOOT, AUTOBOOT_MAX, CMDLINE_TXT, SLOT_TXT};
/// The argument of the reboot that starts a try.
pub const TRYBOOT_ARG: &str = "0 tryboot";

/// Where the partitions are mounted and what the firmware reported; the
/// board says which partitions hold the slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrybootLocation {
    /// The first FAT partition, mounted: it holds `autoboot.txt`.
    pub config: PathBuf,
    /// Slot a's and slot b's FAT boot partitions, mounted.
    pub boot: [PathBuf; 2],
    /// Their partition numbers (from 1, as `boot_partition` counts).
    pub partitions: [u32; 2],
    /// The firmware's device-tree node,
    /// `/proc/device-tree/chosen/bootloader`.
    pub firmware: PathBuf,
}

/// Reads a 32-bit big-endian device-tree value.
fn read_be32(path: &Path) -> Result<u32, AssessError> {
    let bytes = std::fs::read(path).map_err(|source| AssessError::Io {
        what: "read the firmware's",
        path: path.to_path_buf(),
        source,
    })?;
    let word: [u8; 4] =
        bytes.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(|| AssessError::Invalid {
            path: path.to_path_buf(),
            reason: format!("{} bytes; the firmware writes a 32-bit integer", bytes.len()),
        })?;
    Ok(u32::from_be_bytes(word))
}

/// The Raspberry Pi firmware's tryboot A/B.
#[derive(Debug, Clone)]
pub struct Tryboot {
    loc: TrybootLocation,
    booted: Option<Slot>,
    tried: bool,
}

/// What `autoboot.txt` and `basalt.txt` say of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Committed,
    Armed,
    Standby,
    Bad,
}

fn to_install(e: AssessError) -> InstallError {
    InstallError::Bootloader(e.to_string())
}

impl Tryboot {
    /// The back-end for `loc`, reading the partition the firmware booted
    /// and the tryboot flag from `loc.firmware`. A partition that is no
    /// slot's leaves the booted slot unknown.
    pub fn new(loc: TrybootLocation) -> Result<Tryboot, AssessError> {
        let partition = read_be32(&loc.firmware.join("partition"))?;
        let tried = read_be32(&loc.firmware.join("tryboot"))? != 0;
        let booted = Slot::ALL.into_iter().find(|s| loc.partitions[index(*s)] == partition);
        Ok(Tryboot { loc, booted, tried })
    }

    /// Whether this boot is a try (the firmware's tryboot flag was set).
    pub fn tried(&self) -> bool {
        self.tried
    }

    /// The firmware's report and the slot `autoboot.txt` arms for a try
    /// (named by `[tryboot]`, neither committed nor bad), with its
    /// version.
    pub fn try_view(&self) -> Result<TryView, AssessError> {
        let armed = self
            .slots()?
            .into_iter()
            .find(|r| r.state == EntryState::Indeterminate)
            .map(|r| (r.slot, r.version));
        Ok(TryView { tried: self.tried, booted: self.booted, armed })
    }

    fn partition(&self, slot: Slot) -> u32 {
        self.loc.partitions[index(slot)]
    }

    fn autoboot_path(&self) -> PathBuf {
        self.loc.config.join(AUTOBOOT)
    }

    /// What `autoboot.txt` says now.
    pub fn autoboot(&self) -> Result<Autoboot, AssessError> {
        let path = self.autoboot_path();
        let text = std::fs::read_to_string(&path).map_err(|source| AssessError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        Autoboot::parse(&text).map_err(|reason| AssessError::Invalid { path, reason })
    }

    fn write_autoboot(&self, a: Autoboot) -> Result<(), InstallError> {
        replace_file(&self.loc.config, "autoboot.txt.tmp", AUTOBOOT, a.to_text().as_bytes())
    }

    fn slot_txt(&self, slot: Slot) -> Result<Option<SlotTxt>, AssessError> {
        let path = self.loc.boot[index(slot)].join(SLOT_TXT);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(SlotTxt::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AssessError::Io { what: "read", path, source }),
        }
    }

    fn write_slot_txt(&self, slot: Slot, txt: &SlotTxt) -> Result<(), InstallError> {
        let dir = &self.loc.boot[index(slot)];
        replace_file(dir, "basalt.txt.tmp", SLOT_TXT, txt.to_text().as_bytes())
    }

    fn role(&self, a: Autoboot, slot: Slot) -> Result<(Role, SlotTxt), AssessError> {
        let txt = self.slot_txt(slot)?.ok_or_else(|| AssessError::Invalid {
            path: self.loc.boot[index(slot)].join(SLOT_TXT),
            reason: format!("missing: slot {slot} holds no installed version"),
        })?;
        let p = self.partition(slot);
        let role = if txt.bad {
            Role::Bad
        } else if a.all == p {
            Role::Committed
        } else if a.tryboot == p {
            Role::Armed
        } else {
            Role::Standby
        };
        Ok((role, txt))
    }

    fn mark_of(&self, a: Autoboot, slot: Slot) -> Result<SlotMark, AssessError> {
        let p = self.partition(slot);
        let text = match self.role(a, slot)?.0 {
            Role::Committed => format!("[all] boot_partition={p}"),
            Role::Armed => format!("[tryboot] boot_partition={p}"),
            Role::Standby => format!("partition {p} (not selected)"),
            Role::Bad => format!("partition {p} bad"),
        };
        Ok(SlotMark::new(text))
    }

    fn state(role: Role) -> EntryState {
        match role {
            Role::Committed | Role::Standby => EntryState::Good,
            Role::Armed => EntryState::Indeterminate,
            Role::Bad => EntryState::Bad,
        }
    }

    fn changed(&self, slot: Slot, from: SlotMark) -> Result<Change, AssessError> {
        let to = self.mark_of(self.autoboot()?, slot)?;
        Ok(Change { from, to })
    }
}

fn index(slot: Slot) -> usize {
    usize::from(slot == Slot::B)
}

fn refused(e: InstallError) -> AssessError {
    AssessError::Refused(e.to_string())
}

impl Bootloader for Tryboot {
    fn booted_slot(&self) -> Option<Slot> {
        self.booted
    }

    fn entry_state(&self, slot: Slot) -> Result<EntryState, AssessError> {
        Ok(Tryboot::state(self.role(self.autoboot()?, slot)?.0))
    }

    fn mark(&self, slot: Slot) -> Result<SlotMark, AssessError> {
        self.mark_of(self.autoboot()?, slot)
    }

    fn bless(&mut self, slot: Slot) -> Result<Change, AssessError> {
        let a = self.autoboot()?;
        let from = self.mark_of(a, slot)?;
        let (role, _) = self.role(a, slot)?;
        if role == Role::Committed {
            return Ok(Change { from: from.clone(), to: from });
        }
        // Only the slot the firmware is trying may be committed: its
        // partition, booted with the tryboot flag.
        if role != Role::Armed || self.booted != Some(slot) || !self.tried {
            return Err(AssessError::Refused(format!(
                "cannot bless slot {slot}: the firmware boots partition {} and this boot is not \
                 a try of partition {}",
                a.all,
                self.partition(slot)
            )));
        }
        let p = self.partition(slot);
        self.write_autoboot(Autoboot { all: p, tryboot: p }).map_err(refused)?;
        self.changed(slot, from)
    }

    fn mark_bad(&mut self, slot: Slot) -> Result<Change, AssessError> {
        let a = self.autoboot()?;
        let from = self.mark_of(a, slot)?;
        let (role, mut txt) = self.role(a, slot)?;
        if role == Role::Bad {
            return Ok(Change { from: from.clone(), to: from });
        }
        let other = slot.other();
        let next = match role {
            Role::Committed => {
                if !matches!(self.role(a, other), Ok((Role::Standby | Role::Armed, _))) {
                    return Err(AssessError::Refused(format!(
                        "not marking slot {slot} bad: slot {other} holds no good version, so the \
                         firmware would have nothing to boot"
                    )));
                }
                let p = self.partition(other);
                Some(Autoboot { all: p, tryboot: p })
            }
            Role::Armed => Some(Autoboot { all: a.all, tryboot: a.all }),
            _ => None,
        };
        // The mark first: a cut before `autoboot.txt` changes leaves a slot
        // reported bad that the firmware may still try once, never the
        // reverse.
        txt.bad = true;
        self.write_slot_txt(slot, &txt).map_err(refused)?;
        if let Some(next) = next {
            self.write_autoboot(next).map_err(refused)?;
        }
        self.changed(slot, from)
    }

    fn begin_install(&mut self, slot: Slot) -> Result<(), InstallError> {
        if self.booted == Some(slot) {
            return Err(InstallError::Bootloader(format!(
                "refusing to install into slot {slot}: it is the slot running now"
            )));
        }
        let a = self.autoboot().map_err(to_install)?;
        let p = self.partition(slot);
        if a.all == p {
            return Err(InstallError::Bootloader(format!(
                "refusing to install into slot {slot}: autoboot.txt commits its partition {p}, \
                 so every normal boot runs it"
            )));
        }
        if a.tryboot == p {
            self.write_autoboot(Autoboot { all: a.all, tryboot: a.all })?;
        }
        let dir = &self.loc.boot[index(slot)];
        // The record goes first, so a slot half cleared is never offered.
        clear_boot_files(dir, &[SLOT_TXT])?;
        clear_boot_files(dir, &["vmlinuz", "initrd", CMDLINE_TXT])
    }

    fn install_file(
        &mut self,
        slot: Slot,
        name: &str,
        content: &mut dyn Read,
        chunk: usize,
    ) -> Result<u64, InstallError> {
        install_boot_file(&self.loc.boot[index(slot)], name, content, chunk)
    }

    /// The firmware grants one try per `reboot "0 tryboot"`, so `tries` is
    /// not used.
    fn prefer_for_one_try(
        &mut self,
        slot: Slot,
        boot: &SlotBoot,
        _tries: u32,
    ) -> Result<SlotMark, InstallError> {
        let dir = &self.loc.boot[index(slot)];
        let cmdline = cmdline_txt(&boot.cmdline, slot);
        replace_file(dir, "cmdline.txt.tmp", CMDLINE_TXT, cmdline.as_bytes())?;
        let txt = SlotTxt { image: boot.image.clone(), version: boot.version.clone(), bad: false };
        self.write_slot_txt(slot, &txt)?;
        let a = self.autoboot().map_err(to_install)?;
        self.write_autoboot(Autoboot { all: a.all, tryboot: self.partition(slot) })?;
        self.mark(slot).map_err(to_install)
    }

    fn slots(&self) -> Result<Vec<SlotRecord>, AssessError> {
        let a = self.autoboot()?;
        let mut out = Vec::new();
        for slot in Slot::ALL {
            if self.slot_txt(slot)?.is_none() {
                continue;
            }
            let (role, txt) = self.role(a, slot)?;
            out.push(SlotRecord {
                slot,
                version: txt.version,
                state: Tryboot::state(role),
                mark: self.mark_of(a, slot)?,
            });
        }
        Ok(out)
    }

    fn reboot_to_try(&self) -> Option<&'static str> {
        Some(TRYBOOT_ARG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assess::{fail_boot, FailOutcome};
    use crate::pending_try::{self, AtBoot, Decision, TryMarker};
    use crate::update::agent::{Agent, Machine, UpdateError};
    use crate::update::cut;
    use crate::update::install::{write_slot, CHUNK};
    use crate::update::state::{AgentState, StateFile};
    use crate::update::testing::bundle;
    use crate::update::testing::{payloads, version, Version, CMDLINE, ROOT_CAPACITY};
    use basalt_bundle::archive::Trust;
    use basalt_bundle::keys::SigningKey;
    use std::fs::{self, OpenOptions};

    /// A Pi's disk: p1 holds `autoboot.txt`, p2 and p3 are the slots'
    /// boot partitions (folders), two root partitions (files), and the
    /// firmware's device-tree node.
    struct Pi {
        _dir: tempfile::TempDir,
        loc: TrybootLocation,
        roots: [PathBuf; 2],
    }

    impl Pi {
        fn tryboot(&self) -> Tryboot {
            Tryboot::new(self.loc.clone()).unwrap()
        }

        fn autoboot_bytes(&self) -> Vec<u8> {
            fs::read(self.loc.config.join(AUTOBOOT)).unwrap()
        }

        /// The try marker, on the data partition (a folder).
        fn marker(&self) -> PathBuf {
            self._dir.path().join("data/basalt/reboot-to-try")
        }
    }

    fn put(pi: &Pi, slot: Slot, v: &Version) {
        let d = &pi.loc.boot[index(slot)];
        fs::write(d.join("vmlinuz"), &v.kernel).unwrap();
        fs::write(d.join("initrd"), &v.initrd).unwrap();
        fs::write(d.join(CMDLINE_TXT), format!("{CMDLINE} basalt.slot={slot}\n")).unwrap();
        let txt = SlotTxt { image: "img".into(), version: v.version.into(), bad: false };
        fs::write(d.join(SLOT_TXT), txt.to_text()).unwrap();
        fs::write(&pi.roots[index(slot)], &v.root).unwrap();
    }

    /// Slot a runs `a`, committed; slot b holds `b`, if given, which
    /// `[tryboot]` still names when `armed` (a try that failed earlier).
    fn factory(a: &Version, b: Option<&Version>, armed: bool) -> Pi {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
        let dir = dir.unwrap();
        let p = |n: &str| dir.path().join(n);
        let loc = TrybootLocation {
            config: p("p1"),
            boot: [p("p2"), p("p3")],
            partitions: [2, 3],
            firmware: p("chosen-bootloader"),
        };
        for d in [&loc.config, &loc.boot[0], &loc.boot[1], &loc.firmware] {
            fs::create_dir_all(d).unwrap();
        }
        // The firmware's own files, which an install must leave alone.
        for d in &loc.boot {
            fs::write(d.join("config.txt"), "kernel=vmlinuz\ninitramfs initrd followkernel\n")
                .unwrap();
            fs::write(d.join("start4.elf"), b"firmware").unwrap();
        }
        let pi = Pi { roots: [p("rootfs_a"), p("rootfs_b")], _dir: dir, loc };
        put(&pi, Slot::A, a);
        if let Some(b) = b {
            put(&pi, Slot::B, b);
        }
        let tryboot = if armed { 3 } else { 2 };
        fs::write(pi.loc.config.join(AUTOBOOT), Autoboot { all: 2, tryboot }.to_text()).unwrap();
        for root in &pi.roots {
            let f = OpenOptions::new().create(true).truncate(false).write(true).open(root);
            f.unwrap().set_len(ROOT_CAPACITY).unwrap();
        }
        power_on(&pi, false, &[a]).unwrap();
        pi
    }

    /// What the firmware does at power-on: read `autoboot.txt` (at most
    /// 512 bytes), apply `boot_partition` under `[all]` and, only with the
    /// tryboot flag, under `[tryboot]`, the last one winning; boot that
    /// partition, and tell the OS through the device tree. Returns the
    /// slot and the version it runs, checked file by file.
    fn power_on(
        pi: &Pi,
        tryboot: bool,
        known: &[&Version],
    ) -> Result<(Slot, &'static str), String> {
        let bytes = fs::read(pi.loc.config.join(AUTOBOOT)).map_err(|e| format!("autoboot: {e}"))?;
        if bytes.len() > AUTOBOOT_MAX {
            return Err(format!("autoboot.txt is {} bytes", bytes.len()));
        }
        let text = String::from_utf8(bytes).map_err(|e| e.to_string())?;
        let (mut pass, mut part, mut ab) = (true, None, false);
        for line in text.lines() {
            match line {
                "[all]" => pass = true,
                "[tryboot]" => pass = tryboot,
                "tryboot_a_b=1" if pass => ab = true,
                l => {
                    if let Some(n) = l.strip_prefix("boot_partition=").filter(|_| pass) {
                        part = Some(n.parse::<u32>().map_err(|e| e.to_string())?);
                    }
                }
            }
        }
        let part = part.ok_or("no boot_partition")?;
        if !ab {
            return Err("no tryboot_a_b=1".into());
        }
        let slot = Slot::ALL
            .into_iter()
            .find(|s| pi.loc.partitions[index(*s)] == part)
            .ok_or(format!("partition {part} is no slot"))?;
        let dir = &pi.loc.boot[index(slot)];
        for f in ["config.txt", "start4.elf"] {
            fs::metadata(dir.join(f)).map_err(|e| format!("{slot}: {f}: {e}"))?;
        }
        let kernel = fs::read(dir.join("vmlinuz")).map_err(|e| format!("{slot}: kernel: {e}"))?;
        let v = known
            .iter()
            .find(|v| v.kernel == kernel)
            .ok_or(format!("partition {part} has a kernel of no known version"))?;
        let initrd = fs::read(dir.join("initrd")).map_err(|e| format!("{slot}: initrd: {e}"))?;
        let cmdline = fs::read_to_string(dir.join(CMDLINE_TXT)).map_err(|e| format!("{e}"))?;
        let root = fs::read(&pi.roots[index(slot)]).unwrap();
        if initrd != v.initrd || !root.starts_with(&v.root) {
            return Err(format!("slot {slot} boots {} with files of another version", v.version));
        }
        if cmdline != format!("{CMDLINE} basalt.slot={slot}\n") {
            return Err(format!("slot {slot} boots with {cmdline:?}"));
        }
        fs::write(pi.loc.firmware.join("partition"), part.to_be_bytes()).unwrap();
        fs::write(pi.loc.firmware.join("tryboot"), u32::from(tryboot).to_be_bytes()).unwrap();
        Ok((slot, v.version))
    }

    fn install(pi: &Pi, v: &Version, chunk: usize) -> Result<SlotMark, InstallError> {
        let mut bl = pi.tryboot();
        let target = bl.booted_slot().unwrap().other();
        write_slot(&mut bl, target, &pi.roots[index(target)], &mut payloads(v), chunk)?;
        let boot =
            SlotBoot { image: "img".into(), version: v.version.into(), cmdline: CMDLINE.into() };
        bl.prefer_for_one_try(target, &boot, 3)
    }

    fn states(pi: &Pi) -> Vec<(Slot, EntryState, String)> {
        pi.tryboot().slots().unwrap().into_iter().map(|r| (r.slot, r.state, r.version)).collect()
    }

    #[test]
    fn install_try_bless_fail_and_fall_back() {
        let (v1, v2, v3) =
            (version("1.0.0", 1, 8192), version("1.1.0", 2, 8192), version("1.2.0", 3, 8192));
        let known = [&v1, &v2, &v3];
        let pi = factory(&v1, None, false);
        // A normal boot writes nothing.
        let before = pi.autoboot_bytes();
        let mut bl = pi.tryboot();
        assert_eq!((bl.booted_slot(), bl.tried()), (Some(Slot::A), false));
        assert!(!bl.bless(Slot::A).unwrap().changed());
        assert_eq!(pi.autoboot_bytes(), before);

        // Install 1.1.0 into b: only a tryboot reboot runs it.
        let mark = install(&pi, &v2, CHUNK).unwrap();
        assert_eq!(mark.to_string(), "[tryboot] boot_partition=3");
        assert_eq!(pi.tryboot().reboot_to_try(), Some("0 tryboot"));
        assert_eq!(
            states(&pi),
            [
                (Slot::A, EntryState::Good, "1.0.0".into()),
                (Slot::B, EntryState::Indeterminate, "1.1.0".into())
            ]
        );
        assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::A, "1.0.0"));
        assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::B, "1.1.0"));
        let mut bl = pi.tryboot();
        assert_eq!((bl.booted_slot(), bl.tried()), (Some(Slot::B), true));
        let r = bl.bless(Slot::B).unwrap();
        assert_eq!(r.to_string(), "[tryboot] boot_partition=3 -> [all] boot_partition=3");
        assert_eq!(
            String::from_utf8(pi.autoboot_bytes()).unwrap(),
            "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=3\n"
        );
        assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::B, "1.1.0"));
        assert_eq!(
            states(&pi),
            [
                (Slot::A, EntryState::Good, "1.0.0".into()),
                (Slot::B, EntryState::Good, "1.1.0".into())
            ]
        );

        // 1.2.0 into a hangs on its try: the next reset of any kind runs b,
        // with nothing written by anyone.
        install(&pi, &v3, CHUNK).unwrap();
        assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::A, "1.2.0"));
        let before = pi.autoboot_bytes();
        assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::B, "1.1.0"));
        assert_eq!(pi.autoboot_bytes(), before);
        // Blessing a slot that is not being tried is refused.
        let err = pi.tryboot().bless(Slot::A).unwrap_err().to_string();
        assert!(err.contains("not a try of partition 2"), "{err}");

        // Tried again, it fails its assessment: PID 1 marks it bad and a
        // plain reboot runs b.
        assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::A, "1.2.0"));
        let mut bl = pi.tryboot();
        let out = fail_boot(&mut bl, Slot::A).unwrap();
        assert!(out.reboot(), "{out:?}");
        assert_eq!(
            out,
            FailOutcome::MarkedBad(Change {
                from: SlotMark::new("[tryboot] boot_partition=2"),
                to: SlotMark::new("partition 2 bad"),
            })
        );
        assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::B, "1.1.0"));
        assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::B, "1.1.0"));
        assert_eq!(states(&pi)[0], (Slot::A, EntryState::Bad, "1.2.0".into()));
        // Neither the running nor the committed slot takes an install.
        let mut bl = pi.tryboot();
        let err = write_slot(&mut bl, Slot::B, &pi.roots[1], &mut payloads(&v3), CHUNK);
        assert!(err.unwrap_err().to_string().contains("running now"));
        assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::B, "1.1.0"));
        fs::write(pi.loc.firmware.join("partition"), 2u32.to_be_bytes()).unwrap();
        let mut bl = pi.tryboot();
        let err = write_slot(&mut bl, Slot::B, &pi.roots[1], &mut payloads(&v3), CHUNK);
        assert!(err.unwrap_err().to_string().contains("commits its partition 3"));
    }

    #[test]
    fn a_committed_slot_is_marked_bad_only_with_a_good_one_to_boot() {
        let (v1, v2) = (version("1.0.0", 1, 4096), version("1.1.0", 2, 4096));
        let pi = factory(&v1, None, false);
        let err = pi.tryboot().mark_bad(Slot::A).unwrap_err().to_string();
        assert!(err.contains("nothing to boot"), "{err}");
        let pi = factory(&v1, Some(&v2), false);
        let r = pi.tryboot().mark_bad(Slot::A).unwrap();
        assert_eq!(r.to_string(), "[all] boot_partition=2 -> partition 2 bad");
        assert_eq!(power_on(&pi, false, &[&v1, &v2]).unwrap(), (Slot::B, "1.1.0"));
    }

    #[test]
    fn the_booted_slot_comes_from_the_firmware() {
        let v1 = version("1.0.0", 1, 4096);
        let pi = factory(&v1, None, false);
        fs::write(pi.loc.firmware.join("partition"), 7u32.to_be_bytes()).unwrap();
        assert_eq!(pi.tryboot().booted_slot(), None);
        fs::write(pi.loc.firmware.join("tryboot"), [1u8]).unwrap();
        let err = Tryboot::new(pi.loc.clone()).unwrap_err().to_string();
        assert!(err.contains("32-bit integer"), "{err}");
    }

    /// A power cut after every write of every transition: a plain
    /// power-on always runs a whole slot (the committed one until the
    /// blessing lands), and so does a tryboot.
    #[test]
    fn a_cut_after_any_write_leaves_a_bootable_slot() {
        let (v1, v2) = (version("1.0.0", 1, 16 << 10), version("1.1.0", 2, 24 << 10));
        let v09 = version("0.9.0", 9, 8192);
        let known = [&v09, &v1, &v2];
        let chunk = 4096;
        // b holds 0.9.0, still armed from a try that hung.
        let fresh = || factory(&v1, Some(&v09), true);

        let pi = fresh();
        let (done, total) = cut::count(|| install(&pi, &v2, chunk));
        done.unwrap();
        assert!(total >= 20, "only {total} cut points");
        println!("install: {total} cut points");
        let mut tried_new = 0;
        for n in 0..=total {
            let pi = fresh();
            let (_, was_cut) = cut::with_budget(n, || install(&pi, &v2, chunk));
            assert_eq!(was_cut, n < total, "cut {n}");
            assert_eq!(power_on(&pi, false, &known), Ok((Slot::A, "1.0.0")), "install, cut {n}");
            match power_on(&pi, true, &known) {
                Ok((Slot::A, "1.0.0")) | Ok((Slot::B, "0.9.0")) => {}
                Ok((Slot::B, "1.1.0")) => tried_new += 1,
                other => panic!("install, cut {n}: tryboot runs {other:?}"),
            }
        }
        // Only once `autoboot.txt` names it (its rename and flush).
        assert_eq!(tried_new, 2);

        let on_trial = || {
            let pi = fresh();
            install(&pi, &v2, chunk).unwrap();
            assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::B, "1.1.0"));
            pi
        };
        type Step = fn(&mut Tryboot) -> Result<Change, AssessError>;
        let steps: [(&str, Step, Slot); 2] = [
            ("bless", |bl| bl.bless(Slot::B), Slot::B),
            ("mark bad", |bl| bl.mark_bad(Slot::B), Slot::A),
        ];
        for (what, step, after) in steps {
            let pi = on_trial();
            let mut bl = pi.tryboot();
            let (done, total) = cut::count(|| step(&mut bl));
            done.unwrap();
            assert!(total >= 4, "{what}: {total} cut points");
            println!("{what}: {total} cut points");
            for n in 0..=total {
                let pi = on_trial();
                let mut bl = pi.tryboot();
                let (_, was_cut) = cut::with_budget(n, || step(&mut bl));
                assert_eq!(was_cut, n < total, "{what}, cut {n}");
                for tryboot in [true, false] {
                    let (slot, v) = power_on(&pi, tryboot, &known)
                        .unwrap_or_else(|e| panic!("{what}, cut {n}: {e}"));
                    let expect = if slot == Slot::B { "1.1.0" } else { "1.0.0" };
                    assert_eq!(v, expect, "{what}, cut {n}");
                    if n == total {
                        assert_eq!(slot, after, "{what}");
                    }
                }
            }
        }
    }

    /// The update agent on the Pi model, in boot number `boot`, running
    /// `running`.
    struct PiMachine<'p> {
        pi: &'p Pi,
        boot: u32,
    }

    impl Machine for PiMachine<'_> {
        fn booted_slot(&self) -> Option<Slot> {
            self.pi.tryboot().booted_slot()
        }
        fn boot_id(&self) -> String {
            format!("boot{}", self.boot)
        }
        fn with_bootloader<T>(
            &self,
            f: &mut dyn FnMut(&mut dyn Bootloader) -> Result<T, UpdateError>,
        ) -> Result<T, UpdateError> {
            f(&mut Tryboot::new(self.pi.loc.clone())?)
        }
        fn root_device(&self, slot: Slot) -> Result<PathBuf, UpdateError> {
            Ok(self.pi.roots[index(slot)].clone())
        }
        fn now(&self) -> i64 {
            1_800_000_000
        }
        fn try_marker(&self) -> Option<PathBuf> {
            Some(self.pi.marker())
        }
    }

    fn agent<'p>(pi: &'p Pi, key: &SigningKey, running: &str, boot: u32) -> Agent<PiMachine<'p>> {
        let image = crate::update::testing::image_config(running, "rpi4");
        let trust = Trust { keys: vec![key.public()], threshold: 1 };
        let state = StateFile::in_dir(&pi._dir.path().join("data/basalt/agent"));
        Agent::new(PiMachine { pi, boot }, image, trust, state).with_chunk(4096)
    }

    /// PID 1's step before services start, as stage 2 takes it.
    fn pid1_starts(pi: &Pi) -> Result<AtBoot, pending_try::TryMarkerError> {
        pending_try::at_boot(&pi.marker(), &pi.tryboot().try_view().unwrap())
    }

    /// PID 1's reboot: whether it passes `0 tryboot`.
    fn reboot(pi: &Pi) -> Result<bool, pending_try::TryMarkerError> {
        let arg = pending_try::reboot_argument(pi.tryboot().reboot_to_try(), &pi.marker())?;
        Ok(arg == Some(TRYBOOT_ARG))
    }

    fn marker(reboots: u32, retries: u32) -> TryMarker {
        TryMarker { reboots, retries, ..TryMarker::new(Slot::B, "1.1.0") }
    }

    /// Basalt issue 7: the marker of the try an install owes was on
    /// `/run`, so a power cut before the reboot lost the try and the
    /// agent reported a rollback. Now a normal boot that finds the try
    /// owed asks for it itself, once.
    #[test]
    fn a_power_cut_before_the_reboot_loses_no_try() {
        let key = SigningKey::generate().unwrap();
        let (v1, v2) = (version("1.0.0", 1, 8192), version("1.1.0", 2, 8192));
        let known = [&v1, &v2];
        let b2 = bundle(&v2, "rpi4", &[&key]);
        let pi = factory(&v1, None, false);
        let done = agent(&pi, &key, "1.0.0", 1).install(&b2[..]).unwrap();
        assert_eq!(done.entry, "[tryboot] boot_partition=3");
        assert_eq!(pending_try::read(&pi.marker()).unwrap(), Some(marker(0, 0)));

        // The power goes before the reboot: a normal boot runs slot a.
        assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::A, "1.0.0"));
        let found = pid1_starts(&pi).unwrap();
        assert_eq!(found, AtBoot::Marker(marker(0, 0), Decision::Retry));
        assert!(found.retry());
        let mut a = agent(&pi, &key, "1.0.0", 2);
        assert_eq!(a.reconcile(), None);
        assert!(a.state().failed_versions.is_empty());
        assert_eq!(a.state().pending.as_ref().unwrap().version, "1.1.0");
        // Blessed (a no-op for the committed slot), PID 1 reboots to try.
        assert!(!pi.tryboot().bless(Slot::A).unwrap().changed());
        assert!(reboot(&pi).unwrap());
        assert_eq!(pending_try::read(&pi.marker()).unwrap(), Some(marker(1, 1)));

        assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::B, "1.1.0"));
        assert_eq!(pid1_starts(&pi).unwrap(), AtBoot::Marker(marker(1, 1), Decision::Started));
        assert!(!pending_try::exists(&pi.marker()));
        pi.tryboot().bless(Slot::B).unwrap();
        let mut b = agent(&pi, &key, "1.1.0", 3);
        assert_eq!(b.reconcile().as_deref(), Some("updated 1.0.0 -> 1.1.0"));
        assert!(!reboot(&pi).unwrap());
        assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::B, "1.1.0"));
        assert_eq!(pid1_starts(&pi).unwrap(), AtBoot::NoMarker);
    }

    /// Two power cuts, one before each reboot: the one automatic re-try
    /// is spent, so PID 1 waits for the next reboot of any kind, and
    /// nothing is reported as rolled back meanwhile.
    #[test]
    fn a_second_power_cut_defers_the_try_to_the_next_reboot() {
        let key = SigningKey::generate().unwrap();
        let (v1, v2) = (version("1.0.0", 1, 8192), version("1.1.0", 2, 8192));
        let known = [&v1, &v2];
        let pi = factory(&v1, None, false);
        agent(&pi, &key, "1.0.0", 1).install(&bundle(&v2, "rpi4", &[&key])[..]).unwrap();
        power_on(&pi, false, &known).unwrap();
        assert!(pid1_starts(&pi).unwrap().retry());
        assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::A, "1.0.0"));
        let found = pid1_starts(&pi).unwrap();
        assert_eq!(found, AtBoot::Marker(marker(0, 1), Decision::Wait));
        assert!(!found.retry());
        assert_eq!(agent(&pi, &key, "1.0.0", 3).reconcile(), None);
        assert!(reboot(&pi).unwrap());
        assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::B, "1.1.0"));
        assert_eq!(pid1_starts(&pi).unwrap(), AtBoot::Marker(marker(1, 1), Decision::Started));
    }

    /// A try that fails is reported as rolled back and never repeated,
    /// whether it got as far as stage 2 (which removed the marker) or not.
    #[test]
    fn a_failed_try_is_rolled_back_and_never_repeated() {
        let key = SigningKey::generate().unwrap();
        let (v1, v2) = (version("1.0.0", 1, 8192), version("1.1.0", 2, 8192));
        let known = [&v1, &v2];
        let b2 = bundle(&v2, "rpi4", &[&key]);
        for reached_stage2 in [true, false] {
            let pi = factory(&v1, None, false);
            agent(&pi, &key, "1.0.0", 1).install(&b2[..]).unwrap();
            assert!(reboot(&pi).unwrap());
            assert_eq!(power_on(&pi, true, &known).unwrap(), (Slot::B, "1.1.0"));
            if reached_stage2 {
                assert_eq!(
                    pid1_starts(&pi).unwrap(),
                    AtBoot::Marker(marker(1, 0), Decision::Started)
                );
            }
            // It hangs; the watchdog resets the board: a normal boot.
            assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::A, "1.0.0"));
            let found = pid1_starts(&pi).unwrap();
            if reached_stage2 {
                assert_eq!(found, AtBoot::NoMarker);
            } else {
                assert_eq!(found, AtBoot::Marker(marker(1, 0), Decision::GaveUp));
            }
            assert!(!found.retry(), "{reached_stage2}");
            assert!(!pending_try::exists(&pi.marker()));
            let mut a = agent(&pi, &key, "1.0.0", 3);
            let msg = a.reconcile().unwrap();
            assert!(msg.starts_with("rolled back: 1.1.0"), "{msg}");
            assert_eq!(a.state().failed_versions, ["1.1.0"]);
            assert!(!reboot(&pi).unwrap());
            assert_eq!(power_on(&pi, false, &known).unwrap(), (Slot::A, "1.0.0"));
        }
    }

    /// A marker naming a slot that is no longer armed with its version
    /// (blessed, marked bad, reinstalled) is removed at boot.
    #[test]
    fn a_stale_marker_is_removed() {
        let (v1, v2) = (version("1.0.0", 1, 4096), version("1.1.0", 2, 4096));
        let pi = factory(&v1, Some(&v2), false);
        for m in [marker(0, 0), TryMarker::new(Slot::B, "1.2.0")] {
            pending_try::write(&pi.marker(), &m).unwrap();
            assert_eq!(pid1_starts(&pi).unwrap(), AtBoot::Marker(m, Decision::Stale));
            assert!(!pending_try::exists(&pi.marker()));
        }
        fs::write(pi.loc.config.join(AUTOBOOT), Autoboot { all: 2, tryboot: 3 }.to_text()).unwrap();
        pending_try::write(&pi.marker(), &TryMarker::new(Slot::B, "1.2.0")).unwrap();
        let found = pid1_starts(&pi).unwrap();
        assert_eq!(found, AtBoot::Marker(TryMarker::new(Slot::B, "1.2.0"), Decision::Stale));
    }

    /// The whole update, cut after every single write (the agent's
    /// install and state, the marker, PID 1's reboot, the try boot's
    /// marker removal and blessing), then booted on as the device would:
    /// every power-on runs a whole slot, the device settles within two
    /// boots (no loop), and nothing is reported rolled back unless the
    /// try started (the one exception: a cut between PID 1 counting its
    /// reboot and `reboot(2)`, which looks like a try that ended before
    /// stage 2).
    #[test]
    fn a_cut_after_any_write_of_an_update_leaves_a_bootable_slot_and_no_loop() {
        use crate::update::state::Result as Outcome;
        let key = SigningKey::generate().unwrap();
        let (v1, v2) = (version("1.0.0", 1, 8192), version("1.1.0", 2, 16 << 10));
        let known = [&v1, &v2];
        let b2 = bundle(&v2, "rpi4", &[&key]);
        let phase = std::cell::Cell::new("");
        let run = |pi: &Pi| -> Result<(), String> {
            phase.set("install");
            agent(pi, &key, "1.0.0", 1).install(&b2[..]).map_err(|e| e.to_string())?;
            phase.set("reboot");
            if !reboot(pi).map_err(|e| e.to_string())? {
                return Err("no try reboot".into());
            }
            power_on(pi, true, &known)?;
            phase.set("try");
            pid1_starts(pi).map_err(|e| e.to_string())?;
            pi.tryboot().bless(Slot::B).map_err(|e| e.to_string())?;
            phase.set("report");
            let mut b = agent(pi, &key, "1.1.0", 2);
            b.reconcile();
            Ok(())
        };
        // After the cut: power-on (no tryboot flag), and the device as it
        // runs on, every boot healthy; stops when no reboot is asked for.
        let settle = |pi: &Pi, n: u64| -> (Slot, &'static str, AgentState) {
            let mut flag = false;
            for boot in 10..13 {
                let (slot, v) =
                    power_on(pi, flag, &known).unwrap_or_else(|e| panic!("cut {n}: {e}"));
                let found = pid1_starts(pi).unwrap();
                pi.tryboot().bless(slot).unwrap();
                let mut a = agent(pi, &key, v, boot);
                a.reconcile();
                if !found.retry() {
                    return (slot, v, a.state().clone());
                }
                flag = reboot(pi).unwrap();
            }
            panic!("cut {n}: still rebooting after three boots");
        };

        let pi = factory(&v1, None, false);
        let (done, total) = cut::count(|| run(&pi));
        done.unwrap();
        assert_eq!(
            agent(&pi, &key, "1.1.0", 3).state().last.as_ref().unwrap().result,
            Outcome::Updated
        );
        assert!(total >= 40, "only {total} cut points");
        let mut seen: Vec<(&str, Slot, Option<Outcome>)> = Vec::new();
        let mut lost_in_reboot = Vec::new();
        for n in 0..total {
            let pi = factory(&v1, None, false);
            let (_, was_cut) = cut::with_budget(n, || run(&pi));
            assert!(was_cut, "cut {n}");
            let at = phase.get();
            let (slot, v, a) = settle(&pi, n);
            let last = a.last.as_ref().map(|l| l.result);
            let rolled_back = !a.failed_versions.is_empty();
            assert_eq!(rolled_back, last == Some(Outcome::RolledBack), "cut {n} ({at})");
            match (slot, v) {
                (Slot::B, "1.1.0") => {
                    assert!(a.pending.is_none(), "cut {n} ({at})");
                    assert!(!rolled_back, "cut {n} ({at})");
                }
                (Slot::A, "1.0.0") => match at {
                    // Cut before the install was recorded: nothing to report.
                    "install" => {
                        assert!(a.pending.is_none() && !rolled_back, "cut {n}")
                    }
                    "reboot" => {
                        assert!(rolled_back, "cut {n}");
                        lost_in_reboot.push(n);
                    }
                    // The try started and was cut: the firmware went back.
                    _ => assert!(rolled_back, "cut {n} ({at})"),
                },
                other => panic!("cut {n} ({at}): {other:?}"),
            }
            assert!(!pending_try::exists(&pi.marker()), "cut {n} ({at})");
            if !seen.contains(&(at, slot, last)) {
                seen.push((at, slot, last));
            }
        }
        println!("{total} cut points; outcomes {seen:?}; lost in the reboot: {lost_in_reboot:?}");
        // Only the flush after the count's rename: the marker says the
        // try reboot was asked, and it never came.
        assert_eq!(lost_in_reboot.len(), 1, "{lost_in_reboot:?}");
        // A cut after the marker but before the agent's state records the
        // install is still tried (with nothing to report), and a cut
        // after it too.
        assert!(seen.contains(&("install", Slot::B, None)), "{seen:?}");
        assert!(seen.contains(&("reboot", Slot::B, Some(Outcome::Updated))), "{seen:?}");
    }
}
