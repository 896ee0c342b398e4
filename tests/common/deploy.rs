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
