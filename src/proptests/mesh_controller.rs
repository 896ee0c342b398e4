//! The mesh controller's decisions (`mesh_controller::decide`): the object changes it
//! applies to member clusters and the roots it retires.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::cfg;
use super::federation::{config_for, inventory};
use crate::mesh::federation::{DEFAULT_HOST_SUFFIX, translate};
use crate::mesh::inventory::Inventory;
use crate::mesh::istio::{IstioObject, ObjectId};
use crate::mesh_controller::crd::VirtualMeshStatus;
use crate::mesh_controller::decide::*;

/// What the controller reads back of `objects` from a cluster.
fn existing_of(objects: &[IstioObject]) -> Vec<ExistingObject> {
    objects
        .iter()
        .map(|o| ExistingObject::from_value(o.kind(), serde_json::to_value(o).unwrap()).unwrap())
        .collect()
}

/// Applies `changes` to what a cluster holds, as the API server would.
fn apply(mut held: Vec<IstioObject>, changes: &ObjectChanges) -> Vec<IstioObject> {
    held.retain(|o| !changes.delete.contains(&o.id()));
    for applied in &changes.apply {
        held.retain(|o| o.id() != applied.id());
        held.push(applied.clone());
    }
    held
}

/// `next` with the cluster names and meshes of `first` (as many clusters as both have):
/// the same clusters, their services changed.
fn same_clusters(first: &Inventory, next: &Inventory) -> Inventory {
    let mut next = next.clone();
    next.clusters.truncate(first.clusters.len());
    for (cluster, before) in next.clusters.iter_mut().zip(&first.clusters) {
        cluster.name = before.name.clone();
        cluster.mesh = before.mesh.clone();
    }
    next
}

/// A root fingerprint of a pool of four.
fn fp(i: u8) -> String {
    format!("{:064x}", u128::from(i) + 1)
}

fn member() -> impl Strategy<Value = MemberTrust> {
    (
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(0u8..4),
        proptest::collection::vec(0u8..4, 0..4),
        proptest::option::of(0u8..4),
        any::<bool>(),
        // A cluster not read in the pass now and then: nothing known of it.
        proptest::bool::weighted(0.1),
    )
        .prop_map(
            |(installed, current, root, trusted, next, restarting, unread)| match unread {
                true => MemberTrust {
                    unread,
                    ..MemberTrust::default()
                },
                false => MemberTrust {
                    installed,
                    current,
                    root: root.map(fp),
                    trusted: trusted.into_iter().map(fp).collect(),
                    next: next.map(fp),
                    restarting,
                    unread,
                },
            },
        )
}

proptest! {
    #![proptest_config(cfg(200))]

    /// Guards the controller's reconcile against a cluster: from nothing, and from one plan
    /// to another over the same clusters, applying object_changes leaves nothing to do (no
    /// change, no conflict with its own objects) and the cluster holds exactly the plan.
    #[test]
    fn object_changes_are_idempotent(a in inventory(), b in inventory()) {
        let b = same_clusters(&a, &b);
        let config_a = config_for(&a, DEFAULT_HOST_SUFFIX);
        let config_b = config_for(&b, DEFAULT_HOST_SUFFIX);
        let plan_a = translate(&config_a, &a).unwrap();
        let plan_b = translate(&config_b, &b).unwrap();
        let labels = config_a.labels();
        for (first, second) in [(&plan_a, &plan_a), (&plan_a, &plan_b)] {
            for cluster in second.clusters() {
                let changes = object_changes(first, cluster, &[], &labels);
                prop_assert!(changes.delete.is_empty() && changes.conflicts.is_empty());
                let held = apply(Vec::new(), &changes);
                let changes = object_changes(second, cluster, &existing_of(&held), &labels);
                prop_assert!(changes.conflicts.is_empty());
                let held = apply(held, &changes);
                let again = object_changes(second, cluster, &existing_of(&held), &labels);
                prop_assert!(
                    again.apply.is_empty() && again.delete.is_empty() && again.conflicts.is_empty(),
                    "second pass still changes {cluster}: apply {:?} delete {:?}",
                    again.apply.iter().map(|o| o.id()).collect::<Vec<_>>(),
                    again.delete
                );
                prop_assert_eq!(again.unchanged, second.objects(cluster).unwrap().count());
                let want: BTreeSet<ObjectId> =
                    second.objects(cluster).unwrap().map(|d| d.id()).collect();
                let have: BTreeSet<ObjectId> = held.iter().map(|o| o.id()).collect();
                prop_assert_eq!(want, have);
            }
        }
    }
}

proptest! {
    #![proptest_config(cfg(3_000))]

    /// Guards root retirement: decide_roots never retires a root a member uses or
    /// announces as next; fed its own status back at the same time it decides the same
    /// (nothing newly retired); what it retired stays retired later; and a root change
    /// under way retires nothing before retire_after has passed since convergence.
    #[test]
    fn root_retirement_is_safe_and_stable(
        members in proptest::collection::vec(member(), 0..4),
        retired_before in proptest::collection::vec(0u8..4, 0..3),
        retire_after_s in 0u64..1000,
        now_s in 1_700_000_000u64..1_800_000_000,
        later_s in 0u64..2000,
    ) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_s);
        let retire_after = Duration::from_secs(retire_after_s);
        let mut status = VirtualMeshStatus {
            retired_root_fingerprints: retired_before.into_iter().map(fp).collect(),
            ..Default::default()
        };
        let kept: BTreeSet<String> = members
            .iter()
            .flat_map(|m| m.root.clone().into_iter().chain(m.next.clone()))
            .collect();
        let d1 = decide_roots(&members, &status, now, retire_after);
        for r in &d1.retired {
            prop_assert!(!kept.contains(r), "retired {r}, which is in use");
        }
        for r in &d1.newly_retired {
            prop_assert!(d1.retired.contains(r));
        }

        status.retired_root_fingerprints = d1.retired.clone();
        status.root_rotation = d1.rotation.clone();
        let d2 = decide_roots(&members, &status, now, retire_after);
        prop_assert_eq!(&d2.retired, &d1.retired);
        prop_assert!(d2.newly_retired.is_empty());
        prop_assert_eq!(&d2.rotation, &d1.rotation);

        let later = now + Duration::from_secs(later_s);
        let d3 = decide_roots(&members, &status, later, retire_after);
        for r in &d1.retired {
            prop_assert!(d3.retired.contains(r));
        }
        if d1.rotation.is_some() && !d3.newly_retired.is_empty() {
            prop_assert!(later >= now + retire_after, "{:?}", d1.rotation);
        }
    }
}
