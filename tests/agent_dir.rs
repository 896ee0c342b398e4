//! `meshca agent --target-dir` end to end against a real signer with a real SoftHSM root:
//! first issue, idempotent re-runs (files untouched, same inodes and mtimes), renewal when
//! due, a damaged set replaced whole, foreign files left alone unless adopted, and a
//! signer that cannot be reached (files untouched, retries with growing backoff, then
//! renewal once it is back).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::certs::*;
use common::*;
use serde_json::Value;

const NAMES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];

/// `meshca agent` in directory mode for cluster-a, with the given extra flags.
fn agent_cmd(env: &Env, addr: &str, dir: &Path, extra: &[&str]) -> Command {
    agent_cmd_for(env, addr, "cluster-a", dir, extra)
}

/// `meshca agent` in directory mode for `cluster` (its client, mesh `test/<cluster>`).
fn agent_cmd_for(env: &Env, addr: &str, cluster: &str, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = env.meshca();
    cmd.args(["--log-format", "json", "agent", "--target-dir"])
        .arg(dir)
        .args(env.signer_flags(addr, cluster))
        .args(["--virtual-mesh", "test/vm", "--mesh"])
        .arg(format!("test/{cluster}"))
        .args(extra);
    if !extra.contains(&"--ttl-seconds") {
        cmd.args(["--ttl-seconds", "1800"]);
    }
    cmd
}

fn once(env: &Env, addr: &str, dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = agent_cmd(env, addr, dir, extra);
    cmd.arg("--once");
    run(&mut cmd)
}

/// One pass of `cluster`'s agent, which must succeed: what it printed.
fn pass_ok(env: &Env, addr: &str, cluster: &str, dir: &Path, extra: &[&str]) -> String {
    let out = run(agent_cmd_for(env, addr, cluster, dir, extra).arg("--once"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Everything that would change if a file were rewritten: the `..data` target, and each
/// file's contents, inode and mtime. Contents are kept as SHA-256 digests: a failed
/// comparison prints the snapshot, and ca-key.pem's bytes are a private key.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    data_link: PathBuf,
    files: Vec<(String, String, u64, i64, i64)>,
    entries: Vec<String>,
}

/// SHA-256 of `bytes`, lowercase hex.
fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn snapshot(dir: &Path) -> Snapshot {
    let files = NAMES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let meta = std::fs::metadata(&path).unwrap();
            (
                name.to_string(),
                digest(&std::fs::read(&path).unwrap()),
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec(),
            )
        })
        .collect();
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    Snapshot {
        data_link: std::fs::read_link(dir.join("..data")).unwrap(),
        files,
        entries,
    }
}

fn serial(dir: &Path) -> String {
    openssl(dir, &["x509", "-in", "ca-cert.pem", "-noout", "-serial"])
}

/// The installed intermediate's notBefore or notAfter (`which`: `startdate`, `enddate`)
/// in Unix seconds, as openssl and date read it.
fn validity_unix(dir: &Path, which: &str) -> i64 {
    certificate_date_unix(&dir.join("ca-cert.pem"), which)
}

/// A plain-HTTP GET of `path` from the agent's metrics listener: the body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

fn assert_valid(env: &Env, dir: &Path) {
    let verified = run_ok(
        env.meshca()
            .arg("verify")
            .arg(dir)
            .arg("--root")
            .arg(env.path("root-cert.pem")),
    );
    assert!(text(&verified.stdout).contains("is a valid plugged-in CA bundle"));
    let out = openssl_verify_bundle(dir);
    assert!(out.contains("OK"), "{out}");
    assert_eq!(
        openssl(dir, &["x509", "-in", "ca-cert.pem", "-noout", "-pubkey"]),
        openssl(dir, &["pkey", "-in", "ca-key.pem", "-pubout"])
    );
}

#[test]
fn issues_then_leaves_a_valid_bundle_alone_then_renews_when_due() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("etc/cacerts");

    let first = once(&env, &addr, &dir, &[]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let stdout = text(&first.stdout);
    assert!(
        stdout.contains("installed a new intermediate (no bundle installed yet)")
            && stdout.contains("restart istiod"),
        "{stdout}"
    );
    assert_valid(&env, &dir);
    assert_eq!(
        std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
        env.root_pem()
    );
    let before = snapshot(&dir);

    // Second and third runs: valid, not due: not a byte, inode or mtime changes.
    for _ in 0..2 {
        let again = once(&env, &addr, &dir, &[]);
        assert!(again.status.success(), "{}", text(&again.stderr));
        assert!(
            text(&again.stdout).contains("bundle valid and not due; nothing written"),
            "{}",
            text(&again.stdout)
        );
        assert_eq!(snapshot(&dir), before);
    }
    // The bundle is valid and not due, but a renewal would be refused: the pass fails
    // now, by name, leaving the files as they are. A virtual mesh the signer does not know
    // (renamed or removed there); another cluster's client certificate, which the
    // signer's grants do not let ask for this mesh; a ttl over the policy's maximum.
    let refused_pass = |client: &str, virtual_mesh: &str, ttl: &str, needle: &str| {
        let mut cmd = env.meshca();
        cmd.args(["--log-format", "json", "agent", "--once", "--target-dir"])
            .arg(&dir)
            .args(env.signer_flags(&addr, client))
            .args(["--virtual-mesh", virtual_mesh, "--mesh", "test/cluster-a"])
            .args(["--ttl-seconds", ttl]);
        let refused = run(&mut cmd);
        assert!(!refused.status.success());
        let stderr = text(&refused.stderr);
        assert!(stderr.contains(needle), "{needle} missing from\n{stderr}");
        assert_eq!(snapshot(&dir), before);
    };
    refused_pass(
        "cluster-a",
        "test/gone",
        "1800",
        "the signer refused (404 unknown_virtual_mesh)",
    );
    refused_pass(
        "cluster-b",
        "test/vm",
        "1800",
        "the signer would refuse to renew: its grants do not let this client ask for mesh test/cluster-a of virtual mesh test/vm (it may ask for test/cluster-b)",
    );
    refused_pass(
        "cluster-a",
        "test/vm",
        "2678400",
        "a ttl of 2678400 s exceeds virtual mesh test/vm's maximum of 2592000 s: the signer would refuse the renewal",
    );

    let issued = signer.issued_lines().len();
    assert_eq!(issued, 1, "idempotent runs must not ask the signer to sign");

    // notBefore is backdated 5 minutes and the ttl is 30 minutes: 10% of the 35-minute
    // lifetime is already behind us, so the bundle is due and replaced as a whole set.
    // (With the default 2/3 it is due only some 16 minutes after issuance.)
    let old_serial = serial(&dir);
    let renewed = once(
        &env,
        &addr,
        &dir,
        &["--renew-fraction", "0.1", "--jitter-fraction", "0"],
    );
    assert!(renewed.status.success(), "{}", text(&renewed.stderr));
    // The same roots: istiod reloads the files by itself.
    assert!(
        text(&renewed.stdout).contains("(renewal time reached)")
            && !text(&renewed.stdout).contains("restart istiod"),
        "{}",
        text(&renewed.stdout)
    );
    assert_valid(&env, &dir);
    assert_ne!(serial(&dir), old_serial);
    let after = snapshot(&dir);
    assert_ne!(after.data_link, before.data_link);
    // One version directory, ..data and the four links: the old set is gone.
    assert_eq!(after.entries.len(), 6, "{:?}", after.entries);
}

/// A write killed before its swap leaves a version directory holding a signed
/// intermediate's key that istiod never used; a pass with nothing due removes it and names
/// it, rather than keep the key until the next renewal. Another tool's names stay.
#[test]
fn a_pass_with_nothing_due_removes_what_a_killed_write_left() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("etc/cacerts");
    let first = once(&env, &addr, &dir, &[]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let before = snapshot(&dir);

    let leftover = dir.join("..1796110901.123456789.0");
    std::fs::create_dir(&leftover).unwrap();
    std::fs::write(leftover.join("ca-key.pem"), "not a key, a stand-in").unwrap();
    let foreign = dir.join("..notes");
    std::fs::create_dir(&foreign).unwrap();

    let again = once(&env, &addr, &dir, &[]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("bundle valid and not due; nothing written"),
        "{}",
        text(&again.stdout)
    );
    assert!(!leftover.exists(), "the leftover version directory stays");
    assert!(
        foreign.is_dir(),
        "a directory meshca did not name is removed"
    );
    let stderr = text(&again.stderr);
    assert!(
        stderr.contains("a write cut short") && stderr.contains("..1796110901.123456789.0"),
        "{stderr}"
    );
    std::fs::remove_dir(&foreign).unwrap();
    assert_eq!(snapshot(&dir), before, "the installed bundle changed");
    assert_eq!(signer.issued_lines().len(), 1);
}

/// The public key of the installed intermediate, as openssl names it (`Public-Key: (256
/// bit)`, `ASN1 OID: secp384r1`, ...).
fn intermediate_key(dir: &Path) -> String {
    openssl(dir, &["x509", "-in", "ca-cert.pem", "-noout", "-text"])
}

#[test]
fn a_raised_rsa_minimum_replaces_an_installed_key_it_no_longer_accepts() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("etc/cacerts");
    // No key type asked for: the agent takes P-256 under an RSA minimum of 2048.
    pass_ok(&env, &addr, "cluster-a", &dir, &[]);
    assert!(intermediate_key(&dir).contains("prime256v1"));
    let roots_before = std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();

    // The minimum raised to 4096 on the signer: P-256 (128-bit strength) is out.
    let policies = env.path("virtual-meshes.yaml");
    let yaml = std::fs::read_to_string(&policies).unwrap();
    assert!(yaml.contains("rsaKeySizeBytes: 2048"), "{yaml}");
    std::fs::write(
        &policies,
        yaml.replace("rsaKeySizeBytes: 2048", "rsaKeySizeBytes: 4096"),
    )
    .unwrap();
    send_signal(signer.child.id(), "HUP");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(signer.wait_for_log("SIGHUP: rules"));

    // Replaced at once, not when due: a key the policy accepts, under the same root, so
    // root-cert.pem keeps its bytes and istiod takes the files without a restart.
    let out = pass_ok(&env, &addr, "cluster-a", &dir, &[]);
    assert!(
        out.contains(
            "installed a new intermediate (installed bundle does not match: key is ECDSA P-256, which the signer's policy no longer accepts (accepted: rsa4096, ecdsa-p384))"
        ) && !out.contains("restart istiod"),
        "{out}"
    );
    assert!(intermediate_key(&dir).contains("secp384r1"));
    assert_eq!(
        std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
        roots_before
    );
    assert_valid(&env, &dir);
    let out = pass_ok(&env, &addr, "cluster-a", &dir, &[]);
    assert!(
        out.contains("bundle valid and not due; nothing written"),
        "{out}"
    );
}

#[test]
fn a_key_type_the_policy_refuses_is_refused_before_anything_says_requesting() {
    let env = Env::with(EnvSpec::with_rsa_minimum(4096));
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("etc/cacerts");
    let refused = once(&env, &addr, &dir, &["--key-type", "ecdsa-p256"]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains(
            "key type ecdsa-p256 is not accepted by virtual mesh test/vm (accepted: rsa4096, ecdsa-p384)"
        ) && !stderr.contains("requesting a new intermediate"),
        "{stderr}"
    );
    // An accepted key type is requested, and says so.
    let accepted = once(&env, &addr, &dir, &["--key-type", "ecdsa-p384"]);
    assert!(accepted.status.success(), "{}", text(&accepted.stderr));
    assert!(text(&accepted.stderr).contains("requesting a new intermediate"));
}

/// A set that lost its key (pruned, partly restored): replaced, and istiod named for a
/// restart although root-cert.pem is the same bytes: one started meanwhile found no
/// ca-key.pem and runs on its self-signed CA, which only a restart undoes.
#[test]
fn a_set_missing_its_key_is_replaced_and_istiod_named_for_a_restart() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("cacerts");
    assert!(once(&env, &addr, &dir, &[]).status.success());
    let roots = std::fs::read(dir.join("root-cert.pem")).unwrap();
    std::fs::remove_file(dir.join("..data").join("ca-key.pem")).unwrap();

    let repaired = once(&env, &addr, &dir, &[]);
    assert!(repaired.status.success(), "{}", text(&repaired.stderr));
    assert_valid(&env, &dir);
    assert_eq!(std::fs::read(dir.join("root-cert.pem")).unwrap(), roots);
    let (stdout, stderr) = (text(&repaired.stdout), text(&repaired.stderr));
    assert!(
        stdout.contains(
            "then         restart istiod: the files replaced held no CA istiod could sign with"
        ),
        "{stdout}"
    );
    assert!(
        stderr.contains("the files replaced held no CA istiod could sign with: restart istiod (one started meanwhile found no usable ca-key.pem"),
        "{stderr}"
    );
    // Once: the next pass finds the set whole.
    let again = once(&env, &addr, &dir, &[]);
    assert!(
        !text(&again.stdout).contains("restart istiod"),
        "{}",
        text(&again.stdout)
    );
}

/// Another tool's directory holding meshca's root-cert.pem alone (a GitOps repo that
/// ships the trust first), adopted: istiod had no CA to sign with there and runs on its
/// self-signed one, so it is named for a restart although root-cert.pem stays the same
/// bytes. Before, only a changed root-cert.pem named it.
#[test]
fn adopting_a_directory_without_a_ca_key_names_istiod_for_a_restart() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("cacerts");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("root-cert.pem"), env.root_pem()).unwrap();

    let adopted = once(&env, &addr, &dir, &["--adopt"]);
    assert!(adopted.status.success(), "{}", text(&adopted.stderr));
    assert_valid(&env, &dir);
    let stdout = text(&adopted.stdout);
    assert!(
        stdout.contains("restart istiod: the files replaced held no CA istiod could sign with"),
        "{stdout}"
    );
}

#[test]
fn a_damaged_set_is_replaced_whole_and_foreign_files_need_adopt() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("cacerts");
    assert!(once(&env, &addr, &dir, &[]).status.success());

    // Damage: another key in place of ca-key.pem (written where the link points).
    let data = dir.join("..data");
    let (other_key, _) = csr(meshca::pki::keys::KeyType::EcdsaP256, "acme", "x");
    std::fs::write(
        data.join("ca-key.pem"),
        other_key.to_pkcs8_pem().unwrap().as_bytes(),
    )
    .unwrap();
    let old_serial = serial(&dir);
    let repaired = once(&env, &addr, &dir, &[]);
    assert!(repaired.status.success(), "{}", text(&repaired.stderr));
    assert!(
        text(&repaired.stdout).contains("installed bundle is damaged"),
        "{}",
        text(&repaired.stdout)
    );
    assert_valid(&env, &dir);
    assert_ne!(serial(&dir), old_serial);

    // Plain files from someone else: refused without --adopt, and left exactly as they are.
    let foreign = env.path("foreign");
    std::fs::create_dir(&foreign).unwrap();
    for name in NAMES {
        std::fs::copy(dir.join(name), foreign.join(name)).unwrap();
    }
    // Digests, not bytes: ca-key.pem is a private key, and a failed comparison prints both.
    let contents = |d: &Path| -> Vec<String> {
        NAMES
            .iter()
            .map(|n| digest(&std::fs::read(d.join(n)).unwrap()))
            .collect()
    };
    let untouched = contents(&foreign);
    let refused = once(&env, &addr, &foreign, &[]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("not meshca's") && stderr.contains("adopt"),
        "{stderr}"
    );
    assert_eq!(contents(&foreign), untouched);
    assert!(!foreign.join("..data").exists());

    let adopted = once(&env, &addr, &foreign, &["--adopt"]);
    assert!(adopted.status.success(), "{}", text(&adopted.stderr));
    assert!(text(&adopted.stdout).contains("adopting"));
    assert!(
        std::fs::symlink_metadata(foreign.join("..data"))
            .unwrap()
            .is_symlink()
    );
    assert_valid(&env, &foreign);
}

#[test]
fn a_target_that_cannot_be_written_costs_no_signature() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    // A directory where the `..data` link goes (the rename onto it would fail), and a
    // place where nothing can be created (procfs), both found before the signer is asked.
    let blocked = env.path("blocked");
    std::fs::create_dir_all(blocked.join("..data")).unwrap();
    let uncreatable = PathBuf::from(format!("/proc/sys/meshca-test-{}", std::process::id()));
    let blocked_data = blocked.join("..data").display().to_string();
    let uncreatable_name = uncreatable.display().to_string();
    for (dir, needle) in [
        (&blocked, blocked_data.as_str()),
        (&uncreatable, uncreatable_name.as_str()),
    ] {
        let request = |dir: &Path| {
            run(env
                .meshca()
                .arg("request")
                .args(env.signer_flags(&addr, "cluster-a"))
                .args(["--virtual-mesh", "test/vm", "--mesh", "test/cluster-a"])
                .arg("--out-dir")
                .arg(dir))
        };
        for out in [once(&env, &addr, dir, &[]), request(dir)] {
            assert!(!out.status.success());
            let stderr = text(&out.stderr);
            assert!(
                stderr.contains("nothing was asked of the signer") && stderr.contains(needle),
                "{stderr}"
            );
        }
    }
    let issued = signer.issued_lines().len();
    assert_eq!(issued, 0);
    let left: Vec<String> = std::fs::read_dir(&blocked)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["..data"]);
}

/// The address the agent's log says its metrics listener is bound to.
fn metrics_address(logs: &mpsc::Receiver<serde_json::Value>) -> String {
    std::iter::from_fn(|| logs.recv_timeout(Duration::from_secs(30)).ok())
        .find_map(|line| line["metrics"].as_str().map(str::to_string))
        .expect("the agent logs its metrics address")
}

/// A running `meshca agent` loop, killed and reaped when dropped: a failed assertion
/// must not leave it running (it never ends by itself).
struct AgentLoop(Child);

impl AgentLoop {
    /// SIGTERM; it must exit successfully, within [`EXIT_WAIT`].
    fn terminate(&mut self) {
        send_signal(self.0.id(), "TERM");
        let status = wait_within(&mut self.0, EXIT_WAIT)
            .unwrap_or_else(|| panic!("the agent did not exit within {EXIT_WAIT:?} of SIGTERM"));
        assert!(status.success(), "the agent's exit: {status}");
    }
}

impl Drop for AgentLoop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns the long-running agent; its JSON log lines arrive on the receiver.
fn spawn_loop(mut cmd: Command) -> (AgentLoop, mpsc::Receiver<serde_json::Value>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshca agent");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = tx.send(value);
            }
        }
    });
    (AgentLoop(child), rx)
}

/// The README's runbook for `MeshcaAgentSignerUnreachable` quotes the agent's lines as it
/// writes them: `not_due` while the intermediate is not due (quoted up to its `;`), and
/// `failed` once it is, each with the cause in its `error`.
fn assert_runbook_quotes_the_agent(not_due: &serde_json::Value, failed: &serde_json::Value) {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `MeshcaAgentSignerUnreachable`"))
        .expect("the alert's row in the README");
    let not_due_message = not_due["message"].as_str().unwrap();
    let (head, _) = not_due_message.split_once("; ").unwrap();
    let failed_message = failed["message"].as_str().unwrap();
    for quoted in [
        format!("`{head}; ...`"),
        format!("`{failed_message}`"),
        "`cannot reach the signer at ...`".to_string(),
    ] {
        assert!(row.contains(&quoted), "{quoted} not in\n{row}");
    }
    for line in [not_due, failed] {
        let error = line["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("cannot reach the signer at "), "{line}");
    }
}

#[test]
fn an_unreachable_signer_leaves_files_untouched_and_the_loop_retries_until_it_is_back() {
    let env = Env::new();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("cacerts");
    assert!(once(&env, &addr, &dir, &[]).status.success());
    let before = snapshot(&dir);
    let old_serial = serial(&dir);
    drop(signer);

    // Valid and not due: nothing written, and the bundle is fine without the signer; but
    // a cron job's `--once` must notice the signer is gone before the renewal is due:
    // exit 75 (EX_TEMPFAIL), the cause on stdout.
    let offline = once(&env, &addr, &dir, &[]);
    let stdout = text(&offline.stdout);
    assert_eq!(offline.status.code(), Some(75), "{}", text(&offline.stderr));
    assert!(stdout.contains("nothing written"), "{stdout}");
    assert!(
        stdout.contains("signer       unavailable: cannot reach the signer at "),
        "{stdout}"
    );
    assert_eq!(snapshot(&dir), before);

    // The loop, valid and not due: its passes succeed without the signer, and its metrics
    // say the signer does not answer (what alerts before a renewal is due).
    let target = format!("{{request=\"{}\"}}", dir.display());
    let series = |name: &str| format!("meshca_agent_{name}{target}");
    // `certificate_ready` and `signer_reachable` of this request in a metrics text.
    let assert_ready_and_reachable = |metrics: &str, (ready, reachable): (i64, i64)| {
        for (name, value) in [
            ("certificate_ready", ready),
            ("signer_reachable", reachable),
        ] {
            assert_eq!(
                metric_sample(metrics, &series(name)),
                Some(value),
                "{metrics}"
            );
        }
    };
    let mut cmd = agent_cmd(&env, &addr, &dir, &[]);
    cmd.args(["--metrics-listen", "127.0.0.1:0"]);
    let (agent, logs) = spawn_loop(cmd);
    let metrics_addr = metrics_address(&logs);
    let not_due_line = std::iter::from_fn(|| logs.recv_timeout(Duration::from_secs(30)).ok())
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("signer unavailable"))
        })
        .expect("the agent passes without the signer");
    // Logged after the pass's metrics are recorded, as every outcome line is.
    let offline = http_get(&metrics_addr, "/metrics");
    assert_ready_and_reachable(&offline, (1, 0));
    drop(agent); // killed and reaped
    assert_eq!(snapshot(&dir), before);

    // Due, signer down: fails, names the cause, leaves every file as it was.
    let due = ["--renew-fraction", "0.1", "--jitter-fraction", "0"];
    let failed = once(&env, &addr, &dir, &due);
    assert!(!failed.status.success());
    assert!(
        text(&failed.stderr).contains("cannot reach the signer"),
        "{}",
        text(&failed.stderr)
    );
    assert_eq!(snapshot(&dir), before);

    // The loop: retries with a growing delay, files untouched meanwhile; its metrics say
    // the request fails and when the installed intermediate expires. A loop refuses a ttl
    // whose fresh certificates would be due at once under its renewal fraction (it would
    // renew every second): 1800 s is too short for 0.1, so the loop asks for an hour.
    let mut short = agent_cmd(&env, &addr, &dir, &due);
    let refused = run(&mut short);
    // A usage mistake, named by the flags given.
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr)
            .contains("a --ttl-seconds of 1800 s is too short for this renewal fraction")
            && text(&refused.stderr).contains("at least 3300 s, or a larger --renew-fraction"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(snapshot(&dir), before);
    let due_hourly = [due.as_slice(), &["--ttl-seconds", "3600"]].concat();
    let mut cmd = agent_cmd(&env, &addr, &dir, &due_hourly);
    cmd.args(["--resync-seconds", "8", "--metrics-listen", "127.0.0.1:0"]);
    let (mut agent, logs) = spawn_loop(cmd);
    let metrics_addr = metrics_address(&logs);
    let mut delays = Vec::new();
    let mut failed_lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while delays.len() < 2 && Instant::now() < deadline {
        if let Ok(line) = logs.recv_timeout(Duration::from_secs(1))
            && let Some(delay) = line.get("retry_in_seconds").and_then(|d| d.as_u64())
        {
            let message = line["message"].as_str().unwrap_or_default().to_string();
            assert!(
                message.contains("existing files left as they were"),
                "{message}"
            );
            delays.push(delay);
            failed_lines.push(line);
        }
    }
    assert_eq!(delays, vec![2, 4]);
    assert_runbook_quotes_the_agent(&not_due_line, &failed_lines[0]);
    // The line names the directory (the metrics' `request`), and the runbook of the
    // alert on those metrics sends the reader to it: directory mode has no status.
    assert_eq!(
        failed_lines[0]["dir"],
        dir.display().to_string(),
        "{}",
        failed_lines[0]
    );
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `MeshcaAgentRequestFailing`"))
        .expect("the alert's row in the README");
    let failed_message = failed_lines[0]["message"].as_str().unwrap();
    assert!(
        row.contains(failed_message),
        "{failed_message} not in\n{row}"
    );
    assert_eq!(snapshot(&dir), before);
    let failing = http_get(&metrics_addr, "/metrics");
    assert_ready_and_reachable(&failing, (0, 0));
    assert_eq!(
        metric_sample(
            &failing,
            &series("certificate_expiration_timestamp_seconds")
        ),
        Some(validity_unix(&dir, "enddate")),
        "{failing}"
    );
    assert!(failing.contains("meshca_agent_reconciles_total{outcome=\"SignerError\"}"));
    assert_eq!(
        metric_sample(&failing, "meshca_agent_issuances_total"),
        Some(0)
    );
    assert_eq!(metric_sample(&failing, "meshca_agent_leader"), Some(1));
    assert_eq!(
        metric_sample(&failing, "meshca_agent_resync_seconds"),
        Some(8)
    );
    // The client certificate it presents, read on each pass even while the signer is down.
    assert_eq!(
        metric_sample(
            &failing,
            "meshca_agent_client_certificate_expiration_timestamp_seconds"
        ),
        Some(certificate_date_unix(
            &env.path("pki/cluster-a.pem"),
            "enddate"
        )),
        "{failing}"
    );
    assert_eq!(http_get(&metrics_addr, "/healthz"), "ok\n");

    // The signer comes back on the same address: the loop renews.
    let _signer = env.start_signer_with(&["--listen", &addr]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut installed = false;
    while !installed && Instant::now() < deadline {
        if let Ok(line) = logs.recv_timeout(Duration::from_secs(1)) {
            installed = line["message"] == "installed a new intermediate";
        }
    }
    assert!(
        installed,
        "the agent did not renew once the signer was back"
    );
    let renewed = http_get(&metrics_addr, "/metrics");
    assert_ready_and_reachable(&renewed, (1, 1));
    let (not_before, not_after) = (
        validity_unix(&dir, "startdate"),
        validity_unix(&dir, "enddate"),
    );
    assert_eq!(
        metric_sample(
            &renewed,
            &series("certificate_expiration_timestamp_seconds")
        ),
        Some(not_after),
        "{renewed}"
    );
    // --renew-fraction 0.1 without jitter: a tenth into the lifetime.
    let renewal =
        metric_sample(&renewed, &series("certificate_renewal_timestamp_seconds")).unwrap();
    let expected = not_before + (not_after - not_before) / 10;
    assert!((renewal - expected).abs() <= 1, "{renewal} vs {expected}");
    // Due after its issue (notBefore is 5 minutes back), not at once.
    assert!(renewal > not_before + 300, "{renewal} vs {not_before}");
    assert_eq!(
        metric_sample(&renewed, "meshca_agent_issuances_total"),
        Some(1)
    );
    agent.terminate();
    assert_ne!(serial(&dir), old_serial);
    assert_valid(&env, &dir);
}

#[test]
fn a_client_certificate_rotated_on_disk_is_used_from_the_next_pass_without_a_restart() {
    let env = Env::new();
    env.check_client_crls();
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("cacerts");

    let mut cmd = agent_cmd(&env, &addr, &dir, &[]);
    cmd.args(["--resync-seconds", "1", "--metrics-listen", "127.0.0.1:0"]);
    let started = SystemTime::now();
    let (mut agent, logs) = spawn_loop(cmd);
    let metrics_addr = metrics_address(&logs);
    let root_cert_changed = || {
        let series = format!(
            "meshca_agent_root_cert_changed_timestamp_seconds{{request=\"{}\"}}",
            dir.display()
        );
        metric_sample(&http_get(&metrics_addr, "/metrics"), &series)
    };
    let wait_for_install = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut failures = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = logs.recv_timeout(Duration::from_secs(1)) {
                if line["message"] == "installed a new intermediate" {
                    return failures;
                }
                if let Some(error) = line["error"].as_str() {
                    failures.push(error.to_string());
                }
            }
        }
        panic!("{what}: no install; failures: {failures:#?}");
    };
    wait_for_install("first pass");
    let first_serial = serial(&dir);
    // The first root-cert.pem is new bytes: istiod must start again to take the files.
    let changed_at = root_cert_changed().expect("root-cert.pem written at the first pass");
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(
        (unix(started)..=unix(SystemTime::now())).contains(&changed_at),
        "{changed_at}"
    );

    // The cluster's client certificate is renewed on disk (same identity, new key) and the
    // old one revoked at the signer.
    env.transport_pki("client", &["cluster-a-next", &identity("cluster-a")]);
    env.transport_pki("revoke", &["cluster-a"]);
    let pki = env.path("pki");
    for ext in ["key", "pem"] {
        std::fs::rename(
            pki.join(format!("cluster-a-next.{ext}")),
            pki.join(format!("cluster-a.{ext}")),
        )
        .unwrap();
    }
    send_signal(signer.child.id(), "HUP");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(signer.wait_for_log("SIGHUP: TLS settings reloaded"));

    // A damaged bundle makes the next pass sign: it can only with the new certificate.
    let (other_key, _) = csr(meshca::pki::keys::KeyType::EcdsaP256, "acme", "x");
    std::fs::write(
        dir.join("..data").join("ca-key.pem"),
        other_key.to_pkcs8_pem().unwrap().as_bytes(),
    )
    .unwrap();
    let failures = wait_for_install("after the rotation");
    assert_ne!(serial(&dir), first_serial);
    // A new intermediate under the same root: root-cert.pem is the same bytes.
    assert_eq!(root_cert_changed(), Some(changed_at));
    assert_valid(&env, &dir);
    // The revoked certificate was never presented again.
    assert!(
        failures
            .iter()
            .all(|f| !f.to_lowercase().contains("revoked")),
        "{failures:#?}"
    );
    let metrics = runtime.block_on(signer.metrics(&env.client("cluster-a")));
    assert_eq!(
        metric_sample(
            &metrics,
            "meshca_tls_handshakes_refused_total{reason=\"client_certificate_revoked\"}"
        ),
        Some(0),
        "{metrics}"
    );
    let issued = signer.issued_lines();
    assert_eq!(issued.len(), 2, "{issued:?}");
    assert!(issued.iter().all(|l| l["client"] == identity("cluster-a")));
    agent.terminate();
}

/// The roots a cacerts directory trusts, in file order.
fn trusted_roots(dir: &Path) -> Vec<String> {
    meshca::agent::rotation::root_fingerprints(
        &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
    )
}

/// A Kubernetes-mode flag on a directory-mode agent's command line is refused by name
/// (it would do nothing); the same settings from a pod's environment (POD_NAMESPACE,
/// POD_NAME, set whatever the mode) are not.
#[test]
fn kubernetes_mode_flags_are_refused_in_directory_mode_but_not_the_pods_environment() {
    let dir = tempfile::tempdir().unwrap();
    let agent = |extra: &[&str]| {
        run(Command::new(MESHCA)
            .current_dir(dir.path())
            .env("POD_NAMESPACE", "service-mesh-hub")
            .env("POD_NAME", "agent-0")
            .args(["agent", "--once", "--target-dir", "cacerts"])
            .args(["--signer", "https://127.0.0.1:1", "--ca-cert", "ca.pem"])
            .args(["--client-cert", "client.pem", "--client-key", "key.pem"])
            .args(["--virtual-mesh", "test/vm", "--mesh", "test/cluster-a"])
            .args(extra))
    };
    let out = agent(&["--lease-seconds", "60", "--namespace", "smh"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--namespace, --lease-seconds are for Kubernetes mode"),
        "{stderr}"
    );
    // From the environment only: the pass goes on, and fails at the client files.
    let out = agent(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("client.pem") && !stderr.contains("Kubernetes mode"),
        "{stderr}"
    );
}

/// `--retire-root` in a form that names no root (a SHA-1, as `openssl x509 -fingerprint`
/// prints by default, or a typo) would retire nothing and exit 0: it is a usage mistake.
/// Refused before anything is read, so no signer is needed.
#[test]
fn a_retired_root_not_named_by_its_sha256_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let agent = |fingerprint: &str| {
        run(Command::new(MESHCA)
            .current_dir(dir.path())
            .args(["agent", "--once", "--target-dir", "cacerts"])
            .args(["--signer", "https://127.0.0.1:1", "--ca-cert", "ca.pem"])
            .args(["--client-cert", "client.pem", "--client-key", "key.pem"])
            .args(["--virtual-mesh", "test/vm", "--mesh", "test/cluster-a"])
            .args(["--retire-root", fingerprint]))
    };
    let sha1 = "5F:35:E0:C1:D0:E4:B1:A9:C0:FF:EE:00:11:22:33:44:55:66:77:88";
    for (fingerprint, why) in [
        (
            sha1,
            "this looks like a SHA-1 fingerprint: use `openssl x509 -noout -fingerprint -sha256`",
        ),
        ("xyz", "not a SHA-256 fingerprint: expected 64 hex digits"),
    ] {
        let out = agent(fingerprint);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("'{fingerprint}' for '--retire-root <SHA256>'"))
                && stderr.contains(why),
            "{stderr}"
        );
    }
    // openssl's SHA-256 form is taken: the pass goes on, and fails at the client files.
    let sha256 = [sha1, ":01:23:45:67:89:AB:CD:EF:01:23:45:67"].concat();
    let out = agent(&sha256);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("client.pem") && !stderr.contains("--retire-root"),
        "{stderr}"
    );
    assert!(!dir.path().join("cacerts").exists());
}

#[test]
fn a_root_change_announced_first_keeps_two_clusters_talking_while_they_move() {
    for backend in Backend::both() {
        root_change_in_two_phases(Env::with(EnvSpec {
            backend,
            ..EnvSpec::default()
        }));
    }
}

fn root_change_in_two_phases(env: Env) {
    let work = env.dir.path();
    let old_root = openssl_fingerprint(work, &env.path("root-cert.pem"));
    let new_root = openssl_fingerprint(work, &env.init_next_root());
    let (a, b) = (env.path("clusters/a"), env.path("clusters/b"));
    let mut signer = env.start_signer();
    let addr = signer.addr.to_string();
    for (cluster, dir) in [("cluster-a", &a), ("cluster-b", &b)] {
        pass_ok(&env, &addr, cluster, dir, &[]);
        assert_eq!(trusted_roots(dir), vec![old_root.clone()]);
    }

    // Announced: each cluster trusts the next root too, with the same intermediate.
    env.announce_next_root(Some("next-root-cert.pem"));
    send_signal(signer.child.id(), "HUP");
    let reload = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(signer.wait_for_log("SIGHUP: rules"));
    assert!(
        reload.contains(&format!("next root sha256 {new_root} announced")),
        "{reload}"
    );
    // The root key vouches for the next root: a cross certificate under the root in
    // force, with the next root's name and key, as openssl sees it; audited.
    let (cross_serial, cross_sha256) = cross_cert_under(
        &env,
        &signer,
        "nextRootCrossCert",
        &env.path("root-cert.pem"),
        &env.path("next-root-cert.pem"),
    );
    let audited = signer
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "reload")
        .unwrap();
    assert!(
        audited["message"].as_str().is_some_and(|m| m.contains(&format!(
            "next root sha256 {new_root} announced (cross certificate serial {cross_serial} sha256 {cross_sha256})"
        ))),
        "{audited}"
    );
    // `serve --check` and `root show` name it, as the audit log last recorded it.
    let vouched = format!("cross certificate serial {cross_serial} sha256 {cross_sha256}");
    for args in [&["serve", "--check"][..], &["root", "show"]] {
        let out = text(&env.run_with_config_ok(args).stdout);
        assert!(out.contains(&vouched), "{args:?}: {out}");
    }
    for (cluster, dir) in [("cluster-a", &a), ("cluster-b", &b)] {
        let serial_before = serial(dir);
        let out = pass_ok(&env, &addr, cluster, dir, &[]);
        assert!(out.contains("rewrote root-cert.pem"), "{out}");
        assert!(
            out.contains(&format!("trusts       {old_root}, {new_root}")),
            "{out}"
        );
        // istiod takes a changed root-cert.pem only when it starts: the pass says so.
        assert!(
            out.contains("then         restart istiod: root-cert.pem changed"),
            "{out}"
        );
        assert_eq!(serial(dir), serial_before);
        assert_eq!(trusted_roots(dir), vec![old_root.clone(), new_root.clone()]);
        assert_valid(&env, dir);
    }

    // The switch, the old root announced as the previous one: cluster a moves to the new
    // root; b has not yet.
    assert!(signer.terminate());
    env.switch_to_next_root();
    env.announce_previous_root(Some("root-cert.pem"));
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    // The new root's key vouches for the old one, now announced as the previous root.
    cross_cert_under(
        &env,
        &signer,
        "previousRootCrossCert",
        &env.path("next-root-cert.pem"),
        &env.path("root-cert.pem"),
    );
    let out = pass_ok(&env, &addr, "cluster-a", &a, &[]);
    assert!(out.contains(&format!("root sha256  {new_root}")), "{out}");
    assert_eq!(trusted_roots(&a), vec![new_root.clone(), old_root.clone()]);
    assert_eq!(trusted_roots(&b), vec![old_root.clone(), new_root.clone()]);
    let moved = Workload::issue(work, &a, "moved");
    let not_moved = Workload::issue(work, &b, "not-moved");
    mtls_handshake(work, &not_moved, &moved).assert_ok();
    mtls_handshake(work, &moved, &not_moved).assert_ok();
    // What the announcement prevents: a cluster that trusted only the old root (b's
    // intermediate, root-cert.pem as before the announcement) refuses the moved cluster.
    let unprepared = env.path("clusters/unprepared");
    std::fs::create_dir_all(&unprepared).unwrap();
    for file in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        std::fs::copy(b.join(file), unprepared.join(file)).unwrap();
    }
    std::fs::copy(env.path("root-cert.pem"), unprepared.join("root-cert.pem")).unwrap();
    let cut_off = Workload::issue(work, &unprepared, "unprepared");
    let refused = mtls_handshake(work, &cut_off, &moved);
    assert!(
        !refused.ok() && refused.server.contains("certificate verify failed"),
        "{refused:#?}"
    );

    // A cluster installed now (a fresh directory) chains to the new root and trusts the
    // previous one too, so it talks with b, which has not moved.
    let joined = env.path("clusters/joined");
    pass_ok(&env, &addr, "cluster-a", &joined, &[]);
    assert_eq!(
        trusted_roots(&joined),
        vec![new_root.clone(), old_root.clone()]
    );
    let newcomer = Workload::issue(work, &joined, "newcomer");
    mtls_handshake(work, &not_moved, &newcomer).assert_ok();
    mtls_handshake(work, &newcomer, &not_moved).assert_ok();

    // b moves too; once the old root is retired, each trusts the new root alone, though
    // the signer still announces it.
    let out = pass_ok(&env, &addr, "cluster-b", &b, &[]);
    assert!(out.contains(&format!("root sha256  {new_root}")), "{out}");
    for (cluster, dir) in [("cluster-a", &a), ("cluster-b", &b), ("cluster-a", &joined)] {
        let out = pass_ok(&env, &addr, cluster, dir, &["--retire-root", &old_root]);
        assert!(out.contains("rewrote root-cert.pem"), "{out}");
        assert_eq!(trusted_roots(dir), vec![new_root.clone()]);
        let out = pass_ok(&env, &addr, cluster, dir, &["--retire-root", &old_root]);
        assert!(
            !out.contains("rewrote") && !out.contains("restart istiod"),
            "{out}"
        );
    }
    let a_after = Workload::issue(work, &a, "a-after");
    let b_after = Workload::issue(work, &b, "b-after");
    mtls_handshake(work, &b_after, &a_after).assert_ok();
}

/// A next root of another key type than the root in force (RSA under ECDSA P-384) is
/// vouched for as well, by the token and by Vault (asked to sign with the root key's
/// algorithm), and taken by an agent.
#[test]
fn a_next_root_of_another_key_type_is_vouched_for_and_taken() {
    for backend in Backend::both() {
        let env = Env::with(EnvSpec {
            backend,
            ..EnvSpec::default()
        });
        let work = env.dir.path();
        let root = openssl_fingerprint(work, &env.path("root-cert.pem"));
        let next_root = openssl_fingerprint(work, &env.init_next_root_of("rsa3072"));
        env.announce_next_root(Some("next-root-cert.pem"));
        let signer = env.start_signer();
        cross_cert_under(
            &env,
            &signer,
            "nextRootCrossCert",
            &env.path("root-cert.pem"),
            &env.path("next-root-cert.pem"),
        );
        let dir = env.path("cacerts");
        let out = pass_ok(&env, &signer.addr.to_string(), "cluster-a", &dir, &[]);
        assert!(
            out.contains(&format!("trusts       {root}, {next_root}")),
            "{out}"
        );
    }
}

/// The cross certificate `field` of the signer's public policy: `openssl verify
/// -partial_chain` passes it under `current` (the root in force), and its subject and
/// public key are `announced`'s. Its serial and SHA-256, as the audit log names them.
fn cross_cert_under(
    env: &Env,
    signer: &Signer,
    field: &str,
    current: &Path,
    announced: &Path,
) -> (String, String) {
    let policy = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(signer.get_text(&env.client("cluster-a"), "/v1/virtualmeshes/test/vm"));
    let policy: Value = serde_json::from_str(&policy).unwrap();
    let cross = policy[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field}: {policy}"));
    let work = env.dir.path();
    let path = work.join(format!("{field}.pem"));
    std::fs::write(&path, cross).unwrap();
    let verified = run(Command::new("openssl")
        .args(["verify", "-partial_chain", "-CAfile"])
        .arg(current)
        .arg(&path));
    assert!(
        verified.status.success() && text(&verified.stdout).contains(": OK"),
        "{}{}",
        text(&verified.stdout),
        text(&verified.stderr)
    );
    for what in ["-pubkey", "-subject"] {
        let of = |file: &Path| {
            openssl(
                work,
                &["x509", "-in", file.to_str().unwrap(), "-noout", what],
            )
        };
        assert_eq!(of(&path), of(announced), "{what}");
    }
    // Not the announced root itself: issued by the root in force.
    let issuer = openssl(
        work,
        &["x509", "-in", path.to_str().unwrap(), "-noout", "-issuer"],
    );
    let current_subject = openssl(
        work,
        &[
            "x509",
            "-in",
            current.to_str().unwrap(),
            "-noout",
            "-subject",
        ],
    );
    assert_eq!(
        issuer.trim_start_matches("issuer="),
        current_subject.trim_start_matches("subject=")
    );
    let serial = openssl(
        work,
        &["x509", "-in", path.to_str().unwrap(), "-noout", "-serial"],
    );
    let serial = serial
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase();
    (serial, openssl_fingerprint(work, &path))
}

/// Without a pin, whoever holds a TLS certificate the agents trust for the signer's name
/// (here: the signer's own, stolen) can run a real signer under a root of its own. An
/// agent installed from the real signer takes neither the root that signer announces
/// (its own key vouches for it, not one the cluster trusts) nor an intermediate under its
/// root: the pass fails by name, nothing is signed, nothing written.
#[test]
fn a_signer_under_another_root_has_the_cluster_trust_none_of_its_roots() {
    let env = Env::new();
    let work = env.dir.path();
    let signer = env.start_signer();
    let dir = env.path("cacerts");
    pass_ok(&env, &signer.addr.to_string(), "cluster-a", &dir, &[]);
    let root = openssl_fingerprint(work, &env.path("root-cert.pem"));
    let before = snapshot(&dir);
    let bytes_before: Vec<Vec<u8>> = NAMES
        .iter()
        .map(|name| std::fs::read(dir.join(name)).unwrap())
        .collect();

    let impostor = env.impostor();
    let its_root = openssl_fingerprint(impostor.dir.path(), &impostor.path("root-cert.pem"));
    let planted = openssl_fingerprint(impostor.dir.path(), &impostor.init_next_root());
    impostor.announce_next_root(Some("next-root-cert.pem"));
    let fake = impostor.start_signer();
    let addr = fake.addr.to_string();
    assert_ne!(its_root, root);

    let refused = format!(
        "the signer's root sha256 {its_root} is not in root-cert.pem and was never announced cross-signed by a root this cluster trusts: nothing was asked of the signer; if this root change is yours, announce it first"
    );
    let out = once(&env, &addr, &dir, &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&refused), "{stderr}");
    // (a) its next root, vouched for by its own key only: a WARN saying why.
    let warning = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["sha256"] == planted.as_str())
        .unwrap_or_else(|| panic!("no warning naming {planted}: {stderr}"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    let message = warning["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("not cross-signed by a root this cluster trusts")
            && message.contains("not added to root-cert.pem")
            && message.contains(&format!(
                "own root sha256 {its_root} is not one this cluster trusts"
            )),
        "{warning}"
    );
    // `meshca request` into the same directory is refused alike.
    let request = run(env
        .meshca()
        .arg("request")
        .args(env.signer_flags(&addr, "cluster-a"))
        .args(["--virtual-mesh", "test/vm", "--mesh", "test/cluster-a"])
        .arg("--out-dir")
        .arg(&dir));
    let stderr = text(&request.stderr);
    assert!(!request.status.success(), "{stderr}");
    assert!(stderr.contains(&refused), "{stderr}");
    // (b) nothing signed by the impostor, nothing written here.
    let issued = fake.issued_lines();
    assert!(issued.is_empty(), "{issued:?}");
    assert_eq!(snapshot(&dir), before);
    let bytes_after: Vec<Vec<u8>> = NAMES
        .iter()
        .map(|name| std::fs::read(dir.join(name)).unwrap())
        .collect();
    assert!(bytes_after == bytes_before);
    assert_eq!(trusted_roots(&dir), vec![root.clone()]);

    // The real signer is still followed.
    let out = pass_ok(&env, &signer.addr.to_string(), "cluster-a", &dir, &[]);
    assert!(out.contains(&format!("root sha256  {root}")), "{out}");
}

/// `--accept-root` pins the roots the agent takes from its signer: a signer (or whoever
/// holds a certificate the agent's CA bundle trusts) whose root is not listed is asked
/// for nothing, and a root it announces that is not listed never reaches root-cert.pem.
#[test]
fn an_agent_pinned_to_its_roots_takes_no_other_root_from_the_signer() {
    let env = Env::new();
    let work = env.dir.path();
    let root = openssl_fingerprint(work, &env.path("root-cert.pem"));
    let next_root = openssl_fingerprint(work, &env.init_next_root());
    let other = "ab".repeat(32);
    let signer = env.start_signer();
    let addr = signer.addr.to_string();
    let dir = env.path("cacerts");

    // Pinned to another root: the first install is refused by name, before any signing.
    let refused = format!(
        "the signer's root sha256 {root} is not among the roots this agent accepts (--accept-root): nothing was asked of the signer; if this root change is yours, add it to --accept-root"
    );
    let request = run(env
        .meshca()
        .arg("request")
        .args(env.signer_flags(&addr, "cluster-a"))
        .args(["--virtual-mesh", "test/vm", "--mesh", "test/cluster-a"])
        .args(["--accept-root", &other])
        .arg("--out-dir")
        .arg(&dir));
    for out in [once(&env, &addr, &dir, &["--accept-root", &other]), request] {
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(&refused), "{stderr}");
    }
    assert!(!dir.join("root-cert.pem").exists());
    assert!(
        signer.audit_lines().is_empty(),
        "{:?}",
        signer.audit_lines()
    );

    // Pinned to the signer's root: installed.
    pass_ok(&env, &addr, "cluster-a", &dir, &["--accept-root", &root]);
    assert_eq!(trusted_roots(&dir), vec![root.clone()]);
    let before = std::fs::read(dir.join("root-cert.pem")).unwrap();

    // A next root announced but not listed: left out, with a warning saying how to take it.
    env.announce_next_root(Some("next-root-cert.pem"));
    send_signal(signer.child.id(), "HUP");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(signer.wait_for_log("SIGHUP: rules"));
    let out = once(&env, &addr, &dir, &["--accept-root", &root]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["sha256"] == next_root.as_str())
        .unwrap_or_else(|| panic!("no warning naming {next_root}: {stderr}"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    let message = warning["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("not added to root-cert.pem")
            && message.contains("add its fingerprint to --accept-root")
            && warning["subject"]
                .as_str()
                .is_some_and(|s| s.contains("CN=")),
        "{warning}"
    );
    assert_eq!(std::fs::read(dir.join("root-cert.pem")).unwrap(), before);

    // Listed: trusted beside the current root.
    let out = pass_ok(
        &env,
        &addr,
        "cluster-a",
        &dir,
        &["--accept-root", &root, "--accept-root", &next_root],
    );
    assert!(out.contains("rewrote root-cert.pem"), "{out}");
    assert_eq!(trusted_roots(&dir), vec![root, next_root]);
    let issued = signer.issued_lines().len();
    assert_eq!(issued, 1);
}
