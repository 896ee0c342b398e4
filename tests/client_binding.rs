//! A client is who its certificate says, issued by whom the config says: a `[[clients]]
//! issuer` pins an identity to a CA of `tls.client_ca`, each decision's audit line names
//! the client certificate's issuer and CA, and a certificate that names several URI SANs
//! has no identity. Against a real SoftHSM token and a real `meshca serve`.

mod common;

use std::path::Path;

use common::certs::*;
use common::*;
use meshca::pki::keys::KeyType;
use serde_json::Value;

const VM: &str = "test/vm";
const MESH_A: &str = "test/cluster-a";
const MESH_B: &str = "test/cluster-b";
const PAY_CA_SUBJECT: &str = "CN=team pay transport CA,O=pay";

/// A second transport CA in `dir` (`pay-ca.pem`, `pay-ca.key`), with a subject of its own.
fn pay_ca(dir: &Path) {
    openssl_self_signed_ca(dir, "pay-ca", "/O=pay/CN=team pay transport CA", 0..30);
}

/// A client certificate `name.pem` (and key) in `dir`, issued by the CA `ca` (`ca.pem`,
/// `ca.key`) with the subjectAltName `san`, valid for a day.
fn client_certificate(dir: &Path, name: &str, ca: &str, san: &str) {
    client_certificate_for_days(dir, name, ca, san, 1);
}

/// [`client_certificate`], valid for `days`.
fn client_certificate_for_days(dir: &Path, name: &str, ca: &str, san: &str, days: u32) {
    openssl_csr(dir, name, KEYGEN_P256, &format!("/CN={name}"), &[]);
    let ext = format!("{name}.ext");
    write(
        dir,
        &ext,
        &format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName={san}\n"
        ),
    );
    let (csr, out, ca_cert, ca_key) = (
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{ca}.pem"),
        format!("{ca}.key"),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-set_serial",
            "0x4c1e",
            "-days",
            &days.to_string(),
            "-sha256",
            "-extfile",
            &ext,
            "-out",
            &out,
        ],
    );
}

/// The config with `issuer = "<issuer>"` added to the client `name`.
fn pin(env: &Env, name: &str, issuer: &str) {
    let config = std::fs::read_to_string(&env.config).unwrap();
    let line = format!("identity = \"{}\"\n", identity(name));
    assert!(config.contains(&line), "{config}");
    let pinned = config.replace(&line, &format!("{line}issuer = \"{issuer}\"\n"));
    std::fs::write(&env.config, pinned).unwrap();
}

#[tokio::test]
async fn an_identity_pinned_to_its_client_ca_is_refused_from_another() {
    let env = Env::new();
    let pki = env.path("pki");
    let shared_sha256 = openssl_fingerprint(&pki, &pki.join("ca.pem"));
    pay_ca(&pki);
    let pay_sha256 = openssl_fingerprint(&pki, &pki.join("pay-ca.pem"));
    // client_ca holds the shared transport CA and team pay's.
    let shared = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    let pay = std::fs::read_to_string(pki.join("pay-ca.pem")).unwrap();
    std::fs::write(pki.join("ca.pem"), format!("{shared}{pay}")).unwrap();
    // Team pay mints cluster-a's identity, and cluster-b's own certificate.
    client_certificate(
        &pki,
        "pay-as-a",
        "pay-ca",
        &format!("URI:{}", identity("cluster-a")),
    );
    client_certificate(
        &pki,
        "pay-b",
        "pay-ca",
        &format!("URI:{}", identity("cluster-b")),
    );

    // Not pinned: the check says any of the two CAs can issue either identity.
    let checked = env.run_with_config_ok(&["serve", "--check"]);
    let out = text(&checked.stdout) + &text(&checked.stderr);
    assert!(
        out.contains("holds 2 CA certificates and these clients have no issuer: any of those CAs can issue their identity"),
        "{out}"
    );
    // An issuer that is no CA of client_ca is refused, named, with what is there.
    let config = std::fs::read_to_string(&env.config).unwrap();
    pin(&env, "cluster-a", &format!("sha256:{}", "00".repeat(32)));
    let refused = env.run_with_config(&["serve", "--check"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = text(&refused.stderr);
    assert!(
        err.contains(&format!(
            "clients: \"{}\": issuer sha256:{} is no CA certificate in tls.client_ca",
            identity("cluster-a"),
            "00".repeat(32)
        )),
        "{err}"
    );
    assert!(err.contains(&pay_sha256), "{err}");
    std::fs::write(&env.config, &config).unwrap();

    // cluster-a pinned to the shared CA by its SHA-256, cluster-b to team pay's by subject.
    pin(&env, "cluster-a", &format!("sha256:{shared_sha256}"));
    pin(&env, "cluster-b", PAY_CA_SUBJECT);
    let checked = env.run_with_config_ok(&["serve", "--check"]);
    assert!(!text(&checked.stdout).contains("have no issuer"));
    let signer = env.start_signer();
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");

    // From 0 at start, so that the alert's increase() sees the first one.
    let metrics = signer.metrics(&env.client("cluster-a")).await;
    assert!(
        metrics.contains("meshca_sign_requests_total{outcome=\"client_issuer\"} 0"),
        "{metrics}"
    );
    // Team pay's certificate naming cluster-a: 403, the mismatch named.
    let (status, body) = post_sign(
        &env.client("pay-as-a"),
        &signer,
        &sign_body(VM, MESH_A, &csr),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), "client_issuer");
    let message = error_message(&body);
    assert!(
        message.contains(&format!(
            "chains to the client CA {PAY_CA_SUBJECT} (sha256:{pay_sha256})"
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!("pinned to issuer sha256:{shared_sha256}")),
        "{message}"
    );
    // Nor is it shown cluster-a's grants: the policy answers 403 too.
    let policy = env
        .client("pay-as-a")
        .get(signer.url("/v1/virtualmeshes/test/vm"))
        .send()
        .await
        .unwrap();
    assert_eq!(policy.status(), 403);
    let body: Value = policy.json().await.unwrap();
    assert_eq!(error_code(&body), "client_issuer", "{body}");
    // Counted under its own outcome, which MeshcaClientIssuerRefused watches.
    let metrics = signer.metrics(&env.client("cluster-a")).await;
    assert!(
        metrics.contains("meshca_sign_requests_total{outcome=\"client_issuer\"} 1"),
        "{metrics}"
    );
    // cluster-a's own certificate, from the shared CA, and cluster-b's, from team pay's.
    let (status, body) = post_sign(
        &env.client("cluster-a"),
        &signer,
        &sign_body(VM, MESH_A, &csr),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        post_sign(&env.client("pay-b"), &signer, &sign_body(VM, MESH_B, &csr)).await;
    assert_eq!(status, 200, "{body}");

    let audit = signer.audit_lines();
    assert_eq!(audit.len(), 3, "{audit:?}");
    let fields = |line: &Value| {
        (
            line["rule"].as_str().unwrap_or("").to_string(),
            line["clientCertificateIssuer"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            line["clientCaSha256"].as_str().unwrap_or("").to_string(),
        )
    };
    let shared_subject = "CN=meshca transport CA,O=meshca demo";
    assert_eq!(
        fields(&audit[0]),
        (
            "client_issuer".into(),
            PAY_CA_SUBJECT.into(),
            pay_sha256.clone()
        )
    );
    assert_eq!(audit[0]["client"], identity("cluster-a"));
    assert_eq!(
        fields(&audit[1]),
        (
            "issued".into(),
            shared_subject.into(),
            shared_sha256.clone()
        )
    );
    assert_eq!(
        fields(&audit[2]),
        ("issued".into(), PAY_CA_SUBJECT.into(), pay_sha256.clone())
    );
    env.audit_verify_ok();

    // A reload that names an issuer client_ca does not hold is refused; the pins stay.
    let config = std::fs::read_to_string(&env.config).unwrap();
    let absent = config.replace(&shared_sha256, &"00".repeat(32));
    assert_ne!(absent, config);
    std::fs::write(&env.config, absent).unwrap();
    send_signal(signer.child.id(), "HUP");
    let refused = signer.wait_for_log("rules not reloaded").await;
    assert!(
        refused.contains("is no CA certificate in tls.client_ca"),
        "{refused}"
    );
    let (status, body) = post_sign(
        &env.client("pay-as-a"),
        &signer,
        &sign_body(VM, MESH_A, &csr),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (403, "client_issuer"),
        "{body}"
    );
}

#[tokio::test]
async fn a_certificate_with_two_uri_sans_has_no_identity() {
    let env = Env::new();
    let pki = env.path("pki");
    // From the trusted transport CA: cluster-a's URI first, cluster-b's second.
    let sans = format!(
        "URI:{},URI:{}",
        identity("cluster-a"),
        identity("cluster-b")
    );
    client_certificate(&pki, "two-uris", "ca", &sans);
    let signer = env.start_signer();
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    for mesh in [MESH_A, MESH_B] {
        let (status, body) =
            post_sign(&env.client("two-uris"), &signer, &sign_body(VM, mesh, &csr)).await;
        assert_eq!(
            (status, error_code(&body)),
            (403, "not_authorized"),
            "{body}"
        );
        assert!(
            error_message(&body).contains("has 2 URI SANs, and so no identity"),
            "{body}"
        );
    }
    let audit = signer.audit_lines();
    assert_eq!(audit.len(), 2, "{audit:?}");
    for line in &audit {
        assert!(line["client"].is_null(), "{line}");
        assert_eq!(line["rule"], "not_authorized", "{line}");
    }
}

/// A client CA that has ended: its clients are refused at the handshake, as Go and OpenSSL
/// refuse them, though webpki takes a chain to a trust anchor whatever the anchor's dates
/// (before, a client certificate that outlived its CA, which `openssl x509 -req` does not
/// prevent, kept signing in). The other CA's clients are served.
#[tokio::test]
async fn the_clients_of_a_client_ca_that_has_ended_are_refused_at_the_handshake() {
    let env = Env::new();
    let pki = env.path("pki");
    openssl_self_signed_ca(&pki, "pay-ca", "/O=pay/CN=team pay transport CA", -30..-1);
    client_certificate(
        &pki,
        "pay-b",
        "pay-ca",
        &format!("URI:{}", identity("cluster-b")),
    );
    let shared = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    let pay = std::fs::read_to_string(pki.join("pay-ca.pem")).unwrap();
    std::fs::write(pki.join("ca.pem"), format!("{shared}{pay}")).unwrap();
    let signer = env.start_signer();
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "b");

    let refused = env
        .client("pay-b")
        .post(signer.url("/v1/sign"))
        .json(&sign_body(VM, MESH_B, &csr))
        .send()
        .await;
    assert!(refused.is_err(), "served: {refused:?}");
    let client_a = env.client("cluster-a");
    let (status, body) = post_sign(&client_a, &signer, &sign_body(VM, MESH_A, &csr)).await;
    assert_eq!(status, 200, "{body}");
    let metrics = signer.metrics(&client_a).await;
    assert!(
        metrics.contains(
            "meshca_tls_handshakes_refused_total{reason=\"client_certificate_expired\"} 1"
        ),
        "{metrics}"
    );
    // The log names the client and the CA that ended, not only "expired" beside a
    // client certificate that is valid.
    let logs = signer.logs();
    let refused = logs
        .lines()
        .find(|line| line.contains("TLS handshake refused"))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(refused.contains(&identity("cluster-b")), "{refused}");
    assert!(
        refused.contains(&format!("the client CA it chains to, {PAY_CA_SUBJECT}")),
        "{refused}"
    );
}

/// A client CA that ends while its client's connection is kept alive: the next request on
/// that connection is refused and audited, though the handshake, made while the CA was
/// valid, is not repeated (the client's own certificate outlives the CA).
#[tokio::test]
async fn a_kept_alive_connection_is_refused_once_its_client_ca_has_ended() {
    let env = Env::new();
    let pki = env.path("pki");
    openssl_self_signed_ca(&pki, "pay-ca", "/O=pay/CN=team pay transport CA", -1..1);
    let san = format!("URI:{}", identity("cluster-b"));
    client_certificate_for_days(&pki, "pay-b", "pay-ca", &san, 30);
    let shared = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    let pay = std::fs::read_to_string(pki.join("pay-ca.pem")).unwrap();
    std::fs::write(pki.join("ca.pem"), format!("{shared}{pay}")).unwrap();
    let offset = env.path("clock-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let signer = env.start_signer_with_clock_file(&offset);
    let pay_b = env.client("pay-b");
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "b");
    let (status, body) = post_sign(&pay_b, &signer, &sign_body(VM, MESH_B, &csr)).await;
    assert_eq!(status, 200, "{body}");

    // Two days on, on the same connection (a new one would be refused at its handshake,
    // and reqwest would fail rather than see a status).
    std::fs::write(&offset, "+2d\n").unwrap();
    let (status, body) = post_sign(&pay_b, &signer, &sign_body(VM, MESH_B, &csr)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["error"]["code"], "client_certificate_expired",
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(PAY_CA_SUBJECT), "{message}");
    let audit = signer.audit_lines();
    let refused = audit.last().unwrap();
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert_eq!(refused["rule"], "client_certificate_expired", "{refused}");
    assert_eq!(refused["client"], identity("cluster-b"), "{refused}");
}
