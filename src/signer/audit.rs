//! The audit log: one JSON line per signing decision (and per change of the rules), each
//! carrying the SHA-256 of the line before it, written and fsynced before the client gets
//! its answer (before the change applies).
//!
//! A single writer thread owns the file and commits in groups: every line waiting when a
//! write starts goes into that write and its one fsync (still before any of those
//! requests is answered). While other requests are on their way to the log, the writer
//! waits up to [`COMMIT_DELAY`] for their lines too (PostgreSQL's commit_delay with
//! commit_siblings): on a fast disk under load each fsync would otherwise cover about two
//! lines, and an fsync costs more CPU than a signature on a fast token. A failed write is
//! rolled back, so the file never holds a line that was not acknowledged as written.
//!
//! The log may be rotated while the signer runs: once the file is moved away, the writer
//! creates a new one at the path for its next lines, beginning with a `rotation` record
//! that continues the chain from the moved file's last line.
//!
//! The writer notices, at each write, a file cut short in place (lines removed from its
//! end) or grown under it (lines another writer appended: an older meshca, which does not
//! lock the log, or another program): it says so, counts it, and goes on with its own chain.
//!
//! The chain has no key, and lines cut from the end of the newest file leave a chain that
//! still verifies. The writer therefore publishes the hash of the last line it wrote (the
//! chain's head, [`AuditLog::head`]); the signer logs it now and then ([`HeadAnchor`]), and
//! `meshca audit verify --expect-hash` shows a log still holds a line a copy off the host
//! recorded.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::oneshot;

use super::ratelimit::{LogThrottle, RateLimit};
use crate::pki::csr::hex;

/// How long an async caller waits for the free space of the audit log's filesystem.
const FREE_SPACE_WAIT: Duration = Duration::from_secs(2);

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Most lines committed by one write + fsync.
const MAX_BATCH: usize = 512;
/// How many lines back `verify` looks for the line a break continues (two writers on one
/// log each continue their own last line, a few lines back).
const VERIFY_LOOKBACK: usize = 16_384;
/// The longest line meshca reads back from an audit log (a start's recovery, `audit
/// verify`). The longest a signer writes is a `start` or `reload` record, the rules
/// written out in full, from a config and VirtualMesh files read at most 1 MiB each: far
/// under this. A longer "line" is something else (a run of zeros a crash or the file
/// system left, another file), and reading it whole could exhaust memory.
pub const MAX_LINE: u64 = 64 * 1024 * 1024;
/// How far back from its end a start reads the log: the last complete line, and a torn
/// one after it, each at most [`MAX_LINE`] and its newline.
const MAX_TAIL: u64 = 2 * (MAX_LINE + 1);
/// Longest a line waits for expected siblings before its group is written. Small against
/// the latency of a signer under load, which is when it applies.
pub const COMMIT_DELAY: Duration = Duration::from_millis(1);
/// Free space the log's filesystem must have for the log to count as writable (and the
/// signer as ready): room for the largest write the writer makes ([`MAX_BATCH`] decision
/// lines of about 700 bytes, some 350 KiB) and the stop record, with a margin. Below it
/// the signer stops issuing before a write fails, and says so while no request comes.
pub const MIN_FREE_BYTES: u64 = 1024 * 1024;
/// How long a write (with its fsync) may be under way before the log counts as not
/// writable: a disk that stops answering (a failing drive, a network disk cut off) blocks
/// the write, and every answer behind it, without an error. Meanwhile the signer is not
/// ready (`/readyz` 503, `meshca_audit_writable` 0, an ERROR in its log), so that a load
/// balancer sends clients to another replica, and signs nothing new (a refusal is a
/// decision too, and waits for the log like every other).
pub const STUCK_WRITE: Duration = Duration::from_secs(10);
/// Buckets of `meshca_audit_commit_duration_seconds`, 50 µs .. 10 s: a local SSD's fsync
/// takes well under a millisecond, a network disk's several, a failing disk seconds, and
/// every request answered meanwhile waits for it.
const COMMIT_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// One decision. Field names are the log's stable format.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// UTC, RFC 3339 with milliseconds ([`rfc3339`]): when the line was made (a decision's
    /// once its outcome was known), before it reached the writer.
    pub time: String,
    /// `decision` for a signing decision; `start` for a start of the signer, with the
    /// rules it starts under; `stop` for a clean stop, after its last decision; `reload`
    /// for a change of the policies, client grants or limits (SIGHUP); `tls_reload` for a
    /// change of the transport trust (SIGHUP), or a TLS reload that failed;
    /// `start_failed` for a start that failed after the root key made a cross
    /// certificate; `recovery` for a repair of the log itself; `rotation` first in a file
    /// that continues one moved away.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// On a decision: SHA-256 (lowercase hex) of the client's TLS certificate (DER), which
    /// tells apart certificates naming one identity (a replacement and the certificate it
    /// replaced, a revoked one). Not on a line counting rate-limit refusals, which counts
    /// the identity's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_sha256: Option<String>,
    /// On a decision: that certificate's serial number, lowercase hex (its DER bytes, as
    /// `serial` is written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_serial: Option<String>,
    /// On a decision: that certificate's issuer (RFC 4514), since a serial names a
    /// certificate only together with its issuer. Lines written before it existed lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_issuer: Option<String>,
    /// On a decision: SHA-256 (lowercase hex) of the CA certificate in `tls.client_ca` the
    /// client's chain led to, which a `[[clients]] issuer` is checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_sha256: Option<String>,
    /// On a decision: the TCP peer address of the request's connection (`ip:port`, an
    /// IPv6 address in brackets), as the signer's socket saw it: a stolen client key
    /// used from another host names the same client and certificate, not the same
    /// address. Lines written before this field existed lack it (and still verify: the
    /// chain hashes each line as written). Not on a line counting rate-limit refusals,
    /// which may have come from several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_mesh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr_public_key_sha256: Option<String>,
    /// `allow`, `deny` (policy or request refused) or `error` (signer could not issue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The machine code of the outcome (`issued`, `policy_org`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// On a decision that failed after the backend was asked to sign: the serial it was
    /// asked for. A token that signs after its request timed out (the certificate thrown
    /// away, never handed out) logs this serial, and with Vault it stays in Vault's
    /// records: the root key's signature is on record here too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_serial: Option<String>,
    /// Extensions the CSR asked for, which were not honoured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_csr_extensions: Vec<String>,
    /// The subject the CSR asked for, when its text is not the intermediate's (RFC 4514,
    /// control characters escaped, cut): not honoured, recorded for a reviewer. Lines
    /// written before it existed lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignored_csr_subject: Option<String>,
    /// OIDs of the CSR's attributes other than extensionRequest (a challengePassword):
    /// not honoured, recorded for a reviewer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_csr_attributes: Vec<String>,
    /// How many decisions the line stands for, when more than its own: rate-limit
    /// refusals counted since the client's last line (`rule` `rate_limited`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// On `start`, `reload` and `rotation`: the digest of the rules in force from this line on
    /// ([`super::reload::Rules::digest`]); on a decision, that of the rules it was made
    /// under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_sha256: Option<String>,
    /// On `start`: how the backend showed it holds the root's key (a token signs a random
    /// challenge, a signature of the root key no decision covers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_key_proof: Option<String>,
    /// On `start`, `reload` and `rotation`: the rules in force from this line on, in full
    /// ([`super::reload::Rules::text`]), whose SHA-256 is `rules_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<String>,
    /// On `start`, `rotation`, and `tls_reload` with rule `tls_changed`: the transport trust in
    /// force from this line on (the server certificate, each client CA and CRL, what an
    /// overdue CRL means). Lines written before this field existed lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tlsutil::TransportTrust>,
    /// On `tls_reload` with rule `tls_changed`: how `tls` differs from the trust before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_change: Option<crate::tlsutil::TrustChange>,
    /// SHA-256 of the previous line (without its newline), lowercase hex; [`GENESIS`] on
    /// the first.
    #[serde(default)]
    pub prev: String,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum AuditError {
    #[error("audit log {path}: {message}")]
    Io { path: String, message: String },
    /// Another writer holds the file's lock: two writers would fork the chain.
    #[error(
        "audit log {path} is locked by another meshca process (a signer already writes it): two writers would fork its hash chain; stop the other signer, or give this one its own audit_log"
    )]
    Locked { path: String },
    #[error("audit log writer has stopped")]
    Stopped,
}

struct Pending {
    record: AuditRecord,
    done: oneshot::Sender<Result<(), AuditError>>,
    /// The `start` record ([`AuditLog::record_start`]).
    start: bool,
}

/// Handle to the audit writer. Cloning shares the one writer. Once the last handle is
/// dropped, the writer finishes what it was sent and closes the file, which releases the
/// log's lock.
#[derive(Clone)]
pub struct AuditLog {
    /// Declared before `_thread`: the last handle's sender is gone before its join.
    tx: mpsc::Sender<Pending>,
    /// Held for its drop.
    _thread: Arc<WriterThread>,
    /// Whether the log takes lines, shared with the writer.
    writability: Arc<Writability>,
    announced: Arc<Announced>,
    commits: Counter,
    commit_seconds: Histogram,
    truncations: Counter,
    foreign_appends: Counter,
    head: Arc<Mutex<String>>,
    path: PathBuf,
    /// A `recovery` record is being written ([`AuditLog::write_recovery`]).
    recovering: Arc<AtomicBool>,
    /// A read of the free space under way ([`AuditLog::check_free_space_off_the_runtime`]).
    free_space_read_under_way: Arc<AtomicBool>,
}

/// Whether the log takes lines: its last commit succeeded, its filesystem has room for
/// more ([`MIN_FREE_BYTES`]), and no write has been under way for [`STUCK_WRITE`] or
/// longer. A full disk shows without waiting for a write to fail: the signer looks at the
/// free space every few seconds ([`AuditLog::check_free_space`]).
struct Writability {
    last_commit_ok: AtomicBool,
    /// Free bytes last seen on the log's filesystem; `u64::MAX` before the first look.
    free_bytes: AtomicU64,
    /// When the write under way began, in ns since `epoch` plus one; 0 while none is.
    write_began: AtomicU64,
    epoch: Instant,
    /// [`STUCK_WRITE`], shorter in tests.
    stuck_after: Duration,
    /// The write under way was said (logged) to be stuck.
    stuck_said: AtomicBool,
    /// `meshca_audit_writable`: 1 while all three hold.
    writable: Gauge,
    /// `meshca_audit_free_bytes`.
    free_gauge: Gauge,
}

impl Writability {
    fn new(stuck_after: Duration) -> Self {
        let writable = Gauge::default();
        writable.set(1);
        Writability {
            last_commit_ok: AtomicBool::new(true),
            free_bytes: AtomicU64::new(u64::MAX),
            write_began: AtomicU64::new(0),
            epoch: Instant::now(),
            stuck_after,
            stuck_said: AtomicBool::new(false),
            writable,
            free_gauge: Gauge::default(),
        }
    }

    fn is_writable(&self) -> bool {
        if self.write_stuck_for().is_some() {
            // The writer, blocked, publishes nothing: whoever asks (a signing request,
            // /readyz, the 5-second probe) puts the gauge in step.
            self.writable.set(0);
            return false;
        }
        self.last_commit_ok.load(Ordering::Acquire)
            && has_room(self.free_bytes.load(Ordering::Acquire))
    }

    fn write_begins(&self) {
        let since_epoch = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.write_began.store(since_epoch + 1, Ordering::Release);
    }

    /// The write under way ended; returns how long it took.
    fn write_ends(&self) -> Duration {
        let took = self.write_under_way_for().unwrap_or_default();
        self.write_began.store(0, Ordering::Release);
        self.stuck_said.store(false, Ordering::Release);
        took
    }

    fn write_under_way_for(&self) -> Option<Duration> {
        match self.write_began.load(Ordering::Acquire) {
            0 => None,
            began => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(began - 1)),
            ),
        }
    }

    /// How long the write under way has been, once that is [`STUCK_WRITE`] or longer.
    fn write_stuck_for(&self) -> Option<Duration> {
        self.write_under_way_for()
            .filter(|under_way| *under_way >= self.stuck_after)
    }

    fn publish(&self) {
        self.writable.set(i64::from(self.is_writable()));
    }

    fn committed(&self, ok: bool) {
        self.last_commit_ok.store(ok, Ordering::Release);
        self.publish();
    }

    /// Records the free space; returns whether the log had room before.
    fn free_space(&self, free: u64) -> bool {
        let before = self.free_bytes.swap(free, Ordering::AcqRel);
        self.free_gauge.set(i64::try_from(free).unwrap_or(i64::MAX));
        self.publish();
        has_room(before)
    }
}

/// Whether `free` bytes on the log's filesystem leave room for the writes to come.
fn has_room(free: u64) -> bool {
    free >= MIN_FREE_BYTES
}

/// The writer thread, joined when the last [`AuditLog`] goes (its channel closed by then,
/// so the thread ends): the file, and its lock, are closed by the time the drop returns,
/// and the log can be opened again at once.
struct WriterThread(Option<std::thread::JoinHandle<()>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

/// Lines announced but not yet sent to the writer, and the writer to wake when the last
/// of them is sent.
struct Announced {
    lines: AtomicUsize,
    writer: OnceLock<Thread>,
}

/// A line that will be appended soon (see [`AuditLog::expect_line`]): counted until it is
/// sent, or until dropped unused.
pub struct ExpectedLine(Arc<Announced>);

impl Drop for ExpectedLine {
    fn drop(&mut self) {
        if self.0.lines.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(writer) = self.0.writer.get()
        {
            writer.unpark();
        }
    }
}

/// What opening the log found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub records: Option<usize>,
    /// Where an incomplete last line (a write torn by a crash) was moved to.
    pub torn_tail_saved_to: Option<PathBuf>,
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log, takes its lock ([`AuditError::Locked`] if
    /// another process, or another open log in this one, holds it) and starts its writer
    /// thread. An incomplete last line is moved to a side file and a `recovery` record says
    /// so; it is looked for only once the lock is held, so that a line another writer has
    /// under way is never taken for one.
    pub fn open(path: &Path) -> Result<(AuditLog, OpenReport), AuditError> {
        Self::open_with(path, COMMIT_DELAY, STUCK_WRITE, SystemTime::now())
    }

    /// [`AuditLog::open`] with the commit delay, the time after which a write counts as
    /// stuck, and `now` for a torn tail's side file.
    fn open_with(
        path: &Path,
        commit_delay: Duration,
        stuck_after: Duration,
        now: SystemTime,
    ) -> Result<(AuditLog, OpenReport), AuditError> {
        let io = |e: std::io::Error| AuditError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut file = crate::fsutil::open_append(path, 0o600).map_err(io)?;
        lock(&file, path)?;
        restrict_access(&file, path).map_err(io)?;
        let tail = read_tail(path).map_err(io)?;
        let mut report = OpenReport {
            records: None,
            torn_tail_saved_to: None,
        };
        let mut last_hash = tail.last_line_hash.unwrap_or_else(|| GENESIS.to_string());
        if !tail.torn.is_empty() {
            let side = save_torn_tail(path, &tail.torn, now).map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            file.set_len(len - tail.torn.len() as u64).map_err(io)?;
            let record = AuditRecord {
                time: rfc3339(SystemTime::now()),
                event: "recovery".into(),
                message: Some(format!(
                    "incomplete last line of {} bytes (sha256 {}) moved to {}",
                    tail.torn.len(),
                    hex(&sha2::Sha256::digest(&tail.torn)),
                    side.display()
                )),
                ..Default::default()
            };
            let mut buf = Vec::new();
            last_hash = encode_line(record, &last_hash, &mut buf);
            file.write_all(&buf).map_err(io)?;
            file.sync_data().map_err(io)?;
            report.torn_tail_saved_to = Some(side);
        }
        crate::fsutil::sync_dir(crate::fsutil::parent_dir(path)).map_err(io)?;
        let (tx, rx) = mpsc::channel::<Pending>();
        let writability = Arc::new(Writability::new(stuck_after));
        let announced = Arc::new(Announced {
            lines: AtomicUsize::new(0),
            writer: OnceLock::new(),
        });
        let commits = Counter::default();
        let commit_seconds = Histogram::new(COMMIT_BUCKETS);
        let truncations = Counter::default();
        let foreign_appends = Counter::default();
        let head = Arc::new(Mutex::new(last_hash.clone()));
        let metadata = file.metadata().map_err(io)?;
        let identity = FileIdentity::of(&metadata);
        let writer = Writer {
            file,
            identity,
            end: metadata.len(),
            rotation_to_record: false,
            start_to_record: None,
            path: path.to_path_buf(),
            last_hash,
            writability: writability.clone(),
            stopped: false,
            announced: announced.clone(),
            commits: commits.clone(),
            commit_seconds: commit_seconds.clone(),
            truncations: truncations.clone(),
            foreign_appends: foreign_appends.clone(),
            head: head.clone(),
            commit_delay,
            second_writer_reports: SecondWriterReports::new(),
            in_force: InForce::default(),
        };
        let thread = std::thread::Builder::new()
            .name("meshca-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        let _ = announced.writer.set(thread.thread().clone());
        let log = AuditLog {
            tx,
            _thread: Arc::new(WriterThread(Some(thread))),
            writability,
            announced,
            commits,
            commit_seconds,
            truncations,
            foreign_appends,
            head,
            path: path.to_path_buf(),
            recovering: Arc::default(),
            free_space_read_under_way: Arc::default(),
        };
        // The free space is known (and exported) from the start.
        log.check_free_space();
        Ok((log, report))
    }

    /// Announces a line: call it when a request starts, hand the result to `append`. The
    /// writer waits briefly for announced lines so that one fsync covers them.
    pub fn expect_line(&self) -> ExpectedLine {
        self.announced.lines.fetch_add(1, Ordering::AcqRel);
        ExpectedLine(self.announced.clone())
    }

    /// Appends the announced record; returns once it is on disk (fsynced) or the write
    /// failed.
    pub async fn append(
        &self,
        record: AuditRecord,
        announced: ExpectedLine,
    ) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send(Pending {
            record,
            done,
            start: false,
        });
        // Counted down after the send, so a writer woken by the last announced line finds
        // it in the channel.
        drop(announced);
        sent.map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// Writes the signer's `start` record (the rules it starts under): call it once, before
    /// any other line is appended. Returns once it is on disk, or with the error; then it
    /// stays with the writer and goes first into the next write, so no line is written
    /// before it.
    pub async fn record_start(&self, record: AuditRecord) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                record,
                done,
                start: true,
            })
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// Whether the log takes lines: its last commit succeeded (see
    /// [`AuditLog::last_commit_ok`]) and its filesystem had at least [`MIN_FREE_BYTES`]
    /// free when last looked at.
    pub fn is_writable(&self) -> bool {
        self.writability.is_writable()
    }

    /// Whether the last commit succeeded (true before the first): false from a write that
    /// failed (a full disk, an I/O error; rolled back) or a new file that could not be opened
    /// after a rotation, until a commit succeeds again; false for good once a failed write
    /// could not be rolled back (the writer then refuses every line).
    pub fn last_commit_ok(&self) -> bool {
        self.writability.last_commit_ok.load(Ordering::Acquire)
    }

    /// Whether the log's filesystem had at least [`MIN_FREE_BYTES`] free when last looked
    /// at ([`AuditLog::check_free_space`]).
    pub fn has_room(&self) -> bool {
        has_room(self.writability.free_bytes.load(Ordering::Acquire))
    }

    /// After a failed write, writes a `recovery` record once the filesystem has room again
    /// (as last looked at): the record alone would fit in a full disk's slack and claim a
    /// recovery the next line disproves. One probe at a time, so an outage gets one record.
    /// None when there is nothing to recover, no room yet, or another probe is under way.
    pub async fn write_recovery(&self) -> Option<Result<(), AuditError>> {
        if self.last_commit_ok() || !self.has_room() {
            return None;
        }
        if self.recovering.swap(true, Ordering::AcqRel) {
            return None;
        }
        // Cleared however this ends: a signing request that probes may be dropped
        // mid-write (its client gone), and a flag left set would stop every later probe.
        struct Clear<'a>(&'a AtomicBool);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _clear = Clear(&self.recovering);
        // Another probe may have recovered the log while this one waited.
        if self.last_commit_ok() {
            return None;
        }
        let record = AuditRecord {
            time: rfc3339(SystemTime::now()),
            event: "recovery".into(),
            message: Some("the audit log takes lines again after a failed write".into()),
            ..Default::default()
        };
        Some(self.append(record, self.expect_line()).await)
    }

    /// Why the log takes no lines, or None while it does.
    pub fn unwritable_reason(&self) -> Option<String> {
        if let Some(under_way) = self.writability.write_stuck_for() {
            return Some(format!(
                "an audit log write has not returned for {} s: its disk does not answer (see the kernel log); nothing is issued until it returns",
                under_way.as_secs()
            ));
        }
        if !self.last_commit_ok() {
            return Some("the audit log cannot be written".into());
        }
        let free = self.writability.free_bytes.load(Ordering::Acquire);
        (!has_room(free)).then(|| {
            format!(
                "the audit log's filesystem has {free} bytes free, under the {MIN_FREE_BYTES} the signer keeps for its lines: make room"
            )
        })
    }

    /// Looks at the free space of the log's filesystem (of its directory: where a rotation
    /// puts the next file), records it, and says when the log gains or loses room.
    pub fn check_free_space(&self) {
        self.note_stuck_write();
        match crate::fsutil::free_bytes(crate::fsutil::parent_dir(&self.path)) {
            Ok(free) => self.note_free_space(free),
            Err(e) => self.free_space_unknown(&e.to_string()),
        }
    }

    /// [`AuditLog::check_free_space`] from async code. `statvfs` on a network filesystem
    /// whose server stopped answering does not return, and a runtime worker held in it is
    /// one of two: so it runs on a blocking thread, one at a time (a read still under way
    /// is not joined by another), and is given up on after [`FREE_SPACE_WAIT`].
    pub async fn check_free_space_off_the_runtime(&self) {
        self.note_stuck_write();
        if self.free_space_read_under_way.swap(true, Ordering::AcqRel) {
            return;
        }
        let dir = crate::fsutil::parent_dir(&self.path).to_path_buf();
        let under_way = self.free_space_read_under_way.clone();
        let read = tokio::task::spawn_blocking(move || {
            let free = crate::fsutil::free_bytes(&dir);
            under_way.store(false, Ordering::Release);
            free
        });
        match tokio::time::timeout(FREE_SPACE_WAIT, read).await {
            Ok(Ok(Ok(free))) => self.note_free_space(free),
            Ok(Ok(Err(e))) => self.free_space_unknown(&e.to_string()),
            Ok(Err(e)) => self.free_space_unknown(&e.to_string()),
            Err(_) => self.free_space_unknown(&format!(
                "statvfs did not return within {} s (a network filesystem that does not answer?)",
                FREE_SPACE_WAIT.as_secs()
            )),
        }
    }

    fn free_space_unknown(&self, error: &str) {
        tracing::debug!(
            audit_log = %self.path.display(),
            error,
            "cannot read the free space of the audit log's filesystem"
        );
    }

    /// Says once that a write has not returned for a while (its disk does not answer).
    fn note_stuck_write(&self) {
        if let Some(under_way) = self.writability.write_stuck_for()
            && !self.writability.stuck_said.swap(true, Ordering::AcqRel)
        {
            self.writability.publish();
            tracing::error!(
                audit_log = %self.path.display(),
                under_way_s = under_way.as_secs(),
                "an audit log write has not returned for {} s: its disk does not answer; nothing is issued and the signer is not ready until it returns",
                under_way.as_secs()
            );
        }
    }

    /// Records `free` bytes on the log's filesystem (what [`AuditLog::check_free_space`]
    /// read), logging a change between room and none.
    pub fn note_free_space(&self, free: u64) {
        let had_room = self.writability.free_space(free);
        match (had_room, has_room(free)) {
            (true, false) => tracing::error!(
                audit_log = %self.path.display(),
                free_bytes = free,
                min_free_bytes = MIN_FREE_BYTES,
                "the audit log's filesystem is nearly full: nothing is issued and the signer is not ready until room is made"
            ),
            (false, true) => tracing::info!(
                audit_log = %self.path.display(),
                free_bytes = free,
                "the audit log's filesystem has room again"
            ),
            _ => {}
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// 1 while the log takes lines ([`AuditLog::is_writable`]), 0 otherwise.
    pub fn writable(&self) -> &Gauge {
        &self.writability.writable
    }

    /// The free bytes last seen on the log's filesystem.
    pub fn free_bytes(&self) -> &Gauge {
        &self.writability.free_gauge
    }

    /// Counts successful writes + fsyncs (each covers one or more records).
    pub fn commits(&self) -> &Counter {
        &self.commits
    }

    /// Time of each successful commit (its lines encoded, written and fsynced): mostly the
    /// disk's share of an answer.
    pub fn commit_seconds(&self) -> &Histogram {
        &self.commit_seconds
    }

    /// Counts the times a write found the file shorter than the writer had left it: its
    /// end was cut by something else while the signer ran.
    pub fn truncations(&self) -> &Counter {
        &self.truncations
    }

    /// Counts the times a write found the file longer than the writer had left it:
    /// another writer (an older meshca, which does not take the log's lock, or another
    /// program) appended to it while the signer ran.
    pub fn foreign_appends(&self) -> &Counter {
        &self.foreign_appends
    }

    /// The hash of the last line on disk (the chain's head; [`GENESIS`] for an empty log):
    /// what `meshca audit verify` prints as the last hash, once nothing is written after it.
    pub fn head(&self) -> String {
        self.head
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Logs the chain's head when it has moved since it was last logged, so that the signer's
/// own log, shipped off the host, holds hashes of lines the audit log must still contain:
/// lines cut from the end of the audit log are then found by `meshca audit verify
/// --expect-hash`, except those written after the last logged head.
#[derive(Debug, Default)]
pub struct HeadAnchor {
    last_logged: Option<String>,
}

impl HeadAnchor {
    pub fn log_if_moved(&mut self, audit: &AuditLog) {
        let head = audit.head();
        // An empty log has no line to vouch for.
        if head == GENESIS || self.last_logged.as_ref() == Some(&head) {
            return;
        }
        // Its own target, which the log filter lets through at info whatever the level
        // (`--log-level warn` included): `audit verify --expect-hash` depends on it.
        tracing::info!(
            target: crate::logging::AUDIT_HEAD_TARGET,
            audit_log = %audit.path().display(),
            last_hash = %head,
            "audit log head: its last line hashes to last_hash (keep this line: `meshca audit verify --expect-hash` checks the log still holds that line)"
        );
        self.last_logged = Some(head);
    }
}

struct Writer {
    file: File,
    /// Which file `file` is, to notice the path being moved to another.
    identity: FileIdentity,
    /// The length `file` had when the writer last wrote it (or opened it): a file found
    /// shorter at the next write was cut by something else, one found longer was written
    /// by something else.
    end: u64,
    /// `file` was created after a rotation and does not yet hold its `rotation` record.
    rotation_to_record: bool,
    /// The `start` record, until a write took it: it goes before the lines of each write
    /// until one succeeds.
    start_to_record: Option<AuditRecord>,
    path: PathBuf,
    last_hash: String,
    /// Shared with [`AuditLog::is_writable`]: takes the outcome of each commit.
    writability: Arc<Writability>,
    /// A failed write could not be rolled back: the file may end in part of a line, so
    /// the chain cannot be continued and every commit is refused.
    stopped: bool,
    announced: Arc<Announced>,
    commits: Counter,
    commit_seconds: Histogram,
    truncations: Counter,
    foreign_appends: Counter,
    /// Shared with [`AuditLog::head`]; follows `last_hash` after each commit.
    head: Arc<Mutex<String>>,
    commit_delay: Duration,
    /// Holds back the ERRORs about another writer ([`SecondWriterReports`]).
    second_writer_reports: SecondWriterReports,
    /// What the lines written so far put in force, for a rotation's record to restate.
    in_force: InForce,
}

/// The rules and the transport trust the last `start`, `reload` and `tls_reload` lines
/// written put in force. A `rotation` record restates them: logrotate deletes the oldest
/// files, and a signer that runs unchanged for months states its rules only in its `start`
/// line, so without it later files' decisions would name rules written in no file left.
#[derive(Debug, Clone, Default)]
struct InForce {
    /// `rulesSha256` and `rules`.
    rules: Option<(String, String)>,
    tls: Option<crate::tlsutil::TransportTrust>,
    /// The cross certificate of each root announced, by its SHA-256, as the line that made
    /// it named it (the rules name announced roots only by their SHA-256): `serve --check`
    /// and `root show` look for it in the current file.
    cross_certs: std::collections::BTreeMap<String, String>,
}

impl InForce {
    fn note(&mut self, record: &AuditRecord) {
        if let (Some(digest), Some(text)) = (&record.rules_sha256, &record.rules) {
            self.rules = Some((digest.clone(), text.clone()));
            // Those of roots still announced stay; a line naming one anew replaces it.
            self.cross_certs
                .retain(|fingerprint, _| text.contains(fingerprint.as_str()));
            for (fingerprint, cross) in cross_certs_named(record.message.as_deref().unwrap_or("")) {
                if text.contains(fingerprint.as_str()) {
                    self.cross_certs.insert(fingerprint, cross);
                }
            }
        }
        if let Some(tls) = &record.tls {
            self.tls = Some(tls.clone());
        }
    }

    fn states_anything(record: &AuditRecord) -> bool {
        record.rules.is_some() || record.tls.is_some()
    }

    /// The `rotation` record at `time` beginning a new file at `path`.
    fn rotation_record(&self, time: String, path: &Path) -> AuditRecord {
        let mut message = format!(
            "the log at {} was moved away (rotated); this file continues the chain from the moved file's last line, whose hash is this line's prev",
            path.display()
        );
        if let Some((_, text)) = &self.rules {
            let root = text
                .lines()
                .next()
                .and_then(|line| line.strip_prefix("root "))
                .unwrap_or("unknown");
            message.push_str(&format!(
                "; meshca {} on host {}, issuing under root sha256 {root}, restates the rules in force (and the transport trust) so that this file stands alone",
                crate::VERSION,
                super::server::host_name()
            ));
        }
        if !self.cross_certs.is_empty() {
            let named: Vec<String> = self
                .cross_certs
                .iter()
                .map(|(fingerprint, cross)| format!("sha256 {fingerprint} ({cross})"))
                .collect();
            message.push_str(&format!(
                "; the root key vouches for the announced roots with these cross certificates, as the lines that made them named them: {}",
                named.join(", ")
            ));
        }
        AuditRecord {
            time,
            event: "rotation".into(),
            message: Some(message),
            rules_sha256: self.rules.as_ref().map(|(digest, _)| digest.clone()),
            rules: self.rules.as_ref().map(|(_, text)| text.clone()),
            tls: self.tls.clone(),
            ..Default::default()
        }
    }
}

/// Each cross certificate `message` names for an announced root, as the `start`, `reload`
/// and `rotation` lines name them (`... sha256 <root> [announced ](cross certificate
/// serial <s> sha256 <h>)`): the root's SHA-256 and `cross certificate serial <s> sha256
/// <h>`.
pub fn cross_certs_named(message: &str) -> Vec<(String, String)> {
    const OPEN: &str = "(cross certificate ";
    let mut named = Vec::new();
    let mut from = 0;
    while let Some(at) = message[from..].find(OPEN).map(|at| from + at) {
        let inside = &message[at + 1..];
        let Some(end) = inside.find(')') else {
            break;
        };
        from = at + 1 + end;
        let before = message[..at].trim_end();
        let before = before.strip_suffix(" announced").unwrap_or(before);
        let mut words = before.rsplit(' ');
        if let (Some(fingerprint), Some("sha256")) = (words.next(), words.next()) {
            named.push((fingerprint.to_string(), inside[..end].to_string()));
        }
    }
    named
}

/// What another writer did to the log, as the signer's next write found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecondWriterChange {
    /// Bytes appended (`meshca_audit_foreign_appends_total`).
    Appended,
    /// Bytes cut from the end (`meshca_audit_truncations_total`).
    Truncated,
    /// A file already holding lines moved over the log's path
    /// (`meshca_audit_foreign_appends_total`).
    Replaced,
}

impl SecondWriterChange {
    fn kind(self) -> &'static str {
        match self {
            SecondWriterChange::Appended => "appended",
            SecondWriterChange::Truncated => "truncated",
            SecondWriterChange::Replaced => "replaced",
        }
    }
}

/// At most one ERROR a minute for each kind of [`SecondWriterChange`]. A second writer
/// that keeps writing (an older meshca serving requests on the same log, a program
/// appending or truncating in a loop) changes the file before nearly every write of the
/// signer's, and each write would log an ERROR: one per request, flooding the log (and
/// journald's rate limit) with one fact. The counters count each; the next ERROR of a
/// kind says how many were held back since the last one.
struct SecondWriterReports(LogThrottle);

/// One ERROR a minute per kind, none saved up: the first at once, the next a minute on.
const SECOND_WRITER_REPORT_LIMIT: RateLimit = RateLimit {
    per_minute: 1,
    burst: 1,
};

impl SecondWriterReports {
    fn new() -> Self {
        SecondWriterReports(LogThrottle::new(SECOND_WRITER_REPORT_LIMIT))
    }

    /// `Some(n)` if an ERROR about `change` found at `now` is to be logged (`n`: those of
    /// its kind held back since the last one logged), else `None` (this one is held back).
    fn admit(&self, change: SecondWriterChange, now: Instant) -> Option<u64> {
        self.0.admit(change.kind(), now)
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Pending>) {
        while let Ok(first) = rx.recv() {
            // Announced lines still on their way: wait a little for them, without waking
            // for each (the last one sent wakes the writer). A lone request is written at
            // once.
            let deadline = Instant::now() + self.commit_delay;
            while self.announced.lines.load(Ordering::Acquire) > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let result = self.commit(&mut batch);
            for pending in batch {
                let _ = pending.done.send(result.clone());
            }
        }
    }

    /// Writes the batch, and publishes whether that worked ([`AuditLog::is_writable`]).
    fn commit(&mut self, batch: &mut [Pending]) -> Result<(), AuditError> {
        self.writability.write_begins();
        let result = self.write_batch(batch);
        let took = self.writability.write_ends();
        if result.is_ok() {
            self.commit_seconds.observe(took.as_secs_f64());
        }
        if took >= self.writability.stuck_after {
            tracing::warn!(
                path = %self.path.display(),
                took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                "an audit log write returned after {} s (its disk did not answer meanwhile)",
                took.as_secs()
            );
        }
        self.writability.committed(result.is_ok());
        result
    }

    fn write_batch(&mut self, batch: &mut [Pending]) -> Result<(), AuditError> {
        // Kept until a write succeeds, whatever happens to this one.
        for pending in batch.iter_mut().filter(|pending| pending.start) {
            self.start_to_record = Some(std::mem::take(&mut pending.record));
        }
        if self.stopped {
            return Err(AuditError::Io {
                path: self.path.display().to_string(),
                message: "an earlier write failed and could not be rolled back; restart the signer"
                    .into(),
            });
        }
        self.follow_rotation()?;
        let io = |e: std::io::Error| AuditError::Io {
            path: self.path.display().to_string(),
            message: e.to_string(),
        };
        let mut buf = Vec::with_capacity(batch.len() * 512);
        let mut hash = self.last_hash.clone();
        if self.rotation_to_record {
            let time = rotation_time(batch, self.start_to_record.as_ref());
            let record = self.in_force.rotation_record(time, &self.path);
            hash = encode_line(record, &hash, &mut buf);
        }
        // Taken over once the write succeeds (a reload whose line fails does not apply).
        let mut in_force: Option<InForce> = None;
        let records = self
            .start_to_record
            .iter()
            .chain(batch.iter().filter(|p| !p.start).map(|p| &p.record));
        for record in records {
            if InForce::states_anything(record) {
                in_force
                    .get_or_insert_with(|| self.in_force.clone())
                    .note(record);
            }
        }
        if let Some(start) = &self.start_to_record {
            hash = encode_line(start.clone(), &hash, &mut buf);
        }
        for pending in batch.iter_mut().filter(|pending| !pending.start) {
            hash = encode_line(std::mem::take(&mut pending.record), &hash, &mut buf);
        }
        // One fstat per write tells both: the file cut short, or grown by another writer.
        // A device (`/dev/full`) has no length to compare.
        let metadata = self.file.metadata().map_err(io)?;
        let before = metadata.len();
        if metadata.is_file() && before < self.end {
            self.truncated(before);
        } else if metadata.is_file() && before > self.end {
            self.appended_by_another(before);
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.end = before + buf.len() as u64;
                *self
                    .head
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = hash.clone();
                self.last_hash = hash;
                self.rotation_to_record = false;
                self.start_to_record = None;
                if let Some(in_force) = in_force {
                    self.in_force = in_force;
                }
                self.commits.inc();
                Ok(())
            }
            Err(e) => {
                // Take back whatever part of the batch reached the file; if that fails the
                // chain can no longer be trusted to continue, so stop accepting records.
                if self
                    .file
                    .set_len(before)
                    .and_then(|()| self.file.sync_data())
                    .is_err()
                {
                    self.stopped = true;
                }
                self.end = before;
                tracing::error!(path = %self.path.display(), error = %e, "audit write failed; refusing to issue");
                Err(io(e))
            }
        }
    }

    /// The file is `length` bytes long, shorter than the writer left it: lines were cut
    /// from its end in place (a truncate, an editor writing back fewer lines) by something
    /// else while the signer ran. Said and counted; the chain goes on from the last line
    /// the writer wrote, so `meshca audit verify` shows the break where the lines were.
    fn truncated(&self, length: u64) {
        self.truncations.inc();
        let change = SecondWriterChange::Truncated;
        let Some(not_logged) = self.second_writer_reports.admit(change, Instant::now()) else {
            return;
        };
        tracing::error!(
            path = %self.path.display(),
            written_to = self.end,
            length,
            missing_bytes = self.end - length,
            not_logged_since_last = not_logged,
            "audit log is shorter than the signer wrote it: its last {} bytes were cut by something else while the signer ran (lines removed in place); the chain goes on from the signer's last line, and `meshca audit verify` shows the break{}",
            self.end - length,
            held_back(not_logged)
        );
    }

    /// The file is `length` bytes long, longer than the writer left it: something else
    /// appended to it while the signer ran, an older meshca (which takes no lock on the
    /// log) or another program. Said and counted; the batch is written after those bytes
    /// (the file is opened for appending) and still continues the writer's own last line,
    /// not the other writer's: the chain must vouch only for lines this signer wrote (any
    /// line at all would verify once chained from), its own lines stay one chain with the
    /// heads it logged (an auditor follows them, prev by prev, past the other's), and the
    /// bytes may be a line still under way, whose hash is not known yet. So `meshca audit
    /// verify` breaks at the first of the other writer's lines and names the line the
    /// chain goes on from.
    fn appended_by_another(&self, length: u64) {
        self.foreign_appends.inc();
        let change = SecondWriterChange::Appended;
        let Some(not_logged) = self.second_writer_reports.admit(change, Instant::now()) else {
            return;
        };
        tracing::error!(
            path = %self.path.display(),
            written_to = self.end,
            length,
            added_bytes = length - self.end,
            not_logged_since_last = not_logged,
            "audit log is longer than the signer wrote it: {} bytes were appended by another writer while the signer ran (another meshca on the same log, such as an older build, which does not lock it, or another program): the hash chain will not verify past this point; stop the other writer; the signer goes on with its own chain{}",
            length - self.end,
            held_back(not_logged)
        );
    }

    /// If the log's path no longer names the file being written (moved away by a
    /// rotation, or its directory with it: the path names another file, nothing, or has a
    /// file where a directory was), opens (creates, mode 0600) the file now at the path
    /// and marks the `rotation` record to be written first. The new file is locked before
    /// it is written (the moved file's lock goes with it once it is closed). A path that
    /// cannot be looked at for another reason leaves the writer on its file.
    fn follow_rotation(&mut self) -> Result<(), AuditError> {
        use std::io::ErrorKind;
        let at_path = match std::fs::metadata(&self.path) {
            Ok(meta) => Some(FileIdentity::of(&meta)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => None,
            Err(_) => return Ok(()),
        };
        if at_path == Some(self.identity) {
            return Ok(());
        }
        let io = |e: std::io::Error| AuditError::Io {
            path: self.path.display().to_string(),
            message: format!("cannot open a new file after the log was moved away: {e}"),
        };
        let file = crate::fsutil::open_append(&self.path, 0o600).map_err(io)?;
        lock(&file, &self.path)?;
        restrict_access(&file, &self.path).map_err(io)?;
        crate::fsutil::sync_dir(crate::fsutil::parent_dir(&self.path)).map_err(io)?;
        let metadata = file.metadata().map_err(io)?;
        self.identity = FileIdentity::of(&metadata);
        self.end = metadata.len();
        self.file = file;
        self.rotation_to_record = true;
        if self.end > 0 {
            // A rotation leaves nothing at the path, or an empty file (logrotate's
            // `create`): lines already there were put by someone else, such as a forged
            // chain moved over the log. Counted with the other writers' lines.
            self.foreign_appends.inc();
            let change = SecondWriterChange::Replaced;
            if let Some(not_logged) = self.second_writer_reports.admit(change, Instant::now()) {
                tracing::error!(
                    path = %self.path.display(),
                    found_bytes = self.end,
                    not_logged_since_last = not_logged,
                    "the audit log was replaced by a file that already holds {} bytes: not a rotation, which leaves no file or an empty one; the signer continues its chain after them, but they are not its own: keep the file moved away (the signer's lines up to now) and check both with `meshca audit verify`{}",
                    self.end,
                    held_back(not_logged)
                );
            }
        } else {
            tracing::info!(path = %self.path.display(), "audit log was moved away (rotated): continuing its chain in a new file at its path");
        }
        Ok(())
    }
}

/// What an ERROR about another writer adds when others of its kind were held back.
fn held_back(not_logged: u64) -> String {
    if not_logged == 0 {
        String::new()
    } else {
        format!(
            " ({not_logged} more found since the last such line, not logged: at most one a minute; the metric counts each)"
        )
    }
}

/// The time of a `rotation` record written before `batch` (and the `start` record, if it
/// goes too): now, or the earliest time of those lines if earlier, so that time does not
/// go back after it. They were stamped when they were decided, before they reached the
/// writer, which notices the rotation only as it writes them.
fn rotation_time(batch: &[Pending], start: Option<&AuditRecord>) -> String {
    let now = rfc3339(SystemTime::now());
    let earliest = batch
        .iter()
        .map(|pending| &pending.record)
        .chain(start)
        .map(|record| record.time.as_str())
        // Times [`rfc3339`] wrote, which compare as text (a `start` record taken out of
        // the batch has none).
        .filter(|time| time.len() == now.len() && time.starts_with(|c: char| c.is_ascii_digit()))
        .min()
        .map(str::to_string);
    match earliest {
        Some(earliest) if earliest < now => earliest,
        _ => now,
    }
}

/// Takes the exclusive lock on the log's open file, without waiting: it is held while the
/// file is open (the lock belongs to the open file, whose writer keeps it), and keeps a
/// second signer (or any other meshca opening the log to write) from writing the same
/// file, whose chain the two would fork. A log that is not a regular file (a device such
/// as `/dev/full`) holds no chain and is not locked.
fn lock(file: &File, path: &Path) -> Result<(), AuditError> {
    let io = |e: std::io::Error| AuditError::Io {
        path: path.display().to_string(),
        message: format!("cannot lock the file: {e}"),
    };
    if !file.metadata().map_err(io)?.is_file() {
        return Ok(());
    }
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(AuditError::Locked {
            path: path.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Where an incomplete last line found at `now` is moved: the log's name with
/// `.torn-<Unix seconds>` appended (`audit.log` -> `audit.log.torn-1790000000`), beside it;
/// `n` > 0 adds `.<n>` (`audit.log.torn-1790000000.1`).
fn torn_side_file(path: &Path, now: SystemTime, n: u32) -> PathBuf {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".torn-{secs}"));
    if n > 0 {
        name.push(format!(".{n}"));
    }
    PathBuf::from(name)
}

/// Writes `torn` (mode 0600, fsynced) to a side file of its own ([`torn_side_file`]),
/// never over one there: each `recovery` record names its side file's SHA-256, and a
/// second recovery in the same second must not replace the first's. Written whole under a
/// temporary name, then linked to the first free name.
fn save_torn_tail(path: &Path, torn: &[u8], now: SystemTime) -> std::io::Result<PathBuf> {
    let dir = crate::fsutil::parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".meshca-tmp-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(torn)?;
    tmp.as_file().sync_all()?;
    let mut n = 0;
    loop {
        let side = torn_side_file(path, now, n);
        match tmp.persist_noclobber(&side) {
            Ok(_) => return Ok(side),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => {
                tmp = e.file;
                n += 1;
            }
            Err(e) => return Err(e.error),
        }
    }
}

/// Makes the log writable by the signer alone. Its chain has no key, so a line appended by
/// anyone else who can write the file would chain as well as the signer's own: write
/// access for group or others is removed (a file made by logrotate's `create`, or chmod-ed
/// by hand), with a warning. If the signer may not change the mode (it does not own the
/// file), that is logged as an error and the log is written anyway: refusing it would stop
/// every issuance, at whatever hour the rotation ran. Read access by others is only warned
/// of (a log shipper may read it by group, but its lines name clients and decisions).
fn restrict_access(file: &File, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        // A device (a test's /dev/full) is the system's: its mode is not the log's.
        return Ok(());
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        let restricted = mode & !0o022;
        match file.set_permissions(std::fs::Permissions::from_mode(restricted)) {
            Ok(()) => tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                now = format!("{restricted:o}"),
                "audit log was writable by group or others: their write access removed (only the signer writes it)"
            ),
            Err(e) => tracing::error!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                error = %e,
                "audit log is writable by group or others and the signer cannot change its mode: whoever can write it can add lines that verify; make the signer's user its owner, or chmod go-w"
            ),
        }
    }
    if mode & 0o004 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", mode & !0o022),
            "audit log is readable by every user (its lines name clients and decisions): chmod o-r"
        );
    }
    Ok(())
}

/// Device and inode: what a path names, whatever it is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            device: meta.dev(),
            inode: meta.ino(),
        }
    }
}

/// Serializes `record` with `prev`, appends the line and its newline, returns its hash.
fn encode_line(mut record: AuditRecord, prev: &str, buf: &mut Vec<u8>) -> String {
    record.prev = prev.to_string();
    let start = buf.len();
    // Serializing structs of strings (keys are field names) cannot fail.
    serde_json::to_writer(&mut *buf, &record).unwrap_or_default();
    let hash = hex(&sha2::Sha256::digest(&buf[start..]));
    buf.push(b'\n');
    hash
}

struct Tail {
    last_line_hash: Option<String>,
    /// Bytes after the last newline: a line whose write never completed.
    torn: Vec<u8>,
}

/// How many bytes follow the log's last complete line: a write torn by a crash, which
/// the next start moves aside (`meshca serve --check` reports it). Writes nothing.
pub fn torn_tail_len(path: &Path) -> std::io::Result<usize> {
    Ok(read_tail(path)?.torn.len())
}

/// Reads backwards from the end of the file to the last complete line. Each byte is
/// looked at once: a long tail without newlines (a log edited, or a file system that left
/// a run of zeros after a crash) must not cost the signer's start time quadratic in its
/// length, as rescanning a growing window for every 64 KiB read did. It looks at most
/// [`MAX_TAIL`] bytes back, and holds no more: a longer tail is refused, not read.
fn read_tail(path: &Path) -> std::io::Result<Tail> {
    const CHUNK: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let floor = len.saturating_sub(MAX_TAIL);
    // The offsets of the last newline and of the one before it, found from the end.
    let mut newlines: Vec<u64> = Vec::with_capacity(2);
    let mut chunk = vec![0u8; CHUNK as usize];
    let mut end = len;
    while end > floor && newlines.len() < 2 {
        let start = end.saturating_sub(CHUNK).max(floor);
        let chunk = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        for (i, b) in chunk.iter().enumerate().rev() {
            if *b == b'\n' {
                newlines.push(start + i as u64);
                if newlines.len() == 2 {
                    break;
                }
            }
        }
        end = start;
    }
    let last_newline = newlines.first().copied();
    // A torn write is at most one line: more after the last newline is something else.
    let torn_len = len - last_newline.map_or(0, |at| at + 1);
    let last_line_too_long = last_newline
        .is_some_and(|at| at - newlines.get(1).map_or(0, |before| before + 1) > MAX_LINE);
    if torn_len > MAX_LINE || last_line_too_long || (newlines.len() < 2 && end > 0) {
        return Err(tail_too_long(len, len - end, last_newline));
    }
    // From the start of the last complete line (or of the file) to the end, read once.
    let from = match newlines.as_slice() {
        [_, before, ..] => before + 1,
        _ => 0,
    };
    file.seek(SeekFrom::Start(from))?;
    let mut window = vec![0u8; (len - from) as usize];
    file.read_exact(&mut window)?;
    let last = newlines.first().map(|at| (at - from) as usize);
    let torn = window.split_off(last.map_or(0, |last| last + 1));
    Ok(Tail {
        last_line_hash: last.map(|last| hex(&sha2::Sha256::digest(&window[..last]))),
        torn,
    })
}

/// Why a log of `len` bytes, of which the last `scanned` were looked at for newlines
/// (the last one at `last_newline`), has a tail a start does not read, and what to do.
fn tail_too_long(len: u64, scanned: u64, last_newline: Option<u64>) -> std::io::Error {
    let advice = "a run of zeros or garbage a crash or the file system left, or a file that is not an audit log; keep a copy of the file, cut it after its last complete line (truncate -s), check the rest with `meshca audit verify`, and start again";
    let problem = match last_newline {
        Some(at) if len - at - 1 > MAX_LINE => format!(
            "it ends in {} bytes without a newline, after byte {}: more than a torn write can leave (meshca writes lines of at most {MAX_LINE} bytes); {advice} (truncate -s {} FILE)",
            len - at - 1,
            at + 1,
            at + 1
        ),
        Some(at) => format!(
            "its last complete line, ending at byte {}, is longer than the {MAX_LINE} bytes meshca reads as a line: {advice}",
            at + 1
        ),
        None => format!(
            "its last {scanned} bytes (of {len}) hold no newline: more than a torn write can leave (meshca writes lines of at most {MAX_LINE} bytes); {advice}"
        ),
    };
    std::io::Error::new(std::io::ErrorKind::InvalidData, problem)
}

/// What is wrong with a line serde_json does not read (`json`, its error read as any JSON
/// value; `record`, as an audit record). Two refusals are of JSON that is valid: nesting
/// deeper than serde_json's limit of 128, and a number past a 64-bit float's range.
fn not_read_as_json(json: &serde_json::Error, record: &serde_json::Error) -> String {
    // serde_json names these only in its message (its error codes are private).
    let text = json.to_string();
    if text.starts_with("recursion limit exceeded") {
        format!(
            "not an audit record (JSON nested more than 128 levels deep, which meshca does not read; a record is one flat object): {json}"
        )
    } else if text.starts_with("number out of range") {
        format!(
            "not an audit record (JSON with a number beyond a 64-bit float's range; a record holds no such number): {json}"
        )
    } else {
        format!("not an audit record (not JSON): {record}")
    }
}

/// How a log checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    Intact {
        records: usize,
        last_hash: String,
        /// The file begins with a `rotation` record: the hash of the last line of the file
        /// it continues (moved away by a rotation).
        continues_from: Option<String>,
        /// Of the hashes asked for ([`verify`]'s `anchors`), each one a line of this file
        /// hashes to, with that line's number.
        anchored: Vec<(String, usize)>,
        /// Records whose time is more than [`CLOCK_STEP_NOTED`] before the record's
        /// before them: the signer's clock was set back there (or a time was changed
        /// before the line was written). The first [`CLOCK_STEPS_LISTED`] of them.
        clock_steps_back: Vec<ClockStepBack>,
        /// How many there are in all.
        clock_steps_back_total: usize,
        /// The time of the last record, if it reads as one (after an empty file, that of
        /// the file before): the next file's first record is compared with it.
        last_time: Option<String>,
    },
    Broken {
        line: usize,
        problem: String,
    },
}

/// How far a record's time may be before the one before it without being named: records
/// are timed as their decisions end and written in the order they reach the writer, so
/// neighbours differ by the time a write waits, not by minutes.
pub const CLOCK_STEP_NOTED: std::time::Duration = std::time::Duration::from_secs(60);

/// How many steps back [`verify`] lists (it counts them all).
pub const CLOCK_STEPS_LISTED: usize = 16;

/// A record timed more than [`CLOCK_STEP_NOTED`] before the record before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockStepBack {
    pub line: usize,
    pub time: String,
    pub previous_time: String,
    /// How far back, in whole seconds.
    pub seconds: u64,
}

/// The end of the file a file of a rotated log follows, as [`verify`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Follows<'a> {
    /// The hash of its last line, which the next file's first line continues.
    pub last_hash: &'a str,
    /// The time of its last record, if it read as one: a clock set back just as the log
    /// rotated steps back between the two files.
    pub last_time: Option<&'a str>,
}

/// Checks every line's `prev` against the hash of the line before it. The first line's
/// `prev` must be `after`'s last hash (of the file this one follows) when given; else
/// the chain's start, or the line is a `rotation` record continuing a file not given.
/// Lines whose hash is one of `anchors` are named in the outcome. A last line without its
/// newline is torn, as the signer's start takes it (it moves such a line aside): it breaks
/// the file, and is neither counted nor the last hash. A compressed file is an error that
/// says to decompress it first. Records timed well before the record before them are
/// named (a clock set back), not a break, the first record against the last of the file
/// before too.
pub fn verify(
    mut reader: impl std::io::BufRead,
    follows: Option<Follows<'_>>,
    anchors: &[String],
) -> std::io::Result<VerifyOutcome> {
    let after = follows.map(|f| f.last_hash);
    let read_error = |e: std::io::Error, number: usize| {
        std::io::Error::new(e.kind(), format!("cannot read line {}: {e}", number + 1))
    };
    if let Some((format, decompress)) =
        compression(reader.fill_buf().map_err(|e| read_error(e, 0))?)
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "compressed with {format} (as logrotate's `compress` leaves a rotated log), not an audit log as written: decompress it first (`{decompress} FILE > FILE-decompressed`, or give `<({decompress} FILE)` in its place)"
            ),
        ));
    }
    let mut prev = after.unwrap_or(GENESIS).to_string();
    // The hashes of the last lines (line 0: what line 1 continues), to tell a break where
    // a line continues an earlier line than the one before it: two writers, or lines
    // inserted.
    let mut recent: std::collections::VecDeque<(usize, String)> = std::collections::VecDeque::new();
    let mut continues_from = None;
    let mut anchored = Vec::new();
    let mut clock_steps_back = Vec::new();
    let mut clock_steps_back_total = 0;
    let mut previous_time: Option<(i128, String)> = follows
        .and_then(|f| f.last_time)
        .and_then(|text| Some((rfc3339_millis(text)?, text.to_string())));
    let mut records = 0;
    let mut number = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        // The number says how far the file could be read: an I/O error names no place.
        // At most one byte past the longest line: a file that is not a log, or a run of
        // zeros a crash left, is not read into memory whole.
        if std::io::BufRead::read_until(
            &mut std::io::Read::take(&mut reader, MAX_LINE + 1),
            b'\n',
            &mut line,
        )
        .map_err(|e| read_error(e, number))?
            == 0
        {
            break;
        }
        number += 1;
        if line.len() as u64 > MAX_LINE && line.last() != Some(&b'\n') {
            return Ok(VerifyOutcome::Broken {
                line: number,
                problem: format!(
                    "longer than the {MAX_LINE} bytes meshca reads as a line (and longer than any line a signer writes): a run of zeros or garbage a crash or the file system left, or not an audit log; the {} lines before it verify",
                    number - 1
                ),
            });
        }
        if line.pop_if(|last| *last == b'\n').is_none() {
            return Ok(VerifyOutcome::Broken {
                line: number,
                problem: format!(
                    "incomplete last line ({} bytes without a newline at its end): a write torn by a crash (or one still under way); the {} lines before it verify, and the signer's next start moves it aside and records that",
                    line.len(),
                    number - 1
                ),
            });
        }
        let record: AuditRecord = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let problem = if line.is_empty() {
                    "an empty line, not an audit record".to_string()
                } else {
                    match serde_json::from_slice::<serde_json::Value>(&line) {
                        Ok(_) => format!("JSON, but not an audit record: {e}"),
                        Err(json) => not_read_as_json(&json, &e),
                    }
                };
                return Ok(VerifyOutcome::Broken {
                    line: number,
                    problem,
                });
            }
        };
        let continues_a_file_not_given =
            number == 1 && after.is_none() && record.event == "rotation" && record.prev != GENESIS;
        if number == 1 {
            recent.push_back((0, record.prev.clone()));
        }
        if continues_a_file_not_given {
            continues_from = Some(record.prev.clone());
        } else if record.prev != prev {
            let problem = match (number, after) {
                (1, Some(_)) => format!(
                    "does not continue the file before it: prev is {}, but that file's last line hashes to {prev} (files out of order, or lines missing between them)",
                    record.prev
                ),
                (1, None) => format!(
                    "the chain does not start here: prev is {}, not the chain's start (lines removed from the beginning; a file continuing a rotated one begins with a rotation record)",
                    record.prev
                ),
                _ => broken_link(number, &record.prev, &prev, &recent),
            };
            return Ok(VerifyOutcome::Broken {
                line: number,
                problem,
            });
        }
        prev = hex(&sha2::Sha256::digest(&line));
        records += 1;
        let time = rfc3339_millis(&record.time);
        if let (Some(millis), Some((before, before_text))) = (time, &previous_time) {
            let back = before - millis;
            if back > CLOCK_STEP_NOTED.as_millis() as i128 {
                clock_steps_back_total += 1;
                if clock_steps_back.len() < CLOCK_STEPS_LISTED {
                    clock_steps_back.push(ClockStepBack {
                        line: number,
                        time: record.time.clone(),
                        previous_time: before_text.clone(),
                        seconds: u64::try_from(back / 1000).unwrap_or(u64::MAX),
                    });
                }
            }
        }
        previous_time = time.map(|millis| (millis, record.time));
        if recent.len() == VERIFY_LOOKBACK {
            recent.pop_front();
        }
        recent.push_back((number, prev.clone()));
        if anchors.contains(&prev) {
            anchored.push((prev.clone(), number));
        }
    }
    // A signer writes its first line (`start`, or `rotation` in a file a rotation began)
    // before anything else: no line proves nothing, and a log emptied in place (a
    // truncate to 0) must not pass as intact. Verified after the file it follows, an
    // empty file is a rotation's new one with no line yet (logrotate's `create`): the
    // chain ends with the file before, as one whose last lines were cut would.
    if number == 0 && after.is_none() {
        return Ok(VerifyOutcome::Broken {
            line: 1,
            problem: EMPTY_LOG.to_string(),
        });
    }
    Ok(VerifyOutcome::Intact {
        records,
        last_hash: prev,
        continues_from,
        anchored,
        clock_steps_back,
        clock_steps_back_total,
        last_time: previous_time.map(|(_, text)| text),
    })
}

/// What `audit verify` says of a file with no line.
const EMPTY_LOG: &str = "the file is empty, with no record: a signer's log begins with its `start` record (or a `rotation` record, in a file a rotation began), so either the log was emptied (truncated), or its signer has written nothing to it yet (its first start stopped before the `start` record, or a rotation moved the log away and no line came since: verify it after the file it follows, `meshca audit verify audit.log.1 audit.log`, where it passes)";

/// Why line `number`, whose prev is `its_prev`, does not continue the line before it,
/// which hashes to `before_hash`; `recent` holds the hashes of the lines before (line 0:
/// what line 1 continues). A prev that is the hash of an earlier line, or the chain's
/// start, is what a second writer leaves: each writer continues its own last line (or
/// starts from what it found), and the other's lines come between.
fn broken_link(
    number: usize,
    its_prev: &str,
    before_hash: &str,
    recent: &std::collections::VecDeque<(usize, String)>,
) -> String {
    let before = number - 1;
    let head = format!(
        "line {number} does not continue line {before}: its prev is {its_prev}, but line {before} hashes to {before_hash}"
    );
    let two_writers = "two writers append to this log, each continuing its own chain (a second signer on the same file: an older meshca, which does not lock the log, left running beside a newer one, or another program)";
    let continued = recent
        .iter()
        .rev()
        .find(|(_, hash)| hash == its_prev)
        .map(|(at, _)| *at);
    match continued {
        Some(at) => {
            let from = if at > 0 {
                format!("the hash of line {at}")
            } else if its_prev == GENESIS {
                "the chain's start, as line 1's is".to_string()
            } else {
                "what line 1 continues".to_string()
            };
            let lines = if at + 1 == before {
                format!("line {before} is")
            } else {
                format!("lines {} to {before} are", at + 1)
            };
            format!(
                "{head}; its prev is {from}, so {lines} not in its chain: {two_writers}, or those lines were inserted"
            )
        }
        None if its_prev == GENESIS => format!(
            "{head}; its prev is the chain's start, so a second chain starts here: {two_writers}, or line {number}'s prev was changed"
        ),
        None => format!(
            "{head}; line {before} was changed, lines were removed or inserted between them, line {number}'s prev was changed, or {two_writers}"
        ),
    }
}

/// The compression `start` (a file's first bytes) shows, and the command that undoes it.
/// An audit line begins with `{`, which none of these magic numbers does.
fn compression(start: &[u8]) -> Option<(&'static str, &'static str)> {
    const FORMATS: [(&[u8], &str, &str); 4] = [
        (&[0x1f, 0x8b], "gzip", "zcat"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd", "zstdcat"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz", "xzcat"),
        (b"BZh", "bzip2", "bzcat"),
    ];
    FORMATS
        .iter()
        .find(|(magic, _, _)| start.starts_with(magic))
        .map(|(_, format, decompress)| (*format, *decompress))
}

/// [`verify`] of the file at `path`, whose errors name it (a directory, a file that cannot
/// be opened or read). Any file that reads is taken, a pipe too (`<(zcat audit.log.2.gz)`).
pub fn verify_file(
    path: &Path,
    follows: Option<Follows<'_>>,
    anchors: &[String],
) -> Result<VerifyOutcome, AuditError> {
    let named = |message: String| AuditError::Io {
        path: path.display().to_string(),
        message,
    };
    let file = File::open(path).map_err(|e| named(format!("cannot open: {e}")))?;
    verify(std::io::BufReader::new(file), follows, anchors).map_err(|e| named(e.to_string()))
}

/// Where the audit log's times are written (and read back); used across meshca from here.
pub use crate::pki::datetime::{rfc3339, rfc3339_millis};

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> AuditRecord {
        AuditRecord {
            time: rfc3339(SystemTime::now()),
            event: "decision".into(),
            client: Some(format!("client-{n}")),
            decision: Some("allow".into()),
            ..Default::default()
        }
    }

    fn verify_file(path: &Path) -> VerifyOutcome {
        verify_after(path, None)
    }

    /// `meshca audit verify DIR` printed only "Is a directory (os error 21)".
    #[test]
    fn a_file_that_cannot_be_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.log");
        for (path, says) in [
            (
                dir.path().to_path_buf(),
                "cannot read line 1: Is a directory",
            ),
            (missing, "cannot open: No such file"),
        ] {
            let message = super::verify_file(&path, None, &[])
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with(&format!("audit log {}: ", path.display()))
                    && message.contains(says),
                "{message}"
            );
        }
    }

    /// An empty file verified as intact with 0 records, and a lone torn line must not
    /// either: each breaks at line 1, by name. Only after the file it follows is an
    /// empty file a rotation's new one, with nothing written yet.
    #[test]
    fn an_empty_file_or_a_lone_torn_line_is_not_an_intact_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let earlier = "ab".repeat(32);
        for (contents, says) in [
            (&b""[..], "the file is empty, with no record"),
            (&b"{\"time\":\"2026"[..], "incomplete last line"),
        ] {
            std::fs::write(&path, contents).unwrap();
            for after in [None, Some(earlier.as_str())] {
                match verify_after(&path, after) {
                    VerifyOutcome::Broken { line: 1, problem } if problem.contains(says) => {}
                    VerifyOutcome::Intact {
                        records: 0,
                        last_hash,
                        ..
                    } if contents.is_empty() && after == Some(last_hash.as_str()) => {}
                    other => panic!("{contents:?} after {after:?}: {other:?}"),
                }
            }
        }
    }

    fn verify_after(path: &Path, after: Option<&str>) -> VerifyOutcome {
        let follows = after.map(|last_hash| Follows {
            last_hash,
            last_time: None,
        });
        verify(
            std::io::BufReader::new(File::open(path).unwrap()),
            follows,
            &[],
        )
        .unwrap()
    }

    /// A record timed hours before the one before it is named, and the records after it
    /// are not (they follow it); seconds out of order, as writes waiting in turn leave, are
    /// not named either. The chain stays intact.
    #[tokio::test]
    async fn records_timed_well_before_the_one_before_them_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        let times = [
            "2026-12-03T13:02:37.227Z",
            "2026-12-03T13:02:32.000Z",
            "2026-12-03T13:03:00.000Z",
            "2026-12-01T14:49:47.283Z",
            "2026-12-01T14:50:01.000Z",
            "not a time",
            "2026-11-30T00:00:00.000Z",
        ];
        for (n, time) in times.iter().enumerate() {
            let timed = AuditRecord {
                time: time.to_string(),
                ..record(n)
            };
            log.append(timed, log.expect_line()).await.unwrap();
        }
        drop(log);
        // A record after one whose time does not read is not compared (line 7).
        match verify_file(&path) {
            VerifyOutcome::Intact {
                clock_steps_back,
                clock_steps_back_total: 1,
                ..
            } => assert_eq!(
                clock_steps_back,
                [ClockStepBack {
                    line: 4,
                    time: "2026-12-01T14:49:47.283Z".into(),
                    previous_time: "2026-12-03T13:03:00.000Z".into(),
                    seconds: 166_392,
                }]
            ),
            other => panic!("{other:?}"),
        }
    }

    /// The clock set back just as the log rotated: the new file's first record (the
    /// `rotation` one) is timed two hours before the moved file's last. Verified after that
    /// file, it is named; an empty file between them (a rotation with no line yet) carries
    /// the time on. Alone, a file continuing one not given has nothing to compare with.
    #[tokio::test]
    async fn a_clock_set_back_as_the_log_rotated_is_named_across_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let moved = dir.path().join("audit.log.1");
        let (log, _) = AuditLog::open(&path).unwrap();
        // Times long past: the rotation record takes the earliest of its batch's, or now.
        for (n, time) in ["2020-06-01T12:00:00.000Z", "2020-06-01T12:00:01.000Z"]
            .iter()
            .enumerate()
        {
            let timed = AuditRecord {
                time: time.to_string(),
                ..record(n)
            };
            log.append(timed, log.expect_line()).await.unwrap();
        }
        std::fs::rename(&path, &moved).unwrap();
        let set_back = AuditRecord {
            time: "2020-06-01T10:00:00.000Z".into(),
            ..record(2)
        };
        log.append(set_back, log.expect_line()).await.unwrap();
        drop(log);

        let VerifyOutcome::Intact {
            last_hash,
            last_time,
            clock_steps_back_total: 0,
            ..
        } = verify_file(&moved)
        else {
            panic!("{:?}", verify_file(&moved));
        };
        assert_eq!(last_time.as_deref(), Some("2020-06-01T12:00:01.000Z"));
        let follows = Follows {
            last_hash: &last_hash,
            last_time: last_time.as_deref(),
        };
        let empty = dir.path().join("empty.log");
        std::fs::write(&empty, "").unwrap();
        let VerifyOutcome::Intact {
            last_time: carried, ..
        } = super::verify_file(&empty, Some(follows), &[]).unwrap()
        else {
            panic!("an empty file after another is intact");
        };
        assert_eq!(carried, last_time);
        match super::verify_file(&path, Some(follows), &[]).unwrap() {
            VerifyOutcome::Intact {
                records: 2,
                clock_steps_back,
                clock_steps_back_total: 1,
                ..
            } => assert_eq!(
                clock_steps_back,
                [ClockStepBack {
                    line: 1,
                    time: "2020-06-01T10:00:00.000Z".into(),
                    previous_time: "2020-06-01T12:00:01.000Z".into(),
                    seconds: 7201,
                }]
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            verify_file(&path),
            VerifyOutcome::Intact {
                clock_steps_back_total: 0,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn chain_survives_reopen_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        {
            let (log, _) = AuditLog::open(&path).unwrap();
            for n in 0..3 {
                log.append(record(n), log.expect_line()).await.unwrap();
            }
        }
        {
            let (log, report) = AuditLog::open(&path).unwrap();
            assert_eq!(report.torn_tail_saved_to, None);
            let handles: Vec<_> = (3..40)
                .map(|n| {
                    let log = log.clone();
                    tokio::spawn(async move { log.append(record(n), log.expect_line()).await })
                })
                .collect();
            for h in handles {
                h.await.unwrap().unwrap();
            }
        }
        assert!(matches!(
            verify_file(&path),
            VerifyOutcome::Intact { records: 40, .. }
        ));

        let text = std::fs::read_to_string(&path).unwrap();
        let tampered = text.replacen("client-1", "client-X", 1);
        std::fs::write(&path, tampered).unwrap();
        match verify_file(&path) {
            // Line 2 was changed: line 3 no longer continues it.
            VerifyOutcome::Broken { line, problem } => {
                assert_eq!(line, 3, "{problem}");
                assert!(
                    problem.starts_with("line 3 does not continue line 2: ")
                        && problem.contains(
                            "line 2 was changed, lines were removed or inserted between them"
                        ),
                    "{problem}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_head_is_the_last_lines_hash_and_finds_lines_cut_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), GENESIS);
        let mut heads = Vec::new();
        for n in 0..3 {
            log.append(record(n), log.expect_line()).await.unwrap();
            heads.push(log.head());
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let hashes: Vec<String> = lines
            .iter()
            .map(|l| hex(&sha2::Sha256::digest(l.as_bytes())))
            .collect();
        assert_eq!(heads, hashes);
        // Reopened, the head is read back from the file.
        drop(log);
        let (log, _) = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), hashes[2]);
        drop(log);

        let anchors = [hashes[1].clone(), hashes[2].clone()];
        let check = || {
            verify(
                std::io::BufReader::new(File::open(&path).unwrap()),
                None,
                &anchors,
            )
            .unwrap()
        };
        let VerifyOutcome::Intact { anchored, .. } = check() else {
            panic!("{:?}", check());
        };
        assert_eq!(
            anchored,
            vec![(hashes[1].clone(), 2), (hashes[2].clone(), 3)]
        );
        // The last line cut: the chain still verifies, the anchor on it is not found.
        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
        let VerifyOutcome::Intact {
            records: 2,
            anchored,
            ..
        } = check()
        else {
            panic!("{:?}", check());
        };
        assert_eq!(anchored, vec![(hashes[1].clone(), 2)]);
    }

    #[tokio::test]
    async fn announced_lines_share_one_fsync_and_a_lone_line_waits_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // A delay far longer than the test: batching must end because the lines came.
        let (log, _) = AuditLog::open_with(
            &path,
            Duration::from_secs(60),
            STUCK_WRITE,
            SystemTime::now(),
        )
        .unwrap();
        let within = Duration::from_secs(20);

        tokio::time::timeout(within, log.append(record(0), log.expect_line()))
            .await
            .expect("a lone line was held for the commit delay")
            .unwrap();
        assert_eq!(log.commits().get(), 1);

        let announced: Vec<_> = (0..8).map(|_| log.expect_line()).collect();
        let appends: Vec<_> = announced
            .into_iter()
            .enumerate()
            .map(|(n, announced)| {
                let log = log.clone();
                tokio::spawn(async move { log.append(record(n + 1), announced).await })
            })
            .collect();
        for append in appends {
            tokio::time::timeout(within, append)
                .await
                .expect("announced lines were held for the commit delay")
                .unwrap()
                .unwrap();
        }
        assert_eq!(log.commits().get(), 2, "eight announced lines, one fsync");
        assert!(matches!(
            verify_file(&path),
            VerifyOutcome::Intact { records: 9, .. }
        ));
    }

    #[tokio::test]
    async fn a_torn_last_line_is_reported_then_recovered_into_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        {
            let (log, _) = AuditLog::open(&path).unwrap();
            log.append(record(0), log.expect_line()).await.unwrap();
        }
        let mut f = crate::fsutil::open_append(&path, 0o600).unwrap();
        f.write_all(br#"{"time":"2026-"#).unwrap();
        match verify_file(&path) {
            VerifyOutcome::Broken { line: 2, problem } => {
                assert!(problem.contains("torn"), "{problem}")
            }
            other => panic!("{other:?}"),
        }
        let (log, report) = AuditLog::open(&path).unwrap();
        let side = report.torn_tail_saved_to.unwrap();
        assert_eq!(std::fs::read(&side).unwrap(), br#"{"time":"2026-"#);
        // Named as the README says: the log's whole name, `.torn-<Unix seconds>` appended.
        let name = side.file_name().unwrap().to_str().unwrap();
        let secs = name
            .strip_prefix("audit.log.torn-")
            .unwrap_or_else(|| panic!("{name}"));
        assert!(secs.parse::<u64>().is_ok_and(|s| s > 0), "{name}");
        assert_eq!(side.parent(), path.parent());
        log.append(record(1), log.expect_line()).await.unwrap();
        assert!(matches!(
            verify_file(&path),
            VerifyOutcome::Intact { records: 3, .. }
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .contains("\"event\":\"recovery\"")
        );
    }

    /// A run of zeros after a crash, as a sparse file: no disk used. The start and
    /// `serve --check` refuse it by name after reading a bounded tail, instead of
    /// allocating the whole of it (which aborted the process).
    /// Two torn tails recovered in the same second: two side files, each holding the
    /// bytes its `recovery` record names by SHA-256 (the second does not replace the first).
    #[tokio::test]
    async fn two_recoveries_in_one_second_keep_two_side_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        let mut sides = vec![];
        for torn in [&br#"{"time":"first"#[..], &br#"{"time":"second"#[..]] {
            let mut f = crate::fsutil::open_append(&path, 0o600).unwrap();
            f.write_all(torn).unwrap();
            let (_log, report) =
                AuditLog::open_with(&path, COMMIT_DELAY, STUCK_WRITE, now).unwrap();
            let side = report.torn_tail_saved_to.unwrap();
            assert_eq!(std::fs::read(&side).unwrap(), torn);
            sides.push(side);
        }
        let names: Vec<_> = sides.iter().map(|s| s.file_name().unwrap()).collect();
        assert_eq!(
            names,
            ["audit.log.torn-1790000000", "audit.log.torn-1790000000.1"]
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let recoveries: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap())
            .collect();
        assert_eq!(recoveries.len(), 2);
        for (record, side) in recoveries.iter().zip(&sides) {
            let message = record.message.as_deref().unwrap();
            let sha = hex(&sha2::Sha256::digest(std::fs::read(side).unwrap()));
            assert!(
                message.contains(&format!("(sha256 {sha}) moved to {}", side.display())),
                "{message}"
            );
        }
        assert!(matches!(
            verify_file(&path),
            VerifyOutcome::Intact { records: 2, .. }
        ));
    }

    #[tokio::test]
    async fn a_tail_longer_than_a_line_can_be_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        {
            let (log, _) = AuditLog::open(&path).unwrap();
            log.append(record(0), log.expect_line()).await.unwrap();
        }
        let complete = std::fs::metadata(&path).unwrap().len();
        let grow = |by: u64| {
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(complete + by)
                .unwrap()
        };
        // Past a line's length, within reach of the scan: cut where the tail begins.
        grow(MAX_LINE + 10);
        let refused = torn_tail_len(&path).unwrap_err().to_string();
        assert!(
            refused.contains(&format!(
                "it ends in {} bytes without a newline, after byte {complete}",
                MAX_LINE + 10
            )) && refused.contains(&format!("truncate -s {complete} FILE")),
            "{refused}"
        );
        // 30 GiB: the scan stops at its bound.
        let zeros = 30 << 30;
        grow(zeros);
        let refused = torn_tail_len(&path).unwrap_err().to_string();
        assert!(
            refused.contains(&format!(
                "its last {MAX_TAIL} bytes (of {}) hold no newline",
                complete + zeros
            )),
            "{refused}"
        );
        let Err(AuditError::Io {
            path: named,
            message,
        }) = AuditLog::open(&path)
        else {
            panic!("a start took a 30 GiB tail");
        };
        assert_eq!(named, path.display().to_string());
        assert_eq!(message, refused);
        // Nothing moved aside or cut.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), complete + zeros);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // No newline at all, in a file shorter than the scan's bound.
        let bare = dir.path().join("bare.log");
        File::create(&bare).unwrap().set_len(MAX_LINE + 1).unwrap();
        let refused = torn_tail_len(&bare).unwrap_err().to_string();
        assert!(
            refused.contains(&format!(
                "its last {0} bytes (of {0}) hold no newline",
                MAX_LINE + 1
            )),
            "{refused}"
        );
        // A torn line of the longest length is still one.
        File::create(&bare).unwrap().set_len(MAX_LINE).unwrap();
        assert_eq!(torn_tail_len(&bare).unwrap() as u64, MAX_LINE);

        // A last "complete line" longer than any line meshca writes, then a short tail.
        let long = dir.path().join("long.log");
        let mut file = File::create(&long).unwrap();
        file.seek(SeekFrom::Start(MAX_LINE + 10)).unwrap();
        file.write_all(b"\n{\"time\":").unwrap();
        let refused = torn_tail_len(&long).unwrap_err().to_string();
        assert!(
            refused.contains(&format!(
                "its last complete line, ending at byte {}, is longer than",
                MAX_LINE + 11
            )),
            "{refused}"
        );
    }

    /// `audit verify` reads no line longer than [`MAX_LINE`] into memory (with 30 GiB of
    /// zeros it ran out of memory; this many show the bound without risking that).
    #[tokio::test]
    async fn verify_stops_at_a_line_longer_than_meshca_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        {
            let (log, _) = AuditLog::open(&path).unwrap();
            log.append(record(0), log.expect_line()).await.unwrap();
        }
        let complete = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(complete + MAX_LINE + 10)
            .unwrap();
        match verify_file(&path) {
            VerifyOutcome::Broken { line: 2, problem } => assert!(
                problem.starts_with(&format!("longer than the {MAX_LINE} bytes"))
                    && problem.contains("the 1 lines before it verify"),
                "{problem}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_log_has_one_writer_at_a_time_and_its_lock_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let refused = |opened: Result<(AuditLog, OpenReport), AuditError>, when: &str| {
            let Err(e) = opened else {
                panic!("a second writer opened the log {when}");
            };
            assert!(
                matches!(&e, AuditError::Locked { path: p } if *p == path.display().to_string()),
                "{e}"
            );
            assert!(
                e.to_string().contains("locked by another meshca process"),
                "{e}"
            );
        };
        let (log, _) = AuditLog::open(&path).unwrap();
        log.append(record(0), log.expect_line()).await.unwrap();
        // The first writer has a line under way: part of it is in the file.
        let mut writing = crate::fsutil::open_append(&path, 0o600).unwrap();
        writing.write_all(br#"{"time":"2026-"#).unwrap();
        let during = std::fs::read_to_string(&path).unwrap();
        refused(AuditLog::open(&path), "beside the first");
        // The second open did not take that line for a torn one: nothing cut, nothing moved.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), during);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // The line is finished (here: taken back, as a failed write is).
        writing
            .set_len(during.len() as u64 - br#"{"time":"2026-"#.len() as u64)
            .unwrap();

        // Rotated: the new file at the path is the writer's, locked as the first was.
        let moved = dir.path().join("audit.log.1");
        std::fs::rename(&path, &moved).unwrap();
        log.append(record(1), log.expect_line()).await.unwrap();
        refused(AuditLog::open(&path), "after a rotation");

        // Once the writer is dropped, the log opens again, and the chain runs on.
        drop(log);
        let (log, _) = AuditLog::open(&path).unwrap();
        log.append(record(2), log.expect_line()).await.unwrap();
        let VerifyOutcome::Intact { last_hash, .. } = verify_file(&moved) else {
            panic!("{:?}", verify_file(&moved));
        };
        assert!(matches!(
            verify_after(&path, Some(&last_hash)),
            VerifyOutcome::Intact { records: 3, .. }
        ));
    }

    #[test]
    fn the_log_needs_room_for_a_full_write_to_count_as_writable() {
        assert!(!has_room(0));
        // Room for a line or two (a recovery probe's) is not room for a batch.
        assert!(!has_room(700));
        assert!(!has_room(MIN_FREE_BYTES - 1));
        assert!(has_room(MIN_FREE_BYTES));
        assert!(MIN_FREE_BYTES as usize >= MAX_BATCH * 700);
    }

    #[tokio::test]
    async fn a_nearly_full_filesystem_makes_the_log_unwritable_until_room_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(&dir.path().join("audit.log")).unwrap();
        // Opened on a filesystem with room: its free space is known at once.
        assert!(log.is_writable());
        assert!(log.free_bytes().get() > 0);
        log.note_free_space(64 * 1024);
        assert!(!log.is_writable());
        assert_eq!(log.writable().get(), 0);
        assert_eq!(log.free_bytes().get(), 64 * 1024);
        let reason = log.unwritable_reason().unwrap();
        assert!(reason.contains("65536 bytes free"), "{reason}");
        // A line that still fits is written, but does not make the log writable again.
        log.append(record(1), log.expect_line()).await.unwrap();
        assert!(log.last_commit_ok());
        assert!(!log.is_writable());
        assert_eq!(log.writable().get(), 0);
        log.note_free_space(MIN_FREE_BYTES);
        assert!(log.is_writable());
        assert_eq!(log.writable().get(), 1);
        assert_eq!(log.unwritable_reason(), None);

        // Read off the runtime's threads, it finds the room again; while another such
        // read is under way (a filesystem that does not answer), none is started.
        log.note_free_space(64 * 1024);
        log.free_space_read_under_way.store(true, Ordering::Release);
        log.check_free_space_off_the_runtime().await;
        assert!(!log.is_writable());
        log.free_space_read_under_way
            .store(false, Ordering::Release);
        log.check_free_space_off_the_runtime().await;
        assert!(log.is_writable());
        assert!(!log.free_space_read_under_way.load(Ordering::Acquire));
    }

    /// A write that does not return (here: the path, after a rotation, is a FIFO nobody
    /// reads, so opening it blocks as a dead disk's fsync would): the log stops counting as
    /// writable and says why, and is no longer stuck once the write returns (here failed:
    /// a FIFO takes no fsync).
    #[tokio::test]
    async fn a_write_that_does_not_return_makes_the_log_unwritable_until_it_does() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let stuck_after = Duration::from_millis(200);
        let (log, _) =
            AuditLog::open_with(&path, COMMIT_DELAY, stuck_after, SystemTime::now()).unwrap();
        log.append(record(1), log.expect_line()).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        let fifo = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Whatever happens below, the writer is let go before the log is dropped (which
        // waits for it): a failing assertion must fail the test, not hang it.
        struct LetGo<'a>(&'a Path);
        impl Drop for LetGo<'_> {
            fn drop(&mut self) {
                let _ = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(self.0);
            }
        }
        let _let_go = LetGo(&path);
        let blocked = {
            let log = log.clone();
            tokio::spawn(async move { log.append(record(2), log.expect_line()).await })
        };
        // Bounded only so that a broken build fails instead of hanging.
        let reason = async {
            loop {
                if let Some(reason) = log.unwritable_reason() {
                    return reason;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let reason = tokio::time::timeout(Duration::from_secs(60), reason)
            .await
            .expect("a write blocked for a minute was never counted as stuck");
        assert!(
            reason.contains("an audit log write has not returned for"),
            "{reason}"
        );
        assert!(reason.contains("its disk does not answer"), "{reason}");
        assert!(!log.is_writable());
        assert_eq!(log.writable().get(), 0);
        log.check_free_space();
        assert_eq!(log.writable().get(), 0);
        assert!(!blocked.is_finished());
        // A reader comes: the write returns (a FIFO takes no fsync: it fails), and the log
        // is no longer stuck, only failed.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let returned = tokio::time::timeout(Duration::from_secs(60), blocked)
            .await
            .expect("the write did not return once the FIFO had a reader")
            .unwrap();
        assert!(returned.is_err());
        let reason = log.unwritable_reason().unwrap();
        assert!(!reason.contains("has not returned"), "{reason}");
        assert!(log.writability.write_under_way_for().is_none());
    }

    #[tokio::test]
    async fn a_recovery_is_recorded_once_and_only_once_the_filesystem_has_room_again() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let path = logs.join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        // Nothing failed: nothing to recover.
        assert!(log.write_recovery().await.is_none());
        // A write fails (rotated with its directory, a file where it was).
        std::fs::rename(&logs, dir.path().join("logs.1")).unwrap();
        std::fs::write(&logs, "").unwrap();
        log.append(record(1), log.expect_line()).await.unwrap_err();
        assert!(!log.last_commit_ok());
        std::fs::remove_file(&logs).unwrap();
        std::fs::create_dir(&logs).unwrap();
        // A line would fit now, but the filesystem is short of room (a full disk's slack
        // takes a line): no recovery is claimed, however often it is probed.
        log.note_free_space(64 * 1024);
        for _ in 0..3 {
            assert!(log.write_recovery().await.is_none());
        }
        assert!(!path.exists(), "a recovery written while short of room");
        assert!(!log.last_commit_ok());
        // Room again: one recovery record, and no second for the same outage.
        log.note_free_space(MIN_FREE_BYTES);
        log.write_recovery().await.unwrap().unwrap();
        assert!(log.is_writable());
        assert!(log.write_recovery().await.is_none());
        assert!(!log.recovering.load(Ordering::Acquire));
        let events: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().event)
            .collect();
        assert_eq!(events, ["rotation", "recovery"]);
    }

    #[tokio::test]
    async fn a_start_record_that_cannot_be_written_goes_first_into_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let path = logs.join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        assert!(log.is_writable());
        // Rotated with its directory, and a file where the directory was: no new file.
        std::fs::rename(&logs, dir.path().join("logs.1")).unwrap();
        std::fs::write(&logs, "").unwrap();
        let start = AuditRecord {
            event: "start".into(),
            ..record(0)
        };
        let refused = log.record_start(start).await.unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("cannot open a new file after the log was moved away"),
            "{refused}"
        );
        assert!(!log.is_writable());
        // A new file can be made again: the start record is written first, then the line.
        std::fs::remove_file(&logs).unwrap();
        std::fs::create_dir(&logs).unwrap();
        log.append(record(1), log.expect_line()).await.unwrap();
        assert!(log.is_writable());
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().event)
            .collect();
        assert_eq!(events, ["rotation", "start", "decision"]);
        // Written once: the next write has it no more.
        log.append(record(2), log.expect_line()).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 4);
        assert!(matches!(
            verify_file(&path),
            VerifyOutcome::Intact { records: 4, .. }
        ));
    }

    #[tokio::test]
    async fn a_log_others_may_write_is_made_the_signers_alone_at_open_and_after_a_rotation() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mode_of = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let made_by_someone_else = |mode| {
            std::fs::write(&path, "").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        // chmod-ed by hand before a start: group and others lose write access only.
        made_by_someone_else(0o666);
        let (log, _) = AuditLog::open(&path).unwrap();
        assert_eq!(mode_of(&path), 0o644);
        log.append(record(0), log.expect_line()).await.unwrap();
        // Made at the path by logrotate's `create 0660` after a rotation: continued, the
        // chain running on, writable by the signer alone.
        let moved = dir.path().join("audit.log.1");
        std::fs::rename(&path, &moved).unwrap();
        made_by_someone_else(0o660);
        log.append(record(1), log.expect_line()).await.unwrap();
        assert_eq!(mode_of(&path), 0o640);
        let VerifyOutcome::Intact { last_hash, .. } = verify_file(&moved) else {
            panic!("{:?}", verify_file(&moved));
        };
        assert!(matches!(
            verify_after(&path, Some(&last_hash)),
            VerifyOutcome::Intact { records: 2, .. }
        ));
    }

    #[tokio::test]
    async fn a_log_moved_away_is_continued_in_a_new_file_at_its_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let moved = |n: usize| dir.path().join(format!("audit.log.{n}"));
        let (log, _) = AuditLog::open(&path).unwrap();
        for n in 0..2 {
            log.append(record(n), log.expect_line()).await.unwrap();
        }
        // Rotated twice, a line written after each move.
        std::fs::rename(&path, moved(1)).unwrap();
        log.append(record(2), log.expect_line()).await.unwrap();
        log.append(record(3), log.expect_line()).await.unwrap();
        std::fs::rename(&path, moved(2)).unwrap();
        log.append(record(4), log.expect_line()).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A new, shorter file at the path is no file cut short.
        assert_eq!(log.truncations().get(), 0);
        let text = std::fs::read_to_string(moved(2)).unwrap();
        let first: AuditRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first.event, "rotation");

        // Together, oldest first, the chain runs through all three.
        let VerifyOutcome::Intact {
            records: 2,
            last_hash: first_last,
            continues_from: None,
            ..
        } = verify_file(&moved(1))
        else {
            panic!("{:?}", verify_file(&moved(1)));
        };
        let VerifyOutcome::Intact {
            records: 3,
            last_hash: second_last,
            continues_from: None,
            ..
        } = verify_after(&moved(2), Some(&first_last))
        else {
            panic!("{:?}", verify_after(&moved(2), Some(&first_last)));
        };
        let VerifyOutcome::Intact {
            records: 2,
            last_hash: third_last,
            continues_from: None,
            ..
        } = verify_after(&path, Some(&second_last))
        else {
            panic!("{:?}", verify_after(&path, Some(&second_last)));
        };
        // Alone, a continuing file says what it continues.
        let text = std::fs::read_to_string(&path).unwrap();
        let last: AuditRecord = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            verify_file(&path),
            VerifyOutcome::Intact {
                records: 2,
                last_hash: third_last,
                continues_from: Some(second_last),
                anchored: vec![],
                clock_steps_back: vec![],
                clock_steps_back_total: 0,
                last_time: Some(last.time),
            }
        );
        // Out of order, or with a file left out: refused at the first line.
        match verify_after(&path, Some(&first_last)) {
            VerifyOutcome::Broken { line: 1, problem } => {
                assert!(
                    problem.contains("does not continue the file before it"),
                    "{problem}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Lines removed from the beginning of a file are not taken for a continuation.
        let text = std::fs::read_to_string(moved(1)).unwrap();
        let without_first: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
        std::fs::write(moved(1), without_first).unwrap();
        match verify_file(&moved(1)) {
            VerifyOutcome::Broken { line: 1, problem } => {
                assert!(
                    problem.contains("the chain does not start here"),
                    "{problem}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_file_cut_in_place_is_counted_once_and_the_chain_goes_on_from_the_writers_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        for n in 0..2 {
            log.append(record(n), log.expect_line()).await.unwrap();
        }
        let head = log.head();
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap().len() as u64 + 1;
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(first)
            .unwrap();
        log.append(record(2), log.expect_line()).await.unwrap();
        assert_eq!(log.truncations().get(), 1);
        log.append(record(3), log.expect_line()).await.unwrap();
        assert_eq!(log.truncations().get(), 1);
        let text = std::fs::read_to_string(&path).unwrap();
        let third: AuditRecord = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(third.prev, head);
        assert!(matches!(
            verify_file(&path),
            VerifyOutcome::Broken { line: 2, .. }
        ));
    }

    /// A log begun by a build that wrote no `peer`, continued by one that does: the chain
    /// hashes each line as written, so both kinds verify, old lines being read as ever.
    #[tokio::test]
    async fn lines_written_before_the_peer_field_existed_still_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // As an older build wrote a decision: every field it had, no `peer`.
        let old = format!(
            r#"{{"time":"2026-11-30T10:00:00.000Z","event":"decision","client":"spiffe://meshca.test/cluster/a","clientCertificateSha256":"{h}","clientCertificateSerial":"0a","virtualMesh":"test/vm","mesh":"test/a","csrPublicKeySha256":"{h}","decision":"allow","rule":"issued","serial":"3f","notAfter":"2026-12-30T10:00:00Z","rulesSha256":"{h}","prev":"{GENESIS}"}}"#,
            h = "ab".repeat(32)
        );
        std::fs::write(&path, format!("{old}\n")).unwrap();
        let read: AuditRecord = serde_json::from_str(&old).unwrap();
        assert_eq!(read.peer, None);
        let (log, _) = AuditLog::open(&path).unwrap();
        let new = AuditRecord {
            peer: Some("[2001:db8::7]:51234".into()),
            ..record(1)
        };
        log.append(new, log.expect_line()).await.unwrap();
        let head = log.head();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], old, "the old line is left as it was");
        let second: AuditRecord = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second.peer.as_deref(), Some("[2001:db8::7]:51234"));
        assert!(
            lines[1].contains(r#""peer":"[2001:db8::7]:51234""#),
            "{}",
            lines[1]
        );
        match super::verify_file(&path, None, std::slice::from_ref(&head)).unwrap() {
            VerifyOutcome::Intact {
                records, anchored, ..
            } => {
                assert_eq!(records, 2);
                assert_eq!(anchored, vec![(head, 2)]);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A second writer that changes the log before each of the signer's writes (an older
    /// meshca serving requests on it) would have each write log an ERROR: one per request.
    /// One a minute per kind, the next one counting those held back; kinds apart.
    #[test]
    fn a_second_writer_is_reported_at_most_once_a_minute_per_kind() {
        let reports = SecondWriterReports::new();
        let t0 = Instant::now();
        let at = |seconds: u64| t0 + Duration::from_secs(seconds);
        assert_eq!(reports.admit(SecondWriterChange::Appended, at(0)), Some(0));
        for second in 1..60 {
            assert_eq!(
                reports.admit(SecondWriterChange::Appended, at(second)),
                None,
                "{second} s on"
            );
        }
        // Another kind is not held back by the first.
        assert_eq!(
            reports.admit(SecondWriterChange::Truncated, at(30)),
            Some(0)
        );
        assert_eq!(reports.admit(SecondWriterChange::Replaced, at(30)), Some(0));
        assert_eq!(reports.admit(SecondWriterChange::Truncated, at(31)), None);
        // A minute after the first: logged, with the 59 held back.
        assert_eq!(
            reports.admit(SecondWriterChange::Appended, at(60)),
            Some(59)
        );
        assert_eq!(reports.admit(SecondWriterChange::Appended, at(61)), None);
        // No burst saved up over a quiet hour: one, then a minute's wait again.
        assert_eq!(
            reports.admit(SecondWriterChange::Appended, at(3600)),
            Some(1)
        );
        assert_eq!(reports.admit(SecondWriterChange::Appended, at(3601)), None);
        assert_eq!(
            reports.admit(SecondWriterChange::Truncated, at(90)),
            Some(1)
        );
        assert_eq!(held_back(0), "");
        assert!(held_back(59).starts_with(" (59 more found since the last such line"));
    }

    /// A file that already holds lines moved over the log (a forged chain) is not taken
    /// for a rotation's new file: counted with other writers' lines (and said at ERROR);
    /// a rotation's empty new file is not.
    #[tokio::test]
    async fn a_log_replaced_by_a_file_with_lines_is_not_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        log.append(record(0), log.expect_line()).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        File::create(&path).unwrap();
        log.append(record(1), log.expect_line()).await.unwrap();
        assert_eq!(log.foreign_appends().get(), 0);
        let forged = dir.path().join("forged.log");
        std::fs::write(&forged, "{\"forged\":true}\n").unwrap();
        std::fs::rename(&forged, &path).unwrap();
        log.append(record(2), log.expect_line()).await.unwrap();
        assert_eq!(log.foreign_appends().get(), 1);
    }

    /// Something else appends to the log under the running writer (an older meshca,
    /// which takes no lock, started when the log had one line): the next write says so
    /// and counts it, once for each time the file grew, and goes on with the writer's own
    /// chain; verify breaks at the other writer's line and names the line it continues.
    #[tokio::test]
    async fn a_file_grown_by_another_writer_is_counted_and_the_chain_goes_on_from_the_writers_head()
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        log.append(record(0), log.expect_line()).await.unwrap();
        let first = log.head();
        log.append(record(1), log.expect_line()).await.unwrap();
        let head = log.head();
        // Without the lock, as an older meshca writes: its own chain, from the line it
        // found last at its start.
        let mut other = File::options().append(true).open(&path).unwrap();
        let mut line = Vec::new();
        let start = AuditRecord {
            event: "start".into(),
            ..record(9)
        };
        let other_head = encode_line(start, &first, &mut line);
        other.write_all(&line).unwrap();
        log.append(record(2), log.expect_line()).await.unwrap();
        assert_eq!(log.foreign_appends().get(), 1);
        assert_eq!(log.truncations().get(), 0);
        // A write that finds the file as it was left counts nothing.
        log.append(record(3), log.expect_line()).await.unwrap();
        assert_eq!(log.foreign_appends().get(), 1);
        // The other writer again, between two writes: counted again.
        line.clear();
        encode_line(record(10), &other_head, &mut line);
        other.write_all(&line).unwrap();
        log.append(record(4), log.expect_line()).await.unwrap();
        assert_eq!(log.foreign_appends().get(), 2);

        // The writer's lines continue each other, over the other's.
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let clients: Vec<&str> = lines.iter().filter_map(|r| r.client.as_deref()).collect();
        assert_eq!(
            clients,
            [
                "client-0",
                "client-1",
                "client-9",
                "client-2",
                "client-3",
                "client-10",
                "client-4"
            ]
        );
        let fifth = text.lines().nth(4).unwrap();
        assert_eq!(lines[3].prev, head);
        assert_eq!(lines[6].prev, hex(&sha2::Sha256::digest(fifth)));
        match verify_file(&path) {
            VerifyOutcome::Broken { line: 3, problem } => assert!(
                problem.starts_with("line 3 does not continue line 2: ")
                    && problem.contains("its prev is the hash of line 1, so line 2 is not in its chain: two writers append to this log")
                    && problem.contains("an older meshca, which does not lock the log"),
                "{problem}"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// Two signers started on one empty log (the older without the lock): the second
    /// start record begins a chain of its own, which verify names.
    #[test]
    fn a_second_chain_in_one_file_is_named_for_two_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut text = Vec::new();
        let a = encode_line(record(0), GENESIS, &mut text);
        let b = encode_line(record(1), GENESIS, &mut text);
        encode_line(record(2), &a, &mut text);
        encode_line(record(3), &b, &mut text);
        std::fs::write(&path, &text).unwrap();
        match verify_file(&path) {
            VerifyOutcome::Broken { line: 2, problem } => assert!(
                problem.starts_with(&format!(
                    "line 2 does not continue line 1: its prev is {GENESIS}, but line 1 hashes to {a}; its prev is the chain's start, as line 1's is, so line 1 is not in its chain: two writers append to this log"
                )),
                "{problem}"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// verify takes a last line as the signer's start does: without its newline it is
    /// torn, even if it parses, and is neither counted nor the last hash.
    #[tokio::test]
    async fn a_last_line_without_its_newline_is_torn_for_verify_as_for_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        {
            let (log, _) = AuditLog::open(&path).unwrap();
            for n in 0..2 {
                log.append(record(n), log.expect_line()).await.unwrap();
            }
        }
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.trim_end_matches('\n')).unwrap();
        match verify_file(&path) {
            VerifyOutcome::Broken { line: 2, problem } => assert!(
                problem.starts_with("incomplete last line (")
                    && problem.contains("torn")
                    && problem.contains("the 1 lines before it verify"),
                "{problem}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(torn_tail_len(&path).unwrap() > 0);
        // The start moves it aside as torn: the two agree.
        let (log, report) = AuditLog::open(&path).unwrap();
        assert!(report.torn_tail_saved_to.is_some());
        drop(log);
        assert!(matches!(
            verify_file(&path),
            VerifyOutcome::Intact { records: 2, .. }
        ));
    }

    /// Lines that are not records say what they are: not a torn write unless the last
    /// line lacks its newline.
    #[test]
    fn a_line_that_is_no_record_is_named_for_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let deep = format!("{}{}\n", "[".repeat(200), "]".repeat(200));
        let path = dir.path().join("audit.log");
        for (content, line, says) in [
            (
                "{\"event\":\"decision\"}\n",
                1,
                "JSON, but not an audit record: missing field `time`",
            ),
            ("{\"time\":\"2026-\n", 1, "not an audit record (not JSON): "),
            (
                deep.as_str(),
                1,
                "not an audit record (JSON nested more than 128 levels deep",
            ),
            (
                "{\"count\":1e400}\n",
                1,
                "not an audit record (JSON with a number beyond a 64-bit float's range",
            ),
            ("\n", 1, "an empty line, not an audit record"),
        ] {
            std::fs::write(&path, content).unwrap();
            match verify_file(&path) {
                VerifyOutcome::Broken { line: at, problem } => {
                    assert_eq!(at, line, "{problem}");
                    assert!(problem.starts_with(says), "{content:?}: {problem}");
                    assert!(!problem.contains("torn"), "{problem}");
                }
                other => panic!("{content:?}: {other:?}"),
            }
        }
    }

    /// A rotated file logrotate compressed is refused with what to do, not taken for a
    /// broken log.
    #[test]
    fn a_compressed_file_is_named_so_with_the_command_that_decompresses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log.2.gz");
        for (magic, says) in [
            (&[0x1f, 0x8b, 0x08, 0x00][..], "compressed with gzip"),
            (&[0x28, 0xb5, 0x2f, 0xfd][..], "compressed with zstd"),
            (b"\xfd7zXZ\x00\x00", "compressed with xz"),
            (b"BZh91AY", "compressed with bzip2"),
        ] {
            std::fs::write(&path, magic).unwrap();
            let message = super::verify_file(&path, None, &[])
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with(&format!("audit log {}: {says}", path.display()))
                    && message.contains("decompress it first"),
                "{message}"
            );
        }
    }

    /// The rules name an announced root by its SHA-256 only: a rotation restates the cross
    /// certificate that vouches for it too, as the line that made it named it, so that
    /// `serve --check` and `root show` still find it in the current file; one no longer
    /// announced is not restated.
    #[tokio::test]
    async fn a_rotation_restates_the_cross_certificates_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        let next = "ab".repeat(32);
        let rules = |text: String| AuditRecord {
            event: "reload".into(),
            rule: Some("rules_changed".into()),
            rules_sha256: Some("d1".into()),
            rules: Some(text),
            ..record(0)
        };
        let announced = AuditRecord {
            message: Some(format!(
                "next root sha256 {next} announced (cross certificate serial 0a sha256 c1)"
            )),
            ..rules(format!("root r\nnext root sha256 {next}\n"))
        };
        log.append(announced, log.expect_line()).await.unwrap();
        // A reload that changes something else keeps it.
        let other = AuditRecord {
            message: Some("limits changed".into()),
            ..rules(format!("root r\nnext root sha256 {next}\nlimits y\n"))
        };
        log.append(other, log.expect_line()).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        log.append(record(1), log.expect_line()).await.unwrap();
        assert_eq!(
            super::super::check::audited_cross_cert(&path, &next).as_deref(),
            Some("serial 0a sha256 c1")
        );
        // No longer announced: the next rotation does not name it.
        log.append(rules("root r\n".into()), log.expect_line())
            .await
            .unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.2")).unwrap();
        log.append(record(2), log.expect_line()).await.unwrap();
        assert_eq!(super::super::check::audited_cross_cert(&path, &next), None);
        assert!(matches!(verify_file(&path), VerifyOutcome::Intact { .. }));
    }

    /// The lines written with a `rotation` record were stamped before the writer noticed
    /// the rotation: its time is theirs at the latest, so time does not go back after it.
    #[tokio::test]
    async fn a_rotation_record_is_stamped_no_later_than_the_lines_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        log.append(record(0), log.expect_line()).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        let stamped = "2000-01-02T03:04:05.006Z";
        let earlier = AuditRecord {
            time: stamped.into(),
            ..record(1)
        };
        log.append(earlier, log.expect_line()).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let times: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().time)
            .collect();
        assert_eq!(times, [stamped, stamped]);
        // Rotated again, with lines stamped now: the rotation is stamped now too, not
        // before its moment.
        std::fs::rename(&path, dir.path().join("audit.log.2")).unwrap();
        let before = rfc3339(SystemTime::now());
        log.append(record(2), log.expect_line()).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let rotation: AuditRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(rotation.event, "rotation");
        assert!(rotation.time >= before, "{} < {before}", rotation.time);
    }

    #[test]
    fn the_tail_is_found_across_chunks_whatever_the_lines_lengths() {
        // Lines and torn tails longer than the 64 KiB the tail is read back in, and files
        // with no newline or a single one.
        let long = |byte: u8, n: usize| vec![byte; n];
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"one\n".to_vec(),
            b"one\ntwo\n".to_vec(),
            b"one\ntwo\ntor".to_vec(),
            long(b'x', 200_000),
            [long(b'a', 70_000), b"\n".to_vec(), long(b'x', 140_000)].concat(),
            [b"a\n".to_vec(), long(b'b', 130_000), b"\n".to_vec()].concat(),
            [
                b"a\n".to_vec(),
                long(b'b', 65_536),
                b"\n".to_vec(),
                long(0, 65_535),
            ]
            .concat(),
            [long(b'a', 65_535), b"\n\n".to_vec(), long(b'c', 131_072)].concat(),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        for content in cases {
            std::fs::write(&path, &content).unwrap();
            let tail = read_tail(&path).unwrap();
            // What the tail is, read the plain way.
            let (complete, torn) = match content.iter().rposition(|b| *b == b'\n') {
                Some(last) => (&content[..last], &content[last + 1..]),
                None => (&content[..0], &content[..]),
            };
            let last_line = content.contains(&b'\n').then(|| {
                complete
                    .split(|b| *b == b'\n')
                    .next_back()
                    .unwrap_or_default()
            });
            assert_eq!(tail.torn, torn, "{} bytes", content.len());
            assert_eq!(
                tail.last_line_hash,
                last_line.map(|line| hex(&sha2::Sha256::digest(line))),
                "{} bytes",
                content.len()
            );
        }
    }

    #[test]
    fn times_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_800_000_000_123);
        assert_eq!(rfc3339(t), "2027-01-15T08:00:00.123Z");
    }
}
