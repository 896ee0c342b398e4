//! Hostile input and hostile clients against a running signer: a table of malformed and
//! malicious requests, each answered with its documented status and a message naming the
//! problem, with the signer still serving afterwards; rate limits; revoked and expired
//! client certificates; slow and idle connections; a stalled body; a client that hangs up
//! mid-request; requests still under way when a SIGTERM's drain time is over.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::certs::*;
use common::*;
use der::{Decode, Encode, EncodePem};
use meshca::ops_http::HANDSHAKE_GRACE;
use meshca::pki::keys::KeyType;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VM: &str = "test/vm";
const MESH_A: &str = "test/cluster-a";

/// What a case sends.
enum Send {
    Json(Value),
    Raw {
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// A Content-Type of any bytes a header may carry (not only UTF-8), or none.
    RawHeader {
        content_type: Option<&'static [u8]>,
        body: Vec<u8>,
    },
}

/// An RSA CSR whose public key (SubjectPublicKeyInfo) was changed after the fact.
fn csr_with_rsa_key_changed(change: impl FnOnce(&mut spki::SubjectPublicKeyInfoOwned)) -> String {
    let (key, pem) = csr(KeyType::Rsa2048, "acme", "x");
    drop(key);
    let der = meshca::pki::pem::decode_single(&pem, &["CERTIFICATE REQUEST"]).unwrap();
    let mut req = x509_cert::request::CertReq::from_der(&der).unwrap();
    change(&mut req.info.public_key);
    req.to_pem(der::pem::LineEnding::LF).unwrap()
}

/// An RSA CSR whose public key was given another exponent after the fact.
fn csr_with_rsa_exponent(exponent: &[u8]) -> String {
    csr_with_rsa_key_changed(|key| {
        let rsa = pkcs1::RsaPublicKeyRef::from_der(key.subject_public_key.raw_bytes()).unwrap();
        let modulus = rsa.modulus.as_bytes().to_vec();
        let changed = pkcs1::RsaPublicKeyRef {
            modulus: der::asn1::UintRef::new(&modulus).unwrap(),
            public_exponent: der::asn1::UintRef::new(exponent).unwrap(),
        }
        .to_der()
        .unwrap();
        key.subject_public_key = der::asn1::BitString::from_bytes(&changed).unwrap();
    })
}

fn pem_of(label: &str, der: &[u8]) -> String {
    meshca::pki::pem::encode(label, der)
}

#[tokio::test]
async fn thirty_plus_hostile_requests_get_their_documented_answer_and_the_signer_keeps_serving() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let (_k, good) = csr(KeyType::EcdsaP256, "acme", "x");
    let good_der = meshca::pki::pem::decode_single(&good, &["CERTIFICATE REQUEST"]).unwrap();
    let mut trailing = good_der.clone();
    trailing.extend_from_slice(&[0, 0]);
    let tampered = tampered_csr("acme", "x", "y");
    let mut nested = String::new();
    for _ in 0..5000 {
        nested.push('[');
    }
    let sign = |csr: &str| Send::Json(sign_body(VM, MESH_A, csr));
    // For keys meshca would never generate.
    let openssl_csr = |name: &str, keygen: &[&str]| {
        openssl_csr(env.dir.path(), name, keygen, "/O=acme/CN=x", &[])
    };

    let cases: Vec<(&str, Send, u16, &str, &str)> = vec![
        ("bad PEM", sign("-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"), 400, "malformed_csr", "PEM"),
        ("not PEM at all", sign("hello"), 400, "malformed_csr", "PEM"),
        ("DER garbage", sign(&pem_of("CERTIFICATE REQUEST", &[0xde, 0xad, 0xbe, 0xef])), 400, "malformed_csr", "PKCS#10"),
        ("truncated DER", sign(&pem_of("CERTIFICATE REQUEST", &good_der[..good_der.len() / 2])), 400, "malformed_csr", "PKCS#10"),
        ("trailing data", sign(&pem_of("CERTIFICATE REQUEST", &trailing)), 400, "malformed_csr", "PKCS#10"),
        ("certificate instead of CSR", sign(&env.root_pem()), 400, "malformed_csr", "CERTIFICATE"),
        ("empty CSR", sign(""), 400, "malformed_csr", "PEM"),
        ("wrong CSR signature", sign(&tampered), 403, "policy_proof_of_possession", "does not verify"),
        ("RSA below the minimum", sign(&openssl_csr("rsa1024", KEYGEN_RSA1024)), 403, "policy_key_size", "1024"),
        ("RSA tiny exponent", sign(&openssl_csr("rsae3", KEYGEN_RSA_EXPONENT_3)), 403, "policy_key_exponent", "exponent 3"),
        ("RSA even exponent", sign(&csr_with_rsa_exponent(&[0x01, 0x00, 0x00])), 403, "policy_key_exponent", "65536"),
        ("RSA exponent beyond 64 bits", sign(&csr_with_rsa_exponent(&[1; 12])), 403, "policy_key_exponent", "64 bits"),
        ("RSA key parameters absent", sign(&csr_with_rsa_key_changed(|key| key.algorithm.parameters = None)), 400, "malformed_csr", "must be NULL"),
        ("RSA key parameters a blob", sign(&csr_with_rsa_key_changed(|key| key.algorithm.parameters = Some(der::Any::new(der::Tag::OctetString, vec![7; 4000]).unwrap()))), 400, "malformed_csr", "must be NULL"),
        ("key with unused bits", sign(&csr_with_rsa_key_changed(|key| key.subject_public_key = der::asn1::BitString::new(1, key.subject_public_key.raw_bytes().to_vec()).unwrap())), 400, "malformed_csr", "1 unused bits"),
        ("curve P-521", sign(&openssl_csr("p521", KEYGEN_P521)), 403, "policy_key_algorithm", "curve"),
        ("curve secp256k1", sign(&openssl_csr("k256", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp256k1"])), 403, "policy_key_algorithm", "curve"),
        ("Ed25519", sign(&openssl_csr("ed", KEYGEN_ED25519)), 403, "policy_key_algorithm", "accepted key types"),
        ("Ed448", sign(&openssl_csr("ed448", &["-algorithm", "ED448"])), 403, "policy_key_algorithm", "accepted key types"),
        ("wrong org", sign(&csr(KeyType::EcdsaP256, "mallory", "x").1), 403, "policy_org", "mallory"),
        ("ttl beyond policy", Send::Json(json!({"virtualMesh": VM, "mesh": MESH_A, "csr": good, "ttlSeconds": 400 * 86400})), 403, "policy_ttl", "exceeds"),
        ("ttl too short", Send::Json(json!({"virtualMesh": VM, "mesh": MESH_A, "csr": good, "ttlSeconds": 5})), 400, "malformed_request", "minimum"),
        ("ttl negative", Send::Json(json!({"virtualMesh": VM, "mesh": MESH_A, "csr": good, "ttlSeconds": -1})), 400, "malformed_request", "`-1`"),
        ("unknown virtual mesh", Send::Json(sign_body("test/none", MESH_A, &good)), 404, "unknown_virtual_mesh", "test/none"),
        ("mesh not a member", Send::Json(sign_body(VM, "test/stranger", &good)), 404, "unknown_mesh", "test/stranger"),
        ("mesh of another client", Send::Json(sign_body(VM, "test/cluster-b", &good)), 403, "not_authorized", "test/cluster-b"),
        ("virtual mesh not a reference", Send::Json(sign_body("../../etc/passwd", MESH_A, &good)), 400, "malformed_request", "virtualMesh"),
        ("body over 64 KiB", Send::Raw { content_type: "application/json", body: vec![b'{'; 70 * 1024] }, 413, "body_too_large", "64 KiB"),
        ("CSR field over 64 KiB", Send::Json(sign_body(VM, MESH_A, &"A".repeat(70 * 1024))), 413, "body_too_large", "64 KiB"),
        ("wrong content type", Send::Raw { content_type: "text/plain", body: b"{}".to_vec() }, 415, "unsupported_media_type", "application/json"),
        ("form content type", Send::Raw { content_type: "application/x-www-form-urlencoded", body: b"csr=x".to_vec() }, 415, "unsupported_media_type", "application/json"),
        ("invalid UTF-8", Send::Raw { content_type: "application/json", body: b"{\"csr\": \"\xff\xfe\"}".to_vec() }, 400, "malformed_request", "JSON"),
        ("deeply nested JSON", Send::Raw { content_type: "application/json", body: nested.into_bytes() }, 400, "malformed_request", "JSON"),
        ("empty body", Send::Raw { content_type: "application/json", body: Vec::new() }, 400, "malformed_request", "JSON"),
        ("JSON array", Send::Raw { content_type: "application/json", body: b"[1,2,3]".to_vec() }, 400, "malformed_request", "JSON"),
        // serde takes a struct from an array of its fields too: the API is the object alone.
        ("JSON array of the fields", Send::Json(json!([VM, MESH_A, good])), 400, "malformed_request", "not a JSON object"),
        ("JSON array of the fields with a ttl", Send::Json(json!([VM, MESH_A, good, 86400])), 400, "malformed_request", "not a JSON object"),
        ("CSR is a number", Send::Json(json!({"virtualMesh": VM, "mesh": MESH_A, "csr": 42})), 400, "malformed_request", "expected a string"),
        ("unknown field", Send::Json(json!({"virtualMesh": VM, "mesh": MESH_A, "csr": good, "pathLen": 5})), 400, "malformed_request", "pathLen"),
        ("field name with a newline (a forged log line)", Send::Json(json!({"virtualMesh": VM, "mesh": MESH_A, "csr": good, "x\nINFO forged": 5})), 400, "malformed_request", "x\\nINFO forged"),
        // Messages and recorded references quote the request: a client must not choose the
        // size of the audit line.
        ("virtual mesh of 60 KB", Send::Json(sign_body(&"a".repeat(60_000), MESH_A, &good)), 400, "malformed_request", "bytes in all"),
        ("content type not UTF-8", Send::RawHeader { content_type: Some(b"application/json\xff"), body: b"{}".to_vec() }, 415, "unsupported_media_type", "got \"application/json\\xff\" (not UTF-8)"),
        ("no content type", Send::RawHeader { content_type: None, body: b"{}".to_vec() }, 415, "unsupported_media_type", "got none"),
        ("content type of 100 KB", Send::Raw { content_type: format!("text/{}", "a".repeat(100_000)).leak(), body: b"{}".to_vec() }, 415, "unsupported_media_type", "bytes in all"),
        ("duplicate field", Send::Raw { content_type: "application/json", body: format!("{{\"virtualMesh\":\"{VM}\",\"virtualMesh\":\"{VM}\",\"mesh\":\"{MESH_A}\",\"csr\":\"x\"}}").into_bytes() }, 400, "malformed_request", "duplicate"),
    ];
    assert!(cases.len() >= 30);
    let url = signer.url("/v1/sign");
    for (name, send, status, code, needle) in &cases {
        let request = match send {
            Send::Json(body) => client.post(&url).json(body),
            Send::Raw { content_type, body } => client
                .post(&url)
                .header("content-type", *content_type)
                .body(body.clone()),
            Send::RawHeader {
                content_type: None,
                body,
            } => client.post(&url).body(body.clone()),
            Send::RawHeader {
                content_type: Some(content_type),
                body,
            } => client
                .post(&url)
                .header(
                    "content-type",
                    reqwest::header::HeaderValue::from_bytes(content_type).unwrap(),
                )
                .body(body.clone()),
        };
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(response.status().as_u16(), *status, "{name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], *code, "{name}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{name}: {needle:?} not in {message:?}"
        );
    }
    // Every one of them is an audited decision, in a line of bounded size, and the signer
    // still issues.
    let lines = signer.audit_lines();
    assert_eq!(lines.len(), cases.len());
    for line in &lines {
        let size = line.to_string().len();
        assert!(size < 4096, "an audit line of {size} bytes: {line}");
    }
    let (status, body) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &good)).await;
    assert_eq!(status, 200, "{body}");
}

/// A method other than POST on /v1/sign is answered 405 by the router, before the handler:
/// no decision, so no audit line, and not counted among the sign requests.
#[tokio::test]
async fn another_method_on_sign_is_405_with_no_audit_line_and_not_counted() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let counted = |metrics: &str| -> Vec<String> {
        metrics
            .lines()
            .filter(|l| l.starts_with("meshca_sign_requests_total"))
            .map(str::to_string)
            .collect()
    };
    let before = counted(&signer.metrics(&client).await);
    assert!(!before.is_empty());
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let response = client
            .request(method.clone(), signer.url("/v1/sign"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 405, "{method}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "method_not_allowed",
            "{method}: {body}"
        );
    }
    assert_eq!(counted(&signer.metrics(&client).await), before);
    assert!(
        signer.audit_lines().is_empty(),
        "{:?}",
        signer.audit_lines()
    );
}

#[tokio::test]
async fn a_client_over_its_rate_is_told_to_wait_others_are_unaffected_and_a_reload_raises_it() {
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\nsign_requests_per_minute = 6\nsign_burst = 3\n".into(),
        ..EnvSpec::default()
    });
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let (_k, csr_a) = csr(KeyType::EcdsaP256, "acme", "a");
    for _ in 0..3 {
        assert_eq!(
            post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr_a))
                .await
                .0,
            200
        );
    }
    let response = client
        .post(signer.url("/v1/sign"))
        .json(&sign_body(VM, MESH_A, &csr_a))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    let (_k, csr_b) = csr(KeyType::EcdsaP256, "acme", "b");
    let (status, _) = post_sign(
        &env.client("cluster-b"),
        &signer,
        &sign_body(VM, "test/cluster-b", &csr_b),
    )
    .await;
    assert_eq!(status, 200);

    // Raised by a reload: the same client is served again at once (its empty bucket now
    // refills at 1,000 a second), and the change is on record.
    let config = std::fs::read_to_string(&env.config).unwrap();
    let raised = config.replace(
        "sign_requests_per_minute = 6\n",
        "sign_requests_per_minute = 60000\n",
    );
    assert_ne!(raised, config);
    std::fs::write(&env.config, raised).unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("SIGHUP: rules reloaded").await;
    assert!(
        line.contains("limits: sign_requests_per_minute 6 -> 60000"),
        "{line}"
    );
    assert_eq!(
        post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr_a))
            .await
            .0,
        200
    );
    let audit = signer.audit_lines();
    assert_eq!(audit[3]["rule"], "rate_limited");
    assert_eq!(audit[3]["decision"], "deny");
    assert_eq!(
        (audit[5]["event"].as_str(), audit[5]["rule"].as_str()),
        (Some("reload"), Some("rules_changed"))
    );
    assert_eq!(
        audit[5]["message"],
        "limits: sign_requests_per_minute 6 -> 60000"
    );
    assert_eq!(audit[6]["rule"], "issued");
}

#[tokio::test]
async fn a_client_hammering_its_rate_limit_costs_the_audit_log_a_few_lines_and_every_refusal_is_counted()
 {
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\nsign_requests_per_minute = 1\nsign_burst = 1\n".into(),
        ..EnvSpec::default()
    });
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    let (_k, csr_a) = csr(KeyType::EcdsaP256, "acme", "a");
    let body = sign_body(VM, MESH_A, &csr_a);
    assert_eq!(post_sign(&client, &signer, &body).await.0, 200);
    // A client that ignores Retry-After. (At one token a minute, a request that gets
    // through is possible only if this loop took a minute; it is counted as what it got.)
    let mut refused = 0u64;
    for _ in 0..40 {
        let (status, answer) = post_sign(&client, &signer, &body).await;
        match status {
            429 => {
                assert_eq!(answer["error"]["code"], "rate_limited");
                refused += 1;
            }
            200 => {}
            other => panic!("{other}: {answer}"),
        }
    }
    assert!(refused >= 39, "{refused}");
    let metrics = signer.metrics(&client).await;
    assert_eq!(
        metric_sample(
            &metrics,
            "meshca_sign_requests_total{outcome=\"rate_limited\"}"
        ),
        Some(refused as i64)
    );
    let lines_of = |audit: &[Value]| -> Vec<Value> {
        audit
            .iter()
            .filter(|l| l["rule"] == "rate_limited")
            .cloned()
            .collect()
    };
    // While it hammers: a line for the first refusal, the rest counted (a count is written
    // every minute, so a slow run may show one more pair).
    let during = lines_of(&signer.audit_lines());
    assert!((1..=3).contains(&during.len()), "{during:?}");
    assert!(during[0].get("count").is_none(), "{}", during[0]);

    // SIGTERM writes the counts still open: every refusal is on record, by count.
    assert!(signer.terminate());
    let audit = signer.audit_lines();
    let lines = lines_of(&audit);
    assert!((2..=4).contains(&lines.len()), "{lines:?}");
    let on_record: u64 = lines
        .iter()
        .map(|l| l.get("count").map_or(1, |c| c.as_u64().unwrap()))
        .sum();
    assert_eq!(on_record, refused, "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(last["decision"], "deny");
    assert_eq!(last["client"], identity("cluster-a"));
    // (Mostly every refusal but the first; fewer if a minute's tick came in between.)
    let count = last["count"].as_u64().unwrap();
    assert!(
        last["message"].as_str().unwrap().starts_with(&format!(
            "{count} more signing requests from this client refused by the rate limit from 20"
        )),
        "{last}"
    );
    assert_eq!(
        audit.last().unwrap(),
        last,
        "the count is the log's last line (but the stop record)"
    );
    // Under the rules in force, as every decision's line.
    let start = &signer.all_audit_lines()[0];
    assert_eq!(start["event"], "start");
    for line in &lines {
        assert_eq!(line["rulesSha256"], start["rulesSha256"], "{line}");
    }
    env.audit_verify_ok();
    // The log names the refusals that got their own line, not each one.
    let logged = signer
        .logs()
        .lines()
        .filter(|l| l.contains("refused signing request") && l.contains("rate_limited"))
        .count();
    let own_lines = lines.iter().filter(|l| l.get("count").is_none()).count();
    assert_eq!(logged, own_lines, "{}", signer.logs());
}

/// Refusals of one reason are throttled per refused client too: an agent retrying with an
/// expired certificate past the reason's burst does not hide another agent's refusal for
/// the same reason, which is logged at once, naming it; the metric counts every one.
#[tokio::test]
async fn one_clients_refusals_do_not_hide_anothers_of_the_same_reason() {
    let env = Env::new();
    env.transport_pki("client", &["old-a", &identity("cluster-a"), "-1"]);
    env.transport_pki("client", &["old-b", &identity("cluster-b"), "-1"]);
    let signer = env.start_signer();
    let refused = |client: &str| {
        let client = env.client(client);
        let url = signer.url("/healthz");
        async move { assert!(client.get(url).send().await.is_err(), "served") }
    };
    for _ in 0..30 {
        refused("old-a").await;
    }
    signer.wait_for_nth_log("TLS handshake refused", 20).await;
    refused("old-b").await;
    let line = signer
        .wait_for_log(&format!("\"client\":\"{}\"", identity("cluster-b")))
        .await;
    assert!(line.contains("client_certificate_expired"), "{line}");
    // Every refusal counted (a refused client can see its alert a moment before the
    // signer counts it: asked until it is there).
    let sample = "meshca_tls_handshakes_refused_total{reason=\"client_certificate_expired\"}";
    let mut counted = None;
    for _ in 0..100 {
        let metrics = signer.metrics(&env.client("cluster-a")).await;
        counted = metric_sample(&metrics, sample);
        if counted == Some(31) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, Some(31));
}

#[tokio::test]
async fn a_flood_of_refused_handshakes_is_counted_in_full_and_logged_in_part() {
    let env = Env::new();
    env.transport_pki("client", &["old", &identity("cluster-a"), "-1"]);
    let signer = env.start_signer();
    // Not TLS at all: what anyone who can reach the port can send, as fast as it likes.
    let not_tls = || async {
        let mut tcp = tokio::net::TcpStream::connect(signer.addr).await.unwrap();
        let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut rest = Vec::new();
        // Ends when the signer has refused it (and counted it).
        let _ = tcp.read_to_end(&mut rest).await;
    };
    for _ in 0..60 {
        not_tls().await;
    }
    let refused_lines = |reason: &str| -> Vec<Value> {
        signer
            .logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["message"] == "TLS handshake refused" && l["reason"] == reason)
            .collect()
    };
    // A burst of 20 is logged, then about one a second; not one line per refusal.
    signer.wait_for_nth_log("TLS handshake refused", 20).await;
    let flood = refused_lines("protocol");
    assert!((20..60).contains(&flood.len()), "{} lines", flood.len());
    // The flood does not hide a refusal for another reason: an agent whose certificate
    // expired, refused right after more of the flood, is logged at once, with nothing held
    // back of its kind.
    for _ in 0..5 {
        not_tls().await;
    }
    let expired = env.client("old").get(signer.url("/healthz")).send().await;
    assert!(expired.is_err(), "an expired client was served");
    signer
        .wait_for_log("\"reason\":\"client_certificate_expired\"")
        .await;
    let expired = refused_lines("client_certificate_expired");
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["not_logged_since_last"], 0);
    // It names the client by its certificate (the peer address, behind a NAT, names no
    // cluster): the identity the signer would serve it as, the serial, when it ended.
    // `client` is the bare identity, as on every other line.
    assert_eq!(expired[0]["client"], identity("cluster-a"), "{expired:?}");
    for field in ["client_serial", "client_not_after"] {
        assert!(
            expired[0][field].as_str().is_some_and(|v| !v.is_empty()),
            "{field}: {expired:?}"
        );
    }
    // A handshake that was not TLS has no client to name.
    assert!(flood.iter().all(|l| l.get("client").is_none()), "{flood:?}");
    // Once the throttle lets a line through again, it says how many were not written:
    // every refusal is a line or counted in a later line. (Sent one at a time until the
    // last one sent is a line the test has read; the throttle refills one a second.)
    let client = env.client("cluster-a");
    let mut accounted = None;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        not_tls().await;
        let metrics = signer.metrics(&client).await;
        let counted = metric_sample(
            &metrics,
            "meshca_tls_handshakes_refused_total{reason=\"protocol\"}",
        )
        .unwrap();
        let lines = refused_lines("protocol");
        let not_logged: i64 = lines
            .iter()
            .map(|l| l["not_logged_since_last"].as_i64().unwrap())
            .sum();
        if not_logged > 0 && lines.len() as i64 + not_logged == counted {
            accounted = Some(counted);
            break;
        }
    }
    let counted = accounted.expect("refusals neither logged nor counted in a later line");
    assert!(counted > 60, "{counted}");
}

#[tokio::test]
async fn revoked_and_expired_client_certificates_are_refused() {
    let env = Env::new();
    let script = repo().join("scripts/transport-pki.sh");
    let pki = env.path("pki");
    run_ok(
        Command::new(&script)
            .arg("revoke")
            .arg(&pki)
            .arg("cluster-b"),
    );
    run_ok(
        Command::new(&script)
            .arg("client")
            .arg(&pki)
            .arg("old")
            .arg(identity("cluster-a"))
            .arg("-1"),
    );
    let config = std::fs::read_to_string(&env.config).unwrap();
    let config = config.replace(
        "client_ca = \"pki/ca.pem\"",
        "client_ca = \"pki/ca.pem\"\nclient_crls = [\"pki/crl.pem\"]",
    );
    std::fs::write(&env.config, config).unwrap();
    let signer = env.start_signer();
    let (_k, csr_b) = csr(KeyType::EcdsaP256, "acme", "b");
    let revoked = env
        .client("cluster-b")
        .post(signer.url("/v1/sign"))
        .json(&sign_body(VM, "test/cluster-b", &csr_b))
        .send()
        .await;
    assert!(revoked.is_err(), "a revoked client was served");
    let expired = env.client("old").get(signer.url("/healthz")).send().await;
    assert!(expired.is_err(), "an expired client was served");
    // Neither reached a decision; a valid client still gets served.
    assert!(signer.audit_lines().is_empty());
    let (_k, csr_a) = csr(KeyType::EcdsaP256, "acme", "a");
    assert_eq!(
        post_sign(
            &env.client("cluster-a"),
            &signer,
            &sign_body(VM, MESH_A, &csr_a)
        )
        .await
        .0,
        200
    );
    // Both refusals are logged (by the connections' tasks, in either order) and counted
    // by reason.
    signer.wait_for_nth_log("TLS handshake refused", 2).await;
    let logs = signer.logs();
    assert!(
        logs.contains("Revoked") || logs.contains("revoked"),
        "{logs}"
    );
    assert!(
        logs.contains("Expired") || logs.contains("expired"),
        "{logs}"
    );
    for reason in ["client_certificate_revoked", "client_certificate_expired"] {
        assert!(
            logs.contains(&format!("\"reason\":\"{reason}\"")),
            "{reason}: {logs}"
        );
    }
    let metrics = signer.metrics(&env.client("cluster-a")).await;
    let refused = |reason: &str| {
        metric_sample(
            &metrics,
            &format!("meshca_tls_handshakes_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    // At least once each (a client library may try a refused connection again).
    for reason in ["client_certificate_revoked", "client_certificate_expired"] {
        assert!(
            refused(reason).is_some_and(|n| n >= 1),
            "{reason}: {metrics}"
        );
    }
    assert_eq!(
        refused("client_certificate_unknown_issuer"),
        Some(0),
        "{metrics}"
    );
}

/// A reqwest client presenting `dir/name.pem` (key `name.key`), trusting the signer's CA.
fn client_from(env: &Env, dir: &std::path::Path, name: &str) -> reqwest::Client {
    let tls = meshca::tlsutil::client_config(
        &env.path("pki/ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    )
    .unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
}

#[tokio::test]
async fn with_crls_configured_a_client_ca_without_one_is_named_and_its_clients_refused() {
    let env = Env::new();
    env.check_client_crls();
    // The transport CA's successor, added to the bundle as its renewal asks, and a client
    // it issued; no CRL of its own yet.
    let successor = env.path("successor");
    std::fs::create_dir_all(&successor).unwrap();
    openssl_self_signed_ca(
        &successor,
        "ca",
        "/O=meshca demo/CN=meshca transport CA 2",
        0..30,
    );
    let script = repo().join("scripts/transport-pki.sh");
    let pki = |args: &[&str]| run_ok(Command::new(&script).args(args));
    let dir = successor.to_str().unwrap();
    pki(&["client", dir, "moved", &identity("cluster-a")]);
    let bundle = env.path("pki/ca.pem");
    let with_successor = std::fs::read_to_string(&bundle).unwrap()
        + &std::fs::read_to_string(successor.join("ca.pem")).unwrap();
    std::fs::write(&bundle, &with_successor).unwrap();

    let named = "the client CA CN=meshca transport CA 2,O=meshca demo (tls.client_ca) has no CRL in tls.client_crls";
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(report.contains(named), "{report}");
    let signer = env.start_signer();
    let line = signer.wait_for_log(named).await;
    assert!(line.contains("\"level\":\"ERROR\""), "{line}");
    let healthz = signer.url("/healthz");
    // As named: its client is refused, the old CA's still served.
    let moved = client_from(&env, &successor, "moved");
    assert!(
        moved.get(&healthz).send().await.is_err(),
        "served without a CRL"
    );
    assert!(env.client("cluster-a").get(&healthz).send().await.is_ok());

    // Its CRL added to the CRL file (the list of files is read at start) and reloaded:
    // served, and nothing more named.
    pki(&["client", dir, "spare", &identity("spare")]);
    pki(&["revoke", dir, "spare"]);
    let crls = std::fs::read_to_string(env.path("pki/crl.pem")).unwrap()
        + &std::fs::read_to_string(successor.join("crl.pem")).unwrap();
    std::fs::write(env.path("pki/crl.pem"), crls).unwrap();
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_log("SIGHUP: TLS settings reloaded").await;
    assert!(moved.get(&healthz).send().await.is_ok());
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(!report.contains("has no CRL"), "{report}");

    // A CA renewed under its old name: named too (one CRL per issuer name is consulted).
    let renewed = env.path("renewed");
    pki(&["ca", renewed.to_str().unwrap()]);
    std::fs::write(
        &bundle,
        with_successor + &std::fs::read_to_string(renewed.join("ca.pem")).unwrap(),
    )
    .unwrap();
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(
        report.contains("2 client CA certificates (tls.client_ca) have the subject CN=meshca transport CA,O=meshca demo"),
        "{report}"
    );
}

#[tokio::test]
async fn sighup_reloads_revocations_and_the_server_certificate() {
    // Idle connections are not cut off by a timeout here: only the reload closes them.
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\nheader_timeout_ms = 300000\n".into(),
        ..EnvSpec::default()
    });
    // A CRL that revokes only a spare client, so cluster-b starts out trusted.
    env.check_client_crls();
    let signer = env.start_signer();
    let healthz = signer.url("/healthz");
    assert!(env.client("cluster-b").get(&healthz).send().await.is_ok());

    // cluster-b holds a kept-alive connection made under the old settings.
    let mut kept = tls_connect(&env, &signer, "cluster-b").await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // A SIGHUP that finds the files' bytes as in force parses none of them again (a
    // CRL of 500,000 entries would be read into new verifiers for nothing).
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("TLS files read again").await;
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(logged["parsed"], false, "{line}");
    signer.wait_for_log("SIGHUP: rules reloaded").await;

    // A SIGHUP that finds the same TLS material (the PEM rewritten with a comment above
    // it) parses it, and leaves connections alone: the kept one serves its next request.
    let server_pem = env.path("pki/signer.pem");
    let pem = std::fs::read_to_string(&server_pem).unwrap();
    std::fs::write(&server_pem, format!("# the same certificate\n{pem}")).unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_nth_log("TLS files read again", 2).await;
    assert!(line.contains("nothing in them changed"), "{line}");
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(logged["parsed"], true, "{line}");
    signer.wait_for_nth_log("SIGHUP: rules reloaded", 2).await;
    // The rewritten bytes are those in force from then on: the next SIGHUP parses nothing.
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_nth_log("TLS files read again", 3).await;
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(logged["parsed"], false, "{line}");
    signer.wait_for_nth_log("SIGHUP: rules reloaded", 3).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = kept.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "a reload that changed nothing closed a connection"
    );

    // Revoke cluster-b, renew the server certificate (a new key), and SIGHUP.
    env.transport_pki("revoke", &["cluster-b"]);
    env.transport_pki("server", &["signer"]);
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("TLS settings reloaded").await;
    assert!(line.contains("certificate_not_after"), "{line}");

    // The connection made before the reload is closed by the signer.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), kept.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a connection made before the reload stayed open"
    );
    // New handshakes: the revoked client is refused, another is served, with the new
    // server certificate.
    assert!(env.client("cluster-b").get(&healthz).send().await.is_err());
    let fresh = tls_connect(&env, &signer, "cluster-a").await;
    let presented = fresh.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let renewed = meshca::tlsutil::load_certificates(&server_pem).unwrap()[0].to_vec();
    assert_eq!(
        presented, renewed,
        "the server still presents its old certificate"
    );
    let (_k, csr_a) = csr(KeyType::EcdsaP256, "acme", "a");
    let client_a = env.client("cluster-a");
    let body = sign_body(VM, MESH_A, &csr_a);
    assert_eq!(post_sign(&client_a, &signer, &body).await.0, 200);

    // A broken CRL: the reload is refused by name and the previous settings stay.
    std::fs::write(env.path("pki/crl.pem"), "not a CRL\n").unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("TLS settings not reloaded").await;
    assert!(
        line.contains("cannot read CRLs from") && line.contains("pki/crl.pem"),
        "{line}"
    );
    assert!(env.client("cluster-b").get(&healthz).send().await.is_err());
    let (_k, csr_a) = csr(KeyType::EcdsaP256, "acme", "a");
    let body = sign_body(VM, MESH_A, &csr_a);
    assert_eq!(post_sign(&client_a, &signer, &body).await.0, 200);
    let metrics = signer.metrics(&client_a).await;
    for needle in [
        // One that parsed nothing counts as a reload too.
        "meshca_tls_reloads_total{outcome=\"ok\"} 4",
        "meshca_tls_reloads_total{outcome=\"error\"} 1",
        "meshca_tls_last_reload_successful 0",
        "meshca_tls_certificate_expiry_seconds ",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn a_crl_file_added_to_client_crls_is_enforced_from_the_sighup_on() {
    // The incident: a cluster's client key is stolen and the signer checks no CRL yet.
    let env = Env::new();
    let signer = env.start_signer();
    let healthz = signer.url("/healthz");
    let client_a = env.client("cluster-a");
    assert!(env.client("cluster-b").get(&healthz).send().await.is_ok());
    env.transport_pki("revoke", &["cluster-b"]);
    let with_crls = |files: &str| {
        let config = std::fs::read_to_string(&env.config).unwrap().replace(
            "client_ca = \"pki/ca.pem\"\n",
            &format!("client_ca = \"pki/ca.pem\"\nclient_crls = [{files}]\n"),
        );
        let staged = env.path("signer.toml.new");
        std::fs::write(&staged, config).unwrap();
        std::fs::rename(&staged, &env.config).unwrap();
    };
    let reloads = |n: usize| signer.wait_for_nth_log("SIGHUP: rules reloaded", n);

    // A path that does not load: named, and the settings in force (no CRL) stay.
    with_crls("\"pki/no-such-crl.pem\"");
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("TLS settings not reloaded").await;
    assert!(line.contains("pki/no-such-crl.pem"), "{line}");
    reloads(1).await;
    assert!(env.client("cluster-b").get(&healthz).send().await.is_ok());

    // The CRL named in an edit that also breaks a VirtualMesh file: the file is not read,
    // and the log says its [tls] is not in force either (the client is still served).
    std::fs::write(
        &env.config,
        std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("client_crls = [\"pki/no-such-crl.pem\"]\n", ""),
    )
    .unwrap();
    with_crls("\"pki/crl.pem\"");
    let meshes_file = env.path("virtual-meshes.yaml");
    let meshes = std::fs::read_to_string(&meshes_file).unwrap();
    std::fs::write(
        &meshes_file,
        meshes.replace("spec:", "spec:\n  misspeled: true"),
    )
    .unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer
        .wait_for_log("could not be read, so none of its [tls] settings")
        .await;
    assert!(
        line.contains("\"level\":\"ERROR\"") && line.contains("misspeled"),
        "{line}"
    );
    signer.wait_for_log("SIGHUP: rules not reloaded").await;
    assert!(env.client("cluster-b").get(&healthz).send().await.is_ok());

    // The VirtualMesh file mended: the CRL in force at once, no restart pending.
    std::fs::write(&meshes_file, meshes).unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer
        .wait_for_log("[tls] settings changed in the config file are in force")
        .await;
    assert!(line.contains("\"settings\":\"tls.client_crls\""), "{line}");
    signer.wait_for_log("SIGHUP: TLS settings reloaded").await;
    reloads(2).await;
    assert!(
        env.client("cluster-b").get(&healthz).send().await.is_err(),
        "the revoked client is still served"
    );
    assert!(client_a.get(&healthz).send().await.is_ok());
    let metrics = signer.metrics(&client_a).await;
    assert!(
        metrics.contains("\nmeshca_config_restart_pending 0\n"),
        "{metrics}"
    );

    // A restart reads the same: the reload left nothing that differs from a start.
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(report.contains("pki/crl.pem"), "{report}");
}

#[tokio::test]
async fn a_client_crl_past_its_next_update_is_named_and_still_enforced() {
    let env = Env::new();
    // A CRL revoking the spare client, due to be replaced in 30 days.
    env.check_client_crls();
    let crl = env.path("pki/crl.pem");
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let next_update = |metrics: &str| -> i64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("meshca_tls_client_crl_next_update_timestamp_seconds{"))
            .unwrap_or_else(|| panic!("no CRL next update in\n{metrics}"));
        assert!(line.contains("pki/crl.pem\"}"), "{line}");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let metrics = signer.metrics(&client).await;
    assert_eq!(
        next_update(&metrics),
        openssl_date_unix("crl", &crl, "nextupdate")
    );
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(report.contains("pki/crl.pem, next update"), "{report}");
    assert!(!report.contains("warning"), "{report}");

    // Replaced by a CRL whose nextUpdate has passed (as if its publisher had stopped long
    // ago): the check and a reload name it, the metric shows it, and it is still enforced.
    write_overdue_crl(&env, &crl);
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(
        report.contains("warning: the client CRL")
            && report.contains("pki/crl.pem was due to be replaced at 2020-01-02T00:00:00"),
        "{report}"
    );
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("client CRL past its nextUpdate").await;
    assert!(
        line.contains("pki/crl.pem") && line.contains("2020-01-02T00:00:00"),
        "{line}"
    );
    signer.wait_for_log("TLS settings reloaded").await;
    // A new client: the reload closes connections made before it (the agents' client
    // sends again on a new one; this test's plain client would not).
    let client = env.client("cluster-a");
    let metrics = signer.metrics(&client).await;
    assert_eq!(next_update(&metrics), 1_577_923_200);
    let healthz = signer.url("/healthz");
    assert!(env.client("spare").get(&healthz).send().await.is_err());
    assert!(client.get(&healthz).send().await.is_ok());
}

#[tokio::test]
async fn an_older_crl_listed_before_a_newer_one_does_not_hide_its_revocations() {
    let env = Env::new();
    // The transport CA's list revoking the spare client, then its next list revoking
    // cluster-b too; the file holds the older one first (webpki would consult only that).
    env.check_client_crls();
    let crl = env.path("pki/crl.pem");
    let older = std::fs::read_to_string(&crl).unwrap();
    env.transport_pki("revoke", &["cluster-b"]);
    let newer = std::fs::read_to_string(&crl).unwrap();
    std::fs::write(&crl, older.clone() + &newer).unwrap();
    let crl_number = |pem: &str| {
        let file = env.path("pki/one-crl.pem");
        std::fs::write(&file, pem).unwrap();
        let out = text(
            &run_ok(
                Command::new("openssl")
                    .args(["crl", "-noout", "-text", "-in"])
                    .arg(&file),
            )
            .stdout,
        );
        let mut lines = out.lines().skip_while(|l| !l.contains("X509v3 CRL Number"));
        lines
            .nth(1)
            .unwrap_or_else(|| panic!("no CRL number in\n{out}"))
            .trim()
            .to_string()
    };
    let (older_number, newer_number) = (crl_number(&older), crl_number(&newer));
    assert_ne!(older_number, newer_number);

    // Named by the check and at start, as not enforced.
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    let superseded = format!("pki/crl.pem (number {older_number}, thisUpdate ");
    let newer_one = format!("holds a newer one (number {newer_number}, thisUpdate ");
    assert!(
        report.contains("warning: the CRL of ")
            && report.contains(&superseded)
            && report.contains("is not enforced")
            && report.contains(&newer_one),
        "{report}"
    );
    let signer = env.start_signer();
    let line = signer.wait_for_log("client CRL superseded").await;
    assert!(
        line.contains("\"level\":\"WARN\"")
            && line.contains(&superseded)
            && line.contains(&newer_one),
        "{line}"
    );
    // The newer list is the one enforced: cluster-b is refused, cluster-a served.
    let healthz = signer.url("/healthz");
    assert!(env.client("cluster-b").get(&healthz).send().await.is_err());
    assert!(env.client("spare").get(&healthz).send().await.is_err());
    assert!(env.client("cluster-a").get(&healthz).send().await.is_ok());
    signer.wait_for_log("TLS handshake refused").await;
    assert!(signer.logs().contains("client_certificate_revoked"));
}

/// A full list, then a newer partition (issuingDistributionPoint, user certificates only)
/// of the same CA that revokes cluster-b: both are in force, and the newer one is the one
/// consulted for what both cover. Before, the file's order decided: webpki consults the
/// first list covering a certificate, and the older full one kept cluster-b served.
#[tokio::test]
async fn a_newer_partitioned_crl_listed_after_an_older_full_one_is_the_one_consulted() {
    let env = Env::new();
    env.check_client_crls();
    let full = env.path("pki/full-crl.pem");
    let an_hour_ago =
        text(&run_ok(Command::new("date").args(["-u", "-d", "-1 hour", "+%Y%m%d%H%M%SZ"])).stdout);
    let in_a_month =
        text(&run_ok(Command::new("date").args(["-u", "-d", "+30 days", "+%Y%m%d%H%M%SZ"])).stdout);
    write_crl(&env, &full, an_hour_ago.trim(), in_a_month.trim());
    env.transport_pki("revoke", &["cluster-b"]);
    let config = env.path("pki/ca.cnf");
    let mut cnf = std::fs::read_to_string(&config).unwrap();
    cnf.push_str("[ user_partition ]\nissuingDistributionPoint = critical, @user_idp\n[ user_idp ]\nfullname = URI:http://crl.example/users.crl\nonlyuser = TRUE\n");
    std::fs::write(&config, cnf).unwrap();
    let partition = env.path("pki/partition-crl.pem");
    run_ok(Command::new("openssl").args([
        "ca",
        "-config",
        &config.display().to_string(),
        "-gencrl",
        "-crlexts",
        "user_partition",
        "-out",
        &partition.display().to_string(),
    ]));
    let crls =
        std::fs::read_to_string(&full).unwrap() + &std::fs::read_to_string(&partition).unwrap();
    std::fs::write(env.path("pki/crl.pem"), crls).unwrap();

    let signer = env.start_signer();
    let healthz = signer.url("/healthz");
    assert!(env.client("cluster-a").get(&healthz).send().await.is_ok());
    assert!(env.client("cluster-b").get(&healthz).send().await.is_err());
    signer.wait_for_log("TLS handshake refused").await;
    assert!(
        signer.logs().contains("client_certificate_revoked"),
        "{}",
        signer.logs()
    );
    // Both in force: neither is named as superseded.
    assert!(
        !signer.logs().contains("client CRL superseded"),
        "{}",
        signer.logs()
    );
}

#[tokio::test]
async fn with_client_crl_overdue_refuse_an_overdue_crl_refuses_its_clients_until_replaced() {
    let env = Env::new();
    refuse_clients_of_overdue_crls(&env);
    let crl = env.path("pki/crl.pem");
    let fresh = std::fs::read_to_string(&crl).unwrap();
    let signer = env.start_signer();
    let healthz = signer.url("/healthz");
    // A CRL within its nextUpdate: served as ever, the revoked client refused.
    assert!(env.client("cluster-a").get(&healthz).send().await.is_ok());
    assert!(env.client("spare").get(&healthz).send().await.is_err());

    // Replaced by one whose nextUpdate has passed (a publisher that stopped): named by the
    // check and the reload, and every client it covers is refused at the handshake, by
    // that reason.
    write_overdue_crl(&env, &crl);
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(
        report.contains("pki/crl.pem was due to be replaced at 2020-01-02T00:00:00")
            && report.contains("the clients it covers are refused"),
        "{report}"
    );
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("client CRL past its nextUpdate").await;
    assert!(
        line.contains("\"level\":\"ERROR\"") && line.contains("are refused"),
        "{line}"
    );
    signer.wait_for_log("TLS settings reloaded").await;
    assert!(env.client("cluster-a").get(&healthz).send().await.is_err());
    // The second refusal: the first was the revoked client above.
    let refusal = signer.wait_for_nth_log("TLS handshake refused", 2).await;
    assert!(
        refusal.contains("client_certificate_crl_overdue"),
        "{refusal}"
    );

    // A newer CRL in place and reloaded: served again; the refusal was counted.
    std::fs::write(&crl, fresh).unwrap();
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_nth_log("TLS settings reloaded", 2).await;
    let client = env.client("cluster-a");
    assert!(client.get(&healthz).send().await.is_ok());
    assert!(env.client("spare").get(&healthz).send().await.is_err());
    let reason = "meshca_tls_handshakes_refused_total{reason=\"client_certificate_crl_overdue\"}";
    let metrics = signer.metrics(&client).await;
    assert!(
        metric_sample(&metrics, reason).is_some_and(|n| n >= 1),
        "{metrics}"
    );

    // Overdue again, and the signer told to fail open by a reload alone: no file changed,
    // yet the clients are served from that SIGHUP on.
    write_overdue_crl(&env, &crl);
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_nth_log("TLS settings reloaded", 3).await;
    assert!(client.get(&healthz).send().await.is_err());
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace(
            "client_crl_overdue = \"refuse\"",
            "client_crl_overdue = \"accept\"",
        ),
    )
    .unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer
        .wait_for_log("[tls] settings changed in the config file are in force")
        .await;
    assert!(line.contains("tls.client_crl_overdue"), "{line}");
    signer.wait_for_nth_log("TLS settings reloaded", 4).await;
    assert!(client.get(&healthz).send().await.is_ok());
    assert!(env.client("spare").get(&healthz).send().await.is_err());
}

/// With `client_crl_overdue = "refuse"`, a CRL that passes its nextUpdate refuses its
/// clients on connections made before, as at a new handshake: the connection kept alive
/// is checked again at each request, and no session can be resumed past the check (the
/// signer's clock moved two days on by libfaketime reading its offset from a file).
#[tokio::test]
async fn an_overdue_crl_under_refuse_reaches_kept_alive_and_resumed_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new();
    refuse_clients_of_overdue_crls(&env);
    // Due to be replaced a day from now.
    write_crl_due_in(&env, 86_400);
    let offset = env.path("clock-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let signer = env.start_signer_with_clock_file(&offset);

    // No session to resume: a second connection with the same client config (and so its
    // session cache) makes a full handshake.
    let config = Arc::new(
        meshca::tlsutil::client_config(
            &env.path("pki/ca.pem"),
            &env.path("pki/cluster-a.pem"),
            &env.path("pki/cluster-a.key"),
        )
        .unwrap(),
    );
    let connect = || async {
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let tcp = tokio::net::TcpStream::connect(signer.addr).await.unwrap();
        let server_name = rustls_pki_types::ServerName::IpAddress(signer.addr.ip().into());
        connector.connect(server_name, tcp).await.unwrap()
    };
    let mut first = connect().await;
    // An answer read to its end takes in any session ticket sent after the handshake.
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: signer\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = first.read_to_end(&mut answer).await;
    assert!(
        text(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        text(&answer)
    );
    let second = connect().await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    drop(second);

    // A connection kept alive across the nextUpdate.
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    std::fs::write(&offset, "+2d\n").unwrap();
    let (status, answer) = sign_fresh(&client, &signer).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        error_code(&answer),
        "client_certificate_crl_overdue",
        "{answer}"
    );
    assert!(
        error_message(&answer).contains("its CRL is overdue since the handshake"),
        "{answer}"
    );
    // Asking for its grants on that connection: refused alike, not told it has none.
    let answer = client
        .get(signer.url("/v1/virtualmeshes/test/vm"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(
        error_code(&answer),
        "client_certificate_crl_overdue",
        "{answer}"
    );
}

/// A CRL that passes its nextUpdate while the signer runs is logged then, not only shown
/// by the metric (the start and a reload log those already past it).
#[tokio::test]
async fn a_client_crl_that_passes_its_next_update_while_serving_is_logged() {
    let env = Env::new();
    env.check_client_crls();
    write_crl_due_in(&env, 10);
    let signer = env.start_signer();
    let overdue = signer
        .wait_for_nth_log_within("client CRL past its nextUpdate", 1, Duration::from_secs(60))
        .await;
    assert!(overdue.contains("pki/crl.pem"), "{overdue}");
    // Logged by the running signer, after it was ready: not by its start.
    let logs = signer.logs();
    let listening = logs.find("signer listening").unwrap();
    assert!(
        logs.find("client CRL past its nextUpdate").unwrap() > listening,
        "{logs}"
    );
}

/// Client CRLs checked, with `client_crl_overdue = "refuse"`.
fn refuse_clients_of_overdue_crls(env: &Env) {
    env.check_client_crls();
    let config = std::fs::read_to_string(&env.config).unwrap().replace(
        "client_crls = [\"pki/crl.pem\"]",
        "client_crls = [\"pki/crl.pem\"]\nclient_crl_overdue = \"refuse\"",
    );
    std::fs::write(&env.config, config).unwrap();
}

/// Writes pki/crl.pem, of a minute ago, due to be replaced `seconds` from now.
fn write_crl_due_in(env: &Env, seconds: u64) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    write_crl(
        env,
        &env.path("pki/crl.pem"),
        &openssl_time(now - 60),
        &openssl_time(now + seconds),
    );
}

/// `unix` (seconds) as openssl's `YYYYMMDDHHMMSSZ`, for a CRL's dates.
fn openssl_time(unix: u64) -> String {
    let out =
        run_ok(Command::new("date").args(["-u", "-d", &format!("@{unix}"), "+%Y%m%d%H%M%SZ"]));
    text(&out.stdout).trim().to_string()
}

/// Writes to `out` a CRL of the transport CA due to be replaced on 2020-01-02 (as if its
/// publisher had stopped long ago), made by openssl.
fn write_overdue_crl(env: &Env, out: &std::path::Path) {
    write_crl(env, out, "20200101000000Z", "20200102000000Z");
}

/// Writes to `out` a CRL of the transport CA of these dates (openssl's `YYYYMMDDHHMMSSZ`).
fn write_crl(env: &Env, out: &std::path::Path, last_update: &str, next_update: &str) {
    run_ok(Command::new("openssl").args([
        "ca",
        "-config",
        &env.path("pki/ca.cnf").display().to_string(),
        "-gencrl",
        "-crl_lastupdate",
        last_update,
        "-crl_nextupdate",
        next_update,
        "-out",
        &out.display().to_string(),
    ]));
}

/// Sends the head of a signing request with `Expect: 100-continue`, waits for the signer's
/// "100 Continue" (sent when the handler starts reading the body, so the request is now
/// being handled), then sends the first `sent` bytes of `body`.
async fn begin_sign_request(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    body: &[u8],
    sent: usize,
) {
    let head = format!(
        "POST /v1/sign HTTP/1.1\r\nHost: meshca\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut interim = Vec::new();
    let mut buf = [0u8; 256];
    while !interim.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf))
            .await
            .expect("the signer answers 100 Continue")
            .unwrap();
        assert!(n > 0, "connection closed before 100 Continue");
        interim.extend_from_slice(&buf[..n]);
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    tls.write_all(&body[..sent]).await.unwrap();
    tls.flush().await.unwrap();
}

/// The one audit line of `client`'s decision; waits for it at most 30 s (a bound, not a
/// timing assertion).
async fn decision_of(signer: &Signer, client: &str) -> Value {
    for _ in 0..300 {
        if let Some(line) = signer
            .audit_lines()
            .into_iter()
            .find(|l| l["client"] == identity(client) && l["event"] == "decision")
        {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no audit line for {client}:\n{}", signer.logs())
}

#[tokio::test]
async fn a_request_body_that_stalls_is_answered_408_and_audited() {
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\nbody_timeout_ms = 300\n".into(),
        ..EnvSpec::default()
    });
    let signer = env.start_signer();
    let (_key, stalled_csr) = csr(KeyType::EcdsaP256, "acme", "b");
    let body = serde_json::to_vec(&sign_body(VM, "test/cluster-b", &stalled_csr)).unwrap();
    let mut stalled = tls_connect(&env, &signer, "cluster-b").await;
    begin_sign_request(&mut stalled, &body, 40).await;
    let mut answer = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a stalled body was waited for forever");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("body_timeout") && answer.contains("within 300 ms"),
        "{answer}"
    );

    let line = decision_of(&signer, "cluster-b").await;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["rule"], "body_timeout", "{line}");
    env.audit_verify_ok();
    assert_still_issues(&env.client("cluster-a"), &signer).await;
}

/// A client that leaves part way through its body (a load balancer's reset, a pod
/// killed) is audited and counted as gone, not as a body over the limit: that would send
/// whoever reads the log looking for an oversized CSR.
#[tokio::test]
async fn a_client_that_leaves_part_way_through_its_body_is_audited_as_gone() {
    let env = Env::new();
    let signer = env.start_signer();
    let (_key, csr_b) = csr(KeyType::EcdsaP256, "acme", "b");
    let body = serde_json::to_vec(&sign_body(VM, "test/cluster-b", &csr_b)).unwrap();
    let mut leaving = tls_connect(&env, &signer, "cluster-b").await;
    begin_sign_request(&mut leaving, &body, 40).await;
    leaving.shutdown().await.unwrap();
    drop(leaving);

    let line = decision_of(&signer, "cluster-b").await;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["rule"], "client_gone", "{line}");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("the request body could not be read"),
        "{line}"
    );
    let client_a = env.client("cluster-a");
    assert_still_issues(&client_a, &signer).await;
    let metrics = signer.metrics(&client_a).await;
    assert!(
        metrics.contains("meshca_sign_requests_total{outcome=\"client_gone\"} 1")
            && !metrics.contains("outcome=\"body_too_large\"} 1"),
        "{metrics}"
    );
    env.audit_verify_ok();
}

#[tokio::test]
async fn a_client_revoked_by_a_reload_while_its_request_is_under_way_is_refused() {
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\nbody_timeout_ms = 300000\n".into(),
        ..EnvSpec::default()
    });
    // A CRL that revokes only a spare client, so cluster-b starts out trusted.
    env.check_client_crls();
    let signer = env.start_signer();
    let (_key, csr_b) = csr(KeyType::EcdsaP256, "acme", "b");
    let body = serde_json::to_vec(&sign_body(VM, "test/cluster-b", &csr_b)).unwrap();
    let mut under_way = tls_connect(&env, &signer, "cluster-b").await;
    begin_sign_request(&mut under_way, &body, 100).await;

    // cluster-b is revoked and the CRL reloaded before the rest of its body arrives.
    env.transport_pki("revoke", &["cluster-b"]);
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_log("SIGHUP: TLS settings reloaded").await;
    under_way.write_all(&body[100..]).await.unwrap();
    let mut answer = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(30), under_way.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer, and the connection stayed open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("client_certificate_revoked"), "{answer}");
    assert!(!answer.contains("BEGIN CERTIFICATE"), "{answer}");

    let line = decision_of(&signer, "cluster-b").await;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["rule"], "client_certificate_revoked", "{line}");
    assert!(line["clientCertificateSerial"].is_string(), "{line}");
    assert!(line.get("serial").is_none_or(Value::is_null), "{line}");
    let client_a = env.client("cluster-a");
    assert_still_issues(&client_a, &signer).await;
    let metrics = signer.metrics(&client_a).await;
    let refused = "meshca_sign_requests_total{outcome=\"client_certificate_revoked\"} 1";
    assert!(
        metrics.contains(refused),
        "{refused} missing from\n{metrics}"
    );
    env.audit_verify_ok();
}

/// A signer whose drain lasts `drain_timeout_ms`, handling cluster-b's signing request
/// whose body will not arrive: it cannot finish by itself.
async fn signer_with_a_stalled_request(
    drain_timeout_ms: u64,
) -> (
    Env,
    Signer,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let env = Env::with(EnvSpec {
        extra_toml: format!(
            "[limits]\ndrain_timeout_ms = {drain_timeout_ms}\nbody_timeout_ms = 300000\n"
        ),
        ..EnvSpec::default()
    });
    let signer = env.start_signer();
    let (_key, stalled_csr) = csr(KeyType::EcdsaP256, "acme", "b");
    let body = serde_json::to_vec(&sign_body(VM, "test/cluster-b", &stalled_csr)).unwrap();
    let mut stalled = tls_connect(&env, &signer, "cluster-b").await;
    begin_sign_request(&mut stalled, &body, 40).await;
    (env, signer, stalled)
}

#[tokio::test]
async fn sigterm_audits_the_requests_still_under_way_when_the_drain_time_is_over() {
    let (env, mut signer, stalled) = signer_with_a_stalled_request(500).await;
    let peer = stalled.get_ref().0.local_addr().unwrap().to_string();
    terminate_successfully(&mut signer);
    drop(stalled);

    let line = decision_of(&signer, "cluster-b").await;
    assert_eq!(line["decision"], "error", "{line}");
    assert_eq!(line["rule"], "signer_stopping", "{line}");
    assert_eq!(line["peer"], peer.as_str(), "{line}");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("nothing was handed out"),
        "{line}"
    );
    assert!(
        signer.logs().contains("drain time is over"),
        "{}",
        signer.logs()
    );
    env.audit_verify_ok();
}

/// SIGTERM, then a successful exit (the wait is bounded by [`Signer::terminate_status`]),
/// with every log line read.
fn terminate_successfully(signer: &mut Signer) {
    let status = signer.terminate_status();
    assert!(status.success(), "{status}\n{}", signer.logs());
}

#[tokio::test]
async fn a_request_left_half_sent_on_the_ops_port_does_not_hold_up_the_exit() {
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\ndrain_timeout_ms = 500\n".into(),
        ..EnvSpec::default()
    });
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("ops_listen = \"127.0.0.1:0\"\n{config}"),
    )
    .unwrap();
    let mut signer = env.start_signer();
    let started = signer.wait_for_log("signer listening").await;
    let line: Value = serde_json::from_str(&started).unwrap();
    // `127.0.0.1:PORT`, the address itself.
    let ops = line["ops"]
        .as_str()
        .filter(|o| o.parse::<std::net::SocketAddr>().is_ok())
        .unwrap_or_else(|| panic!("no ops address in {line}"))
        .to_string();
    let mut scraper = tokio::net::TcpStream::connect(&ops).await.unwrap();
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .unwrap();
    // Served meanwhile: the ops port answers another scraper.
    let mut other = tokio::net::TcpStream::connect(&ops).await.unwrap();
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    terminate_successfully(&mut signer);
    assert!(
        signer
            .logs()
            .contains("drain time is over: the ops port's connections still open are closed"),
        "{}",
        signer.logs()
    );
    drop(scraper);
}

/// `GET path` on a signer's plain-HTTP ops port; the whole answer, status line first.
async fn ops_get(ops: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(ops).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

/// A signer started with an expired TLS server certificate runs, but no client can
/// complete a handshake: it says so at ERROR, and /readyz (asked on the ops port, which
/// needs no certificate) is 503 until a renewed one is reloaded.
#[tokio::test]
async fn a_signer_with_an_expired_server_certificate_is_not_ready_and_says_so() {
    let env = Env::new();
    env.transport_pki("server", &["signer", "-1"]);
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("ops_listen = \"127.0.0.1:0\"\n{config}"),
    )
    .unwrap();
    let signer = env.start_signer();
    let started = signer.wait_for_log("signer listening").await;
    let line: Value = serde_json::from_str(&started).unwrap();
    let ops = line["ops"].as_str().unwrap().to_string();
    // Logged before the listening line, so already read.
    let logs = signer.logs();
    let expired = logs
        .lines()
        .find(|l| l.contains("TLS server certificate has expired"))
        .unwrap_or_else(|| panic!("no word of the expired certificate:\n{logs}"));
    assert!(expired.contains("\"level\":\"ERROR\""), "{expired}");

    let answer = ops_get(&ops, "/readyz").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("server_certificate_expired"), "{answer}");

    // Clients refuse the handshake (their alert is all the signer gets: `protocol`); the
    // log says why, once for all of them, not once per handshake.
    let client = env.client("cluster-a");
    for _ in 0..5 {
        let refused = client.get(signer.url("/healthz")).send().await;
        assert!(refused.is_err(), "{refused:?}");
    }
    signer.wait_for_nth_log("\"reason\":\"protocol\"", 5).await;
    let said = "while the signer's TLS server certificate ([tls] cert) has expired";
    let lines: Vec<String> = signer
        .logs()
        .lines()
        .filter(|l| l.contains(said))
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}\n{}", signer.logs());
    assert!(lines[0].contains("\"level\":\"ERROR\""), "{}", lines[0]);
    assert!(lines[0].contains("expired_at"), "{}", lines[0]);
    assert!(
        lines[0].contains("renew it and reload (SIGHUP)"),
        "{}",
        lines[0]
    );
    // The agent's side (`meshca request` shares its client) says what the refused
    // certificate's dates mean, not only that the signer cannot be reached.
    let out = run(&mut env.request_command(signer.addr, "cluster-a"));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot reach the signer")
            && stderr.contains("the signer's certificate has expired by this machine's clock"),
        "{stderr}"
    );

    env.transport_pki("server", &["signer"]);
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_log("TLS settings reloaded").await;
    let answer = ops_get(&ops, "/readyz").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"ready\""), "{answer}");
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_cut_off_and_bounded() {
    let env = Env::with(EnvSpec {
        extra_toml:
            "[limits]\nmax_connections = 4\nhandshake_timeout_ms = 300\nheader_timeout_ms = 300\n"
                .into(),
        ..EnvSpec::default()
    });
    let signer = env.start_signer();

    // A client that sends half a request line and stalls is disconnected.
    let mut slow = tls_connect(&env, &signer, "cluster-a").await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a slow-header client was kept forever");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    // Many idle TCP connections (no TLS handshake): those beyond the free slots are closed
    // at once (every slot held by a handshake within its grace), the others end at the
    // handshake timeout or give way to newer ones; a real client then gets through.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(signer.addr).await.unwrap());
    }
    tokio::time::sleep(HANDSHAKE_GRACE).await;
    let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let client = env.client("cluster-a");
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)),
    )
    .await
    .expect("the signer stopped serving under idle connections");
    assert_eq!(answer.0, 200);
    // The idle connections were closed by the bound, or ended at the handshake timeout.
    let metrics = signer.metrics(&client).await;
    let ended: i64 = [
        "meshca_api_connections_closed_total{reason=\"all_busy\"}",
        "meshca_api_connections_closed_total{reason=\"handshake_for_new\"}",
        "meshca_tls_handshakes_refused_total{reason=\"timeout\"}",
    ]
    .into_iter()
    .map(|series| metric_sample(&metrics, series).unwrap_or(0))
    .sum();
    assert!(ended >= 38, "{metrics}");
    drop(idle);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_request_still_gets_its_decision_audited() {
    // One session, so requests queue and the hang-up arrives while this one still waits.
    let env = Env::with(EnvSpec {
        sessions: 1,
        ..EnvSpec::unlimited_rate()
    });
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let load = load::start(
        &client,
        &signer.url("/v1/sign"),
        load::fresh_bodies(32, VM, MESH_A),
        3,
        |sent| async move {
            let answer: Value = sent.ok()?.json().await.ok()?;
            Some(answer["serial"].as_str()?.to_string())
        },
    );
    // Once answers flow, the queue holds the other tasks' requests.
    load.wait_for(1).await;
    let (_key, hung_up_csr) = csr(KeyType::EcdsaP256, "acme", "b");
    let body = serde_json::to_vec(&sign_body(VM, "test/cluster-b", &hung_up_csr)).unwrap();
    let mut tls = tls_connect(&env, &signer, "cluster-b").await;
    // The hang-up below surely comes while the request is being handled.
    begin_sign_request(&mut tls, &body, body.len()).await;
    tls.shutdown().await.unwrap();
    drop(tls);
    assert_eq!(load.join().await.len(), 96);

    // The hang-up's decision reaches the audit log: most likely `client_gone` (it left while
    // its request was queued, so the token never signed it), or `allow` with the serial if
    // the token had begun before the signer noticed.
    let line = decision_of(&signer, "cluster-b").await;
    assert_eq!(line["mesh"], "test/cluster-b", "{line}");
    match line["rule"].as_str() {
        Some("client_gone") => {
            assert_eq!(line["decision"], "deny", "{line}");
            assert!(line.get("serial").is_none(), "{line}");
        }
        Some("issued") => {
            assert_eq!(line["decision"], "allow", "{line}");
            assert!(line["serial"].is_string(), "{line}");
        }
        _ => panic!("unexpected decision for the client that hung up: {line}"),
    }
    env.audit_verify_ok();
    assert_still_issues(&client, &signer).await;
}

#[tokio::test]
async fn a_grant_removed_while_a_body_arrives_is_gone_for_that_request() {
    let env = Env::new();
    let signer = env.start_signer();
    let (_key, csr_b) = csr(KeyType::EcdsaP256, "acme", "b");
    let body = serde_json::to_vec(&sign_body(VM, "test/cluster-b", &csr_b)).unwrap();
    // cluster-b's request is being handled, its body not all in yet ...
    let mut slow = tls_connect(&env, &signer, "cluster-b").await;
    begin_sign_request(&mut slow, &body, 40).await;
    // ... when the security team removes its grant (a compromised cluster) and reloads.
    let config = std::fs::read_to_string(&env.config).unwrap();
    let b_block = format!(
        "\n[[clients]]\nidentity = \"{}\"\nallow = [{{ virtual_mesh = \"test/vm\", mesh = \"test/cluster-b\" }}]\n",
        identity("cluster-b")
    );
    assert!(config.contains(&b_block), "{config}");
    std::fs::write(&env.config, config.replace(&b_block, "")).unwrap();
    send_signal(signer.child.id(), "HUP");
    signer
        .wait_for_log("SIGHUP: rules reloaded (recorded in the audit log)")
        .await;
    slow.write_all(&body[40..]).await.unwrap();
    slow.flush().await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Read up to the end of the JSON body, whatever the answer.
    while !answer.ends_with(b"}") {
        let n = tokio::time::timeout(Duration::from_secs(30), slow.read(&mut buf))
            .await
            .expect("the signer answers")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("not_authorized"),
        "{answer}"
    );
    // Its line names the rules it was decided under: those of the reload before it.
    let lines = signer.all_audit_lines();
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["start", "reload", "decision"], "{lines:?}");
    assert_eq!(lines[2]["rule"], "not_authorized");
    assert_eq!(lines[2]["rulesSha256"], lines[1]["rulesSha256"]);
    assert_ne!(lines[1]["rulesSha256"], lines[0]["rulesSha256"]);
}

#[tokio::test]
async fn a_second_sigterm_cuts_the_drain_short_and_still_audits_what_was_under_way() {
    // A drain that would last five minutes (the longest drain_timeout_ms).
    let (env, mut signer, stalled) = signer_with_a_stalled_request(300_000).await;
    send_signal(signer.child.id(), "TERM");
    signer.wait_for_log("shutting down").await;
    // The operator will not wait five minutes.
    terminate_successfully(&mut signer);
    drop(stalled);

    assert!(
        signer
            .logs()
            .contains("a second stop signal: the drain is cut short"),
        "{}",
        signer.logs()
    );
    let line = decision_of(&signer, "cluster-b").await;
    assert_eq!(line["decision"], "error", "{line}");
    assert_eq!(line["rule"], "signer_stopping", "{line}");
    env.audit_verify_ok();
}

/// Refused handshakes logged by the signer so far, as JSON lines.
fn refused_handshakes(signer: &Signer) -> Vec<Value> {
    signer
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "TLS handshake refused")
        .collect()
}

/// The UTC time `days` days from now, as `openssl ca -startdate` takes it.
fn openssl_time_in_days(days: i32) -> String {
    let out =
        run_ok(Command::new("date").args(["-u", "-d", &format!("{days} days"), "+%Y%m%d%H%M%SZ"]));
    text(&out.stdout).trim().to_string()
}

/// A client certificate for `uri` in `dir/name.pem` (key `name.key`), valid over `days`
/// counted from now (`-2..-1`: it ended yesterday), signed by `dir/issuer.pem` and its key,
/// or by its own key when `issuer` is None (self-signed: what anyone can make). Made by
/// `openssl ca`, which takes both dates, with a throwaway database of its own.
fn openssl_client_certificate(
    dir: &std::path::Path,
    name: &str,
    issuer: Option<&str>,
    uri: &str,
    days: std::ops::Range<i32>,
) {
    openssl_csr(dir, name, KEYGEN_P256, &format!("/CN={name}"), &[]);
    let db = format!("{name}.ca");
    std::fs::create_dir_all(dir.join(&db)).unwrap();
    write(dir, &format!("{db}/index.txt"), "");
    write(dir, &format!("{db}/serial"), "1000\n");
    write(
        dir,
        &format!("{db}/ca.cnf"),
        &format!(
            "[ca]\ndefault_ca = issuing\n[issuing]\ndatabase = {db}/index.txt\n\
             serial = {db}/serial\nnew_certs_dir = {db}\ndefault_md = sha256\npolicy = any\n\
             unique_subject = no\ncopy_extensions = none\nx509_extensions = client\n\
             [any]\ncommonName = supplied\n\
             [client]\nbasicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\n\
             subjectAltName = URI:{uri}\n"
        ),
    );
    let (config, csr, cert) = (
        format!("{db}/ca.cnf"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let (start, end) = (
        openssl_time_in_days(days.start),
        openssl_time_in_days(days.end),
    );
    let mut args = vec!["ca", "-batch", "-rand_serial", "-notext", "-preserveDN"];
    args.extend_from_slice(&["-config", &config, "-in", &csr, "-out", &cert]);
    args.extend_from_slice(&["-startdate", &start, "-enddate", &end]);
    let (issuer_cert, key);
    match issuer {
        Some(issuer) => {
            issuer_cert = format!("{issuer}.pem");
            key = format!("{issuer}.key");
            args.extend_from_slice(&["-cert", &issuer_cert, "-keyfile", &key]);
        }
        None => {
            key = format!("{name}.key");
            args.extend_from_slice(&["-selfsign", "-keyfile", &key]);
        }
    }
    openssl(dir, &args);
}

#[tokio::test]
async fn an_expired_certificate_not_from_the_client_ca_is_not_refused_as_an_expired_client() {
    let env = Env::new();
    let forged = env.path("forged");
    std::fs::create_dir_all(&forged).unwrap();
    // What anyone who can reach the port can present, each naming another cluster:
    // self-signed and expired; expired, from a CA that copies the transport CA's name but
    // not its key; self-signed with `-days -1`, its notAfter before its notBefore.
    let cluster_b = identity("cluster-b");
    openssl_client_certificate(&forged, "self-signed", None, &cluster_b, -2..-1);
    run_ok(
        Command::new(repo().join("scripts/transport-pki.sh"))
            .arg("ca")
            .arg(&forged),
    );
    openssl_client_certificate(&forged, "lookalike", Some("ca"), &cluster_b, -2..-1);
    openssl_csr(&forged, "inverted", KEYGEN_P256, "/CN=inverted", &[]);
    let san = format!("subjectAltName=URI:{cluster_b}\nextendedKeyUsage=clientAuth\n");
    write(&forged, "inverted.ext", &san);
    openssl(
        &forged,
        &[
            "x509",
            "-req",
            "-in",
            "inverted.csr",
            "-signkey",
            "inverted.key",
            "-days",
            "-1",
            "-extfile",
            "inverted.ext",
            "-out",
            "inverted.pem",
        ],
    );
    // A client of the transport CA whose certificate really expired.
    env.transport_pki("client", &["old", &identity("cluster-a"), "-1"]);
    let signer = env.start_signer();
    let healthz = signer.url("/healthz");

    let forgeries = [
        (
            "self-signed",
            "client_certificate_unknown_issuer",
            "UnknownIssuer",
        ),
        ("lookalike", "client_certificate_invalid", "BadSignature"),
        // In words, not rustls's Debug form of the verifier's own error.
        (
            "inverted",
            "client_certificate_invalid",
            "the certificate is valid at no time",
        ),
    ];
    for (n, (name, _, _)) in forgeries.iter().enumerate() {
        let refused = client_from(&env, &forged, name).get(&healthz).send().await;
        assert!(refused.is_err(), "{name} was served");
        signer
            .wait_for_nth_log("TLS handshake refused", n + 1)
            .await;
    }
    // Each is refused for what it is, none named as cluster-b's certificate.
    let lines = refused_handshakes(&signer);
    for (line, (name, reason, error)) in lines.iter().zip(forgeries) {
        assert_eq!(line["reason"], reason, "{name}: {line}");
        let said = line["error"].as_str().unwrap_or_default();
        assert!(said.contains(error), "{name}: {line}");
        // Only claimed: `client` names verified clients alone.
        assert_eq!(line["claimed_client"], cluster_b, "{name}: {line}");
        assert!(line.get("client").is_none(), "{name}: {line}");
        assert!(line.get("client_serial").is_some(), "{name}: {line}");
    }
    // So the expired clients' alert does not fire.
    let client = env.client("cluster-a");
    let metrics = signer.metrics(&client).await;
    let expired = "meshca_tls_handshakes_refused_total{reason=\"client_certificate_expired\"}";
    assert_eq!(metric_sample(&metrics, expired), Some(0), "{metrics}");

    // The client whose certificate did expire is still refused as expired, and named.
    let refused = env.client("old").get(&healthz).send().await;
    assert!(refused.is_err(), "an expired client was served");
    let line = signer
        .wait_for_log("\"reason\":\"client_certificate_expired\"")
        .await;
    let named = format!("\"client\":\"{}\"", identity("cluster-a"));
    assert!(line.contains(&named), "{line}");
}

/// A transport PKI of two tiers in `dir`, as cert-manager or SPIRE make one: a root
/// (`root.pem`, for `client_ca`) with its CRL (`root-crl.pem`, listing nothing), an
/// issuing intermediate under it (`issuing.pem`), and a client certificate for `uri` it
/// issued: `name.pem` holds the chain the client sends, its certificate then the
/// intermediate's.
fn two_tier_transport_pki(dir: &std::path::Path, name: &str, uri: &str) {
    std::fs::create_dir_all(dir).unwrap();
    openssl_self_signed_ca(dir, "root", "/O=meshca demo/CN=transport root", -1..30);
    openssl_csr(
        dir,
        "issuing",
        KEYGEN_P256,
        "/O=meshca demo/CN=transport issuing CA",
        &[],
    );
    write(
        dir,
        "issuing.ext",
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "issuing.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            "issuing.ext",
            "-out",
            "issuing.pem",
        ],
    );
    // A CRL number makes it a v2 CRL, as CAs publish them.
    write(dir, "root-crl-number", "1000\n");
    write(
        dir,
        "root-crl.cnf",
        "[ca]\ndefault_ca = crl\n[crl]\ndatabase = root.ca/index.txt\n\
         crlnumber = root-crl-number\ndefault_md = sha384\ndefault_crl_days = 30\n",
    );
    openssl(
        dir,
        &[
            "ca",
            "-gencrl",
            "-config",
            "root-crl.cnf",
            "-cert",
            "root.pem",
            "-keyfile",
            "root.key",
            "-out",
            "root-crl.pem",
        ],
    );
    openssl_client_certificate(dir, name, Some("issuing"), uri, -1..30);
    let chain = std::fs::read_to_string(dir.join(format!("{name}.pem"))).unwrap()
        + &std::fs::read_to_string(dir.join("issuing.pem")).unwrap();
    write(dir, &format!("{name}.pem"), &chain);
}

#[tokio::test]
async fn with_crls_a_client_whose_issuing_intermediate_has_no_crl_is_refused_by_that_reason() {
    let env = Env::new();
    env.check_client_crls();
    let tiers = env.path("tiers");
    two_tier_transport_pki(&tiers, "agent", &identity("cluster-a"));
    // The root trusted for clients, its CRL given; the intermediate's CRL missing.
    let bundle = env.path("pki/ca.pem");
    let with_root = std::fs::read_to_string(&bundle).unwrap()
        + &std::fs::read_to_string(tiers.join("root.pem")).unwrap();
    std::fs::write(&bundle, with_root).unwrap();
    let config = std::fs::read_to_string(&env.config).unwrap().replace(
        "client_crls = [\"pki/crl.pem\"]",
        "client_crls = [\"pki/crl.pem\", \"tiers/root-crl.pem\"]",
    );
    std::fs::write(&env.config, config).unwrap();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let reason = "client_certificate_revocation_unknown";
    let counted = format!("meshca_tls_handshakes_refused_total{{reason=\"{reason}\"}}");
    let metrics = signer.metrics(&client).await;
    assert_eq!(metric_sample(&metrics, &counted), Some(0), "{metrics}");

    // Refused (the check is not weakened), by its own reason, with what to do.
    let agent = client_from(&env, &tiers, "agent");
    let refused = agent.get(signer.url("/healthz")).send().await;
    assert!(refused.is_err(), "served with no CRL of its issuer");
    let line = signer
        .wait_for_log(&format!("\"reason\":\"{reason}\""))
        .await;
    let line: Value = serde_json::from_str(&line).unwrap();
    let advice = line["advice"].as_str().unwrap_or_default();
    assert!(
        advice.contains("every CA that issued a certificate of the client's chain needs its CRL")
            && advice.contains("intermediates"),
        "{line}"
    );
    // Its chain does lead to the client CA: the client is named as itself.
    assert_eq!(line["client"], identity("cluster-a"), "{line}");
    let metrics = signer.metrics(&client).await;
    assert!(
        metric_sample(&metrics, &counted).is_some_and(|n| n >= 1),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_ca_of_the_mesh_pki_is_refused_at_start_reload_and_check() {
    let env = Env::new();
    let next_root = env.init_next_root();
    let bundle = env.path("pki/ca.pem");
    let transport_ca = std::fs::read_to_string(&bundle).unwrap();
    let in_file = format!("tls.client_ca {}: the certificate ", bundle.display());
    let refused_by_check = |needle: &str| {
        let out = env.run_with_config(&["serve", "--check"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{}", text(&out.stdout));
        assert!(
            stderr.contains(&in_file) && stderr.contains(needle),
            "{stderr}"
        );
    };
    let file = |rel: &str| env.path(rel).display().to_string();

    // The mesh root beside the transport CA: the check and the start refuse, naming the
    // file and why.
    std::fs::write(&bundle, transport_ca.clone() + &env.root_pem()).unwrap();
    let root = format!(
        "has the public key of the root (root.certificate {})",
        file("root-cert.pem")
    );
    refused_by_check(&root);
    let out = env.run_with_config(&["serve"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&in_file) && stderr.contains(&root),
        "{stderr}"
    );

    // Started with the transport CA alone; a cluster's intermediate added and reloaded:
    // refused by name, the CA in force kept.
    std::fs::write(&bundle, &transport_ca).unwrap();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let (_k, csr_a) = csr(KeyType::EcdsaP256, "acme", "a");
    let (status, answer) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr_a)).await;
    assert_eq!(status, 200, "{answer}");
    let intermediate = answer["certificate"].as_str().unwrap();
    std::fs::write(&bundle, transport_ca.clone() + intermediate).unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("TLS settings not reloaded").await;
    let issued = format!(
        "was issued by the root (root.certificate {})",
        file("root-cert.pem")
    );
    assert!(line.contains(&in_file) && line.contains(&issued), "{line}");
    refused_by_check(&issued);
    assert_still_issues(&client, &signer).await;

    // The next root in the bundle before it is announced is no mesh root yet; announcing
    // it then is refused by name, the rules in force kept.
    std::fs::write(
        &bundle,
        transport_ca + &std::fs::read_to_string(&next_root).unwrap(),
    )
    .unwrap();
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_log("SIGHUP: TLS settings reloaded").await;
    signer.wait_for_nth_log("SIGHUP: rules reloaded", 2).await;
    env.announce_next_root(Some("next-root-cert.pem"));
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("SIGHUP: rules not reloaded").await;
    let next = format!(
        "has the public key of the next root (root.next_certificate {})",
        file("next-root-cert.pem")
    );
    assert!(line.contains(&in_file) && line.contains(&next), "{line}");
    refused_by_check(&next);
    let client = env.client("cluster-a");
    let metrics = signer.metrics(&client).await;
    assert!(
        metrics.contains("meshca_rules_last_reload_successful 0"),
        "{metrics}"
    );
}

/// A signer with these `[limits]` and an ops port; returns it with the ops port's address
/// (its metrics are read there, so reading them takes none of the API port's slots).
async fn start_with_ops(limits: &str) -> (Env, Signer, String) {
    let env = Env::with(EnvSpec {
        extra_toml: format!("[limits]\n{limits}"),
        ..EnvSpec::default()
    });
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("ops_listen = \"127.0.0.1:0\"\n{config}"),
    )
    .unwrap();
    let signer = env.start_signer();
    let started = signer.wait_for_log("signer listening").await;
    let line: Value = serde_json::from_str(&started).unwrap();
    let ops = line["ops"]
        .as_str()
        .filter(|o| o.parse::<std::net::SocketAddr>().is_ok())
        .unwrap_or_else(|| panic!("no ops address in {line}"))
        .to_string();
    (env, signer, ops)
}

/// A sample of the API port's connection metrics, read on the ops port.
async fn api_connections(ops: &str, series: &str) -> i64 {
    let metrics = ops_get(ops, "/metrics").await;
    let name = format!("meshca_api_connections{series}");
    metric_sample(&metrics, &name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// A generous bound on a wait that must end: a signer that never ends it fails the test
/// rather than hangs it.
async fn within<T>(what: &str, wait: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or_else(|_| panic!("{what}"))
}

/// Kept-alive mTLS connections, one per client, each idle after one answered request.
async fn idle_connections(env: &Env, signer: &Signer, count: usize) -> Vec<reqwest::Client> {
    let mut clients = Vec::new();
    for _ in 0..count {
        let client = env.client("cluster-b");
        let answer = signer.get_text(&client, "/healthz").await;
        assert!(!answer.is_empty());
        clients.push(client);
    }
    clients
}

#[tokio::test]
async fn idle_kept_alive_connections_up_to_the_bound_do_not_keep_a_new_agent_out() {
    // No header timeout to end the idle connections: only the bound can.
    let (env, signer, ops) =
        start_with_ops("max_connections = 3\nheader_timeout_ms = 300000\n").await;
    let idle = idle_connections(&env, &signer, 3).await;
    assert_eq!(api_connections(&ops, "{state=\"idle\"}").await, 3);
    assert_eq!(api_connections(&ops, "_max").await, 3);

    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let agent = env.client("cluster-a");
    let (status, answer) = within(
        "idle connections kept the agent out",
        post_sign(&agent, &signer, &sign_body(VM, MESH_A, &csr)),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // The slot was the one of the connection idle longest, closed for it.
    assert_eq!(
        api_connections(&ops, "_closed_total{reason=\"idle_for_new\"}").await,
        1
    );
    assert_eq!(
        api_connections(&ops, "_closed_total{reason=\"all_busy\"}").await,
        0
    );
    assert_eq!(api_connections(&ops, "{state=\"idle\"}").await, 3);
    assert_eq!(api_connections(&ops, "{state=\"active\"}").await, 0);
    assert_eq!(api_connections(&ops, "{state=\"handshaking\"}").await, 0);
    // The two left open are still served on their connections.
    for client in &idle[1..] {
        assert!(!signer.get_text(client, "/healthz").await.is_empty());
    }
    assert_eq!(
        api_connections(&ops, "_closed_total{reason=\"idle_for_new\"}").await,
        1
    );
}

#[tokio::test]
async fn half_open_connections_up_to_the_bound_do_not_keep_a_client_out() {
    // No handshake timeout to end them: only the bound can.
    let (env, signer, ops) =
        start_with_ops("max_connections = 4\nhandshake_timeout_ms = 300000\n").await;
    // TCP connections that never send a ClientHello, past the handshake grace.
    let mut half_open = Vec::new();
    for _ in 0..4 {
        half_open.push(tokio::net::TcpStream::connect(signer.addr).await.unwrap());
    }
    within("the half-open connections were not all taken in", async {
        while api_connections(&ops, "{state=\"handshaking\"}").await < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(HANDSHAKE_GRACE).await;
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let client = env.client("cluster-a");
    let (status, answer) = within(
        "connections in their handshake kept the client out",
        post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // The client's connection took the place of the one in its handshake longest.
    assert_eq!(
        api_connections(&ops, "_closed_total{reason=\"handshake_for_new\"}").await,
        1
    );
    assert_eq!(api_connections(&ops, "{state=\"handshaking\"}").await, 3);
    assert_eq!(api_connections(&ops, "{state=\"idle\"}").await, 1);
    // Named in the log, so that a flood's peers can be blocked.
    let line = signer
        .wait_for_log("connection closed by the connection bound")
        .await;
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["port"], "api", "{line}");
    assert_eq!(line["reason"], "handshake_for_new", "{line}");
    let first = half_open[0].local_addr().unwrap().to_string();
    assert_eq!(line["peer"], first.as_str(), "{line}");
    // Those closed were closed by the signer, without a word.
    let mut rest = Vec::new();
    within(
        "a connection closed for a new one stayed open",
        half_open[0].read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    drop(half_open);
}

/// While a slot is free, nobody's connection is closed for a new one: handshakes take
/// free slots past their share, and a client connecting beside them is served.
#[tokio::test]
async fn no_connection_is_closed_while_a_slot_is_free() {
    let (env, signer, ops) = start_with_ops(
        "max_connections = 4
",
    )
    .await;
    let mut half_open = Vec::new();
    for _ in 0..3 {
        half_open.push(tokio::net::TcpStream::connect(signer.addr).await.unwrap());
    }
    within("the half-open connections were not all taken in", async {
        while api_connections(&ops, "{state=\"handshaking\"}").await < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let client = env.client("cluster-a");
    let (status, answer) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(api_connections(&ops, "{state=\"handshaking\"}").await, 3);
    for reason in ["handshake_for_new", "idle_for_new", "all_busy"] {
        let series = format!("_closed_total{{reason=\"{reason}\"}}");
        assert_eq!(api_connections(&ops, &series).await, 0, "{reason}");
    }
    drop(half_open);
}

#[tokio::test]
async fn connections_in_their_handshake_hold_at_most_half_the_slots() {
    let (env, signer, ops) = start_with_ops(
        "max_connections = 4\nheader_timeout_ms = 300000\nhandshake_timeout_ms = 300000\n",
    )
    .await;
    let idle = idle_connections(&env, &signer, 2).await;
    // More half-open connections than slots: the first two take the free slots; every slot
    // taken, handshakes at their share and all within their grace, the rest are closed at
    // once, and no agent's connection is closed for them.
    let mut half_open = Vec::new();
    for _ in 0..6 {
        half_open.push(tokio::net::TcpStream::connect(signer.addr).await.unwrap());
    }
    within("the half-open connections were not all taken in", async {
        while api_connections(&ops, "_closed_total{reason=\"all_busy\"}").await < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(api_connections(&ops, "{state=\"handshaking\"}").await, 2);
    assert_eq!(api_connections(&ops, "{state=\"idle\"}").await, 2);
    // Past the grace, a new one takes the place of the one in its handshake longest, still
    // not an agent's.
    tokio::time::sleep(HANDSHAKE_GRACE).await;
    half_open.push(tokio::net::TcpStream::connect(signer.addr).await.unwrap());
    within("the half-open connection was not taken in", async {
        while api_connections(&ops, "_closed_total{reason=\"handshake_for_new\"}").await < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(api_connections(&ops, "{state=\"handshaking\"}").await, 2);
    assert_eq!(api_connections(&ops, "{state=\"idle\"}").await, 2);
    assert_eq!(
        api_connections(&ops, "_closed_total{reason=\"idle_for_new\"}").await,
        0
    );
    // The agents' connections are still open and served.
    for client in &idle {
        assert!(!signer.get_text(client, "/healthz").await.is_empty());
    }
    assert_eq!(api_connections(&ops, "{state=\"idle\"}").await, 2);
    drop(half_open);
}

/// Reads `tls` until an answer's status line has arrived; returns what came.
async fn answer_status(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let n = within("no answer", tls.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed before an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_connection_mid_request_is_not_closed_for_a_new_one() {
    let (env, signer, ops) = start_with_ops(
        "max_connections = 2\nheader_timeout_ms = 300000\nbody_timeout_ms = 300000\n",
    )
    .await;
    // One connection with a signing request under way (its body half sent), one idle.
    let (_key, csr_b) = csr(KeyType::EcdsaP256, "acme", "b");
    let body = serde_json::to_vec(&sign_body(VM, "test/cluster-b", &csr_b)).unwrap();
    let mut under_way = tls_connect(&env, &signer, "cluster-b").await;
    begin_sign_request(&mut under_way, &body, 100).await;
    let _idle = idle_connections(&env, &signer, 1).await;
    assert_eq!(api_connections(&ops, "{state=\"active\"}").await, 1);
    assert_eq!(api_connections(&ops, "{state=\"idle\"}").await, 1);

    // A new client takes the idle one's slot, not the busy one's.
    let (_key, csr_a) = csr(KeyType::EcdsaP256, "acme", "a");
    let client = env.client("cluster-a");
    let (status, answer) = within(
        "the new client was kept out",
        post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr_a)),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        api_connections(&ops, "_closed_total{reason=\"idle_for_new\"}").await,
        1
    );
    assert_eq!(api_connections(&ops, "{state=\"active\"}").await, 1);

    // The request under way is answered in full, on its connection.
    under_way.write_all(&body[100..]).await.unwrap();
    let answer = answer_status(&mut under_way).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        api_connections(&ops, "_closed_total{reason=\"all_busy\"}").await,
        0
    );
}
