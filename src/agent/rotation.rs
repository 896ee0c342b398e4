//! What the agent does with the bundle it finds installed, as pure functions of that
//! bundle, the desired state and the time: issue a new intermediate, rewrite only
//! root-cert.pem, refuse (not ours), or nothing until the renewal time.
//!
//! Both targets (Secret, directory) classify what they find into [`Installed`] and act on
//! the [`Decision`]; no I/O and no clock here.

use std::time::{Duration, SystemTime};

use sha2::Digest;
use x509_cert::Certificate;

use crate::pki::bundle::{
    BundleError, BundleFiles, BundleSummary, fingerprint, is_self_issued, verify_bundle,
    verify_once_valid,
};
use crate::pki::keys::KeyType;
use crate::pki::pem::{certificate_pem, decode_certificates, decode_readable_certificates};
use crate::pki::profile::bounded_common_name;
use crate::policy::rules::BACKDATE;

/// Default renewal point: two thirds into the lifetime (SPIRE-like, leaves a third of
/// the lifetime to retry a failing signer).
pub const DEFAULT_RENEW_FRACTION: f64 = 2.0 / 3.0;
/// Default jitter: renewal happens up to 5% of the lifetime earlier, so clusters issued
/// together do not all come back at the same instant.
pub const DEFAULT_JITTER_FRACTION: f64 = 0.05;

/// When to renew.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RotationSettings {
    /// Fraction of the lifetime (notBefore..notAfter) after which the bundle is due.
    pub renew_fraction: f64,
    /// Up to this fraction of the lifetime earlier, chosen per certificate.
    pub jitter_fraction: f64,
}

impl Default for RotationSettings {
    fn default() -> Self {
        RotationSettings {
            renew_fraction: DEFAULT_RENEW_FRACTION,
            jitter_fraction: DEFAULT_JITTER_FRACTION,
        }
    }
}

/// The range of a renewal fraction: renewing before 10% of the lifetime would re-issue
/// constantly, after 95% leaves no time to retry.
pub const RENEW_FRACTION_RANGE: std::ops::RangeInclusive<f64> = 0.1..=0.95;
/// The range of a jitter fraction (which must also stay below the renewal fraction).
pub const JITTER_FRACTION_RANGE: std::ops::RangeInclusive<f64> = 0.0..=0.5;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    #[error("{}", self.message(&CRD_FIELDS))]
    RenewFraction(f64),
    #[error("{}", self.message(&CRD_FIELDS))]
    JitterFraction(f64),
    #[error("{}", self.message(&CRD_FIELDS))]
    TtlTooShort {
        ttl_seconds: u64,
        shortest_seconds: u64,
    },
    /// An old root to drop, not named by its SHA-256 (`value` cut to a length a status
    /// message can carry).
    #[error("{}", self.message(&CRD_FIELDS))]
    RetiredRoot {
        index: usize,
        value: String,
        problem: FingerprintError,
    },
    /// A root to accept, not named by its SHA-256 (`value` cut as for `RetiredRoot`).
    #[error("{}", self.message(&CRD_FIELDS))]
    AcceptedRoot {
        index: usize,
        value: String,
        problem: FingerprintError,
    },
}

/// How the rotation settings are named where they were given, so that an error names
/// what its reader wrote: a request's (or a Mesh's) fields, or the directory agent's flags.
#[derive(Debug, Clone, Copy)]
pub struct SettingNames {
    pub renew_fraction: &'static str,
    pub jitter_fraction: &'static str,
    pub ttl: &'static str,
    pub retired_roots: &'static str,
    pub accepted_roots: &'static str,
}

/// The CRD's fields (`spec.rotation.renewFraction`, ...): the errors' [`Display`].
///
/// [`Display`]: std::fmt::Display
pub const CRD_FIELDS: SettingNames = SettingNames {
    renew_fraction: "renewFraction",
    jitter_fraction: "jitterFraction",
    ttl: "ttl",
    retired_roots: "retiredRootFingerprints",
    accepted_roots: "acceptedRootFingerprints",
};

/// `meshca agent --target-dir`'s flags.
pub const AGENT_FLAGS: SettingNames = SettingNames {
    renew_fraction: "--renew-fraction",
    jitter_fraction: "--jitter-fraction",
    ttl: "--ttl-seconds",
    retired_roots: "--retire-root",
    accepted_roots: "--accept-root",
};

impl SettingsError {
    /// `retiredRootFingerprints[index]` is not a SHA-256 fingerprint.
    pub fn retired_root(index: usize, value: &str, problem: FingerprintError) -> Self {
        SettingsError::RetiredRoot {
            index,
            value: shown_value(value),
            problem,
        }
    }

    /// `acceptedRootFingerprints[index]` is not a SHA-256 fingerprint.
    pub fn accepted_root(index: usize, value: &str, problem: FingerprintError) -> Self {
        SettingsError::AcceptedRoot {
            index,
            value: shown_value(value),
            problem,
        }
    }

    /// The error, naming the settings as `names` does.
    pub fn message(&self, names: &SettingNames) -> String {
        let SettingNames {
            renew_fraction: renew,
            jitter_fraction: jitter,
            ttl,
            retired_roots,
            accepted_roots,
        } = names;
        match self {
            SettingsError::RenewFraction(value) => {
                format!("{renew} must be between 0.1 and 0.95, not {value}")
            }
            SettingsError::JitterFraction(value) => {
                format!("{jitter} must be between 0 and 0.5 and below {renew}, not {value}")
            }
            SettingsError::TtlTooShort {
                ttl_seconds,
                shortest_seconds,
            } => format!(
                "a {ttl} of {ttl_seconds} s is too short for this renewal fraction: a certificate's notBefore is dated 5 minutes back, and that counts towards the lifetime {renew} applies to, so each new intermediate would be due within a minute of its issue (issued, and restarts begun, over and over); use a {ttl} of at least {shortest_seconds} s, or a larger {renew}"
            ),
            SettingsError::RetiredRoot {
                index,
                value,
                problem,
            } => format!("{retired_roots}[{index}] {value:?}: {problem}"),
            SettingsError::AcceptedRoot {
                index,
                value,
                problem,
            } => format!("{accepted_roots}[{index}] {value:?}: {problem}"),
        }
    }
}

/// A fingerprint setting's value as an error shows it: more than a fingerprint in any
/// form is noise, cut.
fn shown_value(value: &str) -> String {
    const SHOWN: usize = 100;
    let mut shown: String = value.chars().take(SHOWN).collect();
    if shown.len() < value.len() {
        shown.push('…');
    }
    shown
}

/// The least time a fresh intermediate stays installed before it is due (with the
/// earliest jitter).
const LEAST_TIME_INSTALLED: Duration = Duration::from_secs(60);

/// Refuses a requested ttl whose fresh certificates would be due (almost) at once under
/// `settings`: the signer dates notBefore [`BACKDATE`] back (Vault too), and renewal is a
/// fraction of notBefore..notAfter. `None` (the policy's maximum, days) always passes.
pub fn check_ttl(
    ttl_seconds: Option<u64>,
    settings: &RotationSettings,
) -> Result<(), SettingsError> {
    let Some(ttl_seconds) = ttl_seconds else {
        return Ok(());
    };
    let earliest_fraction = settings.renew_fraction - settings.jitter_fraction;
    // Due at notBefore + f * (BACKDATE + ttl); issued at notBefore + BACKDATE.
    let shortest = (BACKDATE + LEAST_TIME_INSTALLED).as_secs_f64() / earliest_fraction
        - BACKDATE.as_secs_f64();
    let shortest_seconds = shortest.ceil() as u64;
    if ttl_seconds < shortest_seconds {
        return Err(SettingsError::TtlTooShort {
            ttl_seconds,
            shortest_seconds,
        });
    }
    Ok(())
}

impl RotationSettings {
    /// Checks the ranges ([`RENEW_FRACTION_RANGE`], [`JITTER_FRACTION_RANGE`], and the jitter
    /// below the renewal fraction).
    pub fn new(renew_fraction: f64, jitter_fraction: f64) -> Result<Self, SettingsError> {
        if !RENEW_FRACTION_RANGE.contains(&renew_fraction) {
            return Err(SettingsError::RenewFraction(renew_fraction));
        }
        if !JITTER_FRACTION_RANGE.contains(&jitter_fraction) || jitter_fraction >= renew_fraction {
            return Err(SettingsError::JitterFraction(jitter_fraction));
        }
        Ok(RotationSettings {
            renew_fraction,
            jitter_fraction,
        })
    }
}

/// A number in [0, 1) derived from the certificate serial: the same certificate always
/// gets the same jitter (every replica and every re-run agrees on the renewal time),
/// different certificates get different ones.
pub fn jitter_unit(serial: &str) -> f64 {
    let digest = sha2::Sha256::digest(serial.to_ascii_lowercase().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 53 bits: exactly representable in an f64.
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The time a certificate valid from `not_before` to `not_after` becomes due.
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    serial: &str,
    settings: &RotationSettings,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let fraction =
        (settings.renew_fraction - settings.jitter_fraction * jitter_unit(serial)).clamp(0.0, 1.0);
    not_before + lifetime.mul_f64(fraction)
}

/// What a target holds, as classified by the target's I/O code.
#[derive(Debug, Clone)]
pub enum Installed {
    /// Nothing there: istiod runs with its self-signed CA.
    None,
    /// Something meshca did not write (Istio's, hand-made, another tool's). Its
    /// root-cert.pem, when readable, is kept so its roots can stay trusted after adoption.
    Foreign {
        what: String,
        root_cert: Option<String>,
        /// It holds both ca-cert.pem and ca-key.pem: istiod signs with it. Without them
        /// istiod runs on its self-signed CA, and adopting it is a first install.
        plugged: bool,
    },
    /// meshca's, but the four files cannot even be read.
    Unreadable {
        problem: String,
        root_cert: Option<String>,
    },
    /// meshca's four files.
    Ours(BundleFiles),
    /// Holds `tls.crt` (the kubernetes.io/tls layout), which istiod reads instead of the
    /// four files whenever it is there: an intermediate written beside it would never be
    /// used, whoever owns the rest.
    Shadowed { what: String },
}

/// The file whose presence makes istiod read `tls.crt`, `tls.key` and `ca.crt` instead of
/// `ca-cert.pem` and the rest (its `detectSigningCABundle`).
pub const TLS_SIGNING_CERT: &str = "tls.crt";

/// The desired state the decision compares against.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The mesh name: the intermediate's subject CN.
    pub mesh_name: String,
    /// A specific key type, or any the policy accepts.
    pub key_type: Option<KeyType>,
    /// The key types the signer's policy accepts (its `acceptedKeyTypes`), when the signer
    /// could be asked: with no `key_type`, an installed key outside them is replaced.
    pub accepted_key_types: Option<Vec<String>>,
    /// Replace a foreign bundle.
    pub adopt: bool,
    /// SHA-256 of the signer's current root, when the signer could be asked.
    pub signer_root: Option<String>,
    /// When that root ends: no intermediate under it ends later.
    pub signer_root_not_after: Option<SystemTime>,
    /// The roots the signer announces besides its own: trusted beside it.
    pub signer_announced: AnnouncedRoots,
    /// Roots to drop from root-cert.pem (every cluster has moved off them).
    pub retired_roots: Vec<String>,
    pub rotation: RotationSettings,
}

/// The roots a signer announces besides the one it issues under (PEM each), from its
/// public policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnouncedRoots {
    /// The root it will switch to: trusted ahead of the change.
    pub next: Option<String>,
    /// The root it switched from: trusted until retired, so that a cluster installed after
    /// the switch still trusts the clusters that have not moved yet.
    pub previous: Option<String>,
}

/// Why a new intermediate is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueReason {
    /// First install: istiod switches from its self-signed CA.
    FirstInstall,
    /// A foreign bundle is taken over (the spec says adopt).
    Adopt(String),
    /// The installed bundle fails istiod's checks (or cannot be read).
    Damaged(String),
    /// The installed bundle has expired (a certificate of its chain, or its root): not
    /// damaged, only past its end.
    Expired(String),
    /// Sound, but not valid yet by this clock (its notBefore ahead of it).
    NotYetValid(String),
    /// Valid, but not what the spec asks for (mesh, key type).
    Mismatch(String),
    /// The signer's root changed; the old roots stay in root-cert.pem.
    RootChanged { from: String, to: String },
    /// The renewal time has come.
    Due { renew_at: SystemTime },
}

impl IssueReason {
    /// Short machine-readable form for status and logs.
    pub fn code(&self) -> &'static str {
        match self {
            IssueReason::FirstInstall => "FirstInstall",
            IssueReason::Adopt(_) => "Adopt",
            IssueReason::Damaged(_) => "Damaged",
            IssueReason::Expired(_) => "Expired",
            IssueReason::NotYetValid(_) => "NotYetValid",
            IssueReason::Mismatch(_) => "Mismatch",
            IssueReason::RootChanged { .. } => "RootChanged",
            IssueReason::Due { .. } => "Due",
        }
    }
}

impl std::fmt::Display for IssueReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IssueReason::FirstInstall => f.write_str("no bundle installed yet"),
            IssueReason::Adopt(what) => write!(f, "adopting {what}"),
            IssueReason::Damaged(why) => write!(f, "installed bundle is damaged: {why}"),
            IssueReason::Expired(why) => write!(f, "installed bundle has expired: {why}"),
            IssueReason::NotYetValid(why) => {
                write!(f, "installed bundle is not valid yet by this clock: {why}")
            }
            IssueReason::Mismatch(why) => write!(f, "installed bundle does not match: {why}"),
            IssueReason::RootChanged { from, to } => {
                write!(f, "signer root changed from sha256 {from} to {to}")
            }
            IssueReason::Due { .. } => f.write_str("renewal time reached"),
        }
    }
}

/// What to do.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Leave a foreign bundle alone.
    Refuse { what: String },
    /// Leave it alone: istiod would not read what meshca wrote ([`Installed::Shadowed`]).
    Shadowed { what: String },
    /// Get a new intermediate and install it; `previous_roots` is the installed
    /// root-cert.pem (if any) to merge into the new one with [`compose_root_cert`].
    Issue {
        reason: IssueReason,
        previous_roots: Option<String>,
    },
    /// The intermediate stays; root-cert.pem changes (a root announced, or an old root
    /// retired or expired).
    RewriteRoots {
        root_cert: String,
        /// The bundle as it will be: its `root_fingerprints` are `root_cert`'s.
        summary: BundleSummary,
        renew_at: SystemTime,
    },
    /// Valid and not due: no write at all.
    UpToDate {
        summary: BundleSummary,
        renew_at: SystemTime,
    },
}

/// Decides what to do with `installed` at time `now`.
pub fn decide(installed: &Installed, desired: &Desired, now: SystemTime) -> Decision {
    let files = match installed {
        Installed::None => {
            return Decision::Issue {
                reason: IssueReason::FirstInstall,
                previous_roots: None,
            };
        }
        Installed::Foreign {
            what, root_cert, ..
        } => {
            return if desired.adopt {
                Decision::Issue {
                    reason: IssueReason::Adopt(what.clone()),
                    previous_roots: root_cert.clone(),
                }
            } else {
                Decision::Refuse { what: what.clone() }
            };
        }
        Installed::Unreadable { problem, root_cert } => {
            return Decision::Issue {
                reason: IssueReason::Damaged(problem.clone()),
                previous_roots: root_cert.clone(),
            };
        }
        Installed::Shadowed { what } => return Decision::Shadowed { what: what.clone() },
        Installed::Ours(files) => files,
    };
    let issue = |reason| Decision::Issue {
        reason,
        previous_roots: Some(files.root_cert.clone()),
    };
    let summary = match verify_bundle(files, None, now) {
        Ok(summary) => summary,
        // Not valid yet by this clock: either it was issued by a signer whose clock ran
        // ahead (put right since: a new one is valid), or this clock is behind the
        // signer's (a new one is not valid either: refused as it arrives, and not asked
        // for again while this clock stays behind, see `PassMemory`). One request tells.
        Err(e @ BundleError::NotYetValid { .. }) if verify_once_valid(files, now).is_some() => {
            return issue(IssueReason::NotYetValid(e.to_string()));
        }
        Err(e) => {
            return issue(match e {
                BundleError::Expired { .. } => IssueReason::Expired(e.to_string()),
                _ => IssueReason::Damaged(e.to_string()),
            });
        }
    };
    let cn = decode_certificates(&files.ca_cert)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .and_then(|c| {
            c.tbs_certificate()
                .subject()
                .common_name()
                .ok()
                .flatten()
                .map(String::from)
        })
        .unwrap_or_default();
    // The signer cuts a long mesh name to the CN's bound.
    if cn != bounded_common_name(&desired.mesh_name) {
        return issue(IssueReason::Mismatch(format!(
            "issued for mesh {cn:?}, the spec names {:?}",
            desired.mesh_name
        )));
    }
    if let Some(key_type) = desired.key_type {
        let want = key_type.public_key_kind().to_string();
        if summary.key != want {
            return issue(IssueReason::Mismatch(format!(
                "key is {}, the spec asks for {key_type}",
                summary.key
            )));
        }
    } else if let Some(accepted) = &desired.accepted_key_types
        && !accepts_key(accepted, &summary.key)
    {
        // A raised RSA minimum (or a curve dropped) reaches installed intermediates now,
        // not at their renewal months later. The root stays: a renewal, restarts and all.
        return issue(IssueReason::Mismatch(format!(
            "key is {}, which the signer's policy no longer accepts (accepted: {})",
            summary.key,
            accepted.join(", ")
        )));
    }
    // A signer that announces the installed root as its next one is behind this cluster,
    // not ahead: a replica not yet switched while another already issued under the next
    // root. Following it back would swap intermediates (and restart istiod) at every pass
    // that meets the other replica.
    if let Some(root) = &desired.signer_root
        && !root.eq_ignore_ascii_case(&summary.anchor_fingerprint)
        && !announces_as_next(&desired.signer_announced, &summary.anchor_fingerprint)
    {
        return issue(IssueReason::RootChanged {
            from: summary.anchor_fingerprint.clone(),
            to: root.to_ascii_lowercase(),
        });
    }
    let renew_at = renew_at(
        summary.not_before,
        summary.not_after,
        &summary.serial,
        &desired.rotation,
    );
    // An intermediate that already ends with the signer's root cannot be renewed to end
    // later: near the root's end each one issued would be due on arrival (issued, and
    // restarts begun, at every pass). It stays, past its renewal time, until the root
    // changes ([`renewal_held_by_root`]).
    if now >= renew_at && !ends_with_signer_root(&summary, desired) {
        return issue(IssueReason::Due { renew_at });
    }
    // The anchor is the root the chain ends at: it heads root-cert.pem, the others follow
    // while they are still wanted.
    let anchor = decode_certificates(&files.root_cert)
        .unwrap_or_default()
        .into_iter()
        .find(|c| fingerprint(c) == summary.anchor_fingerprint);
    if let Some(anchor) = anchor {
        let wanted = root_cert_to_write(
            &certificate_pem(&anchor),
            &desired.signer_announced,
            Some(&files.root_cert),
            &desired.retired_roots,
            now,
        );
        if wanted != files.root_cert {
            let summary = BundleSummary {
                root_fingerprints: root_fingerprints(&wanted),
                ..summary
            };
            return Decision::RewriteRoots {
                root_cert: wanted,
                summary,
                renew_at,
            };
        }
    }
    Decision::UpToDate { summary, renew_at }
}

/// Whether `key` (a [`BundleSummary::key`]) is a key of one of the `accepted` key types
/// (names as the policy gives them; names this agent does not know match nothing).
fn accepts_key(accepted: &[String], key: &str) -> bool {
    accepted
        .iter()
        .filter_map(|name| name.parse::<KeyType>().ok())
        .any(|key_type| key_type.public_key_kind().to_string() == key)
}

/// Whether the root with fingerprint `anchor` is the one `announced` says the signer will
/// switch to.
fn announces_as_next(announced: &AnnouncedRoots, anchor: &str) -> bool {
    announced.next.as_deref().is_some_and(|next| {
        root_fingerprints(next)
            .first()
            .is_some_and(|fp| fp.eq_ignore_ascii_case(anchor))
    })
}

/// What the agents say at each pass while [`renewal_held_by_root`].
pub const RENEWAL_HELD_BY_ROOT: &str = "renewal time reached, but the intermediate already ends with the signer's root, and a new one could not end later: it is kept; change the root before then (see Changing the root in the README)";

/// Whether the renewal time of `summary`'s intermediate has come but it is kept, since it
/// ends with the signer's root (see [`decide`]): the root must change before it ends.
pub fn renewal_held_by_root(summary: &BundleSummary, desired: &Desired, now: SystemTime) -> bool {
    ends_with_signer_root(summary, desired)
        && now
            >= renew_at(
                summary.not_before,
                summary.not_after,
                &summary.serial,
                &desired.rotation,
            )
}

/// [`ends_with_signer_root`] when the signer's root is known (its policy answered), None
/// otherwise: the metric keeps what it last knew rather than turn an outage into a "no".
pub fn ends_with_known_root(summary: &BundleSummary, desired: &Desired) -> Option<bool> {
    desired
        .signer_root_not_after
        .is_some()
        .then(|| ends_with_signer_root(summary, desired))
}

/// Whether `summary`'s intermediate ends no earlier than the root the signer issues under
/// (the same root it chains to), or, the signer not heard from, than the root its chain
/// ends at: a renewal could not end later.
pub fn ends_with_signer_root(summary: &BundleSummary, desired: &Desired) -> bool {
    let signer_heard = desired.accepted_key_types.is_some();
    let Some(signer_root) = desired.signer_root.as_deref() else {
        // The signer not heard from (unreachable, or refusing): the installed chain's own
        // root says whether a renewal under it could end later. One under another root
        // waits for the signer anyway; failing each pass meanwhile would only raise the
        // alarm over a bundle nothing can better. A signer that answers without naming
        // its root (an older one) may have changed it: renewed as before.
        return !signer_heard && summary.not_after >= summary.anchor_not_after;
    };
    signer_root.eq_ignore_ascii_case(&summary.anchor_fingerprint)
        && desired
            .signer_root_not_after
            .is_some_and(|root_end| summary.not_after >= root_end)
}

/// Normalizes a fingerprint for comparison: lowercase hex, no colons.
pub fn normalize_fingerprint(fp: &str) -> String {
    fp.chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The forms of a SHA-256 fingerprint `--retire-root` and `retiredRootFingerprints` take:
/// 64 hex digits in either case, bare or in colon-separated pairs as `openssl x509 -noout
/// -fingerprint -sha256` prints them. The CRD's schema holds this pattern, so the API
/// server refuses another form at apply.
pub const SHA256_FINGERPRINT_PATTERN: &str =
    "^([0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31})$";

/// Why a text is not a SHA-256 fingerprint. A root listed as retired in another form
/// would match no root, and the root would silently stay trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    #[error(
        "this looks like a SHA-1 fingerprint: use `openssl x509 -noout -fingerprint -sha256` (without -sha256, openssl prints SHA-1)"
    )]
    Sha1,
    #[error(
        "not a SHA-256 fingerprint: expected 64 hex digits, bare or in colon-separated pairs (as `openssl x509 -noout -fingerprint -sha256` prints them)"
    )]
    NotSha256,
}

/// Checks a SHA-256 fingerprint ([`SHA256_FINGERPRINT_PATTERN`]) and returns it as
/// fingerprints are compared ([`normalize_fingerprint`]).
pub fn parse_sha256_fingerprint(text: &str) -> Result<String, FingerprintError> {
    let hex = |part: &str| part.bytes().all(|b| b.is_ascii_hexdigit());
    let of_bytes = |bytes: usize| {
        let bare = text.len() == 2 * bytes && hex(text);
        let pairs = text.split(':').count() == bytes
            && text.split(':').all(|pair| pair.len() == 2 && hex(pair));
        bare || pairs
    };
    if of_bytes(32) {
        Ok(normalize_fingerprint(text))
    } else if of_bytes(20) {
        Err(FingerprintError::Sha1)
    } else {
        Err(FingerprintError::NotSha256)
    }
}

/// The roots an agent accepts from its signer (`--accept-root`, `acceptedRootFingerprints`):
/// a signer's TLS key, or any certificate the agent's CA bundle trusts, must not be enough
/// to have the cluster trust a root. Empty: any root (trust on first use, and whatever
/// the signer announces).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootPin {
    /// Normalized ([`normalize_fingerprint`]).
    fingerprints: Vec<String>,
    /// Where the list is set, as errors and warnings name it.
    setting: &'static str,
}

impl RootPin {
    /// `fingerprints` already checked ([`parse_sha256_fingerprint`]); `setting` names
    /// where they come from.
    pub fn new(fingerprints: &[String], setting: &'static str) -> Self {
        RootPin {
            fingerprints: fingerprints
                .iter()
                .map(|fp| normalize_fingerprint(fp))
                .collect(),
            setting,
        }
    }

    /// Whether no list is set (every root is accepted).
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    pub fn setting(&self) -> &'static str {
        self.setting
    }

    /// Whether the root with SHA-256 `fingerprint` is accepted.
    pub fn accepts(&self, fingerprint: &str) -> bool {
        self.is_empty()
            || self
                .fingerprints
                .contains(&normalize_fingerprint(fingerprint))
    }
}

/// The roots an agent already trusts, by which it judges the roots a signer names when no
/// [`RootPin`] is set: those of the root-cert.pem meshca installed, less the retired ones.
/// Empty: nothing of meshca's is installed, and the signer's own root is taken (trust on
/// first use).
#[derive(Debug, Clone, Default)]
pub struct TrustedRoots {
    roots: Vec<(String, Certificate)>,
}

impl TrustedRoots {
    /// The roots of `root_cert` (an installed root-cert.pem; `None`: nothing installed)
    /// less those in `retired`. Only self-issued certificates count: anything else in the
    /// file is no root.
    pub fn installed(root_cert: Option<&str>, retired: &[String]) -> Self {
        let retired: Vec<String> = retired.iter().map(|r| normalize_fingerprint(r)).collect();
        let roots = root_cert
            .map(|pem| decode_readable_certificates(pem).0)
            .unwrap_or_default()
            .into_iter()
            .filter(is_self_issued)
            .map(|cert| (fingerprint(&cert), cert))
            .filter(|(fp, _)| !retired.contains(fp))
            .collect();
        TrustedRoots { roots }
    }

    /// What a target holds, as [`TrustedRoots::installed`] takes it: the root-cert.pem of
    /// meshca's bundle (readable or not). Another tool's files, or none, are a first use.
    pub fn of(installed: &Installed, retired: &[String]) -> Self {
        let root_cert = match installed {
            Installed::Ours(files) => Some(files.root_cert.as_str()),
            Installed::Unreadable { root_cert, .. } => root_cert.as_deref(),
            Installed::None | Installed::Foreign { .. } | Installed::Shadowed { .. } => None,
        };
        Self::installed(root_cert, retired)
    }

    /// Nothing trusted yet: the signer's root will be, as it is (trust on first use).
    pub fn first_use(&self) -> bool {
        self.roots.is_empty()
    }

    fn get(&self, fp: &str) -> Option<&Certificate> {
        let fp = normalize_fingerprint(fp);
        self.roots.iter().find(|(f, _)| *f == fp).map(|(_, c)| c)
    }

    pub fn contains(&self, fp: &str) -> bool {
        self.get(fp).is_some()
    }
}

/// The signer's own root as its policy gives it: `rootFingerprintSha256` and, from a
/// signer that serves it, the certificate (checked to match when the policy was read).
#[derive(Debug, Clone, Copy, Default)]
pub struct SignerRoot<'a> {
    pub fingerprint: Option<&'a str>,
    pub certificate: Option<&'a Certificate>,
}

/// Why an announced root is not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotTaken {
    /// A pin is set and does not list it.
    NotPinned,
    /// No pin, and no root this cluster trusts vouches for it: the detail says what is
    /// missing.
    NotCrossSigned(String),
}

/// Whether the signer's root (`signer`) is one the agent may have the cluster trust: with
/// a pin, one it lists; without, one already trusted, or any at first use.
pub fn signer_root_trusted(pin: &RootPin, trusted: &TrustedRoots, signer: Option<&str>) -> bool {
    match signer {
        _ if !pin.is_empty() => signer.is_some_and(|fp| pin.accepts(fp)),
        _ if trusted.first_use() => true,
        Some(fp) => trusted.contains(fp),
        None => false,
    }
}

/// Whether the agent takes `announced`, a root the signer announces (next or previous),
/// with `cross` the cross certificate it serves for it. With a pin, the pin decides (a
/// listed root needs no cross certificate, an unlisted one is refused even if
/// cross-signed). Without: a root the cluster already trusts is taken; any other only if
/// the signer's root is trusted and its key vouches for this root's exact subject and key.
pub fn take_announced(
    pin: &RootPin,
    trusted: &TrustedRoots,
    signer: SignerRoot<'_>,
    announced: &Certificate,
    cross: Option<&str>,
) -> Result<(), NotTaken> {
    let announced_fp = fingerprint(announced);
    if !pin.is_empty() {
        return if pin.accepts(&announced_fp) {
            Ok(())
        } else {
            Err(NotTaken::NotPinned)
        };
    }
    if trusted.contains(&announced_fp) {
        return Ok(());
    }
    let not = |why: String| Err(NotTaken::NotCrossSigned(why));
    let Some(signer_fp) = signer.fingerprint else {
        return not("the signer's policy names no root of its own".into());
    };
    // The key that must vouch: the trusted copy of the signer's root, or at first use the
    // one the signer serves.
    let current = match (trusted.get(signer_fp), signer.certificate) {
        (Some(installed), _) => installed,
        (None, Some(served)) if trusted.first_use() => served,
        (None, None) if trusted.first_use() => {
            return not(
                "the signer serves no certificate of its own root (a signer older than this agent)"
                    .into(),
            );
        }
        (None, _) => {
            return not(format!(
                "the signer's own root sha256 {} is not one this cluster trusts",
                normalize_fingerprint(signer_fp)
            ));
        }
    };
    let Some(cross) = cross else {
        return not(
            "the signer serves no cross certificate for it (a signer older than this agent, or one without the root key)"
                .into(),
        );
    };
    crate::pki::cross::check_cross_pem(cross, current, announced).or_else(|e| not(e.to_string()))
}

/// Whether `cert` is valid at `now`.
fn is_valid_at(cert: &Certificate, now: SystemTime) -> bool {
    let validity = cert.tbs_certificate().validity();
    validity.not_before.to_system_time() <= now && now <= validity.not_after.to_system_time()
}

/// What root-cert.pem carries on: a root as [`verify_bundle`] takes it beside the anchor
/// ([`is_self_issued`], whatever its signature algorithm or extensions: what istiod takes),
/// valid at `now`. One rule, so that a root-cert.pem composed here never fails the check
/// of the bundle it goes into.
fn is_usable_root(cert: &Certificate, now: SystemTime) -> bool {
    is_self_issued(cert) && is_valid_at(cert, now)
}

/// [`RootLeftOut::why`] of a root left out as asked.
pub const RETIRED: &str = "retired";

/// A certificate of the installed root-cert.pem that the one to write leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootLeftOut {
    pub subject: String,
    pub fingerprint: String,
    pub why: &'static str,
}

/// The certificates of `installed` that `written` leaves out, each with why ([`compose_root_cert`]'s
/// rule): what the cluster trusted and will not any more, for the log.
pub fn roots_left_out(
    installed: &str,
    written: &str,
    retired: &[String],
    now: SystemTime,
) -> Vec<RootLeftOut> {
    let kept = root_fingerprints(written);
    let retired: Vec<String> = retired.iter().map(|r| normalize_fingerprint(r)).collect();
    let mut left_out: Vec<RootLeftOut> = Vec::new();
    for cert in decode_readable_certificates(installed).0 {
        let fingerprint = fingerprint(&cert);
        if kept.contains(&fingerprint) || left_out.iter().any(|l| l.fingerprint == fingerprint) {
            continue;
        }
        let why = if !is_self_issued(&cert) {
            "not self-issued (its issuer is not its subject), so no root"
        } else if !is_valid_at(&cert, now) {
            "not valid now"
        } else if retired.contains(&fingerprint) {
            RETIRED
        } else {
            "not wanted"
        };
        left_out.push(RootLeftOut {
            subject: cert.tbs_certificate().subject().to_string(),
            fingerprint,
            why,
        });
    }
    left_out
}

/// root-cert.pem during and after a root change: the new root(s) first, then every root
/// of `previous` that is self-issued, still valid at `now` and not retired. So the
/// new set is a superset of the old one while clusters move (Istio's multi-root rule:
/// one bundle must contain the other), and once the old root is retired the next set is
/// a subset. Output is canonical PEM (LF), each root once.
pub fn compose_root_cert(
    new_roots: &str,
    previous: Option<&str>,
    retired: &[String],
    now: SystemTime,
) -> String {
    let retired: Vec<String> = retired.iter().map(|r| normalize_fingerprint(r)).collect();
    let mut seen: Vec<String> = Vec::new();
    let mut out = String::new();
    let mut push = |cert: &Certificate, out: &mut String| {
        let fp = fingerprint(cert);
        if !seen.contains(&fp) {
            out.push_str(&certificate_pem(cert));
            seen.push(fp);
        }
    };
    for cert in decode_certificates(new_roots).unwrap_or_default() {
        push(&cert, &mut out);
    }
    // Block by block: one block that cannot be read (another tool's odd PEM in an
    // adopted root-cert.pem) must not drop the roots beside it.
    for cert in previous
        .map(|p| decode_readable_certificates(p).0)
        .unwrap_or_default()
    {
        if is_usable_root(&cert, now) && !retired.contains(&fingerprint(&cert)) {
            push(&cert, &mut out);
        }
    }
    out
}

/// The root-cert.pem to write next to `installed` (None: nothing usable installed): the
/// signer's `roots`, then the roots it announces and the installed roots, each while still
/// wanted ([`compose_root_cert`]: valid now, not retired), taken one step at a time as
/// Istio accepts them ([`step_toward`]). The one rule for a rewrite of root-cert.pem alone
/// and for a new bundle.
pub fn root_cert_to_write(
    roots: &str,
    announced: &AnnouncedRoots,
    installed: Option<&str>,
    retired: &[String],
    now: SystemTime,
) -> String {
    let besides = [&announced.next, &announced.previous]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .chain(installed)
        .collect::<Vec<_>>()
        .join("\n");
    let wanted = compose_root_cert(roots, Some(&besides), retired, now);
    step_toward(&wanted, installed)
}

/// root-cert.pem on the way from `installed` to `wanted` as Istio takes it: a new root set
/// only as a superset or a subset of the one in force. When `wanted` both adds and drops
/// roots (a next root announced, or a new intermediate under a new root, in the same pass
/// as a retirement or an expiry), the roots come first and the old ones stay until the
/// next write, which is then a subset.
fn step_toward(wanted: &str, installed: Option<&str>) -> String {
    let Some(installed) = installed else {
        return wanted.to_string();
    };
    let wanted_fps = root_fingerprints(wanted);
    let installed_roots: Vec<Certificate> = decode_readable_certificates(installed)
        .0
        .into_iter()
        .filter(is_self_issued)
        .collect();
    let installed_fps: Vec<String> = installed_roots.iter().map(fingerprint).collect();
    let adds = wanted_fps.iter().any(|fp| !installed_fps.contains(fp));
    let drops = installed_fps.iter().any(|fp| !wanted_fps.contains(fp));
    let mut step = wanted.to_string();
    if adds && drops {
        // An adopted root-cert.pem may list a root twice: kept once.
        let mut listed = wanted_fps;
        for cert in installed_roots {
            let fp = fingerprint(&cert);
            if !listed.contains(&fp) {
                step.push_str(&certificate_pem(&cert));
                listed.push(fp);
            }
        }
    }
    step
}

/// SHA-256 fingerprints of the certificates in a PEM text (blocks that cannot be read are
/// skipped).
pub fn root_fingerprints(pem: &str) -> Vec<String> {
    decode_readable_certificates(pem)
        .0
        .iter()
        .map(fingerprint)
        .collect()
}

/// Whether `pem` (an `istio-ca-root-cert` ConfigMap's root-cert.pem) carries the root
/// with fingerprint `fp`.
pub fn carries_root(pem: &str, fp: &str) -> bool {
    let fp = normalize_fingerprint(fp);
    root_fingerprints(pem).contains(&fp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::keys::PrivateKey;
    use crate::pki::profile::RootCa;
    use crate::pki::testing::{software_bundle, software_root};

    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR: Duration = Duration::from_secs(3_600);

    /// Which announced roots an agent takes: the whole decision, case by case. C is the
    /// signer's root, N the root it announces, O an older root installed, X a stranger.
    #[test]
    fn an_announced_root_is_taken_only_if_trusted_pinned_or_vouched_for_by_a_trusted_root() {
        use crate::pki::pem::certificate_pem;
        use crate::pki::testing::software_cross;
        let (c_key, c) = software_root(KeyType::EcdsaP256, "acme", 400 * DAY);
        let (_, n) = software_root(KeyType::EcdsaP384, "acme", 800 * DAY);
        let (_, o) = software_root(KeyType::EcdsaP256, "acme", 400 * DAY);
        let (x_key, x) = software_root(KeyType::EcdsaP256, "acme", 400 * DAY);
        let (_, renamed) = software_root(KeyType::EcdsaP384, "evil", 800 * DAY);
        let pem = |cert: &Certificate| certificate_pem(cert);
        let vouched = pem(&software_cross(&c_key, &c, &n));
        // X's key, under C's name (test roots share it): what an impostor can make.
        let forged = {
            let mut as_c = x.clone();
            as_c.subject = c.subject.clone();
            pem(&software_cross(&x_key, &as_c, &n))
        };
        // C's key vouching for another name with N's key.
        let other_subject = {
            let mut renamed_n = n.clone();
            renamed_n.subject = renamed.subject.clone();
            pem(&software_cross(&c_key, &c, &renamed_n))
        };
        let installed = |roots: &[&RootCa], retired: &[&RootCa]| {
            let file: String = roots.iter().map(|r| r.pem.as_str()).collect();
            let retired: Vec<String> = retired
                .iter()
                .map(|r| r.fingerprint_sha256.clone())
                .collect();
            TrustedRoots::installed(Some(&file), &retired)
        };
        let first_use = TrustedRoots::default();
        let no_pin = RootPin::new(&[], "--accept-root");
        let pin_n = RootPin::new(std::slice::from_ref(&n.fingerprint_sha256), "--accept-root");
        let pin_c = RootPin::new(std::slice::from_ref(&c.fingerprint_sha256), "--accept-root");
        let signer_c = SignerRoot {
            fingerprint: Some(&c.fingerprint_sha256),
            certificate: Some(&c.certificate),
        };
        let signer_c_no_cert = SignerRoot {
            certificate: None,
            ..signer_c
        };
        let signer_x = SignerRoot {
            fingerprint: Some(&x.fingerprint_sha256),
            certificate: Some(&x.certificate),
        };
        let taken = Ok(());
        let not_pinned = Err(NotTaken::NotPinned);
        type Case<'a> = (
            &'a str,
            &'a RootPin,
            TrustedRoots,
            SignerRoot<'a>,
            Option<&'a str>,
            Result<(), ()>,
        );
        let cases: Vec<Case> = vec![
            (
                "pin lists N: no cross certificate needed",
                &pin_n,
                installed(&[&c], &[]),
                signer_c,
                None,
                Ok(()),
            ),
            (
                "pin leaves N out: refused even cross-signed",
                &pin_c,
                installed(&[&c], &[]),
                signer_c,
                Some(&vouched),
                Err(()),
            ),
            (
                "N already trusted: taken as it is",
                &no_pin,
                installed(&[&c, &n], &[]),
                signer_x,
                None,
                Ok(()),
            ),
            (
                "C trusted, vouches for N",
                &no_pin,
                installed(&[&c], &[]),
                signer_c,
                Some(&vouched),
                Ok(()),
            ),
            (
                "C trusted (its copy), signer serves no root cert",
                &no_pin,
                installed(&[&o, &c], &[]),
                signer_c_no_cert,
                Some(&vouched),
                Ok(()),
            ),
            (
                "C trusted, no cross certificate (older signer)",
                &no_pin,
                installed(&[&c], &[]),
                signer_c,
                None,
                Err(()),
            ),
            (
                "C trusted, cross certificate by another key",
                &no_pin,
                installed(&[&c], &[]),
                signer_c,
                Some(&forged),
                Err(()),
            ),
            (
                "C trusted, cross certificate for another subject",
                &no_pin,
                installed(&[&c], &[]),
                signer_c,
                Some(&other_subject),
                Err(()),
            ),
            (
                "C trusted, cross certificate is junk",
                &no_pin,
                installed(&[&c], &[]),
                signer_c,
                Some("junk"),
                Err(()),
            ),
            (
                "C not trusted (O installed), even with C's word",
                &no_pin,
                installed(&[&o], &[]),
                signer_c,
                Some(&vouched),
                Err(()),
            ),
            (
                "C retired: no longer vouches",
                &no_pin,
                installed(&[&c, &o], &[&c]),
                signer_c,
                Some(&vouched),
                Err(()),
            ),
            (
                "impostor X vouches for its own next root",
                &no_pin,
                installed(&[&c], &[]),
                signer_x,
                Some(&forged),
                Err(()),
            ),
            (
                "first use: C as served vouches for N",
                &no_pin,
                first_use.clone(),
                signer_c,
                Some(&vouched),
                Ok(()),
            ),
            (
                "first use: no cross certificate",
                &no_pin,
                first_use.clone(),
                signer_c,
                None,
                Err(()),
            ),
            (
                "first use: C's certificate not served",
                &no_pin,
                first_use.clone(),
                signer_c_no_cert,
                Some(&vouched),
                Err(()),
            ),
            (
                "first use: forged cross certificate",
                &no_pin,
                first_use.clone(),
                signer_c,
                Some(&forged),
                Err(()),
            ),
        ];
        for (case, pin, trusted, signer, cross, expected) in cases {
            let got = take_announced(pin, &trusted, signer, &n.certificate, cross);
            match (&got, expected) {
                (Ok(()), Ok(())) => {}
                (Err(NotTaken::NotPinned), Err(())) if !pin.is_empty() => {}
                (Err(NotTaken::NotCrossSigned(why)), Err(())) if pin.is_empty() => {
                    assert!(!why.is_empty(), "{case}")
                }
                _ => panic!("{case}: {got:?}"),
            }
        }
        assert_eq!(
            take_announced(&pin_n, &first_use, signer_c, &n.certificate, None),
            taken
        );
        assert_eq!(
            take_announced(&pin_c, &first_use, signer_c, &n.certificate, Some(&vouched)),
            not_pinned
        );
        // What the warning says of each.
        let why = |trusted: &TrustedRoots, signer, cross| match take_announced(
            &no_pin,
            trusted,
            signer,
            &n.certificate,
            cross,
        ) {
            Err(NotTaken::NotCrossSigned(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(why(&installed(&[&c], &[]), signer_c, None).contains("no cross certificate"));
        assert!(
            why(&installed(&[&o], &[]), signer_c, Some(&vouched)).contains(&format!(
                "own root sha256 {} is not one this cluster trusts",
                c.fingerprint_sha256
            ))
        );
        assert!(
            why(&installed(&[&c], &[]), signer_c, Some(&forged))
                .contains("not signed by the current root's key")
        );
        assert!(why(&installed(&[&c], &[]), signer_c, Some(&other_subject)).contains("subject"));
    }

    /// The signer's root, before it is asked for anything: pinned, trusted, or first use.
    #[test]
    fn the_signer_root_must_be_trusted_pinned_or_met_first() {
        let (_, c) = software_root(KeyType::EcdsaP256, "acme", 400 * DAY);
        let (_, o) = software_root(KeyType::EcdsaP256, "acme", 400 * DAY);
        let trusted = TrustedRoots::installed(Some(&o.pem), &[]);
        let no_pin = RootPin::default();
        let c_fp = Some(c.fingerprint_sha256.as_str());
        assert!(signer_root_trusted(&no_pin, &TrustedRoots::default(), c_fp));
        assert!(signer_root_trusted(&no_pin, &TrustedRoots::default(), None));
        assert!(!signer_root_trusted(&no_pin, &trusted, c_fp));
        assert!(!signer_root_trusted(&no_pin, &trusted, None));
        assert!(signer_root_trusted(
            &no_pin,
            &trusted,
            Some(&o.fingerprint_sha256.to_uppercase())
        ));
        let pin = RootPin::new(std::slice::from_ref(&c.fingerprint_sha256), "x");
        assert!(signer_root_trusted(&pin, &trusted, c_fp));
        assert!(!signer_root_trusted(
            &pin,
            &TrustedRoots::default(),
            Some(&o.fingerprint_sha256)
        ));
        // Another tool's root-cert.pem is not meshca's trust: adopting it is a first use.
        let foreign = Installed::Foreign {
            what: "x".into(),
            root_cert: Some(o.pem.clone()),
            plugged: true,
        };
        assert!(TrustedRoots::of(&foreign, &[]).first_use());
    }

    struct Fixture {
        root_key: PrivateKey,
        root: RootCa,
        issued: SystemTime,
        bundle: BundleFiles,
    }

    /// A root and a 30-day intermediate for mesh "cluster-a" issued at `issued`.
    fn fixture() -> Fixture {
        let (root_key, root) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let issued = crate::pki::testing::whole_seconds(SystemTime::now());
        let bundle = software_bundle(
            &root_key,
            &root,
            "acme",
            "cluster-a",
            KeyType::EcdsaP256,
            issued,
            issued + 30 * DAY,
        );
        Fixture {
            root_key,
            root,
            issued,
            bundle,
        }
    }

    fn desired(f: &Fixture) -> Desired {
        Desired {
            mesh_name: "cluster-a".into(),
            key_type: None,
            accepted_key_types: None,
            adopt: false,
            signer_root: Some(f.root.fingerprint_sha256.clone()),
            signer_root_not_after: Some(f.root.not_after),
            signer_announced: AnnouncedRoots::default(),
            retired_roots: vec![],
            rotation: RotationSettings::default(),
        }
    }

    fn serial_of(files: &BundleFiles) -> String {
        verify_bundle(files, None, SystemTime::now())
            .unwrap()
            .serial
    }

    #[test]
    fn a_ttl_whose_certificates_would_be_due_at_once_is_refused() {
        let defaults = RotationSettings::default();
        // f = 2/3 - 0.05: (300 + 60) / f - 300 = 283.8.
        assert_eq!(
            check_ttl(Some(120), &defaults),
            Err(SettingsError::TtlTooShort {
                ttl_seconds: 120,
                shortest_seconds: 284
            })
        );
        assert_eq!(check_ttl(Some(284), &defaults), Ok(()));
        assert_eq!(check_ttl(None, &defaults), Ok(()));
        // At the shortest ttl, a fresh certificate is due a minute after its issue.
        let settings = RotationSettings::new(0.5, 0.0).unwrap();
        let Err(SettingsError::TtlTooShort {
            shortest_seconds, ..
        }) = check_ttl(Some(1), &settings)
        else {
            panic!("refused");
        };
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_before = issued - BACKDATE;
        let not_after = issued + Duration::from_secs(shortest_seconds);
        let due = renew_at(not_before, not_after, "01", &settings);
        assert!(due >= issued + LEAST_TIME_INSTALLED, "{due:?}");
        let message = check_ttl(Some(120), &defaults).unwrap_err().to_string();
        assert!(message.contains("at least 284 s"), "{message}");
    }

    #[test]
    fn jitter_is_deterministic_in_range_and_varies() {
        let serials = ["01", "4a3f", "7fffffffffffffff", "abcdef0123456789"];
        let units: Vec<f64> = serials.iter().map(|s| jitter_unit(s)).collect();
        for (serial, unit) in serials.iter().zip(&units) {
            assert!((0.0..1.0).contains(unit));
            assert_eq!(jitter_unit(serial), *unit);
            assert_eq!(jitter_unit(&serial.to_ascii_uppercase()), *unit);
        }
        let mut sorted = units.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.dedup();
        assert_eq!(sorted.len(), units.len());
    }

    #[test]
    fn renewal_time_is_the_fraction_minus_the_pinned_jitter() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let end = start + 30 * DAY;
        let no_jitter = RotationSettings::new(2.0 / 3.0, 0.0).unwrap();
        assert_eq!(renew_at(start, end, "01", &no_jitter), start + 20 * DAY);
        let half = RotationSettings::new(0.5, 0.0).unwrap();
        assert_eq!(renew_at(start, end, "01", &half), start + 15 * DAY);

        let settings = RotationSettings::default();
        for serial in ["01", "02", "deadbeef"] {
            let at = renew_at(start, end, serial, &settings);
            let expected = start
                + (30 * DAY).mul_f64(2.0 / 3.0 - DEFAULT_JITTER_FRACTION * jitter_unit(serial));
            assert_eq!(at, expected);
            assert!(at <= start + 20 * DAY);
            assert!(at >= start + (30 * DAY).mul_f64(2.0 / 3.0 - DEFAULT_JITTER_FRACTION));
        }
        // A certificate whose notAfter precedes notBefore is due at once.
        assert_eq!(renew_at(end, start, "01", &settings), end);
    }

    #[test]
    fn settings_ranges_are_checked() {
        assert!(RotationSettings::new(0.05, 0.0).is_err());
        assert!(RotationSettings::new(0.99, 0.0).is_err());
        assert!(RotationSettings::new(0.5, 0.6).is_err());
        assert!(RotationSettings::new(0.2, 0.2).is_err());
        assert!(RotationSettings::new(0.5, -0.1).is_err());
        assert!(RotationSettings::new(0.5, 0.1).is_ok());
        let d = RotationSettings::default();
        assert_eq!(
            RotationSettings::new(d.renew_fraction, d.jitter_fraction).unwrap(),
            d
        );
    }

    #[test]
    fn nothing_installed_is_a_first_install() {
        let f = fixture();
        match decide(&Installed::None, &desired(&f), f.issued) {
            Decision::Issue {
                reason: IssueReason::FirstInstall,
                previous_roots: None,
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_foreign_bundle_is_refused_unless_adopted() {
        let f = fixture();
        let foreign = Installed::Foreign {
            what: "Secret istio-system/cacerts without meshca's label".into(),
            root_cert: Some(f.bundle.root_cert.clone()),
            plugged: true,
        };
        match decide(&foreign, &desired(&f), f.issued) {
            Decision::Refuse { what } => assert!(what.contains("without meshca's label")),
            other => panic!("{other:?}"),
        }
        let adopt = Desired {
            adopt: true,
            ..desired(&f)
        };
        // A target istiod would read tls.crt from is left alone, adopt or not.
        let shadowed = Installed::Shadowed {
            what: "istio-system/cacerts".into(),
        };
        assert!(matches!(
            decide(&shadowed, &adopt, f.issued),
            Decision::Shadowed { .. }
        ));
        match decide(&foreign, &adopt, f.issued) {
            Decision::Issue {
                reason: IssueReason::Adopt(_),
                previous_roots: Some(roots),
            } => assert_eq!(roots, f.bundle.root_cert),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_intermediate_ending_with_the_root_is_kept_past_its_renewal_time() {
        let f = fixture();
        // Capped by the root: it ends when the root does, as any successor would.
        let capped = software_bundle(
            &f.root_key,
            &f.root,
            "acme",
            "cluster-a",
            KeyType::EcdsaP256,
            f.issued,
            f.root.not_after,
        );
        let installed = Installed::Ours(capped.clone());
        let d = desired(&f);
        let summary = verify_bundle(&capped, None, f.issued).unwrap();
        let due = renew_at(f.issued, f.root.not_after, &summary.serial, &d.rotation);
        for now in [due, f.root.not_after - Duration::from_secs(100)] {
            match decide(&installed, &d, now) {
                // Its renewal time stays what it was (overdue: the alerts see it).
                Decision::UpToDate { renew_at, .. } => assert_eq!(renew_at, due),
                other => panic!("{other:?}"),
            }
            assert!(renewal_held_by_root(&summary, &d, now));
        }
        assert!(!renewal_held_by_root(
            &summary,
            &d,
            due - Duration::from_secs(1)
        ));
        // The signer not heard from: its own root holds it too (failing every pass of an
        // outage would change nothing but the alarms).
        let unreachable = Desired {
            signer_root: None,
            signer_root_not_after: None,
            ..d.clone()
        };
        assert!(matches!(
            decide(&installed, &unreachable, due),
            Decision::UpToDate { .. }
        ));
        assert!(renewal_held_by_root(&summary, &unreachable, due));
        // One ending before its root is renewed at its time, the signer heard or not.
        let early = verify_bundle(&f.bundle, None, f.issued).unwrap();
        assert!(!ends_with_signer_root(&early, &unreachable));
        // A signer that answers without naming its root may have changed it: renewed.
        let unnamed_root = Desired {
            accepted_key_types: Some(vec![KeyType::EcdsaP256.to_string()]),
            ..unreachable.clone()
        };
        assert!(matches!(
            decide(&installed, &unnamed_root, due),
            Decision::Issue {
                reason: IssueReason::Due { .. },
                ..
            }
        ));
        // Renewed as before when the signer cannot say when its root ends, and replaced
        // when its root changes.
        let offline = Desired {
            signer_root_not_after: None,
            ..d.clone()
        };
        assert!(matches!(
            decide(&installed, &offline, due),
            Decision::Issue {
                reason: IssueReason::Due { .. },
                ..
            }
        ));
        let moved = Desired {
            signer_root: Some("ff".repeat(32)),
            ..d.clone()
        };
        assert!(matches!(
            decide(&installed, &moved, due),
            Decision::Issue {
                reason: IssueReason::RootChanged { .. },
                ..
            }
        ));
        // An intermediate ending before the root is renewed at its time.
        match decide(&Installed::Ours(f.bundle.clone()), &d, f.issued + 29 * DAY) {
            Decision::Issue {
                reason: IssueReason::Due { .. },
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        // What the metrics report (meshca_agent_certificate_ends_with_root): known from
        // the signer's root, from the start (not only once it is due); not known while
        // the signer cannot say, so the last value stays.
        assert_eq!(ends_with_known_root(&summary, &d), Some(true));
        assert_eq!(ends_with_known_root(&summary, &offline), None);
        assert_eq!(ends_with_known_root(&summary, &moved), Some(false));
        let shorter = verify_bundle(&f.bundle, None, f.issued).unwrap();
        assert_eq!(ends_with_known_root(&shorter, &d), Some(false));
    }

    #[test]
    fn one_unreadable_block_in_an_installed_root_cert_drops_no_root_beside_it() {
        let f = fixture();
        let (_key, old_root) = software_root(KeyType::EcdsaP256, "acme", 100 * DAY);
        // OpenSSL's trusted-certificate form, which Go's bundle reader skips too.
        let odd = "-----BEGIN TRUSTED CERTIFICATE-----\nAAAA\n-----END TRUSTED CERTIFICATE-----\n";
        let installed = format!("{}{odd}", old_root.pem);
        let written = compose_root_cert(&f.root.pem, Some(&installed), &[], f.issued);
        assert_eq!(
            root_fingerprints(&written),
            [
                f.root.fingerprint_sha256.clone(),
                old_root.fingerprint_sha256.clone()
            ]
        );
        assert_eq!(root_fingerprints(&installed), [old_root.fingerprint_sha256]);
    }

    #[test]
    fn a_valid_bundle_before_its_renewal_time_is_left_alone() {
        let f = fixture();
        let d = desired(&f);
        let serial = serial_of(&f.bundle);
        let due = renew_at(f.issued, f.issued + 30 * DAY, &serial, &d.rotation);
        for now in [f.issued, f.issued + DAY, due - Duration::from_secs(1)] {
            match decide(&Installed::Ours(f.bundle.clone()), &d, now) {
                Decision::UpToDate { renew_at, summary } => {
                    assert_eq!(renew_at, due);
                    assert_eq!(summary.serial, serial);
                }
                other => panic!("{other:?}"),
            }
        }
        // The same answer when the signer cannot be asked about its root.
        let offline = Desired {
            signer_root: None,
            ..d.clone()
        };
        assert!(matches!(
            decide(&Installed::Ours(f.bundle.clone()), &offline, f.issued),
            Decision::UpToDate { .. }
        ));
        // At and after the renewal time it is due.
        for now in [due, due + HOUR] {
            match decide(&Installed::Ours(f.bundle.clone()), &d, now) {
                Decision::Issue {
                    reason: IssueReason::Due { renew_at },
                    previous_roots: Some(_),
                } => assert_eq!(renew_at, due),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn damaged_or_inconsistent_bundles_are_replaced() {
        let f = fixture();
        let other = software_bundle(
            &f.root_key,
            &f.root,
            "acme",
            "cluster-a",
            KeyType::EcdsaP256,
            f.issued,
            f.issued + 30 * DAY,
        );
        let cases: Vec<(BundleFiles, &str)> = vec![
            (
                BundleFiles {
                    ca_key: other.ca_key.clone(),
                    ..f.bundle.clone()
                },
                "does not match",
            ),
            (
                BundleFiles {
                    cert_chain: other.cert_chain.clone(),
                    ..f.bundle.clone()
                },
                "must start with ca-cert.pem",
            ),
            (
                BundleFiles {
                    ca_cert: "garbage".into(),
                    ..f.bundle.clone()
                },
                "ca-cert.pem",
            ),
            (
                BundleFiles {
                    root_cert: other.ca_cert.clone(),
                    ..f.bundle.clone()
                },
                "root-cert.pem",
            ),
            (
                BundleFiles {
                    ca_key: String::new(),
                    ..f.bundle.clone()
                },
                "ca-key.pem",
            ),
        ];
        for (files, expect) in cases {
            match decide(&Installed::Ours(files), &desired(&f), f.issued) {
                Decision::Issue {
                    reason: IssueReason::Damaged(why),
                    ..
                } => assert!(why.contains(expect), "{why} lacks {expect}"),
                other => panic!("{expect}: {other:?}"),
            }
        }
        // Expired is replaced too (istiod would refuse it), said as expired: neither
        // damaged nor blamed on this clock.
        let expired_at = f.issued + 31 * DAY;
        match decide(&Installed::Ours(f.bundle.clone()), &desired(&f), expired_at) {
            Decision::Issue { reason, .. } => {
                let said = reason.to_string();
                assert_eq!(reason.code(), "Expired");
                assert!(
                    said.starts_with("installed bundle has expired: ")
                        && said.contains(&format!(
                            "expired at {}",
                            crate::signer::audit::rfc3339(f.issued + 30 * DAY)
                        ))
                        && !said.contains("damaged")
                        && !said.contains("just issued")
                        && !said.contains("clock is ahead"),
                    "{said}"
                );
            }
            other => panic!("{other:?}"),
        }
        let unreadable = Installed::Unreadable {
            problem: "ca-key.pem: No such file".into(),
            root_cert: Some(f.bundle.root_cert.clone()),
        };
        assert!(matches!(
            decide(&unreadable, &desired(&f), f.issued),
            Decision::Issue {
                reason: IssueReason::Damaged(_),
                previous_roots: Some(_)
            }
        ));
    }

    /// A bundle in place this clock finds not valid yet is replaced, said as such: one
    /// request tells whether the signer's clock ran ahead when it issued it (a new one is
    /// valid) or this clock is behind (the new one is refused too, and `PassMemory` keeps
    /// the next passes from asking).
    #[test]
    fn a_bundle_in_place_not_valid_yet_by_this_clock_is_asked_for_again() {
        let f = fixture();
        for behind in [f.issued - Duration::from_secs(1), f.issued - HOUR] {
            match decide(&Installed::Ours(f.bundle.clone()), &desired(&f), behind) {
                Decision::Issue {
                    reason: reason @ IssueReason::NotYetValid(_),
                    ..
                } => {
                    let said = reason.to_string();
                    assert!(
                        said.starts_with("installed bundle is not valid yet by this clock: ")
                            && said.contains("cert-chain.pem certificate 1 is not valid yet"),
                        "{said}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        // Damaged otherwise, it is replaced whatever this clock reads.
        let mismatched = BundleFiles {
            ca_key: PrivateKey::generate(KeyType::EcdsaP256)
                .unwrap()
                .to_pkcs8_pem()
                .unwrap()
                .to_string(),
            ..f.bundle.clone()
        };
        assert!(matches!(
            decide(&Installed::Ours(mismatched), &desired(&f), f.issued - HOUR),
            Decision::Issue {
                reason: IssueReason::Damaged(_),
                ..
            }
        ));
    }

    #[test]
    fn a_bundle_for_another_mesh_or_key_type_is_replaced() {
        let f = fixture();
        let other_mesh = Desired {
            mesh_name: "cluster-b".into(),
            ..desired(&f)
        };
        match decide(&Installed::Ours(f.bundle.clone()), &other_mesh, f.issued) {
            Decision::Issue {
                reason: IssueReason::Mismatch(why),
                ..
            } => assert!(why.contains("cluster-b"), "{why}"),
            other => panic!("{other:?}"),
        }
        let rsa = Desired {
            key_type: Some(KeyType::Rsa2048),
            ..desired(&f)
        };
        match decide(&Installed::Ours(f.bundle.clone()), &rsa, f.issued) {
            Decision::Issue {
                reason: IssueReason::Mismatch(why),
                ..
            } => assert!(why.contains("rsa2048"), "{why}"),
            other => panic!("{other:?}"),
        }
        let same = Desired {
            key_type: Some(KeyType::EcdsaP256),
            ..desired(&f)
        };
        assert!(matches!(
            decide(&Installed::Ours(f.bundle.clone()), &same, f.issued),
            Decision::UpToDate { .. }
        ));
    }

    #[test]
    fn a_key_the_policy_no_longer_accepts_is_replaced_under_the_same_root() {
        let f = fixture();
        let names = |types: &[KeyType]| Some(types.iter().map(|k| k.to_string()).collect());
        // The RSA minimum raised to 4096: P-256 is out, P-384 and RSA-4096 remain.
        let raised = Desired {
            accepted_key_types: names(&[KeyType::Rsa4096, KeyType::EcdsaP384]),
            ..desired(&f)
        };
        match decide(&Installed::Ours(f.bundle.clone()), &raised, f.issued) {
            Decision::Issue {
                reason: IssueReason::Mismatch(why),
                previous_roots: Some(roots),
            } => {
                assert_eq!(
                    why,
                    "key is ECDSA P-256, which the signer's policy no longer accepts (accepted: rsa4096, ecdsa-p384)"
                );
                // Only the key changes: root-cert.pem stays (no restart for roots).
                assert_eq!(roots, f.bundle.root_cert);
            }
            other => panic!("{other:?}"),
        }
        // Names this agent does not know match nothing, and hide nothing.
        let unknown = Desired {
            accepted_key_types: Some(vec!["ecdsa-p521".into(), "ecdsa-p256".into()]),
            ..desired(&f)
        };
        let still = Desired {
            accepted_key_types: names(&[KeyType::Rsa2048, KeyType::EcdsaP256]),
            ..desired(&f)
        };
        // Without the signer (no policy known) the bundle is judged on its own.
        let offline = Desired {
            signer_root: None,
            accepted_key_types: None,
            ..desired(&f)
        };
        for d in [&unknown, &still, &offline] {
            assert!(
                matches!(
                    decide(&Installed::Ours(f.bundle.clone()), d, f.issued),
                    Decision::UpToDate { .. }
                ),
                "{:?}",
                d.accepted_key_types
            );
        }
    }

    #[test]
    fn a_mesh_name_longer_than_a_common_name_matches_the_cut_name_the_signer_writes() {
        let f = fixture();
        let long = "a".repeat(70);
        // The signer's subject: the name cut to 64 characters.
        let bundle = software_bundle(
            &f.root_key,
            &f.root,
            "acme",
            &long,
            KeyType::EcdsaP256,
            f.issued,
            f.issued + 30 * DAY,
        );
        let d = Desired {
            mesh_name: long.clone(),
            ..desired(&f)
        };
        assert!(matches!(
            decide(&Installed::Ours(bundle.clone()), &d, f.issued),
            Decision::UpToDate { .. }
        ));
        // Another name of the same length still differs within the first 64.
        let other = Desired {
            mesh_name: format!("b{}", &long[1..]),
            ..desired(&f)
        };
        assert!(matches!(
            decide(&Installed::Ours(bundle), &other, f.issued),
            Decision::Issue {
                reason: IssueReason::Mismatch(_),
                ..
            }
        ));
    }

    /// Self-signed roots made by openssl that meshca cannot verify the self-signature of
    /// (P-521, SHA-1, Ed25519) and a v1 root without extensions, valid for 30 days.
    fn openssl_roots() -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| crate::pki::testing::openssl(dir.path(), args);
        let days = ["-days", "30", "-nodes"];
        for (key, extra, name) in [
            ("ec", &["-pkeyopt", "ec_paramgen_curve:P-521"][..], "p521"),
            ("rsa:2048", &["-sha1"][..], "sha1"),
            ("ed25519", &[][..], "ed25519"),
        ] {
            let subject = format!("/O=other/CN={name} root");
            let mut args = vec!["req", "-x509", "-newkey", key, "-keyout"];
            let key_file = format!("{name}.key");
            let out_file = format!("{name}.pem");
            args.extend([key_file.as_str(), "-subj", &subject, "-out", &out_file]);
            args.extend(extra);
            args.extend(days);
            openssl(&args);
        }
        // openssl x509 -req -signkey writes a v1 certificate: no extensions at all.
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "v1.key",
            "-subj",
            "/O=other/CN=v1 root",
            "-out",
            "v1.csr",
        ]);
        openssl(&[
            "x509", "-req", "-in", "v1.csr", "-signkey", "v1.key", "-days", "30", "-out", "v1.pem",
        ]);
        ["p521", "sha1", "ed25519", "v1"]
            .iter()
            .map(|name| std::fs::read_to_string(dir.path().join(format!("{name}.pem"))).unwrap())
            .collect()
    }

    #[test]
    fn adopted_roots_istiod_takes_are_kept_and_the_bundle_they_go_into_verifies() {
        let f = fixture();
        // openssl dates its certificates from now: look a little later.
        let now = f.issued + HOUR;
        let others = openssl_roots();
        let adopted = others.concat();
        let written = root_cert_to_write(
            &f.root.pem,
            &AnnouncedRoots::default(),
            Some(&adopted),
            &[],
            now,
        );
        let mut expected = vec![f.root.fingerprint_sha256.clone()];
        expected.extend(others.iter().flat_map(|pem| root_fingerprints(pem)));
        assert_eq!(root_fingerprints(&written), expected);
        assert_eq!(roots_left_out(&adopted, &written, &[], now), []);
        let bundle = BundleFiles {
            root_cert: written,
            ..f.bundle.clone()
        };
        let summary = verify_bundle(&bundle, None, now).unwrap();
        assert_eq!(summary.root_fingerprints, expected);
        // Installed, such a bundle is neither damaged nor rewritten.
        assert!(matches!(
            decide(&Installed::Ours(bundle), &desired(&f), now),
            Decision::UpToDate { .. }
        ));
        // What is left out of an adopted root-cert.pem is named: an intermediate is no root,
        // an expired root no longer trusted, a retired one as asked.
        let (_old_key, old_root) = software_root(KeyType::EcdsaP384, "acme", DAY);
        let (_retired_key, retired_root) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let later = f.issued + 2 * DAY;
        // The signer's root is in it already: only drops, done at once (see step_toward).
        let installed = format!(
            "{}{}{}{}{}",
            f.root.pem, others[0], f.bundle.ca_cert, old_root.pem, retired_root.pem
        );
        let retired = [retired_root.fingerprint_sha256.clone()];
        let written = root_cert_to_write(
            &f.root.pem,
            &AnnouncedRoots::default(),
            Some(&installed),
            &retired,
            later,
        );
        let left: Vec<(String, &str)> = roots_left_out(&installed, &written, &retired, later)
            .into_iter()
            .map(|l| (l.subject, l.why))
            .collect();
        assert_eq!(
            left,
            [
                (
                    "CN=cluster-a,O=acme".to_string(),
                    "not self-issued (its issuer is not its subject), so no root"
                ),
                ("CN=test root,O=acme".to_string(), "not valid now"),
                ("CN=test root,O=acme".to_string(), RETIRED),
            ]
        );
    }

    /// The review's counterexample: installed [R, R] (an adopted root-cert.pem), R retired,
    /// the signer's root A new: the step keeps R for one more write, but once, not twice.
    #[test]
    fn a_root_listed_twice_is_kept_once_on_the_way_out() {
        let f = fixture();
        let (_key, r) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let installed = format!("{}{}", r.pem, r.pem);
        let retired = [r.fingerprint_sha256.clone()];
        let none = AnnouncedRoots::default();
        let written = root_cert_to_write(&f.root.pem, &none, Some(&installed), &retired, f.issued);
        assert_eq!(
            root_fingerprints(&written),
            [
                f.root.fingerprint_sha256.clone(),
                r.fingerprint_sha256.clone()
            ]
        );
        // The next write drops it.
        let next = root_cert_to_write(&f.root.pem, &none, Some(&written), &retired, f.issued);
        assert_eq!(
            root_fingerprints(&next),
            [f.root.fingerprint_sha256.as_str()]
        );
    }

    #[test]
    fn a_changed_signer_root_triggers_issuance_and_keeps_the_old_root() {
        let f = fixture();
        let (_new_key, new_root) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let d = Desired {
            signer_root: Some(new_root.fingerprint_sha256.to_ascii_uppercase()),
            ..desired(&f)
        };
        let previous = match decide(&Installed::Ours(f.bundle.clone()), &d, f.issued) {
            Decision::Issue {
                reason: IssueReason::RootChanged { from, to },
                previous_roots: Some(previous),
            } => {
                assert_eq!(from, f.root.fingerprint_sha256);
                assert_eq!(to, new_root.fingerprint_sha256);
                previous
            }
            other => panic!("{other:?}"),
        };
        // The new root-cert.pem: new root first, old root kept (a superset of the old).
        let union = compose_root_cert(&new_root.pem, Some(&previous), &[], f.issued);
        assert_eq!(
            root_fingerprints(&union),
            vec![
                new_root.fingerprint_sha256.clone(),
                f.root.fingerprint_sha256.clone()
            ]
        );
        assert!(carries_root(&union, &f.root.fingerprint_sha256));
        // Composing again from the union changes nothing (idempotent).
        assert_eq!(
            compose_root_cert(&new_root.pem, Some(&union), &[], f.issued),
            union
        );
        // Retiring the old root (fingerprint in any case, with colons) collapses to the
        // new root alone: a subset of the union.
        let colons: Vec<String> = f
            .root
            .fingerprint_sha256
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).to_ascii_uppercase())
            .collect();
        let collapsed =
            compose_root_cert(&new_root.pem, Some(&union), &[colons.join(":")], f.issued);
        assert_eq!(
            root_fingerprints(&collapsed),
            vec![new_root.fingerprint_sha256.clone()]
        );
        // An old root past its notAfter is dropped without being retired.
        assert_eq!(
            root_fingerprints(&compose_root_cert(
                &new_root.pem,
                Some(&union),
                &[],
                f.issued + 500 * DAY
            )),
            vec![new_root.fingerprint_sha256.clone()]
        );
        // Things in the old file that are not self-signed CAs are never carried.
        let junk = format!("{}{}", f.bundle.ca_cert, f.root.pem);
        assert_eq!(
            root_fingerprints(&compose_root_cert(
                &new_root.pem,
                Some(&junk),
                &[],
                f.issued
            )),
            vec![
                new_root.fingerprint_sha256.clone(),
                f.root.fingerprint_sha256.clone()
            ]
        );
    }

    #[test]
    fn an_announced_next_root_is_trusted_ahead_without_a_new_intermediate() {
        let f = fixture();
        let (_next_key, next) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let next_only = AnnouncedRoots {
            next: Some(next.pem.clone()),
            previous: None,
        };
        let announced = Desired {
            signer_announced: next_only.clone(),
            ..desired(&f)
        };
        let prepared = match decide(&Installed::Ours(f.bundle.clone()), &announced, f.issued) {
            Decision::RewriteRoots { root_cert, .. } => root_cert,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            root_fingerprints(&prepared),
            vec![
                f.root.fingerprint_sha256.clone(),
                next.fingerprint_sha256.clone()
            ]
        );
        let bundle = BundleFiles {
            root_cert: prepared.clone(),
            ..f.bundle.clone()
        };
        assert!(matches!(
            decide(&Installed::Ours(bundle.clone()), &announced, f.issued),
            Decision::UpToDate { .. }
        ));
        // A pass without the signer keeps it: only retirement or expiry removes a root.
        let offline = Desired {
            signer_root: None,
            ..desired(&f)
        };
        assert!(matches!(
            decide(&Installed::Ours(bundle.clone()), &offline, f.issued),
            Decision::UpToDate { .. }
        ));
        // The switch: a new intermediate under the next root, and the set of roots
        // trusted stays the same (the old root kept, the new one first).
        let switched = Desired {
            signer_root: Some(next.fingerprint_sha256.clone()),
            ..desired(&f)
        };
        match decide(&Installed::Ours(bundle.clone()), &switched, f.issued) {
            Decision::Issue {
                reason: IssueReason::RootChanged { .. },
                previous_roots: Some(previous),
            } => assert_eq!(
                root_fingerprints(&compose_root_cert(
                    &next.pem,
                    Some(&previous),
                    &[],
                    f.issued
                )),
                vec![
                    next.fingerprint_sha256.clone(),
                    f.root.fingerprint_sha256.clone()
                ]
            ),
            other => panic!("{other:?}"),
        }
        // An announced root that is not valid now is not trusted.
        assert_eq!(
            root_cert_to_write(&f.root.pem, &next_only, None, &[], f.issued + 500 * DAY),
            f.root.pem
        );
    }

    #[test]
    fn a_signer_not_yet_switched_to_the_installed_root_leaves_the_intermediate_alone() {
        let f = fixture();
        let (next_key, next) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        // A replica already switched issued under the next root; the old root stays.
        let switched_bundle = BundleFiles {
            root_cert: compose_root_cert(&next.pem, Some(&f.root.pem), &[], f.issued),
            ..software_bundle(
                &next_key,
                &next,
                "acme",
                "cluster-a",
                KeyType::EcdsaP256,
                f.issued,
                f.issued + 30 * DAY,
            )
        };
        let installed = Installed::Ours(switched_bundle);
        let switched = Desired {
            signer_root: Some(next.fingerprint_sha256.clone()),
            signer_announced: AnnouncedRoots {
                next: None,
                previous: Some(f.root.pem.clone()),
            },
            ..desired(&f)
        };
        let behind = Desired {
            signer_announced: AnnouncedRoots {
                next: Some(next.pem.clone()),
                previous: None,
            },
            ..desired(&f)
        };
        // Passes alternating between the two replicas write nothing.
        for signer in [&behind, &switched, &behind] {
            match decide(&installed, signer, f.issued) {
                Decision::UpToDate { summary, .. } => {
                    assert_eq!(summary.anchor_fingerprint, next.fingerprint_sha256)
                }
                other => panic!("{other:?}"),
            }
        }
        // Renewal is still due with the replica behind: it issues what it can.
        assert!(matches!(
            decide(&installed, &behind, f.issued + 29 * DAY),
            Decision::Issue {
                reason: IssueReason::Due { .. },
                ..
            }
        ));
        // A switch undone (the next root no longer announced) moves the cluster back.
        assert!(matches!(
            decide(&installed, &desired(&f), f.issued),
            Decision::Issue {
                reason: IssueReason::RootChanged { .. },
                ..
            }
        ));
    }

    #[test]
    fn an_announced_previous_root_is_trusted_until_it_is_retired() {
        let f = fixture();
        let (_old_key, old_root) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let announced = AnnouncedRoots {
            next: None,
            previous: Some(old_root.pem.clone()),
        };
        let both = vec![
            f.root.fingerprint_sha256.clone(),
            old_root.fingerprint_sha256.clone(),
        ];
        // A cluster installed after the switch trusts the root it chains to, then the one
        // the clusters that have not moved yet still chain to.
        let joined = root_cert_to_write(&f.root.pem, &announced, None, &[], f.issued);
        assert_eq!(root_fingerprints(&joined), both);
        // One installed under the root in force trusting only it gets it added, with its
        // intermediate kept.
        let d = Desired {
            signer_announced: announced.clone(),
            ..desired(&f)
        };
        match decide(&Installed::Ours(f.bundle.clone()), &d, f.issued) {
            Decision::RewriteRoots { root_cert, .. } => assert_eq!(root_cert, joined),
            other => panic!("{other:?}"),
        }
        // Retired, it is dropped although still announced, and not added to a new bundle.
        let retired = [old_root.fingerprint_sha256.to_ascii_uppercase()];
        for installed in [Some(joined.as_str()), None] {
            assert_eq!(
                root_cert_to_write(&f.root.pem, &announced, installed, &retired, f.issued),
                f.root.pem
            );
        }
        // Expired, it is not trusted.
        assert_eq!(
            root_cert_to_write(&f.root.pem, &announced, None, &[], f.issued + 500 * DAY),
            f.root.pem
        );
    }

    #[test]
    fn roots_are_added_before_old_ones_are_dropped() {
        let f = fixture();
        let (_old_key, old_root) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let (_next_key, next) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let fps = |roots: &[&RootCa]| -> Vec<String> {
            roots.iter().map(|r| r.fingerprint_sha256.clone()).collect()
        };
        let bundle = BundleFiles {
            root_cert: compose_root_cert(&f.root.pem, Some(&old_root.pem), &[], f.issued),
            ..f.bundle.clone()
        };
        let d = Desired {
            signer_announced: AnnouncedRoots {
                next: Some(next.pem.clone()),
                previous: None,
            },
            retired_roots: vec![old_root.fingerprint_sha256.clone()],
            ..desired(&f)
        };
        // Adding the next root and dropping the retired one at once would be neither a
        // superset nor a subset: the addition first (a superset), the drop next time.
        let added = match decide(&Installed::Ours(bundle.clone()), &d, f.issued) {
            Decision::RewriteRoots { root_cert, .. } => root_cert,
            other => panic!("{other:?}"),
        };
        assert_eq!(root_fingerprints(&added), fps(&[&f.root, &next, &old_root]));
        let bundle = BundleFiles {
            root_cert: added,
            ..bundle
        };
        match decide(&Installed::Ours(bundle.clone()), &d, f.issued) {
            Decision::RewriteRoots { root_cert, .. } => {
                assert_eq!(root_fingerprints(&root_cert), fps(&[&f.root, &next]))
            }
            other => panic!("{other:?}"),
        }
        // The same for a new intermediate under a new root while an old root is retired
        // (the issuing path composes, then steps).
        let previous = compose_root_cert(&f.root.pem, Some(&old_root.pem), &[], f.issued);
        let retired = [old_root.fingerprint_sha256.clone()];
        let wanted = compose_root_cert(&next.pem, Some(&previous), &retired, f.issued);
        assert_eq!(root_fingerprints(&wanted), fps(&[&next, &f.root]));
        assert_eq!(
            root_fingerprints(&step_toward(&wanted, Some(&previous))),
            fps(&[&next, &f.root, &old_root])
        );
        // Only adding, only dropping, or nothing installed: the wanted set at once.
        for (wanted, installed) in [
            (&f.root.pem, Some(&f.root.pem)),
            (&previous, Some(&f.root.pem)),
            (&f.root.pem, Some(&previous)),
            (&previous, None),
        ] {
            assert_eq!(step_toward(wanted, installed.map(String::as_str)), *wanted);
        }
    }

    #[test]
    fn retiring_an_old_root_rewrites_only_root_cert() {
        let f = fixture();
        let (_old_key, old_root) = software_root(KeyType::EcdsaP384, "acme", 400 * DAY);
        let mut bundle = f.bundle.clone();
        bundle.root_cert = compose_root_cert(&f.root.pem, Some(&old_root.pem), &[], f.issued);
        let d = desired(&f);
        // While the old root is wanted: nothing to do.
        assert!(matches!(
            decide(&Installed::Ours(bundle.clone()), &d, f.issued),
            Decision::UpToDate { .. }
        ));
        let retire = Desired {
            retired_roots: vec![old_root.fingerprint_sha256.clone()],
            ..d.clone()
        };
        match decide(&Installed::Ours(bundle.clone()), &retire, f.issued) {
            Decision::RewriteRoots { root_cert, .. } => {
                assert_eq!(root_cert, f.root.pem);
                let mut after = bundle.clone();
                after.root_cert = root_cert;
                // Once rewritten, the next decision is to do nothing.
                assert!(matches!(
                    decide(&Installed::Ours(after), &retire, f.issued),
                    Decision::UpToDate { .. }
                ));
            }
            other => panic!("{other:?}"),
        }
        // The anchor itself is never dropped, even if listed as retired.
        let retire_anchor = Desired {
            retired_roots: vec![f.root.fingerprint_sha256.clone()],
            ..d
        };
        assert!(matches!(
            decide(&Installed::Ours(f.bundle.clone()), &retire_anchor, f.issued),
            Decision::UpToDate { .. }
        ));
    }
}
