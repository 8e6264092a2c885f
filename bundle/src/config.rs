//! The configuration files the builder writes into an image and
//! `basalt-init` reads on the device.
//!
//! Two files, one per stage:
//! - [`SlotConfig`] at [`SLOT_CONFIG_PATH`] in each slot's initramfs: what
//!   stage 1 needs to find, verify and mount that slot's root filesystem.
//!   The dm-verity root hash lives here, so the signature over the initramfs
//!   covers the whole root filesystem.
//! - [`ImageConfig`] at [`IMAGE_CONFIG_PATH`] in the root filesystem: host
//!   name, network, services and boot assessment, for stage 2.
//!
//! Both are TOML with unknown keys refused, so a device never silently
//! ignores a setting written by a newer builder.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Path of [`SlotConfig`] inside the initramfs.
pub const SLOT_CONFIG_PATH: &str = "/etc/basalt/slot.toml";
/// Path of [`ImageConfig`] inside the root filesystem.
pub const IMAGE_CONFIG_PATH: &str = "/etc/basalt/image.toml";
/// Where stage 2 finds the persistent data partition.
pub const DATA_MOUNT: &str = "/data";
/// Where stage 2 mounts the ESP to read and rename boot entries.
pub const ESP_MOUNT: &str = "/run/basalt/esp";

/// An error reading one of the configuration files.
#[derive(Debug, thiserror::Error)]
#[error("{what} is not valid: {source}")]
pub struct ConfigError {
    what: &'static str,
    #[source]
    source: toml::de::Error,
}

/// What stage 1 needs to bring up one slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// Image name, for messages.
    pub image: String,
    /// Image version, for messages and the update agent.
    pub version: String,
    /// The kernel release the modules were built for (`uname -r`).
    pub kernel_release: String,
    /// Kernel modules to load, in load order (dependencies first), as
    /// absolute paths inside the initramfs.
    #[serde(default)]
    pub modules: Vec<String>,
    /// How long to wait for the root partition to appear, in milliseconds.
    pub root_wait_ms: u64,
    /// The dm-verity parameters of the slot's root filesystem.
    pub verity: VerityParams,
    /// Filesystem type of the root (`squashfs`).
    pub root_fstype: String,
    /// Filesystem type of the data partition (`ext4`).
    pub data_fstype: String,
}

/// dm-verity parameters, as `veritysetup format` prints them.
///
/// The hash tree sits in the same partition as the data, after it. At
/// `hash_offset` there is a verity superblock (so `veritysetup` can read the
/// parameters back); the tree itself starts one hash block later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityParams {
    /// Root hash, lowercase hex.
    pub root_hash: String,
    /// Salt, lowercase hex.
    pub salt: String,
    /// Hash algorithm (`sha256`).
    pub algorithm: String,
    /// Size of a data block in bytes.
    pub data_block_size: u32,
    /// Size of a hash block in bytes.
    pub hash_block_size: u32,
    /// Number of data blocks covered.
    pub data_blocks: u64,
    /// Byte offset of the verity superblock within the partition.
    pub hash_offset: u64,
}

impl VerityParams {
    /// The hash-block index where the tree starts (after the superblock),
    /// as the dm-verity table wants it.
    pub fn hash_start_block(&self) -> u64 {
        self.hash_offset / u64::from(self.hash_block_size) + 1
    }
}

/// Stage 2's configuration: the image's identity, network and services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Image name.
    pub name: String,
    /// Image version (semver).
    pub version: String,
    /// Board the image was built for.
    pub board: String,
    /// Host name to set.
    pub hostname: String,
    /// Network set-up.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Boot assessment.
    pub boot: BootConfig,
    /// Services, in the order the recipe lists them.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// How the image gets an address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Interface to configure (`eth0`); loopback is always brought up.
    #[serde(default)]
    pub interface: Option<String>,
    /// `none`, `dhcp` or `static`.
    #[serde(default)]
    pub mode: NetworkMode,
    /// For `static`: address with prefix length, e.g. `10.0.2.15/24`.
    #[serde(default)]
    pub address: Option<String>,
    /// For `static`: default gateway.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Name servers written to `/run/resolv.conf`.
    #[serde(default)]
    pub dns: Vec<String>,
}

/// How an interface gets its address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only.
    #[default]
    None,
    /// A DHCP client runs as a supervised service.
    Dhcp,
    /// A fixed address set by stage 2.
    Static,
}

/// When a boot counts as good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// Every required service must have been healthy this long, in
    /// milliseconds, before the boot is blessed.
    pub bless_after_ms: u64,
    /// If the boot is not blessed this long after stage 2 starts, in
    /// milliseconds, the entry is marked bad and the machine reboots.
    pub bless_deadline_ms: u64,
    /// How long services get to stop at shutdown before SIGKILL, in
    /// milliseconds.
    pub stop_timeout_ms: u64,
}

/// One supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name; prefixes the service's console output.
    pub name: String,
    /// Program and arguments; the program is an absolute path.
    pub command: Vec<String>,
    /// Environment, added to a minimal `PATH`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// When to restart the service after it exits.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// First restart delay in milliseconds; doubles after each failure.
    pub restart_delay_ms: u64,
    /// Upper bound of the restart delay in milliseconds.
    pub restart_delay_max_ms: u64,
    /// Names of services that must be started (and healthy, if they have a
    /// health check) before this one starts.
    #[serde(default)]
    pub after: Vec<String>,
    /// How to tell the service is healthy; without one, running is healthy.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Whether blessing the boot waits for this service to be healthy.
    #[serde(default)]
    pub required: bool,
}

/// When the supervisor restarts a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After every exit.
    Always,
    /// After an exit with a non-zero status or a signal.
    #[default]
    OnFailure,
    /// Never: the service runs once.
    Never,
}

/// A health check run by the supervisor, always as a child process so that
/// no HTTP ever runs inside PID 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// What to check.
    pub probe: HealthProbe,
    /// Time between checks in milliseconds.
    pub interval_ms: u64,
    /// A check that takes longer than this, in milliseconds, fails.
    pub timeout_ms: u64,
}

/// The two kinds of health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProbe {
    /// `GET` this URL (`http://127.0.0.1:PORT/PATH`) on loopback; any 2xx
    /// is healthy.
    Http(String),
    /// Run this command (program and arguments); exit status 0 is healthy.
    Command(Vec<String>),
}

impl SlotConfig {
    /// Parses the file's text.
    pub fn from_toml(text: &str) -> Result<SlotConfig, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError { what: SLOT_CONFIG_PATH, source })
    }

    /// Formats the file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

impl ImageConfig {
    /// Parses the file's text.
    pub fn from_toml(text: &str) -> Result<ImageConfig, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError { what: IMAGE_CONFIG_PATH, source })
    }

    /// Formats the file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageConfig {
        ImageConfig {
            name: "minimal".into(),
            version: "1.0.0".into(),
            board: "qemu-x86_64".into(),
            hostname: "gw".into(),
            network: NetworkConfig::default(),
            boot: BootConfig {
                bless_after_ms: 2000,
                bless_deadline_ms: 60000,
                stop_timeout_ms: 5000,
            },
            services: vec![ServiceConfig {
                name: "hello".into(),
                command: vec!["/usr/bin/hello".into()],
                env: BTreeMap::new(),
                restart: RestartPolicy::Always,
                restart_delay_ms: 100,
                restart_delay_max_ms: 30000,
                after: vec![],
                health: Some(HealthCheck {
                    probe: HealthProbe::Http("http://127.0.0.1:8000/".into()),
                    interval_ms: 1000,
                    timeout_ms: 500,
                }),
                required: true,
            }],
        }
    }

    #[test]
    fn image_config_round_trips() {
        let c = sample();
        let text = c.to_toml();
        assert_eq!(ImageConfig::from_toml(&text).unwrap(), c);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = sample().to_toml().replace("hostname", "hostnme");
        assert!(ImageConfig::from_toml(&text).is_err());
    }

    #[test]
    fn hash_tree_starts_after_the_superblock() {
        let v = VerityParams {
            root_hash: String::new(),
            salt: String::new(),
            algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 10,
            hash_offset: 40960,
        };
        assert_eq!(v.hash_start_block(), 11);
    }
}
