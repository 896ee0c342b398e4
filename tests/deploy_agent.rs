//! deploy/agent/ checked offline: the CRDs are byte for byte `meshca crds --for agent`,
//! built-in kinds pass `kubernetes-validate --strict` (bundled schemas, no cluster), the
//! CRD and the example request are checked structurally, the kustomization lists every
//! manifest, and the RBAC stays least-privilege.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::deploy::*;
use common::*;
use meshca::agent::crd::VirtualMeshCertificateSigningRequest;
use meshca::agent::rotation::RotationSettings;

fn deploy() -> PathBuf {
    repo().join("deploy/agent")
}

#[test]
fn deploy_crds_are_what_meshca_crds_prints() {
    assert_crds_file_is_printed("agent", &deploy().join("crds.yaml"));
}

#[test]
fn built_in_kinds_pass_kubernetes_validate_strict() {
    let checked = assert_built_in_kinds_validate(&[deploy()]);
    // CRD, Namespace, ServiceAccount, 2 Roles + 2 RoleBindings, Deployment,
    // PodDisruptionBudget, workload RBAC.
    assert_eq!(checked.len(), 11);
    // The validator does reject a broken manifest (it is not a no-op).
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replicas: two\n  selector: {}\n  template: {}\n",
    );
    assert!(
        !run(Command::new(kubernetes_validate()).arg("--strict").arg(bad))
            .status
            .success()
    );
}

#[test]
fn the_crd_is_structurally_what_the_agent_expects() {
    let docs = documents(&deploy().join("crds.yaml"));
    assert_eq!(docs.len(), 1);
    let crd = &docs[0];
    assert_eq!(crd["kind"], "CustomResourceDefinition");
    assert_eq!(crd["spec"]["group"], "meshca.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(
        crd["spec"]["names"]["kind"],
        "VirtualMeshCertificateSigningRequest"
    );
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["vmcsr"])
    );
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["served"], true);
    assert_eq!(version["storage"], true);
    assert!(version["subresources"]["status"].is_object());
    let columns = column_names(version);
    assert_eq!(columns, ["Phase", "Expiry", "Age"]);
    let schema = &version["schema"]["openAPIV3Schema"]["properties"];
    let spec = &schema["spec"];
    let required = required_sorted(spec);
    assert_eq!(required, ["mesh", "signer", "virtualMesh"]);
    for field in [
        "target",
        "adopt",
        "keyType",
        "ttlSeconds",
        "rotation",
        "restart",
    ] {
        assert!(spec["properties"][field].is_object(), "spec.{field}");
    }
    assert_eq!(
        spec["properties"]["restart"]["properties"]["policy"]["enum"],
        serde_json::json!(["auto", "always", "never"])
    );
    // The API server refuses at apply what the agent would refuse at its pass (GitOps
    // then shows the error, not a synced object marked InvalidSpec).
    let rotation = &spec["properties"]["rotation"]["properties"];
    for (field, minimum, maximum) in [("renewFraction", 0.1, 0.95), ("jitterFraction", 0.0, 0.5)] {
        assert_eq!(
            (&rotation[field]["minimum"], &rotation[field]["maximum"]),
            (&serde_json::json!(minimum), &serde_json::json!(maximum)),
            "{field}"
        );
    }
    for (renew, ok) in [(0.1, true), (0.95, true), (0.09, false), (0.96, false)] {
        assert_eq!(RotationSettings::new(renew, 0.05).is_ok(), ok, "{renew}");
    }
    for (jitter, ok) in [(0.0, true), (0.5, true), (0.51, false)] {
        assert_eq!(RotationSettings::new(0.9, jitter).is_ok(), ok, "{jitter}");
    }
    let status = &schema["status"]["properties"];
    for field in [
        "phase",
        "conditions",
        "observedGeneration",
        "serial",
        "notAfter",
        "rootFingerprint",
        "lastError",
        "restart",
    ] {
        assert!(status[field].is_object(), "status.{field}");
    }
    assert_eq!(
        status["phase"]["enum"],
        serde_json::json!(["Pending", "Requested", "Issued", "Installed", "Failed"])
    );
}

#[test]
fn the_image_is_built_from_the_sources_alone() {
    // The Dockerfile copies the whole context: the build tree (gigabytes) and var/ (the
    // demo's and tests' PINs, keys and OpenBao root token) must stay out of it.
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("COPY . ."), "{dockerfile}");
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let entries: Vec<&str> = ignored
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::trim)
        .collect();
    for kept_out in ["target/", "var/", ".git/"] {
        assert!(
            entries.contains(&kept_out),
            "{kept_out} not in .dockerignore"
        );
    }
}

#[test]
fn the_example_request_is_a_valid_vmcsr() {
    let docs = documents(&deploy().join("example-vmcsr.yaml"));
    let request: VirtualMeshCertificateSigningRequest =
        serde_json::from_value(docs[0].clone()).unwrap();
    assert_eq!(request.spec.settings.target.name, "cacerts");
    request.spec.settings.rotation.settings().unwrap();
    request.spec.mesh.to_ref().unwrap();
}

#[test]
fn the_agent_serves_metrics_on_the_port_the_deployment_declares() {
    assert_metrics_port_declared(&deploy().join("deployment.yaml"));
}

#[test]
fn the_pod_outwaits_the_stop_grace_and_the_lease_release() {
    assert_termination_outwaits_the_stop_grace(&deploy().join("deployment.yaml"));
}

#[test]
fn two_replicas_on_different_nodes_and_one_evicted_at_a_time() {
    assert_replicas_spread_and_budgeted(&deploy());
}

#[test]
fn the_namespace_enforces_the_restricted_pod_security_standard_which_the_pod_meets() {
    assert_namespace_enforces_restricted(&deploy().join("namespace.yaml"));
    let pod = &applied_object(&deploy(), "Deployment")["spec"]["template"];
    assert_pod_meets_restricted(pod);
    // The check does refuse what the admission would (it is not a no-op).
    let changes: [(&str, serde_json::Value); 4] = [
        ("/spec/securityContext/runAsUser", 0.into()),
        (
            "/spec/containers/0/securityContext/allowPrivilegeEscalation",
            true.into(),
        ),
        (
            "/spec/securityContext/seccompProfile/type",
            "Unconfined".into(),
        ),
        (
            "/spec/volumes/0",
            serde_json::json!({"name": "host", "hostPath": {"path": "/"}}),
        ),
    ];
    for (pointer, value) in changes {
        let mut broken = pod.clone();
        *broken.pointer_mut(pointer).unwrap() = value;
        assert!(
            std::panic::catch_unwind(|| assert_pod_meets_restricted(&broken)).is_err(),
            "{pointer} passed"
        );
    }
}

#[test]
fn the_kustomization_lists_every_default_manifest() {
    assert_kustomization_lists_every_manifest(
        &deploy(),
        &["example-vmcsr.yaml", "workload-namespace-rbac.yaml"],
    );
}

#[test]
fn rbac_is_least_privilege() {
    let files = [
        deploy().join("rbac.yaml"),
        deploy().join("workload-namespace-rbac.yaml"),
    ];
    for doc in files.iter().flat_map(|f| documents(f)) {
        assert!(
            doc["kind"] == "Role" || doc["kind"] == "RoleBinding",
            "only namespaced RBAC: {}",
            doc["kind"]
        );
    }
    for rule in files.iter().flat_map(|f| rules(f)) {
        for word in rule.resources.iter().chain(&rule.verbs).chain(&rule.groups) {
            assert_ne!(word, "*", "no wildcards: {rule:?}");
        }
        assert!(
            !rule.verbs.contains(&"delete".into()),
            "nothing is deleted: {rule:?}"
        );
        assert!(
            !rule.resources.contains(&"pods".into()),
            "pods are never touched: {rule:?}"
        );
        if rule.resources.contains(&"secrets".into()) {
            assert_eq!(rule.namespace, "istio-system");
            // Reading or changing is limited to cacerts; create cannot be named.
            if rule.verbs != ["create"] {
                assert_eq!(rule.names, ["cacerts"], "{rule:?}");
            }
        }
        if rule.resources.contains(&"deployments".into()) && rule.verbs.contains(&"patch".into()) {
            assert!(
                !rule.names.is_empty() || rule.name == "meshca-agent-restart",
                "istio-system Deployments are patched by name: {rule:?}"
            );
        }
    }
    // A workload namespace grants exactly what a rolling restart of its workloads needs.
    let workloads = rules(&files[1])
        .into_iter()
        .find(|r| r.groups == ["apps"])
        .expect("a rule for the apps group");
    assert_eq!(
        workloads.resources,
        ["deployments", "statefulsets", "daemonsets"]
    );
    assert_eq!(workloads.verbs, ["list", "patch"]);
}
