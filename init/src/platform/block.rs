//! Finding block devices by GPT partition label, without udev.
//!
//! The kernel publishes each partition's GPT name as `PARTNAME=` in
//! `/sys/class/block/<dev>/uevent`; that is all stage 1 and stage 2 need to
//! find `rootfs_a`, `data` or `esp`.

use std::io;
use std::path::{Path, PathBuf};

/// A block device found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name, e.g. `vda2`.
    pub name: String,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// GPT partition name, if it is a labelled partition.
    pub partname: Option<String>,
}

impl BlockDev {
    /// The device node devtmpfs creates for it (`/dev/vda2`), below `dev`.
    pub fn node(&self, dev: &Path) -> PathBuf {
        dev.join(&self.name)
    }

    /// `major:minor`, as device-mapper tables name devices.
    pub fn dev_t_str(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }
}

fn parse_uevent(text: &str) -> Option<BlockDev> {
    let mut name = None;
    let mut major = None;
    let mut minor = None;
    let mut partname = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("DEVNAME", v)) => name = Some(v.to_string()),
            Some(("MAJOR", v)) => major = v.parse().ok(),
            Some(("MINOR", v)) => minor = v.parse().ok(),
            Some(("PARTNAME", v)) => partname = Some(v.to_string()),
            _ => {}
        }
    }
    Some(BlockDev { name: name?, major: major?, minor: minor?, partname })
}

/// Every block device listed under `sys_class_block` (`/sys/class/block`),
/// sorted by name.
pub fn list(sys_class_block: &Path) -> io::Result<Vec<BlockDev>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(sys_class_block)? {
        let entry = entry?;
        if let Ok(text) = std::fs::read_to_string(entry.path().join("uevent")) {
            if let Some(dev) = parse_uevent(&text) {
                out.push(dev);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The first partition whose GPT name is `label`, if present now.
pub fn find_by_partlabel(sys_class_block: &Path, label: &str) -> io::Result<Option<BlockDev>> {
    Ok(list(sys_class_block)?.into_iter().find(|d| d.partname.as_deref() == Some(label)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_partitions_by_label_in_a_fake_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        for (name, minor, part) in
            [("vda", 0, None), ("vda1", 1, Some("esp")), ("vda2", 2, Some("rootfs_a"))]
        {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            let mut text = format!("MAJOR=254\nMINOR={minor}\nDEVNAME={name}\nDEVTYPE=partition\n");
            if let Some(p) = part {
                text.push_str(&format!("PARTN={minor}\nPARTNAME={p}\n"));
            }
            std::fs::write(d.join("uevent"), text).unwrap();
        }
        let found = find_by_partlabel(dir.path(), "rootfs_a").unwrap().unwrap();
        assert_eq!(found.name, "vda2");
        assert_eq!(found.dev_t_str(), "254:2");
        assert_eq!(found.node(Path::new("/dev")), PathBuf::from("/dev/vda2"));
        assert!(find_by_partlabel(dir.path(), "rootfs_b").unwrap().is_none());
    }
}
