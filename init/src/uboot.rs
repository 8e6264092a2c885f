//! The U-Boot back-end: boot counting with `bootcount` / `bootlimit` /
//! `altbootcmd`, kept in a redundant U-Boot environment that this module
//! reads and writes itself, as `fw_setenv` does.
//!
//! # The environment block
//!
//! The block format and the variables' names are
//! [`basalt_bundle::uboot`]'s, shared with the builder, which writes an
//! image's initial environment. Each copy is `size` bytes at `offset` of a device or file: a CRC-32
//! (little-endian) over the data, then, in a redundant environment, one
//! flag byte, then the data: `name=value` strings, each ended by a NUL,
//! the last followed by a second NUL, padded to the end. Of two copies
//! with a valid CRC the one with the newer flag wins; 255 counts as older
//! than 0, so the flag may wrap (U-Boot's `env_import_redund`, and
//! libubootenv's reader, which `fw_printenv` uses). A write goes to the
//! copy that did not win: its data first, with a flag still older than
//! the winner's, flushed; then its flag bumped past the winner's,
//! flushed. A power cut at any moment leaves either copy whole and
//! chosen, the old one until the flag byte is down.
//!
//! # The variables
//!
//! - `basalt_slot`: the slot the board's `bootcmd` boots (`a` or `b`), its
//!   kernel and initrd from `/<slot>/` of the boot partition, with
//!   `basalt_args_<slot>` as the command line;
//! - `basalt_version_<slot>`: the version installed there; absent while
//!   the slot is being installed, so a half-written slot is never chosen;
//! - `basalt_bad_<slot>`: set when the slot failed;
//! - `upgrade_available=1`, `bootcount`, `bootlimit`: set only while a
//!   slot is on trial. U-Boot (`CONFIG_BOOTCOUNT_ENV`) counts a boot and
//!   saves the environment only when `upgrade_available` is non-zero
//!   (`bootcount_store` in `drivers/bootcount/bootcount_env.c`), so a
//!   normal boot writes nothing; once `bootcount > bootlimit` it runs
//!   `altbootcmd` instead of `bootcmd` (`bootcount_error` in
//!   `include/bootcount.h`);
//! - `altbootcmd`: [`ALTBOOTCMD`], which marks the slot on trial bad,
//!   selects the other one, ends the trial and boots.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use basalt_bundle::entry::EntryState;
use basalt_bundle::slot::Slot;

use crate::assess::{
    clear_boot_files, install_boot_file, AssessError, Bootloader, Change, SlotBoot, SlotMark,
    SlotRecord,
};
use crate::update::cut;
use crate::update::install::{io_err, InstallError};

pub use basalt_bundle::uboot::{
    args_var, bad_var, flag_newer, version_var, Env, ALTBOOTCMD, ALTBOOTCMD_VAR, BOOTCOUNT,
    BOOTLIMIT, SLOT_VAR, UPGRADE_AVAILABLE,
};

/// The size of one write to an environment copy: a sector, so a power cut
/// can tear a copy the way a disk tears it.
const SECTOR: usize = 512;

/// One copy of the environment: `size` bytes at `offset` of `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvCopy {
    /// The device or file.
    pub path: PathBuf,
    /// Where the copy starts.
    pub offset: u64,
    /// Its size (U-Boot's `CONFIG_ENV_SIZE`).
    pub size: u64,
}

/// Where the environment lives; the board file says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvLocation {
    /// The first copy (U-Boot's `CONFIG_ENV_OFFSET`).
    pub primary: EnvCopy,
    /// The second copy (`CONFIG_ENV_OFFSET_REDUND`); without it a power
    /// cut during a write can lose the whole environment.
    pub redundant: Option<EnvCopy>,
}

/// Which copy was read, and its flag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    /// 0 for the primary copy, 1 for the redundant one.
    pub copy: usize,
    /// Its flag byte (0 without a redundant copy).
    pub flag: u8,
}

/// A U-Boot environment on its device or file.
#[derive(Debug, Clone)]
pub struct EnvStore {
    loc: EnvLocation,
}

fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, AssessError> {
    let err = |what| move |source| AssessError::Io { what, path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(err("open"))?;
    f.seek(SeekFrom::Start(offset)).map_err(err("seek in"))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).map_err(err("read the U-Boot environment from"))?;
    Ok(buf)
}

impl EnvStore {
    /// The environment at `loc`.
    pub fn new(loc: EnvLocation) -> EnvStore {
        EnvStore { loc }
    }

    /// Where it lives.
    pub fn location(&self) -> &EnvLocation {
        &self.loc
    }

    fn copies(&self) -> Vec<&EnvCopy> {
        std::iter::once(&self.loc.primary).chain(self.loc.redundant.as_ref()).collect()
    }

    fn header(&self) -> usize {
        basalt_bundle::uboot::header_len(self.loc.redundant.is_some())
    }

    /// Reads one copy: its flag and, when its CRC is right, its variables.
    fn read_copy(&self, copy: &EnvCopy) -> Result<(u8, Option<Env>), AssessError> {
        let header = self.header();
        if copy.size <= header as u64 + 1 {
            return Err(AssessError::Invalid {
                path: copy.path.clone(),
                reason: format!("an environment of {} bytes holds nothing", copy.size),
            });
        }
        let buf = read_at(&copy.path, copy.offset, copy.size)?;
        Env::from_block(&buf, self.loc.redundant.is_some()).map_err(|reason| AssessError::Invalid {
            path: copy.path.clone(),
            reason: format!(
                "the U-Boot environment at offset {} is malformed: {reason}",
                copy.offset
            ),
        })
    }

    /// The environment U-Boot would load, and which copy holds it.
    pub fn read(&self) -> Result<(Env, Current), AssessError> {
        let mut valid = Vec::new();
        for (i, copy) in self.copies().into_iter().enumerate() {
            if let (flag, Some(env)) = self.read_copy(copy)? {
                valid.push((env, Current { copy: i, flag }));
            }
        }
        let pick = match valid.len() {
            2 if flag_newer(valid[1].1.flag, valid[0].1.flag) => valid.pop(),
            _ => valid.into_iter().next(),
        };
        pick.ok_or_else(|| AssessError::Invalid {
            path: self.loc.primary.path.clone(),
            reason: "no copy of the U-Boot environment has a valid CRC (U-Boot would boot its \
                     built-in default); write one with the image's initial environment"
                .into(),
        })
    }

    /// Writes `env` the way a power cut cannot lose: see the module docs.
    /// `current` is where [`EnvStore::read`] found the environment, `None`
    /// only when it found no valid copy (a blank board). Without a
    /// redundant copy, the one copy is overwritten in place.
    pub fn write(&self, env: &Env, current: Option<Current>) -> Result<(), InstallError> {
        if current.is_none() && self.loc.redundant.is_some() && self.read().is_ok() {
            // Writing the first copy blindly could leave a newer second
            // copy in force and lose this write.
            return Err(InstallError::Bootloader(format!(
                "{}: the U-Boot environment has a valid copy; read it first, so that the \
                 write goes to the other copy",
                self.loc.primary.path.display()
            )));
        }
        let header = self.header();
        let copies = self.copies();
        let (target, flag, new_flag) = match (self.loc.redundant.as_ref(), current) {
            (None, _) => (copies[0], 0, None),
            (Some(_), Some(cur)) => {
                let target = copies[1 - cur.copy];
                (target, cur.flag.wrapping_sub(1), Some(cur.flag.wrapping_add(1)))
            }
            // Neither copy valid: the first write makes the first copy
            // valid, with any flag.
            (Some(_), None) => (copies[0], 0, None),
        };
        let path = &target.path;
        let bad =
            |reason: String| InstallError::Bootloader(format!("{}: {reason}", path.display()));
        let block = env.to_block(target.size as usize, header == 5, flag).map_err(bad)?;
        let mut dev = OpenOptions::new().write(true).open(path).map_err(io_err("open", path))?;
        dev.seek(SeekFrom::Start(target.offset)).map_err(io_err("seek in", path))?;
        for sector in block.chunks(SECTOR) {
            cut::write_all(&mut dev, sector).map_err(io_err("write", path))?;
        }
        cut::sync(&dev).map_err(io_err("flush", path))?;
        if let Some(new_flag) = new_flag {
            // Only now does this copy become the newer one.
            dev.seek(SeekFrom::Start(target.offset + 4)).map_err(io_err("seek in", path))?;
            cut::write_all(&mut dev, &[new_flag]).map_err(io_err("write", path))?;
            cut::sync(&dev).map_err(io_err("flush", path))?;
        }
        Ok(())
    }
}

/// U-Boot's boot counting over a redundant environment, with the slots'
/// kernels and initrds in `/<slot>/` of a boot partition mounted at a
/// path.
#[derive(Debug, Clone)]
pub struct UBoot {
    env: EnvStore,
    boot: PathBuf,
    booted: Option<Slot>,
}

/// What the environment says of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `basalt_slot` names it, no trial.
    Selected,
    /// `basalt_slot` names it, `upgrade_available` set.
    OnTrial,
    /// Installed, not selected, not bad: a whole earlier version.
    Standby,
    /// `basalt_bad_<slot>` set.
    Bad,
}

impl UBoot {
    /// The back-end for the environment at `env` and the boot partition
    /// mounted at `boot`; `booted` is the slot from the kernel command
    /// line.
    pub fn new(env: EnvLocation, boot: &Path, booted: Option<Slot>) -> UBoot {
        UBoot { env: EnvStore::new(env), boot: boot.to_path_buf(), booted }
    }

    /// The environment store.
    pub fn store(&self) -> &EnvStore {
        &self.env
    }

    fn read(&self) -> Result<(Env, Current), AssessError> {
        self.env.read()
    }

    fn selected(&self, env: &Env) -> Result<Option<Slot>, AssessError> {
        match env.get(SLOT_VAR) {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|e| AssessError::Invalid {
                path: self.env.loc.primary.path.clone(),
                reason: format!("{SLOT_VAR}: {e}"),
            }),
        }
    }

    fn role(&self, env: &Env, slot: Slot) -> Result<Role, AssessError> {
        if env.get(&version_var(slot)).is_none() {
            return Err(AssessError::Invalid {
                path: self.env.loc.primary.path.clone(),
                reason: format!(
                    "the U-Boot environment has no {}: slot {slot} holds no installed version",
                    version_var(slot)
                ),
            });
        }
        if env.get(&bad_var(slot)).is_some() {
            return Ok(Role::Bad);
        }
        if self.selected(env)? != Some(slot) {
            return Ok(Role::Standby);
        }
        if env.get_ulong(UPGRADE_AVAILABLE, 0) != 0 {
            Ok(Role::OnTrial)
        } else {
            Ok(Role::Selected)
        }
    }

    fn mark_of(&self, env: &Env, slot: Slot) -> Result<SlotMark, AssessError> {
        let text = match self.role(env, slot)? {
            Role::Selected => format!("{SLOT_VAR}={slot}"),
            Role::OnTrial => format!(
                "{SLOT_VAR}={slot} {UPGRADE_AVAILABLE}=1 {BOOTCOUNT}={} {BOOTLIMIT}={}",
                env.get_ulong(BOOTCOUNT, 0),
                env.get_ulong(BOOTLIMIT, 0)
            ),
            Role::Standby => format!("{}={} (not selected)", version_var(slot), version(env, slot)),
            Role::Bad => format!("{}=1", bad_var(slot)),
        };
        Ok(SlotMark::new(text))
    }

    /// Writes `env` if it differs from what was read; returns the change
    /// of `slot`'s mark.
    fn commit(&self, slot: Slot, old: (&Env, Current), new: &Env) -> Result<Change, AssessError> {
        let from = self.mark_of(old.0, slot)?;
        if new == old.0 {
            return Ok(Change { from: from.clone(), to: from });
        }
        self.env.write(new, Some(old.1)).map_err(|e| {
            AssessError::Refused(format!("cannot write the U-Boot environment: {e}"))
        })?;
        Ok(Change { from, to: self.mark_of(new, slot)? })
    }
}

fn version(env: &Env, slot: Slot) -> String {
    env.get(&version_var(slot)).unwrap_or_default().to_string()
}

/// Ends a trial in `env`: U-Boot stops counting boots.
fn end_trial(env: &mut Env) {
    env.remove(UPGRADE_AVAILABLE);
    env.remove(BOOTCOUNT);
}

fn to_install(e: AssessError) -> InstallError {
    InstallError::Bootloader(e.to_string())
}

impl Bootloader for UBoot {
    fn booted_slot(&self) -> Option<Slot> {
        self.booted
    }

    fn entry_state(&self, slot: Slot) -> Result<EntryState, AssessError> {
        let (env, _) = self.read()?;
        self.entry_state_in(&env, slot)
    }

    fn mark(&self, slot: Slot) -> Result<SlotMark, AssessError> {
        let (env, _) = self.read()?;
        self.mark_of(&env, slot)
    }

    fn bless(&mut self, slot: Slot) -> Result<Change, AssessError> {
        let (env, cur) = self.read()?;
        match self.role(&env, slot)? {
            Role::Selected => self.commit(slot, (&env, cur), &env),
            Role::OnTrial => {
                let mut new = env.clone();
                end_trial(&mut new);
                self.commit(slot, (&env, cur), &new)
            }
            Role::Standby | Role::Bad => Err(AssessError::Refused(format!(
                "cannot bless slot {slot}: U-Boot boots slot {} ({SLOT_VAR}), not {slot}",
                env.get(SLOT_VAR).unwrap_or("(none)")
            ))),
        }
    }

    fn mark_bad(&mut self, slot: Slot) -> Result<Change, AssessError> {
        let (env, cur) = self.read()?;
        let mut new = env.clone();
        match self.role(&env, slot)? {
            Role::Bad => {}
            Role::Standby => new.set(&bad_var(slot), "1"),
            Role::Selected | Role::OnTrial => {
                let other = slot.other();
                if !matches!(self.role(&env, other), Ok(Role::Standby)) {
                    return Err(AssessError::Refused(format!(
                        "not marking slot {slot} bad: slot {other} holds no good version, so \
                         U-Boot would have nothing to boot"
                    )));
                }
                new.set(&bad_var(slot), "1");
                new.set(SLOT_VAR, other.name());
                end_trial(&mut new);
            }
        }
        self.commit(slot, (&env, cur), &new)
    }

    fn begin_install(&mut self, slot: Slot) -> Result<(), InstallError> {
        if self.booted == Some(slot) {
            return Err(InstallError::Bootloader(format!(
                "refusing to install into slot {slot}: it is the slot running now"
            )));
        }
        let (env, cur) = self.read().map_err(to_install)?;
        let mut new = env.clone();
        if self.selected(&env).map_err(to_install)? == Some(slot) {
            new.set(SLOT_VAR, slot.other().name());
            end_trial(&mut new);
        }
        for var in [version_var(slot), args_var(slot), bad_var(slot)] {
            new.remove(&var);
        }
        if new != env {
            self.env.write(&new, Some(cur))?;
        }
        clear_boot_files(&self.boot.join(slot.esp_dir()), &["vmlinuz", "initrd"])
    }

    fn install_file(
        &mut self,
        slot: Slot,
        name: &str,
        content: &mut dyn Read,
        chunk: usize,
    ) -> Result<u64, InstallError> {
        install_boot_file(&self.boot.join(slot.esp_dir()), name, content, chunk)
    }

    fn prefer_for_one_try(
        &mut self,
        slot: Slot,
        boot: &SlotBoot,
        tries: u32,
    ) -> Result<SlotMark, InstallError> {
        let (env, cur) = self.read().map_err(to_install)?;
        let mut new = env.clone();
        // One write: the slot's description, its selection and the trial
        // reach the disk together or not at all.
        new.set(&version_var(slot), boot.version.clone());
        new.set(&args_var(slot), boot.cmdline_for(slot));
        new.remove(&bad_var(slot));
        new.set(SLOT_VAR, slot.name());
        new.set(UPGRADE_AVAILABLE, "1");
        new.set(BOOTCOUNT, "0");
        new.set(BOOTLIMIT, tries.max(1).to_string());
        new.set(ALTBOOTCMD_VAR, ALTBOOTCMD);
        self.env.write(&new, Some(cur))?;
        self.mark_of(&new, slot).map_err(to_install)
    }

    fn slots(&self) -> Result<Vec<SlotRecord>, AssessError> {
        let (env, _) = self.read()?;
        let mut out = Vec::new();
        for slot in Slot::ALL {
            if env.get(&version_var(slot)).is_none() {
                continue;
            }
            out.push(SlotRecord {
                slot,
                version: version(&env, slot),
                state: self.entry_state_in(&env, slot)?,
                mark: self.mark_of(&env, slot)?,
            });
        }
        Ok(out)
    }
}

impl UBoot {
    fn entry_state_in(&self, env: &Env, slot: Slot) -> Result<EntryState, AssessError> {
        Ok(match self.role(env, slot)? {
            Role::Selected | Role::Standby => EntryState::Good,
            Role::OnTrial => EntryState::Indeterminate,
            Role::Bad => EntryState::Bad,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assess::{fail_boot, FailOutcome};
    use crate::update::install::{write_slot, CHUNK};
    use crate::update::testing::{payloads, version, Version, CMDLINE, ROOT_CAPACITY};
    use std::fs;
    use std::process::Command;

    const ENV_SIZE: u64 = 0x2000;

    /// A board: a raw environment area holding both copies, a boot
    /// partition (a folder), two root partitions (files).
    struct Board {
        dir: tempfile::TempDir,
        boot: PathBuf,
        roots: [PathBuf; 2],
    }

    impl Board {
        fn loc(&self) -> EnvLocation {
            let path = self.dir.path().join("env");
            EnvLocation {
                primary: EnvCopy { path: path.clone(), offset: 0, size: ENV_SIZE },
                redundant: Some(EnvCopy { path, offset: ENV_SIZE, size: ENV_SIZE }),
            }
        }

        fn uboot(&self, booted: Option<Slot>) -> UBoot {
            UBoot::new(self.loc(), &self.boot, booted)
        }

        fn env_bytes(&self) -> Vec<u8> {
            fs::read(self.dir.path().join("env")).unwrap()
        }

        /// What `fw_printenv` reads, through an `fw_env.config` naming both
        /// copies.
        fn fw_printenv(&self) -> Result<Vec<(String, String)>, String> {
            let config = self.dir.path().join("fw_env.config");
            let env = self.dir.path().join("env");
            let text = format!("{0} 0x0 {1:#x}\n{0} {1:#x} {1:#x}\n", env.display(), ENV_SIZE);
            fs::write(&config, text).unwrap();
            let out = Command::new("fw_printenv")
                .arg("-c")
                .arg(&config)
                .output()
                .expect("fw_printenv is missing: install libubootenv-tool (ci/setup.sh)");
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            Ok(String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect())
        }
    }

    /// A board where slot a runs `a`, selected and good, as the image
    /// builder leaves it; slot b holds `b`, if given, on standby.
    fn factory(a: &Version, b: Option<&Version>) -> Board {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
        let dir = dir.unwrap();
        let boot = dir.path().join("boot");
        let roots = [dir.path().join("rootfs_a"), dir.path().join("rootfs_b")];
        let board = Board { dir, boot, roots };
        fs::write(board.dir.path().join("env"), vec![0u8; 2 * ENV_SIZE as usize]).unwrap();
        let mut env = Env::new();
        env.set(SLOT_VAR, "a");
        env.set("bootcmd", "run basalt_boot");
        let mut put = |slot: Slot, v: &Version| {
            let d = board.boot.join(slot.esp_dir());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("vmlinuz"), &v.kernel).unwrap();
            fs::write(d.join("initrd"), &v.initrd).unwrap();
            let root = &board.roots[usize::from(slot == Slot::B)];
            fs::write(root, &v.root).unwrap();
            env.set(&version_var(slot), v.version);
            env.set(&args_var(slot), format!("{CMDLINE} basalt.slot={slot}"));
        };
        put(Slot::A, a);
        if let Some(b) = b {
            put(Slot::B, b);
        }
        for root in &board.roots {
            let f = OpenOptions::new().create(true).truncate(false).write(true).open(root);
            f.unwrap().set_len(ROOT_CAPACITY).unwrap();
        }
        EnvStore::new(board.loc()).write(&env, None).unwrap();
        board
    }

    /// What U-Boot does at power-on with `CONFIG_BOOTCOUNT_ENV`: count the
    /// boot (and save) only while `upgrade_available` is set, run
    /// `altbootcmd` once `bootcount > bootlimit`, else `bootcmd`, which
    /// boots `basalt_slot`. Returns the slot and the version it runs,
    /// checked file by file.
    fn power_on(board: &Board, known: &[&Version]) -> Result<(Slot, &'static str), String> {
        let store = EnvStore::new(board.loc());
        let (mut env, cur) = store.read().map_err(|e| format!("U-Boot: {e}"))?;
        let upgrade = env.get_ulong(UPGRADE_AVAILABLE, 0) != 0;
        let bootcount = if upgrade { env.get_ulong(BOOTCOUNT, 0) } else { 0 } + 1;
        if upgrade {
            env.set(BOOTCOUNT, bootcount.to_string());
            store.write(&env, Some(cur)).unwrap();
        }
        let bootlimit = env.get_ulong(BOOTLIMIT, 0);
        if bootlimit != 0 && bootcount > bootlimit {
            if env.get(ALTBOOTCMD_VAR) != Some(ALTBOOTCMD) {
                return Err(format!("altbootcmd is {:?}", env.get(ALTBOOTCMD_VAR)));
            }
            let (_, cur) = store.read().unwrap();
            let (bad, next) = if env.get(SLOT_VAR) == Some("b") { ("b", "a") } else { ("a", "b") };
            env.set(&format!("basalt_bad_{bad}"), "1");
            env.set(SLOT_VAR, next);
            env.remove(UPGRADE_AVAILABLE);
            env.remove(BOOTCOUNT);
            store.write(&env, Some(cur)).unwrap();
        }
        let slot: Slot =
            env.get(SLOT_VAR).ok_or("no basalt_slot")?.parse().map_err(|e| format!("{e}"))?;
        let ver = env.get(&version_var(slot)).ok_or(format!("slot {slot} has no version"))?;
        let v = known.iter().find(|v| v.version == ver).ok_or(format!("unknown version {ver}"))?;
        let args = env.get(&args_var(slot)).ok_or(format!("slot {slot} has no args"))?;
        if args != format!("{CMDLINE} basalt.slot={slot}") {
            return Err(format!("slot {slot} boots with {args:?}"));
        }
        let dir = board.boot.join(slot.esp_dir());
        let kernel = fs::read(dir.join("vmlinuz")).map_err(|e| format!("{slot}: kernel: {e}"))?;
        let initrd = fs::read(dir.join("initrd")).map_err(|e| format!("{slot}: initrd: {e}"))?;
        let root = fs::read(&board.roots[usize::from(slot == Slot::B)]).unwrap();
        if kernel != v.kernel || initrd != v.initrd || !root.starts_with(&v.root) {
            return Err(format!("slot {slot} boots {} with files of another version", v.version));
        }
        Ok((slot, v.version))
    }

    fn install(
        board: &Board,
        booted: Slot,
        v: &Version,
        chunk: usize,
    ) -> Result<SlotMark, InstallError> {
        let mut bl = board.uboot(Some(booted));
        let target = booted.other();
        let root = &board.roots[usize::from(target == Slot::B)];
        write_slot(&mut bl, target, root, &mut payloads(v), chunk)?;
        let boot =
            SlotBoot { image: "img".into(), version: v.version.into(), cmdline: CMDLINE.into() };
        bl.prefer_for_one_try(target, &boot, 3)
    }

    fn states(board: &Board) -> Vec<(Slot, EntryState, String)> {
        let bl = board.uboot(None);
        bl.slots().unwrap().into_iter().map(|r| (r.slot, r.state, r.version)).collect()
    }

    #[test]
    fn writes_alternate_copies_and_survive_a_torn_copy() {
        let v1 = version("1.0.0", 1, 4096);
        let board = factory(&v1, None);
        let store = EnvStore::new(board.loc());
        let (mut env, cur) = store.read().unwrap();
        assert_eq!(cur, Current { copy: 0, flag: 0 });
        env.set("x", "1");
        store.write(&env, Some(cur)).unwrap();
        let (read, cur) = store.read().unwrap();
        assert_eq!((read, cur), (env.clone(), Current { copy: 1, flag: 1 }));
        // A torn second copy: the first one is read again.
        let before_tear = board.env_bytes();
        let mut bytes = before_tear.clone();
        bytes[ENV_SIZE as usize + 100] ^= 1;
        fs::write(board.dir.path().join("env"), &bytes).unwrap();
        let (read, cur) = store.read().unwrap();
        assert_eq!(cur.copy, 0);
        assert_eq!(read.get("x"), None);
        // Both torn: a clear error, no default environment made up.
        bytes[100] ^= 1;
        fs::write(board.dir.path().join("env"), &bytes).unwrap();
        let err = store.read().unwrap_err().to_string();
        assert!(err.contains("no copy of the U-Boot environment has a valid CRC"), "{err}");
        // A blind write next to a valid copy is refused.
        fs::write(board.dir.path().join("env"), before_tear).unwrap();
        let err = store.write(&env, None).unwrap_err().to_string();
        assert!(err.contains("read it first"), "{err}");
    }

    #[test]
    fn install_try_bless_fail_and_fall_back() {
        let v1 = version("1.0.0", 1, 8192);
        let v2 = version("1.1.0", 2, 8192);
        let v3 = version("1.2.0", 3, 8192);
        let v4 = version("1.3.0", 4, 8192);
        let known = [&v1, &v2, &v3, &v4];
        let board = factory(&v1, None);
        // A normal boot writes nothing.
        let before = board.env_bytes();
        assert_eq!(power_on(&board, &known).unwrap(), (Slot::A, v1.version));
        assert!(!board.uboot(Some(Slot::A)).bless(Slot::A).unwrap().changed());
        assert_eq!(board.env_bytes(), before);
        assert_eq!(states(&board), [(Slot::A, EntryState::Good, "1.0.0".into())]);

        // Install 1.1.0 into b: it is tried next, and blessed.
        let mark = install(&board, Slot::A, &v2, CHUNK).unwrap();
        assert_eq!(mark.to_string(), "basalt_slot=b upgrade_available=1 bootcount=0 bootlimit=3");
        assert_eq!(power_on(&board, &known).unwrap(), (Slot::B, v2.version));
        let mut bl = board.uboot(Some(Slot::B));
        assert_eq!(bl.entry_state(Slot::B).unwrap(), EntryState::Indeterminate);
        assert_eq!(bl.entry_state(Slot::A).unwrap(), EntryState::Good);
        let r = bl.bless(Slot::B).unwrap();
        assert_eq!(
            r.to_string(),
            "basalt_slot=b upgrade_available=1 bootcount=1 bootlimit=3 -> basalt_slot=b"
        );
        let before = board.env_bytes();
        assert_eq!(power_on(&board, &known).unwrap(), (Slot::B, v2.version));
        assert_eq!(board.env_bytes(), before, "a boot of a blessed slot wrote the environment");
        assert_eq!(
            states(&board),
            [
                (Slot::A, EntryState::Good, "1.0.0".into()),
                (Slot::B, EntryState::Good, "1.1.0".into())
            ]
        );

        // 1.2.0 into a never comes up: three tries, then U-Boot's
        // altbootcmd goes back to b on its own and marks a bad.
        install(&board, Slot::B, &v3, CHUNK).unwrap();
        for n in 1..=3 {
            assert_eq!(power_on(&board, &known).unwrap(), (Slot::A, v3.version), "try {n}");
        }
        assert_eq!(power_on(&board, &known).unwrap(), (Slot::B, v2.version));
        assert_eq!(
            states(&board),
            [
                (Slot::A, EntryState::Bad, "1.2.0".into()),
                (Slot::B, EntryState::Good, "1.1.0".into())
            ]
        );
        let before = board.env_bytes();
        assert_eq!(power_on(&board, &known).unwrap(), (Slot::B, v2.version));
        assert_eq!(board.env_bytes(), before);

        // 1.3.0 into a fails its assessment: PID 1 marks it bad, and the
        // reboot runs b.
        install(&board, Slot::B, &v4, CHUNK).unwrap();
        assert_eq!(states(&board)[0], (Slot::A, EntryState::Indeterminate, "1.3.0".into()));
        assert_eq!(power_on(&board, &known).unwrap(), (Slot::A, v4.version));
        let mut bl = board.uboot(Some(Slot::A));
        let out = fail_boot(&mut bl, Slot::A).unwrap();
        assert!(out.reboot(), "{out:?}");
        assert_eq!(power_on(&board, &known).unwrap(), (Slot::B, v2.version));
        // A blessed slot that fails later is kept; a bad one is left alone.
        let mut bl = board.uboot(Some(Slot::B));
        assert!(matches!(fail_boot(&mut bl, Slot::B).unwrap(), FailOutcome::KeptGood(_)));
        assert!(matches!(fail_boot(&mut bl, Slot::A).unwrap(), FailOutcome::AlreadyBad(_)));
        // Blessing a slot U-Boot does not boot is refused.
        assert!(bl.bless(Slot::A).unwrap_err().to_string().contains("U-Boot boots slot b"));
        // And never into the running slot.
        let err = write_slot(&mut bl, Slot::B, &board.roots[1], &mut payloads(&v4), CHUNK);
        assert!(err.unwrap_err().to_string().contains("running now"));
    }

    #[test]
    fn a_verity_failure_of_a_blessed_slot_falls_back_only_to_a_good_one() {
        let (v1, v2) = (version("1.0.0", 1, 4096), version("1.1.0", 2, 4096));
        let board = factory(&v1, None);
        let mut bl = board.uboot(Some(Slot::A));
        let err = bl.mark_bad(Slot::A).unwrap_err().to_string();
        assert!(err.contains("nothing to boot"), "{err}");
        install(&board, Slot::A, &v2, CHUNK).unwrap();
        board.uboot(Some(Slot::B)).bless(Slot::B).unwrap();
        let r = board.uboot(Some(Slot::B)).mark_bad(Slot::B).unwrap();
        assert_eq!(r.to_string(), "basalt_slot=b -> basalt_bad_b=1");
        assert_eq!(power_on(&board, &[&v1, &v2]).unwrap(), (Slot::A, v1.version));
    }

    /// Checks that `fw_printenv` reads the same environment as we do (or
    /// fails when we fail).
    fn agrees_with_fw_printenv(board: &Board, at: &str) {
        let ours = EnvStore::new(board.loc()).read().map(|(e, _)| {
            e.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>()
        });
        match (ours, board.fw_printenv()) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{at}"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("{at}: we read {a:?}, fw_printenv {b:?}"),
        }
    }

    /// A power cut after every write of every transition: U-Boot always
    /// boots a whole slot, the old one until the one write that selects
    /// the new one lands, and `fw_printenv` reads what we read.
    #[test]
    fn a_cut_after_any_write_leaves_a_bootable_slot() {
        let (v1, v2) = (version("1.0.0", 1, 16 << 10), version("1.1.0", 2, 24 << 10));
        let v09 = version("0.9.0", 9, 8192);
        let known = [&v09, &v1, &v2];
        let chunk = 4096;
        let fresh = || factory(&v1, Some(&v09));

        // Install.
        let board = fresh();
        let (done, total) = cut::count(|| install(&board, Slot::A, &v2, chunk));
        done.unwrap();
        assert!(total >= 20, "only {total} cut points");
        println!("install: {total} cut points");
        let mut new = 0;
        for n in 0..=total {
            let board = fresh();
            let (_, was_cut) = cut::with_budget(n, || install(&board, Slot::A, &v2, chunk));
            assert_eq!(was_cut, n < total, "cut {n}");
            agrees_with_fw_printenv(&board, &format!("install, cut {n}"));
            match power_on(&board, &known) {
                Ok((Slot::A, "1.0.0")) => {}
                Ok((Slot::B, "1.1.0")) => new += 1,
                other => panic!("install, cut {n}: {other:?}"),
            }
        }
        // Only the flag byte of the last write (and its flush) select b.
        assert_eq!(new, 2, "{new} cut points boot the new version");

        // Bless and mark bad, from a first boot of b on trial.
        let on_trial = || {
            let board = fresh();
            install(&board, Slot::A, &v2, chunk).unwrap();
            assert_eq!(power_on(&board, &known).unwrap().0, Slot::B);
            board
        };
        type Step = fn(&mut UBoot) -> Result<Change, AssessError>;
        let steps: [(&str, Step, Slot); 2] = [
            ("bless", |bl| bl.bless(Slot::B), Slot::B),
            ("mark bad", |bl| bl.mark_bad(Slot::B), Slot::A),
        ];
        for (what, step, after) in steps {
            let board = on_trial();
            let mut bl = board.uboot(Some(Slot::B));
            let (done, total) = cut::count(|| step(&mut bl));
            done.unwrap();
            assert!(total >= 4, "{what}: {total} cut points");
            println!("{what}: {total} cut points");
            for n in 0..=total {
                let board = on_trial();
                let (_, was_cut) = cut::with_budget(n, || step(&mut board.uboot(Some(Slot::B))));
                assert_eq!(was_cut, n < total, "{what}, cut {n}");
                agrees_with_fw_printenv(&board, &format!("{what}, cut {n}"));
                let (slot, v) =
                    power_on(&board, &known).unwrap_or_else(|e| panic!("{what}, cut {n}: {e}"));
                let expect = if slot == Slot::B { "1.1.0" } else { "1.0.0" };
                assert_eq!(v, expect, "{what}, cut {n}");
                if n == total {
                    assert_eq!(slot, after, "{what}");
                }
            }
        }
    }
}
