//! Federation: the translation as pure functions against golden files, checked again
//! against invariants computed independently from the inventory; and `meshca federation
//! render` end to end (the real binary, byte for byte, twice).
//!
//! Goldens: tests/golden/federation/<scenario>/ holds virtual-mesh.yaml and inventory.yaml
//! (in) and expected/<cluster>.yaml (out). Where previous-inventory.yaml exists,
//! expected/stale.txt lists what garbage collection deletes going from the previous
//! inventory (and previous-virtual-mesh.yaml, if present) to this one. After an intended change, regenerate and review the diff:
//!
//!     MESHCA_UPDATE_GOLDENS=1 cargo test --test federation
//!
//! CI never sets MESHCA_UPDATE_GOLDENS; without it a difference fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meshca::mesh::inventory::Inventory;
use meshca::mesh::istio::{
    ClientTlsMode, Location, Resolution, ServerTlsMode, ServiceEntry, WorkloadEntry,
};
use meshca::mesh::render::render_cluster;
use meshca::mesh::{
    FederationConfig, FederationPlan, IstioObject, Kind, ObjectId, parse_virtual_mesh, translate,
};

const MESHCA: &str = env!("CARGO_BIN_EXE_meshca");
const UPDATE_ENV: &str = "MESHCA_UPDATE_GOLDENS";

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/federation")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn updating() -> bool {
    std::env::var_os(UPDATE_ENV).is_some_and(|v| v == "1")
}

/// Compares `actual` with the golden file, or rewrites it when regenerating.
fn check_golden(path: &Path, actual: &str) {
    if updating() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = read(path);
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .map_or_else(|| "the end".to_string(), |i| format!("line {}", i + 1));
        panic!(
            "{} differs from the translation (first at {line}).\n--- actual ---\n{actual}\nIf the change is intended, run {UPDATE_ENV}=1 cargo test --test federation and review the diff.",
            path.display()
        );
    }
}

/// Golden files present in `dir` must be exactly `names` (no forgotten leftovers).
fn check_golden_set(dir: &Path, names: &BTreeSet<String>) {
    if updating() {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !names.contains(&name) {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        return;
    }
    let present: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(&present, names, "golden files in {}", dir.display());
}

struct Scenario {
    dir: PathBuf,
    config: FederationConfig,
    inventory: Inventory,
    previous: Option<Inventory>,
    /// From previous-virtual-mesh.yaml when the VirtualMesh changed too.
    previous_config: Option<FederationConfig>,
}

impl Scenario {
    fn previous_config(&self) -> &FederationConfig {
        self.previous_config.as_ref().unwrap_or(&self.config)
    }
}

fn load_config(path: &Path) -> FederationConfig {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let document = parse_virtual_mesh(&name, &read(path)).unwrap();
    FederationConfig::from_document(&document, &name).unwrap()
}

fn load(name: &str) -> Scenario {
    let dir = golden_root().join(name);
    let config = load_config(&dir.join("virtual-mesh.yaml"));
    let previous_vm = dir.join("previous-virtual-mesh.yaml");
    let previous_config = previous_vm.exists().then(|| load_config(&previous_vm));
    let inventory = Inventory::from_yaml("inventory.yaml", &read(&dir.join("inventory.yaml")))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let previous_path = dir.join("previous-inventory.yaml");
    let previous = previous_path
        .exists()
        .then(|| Inventory::from_yaml("previous-inventory.yaml", &read(&previous_path)).unwrap());
    Scenario {
        dir,
        config,
        inventory,
        previous,
        previous_config,
    }
}

/// Renders every cluster, checks the goldens and the invariants; returns the parsed files.
fn run_scenario(name: &str) -> (Scenario, BTreeMap<String, Vec<IstioObject>>) {
    let scenario = load(name);
    let plan = translate(&scenario.config, &scenario.inventory).unwrap();
    let expected_dir = scenario.dir.join("expected");
    let mut names = BTreeSet::new();
    let mut parsed = BTreeMap::new();
    for cluster in plan.clusters() {
        let yaml = render_cluster(&plan, cluster).unwrap();
        // Same input, same bytes.
        assert_eq!(yaml, render_cluster(&plan, cluster).unwrap());
        let file = format!("{cluster}.yaml");
        check_golden(&expected_dir.join(&file), &yaml);
        names.insert(file);
        parsed.insert(cluster.to_string(), parse_objects(&yaml));
    }
    if let Some(previous) = &scenario.previous {
        let before = translate(scenario.previous_config(), previous).unwrap();
        check_golden(
            &expected_dir.join("stale.txt"),
            &stale_report(&before, &plan),
        );
        names.insert("stale.txt".into());
    }
    check_golden_set(&expected_dir, &names);
    check_invariants(&scenario, &parsed);
    (scenario, parsed)
}

fn parse_objects(yaml: &str) -> Vec<IstioObject> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).unwrap();
    docs.into_iter()
        .filter(|d| !d.is_null())
        .map(|d| IstioObject::from_value(d).unwrap())
        .collect()
}

/// "cluster: Kind namespace/name" for every object the new plan deletes, given that each
/// cluster holds what the previous plan put there.
fn stale_report(before: &FederationPlan<'_>, after: &FederationPlan<'_>) -> String {
    let mut out = String::new();
    for cluster in before.clusters() {
        let existing: Vec<ObjectId> = before.objects(cluster).unwrap().map(|o| o.id()).collect();
        for id in after.stale_objects(cluster, &existing) {
            out.push_str(&format!("{cluster}: {id}\n"));
        }
    }
    if out.is_empty() {
        out.push_str("(nothing to delete)\n");
    }
    out
}

/// What each cluster must hold, derived from the inventory here rather than by the code
/// under test, then compared with the parsed output.
fn check_invariants(scenario: &Scenario, parsed: &BTreeMap<String, Vec<IstioObject>>) {
    let config = &scenario.config;
    let clusters = &scenario.inventory.clusters;
    let federating = config.mode.is_some() && clusters.len() > 1;
    let selected = |name: &str| {
        let cluster = clusters.iter().find(|c| c.name == name).unwrap();
        cluster
            .services
            .iter()
            .filter(|s| federating && config.selector.matches(s))
            .collect::<Vec<_>>()
    };
    let vm_labels = [
        ("app.kubernetes.io/managed-by", "meshca"),
        ("meshca.io/virtual-mesh", config.virtual_mesh.name.as_str()),
        (
            "meshca.io/virtual-mesh-namespace",
            config.virtual_mesh.namespace.as_str(),
        ),
    ];
    // host -> address, which must agree across importing clusters and be unique.
    let mut addresses: BTreeMap<String, String> = BTreeMap::new();
    assert_eq!(
        parsed.keys().collect::<BTreeSet<_>>(),
        clusters.iter().map(|c| &c.name).collect::<BTreeSet<_>>()
    );
    for target in clusters {
        let objects = &parsed[&target.name];
        let exports = selected(&target.name);
        let imports: usize = clusters
            .iter()
            .filter(|c| c.name != target.name)
            .map(|c| selected(&c.name).len())
            .sum();
        let mut entries: BTreeMap<String, &ServiceEntry> = BTreeMap::new();
        let (mut gateways, mut rules) = (0, 0);
        for object in objects {
            let meta = object.metadata();
            assert_eq!(meta.namespace, target.istio_namespace, "{}", object.id());
            for (k, v) in vm_labels {
                assert_eq!(
                    meta.labels.get(k).map(String::as_str),
                    Some(v),
                    "{k} on {}",
                    object.id()
                );
            }
            match object {
                IstioObject::Gateway(gw) => {
                    gateways += 1;
                    assert_eq!(gw.api_version, "networking.istio.io/v1");
                    let server = &gw.spec.servers[0];
                    assert_eq!(server.port.number, u32::from(target.gateway_port));
                    assert_eq!(server.port.protocol, "TLS");
                    assert_eq!(server.hosts, [format!("*.{}", config.host_suffix)]);
                    assert_eq!(
                        server.tls.as_ref().unwrap().mode,
                        ServerTlsMode::AutoPassthrough
                    );
                    assert_eq!(gw.spec.selector["istio"], "eastwestgateway");
                }
                IstioObject::DestinationRule(dr) => {
                    rules += 1;
                    assert_eq!(dr.spec.host, format!("*.{}", config.host_suffix));
                    // Explicit: a mesh-wide exportTo default must not hide it.
                    assert_eq!(dr.spec.export_to, ["*"]);
                    let tls = dr.spec.traffic_policy.as_ref().unwrap().tls.as_ref();
                    assert_eq!(tls.unwrap().mode, ClientTlsMode::IstioMutual);
                }
                IstioObject::ServiceEntry(se) => {
                    assert_eq!(se.spec.hosts, std::slice::from_ref(&meta.name));
                    assert!(entries.insert(meta.name.clone(), se).is_none());
                }
            }
        }
        assert_eq!(
            gateways,
            usize::from(!exports.is_empty()),
            "{}",
            target.name
        );
        assert_eq!(rules, usize::from(imports > 0), "{}", target.name);
        assert_eq!(entries.len(), exports.len() + imports, "{}", target.name);

        for source in clusters {
            for service in selected(&source.name) {
                let host = format!(
                    "{}.{}.svc.{}.{}",
                    service.name, service.namespace, source.name, config.host_suffix
                );
                let se = entries
                    .get(&host)
                    .unwrap_or_else(|| panic!("{}: no ServiceEntry for {host}", target.name));
                let spec = &se.spec;
                assert_eq!(spec.location, Some(Location::MeshInternal));
                assert_eq!(
                    se.metadata.labels.get("meshca.io/source-cluster"),
                    Some(&source.name)
                );
                let ports: Vec<(u32, String)> = spec
                    .ports
                    .iter()
                    .map(|p| (p.number, p.name.clone()))
                    .collect();
                let wanted: Vec<(u32, String)> = service
                    .ports
                    .iter()
                    .map(|p| (u32::from(p.number), p.name()))
                    .collect();
                assert_eq!(ports, wanted, "{host}");
                let target_ports: Vec<Option<u32>> =
                    spec.ports.iter().map(|p| p.target_port).collect();
                if source.name == target.name {
                    // The exporting cluster's own entry: only its gateway sees it. A
                    // headless service's name resolves to its pods: the gateway dials
                    // their port.
                    let wanted_targets: Vec<Option<u32>> = service
                        .ports
                        .iter()
                        .map(|p| p.target_port.map(u32::from))
                        .collect();
                    assert_eq!(target_ports, wanted_targets, "{host}");
                    assert_eq!(spec.export_to, ["."]);
                    assert_eq!(spec.resolution, Some(Resolution::Dns));
                    assert!(spec.addresses.is_empty());
                    assert_eq!(
                        spec.endpoints,
                        [WorkloadEntry {
                            address: format!(
                                "{}.{}.svc.{}",
                                service.name, service.namespace, source.cluster_domain
                            ),
                            ports: BTreeMap::new(),
                            labels: service.labels.clone(),
                        }]
                    );
                    continue;
                }
                assert!(target_ports.iter().all(Option::is_none), "{host}");
                assert_eq!(spec.export_to, ["*"], "{host}");
                let all_ips = source
                    .gateway_addresses
                    .iter()
                    .all(|a| a.parse::<IpAddr>().is_ok());
                let resolution = if all_ips {
                    Resolution::Static
                } else {
                    Resolution::Dns
                };
                assert_eq!(spec.resolution, Some(resolution), "{host}");
                let endpoints: Vec<WorkloadEntry> = source
                    .gateway_addresses
                    .iter()
                    .map(|address| WorkloadEntry {
                        address: address.clone(),
                        ports: wanted
                            .iter()
                            .map(|(_, name)| (name.clone(), u32::from(source.gateway_port)))
                            .collect(),
                        labels: service.labels.clone(),
                    })
                    .collect();
                assert_eq!(spec.endpoints, endpoints, "{host}");
                assert_eq!(spec.addresses.len(), 1, "{host}");
                let address: Ipv4Addr = spec.addresses[0].parse().unwrap();
                assert_eq!(address.octets()[0] & 0xF0, 240, "{host}: {address}");
                let previous = addresses.insert(host.clone(), spec.addresses[0].clone());
                if let Some(previous) = previous {
                    assert_eq!(
                        previous, spec.addresses[0],
                        "{host} differs across clusters"
                    );
                }
            }
        }
    }
    let unique: BTreeSet<&String> = addresses.values().collect();
    assert_eq!(
        unique.len(),
        addresses.len(),
        "addresses must be unique: {addresses:?}"
    );
}

fn hosts(objects: &[IstioObject]) -> Vec<String> {
    objects
        .iter()
        .filter(|o| o.kind() == Kind::ServiceEntry)
        .map(|o| o.metadata().name.clone())
        .collect()
}

#[test]
fn two_clusters() {
    let (_, parsed) = run_scenario("two-clusters");
    assert_eq!(
        hosts(&parsed["mgmt"]),
        [
            "productpage.bookinfo.svc.mgmt.mesh.internal",
            "reviews.bookinfo.svc.mgmt.mesh.internal",
            "details.bookinfo.svc.remote.mesh.internal",
            "ratings.bookinfo.svc.remote.mesh.internal",
        ]
    );
    assert_eq!(parsed["remote"].len(), 6);
}

#[test]
fn three_clusters() {
    let (_, parsed) = run_scenario("three-clusters");
    // north only consumes: a DestinationRule and three imported entries, no Gateway.
    let kinds: Vec<Kind> = parsed["north"].iter().map(IstioObject::kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::DestinationRule,
            Kind::ServiceEntry,
            Kind::ServiceEntry,
            Kind::ServiceEntry
        ]
    );
    assert!(
        parsed["north"]
            .iter()
            .all(|o| o.metadata().namespace == "istio-config")
    );
    // west's headless payments: its own gateway dials the pods' port.
    let local = parsed["west"]
        .iter()
        .find_map(|o| match o {
            IstioObject::ServiceEntry(se) if se.metadata.name.starts_with("payments.") => Some(se),
            _ => None,
        })
        .unwrap();
    let ports: Vec<(u32, Option<u32>)> = local
        .spec
        .ports
        .iter()
        .map(|p| (p.number, p.target_port))
        .collect();
    assert_eq!(ports, [(8443, Some(9443)), (9090, None)]);
}

#[test]
fn service_added() {
    let (scenario, parsed) = run_scenario("service-added");
    assert!(
        hosts(&parsed["mgmt"]).contains(&"mongodb.bookinfo.svc.remote.mesh.internal".to_string())
    );
    assert_eq!(
        read(&scenario.dir.join("expected/stale.txt")),
        "(nothing to delete)\n"
    );
}

#[test]
fn service_removed() {
    let (scenario, parsed) = run_scenario("service-removed");
    assert!(
        !hosts(&parsed["mgmt"])
            .iter()
            .any(|h| h.starts_with("ratings."))
    );
    assert_eq!(
        read(&scenario.dir.join("expected/stale.txt")),
        "mgmt: ServiceEntry istio-system/ratings.bookinfo.svc.remote.mesh.internal\n\
         remote: ServiceEntry istio-system/ratings.bookinfo.svc.remote.mesh.internal\n"
    );
}

#[test]
fn port_renamed() {
    let (scenario, parsed) = run_scenario("port-renamed");
    let IstioObject::ServiceEntry(se) = parsed["remote"]
        .iter()
        .find(|o| o.metadata().name == "reviews.bookinfo.svc.mgmt.mesh.internal")
        .unwrap()
    else {
        panic!("not a ServiceEntry")
    };
    assert_eq!(se.spec.ports[0].name, "http-api");
    assert_eq!(se.spec.endpoints[0].ports["http-api"], 15443);
    // Same objects, new content: updated in place, nothing deleted.
    assert_eq!(
        read(&scenario.dir.join("expected/stale.txt")),
        "(nothing to delete)\n"
    );
}

#[test]
fn address_collision() {
    let scenario = load("address-collision");
    let plan = translate(&scenario.config, &scenario.inventory).unwrap();
    assert_eq!(plan.moved_addresses(), 1);
    drop(plan);
    let (_, parsed) = run_scenario("address-collision");
    let address = |cluster: &str, host: &str| {
        let Some(IstioObject::ServiceEntry(se)) =
            parsed[cluster].iter().find(|o| o.metadata().name == host)
        else {
            panic!("{cluster}: no ServiceEntry {host}")
        };
        se.spec.addresses[0].clone()
    };
    // The plain hash of (app-16297, shop, east), computed independently (SHA-256, first 32
    // bits, low 28 into 240.0.0.0/4); west's service hashes to the same address.
    let east = address("west", "app-16297.shop.svc.east.mesh.internal");
    let west = address("east", "app-22139.shop.svc.west.mesh.internal");
    assert_eq!(east, "240.193.238.197");
    assert_ne!(west, east);
}

#[test]
fn selector() {
    let (_, parsed) = run_scenario("selector");
    assert_eq!(
        hosts(&parsed["east"]),
        [
            "reviews.bookinfo.svc.east.mesh.example.com",
            "ratings.bookinfo.svc.west.mesh.example.com"
        ]
    );
    assert_eq!(
        hosts(&parsed["west"]),
        [
            "reviews.bookinfo.svc.east.mesh.example.com",
            "ratings.bookinfo.svc.west.mesh.example.com"
        ]
    );
}

#[test]
fn federation_disabled_deletes_everything() {
    let (scenario, parsed) = run_scenario("federation-disabled");
    assert!(parsed.values().all(Vec::is_empty));
    let stale = read(&scenario.dir.join("expected/stale.txt"));
    assert_eq!(stale.lines().count(), 12, "{stale}");
}

#[test]
fn stale_objects_never_include_what_is_desired_and_a_departed_cluster_loses_everything() {
    let scenario = load("two-clusters");
    let plan = translate(&scenario.config, &scenario.inventory).unwrap();
    let desired: Vec<ObjectId> = plan.objects("mgmt").unwrap().map(|o| o.id()).collect();
    let mut existing = desired.clone();
    let extra = ObjectId {
        kind: Kind::Gateway,
        namespace: "istio-system".into(),
        name: "old-federation".into(),
    };
    existing.push(extra.clone());
    // Same name, other namespace (istioNamespace changed): stale too.
    let moved = ObjectId {
        namespace: "istio-old".into(),
        ..desired[0].clone()
    };
    existing.push(moved.clone());
    let stale = plan.stale_objects("mgmt", &existing);
    assert_eq!(stale, [&moved, &extra]);
    let gone = plan.stale_objects("not-a-member", &existing);
    assert_eq!(gone.len(), existing.len());
    assert_eq!(
        plan.config().label_selector(),
        "meshca.io/virtual-mesh=virtual-mesh,meshca.io/virtual-mesh-namespace=service-mesh-hub"
    );
}

// ---- meshca federation render, end to end ----

fn render(vm: &Path, inventory: &Path, out_dir: &Path) -> Output {
    Command::new(MESHCA)
        .args(["federation", "render", "--virtual-mesh"])
        .arg(vm)
        .arg("--inventory")
        .arg(inventory)
        .arg("--out-dir")
        .arg(out_dir)
        .output()
        .expect("run meshca")
}

fn render_ok(vm: &Path, inventory: &Path, out_dir: &Path) -> String {
    let out = render(vm, inventory, out_dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "render failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn dir_contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The files the translation gives for a scenario (itself checked against the goldens).
fn expected_files(name: &str) -> BTreeMap<String, Vec<u8>> {
    let scenario = load(name);
    let plan = translate(&scenario.config, &scenario.inventory).unwrap();
    plan.clusters()
        .map(|c| {
            (
                format!("{c}.yaml"),
                render_cluster(&plan, c).unwrap().into_bytes(),
            )
        })
        .collect()
}

#[test]
fn render_writes_the_translation_byte_for_byte_and_again_the_same() {
    for name in ["two-clusters", "three-clusters"] {
        let scenario = golden_root().join(name);
        let tmp = tempfile::tempdir().unwrap();
        let out_dir = tmp.path().join("out");
        let vm = scenario.join("virtual-mesh.yaml");
        let inventory = scenario.join("inventory.yaml");
        let stdout = render_ok(&vm, &inventory, &out_dir);
        let first = dir_contents(&out_dir);
        let expected = expected_files(name);
        assert_eq!(
            first.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        for (file, bytes) in &expected {
            assert!(
                first[file] == *bytes,
                "{name}: {file} differs from the translation"
            );
            assert!(stdout.contains(file.as_str()), "{stdout}");
        }
        render_ok(&vm, &inventory, &out_dir);
        assert_eq!(dir_contents(&out_dir), first, "{name}: second run differs");
    }
}

#[test]
fn render_replaces_its_files_and_removes_only_its_own_stale_ones() {
    let scenario = golden_root().join("two-clusters");
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path();
    let own = "# meshca federation render: VirtualMesh service-mesh-hub/virtual-mesh, cluster gone\n---\n";
    let other_vm = "# meshca federation render: VirtualMesh other/vm, cluster gone2\n";
    std::fs::write(out_dir.join("gone.yaml"), own).unwrap();
    std::fs::write(out_dir.join("gone2.yaml"), other_vm).unwrap();
    std::fs::write(out_dir.join("notes.yaml"), "kind: Note\n").unwrap();
    std::fs::write(out_dir.join("mgmt.yaml"), "stale content\n").unwrap();
    let stdout = render_ok(
        &scenario.join("virtual-mesh.yaml"),
        &scenario.join("inventory.yaml"),
        out_dir,
    );
    assert!(
        stdout.contains("removed") && stdout.contains("gone.yaml"),
        "{stdout}"
    );
    let files = dir_contents(out_dir);
    assert_eq!(
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        ["gone2.yaml", "mgmt.yaml", "notes.yaml", "remote.yaml"]
    );
    assert_eq!(
        files["mgmt.yaml"],
        expected_files("two-clusters")["mgmt.yaml"]
    );
    assert_eq!(files["notes.yaml"], b"kind: Note\n");
}

#[test]
fn render_refuses_bad_input_naming_the_problem_and_writes_nothing() {
    let base = golden_root().join("two-clusters");
    let vm = read(&base.join("virtual-mesh.yaml"));
    let inventory = read(&base.join("inventory.yaml"));
    let remote_mesh = "service-mesh-hub/istio-istio-system-new-remote-cluster";
    let cases: Vec<(String, String, &str)> = vec![
        (
            vm.replace("  - name: istio-istio-system-new-remote-cluster\n    namespace: service-mesh-hub\n", "  - name: istio-istio-system-new-remote-cluster\n    namespace: service-mesh-hub\n  - name: third\n    namespace: service-mesh-hub\n"),
            inventory.clone(),
            "VirtualMesh service-mesh-hub/virtual-mesh lists mesh service-mesh-hub/third, but no cluster in the inventory has that mesh",
        ),
        (
            vm.clone(),
            inventory.replace(remote_mesh, "service-mesh-hub/stranger"),
            "cluster remote has mesh service-mesh-hub/stranger, which is not a member of VirtualMesh service-mesh-hub/virtual-mesh",
        ),
        (
            vm.clone(),
            inventory.replace("  - name: ratings\n", "  - name: details\n"),
            "cluster remote: service bookinfo/details is listed twice",
        ),
        (
            vm.clone(),
            inventory.replace("198.51.100.7", "198.51.100.700"),
            "cluster remote: gatewayAddresses[0] \"198.51.100.700\" is neither an IP address nor a DNS name",
        ),
        (
            vm.replace("mode: PERMISSIVE", "mode: STRICT"),
            inventory.clone(),
            "spec.federation.mode \"STRICT\" is not supported",
        ),
        (
            vm.replace("  shared: {}\n", "  limited: {}\n"),
            inventory.clone(),
            "the limited trust model is not supported",
        ),
        (
            vm.replace("mode: PERMISSIVE", "mode: PERMISSIVE\n    exportTo: [all]"),
            inventory.clone(),
            "spec.federation.exportTo is not supported",
        ),
        (
            vm.replace("mode: PERMISSIVE", "mode: PERMISSIVE\n    selector: {namespace: [a]}"),
            inventory.clone(),
            "spec.federation.selector: unknown field `namespace`",
        ),
        (
            vm.replace("enforceAccessControl: false", "enforceAccessControl: true"),
            inventory.clone(),
            "spec.enforceAccessControl: true is not supported",
        ),
        (
            vm.replace("kind: VirtualMesh", "kind: Mesh"),
            inventory.clone(),
            "expected VirtualMesh",
        ),
        (
            format!("{vm}---\n{vm}"),
            inventory.clone(),
            "expected exactly one VirtualMesh document, found 2",
        ),
        (
            vm.clone(),
            inventory.replace("trustDomain: mgmt.local", "trustDomain: mgmt.local\n  gateway: x"),
            "unknown field `gateway`",
        ),
    ];
    for (vm_text, inventory_text, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let vm_path = tmp.path().join("vm.yaml");
        let inventory_path = tmp.path().join("inventory.yaml");
        std::fs::write(&vm_path, &vm_text).unwrap();
        std::fs::write(&inventory_path, &inventory_text).unwrap();
        let out_dir = tmp.path().join("out");
        let out = render(&vm_path, &inventory_path, &out_dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted; expected {needle:?}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
        assert!(
            !out_dir.exists(),
            "{needle}: output written despite the error"
        );
    }
    // A missing file is named too.
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.yaml");
    let out = render(
        &missing,
        &base.join("inventory.yaml"),
        &tmp.path().join("out"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));
}
