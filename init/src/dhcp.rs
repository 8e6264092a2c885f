//! The `dhcp` applet: `basalt-init dhcp IFACE`, a DHCPv4 client (RFC 2131).
//!
//! It parses packets from the network, so it never runs inside PID 1: the
//! builder adds it as a supervised service (`dhcp`, restart always) when a
//! recipe says `network.mode = "dhcp"`. It does DISCOVER, OFFER, REQUEST,
//! ACK over a UDP socket bound to the interface, sets the address, netmask
//! and default route from the ACK, writes `/run/resolv.conf` (unless the
//! image names its own name servers), prints one line, and renews by
//! unicast at T1 (half the lease). Failures are retried with a delay that
//! doubles up to [`MAX_BACKOFF`]; it exits non-zero only when it cannot go
//! on at all (no such interface, no socket, the kernel refuses the
//! address), and the supervisor restarts it.
//!
//! Encoding and parsing are pure functions; a truncated or hostile packet
//! is an error, never a panic.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use basalt_bundle::config::{netmask_to_prefix, ImageConfig, IMAGE_CONFIG_PATH};

use crate::network::{self, INTERFACE_WAIT, RESOLV_CONF, SYS_CLASS_NET};
use crate::platform::net;

/// The server port.
pub const SERVER_PORT: u16 = 67;
/// The magic cookie that starts the options (RFC 2131 §3).
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// How long one exchange waits for its reply.
pub const REPLY_WAIT: Duration = Duration::from_secs(3);
/// The first delay after a failed exchange; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest delay between failed exchanges.
pub const MAX_BACKOFF: Duration = Duration::from_secs(32);
/// A lease without option 51 is taken to last this long.
pub const DEFAULT_LEASE_SECS: u32 = 3600;
/// Renewals never come sooner than this, whatever the server says, so a
/// lease of 0 s cannot make the client spin.
pub const MIN_RENEW: Duration = Duration::from_secs(10);
/// The fixed part of a BOOTP message, before the magic cookie.
const FIXED_LEN: usize = 236;
/// Messages are padded to the BOOTP minimum, which some servers insist on.
const MIN_MESSAGE: usize = 300;

/// Option codes used here.
mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETERS: u8 = 55;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// Client looks for servers.
    Discover,
    /// Server offers an address.
    Offer,
    /// Client asks for an address (or renews it).
    Request,
    /// Server refuses the address.
    Decline,
    /// Server grants the lease.
    Ack,
    /// Server refuses the request.
    Nak,
    /// Client gives the address back.
    Release,
    /// Client asks for parameters only.
    Inform,
}

impl MessageType {
    fn from_byte(b: u8) -> Option<MessageType> {
        Some(match b {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }

    fn byte(self) -> u8 {
        match self {
            MessageType::Discover => 1,
            MessageType::Offer => 2,
            MessageType::Request => 3,
            MessageType::Decline => 4,
            MessageType::Ack => 5,
            MessageType::Nak => 6,
            MessageType::Release => 7,
            MessageType::Inform => 8,
        }
    }
}

/// Why a packet is not a usable DHCP reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the fixed header and the magic cookie.
    #[error("packet of {0} bytes is too short for DHCP")]
    Short(usize),
    /// Not a BOOTREPLY for Ethernet.
    #[error("not a DHCP reply for Ethernet")]
    NotReply,
    /// The magic cookie is missing.
    #[error("no DHCP magic cookie")]
    NoCookie,
    /// An option runs past the end of the packet.
    #[error("option {0} runs past the end of the packet")]
    TruncatedOption(u8),
    /// An option has a length its kind does not allow.
    #[error("option {code} has a bad length {len}")]
    BadLength {
        /// The option code.
        code: u8,
        /// Its length.
        len: usize,
    },
    /// No message type (option 53), or an unknown one.
    #[error("no known DHCP message type")]
    NoType,
}

/// What a client puts in each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The interface's hardware address.
    pub mac: [u8; 6],
    /// The transaction id of the current exchange.
    pub xid: u32,
}

impl Client {
    fn header(&self, kind: MessageType, ciaddr: Ipv4Addr, broadcast: bool) -> Vec<u8> {
        let mut m = vec![0u8; FIXED_LEN];
        m[0] = 1; // BOOTREQUEST
        m[1] = 1; // Ethernet
        m[2] = 6; // hardware address length
        m[4..8].copy_from_slice(&self.xid.to_be_bytes());
        if broadcast {
            // Without an address the client cannot take unicast replies.
            m[10] = 0x80;
        }
        m[12..16].copy_from_slice(&ciaddr.octets());
        m[28..34].copy_from_slice(&self.mac);
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[opt::MESSAGE_TYPE, 1, kind.byte()]);
        // Client id: hardware type 1 and the MAC (RFC 2132 §9.14).
        m.extend_from_slice(&[opt::CLIENT_ID, 7, 1]);
        m.extend_from_slice(&self.mac);
        m.extend_from_slice(&[
            opt::PARAMETERS,
            5,
            opt::SUBNET_MASK,
            opt::ROUTER,
            opt::DNS,
            opt::LEASE_TIME,
            opt::SERVER_ID,
        ]);
        m
    }

    fn finish(mut m: Vec<u8>) -> Vec<u8> {
        m.push(opt::END);
        if m.len() < MIN_MESSAGE {
            m.resize(MIN_MESSAGE, opt::PAD);
        }
        m
    }

    /// A DHCPDISCOVER, broadcast.
    pub fn discover(&self) -> Vec<u8> {
        Self::finish(self.header(MessageType::Discover, Ipv4Addr::UNSPECIFIED, true))
    }

    /// A DHCPREQUEST for the address `offer` made by `server` (the
    /// SELECTING state), broadcast.
    pub fn request(&self, offer: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
        let mut m = self.header(MessageType::Request, Ipv4Addr::UNSPECIFIED, true);
        m.extend_from_slice(&[opt::REQUESTED_IP, 4]);
        m.extend_from_slice(&offer.octets());
        m.extend_from_slice(&[opt::SERVER_ID, 4]);
        m.extend_from_slice(&server.octets());
        Self::finish(m)
    }

    /// A DHCPREQUEST renewing `address` (the RENEWING state), unicast to
    /// the server: `ciaddr` set, no requested address, no server id.
    pub fn renew(&self, address: Ipv4Addr) -> Vec<u8> {
        Self::finish(self.header(MessageType::Request, address, false))
    }
}

/// A parsed server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Transaction id.
    pub xid: u32,
    /// Message type (option 53).
    pub kind: MessageType,
    /// The address offered or granted (`yiaddr`).
    pub your_addr: Ipv4Addr,
    /// The first six bytes of `chaddr`.
    pub chaddr: [u8; 6],
    /// Server identifier (option 54).
    pub server: Option<Ipv4Addr>,
    /// Subnet mask (option 1).
    pub netmask: Option<Ipv4Addr>,
    /// The first router (option 3).
    pub router: Option<Ipv4Addr>,
    /// Name servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds (option 51).
    pub lease_secs: Option<u32>,
}

fn ipv4(b: &[u8]) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

/// Parses a packet received on port 68.
pub fn parse(p: &[u8]) -> Result<Reply, ParseError> {
    let fixed = p.get(..FIXED_LEN + 4).ok_or(ParseError::Short(p.len()))?;
    if fixed[0] != 2 || fixed[1] != 1 || fixed[2] != 6 {
        return Err(ParseError::NotReply);
    }
    if fixed[FIXED_LEN..] != MAGIC_COOKIE {
        return Err(ParseError::NoCookie);
    }
    let xid = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    let your_addr = Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]);
    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&fixed[28..34]);
    let mut kind = None;
    let mut reply = Reply {
        xid,
        kind: MessageType::Nak,
        your_addr,
        chaddr,
        server: None,
        netmask: None,
        router: None,
        dns: Vec::new(),
        lease_secs: None,
    };
    let mut rest = &p[FIXED_LEN + 4..];
    while let Some((&code, tail)) = rest.split_first() {
        if code == opt::END {
            break;
        }
        if code == opt::PAD {
            rest = tail;
            continue;
        }
        let (&len, tail) = tail.split_first().ok_or(ParseError::TruncatedOption(code))?;
        let len = usize::from(len);
        let data = tail.get(..len).ok_or(ParseError::TruncatedOption(code))?;
        rest = &tail[len..];
        let bad = || ParseError::BadLength { code, len };
        match code {
            opt::MESSAGE_TYPE => {
                let [b] = data else { return Err(bad()) };
                kind = MessageType::from_byte(*b);
            }
            opt::SERVER_ID => reply.server = Some(ipv4(data).ok_or_else(bad)?),
            opt::SUBNET_MASK => reply.netmask = Some(ipv4(data).ok_or_else(bad)?),
            opt::ROUTER => {
                if len == 0 || len % 4 != 0 {
                    return Err(bad());
                }
                reply.router = ipv4(&data[..4]);
            }
            opt::DNS => {
                if len == 0 || len % 4 != 0 {
                    return Err(bad());
                }
                reply.dns = data.chunks_exact(4).filter_map(ipv4).collect();
            }
            opt::LEASE_TIME => {
                let b: [u8; 4] = data.try_into().map_err(|_| bad())?;
                reply.lease_secs = Some(u32::from_be_bytes(b));
            }
            // Everything else is not needed here.
            _ => {}
        }
    }
    reply.kind = kind.ok_or(ParseError::NoType)?;
    Ok(reply)
}

/// A granted lease, ready to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway, if the server named one.
    pub router: Option<Ipv4Addr>,
    /// Name servers.
    pub dns: Vec<Ipv4Addr>,
    /// The server that granted it, where renewals go.
    pub server: Ipv4Addr,
    /// Lease time in seconds.
    pub lease_secs: u32,
}

/// Why an ACK cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// `yiaddr` is not a host address.
    #[error("the server granted {0}, which is not a host address")]
    Address(Ipv4Addr),
    /// The subnet mask is not contiguous.
    #[error("the server's subnet mask {0} is not a prefix")]
    Netmask(Ipv4Addr),
    /// Neither option 54 nor the packet's source names the server.
    #[error("the server did not identify itself")]
    NoServer,
}

impl Lease {
    /// The lease an ACK grants; `source` (the packet's sender) stands in for
    /// a missing server identifier.
    pub fn from_ack(ack: &Reply, source: Option<Ipv4Addr>) -> Result<Lease, LeaseError> {
        let a = ack.your_addr;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return Err(LeaseError::Address(a));
        }
        // Without option 1, the class-C mask every small network uses.
        let mask = ack.netmask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
        let prefix = netmask_to_prefix(mask).filter(|p| *p > 0).ok_or(LeaseError::Netmask(mask))?;
        let server = ack
            .server
            .or(source)
            .filter(|s| !s.is_unspecified() && !s.is_broadcast())
            .ok_or(LeaseError::NoServer)?;
        Ok(Lease {
            address: a,
            prefix,
            router: ack.router.filter(|r| !r.is_unspecified()),
            dns: ack.dns.clone(),
            server,
            lease_secs: ack.lease_secs.unwrap_or(DEFAULT_LEASE_SECS),
        })
    }

    /// When to renew (T1): half the lease, at least [`MIN_RENEW`].
    pub fn renew_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.lease_secs / 2)).max(MIN_RENEW)
    }

    /// The line printed when the lease is applied.
    pub fn describe(&self, iface: &str) -> String {
        let via = match self.router {
            Some(r) => format!(" via {r}"),
            None => String::new(),
        };
        format!("{iface} {}/{}{via}, lease {} s", self.address, self.prefix, self.lease_secs)
    }
}

/// Delays between failed exchanges: doubling, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_BACKOFF }
    }
}

impl Backoff {
    /// The delay before the next try; the one after it doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        d
    }
}

/// Why the applet gave up; the supervisor restarts it.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// Wrong arguments.
    #[error("usage: basalt-init dhcp IFACE")]
    Usage,
    /// The interface did not appear.
    #[error("interface {0} did not appear within {1:?}")]
    NoInterface(String, Duration),
    /// A set-up step failed.
    #[error(transparent)]
    Io(#[from] network::NetIoError),
}

fn say(msg: &str) {
    // One write per line; a closed stdout has nowhere to be reported.
    let _ = io::stdout().write_all(format!("dhcp: {msg}\n").as_bytes());
}

/// A transaction id that differs between clients and between runs.
fn new_xid(mac: &[u8; 6]) -> u32 {
    let mut b = [0u8; 4];
    let from_urandom = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if from_urandom {
        return u32::from_ne_bytes(b);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
}

/// Sends `packet` to `to` and waits up to [`REPLY_WAIT`] for a reply to
/// `client` of one of the `wanted` kinds; anything else is dropped.
fn exchange(
    sock: &UdpSocket,
    client: &Client,
    packet: &[u8],
    to: SocketAddrV4,
    wanted: &[MessageType],
) -> io::Result<Option<(Reply, Option<Ipv4Addr>)>> {
    sock.send_to(packet, to)?;
    let deadline = Instant::now() + REPLY_WAIT;
    let mut buf = [0u8; 1600];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let Ok(reply) = parse(&buf[..n]) else { continue };
        if reply.xid != client.xid || reply.chaddr != client.mac || !wanted.contains(&reply.kind) {
            continue;
        }
        let source = match from.ip() {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        };
        return Ok(Some((reply, source)));
    }
}

/// DISCOVER → OFFER → REQUEST → ACK, retried with backoff until it works.
fn acquire(sock: &UdpSocket, iface: &str, mac: [u8; 6]) -> Lease {
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
    let mut backoff = Backoff::default();
    loop {
        let client = Client { mac, xid: new_xid(&mac) };
        let why =
            match exchange(sock, &client, &client.discover(), broadcast, &[MessageType::Offer]) {
                Ok(Some((offer, source))) => match offer.server.or(source) {
                    Some(server) => {
                        let req = client.request(offer.your_addr, server);
                        match exchange(
                            sock,
                            &client,
                            &req,
                            broadcast,
                            &[MessageType::Ack, MessageType::Nak],
                        ) {
                            Ok(Some((ack, source))) if ack.kind == MessageType::Ack => {
                                match Lease::from_ack(&ack, source) {
                                    Ok(lease) => return lease,
                                    Err(e) => format!("unusable ACK: {e}"),
                                }
                            }
                            Ok(Some(_)) => "the server refused the request (NAK)".to_string(),
                            Ok(None) => "no ACK".to_string(),
                            Err(e) => format!("cannot send the request: {e}"),
                        }
                    }
                    None => "an offer without a server".to_string(),
                },
                Ok(None) => "no offer".to_string(),
                Err(e) => format!("cannot send the discover: {e}"),
            };
        let delay = backoff.next_delay();
        say(&format!("{iface}: {why}; retrying in {} s", delay.as_secs()));
        std::thread::sleep(delay);
    }
}

fn apply(iface: &str, lease: &Lease, write_dns: bool) -> Result<(), DhcpError> {
    network::configure_ipv4(iface, lease.address, lease.prefix, lease.router)?;
    if write_dns && !lease.dns.is_empty() {
        if let Err(e) = network::write_resolv_conf(Path::new(RESOLV_CONF), &lease.dns) {
            say(&format!("cannot write {RESOLV_CONF}: {e}"));
        }
    }
    Ok(())
}

/// Runs the applet; returns the exit status.
pub fn main(args: &[String]) -> u8 {
    match run(args) {
        Ok(()) => 0,
        Err(e @ DhcpError::Usage) => {
            say(&e.to_string());
            2
        }
        Err(e) => {
            say(&e.to_string());
            1
        }
    }
}

fn run(args: &[String]) -> Result<(), DhcpError> {
    let [iface] = args else { return Err(DhcpError::Usage) };
    let iface = iface.as_str();
    let sys = Path::new(SYS_CLASS_NET);
    if !network::wait_for_interface(sys, iface, INTERFACE_WAIT) {
        return Err(DhcpError::NoInterface(iface.to_string(), INTERFACE_WAIT));
    }
    let io_err = |action| network::io_step(iface, action);
    let mac = network::read_mac(sys, iface).map_err(io_err("cannot read the MAC address"))?;
    net::interface_up(iface).map_err(io_err("cannot bring the interface up"))?;
    let sock = net::dhcp_socket(iface).map_err(io_err("cannot open the DHCP socket"))?;
    // Name servers the image names win over the server's.
    let write_dns = std::fs::read_to_string(IMAGE_CONFIG_PATH)
        .ok()
        .and_then(|t| ImageConfig::from_toml(&t).ok())
        .is_none_or(|c| c.network.dns.is_empty());
    loop {
        let mut lease = acquire(&sock, iface, mac);
        apply(iface, &lease, write_dns)?;
        say(&lease.describe(iface));
        // Renew at T1 by unicast until the server refuses or the lease
        // runs out; then start over with a DISCOVER.
        let mut expires = Instant::now() + Duration::from_secs(u64::from(lease.lease_secs));
        let mut wait = lease.renew_after();
        loop {
            std::thread::sleep(wait);
            let client = Client { mac, xid: new_xid(&mac) };
            let to = SocketAddrV4::new(lease.server, SERVER_PORT);
            let wanted = [MessageType::Ack, MessageType::Nak];
            match exchange(&sock, &client, &client.renew(lease.address), to, &wanted) {
                Ok(Some((ack, source))) if ack.kind == MessageType::Ack => {
                    match Lease::from_ack(&ack, source) {
                        Ok(new) => {
                            if new != lease {
                                apply(iface, &new, write_dns)?;
                            }
                            lease = new;
                            say(&format!("renewed {}", lease.describe(iface)));
                            expires =
                                Instant::now() + Duration::from_secs(u64::from(lease.lease_secs));
                            wait = lease.renew_after();
                            continue;
                        }
                        Err(e) => say(&format!("{iface}: unusable renewal ACK: {e}")),
                    }
                }
                Ok(Some(_)) => {
                    say(&format!("{iface}: the server refused the renewal (NAK); starting over"));
                    break;
                }
                Ok(None) => say(&format!("{iface}: no answer to the renewal")),
                Err(e) => say(&format!("{iface}: cannot send the renewal: {e}")),
            }
            // Retry at half the time left, as RFC 2131 §4.4.5 suggests, or
            // start over once the lease is gone.
            let left = expires.saturating_duration_since(Instant::now());
            if left <= MIN_RENEW {
                say(&format!("{iface}: lease expired; starting over"));
                break;
            }
            wait = (left / 2).max(MIN_RENEW);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A reply as QEMU's user network sends it.
    fn reply(kind: u8, xid: u32) -> Vec<u8> {
        let mut m = vec![0u8; FIXED_LEN];
        m[0] = 2;
        m[1] = 1;
        m[2] = 6;
        m[4..8].copy_from_slice(&xid.to_be_bytes());
        m[16..20].copy_from_slice(&[10, 0, 2, 15]);
        m[28..34].copy_from_slice(&MAC);
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[53, 1, kind]);
        m.extend_from_slice(&[54, 4, 10, 0, 2, 2]);
        m.extend_from_slice(&[51, 4, 0, 1, 0x51, 0x80]);
        m.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
        m.extend_from_slice(&[3, 4, 10, 0, 2, 2]);
        m.extend_from_slice(&[6, 4, 10, 0, 2, 3]);
        m.push(255);
        m
    }

    /// The options of an encoded message, as (code, data).
    fn options(m: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut i = FIXED_LEN + 4;
        while i < m.len() && m[i] != 255 {
            if m[i] == 0 {
                i += 1;
                continue;
            }
            let len = usize::from(m[i + 1]);
            out.push((m[i], m[i + 2..i + 2 + len].to_vec()));
            i += 2 + len;
        }
        out
    }

    #[test]
    fn discover_carries_the_required_options() {
        let c = Client { mac: MAC, xid: 0x1234_5678 };
        let m = c.discover();
        assert!(m.len() >= MIN_MESSAGE);
        assert_eq!(&m[..4], &[1, 1, 6, 0]);
        assert_eq!(&m[4..8], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(m[10], 0x80, "broadcast flag");
        assert_eq!(&m[28..34], &MAC);
        assert_eq!(&m[FIXED_LEN..FIXED_LEN + 4], &MAGIC_COOKIE);
        let o = options(&m);
        assert_eq!(o[0], (53, vec![1]));
        assert!(o.contains(&(61, vec![1, 0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert!(o.contains(&(55, vec![1, 3, 6, 51, 54])));
    }

    #[test]
    fn request_names_the_offer_and_the_server() {
        let c = Client { mac: MAC, xid: 7 };
        let o = options(&c.request(Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(o[0], (53, vec![3]));
        assert!(o.contains(&(50, vec![10, 0, 2, 15])));
        assert!(o.contains(&(54, vec![10, 0, 2, 2])));
    }

    #[test]
    fn renewal_is_unicast_with_ciaddr_and_no_server_id() {
        let c = Client { mac: MAC, xid: 7 };
        let m = c.renew(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(m[10], 0, "no broadcast flag");
        assert_eq!(&m[12..16], &[10, 0, 2, 15]);
        let o = options(&m);
        assert_eq!(o[0], (53, vec![3]));
        assert!(!o.iter().any(|(c, _)| *c == 50 || *c == 54));
    }

    #[test]
    fn an_ack_becomes_a_lease() {
        let r = parse(&reply(5, 42)).unwrap();
        assert_eq!(r.kind, MessageType::Ack);
        assert_eq!(r.xid, 42);
        assert_eq!(r.chaddr, MAC);
        let lease = Lease::from_ack(&r, None).unwrap();
        assert_eq!(lease.describe("eth0"), "eth0 10.0.2.15/24 via 10.0.2.2, lease 86400 s");
        assert_eq!(lease.dns, [Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(lease.server, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(lease.renew_after(), Duration::from_secs(43200));
    }

    #[test]
    fn short_leases_do_not_spin() {
        let mut p = reply(5, 1);
        let at = p.windows(2).position(|w| w == [51, 4]).unwrap();
        p[at + 2..at + 6].copy_from_slice(&[0, 0, 0, 0]);
        let lease = Lease::from_ack(&parse(&p).unwrap(), None).unwrap();
        assert_eq!(lease.renew_after(), MIN_RENEW);
    }

    #[test]
    fn unusable_acks_are_refused() {
        let mut r = parse(&reply(5, 1)).unwrap();
        r.netmask = Some(Ipv4Addr::new(255, 0, 255, 0));
        assert!(matches!(Lease::from_ack(&r, None), Err(LeaseError::Netmask(_))));
        let mut r = parse(&reply(5, 1)).unwrap();
        r.your_addr = Ipv4Addr::BROADCAST;
        assert!(matches!(Lease::from_ack(&r, None), Err(LeaseError::Address(_))));
        let mut r = parse(&reply(5, 1)).unwrap();
        r.server = None;
        assert!(matches!(Lease::from_ack(&r, None), Err(LeaseError::NoServer)));
        let src = Ipv4Addr::new(10, 0, 2, 2);
        assert_eq!(Lease::from_ack(&r, Some(src)).unwrap().server, src);
    }

    #[test]
    fn truncated_packets_are_errors_at_every_length() {
        let full = reply(2, 9);
        for n in 0..full.len() - 1 {
            // Never a panic; cut inside an option is an error, cut at an
            // option boundary may still parse.
            let _ = parse(&full[..n]);
        }
        assert_eq!(parse(&full[..100]), Err(ParseError::Short(100)));
        let cut = full.len() - 4; // inside option 6
        assert_eq!(parse(&full[..cut]), Err(ParseError::TruncatedOption(6)));
    }

    #[test]
    fn hostile_packets_are_errors() {
        let mut p = reply(5, 1);
        p[0] = 1;
        assert_eq!(parse(&p), Err(ParseError::NotReply));
        let mut p = reply(5, 1);
        p[FIXED_LEN] = 0;
        assert_eq!(parse(&p), Err(ParseError::NoCookie));
        assert_eq!(parse(&reply(99, 1)), Err(ParseError::NoType));
        // An option claiming more bytes than there are.
        let mut p = reply(5, 1);
        p.truncate(FIXED_LEN + 4);
        p.extend_from_slice(&[53, 1, 5, 6, 255, 1, 2]);
        assert_eq!(parse(&p), Err(ParseError::TruncatedOption(6)));
        // Wrong lengths for fixed-size options.
        for bad in [[53u8, 2, 5, 5], [54, 2, 1, 2], [3, 2, 1, 2], [6, 2, 1, 2], [51, 2, 0, 1]] {
            let mut p = reply(5, 1);
            p.truncate(FIXED_LEN + 4);
            p.extend_from_slice(&bad);
            assert!(matches!(parse(&p), Err(ParseError::BadLength { .. })), "{bad:?}");
        }
        // A length byte at the very end.
        let mut p = reply(5, 1);
        p.truncate(FIXED_LEN + 4);
        p.push(54);
        assert_eq!(parse(&p), Err(ParseError::TruncatedOption(54)));
        // Pure noise of many lengths and seeds never panics.
        let mut x: u32 = 0x9e37_79b9;
        for len in 0..700 {
            let mut p: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if p.len() >= FIXED_LEN + 4 {
                p[..3].copy_from_slice(&[2, 1, 6]);
                p[FIXED_LEN..FIXED_LEN + 4].copy_from_slice(&MAGIC_COOKIE);
            }
            let _ = parse(&p);
        }
    }

    #[test]
    fn options_end_without_an_end_marker() {
        let mut p = reply(5, 1);
        p.pop();
        assert_eq!(parse(&p).unwrap().kind, MessageType::Ack);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::default();
        let d: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 32, 32, 32]);
    }
}
