//! The update agent's HTTP client: small files (channel metadata) and
//! resumable bundle downloads from an update repository.
//!
//! Plain `http://` only, for now. Nothing fetched here is trusted for
//! being fetched: channel files are checked against their signatures and
//! bundles against the sha256 the signed channel names, so a network that
//! tampers can only make an update fail, never pass. TLS (for privacy, and
//! against a network that stalls or replays) can be added later without
//! changing these functions' signatures.
//!
//! Everything is async on tokio (the agent runs a current-thread runtime
//! with I/O and time enabled) over hyper's HTTP/1.1 client connection, one
//! connection per request. Against slow-retrieval and endless-data
//! attacks (TUF's threat model), every wait has a deadline and every body
//! has a ceiling: [`get_small`] gives the whole exchange one deadline and
//! refuses bodies above its limit; [`download`] gives the connect and each
//! read a deadline, and never writes past the size the channel names.
//!
//! A download resumes: the bytes already in the partial file are asked
//! for no more (`Range: bytes=N-`), guarded by the ETag seen when they
//! were fetched (`If-Range`), so a file replaced on the server restarts
//! from zero instead of mixing two files. The sha256 of the whole file is
//! the final judge either way.
//!
//! Server replies are network input: a malformed header, a lying
//! `Content-Range` or an early close is an error, never a panic.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// How long [`download`] waits for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`download`] waits for the reply head or for any body bytes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The first pause before [`download`] retries; it doubles each time.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest pause between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The longest ETag kept for `If-Range`; a longer one is not used.
const MAX_ETAG: usize = 256;
/// Bytes read from the partial file at a time when hashing it.
const HASH_CHUNK: usize = 64 * 1024;

/// What went wrong with a URL, a connection, a reply or the partial file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The text is not an `http://host[:port]/path` URL.
    #[error("{url:?} is not a URL the update agent can fetch: {why}")]
    BadUrl {
        /// The text given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// A relative path cannot be joined to a repository URL.
    #[error("cannot fetch {rel:?} relative to {base}: {why}")]
    BadPath {
        /// The repository URL.
        base: String,
        /// The path given (from a channel file, say).
        rel: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No TCP connection could be made.
    #[error(
        "{url}: cannot connect: {source}; is the repository served at {server}, and is the \
         network up?"
    )]
    Connect {
        /// The URL fetched.
        url: String,
        /// The server's root URL, `http://host:port/`.
        server: String,
        /// The error from the system.
        #[source]
        source: io::Error,
    },
    /// The connection failed during the exchange (closed early, or not
    /// speaking HTTP/1.1).
    #[error("{url}: the connection failed: {source}")]
    Http {
        /// The URL fetched.
        url: String,
        /// The error from the HTTP layer.
        #[source]
        source: hyper::Error,
    },
    /// The server took longer than the deadline.
    #[error(
        "{url}: no answer within {} ms while {what}; the server or the network is too slow or \
         stalled",
        timeout.as_millis()
    )]
    Timeout {
        /// The URL fetched.
        url: String,
        /// What was being waited for.
        what: &'static str,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The server answered with a status other than the ones expected.
    #[error("{url}: the server answered {status}; {hint}")]
    Status {
        /// The URL fetched.
        url: String,
        /// The status code.
        status: u16,
        /// What to check.
        hint: &'static str,
    },
    /// The body is larger than allowed.
    #[error(
        "{url}: the body is larger than {limit} bytes, the most accepted here; is this the right \
         file?"
    )]
    TooLarge {
        /// The URL fetched.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The server's reply contradicts the request or itself.
    #[error("{url}: unusable reply: {why}")]
    BadReply {
        /// The URL fetched.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The server closed the body before all bytes came.
    #[error("{url}: the connection closed after {got} of {expected} bytes")]
    Incomplete {
        /// The URL fetched.
        url: String,
        /// Bytes in the partial file.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// The file on the server has another size than the channel says.
    #[error(
        "{url}: the server has {actual} bytes where {expected} are expected; the channel file \
         and the repository disagree (publish them again together)"
    )]
    SizeMismatch {
        /// The URL fetched.
        url: String,
        /// The size expected.
        expected: u64,
        /// The size the server announced or sent.
        actual: u64,
    },
    /// The downloaded file has another sha256 than expected.
    #[error(
        "{url}: the download has sha256 {actual}, expected {expected}; {} was deleted so the \
         next attempt starts over (if it happens again, the channel file and the bundle on the \
         server disagree)",
        path.display()
    )]
    Sha256Mismatch {
        /// The URL fetched.
        url: String,
        /// The partial file, now deleted.
        path: PathBuf,
        /// The expected digest (hex).
        expected: String,
        /// The digest of what came (hex).
        actual: String,
    },
    /// The expected sha256 is not 64 hex digits.
    #[error("{0:?} is not a sha256 digest (64 hex digits); check the channel file")]
    BadDigest(String),
    /// The partial file or its ETag file cannot be read or written.
    #[error(
        "{}: cannot {action}: {source}; is its filesystem mounted and writable, with room for \
         the bundle?",
        path.display()
    )]
    File {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The error from the system.
        #[source]
        source: io::Error,
    },
}

impl FetchError {
    /// Whether trying again later may succeed: connection failures,
    /// timeouts, early closes and the server-side statuses that say so
    /// (408, 429, 5xx). [`download`] retries these by itself.
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Connect { .. }
            | FetchError::Http { .. }
            | FetchError::Timeout { .. }
            | FetchError::Incomplete { .. } => true,
            FetchError::Status { status, .. } => {
                *status == 408 || *status == 429 || (500..600).contains(status)
            }
            _ => false,
        }
    }
}

/// An `http://host[:port]/path` URL, parsed.
///
/// The host is a name, an IPv4 address or a bracketed IPv6 address; the
/// path may carry a query, and a fragment is dropped. No user info, no
/// other scheme, nothing outside printable ASCII (percent-encode it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Without brackets for IPv6.
    host: String,
    port: u16,
    /// Starts with `/`; may end with `?query`.
    path: String,
}

impl Url {
    /// Parses `s`; anything but a plain `http://` URL is an error saying
    /// what is wrong.
    pub fn parse(s: &str) -> Result<Url, FetchError> {
        let bad = |why: &str| FetchError::BadUrl { url: s.to_owned(), why: why.to_owned() };
        if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(bad(&format!(
                "it contains {c:?}; percent-encode spaces, control and non-ASCII characters"
            )));
        }
        let scheme_end = s.find("://").ok_or_else(|| bad("it has no http:// in front"))?;
        let scheme = &s[..scheme_end];
        if scheme.eq_ignore_ascii_case("https") {
            return Err(bad("https is not supported yet; serve the repository over http \
                            (channel files and bundles are signed, so http is safe for them)"));
        }
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(bad("only http:// URLs are supported"));
        }
        let rest = &s[scheme_end + 3..];
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(bad("user names and passwords in URLs are not supported"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) =
                bracketed.split_once(']').ok_or_else(|| bad("the IPv6 address has no ']'"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("the address in [] is not an IPv6 address"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after the ']'"))?),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("it has no host"));
        }
        if !authority.starts_with('[')
            && !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(bad("the host may hold only letters, digits, '-' and '.'"));
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(port) if port != 0 && p.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return Err(bad("the port is not a number from 1 to 65535")),
            },
        };
        let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
        Ok(Url { host: host.to_owned(), port, path })
    }

    /// `rel` (a relative path such as `channels/stable.toml`) resolved
    /// against the directory of this URL, as a repository base
    /// `http://10.0.2.2:8000/` and a path from a channel file are.
    ///
    /// `..` segments (plain or percent-encoded), absolute paths and
    /// absolute URLs are refused: a signed channel file names files inside
    /// its repository and nowhere else.
    pub fn join(&self, rel: &str) -> Result<Url, FetchError> {
        let bad = |why| FetchError::BadPath { base: self.to_string(), rel: rel.to_owned(), why };
        if rel.is_empty() {
            return Err(bad("the path is empty"));
        }
        if rel.contains("://") || rel.split('/').next().is_some_and(|first| first.contains(':')) {
            return Err(bad("absolute URLs are refused; give a path inside the repository"));
        }
        if rel.starts_with('/') {
            return Err(bad("absolute paths are refused; give a path inside the repository"));
        }
        if rel.bytes().any(|b| !b.is_ascii_graphic() || b == b'\\' || b == b'#') {
            return Err(bad("it holds spaces, control characters, '\\' or '#'"));
        }
        let path_part = rel.split_once('?').map_or(rel, |(path, _)| path);
        for segment in path_part.split('/') {
            let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
            if decoded == ".." {
                return Err(bad("'..' segments are refused; give a path inside the repository"));
            }
            if segment.to_ascii_lowercase().contains("%2f")
                || segment.to_ascii_lowercase().contains("%5c")
            {
                return Err(bad("encoded '/' or '\\' is refused"));
            }
        }
        let base_path = self.path.split_once('?').map_or(self.path.as_str(), |(path, _)| path);
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        let rel = rel.strip_prefix("./").unwrap_or(rel);
        Ok(Url { host: self.host.clone(), port: self.port, path: format!("{dir}{rel}") })
    }

    /// The host: a name or an address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (80 when the URL names none).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path and query, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `http://host:port/`, for messages.
    fn server(&self) -> String {
        format!("http://{}/", self.authority())
    }

    /// `host[:port]` as the `Host` header and the URL write it.
    fn authority(&self) -> String {
        let host =
            if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path)
    }
}

impl std::str::FromStr for Url {
    type Err = FetchError;

    fn from_str(s: &str) -> Result<Url, FetchError> {
        Url::parse(s)
    }
}

/// What [`get_small`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The server says the file still has the ETag that was sent (304).
    NotModified,
    /// The file.
    Body {
        /// Its bytes.
        bytes: Vec<u8>,
        /// Its ETag, to send next time.
        etag: Option<String>,
    },
}

/// GETs a small file (a channel file, a signature) into memory.
///
/// Sends `If-None-Match` when `etag` is given, and returns
/// [`Fetched::NotModified`] on 304. Refuses bodies above `max_bytes`: by
/// `Content-Length` before reading, and by counting while reading. The
/// whole exchange, connect included, must finish within `timeout`.
pub async fn get_small(
    url: &Url,
    etag: Option<&str>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Fetched, FetchError> {
    let exchange = async {
        let mut connection = Connection::open(url, timeout).await?;
        let mut request = request(url)?;
        if let Some(etag) = etag {
            let value = HeaderValue::from_str(etag).map_err(|_| FetchError::BadReply {
                url: url.to_string(),
                why: format!("the ETag {etag:?} given cannot be sent as a header"),
            })?;
            request.headers_mut().insert(header::IF_NONE_MATCH, value);
        }
        let response = connection.send(url, request).await?;
        match response.status() {
            StatusCode::NOT_MODIFIED if etag.is_some() => return Ok(Fetched::NotModified),
            StatusCode::OK => {}
            status => return Err(status_error(url, status)),
        }
        let etag = response_etag(&response);
        let limit = max_bytes as u64;
        if content_length(url, &response)?.is_some_and(|len| len > limit) {
            return Err(FetchError::TooLarge { url: url.to_string(), limit });
        }
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|source| FetchError::Http { url: url.to_string(), source })?;
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > max_bytes {
                    return Err(FetchError::TooLarge { url: url.to_string(), limit });
                }
                bytes.extend_from_slice(&data);
            }
        }
        Ok(Fetched::Body { bytes, etag })
    };
    deadline(url, timeout, "fetching the file", exchange).await?
}

/// What a finished [`download`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadStats {
    /// Body bytes received over the network in this call.
    pub bytes_fetched: u64,
    /// Bytes already in the partial file when the call started.
    pub resumed_from: u64,
    /// HTTP requests made, counting attempts that failed to connect.
    pub requests: u32,
}

/// How [`download_with`] waits and retries. [`Default`] gives the
/// module's constants and 5 retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long to wait for the reply head or any body bytes.
    pub read_timeout: Duration,
    /// The pause before the first retry; it doubles each time.
    pub first_backoff: Duration,
    /// The longest pause between retries.
    pub max_backoff: Duration,
    /// How many times a retryable failure is retried before giving up.
    pub retries: u32,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            connect_timeout: CONNECT_TIMEOUT,
            read_timeout: READ_TIMEOUT,
            first_backoff: FIRST_BACKOFF,
            max_backoff: MAX_BACKOFF,
            retries: 5,
        }
    }
}

/// Downloads `url` into the file `partial`, resuming from the bytes
/// already in it, and checks the result.
///
/// Resumes with `Range: bytes=N-`, guarded by `If-Range` with the ETag
/// seen when those bytes came (kept beside as `partial` + `.etag`); a 200
/// reply to a Range request restarts from 0. A dropped connection, a
/// timeout or a 5xx is retried up to `retries` times with exponential
/// backoff (from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`]). Never writes
/// beyond `expected_size`: a server sending more is an error. On
/// completion checks the size and the sha256 (hex) of the whole file,
/// deleting it on a mismatch, and fsyncs it. `progress` is called with the
/// number of bytes in the file after each write.
pub async fn download(
    url: &Url,
    partial: &Path,
    expected_size: u64,
    expected_sha256: &str,
    retries: u32,
    progress: &mut dyn FnMut(u64),
) -> Result<DownloadStats, FetchError> {
    let policy = Policy { retries, ..Policy::default() };
    download_with(url, partial, expected_size, expected_sha256, &policy, progress).await
}

/// [`download`] with the deadlines and backoff of `policy` instead of the
/// module's constants.
pub async fn download_with(
    url: &Url,
    partial: &Path,
    expected_size: u64,
    expected_sha256: &str,
    policy: &Policy,
    progress: &mut dyn FnMut(u64),
) -> Result<DownloadStats, FetchError> {
    let expected_sha256 = expected_sha256.to_ascii_lowercase();
    if expected_sha256.len() != 64 || !expected_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FetchError::BadDigest(expected_sha256));
    }
    let etag_path = etag_path(partial);
    let mut stats = DownloadStats { bytes_fetched: 0, resumed_from: 0, requests: 0 };
    let mut failures = 0u32;
    let mut backoff = policy.first_backoff;
    let mut first = true;
    loop {
        let mut have = file_len(partial).await?;
        if have > expected_size {
            // Not a prefix of this file: left by something else.
            truncate(partial, &etag_path).await?;
            have = 0;
        }
        if first {
            stats.resumed_from = have;
            first = false;
        }
        if have == expected_size {
            break;
        }
        let attempt = fetch_rest(url, partial, &etag_path, have, expected_size, policy, progress);
        let result = attempt.await;
        stats.requests += 1;
        let error = match result {
            Ok(fetched) => {
                stats.bytes_fetched += fetched;
                let got = file_len(partial).await?;
                if got == expected_size {
                    break;
                }
                // A close-delimited body that ended early.
                FetchError::Incomplete { url: url.to_string(), got, expected: expected_size }
            }
            Err((fetched, e)) => {
                stats.bytes_fetched += fetched;
                e
            }
        };
        if !error.is_retryable() || failures >= policy.retries {
            return Err(error);
        }
        failures += 1;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(policy.max_backoff);
    }

    let actual = sha256_file(partial).await?;
    if actual != expected_sha256 {
        remove(partial).await?;
        remove(&etag_path).await?;
        return Err(FetchError::Sha256Mismatch {
            url: url.to_string(),
            path: partial.to_path_buf(),
            expected: expected_sha256,
            actual,
        });
    }
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .open(partial)
        .await
        .map_err(|source| file_error(partial, "open the download to sync it", source))?;
    file.sync_all().await.map_err(|source| file_error(partial, "sync the download", source))?;
    remove(&etag_path).await?;
    Ok(stats)
}

/// One request for the bytes from `have` on, appended to `partial`.
/// Returns the body bytes received, also beside an error.
async fn fetch_rest(
    url: &Url,
    partial: &Path,
    etag_path: &Path,
    have: u64,
    expected_size: u64,
    policy: &Policy,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, (u64, FetchError)> {
    let mut received = 0u64;
    let result = async {
        let mut connection = Connection::open(url, policy.connect_timeout).await?;
        let mut request = request(url)?;
        if have > 0 {
            let headers = request.headers_mut();
            headers.insert(header::RANGE, header_value(&format!("bytes={have}-")));
            if let Some(etag) = read_etag(etag_path).await? {
                headers.insert(header::IF_RANGE, header_value(&etag));
            }
        }
        let reply = deadline(
            url,
            policy.read_timeout,
            "waiting for the reply",
            connection.send(url, request),
        );
        let response = reply.await??;
        let start = match response.status() {
            StatusCode::PARTIAL_CONTENT if have > 0 => {
                check_content_range(url, &response, have, expected_size)?;
                have
            }
            StatusCode::OK => {
                if let Some(len) = content_length(url, &response)? {
                    if len != expected_size {
                        return Err(FetchError::SizeMismatch {
                            url: url.to_string(),
                            expected: expected_size,
                            actual: len,
                        });
                    }
                }
                0
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The server's file is shorter than what is already here.
                truncate(partial, etag_path).await?;
                return Err(FetchError::BadReply {
                    url: url.to_string(),
                    why: format!(
                        "the server refused bytes {have}- (416): its file is shorter than \
                         {expected_size} bytes; the channel file and the repository disagree"
                    ),
                });
            }
            status => return Err(status_error(url, status)),
        };
        let mut file = open_at(partial, start).await?;
        match response_etag(&response).filter(|tag| !tag.starts_with("W/")) {
            Some(tag) => write_etag(etag_path, &tag).await?,
            None => remove(etag_path).await?,
        }
        let mut position = start;
        let mut body = response.into_body();
        let streamed = async {
            loop {
                let frame = deadline(url, policy.read_timeout, "reading the body", body.frame());
                let Some(frame) = frame.await? else { return Ok(()) };
                let frame =
                    frame.map_err(|source| FetchError::Http { url: url.to_string(), source })?;
                let Ok(data) = frame.into_data() else { continue };
                received += data.len() as u64;
                if position + data.len() as u64 > expected_size {
                    return Err(FetchError::SizeMismatch {
                        url: url.to_string(),
                        expected: expected_size,
                        actual: position + data.len() as u64,
                    });
                }
                file.write_all(&data)
                    .await
                    .map_err(|source| file_error(partial, "write the download", source))?;
                position += data.len() as u64;
                progress(position);
            }
        }
        .await;
        // tokio writes in the background: wait for the last write on every
        // path, or the next attempt could read a stale length and the write
        // land after it.
        let flushed =
            file.flush().await.map_err(|source| file_error(partial, "write the download", source));
        drop(file);
        if let Err(FetchError::SizeMismatch { .. }) = &streamed {
            // Whatever this server sends is not the file the channel names.
            truncate(partial, etag_path).await?;
        }
        streamed?;
        flushed
    }
    .await;
    match result {
        Ok(()) => Ok(received),
        Err(e) => Err((received, e)),
    }
}

/// One HTTP/1.1 connection; the task that drives it ends when this is
/// dropped.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Connection {
    async fn open(url: &Url, timeout: Duration) -> Result<Connection, FetchError> {
        let connect = tokio::net::TcpStream::connect((url.host(), url.port()));
        let stream = deadline(url, timeout, "connecting", connect).await?.map_err(|source| {
            FetchError::Connect { url: url.to_string(), server: url.server(), source }
        })?;
        // Requests are single small writes; do not hold them back.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| FetchError::Http { url: url.to_string(), source })?;
        // Errors of the connection reach the request or the body too.
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection { sender, driver })
    }

    async fn send(
        &mut self,
        url: &Url,
        request: Request<Empty<Bytes>>,
    ) -> Result<http::Response<Incoming>, FetchError> {
        self.sender
            .send_request(request)
            .await
            .map_err(|source| FetchError::Http { url: url.to_string(), source })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A GET of `url` with the headers every request carries.
fn request(url: &Url) -> Result<Request<Empty<Bytes>>, FetchError> {
    Request::get(url.path())
        .header(header::HOST, url.authority())
        .header(header::USER_AGENT, concat!("basalt-init/", env!("CARGO_PKG_VERSION")))
        .body(Empty::new())
        .map_err(|e| FetchError::BadUrl { url: url.to_string(), why: e.to_string() })
}

/// `value` as a header value; only called with digits, `bytes=` and ETags
/// already checked to be visible ASCII.
fn header_value(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static(""))
}

/// `future`, or a timeout error once `timeout` has passed.
async fn deadline<T>(
    url: &Url,
    timeout: Duration,
    what: &'static str,
    future: impl Future<Output = T>,
) -> Result<T, FetchError> {
    tokio::time::timeout(timeout, future).await.map_err(|_| FetchError::Timeout {
        url: url.to_string(),
        what,
        timeout,
    })
}

fn status_error(url: &Url, status: StatusCode) -> FetchError {
    let hint = match status.as_u16() {
        404 => {
            "check that the repository is served at this address and holds this file \
                (was the channel published?)"
        }
        401 | 403 => {
            "the server refuses access; the repository must be readable without \
                      credentials"
        }
        408 | 429 => "the server is busy; the agent will try again",
        500..=599 => "the server failed; the agent will try again",
        300..=399 => "redirects are not followed; point the device at the final address",
        206 => "a range came back that was not asked for",
        _ => "the repository must be served by a plain static file server",
    };
    FetchError::Status { url: url.to_string(), status: status.as_u16(), hint }
}

/// The `Content-Length` of a reply, if it has one.
fn content_length(
    url: &Url,
    response: &http::Response<Incoming>,
) -> Result<Option<u64>, FetchError> {
    let Some(value) = response.headers().get(header::CONTENT_LENGTH) else { return Ok(None) };
    value.to_str().ok().and_then(|v| v.trim().parse().ok()).map(Some).ok_or_else(|| {
        FetchError::BadReply {
            url: url.to_string(),
            why: format!("Content-Length {value:?} is not a number"),
        }
    })
}

/// The reply's ETag, if it is a short, visible-ASCII one.
fn response_etag(response: &http::Response<Incoming>) -> Option<String> {
    let value = response.headers().get(header::ETAG)?.to_str().ok()?.trim();
    let usable = !value.is_empty()
        && value.len() <= MAX_ETAG
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    usable.then(|| value.to_owned())
}

/// Checks that a 206 reply holds bytes `have`..end of a file of
/// `expected_size` bytes.
fn check_content_range(
    url: &Url,
    response: &http::Response<Incoming>,
    have: u64,
    expected_size: u64,
) -> Result<(), FetchError> {
    let bad = |why: String| FetchError::BadReply { url: url.to_string(), why };
    let value = response
        .headers()
        .get(header::CONTENT_RANGE)
        .ok_or_else(|| bad("a 206 reply without Content-Range".to_owned()))?;
    let text = value.to_str().unwrap_or("");
    let parsed = text.trim().strip_prefix("bytes ").and_then(|rest| {
        let (range, total) = rest.split_once('/')?;
        let (first, last) = range.split_once('-')?;
        let total = if total == "*" { None } else { Some(total.parse::<u64>().ok()?) };
        Some((first.parse::<u64>().ok()?, last.parse::<u64>().ok()?, total))
    });
    let Some((first, last, total)) = parsed else {
        return Err(bad(format!("Content-Range {value:?} is not bytes FIRST-LAST/SIZE")));
    };
    if let Some(total) = total {
        if total != expected_size {
            return Err(FetchError::SizeMismatch {
                url: url.to_string(),
                expected: expected_size,
                actual: total,
            });
        }
    }
    if first != have || last < first || last >= expected_size {
        return Err(bad(format!("asked for bytes {have}- and got Content-Range {text:?}")));
    }
    Ok(())
}

fn etag_path(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_owned();
    name.push(".etag");
    PathBuf::from(name)
}

fn file_error(path: &Path, action: &'static str, source: io::Error) -> FetchError {
    FetchError::File { path: path.to_path_buf(), action, source }
}

async fn file_len(path: &Path) -> Result<u64, FetchError> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(file_error(path, "read the size of the partial download", source)),
    }
}

async fn remove(path: &Path) -> Result<(), FetchError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(file_error(path, "delete", source)),
    }
}

/// Empties the partial file and forgets its ETag.
async fn truncate(partial: &Path, etag_path: &Path) -> Result<(), FetchError> {
    remove(etag_path).await?;
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(partial)
        .await
        .map(drop)
        .map_err(|source| file_error(partial, "empty the partial download", source))
}

/// Opens `partial` for writing at `start`, cutting off whatever follows.
async fn open_at(partial: &Path, start: u64) -> Result<tokio::fs::File, FetchError> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(partial)
        .await
        .map_err(|source| file_error(partial, "open the partial download", source))?;
    file.set_len(start)
        .await
        .map_err(|source| file_error(partial, "cut the partial download", source))?;
    file.seek(io::SeekFrom::Start(start))
        .await
        .map_err(|source| file_error(partial, "seek in the partial download", source))?;
    Ok(file)
}

async fn read_etag(path: &Path) -> Result<Option<String>, FetchError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            let tag = String::from_utf8(bytes).ok().map(|s| s.trim().to_owned());
            Ok(tag.filter(|t| {
                !t.is_empty() && t.len() <= MAX_ETAG && t.bytes().all(|b| b.is_ascii_graphic())
            }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(file_error(path, "read", source)),
    }
}

async fn write_etag(path: &Path, etag: &str) -> Result<(), FetchError> {
    tokio::fs::write(path, format!("{etag}\n"))
        .await
        .map_err(|source| file_error(path, "write", source))
}

async fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|source| file_error(path, "open the download to check it", source))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; HASH_CHUNK];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|source| file_error(path, "read the download to check it", source))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// A hand-written HTTP/1.1 server: each connection's request head is
    /// recorded (lowercased) and passed, with its number, to the handler,
    /// which writes whatever reply the test needs. One request per
    /// connection; dropping the stream closes it.
    struct TestServer {
        addr: SocketAddr,
        heads: Arc<Mutex<Vec<String>>>,
    }

    impl TestServer {
        fn start(handler: impl Fn(usize, &str, &mut TcpStream) + Send + 'static) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let heads = Arc::new(Mutex::new(Vec::new()));
            let seen = heads.clone();
            std::thread::spawn(move || {
                for (i, stream) in listener.incoming().enumerate() {
                    let Ok(mut stream) = stream else { continue };
                    let head = read_head(&mut stream);
                    seen.lock().unwrap().push(head.clone());
                    handler(i, &head, &mut stream);
                }
            });
            TestServer { addr, heads }
        }

        fn url(&self, path: &str) -> Url {
            Url::parse(&format!("http://{}{path}", self.addr)).unwrap()
        }

        fn heads(&self) -> Vec<String> {
            self.heads.lock().unwrap().clone()
        }
    }

    fn read_head(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }

    /// N from a `range: bytes=N-` header.
    fn range_start(head: &str) -> Option<u64> {
        header(head, "range")?.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
    }

    /// Writes a reply head and `body`; `cut` stops after that many body
    /// bytes and closes the connection, as a dropped link does.
    fn reply(stream: &mut TcpStream, status: &str, headers: &[String], body: &[u8], cut: usize) {
        let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
        for h in headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&body[..cut.min(body.len())]);
        let _ = stream.write_all(&out);
        let _ = stream.flush();
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }

    /// Serves `data` honouring `Range: bytes=N-` with 206, with ETag
    /// `"v1"`; the first `drops` requests are cut after `cut` body bytes.
    fn ranged(data: Vec<u8>, drops: usize, cut: usize) -> TestServer {
        TestServer::start(move |i, head, stream| {
            let cut = if i < drops { cut } else { usize::MAX };
            let etag = "etag: \"v1\"".to_owned();
            match range_start(head) {
                Some(start) if (start as usize) < data.len() => {
                    let body = &data[start as usize..];
                    let headers = [
                        etag,
                        format!("content-length: {}", body.len()),
                        format!("content-range: bytes {start}-{}/{}", data.len() - 1, data.len()),
                    ];
                    reply(stream, "206 Partial Content", &headers, body, cut);
                }
                _ => {
                    let headers = [etag, format!("content-length: {}", data.len())];
                    reply(stream, "200 OK", &headers, &data, cut);
                }
            }
        })
    }

    fn data(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x9e37_79b9;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn sha256(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// Short deadlines and pauses, so failures show in milliseconds.
    fn quick(retries: u32) -> Policy {
        Policy {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_millis(500),
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            retries,
        }
    }

    #[tokio::test]
    async fn download_resumes_after_a_dropped_connection() {
        let contents = data(200_000);
        let server = ranged(contents.clone(), 1, 50_000);
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("os.basalt.partial");
        let mut last = 0;
        let stats = download(
            &server.url("/bundles/os.basalt"),
            &partial,
            contents.len() as u64,
            &sha256(&contents),
            3,
            &mut |n| last = n,
        )
        .await
        .unwrap();
        assert!(std::fs::read(&partial).unwrap() == contents);
        assert_eq!(last, 200_000);
        assert_eq!(stats, DownloadStats { bytes_fetched: 200_000, resumed_from: 0, requests: 2 });
        let heads = server.heads();
        assert_eq!(heads.len(), 2);
        assert_eq!(header(&heads[0], "range"), None);
        assert_eq!(header(&heads[1], "range"), Some("bytes=50000-"));
        assert_eq!(header(&heads[1], "if-range"), Some("\"v1\""));
        assert!(!etag_path(&partial).exists(), "the .etag file goes once the download is done");
    }

    #[tokio::test]
    async fn download_survives_several_drops() {
        let contents = data(300_000);
        let server = ranged(contents.clone(), 3, 40_000);
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        let url = server.url("/b");
        let stats =
            download_with(&url, &partial, 300_000, &sha256(&contents), &quick(5), &mut |_| {})
                .await
                .unwrap();
        assert!(std::fs::read(&partial).unwrap() == contents);
        assert_eq!(stats.requests, 4);
        assert_eq!(stats.bytes_fetched, 300_000);
        let ranges: Vec<_> = server.heads().iter().map(|h| range_start(h)).collect();
        assert_eq!(ranges, [None, Some(40_000), Some(80_000), Some(120_000)]);
    }

    #[tokio::test]
    async fn download_resumes_a_partial_file_from_an_earlier_run() {
        let contents = data(100_000);
        let server = ranged(contents.clone(), 0, 0);
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        std::fs::write(&partial, &contents[..30_000]).unwrap();
        std::fs::write(etag_path(&partial), "\"v1\"\n").unwrap();
        let stats = download_with(
            &server.url("/b"),
            &partial,
            100_000,
            &sha256(&contents),
            &quick(0),
            &mut |_| {},
        )
        .await
        .unwrap();
        assert_eq!(
            stats,
            DownloadStats { bytes_fetched: 70_000, resumed_from: 30_000, requests: 1 }
        );
        assert!(std::fs::read(&partial).unwrap() == contents);
        let heads = server.heads();
        assert_eq!(header(&heads[0], "range"), Some("bytes=30000-"));
        assert_eq!(header(&heads[0], "if-range"), Some("\"v1\""));
    }

    #[tokio::test]
    async fn a_complete_partial_file_needs_no_request() {
        let contents = data(1000);
        let server = ranged(contents.clone(), 0, 0);
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        std::fs::write(&partial, &contents).unwrap();
        let stats = download_with(
            &server.url("/b"),
            &partial,
            1000,
            &sha256(&contents),
            &quick(0),
            &mut |_| {},
        )
        .await
        .unwrap();
        assert_eq!(stats, DownloadStats { bytes_fetched: 0, resumed_from: 1000, requests: 0 });
    }

    #[tokio::test]
    async fn a_server_ignoring_range_restarts_from_zero() {
        let contents = data(200_000);
        let body = contents.clone();
        let server = TestServer::start(move |i, _head, stream| {
            let cut = if i == 0 { 50_000 } else { usize::MAX };
            let headers = [format!("content-length: {}", body.len())];
            reply(stream, "200 OK", &headers, &body, cut);
        });
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        let stats = download_with(
            &server.url("/b"),
            &partial,
            200_000,
            &sha256(&contents),
            &quick(3),
            &mut |_| {},
        )
        .await
        .unwrap();
        assert!(std::fs::read(&partial).unwrap() == contents);
        assert_eq!(stats.requests, 2);
        assert_eq!(stats.bytes_fetched, 250_000);
        assert_eq!(range_start(&server.heads()[1]), Some(50_000));
        assert_eq!(header(&server.heads()[1], "if-range"), None, "no ETag was ever given");
    }

    #[tokio::test]
    async fn a_changed_file_on_the_server_restarts_from_zero() {
        // The partial file came from an older file ("v0"); the server,
        // seeing If-Range no longer match, sends the whole new file.
        let contents = data(50_000);
        let body = contents.clone();
        let server = TestServer::start(move |_, head, stream| {
            assert_eq!(header(head, "if-range"), Some("\"v0\""));
            let headers = ["etag: \"v1\"".to_owned(), format!("content-length: {}", body.len())];
            reply(stream, "200 OK", &headers, &body, usize::MAX);
        });
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        std::fs::write(&partial, vec![0xAA; 20_000]).unwrap();
        std::fs::write(etag_path(&partial), "\"v0\"").unwrap();
        let stats = download_with(
            &server.url("/b"),
            &partial,
            50_000,
            &sha256(&contents),
            &quick(0),
            &mut |_| {},
        )
        .await
        .unwrap();
        assert_eq!(stats.bytes_fetched, 50_000);
        assert!(std::fs::read(&partial).unwrap() == contents);
    }

    #[tokio::test]
    async fn more_bytes_than_expected_are_refused() {
        let contents = data(10_000);
        // Announced by Content-Length.
        let server = ranged(contents.clone(), 0, 0);
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        let err = download_with(
            &server.url("/b"),
            &partial,
            9_000,
            &sha256(&contents),
            &quick(3),
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, FetchError::SizeMismatch { expected: 9_000, actual: 10_000, .. }),
            "{err}"
        );
        assert_eq!(server.heads().len(), 1, "not retried");

        // Close-delimited: counted while reading, nothing past the limit written.
        let body = contents.clone();
        let server = TestServer::start(move |_, _, stream| {
            reply(stream, "200 OK", &[], &body, usize::MAX);
        });
        let err = download_with(
            &server.url("/b"),
            &partial,
            9_000,
            &sha256(&contents),
            &quick(3),
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(err, FetchError::SizeMismatch { expected: 9_000, .. }), "{err}");
        assert!(std::fs::metadata(&partial).map_or(0, |m| m.len()) <= 9_000);
    }

    #[tokio::test]
    async fn a_wrong_sha256_is_refused_and_the_partial_file_removed() {
        let contents = data(10_000);
        let server = ranged(contents.clone(), 0, 0);
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        let wrong = sha256(b"something else");
        let err =
            download_with(&server.url("/b"), &partial, 10_000, &wrong, &quick(0), &mut |_| {})
                .await
                .unwrap_err();
        assert!(matches!(err, FetchError::Sha256Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("deleted"), "{err}");
        assert!(!partial.exists());
        assert!(!etag_path(&partial).exists());
    }

    #[tokio::test]
    async fn download_gives_up_after_its_retries() {
        let contents = data(10_000);
        let server = ranged(contents.clone(), usize::MAX, 100);
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        let err = download_with(
            &server.url("/b"),
            &partial,
            10_000,
            &sha256(&contents),
            &quick(2),
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert_eq!(server.heads().len(), 3, "one try and two retries");
        // What came is kept for the next call to resume.
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), 300);
    }

    #[tokio::test]
    async fn a_stalled_server_times_out() {
        let server = TestServer::start(|_, _, stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc");
            std::thread::sleep(Duration::from_secs(2));
        });
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        let err =
            download_with(&server.url("/b"), &partial, 100, &sha256(b""), &quick(0), &mut |_| {})
                .await
                .unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn not_found_and_refused_connections_say_what_to_check() {
        let server = TestServer::start(|_, _, stream| {
            reply(stream, "404 Not Found", &["content-length: 0".to_owned()], b"", 0);
        });
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("p");
        let err =
            download_with(&server.url("/b"), &partial, 1, &sha256(b""), &quick(3), &mut |_| {})
                .await
                .unwrap_err();
        assert!(matches!(err, FetchError::Status { status: 404, .. }), "{err}");
        assert!(!err.is_retryable());
        assert_eq!(server.heads().len(), 1);

        // A port nothing listens on.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let url = Url::parse(&format!("http://{closed}/channels/stable.toml")).unwrap();
        let err = get_small(&url, None, 100, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, FetchError::Connect { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("is the repository served at http://{closed}/,")), "{text}");
    }

    #[tokio::test]
    async fn a_bad_digest_is_refused_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let url = Url::parse("http://127.0.0.1:9/b").unwrap();
        let err =
            download(&url, &dir.path().join("p"), 1, "abc", 0, &mut |_| {}).await.unwrap_err();
        assert!(matches!(err, FetchError::BadDigest(_)), "{err}");
    }

    #[tokio::test]
    async fn get_small_uses_the_etag() {
        let server = TestServer::start(|_, head, stream| {
            if header(head, "if-none-match") == Some("\"c1\"") {
                reply(stream, "304 Not Modified", &["etag: \"c1\"".to_owned()], b"", 0);
            } else {
                let headers = ["etag: \"c1\"".to_owned(), "content-length: 5".to_owned()];
                reply(stream, "200 OK", &headers, b"hello", usize::MAX);
            }
        });
        let url = server.url("/channels/stable.toml");
        let first = get_small(&url, None, 100, Duration::from_secs(5)).await.unwrap();
        let Fetched::Body { bytes, etag } = first else { panic!("a body") };
        assert_eq!(bytes, b"hello");
        assert_eq!(etag.as_deref(), Some("\"c1\""));
        let again = get_small(&url, etag.as_deref(), 100, Duration::from_secs(5)).await.unwrap();
        assert_eq!(again, Fetched::NotModified);
        let heads = server.heads();
        assert!(heads[1].starts_with("get /channels/stable.toml http/1.1\r\n"), "{}", heads[1]);
        assert_eq!(header(&heads[1], "host"), Some(format!("{}", server.addr).as_str()));
    }

    #[tokio::test]
    async fn get_small_refuses_bodies_over_the_limit() {
        // By Content-Length, before reading.
        let server = TestServer::start(|_, _, stream| {
            reply(stream, "200 OK", &["content-length: 1000".to_owned()], &[b'x'; 1000], 1000);
        });
        let err =
            get_small(&server.url("/c"), None, 999, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, FetchError::TooLarge { limit: 999, .. }), "{err}");
        let ok = get_small(&server.url("/c"), None, 1000, Duration::from_secs(5)).await.unwrap();
        assert!(matches!(ok, Fetched::Body { bytes, .. } if bytes.len() == 1000));

        // Counted while reading a body without a length.
        let server = TestServer::start(|_, _, stream| {
            reply(stream, "200 OK", &[], &[b'x'; 100_000], usize::MAX);
        });
        let err =
            get_small(&server.url("/c"), None, 4096, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, FetchError::TooLarge { limit: 4096, .. }), "{err}");
    }

    #[tokio::test]
    async fn get_small_has_one_deadline() {
        // A server trickling a byte at a time never finishes in time.
        let server = TestServer::start(|_, _, stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n");
            for _ in 0..50 {
                if stream.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let err =
            get_small(&server.url("/c"), None, 100, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
    }

    #[test]
    fn urls_parse() {
        let url = Url::parse("http://10.0.2.2:8000/").unwrap();
        assert_eq!((url.host(), url.port(), url.path()), ("10.0.2.2", 8000, "/"));
        let url = Url::parse("http://updates.example.com").unwrap();
        assert_eq!((url.host(), url.port(), url.path()), ("updates.example.com", 80, "/"));
        assert_eq!(url.to_string(), "http://updates.example.com/");
        let url = Url::parse("HTTP://[::1]:81/a/b?x=1#frag").unwrap();
        assert_eq!((url.host(), url.port(), url.path()), ("::1", 81, "/a/b?x=1"));
        assert_eq!(url.to_string(), "http://[::1]:81/a/b?x=1");
        assert_eq!("http://h:1/x".parse::<Url>().unwrap().path(), "/x");
        for (bad, says) in [
            ("https://h/", "https is not supported yet"),
            ("ftp://h/", "only http://"),
            ("h/x", "no http://"),
            ("http:///x", "no host"),
            ("http://h:0/", "port"),
            ("http://h:99999/", "port"),
            ("http://h:+80/", "port"),
            ("http://u:p@h/", "user names"),
            ("http://h/a b", "percent-encode"),
            ("http://h_x/", "host may hold"),
            ("http://[zz]/", "IPv6"),
            ("http://hé/", "percent-encode"),
        ] {
            let err = Url::parse(bad).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn urls_join_inside_the_repository_only() {
        let base = Url::parse("http://10.0.2.2:8000/").unwrap();
        assert_eq!(
            base.join("channels/stable.toml").unwrap().to_string(),
            "http://10.0.2.2:8000/channels/stable.toml"
        );
        let channel = Url::parse("http://cdn/fleet/channels/stable.toml").unwrap();
        assert_eq!(
            channel.join("stable.toml.sig").unwrap().path(),
            "/fleet/channels/stable.toml.sig"
        );
        let repo = Url::parse("http://cdn/fleet/").unwrap();
        assert_eq!(
            repo.join("./bundles/os-1.2.0.basalt").unwrap().path(),
            "/fleet/bundles/os-1.2.0.basalt"
        );
        assert_eq!(Url::parse("http://cdn/fleet").unwrap().join("x").unwrap().path(), "/x");
        for bad in [
            "../x",
            "bundles/../../x",
            "%2e%2E/x",
            "a/%2e%2e",
            "/etc/passwd",
            "http://evil/x",
            "//evil/x",
            "javascript:x",
            "a%2f..%2fb",
            "a\\b",
            "",
        ] {
            assert!(repo.join(bad).is_err(), "{bad:?}");
        }
    }
}
