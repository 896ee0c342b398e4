//! Per-client rate limiting of signing requests: a token bucket per client identity, with
//! the limit and the time passed in (a reload may change the limit; the arithmetic is
//! tested without sleeping).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most clients tracked at once; full buckets are forgotten first when it is reached.
const MAX_CLIENTS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per minute per client.
    pub per_minute: u32,
    /// Requests a client may make at once after being idle.
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets by client identity.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one token for `client` at `now` under `limit`; on refusal, how long until one
    /// is available. A bucket keeps its tokens when the limit changes: they refill at the
    /// new rate up to the new burst (a lower burst caps them at once).
    pub fn check(&self, client: &str, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(limit.burst.max(1));
        let rate = f64::from(limit.per_minute) / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(client) {
            buckets.retain(|_, b| {
                let refilled =
                    b.tokens + rate * now.saturating_duration_since(b.updated).as_secs_f64();
                refilled < burst
            });
        }
        let bucket = buckets.entry(client.to_string()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + rate * elapsed).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else if rate <= 0.0 {
            Err(Duration::from_secs(60))
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit {
        per_minute: 60,
        burst: 3,
    };

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
}
