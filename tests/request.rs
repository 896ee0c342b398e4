//! `meshca request` and `meshca verify` as an operator runs them, and the end of the
//! story: workloads of two clusters complete an mTLS handshake through the shared root
//! (openssl s_server / s_client, the seed guide's own check). Also the signer client that
//! `meshca request` and the agents share, against a stand-in signer whose connections
//! close under a request, and the exit statuses of the commands' usage mistakes.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

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

/// Runs `cmd` with its stdout a pipe whose reading end is already closed: every write fails
/// with EPIPE.
fn assert_ends_quietly_on_a_closed_pipe(cmd: &mut Command) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = cmd
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{cmd:?}: {stderr}");
    assert!(stderr.is_empty(), "{cmd:?}: {stderr}");
}

/// `meshca verify DIR --root ROOT`, ready to run.
fn verify_with_root(
    env: &Env,
    dir: impl AsRef<std::path::Path>,
    root: impl AsRef<std::path::Path>,
) -> std::process::Command {
    let mut cmd = env.meshca();
    cmd.arg("verify")
        .arg(dir.as_ref())
        .arg("--root")
        .arg(root.as_ref());
    cmd
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
    // A first root-cert.pem: istiod must start to take it, as `agent --once` says too.
    assert!(
        stdout.contains("then         restart istiod: root-cert.pem changed"),
        "{stdout}"
    );
    let root_sha256 = meshca::agent::rotation::root_fingerprints(&env.root_pem()).remove(0);
    assert!(
        stdout.contains(&format!("trusts       {root_sha256}")),
        "{stdout}"
    );

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

    let verified = run_ok(&mut verify_with_root(&env, &out, env.path("root-cert.pem")));
    assert!(text(&verified.stdout).contains("is a valid plugged-in CA bundle"));
    // A reader that stops reading (`| head -1`, `| grep -q`) ends it as a SIGPIPE would,
    // quietly; it used to panic with a backtrace and exit 101.
    let mut verify = verify_with_root(&env, &out, env.path("root-cert.pem"));
    assert_ends_quietly_on_a_closed_pipe(&mut verify);
    assert_ends_quietly_on_a_closed_pipe(env.meshca().arg("crds"));
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
    // The same roots: nothing for istiod to restart for.
    assert!(
        !text(&again.stdout).contains("restart istiod"),
        "{}",
        text(&again.stdout)
    );
    // Not assert_ne!: its message would print the private key.
    assert!(
        std::fs::read_to_string(out.join("ca-key.pem")).unwrap() != before,
        "ca-key.pem is the same key as before"
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
fn files_another_tool_wrote_are_replaced_only_with_adopt_and_their_root_kept() {
    let env = Env::new();
    let signer = env.start_signer();
    let out = env.path("cacerts");
    std::fs::create_dir(&out).unwrap();
    let old_root = openssl_self_signed_ca(env.dir.path(), "old", "/O=acme/CN=old root", 0..30);
    let old_root = std::fs::read_to_string(old_root).unwrap();
    for (name, text) in [
        ("ca-cert.pem", "hand made"),
        ("ca-key.pem", "hand made"),
        ("cert-chain.pem", "hand made"),
        ("root-cert.pem", old_root.as_str()),
    ] {
        std::fs::write(out.join(name), text).unwrap();
    }
    let refused = request(&env, signer.addr, "cluster-a", "test/cluster-a", &out, &[]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("not meshca's") && stderr.contains("adopt"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("ca-cert.pem")).unwrap(),
        "hand made"
    );
    assert!(
        signer.audit_lines().is_empty(),
        "nothing asked of the signer"
    );

    let adopted = request(
        &env,
        signer.addr,
        "cluster-a",
        "test/cluster-a",
        &out,
        &["--adopt"],
    );
    assert!(adopted.status.success(), "{}", text(&adopted.stderr));
    let roots = std::fs::read_to_string(out.join("root-cert.pem")).unwrap();
    assert!(
        roots.starts_with(&env.root_pem()) && roots.ends_with(&old_root),
        "{roots}"
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
    let out = run(&mut verify_with_root(&env, &b, other.path("root-cert.pem")));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("expected root"),
        "{}",
        text(&out.stderr)
    );
    // Trusting it (as when it is announced as the next root) is not chaining to it.
    let roots = std::fs::read_to_string(b.join("root-cert.pem")).unwrap();
    std::fs::write(
        b.join("root-cert.pem"),
        format!("{roots}{}", other.root_pem()),
    )
    .unwrap();
    let out = run(&mut verify_with_root(&env, &b, other.path("root-cert.pem")));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("not the expected root"), "{stderr}");
    run_ok(&mut verify_with_root(&env, &b, env.path("root-cert.pem")));
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
    let reviews = Workload::issue(env.dir.path(), &a, "reviews");
    let ratings = Workload::issue(env.dir.path(), &b, "ratings");
    mtls_handshake(env.dir.path(), &ratings, &reviews).assert_ok();
}

/// How the stand-in ends a connection under a request.
#[derive(Clone, Copy, Debug)]
enum Close {
    /// TLS close_notify, then FIN: what the signer's graceful close of a kept-alive
    /// connection sends.
    Graceful,
    /// A TCP reset with no close_notify: what a peer that closes with unread bytes (or a
    /// middlebox) sends.
    Reset,
    /// FIN with no close_notify: a connection cut short under TLS.
    Cut,
}

/// A stand-in signer over real mTLS that answers `answers_per_connection` requests on each
/// connection, then reads the next one and closes without answering: what the signer does
/// to its kept-alive connections when its TLS settings change. Records every request it
/// read as (connection number, request line, body).
struct ClosingSigner {
    addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(usize, String, String)>>>,
}

/// An answer both `policy` and `sign` accept (each ignores the other's fields; both
/// read `rootCert`, which the policy checks against its `rootFingerprintSha256`: a root
/// made once in `pki` stands in for the mesh's; the transport CA cannot, having no room
/// for intermediates).
fn stand_in_answer(pki: &Path) -> String {
    let made = pki.join("stand-in-root.pem");
    if !made.exists() {
        openssl_self_signed_ca(
            pki,
            "stand-in-root",
            "/O=meshca-test/CN=stand-in root",
            -1..30,
        );
    }
    let root =
        meshca::pki::profile::RootCa::from_pem(&std::fs::read_to_string(made).unwrap()).unwrap();
    serde_json::json!({
        "virtualMesh": "test/vm", "orgName": "meshca-test", "maxTtlSeconds": 3600,
        "minRsaBits": 2048, "acceptedKeyTypes": ["ecdsa_p256"], "meshes": [],
        "rootNotAfter": "2030-01-01T00:00:00Z", "certificate": "c", "certChain": "cc",
        "rootCert": root.pem, "rootFingerprintSha256": root.fingerprint_sha256,
        "serial": "01", "notAfter": "2030-01-01T00:00:00Z"
    })
    .to_string()
}

impl ClosingSigner {
    async fn start(pki: &Path, answers_per_connection: usize, close: Close) -> ClosingSigner {
        use tokio::io::AsyncWriteExt;
        let tls = meshca::tlsutil::server_config(
            &pki.join("signer.pem"),
            &pki.join("signer.key"),
            &pki.join("ca.pem"),
            &[],
            meshca::tlsutil::CrlOverdue::Accept,
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls.config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let stand_in = std::sync::Arc::new(stand_in_answer(pki));
        tokio::spawn(async move {
            for connection in 0.. {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    continue;
                };
                let record = record.clone();
                let stand_in = stand_in.clone();
                tokio::spawn(async move {
                    for answered in 0.. {
                        let Some((line, body)) = read_request(&mut stream).await else {
                            return;
                        };
                        record.lock().unwrap().push((connection, line, body));
                        if answered == answers_per_connection {
                            match close {
                                Close::Graceful => {
                                    let _ = stream.shutdown().await;
                                }
                                Close::Reset => {
                                    let _ = stream.get_ref().0.set_zero_linger();
                                }
                                Close::Cut => {
                                    let _ = stream.get_mut().0.shutdown().await;
                                }
                            }
                            return;
                        }
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\n\r\n{stand_in}",
                            stand_in.len()
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ClosingSigner { addr, seen }
    }

    fn seen(&self) -> Vec<(usize, String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

/// One HTTP/1.1 request's line and body, or None when the connection ends first.
async fn read_request(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Option<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
    let line = head.lines().next().unwrap_or_default().to_string();
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    Some((line, body))
}

/// The transport PKI alone (no token): a CA, the stand-in's server pair and one client.
fn transport_pki(dir: &Path) {
    let script = repo().join("scripts/transport-pki.sh");
    run_ok(Command::new(&script).arg("ca").arg(dir));
    run_ok(Command::new(&script).arg("server").arg(dir).arg("signer"));
    run_ok(
        Command::new(&script)
            .args(["client"])
            .arg(dir)
            .args(["cluster-a", &identity("cluster-a")]),
    );
}

fn signer_client(pki: &Path, addr: SocketAddr) -> meshca::agent::client::SignerClient {
    meshca::agent::client::SignerClient::new(
        &format!("https://{addr}"),
        &pki.join("ca.pem"),
        &pki.join("cluster-a.pem"),
        &pki.join("cluster-a.key"),
    )
    .unwrap()
}

#[tokio::test]
async fn a_request_whose_kept_alive_connection_closes_under_it_is_sent_once_more() {
    let dir = tempfile::tempdir().unwrap();
    transport_pki(dir.path());
    for close in [Close::Graceful, Close::Reset, Close::Cut] {
        every_call_after_the_first_meets_a_closed_connection(dir.path(), close).await;
    }
}

async fn every_call_after_the_first_meets_a_closed_connection(pki: &Path, close: Close) {
    // Each connection answers one request and closes under the next, so every call after
    // the first meets a closed connection (the race a signer's TLS reload opens).
    let signer = ClosingSigner::start(pki, 1, close).await;
    let client = signer_client(pki, signer.addr);
    let vm: meshca::policy::ObjectRef = "test/vm".parse().unwrap();
    let body = meshca::agent::client::SignRequestBody {
        virtual_mesh: "test/vm".into(),
        mesh: "test/cluster-a".into(),
        csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        ttl_seconds: Some(3600),
    };

    let first = client
        .policy(&vm)
        .await
        .unwrap_or_else(|e| panic!("{close:?}: first policy read: {e}"));
    assert_eq!(first.org_name, "meshca-test");
    let again = client
        .policy(&vm)
        .await
        .unwrap_or_else(|e| panic!("{close:?}: policy read on a closed connection: {e}"));
    assert_eq!(again, first);
    let signed = client
        .sign(&body)
        .await
        .unwrap_or_else(|e| panic!("{close:?}: sign on a closed connection: {e}"));
    assert_eq!(signed.serial, "01");
    client
        .trust_bundle()
        .await
        .unwrap_or_else(|e| panic!("{close:?}: bundle on a closed connection: {e}"));

    let seen = signer.seen();
    let policy_line = "GET /v1/virtualmeshes/test/vm HTTP/1.1";
    let expected = [
        (0, policy_line),
        (0, policy_line),
        (1, policy_line),
        (1, "POST /v1/sign HTTP/1.1"),
        (2, "POST /v1/sign HTTP/1.1"),
        (2, "GET /v1/trust-bundle HTTP/1.1"),
        (3, "GET /v1/trust-bundle HTTP/1.1"),
    ];
    let got: Vec<(usize, &str)> = seen.iter().map(|(c, l, _)| (*c, l.as_str())).collect();
    assert_eq!(got, expected, "{close:?}");
    // The signing request sent again is the same request, CSR and all.
    assert!(
        seen[3].2.contains("BEGIN CERTIFICATE REQUEST"),
        "{}",
        seen[3].2
    );
    assert_eq!(seen[3].2, seen[4].2, "{close:?}");
}

#[tokio::test]
async fn a_signer_that_closes_every_connection_unanswered_is_tried_twice_then_named() {
    let dir = tempfile::tempdir().unwrap();
    transport_pki(dir.path());
    let signer = ClosingSigner::start(dir.path(), 0, Close::Graceful).await;
    let client = signer_client(dir.path(), signer.addr);
    let vm: meshca::policy::ObjectRef = "test/vm".parse().unwrap();
    let err = client.policy(&vm).await.expect_err("no answer ever comes");
    let message = err.to_string();
    let url = format!("https://{}/v1/virtualmeshes/test/vm", signer.addr);
    assert!(
        message.starts_with(&format!("cannot reach the signer at {url}: ")),
        "{message}"
    );
    assert!(
        message.ends_with(": connection closed before message completed"),
        "{message}"
    );
    assert_eq!(message.matches(&url).count(), 1, "{message}");
    // Once more, not a loop: two connections, one request each.
    let seen = signer.seen();
    let connections: Vec<usize> = seen.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(connections, [0, 1], "{seen:?}");
}

/// The client flags every `meshca request` and `meshca agent` needs (files never read:
/// usage mistakes are found before).
const TLS: [&str; 6] = [
    "--ca-cert",
    "ca.pem",
    "--client-cert",
    "client.pem",
    "--client-key",
    "client-key.pem",
];

/// What directory mode needs besides `--target-dir DIR` and [`TLS`].
const DIRECTORY: [&str; 7] = [
    "agent",
    "--target-dir",
    "cacerts",
    "--virtual-mesh",
    "test/vm",
    "--mesh",
    "test/cluster-a",
];

/// Exit statuses as the README's table gives them: 2 for a usage mistake, found by clap
/// or only from the flags together, in clap's words and naming the flag; 1 for a failure
/// at run time, naming the file.
#[test]
fn usage_mistakes_exit_2_naming_the_flag_and_runtime_failures_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a-directory")).unwrap();
    let signer = ["--signer", "https://signer.example:8443"];
    let directory = || [&DIRECTORY[..], &TLS, &signer].concat();
    let with = |extra: &[&'static str]| [directory(), extra.to_vec()].concat();
    let cases: Vec<(Vec<&str>, i32, &[&str])> = vec![
        (
            with(&["--renew-fraction", "2"]),
            2,
            &[
                "'--renew-fraction <RENEW_FRACTION>'",
                "between 0.1 and 0.95",
            ],
        ),
        (
            with(&["--jitter-fraction", "1"]),
            2,
            &["'--jitter-fraction <JITTER_FRACTION>'", "between 0 and 0.5"],
        ),
        (
            with(&["--renew-fraction", "0.3", "--jitter-fraction", "0.4"]),
            2,
            &["--jitter-fraction must be", "below --renew-fraction"],
        ),
        (
            with(&["--ttl-seconds", "60"]),
            2,
            &["a --ttl-seconds of 60 s is too short", "--renew-fraction"],
        ),
        (
            [&DIRECTORY[..], &TLS, &["--signer", "notaurl"]].concat(),
            2,
            &["'--signer <SIGNER>'", "must start with https://"],
        ),
        (
            [&["request"][..], &TLS, &["--signer", "https://"]]
                .concat()
                .into_iter()
                .chain(["--virtual-mesh", "a/b", "--mesh", "a/c", "--out-dir", "o"])
                .collect(),
            2,
            &["'--signer <SIGNER>'", "host"],
        ),
        (
            [&["agent", "--target-dir", "cacerts"][..], &TLS].concat(),
            2,
            &["required arguments were not provided", "--signer", "--mesh"],
        ),
        (
            [
                &["agent", "--once", "--metrics-listen", "127.0.0.1:0"][..],
                &TLS,
            ]
            .concat(),
            2,
            &["'--once' cannot be used with '--metrics-listen <ADDR>'"],
        ),
        (
            vec![
                "mesh-controller",
                "--once",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            2,
            &["'--once' cannot be used with '--metrics-listen <ADDR>'"],
        ),
        (vec!["verify"], 2, &["<DIR>"]),
        (vec!["serve"], 2, &["--config <CONFIG>"]),
        (vec!["verify", "missing"], 1, &["missing/ca-cert.pem"]),
        (
            vec!["root", "show", "--config", "missing.toml"],
            1,
            &["cannot read missing.toml"],
        ),
        (
            vec!["audit", "verify", "a-directory"],
            1,
            &[
                "audit log a-directory: cannot read line 1",
                "Is a directory",
            ],
        ),
    ];
    for (args, status, says) in cases {
        let mut cmd = Command::new(MESHCA);
        cmd.current_dir(dir.path()).args(&args);
        let out = run(&mut cmd);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{args:?}: {stderr}");
        for said in says {
            assert!(stderr.contains(said), "{args:?}: {stderr}");
        }
        if status == 2 {
            assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        }
    }
    // "missing.toml: cannot read missing.toml" said the path twice.
    let out = run(Command::new(MESHCA).current_dir(dir.path()).args([
        "root",
        "show",
        "--config",
        "missing.toml",
    ]));
    assert_eq!(text(&out.stderr).matches("missing.toml").count(), 1);
}

/// A FIFO where a certificate should be would hold `meshca verify` until something wrote
/// to it; it is named and refused without being opened.
#[test]
fn verify_refuses_a_fifo_in_place_of_a_file_unopened() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("ca-cert.pem");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    // Feeds a reader that opens it, so a verify that does fails rather than hangs.
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut pipe = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            let _ = pipe.write_all(b"not a certificate\n");
        })
    };
    let out = run(Command::new(MESHCA).arg("verify").arg(dir.path()));
    let stderr = text(&out.stderr);
    // Lets the writer's open return if verify never opened the FIFO.
    let _reader = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap()
    };
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: a FIFO (named pipe), not a regular file",
            fifo.display()
        )),
        "{stderr}"
    );
}
