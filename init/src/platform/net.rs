//! Host name and network interfaces.
//!
//! What stage 2 needs before any service runs (the host name, loopback,
//! a static address and default route) and the sockets and ioctls of the
//! DHCP applet, which runs as a supervised service: DHCP parses network
//! input, so it never runs inside PID 1. The old-style ioctls
//! (`SIOCSIFADDR`, `SIOCADDRT`) do everything one IPv4 address needs, with
//! far less code than rtnetlink.

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};

mod ioctls {
    nix::ioctl_readwrite_bad!(siocgifflags, libc::SIOCGIFFLAGS, libc::ifreq);
    nix::ioctl_readwrite_bad!(siocsifflags, libc::SIOCSIFFLAGS, libc::ifreq);
    nix::ioctl_write_ptr_bad!(siocsifaddr, libc::SIOCSIFADDR, libc::ifreq);
    nix::ioctl_write_ptr_bad!(siocsifnetmask, libc::SIOCSIFNETMASK, libc::ifreq);
    nix::ioctl_write_ptr_bad!(siocaddrt, libc::SIOCADDRT, libc::rtentry);
}

/// The port a DHCP client listens on.
pub const DHCP_CLIENT_PORT: u16 = 68;

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Sets the kernel's host name.
pub fn set_hostname(name: &str) -> io::Result<()> {
    nix::unistd::sethostname(name).map_err(io_err)
}

fn check_name(name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) || name.contains('/')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    Ok(())
}

/// A zeroed `ifreq` naming `name` (checked by [`check_name`]).
fn named_ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

fn inet_socket() -> io::Result<OwnedFd> {
    socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(io_err)
}

/// A `sockaddr` holding an IPv4 address, as the address ioctls take it.
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        // SAFETY: plain old data; all zeroes is valid.
        ..unsafe { std::mem::zeroed() }
    };
    // SAFETY: `sockaddr_in` and `sockaddr` are both 16 bytes; the kernel
    // reads the first as the second for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Brings interface `name` up (`IFF_UP`), as `ip link set NAME up` does.
/// For `lo`, the kernel then assigns `127.0.0.1/8` and `::1` by itself.
pub fn interface_up(name: &str) -> io::Result<()> {
    check_name(name)?;
    let sock = inet_socket()?;
    let mut req = named_ifreq(name);
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

/// Sets the IPv4 address and netmask of interface `name`, replacing the
/// one it had, as `ip addr replace` does for a single address. The kernel
/// adds the route to the local network itself.
pub fn set_ipv4(name: &str, addr: Ipv4Addr, netmask: Ipv4Addr) -> io::Result<()> {
    check_name(name)?;
    let sock = inet_socket()?;
    let mut req = named_ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    // SAFETY: the socket is open and `req` is a valid, named `ifreq` with
    // an AF_INET address.
    unsafe { ioctls::siocsifaddr(sock.as_raw_fd(), &req) }.map_err(io_err)?;
    let mut req = named_ifreq(name);
    req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask);
    // SAFETY: as above.
    unsafe { ioctls::siocsifnetmask(sock.as_raw_fd(), &req) }.map_err(io_err)?;
    Ok(())
}

/// Adds a default route through `gateway` on interface `name`. A default
/// route that exists already (a renewed lease) is not an error.
pub fn add_default_route(name: &str, gateway: Ipv4Addr) -> io::Result<()> {
    check_name(name)?;
    let sock = inet_socket()?;
    // `rt_dev` is a C string the kernel copies during the call.
    let mut dev = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in dev.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `rtentry` is plain old data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr();
    // SAFETY: the socket is open, `rt` is a valid route whose `rt_dev`
    // points at `dev`, which outlives the call.
    match unsafe { ioctls::siocaddrt(sock.as_raw_fd(), &rt) } {
        Ok(_) | Err(nix::Error::EEXIST) => Ok(()),
        Err(e) => Err(io_err(e)),
    }
}

/// A UDP socket for a DHCP client on interface `name`: bound to
/// `0.0.0.0:68`, allowed to broadcast, and tied to the interface so that
/// packets go out and come in there even before it has an address.
pub fn dhcp_socket(name: &str) -> io::Result<UdpSocket> {
    check_name(name)?;
    let fd = inet_socket()?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io_err)?;
    setsockopt(&fd, sockopt::Broadcast, &true).map_err(io_err)?;
    setsockopt(&fd, sockopt::BindToDevice, &OsString::from(name)).map_err(io_err)?;
    let any = SockaddrIn::new(0, 0, 0, 0, DHCP_CLIENT_PORT);
    bind(fd.as_raw_fd(), &any).map_err(io_err)?;
    Ok(UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_interface_names() {
        assert!(interface_up("").is_err());
        assert!(interface_up("a-name-that-is-far-too-long").is_err());
        assert!(set_ipv4("../x", Ipv4Addr::LOCALHOST, Ipv4Addr::BROADCAST).is_err());
        assert!(add_default_route("", Ipv4Addr::LOCALHOST).is_err());
        assert!(dhcp_socket("a\0b").is_err());
    }

    #[test]
    fn sockaddrs_carry_the_address_in_network_order() {
        let sa = sockaddr_v4(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sa_data: two bytes of port, then the address as on the wire.
        let data: Vec<u8> = sa.sa_data[..6].iter().map(|b| *b as u8).collect();
        assert_eq!(data, [0, 0, 10, 0, 2, 15]);
    }

    #[test]
    fn loopback_is_up_already_on_a_host() {
        // On a host `lo` is up, so this only reads its flags: no root needed.
        interface_up("lo").unwrap();
    }
}
