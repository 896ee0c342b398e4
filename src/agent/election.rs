//! Leader election with a coordination.k8s.io Lease, so that one replica acts at a time:
//! used by the agent and by the mesh controller. The rules are [`super::k8s::lease_action`]
//! and [`super::k8s::lease_spec`]; this is the I/O around them, and [`LeaderLoop`], the
//! elect-then-pass loop both controllers run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::k8s::{Kube, KubeError, LeaseAction, lease_action, lease_spec, vanished_lease_action};

/// One replica's view of a Lease.
#[derive(Clone)]
pub struct Elector {
    kube: Kube,
    namespace: String,
    lease_name: String,
    identity: String,
    duration: Duration,
    /// Until when this replica holds the Lease (as last written by it), on this host's
    /// monotonic clock: a step of the wall clock neither stretches nor cuts it.
    leader_until: Arc<Mutex<Option<Instant>>>,
    /// The Lease as last read, and since when it has read so (client-go's observed
    /// record and time). Another replica's Lease is expired once it has not changed for its
    /// duration, measured here: its renewTime is the holder's clock, and comparing that
    /// with this host's would let a skew of the clocks make two leaders at once. Kept
    /// while the Lease is gone: its holder may still be acting on it.
    observed: Arc<Mutex<Option<(LeaseSpec, Instant)>>>,
    /// One round at a time: the renewer and a pass's check before a write would otherwise
    /// both read the Lease at one version, and the one whose write came second would
    /// take its own renewal's 409 for another replica's and stop leading.
    electing: Arc<tokio::sync::Mutex<()>>,
    /// This process has led before: a renewal after the lead was lost says "leading
    /// again", a first one (the Lease still in this name from before a restart) "became
    /// the leader".
    has_led: Arc<std::sync::atomic::AtomicBool>,
}

/// A replica renews before a write when it would hold the Lease for less than this (with
/// a Lease shorter than 7.5 s, before every write).
const WRITE_MARGIN: Duration = Duration::from_secs(5);

impl Elector {
    pub fn new(
        kube: Kube,
        namespace: impl Into<String>,
        lease_name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        Elector {
            kube,
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            duration,
            leader_until: Arc::new(Mutex::new(None)),
            observed: Arc::new(Mutex::new(None)),
            electing: Arc::default(),
            has_led: Arc::default(),
        }
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    fn set_leader_until(&self, until: Option<Instant>) {
        if let Ok(mut guard) = self.leader_until.lock() {
            *guard = until;
        }
    }

    /// Whether this replica will still hold the Lease `margin` from now.
    pub fn is_leader_for(&self, margin: Duration) -> bool {
        self.leader_until
            .lock()
            .ok()
            .and_then(|g| *g)
            .is_some_and(|until| until > Instant::now() + margin)
    }

    /// How long the Lease has read as `spec` here (zero when it just changed).
    fn unchanged_for(&self, spec: &LeaseSpec) -> Duration {
        let Ok(mut observed) = self.observed.lock() else {
            return Duration::ZERO;
        };
        match &*observed {
            Some((seen, since)) if seen == spec => since.elapsed(),
            _ => {
                *observed = Some((spec.clone(), Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// With no Lease to read: what the last one read here says ([`vanished_lease_action`]).
    fn vanished(&self) -> LeaseAction {
        let Ok(observed) = self.observed.lock() else {
            return LeaseAction::Create;
        };
        match &*observed {
            Some((last, since)) => {
                vanished_lease_action(Some(last), &self.identity, since.elapsed())
            }
            None => LeaseAction::Create,
        }
    }

    /// One round: create, renew or take over the Lease, or follow. True when this replica
    /// leads. `now` is the time written into the Lease.
    pub async fn elect(&self, now: SystemTime) -> Result<bool, KubeError> {
        let _one_round = self.electing.lock().await;
        self.elect_alone(now).await
    }

    /// [`Elector::elect`], with no other round of this replica under way.
    async fn elect_alone(&self, now: SystemTime) -> Result<bool, KubeError> {
        let (ns, name) = (&self.namespace, &self.lease_name);
        let was_leading = self.is_leader_for(Duration::ZERO);
        // Before the read: the Lease is ours for its duration from no later than this.
        let started = Instant::now();
        let current = self.kube.get_lease(ns, name).await?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let action = match spec {
            Some(spec) => lease_action(Some(spec), &self.identity, self.unchanged_for(spec)),
            None => self.vanished(),
        };
        if let LeaseAction::Follow { holder } = &action {
            if spec.is_none() {
                tracing::info!(%holder, lease = %name, "the Lease is gone while another replica held it: left for that replica to create again, or taken once it would have expired");
            } else {
                tracing::debug!(%holder, "another replica leads");
            }
            self.set_leader_until(None);
            return Ok(false);
        }
        let spec = lease_spec(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            self.duration,
            &action,
            now,
        );
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.kube.create_lease(ns, &lease).await
            }
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.kube.replace_lease(ns, name, &lease).await
            }
        };
        match result {
            Ok(_) => {
                let led_before = self.has_led.swap(true, std::sync::atomic::Ordering::SeqCst);
                if action != LeaseAction::Renew || !led_before {
                    tracing::info!(identity = %self.identity, lease = %name, "became the leader");
                } else if !was_leading {
                    // After failed renewals (each a WARN): say it is over.
                    tracing::info!(identity = %self.identity, lease = %name, "leading again: the Lease, still under this replica's name, is renewed");
                }
                // Keep a margin: act only while the Lease is surely ours.
                self.set_leader_until(Some(started + self.duration * 2 / 3));
                Ok(true)
            }
            // Someone else wrote the Lease in between (409) or created it first.
            Err(e) if matches!(e.code(), Some(409)) => {
                self.set_leader_until(None);
                Ok(false)
            }
            Err(e) => {
                self.set_leader_until(None);
                Err(e)
            }
        }
    }

    /// Before a write: still the leader (renewing when the margin runs out)?
    pub async fn ensure(&self) -> Result<bool, KubeError> {
        if self.is_leader_for(WRITE_MARGIN) {
            return Ok(true);
        }
        let _one_round = self.electing.lock().await;
        // The renewer may have renewed while this waited.
        Ok(self.is_leader_for(WRITE_MARGIN) || self.elect_alone(SystemTime::now()).await?)
    }

    /// [`Elector::ensure`] as a step of a pass: `not_leader` when this replica does not lead.
    pub async fn require<E: From<KubeError>>(&self, not_leader: E) -> Result<(), E> {
        if self.ensure().await? {
            Ok(())
        } else {
            Err(not_leader)
        }
    }

    /// On shutdown: give the Lease up so another replica need not wait for it to expire.
    pub async fn release(&self) -> Result<(), KubeError> {
        let _one_round = self.electing.lock().await;
        self.set_leader_until(None);
        let (ns, name) = (&self.namespace, &self.lease_name);
        let Some(mut lease) = self.kube.get_lease(ns, name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.kube.replace_lease(ns, name, &lease).await.map(|_| ())
    }

    /// Renews the Lease (or, following, reads it) every third of its duration, spread
    /// ([`renewal_interval`]), until the task is aborted.
    pub fn spawn_renewer(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.elect(SystemTime::now()).await {
                    tracing::warn!(error = %e, "leader election failed");
                }
                let wait = renewal_interval(this.duration, super::timing::random_draw());
                tokio::time::sleep(wait).await;
            }
        })
    }
}

/// The wait between two rounds of the renewer (each reads the Lease, and the holder
/// writes it): a third of the Lease's `duration`, shortened by up to a tenth as `draw`
/// says ([`super::timing::spread`]), so that replicas started together (a rollout) do not
/// read it in the same second for as long as they run. Never longer than the third: the
/// holder acts for two thirds of the duration from each renewal, so that one round may
/// fail and the next still renews in time.
fn renewal_interval(duration: Duration, draw: u32) -> Duration {
    super::timing::spread(duration / 3, draw)
}

/// How long the stop waits for the Lease to be given up: inside the 10 s the Deployments'
/// terminationGracePeriodSeconds leave after the default stop grace.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// A pass under way when the stop came: finished if it ends within `grace`, else cut short
/// (None). Cutting it is what a kill after the pod's grace period would do; the writes are
/// each whole and the next leader decides again from what is written.
async fn finish_within<T>(grace: Duration, pass: impl Future<Output = T>) -> Option<T> {
    tracing::info!(
        grace_seconds = grace.as_secs(),
        "stop requested during a pass: it may finish within the grace, then the Lease is given up"
    );
    match tokio::time::timeout(grace, pass).await {
        Ok(outcome) => Some(outcome),
        Err(_) => {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                "stop requested: the pass under way did not finish within the grace and was cut short; the next leader decides again from what was written (an intermediate signed but not yet written is asked for again)"
            );
            None
        }
    }
}

/// A controller that acts only while its replica holds the Lease (the agent, the mesh
/// controller). They differ in what one pass does; electing, pacing, backing off after a
/// failed pass and giving the Lease up at the end are this trait's.
pub trait LeaderLoop: Sized {
    /// What a failed pass could not do (logged).
    const PASS_FAILED: &'static str;

    fn elector(&self) -> &Elector;

    /// Longest time between two passes (and the bound of the backoff after failures).
    fn resync(&self) -> Duration;

    /// One pass over everything the controller reconciles; returns when to come back.
    fn pass(&self) -> impl Future<Output = Result<Duration, KubeError>>;

    /// Told before each step whether this replica leads (for metrics; nothing by default).
    fn leading(&self, _leading: bool) {}

    /// Elect, then (as leader) one pass. Returns when to come back.
    fn run_once(&self) -> impl Future<Output = Result<Duration, KubeError>> {
        async move { self.run_once_led().await.map(|(_, next)| next) }
    }

    /// [`LeaderLoop::run_once`], saying also whether this replica led (and so made the
    /// pass). A pass that fails gives the Lease back (a successful one leaves that to the
    /// caller, which checks first that it still leads).
    fn run_once_led(&self) -> impl Future<Output = Result<(bool, Duration), KubeError>> {
        async move {
            let elector = self.elector();
            let leading = elector.elect(SystemTime::now()).await?;
            self.leading(leading);
            if !leading {
                return Ok((false, Duration::from_secs(5).min(elector.duration() / 3)));
            }
            match self.pass().await {
                Ok(next) => Ok((true, next)),
                // A one-off pass (a Job, a laptop) that failed must not keep the replicas
                // waiting for the Lease to expire either.
                Err(e) => {
                    if let Err(release) = self.release().await {
                        tracing::warn!(error = %release, "could not give the Lease up; it expires by itself");
                    }
                    Err(e)
                }
            }
        }
    }

    /// On shutdown: give the Lease up so another replica need not wait for it to expire.
    fn release(&self) -> impl Future<Output = Result<(), KubeError>> {
        self.elector().release()
    }

    /// The long-running controller: a lease-renewal task and a pass whenever due while
    /// leading, until `shutdown` resolves; then the Lease is given up. A pass under way at
    /// `shutdown` may finish for `stop_grace`, then it is cut short (as a kill would cut
    /// it, but with the Lease given up, so the next replica need not wait for it).
    fn run(
        self,
        shutdown: impl Future<Output = ()>,
        stop_grace: Duration,
    ) -> impl Future<Output = ()> {
        async move {
            let renewer = self.elector().spawn_renewer();
            tokio::pin!(shutdown);
            let mut failures = 0u32;
            loop {
                let leading = self.elector().is_leader_for(Duration::ZERO);
                self.leading(leading);
                let mut stopping = false;
                let delay = if leading {
                    let pass = self.pass();
                    tokio::pin!(pass);
                    let outcome = tokio::select! {
                        outcome = &mut pass => Some(outcome),
                        _ = &mut shutdown => {
                            stopping = true;
                            finish_within(stop_grace, pass).await
                        }
                    };
                    match outcome {
                        Some(Ok(delay)) => {
                            failures = 0;
                            delay
                        }
                        Some(Err(e)) => {
                            failures += 1;
                            let delay = super::timing::spread_randomly(super::timing::backoff(
                                failures,
                                self.resync(),
                            ));
                            tracing::error!(error = %e, retry_in_seconds = super::timing::log_seconds(delay), "{}", Self::PASS_FAILED);
                            delay
                        }
                        None => Duration::ZERO,
                    }
                } else {
                    // Not spread: this reads only the elector's memory (the renewer reads
                    // the Lease), and 2 s is how soon a new leader makes its first pass.
                    Duration::from_secs(2)
                };
                if stopping {
                    break;
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            renewer.abort();
            // Bounded well inside the pod's grace period (the stop grace took most of it):
            // an API server slow enough to have held the pass would otherwise see the
            // kubelet kill the pod mid-release, the Lease held for its whole duration.
            match tokio::time::timeout(RELEASE_WAIT, self.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot release the Lease; it expires by itself")
                }
                Err(_) => tracing::warn!(
                    wait_seconds = RELEASE_WAIT.as_secs(),
                    "the API server did not answer the Lease's release in time; it expires by itself"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replicas started together read the Lease at different times, each within
    /// [0.9, 1.0] of a third of its duration: never later, so the holder still renews
    /// well inside the two thirds it acts for.
    #[test]
    fn lease_rounds_are_spread_below_a_third_of_the_duration() {
        let duration = Duration::from_secs(30);
        let third = duration / 3;
        let draws = [0, 1 << 30, 1 << 31, u32::MAX];
        let waits: std::collections::BTreeSet<Duration> = draws
            .iter()
            .map(|draw| renewal_interval(duration, *draw))
            .collect();
        assert_eq!(waits.len(), draws.len(), "{waits:?}");
        assert!(
            waits.iter().all(|w| *w <= third && *w >= third * 9 / 10),
            "{waits:?}"
        );
        assert_eq!(renewal_interval(duration, 0), third);
        // The shortest Lease (3 s) too.
        let short = renewal_interval(Duration::from_secs(3), u32::MAX);
        assert!(short < Duration::from_secs(1) && short >= Duration::from_millis(900));
    }
}
