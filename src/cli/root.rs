//! `token init` and `root init | show | restrict-key`: the root key on its PKCS#11 token
//! or inside Vault, and the root certificate file beside it.

use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Result, bail};

use meshca::backend::pkcs11;
use meshca::backend::vault::root::{self as vault_root, RootInitMode};
use meshca::config::{BackendKind, SignerConfig};
use meshca::pki::profile::RootCa;
use meshca::secret::{SecretFile, SecretSource};
use meshca::signer::audit::rfc3339;

use super::output::{say, say_json, to_stderr};
use super::{load_config, pkcs11_settings, runtime, vault_settings};

/// `token init`: a free slot initialized with the key URI's token label and both PINs.
pub(crate) fn token_init(config: &Path, so_pin_file: &Path) -> Result<ExitCode> {
    let config = load_config(config)?;
    let settings = pkcs11_settings(&config)?;
    let so_pin = SecretSource::File(SecretFile::new(
        "--so-pin-file",
        so_pin_file,
        so_pin_file.to_path_buf(),
    ))
    .read()?;
    let user_pin = settings.pin.read()?;
    let label = pkcs11::init_token(settings, &so_pin, &user_pin)?;
    say!(
        "meshca: token {label:?} initialized (user PIN from {})",
        settings.pin
    );
    Ok(ExitCode::SUCCESS)
}

/// `root init`: the root key generated on the token (or in Vault, or an issuer there
/// adopted) and its certificate written.
pub(crate) fn init(config: &Path, force: bool, adopt: bool) -> Result<ExitCode> {
    let config = load_config(config)?;
    // `--adopt` writes the issuer's own certificate: checked against the file's.
    if !adopt {
        config.check_root_certificate_free(force)?;
    }
    if config.root.backend == BackendKind::Vault {
        return vault_root_init(&config, force, adopt);
    }
    if adopt {
        bail!("--adopt is for the vault backend (it takes an existing Vault issuer)");
    }
    let settings = pkcs11_settings(&config)?;
    let pin = settings.pin.read()?;
    let outcome = pkcs11::root_init(&config, settings, &pin, force)?;
    let root = &outcome.root;
    say!(
        "meshca: root CA created in the token{}",
        if outcome.replaced_existing_key {
            " (replaced the previous key)"
        } else {
            ""
        }
    );
    say!(
        "  key          {} ({}, generated inside the token, not extractable)",
        settings.key,
        root.key_kind
    );
    print_new_root(root, &config);
    Ok(ExitCode::SUCCESS)
}

/// `root restrict-key`: the token key's uses besides signing set false.
pub(crate) fn restrict_key(config: &Path) -> Result<ExitCode> {
    let config = load_config(config)?;
    if config.root.backend == BackendKind::Vault {
        bail!("root restrict-key is for a PKCS#11 root key: Vault's key has no such attributes");
    }
    let settings = pkcs11_settings(&config)?;
    let root = meshca::signer::server::load_root(&config)?;
    let pin = settings.pin.read()?;
    let cleared = pkcs11::restrict_key_uses(settings, &pin, &root)?;
    if cleared.is_empty() {
        say!(
            "meshca: root key {} allows only signing already",
            settings.key
        );
    } else {
        say!(
            "meshca: root key {} now allows only signing ({} set false)",
            settings.key,
            cleared.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `root show`: the root certificate, the roots announced beside it, and the key's
/// protection (a token's attributes, or Vault's issuer); fails when the key is weak or
/// not the certificate's.
pub(crate) fn show(config: &Path, json: bool) -> Result<ExitCode> {
    let config = load_config(config)?;
    if config.root.backend == BackendKind::Vault {
        return vault_root_show(&config, json);
    }
    let settings = pkcs11_settings(&config)?;
    let root = meshca::signer::server::load_root(&config)?;
    if !json {
        print_root_certificates(&config, &root);
    }
    let pin = settings.pin.read()?;
    let attrs = pkcs11::inspect_key(settings, &pin, &root)?;
    // A script checking the root (`until: rc == 0`) must not read success here.
    let mut problems: Vec<String> = attrs.weaknesses().iter().map(|w| w.to_string()).collect();
    problems.extend(attrs.not_the_root_key.clone());
    if json {
        say_json(&serde_json::json!({
            "backend": "pkcs11",
            "root": root_json(&config, &root),
            "announced_roots": announced_roots_json(&config),
            "key": {
                "uri": settings.key.to_string(),
                "cka_token": attrs.token,
                "cka_private": attrs.private,
                "cka_sensitive": attrs.sensitive,
                "cka_extractable": attrs.extractable,
                "cka_always_sensitive": attrs.always_sensitive,
                "cka_never_extractable": attrs.never_extractable,
                "cka_decrypt": attrs.decrypt,
                "cka_unwrap": attrs.unwrap,
                "cka_sign_recover": attrs.sign_recover,
                "cka_derive": attrs.derive,
                "value_readable": attrs.value_readable,
                "is_root_certificate_key": attrs.not_the_root_key.is_none(),
            },
            "key_check": {"ok": problems.is_empty(), "problems": problems},
        }));
    } else {
        print_key_attributes(settings, &attrs);
    }
    // Not refused: an adopted key made elsewhere may allow these, and none lets it
    // leave the token; but each lets the PIN's holder use it beyond signing.
    let other_uses = attrs.other_uses();
    if !other_uses.is_empty() {
        to_stderr!(
            "meshca: warning: root key {}: allows more than signing ({} true): \
             whoever holds the PIN can use it for that too; `meshca root restrict-key` \
             sets them false",
            settings.key,
            other_uses.join(", ")
        );
    }
    if !problems.is_empty() {
        for problem in &problems {
            to_stderr!("meshca: root key {}: {problem}", settings.key);
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The lines `root init` prints about the root it made or adopted, whatever the backend.
fn print_new_root(root: &meshca::pki::profile::RootCa, config: &SignerConfig) {
    say!("  subject      {}", root.subject);
    say!("  not after    {}", rfc3339(root.not_after));
    say!("  sha256       {}", root.fingerprint_sha256);
    say!("  certificate  {}", config.root.certificate.display());
}

fn vault_root_init(config: &SignerConfig, force: bool, adopt: bool) -> Result<ExitCode> {
    let settings = vault_settings(config)?;
    let mode = if adopt {
        RootInitMode::Adopt
    } else {
        RootInitMode::Generate { force }
    };
    let outcome = runtime()?.block_on(vault_root::root_init(config, settings, mode))?;
    let root = &outcome.root;
    let issuer = &outcome.issuer;
    if outcome.adopted {
        say!(
            "meshca: adopted Vault issuer {} as the root CA",
            issuer.issuer_name
        );
    } else {
        say!(
            "meshca: root CA generated inside Vault{}",
            match &outcome.previous_issuer_renamed_to {
                Some(name) => format!(" (the previous issuer is kept as {name})"),
                None => String::new(),
            }
        );
    }
    say!(
        "  issuer       {} (id {}) in mount {} at {}",
        issuer.issuer_name,
        issuer.issuer_id,
        settings.mount,
        settings.address.as_str().trim_end_matches('/')
    );
    say!(
        "  key          {} (id {}, held by Vault, never exported)",
        root.key_kind,
        issuer.key_id
    );
    print_new_root(root, config);
    for warning in &outcome.warnings {
        say!("  warning      Vault: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `root show`'s certificates: the root in force, then the roots announced beside it (a
/// root change under way), each with what an operator compares against the agents'
/// bundles and the metrics.
fn print_root_certificates(config: &SignerConfig, root: &RootCa) {
    let now = SystemTime::now();
    say!("root certificate {}", config.root.certificate.display());
    say!("  subject      {}", root.subject);
    say!("  key          {}", root.key_kind);
    say!("  not after    {}", rfc3339(root.not_after));
    say!("  sha256       {}", root.fingerprint_sha256);
    for announced in config.root.announced() {
        say!(
            "{} {} ({}, announced to the agents)",
            announced.announcement.name(),
            announced.path.display(),
            announced.announcement.key()
        );
        say!("  key          {}", announced.key_kind);
        say!(
            "  not after    {}{}",
            rfc3339(announced.not_after),
            if announced.not_after <= now {
                " (EXPIRED: the agents no longer trust it)"
            } else {
                ""
            }
        );
        say!("  sha256       {}", announced.fingerprint_sha256);
        say!(
            "  vouched by   {}",
            meshca::signer::check::describe_cross_cert(
                &config.audit_log,
                &announced.fingerprint_sha256
            )
        );
    }
}

/// `root show --output json`'s root: what `openssl x509 -noout -fingerprint -sha256
/// -dates -subject -ext subjectKeyIdentifier` says of the certificate file.
fn root_json(config: &SignerConfig, root: &RootCa) -> serde_json::Value {
    let validity = root.certificate.tbs_certificate().validity();
    serde_json::json!({
        "certificate": config.root.certificate.display().to_string(),
        "subject": root.subject.to_string(),
        "sha256": root.fingerprint_sha256,
        "ski": meshca::pki::csr::hex(&root.subject_key_id),
        "not_before": rfc3339(validity.not_before.to_system_time()),
        "not_after": rfc3339(root.not_after),
        "key_type": root.key_kind.to_string(),
    })
}

/// The roots announced beside the root in force, as `root show` prints them.
fn announced_roots_json(config: &SignerConfig) -> serde_json::Value {
    let now = SystemTime::now();
    config
        .root
        .announced()
        .map(|a| {
            serde_json::json!({
                "announcement": a.announcement.label(),
                "certificate": a.path.display().to_string(),
                "sha256": a.fingerprint_sha256,
                "not_after": rfc3339(a.not_after),
                "expired": a.not_after <= now,
                "key_type": a.key_kind.to_string(),
                "vouched_by": meshca::signer::check::describe_cross_cert(
                    &config.audit_log,
                    &a.fingerprint_sha256
                ),
            })
        })
        .collect()
}

/// `root show`'s lines on the token's key (text output).
fn print_key_attributes(settings: &meshca::config::Pkcs11Settings, attrs: &pkcs11::KeyAttributes) {
    say!("private key {}", settings.key);
    say!("  CKA_TOKEN             {}", attrs.token);
    say!("  CKA_PRIVATE           {}", attrs.private);
    say!("  CKA_SENSITIVE         {}", attrs.sensitive);
    say!("  CKA_EXTRACTABLE       {}", attrs.extractable);
    say!("  CKA_ALWAYS_SENSITIVE  {}", attrs.always_sensitive);
    say!("  CKA_NEVER_EXTRACTABLE {}", attrs.never_extractable);
    say!("  CKA_DECRYPT           {}", attrs.decrypt);
    say!("  CKA_UNWRAP            {}", attrs.unwrap);
    say!("  CKA_SIGN_RECOVER      {}", attrs.sign_recover);
    say!("  CKA_DERIVE            {}", attrs.derive);
    say!(
        "  CKA_VALUE readable    {}",
        if attrs.value_readable {
            "YES (the key can be read out!)"
        } else {
            "no"
        }
    );
    say!(
        "  root certificate's    {}",
        if attrs.not_the_root_key.is_none() {
            "yes (signed a challenge that verifies under it)"
        } else {
            "NO"
        }
    );
}

fn vault_root_show(config: &SignerConfig, json: bool) -> Result<ExitCode> {
    let settings = vault_settings(config)?;
    let root = meshca::signer::server::load_root(config)?;
    if !json {
        print_root_certificates(config, &root);
    }
    let info = runtime()?.block_on(vault_root::inspect(settings))?;
    let issuer_pem_matches = meshca::pki::pem::decode_certificates(&info.issuer.certificate_pem)
        .ok()
        .and_then(|c| c.into_iter().next())
        .is_some_and(|c| c == root.certificate);
    if json {
        let problems: Vec<String> = if issuer_pem_matches {
            Vec::new()
        } else {
            vec![format!(
                "Vault issuer {} is not the root in {}: a signer with this config will not start",
                settings.issuer_ref,
                config.root.certificate.display()
            )]
        };
        say_json(&serde_json::json!({
            "backend": "vault",
            "root": root_json(config, &root),
            "announced_roots": announced_roots_json(config),
            "vault": {
                "address": settings.address.as_str().trim_end_matches('/'),
                "mount": settings.mount,
                "issuer_ref": settings.issuer_ref,
                "issuer_id": info.issuer.issuer_id,
                "usage": info.issuer.usage,
                "key_type": info.key_type,
                "key_id": info.issuer.key_id,
                "key_name": info.key_name,
                "certificate_matches": issuer_pem_matches,
            },
            "key_check": {"ok": problems.is_empty(), "problems": problems},
        }));
        return Ok(if issuer_pem_matches {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    say!(
        "Vault issuer {} in mount {}",
        settings.issuer_ref,
        settings.mount
    );
    say!("  issuer id    {}", info.issuer.issuer_id);
    say!("  usage        {}", info.issuer.usage);
    say!(
        "  certificate  {}",
        if issuer_pem_matches {
            "the root certificate above"
        } else {
            "DIFFERENT from the root certificate file!"
        }
    );
    say!(
        "  key          {} (id {}{}); Vault's API has no call that returns it",
        info.key_type,
        info.issuer.key_id,
        if info.key_name.is_empty() {
            String::new()
        } else {
            format!(", name {}", info.key_name)
        }
    );
    if !issuer_pem_matches {
        // A script checking the root must not read success here: a signer with this
        // config refuses to start.
        to_stderr!(
            "meshca: Vault issuer {} is not the root in {}: a signer with this config will not start",
            settings.issuer_ref,
            config.root.certificate.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
