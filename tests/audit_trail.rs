//! What the audit trail gives an incident: each decision's line names the TCP peer the
//! request came from (a stolen client key used from another host names the same client
//! and certificate as its agent), issuance is counted per client, and the audit log's
//! head reaches the signer's log whatever its `--log-level`.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshca::pki::keys::KeyType;
use serde_json::Value;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A signing request over a connection of its own, made here so that its local address
/// is known: that address, and the answer's status.
async fn sign_over_own_connection(
    env: &Env,
    signer: SocketAddr,
    client: &str,
    mesh: &str,
) -> (SocketAddr, u16) {
    let config = meshca::tlsutil::client_config(
        &env.path("pki/ca.pem"),
        &env.path(&format!("pki/{client}.pem")),
        &env.path(&format!("pki/{client}.key")),
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(signer).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let server_name = rustls_pki_types::ServerName::IpAddress(signer.ip().into());
    let mut tls = connector.connect(server_name, tcp).await.unwrap();
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let body = serde_json::to_vec(&sign_body("test/vm", mesh, &csr)).unwrap();
    let head = format!(
        "POST /v1/sign HTTP/1.1\r\nHost: meshca\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    // The signer closes the connection after its answer (Connection: close); how it
    // ends the TLS session does not matter once the answer is in.
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer}"));
    (local, status)
}

/// The decision line of the request whose answer came back: written before the answer.
fn decision_line(signer: &Signer, client: &str, rule: &str) -> Value {
    signer
        .audit_lines()
        .into_iter()
        .find(|l| l["client"] == identity(client) && l["rule"] == rule)
        .unwrap_or_else(|| panic!("no {rule} line for {client}: {:?}", signer.audit_lines()))
}

#[tokio::test]
async fn each_decision_names_the_peer_it_came_from_and_issuance_is_counted_per_client() {
    let env = Env::new();
    let signer = env.start_signer();
    let (issued_from, status) =
        sign_over_own_connection(&env, signer.addr, "cluster-a", "test/cluster-a").await;
    assert_eq!(status, 200);
    // cluster-a's key asking for cluster-b's mesh: refused, from another connection.
    let (denied_from, status) =
        sign_over_own_connection(&env, signer.addr, "cluster-a", "test/cluster-b").await;
    assert_eq!(status, 403);
    assert_ne!(issued_from, denied_from);

    let issued = decision_line(&signer, "cluster-a", "issued");
    assert_eq!(issued["peer"], issued_from.to_string(), "{issued}");
    assert!(
        issued["peer"]
            .as_str()
            .is_some_and(|peer| peer.starts_with("127.0.0.1:")),
        "{issued}"
    );
    let denied = decision_line(&signer, "cluster-a", "not_authorized");
    assert_eq!(denied["peer"], denied_from.to_string(), "{denied}");
    // The signer's own line about the refusal names it too.
    let refused = signer.wait_for_log("refused signing request").await;
    let refused: Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["peer"], denied_from.to_string(), "{refused}");
    // Lines that are no request's carry none.
    let start = &signer.all_audit_lines()[0];
    assert_eq!(start["event"], "start");
    assert!(start.get("peer").is_none(), "{start}");

    // Issuance per client, every configured client from 0: a first issuance shows in
    // increase(). The refusal counts nothing.
    let metrics = signer.metrics(&env.client("cluster-a")).await;
    let issued_to = |client: &str| {
        metric_sample(
            &metrics,
            &format!(
                "meshca_intermediates_issued_total{{client=\"{}\",virtual_mesh=\"test/vm\"}}",
                identity(client)
            ),
        )
    };
    assert_eq!(issued_to("cluster-a"), Some(1), "{metrics}");
    assert_eq!(issued_to("cluster-b"), Some(0), "{metrics}");
    env.audit_verify_ok();
}

/// Waits (at most 60 s) until the signer at `addr` answers `/healthz`; fails with its log
/// if it exits first.
async fn wait_until_serving(env: &Env, child: &mut std::process::Child, addr: &str, log: &str) {
    let client = env.client("cluster-a");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(answer) = client.get(format!("https://{addr}/healthz")).send().await
            && answer.status() == 200
        {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the signer exited ({status}):\n{}",
                std::fs::read_to_string(env.path(log)).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the signer did not serve within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `meshca audit verify --expect-hash` needs the `audit log head` line from the signer's
/// log: a log level that drops info lines (`--log-level warn`, `RUST_LOG=error`) keeps that
/// one, and only that one.
#[tokio::test]
async fn the_audit_log_head_is_logged_whatever_the_log_level() {
    let env = Env::new();
    for (run, flag, rust_log) in [("warn", Some("warn"), None), ("error", None, Some("error"))] {
        // The harness finds a signer's port in its info line "signer listening", which
        // these levels drop: this one listens where it is told.
        let addr = closed_addr();
        let log = format!("signer-{run}.log");
        let mut command: Command = env.meshca();
        command
            .env_remove("RUST_LOG")
            .args(["--log-format", "json"]);
        if let Some(level) = flag {
            command.args(["--log-level", level]);
        }
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let mut child = command
            .args(["serve", "--config"])
            .arg(&env.config)
            .args(["--listen", &addr])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.path(&log)).unwrap())
            .spawn()
            .unwrap();
        wait_until_serving(&env, &mut child, &addr, &log).await;
        let answer = env
            .client("cluster-a")
            .post(format!("https://{addr}/v1/sign"))
            .json(&sign_body(
                "test/vm",
                "test/cluster-a",
                &csr(KeyType::EcdsaP256, "acme", "a").1,
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{run}");
        send_signal(child.id(), "TERM");
        let status = wait_within(&mut child, EXIT_WAIT).expect("the signer exits on SIGTERM");
        assert!(status.success(), "{run}: {status}");

        let logged = std::fs::read_to_string(env.path(&log)).unwrap();
        let lines: Vec<Value> = logged
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let is_head = |l: &Value| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("audit log head"))
        };
        let heads: Vec<&Value> = lines.iter().filter(|l| is_head(l)).collect();
        // Every other info line stays out.
        let other_info: Vec<&Value> = lines
            .iter()
            .filter(|l| l["level"] == "INFO" && !is_head(l))
            .collect();
        assert!(other_info.is_empty(), "{run}: {other_info:?}");
        // At the stop, after the stop record: the last line, after the issuance.
        let audit = std::fs::read_to_string(env.path("audit.log")).unwrap();
        let last = audit.lines().last().unwrap();
        assert!(last.contains("\"event\":\"stop\""), "{last}");
        let last_hash = meshca::pki::csr::hex(&sha2::Sha256::digest(last.as_bytes()));
        let head = heads
            .last()
            .unwrap_or_else(|| panic!("{run}: no audit log head line in:\n{logged}"));
        assert_eq!(head["level"], "INFO", "{head}");
        assert_eq!(head["last_hash"], last_hash.as_str(), "{run}: {head}");
        let verified = run_ok(env.meshca().args([
            "audit",
            "verify",
            "audit.log",
            "--expect-hash",
            &last_hash,
        ]));
        assert!(text(&verified.stdout).contains("is intact"), "{verified:?}");
    }
}

/// SHA-256 of the first PEM block of `label` in `path`, as the audit log names it.
fn pem_sha256(path: &std::path::Path, label: &str) -> String {
    let pem = std::fs::read_to_string(path).unwrap();
    let der = meshca::pki::pem::decode_single(&pem, &[label]).unwrap_or_else(|e| {
        panic!("{}: {e}", path.display());
    });
    meshca::pki::csr::hex(&sha2::Sha256::digest(&der))
}

/// The audit log's `tls_reload` records.
fn tls_reloads(signer: &Signer) -> Vec<Value> {
    signer
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "tls_reload")
        .collect()
}

/// Which client CAs and CRLs a decision was checked against is on record: the start names
/// the transport trust in force, a SIGHUP that changes it records what changed (one line),
/// one that changes nothing records nothing, one that fails records why (not the key).
#[tokio::test]
async fn the_transport_trust_is_on_record_from_the_start_and_at_each_change() {
    let env = Env::new();
    let mut signer = env.start_signer();
    let start = signer.all_audit_lines()[0].clone();
    assert_eq!(start["event"], "start");
    let tls = &start["tls"];
    let ca_sha256 = pem_sha256(&env.path("pki/ca.pem"), "CERTIFICATE");
    assert_eq!(tls["clientCas"].as_array().unwrap().len(), 1, "{tls}");
    assert_eq!(tls["clientCas"][0]["sha256"], ca_sha256.as_str(), "{tls}");
    assert!(
        tls["clientCas"][0]["subject"]
            .as_str()
            .is_some_and(|s| s.contains("CN=meshca transport CA")),
        "{tls}"
    );
    let server_sha256 = pem_sha256(&env.path("pki/signer.pem"), "CERTIFICATE");
    assert_eq!(tls["serverCertificate"]["sha256"], server_sha256.as_str());
    assert!(tls["serverCertificate"]["notAfter"].is_string(), "{tls}");
    assert_eq!(tls["clientCrls"], serde_json::json!([]), "{tls}");
    assert_eq!(tls["clientCrlOverdue"], "accept", "{tls}");

    // A second client CA in the bundle and a CRL in client_crls, at one SIGHUP.
    let other = env.path("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    let other_ca = common::certs::openssl_self_signed_ca(
        &other,
        "ca",
        "/O=meshca demo/CN=another transport CA",
        0..30,
    );
    let bundle = std::fs::read_to_string(env.path("pki/ca.pem")).unwrap()
        + &std::fs::read_to_string(&other_ca).unwrap();
    std::fs::write(env.path("pki/ca.pem"), bundle).unwrap();
    env.check_client_crls();
    let other_sha256 = pem_sha256(&other_ca, "CERTIFICATE");
    let crl_sha256 = pem_sha256(&env.path("pki/crl.pem"), "X509 CRL");
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_log("SIGHUP: TLS settings reloaded").await;
    let reloads = tls_reloads(&signer);
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    let reload = &reloads[0];
    assert_eq!(reload["rule"], "tls_changed", "{reload}");
    let change = &reload["tlsChange"];
    assert_eq!(change["clientCasAdded"][0]["sha256"], other_sha256.as_str());
    assert!(
        change["clientCasAdded"][0]["subject"]
            .as_str()
            .is_some_and(|s| s.contains("CN=another transport CA")),
        "{change}"
    );
    assert_eq!(change["clientCrlsAdded"][0]["sha256"], crl_sha256.as_str());
    assert!(
        change["clientCrlsAdded"][0]["crlNumber"].is_string(),
        "{change}"
    );
    assert!(change.get("clientCasRemoved").is_none(), "{change}");
    assert!(change.get("serverCertificate").is_none(), "{change}");
    // And the trust in force from then on, in full.
    assert_eq!(reload["tls"]["clientCas"].as_array().unwrap().len(), 2);
    assert!(
        reload["message"]
            .as_str()
            .is_some_and(|m| m.contains(&other_sha256) && m.contains(&crl_sha256)),
        "{reload}"
    );

    // Nothing changed: nothing recorded.
    send_signal(signer.child.id(), "HUP");
    signer
        .wait_for_log("TLS files read again, nothing in them changed")
        .await;
    signer.wait_for_nth_log("SIGHUP: rules", 2).await;
    assert_eq!(tls_reloads(&signer).len(), 1, "{:?}", tls_reloads(&signer));

    // A key that is not the certificate's: not reloaded, recorded with the problem, and
    // nothing of the key in the log.
    let key = env.path("pki/signer.key");
    let in_force = std::fs::read(&key).unwrap();
    run_ok(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-out", key.to_str().unwrap()]),
    );
    let wrong = std::fs::read_to_string(&key).unwrap();
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_log("TLS settings not reloaded").await;
    let reloads = tls_reloads(&signer);
    assert_eq!(reloads.len(), 2, "{reloads:?}");
    assert_eq!(reloads[1]["rule"], "tls_reload_failed", "{}", reloads[1]);
    assert!(
        reloads[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pki/signer.key")),
        "{}",
        reloads[1]
    );
    let audit = std::fs::read_to_string(env.path("audit.log")).unwrap();
    for line in wrong.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!audit.contains(line), "the key is in the audit log");
    }
    std::fs::write(&key, in_force).unwrap();
    assert!(signer.terminate());
    let out = env.audit_verify_ok();
    assert!(out.contains("is intact"), "{out}");
}

/// The root key signs nothing before the audit log is open: a start that cannot open it (a
/// second signer on the same log) does not reach the backend, so no cross certificate is
/// made that no line names.
#[tokio::test]
async fn a_start_that_cannot_open_its_audit_log_makes_no_cross_certificate() {
    let env = Env::new();
    env.init_next_root();
    env.announce_next_root(Some("next-root-cert.pem"));
    let first = env.start_signer();
    first.wait_for_log("cross certificate made").await;
    let mut second = env.meshca_with_config(&["--log-format", "json", "serve"]);
    let second = run(second.args(["--listen", "127.0.0.1:0"]));
    assert!(!second.status.success());
    let logged = text(&second.stderr);
    assert!(
        logged.contains("is locked by another meshca process"),
        "{logged}"
    );
    for asked in [
        "connecting to the root key backend",
        "cross certificate made",
    ] {
        assert!(!logged.contains(asked), "{asked}:\n{logged}");
    }
}

/// A start that fails after the root key made a cross certificate (its port taken) still
/// leaves the certificate on record: a `start_failed` line names it.
#[tokio::test]
async fn a_start_that_fails_after_making_a_cross_certificate_records_it() {
    let env = Env::new();
    env.init_next_root();
    env.announce_next_root(Some("next-root-cert.pem"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut serve = env.meshca_with_config(&["--log-format", "json", "serve"]);
    let out = run(serve.args(["--listen", &addr]));
    assert!(!out.status.success());
    let logged = text(&out.stderr);
    let made: Value = logged
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("cross certificate made"))
        })
        .unwrap_or_else(|| panic!("no cross certificate made:\n{logged}"));
    let serial = made["cross_serial"].as_str().unwrap();
    let audit = std::fs::read_to_string(env.path("audit.log")).unwrap_or_default();
    let failed: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["event"] == "start_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{audit}");
    let message = failed[0]["message"].as_str().unwrap();
    assert!(
        message.contains(serial) && message.contains(&format!("cannot listen on {addr}")),
        "{message}"
    );
    env.audit_verify_ok();
}
