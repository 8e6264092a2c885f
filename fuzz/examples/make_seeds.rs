//! Writes the seed corpus of fuzz/seeds: valid inputs of each target, the
//! bundles and channel signed with the fuzzing key, so that mutations
//! start from inputs that reach deep into the readers.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`

use std::path::Path;

use basalt_bundle::archive::{compress, write_bundle};
use basalt_bundle::channel::Channel;
use basalt_bundle::civil::unix_to_datetime;
use basalt_bundle::config::VerityParams;
use basalt_bundle::manifest::{BundleKind, Compression, Manifest, OsInfo, PayloadInfo};
use basalt_bundle::signature::{sign, SignatureFile};

const CREATED: i64 = 1_795_611_600;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn signatures(bytes: &[u8]) -> Vec<u8> {
    let mut sigs = SignatureFile::default();
    sigs.add(sign(bytes, &basalt_fuzz::fuzz_key()));
    sigs.to_toml().expect("a signature file is TOML").into_bytes()
}

fn bundle(kind: BundleKind, payloads: &[(&str, Vec<u8>, Compression)]) -> (Vec<u8>, Vec<u8>) {
    let verity = VerityParams {
        root_hash: "5a".repeat(32),
        salt: "a5".repeat(32),
        algorithm: "sha256".into(),
        data_block_size: 4096,
        hash_block_size: 4096,
        data_blocks: 1,
        hash_offset: 4096,
    };
    let manifest = Manifest {
        format: 1,
        kind,
        name: "seed".into(),
        version: semver::Version::new(1, 0, 0),
        compatible: vec!["qemu-x86_64".into()],
        created: unix_to_datetime(CREATED),
        os: (kind == BundleKind::Os).then(|| OsInfo { cmdline: "console=ttyS0".into(), tries: 3 }),
        payloads: payloads
            .iter()
            .map(|(name, data, c)| {
                let v = (*name == "rootfs").then(|| verity.clone());
                PayloadInfo::describe(name, data, *c, v)
            })
            .collect(),
    };
    let text = manifest.to_toml().into_bytes();
    let stored: Vec<(&str, Vec<u8>)> = payloads
        .iter()
        .map(|(name, data, c)| match c {
            Compression::Zstd => (*name, compress(data, 3).expect("zstd compresses")),
            Compression::None => (*name, data.clone()),
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = stored.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    let bytes = write_bundle(Vec::new(), &text, &signatures(&text), &refs, CREATED as u64)
        .expect("the seed bundle is valid");
    (bytes, text)
}

fn main() -> std::io::Result<()> {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let text: Vec<u8> = (0..1500u32).map(|i| b"basalt seed "[(i % 12) as usize]).collect();
    let (model, model_manifest) = bundle(
        BundleKind::Model,
        &[
            ("model.onnx", text.clone(), Compression::Zstd),
            ("model.toml", b"inputs = 1\n".to_vec(), Compression::None),
        ],
    );
    let (os, os_manifest) = bundle(
        BundleKind::Os,
        &[
            ("vmlinuz", text.clone(), Compression::Zstd),
            ("initrd", text[..700].to_vec(), Compression::None),
            ("rootfs", vec![0u8; 4096], Compression::Zstd),
        ],
    );
    write(&seeds.join("bundle_reader"), "model.basalt", &model)?;
    write(&seeds.join("bundle_reader"), "os.basalt", &os)?;
    write(&seeds.join("manifest"), "model.toml", &model_manifest)?;
    write(&seeds.join("manifest"), "os.toml", &os_manifest)?;

    let channel = Channel {
        format: 1,
        channel: "stable".into(),
        name: "seed".into(),
        version: semver::Version::new(1, 0, 0),
        bundle: "bundles/seed-1.0.0.basalt".into(),
        sha256: "0f".repeat(32),
        size: os.len() as u64,
        compatible: vec!["qemu-x86_64".into()],
        published: unix_to_datetime(CREATED),
        expires: unix_to_datetime(CREATED + 30 * 86_400),
        rollout: 50,
    };
    let file = channel.to_toml().into_bytes();
    write(&seeds.join("channel"), "stable.toml", &file)?;
    // The split form the channel target reads: two bytes giving the length
    // of the file, the file, its signatures.
    let split = u16::try_from(file.len()).expect("a seed channel is small").to_le_bytes();
    let signed = [&split[..], &file, &signatures(&file)].concat();
    write(&seeds.join("channel"), "stable-signed", &signed)?;
    Ok(())
}
