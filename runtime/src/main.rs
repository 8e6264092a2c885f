//! `basalt-runtime`: serves the signed model bundles found in its model
//! folders over the Open Inference Protocol (KServe V2).
//!
//! ```text
//! basalt-runtime [--listen ADDR] [--models DIR]... [--store DIR|none] [--keys DIR] [--threshold N]
//! ```
//!
//! Defaults: `0.0.0.0:8000`; the bundles baked into the image
//! (`--models`, `/usr/share/basalt/models`), the installed-model store
//! (`--store`, `/data/models/<name>/<version>/`, where the runtime also
//! records which version serves); trusted keys from `/etc/basalt/keys`,
//! threshold 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use basalt_bundle::archive::Trust;
use basalt_bundle::keys::PublicKey;
use basalt_bundle::model::StdDisk;
use basalt_runtime::repository::{self, Catalog, Settings};
use basalt_runtime::server::{self, Limits, Server};

/// Keeps freed large buffers (an inference's activations) mapped for the
/// next inference instead of musl's unmapping them; trimmed when idle.
#[global_allocator]
static ALLOC: basalt_runtime::alloc::Global = basalt_runtime::alloc::Global;

const USAGE: &str = "usage: basalt-runtime [--listen ADDR] [--models DIR]... [--store DIR|none] \
                     [--keys DIR] [--threshold N]";

struct Args {
    listen: String,
    models: Vec<PathBuf>,
    store: Option<PathBuf>,
    keys: PathBuf,
    threshold: usize,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        listen: "0.0.0.0:8000".into(),
        models: Vec::new(),
        store: Some(PathBuf::from("/data/models")),
        keys: PathBuf::from("/etc/basalt/keys"),
        threshold: 1,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value =
            || it.next().cloned().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--listen" => a.listen = value()?,
            "--models" => a.models.push(PathBuf::from(value()?)),
            "--store" => {
                let v = value()?;
                a.store = (v != "none").then(|| PathBuf::from(v));
            }
            "--keys" => a.keys = PathBuf::from(value()?),
            "--threshold" => {
                a.threshold =
                    value()?.parse().map_err(|_| format!("--threshold is a number\n{USAGE}"))?
            }
            "--version" => {
                println!("basalt-runtime {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.models.is_empty() {
        a.models = vec![PathBuf::from("/usr/share/basalt/models")];
    }
    Ok(a)
}

fn trust(dir: &std::path::Path, threshold: usize) -> Result<Trust, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("trusted keys in {}: {e}", dir.display()))?;
    let mut keys = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "pub") {
            let pem = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            keys.push(PublicKey::from_pem(&pem).map_err(|e| format!("{}: {e}", p.display()))?);
        }
    }
    if keys.is_empty() {
        return Err(format!("no trusted key (*.pub) in {}", dir.display()));
    }
    Ok(Trust { keys, threshold })
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = parse(&args)?;
    let trust = trust(&a.keys, a.threshold)?;
    let settings = Settings {
        store: a.store.clone(),
        baked: a.models.clone(),
        trust,
        boot_id: repository::boot_id(),
    };
    let catalog =
        Catalog::open(settings, Box::new(basalt_runtime::backend::load_onnx), Arc::new(StdDisk));
    // Loading the models freed large buffers that no inference will take.
    basalt_runtime::alloc::trim();
    if catalog.names().is_empty() {
        let mut dirs: Vec<String> = a.models.iter().map(|d| d.display().to_string()).collect();
        dirs.extend(a.store.iter().map(|d| d.display().to_string()));
        println!("no model bundles in {}", dirs.join(", "));
    }
    let server = Arc::new(Server::new(Arc::new(catalog), Limits::default()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
        println!(
            "serving on http://{}/v2 ({})",
            a.listen,
            if server.ready() { "ready" } else { "NOT ready: see /v2/health/ready" }
        );
        server::serve(listener, server).await;
        Ok(())
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("basalt-runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
