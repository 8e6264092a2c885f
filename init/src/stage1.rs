//! Stage 1: PID 1 inside the slot's initramfs.
//!
//! In the order it runs:
//! 1. mount `/proc`, `/sys` and `/dev` (devtmpfs: the kernel does not mount
//!    it on its own) and make sure fds 0-2 reach the console;
//! 2. read [`SlotConfig`] from [`SLOT_CONFIG_PATH`] and `basalt.slot=` from
//!    the kernel command line;
//! 3. load the board's modules, in the order the builder resolved;
//! 4. wait, at most `root_wait_ms`, for `PARTLABEL=rootfs_<slot>`;
//! 5. map it through dm-verity with the root hash from the config, which
//!    the signed initramfs carries;
//! 6. mount the verified device read-only at `/newroot`;
//! 7. mount `PARTLABEL=data` at `/newroot/data`, or a tmpfs if it is
//!    missing or broken;
//! 8. move the API filesystems into the new root, free the initramfs,
//!    switch root and exec `/sbin/init` (stage 2, the same binary).
//!
//! Any error ends in [`fail`], which reboots: the bootloader counts the
//! failed try and, once the slot's tries are used up, boots the other slot.
//! Nothing here may panic or return, because PID 1 exiting panics the
//! kernel.

use std::convert::Infallible;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basalt_bundle::config::{ConfigError, SlotConfig, VerityParams, DATA_MOUNT, SLOT_CONFIG_PATH};
use basalt_bundle::layout::DATA_LABEL;
use basalt_bundle::slot::UnknownSlot;
use basalt_bundle::Slot;

use crate::platform::block::{self, BlockDev};
use crate::platform::console;
use crate::platform::dm::{self, Control, Target};
use crate::platform::kmod::{self, Loaded};
use crate::platform::mount::{self, MountFlags};
use crate::platform::reboot::{self, Halt};

/// Prefix of every console line stage 1 prints.
const PREFIX: &str = "basalt-init[1]: ";
/// Where the verified root is mounted before it becomes `/`.
const NEW_ROOT: &str = "/newroot";
/// The program stage 1 execs in the new root.
const NEXT_INIT: &str = "/sbin/init";
/// The kernel command-line key that names the slot being booted.
const SLOT_ARG: &str = "basalt.slot=";
/// How often to look for a partition while waiting for it: short against
/// the ~3 s a boot takes, long enough not to busy-loop a small CPU.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
const SYS_CLASS_BLOCK: &str = "/sys/class/block";
const DEV: &str = "/dev";
const DM_CONTROL: &str = "/dev/mapper/control";

/// Everything that can stop stage 1. Each variant names the step and carries
/// its context, and prints as one line for the console.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    /// Mounting one of `/proc`, `/sys`, `/dev`.
    #[error("mounting {fstype} at {target} failed: {source}")]
    MountApi {
        /// Filesystem type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The errno.
        source: io::Error,
    },
    /// Reading a file stage 1 needs.
    #[error("reading {path} failed: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// The errno.
        source: io::Error,
    },
    /// The slot configuration does not parse.
    #[error("{0} (the initramfs and this basalt-init disagree on its format)")]
    Config(#[from] ConfigError),
    /// The boot entry did not say which slot this is.
    #[error("no {SLOT_ARG}a|b on the kernel command line ({cmdline:?}); the boot entry is broken")]
    NoSlotArg {
        /// `/proc/cmdline`, trimmed.
        cmdline: String,
    },
    /// The boot entry names a slot that does not exist.
    #[error("{SLOT_ARG} on the kernel command line: {0}")]
    BadSlotArg(#[source] UnknownSlot),
    /// The slot's root partition never appeared.
    #[error("partition PARTLABEL={label} did not appear within {waited_ms} ms{detail}")]
    PartitionTimeout {
        /// The label waited for.
        label: String,
        /// How long stage 1 waited.
        waited_ms: u64,
        /// The last error scanning sysfs, and modules that did not load.
        detail: String,
    },
    /// The verity parameters cannot form a dm-verity table.
    #[error("verity parameters in {SLOT_CONFIG_PATH}: {0}")]
    BadVerityParams(String),
    /// A device-mapper step failed.
    #[error("device-mapper {step} for {name} failed: {source}{detail}")]
    DeviceMapper {
        /// The ioctl or step (`DM_TABLE_LOAD`, `open /dev/mapper/control`).
        step: &'static str,
        /// The mapped device's name.
        name: String,
        /// The errno.
        source: io::Error,
        /// What to look at next (kernel log, modules that did not load).
        detail: String,
    },
    /// Mounting the verified root filesystem.
    #[error("mounting {device} ({fstype}, read-only) at {NEW_ROOT} failed: {source}{detail}")]
    MountRoot {
        /// The verity device.
        device: PathBuf,
        /// The configured root filesystem type.
        fstype: String,
        /// The errno; EIO means dm-verity refused a block or the disk failed.
        source: io::Error,
        /// Modules that did not load, or why EIO.
        detail: String,
    },
    /// Not even the tmpfs fallback for `/data` could be mounted.
    #[error("mounting a tmpfs at {target} failed: {source} (the root filesystem must contain {DATA_MOUNT})")]
    MountDataFallback {
        /// Mount point.
        target: PathBuf,
        /// The errno.
        source: io::Error,
    },
    /// Moving `/dev`, `/proc` or `/sys` below the new root.
    #[error("moving {from} to {to} failed: {source} (the root filesystem must contain {from})")]
    MoveMount {
        /// The mount.
        from: &'static str,
        /// Its new place.
        to: PathBuf,
        /// The errno.
        source: io::Error,
    },
    /// Making the new root `/`.
    #[error("switching root to {NEW_ROOT} failed: {source}")]
    SwitchRoot {
        /// The errno.
        source: io::Error,
    },
    /// Starting stage 2.
    #[error("exec {NEXT_INIT} in the new root failed: {source}")]
    Exec {
        /// The errno.
        source: io::Error,
    },
}

/// Runs stage 1 and execs stage 2; on any error, [`fail`]s.
pub fn run() -> ! {
    let started = Instant::now();
    // A panic would end PID 1 and panic the kernel; turn it into the same
    // orderly reboot as any other failure.
    std::panic::set_hook(Box::new(|info| fail(&format!("internal error: {info}"))));
    match boot(started) {
        Ok(never) => match never {},
        Err(e) => fail(&e.to_string()),
    }
}

/// Prints one line `basalt-init[1]: FATAL: <msg>; rebooting ...` on the
/// console, syncs and reboots, so the bootloader counts a failed try of
/// this slot. Never returns: if the kernel refuses to reboot, it says so
/// and sleeps forever (PID 1 must not exit).
pub fn fail(msg: &str) -> ! {
    let one_line = msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>();
    say(&format!(
        "FATAL: {}; rebooting so the bootloader can try the other slot",
        one_line.join(" ")
    ));
    console::drain_stderr();
    let err = reboot::halt(Halt::Reboot);
    say(&format!("reboot(2) failed: {err}; halting here"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Marks `slot`'s boot entry bad because its root filesystem failed
/// verification. Unlike other stage-1 failures, this one is certain to
/// repeat, so the slot is given up at once instead of after its remaining
/// tries; and a blessed entry has no tries to run out at all, so without
/// this a corrupted slot that once booted well would reboot forever.
/// Best effort: if the ESP cannot be changed, the reboot still happens and
/// the try counter decides.
fn condemn(slot: Slot, bootloader: &basalt_bundle::config::BootloaderConfig) {
    let backend = crate::backend::Backend::on_device(bootloader, &crate::backend::PID1_MOUNTS);
    let result: Result<_, crate::assess::AssessError> =
        backend.with_bootloader(Some(slot), |bl| bl.mark_bad(slot));
    match result {
        Ok(r) => {
            say(&format!("root of slot {slot} failed verification: entry {} -> {}", r.from, r.to))
        }
        Err(e) => say(&format!("could not mark slot {slot} bad: {e}")),
    }
}

/// Writes one prefixed line to stderr in a single write, ignoring errors:
/// a console that cannot be written to must not stop the boot.
fn say(msg: &str) {
    let line = format!("{PREFIX}{msg}\n");
    let _ = io::stderr().write_all(line.as_bytes());
}

fn boot(started: Instant) -> Result<Infallible, Stage1Error> {
    mount_api_filesystems()?;
    if let Ok(n @ 1..) =
        console::attach_closed_stdio(Path::new("/dev/console"), Path::new("/proc/self/fd"))
    {
        say(&format!("attached {n} closed stdio descriptor(s) to /dev/console"));
    }
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let uptime = uptime.split_whitespace().next().unwrap_or("?");

    let text = read(SLOT_CONFIG_PATH)?;
    let cfg = SlotConfig::from_toml(&text)?;
    let slot = slot_from_cmdline(&read("/proc/cmdline")?)?;
    say(&format!("stage 1: {} {}, slot {slot}, kernel up {uptime} s", cfg.image, cfg.version));

    let t = Instant::now();
    let modules = load_modules(&cfg.modules, kmod::load, |path, e| {
        say(&format!("module {path} failed to load: {e}{}", kmod::refusal_hint(e)));
    });
    say(&format!(
        "loaded {} of {} modules in {} ms ({} already present)",
        modules.new + modules.present,
        cfg.modules.len(),
        t.elapsed().as_millis(),
        modules.present
    ));

    // The data partition is waited for against the same deadline: it is on
    // the same disk, so it appears in the same partition scan as the root.
    let t = Instant::now();
    let deadline = t + Duration::from_millis(cfg.root_wait_ms);
    let label = slot.root_partlabel();
    let root = wait_for(deadline, POLL_INTERVAL, || find_partition(label)).map_err(|last| {
        Stage1Error::PartitionTimeout {
            label: label.to_string(),
            waited_ms: cfg.root_wait_ms,
            detail: format!(
                "{}{}",
                last.map(|e| format!("; last error reading {SYS_CLASS_BLOCK}: {e}"))
                    .unwrap_or_default(),
                modules.hint()
            ),
        }
    })?;
    say(&format!(
        "{label} is {} ({}), found in {} ms",
        root.name,
        root.dev_t_str(),
        t.elapsed().as_millis()
    ));

    let name = verity_device_name(slot);
    let target = verity_target(&cfg.verity, &root.dev_t_str())?;
    let verity_node = activate_verity(&name, &target, &modules)?;

    let new_root = Path::new(NEW_ROOT);
    mount::mount(
        &verity_node.to_string_lossy(),
        new_root,
        &cfg.root_fstype,
        MountFlags::MS_RDONLY,
        None,
    )
    .map_err(|source| {
        if source.raw_os_error() == Some(libc::EIO) {
            condemn(slot, &cfg.bootloader);
        }
        let detail = if source.raw_os_error() == Some(libc::EIO) {
            "; dm-verity refused a block (the partition does not match the root hash) \
             or the disk could not be read"
                .to_string()
        } else {
            modules.hint()
        };
        Stage1Error::MountRoot {
            device: verity_node.clone(),
            fstype: cfg.root_fstype.clone(),
            source,
            detail,
        }
    })?;

    mount_data(&cfg, new_root, deadline)?;
    say(&format!(
        "slot {slot} root verified and mounted in {} ms, switching root",
        started.elapsed().as_millis()
    ));
    switch_to(new_root)
}

fn read(path: &'static str) -> Result<String, Stage1Error> {
    std::fs::read_to_string(path).map_err(|source| Stage1Error::Read { path, source })
}

fn mount_api_filesystems() -> Result<(), Stage1Error> {
    let hardened = MountFlags::MS_NOSUID | MountFlags::MS_NODEV | MountFlags::MS_NOEXEC;
    let api: [(&'static str, &'static str, MountFlags, Option<&str>); 3] = [
        ("proc", "/proc", hardened, None),
        ("sysfs", "/sys", hardened, None),
        ("devtmpfs", DEV, MountFlags::MS_NOSUID, Some("mode=0755")),
    ];
    for (fstype, target, flags, data) in api {
        mount::mount(fstype, Path::new(target), fstype, flags, data)
            .map_err(|source| Stage1Error::MountApi { fstype, target, source })?;
    }
    Ok(())
}

/// The slot named by the last `basalt.slot=` on the kernel command line
/// (later arguments override earlier ones, as for the kernel's own).
pub fn slot_from_cmdline(cmdline: &str) -> Result<Slot, Stage1Error> {
    let value = cmdline.split_whitespace().filter_map(|arg| arg.strip_prefix(SLOT_ARG)).next_back();
    match value {
        Some(v) => v.parse().map_err(Stage1Error::BadSlotArg),
        None => Err(Stage1Error::NoSlotArg { cmdline: cmdline.trim().to_string() }),
    }
}

/// The device-mapper name of the slot's verified root, e.g.
/// `rootfs_a-verity`; stage 1 also creates `/dev/mapper/<name>`.
pub fn verity_device_name(slot: Slot) -> String {
    format!("{}-verity", slot.root_partlabel())
}

/// The dm-verity table line for a partition `dev` (`major:minor`) that
/// holds both the data and, after it, the hash tree.
///
/// No optional arguments: on a block that does not match its hash,
/// dm-verity's default is to fail that read with EIO, which is what the
/// design asks for (a tampered block is an I/O error, never silently read).
/// `restart_on_corruption` would instead reboot the machine on the first
/// bad block of any file, turning one corrupted asset into a boot loop
/// that burns the slot's tries; with EIO, stage 2 and the health checks
/// decide, and a broken slot still falls back through boot assessment.
pub fn verity_target(v: &VerityParams, dev: &str) -> Result<Target, Stage1Error> {
    let bad = |why: String| Stage1Error::BadVerityParams(why);
    for (what, size) in
        [("data_block_size", v.data_block_size), ("hash_block_size", v.hash_block_size)]
    {
        if !size.is_power_of_two() || size < 512 {
            return Err(bad(format!("{what} {size} is not a power of two of at least 512")));
        }
    }
    if v.data_blocks == 0 {
        return Err(bad("data_blocks is 0".into()));
    }
    let is_hex = |s: &str| s.len().is_multiple_of(2) && s.bytes().all(|b| b.is_ascii_hexdigit());
    if v.root_hash.is_empty() || !is_hex(&v.root_hash) {
        return Err(bad(format!("root_hash {:?} is not hex", v.root_hash)));
    }
    if !is_hex(&v.salt) {
        return Err(bad(format!("salt {:?} is not hex", v.salt)));
    }
    if v.algorithm.is_empty()
        || !v.algorithm.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(bad(format!("algorithm {:?} is not a hash name", v.algorithm)));
    }
    if !v.hash_offset.is_multiple_of(u64::from(v.hash_block_size)) {
        return Err(bad(format!(
            "hash_offset {} is not a multiple of hash_block_size {}",
            v.hash_offset, v.hash_block_size
        )));
    }
    let data_bytes = v.data_blocks.checked_mul(u64::from(v.data_block_size));
    if data_bytes.is_none_or(|b| b > v.hash_offset) {
        return Err(bad(format!(
            "the hash tree at {} overlaps the {} data blocks",
            v.hash_offset, v.data_blocks
        )));
    }
    let length = v.data_blocks * u64::from(v.data_block_size / 512);
    let salt = if v.salt.is_empty() { "-" } else { v.salt.as_str() };
    Ok(Target {
        sector_start: 0,
        length,
        target_type: "verity".into(),
        params: format!(
            "1 {dev} {dev} {} {} {} {} {} {} {salt}",
            v.data_block_size,
            v.hash_block_size,
            v.data_blocks,
            v.hash_start_block(),
            v.algorithm,
            v.root_hash
        ),
    })
}

/// Creates, loads and resumes the read-only verity device `name`, and
/// returns its `/dev/mapper/<name>` node.
fn activate_verity(
    name: &str,
    target: &Target,
    modules: &ModuleReport,
) -> Result<PathBuf, Stage1Error> {
    let dm_err = |step: &'static str, detail: String| {
        move |source: io::Error| Stage1Error::DeviceMapper {
            step,
            name: name.to_string(),
            source,
            detail,
        }
    };
    let control = Control::open(Path::new(DM_CONTROL))
        .map_err(dm_err("open /dev/mapper/control", modules.hint()))?;
    control.create(name).map_err(dm_err("DM_DEV_CREATE", String::new()))?;
    let table =
        format!("; table: 0 {} verity {}; the kernel log says why", target.length, target.params);
    control
        .load_table(name, std::slice::from_ref(target), true)
        .map_err(dm_err("DM_TABLE_LOAD", table))?;
    let reply =
        control.resume(name, true).map_err(dm_err("DM_DEV_SUSPEND (resume)", String::new()))?;
    let node = Path::new(DEV).join("mapper").join(name);
    dm::make_block_node(&node, reply.dev)
        .map_err(dm_err("mknod", format!(" ({})", node.display())))?;
    say(&format!("dm-verity {} ({}) is up", node.display(), reply.dev));
    Ok(node)
}

/// Mounts the data partition at `DATA_MOUNT` below `new_root`, or a tmpfs.
///
/// A missing or unmountable data partition does not stop the boot: with
/// `/data` as a tmpfs the device still comes up, its services run (without
/// their saved state), it answers on the network and can take an update
/// that repairs it, where rebooting would only fail the same way in both
/// slots. The console line says so; stage 2 sees `tmpfs` at `/data` in
/// `/proc/self/mounts`.
fn mount_data(cfg: &SlotConfig, new_root: &Path, deadline: Instant) -> Result<(), Stage1Error> {
    let target = new_root.join(DATA_MOUNT.trim_start_matches('/'));
    let mounted = match wait_for(deadline, POLL_INTERVAL, || find_partition(DATA_LABEL)) {
        Ok(dev) => {
            // Device files and set-id programs have no business on the
            // writable partition; noatime spares the flash.
            let flags = MountFlags::MS_NODEV | MountFlags::MS_NOSUID | MountFlags::MS_NOATIME;
            let node = dev.node(Path::new(DEV));
            match mount::mount(&node.to_string_lossy(), &target, &cfg.data_fstype, flags, None) {
                Ok(()) => Ok(format!("{} ({}) mounted at {DATA_MOUNT}", dev.name, cfg.data_fstype)),
                Err(e) => Err(format!(
                    "mounting {} ({}) at {DATA_MOUNT} failed: {e}",
                    node.display(),
                    cfg.data_fstype
                )),
            }
        }
        Err(_) => Err(format!("no partition PARTLABEL={DATA_LABEL}")),
    };
    match mounted {
        Ok(line) => say(&line),
        Err(why) => {
            say(&format!(
                "WARNING: {why}; {DATA_MOUNT} is a tmpfs for this boot and nothing written there survives a reboot"
            ));
            mount::mount(
                "tmpfs",
                &target,
                "tmpfs",
                MountFlags::MS_NODEV | MountFlags::MS_NOSUID,
                Some("mode=0755"),
            )
            .map_err(|source| Stage1Error::MountDataFallback { target: target.clone(), source })?;
        }
    }
    Ok(())
}

/// The partition labelled `label`, once devtmpfs has its node too (sysfs
/// shows a device a moment before its `/dev` node exists).
fn find_partition(label: &str) -> io::Result<Option<BlockDev>> {
    let dev = block::find_by_partlabel(Path::new(SYS_CLASS_BLOCK), label)?;
    Ok(dev.filter(|d| d.node(Path::new(DEV)).exists()))
}

/// Calls `lookup` every `interval` until it finds something or `deadline`
/// passes (it is always called at least once). Lookup errors count as "not
/// yet"; on timeout the last one is returned.
fn wait_for<T>(
    deadline: Instant,
    interval: Duration,
    mut lookup: impl FnMut() -> io::Result<Option<T>>,
) -> Result<T, Option<io::Error>> {
    let mut last_err = None;
    loop {
        match lookup() {
            Ok(Some(found)) => return Ok(found),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(last_err);
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// What loading the configured modules did.
#[derive(Debug, Default, PartialEq, Eq)]
struct ModuleReport {
    /// Loaded now.
    new: usize,
    /// Already loaded.
    present: usize,
    /// Paths of the modules that failed.
    failed: Vec<String>,
}

impl ModuleReport {
    /// A suffix for the error of a later step, naming the modules that did
    /// not load: a module is required exactly when a step needs it.
    fn hint(&self) -> String {
        if self.failed.is_empty() {
            String::new()
        } else {
            format!("; these modules did not load: {}", self.failed.join(", "))
        }
    }
}

/// Loads every module in order with `load`, reporting each failure through
/// `on_failure` and going on: the list may hold modules for hardware this
/// unit lacks, and a module that a later step really needs makes that step
/// fail with this report in its message.
fn load_modules(
    modules: &[String],
    mut load: impl FnMut(&Path) -> io::Result<Loaded>,
    mut on_failure: impl FnMut(&str, &io::Error),
) -> ModuleReport {
    let mut report = ModuleReport::default();
    for m in modules {
        let path = Path::new(m);
        let result = if path.is_absolute() {
            load(path)
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidInput, "not an absolute path"))
        };
        match result {
            Ok(Loaded::New) => report.new += 1,
            Ok(Loaded::AlreadyPresent) => report.present += 1,
            Err(e) => {
                on_failure(m, &e);
                report.failed.push(m.clone());
            }
        }
    }
    report
}

/// Moves the API filesystems into `new_root`, frees the initramfs, makes
/// `new_root` the root and execs stage 2 with this process's arguments.
fn switch_to(new_root: &Path) -> Result<Infallible, Stage1Error> {
    for from in [DEV, "/proc", "/sys"] {
        let to = new_root.join(from.trim_start_matches('/'));
        mount::move_mount(Path::new(from), &to).map_err(|source| Stage1Error::MoveMount {
            from,
            to,
            source,
        })?;
    }
    // The initramfs stays in RAM until its files are gone; nothing can
    // reach them after the switch. Only ever on a RAM filesystem.
    let root = Path::new("/");
    match (mount::is_ram_backed(root), root.symlink_metadata()) {
        (Ok(true), Ok(meta)) => {
            let errors = remove_tree_on_device(root, meta.dev(), new_root);
            if errors > 0 {
                say(&format!("could not delete {errors} initramfs entries; they stay in RAM"));
            }
        }
        _ => say("/ is not a RAM filesystem; leaving its files alone"),
    }
    mount::switch_root(new_root).map_err(|source| Stage1Error::SwitchRoot { source })?;
    let source = std::process::Command::new(NEXT_INIT)
        .arg0(NEXT_INIT)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(Stage1Error::Exec { source })
}

/// Deletes everything below `dir` that lives on device `dev`, except `keep`,
/// without crossing into other mounts (as busybox `switch_root` does).
/// Returns how many entries could not be deleted.
fn remove_tree_on_device(dir: &Path, dev: u64, keep: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 1 };
    let mut errors = 0;
    for entry in entries {
        let Ok(entry) = entry else {
            errors += 1;
            continue;
        };
        let path = entry.path();
        if path == keep {
            continue;
        }
        let Ok(meta) = path.symlink_metadata() else {
            errors += 1;
            continue;
        };
        if meta.is_dir() {
            if meta.dev() != dev {
                continue;
            }
            errors += remove_tree_on_device(&path, dev, keep);
            errors += usize::from(std::fs::remove_dir(&path).is_err());
        } else {
            errors += usize::from(std::fs::remove_file(&path).is_err());
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> VerityParams {
        VerityParams {
            root_hash: "4392712ba01368efdf14b05c76f9e4df0d53664630b5d48632ed17a137f39076".into(),
            salt: "a1b2".into(),
            algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 256,
            hash_offset: 1048576,
        }
    }

    #[test]
    fn the_slot_comes_from_the_last_basalt_slot_argument() {
        assert_eq!(slot_from_cmdline("console=ttyS0 basalt.slot=a panic=-1\n").unwrap(), Slot::A);
        assert_eq!(slot_from_cmdline("basalt.slot=a basalt.slot=b").unwrap(), Slot::B);
        assert!(matches!(slot_from_cmdline("basalt.slot=c"), Err(Stage1Error::BadSlotArg(_))));
        assert!(matches!(slot_from_cmdline("basalt.slot="), Err(Stage1Error::BadSlotArg(_))));
        let e = slot_from_cmdline("console=ttyS0 xbasalt.slot=a\n").unwrap_err();
        assert!(matches!(e, Stage1Error::NoSlotArg { .. }));
        assert!(e.to_string().contains("\"console=ttyS0 xbasalt.slot=a\""), "{e}");
    }

    #[test]
    fn the_verity_table_covers_the_data_and_starts_the_tree_after_the_superblock() {
        let t = verity_target(&params(), "254:2").unwrap();
        assert_eq!(t.sector_start, 0);
        assert_eq!(t.length, 256 * 8);
        assert_eq!(t.target_type, "verity");
        assert_eq!(
            t.params,
            "1 254:2 254:2 4096 4096 256 257 sha256 \
             4392712ba01368efdf14b05c76f9e4df0d53664630b5d48632ed17a137f39076 a1b2"
        );
        let unsalted = VerityParams { salt: String::new(), ..params() };
        assert!(verity_target(&unsalted, "254:2").unwrap().params.ends_with(" -"));
    }

    #[test]
    fn verity_params_that_could_inject_table_arguments_are_refused() {
        let cases = [
            VerityParams { root_hash: "ab cd".into(), ..params() },
            VerityParams { root_hash: String::new(), ..params() },
            VerityParams { salt: "a1 restart_on_corruption".into(), ..params() },
            VerityParams { algorithm: "sha256 1".into(), ..params() },
            VerityParams { data_block_size: 1000, ..params() },
            VerityParams { hash_block_size: 256, ..params() },
            VerityParams { data_blocks: 0, ..params() },
            VerityParams { hash_offset: 1048577, ..params() },
            VerityParams { hash_offset: 4096, ..params() },
            VerityParams { data_blocks: u64::MAX, ..params() },
        ];
        for v in cases {
            assert!(
                matches!(verity_target(&v, "1:2"), Err(Stage1Error::BadVerityParams(_))),
                "{v:?}"
            );
        }
    }

    #[test]
    fn the_verity_device_is_named_after_the_partition() {
        assert_eq!(verity_device_name(Slot::A), "rootfs_a-verity");
        assert_eq!(verity_device_name(Slot::B), "rootfs_b-verity");
    }

    #[test]
    fn module_failures_are_reported_and_loading_goes_on() {
        let modules: Vec<String> = ["/m/virtio.ko", "relative.ko", "/m/missing.ko", "/m/dm-mod.ko"]
            .map(String::from)
            .to_vec();
        let mut tried = Vec::new();
        let mut failures = Vec::new();
        let report = load_modules(
            &modules,
            |p| {
                tried.push(p.to_path_buf());
                match p.to_str() {
                    Some("/m/missing.ko") => Err(io::Error::from_raw_os_error(libc::ENOENT)),
                    Some("/m/dm-mod.ko") => Ok(Loaded::AlreadyPresent),
                    _ => Ok(Loaded::New),
                }
            },
            |m, e| failures.push(format!("{m}: {e}")),
        );
        assert_eq!(
            tried,
            [Path::new("/m/virtio.ko"), Path::new("/m/missing.ko"), Path::new("/m/dm-mod.ko")]
        );
        assert_eq!(report.new, 1);
        assert_eq!(report.present, 1);
        assert_eq!(report.failed, ["relative.ko", "/m/missing.ko"]);
        assert_eq!(failures.len(), 2);
        assert!(failures[1].starts_with("/m/missing.ko: No such file"), "{failures:?}");
        assert_eq!(report.hint(), "; these modules did not load: relative.ko, /m/missing.ko");
        assert_eq!(ModuleReport::default().hint(), "");
    }

    #[test]
    fn waiting_polls_until_found_and_reports_the_last_error_on_timeout() {
        let mut calls = 0;
        let found =
            wait_for(Instant::now() + Duration::from_secs(5), Duration::from_millis(1), || {
                calls += 1;
                Ok((calls == 3).then_some("vda2"))
            });
        assert_eq!(found.unwrap(), "vda2");
        assert_eq!(calls, 3);

        let start = Instant::now();
        let mut calls = 0;
        let timed_out =
            wait_for::<()>(start + Duration::from_millis(30), Duration::from_millis(5), || {
                calls += 1;
                Err(io::Error::from_raw_os_error(libc::ENOENT))
            });
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(calls >= 2);
        assert_eq!(timed_out.unwrap_err().unwrap().raw_os_error(), Some(libc::ENOENT));

        // A zero wait still looks once.
        let mut calls = 0;
        assert!(wait_for::<()>(Instant::now(), Duration::from_millis(5), || {
            calls += 1;
            Ok(None)
        })
        .unwrap_err()
        .is_none());
        assert_eq!(calls, 1);
    }

    #[test]
    fn freeing_the_initramfs_keeps_the_new_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["lib/modules/k/kernel", "etc/basalt", "newroot/data"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("init"), b"x").unwrap();
        std::fs::write(root.join("lib/modules/k/kernel/virtio.ko"), b"x").unwrap();
        std::fs::write(root.join("etc/basalt/slot.toml"), b"x").unwrap();
        std::fs::write(root.join("newroot/data/keep"), b"x").unwrap();
        std::os::unix::fs::symlink("/newroot", root.join("link")).unwrap();
        let dev = root.symlink_metadata().unwrap().dev();

        assert_eq!(remove_tree_on_device(root, dev, &root.join("newroot")), 0);
        let left: Vec<_> =
            std::fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["newroot"]);
        assert!(root.join("newroot/data/keep").exists());
        // Only the symlink went, not what it points at.
        assert!(root.join("newroot").is_dir());
    }

    #[test]
    fn errors_print_as_one_line_with_their_context() {
        let e = Stage1Error::DeviceMapper {
            step: "DM_TABLE_LOAD",
            name: "rootfs_a-verity".into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
            detail: "; the kernel log says why".into(),
        };
        let s = e.to_string();
        assert!(
            s.starts_with(
                "device-mapper DM_TABLE_LOAD for rootfs_a-verity failed: Invalid argument"
            ),
            "{s}"
        );
        let e = Stage1Error::PartitionTimeout {
            label: "rootfs_b".into(),
            waited_ms: 5000,
            detail: String::new(),
        };
        assert_eq!(e.to_string(), "partition PARTLABEL=rootfs_b did not appear within 5000 ms");
        let bad_config = SlotConfig::from_toml("image = 3\n").unwrap_err();
        assert!(!Stage1Error::from(bad_config).to_string().is_empty());
    }
}
