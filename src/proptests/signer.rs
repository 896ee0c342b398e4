//! The signer's decision (`signer::decision`) against the certificate profile and linter.

use std::time::{Duration, SystemTime};

use der::{Decode, EncodePem};
use proptest::prelude::*;
use x509_cert::TbsCertificate;

use super::{cfg, virtual_mesh_yaml};
use crate::config::AuthorizationTable;
use crate::pki::csr::build_csr;
use crate::pki::keys::{KeyType, PrivateKey};
use crate::pki::lint::lint_intermediate;
use crate::pki::profile::{RootCa, intermediate_tbs, random_serial, subject_name};
use crate::pki::testing::software_root;
use crate::policy::PolicySet;
use crate::signer::decision::*;

thread_local! {
    /// A P-384 root, made when the thread first needs it.
    static ROOT: (PrivateKey, RootCa, SystemTime) = {
        let (key, root) =
            software_root(KeyType::EcdsaP384, "ignored", Duration::from_secs(400 * 86_400));
        (key, root, SystemTime::now())
    };
    /// The CSR keys: P-256 and P-384 (RSA would make each case slow to generate).
    static KEYS: Vec<PrivateKey> = vec![
        PrivateKey::generate(KeyType::EcdsaP256).unwrap(),
        PrivateKey::generate(KeyType::EcdsaP384).unwrap(),
    ];
}

/// A mesh name: dot-separated labels, up to about 180 characters.
fn mesh_name() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", 1..8).prop_map(|l| l.join("."))
}

/// Refusal codes a well-formed, authorized request may get from a policy.
const EXPECTED_REFUSALS: [&str; 4] = [
    "policy_ttl",
    "malformed_request",
    "root_expired",
    "policy_key_algorithm",
];

proptest! {
    #![proptest_config(cfg(800))]

    /// Guards issuance end to end, for any policy numbers, orgName (Unicode included), mesh
    /// name, requested ttl (u64::MAX included) and time against the root: whatever decide
    /// approves, the certificate profile builds and the pre-signing linter passes; what it
    /// refuses, it refuses for a policy reason.
    #[test]
    fn approved_plans_pass_lint(
        org in prop_oneof!["[ -~]{1,64}", "[a-zé€😀]{1,64}"],
        ttl_days in 1u32..=36_500,
        bits in 0u32..=8192,
        mesh in mesh_name(),
        ttl in proptest::option::of(prop_oneof![
            1u64..1000,
            60u64..(40_000 * 86_400),
            any::<u64>()
        ]),
        offset_s in -86_400i64..(500 * 86_400),
        key in 0usize..2,
    ) {
        let org_json = serde_json::to_string(&org).unwrap();
        let yaml = virtual_mesh_yaml(
            "{name: vm, namespace: ns}",
            &format!("{{ttlDays: {ttl_days}, rsaKeySizeBytes: {bits}, orgName: {org_json}}}"),
            &["meshes:", &format!("- {{name: '{mesh}', namespace: ns}}")],
        );
        let mut policies = PolicySet::default();
        if policies.add_yaml("t", &yaml).is_err() {
            return Ok(());
        }
        let policy_org = policies.iter().next().unwrap().org_name.clone();
        let mut authorization = AuthorizationTable::default();
        authorization.insert("c", "ns/vm".parse().unwrap(), format!("ns/{mesh}").parse().unwrap());
        ROOT.with(|(_, root, created)| KEYS.with(|keys| {
            let now = match u64::try_from(offset_s) {
                Ok(ahead) => *created + Duration::from_secs(ahead),
                Err(_) => *created - Duration::from_secs(offset_s.unsigned_abs()),
            };
            let csr = build_csr(&keys[key], subject_name(&policy_org, "x").unwrap())
                .unwrap()
                .to_pem(der::pem::LineEnding::LF)
                .unwrap();
            let request = SignRequest {
                virtual_mesh: "ns/vm".into(),
                mesh: format!("ns/{mesh}"),
                csr,
                ttl_seconds: ttl,
            };
            let ctx = DecisionContext { policies: &policies, authorization: &authorization, root };
            let mut facts = RequestFacts::default();
            match decide(&ctx, Requester { identity: Some("c"), ..Default::default() }, &request, now, random_serial().unwrap(), &mut facts) {
                Ok(approval) => {
                    let tbs = intermediate_tbs(&approval.issue.plan, root, &approval.issue.trust_domains)
                        .map_err(|e| TestCaseError::fail(format!("build: {e}")))?;
                    let tbs = TbsCertificate::from_der(&tbs).unwrap();
                    lint_intermediate(&tbs, &approval.issue.expectations(root, true))
                        .map_err(|e| TestCaseError::fail(format!("lint: {e}")))?;
                }
                Err(refusal) => prop_assert!(
                    EXPECTED_REFUSALS.contains(&refusal.code),
                    "{}: {}", refusal.code, refusal.message
                ),
            }
            Ok(())
        }))?;
    }
}
