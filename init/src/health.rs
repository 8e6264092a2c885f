//! The `health-http` applet: `basalt-init health-http URL [TIMEOUT_MS]`.
//!
//! The supervisor runs it as a child process for `HealthProbe::Http`, so
//! that no HTTP ever runs inside PID 1. It sends one HTTP/1.0 `GET` to a
//! loopback-style address and reads only the status line: exit status 0
//! for a 2xx status, 1 for anything else (the reason goes to stderr, where
//! the supervisor picks it up for its messages), 2 for a usage error.
//!
//! Only `http://` with an IP address or `localhost` is accepted: a health
//! check must not depend on DNS, and PID 1's image has no TLS.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Used when no `TIMEOUT_MS` is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
/// The longest status line read.
const MAX_STATUS_LINE: usize = 1024;

const USAGE: &str = "usage: basalt-init health-http http://HOST[:PORT][/PATH] [TIMEOUT_MS] \
                     (HOST: an IP address or localhost)";

/// Why a check failed or could not run.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The arguments are wrong.
    #[error("{USAGE}")]
    Usage,
    /// The URL is not one this applet accepts.
    #[error("{url}: {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The TCP connection failed (nothing listening, or too slow).
    #[error("{url}: cannot connect to {addr}: {source}")]
    Connect {
        /// The URL checked.
        url: String,
        /// The address it resolved to.
        addr: SocketAddr,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// Sending the request or reading the response failed.
    #[error("{url}: {action}: {source}")]
    Io {
        /// The URL checked.
        url: String,
        /// What was being done.
        action: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The whole check took longer than its timeout.
    #[error("{url}: no response within {ms} ms")]
    Timeout {
        /// The URL checked.
        url: String,
        /// The timeout.
        ms: u128,
    },
    /// The reply does not start with an HTTP status line.
    #[error("{url}: not an HTTP response: {line:?}")]
    BadResponse {
        /// The URL checked.
        url: String,
        /// What came back instead (truncated).
        line: String,
    },
    /// The server answered with a status outside 2xx.
    #[error("{url}: {line}")]
    Status {
        /// The URL checked.
        url: String,
        /// The status code.
        status: u16,
        /// The status line.
        line: String,
    },
}

/// Where a URL points, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// The `Host` header value (host and port as written).
    pub host: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

fn bad(url: &str, why: &'static str) -> HealthError {
    HealthError::BadUrl { url: url.to_string(), why }
}

/// Parses `http://HOST[:PORT][/PATH]` where HOST is an IPv4 address, a
/// bracketed IPv6 address, or `localhost` (127.0.0.1).
pub fn parse_url(url: &str) -> Result<Target, HealthError> {
    let rest =
        url.strip_prefix("http://").ok_or_else(|| bad(url, "only http:// URLs are supported"))?;
    let rest = rest.split('#').next().unwrap_or(rest);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad(url, "the path contains spaces or control characters"));
    }
    if authority.contains('@') {
        return Err(bad(url, "user names in URLs are not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad(url, "unclosed [ in the host"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad(url, "junk after ]"))?),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .map_err(|_| bad(url, "the host must be an IP address or localhost (no DNS)"))?
    };
    let port: u16 = match port {
        None => 80,
        Some(p) => match p.parse() {
            Ok(n) if n > 0 => n,
            _ => return Err(bad(url, "the port is not a number from 1 to 65535")),
        },
    };
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        host: authority.to_string(),
        path: path.to_string(),
    })
}

fn remaining(url: &str, deadline: Instant, timeout: Duration) -> Result<Duration, HealthError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(HealthError::Timeout { url: url.to_string(), ms: timeout.as_millis() })
    } else {
        Ok(left)
    }
}

fn io_error(url: &str, action: &'static str, e: io::Error, timeout: Duration) -> HealthError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            HealthError::Timeout { url: url.to_string(), ms: timeout.as_millis() }
        }
        _ => HealthError::Io { url: url.to_string(), action, source: e },
    }
}

/// GETs `url` and returns its status code if it is 2xx. The whole check
/// (connect, send, first line of the reply) must finish within `timeout`.
pub fn check(url: &str, timeout: Duration) -> Result<u16, HealthError> {
    let target = parse_url(url)?;
    // An absurd timeout must not overflow the clock arithmetic.
    let timeout = timeout.min(Duration::from_secs(3600));
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&target.addr, remaining(url, deadline, timeout)?)
        .map_err(|source| match source.kind() {
        io::ErrorKind::TimedOut => {
            HealthError::Timeout { url: url.to_string(), ms: timeout.as_millis() }
        }
        _ => HealthError::Connect { url: url.to_string(), addr: target.addr, source },
    })?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: basalt-init-health\r\nConnection: close\r\n\r\n",
        target.path, target.host
    );
    stream
        .set_write_timeout(Some(remaining(url, deadline, timeout)?))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|e| io_error(url, "sending the request", e, timeout))?;

    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut len = 0;
    while len < buf.len() && !buf[..len].contains(&b'\n') {
        stream
            .set_read_timeout(Some(remaining(url, deadline, timeout)?))
            .map_err(|e| io_error(url, "reading the response", e, timeout))?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(url, "reading the response", e, timeout)),
        }
    }
    let head = &buf[..len];
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]).trim_end().to_string();
    let status = line
        .strip_prefix("HTTP/")
        .and_then(|r| r.split_once(' '))
        .and_then(|(_, r)| r.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|code| (100..=599).contains(code));
    match status {
        Some(code) if (200..300).contains(&code) => Ok(code),
        Some(status) => Err(HealthError::Status { url: url.to_string(), status, line }),
        None => Err(HealthError::BadResponse {
            url: url.to_string(),
            line: line.chars().take(80).collect(),
        }),
    }
}

fn run(args: &[String]) -> Result<u16, HealthError> {
    let (url, timeout) = match args {
        [url] => (url, DEFAULT_TIMEOUT),
        [url, ms] => match ms.parse::<u64>() {
            Ok(ms) if ms > 0 => (url, Duration::from_millis(ms)),
            _ => return Err(HealthError::Usage),
        },
        _ => return Err(HealthError::Usage),
    };
    check(url, timeout)
}

/// The applet's entry point: `args` are what follows `health-http`.
/// Returns the exit status: 0 healthy, 1 unhealthy, 2 usage error.
pub fn main(args: &[String]) -> u8 {
    match run(args) {
        Ok(_) => 0,
        Err(e) => {
            let _ = writeln!(io::stderr(), "health-http: {e}");
            match e {
                HealthError::Usage | HealthError::BadUrl { .. } => 2,
                _ => 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// Serves one connection with `reply` (after `delay`), and sends back
    /// the request it read.
    fn serve_once(reply: &'static str, delay: Duration) -> (u16, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            tx.send(String::from_utf8(req).unwrap()).unwrap();
            std::thread::sleep(delay);
            let _ = conn.write_all(reply.as_bytes());
        });
        (port, rx)
    }

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn healthy_on_2xx_with_a_well_formed_request() {
        let (port, rx) =
            serve_once("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Duration::ZERO);
        let url = format!("http://127.0.0.1:{port}/healthz?full=1");
        assert_eq!(main(&args(&[&url, "2000"])), 0);
        let req = rx.recv().unwrap();
        assert!(req.starts_with("GET /healthz?full=1 HTTP/1.0\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")), "{req}");
    }

    #[test]
    fn unhealthy_on_other_statuses_and_garbage() {
        let (port, _rx) = serve_once("HTTP/1.0 503 Service Unavailable\r\n\r\n", Duration::ZERO);
        let err = check(&format!("http://localhost:{port}/"), Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, HealthError::Status { status: 503, .. }), "{err}");
        assert!(err.to_string().ends_with(": HTTP/1.0 503 Service Unavailable"), "{err}");

        let (port, _rx) = serve_once("SSH-2.0-OpenSSH\r\n", Duration::ZERO);
        let url = format!("http://127.0.0.1:{port}");
        assert!(matches!(
            check(&url, Duration::from_secs(2)),
            Err(HealthError::BadResponse { .. })
        ));
        let (port, _rx) = serve_once("HTTP/1.0 204 No Content\r\n\r\n", Duration::ZERO);
        assert_eq!(main(&args(&[&format!("http://127.0.0.1:{port}/")])), 0);
    }

    #[test]
    fn slow_server_times_out() {
        let (port, _rx) = serve_once("HTTP/1.0 200 OK\r\n\r\n", Duration::from_secs(3));
        let start = Instant::now();
        let err =
            check(&format!("http://127.0.0.1:{port}/"), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, HealthError::Timeout { ms: 200, .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn nothing_listening_is_unhealthy() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/healthz");
        let err = check(&url, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, HealthError::Connect { .. }), "{err}");
        assert_eq!(main(&args(&[&url])), 1);
    }

    #[test]
    fn usage_errors_exit_2() {
        assert_eq!(main(&[]), 2);
        assert_eq!(main(&args(&["http://127.0.0.1/", "soon"])), 2);
        assert_eq!(main(&args(&["http://127.0.0.1/", "0"])), 2);
        assert_eq!(main(&args(&["https://127.0.0.1/"])), 2);
        assert_eq!(main(&args(&["http://example.com/"])), 2);
        assert_eq!(main(&args(&["http://127.0.0.1:99999/"])), 2);
    }

    #[test]
    fn parses_the_accepted_url_forms() {
        let t = parse_url("http://127.0.0.1:8080/healthz").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((t.host.as_str(), t.path.as_str()), ("127.0.0.1:8080", "/healthz"));
        let t = parse_url("http://localhost").unwrap();
        assert_eq!((t.addr.port(), t.path.as_str()), (80, "/"));
        let t = parse_url("http://[::1]:9000/x#frag").unwrap();
        assert_eq!((t.addr, t.path.as_str()), ("[::1]:9000".parse().unwrap(), "/x"));
        for bad in
            ["http://u@127.0.0.1/", "http://127.0.0.1/a b", "http://[::1/", "http://127.0.0.1:0/"]
        {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
