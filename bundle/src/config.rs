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
//! Both carry the board's [`BootloaderConfig`] (which back-end the device
//! runs and where its files are): the slot config for stage 1, which
//! marks a slot whose root fails verification bad, and
//! [`BOOTLOADER_CONFIG_PATH`] in the root filesystem for stage 2 and the
//! update agent. A file without it means systemd-boot, as before it
//! existed.
//!
//! Both are TOML with unknown keys refused, so a device never silently
//! ignores a setting written by a newer builder.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Path of [`SlotConfig`] inside the initramfs.
pub const SLOT_CONFIG_PATH: &str = "/etc/basalt/slot.toml";
/// Path of [`ImageConfig`] inside the root filesystem.
pub const IMAGE_CONFIG_PATH: &str = "/etc/basalt/image.toml";
/// Where stage 2 finds the persistent data partition.
pub const DATA_MOUNT: &str = "/data";
/// Where stage 2 mounts the ESP to read and rename boot entries.
pub const ESP_MOUNT: &str = "/run/basalt/esp";
/// Path of the root filesystem's [`BootloaderConfig`].
pub const BOOTLOADER_CONFIG_PATH: &str = "/etc/basalt/bootloader.toml";

/// The bootloader back-end a device runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootloaderKind {
    /// systemd-boot on the ESP (UEFI boards).
    #[default]
    SystemdBoot,
    /// The Raspberry Pi firmware's `autoboot.txt` and tryboot.
    RpiTryboot,
    /// U-Boot's `bootcount` / `bootlimit` / `altbootcmd` in a redundant
    /// environment ([`crate::uboot`]).
    UBoot,
}

/// Where a U-Boot board keeps its redundant environment on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UbootEnvConfig {
    /// The device holding both copies, e.g. `/dev/mmcblk0`.
    pub device: String,
    /// Byte offset of the first copy (`CONFIG_ENV_OFFSET`).
    pub offset: u64,
    /// Byte offset of the second copy (`CONFIG_ENV_OFFSET_REDUND`).
    pub offset_redund: u64,
    /// Size of each copy (`CONFIG_ENV_SIZE`).
    pub size: u64,
}

/// Which bootloader back-end the device runs, and where its files are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootloaderConfig {
    /// The back-end.
    #[serde(default)]
    pub kind: BootloaderKind,
    /// With `rpi-tryboot`: the partition numbers of slot a's and slot b's
    /// boot partitions, as `autoboot.txt`'s `boot_partition` counts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_partitions: Option<[u32; 2]>,
    /// With `u-boot`: where the environment is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uboot_env: Option<UbootEnvConfig>,
}

impl BootloaderConfig {
    /// Whether this is the default (systemd-boot, nothing else), which the
    /// slot config leaves out.
    pub fn is_default(&self) -> bool {
        *self == BootloaderConfig::default()
    }

    /// Parses the file's text.
    pub fn from_toml(text: &str) -> Result<BootloaderConfig, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError { what: BOOTLOADER_CONFIG_PATH, source })
    }

    /// Formats the file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

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
    /// The bootloader back-end, for marking the slot bad when its root
    /// fails verification; left out for systemd-boot.
    #[serde(default, skip_serializing_if = "BootloaderConfig::is_default")]
    pub bootloader: BootloaderConfig,
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
    /// Kernel modules stage 2 loads before it sets up the network and
    /// starts services (the network driver, for one), as absolute paths in
    /// the root filesystem, in load order (dependencies first). A module
    /// that fails to load is reported and skipped.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Network set-up.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Boot assessment.
    pub boot: BootConfig,
    /// The update agent's settings; absent when the image takes no
    /// updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateConfig>,
    /// Services, in the order the recipe lists them.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// Where the trusted update keys live in the root filesystem, one
/// `<key id>.pub` PEM file each.
pub const TRUSTED_KEYS_DIR: &str = "/etc/basalt/keys";
/// The update agent's state, on the data partition.
pub const AGENT_STATE_DIR: &str = "/data/basalt/agent";
/// The update agent's program in the root filesystem.
pub const AGENT_PATH: &str = "/usr/bin/basalt-agent";
/// Name of the service the builder adds for the update agent.
pub const AGENT_SERVICE: &str = "update-agent";

/// What the update agent does, from the recipe's `[update]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// How many trusted keys must have signed a bundle or channel file.
    pub threshold: usize,
    /// Address of the local API (`127.0.0.1:7400`).
    pub listen: String,
    /// File holding the bearer token the API requires; required when
    /// `listen` is not a loopback address.
    #[serde(default)]
    pub token_file: Option<String>,
    /// Base URL of the update repository to poll; no polling without one.
    #[serde(default)]
    pub repository: Option<String>,
    /// The channel to follow.
    pub channel: String,
    /// Time between polls, in milliseconds.
    pub poll_interval_ms: u64,
    /// Up to this much random delay is added to each poll, in
    /// milliseconds, so a fleet does not poll in step.
    pub poll_jitter_ms: u64,
    /// Reboot into the new version as soon as it is installed; otherwise
    /// only when `POST /v1/reboot` asks.
    pub reboot: bool,
    /// Models whose channels (`channels/models/<name>/<channel>.toml`)
    /// the agent polls in the same repository, on the same channel name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Base URL of the model runtime the agent asks to load a new model
    /// version (`POST <runtime>/v2/repository/models/<name>/load`).
    #[serde(default = "default_runtime_url")]
    pub runtime: String,
}

/// Where the model runtime listens unless the recipe says otherwise.
pub const DEFAULT_RUNTIME_URL: &str = "http://127.0.0.1:8000";

/// The installed-model store on the data partition, shared by the update
/// agent (which installs) and the runtime (which loads).
pub const MODEL_STORE_DIR: &str = "/data/models";

fn default_runtime_url() -> String {
    DEFAULT_RUNTIME_URL.to_string()
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

/// Why a static address or gateway is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// `address` is not `A.B.C.D/N`.
    #[error("address {0:?} is not an IPv4 address with a prefix length, e.g. 10.0.2.15/24")]
    Cidr(String),
    /// The prefix length is beyond 32, or 0 (a host needs a network).
    #[error("address {0:?}: the prefix length must be 1 to 32")]
    Prefix(String),
    /// `gateway` is not `A.B.C.D`.
    #[error("gateway {0:?} is not an IPv4 address")]
    Gateway(String),
}

/// Parses `A.B.C.D/N` into the address and the prefix length.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), AddressError> {
    let (addr, prefix) =
        text.trim().split_once('/').ok_or_else(|| AddressError::Cidr(text.into()))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| AddressError::Cidr(text.into()))?;
    // Digits only: `u8::from_str` would take a `+`.
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 2 {
        return Err(AddressError::Cidr(text.into()));
    }
    let prefix: u8 = prefix.parse().map_err(|_| AddressError::Cidr(text.into()))?;
    if prefix == 0 || prefix > 32 {
        return Err(AddressError::Prefix(text.into()));
    }
    Ok((addr, prefix))
}

/// Parses a gateway address.
pub fn parse_gateway(text: &str) -> Result<Ipv4Addr, AddressError> {
    text.trim().parse().map_err(|_| AddressError::Gateway(text.into()))
}

/// The netmask of a prefix length: 24 is 255.255.255.0. Lengths beyond 32
/// count as 32.
pub fn prefix_to_netmask(prefix: u8) -> Ipv4Addr {
    let bits = u32::from(prefix.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

/// The prefix length of a netmask, if it is contiguous ones then zeroes.
pub fn netmask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// The text of `resolv.conf` for these name servers.
pub fn resolv_conf<S: std::fmt::Display>(servers: &[S]) -> String {
    servers.iter().map(|s| format!("nameserver {s}\n")).collect()
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

    #[test]
    fn bootloader_config_round_trips_and_defaults_to_systemd_boot() {
        let pi = BootloaderConfig {
            kind: BootloaderKind::RpiTryboot,
            boot_partitions: Some([2, 3]),
            uboot_env: None,
        };
        let text = pi.to_toml();
        assert_eq!(text, "kind = \"rpi-tryboot\"\nboot_partitions = [2, 3]\n");
        assert_eq!(BootloaderConfig::from_toml(&text).unwrap(), pi);
        assert!(BootloaderConfig::from_toml("").unwrap().is_default());
        assert!(BootloaderConfig::from_toml("kind = \"grub\"\n").is_err());
        assert!(BootloaderConfig::from_toml("partitions = [2, 3]\n").is_err());
        let uboot = BootloaderConfig {
            kind: BootloaderKind::UBoot,
            boot_partitions: None,
            uboot_env: Some(UbootEnvConfig {
                device: "/dev/mmcblk0".into(),
                offset: 0x3F8000,
                offset_redund: 0x3FC000,
                size: 0x4000,
            }),
        };
        let text = uboot.to_toml();
        assert!(text.starts_with("kind = \"u-boot\"\n"), "{text}");
        assert_eq!(BootloaderConfig::from_toml(&text).unwrap(), uboot);
    }

    fn sample() -> ImageConfig {
        ImageConfig {
            name: "minimal".into(),
            version: "1.0.0".into(),
            board: "qemu-x86_64".into(),
            hostname: "gw".into(),
            modules: vec!["/lib/modules/6.1.0/kernel/drivers/net/virtio_net.ko".into()],
            network: NetworkConfig::default(),
            update: None,
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
    fn model_keys_default_and_round_trip() {
        let text = "threshold = 1\nlisten = \"127.0.0.1:7400\"\nchannel = \"stable\"\n\
                    poll_interval_ms = 1000\npoll_jitter_ms = 0\nreboot = true\n";
        let old: UpdateConfig = toml::from_str(text).unwrap();
        assert!(old.models.is_empty());
        assert_eq!(old.runtime, DEFAULT_RUNTIME_URL);
        let new = UpdateConfig {
            models: vec!["water-quality".into()],
            runtime: "http://127.0.0.1:9000".into(),
            ..old
        };
        let back: UpdateConfig = toml::from_str(&toml::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = sample().to_toml().replace("hostname", "hostnme");
        assert!(ImageConfig::from_toml(&text).is_err());
    }

    #[test]
    fn cidr_addresses_parse() {
        assert_eq!(parse_cidr("10.0.2.15/24"), Ok((Ipv4Addr::new(10, 0, 2, 15), 24)));
        assert_eq!(parse_cidr(" 192.168.1.1/32 "), Ok((Ipv4Addr::new(192, 168, 1, 1), 32)));
        for bad in [
            "10.0.2.15",
            "10.0.2/24",
            "10.0.2.15/",
            "10.0.2.15/+8",
            "x/8",
            "",
            "/",
            "10.0.2.15/024",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cidr("10.0.2.15/33"), Err(AddressError::Prefix("10.0.2.15/33".into())));
        assert_eq!(parse_cidr("10.0.2.15/0"), Err(AddressError::Prefix("10.0.2.15/0".into())));
        assert_eq!(parse_gateway("10.0.2.2"), Ok(Ipv4Addr::new(10, 0, 2, 2)));
        assert!(parse_gateway("10.0.2.256").is_err());
    }

    #[test]
    fn netmasks_and_prefixes_convert() {
        assert_eq!(prefix_to_netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_to_netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(prefix_to_netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(prefix_to_netmask(99), Ipv4Addr::new(255, 255, 255, 255));
        for p in 0..=32 {
            assert_eq!(netmask_to_prefix(prefix_to_netmask(p)), Some(p));
        }
        assert_eq!(netmask_to_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
    }

    #[test]
    fn resolv_conf_lists_name_servers() {
        assert_eq!(
            resolv_conf(&["10.0.2.3", "1.1.1.1"]),
            "nameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
        assert_eq!(resolv_conf::<&str>(&[]), "");
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
