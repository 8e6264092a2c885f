//! The files of a Raspberry Pi image that the builder writes and the
//! device's tryboot back-end rewrites: `autoboot.txt` on the first FAT
//! partition, and `cmdline.txt` and `basalt.txt` in each slot's boot
//! partition. One implementation for both sides, so that the factory image
//! is exactly what the device reads.
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
//! The firmware's rules (Raspberry Pi documentation, "autoboot.txt"):
//! the file is read from the first FAT partition, at most 512 bytes of it;
//! `[all]` applies always and `[tryboot]` only on a boot with the tryboot
//! flag; `boot_partition` counts partitions from 1; with `tryboot_a_b=1` the
//! firmware reads the normal `config.txt` of the partition selected (not
//! `tryboot.txt`), so the A/B switch is made per partition.

use crate::slot::Slot;

/// The file on the first FAT partition that selects the boot partition.
pub const AUTOBOOT: &str = "autoboot.txt";
/// The firmware reads at most this many bytes of `autoboot.txt`.
pub const AUTOBOOT_MAX: usize = 512;
/// The firmware's configuration in each slot's partition.
pub const CONFIG_TXT: &str = "config.txt";
/// The kernel command line in each slot's partition (the firmware's
/// default `cmdline=`).
pub const CMDLINE_TXT: &str = "cmdline.txt";
/// What basalt records about a slot in its partition.
pub const SLOT_TXT: &str = "basalt.txt";
/// The kernel's file name in a slot's partition (`kernel=` of
/// `config.txt`).
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs's file name in a slot's partition (`initramfs` of
/// `config.txt`).
pub const INITRD_FILE: &str = "initrd";

/// What `autoboot.txt` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoboot {
    /// `[all] boot_partition`: the committed partition.
    pub all: u32,
    /// `[tryboot] boot_partition`: the one a tryboot runs.
    pub tryboot: u32,
}

impl Autoboot {
    /// The file's text.
    pub fn to_text(self) -> String {
        format!(
            "[all]\ntryboot_a_b=1\nboot_partition={}\n[tryboot]\nboot_partition={}\n",
            self.all, self.tryboot
        )
    }

    /// Reads the two `boot_partition`s; `tryboot_a_b=1` must be set under
    /// `[all]`, or the firmware would look for `tryboot.txt` instead.
    pub fn parse(text: &str) -> Result<Autoboot, String> {
        if text.len() > AUTOBOOT_MAX {
            return Err(format!(
                "{} bytes, but the firmware reads only {AUTOBOOT_MAX}",
                text.len()
            ));
        }
        let (mut section, mut all, mut tryboot, mut ab) = ("all", None, None, false);
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = if name == "all" || name == "tryboot" { name } else { "other" };
                continue;
            }
            let Some((key, value)) = line.split_once('=') else { continue };
            match (section, key.trim()) {
                ("all", "tryboot_a_b") => ab = value.trim() == "1",
                (s, "boot_partition") => {
                    let n = value
                        .trim()
                        .parse::<u32>()
                        .map_err(|_| format!("boot_partition={value} is not a number"))?;
                    match s {
                        "all" => all = Some(n),
                        "tryboot" => tryboot = Some(n),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        if !ab {
            return Err("no tryboot_a_b=1 under [all]".into());
        }
        let all = all.ok_or("no boot_partition under [all]")?;
        Ok(Autoboot { all, tryboot: tryboot.unwrap_or(all) })
    }
}

/// What `basalt.txt` records about the slot in its partition. A slot
/// without the file holds no installed version and is never offered to
/// the firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTxt {
    /// The image's name.
    pub image: String,
    /// The image's version.
    pub version: String,
    /// Whether the slot failed (`state=bad`).
    pub bad: bool,
}

impl SlotTxt {
    /// The file's text.
    pub fn to_text(&self) -> String {
        let bad = if self.bad { "state=bad\n" } else { "" };
        format!("image={}\nversion={}\n{bad}", self.image, self.version)
    }

    /// Reads the file; `None` when it names no version.
    pub fn parse(text: &str) -> Option<SlotTxt> {
        let mut s = SlotTxt { image: String::new(), version: String::new(), bad: false };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("image", v)) => s.image = v.to_string(),
                Some(("version", v)) => s.version = v.to_string(),
                Some(("state", v)) => s.bad = v == "bad",
                _ => {}
            }
        }
        (!s.version.is_empty()).then_some(s)
    }
}

/// `cmdline.txt` of `slot`: the image's command line and `basalt.slot=`,
/// on one line (the firmware passes the first line to the kernel).
pub fn cmdline_txt(cmdline: &str, slot: Slot) -> String {
    if cmdline.is_empty() {
        format!("basalt.slot={slot}\n")
    } else {
        format!("{cmdline} basalt.slot={slot}\n")
    }
}

/// `config.txt` of a slot's partition: a 64-bit kernel and its initramfs
/// from the same partition, then the board's own lines. The firmware reads
/// `cmdline.txt` by default, so no `cmdline=` is written.
pub fn config_txt(extra: &[String]) -> String {
    let mut text = format!(
        "# Written by basalt: this partition's kernel, initramfs and command line.\n\
         [all]\narm_64bit=1\nkernel={KERNEL_FILE}\ninitramfs {INITRD_FILE} followkernel\n"
    );
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoboot_txt_is_the_documented_form() {
        let a = Autoboot { all: 2, tryboot: 3 };
        let text = a.to_text();
        assert_eq!(text, "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n");
        assert_eq!(Autoboot::parse(&text), Ok(a));
        assert!(Autoboot::parse("[all]\nboot_partition=2\n").unwrap_err().contains("tryboot_a_b"));
        let long = format!("{text}#{}\n", "x".repeat(600));
        assert!(Autoboot::parse(&long).unwrap_err().contains("only 512"));
        // Another filter's boot_partition does not count.
        let other = "[all]\ntryboot_a_b=1\nboot_partition=2\n[cm4]\nboot_partition=5\n";
        assert_eq!(Autoboot::parse(other), Ok(Autoboot { all: 2, tryboot: 2 }));
    }

    #[test]
    fn slot_txt_round_trips_and_needs_a_version() {
        let t = SlotTxt { image: "gw".into(), version: "1.2.0".into(), bad: true };
        assert_eq!(t.to_text(), "image=gw\nversion=1.2.0\nstate=bad\n");
        assert_eq!(SlotTxt::parse(&t.to_text()), Some(t));
        assert_eq!(SlotTxt::parse("image=gw\n"), None);
    }

    #[test]
    fn cmdline_and_config_txt() {
        assert_eq!(cmdline_txt("quiet", Slot::B), "quiet basalt.slot=b\n");
        assert_eq!(cmdline_txt("", Slot::A), "basalt.slot=a\n");
        let c = config_txt(&["enable_uart=1".into()]);
        assert!(c.ends_with(
            "arm_64bit=1\nkernel=vmlinuz\ninitramfs initrd followkernel\nenable_uart=1\n"
        ));
    }
}
