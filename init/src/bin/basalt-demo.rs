//! `basalt-demo`: a tiny service for demo and test images.
//!
//! It exists so that boot tests have something to supervise: a service
//! that talks, one that crashes, one that never becomes healthy. It is a
//! test and demonstration tool, not a product feature; real images run
//! their own services. Standard library only, so it builds as a small
//! static musl binary.
//!
//! ```text
//! basalt-demo hello [--port P] [--listen ADDR] [--every-ms N]
//!                                               print "hello from basalt" now and every N ms
//!                                               (default 5000); with --port, serve
//!                                               GET /healthz -> 200 on ADDR:P (ADDR is
//!                                               127.0.0.1 by default; 0.0.0.0 to be reached
//!                                               from outside, e.g. through QEMU's forwarding)
//! basalt-demo crash [--after-ms N] [--code C]   print "demo: crashing with code C", exit C
//!                                               after N ms (defaults 1000, 1)
//! basalt-demo unhealthy [--port P]              run forever; /healthz answers 503
//! basalt-demo zombies [--every-ms N]             every N ms (default 2000) print
//!                                               "demo: N processes, M zombies" from /proc
//! ```

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: basalt-demo hello [--port P] [--listen ADDR] [--every-ms N]\n\
                     \x20      basalt-demo crash [--after-ms N] [--code C]\n\
                     \x20      basalt-demo unhealthy [--port P]\n\
                     \x20      basalt-demo zombies [--every-ms N]";

/// Prints one line; a closed stdout ends the demo quietly instead of
/// panicking.
fn line(msg: &str) {
    let mut out = io::stdout().lock();
    if writeln!(out, "{msg}").and_then(|()| out.flush()).is_err() {
        std::process::exit(1);
    }
}

/// Parses `--name value` pairs; only the names in `known` are accepted.
fn options(args: &[String], known: &[&str]) -> Result<Vec<(String, u64)>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(name) = it.next() {
        let key = name.strip_prefix("--").filter(|k| known.contains(k));
        let Some(key) = key else { return Err(format!("unknown option {name}")) };
        let value = it.next().ok_or_else(|| format!("{name} needs a value"))?;
        let value = value.parse().map_err(|_| format!("{name}: {value:?} is not a number"))?;
        out.push((key.to_string(), value));
    }
    Ok(out)
}

fn get(opts: &[(String, u64)], key: &str) -> Option<u64> {
    opts.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// Answers each request on `addr`:`port`: `GET /healthz` gets
/// `healthz_status`, anything else 404.
fn serve(addr: IpAddr, port: u16, healthz_status: u16) -> io::Result<()> {
    let listener = TcpListener::bind((addr, port))?;
    line(&format!("demo: serving http://{}/healthz", SocketAddr::new(addr, port)));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = answer(conn, healthz_status);
        }
    });
    Ok(())
}

fn answer(mut conn: TcpStream, healthz_status: u16) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let first = req.split(|&b| b == b'\n').next().unwrap_or_default();
    let (status, body) = if first.starts_with(b"GET /healthz ") {
        match healthz_status {
            200 => ("200 OK", "ok\n"),
            _ => ("503 Service Unavailable", "unhealthy\n"),
        }
    } else {
        ("404 Not Found", "not found\n")
    };
    let reply = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(reply.as_bytes())
}

/// Takes `--listen ADDR` (the only option that is not a number) out of
/// `args`; the address defaults to 127.0.0.1.
fn listen_option(args: &[String]) -> Result<(IpAddr, Vec<String>), String> {
    let mut addr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--listen" {
            let v = it.next().ok_or("--listen needs a value")?;
            addr = v.parse().map_err(|_| format!("--listen {v:?} is not an IP address"))?;
        } else {
            rest.push(a.clone());
        }
    }
    Ok((addr, rest))
}

fn port(opts: &[(String, u64)]) -> Result<Option<u16>, String> {
    match get(opts, "port") {
        None => Ok(None),
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .map(Some)
            .ok_or_else(|| format!("--port {p} is not a port")),
    }
}

fn run(args: &[String]) -> Result<u8, String> {
    let Some((cmd, rest)) = args.split_first() else { return Err(USAGE.into()) };
    match cmd.as_str() {
        "hello" => {
            let (listen, rest) = listen_option(rest)?;
            let opts = options(&rest, &["port", "every-ms"])?;
            let every = Duration::from_millis(get(&opts, "every-ms").unwrap_or(5000).max(1));
            if let Some(p) = port(&opts)? {
                serve(listen, p, 200)
                    .map_err(|e| format!("cannot listen on {}: {e}", SocketAddr::new(listen, p)))?;
            }
            loop {
                line("hello from basalt");
                std::thread::sleep(every);
            }
        }
        "crash" => {
            let opts = options(rest, &["after-ms", "code"])?;
            let code = get(&opts, "code").unwrap_or(1);
            let code = u8::try_from(code).map_err(|_| format!("--code {code} is not 0-255"))?;
            line(&format!("demo: crashing with code {code}"));
            std::thread::sleep(Duration::from_millis(get(&opts, "after-ms").unwrap_or(1000)));
            Ok(code)
        }
        "unhealthy" => {
            let opts = options(rest, &["port"])?;
            if let Some(p) = port(&opts)? {
                serve(Ipv4Addr::LOCALHOST.into(), p, 503)
                    .map_err(|e| format!("cannot listen on 127.0.0.1:{p}: {e}"))?;
            }
            line("demo: running, never healthy");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "zombies" => {
            let opts = options(rest, &["every-ms"])?;
            let every = Duration::from_millis(get(&opts, "every-ms").unwrap_or(2000).max(1));
            loop {
                let (procs, zombies) = count_processes();
                line(&format!("demo: {procs} processes, {zombies} zombies"));
                std::thread::sleep(every);
            }
        }
        "--help" | "-h" | "help" => {
            line(USAGE);
            Ok(0)
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

/// Counts the processes in `/proc` and those in state `Z` (exited, not yet
/// reaped), so a boot test can see that PID 1 reaps every child.
fn count_processes() -> (usize, usize) {
    let mut procs = 0;
    let mut zombies = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else { return (0, 0) };
    for entry in dir.flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The state follows the command name, which is in parentheses and
        // may itself contain spaces or parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        procs += 1;
        if after.split_whitespace().next() == Some("Z") {
            zombies += 1;
        }
    }
    (procs, zombies)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            let _ = writeln!(io::stderr(), "basalt-demo: {msg}");
            ExitCode::from(2)
        }
    }
}
