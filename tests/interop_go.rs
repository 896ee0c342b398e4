//! What Istio's control plane makes of what meshca installs: istiod is Go, and reads
//! cacerts with crypto/x509. tests/go/istiod_check.go (standard library only, built here
//! offline) loads each cluster's cacerts as istiod does, signs workload certificates under
//! it as istiod's CA does, verifies them and runs an mTLS handshake between two clusters
//! with crypto/tls; openssl is the other verifier, in the other tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::certs::Workload;
use common::*;
use meshca::pki::keys::KeyType;

/// The checker, built once per test binary (`go` from scripts/install-deps.sh). Go's
/// build cache lives in target/, the module proxy is off: nothing is downloaded.
fn istiod_check() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let go = Command::new("go").arg("version").output();
        let go = go
            .ok()
            .filter(|out| out.status.success())
            .expect("go is missing: run scripts/install-deps.sh (make test does)");
        // istiod is built with a newer Go than Debian's golang-go: the output says which
        // one these checks ran with.
        eprintln!(
            "istiod_check built with {} (Debian's golang-go, not istiod's own Go)",
            String::from_utf8_lossy(&go.stdout).trim()
        );
        let out_dir = repo().join("target/go");
        std::fs::create_dir_all(&out_dir).unwrap();
        let binary = out_dir.join("istiod_check");
        run_ok(
            Command::new("go")
                .current_dir(repo())
                .env("GOCACHE", out_dir.join("cache"))
                .env("GOPATH", out_dir.join("gopath"))
                .env("GOTOOLCHAIN", "local")
                .env("GOPROXY", "off")
                .env("GOFLAGS", "-buildvcs=false")
                .env("CGO_ENABLED", "0")
                .args(["build", "-o"])
                .arg(&binary)
                .arg("tests/go/istiod_check.go"),
        );
        binary
    })
}

/// What the checker printed, and whether it said ok.
fn go_check(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (String, bool) {
    let mut cmd = Command::new(istiod_check());
    for arg in args {
        cmd.arg(arg);
    }
    let out = run(&mut cmd);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}: {said}",
        describe(&cmd)
    );
    (said.trim().to_string(), out.status.success())
}

/// One `agent --once` pass for `cluster` into `dir`, which must succeed.
fn install(env: &Env, signer: &Signer, cluster: &str, dir: &Path, key_type: &str) {
    let mut cmd = env.meshca();
    cmd.args(["agent", "--once", "--target-dir"])
        .arg(dir)
        .args(env.signer_flags(signer.addr, cluster))
        .args(["--virtual-mesh", "test/vm", "--mesh"])
        .arg(format!("test/{cluster}"))
        .args(["--key-type", key_type, "--ttl-seconds", "1800"]);
    run_ok(&mut cmd);
}

/// Clusters a and b, intermediates of `key_types`, under a root of `root_key_type`:
/// istiod takes each cacerts, a workload of each verifies, and the two clusters' workloads
/// complete an mTLS handshake both ways.
fn istiod_takes_the_cacerts(root_key_type: KeyType, key_types: [&str; 2]) {
    let env = Env::with(EnvSpec {
        root_key_type,
        ..EnvSpec::default()
    });
    let signer = env.start_signer();
    let a = env.path("clusters/a");
    let b = env.path("clusters/b");
    install(&env, &signer, "cluster-a", &a, key_types[0]);
    install(&env, &signer, "cluster-b", &b, key_types[1]);
    for dir in [&a, &b] {
        let (said, ok) = go_check(&[&"cacerts", dir]);
        assert!(ok, "{root_key_type:?} {key_types:?}: {said}");
        let (said, ok) = go_check(&[&"leaf", dir, &"URI:spiffe://cluster.local/ns/default/sa/x"]);
        assert!(ok, "{root_key_type:?} {key_types:?}: {said}");
    }
    for (server, client) in [(&a, &b), (&b, &a)] {
        let (said, ok) = go_check(&[&"mtls", server, client]);
        assert!(ok, "{root_key_type:?} {key_types:?}: {said}");
    }
}

#[test]
fn istiod_takes_the_cacerts_under_an_ecdsa_root() {
    istiod_takes_the_cacerts(KeyType::EcdsaP384, ["ecdsa-p256", "rsa2048"]);
}

#[test]
fn istiod_takes_the_cacerts_under_an_rsa_root() {
    istiod_takes_the_cacerts(KeyType::Rsa3072, ["rsa3072", "ecdsa-p384"]);
}

/// A cluster of another root is refused by Go as by openssl: the check is not a rubber
/// stamp.
#[test]
fn a_cluster_under_another_root_is_refused() {
    let env = Env::new();
    let other = env.impostor();
    let signer = env.start_signer();
    let other_signer = other.start_signer();
    let a = env.path("clusters/a");
    let stranger = other.path("clusters/stranger");
    install(&env, &signer, "cluster-a", &a, "ecdsa-p256");
    install(&other, &other_signer, "cluster-b", &stranger, "ecdsa-p256");
    let (said, ok) = go_check(&[&"mtls", &a, &stranger]);
    assert!(
        !ok && said.contains("certificate signed by unknown authority"),
        "{said}"
    );
    // cacerts whose root-cert.pem is another cluster's root: istiod refuses to load it.
    std::fs::copy(a.join("root-cert.pem"), stranger.join("root-cert.pem")).unwrap();
    let (said, ok) = go_check(&[&"cacerts", &stranger]);
    assert!(!ok && said.starts_with("ca-cert.pem: "), "{said}");
}

/// Under `spec.trustDomains`, as Go reads the name constraints: the listed trust domain
/// and DNS names verify, another trust domain is refused, and, unlike openssl, a
/// subdomain of a listed one is taken (the README's warning about nested trust domains).
#[test]
fn go_reads_the_trust_domain_constraints_as_the_readme_says() {
    let mut spec = EnvSpec::default();
    spec.virtual_meshes[0].push_str("  trustDomains: [pay.local]\n");
    let env = Env::with(spec);
    let signer = env.start_signer();
    let a = env.path("clusters/a");
    install(&env, &signer, "cluster-a", &a, "ecdsa-p256");
    let (said, ok) = go_check(&[&"cacerts", &a]);
    assert!(ok, "{said}");
    for san in [
        "URI:spiffe://pay.local/ns/pay/sa/ledger",
        "DNS:istiod.istio-system.svc",
        "URI:spiffe://eu.pay.local/ns/pay/sa/ledger",
    ] {
        let (said, ok) = go_check(&[&"leaf", &a, &san]);
        assert!(ok, "{san}: {said}");
    }
    let (said, ok) = go_check(&[&"leaf", &a, &"URI:spiffe://web.local/ns/web/sa/frontend"]);
    assert!(
        !ok && said.contains("refused") && said.contains("web.local"),
        "{said}"
    );
    // openssl refuses the subdomain that Go takes.
    let work = env.path("workloads");
    std::fs::create_dir_all(&work).unwrap();
    Workload::issue_with_san(
        &work,
        &a,
        "eu",
        "URI:spiffe://eu.pay.local/ns/pay/sa/ledger",
    );
    let chain = a.join("cert-chain.pem");
    let roots = a.join("root-cert.pem");
    let out = run(Command::new("openssl")
        .current_dir(&work)
        .args(["verify", "-CAfile"])
        .arg(&roots)
        .arg("-untrusted")
        .arg(&chain)
        .arg("eu.pem"));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !out.status.success() && said.contains("permitted subtree violation"),
        "{said}"
    );
}
