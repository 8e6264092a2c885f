//! Names of systemd-boot Type #1 entries, with Automatic Boot Assessment
//! try counters.
//!
//! An entry file is `loader/entries/<slot>[+<left>[-<done>]].conf`.
//! systemd-boot decrements `left` and increments `done` by renaming the file
//! before it boots the entry; an entry at `+0-N` is bad and sorts last. A
//! blessed entry has no counter at all.

use std::fmt;

use crate::slot::Slot;

/// Where the boot entries live on the ESP.
pub const ENTRIES_DIR: &str = "loader/entries";

/// The try counter of an entry that has not been blessed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriesCounter {
    left: u32,
    done: Option<u32>,
}

impl TriesCounter {
    /// A fresh counter: `left` tries, none used (`+left`).
    pub fn fresh(left: u32) -> TriesCounter {
        TriesCounter { left, done: None }
    }

    /// A counter with both fields, `+left-done`.
    pub fn new(left: u32, done: u32) -> TriesCounter {
        TriesCounter { left, done: Some(done) }
    }

    /// Tries the bootloader still grants this entry.
    pub fn tries_left(&self) -> u32 {
        self.left
    }

    /// Tries already used.
    pub fn tries_done(&self) -> u32 {
        self.done.unwrap_or(0)
    }

    /// True when no tries are left: the bootloader treats the entry as bad.
    pub fn is_bad(&self) -> bool {
        self.left == 0
    }
}

/// The file name of one slot's boot entry, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntryName {
    /// The slot this entry boots.
    pub slot: Slot,
    /// `None` once blessed; otherwise the try counter.
    pub counter: Option<TriesCounter>,
}

/// The state of a boot entry as Automatic Boot Assessment sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// No counter: known good.
    Good,
    /// A counter with tries left: on trial.
    Indeterminate,
    /// A counter at zero: the bootloader will not pick it while another
    /// entry is usable.
    Bad,
}

impl BootEntryName {
    /// A blessed entry for `slot`: `<slot>.conf`.
    pub fn blessed(slot: Slot) -> BootEntryName {
        BootEntryName { slot, counter: None }
    }

    /// An entry on trial with `tries` boots to prove itself: `<slot>+N.conf`.
    pub fn on_trial(slot: Slot, tries: u32) -> BootEntryName {
        BootEntryName { slot, counter: Some(TriesCounter::fresh(tries)) }
    }

    /// The same entry with the counter removed, as blessing renames it.
    pub fn bless(self) -> BootEntryName {
        BootEntryName { slot: self.slot, counter: None }
    }

    /// The same entry marked bad (`+0-N`), as a failed boot leaves it.
    pub fn mark_bad(self) -> BootEntryName {
        let done = self.counter.map(|c| c.tries_done() + c.tries_left()).unwrap_or(1);
        BootEntryName { slot: self.slot, counter: Some(TriesCounter::new(0, done.max(1))) }
    }

    /// What the bootloader makes of the entry.
    pub fn state(&self) -> EntryState {
        match self.counter {
            None => EntryState::Good,
            Some(c) if c.is_bad() => EntryState::Bad,
            Some(_) => EntryState::Indeterminate,
        }
    }

    /// The entry's id as systemd-boot reports it in `LoaderEntrySelected`:
    /// the file name without the counter, with `.conf`.
    pub fn id(&self) -> String {
        format!("{}.conf", self.slot)
    }

    /// Parses a file name such as `a+3.conf`, `b+0-3.conf` or `a.conf`.
    /// Returns `None` for any file that is not a basalt slot entry.
    pub fn parse(file_name: &str) -> Option<BootEntryName> {
        let stem = file_name.strip_suffix(".conf")?;
        let (slot_part, counter_part) = match stem.split_once('+') {
            Some((s, c)) => (s, Some(c)),
            None => (stem, None),
        };
        let slot = slot_part.parse::<Slot>().ok()?;
        let counter = match counter_part {
            None => None,
            Some(c) => {
                let (left, done) = match c.split_once('-') {
                    Some((l, d)) => (l, Some(d)),
                    None => (c, None),
                };
                let left = parse_decimal(left)?;
                let done = match done {
                    Some(d) => Some(parse_decimal(d)?),
                    None => None,
                };
                Some(TriesCounter { left, done })
            }
        };
        Some(BootEntryName { slot, counter })
    }
}

fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for BootEntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.slot)?;
        if let Some(c) = self.counter {
            write!(f, "+{}", c.left)?;
            if let Some(d) = c.done {
                write!(f, "-{d}")?;
            }
        }
        f.write_str(".conf")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_every_counter_form() {
        for name in ["a.conf", "b+3.conf", "a+2-1.conf", "b+0-3.conf"] {
            let parsed = BootEntryName::parse(name).unwrap();
            assert_eq!(parsed.to_string(), name);
        }
        let e = BootEntryName::parse("b+2-1.conf").unwrap();
        assert_eq!(e.slot, Slot::B);
        assert_eq!(e.state(), EntryState::Indeterminate);
        assert_eq!(e.bless().to_string(), "b.conf");
        assert_eq!(e.mark_bad().to_string(), "b+0-3.conf");
        assert_eq!(BootEntryName::parse("a+0-3.conf").unwrap().state(), EntryState::Bad);
        assert_eq!(BootEntryName::parse("a.conf").unwrap().state(), EntryState::Good);
    }

    #[test]
    fn rejects_foreign_entries() {
        for name in ["c.conf", "a+x.conf", "a+1-.conf", "a", "a+.conf", "debian.conf", "a+-1.conf"]
        {
            assert_eq!(BootEntryName::parse(name), None, "{name}");
        }
    }
}

/// The sort key every basalt entry carries, so that systemd-boot orders
/// the slots by `version` alone.
pub const SORT_KEY: &str = "basalt";

/// The content of one Type #1 boot entry file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryConf {
    /// Menu title.
    pub title: String,
    /// The image version; systemd-boot boots the highest version among
    /// entries that still have tries left.
    pub version: String,
    /// Path of the kernel on the ESP (`/a/vmlinuz`).
    pub linux: String,
    /// Path of the initrd on the ESP (`/a/initrd`).
    pub initrd: String,
    /// Kernel command line; carries `basalt.slot=`.
    pub options: String,
}

impl EntryConf {
    /// The entry for `slot`, with the board's command line and the image's
    /// name and version.
    pub fn for_slot(slot: Slot, image: &str, version: &str, cmdline: &str) -> EntryConf {
        let options = if cmdline.is_empty() {
            format!("basalt.slot={slot}")
        } else {
            format!("{cmdline} basalt.slot={slot}")
        };
        EntryConf {
            title: format!("{image} {version} (slot {slot})"),
            version: version.to_string(),
            linux: format!("/{}/vmlinuz", slot.esp_dir()),
            initrd: format!("/{}/initrd", slot.esp_dir()),
            options,
        }
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        format!(
            "title {}\nversion {}\nsort-key {}\nlinux {}\ninitrd {}\noptions {}\n",
            self.title, self.version, SORT_KEY, self.linux, self.initrd, self.options
        )
    }

    /// Reads the keys basalt writes; other keys are ignored, as
    /// systemd-boot ignores unknown keys.
    pub fn parse(text: &str) -> Option<EntryConf> {
        let mut conf = EntryConf {
            title: String::new(),
            version: String::new(),
            linux: String::new(),
            initrd: String::new(),
            options: String::new(),
        };
        for line in text.lines() {
            let line = line.trim();
            let (key, value) = match line.split_once(char::is_whitespace) {
                Some((k, v)) => (k, v.trim().to_string()),
                None => continue,
            };
            match key {
                "title" => conf.title = value,
                "version" => conf.version = value,
                "linux" => conf.linux = value,
                "initrd" => conf.initrd = value,
                "options" => conf.options = value,
                _ => {}
            }
        }
        (!conf.linux.is_empty()).then_some(conf)
    }
}

/// Compares two `version` strings the way systemd-boot's
/// `strverscmp_improved` does for the versions basalt writes: runs of
/// digits compare as numbers, other characters one by one, a `~` sorts
/// before everything (even the end), and a longer version with an equal
/// prefix is newer. (`1.10.0` is newer than `1.9.0`; `1.0.0~rc1` is older
/// than `1.0.0`.)
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        // Skip characters that are neither alphanumeric nor separators we
        // order by, as systemd-boot does.
        let skip = |s: &[u8]| -> usize {
            s.iter().take_while(|c| !c.is_ascii_alphanumeric() && !b"~-^.".contains(c)).count()
        };
        a = &a[skip(a)..];
        b = &b[skip(b)..];
        match (a.first(), b.first()) {
            (Some(b'~'), Some(b'~')) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            // At the end of one string, the longer one is newer.
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            _ => {}
        }
        let mut separated = false;
        for sep in [b'-', b'^', b'.'] {
            match (a[0] == sep, b[0] == sep) {
                (false, false) => continue,
                (true, false) => return Ordering::Less,
                (false, true) => return Ordering::Greater,
                (true, true) => {
                    a = &a[1..];
                    b = &b[1..];
                    separated = true;
                    break;
                }
            }
        }
        if separated {
            continue;
        }
        let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
        let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
        if da > 0 && db > 0 {
            let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
            let order = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
            if order != Ordering::Equal {
                return order;
            }
            a = &a[da..];
            b = &b[db..];
            continue;
        }
        if da > 0 {
            return Ordering::Greater;
        }
        if db > 0 {
            return Ordering::Less;
        }
        let la = a.iter().take_while(|c| c.is_ascii_alphabetic()).count();
        let lb = b.iter().take_while(|c| c.is_ascii_alphabetic()).count();
        let order = a[..la].cmp(&b[..lb]);
        if order != Ordering::Equal {
            return order;
        }
        a = &a[la..];
        b = &b[lb..];
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros..]
}

/// The entry systemd-boot boots among basalt's entries, each given with
/// its `version`: entries with no tries left sort last, then the highest
/// version wins (every basalt entry has the same `sort-key`), then the
/// higher id (`b.conf` over `a.conf`). `None` when there is no entry.
///
/// This models systemd-boot 252's `boot_entry_compare` for the entries
/// basalt writes, so host tests can ask which slot a machine would boot
/// after any sequence of writes.
pub fn systemd_boot_pick(entries: &[(BootEntryName, String)]) -> Option<&BootEntryName> {
    entries
        .iter()
        .min_by(|(a, va), (b, vb)| {
            let bad_last = (a.state() == EntryState::Bad).cmp(&(b.state() == EntryState::Bad));
            bad_last
                .then_with(|| compare_versions(vb, va))
                .then_with(|| b.slot.name().cmp(a.slot.name()))
                .then_with(|| {
                    let left = |e: &BootEntryName| e.counter.map_or(u32::MAX, |c| c.tries_left());
                    left(b).cmp(&left(a))
                })
        })
        .map(|(name, _)| name)
}

#[cfg(test)]
mod pick_tests {
    use super::*;
    use std::cmp::Ordering::*;

    #[test]
    fn versions_compare_like_systemd() {
        assert_eq!(compare_versions("1.10.0", "1.9.0"), Greater);
        assert_eq!(compare_versions("2.0.0", "10.0.0"), Less);
        assert_eq!(compare_versions("1.0.0", "1.0.0"), Equal);
        assert_eq!(compare_versions("1.0.0~rc1", "1.0.0"), Less);
        assert_eq!(compare_versions("1.0.0", "1.0"), Greater);
        assert_eq!(compare_versions("1.0.01", "1.0.1"), Equal);
        assert_eq!(compare_versions("1.0a", "1.0b"), Less);
        assert_eq!(compare_versions("1.", "1."), Equal);
        assert_eq!(compare_versions("1.0-1", "1.0.1"), Less);
        // Not semver's order: a pre-release with `-` is newer here, so the
        // agent refuses versions on which the two orders disagree.
        assert_eq!(compare_versions("1.0.0-rc1", "1.0.0"), Greater);
    }

    #[test]
    fn picks_like_systemd_boot() {
        let e = |n: &str, v: &str| (BootEntryName::parse(n).unwrap(), v.to_string());
        // Seen under OVMF: a blessed 2.0.0 beside b+3 at 10.0.0 boots b.
        let v = [e("a.conf", "2.0.0"), e("b+3.conf", "10.0.0")];
        assert_eq!(systemd_boot_pick(&v).unwrap().slot, Slot::B);
        let v = [e("a.conf", "10.0.0"), e("b+3.conf", "2.0.0")];
        assert_eq!(systemd_boot_pick(&v).unwrap().slot, Slot::A);
        // A bad entry sorts last whatever its version.
        let v = [e("a.conf", "1.0.0"), e("b+0-3.conf", "2.0.0")];
        assert_eq!(systemd_boot_pick(&v).unwrap().slot, Slot::A);
        // Only bad entries: still one is picked (systemd-boot boots it).
        let v = [e("a+0-1.conf", "1.0.0")];
        assert_eq!(systemd_boot_pick(&v).unwrap().slot, Slot::A);
        assert_eq!(systemd_boot_pick(&[]), None);
    }
}

#[cfg(test)]
mod conf_tests {
    use super::*;

    #[test]
    fn entry_text_round_trips() {
        let c = EntryConf::for_slot(Slot::B, "minimal", "1.2.0", "console=ttyS0");
        assert_eq!(c.options, "console=ttyS0 basalt.slot=b");
        assert_eq!(EntryConf::parse(&c.to_text()), Some(c));
    }
}
