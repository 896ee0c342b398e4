//! Logs: with `--log-format json` a panic is one more JSON line (message, place, thread),
//! and so is the error a command ends with, not raw text on stderr among the JSON. Its
//! own test binary: it sets the global subscriber and panic hook.

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
