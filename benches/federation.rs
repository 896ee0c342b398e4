//! Federation benchmark (`make bench-federation`): 100 clusters x 1,000 services each.
//! Target: the translation in under 1 s on one core, peak memory under 200 MiB.
//!
//! Timed as "translation" (single-threaded): building the plan (validation, selector,
//! address allocation with collision detection, hosts), then listing every cluster's
//! desired objects (kind, namespace, name: what garbage collection compares; 9.9 million
//! entries), then building every distinct object as a typed Istio object once. Reported
//! apart: garbage collection for one cluster, and one cluster's rendered YAML.
//!
//! Time: min and median wall time of 5 runs, and the CPU time of the thread (from
//! /proc/thread-self/schedstat), which other work on a shared machine does not inflate; the
//! target is checked on the median CPU time. Peak memory is the process's VmHWM from
//! /proc/self/status (inventory included).
//! Sizes can be changed with FEDERATION_BENCH_CLUSTERS / FEDERATION_BENCH_SERVICES.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use meshca::mesh::inventory::{ClusterInventory, Inventory, PortInventory, ServiceInventory};
use meshca::mesh::{FederationConfig, FederationPlan, ObjectId, parse_virtual_mesh, translate};

const RUNS: usize = 5;

fn env_size(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Time this thread has spent on a CPU (ns): unlike wall time, not inflated by other
/// processes on a shared machine.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn inventory(clusters: usize, services: usize) -> (String, Inventory) {
    let mut vm = String::from(
        "apiVersion: networking.smh.solo.io/v1alpha1\nkind: VirtualMesh\nmetadata:\n  name: bench\n  namespace: service-mesh-hub\nspec:\n  certificateAuthority:\n    builtin:\n      ttlDays: 365\n      rsaKeySizeBytes: 4096\n      orgName: bench\n  federation:\n    mode: PERMISSIVE\n  shared: {}\n  meshes:\n",
    );
    let mut inv = Inventory::default();
    for c in 0..clusters {
        let name = format!("cluster-{c:03}");
        vm.push_str(&format!(
            "  - name: {name}\n    namespace: service-mesh-hub\n"
        ));
        let services = (0..services)
            .map(|s| ServiceInventory {
                name: format!("svc-{s:04}"),
                namespace: format!("ns-{:02}", s % 20),
                labels: BTreeMap::from([
                    ("app".to_string(), format!("svc-{s:04}")),
                    ("version".to_string(), "v1".to_string()),
                ]),
                headless: false,
                ports: vec![
                    PortInventory {
                        number: 8080,
                        name: Some("http".into()),
                        protocol: None,
                        target_port: None,
                    },
                    PortInventory {
                        number: 9090,
                        name: Some("grpc".into()),
                        protocol: None,
                        target_port: None,
                    },
                ],
            })
            .collect();
        inv.clusters.push(ClusterInventory {
            mesh: format!("service-mesh-hub/{name}")
                .parse()
                .expect("mesh ref"),
            trust_domain: format!("{name}.local"),
            istio_namespace: "istio-system".into(),
            cluster_domain: "cluster.local".into(),
            gateway_addresses: vec![format!("10.{}.0.1", c % 256), format!("10.{}.0.2", c % 256)],
            gateway_port: 15443,
            services,
            name,
        });
    }
    (vm, inv)
}

/// Lists every cluster's objects (kind, namespace, name).
fn list(plan: &FederationPlan<'_>) -> usize {
    let mut listed = 0;
    for cluster in plan.clusters() {
        for object in plan.objects(cluster).expect("cluster in plan") {
            black_box((object.kind(), object.namespace(), object.name()));
            listed += 1;
        }
    }
    listed
}

/// Builds each distinct object once: in every cluster its Gateway, DestinationRule and the
/// entries for its own services; the entries for a cluster's services in other clusters
/// differ only by namespace, so they are built once, as the next cluster imports them.
fn build(plan: &FederationPlan<'_>) -> usize {
    let clusters: Vec<&str> = plan.clusters().collect();
    let mut built = 0;
    for (i, cluster) in clusters.iter().enumerate() {
        let importer = clusters[(i + 1) % clusters.len()];
        for object in plan.objects(cluster).expect("cluster in plan") {
            if object.source_cluster().is_none_or(|s| s == *cluster) {
                black_box(object.to_object());
                built += 1;
            }
        }
        if importer != *cluster {
            for object in plan.objects(importer).expect("cluster in plan") {
                if object.source_cluster() == Some(cluster) {
                    black_box(object.to_object());
                    built += 1;
                }
            }
        }
    }
    built
}

fn main() {
    let clusters = env_size("FEDERATION_BENCH_CLUSTERS", 100);
    let services = env_size("FEDERATION_BENCH_SERVICES", 1000);
    println!(
        "federation benchmark: {clusters} clusters x {services} services, {RUNS} runs, single thread"
    );
    let (vm_yaml, inventory) = inventory(clusters, services);
    let document = parse_virtual_mesh("bench", &vm_yaml).expect("VirtualMesh");
    let config = FederationConfig::from_document(&document, "bench").expect("config");
    let rss_inventory = status_kib("VmRSS:");

    let mut times: [Vec<Duration>; 5] = Default::default();
    let (mut listed, mut built) = (0, 0);
    for _ in 0..RUNS {
        let cpu_start = cpu_ns();
        let start = Instant::now();
        let plan = translate(&config, &inventory).expect("translate");
        let planned = start.elapsed();
        listed = list(&plan);
        let listed_at = start.elapsed();
        built = build(&plan);
        let total = start.elapsed();
        times[0].push(planned);
        times[1].push(listed_at - planned);
        times[2].push(total - listed_at);
        times[3].push(total);
        times[4].push(Duration::from_nanos(cpu_ns() - cpu_start));
    }
    let peak = status_kib("VmHWM:");
    for t in &mut times {
        t.sort();
    }
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let line = |what: String, t: &[Duration]| {
        println!(
            "  {what:<62} min {:>9}  median {:>9}",
            ms(t[0]),
            ms(t[RUNS / 2])
        );
    };
    println!("  inventory in memory (RSS): {}", mib(rss_inventory));
    line(
        format!("plan: validate, select, {} addresses", clusters * services),
        &times[0],
    );
    line(
        format!("list every cluster's objects ({listed})"),
        &times[1],
    );
    line(
        format!("build each distinct object once ({built})"),
        &times[2],
    );
    line(
        "translation, all of the above (wall)".to_string(),
        &times[3],
    );
    line(
        "translation, all of the above (CPU time)".to_string(),
        &times[4],
    );
    println!("  peak memory (VmHWM, whole process): {}", mib(peak));
    let time_ok = times[4][RUNS / 2] < Duration::from_secs(1);
    let memory_ok = peak < 200 * 1024;
    println!(
        "  target < 1 s (median CPU time) and < 200 MiB: time {}, memory {}",
        if time_ok { "met" } else { "MISSED" },
        if memory_ok { "met" } else { "MISSED" }
    );

    // Garbage collection for one cluster: everything it holds, plus 1,000 stale entries.
    let plan = translate(&config, &inventory).expect("translate");
    let first = plan.clusters().next().expect("a cluster").to_string();
    let mut existing: Vec<ObjectId> = plan
        .objects(&first)
        .expect("cluster")
        .map(|o| o.id())
        .collect();
    existing.extend((0..1000).map(|i| ObjectId {
        kind: meshca::mesh::Kind::ServiceEntry,
        namespace: "istio-system".into(),
        name: format!("gone-{i}.ns.svc.cluster-x.mesh.internal"),
    }));
    let start = Instant::now();
    let stale = plan.stale_objects(&first, &existing);
    println!(
        "  garbage collection, one cluster: {} existing, {} stale  {}",
        existing.len(),
        stale.len(),
        ms(start.elapsed())
    );
    drop(existing);

    let start = Instant::now();
    let mut sink = CountingSink(0);
    meshca::mesh::render::render_cluster_to(&plan, &first, &mut sink).expect("render");
    println!(
        "  render one cluster's YAML ({} objects, {}), streamed: {}  (peak memory now {})",
        plan.summary(&first).map(|s| s.objects).unwrap_or(0),
        mib(sink.0 / 1024),
        ms(start.elapsed()),
        mib(status_kib("VmHWM:"))
    );
}

/// A writer that only counts, standing in for the output file.
struct CountingSink(u64);

impl std::io::Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
