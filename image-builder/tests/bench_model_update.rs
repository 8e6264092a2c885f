//! The benchmark of a model update on the QEMU image of scenario 030:
//! time from `basalt publish` to the device serving the new version, split
//! into poll wait, download, install, and the runtime's verify, load, test
//! vector and switch (see [`device::Split`]). A target of its own, so that
//! the system tests (`--test e2e_update -- --ignored`) do not run it;
//! `ci/bench/model-update.sh` does.

mod common;
mod device;

use std::time::Duration;

use common::{boot, expect};
use device::*;

/// One boot, then
/// `BASALT_BENCH_UPDATES` (default 5) versions published one after the
/// other, each kept at once; prints the split of each and the medians.
#[test]
#[ignore = "a benchmark that boots QEMU: ci/bench/model-update.sh runs it"]
fn bench_model_update_split() {
    let runs: usize =
        std::env::var("BASALT_BENCH_UPDATES").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let v1 = build(MODEL_RECIPE, "1.0.0");
    let versions = Versions::make();
    let repo = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(repo.path(), REPO_PORT);
    let mut m = boot(&v1.disk, &v1.report, "bench-model-update");
    expect(&mut m, "boot blessed: slot a", 180);
    status(&m);
    let mut splits = Vec::new();
    for n in 0..runs {
        let version = format!("2.{n}.0");
        let bundle = versions.bundle("2.0.0", &version, "[watch]\nwindow = 0\n");
        // A moment after the last poll, so that the wait is not always
        // the same fraction of the interval.
        std::thread::sleep(Duration::from_millis(700 + 373 * n as u64 % 1500));
        let published = unix_now();
        publish_model(&bundle, repo.path());
        expect_line(
            &mut m,
            &format!("[update-agent] model mlp {version}: runtime says serving"),
            60,
        );
        let split = Split::of(&m.console(), &nginx.access_log(), &version, published);
        eprintln!("model-update {version}: {}", split.line());
        splits.push(split);
    }
    let median = |f: &dyn Fn(&Split) -> f64| {
        let mut v: Vec<f64> = splits.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let med = Split {
        poll_wait: median(&|s| s.poll_wait),
        download: median(&|s| s.download),
        install: median(&|s| s.install),
        verify: median(&|s| s.verify),
        load: median(&|s| s.load),
        test_vector: median(&|s| s.test_vector),
        switch: median(&|s| s.switch),
        load_call: median(&|s| s.load_call),
    };
    eprintln!("model-update median of {runs}: {}", med.line());
}
