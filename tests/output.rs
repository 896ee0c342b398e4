//! `--output json`: one JSON object on stdout for the commands a script reads (root show,
//! verify, serve --check, request, agent --once --target-dir), its fields checked against
//! what openssl says of the same files; errors as `{"error", "exit_status"}`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

/// The one JSON object a command printed on stdout (nothing else there).
fn json_of(out: &Output) -> Value {
    let stdout = text(&out.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}):\n{stdout}\nstderr:\n{}",
            text(&out.stderr)
        )
    })
}

/// `openssl x509 -noout <args> -in cert`: the text after `=` of its one line.
fn openssl_x509(cert: &Path, args: &[&str]) -> String {
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout"])
            .args(args)
            .arg("-in")
            .arg(cert),
    );
    let line = text(&out.stdout);
    line.trim()
        .split_once('=')
        .map_or(line.trim(), |(_, value)| value)
        .to_string()
}

/// The SHA-256 fingerprint openssl computes, as meshca writes it (lowercase, no colons).
fn openssl_sha256(cert: &Path) -> String {
    openssl_x509(cert, &["-fingerprint", "-sha256"])
        .replace(':', "")
        .to_ascii_lowercase()
}

/// An RFC 3339 time in Unix seconds, as date(1) reads it.
fn unix(rfc3339: &Value) -> i64 {
    let text_time = rfc3339
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {rfc3339}"));
    let out = run_ok(Command::new("date").args(["-u", "-d", text_time, "+%s"]));
    text(&out.stdout).trim().parse().unwrap()
}

/// Splits a PEM file's certificates into files of their own (for openssl x509).
fn split_pem(dir: &Path, pem_file: &Path) -> Vec<std::path::PathBuf> {
    let pem = std::fs::read_to_string(pem_file).unwrap();
    let end = "-----END CERTIFICATE-----";
    pem.split_inclusive(end)
        .filter(|block| block.contains("BEGIN CERTIFICATE"))
        .enumerate()
        .map(|(i, block)| {
            write(
                dir,
                &format!("split-{i}.pem"),
                &format!("{}\n", block.trim()),
            )
        })
        .collect()
}

#[test]
fn root_show_json_is_what_openssl_says_of_the_root() {
    for backend in Backend::both() {
        root_show_json_for(backend);
    }
}

fn root_show_json_for(backend: Backend) {
    let name = backend.name();
    let env = Env::with(EnvSpec {
        backend,
        ..EnvSpec::default()
    });
    let out = env.run_with_config(&["root", "show", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let show = json_of(&out);
    let cert = env.path("root-cert.pem");
    let root = &show["root"];
    assert_eq!(show["backend"], name, "{show}");
    assert_eq!(root["sha256"], openssl_sha256(&cert), "{show}");
    let ski = openssl_x509(&cert, &["-ext", "subjectKeyIdentifier"]);
    // "X509v3 Subject Key Identifier: \n    AB:CD:..."
    let ski = ski.lines().last().unwrap().trim().replace(':', "");
    assert_eq!(root["ski"], ski.to_ascii_lowercase(), "{show}");
    assert_eq!(
        unix(&root["not_after"]),
        certificate_date_unix(&cert, "enddate")
    );
    assert_eq!(
        unix(&root["not_before"]),
        certificate_date_unix(&cert, "startdate")
    );
    let subject = openssl_x509(&cert, &["-subject", "-nameopt", "RFC2253"]);
    assert_eq!(root["subject"], subject, "{show}");
    // "ECDSA P-384": the curve openssl names.
    let curve = root["key_type"]
        .as_str()
        .unwrap()
        .trim_start_matches("ECDSA ");
    let described = openssl(
        env.dir.path(),
        &["x509", "-noout", "-text", "-in", "root-cert.pem"],
    );
    assert!(
        described.contains(&format!("NIST CURVE: {curve}")),
        "{show}"
    );
    assert_eq!(show["key_check"]["ok"], true, "{show}");
    assert_eq!(
        show["key_check"]["problems"],
        serde_json::json!([]),
        "{show}"
    );
    if name == "vault" {
        assert_eq!(show["vault"]["certificate_matches"], true, "{show}");
        assert_eq!(show["vault"]["issuer_ref"], "meshca-root", "{show}");
        assert!(show["vault"]["issuer_id"].is_string(), "{show}");
        return;
    }
    assert_eq!(show["key"]["cka_extractable"], false, "{show}");
    for signing_only in [
        "cka_decrypt",
        "cka_unwrap",
        "cka_sign_recover",
        "cka_derive",
    ] {
        assert_eq!(show["key"][signing_only], false, "{signing_only}: {show}");
    }
    assert_eq!(show["key"]["is_root_certificate_key"], true, "{show}");
    assert!(show["key"]["uri"].as_str().unwrap().starts_with("pkcs11:"));
    // No PIN anywhere in what it printed.
    assert!(!text(&out.stdout).contains(&env.user_pin()));
}

#[test]
fn an_error_under_output_json_is_a_json_object_on_stdout_too() {
    let env = Env::new();
    let out = run(env.meshca().args([
        "root",
        "show",
        "--output",
        "json",
        "--config",
        "missing.toml",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let error = json_of(&out);
    assert_eq!(error["exit_status"], 1, "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("missing.toml"),
        "{error}"
    );
    // The log line stays on stderr.
    assert!(text(&out.stderr).contains("missing.toml"));

    // A command without a JSON form refuses the flag as a usage mistake.
    let out = run(env.meshca().args(["--output", "json", "crds"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(text(&out.stderr).contains("--output json is for"));
}

#[test]
fn request_and_verify_json_are_what_openssl_says_of_the_files() {
    let env = Env::new();
    let signer = env.start_signer();
    let out = run(env
        .request_command(signer.addr, "cluster-a")
        .args(["--output", "json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let request = json_of(&out);
    let dir = env.path("out");
    let ca_cert = dir.join("ca-cert.pem");
    let intermediate = &request["intermediate"];
    assert_eq!(
        intermediate["sha256"],
        openssl_sha256(&ca_cert),
        "{request}"
    );
    assert_eq!(
        intermediate["serial"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase(),
        openssl_x509(&ca_cert, &["-serial"]).to_ascii_lowercase(),
        "{request}"
    );
    assert_eq!(
        unix(&intermediate["not_after"]),
        certificate_date_unix(&ca_cert, "enddate")
    );
    let root_sha256 = openssl_sha256(&env.path("root-cert.pem"));
    assert_eq!(request["root_sha256"], root_sha256, "{request}");
    assert_eq!(request["trusted_roots"], serde_json::json!([root_sha256]));
    assert_eq!(request["roots_changed"], true, "{request}");
    assert_eq!(request["restart_istiod"], true, "{request}");
    let written: Vec<&str> = request["files_written"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for name in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        let path = dir.join(name);
        assert!(written.contains(&path.to_str().unwrap()), "{request}");
    }
    assert!(!text(&out.stdout).contains("PRIVATE KEY"));

    // verify: every certificate of the chain and of root-cert.pem, as openssl reads them.
    let out = run(env.meshca().args(["verify", "--output", "json"]).arg(&dir));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let verified = json_of(&out);
    assert_eq!(verified["valid"], true, "{verified}");
    assert_eq!(verified["findings"], serde_json::json!([]), "{verified}");
    assert_eq!(verified["anchor_sha256"], root_sha256, "{verified}");
    let chain = split_pem(env.dir.path(), &dir.join("cert-chain.pem"));
    let listed = verified["chain"].as_array().unwrap();
    assert_eq!(listed.len(), chain.len(), "{verified}");
    for (cert, entry) in chain.iter().zip(listed) {
        assert_eq!(entry["sha256"], openssl_sha256(cert), "{verified}");
        assert_eq!(
            unix(&entry["not_after"]),
            certificate_date_unix(cert, "enddate")
        );
    }
    assert_eq!(verified["roots"][0]["sha256"], root_sha256, "{verified}");
    assert_eq!(verified["files"].as_array().unwrap().len(), 4);

    // Another key in ca-key.pem: the finding, its file and severity, and exit 1.
    let other = run_ok(Command::new("openssl").args([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ]));
    std::fs::write(dir.join("ca-key.pem"), &other.stdout).unwrap();
    let out = run(env.meshca().args(["verify", "--output", "json"]).arg(&dir));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let verified = json_of(&out);
    assert_eq!(verified["valid"], false, "{verified}");
    let finding = &verified["findings"][0];
    assert_eq!(finding["severity"], "error", "{verified}");
    assert_eq!(finding["file"], "ca-key.pem", "{verified}");
    assert!(
        finding["message"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{verified}"
    );
    assert!(!text(&out.stdout).contains("PRIVATE KEY"));

    // And the intermediate in place of the root: every problem is named, in order, in JSON
    // and in the text an operator reads.
    std::fs::copy(dir.join("ca-cert.pem"), dir.join("root-cert.pem")).unwrap();
    let out = run(env.meshca().args(["verify", "--output", "json"]).arg(&dir));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let verified = json_of(&out);
    let files: Vec<&str> = verified["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|finding| finding["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        ["ca-key.pem", "root-cert.pem", "root-cert.pem"],
        "{verified}"
    );
    let out = run(env.meshca().arg("verify").arg(&dir));
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out.stderr);
    assert!(
        said.contains(
            "is not a valid Istio cacerts bundle: 3 problems: (1) ca-key.pem does not match"
        ) && said.contains("; (2) root-cert.pem: certificate 1 is not self-issued")
            && said.contains("; (3) the chain does not end at a root in root-cert.pem"),
        "{said}"
    );
}

#[test]
fn serve_check_json_names_each_setting() {
    let env = Env::new();
    let out = env.run_with_config(&["serve", "--check", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let check = json_of(&out);
    assert_eq!(check["valid"], true, "{check}");
    assert_eq!(check["listen"], "127.0.0.1:0", "{check}");
    assert!(check["ops_listen"].is_null(), "{check}");
    let digest = check["rules_sha256"].as_str().unwrap();
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{check}"
    );
    assert!(!check["rules"].as_str().unwrap().is_empty(), "{check}");
    assert!(
        ["accept", "refuse"].contains(&check["client_crl_overdue"].as_str().unwrap()),
        "{check}"
    );
    assert_eq!(
        unix(&check["server_certificate_not_after"]),
        certificate_date_unix(&env.path("pki/signer.pem"), "enddate")
    );
    assert_eq!(check["virtual_meshes"], serde_json::json!(["test/vm"]));
    // The text form names the same digest.
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    assert!(report.contains(&format!("sha256 {digest}")), "{report}");
}

#[test]
fn agent_once_json_says_what_the_pass_did() {
    let env = Env::new();
    let mut signer = env.start_signer();
    let target = env.path("cacerts");
    let once = |addr: &str| {
        let mut cmd = env.meshca();
        cmd.args(["--output", "json", "agent", "--once", "--target-dir"])
            .arg(&target)
            .args(env.signer_flags(addr, "cluster-a"))
            .args(["--virtual-mesh", "test/vm", "--mesh", "test/cluster-a"])
            .args(["--ttl-seconds", "1800"]);
        run(&mut cmd)
    };
    let addr = signer.addr.to_string();
    let out = once(&addr);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pass = json_of(&out);
    assert_eq!(pass["result"], "installed", "{pass}");
    let ca_cert = target.join("ca-cert.pem");
    assert_eq!(pass["intermediate"]["sha256"], openssl_sha256(&ca_cert));
    assert_eq!(
        unix(&pass["intermediate"]["not_after"]),
        certificate_date_unix(&ca_cert, "enddate")
    );
    assert!(unix(&pass["renew_at"]) < unix(&pass["intermediate"]["not_after"]));
    assert_eq!(pass["signer_error"], Value::Null, "{pass}");

    let out = once(&addr);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pass = json_of(&out);
    assert_eq!(pass["result"], "nothing_due", "{pass}");
    assert_eq!(pass["roots_changed"], false, "{pass}");
    assert_eq!(pass["restart_istiod"], false, "{pass}");

    // The signer gone: nothing due, but it is named, and the exit status is 75.
    signer.terminate();
    let out = once(&addr);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    let pass = json_of(&out);
    assert_eq!(pass["result"], "signer_unavailable", "{pass}");
    assert!(pass["signer_error"].is_string(), "{pass}");
}

/// `audit verify --output json`: a log split in two files verifies as one chain, the
/// expected line found, an empty file after it passing (a rotation's new one); a file that
/// does not continue the chain's start, an empty file first and a hash no line has each
/// fail with `intact: false`, the error and exit status 1.
#[test]
fn audit_verify_json_says_what_verified_and_where_it_broke() {
    let env = Env::new();
    let mut signer = env.start_signer();
    assert!(signer.terminate());
    let log = std::fs::read_to_string(env.path("audit.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    write(env.dir.path(), "part1.log", &format!("{}\n", lines[0]));
    write(
        env.dir.path(),
        "part2.log",
        &format!("{}\n", lines[1..].join("\n")),
    );
    write(env.dir.path(), "empty.log", "");
    let verify = |args: &[&str]| {
        let out = run(env
            .meshca()
            .args(["audit", "verify", "--output", "json"])
            .args(args));
        (out.status.code(), json_of(&out))
    };

    let (status, first) = verify(&["part1.log"]);
    assert_eq!(status, Some(0), "{first}");
    let line_one = first["last_hash"].as_str().unwrap().to_string();
    let (status, both) = verify(&["part1.log", "part2.log", "--expect-hash", &line_one]);
    assert_eq!(status, Some(0), "{both}");
    assert_eq!(both["intact"], true, "{both}");
    assert_eq!(both["records"], lines.len(), "{both}");
    assert_eq!(both["files"][0]["file"], "part1.log", "{both}");
    assert_eq!(both["files"][0]["records"], 1, "{both}");
    assert_eq!(
        both["files"][0]["expected_lines"][0]["hash"],
        line_one.as_str()
    );
    assert_eq!(both["files"][0]["expected_lines"][0]["line"], 1, "{both}");
    assert_eq!(both["files"][1]["records"], lines.len() - 1, "{both}");
    assert_eq!(both["last_hash"], both["files"][1]["last_hash"], "{both}");
    assert!(both.get("error").is_none(), "{both}");

    for (args, file, says) in [
        (
            &["part2.log"][..],
            "part2.log",
            "the chain does not start here",
        ),
        (
            &["empty.log", "part1.log"][..],
            "empty.log",
            "the file is empty",
        ),
        // After a break the files are not read on: whether they hold the hash is unknown.
        (
            &["empty.log", "part1.log", "--expect-hash", &line_one][..],
            "empty.log",
            "the file is empty",
        ),
    ] {
        let (status, broken) = verify(args);
        assert_eq!(status, Some(1), "{broken}");
        assert_eq!(broken["intact"], false, "{broken}");
        assert_eq!(broken["exit_status"], 1, "{broken}");
        assert_eq!(broken["broken"]["file"], file, "{broken}");
        assert_eq!(broken["broken"]["line"], 1, "{broken}");
        assert!(
            broken["broken"]["problem"].as_str().unwrap().contains(says)
                && broken["error"].as_str().unwrap().contains(says),
            "{broken}"
        );
        assert!(broken["missing_expected_hashes"].is_null(), "{broken}");
    }
    // After the file it follows, an empty file is a rotation's new one with no line yet.
    let (status, rotated) = verify(&["part1.log", "empty.log"]);
    assert_eq!(status, Some(0), "{rotated}");
    assert_eq!(rotated["files"][1]["records"], 0, "{rotated}");
    assert_eq!(rotated["last_hash"], line_one.as_str(), "{rotated}");
    let absent = "ab".repeat(32);
    let (status, missing) = verify(&["part1.log", "--expect-hash", &absent]);
    assert_eq!(status, Some(1), "{missing}");
    assert_eq!(missing["intact"], false, "{missing}");
    assert_eq!(missing["missing_expected_hashes"][0], absent.as_str());
    assert!(missing["broken"].is_null(), "{missing}");

    // In text, an empty file fails the same way (exit 1, the reason on stderr).
    let out = run(env.meshca().args(["audit", "verify", "empty.log"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("the file is empty"),
        "{}",
        text(&out.stderr)
    );
}
