//! The README's first command: `scripts/demo.sh`, the script `make demo` and `make
//! demo-vault` run, with this build's binary, in a temporary directory and on a free port
//! (so it runs beside the other tests and leaves var/demo alone). The story must keep
//! ending in a cross-cluster handshake that openssl verifies.

mod common;

use std::process::Command;

use common::openbao::free_port;
use common::*;

/// Runs the demo for `backend`: it must end well, in a handshake openssl verifies.
fn demo(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/demo.sh"))
        .arg(backend)
        .env("MESHCA", MESHCA)
        .env("MESHCA_DEMO_DIR", dir.path().join("demo"))
        .env("MESHCA_DEMO_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let tail = |s: &str| s.lines().rev().take(60).collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "demo {backend} failed ({}); last lines, newest first:\n{}\nstderr:\n{}",
        out.status,
        tail(&stdout),
        tail(&text(&out.stderr))
    );
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "demo {backend}: no verified handshake in:\n{stdout}"
    );
}

#[test]
fn the_demo_ends_in_a_handshake_across_the_clusters_that_openssl_verifies() {
    demo("pkcs11");
}

#[test]
fn the_vault_demo_ends_in_the_same_handshake() {
    demo("vault");
}
