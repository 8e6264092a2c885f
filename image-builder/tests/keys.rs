//! `basalt keygen`: the files it writes, their modes, that it never
//! overwrites, and that OpenSSL reads the private key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn basalt(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run basalt")
}

#[test]
fn keygen_writes_a_key_pair_openssl_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out = basalt(dir.path(), &["keygen", "--out", "fleet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(basalt_bundle::keys::is_key_id(&key_id), "{key_id:?}");

    let key_path = dir.path().join("fleet.key");
    let pub_path = dir.path().join("fleet.pub");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "fleet.key has mode {mode:o}");

    let key = basalt_bundle::keys::SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(&key_path).unwrap(),
    )
    .unwrap();
    let public =
        basalt_bundle::keys::PublicKey::from_pem(&std::fs::read_to_string(&pub_path).unwrap())
            .unwrap();
    assert_eq!(key.public(), public);
    assert_eq!(public.key_id(), key_id);

    let check = Command::new("openssl")
        .args(["pkey", "-in", "fleet.key", "-noout"])
        .current_dir(dir.path())
        .output()
        .expect("openssl is installed (Debian package openssl)");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let pubout = Command::new("openssl")
        .args(["pkey", "-in", "fleet.key", "-pubout"])
        .current_dir(dir.path())
        .output()
        .expect("openssl is installed");
    assert_eq!(pubout.stdout, std::fs::read(&pub_path).unwrap());

    // A second run must not replace either file.
    let before = std::fs::read(&key_path).unwrap();
    let again = basalt(dir.path(), &["keygen", "--out", "fleet"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&key_path).unwrap(), before);
}

#[test]
fn keygen_refuses_when_only_the_public_file_exists() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k.pub"), "keep me").unwrap();
    let out = basalt(dir.path(), &["keygen", "--out", "k"]);
    assert!(!out.status.success());
    assert!(!dir.path().join("k.key").exists(), "a refused keygen left k.key behind");
    assert_eq!(std::fs::read_to_string(dir.path().join("k.pub")).unwrap(), "keep me");
}
