//! When the agents come back: the backoff after failures and the spreading of every wait
//! (the directory agent's, the Kubernetes agent's and the leader loop's), so that agents
//! started together do not all ask the same server in the same second.

use std::time::Duration;

/// Retry delay after `failures` consecutive failures: 2 s doubling, capped at `max`
/// (the nominal wait: [`spread_randomly`] spreads it).
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_secs(2u64 << exp).min(max)
}

/// `nominal` shortened by up to a tenth as `draw` (uniform over `u32`) says: between 0.9
/// and 1.0 times `nominal`. Agents started together (a fleet rolled out at once, all
/// retrying after a signer outage or a root change) drift apart instead of asking the
/// signer in the same second forever; never longer than `nominal`, so the resync and the
/// backoff's cap stay the longest waits.
pub fn spread(nominal: Duration, draw: u32) -> Duration {
    nominal.saturating_sub(up_to_a_tenth(nominal, draw))
}

/// Between none and a tenth of `of`, as `draw` (uniform over `u32`) says.
fn up_to_a_tenth(of: Duration, draw: u32) -> Duration {
    let part = of.as_nanos() * u128::from(draw) / (u128::from(u32::MAX) + 1) / 10;
    Duration::from_nanos(u64::try_from(part).unwrap_or(u64::MAX))
}

/// A busy signer's `Retry-After` (`asked`), lengthened by up to a tenth as `draw` says,
/// at most `max`: agents told the same wait come back spread out, not all in the second it
/// ends (and again at the next refusal), and never sooner than asked.
pub fn spread_beyond(asked: Duration, draw: u32, max: Duration) -> Duration {
    asked
        .saturating_add(up_to_a_tenth(asked, draw))
        .min(max.max(asked))
}

/// The wait after a failure: `backoff` spread, and at least a busy signer's `retry_after`
/// spread beyond it (see [`spread_beyond`]), at most `max` unless the signer asked more.
pub fn wait_after_failure(
    backoff: Duration,
    retry_after: Option<Duration>,
    max: Duration,
) -> Duration {
    let asked = retry_after.map_or(Duration::ZERO, |asked| {
        spread_beyond(asked, random_draw(), max)
    });
    spread_randomly(backoff).max(asked)
}

/// [`spread`] with a draw from the system's random source (each process its own).
pub fn spread_randomly(nominal: Duration) -> Duration {
    spread(nominal, random_draw())
}

/// A uniform draw for [`spread`] from the system's random source.
pub fn random_draw() -> u32 {
    let mut bytes = [0u8; 4];
    // Without a draw (it does not fail in practice) the wait is the nominal one.
    match aws_lc_rs::rand::fill(&mut bytes) {
        Ok(()) => u32::from_le_bytes(bytes),
        Err(_) => 0,
    }
}

/// A wait in whole seconds for a log line, rounded to the nearest: a spread 2 s backoff
/// (1.8 s, say) is told as the 2 s it stands for.
pub fn log_seconds(wait: Duration) -> u64 {
    wait.saturating_add(Duration::from_millis(500)).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let max = Duration::from_secs(300);
        let got: Vec<u64> = (1..=10).map(|n| backoff(n, max).as_secs()).collect();
        assert_eq!(got, vec![2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(0, max).as_secs(), 2);
        assert_eq!(backoff(u32::MAX, max).as_secs(), 300);
        assert_eq!(backoff(3, Duration::from_secs(5)).as_secs(), 5);
    }

    /// Agents started together draw different waits: a fleet does not ask the signer in
    /// the same second on every cycle. Each wait lies within [0.9, 1.0] of its nominal, so
    /// the resync and the backoff's cap stay the longest.
    #[test]
    fn waits_are_spread_within_a_tenth_below_their_nominal() {
        let nominal = Duration::from_secs(300);
        assert_eq!(spread(nominal, 0), nominal);
        assert_eq!(spread(nominal, 1 << 31), Duration::from_secs(285));
        assert_eq!(spread(nominal, 1 << 30), Duration::from_millis(292_500));
        let least = spread(nominal, u32::MAX);
        assert!(
            least > Duration::from_secs(270) && least < Duration::from_secs(271),
            "{least:?}"
        );
        // The first retry too (2 s): between 1.8 and 2 s, logged as the 2 s it stands for.
        let first = spread(backoff(1, nominal), u32::MAX);
        assert!(first > Duration::from_millis(1800) && first < Duration::from_secs(2));
        assert_eq!(log_seconds(first), 2);
        assert_eq!(spread(Duration::ZERO, u32::MAX), Duration::ZERO);
        // A busy signer's Retry-After is waited at least, plus up to a tenth, at most the
        // cap (here the resync), unless the signer asked for more than that.
        let asked = Duration::from_secs(30);
        assert_eq!(spread_beyond(asked, 0, nominal), asked);
        assert_eq!(
            spread_beyond(asked, 1 << 31, nominal),
            Duration::from_millis(31_500)
        );
        let most = spread_beyond(asked, u32::MAX, nominal);
        assert!(most > Duration::from_millis(32_999) && most < Duration::from_secs(33));
        assert_eq!(spread_beyond(nominal, u32::MAX, nominal), nominal);
        assert_eq!(
            spread_beyond(Duration::from_secs(400), u32::MAX, nominal),
            Duration::from_secs(400)
        );
        let waits: std::collections::BTreeSet<Duration> = (0..64)
            .map(|_| wait_after_failure(Duration::from_secs(2), Some(asked), nominal))
            .collect();
        assert!(waits.len() > 1, "{waits:?}");
        assert!(waits.iter().all(|w| *w >= asked && *w <= asked * 11 / 10));
        // Each wait draws anew: 64 of them all alike would take a broken random source.
        let drawn: std::collections::BTreeSet<Duration> =
            (0..64).map(|_| spread_randomly(nominal)).collect();
        assert!(drawn.len() > 1, "{drawn:?}");
        assert!(
            drawn
                .iter()
                .all(|d| *d <= nominal && *d >= nominal * 9 / 10)
        );
    }
}
