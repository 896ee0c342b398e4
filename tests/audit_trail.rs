//! What the audit trail gives an incident: each decision's line names the TCP peer the
//! request came from (a stolen client key used from another host names the same client
//! and certificate as its agent), and issuance is counted per client.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use meshca::pki::keys::KeyType;
use serde_json::Value;
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
