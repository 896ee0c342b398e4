//! The signer's per-client token bucket and the `Retry-After` it promises.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::cfg;
use crate::signer::api::retry_after_secs;
use crate::signer::ratelimit::{RateLimit, RateLimiter};

proptest! {
    #![proptest_config(cfg(2_000))]

    /// Guards the limit and the promise of a 429: over any stretch of time a client gets at
    /// most burst + rate × stretch requests; a refusal's wait is at most a minute, and a
    /// client that waits its `Retry-After` (the wait in whole seconds, rounded up) is
    /// served. Rates of a few a minute and gaps of whole seconds half the time: where
    /// rounding shows.
    #[test]
    fn token_bucket_bounds_and_retry_after(
        per_minute in prop_oneof![1u32..6, 0u32..2_000],
        burst in 0u32..20,
        gaps_ms in proptest::collection::vec(
            prop_oneof![(0u64..70).prop_map(|s| s * 1000), 0u64..5_000],
            1..80,
        ),
    ) {
        let limit = RateLimit { per_minute, burst };
        let limiter = RateLimiter::default();
        let base = Instant::now();
        let mut t = Duration::ZERO;
        let mut accepted: Vec<Duration> = Vec::new();
        for gap in gaps_ms {
            t += Duration::from_millis(gap);
            match limiter.check("c", limit, base + t) {
                Ok(()) => accepted.push(t),
                Err(wait) => {
                    prop_assert!(wait <= Duration::from_secs(60), "{wait:?}");
                    if per_minute > 0 {
                        let retry = Duration::from_secs(retry_after_secs(wait));
                        t += retry;
                        prop_assert!(
                            limiter.check("c", limit, base + t).is_ok(),
                            "waited the Retry-After of {wait:?} ({retry:?}) and was refused again"
                        );
                        accepted.push(t);
                    }
                }
            }
        }
        let rate = f64::from(per_minute) / 60.0;
        let burst = f64::from(burst.max(1));
        for (i, first) in accepted.iter().enumerate() {
            for (n, last) in accepted[i..].iter().enumerate() {
                let requests = (n + 1) as f64;
                let span = (*last - *first).as_secs_f64();
                prop_assert!(
                    requests <= burst + rate * span + 1e-6,
                    "{requests} requests in {span} s"
                );
            }
        }
    }
}
