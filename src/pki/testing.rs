//! Test helpers: a root CA signed in software, so the pure code can be tested without a
//! token. Never compiled into the product.

use std::time::{Duration, SystemTime};

use der::Decode;
use x509_cert::Certificate;

use super::csr::sign_with;
use super::keys::{KeyType, PrivateKey};
use super::profile::{IntermediatePlan, RootCa, assemble, random_serial, root_tbs, subject_name};
use super::sigalg::SignatureAlgorithm;

/// A self-signed root for `org`, valid for `ttl`, with a software key of `key_type`.
pub fn software_root(key_type: KeyType, org: &str, ttl: Duration) -> (PrivateKey, RootCa) {
    let key = PrivateKey::generate(key_type).unwrap();
    let now = SystemTime::now();
    let plan = IntermediatePlan {
        subject: subject_name(org, "test root").unwrap(),
        public_key: key.public_key_info().unwrap(),
        serial: random_serial().unwrap(),
        not_before: now - Duration::from_secs(60),
        not_after: now + ttl,
    };
    let algorithm = SignatureAlgorithm::for_key_type(key_type);
    let tbs = root_tbs(&plan, algorithm).unwrap();
    let (signed_with, signature) = sign_with(&key, &tbs).unwrap();
    assert_eq!(signed_with, algorithm);
    let cert = Certificate::from_der(&assemble(&tbs, algorithm, &signature).unwrap()).unwrap();
    (key, RootCa::from_certificate(cert).unwrap())
}
