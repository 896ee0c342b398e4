//! Prometheus metrics of the signer, served as text at `/metrics`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::config::AnnouncedRoot;
use crate::tlsutil::Validity;

/// Outcomes counted from 0 at start (with every policy rule's code and every
/// `client_certificate_*` handshake reason, which a request refused after a TLS reload
/// gets), so that the first of each shows in `increase()`: a series that appears at 1 has
/// no earlier sample to differ from, and an alert on it would miss it. These are `issued`
/// and the outcomes the rules in deploy/prometheus/meshca-alerts.yaml look at.
const OUTCOMES_FROM_ZERO: [&str; 14] = [
    "issued",
    "issuance_check_failed",
    "backend_out_of_policy",
    "backend_unavailable",
    "root_expired",
    "not_authorized",
    "client_issuer",
    "unknown_virtual_mesh",
    "unknown_mesh",
    "malformed_request",
    "malformed_csr",
    "rate_limited",
    "audit_unavailable",
    "client_gone",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `issued`, or the error code of the refusal.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// One of [`crate::tlsutil::HANDSHAKE_REFUSAL_REASONS`].
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    /// A file as the config names it.
    pub file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnouncementLabels {
    /// `next` or `previous`.
    pub announcement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    /// A client identity of the config (`[[clients]]`): only those reach issuance.
    pub client: String,
    /// A virtual mesh it is granted.
    pub virtual_mesh: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RulesLabels {
    /// [`crate::signer::reload::Rules::digest`].
    pub rules_sha256: String,
    /// The root the signer issues under.
    pub root_sha256: String,
}

/// The bounds of `meshca_signing_duration_seconds`: 1 ms doubling to 262 s, then 300 s
/// (the longest pkcs11.timeout_seconds).
const SIGNING_BUCKETS: [f64; 20] = {
    let mut bounds = [0.0; 20];
    let mut i = 0;
    let mut bound = 0.001;
    while i < 19 {
        bounds[i] = bound;
        bound *= 2.0;
        i += 1;
    }
    bounds[19] = 300.0;
    bounds
};

pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    /// Intermediates issued per client and virtual mesh: a client given more than its
    /// renewals need is one whose key is used by someone else too.
    intermediates_issued: Family<IssuedLabels, Counter>,
    /// The series of `intermediates_issued`, which the family does not list: a reload
    /// removes those of the grants it removed. Held while one is counted too, so that an
    /// issuance finishing under the rules a reload replaces cannot bring one back unseen.
    issued_series: Mutex<HashSet<IssuedLabels>>,
    handshakes_refused: Family<ReasonLabels, Counter>,
    signing_seconds: Histogram,
    backend_errors: Counter,
    /// 1 while the root key backend answers its readiness check, 0 otherwise.
    backend_ready: Gauge,
    /// 1 while the backend's credentials run out with no way to renew them.
    backend_login_failing: Gauge,
    audit_errors: Counter,
    root_expiry_seconds: Gauge<i64, AtomicI64>,
    root_not_after: SystemTime,
    tls_reloads: Family<OutcomeLabels, Counter>,
    rules_reloads: Family<OutcomeLabels, Counter>,
    /// 1 until a reload fails, then 0 until one succeeds: what an alert looks at, since the
    /// counters alone cannot tell whether a failure was mended since.
    tls_last_reload_successful: Gauge,
    rules_last_reload_successful: Gauge,
    /// How many settings read only at start differ in the config file, as the last reload
    /// of the rules found (0: none, or no reload yet).
    config_restart_pending: Gauge,
    tls_certificate_expiry_seconds: Gauge<i64, AtomicI64>,
    /// The serving certificate's notAfter (Unix seconds); changes on a TLS reload.
    tls_certificate_not_after: AtomicI64,
    /// Its notBefore: the expiry alert's threshold follows the certificate's lifetime.
    tls_certificate_not_before: Gauge,
    client_ca_not_after: Gauge,
    client_crl_next_update: Family<FileLabels, Gauge>,
    announced_root_not_after: Family<AnnouncementLabels, Gauge>,
    /// One series, value 1, naming the rules in force.
    rules_info: Family<RulesLabels, Gauge>,
    /// The plain ops port's connections (`ops_listen`).
    pub ops_connections: crate::ops_http::OpsConnectionMetrics,
    /// The API port's connections by state, their bound, and those the bound closed.
    pub api_connections: crate::ops_http::ConnectionMetrics,
}

impl Metrics {
    pub fn new(root_not_after: SystemTime, tls_certificate: Validity) -> Self {
        let mut registry = Registry::with_prefix("meshca");
        register_build_info(&mut registry);
        let ops_connections = crate::ops_http::OpsConnectionMetrics::register(&mut registry);
        let api_connections = crate::ops_http::ConnectionMetrics::register_api(&mut registry);
        let rule_codes = crate::policy::rules::Rule::ALL.map(|rule| rule.code());
        let client_certificate = crate::tlsutil::HANDSHAKE_REFUSAL_REASONS
            .iter()
            .filter(|reason| reason.starts_with("client_certificate_"));
        let requests = outcomes_from_zero(
            OUTCOMES_FROM_ZERO
                .iter()
                .chain(&rule_codes)
                .chain(client_certificate),
        );
        registry.register(
            "sign_requests",
            "Signing requests by outcome (issued, or the refusal's error code)",
            requests.clone(),
        );
        let intermediates_issued = Family::<IssuedLabels, Counter>::default();
        registry.register(
            "intermediates_issued",
            "Intermediates issued (handed out), by client identity (as [[clients]] names it) and virtual mesh: a client issued more than its renewals need may have had its key stolen (the audit log's peer says from where)",
            intermediates_issued.clone(),
        );
        let handshakes_refused =
            counters_from_zero(crate::tlsutil::HANDSHAKE_REFUSAL_REASONS.map(|reason| {
                ReasonLabels {
                    reason: reason.to_string(),
                }
            }));
        registry.register(
            "tls_handshakes_refused",
            "TLS handshakes on the API port that failed, by reason (client_certificate_expired, _revoked, _crl_overdue, _revocation_unknown, _unknown_issuer, _invalid; no_client_certificate, protocol, connection, timeout)",
            handshakes_refused.clone(),
        );
        // 1 ms .. 300 s: ECDSA on a fast token up to RSA-4096 on a busy one, and up to the
        // longest pkcs11.timeout_seconds allowed (20 s by default): a signing that
        // succeeds just inside its timeout lands in a bucket, not only in +Inf.
        let signing_seconds = Histogram::new(SIGNING_BUCKETS);
        registry.register(
            "signing_duration_seconds",
            "Time to build, lint, sign in the backend and check one intermediate, for signings that succeeded (failures: backend_errors)",
            signing_seconds.clone(),
        );
        let backend_errors = Counter::default();
        registry.register(
            "backend_errors",
            "Signing attempts that failed in the root key backend",
            backend_errors.clone(),
        );
        let backend_ready = Gauge::default();
        backend_ready.set(1);
        registry.register(
            "backend_ready",
            "1 if the root key backend (token or Vault) answered its last readiness check (every 10 s, and each /readyz), 0 if not",
            backend_ready.clone(),
        );
        let backend_login_failing = Gauge::default();
        registry.register(
            "backend_login_failing",
            "1 if the signer's Vault token is near its max TTL or cannot be renewed, and a fresh login failed: it signs until that token ends, then not at all (0 otherwise, and for a token)",
            backend_login_failing.clone(),
        );
        let audit_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Decisions that could not be written to the audit log (nothing was issued for them)",
            audit_errors.clone(),
        );
        let root_expiry_seconds = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "root_expiry_seconds",
            "Seconds until the root certificate expires",
            root_expiry_seconds.clone(),
        );
        let tls_reloads = outcomes_from_zero(&["ok", "error"]);
        let rules_reloads = outcomes_from_zero(&["ok", "error"]);
        registry.register(
            "tls_reloads",
            "Reloads of the TLS files on SIGHUP by outcome (ok, or error: the previous settings stay)",
            tls_reloads.clone(),
        );
        registry.register(
            "rules_reloads",
            "Reloads of the rules (policies, clients, limits, announced roots) on SIGHUP by outcome (ok, or error: the rules in force stay)",
            rules_reloads.clone(),
        );
        let tls_last_reload_successful = Gauge::default();
        tls_last_reload_successful.set(1);
        registry.register(
            "tls_last_reload_successful",
            "1 if the last reload of the TLS files succeeded (or none was tried), 0 if it failed",
            tls_last_reload_successful.clone(),
        );
        let rules_last_reload_successful = Gauge::default();
        rules_last_reload_successful.set(1);
        registry.register(
            "rules_last_reload_successful",
            "1 if the last reload of the rules succeeded (or none was tried), 0 if it failed",
            rules_last_reload_successful.clone(),
        );
        let config_restart_pending = Gauge::default();
        registry.register(
            "config_restart_pending",
            "How many settings read only at start (listen, audit_log, root, backend, ...) differ in the config file at the last reload: 0, or a restart is needed to put them in force (the SIGHUP's WARN line names them)",
            config_restart_pending.clone(),
        );
        let tls_certificate_expiry_seconds = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "tls_certificate_expiry_seconds",
            "Seconds until the signer's own TLS server certificate expires",
            tls_certificate_expiry_seconds.clone(),
        );
        let tls_certificate_not_before = Gauge::default();
        tls_certificate_not_before.set(unix_seconds(tls_certificate.not_before));
        registry.register(
            "tls_certificate_not_before_timestamp_seconds",
            "notBefore of the signer's TLS server certificate in force (Unix seconds): with tls_certificate_expiry_seconds, its lifetime",
            tls_certificate_not_before.clone(),
        );
        let client_ca_not_after = Gauge::default();
        registry.register(
            "tls_client_ca_not_after_timestamp_seconds",
            "When the first of the client CA certificates (tls.client_ca) expires (Unix seconds): from then on, clients whose certificates chain only to it are refused at the handshake",
            client_ca_not_after.clone(),
        );
        let client_crl_next_update = Family::<FileLabels, Gauge>::default();
        registry.register(
            "tls_client_crl_next_update_timestamp_seconds",
            "When each client CRL file in force is due to be replaced: the earliest nextUpdate in it (Unix seconds); past it, revocations published since are not enforced",
            client_crl_next_update.clone(),
        );
        let announced_root_not_after = Family::<AnnouncementLabels, Gauge>::default();
        registry.register(
            "announced_root_not_after_timestamp_seconds",
            "When each root the signer announces besides its own (announcement: next, previous) expires (Unix seconds); the agents skip an expired one",
            announced_root_not_after.clone(),
        );
        let rules_info = Family::<RulesLabels, Gauge>::default();
        registry.register(
            "rules_info",
            "1, labelled with the digest of the rules in force (as the audit log's rulesSha256) and the root the signer issues under: replicas meant to be alike show one value",
            rules_info.clone(),
        );
        Metrics {
            registry,
            requests,
            intermediates_issued,
            issued_series: Mutex::default(),
            handshakes_refused,
            signing_seconds,
            backend_errors,
            backend_ready,
            backend_login_failing,
            audit_errors,
            root_expiry_seconds,
            root_not_after,
            tls_reloads,
            rules_reloads,
            tls_last_reload_successful,
            rules_last_reload_successful,
            config_restart_pending,
            tls_certificate_expiry_seconds,
            tls_certificate_not_after: AtomicI64::new(unix_seconds(tls_certificate.not_after)),
            tls_certificate_not_before,
            client_ca_not_after,
            client_crl_next_update,
            announced_root_not_after,
            rules_info,
            ops_connections,
            api_connections,
        }
    }

    pub fn request(&self, outcome: &str) {
        count_outcome(&self.requests, outcome);
    }

    /// An intermediate was issued to `client` for `virtual_mesh`. Only an identity the
    /// config grants that virtual mesh gets here (any other is refused `not_authorized`
    /// before anything is signed), so the series are bounded by the grants in force (a
    /// reload removes the others, see [`Metrics::rules_in_force`]): no label comes from
    /// the request alone.
    pub fn issued(&self, client: &str, virtual_mesh: &str) {
        let labels = IssuedLabels {
            client: client.to_string(),
            virtual_mesh: virtual_mesh.to_string(),
        };
        let mut series = self.issued_series.lock().unwrap_or_else(|p| p.into_inner());
        self.intermediates_issued.get_or_create(&labels).inc();
        series.insert(labels);
    }

    /// A handshake on the API port failed for `reason`.
    pub fn handshake_refused(&self, reason: &str) {
        self.handshakes_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn signing_took(&self, elapsed: Duration) {
        self.signing_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn backend_error(&self) {
        self.backend_errors.inc();
    }

    pub fn audit_error(&self) {
        self.audit_errors.inc();
    }

    /// The outcome of a readiness check of the root key backend, and whether its
    /// credentials run out unrenewed.
    pub fn backend_checked(&self, ready: bool, login_failing: bool) {
        self.backend_ready.set(i64::from(ready));
        self.backend_login_failing.set(i64::from(login_failing));
    }

    /// A TLS reload: `ok` with the new serving certificate's validity, or `error`.
    pub fn tls_reloaded(&self, new_certificate: Option<Validity>) {
        let outcome = match new_certificate {
            Some(validity) => {
                self.tls_certificate_not_after
                    .store(unix_seconds(validity.not_after), Ordering::Relaxed);
                self.tls_certificate_not_before
                    .set(unix_seconds(validity.not_before));
                "ok"
            }
            None => "error",
        };
        self.tls_last_reload_successful
            .set(i64::from(new_certificate.is_some()));
        count_outcome(&self.tls_reloads, outcome);
    }

    /// The client CA in force, at start and after each TLS reload that succeeded: when its
    /// first certificate expires.
    pub fn client_ca(&self, not_after: SystemTime) {
        self.client_ca_not_after.set(unix_seconds(not_after));
    }

    /// The client CRLs in force, at start and after each TLS reload that succeeded: one
    /// series per file with a `nextUpdate`.
    pub fn client_crls(&self, crls: &[crate::tlsutil::CrlNextUpdate]) {
        self.client_crl_next_update.clear();
        for crl in crls {
            if let Some(next_update) = crl.next_update {
                self.client_crl_next_update
                    .get_or_create(&FileLabels {
                        file: crl.path.display().to_string(),
                    })
                    .set(unix_seconds(next_update));
            }
        }
    }

    /// The roots announced besides the root in force, at start and after each reload of
    /// the rules that changed them: one series per announcement.
    pub fn announced_roots<'a>(&self, roots: impl Iterator<Item = &'a AnnouncedRoot>) {
        self.announced_root_not_after.clear();
        for root in roots {
            self.announced_root_not_after
                .get_or_create(&AnnouncementLabels {
                    announcement: root.announcement.label().to_string(),
                })
                .set(unix_seconds(root.not_after));
        }
    }

    /// The rules in force, at start and after each reload that changed them. Each client's
    /// issuance counter per granted virtual mesh starts at 0 (see [`counters_from_zero`]);
    /// a grant removed loses its series, so that the config in force bounds them however
    /// many reloads renamed identities (one granted again starts from 0, a reset
    /// `rate()` and `increase()` take as such).
    pub fn rules_in_force(&self, rules: &crate::signer::reload::Rules) {
        self.grants_in_force(rules.authorization.clients().flat_map(|(client, grants)| {
            grants.iter().map(move |(virtual_mesh, _)| IssuedLabels {
                client: client.to_string(),
                virtual_mesh: virtual_mesh.to_string(),
            })
        }));
        self.rules_info.clear();
        self.rules_info
            .get_or_create(&RulesLabels {
                rules_sha256: rules.digest().to_string(),
                root_sha256: rules.root_sha256.clone(),
            })
            .set(1);
    }

    /// Keeps the issuance series of `granted`, each from 0 if new, and removes the others.
    fn grants_in_force(&self, granted: impl IntoIterator<Item = IssuedLabels>) {
        let granted: HashSet<IssuedLabels> = granted.into_iter().collect();
        let mut series = self.issued_series.lock().unwrap_or_else(|p| p.into_inner());
        for labels in series.difference(&granted) {
            self.intermediates_issued.remove(labels);
        }
        for labels in &granted {
            // Creating the series is the point; the counter itself is not needed here.
            drop(self.intermediates_issued.get_or_create(labels));
        }
        *series = granted;
    }

    /// A reload of the rules: `ok` (changed or not) or `error`.
    pub fn rules_reloaded(&self, ok: bool) {
        self.rules_last_reload_successful.set(i64::from(ok));
        count_outcome(&self.rules_reloads, if ok { "ok" } else { "error" });
    }

    /// A reload of the rules found `settings` read only at start that differ in the file.
    pub fn restart_pending(&self, settings: usize) {
        self.config_restart_pending
            .set(i64::try_from(settings).unwrap_or(i64::MAX));
    }

    /// Exports the audit log's count of writes + fsyncs, which against the decisions
    /// counted in `sign_requests` shows how well group commit batches, and whether its
    /// last write (or the probe that follows a failed one) succeeded: a start record that
    /// cannot be written, or a full disk with no request coming, shows there.
    pub fn watch_audit(&mut self, audit: &crate::signer::audit::AuditLog) {
        self.registry.register(
            "audit_commits",
            "Writes with fsync of the audit log; each covers one or more decisions",
            audit.commits().clone(),
        );
        self.registry.register(
            "audit_commit_duration_seconds",
            "Time of each audit log commit (its lines encoded, written and fsynced; successful ones): every decision in that write waits for it before its answer, and signing_duration_seconds does not count it",
            audit.commit_seconds().clone(),
        );
        self.registry.register(
            "audit_truncations",
            "Times the audit log was found shorter than the signer had written it (lines cut from its end in place while the signer ran): its chain breaks there; the signer's log names the bytes missing",
            audit.truncations().clone(),
        );
        self.registry.register(
            "audit_foreign_appends",
            "Times the audit log was found longer than the signer had written it (another writer appended to it while the signer ran: an older meshca, which does not lock the log, or another program): its chain breaks there; the signer's log names the bytes added",
            audit.foreign_appends().clone(),
        );
        self.registry.register(
            "audit_writable",
            "1 while the audit log takes lines (its last write succeeded, its filesystem has at least 1 MiB free, and no write has been under way for 10 s or more), 0 otherwise: nothing is issued and /readyz is 503 meanwhile",
            audit.writable().clone(),
        );
        self.registry.register(
            "audit_free_bytes",
            "Bytes free for the signer on the audit log's filesystem, looked at every 5 s; under 1 MiB the log counts as not writable",
            audit.free_bytes().clone(),
        );
    }

    /// The notAfter of the serving certificate in force (the last one loaded).
    pub fn tls_certificate_not_after(&self) -> SystemTime {
        let seconds = self.tls_certificate_not_after.load(Ordering::Relaxed);
        match u64::try_from(seconds) {
            Ok(after) => SystemTime::UNIX_EPOCH + Duration::from_secs(after),
            Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs()),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let now = unix_seconds(SystemTime::now());
        self.root_expiry_seconds
            .set(unix_seconds(self.root_not_after) - now);
        self.tls_certificate_expiry_seconds
            .set(self.tls_certificate_not_after.load(Ordering::Relaxed) - now);
        exposition(&self.registry)
    }
}

/// Registers `<prefix>_build_info{version="...",revision="..."} 1`: which build each
/// replica runs, so that a fleet half upgraded (or a replica left behind) shows in one
/// query. The revision (the git commit) tells builds apart; the version has not moved.
pub(crate) fn register_build_info(registry: &mut Registry) {
    registry.register(
        "build",
        "The meshca build this process runs",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION")),
            ("revision", crate::REVISION),
        ]),
    );
}

/// Counters by outcome, each of `outcomes` created at 0 (see [`counters_from_zero`]).
pub(crate) fn outcomes_from_zero<'a>(
    outcomes: impl IntoIterator<Item = &'a &'a str>,
) -> Family<OutcomeLabels, Counter> {
    counters_from_zero(outcomes.into_iter().map(|outcome| OutcomeLabels {
        outcome: outcome.to_string(),
    }))
}

/// Counters with each of `label_sets` created at 0, so that the first of each shows in
/// `increase()` (a series that appears at 1 has no earlier sample to differ from).
fn counters_from_zero<L>(label_sets: impl IntoIterator<Item = L>) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq,
{
    let family = Family::<L, Counter>::default();
    for labels in label_sets {
        // Creating the series is the point; the counter itself is not needed here.
        drop(family.get_or_create(&labels));
    }
    family
}

fn count_outcome(family: &Family<OutcomeLabels, Counter>, outcome: &str) {
    family
        .get_or_create(&OutcomeLabels {
            outcome: outcome.to_string(),
        })
        .inc();
}

/// The Content-Type of [`exposition`]'s text. prometheus-client writes OpenMetrics
/// (`# EOF`, counters typed under their name without `_total`): served as
/// `text/plain; version=0.0.4`, Prometheus would parse it as the older format and take
/// every counter as untyped, without its HELP.
pub const EXPOSITION_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text exposition of `registry` (served as [`EXPOSITION_CONTENT_TYPE`]).
pub(crate) fn exposition(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Seconds since the Unix epoch, negative before it.
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_refusals_help_names_every_reason() {
        let m = Metrics::new(
            SystemTime::now(),
            Validity {
                not_before: SystemTime::UNIX_EPOCH,
                not_after: SystemTime::now(),
            },
        );
        let text = m.render();
        let help = text
            .lines()
            .find(|l| l.starts_with("# HELP meshca_tls_handshakes_refused "))
            .unwrap();
        for reason in crate::tlsutil::HANDSHAKE_REFUSAL_REASONS {
            // Written `_revoked` after the first client_certificate_ one.
            let short = reason.strip_prefix("client_certificate");
            assert!(
                help.contains(reason) || short.is_some_and(|s| help.contains(&format!(" {s}"))),
                "{reason} not in {help}"
            );
        }
    }

    #[test]
    fn signing_durations_have_buckets_up_to_the_longest_token_timeout() {
        let m = Metrics::new(
            SystemTime::now(),
            Validity {
                not_before: SystemTime::UNIX_EPOCH,
                not_after: SystemTime::now(),
            },
        );
        // Just inside the longest pkcs11.timeout_seconds allowed, and the default's 20 s.
        m.signing_took(Duration::from_secs(290));
        m.signing_took(Duration::from_secs(19));
        let text = m.render();
        for needle in [
            "meshca_signing_duration_seconds_bucket{le=\"16.384\"} 0\n",
            "meshca_signing_duration_seconds_bucket{le=\"32.768\"} 1\n",
            "meshca_signing_duration_seconds_bucket{le=\"262.144\"} 1\n",
            "meshca_signing_duration_seconds_bucket{le=\"300.0\"} 2\n",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }

    #[test]
    fn a_reload_removes_the_issuance_series_of_the_grants_it_removed() {
        let now = SystemTime::now();
        let m = Metrics::new(
            now + Duration::from_secs(3600),
            Validity {
                not_before: now,
                not_after: now + Duration::from_secs(3600),
            },
        );
        let grants = |clients: std::ops::Range<usize>| {
            clients.map(|n| IssuedLabels {
                client: format!("spiffe://c{n}"),
                virtual_mesh: "ns/vm".to_string(),
            })
        };
        let series = |m: &Metrics| {
            m.render()
                .lines()
                .filter(|l| l.starts_with("meshca_intermediates_issued_total{"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        m.grants_in_force(grants(0..500));
        m.issued("spiffe://c0", "ns/vm");
        m.issued("spiffe://c1", "ns/vm");
        assert_eq!(series(&m).len(), 500);
        // 499 of 500 identities renamed: the series follow the config, not its history.
        m.grants_in_force(grants(1..2).chain(grants(1_000..1_499)));
        let after = series(&m);
        assert_eq!(after.len(), 500);
        assert!(
            !after.iter().any(|l| l.contains("\"spiffe://c0\"")),
            "{after:?}"
        );
        assert!(
            after.contains(&"meshca_intermediates_issued_total{client=\"spiffe://c1\",virtual_mesh=\"ns/vm\"} 1".to_string()),
            "{after:?}"
        );
        // One granted again starts from 0; one counted after its grant went (an issuance
        // decided under the rules replaced) goes at the next reload.
        m.issued("spiffe://c7", "ns/vm");
        m.grants_in_force(grants(0..1));
        assert_eq!(
            series(&m),
            ["meshca_intermediates_issued_total{client=\"spiffe://c0\",virtual_mesh=\"ns/vm\"} 0"]
        );
    }

    #[test]
    fn renders_every_family() {
        let now = SystemTime::now();
        let m = Metrics::new(
            now + Duration::from_secs(3600),
            Validity {
                not_before: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
                not_after: now + Duration::from_secs(450),
            },
        );
        m.request("issued");
        m.request("policy_org");
        m.signing_took(Duration::from_millis(3));
        m.backend_error();
        m.handshake_refused("client_certificate_expired");
        m.issued("spiffe://a", "test/vm");
        let text = m.render();
        for needle in [
            "meshca_sign_requests_total{outcome=\"issued\"} 1",
            "meshca_sign_requests_total{outcome=\"policy_org\"} 1",
            "meshca_signing_duration_seconds_count 1",
            "meshca_backend_errors_total 1",
            "meshca_audit_write_errors_total 0",
            "meshca_root_expiry_seconds 3",
            "meshca_tls_certificate_expiry_seconds 4",
            "meshca_tls_certificate_not_before_timestamp_seconds 1000\n",
            "meshca_tls_last_reload_successful 1",
            "meshca_rules_last_reload_successful 1",
            // Counted from 0 before the first one (see OUTCOMES_FROM_ZERO).
            "meshca_sign_requests_total{outcome=\"issuance_check_failed\"} 0",
            "meshca_sign_requests_total{outcome=\"root_expired\"} 0",
            "meshca_sign_requests_total{outcome=\"policy_proof_of_possession\"} 0",
            "meshca_tls_reloads_total{outcome=\"error\"} 0",
            "meshca_rules_reloads_total{outcome=\"error\"} 0",
            "meshca_tls_handshakes_refused_total{reason=\"client_certificate_expired\"} 1",
            "meshca_tls_handshakes_refused_total{reason=\"timeout\"} 0",
            // The API port's connections: each state and each reason from 0.
            "meshca_api_connections{state=\"handshaking\"} 0\n",
            "meshca_api_connections{state=\"idle\"} 0\n",
            "meshca_api_connections{state=\"active\"} 0\n",
            "meshca_api_connections_max 0\n",
            "meshca_api_connections_closed_total{reason=\"idle_for_new\"} 0\n",
            "meshca_api_connections_closed_total{reason=\"handshake_for_new\"} 0\n",
            "meshca_api_connections_closed_total{reason=\"all_busy\"} 0\n",
            "meshca_intermediates_issued_total{client=\"spiffe://a\",virtual_mesh=\"test/vm\"} 1",
            concat!(
                "meshca_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\",revision=\"",
                env!("MESHCA_BUILD_REVISION"),
                "\"} 1\n"
            ),
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        // The label that tells builds apart is never empty (`unknown` outside git).
        assert!(!text.contains("revision=\"\""), "{text}");
        m.tls_reloaded(None);
        m.tls_reloaded(Some(Validity {
            not_before: SystemTime::UNIX_EPOCH + Duration::from_secs(2_000),
            not_after: now + Duration::from_secs(7200),
        }));
        m.rules_reloaded(true);
        m.rules_reloaded(false);
        m.rules_reloaded(false);
        let text = m.render();
        for needle in [
            "meshca_rules_reloads_total{outcome=\"ok\"} 1",
            "meshca_rules_reloads_total{outcome=\"error\"} 2",
            "meshca_tls_reloads_total{outcome=\"ok\"} 1",
            "meshca_tls_reloads_total{outcome=\"error\"} 1",
            "meshca_tls_certificate_expiry_seconds 7",
            "meshca_tls_certificate_not_before_timestamp_seconds 2000\n",
            "meshca_tls_last_reload_successful 1",
            "meshca_rules_last_reload_successful 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
