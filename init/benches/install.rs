//! The install of a root filesystem payload, side by side with what a
//! user would do by hand: `zstd -d | tee >(sha256sum) | dd conv=fsync`.
//!
//! Both sides start from the same zstd frame of the same 128 MiB of
//! incompressible bytes (a squashfs is compressed already), write into a
//! file the size of a slot on the same filesystem and flush it. Ours also
//! reads the bundle's tar stream, checks its signature, and writes the
//! kernel and initrd (1 MiB each) to an ESP folder and the boot entry.
//!
//! `cargo bench -p basalt-init --bench install` (ci/bench/install.sh);
//! `BENCH_MIB` and `BENCH_RUNS` change the size and the number of runs.

use std::fs;
use std::io::BufReader;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_bundle::archive::{compress, write_bundle, BundleReader, Trust};
use basalt_bundle::config::VerityParams;
use basalt_bundle::entry::EntryConf;
use basalt_bundle::keys::SigningKey;
use basalt_bundle::manifest::{BundleKind, Compression, Manifest, OsInfo, PayloadInfo};
use basalt_bundle::signature::{sign, SignatureFile};
use basalt_bundle::slot::Slot;
use basalt_init::assess::SystemdBoot;
use basalt_init::update::install::{write_slot, BundlePayloads, CHUNK};

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mib = env("BENCH_MIB", 128) as usize;
    let runs = env("BENCH_RUNS", 5) as usize;
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("a temp dir");
    let rootfs = random(mib << 20, 7);
    let kernel = random(1 << 20, 8);
    let initrd = random(1 << 20, 9);
    let key = SigningKey::generate().unwrap();

    let verity = VerityParams {
        root_hash: "ab".repeat(32),
        salt: "cd".repeat(32),
        algorithm: "sha256".into(),
        data_block_size: 4096,
        hash_block_size: 4096,
        data_blocks: 1,
        hash_offset: 4096,
    };
    let manifest = Manifest {
        format: 1,
        kind: BundleKind::Os,
        name: "bench".into(),
        version: "2.0.0".parse().unwrap(),
        compatible: vec!["bench".into()],
        created: basalt_bundle::civil::unix_to_datetime(1_700_000_000),
        os: Some(OsInfo { cmdline: "console=ttyS0".into(), tries: 3 }),
        payloads: vec![
            PayloadInfo::describe("vmlinuz", &kernel, Compression::Zstd, None),
            PayloadInfo::describe("initrd", &initrd, Compression::Zstd, None),
            PayloadInfo::describe("rootfs", &rootfs, Compression::Zstd, Some(verity)),
        ],
    }
    .to_toml();
    let mut sigs = SignatureFile::default();
    sigs.add(sign(manifest.as_bytes(), &key));
    let zk = compress(&kernel, 3).unwrap();
    let zi = compress(&initrd, 3).unwrap();
    let zr = compress(&rootfs, 3).unwrap();
    let payloads: [(&str, &[u8]); 3] = [("vmlinuz", &zk), ("initrd", &zi), ("rootfs", &zr)];
    let bundle = write_bundle(
        Vec::new(),
        manifest.as_bytes(),
        sigs.to_toml().unwrap().as_bytes(),
        &payloads,
        1_700_000_000,
    )
    .unwrap();
    let bundle_path = dir.path().join("update.basalt");
    fs::write(&bundle_path, &bundle).unwrap();
    let frame = dir.path().join("rootfs.zst");
    fs::write(&frame, &zr).unwrap();
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&rootfs))
    };
    drop(rootfs);
    let trust = Trust { keys: vec![key.public()], threshold: 1 };
    let part = dir.path().join("rootfs_b");
    let slot_bytes = ((mib as u64) << 20) + (32 << 20);
    let fresh_part = |p: &Path| {
        let _ = fs::remove_file(p);
        let f = fs::File::create(p).unwrap();
        f.set_len(slot_bytes).unwrap();
        f.sync_all().unwrap();
    };

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..runs {
        // Ours: the device's own code path.
        fresh_part(&part);
        let esp = dir.path().join(format!("esp{run}"));
        fs::create_dir_all(esp.join("loader/entries")).unwrap();
        let t = Instant::now();
        let input = BufReader::with_capacity(1 << 20, fs::File::open(&bundle_path).unwrap());
        let mut reader = BundleReader::open(input, &trust).unwrap();
        let mut bl = SystemdBoot::new(&esp, Some(Slot::A));
        write_slot(&mut bl, Slot::B, &part, &mut BundlePayloads(&mut reader), CHUNK).unwrap();
        reader.finish().unwrap();
        let conf = EntryConf::for_slot(Slot::B, "bench", "2.0.0", "console=ttyS0");
        bl.prefer_for_one_try(Slot::B, &conf, 3).unwrap();
        ours.push(t.elapsed());

        // Theirs: the same frame through zstd, sha256sum and dd.
        fresh_part(&part);
        let sum = dir.path().join("sum");
        let script = format!(
            "set -o pipefail; zstd -q -d -c '{}' | tee >(sha256sum > '{}') | \
             dd of='{}' bs=1M conv=notrunc,fsync status=none",
            frame.display(),
            sum.display(),
            part.display()
        );
        let t = Instant::now();
        let ok = Command::new("bash").arg("-c").arg(&script).status().unwrap().success();
        theirs.push(t.elapsed());
        assert!(ok, "the tool pipeline failed");
        // `tee >(…)` may finish the hash a moment after dd; wait for it.
        let mut got = String::new();
        for _ in 0..100 {
            got = fs::read_to_string(&sum).unwrap_or_default();
            if got.len() >= 64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(got.starts_with(&expected), "sha256sum says {got}");
    }
    let (o, t) = (median(ours), median(theirs));
    let mbps = |d: Duration| mib as f64 / d.as_secs_f64();
    println!("install of a {mib} MiB root filesystem payload (median of {runs} runs):");
    println!(
        "  basalt (bundle reader, sha256, write, fsync):  {:>7.3} s  {:>6.0} MiB/s",
        o.as_secs_f64(),
        mbps(o)
    );
    println!(
        "  zstd -d | tee >(sha256sum) | dd conv=fsync:    {:>7.3} s  {:>6.0} MiB/s",
        t.as_secs_f64(),
        mbps(t)
    );
    println!("  throughput ratio basalt/tools: {:.2}x (target >= 0.9x)", mbps(o) / mbps(t));
}
