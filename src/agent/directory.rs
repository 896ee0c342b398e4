//! The directory target (`meshca agent --target-dir DIR`): istiod outside Kubernetes
//! reads `/etc/cacerts`. Same decisions as the cluster agent ([`super::rotation`]), the
//! bundle written with the atomic `..data` layout of [`super::cacerts`].
//!
//! A directory is meshca's when its `..data` is a symlink (what [`super::cacerts`] writes);
//! plain files put there by someone else are foreign and replaced only with `--adopt`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::client::{PublicPolicy, SignerClient, SignerContact, SignerEndpoint};
use super::metrics::{AgentMetrics, Reconciled};
use super::rotation::{
    Decision, Desired, Installed, IssueReason, RENEWAL_HELD_BY_ROOT, RootPin, RotationSettings,
    TLS_SIGNING_CERT, TrustedRoots, decide, ends_with_known_root, renewal_held_by_root,
};
use super::timing::{
    backoff, log_seconds, random_draw, spread, spread_randomly, wait_after_failure,
};
use super::{
    AgentError, BundleRequest, ClockAhead, RootsPlan, cacerts, check_dir_writable, check_renewable,
    check_signer_root, choose_key_type, obtain_bundle, take_announced_roots,
};
use crate::pki::bundle::{
    BundleError, BundleFiles, BundleSummary, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, verify_bundle,
    verify_once_valid,
};
use crate::pki::keys::KeyType;
use crate::policy::ObjectRef;

/// What one directory agent manages.
#[derive(Debug, Clone)]
pub struct DirOptions {
    pub target: PathBuf,
    pub virtual_mesh: ObjectRef,
    pub mesh: ObjectRef,
    pub key_type: Option<KeyType>,
    pub ttl_seconds: Option<u64>,
    pub adopt: bool,
    pub rotation: RotationSettings,
    pub retired_roots: Vec<String>,
    /// The roots accepted from the signer (`--accept-root`; empty: any).
    pub pin: RootPin,
}

/// What a reconcile did.
#[derive(Debug)]
pub enum DirOutcome {
    Installed {
        reason: IssueReason,
        summary: BundleSummary,
        renew_at: SystemTime,
        /// root-cert.pem is not the bytes it was (or there was none): istiod takes the
        /// new files only when it starts.
        roots_changed: bool,
        /// The files replaced held no CA istiod could sign with (meshca's with one
        /// missing, say; another tool's without ca-key.pem): an istiod started meanwhile
        /// runs on its self-signed CA until it starts again.
        replaced_unusable: bool,
        /// See [`DirOutcome::ends_with_root`].
        ends_with_root: Option<bool>,
    },
    RootsRewritten {
        summary: BundleSummary,
        renew_at: SystemTime,
        ends_with_root: Option<bool>,
    },
    UpToDate {
        summary: BundleSummary,
        renew_at: SystemTime,
        /// The error, when the signer was unavailable (no answer, or a failure on its
        /// side): the bundle was judged on its own.
        signer_error: Option<String>,
        /// Past its renewal time, but it ends with the signer's root, so it is kept.
        held_by_root: bool,
        ends_with_root: Option<bool>,
    },
}

impl DirOutcome {
    /// Whether root-cert.pem is new bytes: istiod must start again to take the files.
    pub fn roots_changed(&self) -> bool {
        match self {
            DirOutcome::Installed { roots_changed, .. } => *roots_changed,
            DirOutcome::RootsRewritten { .. } => true,
            DirOutcome::UpToDate { .. } => false,
        }
    }

    /// Why istiod must start again to use what was written, if it must (root-cert.pem
    /// changed, or the files replaced held no CA it could sign with), and how that comes to
    /// be.
    pub fn istiod_restart(&self) -> Option<(&'static str, &'static str)> {
        match self {
            _ if self.roots_changed() => Some((
                "root-cert.pem changed",
                "it takes a changed root-cert.pem, and the intermediate with it, only when it starts",
            )),
            DirOutcome::Installed {
                replaced_unusable: true,
                ..
            } => Some((
                "the files replaced held no CA istiod could sign with",
                "one started meanwhile found no usable ca-key.pem and runs on its self-signed CA until it starts again",
            )),
            _ => None,
        }
    }

    pub fn renew_at(&self) -> SystemTime {
        match self {
            DirOutcome::Installed { renew_at, .. }
            | DirOutcome::RootsRewritten { renew_at, .. }
            | DirOutcome::UpToDate { renew_at, .. } => *renew_at,
        }
    }

    /// Whether the intermediate in place ends with the signer's root (a renewal could not
    /// end later); None when the signer's root was not learnt (the signer unavailable).
    pub fn ends_with_root(&self) -> Option<bool> {
        match self {
            DirOutcome::Installed { ends_with_root, .. }
            | DirOutcome::RootsRewritten { ends_with_root, .. }
            | DirOutcome::UpToDate { ends_with_root, .. } => *ends_with_root,
        }
    }

    /// Past its renewal time but kept, as it ends with the signer's root.
    pub fn held_by_root(&self) -> bool {
        matches!(
            self,
            DirOutcome::UpToDate {
                held_by_root: true,
                ..
            }
        )
    }

    /// `agent --once --output json`'s `result`.
    pub fn result(&self) -> &'static str {
        match self {
            DirOutcome::Installed { .. } => "installed",
            DirOutcome::RootsRewritten { .. } => "roots_rewritten",
            DirOutcome::UpToDate {
                signer_error: Some(_),
                ..
            } => "signer_unavailable",
            DirOutcome::UpToDate {
                held_by_root: true, ..
            } => "held_by_root",
            DirOutcome::UpToDate { .. } => "nothing_due",
        }
    }

    /// What the pass did, in a few words (`agent --once`'s first line and the loop's log
    /// line when the signer answered).
    pub fn what(&self) -> String {
        let rfc = crate::signer::audit::rfc3339;
        match self {
            DirOutcome::Installed { reason, .. } => {
                format!("installed a new intermediate ({reason})")
            }
            DirOutcome::RootsRewritten { .. } => "rewrote root-cert.pem".into(),
            DirOutcome::UpToDate {
                held_by_root: true,
                summary,
                ..
            } => format!(
                "renewal time reached, but held: the intermediate ends with the signer's root, at {} (a new one could not end later); nothing written; change the root before then",
                rfc(summary.not_after)
            ),
            DirOutcome::UpToDate { .. } => "bundle valid and not due; nothing written".into(),
        }
    }

    pub fn summary(&self) -> &BundleSummary {
        match self {
            DirOutcome::Installed { summary, .. }
            | DirOutcome::RootsRewritten { summary, .. }
            | DirOutcome::UpToDate { summary, .. } => summary,
        }
    }
}

/// What an agent carries from one pass to the next (the directory agent's, and the
/// Kubernetes agent's for each request).
#[derive(Debug, Default)]
pub struct PassMemory {
    /// The signer's last intermediate was refused because this clock disagreed with the
    /// signer's: the same installed state would have the root sign one for nothing at each
    /// retry. One at a time: the signer is asked again only once it is forgotten.
    refusal: Option<ClockRefusal>,
}

/// Why the signer's last intermediate was refused, and when (`since`, on the monotonic
/// clock).
#[derive(Debug)]
enum ClockRefusal {
    /// This clock read past its notAfter.
    Ahead { ahead: ClockAhead, since: Instant },
    /// This clock read before its notBefore (`which` of it).
    Behind {
        which: String,
        not_before: SystemTime,
        since: Instant,
    },
}

impl PassMemory {
    /// How long ago the refusal was remembered (zero without one), on the monotonic clock:
    /// [`PassMemory::check_clock`]'s and [`PassMemory::check_clock_behind`]'s `elapsed`.
    fn since_refusal(&self) -> Duration {
        match &self.refusal {
            Some(ClockRefusal::Ahead { since, .. } | ClockRefusal::Behind { since, .. }) => {
                since.elapsed()
            }
            None => Duration::ZERO,
        }
    }

    /// Before asking the signer for an intermediate: refused while this clock still reads
    /// ahead of the signer's, or behind it (as the system clock reads `now`), forgotten
    /// once it agrees.
    pub(crate) fn check_clock_at(&mut self, now: SystemTime) -> Result<(), AgentError> {
        let elapsed = self.since_refusal();
        self.check_clock(now, elapsed)?;
        self.check_clock_behind(now, elapsed)
    }

    /// Refused while this clock still reads before the notBefore of the intermediate the
    /// signer issued `elapsed` ago (the signer's clock read at least that notBefore then,
    /// so at least notBefore + `elapsed` now): one issued now would be refused too.
    fn check_clock_behind(&mut self, now: SystemTime, elapsed: Duration) -> Result<(), AgentError> {
        if let Some(ClockRefusal::Behind {
            which, not_before, ..
        }) = &self.refusal
        {
            if now < *not_before + elapsed {
                return Err(AgentError::ClockBehind {
                    which: which.clone(),
                    not_before: *not_before,
                    now,
                    just_issued: false,
                });
            }
            self.refusal = None;
        }
        Ok(())
    }

    fn check_clock(&mut self, now: SystemTime, elapsed: Duration) -> Result<(), AgentError> {
        if let Some(ClockRefusal::Ahead { ahead, .. }) = &self.refusal {
            if ahead.still_ahead(now, elapsed) {
                return Err(ahead.error(now, false));
            }
            self.refusal = None;
        }
        Ok(())
    }

    /// After a failed request: a clock refusal replaces whatever was remembered (the
    /// request was made only once nothing was), other errors leave it as it is.
    pub(crate) fn remember(&mut self, error: &AgentError) {
        let since = Instant::now();
        match error {
            AgentError::ClockAhead { ahead, .. } => {
                self.refusal = Some(ClockRefusal::Ahead {
                    ahead: *ahead,
                    since,
                });
            }
            AgentError::ClockBehind {
                which, not_before, ..
            } => {
                self.refusal = Some(ClockRefusal::Behind {
                    which: which.clone(),
                    not_before: *not_before,
                    since,
                });
            }
            _ => {}
        }
    }
}

/// Classifies what `dir` holds (see the module docs). Only a name that does not exist is
/// absent: one the agent cannot look at (permissions, I/O, a file where a directory should
/// be) fails the pass by name, before the signer is asked for a bundle that could not be
/// written anyway.
pub fn classify(dir: &Path) -> Result<Installed, AgentError> {
    let cannot_look = |path: &Path, e: std::io::Error| AgentError::Look {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let look = |path: &Path| match std::fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(cannot_look(path, e)),
    };
    let is_ours = look(&dir.join("..data"))?.is_some_and(|m| m.file_type().is_symlink());
    if look(&dir.join(TLS_SIGNING_CERT))?.is_some() {
        return Ok(Installed::Shadowed {
            what: dir.display().to_string(),
        });
    }
    let mut present = Vec::new();
    for name in [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT] {
        if look(&dir.join(name))?.is_some() {
            present.push(name);
        }
    }
    let any_file = !present.is_empty();
    let plugged = present.contains(&CA_CERT) && present.contains(&CA_KEY);
    let root_path = dir.join(ROOT_CERT);
    // A missing or garbled root-cert.pem is part of what is found (damaged, or foreign
    // roots to keep when there are any); one that cannot be read is not.
    let root_cert = match cacerts::read_file(&root_path) {
        Ok(text) => Some(text),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidData) => None,
        Err(e) => return Err(cannot_look(&root_path, e)),
    };
    if !is_ours {
        return Ok(if any_file {
            Installed::Foreign {
                what: format!("{} (files not written by meshca)", dir.display()),
                root_cert,
                plugged,
            }
        } else {
            Installed::None
        });
    }
    Ok(match cacerts::read_bundle(dir) {
        Ok(files) => Installed::Ours(files),
        Err(e) if is_damage(&e) => Installed::Unreadable {
            problem: e.to_string(),
            root_cert,
        },
        Err(e) => return Err(cannot_look(dir, e)),
    })
}

/// Whether a file of meshca's bundle that cannot be read is damaged (missing, not text,
/// not a regular file), which a new bundle repairs. One the agent may not read (its owner
/// or mode changed for istiod) or an I/O error is not: a new bundle would replace a valid
/// one, and be as unreadable.
fn is_damage(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NotFound | ErrorKind::InvalidData | ErrorKind::InvalidInput
    )
}

/// Takes away what a write killed before its swap left (a version directory whose key
/// was signed and never installed), at every pass, and says so: the audit log shows that
/// intermediate issued to this cluster, and this line says it was never in force.
fn remove_leftovers(dir: &Path) {
    match cacerts::clean_up_leftovers(dir) {
        Ok(removed) => {
            for path in removed {
                tracing::warn!(removed = %path.display(), "a write cut short (the process killed before its swap) had left this version directory: its intermediate was never installed, and its key is now deleted");
            }
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot look for what a write cut short left behind")
        }
    }
}

fn write(dir: &Path, files: &BundleFiles) -> Result<(), AgentError> {
    cacerts::write_bundle(dir, files).map_err(|e| AgentError::Write {
        dir: dir.display().to_string(),
        message: e.to_string(),
    })
}

/// One pass: look, decide, act. A valid, not-due bundle is not touched (not even
/// rewritten with the same bytes); every failure leaves the directory as it was.
pub async fn reconcile(
    client: &SignerClient,
    opts: &DirOptions,
    memory: &mut PassMemory,
    now: SystemTime,
) -> Result<DirOutcome, AgentError> {
    remove_leftovers(&opts.target);
    let installed = classify(&opts.target)?;
    let trusted = TrustedRoots::of(&installed, &opts.retired_roots);
    // The policy tells the signer's current root; without it (signer unavailable) a valid
    // bundle is still judged on its own.
    let mut policy = client.policy_for_pass(&opts.virtual_mesh).await?;
    if let Ok(policy) = &mut policy {
        take_announced_roots(policy, &opts.pin, &trusted);
    }
    let (signer_root, signer_announced) = PublicPolicy::signer_roots(policy.as_ref().ok());
    let desired = Desired {
        mesh_name: opts.mesh.name.clone(),
        key_type: opts.key_type,
        accepted_key_types: policy
            .as_ref()
            .ok()
            .map(|policy| policy.accepted_key_types.clone()),
        adopt: opts.adopt,
        signer_root,
        signer_root_not_after: PublicPolicy::root_end(policy.as_ref().ok()),
        signer_announced,
        retired_roots: opts.retired_roots.clone(),
        rotation: opts.rotation,
    };
    match decide(&installed, &desired, now) {
        Decision::Refuse { what } => Err(AgentError::Foreign(what)),
        Decision::Shadowed { what } => Err(AgentError::Shadowed(what)),
        Decision::UpToDate { summary, renew_at } => {
            if let Ok(policy) = &policy {
                check_renewable(policy, &opts.mesh, opts.key_type, opts.ttl_seconds)?;
                // A renewal would be refused by the pin too: say so now, not when due.
                check_signer_root(policy, &opts.pin, &trusted)?;
            }
            let held_by_root = renewal_held_by_root(&summary, &desired, now);
            if held_by_root {
                tracing::warn!(dir = %opts.target.display(), not_after = %crate::signer::audit::rfc3339(summary.not_after), "{RENEWAL_HELD_BY_ROOT}");
            }
            Ok(DirOutcome::UpToDate {
                ends_with_root: ends_with_known_root(&summary, &desired),
                summary,
                renew_at,
                signer_error: policy.err().map(|e| e.to_string()),
                held_by_root,
            })
        }
        Decision::RewriteRoots {
            root_cert,
            summary,
            renew_at,
        } => {
            let Installed::Ours(mut files) = installed else {
                return Err(AgentError::Csr("rewrite without a bundle".into()));
            };
            let replaced = std::mem::replace(&mut files.root_cert, root_cert);
            write(&opts.target, &files)?;
            super::log_roots_left_out(&super::rotation::roots_left_out(
                &replaced,
                &files.root_cert,
                &opts.retired_roots,
                now,
            ));
            Ok(DirOutcome::RootsRewritten {
                ends_with_root: ends_with_known_root(&summary, &desired),
                summary,
                renew_at,
            })
        }
        Decision::Issue {
            reason,
            previous_roots,
        } => {
            // An intermediate the directory could not take would be signed (and audited)
            // for nothing at each retry.
            check_dir_writable(&opts.target)?;
            // So would one this clock finds already expired, as the last one was.
            memory.check_clock_at(now)?;
            let policy = policy?;
            // A key type the policy refuses fails here, before anything says a new
            // intermediate is being requested.
            let key_type = choose_key_type(
                &policy.accepted_key_types,
                opts.key_type,
                &policy.virtual_mesh,
            )?;
            check_signer_root(&policy, &opts.pin, &trusted)?;
            tracing::info!(reason = %reason, dir = %opts.target.display(), "requesting a new intermediate");
            let obtained = obtain_bundle(
                client,
                &policy,
                &BundleRequest {
                    virtual_mesh: opts.virtual_mesh.clone(),
                    mesh: opts.mesh.clone(),
                    key_type: Some(key_type),
                    ttl_seconds: opts.ttl_seconds,
                    roots: RootsPlan::Merge {
                        installed: previous_roots,
                        retired: opts.retired_roots.clone(),
                    },
                    pin: opts.pin.clone(),
                    trusted,
                },
            )
            .await
            .inspect_err(|e| memory.remember(e))?;
            write(&opts.target, &obtained.files)?;
            super::log_roots_left_out(&obtained.roots_left_out);
            let roots_changed = match &installed {
                Installed::Ours(files) => files.root_cert != obtained.files.root_cert,
                Installed::Foreign { root_cert, .. } | Installed::Unreadable { root_cert, .. } => {
                    root_cert.as_deref() != Some(&obtained.files.root_cert)
                }
                Installed::None | Installed::Shadowed { .. } => true,
            };
            // istiod found no CA it could sign with there: it runs on its self-signed one.
            let replaced_unusable = matches!(
                installed,
                Installed::Unreadable { .. } | Installed::Foreign { plugged: false, .. }
            );
            let summary = obtained.summary;
            let renew_at = super::rotation::renew_at(
                summary.not_before,
                summary.not_after,
                &summary.serial,
                &opts.rotation,
            );
            Ok(DirOutcome::Installed {
                ends_with_root: ends_with_known_root(&summary, &desired),
                reason,
                summary,
                renew_at,
                roots_changed,
                replaced_unusable,
            })
        }
    }
}

/// How long to sleep after a success: until the renewal time, but at most `resync`
/// spread by `draw` (see [`spread`]; to notice a root change or a damaged directory), at
/// least one second. The renewal time is not spread: it is already spread by serial.
pub fn next_check(renew_at: SystemTime, now: SystemTime, resync: Duration, draw: u32) -> Duration {
    let most = spread(resync, draw).max(Duration::from_secs(1));
    renew_at
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .clamp(Duration::from_secs(1), most)
}

/// notAfter and renewal time of meshca's bundle in the directory, if there is one: what
/// the metrics report while reconciles fail (the signer down, say), also after a restart.
/// One that has expired is reported too (judged at its own notAfter): that is when the
/// alert on it matters most. So is one this clock finds not valid yet (judged from its
/// notBefore): a clock behind the signer's does not make the bundle in place vanish.
fn installed_times(opts: &DirOptions, now: SystemTime) -> Option<(SystemTime, SystemTime)> {
    let Ok(Installed::Ours(files)) = classify(&opts.target) else {
        return None;
    };
    let summary = match verify_bundle(&files, None, now) {
        Ok(summary) => Some(summary),
        Err(BundleError::NotYetValid { .. }) => verify_once_valid(&files, now),
        Err(_) => crate::pki::bundle::validity(CA_CERT, &files.ca_cert)
            .ok()
            .filter(|(_, not_after)| now > *not_after)
            .and_then(|(_, not_after)| verify_bundle(&files, None, not_after).ok()),
    }?;
    let renew_at = super::rotation::renew_at(
        summary.not_before,
        summary.not_after,
        &summary.serial,
        &opts.rotation,
    );
    Some((summary.not_after, renew_at))
}

/// The long-running loop: reconcile, sleep until due (or `resync`), back off on failure.
/// Returns only when `shutdown` resolves.
pub async fn run(
    signer: &SignerEndpoint,
    opts: &DirOptions,
    resync: Duration,
    metrics: &AgentMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut failures = 0u32;
    let mut memory = PassMemory::default();
    let target = opts.target.display().to_string();
    // No Lease here: this agent is the only one writing its directory.
    metrics.set_leading(true);
    metrics.set_resync(resync);
    loop {
        // Connected anew each pass: the client certificate and CA files are read as they
        // are now (rotated on disk, they are used without a restart).
        let (result, contact) = match signer.connect() {
            Ok(client) => {
                metrics.client_certificate(client.client_certificate());
                let result = reconcile(&client, opts, &mut memory, SystemTime::now()).await;
                (result, client.contact().last())
            }
            Err(e) => (Err(AgentError::from(e)), SignerContact::NotAsked),
        };
        let delay = match &result {
            Ok(outcome) => {
                failures = 0;
                let summary = outcome.summary();
                metrics.reconciled(
                    &target,
                    Reconciled {
                        outcome: "ok",
                        installed: Some((summary.not_after, outcome.renew_at())),
                        signer: contact,
                        ends_with_root: outcome.ends_with_root(),
                        restart_timed_out: None,
                    },
                );
                if matches!(outcome, DirOutcome::Installed { .. }) {
                    metrics.issued();
                }
                if outcome.roots_changed() {
                    metrics.root_cert_changed(&target, SystemTime::now());
                }
                // Logged after the metrics (as a failure is): whoever reads the line
                // finds them already telling the same.
                log_outcome(&opts.target, outcome);
                let held = matches!(
                    outcome,
                    DirOutcome::UpToDate {
                        held_by_root: true,
                        ..
                    }
                );
                let due_on_arrival = match outcome {
                    DirOutcome::Installed {
                        summary,
                        renew_at,
                        ends_with_root,
                        ..
                    } => super::due_on_arrival(
                        &opts.target.display().to_string(),
                        summary,
                        *renew_at,
                        *ends_with_root,
                        SystemTime::now(),
                        resync,
                    ),
                    _ => false,
                };
                if held || due_on_arrival {
                    // Past its renewal time and kept, or a new one would be as due: look
                    // again a resync away.
                    spread_randomly(resync).max(Duration::from_secs(1))
                } else {
                    next_check(outcome.renew_at(), SystemTime::now(), resync, random_draw())
                }
            }
            Err(e) => {
                let installed = installed_times(opts, SystemTime::now());
                metrics.reconciled(
                    &target,
                    Reconciled {
                        outcome: e.reason(),
                        installed,
                        signer: contact,
                        ends_with_root: None,
                        restart_timed_out: None,
                    },
                );
                failures += 1;
                // Spread, but never shorter than what a busy signer asked.
                let delay =
                    wait_after_failure(backoff(failures, resync), e.retry_after(resync), resync);
                tracing::error!(
                    dir = %opts.target.display(),
                    error = %e,
                    // When istiod's intermediate stops (or stopped) working.
                    installed_expires_at = %installed.map_or_else(
                        || "none (no bundle of meshca's installed)".to_string(),
                        |(not_after, _)| crate::signer::audit::rfc3339(not_after),
                    ),
                    failures,
                    retry_in_seconds = log_seconds(delay),
                    "reconcile failed; existing files left as they were, retrying"
                );
                delay
            }
        };
        metrics.pass_completed(std::slice::from_ref(&target), SystemTime::now());
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One line per outcome (and the restart istiod needs), for both `--once` and the loop.
pub fn log_outcome(dir: &Path, outcome: &DirOutcome) {
    let rfc = crate::signer::audit::rfc3339;
    if let Some((why, how)) = outcome.istiod_restart() {
        tracing::warn!(dir = %dir.display(), "{why}: restart istiod ({how})");
    }
    match outcome {
        DirOutcome::Installed {
            reason,
            summary,
            renew_at,
            ..
        } => tracing::info!(
            dir = %dir.display(),
            reason = reason.code(),
            serial = %summary.serial,
            not_after = %rfc(summary.not_after),
            renew_at = %rfc(*renew_at),
            "installed a new intermediate"
        ),
        DirOutcome::RootsRewritten {
            summary, renew_at, ..
        } => tracing::info!(
            dir = %dir.display(),
            serial = %summary.serial,
            renew_at = %rfc(*renew_at),
            "rewrote root-cert.pem"
        ),
        DirOutcome::UpToDate {
            summary,
            renew_at,
            signer_error: None,
            ..
        } => tracing::info!(
            dir = %dir.display(),
            serial = %summary.serial,
            renew_at = %rfc(*renew_at),
            "{}",
            outcome.what()
        ),
        DirOutcome::UpToDate {
            summary,
            renew_at,
            signer_error: Some(error),
            ..
        } => tracing::warn!(
            dir = %dir.display(),
            serial = %summary.serial,
            renew_at = %rfc(*renew_at),
            error = %error,
            "signer unavailable; the installed bundle is valid and not due, nothing written"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::testing::{software_bundle, software_root};

    const DAY: Duration = Duration::from_secs(86_400);

    /// A file of the bundle the agent may not read, or that an I/O error keeps from it, is
    /// not damage: the pass fails by name (before, a new bundle replaced the valid one, at
    /// every pass after an owner or mode was changed for istiod). One missing, not text or
    /// not a regular file is.
    #[test]
    fn only_damage_makes_the_bundle_in_place_unreadable() {
        use std::io::Error;
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::InvalidData,
            ErrorKind::InvalidInput,
        ] {
            assert!(is_damage(&Error::from(kind)), "{kind:?}");
        }
        for error in [
            Error::from(ErrorKind::PermissionDenied),
            Error::from_raw_os_error(libc::EIO),
            Error::from_raw_os_error(libc::EMFILE),
        ] {
            assert!(!is_damage(&error), "{error}");
        }
    }

    /// A bundle for mesh "cluster-a" valid from `issued` for `ttl`, under a 400-day root.
    fn bundle(ttl: Duration) -> (SystemTime, BundleFiles) {
        let (root_key, root) = software_root(KeyType::EcdsaP256, "acme", 400 * DAY);
        let issued = crate::pki::testing::whole_seconds(SystemTime::now());
        let files = software_bundle(
            &root_key,
            &root,
            "acme",
            "cluster-a",
            KeyType::EcdsaP256,
            issued,
            issued + ttl,
        );
        (issued, files)
    }

    fn options(target: &Path) -> DirOptions {
        DirOptions {
            target: target.to_path_buf(),
            virtual_mesh: ObjectRef {
                namespace: "test".into(),
                name: "vm".into(),
            },
            mesh: ObjectRef {
                namespace: "test".into(),
                name: "cluster-a".into(),
            },
            key_type: None,
            ttl_seconds: None,
            adopt: false,
            rotation: RotationSettings::default(),
            retired_roots: vec![],
            pin: RootPin::default(),
        }
    }

    /// While reconciles fail (the signer unreachable), also after a restart, an expired
    /// intermediate's notAfter is still exported: the critical alert keeps firing.
    #[test]
    fn an_expired_bundle_in_place_still_tells_its_times() {
        let (issued, files) = bundle(30 * DAY);
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cacerts");
        cacerts::write_bundle(&target, &files).unwrap();
        let opts = options(&target);
        let (not_after, renew_at) = installed_times(&opts, issued + 60 * DAY).unwrap();
        assert_eq!(not_after, issued + 30 * DAY);
        assert!(renew_at < not_after);
        // The same as while it was valid.
        assert_eq!(
            installed_times(&opts, issued + DAY),
            Some((not_after, renew_at))
        );
        // Not meshca's bundle (damaged): nothing to tell.
        std::fs::write(target.join("..data").join(CA_CERT), "garbled").unwrap();
        assert_eq!(installed_times(&opts, issued + 60 * DAY), None);
    }

    /// A clock behind the bundle in place (before its notBefore, set by the signer's
    /// clock): the bundle is still there and its times still told. A fresh answer this
    /// clock finds not valid yet is refused, named, and not asked for again while this
    /// clock stays behind (each request would have the root sign one for nothing).
    #[test]
    fn a_clock_behind_the_signer_keeps_the_bundles_times_and_asks_nothing_until_it_agrees() {
        let (issued, files) = bundle(30 * DAY);
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cacerts");
        cacerts::write_bundle(&target, &files).unwrap();
        let opts = options(&target);
        let behind = issued - Duration::from_secs(3600);
        let times = installed_times(&opts, behind);
        assert!(times.is_some());
        assert_eq!(times, installed_times(&opts, issued + DAY));

        let rfc = crate::signer::audit::rfc3339;
        let refused = AgentError::ClockBehind {
            which: "cert-chain.pem certificate 1".into(),
            not_before: issued,
            now: behind,
            just_issued: true,
        };
        let message = refused.to_string();
        for needle in [
            "this machine's clock is behind the signer's",
            &rfc(behind),
            &rfc(issued),
            "the signer just issued",
            "fix time synchronisation",
        ] {
            assert!(message.contains(needle), "{message}");
        }
        let mut memory = PassMemory::default();
        memory.remember(&refused);
        // The next passes (the clock still behind, running on) ask nothing.
        for (later, elapsed) in [(behind, Duration::ZERO), (behind + HOUR_HALF, HOUR_HALF)] {
            let message = memory
                .check_clock_behind(later, elapsed)
                .unwrap_err()
                .to_string();
            assert!(
                message.contains("issued at an earlier try")
                    && message.contains("nothing was asked of the signer"),
                "{message}"
            );
        }
        // The clock put right: the signer is asked again, and the refusal forgotten.
        assert!(memory.check_clock_behind(issued + DAY, DAY).is_ok());
        assert!(memory.refusal.is_none());
    }

    const HOUR_HALF: Duration = Duration::from_secs(1800);

    /// A clock past the notAfter of what the signer just issued: the error names both
    /// times, and until this clock agrees with the signer's nothing is asked again (each
    /// request would have the root sign an intermediate for nothing).
    #[test]
    fn a_clock_ahead_of_the_signer_is_named_and_asks_nothing_until_it_agrees() {
        let (issued, fresh) = bundle(Duration::from_secs(600));
        let now = issued + 365 * DAY;
        let rfc = crate::signer::audit::rfc3339;
        // What the signer's answer is checked with says so too.
        let checked = verify_bundle(&fresh, None, now)
            .unwrap_err()
            .just_issued()
            .to_string();
        assert!(
            checked.contains("clock is ahead of the signer's"),
            "{checked}"
        );

        assert_eq!(ClockAhead::of_fresh(&fresh, issued), None);
        let ahead = ClockAhead::of_fresh(&fresh, now).unwrap();
        let refused = ahead.error(now, true);
        let message = refused.to_string();
        for needle in [
            "this machine's clock is ahead of the signer's",
            &rfc(now),
            &rfc(issued + Duration::from_secs(600)),
        ] {
            assert!(message.contains(needle), "{message}");
        }

        let mut memory = PassMemory::default();
        memory.remember(&refused);
        // The next passes (the clock still ahead, running on) ask nothing.
        for (later, elapsed) in [(now, Duration::ZERO), (now + DAY, DAY)] {
            let message = memory.check_clock(later, elapsed).unwrap_err().to_string();
            assert!(
                message.contains("this machine's clock is ahead of the signer's")
                    && message.contains("nothing was asked of the signer"),
                "{message}"
            );
        }
        // The clock put right: the signer is asked again, and the refusal forgotten.
        assert!(memory.check_clock(issued + DAY, DAY).is_ok());
        assert!(memory.refusal.is_none());
        assert!(memory.check_clock(now, Duration::ZERO).is_ok());
    }

    /// One clock refusal is remembered at a time (a request, and so a refusal, comes only
    /// once none is): were a second one remembered, it would replace the first, which then
    /// neither refuses a pass nor outlives the clock put right.
    #[test]
    fn a_later_clock_refusal_replaces_the_earlier_one() {
        let now = crate::pki::testing::whole_seconds(SystemTime::now());
        let hour = 2 * HOUR_HALF;
        let ahead = ClockAhead {
            now,
            not_before: now - 2 * hour,
            not_after: now - hour,
        };
        let behind = AgentError::ClockBehind {
            which: "ca-cert.pem".into(),
            not_before: now + hour,
            now,
            just_issued: true,
        };
        let mut memory = PassMemory::default();
        memory.remember(&ahead.error(now, true));
        memory.remember(&behind);
        match memory.check_clock_at(now) {
            Err(AgentError::ClockBehind {
                just_issued: false, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // The clock put right for the later refusal: the signer is asked again.
        assert!(memory.check_clock_at(now + 2 * hour).is_ok());
        assert!(memory.refusal.is_none());
    }

    /// A renewal held because the intermediate ends with the signer's root is said as
    /// such (and when it ends), with a `result` of its own: not "not due".
    #[test]
    fn a_renewal_held_by_the_root_is_not_reported_as_not_due() {
        let (issued, files) = bundle(30 * DAY);
        let summary = verify_bundle(&files, None, issued).unwrap();
        let renew_at = issued + 20 * DAY;
        let up_to_date = |held_by_root, signer_error: Option<&str>| DirOutcome::UpToDate {
            summary: summary.clone(),
            renew_at,
            signer_error: signer_error.map(String::from),
            held_by_root,
            ends_with_root: Some(held_by_root),
        };
        let held = up_to_date(true, None);
        assert_eq!(held.result(), "held_by_root");
        assert!(held.held_by_root());
        let said = held.what();
        assert!(
            said.contains("renewal time reached, but held")
                && said.contains("ends with the signer's root")
                && said.contains(&crate::signer::audit::rfc3339(summary.not_after))
                && !said.contains("not due"),
            "{said}"
        );
        let not_due = up_to_date(false, None);
        assert_eq!(not_due.result(), "nothing_due");
        assert!(!not_due.held_by_root());
        assert_eq!(not_due.what(), "bundle valid and not due; nothing written");
        assert_eq!(
            up_to_date(false, Some("connection refused")).result(),
            "signer_unavailable"
        );
    }

    #[test]
    fn next_check_sleeps_until_due_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let resync = Duration::from_secs(300);
        for draw in [0, u32::MAX / 2, u32::MAX] {
            // The renewal time is kept as it is, whatever the draw.
            assert_eq!(
                next_check(now + Duration::from_secs(60), now, resync, draw),
                Duration::from_secs(60)
            );
            assert_eq!(next_check(now, now, resync, draw), Duration::from_secs(1));
            assert_eq!(
                next_check(now - Duration::from_secs(5), now, resync, draw),
                Duration::from_secs(1)
            );
        }
        // Nothing due within the resync: a resync away, spread.
        let far = now + Duration::from_secs(9999);
        assert_eq!(next_check(far, now, resync, 0), resync);
        assert_eq!(
            next_check(far, now, resync, 1 << 31),
            Duration::from_secs(285)
        );
        let least = next_check(far, now, resync, u32::MAX);
        assert!(
            least > Duration::from_secs(270) && least < Duration::from_secs(271),
            "{least:?}"
        );
        // A renewal due just before the resync is not put off past it by the spread.
        assert_eq!(
            next_check(now + Duration::from_secs(280), now, resync, u32::MAX),
            least
        );
        // The one-second floor holds under the smallest resync.
        assert_eq!(
            next_check(far, now, Duration::from_secs(1), u32::MAX),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn classification_of_directories() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cacerts");
        assert!(matches!(classify(&target).unwrap(), Installed::None));
        std::fs::create_dir(&target).unwrap();
        assert!(matches!(classify(&target).unwrap(), Installed::None));
        std::fs::write(target.join(ROOT_CERT), "hand made").unwrap();
        match classify(&target).unwrap() {
            Installed::Foreign { root_cert, .. } => {
                assert_eq!(root_cert.as_deref(), Some("hand made"))
            }
            other => panic!("{other:?}"),
        }
        let files = BundleFiles {
            ca_cert: "c".into(),
            ca_key: "k".into(),
            cert_chain: "ch".into(),
            root_cert: "r".into(),
        };
        cacerts::write_bundle(&target, &files).unwrap();
        match classify(&target).unwrap() {
            Installed::Ours(read) => assert_eq!(read.cert_chain, "ch"),
            other => panic!("{other:?}"),
        }
        // A tls.crt beside them is what istiod would read.
        std::fs::write(target.join(TLS_SIGNING_CERT), "another CA").unwrap();
        assert!(matches!(
            classify(&target).unwrap(),
            Installed::Shadowed { .. }
        ));
        std::fs::remove_file(target.join(TLS_SIGNING_CERT)).unwrap();
        std::fs::remove_file(target.join(CA_KEY)).unwrap();
        match classify(&target).unwrap() {
            Installed::Unreadable { problem, root_cert } => {
                assert!(problem.contains(CA_KEY), "{problem}");
                assert_eq!(root_cert.as_deref(), Some("r"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A pass reads root-cert.pem before anything else: a FIFO there would hold it forever.
    #[test]
    fn a_fifo_as_root_cert_fails_the_pass_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join(ROOT_CERT);
        let _fed = crate::fsutil::tests::FedFifo::new(&fifo, "roots from a pipe\n");
        match classify(dir.path()) {
            Err(e @ AgentError::Look { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(&fifo.display().to_string())
                        && message.contains("a FIFO (named pipe), not a regular file"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_target_that_cannot_be_looked_at_is_named_not_taken_for_empty() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cacerts");
        std::fs::write(&target, "a file where the directory should be").unwrap();
        match classify(&target) {
            Err(e @ AgentError::Look { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains("cacerts/..data") && message.contains("Not a directory"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
