//! The U-Boot environment: its block format (CRC-32, the redundant copy's
//! flag byte, `name=value` strings) and the variables basalt keeps in it.
//! The builder writes an image's initial environment with it and the
//! device's U-Boot back-end reads and rewrites it, so both encode one way.
//!
//! Each copy is `size` bytes: a CRC-32 (little-endian) over the data,
//! then, in a redundant environment, one flag byte, then the data:
//! `name=value` strings, each ended by a NUL, the last followed by a
//! second NUL, zero-padded to the end (as `fw_setenv` writes it). Of two
//! copies with a valid CRC the one with the newer flag wins
//! ([`flag_newer`]).
//!
//! This module does no I/O: where the copies live and the order of writes
//! that survives a power cut belong to the device's back-end.

use std::collections::BTreeMap;

use crate::slot::Slot;

/// The variable that selects the slot `bootcmd` boots.
pub const SLOT_VAR: &str = "basalt_slot";
/// Non-zero while a slot is on trial: U-Boot counts boots only then.
pub const UPGRADE_AVAILABLE: &str = "upgrade_available";
/// Boots of the slot on trial so far (U-Boot increments it).
pub const BOOTCOUNT: &str = "bootcount";
/// Boots the slot on trial gets before `altbootcmd` runs instead.
pub const BOOTLIMIT: &str = "bootlimit";
/// What U-Boot runs once `bootcount` exceeds `bootlimit`.
pub const ALTBOOTCMD_VAR: &str = "altbootcmd";
/// The fallback: marks the slot on trial bad, selects the other one, ends
/// the trial, saves the environment and boots (U-Boot hush syntax).
pub const ALTBOOTCMD: &str = "if test \"${basalt_slot}\" = b; then setenv basalt_bad_b 1; \
     setenv basalt_slot a; else setenv basalt_bad_a 1; setenv basalt_slot b; fi; \
     setenv upgrade_available; setenv bootcount; saveenv; run bootcmd";
/// The variable naming the boot partition for U-Boot's `load`
/// (`<interface> <device>:<partition>`).
pub const BOOTPART_VAR: &str = "basalt_bootpart";
/// Its initial value: partition 1 (the boot partition) of MMC device 0.
/// A board whose card is another device changes it with `fw_setenv`.
pub const BOOTPART_DEFAULT: &str = "mmc 0:1";
/// The command U-Boot runs at power-on: the selected slot's command line
/// into `bootargs` (hush cannot expand `${basalt_args_${basalt_slot}}`, so
/// one branch per slot), its kernel and initrd from `/<slot>/` of the boot
/// partition, booted with `booti` and U-Boot's own device tree.
pub const BOOTCMD: &str = "if test \"${basalt_slot}\" = b; then setenv bootargs \
     \"${basalt_args_b}\"; else setenv bootargs \"${basalt_args_a}\"; fi; \
     load ${basalt_bootpart} ${kernel_addr_r} /${basalt_slot}/vmlinuz && \
     load ${basalt_bootpart} ${ramdisk_addr_r} /${basalt_slot}/initrd && \
     booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}";

/// The variable holding `slot`'s installed version.
pub fn version_var(slot: Slot) -> String {
    format!("basalt_version_{slot}")
}

/// The variable holding `slot`'s kernel command line.
pub fn args_var(slot: Slot) -> String {
    format!("basalt_args_{slot}")
}

/// The variable set when `slot` failed.
pub fn bad_var(slot: Slot) -> String {
    format!("basalt_bad_{slot}")
}

/// The bytes before the data: the CRC, and the flag byte of a redundant
/// environment.
pub fn header_len(redundant: bool) -> usize {
    if redundant {
        5
    } else {
        4
    }
}

/// The variables of an environment, sorted as U-Boot writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// An empty environment.
    pub fn new() -> Env {
        Env::default()
    }

    /// The environment of a new image with `version` in slot a, booted
    /// with `cmdline` (without `basalt.slot=`): slot a selected, no trial,
    /// `bootlimit` ready for the first update's trial.
    pub fn initial(version: &str, cmdline: &str, bootlimit: u32) -> Env {
        let mut env = Env::new();
        env.set("bootcmd", BOOTCMD);
        env.set(BOOTPART_VAR, BOOTPART_DEFAULT);
        env.set(SLOT_VAR, Slot::A.name());
        env.set(&version_var(Slot::A), version);
        env.set(&args_var(Slot::A), slot_args(cmdline, Slot::A));
        env.set(ALTBOOTCMD_VAR, ALTBOOTCMD);
        env.set(BOOTLIMIT, bootlimit.max(1).to_string());
        env
    }

    /// A variable's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// A variable read as U-Boot's `env_get_ulong(name, 10, default)`
    /// does: leading decimal digits, 0 when there are none.
    pub fn get_ulong(&self, name: &str, default: u64) -> u64 {
        match self.get(name) {
            None => default,
            Some(v) => {
                let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().unwrap_or(0)
            }
        }
    }

    /// Sets a variable.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.vars.insert(name.to_string(), value.into());
    }

    /// Deletes a variable (`setenv name`).
    pub fn remove(&mut self, name: &str) {
        self.vars.remove(name);
    }

    /// Every variable, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Reads the data area: `name=value` strings up to the double NUL.
    pub fn parse(data: &[u8]) -> Result<Env, String> {
        let mut vars = BTreeMap::new();
        let mut rest = data;
        loop {
            let end = rest.iter().position(|&b| b == 0).ok_or("no terminating NUL")?;
            if end == 0 {
                return Ok(Env { vars });
            }
            let text = std::str::from_utf8(&rest[..end])
                .map_err(|_| "a variable is not UTF-8".to_string())?;
            let (name, value) =
                text.split_once('=').ok_or_else(|| format!("{text:?} has no '='"))?;
            vars.insert(name.to_string(), value.to_string());
            rest = &rest[end + 1..];
        }
    }

    /// The data area of `len` bytes: the variables, a double NUL, zero
    /// padding (as `fw_setenv` pads).
    pub fn to_data(&self, len: usize) -> Result<Vec<u8>, String> {
        let mut data = Vec::with_capacity(len);
        for (name, value) in &self.vars {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(format!("variable {name:?} cannot be stored"));
            }
            data.extend_from_slice(name.as_bytes());
            data.push(b'=');
            data.extend_from_slice(value.as_bytes());
            data.push(0);
        }
        data.push(0);
        if data.len() > len {
            return Err(format!(
                "the variables take {} bytes but the environment holds {len}; \
                 give the board a larger environment",
                data.len()
            ));
        }
        data.resize(len, 0);
        Ok(data)
    }

    /// One whole copy of `size` bytes: CRC, the flag byte when
    /// `redundant`, the data.
    pub fn to_block(&self, size: usize, redundant: bool, flag: u8) -> Result<Vec<u8>, String> {
        let header = header_len(redundant);
        if size <= header + 1 {
            return Err(format!("an environment of {size} bytes holds nothing"));
        }
        let data = self.to_data(size - header)?;
        let mut block = Vec::with_capacity(size);
        block.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
        if redundant {
            block.push(flag);
        }
        block.extend_from_slice(&data);
        Ok(block)
    }

    /// Reads one whole copy: its flag byte (0 when not `redundant`) and,
    /// when its CRC is right, its variables; an error when the CRC is
    /// right but the data malformed.
    pub fn from_block(block: &[u8], redundant: bool) -> Result<(u8, Option<Env>), String> {
        let header = header_len(redundant);
        if block.len() <= header + 1 {
            return Err(format!("an environment of {} bytes holds nothing", block.len()));
        }
        let crc = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        let flag = if redundant { block[4] } else { 0 };
        let data = &block[header..];
        if crc32fast::hash(data) != crc {
            return Ok((flag, None));
        }
        Env::parse(data).map(|env| (flag, Some(env)))
    }
}

/// `slot`'s kernel command line: the image's and `basalt.slot=`.
pub fn slot_args(cmdline: &str, slot: Slot) -> String {
    if cmdline.is_empty() {
        format!("basalt.slot={slot}")
    } else {
        format!("{cmdline} basalt.slot={slot}")
    }
}

/// Whether flag `a` is newer than flag `b`, by U-Boot's rule: the higher
/// one, except that 0 is newer than 255 (the flag wrapped).
pub fn flag_newer(a: u8, b: u8) -> bool {
    match (a, b) {
        (0, 255) => true,
        (255, 0) => false,
        _ => a > b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_blocks_round_trip_and_refuse_what_does_not_fit() {
        let mut env = Env::new();
        env.set("b", "2");
        env.set("a", "x=y");
        let data = env.to_data(64).unwrap();
        assert_eq!(&data[..10], b"a=x=y\0b=2\0");
        assert!(data[10..].iter().all(|&b| b == 0));
        assert_eq!(Env::parse(&data).unwrap(), env);
        assert!(env.to_data(10).unwrap_err().contains("larger environment"));
        assert!(Env::parse(b"novalue\0\0").unwrap_err().contains("has no '='"));
        assert_eq!(env.get_ulong("b", 7), 2);
        assert_eq!(env.get_ulong("a", 7), 0);
        assert_eq!(env.get_ulong("c", 7), 7);
        assert!(flag_newer(0, 255) && !flag_newer(255, 0) && flag_newer(3, 2));

        let block = env.to_block(64, true, 7).unwrap();
        assert_eq!(block.len(), 64);
        assert_eq!(block[4], 7);
        assert_eq!(Env::from_block(&block, true).unwrap(), (7, Some(env.clone())));
        let mut torn = block.clone();
        torn[20] ^= 1;
        assert_eq!(Env::from_block(&torn, true).unwrap(), (7, None));
        let single = env.to_block(64, false, 7).unwrap();
        assert_eq!(Env::from_block(&single, false).unwrap(), (0, Some(env)));
    }

    #[test]
    fn the_initial_environment_selects_slot_a_without_a_trial() {
        let env = Env::initial("1.2.3", "console=ttyAMA0", 3);
        assert_eq!(env.get(SLOT_VAR), Some("a"));
        assert_eq!(env.get("basalt_version_a"), Some("1.2.3"));
        assert_eq!(env.get("basalt_args_a"), Some("console=ttyAMA0 basalt.slot=a"));
        assert_eq!(env.get(BOOTLIMIT), Some("3"));
        assert_eq!(env.get(ALTBOOTCMD_VAR), Some(ALTBOOTCMD));
        assert_eq!(env.get(UPGRADE_AVAILABLE), None);
        assert_eq!(env.get(BOOTCOUNT), None);
        assert!(env.get("bootcmd").is_some_and(|c| c.contains("booti")));
    }
}
