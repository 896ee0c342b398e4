//! The signer's API against a real SoftHSM token and a real `meshca serve`: issuance for
//! every key type (checked by openssl), every policy rule refused with its own message,
//! authorization, mTLS refusals, malformed requests, audit chain, concurrency.

mod common;

use std::path::Path;
use std::process::Command;

use common::certs::*;
use common::*;
use meshca::agent::rotation::root_fingerprints;
use meshca::pki::keys::KeyType;
use serde_json::{Value, json};
use sha2::Digest;

const VM: &str = "test/vm";
const MESH_A: &str = "test/cluster-a";

/// `--version` names the git commit (set by build.rs): the package version alone has
/// been 0.1.0 for every build.
#[test]
fn version_names_the_build_revision() {
    let out = run_ok(Command::new(MESHCA).arg("--version"));
    let revision = meshca::REVISION;
    let hash = revision.strip_suffix("-dirty").unwrap_or(revision);
    assert!(
        revision == "unknown" || (hash.len() == 12 && hash.chars().all(|c| c.is_ascii_hexdigit())),
        "{revision:?}"
    );
    assert_eq!(
        text(&out.stdout),
        format!(
            "meshca {} (revision {revision})\n",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[tokio::test]
async fn issues_for_every_csr_key_type_with_the_profile_openssl_expects() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let mut serials = Vec::new();
    let mut public_keys = Vec::new();
    for key_type in KeyType::ALL {
        let (_key, csr) = csr(key_type, "acme", "cluster-a");
        public_keys.push(csr_public_key_sha256(&env, &csr));
        let (status, body) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)).await;
        assert_eq!(status, 200, "{key_type}: {body}");
        let text = openssl_verifies(&env, &body, key_type.name());
        assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
        assert!(
            text.contains("X509v3 Basic Constraints: critical"),
            "{text}"
        );
        assert!(text.contains("X509v3 Key Usage: critical"), "{text}");
        assert!(
            text.contains("Digital Signature, Certificate Sign, CRL Sign"),
            "{text}"
        );
        assert!(text.contains("X509v3 Subject Key Identifier"), "{text}");
        assert!(text.contains("X509v3 Authority Key Identifier"), "{text}");
        assert!(text.contains("Subject: O = acme, CN = cluster-a"), "{text}");
        assert!(
            text.contains("ecdsa-with-SHA384"),
            "the P-384 root signs with SHA-384: {text}"
        );
        let serial = body["serial"].as_str().unwrap().to_string();
        assert!(serial.len() == 32 && !serials.contains(&serial), "{serial}");
        serials.push(serial);
        // notAfter is within the policy's 30 days.
        let not_after = body["notAfter"].as_str().unwrap();
        assert!(
            not_after.ends_with('Z') && not_after.len() == 24,
            "{not_after}"
        );
    }
    let audit = signer.audit_lines();
    assert_eq!(audit.len(), KeyType::ALL.len());
    for (line, public_key) in audit.iter().zip(&public_keys) {
        assert_eq!(line["decision"], "allow");
        assert_eq!(line["client"], identity("cluster-a"));
        assert_eq!(line["csrPublicKeySha256"], *public_key, "{line}");
    }
}

/// The SHA-256 of a CSR's DER SubjectPublicKeyInfo, by openssl: what the README says
/// `csrPublicKeySha256` is.
fn csr_public_key_sha256(env: &Env, csr: &str) -> String {
    let dir = env.dir.path();
    std::fs::write(dir.join("spki.csr"), csr).unwrap();
    let pem = openssl(dir, &["req", "-in", "spki.csr", "-pubkey", "-noout"]);
    std::fs::write(dir.join("spki.pem"), pem).unwrap();
    openssl(
        dir,
        &[
            "pkey", "-pubin", "-in", "spki.pem", "-outform", "DER", "-out", "spki.der",
        ],
    );
    meshca::pki::csr::hex(&sha2::Sha256::digest(
        std::fs::read(dir.join("spki.der")).unwrap(),
    ))
}

#[tokio::test]
async fn an_rsa_root_signs_intermediates_that_openssl_verifies() {
    let env = Env::with(EnvSpec {
        root_key_type: KeyType::Rsa3072,
        ..EnvSpec::default()
    });
    let signer = env.start_signer();
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let (status, body) = post_sign(
        &env.client("cluster-a"),
        &signer,
        &sign_body(VM, MESH_A, &csr),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let text = openssl_verifies(&env, &body, "rsa-root");
    assert!(text.contains("sha256WithRSAEncryption"), "{text}");
}

#[tokio::test]
async fn every_policy_rule_is_refused_with_its_own_code_and_message() {
    let env = Env::with(EnvSpec::with_strict_mesh());
    let signer = env.start_signer();
    let client = env.client("cluster-a");

    let (_k, wrong_org) = csr(KeyType::EcdsaP256, "evil-corp", "a");
    let (_k, good) = csr(KeyType::EcdsaP384, "acme", "a");
    let (_k, rsa2048) = csr(KeyType::Rsa2048, "acme", "a");
    let (_k, p256) = csr(KeyType::EcdsaP256, "acme", "a");
    let dir = env.dir.path();
    let p521 = openssl_csr(dir, "p521", KEYGEN_P521, "/O=acme/CN=a", &[]);
    let ed25519 = openssl_csr(dir, "ed25519", KEYGEN_ED25519, "/O=acme/CN=a", &[]);
    let exponent3 = openssl_csr(dir, "e3", KEYGEN_RSA_EXPONENT_3, "/O=acme/CN=a", &[]);
    let rsa1024 = openssl_csr(dir, "rsa1024", KEYGEN_RSA1024, "/O=acme/CN=a", &[]);
    // A valid CSR whose signature no longer matches: change one byte of the subject.
    let tampered = tampered_csr("acme", "a", "b");

    let cases: Vec<(&str, Value, &str, &[&str])> = vec![
        (
            "org",
            sign_body(VM, MESH_A, &wrong_org),
            "policy_org",
            &["evil-corp", "acme"],
        ),
        (
            "ttl",
            json!({"virtualMesh": VM, "mesh": MESH_A, "csr": good, "ttlSeconds": 31 * 86400}),
            "policy_ttl",
            &["31 days", "30 days"],
        ),
        (
            "rsa size",
            sign_body("test/strict", "test/cluster-strict", &rsa2048),
            "policy_key_size",
            &["2048", "4096"],
        ),
        (
            "rsa 1024",
            sign_body(VM, MESH_A, &rsa1024),
            "policy_key_size",
            &["1024", "2048"],
        ),
        (
            "p256 under 4096",
            sign_body("test/strict", "test/cluster-strict", &p256),
            "policy_key_algorithm",
            &["P-256", "P-384"],
        ),
        (
            "p521",
            sign_body(VM, MESH_A, &p521),
            "policy_key_algorithm",
            &["accepted key types"],
        ),
        (
            "ed25519",
            sign_body(VM, MESH_A, &ed25519),
            "policy_key_algorithm",
            &["1.3.101.112"],
        ),
        (
            "exponent",
            sign_body(VM, MESH_A, &exponent3),
            "policy_key_exponent",
            &["exponent 3"],
        ),
        (
            "possession",
            sign_body(VM, MESH_A, &tampered),
            "policy_proof_of_possession",
            &["does not verify"],
        ),
    ];
    for (name, body, code, needles) in &cases {
        let (status, answer) = post_sign(&client, &signer, body).await;
        assert_eq!(status, 403, "{name}: {answer}");
        assert_eq!(error_code(&answer), *code, "{name}: {answer}");
        for needle in *needles {
            assert!(
                error_message(&answer).contains(needle),
                "{name}: {needle:?} not in {answer}"
            );
        }
    }
    // Every refusal is in the audit log with its rule; the signer still issues afterwards.
    let audit = signer.audit_lines();
    assert_eq!(audit.len(), cases.len());
    for (line, (name, _, code, _)) in audit.iter().zip(&cases) {
        assert_eq!(line["decision"], "deny", "{name}");
        assert_eq!(line["rule"], *code, "{name}");
    }
    let (status, _) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &good)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn csr_extensions_are_recorded_and_never_copied() {
    let env = Env::new();
    let signer = env.start_signer();
    let sneaky = openssl_csr(
        env.dir.path(),
        "sneaky",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/O=acme/CN=*.evil.example",
        &[
            "-addext",
            "basicConstraints=critical,CA:true,pathlen:5",
            "-addext",
            "subjectAltName=DNS:evil.example.com",
            "-addext",
            "nameConstraints=permitted;DNS:example.com",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ],
    );
    let (status, body) = post_sign(
        &env.client("cluster-a"),
        &signer,
        &sign_body(VM, MESH_A, &sneaky),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let text = openssl_verifies(&env, &body, "sneaky");
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    for forbidden in [
        "evil.example.com",
        "Name Constraints",
        "Extended Key Usage",
        "pathlen:5",
    ] {
        assert!(!text.contains(forbidden), "{forbidden} was copied:\n{text}");
    }
    let audit = signer.audit_lines();
    let ignored: Vec<&str> = audit[0]["ignoredCsrExtensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for oid in ["2.5.29.19", "2.5.29.17", "2.5.29.30", "2.5.29.37"] {
        assert!(ignored.contains(&oid), "{oid} not recorded: {ignored:?}");
    }
    // The subject it asked for, which was not issued, is recorded too.
    assert!(
        !text.contains("*.evil.example"),
        "the subject was copied:\n{text}"
    );
    assert_eq!(
        audit[0]["ignoredCsrSubject"], "CN=*.evil.example,O=acme",
        "{}",
        audit[0]
    );
}

/// A CSR asking for a hundred extensions of long OIDs: the line records the first 16, each
/// cut at 64 characters, and how many more there were; a client does not choose the size
/// of an fsynced audit line (before, every OID went in: some 700 in a 32 KiB CSR made a
/// 100 KB line per request, issued or refused).
#[tokio::test]
async fn the_extensions_a_csr_asks_for_are_recorded_within_a_bound() {
    let env = Env::new();
    let signer = env.start_signer();
    let long_arcs: String = (100..125).map(|arc| format!(".{arc}")).collect();
    let extensions: Vec<String> = (0..100)
        .map(|i| format!("1.3.6.1.4.1.99999.{i}{long_arcs}=ASN1:NULL"))
        .collect();
    let mut extra = Vec::new();
    for extension in &extensions {
        extra.extend(["-addext", extension.as_str()]);
    }
    let crowded = openssl_csr(
        env.dir.path(),
        "crowded",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/O=acme/CN=a",
        &extra,
    );
    let (status, body) = post_sign(
        &env.client("cluster-a"),
        &signer,
        &sign_body(VM, MESH_A, &crowded),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let line = std::fs::read_to_string(env.dir.path().join("audit.log"))
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    assert!(line.len() < 4096, "an audit line of {} bytes", line.len());
    let recorded: Value = serde_json::from_str(&line).unwrap();
    let ignored = recorded["ignoredCsrExtensions"].as_array().unwrap();
    assert_eq!(ignored.len(), 17, "{ignored:?}");
    assert!(
        ignored[0]
            .as_str()
            .unwrap()
            .starts_with("1.3.6.1.4.1.99999.0.100.101.102")
            && ignored[0].as_str().unwrap().contains("bytes in all"),
        "{ignored:?}"
    );
    assert_eq!(ignored[16], "... and 84 more");
}

#[tokio::test]
async fn clients_get_only_their_own_mesh() {
    let env = Env::new();
    let signer = env.start_signer();
    let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "b");
    let (status, body) = post_sign(
        &env.client("cluster-b"),
        &signer,
        &sign_body(VM, MESH_A, &csr),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), "not_authorized");
    assert!(error_message(&body).contains(&identity("cluster-b")));
    assert!(error_message(&body).contains(MESH_A));
    let (status, _) = post_sign(
        &env.client("cluster-b"),
        &signer,
        &sign_body(VM, "test/cluster-b", &csr),
    )
    .await;
    assert_eq!(status, 200);
    let audit = signer.audit_lines();
    assert_eq!(audit[0]["rule"], "not_authorized");
    assert_eq!(audit[0]["client"], identity("cluster-b"));
}

/// Two certificates naming one identity (a replacement beside the certificate it
/// replaces): each decision's line names the certificate that made the request, by its
/// SHA-256 and its serial, as openssl prints them.
#[tokio::test]
async fn each_decision_names_the_client_certificate_that_made_it() {
    let env = Env::new();
    env.transport_pki("client", &["cluster-a-again", &identity("cluster-a")]);
    let signer = env.start_signer();
    for name in ["cluster-a", "cluster-a-again"] {
        let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "a");
        let (status, body) =
            post_sign(&env.client(name), &signer, &sign_body(VM, MESH_A, &csr)).await;
        assert_eq!(status, 200, "{body}");
        // A refusal names it too.
        let (status, _) = post_sign(
            &env.client(name),
            &signer,
            &sign_body(VM, "test/cluster-b", &csr),
        )
        .await;
        assert_eq!(status, 403);
    }
    let audit = signer.audit_lines();
    assert_eq!(audit.len(), 4, "{audit:?}");
    let pki = env.path("pki");
    let serial_of = |name: &str| {
        let out = openssl(
            &pki,
            &["x509", "-in", &format!("{name}.pem"), "-noout", "-serial"],
        );
        let (_, hex) = out.trim().split_once('=').unwrap();
        hex.to_ascii_lowercase()
    };
    for (lines, name) in [
        (&audit[0..2], "cluster-a"),
        (&audit[2..4], "cluster-a-again"),
    ] {
        let sha256 = openssl_fingerprint(&pki, &pki.join(format!("{name}.pem")));
        let serial = serial_of(name);
        for line in lines {
            assert_eq!(line["client"], identity("cluster-a"), "{line}");
            assert_eq!(line["clientCertificateSha256"], sha256, "{line}");
            // transport-pki.sh's serials begin with a 4: no leading zero byte to strip.
            assert_eq!(line["clientCertificateSerial"], serial, "{line}");
        }
    }
    assert_ne!(
        audit[0]["clientCertificateSha256"],
        audit[2]["clientCertificateSha256"]
    );
}

#[tokio::test]
async fn a_common_name_that_reads_as_another_clients_uri_is_no_identity() {
    let env = Env::new();
    let signer = env.start_signer();
    // From the trusted transport CA, without SANs, its CN cluster-a's URI identity: what a
    // CA that lets requesters pick their CN would sign.
    let pki = env.path("pki");
    // openssl's -subj takes a '/' inside a value escaped.
    let subject = format!("/CN={}", identity("cluster-a").replace('/', "\\/"));
    openssl_csr(&pki, "impostor", KEYGEN_P256, &subject, &[]);
    write(&pki, "impostor.ext", "extendedKeyUsage=clientAuth\n");
    openssl(
        &pki,
        &[
            "x509",
            "-req",
            "-in",
            "impostor.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "impostor.ext",
            "-out",
            "impostor.pem",
        ],
    );
    let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let (status, body) = post_sign(
        &env.client("impostor"),
        &signer,
        &sign_body(VM, MESH_A, &csr),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), "not_authorized");
    assert!(
        error_message(&body).contains("carries no identity"),
        "{body}"
    );
    let audit = signer.audit_lines();
    assert_eq!(audit[0]["rule"], "not_authorized");
    assert!(audit[0]["client"].is_null(), "{}", audit[0]);
    // cluster-a itself, by its URI SAN, is served.
    let (status, _) = post_sign(
        &env.client("cluster-a"),
        &signer,
        &sign_body(VM, MESH_A, &csr),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn clients_without_a_certificate_or_from_another_ca_are_refused_at_the_handshake() {
    let env = Env::new();
    let signer = env.start_signer();

    // No client certificate at all.
    let roots = {
        let mut store = rustls::RootCertStore::empty();
        for cert in meshca::tlsutil::load_certificates(&env.path("pki/ca.pem")).unwrap() {
            store.add(cert).unwrap();
        }
        store
    };
    let anonymous = rustls::ClientConfig::builder_with_provider(meshca::tlsutil::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(anonymous)
        .build()
        .unwrap();
    assert!(client.get(signer.url("/healthz")).send().await.is_err());

    // A certificate from a CA the signer does not trust, with a granted identity.
    let other = env.path("other-pki");
    let script = repo().join("scripts/transport-pki.sh");
    run_ok(Command::new(&script).arg("ca").arg(&other));
    run_ok(
        Command::new(&script)
            .arg("client")
            .arg(&other)
            .arg("cluster-a")
            .arg(identity("cluster-a")),
    );
    let foreign = rustls::ClientConfig::builder_with_provider(meshca::tlsutil::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            meshca::tlsutil::load_certificates(&other.join("cluster-a.pem")).unwrap(),
            meshca::tlsutil::load_private_key(&other.join("cluster-a.key")).unwrap(),
        )
        .unwrap();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(foreign)
        .build()
        .unwrap();
    let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    assert!(
        client
            .post(signer.url("/v1/sign"))
            .json(&sign_body(VM, MESH_A, &csr))
            .send()
            .await
            .is_err()
    );

    // Nothing was decided (no audit line), and the signer still serves trusted clients.
    assert!(signer.audit_lines().is_empty());
    let (status, _) = post_sign(
        &env.client("cluster-a"),
        &signer,
        &sign_body(VM, MESH_A, &csr),
    )
    .await;
    assert_eq!(status, 200);
    signer.wait_for_log("TLS handshake refused").await;
}

#[tokio::test]
async fn malformed_requests_get_their_documented_status() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let (_k, good) = csr(KeyType::EcdsaP256, "acme", "a");
    let url = signer.url("/v1/sign");

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "not json",
            client
                .post(&url)
                .header("content-type", "application/json")
                .body("{nope"),
            400,
            "malformed_request",
        ),
        (
            "missing csr",
            client
                .post(&url)
                .json(&json!({"virtualMesh": VM, "mesh": MESH_A})),
            400,
            "malformed_request",
        ),
        (
            "unknown field",
            client
                .post(&url)
                .json(&json!({"virtualMesh": VM, "mesh": MESH_A, "csr": good, "pathLen": 3})),
            400,
            "malformed_request",
        ),
        (
            "bad ref",
            client
                .post(&url)
                .json(&sign_body("no-slash", MESH_A, &good)),
            400,
            "malformed_request",
        ),
        (
            "bad pem",
            client.post(&url).json(&sign_body(
                VM,
                MESH_A,
                "-----BEGIN CERTIFICATE REQUEST-----\nnope\n",
            )),
            400,
            "malformed_csr",
        ),
        (
            "der garbage",
            client.post(&url).json(&sign_body(
                VM,
                MESH_A,
                &meshca::pki::pem::encode("CERTIFICATE REQUEST", &[0x30, 0x03, 0x02, 0x01, 0x00]),
            )),
            400,
            "malformed_csr",
        ),
        (
            "certificate instead of csr",
            client
                .post(&url)
                .json(&sign_body(VM, MESH_A, &env.root_pem())),
            400,
            "malformed_csr",
        ),
        (
            "unknown virtual mesh",
            client
                .post(&url)
                .json(&sign_body("test/nope", MESH_A, &good)),
            404,
            "unknown_virtual_mesh",
        ),
        (
            "mesh not a member",
            client
                .post(&url)
                .json(&sign_body(VM, "test/cluster-z", &good)),
            404,
            "unknown_mesh",
        ),
        (
            "too large",
            client
                .post(&url)
                .header("content-type", "application/json")
                .body(vec![b' '; 65 * 1024]),
            413,
            "body_too_large",
        ),
        (
            "content type",
            client
                .post(&url)
                .header("content-type", "text/plain")
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            "zero ttl",
            client
                .post(&url)
                .json(&json!({"virtualMesh": VM, "mesh": MESH_A, "csr": good, "ttlSeconds": 0})),
            400,
            "malformed_request",
        ),
    ];
    let count = cases.len();
    for (name, request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(error_code(&body), code, "{name}: {body}");
        assert!(!error_message(&body).is_empty(), "{name}");
    }
    let response = client
        .get(signer.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let response = client.get(signer.url("/v1/sign")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);

    // Every decision was audited; the signer still serves.
    assert_eq!(signer.audit_lines().len(), count);
    let (status, _) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &good)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn public_endpoints_policy_trust_bundle_health_and_metrics() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-b");

    let policy = signer.get_json(&client, "/v1/virtualmeshes/test/vm").await;
    assert_eq!(policy["orgName"], "acme");
    // What this client (cluster-b) may ask for, and nothing of another client's.
    assert_eq!(policy["authorizedMeshes"], json!(["test/cluster-b"]));
    assert_eq!(policy["maxTtlSeconds"], 30 * 86400);
    assert_eq!(policy["minRsaBits"], 2048);
    assert_eq!(
        policy["acceptedKeyTypes"],
        json!(["rsa2048", "rsa3072", "rsa4096", "ecdsa-p256", "ecdsa-p384"])
    );
    let missing = client
        .get(signer.url("/v1/virtualmeshes/test/none"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    let bundle = signer.get_text(&client, "/v1/trust-bundle").await;
    assert_eq!(bundle, env.root_pem());

    let health = client.get(signer.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let ready: Value = client
        .get(signer.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");

    let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "b");
    post_sign(&client, &signer, &sign_body(VM, "test/cluster-b", &csr)).await;
    post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)).await;
    let metrics = signer.metrics(&client).await;
    for needle in [
        "meshca_sign_requests_total{outcome=\"issued\"} 1",
        "meshca_sign_requests_total{outcome=\"not_authorized\"} 1",
        "meshca_signing_duration_seconds_count 1",
        "meshca_backend_errors_total 0",
        // The start record, then one request at a time: each decision is its own write
        // and fsync.
        "meshca_audit_commits_total 3",
        // Each of them timed.
        "meshca_audit_commit_duration_seconds_count 3",
        "meshca_root_expiry_seconds 25",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    // When the transport CA the clients chain to ends, as openssl reads it.
    assert_eq!(
        metric_sample(&metrics, "meshca_tls_client_ca_not_after_timestamp_seconds"),
        Some(certificate_date_unix(&env.path("pki/ca.pem"), "enddate")),
        "{metrics}"
    );
}

/// A start-only setting changed to a file that is not there: the reload's WARN says a
/// restart would fail (a restart exits 1 and systemd restarts it in a loop), and names it.
#[tokio::test]
async fn a_pending_restart_onto_a_missing_pkcs11_module_is_named_at_the_sighup() {
    let env = Env::new();
    let signer = env.start_signer();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let module = config
        .lines()
        .find_map(|l| l.strip_prefix("module = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no pkcs11 module in:\n{config}"))
        .to_string();
    let gone = env.path("no-such-pkcs11-module.so");
    let changed = config.replace(&module, &gone.display().to_string());
    std::fs::write(&env.config, changed).unwrap();
    send_signal(signer.child.id(), "HUP");
    let warning = signer.wait_for_log("take effect at the next restart").await;
    let warning: serde_json::Value = serde_json::from_str(&warning).unwrap();
    assert_eq!(warning["settings"], "pkcs11", "{warning}");
    let blocker = warning["restart_would_fail"].as_str().unwrap_or_default();
    assert!(
        blocker.starts_with("pkcs11.module ") && blocker.contains("no-such-pkcs11-module.so"),
        "{warning}"
    );
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("meshca serve --check --online")),
        "{warning}"
    );
}

/// `root.common_name` "cluster-a" under the root's org acme: test/cluster-a's intermediate
/// would be `O=acme, CN=cluster-a`, the root's own subject, and read as self-issued.
/// `root init` refuses to make that root; made before the mesh was granted, it refuses
/// a reload that grants it, `serve --check` and the start, naming both.
#[tokio::test]
async fn a_mesh_whose_intermediate_would_carry_the_roots_subject_is_refused() {
    let env = Env::prepare(&EnvSpec::default());
    let config = std::fs::read_to_string(&env.config).unwrap();
    let named = config.replace("key_type = ", "common_name = \"cluster-a\"\nkey_type = ");
    std::fs::write(&env.config, &named).unwrap();
    let mesh = "mesh test/cluster-a (virtual mesh test/vm) is granted, and its intermediate would have the subject O=acme, CN=cluster-a, which is the subject of";
    let out = env.run_with_config(&["root", "init"]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("{mesh} the new root")),
        "{stderr}"
    );
    assert!(!env.path("root-cert.pem").exists());

    let a_block = format!(
        "\n[[clients]]\nidentity = \"{}\"\nallow = [{{ virtual_mesh = \"test/vm\", mesh = \"test/cluster-a\" }}]\n",
        identity("cluster-a")
    );
    assert!(named.contains(&a_block), "{named}");
    std::fs::write(&env.config, named.replace(&a_block, "")).unwrap();
    env.run_with_config_ok(&["root", "init"]);
    let mut signer = env.start_signer();
    std::fs::write(&env.config, &named).unwrap();
    send_signal(signer.child.id(), "HUP");
    let refused = signer
        .wait_for_log("which is the subject of the root (root.certificate")
        .await;
    assert!(refused.contains(mesh), "{refused}");
    assert!(signer.terminate());

    let root = format!(
        "{mesh} the root (root.certificate {})",
        env.path("root-cert.pem").display()
    );
    for command in [&["serve", "--check"][..], &["serve"][..]] {
        let out = env.run_with_config(command);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&root),
            "{command:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn sighup_reloads_policies_and_clients_after_recording_the_change() {
    // A P-256 root: a policy demanding RSA-4096 strength is too much for it.
    let env = Env::with(EnvSpec {
        root_key_type: KeyType::EcdsaP256,
        ..EnvSpec::default()
    });
    // With `--listen`, the file's `listen` is not the signer's: changing it is not news.
    let signer = env.start_signer_with(&["--listen", "127.0.0.1:0"]);
    let (client_a, client_b) = (env.client("cluster-a"), env.client("cluster-b"));
    let sign = |client: &reqwest::Client, mesh: &str| {
        let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "x");
        let body = sign_body(VM, mesh, &csr);
        let client = client.clone();
        let signer = &signer;
        async move { post_sign(&client, signer, &body).await }
    };
    let reload_logged = |n: usize| signer.wait_for_nth_log("SIGHUP: rules", n);
    let sighup = || send_signal(signer.child.id(), "HUP");
    assert_eq!(sign(&client_b, "test/cluster-b").await.0, 200);

    // Nothing changed: nothing recorded.
    sighup();
    let line = reload_logged(1).await;
    assert!(line.contains("nothing in them changed"), "{line}");

    // cluster-b's grant moves to cluster-a, the ttl shrinks, and the one restart-only limit
    // (and the overridden listen address) change.
    let config = std::fs::read_to_string(&env.config).unwrap();
    let b_block = format!(
        "\n[[clients]]\nidentity = \"{}\"\nallow = [{{ virtual_mesh = \"test/vm\", mesh = \"test/cluster-b\" }}]\n",
        identity("cluster-b")
    );
    assert!(config.contains(&b_block), "{config}");
    let reloaded = config
        .replace(&b_block, "")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        .replace(
        "mesh = \"test/cluster-a\" }]",
        "mesh = \"test/cluster-a\" }, { virtual_mesh = \"test/vm\", mesh = \"test/cluster-b\" }]",
    ) + "\n[limits]\nmax_connections = 50\n";
    std::fs::write(&env.config, &reloaded).unwrap();
    let meshes_file = env.path("virtual-meshes.yaml");
    let meshes = std::fs::read_to_string(&meshes_file).unwrap();
    let shorter_ttl = meshes.replace("ttlDays: 30", "ttlDays: 10");
    std::fs::write(&meshes_file, &shorter_ttl).unwrap();
    sighup();
    let line = reload_logged(2).await;
    for needle in [
        "recorded in the audit log",
        "virtual mesh test/vm: ttl 30 days -> 10 days",
        &format!("client {} removed", identity("cluster-b")),
        &format!(
            "client {}: may now ask for test/cluster-b in test/vm",
            identity("cluster-a")
        ),
    ] {
        assert!(line.contains(needle), "{needle} missing from {line}");
    }
    let warning = signer.wait_for_log("take effect at the next restart").await;
    assert!(
        warning.contains("\"settings\":\"limits.max_connections\""),
        "{warning}"
    );
    // The metric an alert watches: `systemctl reload` succeeded, a restart is pending.
    let metrics = signer.metrics(&client_a).await;
    assert!(
        metrics.contains("\nmeshca_config_restart_pending 1\n"),
        "{metrics}"
    );

    let (status, body) = sign(&client_b, "test/cluster-b").await;
    assert_eq!(
        (status, error_code(&body)),
        (403, "not_authorized"),
        "{body}"
    );
    let (status, body) = sign(&client_a, "test/cluster-b").await;
    assert_eq!(status, 200, "{body}");
    let policy = signer
        .get_json(&client_a, "/v1/virtualmeshes/test/vm")
        .await;
    assert_eq!(policy["maxTtlSeconds"], 10 * 86_400, "{policy}");
    assert_eq!(
        policy["authorizedMeshes"],
        json!(["test/cluster-a", "test/cluster-b"]),
        "{policy}"
    );

    // A grant of an unknown mesh, then a policy the root is too weak for: each reload is
    // refused by name and the rules in force stay.
    let refused = |config: String, meshes: String, n: usize, needle: &'static str| {
        std::fs::write(&env.config, config).unwrap();
        std::fs::write(&meshes_file, meshes).unwrap();
        sighup();
        async move {
            let line = reload_logged(n).await;
            assert!(
                line.contains("not reloaded") && line.contains(needle),
                "{line}"
            );
        }
    };
    let unknown_mesh = reloaded.replace("mesh = \"test/cluster-b\" }]", "mesh = \"test/nope\" }]");
    refused(unknown_mesh, shorter_ttl, 3, "test/nope").await;
    let too_strong = meshes.replace("rsaKeySizeBytes: 2048", "rsaKeySizeBytes: 4096");
    refused(reloaded, too_strong, 4, "too weak for virtual mesh test/vm").await;
    assert_eq!(sign(&client_a, "test/cluster-b").await.0, 200);
    assert_eq!(sign(&client_b, "test/cluster-b").await.0, 403);

    // The one change is in the audit log, between the decisions made before and after it,
    // and the chain verifies (after the start record, not listed by audit_lines).
    let audit = signer.audit_lines();
    let events: Vec<(&str, &str)> = audit
        .iter()
        .map(|l| (l["event"].as_str().unwrap(), l["rule"].as_str().unwrap()))
        .collect();
    assert_eq!(
        events,
        [
            ("decision", "issued"),
            ("reload", "rules_changed"),
            ("decision", "not_authorized"),
            ("decision", "issued"),
            ("decision", "issued"),
            ("decision", "not_authorized"),
        ]
    );
    let recorded = audit[1]["message"].as_str().unwrap();
    assert!(recorded.contains("ttl 30 days -> 10 days"), "{recorded}");
    assert!(env.audit_verify_ok().contains("intact: 7 records"));
    let metrics = signer.metrics(&client_a).await;
    for needle in [
        "meshca_rules_reloads_total{outcome=\"ok\"} 2",
        "meshca_rules_reloads_total{outcome=\"error\"} 2",
        // The last reload was refused: what an alert sees.
        "meshca_rules_last_reload_successful 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
}

/// The signals a process catches (SigCgt) and its thread count, from one read of
/// /proc/PID/status; None once it is gone.
fn caught_signals_and_threads(pid: u32) -> Option<(u64, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let caught = u64::from_str_radix(field("SigCgt:")?, 16).ok()?;
    let threads = field("Threads:")?.parse().ok()?;
    Some((caught, threads))
}

/// A SIGHUP sent as soon as the process exists (a `systemctl reload` right after the
/// start) does not end the signer: it is taken over first thing, before the config is
/// read and long before the runtime whose handler reloads; one that came then is a reload
/// once started. Started until one SIGHUP is sent while the signer still has one thread
/// (its runtime not built); the signer catching none by then fails.
#[test]
fn a_sighup_right_after_the_start_does_not_end_the_signer() {
    let env = Env::new();
    let hangup = 1u64 << (libc::SIGHUP - 1);
    for _ in 0..20 {
        let mut child = env
            .meshca_with_config(&["--log-format", "json", "serve"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let before_the_runtime = loop {
            match caught_signals_and_threads(pid) {
                Some((caught, threads)) if caught & hangup != 0 => {
                    send_signal(pid, "HUP");
                    break threads == 1;
                }
                Some(_) => std::hint::spin_loop(),
                None => panic!("the signer ended before it caught SIGHUP"),
            }
        };
        let read = stderr_lines(&mut child);
        // The reload the SIGHUP asked for (a generous bound: the start connects to the
        // token first; a signer the SIGHUP ended says nothing more).
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|l: &String| l.contains("SIGHUP: rules reloaded"))
        {
            match read.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(line) => seen.push(line),
                Err(_) => {
                    let status = child.try_wait().unwrap();
                    panic!("no reload; exit status {status:?}:\n{}", seen.join("\n"));
                }
            }
        }
        send_signal(pid, "TERM");
        let status = wait_within(&mut child, EXIT_WAIT).expect("the signer stops");
        assert!(status.success(), "{status:?}:\n{}", seen.join("\n"));
        if before_the_runtime {
            return;
        }
    }
    panic!("in 20 starts, the signer never caught SIGHUP before its runtime started");
}

/// A restart puts the config's rules in force as a reload does, so each start records
/// them first: a `start` record with their summary and digest, under which the decisions
/// after it are made. A ttl changed between two starts shows in their records; the same
/// rules have the same digest, whether a start or a reload put them in force.
#[tokio::test]
async fn each_start_records_the_rules_it_starts_under() {
    let env = Env::new();
    let client = env.client("cluster-a");
    let meshes_file = env.path("virtual-meshes.yaml");
    let meshes = std::fs::read_to_string(&meshes_file).unwrap();
    let mut signer = env.start_signer();
    assert_still_issues(&client, &signer).await;
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");
    std::fs::write(&meshes_file, meshes.replace("ttlDays: 30", "ttlDays: 10")).unwrap();
    let mut signer = env.start_signer();
    assert_still_issues(&client, &signer).await;
    // Back to the first rules, by a reload this time.
    std::fs::write(&meshes_file, &meshes).unwrap();
    send_signal(signer.child.id(), "HUP");
    signer
        .wait_for_log("SIGHUP: rules reloaded (recorded in the audit log)")
        .await;
    let metrics = signer.metrics(&client).await;
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");

    let lines = signer.all_audit_lines();
    let events: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["event"].as_str().unwrap(),
                l["rule"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // Each clean stop is on record too, after the last decision.
    assert_eq!(
        events,
        [
            ("start", "rules_in_force"),
            ("decision", "issued"),
            ("stop", ""),
            ("start", "rules_in_force"),
            ("decision", "issued"),
            ("reload", "rules_changed"),
            ("stop", ""),
        ]
    );
    let message = |n: usize| lines[n]["message"].as_str().unwrap();
    let digest = |n: usize| lines[n]["rulesSha256"].as_str().unwrap();
    let (first, second) = (message(0), message(3));
    assert_ne!(first, second);
    // Each start names its host and the root it issues under: two replicas' logs, or
    // a log across a root change, tell apart by their content.
    let root_sha256 = openssl_fingerprint(env.dir.path(), &env.path("root-cert.pem"));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for start in [first, second] {
        // The build's revision too: the package version has not moved in years of builds.
        let announced = format!(
            "meshca {} started on host {}, issuing under root sha256 {root_sha256}; rules in force: ",
            meshca::VERSION,
            host.trim()
        );
        assert!(
            start.contains(&announced),
            "{announced} missing from {start}"
        );
    }
    for (start, ttl) in [(first, "30 days"), (second, "10 days")] {
        for needle in [
            &format!(
                "rules in force: virtual mesh test/vm (org \"acme\", ttl {ttl}, RSA minimum 2048 bits, meshes: test/cluster-a, test/cluster-b)"
            ),
            "; 2 clients with 2 grants; limits: sign_requests_per_minute 600, sign_burst 60, max_connections 1024,",
        ] {
            assert!(start.contains(needle), "{needle} missing from {start}");
        }
    }
    assert_eq!(digest(0).len(), 64);
    // A start and a reload carry the rules in full, which hash to their digest: the
    // rules behind a decision can be read from the log alone, each grant by name.
    for n in [0, 3, 5] {
        let rules = lines[n]["rules"].as_str().unwrap();
        let hashed = meshca::pki::csr::hex(&sha2::Sha256::digest(rules.as_bytes()));
        assert_eq!(hashed, digest(n), "{rules}");
        for (client, mesh) in [("cluster-a", MESH_A), ("cluster-b", "test/cluster-b")] {
            let grant = format!("grant \"{}\" {VM} {mesh}\n", identity(client));
            assert!(rules.contains(&grant), "{grant} missing from {rules}");
        }
    }
    // Each start says how the token proved its key: a signature of the root key that no
    // decision line covers, which the HSM's log shows.
    for n in [0, 3] {
        let proof = lines[n]["rootKeyProof"].as_str().unwrap();
        assert_eq!(
            proof,
            "the token's key pkcs11:token=meshca-test;object=root-ca signed a challenge of 32 random bytes (no certificate), which verified under the root certificate"
        );
    }
    let ttl = |n: usize| {
        let rules = lines[n]["rules"].as_str().unwrap();
        rules.contains("max_ttl_seconds=864000 ")
    };
    assert_eq!([ttl(0), ttl(3), ttl(5)], [false, true, false]);
    assert_ne!(digest(0), digest(3));
    assert_eq!(digest(5), digest(0), "the same rules, another digest");
    // Monitoring sees the rules in force, so that replicas meant to be alike can be
    // compared: after the reload, those of the first start.
    let info = format!(
        "meshca_rules_info{{rules_sha256=\"{}\",root_sha256=\"{root_sha256}\"}} 1",
        digest(5)
    );
    assert!(metrics.contains(&info), "{info} missing from\n{metrics}");
    assert_eq!(
        metrics.matches("meshca_rules_info{").count(),
        1,
        "{metrics}"
    );
    // Each decision names the rules it was made under: those recorded before it.
    assert_eq!(digest(1), digest(0));
    assert_eq!(digest(4), digest(3));
    // A stop names the rules in force when it stopped.
    assert_eq!(digest(2), digest(0));
    assert_eq!(digest(6), digest(5));
    assert!(
        message(6).contains(&format!("on host {} stopped", host.trim())),
        "{}",
        message(6)
    );
    let not_after = |n: usize| lines[n]["notAfter"].as_str().unwrap();
    assert!(not_after(4) < not_after(1), "{lines:?}");
    assert!(env.audit_verify_ok().contains("intact: 7 records"));
}

#[tokio::test]
async fn thirty_two_concurrent_requests_all_succeed_with_distinct_serials() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let load = load::start(
        &client,
        &signer.url("/v1/sign"),
        load::fresh_bodies(32, VM, MESH_A),
        1,
        |sent| async move {
            let response = sent.unwrap();
            let status = response.status().as_u16();
            let body = response.json::<Value>().await.unwrap();
            assert_eq!(status, 200, "{body}");
            Some(body["serial"].as_str().unwrap().to_string())
        },
    );
    let mut serials = std::collections::HashSet::new();
    for serial in load.join().await {
        assert!(serials.insert(serial));
    }
    assert_eq!(serials.len(), 32);
    let verified = env.audit_verify_ok();
    // The start record, then the 32 decisions.
    assert!(verified.contains("intact: 33 records"), "{verified}");
    // The root and its intermediates share the VirtualMesh's ttlDays, so every
    // intermediate ends with the root: the log says so once, not 32 times.
    let capped = "shortened to end with the root";
    signer.wait_for_log(capped).await;
    assert_eq!(
        signer.logs().matches(capped).count(),
        1,
        "{}",
        signer.logs()
    );
}

#[tokio::test]
async fn the_audit_chain_verifies_and_a_tampered_line_is_found() {
    let env = Env::new();
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    for i in 0..5 {
        let (_k, csr) = csr(
            KeyType::EcdsaP256,
            if i == 2 { "evil" } else { "acme" },
            "a",
        );
        post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)).await;
    }
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");
    let verified = env.audit_verify_ok();
    // The start record, the five decisions, the stop record.
    assert!(verified.contains("intact: 7 records"), "{verified}");

    // Turn the denial on line 4 into an allow.
    let log = std::fs::read_to_string(env.path("audit.log")).unwrap();
    let tampered = log.replacen("\"decision\":\"deny\"", "\"decision\":\"allow\"", 1);
    assert_ne!(log, tampered);
    std::fs::write(env.path("audit.log"), tampered).unwrap();
    let out = run(env.meshca().args(["audit", "verify", "audit.log"]));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    // The changed line is the one before the line named: both are.
    assert!(
        stderr.contains("breaks at line 5: line 5 does not continue line 4: ")
            && stderr.contains("line 4 was changed"),
        "{stderr}"
    );

    // Compressed by logrotate: refused with what to do, not as a broken log.
    std::fs::write(env.path("rotated"), &log).unwrap();
    run_ok(Command::new("gzip").arg(env.path("rotated")));
    let out = run(env.meshca().args(["audit", "verify", "rotated.gz"]));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("audit log rotated.gz: compressed with gzip")
            && stderr.contains("decompress it first"),
        "{stderr}"
    );

    // Deleting a line (the first decision) is caught too.
    let mut lines: Vec<&str> = log.lines().collect();
    lines.remove(1);
    std::fs::write(env.path("audit.log"), lines.join("\n") + "\n").unwrap();
    let out = run(env.meshca().args(["audit", "verify", "audit.log"]));
    assert!(
        text(&out.stderr).contains("breaks at line 2"),
        "{}",
        text(&out.stderr)
    );
}

/// The `last_hash` of each "audit log head" line of the signer's (JSON) log.
fn logged_audit_heads(logs: &str) -> Vec<String> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("audit log head")
        })
        .map(|l| l["last_hash"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn lines_cut_from_the_end_of_the_audit_log_are_found_by_the_head_the_signer_logged() {
    let env = Env::new();
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    for _ in 0..3 {
        let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "a");
        let (status, _) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)).await;
        assert_eq!(status, 200);
    }
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");
    // The start logs the head once its start record is written (the start record's
    // hash); the stop logs the last line's, its stop record's.
    let heads = logged_audit_heads(&signer.logs());
    assert_eq!(heads.len(), 2, "{}", signer.logs());
    assert_ne!(heads[0], heads[1]);
    let head = &heads[1];
    let verified = env.audit_verify_ok();
    assert!(
        verified.contains(&format!("intact: 5 records, last hash {head}")),
        "{verified}"
    );
    // The next start logs its head at once too: the line it just added (then its stop
    // adds one more).
    let mut signer = env.start_signer();
    let at_start = logged_audit_heads(&signer.wait_for_log("audit log head").await);
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");
    assert!(env.audit_verify_ok().contains("intact: 7 records"));

    let held = run_ok(
        env.meshca()
            .args(["audit", "verify", "audit.log", "--expect-hash"])
            .arg(head.to_uppercase())
            .arg("--expect-hash")
            .arg(&at_start[0]),
    );
    let held = text(&held.stdout);
    for expected in [
        format!("holds the expected line {head}: line 5, 2 records after it"),
        format!(
            "holds the expected line {}: line 6, 1 records after it",
            at_start[0]
        ),
    ] {
        assert!(held.contains(&expected), "{expected} missing from {held}");
    }

    // The lines from the head's on cut: the chain alone still verifies, the logged head
    // does not.
    let log = std::fs::read_to_string(env.path("audit.log")).unwrap();
    let kept: String = log.lines().take(4).map(|l| format!("{l}\n")).collect();
    std::fs::write(env.path("audit.log"), kept).unwrap();
    assert!(env.audit_verify_ok().contains("intact: 4 records"));
    let out = run(env
        .meshca()
        .args(["audit", "verify", "audit.log", "--expect-hash", head]));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "no line of audit.log hashes to {head}: lines were cut from the end of the log"
        )),
        "{stderr}"
    );

    let out = run(env
        .meshca()
        .args(["audit", "verify", "audit.log", "--expect-hash", "abc"]));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not a line hash: expected 64 hex digits"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_audit_log_moved_away_while_serving_is_continued_and_verified_across_files() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    let sign = || async {
        let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "a");
        let (status, _) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)).await;
        assert_eq!(status, 200);
    };
    sign().await;
    // Rotated as logrotate does without copytruncate: the file is renamed, nothing else.
    std::fs::rename(env.path("audit.log"), env.path("audit.log.1")).unwrap();
    sign().await;
    sign().await;
    signer
        .wait_for_log("audit log was moved away (rotated)")
        .await;
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");

    let new_log = env.path("audit.log");
    let mode = std::fs::metadata(&new_log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let lines = signer.audit_lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["event"], "rotation");
    assert_eq!(signer.all_audit_lines()[3]["event"], "stop");
    assert!(
        lines[1..].iter().all(|l| l["rule"] == "issued"),
        "{lines:?}"
    );

    // Together, oldest first: the chain runs from one file into the next.
    let both = run_ok(
        env.meshca()
            .args(["audit", "verify", "audit.log.1", "audit.log"]),
    );
    let both = text(&both.stdout);
    assert!(
        both.contains("audit.log.1 is intact: 2 records")
            && both.contains("audit.log is intact: 4 records"),
        "{both}"
    );
    // Alone, the new file says which line it continues from: the old file's last.
    let old_last_hash = both
        .lines()
        .find(|l| l.contains("audit.log.1 is intact"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .to_string();
    let alone = env.audit_verify_ok();
    assert!(
        alone.contains(&format!(
            "continues an earlier file (rotated away) whose last line hashes to {old_last_hash}"
        )),
        "{alone}"
    );
    // In the wrong order the link is refused.
    let out = run(env
        .meshca()
        .args(["audit", "verify", "audit.log", "audit.log.1"]));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("audit.log.1 breaks at line 1: does not continue the file before it"),
        "{stderr}"
    );
}

/// A rotated file stands alone: its `rotation` record restates the rules in force (those
/// of the last reload, not the start's), the host and root, and the transport trust, so
/// every decision's `rulesSha256` names rules written in that file even once logrotate
/// has deleted the file holding the `start` record.
#[tokio::test]
async fn a_rotated_audit_file_restates_the_rules_its_decisions_name() {
    let env = Env::new();
    let client = env.client("cluster-a");
    let meshes_file = env.path("virtual-meshes.yaml");
    let meshes = std::fs::read_to_string(&meshes_file).unwrap();
    let mut signer = env.start_signer();
    assert_still_issues(&client, &signer).await;
    std::fs::write(&meshes_file, meshes.replace("ttlDays: 30", "ttlDays: 10")).unwrap();
    send_signal(signer.child.id(), "HUP");
    signer
        .wait_for_log("SIGHUP: rules reloaded (recorded in the audit log)")
        .await;
    let old = signer.all_audit_lines();
    std::fs::rename(env.path("audit.log"), env.path("audit.log.1")).unwrap();
    assert_still_issues(&client, &signer).await;
    assert_still_issues(&client, &signer).await;
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");

    let reload = old.iter().find(|l| l["event"] == "reload").unwrap();
    let start = &old[0];
    let lines = signer.all_audit_lines();
    let rotation = &lines[0];
    assert_eq!(rotation["event"], "rotation", "{lines:?}");
    let rules = rotation["rules"].as_str().unwrap();
    let digest = meshca::pki::csr::hex(&sha2::Sha256::digest(rules.as_bytes()));
    assert_eq!(rotation["rulesSha256"], digest.as_str());
    assert_eq!(rotation["rules"], reload["rules"]);
    assert_eq!(rotation["tls"], start["tls"]);
    assert!(rotation["tls"]["clientCas"].is_array(), "{rotation}");
    let root_sha256 = openssl_fingerprint(env.dir.path(), &env.path("root-cert.pem"));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let message = rotation["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "on host {}, issuing under root sha256 {root_sha256}",
            host.trim()
        )),
        "{message}"
    );
    let decisions: Vec<&Value> = lines.iter().filter(|l| l["event"] == "decision").collect();
    assert_eq!(decisions.len(), 2, "{lines:?}");
    for line in lines.iter().skip(1) {
        assert_eq!(line["rulesSha256"], digest.as_str(), "{line}");
    }
    // Older logs (rotation records without these fields) and the new file verify alike.
    env.audit_verify_ok();
    run_ok(
        env.meshca()
            .args(["audit", "verify", "audit.log.1", "audit.log"]),
    );
}

/// A log moved away while the signer is idle, then a clean stop: the stop record goes
/// into a new file at the path, beginning with its `rotation` record, so the next start
/// continues the chain there and the two files verify together.
#[tokio::test]
async fn an_audit_log_moved_away_while_idle_before_a_stop_is_continued_by_the_next_start() {
    let env = Env::new();
    let client = env.client("cluster-a");
    let mut signer = env.start_signer();
    assert_still_issues(&client, &signer).await;
    std::fs::rename(env.path("audit.log"), env.path("audit.log.0")).unwrap();
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");
    let events = |lines: Vec<Value>| -> Vec<String> {
        lines
            .iter()
            .map(|l| l["event"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(events(signer.all_audit_lines()), ["rotation", "stop"]);
    let mut signer = env.start_signer();
    assert_still_issues(&client, &signer).await;
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");
    assert_eq!(
        events(signer.all_audit_lines()),
        ["rotation", "stop", "start", "decision", "stop"]
    );
    let both = run_ok(
        env.meshca()
            .args(["audit", "verify", "audit.log.0", "audit.log"]),
    );
    let both = text(&both.stdout);
    assert!(
        both.contains("audit.log.0 is intact: 2 records")
            && both.contains("audit.log is intact: 5 records"),
        "{both}"
    );
}

/// Two signers writing one audit log would fork its chain (each continues from its own
/// last line): a second `meshca serve` with the same `audit_log` stops at start, naming
/// the lock, before it reads or changes the log; the first serves on and its log verifies.
#[tokio::test]
async fn a_second_signer_on_the_same_audit_log_is_refused_and_the_first_serves_on() {
    let env = Env::new();
    let mut first = env.start_signer();
    let client = env.client("cluster-a");
    assert_still_issues(&client, &first).await;
    let log = std::fs::read(env.path("audit.log")).unwrap();
    // The same config: `listen` is port 0, so the two share the audit log (and the token)
    // only. Bounded, in case it starts after all.
    let second = run(Command::new("timeout")
        .arg("30")
        .arg(MESHCA)
        .args(["serve", "--config"])
        .arg(&env.config)
        .current_dir(env.dir.path()));
    let stderr = text(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("audit.log is locked by another meshca process"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(env.path("audit.log")).unwrap(), log);

    assert_still_issues(&client, &first).await;
    assert!(first.terminate(), "SIGTERM must drain and exit 0");
    assert_eq!(first.audit_lines().len(), 2);
    env.audit_verify_ok();
}

#[tokio::test]
async fn secrets_stay_out_of_debug_logs() {
    let env = Env::new();
    let mut signer = env.start_signer_with(&["--log-level", "debug"]);
    let client = env.client("cluster-a");
    let (key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let (status, _) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)).await;
    assert_eq!(status, 200);
    let bad = client
        .post(signer.url("/v1/sign"))
        .json(&json!({"csr": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    // Stopped first, so every line it wrote (the last request's too) is searched.
    assert!(signer.terminate());
    let logs = signer.logs();
    let audit = std::fs::read_to_string(env.path("audit.log")).unwrap();
    let pin = env.user_pin();
    let key_pem = key.to_pkcs8_pem().unwrap();
    let key_body: String = key_pem.lines().nth(1).unwrap().to_string();
    let signer_key = std::fs::read_to_string(env.path("pki/signer.key")).unwrap();
    let signer_key_body = signer_key.lines().nth(1).unwrap().to_string();
    // Before any message prints the logs, which would then hold the secret.
    for (name, haystack) in [("logs", &logs), ("audit log", &audit)] {
        assert!(!haystack.contains(&pin), "the PIN is in the {name}");
        assert!(
            !haystack.contains(&key_body),
            "the CSR's key is in the {name}"
        );
        assert!(
            !haystack.contains(&signer_key_body),
            "the signer's TLS key is in the {name}"
        );
    }
    assert!(
        logs.contains("\"level\":\"DEBUG\""),
        "debug logging was not on:\n{logs}"
    );
}

#[tokio::test]
async fn a_next_root_is_announced_checked_and_put_in_force_by_a_reload() {
    let env = Env::new();
    let work = env.dir.path();
    let next_root = env.init_next_root();
    let next_sha256 = openssl_fingerprint(work, &next_root);
    let root_sha256 = openssl_fingerprint(work, &env.path("root-cert.pem"));
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let policy = || signer.get_json(&client, "/v1/virtualmeshes/test/vm");
    let trust_bundle = || trust_bundle_roots(&signer, &client);
    let reloaded = |n: usize| signer.wait_for_nth_log("SIGHUP: rules", n);
    let sighup = || send_signal(signer.child.id(), "HUP");
    assert!(policy().await["nextRootFingerprintSha256"].is_null());
    assert_eq!(trust_bundle().await, vec![root_sha256.clone()]);

    // Announced by a reload: in the policy (the certificate is the file's), in the trust
    // bundle after the root, in the audit log; intermediates still come from the root.
    env.announce_next_root(Some("next-root-cert.pem"));
    sighup();
    let line = reloaded(1).await;
    let announced = format!("next root sha256 {next_sha256} announced");
    assert!(line.contains(&announced), "{line}");
    let answer = policy().await;
    assert_eq!(answer["nextRootFingerprintSha256"], next_sha256.as_str());
    assert_eq!(
        certificate_fingerprint(work, &answer, "nextRootCert"),
        next_sha256
    );
    assert_eq!(
        trust_bundle().await,
        [root_sha256.clone(), next_sha256.clone()]
    );
    assert_eq!(
        announced_root_not_after(&signer, &client, "next").await,
        Some(certificate_date_unix(&next_root, "enddate"))
    );
    assert_eq!(
        roots_issued_under(&signer, &client).await,
        vec![root_sha256.clone()]
    );
    assert_reload_audited(&signer, &announced);

    // Refused by name, and the announcement in force stays: the root in force itself, and
    // a root of another organization.
    env.announce_next_root(Some("root-cert.pem"));
    sighup();
    let line = reloaded(2).await;
    assert!(
        line.contains("not reloaded") && line.contains("is the root in force"),
        "{line}"
    );
    openssl_self_signed_ca(work, "other-org", "/O=other/CN=root", 0..20);
    env.announce_next_root(Some("other-org.pem"));
    sighup();
    let line = reloaded(3).await;
    assert!(
        line.contains("not reloaded")
            && line.contains("root.next_certificate")
            && line.contains("other-org.pem")
            && line.contains("policy requires exactly \\\"acme\\\""),
        "{line}"
    );
    let out = env.run_with_config(&["serve", "--check"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("other-org.pem"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        policy().await["nextRootFingerprintSha256"],
        next_sha256.as_str()
    );

    // `serve --check` shows it; withdrawn by a reload, it is gone from the answers.
    env.announce_next_root(Some("next-root-cert.pem"));
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(
        report.contains("next root       ") && report.contains(&next_sha256),
        "{report}"
    );
    // Beside the running signer: its audit log, the check sees, is the one it writes.
    assert!(
        report.contains("; written by a running signer, which holds its lock)"),
        "{report}"
    );
    let shown = root_show(&env);
    assert!(
        shown.contains("next root ")
            && shown.contains("next-root-cert.pem (root.next_certificate, announced")
            && shown.contains(&format!("sha256       {next_sha256}"))
            && !shown.contains("EXPIRED"),
        "{shown}"
    );
    env.announce_next_root(None);
    sighup();
    let line = reloaded(4).await;
    assert!(
        line.contains(&format!(
            "next root sha256 {next_sha256} no longer announced"
        )),
        "{line}"
    );
    assert!(policy().await["nextRootFingerprintSha256"].is_null());
    assert_eq!(trust_bundle().await, std::slice::from_ref(&root_sha256));

    // A next root that has ended (prepared, then the switch never made) stays announced
    // (the agents skip it): a reload and `serve --check` warn, and a restart is not refused
    // because time passed.
    let ended = openssl_self_signed_ca(work, "ended-next", "/O=acme/CN=ended next root", -30..-1);
    let ended_sha256 = openssl_fingerprint(work, &ended);
    env.announce_next_root(Some("ended-next.pem"));
    sighup();
    let line = reloaded(5).await;
    assert!(
        line.contains(&format!("next root sha256 {ended_sha256} announced")),
        "{line}"
    );
    let expired =
        "the next root (root.next_certificate) has expired: the agents no longer trust it";
    let warning = signer.wait_for_log(expired).await;
    assert!(
        warning.contains("\"level\":\"WARN\"") && warning.contains(&ended_sha256),
        "{warning}"
    );
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(
        report.contains("warning: the next root (root.next_certificate) expired at"),
        "{report}"
    );
    let shown = root_show(&env);
    assert!(
        shown.contains("(EXPIRED: the agents no longer trust it)")
            && shown.contains(&format!("sha256       {ended_sha256}")),
        "{shown}"
    );
    assert_eq!(
        announced_root_not_after(&signer, &client, "next").await,
        Some(certificate_date_unix(&ended, "enddate"))
    );
    let mut signer = signer;
    assert!(signer.terminate());
    let restarted = env.start_signer();
    restarted.wait_for_log(expired).await;
    let answer = restarted
        .get_json(&client, "/v1/virtualmeshes/test/vm")
        .await;
    assert_eq!(answer["nextRootFingerprintSha256"], ended_sha256.as_str());
    assert_eq!(
        roots_issued_under(&restarted, &client).await,
        vec![root_sha256]
    );
    drop(restarted);

    // A start with the root in force as the next root is refused.
    env.announce_next_root(Some("root-cert.pem"));
    let out = env.run_with_config(&["serve"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is the root in force"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn a_previous_root_is_announced_after_the_switch_until_withdrawn() {
    let env = Env::new();
    let work = env.dir.path();
    let old_sha256 = openssl_fingerprint(work, &env.path("root-cert.pem"));
    let new_sha256 = openssl_fingerprint(work, &env.init_next_root());
    env.switch_to_next_root();
    env.announce_previous_root(Some("root-cert.pem"));
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let policy = || signer.get_json(&client, "/v1/virtualmeshes/test/vm");
    let trust_bundle = || trust_bundle_roots(&signer, &client);
    let reloaded = |n: usize| signer.wait_for_nth_log("SIGHUP: rules", n);
    let sighup = || send_signal(signer.child.id(), "HUP");

    // In the policy (the certificate is the file's) and in the trust bundle after the root;
    // intermediates come from the root in force only.
    let answer = policy().await;
    assert_eq!(answer["rootFingerprintSha256"], new_sha256.as_str());
    assert_eq!(answer["previousRootFingerprintSha256"], old_sha256.as_str());
    assert!(answer["nextRootFingerprintSha256"].is_null());
    assert_eq!(
        certificate_fingerprint(work, &answer, "previousRootCert"),
        old_sha256
    );
    assert_eq!(
        trust_bundle().await,
        [new_sha256.clone(), old_sha256.clone()]
    );
    assert_eq!(
        roots_issued_under(&signer, &client).await,
        vec![new_sha256.clone()]
    );
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(
        report.contains("previous root   ") && report.contains(&old_sha256),
        "{report}"
    );
    let shown = root_show(&env);
    assert!(
        shown.contains(&format!("sha256       {new_sha256}"))
            && shown.contains("root-cert.pem (root.previous_certificate, announced")
            && shown.contains(&format!("sha256       {old_sha256}")),
        "{shown}"
    );
    // Its end, as openssl reads it, is exported (an alert watches the next root's).
    assert_eq!(
        announced_root_not_after(&signer, &client, "previous").await,
        Some(certificate_date_unix(&env.path("root-cert.pem"), "enddate"))
    );

    // Refused by name, the announcement in force kept: the root in force itself, and the
    // root also announced as the next one.
    env.announce_previous_root(Some("next-root-cert.pem"));
    sighup();
    let line = reloaded(1).await;
    assert!(
        line.contains("not reloaded")
            && line.contains("root.previous_certificate")
            && line.contains("is the root in force"),
        "{line}"
    );
    env.announce_previous_root(Some("root-cert.pem"));
    env.announce_next_root(Some("root-cert.pem"));
    sighup();
    let line = reloaded(2).await;
    assert!(
        line.contains("not reloaded") && line.contains("is also root.next_certificate"),
        "{line}"
    );
    env.announce_next_root(None);
    assert_eq!(
        policy().await["previousRootFingerprintSha256"],
        old_sha256.as_str()
    );

    // An expired previous root does not stop a start or a reload: `serve --check` and
    // the reload say so.
    let ended = openssl_self_signed_ca(work, "ended", "/O=acme/CN=ended root", -30..-1);
    let ended_sha256 = openssl_fingerprint(work, &ended);
    env.announce_previous_root(Some("ended.pem"));
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(
        report.contains("the previous root (root.previous_certificate) expired at"),
        "{report}"
    );
    sighup();
    let line = reloaded(3).await;
    assert!(
        line.contains(&format!(
            "previous root sha256 {old_sha256} -> {ended_sha256}"
        )),
        "{line}"
    );
    let warning = signer
        .wait_for_log("the previous root (root.previous_certificate) has expired")
        .await;
    assert!(warning.contains("withdraw it and reload"), "{warning}");

    // Withdrawn by a reload: gone from the answers, recorded.
    env.announce_previous_root(None);
    sighup();
    let line = reloaded(4).await;
    let withdrawn = format!("previous root sha256 {ended_sha256} no longer announced");
    assert!(line.contains(&withdrawn), "{line}");
    assert!(policy().await["previousRootFingerprintSha256"].is_null());
    assert_eq!(trust_bundle().await, [new_sha256]);
    assert_eq!(
        announced_root_not_after(&signer, &client, "previous").await,
        None
    );
    assert_reload_audited(&signer, &withdrawn);
}

/// What `meshca root show` prints (it logs in to the token beside the running signer).
fn root_show(env: &Env) -> String {
    text(&env.run_with_config_ok(&["root", "show"]).stdout)
}

/// The SHA-256 of the certificate (PEM) in `field` of a policy answer, as openssl computes
/// it.
fn certificate_fingerprint(work: &Path, answer: &Value, field: &str) -> String {
    let file = write(
        work,
        &format!("{field}.pem"),
        answer[field].as_str().unwrap(),
    );
    openssl_fingerprint(work, &file)
}

/// The roots of `/v1/trust-bundle`, in order.
async fn trust_bundle_roots(signer: &Signer, client: &reqwest::Client) -> Vec<String> {
    root_fingerprints(&signer.get_text(client, "/v1/trust-bundle").await)
}

/// The roots in the rootCert of an intermediate issued now for cluster-a.
async fn roots_issued_under(signer: &Signer, client: &reqwest::Client) -> Vec<String> {
    let (_key, request) = csr(KeyType::EcdsaP256, "acme", "cluster-a");
    let (status, body) = post_sign(client, signer, &sign_body(VM, MESH_A, &request)).await;
    assert_eq!(status, 200, "{body}");
    root_fingerprints(body["rootCert"].as_str().unwrap())
}

/// `meshca_announced_root_not_after_timestamp_seconds{announcement}` as exported now.
async fn announced_root_not_after(
    signer: &Signer,
    client: &reqwest::Client,
    announcement: &str,
) -> Option<i64> {
    let sample = format!(
        "meshca_announced_root_not_after_timestamp_seconds{{announcement=\"{announcement}\"}}"
    );
    metric_sample(&signer.metrics(client).await, &sample)
}

/// The audit log holds a `reload` record whose message says `change`.
fn assert_reload_audited(signer: &Signer, change: &str) {
    let audit = signer.audit_lines();
    assert!(
        audit
            .iter()
            .any(|l| l["event"] == "reload" && l["message"].as_str().unwrap().contains(change)),
        "{audit:?}"
    );
}

#[test]
fn the_signer_refuses_to_start_against_a_root_that_is_not_its_key() {
    let env = Env::new();
    let stderr = serve_with_a_foreign_root(&env);
    assert!(
        stderr.contains("does not match the root certificate"),
        "{stderr}"
    );
}

#[test]
fn a_wrong_pin_stops_the_signer_at_start_with_a_clear_message() {
    let env = Env::new();
    std::fs::write(env.path("softhsm/user-pin"), "wrong-pin-1234\n").unwrap();
    let out = env.run_with_config(&["serve"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    // Checked before any message prints stderr, which would then hold the PIN.
    assert!(!stderr.contains("wrong-pin-1234"), "the PIN was printed");
    assert!(stderr.contains("refused the user PIN"), "{stderr}");
    // Its own exit status, which the systemd unit does not restart on: each start would
    // present the wrong PIN again, towards locking the token.
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/meshca-signer.service"),
    )
    .unwrap();
    assert!(
        unit.lines()
            .any(|l| l.trim() == "RestartPreventExitStatus=78"),
        "{unit}"
    );
}

#[test]
fn serve_check_reads_what_a_start_reads_without_the_token_and_names_each_problem() {
    use std::os::unix::fs::PermissionsExt;
    // A P-256 root: a policy demanding RSA-4096 strength is too much for it.
    let env = Env::with(EnvSpec {
        root_key_type: KeyType::EcdsaP256,
        ..EnvSpec::default()
    });
    let pin = env.user_pin();
    let check = |expect_ok: bool| {
        let out = env.run_with_config(&["serve", "--check"]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        // Before any message prints the output, which would then hold the PIN.
        assert!(
            !stdout.contains(&pin) && !stderr.contains(&pin),
            "the PIN was printed"
        );
        assert_eq!(out.status.success(), expect_ok, "{stdout}{stderr}");
        if expect_ok { stdout } else { stderr }
    };

    // As set up: valid, and what was read is shown; nothing is created.
    let report = check(true);
    let root_sha256 = openssl_fingerprint(env.dir.path(), &env.path("root-cert.pem"));
    for needle in [
        "signer.toml is valid",
        "virtual meshes  test/vm",
        "clients         2",
        "ECDSA P-256, valid until",
        &root_sha256,
        "2 sessions, PIN from pkcs11.pin_file ",
        &format!("SoftHSM tokens in {}", env.path("softhsm/tokens").display()),
        "audit.log (created at start)",
        "not checked: the token or Vault login",
    ] {
        assert!(report.contains(needle), "{needle} missing from\n{report}");
    }
    assert!(!env.path("audit.log").exists());
    assert!(!report.contains("warning"), "{report}");
    // --online starts the backend as `serve` does, beside a running signer on the same
    // token: the login and a test signature with the root's key.
    let signer = env.start_signer();
    // The digest the check names is the one the signer records its rules under.
    let rules_line = report
        .lines()
        .find_map(|line| line.trim().strip_prefix("rules           sha256 "))
        .unwrap_or_else(|| panic!("no rules digest in\n{report}"));
    assert_eq!(
        signer.all_audit_lines()[0]["rulesSha256"].as_str(),
        Some(rules_line)
    );
    let online = env.run_with_config_ok(&["serve", "--check", "--online"]);
    let report = text(&online.stdout);
    for needle in [
        "online          pkcs11 pkcs11:",
        "logged in, the root's key answers for the root certificate",
        "not checked: the listen addresses",
    ] {
        assert!(report.contains(needle), "{needle} missing from\n{report}");
    }
    drop(signer);

    // A root that ends within 14 days is named (the check still passes).
    let meshes_file = env.path("virtual-meshes.yaml");
    let meshes = std::fs::read_to_string(&meshes_file).unwrap();
    std::fs::write(&meshes_file, meshes.replace("ttlDays: 30", "ttlDays: 10")).unwrap();
    env.run_with_config_ok(&["root", "init", "--force"]);
    let report = check(true);
    assert!(
        report.contains("warning: the root certificate expires at"),
        "{report}"
    );

    // A client CA bundle holding a CA that ends within 14 days: named (every client
    // chaining only to it will be refused from then on).
    let client_ca = std::fs::read_to_string(env.path("pki/ca.pem")).unwrap();
    let short = openssl_self_signed_ca(env.dir.path(), "short-ca", "/O=acme/CN=short CA", 0..10);
    std::fs::write(
        env.path("pki/ca.pem"),
        client_ca.clone() + &std::fs::read_to_string(&short).unwrap(),
    )
    .unwrap();
    let report = check(true);
    let ends = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(certificate_date_unix(&short, "enddate") as u64);
    let warning = format!(
        "warning: a client CA certificate (tls.client_ca) expires at {}",
        meshca::signer::audit::rfc3339(ends)
    );
    assert!(
        report.contains(&warning),
        "{warning} missing from\n{report}"
    );
    std::fs::write(env.path("pki/ca.pem"), client_ca).unwrap();

    // An audit log torn by a crash, that anyone may write, is named; the check leaves it
    // as it is.
    let torn_log = "{\"event\":\"decision\"}\n{\"event\":\"dec";
    std::fs::write(env.path("audit.log"), torn_log).unwrap();
    let everyone = std::fs::Permissions::from_mode(0o666);
    std::fs::set_permissions(env.path("audit.log"), everyone).unwrap();
    let report = check(true);
    for needle in [
        "audit.log (34 bytes)",
        "warning: the audit log ends in an incomplete line of 13 bytes",
        "warning: the audit log is writable by group or others (mode 666): the start removes their write access",
        "warning: the audit log is readable by every user (mode 666",
    ] {
        assert!(report.contains(needle), "{needle} missing from\n{report}");
    }
    assert_eq!(
        std::fs::read_to_string(env.path("audit.log")).unwrap(),
        torn_log
    );
    let mode = std::fs::metadata(env.path("audit.log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);
    std::fs::remove_file(env.path("audit.log")).unwrap();

    // The token is not contacted: a wrong PIN passes the check (a start fails on it),
    // unless --online, which is refused as a start is.
    std::fs::write(env.path("softhsm/user-pin"), "wrong-pin-1234\n").unwrap();
    check(true);
    let out = env.run_with_config(&["serve", "--check", "--online"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    // Before any message prints stderr, which would then hold the PIN.
    assert!(!stderr.contains("wrong-pin-1234"), "the PIN was printed");
    assert!(
        stderr.contains("is not ready to serve") && stderr.contains("refused the user PIN"),
        "{stderr}"
    );

    // Each problem is named, and the file is put back before the next.
    let broken = |path: &str, contents: String, needle: &str| {
        let original = std::fs::read(env.path(path)).unwrap();
        std::fs::write(env.path(path), contents).unwrap();
        let stderr = check(false);
        assert!(stderr.contains(needle), "{needle} missing from\n{stderr}");
        std::fs::write(env.path(path), original).unwrap();
    };
    let meshes = std::fs::read_to_string(&meshes_file).unwrap();
    broken(
        "virtual-meshes.yaml",
        meshes.replace("rsaKeySizeBytes: 2048", "rsaKeySizeBytes: 4096"),
        "too weak for virtual mesh test/vm",
    );
    broken(
        "virtual-meshes.yaml",
        meshes.replace("ttlDays", "ttlDayz"),
        "ttlDayz",
    );
    // The server certificate with another key (a client's).
    let client_key = std::fs::read_to_string(env.path("pki/cluster-a.key")).unwrap();
    broken(
        "pki/signer.key",
        client_key,
        "pki/signer.key is not the private key of the certificate",
    );
    broken("pki/ca.pem", "not a certificate\n".into(), "pki/ca.pem");
    let config = std::fs::read_to_string(&env.config).unwrap();
    broken(
        "signer.toml",
        config.replace(
            "audit_log = \"audit.log\"",
            "audit_log = \"gone/audit.log\"",
        ),
        "gone does not exist",
    );
    broken(
        "signer.toml",
        config.replace("sessions = 2", "sesions = 2"),
        "sesions",
    );
    let root = env.root_pem();
    std::fs::remove_file(env.path("root-cert.pem")).unwrap();
    let stderr = check(false);
    assert!(
        stderr.contains("signer.toml is not ready to serve") && stderr.contains("meshca root init"),
        "{stderr}"
    );
    std::fs::write(env.path("root-cert.pem"), root).unwrap();

    // A PIN file others can read is refused as at start, by name, without its contents.
    let user_pin = env.path("softhsm/user-pin");
    std::fs::set_permissions(&user_pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = check(false);
    assert!(
        !stderr.contains("wrong-pin-1234"),
        "the PIN file's contents were printed"
    );
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

/// `--log-level` wins over RUST_LOG (before, RUST_LOG won, silently, and with it the
/// Vault libraries' own error lines came back), and a filter tracing cannot use is
/// refused by name, not replaced by `info`; so is a misspelled level, which tracing would
/// read as a target and log nothing else, errors included.
#[tokio::test]
async fn the_log_level_flag_wins_over_rust_log_and_a_bad_filter_is_refused() {
    let env = Env::new();
    let signer = env.start_signer_command(|cmd| {
        cmd.env("RUST_LOG", "info")
            .args(["--log-level", "meshca=debug"]);
    });
    let (status, body) = sign_fresh(&env.client("cluster-a"), &signer).await;
    assert_eq!(status, 200, "{body}");
    signer.wait_for_log("issued intermediate").await;

    let with_filter = |flag: Option<&str>, environment: Option<&str>| {
        let mut cmd = env.meshca();
        cmd.env_remove("RUST_LOG");
        if let Some(filter) = flag {
            cmd.args(["--log-level", filter]);
        }
        if let Some(filter) = environment {
            cmd.env("RUST_LOG", filter);
        }
        run(cmd.args(["crds", "--for", "agent"]))
    };
    for (flag, environment) in [(Some("meshca=["), None), (None, Some("meshca=["))] {
        let out = with_filter(flag, environment);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("invalid value 'meshca=[' for '--log-level")
                && stderr.contains("not a log filter"),
            "{stderr}"
        );
    }
    for (flag, environment) in [(Some("wran"), None), (None, Some("wran"))] {
        let out = with_filter(flag, environment);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("invalid value 'wran' for '--log-level")
                && stderr.contains("neither a log level (trace, debug, info, warn, error, off)"),
            "{stderr}"
        );
    }
    for filter in [
        "info",
        "WARN",
        "meshca=debug,vaultrs=info",
        "meshca::signer=trace",
    ] {
        for (flag, environment) in [(Some(filter), None), (None, Some(filter))] {
            let out = with_filter(flag, environment);
            assert!(out.status.success(), "{filter}: {}", text(&out.stderr));
        }
    }
}

/// A shell's or a container runtime's limit on open files (often 1024) is under what the
/// default `max_connections` needs (1024 API connections, 64 ops ones, 16 per port
/// waiting for a closed connection's slot and a reserve), so
/// unauthenticated connections could use up the signer's descriptors. The start raises
/// the soft limit up to the hard one; a hard limit too low is named at start and by
/// `serve --check`.
#[tokio::test]
async fn the_limit_on_open_files_is_raised_at_start_and_one_too_low_is_named() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let limit_to =
        |soft: u64, hard: u64| move || rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard);
    let soft_limit_of = |pid: u32| -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_string();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    let needed = 1024 + 64 + 2 * 16 + 64;
    let shortfall = "the limit on open files";

    // SAFETY: the closure only calls setrlimit, which is async-signal-safe, between fork
    // and exec.
    let signer = env.start_signer_command(|cmd| unsafe {
        cmd.pre_exec(limit_to(64, hard));
    });
    let raised = hard.min(65536);
    assert_eq!(soft_limit_of(signer.child.id()), raised);
    assert_eq!(
        signer.logs().contains(shortfall),
        raised < needed,
        "{}",
        signer.logs()
    );
    drop(signer);

    // SAFETY: the closure only calls setrlimit, which is async-signal-safe, between fork
    // and exec.
    let mut signer = env.start_signer_command(|cmd| unsafe {
        cmd.pre_exec(limit_to(64, 64));
    });
    let warning =
        format!("{shortfall} (64) is below what limits.max_connections (1024) needs ({needed}");
    signer.wait_for_log(&warning).await;
    assert_still_issues(&env.client("cluster-a"), &signer).await;
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");
    let mut check = env.meshca_with_config(&["serve", "--check"]);
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe, between fork
    // and exec.
    unsafe {
        check.pre_exec(limit_to(64, 64));
    }
    let report = text(&run_ok(&mut check).stdout);
    assert!(report.contains(&format!("warning: {warning}")), "{report}");
}

/// With stderr's reader gone (`meshca serve 2>&1 | tee log` after tee died) a log line is
/// dropped, not a reason to abort: the signer keeps serving and stops cleanly, its stop
/// record written. Before, the first line after the pipe broke aborted the process.
#[tokio::test]
async fn a_signer_whose_stderr_reader_is_gone_keeps_serving_and_stops_cleanly() {
    use std::io::BufRead;
    let env = Env::new();
    let mut child = env
        .meshca_with_config(&["--log-format", "json", "serve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: std::net::SocketAddr = loop {
        let line = lines
            .next()
            .expect("stderr ended before the signer listened")
            .unwrap();
        if let Ok(event) = serde_json::from_str::<Value>(&line)
            && let Some(api) = event["api"].as_str()
        {
            break api.parse().unwrap();
        }
    };
    drop(lines);

    // A refused handshake is logged (into the broken pipe); then a trusted client is served.
    let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut junk, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    drop(junk);
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let answer = env
        .client("cluster-a")
        .post(format!("https://{addr}/v1/sign"))
        .json(&sign_body(VM, MESH_A, &csr))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert!(child.try_wait().unwrap().is_none(), "the signer exited");

    // Its stop is logged too (into the broken pipe) before the stop record is written.
    send_signal(child.id(), "TERM");
    let status = wait_within(&mut child, EXIT_WAIT).expect("the signer did not stop");
    assert!(status.success(), "{status:?}");
    let audit = std::fs::read_to_string(env.path("audit.log")).unwrap();
    let last: Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "stop", "{audit}");
}

/// A crash must not write the PIN or the Vault credentials in the signer's memory to a
/// core file: the signer sets its core file size limit to 0, soft and hard, at start,
/// whatever limit it was started with (here the test's hard limit, or unlimited).
#[tokio::test]
async fn the_signer_writes_no_core_file() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::CORE).unwrap();
    // Started with core files allowed, so the limit read back is the signer's own doing.
    let allowed = if hard > 0 { hard } else { rlimit::INFINITY };
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe, between fork
    // and exec.
    let signer = env.start_signer_command(|cmd| unsafe {
        cmd.pre_exec(move || rlimit::setrlimit(rlimit::Resource::CORE, allowed, allowed));
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", signer.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    // What the benches read of a running signer stays readable.
    let status = std::fs::read_to_string(format!("/proc/{}/status", signer.child.id())).unwrap();
    assert!(status.contains("VmHWM:"), "{status}");
}

/// A transport key every user of the host can read is warned of, not refused (a
/// Kubernetes Secret volume is 0644 unless told otherwise): by `serve --check`, at start
/// and at each reload of the signer, and by `meshca request` for its client key. Read by
/// the group only (the systemd guide's 0640) is not.
#[tokio::test]
async fn a_transport_key_other_users_can_read_is_warned_of() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let chmod = |file: &str, mode: u32| {
        std::fs::set_permissions(env.path(file), std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let open = |file: &str| {
        let path = env.path(file).display().to_string();
        (
            format!("the private key {path} can be read by other users (mode 644)"),
            format!("run: chmod 600 {path}"),
        )
    };
    let (server_open, server_chmod) = open("pki/signer.key");
    chmod("pki/signer.key", 0o644);
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(
        report.contains(&format!("warning: {server_open}")) && report.contains(&server_chmod),
        "{report}"
    );

    let mut signer = env.start_signer();
    let at_start = signer.wait_for_log(&server_open).await;
    assert!(
        at_start.contains("\"level\":\"WARN\"") && at_start.contains(&server_chmod),
        "{at_start}"
    );
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_nth_log(&server_open, 2).await;

    let (client_open, client_chmod) = open("pki/cluster-a.key");
    chmod("pki/cluster-a.key", 0o644);
    let out = run_ok(
        env.meshca()
            .arg("request")
            .args(env.signer_flags(signer.addr, "cluster-a"))
            .args(["--virtual-mesh", "test/vm", "--mesh", "test/cluster-a"])
            .arg("--out-dir")
            .arg(env.path("cacerts")),
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("WARN") && stderr.contains(&client_open) && stderr.contains(&client_chmod),
        "{stderr}"
    );
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");

    chmod("pki/signer.key", 0o640);
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(!report.contains("private key"), "{report}");
}

/// A signer whose root has ended: a SoftHSM root made by `root init`, the signer run with
/// its clock (libfaketime, preloaded) two days past the root's notAfter while its TLS
/// certificates are still valid. It starts, says so at ERROR, answers /readyz 503
/// `root_expired`, refuses a signing request with that code, audits the refusal under
/// that rule and counts it in the outcome the alert `MeshcaSignRequestsRefusedRootExpired`
/// looks at.
#[tokio::test]
async fn a_signer_past_its_roots_end_is_not_ready_and_refuses_with_root_expired() {
    let env = Env::new();
    let root_not_after = certificate_date_unix(&env.path("root-cert.pem"), "enddate");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let days_ahead = (root_not_after - now) / 86_400 + 2;
    // The signer's own certificate must outlive the jump, or it would be refused first.
    assert!(
        certificate_date_unix(&env.path("pki/signer.pem"), "enddate")
            > now + (days_ahead + 1) * 86_400
    );
    let signer = env.start_signer_in_the_future(&format!("+{days_ahead}d"));
    let started = signer.wait_for_log("signer listening").await;
    let logs = signer.logs();
    let expired = logs
        .lines()
        .find(|l| l.contains("the root certificate has expired"))
        .unwrap_or_else(|| panic!("no word of the expired root before\n{started}\n{logs}"));
    assert!(expired.contains("\"level\":\"ERROR\""), "{expired}");

    let client = env.client("cluster-a");
    let ready = client.get(signer.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(error_code(&ready), "root_expired", "{ready}");

    let (status, body) = sign_fresh(&client, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_code(&body), "root_expired", "{body}");
    // When it ended (as openssl reads it), said alike by /readyz and the refusal.
    let ended = format!(
        "the root certificate expired at {}: every signing request is refused",
        meshca::signer::audit::rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(root_not_after as u64)
        )
    );
    for message in [error_message(&ready), error_message(&body)] {
        assert!(message.starts_with(&ended), "{message}\n{ended}");
    }
    let audit = signer.audit_lines();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["event"], "decision", "{audit:?}");
    assert_eq!(audit[0]["rule"], "root_expired", "{audit:?}");
    assert_eq!(audit[0]["client"], identity("cluster-a"), "{audit:?}");

    let metrics = signer.metrics(&client).await;
    assert_eq!(
        metric_sample(
            &metrics,
            "meshca_sign_requests_total{outcome=\"root_expired\"}"
        ),
        Some(1),
        "{metrics}"
    );
    let left = metric_sample(&metrics, "meshca_root_expiry_seconds").unwrap();
    assert!(left < -86_400, "{left}");
    env.audit_verify_ok();
}

#[test]
fn the_check_shows_the_settings_in_force() {
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\nsign_requests_per_minute = 42\nbody_timeout_ms = 7000\n".into(),
        ..EnvSpec::default()
    });
    let config = std::fs::read_to_string(&env.config).unwrap().replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"",
        1,
    );
    std::fs::write(&env.config, config).unwrap();
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    for shown in [
        "  listen          127.0.0.1:0, ops 127.0.0.1:0\n",
        // The rules as the audit log's start record holds them, under their digest.
        &format!(
            "    grant \"{}\" test/vm test/cluster-a\n",
            identity("cluster-a")
        ),
        "    limit sign_requests_per_minute=42\n",
        "    limit sign_burst=60\n",
        "    limit max_connections=1024\n",
        "    limit body_timeout_ms=7000\n",
        "    limit drain_timeout_ms=30000\n",
        "    virtual_mesh test/vm org=\"acme\"",
        "  CRL overdue     accept: while a client CRL is past its nextUpdate, ",
    ] {
        assert!(report.contains(shown), "{shown:?} not in:\n{report}");
    }
}

/// The review's finding: with `spec.trustDomains` a cluster's intermediate key signs
/// workload identities of its own trust domains only. Without it, any (the default:
/// intermediates carry no name constraints, as before).
#[tokio::test]
async fn an_intermediate_names_only_its_virtual_meshs_trust_domains() {
    let mut spec = EnvSpec::default();
    spec.virtual_meshes[0].push_str("  trustDomains: [pay.local]\n");
    let env = Env::with(spec);
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let (key, request) = csr(KeyType::EcdsaP256, "acme", "cluster-a");
    let (status, body) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &request)).await;
    assert_eq!(status, 200, "{body}");
    let profile = openssl_verifies(&env, &body, "constrained");
    assert!(
        profile.contains("X509v3 Name Constraints: critical"),
        "{profile}"
    );
    assert!(
        profile.contains("Permitted:\n                  URI:pay.local\n"),
        "{profile}"
    );
    assert!(!profile.contains("Excluded"), "{profile}");
    let dir = env.path("constrained");
    assert_constrained_to_pay_local(&dir, &key);
    // istiod's own serving certificate names DNS only: not constrained.
    let (out, ok) = leaf_verifies(&dir, "istiod", "DNS:istiod.istio-system.svc");
    assert!(ok && out.contains("istiod.pem: OK"), "{out}");
    // What the agent and `meshca verify` check of an installed bundle takes it.
    let verified = run_ok(env.meshca().arg("verify").arg(&dir));
    assert!(
        text(&verified.stdout).contains("is a valid plugged-in CA bundle"),
        "{verified:?}"
    );
    // The rules name the trust domains (the audit's start record holds the rules).
    let start = &signer.all_audit_lines()[0];
    assert_eq!(start["event"], "start");
    assert!(
        start["rules"]
            .as_str()
            .unwrap()
            .contains(" meshes=test/cluster-a, test/cluster-b trust_domains=pay.local\n"),
        "{start}"
    );

    // Without the field: no name constraints, any URI.
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let (key, request) = csr(KeyType::EcdsaP256, "acme", "cluster-a");
    let (status, body) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &request)).await;
    assert_eq!(status, 200, "{body}");
    let profile = openssl_verifies(&env, &body, "unconstrained");
    assert!(!profile.contains("Name Constraints"), "{profile}");
    let dir = env.path("unconstrained");
    std::fs::write(
        dir.join("ca-key.pem"),
        key.to_pkcs8_pem().unwrap().as_bytes(),
    )
    .unwrap();
    let (out, ok) = leaf_verifies(&dir, "web", "URI:spiffe://web.local/ns/web/sa/frontend");
    assert!(ok, "{out}");
}

/// Several virtual meshes on one signer without trust domains: said at start and by
/// `serve --check`, not refused.
#[tokio::test]
async fn virtual_meshes_sharing_the_root_without_trust_domains_are_warned_of() {
    let env = Env::with(EnvSpec::with_strict_mesh());
    let warning = "the virtual meshes test/strict, test/vm share one root and trust each other's workloads: test/strict, test/vm are without spec.trustDomains";
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(report.contains(warning), "{report}");
    let signer = env.start_signer();
    let line = signer.wait_for_log(warning).await;
    assert!(line.contains("WARN"), "{line}");

    // A reload says it again of the virtual meshes it loaded: here test/vm alone lacks
    // trust domains now.
    let meshes_file = env.path("virtual-meshes.yaml");
    let meshes = std::fs::read_to_string(&meshes_file).unwrap();
    let strict_member = "  - name: cluster-strict\n    namespace: test\n";
    assert!(meshes.contains(strict_member), "{meshes}");
    let constrained = meshes.replace(
        strict_member,
        &format!("{strict_member}  trustDomains: [strict.local]\n"),
    );
    std::fs::write(&meshes_file, constrained).unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer
        .wait_for_log("share one root and trust each other's workloads: test/vm is without")
        .await;
    assert!(line.contains("WARN") && line.contains("SIGHUP"), "{line}");
    // And that rustls peers (ztunnel) refuse what test/strict's intermediates now carry.
    let rustls = "virtual mesh test/strict sets spec.trustDomains: its intermediates carry URI name constraints, which rustls-webpki does not support";
    let line = signer.wait_for_log(rustls).await;
    assert!(line.contains("WARN") && line.contains("SIGHUP"), "{line}");

    // A SIGHUP that changes neither says them again (it repeated every warning): its
    // warnings come before its "rules reloaded" line.
    send_signal(signer.child.id(), "HUP");
    signer
        .wait_for_nth_log("SIGHUP: rules reloaded; nothing in them changed", 1)
        .await;
    let logs = signer.logs();
    for warning in [rustls, "test/vm is without"] {
        assert_eq!(logs.matches(warning).count(), 1, "{warning}: {logs}");
    }
}

/// `--listen` replaces the file's `listen`: the address checked against `ops_listen` is the
/// one used, by `serve` and by `serve --check` alike.
#[tokio::test]
async fn the_listen_address_checked_against_ops_listen_is_the_one_used() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ops = format!("127.0.0.1:{port}");
    let with_listen = |listen: &str| {
        let config = std::fs::read_to_string(&env.config).unwrap();
        let config: Vec<&str> = config
            .lines()
            .filter(|l| !l.starts_with("listen = ") && !l.starts_with("ops_listen = "))
            .collect();
        std::fs::write(
            &env.config,
            format!(
                "listen = \"{listen}\"\nops_listen = \"{ops}\"\n{}\n",
                config.join("\n")
            ),
        )
        .unwrap();
    };
    let same_port = format!("ops_listen {ops} and listen {ops} take the same port");
    let flag_same_port = format!("ops_listen {ops} and --listen {ops} take the same port");

    // The file's listen on ops_listen's port, overridden: the check and the start pass.
    with_listen(&ops);
    let refused = env.run_with_config(&["serve", "--check"]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains(&same_port), "{refused:?}");
    let report = env.run_with_config_ok(&["serve", "--check", "--listen", "127.0.0.1:0"]);
    let report = text(&report.stdout);
    assert!(
        report.contains(&format!(
            "  listen          127.0.0.1:0 (--listen), ops {ops}\n"
        )),
        "{report}"
    );
    let mut signer = env.start_signer_with(&["--listen", "127.0.0.1:0"]);
    assert!(signer.terminate());

    // The file's listen elsewhere, --listen on ops_listen's port: refused by name, before
    // any port is bound.
    with_listen("127.0.0.1:0");
    for args in [
        &["serve", "--check", "--listen", ops.as_str()][..],
        &["serve", "--listen", ops.as_str()][..],
    ] {
        let refused = env.run_with_config(args);
        assert!(!refused.status.success(), "{args:?}");
        let stderr = text(&refused.stderr);
        assert!(stderr.contains(&flag_same_port), "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot listen on"), "{args:?}: {stderr}");
    }
}
