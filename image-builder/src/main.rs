//! The `basalt` command: parses arguments, calls the library, maps errors to
//! exit codes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

use basalt::ota;
use basalt::plan::{self, PlanOptions};
use basalt_bundle::keys::SigningKey;

/// Build, inspect and run basalt images.
#[derive(Parser)]
#[command(name = "basalt", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a disk image from a recipe.
    ///
    /// Writes DIR/disk.img, DIR/report.json, DIR/disk.img.bmap and
    /// DIR/sbom.spdx.json. The build happens in a temporary folder that is
    /// renamed at the end: a failed build leaves nothing behind.
    Build {
        /// The recipe file.
        recipe: PathBuf,
        /// A board name from boards/ or a path to a board file; the
        /// recipe's `image.board` by default.
        #[arg(long)]
        board: Option<String>,
        /// Output folder; `out/<image name>` by default.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the build report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Fill slot b too, with the image of this second recipe (same
        /// board); slot b is empty otherwise.
        #[arg(long)]
        slot_b: Option<PathBuf>,
        /// Folder with the static device programs (basalt-init,
        /// basalt-demo); found beside basalt by default.
        #[arg(long, env = "BASALT_DEVICE_BIN")]
        device_bin: Option<PathBuf>,
        /// Sign DIR/update.basalt (the OTA bundle of this image) with this
        /// private key; overrides the recipe's `update.signing_key`.
        #[arg(long, value_name = "KEY")]
        key: Option<PathBuf>,
        /// Use this version instead of the recipe's `image.version` (for
        /// pipelines that number their builds).
        #[arg(long, value_name = "SEMVER")]
        image_version: Option<semver::Version>,
    },
    /// Make the signed OTA bundle of a build's image (slot a of
    /// DIR/disk.img), as `build --key` does.
    Bundle {
        /// A `basalt build` output folder.
        dir: PathBuf,
        /// Private key(s) to sign with (repeat for several).
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        /// The bundle file; DIR/update.basalt by default.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Add a signature to a bundle (for a threshold of keys, or a new key
    /// being rolled out). The bundle is rewritten in place.
    Sign {
        /// The bundle.
        bundle: PathBuf,
        /// The private key.
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
    },
    /// Check a bundle as a device would: signatures by trusted keys, then
    /// every payload against the manifest.
    Verify {
        /// The bundle.
        bundle: PathBuf,
        /// Trusted public key(s) (repeat for several).
        #[arg(long = "pubkey", value_name = "PUB", required = true)]
        pubkeys: Vec<PathBuf>,
        /// How many of them must have signed.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put a bundle into an update repository (a folder of static files)
    /// and point a channel at it.
    ///
    /// Writes REPO/bundles/<name>-<version>.basalt and the signed
    /// REPO/channels/<channel>.toml (+ .sig); a model bundle goes to
    /// REPO/bundles/models/ and REPO/channels/models/<name>/<channel>.toml.
    /// Serve REPO with any HTTP server, or `basalt serve REPO`.
    Publish {
        /// The bundle.
        bundle: PathBuf,
        /// The repository folder (created if missing).
        #[arg(long)]
        repo: PathBuf,
        /// The channel.
        #[arg(long, default_value = "stable")]
        channel: String,
        /// Percentage of devices that take this version (by a stable hash
        /// of their machine id).
        #[arg(long, default_value_t = 100)]
        rollout: u8,
        /// How long the channel file stays valid; devices refuse it after
        /// (so a replayed old file cannot freeze them). E.g. 7d, 12h.
        #[arg(long, default_value = "7d")]
        expires: String,
        /// Private key(s) that sign the channel file.
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Model bundles for the runtime.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Show partitions, slots, boot entries and versions of a disk image.
    Inspect {
        /// The disk image.
        disk: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Boot a disk image in QEMU with its serial console on this terminal.
    ///
    /// Ports the recipe lists under [run] are forwarded to 127.0.0.1.
    /// Ctrl-C (or SIGTERM) stops the machine and exits 128 + the signal.
    /// The image file is used directly, so boot counters and the data
    /// partition persist between runs.
    Run {
        /// The disk image (its report.json beside it names the board).
        disk: PathBuf,
        /// Board name or file, when there is no report.json beside the disk.
        #[arg(long)]
        board: Option<String>,
        /// Stop with success as soon as the console prints this text.
        #[arg(long)]
        until: Option<String>,
        /// Give up after this many seconds (exit code 3).
        #[arg(long)]
        timeout: Option<u64>,
        /// Forward this guest TCP port to the same port on 127.0.0.1
        /// (repeatable; adds to the recipe's).
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// Write the console to this file as well.
        #[arg(long)]
        console_log: Option<PathBuf>,
    },
    /// Make an ed25519 signing key for update bundles.
    ///
    /// Writes NAME.key (the private key, PKCS#8 PEM, mode 0600) and NAME.pub
    /// (the public key, PEM) and prints the key id. Both are the formats
    /// OpenSSL reads and writes. An existing file is never overwritten.
    Keygen {
        /// Path and base name of the two files, without extension.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
    },
    /// Serve an update repository over HTTP, for development.
    ///
    /// Serves the files under DIR (GET and HEAD; no listings) with ETags
    /// and byte ranges, so devices can poll channels and resume bundle
    /// downloads. Prints `serving DIR on http://ADDR/` once it listens and
    /// one line per request on stderr. Ctrl-C stops it. In the field, any
    /// static HTTP server or CDN serves the same directory.
    Serve {
        /// The update repository: the folder that holds channels/ and the
        /// bundles.
        dir: PathBuf,
        /// Address and port to listen on; port 0 picks a free port.
        #[arg(long, default_value = basalt::serve::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
    /// Print the JSON schema of recipe or board files (for editors).
    Schema {
        /// `recipe` or `board`.
        #[arg(value_parser = ["recipe", "board"])]
        kind: String,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Make a signed model bundle from an ONNX file and its model.toml
    /// (name, version and the test vector the runtime runs before it
    /// serves the model).
    Bundle {
        /// The ONNX model.
        onnx: PathBuf,
        /// Its model.toml.
        #[arg(long)]
        config: PathBuf,
        /// Private key(s) to sign with (repeat for several).
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        /// The bundle file; `<name>-<version>.basalt` by default.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Boards the model is for; any board by default.
        #[arg(long = "compatible", value_name = "BOARD")]
        compatible: Vec<String>,
    },
}

fn source_date_epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse().map_err(|_| {
            anyhow::anyhow!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds; unset it or give e.g. 1700000000")
        }),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)),
    }
}

/// `NAME` with `.ext` appended, keeping any dots already in the name
/// (`fleet.2025` gives `fleet.2025.key`, where `with_extension` would not).
fn with_suffix(name: &Path, ext: &str) -> PathBuf {
    let mut s = name.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Creates `path` with `contents`, failing if it exists; `mode` applies from
/// the moment the file exists, so a private key is never readable by others.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents).with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

/// Writes NAME.key and NAME.pub and returns the key id.
fn keygen(out: &Path) -> anyhow::Result<String> {
    let key_path = with_suffix(out, "key");
    let pub_path = with_suffix(out, "pub");
    // Check both first so that a refusal leaves nothing half-written; the
    // create_new below still guards against a file appearing in between.
    for path in [&key_path, &pub_path] {
        if path.symlink_metadata().is_ok() {
            anyhow::bail!(
                "{} already exists; keygen never overwrites a key, choose another --out name or \
                 move the old files away",
                path.display()
            );
        }
    }
    let key = SigningKey::generate()?;
    let public = key.public();
    write_new(&key_path, key.to_pkcs8_pem()?.as_bytes(), 0o600)?;
    write_new(&pub_path, public.to_pem()?.as_bytes(), 0o644)?;
    eprintln!("basalt: wrote {} (keep it secret) and {}", key_path.display(), pub_path.display());
    Ok(public.key_id())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let interactive = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
    match cli.command {
        Command::Build { recipe, board, out, json, slot_b, device_bin, key, image_version } => {
            let opts = PlanOptions {
                board,
                source_date_epoch: source_date_epoch()?,
                cache_dir: plan::default_cache_dir(),
                device_bin,
                version: image_version,
                signing_key: key,
            };
            let start = std::time::Instant::now();
            let plan = plan::resolve(&recipe, &opts)?;
            let plan_b = slot_b.map(|r| plan::resolve(&r, &opts)).transpose()?;
            let out = out.unwrap_or_else(|| PathBuf::from("out").join(&plan.name));
            let mut log = |line: &str| {
                if interactive {
                    eprintln!("\x1b[1mbasalt\x1b[0m: {line}");
                } else {
                    eprintln!("basalt: {line}");
                }
            };
            log(&format!("building {} {} for {}", plan.name, plan.version, plan.board.name.value));
            let report = basalt::build::build(&plan, plan_b.as_ref(), &out, &mut log)?;
            log(&format!("built {} in {:.2} s", out.display(), start.elapsed().as_secs_f64()));
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle { dir, keys, out } => {
            let keys =
                keys.iter().map(|k| ota::read_signing_key(k)).collect::<Result<Vec<_>, _>>()?;
            let content = ota::OsContent::from_output(&dir)?;
            let out = out.unwrap_or_else(|| dir.join(ota::BUNDLE_FILE));
            let s = ota::write_os_bundle(&content, &keys, &out)?;
            eprintln!(
                "basalt: wrote {} ({} {}, {} bytes, signed by {})",
                out.display(),
                s.name,
                s.version,
                s.size,
                s.signed_by.join(", ")
            );
            println!("{}", s.sha256);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sign { bundle, key } => {
            let key = ota::read_signing_key(&key)?;
            let ids = ota::sign_bundle(&bundle, &key)?;
            eprintln!("basalt: {} is signed by {}", bundle.display(), ids.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { bundle, pubkeys, threshold, json } => {
            let keys =
                pubkeys.iter().map(|k| ota::read_public_key(k)).collect::<Result<Vec<_>, _>>()?;
            let trust = basalt_bundle::archive::Trust { keys, threshold };
            let v = ota::verify_bundle(&bundle, &trust)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}: {} {} for {}, signed by {}; payloads {}",
                    bundle.display(),
                    v.name,
                    v.version,
                    v.compatible.join(", "),
                    v.signed_by.join(", "),
                    v.payloads
                        .iter()
                        .map(|(n, s)| format!("{n} ({s} bytes)"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish { bundle, repo, channel, rollout, expires, keys } => {
            let keys =
                keys.iter().map(|k| ota::read_signing_key(k)).collect::<Result<Vec<_>, _>>()?;
            let expires = basalt::duration::Duration::parse(&expires)
                .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let ch = ota::publish(&ota::Publish {
                bundle: &bundle,
                repo: &repo,
                channel: &channel,
                rollout,
                expires_in: expires.as_millis() / 1000,
                keys: &keys,
                now,
            })?;
            eprintln!(
                "basalt: channel {} of {} now offers {} {} to {}% of devices, until {}",
                ch.channel,
                repo.display(),
                ch.name,
                ch.version,
                ch.rollout,
                ch.expires
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Bundle { onnx, config, keys, out, compatible }) => {
            let keys =
                keys.iter().map(|k| ota::read_signing_key(k)).collect::<Result<Vec<_>, _>>()?;
            let content = ota::ModelContent::from_files(&onnx, &config)?;
            let c = &content.config;
            let out =
                out.unwrap_or_else(|| PathBuf::from(format!("{}-{}.basalt", c.name, c.version)));
            let bytes =
                ota::model_bundle_bytes(&content, &keys, &compatible, source_date_epoch()?)?;
            ota::write_atomic(&out, &bytes)?;
            eprintln!(
                "basalt: wrote {} ({} {}, {} bytes)",
                out.display(),
                c.name,
                c.version,
                bytes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { disk, json } => {
            let info = basalt::inspect::inspect(&disk)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { disk, board, until, timeout, ports, console_log } => {
            let outcome = basalt::qemu::run_disk(&basalt::qemu::RunOptions {
                disk,
                board,
                until,
                timeout: timeout.map(std::time::Duration::from_secs),
                extra_ports: ports,
                console_log,
                echo: true,
            })?;
            Ok(match outcome {
                basalt::qemu::Outcome::Exited(0) | basalt::qemu::Outcome::MarkerSeen => {
                    ExitCode::SUCCESS
                }
                basalt::qemu::Outcome::Exited(code) => ExitCode::from(code.clamp(1, 255) as u8),
                basalt::qemu::Outcome::TimedOut => {
                    eprintln!("basalt: timed out");
                    ExitCode::from(3)
                }
                basalt::qemu::Outcome::Stopped(signal) => {
                    eprintln!("basalt: stopped by signal {signal}; the machine is off");
                    ExitCode::from((128 + signal).clamp(1, 255) as u8)
                }
            })
        }
        Command::Keygen { out } => {
            let key_id = keygen(&out)?;
            println!("{key_id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { dir, listen } => {
            basalt::serve::serve(&dir, listen, |addr| {
                use std::io::Write;
                println!("serving {} on http://{addr}/", dir.display());
                let _ = std::io::stdout().flush();
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { kind } => {
            let schema = if kind == "board" {
                basalt::reference::board_schema()
            } else {
                basalt::reference::recipe_schema()
            };
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "basalt", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
