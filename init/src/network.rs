//! Interface helpers shared by stage 2 (static addresses) and the DHCP
//! applet: waiting for an interface to appear, reading its MAC address,
//! giving it an address and default route, writing `/run/resolv.conf`.
//! The ioctls themselves are in [`crate::platform::net`].

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the kernel lists network interfaces.
pub const SYS_CLASS_NET: &str = "/sys/class/net";
/// Where name servers are written (`/etc/resolv.conf` of a read-only root
/// cannot change).
pub const RESOLV_CONF: &str = "/run/resolv.conf";
/// How long stage 2 and the DHCP applet wait for an interface whose driver
/// was just loaded.
pub const INTERFACE_WAIT: Duration = Duration::from_secs(5);

/// Waits until `sys_class_net/<name>` exists, polling every 50 ms for at
/// most `timeout`; returns whether it appeared.
pub fn wait_for_interface(sys_class_net: &Path, name: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    let path = sys_class_net.join(name);
    loop {
        if path.exists() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Parses a MAC address as `/sys/class/net/<if>/address` shows it
/// (`52:54:00:12:34:56`).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Reads the MAC address of interface `name` from `sys_class_net`.
pub fn read_mac(sys_class_net: &Path, name: &str) -> io::Result<[u8; 6]> {
    let path = sys_class_net.join(name).join("address");
    let text = std::fs::read_to_string(&path)?;
    parse_mac(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {:?} is not a MAC address", path.display(), text.trim()),
        )
    })
}

/// Writes `resolv.conf` for `servers` at `path`, through a temporary file
/// and a rename so that a reader never sees half a file.
pub fn write_resolv_conf<S: std::fmt::Display>(path: &Path, servers: &[S]) -> io::Result<()> {
    let text = basalt_bundle::config::resolv_conf(servers);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_only_in_the_sysfs_form() {
        assert_eq!(parse_mac("52:54:00:12:34:56\n"), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        for bad in
            ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "5:54:00:12:34:56", "zz:54:00:12:34:56"]
        {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn waiting_for_an_interface_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("eth0")).unwrap();
        std::fs::write(dir.path().join("eth0/address"), "02:00:00:00:00:01\n").unwrap();
        assert!(wait_for_interface(dir.path(), "eth0", Duration::ZERO));
        let start = Instant::now();
        assert!(!wait_for_interface(dir.path(), "eth1", Duration::from_millis(120)));
        assert!(start.elapsed() >= Duration::from_millis(120));
        assert_eq!(read_mac(dir.path(), "eth0").unwrap(), [2, 0, 0, 0, 0, 1]);
        assert!(read_mac(dir.path(), "eth1").is_err());
    }

    #[test]
    fn resolv_conf_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        write_resolv_conf(&path, &["10.0.2.3"]).unwrap();
        write_resolv_conf(&path, &["10.0.2.4"]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "nameserver 10.0.2.4\n");
    }
}

/// A step of interface set-up that the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("{iface}: {action}: {source}")]
pub struct NetIoError {
    /// The interface.
    pub iface: String,
    /// What was being done.
    pub action: &'static str,
    /// The error.
    #[source]
    pub source: io::Error,
}

/// A `map_err` adapter naming the interface and the step.
pub fn io_step<'a>(
    iface: &'a str,
    action: &'static str,
) -> impl FnOnce(io::Error) -> NetIoError + 'a {
    move |source| NetIoError { iface: iface.to_string(), action, source }
}

/// Brings `iface` up and gives it `addr/prefix` and, if given, a default
/// route via `gateway`: the one way both static set-up and DHCP leases
/// configure an interface.
pub fn configure_ipv4(
    iface: &str,
    addr: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetIoError> {
    use crate::platform::net;
    net::interface_up(iface).map_err(io_step(iface, "cannot bring it up"))?;
    let mask = basalt_bundle::config::prefix_to_netmask(prefix);
    net::set_ipv4(iface, addr, mask).map_err(io_step(iface, "cannot set its address"))?;
    if let Some(gw) = gateway {
        net::add_default_route(iface, gw)
            .map_err(io_step(iface, "cannot add the default route"))?;
    }
    Ok(())
}
