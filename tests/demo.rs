//! The README's first command: `scripts/demo.sh`, the script `make demo` and `make
//! demo-vault` run, with this build's binary, in a temporary directory and on a free port
//! (so it runs beside the other tests and leaves var/demo alone). The story must keep
//! ending in a cross-cluster handshake that openssl verifies. Also what the two commands
//! refuse before doing anything: a Rust too old for the crate (`scripts/install-deps.sh`),
//! a demo directory a running signer still uses.

mod common;

use std::process::Command;

use common::openbao::free_port;
use common::*;

/// Runs the demo for `backend`: it must end well, in a handshake openssl verifies.
fn demo(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    // meshca through a wrapper that notes the names (never the values) in each meshca
    // process's environment: the demo's root token must reach bao alone.
    let names = dir.path().join("environment-names");
    let wrapper = dir.path().join("meshca");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nenv | cut -d= -f1 >> '{}'\nexec '{MESHCA}' \"$@\"\n",
            names.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(repo().join("scripts/demo.sh"))
        .arg(backend)
        .env("MESHCA", &wrapper)
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
    let names = std::fs::read_to_string(&names).unwrap();
    assert!(names.lines().any(|n| n == "PATH"), "the wrapper never ran");
    for secret in ["BAO_TOKEN", "VAULT_TOKEN", "BAO_DEV_ROOT_TOKEN_ID"] {
        assert!(
            !names.lines().any(|n| n == secret),
            "demo {backend}: a meshca process had {secret} in its environment"
        );
    }
}

#[test]
fn the_demo_ends_in_a_handshake_across_the_clusters_that_openssl_verifies() {
    demo("pkcs11");
}

#[test]
fn the_vault_demo_ends_in_the_same_handshake() {
    demo("vault");
}

#[test]
fn install_deps_refuses_a_rust_older_than_the_crate_needs_before_anything_else() {
    // A distribution's cargo (Debian 12 ships 1.63): found first on PATH.
    let bin = tempfile::tempdir().unwrap();
    let rustc = bin.path().join("rustc");
    std::fs::write(
        &rustc,
        "#!/bin/sh\necho 'rustc 1.63.0 (4b91a6ea7 2022-08-08)'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rustc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(repo().join("scripts/install-deps.sh"))
        .env("PATH", path)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs Rust 1.89 or later, found 1.63.0")
            && stderr.contains("rustup update stable"),
        "{stderr}"
    );
    // Said before anything was installed or even looked for.
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
}

#[test]
fn the_demo_refuses_to_start_over_under_a_signer_still_running_from_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    std::fs::create_dir(&demo_dir).unwrap();
    let audit = demo_dir.join("audit.log");
    std::fs::write(&audit, "").unwrap();
    // The lock a signer holds on its audit log while it runs.
    let file = std::fs::File::open(&audit).unwrap();
    file.try_lock().unwrap();
    let out = Command::new(repo().join("scripts/demo.sh"))
        .env("MESHCA", MESHCA)
        .env("MESHCA_DEMO_DIR", &demo_dir)
        .env("MESHCA_DEMO_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("a signer still uses") && stderr.contains("stop it"),
        "{stderr}"
    );
    assert!(audit.exists(), "the directory was deleted under the signer");
    drop(file);
}
