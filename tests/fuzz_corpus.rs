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
