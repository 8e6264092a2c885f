//! `basalt-agent`: the update agent, a service basalt-init supervises.
//!
//! It installs signed OS bundles into the inactive slot, pushed to its
//! local API or pulled from an update repository, and reports what became
//! of them after the reboot. Its settings are the `[update]` table of
//! `/etc/basalt/image.toml`; its trusted keys are in `/etc/basalt/keys/`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--version") {
        println!("basalt-agent {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if args.len() > 1 {
        eprintln!("usage: basalt-agent (settings come from /etc/basalt/image.toml)");
        return ExitCode::from(2);
    }
    match basalt_init::update::run::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("basalt-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
