//! `basalt serve`: a development server for an update repository.
//!
//! An update repository is a directory of static files (channel files,
//! their signatures, bundles), and in the field any HTTP server or CDN
//! serves it. This module serves one from a developer's machine, with what
//! devices rely on: `GET` and `HEAD`, strong ETags with `If-None-Match`
//! (so a device polling its channel gets `304` while nothing changed), and
//! single byte ranges with `If-Range` (so an interrupted bundle download
//! resumes where it stopped).
//!
//! What it does not do: directory listings, several ranges in one reply
//! (RFC 9110 lets a server answer those with the whole file, and this one
//! does), compression, TLS. Only regular files under the served directory
//! are ever read: the request path is percent-decoded and refused if it
//! holds `..`, NUL or a backslash, and the file it names is canonicalized
//! and must still lie under the directory, so a symlink cannot lead out.
//!
//! Files are streamed in [`CHUNK`]-sized pieces, never read whole. Each
//! request logs one line to stderr when its reply is finished (or the
//! client went away): peer, method, path, status and body bytes sent.
//!
//! [`Server::bind`] takes the address (port 0 picks a free one, as tests
//! do) and [`Server::run`] takes the future that stops it, so a caller
//! decides when it ends; [`serve`] is the command's loop, stopped by
//! Ctrl-C.

use std::fs::Metadata;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};
use tokio::signal::unix::SignalKind;

use crate::civil;

/// The address `basalt serve` listens on unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";

/// How many bytes of a file are read and sent at a time.
pub const CHUNK: usize = 64 * 1024;

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The directory to serve cannot be resolved.
    #[error(
        "cannot serve {}: {source}; give the path of an existing update repository",
        path.display()
    )]
    Dir {
        /// The directory given.
        path: PathBuf,
        /// Why it cannot be resolved.
        #[source]
        source: io::Error,
    },
    /// The path to serve is not a directory.
    #[error(
        "cannot serve {}: not a directory; give the folder that holds channels/ and the bundles",
        path.display()
    )]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// The listening socket cannot be opened.
    #[error(
        "cannot listen on {addr}: {source}; is another server using that port? choose another \
         with --listen"
    )]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The error from the system.
        #[source]
        source: io::Error,
    },
    /// The async runtime or the listening socket could not be set up.
    #[error("cannot start the server's runtime: {0}")]
    Runtime(#[source] io::Error),
    /// Ctrl-C cannot be caught, so the server could not be stopped cleanly.
    #[error("cannot listen for Ctrl-C: {0}")]
    Signal(#[source] io::Error),
}

/// A bound, not yet running server for one directory.
///
/// Binding is separate from running so that a caller (a test, the CLI)
/// knows the address before the first request can arrive.
#[derive(Debug)]
pub struct Server {
    root: PathBuf,
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl Server {
    /// Resolves `dir` and binds `listen` (port 0 picks a free port).
    pub fn bind(dir: &Path, listen: SocketAddr) -> Result<Server, ServeError> {
        let root = dir
            .canonicalize()
            .map_err(|source| ServeError::Dir { path: dir.to_path_buf(), source })?;
        if !root.is_dir() {
            return Err(ServeError::NotADirectory { path: dir.to_path_buf() });
        }
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|source| ServeError::Bind { addr: listen, source })?;
        let addr = listener.local_addr().map_err(ServeError::Runtime)?;
        listener.set_nonblocking(true).map_err(ServeError::Runtime)?;
        Ok(Server { root, listener, addr })
    }

    /// The address the server is bound to (with the real port when 0 was
    /// asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The canonical path of the served directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Serves requests until `shutdown` completes, on a single-threaded
    /// runtime of its own; blocks the calling thread.
    ///
    /// Connections still open when `shutdown` completes are closed.
    pub fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServeError::Runtime)?;
        runtime.block_on(self.run_async(shutdown))
    }

    /// Serves requests until `shutdown` completes, on the caller's tokio
    /// runtime (which needs its I/O and time drivers enabled).
    pub async fn run_async(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let listener =
            tokio::net::TcpListener::from_std(self.listener).map_err(ServeError::Runtime)?;
        let root = std::sync::Arc::new(self.root);
        let accept_loop = async {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Running out of file descriptors or a connection
                        // reset before accept: neither is the server's end.
                        eprintln!("basalt serve: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let root = root.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let root = root.clone();
                        async move { Ok::<_, io::Error>(respond(&root, peer, &req).await) }
                    });
                    // A client that goes away mid-reply is routine here
                    // (that is how downloads get interrupted).
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        };
        tokio::select! {
            () = accept_loop => {}
            () = shutdown => {}
        }
        Ok(())
    }
}

/// Serves `dir` on `listen` until Ctrl-C; calls `ready` with the bound
/// address once requests can be sent.
pub fn serve(
    dir: &Path,
    listen: SocketAddr,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let server = Server::bind(dir, listen)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(async {
        // Register for Ctrl-C before saying we are ready, so that a Ctrl-C
        // right after the message stops the server instead of killing it.
        let mut interrupt =
            tokio::signal::unix::signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
        ready(server.local_addr());
        server
            .run_async(async {
                interrupt.recv().await;
            })
            .await
    })
}

/// The reply to one request; never fails (every problem is a status).
async fn respond<B>(root: &Path, peer: SocketAddr, req: &Request<B>) -> Response<ServeBody> {
    let log = LogLine { peer, method: req.method().clone(), path: req.uri().path().to_owned() };
    let mut response = match reply(root, req).await {
        Ok(reply) => reply.into_response(req.method() == Method::HEAD, log),
        Err(status) => error_response(status, log),
    };
    response.headers_mut().insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
}

/// A file reply, decided before any byte of the body is read.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    /// The open file, positioned at the first byte to send, and how many
    /// bytes to send (`None`: no body).
    body: Option<(tokio::fs::File, u64)>,
}

impl Reply {
    fn into_response(self, head: bool, log: LogLine) -> Response<ServeBody> {
        let mut body = ServeBody { kind: Kind::Empty, sent: 0, log: Some((log, self.status)) };
        if let (false, Some((file, len))) = (head, self.body) {
            body.kind = Kind::File { file, remaining: len, buf: vec![0; CHUNK] };
        }
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

fn error_response(status: StatusCode, log: LogLine) -> Response<ServeBody> {
    let text = format!("{}\n", status.canonical_reason().unwrap_or("error"));
    let mut response = Response::new(ServeBody {
        kind: Kind::Bytes(Some(Bytes::from(text))),
        sent: 0,
        log: Some((log, status)),
    });
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// Decides the reply to a request, or the error status.
async fn reply<B>(root: &Path, req: &Request<B>) -> Result<Reply, StatusCode> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let relative = request_path(req.uri().path())?;
    let (path, meta) = resolve(root, &relative).await?;
    let size = meta.len();
    let etag = etag(&meta);
    let last_modified = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
    let last_modified = http_date(last_modified.map_or(0, |d| d.as_secs()));

    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&path)));
    // Both are built from hex digits and date words: always valid values.
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&last_modified) {
        headers.insert(header::LAST_MODIFIED, v);
    }

    let request_headers = req.headers();
    if let Some(inm) = request_headers.get(header::IF_NONE_MATCH) {
        if none_match_hits(inm.as_bytes(), &etag) {
            headers.remove(header::CONTENT_TYPE);
            return Ok(Reply { status: StatusCode::NOT_MODIFIED, headers, body: None });
        }
    }

    let mut range = request_headers.get(header::RANGE).map(|v| parse_range(v.as_bytes(), size));
    if let Some(if_range) = request_headers.get(header::IF_RANGE) {
        if !if_range_holds(if_range.as_bytes(), &etag, &last_modified) {
            range = None;
        }
    }
    let (status, offset, len) = match range.unwrap_or(RangeRequest::Whole) {
        RangeRequest::Whole => (StatusCode::OK, 0, size),
        RangeRequest::Part { first, last } => {
            let content_range = format!("bytes {first}-{last}/{size}");
            if let Ok(v) = HeaderValue::from_str(&content_range) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, first, last - first + 1)
        }
        RangeRequest::Unsatisfiable => {
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
            return Ok(Reply { status: StatusCode::RANGE_NOT_SATISFIABLE, headers, body: None });
        }
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    let mut file = tokio::fs::File::open(&path).await.map_err(|e| status_of(&e))?;
    if offset > 0 {
        file.seek(io::SeekFrom::Start(offset)).await.map_err(|e| status_of(&e))?;
    }
    Ok(Reply { status, headers, body: Some((file, len)) })
}

/// The request path as a relative path, or 400 when it is not one that can
/// name a file under the root.
fn request_path(raw: &str) -> Result<PathBuf, StatusCode> {
    let decoded = percent_decode(raw.as_bytes()).ok_or(StatusCode::BAD_REQUEST)?;
    if !decoded.starts_with(b"/") || decoded.iter().any(|&b| b == 0 || b == b'\\') {
        return Err(StatusCode::BAD_REQUEST);
    }
    let mut relative = PathBuf::new();
    for segment in decoded.split(|&b| b == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => return Err(StatusCode::BAD_REQUEST),
            name => relative.push(std::ffi::OsStr::from_bytes(name)),
        }
    }
    Ok(relative)
}

/// Decodes `%XX` escapes; `None` for a malformed escape.
fn percent_decode(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The canonical path and metadata of the regular file `relative` names
/// under `root`; 404 for anything else, including a path that leads out.
async fn resolve(root: &Path, relative: &Path) -> Result<(PathBuf, Metadata), StatusCode> {
    let path = tokio::fs::canonicalize(root.join(relative)).await.map_err(|e| status_of(&e))?;
    if !path.starts_with(root) {
        return Err(StatusCode::NOT_FOUND);
    }
    let meta = tokio::fs::metadata(&path).await.map_err(|e| status_of(&e))?;
    if !meta.is_file() {
        return Err(StatusCode::NOT_FOUND);
    }
    Ok((path, meta))
}

fn status_of(e: &io::Error) -> StatusCode {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => StatusCode::NOT_FOUND,
        io::ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml" | "sig" | "txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The strong ETag of a file: its size and modification time in
/// nanoseconds, both in hex. Rewriting a file changes at least one.
pub fn etag(meta: &Metadata) -> String {
    let nanos = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("\"{:x}-{:x}\"", meta.len(), nanos)
}

/// An IMF-fixdate (RFC 9110 §5.6.7) of a Unix time, e.g.
/// `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = secs / 86_400;
    let (y, m, d) = civil::civil_from_days(days as i64);
    let rem = secs % 86_400;
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(m as usize + 11) % 12],
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Whether an `If-None-Match` value (`*` or a list of entity tags) matches
/// `etag`, by the weak comparison RFC 9110 §13.1.2 asks for.
fn none_match_hits(value: &[u8], etag: &str) -> bool {
    let Ok(value) = std::str::from_utf8(value) else { return false };
    let ours = etag.as_bytes();
    value
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours)
}

/// Whether an `If-Range` value lets the range apply: a strong ETag equal to
/// ours, or exactly our `Last-Modified` date.
fn if_range_holds(value: &[u8], etag: &str, last_modified: &str) -> bool {
    let Ok(value) = std::str::from_utf8(value) else { return false };
    let value = value.trim();
    if value.starts_with('"') {
        value == etag
    } else {
        // A weak tag never matches (RFC 9110 §13.1.5); a date must be the
        // very date we send.
        !value.starts_with("W/") && value == last_modified
    }
}

/// What a `Range` header asks of a file of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeRequest {
    /// Serve the whole file: a malformed header, another unit, or several
    /// ranges.
    Whole,
    /// The inclusive byte range `first..=last`, within the file.
    Part { first: u64, last: u64 },
    /// A well-formed single range that lies outside the file.
    Unsatisfiable,
}

fn parse_range(value: &[u8], size: u64) -> RangeRequest {
    let Ok(value) = std::str::from_utf8(value) else { return RangeRequest::Whole };
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return RangeRequest::Whole };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeRequest::Whole };
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match (first.is_empty(), number(first), number(last)) {
        // `-n`: the last n bytes.
        (true, None, Some(n)) => {
            if n == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part { first: size - n.min(size), last: size - 1 }
            }
        }
        (false, Some(first), None) if last.is_empty() => {
            if first >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part { first, last: size - 1 }
            }
        }
        (false, Some(first), Some(last)) if last >= first => {
            if first >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part { first, last: last.min(size - 1) }
            }
        }
        _ => RangeRequest::Whole,
    }
}

/// One request's log line, printed when its reply body is dropped.
struct LogLine {
    peer: SocketAddr,
    method: Method,
    path: String,
}

/// A reply body: nothing, a short text, or a stretch of a file read
/// [`CHUNK`] bytes at a time.
struct ServeBody {
    kind: Kind,
    sent: u64,
    log: Option<(LogLine, StatusCode)>,
}

enum Kind {
    Empty,
    Bytes(Option<Bytes>),
    File {
        /// Positioned at the first byte to send.
        file: tokio::fs::File,
        remaining: u64,
        buf: Vec<u8>,
    },
}

impl Body for ServeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let chunk = match &mut this.kind {
            Kind::Empty => None,
            Kind::Bytes(bytes) => bytes.take(),
            Kind::File { file, remaining, buf } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let want = (*remaining).min(buf.len() as u64) as usize;
                let mut read_buf = ReadBuf::new(&mut buf[..want]);
                ready!(Pin::new(&mut *file).poll_read(cx, &mut read_buf))?;
                let n = read_buf.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file became shorter while it was being sent",
                    ))));
                }
                *remaining -= n as u64;
                Some(Bytes::copy_from_slice(read_buf.filled()))
            }
        };
        Poll::Ready(chunk.map(|bytes| {
            this.sent += bytes.len() as u64;
            Ok(Frame::data(bytes))
        }))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Bytes(bytes) => bytes.is_none(),
            Kind::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Bytes(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

impl Drop for ServeBody {
    fn drop(&mut self) {
        if let Some((line, status)) = self.log.take() {
            eprintln!(
                "{} {} {} {} {}",
                line.peer,
                line.method,
                line.path,
                status.as_u16(),
                self.sent
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A server on a free port over a temp dir, stopped when dropped.
    struct Running {
        dir: tempfile::TempDir,
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
    }

    impl Running {
        fn start() -> Running {
            let dir = tempfile::tempdir().unwrap();
            let server = Server::bind(dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = server.local_addr();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                server.run(async {
                    let _ = stopped.await;
                })
            });
            Running { dir, addr, stop: Some(stop), thread: Some(thread) }
        }

        fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, contents).unwrap();
            path
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap().unwrap();
            }
        }
    }

    /// What curl saw.
    struct Seen {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// Runs curl with `args` and the URL; the judge of every reply here.
    fn curl(args: &[&str], url: &str) -> Seen {
        let out = Command::new("curl")
            .args(["-sS", "-i", "--path-as-is", "--max-time", "10"])
            .args(args)
            .arg(url)
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "curl {args:?} {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw = out.stdout;
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
        let head = String::from_utf8(raw[..end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        Seen { status, headers, body: raw[end + 4..].to_vec() }
    }

    /// Bytes that do not repeat with any short period, so an off-by-one in
    /// an offset shows.
    fn data(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn get_returns_the_whole_file_with_validators() {
        let server = Running::start();
        let contents = data(300_000);
        server.write("bundles/os-1.0.0.basalt", &contents);
        let seen = curl(&[], &server.url("/bundles/os-1.0.0.basalt"));
        assert_eq!(seen.status, 200);
        assert!(seen.body == contents, "body differs from the file");
        assert_eq!(seen.header("content-length"), Some("300000"));
        assert_eq!(seen.header("content-type"), Some("application/octet-stream"));
        assert_eq!(seen.header("accept-ranges"), Some("bytes"));
        let etag = seen.header("etag").unwrap();
        assert!(etag.starts_with("\"493e0-") && etag.ends_with('"'), "{etag}");
        assert!(seen.header("last-modified").unwrap().ends_with(" GMT"));
    }

    #[test]
    fn text_files_are_served_as_text() {
        let server = Running::start();
        server.write("channels/stable.toml", b"version = \"1.0.0\"\n");
        server.write("channels/stable.toml.sig", b"sig\n");
        for path in ["/channels/stable.toml", "/channels/stable.toml.sig"] {
            let seen = curl(&[], &server.url(path));
            assert_eq!(seen.header("content-type"), Some("text/plain; charset=utf-8"), "{path}");
        }
    }

    #[test]
    fn ranges_give_206_with_content_range() {
        let server = Running::start();
        let contents = data(1000);
        server.write("b", &contents);
        let url = server.url("/b");

        let seen = curl(&["-r", "10-19"], &url);
        assert_eq!(seen.status, 206);
        assert_eq!(seen.body, &contents[10..20]);
        assert_eq!(seen.header("content-range"), Some("bytes 10-19/1000"));

        let seen = curl(&["-r", "-5"], &url);
        assert_eq!(seen.status, 206);
        assert_eq!(seen.body, &contents[995..]);
        assert_eq!(seen.header("content-range"), Some("bytes 995-999/1000"));

        let seen = curl(&["-r", "990-"], &url);
        assert_eq!(seen.status, 206);
        assert_eq!(seen.body, &contents[990..]);

        // A last position past the end is cut to the end.
        let seen = curl(&["-r", "900-5000"], &url);
        assert_eq!(seen.status, 206);
        assert_eq!(seen.header("content-range"), Some("bytes 900-999/1000"));
        assert_eq!(seen.body, &contents[900..]);
    }

    #[test]
    fn range_outside_the_file_is_416() {
        let server = Running::start();
        server.write("b", &data(1000));
        let seen = curl(&["-r", "1000-1010"], &server.url("/b"));
        assert_eq!(seen.status, 416);
        assert_eq!(seen.header("content-range"), Some("bytes */1000"));
        assert!(seen.body.is_empty());
    }

    #[test]
    fn several_ranges_or_a_malformed_one_give_the_whole_file() {
        let server = Running::start();
        let contents = data(1000);
        server.write("b", &contents);
        let url = server.url("/b");
        for range in ["bytes=0-1,5-6", "bytes=abc", "bytes=9-3", "items=0-1", "bytes=--1"] {
            let seen = curl(&["-H", &format!("Range: {range}")], &url);
            assert_eq!(seen.status, 200, "{range}");
            assert!(seen.body == contents, "{range}");
        }
    }

    #[test]
    fn if_none_match_gives_304_with_the_etag() {
        let server = Running::start();
        server.write("channels/stable.toml", b"version = \"1.0.0\"\n");
        let url = server.url("/channels/stable.toml");
        let etag = curl(&[], &url).header("etag").unwrap().to_owned();

        let seen = curl(&["-H", &format!("If-None-Match: {etag}")], &url);
        assert_eq!(seen.status, 304);
        assert_eq!(seen.header("etag"), Some(etag.as_str()));
        assert!(seen.body.is_empty());

        let seen = curl(&["-H", &format!("If-None-Match: \"other\", W/{etag}")], &url);
        assert_eq!(seen.status, 304, "a list, and the weak form of our tag, match");
        let seen = curl(&["-H", "If-None-Match: *"], &url);
        assert_eq!(seen.status, 304);
        let seen = curl(&["-H", "If-None-Match: \"other\""], &url);
        assert_eq!(seen.status, 200);

        // Rewriting the file (another size) changes the tag.
        server.write("channels/stable.toml", b"version = \"1.0.1\"\n\n");
        let seen = curl(&["-H", &format!("If-None-Match: {etag}")], &url);
        assert_eq!(seen.status, 200);
        assert_ne!(seen.header("etag"), Some(etag.as_str()));
    }

    #[test]
    fn if_range_mismatch_gives_the_whole_file() {
        let server = Running::start();
        let contents = data(1000);
        server.write("b", &contents);
        let url = server.url("/b");
        let first = curl(&[], &url);
        let etag = first.header("etag").unwrap();

        let seen = curl(&["-r", "100-", "-H", &format!("If-Range: {etag}")], &url);
        assert_eq!(seen.status, 206);
        assert_eq!(seen.body, &contents[100..]);

        let seen = curl(&["-r", "100-", "-H", "If-Range: \"not-this-one\""], &url);
        assert_eq!(seen.status, 200);
        assert!(seen.body == contents);

        let date = first.header("last-modified").unwrap();
        let seen = curl(&["-r", "100-", "-H", &format!("If-Range: {date}")], &url);
        assert_eq!(seen.status, 206, "our own Last-Modified date holds");
    }

    #[test]
    fn head_gives_the_headers_without_a_body() {
        let server = Running::start();
        server.write("b", &data(12345));
        let seen = curl(&["-I"], &server.url("/b"));
        assert_eq!(seen.status, 200);
        assert_eq!(seen.header("content-length"), Some("12345"));
        assert!(seen.header("etag").is_some());
        assert!(seen.body.is_empty());
    }

    #[test]
    fn traversal_is_refused() {
        let server = Running::start();
        server.write("b", b"inside");
        let outside = server
            .dir
            .path()
            .parent()
            .unwrap()
            .join(format!("basalt-serve-outside-{}", std::process::id()));
        std::fs::write(&outside, b"secret").unwrap();
        let name = outside.file_name().unwrap().to_str().unwrap();
        for path in [
            format!("/../{name}"),
            format!("/%2e%2e/{name}"),
            format!("/%2E%2E%2f{name}"),
            format!("/x/..%5c..%5c{name}"),
            "/b%00".to_owned(),
            "/%zz".to_owned(),
        ] {
            let seen = curl(&[], &server.url(&path));
            assert!(matches!(seen.status, 400 | 404), "{path}: {}", seen.status);
            assert!(!seen.body.starts_with(b"secret"), "{path}");
        }
        // A symlink inside that leads outside is not followed.
        std::os::unix::fs::symlink(&outside, server.dir.path().join("link")).unwrap();
        assert_eq!(curl(&[], &server.url("/link")).status, 404);
        // One that stays inside is.
        std::os::unix::fs::symlink("b", server.dir.path().join("alias")).unwrap();
        assert_eq!(curl(&[], &server.url("/alias")).body, b"inside");
        std::fs::remove_file(&outside).unwrap();
    }

    #[test]
    fn missing_files_and_directories_are_404() {
        let server = Running::start();
        server.write("channels/stable.toml", b"x");
        assert_eq!(curl(&[], &server.url("/nothing-here")).status, 404);
        assert_eq!(curl(&[], &server.url("/channels/")).status, 404);
        assert_eq!(curl(&[], &server.url("/channels")).status, 404);
        assert_eq!(curl(&[], &server.url("/")).status, 404);
        assert_eq!(curl(&[], &server.url("/channels/stable.toml/x")).status, 404);
    }

    #[test]
    fn other_methods_are_405_with_allow() {
        let server = Running::start();
        server.write("b", b"x");
        for method in ["POST", "PUT", "DELETE"] {
            let seen = curl(&["-X", method], &server.url("/b"));
            assert_eq!(seen.status, 405, "{method}");
            assert_eq!(seen.header("allow"), Some("GET, HEAD"));
        }
    }

    #[test]
    fn curl_resumes_a_partial_download_to_identical_bytes() {
        let server = Running::start();
        let contents = data(1_000_000);
        server.write("bundles/os.basalt", &contents);
        let out = server.dir.path().join("download");
        std::fs::write(&out, &contents[..333_333]).unwrap();
        let status = Command::new("curl")
            .args(["-sS", "-f", "-C", "-", "-o"])
            .arg(&out)
            .arg(server.url("/bundles/os.basalt"))
            .status()
            .unwrap();
        assert!(status.success());
        assert!(std::fs::read(&out).unwrap() == contents, "resumed file differs");
    }

    #[test]
    fn busy_port_is_a_clear_error() {
        let server = Running::start();
        let err = Server::bind(server.dir.path(), server.addr).unwrap_err();
        assert!(matches!(err, ServeError::Bind { .. }));
        assert!(err.to_string().contains("--listen"), "{err}");
        let err = Server::bind(&server.dir.path().join("none"), "127.0.0.1:0".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, ServeError::Dir { .. }), "{err}");
    }

    #[test]
    fn range_parsing() {
        use RangeRequest::*;
        assert_eq!(parse_range(b"bytes=0-0", 10), Part { first: 0, last: 0 });
        assert_eq!(parse_range(b"bytes=-20", 10), Part { first: 0, last: 9 });
        assert_eq!(parse_range(b"bytes=-0", 10), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=5-", 10), Part { first: 5, last: 9 });
        assert_eq!(parse_range(b"bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=+1-2", 10), Whole);
        assert_eq!(parse_range(b"bytes=99999999999999999999999-", 10), Whole);
        assert_eq!(parse_range(b"bytes=-", 10), Whole);
        assert_eq!(parse_range(b"bytes=", 10), Whole);
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 GMT");
    }
}
