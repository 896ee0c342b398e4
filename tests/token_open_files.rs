//! A token that fails because this process has used up its open files says so: SoftHSM,
//! unable to open its object files, finds no key (so the error reads as a key deleted) or
//! answers CKR_GENERAL_ERROR, as its C_Initialize at the reconnect does, which reads like
//! a broken or empty token. Its own test binary: it lowers this process's open-file limit
//! and uses up every descriptor.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use meshca::backend::pkcs11::Pkcs11Backend;
use meshca::backend::{BackendError, RootSigner};
use meshca::config::SignerConfig;
use meshca::pki::profile::RootCa;

/// Asks until the token is ready again: a reconnect is tried at most once a second.
fn ready_again(runtime: &tokio::runtime::Runtime, backend: &Pkcs11Backend) {
    let mut last = None;
    for _ in 0..100 {
        match runtime.block_on(backend.readiness()) {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the token never came back: {last:?}");
}

/// This process's log lines, kept to be read back.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn unavailable(outcome: Result<(), BackendError>) -> String {
    match outcome {
        Err(BackendError::Unavailable(message)) => message,
        other => panic!("expected the token unavailable, got {other:?}"),
    }
}

#[test]
fn a_token_failing_for_want_of_open_files_is_reported_with_them() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let env = Env::new();
    // SAFETY: this binary's only test, before it starts any thread of its own.
    unsafe { std::env::set_var("SOFTHSM2_CONF", env.path("softhsm/softhsm2.conf")) };
    let config = SignerConfig::load(&env.config).unwrap();
    let settings = config.pkcs11.clone().unwrap();
    let pin = settings.pin.read().unwrap();
    let root = RootCa::from_pem(&env.root_pem()).unwrap();
    let backend = Pkcs11Backend::start(&settings, pin, root).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(backend.readiness()).unwrap();

    // A token gone for another reason is not blamed on the open files.
    let tokens = env.path("softhsm/tokens");
    let away = env.path("softhsm/tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    let gone = unavailable(runtime.block_on(backend.readiness()));
    assert!(!gone.contains("RLIMIT_NOFILE"), "{gone}");
    std::fs::rename(&away, &tokens).unwrap();
    ready_again(&runtime, &backend);

    // Past the shortest interval between two reconnects, so the failure below tries one.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Every descriptor the (lowered) limit allows is taken.
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, 256.min(soft), hard).unwrap();
    let mut held = Vec::new();
    let exhausted = loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => held.push(file),
            Err(e) => break e,
        }
    };
    assert_eq!(exhausted.raw_os_error(), Some(libc::EMFILE), "{exhausted}");
    let failed = unavailable(runtime.block_on(backend.readiness()));
    drop(held);
    // SoftHSM, unable to open its object files, finds no key, and fails to initialize at
    // the reconnect: the open files come first, as the likelier cause.
    assert!(
        failed.starts_with(
            "this process cannot open another file: its 256 open files (RLIMIT_NOFILE) are in use"
        ) && failed.contains("raise the limit, systemd LimitNOFILE")
            && failed.contains("fails as the token did here: "),
        "{failed}"
    );

    // The reconnect that failed (SoftHSM's C_Initialize) is logged with them.
    let lines = log.text();
    assert!(
        lines.lines().any(|line| line
            .contains("PKCS#11 token still unavailable, perhaps for want of open files")
            && line.contains("RLIMIT_NOFILE")),
        "{lines}"
    );

    // With descriptors free again the token is back, and its errors say nothing of them.
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();
    ready_again(&runtime, &backend);
    std::fs::rename(&tokens, &away).unwrap();
    let gone = unavailable(runtime.block_on(backend.readiness()));
    assert!(!gone.contains("RLIMIT_NOFILE"), "{gone}");
}
