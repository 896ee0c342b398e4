//! Logs: with `--log-format json` a panic is one more JSON line (message, place, thread),
//! not raw text on stderr among the JSON. Its own test binary: it sets the global
//! subscriber and panic hook.

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
