//! The recipe: what goes into an image, as the user writes it (TOML).
//!
//! Every key is a documented field here; `docs/reference.md` and the JSON
//! schema are generated from these definitions (see [`crate::reference`]).
//! Unknown keys are errors. Sections are processed in this order: `image`,
//! `kernel`, `dir`, `file`, `tarball` (each list in the order written; a
//! path may be added only once), then `service`, `network`, `boot`, `run`.
//! Paths to host files are relative to the recipe's folder.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::diag::Located;
use crate::duration::Duration;

/// A recipe file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The image's identity.
    pub image: ImageSection,
    /// The modules and command line the image needs beyond the board's;
    /// the kernel itself comes from the board unless this names one.
    #[serde(default)]
    pub kernel: KernelSection,
    /// Directories to create, or to copy from the host.
    #[serde(default, rename = "dir")]
    pub dirs: Vec<DirEntry>,
    /// Single files to add.
    #[serde(default, rename = "file")]
    pub files: Vec<FileEntry>,
    /// Tar archives to unpack into the image.
    #[serde(default, rename = "tarball")]
    pub tarballs: Vec<TarballEntry>,
    /// Services that basalt-init starts and supervises.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceEntry>,
    /// How the device gets on the network.
    #[serde(default)]
    pub network: NetworkSection,
    /// When a boot counts as good (boot assessment).
    #[serde(default)]
    pub boot: BootSection,
    /// Settings for `basalt run`, the QEMU runner.
    #[serde(default)]
    pub run: RunSection,
    /// Over-the-air updates: the agent, its keys and where it looks.
    #[serde(default)]
    pub update: Option<UpdateSection>,
    /// ONNX models baked into the image, as signed model bundles.
    #[serde(default, rename = "model")]
    pub models: Vec<ModelEntry>,
}

/// `[[model]]`: an ONNX model baked into the image. The build makes it a
/// model bundle signed with the update signing key, in
/// `/usr/share/basalt/models/`, where `basalt-runtime` finds it; the
/// runtime checks its signature against `[update] trusted_keys` and runs
/// its test vector before it serves it.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The ONNX file.
    pub onnx: Located<PathBuf>,
    /// Its `model.toml`: name, version, test vector.
    pub config: Located<PathBuf>,
}

/// `[image]`: name, version and target of the image.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Image name: lowercase letters, digits and `-`, starting with a letter.
    pub name: Located<String>,
    /// Image version, semver (`1.2.0`). Updates only ever move to a higher
    /// version.
    pub version: Located<String>,
    /// The board to build for when `--board` is not given: a name from
    /// `boards/` or a path to a board file.
    pub board: Located<String>,
    /// Host name of the device; defaults to the image name.
    #[serde(default)]
    pub hostname: Option<Located<String>>,
}

/// `[kernel]`: the image's extra modules and command line, and, to
/// override the board's kernel (its `[kernel]`), either `deb`, or
/// `vmlinuz` with `modules_dir`. An override must be of the board's
/// architecture, so a recipe with one builds for boards of that
/// architecture only.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    /// A Debian kernel package (`linux-image-*.deb`); the kernel image and
    /// the modules are taken from it instead of the board's kernel.
    #[serde(default)]
    pub deb: Option<Located<PathBuf>>,
    /// A kernel image file, instead of `deb`.
    #[serde(default)]
    pub vmlinuz: Option<Located<PathBuf>>,
    /// The `lib/modules/<release>` folder that goes with `vmlinuz`.
    #[serde(default)]
    pub modules_dir: Option<Located<PathBuf>>,
    /// Extra modules to put into the root filesystem (with everything they
    /// depend on), by name as `modprobe` knows them (`-` and `_` are the
    /// same). Stage 2 loads them, after the board's `modules`, each after
    /// its dependencies.
    #[serde(default)]
    pub modules: Vec<Located<String>>,
    /// Extra kernel command-line arguments, after the board's.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// `"strip"` or `"keep"` the signatures appended to module files. By
    /// default they are stripped, which saves the kernel a signature check
    /// per module at boot (most of the module loading time on a slow
    /// CPU), unless the kernel's configuration or command line makes it
    /// refuse unsigned modules. Set `"keep"` when the device boots with
    /// UEFI Secure Boot (the kernel's lockdown then requires signatures).
    /// Integrity does not rest on them: stage 1's modules come from the
    /// initramfs like basalt-init, stage 2's from the dm-verity root.
    #[serde(default)]
    pub module_signatures: Option<Located<String>>,
}

/// `[[dir]]`: a directory in the image.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    /// Absolute path in the image.
    pub path: Located<String>,
    /// A host folder whose content is copied in (recursively; symlinks are
    /// kept as links; file permission bits are kept, owners are set from
    /// `owner`/`group`).
    #[serde(default)]
    pub source: Option<Located<PathBuf>>,
    /// Owner user id of the directory (and of copied entries).
    #[serde(default)]
    pub owner: u32,
    /// Owner group id of the directory (and of copied entries).
    #[serde(default)]
    pub group: u32,
    /// Permission bits of the directory, e.g. `0o755` or `"0755"`.
    #[serde(default)]
    pub mode: Option<Located<Mode>>,
}

/// `[[file]]`: one file in the image. Give exactly one of `source`, `text`
/// or `build`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Absolute path in the image.
    pub path: Located<String>,
    /// A host file to copy.
    #[serde(default)]
    pub source: Option<Located<PathBuf>>,
    /// The file's content, inline.
    #[serde(default)]
    pub text: Option<String>,
    /// A static device program that basalt builds: `basalt-demo`.
    #[serde(default)]
    pub build: Option<Located<String>>,
    /// Owner user id.
    #[serde(default)]
    pub owner: u32,
    /// Owner group id.
    #[serde(default)]
    pub group: u32,
    /// Permission bits; defaults to `0o755` for `build` and for host files
    /// that are executable, `0o644` otherwise.
    #[serde(default)]
    pub mode: Option<Located<Mode>>,
}

/// `[[tarball]]`: a tar archive (`.tar`, `.tar.gz`, `.tgz`, `.tar.zst`)
/// unpacked into the image. Owners, modes and links come from the archive;
/// times are clamped to the build time.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TarballEntry {
    /// The archive on the host.
    pub source: Located<PathBuf>,
    /// Absolute path in the image to unpack into; `/` by default.
    #[serde(default)]
    pub path: Option<Located<String>>,
}

/// `[[service]]`: a program basalt-init starts at boot and supervises.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    /// Unique name; prefixes the service's console output.
    pub name: Located<String>,
    /// Program and arguments; the program is an absolute path in the image.
    pub command: Located<Vec<String>>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `always`, `on-failure` (default) or `never`.
    #[serde(default)]
    pub restart: Option<Located<String>>,
    /// First restart delay; doubles after each failure.
    #[serde(default = "default_restart_delay")]
    pub restart_delay: Duration,
    /// Upper bound of the restart delay.
    #[serde(default = "default_restart_delay_max")]
    pub restart_delay_max: Duration,
    /// Services that must be up (and healthy, if they have a health check)
    /// before this one starts.
    #[serde(default)]
    pub after: Vec<Located<String>>,
    /// Whether boot blessing waits for this service to be healthy. A boot
    /// whose required services do not become healthy is rolled back.
    #[serde(default)]
    pub required: bool,
    /// How to tell the service is healthy; without it, running is healthy.
    #[serde(default)]
    pub health: Option<HealthSection>,
}

fn default_restart_delay() -> Duration {
    Duration(100)
}

fn default_restart_delay_max() -> Duration {
    Duration(30_000)
}

/// `[service.health]`: give `http` or `command`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// An URL on loopback (`http://127.0.0.1:8000/v2/health/ready`); any
    /// 2xx answer is healthy.
    #[serde(default)]
    pub http: Option<Located<String>>,
    /// A command; exit status 0 is healthy.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Time between checks.
    #[serde(default = "default_health_interval")]
    pub interval: Duration,
    /// A check that takes longer fails.
    #[serde(default = "default_health_timeout")]
    pub timeout: Duration,
}

fn default_health_interval() -> Duration {
    Duration(1000)
}

fn default_health_timeout() -> Duration {
    Duration(1000)
}

/// `[network]`: loopback is always up; this configures one interface.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// `none` (default), `dhcp` or `static`. `dhcp` adds a service named
    /// `dhcp` (the client, run by basalt-init outside PID 1), which other
    /// services may list in `after`; `static` is set by stage 2.
    #[serde(default)]
    pub mode: Option<Located<String>>,
    /// The interface to configure; `eth0` by default.
    #[serde(default)]
    pub interface: Option<String>,
    /// For `static`: address and prefix length, e.g. `192.168.1.10/24`.
    #[serde(default)]
    pub address: Option<Located<String>>,
    /// For `static`: the default gateway.
    #[serde(default)]
    pub gateway: Option<Located<String>>,
    /// Name servers.
    #[serde(default)]
    pub dns: Vec<String>,
}

/// `[boot]`: boot assessment. A new slot gets `tries` boots to bless
/// itself; blessing needs every required service healthy for
/// `bless_after`; a boot not blessed by `bless_deadline` is marked bad and
/// the device reboots into the other slot.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    /// How long the required services must stay healthy.
    #[serde(default = "default_bless_after")]
    pub bless_after: Duration,
    /// How long after stage 2 starts blessing may take at most.
    #[serde(default = "default_bless_deadline")]
    pub bless_deadline: Duration,
    /// Boot attempts a new slot gets before the bootloader gives up on it.
    #[serde(default = "default_tries")]
    pub tries: Located<u32>,
    /// How long services get to stop at shutdown before they are killed.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Duration,
}

impl Default for BootSection {
    fn default() -> Self {
        BootSection {
            bless_after: default_bless_after(),
            bless_deadline: default_bless_deadline(),
            tries: default_tries(),
            stop_timeout: default_stop_timeout(),
        }
    }
}

fn default_bless_after() -> Duration {
    Duration(5_000)
}

fn default_bless_deadline() -> Duration {
    Duration(120_000)
}

fn default_tries() -> Located<u32> {
    Located::unplaced(3)
}

fn default_stop_timeout() -> Duration {
    Duration(5_000)
}

/// `[update]`: over-the-air updates. With this section the image carries
/// the update agent, a supervised service that installs signed bundles
/// into the other slot, and the public keys it trusts. The agent is
/// required for blessing: a version that could not take the next update
/// is rolled back.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    /// Public keys (PEM, as `basalt keygen` writes `NAME.pub`) whose
    /// signatures the device accepts. Paths are relative to the recipe.
    pub trusted_keys: Vec<Located<PathBuf>>,
    /// How many of the trusted keys must sign a bundle or a channel file.
    #[serde(default = "default_threshold")]
    pub threshold: Located<usize>,
    /// Private key that signs `update.basalt`, written beside the image by
    /// every build; `basalt build --key` overrides it. Without either, the
    /// build writes no bundle (make one later with `basalt bundle`).
    #[serde(default)]
    pub signing_key: Option<Located<PathBuf>>,
    /// Address of the agent's local API.
    #[serde(default = "default_listen")]
    pub listen: Located<String>,
    /// File holding the bearer token the API asks for, copied into the
    /// image; required when `listen` is not a loopback address.
    #[serde(default)]
    pub token_file: Option<Located<PathBuf>>,
    /// Base URL of an update repository to poll (`http://host:port/`);
    /// without one the device only takes bundles pushed to its API.
    #[serde(default)]
    pub repository: Option<Located<String>>,
    /// The repository channel to follow.
    #[serde(default = "default_channel")]
    pub channel: Located<String>,
    /// Time between two polls of the repository.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// Up to this much random delay is added to each poll.
    #[serde(default = "default_poll_jitter")]
    pub poll_jitter: Duration,
    /// Reboot into a new version as soon as it is installed; with `false`
    /// the device waits for `POST /v1/reboot`.
    #[serde(default = "default_reboot")]
    pub reboot: bool,
    /// Models the device follows on their own channels in the same
    /// repository (`channels/models/<name>/<channel>.toml`, written by
    /// `basalt publish` of a model bundle): each new version is installed
    /// into `/data/models` and handed to the runtime without a reboot.
    #[serde(default)]
    pub models: Vec<Located<String>>,
    /// Base URL of the model runtime the agent asks to load a newly
    /// installed model version.
    #[serde(default = "default_runtime")]
    pub runtime: Located<String>,
}

fn default_runtime() -> Located<String> {
    Located::unplaced(basalt_bundle::config::DEFAULT_RUNTIME_URL.to_string())
}

fn default_threshold() -> Located<usize> {
    Located::unplaced(1)
}

fn default_listen() -> Located<String> {
    Located::unplaced(crate::plan::AGENT_LISTEN.to_string())
}

fn default_channel() -> Located<String> {
    Located::unplaced("stable".to_string())
}

fn default_poll_interval() -> Duration {
    Duration(15 * 60_000)
}

fn default_poll_jitter() -> Duration {
    Duration(60_000)
}

fn default_reboot() -> bool {
    true
}

/// `[run]`: how `basalt run` starts the image in QEMU.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Guest TCP ports forwarded to the same port on 127.0.0.1.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Guest memory in MiB; the board's default when absent.
    #[serde(default)]
    pub memory_mib: Option<u32>,
}

/// Permission bits, written as a TOML octal integer (`0o755`) or a string
/// (`"0755"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Str(String),
        }
        let bits = match Raw::deserialize(d)? {
            Raw::Int(i) => i,
            Raw::Str(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| {
                serde::de::Error::custom(format!(
                    "mode `{s}` is not octal; write it as 0o755 or \"0755\""
                ))
            })?,
        };
        if bits > 0o7777 {
            return Err(serde::de::Error::custom(format!(
                "mode {bits:o} has bits beyond 0o7777; write permission bits only, e.g. 0o644"
            )));
        }
        Ok(Mode(bits))
    }
}

impl JsonSchema for Mode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Mode".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Permission bits: an octal integer (0o755) or a string (\"0755\").",
            "anyOf": [
                { "type": "integer", "minimum": 0, "maximum": 4095 },
                { "type": "string", "pattern": "^(0o)?[0-7]{1,4}$" }
            ]
        })
    }
}
