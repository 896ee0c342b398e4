//! deploy/mesh-controller/ checked offline: the CRDs are byte for byte `meshca crds --for
//! mesh-controller` (and, with the agent's, all of `meshca crds`) and structural schemas as
//! the API server requires; built-in kinds pass `kubernetes-validate --strict`; the
//! examples are a valid VirtualMesh and its Meshes; the kustomizations list every manifest;
//! the RBAC stays least-privilege in the management and the member clusters; the three
//! kustomizations one cluster may get (agent, management, member) share no object they
//! define differently.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use common::deploy::*;
use common::*;
use meshca::mesh_controller::crd::{Mesh, VirtualMesh};
use meshca::mesh_controller::decide;
use meshca::policy::ObjectRef;
use serde_json::{Value, json};

fn deploy() -> PathBuf {
    repo().join("deploy/mesh-controller")
}

fn member() -> PathBuf {
    deploy().join("member")
}

#[test]
fn deploy_crds_are_what_meshca_crds_prints() {
    let on_disk = assert_crds_file_is_printed("mesh-controller", &deploy().join("crds.yaml"));
    // Both components' files are every CRD meshca defines.
    let all = run_ok(Command::new(MESHCA).arg("crds")).stdout;
    let mut both = std::fs::read(repo().join("deploy/agent/crds.yaml")).unwrap();
    both.extend(on_disk);
    assert!(
        all == both,
        "meshca crds is not deploy/agent/ + deploy/mesh-controller/"
    );
}

#[test]
fn built_in_kinds_pass_kubernetes_validate_strict() {
    let mut checked = BTreeMap::new();
    for doc in assert_built_in_kinds_validate(&[deploy(), member()]) {
        *checked
            .entry(doc["kind"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    let expected: BTreeMap<String, i32> = [
        // The two CRDs.
        ("CustomResourceDefinition", 2),
        ("Namespace", 2),
        ("ServiceAccount", 2),
        // Management: one; member: service-mesh-hub and istio-system.
        ("Role", 3),
        ("RoleBinding", 3),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Deployment", 1),
        ("PodDisruptionBudget", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(checked, expected);
}

/// The API server's structural schema rules: every node has a type (or preserves unknown
/// fields, or is int-or-string), no references or combinators, `properties` and
/// `additionalProperties` never together, no `additionalProperties: false`.
fn assert_structural(schema: &Value, at: &str) {
    let obj = schema
        .as_object()
        .unwrap_or_else(|| panic!("{at}: not a schema object: {schema}"));
    for forbidden in [
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "definitions",
        "$defs",
    ] {
        assert!(!obj.contains_key(forbidden), "{at}: {forbidden}");
    }
    let preserves = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&json!(true));
    assert!(
        obj.contains_key("type") || preserves || int_or_string,
        "{at}: no type"
    );
    if let Some(extra) = obj.get("additionalProperties") {
        assert!(
            !obj.contains_key("properties"),
            "{at}: properties and additionalProperties"
        );
        assert_ne!(extra, &json!(false), "{at}: additionalProperties false");
        assert_structural(extra, &format!("{at}.*"));
    }
    for (name, property) in obj
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        assert_structural(property, &format!("{at}.{name}"));
    }
    if let Some(items) = obj.get("items") {
        assert_structural(items, &format!("{at}[]"));
    }
}

fn crd(kind: &str) -> Value {
    documents(&deploy().join("crds.yaml"))
        .into_iter()
        .find(|d| d["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn the_crds_are_structural_and_carry_the_seed_shape() {
    for kind in ["VirtualMesh", "Mesh"] {
        let crd = crd(kind);
        assert_eq!(crd["spec"]["group"], "meshca.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(
            (version["served"].clone(), version["storage"].clone()),
            (json!(true), json!(true))
        );
        assert_structural(&version["schema"]["openAPIV3Schema"], kind);
    }
    let vm = crd("VirtualMesh");
    assert_eq!(vm["spec"]["names"]["shortNames"], json!(["vmesh"]));
    let version = &vm["spec"]["versions"][0];
    assert!(version["subresources"]["status"].is_object());
    let columns = column_names(version);
    assert_eq!(columns, ["Phase", "Meshes", "Root", "Age"]);
    let schema = &version["schema"]["openAPIV3Schema"]["properties"];
    let spec = &schema["spec"];
    assert_eq!(
        keys(&spec["properties"]),
        [
            "certificateAuthority",
            "displayName",
            "enforceAccessControl",
            "federation",
            "limited",
            "meshes",
            "shared",
            "trustDomains"
        ]
    );
    assert_eq!(spec["required"], json!(["certificateAuthority"]));
    let ca = &spec["properties"]["certificateAuthority"]["properties"];
    assert_eq!(keys(ca), ["builtin", "provided"]);
    assert_eq!(
        keys(&ca["builtin"]["properties"]),
        ["orgName", "rsaKeySizeBytes", "ttlDays"]
    );
    // Options meshca refuses are kept (not pruned) so that the refusal names them.
    let federation = &spec["properties"]["federation"];
    assert_eq!(
        keys(&federation["properties"]),
        ["hostSuffix", "mode", "selector"]
    );
    assert_eq!(federation["x-kubernetes-preserve-unknown-fields"], true);
    assert_eq!(
        keys(&federation["properties"]["selector"]["properties"]),
        ["matchLabels", "namespaces"]
    );
    // So are misspelled keys at every level: the controller refuses them by name.
    let ca_schema = &spec["properties"]["certificateAuthority"];
    for (at, object) in [
        ("spec", spec),
        ("certificateAuthority", ca_schema),
        ("builtin", &ca_schema["properties"]["builtin"]),
        ("meshes[]", &spec["properties"]["meshes"]["items"]),
    ] {
        assert_eq!(object["x-kubernetes-preserve-unknown-fields"], true, "{at}");
    }
    for open in ["limited", "shared"] {
        assert_eq!(
            spec["properties"][open]["x-kubernetes-preserve-unknown-fields"],
            true
        );
    }
    let status = &schema["status"]["properties"];
    for field in [
        "phase",
        "observedGeneration",
        "conditions",
        "meshCount",
        "rootFingerprint",
        "nextRootFingerprint",
        "retiredRootFingerprints",
        "rootRotation",
        "federation",
        "meshes",
    ] {
        assert!(status[field].is_object(), "status.{field}");
    }
    assert_eq!(
        status["phase"]["enum"],
        json!(["Progressing", "Ready", "Degraded", "Invalid", "Deleting"])
    );
    let member = &status["meshes"]["items"]["properties"];
    for field in [
        "phase",
        "cluster",
        "rootFingerprint",
        "trustedRootFingerprints",
        "nextRootFingerprint",
        "federation",
        "message",
    ] {
        assert!(member[field].is_object(), "status.meshes[].{field}");
    }

    let mesh = crd("Mesh");
    let spec = &mesh["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        keys(&spec["properties"]),
        [
            "agent",
            "clusterDomain",
            "clusterName",
            "gatewayAddresses",
            "gatewayPort",
            "istioNamespace",
            "kubeconfigSecret",
            "trustDomain"
        ]
    );
    assert_eq!(spec["properties"]["gatewayPort"]["default"], 15443);
    assert_eq!(
        spec["properties"]["istioNamespace"]["default"],
        "istio-system"
    );
    let required = required_sorted(spec);
    assert_eq!(required, ["agent", "clusterName", "trustDomain"]);
    let agent = &spec["properties"]["agent"]["properties"];
    for field in [
        "namespace",
        "signer",
        "target",
        "adopt",
        "keyType",
        "ttlSeconds",
        "rotation",
        "restart",
    ] {
        assert!(agent[field].is_object(), "spec.agent.{field}");
    }
}

#[test]
fn the_examples_are_a_valid_virtual_mesh_and_its_meshes() {
    let vm: VirtualMesh =
        serde_json::from_value(documents(&deploy().join("example-virtual-mesh.yaml"))[0].clone())
            .unwrap();
    let meshes: Vec<Mesh> = documents(&deploy().join("example-meshes.yaml"))
        .into_iter()
        .map(|d| serde_json::from_value(d).unwrap())
        .collect();
    let by_id: BTreeMap<ObjectRef, &Mesh> = meshes.iter().map(|m| (m.id(), m)).collect();
    let claims = decide::claims(std::slice::from_ref(&vm));
    let valid = decide::validate(&vm, &by_id, &claims, "service-mesh-hub").unwrap();
    assert_eq!(valid.members.len(), 2);
    // The seed's document, as the signer reads it, is the same VirtualMesh.
    let seed = std::fs::read_to_string(repo().join("config/virtual-mesh.yaml")).unwrap();
    let seed: Value = serde_saphyr::from_str(&seed).unwrap();
    assert_eq!(serde_json::to_value(&vm.spec).unwrap(), seed["spec"]);
    assert!(
        meshes[0].spec.kubeconfig_secret.is_none(),
        "the management plane's own mesh"
    );
    assert!(meshes[1].spec.kubeconfig_secret.is_some());
}

#[test]
fn the_mesh_controller_serves_metrics_on_the_port_the_deployment_declares() {
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
    // Both kustomizations that create it (identical: see the test below).
    assert_namespace_enforces_restricted(&deploy().join("namespace.yaml"));
    assert_namespace_enforces_restricted(&member().join("namespace.yaml"));
    assert_pod_meets_restricted(&applied_object(&deploy(), "Deployment")["spec"]["template"]);
}

#[test]
fn the_kustomizations_list_every_default_manifest() {
    assert_kustomization_lists_every_manifest(
        &deploy(),
        &["example-virtual-mesh.yaml", "example-meshes.yaml"],
    );
    assert_kustomization_lists_every_manifest(&member(), &[]);
    // No long-lived credential in every member (the management cluster included, which
    // needs none): member-kubeconfig.sh issues a bound, expiring token where one is used.
    for (key, _) in objects_applied(&member()) {
        assert_ne!(key.0, "Secret", "{key:?}");
    }
}

/// Every object the kustomization in `dir` applies, by (kind, namespace, name).
fn objects_applied(dir: &std::path::Path) -> Vec<((String, String, String), Value)> {
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_array().unwrap() {
        for object in documents(&dir.join(resource.as_str().unwrap())) {
            let field = |path: &str| object.pointer(path).and_then(Value::as_str).unwrap_or("");
            let key = (
                field("/kind").to_string(),
                field("/metadata/namespace").to_string(),
                field("/metadata/name").to_string(),
            );
            objects.push((key, object));
        }
    }
    objects
}

#[test]
fn one_cluster_may_get_all_three_kustomizations_without_an_object_defined_twice_differently() {
    // The management cluster runs an agent and is often a member itself: its objects
    // would replace one another (a Role's rules, for one), and two Argo CD applications
    // owning one object rewrite it in turns.
    let mut seen: BTreeMap<(String, String, String), (Value, String)> = BTreeMap::new();
    let mut shared = Vec::new();
    for (from, dir) in [
        ("agent", repo().join("deploy/agent")),
        ("management", deploy()),
        ("member", member()),
    ] {
        for (key, object) in objects_applied(&dir) {
            match seen.get(&key) {
                Some((first, first_from)) => {
                    assert!(
                        *first == object,
                        "{key:?} is defined by {first_from} and differently by {from}"
                    );
                    shared.push(key);
                }
                None => {
                    seen.insert(key, (object, from.to_string()));
                }
            }
        }
    }
    // What may be shared: the namespace and the controller's ServiceAccount, identical.
    let kinds: Vec<&str> = shared.iter().map(|(kind, _, _)| kind.as_str()).collect();
    assert!(
        kinds
            .iter()
            .all(|k| ["Namespace", "ServiceAccount"].contains(k)),
        "{shared:?}"
    );
}

#[test]
fn rbac_is_least_privilege() {
    let management = rules(&deploy().join("rbac.yaml"));
    assert!(!management.is_empty());
    for rule in &management {
        assert_eq!(
            rule.kind, "Role",
            "only namespaced access in the management cluster"
        );
        assert_eq!(rule.namespace, "service-mesh-hub");
        for word in rule.groups.iter().chain(&rule.resources).chain(&rule.verbs) {
            assert_ne!(word, "*", "no wildcards");
        }
        assert!(
            !rule
                .verbs
                .iter()
                .any(|v| v == "delete" || v == "update" && rule.names.is_empty())
        );
        if rule.resources.contains(&"secrets".to_string()) {
            assert_eq!(rule.verbs, ["get"], "kubeconfigs are only read");
            // By name: the management cluster's agent keeps its signer client key here.
            assert_eq!(rule.names, ["new-remote-cluster-kubeconfig"]);
        }
        if rule.verbs.contains(&"update".to_string()) {
            assert_eq!(rule.resources, ["leases"]);
            assert_eq!(rule.names, ["meshca-mesh-controller"]);
        }
    }
    let member = rules(&member().join("rbac.yaml"));
    for rule in &member {
        for word in rule.groups.iter().chain(&rule.resources).chain(&rule.verbs) {
            assert_ne!(word, "*", "no wildcards");
        }
        for resource in &rule.resources {
            assert!(
                [
                    "virtualmeshcertificatesigningrequests",
                    "serviceentries",
                    "gateways",
                    "destinationrules",
                    "services"
                ]
                .contains(&resource.as_str()),
                "{resource} is not the controller's business in a member"
            );
        }
        if rule.kind == "ClusterRole" {
            assert_eq!(
                (rule.resources.clone(), rule.verbs.clone()),
                (vec!["services".to_string()], vec!["list".to_string()])
            );
        }
        if rule
            .resources
            .contains(&"virtualmeshcertificatesigningrequests".to_string())
        {
            assert_eq!(rule.namespace, "service-mesh-hub");
        }
        if rule.groups.contains(&"networking.istio.io".to_string()) {
            assert_eq!(rule.namespace, "istio-system");
        }
    }
    assert_eq!(member.iter().filter(|r| r.kind == "ClusterRole").count(), 1);
}

/// A stand-in for kubectl in `dir`: logs each call's arguments to `dir/args`, answers
/// `create token` with `dir/token` and `get configmap kube-root-ca.crt` with `dir/ca.pem`,
/// and keeps what `apply -f -` reads in `dir/applied.yaml`.
fn fake_kubectl(dir: &std::path::Path) -> PathBuf {
    let script = format!(
        "#!/bin/sh\nd='{}'\nprintf '%s\\n' \"$*\" >> \"$d/args\"\ncase \"$*\" in\n  *'create token'*) cat \"$d/token\" ;;\n  *'get configmap kube-root-ca.crt'*) cat \"$d/ca.pem\" ;;\n  *'apply '*) cat > \"$d/applied.yaml\" ;;\n  *) echo \"unexpected: $*\" >&2; exit 1 ;;\nesac\n",
        dir.display()
    );
    let path = write(dir, "kubectl", &script);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn member_kubeconfig_sh_writes_a_kubeconfig_the_controller_accepts_with_a_bound_token() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let dir = tempfile::tempdir().unwrap();
    let ca = std::fs::read_to_string(common::certs::openssl_self_signed_ca(
        dir.path(),
        "member-ca",
        "/CN=member cluster CA",
        0..30,
    ))
    .unwrap();
    write(dir.path(), "ca.pem", &ca);
    // A JWT as the TokenRequest API returns it: its exp (2030-01-01) is what the script
    // reports, the API server having perhaps shortened the duration asked for.
    let claims = b64url.encode(
        r#"{"aud":["https://kubernetes.default.svc"],"exp":1893456000,"sub":"system:serviceaccount:service-mesh-hub:meshca-mesh-controller"}"#,
    );
    let token = format!(
        "{}.{claims}.c2lnbmF0dXJl",
        b64url.encode(r#"{"alg":"RS256"}"#)
    );
    write(dir.path(), "token", &format!("{token}\n"));
    let kubectl = fake_kubectl(dir.path());
    let script = deploy().join("member-kubeconfig.sh");

    let out = run_ok(
        Command::new(&script)
            .args([
                "remote",
                "https://remote-api.example:6443",
                "remote-kubeconfig",
            ])
            .env("KUBECTL", &kubectl)
            .env("MANAGEMENT_CONTEXT", "management"),
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "Secret service-mesh-hub/remote-kubeconfig: kubeconfig for https://remote-api.example:6443, token valid until 2030-01-01T00:00:00Z"
    );
    let calls = std::fs::read_to_string(dir.path().join("args")).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        [
            "--context remote -n service-mesh-hub create token meshca-mesh-controller --duration 720h",
            "--context remote -n service-mesh-hub get configmap kube-root-ca.crt -o jsonpath={.data.ca\\.crt}",
            "--context management apply --server-side --force-conflicts --field-manager meshca-member-kubeconfig -f -",
        ]
    );
    assert!(!calls.contains(&claims), "the token was on a command line");

    let applied = &documents(&dir.path().join("applied.yaml"))[0];
    assert_eq!(applied["kind"], "Secret");
    assert_eq!(applied["metadata"]["name"], "remote-kubeconfig");
    assert_eq!(applied["metadata"]["namespace"], "service-mesh-hub");
    assert!(
        applied["metadata"].get("annotations").is_none(),
        "no copy of the kubeconfig in a last-applied annotation"
    );
    let kubeconfig = String::from_utf8(
        b64.decode(applied["data"]["kubeconfig"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let parsed = kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap();
    // What the controller demands of a member's kubeconfig: credentials and CA inline.
    meshca::mesh_controller::k8s::refuse_local_credentials(&parsed).unwrap();
    let as_value: Value = serde_saphyr::from_str(&kubeconfig).unwrap();
    assert_eq!(as_value["users"][0]["user"]["token"], token.as_str());
    let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
    assert_eq!(
        cluster.server.as_deref(),
        Some("https://remote-api.example:6443")
    );
    let ca_data = b64
        .decode(cluster.certificate_authority_data.as_ref().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(ca_data).unwrap(), ca);
    // The controller builds its client from it (TLS with that CA; nothing is called).
    meshca::mesh_controller::k8s::member_client(
        &kubeconfig,
        None,
        "Secret service-mesh-hub/remote-kubeconfig",
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();

    // Without MANAGEMENT_CONTEXT, kubectl's current context; another duration is passed on.
    std::fs::remove_file(dir.path().join("args")).unwrap();
    run_ok(
        Command::new(&script)
            .args([
                "remote",
                "https://remote-api.example:6443",
                "remote-kubeconfig",
                "48h",
            ])
            .env("KUBECTL", &kubectl)
            .env_remove("MANAGEMENT_CONTEXT"),
    );
    let calls = std::fs::read_to_string(dir.path().join("args")).unwrap();
    assert!(calls.contains("--duration 48h"), "{calls}");
    assert!(
        calls.lines().last().unwrap().starts_with("apply "),
        "{calls}"
    );
    // A plain-http server would send the token unprotected: refused before any call.
    std::fs::remove_file(dir.path().join("args")).unwrap();
    let out = run(Command::new(&script)
        .args([
            "remote",
            "http://remote-api.example:6443",
            "remote-kubeconfig",
        ])
        .env("KUBECTL", &kubectl));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("https://"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("args").exists());
}
