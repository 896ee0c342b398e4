//! Federation's translation (`mesh::federation`, `mesh::address`): the Istio objects a
//! VirtualMesh and an inventory make.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::{cfg, virtual_mesh_yaml};
use crate::mesh::address::{self, AddressKey};
use crate::mesh::federation::*;
use crate::mesh::inventory::{ClusterInventory, Inventory, PortInventory, ServiceInventory};
use crate::mesh::istio::IstioObject;
use crate::mesh::names::*;
use crate::policy::ObjectRef;

/// A DNS-1123 label: short ones, and ones of the full 63 characters.
pub(crate) fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?",
        "[a-z0-9][a-z0-9-]{61}[a-z0-9]",
    ]
}

/// A DNS-1035 label (a Service name): starts with a letter.
fn label1035() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]([a-z0-9-]{0,8}[a-z0-9])?",
        "[a-z][a-z0-9-]{61}[a-z0-9]",
    ]
}

fn service() -> impl Strategy<Value = ServiceInventory> {
    (
        label1035(),
        prop_oneof![Just("default".to_string()), label()],
        proptest::collection::btree_map("[a-z]{1,3}", "[a-z0-9]{0,3}", 0..3),
        proptest::collection::btree_set(1u16..=65535, 1..4),
    )
        .prop_map(|(name, namespace, labels, ports)| ServiceInventory {
            name,
            namespace,
            labels,
            headless: false,
            ports: ports
                .into_iter()
                .map(|number| PortInventory {
                    number,
                    name: None,
                    protocol: None,
                    target_port: None,
                })
                .collect(),
        })
}

/// One to three clusters (distinct names, each its own member mesh) of up to four
/// services each (distinct by namespace and name within a cluster).
pub(crate) fn inventory() -> impl Strategy<Value = Inventory> {
    let clusters =
        proptest::collection::btree_map(label(), proptest::collection::vec(service(), 0..5), 1..4);
    clusters.prop_map(|clusters| Inventory {
        clusters: clusters
            .into_iter()
            .enumerate()
            .map(|(i, (name, mut services))| {
                let mut seen = HashSet::new();
                services.retain(|s| seen.insert((s.namespace.clone(), s.name.clone())));
                ClusterInventory {
                    mesh: ObjectRef::new("smh", format!("m{i}")),
                    trust_domain: format!("{name}.local"),
                    istio_namespace: "istio-system".into(),
                    cluster_domain: "cluster.local".into(),
                    gateway_addresses: vec![format!("192.0.2.{}", i + 1)],
                    gateway_port: 15443,
                    services,
                    name,
                }
            })
            .collect(),
    })
}

/// Two clusters without services, both with clusterDomain `domain`.
fn two_empty_clusters(domain: &str) -> Inventory {
    let clusters = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| ClusterInventory {
            name: name.to_string(),
            mesh: ObjectRef::new("smh", *name),
            trust_domain: "td".into(),
            istio_namespace: "istio-system".into(),
            cluster_domain: domain.into(),
            gateway_addresses: vec![format!("192.0.2.{}", i + 1)],
            gateway_port: 15443,
            services: vec![],
        })
        .collect();
    Inventory { clusters }
}

/// A PERMISSIVE federation of every cluster of `inventory`, all services selected.
pub(crate) fn config_for(inventory: &Inventory, suffix: &str) -> FederationConfig {
    FederationConfig {
        virtual_mesh: ObjectRef::new("smh", "vm"),
        members: inventory.clusters.iter().map(|c| c.mesh.clone()).collect(),
        mode: Some(FederationMode::Permissive),
        selector: ServiceSelector::default(),
        host_suffix: suffix.into(),
    }
}

/// Istio's host matching: `*.x` matches every host ending in `.x`.
fn istio_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(rest) => host.ends_with(rest),
        None => pattern == host,
    }
}

/// Words that cluster domains, Kubernetes' own names and host suffixes share.
fn word() -> impl Strategy<Value = String> {
    proptest::sample::select(vec![
        "svc", "pod", "cluster", "local", "default", "db", "mesh", "internal", "global", "example",
    ])
    .prop_map(str::to_string)
}

/// `name` is `parent` or under it, label by label.
fn at_or_under(name: &str, parent: &str) -> bool {
    name == parent || name.ends_with(&format!(".{parent}"))
}

proptest! {
    #![proptest_config(cfg(400))]

    /// Guards the objects translate makes, under the default and the longest host suffix:
    /// valid names and labels; within a cluster no two objects share (kind, namespace,
    /// name); every host a DNS subdomain of at most 253; one address per host, in range,
    /// the same in every cluster and no two hosts sharing it; nothing of the plan stale.
    #[test]
    fn federation_objects_are_well_named(inv in inventory(), long_suffix in any::<bool>()) {
        let suffix = if long_suffix {
            format!("{}.{}", "x".repeat(28), "y".repeat(MAX_HOST_SUFFIX_LEN - 29))
        } else {
            DEFAULT_HOST_SUFFIX.to_string()
        };
        let config = config_for(&inv, &suffix);
        let plan = translate(&config, &inv).unwrap();
        let mut hosts_by_address: BTreeMap<String, String> = BTreeMap::new();
        for cluster in plan.clusters() {
            let mut ids = HashSet::new();
            for desired in plan.objects(cluster).unwrap() {
                prop_assert!(ids.insert(desired.id()), "duplicate {:?}", desired.id());
                let object = desired.to_object();
                let meta = object.metadata();
                prop_assert!(is_dns1123_subdomain(&meta.name), "{}", meta.name);
                for (k, v) in &meta.labels {
                    prop_assert!(is_label_key(k) && is_label_value(v), "{k}={v}");
                }
                if let IstioObject::ServiceEntry(entry) = &object {
                    for host in &entry.spec.hosts {
                        prop_assert!(is_dns1123_subdomain(host) && host.len() <= 253, "{host}");
                    }
                    for a in &entry.spec.addresses {
                        prop_assert!(address::in_range(a.parse().unwrap()), "{a}");
                        let host = entry.spec.hosts[0].clone();
                        if let Some(before) = hosts_by_address.insert(a.clone(), host.clone()) {
                            prop_assert_eq!(before, host);
                        }
                    }
                }
            }
            let desired: Vec<_> = plan.objects(cluster).unwrap().map(|d| d.id()).collect();
            prop_assert!(plan.stale_objects(cluster, &desired).is_empty());
        }
    }

    /// Guards reproducibility: the plan does not depend on the order of clusters or
    /// services in the inventory (members list them as the API server does).
    #[test]
    fn federation_ignores_inventory_order(inv in inventory()) {
        let config = config_for(&inv, DEFAULT_HOST_SUFFIX);
        let render = |inv: &Inventory| -> BTreeMap<String, String> {
            let plan = translate(&config, inv).unwrap();
            plan.clusters()
                .map(|c| {
                    let objects: Vec<IstioObject> =
                        plan.objects(c).unwrap().map(|d| d.to_object()).collect();
                    (c.to_string(), serde_json::to_string(&objects).unwrap())
                })
                .collect()
        };
        let mut reversed = inv.clone();
        reversed.clusters.reverse();
        for c in &mut reversed.clusters {
            c.services.reverse();
        }
        prop_assert_eq!(render(&inv), render(&reversed));
    }
}

proptest! {
    #![proptest_config(cfg(1_000))]

    /// Guards address allocation, collisions included (keys from a tiny alphabet):
    /// addresses distinct and in range, aligned with the keys, independent of their order.
    #[test]
    fn addresses_are_distinct_and_order_free(
        keys in proptest::collection::btree_set(("[a-c]{1,2}", "[a-c]{1,2}", "[a-c]{1,2}"), 0..30),
    ) {
        let keys: Vec<AddressKey> = keys
            .iter()
            .map(|(cluster, namespace, name)| AddressKey { cluster, namespace, name })
            .collect();
        let allocated = address::allocate(&keys).unwrap();
        let distinct: HashSet<_> = allocated.iter().map(|a| a.address).collect();
        prop_assert_eq!(distinct.len(), allocated.len());
        prop_assert!(allocated.iter().all(|a| address::in_range(a.address)));
        let mut reversed = keys.clone();
        reversed.reverse();
        let mut again = address::allocate(&reversed).unwrap();
        again.reverse();
        prop_assert_eq!(allocated, again);
    }

    /// Guards the host suffix against the cluster's own names: a suffix translate accepts
    /// does not make `*.<suffix>` (the Gateway's and the DestinationRule's host) match a
    /// cluster-local Service `<svc>.<ns>.svc.<domain>` or a headless Service's pod
    /// `<pod>.<svc>.<ns>.svc.<domain>`; and it refuses nothing else than the domain, its
    /// parents and `svc.<domain>` with what is under it. Suffixes: any words, a tail of the
    /// pod's name, a sibling of the domain.
    #[test]
    fn wildcard_never_takes_cluster_local_names(
        domain in prop_oneof![
            Just(vec!["cluster".to_string(), "local".to_string()]),
            proptest::collection::vec(word(), 1..3),
        ],
        svc in prop_oneof![word(), label1035()],
        ns in prop_oneof![word(), label()],
        pod in label(),
        words in proptest::collection::vec(word(), 1..5),
        shape in 0u8..3,
        cut in 0usize..8,
    ) {
        let pod_name: Vec<&str> = [pod.as_str(), &svc, &ns, "svc"]
            .into_iter()
            .chain(domain.iter().map(String::as_str))
            .collect();
        let domain = domain.join(".");
        let suffix = match shape {
            0 => words.join("."),
            1 => pod_name[cut % pod_name.len()..].join("."),
            _ => format!("{}.{domain}", words[0]),
        };
        prop_assume!(suffix.len() <= MAX_HOST_SUFFIX_LEN);
        let inv = two_empty_clusters(&domain);
        let config = config_for(&inv, &suffix);
        let wildcard = config.wildcard_host();
        match translate(&config, &inv) {
            Ok(_) => {
                for local in [
                    format!("{svc}.{ns}.svc.{domain}"),
                    format!("{pod}.{svc}.{ns}.svc.{domain}"),
                ] {
                    prop_assert!(
                        !istio_matches(&wildcard, &local),
                        "{suffix:?} accepted with clusterDomain {domain:?}: \
                         {wildcard} matches {local}"
                    );
                }
            }
            Err(e) => prop_assert!(
                at_or_under(&domain, &suffix) || at_or_under(&suffix, &format!("svc.{domain}")),
                "{suffix:?} refused with clusterDomain {domain:?}: {e}"
            ),
        }
    }

    /// Guards the names federation derives from a VirtualMesh's metadata: whatever is
    /// accepted makes an object name the API server takes and valid labels.
    #[test]
    fn virtual_mesh_names_make_valid_objects(
        name in "[a-z0-9][a-z0-9.-]{0,20}[a-z0-9]",
        ns in "[a-z0-9][a-z0-9.-]{0,10}[a-z0-9]",
    ) {
        let yaml = virtual_mesh_yaml(
            &format!("{{name: '{name}', namespace: '{ns}'}}"),
            "{ttlDays: 10, rsaKeySizeBytes: 2048, orgName: o}",
            &["federation: {}", "meshes:", "- {name: a, namespace: smh}"],
        );
        let Ok(doc) = parse_virtual_mesh("t", &yaml) else {
            return Ok(());
        };
        if let Ok(config) = FederationConfig::from_document(&doc, "t") {
            prop_assert!(
                is_dns1123_subdomain(&config.object_name()),
                "VirtualMesh {ns}/{name} accepted; object name {:?}", config.object_name()
            );
            for (k, v) in config.labels() {
                prop_assert!(is_label_key(&k) && is_label_value(&v), "{k}={v}");
            }
        }
    }
}
