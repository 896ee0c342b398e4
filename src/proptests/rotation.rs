//! The agents' renewal timing (`agent::rotation`): renew_at, check_ttl and decide over time.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::{any_time, cfg};
use crate::agent::rotation::*;
use crate::pki::keys::{KeyType, PrivateKey};
use crate::pki::profile::RootCa;
use crate::pki::testing::{software_bundle, software_root, whole_seconds};
use crate::policy::rules::BACKDATE;

/// Every pair of fractions RotationSettings accepts.
fn settings() -> impl Strategy<Value = RotationSettings> {
    (0.1f64..=0.95, 0.0f64..=0.5).prop_filter_map("valid settings", |(renew, jitter)| {
        RotationSettings::new(renew, jitter).ok()
    })
}

thread_local! {
    static ROOT: (PrivateKey, RootCa) =
        software_root(KeyType::EcdsaP256, "acme", Duration::from_secs(400 * 86_400));
}

proptest! {
    #![proptest_config(cfg(10_000))]

    /// Guards renew_at for any times (to 2^41 s), serial and valid settings: no panic, the
    /// time lies in [notBefore, notAfter] (notBefore when notAfter is not later), and a
    /// larger renewFraction never renews earlier.
    #[test]
    fn renew_at_is_within_the_validity(
        nb in any_time(),
        na in any_time(),
        serial in "[0-9a-f]{1,40}",
        s in settings(),
    ) {
        let at = renew_at(nb, na, &serial, &s);
        if na <= nb {
            prop_assert_eq!(at, nb);
        } else {
            prop_assert!(nb <= at && at <= na);
        }
        let larger = (s.renew_fraction + 0.01).min(0.95);
        if let Ok(later) = RotationSettings::new(larger, s.jitter_fraction) {
            prop_assert!(renew_at(nb, na, &serial, &later) >= at);
        }
    }

    /// Guards check_ttl, both ways: a ttl it accepts gives certificates (notBefore dated
    /// BACKDATE back) due no sooner than a minute after their issue, whatever the serial's
    /// jitter; a ttl it refuses is below the shortest it names, which it accepts.
    #[test]
    fn accepted_ttls_are_not_due_at_once(
        ttl in 1u64..10_000,
        serial in "[0-9a-f]{1,40}",
        s in settings(),
        issued_s in 1_000_000u64..4_000_000_000,
    ) {
        match check_ttl(Some(ttl), &s) {
            Ok(()) => {
                let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(issued_s);
                let end = issued + Duration::from_secs(ttl);
                let due = renew_at(issued - BACKDATE, end, &serial, &s);
                // renew_at computes in floating point: a microsecond of rounding.
                prop_assert!(
                    due + Duration::from_micros(1) >= issued + Duration::from_secs(60),
                    "ttl {ttl} accepted under {s:?}, due {:?} after issue",
                    due.duration_since(issued)
                );
            }
            Err(SettingsError::TtlTooShort { shortest_seconds, .. }) => {
                prop_assert!(shortest_seconds > ttl);
                prop_assert!(check_ttl(Some(shortest_seconds), &s).is_ok());
            }
            Err(other) => prop_assert!(false, "{other}"),
        }
    }
}

proptest! {
    #![proptest_config(cfg(150))]

    /// Guards decide over time for one installed bundle: once it issues, every later pass
    /// (within the intermediate's validity) issues too; before renew_at, or while the
    /// signer's root itself ends first, it leaves the bundle alone.
    #[test]
    fn decide_is_monotone_in_now(
        life_s in 600u64..(60 * 86_400),
        start_in_s in 0u64..(30 * 86_400),
        s in settings(),
        cuts in proptest::collection::vec(0.0f64..=1.0, 2..6),
        root_known in any::<bool>(),
        root_ends_with_bundle in any::<bool>(),
    ) {
        ROOT.with(|(key, root)| {
            let nb = whole_seconds(SystemTime::now()) + Duration::from_secs(start_in_s);
            let na = nb + Duration::from_secs(life_s);
            let bundle = software_bundle(key, root, "acme", "mesh-a", KeyType::EcdsaP256, nb, na);
            let root_end = if root_ends_with_bundle { na } else { root.not_after };
            let desired = Desired {
                mesh_name: "mesh-a".into(),
                key_type: None,
                accepted_key_types: None,
                adopt: false,
                signer_root: root_known.then(|| root.fingerprint_sha256.clone()),
                signer_root_not_after: root_known.then_some(root_end),
                signer_announced: AnnouncedRoots::default(),
                retired_roots: vec![],
                rotation: s,
            };
            let lifetime = Duration::from_secs(life_s);
            let mut times: Vec<SystemTime> = cuts
                .iter()
                .map(|f| nb + Duration::from_secs_f64(life_s as f64 * f).min(lifetime))
                .collect();
            times.sort();
            let mut issued = false;
            for t in times {
                let d = decide(&Installed::Ours(bundle.clone()), &desired, t);
                let issues = matches!(d, Decision::Issue { .. });
                prop_assert!(!issued || issues, "issued earlier, now {d:?} at {t:?}");
                issued |= issues;
                match d {
                    Decision::UpToDate { renew_at: at, summary }
                    | Decision::RewriteRoots { renew_at: at, summary, .. } => {
                        prop_assert!(t < at || renewal_held_by_root(&summary, &desired, t));
                    }
                    Decision::Issue { reason: IssueReason::Due { renew_at: at }, .. } => {
                        prop_assert!(t >= at)
                    }
                    Decision::Issue { .. } => {}
                    other => prop_assert!(false, "{other:?}"),
                }
            }
            Ok(())
        })?;
    }
}
