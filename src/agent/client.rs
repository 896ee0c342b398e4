//! The signer's client: mTLS with the cluster's client certificate, the public policy,
//! and signing requests. Refusals carry the signer's code and message unchanged; a request
//! whose connection closed before any answer is sent once more on a new connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::rotation::{
    AnnouncedRoots, NotTaken, RootPin, SignerRoot, TrustedRoots, normalize_fingerprint,
    take_announced,
};
use crate::pki::profile::RootCa;
use crate::policy::ObjectRef;
use crate::tlsutil::Validity;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the signer at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("the signer refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        /// The answer's `Retry-After` (either form, as a wait from now), when it had one.
        retry_after: Option<Duration>,
    },
    #[error("the signer's answer is not what meshca expects: {0}")]
    BadResponse(String),
    #[error(
        "the signer would refuse to renew: its grants do not let this client ask for mesh {mesh} of virtual mesh {virtual_mesh} (it may ask for {authorized}); grant it on the signer (a [[clients]] entry) or correct the mesh here"
    )]
    NotAuthorized {
        virtual_mesh: String,
        mesh: String,
        authorized: String,
    },
}

impl ClientError {
    /// Whether asking again later may succeed without anyone acting: no answer, or the
    /// signer (or a proxy in front of it) failing or busy (5xx, 429). A refusal (4xx) or
    /// an answer meshca cannot use needs someone to change something.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Refused { status, .. } => *status >= 500 || *status == 429,
            ClientError::Config(_)
            | ClientError::BadResponse(_)
            | ClientError::NotAuthorized { .. } => false,
        }
    }

    /// How long the signer (or a proxy in front of it) asked to be left alone: the
    /// `Retry-After` of a 429 or 503. The agents wait at least that long, up to `max` (a
    /// signer's word must not park an agent past its resync interval).
    pub fn retry_after(&self, max: Duration) -> Option<Duration> {
        match self {
            ClientError::Refused {
                status: 429 | 503,
                retry_after: Some(wait),
                ..
            } => Some((*wait).min(max)),
            _ => None,
        }
    }
}

/// `GET /v1/virtualmeshes/<ns>/<name>`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PublicPolicy {
    pub virtual_mesh: String,
    #[serde(default)]
    pub display_name: Option<String>,
    pub org_name: String,
    pub max_ttl_seconds: u64,
    pub min_rsa_bits: u32,
    pub accepted_key_types: Vec<String>,
    pub meshes: Vec<String>,
    pub root_not_after: String,
    /// SHA-256 of the signer's current root: the agent compares it with the installed
    /// bundle's to notice a root change.
    #[serde(default)]
    pub root_fingerprint_sha256: Option<String>,
    /// That root's certificate (PEM), checked against the fingerprint when the policy is
    /// read: at first install, the key that must vouch for the roots the signer announces.
    #[serde(default)]
    root_cert: Option<String>,
    /// SHA-256 of the root the signer announces as its next one, ahead of a root change.
    #[serde(default)]
    pub next_root_fingerprint_sha256: Option<String>,
    /// That root's certificate (PEM): checked against the fingerprint when the policy is
    /// read (see [`SignerClient::policy`]).
    #[serde(default)]
    next_root_cert: Option<String>,
    /// The current root key's cross certificate for it (PEM): its word for that root.
    #[serde(default)]
    next_root_cross_cert: Option<String>,
    /// SHA-256 of the root the signer switched from, announced until it is retired.
    #[serde(default)]
    pub previous_root_fingerprint_sha256: Option<String>,
    /// That root's certificate (PEM), checked as the next root's.
    #[serde(default)]
    previous_root_cert: Option<String>,
    /// The current root key's cross certificate for it (PEM).
    #[serde(default)]
    previous_root_cross_cert: Option<String>,
    /// The meshes of this virtual mesh the asking client may request (absent from a
    /// signer older than this field: nothing to check then).
    #[serde(default)]
    pub authorized_meshes: Option<Vec<String>>,
}

impl PublicPolicy {
    /// The signer's side of a pass's desired state: the SHA-256 of the root it issues
    /// under and the roots it announces besides it (checked when the policy was read);
    /// neither when the signer could not be asked.
    pub fn signer_roots(policy: Option<&PublicPolicy>) -> (Option<String>, AnnouncedRoots) {
        match policy {
            Some(policy) => (
                policy.root_fingerprint_sha256.clone(),
                policy.announced_roots(),
            ),
            None => (None, AnnouncedRoots::default()),
        }
    }

    /// When the signer's root ends (`rootNotAfter`, RFC 3339), if the policy says.
    pub fn root_end(policy: Option<&PublicPolicy>) -> Option<SystemTime> {
        policy?
            .root_not_after
            .parse::<k8s_openapi::jiff::Timestamp>()
            .ok()
            .map(SystemTime::from)
    }

    /// Whether the signer's grants let this client ask for `mesh`: a pass that does not
    /// sign would otherwise find out only when the renewal is refused, months later.
    pub fn check_authorized(&self, mesh: &ObjectRef) -> Result<(), ClientError> {
        let Some(authorized) = &self.authorized_meshes else {
            return Ok(());
        };
        let mesh = mesh.to_string();
        if authorized.contains(&mesh) {
            return Ok(());
        }
        Err(ClientError::NotAuthorized {
            virtual_mesh: self.virtual_mesh.clone(),
            mesh,
            authorized: if authorized.is_empty() {
                "nothing".into()
            } else {
                authorized.join(", ")
            },
        })
    }

    /// The roots the signer announces besides its own (checked when the policy was read).
    pub fn announced_roots(&self) -> AnnouncedRoots {
        AnnouncedRoots {
            next: self.next_root_cert.clone(),
            previous: self.previous_root_cert.clone(),
        }
    }

    /// The signer's own root as the policy names it (its certificate checked when the
    /// policy was read).
    fn signer_root_certificate(&self) -> Option<x509_cert::Certificate> {
        crate::pki::pem::decode_certificates(self.root_cert.as_deref()?)
            .ok()?
            .into_iter()
            .next()
    }

    /// Forgets each announced root (next, previous) the agent does not take
    /// ([`take_announced`]: with `pin` set, one it does not list; without, one that no root
    /// in `trusted` vouches for), as if the signer had not announced it: it is never
    /// written to root-cert.pem, nor reported as trusted. Returns what was dropped, for the
    /// caller to warn of.
    pub fn drop_untaken_roots(
        &mut self,
        pin: &RootPin,
        trusted: &TrustedRoots,
    ) -> Vec<UnacceptedRoot> {
        let signer_cert = self.signer_root_certificate();
        let signer = SignerRoot {
            fingerprint: self.root_fingerprint_sha256.as_deref(),
            certificate: signer_cert.as_ref(),
        };
        let mut verdicts = Vec::new();
        for (cert, cross) in [
            (&self.next_root_cert, &self.next_root_cross_cert),
            (&self.previous_root_cert, &self.previous_root_cross_cert),
        ] {
            let verdict = cert.as_deref().map(|pem| {
                let announced = crate::pki::pem::decode_certificates(pem)
                    .ok()
                    .and_then(|certs| certs.into_iter().next());
                match announced {
                    Some(announced) => {
                        take_announced(pin, trusted, signer, &announced, cross.as_deref())
                            .map_err(|why| (why, announced.tbs_certificate().subject().to_string()))
                    }
                    None => Err((
                        NotTaken::NotCrossSigned("its certificate cannot be read".into()),
                        String::new(),
                    )),
                }
            });
            verdicts.push(verdict);
        }
        let mut dropped = Vec::new();
        for ((which, cert, fingerprint, cross), verdict) in [
            (
                "next",
                &mut self.next_root_cert,
                &mut self.next_root_fingerprint_sha256,
                &mut self.next_root_cross_cert,
            ),
            (
                "previous",
                &mut self.previous_root_cert,
                &mut self.previous_root_fingerprint_sha256,
                &mut self.previous_root_cross_cert,
            ),
        ]
        .into_iter()
        .zip(verdicts)
        {
            let Some(Err((why, subject))) = verdict else {
                continue;
            };
            dropped.push(UnacceptedRoot {
                which,
                fingerprint: fingerprint
                    .as_deref()
                    .map(normalize_fingerprint)
                    .unwrap_or_default(),
                subject,
                why,
            });
            *cert = None;
            *fingerprint = None;
            *cross = None;
        }
        dropped
    }

    /// Each announced root must be what its fingerprint says, one self-signed CA
    /// certificate: the agent trusts it and reports the fingerprint, so the two must not
    /// differ.
    pub(crate) fn check_announced_roots(&self) -> Result<(), ClientError> {
        if let Some(pem) = &self.root_cert {
            let bad = |problem: String| {
                ClientError::BadResponse(format!(
                    "the root of virtual mesh {}: {problem}",
                    self.virtual_mesh
                ))
            };
            let root = RootCa::from_pem(pem).map_err(|e| bad(e.to_string()))?;
            match &self.root_fingerprint_sha256 {
                Some(named) if normalize_fingerprint(named) == root.fingerprint_sha256 => {}
                named => {
                    return Err(bad(format!(
                        "named as sha256 {}, the certificate is {}",
                        named.as_deref().unwrap_or("(none)"),
                        root.fingerprint_sha256
                    )));
                }
            }
        }
        let announced = [
            (
                "next",
                &self.next_root_cert,
                &self.next_root_fingerprint_sha256,
            ),
            (
                "previous",
                &self.previous_root_cert,
                &self.previous_root_fingerprint_sha256,
            ),
        ];
        for (which, cert, fingerprint) in announced {
            let bad = |problem: String| {
                ClientError::BadResponse(format!(
                    "the {which} root of virtual mesh {}: {problem}",
                    self.virtual_mesh
                ))
            };
            match (cert, fingerprint) {
                (None, None) => {}
                (Some(pem), Some(announced)) => {
                    let root = RootCa::from_pem(pem).map_err(|e| bad(e.to_string()))?;
                    if normalize_fingerprint(announced) != root.fingerprint_sha256 {
                        return Err(bad(format!(
                            "announced as sha256 {announced}, the certificate is {}",
                            root.fingerprint_sha256
                        )));
                    }
                }
                _ => {
                    return Err(bad(
                        "the fingerprint and the certificate must come together".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A root the signer announced that the agent does not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnacceptedRoot {
    /// "next" or "previous".
    pub which: &'static str,
    pub fingerprint: String,
    pub subject: String,
    pub why: NotTaken,
}

/// `POST /v1/sign` request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignRequestBody {
    pub virtual_mesh: String,
    pub mesh: String,
    pub csr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// `POST /v1/sign` answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResponse {
    pub certificate: String,
    pub cert_chain: String,
    pub root_cert: String,
    pub serial: String,
    pub not_after: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// Checks a signer's base URL (`https://host[:port]`, a path prefix allowed): what is
/// wrong with it, if anything.
pub fn check_signer_url(url: &str) -> Result<(), String> {
    const EXAMPLE: &str = "e.g. https://signer.example:8443";
    if !url.starts_with("https://") {
        return Err(format!("must start with https:// ({EXAMPLE})"));
    }
    match reqwest::Url::parse(url) {
        Ok(parsed) if parsed.query().is_some() || parsed.fragment().is_some() => Err(format!(
            "a base URL has no query or fragment: meshca appends the API's paths ({EXAMPLE})"
        )),
        Ok(parsed) if parsed.host_str().is_some_and(|host| !host.is_empty()) => Ok(()),
        Ok(_) => Err(format!("names no host ({EXAMPLE})")),
        Err(e) => Err(format!("not a URL: {e} ({EXAMPLE})")),
    }
}

/// Where a signer is, and the files that verify it and identify us to it. A long-running
/// agent connects anew for each pass, so certificates rotated on disk (cert-manager,
/// SPIRE, a cron job) are used from the next pass without a restart.
#[derive(Clone, Debug)]
pub struct SignerEndpoint {
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl SignerEndpoint {
    /// Reads the files as they are now and builds a client from them.
    pub fn connect(&self) -> Result<SignerClient, ClientError> {
        SignerClient::new(&self.url, &self.ca, &self.cert, &self.key)
    }
}

/// Whether the signer answered the last request a client sent (what
/// `meshca_agent_signer_reachable` reports): an agent whose installed intermediate is
/// valid and not due passes without the signer, so this is how a cluster cut off from
/// it is noticed before a renewal is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignerContact {
    /// Nothing sent (the pass failed before asking).
    #[default]
    NotAsked,
    /// An HTTP answer came, whatever its status.
    Answered,
    /// No answer: the connection or the handshake failed, or it timed out.
    Unreachable,
}

/// The [`SignerContact`] of a client's last request, and the error when there was no
/// answer, readable by whoever reports them after the client is gone.
#[derive(Clone, Debug, Default)]
pub struct ContactRecord(Arc<Mutex<(SignerContact, Option<String>)>>);

impl ContactRecord {
    fn record(&self, contact: SignerContact, error: Option<String>) {
        *self.lock() = (contact, error);
    }

    pub fn last(&self) -> SignerContact {
        self.lock().0
    }

    /// Why the last request got no answer, if it did not.
    pub fn last_error(&self) -> Option<String> {
        self.lock().1.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (SignerContact, Option<String>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection to one signer.
#[derive(Clone)]
pub struct SignerClient {
    http: reqwest::Client,
    base: String,
    client_certificate: Validity,
    key_readable_by_others: Option<crate::tlsutil::KeyReadableByOthers>,
    contact: ContactRecord,
}

impl SignerClient {
    /// `base` is `https://host:port`; `ca` verifies the signer, `cert`/`key` identify us.
    pub fn new(base: &str, ca: &Path, cert: &Path, key: &Path) -> Result<Self, ClientError> {
        check_signer_url(base)
            .map_err(|problem| ClientError::Config(format!("signer URL {base:?}: {problem}")))?;
        let tls = crate::tlsutil::client_tls(ca, cert, key)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.config)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Config(format!("HTTP client: {e}")))?;
        Ok(SignerClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            client_certificate: tls.certificate,
            key_readable_by_others: tls.key_readable_by_others,
            contact: ContactRecord::default(),
        })
    }

    /// When the client certificate this client presents begins and expires: after its end
    /// the signer refuses the handshake, and nothing can be renewed.
    pub fn client_certificate(&self) -> Validity {
        self.client_certificate
    }

    /// Set if other users can read the client key this client presents.
    pub fn key_readable_by_others(&self) -> Option<&crate::tlsutil::KeyReadableByOthers> {
        self.key_readable_by_others.as_ref()
    }

    /// Whether the signer answered this client's last request.
    pub fn contact(&self) -> ContactRecord {
        self.contact.clone()
    }

    /// `GET {base}{path}`; a failure to get any answer is a transport error.
    async fn get(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        self.recorded(send(&url, || self.http.get(&url)).await)
    }

    /// `sent`, its outcome recorded: any answer, or none (only a transport error).
    fn recorded(
        &self,
        sent: Result<reqwest::Response, ClientError>,
    ) -> Result<reqwest::Response, ClientError> {
        match &sent {
            Ok(_) => self.contact.record(SignerContact::Answered, None),
            Err(e) => self
                .contact
                .record(SignerContact::Unreachable, Some(e.to_string())),
        }
        sent
    }

    pub async fn policy(&self, virtual_mesh: &ObjectRef) -> Result<PublicPolicy, ClientError> {
        let path = format!(
            "/v1/virtualmeshes/{}/{}",
            virtual_mesh.namespace, virtual_mesh.name
        );
        let policy: PublicPolicy = decode(self.get(&path).await?).await?;
        policy.check_announced_roots()?;
        Ok(policy)
    }

    /// The policy a pass goes by. `Ok(Err(e))`: the signer is unavailable (no answer, or
    /// failing or busy: [`ClientError::is_transient`]), which a pass waits out while the
    /// installed bundle is valid. `Err(e)`: it refused (an unknown virtual mesh, say) or
    /// answered what meshca cannot use, which needs someone to act: the pass fails now
    /// rather than when a renewal is due.
    pub async fn policy_for_pass(
        &self,
        virtual_mesh: &ObjectRef,
    ) -> Result<Result<PublicPolicy, ClientError>, ClientError> {
        match self.policy(virtual_mesh).await {
            Err(e) if !e.is_transient() => Err(e),
            policy => Ok(policy),
        }
    }

    pub async fn sign(&self, body: &SignRequestBody) -> Result<SignResponse, ClientError> {
        let url = format!("{}/v1/sign", self.base);
        // Sent again only when no answer came: at worst the signer issues (and audits) an
        // intermediate nobody received, which is harmless; a lost pass is not.
        decode(self.recorded(send(&url, || self.http.post(&url).json(body)).await)?).await
    }

    pub async fn trust_bundle(&self) -> Result<String, ClientError> {
        let response = self.get("/v1/trust-bundle").await?;
        if !response.status().is_success() {
            return Err(refusal(response).await);
        }
        String::from_utf8(body_of(response).await?)
            .map_err(|_| ClientError::BadResponse("the trust bundle is not UTF-8".into()))
    }
}

/// Largest answer read from the signer: its answers are a few kilobytes (a chain, the
/// roots). A proxy in front of it, or a broken one, sending more, or a body that never
/// ends, fails the call instead of filling the agent's memory within the timeout.
const MAX_SIGNER_ANSWER: usize = 4 * 1024 * 1024;

/// The answer's body, up to [`MAX_SIGNER_ANSWER`].
async fn body_of(mut response: reqwest::Response) -> Result<Vec<u8>, ClientError> {
    use crate::http_answer::{BodyError, body_up_to};
    let url = response.url().to_string();
    body_up_to(&mut response, MAX_SIGNER_ANSWER)
        .await
        .map_err(|e| match e {
            // The connection cut while the answer came (the signer restarting, a load
            // balancer's idle timeout): a transport error, tried again, not a bad answer.
            BodyError::Transport(e) => transport(&url, e),
            BodyError::TooLarge => ClientError::BadResponse(format!(
                "the answer is larger than {} MiB",
                MAX_SIGNER_ANSWER / (1024 * 1024)
            )),
        })
}

/// Sends the request `build` makes, and once more on a new connection when the first
/// closed before any answer. The signer closes its kept-alive connections when its TLS
/// settings change (a rotated certificate, a new CRL); a request sent at that moment is
/// never read, and without the second try the agent would lose a whole pass to it. A
/// signer that cannot be reached or does not answer in time is not tried again here: the
/// agents' own backoff handles that.
async fn send(
    url: &str,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, ClientError> {
    match build().send().await {
        Err(e) if closed_before_answer(&e) => {
            tracing::debug!(
                url,
                error = %transport(url, e),
                "the connection closed before the signer answered; sending once more"
            );
            build().send().await.map_err(|e| transport(url, e))
        }
        other => other.map_err(|e| transport(url, e)),
    }
}

/// The connection ended under a sent request before any answer: hyper's "connection
/// closed before message completed", or the socket reset or cut short under it.
fn closed_before_answer(e: &reqwest::Error) -> bool {
    if e.is_connect() || e.is_timeout() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>()
            && hyper_error.is_incomplete_message()
        {
            return true;
        }
        if let Some(io_error) = cause.downcast_ref::<std::io::Error>()
            && matches!(
                io_error.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn transport(url: &str, e: reqwest::Error) -> ClientError {
    // reqwest's Display hides the cause (TLS alert, refused connection): walk the chain.
    // The URL is said once, by this error, not again by reqwest's.
    let e = e.without_url();
    let mut message = crate::logging::with_causes(&e);
    if let Some(hint) = clock_hint(&e) {
        message = format!("{message}; {hint}");
    }
    ClientError::Transport {
        url: url.to_string(),
        message,
    }
}

/// What the dates of the signer's certificate, refused in the handshake, say about this
/// machine's clock: "cannot reach the signer" alone sends an operator to the network.
fn clock_hint(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as Cert;
    match tls_error(e)? {
        rustls::Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            Some(
                "the signer's certificate is not valid yet by this machine's clock: if it was issued just now, this clock is behind the signer's (check time synchronisation)",
            )
        }
        rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => Some(
            "the signer's certificate has expired by this machine's clock: renew it on the signer, or, if it is still valid there, this clock is ahead (check time synchronisation)",
        ),
        // tlsutil::WallClock gives rustls no time before 1970.
        rustls::Error::FailedToGetCurrentTime => Some(
            "this machine's clock reads before 1970: no certificate can be checked; set the clock right (check time synchronisation)",
        ),
        _ => None,
    }
}

/// The rustls error under `e`, if one is. An io::Error's `source` skips the error it
/// wraps (and wrappers nest), so each is looked into as well as followed.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
        && let Some(tls) = tls_error(inner)
    {
        return Some(tls);
    }
    tls_error(e.source()?)
}

async fn refusal(response: reqwest::Response) -> ClientError {
    let status = response.status().as_u16();
    let retry_after = retry_after_header(response.headers());
    let body = body_of(response).await.ok();
    match body.and_then(|body| serde_json::from_slice::<ErrorBody>(&body).ok()) {
        Some(body) => ClientError::Refused {
            status,
            code: body.error.code,
            message: body.error.message,
            retry_after,
        },
        None => ClientError::Refused {
            status,
            code: "unknown".into(),
            message: "the signer answered with an error but no error body".into(),
            retry_after,
        },
    }
}

/// `Retry-After` in either of its forms: seconds (what the signer sends) or an HTTP-date
/// (what a proxy or load balancer in front of it may send), the latter as the time from
/// now, zero once past. Anything else counts as absent: the agent's own backoff applies.
fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

async fn decode<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, ClientError> {
    if !response.status().is_success() {
        return Err(refusal(response).await);
    }
    serde_json::from_slice(&body_of(response).await?)
        .map_err(|e| ClientError::BadResponse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::keys::KeyType;
    use crate::pki::profile::RootCa;
    use crate::pki::testing::{software_bundle, software_root};

    /// A handshake refused for the signer's certificate's dates names this clock as a
    /// suspect, found through the io::Error that carries rustls' error.
    #[test]
    fn a_signer_certificate_refused_for_its_dates_names_the_clock() {
        use rustls::CertificateError as Cert;
        let wrapped = |e: Cert| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(e),
            )
        };
        let hint = |e: std::io::Error| clock_hint(&e).unwrap_or_default();
        assert!(hint(wrapped(Cert::NotValidYet)).contains("this clock is behind"));
        assert!(hint(wrapped(Cert::Expired)).contains("this clock is ahead"));
        let before_1970 = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::FailedToGetCurrentTime,
        ));
        assert!(clock_hint(&before_1970).is_some_and(|h| h.contains("before 1970")));
        assert!(clock_hint(&wrapped(Cert::UnknownIssuer)).is_none());
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert!(clock_hint(&refused).is_none());
    }

    #[test]
    fn only_no_answer_or_a_failing_or_busy_signer_is_waited_out() {
        let refused = |status| ClientError::Refused {
            status,
            code: "x".into(),
            message: "y".into(),
            retry_after: None,
        };
        let transport = ClientError::Transport {
            url: "https://signer".into(),
            message: "connection refused".into(),
        };
        for transient in [transport, refused(503), refused(500), refused(429)] {
            assert!(transient.is_transient(), "{transient}");
        }
        for lasting in [
            refused(404),
            refused(403),
            ClientError::BadResponse("fingerprint".into()),
            ClientError::Config("url".into()),
        ] {
            assert!(!lasting.is_transient(), "{lasting}");
        }
    }

    /// An answer past MAX_SIGNER_ANSWER fails by name, whether a success or a refusal;
    /// one at the bound is read.
    #[tokio::test]
    async fn an_answer_larger_than_the_bound_is_refused_by_name() {
        let answer = |status: u16, body: Vec<u8>| {
            reqwest::Response::from(
                axum::http::Response::builder()
                    .status(status)
                    .body(body)
                    .unwrap(),
            )
        };
        let mut json = b"[\"".to_vec();
        json.resize(MAX_SIGNER_ANSWER - 1, b'a');
        json.push(b'"');
        json.push(b']');
        let over = decode::<Vec<String>>(answer(200, json.clone())).await;
        assert!(
            matches!(&over, Err(ClientError::BadResponse(m)) if m == "the answer is larger than 4 MiB"),
            "{over:?}"
        );
        json.truncate(MAX_SIGNER_ANSWER - 2);
        json.extend_from_slice(b"\"]");
        let read = decode::<Vec<String>>(answer(200, json)).await.unwrap();
        assert_eq!(read[0].len(), MAX_SIGNER_ANSWER - 4);
        // A refusal whose body is too large is still a refusal, without its message.
        let refused = decode::<Vec<String>>(answer(503, vec![b' '; MAX_SIGNER_ANSWER + 1])).await;
        assert!(
            matches!(&refused, Err(ClientError::Refused { status: 503, code, .. }) if code == "unknown"),
            "{refused:?}"
        );
    }

    /// The connection cut while the answer's body comes (the signer restarting, a load
    /// balancer's idle timeout) is a transport error, naming the URL and the cause, and
    /// tried again; before, it was a "bad answer", which fails the pass for good.
    #[tokio::test]
    async fn an_answer_cut_short_is_a_transport_error_tried_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/trust-bundle", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut connection, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = connection.read(&mut request).await;
            connection
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[\"part")
                .await
                .unwrap();
        });
        crate::tlsutil::install_default_provider();
        let response = reqwest::get(&url).await.unwrap();
        server.await.unwrap();
        let cut = decode::<Vec<String>>(response).await.unwrap_err();
        assert!(cut.is_transient(), "{cut:?}");
        let said = cut.to_string();
        assert!(said.contains(&url), "{said}");
    }

    #[tokio::test]
    async fn a_busy_signers_retry_after_is_kept_up_to_the_bound() {
        let answer = |status: u16, retry_after: &str| {
            let response = axum::http::Response::builder()
                .status(status)
                .header("retry-after", retry_after)
                .body(r#"{"error":{"code":"rate_limited","message":"slow down"}}"#)
                .unwrap();
            super::refusal(reqwest::Response::from(response))
        };
        let max = Duration::from_secs(300);
        let busy = answer(429, "42").await;
        assert_eq!(busy.retry_after(max), Some(Duration::from_secs(42)));
        assert!(busy.to_string().contains("rate_limited"), "{busy}");
        assert_eq!(
            answer(503, " 7 ").await.retry_after(max),
            Some(Duration::from_secs(7))
        );
        assert_eq!(answer(429, "99999999").await.retry_after(max), Some(max));
        // The HTTP-date form (a proxy's), counted from now; a date gone by waits nothing
        // more than the agent's own backoff.
        let in_a_minute =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let wait = answer(503, &in_a_minute).await.retry_after(max).unwrap();
        assert!(
            (Duration::from_secs(30)..=Duration::from_secs(60)).contains(&wait),
            "{wait:?}"
        );
        assert_eq!(
            answer(503, "Wed, 21 Oct 2015 07:28:00 GMT")
                .await
                .retry_after(max),
            Some(Duration::ZERO)
        );
        // Nonsense leaves the agent's own backoff in charge; and only a busy answer is
        // waited out on the signer's word.
        for (status, value) in [(429, "-5"), (429, "soon"), (403, "60")] {
            assert_eq!(
                answer(status, value).await.retry_after(max),
                None,
                "{value}"
            );
        }
    }

    fn policy(fingerprint: Option<&str>, pem: Option<&str>) -> PublicPolicy {
        PublicPolicy {
            virtual_mesh: "test/vm".into(),
            display_name: None,
            org_name: "acme".into(),
            max_ttl_seconds: 86_400,
            min_rsa_bits: 2048,
            accepted_key_types: vec!["ecdsa-p256".into()],
            meshes: vec!["test/cluster-a".into()],
            root_not_after: "2030-01-01T00:00:00Z".into(),
            root_fingerprint_sha256: None,
            root_cert: None,
            next_root_fingerprint_sha256: fingerprint.map(String::from),
            next_root_cert: pem.map(String::from),
            next_root_cross_cert: None,
            previous_root_fingerprint_sha256: None,
            previous_root_cert: None,
            previous_root_cross_cert: None,
            authorized_meshes: None,
        }
    }

    #[test]
    fn a_mesh_the_signer_does_not_grant_this_client_is_named() {
        let a: ObjectRef = "test/cluster-a".parse().unwrap();
        let granted = |meshes: &[&str]| PublicPolicy {
            authorized_meshes: Some(meshes.iter().map(|m| m.to_string()).collect()),
            ..policy(None, None)
        };
        // A signer older than the field: nothing to check.
        assert!(policy(None, None).check_authorized(&a).is_ok());
        assert!(
            granted(&["test/cluster-b", "test/cluster-a"])
                .check_authorized(&a)
                .is_ok()
        );
        for (meshes, may) in [
            (&["test/cluster-b"][..], "test/cluster-b"),
            (&[][..], "nothing"),
        ] {
            let refused = granted(meshes).check_authorized(&a).unwrap_err();
            assert!(!refused.is_transient());
            assert!(
                refused.to_string().contains(&format!(
                    "ask for mesh test/cluster-a of virtual mesh test/vm (it may ask for {may})"
                )),
                "{refused}"
            );
        }
    }

    /// A policy announcing no next root and this previous one.
    fn with_previous(fingerprint: Option<&str>, pem: Option<&str>) -> PublicPolicy {
        PublicPolicy {
            previous_root_fingerprint_sha256: fingerprint.map(String::from),
            previous_root_cert: pem.map(String::from),
            ..policy(None, None)
        }
    }

    fn refusal(policy: &PublicPolicy) -> String {
        match policy.check_announced_roots() {
            Err(ClientError::BadResponse(message)) => message,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_announced_root_must_be_the_root_its_fingerprint_names() {
        let day = std::time::Duration::from_secs(86_400);
        let (key, next) = software_root(KeyType::EcdsaP384, "acme", 400 * day);
        assert!(policy(None, None).check_announced_roots().is_ok());
        // Any case, with colons: the fingerprint is compared normalized.
        let colons: Vec<String> = next
            .fingerprint_sha256
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).to_ascii_uppercase())
            .collect();
        let announced = policy(Some(&colons.join(":")), Some(&next.pem));
        assert!(announced.check_announced_roots().is_ok());
        assert_eq!(announced.announced_roots().next, Some(next.pem.clone()));

        let (_other_key, other) = software_root(KeyType::EcdsaP384, "acme", 400 * day);
        // The previous root is checked the same way, and named as such.
        let previous = with_previous(Some(&other.fingerprint_sha256), Some(&other.pem));
        assert!(previous.check_announced_roots().is_ok());
        assert_eq!(previous.announced_roots().previous, Some(other.pem.clone()));
        let message = refusal(&with_previous(
            Some(&next.fingerprint_sha256),
            Some(&other.pem),
        ));
        assert!(
            message.contains("the previous root of virtual mesh test/vm"),
            "{message}"
        );
        assert!(refusal(&with_previous(None, Some(&other.pem))).contains("must come together"));
        let message = refusal(&policy(Some(&other.fingerprint_sha256), Some(&next.pem)));
        assert!(
            message.contains("the next root of virtual mesh test/vm")
                && message.contains(&format!("the certificate is {}", next.fingerprint_sha256)),
            "{message}"
        );
        assert!(
            refusal(&policy(Some(&next.fingerprint_sha256), None)).contains("must come together")
        );
        assert!(refusal(&policy(None, Some(&next.pem))).contains("must come together"));
        // Not a root: an intermediate is refused whatever its fingerprint.
        let now = std::time::SystemTime::now();
        let bundle = software_bundle(
            &key,
            &next,
            "acme",
            "cluster-a",
            KeyType::EcdsaP256,
            now,
            now + day,
        );
        let intermediate = crate::pki::pem::decode_certificates(&bundle.ca_cert).unwrap();
        let fingerprint = crate::pki::bundle::fingerprint(&intermediate[0]);
        refusal(&policy(Some(&fingerprint), Some(&bundle.ca_cert)));
    }

    /// With a pin, an announced root (next or previous) it does not list is forgotten,
    /// with what the warning names; a listed one stays. Without a pin, one no trusted root
    /// vouches for is forgotten (its cross certificate too), one vouched for stays.
    #[test]
    fn announced_roots_the_agent_does_not_take_are_forgotten() {
        use crate::pki::testing::software_cross;
        let day = std::time::Duration::from_secs(86_400);
        let (current_key, current) = software_root(KeyType::EcdsaP384, "acme", 400 * day);
        let (_key, next) = software_root(KeyType::EcdsaP384, "acme", 400 * day);
        let (_key, previous) = software_root(KeyType::EcdsaP384, "acme", 400 * day);
        let cross = |announced: &RootCa| {
            Some(crate::pki::pem::certificate_pem(&software_cross(
                &current_key,
                &current,
                announced,
            )))
        };
        let (next_cross, previous_cross) = (cross(&next), cross(&previous));
        let both = || PublicPolicy {
            root_fingerprint_sha256: Some(current.fingerprint_sha256.clone()),
            root_cert: Some(current.pem.clone()),
            next_root_cross_cert: next_cross.clone(),
            previous_root_fingerprint_sha256: Some(previous.fingerprint_sha256.to_uppercase()),
            previous_root_cert: Some(previous.pem.clone()),
            previous_root_cross_cert: previous_cross.clone(),
            ..policy(Some(&next.fingerprint_sha256), Some(&next.pem))
        };
        let trusted = TrustedRoots::installed(Some(&current.pem), &[]);
        for (pin, trusted) in [
            (RootPin::default(), &trusted),
            (RootPin::default(), &TrustedRoots::default()),
            (
                RootPin::new(
                    &[
                        next.fingerprint_sha256.clone(),
                        previous.fingerprint_sha256.clone(),
                    ],
                    "--accept-root",
                ),
                &TrustedRoots::default(),
            ),
        ] {
            let mut kept = both();
            assert!(kept.check_announced_roots().is_ok());
            assert!(kept.drop_untaken_roots(&pin, trusted).is_empty());
            assert_eq!(kept, both());
        }
        let mut pinned = both();
        let dropped = pinned.drop_untaken_roots(
            &RootPin::new(std::slice::from_ref(&next.fingerprint_sha256), "x"),
            &trusted,
        );
        assert_eq!(
            dropped,
            [UnacceptedRoot {
                which: "previous",
                fingerprint: previous.fingerprint_sha256.clone(),
                subject: previous.subject.to_string(),
                why: NotTaken::NotPinned,
            }]
        );
        assert_eq!(pinned.announced_roots().next, Some(next.pem.clone()));
        assert_eq!(pinned.announced_roots().previous, None);
        assert_eq!(pinned.previous_root_fingerprint_sha256, None);
        assert_eq!(pinned.previous_root_cross_cert, None);
        assert!(pinned.check_announced_roots().is_ok());
        let mut pinned = both();
        let dropped = pinned.drop_untaken_roots(&RootPin::new(&["ab".repeat(32)], "x"), &trusted);
        assert_eq!(
            dropped.iter().map(|d| d.which).collect::<Vec<_>>(),
            ["next", "previous"]
        );
        assert_eq!(pinned.announced_roots(), AnnouncedRoots::default());
        assert_eq!(pinned.next_root_fingerprint_sha256, None);
        // Without a pin, a signer that does not vouch (an older one) announces nothing.
        let mut unvouched = PublicPolicy {
            next_root_cross_cert: None,
            ..both()
        };
        let dropped = unvouched.drop_untaken_roots(&RootPin::default(), &trusted);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].which, "next");
        assert!(
            matches!(&dropped[0].why, NotTaken::NotCrossSigned(why) if why.contains("no cross certificate")),
            "{dropped:?}"
        );
        assert_eq!(unvouched.announced_roots().next, None);
        assert_eq!(
            unvouched.announced_roots().previous,
            Some(previous.pem.clone())
        );
        // Nor does a signer under a root the cluster does not trust, whatever it serves.
        let elsewhere = TrustedRoots::installed(Some(&previous.pem), &[]);
        let mut stranger = both();
        let dropped = stranger.drop_untaken_roots(&RootPin::default(), &elsewhere);
        assert_eq!(
            dropped.iter().map(|d| d.which).collect::<Vec<_>>(),
            ["next"],
            "the previous root is trusted already"
        );
    }

    /// The signer's own root certificate, when served, must be the root it names.
    #[test]
    fn a_served_root_certificate_must_be_the_root_the_policy_names() {
        let day = std::time::Duration::from_secs(86_400);
        let (_key, root) = software_root(KeyType::EcdsaP384, "acme", 400 * day);
        let (_key, other) = software_root(KeyType::EcdsaP384, "acme", 400 * day);
        let serving = |named: Option<&str>, pem: &str| PublicPolicy {
            root_fingerprint_sha256: named.map(String::from),
            root_cert: Some(pem.into()),
            ..policy(None, None)
        };
        assert!(
            serving(Some(&root.fingerprint_sha256.to_uppercase()), &root.pem)
                .check_announced_roots()
                .is_ok()
        );
        for bad in [
            serving(Some(&other.fingerprint_sha256), &root.pem),
            serving(None, &root.pem),
        ] {
            assert!(refusal(&bad).contains("the root of virtual mesh test/vm"));
        }
    }
}
