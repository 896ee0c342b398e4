//! The cluster agent against the shared HTTP fake of the Kubernetes API (`kubefake`),
//! serving exactly the endpoints the agent uses (Secret get, create and apply, Deployment
//! list and patch, ConfigMap get, request list and status, Lease), with a real signer and
//! SoftHSM root behind it. The tests assert the requests the agent sends: methods, paths,
//! field manager, content types and patch bodies.

mod common;
mod kubefake;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde_json::{Value, json};

use common::certs::openssl_self_signed_ca;
use common::*;
use kubefake::{FakeCluster, Policy, Recorded, merge, secret_differences, writes};
use meshca::agent::controller::{Controller, ControllerOptions};
use meshca::agent::election::{Elector, LeaderLoop};
use meshca::agent::k8s::{DEFAULT_API_TIMEOUT, Kube};
use meshca::agent::metrics::{AgentMetrics, Exposition};
use meshca::pki::bundle::{BundleFiles, verify_bundle};

const NS: &str = "service-mesh-hub";
const VMCSR: &str =
    "/apis/meshca.dev/v1alpha1/namespaces/service-mesh-hub/virtualmeshcertificatesigningrequests";
const SECRET: &str = "/api/v1/namespaces/istio-system/secrets/cacerts";
/// Where the cacerts Secret is created (a POST to the collection).
const SECRETS: &str = "/api/v1/namespaces/istio-system/secrets";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/service-mesh-hub/leases/meshca-agent";

/// What deploy/agent grants the agent's ServiceAccount, with the Role of
/// workload-namespace-rbac.yaml copied into `shop`, the workload namespace of the tests'
/// requests (as that file says to do for each one).
fn agent_policy() -> Policy {
    let agent = ("service-mesh-hub", "meshca-agent");
    Policy::bound_to(agent, &["deploy/agent/rbac.yaml"]).and(
        Policy::bound_to(agent, &["deploy/agent/workload-namespace-rbac.yaml"])
            .moved("bookinfo", "shop"),
    )
}

struct Cluster {
    fake: FakeCluster,
    controller: Controller,
    metrics: Arc<AgentMetrics>,
}

impl Cluster {
    async fn start(env: &Env) -> Cluster {
        Cluster::start_with_lease(env, Duration::from_secs(30)).await
    }

    async fn start_with_lease(env: &Env, lease_duration: Duration) -> Cluster {
        Cluster::start_with(env, lease_duration, agent_policy()).await
    }

    /// An agent whose ServiceAccount `policy` grants.
    async fn start_with(env: &Env, lease_duration: Duration, policy: Policy) -> Cluster {
        let fake = FakeCluster::start(policy).await;
        let metrics = Arc::new(AgentMetrics::new());
        let controller = Controller::new(
            Kube::new(fake.client()),
            ControllerOptions {
                namespace: NS.into(),
                identity: "agent-0".into(),
                lease_name: "meshca-agent".into(),
                lease_duration,
                resync: Duration::from_secs(60),
                ca_cert: env.path("pki/ca.pem"),
                client_cert: env.path("pki/cluster-a.pem"),
                client_key: env.path("pki/cluster-a.key"),
            },
            metrics.clone(),
        );
        Cluster {
            fake,
            controller,
            metrics,
        }
    }

    fn put(&self, path: &str, obj: Value) {
        self.fake.put(path, obj);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.fake.get(path)
    }

    /// The request `cluster-a` for the signer at `signer_addr`, `extra_spec` merged in.
    /// `meshca agent` as a long-running replica `agent-0` of this cluster (JSON logs on a
    /// piped stderr, cluster-a's client certificate), with `extra` flags.
    fn agent_daemon(&self, env: &Env, extra: &[&str]) -> std::process::Command {
        let kubeconfig = env.path("kubeconfig");
        std::fs::write(&kubeconfig, self.fake.kubeconfig("agent-token")).unwrap();
        let mut agent = env.meshca();
        agent
            .args(["--log-format", "json", "agent", "--identity", "agent-0"])
            .args(extra)
            .args([
                "--ca-cert",
                "pki/ca.pem",
                "--client-cert",
                "pki/cluster-a.pem",
            ])
            .args(["--client-key", "pki/cluster-a.key"])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        agent
    }

    /// `meshca agent --once` as replica `identity` of this cluster (cluster-a's client
    /// certificate, no POD_NAME), with `extra` flags.
    fn agent_once(&self, env: &Env, identity: &str, extra: &[&str]) -> std::process::Command {
        let kubeconfig = env.path("kubeconfig");
        std::fs::write(&kubeconfig, self.fake.kubeconfig("once-token")).unwrap();
        let mut agent = env.meshca();
        agent
            .args(["agent", "--once", "--identity", identity])
            .args(extra)
            .args([
                "--ca-cert",
                "pki/ca.pem",
                "--client-cert",
                "pki/cluster-a.pem",
            ])
            .args(["--client-key", "pki/cluster-a.key"])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("POD_NAME");
        agent
    }

    fn put_request(&self, signer_addr: &str, extra_spec: Value) {
        self.put(
            &format!("{VMCSR}/cluster-a"),
            request_object(signer_addr, extra_spec),
        );
    }

    /// The request `cluster-a` for `signer`, with restarts off (tests of what is installed
    /// and reported, not of restarts).
    fn put_request_restarting_nothing(&self, signer: &Signer) {
        self.put_request(
            &signer.addr.to_string(),
            json!({"restart": {"policy": "never"}}),
        );
    }

    /// Changes the request as its owner would (a changed spec is a new generation, as
    /// the API server counts them).
    fn edit_request(&self, change: impl FnOnce(&mut Value)) {
        self.fake.edit(&format!("{VMCSR}/cluster-a"), |request| {
            let spec = request["spec"].clone();
            change(request);
            if request["spec"] != spec {
                let generation = request["metadata"]["generation"].as_i64().unwrap_or(1);
                request["metadata"]["generation"] = (generation + 1).into();
            }
        });
    }

    /// istiod and the ingress gateway, as an Istio install has them in istio-system.
    fn put_istiod_and_gateway(&self) {
        self.put_deployment("istio-system", "istiod", json!({"app": "istiod"}));
        self.put_deployment(
            "istio-system",
            "istio-ingressgateway",
            json!({"istio": "ingressgateway"}),
        );
    }

    fn put_deployment(&self, ns: &str, name: &str, labels: Value) {
        self.put_workload("Deployment", ns, name, labels);
    }

    fn put_workload(&self, kind: &str, ns: &str, name: &str, labels: Value) {
        self.put(
            &workload_path(kind, ns, name),
            workload(kind, ns, name, labels),
        );
    }

    /// One pass of the agent; returns the requests it sent, but for dry runs (each
    /// issuance's check that the Secret would take the apply: see
    /// [`Cluster::pass_with_dry_runs`]).
    async fn pass(&self) -> Vec<Recorded> {
        self.pass_with_dry_runs()
            .await
            .into_iter()
            .filter(|r| r.param("dryRun").is_none())
            .collect()
    }

    /// One pass of the agent; returns every request it sent.
    async fn pass_with_dry_runs(&self) -> Vec<Recorded> {
        self.fake.take();
        self.controller.run_once().await.unwrap();
        self.fake.take()
    }
}

fn request_object(signer_addr: &str, extra_spec: Value) -> Value {
    let mut spec = json!({
        "virtualMesh": {"namespace": "test", "name": "vm"},
        "mesh": {"namespace": "test", "name": "cluster-a"},
        "signer": {"url": format!("https://{signer_addr}")},
        "ttlSeconds": 3600,
        "restart": {"workloadNamespaces": ["shop"]}
    });
    merge(&mut spec, &extra_spec);
    json!({
        "apiVersion": "meshca.dev/v1alpha1",
        "kind": "VirtualMeshCertificateSigningRequest",
        "metadata": {"name": "cluster-a", "namespace": NS, "generation": 1, "resourceVersion": "1"},
        "spec": spec
    })
}

/// A workload as its controller leaves it: rolled out.
fn workload(kind: &str, ns: &str, name: &str, labels: Value) -> Value {
    let mut workload = json!({
        "apiVersion": "apps/v1", "kind": kind,
        "metadata": {"name": name, "namespace": ns, "labels": labels, "generation": 1},
        "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}}}
    });
    if kind == "Deployment" {
        kubefake::roll_out(&mut workload);
    }
    workload
}

/// The path of a Deployment, StatefulSet or DaemonSet.
fn workload_path(kind: &str, ns: &str, name: &str) -> String {
    let plural = format!("{}s", kind.to_lowercase());
    format!("/apis/apps/v1/namespaces/{ns}/{plural}/{name}")
}

fn deployments_path(ns: &str, name: &str) -> String {
    workload_path("Deployment", ns, name)
}

fn configmap(ns: &str, root_pem: &str) -> (String, Value) {
    (
        format!("/api/v1/namespaces/{ns}/configmaps/istio-ca-root-cert"),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": ns},
            "data": {"root-cert.pem": root_pem}}),
    )
}

/// Asserts the cacerts Secret is still `expected`. Not assert_eq!: the Secret's data holds
/// ca-key.pem, so a failure names what differs, never the values.
fn assert_secret_is(cluster: &Cluster, expected: &Value) {
    let actual = cluster.get(SECRET).unwrap_or(Value::Null);
    assert!(
        &actual == expected,
        "the Secret changed: {:?}",
        secret_differences(&actual, expected)
    );
}

fn secret_files(secret: &Value) -> BundleFiles {
    let get = |k: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(secret["data"][k].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    BundleFiles {
        ca_cert: get("ca-cert.pem"),
        ca_key: get("ca-key.pem"),
        cert_chain: get("cert-chain.pem"),
        root_cert: get("root-cert.pem"),
    }
}

/// A write of the cacerts Secret: its create (when the pass found none) or an apply.
fn is_secret_write(r: &Recorded) -> bool {
    (r.method == "POST" && r.path == SECRETS && r.body["metadata"]["name"] == "cacerts")
        || (r.method == "PATCH" && r.path == SECRET)
}

/// The rolling restarts among `sent`: patches of Deployments, StatefulSets, DaemonSets.
fn workload_patches(sent: &[Recorded]) -> Vec<&Recorded> {
    sent.iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with("/apis/apps/v1/"))
        .collect()
}

/// The paths of the workloads `sent` restarted, in order.
fn restarted_paths(sent: &[Recorded]) -> Vec<String> {
    workload_patches(sent)
        .iter()
        .map(|r| r.path.clone())
        .collect()
}

fn vmcsr_status(cluster: &Cluster) -> Value {
    cluster.get(&format!("{VMCSR}/cluster-a")).unwrap()["status"].clone()
}

/// istiod's restart is done once its rollout is: while its new pods are not all up, the
/// plan stays at istiod, saying so, and restarts no gateway; once they are, it goes on.
/// Before, the gateways followed the patch at once, and a plan of istiod alone was
/// reported Complete (letting a root be retired) while the old istiod still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_wait_for_istiods_rollout() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request(&signer.addr.to_string(), json!({}));
    cluster.put_istiod_and_gateway();
    let istiod = deployments_path("istio-system", "istiod");
    cluster.fake.hold_rollout(&istiod);

    for _ in 0..2 {
        let sent = cluster.pass().await;
        let patched: Vec<String> = workload_patches(&sent)
            .iter()
            .map(|p| p.path.clone())
            .collect();
        let restart = &vmcsr_status(&cluster)["restart"];
        assert_eq!(restart["stage"], "Istiod", "{restart}");
        assert_eq!(
            restart["restarted"],
            json!(["Deployment istio-system/istiod"])
        );
        let message = restart["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("waiting for the rollout of Deployment istio-system/istiod (its controller has not taken the restart yet)"),
            "{restart}"
        );
        // Patched once, in the first pass; the gateway not at all.
        assert!(patched.iter().all(|p| *p == istiod), "{patched:?}");
    }

    cluster.fake.finish_rollout(&istiod);
    cluster.pass().await;
    let restart = &vmcsr_status(&cluster)["restart"];
    assert_eq!(restart["stage"], "Gateways", "{restart}");
    assert!(
        restart["message"]
            .as_str()
            .unwrap_or_default()
            .contains("waiting for istio-ca-root-cert in istio-system"),
        "{restart}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_install_creates_the_secret_and_restarts_in_order_exactly_once() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request(&signer.addr.to_string(), json!({}));
    cluster.put_istiod_and_gateway();
    cluster.put_deployment("shop", "web", json!({"app": "web"}));
    cluster.put_workload("StatefulSet", "shop", "db", json!({"app": "db"}));
    // A DaemonSet that rolls its pods only when they are deleted: patched all the same,
    // and reported.
    let mut node_agent = workload(
        "DaemonSet",
        "shop",
        "node-agent",
        json!({"app": "node-agent"}),
    );
    node_agent["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
    cluster.put(
        &workload_path("DaemonSet", "shop", "node-agent"),
        node_agent,
    );

    // Pass 1: lease created, Secret created, istiod restarted, gateways wait.
    let sent = cluster.pass().await;
    let lease = sent
        .iter()
        .find(|r| r.method == "POST" && r.path.contains("/leases"))
        .unwrap();
    assert_eq!(
        lease.path,
        "/apis/coordination.k8s.io/v1/namespaces/service-mesh-hub/leases"
    );
    assert_eq!(lease.body["spec"]["holderIdentity"], "agent-0");
    assert_eq!(lease.body["spec"]["leaseDurationSeconds"], 30);

    // None was read, so it is created: a create fails where another client made one
    // meanwhile, instead of overwriting it as an apply would.
    let created: Vec<&Recorded> = sent.iter().filter(|r| is_secret_write(r)).collect();
    assert_eq!(created.len(), 1);
    let apply = created[0];
    assert_eq!(
        (apply.method.as_str(), apply.path.as_str()),
        ("POST", SECRETS)
    );
    assert_eq!(apply.param("fieldManager").as_deref(), Some("meshca"));
    assert!(apply.body["metadata"].get("resourceVersion").is_none());
    assert_eq!(apply.body["apiVersion"], "v1");
    assert_eq!(apply.body["kind"], "Secret");
    assert_eq!(
        apply.body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshca"
    );
    assert_eq!(
        apply.body["metadata"]["annotations"]["meshca.dev/owner"],
        "service-mesh-hub/cluster-a"
    );
    let mut keys: Vec<&String> = apply.body["data"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem"
        ]
    );
    let files = secret_files(&apply.body);
    let root = meshca::pki::pem::decode_certificates(&env.root_pem())
        .unwrap()
        .remove(0);
    let summary = verify_bundle(&files, Some(&root), std::time::SystemTime::now()).unwrap();
    assert!(summary.subject.contains("cluster-a"), "{}", summary.subject);

    let patches = workload_patches(&sent);
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].path, deployments_path("istio-system", "istiod"));
    assert_eq!(
        patches[0].content_type,
        "application/strategic-merge-patch+json"
    );
    let annotations = &patches[0].body["spec"]["template"]["metadata"]["annotations"];
    assert!(annotations["kubectl.kubernetes.io/restartedAt"].is_string());
    assert_eq!(
        annotations["meshca.dev/restarted-for-serial"],
        summary.serial
    );
    assert_eq!(
        patches[0].body.as_object().unwrap().len(),
        1,
        "only spec.template.metadata.annotations"
    );
    // No pod is ever deleted, no other verb used.
    assert!(sent.iter().all(|r| r.method != "DELETE"));

    let status_writes: Vec<&Recorded> = sent
        .iter()
        .filter(|r| r.path.ends_with("/cluster-a/status"))
        .collect();
    let phases: Vec<&str> = status_writes
        .iter()
        .map(|r| r.body["status"]["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["Requested", "Issued", "Installed"]);
    for w in &status_writes {
        assert_eq!(w.method, "PATCH");
        assert_eq!(w.content_type, "application/apply-patch+yaml");
        assert_eq!(w.param("fieldManager").as_deref(), Some("meshca"));
        // A CRD older than the agent refuses a field it does not know, loudly.
        assert_eq!(w.param("fieldValidation").as_deref(), Some("Strict"));
    }
    let st = vmcsr_status(&cluster);
    assert_eq!(st["serial"], summary.serial);
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["rootFingerprint"], summary.anchor_fingerprint);
    assert!(st["notAfter"].is_string() && st["renewAt"].is_string());
    assert_eq!(st["restart"]["stage"], "Gateways");
    assert_eq!(
        st["restart"]["restarted"],
        json!(["Deployment istio-system/istiod"])
    );
    assert!(
        st["restart"]["message"]
            .as_str()
            .unwrap()
            .contains("waiting for istio-ca-root-cert in istio-system"),
        "{st}"
    );
    let ready = condition(&st, "Ready");
    assert_eq!(ready["status"], "True");

    // Pass 2: nothing changed: no Secret write, no restart, no status write.
    let sent = cluster.pass().await;
    assert_eq!(
        writes(&sent),
        vec![("PUT".to_string(), LEASE.to_string())],
        "only the lease renewal"
    );
    let put = sent.iter().find(|r| r.method == "PUT").unwrap();
    assert!(put.body["metadata"]["resourceVersion"].is_string());

    // Pass 3: istio-system carries the new root: the gateway restarts; shop waits.
    let (path, cm) = configmap("istio-system", &env.root_pem());
    cluster.put(&path, cm);
    let sent = cluster.pass().await;
    let restarted = restarted_paths(&sent);
    assert_eq!(
        restarted,
        vec![deployments_path("istio-system", "istio-ingressgateway")]
    );
    assert_eq!(vmcsr_status(&cluster)["restart"]["stage"], "Workloads");

    // Pass 4: shop carries it: its workloads of every kind restart, the plan completes.
    let (path, cm) = configmap("shop", &format!("{}{}", env.root_pem(), env.root_pem()));
    cluster.put(&path, cm);
    let sent = cluster.pass().await;
    let restarted = restarted_paths(&sent);
    assert_eq!(
        restarted,
        vec![
            deployments_path("shop", "web"),
            workload_path("StatefulSet", "shop", "db"),
            workload_path("DaemonSet", "shop", "node-agent"),
        ]
    );
    for patch in workload_patches(&sent) {
        assert_eq!(patch.content_type, "application/strategic-merge-patch+json");
        let annotations = &patch.body["spec"]["template"]["metadata"]["annotations"];
        assert!(annotations["kubectl.kubernetes.io/restartedAt"].is_string());
    }
    let st = vmcsr_status(&cluster);
    assert_eq!(st["restart"]["stage"], "Complete");
    assert_eq!(
        st["restart"]["restarted"],
        json!([
            "Deployment istio-system/istiod",
            "Deployment istio-system/istio-ingressgateway",
            "Deployment shop/web",
            "StatefulSet shop/db",
            "DaemonSet shop/node-agent"
        ])
    );
    assert_eq!(
        st["restart"]["rollsOnDelete"],
        json!(["DaemonSet shop/node-agent"])
    );
    let restarted = condition(&st, "Restarted");
    assert_eq!(restarted["reason"], "Complete");
    assert_eq!(
        restarted["message"],
        "updateStrategy OnDelete, so pods take the new certificates only when deleted: DaemonSet shop/node-agent"
    );

    // Passes 5 and 6: a complete plan never restarts anything again.
    for _ in 0..2 {
        let sent = cluster.pass().await;
        assert_eq!(writes(&sent), vec![("PUT".to_string(), LEASE.to_string())]);
        assert!(!sent.iter().any(|r| r.path.starts_with("/apis/apps/")));
    }
    // Pass 7: cert-chain.pem damaged by hand: replaced by a forced server-side apply
    // that holds the version the pass read (a change after the read is not overwritten).
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    cluster.fake.edit(SECRET, |secret| {
        secret["data"]["cert-chain.pem"] = b64("damaged").into();
    });
    let read_version = cluster.get(SECRET).unwrap()["metadata"]["resourceVersion"].clone();
    let sent = cluster.pass().await;
    let applied: Vec<&Recorded> = sent.iter().filter(|r| is_secret_write(r)).collect();
    assert_eq!(applied.len(), 1, "{:?}", writes(&sent));
    let apply = applied[0];
    assert_eq!(
        (apply.method.as_str(), apply.path.as_str()),
        ("PATCH", SECRET)
    );
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    assert_eq!(apply.param("fieldManager").as_deref(), Some("meshca"));
    assert_eq!(apply.param("force").as_deref(), Some("true"));
    assert_eq!(apply.param("fieldValidation").as_deref(), Some("Strict"));
    assert_eq!(apply.body["kind"], "Secret");
    assert_eq!(apply.body["metadata"]["resourceVersion"], read_version);
    assert_eq!(vmcsr_status(&cluster)["phase"], "Installed");
    // The whole life of a request used every grant of deploy/agent's RBAC (and, as in
    // every test, nothing else).
    cluster.fake.assert_every_grant_used(&[]);
    drop(signer);
}

/// A self-signed CA made by openssl: the root of a hand-made `cacerts`.
fn other_root(env: &Env) -> String {
    let root = openssl_self_signed_ca(env.dir.path(), "old-root", "/O=acme/CN=old root", 0..30);
    std::fs::read_to_string(root).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_secret_is_left_alone_until_adopted_and_its_root_stays_trusted() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    let old_root = other_root(&env);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let hand_made = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "cacerts", "namespace": "istio-system", "resourceVersion": "7"},
        "data": {"ca-cert.pem": b64("hand made"), "ca-key.pem": b64("hand made"),
                 "cert-chain.pem": b64("hand made"), "root-cert.pem": b64(&old_root)}
    });
    cluster.put(SECRET, hand_made.clone());
    cluster.put_request(&signer.addr.to_string(), json!({}));
    cluster.put_deployment("istio-system", "istiod", json!({"app": "istiod"}));

    let sent = cluster.pass().await;
    assert!(!sent.iter().any(is_secret_write));
    assert_secret_is(&cluster, &hand_made);
    let st = vmcsr_status(&cluster);
    assert_eq!(st["phase"], "Failed");
    let error = st["lastError"].as_str().unwrap();
    assert!(
        error.contains("not meshca's") && error.contains("adopt"),
        "{error}"
    );
    let ready = &st["conditions"][0];
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "ForeignSecret");

    // The spec says adopt: replaced, the hand-made root kept after the signer's root.
    cluster.edit_request(|obj| {
        obj["spec"]["adopt"] = true.into();
    });
    let sent = cluster.pass().await;
    let apply = sent
        .iter()
        .find(|r| r.method == "PATCH" && r.path == SECRET)
        .expect("adopted Secret applied");
    // On the condition that it is still the Secret the pass read.
    assert_eq!(apply.body["metadata"]["resourceVersion"], "7");
    let files = secret_files(&apply.body);
    let roots = meshca::pki::pem::decode_certificates(&files.root_cert).unwrap();
    assert_eq!(roots.len(), 2);
    assert_eq!(
        meshca::pki::pem::certificate_pem(&roots[0]),
        meshca::pki::pem::certificate_pem(
            &meshca::pki::pem::decode_certificates(&env.root_pem())
                .unwrap()
                .remove(0)
        )
    );
    assert_eq!(
        meshca::pki::pem::certificate_pem(&roots[1]),
        meshca::pki::pem::certificate_pem(
            &meshca::pki::pem::decode_certificates(&old_root)
                .unwrap()
                .remove(0)
        )
    );
    let st = vmcsr_status(&cluster);
    assert_eq!(st["phase"], "Installed");
    assert!(st.get("lastError").is_none(), "{st}");
    assert_eq!(st["observedGeneration"], 2);
    assert_eq!(st["trustedRootFingerprints"].as_array().unwrap().len(), 2);
    // istiod already ran with plugged-in certificates, but it takes new files by itself
    // only under the same root-cert.pem bytes: auto restarts istiod, and only istiod.
    assert_eq!(
        restarted_paths(&sent),
        [deployments_path("istio-system", "istiod")]
    );
    assert_eq!(
        (&st["restart"]["scope"], &st["restart"]["stage"]),
        (&json!("Istiod"), &json!("Complete")),
        "{st}"
    );
    let istiod_restarted_for = |cluster: &Cluster| {
        cluster
            .get(&deployments_path("istio-system", "istiod"))
            .unwrap()["spec"]["template"]["metadata"]["annotations"]
            ["meshca.dev/restarted-for-serial"]
            .clone()
    };
    assert_eq!(istiod_restarted_for(&cluster), st["serial"]);

    // Retiring the old root rewrites root-cert.pem only: same intermediate and key.
    cluster.edit_request(|obj| {
        obj["spec"]["rotation"] =
            json!({"retiredRootFingerprints": [st["trustedRootFingerprints"][1]]});
    });
    let sent = cluster.pass().await;
    let apply = sent
        .iter()
        .find(|r| r.method == "PATCH" && r.path == SECRET)
        .expect("root-cert.pem rewritten");
    let rewritten = secret_files(&apply.body);
    assert_eq!(rewritten.ca_cert, files.ca_cert);
    // Not assert_eq!: its message would print the private key.
    assert!(
        rewritten.ca_key == files.ca_key,
        "ca-key.pem changed on a root-cert.pem rewrite"
    );
    assert_eq!(rewritten.root_cert, env.root_pem());
    let st = vmcsr_status(&cluster);
    assert_eq!(st["trustedRootFingerprints"].as_array().unwrap().len(), 1);
    // The same serial, other roots: istiod restarts once more, for this version of them.
    assert_eq!(
        restarted_paths(&sent),
        [deployments_path("istio-system", "istiod")]
    );
    let key = istiod_restarted_for(&cluster);
    assert!(
        key.as_str()
            .unwrap()
            .starts_with(&format!("{}+roots-", st["serial"].as_str().unwrap())),
        "{key}"
    );
    assert_eq!(st["restart"]["scope"], "Istiod");
    assert_eq!(st["restart"]["stage"], "Complete");
    // And never again for it.
    let sent = cluster.pass().await;
    assert!(restarted_paths(&sent).is_empty());
}

/// meshca's Secret losing a file (`ca-key.pem` pruned by a GitOps tool, a partial
/// restore): an istiod started since found no key and runs on its self-signed CA, which
/// the same root-cert.pem written back would not undo. The repair restarts as a first
/// install does: istiod, then gateways and workloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_lost_its_key_is_repaired_with_a_first_installs_restarts() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request(&signer.addr.to_string(), json!({}));
    cluster.put_deployment("istio-system", "istiod", json!({"app": "istiod"}));
    cluster.put_deployment("shop", "web", json!({"app": "web"}));
    for ns in ["istio-system", "shop"] {
        let (path, cm) = configmap(ns, &env.root_pem());
        cluster.put(&path, cm);
    }
    for _ in 0..3 {
        cluster.pass().await;
    }
    let installed = vmcsr_status(&cluster);
    assert_eq!(installed["restart"]["stage"], "Complete", "{installed}");

    cluster.fake.edit(SECRET, |secret| {
        secret["data"].as_object_mut().unwrap().remove("ca-key.pem");
    });
    let sent = cluster.pass().await;
    assert!(
        sent.iter().any(is_secret_write),
        "the Secret was not repaired"
    );
    let st = vmcsr_status(&cluster);
    assert_ne!(st["serial"], installed["serial"]);
    assert_eq!(st["restart"]["serial"], st["serial"], "{st}");
    assert!(
        st["restart"].get("scope").is_none(),
        "not a full plan: {st}"
    );
    assert_eq!(
        restarted_paths(&sent).first(),
        Some(&deployments_path("istio-system", "istiod"))
    );
}

/// An istiod selector that matches no Deployment (a custom install's labels): a first
/// install does not report its restarts complete while istiod runs on its self-signed CA;
/// the plan waits, naming the selector, and goes on once a Deployment matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istiod_selector_matching_nothing_holds_the_plan_naming_it() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request(&signer.addr.to_string(), json!({}));
    cluster.put_deployment("istio-system", "istiod", json!({"app": "istiod-custom"}));
    let sent = cluster.pass().await;
    assert!(sent.iter().any(is_secret_write));
    assert!(restarted_paths(&sent).is_empty());
    let st = vmcsr_status(&cluster);
    assert_eq!(st["restart"]["stage"], "Istiod", "{st}");
    let restarted = condition(&st, "Restarted");
    assert_eq!(
        (&restarted["status"], &restarted["reason"]),
        (&json!("False"), &json!("InProgress"))
    );
    assert!(
        restarted["message"].as_str().unwrap().contains(
            "no Deployment in istio-system matches restart.istiodSelector \"app=istiod\""
        ),
        "{st}"
    );

    cluster.edit_request(|request| {
        request["spec"]["restart"] = json!({"istiodSelector": "app=istiod-custom"});
    });
    let sent = cluster.pass().await;
    assert_eq!(
        restarted_paths(&sent),
        [deployments_path("istio-system", "istiod")]
    );
    // No gateways or workloads here: the plan is done.
    assert_eq!(vmcsr_status(&cluster)["restart"]["stage"], "Complete");
}

/// A cacerts Secret as another client (kubectl, a GitOps tool) writes it.
fn someone_elses_secret(version: &str, root_cert: &str) -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "cacerts", "namespace": "istio-system", "resourceVersion": version},
        "data": {"ca-cert.pem": b64("theirs"), "ca-key.pem": b64("theirs"),
                 "cert-chain.pem": b64("theirs"), "root-cert.pem": b64(root_cert)}
    })
}

/// Right after the next pass records `Requested` (after it read the Secret, before it
/// asks the signer), another client writes `secret` as the cacerts Secret.
fn another_client_writes_the_secret_mid_pass(cluster: &Cluster, secret: &Value) {
    let secret = secret.clone();
    cluster
        .fake
        .after_write(&format!("{VMCSR}/cluster-a/status"), move |objects| {
            objects.insert(SECRET.to_string(), secret);
        });
}

/// The request failed for a Secret changed since its pass read it.
fn failed_as_secret_changed(cluster: &Cluster) {
    let st = failed_with(cluster, "created or changed by another client");
    assert_eq!(condition(&st, "Ready")["reason"], "SecretChanged", "{st}");
}

/// A changed spec, so that the next pass comes at once rather than after the backoff.
fn retry_at_once(cluster: &Cluster) {
    cluster.edit_request(|request| {
        request["spec"]["ttlSeconds"] = 7200.into();
    });
}

/// Another client creates cacerts while the agent gets its first intermediate (after the
/// pass read none, before it writes): the agent's create fails and leaves that Secret as
/// written, where a forced apply would have replaced it and labelled it meshca's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_created_by_another_client_during_an_issuance_is_not_overwritten() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    let theirs = someone_elses_secret("900", &other_root(&env));
    another_client_writes_the_secret_mid_pass(&cluster, &theirs);
    let sent = cluster.pass().await;
    assert!(sent.iter().any(is_secret_write), "{:?}", writes(&sent));
    assert_secret_is(&cluster, &theirs);
    failed_as_secret_changed(&cluster);
    // The intermediate was signed (and audited) for nothing: one, not one per pass.
    assert_eq!(signer.audit_lines().len(), 1);
    // The next pass finds a Secret meshca did not create, and leaves it alone.
    retry_at_once(&cluster);
    let sent = cluster.pass().await;
    assert!(!sent.iter().any(is_secret_write), "{:?}", writes(&sent));
    assert_secret_is(&cluster, &theirs);
    let st = failed_with(&cluster, "not meshca's");
    assert_eq!(condition(&st, "Ready")["reason"], "ForeignSecret", "{st}");
    assert_eq!(signer.audit_lines().len(), 1);
}

/// A `cacerts` adopted that holds no CA istiod could sign with (root-cert.pem alone, as a
/// GitOps repo may ship the trust first): istiod runs on its self-signed CA, as before a
/// first install, so the plan is a first install's, gateways and workloads included.
/// Before, it was taken for a plugged-in CA replaced: istiod alone was restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_a_secret_without_a_ca_key_plans_a_first_install() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    cluster.put(
        SECRET,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "cacerts", "namespace": "istio-system", "resourceVersion": "7"},
            "data": {"root-cert.pem": b64(&other_root(&env))}
        }),
    );
    cluster.put_request(&signer.addr.to_string(), json!({"adopt": true}));
    cluster.put_deployment("istio-system", "istiod", json!({"app": "istiod"}));
    cluster.pass().await;
    let st = vmcsr_status(&cluster);
    assert_eq!(st["phase"], "Installed", "{st}");
    assert_eq!(st["restart"]["serial"], st["serial"], "{st}");
    // A full plan carries no scope (only an istiod-only one says "Istiod").
    assert!(
        st["restart"].get("scope").is_none(),
        "not a full plan: {st}"
    );
}

/// A Secret being adopted is changed by its old owner while the agent gets the
/// intermediate that replaces it: the apply, which holds the version the pass read, is
/// refused, and the change stays; the next pass reads it and adopts what is there now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_changed_during_an_issuance_is_not_overwritten() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    let old_root = other_root(&env);
    cluster.put(SECRET, someone_elses_secret("7", &old_root));
    cluster.put_request(
        &signer.addr.to_string(),
        json!({"adopt": true, "restart": {"policy": "never"}}),
    );
    let changed = someone_elses_secret("8", &old_root);
    another_client_writes_the_secret_mid_pass(&cluster, &changed);
    let sent = cluster.pass().await;
    let tried: Vec<&Recorded> = sent.iter().filter(|r| is_secret_write(r)).collect();
    assert_eq!(tried.len(), 1, "{:?}", writes(&sent));
    assert_eq!(tried[0].body["metadata"]["resourceVersion"], "7");
    assert_secret_is(&cluster, &changed);
    failed_as_secret_changed(&cluster);
    // The next pass adopts the Secret as it is now.
    retry_at_once(&cluster);
    let sent = cluster.pass().await;
    let applied: Vec<&Recorded> = sent.iter().filter(|r| is_secret_write(r)).collect();
    assert_eq!(applied.len(), 1, "{:?}", writes(&sent));
    assert_eq!(applied[0].body["metadata"]["resourceVersion"], "8");
    assert_eq!(vmcsr_status(&cluster)["phase"], "Installed");
    assert_eq!(
        cluster.get(SECRET).unwrap()["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshca"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_holding_tls_crt_is_left_alone_even_with_adopt() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // cert-manager's kubernetes.io/tls layout: istiod reads tls.crt whenever it is there.
    let tls = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "cacerts", "namespace": "istio-system", "resourceVersion": "3"},
        "data": {"tls.crt": b64("a CA"), "tls.key": b64("its key"), "ca.crt": b64("a root")}
    });
    cluster.put(SECRET, tls.clone());
    cluster.put_request(
        &signer.addr.to_string(),
        json!({"adopt": true, "restart": {"policy": "never"}}),
    );
    let sent = cluster.pass_with_dry_runs().await;
    assert!(!sent.iter().any(is_secret_write), "{:?}", writes(&sent));
    assert_secret_is(&cluster, &tls);
    assert!(signer.audit_lines().is_empty());
    failed_with(
        &cluster,
        "holds tls.crt: istiod then reads tls.crt, tls.key and ca.crt",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_another_request_holds_is_not_adopted_until_that_request_is_gone() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    // Two requests for one Secret, both saying adopt.
    let spec = json!({"adopt": true, "restart": {"policy": "never"}});
    cluster.put_request(&signer.addr.to_string(), spec.clone());
    let second_path = format!("{VMCSR}/cluster-b");
    let mut second = request_object(&signer.addr.to_string(), spec);
    second["metadata"]["name"] = "cluster-b".into();
    cluster.put(&second_path, second);
    let issued = || signer.issued_lines().len();
    let holder =
        || cluster.get(SECRET).unwrap()["metadata"]["annotations"]["meshca.dev/owner"].clone();

    // The first takes the free Secret; the second does not take it from the first, pass
    // after pass, and says who holds it.
    for _ in 0..2 {
        cluster.pass().await;
        assert_eq!(issued(), 1);
        assert_eq!(holder(), "service-mesh-hub/cluster-a");
    }
    let st = cluster.get(&second_path).unwrap()["status"].clone();
    assert_eq!(st["phase"], "Failed", "{st}");
    assert!(
        st["lastError"]
            .as_str()
            .unwrap()
            .contains("belongs to meshca request service-mesh-hub/cluster-a"),
        "{st}"
    );
    assert_eq!(st["conditions"][0]["reason"], "ForeignSecret");
    assert_eq!(vmcsr_status(&cluster)["phase"], "Installed");

    // Once the holder is gone the Secret is free to adopt (a new generation of the second
    // request is tried at once).
    cluster.fake.remove(&format!("{VMCSR}/cluster-a"));
    cluster.fake.edit(&second_path, |request| {
        request["metadata"]["generation"] = 2.into();
    });
    cluster.pass().await;
    assert_eq!(issued(), 2);
    assert_eq!(holder(), "service-mesh-hub/cluster-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_signer_writes_no_secret_and_reports_the_cause() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    // A port nobody listens on (bound, then released).
    let closed = closed_addr();
    cluster.put_request(&closed.to_string(), json!({}));
    let sent = cluster.pass().await;
    assert!(!sent.iter().any(is_secret_write));
    assert!(cluster.get(SECRET).is_none());
    let st = failed_with(&cluster, "cannot reach the signer");
    assert_eq!(st["conditions"][0]["reason"], "SignerError");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_mesh_or_mesh_the_signer_would_refuse_fails_the_pass_and_leaves_the_secret() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    cluster.pass().await;
    let installed = cluster.get(SECRET).unwrap();
    // Renamed on the signer's side (or mistyped here): the Secret is valid and not due,
    // but nothing could renew it, so the pass fails now and says why.
    cluster.edit_request(|request| {
        request["spec"]["virtualMesh"]["name"] = "gone".into();
    });
    fails_keeping_the_secret(
        &cluster,
        &installed,
        "the signer refused (404 unknown_virtual_mesh)",
    )
    .await;
    // The signer's grant for this cluster withdrawn (a reload there): the Secret is valid
    // and not due, but its renewal would be refused, so the pass fails now.
    cluster.edit_request(|request| {
        request["spec"]["virtualMesh"]["name"] = "vm".into();
    });
    let config = std::fs::read_to_string(&env.config).unwrap();
    let grant = format!(
        "\n[[clients]]\nidentity = \"{}\"\nallow = [{{ virtual_mesh = \"test/vm\", mesh = \"test/cluster-a\" }}]\n",
        identity("cluster-a")
    );
    assert!(config.contains(&grant), "{config}");
    std::fs::write(&env.config, config.replace(&grant, "")).unwrap();
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_log("SIGHUP: rules reloaded").await;
    fails_keeping_the_secret(
        &cluster,
        &installed,
        "the signer would refuse to renew: its grants do not let this client ask for mesh test/cluster-a of virtual mesh test/vm (it may ask for nothing)",
    )
    .await;
    // The signer answered: reachable, the request failing.
    let text = cluster.metrics.render();
    let a = "{request=\"service-mesh-hub/cluster-a\"}";
    for (name, value) in [
        (format!("meshca_agent_certificate_ready{a}"), 0),
        (format!("meshca_agent_signer_reachable{a}"), 1),
    ] {
        assert_eq!(
            metric_sample(&text, &name),
            Some(value),
            "{name} in\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_does_nothing_and_takes_over_an_expired_lease() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    let now = meshca::signer::audit::rfc3339(std::time::SystemTime::now());
    let lease = |renewed: &str, seconds: u64| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "meshca-agent", "namespace": NS, "resourceVersion": "41"},
            "spec": {"holderIdentity": "agent-1", "leaseDurationSeconds": seconds,
                     "renewTime": renewed, "leaseTransitions": 3}})
    };
    let long_ago = "2020-01-01T00:00:00.000000Z";
    // Longer than the 1 s Lease below, read unchanged.
    let expire = || tokio::time::sleep(Duration::from_millis(1500));
    cluster.put(LEASE, lease(&now, 30));
    cluster.put_request("127.0.0.1:1", json!({}));
    let sent = cluster.pass().await;
    assert_eq!(sent.len(), 1, "a follower only reads the Lease: {sent:?}");
    assert_eq!(
        (sent[0].method.as_str(), sent[0].path.as_str()),
        ("GET", LEASE)
    );

    // A renewTime long past on this host's clock is not enough (the holder's clock may run
    // behind): a Lease just read so is followed until it has read the same for its
    // duration here. Then the holder has stopped renewing: take over with the read
    // resourceVersion.
    cluster.put(LEASE, lease(long_ago, 1));
    let sent = cluster.pass().await;
    assert_eq!(
        sent.len(),
        1,
        "a Lease that just changed is followed: {sent:?}"
    );
    expire().await;
    let sent = cluster.pass().await;
    let put = sent.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(put.path, LEASE);
    assert_eq!(put.body["metadata"]["resourceVersion"], "41");
    assert_eq!(put.body["spec"]["holderIdentity"], "agent-0");
    assert_eq!(put.body["spec"]["leaseTransitions"], 4);
    assert!(
        sent.iter().any(|r| r.path == VMCSR),
        "the new leader reconciles"
    );

    // Another replica writes the Lease between this one's read and write: the
    // replace gets 409 and this replica stays a follower (reads nothing else).
    cluster.put(LEASE, lease(long_ago, 1));
    cluster.pass().await;
    expire().await;
    // The same Lease again (still unchanged), at the resourceVersion of the read.
    cluster.put(LEASE, lease(long_ago, 1));
    cluster.fake.race_after_get(Some(LEASE));
    let sent = cluster.pass().await;
    let methods: Vec<&str> = sent.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["GET", "PUT"], "{sent:?}");
    assert!(!sent.iter().any(|r| r.path == VMCSR));

    // Shutting down as the holder gives the Lease up (no holder: others take it at once).
    cluster.fake.race_after_get(None);
    let mut mine = lease(&now, 30);
    mine["spec"]["holderIdentity"] = "agent-0".into();
    cluster.put(LEASE, mine);
    cluster.controller.release().await.unwrap();
    let released = cluster.get(LEASE).unwrap();
    assert!(
        released["spec"].get("holderIdentity").is_none(),
        "{released}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_by_hand_is_left_to_its_holder_until_it_would_have_expired() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    let now = meshca::signer::audit::rfc3339(std::time::SystemTime::now());
    cluster.put(
        LEASE,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "meshca-agent", "namespace": NS, "resourceVersion": "41"},
            "spec": {"holderIdentity": "agent-1", "leaseDurationSeconds": 1,
                     "renewTime": now, "leaseTransitions": 3}}),
    );
    cluster.put_request("127.0.0.1:1", json!({}));
    let sent = cluster.pass().await;
    assert_eq!(sent.len(), 1, "a follower only reads the Lease: {sent:?}");

    // `kubectl delete lease`: agent-1 may still be acting for the rest of its duration
    // (its next renewal creates the Lease again), so this replica does not create one
    // beside it.
    cluster.fake.remove(LEASE);
    let sent = cluster.pass().await;
    let methods: Vec<(&str, &str)> = sent
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(methods, [("GET", LEASE)], "{sent:?}");
    assert!(cluster.get(LEASE).is_none());

    // Once agent-1 would have expired (it never came back), the Lease is created and held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = cluster.pass().await;
    assert!(
        sent.iter()
            .any(|r| r.method == "POST" && r.path.ends_with("/leases")),
        "{sent:?}"
    );
    assert_eq!(
        cluster.get(LEASE).unwrap()["spec"]["holderIdentity"],
        "agent-0"
    );
    assert!(
        sent.iter().any(|r| r.path == VMCSR),
        "the new leader reconciles"
    );

    // Its own Lease deleted, the leader creates it again at once.
    cluster.fake.remove(LEASE);
    let sent = cluster.pass().await;
    assert!(
        sent.iter()
            .any(|r| r.method == "POST" && r.path.ends_with("/leases")),
        "{sent:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_too_short_for_the_renewal_fraction_is_an_invalid_spec() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    // Fresh intermediates would be due at once: issued, and restarts begun, every second.
    cluster.put_request("127.0.0.1:1", json!({"ttlSeconds": 120}));
    let sent = cluster.pass().await;
    assert!(!sent.iter().any(is_secret_write));
    let st = vmcsr_status(&cluster);
    assert_eq!(st["phase"], "Failed");
    let ready = condition(&st, "Ready");
    assert_eq!(ready["reason"], "InvalidSpec");
    let error = st["lastError"].as_str().unwrap();
    assert!(
        error.contains("a ttl of 120 s is too short for this renewal fraction")
            && error.contains("at least 284 s"),
        "{error}"
    );
}

/// A retired root named in another form than its SHA-256 would match no root and stay
/// trusted without a word; an API server whose CRD has the schema's pattern refuses it at
/// apply, and the agent refuses it too (a CRD installed before the pattern, the fake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_root_not_named_by_its_sha256_is_an_invalid_spec() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    let sha1 = "5F:35:E0:C1:D0:E4:B1:A9:C0:FF:EE:00:11:22:33:44:55:66:77:88";
    let good = "5f35e0c1d0e4b1a9c0ffee00112233445566778899aabbccddeeff0011223344";
    cluster.put_request(
        "127.0.0.1:1",
        json!({"rotation": {"retiredRootFingerprints": [good, sha1]}}),
    );
    let sent = cluster.pass().await;
    assert!(!sent.iter().any(is_secret_write));
    let st = vmcsr_status(&cluster);
    assert_eq!(st["phase"], "Failed");
    let ready = condition(&st, "Ready");
    assert_eq!(ready["reason"], "InvalidSpec");
    let error = st["lastError"].as_str().unwrap();
    assert!(
        error.contains(&format!("retiredRootFingerprints[1] \"{sha1}\""))
            && error.contains("this looks like a SHA-1 fingerprint"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_type_the_policy_refuses_is_never_shown_as_requested() {
    // An RSA minimum of 4096: P-256 is refused.
    let env = Env::with(EnvSpec::with_rsa_minimum(4096));
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request(
        &signer.addr.to_string(),
        json!({"keyType": "ecdsa-p256", "restart": {"policy": "never"}}),
    );
    let sent = cluster.pass_with_dry_runs().await;
    // Refused before anything: no dry run of the Secret, and one status write, Failed,
    // never Requested first.
    assert!(!sent.iter().any(is_secret_write), "{:?}", writes(&sent));
    let phases: Vec<&str> = sent
        .iter()
        .filter(|r| r.path.ends_with("/cluster-a/status"))
        .map(|r| r.body["status"]["phase"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(phases, ["Failed"]);
    failed_with(
        &cluster,
        "key type ecdsa-p256 is not accepted by virtual mesh test/vm (accepted: rsa4096, ecdsa-p384)",
    );
    assert!(signer.audit_lines().is_empty());
}

/// `rotation.acceptedRootFingerprints` that does not list the signer's root: the pass
/// fails by name before anything is asked (no dry run, never `Requested`, nothing signed),
/// and no Secret is written; a malformed entry is an invalid spec, as for retired roots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_root_the_request_does_not_accept_is_asked_for_nothing() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    let root = common::certs::openssl_fingerprint(env.dir.path(), &env.path("root-cert.pem"));
    let other = "ab".repeat(32);
    cluster.put_request(
        &signer.addr.to_string(),
        json!({"restart": {"policy": "never"}, "rotation": {"acceptedRootFingerprints": [other]}}),
    );
    let sent = cluster.pass_with_dry_runs().await;
    assert!(!sent.iter().any(is_secret_write), "{:?}", writes(&sent));
    let phases: Vec<&str> = sent
        .iter()
        .filter(|r| r.path.ends_with("/cluster-a/status"))
        .map(|r| r.body["status"]["phase"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(phases, ["Failed"]);
    let st = failed_with(
        &cluster,
        &format!(
            "the signer's root sha256 {root} is not among the roots this agent accepts (spec.rotation.acceptedRootFingerprints"
        ),
    );
    assert_eq!(condition(&st, "Ready")["reason"], "RootNotAccepted");
    assert!(cluster.get(SECRET).is_none());
    assert!(
        signer.audit_lines().is_empty(),
        "{:?}",
        signer.audit_lines()
    );

    let sha1 = "5F:35:E0:C1:D0:E4:B1:A9:C0:FF:EE:00:11:22:33:44:55:66:77:88";
    cluster.edit_request(|request| {
        request["spec"]["rotation"]["acceptedRootFingerprints"] = json!([root, sha1]);
    });
    cluster.pass().await;
    let st = vmcsr_status(&cluster);
    assert_eq!(condition(&st, "Ready")["reason"], "InvalidSpec", "{st}");
    assert!(
        st["lastError"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("acceptedRootFingerprints[1] \"{sha1}\""))),
        "{st}"
    );

    // Listing the signer's root: installed.
    cluster.edit_request(|request| {
        request["spec"]["rotation"]["acceptedRootFingerprints"] = json!([root]);
    });
    cluster.pass().await;
    assert!(cluster.get(SECRET).is_some(), "{}", vmcsr_status(&cluster));
}

/// Without a pin, a signer under a root the installed Secret does not hold (one run with
/// the real signer's stolen TLS key, under a root of its own) is asked for nothing: the
/// status says `RootNotTrusted`, the root it announces is not reported, and the Secret is
/// not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_under_a_root_the_secret_does_not_hold_is_asked_for_nothing() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    cluster.pass().await;
    let installed = cluster.get(SECRET).expect("installed from the real signer");

    let impostor = env.impostor();
    let work = impostor.dir.path();
    let its_root = common::certs::openssl_fingerprint(work, &impostor.path("root-cert.pem"));
    let planted = common::certs::openssl_fingerprint(work, &impostor.init_next_root());
    impostor.announce_next_root(Some("next-root-cert.pem"));
    let fake = impostor.start_signer();
    cluster.edit_request(|request| {
        request["spec"]["signer"]["url"] = json!(format!("https://{}", fake.addr));
    });
    let sent = cluster.pass_with_dry_runs().await;
    assert!(!sent.iter().any(is_secret_write), "{:?}", writes(&sent));
    let st = failed_with(
        &cluster,
        &format!(
            "the signer's root sha256 {its_root} is not in root-cert.pem and was never announced cross-signed by a root this cluster trusts"
        ),
    );
    assert_eq!(condition(&st, "Ready")["reason"], "RootNotTrusted", "{st}");
    assert_ne!(st["nextRootFingerprint"], json!(planted), "{st}");
    assert_eq!(cluster.get(SECRET).unwrap()["data"], installed["data"]);
    let issued = fake.issued_lines();
    assert!(issued.is_empty(), "{issued:?}");
}

/// A Lease this short leaves less than the 5 s margin: the agent reads it before each
/// write (so a test can take it away between two).
const LEASE_READ_BEFORE_EACH_WRITE: Duration = Duration::from_secs(6);

/// Another replica holds the Lease, freshly renewed (for [`kubefake`]'s `after_write`).
fn another_replica_takes_the_lease(objects: &mut std::collections::BTreeMap<String, Value>) {
    let lease = objects.get_mut(LEASE).unwrap();
    lease["spec"]["holderIdentity"] = "agent-1".into();
    lease["spec"]["renewTime"] =
        meshca::signer::audit::rfc3339(std::time::SystemTime::now()).into();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_the_lease_during_a_pass_writes_nothing_more() {
    // Another replica holds the Lease right after the pass records `Requested` (its first
    // status write), or `Issued` (its second: the Secret write that would follow is the
    // new leader's to make).
    for written in [&["Requested"][..], &["Requested", "Issued"]] {
        let env = Env::new();
        let signer = env.start_signer();
        let cluster = Cluster::start_with_lease(&env, LEASE_READ_BEFORE_EACH_WRITE).await;
        cluster.put_request_restarting_nothing(&signer);
        cluster.fake.after_nth_write(
            &format!("{VMCSR}/cluster-a/status"),
            written.len(),
            another_replica_takes_the_lease,
        );
        let sent = cluster.pass().await;
        let phases: Vec<&Value> = sent
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
            .map(|r| &r.body["status"]["phase"])
            .collect();
        assert_eq!(phases, written, "{:?}", writes(&sent));
        assert!(!sent.iter().any(is_secret_write), "{:?}", writes(&sent));
        // What the new leader finds is what the old one last wrote while leading.
        assert_eq!(vmcsr_status(&cluster)["phase"], written[written.len() - 1]);
        assert_eq!(
            cluster.get(LEASE).unwrap()["spec"]["holderIdentity"],
            "agent-1"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_plan_outlives_a_lease_lost_right_after_the_secret_is_written() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start_with_lease(&env, LEASE_READ_BEFORE_EACH_WRITE).await;
    cluster.put_request(&signer.addr.to_string(), json!({}));
    cluster.put_deployment("istio-system", "istiod", json!({"app": "istiod"}));
    let istiod = deployments_path("istio-system", "istiod");
    // Right after the first install's Secret is written, another replica holds the Lease:
    // this one restarts nothing and writes nothing more.
    cluster
        .fake
        .after_write(SECRETS, another_replica_takes_the_lease);
    let sent = cluster.pass().await;
    assert!(sent.iter().any(is_secret_write));
    assert!(!sent.iter().any(|r| r.path == istiod && r.method == "PATCH"));
    // The plan was recorded with the serial, before the Secret.
    let st = vmcsr_status(&cluster);
    assert_eq!(st["phase"], "Issued", "{st}");
    assert_eq!(st["restart"]["serial"], st["serial"], "{st}");
    assert_eq!(st["restart"]["stage"], "Istiod", "{st}");

    // The leader that follows (here this replica again) finds it and restarts istiod.
    cluster.fake.edit(LEASE, |lease| {
        lease["spec"]["holderIdentity"] = "agent-0".into();
    });
    let sent = cluster.pass().await;
    assert!(
        sent.iter().any(|r| r.path == istiod && r.method == "PATCH"),
        "{:?}",
        writes(&sent)
    );
    assert!(!sent.iter().any(is_secret_write));
}

/// One stage restarts several workloads; the Lease is lost after the first: this replica
/// restarts no more of them (the new leader does, once), rather than patching the rest
/// beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_the_lease_between_two_restarts_makes_no_more() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start_with_lease(&env, LEASE_READ_BEFORE_EACH_WRITE).await;
    cluster.put_request(&signer.addr.to_string(), json!({}));
    for name in ["istiod", "istio-eastwestgateway", "istio-egressgateway"] {
        cluster.put_deployment("istio-system", name, json!({"app": "istiod"}));
    }
    // The first install restarts the three in its istiod stage; the first one's patch is
    // the last this replica makes.
    let first = deployments_path("istio-system", "istio-eastwestgateway");
    cluster
        .fake
        .after_write(&first, another_replica_takes_the_lease);
    let sent = cluster.pass().await;
    assert_eq!(restarted_paths(&sent), [first], "{:?}", writes(&sent));
}

/// The agent's clock a year ahead of the signer's (libfaketime preloaded into `meshca
/// agent`, the signer on the real clock): the first intermediate has expired by that clock
/// when it arrives, and the retry (15 s later) asks the signer for no other while the
/// clock does not agree, saying why: the root signs one intermediate, not one per retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_clock_is_ahead_asks_for_no_intermediate_per_retry() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    let mut agent = cluster
        .agent_daemon(&env, &["--resync-seconds", "1"])
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", "+365d")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .spawn()
        .unwrap();
    let said = stderr_lines(&mut agent);
    // The first refusal (it asked), then a retry that asked nothing.
    let mut refusals = Vec::new();
    while refusals.len() < 2 {
        let line = said
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the agent stopped saying anything: {refusals:?}"));
        if line.contains("clock is ahead of the signer's") {
            refusals.push(line);
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        refusals[0].contains("the signer just issued"),
        "{}",
        refusals[0]
    );
    for retry in &refusals[1..] {
        assert!(retry.contains("nothing was asked of the signer"), "{retry}");
    }
    assert_eq!(signer.audit_lines().len(), 1, "{:?}", signer.audit_lines());
    assert!(cluster.get(SECRET).is_none());
    failed_with(&cluster, "clock is ahead of the signer's");
}

/// The agent's clock 50 minutes ahead of the signer's, under an hour's intermediate: each
/// one the signer issues is valid by that clock but already past its renewal time on
/// arrival. It is installed, the agent says why it will not renew it at once, and looks
/// again a resync away. Before, the next look was a second away and found it due: one
/// intermediate (and one audit line) a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_due_on_arrival_by_a_clock_ahead_is_not_renewed_every_second() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    let mut agent = cluster
        .agent_daemon(&env, &["--resync-seconds", "600"])
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", "+50m")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .spawn()
        .unwrap();
    let said_now = stderr_lines(&mut agent);
    // Only a guard against waiting for ever (the agent before this fix never said it).
    let give_up = std::time::Instant::now() + Duration::from_secs(120);
    let mut said = Vec::new();
    while let Ok(line) =
        said_now.recv_timeout(give_up.saturating_duration_since(std::time::Instant::now()))
    {
        said.push(line);
        if said
            .last()
            .is_some_and(|l| l.contains("already past its renewal time by this machine's clock"))
        {
            break;
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let warning = said.last().unwrap();
    assert!(
        warning.contains("already past its renewal time")
            && warning.contains("\"resync_seconds\":600"),
        "{}",
        said.join("\n")
    );
    // The one it got is installed; no other was asked for.
    assert!(cluster.get(SECRET).is_some());
    assert_eq!(signer.issued_lines().len(), 1, "{:?}", signer.audit_lines());
}

/// SIGTERM during a pass held up by a signer that never answers: the pass may finish for
/// `--stop-grace-seconds`, then it is cut short, the Lease given up and the agent exits 0.
/// (Waiting for the pass instead outlasts the pod's grace period: the kubelet's kill then
/// leaves the Lease held for its whole duration.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_stuck_pass_cuts_it_short_after_the_grace_and_gives_the_lease_up() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    let stderr = stop_during_a_stuck_pass(&env, &cluster, || {}).await;
    assert!(
        stderr.contains("did not finish within the grace and was cut short"),
        "{stderr}"
    );
    let lease = cluster.get(LEASE).unwrap();
    assert!(lease["spec"].get("holderIdentity").is_none(), "{lease}");
    assert!(cluster.get(SECRET).is_none());
}

/// The same stop with an API server that no longer answers the Lease: the release is
/// given up after a few seconds, well inside the pod's grace period, and the agent still
/// exits 0 (rather than being killed by the kubelet mid-release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_gives_up_a_lease_release_the_api_server_does_not_answer() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    let stderr = stop_during_a_stuck_pass(&env, &cluster, || {
        cluster
            .fake
            .slow_get_answers(LEASE, Duration::from_secs(3600));
    })
    .await;
    assert!(
        stderr.contains("did not answer the Lease's release in time"),
        "{stderr}"
    );
}

/// Starts `meshca agent` (stop grace 1 s) on a request whose signer accepts connections
/// and never answers, waits until its pass is held up there, runs `before_stop`, sends
/// SIGTERM and returns the agent's stderr once it has exited 0.
async fn stop_during_a_stuck_pass(
    env: &Env,
    cluster: &Cluster,
    before_stop: impl FnOnce(),
) -> String {
    use std::io::Read;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cluster.put_request(
        &silent.local_addr().unwrap().to_string(),
        json!({"restart": {"policy": "never"}}),
    );
    let mut agent = cluster
        .agent_daemon(env, &["--stop-grace-seconds", "1"])
        .spawn()
        .unwrap();
    // The pass is under way once the agent has connected to the signer.
    let held = tokio::task::spawn_blocking(move || silent.accept().unwrap())
        .await
        .unwrap();
    before_stop();
    send_signal(agent.id(), "TERM");
    let status = wait_within(&mut agent, EXIT_WAIT);
    let mut stderr = String::new();
    agent
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    drop(held);
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    stderr
}

/// `meshca agent --once` (a Job, or `kubectl exec` into a replica's pod, whose POD_NAME
/// it inherits) does not take the running leader's Lease for its own: with the Lease held
/// it writes nothing and says so (exit 3). With the Lease free it makes its pass and
/// gives the Lease back, so the replicas need not wait for it to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_once_pass_never_acts_beside_the_leader_and_gives_the_lease_back() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    cluster.put_request("127.0.0.1:1", json!({"restart": {"policy": "never"}}));
    let once = |identity: &str| cluster.agent_once(&env, identity, &[]).output().unwrap();
    let now = meshca::signer::audit::rfc3339(std::time::SystemTime::now());
    cluster.put(
        LEASE,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "meshca-agent", "namespace": NS, "resourceVersion": "7"},
            "spec": {"holderIdentity": "agent-b", "leaseDurationSeconds": 30,
                     "renewTime": now}}),
    );
    cluster.fake.take();
    // The leader's own name: still not the leader.
    let out = once("agent-b");
    let stderr = text(&out.stderr);
    // 3: not the leader, nothing written (not 1: nothing is broken).
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("another replica holds the Lease: this --once pass did nothing"),
        "{stderr}"
    );
    let sent = cluster.fake.take();
    assert!(
        sent.iter().all(|r| r.method == "GET"),
        "{:?}",
        writes(&sent)
    );
    assert_eq!(
        cluster.get(LEASE).unwrap()["spec"]["holderIdentity"],
        "agent-b"
    );

    // Given up by its holder: the pass is made, and the Lease given back.
    cluster.fake.edit(LEASE, |lease| {
        lease["spec"]["holderIdentity"] = Value::Null;
    });
    let out = once("agent-b");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sent = cluster.fake.take();
    assert!(
        sent.iter()
            .any(|r| r.method == "PATCH" && r.path == format!("{VMCSR}/cluster-a/status")),
        "{:?}",
        writes(&sent)
    );
    let lease = cluster.get(LEASE).unwrap();
    assert!(lease["spec"].get("holderIdentity").is_none(), "{lease}");
}

/// The agent reads its requests in pages of 500, as the mesh controller reads, and gives up
/// a list that does not end (here each page answered with the token it was given) with a
/// message saying so, instead of looping in the pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_list_is_paged_and_a_list_that_does_not_end_is_given_up() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    cluster.put_request("127.0.0.1:1", json!({"restart": {"policy": "never"}}));
    cluster.fake.endless_lists(Some(true));
    cluster.fake.take();
    let out = cluster.agent_once(&env, "agent-x", &[]).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the list does not advance"), "{stderr}");
    let sent = cluster.fake.take();
    let lists: Vec<(Option<String>, Option<String>)> = sent
        .iter()
        .filter(|r| r.method == "GET" && r.path == VMCSR)
        .map(|r| (r.param("limit"), r.param("continue")))
        .collect();
    assert_eq!(lists.len(), 2, "{lists:?}");
    assert!(
        lists
            .iter()
            .all(|(limit, _)| limit.as_deref() == Some("500")),
        "{lists:?}"
    );
}

/// A `--once` pass that loses the Lease midway (another replica took it after the
/// Secret was written) writes nothing more, and exits 3 as a pass that never led does: it
/// used to exit 0, its request's failure only logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_once_pass_that_loses_the_lease_midway_exits_3() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request(
        &signer.addr.to_string(),
        json!({"restart": {"policy": "never"}}),
    );
    cluster
        .fake
        .after_write(SECRETS, another_replica_takes_the_lease);
    // A Lease this short is read again before each write (the writing margin is 5 s).
    let out = cluster
        .agent_once(&env, "agent-0", &["--lease-seconds", "6"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("not the leader any more"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert_eq!(
        cluster.get(LEASE).unwrap()["spec"]["holderIdentity"],
        "agent-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_the_api_server_refuses_costs_no_intermediate_and_is_retried_with_backoff() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    // An admission policy (or RBAC, or an immutable Secret) refuses the Secret's apply.
    cluster.fake.refuse_writes(
        SECRETS,
        422,
        "Invalid",
        "Secret \"cacerts\" is invalid: data: Forbidden: field is immutable when `immutable` is set",
    );
    let sent = cluster.pass_with_dry_runs().await;
    // Asked with a dry run first: refused, so the signer was asked for nothing.
    let secret_writes: Vec<Option<String>> = sent
        .iter()
        .filter(|r| is_secret_write(r))
        .map(|r| r.param("dryRun"))
        .collect();
    assert_eq!(secret_writes, [Some("All".to_string())]);
    assert!(
        signer.audit_lines().is_empty(),
        "{:?}",
        signer.audit_lines()
    );
    failed_with(&cluster, "field is immutable");
    // The next passes come sooner than its backoff: this request is left alone.
    for _ in 0..3 {
        let sent = cluster.pass_with_dry_runs().await;
        assert!(
            !sent
                .iter()
                .any(|r| r.path.contains("cluster-a") || r.path.starts_with(SECRETS)),
            "{:?}",
            writes(&sent)
        );
    }
    // A changed spec is tried at once.
    cluster.edit_request(|request| {
        request["spec"]["ttlSeconds"] = 7200.into();
    });
    let sent = cluster.pass_with_dry_runs().await;
    assert!(sent.iter().any(is_secret_write));
    assert!(signer.audit_lines().is_empty());
    // Where a webhook with side effects cannot take a dry run, the apply is the test.
    cluster.fake.refuse_dry_runs(
        SECRETS,
        400,
        "BadRequest",
        "admission webhook \"audit.example.com\" does not support dry run",
    );
    cluster.edit_request(|request| {
        request["spec"]["ttlSeconds"] = 3600.into();
    });
    cluster.pass().await;
    assert_eq!(vmcsr_status(&cluster)["phase"], "Installed");
    assert_eq!(signer.audit_lines().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_a_signing_outlast_a_failing_api_server_without_a_second_signing() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    // The `Requested` status goes through; then the API server fails for a moment (500:
    // kube's own retries, off in the agent, would take a 503 in this test's client).
    let status = format!("{VMCSR}/cluster-a/status");
    let failing = (500, "InternalError", "etcdserver: request timed out");
    cluster.fake.refuse_writes_between(&status, 1, 2, failing);
    let sent = cluster.pass().await;
    assert_eq!(vmcsr_status(&cluster)["phase"], "Installed");
    assert_eq!(signer.audit_lines().len(), 1, "{:?}", signer.audit_lines());
    assert_eq!(
        status_phases(&sent, &status),
        ["Requested", "Issued", "Issued", "Issued", "Installed"]
    );
    assert_secret_is_the_issued_one(&cluster);
    // The Secret's write (after its dry run) fails once too: sent again, the same
    // intermediate.
    cluster.fake.remove(SECRET);
    cluster.fake.refuse_writes_between(SECRETS, 1, 1, failing);
    cluster.pass().await;
    assert_eq!(vmcsr_status(&cluster)["phase"], "Installed");
    assert_eq!(signer.audit_lines().len(), 2, "{:?}", signer.audit_lines());
    assert_secret_is_the_issued_one(&cluster);
    // A Secret write that landed but whose answer was lost: the next try's precondition
    // fails on the agent's own write, which it recognises.
    cluster.fake.remove(SECRET);
    cluster.fake.lose_answers(SECRETS, 1);
    cluster.pass().await;
    assert_eq!(vmcsr_status(&cluster)["phase"], "Installed");
    assert_eq!(signer.audit_lines().len(), 3, "{:?}", signer.audit_lines());
    assert_secret_is_the_issued_one(&cluster);
    // An answer that is the API server's word (403: RBAC) is not sent again.
    cluster.fake.remove(SECRET);
    cluster
        .fake
        .refuse_writes_between(&status, 1, 1, (403, "Forbidden", "cannot patch resource"));
    let sent = cluster.pass().await;
    assert_eq!(
        status_phases(&sent, &status),
        ["Requested", "Issued", "Failed"]
    );
    failed_with(&cluster, "cannot patch resource");
}

/// The phases of the status writes to `path` among `sent`, in order.
fn status_phases(sent: &[Recorded], path: &str) -> Vec<String> {
    sent.iter()
        .filter(|r| r.method == "PATCH" && r.path == path)
        .map(|r| {
            r.body["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// The Secret holds the intermediate the request's status names.
fn assert_secret_is_the_issued_one(cluster: &Cluster) {
    let secret = cluster.fake.get(SECRET).expect("no Secret written");
    let summary = verify_bundle(&secret_files(&secret), None, SystemTime::now()).unwrap();
    assert_eq!(vmcsr_status(cluster)["serial"], summary.serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_request_waits_what_the_signer_asks() {
    // One intermediate a minute: the second in a row is refused with `Retry-After` ~60 s.
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\nsign_requests_per_minute = 1\nsign_burst = 1\n".into(),
        ..EnvSpec::default()
    });
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    cluster.pass().await;
    assert_eq!(vmcsr_status(&cluster)["phase"], "Installed");
    // The Secret is gone: the agent asks again at once, and the signer says when.
    cluster.fake.remove(SECRET);
    let wait = cluster.controller.run_once().await.unwrap();
    failed_with(&cluster, "rate_limited");
    // Its own backoff would come back in 15 s, to be refused again; the signer's word is
    // kept, up to the resync interval (60 s here).
    assert!(
        wait > Duration::from_secs(30) && wait <= Duration::from_secs(60),
        "next pass in {wait:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_renewing_twice_at_once_stays_the_leader() {
    let fake = FakeCluster::start(agent_policy()).await;
    let long = Elector::new(
        Kube::new(fake.client()),
        NS,
        "meshca-agent",
        "agent-0",
        Duration::from_secs(30),
    );
    assert!(long.elect(SystemTime::now()).await.unwrap());
    // The renewer and a pass's check before a write, at one moment: both read the Lease
    // before either writes it. Neither may take the other's write for another replica's.
    fake.slow_get_answers(LEASE, Duration::from_millis(300));
    let (first, second) =
        tokio::join!(long.elect(SystemTime::now()), long.elect(SystemTime::now()));
    assert!(first.unwrap() && second.unwrap());
    assert!(long.is_leader_for(Duration::ZERO));
}

/// A pass that fails by name (`needle` in `lastError`, reason `SignerError`), writing
/// nothing to the Secret, which is still `installed`.
async fn fails_keeping_the_secret(cluster: &Cluster, installed: &Value, needle: &str) {
    let sent = cluster.pass().await;
    assert!(!sent.iter().any(is_secret_write));
    assert_secret_is(cluster, installed);
    let st = failed_with(cluster, needle);
    assert_eq!(st["conditions"][0]["reason"], "SignerError");
}

/// The request's status, which must say `Failed` with `needle` in `lastError`.
fn failed_with(cluster: &Cluster, needle: &str) -> Value {
    let st = vmcsr_status(cluster);
    assert_eq!(st["phase"], "Failed", "{st}");
    assert!(
        st["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains(needle),
        "{needle:?} not in {st}"
    );
    st
}

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_each_request_while_leading_and_drop_deleted_ones() {
    let env = Env::new();
    let signer = env.start_signer();
    // The Role names the second target Secret too, as an operator adds it.
    let policy = agent_policy().named("secrets", &["cacerts", "cacerts-x"]);
    let cluster = Cluster::start_with(&env, Duration::from_secs(30), policy).await;
    cluster.put_request_restarting_nothing(&signer);
    // A second request whose signer cannot be reached, writing another Secret.
    let closed = closed_addr();
    let mut broken = request_object(
        &closed.to_string(),
        json!({"target": {"namespace": "istio-system", "name": "cacerts-x"}}),
    );
    broken["metadata"]["name"] = "cluster-x".into();
    cluster.put(&format!("{VMCSR}/cluster-x"), broken);

    let started = unix(std::time::SystemTime::now());
    cluster.pass().await;
    let text = cluster.metrics.render();
    let a = "{request=\"service-mesh-hub/cluster-a\"}";
    let x = "{request=\"service-mesh-hub/cluster-x\"}";
    let files = secret_files(&cluster.get(SECRET).unwrap());
    let summary = verify_bundle(&files, None, std::time::SystemTime::now()).unwrap();
    let status = vmcsr_status(&cluster);
    let renew_at: k8s_openapi::jiff::Timestamp =
        status["renewAt"].as_str().unwrap().parse().unwrap();
    for (name, value) in [
        (format!("meshca_agent_certificate_ready{a}"), 1),
        (format!("meshca_agent_certificate_ready{x}"), 0),
        (format!("meshca_agent_signer_reachable{a}"), 1),
        (format!("meshca_agent_signer_reachable{x}"), 0),
        (format!("meshca_agent_restart_timed_out{a}"), 0),
        (
            format!("meshca_agent_certificate_expiration_timestamp_seconds{a}"),
            unix(summary.not_after),
        ),
        (
            format!("meshca_agent_certificate_renewal_timestamp_seconds{a}"),
            renew_at.as_second(),
        ),
        ("meshca_agent_issuances_total".into(), 1),
        ("meshca_agent_reconciles_total{outcome=\"ok\"}".into(), 1),
        (
            "meshca_agent_reconciles_total{outcome=\"SignerError\"}".into(),
            1,
        ),
        ("meshca_agent_leader".into(), 1),
        ("meshca_agent_resync_seconds".into(), 60),
        (
            "meshca_agent_client_certificate_expiration_timestamp_seconds".into(),
            certificate_date_unix(&env.path("pki/cluster-a.pem"), "enddate"),
        ),
    ] {
        assert_eq!(
            metric_sample(&text, &name),
            Some(value),
            "{name} in\n{text}"
        );
    }
    assert!(!text.contains(&format!("expiration_timestamp_seconds{x}")));
    assert!(metric_sample(&text, "meshca_agent_last_pass_timestamp_seconds").unwrap() >= started);

    // cluster-x deleted: its series go with it.
    cluster.fake.remove(&format!("{VMCSR}/cluster-x"));
    cluster.pass().await;
    let text = cluster.metrics.render();
    assert!(!text.contains("cluster-x"), "{text}");
    assert_eq!(
        metric_sample(&text, &format!("meshca_agent_certificate_ready{a}")),
        Some(1)
    );

    // Another replica holds the Lease: this one reports no request (the leader does).
    let mut lease = cluster.get(LEASE).unwrap();
    lease["spec"]["holderIdentity"] = "agent-1".into();
    lease["spec"]["renewTime"] =
        meshca::signer::audit::rfc3339(std::time::SystemTime::now()).into();
    cluster.put(LEASE, lease);
    cluster.pass().await;
    let text = cluster.metrics.render();
    assert!(!text.contains("cluster-a"), "{text}");
    assert_eq!(metric_sample(&text, "meshca_agent_leader"), Some(0));
    drop(signer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_never_installs_without_touching_deployments() {
    let env = Env::new();
    let signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request(
        &signer.addr.to_string(),
        json!({"restart": {"policy": "never"}}),
    );
    cluster.put_deployment("istio-system", "istiod", json!({"app": "istiod"}));
    let sent = cluster.pass().await;
    assert!(sent.iter().any(is_secret_write));
    assert!(!sent.iter().any(|r| r.path.contains("/deployments")));
    let st = vmcsr_status(&cluster);
    assert_eq!(st["phase"], "Installed");
    assert!(st.get("restart").is_none(), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_for_another_cluster_comes_from_kubeconfig_yaml() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: other\nclusters:\n- name: remote\n  cluster:\n    server: http://{}\n- name: unused\n  cluster:\n    server: http://127.0.0.1:1\ncontexts:\n- name: remote\n  context:\n    cluster: remote\n    user: agent\n- name: other\n  context:\n    cluster: unused\n    user: agent\nusers:\n- name: agent\n  user: {{}}\n",
        cluster.fake.addr
    );
    let client = meshca::agent::k8s::client_from_kubeconfig(
        &kubeconfig,
        Some("remote"),
        DEFAULT_API_TIMEOUT,
    )
    .await
    .unwrap();
    let found = Kube::new(client)
        .get_secret("istio-system", "cacerts")
        .await
        .unwrap();
    assert!(found.is_none());
    let sent = cluster.fake.take();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].method.as_str(), sent[0].path.as_str()),
        ("GET", SECRET)
    );
    // An https cluster builds its rustls configuration with the aws-lc-rs provider (the
    // only one compiled in): no panic about an ambiguous or missing crypto provider.
    let ca = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(env.path("pki/ca.pem")).unwrap());
    let tls_kubeconfig = kubeconfig.replace(
        &format!("server: http://{}", cluster.fake.addr),
        &format!(
            "server: https://{}\n    certificate-authority-data: {ca}",
            cluster.fake.addr
        ),
    );
    assert!(tls_kubeconfig.contains("certificate-authority-data"));
    meshca::agent::k8s::client_from_kubeconfig(
        &tls_kubeconfig,
        Some("remote"),
        DEFAULT_API_TIMEOUT,
    )
    .await
    .unwrap();
    let err = meshca::agent::k8s::client_from_kubeconfig("not: [yaml", None, DEFAULT_API_TIMEOUT)
        .await
        .err()
        .unwrap();
    assert!(err.contains("kubeconfig"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_next_root_joins_the_secret_and_stays_reported_while_the_signer_is_away() {
    use common::certs::openssl_fingerprint;
    use meshca::agent::rotation::root_fingerprints;
    let env = Env::new();
    let next_sha256 = openssl_fingerprint(env.dir.path(), &env.init_next_root());
    let root_sha256 = openssl_fingerprint(env.dir.path(), &env.path("root-cert.pem"));
    let mut signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request_restarting_nothing(&signer);
    cluster.pass().await;
    let serial = vmcsr_status(&cluster)["serial"].clone();
    assert!(vmcsr_status(&cluster).get("nextRootFingerprint").is_none());

    // Announced: the Secret's root-cert.pem gains it (the intermediate stays), and the
    // status reports it for the mesh controller.
    env.announce_next_root(Some("next-root-cert.pem"));
    send_signal(signer.child.id(), "HUP");
    signer.wait_for_log("SIGHUP: rules reloaded").await;
    let sent = cluster.pass().await;
    assert!(sent.iter().any(is_secret_write));
    let files = secret_files(&cluster.get(SECRET).unwrap());
    assert_eq!(
        root_fingerprints(&files.root_cert),
        [root_sha256.clone(), next_sha256.clone()]
    );
    let st = vmcsr_status(&cluster);
    assert_eq!(st["serial"], serial);
    assert_eq!(st["nextRootFingerprint"], next_sha256.as_str());
    let reachable = condition(&st, "SignerReachable");
    assert_eq!(
        (&reachable["status"], &reachable["reason"]),
        (&json!("True"), &json!("Answered"))
    );
    assert_eq!(
        st["trustedRootFingerprints"],
        json!([root_sha256, next_sha256])
    );

    // The signer away: nothing written, and the announcement is still reported (the mesh
    // controller must not retire the root because one pass could not ask).
    assert!(signer.terminate());
    let sent = cluster.pass().await;
    assert!(!sent.iter().any(is_secret_write));
    let st = vmcsr_status(&cluster);
    assert_eq!(st["nextRootFingerprint"], next_sha256.as_str(), "{st}");
    assert_eq!(st["phase"], "Installed", "{st}");
    // Ready (the intermediate in place is valid and not due), the signer not answering:
    // the condition says so, with the error.
    let ready = condition(&st, "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Installed"))
    );
    let reachable = condition(&st, "SignerReachable");
    assert_eq!(
        (&reachable["status"], &reachable["reason"]),
        (&json!("False"), &json!("Unreachable"))
    );
    assert!(
        reachable["message"]
            .as_str()
            .unwrap()
            .starts_with("cannot reach the signer at https://"),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_root_switch_gateways_wait_for_the_configmap_to_put_the_new_root_first() {
    use common::certs::openssl_fingerprint;
    let env = Env::new();
    let next = env.init_next_root();
    let (r1, r2) = (
        std::fs::read_to_string(env.path("root-cert.pem")).unwrap(),
        std::fs::read_to_string(&next).unwrap(),
    );
    let r2_sha256 = openssl_fingerprint(env.dir.path(), &next);
    // The next root announced from the start: every root-cert.pem holds R1 then R2.
    env.announce_next_root(Some("next-root-cert.pem"));
    let mut signer = env.start_signer();
    let cluster = Cluster::start(&env).await;
    cluster.put_request(
        &signer.addr.to_string(),
        json!({"restart": {"policy": "always"}}),
    );
    let istiod = deployments_path("istio-system", "istiod");
    let gateway = deployments_path("istio-system", "istio-ingressgateway");
    cluster.put_istiod_and_gateway();
    // What istiod wrote after that install: R1 first, the announced R2 second.
    let (path, cm) = configmap("istio-system", &format!("{r1}{r2}"));
    cluster.put(&path, cm);
    cluster.pass().await;
    cluster.pass().await;
    assert_eq!(vmcsr_status(&cluster)["restart"]["stage"], "Complete");

    // The switch: intermediates under R2, R1 announced as the previous root.
    assert!(signer.terminate());
    env.switch_to_next_root();
    env.announce_previous_root(Some("root-cert.pem"));
    let signer = env.start_signer();
    cluster.edit_request(|request| {
        request["spec"]["signer"]["url"] = format!("https://{}", signer.addr).into();
    });
    let sent = cluster.pass().await;
    let st = vmcsr_status(&cluster);
    assert_eq!(st["rootFingerprint"], r2_sha256.as_str(), "{st}");
    // istiod restarts; the gateway waits: its ConfigMap carries R2, but second, as the old
    // istiod wrote it, not first, as the new one will.
    assert_eq!(restarted_paths(&sent), vec![istiod.clone()]);
    assert_eq!(st["restart"]["stage"], "Gateways", "{st}");
    let sent = cluster.pass().await;
    assert!(restarted_paths(&sent).is_empty());

    // The new istiod writes R2 then R1: now the gateway restarts.
    let (path, cm) = configmap("istio-system", &format!("{r2}{r1}"));
    cluster.put(&path, cm);
    let sent = cluster.pass().await;
    assert_eq!(restarted_paths(&sent), vec![gateway]);
}

/// The condition `type_` of a request's status.
fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// An API server answering 503 (a load balancer with no healthy backend): the `--once`
/// pass asks once, fails (exit 1) instead of retrying inside the Kubernetes client for
/// minutes (kube's default: 15 tries, following any Retry-After), and gives the Lease back
/// so the replicas need not wait for it to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_once_pass_the_api_server_answers_503_fails_at_once_and_gives_the_lease_back() {
    let env = Env::new();
    let cluster = Cluster::start(&env).await;
    cluster.put_request("127.0.0.1:1", json!({"restart": {"policy": "never"}}));
    cluster.fake.refuse_reads(Some((
        VMCSR,
        503,
        "ServiceUnavailable",
        "no healthy upstream",
    )));
    cluster.fake.take();
    let out = cluster
        .agent_once(&env, "agent-x", &["--api-timeout-seconds", "2"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let sent = cluster.fake.take();
    let lists = sent
        .iter()
        .filter(|r| r.method == "GET" && r.path == VMCSR)
        .count();
    assert_eq!(lists, 1, "asked again: {stderr}");
    let lease = cluster.get(LEASE).unwrap();
    assert!(lease["spec"].get("holderIdentity").is_none(), "{lease}");
}
