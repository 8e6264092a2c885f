//! The `*.basalt` bundle file: a POSIX ustar stream.
//!
//! ```text
//! manifest.toml   the manifest, as signed
//! manifest.sig    signatures over the exact bytes of manifest.toml
//! <payload>...    one entry per manifest payload, in manifest order, each
//!                 stored as its manifest entry says (one zstd frame, or as is)
//! two zero blocks the end of the archive
//! ```
//!
//! Any tar lists and extracts a bundle, which helps an operator look inside;
//! the device reads it with the strict reader here and never with a general
//! tar implementation. Headers are plain ustar: regular files only, mode
//! 0644, owner 0, the manifest's creation time as mtime, no prefix, no
//! extensions. The reader refuses everything else, because a bundle arrives
//! from the network and every extension (links, long names, PAX records) is
//! a way to write outside the payloads or to make two readers disagree on
//! what the file holds.
//!
//! [`BundleReader`] checks the signatures before it parses the manifest and
//! before it reads any payload byte, streams each payload through zstd and
//! sha256 without holding it in memory, and stops any payload that tries to
//! grow past the size its signed manifest declares. Memory stays bounded for
//! every input: the manifest and the signatures are capped before they are
//! read, the zstd window is capped, and payloads are never buffered whole.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};
use zstd::stream::raw::OutBuffer;
use zstd::stream::raw::{CParameter, DParameter, Decoder as RawDecoder, InBuffer, Operation};

use crate::manifest::{
    is_plain_name, Compression, Manifest, ManifestError, PayloadInfo, MAX_MANIFEST_BYTES,
};
use crate::signature::{SignatureFile, SignatureFileError, VerifyError, MAX_SIGNATURE_FILE_BYTES};

pub use crate::signature::Trust;

/// Name of the manifest entry, the first of a bundle.
pub const MANIFEST_ENTRY: &str = "manifest.toml";

/// Name of the signatures entry, the second of a bundle.
pub const SIGNATURE_ENTRY: &str = "manifest.sig";

/// Largest zstd window log a bundle's frames use (8 MiB). The reader
/// accepts one more, and no larger, so a hostile frame cannot make a device
/// allocate a huge window.
pub const MAX_WINDOW_LOG: u32 = 23;

/// Size of a tar block.
pub const BLOCK_SIZE: usize = 512;

/// Largest entry size an 11-digit octal ustar field holds (8 GiB - 1).
pub const MAX_ENTRY_SIZE: u64 = 0o777_7777_7777;

/// How many zero bytes the reader accepts after the two end-of-archive
/// blocks: GNU tar pads an archive to a record of 10240 bytes.
pub const MAX_TRAILING_ZEROS: u64 = 10240;

/// Bytes of compressed input the reader holds at a time.
const INPUT_BUFFER: usize = 64 * 1024;

/// Offsets of the ustar header fields.
mod field {
    use std::ops::Range;
    pub const NAME: Range<usize> = 0..100;
    pub const MODE: Range<usize> = 100..108;
    pub const UID: Range<usize> = 108..116;
    pub const GID: Range<usize> = 116..124;
    pub const SIZE: Range<usize> = 124..136;
    pub const MTIME: Range<usize> = 136..148;
    pub const CHECKSUM: Range<usize> = 148..156;
    pub const TYPEFLAG: usize = 156;
    pub const LINKNAME: Range<usize> = 157..257;
    pub const MAGIC: Range<usize> = 257..263;
    pub const VERSION: Range<usize> = 263..265;
    pub const DEVMAJOR: Range<usize> = 329..337;
    pub const DEVMINOR: Range<usize> = 337..345;
    pub const PREFIX: Range<usize> = 345..500;
}

/// Why a bundle could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading the input failed.
    #[error("could not read the bundle: {0}; check the file or the connection and try again")]
    Read(#[source] io::Error),
    /// Writing the output failed.
    #[error("could not write the bundle: {0}; check the space and permissions of the output")]
    Write(#[source] io::Error),
    /// The input ended early.
    #[error(
        "the bundle ends inside {what} (at byte {offset}); the file is incomplete: download it \
         again"
    )]
    Truncated {
        /// What was being read.
        what: String,
        /// Where the input ended.
        offset: u64,
    },
    /// An entry is missing: the input ended, or the archive ended, where
    /// the entry belongs.
    #[error(
        "the bundle ends at byte {offset} where {expected:?} belongs; the file is incomplete or \
         damaged: download it again"
    )]
    MissingEntry {
        /// Offset of the header block.
        offset: u64,
        /// The entry expected there.
        expected: String,
    },
    /// A header's checksum does not match.
    #[error(
        "the tar header at byte {offset} has a bad checksum; the bundle is damaged or was \
         modified: download it again"
    )]
    HeaderChecksum {
        /// Offset of the header block.
        offset: u64,
    },
    /// A header is not POSIX ustar.
    #[error(
        "the tar header at byte {offset} is not a POSIX ustar header; this is not a basalt \
         bundle, or it is damaged: download it again"
    )]
    NotUstar {
        /// Offset of the header block.
        offset: u64,
    },
    /// An entry is not a regular file.
    #[error(
        "the tar entry at byte {offset} has type {typeflag:?}; a bundle holds only regular files \
         (no links, directories, long names or extended headers): rebuild it with `basalt bundle`"
    )]
    EntryType {
        /// Offset of the header block.
        offset: u64,
        /// The type flag.
        typeflag: char,
    },
    /// A header field is malformed or uses an extension.
    #[error(
        "the tar header at byte {offset} has an invalid or unsupported {field} field; the bundle \
         is damaged or was not made by basalt: rebuild it with `basalt bundle`"
    )]
    HeaderField {
        /// Offset of the header block.
        offset: u64,
        /// The field.
        field: &'static str,
    },
    /// An entry name is not a plain file name.
    #[error(
        "the tar entry at byte {offset} is named {name:?}, not a plain file name; a bundle holds \
         no paths: rebuild it with `basalt bundle`"
    )]
    EntryName {
        /// Offset of the header block.
        offset: u64,
        /// The name, cut and made printable.
        name: String,
    },
    /// An entry is not the one expected next.
    #[error(
        "the bundle has {found:?} at byte {offset} where {expected:?} belongs; entries follow \
         the manifest's order: rebuild it with `basalt bundle`"
    )]
    UnexpectedEntry {
        /// Offset of the header block.
        offset: u64,
        /// The entry expected.
        expected: String,
        /// The entry found.
        found: String,
    },
    /// `manifest.toml` or `manifest.sig` is larger than allowed.
    #[error(
        "{name} in the bundle is {size} bytes, more than the {max} allowed; the bundle is damaged \
         or hostile: rebuild it with `basalt bundle`"
    )]
    EntryTooLarge {
        /// The entry.
        name: String,
        /// The size its header claims.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The bytes between an entry's end and the next block are not zero.
    #[error(
        "the padding after {name:?} (at byte {offset}) is not zero; the bundle is damaged or was \
         modified: download it again"
    )]
    Padding {
        /// The entry.
        name: String,
        /// Offset of the padding.
        offset: u64,
    },
    /// The end-of-archive blocks are not zero.
    #[error(
        "the bundle holds data at byte {offset} where its end-of-archive blocks belong; the file \
         is damaged or was modified: download it again"
    )]
    EndOfArchive {
        /// Offset of the end-of-archive blocks.
        offset: u64,
    },
    /// Something follows the end of the archive.
    #[error(
        "the bundle has data after its end, at byte {offset}; the file is damaged or something \
         was appended: download it again"
    )]
    TrailingData {
        /// Offset of the data.
        offset: u64,
    },
    /// `manifest.sig` is malformed.
    #[error("{0}")]
    Signatures(#[source] SignatureFileError),
    /// The signatures do not reach the trust threshold.
    #[error("the bundle's manifest is not signed by enough trusted keys: {0}")]
    Verify(#[source] VerifyError),
    /// The manifest is malformed.
    #[error("{0}")]
    Manifest(#[source] ManifestError),
    /// A payload's content does not have its declared sha256.
    #[error(
        "the bundle's payload {payload:?} does not match its manifest: sha256 {expected} \
         expected, {found} found; the file is damaged or was modified: download it again"
    )]
    PayloadHash {
        /// The payload.
        payload: String,
        /// The sha256 of the manifest.
        expected: String,
        /// The sha256 of the content.
        found: String,
    },
    /// A payload's content is shorter than declared, or a stored payload's
    /// entry has another size.
    #[error(
        "the bundle's payload {payload:?} holds {found} bytes, its manifest declares {expected}; \
         the file is damaged or was modified: download it again"
    )]
    PayloadSize {
        /// The payload.
        payload: String,
        /// The size of the manifest.
        expected: u64,
        /// The size found.
        found: u64,
    },
    /// A payload decompresses to more than its declared size.
    #[error(
        "the bundle's payload {payload:?} decompresses to more than the {declared} bytes its \
         manifest declares; reading stopped there: the bundle is damaged or hostile, do not \
         install it"
    )]
    PayloadTooLarge {
        /// The payload.
        payload: String,
        /// The size of the manifest.
        declared: u64,
    },
    /// A compressed payload's entry is larger than zstd makes of its
    /// declared size.
    #[error(
        "the bundle's payload {payload:?} is {size} bytes compressed, more than zstd makes of \
         {declared} bytes (at most {max}); the bundle is damaged or hostile: do not install it"
    )]
    CompressedTooLarge {
        /// The payload.
        payload: String,
        /// The size of its entry.
        size: u64,
        /// The size of the manifest.
        declared: u64,
        /// The largest accepted entry.
        max: u64,
    },
    /// A payload is not valid zstd (including a bad zstd checksum, or a
    /// window larger than [`MAX_WINDOW_LOG`] + 1 allows).
    #[error(
        "the bundle's payload {payload:?} is not valid zstd ({message}); the file is damaged or \
         was modified: download it again"
    )]
    Decompress {
        /// The payload.
        payload: String,
        /// What zstd said.
        message: String,
    },
    /// A payload's entry ends before its zstd frame does.
    #[error(
        "the bundle's payload {payload:?} ends inside its zstd frame; the file is damaged or \
         incomplete: download it again"
    )]
    TruncatedFrame {
        /// The payload.
        payload: String,
    },
    /// A payload's entry holds data after its zstd frame.
    #[error(
        "the bundle's payload {payload:?} has data after its zstd frame; the file is damaged or \
         was modified: download it again"
    )]
    TrailingFrameData {
        /// The payload.
        payload: String,
    },
    /// The next payload was asked for before the current one was read to
    /// its end.
    #[error(
        "payload {payload:?} was not read to its end before the next one was asked for; read \
         each payload until read returns 0"
    )]
    PayloadNotFinished {
        /// The unfinished payload.
        payload: String,
    },
    /// [`BundleReader::finish`] was called before every payload was read.
    #[error(
        "{remaining} payload(s) of the bundle were not read; read every payload to its end \
         before finishing"
    )]
    PayloadsLeft {
        /// How many were not read.
        remaining: usize,
    },
    /// An earlier error left the reader in the middle of the stream.
    #[error("an earlier error stopped reading this bundle; open it again from the start")]
    Failed,
    /// A bundle to write is not acceptable (a name, a size).
    #[error("cannot write the bundle: {0}")]
    Invalid(String),
}

impl BundleError {
    /// The [`BundleError`] inside an `io::Error` that [`Payload`]'s `read`
    /// returned, if it holds one (it does not for errors of the input
    /// itself, which are passed on as they are).
    pub fn from_io(err: &io::Error) -> Option<&BundleError> {
        err.get_ref()?.downcast_ref::<BundleError>()
    }

    /// This error as an `io::Error`: an input error as it was, anything
    /// else as `InvalidData` wrapping this error (see
    /// [`BundleError::from_io`]).
    pub fn into_io(self) -> io::Error {
        match self {
            BundleError::Read(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Compresses a payload for a bundle: one zstd frame at `level`, with the
/// content size and checksum in it, a window of at most [`MAX_WINDOW_LOG`].
pub fn compress(content: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    compressor.set_parameter(CParameter::ChecksumFlag(true))?;
    compressor.set_parameter(CParameter::ContentSizeFlag(true))?;
    compressor.set_parameter(CParameter::WindowLog(MAX_WINDOW_LOG))?;
    compressor.compress(content)
}

/// The ustar header of a regular file `name` of `size` bytes, as a bundle
/// stores it: mode 0644, owner 0:0, no user or group names, `mtime` in Unix
/// seconds.
pub fn ustar_header(name: &str, size: u64, mtime: u64) -> io::Result<[u8; BLOCK_SIZE]> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if !is_plain_name(name) {
        return Err(invalid(format!("{name:?} is not a plain file name")));
    }
    if size > MAX_ENTRY_SIZE {
        return Err(invalid(format!(
            "{name:?} is {size} bytes, a bundle entry holds at most 8 GiB"
        )));
    }
    if mtime > MAX_ENTRY_SIZE {
        return Err(invalid(format!("mtime {mtime} does not fit a ustar header")));
    }
    let mut h = [0u8; BLOCK_SIZE];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[field::MODE], 0o644);
    put_octal(&mut h[field::UID], 0);
    put_octal(&mut h[field::GID], 0);
    put_octal(&mut h[field::SIZE], size);
    put_octal(&mut h[field::MTIME], mtime);
    h[field::TYPEFLAG] = b'0';
    h[field::MAGIC].copy_from_slice(b"ustar\0");
    h[field::VERSION].copy_from_slice(b"00");
    put_octal(&mut h[field::DEVMAJOR], 0);
    put_octal(&mut h[field::DEVMINOR], 0);
    let sum = header_checksum(&h);
    h[field::CHECKSUM].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// Writes `value` as zero-padded octal digits and a NUL, filling `out`.
fn put_octal(out: &mut [u8], value: u64) {
    let digits = out.len() - 1;
    let text = format!("{value:0digits$o}");
    out[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    out[digits] = 0;
}

/// The ustar checksum: the sum of the header's bytes, with the checksum
/// field counted as spaces.
fn header_checksum(h: &[u8; BLOCK_SIZE]) -> u32 {
    h.iter()
        .enumerate()
        .map(|(i, &b)| if field::CHECKSUM.contains(&i) { u32::from(b' ') } else { u32::from(b) })
        .sum()
}

fn padding_len(size: u64) -> usize {
    ((BLOCK_SIZE as u64 - size % BLOCK_SIZE as u64) % BLOCK_SIZE as u64) as usize
}

fn write_entry<W: Write>(out: &mut W, name: &str, data: &[u8], mtime: u64) -> io::Result<()> {
    out.write_all(&ustar_header(name, data.len() as u64, mtime)?)?;
    out.write_all(data)?;
    out.write_all(&[0u8; BLOCK_SIZE][..padding_len(data.len() as u64)])
}

/// Writes a bundle: `manifest` and `signatures` (the bytes of
/// `manifest.toml` and `manifest.sig`), then `payloads` as (name, stored
/// bytes) in manifest order, each already compressed as its manifest entry
/// says, then the end of the archive. Every entry gets `mtime` (the
/// manifest's creation time, so that one manifest always makes the same
/// bytes).
pub fn write_bundle<W: Write>(
    mut out: W,
    manifest: &[u8],
    signatures: &[u8],
    payloads: &[(&str, &[u8])],
    mtime: u64,
) -> io::Result<W> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if manifest.len() > MAX_MANIFEST_BYTES {
        return Err(invalid(format!(
            "manifest.toml is {} bytes, a device reads at most {MAX_MANIFEST_BYTES}",
            manifest.len()
        )));
    }
    if signatures.len() > MAX_SIGNATURE_FILE_BYTES {
        return Err(invalid(format!(
            "manifest.sig is {} bytes, a device reads at most {MAX_SIGNATURE_FILE_BYTES}",
            signatures.len()
        )));
    }
    write_entry(&mut out, MANIFEST_ENTRY, manifest, mtime)?;
    write_entry(&mut out, SIGNATURE_ENTRY, signatures, mtime)?;
    for (name, data) in payloads {
        write_entry(&mut out, name, data, mtime)?;
    }
    out.write_all(&[0u8; 2 * BLOCK_SIZE])?;
    Ok(out)
}

/// Why [`replace_signatures`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError<E> {
    /// The bundle could not be read or written.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The signing function failed.
    #[error("{0}")]
    Sign(E),
}

/// Copies a bundle from `input` to `output` with a new `manifest.sig`:
/// `f` gets the manifest bytes and the current signatures and returns the
/// new ones. Every other byte is copied as it is, streaming, so a bundle of
/// any size is re-signed in constant memory. Nothing is verified: this is
/// for the host (`basalt sign`), and the device verifies the result.
/// Returns the output.
pub fn replace_signatures<R, W, E, F>(input: R, mut output: W, f: F) -> Result<W, ReplaceError<E>>
where
    R: Read,
    W: Write,
    F: FnOnce(&[u8], SignatureFile) -> Result<SignatureFile, E>,
{
    let mut input = Input::new(input);
    let (manifest_header, _, manifest) =
        read_small_entry(&mut input, MANIFEST_ENTRY, MAX_MANIFEST_BYTES)?;
    let (_, sig_header, sig) =
        read_small_entry(&mut input, SIGNATURE_ENTRY, MAX_SIGNATURE_FILE_BYTES)?;
    let current = SignatureFile::parse(&sig).map_err(BundleError::Signatures)?;
    let new = f(&manifest, current).map_err(ReplaceError::Sign)?;
    let text = new.to_toml().map_err(BundleError::Signatures)?;
    if text.len() > MAX_SIGNATURE_FILE_BYTES {
        return Err(BundleError::EntryTooLarge {
            name: SIGNATURE_ENTRY.to_owned(),
            size: text.len() as u64,
            max: MAX_SIGNATURE_FILE_BYTES as u64,
        }
        .into());
    }
    let write = |out: &mut W| -> io::Result<()> {
        out.write_all(&manifest_header)?;
        out.write_all(&manifest)?;
        out.write_all(&[0u8; BLOCK_SIZE][..padding_len(manifest.len() as u64)])?;
        write_entry(out, SIGNATURE_ENTRY, text.as_bytes(), sig_header.mtime)
    };
    write(&mut output).map_err(BundleError::Write)?;
    let mut buf = vec![0u8; INPUT_BUFFER];
    loop {
        let n = input.some(&mut buf)?;
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n]).map_err(BundleError::Write)?;
    }
    output.flush().map_err(BundleError::Write)?;
    Ok(output)
}

/// The input with the offset read so far, for messages.
struct Input<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> Input<R> {
    fn new(inner: R) -> Self {
        Input { inner, offset: 0 }
    }

    /// One read, at most `buf.len()` bytes; 0 at the end of the input.
    fn some(&mut self, buf: &mut [u8]) -> Result<usize, BundleError> {
        loop {
            match self.inner.read(buf) {
                // A broken reader claiming more than it was given must not
                // make us slice out of bounds.
                Ok(n) => {
                    let n = n.min(buf.len());
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BundleError::Read(e)),
            }
        }
    }

    /// Reads until `buf` is full or the input ends; returns the count.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, BundleError> {
        let mut n = 0;
        while n < buf.len() {
            let k = self.some(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        Ok(n)
    }

    /// Fills `buf`, or fails with [`BundleError::Truncated`].
    fn exact(&mut self, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<(), BundleError> {
        if self.fill(buf)? < buf.len() {
            return Err(BundleError::Truncated { what: what(), offset: self.offset });
        }
        Ok(())
    }
}

/// The fields of a header that the reader uses.
struct EntryHeader {
    name: String,
    size: u64,
    mtime: u64,
}

/// Parses an octal ustar field: optional leading spaces, at least one
/// digit, then only NULs and spaces. GNU's base-256 form (high bit set)
/// is refused: no bundle entry needs it.
fn parse_octal(f: &[u8]) -> Option<u64> {
    let start = f.iter().position(|&b| b != b' ')?;
    let digits = f[start..].iter().take_while(|b| (b'0'..=b'7').contains(b)).count();
    if digits == 0 || !f[start + digits..].iter().all(|&b| b == 0 || b == b' ') {
        return None;
    }
    f[start..start + digits]
        .iter()
        .try_fold(0u64, |acc, &b| acc.checked_mul(8)?.checked_add(u64::from(b - b'0')))
}

/// The printable form of a raw name for messages.
fn printable(raw: &[u8]) -> String {
    crate::manifest::shorten(&String::from_utf8_lossy(raw))
}

fn parse_header(h: &[u8; BLOCK_SIZE], offset: u64) -> Result<EntryHeader, BundleError> {
    // The checksum first: a damaged header is "damaged", whatever else it
    // looks like. Only the form basalt and GNU tar write (six digits, NUL,
    // space) is accepted, so that the field has one spelling per value.
    let c = &h[field::CHECKSUM];
    let stored_ok = c[..6].iter().all(|b| (b'0'..=b'7').contains(b)) && c[6] == 0 && c[7] == b' ';
    if !stored_ok || parse_octal(&c[..6]) != Some(u64::from(header_checksum(h))) {
        return Err(BundleError::HeaderChecksum { offset });
    }
    if h[field::MAGIC] != *b"ustar\0" || h[field::VERSION] != *b"00" {
        return Err(BundleError::NotUstar { offset });
    }
    match h[field::TYPEFLAG] {
        b'0' | 0 => {}
        t => return Err(BundleError::EntryType { offset, typeflag: char::from(t) }),
    }
    if h[field::LINKNAME].iter().any(|&b| b != 0) {
        return Err(BundleError::HeaderField { offset, field: "linkname" });
    }
    if h[field::PREFIX].iter().any(|&b| b != 0) {
        return Err(BundleError::HeaderField { offset, field: "prefix" });
    }
    let raw = &h[field::NAME];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let name = match std::str::from_utf8(&raw[..end]) {
        Ok(name) if is_plain_name(name) && raw[end..].iter().all(|&b| b == 0) => name.to_owned(),
        _ => {
            let shown = raw.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            return Err(BundleError::EntryName { offset, name: printable(&raw[..shown]) });
        }
    };
    let number = |range: std::ops::Range<usize>, field: &'static str| {
        parse_octal(&h[range]).ok_or(BundleError::HeaderField { offset, field })
    };
    number(field::MODE, "mode")?;
    number(field::UID, "uid")?;
    number(field::GID, "gid")?;
    let size = number(field::SIZE, "size")?;
    let mtime = number(field::MTIME, "mtime")?;
    if size > MAX_ENTRY_SIZE {
        return Err(BundleError::HeaderField { offset, field: "size" });
    }
    Ok(EntryHeader { name, size, mtime })
}

/// Reads the next header, which must be a regular file named `expected`.
fn read_header<R: Read>(
    input: &mut Input<R>,
    expected: &str,
) -> Result<([u8; BLOCK_SIZE], EntryHeader), BundleError> {
    let offset = input.offset;
    let mut block = [0u8; BLOCK_SIZE];
    let n = input.fill(&mut block)?;
    if n == 0 || (n == BLOCK_SIZE && block.iter().all(|&b| b == 0)) {
        return Err(BundleError::MissingEntry { offset, expected: expected.to_owned() });
    }
    if n < BLOCK_SIZE {
        return Err(BundleError::Truncated {
            what: format!("the tar header of {expected:?}"),
            offset: input.offset,
        });
    }
    let header = parse_header(&block, offset)?;
    if header.name != expected {
        return Err(BundleError::UnexpectedEntry {
            offset,
            expected: expected.to_owned(),
            found: header.name,
        });
    }
    Ok((block, header))
}

/// Reads and checks the zero padding after an entry of `size` bytes.
fn read_padding<R: Read>(input: &mut Input<R>, size: u64, name: &str) -> Result<(), BundleError> {
    let pad = padding_len(size);
    let mut buf = [0u8; BLOCK_SIZE];
    input.exact(&mut buf[..pad], || format!("the padding after {name:?}"))?;
    if buf[..pad].iter().any(|&b| b != 0) {
        return Err(BundleError::Padding {
            name: name.to_owned(),
            offset: input.offset - pad as u64,
        });
    }
    Ok(())
}

/// Reads a whole entry of at most `max` bytes: its raw header, parsed
/// header and data. The size is checked before anything is allocated.
fn read_small_entry<R: Read>(
    input: &mut Input<R>,
    name: &str,
    max: usize,
) -> Result<([u8; BLOCK_SIZE], EntryHeader, Vec<u8>), BundleError> {
    let (raw, header) = read_header(input, name)?;
    if header.size > max as u64 {
        return Err(BundleError::EntryTooLarge {
            name: name.to_owned(),
            size: header.size,
            max: max as u64,
        });
    }
    // At most `max` (64 KiB) by the check above.
    let mut data = vec![0u8; header.size as usize];
    input.exact(&mut data, || format!("{name:?}"))?;
    read_padding(input, header.size, name)?;
    Ok((raw, header, data))
}

/// Reads the manifest and signature entries, unverified.
fn read_head<R: Read>(input: &mut Input<R>) -> Result<(Vec<u8>, SignatureFile), BundleError> {
    let (_, _, manifest) = read_small_entry(input, MANIFEST_ENTRY, MAX_MANIFEST_BYTES)?;
    let (_, _, sig) = read_small_entry(input, SIGNATURE_ENTRY, MAX_SIGNATURE_FILE_BYTES)?;
    let signatures = SignatureFile::parse(&sig).map_err(BundleError::Signatures)?;
    Ok((manifest, signatures))
}

/// An unverified look at a bundle's head, for `basalt inspect` and
/// `basalt sign`: the manifest bytes, the parsed manifest and the
/// signatures. Reads nothing past `manifest.sig`. Nothing returned here is
/// trusted; a device uses [`BundleReader::open`].
pub fn peek<R: Read>(input: R) -> Result<(Vec<u8>, Manifest, SignatureFile), BundleError> {
    let mut input = Input::new(input);
    let (bytes, signatures) = read_head(&mut input)?;
    let manifest = Manifest::parse(&bytes).map_err(BundleError::Manifest)?;
    Ok((bytes, manifest, signatures))
}

/// Where a [`BundleReader`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between entries: the next thing in the input is a header or the end.
    Ready,
    /// Inside the payload of this index.
    Reading(usize),
    /// An error left the input at an unknown place.
    Failed,
}

/// Reads a bundle on the device: verifies, then streams the payloads.
///
/// The input is hostile until proven otherwise. [`BundleReader::open`]
/// reads the manifest and its signatures and checks them against the
/// trusted keys before anything else; each [`Payload`] then checks its
/// content against the signed manifest as it streams; [`BundleReader::finish`]
/// checks the end of the archive. Content is trustworthy only once its
/// payload's `read` returned `Ok(0)`.
pub struct BundleReader<R: Read> {
    input: Input<R>,
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signed_by: Vec<String>,
    next: usize,
    state: State,
}

impl<R: Read> std::fmt::Debug for BundleReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleReader")
            .field("manifest", &self.manifest)
            .field("signed_by", &self.signed_by)
            .field("offset", &self.input.offset)
            .finish()
    }
}

impl<R: Read> BundleReader<R> {
    /// Reads `manifest.toml` (its size capped before anything is
    /// allocated) and `manifest.sig`, verifies the signatures against
    /// `trust`, and only then parses the manifest. No payload byte is read.
    pub fn open(input: R, trust: &Trust) -> Result<Self, BundleError> {
        let mut input = Input::new(input);
        let (manifest_bytes, signatures) = read_head(&mut input)?;
        let signed_by = trust.verify(&manifest_bytes, &signatures).map_err(BundleError::Verify)?;
        let manifest = Manifest::parse(&manifest_bytes).map_err(BundleError::Manifest)?;
        Ok(BundleReader {
            input,
            manifest,
            manifest_bytes,
            signed_by,
            next: 0,
            state: State::Ready,
        })
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The exact bytes of `manifest.toml` that the signatures cover.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The ids of the trusted keys whose signatures verified, in file
    /// order.
    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }

    /// The next payload in manifest order, `None` after the last one. The
    /// previous payload must have been read to its end (its `read`
    /// returned `Ok(0)`).
    pub fn next_payload(&mut self) -> Result<Option<Payload<'_, R>>, BundleError> {
        match self.state {
            State::Ready => {}
            State::Failed => return Err(BundleError::Failed),
            State::Reading(index) => {
                self.state = State::Failed;
                return Err(BundleError::PayloadNotFinished {
                    payload: self.manifest.payloads[index].name.clone(),
                });
            }
        }
        let index = self.next;
        if index >= self.manifest.payloads.len() {
            return Ok(None);
        }
        match self.start_payload(index) {
            Ok((entry_size, zstd)) => {
                self.state = State::Reading(index);
                self.next = index + 1;
                Ok(Some(Payload {
                    reader: self,
                    index,
                    entry_size,
                    entry_left: entry_size,
                    produced: 0,
                    hasher: Sha256::new(),
                    zstd,
                    done: false,
                }))
            }
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// Reads the header of payload `index` and sets up its decoder.
    fn start_payload(&mut self, index: usize) -> Result<(u64, Option<Zstd>), BundleError> {
        let info = &self.manifest.payloads[index];
        let (_, header) = read_header(&mut self.input, &info.name)?;
        match info.compression {
            Compression::None => {
                if header.size != info.size {
                    return Err(BundleError::PayloadSize {
                        payload: info.name.clone(),
                        expected: info.size,
                        found: header.size,
                    });
                }
                Ok((header.size, None))
            }
            Compression::Zstd => {
                // zstd expands incompressible data by a few bytes per
                // 128 KiB block plus a frame header; anything larger is
                // padding an attacker wants us to read.
                let max = info.size.saturating_add(info.size / 128).saturating_add(1024);
                if header.size > max {
                    return Err(BundleError::CompressedTooLarge {
                        payload: info.name.clone(),
                        size: header.size,
                        declared: info.size,
                        max,
                    });
                }
                let zstd_error = |e: io::Error| BundleError::Decompress {
                    payload: info.name.clone(),
                    message: e.to_string(),
                };
                let mut decoder = RawDecoder::new().map_err(zstd_error)?;
                decoder
                    .set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG + 1))
                    .map_err(zstd_error)?;
                let buffer_len = header.size.clamp(1, INPUT_BUFFER as u64) as usize;
                let zstd = Zstd {
                    decoder,
                    buffer: vec![0u8; buffer_len],
                    pos: 0,
                    len: 0,
                    frame_done: false,
                };
                Ok((header.size, Some(zstd)))
            }
        }
    }

    /// After the last payload: checks the end-of-archive blocks and that
    /// nothing but zero blocks (at most [`MAX_TRAILING_ZEROS`] bytes of
    /// them) follows, then returns the input.
    pub fn finish(mut self) -> Result<R, BundleError> {
        match self.state {
            State::Ready => {}
            State::Failed => return Err(BundleError::Failed),
            State::Reading(index) => {
                return Err(BundleError::PayloadNotFinished {
                    payload: self.manifest.payloads[index].name.clone(),
                })
            }
        }
        let remaining = self.manifest.payloads.len() - self.next;
        if remaining > 0 {
            return Err(BundleError::PayloadsLeft { remaining });
        }
        let input = &mut self.input;
        let offset = input.offset;
        let mut end = [0u8; 2 * BLOCK_SIZE];
        input.exact(&mut end, || "the end-of-archive blocks".to_owned())?;
        if end.iter().any(|&b| b != 0) {
            return Err(BundleError::EndOfArchive { offset });
        }
        let mut extra = 0u64;
        let mut block = [0u8; BLOCK_SIZE];
        loop {
            let offset = input.offset;
            let n = input.fill(&mut block)?;
            if n == 0 {
                break;
            }
            extra += n as u64;
            if n < BLOCK_SIZE || block.iter().any(|&b| b != 0) || extra > MAX_TRAILING_ZEROS {
                return Err(BundleError::TrailingData { offset });
            }
        }
        Ok(self.input.inner)
    }
}

/// The zstd side of a payload being read.
struct Zstd {
    decoder: RawDecoder<'static>,
    buffer: Vec<u8>,
    pos: usize,
    len: usize,
    /// The decoder reported the end of the frame.
    frame_done: bool,
}

/// One payload being read: `Read` yields its content, decompressed.
///
/// It never yields more than the manifest's size: when the stored data
/// would decompress to even one byte more, `read` fails. At the end of the
/// content it checks the size, the sha256, that the zstd frame is complete
/// and that nothing follows it in the entry; only then does `read` return
/// `Ok(0)`. Until then the content must be treated as untrusted (written
/// to an inactive slot, never used).
///
/// Errors are `io::Error`s: those of the input as they are, every other
/// one `InvalidData` around a [`BundleError`] (see
/// [`BundleError::from_io`]). After an error the [`BundleReader`] refuses
/// to go on.
pub struct Payload<'a, R: Read> {
    reader: &'a mut BundleReader<R>,
    index: usize,
    entry_size: u64,
    entry_left: u64,
    produced: u64,
    hasher: Sha256,
    zstd: Option<Zstd>,
    done: bool,
}

impl<R: Read> std::fmt::Debug for Payload<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payload")
            .field("info", self.info())
            .field("produced", &self.produced)
            .field("done", &self.done)
            .finish()
    }
}

impl<R: Read> Payload<'_, R> {
    /// The payload's manifest entry.
    pub fn info(&self) -> &PayloadInfo {
        &self.reader.manifest.payloads[self.index]
    }

    fn name(&self) -> String {
        self.info().name.clone()
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> Result<usize, BundleError> {
        let declared = self.info().size;
        let remaining = declared - self.produced;
        if remaining == 0 {
            self.finish_content()?;
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let out = &mut buf[..want];
        let n = if self.zstd.is_some() { self.read_zstd(out)? } else { self.read_stored(out)? };
        self.hasher.update(&out[..n]);
        self.produced += n as u64;
        Ok(n)
    }

    /// Copies stored (uncompressed) content; the entry's size equals the
    /// declared size, checked at the header.
    fn read_stored(&mut self, out: &mut [u8]) -> Result<usize, BundleError> {
        let n = self.reader.input.some(out)?;
        if n == 0 {
            return Err(BundleError::Truncated {
                what: format!("payload {:?}", self.name()),
                offset: self.reader.input.offset,
            });
        }
        self.entry_left -= n as u64;
        Ok(n)
    }

    /// Refills the compressed input buffer when it is empty and the entry
    /// has more; returns whether input is available.
    fn refill(&mut self) -> Result<bool, BundleError> {
        let Some(z) = self.zstd.as_mut() else { return Ok(false) };
        if z.pos < z.len {
            return Ok(true);
        }
        if self.entry_left == 0 {
            return Ok(false);
        }
        let want = z.buffer.len().min(usize::try_from(self.entry_left).unwrap_or(usize::MAX));
        let n = self.reader.input.some(&mut z.buffer[..want])?;
        if n == 0 {
            return Err(BundleError::Truncated {
                what: format!("payload {:?}", self.info().name),
                offset: self.reader.input.offset,
            });
        }
        z.pos = 0;
        z.len = n;
        self.entry_left -= n as u64;
        Ok(true)
    }

    /// One step of the decoder into `out`: (bytes produced, input
    /// consumed, frame finished).
    fn decode(&mut self, out: &mut [u8]) -> Result<(usize, usize, bool), BundleError> {
        let payload = self.name();
        let Some(z) = self.zstd.as_mut() else { return Ok((0, 0, true)) };
        let mut input = InBuffer::around(&z.buffer[z.pos..z.len]);
        let mut output = OutBuffer::around(out);
        let hint = z
            .decoder
            .run(&mut input, &mut output)
            .map_err(|e| BundleError::Decompress { payload, message: e.to_string() })?;
        z.pos += input.pos();
        if hint == 0 {
            z.frame_done = true;
        }
        Ok((output.pos(), input.pos(), hint == 0))
    }

    fn frame_done(&self) -> bool {
        self.zstd.as_ref().is_none_or(|z| z.frame_done)
    }

    fn read_zstd(&mut self, out: &mut [u8]) -> Result<usize, BundleError> {
        loop {
            if self.frame_done() {
                // The frame ended before the declared size.
                return Err(BundleError::PayloadSize {
                    payload: self.name(),
                    expected: self.info().size,
                    found: self.produced,
                });
            }
            let available = self.refill()?;
            let (produced, consumed, _) = self.decode(out)?;
            if produced > 0 {
                return Ok(produced);
            }
            if consumed == 0 && !available && !self.frame_done() {
                return Err(BundleError::TruncatedFrame { payload: self.name() });
            }
        }
    }

    /// At the declared size: the frame must end here, with nothing after
    /// it, and the content must have the declared sha256.
    fn finish_content(&mut self) -> Result<(), BundleError> {
        if self.done {
            return Ok(());
        }
        if self.zstd.is_some() {
            let mut one = [0u8; 1];
            while !self.frame_done() {
                let available = self.refill()?;
                let (produced, consumed, _) = self.decode(&mut one)?;
                if produced > 0 {
                    return Err(BundleError::PayloadTooLarge {
                        payload: self.name(),
                        declared: self.info().size,
                    });
                }
                if consumed == 0 && !available && !self.frame_done() {
                    return Err(BundleError::TruncatedFrame { payload: self.name() });
                }
            }
            let leftover = self.zstd.as_ref().is_some_and(|z| z.pos < z.len);
            if leftover || self.entry_left > 0 {
                return Err(BundleError::TrailingFrameData { payload: self.name() });
            }
        }
        let found = hex::encode(self.hasher.finalize_reset());
        if found != self.info().sha256 {
            return Err(BundleError::PayloadHash {
                payload: self.name(),
                expected: self.info().sha256.clone(),
                found,
            });
        }
        let name = self.name();
        read_padding(&mut self.reader.input, self.entry_size, &name)?;
        self.done = true;
        self.reader.state = State::Ready;
        Ok(())
    }
}

impl<R: Read> Read for Payload<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.reader.state != State::Reading(self.index) {
            return Err(BundleError::Failed.into_io());
        }
        self.read_inner(buf).map_err(|e| {
            self.reader.state = State::Failed;
            e.into_io()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_fields() {
        assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
        assert_eq!(parse_octal(b"  644 \0"), Some(0o644));
        assert_eq!(parse_octal(b"00000000012\0"), Some(10));
        assert_eq!(parse_octal(b"\0\0\0\0"), None);
        assert_eq!(parse_octal(b"0008\0"), None);
        assert_eq!(parse_octal(b"12 3\0"), None);
        assert_eq!(parse_octal(b"\x80\0\0\0\0\0\0\0\0\0\0\x01"), None);
        assert_eq!(parse_octal(b"7777777777777777777777"), None);
        let mut f = [0u8; 12];
        put_octal(&mut f, 8_000_000_000);
        assert_eq!(&f, b"73465450000\0");
        assert_eq!(parse_octal(&f), Some(8_000_000_000));
    }

    #[test]
    fn header_round_trip() {
        let h = ustar_header("rootfs", 12345, 1_795_611_600).unwrap();
        let parsed = parse_header(&h, 0).unwrap();
        assert_eq!(
            (parsed.name.as_str(), parsed.size, parsed.mtime),
            ("rootfs", 12345, 1_795_611_600)
        );
        assert_eq!(&h[148..156], format!("{:06o}\0 ", header_checksum(&h)).as_bytes());
        assert!(ustar_header("../x", 1, 0).is_err());
        assert!(ustar_header("x", MAX_ENTRY_SIZE + 1, 0).is_err());
        // Every single-byte change of a header is refused.
        for i in 0..BLOCK_SIZE {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = h;
                bad[i] ^= flip;
                assert!(parse_header(&bad, 0).is_err(), "byte {i} ^ {flip:#x} accepted");
            }
        }
    }

    #[test]
    fn compress_sets_checksum_and_window() {
        let content = vec![7u8; 100_000];
        let frame = compress(&content, 3).unwrap();
        // Frame header descriptor: bit 2 is the content checksum flag.
        assert_eq!(&frame[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert_ne!(frame[4] & 0x04, 0, "no checksum flag");
        assert_eq!(zstd::bulk::decompress(&frame, content.len()).unwrap(), content);
    }

    #[test]
    fn io_errors_carry_bundle_errors() {
        let err = BundleError::TruncatedFrame { payload: "x".into() }.into_io();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(BundleError::from_io(&err), Some(BundleError::TruncatedFrame { .. })));
        let err = BundleError::Read(io::Error::from(io::ErrorKind::TimedOut)).into_io();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(BundleError::from_io(&err).is_none());
    }
}
