//! The two root slots of an image.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of the two root-filesystem slots, `a` or `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot `a`: the one a factory image boots first.
    A,
    /// Slot `b`: empty at the factory; the first update lands here.
    B,
}

impl Slot {
    /// Both slots, in order.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The slot's short name: `a` or `b`.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot: where the next update goes.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The GPT partition label of this slot's root filesystem.
    pub fn root_partlabel(self) -> &'static str {
        match self {
            Slot::A => crate::layout::ROOTFS_A_LABEL,
            Slot::B => crate::layout::ROOTFS_B_LABEL,
        }
    }

    /// The GPT partition label of this slot's FAT boot partition on a
    /// Raspberry Pi image.
    pub fn rpi_boot_partlabel(self) -> &'static str {
        match self {
            Slot::A => crate::layout::RPI_BOOT_A_LABEL,
            Slot::B => crate::layout::RPI_BOOT_B_LABEL,
        }
    }

    /// The folder on the ESP that holds this slot's kernel and initrd.
    pub fn esp_dir(self) -> &'static str {
        self.name()
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A slot name that is neither `a` nor `b`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown slot {0:?}: a slot is `a` or `b`")]
pub struct UnknownSlot(pub String);

impl FromStr for Slot {
    type Err = UnknownSlot;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "a" => Ok(Slot::A),
            "b" => Ok(Slot::B),
            other => Err(UnknownSlot(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for slot in Slot::ALL {
            assert_eq!(slot.name().parse::<Slot>().unwrap(), slot);
            assert_eq!(slot.other().other(), slot);
        }
        assert!("c".parse::<Slot>().is_err());
    }
}
