//! root-cert.pem across root changes (`agent::rotation`): what the agents write, step by
//! step, as Istio accepts it.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::cfg;
use crate::agent::rotation::*;
use crate::pki::bundle::{fingerprint, is_self_issued};
use crate::pki::keys::{KeyType, PrivateKey};
use crate::pki::pem::decode_readable_certificates;
use crate::pki::profile::RootCa;
use crate::pki::testing::{software_bundle, software_root};

const DAY: u64 = 86_400;
/// Lifetimes of the pool's roots, in days: some expire within the times generated.
const ROOT_DAYS: [u64; 5] = [400, 800, 30, 2, 600];
/// Indexes past the roots: an intermediate (not self-issued), a block that is no
/// certificate.
const INTERMEDIATE: usize = 5;
const UNREADABLE: usize = 6;

struct Pool {
    roots: Vec<(PrivateKey, RootCa)>,
    /// An intermediate under the first root, PEM.
    intermediate: String,
    created: SystemTime,
}

impl Pool {
    fn pem(&self, i: usize) -> String {
        match i {
            INTERMEDIATE => self.intermediate.clone(),
            UNREADABLE => "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            i => self.roots[i].1.pem.clone(),
        }
    }
}

thread_local! {
    static POOL: Pool = {
        let created = SystemTime::now();
        let roots: Vec<_> = ROOT_DAYS
            .iter()
            .map(|d| software_root(KeyType::EcdsaP256, "acme", Duration::from_secs(d * DAY)))
            .collect();
        let bundle = software_bundle(
            &roots[0].0,
            &roots[0].1,
            "acme",
            "m",
            KeyType::EcdsaP256,
            created - Duration::from_secs(60),
            created + Duration::from_secs(10 * DAY),
        );
        Pool { roots, intermediate: bundle.ca_cert, created }
    };
}

/// Fingerprints of the self-issued certificates of a PEM text.
fn installed_roots(pem: &str) -> BTreeSet<String> {
    decode_readable_certificates(pem)
        .0
        .iter()
        .filter(|c| is_self_issued(c))
        .map(fingerprint)
        .collect()
}

proptest! {
    #![proptest_config(cfg(300))]

    /// Guards root_cert_to_write from any installed root-cert.pem (duplicates, an
    /// intermediate, an unreadable block, expired and retired roots) and any announced
    /// roots: the signer's root first, each root once, every step a superset or a subset
    /// of the roots in force (Istio's rule), a fixpoint within two steps holding no retired
    /// or expired root besides the signer's; and every certificate the first write leaves
    /// out is named, a retired one as retired.
    #[test]
    fn root_cert_steps_follow_istio(
        anchor in 0usize..5,
        next in proptest::option::of(0usize..5),
        previous in proptest::option::of(0usize..5),
        installed in proptest::option::of(proptest::collection::vec(0usize..7, 0..6)),
        retired in proptest::collection::vec(0usize..5, 0..3),
        later_days in 0u64..900,
    ) {
        POOL.with(|p| {
            let now = p.created + Duration::from_secs((later_days % ROOT_DAYS[anchor]) * DAY);
            let a = &p.roots[anchor].1;
            prop_assume!(now < a.not_after);
            let announced = AnnouncedRoots {
                next: next.map(|i| p.pem(i)),
                previous: previous.map(|i| p.pem(i)),
            };
            // Upper case, as an operator may paste them.
            let retired: Vec<String> = retired
                .iter()
                .map(|i| p.roots[*i].1.fingerprint_sha256.to_ascii_uppercase())
                .collect();
            let retired_normal: Vec<String> =
                retired.iter().map(|r| normalize_fingerprint(r)).collect();
            let installed: Option<String> =
                installed.map(|v| v.into_iter().map(|i| p.pem(i)).collect());

            let mut current = installed.clone();
            let mut outputs = Vec::new();
            for _ in 0..3 {
                let out = root_cert_to_write(&a.pem, &announced, current.as_deref(), &retired, now);
                let fps = root_fingerprints(&out);
                prop_assert_eq!(fps.first(), Some(&a.fingerprint_sha256));
                let set: BTreeSet<String> = fps.iter().cloned().collect();
                prop_assert_eq!(set.len(), fps.len(), "a root twice in {:?}", fps);
                if let Some(current) = &current {
                    let in_force = installed_roots(current);
                    prop_assert!(
                        set.is_superset(&in_force) || set.is_subset(&in_force),
                        "step {:?} -> {:?}", in_force, set
                    );
                }
                outputs.push(out.clone());
                current = Some(out);
            }
            prop_assert_eq!(&outputs[1], &outputs[2], "no fixpoint after two steps");
            for fp in root_fingerprints(&outputs[2]).iter().skip(1) {
                prop_assert!(!retired_normal.contains(fp), "retired root {fp} kept");
                let (_, root) = p.roots.iter().find(|(_, r)| &r.fingerprint_sha256 == fp).unwrap();
                prop_assert!(root.not_after >= now, "expired root {fp} kept");
            }

            if let Some(installed) = &installed {
                let written = root_fingerprints(&outputs[0]);
                let left = roots_left_out(installed, &outputs[0], &retired, now);
                let named: BTreeSet<&String> = left.iter().map(|l| &l.fingerprint).collect();
                let dropped: BTreeSet<String> = decode_readable_certificates(installed)
                    .0
                    .iter()
                    .map(fingerprint)
                    .filter(|fp| !written.contains(fp))
                    .collect();
                prop_assert_eq!(named, dropped.iter().collect::<BTreeSet<_>>());
                for l in &left {
                    if l.why == RETIRED {
                        prop_assert!(retired_normal.contains(&l.fingerprint));
                    }
                }
            }
            Ok(())
        })?;
    }

}

proptest! {
    #![proptest_config(cfg(150))]

    /// Guards decide for an installed bundle of ours whose root-cert.pem carries other
    /// roots, with roots announced and retired: the RewriteRoots it asks for reach UpToDate
    /// within two writes, each summary naming the roots written.
    #[test]
    fn decide_rewrites_converge(
        next in proptest::option::of(1usize..5),
        previous in proptest::option::of(1usize..5),
        extra in proptest::collection::vec(1usize..5, 0..3),
        retired in proptest::collection::vec(1usize..5, 0..3),
        later_days in 0u64..6,
    ) {
        POOL.with(|p| {
            let (key, a) = &p.roots[0];
            let now = p.created + Duration::from_secs(later_days * DAY);
            let mut bundle = software_bundle(
                key,
                a,
                "acme",
                "m",
                KeyType::EcdsaP256,
                p.created - Duration::from_secs(60),
                p.created + Duration::from_secs(10 * DAY),
            );
            for i in &extra {
                bundle.root_cert.push_str(&p.roots[*i].1.pem);
            }
            let desired = Desired {
                mesh_name: "m".into(),
                key_type: None,
                accepted_key_types: None,
                adopt: false,
                signer_root: Some(a.fingerprint_sha256.clone()),
                signer_root_not_after: Some(a.not_after),
                signer_announced: AnnouncedRoots {
                    next: next.map(|i| p.pem(i)),
                    previous: previous.map(|i| p.pem(i)),
                },
                retired_roots: retired
                    .iter()
                    .map(|i| p.roots[*i].1.fingerprint_sha256.clone())
                    .collect(),
                rotation: RotationSettings::default(),
            };
            let mut rewrites = 0;
            loop {
                match decide(&Installed::Ours(bundle.clone()), &desired, now) {
                    Decision::RewriteRoots { root_cert, summary, .. } => {
                        prop_assert_eq!(&summary.root_fingerprints, &root_fingerprints(&root_cert));
                        bundle.root_cert = root_cert;
                        rewrites += 1;
                        prop_assert!(rewrites <= 2, "more than two rewrites");
                    }
                    Decision::UpToDate { .. } => break,
                    other => prop_assert!(false, "{other:?}"),
                }
            }
            Ok(())
        })?;
    }
}
