//! The Vault/OpenBao backend against real OpenBao servers started here: AppRole login and
//! the single re-login on a 403, token renewal before the TTL runs out, Vault hung,
//! stopped, sealed and back (503 then success, the signer never restarted), a Vault answer
//! outside policy (502, audited), root init (generate, refuse, force, adopt), root show,
//! and secrets that never reach logs or output.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::certs::*;
use common::*;
use meshca::pki::keys::KeyType;
use serde_json::Value;

fn vault(spec: VaultSpec) -> EnvSpec {
    EnvSpec {
        backend: Backend::Vault(spec),
        ..EnvSpec::default()
    }
}

/// A prepared environment whose signer logs in with AppRole; its tokens live `token_ttl`
/// (e.g. "1h", "30s").
fn approle_env(token_ttl: &str) -> Env {
    Env::with(vault(VaultSpec {
        auth: VaultAuthSpec::AppRole {
            token_ttl: token_ttl.into(),
        },
        ..VaultSpec::default()
    }))
}

/// An AppRole environment whose tokens live `seconds` and are not renewed past it.
fn approle_env_ending_in(seconds: u64) -> Env {
    let env = approle_env(&format!("{seconds}s"));
    env.bao().cli_ok(&[
        "write",
        "auth/approle/role/meshca",
        &format!("token_max_ttl={seconds}s"),
    ]);
    env
}

async fn sign(env: &Env, signer: &Signer) -> (u16, Value) {
    sign_fresh(&env.client("cluster-a"), signer).await
}

async fn readyz(env: &Env, signer: &Signer) -> (u16, Value) {
    let response = env
        .client("cluster-a")
        .get(signer.url("/readyz"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("")
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Destroys the signer's AppRole secret ID in OpenBao (its next login fails); returns it,
/// for the checks that it is never printed.
fn destroy_secret_id(env: &Env) -> String {
    let secret_id = std::fs::read_to_string(env.path("vault/secret-id")).unwrap();
    env.bao().cli_stdin(
        &[
            "write",
            "auth/approle/role/meshca/secret-id/destroy",
            "secret_id=-",
        ],
        &secret_id,
    );
    secret_id
}

/// `meshca_backend_login_failing` as the signer exports it now.
async fn login_failing(env: &Env, signer: &Signer) -> Option<i64> {
    metric_sample(
        &signer.metrics(&env.client("cluster-a")).await,
        "meshca_backend_login_failing",
    )
}

/// The signer's log does not hold `secret_id`; checked before any message prints the log.
fn assert_secret_id_not_logged(signer: &Signer, secret_id: &str) {
    assert!(
        !signer.logs().contains(secret_id.trim()),
        "the secret ID was logged"
    );
}

/// Polls `done` every 100 ms; panics with `what` after a generous bound.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn approle_login_and_exactly_one_relogin_after_a_403() {
    let env = approle_env("1h");
    let signer = env.start_signer();
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    assert!(signer.logs().contains("\"method\":\"approle\""));
    assert_eq!(count(&signer.logs(), "logged in to Vault"), 1);

    // Every token AppRole handed out is revoked: the next call gets a 403, logs in again
    // once, and succeeds.
    let bao = env.bao();
    bao.cli_ok(&["write", "-f", "sys/leases/revoke-prefix/auth/approle/"]);
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    // Logged before the answer, read from the signer's stderr after it may be.
    signer.wait_for_nth_log("logged in to Vault", 2).await;
    let logs = signer.logs();
    assert_eq!(count(&logs, "logging in again once"), 1, "{logs}");
    assert_eq!(count(&logs, "logged in to Vault"), 2, "{logs}");

    // Revoked again, and the secret ID is gone too: one re-login, which fails, and a
    // clear 503; no retry loop.
    bao.cli_ok(&["write", "-f", "sys/leases/revoke-prefix/auth/approle/"]);
    let secret_id = destroy_secret_id(&env);
    let (status, body) = sign(&env, &signer).await;
    // Before any message prints the answer, which would then hold the secret ID.
    assert!(
        !body.to_string().contains(secret_id.trim()),
        "the secret ID is in the answer"
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable");
    assert!(
        message(&body).contains("Vault login (approle) failed"),
        "{body}"
    );
    signer.wait_for_nth_log("logging in again once", 2).await;
    let logs = signer.logs();
    // Before any message prints the logs, which would then hold the secret ID.
    assert!(!logs.contains(secret_id.trim()), "the secret ID was logged");
    assert_eq!(count(&logs, "logging in again once"), 2, "{logs}");

    let audit = signer.audit_lines();
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[2]["decision"], "error");
    assert_eq!(audit[2]["rule"], "backend_unavailable");
}

/// A role whose tokens lack Vault's `default` policy (`token_no_default_policy`): the
/// readiness checks' question whether the token may sign (`sys/capabilities-self`, which
/// only that policy grants) is answered 403, as is the token's look at itself; that is
/// "cannot tell", not a dead token to replace by a fresh login at every check.
#[tokio::test]
async fn a_token_without_the_default_policy_is_not_replaced_at_each_readiness_check() {
    let env = approle_env("1h");
    env.bao().cli_ok(&[
        "write",
        "auth/approle/role/meshca",
        "token_no_default_policy=true",
    ]);
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    for _ in 0..3 {
        let (ready, body) = readyz(&env, &signer).await;
        assert_eq!(ready, 200, "{body}");
    }
    assert_eq!(sign(&env, &signer).await.0, 200);
    let logs = signer.logs();
    assert_eq!(count(&logs, "logged in to Vault"), 1, "{logs}");
    assert_eq!(live_approle_tokens(&env), 1);
}

/// A Vault that no longer has the AppRole mount (emptied, as a `-dev` server is at each
/// restart, or another Vault at the address) answers the login with a bare 403, as it
/// answers a locked-out role: the refusal names both causes and where to look, at a
/// running signer and at `serve --check --online`.
#[tokio::test]
async fn a_login_to_a_vault_without_the_approle_mount_names_that_cause_too() {
    let env = approle_env("1h");
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    // Disabling the mount revokes its tokens too: the signer's next call logs in again.
    env.bao().cli_ok(&["auth", "disable", "approle"]);
    let (status, body) = sign(&env, &signer).await;
    let check = env.run_with_config(&["serve", "--check", "--online"]);
    assert_eq!(status, 503, "{body}");
    for (what, said) in [
        ("the answer", message(&body).to_string()),
        ("serve --check --online", text(&check.stderr)),
    ] {
        for cause in [
            "the role may be locked out after refused logins",
            "or this Vault has no AppRole auth at auth/approle",
            "a Vault that lost its storage",
            "`bao auth list` shows its mounts",
        ] {
            assert!(
                said.contains(cause),
                "{what} does not say {cause:?}: {said}"
            );
        }
    }
    assert_eq!(check.status.code(), Some(78), "{}", text(&check.stderr));
}

/// A policy that stops allowing the signing (while the token stays valid) gets a clear
/// 503 naming the policy, and no fresh login per refused request: each would use up one
/// use of an AppRole secret ID and leave a token behind.
#[tokio::test]
async fn a_policy_refusal_with_a_live_token_logs_in_no_more() {
    let env = approle_env("1h");
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    let bao = env.bao();
    let without_signing = MESHCA_VAULT_POLICY.replace(
        r#"path "pki/issuer/*" { capabilities = ["read", "update", "patch", "delete"] }"#,
        r#"path "pki/issuer/*" { capabilities = ["read"] }"#,
    );
    assert_ne!(without_signing, MESHCA_VAULT_POLICY);
    bao.write_policy("meshca", &without_signing);
    for _ in 0..3 {
        let (status, body) = sign(&env, &signer).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            message(&body)
                .contains("to a valid token: the policy of meshca's Vault identity must allow it"),
            "{body}"
        );
    }
    bao.write_policy("meshca", MESHCA_VAULT_POLICY);
    assert_eq!(sign(&env, &signer).await.0, 200);
    let logs = signer.logs();
    assert_eq!(count(&logs, "logged in to Vault"), 1, "{logs}");
    assert_eq!(count(&logs, "logging in again once"), 0, "{logs}");
}

/// The issuer the signer signs with is renamed, and a new root made under its name (what
/// a `root init --force` elsewhere does), while the signer runs: the first request that
/// meets it, or the readiness check, makes the signer unready naming it, and signing then
/// refuses without asking Vault (before, readiness stayed true and each request had
/// Vault sign, under the other root, a certificate meshca threw away and Vault kept);
/// with the names put back, it serves again by itself.
#[tokio::test]
async fn an_issuer_replaced_under_a_running_signer_makes_it_unready() {
    let env = Env::with(vault(VaultSpec::default()));
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    let bao = env.bao();
    let issued_by_vault = || {
        // `bao list -format=json` prints the keys alone.
        bao.cli_json(&["list", "pki/certs"])
            .as_array()
            .map(Vec::len)
            .expect("a list of serials")
    };
    bao.cli_ok(&[
        "patch",
        "pki/issuer/meshca-root",
        "issuer_name=meshca-root-was",
    ]);
    bao.cli_ok(&[
        "write",
        "pki/root/generate/internal",
        "common_name=someone else",
        "issuer_name=meshca-root",
        "key_type=ec",
        "key_bits=256",
    ]);
    // Before a readiness check has noticed (one may have run meanwhile: then the
    // refusal at once), Vault signs under the other root by the name meshca's Vault
    // policy grants: refused (502), its serial named, and the issuer looked at again at
    // once, so the request after it is refused without asking Vault.
    let (status, body) = sign(&env, &signer).await;
    match status {
        502 => assert!(
            message(&body).contains("Vault signed serial")
                && message(&body).contains("(Vault keeps it)"),
            "{body}"
        ),
        503 => assert!(
            message(&body).contains("is no longer the root this signer serves"),
            "{body}"
        ),
        _ => panic!("{status} {body}"),
    }
    let before = issued_by_vault();
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        message(&body).contains("is no longer the root this signer serves"),
        "{body}"
    );
    assert_eq!(issued_by_vault(), before, "Vault was asked to sign");
    let (status, body) = readyz(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        message(&body).contains("is no longer the root this signer serves"),
        "{body}"
    );
    // `root show` says so, and fails.
    let out = env.run_with_config(&["root", "show"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("DIFFERENT from the root certificate file!"));
    assert!(text(&out.stderr).contains("a signer with this config will not start"));

    bao.cli_ok(&[
        "patch",
        "pki/issuer/meshca-root",
        "issuer_name=someone-else",
    ]);
    bao.cli_ok(&[
        "patch",
        "pki/issuer/meshca-root-was",
        "issuer_name=meshca-root",
    ]);
    assert_eq!(readyz(&env, &signer).await.0, 200);
    assert_eq!(sign(&env, &signer).await.0, 200);
}

#[tokio::test]
async fn a_token_near_its_max_ttl_signs_on_while_a_fresh_login_fails() {
    // The signer renews at half of each lease, and logs in for a fresh token once a
    // renewal grants under half the first lease: renewed at 15 s (25 s, what is left of
    // 40), then at 27.5 s (12.5 s: under 15), when the fresh login fails; the token ends
    // at 40 s. The test has the 12.5 s between to see the signer sign on.
    const TTL: u64 = 30;
    const MAX_TTL: u64 = 40;
    let env = approle_env(&format!("{TTL}s"));
    env.bao().cli_ok(&[
        "write",
        "auth/approle/role/meshca",
        &format!("token_max_ttl={MAX_TTL}s"),
    ]);
    let signer = env.start_signer();
    let started = Instant::now();
    assert_eq!(sign(&env, &signer).await.0, 200);
    assert_eq!(login_failing(&env, &signer).await, Some(0));
    // That login will fail: the secret ID is gone.
    let secret_id = destroy_secret_id(&env);
    // At most until the token ends: the line must come before.
    let line = signer
        .wait_for_nth_log_within(
            "cannot log in to Vault for a fresh token",
            1,
            Duration::from_secs(MAX_TTL),
        )
        .await;
    // Before any message prints a log line, which would then hold the secret ID.
    assert_secret_id_not_logged(&signer, &secret_id);
    assert!(line.contains("Vault login (approle) failed"), "{line}");
    // The renewed token still signs until it ends (before, every request got 503 from
    // here on, the valid token thrown away); ready, but the metric an alert reads says the
    // credentials are running out.
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(readyz(&env, &signer).await.0, 200);
    assert_eq!(login_failing(&env, &signer).await, Some(1));
    // Once it has ended, a clear 503. The signer logged in before `started`: its token
    // has ended a second after this.
    tokio::time::sleep(Duration::from_secs(MAX_TTL + 1).saturating_sub(started.elapsed())).await;
    let (status, body) = sign(&env, &signer).await;
    assert!(
        !signer.logs().contains(secret_id.trim()) && !body.to_string().contains(secret_id.trim()),
        "the secret ID was logged or answered"
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        message(&body).contains("Vault login (approle) failed"),
        "{body}"
    );
}

/// A token that cannot be renewed (AppRole handing out batch tokens) is replaced by a
/// fresh login at half its TTL; while that login fails, the token in hand signs on until
/// it ends, as a renewable one does (before, every request got 503 from the failed login
/// on, with the token still valid).
#[tokio::test]
async fn a_batch_token_signs_on_while_its_replacement_login_fails() {
    const TTL: u64 = 30;
    let env = approle_env(&format!("{TTL}s"));
    env.bao()
        .cli_ok(&["write", "auth/approle/role/meshca", "token_type=batch"]);
    let signer = env.start_signer();
    let login = signer.wait_for_log("logged in to Vault").await;
    assert!(login.contains("\"renewable\":false"), "{login}");
    assert_eq!(sign(&env, &signer).await.0, 200);
    let secret_id = destroy_secret_id(&env);
    // The replacement login comes at half the TTL; bounded by the token's end.
    let line = signer
        .wait_for_nth_log_within(
            "cannot log in to Vault for a fresh token",
            1,
            Duration::from_secs(TTL),
        )
        .await;
    assert!(line.contains("Vault login (approle) failed"), "{line}");
    // The token in hand (valid for TTL from the login, at half of which the replacement
    // failed) signs on.
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    // Ready (the metric is set by the readiness check), with the credentials failing.
    assert_eq!(readyz(&env, &signer).await.0, 200);
    assert_eq!(login_failing(&env, &signer).await, Some(1));
    assert_secret_id_not_logged(&signer, &secret_id);
}

/// A renewal refused and the login after it failing set `meshca_backend_login_failing`;
/// a later renewal that succeeds clears it (before, it stayed 1 until a fresh login
/// succeeded near the token's max TTL, weeks on, with the credentials never at fault).
#[tokio::test]
async fn a_renewal_that_succeeds_again_clears_login_failing() {
    // Renewed at half of it (40 s), then retried 30 s after the failed login: within the
    // token's lease.
    const TTL: u64 = 80;
    let env = approle_env(&format!("{TTL}s"));
    let bao = env.bao();
    // Only meshca's policy decides, so that renewal can be refused and granted again.
    bao.cli_ok(&[
        "write",
        "auth/approle/role/meshca",
        "token_no_default_policy=true",
    ]);
    let lookup = "path \"auth/token/lookup-self\" { capabilities = [\"read\"] }\n";
    let renew = "path \"auth/token/renew-self\" { capabilities = [\"update\"] }\n";
    let revoke = "path \"auth/token/revoke-self\" { capabilities = [\"update\"] }\n";
    let with_renewal = format!("{MESHCA_VAULT_POLICY}{lookup}{renew}{revoke}");
    bao.write_policy("meshca", &with_renewal);
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    bao.write_policy("meshca", &format!("{MESHCA_VAULT_POLICY}{lookup}{revoke}"));
    let secret_id = destroy_secret_id(&env);
    // At half the TTL: the renewal refused, then the login refused.
    let line = signer
        .wait_for_nth_log_within(
            "cannot log in to Vault for a fresh token",
            1,
            Duration::from_secs(TTL),
        )
        .await;
    assert!(line.contains("Vault login (approle) failed"), "{line}");
    assert!(signer.logs().contains("Vault refused to renew the token"));
    assert_eq!(readyz(&env, &signer).await.0, 200);
    assert_eq!(login_failing(&env, &signer).await, Some(1));
    // Renewal allowed again: the next try (30 s on) renews, and the token no longer
    // depends on a login. Bounded by the token's end (it would answer 503 then).
    bao.write_policy("meshca", &with_renewal);
    let deadline = Instant::now() + Duration::from_secs(TTL);
    loop {
        // Each readiness check sets the metric.
        assert_eq!(readyz(&env, &signer).await.0, 200);
        if login_failing(&env, &signer).await == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "meshca_backend_login_failing still 1 after the renewal came back:\n{}",
            signer.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(sign(&env, &signer).await.0, 200);
    assert_secret_id_not_logged(&signer, &secret_id);
}

/// Once the token has ended and the login keeps failing, the signer tries again every 30
/// s, not for every caller: before, each `/readyz` (open to anyone who reaches the ops
/// port), request and renewal tick renewed the dead token and logged in again, each a
/// warning and an AppRole login at Vault. Each answer now names the wait, and the log
/// stays quiet.
#[tokio::test]
async fn with_no_valid_token_a_failed_login_is_not_retried_per_request() {
    const TTL: u64 = 10;
    let env = approle_env_ending_in(TTL);
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    let secret_id = destroy_secret_id(&env);
    // The token ends TTL after the login; then signing answers 503.
    let deadline = Instant::now() + Duration::from_secs(3 * TTL);
    loop {
        let (status, body) = sign(&env, &signer).await;
        if status == 503 {
            assert!(
                message(&body).contains("Vault login (approle) failed"),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the token did not end: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let warnings_before = count(&signer.logs(), "\"level\":\"WARN\"");
    for _ in 0..30 {
        let (status, body) = readyz(&env, &signer).await;
        assert_eq!(status, 503, "{body}");
        assert!(message(&body).contains("next try in"), "{body}");
    }
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    // At most the one try that may have come due meanwhile (a renewal refused, a login
    // failed).
    let warnings = count(&signer.logs(), "\"level\":\"WARN\"") - warnings_before;
    assert!(warnings <= 2, "{warnings} warnings:\n{}", signer.logs());
    assert_secret_id_not_logged(&signer, &secret_id);
}

/// AppRole credentials Vault refused twice are not sent again until they change: before,
/// once its token had ended the signer sent them every 30 s, locked its own role out in
/// about 2.5 minutes (Vault's default: 5 refusals), and stayed refused for 15 minutes after
/// the operator had written a good secret ID. Here the role locks after 3 refusals; the
/// signer stops at 2, and logs in at its next try once a new secret ID is in the file.
#[tokio::test]
async fn refused_approle_credentials_are_held_back_before_they_lock_the_role_out() {
    const TTL: u64 = 10;
    let env = approle_env_ending_in(TTL);
    let bao = env.bao();
    bao.cli_ok(&[
        "auth",
        "tune",
        "-user-lockout-threshold=3",
        "-user-lockout-duration=15m",
        "approle/",
    ]);
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    let secret_id = destroy_secret_id(&env);
    // The token ends TTL after the login; the tries after it come 30 s apart: two
    // refused, the third held back (on the old code, the third locked the role).
    let held = signer
        .wait_for_nth_log_within(
            "Vault login (approle) not sent",
            1,
            Duration::from_secs(TTL + 4 * 30),
        )
        .await;
    assert!(
        held.contains("refused this role ID and secret ID 2 times in a row"),
        "{held}"
    );
    assert_eq!(locked_logins(&env), 0);
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert!(message(&body).contains("not sent"), "{body}");
    // The operator writes a new secret ID: the next try (30 s at most) sends it, and the
    // role is not locked.
    let fresh =
        bao.cli_json(&["write", "-f", "auth/approle/role/meshca/secret-id"])["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
    openbao::write_secret(&env.path("vault/secret-id"), &fresh);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = sign(&env, &signer).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no login with the new secret ID: {body}\n{}",
            signer.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(locked_logins(&env), 0);
    assert_secret_id_not_logged(&signer, &secret_id);
    assert_secret_id_not_logged(&signer, &fresh);
}

/// How many logins OpenBao has locked out (`sys/locked-users`).
fn locked_logins(env: &Env) -> u64 {
    let locked = env.bao().cli_json(&["read", "sys/locked-users"]);
    locked["data"]["total"]
        .as_u64()
        .unwrap_or_else(|| panic!("sys/locked-users: {locked}"))
}

/// How many tokens AppRole handed out are still live: their leases under
/// `auth/approle/login`.
fn live_approle_tokens(env: &Env) -> usize {
    let out = env.bao().cli(&[
        "list",
        "-format=json",
        "sys/leases/lookup/auth/approle/login",
    ]);
    // A list prints its keys; an empty one prints `{}` (and exits 2).
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(Value::Array(keys)) => keys.len(),
        Ok(Value::Object(empty)) if empty.is_empty() => 0,
        _ => panic!("bao list: {}{}", text(&out.stdout), text(&out.stderr)),
    }
}

#[tokio::test]
async fn an_approle_login_token_is_revoked_once_unused() {
    let env = approle_env("1h");
    // `root init` logged in and revoked its token when done.
    assert_eq!(live_approle_tokens(&env), 0);
    let mut signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    assert_eq!(live_approle_tokens(&env), 1);
    // `serve --check --online` logs in beside the signer and revokes its own token only.
    env.run_with_config_ok(&["serve", "--check", "--online"]);
    env.run_with_config_ok(&["root", "show"]);
    assert_eq!(live_approle_tokens(&env), 1);
    assert_eq!(sign(&env, &signer).await.0, 200);
    // A signer that stops revokes its token.
    assert!(signer.terminate());
    assert!(
        signer
            .logs()
            .contains("revoked the Vault token of this login"),
        "{}",
        signer.logs()
    );
    assert_eq!(live_approle_tokens(&env), 0);
}

/// A start that fails after its login (the listen port taken) revokes the token it got:
/// under systemd's `Restart=on-failure` each failed start would otherwise leave one more
/// live token until its TTL. One refused before the login (the audit log locked by a
/// running signer) gets none.
#[tokio::test]
async fn a_start_that_fails_after_the_login_leaves_no_live_token() {
    let env = approle_env("1h");
    assert_eq!(live_approle_tokens(&env), 0);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    for _ in 0..3 {
        let out = env.run_with_config(&["serve", "--listen", &listen]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&listen), "{stderr}");
        assert_eq!(live_approle_tokens(&env), 0, "{stderr}");
    }
    drop(taken);

    let signer = env.start_signer();
    assert_eq!(live_approle_tokens(&env), 1);
    let out = env.run_with_config(&["serve"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("locked by another meshca process"),
        "{stderr}"
    );
    assert_eq!(live_approle_tokens(&env), 1);
    assert_eq!(sign(&env, &signer).await.0, 200);
}

/// A SIGTERM that comes while the start waits on Vault after its login (here for the
/// cross certificate of an announced root, which a proxy holds unanswered) revokes the
/// token it got, and the signer exits as a stop does (0).
#[tokio::test]
async fn a_stop_during_the_start_after_the_login_leaves_no_live_token() {
    let env = approle_env("1h");
    env.init_next_root();
    env.announce_next_root(Some("next-root-cert.pem"));
    assert_eq!(live_approle_tokens(&env), 0);
    let (proxy, held) = holding_proxy(&env.bao().address(), "/sign-self-issued");
    let config = std::fs::read_to_string(&env.config).unwrap();
    let through_proxy = config.replace(
        &format!("address = \"{}\"", env.bao().address()),
        &format!("address = \"{proxy}\""),
    );
    assert_ne!(through_proxy, config, "no Vault address in:\n{config}");
    std::fs::write(&env.config, through_proxy).unwrap();

    let mut serve = env
        .meshca_with_config(&["serve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    if held.recv_timeout(EXIT_WAIT).is_err() {
        let _ = serve.kill();
        let _ = serve.wait();
        panic!(
            "the start never asked for the cross certificate: {}",
            reader.join().unwrap()
        );
    }
    assert_eq!(live_approle_tokens(&env), 1);
    send_signal(serve.id(), "TERM");
    let status = wait_within(&mut serve, EXIT_WAIT);
    if status.is_none() {
        let _ = serve.kill();
        let _ = serve.wait();
    }
    let stderr = reader.join().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    assert!(stderr.contains("stop requested while starting"), "{stderr}");
    assert_eq!(live_approle_tokens(&env), 0, "{stderr}");
    // The root key was asked to sign: the audit log says so, though no answer came.
    let next = openssl_fingerprint(env.dir.path(), &env.path("next-root-cert.pem"));
    let log = std::fs::read_to_string(env.path("audit.log")).unwrap();
    let stopped: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(stopped["event"], "start_failed", "{log}");
    let message = stopped["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "the root key was asked for the cross certificate that vouches for the next root sha256 {next} and its answer was not awaited: it may have made it"
        )),
        "{message}"
    );
    env.audit_verify_ok();
}

/// A TCP proxy to `upstream` (`http://host:port`) that passes every request through but
/// holds, unanswered, the connection whose request bytes contain `held_path` from that
/// point on, and tells the receiver once it does. Its address, as `http://127.0.0.1:port`.
fn holding_proxy(upstream: &str, held_path: &str) -> (String, std::sync::mpsc::Receiver<()>) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (tell, held) = std::sync::mpsc::channel();
    let held_path = held_path.as_bytes().to_vec();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(&upstream) else {
                return;
            };
            let (mut client_in, mut server_out) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
            });
            let (tell, held_path) = (tell.clone(), held_path.clone());
            std::thread::spawn(move || {
                // Requests follow one another on a connection (no pipelining): the held
                // one's bytes are the first seen with its path, kept from the server.
                let mut seen: Vec<u8> = Vec::new();
                let mut buf = [0u8; 8192];
                let mut holding = false;
                while let Ok(n) = client_in.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if holding {
                        continue;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen
                        .windows(held_path.len())
                        .any(|w| w == held_path.as_slice())
                    {
                        holding = true;
                        let _ = tell.send(());
                        continue;
                    }
                    let keep = seen.len().saturating_sub(held_path.len());
                    seen.drain(..keep);
                    if server_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = server_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (address, held)
}

/// `auth/token/lookup` for the token in `vault/token` (token via stdin, never argv),
/// without the token itself (`id`), so no assertion message can print it.
fn lookup_token(env: &Env) -> Value {
    let token = std::fs::read_to_string(env.path("vault/token")).unwrap();
    let out = env.bao().cli_stdin(
        &["write", "-format=json", "auth/token/lookup", "token=-"],
        &token,
    );
    let mut data = serde_json::from_slice::<Value>(&out.stdout).unwrap()["data"].take();
    if let Some(fields) = data.as_object_mut() {
        fields.remove("id");
    }
    data
}

#[tokio::test]
async fn the_token_is_renewed_before_its_ttl_runs_out() {
    let env = Env::with(vault(VaultSpec {
        auth: VaultAuthSpec::Token {
            ttl: Some("16s".into()),
        },
        ..VaultSpec::default()
    }));
    let first = lookup_token(&env);
    assert!(first["last_renewal_time"].is_null(), "{first}");
    let ttl = first["ttl"].as_u64().unwrap();
    assert!(ttl <= 16, "{first}");
    // The token would be dead at this point without renewal.
    let original_expiry = SystemTime::now() + Duration::from_secs(ttl + 1);

    let signer = env.start_signer();
    wait_until("the signer to renew its token", || {
        !lookup_token(&env)["last_renewal_time"].is_null()
    });
    wait_until("the token's original TTL to pass", || {
        SystemTime::now() > original_expiry
    });
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = readyz(&env, &signer).await;
    assert_eq!(status, 200);
    assert!(lookup_token(&env)["ttl"].as_u64().unwrap() > 0);
    // Renewed, never replaced: a token from a file cannot be re-obtained by logging in.
    assert_eq!(count(&signer.logs(), "logged in to Vault"), 1);
}

/// A token from `token_file`, made with `token_args` and ending `ends` seconds after: at
/// a refresh the file still holds it, which is no fresh login, so the warning says why
/// (`why`) and `meshca_backend_login_failing` is 1 while it still signs; a new token
/// written there is taken once the old one has ended, without a restart. The signer's log.
async fn file_token_flagged_until_a_new_one_is_in_the_file(
    token_args: &[&str],
    ends: u64,
    why: &str,
) -> String {
    let env = Env::with(vault(VaultSpec {
        auth: VaultAuthSpec::Token { ttl: None },
        ..VaultSpec::default()
    }));
    let bao = env.bao();
    let ending = bao.create_token(&["meshca"], token_args);
    openbao::write_secret(&env.path("vault/token"), &ending);
    let signer = env.start_signer();
    let started = Instant::now();
    assert_eq!(sign(&env, &signer).await.0, 200);
    assert_eq!(login_failing(&env, &signer).await, Some(0));
    let line = signer
        .wait_for_nth_log_within(
            "cannot log in to Vault for a fresh token",
            1,
            Duration::from_secs(ends),
        )
        .await;
    assert!(
        line.contains(&format!("still holds the token in use, which {why}")),
        "{line}"
    );
    assert_eq!(readyz(&env, &signer).await.0, 200);
    assert_eq!(login_failing(&env, &signer).await, Some(1));
    assert_eq!(sign(&env, &signer).await.0, 200);

    // A new token in the file: taken once the old one has ended (at its end, or a
    // request's 403), or at the next try, whichever comes first; signing goes on.
    let fresh = bao.create_token(&["meshca"], &["-ttl=1h"]);
    openbao::write_secret(&env.path("vault/token"), &fresh);
    tokio::time::sleep(Duration::from_secs(ends + 1).saturating_sub(started.elapsed())).await;
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(readyz(&env, &signer).await.0, 200);
    assert_eq!(login_failing(&env, &signer).await, Some(0));
    let logs = signer.logs();
    assert!(
        !logs.contains(ending.trim()) && !logs.contains(fresh.trim()),
        "a token was logged"
    );
    logs
}

/// A token from `token_file` that cannot be renewed: at half its TTL the file still holds
/// it (before, it was read again and again as a fresh login, nothing was flagged, and the
/// token met its end unwarned).
#[tokio::test]
async fn a_file_token_that_cannot_be_renewed_is_flagged_until_a_new_one_is_in_the_file() {
    let logs = file_token_flagged_until_a_new_one_is_in_the_file(
        &["-ttl=20s", "-renewable=false"],
        20,
        "cannot be renewed",
    )
    .await;
    // The file's first token, then its second: no login in between.
    assert_eq!(count(&logs, "logged in to Vault"), 2, "{logs}");
}

/// A token from `token_file` near its max TTL (before, nothing said so until it ended).
#[tokio::test]
async fn a_file_token_near_its_max_ttl_is_flagged_until_a_new_one_is_in_the_file() {
    // Renewed at 15 s (25 s granted, what is left of 40), then at 27.5 s (12.5 s: under
    // half the first lease), when the file still holds the same token; it ends at 40 s.
    file_token_flagged_until_a_new_one_is_in_the_file(
        &["-ttl=30s", "-explicit-max-ttl=40s"],
        40,
        "nears its max TTL",
    )
    .await;
}

#[tokio::test]
async fn vault_hung_stopped_sealed_and_back_without_restarting_the_signer() {
    let mut env = Env::with(vault(VaultSpec {
        persistent: true,
        timeout_seconds: 2,
        ..VaultSpec::default()
    }));
    let mut signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    assert_eq!(readyz(&env, &signer).await.0, 200);

    // Hung: the port accepts, nothing answers; every call is bounded by the timeout.
    env.bao().pause();
    let (status, body) = sign(&env, &signer).await;
    let (ready, ready_body) = readyz(&env, &signer).await;
    env.bao().resume();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable");
    assert!(
        message(&body).contains("did not answer within 2s"),
        "{body}"
    );
    assert_eq!(ready, 503, "{ready_body}");
    assert_eq!(sign(&env, &signer).await.0, 200);

    // Stopped: connection refused.
    env.bao_mut().stop();
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert!(message(&body).contains("unreachable"), "{body}");
    let (ready, ready_body) = readyz(&env, &signer).await;
    assert_eq!(ready, 503);
    assert!(message(&ready_body).contains("unreachable"), "{ready_body}");

    // Started again: sealed.
    env.bao_mut().start();
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert!(message(&body).contains("sealed"), "{body}");
    let (ready, ready_body) = readyz(&env, &signer).await;
    assert_eq!(ready, 503);
    assert!(message(&ready_body).contains("sealed"), "{ready_body}");

    // Unsealed: the same signer process issues again.
    env.bao_mut().unseal();
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(readyz(&env, &signer).await.0, 200);
    assert!(
        signer.child.try_wait().unwrap().is_none(),
        "the signer must not have exited"
    );

    let rules: Vec<String> = signer
        .audit_lines()
        .iter()
        .map(|l| l["rule"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        rules,
        [
            "issued",
            "backend_unavailable",
            "issued",
            "backend_unavailable",
            "backend_unavailable",
            "issued"
        ]
    );
    assert!(signer.terminate());
}

#[tokio::test]
async fn a_vault_answer_outside_policy_is_refused_with_502_and_audited() {
    let env = Env::with(vault(VaultSpec::default()));
    let mut signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);

    // The mount now adds AIA and CRL distribution points to everything it signs.
    env.bao().cli_ok(&[
        "write",
        "pki/config/urls",
        "issuing_certificates=http://127.0.0.1:9/ca",
        "crl_distribution_points=http://127.0.0.1:9/crl",
    ]);
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "backend_out_of_policy");
    for needle in [
        "outside policy",
        "not handed out",
        "unexpected extension 1.3.6.1.5.5.7.1.1",
        "unexpected extension 2.5.29.31",
    ] {
        assert!(message(&body).contains(needle), "{needle:?} not in {body}");
    }
    assert!(body.get("certificate").is_none());
    let audit = signer.audit_lines();
    assert_eq!(audit[1]["decision"], "error");
    assert_eq!(audit[1]["rule"], "backend_out_of_policy");
    assert!(audit[1]["serial"].is_null());
    // What Vault signed and keeps is named, to match Vault's list against the log.
    let kept = env
        .bao()
        .cli_json(&["list", "pki/certs"])
        .as_array()
        .expect("a list of serials")
        .iter()
        .filter_map(|serial| serial.as_str().map(|s| s.replace([':', '-'], "")))
        .find(|serial| {
            audit[1]["message"].as_str().is_some_and(|m| {
                m.contains(&format!("Vault signed serial {serial} (Vault keeps it)"))
            })
        });
    assert!(kept.is_some(), "{}", audit[1]);
    // Vault picked that serial: the one meshca planned is on no certificate.
    assert!(audit[1].get("signingSerial").is_none(), "{}", audit[1]);

    let metrics = signer.metrics(&env.client("cluster-a")).await;
    assert!(
        metrics.contains("meshca_sign_requests_total{outcome=\"backend_out_of_policy\"} 1"),
        "{metrics}"
    );

    // A signer started now says why before anyone asks: the issuer's record shows no
    // URLs, the mount's configuration does. So does root init, which will not adopt it.
    assert!(signer.terminate());
    let mut signer = env.start_signer();
    let warning = signer
        .wait_for_log("Vault has AIA/CRL/OCSP URLs configured")
        .await;
    assert!(
        warning.contains("pki/config/urls") && warning.contains("http://127.0.0.1:9/crl"),
        "{warning}"
    );
    assert!(
        !signer.logs().contains("cannot read pki/config/urls"),
        "the policy grants that read"
    );
    let out = env.run_with_config(&["root", "init", "--adopt"]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("pki/config/urls has AIA/CRL/OCSP URLs"),
        "{stderr}"
    );

    // A Vault policy from before this check (no read on pki/config/urls): the start says
    // it cannot tell, and does not log in again over it (a 403 on any other call does).
    env.bao().write_policy(
        "meshca",
        &MESHCA_VAULT_POLICY.replace("path \"pki/config/urls\" { capabilities = [\"read\"] }", ""),
    );
    assert!(signer.terminate());
    let signer = env.start_signer();
    signer.wait_for_log("cannot read pki/config/urls").await;
    assert!(
        !signer.logs().contains("logging in again once"),
        "{}",
        signer.logs()
    );
    env.bao().write_policy("meshca", MESHCA_VAULT_POLICY);

    // Put right, and the signer issues again.
    env.bao().cli_ok(&[
        "write",
        "pki/config/urls",
        "issuing_certificates=",
        "crl_distribution_points=",
    ]);
    assert_eq!(sign(&env, &signer).await.0, 200);
}

#[test]
fn root_init_generates_inside_vault_refuses_to_replace_forces_and_adopts() {
    let env = Env::prepare(&vault(VaultSpec::default()));
    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let out = env.run_with_config_ok(&["root", "init"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("generated inside Vault"), "{stdout}");
    // Dated back 5 minutes, as intermediates are: none starts before its root.
    let not_before = certificate_date_unix(&env.path("root-cert.pem"), "startdate");
    assert!(not_before <= started - 299, "{not_before} {started}");
    let first = env.root_pem();
    let profile = openssl_root_text(&env, "vault root");
    for needle in [
        "CA:TRUE, pathlen:1",
        "Certificate Sign, CRL Sign",
        "O = acme",
        "ecdsa-with-SHA384",
    ] {
        assert!(profile.contains(needle), "{needle:?}: {profile}");
    }
    // The key lives in Vault: its key record carries no private material.
    let issuer = env.bao().cli_json(&["read", "pki/issuer/meshca-root"]);
    let key_id = issuer["data"]["key_id"].as_str().unwrap();
    let key = env
        .bao()
        .cli_text(&["read", "-format=json", &format!("pki/key/{key_id}")]);
    // No message prints the record: it is what might hold private material.
    assert!(
        !key.contains("PRIVATE KEY"),
        "Vault's key record holds a private key"
    );
    assert!(
        key.contains("\"key_type\": \"ec\""),
        "Vault's key record is not an EC key's"
    );

    // Again: refused for the certificate file, nothing touched.
    let out = env.run_with_config(&["root", "init"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{stderr}");
    assert!(
        stderr.contains("root-cert.pem already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(env.root_pem(), first);
    // The file moved away: refused for the issuer, nothing written.
    let certificate = env.path("root-cert.pem");
    let aside = env.path("root-cert.pem.aside");
    std::fs::rename(&certificate, &aside).unwrap();
    let out = env.run_with_config(&["root", "init"]);
    let stderr = text(&out.stderr);
    // The issuer is there: 73, as for the certificate file.
    assert_eq!(out.status.code(), Some(73), "{stderr}");
    assert!(
        stderr.contains("an issuer named meshca-root already exists")
            && stderr.contains("--force")
            && stderr.contains("--adopt"),
        "{stderr}"
    );
    assert!(!certificate.exists(), "a refused init wrote a certificate");
    std::fs::rename(&aside, &certificate).unwrap();

    // A --force killed after generating its root left it under the temporary name:
    // the next one removes it rather than fail on the name.
    let old_id = issuer["data"]["issuer_id"].as_str().unwrap();
    let temporary = format!(
        "issuer_name=meshca-root-new-{}",
        old_id.split('-').next().unwrap()
    );
    env.bao().cli_ok(&[
        "write",
        "pki/root/generate/internal",
        "common_name=left behind",
        "key_type=ec",
        "key_bits=384",
        &temporary,
    ]);
    // --force: a new root; the old issuer is kept under another name.
    let out = env.run_with_config_ok(&["root", "init", "--force"]);
    assert!(text(&out.stdout).contains("the previous issuer is kept as meshca-root-replaced-"));
    let second = env.root_pem();
    assert_ne!(second, first);
    let issuers = env.bao().cli_text(&["list", "pki/issuers"]);
    assert_eq!(
        issuers.lines().filter(|l| l.len() >= 36).count(),
        2,
        "{issuers}"
    );

    // --adopt over another root's certificate (the first's): refused, the file kept.
    std::fs::write(&certificate, &first).unwrap();
    let out = env.run_with_config(&["root", "init", "--adopt"]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("holds another root"),
        "{stderr}"
    );
    assert_eq!(env.root_pem(), first);
    // --adopt: takes the existing issuer; the same certificate. Again over its own
    // certificate: the same, a re-run.
    std::fs::remove_file(&certificate).unwrap();
    let out = env.run_with_config_ok(&["root", "init", "--adopt"]);
    assert!(text(&out.stdout).contains("adopted Vault issuer meshca-root"));
    assert_eq!(env.root_pem(), second);
    env.run_with_config_ok(&["root", "init", "--adopt"]);
    assert_eq!(env.root_pem(), second);

    // root show: the certificate and the Vault side.
    let out = env.run_with_config_ok(&["root", "show"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("the root certificate above"), "{stdout}");
    assert!(
        stdout.contains(key_id) || stdout.contains("key          ec"),
        "{stdout}"
    );

    // The signer starts against the adopted root and issues under it.
    let mut signer = env.start_signer();
    assert!(signer.terminate());
}

/// The issuers of the `pki` mount, by ID (`bao list` exits 2 for an empty list).
fn vault_issuers(env: &Env) -> Vec<String> {
    let out = env.bao().cli(&["list", "-format=json", "pki/issuers"]);
    if out.status.code() == Some(2) {
        return Vec::new();
    }
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    listed
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A mount whose max lease TTL is below the policy's ttlDays: Vault makes a shorter root
/// with only a warning; root init refuses it, naming the tune to run, and leaves nothing
/// in Vault (before, it installed a root ending in 10 days, which caps every
/// intermediate and then breaks the mesh).
#[test]
fn root_init_refuses_a_root_the_mount_shortened() {
    let env = Env::prepare(&vault(VaultSpec::default()));
    env.bao()
        .cli_ok(&["secrets", "tune", "-max-lease-ttl=240h", "pki"]);
    let out = env.run_with_config(&["root", "init"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ends in 10 days, not the 30 days of the policy's ttlDays")
            && stderr.contains("bao secrets tune -max-lease-ttl=720h pki`"),
        "{stderr}"
    );
    assert!(!env.path("root-cert.pem").exists());
    assert_eq!(vault_issuers(&env), Vec::<String>::new());
    // Tuned as it says, it succeeds.
    env.bao()
        .cli_ok(&["secrets", "tune", "-max-lease-ttl=720h", "pki"]);
    env.run_with_config_ok(&["root", "init"]);
}

/// `root init --force` whose certificate file cannot be replaced (here a directory stands
/// in its place) puts Vault back as it was: the old root under the name, the new one
/// gone (before, Vault served the new root under the name while the file still held the
/// old one, and no signer could start).
#[test]
fn a_forced_root_init_that_cannot_write_the_file_leaves_vault_as_it_was() {
    let env = Env::with(vault(VaultSpec::default()));
    let old = env.root_pem();
    let issuers = vault_issuers(&env);
    std::fs::remove_file(env.path("root-cert.pem")).unwrap();
    std::fs::create_dir(env.path("root-cert.pem")).unwrap();
    let out = env.run_with_config(&["root", "init", "--force"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot write root certificate")
            && stderr.contains("the previous issuer is meshca-root again"),
        "{stderr}"
    );
    assert_eq!(vault_issuers(&env), issuers);
    let named = env.bao().cli_json(&["read", "pki/issuer/meshca-root"]);
    assert_eq!(
        named["data"]["certificate"].as_str().unwrap().trim(),
        old.trim()
    );
    // With the file back, the signer starts on the root it had.
    std::fs::remove_dir(env.path("root-cert.pem")).unwrap();
    std::fs::write(env.path("root-cert.pem"), &old).unwrap();
    let mut signer = env.start_signer();
    assert!(signer.terminate());
}

#[test]
fn vault_roots_of_every_key_type_satisfy_openssl() {
    let env = Env::prepare(&EnvSpec {
        root_key_type: KeyType::Rsa2048,
        ..vault(VaultSpec::default())
    });
    let config = std::fs::read_to_string(&env.config).unwrap();
    for key_type in KeyType::ALL {
        let current = config.replace(
            "key_type = \"rsa2048\"",
            &format!("key_type = \"{key_type}\""),
        );
        std::fs::write(&env.config, current).unwrap();
        env.run_with_config_ok(&["root", "init", "--force"]);
        let text = openssl_root_text(&env, key_type.name());
        let (bits, sig) = match key_type {
            KeyType::EcdsaP256 => (256, "ecdsa-with-SHA256"),
            KeyType::EcdsaP384 => (384, "ecdsa-with-SHA384"),
            rsa => (rsa.rsa_bits().unwrap(), "sha256WithRSAEncryption"),
        };
        assert!(
            text.contains(&format!("Public-Key: ({bits} bit)")),
            "{key_type}: {text}"
        );
        assert!(text.contains(sig), "{key_type}: {text}");
        assert!(text.contains("CA:TRUE, pathlen:1"), "{key_type}: {text}");
    }
}

#[test]
fn adopting_an_issuer_outside_policy_is_refused() {
    let env = Env::prepare(&vault(VaultSpec::default()));
    // Someone else's root in the same mount: another organization.
    env.bao().cli_ok(&[
        "write",
        "pki/root/generate/internal",
        "common_name=foreign root",
        "organization=other-org",
        "key_type=ec",
        "key_bits=384",
        "ttl=240h",
        "issuer_name=foreign",
    ]);
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("issuer_ref = \"meshca-root\"", "issuer_ref = \"foreign\""),
    )
    .unwrap();
    let out = env.run_with_config(&["root", "init", "--adopt"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("does not satisfy virtual mesh test/vm") && stderr.contains("other-org"),
        "{stderr}"
    );
    assert!(!env.path("root-cert.pem").exists());
    // And an issuer that is not there cannot be adopted either.
    std::fs::write(
        &env.config,
        config.replace("issuer_ref = \"meshca-root\"", "issuer_ref = \"missing\""),
    )
    .unwrap();
    let out = env.run_with_config(&["root", "init", "--adopt"]);
    assert!(
        text(&out.stderr).contains("no issuer missing"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_signer_refuses_to_start_against_a_root_vault_does_not_hold() {
    let env = Env::with(vault(VaultSpec::default()));
    let stderr = serve_with_a_foreign_root(&env);
    assert!(
        stderr.contains("is not the root in the certificate file"),
        "{stderr}"
    );
}

#[test]
fn an_issuer_gone_from_the_mount_is_not_answered_with_root_init() {
    let env = Env::with(vault(VaultSpec::default()));
    env.bao().cli_ok(&[
        "patch",
        "pki/issuer/meshca-root",
        "issuer_name=meshca-root-renamed",
    ]);
    for args in [&["serve", "--check", "--online"][..], &["root", "show"]] {
        let out = env.run_with_config(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("Vault mount pki has no issuer meshca-root, though the root certificate was made by one")
                && stderr.contains("`bao patch pki/issuer/<id> issuer_name=meshca-root` names it back")
                && stderr.contains("`meshca root init` would make a new root")
                && !stderr.contains("root init` first"),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn vault_secrets_stay_out_of_logs_errors_and_output() {
    let env = Env::with(vault(VaultSpec::default()));
    let token = std::fs::read_to_string(env.path("vault/token"))
        .unwrap()
        .trim()
        .to_string();
    let mut signer = env.start_signer_with(&["--log-level", "trace,vaultrs=trace,rustify=trace"]);
    assert_eq!(sign(&env, &signer).await.0, 200);
    // What each step printed is checked once every output was searched for the tokens:
    // a failed check prints the output it read.
    // `serve --check --online` logs in beside the running signer and finds the issuer;
    // the configured token is the operator's: it stays valid.
    let online = env.run_with_config(&["serve", "--check", "--online"]);
    assert_eq!(sign(&env, &signer).await.0, 200);
    // A refused token: the error names the file, not the token.
    env.bao()
        .cli_stdin(&["write", "auth/token/revoke", "token=-"], &token);
    let (status, body) = sign(&env, &signer).await;
    let show = env.run_with_config(&["root", "show"]);
    // `serve --check` reads the token file but does not ask Vault: the revoked token passes.
    let check = env.run_with_config(&["serve", "--check"]);
    // With --online, Vault is asked: the refusal names the token file.
    let refused = env.run_with_config(&["serve", "--check", "--online"]);
    // Stopped first, so every line it wrote (the last request's too) is searched.
    assert!(signer.terminate());
    // A start with the refused token ends as one with a refused PIN.
    let start_refused = env.run_with_config(&["serve"]);
    let logs = signer.logs();
    let audit = std::fs::read_to_string(env.path("audit.log")).unwrap();
    let root_token = env.bao().root_token().to_string();
    for (name, haystack) in [
        ("logs", logs.clone()),
        ("audit", audit),
        ("answer", body.to_string()),
        (
            "root show",
            format!("{}{}", text(&show.stdout), text(&show.stderr)),
        ),
        (
            "serve --check",
            format!("{}{}", text(&check.stdout), text(&check.stderr)),
        ),
        (
            "serve --check --online",
            format!(
                "{}{}{}{}",
                text(&online.stdout),
                text(&online.stderr),
                text(&refused.stdout),
                text(&refused.stderr)
            ),
        ),
        (
            "serve",
            format!(
                "{}{}",
                text(&start_refused.stdout),
                text(&start_refused.stderr)
            ),
        ),
    ] {
        assert!(
            !haystack.contains(&token),
            "the Vault token is in the {name}"
        );
        assert!(
            !haystack.contains(&root_token),
            "the root token is in the {name}"
        );
    }

    assert!(online.status.success(), "{}", text(&online.stderr));
    assert!(
        text(&online.stdout).contains("issuer meshca-root (auth token): logged in"),
        "{}",
        text(&online.stdout)
    );
    assert_eq!(status, 503, "{body}");
    assert!(message(&body).contains("vault/token"), "{body}");
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(
        text(&check.stdout).contains("mount pki, issuer meshca-root, login by token"),
        "{}",
        text(&check.stdout)
    );
    // Refused credentials exit 78, which the systemd unit does not restart on: each start
    // would present them again, towards locking the role (AppRole's user lockout).
    assert_eq!(refused.status.code(), Some(78), "{}", text(&refused.stderr));
    for said in ["vault/token", "or this Vault never issued it"] {
        assert!(
            text(&refused.stderr).contains(said),
            "{}",
            text(&refused.stderr)
        );
    }
    assert_eq!(
        start_refused.status.code(),
        Some(78),
        "{}",
        text(&start_refused.stderr)
    );
    assert!(
        logs.contains("\"level\":\"TRACE\""),
        "trace logging was not on"
    );
}

#[test]
fn config_mistakes_are_named_without_echoing_secrets() {
    let env = Env::prepare(&vault(VaultSpec::default()));
    let config = std::fs::read_to_string(&env.config).unwrap();
    let cases = [
        (
            config.replace("token_file = \"vault/token\"", "token = \"s.hunter2\""),
            "unknown field `token`",
        ),
        (
            config.replace("backend = \"vault\"", "backend = \"pkcs11\""),
            "instead of [pkcs11]",
        ),
        (
            config.replace(
                "address = \"http://127.0.0.1",
                "address = \"http://192.0.2.1",
            ),
            "plain http is allowed only",
        ),
    ];
    for (text_, needle) in cases {
        std::fs::write(&env.config, &text_).unwrap();
        let out = env.run_with_config(&["root", "init"]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        // Before any message prints stderr, which would then hold the token.
        assert!(!stderr.contains("hunter2"), "the token was printed");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    // A token file others can read is refused, as PIN files are.
    std::fs::write(&env.config, &config).unwrap();
    std::fs::set_permissions(
        env.path("vault/token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = env.run_with_config(&["root", "init"]);
    assert!(
        text(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out.stderr)
    );
}

/// base64url without padding, for a hand-made JWT.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A service account token as Kubernetes would mount it (the signature is not checked by
/// OpenBao without configured keys: the TokenReview fake is the authority).
fn service_account_jwt(namespace: &str, name: &str) -> String {
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": "kubernetes/serviceaccount",
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": "uid-1",
    });
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(b"signature")
    )
}

/// An HTTP fake of the one Kubernetes endpoint OpenBao's Kubernetes auth calls:
/// `POST /apis/authentication.k8s.io/v1/tokenreviews`. It vouches for exactly `jwt`, as
/// service account meshca/meshca-signer. Returns its address and a review counter.
fn token_review_fake(jwt: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reviews = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = reviews.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let review: Value = serde_json::from_slice(&body).unwrap_or_default();
            counter.fetch_add(1, Ordering::SeqCst);
            let vouched = request_line
                .starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews ")
                && review["spec"]["token"] == jwt.as_str();
            let status = if vouched {
                serde_json::json!({"authenticated": true, "user": {
                    "username": "system:serviceaccount:meshca:meshca-signer",
                    "uid": "uid-1",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:meshca"]}})
            } else {
                serde_json::json!({"authenticated": false, "error": "token not recognized"})
            };
            let answer = serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "status": status,
            })
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (format!("http://{addr}"), reviews)
}

#[tokio::test]
async fn kubernetes_auth_logs_in_with_the_service_account_token() {
    let jwt = service_account_jwt("meshca", "meshca-signer");
    let (kubernetes_host, reviews) = token_review_fake(jwt.clone());
    // Env::with ran `root init`, which logged in this way already.
    let env = Env::with(vault(VaultSpec {
        auth: VaultAuthSpec::Kubernetes {
            kubernetes_host,
            jwt: jwt.clone(),
        },
        ..VaultSpec::default()
    }));
    let signer = env.start_signer();
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    let logs = signer.logs();
    // Before any message prints the logs, which would then hold the token.
    assert!(!logs.contains(&jwt), "the service account token was logged");
    assert!(logs.contains("\"method\":\"kubernetes\""), "{logs}");
    // OpenBao asked the fake once for root init and once for the signer's login.
    assert_eq!(reviews.load(std::sync::atomic::Ordering::SeqCst), 2);

    // A token Kubernetes does not vouch for: a clear login failure, no token echoed.
    let stranger = service_account_jwt("meshca", "someone-else");
    std::fs::write(env.path("vault/jwt"), &stranger).unwrap();
    let out = env.run_with_config(&["root", "show"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(!stderr.contains(&stranger), "the token was printed");
    assert!(
        stderr.contains("Vault login (kubernetes) failed"),
        "{stderr}"
    );
}

/// A Vault answer is read with a bound: a 5 MiB one (here a real KV secret, read with
/// meshca's client) is refused by name, not held whole.
#[tokio::test]
async fn an_answer_over_4_mib_is_refused_by_name() {
    use meshca::backend::vault::client::VaultClient;
    use meshca::backend::vault::config::{VaultAuth, VaultSettings};
    let env = Env::prepare(&vault(VaultSpec::default()));
    let token_file = env.path("big-token");
    openbao::write_secret(&token_file, env.bao().root_token());
    env.bao().cli_stdin(
        &["kv", "put", "secret/big", "value=-"],
        &"x".repeat(5 << 20),
    );
    let client = VaultClient::new(&VaultSettings {
        address: env.bao().address().parse().unwrap(),
        ca_cert: None,
        mount: "pki".into(),
        issuer_ref: "meshca-root".into(),
        timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        auth: VaultAuth::Token(meshca::secret::SecretSource::File(
            meshca::secret::SecretFile::new(
                "vault.auth.token_file",
                &token_file,
                token_file.clone(),
            ),
        )),
    })
    .unwrap();
    let err = match client
        .call(reqwest::Method::GET, "secret/data/big", None)
        .await
    {
        Ok(_) => panic!("a 5 MiB answer was read whole"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("larger than 4096 KiB"), "{err}");
    // Its size is the only problem: a small secret reads.
    env.bao().cli_ok(&["kv", "put", "secret/small", "value=x"]);
    let small = client
        .call(reqwest::Method::GET, "secret/data/small", None)
        .await
        .unwrap();
    assert_eq!(small["data"]["data"]["value"], "x");
}

/// A plain HTTP server on 127.0.0.1 that answers every request with `answer` and counts
/// the requests it got (their bytes are never kept: they may hold a token).
fn http_answering(answer: String) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    (port, requests)
}

/// A Vault standby (or a proxy) answering with a redirect to somewhere else: meshca does
/// not follow it, since the token (or a login's credentials) would go along, in clear
/// here, and says which address to configure instead.
#[test]
fn a_redirect_from_vault_is_not_followed_and_named() {
    let env = Env::with(vault(VaultSpec::default()));
    let (elsewhere, reached) =
        http_answering("HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n".to_string());
    let (standby, _) = http_answering(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{elsewhere}/v1/sys/health\r\ncontent-length: 0\r\n\r\n"
    ));
    let config = std::fs::read_to_string(&env.config).unwrap();
    let redirected = config.replace(
        &format!("address = \"{}\"", env.bao().address()),
        &format!("address = \"http://127.0.0.1:{standby}\""),
    );
    assert_ne!(redirected, config, "no vault.address in:\n{config}");
    std::fs::write(&env.config, redirected).unwrap();

    let out = env.run_with_config(&["root", "show"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // Through vaultrs (the token lookup here) the Location is not known; it is named
    // where meshca reads the answer itself.
    assert!(
        stderr.contains("with a redirect (307") && stderr.contains("which meshca does not follow"),
        "{stderr}"
    );
    assert!(stderr.contains("set vault.address"), "{stderr}");
    assert_eq!(
        reached.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a request followed the redirect"
    );
}

/// A disaster-recovery secondary (Vault Enterprise; its health answer is 472) serves no
/// requests: the start is refused naming it, not taken for a healthy Vault.
#[test]
fn a_disaster_recovery_secondary_is_not_taken_for_a_healthy_vault() {
    let env = Env::with(vault(VaultSpec::default()));
    let (secondary, asked) =
        http_answering("HTTP/1.1 472 DR Secondary\r\ncontent-length: 0\r\n\r\n".to_string());
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace(
            &format!("address = \"{}\"", env.bao().address()),
            &format!("address = \"http://127.0.0.1:{secondary}\""),
        ),
    )
    .unwrap();
    let out = env.run_with_config(&["serve", "--check", "--online"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("disaster-recovery secondary") && stderr.contains("the primary"),
        "{stderr}"
    );
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

/// The root key must vouch for each announced root (`sign-self-issued`): where Vault
/// refuses it (a policy without the path), a start announcing a root fails by name, and a
/// reload announcing one keeps the announcement in force (none) and says why; once the
/// policy grants it, the reload announces the root with its cross certificate.
#[tokio::test]
async fn a_root_vault_will_not_vouch_for_is_not_announced() {
    let env = Env::with(vault(VaultSpec::default()));
    let next_root = common::certs::openssl_fingerprint(env.dir.path(), &env.init_next_root());
    let without = MESHCA_VAULT_POLICY.to_string()
        + "path \"pki/issuer/+/sign-self-issued\" { capabilities = [\"deny\"] }\n";
    env.bao().write_policy("meshca", &without);

    env.announce_next_root(Some("next-root-cert.pem"));
    // Read until it exits: a signer that started anyway is stopped and fails the test.
    let mut serve = env
        .meshca_with_config(&["serve"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(serve.stderr.take().unwrap())) {
        let line = line.unwrap();
        if line.contains("signer listening") {
            let _ = serve.kill();
            let _ = serve.wait();
            panic!("the signer started without vouching for the next root: {stderr}{line}");
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    assert_eq!(serve.wait().unwrap().code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the root key cannot make the cross certificate that vouches for next root sha256 {next_root}"
        )) && stderr.contains("the signer does not start"),
        "{stderr}"
    );

    env.announce_next_root(None);
    let signer = env.start_signer();
    let client = env.client("cluster-a");
    env.announce_next_root(Some("next-root-cert.pem"));
    send_signal(signer.child.id(), "HUP");
    let failed = signer.wait_for_log("SIGHUP: rules not reloaded").await;
    assert!(
        failed.contains(&format!("next root sha256 {next_root}"))
            && failed.contains("the announcement in force stays"),
        "{failed}"
    );
    let policy: Value =
        serde_json::from_str(&signer.get_text(&client, "/v1/virtualmeshes/test/vm").await).unwrap();
    assert!(policy["nextRootCert"].is_null(), "{policy}");
    assert!(
        !signer.audit_lines().iter().any(|l| l["event"] == "reload"),
        "{:?}",
        signer.audit_lines()
    );

    env.bao().write_policy("meshca", MESHCA_VAULT_POLICY);
    send_signal(signer.child.id(), "HUP");
    let reloaded = signer.wait_for_log("SIGHUP: rules reloaded").await;
    assert!(
        reloaded.contains(&format!(
            "next root sha256 {next_root} announced (cross certificate serial"
        )),
        "{reloaded}"
    );
    let policy: Value =
        serde_json::from_str(&signer.get_text(&client, "/v1/virtualmeshes/test/vm").await).unwrap();
    assert!(policy["nextRootCrossCert"].is_string(), "{policy}");
}

/// Under a VirtualMesh with `spec.trustDomains` the intermediate carries the critical URI
/// name constraints on the Vault backend too: meshca builds the TBS and has
/// `sign-self-issued` sign it (OpenBao's `sign-intermediate` ignores
/// `permitted_uri_domains`). Its key then signs workload identities of those trust domains
/// only. Vault stores no copy (`pki/certs` does not grow); the audit log names the serial,
/// which is meshca's own. The README's serving policy is enough (no `sudo`).
#[tokio::test]
async fn an_intermediate_under_trust_domains_carries_the_name_constraints() {
    let mut spec = vault(VaultSpec::default());
    spec.virtual_meshes[0].push_str("  trustDomains: [pay.local]\n");
    let env = Env::with(spec);
    env.bao()
        .write_policy("meshca", &readme_policy("# meshca-signer:"));
    // Nothing left to warn of about Vault: `serve --check` and the start warn only that
    // rustls peers refuse name constraints, as on any backend.
    let rustls = "virtual mesh test/vm sets spec.trustDomains: its intermediates carry URI name constraints, which rustls-webpki does not support";
    let report = text(&env.run_with_config_ok(&["serve", "--check"]).stdout);
    let warnings: Vec<&str> = report.lines().filter(|l| l.contains("warning")).collect();
    assert!(
        warnings.len() == 1 && warnings[0].contains(rustls),
        "{report}"
    );
    let before = stored_certificates(&env);
    let signer = env.start_signer();
    let (key, request) = csr(KeyType::EcdsaP256, "acme", "cluster-a");
    let (status, body) = post_sign(
        &env.client("cluster-a"),
        &signer,
        &sign_body("test/vm", "test/cluster-a", &request),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let logs = signer.logs();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warnings.len() == 1 && warnings[0].contains(rustls),
        "{logs}"
    );

    let profile = openssl_verifies(&env, &body, "constrained");
    for shown in [
        "X509v3 Name Constraints: critical\n",
        "Permitted:\n                  URI:pay.local\n",
        "X509v3 Basic Constraints: critical\n                CA:TRUE, pathlen:0\n",
        "X509v3 Key Usage: critical\n                Digital Signature, Certificate Sign, CRL Sign\n",
        "Subject: O = acme, CN = cluster-a\n",
    ] {
        assert!(profile.contains(shown), "{shown:?} not in {profile}");
    }
    // Vault put the root's name in as issuer (the template named the intermediate).
    assert!(
        !profile.contains("Issuer: O = acme, CN = cluster-a"),
        "{profile}"
    );
    assert!(!profile.contains("Excluded"), "{profile}");
    let dir = env.path("constrained");
    assert_constrained_to_pay_local(&dir, &key);

    // sign-self-issued keeps nothing in the mount: the audit log is the record.
    assert_eq!(stored_certificates(&env), before);
    let serial = body["serial"].as_str().unwrap();
    let audit = signer.audit_lines();
    let issued = audit.last().unwrap();
    assert_eq!(issued["rule"], "issued", "{audit:?}");
    assert_eq!(issued["serial"], serial, "{audit:?}");
    let shown_serial = openssl(&dir, &["x509", "-in", "ca-cert.pem", "-noout", "-serial"]);
    assert_eq!(
        shown_serial.trim().to_lowercase(),
        format!("serial={serial}"),
        "{shown_serial}"
    );

    // An RSA intermediate under the P-384 root: Vault signs it with the root's algorithm
    // (`require_matching_certificate_algorithms` false), which the check demands.
    let (_key, rsa) = csr(KeyType::Rsa2048, "acme", "cluster-a");
    let (status, body) = post_sign(
        &env.client("cluster-a"),
        &signer,
        &sign_body("test/vm", "test/cluster-a", &rsa),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let profile = openssl_verifies(&env, &body, "constrained-rsa");
    assert!(
        profile.contains("Signature Algorithm: ecdsa-with-SHA384")
            && profile.contains("Public-Key: (2048 bit)")
            && profile.contains("X509v3 Name Constraints: critical"),
        "{profile}"
    );
    assert_eq!(stored_certificates(&env), before);

    // A policy without sign-self-issued: those signings are refused by Vault, named.
    let without: String = readme_policy("# meshca-signer:")
        .lines()
        .filter(|line| !line.contains("sign-self-issued"))
        .map(|line| format!("{line}\n"))
        .collect();
    env.bao().write_policy("meshca", &without);
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        message(&body).contains("sign-self-issued")
            && message(&body).contains("the policy of meshca's Vault identity must allow it"),
        "{body}"
    );
    // Vault signed nothing: the audit line names no serial as signed (before, it named
    // the planned one, as if a signature were on record).
    let refused = signer.audit_lines().pop().unwrap();
    assert_eq!(refused["rule"], "backend_unavailable", "{refused}");
    assert!(refused.get("signingSerial").is_none(), "{refused}");
    // A reload says so before a cluster's renewal finds out, as do the start and `serve
    // --check --online` (above, with the README's policy, they did not).
    let said = |warned: &str| {
        assert!(
            // The quotes around update are escaped in a JSON line.
            warned.contains("the Vault token's policy does not let meshca sign intermediates with name constraints: it needs ")
                && warned.contains("update")
                && warned.contains(" on pki/issuer/meshca-root/sign-self-issued (see meshca's Vault policy")
                && warned.contains("every signing for a virtual mesh with spec.trustDomains (test/vm) is refused"),
            "{warned}"
        );
    };
    send_signal(signer.child.id(), "HUP");
    said(
        &signer
            .wait_for_log("SIGHUP: the Vault token's policy does not let meshca sign")
            .await,
    );
    let online = env.run_with_config_ok(&["serve", "--check", "--online"]);
    let warning = text(&online.stdout)
        .lines()
        .find(|l| l.contains("warning: the Vault token's policy"))
        .map(String::from)
        .unwrap_or_else(|| panic!("{}", text(&online.stdout)));
    said(&warning);
}

/// Without trust domains nothing changed: `sign-intermediate` signs, and Vault keeps the
/// intermediate in `pki/certs` under the serial the audit log names (sign-self-issued
/// would keep nothing).
#[tokio::test]
async fn an_intermediate_without_trust_domains_is_still_signed_by_sign_intermediate() {
    let env = Env::with(vault(VaultSpec::default()));
    let before = stored_certificates(&env);
    let signer = env.start_signer();
    let (status, body) = sign(&env, &signer).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stored_certificates(&env), before + 1);
    let serial = body["serial"].as_str().unwrap();
    // Vault lists serials as colon-separated hex.
    let listed = env.bao().cli_json(&["list", "pki/certs"]);
    let listed: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().replace(':', ""))
        .collect();
    assert!(
        listed.iter().any(|s| s == serial),
        "{serial} not in {listed:?}"
    );
    let profile = openssl_verifies(&env, &body, "unconstrained");
    assert!(!profile.contains("Name Constraints"), "{profile}");
}

/// The README's policy block that begins with `first_line`: the tests use the policy the
/// README gives, not a copy that could drift from it.
fn readme_policy(first_line: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find(&format!("```hcl\n{first_line}"))
        .unwrap_or_else(|| panic!("no policy {first_line} in the README"));
    let block = &readme[start + "```hcl\n".len()..];
    block[..block.find("```").unwrap()].to_string()
}

/// How many certificates the mount keeps (`pki/certs`).
fn stored_certificates(env: &Env) -> usize {
    let listed = env.bao().cli_json(&["list", "pki/certs"]);
    listed.as_array().map_or(0, Vec::len)
}

/// A root that can no longer sign under a running signer (its issuer's usage without
/// issuing-certificates; the token's policy without `sign-intermediate`) makes it unready,
/// naming why, as signing would fail (before, `/readyz` said ready while every signing
/// failed); `serve --check --online` refuses such a policy; put back, it serves again.
#[tokio::test]
async fn a_root_that_cannot_sign_makes_the_signer_unready_and_the_check_fail() {
    let env = Env::with(vault(VaultSpec::default()));
    let serving = readme_policy("# meshca-signer:");
    env.bao().write_policy("meshca", &serving);
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    let bao = env.bao();

    bao.cli_ok(&[
        "patch",
        "pki/issuer/meshca-root",
        "usage=read-only,crl-signing",
    ]);
    let (status, body) = readyz(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        message(&body).contains("may not issue certificates"),
        "{body}"
    );
    bao.cli_ok(&[
        "patch",
        "pki/issuer/meshca-root",
        "usage=read-only,issuing-certificates,crl-signing",
    ]);
    assert_eq!(readyz(&env, &signer).await.0, 200);

    let without_sign: String = serving
        .lines()
        .filter(|line| !line.contains("sign-intermediate"))
        .map(|line| format!("{line}\n"))
        .collect();
    bao.write_policy("meshca", &without_sign);
    let (status, body) = readyz(&env, &signer).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        message(&body).contains("needs \"update\" on pki/issuer/meshca-root/sign-intermediate"),
        "{body}"
    );
    let check = env.run_with_config(&["serve", "--check", "--online"]);
    assert!(!check.status.success());
    assert!(
        text(&check.stderr).contains("pki/issuer/meshca-root/sign-intermediate"),
        "{}",
        text(&check.stderr)
    );
    bao.write_policy("meshca", &serving);
    assert_eq!(readyz(&env, &signer).await.0, 200);
    assert_eq!(sign(&env, &signer).await.0, 200);
}

/// The README's serving policy alone (no `pki/key/*`, no `root/generate/internal`) is
/// enough to serve, sign and check online, and a token holding it cannot make a root or
/// read the mount's keys. Vault keeps each intermediate it signs (`pki/certs`), as the
/// README says where it says to tidy them.
#[tokio::test]
async fn the_serving_policy_alone_serves_and_signs_but_makes_no_root() {
    let env = Env::with(vault(VaultSpec::default()));
    let serving = readme_policy("# meshca-signer:");
    assert!(!serving.contains("pki/key") && !serving.contains("root/generate"));
    env.bao().write_policy("meshca", &serving);
    let before = stored_certificates(&env);
    let signer = env.start_signer();
    assert_eq!(sign(&env, &signer).await.0, 200);
    assert_eq!(sign(&env, &signer).await.0, 200);
    assert_eq!(stored_certificates(&env), before + 2);
    let online = env.run_with_config_ok(&["serve", "--check", "--online"]);
    assert!(
        !text(&online.stdout).contains("warning"),
        "{}",
        text(&online.stdout)
    );
    assert!(
        !signer.logs().contains("cannot read pki/config/urls"),
        "{}",
        signer.logs()
    );

    let token = env.bao().create_token(&["meshca"], &[]);
    for args in [
        &["write", "pki/root/generate/internal", "common_name=other"][..],
        &["write", "pki/keys/generate/internal", "key_type=ec"][..],
        &["list", "pki/keys"][..],
    ] {
        let out = env
            .bao()
            .command(args)
            .env("BAO_TOKEN", &token)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} allowed");
        assert!(
            text(&out.stderr).contains("permission denied"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // `root show` needs the ceremony's (the root's key), which `make demo-vault` also
    // runs `root init` under.
    let refused = env.run_with_config(&["root", "show"]);
    assert!(!refused.status.success());
    env.bao()
        .write_policy("meshca", &readme_policy("# meshca-ceremony:"));
    env.run_with_config_ok(&["root", "show"]);
}
