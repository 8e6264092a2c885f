//! The image of a U-Boot board (`bootloader = "u-boot"`): both copies of
//! the redundant environment in front of the first partition, and one FAT
//! boot partition (PARTLABEL `esp`, as the ESP layout names it, so the
//! device mounts it the same way) with each slot's kernel and initramfs in
//! `/<slot>/`, as on the ESP.
//!
//! The environment holds the variables of [`basalt_bundle::uboot`]: slot a
//! selected, its version and command line, `bootcmd`, `altbootcmd` and
//! `bootlimit`. U-Boot itself, and where it lives on the card, are the
//! board's own; basalt writes no U-Boot binary.
//!
//! This module does not place partitions ([`crate::gpt`]) or write FAT
//! ([`crate::fat`]); it says what goes where.

use basalt_bundle::uboot::{args_var, slot_args, version_var, Env};
use basalt_bundle::Slot;

use crate::board::UbootSection;
use crate::build::{slot_kernel_files, FilledSlot};

/// Why the environment could not be written.
#[derive(Debug, thiserror::Error)]
pub enum UbootError {
    /// The initial variables do not fit one copy.
    #[error("the U-Boot environment of {board}: {reason}")]
    EnvTooSmall {
        /// The board file.
        board: String,
        /// Why.
        reason: String,
    },
}

/// The boot partition's files: each filled slot's `vmlinuz` and `initrd`
/// in `/<slot>/`.
pub fn boot_files(slots: &[FilledSlot<'_>]) -> Vec<(String, Vec<u8>)> {
    slots.iter().flat_map(|f| slot_kernel_files(f.slot, &f.art)).collect()
}

/// The environment a new image starts with: the board's own variables
/// (`[uboot] env`), slot a selected and blessed, `bootlimit` the image's
/// tries; a factory image's slot b is installed and standing by.
pub fn initial_env(u: &UbootSection, slots: &[FilledSlot<'_>]) -> Env {
    let Some(a) = slots.iter().find(|f| f.slot == Slot::A) else {
        return Env::new();
    };
    let mut env = Env::initial(&a.plan.version.to_string(), &a.plan.cmdline, a.plan.tries);
    for (name, value) in &u.env {
        env.set(name, value.value.clone());
    }
    for f in slots.iter().filter(|f| f.slot != Slot::A) {
        env.set(&version_var(f.slot), f.plan.version.to_string());
        env.set(&args_var(f.slot), slot_args(&f.plan.cmdline, f.slot));
    }
    env
}

/// Both copies of `env` as `(offset, bytes)`: the first with flag 1, the
/// second with flag 0, so U-Boot and `fw_printenv` read the first and the
/// device's first write goes to the second.
pub fn env_copies(
    u: &UbootSection,
    env: &Env,
    board: &str,
) -> Result<[(u64, Vec<u8>); 2], UbootError> {
    let size = u.env_size.value as usize;
    let block = |flag| {
        env.to_block(size, true, flag)
            .map_err(|reason| UbootError::EnvTooSmall { board: board.to_string(), reason })
    };
    Ok([(u.env_offset.value, block(1)?), (u.env_offset_redund.value, block(0)?)])
}

/// The name the report gives a U-Boot slot's entry: the variable that
/// says it is installed.
pub fn entry_name(slot: Slot) -> String {
    format!("env:{}", version_var(slot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::{Located, Source};

    #[test]
    fn both_copies_hold_the_environment_and_the_first_wins() {
        let src = Source {
            path: "u.toml".into(),
            text: "env_device = \"/dev/mmcblk0\"\nenv_offset = 0x3F8000\n\
                   env_offset_redund = 0x3FC000\nenv_size = 0x4000\n"
                .into(),
        };
        let u: UbootSection = src.parse().unwrap();
        let env = Env::initial("1.0.0", "quiet", 3);
        let [(o1, c1), (o2, c2)] = env_copies(&u, &env, "u.toml").unwrap();
        assert_eq!((o1, o2), (0x3F8000, 0x3FC000));
        assert_eq!((c1.len(), c2.len()), (0x4000, 0x4000));
        assert_eq!(Env::from_block(&c1, true).unwrap(), (1, Some(env.clone())));
        assert_eq!(Env::from_block(&c2, true).unwrap(), (0, Some(env.clone())));
        assert!(basalt_bundle::uboot::flag_newer(1, 0));
        let tiny = UbootSection { env_size: Located::unplaced(64), ..u };
        let e = env_copies(&tiny, &env, "u.toml").unwrap_err().to_string();
        assert!(e.contains("larger environment") && e.contains("u.toml"), "{e}");
    }
}
