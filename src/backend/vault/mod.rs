//! The root key in Vault/OpenBao PKI: the key is generated inside Vault
//! (`root/generate/internal`) and never leaves it; Vault's `sign-intermediate` signs, or,
//! for an intermediate with name constraints, `sign-self-issued` signs the TBS meshca built
//! ([`profile::issue_call`]).
//!
//! Vault applies no role policy to `sign-intermediate`, so the signer keeps owning the
//! policy: the request is decided before Vault is asked, Vault is asked for exactly
//! meshca's profile, and every certificate it returns is checked again (signature under
//! the root key, lint, subject) before it is handed out.

pub mod client;
pub mod config;
pub mod lockout;
pub mod profile;
pub mod root;

use std::sync::Arc;

use reqwest::Method;
use serde_json::Value;
use x509_cert::Certificate;

use self::client::{VaultClient, VaultError};
use self::config::VaultSettings;
use super::{BackendError, BoxFuture, IssueRequest, RootSigner};
use crate::pki::profile::RootCa;

/// What Vault says about the issuer that holds the root.
#[derive(Debug, Clone)]
pub struct IssuerInfo {
    pub issuer_id: String,
    pub issuer_name: String,
    pub key_id: String,
    pub certificate_pem: String,
    pub usage: String,
    /// AIA, CRL and OCSP URLs configured on the issuer: Vault puts them into every
    /// certificate it signs, which meshca's profile does not allow.
    pub urls: Vec<String>,
}

/// The configured issuer is not in the mount, asked under a root certificate that one
/// made: `root init` is not the answer (it would make a new root, which no cluster
/// trusts); where the root's issuer went is.
pub fn no_issuer(mount: &str, issuer_ref: &str) -> String {
    format!(
        "Vault mount {mount} has no issuer {issuer_ref}, though the root certificate was made by one: vault.address names another Vault (or one emptied, such as a dev server restarted), vault.mount or vault.issuer_ref another place, or the issuer was renamed or deleted (`bao list {mount}/issuers` and `bao read {mount}/issuer/<id>` find the root's; `bao patch {mount}/issuer/<id> issuer_name={issuer_ref}` names it back); `meshca root init` would make a new root, which no cluster trusts"
    )
}

/// `<mount>/issuer/<ref>`, or `None` if the mount has no such issuer.
pub async fn read_issuer(
    client: &VaultClient,
    issuer_ref: &str,
) -> Result<Option<IssuerInfo>, VaultError> {
    let mount = &client.settings().mount;
    let answer = match client
        .call(Method::GET, &format!("{mount}/issuer/{issuer_ref}"), None)
        .await
    {
        Ok(answer) => answer,
        Err(VaultError::Api { message, .. }) if message.contains("unable to find PKI issuer") => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let text = |field: &str| {
        profile::data_str(&answer, field)
            .unwrap_or_default()
            .to_string()
    };
    let urls = url_fields(&answer);
    let info = IssuerInfo {
        issuer_id: text("issuer_id"),
        issuer_name: text("issuer_name"),
        key_id: text("key_id"),
        certificate_pem: text("certificate"),
        usage: text("usage"),
        urls,
    };
    if info.certificate_pem.is_empty() {
        return Err(VaultError::Protocol {
            what: format!("GET {mount}/issuer/{issuer_ref}"),
            message: "no certificate in the answer".into(),
        });
    }
    Ok(Some(info))
}

/// The AIA, CRL and OCSP URLs Vault puts into what `issuer` signs, and where they are
/// set: the issuer's own, else the mount's (`<mount>/config/urls`, the usual place, which
/// the issuer's record does not show). Empty when neither has any.
pub async fn urls_vault_adds(
    client: &VaultClient,
    issuer: &IssuerInfo,
) -> Result<(Vec<String>, String), VaultError> {
    if !issuer.urls.is_empty() {
        return Ok((
            issuer.urls.clone(),
            format!("issuer {}", issuer.issuer_name),
        ));
    }
    let path = format!("{}/config/urls", client.settings().mount);
    let answer = client.call_optional(Method::GET, &path, None).await?;
    Ok((url_fields(&answer), path))
}

/// The warning when the mount's URLs cannot be read (a Vault policy without that read).
pub fn unreadable_urls(mount: &str, e: &impl std::fmt::Display) -> String {
    format!(
        "cannot read {mount}/config/urls ({e}): if AIA/CRL/OCSP URLs are set there, Vault adds them to every intermediate and meshca refuses each (502 backend_out_of_policy); grant meshca's Vault policy read on that path"
    )
}

/// The URL lists of an issuer's or a mount's answer.
fn url_fields(answer: &Value) -> Vec<String> {
    let mut urls = Vec::new();
    for field in [
        "issuing_certificates",
        "crl_distribution_points",
        "ocsp_servers",
    ] {
        if let Some(list) = answer["data"][field].as_array() {
            urls.extend(list.iter().filter_map(Value::as_str).map(String::from));
        }
    }
    urls
}

/// The serving backend.
pub struct VaultBackend {
    client: Arc<VaultClient>,
    root: RootCa,
    sign_path: String,
    /// `<mount>/issuer/<ref>/sign-self-issued`: cross certificates for announced roots,
    /// and intermediates with name constraints.
    self_issued_path: String,
    description: String,
    /// Why the configured issuer is no longer the root in force (renamed, replaced by
    /// another `root init --force`), as the last readiness check found; `None` while it
    /// is. Signing refuses at once meanwhile: Vault would sign, under another root,
    /// certificates meshca throws away and Vault keeps.
    issuer_moved: std::sync::Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum VaultStartError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("{0}")]
    Mismatch(String),
}

impl VaultBackend {
    /// Logs in and checks that the configured issuer is the root in the certificate file
    /// and holds a key: a signer never starts against another root.
    pub async fn start(settings: &VaultSettings, root: RootCa) -> Result<Self, VaultStartError> {
        let client = Arc::new(VaultClient::new(settings)?);
        if let Err(e) = Self::check_issuer(&client, settings, &root).await {
            client.logout().await;
            return Err(e);
        }
        client.spawn_renewal();
        Ok(VaultBackend {
            sign_path: format!(
                "{}/issuer/{}/sign-intermediate",
                settings.mount, settings.issuer_ref
            ),
            self_issued_path: format!(
                "{}/issuer/{}/sign-self-issued",
                settings.mount, settings.issuer_ref
            ),
            description: format!(
                "vault {} mount {} issuer {} (auth {})",
                client.address(),
                settings.mount,
                settings.issuer_ref,
                settings.auth.method()
            ),
            client,
            root,
            issuer_moved: std::sync::Mutex::new(None),
        })
    }

    /// Vault is up, and the configured issuer is `root`, holds its key and may issue.
    async fn check_issuer(
        client: &VaultClient,
        settings: &VaultSettings,
        root: &RootCa,
    ) -> Result<(), VaultStartError> {
        client.health().await?;
        let (mount, issuer_ref) = (&settings.mount, &settings.issuer_ref);
        let issuer = read_issuer(client, issuer_ref)
            .await?
            .ok_or_else(|| VaultStartError::Mismatch(no_issuer(mount, issuer_ref)))?;
        if !holds_root(&issuer, root) {
            return Err(VaultStartError::Mismatch(format!(
                "Vault issuer {issuer_ref} in mount {mount} is not the root in the certificate file: was the root re-initialized without updating the certificate file?"
            )));
        }
        if issuer.key_id.is_empty() {
            return Err(VaultStartError::Mismatch(format!(
                "Vault holds no private key for issuer {issuer_ref}: it cannot sign"
            )));
        }
        if !issuer.usage.split(',').any(|u| u == "issuing-certificates") {
            return Err(VaultStartError::Mismatch(format!(
                "Vault issuer {issuer_ref} may not issue certificates (usage: {})",
                issuer.usage
            )));
        }
        if let Some(why) = cannot_sign(client, settings).await {
            return Err(VaultStartError::Mismatch(why));
        }
        match urls_vault_adds(client, &issuer).await {
            Ok((urls, _)) if urls.is_empty() => {}
            Ok((urls, configured_at)) => tracing::warn!(
                issuer = %issuer_ref,
                %configured_at,
                ?urls,
                "Vault has AIA/CRL/OCSP URLs configured: it adds them to every intermediate and meshca refuses those (502 backend_out_of_policy); clear them"
            ),
            Err(e) => tracing::warn!("{}", unreadable_urls(mount, &e)),
        }
        Ok(())
    }

    /// The configured issuer, read again: still the root in force, or why not. Asked by
    /// each readiness check, so a signer whose issuer was renamed or replaced under it
    /// turns unready (and refuses signing) within one check.
    async fn check_issuer_unchanged(&self) -> Result<(), BackendError> {
        let settings = self.client.settings();
        let (mount, issuer_ref) = (&settings.mount, &settings.issuer_ref);
        let moved = match read_issuer(&self.client, issuer_ref)
            .await
            .map_err(backend_error)?
        {
            // Still the root, but changed so that it cannot sign, or the token's policy no
            // longer lets it: every signing would fail while the signer looked ready.
            Some(issuer) if holds_root(&issuer, &self.root) => match issuer_cannot_sign(&issuer) {
                Some(why) => Some(why),
                None => cannot_sign(&self.client, settings).await,
            },
            Some(_) => Some(format!(
                "Vault issuer {issuer_ref} in mount {mount} is no longer the root this signer serves (renamed or replaced since the start): signing refused until it is again, or the signer is restarted with the new root's certificate"
            )),
            None => Some(format!(
                "Vault mount {mount} no longer has issuer {issuer_ref} (renamed or deleted since the start): signing refused until it is back"
            )),
        };
        let mut current = self.issuer_moved.lock().unwrap_or_else(|p| p.into_inner());
        if *current != moved {
            match &moved {
                Some(why) => tracing::error!("{why}"),
                None => {
                    tracing::info!(issuer = %issuer_ref, "Vault issuer is the root in force again")
                }
            }
        }
        *current = moved.clone();
        moved.map_or(Ok(()), |why| Err(BackendError::Unavailable(why)))
    }

    fn issuer_moved(&self) -> Option<String> {
        self.issuer_moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Why `issuer` (the root in force) can no longer sign: its key gone, or its usage without
/// issuing-certificates (`bao patch ... usage=read-only,crl-signing`); None if it can.
fn issuer_cannot_sign(issuer: &IssuerInfo) -> Option<String> {
    let name = &issuer.issuer_name;
    if issuer.key_id.is_empty() {
        return Some(format!(
            "Vault holds no private key for issuer {name} any more: it cannot sign"
        ));
    }
    (!issuer.usage.split(',').any(|u| u == "issuing-certificates")).then(|| {
        format!(
            "Vault issuer {name} may not issue certificates (usage: {}): signing refused until its usage includes issuing-certificates",
            issuer.usage
        )
    })
}

/// Why this token may not sign intermediates (`update` on
/// `<mount>/issuer/<ref>/sign-intermediate`), or None: see [`lacks_update`].
async fn cannot_sign(client: &VaultClient, settings: &VaultSettings) -> Option<String> {
    let path = format!(
        "{}/issuer/{}/sign-intermediate",
        settings.mount, settings.issuer_ref
    );
    lacks_update(client, &path).await.then(|| {
        format!(
            "the Vault token's policy does not let meshca sign: it needs \"update\" on {path} (see meshca's Vault policy in the README)"
        )
    })
}

/// Whether this token lacks `update` on `path`, as Vault's `sys/capabilities-self`
/// answers; false when that cannot be asked (a token without Vault's `default` policy,
/// whose 403 here is no reason for a fresh login), which is left to the first signing to
/// show.
async fn lacks_update(client: &VaultClient, path: &str) -> bool {
    let body = serde_json::json!({ "paths": [path] });
    let Ok(answer) = client
        .call_optional(Method::POST, "sys/capabilities-self", Some(&body))
        .await
    else {
        return false;
    };
    let Some(capabilities) = answer
        .get("data")
        .and_then(|data| data.get(path))
        .or_else(|| answer.get(path))
        .and_then(Value::as_array)
    else {
        return false;
    };
    !capabilities
        .iter()
        .filter_map(|c| c.as_str())
        .any(|c| matches!(c, "update" | "root" | "sudo"))
}

/// Whether `issuer`'s certificate is `root`'s.
fn holds_root(issuer: &IssuerInfo, root: &RootCa) -> bool {
    crate::pki::pem::decode_certificates(&issuer.certificate_pem)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .is_some_and(|cert| cert == root.certificate)
}

/// How a Vault failure reaches the API: Vault refusing what meshca asked is a 502, Vault
/// being down, sealed, slow or forbidding meshca is a 503.
fn backend_error(e: VaultError) -> BackendError {
    match &e {
        VaultError::Api { status, .. } if (400..500).contains(status) && *status != 429 => {
            BackendError::Refused(e.to_string())
        }
        _ => BackendError::Unavailable(e.to_string()),
    }
}

impl RootSigner for VaultBackend {
    fn signs_planned_serial(&self, request: &IssueRequest) -> bool {
        // sign-self-issued signs meshca's TBS as it is; sign-intermediate picks its own.
        profile::endpoint_for(request) == profile::IssueEndpoint::SignSelfIssued
    }

    fn root(&self) -> &RootCa {
        &self.root
    }

    fn issue(&self, request: IssueRequest) -> BoxFuture<'_, Result<Certificate, BackendError>> {
        Box::pin(async move {
            if request.client_gone.is_cancelled() {
                return Err(BackendError::ClientGone);
            }
            if let Some(why) = self.issuer_moved() {
                return Err(BackendError::Unavailable(why));
            }
            let (endpoint, body) =
                profile::issue_call(&request, &self.root).map_err(BackendError::Check)?;
            let path = match endpoint {
                profile::IssueEndpoint::SignIntermediate => &self.sign_path,
                profile::IssueEndpoint::SignSelfIssued => &self.self_issued_path,
            };
            // Noted before the call: a stop while it is under way leaves the signature in
            // doubt, and the serial on record.
            request.signing_asked.note();
            let answer = self
                .client
                .call(Method::POST, path, Some(&body))
                .await
                .map_err(|e| {
                    if e.signed_nothing() {
                        request.signing_asked.withdraw();
                    }
                    backend_error(e)
                })?;
            let checked = profile::check_intermediate(&answer, &request, &self.root, endpoint);
            if matches!(checked, Err(BackendError::OutOfPolicy(_))) {
                // Signed by name, as meshca's Vault policy names the issuer: a name moved
                // to another root under this signer shows here first. Looked at now, so
                // the requests after this one are refused without asking Vault (the
                // readiness check would notice only within 10 s).
                let _ = self.check_issuer_unchanged().await;
            }
            checked
        })
    }

    fn cross_sign<'a>(
        &'a self,
        announced: &'a RootCa,
    ) -> BoxFuture<'a, Result<Certificate, BackendError>> {
        Box::pin(async move {
            if let Some(why) = self.issuer_moved() {
                return Err(BackendError::Unavailable(why));
            }
            // Vault signs a self-issued certificate it is given with the issuer's key and
            // name, and keeps the rest: meshca gives it the cross certificate's profile
            // ([`profile::cross_template`]). The announced root's key type may differ
            // from the root's: with `require_matching_certificate_algorithms` false
            // Vault then signs anyway, with the root key's algorithm (true refuses).
            let template = profile::cross_template(announced, &self.root)?;
            let body = serde_json::json!({
                "certificate": template,
                "require_matching_certificate_algorithms": false,
            });
            let answer = self
                .client
                .call(Method::POST, &self.self_issued_path, Some(&body))
                .await
                .map_err(backend_error)?;
            profile::check_cross(&answer, announced, &self.root)
        })
    }

    fn cannot_sign_constrained(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let path = &self.self_issued_path;
            lacks_update(&self.client, path).await.then(|| {
                format!(
                    "the Vault token's policy does not let meshca sign intermediates with name constraints: it needs \"update\" on {path} (see meshca's Vault policy in the README)"
                )
            })
        })
    }

    fn readiness(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.client.health().await.map_err(backend_error)?;
            self.client.token().await.map_err(backend_error)?;
            self.check_issuer_unchanged().await
        })
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn login_failing(&self) -> bool {
        self.client.login_failing()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.client.logout())
    }
}
