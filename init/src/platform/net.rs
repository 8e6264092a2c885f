//! Host name and network interfaces.
//!
//! Only what stage 2 needs before any service runs: the host name and the
//! loopback interface (health checks talk to `127.0.0.1`). Addresses on
//! real interfaces and DHCP belong to a supervised service, not PID 1.

use std::io;
use std::os::fd::AsRawFd;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

mod ioctls {
    nix::ioctl_readwrite_bad!(siocgifflags, libc::SIOCGIFFLAGS, libc::ifreq);
    nix::ioctl_readwrite_bad!(siocsifflags, libc::SIOCSIFFLAGS, libc::ifreq);
}

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Sets the kernel's host name.
pub fn set_hostname(name: &str) -> io::Result<()> {
    nix::unistd::sethostname(name).map_err(io_err)
}

/// Brings interface `name` up (`IFF_UP`), as `ip link set NAME up` does.
/// For `lo`, the kernel then assigns `127.0.0.1/8` and `::1` by itself.
pub fn interface_up(name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
    }
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(io_err)?;
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the socket is open and `req` is a valid, named `ifreq`.
    unsafe { ioctls::siocgifflags(sock.as_raw_fd(), &mut req) }.map_err(io_err)?;
    // SAFETY: SIOCGIFFLAGS filled in the `ifru_flags` member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: as above.
    unsafe { ioctls::siocsifflags(sock.as_raw_fd(), &mut req) }.map_err(io_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_interface_names() {
        assert!(interface_up("").is_err());
        assert!(interface_up("a-name-that-is-far-too-long").is_err());
    }

    #[test]
    fn loopback_is_up_already_on_a_host() {
        // On a host `lo` is up, so this only reads its flags: no root needed.
        interface_up("lo").unwrap();
    }
}
