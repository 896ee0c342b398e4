//! Talking to Vault/OpenBao: one HTTP client (rustls with the aws-lc-rs provider, Vault's
//! CA bundle, bounded timeouts), login by token, AppRole or Kubernetes, token renewal
//! before the TTL runs out, exactly one re-login when Vault answers 403, and errors that
//! say what went wrong without ever carrying a token.
//!
//! Logins, token lookup and renewal go through vaultrs; the PKI calls meshca needs carry
//! fields vaultrs does not model (issuer_ref, not_after, signature_bits, key_usage), so
//! they are plain JSON requests on the same HTTP client.

use std::error::Error as _;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde_json::Value;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::config::{VaultAuth, VaultSettings};
use super::lockout::{self, RefusedLogins};
use crate::http_answer::BodyError;
use crate::secret::{Secret, SecretError};

/// How long the background renewer waits after a failed renewal before trying again.
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// How soon a refused login for a token that cannot be renewed is tried again: refused
/// credentials rarely mend by themselves, and each try logs a warning.
const LOGIN_RETRY: Duration = Duration::from_secs(30);
/// The background renewer looks at the token at least this often.
const RENEW_CHECK: Duration = Duration::from_secs(60);
/// Largest service account JWT meshca reads.
const MAX_JWT: u64 = 64 * 1024;

/// A refused login's other cause: the Vault at the address is not the one the
/// credentials were made in. Vault answers both with a bare 403.
const NOT_THIS_VAULT: &str = "a Vault that lost its storage, as a `-dev` server does at each restart, or another Vault at this address";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("Vault at {address} is unreachable: {detail}")]
    Unreachable { address: String, detail: String },
    #[error("Vault at {address} did not answer within {seconds}s")]
    Timeout { address: String, seconds: u64 },
    #[error("Vault at {address} is sealed; meshca carries on by itself once it is unsealed")]
    Sealed { address: String },
    #[error("Vault at {address} is not initialized")]
    Uninitialized { address: String },
    #[error("Vault answered {status} to {what}: {message}")]
    Api {
        status: u16,
        what: String,
        message: String,
    },
    #[error(
        "Vault denied {what} ({message}) to a valid token: the policy of meshca's Vault identity must allow it (a policy added to the role, not one edited, reaches the signer only with a fresh login: restart it)"
    )]
    Denied { what: String, message: String },
    #[error("Vault login ({method}) failed: {message}")]
    Login {
        method: &'static str,
        message: String,
    },
    /// Vault answered the login (or the token's lookup) with a 4xx: the credentials are
    /// wrong, and trying them again counts towards locking the role (AppRole's user
    /// lockout), as a refused PIN does towards locking a token.
    #[error("Vault login ({method}) failed: {message}")]
    LoginRefused {
        method: &'static str,
        message: String,
    },
    /// AppRole credentials Vault refused [`lockout::TRIES`] times in a row are not sent
    /// again until they change or [`lockout::PAUSE`] has passed: more refusals would lock
    /// the role out, for longer than it takes to mend them.
    #[error(
        "Vault login (approle) not sent: Vault refused this role ID and secret ID {} times in a row, the last {} s ago; they are sent again as soon as either changes (both are read again at each try), or in {} s (Vault and OpenBao lock a role out after 5 refused logins by default)",
        .0.refusals, .0.last_refused_seconds_ago, .0.retry_in_seconds
    )]
    LoginHeld(lockout::Held),
    #[error("{0}")]
    Secret(#[from] SecretError),
    #[error("unexpected answer from Vault to {what}: {message}")]
    Protocol { what: String, message: String },
    #[error("Vault client setup: {0}")]
    Setup(String),
    /// A standby node (or a proxy) pointing elsewhere. Followed, the redirect would carry
    /// the token or the login's credentials to wherever it says, in clear if it says so.
    #[error(
        "Vault answered {what} with a redirect ({status}{}), which meshca does not follow (it would send the token or credentials along): set vault.address to the active node or to a load balancer in front of the cluster",
        location.as_deref().map(|l| format!(" to {l}")).unwrap_or_default()
    )]
    Redirected {
        what: String,
        status: u16,
        location: Option<String>,
    },
    /// No valid token, and the last try for one failed: the same error is answered until
    /// the next try is due, instead of a renewal and a login per caller.
    #[error("{message} (tried {failed_seconds_ago} s ago; next try in {retry_in_seconds} s)")]
    RetryLater {
        message: String,
        failed_seconds_ago: u64,
        retry_in_seconds: u64,
    },
}

impl VaultError {
    /// Vault certainly signed nothing for the call that failed so: it refused it, or it
    /// was never sent. Not so when the call went unanswered, or its answer was garbled.
    pub fn signed_nothing(&self) -> bool {
        match self {
            VaultError::Unreachable { .. }
            | VaultError::Timeout { .. }
            | VaultError::Protocol { .. } => false,
            VaultError::Api { status, .. } => (400..500).contains(status),
            _ => true,
        }
    }

    /// Vault could not be asked at all (down, sealed, slow): keep what we have, retry later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            VaultError::Unreachable { .. }
                | VaultError::Timeout { .. }
                | VaultError::Sealed { .. }
                | VaultError::Uninitialized { .. }
        ) || matches!(self, VaultError::Api { status, .. } if *status >= 500 || *status == 429)
    }
}

/// A Vault token and the vaultrs client that sends it. Never printed.
pub struct Token {
    secret: Secret,
    vaultrs: vaultrs::client::VaultClient,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What a renewal gave.
enum Renewal {
    Enough(Session),
    /// Renewed, but for less than half its first lease (near its max TTL): a fresh login
    /// should replace it.
    NearMaxTtl(Session),
}

/// Seconds left of a session's lease (0 for one that never expires), for a log line.
fn current_lease_seconds(session: &Session) -> u64 {
    session
        .expires_at
        .map(|at| at.saturating_duration_since(Instant::now()).as_secs())
        .unwrap_or(0)
}

/// The current token and when to look at it again.
#[derive(Clone)]
struct Session {
    token: Arc<Token>,
    /// When to renew (or log in again); `None` for a token that never expires.
    refresh_at: Option<Instant>,
    /// When the token's current lease ends; `None` for a token that never expires.
    expires_at: Option<Instant>,
    renewable: bool,
    /// The lease the token was first issued with; renewals that return much less mean
    /// the token is nearing its max TTL.
    issued_lease: Duration,
}

impl Session {
    fn new(token: Arc<Token>, lease: Duration, renewable: bool, issued_lease: Duration) -> Self {
        let now = Instant::now();
        Session {
            token,
            // Renew at half the lease: the other half rides out a Vault outage. A lease
            // past what an Instant can hold (a broken answer) is one that never ends.
            refresh_at: (!lease.is_zero())
                .then(|| now.checked_add(lease / 2))
                .flatten(),
            expires_at: (!lease.is_zero()).then(|| now.checked_add(lease)).flatten(),
            renewable,
            issued_lease,
        }
    }

    /// The session after a renewal of `current` that granted `lease`. A lease of 0 for a
    /// token that had an end means Vault gave no more time, so the token ends now; only a
    /// token that never had an end (a root token) keeps never ending.
    fn renewed(current: &Session, lease: Duration, renewable: bool) -> Session {
        let mut renewed = Session::new(
            current.token.clone(),
            lease,
            renewable,
            current.issued_lease,
        );
        if lease.is_zero() && current.expires_at.is_some() {
            let now = Instant::now();
            renewed.refresh_at = Some(now);
            renewed.expires_at = Some(now);
        }
        renewed
    }

    fn due(&self) -> bool {
        self.refresh_at.is_some_and(|at| Instant::now() >= at)
    }

    /// The session kept after a fresh login failed near the max TTL: the next refresh,
    /// which tries the login again, no sooner than [`LOGIN_RETRY`] from `now`. Each renewal
    /// there grants half the lease before it, so refreshing at half the lease tried the
    /// login again within seconds: 5 refused logins in 7 s, which is Vault's and OpenBao's
    /// default lockout (the AppRole locked for 15 minutes, for every replica, even after
    /// the credentials are mended).
    fn retrying_login_from(mut self, now: Instant) -> Session {
        let earliest = now + LOGIN_RETRY;
        if self.refresh_at.is_some_and(|at| at < earliest) {
            self.refresh_at = Some(self.until_it_ends(earliest));
        }
        self
    }

    /// `at`, or the token's end if that comes first: an ended token is never handed out
    /// while its next refresh is still to come.
    fn until_it_ends(&self, at: Instant) -> Instant {
        self.expires_at.map_or(at, |end| end.min(at))
    }

    fn expired(&self) -> bool {
        self.expires_at.is_some_and(|at| Instant::now() >= at)
    }
}

/// The error for a redirect `what` got, naming where it pointed.
fn redirected(what: String, response: &reqwest::Response) -> VaultError {
    VaultError::Redirected {
        what,
        status: response.status().as_u16(),
        location: response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(|l| crate::logging::clip(l, 200)),
    }
}

/// Largest answer read from Vault: its answers to meshca are a few kilobytes.
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// A Vault client with its login state.
pub struct VaultClient {
    settings: VaultSettings,
    http: reqwest::Client,
    /// `scheme://host:port`, no trailing slash.
    base: String,
    session: Mutex<Option<Session>>,
    /// Set by [`Self::logout`]: the background renewal stops rather than log in again.
    closed: std::sync::atomic::AtomicBool,
    /// The last fresh login for a token near its max TTL failed: signing goes on with
    /// the renewed token only until it ends ([`Self::login_failing`]).
    login_failing: std::sync::atomic::AtomicBool,
    /// With no valid token: when the last try for one failed, why, and when the next is
    /// due. Every request, readiness check and renewal tick asks for a token; without
    /// this each would cost Vault a login (an AppRole secret ID use, a TokenReview) and
    /// the log a warning.
    failed_refresh: std::sync::Mutex<Option<FailedRefresh>>,
    /// AppRole credentials Vault refused, held back before they lock the role out.
    refused_logins: std::sync::Mutex<RefusedLogins>,
}

struct FailedRefresh {
    at: Instant,
    retry_at: Instant,
    message: String,
}

impl VaultClient {
    pub fn new(settings: &VaultSettings) -> Result<Self, VaultError> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = &settings.ca_cert {
            for cert in crate::tlsutil::load_certificates(path)
                .map_err(|e| VaultError::Setup(format!("vault.ca_cert: {e}")))?
            {
                roots.add(cert).map_err(|e| {
                    VaultError::Setup(format!("vault.ca_cert {}: {e}", path.display()))
                })?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_details(
            crate::tlsutil::provider(),
            crate::tlsutil::wall_clock(),
        )
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| VaultError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            // Signer-to-Vault traffic goes where the config says, not via a proxy from
            // the environment, nor where a redirect says (see VaultError::Redirected).
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| VaultError::Setup(e.to_string()))?;
        Ok(VaultClient {
            base: settings.address.as_str().trim_end_matches('/').to_string(),
            settings: settings.clone(),
            http,
            session: Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
            login_failing: std::sync::atomic::AtomicBool::new(false),
            failed_refresh: std::sync::Mutex::new(None),
            refused_logins: std::sync::Mutex::new(RefusedLogins::default()),
        })
    }

    /// Whether the signer's token is near its max TTL or cannot be renewed, and a fresh
    /// login failed: it signs on until that token ends, then not at all, unless the
    /// credentials are mended.
    pub fn login_failing(&self) -> bool {
        self.login_failing.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    /// The address, for messages.
    pub fn address(&self) -> &str {
        &self.base
    }

    /// Unauthenticated health check: reachable, initialized, unsealed.
    pub async fn health(&self) -> Result<(), VaultError> {
        let url = format!(
            "{}/v1/sys/health?standbyok=true&perfstandbyok=true",
            self.base
        );
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        if response.status().is_redirection() {
            return Err(redirected("GET sys/health".into(), &response));
        }
        match response.status().as_u16() {
            // Active, standby (forwards), performance standby.
            200 | 429 | 473 => Ok(()),
            // A disaster-recovery secondary serves no client requests (Vault Enterprise).
            472 => Err(VaultError::Api {
                status: 472,
                what: "GET sys/health".into(),
                message: "this Vault is a disaster-recovery secondary, which serves no requests: set vault.address to the primary cluster".into(),
            }),
            501 => Err(VaultError::Uninitialized {
                address: self.base.clone(),
            }),
            503 => Err(VaultError::Sealed {
                address: self.base.clone(),
            }),
            status => Err(VaultError::Api {
                status,
                what: "GET sys/health".into(),
                message: "unexpected status".into(),
            }),
        }
    }

    /// An authenticated call. A 403 with a token Vault no longer knows (revoked, expired)
    /// is answered by exactly one fresh login and one retry; a 403 with a live token is
    /// the policy's refusal, returned as such: a login per refused request would use up
    /// an AppRole secret ID with limited uses, and leave a token behind each time.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, VaultError> {
        let token = self.token().await?;
        match self.request(Some(&token), method.clone(), path, body).await {
            Err(VaultError::Api {
                status: 403,
                what,
                message,
            }) if self.token_is_live(&token).await => Err(VaultError::Denied { what, message }),
            Err(VaultError::Api { status: 403, .. }) => {
                tracing::warn!(
                    path,
                    "Vault answered 403 (permission denied); logging in again once"
                );
                let token = self.relogin(&token).await?;
                self.request(Some(&token), method, path, body)
                    .await
                    .map_err(|e| match e {
                        VaultError::Api {
                            status: 403,
                            what,
                            message,
                        } => VaultError::Denied { what, message },
                        other => other,
                    })
            }
            other => other,
        }
    }

    /// Whether Vault still knows `token` (a lookup of itself, which every token's default
    /// policy allows). Anything but a clear yes counts as no, so a fresh login is tried.
    async fn token_is_live(&self, token: &Token) -> bool {
        self.request(Some(token), Method::GET, "auth/token/lookup-self", None)
            .await
            .is_ok()
    }

    /// An authenticated call meshca can do without (a read of the mount's URLs, a question
    /// about the token's capabilities): a 403 means the policy does not grant it, so no
    /// fresh login is tried. That would cost a login, and with an AppRole a use of its
    /// secret ID, for nothing; and a token without Vault's `default` policy cannot look
    /// itself up either, so [`VaultClient::call`] would take it for dead each time.
    pub async fn call_optional(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, VaultError> {
        let token = self.token().await?;
        self.request(Some(&token), method, path, body).await
    }

    /// A valid token: the current one, renewed or replaced by a fresh login when due.
    pub async fn token(&self) -> Result<Arc<Token>, VaultError> {
        let mut session = self.session.lock().await;
        if let Some(current) = session.as_ref()
            && !current.due()
        {
            return Ok(current.token.clone());
        }
        if let Some(waiting) = self.retry_later() {
            return Err(waiting);
        }
        let fresh = match self.refresh(session.clone()).await {
            Ok(fresh) => fresh,
            Err(e) => {
                // While the current token is still valid it keeps signing, whatever
                // failed: Vault down or slow (retried shortly, instead of making every
                // request wait for Vault under this lock), or the login that replaces a
                // token that cannot be renewed (a batch token; retried less often, and
                // shown in meshca_backend_login_failing).
                if let Some(current) = session.as_mut()
                    && !current.expired()
                {
                    if e.is_transient() {
                        current.refresh_at = Some(Instant::now() + RENEW_RETRY);
                        tracing::warn!(error = %e, "cannot renew the Vault token now; retrying shortly");
                    } else {
                        current.refresh_at =
                            Some(current.until_it_ends(Instant::now() + LOGIN_RETRY));
                        self.login_failing
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        tracing::warn!(
                            error = %e,
                            remaining_seconds = current_lease_seconds(current),
                            "cannot log in to Vault for a fresh token; signing with the current one until it ends, and trying the login again"
                        );
                    }
                    return Ok(current.token.clone());
                }
                // No token left: a dead one is not renewed again, and the next try waits.
                *session = None;
                self.note_failed_refresh(&e);
                return Err(e);
            }
        };
        *self.failed_refresh_guard() = None;
        let token = fresh.token.clone();
        *session = Some(fresh);
        Ok(token)
    }

    /// A try for a token failed with none left: the next waits [`RENEW_RETRY`] (Vault
    /// down) or [`LOGIN_RETRY`] (refused).
    fn note_failed_refresh(&self, e: &VaultError) {
        let now = Instant::now();
        let wait = if e.is_transient() {
            RENEW_RETRY
        } else {
            LOGIN_RETRY
        };
        *self.failed_refresh_guard() = Some(FailedRefresh {
            at: now,
            retry_at: now + wait,
            message: e.to_string(),
        });
    }

    fn failed_refresh_guard(&self) -> std::sync::MutexGuard<'_, Option<FailedRefresh>> {
        self.failed_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn refused_logins_guard(&self) -> std::sync::MutexGuard<'_, RefusedLogins> {
        self.refused_logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The last failure to get a token, while its next try is not due yet.
    fn retry_later(&self) -> Option<VaultError> {
        let failed = self.failed_refresh_guard();
        let failed = failed.as_ref()?;
        let now = Instant::now();
        (now < failed.retry_at).then(|| VaultError::RetryLater {
            message: failed.message.clone(),
            failed_seconds_ago: now.duration_since(failed.at).as_secs(),
            retry_in_seconds: failed.retry_at.duration_since(now).as_secs().max(1),
        })
    }

    /// Logs in again, unless another request already replaced `stale`.
    async fn relogin(&self, stale: &Arc<Token>) -> Result<Arc<Token>, VaultError> {
        let mut session = self.session.lock().await;
        if let Some(current) = session.as_ref()
            && !Arc::ptr_eq(&current.token, stale)
        {
            return Ok(current.token.clone());
        }
        if let Some(waiting) = self.retry_later() {
            return Err(waiting);
        }
        let fresh = match self.login().await {
            Ok(fresh) => fresh,
            Err(e) => {
                // The stale token is dead (Vault said so): it is not offered again.
                *session = None;
                self.note_failed_refresh(&e);
                return Err(e);
            }
        };
        *self.failed_refresh_guard() = None;
        let token = fresh.token.clone();
        *session = Some(fresh);
        Ok(token)
    }

    /// Renews the current token if it can be renewed, else logs in. A token renewed near
    /// its max TTL is replaced by a fresh login, or kept while that login fails (its
    /// remaining lease still signs; the next refresh tries the login again).
    async fn refresh(&self, current: Option<Session>) -> Result<Session, VaultError> {
        // A token from a file that cannot be renewed (a batch token) is replaced by the
        // next one put there; reading the same one again and again would look like a
        // login each time, hide that nothing will replace it, and meet its end unwarned.
        if let (Some(current), VaultAuth::Token(source)) = (&current, &self.settings.auth)
            && !current.renewable
        {
            return self
                .replacement_token(source, current, "cannot be renewed")
                .await;
        }
        if let Some(current) = current
            && current.renewable
        {
            match self.renew(&current).await {
                Ok(Renewal::Enough(renewed)) => {
                    // A token renewed for long enough no longer hangs on a login that
                    // failed before (a renewal refused during a failover, say).
                    self.login_failing
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    return Ok(renewed);
                }
                Ok(Renewal::NearMaxTtl(renewed)) => {
                    let login = match &self.settings.auth {
                        VaultAuth::Token(source) => {
                            self.replacement_token(source, &renewed, "nears its max TTL")
                                .await
                        }
                        _ => self.login().await,
                    };
                    self.login_failing
                        .store(login.is_err(), std::sync::atomic::Ordering::SeqCst);
                    return match login {
                        Ok(fresh) => Ok(fresh),
                        Err(e) => {
                            tracing::warn!(
                                error = %e,
                                remaining_seconds = current_lease_seconds(&renewed),
                                retry_in_seconds = LOGIN_RETRY.as_secs(),
                                "cannot log in to Vault for a fresh token; signing with the renewed one until it ends, and trying the login again"
                            );
                            Ok(renewed.retrying_login_from(Instant::now()))
                        }
                    };
                }
                // Vault is down: keep the token (it may well still be valid) and retry.
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "Vault refused to renew the token; logging in again")
                }
            }
        }
        self.login().await
    }

    /// The token method's fresh login, for a token near its max TTL or one that cannot be
    /// renewed (`why`): the one in `token_file` (or `token_env`) once it is not the one in
    /// use. Until someone puts a new token there this fails, so
    /// `meshca_backend_login_failing` says so while the token in use still signs (before,
    /// nothing did until it ended).
    async fn replacement_token(
        &self,
        source: &crate::secret::SecretSource,
        current: &Session,
        why: &str,
    ) -> Result<Session, VaultError> {
        if source.read()?.expose() == current.token.secret.expose() {
            return Err(VaultError::Login {
                method: "token",
                message: format!(
                    "{source} still holds the token in use, which {why}: put a new token there before it ends"
                ),
            });
        }
        self.login().await
    }

    /// The renewed token, and whether its lease is too short to be worth keeping when a
    /// fresh login can do better.
    async fn renew(&self, current: &Session) -> Result<Renewal, VaultError> {
        let info = vaultrs::token::renew_self(&current.token.vaultrs, None)
            .await
            .map_err(|e| self.vaultrs_error("POST auth/token/renew-self", e))?;
        let lease = Duration::from_secs(info.lease_duration);
        let renewed = Session::renewed(current, lease, info.renewable);
        if lease < current.issued_lease / 2 {
            let fresh = match self.settings.auth {
                VaultAuth::Token(_) => "reading its file again for a new one",
                _ => "logging in for a fresh one",
            };
            tracing::info!(
                lease_seconds = info.lease_duration,
                "Vault token is nearing its max TTL; {fresh}"
            );
            return Ok(Renewal::NearMaxTtl(renewed));
        }
        tracing::debug!(lease_seconds = info.lease_duration, "renewed Vault token");
        Ok(Renewal::Enough(renewed))
    }

    /// Reads now, without asking Vault, what building the client and a login read: the CA
    /// file and the auth method's credentials (`meshca serve --check`). Kept beside
    /// [`Self::login`] so the two read the same things.
    pub fn check_offline(settings: &VaultSettings) -> Result<(), VaultError> {
        VaultClient::new(settings)?;
        // Each secret is dropped (and wiped) as soon as it is read.
        match &settings.auth {
            VaultAuth::Token(source) => {
                source.read()?;
            }
            VaultAuth::AppRole {
                role_id, secret_id, ..
            } => {
                role_id.read()?;
                secret_id.read()?;
            }
            VaultAuth::Kubernetes { jwt_file, .. } => {
                read_jwt(jwt_file)?;
            }
        }
        Ok(())
    }

    /// Logs in with the configured method.
    async fn login(&self) -> Result<Session, VaultError> {
        let method = self.settings.auth.method();
        let login_error = |e: VaultError| match e {
            VaultError::Api {
                status, message, ..
            } if (400..500).contains(&status) => VaultError::LoginRefused {
                method,
                // Vault answers a locked-out AppRole login with a bare "permission denied",
                // and so it does a login to a mount it does not have (an emptied Vault).
                message: if let (403, VaultAuth::AppRole { mount, .. }) =
                    (status, &self.settings.auth)
                {
                    format!(
                        "Vault answered 403: {message} (the role may be locked out after refused logins: `bao read sys/locked-users` shows it, and `bao write -f sys/locked-users/<mount accessor>/unlock/<role ID>` lifts it once the credentials are mended; or this Vault has no AppRole auth at auth/{mount}, being {NOT_THIS_VAULT}: `bao auth list` shows its mounts)"
                    )
                } else {
                    format!("Vault answered {status}: {message}")
                },
            },
            other => other,
        };
        let session = match &self.settings.auth {
            VaultAuth::Token(source) => {
                let token = Arc::new(self.token_client(source.read()?)?);
                let info = vaultrs::token::lookup_self(&token.vaultrs)
                    .await
                    .map_err(|e| self.vaultrs_error("GET auth/token/lookup-self", e))
                    .map_err(|e| match e {
                        VaultError::Api { status: 403, .. } => VaultError::LoginRefused {
                            method,
                            message: format!(
                                "Vault refused the token from {source} (403): it has expired, was revoked or is wrong, or this Vault never issued it ({NOT_THIS_VAULT})"
                            ),
                        },
                        other => login_error(other),
                    })?;
                // A TTL of 0 is a token that never ends (a root token) only without an
                // end time; with one, it has ended.
                if info.ttl == 0 && info.expire_time.is_some() {
                    return Err(VaultError::LoginRefused {
                        method,
                        message: format!("the token from {source} has ended (its TTL is 0)"),
                    });
                }
                let lease = Duration::from_secs(info.ttl);
                Session::new(token, lease, info.renewable.unwrap_or(false), lease)
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let (role_id, secret_id) = (role_id.read()?, secret_id.read()?);
                let credentials = lockout::Credentials::of(&role_id, &secret_id);
                self.refused_logins_guard()
                    .may_send(credentials, Instant::now())
                    .map_err(VaultError::LoginHeld)?;
                let anonymous = self.anonymous_client();
                let answer = vaultrs::auth::approle::login(
                    &anonymous,
                    mount,
                    role_id.expose(),
                    secret_id.expose(),
                )
                .await
                .map_err(|e| self.vaultrs_error(&format!("POST auth/{mount}/login"), e))
                .map_err(login_error);
                let mut refused_logins = self.refused_logins_guard();
                match &answer {
                    Ok(_) => refused_logins.accepted(),
                    Err(VaultError::LoginRefused { .. }) => {
                        refused_logins.refused(credentials, Instant::now())
                    }
                    // Vault down or slow: nothing was refused.
                    Err(_) => {}
                }
                drop(refused_logins);
                self.session_from(answer?)?
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_jwt(jwt_file)?;
                let anonymous = self.anonymous_client();
                let info = vaultrs::auth::kubernetes::login(&anonymous, mount, role, jwt.expose())
                    .await
                    .map_err(|e| self.vaultrs_error(&format!("POST auth/{mount}/login"), e))
                    .map_err(login_error)?;
                self.session_from(info)?
            }
        };
        tracing::info!(
            method,
            lease_seconds = session.issued_lease.as_secs(),
            renewable = session.renewable,
            "logged in to Vault"
        );
        self.login_failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(session)
    }

    fn session_from(&self, info: vaultrs::api::AuthInfo) -> Result<Session, VaultError> {
        let lease = Duration::from_secs(info.lease_duration);
        let token = Arc::new(self.token_client(Secret::new(info.client_token))?);
        Ok(Session::new(token, lease, info.renewable, lease))
    }

    /// A vaultrs client on meshca's HTTP client that sends `secret`.
    fn token_client(&self, secret: Secret) -> Result<Token, VaultError> {
        // vaultrs puts the token in a header with unwrap(): refuse what a header cannot carry.
        if !secret.expose().bytes().all(|b| b.is_ascii_graphic()) {
            return Err(VaultError::Login {
                method: self.settings.auth.method(),
                message: "the Vault token contains characters a token cannot have".into(),
            });
        }
        let vaultrs = self.vaultrs_client(secret.expose());
        Ok(Token { secret, vaultrs })
    }

    fn anonymous_client(&self) -> vaultrs::client::VaultClient {
        self.vaultrs_client("")
    }

    /// Built field by field: vaultrs' settings builder would read VAULT_* environment
    /// variables (including the one that turns TLS verification off) and make its own TLS
    /// client.
    fn vaultrs_client(&self, token: &str) -> vaultrs::client::VaultClient {
        let settings = vaultrs::client::VaultClientSettings {
            address: self.settings.address.clone(),
            ca_certs: Vec::new(),
            identity: None,
            timeout: Some(self.settings.timeout),
            token: token.to_string(),
            verify: true,
            version: 1,
            wrapping: false,
            namespace: None,
            proxy: None,
        };
        vaultrs::client::VaultClient {
            http: rustify::clients::reqwest::Client {
                http: self.http.clone(),
                base: settings.address.to_string(),
            },
            middle: vaultrs::api::EndpointMiddleware {
                token: token.to_string(),
                version: "v1".into(),
                wrap: None,
                namespace: None,
            },
            settings,
        }
    }

    /// One JSON request. `token` is sent as X-Vault-Token (marked sensitive).
    async fn request(
        &self,
        token: Option<&Token>,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, VaultError> {
        let what = format!("{method} {path}");
        let mut request = self
            .http
            .request(method.clone(), format!("{}/v1/{path}", self.base));
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(token.secret.expose())
                .map_err(|_| VaultError::Setup("the Vault token is not a valid header".into()))?;
            value.set_sensitive(true);
            request = request.header("X-Vault-Token", value);
        }
        if let Some(body) = body {
            let content_type = if method == Method::PATCH {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            request = request
                .header(CONTENT_TYPE, content_type)
                .body(serde_json::to_vec(body).map_err(|e| VaultError::Setup(e.to_string()))?);
        }
        let mut response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status().as_u16();
        if response.status().is_redirection() {
            return Err(redirected(what, &response));
        }
        let bytes = match crate::http_answer::body_up_to(&mut response, MAX_ANSWER).await {
            Ok(bytes) => bytes,
            Err(BodyError::Transport(e)) => return Err(self.transport_error(&e)),
            Err(BodyError::TooLarge) => {
                return Err(VaultError::Protocol {
                    what,
                    message: format!("the answer is larger than {} KiB", MAX_ANSWER / 1024),
                });
            }
        };
        if (200..300).contains(&status) {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| VaultError::Protocol {
                what,
                message: format!("not JSON: {e}"),
            });
        }
        let errors = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("errors").cloned())
            .and_then(|e| serde_json::from_value::<Vec<String>>(e).ok())
            .unwrap_or_default();
        Err(self.api_error(status, what, errors))
    }

    fn api_error(&self, status: u16, what: String, errors: Vec<String>) -> VaultError {
        if (300..400).contains(&status) {
            // Through vaultrs (logins, token calls), which does not hand over the Location.
            return VaultError::Redirected {
                what,
                status,
                location: None,
            };
        }
        let message = clean_errors(&errors);
        if status == 503 && message.contains("sealed") {
            return VaultError::Sealed {
                address: self.base.clone(),
            };
        }
        VaultError::Api {
            status,
            what,
            message: if message.is_empty() {
                "no error message".into()
            } else {
                message
            },
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> VaultError {
        if e.is_timeout() {
            return VaultError::Timeout {
                address: self.base.clone(),
                seconds: self.settings.timeout.as_secs(),
            };
        }
        // The innermost cause says what happened ("Connection refused", a TLS alert).
        let mut detail = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            detail = cause.to_string();
            source = cause.source();
        }
        VaultError::Unreachable {
            address: self.base.clone(),
            detail,
        }
    }

    fn vaultrs_error(&self, what: &str, e: vaultrs::error::ClientError) -> VaultError {
        if let vaultrs::error::ClientError::APIError { code, errors } = &e {
            return self.api_error(*code, what.to_string(), errors.clone());
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(cause) = source {
            if let Some(reqwest_error) = cause.downcast_ref::<reqwest::Error>() {
                return self.transport_error(reqwest_error);
            }
            if let Some(rustify::errors::ClientError::ServerResponseError { code, .. }) =
                cause.downcast_ref::<rustify::errors::ClientError>()
            {
                return self.api_error(*code, what.to_string(), Vec::new());
            }
            source = cause.source();
        }
        VaultError::Protocol {
            what: what.to_string(),
            message: e.to_string(),
        }
    }

    /// Revokes the token this client logged in for (AppRole, Kubernetes), so that a signer
    /// that stops, a start that fails after its login, or `serve --check --online` leaves
    /// no live credential behind until its TTL. A token from the config's file or
    /// environment is the operator's and is left alone.
    pub async fn logout(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if matches!(self.settings.auth, VaultAuth::Token(_)) {
            return;
        }
        let Some(session) = self.session.lock().await.take() else {
            return;
        };
        match vaultrs::token::revoke_self(&session.token.vaultrs).await {
            Ok(()) => tracing::info!("revoked the Vault token of this login"),
            Err(e) => tracing::warn!(
                error = %self.vaultrs_error("POST auth/token/revoke-self", e),
                "cannot revoke the Vault token of this login; it ends with its TTL"
            ),
        }
    }

    /// Keeps the token fresh in the background, so an idle signer's token does not run
    /// out. Stops when the client is dropped.
    pub fn spawn_renewal(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let wait = match weak.upgrade() {
                    Some(client) => client.until_refresh().await,
                    None => return,
                };
                tokio::time::sleep(wait).await;
                let Some(client) = weak.upgrade() else { return };
                if client.closed.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                match client.token().await {
                    Ok(_) => continue,
                    // Logged when that try failed; this is only its echo until the next.
                    Err(VaultError::RetryLater { .. }) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "keeping the Vault token fresh failed; retrying")
                    }
                }
                drop(client);
                tokio::time::sleep(RENEW_RETRY).await;
            }
        });
    }

    async fn until_refresh(&self) -> Duration {
        let session = self.session.lock().await;
        match session.as_ref() {
            Some(s) => s
                .refresh_at
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(RENEW_CHECK)
                .min(RENEW_CHECK),
            None => RENEW_RETRY,
        }
    }
}

/// Vault's error list as one line: "1 error occurred:\n\t* x\n\n" becomes "x".
fn clean_errors(errors: &[String]) -> String {
    errors
        .iter()
        .flat_map(|e| e.lines())
        .map(|line| line.trim().trim_start_matches('*').trim())
        // Drop blank lines and go-multierror's "N error(s) occurred:" header.
        .filter(|line| !line.is_empty() && !line.ends_with("occurred:"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The service account token. Kubernetes decides its file mode (often 0644), so unlike
/// other secrets it is not refused for being readable by others. Only a regular file is
/// opened (a FIFO's open would wait for a writer: the check and the login would hang), and
/// every copy of the token is wiped on drop.
fn read_jwt(jwt_file: &crate::secret::SecretFile) -> Result<Secret, VaultError> {
    use std::io::Read;
    let path = jwt_file.path.as_path();
    let login_error = |message: String| VaultError::Login {
        method: "kubernetes",
        message,
    };
    let unreadable = |e: std::io::Error| {
        login_error(format!(
            "cannot read the service account token from {}: {e}",
            jwt_file.shown()
        ))
    };
    let file = crate::fsutil::open_regular(path).map_err(unreadable)?;
    // Room for the whole token up front: a buffer grown while reading would leave the
    // token's first bytes in a freed allocation that nothing wipes.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_JWT as usize + 1));
    file.take(MAX_JWT + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_JWT {
        return Err(login_error(format!(
            "cannot read the service account token from {}: larger than {} KiB",
            jwt_file.shown(),
            MAX_JWT / 1024
        )));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| login_error(format!("{} is not a JWT", jwt_file.shown())))?;
    let jwt = text.trim();
    if jwt.is_empty() {
        return Err(login_error(format!("{} is empty", jwt_file.shown())));
    }
    Ok(Secret::new(jwt.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only an answer saying no, or a call never sent, clears a signing from the record:
    /// a call unanswered, garbled or failing inside Vault may have signed.
    #[test]
    fn only_a_refusal_or_a_call_not_sent_signed_nothing() {
        let api = |status| VaultError::Api {
            status,
            what: "sign".into(),
            message: "no".into(),
        };
        let address = || "https://vault:8200".to_string();
        for nothing in [
            api(400),
            api(403),
            VaultError::Denied {
                what: "sign".into(),
                message: "permission denied".into(),
            },
            VaultError::Sealed { address: address() },
        ] {
            assert!(nothing.signed_nothing(), "{nothing}");
        }
        for maybe in [
            api(500),
            VaultError::Timeout {
                address: address(),
                seconds: 10,
            },
            VaultError::Unreachable {
                address: address(),
                detail: "connection reset".into(),
            },
            VaultError::Protocol {
                what: "sign".into(),
                message: "not JSON".into(),
            },
        ] {
            assert!(!maybe.signed_nothing(), "{maybe}");
        }
    }

    #[test]
    fn vault_error_lists_read_as_one_line() {
        assert_eq!(
            clean_errors(&[
                "1 error occurred:\n\t* unable to find PKI issuer for reference: nope\n\n".into()
            ]),
            "unable to find PKI issuer for reference: nope"
        );
        assert_eq!(
            clean_errors(&["permission denied".into(), "other".into()]),
            "permission denied; other"
        );
    }

    /// Settings of a Vault nobody asks, logged in to by `auth`.
    fn offline_settings(auth: VaultAuth) -> VaultSettings {
        VaultSettings {
            address: reqwest::Url::parse("http://127.0.0.1:8200").unwrap(),
            ca_cert: None,
            mount: "pki".into(),
            issuer_ref: "root".into(),
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            auth,
        }
    }

    /// A client for a Vault nobody asks.
    fn offline_client() -> VaultClient {
        let auth = VaultAuth::Token(crate::secret::SecretSource::Env("X".into()));
        VaultClient::new(&offline_settings(auth)).unwrap()
    }

    #[test]
    fn a_lease_too_long_for_the_clock_never_ends_rather_than_panics() {
        let client = offline_client();
        let token = Arc::new(client.token_client(Secret::new("s.t".into())).unwrap());
        // A broken Vault answering lease_duration 2^64-1.
        let huge = Duration::from_secs(u64::MAX);
        let session = Session::new(token.clone(), huge, true, huge);
        assert!(!session.due() && !session.expired());
        let session = Session::new(token, Duration::from_secs(600), true, huge);
        assert!(!session.due() && !session.expired() && session.expires_at.is_some());
    }

    /// After a failed fresh login near the max TTL the next try waits LOGIN_RETRY, however
    /// short the renewed lease (renewals there halve it, and refreshing at half of it tried
    /// the login again within seconds, locking the AppRole out), or until the token ends,
    /// if that comes first: an ended token is not handed out until the retry.
    #[test]
    fn a_failed_fresh_login_is_tried_again_no_sooner_than_the_login_retry() {
        let client = offline_client();
        let token = Arc::new(client.token_client(Secret::new("s.t".into())).unwrap());
        let now = Instant::now();
        let renewed = Session::new(
            token.clone(),
            LOGIN_RETRY + Duration::from_secs(10),
            true,
            Duration::from_secs(3600),
        );
        let held = renewed.retrying_login_from(now);
        assert!(held.refresh_at.is_some_and(|at| at >= now + LOGIN_RETRY));
        assert!(held.refresh_at < held.expires_at);
        let short = Session::new(
            token.clone(),
            Duration::from_secs(6),
            true,
            Duration::from_secs(30),
        );
        let held = short.retrying_login_from(now);
        assert!(held.refresh_at.is_some() && held.refresh_at == held.expires_at);
        // A refresh already later than that is left as it is.
        let long = Session::new(
            token,
            Duration::from_secs(600),
            true,
            Duration::from_secs(3600),
        );
        let at = long.refresh_at;
        assert_eq!(long.retrying_login_from(now).refresh_at, at);
    }

    #[test]
    fn a_renewal_granting_no_time_ends_the_token_rather_than_making_it_eternal() {
        let client = offline_client();
        let token = Arc::new(client.token_client(Secret::new("s.t".into())).unwrap());
        let minutes = Duration::from_secs(600);
        let expiring = Session::new(token.clone(), minutes, true, minutes);
        let renewed = Session::renewed(&expiring, Duration::ZERO, true);
        assert!(renewed.due() && renewed.expired());
        // A token that never had an end (a root token) keeps never ending.
        let eternal = Session::new(token, Duration::ZERO, false, Duration::ZERO);
        let renewed = Session::renewed(&eternal, Duration::ZERO, false);
        assert!(!renewed.due() && !renewed.expired());
    }

    #[test]
    fn tokens_never_print() {
        let client = offline_client();
        let token = client
            .token_client(Secret::new("s.hunter2".into()))
            .unwrap();
        assert!(!format!("{token:?}").contains("hunter2"));
        assert!(
            client
                .token_client(Secret::new("bad\ntoken".into()))
                .is_err()
        );
    }

    /// A FIFO at `jwt_file` (a mistaken mount, a test harness) is refused before the open,
    /// which would wait for a writer and hang `serve --check` and the login.
    #[test]
    fn a_fifo_as_service_account_token_is_refused_unopened() {
        let dir = tempfile::tempdir().unwrap();
        let jwt_file = dir.path().join("token");
        let fifo = crate::fsutil::tests::FedFifo::new(&jwt_file, "eyJ.piped.jwt\n");
        let settings = offline_settings(VaultAuth::Kubernetes {
            mount: "kubernetes".into(),
            role: "meshca".into(),
            jwt_file: token_file(&jwt_file),
        });
        let err = VaultClient::check_offline(&settings)
            .unwrap_err()
            .to_string();
        drop(fifo);
        assert!(
            err.contains(&jwt_file.display().to_string())
                && err.contains("a FIFO (named pipe), not a regular file")
                && !err.contains("piped"),
            "{err}"
        );
    }

    #[test]
    fn a_service_account_token_is_read_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let jwt_file = dir.path().join("token");
        std::fs::write(&jwt_file, "eyJ.a.jwt\n").unwrap();
        assert_eq!(
            read_jwt(&token_file(&jwt_file)).unwrap().expose(),
            "eyJ.a.jwt"
        );
        std::fs::write(&jwt_file, vec![b'x'; MAX_JWT as usize + 1]).unwrap();
        let err = read_jwt(&token_file(&jwt_file)).unwrap_err().to_string();
        assert!(err.contains("larger than 64 KiB"), "{err}");
    }

    /// `vault.auth.jwt_file` as the config names it.
    fn token_file(path: &std::path::Path) -> crate::secret::SecretFile {
        crate::secret::SecretFile::new("vault.auth.jwt_file", path, path.to_path_buf())
    }

    /// A token pasted where its file's path belongs (a JWT has no '/') is not shown in
    /// the error, which names the setting.
    #[test]
    fn a_service_account_token_written_in_place_of_its_path_is_not_shown() {
        let dir = tempfile::tempdir().unwrap();
        let pasted = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtZXNoY2EifQ.c2lnbmF0dXJl";
        let jwt_file = crate::secret::SecretFile::new(
            "vault.auth.jwt_file",
            std::path::Path::new(pasted),
            dir.path().join(pasted),
        );
        let err = read_jwt(&jwt_file).unwrap_err().to_string();
        assert!(
            err.contains("vault.auth.jwt_file") && !err.contains(pasted),
            "{err}"
        );
    }
}
