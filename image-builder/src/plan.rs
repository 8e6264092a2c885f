//! Resolving a recipe and a board into one [`Plan`]: every input read and
//! checked, every size known, the root filesystem tree assembled. The rest
//! of the build takes the plan as its only input.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use basalt_bundle::config::{
    self, BootConfig, HealthCheck, HealthProbe, ImageConfig, NetworkConfig, NetworkMode,
    RestartPolicy, ServiceConfig, UpdateConfig, AGENT_PATH, AGENT_SERVICE, BOOTLOADER_CONFIG_PATH,
    IMAGE_CONFIG_PATH, TRUSTED_KEYS_DIR,
};
use basalt_bundle::keys::PublicKey;
use basalt_bundle::layout::Arch;

use crate::board::{Board, BootFirmware};
use crate::diag::{with_help, Diagnostic, Located, Source};
use crate::kernel::{self, KernelFiles, ModuleFile, ModuleIndex, ModuleSignatures};
use crate::recipe::{Mode, Recipe, UpdateSection};
use crate::tree::{Meta, Origin, Tree};

/// Why a recipe could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something in a recipe or board file is wrong; points at the place.
    #[error("{0}")]
    At(Box<Diagnostic>),
    /// The kernel input is wrong.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// A static device program is missing.
    #[error("the static {name} for {target} is not built (looked in {looked}); build it with `cargo build --release --target {target} -p basalt-init -p basalt-runtime --bins`, or set BASALT_DEVICE_BIN to the folder that holds it")]
    DeviceBinary {
        /// Program name.
        name: String,
        /// Rust target triple.
        target: String,
        /// Folders searched.
        looked: String,
    },
}

impl From<Diagnostic> for PlanError {
    fn from(d: Diagnostic) -> Self {
        PlanError::At(Box::new(d))
    }
}

/// Options from the command line that shape the plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// `--board`: a board name or a path to a board file.
    pub board: Option<String>,
    /// `SOURCE_DATE_EPOCH`: every timestamp in the image.
    pub source_date_epoch: u64,
    /// Where unpacked kernels are cached.
    pub cache_dir: PathBuf,
    /// Folder with the static device programs, instead of the search.
    pub device_bin: Option<PathBuf>,
    /// `--image-version`: overrides the recipe's `image.version` (a CI
    /// pipeline numbering its builds).
    pub version: Option<semver::Version>,
    /// `--key`: signs `update.basalt` with this key instead of the
    /// recipe's `update.signing_key`.
    pub signing_key: Option<PathBuf>,
}

/// Name of the service the builder adds for `network.mode = "dhcp"`;
/// recipe services may list it in `after`.
pub const DHCP_SERVICE: &str = "dhcp";

/// The device programs a recipe's `[[file]] build = ...` can name.
pub const DEVICE_PROGRAMS: [&str; 3] = ["basalt-demo", "basalt-init", "basalt-runtime"];

/// Where baked-in model bundles go in the image.
pub const MODELS_DIR: &str = "/usr/share/basalt/models";

/// Where the update agent's API listens unless the recipe says otherwise.
pub const AGENT_LISTEN: &str = "127.0.0.1:7400";

/// Where the agent's API token goes in the image.
pub const AGENT_TOKEN_PATH: &str = "/etc/basalt/agent-token";

/// Everything a build needs, resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The recipe file.
    pub recipe_path: PathBuf,
    /// The board file.
    pub board_path: PathBuf,
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: semver::Version,
    /// The board.
    pub board: Board,
    /// Every timestamp in the image.
    pub source_date_epoch: u64,
    /// The kernel.
    pub kernel: KernelFiles,
    /// Modules for the initramfs, in load order.
    pub stage1_modules: Vec<ModuleFile>,
    /// Whether module files are stored with their signatures.
    pub module_signatures: ModuleSignatures,
    /// Path of the static basalt-init.
    pub init_binary: PathBuf,
    /// The root filesystem.
    pub rootfs: Tree,
    /// The configuration stage 2 reads.
    pub image_config: ImageConfig,
    /// Kernel command line without `basalt.slot=`.
    pub cmdline: String,
    /// Boot tries a new slot gets.
    pub tries: u32,
    /// Guest ports `basalt run` forwards.
    pub ports: Vec<u16>,
    /// Guest memory for `basalt run`.
    pub memory_mib: Option<u32>,
    /// The recipe's `update.signing_key`, resolved against its folder.
    pub signing_key: Option<PathBuf>,
}

impl Plan {
    /// A name for everything derived from the image's identity (GUIDs,
    /// salts), so a rebuild gives the same bytes.
    pub fn identity(&self) -> String {
        format!("{} {} {}", self.name, self.version, self.board.name.value)
    }
}

/// The cache folder: `$BASALT_CACHE`, else `$XDG_CACHE_HOME/basalt`, else
/// `~/.cache/basalt`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("BASALT_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("basalt");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
    home.join(".cache").join("basalt")
}

fn read_source(path: &Path) -> Result<Source, PlanError> {
    Source::read(path).map_err(|source| PlanError::Read { path: path.to_path_buf(), source })
}

/// Finds a board file: a path (anything with `/` or ending in `.toml`), or
/// a name looked up in `boards/` beside the recipe's folder, in the
/// recipe's folder, and in `$BASALT_BOARDS`.
pub fn find_board(spec: &str, recipe_dir: &Path) -> Option<PathBuf> {
    if spec.contains('/') || spec.ends_with(".toml") {
        let p = recipe_dir.join(spec);
        let p = if Path::new(spec).is_absolute() || !p.exists() { PathBuf::from(spec) } else { p };
        return p.exists().then_some(p);
    }
    let file = format!("{spec}.toml");
    let mut dirs = vec![recipe_dir.join("../boards"), recipe_dir.join("boards")];
    if let Some(extra) = std::env::var_os("BASALT_BOARDS") {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter().map(|d| d.join(&file)).find(|p| p.exists())
}

/// Finds a static device program for `arch`: in `explicit`, else
/// `$BASALT_DEVICE_BIN`, else the cargo target folders beside the running
/// `basalt` (`target/<triple>/release` or `debug`), else beside it.
pub fn find_device_binary(
    name: &str,
    arch: Arch,
    explicit: Option<&Path>,
) -> Result<PathBuf, PlanError> {
    let target = arch.musl_target();
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = explicit {
        dirs.push(d.to_path_buf());
    } else if let Some(d) = std::env::var_os("BASALT_DEVICE_BIN") {
        dirs.push(PathBuf::from(d));
    } else if let Ok(exe) = std::env::current_exe() {
        if let Some(exe_dir) = exe.parent() {
            // target/release/basalt → target/<triple>/release/, and
            // target/debug/deps/<test> → target/<triple>/release/.
            for up in
                [exe_dir.parent(), exe_dir.parent().and_then(Path::parent)].into_iter().flatten()
            {
                dirs.push(up.join(target).join("release"));
                dirs.push(up.join(target).join("debug"));
            }
            dirs.push(exe_dir.to_path_buf());
        }
    }
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| PlanError::DeviceBinary {
        name: name.to_string(),
        target: target.to_string(),
        looked: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

fn check_image_path(src: &Source, path: &Located<String>) -> Result<(), Diagnostic> {
    let p = &path.value;
    if crate::tree::is_clean_path(p) {
        Ok(())
    } else {
        Err(with_help(
            src.error(path.span.clone(), format!("`{p}` is not an absolute path in the image")),
            "write a clean absolute path such as \"/usr/bin/app\" (no `.`, `..` or trailing `/`)",
        ))
    }
}

fn host_path(recipe_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        recipe_dir.join(p)
    }
}

fn missing_input(
    src: &Source,
    loc: &Located<PathBuf>,
    full: &Path,
    e: std::io::Error,
) -> Diagnostic {
    with_help(
        src.error(loc.span.clone(), format!("cannot read `{}`: {e}", full.display())),
        "paths are relative to the recipe's folder; check that the file exists",
    )
}

fn tree_error(src: &Source, span: std::ops::Range<usize>, e: crate::tree::TreeError) -> Diagnostic {
    src.error(span, e.to_string())
}

/// Loads a kernel named by a recipe's or a board's `[kernel]` (paths
/// relative to `dir`, errors pointing into `src`).
fn load_kernel(
    src: &Source,
    dir: &Path,
    deb: &Option<Located<PathBuf>>,
    vmlinuz: &Option<Located<PathBuf>>,
    modules_dir: &Option<Located<PathBuf>>,
    opts: &PlanOptions,
) -> Result<KernelFiles, PlanError> {
    match (deb, vmlinuz, modules_dir) {
        (Some(deb), None, None) => {
            let full = host_path(dir, deb);
            std::fs::metadata(&full).map_err(|e| missing_input(src, deb, &full, e))?;
            kernel::load_deb(&full, &opts.cache_dir).map_err(|e| match e {
                kernel::KernelError::NotKernelPackage { .. } => {
                    PlanError::from(src.error(deb.span.clone(), e.to_string()))
                }
                other => other.into(),
            })
        }
        (None, Some(vm), Some(md)) => {
            let vm_full = host_path(dir, vm);
            let md_full = host_path(dir, md);
            std::fs::metadata(&vm_full).map_err(|e| missing_input(src, vm, &vm_full, e))?;
            std::fs::metadata(&md_full).map_err(|e| missing_input(src, md, &md_full, e))?;
            Ok(kernel::load_files(&vm_full, &md_full)?)
        }
        _ => Err(PlanError::from(with_help(
            src.error(
                0..0,
                "[kernel] needs either `deb`, or `vmlinuz` together with `modules_dir`",
            ),
            "e.g. deb = \"../.cache/kernel/linux-image-cloud-amd64.deb\" (ci/setup.sh fetches it)",
        ))),
    }
}

/// Whether the image stores module files with their signatures: the
/// recipe's `[kernel] module_signatures`, else stripped unless the kernel
/// would refuse unsigned modules.
fn module_signature_policy(
    src: &Source,
    kernel: &KernelFiles,
    board: &Board,
    k: &crate::recipe::KernelSection,
) -> Result<ModuleSignatures, PlanError> {
    let cmdline: Vec<String> = board.cmdline.iter().chain(&k.cmdline).cloned().collect();
    let required = kernel::signatures_required(kernel.config.as_deref(), &cmdline);
    match k.module_signatures.as_ref().map(|l| (l.value.as_str(), l.span.clone())) {
        None if required.is_none() => Ok(ModuleSignatures::Strip),
        None | Some(("keep", _)) => Ok(ModuleSignatures::Keep),
        Some(("strip", span)) => match required {
            None => Ok(ModuleSignatures::Strip),
            Some(why) => Err(with_help(
                src.error(span, format!("module signatures cannot be stripped: {why}")),
                "set module_signatures = \"keep\", or use a kernel that loads unsigned modules",
            )
            .into()),
        },
        Some((other, span)) => Err(with_help(
            src.error(span, format!("module_signatures is `{other}`")),
            "write \"strip\" or \"keep\"",
        )
        .into()),
    }
}

/// Checks that the kernel image is one the board's firmware loads: a PE
/// image (unpacked from gzip if need be) of the board's architecture for
/// UEFI, an arm64 `Image` for the Raspberry Pi firmware.
fn check_kernel_arch(
    kernel: &KernelFiles,
    board: &Board,
    src: &Source,
    span: std::ops::Range<usize>,
) -> Result<(), PlanError> {
    let path = &kernel.vmlinuz;
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 1 << 16), &mut head))
        .map_err(|source| PlanError::Read { path: path.clone(), source })?;
    let head = crate::kimage::head(&head, crate::kimage::HEAD_LEN).unwrap_or_default();
    let want = board.arch;
    let found = crate::kimage::arch(&head);
    if found == Some(want) {
        return Ok(());
    }
    // The Raspberry Pi firmware and U-Boot's `booti` load an arm64 `Image`
    // by its own header; the PE header of the EFI stub is not needed.
    let pi = board.is_rpi_tryboot() || board.is_uboot();
    if pi && crate::kimage::is_arm64_image(&head) {
        return Ok(());
    }
    let what = match found {
        Some(a) => format!("an {} kernel", a.name()),
        None if pi => "not an arm64 kernel Image (no ARM\\x64 magic at byte 56)".to_string(),
        None => "not a kernel image UEFI can load (no PE header)".to_string(),
    };
    Err(with_help(
        src.error(
            span,
            format!(
                "kernel {} ({}) is {what}, but board `{}` is {}",
                kernel.release,
                path.display(),
                board.name.value,
                want.name()
            ),
        ),
        "use a kernel of the board's architecture: leave `deb` out of the recipe's [kernel] \
         to take the board's kernel, or name a linux-image-*.deb of that architecture",
    )
    .into())
}

/// Resolves a recipe file into a plan.
pub fn resolve(recipe_path: &Path, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let src = read_source(recipe_path)?;
    let recipe: Recipe = src.parse()?;
    let recipe_dir = recipe_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let recipe_dir =
        if recipe_dir.as_os_str().is_empty() { PathBuf::from(".") } else { recipe_dir };
    let sde = opts.source_date_epoch;

    // [image]
    let name = &recipe.image.name;
    let name_ok = name.value.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.value.len() <= 48
        && name.value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !name_ok {
        return Err(with_help(
            src.error(name.span.clone(), format!("image name `{}` is not allowed", name.value)),
            "use lowercase letters, digits and `-`, starting with a letter, at most 48 characters",
        )
        .into());
    }
    let version = match &opts.version {
        Some(v) => v.clone(),
        None => semver::Version::parse(&recipe.image.version.value).map_err(|e| {
            with_help(
                src.error(recipe.image.version.span.clone(), format!("version is not semver: {e}")),
                "write a version such as \"1.0.0\"",
            )
        })?,
    };

    // The board.
    let board_spec = opts.board.clone().unwrap_or_else(|| recipe.image.board.value.clone());
    let board_path = find_board(&board_spec, &recipe_dir).ok_or_else(|| {
        let d =
            src.error(recipe.image.board.span.clone(), format!("board `{board_spec}` not found"));
        with_help(d, "give a board name from boards/ (e.g. qemu-x86_64) or a path to a board file")
    })?;
    let board_src = read_source(&board_path)?;
    let board: Board = board_src.parse()?;
    let board_parent = board_path.parent().unwrap_or(Path::new("."));
    match board.buildable_bootloader(&board_src)? {
        BootFirmware::SystemdBoot(sd_boot_key) => {
            let sd_boot = host_path(board_parent, sd_boot_key);
            if !sd_boot.is_file() {
                return Err(with_help(
                    board_src.error(
                        sd_boot_key.span.clone(),
                        format!("`{}` does not exist", sd_boot.display()),
                    ),
                    "install Debian's systemd-boot-efi (ci/setup.sh does) or point at the EFI \
                     binary",
                )
                .into());
            }
        }
        BootFirmware::Tryboot(t) => {
            for f in &t.firmware {
                let full = host_path(board_parent, f);
                if !full.exists() {
                    return Err(with_help(
                        board_src.error(
                            f.span.clone(),
                            format!("firmware file `{}` does not exist", full.display()),
                        ),
                        "copy it from the boot/ folder of Raspberry Pi's firmware repository \
                         (github.com/raspberrypi/firmware), or fix the path in [tryboot] \
                         firmware (relative to the board file)",
                    )
                    .into());
                }
            }
        }
        // U-Boot and its environment are the board's own; the image holds
        // only the environment's first copies.
        BootFirmware::UBoot(_) => {}
    }

    // The kernel: the recipe's, if it names one, else the board's.
    let k = &recipe.kernel;
    let board_dir = board_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let (kernel, kernel_at) = if k.deb.is_some() || k.vmlinuz.is_some() || k.modules_dir.is_some() {
        let kernel = load_kernel(&src, &recipe_dir, &k.deb, &k.vmlinuz, &k.modules_dir, opts)?;
        (kernel, (&src, k.deb.as_ref().or(k.vmlinuz.as_ref()).map(|l| l.span.clone())))
    } else if let Some(bk) = &board.kernel {
        let kernel =
            load_kernel(&board_src, &board_dir, &bk.deb, &bk.vmlinuz, &bk.modules_dir, opts)?;
        (kernel, (&board_src, bk.deb.as_ref().or(bk.vmlinuz.as_ref()).map(|l| l.span.clone())))
    } else {
        return Err(with_help(
            board_src.error(
                board.name.span.clone(),
                format!(
                    "board `{}` names no kernel, and the recipe's [kernel] names none either",
                    board.name.value
                ),
            ),
            "add [kernel] deb = \"../.cache/kernel/linux-image-cloud-<arch>.deb\" to the board \
             file (ci/setup.sh fetches Debian's cloud kernels), or `deb` to the recipe's [kernel]",
        )
        .into());
    };
    check_kernel_arch(&kernel, &board, kernel_at.0, kernel_at.1.unwrap_or(0..0))?;
    let module_signatures = module_signature_policy(&src, &kernel, &board, k)?;
    let index = ModuleIndex::scan(&kernel)?;
    let module_err = |src: &Source, span: std::ops::Range<usize>, e: kernel::KernelError| match e {
        kernel::KernelError::UnknownModule { .. } => {
            PlanError::from(src.error(span, e.to_string()))
        }
        other => other.into(),
    };
    let mut stage1_names = Vec::new();
    for m in &board.stage1_modules {
        index.closure([m.value.as_str()]).map_err(|e| module_err(&board_src, m.span.clone(), e))?;
        stage1_names.push(m.value.as_str());
    }
    let stage1_modules = index.closure(stage1_names)?;
    for m in &board.modules {
        index.closure([m.value.as_str()]).map_err(|e| module_err(&board_src, m.span.clone(), e))?;
    }
    for m in &k.modules {
        index.closure([m.value.as_str()]).map_err(|e| module_err(&src, m.span.clone(), e))?;
    }
    // The board's first (the hardware), then the recipe's; one closure, so
    // a dependency shared by both is copied and loaded once.
    let rootfs_modules =
        index.closure(board.modules.iter().chain(&k.modules).map(|m| m.value.as_str()))?;
    let stage2_modules: Vec<String> = rootfs_modules
        .iter()
        .map(|m| format!("/lib/modules/{}/{}", kernel.release, m.rel_path.display()))
        .collect();

    // The root filesystem.
    let dir_meta = Meta::root(0o755, sde);
    let mut tree = Tree::new(dir_meta);
    // What basalt itself adds can only clash with itself: a bug, reported
    // at the top of the recipe rather than at any one key.
    let add = |path: &str, r: Result<(), crate::tree::TreeError>| {
        r.map_err(|e| PlanError::from(src.error(0..0, format!("{path}: {e}"))))
    };
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp", "/data", "/etc", "/sbin", "/usr/bin"] {
        let r = tree.add_dir(d, dir_meta, Origin::Build);
        add(d, r)?;
    }
    let init_binary = find_device_binary("basalt-init", board.arch, opts.device_bin.as_deref())?;
    let init_bytes = std::fs::read(&init_binary)
        .map_err(|source| PlanError::Read { path: init_binary.clone(), source })?;
    let init_bytes = Arc::new(init_bytes);
    let r = tree.add_file("/sbin/init", init_bytes.clone(), Meta::root(0o755, sde), Origin::Build);
    add("/sbin/init", r)?;
    let os_release = format!(
        "NAME=basalt\nID=basalt\nIMAGE_ID={}\nIMAGE_VERSION={}\nVARIANT_ID={}\n",
        name.value, version, board.name.value
    );
    let r = tree.add_file(
        "/etc/os-release",
        os_release.into_bytes(),
        Meta::root(0o644, sde),
        Origin::Build,
    );
    add("/etc/os-release", r)?;
    for (m, path) in rootfs_modules.iter().zip(&stage2_modules) {
        let bytes = kernel.read_module(&m.rel_path, module_signatures)?;
        let r = tree.add_file(
            path,
            bytes,
            Meta::root(0o644, sde),
            Origin::Kernel(kernel.origin.clone()),
        );
        add(path, r)?;
    }

    for d in &recipe.dirs {
        check_image_path(&src, &d.path)?;
        let mode = d.mode.as_ref().map(|m| m.value.0).unwrap_or(0o755);
        let meta = Meta { uid: d.owner, gid: d.group, mode, mtime: sde };
        let origin = Origin::Recipe(format!("dir {}", d.path.value));
        tree.add_dir(&d.path, meta, origin.clone())
            .map_err(|e| tree_error(&src, d.path.span.clone(), e))?;
        if let Some(source) = &d.source {
            let full = host_path(&recipe_dir, source);
            copy_host_dir(&mut tree, &full, &d.path, d.owner, d.group, sde, &origin).map_err(
                |e| match e {
                    CopyError::Io(e) => missing_input(&src, source, &full, e),
                    CopyError::Tree(e) => tree_error(&src, d.path.span.clone(), e),
                },
            )?;
        }
    }
    for f in &recipe.files {
        check_image_path(&src, &f.path)?;
        let (bytes, default_mode, origin) = match (&f.source, &f.text, &f.build) {
            (Some(source), None, None) => {
                let full = host_path(&recipe_dir, source);
                let bytes =
                    std::fs::read(&full).map_err(|e| missing_input(&src, source, &full, e))?;
                let exec = std::fs::metadata(&full)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
                    .unwrap_or(false);
                (
                    Arc::new(bytes),
                    if exec { 0o755 } else { 0o644 },
                    format!("file {} from {}", f.path.value, source.display()),
                )
            }
            (None, Some(text), None) => (
                Arc::new(text.clone().into_bytes()),
                0o644,
                format!("file {} (inline)", f.path.value),
            ),
            (None, None, Some(build)) => {
                if !DEVICE_PROGRAMS.contains(&build.value.as_str()) {
                    return Err(with_help(
                        src.error(
                            build.span.clone(),
                            format!("`{}` is not a basalt device program", build.value),
                        ),
                        "the device programs are: basalt-demo, basalt-init, basalt-runtime",
                    )
                    .into());
                }
                let path =
                    find_device_binary(&build.value, board.arch, opts.device_bin.as_deref())?;
                let bytes = std::fs::read(&path)
                    .map_err(|source| PlanError::Read { path: path.clone(), source })?;
                (
                    Arc::new(bytes),
                    0o755,
                    format!("file {} (basalt build {})", f.path.value, build.value),
                )
            }
            _ => {
                return Err(with_help(
                    src.error(
                        f.path.span.clone(),
                        format!("file `{}` needs exactly one of source, text, build", f.path.value),
                    ),
                    "source = a host file, text = inline content, build = a basalt device program",
                )
                .into())
            }
        };
        let mode = f.mode.as_ref().map(|m: &Located<Mode>| m.value.0).unwrap_or(default_mode);
        let meta = Meta { uid: f.owner, gid: f.group, mode, mtime: sde };
        let origin = if f.build.is_some() { Origin::Build } else { Origin::Recipe(origin) };
        tree.add_file(&f.path, bytes, meta, origin)
            .map_err(|e| tree_error(&src, f.path.span.clone(), e))?;
    }
    for t in &recipe.tarballs {
        let dest = t.path.as_ref().map(|p| p.value.clone()).unwrap_or_else(|| "/".into());
        if let Some(p) = &t.path {
            check_image_path(&src, p)?;
        }
        let full = host_path(&recipe_dir, &t.source);
        unpack_tarball(&mut tree, &full, &dest, sde).map_err(|e| match e {
            CopyError::Io(e) => missing_input(&src, &t.source, &full, e),
            CopyError::Tree(e) => tree_error(&src, t.source.span.clone(), e),
        })?;
    }

    let n = &recipe.network;
    let mode = match n.mode.as_ref().map(|m| m.value.as_str()) {
        None | Some("none") => NetworkMode::None,
        Some("dhcp") => NetworkMode::Dhcp,
        Some("static") => NetworkMode::Static,
        Some(other) => {
            let span = n.mode.as_ref().map(|m| m.span.clone()).unwrap_or(0..0);
            return Err(with_help(
                src.error(span, format!("unknown network mode `{other}`")),
                "use none, dhcp or static",
            )
            .into());
        }
    };
    if mode == NetworkMode::Static && n.address.is_none() {
        let span = n.mode.as_ref().map(|m| m.span.clone()).unwrap_or(0..0);
        return Err(with_help(
            src.error(span, "static network needs `address`"),
            "e.g. address = \"192.168.1.10/24\"",
        )
        .into());
    }
    // Checked here, with the line, rather than on the device at boot.
    if let Some(a) = &n.address {
        config::parse_cidr(&a.value)
            .map_err(|e| PlanError::from(src.error(a.span.clone(), e.to_string())))?;
    }
    if let Some(g) = &n.gateway {
        config::parse_gateway(&g.value)
            .map_err(|e| PlanError::from(src.error(g.span.clone(), e.to_string())))?;
    }
    let network = NetworkConfig {
        interface: (mode != NetworkMode::None)
            .then(|| n.interface.clone().unwrap_or_else(|| "eth0".into())),
        mode,
        address: n.address.as_ref().map(|a| a.value.clone()),
        gateway: n.gateway.as_ref().map(|a| a.value.clone()),
        dns: n.dns.clone(),
    };

    // Services, checked against the tree they will run from.
    let mut services = Vec::new();
    let mut seen = BTreeSet::new();
    for s in &recipe.services {
        if !seen.insert(s.name.value.clone()) {
            return Err(src
                .error(s.name.span.clone(), format!("service `{}` is defined twice", s.name.value))
                .into());
        }
        let Some(program) = s.command.value.first() else {
            return Err(src.error(s.command.span.clone(), "command is empty").into());
        };
        match tree.get(program) {
            Some(node)
                if matches!(node.kind, crate::tree::NodeKind::File(_))
                    && node.meta.mode & 0o111 != 0 => {}
            Some(_) => {
                return Err(with_help(
                    src.error(
                        s.command.span.clone(),
                        format!("`{program}` is in the image but not an executable file"),
                    ),
                    "give it mode = 0o755 in its [[file]] entry",
                )
                .into())
            }
            None => {
                return Err(with_help(
                    src.error(s.command.span.clone(), format!("`{program}` is not in the image")),
                    "add it with a [[file]] entry, or fix the path",
                )
                .into())
            }
        }
        let restart = match s.restart.as_ref().map(|r| r.value.as_str()) {
            None | Some("on-failure") => RestartPolicy::OnFailure,
            Some("always") => RestartPolicy::Always,
            Some("never") => RestartPolicy::Never,
            Some(other) => {
                let span = s.restart.as_ref().map(|r| r.span.clone()).unwrap_or(0..0);
                return Err(with_help(
                    src.error(span, format!("unknown restart policy `{other}`")),
                    "use always, on-failure or never",
                )
                .into());
            }
        };
        let health = match &s.health {
            None => None,
            Some(h) => {
                let probe = match (&h.http, &h.command) {
                    (Some(url), None) => {
                        if !url.value.starts_with("http://") {
                            return Err(src.error(url.span.clone(), "health URL must start with http:// (loopback only)").into());
                        }
                        HealthProbe::Http(url.value.clone())
                    }
                    (None, Some(cmd)) if !cmd.is_empty() => HealthProbe::Command(cmd.clone()),
                    _ => {
                        return Err(with_help(
                            src.error(s.name.span.clone(), format!("service `{}`: [service.health] needs exactly one of http or command", s.name.value)),
                            "e.g. http = \"http://127.0.0.1:8000/healthz\"",
                        )
                        .into())
                    }
                };
                Some(HealthCheck {
                    probe,
                    interval_ms: h.interval.as_millis(),
                    timeout_ms: h.timeout.as_millis(),
                })
            }
        };
        services.push(ServiceConfig {
            name: s.name.value.clone(),
            command: s.command.value.clone(),
            env: s.env.clone(),
            restart,
            restart_delay_ms: s.restart_delay.as_millis(),
            restart_delay_max_ms: s.restart_delay_max.as_millis().max(s.restart_delay.as_millis()),
            after: s.after.iter().map(|a| a.value.clone()).collect(),
            health,
            required: s.required,
        });
    }
    // With DHCP, the client is a service the builder adds; recipe services
    // may wait for it by name.
    let dhcp_service = (network.mode == NetworkMode::Dhcp).then(|| {
        let iface = network.interface.clone().unwrap_or_else(|| "eth0".into());
        ServiceConfig {
            name: DHCP_SERVICE.into(),
            command: vec!["/sbin/init".into(), "dhcp".into(), iface],
            env: BTreeMap::new(),
            restart: RestartPolicy::Always,
            restart_delay_ms: 1000,
            restart_delay_max_ms: 30_000,
            after: Vec::new(),
            health: None,
            required: false,
        }
    });
    for s in &recipe.services {
        if dhcp_service.is_some() && s.name.value == DHCP_SERVICE {
            return Err(with_help(
                src.error(
                    s.name.span.clone(),
                    format!("service name `{DHCP_SERVICE}` is taken by the DHCP client"),
                ),
                "network.mode = \"dhcp\" adds a service of that name; rename this one",
            )
            .into());
        }
        for a in &s.after {
            if dhcp_service.is_some() && a.value == DHCP_SERVICE {
                continue;
            }
            if !seen.contains(&a.value) {
                return Err(src
                    .error(
                        a.span.clone(),
                        format!(
                            "service `{}` waits for `{}`, which is not defined",
                            s.name.value, a.value
                        ),
                    )
                    .into());
            }
        }
    }

    if let Some(d) = dhcp_service {
        // First, so it starts before the services that wait for it.
        services.insert(0, d);
    }

    let (update, signing_key) = match &recipe.update {
        None => (None, None),
        Some(u) => {
            let has_dhcp = services.first().is_some_and(|s| s.name == DHCP_SERVICE);
            let resolved = resolve_update(&src, &recipe_dir, u, board.arch, opts, &mut tree)?;
            let (config, service, signing_key) = resolved;
            if seen.contains(&service.name) {
                return Err(with_help(
                    src.error(
                        0..0,
                        format!("service name `{AGENT_SERVICE}` is taken by the update agent"),
                    ),
                    "[update] adds a service of that name; rename yours",
                )
                .into());
            }
            let mut service = service;
            if has_dhcp {
                service.after.push(DHCP_SERVICE.into());
            }
            services.push(service);
            (Some(config), signing_key)
        }
    };
    let signing_key = opts.signing_key.clone().or(signing_key);

    // [[model]]: signed model bundles in the image.
    if let Some(first) = recipe.models.first() {
        let Some(key_path) = &signing_key else {
            return Err(with_help(
                src.error(
                    first.onnx.span.clone(),
                    "a baked-in model is a signed bundle, but there is no signing key",
                ),
                "add [update] with trusted_keys and signing_key (or pass --key)",
            )
            .into());
        };
        let key = crate::ota::read_signing_key(key_path)
            .map_err(|e| PlanError::from(src.error(first.onnx.span.clone(), e.to_string())))?;
        let r = tree.add_dir(MODELS_DIR, dir_meta, Origin::Build);
        add(MODELS_DIR, r)?;
        for m in &recipe.models {
            let onnx = host_path(&recipe_dir, &m.onnx.value);
            let config = host_path(&recipe_dir, &m.config.value);
            std::fs::metadata(&onnx).map_err(|e| missing_input(&src, &m.onnx, &onnx, e))?;
            std::fs::metadata(&config).map_err(|e| missing_input(&src, &m.config, &config, e))?;
            let content = crate::ota::ModelContent::from_files(&onnx, &config)
                .map_err(|e| PlanError::from(src.error(m.config.span.clone(), e.to_string())))?;
            let bytes = crate::ota::model_bundle_bytes(
                &content,
                std::slice::from_ref(&key),
                std::slice::from_ref(&board.name.value),
                sde,
            )
            .map_err(|e| PlanError::from(src.error(m.onnx.span.clone(), e.to_string())))?;
            let path =
                format!("{MODELS_DIR}/{}-{}.basalt", content.config.name, content.config.version);
            tree.add_file(
                &path,
                bytes,
                Meta::root(0o644, sde),
                Origin::Recipe(format!("model {}", onnx.display())),
            )
            .map_err(|e| tree_error(&src, m.onnx.span.clone(), e))?;
        }
    }

    let b = &recipe.boot;
    if b.tries.value == 0 || b.tries.value > 9 {
        return Err(with_help(
            src.error(b.tries.span.clone(), "tries must be 1 to 9"),
            "3 is a good default",
        )
        .into());
    }
    let hostname = recipe
        .image
        .hostname
        .as_ref()
        .map(|h| h.value.clone())
        .unwrap_or_else(|| name.value.clone());
    let image_config = ImageConfig {
        name: name.value.clone(),
        version: version.to_string(),
        board: board.name.value.clone(),
        hostname,
        modules: stage2_modules,
        network,
        update,
        boot: BootConfig {
            bless_after_ms: b.bless_after.as_millis(),
            bless_deadline_ms: b.bless_deadline.as_millis(),
            stop_timeout_ms: b.stop_timeout.as_millis(),
        },
        services,
    };
    tree.add_file(
        IMAGE_CONFIG_PATH,
        image_config.to_toml().into_bytes(),
        Meta::root(0o644, sde),
        Origin::Build,
    )
    .map_err(|e| PlanError::from(src.error(0..0, e.to_string())))?;
    let bootloader = board.bootloader_config();
    if !bootloader.is_default() {
        tree.add_file(
            BOOTLOADER_CONFIG_PATH,
            bootloader.to_toml().into_bytes(),
            Meta::root(0o644, sde),
            Origin::Build,
        )
        .map_err(|e| PlanError::from(src.error(0..0, e.to_string())))?;
    }
    tree.add_file(
        "/etc/hostname",
        format!("{}\n", image_config.hostname).into_bytes(),
        Meta::root(0o644, sde),
        Origin::Build,
    )
    .map_err(|e| PlanError::from(src.error(0..0, e.to_string())))?;

    let mut cmdline: Vec<String> = board.cmdline.clone();
    cmdline.extend(k.cmdline.iter().cloned());
    Ok(Plan {
        recipe_path: recipe_path.to_path_buf(),
        board_path,
        name: name.value.clone(),
        version,
        source_date_epoch: sde,
        kernel,
        stage1_modules,
        module_signatures,
        init_binary,
        rootfs: tree,
        image_config,
        cmdline: cmdline.join(" "),
        tries: b.tries.value,
        ports: recipe.run.ports.clone(),
        memory_mib: recipe.run.memory_mib,
        signing_key,
        board,
    })
}

/// `[update]`: checks it, puts the agent, its keys and its token into the
/// tree, and returns the agent's configuration and service.
fn resolve_update(
    src: &Source,
    recipe_dir: &Path,
    u: &UpdateSection,
    arch: Arch,
    opts: &PlanOptions,
    tree: &mut Tree,
) -> Result<(UpdateConfig, ServiceConfig, Option<PathBuf>), PlanError> {
    let sde = opts.source_date_epoch;
    if u.trusted_keys.is_empty() {
        return Err(with_help(
            src.error(0..0, "[update] needs at least one trusted key"),
            "make one with `basalt keygen --out keys/release` and list \"keys/release.pub\"",
        )
        .into());
    }
    let mut ids = BTreeSet::new();
    for k in &u.trusted_keys {
        let full = host_path(recipe_dir, &k.value);
        let pem = std::fs::read_to_string(&full).map_err(|e| missing_input(src, k, &full, e))?;
        let key = PublicKey::from_pem(&pem).map_err(|e| {
            with_help(
                src.error(k.span.clone(), format!("`{}` is not a public key: {e}", full.display())),
                "list the `.pub` file `basalt keygen` wrote (an ed25519 public key in PEM)",
            )
        })?;
        let id = key.key_id();
        if !ids.insert(id.clone()) {
            continue;
        }
        let path = format!("{TRUSTED_KEYS_DIR}/{id}.pub");
        let pem =
            key.to_pem().map_err(|e| PlanError::from(src.error(k.span.clone(), e.to_string())))?;
        tree.add_file(&path, pem.into_bytes(), Meta::root(0o644, sde), Origin::Build)
            .map_err(|e| tree_error(src, k.span.clone(), e))?;
    }
    let threshold = u.threshold.value;
    if threshold == 0 || threshold > ids.len() {
        return Err(with_help(
            src.error(
                u.threshold.span.clone(),
                format!("threshold {threshold} with {} distinct trusted key(s)", ids.len()),
            ),
            "the threshold is 1 up to the number of trusted keys",
        )
        .into());
    }
    let listen: std::net::SocketAddr = u.listen.value.parse().map_err(|_| {
        with_help(
            src.error(u.listen.span.clone(), format!("`{}` is not an address", u.listen.value)),
            "write an address and port such as \"127.0.0.1:7400\"",
        )
    })?;
    let token_file = match &u.token_file {
        Some(t) => {
            let full = host_path(recipe_dir, &t.value);
            let token =
                std::fs::read_to_string(&full).map_err(|e| missing_input(src, t, &full, e))?;
            let token = token.trim();
            if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(with_help(
                    src.error(t.span.clone(), "the token must be 16 or more visible characters"),
                    "e.g. `openssl rand -hex 16 > agent.token`",
                )
                .into());
            }
            tree.add_file(
                AGENT_TOKEN_PATH,
                format!("{token}\n").into_bytes(),
                Meta::root(0o600, sde),
                Origin::Build,
            )
            .map_err(|e| tree_error(src, t.span.clone(), e))?;
            Some(AGENT_TOKEN_PATH.to_string())
        }
        None if !listen.ip().is_loopback() => {
            return Err(with_help(
                src.error(
                    u.listen.span.clone(),
                    format!("the agent's API on {listen} would take updates from the network without a token"),
                ),
                "add `token_file = \"agent.token\"` (16+ characters), or listen on 127.0.0.1",
            )
            .into());
        }
        None => None,
    };
    if let Some(r) = &u.repository {
        let ok = r.value.strip_prefix("http://").is_some_and(|rest| !rest.is_empty());
        if !ok {
            return Err(with_help(
                src.error(r.span.clone(), format!("repository `{}` is not an http:// URL", r.value)),
                "e.g. \"http://updates.example.com/fleet/\"; bundles and channels are signed, so plain HTTP is safe for integrity",
            )
            .into());
        }
    }
    let channel = &u.channel;
    let channel_ok = !channel.value.is_empty()
        && channel.value.len() <= 64
        && channel.value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !channel.value.starts_with('.');
    if !channel_ok {
        return Err(with_help(
            src.error(
                channel.span.clone(),
                format!("channel `{}` is not a plain name", channel.value),
            ),
            "use letters, digits, `-`, `_` and `.`, such as \"stable\"",
        )
        .into());
    }
    for m in &u.models {
        // The name must make a model channel path on the device too.
        let channel_ok = basalt_bundle::channel::model_channel_path(&m.value, "stable").is_ok();
        if !basalt_bundle::model::valid_name(&m.value) || !channel_ok {
            return Err(with_help(
                src.error(m.span.clone(), format!("model `{}` is not a model name", m.value)),
                "use the `name` of the model's model.toml: letters, digits, `-`, `_` and `.`, \
                 not starting with `.` or `-`",
            )
            .into());
        }
    }
    let runtime = &u.runtime;
    if runtime.value.strip_prefix("http://").is_none_or(|rest| rest.is_empty()) {
        return Err(with_help(
            src.error(
                runtime.span.clone(),
                format!("runtime `{}` is not an http:// URL", runtime.value),
            ),
            "e.g. \"http://127.0.0.1:8000\", where basalt-runtime listens",
        )
        .into());
    }
    let agent = find_device_binary("basalt-agent", arch, opts.device_bin.as_deref())?;
    let bytes =
        std::fs::read(&agent).map_err(|source| PlanError::Read { path: agent.clone(), source })?;
    tree.add_file(AGENT_PATH, bytes, Meta::root(0o755, sde), Origin::Build)
        .map_err(|e| PlanError::from(src.error(0..0, format!("{AGENT_PATH}: {e}"))))?;
    let config = UpdateConfig {
        threshold,
        listen: listen.to_string(),
        token_file,
        repository: u.repository.as_ref().map(|r| r.value.clone()),
        channel: channel.value.clone(),
        poll_interval_ms: u.poll_interval.as_millis().max(1000),
        poll_jitter_ms: u.poll_jitter.as_millis(),
        reboot: u.reboot,
        models: u.models.iter().map(|m| m.value.clone()).collect(),
        runtime: runtime.value.clone(),
    };
    let health_addr = if listen.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    };
    let service = ServiceConfig {
        name: AGENT_SERVICE.into(),
        command: vec![AGENT_PATH.into()],
        env: BTreeMap::new(),
        restart: RestartPolicy::Always,
        restart_delay_ms: 1000,
        restart_delay_max_ms: 30_000,
        after: Vec::new(),
        health: Some(HealthCheck {
            probe: HealthProbe::Http(format!("http://{health_addr}/v1/health")),
            interval_ms: 1000,
            timeout_ms: 1000,
        }),
        required: true,
    };
    let signing_key = u.signing_key.as_ref().map(|k| host_path(recipe_dir, &k.value));
    Ok((config, service, signing_key))
}

enum CopyError {
    Io(std::io::Error),
    Tree(crate::tree::TreeError),
}

impl From<std::io::Error> for CopyError {
    fn from(e: std::io::Error) -> Self {
        CopyError::Io(e)
    }
}

impl From<crate::tree::TreeError> for CopyError {
    fn from(e: crate::tree::TreeError) -> Self {
        CopyError::Tree(e)
    }
}

/// Copies a host folder into the tree, sorted, keeping permission bits and
/// links, with the given owner and the build's time.
fn copy_host_dir(
    tree: &mut Tree,
    host: &Path,
    dest: &str,
    uid: u32,
    gid: u32,
    mtime: u64,
    origin: &Origin,
) -> Result<(), CopyError> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = std::fs::read_dir(host)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = format!("{}/{}", dest.trim_end_matches('/'), name);
        let md = std::fs::symlink_metadata(e.path())?;
        let meta = Meta { uid, gid, mode: md.permissions().mode() & 0o7777, mtime };
        if md.is_dir() {
            tree.add_dir(&path, meta, origin.clone())?;
            copy_host_dir(tree, &e.path(), &path, uid, gid, mtime, origin)?;
        } else if md.file_type().is_symlink() {
            let target = std::fs::read_link(e.path())?;
            tree.add_symlink(
                &path,
                &target.to_string_lossy(),
                Meta { mode: 0o777, ..meta },
                origin.clone(),
            )?;
        } else if md.is_file() {
            tree.add_file(&path, std::fs::read(e.path())?, meta, origin.clone())?;
        }
    }
    Ok(())
}

/// Unpacks a tar archive into the tree below `dest`.
fn unpack_tarball(tree: &mut Tree, archive: &Path, dest: &str, sde: u64) -> Result<(), CopyError> {
    use std::io::Read;
    let file = std::fs::File::open(archive)?;
    let name = archive.to_string_lossy();
    let reader: Box<dyn Read> = if name.ends_with(".gz") || name.ends_with(".tgz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(file)?)
    } else {
        Box::new(file)
    };
    let origin = Origin::Recipe(format!("tarball {}", archive.display()));
    let mut tar = tar::Archive::new(reader);
    let mut links: BTreeMap<String, String> = BTreeMap::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.to_string_lossy().into_owned();
        let rel = rel.trim_start_matches("./").trim_end_matches('/');
        if rel.is_empty() {
            continue;
        }
        let path = if dest == "/" { format!("/{rel}") } else { format!("{dest}/{rel}") };
        let h = entry.header();
        let meta = Meta {
            uid: h.uid().unwrap_or(0) as u32,
            gid: h.gid().unwrap_or(0) as u32,
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            mtime: h.mtime().unwrap_or(sde).min(sde),
        };
        let kind = h.entry_type();
        if kind.is_dir() {
            tree.add_dir(&path, meta, origin.clone())?;
        } else if kind.is_symlink() {
            let target =
                entry.link_name()?.map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
            tree.add_symlink(&path, &target, meta, origin.clone())?;
        } else if kind.is_hard_link() {
            let target =
                entry.link_name()?.map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
            links.insert(path, target);
        } else if kind.is_file() {
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            tree.add_file(&path, data, meta, origin.clone())?;
        }
    }
    // Hard links become copies: squashfs would store them once anyway.
    for (path, target) in links {
        let target = if dest == "/" {
            format!("/{}", target.trim_start_matches("./"))
        } else {
            format!("{dest}/{}", target.trim_start_matches("./"))
        };
        if let Some(node) = tree.get(&target).cloned() {
            if let crate::tree::NodeKind::File(data) = node.kind {
                tree.add_file(&path, data, node.meta, origin.clone())?;
            }
        }
    }
    Ok(())
}
