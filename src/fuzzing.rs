//! Entry points for the fuzz targets in `fuzz/` and for the test that replays their
//! corpus on every `make test`. Each must accept any input without panicking.

use std::sync::OnceLock;
use std::time::SystemTime;

use crate::config::AuthorizationTable;
use crate::pki::csr::ParsedCsr;
use crate::pki::profile::{RootCa, random_serial};
use crate::policy::PolicySet;
use crate::policy::rules::check_public_key;
use crate::signer::decision::{DecisionContext, RequestFacts, SignRequest, decide};

/// CSR parsing and validation, from DER and (if the input is text) from PEM.
pub fn csr(data: &[u8]) {
    if let Ok(csr) = ParsedCsr::from_der(data) {
        exercise(&csr);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(csr) = ParsedCsr::from_pem(text)
    {
        exercise(&csr);
    }
}

fn exercise(csr: &ParsedCsr) {
    for min in [2048, 3072, 4096] {
        let _ = check_public_key(&csr.key_kind, min);
    }
    let _ = csr.verify_possession();
    let _ = csr.public_key_sha256();
}

struct Fixture {
    policies: PolicySet,
    authorization: AuthorizationTable,
    root: RootCa,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut policies = PolicySet::default();
        policies
            .add_yaml("seed", include_str!("../config/virtual-mesh.yaml"))
            .expect("the seed VirtualMesh loads");
        let mut authorization = AuthorizationTable::default();
        for mesh in policies
            .iter()
            .flat_map(|p| p.meshes.iter().map(|m| (p.id.clone(), m.clone())))
        {
            authorization.insert("fuzzer", mesh.0, mesh.1);
        }
        let root =
            RootCa::from_pem(include_str!("../fuzz/root-cert.pem")).expect("the fuzz root loads");
        Fixture {
            policies,
            authorization,
            root,
        }
    })
}

/// Request decoding and the whole signing decision.
pub fn sign_request(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<SignRequest>(data) else {
        return;
    };
    let f = fixture();
    let ctx = DecisionContext {
        policies: &f.policies,
        authorization: &f.authorization,
        root: &f.root,
    };
    let Ok(serial) = random_serial() else { return };
    let mut facts = RequestFacts::default();
    let _ = decide(
        &ctx,
        Some("fuzzer"),
        &request,
        SystemTime::now(),
        serial,
        &mut facts,
    );
}
