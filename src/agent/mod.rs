//! The cluster side: generate the intermediate key here (it leaves only into `cacerts`),
//! build a CSR the signer's public policy accepts, get it signed, check the answer as
//! istiod would, and install the four files as one set.

pub mod cacerts;
pub mod client;
pub mod controller;
pub mod crd;
pub mod directory;
pub mod election;
pub mod k8s;
pub mod metrics;
pub mod restart;
pub mod rotation;
pub mod timing;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use der::EncodePem;

use self::client::{ClientError, PublicPolicy, SignRequestBody, SignerClient};
use self::rotation::{Installed, NotTaken, RootPin, TrustedRoots, signer_root_trusted};
use crate::pki::bundle::{BundleError, BundleFiles, BundleSummary, verify_bundle};
use crate::pki::csr::build_csr;
use crate::pki::keys::{KeyError, KeyType, PrivateKey};
use crate::pki::profile::subject_name;
use crate::policy::ObjectRef;

/// Key types in the order the agent prefers them: ECDSA is cheap for istiod to sign with.
const PREFERENCE: [KeyType; 5] = [
    KeyType::EcdsaP256,
    KeyType::EcdsaP384,
    KeyType::Rsa2048,
    KeyType::Rsa3072,
    KeyType::Rsa4096,
];

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "key type {requested} is not accepted by virtual mesh {virtual_mesh} (accepted: {accepted})"
    )]
    KeyTypeRefused {
        requested: KeyType,
        virtual_mesh: String,
        accepted: String,
    },
    #[error("virtual mesh {0} accepts no key type this agent can generate")]
    NoKeyType(String),
    #[error(
        "a ttl of {ttl_seconds} s exceeds virtual mesh {virtual_mesh}'s maximum of {max_ttl_seconds} s: the signer would refuse the renewal"
    )]
    TtlRefused {
        ttl_seconds: u64,
        virtual_mesh: String,
        max_ttl_seconds: u64,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot build CSR: {0}")]
    Csr(String),
    #[error("the signer's certificate fails the checks istiod makes, so it was not installed: {0}")]
    Bundle(#[from] BundleError),
    #[error("cannot write {dir}: {message}")]
    Write { dir: String, message: String },
    #[error("cannot write {dir}: {message} (nothing was asked of the signer)")]
    NotWritable { dir: String, message: String },
    #[error("cannot look at {path}: {message} (nothing was asked of the signer)")]
    Look { path: String, message: String },
    #[error("{0} is not meshca's: refusing to overwrite it (set adopt to let meshca replace it)")]
    Foreign(String),
    #[error(
        "{what} belongs to meshca request {holder}, which targets it too: refusing to take it over, even with adopt (two requests on one Secret would take it from each other at every pass); point one of them at another Secret, or delete it"
    )]
    HeldByAnotherRequest { what: String, holder: String },
    #[error(
        "{0} holds tls.crt: istiod then reads tls.crt, tls.key and ca.crt (the kubernetes.io/tls layout) instead of ca-cert.pem and the rest, so an intermediate written beside them would never be used; remove tls.crt, tls.key and ca.crt (or the whole target, with adopt for the rest) and meshca writes its own"
    )]
    Shadowed(String),
    #[error("the signer's root does not match what it announced: {0}")]
    RootMismatch(String),
    /// The signer's root is not pinned: checked before anything is asked of it.
    #[error("{}", describe_root_not_accepted(.root.as_deref(), .setting))]
    RootNotAccepted {
        /// The signer's policy's rootFingerprintSha256 (None: it names none).
        root: Option<String>,
        setting: &'static str,
    },
    /// What the signer issued chains to a root that is not pinned (its policy said
    /// otherwise).
    #[error(
        "the signer's answer chains to root sha256 {root}, which is not among the roots this agent accepts ({setting}), although its policy named an accepted one: nothing was installed; a signer whose policy does not match what it signs may be an impostor"
    )]
    IssuedUnderUnacceptedRoot { root: String, setting: &'static str },
    /// No pin: the signer's root is neither in root-cert.pem nor was it announced with
    /// the word of a root this cluster trusts. Checked before anything is asked of it.
    #[error("{}", describe_root_not_trusted(.root.as_deref(), .setting))]
    RootNotTrusted {
        root: Option<String>,
        setting: &'static str,
    },
    /// No pin: what the signer issued chains to, or carries, a root this cluster does not
    /// trust (its policy said otherwise).
    #[error(
        "the signer's answer chains to, or carries, root sha256 {root}, which is not in root-cert.pem and was never announced cross-signed by a root this cluster trusts, although its policy named a trusted one: nothing was installed; a signer whose policy does not match what it signs may be an impostor"
    )]
    IssuedUnderUntrustedRoot { root: String },
    /// The signer's answer is not valid yet by this clock (`just_issued`), or an earlier
    /// answer was not and this clock still reads before it: what a directory agent
    /// remembers, as for [`AgentError::ClockAhead`], to ask nothing more until it agrees.
    #[error(
        "this machine's clock is behind the signer's: it reads {}, before the notBefore {} of {which} of the intermediate the signer {}; fix time synchronisation. Nothing was installed (the bundle in place is left as it is), and the signer is not asked again while this clock stays behind{}",
        crate::signer::audit::rfc3339(*.now),
        crate::signer::audit::rfc3339(*.not_before),
        if *.just_issued { "just issued" } else { "issued at an earlier try" },
        if *.just_issued { "" } else { ": nothing was asked of the signer" }
    )]
    ClockBehind {
        which: String,
        not_before: SystemTime,
        now: SystemTime,
        just_issued: bool,
    },
    #[error("{}", .ahead.describe(*.now, *.just_issued))]
    ClockAhead {
        /// What a directory agent remembers to ask nothing until the clock agrees.
        ahead: ClockAhead,
        now: SystemTime,
        /// The intermediate was issued by this pass's request, not an earlier one's.
        just_issued: bool,
    },
}

fn describe_root_not_accepted(root: Option<&str>, setting: &str) -> String {
    match root {
        Some(root) => format!(
            "the signer's root sha256 {root} is not among the roots this agent accepts ({setting}): nothing was asked of the signer; if this root change is yours, add it to {setting} (else the signer, or whoever holds a certificate this agent's CA bundle trusts, is trying to have this cluster trust a root of its own)"
        ),
        None => format!(
            "the signer's policy names no root (rootFingerprintSha256), so it cannot be checked against the roots this agent accepts ({setting}): nothing was asked of the signer; upgrade the signer, or empty {setting}"
        ),
    }
}

fn describe_root_not_trusted(root: Option<&str>, setting: &str) -> String {
    let accept = pin_setting(setting);
    match root {
        Some(root) => format!(
            "the signer's root sha256 {root} is not in root-cert.pem and was never announced cross-signed by a root this cluster trusts: nothing was asked of the signer; if this root change is yours, announce it first (README: Changing the root) or add it to {accept} (else the signer, or whoever holds a certificate this agent's CA bundle trusts, is trying to have this cluster trust a root of its own)"
        ),
        None => format!(
            "the signer's policy names no root (rootFingerprintSha256), so it cannot be checked against the roots this cluster trusts: nothing was asked of the signer; upgrade the signer, or list its root in {accept}"
        ),
    }
}

/// Where a pin is set, as messages name it (a pin built without a name: both places).
fn pin_setting(setting: &str) -> &str {
    if setting.is_empty() {
        "--accept-root / rotation.acceptedRootFingerprints"
    } else {
        setting
    }
}

/// Forgets the roots `policy` announces that the agent does not take (see
/// [`PublicPolicy::drop_untaken_roots`]: with `pin` set, those it does not list; without,
/// those no root in `trusted` vouches for), with a warning for each: what the agents do
/// with every policy they read.
pub fn take_announced_roots(policy: &mut PublicPolicy, pin: &RootPin, trusted: &TrustedRoots) {
    for root in policy.drop_untaken_roots(pin, trusted) {
        match &root.why {
            NotTaken::NotPinned => tracing::warn!(
                sha256 = %root.fingerprint,
                subject = %root.subject,
                virtual_mesh = %policy.virtual_mesh,
                "the signer announces a {} root sha256 {} ({}) that is not among the roots this agent accepts ({}): it is not added to root-cert.pem; if this root is yours, add its fingerprint to {}",
                root.which,
                root.fingerprint,
                root.subject,
                pin.setting(),
                pin.setting(),
            ),
            NotTaken::NotCrossSigned(detail) => tracing::warn!(
                sha256 = %root.fingerprint,
                subject = %root.subject,
                virtual_mesh = %policy.virtual_mesh,
                why = %detail,
                "the signer announces a {} root sha256 {} ({}) that is not cross-signed by a root this cluster trusts ({detail}): it is not added to root-cert.pem; if this root is yours, announce it from a signer whose root key vouches for it (upgrade the signer before the agents), or add its fingerprint to {}",
                root.which,
                root.fingerprint,
                root.subject,
                pin_setting(pin.setting()),
            ),
        }
    }
}

/// Before the signer is asked to sign: its root (as its policy names it) must be one the
/// cluster may trust ([`signer_root_trusted`]: with `pin` set, one it lists; without, one
/// in `trusted`, or any at first use), or the signer could have the cluster trust a root
/// of its own.
pub fn check_signer_root(
    policy: &PublicPolicy,
    pin: &RootPin,
    trusted: &TrustedRoots,
) -> Result<(), AgentError> {
    let root = policy.root_fingerprint_sha256.as_deref();
    if signer_root_trusted(pin, trusted, root) {
        return Ok(());
    }
    let root = root.map(rotation::normalize_fingerprint);
    Err(if pin.is_empty() {
        AgentError::RootNotTrusted {
            root,
            setting: pin.setting(),
        }
    } else {
        AgentError::RootNotAccepted {
            root,
            setting: pin.setting(),
        }
    })
}

/// After signing, defence in depth: the policy's root was checked before, but the answer
/// is what would be installed. The root the chain ends at (`anchor`) and every root the
/// signer sends (`root_cert`) must be ones the cluster may trust: with `pin`, listed;
/// without, in `trusted`, or at first use the signer's root (`signer_root`, which the
/// anchor was checked to be).
fn check_answer_roots(
    anchor: &str,
    root_cert: &str,
    pin: &RootPin,
    trusted: &TrustedRoots,
    signer_root: Option<&str>,
) -> Result<(), AgentError> {
    let untrusted = std::iter::once(anchor.to_string())
        .chain(rotation::root_fingerprints(root_cert))
        .find(|fp| {
            if !pin.is_empty() {
                return !pin.accepts(fp);
            }
            let first_use_root = trusted.first_use()
                && signer_root.is_some_and(|root| rotation::normalize_fingerprint(root) == *fp);
            !(trusted.contains(fp) || first_use_root)
        });
    match untrusted {
        Some(root) if pin.is_empty() => Err(AgentError::IssuedUnderUntrustedRoot { root }),
        Some(root) => Err(AgentError::IssuedUnderUnacceptedRoot {
            root,
            setting: pin.setting(),
        }),
        None => Ok(()),
    }
}

/// When the signer's answer to a request made at `now` told that this machine's clock is
/// ahead of the signer's: the refusal a directory agent remembers ([`AgentError::ClockAhead`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockAhead {
    pub now: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl ClockAhead {
    /// A certificate the signer has just issued cannot have expired yet: if this
    /// machine's clock is past its notAfter, this clock is ahead of the signer's.
    pub fn of_fresh(files: &BundleFiles, now: SystemTime) -> Option<ClockAhead> {
        let (not_before, not_after) =
            crate::pki::bundle::validity(crate::pki::bundle::CA_CERT, &files.ca_cert).ok()?;
        (now > not_after).then_some(ClockAhead {
            now,
            not_before,
            not_after,
        })
    }

    /// Whether this clock still reads ahead, `elapsed` (monotonic) after the refusal:
    /// the signer's clock read at most notAfter then, so at most notAfter + `elapsed` now.
    /// A clock put right reads less and the signer is asked again.
    pub fn still_ahead(&self, now: SystemTime, elapsed: Duration) -> bool {
        now > self.not_after + elapsed
    }

    pub fn error(&self, now: SystemTime, just_issued: bool) -> AgentError {
        AgentError::ClockAhead {
            ahead: *self,
            now,
            just_issued,
        }
    }

    fn describe(&self, now: SystemTime, just_issued: bool) -> String {
        let rfc = crate::signer::audit::rfc3339;
        format!(
            "this machine's clock is ahead of the signer's: it reads {}, past the notAfter {} of the intermediate the signer {} (valid from {}); fix time synchronisation. Nothing was installed, and the signer is not asked again while this clock stays ahead",
            rfc(now),
            rfc(self.not_after),
            if just_issued {
                "just issued"
            } else {
                "issued at an earlier pass (nothing was asked of the signer now)"
            },
            rfc(self.not_before),
        )
    }
}

impl AgentError {
    /// A short name for the kind of failure: the `Ready` condition's reason and the
    /// `outcome` label of `meshca_agent_reconciles_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentError::Foreign(_)
            | AgentError::Shadowed(_)
            | AgentError::HeldByAnotherRequest { .. } => "ForeignSecret",
            AgentError::Client(_) => "SignerError",
            AgentError::RootNotAccepted { .. } | AgentError::IssuedUnderUnacceptedRoot { .. } => {
                "RootNotAccepted"
            }
            AgentError::RootNotTrusted { .. } | AgentError::IssuedUnderUntrustedRoot { .. } => {
                "RootNotTrusted"
            }
            _ => "IssuanceFailed",
        }
    }

    /// The signer's `Retry-After`, if it answered busy (see [`ClientError::retry_after`]).
    pub fn retry_after(&self, max: Duration) -> Option<Duration> {
        match self {
            AgentError::Client(e) => e.retry_after(max),
            _ => None,
        }
    }
}

/// Picks the key type: the requested one if the policy accepts it, else the most
/// preferred accepted type.
pub fn choose_key_type(
    accepted: &[String],
    requested: Option<KeyType>,
    virtual_mesh: &str,
) -> Result<KeyType, AgentError> {
    let accepts = |k: &KeyType| accepted.iter().any(|a| a == k.name());
    match requested {
        Some(k) if accepts(&k) => Ok(k),
        Some(k) => Err(AgentError::KeyTypeRefused {
            requested: k,
            virtual_mesh: virtual_mesh.to_string(),
            accepted: accepted.join(", "),
        }),
        None => PREFERENCE
            .into_iter()
            .find(accepts)
            .ok_or_else(|| AgentError::NoKeyType(virtual_mesh.to_string())),
    }
}

/// Whether a renewal asked for now would be accepted, as far as the policy tells: the
/// mesh granted to this client, the key type accepted, the ttl within the maximum. A pass
/// that signs nothing checks it, so a change on either side that would have the renewal
/// refused is found now rather than when the renewal is due.
pub fn check_renewable(
    policy: &PublicPolicy,
    mesh: &ObjectRef,
    key_type: Option<KeyType>,
    ttl_seconds: Option<u64>,
) -> Result<(), AgentError> {
    policy.check_authorized(mesh)?;
    choose_key_type(&policy.accepted_key_types, key_type, &policy.virtual_mesh)?;
    match ttl_seconds {
        Some(ttl_seconds) if ttl_seconds > policy.max_ttl_seconds => Err(AgentError::TtlRefused {
            ttl_seconds,
            virtual_mesh: policy.virtual_mesh.clone(),
            max_ttl_seconds: policy.max_ttl_seconds,
        }),
        _ => Ok(()),
    }
}

/// What `meshca request` needs.
pub struct RequestOptions {
    pub virtual_mesh: ObjectRef,
    pub mesh: ObjectRef,
    pub key_type: Option<KeyType>,
    pub ttl_seconds: Option<u64>,
    pub out_dir: PathBuf,
    /// Replace files another tool wrote there (their roots kept).
    pub adopt: bool,
    /// The roots accepted from the signer (`--accept-root`).
    pub pin: RootPin,
}

/// What was installed.
pub struct RequestOutcome {
    pub key_type: KeyType,
    pub summary: BundleSummary,
}

/// How root-cert.pem of a new bundle is built.
#[derive(Debug, Clone, Default)]
pub enum RootsPlan {
    /// The signer's roots only: its rootCert and the roots it announces (`meshca
    /// request`).
    #[default]
    SignerOnly,
    /// The signer's roots first, then the still-wanted roots of the installed
    /// root-cert.pem (see [`rotation::compose_root_cert`]).
    Merge {
        installed: Option<String>,
        retired: Vec<String>,
    },
}

/// What to ask the signer for.
#[derive(Debug, Clone)]
pub struct BundleRequest {
    pub virtual_mesh: ObjectRef,
    pub mesh: ObjectRef,
    pub key_type: Option<KeyType>,
    pub ttl_seconds: Option<u64>,
    pub roots: RootsPlan,
    /// The roots accepted from the signer: checked before it is asked, and on its answer.
    pub pin: RootPin,
    /// The roots the cluster trusts already (what judges the signer's without a pin).
    pub trusted: TrustedRoots,
}

/// A new bundle, checked as istiod would, not yet written anywhere.
#[derive(Debug)]
pub struct Obtained {
    pub files: BundleFiles,
    pub key_type: KeyType,
    pub summary: BundleSummary,
    /// What the root-cert.pem being replaced held that the new one does not: logged once
    /// the bundle is written ([`log_roots_left_out`]).
    pub roots_left_out: Vec<rotation::RootLeftOut>,
}

/// Generate key, CSR, sign, verify: one intermediate in memory (the key leaves this
/// process only when the caller writes the bundle).
pub async fn obtain_bundle(
    client: &SignerClient,
    policy: &PublicPolicy,
    request: &BundleRequest,
) -> Result<Obtained, AgentError> {
    check_signer_root(policy, &request.pin, &request.trusted)?;
    let key_type = choose_key_type(
        &policy.accepted_key_types,
        request.key_type,
        &policy.virtual_mesh,
    )?;
    // RSA generation takes a while: keep it off the async workers.
    let key = tokio::task::spawn_blocking(move || PrivateKey::generate(key_type))
        .await
        .map_err(|e| AgentError::Csr(e.to_string()))??;
    let subject = subject_name(&policy.org_name, &request.mesh.name)
        .map_err(|e| AgentError::Csr(e.to_string()))?;
    let csr = build_csr(&key, subject)
        .map_err(|e| AgentError::Csr(e.to_string()))?
        .to_pem(der::pem::LineEnding::LF)
        .map_err(|e| AgentError::Csr(e.to_string()))?;
    let response = client
        .sign(&SignRequestBody {
            virtual_mesh: request.virtual_mesh.to_string(),
            mesh: request.mesh.to_string(),
            csr,
            ttl_seconds: request.ttl_seconds,
        })
        .await?;
    let now = SystemTime::now();
    let (installed, retired): (Option<&str>, &[String]) = match &request.roots {
        RootsPlan::SignerOnly => (None, &[]),
        RootsPlan::Merge { installed, retired } => (installed.as_deref(), retired),
    };
    if let Some(installed) = installed {
        let (_, unreadable) = crate::pki::pem::decode_readable_certificates(installed);
        if unreadable > 0 {
            tracing::warn!(
                unreadable,
                "the root-cert.pem being replaced has PEM blocks that are not certificates meshca can read: they are left out, the roots beside them kept"
            );
        }
    }
    let root_cert = rotation::root_cert_to_write(
        &response.root_cert,
        &policy.announced_roots(),
        installed,
        retired,
        now,
    );
    let roots_left_out = installed
        .map(|installed| rotation::roots_left_out(installed, &root_cert, retired, now))
        .unwrap_or_default();
    let files = BundleFiles {
        ca_cert: response.certificate,
        ca_key: key.to_pkcs8_pem()?.to_string(),
        cert_chain: response.cert_chain,
        root_cert,
    };
    let summary = match verify_bundle(&files, None, now) {
        Ok(summary) => summary,
        Err(e) => {
            return Err(match (ClockAhead::of_fresh(&files, now), e) {
                (Some(ahead), _) => ahead.error(now, true),
                (
                    None,
                    BundleError::NotYetValid {
                        which, not_before, ..
                    },
                ) => AgentError::ClockBehind {
                    which,
                    not_before,
                    now,
                    just_issued: true,
                },
                (None, e) => e.just_issued().into(),
            });
        }
    };
    if let Some(announced) = &policy.root_fingerprint_sha256
        && !announced.eq_ignore_ascii_case(&summary.anchor_fingerprint)
    {
        return Err(AgentError::RootMismatch(format!(
            "policy names root sha256 {announced}, the chain ends at {}",
            summary.anchor_fingerprint
        )));
    }
    check_answer_roots(
        &summary.anchor_fingerprint,
        &response.root_cert,
        &request.pin,
        &request.trusted,
        policy.root_fingerprint_sha256.as_deref(),
    )?;
    Ok(Obtained {
        files,
        key_type,
        summary,
        roots_left_out,
    })
}

/// Names each certificate the root-cert.pem in place held and the one just written leaves
/// out ([`rotation::roots_left_out`]): the cluster no longer trusts it.
pub(crate) fn log_roots_left_out(left_out: &[rotation::RootLeftOut]) {
    const LEFT_OUT: &str = "a certificate of the root-cert.pem replaced is left out of the new one: the cluster no longer trusts it";
    for left in left_out {
        if left.why == rotation::RETIRED {
            tracing::info!(subject = %left.subject, sha256 = %left.fingerprint, why = left.why, "{LEFT_OUT}");
        } else {
            tracing::warn!(subject = %left.subject, sha256 = %left.fingerprint, why = left.why, "{LEFT_OUT}");
        }
    }
}

/// Whether an intermediate just installed is already past its renewal time by this clock
/// (and does not end with the signer's root, which holds it): this clock is ahead of the
/// signer's by more than the renewal margin, so every intermediate issued would be due on
/// arrival. Said in a warning; the caller looks again a resync away, not at the renewal
/// time, lest one be issued every second.
pub(crate) fn due_on_arrival(
    whose: &str,
    summary: &BundleSummary,
    renew_at: SystemTime,
    ends_with_root: Option<bool>,
    now: SystemTime,
    resync: Duration,
) -> bool {
    if now < renew_at || ends_with_root == Some(true) {
        return false;
    }
    let rfc = crate::signer::audit::rfc3339;
    tracing::warn!(
        request = whose,
        serial = %summary.serial,
        renew_at = %rfc(renew_at),
        now = %rfc(now),
        resync_seconds = resync.as_secs(),
        "the intermediate just installed is already past its renewal time by this machine's clock: this clock is likely ahead of the signer's (by more than the renewal margin); renewing now would get another one due on arrival, so the next look is a resync away; fix time synchronisation"
    );
    true
}

/// [`cacerts::check_writable`]: before the signer is asked for a bundle for `dir`.
fn check_dir_writable(dir: &std::path::Path) -> Result<(), AgentError> {
    cacerts::check_writable(dir).map_err(|e| AgentError::NotWritable {
        dir: dir.display().to_string(),
        message: e.to_string(),
    })
}

/// Fetch policy, generate key, CSR, sign, verify, install: one intermediate.
pub async fn request_intermediate(
    client: &SignerClient,
    opts: &RequestOptions,
) -> Result<RequestOutcome, AgentError> {
    // What is there decides, as for the directory agent: another tool's files only with
    // adopt, and the roots in place stay trusted beside the signer's.
    let classified = directory::classify(&opts.out_dir)?;
    let trusted = TrustedRoots::of(&classified, &[]);
    let installed = match classified {
        Installed::Shadowed { what } => return Err(AgentError::Shadowed(what)),
        Installed::Foreign { what, .. } if !opts.adopt => return Err(AgentError::Foreign(what)),
        Installed::None => None,
        Installed::Foreign { root_cert, .. } | Installed::Unreadable { root_cert, .. } => root_cert,
        Installed::Ours(files) => Some(files.root_cert),
    };
    check_dir_writable(&opts.out_dir)?;
    let mut policy = client.policy(&opts.virtual_mesh).await?;
    take_announced_roots(&mut policy, &opts.pin, &trusted);
    let obtained = obtain_bundle(
        client,
        &policy,
        &BundleRequest {
            virtual_mesh: opts.virtual_mesh.clone(),
            mesh: opts.mesh.clone(),
            key_type: opts.key_type,
            ttl_seconds: opts.ttl_seconds,
            roots: RootsPlan::Merge {
                installed,
                retired: Vec::new(),
            },
            pin: opts.pin.clone(),
            trusted,
        },
    )
    .await?;
    cacerts::write_bundle(&opts.out_dir, &obtained.files).map_err(|e| AgentError::Write {
        dir: opts.out_dir.display().to_string(),
        message: e.to_string(),
    })?;
    log_roots_left_out(&obtained.roots_left_out);
    Ok(RequestOutcome {
        key_type: obtained.key_type,
        summary: obtained.summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_the_policy_would_refuse_is_named_before_it_is_due() {
        let policy: PublicPolicy = serde_json::from_value(serde_json::json!({
            "virtualMesh": "test/vm", "orgName": "acme", "maxTtlSeconds": 86_400,
            "minRsaBits": 3072, "acceptedKeyTypes": ["rsa3072", "ecdsa-p256"],
            "meshes": ["test/a", "test/b"], "rootNotAfter": "2030-01-01T00:00:00Z",
            "authorizedMeshes": ["test/a"]
        }))
        .unwrap();
        let a: ObjectRef = "test/a".parse().unwrap();
        let b: ObjectRef = "test/b".parse().unwrap();
        assert!(check_renewable(&policy, &a, None, None).is_ok());
        assert!(check_renewable(&policy, &a, Some(KeyType::Rsa3072), Some(86_400)).is_ok());
        for (mesh, key_type, ttl, needle) in [
            (&b, None, None, "ask for mesh test/b"),
            (
                &a,
                Some(KeyType::Rsa2048),
                None,
                "key type rsa2048 is not accepted",
            ),
            (&a, None, Some(86_401), "a ttl of 86401 s exceeds"),
        ] {
            let refused = check_renewable(&policy, mesh, key_type, ttl).unwrap_err();
            assert!(refused.to_string().contains(needle), "{refused}");
        }
    }

    #[test]
    fn key_type_choice_follows_policy() {
        let accepted: Vec<String> = vec!["rsa4096".into(), "ecdsa-p384".into()];
        assert_eq!(
            choose_key_type(&accepted, None, "vm").unwrap(),
            KeyType::EcdsaP384
        );
        assert_eq!(
            choose_key_type(&accepted, Some(KeyType::Rsa4096), "vm").unwrap(),
            KeyType::Rsa4096
        );
        let err = choose_key_type(&accepted, Some(KeyType::EcdsaP256), "ns/vm").unwrap_err();
        assert!(
            err.to_string().contains("ecdsa-p256")
                && err.to_string().contains("rsa4096, ecdsa-p384")
        );
        assert!(choose_key_type(&[], None, "vm").is_err());
    }

    /// A signer's public policy whose root is `root` (`rootFingerprintSha256`).
    fn policy_under_root(root: Option<&str>) -> PublicPolicy {
        serde_json::from_value(serde_json::json!({
            "virtualMesh": "test/vm", "orgName": "acme", "maxTtlSeconds": 86_400,
            "minRsaBits": 3072, "acceptedKeyTypes": ["ecdsa-p256"],
            "meshes": ["test/a"], "rootNotAfter": "2030-01-01T00:00:00Z",
            "rootFingerprintSha256": root
        }))
        .unwrap()
    }

    /// With a pin, the signer's root must be listed (in any form) before it is asked to
    /// sign; a policy naming no root cannot be checked, so it is refused too.
    #[test]
    fn a_signer_root_the_pin_does_not_list_is_refused_before_signing() {
        let root = "5f35e0c1d0e4b1a9c0ffee00112233445566778899aabbccddeeff0011223344";
        let policy = policy_under_root;
        let upper = root.to_ascii_uppercase();
        let pin = RootPin::new(&[upper], "--accept-root");
        let first_use = TrustedRoots::default();
        assert!(check_signer_root(&policy(Some(root)), &pin, &first_use).is_ok());
        // Without a pin and nothing installed, any root (and none) passes: trust on first
        // use.
        for named in [Some("ab".repeat(32)), None] {
            assert!(
                check_signer_root(&policy(named.as_deref()), &RootPin::default(), &first_use)
                    .is_ok()
            );
        }
        let other = "ab".repeat(32);
        let refused = check_signer_root(&policy(Some(&other)), &pin, &first_use).unwrap_err();
        assert_eq!(refused.reason(), "RootNotAccepted");
        let message = refused.to_string();
        assert!(
            message.starts_with(&format!(
                "the signer's root sha256 {other} is not among the roots this agent accepts (--accept-root): nothing was asked of the signer; if this root change is yours, add it to --accept-root"
            )),
            "{message}"
        );
        let message = check_signer_root(&policy(None), &pin, &first_use)
            .unwrap_err()
            .to_string();
        assert!(message.contains("names no root"), "{message}");
    }

    /// Without a pin, a signer whose root is not in the installed root-cert.pem is asked
    /// nothing (`RootNotTrusted`); one whose root is there (in any form) is; a retired
    /// root no longer counts.
    #[test]
    fn without_a_pin_a_signer_root_the_cluster_does_not_trust_is_refused_before_signing() {
        use crate::pki::testing::software_root;
        let day = std::time::Duration::from_secs(86_400);
        let (_key, installed) = software_root(KeyType::EcdsaP256, "acme", 400 * day);
        let (_key, other) = software_root(KeyType::EcdsaP256, "acme", 400 * day);
        let policy = policy_under_root;
        let unpinned = RootPin::new(&[], "--accept-root");
        let trusted = TrustedRoots::installed(Some(&installed.pem), &[]);
        let ours = installed.fingerprint_sha256.to_ascii_uppercase();
        assert!(check_signer_root(&policy(Some(&ours)), &unpinned, &trusted).is_ok());
        let refused = check_signer_root(
            &policy(Some(&other.fingerprint_sha256)),
            &unpinned,
            &trusted,
        )
        .unwrap_err();
        assert_eq!(refused.reason(), "RootNotTrusted");
        let message = refused.to_string();
        assert!(
            message.starts_with(&format!(
                "the signer's root sha256 {} is not in root-cert.pem and was never announced cross-signed by a root this cluster trusts: nothing was asked of the signer; if this root change is yours, announce it first (README: Changing the root) or add it to --accept-root",
                other.fingerprint_sha256
            )),
            "{message}"
        );
        assert!(check_signer_root(&policy(None), &unpinned, &trusted).is_err());
        // A retired root is no longer trusted: a signer still under it is not followed.
        let retired = TrustedRoots::installed(
            Some(&format!("{}{}", installed.pem, other.pem)),
            std::slice::from_ref(&installed.fingerprint_sha256),
        );
        assert!(check_signer_root(&policy(Some(&ours)), &unpinned, &retired).is_err());
        assert!(
            check_signer_root(
                &policy(Some(&other.fingerprint_sha256)),
                &unpinned,
                &retired
            )
            .is_ok()
        );
        // A pin decides alone: a listed root needs nothing installed.
        let pin = RootPin::new(std::slice::from_ref(&other.fingerprint_sha256), "x");
        assert!(
            check_signer_root(&policy(Some(&other.fingerprint_sha256)), &pin, &trusted).is_ok()
        );
        assert_eq!(
            check_signer_root(&policy(Some(&ours)), &pin, &trusted)
                .unwrap_err()
                .reason(),
            "RootNotAccepted"
        );
    }

    /// After signing: an answer chaining to a root not listed, or carrying one beside
    /// it, is refused (its policy named an accepted root, or it would not have been asked).
    #[test]
    fn an_answer_under_or_carrying_a_root_the_pin_does_not_list_is_refused() {
        use crate::pki::testing::software_root;
        let day = std::time::Duration::from_secs(86_400);
        let (_key, accepted) = software_root(KeyType::EcdsaP256, "acme", 400 * day);
        let (_key, planted) = software_root(KeyType::EcdsaP256, "acme", 400 * day);
        let pin = RootPin::new(std::slice::from_ref(&accepted.fingerprint_sha256), "x");
        let ours = &accepted.fingerprint_sha256;
        let first_use = TrustedRoots::default();
        let check = |anchor: &str, root_cert: &str, pin: &RootPin, trusted: &TrustedRoots| {
            check_answer_roots(anchor, root_cert, pin, trusted, Some(ours))
        };
        assert!(check(ours, &accepted.pem, &pin, &first_use).is_ok());
        let both = format!("{}{}", accepted.pem, planted.pem);
        for (anchor, root_cert) in [(&planted.fingerprint_sha256, &planted.pem), (ours, &both)] {
            match check(anchor, root_cert, &pin, &first_use) {
                Err(AgentError::IssuedUnderUnacceptedRoot { root, .. }) => {
                    assert_eq!(root, planted.fingerprint_sha256)
                }
                other => panic!("{other:?}"),
            }
        }
        // Without a pin: at first use, only the signer's root; after, only roots the
        // installed root-cert.pem holds.
        let unpinned = RootPin::default();
        assert!(check(ours, &accepted.pem, &unpinned, &first_use).is_ok());
        let trusted = TrustedRoots::installed(Some(&accepted.pem), &[]);
        assert!(check(ours, &accepted.pem, &unpinned, &trusted).is_ok());
        for (anchor, root_cert, trusted) in [
            (ours, both.as_str(), &first_use),
            (ours, both.as_str(), &trusted),
            (&planted.fingerprint_sha256, planted.pem.as_str(), &trusted),
        ] {
            match check(anchor, root_cert, &unpinned, trusted) {
                Err(e @ AgentError::IssuedUnderUntrustedRoot { .. }) => {
                    assert_eq!(e.reason(), "RootNotTrusted");
                    assert!(e.to_string().contains(&planted.fingerprint_sha256), "{e}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
