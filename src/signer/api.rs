//! The signer's HTTP API: routes, JSON shapes, error mapping. Every `/v1/sign` outcome is
//! written to the audit log before the response leaves.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::SignerState;
use super::audit::{AuditRecord, rfc3339};
use super::decision::{
    DecisionContext, Refusal, RequestFacts, Requester, SignRequest, Status, decide,
};
use super::ratelimit::{RateLimit, RefusalRecord};
use super::reload::Rules;
use crate::backend::BackendError;
use crate::pki::pem::certificate_pem;
use crate::pki::profile::{random_serial, serial_hex};
use crate::policy::ObjectRef;
use crate::policy::rules::human_duration;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// How long readiness may take before it counts as "not ready".
const READINESS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request on a connection made earlier is refused once the client's certificate
/// no longer passes the TLS settings in force.
const NO_LONGER_ACCEPTED: &str = "the client certificate is no longer accepted by the TLS settings in force (it has expired or its CRL is overdue since the handshake, or a reload changed the client CA or CRLs)";

/// The authenticated client of a connection (from its certificate), set per request by
/// the TLS server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The identity its certificate names ([`crate::tlsutil::client_identity`]), the
    /// name grants are given to.
    pub identity: Option<String>,
    /// Why it has none, when it has none.
    pub no_identity: Option<crate::tlsutil::NoIdentity>,
    /// SHA-256 of the client's certificate (DER), lowercase hex. Several certificates may
    /// name one identity (a replacement, a revoked one still valid): the audit log says
    /// which one made the request.
    pub certificate_sha256: Option<String>,
    /// The certificate's serial number, lowercase hex.
    pub certificate_serial: Option<String>,
    /// The certificate's issuer (RFC 4514): which CA vouched for the identity (a serial is
    /// unique only per CA).
    pub certificate_issuer: Option<String>,
    /// The chain the handshake presented, leaf first: checked again against the TLS
    /// settings in force once a signing request's body is in, if they changed since.
    pub chain: Vec<CertificateDer<'static>>,
    /// The TLS settings the handshake checked the chain against (None: unknown, so
    /// always checked again).
    pub verified_under: Option<crate::tlsutil::MaterialFingerprint>,
    /// The earliest notAfter of the chain presented (the certificate's, or an
    /// intermediate's that ends sooner): a connection kept alive past it is checked again.
    pub not_after: Option<std::time::SystemTime>,
    /// The connection's TCP peer address: a stolen client key used from another host
    /// names the same identity and certificate as the agent, but not its address.
    pub peer: Option<std::net::SocketAddr>,
    /// The client CA the chain leads to, found at the connection's first need of it under
    /// the TLS settings of that fingerprint, and shared by the connection's requests: the
    /// path is built (a signature checked) once per connection, not once per request.
    pub client_ca_found: std::sync::Arc<
        std::sync::OnceLock<(
            crate::tlsutil::MaterialFingerprint,
            Option<crate::tlsutil::ClientCa>,
        )>,
    >,
}

impl ClientIdentity {
    /// Of the client's certificate chain, leaf first, as the handshake presented it.
    pub fn of_chain(chain: &[CertificateDer<'static>]) -> Self {
        use der::Decode;
        use sha2::Digest;
        let Some(leaf) = chain.first() else {
            return ClientIdentity::default();
        };
        // Decoded once, for the identity and the serial.
        let cert = x509_cert::Certificate::from_der(leaf).ok();
        let ends = |cert: &x509_cert::Certificate| {
            cert.tbs_certificate().validity().not_after.to_system_time()
        };
        // Without a readable leaf, none: every request is checked again.
        let chain_not_after = cert.as_ref().map(|leaf_cert| {
            chain[1..]
                .iter()
                .filter_map(|der| x509_cert::Certificate::from_der(der).ok())
                .map(|issuer| ends(&issuer))
                .fold(ends(leaf_cert), std::cmp::min)
        });
        let identity = cert.as_ref().map(crate::tlsutil::identity_of);
        ClientIdentity {
            no_identity: match &identity {
                Some(Ok(_)) => None,
                Some(Err(why)) => Some(*why),
                None => Some(crate::tlsutil::NoIdentity::None),
            },
            identity: identity.and_then(Result::ok),
            certificate_sha256: Some(crate::pki::csr::hex(&sha2::Sha256::digest(leaf))),
            not_after: chain_not_after,
            certificate_issuer: cert
                .as_ref()
                .map(|cert| cert.tbs_certificate().issuer().to_string()),
            certificate_serial: cert.map(|cert| serial_hex(cert.tbs_certificate().serial_number())),
            chain: chain.to_vec(),
            verified_under: None,
            peer: None,
            client_ca_found: Default::default(),
        }
    }
}

/// Routes served over mTLS.
pub fn router(state: Arc<SignerState>) -> Router {
    Router::new()
        .route("/v1/sign", post(sign))
        .route("/v1/virtualmeshes/{namespace}/{name}", get(virtual_mesh))
        .route("/v1/trust-bundle", get(trust_bundle))
        .merge(ops_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Health and metrics, served on the mTLS port and on the optional plain ops port.
pub fn ops_router(state: Arc<SignerState>) -> Router {
    ops_routes().fallback(not_found).with_state(state)
}

fn ops_routes() -> Router<Arc<SignerState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignResponse {
    certificate: String,
    cert_chain: String,
    root_cert: String,
    serial: String,
    not_after: String,
}

fn error_response(status: Status, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = error_response(self.status, self.code, &self.message);
        if let Some(secs) = self.retry_after_secs
            && let Ok(value) = header::HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

async fn sign(
    State(state): State<Arc<SignerState>>,
    identity: Option<axum::Extension<ClientIdentity>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let client = identity
        .map(|axum::Extension(client)| client)
        .unwrap_or_default();
    // Decided, issued and audited in a task of its own: hyper drops the handler of a client
    // that hangs up, and a certificate the token may already have signed must still get its
    // audit line. The answer of a client that left is dropped; if it left before signing
    // began, nothing is signed (the guard, dropped with this handler, says so). Shutdown
    // waits for the task.
    let client_gone = CancellationToken::new();
    let connected = client_gone.clone().drop_guard();
    let peer = client.peer;
    let decisions = state.decisions.clone();
    let decided = decisions
        .spawn(decide_issue_and_audit(
            state,
            client,
            headers,
            body,
            client_gone,
        ))
        .await;
    connected.disarm();
    match decided {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(
                error = %e,
                peer = peer.map(tracing::field::display),
                "a signing request failed inside the signer"
            );
            error_response(
                Status::Internal,
                "internal",
                "the signing request failed inside the signer; its log says why",
            )
        }
    }
}

async fn decide_issue_and_audit(
    state: Arc<SignerState>,
    client: ClientIdentity,
    headers: HeaderMap,
    body: Body,
    client_gone: CancellationToken,
) -> Response {
    let identity = client.identity.clone();
    let announced = state.audit.expect_line();
    let mut facts = RequestFacts::default();
    // The rules in force now: the rate limit and the body's timeout. The decision takes
    // them again once the body is in (see `sign_inner`); a reload meanwhile does not mix
    // old and new within either.
    let mut rules = state.rules();
    let outcome = match rate_limit(&state, &rules, identity.as_deref()) {
        Err(refusal) => {
            let client_peer = client.peer;
            let client = identity.as_deref().unwrap_or("");
            let record = state
                .refusal_tally
                .refused(client, Instant::now(), SystemTime::now());
            if record == RefusalRecord::Counted {
                // On record in the client's next count line (audit_counted_refusals).
                drop(announced);
                state.metrics.request(refusal.code);
                tracing::debug!(
                    client,
                    peer = client_peer.map(tracing::field::display),
                    "rate-limited signing request counted for the audit log"
                );
                return refusal.into_response();
            }
            Err(refusal)
        }
        Ok(()) => tokio::select! {
            biased;
            outcome = sign_inner(&state, &mut rules, &client, &headers, body, client_gone, &mut facts) => outcome,
            () = state.stop_deciding.cancelled() => Err(Refusal::new(
                Status::Unavailable,
                "signer_stopping",
                "the signer stopped before this request was answered (its body had not arrived, or the backend had not finished signing); nothing was handed out (a certificate the backend was making is discarded; with Vault it stays in Vault's records)",
            )),
        },
    };
    let now = SystemTime::now();
    let mut record = AuditRecord {
        time: rfc3339(now),
        event: "decision".into(),
        client: identity.clone(),
        client_certificate_sha256: client.certificate_sha256.clone(),
        client_certificate_serial: client.certificate_serial.clone(),
        client_certificate_issuer: client.certificate_issuer.clone(),
        // The client CA of the decision (one refused before it: of the TLS settings now).
        client_ca_sha256: facts
            .client_ca
            .clone()
            .or_else(|| state.client_ca_of(&client))
            .map(|ca| ca.sha256),
        peer: client.peer.map(|peer| peer.to_string()),
        virtual_mesh: facts.virtual_mesh.clone(),
        mesh: facts.mesh.clone(),
        csr_public_key_sha256: facts.csr_public_key_sha256.clone(),
        ignored_csr_extensions: facts.ignored_csr_extensions.clone(),
        ignored_csr_subject: facts.ignored_csr_subject.clone(),
        ignored_csr_attributes: facts.ignored_csr_attributes.clone(),
        // The rules it was decided under: a reload recorded between the decision and
        // this line (a body still arriving, a queue for the token) does not hide them.
        rules_sha256: Some(rules.digest().to_string()),
        ..Default::default()
    };
    match &outcome {
        Ok(issued) => {
            record.decision = Some("allow".into());
            record.rule = Some("issued".into());
            record.serial = Some(issued.serial.clone());
            record.not_after = Some(issued.not_after.clone());
        }
        Err(refusal) => {
            record.decision = Some(refusal.decision().into());
            record.rule = Some(refusal.code.into());
            record.message = Some(refusal.message.clone());
            record.signing_serial = facts.signing_serial_asked();
        }
    }
    // Nothing is answered, and no certificate leaves, before its audit line is on disk.
    let (decision, rule, serial) = (
        record.decision.clone(),
        record.rule.clone(),
        record.serial.clone(),
    );
    if let Err(e) = state.audit.append(record, announced).await {
        state.metrics.audit_error();
        state.metrics.request("audit_unavailable");
        // What the lost line held, so the decision is on record somewhere: a certificate
        // signed for it (its serial) is thrown away, never handed out.
        tracing::error!(
            error = %e,
            client = identity.as_deref().unwrap_or(""),
            client_certificate_sha256 = client.certificate_sha256.as_deref().unwrap_or(""),
            peer = client.peer.map(tracing::field::display),
            virtual_mesh = facts.virtual_mesh.as_deref().unwrap_or(""),
            mesh = facts.mesh.as_deref().unwrap_or(""),
            decision = decision.as_deref().unwrap_or(""),
            rule = rule.as_deref().unwrap_or(""),
            serial = serial.as_deref().unwrap_or(""),
            "audit log write failed; answering 503"
        );
        return error_response(
            Status::Unavailable,
            "audit_unavailable",
            "the signer cannot write its audit log, so it issues nothing; try again later",
        );
    }
    match outcome {
        Ok(issued) => {
            state.metrics.request("issued");
            // Labels from the config: only a client granted this virtual mesh gets here.
            state.metrics.issued(
                identity.as_deref().unwrap_or(""),
                facts.virtual_mesh.as_deref().unwrap_or(""),
            );
            // The audit log is the record of every issuance; this is for debugging.
            tracing::debug!(
                client = identity.as_deref().unwrap_or(""),
                peer = client.peer.map(tracing::field::display),
                virtual_mesh = facts.virtual_mesh.as_deref().unwrap_or(""),
                mesh = facts.mesh.as_deref().unwrap_or(""),
                serial = %issued.serial,
                not_after = %issued.not_after,
                "issued intermediate"
            );
            (StatusCode::OK, axum::Json(issued)).into_response()
        }
        Err(refusal) => {
            state.metrics.request(refusal.code);
            tracing::info!(
                client = identity.as_deref().unwrap_or(""),
                peer = client.peer.map(tracing::field::display),
                virtual_mesh = facts.virtual_mesh.as_deref().unwrap_or(""),
                mesh = facts.mesh.as_deref().unwrap_or(""),
                code = refusal.code,
                detail = %refusal.message,
                "refused signing request"
            );
            refusal.into_response()
        }
    }
}

/// Takes one of the client's tokens, or refuses with `429 rate_limited` and `Retry-After`.
fn rate_limit(state: &SignerState, rules: &Rules, identity: Option<&str>) -> Result<(), Refusal> {
    let limit = RateLimit {
        per_minute: rules.limits.sign_requests_per_minute,
        burst: rules.limits.sign_burst,
    };
    let Err(wait) = state
        .rate_limiter
        .check(identity.unwrap_or(""), limit, Instant::now())
    else {
        return Ok(());
    };
    let secs = retry_after_secs(wait);
    let mut refusal = Refusal::new(
        Status::TooManyRequests,
        "rate_limited",
        format!("too many signing requests from this client; retry in {secs} s"),
    );
    refusal.retry_after_secs = Some(secs);
    Err(refusal)
}

/// `Retry-After` for a wait: whole seconds rounded up (a client that waits what it is told
/// finds a token), at least 1.
pub(crate) fn retry_after_secs(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Writes one audit line per client for the rate-limit refusals counted since its last
/// line ([`super::ratelimit::RefusalTally`]). Runs every
/// [`super::ratelimit::REFUSAL_TALLY_PERIOD`] and once more at shutdown, after the last
/// decision.
pub async fn audit_counted_refusals(state: &SignerState) {
    let mut counts = state.refusal_tally.counts_to_write(Instant::now());
    while let Some(counted) = counts.next_to_write() {
        let record = AuditRecord {
            time: rfc3339(SystemTime::now()),
            event: "decision".into(),
            client: Some(counted.client.clone()),
            decision: Some("deny".into()),
            rule: Some("rate_limited".into()),
            message: Some(format!(
                "{} more signing requests from this client refused by the rate limit from {} to {} (counted, not written one by one)",
                counted.count,
                rfc3339(counted.first),
                rfc3339(counted.last)
            )),
            count: Some(counted.count),
            // The rules in force as the count is written (a reload within the counted
            // minute has its line before this one).
            rules_sha256: Some(state.rules().digest().to_string()),
            ..Default::default()
        };
        match state.audit.append(record, state.audit.expect_line()).await {
            Ok(()) => counts.written(),
            Err(e) => {
                state.metrics.audit_error();
                tracing::error!(
                    error = %e,
                    client = %counted.client,
                    count = counted.count,
                    "audit log write failed: these rate-limit refusals are kept for the next count line"
                );
                counts.not_written(Instant::now());
            }
        }
    }
}

async fn sign_inner(
    state: &SignerState,
    rules: &mut Arc<Rules>,
    client: &ClientIdentity,
    headers: &HeaderMap,
    body: Body,
    client_gone: CancellationToken,
    facts: &mut RequestFacts,
) -> Result<SignResponse, Refusal> {
    let content_type = headers.get(header::CONTENT_TYPE);
    let media_type = content_type
        .and_then(|v| v.to_str().ok())
        .map_or("", |v| v.split(';').next().unwrap_or("").trim());
    if !media_type.eq_ignore_ascii_case("application/json") {
        let got = match content_type {
            None => "none".to_string(),
            Some(v) => match v.to_str() {
                Ok(text) => format!("{text:?}"),
                // Shown escaped: read as "" it would look like no Content-Type at all.
                Err(_) => format!("\"{}\" (not UTF-8)", v.as_bytes().escape_ascii()),
            },
        };
        return Err(Refusal::new(
            Status::UnsupportedMediaType,
            "unsupported_media_type",
            format!("Content-Type must be application/json, got {got}"),
        ));
    }
    let body_timeout = rules.limits.body_timeout;
    let read = tokio::time::timeout(body_timeout, axum::body::to_bytes(body, MAX_BODY));
    let bytes: Bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if over_the_limit(&e) => {
            return Err(Refusal::new(
                Status::PayloadTooLarge,
                "body_too_large",
                format!("request body is larger than {} KiB", MAX_BODY / 1024),
            ));
        }
        // The connection ended (or broke its framing) before the body was all there:
        // nobody reads the answer, but the audit line should not send anyone looking for
        // an oversized CSR.
        Ok(Err(e)) => {
            return Err(Refusal::new(
                Status::ClientClosedRequest,
                "client_gone",
                format!(
                    "the request body could not be read ({}): the connection ended before it all came; nothing was signed",
                    crate::logging::clip(&e.to_string(), 200)
                ),
            ));
        }
        Err(_) => {
            return Err(Refusal::new(
                Status::RequestTimeout,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    body_timeout.as_millis()
                ),
            ));
        }
    };
    // Decided under the rules in force once the body is in, not those of when its first
    // byte came: a grant removed by a reload while a client sends slowly is gone.
    *rules = state.rules();
    // Likewise the client: a CRL reloaded while the body came revokes it now. The
    // reload closes the connection only after this request.
    state.client_still_trusted(client).map_err(|(reason, e)| {
        Refusal::new(
            Status::Forbidden,
            reason,
            format!(
                "{NO_LONGER_ACCEPTED}: {}",
                crate::tlsutil::certificate_error_text(&e)
            ),
        )
    })?;
    let malformed = |why: String| {
        Refusal::new(
            Status::BadRequest,
            "malformed_request",
            format!(
                "request body is not the expected JSON object {{virtualMesh, mesh, csr[, ttlSeconds]}}: {why}"
            ),
        )
    };
    // serde's derived Deserialize takes a struct from a JSON array as well (the fields in
    // order); the API is the object alone, so anything else is refused before it is read.
    if bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        != Some(&b'{')
    {
        return Err(malformed("not a JSON object".into()));
    }
    let request: SignRequest =
        serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    let serial =
        random_serial().map_err(|e| Refusal::new(Status::Internal, "internal", e.to_string()))?;
    let backend = &state.backend;
    let ctx = DecisionContext {
        policies: &rules.policies,
        authorization: &rules.authorization,
        root: backend.root(),
    };
    // Of the TLS settings that passed it just now.
    let client_ca = state.client_ca_of(client);
    facts.client_ca = client_ca.clone();
    let requester = Requester {
        identity: client.identity.as_deref(),
        no_identity: client.no_identity,
        client_ca: client_ca.as_ref(),
    };
    let mut approval = decide(&ctx, requester, &request, SystemTime::now(), serial, facts)?;
    approval.issue.client_gone = client_gone;
    if approval.capped_by_root && !state.capped_by_root_noted.swap(true, Ordering::Relaxed) {
        tracing::info!(
            root_not_after = %rfc3339(backend.root().not_after),
            "intermediates are shortened to end with the root (said once; the audit log has each notAfter)"
        );
    }

    // A log known not to take lines costs no signature: the certificate could not be
    // handed out, and with Vault it would stay in Vault's records with no line of ours.
    // Unless it takes them again by now (room made): then this request is the first.
    if !state.audit.is_writable() {
        probe_audit_log(state).await;
    }
    if !state.audit.is_writable() {
        return Err(Refusal::new(
            Status::Unavailable,
            "audit_unavailable",
            "the signer cannot write its audit log, so it signs nothing; try again later",
        ));
    }
    let started = Instant::now();
    // Set before the wait, which a stop may end: the backend notes whether it asked.
    facts.signing_serial = backend
        .signs_planned_serial(&approval.issue)
        .then(|| serial_hex(&approval.issue.plan.serial));
    facts.signing_asked = approval.issue.signing_asked.clone();
    let certificate = backend.issue(approval.issue).await.map_err(|e| {
        if !matches!(e, BackendError::ClientGone) {
            state.metrics.backend_error();
        }
        match e {
            BackendError::ClientGone => {
                Refusal::new(Status::ClientClosedRequest, "client_gone", e.to_string())
            }
            BackendError::Unavailable(_) | BackendError::PinRejected { .. } => {
                Refusal::new(Status::Unavailable, "backend_unavailable", e.to_string())
            }
            BackendError::Lint(_) | BackendError::Check(_) => {
                tracing::error!(error = %e, peer = client.peer.map(tracing::field::display), "issuance check failed");
                Refusal::new(Status::Internal, "issuance_check_failed", e.to_string())
            }
            BackendError::OutOfPolicy(_) => {
                tracing::error!(
                    error = %e,
                    peer = client.peer.map(tracing::field::display),
                    "backend answer outside policy; not handed out"
                );
                Refusal::new(Status::BadGateway, "backend_out_of_policy", e.to_string())
            }
            BackendError::Refused(_) => {
                Refusal::new(Status::BadGateway, "backend_refused", e.to_string())
            }
        }
    })?;
    state.metrics.signing_took(started.elapsed());

    let tbs = certificate.tbs_certificate();
    let certificate_pem = certificate_pem(&certificate);
    let root_pem = backend.root().pem.clone();
    Ok(SignResponse {
        cert_chain: format!("{certificate_pem}{root_pem}"),
        certificate: certificate_pem,
        root_cert: root_pem,
        serial: serial_hex(tbs.serial_number()),
        not_after: rfc3339(tbs.validity().not_after.to_system_time()),
    })
}

/// Whether reading a body failed on [`MAX_BODY`] (anything else: the connection ended or
/// broke its framing before the body was all there).
fn over_the_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = cause {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

async fn virtual_mesh(
    State(state): State<Arc<SignerState>>,
    identity: Option<axum::Extension<ClientIdentity>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    // A kept-alive client the TLS settings in force no longer accept (its certificate
    // expired, or its CRL overdue under "refuse") is told so, as at a signing request:
    // an empty grant list would send the agent's operator to the grants instead.
    if let Some(axum::Extension(client)) = &identity
        && let Err((reason, e)) = state.client_still_trusted(client)
    {
        return error_response(
            Status::Forbidden,
            reason,
            &format!(
                "{NO_LONGER_ACCEPTED}: {}",
                crate::tlsutil::certificate_error_text(&e)
            ),
        );
    }
    let id = ObjectRef::new(namespace, name);
    let rules = state.rules();
    // An identity pinned to another client CA is not that client, as at a signing
    // request: it is not shown that client's grants (nor told a renewal would pass).
    if let Some(axum::Extension(client)) = &identity
        && let Some(who) = client.identity.as_deref()
        && let Some(issuer) = rules.authorization.issuer_of(who)
        && let Err(mismatch) = issuer.admits(state.client_ca_of(client).as_ref())
    {
        return error_response(
            Status::Forbidden,
            "client_issuer",
            &format!("client {who} is refused: {mismatch}"),
        );
    }
    let Some(policy) = rules.policies.get(&id) else {
        return error_response(
            Status::NotFound,
            "unknown_virtual_mesh",
            &format!("virtual mesh {id} is not configured on this signer"),
        );
    };
    // The meshes of this virtual mesh the asking client may request (its own grants
    // only), so an agent whose grant went away learns it now, not at its next renewal.
    let authorized_meshes: Vec<String> = identity
        .and_then(|axum::Extension(client)| client.identity)
        .and_then(|identity| rules.authorization.grants_of(&identity))
        .into_iter()
        .flatten()
        .filter(|(virtual_mesh, _)| *virtual_mesh == id)
        .map(|(_, mesh)| mesh.to_string())
        .collect();
    let root = state.backend.root();
    let max_ttl = policy.max_ttl.as_secs();
    axum::Json(json!({
        "virtualMesh": policy.id.to_string(),
        "displayName": policy.display_name,
        "orgName": policy.org_name,
        "maxTtlSeconds": max_ttl,
        "maxTtl": human_duration(policy.max_ttl),
        "minRsaBits": policy.min_rsa_bits,
        "acceptedKeyTypes": policy.accepted_key_types().iter().map(|k| k.name()).collect::<Vec<_>>(),
        "meshes": policy.meshes.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
        "authorizedMeshes": authorized_meshes,
        "rootNotAfter": rfc3339(root.not_after),
        "rootFingerprintSha256": root.fingerprint_sha256,
        "rootCert": root.pem,
        "nextRootFingerprintSha256": rules.next_root.as_ref().map(|n| &n.fingerprint_sha256),
        "nextRootCert": rules.next_root.as_ref().map(|n| &n.pem),
        "nextRootCrossCert": cross_cert(rules.next_root.as_ref()),
        "previousRootFingerprintSha256": rules.previous_root.as_ref().map(|p| &p.fingerprint_sha256),
        "previousRootCert": rules.previous_root.as_ref().map(|p| &p.pem),
        "previousRootCrossCert": cross_cert(rules.previous_root.as_ref()),
    }))
    .into_response()
}

/// The root key's cross certificate for an announced root (PEM): what an agent needs to
/// take it.
fn cross_cert(announced: Option<&crate::config::AnnouncedRoot>) -> Option<&str> {
    Some(announced?.cross_cert.as_ref()?.pem.as_str())
}

/// The roots to trust: the signer's root, then the next and the previous root it announces.
async fn trust_bundle(State(state): State<Arc<SignerState>>) -> Response {
    let mut pem = state.backend.root().pem.clone();
    for announced in state.rules().announced_roots() {
        pem.push_str(&announced.pem);
    }
    ([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<Arc<SignerState>>) -> Response {
    if let Some(reason) = state.audit.unwritable_reason() {
        return error_response(Status::Unavailable, "audit_unavailable", &reason);
    }
    let certificates = ServingCertificates {
        root_not_after: state.backend.root().not_after,
        server_certificate_not_after: state.metrics.tls_certificate_not_after(),
    };
    if let Some((code, message)) = certificates.expired(SystemTime::now()) {
        return error_response(Status::Unavailable, code, &message);
    }
    match backend_readiness(&state).await {
        Ok(()) => axum::Json(json!({"status": "ready", "backend": state.backend.describe()}))
            .into_response(),
        Err(message) => error_response(Status::Unavailable, "backend_unavailable", &message),
    }
}

/// The certificates the signer serves with: once either has expired, no client can be
/// served (every handshake, or every signing request, is refused), so the signer is not
/// ready.
#[derive(Debug, Clone, Copy)]
pub struct ServingCertificates {
    pub root_not_after: SystemTime,
    pub server_certificate_not_after: SystemTime,
}

impl ServingCertificates {
    /// The `/readyz` error code and message of the first expired one, if any.
    pub fn expired(&self, now: SystemTime) -> Option<(&'static str, String)> {
        if self.server_certificate_not_after <= now {
            return Some((
                "server_certificate_expired",
                format!(
                    "the signer's TLS server certificate ([tls] cert) expired at {}: clients refuse the handshake; renew it and reload (SIGHUP)",
                    rfc3339(self.server_certificate_not_after)
                ),
            ));
        }
        if self.root_not_after <= now {
            return Some((
                "root_expired",
                format!(
                    "the root certificate expired at {}: every signing request is refused; move to a new root",
                    rfc3339(self.root_not_after)
                ),
            ));
        }
        None
    }
}

/// While the audit log's last write failed (the signer not ready), writes a `recovery`
/// line: once it lands (room made, the log rotated), the signer is ready again without
/// waiting for a signing request, which a load balancer would not send it while it is not.
/// A signing request tries it too, before it would be refused for the log.
/// The free space is looked at first: a log short of room is not tried (a line would fit
/// in the slack of a full disk, and the next one fail), and one given room again is
/// writable at once.
pub async fn probe_audit_log(state: &SignerState) {
    state.audit.check_free_space_off_the_runtime().await;
    match state.audit.write_recovery().await {
        None => {}
        Some(Ok(())) => tracing::info!(
            path = %state.audit.path().display(),
            "the audit log takes lines again: ready"
        ),
        Some(Err(e)) => tracing::debug!(error = %e, "the audit log still cannot be written"),
    }
}

/// Asks the root key backend whether it can sign (within [`READINESS_TIMEOUT`]) and
/// records the answer in `meshca_backend_ready` (and `meshca_backend_login_failing`); the
/// error says why not.
pub async fn backend_readiness(state: &SignerState) -> Result<(), String> {
    let answer = match tokio::time::timeout(READINESS_TIMEOUT, state.backend.readiness()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the root key backend did not answer within {}s",
            READINESS_TIMEOUT.as_secs()
        )),
    };
    state
        .metrics
        .backend_checked(answer.is_ok(), state.backend.login_failing());
    answer
}

async fn metrics(State(state): State<Arc<SignerState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            crate::signer::metrics::EXPOSITION_CONTENT_TYPE,
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    error_response(Status::NotFound, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(json!({"error": {"code": "method_not_allowed", "message": "method not allowed on this endpoint"}})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A kept-alive connection is checked again once any certificate it presented ends:
    /// an intermediate that ends before the client's own certificate too.
    #[test]
    fn a_client_chain_ends_with_its_earliest_certificate() {
        use crate::pki::keys::KeyType;
        use crate::pki::testing::{software_bundle, software_root};
        use der::{DecodePem, Encode};
        let hour = Duration::from_secs(3600);
        let (root_key, root) = software_root(KeyType::EcdsaP256, "org", 24 * hour);
        let now = std::time::SystemTime::now();
        let files = software_bundle(
            &root_key,
            &root,
            "org",
            "m",
            KeyType::EcdsaP256,
            now,
            now + hour,
        );
        let short = x509_cert::Certificate::from_pem(&files.ca_cert).unwrap();
        let der = |cert: &x509_cert::Certificate| CertificateDer::from(cert.to_der().unwrap());
        let ends = |cert: &x509_cert::Certificate| {
            cert.tbs_certificate().validity().not_after.to_system_time()
        };
        // The longer-lived certificate first, as a leaf, then one ending sooner.
        let identity = ClientIdentity::of_chain(&[der(&root.certificate), der(&short)]);
        assert_eq!(identity.not_after, Some(ends(&short)));
        let alone = ClientIdentity::of_chain(&[der(&root.certificate)]);
        assert_eq!(alone.not_after, Some(ends(&root.certificate)));
    }

    #[test]
    fn an_expired_server_certificate_or_root_makes_the_signer_unready() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        let valid = ServingCertificates {
            root_not_after: now + day,
            server_certificate_not_after: now + day,
        };
        assert_eq!(valid.expired(now), None);
        let server_ended = ServingCertificates {
            server_certificate_not_after: now,
            ..valid
        };
        let (code, message) = server_ended.expired(now).unwrap();
        assert_eq!(code, "server_certificate_expired");
        assert!(message.contains("TLS server certificate"), "{message}");
        let root_ended = ServingCertificates {
            root_not_after: now - day,
            ..valid
        };
        let (code, message) = root_ended.expired(now).unwrap();
        assert_eq!(code, "root_expired");
        assert!(message.contains("root certificate expired at"), "{message}");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1900)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(6)), 6);
    }
}
