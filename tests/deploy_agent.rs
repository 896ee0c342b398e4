//! deploy/agent/ checked offline: the CRDs are byte for byte `meshca crds --for agent`,
//! built-in kinds pass `kubernetes-validate --strict` (bundled schemas, no cluster), the
//! CRD and the example request are checked structurally, the kustomization lists every
//! manifest, and the RBAC stays least-privilege.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use meshca::agent::crd::VirtualMeshCertificateSigningRequest;
use serde_json::Value;

fn deploy() -> PathBuf {
    repo().join("deploy/agent")
}

/// Every YAML document of a file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n---")
        .map(|d| d.trim_start_matches("---"))
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| {
            serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The validator `scripts/install-deps.sh` installs (on PATH or in var/tools/python).
fn kubernetes_validate() -> PathBuf {
    let venv = repo().join("var/tools/python/bin/kubernetes-validate");
    if venv.is_file() {
        return venv;
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v kubernetes-validate"])
        .output()
        .unwrap();
    assert!(
        on_path.status.success(),
        "kubernetes-validate is missing: run scripts/install-deps.sh (make test does)"
    );
    PathBuf::from(text(&on_path.stdout).trim())
}

#[test]
fn deploy_crds_are_what_meshca_crds_prints() {
    let printed = run_ok(Command::new(MESHCA).args(["crds", "--for", "agent"]));
    let on_disk = std::fs::read(deploy().join("crds.yaml")).unwrap();
    assert!(
        printed.stdout == on_disk,
        "deploy/agent/crds.yaml is stale: regenerate with `meshca crds --for agent > deploy/agent/crds.yaml`"
    );
}

#[test]
fn built_in_kinds_pass_kubernetes_validate_strict() {
    let validator = kubernetes_validate();
    let mut checked = 0;
    for path in manifests() {
        let docs = documents(&path);
        let built_in = docs.iter().all(|d| {
            let api = d["apiVersion"].as_str().unwrap_or_default();
            !api.starts_with("meshca.dev/") && !api.starts_with("kustomize.config.k8s.io/")
        });
        if !built_in {
            continue;
        }
        let out = run(Command::new(&validator).arg("--strict").arg(&path));
        assert!(
            out.status.success(),
            "{} fails validation:\n{}{}",
            path.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
        checked += docs.len();
    }
    // CRD, Namespace, ServiceAccount, 2 Roles + 2 RoleBindings, Deployment, workload RBAC.
    assert_eq!(checked, 10);
    // The validator does reject a broken manifest (it is not a no-op).
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replicas: two\n  selector: {}\n  template: {}\n",
    );
    assert!(
        !run(Command::new(&validator).arg("--strict").arg(bad))
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
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Phase", "Expiry", "Age"]);
    let schema = &version["schema"]["openAPIV3Schema"]["properties"];
    let spec = &schema["spec"];
    let mut required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    required.sort();
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
fn the_example_request_is_a_valid_vmcsr() {
    let docs = documents(&deploy().join("example-vmcsr.yaml"));
    let request: VirtualMeshCertificateSigningRequest =
        serde_json::from_value(docs[0].clone()).unwrap();
    assert_eq!(request.spec.settings.target.name, "cacerts");
    request.spec.settings.rotation.settings().unwrap();
    request.spec.mesh.to_ref().unwrap();
}

#[test]
fn the_kustomization_lists_every_default_manifest() {
    let kustomization = &documents(&deploy().join("kustomization.yaml"))[0];
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let optional = [
        "kustomization.yaml",
        "example-vmcsr.yaml",
        "workload-namespace-rbac.yaml",
    ];
    let expected: Vec<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| !optional.contains(&n.as_str()))
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
}

#[test]
fn rbac_is_least_privilege() {
    let mut docs = documents(&deploy().join("rbac.yaml"));
    docs.extend(documents(&deploy().join("workload-namespace-rbac.yaml")));
    for doc in &docs {
        assert!(
            doc["kind"] == "Role" || doc["kind"] == "RoleBinding",
            "only namespaced RBAC: {}",
            doc["kind"]
        );
        for rule in doc["rules"].as_array().into_iter().flatten() {
            let list = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            let (resources, verbs, names) =
                (list("resources"), list("verbs"), list("resourceNames"));
            for word in resources.iter().chain(&verbs).chain(&list("apiGroups")) {
                assert_ne!(word, "*", "no wildcards: {rule}");
            }
            assert!(
                !verbs.contains(&"delete".into()),
                "nothing is deleted: {rule}"
            );
            assert!(
                !resources.contains(&"pods".into()),
                "pods are never touched: {rule}"
            );
            if resources.contains(&"secrets".into()) {
                assert_eq!(doc["metadata"]["namespace"], "istio-system");
                // Reading or changing is limited to cacerts; create cannot be named.
                if verbs != ["create"] {
                    assert_eq!(names, ["cacerts"], "{rule}");
                }
            }
            if resources.contains(&"deployments".into()) && verbs.contains(&"patch".into()) {
                assert!(
                    !names.is_empty() || doc["metadata"]["name"] == "meshca-agent-restart",
                    "istio-system Deployments are patched by name: {rule}"
                );
            }
        }
    }
}
