//! A PIN changed on the token while the signer runs is sent to it once, not once per token
//! thread: after a reconnect every thread finds the session pool empty at once, and each
//! refused try counts towards locking a real HSM's PIN. OpenSC's pkcs11-spy sits between
//! meshca and SoftHSM and logs every call. Its own test binary: it sets the environment
//! that the spy and SoftHSM read.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use meshca::backend::BackendError;
use meshca::backend::RootSigner;
use meshca::backend::pkcs11::Pkcs11Backend;
use meshca::config::SignerConfig;
use meshca::pki::profile::RootCa;

const SESSIONS: usize = 8;

/// OpenSC's PKCS#11 spy module (package opensc-pkcs11, which `make test` installs).
fn spy_module() -> std::path::PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|dir| std::path::Path::new(dir).join("pkcs11-spy.so"))
    .find(|path| path.exists())
    .expect("pkcs11-spy.so (package opensc-pkcs11) is installed")
}

/// Refused logins in the spy's log; the log itself is never printed (it holds the PINs).
fn refused_logins(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("CKR_PIN_INCORRECT")
        .count()
}

/// `readiness()` on every token thread at once; returns how many said the PIN is refused.
fn burst(runtime: &tokio::runtime::Runtime, backend: &Arc<Pkcs11Backend>) -> usize {
    runtime.block_on(async {
        let mut checks = tokio::task::JoinSet::new();
        for _ in 0..SESSIONS {
            let backend = backend.clone();
            checks.spawn(async move { backend.readiness().await });
        }
        checks
            .join_all()
            .await
            .into_iter()
            .filter(|r| matches!(r, Err(BackendError::PinRejected { locked: false })))
            .count()
    })
}

#[test]
fn a_pin_changed_on_the_token_is_tried_once_after_a_reconnect_not_once_per_thread() {
    let env = Env::with(EnvSpec {
        sessions: SESSIONS,
        ..EnvSpec::default()
    });
    let config = SignerConfig::load(&env.config).unwrap();
    let mut settings = config.pkcs11.clone().unwrap();
    let spy_log = env.path("spy.log");
    // SAFETY: this binary's only test, before it starts any thread of its own.
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", env.path("softhsm/softhsm2.conf"));
        std::env::set_var("PKCS11SPY", softhsm_module());
        std::env::set_var("PKCS11SPY_OUTPUT", &spy_log);
    }
    settings.module = spy_module();
    let pin = settings.pin.read().unwrap();
    let root = RootCa::from_pem(&env.root_pem()).unwrap();
    let backend = Arc::new(Pkcs11Backend::start(&settings, pin, root).unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(burst(&runtime, &backend), 0);
    assert!(
        std::fs::read_to_string(&spy_log)
            .unwrap()
            .contains("C_Login")
    );

    // The security team changes the user PIN on the token (meshca's login stays valid)...
    let new_pin = format!("{:x}", rand_u64());
    let changed = run(Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", env.path("softhsm/softhsm2.conf"))
        .env("OLD_PIN", env.user_pin())
        .env("NEW_PIN", &new_pin)
        .args([
            "--module",
            &softhsm_module(),
            "--token-label",
            "meshca-test",
        ])
        .args([
            "--login",
            "--pin",
            "env:OLD_PIN",
            "--change-pin",
            "--new-pin",
            "env:NEW_PIN",
        ]));
    assert!(changed.status.success(), "pkcs11-tool --change-pin failed");
    assert_eq!(
        burst(&runtime, &backend),
        0,
        "the login in place still signs"
    );

    // ... and then the token goes away for a moment (a network HSM's failover, say).
    let tokens = env.path("softhsm/tokens");
    let away = env.path("softhsm/tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    burst(&runtime, &backend);
    std::fs::rename(&away, &tokens).unwrap();

    // Every thread asks at once until the reconnect (at most one a second) happens.
    let mut refused = 0;
    for _ in 0..100 {
        refused = burst(&runtime, &backend);
        if refused > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(refused, SESSIONS, "every thread reports the PIN refused");
    assert_eq!(
        refused_logins(&spy_log),
        1,
        "refused logins sent to the token"
    );
    // And never again.
    assert_eq!(burst(&runtime, &backend), SESSIONS);
    assert_eq!(
        refused_logins(&spy_log),
        1,
        "refused logins sent to the token"
    );

    // At shutdown, with no call left in the token: every session opened is closed and
    // the module finalized, the last call PKCS#11 expects of an application.
    runtime.block_on(async {
        backend.finish_calls().await;
        backend.close().await;
    });
    let calls = token_calls(&spy_log);
    assert_eq!(
        calls.last().map(|(call, _)| call.as_str()),
        Some("C_Finalize"),
        "{calls:?}"
    );
    let count = |name: &str, ok_only: bool| {
        calls
            .iter()
            .filter(|(call, ok)| call == name && (*ok || !ok_only))
            .count()
    };
    assert!(count("C_OpenSession", true) >= SESSIONS, "{calls:?}");
    assert_eq!(
        count("C_OpenSession", true),
        count("C_CloseSession", false),
        "{calls:?}"
    );
}

/// The PKCS#11 calls in the spy's log, in order, each with whether it returned CKR_OK
/// (a `12: C_Sign` line, later its `Returned:  0 CKR_OK`).
fn token_calls(log: &std::path::Path) -> Vec<(String, bool)> {
    let mut calls: Vec<(String, bool)> = Vec::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Some((number, call)) = line.split_once(": ")
            && number.chars().all(|c| c.is_ascii_digit())
            && call.starts_with("C_")
        {
            calls.push((call.trim().to_string(), false));
        } else if line.starts_with("Returned:")
            && let Some(last) = calls.last_mut()
        {
            last.1 = line.contains("CKR_OK");
        }
    }
    calls
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}
