//! Replays the fuzz corpus (seeds and any saved crash inputs) through the fuzz entry
//! points on every `make test`, so a fixed crash stays fixed without cargo-fuzz.

use std::path::Path;

fn replay(dir: &str, target: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(dir);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        target(&std::fs::read(&path).unwrap());
        count += 1;
    }
    count
}

#[test]
fn csr_corpus_replays_without_panics() {
    assert!(replay("csr", meshca::fuzzing::csr) >= 5);
}

#[test]
fn sign_request_corpus_replays_without_panics() {
    assert!(replay("sign_request", meshca::fuzzing::sign_request) >= 4);
}

#[test]
fn audit_verify_corpus_replays_without_panics() {
    assert!(replay("audit_verify", meshca::fuzzing::audit_verify) >= 4);
}

#[test]
fn cacerts_bundle_corpus_replays_without_panics() {
    assert!(replay("cacerts_bundle", meshca::fuzzing::cacerts_bundle) >= 3);
}

#[test]
fn agent_answer_corpus_replays_without_panics() {
    assert!(replay("agent_answer", meshca::fuzzing::agent_answer) >= 3);
}

#[test]
fn root_cert_corpus_replays_without_panics() {
    assert!(replay("root_cert", meshca::fuzzing::root_cert) >= 4);
}

#[test]
fn client_crls_corpus_replays_without_panics() {
    assert!(replay("client_crls", meshca::fuzzing::client_crls) >= 4);
}

#[test]
fn pkcs11_uri_corpus_replays_without_panics() {
    assert!(replay("pkcs11_uri", meshca::fuzzing::pkcs11_uri) >= 3);
}

#[test]
fn mesh_yaml_corpus_replays_without_panics() {
    assert!(replay("mesh_yaml", meshca::fuzzing::mesh_yaml) >= 5);
}

#[test]
fn k8s_objects_corpus_replays_without_panics() {
    assert!(replay("k8s_objects", meshca::fuzzing::k8s_objects) >= 5);
}
