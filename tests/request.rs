//! `meshca request` and `meshca verify` as an operator runs them, and the end of the
//! story: workloads of two clusters complete an mTLS handshake through the shared root
//! (openssl s_server / s_client, the seed guide's own check).

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::certs::*;
use common::*;

/// `meshca request` to the signer at `addr` as `client`, for `mesh` of test/vm.
fn request(
    env: &Env,
    addr: SocketAddr,
    client: &str,
    mesh: &str,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    run(env
        .meshca()
        .arg("request")
        .args(env.signer_flags(addr, client))
        .args(["--virtual-mesh", "test/vm", "--mesh", mesh, "--out-dir"])
        .arg(out)
        .args(extra))
}

#[test]
fn request_writes_a_bundle_that_verify_and_openssl_accept() {
    let env = Env::new();
    let signer = env.start_signer();
    let out = env.path("clusters/a/cacerts");
    let result = request(&env, signer.addr, "cluster-a", "test/cluster-a", &out, &[]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let stdout = text(&result.stdout);
    assert!(stdout.contains("ecdsa-p256"), "{stdout}");

    for name in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let key_mode = std::fs::metadata(out.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    assert_eq!(
        std::fs::read_to_string(out.join("root-cert.pem")).unwrap(),
        env.root_pem()
    );

    let verified = run_ok(
        env.meshca()
            .arg("verify")
            .arg(&out)
            .arg("--root")
            .arg(env.path("root-cert.pem")),
    );
    assert!(text(&verified.stdout).contains("is a valid plugged-in CA bundle"));
    let openssl_out = openssl_verify_bundle(&out);
    assert!(openssl_out.contains("OK"), "{openssl_out}");
    // The key on disk is the key in the certificate (openssl's view).
    let cert_key = openssl(&out, &["x509", "-in", "ca-cert.pem", "-noout", "-pubkey"]);
    let file_key = openssl(&out, &["pkey", "-in", "ca-key.pem", "-pubout"]);
    assert_eq!(cert_key, file_key);

    // Asking again replaces the set as a whole with a new key and certificate.
    let before = std::fs::read_to_string(out.join("ca-key.pem")).unwrap();
    let again = request(
        &env,
        signer.addr,
        "cluster-a",
        "test/cluster-a",
        &out,
        &["--key-type", "rsa2048", "--ttl-seconds", "86400"],
    );
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_ne!(
        std::fs::read_to_string(out.join("ca-key.pem")).unwrap(),
        before
    );
    run_ok(env.meshca().arg("verify").arg(&out));
    let text_out = openssl(&out, &["x509", "-in", "ca-cert.pem", "-noout", "-text"]);
    assert!(text_out.contains("Public-Key: (2048 bit)"), "{text_out}");
}

#[test]
fn a_refused_request_exits_non_zero_with_the_signers_message_and_writes_nothing() {
    let env = Env::new();
    let signer = env.start_signer();
    let out = env.path("clusters/b/cacerts");
    let result = request(&env, signer.addr, "cluster-b", "test/cluster-a", &out, &[]);
    assert!(!result.status.success());
    let stderr = text(&result.stderr);
    assert!(stderr.contains("403 not_authorized"), "{stderr}");
    assert!(stderr.contains("is not authorized"), "{stderr}");
    assert!(!out.join("ca-cert.pem").exists());

    // A key type the policy does not accept is refused before anything is generated.
    let strict = Env::with(EnvSpec {
        virtual_meshes: vec![virtual_mesh(
            "test",
            "vm",
            30,
            4096,
            "acme",
            &["test/cluster-a"],
        )],
        clients: vec![(
            identity("cluster-a"),
            vec![("test/vm".into(), "test/cluster-a".into())],
        )],
        ..EnvSpec::default()
    });
    let strict_signer = strict.start_signer();
    let result = request(
        &strict,
        strict_signer.addr,
        "cluster-a",
        "test/cluster-a",
        &out,
        &["--key-type", "ecdsa-p256"],
    );
    assert!(!result.status.success());
    assert!(
        text(&result.stderr).contains("accepted: rsa4096, ecdsa-p384"),
        "{}",
        text(&result.stderr)
    );
    assert!(strict_signer.audit_lines().is_empty());
}

#[test]
fn an_unreachable_signer_leaves_existing_files_untouched() {
    let env = Env::new();
    let signer = env.start_signer();
    let out = env.path("cacerts");
    assert!(
        request(&env, signer.addr, "cluster-a", "test/cluster-a", &out, &[])
            .status
            .success()
    );
    let before = std::fs::read_to_string(out.join("ca-cert.pem")).unwrap();
    let addr = signer.addr;
    drop(signer);
    let result = request(&env, addr, "cluster-a", "test/cluster-a", &out, &[]);
    assert!(!result.status.success());
    assert!(
        text(&result.stderr).contains("cannot reach the signer"),
        "{}",
        text(&result.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("ca-cert.pem")).unwrap(),
        before
    );
}

#[test]
fn verify_rejects_a_bundle_istiod_would_reject() {
    let env = Env::new();
    let signer = env.start_signer();
    let a = env.path("a");
    let b = env.path("b");
    assert!(
        request(&env, signer.addr, "cluster-a", "test/cluster-a", &a, &[])
            .status
            .success()
    );
    assert!(
        request(&env, signer.addr, "cluster-b", "test/cluster-b", &b, &[])
            .status
            .success()
    );
    // Swap in the other cluster's key: the key no longer matches the certificate.
    std::fs::remove_file(a.join("ca-key.pem")).unwrap();
    std::fs::copy(b.join("ca-key.pem"), a.join("ca-key.pem")).unwrap();
    let out = run(env.meshca().arg("verify").arg(&a));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not match"),
        "{}",
        text(&out.stderr)
    );

    // A root from elsewhere is not the expected root.
    let other = Env::new();
    let out = run(env
        .meshca()
        .arg("verify")
        .arg(&b)
        .arg("--root")
        .arg(other.path("root-cert.pem")));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("expected root"),
        "{}",
        text(&out.stderr)
    );
}

/// Issues a workload certificate from a cluster's intermediate, as istiod would.
fn workload(dir: &Path, cacerts: &Path, name: &str, spiffe: &str) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let cert = format!("{name}.pem");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/",
        ],
    );
    let ext = write(
        dir,
        &format!("{name}.ext"),
        &format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:{spiffe}\n"
        ),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            cacerts.join("ca-cert.pem").to_str().unwrap(),
            "-CAkey",
            cacerts.join("ca-key.pem").to_str().unwrap(),
            "-set_serial",
            "0x4a1b2c3d4e5f",
            "-days",
            "1",
            "-sha256",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            &cert,
        ],
    );
}

#[test]
fn workloads_of_two_clusters_complete_mtls_through_the_shared_root() {
    let env = Env::new();
    let signer = env.start_signer();
    let a = env.path("clusters/a/cacerts");
    let b = env.path("clusters/b/cacerts");
    assert!(
        request(&env, signer.addr, "cluster-a", "test/cluster-a", &a, &[])
            .status
            .success()
    );
    assert!(
        request(
            &env,
            signer.addr,
            "cluster-b",
            "test/cluster-b",
            &b,
            &["--key-type", "rsa3072"]
        )
        .status
        .success()
    );
    let dir = env.dir.path();
    workload(
        dir,
        &a,
        "reviews",
        "spiffe://cluster.local/ns/default/sa/reviews",
    );
    workload(
        dir,
        &b,
        "ratings",
        "spiffe://cluster.local/ns/default/sa/ratings",
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The server trusts only cluster b's root-cert.pem; the client only cluster a's. Its
    // stdin stays open while it serves (s_server stops at the end of its input).
    // `timeout` bounds both openssl processes: neither may hang the suite.
    let mut server = Command::new("timeout")
        .current_dir(dir)
        .args([
            "30",
            "openssl",
            "s_server",
            "-quiet",
            "-accept",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["-cert", "ratings.pem", "-key", "ratings.key"])
        .arg("-cert_chain")
        .arg(b.join("cert-chain.pem"))
        .arg("-CAfile")
        .arg(b.join("root-cert.pem"))
        .args(["-Verify", "3", "-verify_return_error"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "s_server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut client = Command::new("timeout")
        .current_dir(dir)
        .args([
            "30",
            "openssl",
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-showcerts",
        ])
        .args(["-cert", "reviews.pem", "-key", "reviews.key"])
        .arg("-cert_chain")
        .arg(a.join("cert-chain.pem"))
        .arg("-CAfile")
        .arg(a.join("root-cert.pem"))
        .arg("-verify_return_error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = client.stdin.take().unwrap();
        stdin.write_all(b"hello from reviews\n").unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    let client_out = client.wait_with_output().unwrap();
    // s_server writes what it received as it arrives (unbuffered); once the line is there
    // (or s_server ended), stop it (`timeout` passes SIGTERM on to openssl).
    let server_text = read_until(server.stdout.take().unwrap(), "hello from reviews");
    send_signal(server.id(), "TERM");
    let server_out = server.wait_with_output().unwrap();
    let client_text = text(&client_out.stdout);
    assert!(
        client_text.contains("Verify return code: 0 (ok)"),
        "client:\n{client_text}\n{}",
        text(&client_out.stderr)
    );
    assert!(
        server_text.contains("hello from reviews"),
        "server:\n{server_text}\n{}",
        text(&server_out.stderr)
    );
}

/// Everything `output` gives until it contains `needle` or ends. Reads on a thread that
/// is left behind, so a process keeping its output open cannot hang the caller once the
/// needle is there.
fn read_until(mut output: impl std::io::Read + Send + 'static, needle: &str) -> String {
    let (chunks, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = output.read(&mut buf) {
            if chunks.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(needle) {
        match received.recv() {
            Ok(chunk) => seen.extend(chunk),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}
