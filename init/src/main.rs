//! The `basalt-init` binary: PID 1 of a basalt image in either stage, and
//! the applets the supervisor runs as children (health checks, DHCP).

use std::path::Path;
use std::process::ExitCode;

use basalt_bundle::config::{IMAGE_CONFIG_PATH, SLOT_CONFIG_PATH};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("health-http") => return ExitCode::from(basalt_init::health::main(&args[2..])),
        Some("dhcp") => return ExitCode::from(basalt_init::dhcp::main(&args[2..])),
        Some("--version") => {
            println!("basalt-init {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    if std::process::id() != 1 {
        eprintln!(
            "basalt-init: not PID 1; it runs as the init of a basalt image \
             (applets: health-http URL [TIMEOUT_MS], dhcp IFACE, --version)"
        );
        return ExitCode::from(2);
    }
    // The initramfs carries the slot configuration, the root filesystem the
    // image configuration: which one is present says which stage this is.
    if Path::new(SLOT_CONFIG_PATH).exists() {
        basalt_init::stage1::run()
    } else if Path::new(IMAGE_CONFIG_PATH).exists() {
        basalt_init::stage2::run()
    } else {
        basalt_init::stage1::fail(&format!(
            "neither {SLOT_CONFIG_PATH} nor {IMAGE_CONFIG_PATH} exists; this is not a basalt image"
        ))
    }
}
