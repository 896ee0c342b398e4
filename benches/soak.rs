//! `make soak`: the signer under steady load for a long time (default 10 minutes at
//! concurrency 32, ECDSA P-256 root and CSRs, the fastest and so the most demanding case).
//! Passes when no request fails and the signer's resident memory after the run is within
//! 10% of what it was after the first minute. Not part of `make test`.
//!
//! `MESHCA_SOAK_SECONDS` sets the duration. Prints one line per 30 s interval and a verdict;
//! exits non-zero on failure.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;
use support::*;

const CONCURRENCY: usize = 32;
const INTERVAL: Duration = Duration::from_secs(30);

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> ExitCode {
    meshca::tlsutil::install_default_provider();
    let seconds: u64 = std::env::var("MESHCA_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let meshca = repo.join("target/release/meshca");
    assert!(
        meshca.exists(),
        "build the release binary first (make soak does)"
    );
    let work = repo.join("target/soak/work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let setup = Setup::new(&repo, &meshca, &work);
    let case = CASES.iter().find(|c| c.name == "ecdsa_p256").unwrap();
    let mut signer = setup.start_signer(case);
    let pid = signer.child.id();
    let client = setup.client();
    let url = format!("https://{}/v1/sign", signer.addr);
    let bodies: Arc<Vec<Value>> = Arc::new(
        make_csrs(case.csr_key_type, 256)
            .iter()
            .map(|csr| json!({"virtualMesh": case.virtual_mesh, "mesh": "bench/cluster", "csr": csr}))
            .collect(),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let (client, url, bodies, ok, failed, stop) = (
                client.clone(),
                url.clone(),
                bodies.clone(),
                ok.clone(),
                failed.clone(),
                stop.clone(),
            );
            runtime.spawn(async move {
                let mut i = task;
                while !stop.load(Ordering::Relaxed) {
                    let good = match client
                        .post(&url)
                        .json(&bodies[i % bodies.len()])
                        .send()
                        .await
                    {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    i += CONCURRENCY;
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut baseline = None;
    let mut last_ok = 0;
    let mut last_at = Instant::now();
    let mut peak: f64 = 0.0;
    println!(
        "{:>6} {:>10} {:>8} {:>9}",
        "time", "signs/s", "errors", "RSS MiB"
    );
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(
            INTERVAL
                .min(Duration::from_secs(seconds).saturating_sub(started.elapsed()))
                .max(Duration::from_secs(1)),
        );
        let done = ok.load(Ordering::Relaxed);
        let rss = rss_mib(pid);
        peak = peak.max(rss);
        if baseline.is_none() && started.elapsed() >= Duration::from_secs(60.min(seconds / 2)) {
            baseline = Some(rss);
        }
        println!(
            "{:>5}s {:>10.0} {:>8} {:>9.1}",
            started.elapsed().as_secs(),
            (done - last_ok) as f64 / last_at.elapsed().as_secs_f64(),
            failed.load(Ordering::Relaxed),
            rss
        );
        last_ok = done;
        last_at = Instant::now();
    }
    stop.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let end_rss = rss_mib(pid);
    signer.stop();
    let total = ok.load(Ordering::SeqCst);
    let errors = failed.load(Ordering::SeqCst);
    let baseline = baseline.unwrap_or(end_rss);
    let growth = (end_rss - baseline) / baseline;
    println!(
        "\n{seconds} s at concurrency {CONCURRENCY}: {total} signed ({:.0}/s), {errors} errors; RSS {baseline:.1} MiB after warm-up, {end_rss:.1} MiB at the end ({:+.1}%), peak {peak:.1} MiB",
        total as f64 / seconds as f64,
        growth * 100.0
    );
    let pass = errors == 0 && growth.abs() <= 0.10;
    println!("soak: {}", if pass { "PASS" } else { "FAIL" });
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
