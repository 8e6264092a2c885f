//! The `*.basalt` bundle file, judged by GNU tar and by hostile input.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::process::Command;
use std::rc::Rc;

use basalt_bundle::archive::{
    compress, peek, replace_signatures, ustar_header, write_bundle, BundleError, BundleReader,
    Trust, BLOCK_SIZE, MAX_WINDOW_LOG,
};
use basalt_bundle::config::VerityParams;
use basalt_bundle::keys::SigningKey;
use basalt_bundle::manifest::{BundleKind, Compression, Manifest, OsInfo, PayloadInfo};
use basalt_bundle::signature::{sign, SignatureFile};

const CREATED: &str = "2026-11-25T13:00:00Z";
const CREATED_UNIX: u64 = 1_795_611_600;

/// Deterministic bytes that zstd compresses somewhat: text-like with noise.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|i| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            if i % 3 == 0 {
                b"basalt "[i % 7]
            } else {
                b'a' + ((x >> 59) as u8)
            }
        })
        .collect()
}

struct Built {
    bytes: Vec<u8>,
    manifest: Manifest,
    /// (name, content) in manifest order.
    contents: Vec<(String, Vec<u8>)>,
    /// (name, stored bytes) in manifest order.
    stored: Vec<(String, Vec<u8>)>,
}

/// A bundle of `payloads` (name, content, compression), signed by `keys`.
fn build(
    kind: BundleKind,
    payloads: &[(&str, Vec<u8>, Compression)],
    verity: Option<VerityParams>,
    keys: &[&SigningKey],
) -> Built {
    let infos: Vec<PayloadInfo> = payloads
        .iter()
        .map(|(name, data, c)| {
            let v = if *name == "rootfs" { verity.clone() } else { None };
            PayloadInfo::describe(name, data, *c, v)
        })
        .collect();
    let manifest = Manifest {
        format: 1,
        kind,
        name: "minimal".into(),
        version: semver::Version::new(1, 1, 0),
        compatible: vec!["qemu-x86_64".into()],
        created: CREATED.parse().unwrap(),
        os: (kind == BundleKind::Os)
            .then(|| OsInfo { cmdline: "console=ttyS0 quiet".into(), tries: 3 }),
        payloads: infos,
    };
    manifest.validate().unwrap();
    let text = manifest.to_toml();
    let mut sigs = SignatureFile::default();
    for key in keys {
        sigs.add(sign(text.as_bytes(), key));
    }
    let stored: Vec<(String, Vec<u8>)> = payloads
        .iter()
        .map(|(name, data, c)| {
            let bytes = match c {
                Compression::Zstd => compress(data, 19).unwrap(),
                Compression::None => data.clone(),
            };
            (name.to_string(), bytes)
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = stored.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    let bytes = write_bundle(
        Vec::new(),
        text.as_bytes(),
        sigs.to_toml().unwrap().as_bytes(),
        &refs,
        CREATED_UNIX,
    )
    .unwrap();
    let contents = payloads.iter().map(|(n, d, _)| (n.to_string(), d.clone())).collect();
    Built { bytes, manifest, contents, stored }
}

/// A small model bundle: a few KiB of payloads, one compressed, one not.
fn small(key: &SigningKey) -> Built {
    build(
        BundleKind::Model,
        &[
            ("model.onnx", content(3000, 1), Compression::Zstd),
            ("model.toml", content(700, 2), Compression::None),
        ],
        None,
        &[key],
    )
}

fn trust(keys: &[&SigningKey], threshold: usize) -> Trust {
    Trust { keys: keys.iter().map(|k| k.public()).collect(), threshold }
}

fn unwrap_io(e: io::Error) -> BundleError {
    match e.into_inner().map(|inner| inner.downcast::<BundleError>()) {
        Some(Ok(b)) => *b,
        Some(Err(other)) => BundleError::Read(io::Error::other(other.to_string())),
        None => BundleError::Read(io::Error::other("io error without a payload")),
    }
}

/// Reads a whole bundle the way a device does; the contents in order.
fn read_all<R: Read>(input: R, trust: &Trust) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let mut reader = BundleReader::open(input, trust)?;
    let mut out = Vec::new();
    while let Some(mut payload) = reader.next_payload()? {
        let name = payload.info().name.clone();
        let mut data = Vec::new();
        payload.read_to_end(&mut data).map_err(unwrap_io)?;
        out.push((name, data));
    }
    reader.finish()?;
    Ok(out)
}

/// Offset of the header of entry `n` (0 = manifest.toml).
fn entry_offset(bytes: &[u8], n: usize) -> usize {
    let mut offset = 0;
    for _ in 0..n {
        let size = usize::from_str_radix(
            std::str::from_utf8(&bytes[offset + 124..offset + 135]).unwrap(),
            8,
        )
        .unwrap();
        offset += BLOCK_SIZE + size.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    }
    offset
}

/// Rewrites the checksum of the header at `offset` after an edit.
fn fix_checksum(bytes: &mut [u8], offset: usize) {
    let h = &mut bytes[offset..offset + BLOCK_SIZE];
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// Counts the bytes taken from the inner reader.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

#[test]
fn round_trip_model_bundle() {
    let key = SigningKey::generate().unwrap();
    let built = small(&key);
    let t = trust(&[&key], 1);
    let mut reader = BundleReader::open(&built.bytes[..], &t).unwrap();
    assert_eq!(reader.manifest(), &built.manifest);
    assert_eq!(reader.manifest_bytes(), built.manifest.to_toml().as_bytes());
    assert_eq!(reader.signed_by(), &[key.public().key_id()]);
    let mut got = Vec::new();
    while let Some(mut p) = reader.next_payload().unwrap() {
        let name = p.info().name.clone();
        let mut data = Vec::new();
        p.read_to_end(&mut data).unwrap();
        // Read after the end stays at the end.
        assert_eq!(p.read(&mut [0u8; 16]).unwrap(), 0);
        got.push((name, data));
    }
    assert!(reader.next_payload().unwrap().is_none());
    let rest = reader.finish().unwrap();
    assert!(rest.is_empty());
    assert_eq!(got, built.contents);
}

#[test]
fn round_trip_os_bundle_with_large_payloads() {
    let key = SigningKey::generate().unwrap();
    let verity = VerityParams {
        root_hash: "12".repeat(32),
        salt: "34".repeat(32),
        algorithm: "sha256".into(),
        data_block_size: 4096,
        hash_block_size: 4096,
        data_blocks: 100,
        hash_offset: 409_600,
    };
    // Larger than the reader's buffers, and one not a multiple of 512.
    let built = build(
        BundleKind::Os,
        &[
            ("vmlinuz", content(300_001, 3), Compression::Zstd),
            ("initrd", content(70_000, 4), Compression::None),
            ("rootfs", vec![0u8; 3 << 20], Compression::Zstd),
        ],
        Some(verity),
        &[&key],
    );
    let got = read_all(&built.bytes[..], &trust(&[&key], 1)).unwrap();
    assert_eq!(got, built.contents);
    // The same with a reader that hands out one byte at a time.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }
    let got = read_all(Trickle(&built.bytes), &trust(&[&key], 1)).unwrap();
    assert_eq!(got, built.contents);
}

#[test]
fn gnu_tar_lists_and_extracts_identical_bytes() {
    let key = SigningKey::generate().unwrap();
    let built = small(&key);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("minimal-1.1.0.basalt");
    std::fs::write(&path, &built.bytes).unwrap();
    let out = Command::new("tar").arg("-tvf").arg(&path).output().expect("GNU tar is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "tar warned: {}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    let names: Vec<&str> = lines.iter().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(names, ["manifest.toml", "manifest.sig", "model.onnx", "model.toml"], "{listing}");
    for line in &lines {
        assert!(line.starts_with("-rw-r--r-- 0/0 "), "{line}");
        assert!(line.contains("2026-11-25 13:00"), "{line}");
    }
    assert!(lines[2].contains(&format!(" {} ", built.stored[0].1.len())), "{}", lines[2]);

    let extract = dir.path().join("x");
    std::fs::create_dir(&extract).unwrap();
    let out = Command::new("tar").arg("-xf").arg(&path).arg("-C").arg(&extract).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "tar warned: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read(extract.join("manifest.toml")).unwrap(),
        built.manifest.to_toml().as_bytes()
    );
    let (_, _, sigs) = peek(&built.bytes[..]).unwrap();
    assert_eq!(
        std::fs::read(extract.join("manifest.sig")).unwrap(),
        sigs.to_toml().unwrap().as_bytes()
    );
    for (name, stored) in &built.stored {
        assert_eq!(&std::fs::read(extract.join(name)).unwrap(), stored, "{name}");
    }

    // And a bundle GNU tar writes from those files, padded to its
    // 10240-byte record, reads as well.
    let retar = dir.path().join("retar.basalt");
    let out = Command::new("tar")
        .args(["--format=ustar", "--owner=0", "--group=0", "-cf"])
        .arg(&retar)
        .arg("-C")
        .arg(&extract)
        .args(["manifest.toml", "manifest.sig", "model.onnx", "model.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&retar).unwrap();
    assert_eq!(bytes.len() % 10240, 0);
    assert!(bytes.len() > built.bytes.len());
    assert_eq!(read_all(&bytes[..], &trust(&[&key], 1)).unwrap(), built.contents);
}

#[test]
fn every_single_byte_flip_is_refused() {
    let key = SigningKey::generate().unwrap();
    let built = small(&key);
    let t = trust(&[&key], 1);
    assert!(read_all(&built.bytes[..], &t).is_ok());
    let mut accepted = Vec::new();
    let mut tried = 0;
    for offset in 0..built.bytes.len() {
        for flip in [0x01u8, 0x80] {
            let mut bytes = built.bytes.clone();
            bytes[offset] ^= flip;
            tried += 1;
            if let Ok(got) = read_all(&bytes[..], &t) {
                // Whatever gets through must be the signed content itself.
                assert_eq!(got, built.contents, "flip {flip:#x} at {offset} changed the content");
                accepted.push((offset, flip));
            }
        }
    }
    assert!(tried >= 2 * 4 * 1024, "the bundle is too small to judge: {tried}");
    // zstd's format has a few bits its decoder ignores (the unused high
    // bits that end an FSE table description): flipping one gives another
    // encoding of the same content, same checksum, same sha256. Such a
    // flip is harmless, since only the content is signed, and it may only
    // be inside the compressed payload's frame. Everything else, every
    // header, padding, manifest, signature and stored payload byte, must
    // be refused.
    let frame_start = entry_offset(&built.bytes, 2) + BLOCK_SIZE;
    let frame = frame_start..frame_start + built.stored[0].1.len();
    for (offset, flip) in &accepted {
        assert!(frame.contains(offset), "flip {flip:#x} at {offset} (outside the frame) accepted");
    }
    assert!(accepted.len() <= 2, "{} of {tried} flips accepted: {accepted:?}", accepted.len());
    eprintln!(
        "{tried} flips, {} accepted (zstd frame, same content): {accepted:?}",
        accepted.len()
    );
}

#[test]
fn every_truncation_is_refused() {
    let key = SigningKey::generate().unwrap();
    let built = small(&key);
    let t = trust(&[&key], 1);
    assert_eq!(built.bytes.len() % BLOCK_SIZE, 0);
    // Every offset, which includes every 512-byte boundary.
    for cut in 0..built.bytes.len() {
        let err = read_all(&built.bytes[..cut], &t).unwrap_err();
        assert!(
            matches!(
                err,
                BundleError::Truncated { .. }
                    | BundleError::MissingEntry { .. }
                    | BundleError::TruncatedFrame { .. }
            ),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn a_huge_manifest_header_is_refused_without_reading_it() {
    /// A header claiming a 1 GiB manifest.toml, then zeros without end,
    /// made up as they are read.
    struct Huge {
        header: [u8; BLOCK_SIZE],
        pos: u64,
    }
    impl Read for Huge {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(1 << 16);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                let at = self.pos + i as u64;
                *b = if at < BLOCK_SIZE as u64 { self.header[at as usize] } else { 0 };
            }
            self.pos += n as u64;
            Ok(n)
        }
    }
    let key = SigningKey::generate().unwrap();
    let count = Rc::new(Cell::new(0));
    let input = Counting {
        inner: Huge { header: ustar_header("manifest.toml", 1 << 30, 0).unwrap(), pos: 0 },
        count: count.clone(),
    };
    let start = std::time::Instant::now();
    let err = BundleReader::open(input, &trust(&[&key], 1)).unwrap_err();
    assert!(matches!(err, BundleError::EntryTooLarge { size: 1_073_741_824, .. }), "{err}");
    assert!(err.to_string().contains("manifest.toml"), "{err}");
    assert_eq!(count.get(), BLOCK_SIZE as u64, "read past the header");
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
    // The same for manifest.sig, and for peek.
    let big_sig = [
        ustar_header("manifest.toml", 0, 0).unwrap().to_vec(),
        ustar_header("manifest.sig", 1 << 30, 0).unwrap().to_vec(),
    ]
    .concat();
    assert!(matches!(peek(&big_sig[..]), Err(BundleError::EntryTooLarge { .. })));
}

/// A model bundle whose only payload `model.onnx` is `stored`, declared
/// as `declared` bytes of content with the sha256 of `content`.
fn bundle_with_frame(key: &SigningKey, stored: &[u8], declared: u64, content: &[u8]) -> Vec<u8> {
    let mut info = PayloadInfo::describe("model.onnx", content, Compression::Zstd, None);
    info.size = declared;
    let manifest = Manifest {
        format: 1,
        kind: BundleKind::Model,
        name: "bomb".into(),
        version: semver::Version::new(1, 0, 0),
        compatible: vec!["qemu-x86_64".into()],
        created: CREATED.parse().unwrap(),
        os: None,
        payloads: vec![info],
    };
    let text = manifest.to_toml();
    let mut sigs = SignatureFile::default();
    sigs.add(sign(text.as_bytes(), key));
    write_bundle(
        Vec::new(),
        text.as_bytes(),
        sigs.to_toml().unwrap().as_bytes(),
        &[("model.onnx", stored)],
        CREATED_UNIX,
    )
    .unwrap()
}

#[test]
fn a_zstd_bomb_stops_one_byte_past_the_declared_size() {
    let key = SigningKey::generate().unwrap();
    // 64 MiB of zeros, compressed as a stream so the test never holds them.
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
    encoder.include_checksum(true).unwrap();
    io::copy(&mut io::repeat(0).take(64 << 20), &mut encoder).unwrap();
    let frame = encoder.finish().unwrap();
    assert!(frame.len() < 5000, "{}", frame.len());
    let bytes = bundle_with_frame(&key, &frame, 4096, &[0u8; 4096]);
    let mut reader = BundleReader::open(&bytes[..], &trust(&[&key], 1)).unwrap();
    let mut payload = reader.next_payload().unwrap().unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let err = loop {
        match payload.read(&mut buf) {
            Ok(0) => panic!("the bomb was accepted after {total} bytes"),
            Ok(n) => total += n as u64,
            Err(e) => break e,
        }
    };
    assert_eq!(total, 4096, "yielded more than declared");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let inner = BundleError::from_io(&err).unwrap();
    assert!(matches!(inner, BundleError::PayloadTooLarge { declared: 4096, .. }), "{inner}");
    // The reader is spent.
    drop(payload);
    assert!(matches!(reader.next_payload(), Err(BundleError::Failed)));
}

#[test]
fn frames_that_do_not_fit_the_declaration_are_refused() {
    let key = SigningKey::generate().unwrap();
    let t = trust(&[&key], 1);
    let data = content(5000, 9);
    let frame = compress(&data, 3).unwrap();
    // Content shorter than declared.
    let bytes = bundle_with_frame(&key, &frame, 6000, &data);
    assert!(matches!(read_all(&bytes[..], &t), Err(BundleError::PayloadSize { found: 5000, .. })));
    // Right size, other content.
    let other = content(5000, 10);
    let bytes = bundle_with_frame(&key, &frame, 5000, &other);
    assert!(matches!(read_all(&bytes[..], &t), Err(BundleError::PayloadHash { .. })));
    // Data after the frame: a second frame, or zeros.
    for extra in [compress(b"", 3).unwrap(), vec![0u8; 3]] {
        let bytes = bundle_with_frame(&key, &[frame.clone(), extra].concat(), 5000, &data);
        let err = read_all(&bytes[..], &t).unwrap_err();
        assert!(matches!(err, BundleError::TrailingFrameData { .. }), "{err}");
    }
    // A frame cut short inside its entry.
    let bytes = bundle_with_frame(&key, &frame[..frame.len() - 4], 5000, &data);
    let err = read_all(&bytes[..], &t).unwrap_err();
    assert!(matches!(err, BundleError::TruncatedFrame { .. }), "{err}");
    // An entry much larger than zstd makes of the declared size.
    let padded = [frame.clone(), vec![0u8; 100_000]].concat();
    let bytes = bundle_with_frame(&key, &padded, 5000, &data);
    let err = read_all(&bytes[..], &t).unwrap_err();
    assert!(matches!(err, BundleError::CompressedTooLarge { .. }), "{err}");
    // Not zstd at all.
    let bytes = bundle_with_frame(&key, &data, 5000, &data);
    assert!(matches!(read_all(&bytes[..], &t), Err(BundleError::Decompress { .. })));
}

#[test]
fn a_window_beyond_the_limit_is_refused() {
    let key = SigningKey::generate().unwrap();
    let data = content(1 << 20, 11);
    // A streaming frame of unknown size keeps the full window in its
    // header: 2^27 bytes.
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    encoder.include_checksum(true).unwrap();
    encoder.window_log(MAX_WINDOW_LOG + 4).unwrap();
    encoder.write_all(&data).unwrap();
    let frame = encoder.finish().unwrap();
    let bytes = bundle_with_frame(&key, &frame, data.len() as u64, &data);
    let err = read_all(&bytes[..], &trust(&[&key], 1)).unwrap_err();
    assert!(matches!(err, BundleError::Decompress { .. }), "{err}");
    // The limit itself, and one more, are read.
    for log in [MAX_WINDOW_LOG, MAX_WINDOW_LOG + 1] {
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_checksum(true).unwrap();
        encoder.window_log(log).unwrap();
        encoder.write_all(&data).unwrap();
        let frame = encoder.finish().unwrap();
        let bytes = bundle_with_frame(&key, &frame, data.len() as u64, &data);
        read_all(&bytes[..], &trust(&[&key], 1)).unwrap();
    }
}

/// The small bundle with the header of entry `n` edited by `edit`, its
/// checksum fixed.
fn edited(built: &Built, n: usize, edit: impl Fn(&mut [u8])) -> Vec<u8> {
    let mut bytes = built.bytes.clone();
    let offset = entry_offset(&bytes, n);
    edit(&mut bytes[offset..offset + BLOCK_SIZE]);
    fix_checksum(&mut bytes, offset);
    bytes
}

fn set_name(h: &mut [u8], name: &[u8]) {
    h[..100].fill(0);
    h[..name.len()].copy_from_slice(name);
}

#[test]
fn paths_links_and_extensions_are_refused() {
    let key = SigningKey::generate().unwrap();
    let built = small(&key);
    let t = trust(&[&key], 1);
    let names: [&[u8]; 9] = [
        b"../x",
        b"/etc/passwd",
        b"a/b",
        b".",
        b"..",
        b"",
        b"model\0.onnx",
        b"-model.onnx",
        b"mod\xffel",
    ];
    for name in names {
        for n in [0, 2] {
            let bytes = edited(&built, n, |h| set_name(h, name));
            let err = read_all(&bytes[..], &t).unwrap_err();
            let ok = match (name, &err) {
                // An empty name reads as a zero-filled header where
                // the entry belongs only if the whole block were zero.
                (b"", BundleError::EntryName { .. }) => true,
                (_, BundleError::EntryName { .. }) => true,
                _ => false,
            };
            assert!(ok, "name {:?} in entry {n}: {err}", String::from_utf8_lossy(name));
        }
    }
    for typeflag in [b'1', b'2', b'3', b'4', b'5', b'6', b'7', b'x', b'g', b'L', b'K', b'S'] {
        for n in [0, 1, 2, 3] {
            let bytes = edited(&built, n, |h| h[156] = typeflag);
            let err = read_all(&bytes[..], &t).unwrap_err();
            assert!(
                matches!(err, BundleError::EntryType { typeflag: t, .. } if t == char::from(typeflag)),
                "type {} in entry {n}: {err}",
                char::from(typeflag)
            );
        }
    }
    // A link target, a prefix, a base-256 size, old (non-ustar) magic, an
    // entry out of order.
    let bytes = edited(&built, 2, |h| h[157..163].copy_from_slice(b"/etc/x"));
    assert!(matches!(
        read_all(&bytes[..], &t),
        Err(BundleError::HeaderField { field: "linkname", .. })
    ));
    let bytes = edited(&built, 2, |h| h[345..348].copy_from_slice(b"etc"));
    assert!(matches!(
        read_all(&bytes[..], &t),
        Err(BundleError::HeaderField { field: "prefix", .. })
    ));
    let bytes = edited(&built, 2, |h| {
        h[124..136].fill(0);
        h[124] = 0x80;
        h[135] = 0x10;
    });
    assert!(matches!(
        read_all(&bytes[..], &t),
        Err(BundleError::HeaderField { field: "size", .. })
    ));
    let bytes = edited(&built, 2, |h| h[257..265].copy_from_slice(b"ustar  \0"));
    assert!(matches!(read_all(&bytes[..], &t), Err(BundleError::NotUstar { .. })));
    let bytes = edited(&built, 2, |h| set_name(h, b"model.toml"));
    let err = read_all(&bytes[..], &t).unwrap_err();
    assert!(
        matches!(&err, BundleError::UnexpectedEntry { expected, found, .. }
            if expected == "model.onnx" && found == "model.toml"),
        "{err}"
    );
    // A stored payload whose entry size differs from the declared size.
    let bytes = edited(&built, 3, |h| h[124..135].copy_from_slice(b"00000001000"));
    assert!(matches!(read_all(&bytes[..], &t), Err(BundleError::PayloadSize { .. })));
}

#[test]
fn the_end_of_the_archive_is_checked() {
    let key = SigningKey::generate().unwrap();
    let built = small(&key);
    let t = trust(&[&key], 1);
    let len = built.bytes.len();
    // Extra zero blocks, up to a tar record, are fine.
    let padded = [built.bytes.clone(), vec![0u8; 10240]].concat();
    assert_eq!(read_all(&padded[..], &t).unwrap(), built.contents);
    let too_many = [built.bytes.clone(), vec![0u8; 10240 + BLOCK_SIZE]].concat();
    assert!(matches!(read_all(&too_many[..], &t), Err(BundleError::TrailingData { .. })));
    let partial = [built.bytes.clone(), vec![0u8; 100]].concat();
    assert!(matches!(read_all(&partial[..], &t), Err(BundleError::TrailingData { .. })));
    let appended = [built.bytes.clone(), b"hello".to_vec()].concat();
    assert!(matches!(read_all(&appended[..], &t), Err(BundleError::TrailingData { .. })));
    // A whole extra entry after the last payload.
    let extra = [
        &built.bytes[..len - 2 * BLOCK_SIZE],
        &ustar_header("evil", 0, 0).unwrap()[..],
        &[0u8; 2 * BLOCK_SIZE][..],
    ]
    .concat();
    assert!(matches!(read_all(&extra[..], &t), Err(BundleError::EndOfArchive { .. })));
    // Read early, finished early.
    let mut reader = BundleReader::open(&built.bytes[..], &t).unwrap();
    {
        let mut p = reader.next_payload().unwrap().unwrap();
        p.read_exact(&mut [0u8; 10]).unwrap();
    }
    let err = reader.next_payload().unwrap_err();
    assert!(matches!(err, BundleError::PayloadNotFinished { .. }), "{err}");
    let reader = BundleReader::open(&built.bytes[..], &t).unwrap();
    assert!(matches!(reader.finish(), Err(BundleError::PayloadsLeft { remaining: 2 })));
}

#[test]
fn untrusted_bundles_are_refused_before_any_payload_byte() {
    let a = SigningKey::generate().unwrap();
    let b = SigningKey::generate().unwrap();
    let stranger = SigningKey::generate().unwrap();
    let built = small(&a);
    let head_end = entry_offset(&built.bytes, 2) as u64;
    let cases =
        [(trust(&[&stranger], 1), "unknown signer"), (trust(&[&a, &b], 2), "below threshold")];
    for (t, what) in cases {
        let count = Rc::new(Cell::new(0));
        let input = Counting { inner: &built.bytes[..], count: count.clone() };
        let err = BundleReader::open(input, &t).unwrap_err();
        assert!(matches!(err, BundleError::Verify(_)), "{what}: {err}");
        assert!(
            count.get() <= head_end,
            "{what}: read {} bytes, head ends at {head_end}",
            count.get()
        );
    }
    // The trusted open reads no further either.
    let count = Rc::new(Cell::new(0));
    let input = Counting { inner: &built.bytes[..], count: count.clone() };
    let reader = BundleReader::open(input, &trust(&[&a], 1)).unwrap();
    assert_eq!(count.get(), head_end);
    drop(reader);
    // peek reads the same head, without trust.
    let (bytes, manifest, sigs) = peek(&built.bytes[..]).unwrap();
    assert_eq!(bytes, built.manifest.to_toml().as_bytes());
    assert_eq!(manifest, built.manifest);
    assert_eq!(sigs.signatures.len(), 1);
    // A manifest that verifies but does not parse is refused after
    // verification, before payloads.
    let text = b"format = 1\nkind = \"os\"\n";
    let mut s = SignatureFile::default();
    s.add(sign(text, &a));
    let bytes = write_bundle(Vec::new(), text, s.to_toml().unwrap().as_bytes(), &[], 0).unwrap();
    assert!(matches!(
        BundleReader::open(&bytes[..], &trust(&[&a], 1)),
        Err(BundleError::Manifest(_))
    ));
    let s = b"[[signature]]\nkey_id = 3\n";
    let bytes = write_bundle(Vec::new(), text, s, &[], 0).unwrap();
    assert!(matches!(
        BundleReader::open(&bytes[..], &trust(&[&a], 1)),
        Err(BundleError::Signatures(_))
    ));
}

#[test]
fn replace_signatures_adds_a_second_key() {
    let a = SigningKey::generate().unwrap();
    let b = SigningKey::generate().unwrap();
    let built = small(&a);
    let both = trust(&[&a, &b], 2);
    assert!(matches!(read_all(&built.bytes[..], &both), Err(BundleError::Verify(_))));
    let resigned = replace_signatures(&built.bytes[..], Vec::new(), |manifest, mut sigs| {
        sigs.add(sign(manifest, &b));
        Ok::<_, std::convert::Infallible>(sigs)
    })
    .unwrap();
    let mut reader = BundleReader::open(&resigned[..], &both).unwrap();
    assert_eq!(reader.signed_by(), &[a.public().key_id(), b.public().key_id()]);
    while let Some(mut p) = reader.next_payload().unwrap() {
        io::copy(&mut p, &mut io::sink()).unwrap();
    }
    reader.finish().unwrap();
    assert_eq!(read_all(&resigned[..], &both).unwrap(), built.contents);
    // Everything but manifest.sig is byte for byte the same.
    let (old_head, new_head) = (entry_offset(&built.bytes, 1), entry_offset(&resigned, 1));
    assert_eq!(old_head, new_head);
    assert_eq!(&built.bytes[..old_head], &resigned[..new_head]);
    let (old_tail, new_tail) = (entry_offset(&built.bytes, 2), entry_offset(&resigned, 2));
    assert_eq!(&built.bytes[old_tail..], &resigned[new_tail..]);
    // The signing function's error comes back as it was.
    let err = replace_signatures(&built.bytes[..], Vec::new(), |_, _| Err("no key")).unwrap_err();
    assert_eq!(err.to_string(), "no key");
    // A damaged input is refused.
    let err = replace_signatures(&built.bytes[..100], Vec::new(), |_, s| {
        Ok::<_, std::convert::Infallible>(s)
    })
    .unwrap_err();
    assert!(err.to_string().contains("incomplete"), "{err}");
}

#[test]
fn writer_refuses_what_a_device_would() {
    let big = vec![b'#'; 64 * 1024 + 1];
    assert!(write_bundle(Vec::new(), &big, b"", &[], 0).is_err());
    assert!(write_bundle(Vec::new(), b"", &big, &[], 0).is_err());
    assert!(write_bundle(Vec::new(), b"", b"", &[("../x", b"")], 0).is_err());
    assert!(write_bundle(Vec::new(), b"", b"", &[("a/b", b"")], 0).is_err());
}
