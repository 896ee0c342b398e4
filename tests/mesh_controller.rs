//! The mesh controller against HTTP fakes of exactly the Kubernetes endpoints it uses: one
//! management cluster (VirtualMeshes, Meshes, kubeconfig Secrets, Lease) and one fake per
//! member cluster, reached through the kubeconfigs in those Secrets. The tests assert the
//! requests sent (methods, paths, field manager, bodies, credentials), that a second pass
//! writes nothing, member removal and deletion cleanup, refusals in status, an unreachable
//! member, and the root retirement handshake (the signer's next root kept and reported).
//! What is applied is compared with the pure translation of the same inventory.

mod kubefake;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use kubefake::{FINALIZER, FakeCluster, Policy, Recorded, kubeconfig, writes};
use meshca::agent::election::LeaderLoop;
use meshca::agent::k8s::MAX_LIST_PAGES;
use meshca::agent::metrics::Exposition;
use meshca::mesh::{FederationConfig, Inventory, parse_virtual_mesh, translate};
use meshca::mesh_controller::controller::WRITES_IN_FLIGHT;
use meshca::mesh_controller::controller::{MeshController, MeshControllerOptions};
use meshca::mesh_controller::metrics::MeshControllerMetrics;

const MG: &str = "/apis/meshca.dev/v1alpha1/namespaces/smh";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/smh/leases/meshca-mesh-controller";
const R1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const R2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn vm_path(name: &str) -> String {
    format!("{MG}/virtualmeshes/{name}")
}
fn mesh_path(name: &str) -> String {
    format!("{MG}/meshes/{name}")
}
fn vmcsr_path(name: &str) -> String {
    format!(
        "/apis/meshca.dev/v1alpha1/namespaces/service-mesh-hub/virtualmeshcertificatesigningrequests/{name}"
    )
}
fn istio_path(plural: &str, name: &str) -> String {
    format!("/apis/networking.istio.io/v1/namespaces/istio-system/{plural}/{name}")
}

fn gateway_address(cluster: &str) -> &'static str {
    match cluster {
        "east" => "192.0.2.1",
        "west" => "192.0.2.2",
        _ => "gw.north.example.com",
    }
}

fn vm_spec(meshes: &[&str]) -> Value {
    json!({
        "displayName": "Demo Mesh Federation",
        "certificateAuthority": {"builtin": {"ttlDays": 356, "rsaKeySizeBytes": 4096, "orgName": "service-mesh-hub"}},
        "federation": {"mode": "PERMISSIVE"},
        "shared": {},
        "enforceAccessControl": false,
        "meshes": meshes.iter().map(|m| json!({"name": m, "namespace": "smh"})).collect::<Vec<_>>()
    })
}

fn vm_object(name: &str, created: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "meshca.dev/v1alpha1", "kind": "VirtualMesh",
        "metadata": {"name": name, "namespace": "smh", "generation": 1,
                     "creationTimestamp": created, "resourceVersion": "1"},
        "spec": spec
    })
}

fn mesh_object(cluster: &str) -> Value {
    json!({
        "apiVersion": "meshca.dev/v1alpha1", "kind": "Mesh",
        "metadata": {"name": cluster, "namespace": "smh", "resourceVersion": "1"},
        "spec": {
            "clusterName": cluster,
            "trustDomain": format!("{cluster}.local"),
            "kubeconfigSecret": {"name": format!("{cluster}-kubeconfig")},
            "gatewayAddresses": [gateway_address(cluster)],
            "agent": {"signer": {"url": "https://signer.example:8443"},
                      "restart": {"workloadNamespaces": ["shop"]}}
        }
    })
}

fn secret_object(cluster: &str, kubeconfig: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{cluster}-kubeconfig"), "namespace": "smh"},
        "data": {"kubeconfig": base64::engine::general_purpose::STANDARD.encode(kubeconfig)}
    })
}

fn service(ns: &str, name: &str) -> (String, Value) {
    (
        format!("/api/v1/namespaces/{ns}/services/{name}"),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"ports": [{"port": 8080, "name": "http", "protocol": "TCP"}]}}),
    )
}

fn token(cluster: &str) -> String {
    format!("token-of-{cluster}-do-not-print")
}

/// Short, so that the test of a member that never answers is quick.
const MEMBER_API_TIMEOUT: Duration = Duration::from_secs(2);

/// The controller's ServiceAccount, in the management cluster and in each member.
const CONTROLLER: (&str, &str) = ("service-mesh-hub", "meshca-mesh-controller");

/// What deploy/mesh-controller/rbac.yaml grants the controller, installed in the tests'
/// namespace `smh`, with the kubeconfig Secrets of `clusters` named (the kustomize patch
/// its comment asks for).
fn management_policy(clusters: &[&str]) -> Policy {
    let secrets: Vec<String> = clusters.iter().map(|c| format!("{c}-kubeconfig")).collect();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    Policy::bound_to(CONTROLLER, &["deploy/mesh-controller/rbac.yaml"])
        .moved("service-mesh-hub", "smh")
        .named("secrets", &secrets)
}

/// What deploy/mesh-controller/member/ grants the controller in a member cluster.
fn member_policy() -> Policy {
    Policy::bound_to(CONTROLLER, &["deploy/mesh-controller/member/rbac.yaml"])
}

struct World {
    mgmt: FakeCluster,
    members: BTreeMap<&'static str, FakeCluster>,
    controller: MeshController,
    metrics: Arc<MeshControllerMetrics>,
}

fn controller(
    mgmt: &FakeCluster,
    retire_after: Duration,
    member_api_timeout: Duration,
    metrics: Arc<MeshControllerMetrics>,
) -> MeshController {
    MeshController::new(
        mgmt.client(),
        MeshControllerOptions {
            namespace: "smh".into(),
            identity: "controller-0".into(),
            lease_name: "meshca-mesh-controller".into(),
            lease_duration: Duration::from_secs(30),
            resync: Duration::from_secs(30),
            retire_after,
            member_api_timeout,
        },
        metrics,
    )
}

impl World {
    /// A management cluster with VirtualMesh `vm` over `clusters`, a Mesh and kubeconfig
    /// Secret for each, and member clusters each offering `shop/<cluster>-app`. The first
    /// member also has Services that are never federated.
    async fn start(clusters: &[&'static str]) -> World {
        World::start_with(clusters, management_policy(clusters)).await
    }

    /// As [`World::start`], the controller granted `policy` in the management cluster.
    async fn start_with(clusters: &[&'static str], policy: Policy) -> World {
        World::start_granted(clusters, policy, member_policy).await
    }

    /// As [`World::start_with`], the controller granted `member` in each member cluster.
    async fn start_granted(
        clusters: &[&'static str],
        policy: Policy,
        member: fn() -> Policy,
    ) -> World {
        let mgmt = FakeCluster::start(policy).await;
        let mut members = BTreeMap::new();
        for (i, cluster) in clusters.iter().enumerate() {
            let member = FakeCluster::start(member()).await;
            mgmt.put(
                &format!("/api/v1/namespaces/smh/secrets/{cluster}-kubeconfig"),
                secret_object(cluster, &member.kubeconfig(&token(cluster))),
            );
            mgmt.put(&mesh_path(cluster), mesh_object(cluster));
            let (path, svc) = service("shop", &format!("{cluster}-app"));
            member.put(&path, svc);
            if i == 0 {
                for (ns, name) in [
                    ("kube-system", "kube-dns"),
                    ("istio-system", "istiod"),
                    ("default", "kubernetes"),
                ] {
                    let (path, svc) = service(ns, name);
                    member.put(&path, svc);
                }
            }
            members.insert(*cluster, member);
        }
        mgmt.put(
            &vm_path("vm"),
            vm_object("vm", "2024-01-01T00:00:00Z", vm_spec(clusters)),
        );
        let metrics = Arc::new(MeshControllerMetrics::new());
        let controller = controller(&mgmt, Duration::ZERO, MEMBER_API_TIMEOUT, metrics.clone());
        World {
            mgmt,
            members,
            controller,
            metrics,
        }
    }

    fn member(&self, name: &str) -> &FakeCluster {
        &self.members[name]
    }

    /// One pass; the requests each cluster received ("mgmt" and the members).
    async fn pass_with(&self, controller: &MeshController) -> BTreeMap<String, Vec<Recorded>> {
        controller.run_once().await.unwrap();
        let mut out = BTreeMap::from([("mgmt".to_string(), self.mgmt.take())]);
        for (name, member) in &self.members {
            out.insert(name.to_string(), member.take());
        }
        out
    }

    async fn pass(&self) -> BTreeMap<String, Vec<Recorded>> {
        self.pass_with(&self.controller).await
    }

    fn status(&self, vm: &str) -> Value {
        self.mgmt.get(&vm_path(vm)).unwrap()["status"].clone()
    }

    /// What the member's agent would write into its request's status.
    fn report(&self, cluster: &str, phase: &str, root: &str, trusted: &[&str]) {
        self.member(cluster).edit(&vmcsr_path(cluster), |v| {
            v["status"] = json!({
                "phase": phase,
                "observedGeneration": v["metadata"]["generation"],
                "serial": "0a1b",
                "notAfter": "2030-01-01T00:00:00.000Z",
                "rootFingerprint": root,
                "trustedRootFingerprints": trusted,
            });
        });
    }

    /// As [`World::report`] (Installed), the agent also reporting the signer's next root.
    fn report_next(&self, cluster: &str, root: &str, trusted: &[&str], next: &str) {
        self.report(cluster, "Installed", root, trusted);
        self.member(cluster).edit(&vmcsr_path(cluster), |v| {
            v["status"]["nextRootFingerprint"] = next.into();
        });
    }

    fn report_all(&self, root: &str, trusted: &[&str]) {
        for cluster in self.members.keys() {
            self.report(cluster, "Installed", root, trusted);
        }
    }
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

fn w(method: &str, path: &str) -> (String, String) {
    (method.to_string(), path.to_string())
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no condition {type_} in {status}"))
}

fn member_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["meshes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no mesh {name} in {status}"))
}

/// The objects the pure translation puts in each cluster for the same input, by path.
fn expected_objects(clusters: &[&str]) -> BTreeMap<String, BTreeMap<String, Value>> {
    let doc = parse_virtual_mesh(
        "vm",
        &serde_json::to_string(&vm_object("vm", "2024-01-01T00:00:00Z", vm_spec(clusters)))
            .unwrap(),
    )
    .unwrap();
    let config = FederationConfig::from_document(&doc, "vm").unwrap();
    let mut yaml = String::from("clusters:\n");
    for cluster in clusters {
        yaml.push_str(&format!(
            "- name: {cluster}\n  mesh: smh/{cluster}\n  trustDomain: {cluster}.local\n  gatewayAddresses: [{}]\n  services:\n  - {{name: {cluster}-app, namespace: shop, labels: {{app: {cluster}-app}}, ports: [{{number: 8080, name: http}}]}}\n",
            gateway_address(cluster)
        ));
    }
    let inventory = Inventory::from_yaml("inventory", &yaml).unwrap();
    let plan = translate(&config, &inventory).unwrap();
    clusters
        .iter()
        .map(|cluster| {
            let objects = plan
                .objects(cluster)
                .unwrap()
                .map(|d| {
                    let object = d.to_object();
                    (
                        istio_path(d.kind().plural(), d.name()),
                        serde_json::to_value(&object).unwrap(),
                    )
                })
                .collect();
            (cluster.to_string(), objects)
        })
        .collect()
}

fn assert_apply(r: &Recorded) {
    assert_eq!(r.method, "PATCH", "{}", r.path);
    assert_eq!(r.content_type, "application/apply-patch+yaml", "{}", r.path);
    assert_eq!(
        r.param("fieldManager").as_deref(),
        Some("meshca"),
        "{}",
        r.path
    );
    assert_eq!(r.param("force").as_deref(), Some("true"), "{}", r.path);
    assert_eq!(
        r.param("fieldValidation").as_deref(),
        Some("Strict"),
        "{}",
        r.path
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_get_requests_and_federation_and_a_second_pass_writes_nothing() {
    let world = World::start(&["east", "west"]).await;
    let sent = world.pass().await;

    // Management cluster: Lease, finalizers, the members recorded before their clusters
    // are touched, status; nothing else written.
    let mgmt = &sent["mgmt"];
    let status_path = format!("{}/status", vm_path("vm"));
    assert_eq!(
        writes(mgmt),
        vec![
            w("POST", "/apis/coordination.k8s.io/v1/namespaces/smh/leases"),
            w("PATCH", &vm_path("vm")),
            w("PATCH", &mesh_path("east")),
            w("PATCH", &mesh_path("west")),
            w("PATCH", &status_path),
            w("PATCH", &status_path),
        ]
    );
    let joining = mgmt.iter().find(|r| r.path == status_path).unwrap();
    let phases: Vec<(&Value, &Value)> = joining.body["status"]["meshes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (&m["name"], &m["phase"]))
        .collect();
    assert_eq!(
        phases,
        [
            (&json!("east"), &json!("Pending")),
            (&json!("west"), &json!("Pending"))
        ]
    );
    for r in mgmt.iter().filter(|r| r.method == "PATCH") {
        assert_apply(r);
    }
    let finalizer = mgmt
        .iter()
        .find(|r| r.method == "PATCH" && r.path == vm_path("vm"))
        .unwrap();
    assert_eq!(
        finalizer.body,
        json!({"apiVersion": "meshca.dev/v1alpha1", "kind": "VirtualMesh",
            "metadata": {"name": "vm", "namespace": "smh", "finalizers": [FINALIZER]}})
    );
    assert_eq!(
        world.mgmt.get(&mesh_path("east")).unwrap()["metadata"]["finalizers"],
        json!([FINALIZER])
    );
    let secrets_read: Vec<&str> = mgmt
        .iter()
        .filter(|r| r.path.contains("/secrets/"))
        .map(|r| r.path.as_str())
        .collect();
    assert!(secrets_read.iter().all(|p| p.ends_with("-kubeconfig")));
    assert!(!secrets_read.is_empty());

    let expected = expected_objects(&["east", "west"]);
    for cluster in ["east", "west"] {
        let requests = &sent[cluster];
        // Every call with the kubeconfig's credentials.
        for r in requests {
            // Not assert_eq!: its message would print the token.
            assert!(
                r.authorization.as_deref() == Some(format!("Bearer {}", token(cluster)).as_str()),
                "{} {}: not the kubeconfig's bearer token",
                r.method,
                r.path
            );
        }
        let reads: Vec<&str> = requests
            .iter()
            .filter(|r| r.method == "GET")
            .map(|r| r.path.as_str())
            .collect();
        assert_eq!(
            reads,
            [
                "/apis/meshca.dev/v1alpha1/namespaces/service-mesh-hub/virtualmeshcertificatesigningrequests",
                "/api/v1/services",
                "/apis/networking.istio.io/v1/namespaces/istio-system/gateways",
                "/apis/networking.istio.io/v1/namespaces/istio-system/destinationrules",
                "/apis/networking.istio.io/v1/namespaces/istio-system/serviceentries",
            ]
        );
        let mut want: Vec<(String, String)> = expected[cluster]
            .keys()
            .map(|path| w("PATCH", path))
            .collect();
        want.push(w("PATCH", &vmcsr_path(cluster)));
        assert_eq!(sorted(writes(requests)), sorted(want));
        for r in requests.iter().filter(|r| r.method != "GET") {
            assert_apply(r);
        }
        // Exactly the translation's objects.
        for r in requests
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.contains("networking.istio.io"))
        {
            assert_eq!(r.body, expected[cluster][&r.path], "{}", r.path);
        }
        let request = requests
            .iter()
            .find(|r| r.path == vmcsr_path(cluster))
            .unwrap();
        assert_eq!(request.body["kind"], "VirtualMeshCertificateSigningRequest");
        assert_eq!(
            request.body["metadata"]["labels"],
            json!({"app.kubernetes.io/managed-by": "meshca", "meshca.io/mesh": cluster,
                "meshca.io/virtual-mesh": "vm", "meshca.io/virtual-mesh-namespace": "smh"})
        );
        let spec = &request.body["spec"];
        assert_eq!(
            spec["virtualMesh"],
            json!({"namespace": "smh", "name": "vm"})
        );
        assert_eq!(spec["mesh"], json!({"namespace": "smh", "name": cluster}));
        assert_eq!(spec["signer"]["url"], "https://signer.example:8443");
        assert_eq!(
            spec["target"],
            json!({"namespace": "istio-system", "name": "cacerts"})
        );
        assert_eq!(spec["restart"]["workloadNamespaces"], json!(["shop"]));
        assert!(spec["rotation"].get("retiredRootFingerprints").is_none());
    }
    // The east-west entries: west's service reaches east through west's gateway.
    let entry =
        &expected["east"][&istio_path("serviceentries", "west-app.shop.svc.west.mesh.internal")];
    assert_eq!(entry["spec"]["endpoints"][0]["address"], "192.0.2.2");
    assert_eq!(entry["spec"]["endpoints"][0]["ports"]["http"], 15443);
    assert_eq!(entry["spec"]["location"], "MESH_INTERNAL");
    // System services, istiod and the API server's Service are never federated.
    let east_objects = world.member("east").paths("/apis/networking.istio.io");
    assert_eq!(east_objects.len(), 4, "{east_objects:?}");
    assert!(
        !east_objects
            .iter()
            .any(|p| p.contains("kube-dns") || p.contains("istiod") || p.contains("kubernetes"))
    );

    let st = world.status("vm");
    assert_eq!(st["phase"], "Progressing");
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["meshCount"], 2);
    assert_eq!(condition(&st, "Accepted")["status"], "True");
    let trust = condition(&st, "TrustEstablished");
    assert_eq!(
        (trust["status"].as_str(), trust["reason"].as_str()),
        (Some("False"), Some("Pending"))
    );
    assert_eq!(
        trust["message"],
        "waiting for smh/east (Pending), smh/west (Pending)"
    );
    let federated = condition(&st, "Federated");
    assert_eq!(federated["status"], "True");
    assert_eq!(
        federated["message"],
        "2 service(s) federated across 2 cluster(s)"
    );
    let east = member_status(&st, "east");
    assert_eq!(east["phase"], "Pending");
    assert_eq!(east["cluster"], "east");
    assert_eq!(east["agentNamespace"], "service-mesh-hub");
    assert_eq!(east["istioNamespace"], "istio-system");
    assert_eq!(
        east["federation"],
        json!({"exported": 1, "imported": 1, "objects": 4})
    );
    assert_eq!(
        st["federation"],
        json!({"mode": "PERMISSIVE", "services": 2})
    );

    // The agents install their intermediates: status only.
    world.report_all(R1, &[R1]);
    let sent = world.pass().await;
    assert_eq!(
        writes(&sent["mgmt"]),
        vec![
            w("PUT", LEASE),
            w("PATCH", &format!("{}/status", vm_path("vm")))
        ]
    );
    assert!(writes(&sent["east"]).is_empty() && writes(&sent["west"]).is_empty());
    let st = world.status("vm");
    assert_eq!(st["phase"], "Ready");
    assert_eq!(st["rootFingerprint"], R1);
    assert_eq!(condition(&st, "Ready")["status"], "True");
    assert_eq!(member_status(&st, "west")["phase"], "Installed");
    assert_eq!(member_status(&st, "west")["serial"], "0a1b");

    // Nothing changed: nothing written anywhere but the Lease renewal.
    for _ in 0..2 {
        let sent = world.pass().await;
        assert_eq!(writes(&sent["mgmt"]), vec![w("PUT", LEASE)]);
        assert!(writes(&sent["east"]).is_empty() && writes(&sent["west"]).is_empty());
    }

    // No credential ever left the kubeconfig Secrets.
    let all = serde_json::to_string(&world.mgmt.get(&vm_path("vm"))).unwrap();
    for cluster in ["east", "west"] {
        assert!(!all.contains(&token(cluster)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_loses_its_request_and_objects_and_its_services_go_elsewhere() {
    let world = World::start(&["east", "north", "west"]).await;
    // A hand-made ServiceEntry in north, not labelled for the VirtualMesh.
    let hand_made = istio_path("serviceentries", "hand-made");
    world.member("north").put(
        &hand_made,
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "hand-made", "namespace": "istio-system"},
            "spec": {"hosts": ["example.com"]}}),
    );
    world.pass().await;
    world.report_all(R1, &[R1]);
    world.pass().await;
    assert_eq!(world.status("vm")["phase"], "Ready");
    let north_objects = world.member("north").paths("/apis/networking.istio.io");
    assert_eq!(north_objects.len(), 6, "{north_objects:?}");

    world.mgmt.edit(&vm_path("vm"), |v| {
        v["spec"] = vm_spec(&["east", "west"]);
        v["metadata"]["generation"] = 2.into();
    });
    let sent = world.pass().await;
    let north_entry = istio_path("serviceentries", "north-app.shop.svc.north.mesh.internal");
    for cluster in ["east", "west"] {
        assert_eq!(
            writes(&sent[cluster]),
            vec![w("DELETE", &north_entry)],
            "{cluster}"
        );
    }
    let mut north_deleted: Vec<(String, String)> = north_objects
        .iter()
        .filter(|p| **p != hand_made)
        .map(|p| w("DELETE", p))
        .collect();
    north_deleted.push(w("DELETE", &vmcsr_path("north")));
    assert_eq!(sorted(writes(&sent["north"])), sorted(north_deleted));
    assert_eq!(
        world.member("north").paths("/apis/networking.istio.io"),
        vec![hand_made.clone()]
    );
    assert!(world.member("north").get(&vmcsr_path("north")).is_none());
    // The Mesh is free again; status lists the two members.
    let mgmt_writes = writes(&sent["mgmt"]);
    assert!(
        mgmt_writes.contains(&w("PATCH", &mesh_path("north"))),
        "{mgmt_writes:?}"
    );
    let release = sent["mgmt"]
        .iter()
        .find(|r| r.path == mesh_path("north"))
        .unwrap();
    assert!(release.body["metadata"].get("finalizers").is_none());
    assert_eq!(
        world.mgmt.get(&mesh_path("north")).unwrap()["metadata"]["finalizers"],
        json!([])
    );
    let st = world.status("vm");
    assert_eq!(st["observedGeneration"], 2);
    assert_eq!(st["meshCount"], 2);
    let names: Vec<&str> = st["meshes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["east", "west"]);
    assert_eq!(st["phase"], "Ready");

    let sent = world.pass().await;
    assert_eq!(writes(&sent["mgmt"]), vec![w("PUT", LEASE)]);
    for cluster in ["east", "north", "west"] {
        assert!(writes(&sent[cluster]).is_empty(), "{cluster}");
    }
    // Once it is no one's member, the controller does not even read north.
    assert!(sent["north"].is_empty());
}

/// A Mesh replaced by another for the same cluster (renamed, say): the former member's
/// cleanup deletes its request but leaves the federation objects in that cluster's Istio
/// namespace, which the new member holds now (the same names and labels). Before, the
/// cleanup deleted them right after the new member found them in place, and federation
/// was down in that cluster until the next pass (or for as long as it was held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_replaced_for_the_same_cluster_keeps_its_federation_objects() {
    let world = World::start(&["east", "west"]).await;
    world.pass().await;
    world.report_all(R1, &[R1]);
    world.pass().await;
    assert_eq!(world.status("vm")["phase"], "Ready");
    let objects = world.member("east").paths("/apis/networking.istio.io");
    assert!(!objects.is_empty());

    let mut renamed = mesh_object("east");
    renamed["metadata"]["name"] = "east-new".into();
    world.mgmt.put(&mesh_path("east-new"), renamed);
    world.mgmt.edit(&vm_path("vm"), |v| {
        v["spec"] = vm_spec(&["east-new", "west"]);
        v["metadata"]["generation"] = 2.into();
    });
    let sent = world.pass().await;
    let deleted: Vec<(String, String)> = writes(&sent["east"])
        .into_iter()
        .filter(|(method, _)| method == "DELETE")
        .collect();
    assert_eq!(deleted, vec![w("DELETE", &vmcsr_path("east"))]);
    assert_eq!(
        world.member("east").paths("/apis/networking.istio.io"),
        objects
    );
    assert!(world.member("east").get(&vmcsr_path("east-new")).is_some());
    let st = world.status("vm");
    let members: Vec<&str> = st["meshes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["east-new", "west"], "{st}");
}

/// A Mesh's agent namespace changed to one where another client's request holds the
/// name: the request in the old namespace, the one the running agent uses, stays until
/// the new one is in place (before, it was deleted at once, and nothing renewed the
/// cluster's intermediate any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_moving_namespace_stays_until_the_new_one_is_in_place() {
    // The operator granted the controller the new namespace too.
    let granted = || member_policy().and(member_policy().moved("service-mesh-hub", "agents-2"));
    let clusters = ["east", "west"];
    let world = World::start_granted(&clusters, management_policy(&clusters), granted).await;
    world.pass().await;
    let moved =
        "/apis/meshca.dev/v1alpha1/namespaces/agents-2/virtualmeshcertificatesigningrequests/east";
    world.member("east").put(
        moved,
        json!({"apiVersion": "meshca.dev/v1alpha1", "kind": "VirtualMeshCertificateSigningRequest",
               "metadata": {"name": "east", "namespace": "agents-2"},
               "spec": {"virtualMesh": {"namespace": "smh", "name": "other"},
                        "mesh": {"namespace": "smh", "name": "east"},
                        "signer": {"url": "https://signer.example:8443"}}}),
    );
    world.mgmt.edit(&mesh_path("east"), |mesh| {
        mesh["spec"]["agent"]["namespace"] = "agents-2".into();
    });
    let sent = world.pass().await;
    assert!(
        world.member("east").get(&vmcsr_path("east")).is_some(),
        "the request the agent uses was deleted: {:?}",
        writes(&sent["east"])
    );
    let st = world.status("vm");
    assert_eq!(member_status(&st, "east")["phase"], "Conflict", "{st}");

    // The other client's request gone: the new one is applied, then the old one goes.
    world.member("east").remove(moved);
    world.pass().await;
    let applied = world
        .member("east")
        .get(moved)
        .expect("the request in agents-2");
    assert_eq!(applied["spec"]["virtualMesh"]["name"], "vm");
    assert!(world.member("east").get(&vmcsr_path("east")).is_none());
}

/// A Mesh's Istio namespace changed while federation is held (another member cannot be
/// read): the status keeps the old namespace until its objects are gone, so the pass after
/// the hold still finds and deletes them (before, the new one was recorded at once, and
/// the old namespace's Gateway, DestinationRule and ServiceEntries stayed for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_in_an_istio_namespace_left_during_a_hold_are_still_cleaned() {
    let granted = || member_policy().and(member_policy().moved("istio-system", "istio-2"));
    let clusters = ["east", "west"];
    let world = World::start_granted(&clusters, management_policy(&clusters), granted).await;
    world.pass().await;
    let old_objects = world.member("east").paths("/apis/networking.istio.io");
    assert!(!old_objects.is_empty());

    let secret = "/api/v1/namespaces/smh/secrets/west-kubeconfig";
    world.mgmt.put(
        secret,
        secret_object("west", &kubeconfig("http://127.0.0.1:1", &token("west"))),
    );
    world.mgmt.edit(&mesh_path("east"), |mesh| {
        mesh["spec"]["istioNamespace"] = "istio-2".into();
    });
    world.pass().await;
    let st = world.status("vm");
    assert_eq!(condition(&st, "Federated")["reason"], "MemberError", "{st}");
    assert_eq!(
        member_status(&st, "east")["istioNamespace"],
        "istio-system",
        "{st}"
    );

    world.mgmt.put(
        secret,
        secret_object("west", &world.member("west").kubeconfig(&token("west"))),
    );
    world.pass().await;
    let left: Vec<String> = world
        .member("east")
        .paths("/apis/networking.istio.io")
        .into_iter()
        .filter(|p| p.contains("/namespaces/istio-system/"))
        .collect();
    assert!(left.is_empty(), "left in the old namespace: {left:?}");
    assert!(
        world
            .member("east")
            .paths("/apis/networking.istio.io/v1/namespaces/istio-2/")
            .len()
            >= old_objects.len()
    );
    assert_eq!(
        member_status(&world.status("vm"), "east")["istioNamespace"],
        "istio-2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_before_its_addition_was_recorded_leaves_nothing_behind() {
    let world = World::start(&["east", "north", "west"]).await;
    let with = |meshes: &'static [&'static str], generation: i64| {
        move |v: &mut Value| {
            v["spec"] = vm_spec(meshes);
            v["metadata"]["generation"] = generation.into();
        }
    };
    world.mgmt.edit(&vm_path("vm"), with(&["east", "west"], 1));
    world.pass().await;
    // north joins in a pass whose status writes after the first `let_pass` are refused
    // (as a kill, a lost Lease or an API error would leave it), then leaves before any
    // pass completes.
    let status_path = format!("{}/status", vm_path("vm"));
    let join_then_leave = |let_pass: usize, generation: i64| {
        let world = &world;
        let status_path = &status_path;
        async move {
            world.mgmt.refuse_writes_after(
                status_path,
                let_pass,
                500,
                "InternalError",
                "etcdserver: request timed out",
            );
            world
                .mgmt
                .edit(&vm_path("vm"), with(&["east", "north", "west"], generation));
            world.pass().await;
            let touched = world.member("north").get(&vmcsr_path("north")).is_some();
            world.mgmt.accept_writes();
            world
                .mgmt
                .edit(&vm_path("vm"), with(&["east", "west"], generation + 1));
            world.pass().await;
            // Nothing of this VirtualMesh stays in north: no request asking the signer for
            // it, no federation objects; and only then is its Mesh let go.
            assert!(world.member("north").get(&vmcsr_path("north")).is_none());
            assert_eq!(
                world.member("north").paths("/apis/networking.istio.io"),
                Vec::<String>::new()
            );
            assert_eq!(
                world.mgmt.get(&mesh_path("north")).unwrap()["metadata"]["finalizers"],
                json!([])
            );
            touched
        }
    };
    // No status write at all: north is not touched.
    assert!(!join_then_leave(0, 2).await);
    // The pass's first status write (north joining) let through: its request and objects
    // are made, the last status write is lost; north's cleanup starts from that record.
    assert!(join_then_leave(1, 4).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_virtual_meshes_get_a_clear_reason_and_the_clusters_are_left_alone() {
    let world = World::start(&["east", "west"]).await;
    let mut limited = vm_spec(&["east"]);
    limited["limited"] = json!({});
    limited.as_object_mut().unwrap().remove("shared");
    let mut strict = vm_spec(&["ghost"]);
    strict["federation"]["mode"] = "STRICT".into();
    let cases = [
        (
            "a-limited",
            limited,
            "UnsupportedTrustModel",
            "the limited trust model is not supported; meshca implements shared trust (one root)",
        ),
        (
            "b-strict",
            strict,
            "UnsupportedFederationMode",
            "spec.federation.mode \"STRICT\" is not supported: meshca implements PERMISSIVE",
        ),
        (
            "c-ghost",
            vm_spec(&["ghost"]),
            "MeshNotFound",
            "Mesh smh/ghost does not exist",
        ),
        (
            "d-late",
            vm_spec(&["west"]),
            "MeshConflict",
            "mesh smh/west already belongs to VirtualMesh smh/vm",
        ),
    ];
    for (name, spec, _, _) in &cases {
        world.mgmt.put(
            &vm_path(name),
            vm_object(name, "2025-01-01T00:00:00Z", spec.clone()),
        );
    }
    world.pass().await;
    for (name, _, reason, message) in &cases {
        let st = world.status(name);
        assert_eq!(st["phase"], "Invalid", "{name}");
        for type_ in ["Accepted", "Ready"] {
            let c = condition(&st, type_);
            assert_eq!(c["status"], "False");
            assert_eq!(c["reason"], *reason, "{name}");
            assert!(
                c["message"].as_str().unwrap().contains(message),
                "{name}: {message:?} not in {}",
                c["message"]
            );
        }
    }
    // Only the valid VirtualMesh's requests exist in the members.
    for cluster in ["east", "west"] {
        assert_eq!(
            world.member(cluster).paths("/apis/meshca.dev"),
            vec![vmcsr_path(cluster)]
        );
    }
    assert_eq!(world.status("vm")["phase"], "Progressing");

    // A valid VirtualMesh turning invalid: status says why, nothing in the clusters moves.
    world.report_all(R1, &[R1]);
    world.pass().await;
    world.mgmt.edit(&vm_path("vm"), |v| {
        v["spec"]["enforceAccessControl"] = true.into();
        v["metadata"]["generation"] = 2.into();
    });
    let sent = world.pass().await;
    for cluster in ["east", "west"] {
        assert!(
            writes(&sent[cluster]).is_empty(),
            "{cluster}: {:?}",
            writes(&sent[cluster])
        );
        assert!(sent[cluster].is_empty(), "not even read");
    }
    let st = world.status("vm");
    assert_eq!(st["phase"], "Invalid");
    assert_eq!(st["observedGeneration"], 2);
    assert_eq!(condition(&st, "Accepted")["reason"], "UnsupportedOption");
    assert!(
        condition(&st, "Accepted")["message"]
            .as_str()
            .unwrap()
            .contains("spec.enforceAccessControl: true is not supported")
    );
    // What the clusters hold is still reported.
    assert_eq!(st["meshes"].as_array().unwrap().len(), 2);
    assert_eq!(st["rootFingerprint"], R1);
    let sent = world.pass().await;
    assert_eq!(writes(&sent["mgmt"]), vec![w("PUT", LEASE)]);
}

/// Services the selector picks that cannot be federated are named in the member's
/// status with why (a GitOps user sees it with `kubectl get virtualmesh -o yaml`), and
/// a pass that finds the same writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_left_out_of_federation_are_named_in_the_status() {
    let world = World::start(&["east", "west"]).await;
    let east = world.member("east");
    east.put(
        "/api/v1/namespaces/shop/services/legacy-db",
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "legacy-db", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
    );
    east.put(
        "/api/v1/namespaces/shop/services/dns",
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "dns", "namespace": "shop"},
            "spec": {"ports": [{"port": 53, "name": "dns", "protocol": "UDP"}]}}),
    );
    world.pass().await;
    let st = world.status("vm");
    assert_eq!(
        member_status(&st, "east")["federation"]["notFederated"],
        json!(["shop/dns: no TCP port", "shop/legacy-db: ExternalName"])
    );
    assert!(
        member_status(&st, "west")["federation"]
            .get("notFederated")
            .is_none(),
        "{st}"
    );
    let sent = world.pass().await;
    assert_eq!(writes(&sent["mgmt"]), vec![w("PUT", LEASE)]);
    // Fixed (a TCP port given): gone from the status.
    east.edit("/api/v1/namespaces/shop/services/dns", |svc| {
        svc["spec"]["ports"][0]["protocol"] = "TCP".into();
    });
    world.pass().await;
    let st = world.status("vm");
    assert_eq!(
        member_status(&st, "east")["federation"]["notFederated"],
        json!(["shop/legacy-db: ExternalName"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_someone_else_are_left_alone_and_reported() {
    let world = World::start(&["east", "west"]).await;
    let foreign_request = json!({"apiVersion": "meshca.dev/v1alpha1",
        "kind": "VirtualMeshCertificateSigningRequest",
        "metadata": {"name": "east", "namespace": "service-mesh-hub", "generation": 1},
        "spec": {"virtualMesh": {"namespace": "x", "name": "y"}, "mesh": {"namespace": "x", "name": "east"},
                 "signer": {"url": "https://elsewhere:8443"}}});
    world
        .member("east")
        .put(&vmcsr_path("east"), foreign_request.clone());
    let taken = istio_path("serviceentries", "west-app.shop.svc.west.mesh.internal");
    let foreign_entry = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "west-app.shop.svc.west.mesh.internal", "namespace": "istio-system"},
        "spec": {"hosts": ["west-app.shop.svc.west.mesh.internal"]}});
    world.member("east").put(&taken, foreign_entry.clone());
    let sent = world.pass().await;
    let east_writes = writes(&sent["east"]);
    assert!(
        !east_writes
            .iter()
            .any(|(_, p)| *p == vmcsr_path("east") || *p == taken),
        "{east_writes:?}"
    );
    assert_eq!(
        world.member("east").get(&vmcsr_path("east")).unwrap(),
        foreign_request
    );
    assert_eq!(world.member("east").get(&taken).unwrap(), foreign_entry);
    let st = world.status("vm");
    assert_eq!(st["phase"], "Degraded");
    let east = member_status(&st, "east");
    assert_eq!(east["phase"], "Conflict");
    assert!(
        east["message"]
            .as_str()
            .unwrap()
            .contains("service-mesh-hub/east exists and was not created for VirtualMesh smh/vm"),
        "{east}"
    );
    assert_eq!(
        east["federation"]["conflicts"],
        json!(["ServiceEntry istio-system/west-app.shop.svc.west.mesh.internal"])
    );
    assert_eq!(condition(&st, "Federated")["reason"], "Conflict");
    // West is unaffected.
    assert_eq!(member_status(&st, "west")["phase"], "Pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_member_holds_federation_everywhere_until_it_is_back() {
    let world = World::start(&["east", "west"]).await;
    world.pass().await;
    world.report_all(R1, &[R1]);
    world.pass().await;

    // West's API cannot be reached; meanwhile east's Service goes away.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let secret = "/api/v1/namespaces/smh/secrets/west-kubeconfig";
    world.mgmt.put(
        secret,
        secret_object(
            "west",
            &kubeconfig(&format!("http://{closed}"), &token("west")),
        ),
    );
    world
        .member("east")
        .edit("/api/v1/namespaces/shop/services/east-app", |v| {
            *v = json!({"metadata": {"name": "gone", "namespace": "elsewhere"}});
        });
    let sent = world.pass().await;
    assert!(
        writes(&sent["east"]).is_empty(),
        "{:?}",
        writes(&sent["east"])
    );
    let st = world.status("vm");
    assert_eq!(st["phase"], "Degraded");
    let west = member_status(&st, "west");
    assert_eq!(west["phase"], "Error");
    assert!(
        west["message"]
            .as_str()
            .unwrap()
            .contains("list VirtualMeshCertificateSigningRequests"),
        "{west}"
    );
    let federated = condition(&st, "Federated");
    assert_eq!(
        (federated["status"].as_str(), federated["reason"].as_str()),
        (Some("False"), Some("MemberError"))
    );
    assert!(
        federated["message"]
            .as_str()
            .unwrap()
            .contains("cannot read smh/west")
    );
    assert_eq!(condition(&st, "TrustEstablished")["status"], "False");
    assert!(
        world
            .metrics
            .render()
            .contains("meshca_mesh_controller_virtual_mesh_ready{virtual_mesh=\"smh/vm\"} 0")
    );
    assert_eq!(member_status(&st, "east")["phase"], "Installed");
    // What east holds is still what it held.
    assert_eq!(member_status(&st, "east")["federation"]["objects"], 4);
    assert_eq!(
        st["federation"],
        json!({"mode": "PERMISSIVE", "services": 2})
    );

    // Back: the gone service's objects are removed in both clusters.
    world.mgmt.put(
        secret,
        secret_object("west", &world.member("west").kubeconfig(&token("west"))),
    );
    let sent = world.pass().await;
    assert_eq!(
        sorted(writes(&sent["west"])),
        sorted(vec![
            w(
                "DELETE",
                &istio_path("serviceentries", "east-app.shop.svc.east.mesh.internal")
            ),
            // West offers, but no longer receives anything.
            w("DELETE", &istio_path("destinationrules", "vm-federation")),
        ])
    );
    assert_eq!(
        sorted(writes(&sent["east"])),
        sorted(vec![
            w(
                "DELETE",
                &istio_path("serviceentries", "east-app.shop.svc.east.mesh.internal")
            ),
            w("DELETE", &istio_path("gateways", "vm-federation")),
        ])
    );
    assert_eq!(world.status("vm")["phase"], "Ready");
    let metrics = world.metrics.render();
    for needle in [
        "meshca_mesh_controller_virtual_mesh_ready{virtual_mesh=\"smh/vm\"} 1",
        "meshca_mesh_controller_leader 1",
        "meshca_mesh_controller_reconciles_total{outcome=\"error\"} 0",
        concat!(
            "meshca_mesh_controller_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\",revision=\"",
            env!("MESHCA_BUILD_REVISION"),
            "\"} 1\n"
        ),
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }

    // A member that offers services but has no gateway address: federation cannot be
    // computed, so nothing moves anywhere and status says why.
    world.mgmt.edit(&mesh_path("west"), |v| {
        v["spec"]
            .as_object_mut()
            .unwrap()
            .remove("gatewayAddresses");
    });
    let sent = world.pass().await;
    assert!(writes(&sent["east"]).is_empty() && writes(&sent["west"]).is_empty());
    let st = world.status("vm");
    let federated = condition(&st, "Federated");
    assert_eq!(federated["reason"], "TranslationFailed");
    assert_eq!(
        federated["message"],
        "cluster west exports 1 service(s) but has no gatewayAddresses: other clusters could not reach them"
    );
    assert_eq!(st["phase"], "Degraded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_kubeconfig_naming_the_controllers_files_or_a_command_is_refused() {
    let world = World::start(&["east", "west"]).await;
    world.pass().await;
    let dir = tempfile::tempdir().unwrap();
    // What a tokenFile would send: the controller's own ServiceAccount token, in a pod.
    let own_token = dir.path().join("token");
    std::fs::write(&own_token, "controllers-own-token").unwrap();
    let ran = dir.path().join("ran");
    let inline = world.member("west").kubeconfig(&token("west"));
    let secret = "/api/v1/namespaces/smh/secrets/west-kubeconfig";
    let cases = [
        (
            inline.replace(
                &format!("token: {}", token("west")),
                &format!("tokenFile: {}", own_token.display()),
            ),
            "user \"controller\" uses tokenFile",
        ),
        (
            inline.replace(
                &format!("token: {}", token("west")),
                &format!(
                    "exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n      args: [\"-c\", \"touch {} && echo {{}}\"]\n      interactiveMode: Never",
                    ran.display()
                ),
            ),
            "user \"controller\" uses exec",
        ),
        (
            inline.replace(
                "    server:",
                &format!(
                    "    insecure-skip-tls-verify: true\n    certificate-authority: {}\n    server:",
                    own_token.display()
                ),
            ),
            "cluster \"member\" uses certificate-authority; cluster \"member\" sets insecure-skip-tls-verify",
        ),
    ];
    for (kubeconfig, named) in cases {
        assert_ne!(kubeconfig, inline);
        world.mgmt.put(secret, secret_object("west", &kubeconfig));
        let sent = world.pass().await;
        assert!(sent["west"].is_empty(), "{named}: west was called");
        let st = world.status("vm");
        let message = member_status(&st, "west")["message"]
            .as_str()
            .unwrap()
            .to_string();
        // Checked first, and without the message, which would then hold the token.
        assert!(
            !message.contains("controllers-own-token"),
            "{named}: the token is in the status message"
        );
        assert!(
            message.contains(named) && message.contains("must carry its credentials and CA inline"),
            "{message}"
        );
    }
    assert!(!ran.exists(), "the exec plugin ran");
    for requests in world.pass().await.values() {
        assert!(requests.iter().all(|r| {
            !r.authorization
                .as_deref()
                .unwrap_or("")
                .contains("controllers-own-token")
        }));
    }

    // A Secret the Role does not name: RBAC refuses the read, and the status says where
    // to add it.
    world.mgmt.put(secret, secret_object("west", &inline));
    world.mgmt.refuse_reads(Some((
        secret,
        403,
        "Forbidden",
        "secrets \"west-kubeconfig\" is forbidden: User \"system:serviceaccount:smh:meshca-mesh-controller\" cannot get resource \"secrets\"",
    )));
    let sent = world.pass().await;
    assert!(sent["west"].is_empty(), "west was called");
    let st = world.status("vm");
    let message = member_status(&st, "west")["message"].as_str().unwrap();
    assert!(
        message.contains("may not read it")
            && message.contains("add \"west-kubeconfig\" to the resourceNames"),
        "{message}"
    );
    world.mgmt.refuse_reads(None);

    // Inline again: served.
    world.mgmt.put(secret, secret_object("west", &inline));
    let sent = world.pass().await;
    assert!(!sent["west"].is_empty());
    assert_eq!(
        member_status(&world.status("vm"), "west")["message"],
        Value::Null
    );
}

/// The Role as shipped names the example's Secret only (new-remote-cluster-kubeconfig):
/// re-applied over one that named the members' Secrets, as an upgrade does, the API server
/// refuses every other. Each member's status names its Secret and where to add it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_secret_the_shipped_role_does_not_name_is_reported_by_name() {
    let shipped = Policy::bound_to(CONTROLLER, &["deploy/mesh-controller/rbac.yaml"])
        .moved("service-mesh-hub", "smh");
    let world = World::start_with(&["east", "west"], shipped).await;
    for cluster in ["east", "west"] {
        world.mgmt.expect_forbidden(&format!(
            "/api/v1/namespaces/smh/secrets/{cluster}-kubeconfig"
        ));
    }
    let sent = world.pass().await;
    let st = world.status("vm");
    for cluster in ["east", "west"] {
        assert!(sent[cluster].is_empty(), "{cluster} was called");
        let message = member_status(&st, cluster)["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("Secret smh/{cluster}-kubeconfig"))
                && message.contains("is forbidden")
                && message.contains(&format!(
                    "add \"{cluster}-kubeconfig\" to the resourceNames of the secrets rule of its Role"
                )),
            "{message}"
        );
        // The API server's message once, not the client's dump of its whole answer.
        assert!(!message.contains("Status {"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_roots_are_retired_once_every_member_reports_the_new_one() {
    let world = World::start(&["east", "west"]).await;
    world.pass().await;
    world.report_all(R1, &[R1]);
    world.pass().await;

    // The signer's root changed: east moved, west not yet.
    world.report("east", "Installed", R2, &[R2, R1]);
    let sent = world.pass().await;
    assert!(writes(&sent["east"]).is_empty() && writes(&sent["west"]).is_empty());
    let st = world.status("vm");
    assert_eq!(condition(&st, "TrustEstablished")["reason"], "RootsDiffer");
    assert!(st.get("rootFingerprint").is_none());

    // Both moved. A controller that waits a day records when, and retires nothing yet.
    world.report("west", "Installed", R2, &[R2, R1]);
    let patient = controller(
        &world.mgmt,
        Duration::from_secs(86_400),
        MEMBER_API_TIMEOUT,
        Arc::new(MeshControllerMetrics::new()),
    );
    let sent = world.pass_with(&patient).await;
    assert!(writes(&sent["east"]).is_empty() && writes(&sent["west"]).is_empty());
    let st = world.status("vm");
    assert_eq!(st["rootFingerprint"], R2);
    let rotation = &st["rootRotation"];
    assert_eq!(rotation["root"], R2);
    assert!(rotation["convergedAt"].as_str().unwrap() < rotation["retireAt"].as_str().unwrap());
    assert!(st.get("retiredRootFingerprints").is_none());

    // Without the wait: R1 is retired in every member's request.
    let sent = world.pass().await;
    for cluster in ["east", "west"] {
        assert_eq!(
            writes(&sent[cluster]),
            vec![w("PATCH", &vmcsr_path(cluster))]
        );
        let body = &sent[cluster]
            .iter()
            .find(|r| r.method == "PATCH")
            .unwrap()
            .body;
        assert_eq!(
            body["spec"]["rotation"]["retiredRootFingerprints"],
            json!([R1])
        );
    }
    let st = world.status("vm");
    assert_eq!(st["retiredRootFingerprints"], json!([R1]));
    assert!(st.get("rootRotation").is_none());
    assert_eq!(st["rootFingerprint"], R2);

    // The agents drop R1 (for the new generation): nothing more to retire or write.
    world.report_all(R2, &[R2]);
    let sent = world.pass().await;
    assert!(writes(&sent["east"]).is_empty() && writes(&sent["west"]).is_empty());
    assert_eq!(
        member_status(&world.status("vm"), "east")["trustedRootFingerprints"],
        json!([R2])
    );
    let sent = world.pass().await;
    assert_eq!(writes(&sent["mgmt"]), vec![w("PUT", LEASE)]);
}

/// A root rotation held past its retireAt (a member has not acted on its latest request
/// yet) leaves the next pass at the resync. Before, a retireAt in the past made every pass
/// the next second's, reading every member cluster, for as long as the member lagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_held_past_its_retire_time_waits_the_resync() {
    let world = World::start(&["east", "west"]).await;
    world.pass().await;
    world.report_all(R1, &[R1]);
    world.pass().await;
    world.report_all(R2, &[R2, R1]);
    let patient = controller(
        &world.mgmt,
        Duration::from_secs(86_400),
        MEMBER_API_TIMEOUT,
        Arc::new(MeshControllerMetrics::new()),
    );
    patient.run_once().await.unwrap();
    assert_eq!(world.status("vm")["rootRotation"]["root"], R2);
    world.mgmt.edit(&vm_path("vm"), |vm| {
        vm["status"]["rootRotation"]["retireAt"] = "2020-01-01T00:00:00Z".into();
    });
    world.member("west").edit(&vmcsr_path("west"), |request| {
        request["status"]["observedGeneration"] = 0.into();
    });
    let next = patient.run_once().await.unwrap();
    assert_eq!(next, Duration::from_secs(30));
    let st = world.status("vm");
    assert_eq!(
        st["rootRotation"]["retireAt"], "2020-01-01T00:00:00Z",
        "{st}"
    );
    assert!(st.get("retiredRootFingerprints").is_none(), "{st}");
}

/// The roots each member's request was told to retire in a pass's writes.
fn retired_in(sent: &[Recorded]) -> Vec<Value> {
    sent.iter()
        .filter(|r| r.method == "PATCH" && r.path.contains("virtualmeshcertificatesigningrequests"))
        .map(|r| r.body["spec"]["rotation"]["retiredRootFingerprints"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_root_is_never_retired_and_its_trust_is_reported() {
    let world = World::start(&["east", "west"]).await;
    world.pass().await;
    world.report_all(R1, &[R1]);
    world.pass().await;

    // The signer announces R2 as its next root: every agent adds it (on R1 still). With no
    // wait before retirement, pass after pass, R2 is never retired and no rotation starts.
    for cluster in ["east", "west"] {
        world.report_next(cluster, R1, &[R1, R2], R2);
    }
    for pass in 0..3 {
        let sent = world.pass().await;
        for cluster in ["east", "west"] {
            for retired in retired_in(&sent[cluster]) {
                assert!(
                    !retired.as_array().into_iter().flatten().any(|fp| fp == R2),
                    "pass {pass}: {cluster} told to retire {retired}"
                );
            }
            assert!(writes(&sent[cluster]).is_empty(), "pass {pass}: {cluster}");
        }
        let st = world.status("vm");
        assert_eq!(st["rootFingerprint"], R1);
        assert_eq!(st["nextRootFingerprint"], R2);
        assert!(st.get("rootRotation").is_none(), "{st}");
        assert!(st.get("retiredRootFingerprints").is_none(), "{st}");
        let trusted = condition(&st, "NextRootTrusted");
        assert_eq!(
            (&trusted["status"], &trusted["reason"]),
            (&json!("True"), &json!("AllMembers"))
        );
        assert_eq!(trusted["observedGeneration"], 1);
        // Preparing a root change is not a degradation.
        assert_eq!(st["phase"], "Ready");
        assert_eq!(condition(&st, "Ready")["status"], "True");
        assert_eq!(member_status(&st, "west")["nextRootFingerprint"], R2);
        if pass > 0 {
            // Nothing changed: only the Lease is written.
            assert_eq!(writes(&sent["mgmt"]), vec![w("PUT", LEASE)]);
        }
    }

    // West's root-cert.pem loses R2: the condition names it, and R2 is still not retired.
    world.report_next("west", R1, &[R1], R2);
    let sent = world.pass().await;
    assert!(writes(&sent["east"]).is_empty() && writes(&sent["west"]).is_empty());
    let st = world.status("vm");
    let trusted = condition(&st, "NextRootTrusted");
    assert_eq!(
        (&trusted["status"], &trusted["reason"]),
        (&json!("False"), &json!("Pending"))
    );
    let message = trusted["message"].as_str().unwrap();
    assert!(message.contains("not yet trusted by smh/west"), "{message}");
    assert!(!message.contains("smh/east"), "{message}");
    assert_eq!(st["nextRootFingerprint"], R2);
    assert_eq!(st["phase"], "Ready");

    // The agents report no next root any more: the condition goes.
    world.report_all(R1, &[R1]);
    world.pass().await;
    let st = world.status("vm");
    assert!(
        st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["type"] != "NextRootTrusted"),
        "{st}"
    );
    assert!(st.get("nextRootFingerprint").is_none(), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_api_server_that_never_answers_fails_its_member_not_the_pass() {
    let world = World::start(&["east", "west"]).await;
    world.pass().await;
    // West's API server takes connections (the kernel does, for a listener nobody
    // serves) and never answers: a load balancer with no backend, a hung apiserver.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", silent.local_addr().unwrap());
    world.mgmt.put(
        "/api/v1/namespaces/smh/secrets/west-kubeconfig",
        secret_object("west", &kubeconfig(&address, &token("west"))),
    );
    let pass = tokio::time::timeout(Duration::from_secs(120), world.pass()).await;
    let sent = pass.expect("the pass waited for west for two minutes");
    assert!(!sent["east"].is_empty(), "east was not reconciled");
    let st = world.status("vm");
    let west = member_status(&st, "west");
    let message = west["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("timed out") || message.contains("timeout"),
        "{west}"
    );
    drop(silent);
}

/// When a member's kubeconfig credential ends is exported: a token that is a JWT with an
/// `exp` (as `kubectl create token` makes) gives it; one that says none (east's token is
/// not a JWT) gives no series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_members_kubeconfig_credential_ends_is_exported() {
    let world = World::start(&["east", "west"]).await;
    let b64 = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let exp = 1_900_000_000u64;
    let jwt = format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(r#"{"alg":"RS256","kid":"k"}"#),
        b64(&format!(
            r#"{{"aud":["https://kubernetes.default.svc"],"exp":{exp},"sub":"system:serviceaccount:istio-system:meshca"}}"#
        ))
    );
    let url = world.member("west").url();
    world.mgmt.put(
        "/api/v1/namespaces/smh/secrets/west-kubeconfig",
        secret_object("west", &kubeconfig(&url, &jwt)),
    );
    world.pass().await;
    let metrics = world.metrics.render();
    assert!(
        metrics.contains(&format!(
            "meshca_mesh_controller_member_credential_expiration_timestamp_seconds{{mesh=\"smh/west\"}} {exp}\n"
        )),
        "{metrics}"
    );
    assert!(!metrics.contains("{mesh=\"smh/east\"}"), "{metrics}");
    // The token itself is in no series.
    assert!(!metrics.contains("c2lnbmF0dXJl"), "{metrics}");
}

/// A member API server answering 503 (a load balancer with no healthy backend, an API
/// server mid-upgrade) is asked once per pass: its member fails, and the pass goes on to
/// the others at once, instead of retrying inside the Kubernetes client for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_api_server_answering_503_is_asked_once_and_fails_its_member_only() {
    let world = World::start(&["west", "east"]).await;
    let sent = world.pass().await;
    let first_read = sent["west"]
        .iter()
        .find(|r| r.method == "GET")
        .map(|r| r.path.clone())
        .expect("west was read");
    world.member("west").refuse_reads(Some((
        &first_read,
        503,
        "ServiceUnavailable",
        "no healthy upstream",
    )));
    let sent = world.pass().await;
    let asked = sent["west"]
        .iter()
        .filter(|r| r.method == "GET" && r.path == first_read)
        .count();
    assert_eq!(asked, 1, "{first_read} asked again");
    assert!(!sent["east"].is_empty(), "east was not reconciled");
    let west = member_status(&world.status("vm"), "west").clone();
    assert!(
        west["message"].as_str().unwrap_or_default().contains("503"),
        "{west}"
    );
}

/// A member whose Istio objects or Services cannot be read still gets its request (and so
/// its intermediate): only federation waits. A cluster without Istio's CRDs yet (Istio's
/// plug-in CA has cacerts made before Istio is installed) lists its Istio kinds 404, which
/// is nothing of ours there. Before, either failed the member: no request, no intermediate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_federation_reads_fail_still_gets_its_request() {
    let world = World::start(&["east", "west"]).await;
    world.member("west").refuse_reads(Some((
        "/apis/networking.istio.io/v1/namespaces/istio-system/serviceentries",
        404,
        "NotFound",
        "the server could not find the requested resource",
    )));
    world.member("east").refuse_reads(Some((
        "/api/v1/services",
        403,
        "Forbidden",
        "services is forbidden: cannot list resource \"services\"",
    )));
    world.pass().await;
    for cluster in ["east", "west"] {
        assert!(
            world.member(cluster).get(&vmcsr_path(cluster)).is_some(),
            "{cluster} got no request"
        );
    }
    let st = world.status("vm");
    let federated = condition(&st, "Federated");
    assert_eq!(federated["reason"], "MemberError", "{st}");
    let message = federated["message"].as_str().unwrap();
    assert!(
        message.contains("cannot read smh/east") && message.contains("list Services"),
        "{message}"
    );
    // East's own status names it; west's missing Istio kinds are no problem.
    let east = member_status(&st, "east");
    assert!(
        east["message"].as_str().unwrap().contains("list Services"),
        "{east}"
    );
    assert!(!message.contains("smh/west"), "{message}");
    assert!(member_status(&st, "west")["message"].is_null(), "{st}");

    // East's Services readable again: federation goes on, into west too.
    world.member("east").refuse_reads(None);
    world.pass().await;
    let st = world.status("vm");
    assert_eq!(condition(&st, "Federated")["status"], "True", "{st}");
}

/// Points `cluster`'s kubeconfig at an API server that takes the request and never answers,
/// then runs one pass of a controller that would wait a minute for it, while `other` is
/// cleaned. Whether `other` was clean (no `/apis/` object left) while `cluster`'s request
/// still waited; once it is, or once the controller gives up, the hung server hangs up.
async fn clean_while_one_member_hangs(world: &World, cluster: &str, other: &str) -> bool {
    use tokio::io::AsyncReadExt as _;
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", hung.local_addr().unwrap());
    world.mgmt.put(
        &format!("/api/v1/namespaces/smh/secrets/{cluster}-kubeconfig"),
        secret_object(cluster, &kubeconfig(&address, &token(cluster))),
    );
    let controller = controller(
        &world.mgmt,
        Duration::ZERO,
        Duration::from_secs(60),
        Arc::new(MeshControllerMetrics::new()),
    );
    let hold = async move {
        let (mut connection, _) = hung.accept().await.unwrap();
        let mut request = [0u8; 4096];
        loop {
            tokio::select! {
                read = connection.read(&mut request) => {
                    // The controller hung up first: it gave up on the request.
                    if read.unwrap_or(0) == 0 {
                        return false;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    if world.member(other).paths("/apis/").is_empty() {
                        return true;
                    }
                }
            }
        }
    };
    // Only a guard against hanging.
    let (_, other_clean_while_waiting) = tokio::time::timeout(
        Duration::from_secs(300),
        futures::future::join(world.pass_with(&controller), hold),
    )
    .await
    .expect("the pass never ended");
    other_clean_while_waiting
}

/// Former members are cleaned several at once: one whose API server hangs does not hold
/// the others' cleanup for its timeout, when leaving the VirtualMesh and when it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_former_member_does_not_hold_the_others_cleanup() {
    let world = World::start(&["east", "north", "west"]).await;
    world.pass().await;
    world.report_all(R1, &[R1]);
    world.pass().await;
    world.mgmt.edit(&vm_path("vm"), |v| {
        v["spec"] = vm_spec(&["north"]);
        v["metadata"]["generation"] = 2.into();
    });
    // East comes first in the status, so one at a time it would be first, and alone.
    assert!(
        clean_while_one_member_hangs(&world, "east", "west").await,
        "west was cleaned only after the controller gave up on east"
    );
    let st = world.status("vm");
    let east = member_status(&st, "east");
    assert_eq!(east["phase"], "Removing", "{st}");
    assert!(world.member("west").get(&vmcsr_path("west")).is_none());

    // Deleted: north is cleaned while east still hangs.
    world.mgmt.edit(&vm_path("vm"), |v| {
        v["metadata"]["deletionTimestamp"] = "2024-02-01T00:00:00Z".into();
    });
    assert!(
        clean_while_one_member_hangs(&world, "east", "north").await,
        "north was cleaned only after the controller gave up on east"
    );
    let st = world.status("vm");
    assert_eq!(st["phase"], "Deleting");
    let left: Vec<&str> = st["meshes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["east"], "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_virtual_mesh_cleans_every_cluster_before_it_goes() {
    let world = World::start(&["east", "west"]).await;
    world.pass().await;
    world.report_all(R1, &[R1]);
    world.pass().await;

    // Deleted, with another controller's finalizer too; west cannot be reached at first.
    world.mgmt.edit(&vm_path("vm"), |v| {
        v["metadata"]["deletionTimestamp"] = "2024-02-01T00:00:00Z".into();
        v["metadata"]["finalizers"] = json!(["example.com/keep", FINALIZER]);
    });
    let secret = "/api/v1/namespaces/smh/secrets/west-kubeconfig";
    world.mgmt.put(
        secret,
        secret_object("west", &kubeconfig("http://127.0.0.1:1", &token("west"))),
    );
    let sent = world.pass().await;
    assert!(
        world.member("east").paths("/apis/").is_empty(),
        "east is clean"
    );
    assert_eq!(
        writes(&sent["east"]).len(),
        5,
        "the request and four objects: {:?}",
        writes(&sent["east"])
    );
    let vm = world.mgmt.get(&vm_path("vm")).unwrap();
    assert_eq!(
        vm["metadata"]["finalizers"],
        json!(["example.com/keep", FINALIZER])
    );
    let st = &vm["status"];
    assert_eq!(st["phase"], "Deleting");
    let left = st["meshes"].as_array().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["name"], "west");
    assert_eq!(left[0]["phase"], "Removing");
    assert!(
        condition(st, "Ready")["message"]
            .as_str()
            .unwrap()
            .contains("smh/west (Removing")
    );

    world.mgmt.put(
        secret,
        secret_object("west", &world.member("west").kubeconfig(&token("west"))),
    );
    let sent = world.pass().await;
    assert_eq!(writes(&sent["west"]).len(), 5);
    assert!(
        world.member("west").paths("/apis/").is_empty(),
        "west is clean"
    );
    let release = sent["mgmt"]
        .iter()
        .find(|r| r.method == "PATCH" && r.path == vm_path("vm"))
        .expect("finalizer removed");
    assert_apply(release);
    assert!(release.body["metadata"].get("finalizers").is_none());
    // Only meshca's finalizer went; the Meshes are released too.
    let vm = world.mgmt.get(&vm_path("vm")).unwrap();
    assert_eq!(vm["metadata"]["finalizers"], json!(["example.com/keep"]));
    // Cleaned up: no readiness reported for it any more.
    let metrics = world.metrics.render();
    assert!(!metrics.contains("smh/vm"), "{metrics}");
    for mesh in ["east", "west"] {
        assert_eq!(
            world.mgmt.get(&mesh_path(mesh)).unwrap()["metadata"]["finalizers"],
            json!([])
        );
    }
    // From the first pass to the cleanup, every grant of deploy/mesh-controller's RBAC
    // was used, in the management cluster and in each member (and, as in every test,
    // nothing else).
    world.mgmt.assert_every_grant_used(&[]);
    for member in world.members.values() {
        member.assert_every_grant_used(&[]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reads_the_lease_and_nothing_else() {
    let world = World::start(&["east", "west"]).await;
    let now = meshca::signer::audit::rfc3339(std::time::SystemTime::now());
    world.mgmt.put(
        LEASE,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "meshca-mesh-controller", "namespace": "smh", "resourceVersion": "7"},
            "spec": {"holderIdentity": "controller-1", "leaseDurationSeconds": 30, "renewTime": now}}),
    );
    let sent = world.pass().await;
    let mgmt: Vec<(String, String)> = sent["mgmt"]
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    assert_eq!(mgmt, vec![w("GET", LEASE)]);
    assert!(sent["east"].is_empty() && sent["west"].is_empty());
    let metrics = world.metrics.render();
    assert!(
        metrics.contains("meshca_mesh_controller_leader 0"),
        "{metrics}"
    );
    assert!(!metrics.contains("virtual_mesh_ready{"), "{metrics}");
    assert!(
        metrics.contains("meshca_mesh_controller_last_pass_timestamp_seconds 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshca_mesh_controller_resync_seconds 30"),
        "{metrics}"
    );
}

/// `meshca mesh-controller --once` while another replica holds the Lease writes nothing
/// and exits 3 (not the leader), not 1: a Job or a script tells it from a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_once_pass_while_another_replica_leads_exits_3_and_writes_nothing() {
    let world = World::start(&["east"]).await;
    let now = meshca::signer::audit::rfc3339(std::time::SystemTime::now());
    world.mgmt.put(
        LEASE,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "meshca-mesh-controller", "namespace": "smh",
                         "resourceVersion": "7"},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 30,
                     "renewTime": now}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, world.mgmt.kubeconfig("once-token")).unwrap();
    world.mgmt.take();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args(["mesh-controller", "--once", "--namespace", "smh"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("POD_NAME")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("another replica holds the Lease"),
        "{stderr}"
    );
    let sent = world.mgmt.take();
    assert!(
        sent.iter().all(|r| r.method == "GET"),
        "{:?}",
        writes(&sent)
    );
}

/// Services `shop/svc-0000` … in `member`, `n` of them.
fn put_services(member: &FakeCluster, n: usize) {
    for i in 0..n {
        let (path, svc) = service("shop", &format!("svc-{i:04}"));
        member.put(&path, svc);
    }
}

/// The ServiceEntries in `member` for Services of `cluster`.
fn imported_from(member: &FakeCluster, cluster: &str) -> usize {
    member
        .paths(&istio_path("serviceentries", ""))
        .iter()
        .filter(|p| p.ends_with(&format!(".svc.{cluster}.mesh.internal")))
        .count()
}

/// The list requests in `sent` of `path`: (limit, continue).
fn lists_of(sent: &[Recorded], path: &str) -> Vec<(Option<String>, Option<String>)> {
    sent.iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .map(|r| (r.param("limit"), r.param("continue")))
        .collect()
}

/// Every list is read in pages of 500 (kubectl's), following `metadata.continue`: a member
/// with more Services than one page has all of them federated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_more_services_than_a_list_page_is_fully_federated() {
    let world = World::start(&["east", "west"]).await;
    // With east-app and the three never federated: 1,104 Services, three pages.
    put_services(world.member("east"), 1_100);
    let sent = world.pass().await;
    let pages = lists_of(&sent["east"], "/api/v1/services");
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert_eq!(pages[0], (Some("500".into()), None));
    assert!(
        pages[1..]
            .iter()
            .all(|(limit, token)| limit.as_deref() == Some("500") && token.is_some()),
        "{pages:?}"
    );
    // Every list, in every cluster, is paged.
    for (cluster, requests) in &sent {
        let collections = [
            "virtualmeshes",
            "meshes",
            "virtualmeshcertificatesigningrequests",
            "services",
            "serviceentries",
            "gateways",
            "destinationrules",
        ];
        let lists: Vec<&Recorded> = requests
            .iter()
            .filter(|r| r.method == "GET")
            .filter(|r| collections.contains(&r.path.rsplit('/').next().unwrap()))
            .collect();
        assert!(!lists.is_empty(), "{cluster}");
        for r in lists {
            assert_eq!(r.param("limit").as_deref(), Some("500"), "{cluster}: {r:?}");
        }
    }
    assert_eq!(imported_from(world.member("west"), "east"), 1_101);
    let st = world.status("vm");
    assert_eq!(
        member_status(&st, "east")["federation"]["exported"],
        1_101,
        "{st}"
    );
}

/// A continue token the API server no longer honours (410 Expired) starts the list again
/// from the beginning, once; expiring again fails the member's read with a clear message,
/// and federation is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_continue_token_starts_the_list_again_once() {
    let world = World::start(&["east", "west"]).await;
    put_services(world.member("east"), 600);
    world.member("east").expire_continue_tokens(1);
    let sent = world.pass().await;
    let pages = lists_of(&sent["east"], "/api/v1/services");
    let tokens: Vec<bool> = pages.iter().map(|(_, token)| token.is_some()).collect();
    // The second page expired: the list started over.
    assert_eq!(tokens, vec![false, true, false, true], "{pages:?}");
    assert_eq!(imported_from(world.member("west"), "east"), 601);
    let st = world.status("vm");
    assert_eq!(
        member_status(&st, "east")["federation"]["exported"],
        601,
        "{st}"
    );

    // Expiring again after the restart: the member is not read, nothing moves.
    world.member("east").expire_continue_tokens(2);
    let sent = world.pass().await;
    let tokens: Vec<bool> = lists_of(&sent["east"], "/api/v1/services")
        .iter()
        .map(|(_, token)| token.is_some())
        .collect();
    assert_eq!(tokens, vec![false, true, false, true]);
    assert!(
        writes(&sent["west"]).is_empty(),
        "{:?}",
        writes(&sent["west"])
    );
    let st = world.status("vm");
    let east = member_status(&st, "east");
    assert_eq!(east["phase"], "Error", "{st}");
    let message = east["message"].as_str().unwrap();
    assert!(
        message.contains("list Services in all namespaces")
            && message.contains("continue token expired again"),
        "{message}"
    );
    assert_eq!(condition(&st, "Federated")["reason"], "MemberError");
    assert_eq!(imported_from(world.member("west"), "east"), 601);
}

/// A member whose lists never end (each page with a continue token: the one it was given,
/// or a new one each time) fails its own step, named, instead of holding the pass and
/// its memory for ever; the other member is still read, and the member reads again once
/// its lists end.
#[tokio::test]
async fn a_list_that_never_ends_fails_the_member_not_the_pass() {
    let world = World::start(&["east", "west"]).await;
    put_services(world.member("east"), 3);
    for (same, says) in [
        (true, "the list does not advance"),
        (false, "still not at its end after 1000 pages of 500"),
    ] {
        world.member("east").endless_lists(Some(same));
        let sent = world.pass().await;
        // The first list it reads (its agent's requests) is given up, within the bound.
        assert!(
            sent["east"].len() <= MAX_LIST_PAGES + 2,
            "{}",
            sent["east"].len()
        );
        let st = world.status("vm");
        let east = member_status(&st, "east");
        assert_eq!(east["phase"], "Error", "{st}");
        let message = east["message"].as_str().unwrap();
        assert!(
            message.contains(says) && message.contains("the list was given up"),
            "{message}"
        );
        assert_ne!(member_status(&st, "west")["phase"], "Error", "{st}");
    }
    world.member("east").endless_lists(None);
    world.pass().await;
    let st = world.status("vm");
    assert_ne!(member_status(&st, "east")["phase"], "Error", "{st}");
}

/// A member whose API server answers a list with a body that never ends (each read gets
/// data, so no timeout ends it) fails its own step, named, once the answer passes
/// MAX_API_ANSWER, instead of growing the controller's memory until it is killed; the
/// other member is still read, and the member reads again once its answers end.
#[tokio::test]
async fn an_answer_that_never_ends_fails_the_member_not_the_pass() {
    let world = World::start(&["east", "west"]).await;
    put_services(world.member("east"), 3);
    world.member("east").endless_answers(true);
    world.pass().await;
    let st = world.status("vm");
    let east = member_status(&st, "east");
    assert_eq!(east["phase"], "Error", "{st}");
    let message = east["message"].as_str().unwrap();
    assert!(
        message.contains("answer is larger than 64 MiB; meshca reads no more of it"),
        "{message}"
    );
    assert_ne!(member_status(&st, "west")["phase"], "Error", "{st}");
    world.member("east").endless_answers(false);
    world.pass().await;
    let st = world.status("vm");
    assert_ne!(member_status(&st, "east")["phase"], "Error", "{st}");
}

/// A member whose API server answers the Services list with the same large page again and
/// again, each with a new continue token, fails its own step once the list holds more
/// than MAX_LIST_BYTES, not after MAX_LIST_PAGES pages (a thousand answers just under
/// MAX_API_ANSWER would be 64 GiB); the other member is still read.
#[tokio::test]
async fn a_list_that_never_runs_dry_is_given_up_by_its_size() {
    let world = World::start(&["east", "west"]).await;
    let east = world.member("east");
    // 60 Services of about 1 MiB each: a page of just under 64 MiB.
    put_services(east, 60);
    let padding = "x".repeat(1024 * 1024 - 4096);
    for path in east.paths("/api/v1/namespaces/shop/services/") {
        east.edit(&path, |svc| {
            svc["metadata"]["annotations"]["padding"] = padding.clone().into();
        });
    }
    east.repeated_pages(Some("services"));
    let sent = world.pass().await;
    let pages = sent["east"]
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/services"))
        .count();
    assert!((5..=6).contains(&pages), "{pages} pages read");
    let st = world.status("vm");
    let message = member_status(&st, "east")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&format!("it held more than 256 MiB after {pages} pages"))
            && message.contains("the list was given up"),
        "{message}"
    );
    assert_ne!(member_status(&st, "west")["phase"], "Error", "{st}");
    east.repeated_pages(None);
}

/// A member's federation objects are written several at once, never more than
/// WRITES_IN_FLIGHT: the fake lets west's ServiceEntry applies go in batches of that many,
/// each once all of it has arrived, so one-at-a-time writes never get there (and fail the
/// count below), and more at once are counted while a batch waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_objects_are_written_several_at_once_within_the_bound() {
    let world = World::start(&["east", "west"]).await;
    put_services(world.member("east"), 60);
    let west = world.member("west");
    // East's 60 and east-app.
    west.hold_writes(&istio_path("serviceentries", ""), WRITES_IN_FLIGHT, 61);
    world.pass().await;
    let most = west.max_in_flight();
    assert!(
        most > 1 && most <= WRITES_IN_FLIGHT,
        "{most} requests in flight at once in west"
    );
    assert_eq!(imported_from(west, "east"), 61);
    let st = world.status("vm");
    assert_eq!(member_status(&st, "west")["phase"], "Pending", "{st}");
    assert!(member_status(&st, "west").get("message").is_none(), "{st}");
}

/// A write refused among many in flight is still the member's problem, by name, and the
/// others are tried again at the next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_among_many_is_the_members_problem() {
    let world = World::start(&["east", "west"]).await;
    put_services(world.member("east"), 60);
    let west = world.member("west");
    let refused = istio_path("serviceentries", "svc-0030.shop.svc.east.mesh.internal");
    west.refuse_writes(&refused, 422, "Invalid", "denied by the admission webhook");
    world.pass().await;
    let st = world.status("vm");
    let member = member_status(&st, "west");
    assert_eq!(member["phase"], "Error", "{st}");
    let message = member["message"].as_str().unwrap();
    assert!(
        message.contains("svc-0030.shop.svc.east.mesh.internal")
            && message.contains("denied by the admission webhook"),
        "{message}"
    );
    assert!(west.get(&refused).is_none());
    west.accept_writes();
    world.pass().await;
    assert_eq!(imported_from(west, "east"), 61);
    assert_eq!(
        member_status(&world.status("vm"), "west")["phase"],
        "Pending"
    );

    // A member whose request name someone else holds: a refused federation write there is
    // said beside the conflict, and federation is not reported applied.
    world.member("west").edit(&vmcsr_path("west"), |request| {
        request["metadata"]["labels"] = json!({});
    });
    west.refuse_writes(&refused, 422, "Invalid", "denied by the admission webhook");
    west.remove(&refused);
    world.pass().await;
    let st = world.status("vm");
    let member = member_status(&st, "west");
    let message = member["message"].as_str().unwrap();
    assert!(
        message.contains("and its federation objects were not all written")
            && message.contains("denied by the admission webhook"),
        "{message}"
    );
    assert_eq!(condition(&st, "Federated")["status"], "False", "{st}");
}
