//! A signing request whose client closed its connection before signing began is not
//! signed, on both backends (a real SoftHSM token, a real OpenBao); the same backend then
//! still signs. Its own test binary: it points the in-process PKCS#11 module at the test's
//! token with SOFTHSM2_CONF.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use der::Encode;
use meshca::backend::{BackendError, IssueRequest};
use meshca::config::SignerConfig;
use meshca::pki::csr::build_csr;
use meshca::pki::keys::{KeyType, PrivateKey};
use meshca::pki::profile::{IntermediatePlan, RootCa, random_serial, subject_name};
use meshca::signer::server::start_backend;

/// An intermediate for `test/cluster-a` within the test policy (org acme, 1 day).
fn issue_request(root: &RootCa) -> IssueRequest {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let subject = subject_name("acme", "cluster-a").unwrap();
    let csr = build_csr(&key, subject.clone()).unwrap();
    let now = SystemTime::now();
    let not_after = (now + Duration::from_secs(86_400)).min(root.not_after);
    IssueRequest {
        plan: IntermediatePlan {
            subject,
            public_key: key.public_key_info().unwrap(),
            serial: random_serial().unwrap(),
            not_before: now,
            not_after,
        },
        org_name: "acme".into(),
        latest_not_after: not_after,
        min_rsa_bits: 2048,
        trust_domains: Vec::new(),
        csr_der: csr.to_der().unwrap(),
        client_gone: Default::default(),
        signing_asked: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_client_left_before_signing_began_is_not_signed() {
    for backend in Backend::both() {
        let (name, on_token) = (backend.name(), matches!(backend, Backend::Pkcs11));
        let env = Env::with(EnvSpec {
            backend,
            ..EnvSpec::default()
        });
        let config = SignerConfig::load(&env.path("signer.toml")).unwrap();
        if let Some(conf) = config.pkcs11.as_ref().and_then(|p| p.softhsm2_conf.clone()) {
            // SAFETY: this binary's one test; no other thread reads the environment now.
            unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
        }
        let root = RootCa::from_pem(&env.root_pem()).unwrap();
        let signer = tokio::task::spawn_blocking(move || start_backend(&config, root))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: {e}", name));

        let gone = issue_request(signer.root());
        gone.client_gone.cancel();
        let answer = signer.issue(gone).await;
        assert!(
            matches!(answer, Err(BackendError::ClientGone)),
            "{name}: {:?}",
            answer.map(|_| "signed a certificate")
        );
        let kept = issue_request(signer.root());
        let serial = kept.plan.serial.clone();
        let certificate = signer
            .issue(kept)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", name));
        if on_token {
            // Vault picks its own serials; the token signs meshca's plan as it is.
            assert_eq!(
                certificate.tbs_certificate().serial_number().as_bytes(),
                serial.as_bytes()
            );
        }
    }
}
