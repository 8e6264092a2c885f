//! The U-Boot environment as `fw_printenv` and `fw_setenv` (Debian's
//! libubootenv-tool) see it: what we write they read, what they write we
//! read, in both redundant copies and across the wrap of the flag byte.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use basalt_init::uboot::{Current, Env, EnvCopy, EnvLocation, EnvStore};

const SIZE: u64 = 0x4000;

/// Both copies in one raw area (as on an SD card), or in two files.
fn location(dir: &Path, one_file: bool) -> (EnvLocation, PathBuf) {
    let (p1, p2, off2) = if one_file {
        let p = dir.join("env");
        fs::write(&p, vec![0u8; 2 * SIZE as usize]).unwrap();
        (p.clone(), p, SIZE)
    } else {
        let (p1, p2) = (dir.join("env1"), dir.join("env2"));
        fs::write(&p1, vec![0u8; SIZE as usize]).unwrap();
        fs::write(&p2, vec![0u8; SIZE as usize]).unwrap();
        (p1, p2, 0)
    };
    let config = dir.join("fw_env.config");
    let text = format!("{} 0x0 {SIZE:#x}\n{} {off2:#x} {SIZE:#x}\n", p1.display(), p2.display());
    fs::write(&config, text).unwrap();
    let loc = EnvLocation {
        primary: EnvCopy { path: p1, offset: 0, size: SIZE },
        redundant: Some(EnvCopy { path: p2, offset: off2, size: SIZE }),
    };
    (loc, config)
}

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}; install libubootenv-tool (ci/setup.sh)"));
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fw_printenv(config: &Path) -> Vec<(String, String)> {
    run("fw_printenv", &["-c", config.to_str().unwrap()])
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn pairs(env: &Env) -> Vec<(String, String)> {
    env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn fw_printenv_reads_our_writes_in_both_copies_across_the_flag_wrap() {
    for one_file in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (loc, config) = location(dir.path(), one_file);
        let store = EnvStore::new(loc);
        let mut env = Env::new();
        env.set("basalt_slot", "a");
        env.set("altbootcmd", "if test \"${basalt_slot}\" = b; then run x; fi; saveenv");
        store.write(&env, None).unwrap();
        assert_eq!(fw_printenv(&config), pairs(&env));
        let mut copies = [0usize; 2];
        let mut wrapped = false;
        for n in 0..300u32 {
            let (read, cur) = store.read().unwrap();
            assert_eq!(read, env, "write {n}");
            env.set("bootcount", n.to_string());
            if n % 2 == 0 {
                env.set("upgrade_available", "1");
            } else {
                env.remove("upgrade_available");
            }
            store.write(&env, Some(cur)).unwrap();
            let (_, now) = store.read().unwrap();
            assert_eq!(now.copy, 1 - cur.copy, "write {n} went to the copy read");
            copies[now.copy] += 1;
            wrapped |= now.flag == 0 && cur.flag == 255;
            // fw_printenv at every write near the start and the wrap.
            if n < 8 || (250..262).contains(&n) || n % 37 == 0 {
                assert_eq!(fw_printenv(&config), pairs(&env), "write {n}, one file: {one_file}");
            }
        }
        assert!(wrapped, "the flag byte never wrapped");
        assert_eq!(copies, [150, 150]);
    }
}

#[test]
fn we_read_what_fw_setenv_writes_in_both_copies_across_the_flag_wrap() {
    for one_file in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (loc, config) = location(dir.path(), one_file);
        let def = dir.path().join("default.env");
        fs::write(&def, "basalt_slot=a\nbootlimit=3\n").unwrap();
        let c = config.to_str().unwrap();
        // No valid copy yet: fw_setenv starts from the default file.
        run("fw_setenv", &["-c", c, "-f", def.to_str().unwrap(), "bootcount", "0"]);
        let store = EnvStore::new(loc);
        let mut seen = [false; 2];
        let mut last: Option<Current> = None;
        for n in 1..=260u32 {
            run("fw_setenv", &["-c", c, "bootcount", &n.to_string()]);
            let (env, cur) = store.read().unwrap();
            assert_eq!(env.get("bootcount"), Some(n.to_string().as_str()), "write {n}");
            assert_eq!(env.get("basalt_slot"), Some("a"));
            assert_eq!(env.get("bootlimit"), Some("3"));
            if let Some(last) = last {
                assert_ne!(cur.copy, last.copy, "fw_setenv write {n}");
            }
            seen[cur.copy] = true;
            last = Some(cur);
        }
        assert_eq!(seen, [true, true]);
        // Taking turns: ours after theirs after ours.
        let (mut env, cur) = store.read().unwrap();
        env.set("upgrade_available", "1");
        store.write(&env, Some(cur)).unwrap();
        run("fw_setenv", &["-c", c, "basalt_slot", "b"]);
        let (env, _) = store.read().unwrap();
        assert_eq!(env.get("upgrade_available"), Some("1"));
        assert_eq!(env.get("basalt_slot"), Some("b"));
        assert_eq!(fw_printenv(&config), pairs(&env));
    }
}

#[test]
fn a_single_copy_environment_has_no_flag_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env");
    fs::write(&path, vec![0u8; SIZE as usize]).unwrap();
    let config = dir.path().join("fw_env.config");
    fs::write(&config, format!("{} 0x0 {SIZE:#x}\n", path.display())).unwrap();
    let store = EnvStore::new(EnvLocation {
        primary: EnvCopy { path: path.clone(), offset: 0, size: SIZE },
        redundant: None,
    });
    let mut env = Env::new();
    env.set("basalt_slot", "b");
    store.write(&env, None).unwrap();
    // The data starts right after the CRC.
    assert_eq!(&fs::read(&path).unwrap()[4..18], b"basalt_slot=b\0");
    assert_eq!(fw_printenv(&config), pairs(&env));
    run("fw_setenv", &["-c", config.to_str().unwrap(), "bootcount", "2"]);
    let (read, cur) = store.read().unwrap();
    assert_eq!(cur, Current { copy: 0, flag: 0 });
    assert_eq!(read.get("bootcount"), Some("2"));
    assert_eq!(read.get("basalt_slot"), Some("b"));
}
