//! The cluster agent: for every `VirtualMeshCertificateSigningRequest` in its namespace,
//! look at the target Secret, decide ([`super::rotation`]), act through the thin
//! [`super::k8s`] layer, continue the restart plan ([`super::restart`]) and write status.
//!
//! One replica acts at a time (a coordination.k8s.io Lease); every write is preceded by a
//! leadership check. The loop lists the requests on a timer rather than watching: all it
//! waits for (renewal time, ConfigMaps carrying the new root) is time-based anyway.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::jiff::Timestamp;

use super::client::{ContactRecord, PublicPolicy, SignerClient, SignerContact};
use super::crd::{Condition, Phase, VirtualMeshCertificateSigningRequest, VmcsrStatus};
use super::directory::PassMemory;
use super::election::{Elector, LeaderLoop};
use super::k8s::{Kube, KubeError, SecretAsRead, classify_secret, meshca_owner};
use super::metrics::{AgentMetrics, Reconciled};
use super::restart::{
    InstallKind, RestartRecord, Stage, StageView, Step, WorkloadKind, next_step, plan_for,
};
use super::rotation::{
    Decision, Desired, Installed, RENEWAL_HELD_BY_ROOT, TrustedRoots, check_ttl, decide,
    ends_with_known_root, normalize_fingerprint, renewal_held_by_root,
};
use super::{
    AgentError, BundleRequest, RootsPlan, check_renewable, check_signer_root, choose_key_type,
    obtain_bundle, take_announced_roots,
};
use crate::pki::bundle::{BundleFiles, BundleSummary};
use crate::signer::audit::rfc3339;

/// How often a running restart plan is looked at again (spread: [`restart_poll`]).
const RESTART_POLL: Duration = Duration::from_secs(10);

/// When to look at a running restart plan again: [`RESTART_POLL`] shortened by up to a
/// tenth as `draw` says ([`super::timing::spread`]). A root change runs the plans of many
/// clusters at once, and each pass asks the signer for its policy: at a fixed interval,
/// agents that met in one second would keep meeting. Never longer, so a namespace that
/// carries the new root still waits at most that for its restarts.
fn restart_poll(draw: u32) -> Duration {
    super::timing::spread(RESTART_POLL, draw)
}
/// Bound on restart steps in one reconcile (each stage restarts, then advances).
const MAX_RESTART_STEPS: usize = 16;

/// A new intermediate installed in a pass, announced once the pass has written its status.
struct NewIntermediate {
    serial: String,
    reason: &'static str,
}

/// What a pass learnt besides its status, for its log line and the metrics.
#[derive(Default)]
struct PassNotes {
    new_intermediate: Option<NewIntermediate>,
    /// Whether the intermediate installed after the pass ends with the signer's root (None:
    /// the signer's root was not learnt in this pass).
    ends_with_root: Option<bool>,
    /// The intermediate installed in this pass was already past its renewal time by this
    /// clock ([`super::due_on_arrival`]).
    due_on_arrival: bool,
}

/// The agent's settings (flags).
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Namespace of the requests and of the Lease.
    pub namespace: String,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// Longest time between two looks at a request.
    pub resync: Duration,
    /// The signer's CA and this cluster's client certificate (mounted from a Secret).
    pub ca_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("invalid spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Signer(#[from] AgentError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("this replica is not the leader any more; nothing written")]
    NotLeader,
    #[error(
        "{what} was created or changed by another client after this pass read it: left as that client wrote it; the next pass reads it again and decides (a Secret meshca did not create is refused unless adopt is set): {source}"
    )]
    SecretChanged { what: String, source: KubeError },
}

impl ReconcileError {
    fn reason(&self) -> &'static str {
        match self {
            ReconcileError::Spec(_) => "InvalidSpec",
            ReconcileError::Signer(e) => e.reason(),
            ReconcileError::Kube(_) => "KubernetesError",
            ReconcileError::NotLeader => "NotLeader",
            ReconcileError::SecretChanged { .. } => "SecretChanged",
        }
    }

    fn retry_after(&self, max: Duration) -> Option<Duration> {
        match self {
            ReconcileError::Signer(e) => e.retry_after(max),
            _ => None,
        }
    }
}

/// The condition that says whether the signer answered the request's last pass that asked
/// it (reason `Answered`, or `Unreachable` with the error).
pub const SIGNER_REACHABLE: &str = "SignerReachable";

/// Sets (or updates) a condition; its transition time changes only when its status does.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: SystemTime,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let new = |last_transition_time| Condition {
        type_: type_.into(),
        status: status.clone(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time,
        observed_generation: generation,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let since = if existing.status == status {
                existing.last_transition_time.clone()
            } else {
                rfc3339(now)
            };
            *existing = new(since);
        }
        None => conditions.push(new(rfc3339(now))),
    }
}

/// `namespace/name` of a request: how logs and metrics name it.
fn request_key(request: &VirtualMeshCertificateSigningRequest) -> String {
    format!(
        "{}/{}",
        request.metadata.namespace.as_deref().unwrap_or_default(),
        request.metadata.name.as_deref().unwrap_or_default()
    )
}

fn parse_time(text: &str) -> Option<SystemTime> {
    text.parse::<Timestamp>().ok().map(SystemTime::from)
}

/// Fills the installed-bundle fields of a status.
fn record_bundle(status: &mut VmcsrStatus, summary: &BundleSummary, renew_at: SystemTime) {
    status.phase = Some(Phase::Installed);
    status.serial = Some(summary.serial.clone());
    status.not_after = Some(rfc3339(summary.not_after));
    status.renew_at = Some(rfc3339(renew_at));
    status.root_fingerprint = Some(summary.anchor_fingerprint.clone());
    status.trusted_root_fingerprints = summary.root_fingerprints.clone();
}

/// The agent.
#[derive(Clone)]
pub struct Controller {
    kube: Kube,
    opts: ControllerOptions,
    elector: Elector,
    metrics: Arc<AgentMetrics>,
    /// What each request's passes remember, by `<namespace>/<name>`; dropped with the
    /// request.
    memory: Arc<Mutex<HashMap<String, RequestMemory>>>,
}

/// What one request's passes carry to the next.
#[derive(Debug, Default)]
struct RequestMemory {
    /// Its last reconciles failed: it waits out its own backoff, whatever else makes a
    /// pass come sooner.
    failing: Option<Failing>,
    /// A clock found ahead of the signer's, or behind it.
    pass: PassMemory,
}

/// A request whose last reconciles failed.
#[derive(Debug, Clone, Copy)]
struct Failing {
    /// Failures in a row.
    count: u32,
    /// The spec they were for: an edited spec is tried at once.
    generation: Option<i64>,
    retry_at: Instant,
}

/// Shortest wait after a failed reconcile (before its spread); then it doubles up to the
/// resync interval.
const LEAST_RETRY: Duration = Duration::from_secs(15);

/// Tries of a write that follows a signing (see `written_after_signing`), and the pause
/// before the second (doubling): together about what a brief API server hiccup (a leader
/// election of etcd, a restart of one API server behind a load balancer) takes.
const WRITE_AFTER_SIGNING_TRIES: u32 = 4;
const WRITE_AFTER_SIGNING_PAUSE: Duration = Duration::from_millis(500);

impl LeaderLoop for Controller {
    const PASS_FAILED: &'static str = "cannot list requests";

    fn elector(&self) -> &Elector {
        &self.elector
    }

    fn resync(&self) -> Duration {
        self.opts.resync
    }

    fn pass(&self) -> impl Future<Output = Result<Duration, KubeError>> {
        self.reconcile_all()
    }

    fn leading(&self, leading: bool) {
        self.metrics.set_leading(leading);
    }
}

impl Controller {
    pub fn new(kube: Kube, opts: ControllerOptions, metrics: Arc<AgentMetrics>) -> Self {
        metrics.set_resync(opts.resync);
        let elector = Elector::new(
            kube.clone(),
            opts.namespace.clone(),
            opts.lease_name.clone(),
            opts.identity.clone(),
            opts.lease_duration,
        );
        Controller {
            kube,
            opts,
            elector,
            metrics,
            memory: Arc::default(),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, RequestMemory>> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `key`'s passes remember (made empty if nothing yet).
    fn remembered<T>(&self, key: &str, f: impl FnOnce(&mut RequestMemory) -> T) -> T {
        f(self.memory().entry(key.to_string()).or_default())
    }

    /// How long `request` still waits after failing (None: reconcile it now).
    fn backing_off(&self, request: &VirtualMeshCertificateSigningRequest) -> Option<Duration> {
        let failing = self.memory().get(&request_key(request))?.failing?;
        let now = Instant::now();
        (failing.generation == request.metadata.generation && now < failing.retry_at)
            .then(|| failing.retry_at - now)
    }

    /// Records a failed reconcile; returns the wait before the next: 15 s, doubling after
    /// the third failure in a row, up to the resync interval, each shortened by up to a
    /// tenth at random ([`super::timing::spread`]), and at least what a busy
    /// signer asked (`retry_after`). Each attempt may generate a key and ask the signer for
    /// an intermediate (an audit line there), so a request that keeps failing (a Secret
    /// its write is refused, a signer refusing it) must not do so every 15 s forever.
    fn failed(
        &self,
        request: &VirtualMeshCertificateSigningRequest,
        retry_after: Option<Duration>,
    ) -> Duration {
        let generation = request.metadata.generation;
        self.remembered(&request_key(request), |memory| {
            let count = match memory.failing {
                Some(f) if f.generation == generation => f.count.saturating_add(1),
                _ => 1,
            };
            // Spread (requests failing together, as after a signer outage, drift apart),
            // but never shorter than what a busy signer asked.
            let wait = super::timing::wait_after_failure(
                super::timing::backoff(count, self.opts.resync).max(LEAST_RETRY),
                retry_after,
                self.opts.resync,
            );
            memory.failing = Some(Failing {
                count,
                generation,
                retry_at: Instant::now() + wait,
            });
            wait
        })
    }

    /// Before any write: still the leader (renewing if the margin ran out)?
    async fn ensure_leader(&self) -> Result<(), ReconcileError> {
        self.elector.require(ReconcileError::NotLeader).await
    }

    /// A write that follows a signing, sent again (at most [`WRITE_AFTER_SIGNING_TRIES`]
    /// times in all, a moment apart, the leadership checked before each) while the API
    /// server fails or does not answer: a pass that gave up would throw the new
    /// intermediate away, and the next pass sign another. Any other answer is final, and
    /// `failed` makes its error.
    async fn written_after_signing<T, Fut>(
        &self,
        what: &str,
        mut write: impl FnMut() -> Fut,
        failed: impl Fn(KubeError) -> ReconcileError,
    ) -> Result<T, ReconcileError>
    where
        Fut: Future<Output = Result<T, KubeError>>,
    {
        let mut pause = WRITE_AFTER_SIGNING_PAUSE;
        let mut tries = 1;
        loop {
            self.ensure_leader().await?;
            match write().await {
                Err(e) if tries < WRITE_AFTER_SIGNING_TRIES && e.is_transient() => {
                    tracing::warn!(
                        error = %e,
                        "{what} after a signing failed; trying again in {} ms",
                        pause.as_millis()
                    );
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    tries += 1;
                }
                done => return done.map_err(failed),
            }
        }
    }

    /// Whether the Secret is meshca's for `owner` and holds exactly `files` (a read that
    /// fails says no).
    async fn secret_holds(&self, ns: &str, name: &str, owner: &str, files: &BundleFiles) -> bool {
        match self.kube.get_secret(ns, name).await {
            Ok(secret) => matches!(
                classify_secret(secret.as_ref(), owner),
                Installed::Ours(held) if held == *files
            ),
            Err(_) => false,
        }
    }

    /// One pass: every request in the namespace, once.
    async fn reconcile_all(&self) -> Result<Duration, KubeError> {
        let requests = self.kube.list_requests(&self.opts.namespace).await?;
        // At most a resync away, spread: replicas of clusters started together drift apart.
        let mut next = super::timing::spread_randomly(self.opts.resync);
        for request in &requests {
            let wait = match self.backing_off(request) {
                Some(wait) => wait,
                None => self.reconcile(request, &requests).await,
            };
            next = next.min(wait);
        }
        let keys: Vec<String> = requests.iter().map(request_key).collect();
        self.memory().retain(|key, _| keys.contains(key));
        self.metrics.pass_completed(&keys, SystemTime::now());
        Ok(next.max(Duration::from_secs(1)))
    }

    /// Reconciles one request (`all`: every request of the namespace, this one included)
    /// and writes its status when it changed. Returns when to look at it again. Errors end
    /// up in status (phase Failed, lastError), never lost.
    pub async fn reconcile(
        &self,
        request: &VirtualMeshCertificateSigningRequest,
        all: &[VirtualMeshCertificateSigningRequest],
    ) -> Duration {
        let ns = request.metadata.namespace.clone().unwrap_or_default();
        let name = request.metadata.name.clone().unwrap_or_default();
        let key = request_key(request);
        let generation = request.metadata.generation;
        let before = request.status.clone().unwrap_or_default();
        let mut status = before.clone();
        let now = SystemTime::now();
        let mut notes = PassNotes::default();
        let mut contact = ContactRecord::default();
        let result = self
            .reconcile_inner(request, all, &mut status, now, &mut notes, &mut contact)
            .await;
        let (next, outcome) = match result {
            Ok(next) => {
                if let Some(memory) = self.memory().get_mut(&key) {
                    memory.failing = None;
                }
                status.last_error = None;
                (next, "ok")
            }
            Err(e) => {
                tracing::error!(request = %key, error = %e, "reconcile failed");
                status.phase = Some(Phase::Failed);
                status.last_error = Some(e.to_string());
                set_condition(
                    &mut status.conditions,
                    "Ready",
                    false,
                    e.reason(),
                    &e.to_string(),
                    generation,
                    now,
                );
                let retry = if matches!(e, ReconcileError::NotLeader) {
                    LEAST_RETRY
                } else {
                    self.failed(request, e.retry_after(self.opts.resync))
                };
                (retry, e.reason())
            }
        };
        status.observed_generation = generation;
        // The status side of `meshca_agent_signer_reachable`: `Ready` stays True on a pass
        // that needed nothing from an unreachable signer.
        let reachable = match contact.last() {
            SignerContact::Answered => Some((true, "Answered", String::new())),
            SignerContact::Unreachable => Some((
                false,
                "Unreachable",
                contact.last_error().unwrap_or_default(),
            )),
            SignerContact::NotAsked => None,
        };
        if let Some((answered, reason, message)) = reachable {
            set_condition(
                &mut status.conditions,
                SIGNER_REACHABLE,
                answered,
                reason,
                &message,
                generation,
                now,
            );
        }
        let installed = status
            .not_after
            .as_deref()
            .and_then(parse_time)
            .zip(status.renew_at.as_deref().and_then(parse_time));
        self.metrics.reconciled(
            &key,
            Reconciled {
                outcome,
                installed,
                signer: contact.last(),
                ends_with_root: notes.ends_with_root,
                restart_timed_out: Some(
                    status
                        .restart
                        .as_ref()
                        .is_some_and(|r| r.stage == Stage::TimedOut),
                ),
            },
        );
        // Only while leading: a replica that lost the Lease during the pass would overwrite
        // what the new leader wrote (and report its own NotLeader as a failure).
        if status != before {
            match self.ensure_leader().await {
                Ok(()) => {
                    if let Err(e) = self.kube.apply_status(&ns, &name, &status).await {
                        tracing::error!(request = %key, error = %e, "cannot write status");
                    }
                }
                Err(e) => {
                    tracing::warn!(request = %key, error = %e, "status not written: this replica no longer leads");
                }
            }
        }
        // Last, so whoever reads this line finds the pass's status and metrics written.
        if let Some(NewIntermediate { serial, reason }) = notes.new_intermediate {
            tracing::info!(request = %key, serial = %serial, reason, "installed a new intermediate");
        }
        next
    }

    async fn reconcile_inner(
        &self,
        request: &VirtualMeshCertificateSigningRequest,
        all: &[VirtualMeshCertificateSigningRequest],
        status: &mut VmcsrStatus,
        now: SystemTime,
        notes: &mut PassNotes,
        contact: &mut ContactRecord,
    ) -> Result<Duration, ReconcileError> {
        let spec = &request.spec;
        let ns = request.metadata.namespace.clone().unwrap_or_default();
        let name = request.metadata.name.clone().unwrap_or_default();
        let generation = request.metadata.generation;
        let owner = request_key(request);
        let virtual_mesh = spec.virtual_mesh.to_ref().map_err(ReconcileError::Spec)?;
        let mesh = spec.mesh.to_ref().map_err(ReconcileError::Spec)?;
        let target = spec
            .settings
            .target
            .to_ref()
            .map_err(ReconcileError::Spec)?;
        let rotation = spec
            .settings
            .rotation
            .settings()
            .and_then(|rotation| {
                check_ttl(spec.settings.ttl_seconds, &rotation)?;
                Ok(rotation)
            })
            .map_err(|e| ReconcileError::Spec(e.to_string()))?;
        let client = SignerClient::new(
            &spec.settings.signer.url,
            &self.opts.ca_cert,
            &self.opts.client_cert,
            &self.opts.client_key,
        )
        .map_err(AgentError::from)?;
        *contact = client.contact();
        self.metrics.client_certificate(client.client_certificate());

        let secret = self
            .kube
            .get_secret(&target.namespace, &target.name)
            .await?;
        let installed = classify_secret(secret.as_ref(), &owner);
        // The write at the end of the pass holds this read as its precondition.
        let as_read = SecretAsRead::of(secret.as_ref());
        let secret_changed = |source: KubeError| {
            if source.changed_since_read() {
                ReconcileError::SecretChanged {
                    what: format!("Secret {target}"),
                    source,
                }
            } else {
                ReconcileError::Kube(source)
            }
        };
        // Adopting a Secret another request holds would have the two take it from each
        // other at every pass (a new intermediate each time). One that no request here
        // targets any more (deleted, or pointed elsewhere) is free to adopt; a holder in
        // another namespace is another agent's, which this one cannot see.
        if let Some(holder) = secret.as_ref().and_then(meshca_owner)
            && holder != owner
            && all.iter().any(|other| {
                request_key(other) == holder
                    && other.spec.settings.target.to_ref().as_ref() == Ok(&target)
            })
        {
            return Err(AgentError::HeldByAnotherRequest {
                what: format!("Secret {target}"),
                holder: holder.to_string(),
            }
            .into());
        }
        let pin = spec.settings.rotation.root_pin();
        let trusted = TrustedRoots::of(
            &installed,
            &spec.settings.rotation.retired_root_fingerprints,
        );
        let mut policy = client
            .policy_for_pass(&virtual_mesh)
            .await
            .map_err(AgentError::from)?;
        if let Ok(policy) = &mut policy {
            take_announced_roots(policy, &pin, &trusted);
        }
        let (signer_root, signer_announced) = PublicPolicy::signer_roots(policy.as_ref().ok());
        let desired = Desired {
            mesh_name: mesh.name.clone(),
            key_type: spec.settings.key_type,
            accepted_key_types: policy
                .as_ref()
                .ok()
                .map(|policy| policy.accepted_key_types.clone()),
            adopt: spec.settings.adopt,
            signer_root,
            signer_root_not_after: PublicPolicy::root_end(policy.as_ref().ok()),
            signer_announced,
            retired_roots: spec.settings.rotation.retired_root_fingerprints.clone(),
            rotation,
        };
        if let Ok(policy) = &policy {
            // Kept as last heard while the signer cannot be asked: the mesh controller
            // must not retire an announced root because one pass failed.
            status.next_root_fingerprint = policy
                .next_root_fingerprint_sha256
                .as_deref()
                .map(normalize_fingerprint);
        }
        if status.phase.is_none() {
            status.phase = Some(Phase::Pending);
        }
        let renew_at = match decide(&installed, &desired, now) {
            Decision::Refuse { what } => return Err(AgentError::Foreign(what).into()),
            Decision::Shadowed { what } => return Err(AgentError::Shadowed(what).into()),
            Decision::UpToDate { summary, renew_at } => {
                if let Ok(policy) = &policy {
                    check_renewable(
                        policy,
                        &mesh,
                        spec.settings.key_type,
                        spec.settings.ttl_seconds,
                    )?;
                    // A renewal would be refused by the pin too: say so now.
                    check_signer_root(policy, &pin, &trusted)?;
                }
                if let Err(e) = &policy {
                    tracing::warn!(request = %owner, error = %e, "signer unavailable; installed bundle valid and not due");
                }
                notes.ends_with_root = ends_with_known_root(&summary, &desired);
                let held = renewal_held_by_root(&summary, &desired, now);
                if held {
                    tracing::warn!(request = %owner, not_after = %rfc3339(summary.not_after), "{RENEWAL_HELD_BY_ROOT}");
                }
                if matches!(installed, Installed::Ours(_)) {
                    record_bundle(status, &summary, renew_at);
                }
                // Past its renewal time, the next look is a resync away, not at once.
                if held {
                    now + self.opts.resync
                } else {
                    renew_at
                }
            }
            Decision::RewriteRoots {
                root_cert,
                summary,
                renew_at,
            } => {
                let Installed::Ours(files) = &installed else {
                    return Err(ReconcileError::Spec("rewrite without a bundle".into()));
                };
                let left_out = super::rotation::roots_left_out(
                    &files.root_cert,
                    &root_cert,
                    &spec.settings.rotation.retired_root_fingerprints,
                    now,
                );
                let files = BundleFiles {
                    root_cert,
                    ..files.clone()
                };
                // istiod takes the changed roots only when it starts: the plan (istiod
                // alone) is recorded before the write, as for a new intermediate.
                if let Some(plan) = plan_for(
                    spec.settings.restart.policy,
                    InstallKind::RootsOnly,
                    &summary.serial,
                    &summary.anchor_fingerprint,
                    &files.root_cert,
                    status.restart.as_ref(),
                    &rfc3339(now),
                ) {
                    status.restart = Some(plan);
                    self.ensure_leader().await?;
                    self.kube.apply_status(&ns, &name, status).await?;
                }
                self.ensure_leader().await?;
                self.kube
                    .write_secret(&target.namespace, &target.name, &owner, &files, &as_read)
                    .await
                    .map_err(secret_changed)?;
                tracing::info!(request = %owner, "root-cert.pem rewritten (a root the signer announces added, or an old root retired or expired)");
                super::log_roots_left_out(&left_out);
                notes.ends_with_root = ends_with_known_root(&summary, &desired);
                record_bundle(status, &summary, renew_at);
                renew_at
            }
            Decision::Issue {
                reason,
                previous_roots,
            } => {
                // The last intermediate the signer made for this request had expired by
                // this clock: until it agrees, another would be signed for nothing.
                self.remembered(&owner, |memory| memory.pass.check_clock_at(now))?;
                let policy = policy.map_err(AgentError::from)?;
                // A key type the policy refuses fails here, before the dry run and the
                // `Requested` status: nothing is asked of anyone for it.
                let key_type = choose_key_type(
                    &policy.accepted_key_types,
                    spec.settings.key_type,
                    &policy.virtual_mesh,
                )?;
                // A root this request does not accept fails here too: nothing is asked.
                check_signer_root(&policy, &pin, &trusted)?;
                // An intermediate the Secret could not take would be signed (and audited)
                // for nothing at each attempt.
                self.kube
                    .check_secret_write(&target.namespace, &target.name, &owner, &as_read)
                    .await
                    .map_err(secret_changed)?;
                tracing::info!(request = %owner, reason = %reason, "requesting a new intermediate");
                status.phase = Some(Phase::Requested);
                // A replica that no longer leads asks the signer for nothing.
                self.ensure_leader().await?;
                self.kube.apply_status(&ns, &name, status).await?;
                let obtained = obtain_bundle(
                    &client,
                    &policy,
                    &BundleRequest {
                        virtual_mesh,
                        mesh,
                        key_type: Some(key_type),
                        ttl_seconds: spec.settings.ttl_seconds,
                        roots: RootsPlan::Merge {
                            installed: previous_roots,
                            retired: spec.settings.rotation.retired_root_fingerprints.clone(),
                        },
                        pin,
                        trusted,
                    },
                )
                .await
                .inspect_err(|e| self.remembered(&owner, |memory| memory.pass.remember(e)))?;
                let summary = &obtained.summary;
                status.phase = Some(Phase::Issued);
                status.serial = Some(summary.serial.clone());
                let kind = match &installed {
                    // Files missing from meshca's Secret: an istiod started since found no
                    // ca-key.pem and runs on its self-signed CA, which only a restart (and
                    // the workloads' new certificates) undoes, as at a first install.
                    // So does a Secret adopted without a CA istiod could sign with.
                    Installed::None
                    | Installed::Unreadable { .. }
                    | Installed::Foreign { plugged: false, .. } => InstallKind::FirstInstall,
                    Installed::Ours(files) => InstallKind::Replacement {
                        roots_changed: files.root_cert != obtained.files.root_cert,
                    },
                    Installed::Shadowed { .. } => InstallKind::Replacement {
                        roots_changed: true,
                    },
                    Installed::Foreign { root_cert, .. } => InstallKind::Replacement {
                        roots_changed: root_cert.as_deref() != Some(&obtained.files.root_cert),
                    },
                };
                // Recorded with the serial, before the Secret is written: a replica that
                // loses the Lease (or fails) right after the write leaves the new leader
                // the plan to carry out, not a new bundle without one.
                if let Some(plan) = plan_for(
                    spec.settings.restart.policy,
                    kind,
                    &summary.serial,
                    &summary.anchor_fingerprint,
                    &obtained.files.root_cert,
                    status.restart.as_ref(),
                    &rfc3339(now),
                ) {
                    status.restart = Some(plan);
                }
                let status_now = &*status;
                self.written_after_signing(
                    "the status write",
                    || self.kube.apply_status(&ns, &name, status_now),
                    ReconcileError::Kube,
                )
                .await?;
                // The status write may have outlasted the Lease's margin (a slow API
                // server): a replica no longer leading leaves the Secret to the new leader
                // (the leadership is looked at before each try).
                let written = self
                    .written_after_signing(
                        "the Secret write",
                        || {
                            self.kube.write_secret(
                                &target.namespace,
                                &target.name,
                                &owner,
                                &obtained.files,
                                &as_read,
                            )
                        },
                        secret_changed,
                    )
                    .await;
                // A try whose answer was lost may have written it: the next try's
                // precondition then fails on this pass's own write, not another client's.
                if let Err(ReconcileError::SecretChanged { .. }) = &written
                    && self
                        .secret_holds(&target.namespace, &target.name, &owner, &obtained.files)
                        .await
                {
                    tracing::info!(request = %owner, "the Secret holds this pass's bundle: a write whose answer was lost had landed");
                } else {
                    written?;
                }
                super::log_roots_left_out(&obtained.roots_left_out);
                let renew_at = super::rotation::renew_at(
                    summary.not_before,
                    summary.not_after,
                    &summary.serial,
                    &rotation,
                );
                notes.ends_with_root = ends_with_known_root(summary, &desired);
                notes.new_intermediate = Some(NewIntermediate {
                    serial: summary.serial.clone(),
                    reason: reason.code(),
                });
                self.metrics.issued();
                record_bundle(status, summary, renew_at);
                notes.due_on_arrival = super::due_on_arrival(
                    &owner.to_string(),
                    summary,
                    renew_at,
                    notes.ends_with_root,
                    now,
                    self.opts.resync,
                );
                renew_at
            }
        };
        set_condition(
            &mut status.conditions,
            "Ready",
            true,
            "Installed",
            "a valid intermediate is installed",
            generation,
            now,
        );

        let mut next = match notes.due_on_arrival {
            true => self.opts.resync,
            false => renew_at
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                .min(self.opts.resync),
        };
        // `never` also stops a plan already under way.
        let restarts_allowed = spec.settings.restart.policy != super::restart::RestartPolicy::Never;
        if restarts_allowed && let Some(mut record) = status.restart.take() {
            let progress = self
                .progress_restarts(request, &target.namespace, &mut record, now)
                .await;
            let final_stage = record.stage;
            let on_delete = (!record.rolls_on_delete.is_empty()).then(|| {
                format!(
                    "updateStrategy OnDelete, so pods take the new certificates only when deleted: {}",
                    record.rolls_on_delete.join(", ")
                )
            });
            let message = [record.message.clone(), on_delete]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ");
            status.restart = Some(record);
            progress?;
            let (done, reason) = match final_stage {
                Stage::Complete => (true, "Complete"),
                Stage::TimedOut => (false, "TimedOut"),
                _ => (false, "InProgress"),
            };
            set_condition(
                &mut status.conditions,
                "Restarted",
                done,
                reason,
                &message,
                generation,
                now,
            );
            if !final_stage.is_final() {
                next = next.min(restart_poll(super::timing::random_draw()));
            }
        }
        Ok(next)
    }

    /// Advances the restart plan as far as it can go now (bounded).
    async fn progress_restarts(
        &self,
        request: &VirtualMeshCertificateSigningRequest,
        istiod_namespace: &str,
        record: &mut RestartRecord,
        now: SystemTime,
    ) -> Result<(), ReconcileError> {
        let spec = &request.spec.settings.restart;
        let bound = Duration::from_secs(spec.wait_seconds);
        for _ in 0..MAX_RESTART_STEPS {
            if record.stage.is_final() {
                return Ok(());
            }
            let scopes: Vec<(&str, &str)> = match record.stage {
                Stage::Istiod => vec![(istiod_namespace, spec.istiod_selector.as_str())],
                Stage::Gateways => spec
                    .gateway_namespaces
                    .iter()
                    .map(|ns| (ns.as_str(), spec.gateway_selector.as_str()))
                    .collect(),
                Stage::Workloads => spec
                    .workload_namespaces
                    .iter()
                    .map(|ns| (ns.as_str(), spec.workload_selector.as_str()))
                    .collect(),
                Stage::Complete | Stage::TimedOut => vec![],
            };
            let mut view = StageView::default();
            for (ns, selector) in scopes {
                for &kind in WorkloadKind::of_stage(record.stage) {
                    view.targets
                        .extend(self.kube.list_workloads(kind, ns, selector).await?);
                }
            }
            if record.stage != Stage::Istiod {
                let namespaces: std::collections::BTreeSet<String> =
                    view.targets.iter().map(|t| t.namespace.clone()).collect();
                for ns in namespaces {
                    let carried = self
                        .kube
                        .root_configmap(&ns)
                        .await?
                        .is_some_and(|pem| record.namespace_ready(&pem));
                    if carried {
                        view.ready_namespaces.insert(ns);
                    }
                }
            }
            let started = parse_time(&record.stage_started).unwrap_or(now);
            match next_step(record, &view, started, now, bound) {
                Step::Restart(targets) => {
                    for target in targets {
                        // Before each: a stage may restart many workloads, each patch
                        // taking up to the API timeout, and a replica that lost the Lease
                        // meanwhile must not restart the rest beside the new leader.
                        self.ensure_leader().await?;
                        self.kube
                            .restart_workload(&target, &record.plan_key(), now)
                            .await?;
                        if target.rolls_on_delete {
                            tracing::warn!(workload = %target.id(), serial = %record.serial, "rolling restart requested, but its updateStrategy is OnDelete: its pods keep the old certificates until they are deleted");
                            record.rolls_on_delete.push(target.id());
                        } else {
                            tracing::info!(workload = %target.id(), serial = %record.serial, "rolling restart");
                        }
                        record.restarted.push(target.id());
                    }
                }
                Step::Advance(stage) => {
                    record.stage = stage;
                    record.stage_started = rfc3339(now);
                    record.message = None;
                }
                Step::Wait { namespaces } => {
                    record.message = Some(format!(
                        "waiting for {} in {} to carry root sha256 {}",
                        super::k8s::ROOT_CONFIGMAP,
                        namespaces.join(", "),
                        record.root_fingerprint
                    ));
                    return Ok(());
                }
                Step::TimeOut { namespaces } => {
                    record.stage = Stage::TimedOut;
                    record.message = Some(format!(
                        "{} in {} did not carry the new root within {}s; no further restarts for serial {} (restart those workloads by hand once it does)",
                        super::k8s::ROOT_CONFIGMAP,
                        namespaces.join(", "),
                        spec.wait_seconds,
                        record.serial
                    ));
                    return Ok(());
                }
                Step::WaitRollout { workloads } => {
                    record.message = Some(format!(
                        "waiting for the rollout of {}: the new pods serve with the new files once it is done",
                        workloads.join(", ")
                    ));
                    return Ok(());
                }
                Step::RolloutTimeOut { workloads } => {
                    record.stage = Stage::TimedOut;
                    record.message = Some(format!(
                        "the rollout of {} did not finish within {}s; no further restarts for serial {} (see `kubectl rollout status`; restart the gateways and workloads by hand once it has)",
                        workloads.join(", "),
                        spec.wait_seconds,
                        record.serial
                    ));
                    return Ok(());
                }
                Step::NoIstiod { timed_out } => {
                    let selector = &spec.istiod_selector;
                    record.message = Some(if timed_out {
                        record.stage = Stage::TimedOut;
                        format!(
                            "no Deployment in {istiod_namespace} matched restart.istiodSelector {selector:?} within {}s; no restarts for serial {} (restart istiod by hand, and after a first install its gateways and workloads)",
                            spec.wait_seconds, record.serial
                        )
                    } else {
                        format!(
                            "no Deployment in {istiod_namespace} matches restart.istiodSelector {selector:?}: istiod keeps the CA it started with (its self-signed one before a first install) until it restarts; correct the selector, or set restart.policy never and restart istiod by hand"
                        )
                    });
                    return Ok(());
                }
                Step::Done => return Ok(()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Agents whose restart plans run together look again at different times, each within
    /// [0.9, 1.0] of the poll: never later than it.
    #[test]
    fn restart_plans_are_looked_at_again_spread_below_the_poll() {
        let draws = [0, 1 << 30, 1 << 31, u32::MAX];
        let polls: std::collections::BTreeSet<Duration> =
            draws.iter().map(|draw| restart_poll(*draw)).collect();
        assert_eq!(polls.len(), draws.len(), "{polls:?}");
        assert!(
            polls
                .iter()
                .all(|p| *p <= RESTART_POLL && *p >= RESTART_POLL * 9 / 10),
            "{polls:?}"
        );
        assert_eq!(restart_poll(0), RESTART_POLL);
    }

    #[test]
    fn conditions_keep_their_transition_time_until_status_changes() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t1 = t0 + Duration::from_secs(60);
        let mut conditions = vec![];
        set_condition(
            &mut conditions,
            "Ready",
            true,
            "Installed",
            "ok",
            Some(1),
            t0,
        );
        set_condition(
            &mut conditions,
            "Ready",
            true,
            "Installed",
            "ok again",
            Some(2),
            t1,
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, rfc3339(t0));
        assert_eq!(conditions[0].message, "ok again");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set_condition(
            &mut conditions,
            "Ready",
            false,
            "SignerError",
            "down",
            Some(2),
            t1,
        );
        assert_eq!(conditions[0].last_transition_time, rfc3339(t1));
        assert_eq!(conditions[0].status, "False");
        set_condition(&mut conditions, "Restarted", true, "Complete", "", None, t1);
        assert_eq!(conditions.len(), 2);
    }

    #[test]
    fn status_times_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_time(&rfc3339(t)), Some(t));
        assert_eq!(parse_time("yesterday"), None);
    }
}
