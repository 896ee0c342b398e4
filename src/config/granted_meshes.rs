//! Grants the signer could honour only by contradicting the mesh controller or itself: a
//! mesh granted in two VirtualMeshes (the controller keeps a mesh in one VirtualMesh at
//! most; a client would pick the weaker policy), and two meshes whose intermediates would
//! carry the same subject (`O=<orgName>, CN=<mesh name>`: the namespace is no part of it),
//! which no one reading a certificate could tell apart; nor a mesh whose intermediate
//! would carry a root's subject.

use std::collections::{BTreeMap, BTreeSet};

use const_oid::db::rfc4519;
use x509_cert::name::Name;

use super::AuthorizationTable;
use crate::pki::lint::subject_values;
use crate::pki::profile::bounded_common_name;
use crate::policy::{ObjectRef, PolicySet};

/// Refuses, by name, a mesh granted in two VirtualMeshes and two granted meshes whose
/// intermediates would have one subject.
pub(super) fn check_granted_meshes(
    policies: &PolicySet,
    authorization: &AuthorizationTable,
) -> Result<(), String> {
    let granted = granted(authorization);
    let mut virtual_meshes_of: BTreeMap<&ObjectRef, Vec<&ObjectRef>> = BTreeMap::new();
    for (virtual_mesh, mesh) in &granted {
        virtual_meshes_of
            .entry(mesh)
            .or_default()
            .push(virtual_mesh);
    }
    for (mesh, virtual_meshes) in &virtual_meshes_of {
        if let [first, second, ..] = virtual_meshes.as_slice() {
            return Err(format!(
                "clients: mesh {mesh} is granted in virtual mesh {first} and in {second}: a mesh is in one VirtualMesh at most (the mesh controller refuses it in two), and a client could ask under the weaker policy; grant it in one"
            ));
        }
    }
    for planned in planned_subjects(policies, &granted).values() {
        if let [first, second, ..] = planned.as_slice() {
            let (org, common_name) = (&first.org, &first.common_name);
            let same = if (&second.org, &second.common_name) == (org, common_name) {
                String::new()
            } else {
                format!(
                    " (O={}, CN={} differs only in the case of ASCII letters or in spaces, which openssl ignores when it compares names)",
                    second.org, second.common_name
                )
            };
            return Err(format!(
                "clients: meshes {} (virtual mesh {}) and {} (virtual mesh {}) are both granted, and their intermediates would both have the subject O={org}, CN={common_name}{same}, which does not name the namespace: give one mesh another name or its VirtualMesh another orgName",
                first.mesh, first.virtual_mesh, second.mesh, second.virtual_mesh
            ));
        }
    }
    Ok(())
}

/// Every (virtual mesh, mesh) pair some client is granted.
fn granted(authorization: &AuthorizationTable) -> BTreeSet<&(ObjectRef, ObjectRef)> {
    authorization
        .clients()
        .flat_map(|(_, grants)| grants.iter())
        .collect()
}

/// A name's value as openssl compares it (its canonical encoding, as `x509 -subject_hash`
/// reads names): ASCII letters in lower case, leading and trailing spaces dropped, each
/// run of spaces one. Other letters keep their case: openssl tells `Ä` from `ä`.
fn canonical(value: &str) -> String {
    value
        .split_ascii_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase()
}

/// A granted mesh's intermediate's subject, as it would be written.
struct PlannedSubject<'a> {
    org: &'a str,
    common_name: String,
    mesh: &'a ObjectRef,
    virtual_mesh: &'a ObjectRef,
}

/// The granted meshes' intermediates, by their subject (org, CN) compared as openssl
/// compares names ([`canonical`]): `O=Acme` and `O=acme` are one name to whoever builds a
/// path with openssl (Envoy's BoringSSL too).
type PlannedSubjects<'a> = BTreeMap<(String, String), Vec<PlannedSubject<'a>>>;

fn planned_subjects<'a>(
    policies: &'a PolicySet,
    granted: &BTreeSet<&'a (ObjectRef, ObjectRef)>,
) -> PlannedSubjects<'a> {
    let mut meshes_of_subject = PlannedSubjects::new();
    for (virtual_mesh, mesh) in granted {
        let Some(policy) = policies.get(virtual_mesh) else {
            continue;
        };
        let common_name = bounded_common_name(&mesh.name);
        let key = (canonical(&policy.org_name), canonical(&common_name));
        meshes_of_subject
            .entry(key)
            .or_default()
            .push(PlannedSubject {
                org: &policy.org_name,
                common_name,
                mesh,
                virtual_mesh,
            });
    }
    meshes_of_subject
}

/// Refuses a granted mesh whose intermediate would carry the subject of one of `roots`
/// (each named for the message): its issuer would be its own subject, so it would read as
/// self-issued (RFC 5280 4.1.2.6) to whoever builds a path or reads a log. Values are
/// compared as text as openssl compares them, as two intermediates' are above: a Vault
/// root has PrintableString where meshca writes UTF8String, and is the same name to a
/// reader.
pub(crate) fn check_apart_from_roots<'r>(
    policies: &PolicySet,
    authorization: &AuthorizationTable,
    roots: impl IntoIterator<Item = (String, &'r Name)>,
    advice: &str,
) -> Result<(), String> {
    let granted = granted(authorization);
    let planned = planned_subjects(policies, &granted);
    for (root, subject) in roots {
        let Some(values) = subject_values(subject) else {
            continue;
        };
        let lowered: Vec<Vec<_>> = values
            .iter()
            .map(|rdn| {
                rdn.iter()
                    .map(|(oid, value)| (*oid, canonical(value)))
                    .collect()
            })
            .collect();
        let named = planned.iter().find(|((org, common_name), _)| {
            lowered
                == [
                    vec![(rfc4519::O, org.clone())],
                    vec![(rfc4519::CN, common_name.clone())],
                ]
        });
        if let Some((_, planned)) = named
            && let Some(first) = planned.first()
        {
            return Err(format!(
                "clients: mesh {} (virtual mesh {}) is granted, and its intermediate would have the subject O={}, CN={}, which is the subject of {root} (compared as openssl compares names: ASCII case and runs of spaces aside): the intermediate would name itself as its issuer and read as self-issued; give the mesh another name{advice}",
                first.mesh, first.virtual_mesh, first.org, first.common_name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(namespace: &str, name: &str, org: &str, meshes: &[&str]) -> String {
        let meshes: Vec<String> = meshes
            .iter()
            .map(|m| {
                let (ns, n) = m.split_once('/').unwrap();
                format!("  - {{name: {n}, namespace: {ns}}}\n")
            })
            .collect();
        format!(
            "kind: VirtualMesh\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  certificateAuthority:\n    builtin: {{ttlDays: 10, rsaKeySizeBytes: 2048, orgName: {org}}}\n  meshes:\n{}",
            meshes.concat()
        )
    }

    fn check(documents: &[String], grants: &[(&str, &str, &str)]) -> Result<(), String> {
        let mut policies = PolicySet::default();
        for (at, document) in documents.iter().enumerate() {
            policies
                .add_yaml(&format!("vm{at}.yaml"), document)
                .unwrap();
        }
        let mut authorization = AuthorizationTable::default();
        for (client, vm, mesh) in grants {
            authorization.insert(client, vm.parse().unwrap(), mesh.parse().unwrap());
        }
        check_granted_meshes(&policies, &authorization)
    }

    #[test]
    fn a_mesh_granted_in_two_virtual_meshes_is_refused() {
        let documents = [
            yaml("tenants", "pay", "pay", &["pay/pay-1"]),
            yaml("tenants", "web", "web", &["pay/pay-1", "web/web-1"]),
        ];
        // Listed in both, granted in one: nothing to choose between.
        assert_eq!(
            check(&documents, &[("a", "tenants/pay", "pay/pay-1")]),
            Ok(())
        );
        let refused = check(
            &documents,
            &[
                ("a", "tenants/pay", "pay/pay-1"),
                ("b", "tenants/web", "pay/pay-1"),
            ],
        )
        .unwrap_err();
        assert!(
            refused.contains(
                "mesh pay/pay-1 is granted in virtual mesh tenants/pay and in tenants/web"
            ),
            "{refused}"
        );
    }

    #[test]
    fn two_meshes_whose_intermediates_share_a_subject_are_refused() {
        let documents = [
            yaml("tenants", "pay", "pay", &["pay/pay-1"]),
            yaml("tenants", "pay2", "pay", &["other/pay-1"]),
            yaml("tenants", "web", "web", &["web/pay-1"]),
        ];
        // Same mesh name, another org: another subject.
        assert_eq!(
            check(
                &documents,
                &[
                    ("a", "tenants/pay", "pay/pay-1"),
                    ("b", "tenants/web", "web/pay-1")
                ]
            ),
            Ok(())
        );
        let refused = check(
            &documents,
            &[
                ("a", "tenants/pay", "pay/pay-1"),
                ("b", "tenants/pay2", "other/pay-1"),
            ],
        )
        .unwrap_err();
        assert!(
            refused.contains("meshes pay/pay-1 (virtual mesh tenants/pay) and other/pay-1 (virtual mesh tenants/pay2)"),
            "{refused}"
        );
        assert!(refused.contains("O=pay, CN=pay-1"), "{refused}");
        // Orgs that differ only in case are one name to openssl, so are orgs that differ
        // in runs of spaces; letters beyond ASCII keep their case, as openssl keeps it.
        let grants = [
            ("a", "tenants/pay", "pay/pay-1"),
            ("b", "tenants/pay2", "other/pay-1"),
        ];
        let orgs = |first: &str, second: &str| {
            [
                yaml("tenants", "pay", &format!("'{first}'"), &["pay/pay-1"]),
                yaml("tenants", "pay2", &format!("'{second}'"), &["other/pay-1"]),
            ]
        };
        let refused = check(&orgs("pay", "PAY"), &grants).unwrap_err();
        assert!(
            refused.contains("O=pay, CN=pay-1 (O=PAY, CN=pay-1 differs only in the case"),
            "{refused}"
        );
        assert!(check(&orgs("acme corp", "acme  corp"), &grants).is_err());
        assert_eq!(check(&orgs("Ärzte", "ärzte"), &grants), Ok(()));
    }

    #[test]
    fn a_mesh_whose_intermediate_would_carry_a_roots_subject_is_refused() {
        use crate::pki::profile::subject_name;
        let documents = [yaml(
            "service-mesh-hub",
            "vm",
            "service-mesh-hub",
            &["service-mesh-hub/istio", "service-mesh-hub/other"],
        )];
        let mut policies = PolicySet::default();
        policies.add_yaml("vm.yaml", &documents[0]).unwrap();
        let mut authorization = AuthorizationTable::default();
        authorization.insert(
            "a",
            "service-mesh-hub/vm".parse().unwrap(),
            "service-mesh-hub/istio".parse().unwrap(),
        );
        let apart = |root: &Name| {
            check_apart_from_roots(
                &policies,
                &authorization,
                [("the root (root.certificate r.pem)".to_string(), root)],
                " or else",
            )
        };
        let root = subject_name("service-mesh-hub", "istio").unwrap();
        let refused = apart(&root).unwrap_err();
        assert!(
            refused.contains(
                "mesh service-mesh-hub/istio (virtual mesh service-mesh-hub/vm) is granted"
            ),
            "{refused}"
        );
        assert!(
            refused.contains("the subject O=service-mesh-hub, CN=istio, which is the subject of the root (root.certificate r.pem)"),
            "{refused}"
        );
        assert!(
            refused.ends_with("give the mesh another name or else"),
            "{refused}"
        );
        // The same text as PrintableString (a root Go or Vault wrote) is the same name.
        let mut rdns = x509_cert::name::RdnSequence::default();
        for (oid, value) in [(rfc4519::O, "service-mesh-hub"), (rfc4519::CN, "istio")] {
            let mut rdn = x509_cert::name::RelativeDistinguishedName::default();
            rdn.insert(x509_cert::attr::AttributeTypeAndValue {
                oid,
                value: der::Any::new(der::Tag::PrintableString, value.as_bytes()).unwrap(),
            })
            .unwrap();
            rdns.push(rdn);
        }
        let printable = <Name as der::Decode>::from_der(&der::Encode::to_der(&rdns).unwrap());
        assert!(apart(&printable.unwrap()).is_err());
        // A root named in other case (CN=Istio) is that name too.
        let capitals = subject_name("Service-Mesh-Hub", "Istio").unwrap();
        let refused = apart(&capitals).unwrap_err();
        assert!(
            refused.contains("compared as openssl compares names"),
            "{refused}"
        );
        // Another CN, another org, a mesh listed but not granted: apart.
        for (org, cn) in [
            ("service-mesh-hub", "istio root CA"),
            ("other", "istio"),
            ("service-mesh-hub", "other"),
        ] {
            assert_eq!(apart(&subject_name(org, cn).unwrap()), Ok(()), "{org} {cn}");
        }
    }
}
