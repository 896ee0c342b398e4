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
//! Measured in turns: each of [`ROUNDS`] rounds takes a share of every point's time: raw in
//! two halves around meshca and OpenBao at concurrency 32 (one after the other), then the
//! two at each other concurrency. The host's speed moves over tens of seconds on a shared
//! machine; taken in turns, the signer and its references see the same host and their
//! ratios keep.
//!
//! For rsa4096 (the demo's policy, P-384 CSRs) and ecdsa_p256 (RSA minimum 2048, P-256
//! CSRs). Prints a table and writes `target/bench/report.json`. Run through `make bench`,
//! which builds the release binary first. `MESHCA_BENCH_SECONDS` scales the measuring time
//! (default 8 s per point); `MESHCA_BENCH_SESSIONS` sets the signer's pool (and so the raw
//! measurement's threads) instead of its default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use meshca::backend::pkcs11::{Token, token_sign};
use meshca::config::SignerConfig;
use meshca::pki::keys::{KeyType, PrivateKey};
use meshca::pki::profile::{
    IntermediatePlan, RootCa, intermediate_tbs, random_serial, subject_name,
};
use serde_json::{Value, json};

mod support;
use support::*;

const CONCURRENCY: [usize; 3] = [1, 8, 32];
const CSRS_PER_CASE: usize = 256;
/// Turns each point's measuring time is split into.
const ROUNDS: usize = 4;

fn main() {
    // Only the harness-less run does work; `cargo test --benches` style invocations pass
    // `--bench` and friends, which this program ignores.
    meshca::tlsutil::install_default_provider();
    // The client's first handshake would otherwise seed aws-lc's generator (tens of ms)
    // inside the signer's start-to-ready time.
    meshca::tlsutil::seed_random_generator();
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
    // The disk's reference, as raw is the token's: every answer waits for an audit write
    // and its fsync, and on a shared host their latency moves from run to run.
    let (fsync_p50_ms, fsync_p99_ms) = fsync_ms(&work, 500);
    eprintln!(
        "disk: write + fdatasync of an audit line p50 {fsync_p50_ms} ms, p99 {fsync_p99_ms} ms"
    );
    // MESHCA_BENCH_CASES=ecdsa_p256 (comma-separated) runs a subset while tuning.
    let only = std::env::var("MESHCA_BENCH_CASES").ok();
    for case in CASES.iter().filter(|c| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == c.name))
    }) {
        eprintln!("== {}", case.name);
        let config = env.signer_config(case);
        let root = RootCa::from_pem(
            &std::fs::read_to_string(work.join(format!("root-{}.pem", case.name))).unwrap(),
        )
        .unwrap();
        let csrs = make_csrs(case.csr_key_type, CSRS_PER_CASE);

        let sessions = config.pkcs11.as_ref().unwrap().sessions;
        let mut raw = RawSigner::new(&config, &root, sessions);
        let mut signer = env.start_signer(case);
        ready_ms = ready_ms.max(signer.ready_ms);
        backend_ready_ms = backend_ready_ms.max(signer.backend_ready_ms);
        let client = env.client();
        let pid = signer.child.id();
        let to_meshca = Endpoint {
            http: client.clone(),
            url: format!("https://{}/v1/sign", signer.addr),
            token: None,
            bodies: Arc::new(csrs.iter()
                .map(|csr| json!({"virtualMesh": case.virtual_mesh, "mesh": "bench/cluster", "csr": csr}))
                .collect()),
        };
        let mount = bao.mount_root(case, &runtime);
        let to_openbao = Endpoint {
            http: bao.client.clone(),
            url: format!("{}/v1/{mount}/root/sign-intermediate", bao.addr),
            token: Some(bao.token.clone()),
            bodies: Arc::new(csrs.iter()
                .map(|csr| json!({"csr": csr, "common_name": "cluster", "organization": "bench", "ttl": "720h", "use_csr_values": false, "max_path_length": 0, "exclude_cn_from_sans": true}))
                .collect()),
        };

        // Taken in turns, so that the host's speed, which moves over tens of seconds on
        // a shared machine, moves every measurement alike and the ratios keep. Each round
        // measures raw in two halves around the pair at the top concurrency (the ratio
        // the targets name), then the other pairs; in a pair meshca and OpenBao go one
        // after the other, and which goes first alternates from round to round.
        let slice = seconds / ROUNDS as f64;
        let mut raw_total = RawSample::default();
        let mut e2e: BTreeMap<usize, LoadSample> = BTreeMap::new();
        let mut openbao: BTreeMap<usize, LoadSample> = BTreeMap::new();
        let mut inside: BTreeMap<usize, SignerCounters> = BTreeMap::new();
        let top_concurrency = CONCURRENCY[CONCURRENCY.len() - 1];
        for round in 0..ROUNDS {
            // The first round opens the connections (the TLS handshakes of c=32) and
            // warms every path; later ones only settle the load.
            let warmup = if round == 0 {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(250)
            };
            let meshca_first = round % 2 == 0;
            // One pair at concurrency `c`: (meshca's rate, OpenBao's).
            let mut pair = |c: usize| -> (f64, f64) {
                let (mut meshca_rate, mut openbao_rate) = (0.0, 0.0);
                // The same load client for both: only the endpoint differs.
                let run = |endpoint: &Endpoint| {
                    let endpoint = endpoint.clone();
                    let bodies = endpoint.bodies.len();
                    runtime.block_on(load(c, warmup, slice, bodies, move |i| endpoint.request(i)))
                };
                for meshca_now in [meshca_first, !meshca_first] {
                    if meshca_now {
                        let before =
                            runtime.block_on(SignerCounters::read(pid, &client, &signer.addr));
                        let sample = run(&to_meshca);
                        let after =
                            runtime.block_on(SignerCounters::read(pid, &client, &signer.addr));
                        inside.entry(c).or_default().add(&before.until(&after));
                        meshca_rate = sample.per_s();
                        e2e.entry(c).or_default().add(sample);
                    } else {
                        let sample = run(&to_openbao);
                        openbao_rate = sample.per_s();
                        openbao.entry(c).or_default().add(sample);
                    }
                }
                (meshca_rate, openbao_rate)
            };
            let raw_warmup = warmup.min(Duration::from_millis(500));
            let mut raw_round = raw.measure(raw_warmup, slice / 2.0);
            let mut rates = BTreeMap::from([(top_concurrency, pair(top_concurrency))]);
            raw_round.add(raw.measure(raw_warmup, slice / 2.0));
            for c in CONCURRENCY.into_iter().filter(|c| *c != top_concurrency) {
                rates.insert(c, pair(c));
            }
            let mut line = format!(
                "   round {} ({} first): raw {:.0}/s",
                round + 1,
                if meshca_first { "meshca" } else { "openbao" },
                raw_round.per_s()
            );
            for (c, (meshca_rate, openbao_rate)) in rates {
                line += &format!(", c={c} meshca {meshca_rate:.0} openbao {openbao_rate:.0}");
            }
            raw_total.add(raw_round);
            eprintln!("{line}");
        }
        let rss = peak_rss_mib_of(pid);
        peak_rss_mib = peak_rss_mib.max(rss);
        signer.stop();
        drop(raw);

        let raw = raw_total.per_s();
        let raw_host_cpu_us = raw_total.host_cpu_us_per_sign();
        eprintln!(
            "   raw C_Sign with {sessions} sessions: {raw:.0}/s  (per signature: host CPU {raw_host_cpu_us:.0} µs, host idle {:.1}%)",
            raw_total.host.idle_pct()
        );
        let e2e: BTreeMap<usize, LoadResult> = e2e
            .iter()
            .map(|(c, sample)| (*c, sample.result()))
            .collect();
        let openbao: BTreeMap<usize, LoadResult> = openbao
            .iter()
            .map(|(c, sample)| (*c, sample.result()))
            .collect();
        let inside: BTreeMap<usize, Value> = inside
            .iter()
            .map(|(c, counters)| (*c, counters.per_signing()))
            .collect();
        for c in CONCURRENCY {
            let (result, signer_side) = (&e2e[&c], &inside[&c]);
            eprintln!(
                "   meshca  c={c:<2} {:>8.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}  (per signing: CPU signer {} µs (token threads {}), client {} µs, host {} µs, host idle {}%; signing {} ms; audit: {} lines per fsync, {} ms each)",
                result.per_s,
                result.p50_ms,
                result.p99_ms,
                result.errors,
                signer_side["signer_cpu_us_per_signing"],
                signer_side["token_threads_cpu_us_per_signing"],
                signer_side["client_cpu_us_per_signing"],
                signer_side["host_cpu_us_per_signing"],
                signer_side["host_idle_pct"],
                signer_side["signing_mean_ms"],
                signer_side["audit_lines_per_commit"],
                signer_side["audit_commit_mean_ms"],
            );
        }
        for c in CONCURRENCY {
            let result = &openbao[&c];
            eprintln!(
                "   openbao c={c:<2} {:>8.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                result.per_s, result.p50_ms, result.p99_ms, result.errors
            );
        }

        let top = &e2e[&32];
        let bao_top = &openbao[&32];
        let by = |m: &BTreeMap<usize, LoadResult>, signer: &BTreeMap<usize, Value>| -> Value {
            m.iter()
                .map(|(c, r)| {
                    let mut point = json!({"signs_per_s": r.per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors, "requests": r.count});
                    if let Some(Value::Object(inside)) = signer.get(c) {
                        point.as_object_mut().unwrap().extend(inside.clone());
                    }
                    (c.to_string(), point)
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        report.insert(
            case.name.into(),
            json!({
                "raw_signs_per_s": round(raw),
                "raw_host_cpu_us_per_sign": round(raw_host_cpu_us),
                "raw_host_idle_pct": round(raw_total.host.idle_pct()),
                "e2e_signs_per_s": round(top.per_s),
                "e2e_p50_ms": round(top.p50_ms),
                "e2e_p99_ms": round(top.p99_ms),
                "openbao_signs_per_s": round(bao_top.per_s),
                "openbao_p99_ms": round(bao_top.p99_ms),
                "ratio_e2e_to_raw": round(top.per_s / raw),
                "ratio_e2e_to_openbao": round(top.per_s / bao_top.per_s),
                "pool_sessions": sessions,
                "csr_key_type": case.csr_key_type.name(),
                "e2e_by_concurrency": by(&e2e, &inside),
                "openbao_by_concurrency": by(&openbao, &BTreeMap::new()),
            }),
        );
    }
    drop(bao);
    report.insert("signer_peak_rss_mib".into(), json!(round(peak_rss_mib)));
    report.insert("signer_ready_ms".into(), json!(ready_ms));
    report.insert("signer_backend_ready_ms".into(), json!(backend_ready_ms));
    report.insert("disk_fsync_p50_ms".into(), json!(fsync_p50_ms));
    report.insert("disk_fsync_p99_ms".into(), json!(fsync_p99_ms));
    report.insert("machine".into(), machine());
    report.insert("seconds_per_point".into(), json!(seconds));
    report.insert("rounds".into(), json!(ROUNDS));
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
    for case in CASES.iter().filter(|c| report.get(c.name).is_some()) {
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
        "disk: write + fdatasync of an audit line p50 {} ms, p99 {} ms",
        report["disk_fsync_p50_ms"], report["disk_fsync_p99_ms"]
    );
    println!(
        "targets: rsa4096 e2e/raw >= 0.90, e2e/openbao >= 1.3; ecdsa_p256 e2e >= 5000/s, e2e/openbao >= 2.0; p99 <= openbao p99 / 2; RSS <= 32 MiB"
    );
}

/// Where a load goes: meshca's `/v1/sign` or OpenBao's `sign-intermediate`, each with the
/// request bodies made from the same CSRs.
#[derive(Clone)]
struct Endpoint {
    http: reqwest::Client,
    url: String,
    /// OpenBao's token; meshca knows its clients by their certificates.
    token: Option<String>,
    bodies: Arc<Vec<Value>>,
}

impl Endpoint {
    fn request(&self, i: usize) -> reqwest::RequestBuilder {
        let request = self.http.post(&self.url).json(&self.bodies[i]);
        match &self.token {
            Some(token) => request.header("X-Vault-Token", token.as_str()),
            None => request,
        }
    }
}

/// Signatures counted over a stretch, and the host's CPU time meanwhile.
#[derive(Debug, Default)]
struct RawSample {
    signs: usize,
    seconds: f64,
    host: HostCpu,
}

impl RawSample {
    fn add(&mut self, other: RawSample) {
        self.signs += other.signs;
        self.seconds += other.seconds;
        self.host.add(&other.host);
    }

    fn per_s(&self) -> f64 {
        self.signs as f64 / self.seconds
    }

    /// The host's busy CPU time per signature counted, in µs.
    fn host_cpu_us_per_sign(&self) -> f64 {
        self.host.busy_s / self.signs.max(1) as f64 * 1e6
    }
}

/// C_Sign on the signer's root key, from this process: one thread per session (as many
/// as the signer's pool), each signing an intermediate-sized TBS as fast as it can.
struct RawSigner {
    /// Declared before `_token`: the sessions close before the module is finalized.
    sessions: Vec<(Session, ObjectHandle)>,
    _token: Token,
    root: RootCa,
    tbs: Vec<u8>,
}

impl RawSigner {
    fn new(config: &SignerConfig, root: &RootCa, sessions: usize) -> RawSigner {
        let settings = config.pkcs11.as_ref().unwrap();
        let pin = settings.pin.read().unwrap();
        let token = Token::open(settings).unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP384).unwrap();
        let now = SystemTime::now();
        let plan = IntermediatePlan {
            subject: subject_name("bench", "cluster").unwrap(),
            public_key: key.public_key_info().unwrap(),
            serial: random_serial().unwrap(),
            not_before: now,
            not_after: now + Duration::from_secs(86_400),
        };
        let tbs = intermediate_tbs(&plan, root, &[]).unwrap();
        let sessions = (0..sessions)
            .map(|_| {
                let session = token.logged_in_session(&pin, false).unwrap();
                let key = token.find_private_key(&session).unwrap();
                (session, key)
            })
            .collect();
        RawSigner {
            sessions,
            _token: token,
            root: root.clone(),
            tbs,
        }
    }

    /// Signs on every session for `warmup`, then counts for `seconds`.
    fn measure(&mut self, warmup: Duration, seconds: f64) -> RawSample {
        let stop = AtomicBool::new(false);
        let count = AtomicUsize::new(0);
        let counting = AtomicBool::new(false);
        let (root, tbs) = (&self.root, &self.tbs);
        let (stop, count, counting) = (&stop, &count, &counting);
        let sessions = std::mem::take(&mut self.sessions);
        let (sessions, sample) = std::thread::scope(|scope| {
            let threads: Vec<_> = sessions
                .into_iter()
                .map(|(session, key)| {
                    scope.spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            token_sign(
                                &session,
                                key,
                                &root.key_kind,
                                root.signature_algorithm,
                                tbs,
                            )
                            .unwrap();
                            if counting.load(Ordering::Relaxed) {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        (session, key)
                    })
                })
                .collect();
            std::thread::sleep(warmup);
            counting.store(true, Ordering::SeqCst);
            let (started, host_before) = (Instant::now(), HostCpu::now());
            std::thread::sleep(Duration::from_secs_f64(seconds));
            let done = count.load(Ordering::SeqCst);
            let elapsed = started.elapsed().as_secs_f64();
            let host = host_before.until(&HostCpu::now());
            stop.store(true, Ordering::SeqCst);
            let sessions: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            (
                sessions,
                RawSample {
                    signs: done,
                    seconds: elapsed,
                    host,
                },
            )
        });
        self.sessions = sessions;
        sample
    }
}
