//! The plain-HTTP listener of the ops endpoints (`/metrics`, `/healthz`, `/readyz`) of the
//! signer and the controllers: at most [`MAX_OPS_CONNECTIONS`] at once, each cut off when
//! a request's headers take longer than [`OPS_HEADER_TIMEOUT`] (idle keep-alive included).
//! Unauthenticated clients reach it, so a pile of half-sent requests must not use up the
//! process's file descriptors (and with them the signer's API port), nor keep the
//! kubelet's probes out: a connection beyond the bound takes the slot of the one idle
//! longest (no request under way), and is closed at once only if every slot is serving a
//! request. [`OpsConnectionMetrics`] counts both. The accept loop with its connection
//! bound ([`accept_admitted`], [`ConnectionBound`]) is the API port's too, which bounds
//! its connections in their TLS handshake besides.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::signer::ratelimit::{LogThrottle, RateLimit};

/// Connections served at once. A scraper or a probe holds one or two; beyond these, the
/// connection idle longest is closed for the new one.
pub const MAX_OPS_CONNECTIONS: usize = 64;

/// New connections a port's bound lets wait at once for the slots of those it closed for
/// them (each closed one ends within a moment); beyond, a new one is closed at once. Each
/// waiting one holds a file beside the slots' (see `open_files_needed`).
pub const MAX_WAITING_FOR_SLOT: usize = 16;

/// Longest wait for a request's headers, the first one or the next on a kept-alive
/// connection. Short: probes and scrapers send theirs at once (the kubelet's probes time
/// out after 1 s by default), and a slot held idle is a slot a probe may need.
pub const OPS_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection was closed by a port's bound on connections.
pub(crate) const CLOSED_IDLE: &str = "idle_for_new";
pub(crate) const CLOSED_HANDSHAKE: &str = "handshake_for_new";
pub(crate) const CLOSED_ALL_BUSY: &str = "all_busy";

/// What the bound closes is logged in a burst, then one a second per reason: a flood's
/// peers are named without a line per connection.
const CLOSING_LOG_LIMIT: RateLimit = RateLimit {
    per_minute: 60,
    burst: 20,
};

/// Where a connection is: in its TLS handshake (the API port only), open with no request
/// under way, or serving one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshaking,
    Idle,
    Active,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Handshaking, Phase::Idle, Phase::Active];

    fn label(self) -> &'static str {
        match self {
            Phase::Handshaking => "handshaking",
            Phase::Idle => "idle",
            Phase::Active => "active",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// A port's connections, for the registry of the process serving it: how many are open
/// (on the API port by state), and how many the bound closed, by reason.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    open: Gauge,
    /// The API port's open connections by [`Phase`] (None on an ops port).
    by_state: Option<Family<StateLabels, Gauge>>,
    max: Gauge,
    closed: Family<ReasonLabels, Counter>,
}

/// The ops port's: `ops_connections` and `ops_connections_closed_total`.
pub type OpsConnectionMetrics = ConnectionMetrics;

impl ConnectionMetrics {
    /// Registers `ops_connections` and `ops_connections_closed_total` in `registry`: how
    /// many are open, and how many the bound closed (`idle_for_new`: idle, closed to
    /// serve a new one; `all_busy`: new, closed at once as every slot was serving a
    /// request). Many of either mean more clients than [`MAX_OPS_CONNECTIONS`] (or
    /// someone holding connections open).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ConnectionMetrics::default();
        metrics.closed_from_zero(&[CLOSED_IDLE, CLOSED_ALL_BUSY]);
        registry.register(
            "ops_connections",
            "Open connections on the ops port (metrics, health)",
            metrics.open.clone(),
        );
        registry.register(
            "ops_connections_closed",
            "Connections of the ops port closed by its connection bound, by reason (idle_for_new: idle, closed for a new one; all_busy: new, closed at once as every slot was serving a request)",
            metrics.closed.clone(),
        );
        metrics
    }

    /// Registers the API port's `api_connections{state}`, `api_connections_max` and
    /// `api_connections_closed_total{reason}` in `registry`.
    pub fn register_api(registry: &mut Registry) -> Self {
        let by_state = Family::<StateLabels, Gauge>::default();
        for phase in Phase::ALL {
            drop(by_state.get_or_create(&StateLabels {
                state: phase.label().into(),
            }));
        }
        let metrics = ConnectionMetrics {
            by_state: Some(by_state.clone()),
            ..ConnectionMetrics::default()
        };
        metrics.closed_from_zero(&[CLOSED_IDLE, CLOSED_HANDSHAKE, CLOSED_ALL_BUSY]);
        registry.register(
            "api_connections",
            "Open connections on the API port by state (handshaking: TLS handshake under way, at most half of limits.max_connections; idle: no request under way; active: serving one)",
            by_state,
        );
        registry.register(
            "api_connections_max",
            "The API port's bound on open connections (limits.max_connections)",
            metrics.max.clone(),
        );
        registry.register(
            "api_connections_closed",
            "Connections of the API port closed by its connection bound, by reason (idle_for_new: idle longest, closed for a new one; handshake_for_new: in its TLS handshake longest, over a second, closed for a new one as every slot was taken and handshakes held half of them or none was idle; all_busy: new, closed at once as every slot was serving a request or in a handshake begun under a second ago)",
            metrics.closed.clone(),
        );
        metrics
    }

    /// Each reason's series from zero, so an increase from the first closing shows.
    fn closed_from_zero(&self, reasons: &[&str]) {
        for reason in reasons {
            drop(self.closed.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            }));
        }
    }

    fn closed(&self, reason: &str) {
        self.closed
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    fn state(&self, phase: Phase) -> Option<Gauge> {
        let states = self.by_state.as_ref()?;
        Some(
            states
                .get_or_create(&StateLabels {
                    state: phase.label().into(),
                })
                .clone(),
        )
    }

    fn entered(&self, phase: Phase) {
        self.open.inc();
        if let Some(gauge) = self.state(phase) {
            gauge.inc();
        }
    }

    fn left(&self, phase: Phase) {
        self.open.dec();
        if let Some(gauge) = self.state(phase) {
            gauge.dec();
        }
    }

    fn moved(&self, from: Phase, to: Phase) {
        if let (Some(from), Some(to)) = (self.state(from), self.state(to)) {
            from.dec();
            to.inc();
        }
    }

    /// Open connections in `state` (`handshaking`, `idle`, `active`) on the API port.
    pub fn open_in(&self, state: &str) -> i64 {
        Phase::ALL
            .into_iter()
            .find(|phase| phase.label() == state)
            .and_then(|phase| self.state(phase))
            .map_or(0, |gauge| gauge.get())
    }

    /// Connections the bound closed for `reason`.
    pub fn closed_for(&self, reason: &str) -> u64 {
        self.closed
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .get()
    }
}

/// Serves `router` on `listener` until `stop` completes; then finishes the requests in
/// flight (the caller bounds how long it waits for this future).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    metrics: OpsConnectionMetrics,
    stop: impl Future<Output = ()>,
) {
    serve_bounded(
        listener,
        router,
        Bounds {
            max_connections: MAX_OPS_CONNECTIONS,
            header_timeout: OPS_HEADER_TIMEOUT,
        },
        metrics,
        stop,
    )
    .await
}

/// Failed accepts of one listener: one log line per 10 s, with how many were not logged
/// (while the process is out of file descriptors every 50 ms retry fails).
const ACCEPT_ERROR_LOG_LIMIT: RateLimit = RateLimit {
    per_minute: 6,
    burst: 1,
};

/// The throttle of one listener's failed-accept lines ([`accept_bounded`]).
pub(crate) fn accept_error_log() -> LogThrottle {
    LogThrottle::new(ACCEPT_ERROR_LOG_LIMIT)
}

/// One accept. A failure (out of file descriptors, say) is logged through `error_log` and
/// met with a 50 ms pause before None: the caller's loop neither spins nor floods the log.
async fn accept_once(
    listener: &TcpListener,
    error_log: &LogThrottle,
) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok(accepted) => Some(accepted),
        Err(e) => {
            if let Some(not_logged) = error_log.admit("accept", Instant::now()) {
                tracing::warn!(
                    error = %e,
                    failed_since_last_line = not_logged,
                    "accept failed; retrying every 50 ms (at most one such line per 10 s)"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

#[derive(Clone, Copy)]
struct Bounds {
    max_connections: usize,
    header_timeout: Duration,
}

/// When every slot is taken, the connections in their TLS handshake give way first once
/// they hold this many of `max` slots (half, at least one): peers that have not
/// authenticated cannot keep the clients that have out of the rest.
pub(crate) fn handshake_share(max: usize) -> usize {
    (max / 2).max(1)
}

/// A handshake younger than this is never closed for a new connection: a client's
/// handshake completes within it (a WAN round trip or two), while the connections of a
/// flood, which never complete one, grow older than it and are the ones closed. A new
/// connection that finds every slot taken by requests and such young handshakes is
/// closed at once instead.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(1);

/// The peers counted as one address when handshakes are weighed against each other: an
/// IPv4 address, or an IPv6 /64 (one host or site gets a whole /64 and can pick from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum AddressGroup {
    V4(std::net::Ipv4Addr),
    V6Prefix64(u64),
}

impl AddressGroup {
    fn of(peer: SocketAddr) -> AddressGroup {
        match peer.ip().to_canonical() {
            IpAddr::V4(v4) => AddressGroup::V4(v4),
            IpAddr::V6(v6) => AddressGroup::V6Prefix64((v6.to_bits() >> 64) as u64),
        }
    }
}

/// One open connection, as its port's bound sees it.
struct Entry {
    handshaking: bool,
    /// When it was accepted: a handshake younger than the grace is not closed.
    accepted: Instant,
    peer: Option<SocketAddr>,
    requests_under_way: usize,
    /// Admitted for the slot of a connection closed for it, not yet ended.
    waiting: bool,
    /// A tick of [`Open::clock`] when it was accepted or last became idle: the lowest of
    /// the idle ones is the one idle longest.
    since: u64,
    close: CancellationToken,
}

impl Entry {
    fn phase(&self) -> Phase {
        if self.handshaking {
            Phase::Handshaking
        } else if self.requests_under_way > 0 {
            Phase::Active
        } else {
            Phase::Idle
        }
    }
}

#[derive(Default)]
struct Open {
    next_id: u64,
    clock: u64,
    entries: BTreeMap<u64, Entry>,
}

impl Open {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn count(&self, phase: Phase) -> usize {
        self.entries.values().filter(|e| e.phase() == phase).count()
    }

    /// Closes a handshake for a new connection from `newcomer`'s address: of those
    /// accepted at `old` or before, and those of an address holding at least two more
    /// handshakes than the newcomer's (however young), one of the address holding the
    /// most, the one in its handshake longest. So a flood from one address gives way to
    /// connections from any other, and what the flood's own new connections close is its
    /// own, not a slow client's. Its peer, or None if none is closed.
    fn close_handshake_for(
        &mut self,
        newcomer: Option<SocketAddr>,
        old: Instant,
        metrics: &ConnectionMetrics,
    ) -> Option<Option<SocketAddr>> {
        let mut held: BTreeMap<Option<AddressGroup>, usize> = BTreeMap::new();
        for entry in self.entries.values() {
            if entry.phase() == Phase::Handshaking {
                *held.entry(entry.peer.map(AddressGroup::of)).or_default() += 1;
            }
        }
        let holds =
            |peer: Option<SocketAddr>| held.get(&peer.map(AddressGroup::of)).copied().unwrap_or(0);
        let newcomer_holds = holds(newcomer);
        let chosen = self
            .entries
            .iter()
            .filter(|(_, e)| e.phase() == Phase::Handshaking)
            .filter(|(_, e)| e.accepted <= old || holds(e.peer) >= newcomer_holds + 2)
            .max_by_key(|(_, e)| (holds(e.peer), std::cmp::Reverse(e.since)))
            .map(|(id, _)| *id)?;
        let entry = self.entries.remove(&chosen)?;
        entry.close.cancel();
        metrics.left(Phase::Handshaking);
        Some(entry.peer)
    }

    /// Closes the connection in `phase` there longest (for idle ones: idle longest), of
    /// those accepted at `accepted_by` or before; its peer, or None if none is.
    fn close_oldest(
        &mut self,
        phase: Phase,
        accepted_by: Instant,
        metrics: &ConnectionMetrics,
    ) -> Option<Option<SocketAddr>> {
        let oldest = self
            .entries
            .iter()
            .filter(|(_, e)| e.phase() == phase && e.accepted <= accepted_by)
            .min_by_key(|(_, e)| e.since)
            .map(|(id, _)| *id)?;
        let entry = self.entries.remove(&oldest)?;
        entry.close.cancel();
        metrics.left(phase);
        Some(entry.peer)
    }
}

/// A port's bound on its open connections, shared by the ops ports and the API port. A
/// connection takes a free slot if there is one; beyond the bound it takes the slot of the
/// one idle longest (no request under way), which is closed for it; one that finds every
/// slot serving a request is closed at once. On the API port a connection holds its slot
/// from its accept, through its TLS handshake: when every slot is taken and those in a
/// handshake hold [`handshake_share`] of them or more, a new connection takes the place
/// of the one in its handshake longest, never an idle client's; a handshake younger than
/// [`HANDSHAKE_GRACE`] is not closed, unless its address (an IPv4 address, an IPv6 /64)
/// holds at least two more handshakes than the new connection's: then the address holding
/// the most gives way first, so that a flood from one address cannot keep every other
/// out. The new connection takes the closed one's slot once that one ends
/// ([`PendingSlot`]). Every closing is counted by reason in its
/// [`ConnectionMetrics`] and logged (a burst, then one a second per reason) with the peer.
pub(crate) struct ConnectionBound {
    slots: Arc<Semaphore>,
    max: usize,
    max_handshaking: usize,
    handshake_grace: Duration,
    open: Mutex<Open>,
    metrics: ConnectionMetrics,
    /// The port's name in the log lines of what the bound closed.
    port: &'static str,
    closing_log: LogThrottle,
}

/// What [`ConnectionBound::admit`] made of a connection just accepted.
enum Admission {
    Admitted(PendingSlot),
    /// Every slot is serving a request (or in a young handshake it may not take), or
    /// [`MAX_WAITING_FOR_SLOT`] new ones already wait: closed at once (counted).
    Refused,
}

/// A connection admitted by the bound, perhaps before it holds its slot: at once when one
/// was free, else once the connection closed for it has ended. That can take a moment (an
/// evicted API connection with half a request's head in is given a second), so it is
/// waited for in the new connection's own task, never in the accept loop: a peer holding
/// half-sent requests must not slow every accept down to one a second.
pub(crate) struct PendingSlot(Connection);

impl PendingSlot {
    /// The connection with its slot; None if the bound closed it for a newer one while it
    /// waited. The semaphore hands freed slots to those waiting first, in order, so a
    /// later connection that finds a free slot does not overtake.
    pub(crate) async fn taken(self) -> Option<Connection> {
        let mut connection = self.0;
        if connection.slot.is_none() {
            let slots = connection.handle.bound.slots.clone();
            let permit = tokio::select! {
                permit = slots.acquire_owned() => permit.ok()?,
                _ = connection.close.cancelled() => return None,
            };
            connection.slot = Some(permit);
            let bound = &connection.handle.bound;
            bound.update(connection.handle.id, |entry| entry.waiting = false);
        }
        Some(connection)
    }
}

impl ConnectionBound {
    pub(crate) fn new(port: &'static str, max: usize, metrics: ConnectionMetrics) -> Arc<Self> {
        Self::with_grace(port, max, metrics, HANDSHAKE_GRACE)
    }

    fn with_grace(
        port: &'static str,
        max: usize,
        metrics: ConnectionMetrics,
        handshake_grace: Duration,
    ) -> Arc<Self> {
        metrics.max.set(i64::try_from(max).unwrap_or(i64::MAX));
        Arc::new(ConnectionBound {
            slots: Arc::new(Semaphore::new(max)),
            max,
            max_handshaking: handshake_share(max),
            handshake_grace,
            open: Mutex::default(),
            metrics,
            port,
            closing_log: LogThrottle::new(CLOSING_LOG_LIMIT),
        })
    }

    /// Counts a closing by the bound, and logs it unless the throttle holds its reason
    /// back: `peer` is the connection closed (for one closed at once, the new one).
    fn closed(&self, reason: &'static str, peer: Option<SocketAddr>) {
        self.metrics.closed(reason);
        if let Some(not_logged) = self.closing_log.admit(reason, Instant::now()) {
            tracing::info!(
                port = self.port,
                peer = peer.map(tracing::field::display),
                reason,
                not_logged_since_last = not_logged,
                "connection closed by the connection bound"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a connection from `peer` just accepted, `handshaking` (API port) or not
    /// (ops port): a free one, or that of a connection closed for it, which the new one
    /// takes once that one has ended ([`PendingSlot::taken`]). Entered at once either way,
    /// so the next admission counts it.
    fn admit(self: &Arc<Self>, handshaking: bool, peer: Option<SocketAddr>) -> Admission {
        let now = Instant::now();
        let mut open = self.lock();
        // The connection closed for this one (reason, peer), logged once the lock is let go.
        let mut closed_for_it = None;
        let permit = if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            Some(permit)
        } else {
            // Every slot taken: handshakes past their share give way first, and then only
            // to another handshake; otherwise the connection idle longest, then a
            // handshake. Never one younger than the grace. Nor while as many already wait
            // for the slots of those closed for them as may: each holds a file.
            let waiting = open.entries.values().filter(|e| e.waiting).count();
            let old = now.checked_sub(self.handshake_grace).unwrap_or(now);
            let over_share = open.count(Phase::Handshaking) >= self.max_handshaking;
            let closed = if waiting >= MAX_WAITING_FOR_SLOT {
                None
            } else if over_share {
                open.close_handshake_for(peer, old, &self.metrics)
                    .map(|peer| (CLOSED_HANDSHAKE, peer))
            } else {
                open.close_oldest(Phase::Idle, now, &self.metrics)
                    .map(|peer| (CLOSED_IDLE, peer))
                    .or_else(|| {
                        open.close_handshake_for(peer, old, &self.metrics)
                            .map(|peer| (CLOSED_HANDSHAKE, peer))
                    })
            };
            let Some(closed) = closed else {
                drop(open);
                self.closed(CLOSED_ALL_BUSY, peer);
                return Admission::Refused;
            };
            closed_for_it = Some(closed);
            None
        };
        let close = CancellationToken::new();
        let id = open.next_id;
        open.next_id += 1;
        let since = open.tick();
        open.entries.insert(
            id,
            Entry {
                handshaking,
                accepted: now,
                peer,
                requests_under_way: 0,
                waiting: permit.is_none(),
                since,
                close: close.clone(),
            },
        );
        let phase = if handshaking {
            Phase::Handshaking
        } else {
            Phase::Idle
        };
        self.metrics.entered(phase);
        drop(open);
        if let Some((reason, closed_peer)) = closed_for_it {
            self.closed(reason, closed_peer);
        }
        Admission::Admitted(PendingSlot(Connection {
            handle: ConnectionHandle {
                bound: self.clone(),
                id,
                requests_under_way: Arc::new(AtomicUsize::new(0)),
            },
            close,
            slot: permit,
        }))
    }

    /// Changes the connection `id`'s entry, and its state's gauge with it; nothing if the
    /// bound closed it already.
    fn update(&self, id: u64, change: impl FnOnce(&mut Entry)) {
        let mut open = self.lock();
        let tick = open.tick();
        let Some(entry) = open.entries.get_mut(&id) else {
            return;
        };
        let before = entry.phase();
        change(entry);
        let after = entry.phase();
        if before != after {
            if after == Phase::Idle {
                entry.since = tick;
            }
            self.metrics.moved(before, after);
        }
    }

    /// Once every connection has ended (each holds a slot until then).
    pub(crate) async fn drained(&self) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }
}

/// A connection's entry in the bound and its slot, held until it is dropped (as the
/// connection's task ends); without a slot only while [`PendingSlot::taken`] waits.
pub(crate) struct Connection {
    handle: ConnectionHandle,
    close: CancellationToken,
    slot: Option<OwnedSemaphorePermit>,
}

impl Connection {
    /// Its TLS handshake completed: it is idle until its first request.
    pub(crate) fn established(&self) {
        self.handle
            .bound
            .update(self.handle.id, |entry| entry.handshaking = false);
    }

    /// What the connection's requests count themselves with.
    pub(crate) fn handle(&self) -> ConnectionHandle {
        self.handle.clone()
    }

    /// Completes once the bound closes this connection for a new one (never while it is
    /// serving a request).
    pub(crate) fn closed_for_new(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    /// Whether a request is under way on it (one may come in just as it is chosen to be
    /// closed).
    pub(crate) fn serving(&self) -> bool {
        self.handle.serving()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let bound = &self.handle.bound;
        let mut open = bound.lock();
        if let Some(entry) = open.entries.remove(&self.handle.id) {
            bound.metrics.left(entry.phase());
        }
    }
}

/// Counts the requests under way on one connection.
#[derive(Clone)]
pub(crate) struct ConnectionHandle {
    bound: Arc<ConnectionBound>,
    id: u64,
    requests_under_way: Arc<AtomicUsize>,
}

impl ConnectionHandle {
    /// Whether a request is under way on the connection.
    pub(crate) fn serving(&self) -> bool {
        self.requests_under_way.load(Ordering::SeqCst) > 0
    }

    /// A request begins: the connection is active until the guard is dropped.
    pub(crate) fn request(&self) -> UnderWay {
        self.requests_under_way.fetch_add(1, Ordering::SeqCst);
        self.bound
            .update(self.id, |entry| entry.requests_under_way += 1);
        UnderWay(self.clone())
    }
}

/// A request under way on its connection while it lives.
pub(crate) struct UnderWay(ConnectionHandle);

impl Drop for UnderWay {
    fn drop(&mut self) {
        let handle = &self.0;
        handle.requests_under_way.fetch_sub(1, Ordering::SeqCst);
        handle.bound.update(handle.id, |entry| {
            entry.requests_under_way = entry.requests_under_way.saturating_sub(1)
        });
    }
}

/// The next connection admitted by `bound` (see [`ConnectionBound`]), in its TLS handshake
/// if `handshaking`, with the slot it is to take; None once `stop` completes. A connection
/// that finds every slot serving a request is closed at once. Accept errors (EMFILE and
/// friends) are logged through `error_log` and retried after a pause rather than spun on.
pub(crate) async fn accept_admitted<F: Future<Output = ()>>(
    listener: &TcpListener,
    bound: &Arc<ConnectionBound>,
    handshaking: bool,
    error_log: &LogThrottle,
    stop: &mut std::pin::Pin<&mut F>,
) -> Option<(PendingSlot, TcpStream, SocketAddr)> {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = accept_once(listener, error_log) => match accepted {
                Some(accepted) => accepted,
                None => continue,
            },
            _ = stop.as_mut() => return None,
        };
        match bound.admit(handshaking, Some(peer)) {
            Admission::Admitted(slot) => return Some((slot, tcp, peer)),
            // Counted and logged by the bound; dropping the stream closes it.
            Admission::Refused => {}
        }
    }
}

async fn serve_bounded(
    listener: TcpListener,
    router: Router,
    bounds: Bounds,
    metrics: OpsConnectionMetrics,
    stop: impl Future<Output = ()>,
) {
    let bound = ConnectionBound::new("ops", bounds.max_connections, metrics);
    let (stopping, _) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    let error_log = accept_error_log();
    while let Some((slot, tcp, peer)) =
        accept_admitted(&listener, &bound, false, &error_log, &mut stop).await
    {
        let router = router.clone();
        let mut stop_connection = stopping.subscribe();
        tokio::spawn(async move {
            let connection = tokio::select! {
                connection = slot.taken() => connection,
                _ = stop_connection.changed() => None,
            };
            let Some(connection) = connection else {
                return;
            };
            let handle = connection.handle();
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let under_way = handle.request();
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await;
                    drop(under_way);
                    response
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(served);
            let ended = tokio::select! {
                ended = served.as_mut() => Some(ended),
                _ = stop_connection.changed() => {
                    served.as_mut().graceful_shutdown();
                    Some(served.await)
                }
                // Idle (perhaps half a request's headers in), its slot given to a new
                // connection: dropped, so closed.
                _ = connection.closed_for_new() => None,
            };
            match ended {
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "ops connection ended with an error")
                }
                Some(Ok(())) => {}
                None => tracing::debug!(%peer, "idle ops connection closed for a new one"),
            }
            drop(connection);
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    bound.drained().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_are_logged_once_per_interval_with_their_count() {
        let errors = accept_error_log();
        let start = std::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 20 a second for a minute: one line per 10 s, each with the failures between.
        let lines: Vec<u64> = (0..1200)
            .filter_map(|n| errors.admit("accept", at(n * 50)))
            .collect();
        assert_eq!(lines, [0, 199, 199, 199, 199, 199]);
    }
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A test server's address, metrics, stop channel (send to stop) and task.
    type Started = (
        std::net::SocketAddr,
        OpsConnectionMetrics,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    );

    /// Serves `router` with these bounds; send on the returned channel to stop.
    fn start_with(router: Router, max: usize, header_timeout: Duration) -> Started {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let metrics = OpsConnectionMetrics::register(&mut Registry::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let bounds = Bounds {
            max_connections: max,
            header_timeout,
        };
        let server = tokio::spawn(serve_bounded(
            listener,
            router,
            bounds,
            metrics.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));
        (addr, metrics, stop_tx, server)
    }

    /// A /healthz router served with these bounds.
    fn start(max: usize, header_timeout: Duration) -> Started {
        let router = Router::new().route("/healthz", get(|| async { "ok\n" }));
        start_with(router, max, header_timeout)
    }

    fn closed_for(metrics: &OpsConnectionMetrics, reason: &str) -> u64 {
        metrics
            .closed
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .get()
    }

    /// A generous bound on a wait that must end: a server that never ends it fails the
    /// test rather than hangs it.
    async fn within<T>(what: &str, wait: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("{what}"))
    }

    async fn half_sent(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        tcp
    }

    const GET_AND_CLOSE: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn idle_connections_up_to_the_bound_do_not_keep_a_probe_out() {
        // Connections cut off by no header timeout: only the bound can close them.
        let (addr, metrics, stop, server) = start(MAX_OPS_CONNECTIONS, Duration::from_secs(600));
        let mut idle = Vec::new();
        for _ in 0..MAX_OPS_CONNECTIONS {
            idle.push(half_sent(addr).await);
        }
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe.write_all(GET_AND_CLOSE).await.unwrap();
        let mut answer = Vec::new();
        within("the probe was not answered", probe.read_to_end(&mut answer))
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The slot was the one of the connection idle longest, now closed.
        let mut rest = Vec::new();
        within(
            "the oldest idle connection stayed open",
            idle[0].read_to_end(&mut rest),
        )
        .await
        .unwrap();
        assert_eq!(closed_for(&metrics, CLOSED_IDLE), 1);
        assert_eq!(closed_for(&metrics, CLOSED_ALL_BUSY), 0);
        drop(idle);
        let _ = stop.send(());
        server.await.unwrap();
        assert_eq!(metrics.open.get(), 0);
    }

    #[tokio::test]
    async fn a_connection_finding_every_slot_serving_a_request_is_closed_at_once() {
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
        // A permit per request let through (no missed wake-up if one comes first).
        let release = Arc::new(Semaphore::new(0));
        let hold = release.clone();
        let router = Router::new().route(
            "/healthz",
            get(move || {
                let (entered, release) = (entered_tx.clone(), hold.clone());
                async move {
                    let _ = entered.send(());
                    let _ = release.acquire().await.map(|permit| permit.forget());
                    "ok\n"
                }
            }),
        );
        let (addr, metrics, stop, server) = start_with(router, 2, Duration::from_secs(600));
        let mut busy = Vec::new();
        for _ in 0..2 {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(GET_AND_CLOSE).await.unwrap();
            within("a request was not handled", entered.recv()).await;
            busy.push(tcp);
        }
        let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        // Closed (or reset) without an answer.
        let _ = within(
            "the connection was not closed",
            refused.read_to_end(&mut answer),
        )
        .await;
        assert!(answer.is_empty(), "{answer:?}");
        assert_eq!(closed_for(&metrics, CLOSED_ALL_BUSY), 1);
        assert_eq!(closed_for(&metrics, CLOSED_IDLE), 0);
        // The requests under way are answered.
        release.add_permits(2);
        for mut tcp in busy {
            let mut answer = Vec::new();
            within(
                "a held request was not answered",
                tcp.read_to_end(&mut answer),
            )
            .await
            .unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200"));
        }
        let _ = stop.send(());
        server.await.unwrap();
    }

    async fn admitted(admission: Admission) -> Connection {
        match admission {
            Admission::Admitted(slot) => slot.taken().await.expect("the bound is closed"),
            Admission::Refused => panic!("refused"),
        }
    }

    #[tokio::test]
    async fn the_bound_closes_the_connection_idle_longest_and_never_one_serving() {
        let metrics = ConnectionMetrics::register_api(&mut Registry::default());
        let bound = ConnectionBound::new("ops", 3, metrics.clone());
        let first = admitted(bound.admit(false, None)).await;
        let second = admitted(bound.admit(false, None)).await;
        let third = admitted(bound.admit(false, None)).await;
        // The first accepted has just answered a request: the second is idle longest.
        drop(first.handle().request());
        let serving = third.handle().request();
        assert_eq!(metrics.open_in("active"), 1);
        assert_eq!(metrics.open_in("idle"), 2);
        let fourth = {
            // Admitting it closes the connection idle longest; it takes that one's slot
            // once that one has ended.
            let Admission::Admitted(slot) = bound.admit(false, None) else {
                panic!("refused")
            };
            assert!(second.close.is_cancelled());
            assert!(!first.close.is_cancelled() && !third.close.is_cancelled());
            assert_eq!(metrics.closed_for(CLOSED_IDLE), 1);
            let taking = slot.taken();
            tokio::pin!(taking);
            tokio::select! {
                biased;
                _ = taking.as_mut() => panic!("a slot taken before one was free"),
                _ = std::future::ready(()) => {}
            }
            drop(second);
            taking.await.expect("the bound is closed")
        };
        // Every slot serving a request: a new one is refused, none is closed for it.
        let _first_serving = first.handle().request();
        let _fourth_serving = fourth.handle().request();
        assert!(matches!(bound.admit(false, None), Admission::Refused));
        assert_eq!(metrics.closed_for(CLOSED_ALL_BUSY), 1);
        assert_eq!(metrics.open_in("active"), 3);
        drop(serving);
        assert_eq!(metrics.open_in("idle"), 1);
    }

    #[tokio::test]
    async fn the_accept_loop_goes_on_while_connections_closed_for_new_ones_end() {
        let metrics = ConnectionMetrics::register_api(&mut Registry::default());
        let bound = ConnectionBound::new("ops", 2, metrics.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let errors = accept_error_log();
        let never = std::future::pending::<()>();
        tokio::pin!(never);
        let mut sockets = Vec::new();
        let mut accept = async || {
            sockets.push(TcpStream::connect(addr).await.unwrap());
            let accepted = accept_admitted(&listener, &bound, false, &errors, &mut never);
            let (slot, tcp, _) = within("the accept loop waited", accepted).await.unwrap();
            sockets.push(tcp);
            slot
        };
        // Two connections take the free slots, and are idle.
        let mut open = Vec::new();
        for _ in 0..2 {
            open.push(accept().await.taken().await.unwrap());
        }
        // Each of the next two closes one of them, which (as an API connection with half a
        // request's head in may) has not ended yet: the accept loop does not wait for it.
        let waiting = [accept().await, accept().await];
        assert!(
            open.iter()
                .all(|connection| connection.close.is_cancelled())
        );
        assert_eq!(metrics.closed_for(CLOSED_IDLE), 2);
        let mut taken = Vec::new();
        for (closed, slot) in open.into_iter().zip(waiting) {
            drop(closed);
            taken.push(within("no slot came free", slot.taken()).await.unwrap());
        }
        assert_eq!(metrics.open_in("idle"), 2);
    }

    #[tokio::test]
    async fn new_connections_waiting_for_closed_ones_slots_are_bounded() {
        let metrics = ConnectionMetrics::register_api(&mut Registry::default());
        let bound =
            ConnectionBound::with_grace("api", 40, metrics.clone(), Duration::from_secs(3600));
        let mut agents = Vec::new();
        for _ in 0..40 {
            let agent = admitted(bound.admit(true, None)).await;
            agent.established();
            agents.push(agent);
        }
        // Handshakes under their share (20 of 40) close idle agents' connections for them,
        // which have not ended yet: 16 may wait so, a 17th is closed at once.
        let mut waiting = Vec::new();
        for n in 0..MAX_WAITING_FOR_SLOT {
            let from = peer(&format!("192.0.2.{n}:443"));
            let Admission::Admitted(slot) = bound.admit(true, from) else {
                panic!("connection {n} refused")
            };
            waiting.push(slot);
        }
        assert_eq!(metrics.closed_for(CLOSED_IDLE), 16);
        assert!(matches!(
            bound.admit(true, peer("192.0.2.99:443")),
            Admission::Refused
        ));
        assert_eq!(metrics.closed_for(CLOSED_ALL_BUSY), 1);
        assert_eq!(metrics.closed_for(CLOSED_IDLE), 16);
        // As the closed ones end, those waiting take their slots; none holds a new one back.
        let closed: Vec<Connection> = agents.drain(..16).collect();
        assert!(closed.iter().all(|agent| agent.close.is_cancelled()));
        drop(closed);
        for slot in waiting {
            within("no slot came free", slot.taken()).await.unwrap();
        }
        assert!(matches!(
            bound.admit(true, peer("192.0.2.99:443")),
            Admission::Admitted(_)
        ));
    }

    /// Admits a connection in its TLS handshake that ends (giving its slot back) once the
    /// bound closes it for a new one, as its task would.
    async fn handshaking(
        bound: &Arc<ConnectionBound>,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        handshaking_as(bound, None).await
    }

    /// [`handshaking`], from `peer`.
    async fn handshaking_as(
        bound: &Arc<ConnectionBound>,
        peer: Option<SocketAddr>,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let connection = admitted(bound.admit(true, peer)).await;
        let close = connection.close.clone();
        let ends = tokio::spawn(async move {
            connection.closed_for_new().await;
            drop(connection);
        });
        (close, ends)
    }

    #[tokio::test]
    async fn handshakes_past_their_share_give_way_to_one_another_not_to_idle_clients() {
        let metrics = ConnectionMetrics::register_api(&mut Registry::default());
        // No grace: every handshake is old enough to be closed.
        let bound = ConnectionBound::with_grace("api", 4, metrics.clone(), Duration::ZERO);
        let agent = admitted(bound.admit(true, None)).await;
        agent.established();
        // Free slots are taken whatever the handshakes hold: none is closed.
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(handshaking(&bound).await);
        }
        assert_eq!(metrics.open_in("handshaking"), 3);
        assert_eq!(metrics.closed_for(CLOSED_HANDSHAKE), 0);
        // Every slot taken, handshakes past their share (2 of 4): a new connection takes
        // the place of the one in its handshake longest, never the idle agent's.
        for _ in 0..2 {
            open.push(handshaking(&bound).await);
        }
        assert_eq!(metrics.open_in("handshaking"), 3);
        assert_eq!(metrics.open_in("idle"), 1);
        assert_eq!(metrics.closed_for(CLOSED_HANDSHAKE), 2);
        assert_eq!(metrics.closed_for(CLOSED_IDLE), 0);
        assert!(open[0].0.is_cancelled() && open[1].0.is_cancelled());
        assert!(!open[2].0.is_cancelled() && !agent.close.is_cancelled());
        for (_, ends) in open.drain(..2) {
            ends.await.unwrap();
        }
        for (_, ends) in open {
            ends.abort();
        }
        drop(agent);
        bound.drained().await;
        assert_eq!(metrics.open.get(), 0);
    }

    #[tokio::test]
    async fn a_handshake_within_its_grace_is_not_closed_for_one_from_its_own_address() {
        let metrics = ConnectionMetrics::register_api(&mut Registry::default());
        let bound =
            ConnectionBound::with_grace("api", 4, metrics.clone(), Duration::from_secs(3600));
        let agent = admitted(bound.admit(true, None)).await;
        agent.established();
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(handshaking(&bound).await);
        }
        // Every slot taken, the handshakes young and past their share: the new connection
        // is closed at once; neither a handshake nor the idle agent is closed for it.
        assert!(matches!(bound.admit(true, None), Admission::Refused));
        assert_eq!(metrics.closed_for(CLOSED_ALL_BUSY), 1);
        assert_eq!(metrics.closed_for(CLOSED_HANDSHAKE), 0);
        assert_eq!(metrics.closed_for(CLOSED_IDLE), 0);
        assert!(open.iter().all(|(close, _)| !close.is_cancelled()));
        assert!(!agent.close.is_cancelled());
        for (_, ends) in open {
            ends.abort();
        }
    }

    fn peer(address: &str) -> Option<SocketAddr> {
        Some(address.parse().unwrap())
    }

    /// Admits a connection from `from` in its TLS handshake, as [`handshaking`] does.
    async fn handshaking_from(
        bound: &Arc<ConnectionBound>,
        from: &str,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        handshaking_as(bound, peer(from)).await
    }

    #[tokio::test]
    async fn a_flood_from_one_address_gives_way_to_connections_from_others() {
        let metrics = ConnectionMetrics::register_api(&mut Registry::default());
        // Every handshake within its grace, as in a flood faster than the slots.
        let bound =
            ConnectionBound::with_grace("api", 6, metrics.clone(), Duration::from_secs(3600));
        let agent = admitted(bound.admit(true, peer("192.0.2.7:40000"))).await;
        agent.established();
        let mut flood = Vec::new();
        for port in 0..5 {
            flood.push(from_the_flood(&bound, port).await);
        }
        // The flood's own next connection finds only young handshakes: closed at once.
        assert!(matches!(
            bound.admit(true, peer("198.51.100.9:50010")),
            Admission::Refused
        ));
        // A client from another address takes the place of the flood's oldest handshake.
        let other = handshaking_from(&bound, "203.0.113.4:41000").await;
        assert!(flood[0].0.is_cancelled());
        assert!(flood[1..].iter().all(|(close, _)| !close.is_cancelled()));
        assert_eq!(metrics.closed_for(CLOSED_HANDSHAKE), 1);
        // An IPv6 /64 counts as one address: its hosts are one flood.
        let mut flood6 = Vec::new();
        for host in 1..=2 {
            let from = format!("[2001:db8:0:1::{host}]:443");
            let close = admitted_after(&bound, &from).await;
            flood6.push(close);
        }
        // Two more closed for them, both from the IPv4 flood (it holds the most).
        assert!(flood[1].0.is_cancelled() && flood[2].0.is_cancelled());
        // Now the /64 holds two handshakes, the IPv4 flood two, the other client one: a
        // third from the /64 is not two below any address, so it is refused.
        assert!(matches!(
            bound.admit(true, peer("[2001:db8:0:1::3]:443")),
            Admission::Refused
        ));
        // The idle agent and the other client were never closed.
        assert!(!agent.close.is_cancelled() && !other.0.is_cancelled());
        assert_eq!(metrics.closed_for(CLOSED_IDLE), 0);
        for (_, ends) in flood.into_iter().chain([other]).chain(flood6) {
            ends.abort();
        }
    }

    /// A handshake from the flooding address, its `n`th connection.
    async fn from_the_flood(
        bound: &Arc<ConnectionBound>,
        n: u16,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        handshaking_from(bound, &format!("198.51.100.9:{}", 50000 + n)).await
    }

    /// Admits a handshake from `from` that waits for the slot of the one closed for it:
    /// the closed one's task ends as a real connection's would.
    async fn admitted_after(
        bound: &Arc<ConnectionBound>,
        from: &str,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        within("no slot came free", handshaking_from(bound, from)).await
    }

    #[tokio::test]
    async fn an_old_handshake_closed_for_a_flood_is_the_floods_own() {
        let metrics = ConnectionMetrics::register_api(&mut Registry::default());
        // No grace: every handshake is old enough to be closed.
        let bound = ConnectionBound::with_grace("api", 4, metrics.clone(), Duration::ZERO);
        // A slow client's handshake, the oldest, then the flood's.
        let slow = handshaking_from(&bound, "192.0.2.7:40000").await;
        let mut flood = Vec::new();
        for port in 0..3 {
            flood.push(from_the_flood(&bound, port).await);
        }
        for port in 3..6 {
            // Each waits for the slot of the one closed for it.
            flood.push(within("no slot came free", from_the_flood(&bound, port)).await);
        }
        // Each of the flood's new connections closed the flood's oldest, not the slow one.
        assert!(flood[..3].iter().all(|(close, _)| close.is_cancelled()));
        assert!(!slow.0.is_cancelled());
        assert_eq!(metrics.closed_for(CLOSED_HANDSHAKE), 3);
        for (_, ends) in flood.into_iter().chain([slow]) {
            ends.abort();
        }
    }

    #[tokio::test]
    async fn half_sent_and_idle_connections_are_closed_by_the_server() {
        let (addr, _metrics, stop, server) = start(8, Duration::from_millis(300));
        // A generous bound: a server that never closes them fails here rather than hangs.
        let closed = |read| async move {
            tokio::time::timeout(Duration::from_secs(60), read)
                .await
                .expect("the server did not close the connection")
        };
        let mut stalled = half_sent(addr).await;
        let mut rest = Vec::new();
        // Returns only once the server closes it (hyper may answer 408 first).
        closed(stalled.read_to_end(&mut rest)).await.unwrap();
        // A kept-alive connection idle after its answer is closed too.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        closed(idle.read_to_end(&mut answer)).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap();
    }
}
