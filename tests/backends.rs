//! One table of policy cases, run against both root backends: a SoftHSM token and a real
//! OpenBao server. The same requests must get the same answers (status and code), every
//! decision must be audited, and what is issued must have the same profile (checked by
//! openssl and by `meshca verify`, the istiod-style bundle check).

mod common;

use std::path::Path;

use common::certs::*;
use common::*;
use meshca::pki::keys::KeyType;
use serde_json::{Value, json};

const VM: &str = "test/vm";
const STRICT: &str = "test/strict";
const STRICT_MESH: &str = "test/cluster-strict";
const MESH_A: &str = "test/cluster-a";

struct Case {
    name: &'static str,
    client: &'static str,
    body: Value,
    /// 200 with "issued", or the refusal's status and code.
    status: u16,
    code: &'static str,
    /// For issued cases: the intermediate's private key PEM (for `meshca verify`).
    key_pem: Option<String>,
}

fn case(name: &'static str, body: Value, status: u16, code: &'static str) -> Case {
    Case {
        name,
        client: "cluster-a",
        body,
        status,
        code,
        key_pem: None,
    }
}

/// The table. Built per environment (CSRs are fresh), identical for both backends.
fn cases(dir: &Path) -> Vec<Case> {
    let issued = |name: &'static str, body: Value, key_pem: String| Case {
        key_pem: Some(key_pem),
        ..case(name, body, 200, "issued")
    };
    let pem = |k: &meshca::pki::keys::PrivateKey| k.to_pkcs8_pem().unwrap().to_string();
    let (p256, p256_csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let (p384, p384_csr) = csr(KeyType::EcdsaP384, "acme", "a");
    let (rsa, rsa_csr) = csr(KeyType::Rsa2048, "acme", "a");
    let (_k, evil_org) = csr(KeyType::EcdsaP256, "evil-corp", "a");
    let sneaky = openssl_csr(
        dir,
        "sneaky",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/O=acme/CN=evil.example.com",
        &[
            "-addext",
            "basicConstraints=critical,CA:true,pathlen:5",
            "-addext",
            "subjectAltName=DNS:evil.example.com,URI:spiffe://evil/ns/x",
            "-addext",
            "nameConstraints=permitted;DNS:example.com",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ],
    );
    let sneaky_key = std::fs::read_to_string(dir.join("sneaky.key")).unwrap();
    let p521 = openssl_csr(dir, "p521", KEYGEN_P521, "/O=acme/CN=a", &[]);
    let ed25519 = openssl_csr(dir, "ed25519", KEYGEN_ED25519, "/O=acme/CN=a", &[]);
    let exponent3 = openssl_csr(dir, "e3", KEYGEN_RSA_EXPONENT_3, "/O=acme/CN=a", &[]);
    let rsa1024 = openssl_csr(dir, "rsa1024", KEYGEN_RSA1024, "/O=acme/CN=a", &[]);
    let tampered = tampered_csr("acme", "a", "b");
    let with_ttl = |csr: &str, ttl: u64| json!({"virtualMesh": VM, "mesh": MESH_A, "csr": csr, "ttlSeconds": ttl});
    vec![
        issued("ecdsa p256", sign_body(VM, MESH_A, &p256_csr), pem(&p256)),
        issued("rsa 2048", sign_body(VM, MESH_A, &rsa_csr), pem(&rsa)),
        issued("p384, one hour", with_ttl(&p384_csr, 3600), pem(&p384)),
        issued(
            "csr extensions ignored",
            sign_body(VM, MESH_A, &sneaky),
            sneaky_key,
        ),
        case("org", sign_body(VM, MESH_A, &evil_org), 403, "policy_org"),
        case("ttl", with_ttl(&p256_csr, 31 * 86_400), 403, "policy_ttl"),
        case(
            "ttl too short",
            with_ttl(&p256_csr, 30),
            400,
            "malformed_request",
        ),
        case(
            "rsa 1024",
            sign_body(VM, MESH_A, &rsa1024),
            403,
            "policy_key_size",
        ),
        case(
            "rsa under 4096",
            sign_body(STRICT, STRICT_MESH, &rsa_csr),
            403,
            "policy_key_size",
        ),
        case(
            "p256 under 4096",
            sign_body(STRICT, STRICT_MESH, &p256_csr),
            403,
            "policy_key_algorithm",
        ),
        case(
            "p521",
            sign_body(VM, MESH_A, &p521),
            403,
            "policy_key_algorithm",
        ),
        case(
            "ed25519",
            sign_body(VM, MESH_A, &ed25519),
            403,
            "policy_key_algorithm",
        ),
        case(
            "exponent 3",
            sign_body(VM, MESH_A, &exponent3),
            403,
            "policy_key_exponent",
        ),
        case(
            "possession",
            sign_body(VM, MESH_A, &tampered),
            403,
            "policy_proof_of_possession",
        ),
        Case {
            client: "cluster-b",
            ..case(
                "other cluster's mesh",
                sign_body(VM, MESH_A, &p256_csr),
                403,
                "not_authorized",
            )
        },
        case(
            "unknown mesh",
            sign_body(VM, "test/cluster-z", &p256_csr),
            404,
            "unknown_mesh",
        ),
        case(
            "unknown virtual mesh",
            sign_body("test/nope", MESH_A, &p256_csr),
            404,
            "unknown_virtual_mesh",
        ),
        case(
            "not a csr",
            sign_body(VM, MESH_A, "-----BEGIN CERTIFICATE REQUEST-----\nnope\n"),
            400,
            "malformed_csr",
        ),
    ]
}

/// Checks an issued answer the way the rest of the system will: openssl verifies the
/// chain and prints the profile, `meshca verify` runs istiod's and meshca's checks.
/// Returns openssl's text of the intermediate.
fn check_issued(env: &Env, tag: &str, body: &Value, key_pem: &str) -> String {
    let dir = env.path(tag);
    write_answer(&dir, body);
    openbao::write_secret(&dir.join("ca-key.pem"), key_pem);
    let verified = openssl_verify_bundle(&dir);
    assert!(verified.contains("ca-cert.pem: OK"), "{tag}: {verified}");
    let out = run_ok(
        env.meshca()
            .arg("verify")
            .arg(&dir)
            .arg("--root")
            .arg(env.path("root-cert.pem")),
    );
    assert!(
        text(&out.stdout).contains("is a valid plugged-in CA bundle"),
        "{tag}"
    );
    openssl(&dir, &["x509", "-in", "ca-cert.pem", "-noout", "-text"])
}

/// Runs the table against one backend; returns (case, status, code) per case.
async fn run_table(backend: Backend) -> Vec<(String, u16, String)> {
    let spec = EnvSpec {
        backend: backend.clone(),
        ..EnvSpec::with_strict_mesh()
    };
    let env = Env::with(spec);
    let signer = env.start_signer();
    let table = cases(env.dir.path());
    let mut outcomes = Vec::new();
    for (i, case) in table.iter().enumerate() {
        let label = format!("{} / {}", backend.name(), case.name);
        let (status, body) = post_sign(&env.client(case.client), &signer, &case.body).await;
        let code = if status == 200 {
            "issued".to_string()
        } else {
            let message = body["error"]["message"].as_str().unwrap_or("");
            assert!(!message.is_empty(), "{label}: no message in {body}");
            body["error"]["code"].as_str().unwrap_or("").to_string()
        };
        if let Some(key_pem) = &case.key_pem
            && status == 200
        {
            let profile = check_issued(&env, &format!("issued-{i}"), &body, key_pem);
            for needle in [
                "X509v3 Basic Constraints: critical",
                "CA:TRUE, pathlen:0",
                "X509v3 Key Usage: critical",
                "Digital Signature, Certificate Sign, CRL Sign",
                "X509v3 Subject Key Identifier",
                "X509v3 Authority Key Identifier",
                "Subject: O = acme, CN = cluster-a",
                "ecdsa-with-SHA384",
            ] {
                assert!(
                    profile.contains(needle),
                    "{label}: {needle:?} missing:\n{profile}"
                );
            }
            if case.name == "p384, one hour" {
                // ttlSeconds 3600: valid past half an hour, not past two hours.
                let dir = env.path(&format!("issued-{i}"));
                let checkend = |seconds: &str| {
                    run(std::process::Command::new("openssl")
                        .current_dir(&dir)
                        .args(["x509", "-in", "ca-cert.pem", "-noout", "-checkend", seconds]))
                    .status
                    .success()
                };
                assert!(checkend("1800") && !checkend("7200"), "{label}");
                // notBefore 5 minutes back on both backends (Vault's own default is
                // 30 s): an agent whose clock is a little behind still takes it.
                let cert = meshca::pki::pem::decode_certificates(
                    &std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap(),
                )
                .unwrap()
                .remove(0);
                let not_before = cert
                    .tbs_certificate()
                    .validity()
                    .not_before
                    .to_system_time();
                let back = std::time::SystemTime::now()
                    .duration_since(not_before)
                    .unwrap()
                    .as_secs();
                assert!(
                    (299..=420).contains(&back),
                    "{label}: notBefore {back} s back"
                );
            }
            for forbidden in [
                "Alternative Name",
                "evil",
                "Name Constraints",
                "Extended Key Usage",
                "Authority Information Access",
                "CRL Distribution",
                "pathlen:5",
            ] {
                assert!(
                    !profile.contains(forbidden),
                    "{label}: {forbidden:?} in the certificate:\n{profile}"
                );
            }
        }
        outcomes.push((case.name.to_string(), status, code));
    }
    // Every decision is in the audit log, with its rule, and the chain verifies.
    let audit = signer.audit_lines();
    assert_eq!(audit.len(), table.len(), "{}", backend.name());
    for (line, (name, status, code)) in audit.iter().zip(&outcomes) {
        assert_eq!(line["rule"], code.as_str(), "{} / {name}", backend.name());
        let decision = if *status == 200 { "allow" } else { "deny" };
        assert_eq!(line["decision"], decision, "{} / {name}", backend.name());
    }
    env.audit_verify_ok();
    outcomes
}

#[tokio::test]
async fn the_same_policy_table_gives_the_same_answers_on_both_backends() {
    let expected: Vec<(String, u16, String)> = cases(tempfile::tempdir().unwrap().path())
        .into_iter()
        .map(|c| (c.name.to_string(), c.status, c.code.to_string()))
        .collect();
    for backend in Backend::both() {
        let outcomes = run_table(backend.clone()).await;
        for (got, want) in outcomes.iter().zip(&expected) {
            assert_eq!(got, want, "{}", backend.name());
        }
        assert_eq!(outcomes.len(), expected.len());
    }
}
