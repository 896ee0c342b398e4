//! Logs: with `--log-format json` a panic is one more JSON line (message, place, thread),
//! and so is the error a command ends with, not raw text on stderr among the JSON. Its
//! own test binary: it sets the global subscriber and panic hook.

mod common;

use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_panic_is_logged_as_a_json_line_naming_its_thread_and_place() {
    let captured = Captured::default();
    let writer = captured.clone();
    meshca::logging::init(true, "info", move || writer.clone(), false);
    tracing::info!("before");
    let joined = std::thread::Builder::new()
        .name("meshca-token".into())
        .spawn(|| panic!("a token job went wrong"))
        .unwrap()
        .join();
    assert!(joined.is_err());

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let panic = &lines[1];
    assert_eq!(panic["level"], "ERROR", "{panic}");
    assert_eq!(panic["message"], "panicked", "{panic}");
    assert_eq!(panic["panic"], "a token job went wrong", "{panic}");
    assert_eq!(panic["thread"], "meshca-token", "{panic}");
    assert!(
        panic["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("tests/logging.rs:")),
        "{panic}"
    );
}

#[test]
fn the_error_a_command_ends_with_is_a_json_line_under_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("signer.toml");
    let run = |format: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(["--log-format", format, "serve", "--config"])
            .arg(&missing)
            .output()
            .unwrap()
    };
    let json = run("json");
    assert_eq!(json.status.code(), Some(1));
    let stderr = String::from_utf8(json.stderr).unwrap();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let last = lines.last().unwrap_or_else(|| panic!("no line: {stderr}"));
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["exit_status"], 1, "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.starts_with("meshca: error: ") && message.contains(&*missing.to_string_lossy()),
        "{message}"
    );

    let text = run("text");
    assert_eq!(text.status.code(), Some(1));
    let stderr = String::from_utf8(text.stderr).unwrap();
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("meshca: error: ")),
        "{stderr}"
    );
}

/// A usage mistake, whether clap finds it while parsing or meshca right after, is one JSON
/// line under `--log-format json` (placed before or after the subcommand), exit 2; help
/// still prints as text to stdout.
#[test]
fn a_usage_mistake_is_a_json_line_under_log_format_json() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(args)
            .output()
            .unwrap()
    };
    for (args, expected) in [
        (
            &["--log-format", "json", "serve", "--bogus"][..],
            "meshca: error: unexpected argument '--bogus' found",
        ),
        (
            &["serve", "--log-format=json", "--config"][..],
            "meshca: error: a value is required for '--config <CONFIG>'",
        ),
        (
            // Found by meshca after parsing: the two flags together.
            &[
                "agent",
                "--log-format",
                "json",
                "--signer",
                "https://127.0.0.1:1",
                "--ca-cert",
                "ca.pem",
                "--client-cert",
                "client.pem",
                "--client-key",
                "client.key",
                "--virtual-mesh",
                "ns/vm",
                "--mesh",
                "ns/mesh",
                "--target-dir",
                "cacerts",
                "--renew-fraction",
                "0.3",
                "--jitter-fraction",
                "0.4",
            ][..],
            "meshca: error: --jitter-fraction must be between 0 and 0.5 and below --renew-fraction",
        ),
        (
            // A command group alone: what is missing, not the group's description.
            &["--log-format", "json", "root"][..],
            "meshca: error: meshca root needs a subcommand: init, show",
        ),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert_eq!(lines[0]["level"], "ERROR", "{stderr}");
        assert_eq!(lines[0]["exit_status"], 2, "{stderr}");
        let message = lines[0]["message"].as_str().unwrap();
        assert!(message.starts_with(expected), "{args:?}: {message}");
    }
    let help = run(&["--log-format", "json", "serve", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(
        String::from_utf8(help.stdout)
            .unwrap()
            .contains("Usage: meshca serve")
    );
}

/// A JSON value in which no object names a key twice (serde_json keeps the last of two,
/// so a log line's second `message` would hide its first from every log pipeline).
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("key {key:?} twice")));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(self)
    }
}

/// Every JSON line a signer logs through an issuance, a refusal and a stop names each key
/// once: a field called `message` beside the line's own message made two.
#[tokio::test]
async fn no_signer_log_line_names_a_key_twice() {
    use common::*;
    let env = Env::new();
    let mut signer = env.start_signer();
    let client = env.client("cluster-a");
    let (_k, csr) = csr(meshca::pki::keys::KeyType::EcdsaP256, "acme", "a");
    let (status, answer) = post_sign(
        &client,
        &signer,
        &sign_body("test/vm", "test/cluster-a", &csr),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // cluster-a asking for cluster-b's mesh: refused, and logged.
    let (status, answer) = post_sign(
        &client,
        &signer,
        &sign_body("test/vm", "test/cluster-b", &csr),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let refused = signer.wait_for_log("refused signing request").await;
    assert!(signer.terminate(), "{}", signer.logs());
    let logs = signer.logs();
    for line in logs.lines() {
        if let Err(e) = serde_json::from_str::<NoDuplicateKeys>(line) {
            panic!("{e}: {line}");
        }
    }
    // The refusal's text is under a name of its own.
    let refused: Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["message"], "refused signing request", "{refused}");
    assert!(
        refused["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{refused}"
    );
    // And it names the mesh asked for, as the audit line does.
    assert_eq!(refused["virtual_mesh"], "test/vm", "{refused}");
    assert_eq!(refused["mesh"], "test/cluster-b", "{refused}");
}
