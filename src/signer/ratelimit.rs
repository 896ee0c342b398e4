//! Per-client rate limiting of signing requests: a token bucket per client identity, with
//! the limit and the time passed in (a reload may change the limit; the arithmetic is
//! tested without sleeping), and the tally that keeps a client hammering the limit from
//! filling the audit log one refusal at a time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Most clients tracked at once; full buckets are forgotten first when it is reached.
const MAX_CLIENTS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per minute per client.
    pub per_minute: u32,
    /// Requests a client may make at once after being idle.
    pub burst: u32,
}

/// Tokens are counted in units of 1/[`UNITS_PER_TOKEN`]: at `per_minute` tokens a minute a
/// bucket gains exactly `per_minute` units a nanosecond, so refill and the wait until the
/// next token are integer arithmetic. With floats, (1 - tokens) / rate and the refill over
/// that wait could round apart, and a client that waited exactly its Retry-After was
/// refused again (with a wait of 0, so another Retry-After of 1 s).
const UNITS_PER_TOKEN: u128 = 60 * 1_000_000_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// In units of 1/[`UNITS_PER_TOKEN`] token.
    units: u128,
    updated: Instant,
}

/// Token buckets by client identity.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one token for `client` at `now` under `limit`; on refusal, how long until one
    /// is available (waiting that long, or longer, finds it). A bucket keeps its tokens
    /// when the limit changes: they refill at the new rate up to the new burst (a lower
    /// burst caps them at once).
    pub fn check(&self, client: &str, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // A known client (every request but a client's first) is looked up without
        // allocating its identity as a key.
        if let Some(bucket) = buckets.get_mut(client) {
            return bucket.take(limit, now);
        }
        if buckets.len() >= MAX_CLIENTS {
            buckets.retain(|_, b| b.refilled(limit, now) < limit.burst_units());
        }
        let mut bucket = Bucket::full(limit, now);
        let taken = bucket.take(limit, now);
        buckets.insert(client.to_owned(), bucket);
        taken
    }
}

impl RateLimit {
    /// The burst (at least one token), in units.
    fn burst_units(self) -> u128 {
        u128::from(self.burst.max(1)) * UNITS_PER_TOKEN
    }
}

impl Bucket {
    fn full(limit: RateLimit, now: Instant) -> Self {
        Bucket {
            units: limit.burst_units(),
            updated: now,
        }
    }

    /// Its units at `now`, refilled under `limit` (uncapped).
    fn refilled(&self, limit: RateLimit, now: Instant) -> u128 {
        let elapsed_nanos = now.saturating_duration_since(self.updated).as_nanos();
        self.units
            .saturating_add(u128::from(limit.per_minute).saturating_mul(elapsed_nanos))
    }

    /// Refills under `limit` up to its burst, then takes one token if there is one; else
    /// how long until there is.
    fn take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        self.units = self.refilled(limit, now).min(limit.burst_units());
        self.updated = now;
        if self.units >= UNITS_PER_TOKEN {
            self.units -= UNITS_PER_TOKEN;
            Ok(())
        } else if limit.per_minute == 0 {
            Err(Duration::from_secs(60))
        } else {
            // Rounded up: after this many nanoseconds the refill reaches a whole token.
            let missing = UNITS_PER_TOKEN - self.units;
            let nanos = missing.div_ceil(u128::from(limit.per_minute));
            // At most UNITS_PER_TOKEN nanoseconds (a minute): fits.
            Err(Duration::from_nanos(
                u64::try_from(nanos).unwrap_or(u64::MAX),
            ))
        }
    }
}

/// After a rate-limit refusal with its own audit line, how long that client's further
/// refusals are counted instead of written one by one; also how often the counts are
/// written.
pub const REFUSAL_TALLY_PERIOD: Duration = Duration::from_secs(60);

/// Whether a rate-limit refusal gets its own audit line or joins its client's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalRecord {
    OwnLine,
    Counted,
}

/// Rate-limit refusals of one client counted since its last audit line: one line for all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountedRefusals {
    pub client: String,
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

#[derive(Debug)]
struct Tally {
    own_line_at: Instant,
    counted: Option<(u64, SystemTime, SystemTime)>,
}

/// Which rate-limit refusals are written one by one. A refused client's first refusal is;
/// the ones within [`REFUSAL_TALLY_PERIOD`] after it are counted and written as one line
/// by [`RefusalTally::take_counts`]. Every refusal is on record either way, but a client
/// that ignores `Retry-After` costs the log a few lines a minute, not one per request
/// (it is the only refusal the bucket does not bound: every other one spends a token).
#[derive(Default)]
pub struct RefusalTally {
    clients: Mutex<HashMap<String, Tally>>,
}

impl RefusalTally {
    /// Records a rate-limit refusal of `client` at `now` (`wall` for the audit line).
    pub fn refused(&self, client: &str, now: Instant, wall: SystemTime) -> RefusalRecord {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tally) = clients.get_mut(client) {
            let recent = now.saturating_duration_since(tally.own_line_at) < REFUSAL_TALLY_PERIOD;
            // Counting goes on until the count is written, so lines stay in time order.
            if recent || tally.counted.is_some() {
                let (count, _, last) = tally.counted.get_or_insert((0, wall, wall));
                *count += 1;
                *last = wall;
                return RefusalRecord::Counted;
            }
        } else if clients.len() >= MAX_CLIENTS {
            // Past the bound nothing new is tracked: the refusal gets its own line.
            return RefusalRecord::OwnLine;
        }
        clients.insert(
            client.to_string(),
            Tally {
                own_line_at: now,
                counted: None,
            },
        );
        RefusalRecord::OwnLine
    }

    /// Takes every count out, by client, to be written; forgets clients quiet for a period.
    pub fn take_counts(&self, now: Instant) -> Vec<CountedRefusals> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts = Vec::new();
        clients.retain(|client, tally| {
            if let Some((count, first, last)) = tally.counted.take() {
                counts.push(CountedRefusals {
                    client: client.clone(),
                    count,
                    first,
                    last,
                });
            }
            now.saturating_duration_since(tally.own_line_at) < REFUSAL_TALLY_PERIOD
        });
        counts.sort_by(|a, b| a.client.cmp(&b.client));
        counts
    }

    /// [`RefusalTally::take_counts`] for a task that writes them one line at a time and may
    /// be stopped in between (the drain's end): what it has not written is put back when
    /// it is dropped.
    pub fn counts_to_write(&self, now: Instant) -> CountsToWrite<'_> {
        CountsToWrite {
            tally: self,
            left: self.take_counts(now).into(),
            writing: None,
        }
    }

    /// Puts back a count whose line could not be written, merged with what was counted
    /// since, so the next tick writes it: "every refusal is on record" holds through an
    /// audit disk that was full for a while. At `now`, for a client forgotten meanwhile.
    pub fn put_back(&self, lost: CountedRefusals, now: Instant) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let tally = clients.entry(lost.client).or_insert(Tally {
            own_line_at: now,
            counted: None,
        });
        tally.counted = Some(match tally.counted {
            Some((count, first, last)) => (
                count.saturating_add(lost.count),
                first.min(lost.first),
                last.max(lost.last),
            ),
            None => (lost.count, lost.first, lost.last),
        });
    }
}

/// Counts being written, one line each ([`RefusalTally::counts_to_write`]). Dropped before
/// the end (its task stopped), those not yet handed to the audit log go back to the tally
/// for the last count lines the stop writes, and the one being written, which may or may
/// not have reached the log, is named in a warning: so "every refusal is on record" holds
/// through a drain cut short, as it does through a failed write.
pub struct CountsToWrite<'a> {
    tally: &'a RefusalTally,
    left: std::collections::VecDeque<CountedRefusals>,
    writing: Option<CountedRefusals>,
}

impl CountsToWrite<'_> {
    /// The next count to write, now being written.
    pub fn next_to_write(&mut self) -> Option<CountedRefusals> {
        self.writing = self.left.pop_front();
        self.writing.clone()
    }

    /// The count being written is in the log.
    pub fn written(&mut self) {
        self.writing = None;
    }

    /// The count being written could not be: back to the tally, for the next tick.
    pub fn not_written(&mut self, now: Instant) {
        if let Some(counted) = self.writing.take() {
            self.tally.put_back(counted, now);
        }
    }
}

impl Drop for CountsToWrite<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        for counted in self.left.drain(..) {
            self.tally.put_back(counted, now);
        }
        if let Some(counted) = self.writing.take() {
            tracing::warn!(
                client = %counted.client,
                count = counted.count,
                "the count line of these rate-limit refusals was being written when its task was stopped: it may be missing from the audit log"
            );
        }
    }
}

/// Lets through a burst of log lines of each kind, then a steady trickle, and counts the
/// rest, so a flood of one kind (refused handshakes: anyone who can reach the port can
/// cause them) cannot drown the rest of the log or trip journald's rate limit. Each kind
/// has its own bucket, so a flood of one kind (a scanner's) does not hide the lines of
/// another (an agent whose certificate expired). The next line of a kind let through says
/// how many of that kind were not written; metrics count every event regardless.
pub struct LogThrottle {
    limit: RateLimit,
    kinds: Mutex<HashMap<&'static str, ThrottledKind>>,
}

struct ThrottledKind {
    bucket: Bucket,
    /// Lines held back since the last one let through.
    not_logged: u64,
}

impl LogThrottle {
    pub fn new(limit: RateLimit) -> Self {
        LogThrottle {
            limit,
            kinds: Mutex::default(),
        }
    }

    /// `Some(n)` if a line of `kind` may be written at `now` (`n`: lines of that kind not
    /// written since the last one let through), else `None` (and this one is counted).
    pub fn admit(&self, kind: &'static str, now: Instant) -> Option<u64> {
        self.admit_or(kind, now, |by_kind| by_kind)
    }

    /// [`LogThrottle::admit`], where `decide` is told whether the kind's bucket let the
    /// line through and says whether it is written.
    fn admit_or(
        &self,
        kind: &'static str,
        now: Instant,
        decide: impl FnOnce(bool) -> bool,
    ) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let throttled = kinds.entry(kind).or_insert_with(|| ThrottledKind {
            bucket: Bucket::full(self.limit, now),
            not_logged: 0,
        });
        if decide(throttled.bucket.take(self.limit, now).is_ok()) {
            Some(std::mem::take(&mut throttled.not_logged))
        } else {
            throttled.not_logged += 1;
            None
        }
    }
}

/// A [`LogThrottle`] of lines about clients (refused handshakes): beyond the kind's
/// bucket, the first line of each client in a window is written too, so one client's
/// flood of a kind (an agent retrying with a revoked certificate) does not hide another
/// client's line of that kind. At most `max_clients` clients are remembered; past that,
/// a client not remembered is left to the kind's bucket alone, so memory and the lines
/// written stay bounded. `not_logged_since_last` stays per kind.
pub struct ClientLogThrottle {
    kinds: LogThrottle,
    window: Duration,
    max_clients: usize,
    /// When each client's last line of each kind was written.
    clients: Mutex<HashMap<&'static str, HashMap<String, Instant>>>,
}

impl ClientLogThrottle {
    pub fn new(limit: RateLimit, window: Duration, max_clients: usize) -> Self {
        ClientLogThrottle {
            kinds: LogThrottle::new(limit),
            window,
            max_clients,
            clients: Mutex::default(),
        }
    }

    /// As [`LogThrottle::admit`], for a line about `client` (None: no client to name, so
    /// the kind's bucket alone decides).
    pub fn admit(&self, kind: &'static str, client: Option<&str>, now: Instant) -> Option<u64> {
        self.kinds.admit_or(kind, now, |by_kind| match client {
            Some(client) => self.client_due(kind, client, now, by_kind),
            None => by_kind,
        })
    }

    /// Whether a line of `kind` about `client` is written: the kind's bucket let it through
    /// (`by_kind`), or the client has had no line of this kind for a window. Notes when.
    fn client_due(&self, kind: &'static str, client: &str, now: Instant, by_kind: bool) -> bool {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window;
        let due = |last: Instant| now.saturating_duration_since(last) >= window;
        if let Some(last) = clients
            .get_mut(kind)
            .and_then(|of_kind| of_kind.get_mut(client))
        {
            let written = by_kind || due(*last);
            if written {
                *last = now;
            }
            return written;
        }
        let remembered = |clients: &HashMap<_, HashMap<String, Instant>>| -> usize {
            clients.values().map(HashMap::len).sum()
        };
        if remembered(&clients) >= self.max_clients {
            // A client whose window is over is due anyway: forgetting it changes nothing.
            for of_kind in clients.values_mut() {
                of_kind.retain(|_, last| !due(*last));
            }
        }
        if remembered(&clients) >= self.max_clients {
            return by_kind;
        }
        clients
            .entry(kind)
            .or_default()
            .insert(client.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit {
        per_minute: 60,
        burst: 3,
    };

    /// One client's flood of a kind used up the kind's bucket and hid every other client's
    /// line of that kind: now each client's first line in a window is written, up to the
    /// clients remembered; beyond them the kind's bucket alone decides.
    #[test]
    fn each_client_gets_a_line_a_window_whatever_another_floods() {
        let limit = RateLimit {
            per_minute: 1,
            burst: 2,
        };
        let minute = Duration::from_secs(60);
        let throttle = ClientLogThrottle::new(limit, minute, 2);
        let admit = |client: Option<&str>, at: Instant| throttle.admit("revoked", client, at);
        let t0 = Instant::now();
        assert_eq!(admit(Some("a"), t0), Some(0));
        assert_eq!(admit(Some("a"), t0), Some(0));
        for _ in 0..10 {
            assert_eq!(admit(Some("a"), t0), None);
        }
        // Another client's first line, the kind's bucket empty, says what was held back.
        assert_eq!(admit(Some("b"), t0), Some(10));
        assert_eq!(admit(Some("b"), t0), None);
        // A line with no client, or of a third client when two are remembered, waits for
        // the kind's bucket.
        assert_eq!(admit(None, t0), None);
        assert_eq!(admit(Some("c"), t0), None);
        // A window later: the bucket's one token goes to the flood, and the other clients
        // are due again (the third one once the others' windows are over).
        let t1 = t0 + minute;
        assert_eq!(admit(Some("a"), t1), Some(3));
        assert_eq!(admit(Some("b"), t1), Some(0));
        assert_eq!(admit(Some("c"), t1), None);
        let t2 = t1 + minute + Duration::from_secs(1);
        assert_eq!(admit(Some("a"), t2), Some(1));
        assert_eq!(admit(Some("a"), t2), None);
        assert_eq!(admit(Some("c"), t2), Some(1));
        // Kinds are apart: another kind has a bucket of its own.
        assert_eq!(throttle.admit("expired", Some("a"), t2), Some(0));
    }

    #[test]
    fn burst_then_refill_at_the_sustained_rate() {
        let limiter = RateLimiter::default();
        let check = |client: &str, at: Instant| limiter.check(client, LIMIT, at);
        let t0 = Instant::now();
        for _ in 0..3 {
            check("a", t0).unwrap();
        }
        let wait = check("a", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another client has its own bucket.
        check("b", t0).unwrap();
        // One second later one more request is allowed, not two.
        let t1 = t0 + Duration::from_secs(1);
        check("a", t1).unwrap();
        assert!(check("a", t1).is_err());
        // Long idle refills only up to the burst.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            check("a", t2).unwrap();
        }
        assert!(check("a", t2).is_err());
    }

    /// The review's counterexample: with float tokens the refusal at 61 s said 59 s, and at
    /// 120 s (61 + 59) the refill came out a hair short of a token, so the client was
    /// refused again.
    #[test]
    fn a_client_that_waits_what_it_is_told_gets_a_token() {
        let limit = RateLimit {
            per_minute: 1,
            burst: 2,
        };
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        limiter.check("a", limit, at(0)).unwrap();
        limiter.check("a", limit, at(0)).unwrap();
        limiter.check("a", limit, at(61)).unwrap();
        let wait = limiter.check("a", limit, at(61)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(59));
        assert_eq!(limiter.check("a", limit, at(61) + wait), Ok(()));

        // Rates that do not divide a minute: the wait is rounded up to the nanosecond, and
        // a nanosecond less is too early.
        for per_minute in [7, 13, 59, 61, 1_000_003] {
            let limit = RateLimit {
                per_minute,
                burst: 1,
            };
            let limiter = RateLimiter::default();
            let mut now = t0;
            for _ in 0..50 {
                limiter.check("a", limit, now).unwrap();
                let wait = limiter.check("a", limit, now).unwrap_err();
                let early = now + wait - Duration::from_nanos(1);
                assert!(limiter.check("a", limit, early).is_err(), "{per_minute}");
                now += wait;
            }
        }
    }

    #[test]
    fn a_changed_limit_applies_to_existing_buckets() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check("a", LIMIT, t0).unwrap();
        }
        assert!(limiter.check("a", LIMIT, t0).is_err());
        // Raised to 6,000 a minute: 10 ms later the empty bucket has a token again.
        let raised = RateLimit {
            per_minute: 6_000,
            burst: 100,
        };
        let t1 = t0 + Duration::from_millis(10);
        limiter.check("a", raised, t1).unwrap();
        // A long idle fills it up to the new burst, not the old one.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..100 {
            limiter.check("a", raised, t2).unwrap();
        }
        assert!(limiter.check("a", raised, t2).is_err());
        // Lowered again: an idle bucket refills only up to the lower burst.
        let t3 = t2 + Duration::from_secs(60);
        for _ in 0..3 {
            limiter.check("a", LIMIT, t3).unwrap();
        }
        assert!(limiter.check("a", LIMIT, t3).is_err());
    }

    #[test]
    fn a_refused_clients_first_refusal_has_its_own_line_the_next_ones_are_counted() {
        let tally = RefusalTally::default();
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |s: u64| (t0 + Duration::from_secs(s), wall + Duration::from_secs(s));
        let refuse = |client: &str, s: u64| {
            let (now, wall) = at(s);
            tally.refused(client, now, wall)
        };
        assert_eq!(refuse("a", 0), RefusalRecord::OwnLine);
        assert_eq!(refuse("b", 0), RefusalRecord::OwnLine);
        for s in 1..=10 {
            assert_eq!(refuse("a", s), RefusalRecord::Counted);
        }
        // Written at the tick: one count for a, none for b.
        assert_eq!(
            tally.take_counts(at(30).0),
            [CountedRefusals {
                client: "a".into(),
                count: 10,
                first: at(1).1,
                last: at(10).1,
            }]
        );
        assert_eq!(tally.take_counts(at(31).0), []);
        // Still within the period of a's own line: counted again.
        assert_eq!(refuse("a", 59), RefusalRecord::Counted);
        // Past the period, but a count is waiting: it joins the count (lines stay in time
        // order); once written, the next refusal has its own line again.
        assert_eq!(refuse("a", 61), RefusalRecord::Counted);
        let counts = tally.take_counts(at(62).0);
        assert_eq!((counts.len(), counts[0].count), (1, 2));
        assert_eq!(refuse("a", 63), RefusalRecord::OwnLine);
        // b, quiet for a period, is forgotten; a is not yet.
        assert_eq!(tally.take_counts(at(100).0), []);
        {
            let clients = tally.clients.lock().unwrap();
            assert!(clients.contains_key("a") && !clients.contains_key("b"));
        }

        // A count whose line could not be written is put back, merged with the ones
        // counted since, and written at a later tick; also for a client forgotten since.
        assert_eq!(refuse("a", 101), RefusalRecord::Counted);
        let lost = tally.take_counts(at(102).0);
        assert_eq!(refuse("a", 103), RefusalRecord::Counted);
        tally.put_back(lost[0].clone(), at(104).0);
        let lost_b = CountedRefusals {
            client: "b".into(),
            count: 5,
            first: at(40).1,
            last: at(50).1,
        };
        tally.put_back(lost_b.clone(), at(104).0);
        assert_eq!(
            tally.take_counts(at(105).0),
            [
                CountedRefusals {
                    client: "a".into(),
                    count: 2,
                    first: at(101).1,
                    last: at(103).1,
                },
                lost_b.clone()
            ]
        );

        // Counts taken to be written by a task stopped part way (the drain's end): the one
        // written stays written, the one that failed and those not reached go back.
        for client in ["a", "c", "d"] {
            tally.put_back(
                CountedRefusals {
                    client: client.into(),
                    ..lost_b.clone()
                },
                at(106).0,
            );
        }
        {
            let mut counts = tally.counts_to_write(at(107).0);
            assert_eq!(counts.next_to_write().unwrap().client, "a");
            counts.written();
            assert_eq!(counts.next_to_write().unwrap().client, "c");
            counts.not_written(at(108).0);
            assert_eq!(counts.next_to_write().unwrap().client, "d");
            // Stopped while d's line is under way: d is named, not put back.
        }
        let back: Vec<String> = tally
            .take_counts(at(109).0)
            .into_iter()
            .map(|c| c.client)
            .collect();
        assert_eq!(back, ["c"]);
    }

    #[test]
    fn a_log_throttle_lets_a_burst_through_then_a_trickle_and_counts_the_rest() {
        let throttle = LogThrottle::new(LIMIT);
        let t0 = Instant::now();
        let admitted: Vec<Option<u64>> = (0..10).map(|_| throttle.admit("flood", t0)).collect();
        assert_eq!(admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // Another kind has its own burst, and its own count.
        assert_eq!(throttle.admit("other", t0), Some(0));
        // A second later one more line, which says how many were not written.
        assert_eq!(
            throttle.admit("flood", t0 + Duration::from_secs(1)),
            Some(7)
        );
        assert_eq!(throttle.admit("flood", t0 + Duration::from_secs(1)), None);
        assert_eq!(
            throttle.admit("flood", t0 + Duration::from_secs(2)),
            Some(1)
        );
        assert_eq!(
            throttle.admit("other", t0 + Duration::from_secs(2)),
            Some(0)
        );
    }
}
