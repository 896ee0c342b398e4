//! Which AppRole credentials Vault has refused, and when they may be sent again.
//!
//! Vault and OpenBao lock an AppRole role out after 5 refused logins (by default; the
//! count is kept until 15 minutes pass without a refusal) for 15 minutes, for every
//! replica using the role, and the lock outlives the mended credentials: a signer that
//! kept retrying refused credentials every 30 s locked its own role in about 2.5 minutes,
//! and went on being refused after the operator had written a good secret ID. So the same
//! credentials are sent at most [`TRIES`] times in a row, then once per [`PAUSE`] (longer
//! than the default count reset); credentials that changed are sent at once.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// Refused logins with the same credentials before they are held back: two, so that two
/// signers sharing a role stay under the default threshold of 5 together.
pub const TRIES: u32 = 2;
/// How long held-back credentials wait after their last refusal: past Vault's default
/// `lockout_counter_reset` (15 minutes), so that Vault counts the next refusal as the first.
pub const PAUSE: Duration = Duration::from_secs(16 * 60);

/// A digest of the credentials, to recognize them again without keeping them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Credentials([u8; 32]);

impl Credentials {
    pub fn of(role_id: &Secret, secret_id: &Secret) -> Self {
        let mut digest = Sha256::new();
        // Lengths first, so that no two pairs hash the same bytes.
        for part in [role_id.expose(), secret_id.expose()] {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part.as_bytes());
        }
        Credentials(digest.finalize().into())
    }
}

/// The credentials are held back: why, and for how long still.
#[derive(Debug, PartialEq, Eq)]
pub struct Held {
    pub refusals: u32,
    pub last_refused_seconds_ago: u64,
    pub retry_in_seconds: u64,
}

/// The last credentials Vault refused, and how many times in a row.
#[derive(Default)]
pub struct RefusedLogins {
    last: Option<Refused>,
}

struct Refused {
    credentials: Credentials,
    refusals: u32,
    at: Instant,
}

impl RefusedLogins {
    /// Whether a login with `credentials` may be sent at `now`.
    pub fn may_send(&self, credentials: Credentials, now: Instant) -> Result<(), Held> {
        let Some(last) = &self.last else {
            return Ok(());
        };
        if last.credentials != credentials || last.refusals < TRIES {
            return Ok(());
        }
        let since = now.saturating_duration_since(last.at);
        if since >= PAUSE {
            return Ok(());
        }
        Err(Held {
            refusals: last.refusals,
            last_refused_seconds_ago: since.as_secs(),
            retry_in_seconds: (PAUSE - since).as_secs().max(1),
        })
    }

    /// Vault refused a login with `credentials` at `now`.
    pub fn refused(&mut self, credentials: Credentials, now: Instant) {
        let refusals = match &self.last {
            Some(last) if last.credentials == credentials => last.refusals.saturating_add(1),
            _ => 1,
        };
        self.last = Some(Refused {
            credentials,
            refusals,
            at: now,
        });
    }

    /// A login succeeded: nothing is held back any more.
    pub fn accepted(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(secret_id: &str) -> Credentials {
        Credentials::of(
            &Secret::new("role-1".into()),
            &Secret::new(secret_id.into()),
        )
    }

    #[test]
    fn refused_credentials_are_held_after_two_tries_until_the_pause_has_passed() {
        let mut refused = RefusedLogins::default();
        let bad = credentials("expired");
        let start = Instant::now();
        assert_eq!(refused.may_send(bad, start), Ok(()));
        refused.refused(bad, start);
        // A second try: a refusal can be passing (a secret ID not yet replicated).
        let second = start + Duration::from_secs(30);
        assert_eq!(refused.may_send(bad, second), Ok(()));
        refused.refused(bad, second);
        let held = refused
            .may_send(bad, second + Duration::from_secs(30))
            .unwrap_err();
        assert_eq!(
            held,
            Held {
                refusals: 2,
                last_refused_seconds_ago: 30,
                retry_in_seconds: PAUSE.as_secs() - 30,
            }
        );
        assert!(
            refused
                .may_send(bad, second + PAUSE - Duration::from_secs(1))
                .is_err()
        );
        // After the pause Vault's count has started again: one more try, then held again.
        let later = second + PAUSE;
        assert_eq!(refused.may_send(bad, later), Ok(()));
        refused.refused(bad, later);
        assert!(
            refused
                .may_send(bad, later + Duration::from_secs(30))
                .is_err()
        );
    }

    #[test]
    fn changed_credentials_are_sent_at_once_and_a_login_clears_the_hold() {
        let mut refused = RefusedLogins::default();
        let bad = credentials("expired");
        let now = Instant::now();
        refused.refused(bad, now);
        refused.refused(bad, now);
        assert!(refused.may_send(bad, now).is_err());
        // The operator wrote a new secret ID (or a new role ID).
        let mended = credentials("fresh");
        assert_eq!(refused.may_send(mended, now), Ok(()));
        let other_role = Credentials::of(
            &Secret::new("role-2".into()),
            &Secret::new("expired".into()),
        );
        assert_eq!(refused.may_send(other_role, now), Ok(()));
        // A refusal of other credentials starts the count again.
        refused.refused(mended, now);
        assert_eq!(refused.may_send(mended, now), Ok(()));
        assert_eq!(refused.may_send(bad, now), Ok(()));
        refused.accepted();
        refused.refused(bad, now);
        assert_eq!(refused.may_send(bad, now), Ok(()));
    }

    #[test]
    fn the_digest_separates_role_and_secret_ids() {
        let split = |role: &str, secret: &str| {
            Credentials::of(&Secret::new(role.into()), &Secret::new(secret.into()))
        };
        assert!(split("ab", "c") != split("a", "bc"));
        assert!(split("a", "b") == split("a", "b"));
    }
}
