//! A wall clock set back, as libfaketime sets it (which `scripts/install-deps.sh`
//! installs): before 1970 rustls's own clock panicked in every
//! handshake. The signer's start and `serve --check` refuse a clock before the root's or
//! the TLS certificate's notBefore by name, `meshca request` and the agent say their
//! clock is wrong, the controllers do not start before 1970: exit status 1, never a
//! panic (101).

mod common;

use std::process::{Command, Output};

use common::*;

/// `cmd` with libfaketime preloaded: its clock starts at `at` (libfaketime's FAKETIME:
/// `@1960-01-01 00:00:00`, or `-3650d` for that far back) and runs on from there. The
/// monotonic clock is left alone (timeouts keep their length). Not the `faketime` wrapper:
/// it names a semaphore after its pid, and one a killed run left behind under a pid used
/// again makes it fail (`sem_open: File exists`).
fn at_time(cmd: &Command, at: &str) -> Output {
    let mut faked = Command::new(cmd.get_program());
    faked
        .args(cmd.get_args())
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", at)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("TZ", "UTC");
    if let Some(dir) = cmd.get_current_dir() {
        faked.current_dir(dir);
    }
    for (name, value) in cmd.get_envs() {
        match value {
            Some(value) => faked.env(name, value),
            None => faked.env_remove(name),
        };
    }
    faked.output().unwrap()
}

/// The run ended with status 1 and said `says`, with no panic.
fn assert_refused(out: &Output, says: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for said in says {
        assert!(stderr.contains(said), "{said:?} not in: {stderr}");
    }
}

#[test]
fn a_signer_whose_clock_reads_before_its_certificates_does_not_start() {
    let env = Env::new();
    for (at, reads) in [
        (
            "@1960-01-01 00:00:00",
            "the system clock reads 1960-01-01T00:00",
        ),
        ("-3650d", "the system clock reads "),
    ] {
        for args in [&["serve", "--check"][..], &["serve"][..]] {
            let out = at_time(&env.meshca_with_config(args), at);
            assert_refused(
                &out,
                &[
                    reads,
                    "before the notBefore (",
                    "of the root certificate",
                    "set it right (NTP)",
                ],
            );
        }
    }
    // A clock a little behind the host that made them (a root is not backdated) is
    // tolerated, up to the intermediates' own backdating.
    let out = at_time(&env.meshca_with_config(&["serve", "--check"]), "-2m");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The clock right, the same config starts.
    let _signer = env.start_signer();
}

#[test]
fn a_request_whose_clock_is_set_back_says_so() {
    let env = Env::new();
    let signer = env.start_signer();
    let request = |at: &str| at_time(&env.request_command(signer.addr, "cluster-a"), at);
    assert_refused(
        &request("@1960-01-01 00:00:00"),
        &["this machine's clock reads before 1970"],
    );
    assert_refused(
        &request("-3650d"),
        &[
            "is not valid yet by this machine's clock",
            "this clock is behind",
        ],
    );
    assert!(!env.path("out/ca-key.pem").exists());

    // The directory agent's pass fails the same way, said the same.
    let agent = directory_agent_once(&env, &signer);
    assert_refused(
        &at_time(&agent, "@1960-01-01 00:00:00"),
        &["this machine's clock reads before 1970"],
    );
}

/// The Kubernetes client (kube's rustls configuration, rustls's own clock) would panic in
/// its first handshake: the controllers refuse to start first, before looking for a
/// cluster.
#[test]
fn the_controllers_refuse_a_clock_before_1970_before_they_call_the_cluster() {
    let env = Env::new();
    let pki = |file: &str| env.path(&format!("pki/{file}"));
    let mut agent = env.meshca();
    agent
        .args(["agent", "--once", "--ca-cert"])
        .arg(pki("ca.pem"))
        .arg("--client-cert")
        .arg(pki("cluster-a.pem"))
        .arg("--client-key")
        .arg(pki("cluster-a.key"));
    let mut controller = env.meshca();
    controller.args(["mesh-controller", "--once"]);
    for mut cmd in [agent, controller] {
        cmd.env("KUBECONFIG", env.path("no-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST");
        assert_refused(
            &at_time(&cmd, "@1960-01-01 00:00:00"),
            &[
                "this machine's clock reads 1960-01-01T00:00",
                "the Kubernetes client",
            ],
        );
    }
}

/// The signer's clock set back two hours while it runs (libfaketime reading its offset from
/// a file at every call): `audit verify` passes the chain and names the record timed
/// before the one before it, in text and in JSON.
#[tokio::test]
async fn audit_verify_names_the_record_where_the_signers_clock_went_back() {
    let env = Env::new();
    let offset = env.path("clock-offset");
    std::fs::write(&offset, "+2h\n").unwrap();
    let mut signer = env.start_signer_with_clock_file(&offset);
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    std::fs::write(&offset, "+0\n").unwrap();
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");

    let text = env.audit_verify_ok();
    // The start record, two decisions, the stop record: the second decision is line 3.
    assert!(text.contains("intact: 4 records"), "{text}");
    assert!(
        text.contains("warning: line 3 is timed ")
            && text.contains("before the record before it")
            && text.contains("the signer's clock stepped back there"),
        "{text}"
    );
    let out = run(env
        .meshca()
        .args(["audit", "verify", "--output", "json", "audit.log"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = &json["files"][0];
    assert_eq!(file["clock_steps_back_total"], 1, "{json}");
    let step = &file["clock_steps_back"][0];
    assert_eq!(step["line"], 3, "{json}");
    // About two hours: the two signings are seconds apart in real time.
    let seconds = step["seconds"].as_u64().unwrap();
    assert!((7000..=7200).contains(&seconds), "{json}");
}

/// The signer's clock set back two hours just as its log was rotated (moved away): the
/// new file's first record, the `rotation` one, is timed before the moved file's last.
/// `audit verify` of the two, oldest first, names it (it compared within a file only).
#[tokio::test]
async fn audit_verify_names_a_clock_set_back_across_a_rotation() {
    let env = Env::new();
    let offset = env.path("clock-offset");
    std::fs::write(&offset, "+2h\n").unwrap();
    let mut signer = env.start_signer_with_clock_file(&offset);
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    std::fs::rename(env.path("audit.log"), env.path("audit.log.1")).unwrap();
    std::fs::write(&offset, "+0\n").unwrap();
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");

    let out = run_ok(
        env.meshca()
            .args(["audit", "verify", "audit.log.1", "audit.log"]),
    );
    let text = text(&out.stdout);
    assert!(
        text.contains("warning: line 1 is timed ")
            && text.contains("before the last record of the file before")
            && text.contains("the signer's clock stepped back there"),
        "{text}"
    );
    let out = run(env.meshca().args([
        "audit",
        "verify",
        "--output",
        "json",
        "audit.log.1",
        "audit.log",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["files"][0]["clock_steps_back_total"], 0, "{json}");
    let file = &json["files"][1];
    assert_eq!(file["clock_steps_back_total"], 1, "{json}");
    assert_eq!(file["clock_steps_back"][0]["line"], 1, "{json}");
    // About two hours: the two signings are seconds apart in real time.
    let seconds = file["clock_steps_back"][0]["seconds"].as_u64().unwrap();
    assert!((7000..=7200).contains(&seconds), "{json}");
}

/// A bundle in place dated by a signer whose clock read an hour ahead. With this machine's
/// clock behind the signer's, a pass asks once and refuses the answer, not valid yet either
/// (a running agent then asks nothing more until its clock agrees: unit-tested in
/// `agent::directory`); the bundle in place stays. Once the signer's clock is put right, the
/// next pass installs a bundle valid now (before, the bundle in place was kept until its
/// notBefore came, istiod holding a CA not valid yet).
#[test]
fn a_bundle_dated_ahead_of_this_clock_is_replaced_once_the_signer_agrees() {
    let env = Env::new();
    let mut signer = env.start_signer_in_the_future("+1h");
    let mut agent = directory_agent_once(&env, &signer);
    // Installed by an agent whose clock agrees with the signer's.
    let installed = at_time(&agent, "+1h");
    assert!(installed.status.success(), "{}", text(&installed.stderr));
    let ca_cert = std::fs::read(env.path("cacerts/ca-cert.pem")).unwrap();
    // This machine's clock, an hour behind the signer's: the answer is refused.
    let out = agent.output().unwrap();
    assert_refused(
        &out,
        &[
            "this machine's clock is behind the signer's",
            "the signer just issued",
            "fix time synchronisation",
        ],
    );
    assert_eq!(signer.issued_lines().len(), 2);
    assert_eq!(
        std::fs::read(env.path("cacerts/ca-cert.pem")).unwrap(),
        ca_cert
    );
    // The signer's clock put right (restarted without the offset): installed, valid now.
    assert!(signer.terminate(), "SIGTERM must drain and exit 0");
    let signer = env.start_signer();
    let mut agent = directory_agent_once(&env, &signer);
    let out = agent.output().unwrap();
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(
        said.contains(
            "installed a new intermediate (installed bundle is not valid yet by this clock"
        ),
        "{said}"
    );
    assert_ne!(
        std::fs::read(env.path("cacerts/ca-cert.pem")).unwrap(),
        ca_cert
    );
    run_ok(env.meshca().arg("verify").arg(env.path("cacerts")));
}

/// `meshca verify` on a bundle past its notAfter says it expired, and when: it does not
/// blame this machine's clock, as only a certificate just issued could.
#[test]
fn verify_says_an_old_bundle_expired_without_blaming_the_clock() {
    let env = Env::new();
    let signer = env.start_signer();
    run_ok(&mut env.request_command(signer.addr, "cluster-a"));
    let mut verify = env.meshca();
    verify.arg("verify").arg(env.path("out"));
    // The virtual mesh's intermediates last 30 days.
    let out = at_time(&verify, "+40d");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("cert-chain.pem certificate 1 expired at ")
            && !said.contains("just issued")
            && !said.contains("clock is ahead"),
        "{said}"
    );
}

/// `meshca agent --once` for cluster-a into `cacerts`, asking `signer`.
fn directory_agent_once(env: &Env, signer: &Signer) -> Command {
    let mut agent = env.meshca();
    agent
        .args(["agent", "--once", "--target-dir"])
        .arg(env.path("cacerts"))
        .args(env.signer_flags(signer.addr, "cluster-a"))
        .args(["--virtual-mesh", "test/vm", "--mesh", "test/cluster-a"]);
    agent
}
