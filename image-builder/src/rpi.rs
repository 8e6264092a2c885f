//! The Raspberry Pi 4/5 image (`bootloader = "rpi-tryboot"`): what goes
//! into its three FAT partitions.
//!
//! The disk is GPT (docs/decisions.md says why), partitions numbered from
//! 1 as `autoboot.txt`'s `boot_partition` counts them:
//!
//! | # | PARTLABEL | content |
//! |---|-----------|---------|
//! | 1 | autoboot | FAT: `autoboot.txt` only |
//! | 2 | boot_a   | FAT: firmware files, `config.txt`, slot a's `vmlinuz`, `initrd`, `cmdline.txt`, `basalt.txt` |
//! | 3 | boot_b   | FAT: the same firmware files and `config.txt`; slot b's files once it is filled |
//! | 4, 5 | rootfs_a, rootfs_b | squashfs + dm-verity, as on every board |
//! | 6 | data | ext4 |
//!
//! The firmware's rules followed here (Raspberry Pi documentation,
//! "autoboot.txt", "config.txt" and "Fail-safe OS updates (TRYBOOT)"):
//! `autoboot.txt` is read from the first FAT partition and at most 512
//! bytes of it; a bootable partition is FAT; with `tryboot_a_b=1` the
//! firmware reads the selected partition's own `config.txt`, so each slot's
//! partition carries a whole boot set (firmware, device trees, kernel,
//! initramfs, command line). The text of `autoboot.txt`, `cmdline.txt` and
//! `basalt.txt` comes from [`basalt_bundle::tryboot`], the code the device's
//! back-end reads and rewrites them with.
//!
//! An update rewrites only a slot's `vmlinuz`, `initrd`, `cmdline.txt` and
//! `basalt.txt`; the firmware files and `config.txt` stay those of the
//! factory image. A slot that is empty at the factory still gets them, so
//! that the first update needs nothing else.

use std::fs;
use std::path::{Path, PathBuf};

use basalt_bundle::tryboot::{
    cmdline_txt, config_txt, Autoboot, SlotTxt, AUTOBOOT, AUTOBOOT_MAX, CMDLINE_TXT, CONFIG_TXT,
    INITRD_FILE, KERNEL_FILE, SLOT_TXT,
};
use basalt_bundle::Slot;

use crate::board::{TrybootSection, TRYBOOT_PARTITIONS};
use crate::build::FilledSlot;

/// Size of partition 1, which holds only `autoboot.txt`: the smallest
/// FAT32 our writer makes (65525 clusters of 512 bytes, plus its tables),
/// rounded up to the 1 MiB alignment of the partitions.
pub const AUTOBOOT_MIB: u64 = 33;

/// Files basalt writes into a slot's boot partition; a firmware file of
/// the same name would be overwritten, so it is refused.
pub const OWN_FILES: [&str; 5] = [CONFIG_TXT, CMDLINE_TXT, SLOT_TXT, KERNEL_FILE, INITRD_FILE];

/// Why the Pi's boot partitions could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum RpiError {
    /// A firmware file or folder could not be read.
    #[error("cannot read firmware file {path} (named in [tryboot] firmware of {board}): {source}")]
    ReadFirmware {
        /// The file.
        path: PathBuf,
        /// The board file.
        board: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A firmware file has the name of a file basalt writes.
    #[error(
        "firmware file {path} (named in [tryboot] firmware of {board}) would replace the {name} \
         basalt writes; remove it from the list (put config.txt lines in [tryboot] config)"
    )]
    Collides {
        /// The file.
        path: PathBuf,
        /// The board file.
        board: PathBuf,
        /// The name it collides with.
        name: String,
    },
    /// Two firmware entries give the same file.
    #[error("[tryboot] firmware of {board} gives {name} twice; keep one (FAT names ignore case)")]
    Duplicate {
        /// The board file.
        board: PathBuf,
        /// The file name inside the partition.
        name: String,
    },
    /// `autoboot.txt` came out longer than the firmware reads.
    #[error("autoboot.txt would be {0} bytes, but the firmware reads only {AUTOBOOT_MAX}")]
    AutobootTooLong(usize),
}

/// The firmware files of `[tryboot] firmware`, as `(path in the
/// partition, content)`: a file at the top level under its own name, a
/// folder with everything under it, in sorted order. Paths are relative to
/// the board file `board`.
pub fn firmware_files(
    t: &TrybootSection,
    board: &Path,
) -> Result<Vec<(String, Vec<u8>)>, RpiError> {
    let dir = board.parent().unwrap_or(Path::new("."));
    let read_err = |path: &Path| {
        let (path, board) = (path.to_path_buf(), board.to_path_buf());
        move |source| RpiError::ReadFirmware { path, board, source }
    };
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for f in &t.firmware {
        let full = if f.value.is_absolute() { f.value.clone() } else { dir.join(&f.value) };
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| read_err(&full)(std::io::Error::other("names no file")))?;
        let mut stack = vec![(name, full)];
        while let Some((name, path)) = stack.pop() {
            let meta = fs::metadata(&path).map_err(read_err(&path))?;
            if meta.is_dir() {
                let mut entries: Vec<_> = fs::read_dir(&path)
                    .map_err(read_err(&path))?
                    .collect::<Result<_, _>>()
                    .map_err(read_err(&path))?;
                entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
                for e in entries {
                    let child = format!("{name}/{}", e.file_name().to_string_lossy());
                    stack.push((child, e.path()));
                }
                continue;
            }
            if let Some(own) = OWN_FILES.iter().find(|o| o.eq_ignore_ascii_case(&name)) {
                return Err(RpiError::Collides {
                    path,
                    board: board.to_path_buf(),
                    name: own.to_string(),
                });
            }
            if out.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
                return Err(RpiError::Duplicate { board: board.to_path_buf(), name });
            }
            let data = fs::read(&path).map_err(read_err(&path))?;
            out.push((name, data));
        }
    }
    Ok(out)
}

/// The files of one slot's boot partition: the firmware, `config.txt`
/// and, when the slot is filled, its kernel, initramfs, `cmdline.txt` and
/// `basalt.txt` (written last on the device, so a partition without it is
/// never offered to the firmware).
pub fn boot_partition_files(
    firmware: &[(String, Vec<u8>)],
    config: &[String],
    filled: Option<&FilledSlot<'_>>,
) -> Vec<(String, Vec<u8>)> {
    let mut files = firmware.to_vec();
    files.push((CONFIG_TXT.to_string(), config_txt(config).into_bytes()));
    if let Some(f) = filled {
        files.push((KERNEL_FILE.to_string(), f.art.vmlinuz.to_vec()));
        files.push((INITRD_FILE.to_string(), f.art.initrd.clone()));
        files.push((CMDLINE_TXT.to_string(), cmdline_txt(&f.plan.cmdline, f.slot).into_bytes()));
        let txt =
            SlotTxt { image: f.plan.name.clone(), version: f.plan.version.to_string(), bad: false };
        files.push((SLOT_TXT.to_string(), txt.to_text().into_bytes()));
    }
    files
}

/// Partition 1's only file: `autoboot.txt` committing slot a's partition,
/// and a tryboot that runs it too until an update arms the other one.
pub fn autoboot_files() -> Result<Vec<(String, Vec<u8>)>, RpiError> {
    let a = TRYBOOT_PARTITIONS[0];
    let text = Autoboot { all: a, tryboot: a }.to_text();
    if text.len() > AUTOBOOT_MAX {
        return Err(RpiError::AutobootTooLong(text.len()));
    }
    Ok(vec![(AUTOBOOT.to_string(), text.into_bytes())])
}

/// The partition number of `slot`'s boot partition.
pub fn boot_partition(slot: Slot) -> u32 {
    TRYBOOT_PARTITIONS[usize::from(slot == Slot::B)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::Source;

    fn section(dir: &Path, firmware: &[&str]) -> (TrybootSection, PathBuf) {
        let list: Vec<String> = firmware.iter().map(|f| format!("{f:?}")).collect();
        let text = format!("boot_partitions = [2, 3]\nfirmware = [{}]\n", list.join(", "));
        let board = dir.join("boards/pi.toml");
        let src = Source { path: board.clone(), text };
        (src.parse().unwrap(), board)
    }

    #[test]
    fn firmware_files_and_folders_land_at_the_top_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("fw");
        fs::create_dir_all(fw.join("overlays/sub")).unwrap();
        fs::write(fw.join("start4.elf"), b"elf").unwrap();
        fs::write(fw.join("overlays/b.dtbo"), b"b").unwrap();
        fs::write(fw.join("overlays/a.dtbo"), b"a").unwrap();
        fs::write(fw.join("overlays/sub/c"), b"c").unwrap();
        fs::create_dir_all(dir.path().join("boards")).unwrap();
        let (t, board) = section(dir.path(), &["../fw/start4.elf", "../fw/overlays"]);
        let files = firmware_files(&t, &board).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["start4.elf", "overlays/a.dtbo", "overlays/b.dtbo", "overlays/sub/c"]);
        assert_eq!(files[0].1, b"elf");

        // The slot's own files follow the firmware; an empty slot gets
        // config.txt only.
        let empty = boot_partition_files(&files, &["enable_uart=1".into()], None);
        assert_eq!(empty.len(), files.len() + 1);
        let (name, config) = empty.last().unwrap();
        assert_eq!(name, CONFIG_TXT);
        assert!(String::from_utf8_lossy(config).ends_with("followkernel\nenable_uart=1\n"));
    }

    #[test]
    fn a_missing_colliding_or_doubled_firmware_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("fw");
        fs::create_dir_all(&fw).unwrap();
        fs::create_dir_all(dir.path().join("boards")).unwrap();
        fs::write(fw.join("Config.txt"), b"x").unwrap();
        fs::write(fw.join("a.dtb"), b"x").unwrap();
        let (t, board) = section(dir.path(), &["../fw/nope.elf"]);
        let e = firmware_files(&t, &board).unwrap_err().to_string();
        assert!(e.contains("nope.elf") && e.contains("[tryboot] firmware"), "{e}");
        let (t, board) = section(dir.path(), &["../fw/Config.txt"]);
        let e = firmware_files(&t, &board).unwrap_err().to_string();
        assert!(e.contains("replace the config.txt"), "{e}");
        let (t, board) = section(dir.path(), &["../fw/a.dtb", "../fw/../fw/a.dtb"]);
        let e = firmware_files(&t, &board).unwrap_err().to_string();
        assert!(e.contains("a.dtb twice"), "{e}");
    }

    #[test]
    fn autoboot_commits_slot_a_and_fits_the_firmware_limit() {
        let files = autoboot_files().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, "autoboot.txt");
        let a = Autoboot::parse(std::str::from_utf8(&files[0].1).unwrap()).unwrap();
        assert_eq!((a.all, a.tryboot), (2, 2));
        assert!(files[0].1.len() <= AUTOBOOT_MAX);
        assert_eq!((boot_partition(Slot::A), boot_partition(Slot::B)), (2, 3));
    }
}
