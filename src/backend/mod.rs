//! Where the root key lives. [`RootSigner`] is the one interface the signer uses; the
//! PKCS#11 token and Vault/OpenBao PKI implement it.
//!
//! A backend receives a plan the policy already approved and returns a certificate that
//! it has checked against that plan; the signer checks it again before handing it out.

pub mod pkcs11;
pub mod pkcs11_uri;
mod token_threads;
pub mod vault;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use x509_cert::Certificate;

use crate::pki::lint::{IntermediateExpectations, LintFailure};
use crate::pki::profile::{IntermediatePlan, RootCa};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An intermediate the policy approved: the plan and the limits it must stay within.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub plan: IntermediatePlan,
    pub org_name: String,
    /// Latest notAfter the policy allows (ttl and root expiry applied).
    pub latest_not_after: SystemTime,
    pub min_rsa_bits: u32,
    /// The virtual mesh's trust domains: the URI hosts the intermediate's name
    /// constraints permit (empty: no name constraints).
    pub trust_domains: Vec<String>,
    /// The CSR as received (DER), for backends that sign a CSR rather than a TBS (Vault's
    /// sign-intermediate). Only its key is ever used; the PKCS#11 backend ignores it.
    pub csr_der: Vec<u8>,
    /// Cancelled when the client has closed its connection. A backend checks it just
    /// before it starts signing and then signs nothing ([`BackendError::ClientGone`]): under
    /// overload, clients that gave up must not keep the token busy.
    pub client_gone: CancellationToken,
    /// Noted by the backend once the root key was asked to sign: the audit line of a
    /// request that failed names the planned serial only then.
    pub signing_asked: SigningAsked,
}

/// Whether the root key was asked to sign a request's certificate (C_Sign called, Vault's
/// sign call sent), shared by the request and its audit line: a refusal before that (a
/// lint, a job dropped from the token's queue, an issuer Vault no longer holds) signed
/// nothing and names no serial; one after it may have a signature made, or still to come.
#[derive(Debug, Clone, Default)]
pub struct SigningAsked(Arc<AtomicBool>);

impl SigningAsked {
    /// The root key is about to be asked.
    pub fn note(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// The backend answered that it signed nothing after all (Vault refusing the call).
    pub fn withdraw(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    pub fn was_asked(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Facts compare by what they say: asked or not.
impl PartialEq for SigningAsked {
    fn eq(&self, other: &Self) -> bool {
        self.was_asked() == other.was_asked()
    }
}

impl Eq for SigningAsked {}

impl IssueRequest {
    /// What the linter checks this request's certificate against.
    pub fn expectations<'a>(
        &'a self,
        root: &'a RootCa,
        exact_plan: bool,
    ) -> IntermediateExpectations<'a> {
        IntermediateExpectations {
            root,
            public_key: &self.plan.public_key,
            org_name: &self.org_name,
            latest_not_after: self.latest_not_after,
            min_rsa_bits: self.min_rsa_bits,
            trust_domains: &self.trust_domains,
            plan: exact_plan.then_some(&self.plan),
        }
    }
}

/// What a refused PIN is answered with: a wrong PIN is mended in the configuration, a
/// locked one only with the security officer PIN (a restart meets the same lock).
fn pin_refusal(locked: bool) -> &'static str {
    if locked {
        "the token's user PIN is locked (too many refused logins); meshca does not log in with it again: unlock it with the security officer PIN (for a SoftHSM or OpenSC token, `pkcs11-tool --login --login-type so --init-pin`; an HSM's own tool otherwise), then restart the signer"
    } else {
        "the token refused the user PIN; meshca does not retry a refused PIN (that would lock the token): fix the PIN and restart the signer"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The token (or Vault) cannot be used right now; the request may be retried.
    #[error("root key backend unavailable: {0}")]
    Unavailable(String),
    /// The token refused the PIN (`locked`: as locked, after too many refusals). meshca
    /// never retries a refused PIN: each try counts towards locking the token.
    #[error("{}", pin_refusal(*locked))]
    PinRejected { locked: bool },
    /// The certificate about to be signed (or returned) failed lint: a meshca defect or a
    /// backend that does not do what it was asked. Nothing was issued.
    #[error("issuance stopped: {0}")]
    Lint(#[from] LintFailure),
    /// The signature or the signed bytes did not check out. Nothing was issued.
    #[error("issuance stopped: {0}")]
    Check(String),
    /// The backend signed something outside the policy or profile meshca asked for (e.g. a
    /// Vault mount that adds AIA/CRL extensions). The certificate is never handed out.
    #[error("the root key backend returned a certificate outside policy, not handed out: {0}")]
    OutOfPolicy(String),
    /// The backend refused to sign what meshca asked for (Vault answered 4xx).
    #[error("the root key backend refused to sign: {0}")]
    Refused(String),
    /// The client closed its connection before signing began; nothing was signed.
    #[error("the client closed its connection before signing began; nothing was signed")]
    ClientGone,
}

/// The root CA: its certificate and the means to sign under it.
pub trait RootSigner: Send + Sync {
    /// The root certificate this backend signs under.
    fn root(&self) -> &RootCa;

    /// Issues an intermediate exactly as planned, or explains why not.
    fn issue(&self, request: IssueRequest) -> BoxFuture<'_, Result<Certificate, BackendError>>;

    /// A cross certificate for `announced` (a root the signer announces) under the root
    /// key: the root key vouching for it to the agents ([`crate::pki::cross`]). Checked
    /// before it is returned.
    fn cross_sign<'a>(
        &'a self,
        announced: &'a RootCa,
    ) -> BoxFuture<'a, Result<Certificate, BackendError>>;

    /// Whether a certificate signed for `request` carries its planned serial. Not with
    /// Vault's `sign-intermediate`, which picks its own: an audit line naming the planned
    /// serial would send someone looking for a certificate that does not exist.
    fn signs_planned_serial(&self, _request: &IssueRequest) -> bool {
        true
    }

    /// Why the root key cannot sign intermediates with name constraints (a VirtualMesh's
    /// `trustDomains`), where the backend can tell before a signing is refused: a Vault
    /// policy without `update` on `sign-self-issued`. None otherwise.
    fn cannot_sign_constrained(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(std::future::ready(None))
    }

    /// Whether the backend can sign right now (token reachable and logged in).
    fn readiness(&self) -> BoxFuture<'_, Result<(), BackendError>>;

    /// A one-line description for logs: backend kind and key name, never a secret.
    fn describe(&self) -> String;

    /// Whether the backend's credentials are running out with no way to renew them (a
    /// Vault token near its max TTL whose fresh login failed): it still signs, for now.
    fn login_failing(&self) -> bool {
        false
    }

    /// Once nothing more will be asked of it: waits, within the backend's own bound, for
    /// its calls still under way (a readiness check a probe gave up on, a signing that
    /// timed out). A call past the bound (a token that stopped answering) is named in the
    /// log and left to the process exit: a stuck token does not hold up the exit.
    fn finish_calls(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Gives back what the start obtained that outlives the process (a Vault login's
    /// token), once nothing will be signed any more. The token's sessions end with it.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::BackendError;

    /// A PIN the token locked is not answered as a wrong one: correcting the PIN and
    /// restarting, the advice for a wrong PIN, meets the same lock.
    #[test]
    fn a_locked_pin_is_not_answered_as_a_wrong_one() {
        let wrong = BackendError::PinRejected { locked: false }.to_string();
        assert!(wrong.contains("fix the PIN and restart"), "{wrong}");
        let locked = BackendError::PinRejected { locked: true }.to_string();
        assert!(
            locked.contains("is locked") && locked.contains("security officer PIN"),
            "{locked}"
        );
        assert!(!locked.contains("fix the PIN"), "{locked}");
    }
}
