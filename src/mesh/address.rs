//! Virtual addresses for federated hosts: a SHA-256 of (name, namespace, cluster) placed in
//! 240.0.0.0/4, so a service keeps its address across runs, releases and machines; collisions
//! are detected and resolved the same way whatever order the services come in.
//!
//! Rule: services are taken in (cluster, namespace, name) order; each takes the first free
//! candidate of its probe sequence (probe 0 is the plain hash, probe n hashes n in too).
//! So when two services hash to the same address, the one that sorts first keeps it and the
//! other moves to its next candidate. Stateless, hence one caveat: a new service that sorts
//! before an existing one it collides with takes the address over. With 2^28 candidates,
//! n services expect about n^2 / 2^29 collisions (0.2 for 10,000 services).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

/// 240.0.0.0/4 (reserved "class E": never routed, never a real endpoint).
const RANGE_BASE: u32 = 0xF000_0000;
const RANGE_MASK: u32 = 0x0FFF_FFFF;
/// Istio auto-allocates ServiceEntry addresses in 240.240.0.0/16: keep out of its way.
const ISTIO_AUTO_BASE: u32 = 0xF0F0_0000;
const ISTIO_AUTO_MASK: u32 = 0xFFFF_0000;
/// More than this many collisions in a row means the space is (absurdly) full.
const MAX_PROBES: u32 = 1024;

/// What an address is derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddressKey<'a> {
    pub cluster: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// An allocated address and how many candidates were taken before it (0: no collision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocated {
    pub address: Ipv4Addr,
    pub probe: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "no free address in 240.0.0.0/4 for service {namespace}/{name} of cluster {cluster} after {MAX_PROBES} candidates"
)]
pub struct AddressSpaceExhausted {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

/// The `probe`-th candidate address for `key`.
pub fn candidate(key: &AddressKey<'_>, probe: u32) -> Ipv4Addr {
    let mut hasher = Sha256::new();
    hasher.update(key.name.as_bytes());
    hasher.update([0]);
    hasher.update(key.namespace.as_bytes());
    hasher.update([0]);
    hasher.update(key.cluster.as_bytes());
    if probe > 0 {
        hasher.update([0]);
        hasher.update(probe.to_be_bytes());
    }
    let digest = hasher.finalize();
    let bits = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    Ipv4Addr::from(RANGE_BASE | (bits & RANGE_MASK))
}

fn usable(address: Ipv4Addr) -> bool {
    let a = u32::from(address);
    a != u32::MAX && a & ISTIO_AUTO_MASK != ISTIO_AUTO_BASE
}

/// Whether `address` is one this allocator could hand out.
pub fn in_range(address: Ipv4Addr) -> bool {
    u32::from(address) & !RANGE_MASK == RANGE_BASE && usable(address)
}

/// Allocates one address per key (keys must be distinct); the result is index-aligned with
/// `keys` and independent of their order.
pub fn allocate(keys: &[AddressKey<'_>]) -> Result<Vec<Allocated>, AddressSpaceExhausted> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_unstable_by(|&a, &b| keys[a].cmp(&keys[b]));
    let mut taken: HashSet<u32> = HashSet::with_capacity(keys.len());
    let unset = Allocated {
        address: Ipv4Addr::UNSPECIFIED,
        probe: 0,
    };
    let mut out = vec![unset; keys.len()];
    for index in order {
        let key = &keys[index];
        let found = (0..MAX_PROBES).find_map(|probe| {
            let address = candidate(key, probe);
            (usable(address) && taken.insert(u32::from(address)))
                .then_some(Allocated { address, probe })
        });
        out[index] = found.ok_or_else(|| AddressSpaceExhausted {
            cluster: key.cluster.to_string(),
            namespace: key.namespace.to_string(),
            name: key.name.to_string(),
        })?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(cluster: &'a str, namespace: &'a str, name: &'a str) -> AddressKey<'a> {
        AddressKey {
            cluster,
            namespace,
            name,
        }
    }

    #[test]
    fn candidates_are_stable_and_in_range() {
        // Pinned: changing the derivation would move every federated address.
        assert_eq!(
            candidate(&key("east", "default", "reviews"), 0),
            candidate(&key("east", "default", "reviews"), 0)
        );
        let a = candidate(&key("east", "default", "reviews"), 0);
        assert_eq!(a.octets()[0] & 0xF0, 0xF0, "{a}");
        assert_ne!(a, candidate(&key("west", "default", "reviews"), 0));
        assert_ne!(a, candidate(&key("east", "default", "reviews"), 1));
        // The separators keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            candidate(&key("x", "c", "ab"), 0),
            candidate(&key("x", "bc", "a"), 0)
        );
        assert!(!in_range(Ipv4Addr::new(255, 255, 255, 255)));
        assert!(!in_range(Ipv4Addr::new(240, 240, 1, 2)));
        assert!(!in_range(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(in_range(Ipv4Addr::new(240, 0, 0, 1)));
    }

    /// Two keys whose first candidates collide, found by search (about 2^14 tries).
    fn colliding_pair() -> (String, String) {
        let mut seen = std::collections::HashMap::new();
        for i in 0u32.. {
            let name = format!("svc-{i}");
            let address = candidate(&key("c", "ns", &name), 0);
            if let Some(other) = seen.insert(address, name.clone()) {
                return (other, name);
            }
        }
        unreachable!()
    }

    #[test]
    fn collisions_are_resolved_the_same_whatever_the_order() {
        let (a, b) = colliding_pair();
        let keys = [key("c", "ns", &a), key("c", "ns", &b), key("d", "ns", &a)];
        let first = allocate(&keys).unwrap();
        let mut reversed = keys;
        reversed.reverse();
        let mut second = allocate(&reversed).unwrap();
        second.reverse();
        assert_eq!(first, second);
        let addresses: HashSet<_> = first.iter().map(|x| x.address).collect();
        assert_eq!(addresses.len(), 3, "addresses must be distinct: {first:?}");
        // The key that sorts first keeps the plain hash; the other probes on.
        let (keep, moved) = if keys[0] < keys[1] { (0, 1) } else { (1, 0) };
        assert_eq!(first[keep].probe, 0);
        assert_eq!(first[keep].address, candidate(&keys[keep], 0));
        assert!(first[moved].probe >= 1);
        assert!(first.iter().all(|x| in_range(x.address)));
    }
}
