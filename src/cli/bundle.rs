//! `request` and `verify`: an intermediate asked for once and installed as Istio's cacerts
//! files, and a cacerts directory checked the way istiod reads it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow};

use meshca::agent::rotation;
use meshca::agent::{RequestOptions, cacerts, request_intermediate};
use meshca::pki::bundle::check_bundle;
use meshca::pki::pem::decode_certificates;
use meshca::signer::audit::rfc3339;

use super::args::RequestArgs;
use super::output::{say, say_json, to_stderr};
use super::{runtime, warn_of_open_key};

/// `request`: a key generated here, its CSR signed, the bundle written to `--out-dir`.
pub(crate) fn request(args: RequestArgs, json: bool) -> Result<ExitCode> {
    let client = args.tls.signer_client(&args.signer)?;
    warn_of_open_key(client.key_readable_by_others());
    let opts = RequestOptions {
        virtual_mesh: args.virtual_mesh,
        mesh: args.mesh,
        key_type: args.key_type,
        ttl_seconds: args.ttl_seconds,
        out_dir: args.out_dir,
        adopt: args.adopt,
        pin: rotation::RootPin::new(&args.accept_roots, "--accept-root"),
    };
    let root_cert = opts.out_dir.join(meshca::pki::bundle::ROOT_CERT);
    let roots_before = std::fs::read(&root_cert).ok();
    let key_before = opts.out_dir.join(meshca::pki::bundle::CA_KEY).exists();
    let outcome = runtime()?.block_on(request_intermediate(&client, &opts))?;
    let s = &outcome.summary;
    let roots_changed = std::fs::read(&root_cert).ok() != roots_before;
    // Without a ca-key.pem, an istiod started meanwhile runs on its self-signed CA.
    let restart_istiod = match (roots_changed, key_before) {
        (true, _) => Some("root-cert.pem changed"),
        (false, false) => Some("there was no ca-key.pem"),
        (false, true) => None,
    };
    if json {
        let mut report = installed_json(&opts.out_dir, s, roots_changed, restart_istiod.is_some());
        report["mesh"] = opts.mesh.to_string().into();
        report["virtual_mesh"] = opts.virtual_mesh.to_string().into();
        use meshca::pki::bundle::{CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
        report["files_written"] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT]
            .iter()
            .map(|name| opts.out_dir.join(name).display().to_string())
            .collect();
        say_json(&report);
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "meshca: intermediate for {} installed in {}",
        opts.mesh,
        opts.out_dir.display()
    );
    say!("  subject      {}", s.subject);
    say!("  issuer       {}", s.issuer);
    say!("  serial       {}", s.serial);
    say!(
        "  key          {} (generated here; ca-key.pem is mode 0600)",
        outcome.key_type
    );
    say!("  not after    {}", rfc3339(s.not_after));
    say!("  root sha256  {}", s.anchor_fingerprint);
    say!("  trusts       {}", s.root_fingerprints.join(", "));
    // As `agent --once` says it: istiod takes a new root set only when it starts.
    if let Some(why) = restart_istiod {
        say!("  then         restart istiod: {why}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `verify`: a cacerts directory as istiod reads it, plus meshca's profile.
pub(crate) fn verify(dir: &Path, root: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let files = cacerts::read_bundle(dir)?;
    let expected = match root {
        Some(path) => {
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let mut certs =
                decode_certificates(&pem).with_context(|| path.display().to_string())?;
            Some(certs.remove(0))
        }
        None => None,
    };
    let checked = check_bundle(&files, expected.as_ref(), SystemTime::now());
    if json {
        say_json(&verify_json(dir, &files, &checked));
        if let Err(findings) = &checked {
            to_stderr!(
                "meshca: {} is not a valid Istio cacerts bundle: {}",
                dir.display(),
                list_findings(findings)
            );
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let s = checked.map_err(|findings| {
        anyhow!(
            "{} is not a valid Istio cacerts bundle: {}",
            dir.display(),
            list_findings(&findings)
        )
    })?;
    say!("meshca: {} is a valid plugged-in CA bundle", dir.display());
    say!("  subject      {}", s.subject);
    say!("  issuer       {}", s.issuer);
    say!("  serial       {}", s.serial);
    say!("  key          {} (matches ca-key.pem)", s.key);
    say!(
        "  valid        {} to {}",
        rfc3339(s.not_before),
        rfc3339(s.not_after)
    );
    say!(
        "  chain        {} certificate(s), ends at root sha256 {}",
        s.chain_length,
        s.anchor_fingerprint
    );
    for fp in &s.root_fingerprints {
        say!("  trusts root  sha256 {fp}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What `request` and `agent --once` installed (or found) in `dir`, for `--output json`.
/// The intermediate's SHA-256 is of the ca-cert.pem now in `dir`.
pub(crate) fn installed_json(
    dir: &Path,
    s: &meshca::pki::bundle::BundleSummary,
    roots_changed: bool,
    restart_istiod: bool,
) -> serde_json::Value {
    let sha256 = std::fs::read_to_string(dir.join(meshca::pki::bundle::CA_CERT))
        .ok()
        .and_then(|pem| decode_certificates(&pem).ok())
        .and_then(|certs| certs.first().map(meshca::pki::bundle::fingerprint));
    serde_json::json!({
        "dir": dir.display().to_string(),
        "intermediate": {
            "subject": s.subject,
            "issuer": s.issuer,
            "serial": s.serial,
            "sha256": sha256,
            "key_type": s.key,
            "not_before": rfc3339(s.not_before),
            "not_after": rfc3339(s.not_after),
        },
        "root_sha256": s.anchor_fingerprint,
        "trusted_roots": s.root_fingerprints,
        // True: istiod takes the new root set only when it starts again.
        "roots_changed": roots_changed,
        // That, or the files replaced held no CA istiod could sign with: it must start again.
        "restart_istiod": restart_istiod,
    })
}

/// A bundle's findings on one line: the only one as it is, several numbered.
fn list_findings(findings: &[meshca::pki::bundle::BundleError]) -> String {
    match findings {
        [only] => only.to_string(),
        _ => {
            let numbered: Vec<String> = findings
                .iter()
                .enumerate()
                .map(|(index, finding)| format!("({}) {finding}", index + 1))
                .collect();
            format!("{} problems: {}", findings.len(), numbered.join("; "))
        }
    }
}

/// `verify --output json`: the files read, the findings (an error each, every one found),
/// the result, and the certificates of cert-chain.pem and root-cert.pem.
fn verify_json(
    dir: &Path,
    files: &meshca::pki::bundle::BundleFiles,
    verified: &Result<meshca::pki::bundle::BundleSummary, Vec<meshca::pki::bundle::BundleError>>,
) -> serde_json::Value {
    use meshca::pki::bundle::{self, BundleError};
    let certificates = |pem: &str| -> Vec<serde_json::Value> {
        decode_certificates(pem)
            .unwrap_or_default()
            .iter()
            .map(|cert| {
                let tbs = cert.tbs_certificate();
                serde_json::json!({
                    "subject": tbs.subject().to_string(),
                    "issuer": tbs.issuer().to_string(),
                    "serial": meshca::pki::profile::serial_hex(tbs.serial_number()),
                    "sha256": bundle::fingerprint(cert),
                    "not_before": rfc3339(tbs.validity().not_before.to_system_time()),
                    "not_after": rfc3339(tbs.validity().not_after.to_system_time()),
                })
            })
            .collect()
    };
    let findings: Vec<serde_json::Value> = match verified {
        Ok(_) => Vec::new(),
        Err(findings) => findings
            .iter()
            .map(|e| {
                let file = match e {
                    BundleError::File { file, .. } => Some(*file),
                    BundleError::KeyMismatch => Some(bundle::CA_KEY),
                    BundleError::NotCa | BundleError::Profile(_) => Some(bundle::CA_CERT),
                    BundleError::ChainStart | BundleError::ChainLink { .. } => {
                        Some(bundle::CERT_CHAIN)
                    }
                    BundleError::NoTrustedRoot
                    | BundleError::NotSelfIssued(_)
                    | BundleError::BadAnchor(_)
                    | BundleError::UnexpectedRoot { .. } => Some(bundle::ROOT_CERT),
                    BundleError::Expired { .. } | BundleError::NotYetValid { .. } => None,
                };
                serde_json::json!({"severity": "error", "file": file, "message": e.to_string()})
            })
            .collect(),
    };
    let summary = verified.as_ref().ok();
    let names = [
        bundle::CA_CERT,
        bundle::CA_KEY,
        bundle::CERT_CHAIN,
        bundle::ROOT_CERT,
    ];
    let files_read: Vec<String> = names
        .iter()
        .map(|name| dir.join(name).display().to_string())
        .collect();
    serde_json::json!({
        "dir": dir.display().to_string(),
        "files": files_read,
        "valid": summary.is_some(),
        "findings": findings,
        "intermediate": summary.map(|s| serde_json::json!({
            "subject": s.subject,
            "issuer": s.issuer,
            "serial": s.serial,
            "key_type": s.key,
            "not_before": rfc3339(s.not_before),
            "not_after": rfc3339(s.not_after),
        })),
        "anchor_sha256": summary.map(|s| s.anchor_fingerprint.clone()),
        "chain": certificates(&files.cert_chain),
        "roots": certificates(&files.root_cert),
    })
}
