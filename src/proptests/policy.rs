//! The signer's policy rules (`policy::rules`) and the bounds of a loaded VirtualMesh.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::{cfg, virtual_mesh_yaml};
use crate::pki::keys::{KeyType, NamedCurve, PublicKeyKind, RsaExponent};
use crate::policy::rules::*;
use crate::policy::virtual_mesh::PolicySet;

const DAY: u64 = 86_400;

/// Public keys of every kind the rules distinguish: RSA of any size and exponent, the
/// accepted curves, another curve, another algorithm.
fn key_kind() -> impl Strategy<Value = PublicKeyKind> {
    let exponent = prop_oneof![
        Just(RsaExponent::F4),
        any::<u64>().prop_map(RsaExponent::Small),
        (60_000u64..70_000).prop_map(RsaExponent::Small),
        any::<bool>().prop_map(|odd| RsaExponent::Large { odd }),
    ];
    prop_oneof![
        (0u32..20_000, exponent).prop_map(|(modulus_bits, exponent)| PublicKeyKind::Rsa {
            modulus_bits,
            exponent
        }),
        Just(PublicKeyKind::Ec(NamedCurve::P256)),
        Just(PublicKeyKind::Ec(NamedCurve::P384)),
        Just(PublicKeyKind::Ec(NamedCurve::Other(
            const_oid::db::rfc5912::SECP_521_R_1
        ))),
        Just(PublicKeyKind::Other(const_oid::db::rfc5912::ID_DSA)),
    ]
}

proptest! {
    #![proptest_config(cfg(5_000))]

    /// Guards the meaning of rsaKeySizeBytes as a minimum: a key accepted under a minimum
    /// is accepted under every lower one.
    #[test]
    fn key_policy_is_monotone_in_the_minimum(
        kind in key_kind(),
        hi in 0u32..20_000,
        lo_fraction in 0.0f64..=1.0,
    ) {
        let lo = (f64::from(hi) * lo_fraction) as u32;
        if check_public_key(&kind, hi).is_ok() {
            prop_assert!(check_public_key(&kind, lo).is_ok(), "{kind:?} ok at {hi}, not at {lo}");
        }
    }

    /// Guards the key types the signer publishes to agents: the list shrinks as the
    /// minimum grows, and every type listed passes the key check.
    #[test]
    fn accepted_key_types_shrink_and_pass(a in 0u32..10_000, b in 0u32..10_000) {
        let (lo, hi) = (a.min(b), a.max(b));
        let at_lo = accepted_key_types(lo);
        for key_type in accepted_key_types(hi) {
            prop_assert!(at_lo.contains(&key_type));
            prop_assert!(check_public_key(&key_type.public_key_kind(), hi).is_ok());
        }
    }

    /// Guards the organization check: a CSR passes exactly when every organization it asks
    /// for is the policy's, in whatever order.
    #[test]
    fn org_check_ignores_order(
        mut orgs in proptest::collection::vec("[a-c]{0,2}", 0..5),
        org in "[a-c]{0,2}",
    ) {
        let before = check_org(&orgs, &org).is_ok();
        orgs.reverse();
        prop_assert_eq!(before, check_org(&orgs, &org).is_ok());
        prop_assert_eq!(before, orgs.iter().all(|o| *o == org));
    }

    /// Guards the validity window of an intermediate, whatever ttl is asked (u64::MAX
    /// included): never longer than asked, than the policy or than the root, notBefore
    /// before notAfter, at least MIN_TTL, capped_by_root exactly when the root cut it short,
    /// and each refusal for its reason.
    #[test]
    fn validity_window_bounds(
        now_s in 0u64..4_000_000_000,
        ttl in proptest::option::of(prop_oneof![any::<u64>(), 0u64..400 * DAY]),
        max_days in 1u64..=36_500,
        root_offset_s in -(400 * DAY as i64)..(40_000 * DAY as i64),
    ) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_s);
        let max_ttl = Duration::from_secs(max_days * DAY);
        let root = match u64::try_from(root_offset_s) {
            Ok(ahead) => now + Duration::from_secs(ahead),
            Err(_) => now
                .checked_sub(Duration::from_secs(root_offset_s.unsigned_abs()))
                .unwrap_or(SystemTime::UNIX_EPOCH),
        };
        let requested = ttl.map(Duration::from_secs);
        match intermediate_validity(now, requested, max_ttl, root) {
            Ok(w) => {
                prop_assert!(w.not_before < w.not_after);
                prop_assert!(w.not_after <= root);
                prop_assert!(w.not_after <= now + max_ttl);
                if let Some(r) = requested {
                    prop_assert!(r >= MIN_TTL);
                    prop_assert!(w.not_after <= now + r);
                }
                prop_assert!(w.not_after >= now + MIN_TTL);
                let asked_end = now + requested.unwrap_or(max_ttl);
                prop_assert_eq!(w.capped_by_root, w.not_after == root && root < asked_end);
            }
            Err(ValidityError::Denied(_)) => prop_assert!(requested.unwrap() > max_ttl),
            Err(ValidityError::TooShort(_)) => prop_assert!(requested.unwrap() < MIN_TTL),
            Err(ValidityError::RootExpired(_)) => prop_assert!(root <= now + MIN_TTL),
        }
    }
}

proptest! {
    #![proptest_config(cfg(2_000))]

    /// Guards loading a VirtualMesh, whatever its numbers and orgName: a policy that loads
    /// stays within meshca's bounds (ttl, RSA size, orgName length) and accepts at least one
    /// key type.
    #[test]
    fn loaded_policies_are_bounded(
        ttl in any::<u32>(),
        bits in any::<u32>(),
        org in "[ -~]{0,70}",
    ) {
        let org = serde_json::to_string(&org).unwrap();
        let yaml = virtual_mesh_yaml(
            "{name: vm, namespace: ns}",
            &format!("{{ttlDays: {ttl}, rsaKeySizeBytes: {bits}, orgName: {org}}}"),
            &["meshes:", "- {name: a, namespace: ns}"],
        );
        let mut set = PolicySet::default();
        if set.add_yaml("t", &yaml).is_ok() {
            let p = set.iter().next().unwrap();
            prop_assert!(p.max_ttl >= Duration::from_secs(DAY));
            prop_assert!(p.max_ttl <= Duration::from_secs(36_500 * DAY));
            prop_assert!((RSA_FLOOR_BITS..=RSA_MAX_BITS).contains(&p.min_rsa_bits));
            prop_assert!(!p.org_name.is_empty() && p.org_name.chars().count() <= 64);
            prop_assert!(!p.accepted_key_types().is_empty());
        }
    }
}

/// Key type names round-trip (the signer's policy names them, agents parse them) and name
/// distinct key kinds.
#[test]
fn key_type_names_round_trip() {
    let mut kinds = std::collections::HashSet::new();
    for key_type in KeyType::ALL {
        assert_eq!(key_type.name().parse::<KeyType>().unwrap(), key_type);
        assert!(kinds.insert(key_type.public_key_kind().to_string()));
    }
}
