//! Faults while serving: the token disappears and comes back, the audit log cannot be
//! written (for a decision or for a policy change), the signer is killed under load.
//! Nothing is lost and nothing unaudited leaves.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use meshca::pki::keys::KeyType;
use serde_json::Value;

const VM: &str = "test/vm";
const MESH_A: &str = "test/cluster-a";

/// Polls `/readyz` until it answers `want` (bounded; not a timing assertion).
async fn wait_ready(client: &reqwest::Client, signer: &Signer, want: u16) -> bool {
    for _ in 0..100 {
        if let Ok(r) = client.get(signer.url("/readyz")).send().await
            && r.status().as_u16() == want
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The status `/readyz` answers.
async fn readyz_status(client: &reqwest::Client, signer: &Signer) -> u16 {
    let answer = client.get(signer.url("/readyz")).send().await.unwrap();
    answer.status().as_u16()
}

/// `meshca_backend_ready` as the signer's metrics show it (None: not exported).
async fn backend_ready(client: &reqwest::Client, signer: &Signer) -> Option<i64> {
    metric_sample(&signer.metrics(client).await, "meshca_backend_ready")
}

/// Waits until `meshca_backend_ready` is `want`: a bounded wait (90 s) for the check the
/// signer makes every 10 s, not a timing assertion.
async fn wait_for_backend_ready(client: &reqwest::Client, signer: &Signer, want: i64) {
    let mut waited = 0;
    while backend_ready(client, signer).await != Some(want) {
        waited += 1;
        assert!(waited < 450, "meshca_backend_ready never became {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The token goes away while no cluster asks for anything (no request, no `/readyz`):
/// the periodic check still shows it, in the metric the alert reads and in the log.
#[tokio::test]
async fn a_token_gone_while_nobody_asks_shows_in_the_metrics_and_the_log() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    assert_eq!(backend_ready(&client, &signer).await, Some(1));
    let tokens = env.path("softhsm/tokens");
    let away = env.path("softhsm/tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    wait_for_backend_ready(&client, &signer, 0).await;
    assert!(
        signer.logs().contains("the root key backend cannot sign"),
        "{}",
        signer.logs()
    );
    std::fs::rename(&away, &tokens).unwrap();
    wait_for_backend_ready(&client, &signer, 1).await;
}

#[tokio::test]
async fn a_token_that_goes_away_gives_503_and_signing_recovers_when_it_is_back() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let body = sign_body(VM, MESH_A, &csr);
    assert_eq!(post_sign(&client, &signer, &body).await.0, 200);

    let tokens = env.path("softhsm/tokens");
    let away = env.path("softhsm/tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    let (status, answer) = post_sign(&client, &signer, &body).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "backend_unavailable");
    assert!(
        wait_ready(&client, &signer, 503).await,
        "readyz stayed ready without a token"
    );
    // Why, from the reconnect that failed: not the finalized connection's "not
    // initialized".
    let readyz = signer.get_json(&client, "/readyz").await;
    let why = readyz["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("key pkcs11:") && !why.contains("NotInitialized"),
        "{why}"
    );
    let (_, answer) = post_sign(&client, &signer, &body).await;
    let why = answer["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("key pkcs11:") && !why.contains("NotInitialized"),
        "{why}"
    );

    std::fs::rename(&away, &tokens).unwrap();
    assert!(
        wait_ready(&client, &signer, 200).await,
        "signer did not recover:\n{}",
        signer.logs()
    );
    let (status, answer) = post_sign(&client, &signer, &body).await;
    assert_eq!(status, 200, "{answer}");

    let audit = signer.audit_lines();
    let decisions: Vec<&str> = audit
        .iter()
        .map(|l| l["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["allow", "error", "error", "allow"]);
    assert_eq!(audit[1]["rule"], "backend_unavailable");
    assert_eq!(audit[2]["rule"], "backend_unavailable");
}

/// A second token directory beside the environment's (`softhsm/other-tokens`), holding a
/// token with the same label and PINs whose `root-ca` key is another one: its own root,
/// made through a copy of the config that points SoftHSM there.
fn another_token_with_the_same_names(env: &Env) -> std::path::PathBuf {
    let other_tokens = env.path("softhsm/other-tokens");
    std::fs::create_dir(&other_tokens).unwrap();
    let conf = std::fs::read_to_string(env.path("softhsm/softhsm2.conf")).unwrap();
    let other_conf = conf.replace("/tokens\n", "/other-tokens\n");
    assert_ne!(other_conf, conf);
    std::fs::write(env.path("softhsm/other.conf"), other_conf).unwrap();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let other_config = config
        .replace("softhsm/softhsm2.conf", "softhsm/other.conf")
        .replace("\"root-cert.pem\"", "\"other-root-cert.pem\"");
    let other = env.path("other.toml");
    std::fs::write(&other, other_config).unwrap();
    run_ok(
        env.meshca()
            .args(["token", "init", "--config"])
            .arg(&other)
            .arg("--so-pin-file")
            .arg(env.path("softhsm/so-pin")),
    );
    run_ok(env.meshca().args(["root", "init", "--config"]).arg(&other));
    assert_ne!(
        std::fs::read_to_string(env.path("other-root-cert.pem")).unwrap(),
        env.root_pem()
    );
    other_tokens
}

/// Polls `/readyz` until its message contains `needle` (bounded; not a timing assertion),
/// and returns the message.
async fn wait_readyz_message(client: &reqwest::Client, signer: &Signer, needle: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        let readyz = signer.get_json(client, "/readyz").await;
        last = readyz["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if last.contains(needle) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("/readyz never said {needle:?}; last: {last:?}");
}

/// The token comes back with another key under the root's label (a failover to an HSM
/// holding another key, a token directory restored from the wrong backup): the key is
/// proven against the root certificate again, as at start, so the signer is unready and
/// answers 503 naming the mismatch, instead of ready with a 500 for every signing; with
/// the right token back it signs again.
#[tokio::test]
async fn a_token_that_comes_back_with_another_key_is_refused_until_the_right_one_is_back() {
    let env = Env::new();
    let other_tokens = another_token_with_the_same_names(&env);
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);

    let tokens = env.path("softhsm/tokens");
    let ours = env.path("softhsm/tokens.ours");
    std::fs::rename(&tokens, &ours).unwrap();
    assert!(
        wait_ready(&client, &signer, 503).await,
        "readyz stayed ready without a token"
    );
    std::fs::rename(&other_tokens, &tokens).unwrap();
    wait_readyz_message(&client, &signer, "does not match the root certificate").await;
    let (status, answer) = sign_fresh(&client, &signer).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "backend_unavailable");
    let why = answer["error"]["message"].as_str().unwrap();
    assert!(why.contains("does not match the root certificate"), "{why}");
    // Still unready: each check proves the key again.
    wait_readyz_message(&client, &signer, "does not match the root certificate").await;
    assert_eq!(readyz_status(&client, &signer).await, 503);

    std::fs::rename(&tokens, &other_tokens).unwrap();
    std::fs::rename(&ours, &tokens).unwrap();
    assert!(
        wait_ready(&client, &signer, 200).await,
        "signer did not recover:\n{}",
        signer.logs()
    );
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
}

/// The root's key replaced on the token under a running signer (a `root init --force` run
/// beside it, against the same token): the readiness check proves the key it finds again
/// instead of trusting the handle it proved before, so the signer is unready, naming the
/// mismatch, rather than ready while every signing fails.
#[tokio::test]
async fn a_root_key_replaced_under_a_running_signer_makes_it_unready() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    assert_eq!(readyz_status(&client, &signer).await, 200);
    env.run_with_config_ok(&["root", "init", "--force"]);
    wait_readyz_message(&client, &signer, "does not match the root certificate").await;
    let (status, answer) = sign_fresh(&client, &signer).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "backend_unavailable");
}

/// Every file of the SoftHSM token directory `dir`, held under an exclusive POSIX lock by
/// this process until dropped. SoftHSM waits for its own locks on them, so the signer's
/// token calls wait the way they do on a token that stops answering (a network HSM cut
/// off): nothing fails, nothing returns.
struct HeldTokenFiles {
    _locked: Vec<std::fs::File>,
}

fn hold_token_files(dir: &std::path::Path) -> HeldTokenFiles {
    use std::os::fd::AsRawFd;
    let mut held = Vec::new();
    for token in std::fs::read_dir(dir).unwrap() {
        let token = token.unwrap().path();
        if !token.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&token).unwrap() {
            let path = entry.unwrap().path();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            // SAFETY: a zeroed `flock` is a valid value; the fields that matter are set.
            let mut lock: libc::flock = unsafe { std::mem::zeroed() };
            lock.l_type = libc::F_WRLCK as libc::c_short;
            lock.l_whence = libc::SEEK_SET as libc::c_short;
            // SAFETY: `file` is open for the call; `lock` outlives it.
            let done = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) };
            assert_eq!(
                done,
                0,
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            held.push(file);
        }
    }
    assert!(held.len() > 2, "no token files under {}", dir.display());
    HeldTokenFiles { _locked: held }
}

/// A signer (`pkcs11.timeout_seconds` 2) that signed once, then its token stopped
/// answering (its files held until the second value is dropped): the signing after it got
/// `503 backend_unavailable` after the timeout and `/readyz` turned false. The signing's
/// token thread is still in its call.
async fn signer_with_a_token_that_stopped_answering(env: &Env) -> (Signer, HeldTokenFiles) {
    set_token_timeout(env, 2);
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);

    let held = hold_token_files(&env.path("softhsm/tokens"));
    let (status, answer) =
        tokio::time::timeout(Duration::from_secs(50), sign_fresh(&client, &signer))
            .await
            .expect("the signing waited on the stuck token for 50 s");
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "backend_unavailable");
    let why = answer["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("did not answer within 2 s (pkcs11.timeout_seconds)"),
        "{why}"
    );
    assert!(
        wait_ready(&client, &signer, 503).await,
        "readyz stayed ready with a token that does not answer"
    );
    (signer, held)
}

/// A token that stops answering: the signing answers `503 backend_unavailable` once
/// `pkcs11.timeout_seconds` has gone by (audited; before, it waited as long as the
/// client did), readiness turns false, and once the token answers again signing resumes
/// and what it signed for the abandoned request is thrown away, said in the log.
#[tokio::test]
async fn a_token_that_stops_answering_gives_503_after_the_timeout_and_signing_resumes() {
    let env = Env::new();
    let (signer, held) = signer_with_a_token_that_stopped_answering(&env).await;
    let client = env.client("cluster-a");

    drop(held);
    assert!(
        wait_ready(&client, &signer, 200).await,
        "signer did not recover:\n{}",
        signer.logs()
    );
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    let late = signer
        .wait_for_log("the token signed after the request had timed out")
        .await;
    let late: Value = serde_json::from_str(&late).unwrap();
    let late_serial = late["serial"].as_str().unwrap_or_else(|| panic!("{late}"));

    let audit = signer.audit_lines();
    let decisions: Vec<&str> = audit
        .iter()
        .map(|l| l["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["allow", "error", "allow"]);
    assert_eq!(audit[1]["rule"], "backend_unavailable");
    // The signature the token made after the request gave up is on record with it.
    assert_eq!(audit[1]["signingSerial"], late_serial, "{}", audit[1]);
    assert!(audit[1].get("serial").is_none(), "{}", audit[1]);
    assert!(audit[2].get("signingSerial").is_none(), "{}", audit[2]);
}

/// SIGTERM while the token still does not answer: the signer drains, writes its audit
/// lines and exits, naming the token call it left under way, instead of waiting for the
/// token for as long as it stays away (before, the exit joined the stuck token thread,
/// and a second SIGTERM did nothing either).
#[tokio::test]
async fn sigterm_stops_a_signer_whose_token_stopped_answering() {
    let env = Env::new();
    let (mut signer, held) = signer_with_a_token_that_stopped_answering(&env).await;
    // Panics, with the logs, if the signer is still running after a bounded wait.
    let status = signer.terminate_status();
    drop(held);
    let logs = signer.logs();
    assert!(status.success(), "{status}:\n{logs}");
    let outstanding: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("a token call was still under way at shutdown"))
        .collect();
    assert!(
        outstanding
            .iter()
            .any(|l| l.contains("signing serial") && l.contains("running_seconds")),
        "no outstanding signing named in:\n{logs}"
    );
    assert!(logs.contains("signer stopped"), "{logs}");
    let decisions: Vec<Value> = signer.audit_lines();
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert_eq!(decisions[1]["rule"], "backend_unavailable");
}

/// A connection still open when the drain time is over (half a request's head in) is
/// closed before the stop is recorded: the rest of its request, sent while the exit waits
/// for a token call, gets no answer and no decision. Before, it outlived the drain, and its
/// request was decided after the `stop` line, which says every decision is before it.
#[tokio::test]
async fn a_connection_open_when_the_drain_time_is_over_is_closed_before_the_stop_record() {
    let env = Env::with(EnvSpec {
        extra_toml: "[limits]\ndrain_timeout_ms = 2000\nheader_timeout_ms = 300000\n".into(),
        ..EnvSpec::default()
    });
    // The exit waits this long for the token call held below: the time to send the rest.
    set_token_timeout(&env, 60);
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);

    let mut late = tls_connect(&env, &signer, "cluster-b").await;
    let (_key, late_csr) = csr(KeyType::EcdsaP256, "acme", "b");
    let body = serde_json::to_vec(&sign_body("test/vm", "test/cluster-b", &late_csr)).unwrap();
    let head = format!(
        "POST /v1/sign HTTP/1.1\r\nHost: meshca\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (first_half, second_half) = head.as_bytes().split_at(20);
    late.write_all(first_half).await.unwrap();
    late.flush().await.unwrap();

    // A signing held in the token, so the exit waits for its call after the stop line.
    let held = hold_token_files(&env.path("softhsm/tokens"));
    let stuck = {
        let (client, url) = (client.clone(), signer.url("/v1/sign"));
        let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
        let body = sign_body("test/vm", "test/cluster-a", &csr);
        tokio::spawn(async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status())
        })
    };
    // Under way: its connection and the one asking are both active.
    let active = "meshca_api_connections{state=\"active\"} 2";
    while !signer.metrics(&client).await.contains(active) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    send_signal(signer.child.id(), "TERM");
    while !signer
        .all_audit_lines()
        .iter()
        .any(|l| l["event"] == "stop")
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Written and read as the signer waits for the held token call.
    let sent = async {
        late.write_all(second_half).await?;
        late.write_all(&body).await?;
        late.flush().await
    };
    let _ = sent.await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), late.read_to_end(&mut answer))
        .await
        .expect("the connection was neither answered nor closed");
    assert!(
        answer.is_empty(),
        "answered after the stop line ({read:?}): {}",
        String::from_utf8_lossy(&answer)
    );

    drop(held);
    let status = wait_within(&mut signer.child, EXIT_WAIT).expect("the signer did not exit");
    signer.read_all_logs();
    assert!(status.success(), "{status}:\n{}", signer.logs());
    assert_eq!(stuck.await.unwrap().unwrap(), 503);
    let lines = signer.all_audit_lines();
    assert_eq!(lines.last().unwrap()["event"], "stop", "{lines:?}");
    assert!(
        !lines.iter().any(|l| l["client"] == identity("cluster-b")),
        "{lines:?}"
    );
}

/// `meshca serve` started with JSON logs, its stderr read line by line as it comes: for
/// the tests that stop a signer at a point of its start.
struct StartingSigner {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
    seen: Vec<String>,
}

impl StartingSigner {
    fn spawn(env: &Env) -> StartingSigner {
        let mut child = env
            .meshca_with_config(&["--log-format", "json", "serve"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = send.send(line);
            }
        });
        StartingSigner {
            child,
            lines,
            reader,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 30 s for each line) for a line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(30)) {
            self.seen.push(line);
            if self.seen.last().is_some_and(|l| l.contains(needle)) {
                return;
            }
        }
        panic!("no log line with {needle:?} in:\n{}", self.seen.join("\n"));
    }

    /// Sends SIGTERM and waits for the exit (`what` names the case in a failure); its
    /// status and every line it logged. `before_exit` runs once the signal is sent.
    fn terminate(
        mut self,
        what: &str,
        before_exit: impl FnOnce(),
    ) -> (std::process::ExitStatus, Vec<String>) {
        send_signal(self.child.id(), "TERM");
        let status = wait_within(&mut self.child, EXIT_WAIT);
        before_exit();
        let status = status.unwrap_or_else(|| {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("{what}: the signer did not exit within {EXIT_WAIT:?} of SIGTERM")
        });
        self.reader.join().unwrap();
        let logs = self.seen.into_iter().chain(self.lines.try_iter()).collect();
        (status, logs)
    }
}

/// A token that does not answer at start (its files held before the signer starts): the
/// start says every `pkcs11.timeout_seconds` that it still waits, and SIGTERM stops it,
/// exit 0, instead of waiting for the token for as long as it stays away (before, the stop
/// signal was taken over and then not looked at until the backend had started).
#[test]
fn sigterm_stops_a_signer_whose_token_does_not_answer_at_start() {
    let env = Env::new();
    set_token_timeout(&env, 2);
    let held = hold_token_files(&env.path("softhsm/tokens"));
    let mut signer = StartingSigner::spawn(&env);
    // Logged once the stop signals are taken over: SIGTERM from here on asks to stop.
    signer.wait_for("connecting to the root key backend");
    signer.wait_for("the root key backend has not answered yet");
    let (status, logs) = signer.terminate("a token that does not answer", || drop(held));
    assert!(status.success(), "{status}:\n{}", logs.join("\n"));
    assert!(
        logs.iter()
            .any(|l| l.contains("stop requested while starting")),
        "{}",
        logs.join("\n")
    );
}

/// A second SIGTERM while the stop waits for a token that does not answer at start stops
/// the signer then (exit 0), instead of after `pkcs11.timeout_seconds` (here 300 s, more
/// than the test waits for the exit).
#[test]
fn a_second_sigterm_stops_without_waiting_for_a_token_that_does_not_answer() {
    let env = Env::new();
    set_token_timeout(&env, 300);
    let held = hold_token_files(&env.path("softhsm/tokens"));
    let mut signer = StartingSigner::spawn(&env);
    signer.wait_for("connecting to the root key backend");
    send_signal(signer.child.id(), "TERM");
    signer.wait_for("letting the root key backend's start end first");
    // One within a second of the first is taken for the same request sent twice.
    std::thread::sleep(Duration::from_millis(1500));
    let (status, logs) = signer.terminate("a second SIGTERM", || drop(held));
    assert!(status.success(), "{status}:\n{}", logs.join("\n"));
    assert!(
        logs.iter().any(|l| l.contains("a second stop request")),
        "{}",
        logs.join("\n")
    );
}

/// SIGTERM within a few milliseconds of the start beginning to connect to the token, 400
/// times (mostly while the token still starts, some once it has): each stop ends the
/// signer with exit 0. A stop that left the token's start behind used to let the process
/// run its exit handlers (SoftHSM's C++ static destructors) under that thread, still
/// inside SoftHSM: about one such stop in 100 here ended in a segfault (exit 139).
#[test]
fn sigterm_while_the_token_starts_exits_cleanly_every_time() {
    let env = Env::new();
    for round in 0..400u64 {
        let mut signer = StartingSigner::spawn(&env);
        signer.wait_for("connecting to the root key backend");
        // Spread over the token's start (module loaded, token found, login; a few ms):
        // where in it the stop lands is what varies, not what is asserted.
        std::thread::sleep(Duration::from_micros(round % 10 * 700));
        let (status, logs) = signer.terminate(&format!("round {round}"), || {});
        assert!(
            status.success(),
            "round {round}: {status}:\n{}",
            logs.join("\n")
        );
    }
}

/// Sets `pkcs11.timeout_seconds` in the environment's signer config.
fn set_token_timeout(env: &Env, seconds: u64) {
    let config = std::fs::read_to_string(&env.config).unwrap();
    let with_timeout = config.replacen(
        "\nsessions = ",
        &format!("\ntimeout_seconds = {seconds}\nsessions = "),
        1,
    );
    assert_ne!(
        with_timeout, config,
        "no [pkcs11] sessions line in:\n{config}"
    );
    std::fs::write(&env.config, with_timeout).unwrap();
}

#[tokio::test]
async fn an_audit_log_that_cannot_be_written_stops_issuance() {
    let env = Env::new();
    // The disk is full: every write fails with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", env.path("audit.log")).unwrap();
    let device_mode = || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata("/dev/full").unwrap().permissions().mode()
    };
    let mode_before = device_mode();
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    // Before any request: the start record was not written, and the metrics say so
    // (no decision failed yet, so no write error is counted).
    let metrics = signer.metrics(&client).await;
    for line in [
        "meshca_audit_writable 0",
        "meshca_audit_write_errors_total 0",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    let (_k, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    let (status, answer) = post_sign(&client, &signer, &sign_body(VM, MESH_A, &csr)).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "audit_unavailable");
    assert!(answer.get("certificate").is_none());
    let ready = client.get(signer.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let metrics = signer.metrics(&client).await;
    assert!(
        metrics.contains("meshca_audit_write_errors_total 1"),
        "{metrics}"
    );
    // Nothing was signed for it: a log known not to take lines costs no signature.
    assert!(
        metrics.contains("meshca_signing_duration_seconds_count 0"),
        "{metrics}"
    );
    // The line it could not write is in the error log instead.
    let lost = signer.wait_for_log("audit log write failed").await;
    assert!(
        lost.contains("test/cluster-a") && lost.contains("audit_unavailable"),
        "{lost}"
    );
    // Only a regular file's mode is the signer's to restrict: the device keeps its own
    // (as root, the signer once made /dev/full 0644 for the whole machine).
    assert_eq!(device_mode(), mode_before);
    // A stop record that cannot be written is logged, and the stop goes on.
    assert!(
        signer.terminate(),
        "SIGTERM must exit 0:\n{}",
        signer.logs()
    );
    let logs = signer.logs();
    assert!(
        logs.contains("the audit log cannot record the stop") && logs.contains("signer stopped"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_policy_change_the_audit_log_cannot_record_is_not_applied() {
    let env = Env::new();
    std::os::unix::fs::symlink("/dev/full", env.path("audit.log")).unwrap();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let max_ttl = || async {
        let policy = signer.get_json(&client, "/v1/virtualmeshes/test/vm").await;
        policy["maxTtlSeconds"].as_u64().unwrap()
    };
    assert_eq!(max_ttl().await, 30 * 86_400);
    let meshes = env.path("virtual-meshes.yaml");
    let yaml = std::fs::read_to_string(&meshes).unwrap();
    std::fs::write(&meshes, yaml.replace("ttlDays: 30", "ttlDays: 10")).unwrap();
    send_signal(signer.child.id(), "HUP");
    let line = signer.wait_for_log("SIGHUP: rules not reloaded").await;
    assert!(
        line.contains("the audit log cannot record the change, so it is not applied"),
        "{line}"
    );
    assert_eq!(max_ttl().await, 30 * 86_400, "an unrecorded change applied");
}

/// A reload announcing a next root, which the audit log cannot record: the root key made
/// the cross certificate before the reload failed, so no `reload` line will name it; a
/// line of its own would, and when that cannot be written either, an ERROR in the log
/// names it (serial and SHA-256), as the info line that it was made does.
#[tokio::test]
async fn a_cross_certificate_made_for_a_failed_reload_is_named() {
    let env = Env::new();
    env.init_next_root();
    std::os::unix::fs::symlink("/dev/full", env.path("audit.log")).unwrap();
    let signer = env.start_signer();
    env.announce_next_root(Some("next-root-cert.pem"));
    send_signal(signer.child.id(), "HUP");
    let made = signer.wait_for_log("cross certificate made").await;
    let line = signer.wait_for_log("SIGHUP: rules not reloaded").await;
    assert!(
        line.contains("the audit log cannot record the change"),
        "{line}"
    );
    let named = signer
        .wait_for_log("the audit log cannot record the cross certificates a failed reload made")
        .await;
    let made: Value = serde_json::from_str(&made).unwrap();
    for field in ["cross_serial", "cross_sha256"] {
        let value = made[field].as_str().unwrap();
        assert!(named.contains(value), "{field} {value} not in {named}");
    }
    assert!(named.contains("\"level\":\"ERROR\""), "{named}");
}

/// Largest file the signer of [`a_full_audit_disk_makes_the_signer_unready_until_a_write_succeeds_again_by_itself`]
/// may write: room for a few dozen audit lines, well above the token's files.
const FILE_SIZE_LIMIT: u64 = 16 * 1024;

/// The audit log's disk fills while the signer runs: a write fails, is rolled back, the
/// request gets 503 and `/readyz` turns false; once a line can be written again (the log
/// rotated away, a new file at its path), the signer is ready again.
///
/// The full disk is a file size limit: the signer runs under `RLIMIT_FSIZE` (set in a
/// `pre_exec`, with SIGXFSZ ignored so that `write` fails with EFBIG instead of the
/// process being killed), so a write that would take the log past the limit writes what
/// fits and then fails, as on a disk that fills mid-write. It is real I/O on a real file,
/// rolled back with `ftruncate` as an ENOSPC would be. A real full file system (a small
/// tmpfs or loop device) needs a mount, which the tests cannot count on being allowed
/// (`make test` as a user, containers); `/dev/full` (above) fails the rollback too, so it
/// does not show a write that failed cleanly.
#[tokio::test]
async fn a_full_audit_disk_makes_the_signer_unready_until_a_write_succeeds_again_by_itself() {
    let env = Env::new();
    let signer = env.start_signer_command(|command| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: FILE_SIZE_LIMIT,
                    rlim_max: FILE_SIZE_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
                    || libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let client = env.client("cluster-a");
    let ready = || readyz_status(&client, &signer);
    let sign = || sign_fresh(&client, &signer);
    // Issues, and stays ready, until a line no longer fits.
    let mut issued = 0;
    let refused = loop {
        let (status, answer) = sign().await;
        if status != 200 {
            assert_eq!(status, 503, "{answer}");
            break answer;
        }
        issued += 1;
        assert!(issued < 100, "the file size limit never stopped a write");
        assert_eq!(ready().await, 200, "not ready after a successful write");
    };
    assert!(issued > 0, "no line fitted: {refused}");
    assert_eq!(refused["error"]["code"], "audit_unavailable");
    assert_eq!(
        ready().await,
        503,
        "ready while its audit log cannot be written"
    );
    let metrics = signer.metrics(&client).await;
    for line in [
        "meshca_audit_writable 0",
        "meshca_audit_write_errors_total 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    // The part of the line that fitted was rolled back: the log holds whole lines only,
    // the last one acknowledged.
    let log = env.path("audit.log");
    assert!(std::fs::metadata(&log).unwrap().len() <= FILE_SIZE_LIMIT);
    env.audit_verify_ok();
    let lines = signer.audit_lines();
    assert_eq!(lines.len(), issued, "{lines:?}");
    assert!(lines.iter().all(|l| l["rule"] == "issued"), "{lines:?}");

    // Room again: the log is rotated away. The signer finds out by itself (a load
    // balancer sends no request to a signer that is not ready): it writes a `recovery`
    // line to a new file and is ready again.
    std::fs::rename(&log, env.path("audit.log.1")).unwrap();
    let mut waited = 0;
    while ready().await != 200 {
        waited += 1;
        assert!(
            waited < 300,
            "not ready again a minute after the log had room"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let recovered = std::fs::read_to_string(&log).unwrap();
    assert!(
        recovered.contains("the audit log takes lines again after a failed write"),
        "{recovered}"
    );
    let metrics = signer.metrics(&client).await;
    assert!(metrics.contains("meshca_audit_writable 1"), "{metrics}");
    let (status, answer) = sign().await;
    assert_eq!(status, 200, "{answer}");
    run_ok(
        env.meshca()
            .args(["audit", "verify", "audit.log.1", "audit.log"]),
    );
}

/// The audit log is rotated together with its directory, and the path cannot be made
/// again (a file stands where the directory was; root may write anywhere, so this is how
/// a test run as root makes it fail): nothing is issued and `/readyz` is false until a
/// new file can be made at the path, and then the chain runs on into it.
#[tokio::test]
async fn an_audit_log_that_cannot_be_made_again_after_a_rotation_makes_the_signer_unready() {
    let env = Env::new();
    let config = std::fs::read_to_string(&env.config).unwrap();
    let moved = config.replace(
        "audit_log = \"audit.log\"",
        "audit_log = \"logs/audit.log\"",
    );
    assert_ne!(config, moved);
    std::fs::write(&env.config, moved).unwrap();
    let logs = env.path("logs");
    std::fs::create_dir(&logs).unwrap();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    let ready = || readyz_status(&client, &signer);
    let sign = || sign_fresh(&client, &signer);
    assert_eq!(sign().await.0, 200);
    assert_eq!(ready().await, 200);

    std::fs::rename(&logs, env.path("logs.1")).unwrap();
    std::fs::write(&logs, "").unwrap();
    let (status, answer) = sign().await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "audit_unavailable");
    assert_eq!(
        ready().await,
        503,
        "ready while its audit log cannot be written"
    );

    std::fs::remove_file(&logs).unwrap();
    std::fs::create_dir(&logs).unwrap();
    let (status, answer) = sign().await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        ready().await,
        200,
        "still not ready after a successful write"
    );
    let both = run_ok(
        env.meshca()
            .args(["audit", "verify", "logs.1/audit.log", "logs/audit.log"]),
    );
    let both = text(&both.stdout);
    // Its rotation line, the recovery line the request wrote before it was signed for
    // (the log had not taken a line since it failed), and the decision.
    assert!(
        both.contains("logs/audit.log is intact: 3 records"),
        "{both}"
    );
    let events: Vec<String> = std::fs::read_to_string(logs.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].to_string())
        .collect();
    assert_eq!(events, ["\"rotation\"", "\"recovery\"", "\"decision\""]);
}

/// An audit write that hangs while a count line of rate-limit refusals waits behind it:
/// the signer's 5 s probe still reports the hung write (the ERROR, `meshca_audit_writable`
/// 0) with no request coming. The count line is written by a loop of its own; when the
/// probe shared that loop, it waited behind the count line as long as the disk hung.
#[tokio::test]
async fn a_hung_audit_write_is_reported_while_a_count_line_waits_behind_it() {
    let env = Env::with(EnvSpec {
        extra_toml:
            "[limits]\nsign_requests_per_minute = 1\nsign_burst = 1\ndrain_timeout_ms = 1000\n"
                .into(),
        ..EnvSpec::default()
    });
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    // The first refusal has its own line; the next is counted, for the line written at
    // the end of the signer's first minute.
    assert_eq!(sign_fresh(&client, &signer).await.0, 429);
    assert_eq!(sign_fresh(&client, &signer).await.0, 429);

    // Rotated, with a FIFO where the new file would be: the writer's open of it blocks
    // as a write to a disk that stopped answering does. The process is killed at the end.
    let log = env.path("audit.log");
    std::fs::rename(&log, env.path("audit.log.1")).unwrap();
    let fifo = std::ffi::CString::new(log.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

    // The count line at about 60 s, stuck for 10 s, a probe within 5 s of that: a bounded
    // wait, not a timing assertion.
    let line = signer
        .wait_for_nth_log_within(
            "an audit log write has not returned",
            1,
            Duration::from_secs(150),
        )
        .await;
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(logged["level"], "ERROR", "{line}");
    let metrics = signer.metrics(&client).await;
    assert!(metrics.contains("meshca_audit_writable 0"), "{metrics}");
    assert!(
        !signer.logs().contains("rate-limit refusals are kept"),
        "the count line failed rather than waited: {}",
        signer.logs()
    );
    // Stopped, the drain names the task it cuts short (before, it spoke of connections
    // still open). The exit itself waits for the disk: the process is killed after.
    send_signal(signer.child.id(), "TERM");
    let cut = signer
        .wait_for_log("drain time is over: the periodic count of rate-limit refusals")
        .await;
    assert!(cut.contains("waiting for the disk"), "{cut}");
    assert!(
        !signer.logs().contains("connections still open are closed"),
        "{}",
        signer.logs()
    );
}

/// The last line cut from the audit log in place while the signer runs: the next write
/// finds the file shorter than the signer left it, says so in the log (the bytes missing)
/// and in `meshca_audit_truncations_total`, and goes on; verify shows the break.
#[tokio::test]
async fn an_audit_log_cut_in_place_while_serving_is_noticed_at_the_next_write() {
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    let log = env.path("audit.log");
    let content = std::fs::read_to_string(&log).unwrap();
    let last = content.lines().last().unwrap().len() as u64 + 1;
    // In place: the file the signer holds open, not a new one at the path.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(content.len() as u64 - last)
        .unwrap();
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    let line = signer
        .wait_for_log("audit log is shorter than the signer wrote it")
        .await;
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(logged["level"], "ERROR", "{line}");
    assert_eq!(logged["missing_bytes"], last, "{line}");
    assert!(
        logged["path"].as_str().unwrap().ends_with("audit.log"),
        "{line}"
    );
    let metrics = signer.metrics(&client).await;
    assert!(
        metrics.contains("meshca_audit_truncations_total 1"),
        "{metrics}"
    );
    // Still issuing, the count unchanged by writes that find the file as it was left.
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    let metrics = signer.metrics(&client).await;
    assert!(
        metrics.contains("meshca_audit_truncations_total 1"),
        "{metrics}"
    );
    // The line written after the cut continues the line that was cut.
    let out = run(env.meshca().args(["audit", "verify", "audit.log"]));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("breaks at line 2"), "{stderr}");
}

/// Another writer appends to the audit log while the signer runs, as an older meshca
/// (which takes no lock on the log) started beside it during an upgrade does: the next
/// write finds the file longer than the signer left it, says so in the log (the file, the
/// bytes added) and in `meshca_audit_foreign_appends_total`, and goes on with its own
/// chain; verify breaks there and names two writers.
#[tokio::test]
async fn an_audit_log_another_writer_appends_to_while_serving_is_noticed_at_the_next_write() {
    use sha2::Digest;
    let env = Env::new();
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    let log = env.path("audit.log");
    let content = std::fs::read_to_string(&log).unwrap();
    let lines = content.lines().count();
    // The older signer's start record, chained from the last line it found.
    let last = content.lines().last().unwrap();
    let foreign = meshca::signer::audit::AuditRecord {
        time: meshca::signer::audit::rfc3339(std::time::SystemTime::now()),
        event: "start".into(),
        prev: meshca::pki::csr::hex(&sha2::Sha256::digest(last.as_bytes())),
        ..Default::default()
    };
    let foreign = serde_json::to_string(&foreign).unwrap() + "\n";
    // Appended without the lock, to the file the signer holds open.
    let mut other = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut other, foreign.as_bytes()).unwrap();
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    let line = signer
        .wait_for_log("audit log is longer than the signer wrote it")
        .await;
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(logged["level"], "ERROR", "{line}");
    assert_eq!(logged["added_bytes"], foreign.len(), "{line}");
    assert!(
        logged["path"].as_str().unwrap().ends_with("audit.log"),
        "{line}"
    );
    let message = logged["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("appended by another writer")
            && message.contains("the hash chain will not verify past this point"),
        "{line}"
    );
    let metrics = signer.metrics(&client).await;
    assert!(
        metrics.contains("meshca_audit_foreign_appends_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshca_audit_truncations_total 0"),
        "{metrics}"
    );
    // Still issuing, the count unchanged by writes that find the file as it was left.
    assert_eq!(sign_fresh(&client, &signer).await.0, 200);
    let metrics = signer.metrics(&client).await;
    assert!(
        metrics.contains("meshca_audit_foreign_appends_total 1"),
        "{metrics}"
    );
    // The signer's line after the foreign one continues the signer's own last line.
    let out = run(env.meshca().args(["audit", "verify", "audit.log"]));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    let (foreign_at, next) = (lines + 1, lines + 2);
    assert!(
        stderr.contains(&format!(
            "breaks at line {next}: line {next} does not continue line {foreign_at}: "
        )) && stderr.contains(&format!(
            "its prev is the hash of line {lines}, so line {foreign_at} is not in its chain: two writers append to this log"
        )),
        "{stderr}"
    );
}

/// An environment whose rate limit never binds: the load tests are about faults only.
fn unlimited_env() -> Env {
    Env::with(EnvSpec::unlimited_rate())
}

#[tokio::test]
async fn sigkill_under_load_loses_no_audited_answer() {
    let env = unlimited_env();
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    // Bounded: at most 200 requests per task, and it stops at the first failure.
    let load = load::start(
        &client,
        &signer.url("/v1/sign"),
        load::fresh_bodies(32, VM, MESH_A),
        200,
        |sent| async move {
            let response = sent.ok()?;
            if response.status().as_u16() != 200 {
                return None;
            }
            let answer = response.json::<Value>().await.ok()?;
            Some(answer["serial"].as_str().unwrap().to_string())
        },
    );
    // Kill once 64 answers went out.
    load.wait_for(64).await;
    send_signal(signer.child.id(), "KILL");
    let _ = signer.child.wait();
    let answered = load.join().await;
    assert!(answered.len() >= 64);

    // Every certificate a client received has its allow line on disk.
    let audited: std::collections::HashSet<String> = signer
        .audit_lines_lossy()
        .iter()
        .filter(|l| l["decision"] == "allow")
        .filter_map(|l| l["serial"].as_str().map(String::from))
        .collect();
    for serial in &answered {
        assert!(
            audited.contains(serial),
            "serial {serial} was answered but not audited"
        );
    }

    // After a restart the chain verifies (a torn tail, if any, is moved aside and recorded).
    let restarted = env.start_signer();
    assert_still_issues(&client, &restarted).await;
    env.audit_verify_ok();
}

#[tokio::test]
async fn sigterm_under_load_drains_in_flight_requests_and_exits_zero() {
    let env = unlimited_env();
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    // Set just before SIGTERM: a request may fail only after it (new ones are refused).
    let terminating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = load::start(
        &client,
        &signer.url("/v1/sign"),
        load::fresh_bodies(32, VM, MESH_A),
        200,
        {
            let terminating = terminating.clone();
            move |sent| {
                let terminating = terminating.clone();
                async move {
                    let response = match sent {
                        Ok(response) => response,
                        Err(e) => {
                            assert!(
                                terminating.load(std::sync::atomic::Ordering::SeqCst),
                                "a request failed before SIGTERM: {e}"
                            );
                            return None;
                        }
                    };
                    // A response that started is finished: no truncated bodies.
                    assert_eq!(response.status().as_u16(), 200);
                    let answer: Value = response.json().await.expect("a complete answer");
                    Some(answer["serial"].as_str().unwrap().to_string())
                }
            }
        },
    );
    load.wait_for(32).await;
    // No task runs between this count and the signal (this runtime has one thread, and
    // nothing here awaits): answers counted later came after SIGTERM.
    let answered_before = load.answered();
    terminating.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        signer.terminate(),
        "SIGTERM must drain and exit 0:\n{}",
        signer.logs()
    );
    let answered: std::collections::HashSet<String> = load.join().await.into_iter().collect();
    let issued: std::collections::HashSet<String> = signer
        .audit_lines()
        .iter()
        .filter(|l| l["decision"] == "allow")
        .filter_map(|l| l["serial"].as_str().map(String::from))
        .collect();
    // Every request the signer decided, before SIGTERM or while draining, was answered;
    // and those it had not answered when SIGTERM came are the drain's work: some must
    // have been, or nothing was drained.
    let in_flight = issued.len().saturating_sub(answered_before);
    assert!(
        in_flight > 0,
        "no request was in flight at SIGTERM ({answered_before} answered, {} issued)",
        issued.len()
    );
    let unanswered = issued.difference(&answered).count();
    assert_eq!(
        unanswered, 0,
        "{unanswered} of the {in_flight} requests in flight at SIGTERM were not answered"
    );
    assert!(
        answered.is_subset(&issued),
        "answered without an audited allow"
    );
    assert!(signer.logs().contains("drained"), "{}", signer.logs());
    env.audit_verify_ok();
}

/// What `openssl s_client -brief` made of one connection: on stderr, `CONNECTION
/// ESTABLISHED` with the negotiated `Protocol version:` and `Ciphersuite:` once a handshake
/// completed, an error naming any alert it received otherwise.
struct Probe {
    stdout: String,
    stderr: String,
}

impl Probe {
    fn line(&self, prefix: &str) -> Option<&str> {
        self.stderr.lines().find_map(|l| l.strip_prefix(prefix))
    }

    /// Completed with `version` and `suite` (any suite if None), the server verified.
    fn completed(&self, version: &str, suite: Option<&str>) -> bool {
        self.stderr.contains("CONNECTION ESTABLISHED")
            && self.line("Protocol version: ") == Some(version)
            && suite.is_none_or(|want| self.line("Ciphersuite: ") == Some(want))
            && self.line("Verification: ") == Some("OK")
    }

    /// Refused by the server: nothing negotiated, and an alert it sent (s_client names an
    /// alert it received as `SSL alert number N`; a handshake the client gave up on by
    /// itself has none).
    fn refused_by_server(&self) -> bool {
        !self.stderr.contains("CONNECTION ESTABLISHED")
            && self.line("Protocol version: ").is_none()
            && self.stderr.contains("SSL alert number")
    }

    fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// `openssl s_client -brief` to `addr` as client cluster-a, with `args`; no input, so it
/// ends once the handshake is done or refused (`timeout` bounds it).
fn probe(env: &Env, addr: &str, args: &[&str]) -> Probe {
    let out = run(std::process::Command::new("timeout")
        .current_dir(env.dir.path())
        .args(["20", "openssl", "s_client", "-brief", "-connect", addr])
        .args(["-CAfile", "pki/ca.pem"])
        .args(["-cert", "pki/cluster-a.pem", "-key", "pki/cluster-a.key"])
        .args(args)
        .stdin(std::process::Stdio::null()));
    Probe {
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

/// `openssl s_server` with the signer's own certificate and key, allowing every protocol
/// version and suite this OpenSSL has: the positive control of a refusal probe (the same
/// client invocation completes when the server allows it). Killed when dropped.
struct PermissiveServer {
    child: std::process::Child,
    addr: String,
}

impl PermissiveServer {
    fn start(env: &Env) -> PermissiveServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new("openssl")
            .current_dir(env.dir.path())
            .args(["s_server", "-accept", "127.0.0.1:0"])
            .args(["-cert", "pki/signer.pem", "-key", "pki/signer.key"])
            .args(["-cipher", "ALL:@SECLEVEL=0", "-min_protocol", "TLSv1"])
            // s_server ends at the end of its input: stdin stays open while it serves.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn openssl s_server");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // `ACCEPT 127.0.0.1:PORT` once it listens; it writes nothing more unless asked.
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("ACCEPT ").map(str::to_string));
        // The rest is drained, so a full pipe never blocks it.
        std::thread::spawn(move || lines.for_each(drop));
        match addr {
            Some(addr) => PermissiveServer { child, addr },
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("openssl s_server did not start");
            }
        }
    }
}

impl Drop for PermissiveServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn only_tls13_and_forward_secret_tls12_are_offered() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();

    let tls13 = probe(&env, &addr, &["-tls1_3"]);
    assert!(
        tls13.completed("TLSv1.3", None),
        "TLS 1.3 must work:\n{}",
        tls13.output()
    );
    let suite = "ECDHE-ECDSA-AES128-GCM-SHA256";
    let tls12 = probe(&env, &addr, &["-tls1_2", "-cipher", suite]);
    assert!(
        tls12.completed("TLSv1.2", Some(suite)),
        "ECDHE AEAD TLS 1.2 must work:\n{}",
        tls12.output()
    );

    // Each refusal only counts if this client completes the same handshake with a server
    // that allows it (OpenSSL 3 clients offer TLS 1.0 and 1.1 only at security level 0).
    // No static-RSA probe: the signer's key is ECDSA, with which an RSA key exchange can
    // never be negotiated whatever the signer allowed, so that probe could not fail.
    let permissive = PermissiveServer::start(&env);
    // (what, s_client arguments, the version and suite the control completes with)
    let refusals: [(&str, &[&str], &str, Option<&str>); 3] = [
        (
            "a CBC suite",
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"],
            "TLSv1.2",
            Some("ECDHE-ECDSA-AES128-SHA"),
        ),
        (
            "TLS 1.1",
            &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
            "TLSv1.1",
            None,
        ),
        (
            "TLS 1.0",
            &["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"],
            "TLSv1",
            None,
        ),
    ];
    for (what, args, version, suite) in refusals {
        let control = probe(&env, &permissive.addr, args);
        assert!(
            control.completed(version, suite),
            "{what}: the probe does not complete even where the server allows it, so its \
             refusal would prove nothing:\n{}",
            control.output()
        );
        let refused = probe(&env, &addr, args);
        assert!(
            refused.refused_by_server(),
            "{what} must be refused by the signer, with an alert:\n{}",
            refused.output()
        );
    }
}
