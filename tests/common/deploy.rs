//! Offline checks of the manifests under deploy/ shared by the deploy tests: reading YAML
//! documents, `meshca crds --for` against a checked-in file, `kubernetes-validate --strict`
//! on the built-in kinds, kustomization completeness, and RBAC rules flattened for
//! least-privilege assertions.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{MESHCA, installed_tool, repo, run, run_ok, text};

/// Every YAML document of a file, as JSON values.
pub fn documents(path: &Path) -> Vec<Value> {
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

/// The `.yaml` files of a directory, sorted.
pub fn manifests(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The validator `scripts/install-deps.sh` installs (in var/tools/python, or on PATH).
pub fn kubernetes_validate() -> PathBuf {
    installed_tool(
        "var/tools/python/bin/kubernetes-validate",
        "kubernetes-validate",
    )
}

/// `meshca crds --for <component>` printed; asserts it is `file` byte for byte and returns
/// the file's bytes.
pub fn assert_crds_file_is_printed(component: &str, file: &Path) -> Vec<u8> {
    let printed = run_ok(Command::new(MESHCA).args(["crds", "--for", component]));
    let on_disk = std::fs::read(file).unwrap();
    let rel = file.strip_prefix(repo()).unwrap_or(file).display();
    assert!(
        printed.stdout == on_disk,
        "{rel} is stale: regenerate with `meshca crds --for {component} > {rel}`"
    );
    on_disk
}

/// Runs `kubernetes-validate --strict` on every manifest of `dirs` made only of built-in
/// kinds (no meshca.dev custom resources, no kustomizations); asserts each passes and
/// returns the documents checked.
pub fn assert_built_in_kinds_validate(dirs: &[PathBuf]) -> Vec<Value> {
    let validator = kubernetes_validate();
    let mut checked = Vec::new();
    for dir in dirs {
        for path in manifests(dir) {
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
            checked.extend(docs);
        }
    }
    checked
}

/// Asserts that `dir/kustomization.yaml` lists every manifest of `dir` but itself and
/// the `optional` ones.
pub fn assert_kustomization_lists_every_manifest(dir: &Path, optional: &[&str]) {
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    let mut listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    listed.sort();
    let expected: Vec<String> = manifests(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml" && !optional.contains(&n.as_str()))
        .collect();
    assert_eq!(listed, expected, "{}", dir.display());
}

/// The names of a CRD version's printer columns, in order.
pub fn column_names(version: &Value) -> Vec<&str> {
    version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

/// The required properties of an object schema, sorted.
pub fn required_sorted(schema: &Value) -> Vec<&str> {
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    required.sort();
    required
}

/// One RBAC rule with the object that holds it.
#[derive(Debug)]
pub struct Rule {
    pub kind: String,
    /// The Role's or ClusterRole's name.
    pub name: String,
    pub namespace: String,
    pub groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    /// resourceNames.
    pub names: Vec<String>,
}

/// Every rule of every document in `path`.
pub fn rules(path: &Path) -> Vec<Rule> {
    let mut out = Vec::new();
    for doc in documents(path) {
        for rule in doc["rules"].as_array().into_iter().flatten() {
            let list = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            let meta = |key: &str| doc["metadata"][key].as_str().unwrap_or("").to_string();
            out.push(Rule {
                kind: doc["kind"].as_str().unwrap().to_string(),
                name: meta("name"),
                namespace: meta("namespace"),
                groups: list("apiGroups"),
                resources: list("resources"),
                verbs: list("verbs"),
                names: list("resourceNames"),
            });
        }
    }
    out
}

/// A controller's Deployment passes `--metrics-listen=ADDR:PORT` (a flag the binary
/// accepts), declares that port as `metrics`, probes `/healthz` on it and tells scrapers
/// about it.
pub fn assert_metrics_port_declared(deployment: &Path) {
    let docs = documents(deployment);
    let pod = &docs[0]["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let listen = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-listen="))
        .expect("the Deployment passes --metrics-listen");
    let port: u64 = listen.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(container["ports"][0]["name"], "metrics");
    assert_eq!(container["ports"][0]["containerPort"], port);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        port.to_string()
    );
    // The binary parses the arguments as written: with --once added it gets as far as
    // refusing that combination, which needs no cluster.
    let out = run(Command::new(MESHCA).args(&args).arg("--once"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'--metrics-listen <ADDR>' cannot be used with '--once'"),
        "{stderr}"
    );
}

/// The pod's terminationGracePeriodSeconds leaves the controller (the Deployment's
/// container arguments) time, after its stop grace, to give the Lease up: else the
/// kubelet kills it first and the next replica waits for the Lease to expire.
pub fn assert_termination_outwaits_the_stop_grace(deployment: &Path) {
    let docs = documents(deployment);
    let pod = &docs[0]["spec"]["template"]["spec"];
    let termination = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("the Deployment sets terminationGracePeriodSeconds");
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let stop_grace = match args
        .iter()
        .find_map(|a| a.strip_prefix("--stop-grace-seconds="))
    {
        Some(given) => given.parse::<u64>().unwrap(),
        // The default, as `--help` states it.
        None => {
            let help = text(&run(Command::new(MESHCA).arg(args[0]).arg("--help")).stdout);
            let after = help.split("--stop-grace-seconds").nth(1).unwrap();
            let default = after.split("[default: ").nth(1).unwrap();
            default.split(']').next().unwrap().parse().unwrap()
        }
    };
    // Giving the Lease up is one read and one write, waited for at most 5 s
    // (`election::RELEASE_WAIT`).
    assert!(
        termination >= stop_grace + 5,
        "terminationGracePeriodSeconds {termination} leaves no time after the stop grace of {stop_grace} s"
    );
}

/// The one object of kind `kind` among the manifests the kustomization of `dir` applies.
pub fn applied_object(dir: &Path, kind: &str) -> Value {
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    let mut found: Vec<Value> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| documents(&dir.join(r.as_str().unwrap())))
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "{}: one {kind}", dir.display());
    found.remove(0)
}

/// The Deployment the kustomization of `dir` applies keeps one replica through a node's
/// loss or drain: two replicas, spread over nodes (by hostname, preferred: one node still
/// runs both), and a PodDisruptionBudget selecting exactly its pods that lets one go at a
/// time (maxUnavailable 1, or minAvailable 1).
pub fn assert_replicas_spread_and_budgeted(dir: &Path) {
    let deployment = applied_object(dir, "Deployment");
    let pdb = applied_object(dir, "PodDisruptionBudget");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let selector = &deployment["spec"]["selector"];
    let pod = &deployment["spec"]["template"];
    for (key, value) in selector["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][key], value, "pods carry {key}");
    }
    assert_eq!(
        pdb["metadata"]["namespace"],
        deployment["metadata"]["namespace"]
    );
    assert_eq!(
        &pdb["spec"]["selector"], selector,
        "the budget covers the pods"
    );
    let budget = (&pdb["spec"]["maxUnavailable"], &pdb["spec"]["minAvailable"]);
    assert!(
        budget == (&Value::from(1), &Value::Null) || budget == (&Value::Null, &Value::from(1)),
        "one replica at a time: {budget:?}"
    );
    let spread = pod["spec"]["topologySpreadConstraints"]
        .as_array()
        .expect("topologySpreadConstraints");
    assert!(
        spread.iter().any(|c| {
            c["topologyKey"] == "kubernetes.io/hostname"
                && c["maxSkew"] == 1
                && c["whenUnsatisfiable"] == "ScheduleAnyway"
                && &c["labelSelector"] == selector
        }),
        "spread by hostname over the Deployment's own pods: {spread:?}"
    );
}

/// The namespace `path` defines enforces the restricted Pod Security Standard.
pub fn assert_namespace_enforces_restricted(path: &Path) {
    let docs = documents(path);
    assert_eq!(docs[0]["kind"], "Namespace");
    assert_eq!(
        docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted",
        "{}",
        path.display()
    );
}

/// A pod template passes the restricted Pod Security Standard (the rules the API server's
/// admission applies with `pod-security.kubernetes.io/enforce: restricted`): no host
/// namespaces, ports or paths, volume types of the restricted list, and for every
/// container: not privileged, no privilege escalation, every capability dropped (only
/// NET_BIND_SERVICE may be added), non-root (pod or container), not user 0, a
/// RuntimeDefault or Localhost seccomp profile (pod or container), default procMount.
pub fn assert_pod_meets_restricted(pod: &Value) {
    let spec = &pod["spec"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(spec[host], true, "{host}");
    }
    const VOLUMES: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let kinds: Vec<&String> = volume
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "name")
            .collect();
        assert!(
            kinds.iter().all(|k| VOLUMES.contains(&k.as_str())),
            "volume type {kinds:?}"
        );
    }
    let pod_ctx = &spec["securityContext"];
    let containers = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().cloned().unwrap_or_default());
    let mut count = 0;
    for container in containers {
        count += 1;
        let ctx = &container["securityContext"];
        let name = &container["name"];
        assert_ne!(ctx["privileged"], true, "{name}: privileged");
        assert_eq!(
            ctx["allowPrivilegeEscalation"], false,
            "{name}: allowPrivilegeEscalation"
        );
        assert_eq!(
            ctx["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}"
        );
        for added in ctx["capabilities"]["add"].as_array().into_iter().flatten() {
            assert_eq!(added, "NET_BIND_SERVICE", "{name}: adds {added}");
        }
        let either = |key: &str| {
            if ctx[key].is_null() {
                pod_ctx[key].clone()
            } else {
                ctx[key].clone()
            }
        };
        assert_eq!(either("runAsNonRoot"), true, "{name}: runAsNonRoot");
        assert_ne!(either("runAsUser"), 0, "{name}: runAsUser 0");
        let seccomp = either("seccompProfile");
        assert!(
            seccomp["type"] == "RuntimeDefault" || seccomp["type"] == "Localhost",
            "{name}: seccompProfile {seccomp}"
        );
        assert!(
            ctx["procMount"].is_null() || ctx["procMount"] == "Default",
            "{name}: procMount"
        );
        for port in container["ports"].as_array().into_iter().flatten() {
            assert!(
                port["hostPort"].is_null() || port["hostPort"] == 0,
                "{name}: hostPort"
            );
        }
    }
    assert!(count > 0, "no containers");
}
