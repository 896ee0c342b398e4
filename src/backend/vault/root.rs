//! `meshca root init` and `root show` with the Vault backend: a root generated inside
//! Vault (`root/generate/internal`, the key never exported) with the root VirtualMesh's
//! org, ttl and key type, or an existing issuer adopted after checking it against the
//! policy. Either way the root certificate is written to `root.certificate`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::json;

use super::client::{VaultClient, VaultError};
use super::config::VaultSettings;
use super::profile::{self, RootRequest};
use super::{IssuerInfo, read_issuer, unreadable_urls, urls_vault_adds};
use crate::config::SignerConfig;
use crate::pki::profile::RootCa;

#[derive(Debug, thiserror::Error)]
pub enum VaultRootError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("{0}")]
    Refused(String),
    /// Its own variant: `root init` exits 73 for it (the README's table).
    #[error(
        "an issuer named {issuer_ref} already exists in Vault mount {mount}; pass --force to generate a new root (the existing issuer is kept under a new name), or --adopt to use it as the root"
    )]
    IssuerExists { issuer_ref: String, mount: String },
}

/// What `root init` did.
pub struct VaultRootOutcome {
    pub root: RootCa,
    pub issuer: IssuerInfo,
    /// An existing issuer was adopted rather than a new root generated.
    pub adopted: bool,
    /// With --force: the name the previous issuer of the same name now carries.
    pub previous_issuer_renamed_to: Option<String>,
    /// Vault's warnings that matter (e.g. the mount's max TTL shortened the root).
    pub warnings: Vec<String>,
}

/// How `root init` obtains the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootInitMode {
    /// Generate a new root inside Vault; refuse if the issuer exists (unless forced).
    Generate { force: bool },
    /// Take the existing issuer named by `vault.issuer_ref`.
    Adopt,
}

pub async fn root_init(
    config: &SignerConfig,
    settings: &VaultSettings,
    mode: RootInitMode,
) -> Result<VaultRootOutcome, VaultRootError> {
    config
        .check_root_key_type()
        .map_err(VaultRootError::Refused)?;
    // Only a new root takes the name (an adopted issuer keeps its own): refused before
    // Vault is asked anything.
    if let RootInitMode::Generate { .. } = mode {
        config.root_common_name().map_err(VaultRootError::Refused)?;
    }
    let client = VaultClient::new(settings)?;
    let outcome = init_with(&client, config, settings, mode).await;
    client.logout().await;
    outcome
}

async fn init_with(
    client: &VaultClient,
    config: &SignerConfig,
    settings: &VaultSettings,
    mode: RootInitMode,
) -> Result<VaultRootOutcome, VaultRootError> {
    let policy = config.root_policy();
    let key_type = config.root.key_type;
    client.health().await?;
    let (mount, issuer_ref) = (&settings.mount, &settings.issuer_ref);
    let existing = read_issuer(client, issuer_ref).await?;
    let check = |pem: &str| {
        profile::check_root(
            pem,
            key_type,
            &policy.org_name,
            policy.min_rsa_bits,
            policy.max_ttl,
        )
    };

    let outcome = match mode {
        RootInitMode::Adopt => {
            let issuer = existing.ok_or_else(|| {
                VaultRootError::Refused(format!(
                    "there is no issuer {issuer_ref} in Vault mount {mount} to adopt"
                ))
            })?;
            if issuer.key_id.is_empty() {
                return Err(VaultRootError::Refused(format!(
                    "Vault holds no private key for issuer {issuer_ref}: it cannot sign"
                )));
            }
            let mut warnings = Vec::new();
            match urls_vault_adds(client, &issuer).await {
                Ok((urls, _)) if urls.is_empty() => {}
                Ok((urls, configured_at)) => {
                    return Err(VaultRootError::Refused(format!(
                        "{configured_at} has AIA/CRL/OCSP URLs configured ({}): Vault would add them to every intermediate of issuer {issuer_ref}, which meshca refuses; clear them first",
                        urls.join(", ")
                    )));
                }
                Err(e) => warnings.push(unreadable_urls(mount, &e)),
            }
            let root = check(&issuer.certificate_pem).map_err(|e| {
                VaultRootError::Refused(format!(
                    "issuer {issuer_ref} does not satisfy virtual mesh {}: {e}",
                    policy.id
                ))
            })?;
            refuse_another_root_in_the_file(config, issuer_ref, &root)?;
            write_root_file(config, &root)?;
            VaultRootOutcome {
                root,
                issuer,
                adopted: true,
                previous_issuer_renamed_to: None,
                warnings,
            }
        }
        RootInitMode::Generate { force } => {
            let common_name = config.root_common_name().map_err(VaultRootError::Refused)?;
            if issuer_ref == "default" {
                return Err(VaultRootError::Refused(
                    "vault.issuer_ref must name the issuer to create, not \"default\"".into(),
                ));
            }
            if existing.is_some() && !force {
                return Err(VaultRootError::IssuerExists {
                    issuer_ref: issuer_ref.to_string(),
                    mount: mount.to_string(),
                });
            }
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            // A replacement is made under a temporary name and takes the configured name
            // only once it passed its checks: a failure leaves the old root in place.
            let name = match &existing {
                Some(old) => {
                    let name = format!("{issuer_ref}-new-{}", short_id(&old.issuer_id));
                    // What a `--force` killed before its renames left under that name
                    // (a generated issuer and key) would make Vault refuse the name.
                    if let Some(leftover) = read_issuer(client, &name).await? {
                        let cleanup =
                            discard(client, mount, &leftover.issuer_id, &leftover.key_id).await;
                        tracing::info!(issuer = %name, %cleanup, "removed a root a root init killed before it finished left behind");
                    }
                    name
                }
                None => issuer_ref.clone(),
            };
            let body = profile::root_generate_body(&RootRequest {
                key_type,
                org_name: &policy.org_name,
                common_name: &common_name,
                ttl: policy.max_ttl,
                issuer_name: &name,
            });
            let answer = client
                .call(
                    Method::POST,
                    &format!("{mount}/root/generate/internal"),
                    Some(&body),
                )
                .await?;
            let warnings: Vec<String> = profile::warnings(&answer)
                .into_iter()
                .filter(|w| w.contains("TTL") || w.contains("ignored"))
                .collect();
            let pem = profile::data_str(&answer, "certificate").unwrap_or_default();
            let issuer_id = profile::data_str(&answer, "issuer_id")
                .unwrap_or_default()
                .to_string();
            let key_id = profile::data_str(&answer, "key_id")
                .unwrap_or_default()
                .to_string();
            let root = match check(pem).and_then(|root| lasts_as_asked(root, policy.max_ttl, mount))
            {
                Ok(root) => root,
                Err(e) => {
                    let cleanup = discard(client, mount, &issuer_id, &key_id).await;
                    return Err(VaultRootError::Refused(format!(
                        "Vault made a root outside the policy of virtual mesh {}: {e}{}; {cleanup}",
                        policy.id,
                        if warnings.is_empty() {
                            String::new()
                        } else {
                            format!(" (Vault warned: {})", warnings.join("; "))
                        }
                    )));
                }
            };
            let mut renamed = None;
            if let Some(old) = &existing {
                // Unique even for several replacements within one second.
                let old_name =
                    format!("{issuer_ref}-replaced-{stamp}-{}", short_id(&old.issuer_id));
                if let Err(e) = rename(client, mount, &old.issuer_id, &old_name).await {
                    let cleanup = discard(client, mount, &issuer_id, &key_id).await;
                    return Err(VaultRootError::Refused(format!(
                        "cannot rename the existing issuer {issuer_ref} out of the way: {e}; {cleanup}"
                    )));
                }
                if let Err(e) = rename(client, mount, &issuer_id, issuer_ref).await {
                    // Put the old root back under its name and drop the new one.
                    let restored = rename(client, mount, &old.issuer_id, issuer_ref).await;
                    let cleanup = discard(client, mount, &issuer_id, &key_id).await;
                    return Err(VaultRootError::Refused(format!(
                        "cannot give the new root the name {issuer_ref}: {e}; {}; {cleanup}",
                        match restored {
                            Ok(()) => format!("the previous issuer is {issuer_ref} again"),
                            Err(r) =>
                                format!("the previous issuer is still named {old_name} ({r})"),
                        }
                    )));
                }
                renamed = Some(old_name);
            }
            // The file last, so that a failure can still put Vault back as it was: with
            // the new root under the name and the old one in the file, no signer starts.
            if let Err(e) = write_root_file(config, &root) {
                let cleanup = discard(client, mount, &issuer_id, &key_id).await;
                let restored = match &existing {
                    Some(old) => match rename(client, mount, &old.issuer_id, issuer_ref).await {
                        Ok(()) => format!("; the previous issuer is {issuer_ref} again"),
                        Err(r) => format!(
                            "; the previous issuer is still named {} ({r})",
                            renamed.as_deref().unwrap_or_default()
                        ),
                    },
                    None => String::new(),
                };
                return Err(VaultRootError::Refused(format!("{e}; {cleanup}{restored}")));
            }
            let issuer = read_issuer(client, issuer_ref).await?.ok_or_else(|| {
                VaultRootError::Refused(format!("issuer {issuer_ref} vanished after creation"))
            })?;
            let mut warnings = warnings;
            match urls_vault_adds(client, &issuer).await {
                Ok((urls, _)) if urls.is_empty() => {}
                Ok((urls, configured_at)) => warnings.push(format!(
                    "{configured_at} has AIA/CRL/OCSP URLs configured ({}): Vault adds them to every intermediate, which meshca refuses (502 backend_out_of_policy) until they are cleared",
                    urls.join(", ")
                )),
                Err(e) => warnings.push(unreadable_urls(mount, &e)),
            }
            VaultRootOutcome {
                root,
                issuer,
                adopted: false,
                previous_issuer_renamed_to: renamed,
                warnings,
            }
        }
    };
    Ok(outcome)
}

/// `--adopt` rewrites the root certificate file with the adopted issuer's certificate:
/// the same root again is a re-run, another root's there is refused (it may be the root in
/// force, and `--adopt` takes no `--force`).
fn refuse_another_root_in_the_file(
    config: &SignerConfig,
    issuer_ref: &str,
    adopted: &RootCa,
) -> Result<(), VaultRootError> {
    let path = &config.root.certificate;
    let Ok(text) = std::fs::read_to_string(path) else {
        // Absent (the usual case) or unreadable: the write says which.
        return Ok(());
    };
    match RootCa::from_pem(&text) {
        Ok(there) if there.fingerprint_sha256 == adopted.fingerprint_sha256 => Ok(()),
        Ok(there) => Err(VaultRootError::Refused(format!(
            "the root certificate {} holds another root (sha256 {}) than issuer {} (sha256 {}): remove or rename the file, or name another in [root] certificate",
            path.display(),
            there.fingerprint_sha256,
            issuer_ref,
            adopted.fingerprint_sha256
        ))),
        Err(e) => Err(VaultRootError::Refused(format!(
            "the root certificate {} is there but is no root certificate ({e}): remove or rename it first",
            path.display()
        ))),
    }
}

/// Writes the root certificate file (`[root] certificate`), replacing it whole.
fn write_root_file(config: &SignerConfig, root: &RootCa) -> Result<(), VaultRootError> {
    crate::fsutil::write_public(&config.root.certificate, root.pem.as_bytes()).map_err(|e| {
        VaultRootError::Refused(format!(
            "cannot write root certificate {}: {e}",
            config.root.certificate.display()
        ))
    })
}

/// Slack for the time between asking Vault and reading its answer.
const ROOT_LIFETIME_SLACK: Duration = Duration::from_secs(3600);

/// `root`, unless Vault made it end well before the `ttl` asked: the mount's max lease TTL
/// caps what `root/generate` makes (768 h unless tuned), with a warning only, and a root
/// that ends within weeks caps every intermediate under it and then breaks the mesh.
fn lasts_as_asked(root: RootCa, ttl: Duration, mount: &str) -> Result<RootCa, String> {
    let now = SystemTime::now();
    if root.not_after + ROOT_LIFETIME_SLACK >= now + ttl {
        return Ok(root);
    }
    let left = root.not_after.duration_since(now).unwrap_or_default();
    Err(format!(
        "it ends in {} days, not the {} days of the policy's ttlDays: the mount's max lease TTL caps it (raise it, e.g. `bao secrets tune -max-lease-ttl={}h {mount}`, then run root init again)",
        (left.as_secs() + 43_200) / 86_400,
        ttl.as_secs().div_ceil(86_400),
        ttl.as_secs().div_ceil(3600)
    ))
}

/// The first block of a Vault ID (a UUID), for readable unique names.
fn short_id(id: &str) -> &str {
    id.split('-').next().unwrap_or(id)
}

/// Best effort: removes an issuer and key that failed their checks.
async fn discard(client: &VaultClient, mount: &str, issuer_id: &str, key_id: &str) -> String {
    if issuer_id.is_empty() {
        return "nothing was left in Vault".into();
    }
    let issuer = client
        .call(Method::DELETE, &format!("{mount}/issuer/{issuer_id}"), None)
        .await;
    let key = if key_id.is_empty() {
        Ok(serde_json::Value::Null)
    } else {
        client
            .call(Method::DELETE, &format!("{mount}/key/{key_id}"), None)
            .await
    };
    match (issuer, key) {
        (Ok(_), Ok(_)) => "the new issuer and its key were deleted from Vault".into(),
        (Err(e), _) | (_, Err(e)) => format!(
            "could not delete the new issuer {issuer_id} / key {key_id} from Vault ({e}); delete them by hand"
        ),
    }
}

async fn rename(
    client: &VaultClient,
    mount: &str,
    issuer_id: &str,
    name: &str,
) -> Result<(), VaultError> {
    client
        .call(
            Method::PATCH,
            &format!("{mount}/issuer/{issuer_id}"),
            Some(&json!({ "issuer_name": name })),
        )
        .await
        .map(|_| ())
}

/// What `root show` prints about the Vault side.
pub struct VaultKeyInfo {
    pub issuer: IssuerInfo,
    pub key_type: String,
    pub key_name: String,
}

pub async fn inspect(settings: &VaultSettings) -> Result<VaultKeyInfo, VaultRootError> {
    let client = VaultClient::new(settings)?;
    let info = inspect_with(&client, settings).await;
    client.logout().await;
    info
}

async fn inspect_with(
    client: &VaultClient,
    settings: &VaultSettings,
) -> Result<VaultKeyInfo, VaultRootError> {
    let issuer = read_issuer(client, &settings.issuer_ref)
        .await?
        .ok_or_else(|| {
            VaultRootError::Refused(super::no_issuer(&settings.mount, &settings.issuer_ref))
        })?;
    let (mut key_type, mut key_name) = (String::from("none"), String::new());
    if !issuer.key_id.is_empty() {
        let key = client
            .call(
                Method::GET,
                &format!("{}/key/{}", settings.mount, issuer.key_id),
                None,
            )
            .await?;
        key_type = profile::data_str(&key, "key_type")
            .unwrap_or_default()
            .to_string();
        key_name = profile::data_str(&key, "key_name")
            .unwrap_or_default()
            .to_string();
    }
    Ok(VaultKeyInfo {
        issuer,
        key_type,
        key_name,
    })
}
