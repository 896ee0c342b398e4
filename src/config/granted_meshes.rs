//! Grants the signer could honour only by contradicting the mesh controller or itself: a
//! mesh granted in two VirtualMeshes (the controller keeps a mesh in one VirtualMesh at
//! most; a client would pick the weaker policy), and two meshes whose intermediates would
//! carry the same subject (`O=<orgName>, CN=<mesh name>`: the namespace is no part of it),
//! which no one reading a certificate could tell apart.

use std::collections::{BTreeMap, BTreeSet};

use super::AuthorizationTable;
use crate::pki::profile::bounded_common_name;
use crate::policy::{ObjectRef, PolicySet};

/// Refuses, by name, a mesh granted in two VirtualMeshes and two granted meshes whose
/// intermediates would have one subject.
pub(super) fn check_granted_meshes(
    policies: &PolicySet,
    authorization: &AuthorizationTable,
) -> Result<(), String> {
    // Every (virtual mesh, mesh) pair some client is granted.
    let granted: BTreeSet<&(ObjectRef, ObjectRef)> = authorization
        .clients()
        .flat_map(|(_, grants)| grants.iter())
        .collect();
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
    let mut meshes_of_subject: BTreeMap<(&str, String), Vec<(&ObjectRef, &ObjectRef)>> =
        BTreeMap::new();
    for (virtual_mesh, mesh) in &granted {
        let Some(policy) = policies.get(virtual_mesh) else {
            continue;
        };
        let subject = (policy.org_name.as_str(), bounded_common_name(&mesh.name));
        meshes_of_subject
            .entry(subject)
            .or_default()
            .push((mesh, virtual_mesh));
    }
    for ((org, common_name), meshes) in &meshes_of_subject {
        if let [(first, first_vm), (second, second_vm), ..] = meshes.as_slice() {
            return Err(format!(
                "clients: meshes {first} (virtual mesh {first_vm}) and {second} (virtual mesh {second_vm}) are both granted, and their intermediates would both have the subject O={org}, CN={common_name}, which does not name the namespace: give one mesh another name or its VirtualMesh another orgName"
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
    }
}
