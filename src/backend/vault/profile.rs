//! What meshca asks Vault for, and how it checks what Vault hands back, as pure functions.
//!
//! Vault's `sign-intermediate` applies no role policy and, with `use_csr_values`, copies
//! the CSR's subject and extensions verbatim. So meshca asks for every field of its own
//! profile explicitly (subject from the policy, pathlen 0, keyUsage, notAfter, signature
//! algorithm), and re-checks each certificate Vault returns with the same linter the
//! PKCS#11 path uses before anything leaves the signer. An intermediate with name
//! constraints (a virtual mesh with trust domains) cannot be asked for so (OpenBao ignores
//! `permitted_uri_domains`): meshca builds its whole TBS and has `sign-self-issued` sign it.

use std::time::{Duration, SystemTime};

use der::DateTime;
use serde_json::{Value, json};
use x509_cert::Certificate;

use crate::backend::{BackendError, IssueRequest};
use crate::pki::keys::KeyType;
use crate::pki::lint::{check_subject_values, lint_intermediate, lint_root_profile};
use crate::pki::pem::{decode_certificates, encode};
use crate::pki::profile::{RootCa, verify_certificate_signature};
use crate::pki::sigalg::SignatureAlgorithm;
use crate::policy::rules::BACKDATE;

/// Vault's names for meshca's intermediate keyUsage (keyCertSign, cRLSign,
/// digitalSignature; see `pki::profile::intermediate_key_usage`).
pub const INTERMEDIATE_KEY_USAGE: [&str; 3] = ["DigitalSignature", "CertSign", "CRLSign"];
/// Vault's names for meshca's root keyUsage (keyCertSign, cRLSign).
pub const ROOT_KEY_USAGE: [&str; 2] = ["CertSign", "CRLSign"];

/// `signature_bits` for Vault: the hash size of the algorithm meshca expects the root to
/// sign with (SHA-384 for a P-384 root, SHA-256 otherwise).
pub fn signature_bits(algorithm: SignatureAlgorithm) -> u32 {
    match algorithm {
        SignatureAlgorithm::EcdsaSha384 | SignatureAlgorithm::RsaPkcs1Sha384 => 384,
        SignatureAlgorithm::EcdsaSha512 | SignatureAlgorithm::RsaPkcs1Sha512 => 512,
        SignatureAlgorithm::EcdsaSha256 | SignatureAlgorithm::RsaPkcs1Sha256 => 256,
    }
}

/// RFC 3339 in whole seconds (certificates carry no fractions; rounding down keeps the
/// time within the policy's limit).
pub fn rfc3339_seconds(time: SystemTime) -> Result<String, String> {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| "time before 1970".to_string())?
        .as_secs();
    DateTime::from_unix_duration(Duration::from_secs(secs))
        .map(|dt| dt.to_string())
        .map_err(|e| format!("time cannot be written: {e}"))
}

/// The Vault endpoint that signs an intermediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueEndpoint {
    /// `<mount>/issuer/<ref>/sign-intermediate`: Vault builds the certificate from the
    /// CSR's key and the fields meshca names; it picks the serial, and stores the
    /// certificate (`<mount>/certs`).
    SignIntermediate,
    /// `<mount>/issuer/<ref>/sign-self-issued`: meshca builds the whole certificate, Vault
    /// puts in the root's name as issuer and signs; it stores nothing.
    SignSelfIssued,
}

/// The endpoint and body that issue an approved request.
///
/// Under a virtual mesh with trust domains the intermediate needs critical URI name
/// constraints, and `sign-intermediate` cannot be made to write them (OpenBao 2.x ignores
/// `permitted_uri_domains`): `sign-self-issued`, given meshca's exact TBS, keeps them.
/// Without trust domains `sign-intermediate` stays, as before: Vault then keeps each
/// intermediate in `<mount>/certs` (listed, revocable by serial), a record the other
/// endpoint does not leave.
pub fn issue_call(request: &IssueRequest, root: &RootCa) -> Result<(IssueEndpoint, Value), String> {
    let endpoint = endpoint_for(request);
    let body = match endpoint {
        IssueEndpoint::SignIntermediate => sign_intermediate_body(request, root)?,
        IssueEndpoint::SignSelfIssued => sign_self_issued_body(request, root)?,
    };
    Ok((endpoint, body))
}

/// Which endpoint signs `request` (see [`issue_call`]).
pub fn endpoint_for(request: &IssueRequest) -> IssueEndpoint {
    if request.trust_domains.is_empty() {
        IssueEndpoint::SignIntermediate
    } else {
        IssueEndpoint::SignSelfIssued
    }
}

/// The body of `POST <mount>/issuer/<ref>/sign-self-issued` for an approved request: the
/// intermediate's exact TBS ([`crate::pki::profile::intermediate_template_tbs`]: meshca's
/// profile, the plan's subject, key, serial and dates, AKI the root's SKI, the name
/// constraints), named as issued by itself, as the endpoint demands. Vault replaces the
/// issuer name and the signature and keeps the rest. With
/// `require_matching_certificate_algorithms` false an intermediate key of another type
/// than the root's (RSA under an ECDSA root) is signed too, with the root's algorithm.
pub fn sign_self_issued_body(request: &IssueRequest, root: &RootCa) -> Result<Value, String> {
    let tbs =
        crate::pki::profile::intermediate_template_tbs(&request.plan, root, &request.trust_domains)
            .map_err(|e| e.to_string())?;
    // Vault parses the template and never checks its signature; nobody here could make
    // one anyway (the intermediate's key stays with the agent, and a self-issued
    // certificate claims to be signed by it). So the template carries an empty one. The
    // algorithm is the root's: Vault signs with the one the template names.
    let der = crate::pki::profile::assemble(&tbs, root.signature_algorithm, &[])
        .map_err(|e| e.to_string())?;
    Ok(json!({
        "certificate": encode("CERTIFICATE", &der),
        "require_matching_certificate_algorithms": false,
    }))
}

/// The body of `POST <mount>/issuer/<ref>/sign-intermediate` for an approved request
/// without trust domains (the name constraints go through [`sign_self_issued_body`]).
pub fn sign_intermediate_body(request: &IssueRequest, root: &RootCa) -> Result<Value, String> {
    if !request.trust_domains.is_empty() {
        return Err("name constraints cannot be asked of sign-intermediate (OpenBao ignores permitted_uri_domains); sign-self-issued writes them".into());
    }
    let common_name = request
        .plan
        .subject
        .common_name()
        .ok()
        .flatten()
        .map(String::from)
        .ok_or("the planned subject has no common name")?;
    if request.csr_der.is_empty() {
        return Err("the request carries no CSR for Vault".into());
    }
    Ok(json!({
        "csr": encode("CERTIFICATE REQUEST", &request.csr_der),
        // Nothing from the CSR but its key: subject and extensions are meshca's.
        "use_csr_values": false,
        "common_name": common_name,
        "organization": [request.org_name],
        "exclude_cn_from_sans": true,
        "not_after": rfc3339_seconds(request.plan.not_after)?,
        // Backdated as the token path does (Vault's default is 30 s): an agent whose
        // clock is a few minutes behind still takes the intermediate.
        "not_before_duration": format!("{}s", BACKDATE.as_secs()),
        "max_path_length": 0,
        "key_usage": INTERMEDIATE_KEY_USAGE,
        "signature_bits": signature_bits(root.signature_algorithm),
        "use_pss": false,
        "format": "pem",
    }))
}

/// Vault's `key_type` and `key_bits` for a meshca key type.
pub fn vault_key_type(key_type: KeyType) -> (&'static str, u32) {
    match key_type {
        KeyType::Rsa2048 => ("rsa", 2048),
        KeyType::Rsa3072 => ("rsa", 3072),
        KeyType::Rsa4096 => ("rsa", 4096),
        KeyType::EcdsaP256 => ("ec", 256),
        KeyType::EcdsaP384 => ("ec", 384),
    }
}

/// What the root should be.
pub struct RootRequest<'a> {
    pub key_type: KeyType,
    pub org_name: &'a str,
    pub common_name: &'a str,
    pub ttl: Duration,
    pub issuer_name: &'a str,
}

/// The body of `POST <mount>/root/generate/internal`: the key is made inside Vault and
/// never exported; the certificate follows meshca's root profile.
pub fn root_generate_body(root: &RootRequest<'_>) -> Value {
    let (key_type, key_bits) = vault_key_type(root.key_type);
    json!({
        "common_name": root.common_name,
        "organization": [root.org_name],
        "exclude_cn_from_sans": true,
        "ttl": format!("{}s", root.ttl.as_secs()),
        // Dated back as the token path dates its roots and every intermediate: Vault's
        // own 30 s would leave intermediates issued in the first minutes starting before
        // their root, refused by a cluster whose clock is a little behind.
        "not_before_duration": format!("{}s", BACKDATE.as_secs()),
        "key_type": key_type,
        "key_bits": key_bits,
        "max_path_length": crate::pki::profile::ROOT_PATH_LEN,
        "key_usage": ROOT_KEY_USAGE,
        "signature_bits": signature_bits(SignatureAlgorithm::for_key_type(root.key_type)),
        "use_pss": false,
        "issuer_name": root.issuer_name,
        "format": "pem",
    })
}

/// Warnings Vault attached to an answer.
pub fn warnings(answer: &Value) -> Vec<String> {
    answer
        .get("warnings")
        .and_then(Value::as_array)
        .map(|w| {
            w.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// A string field of the answer's `data`.
pub fn data_str<'a>(answer: &'a Value, field: &str) -> Option<&'a str> {
    answer.get("data")?.get(field)?.as_str()
}

/// Exactly one certificate from a PEM field of Vault's answer.
fn one_certificate(pem: &str) -> Result<Certificate, String> {
    let mut certs = decode_certificates(pem).map_err(|e| e.to_string())?;
    if certs.len() != 1 {
        return Err(format!("expected one certificate, got {}", certs.len()));
    }
    Ok(certs.remove(0))
}

/// Vault's answer to `sign-self-issued` for `announced`: a cross certificate under
/// `root` ([`crate::pki::cross::check_cross`]), or out of policy.
pub fn check_cross(
    answer: &Value,
    announced: &RootCa,
    root: &RootCa,
) -> Result<Certificate, BackendError> {
    let out = |m: String| BackendError::OutOfPolicy(format!("cross certificate: {m}"));
    let pem = data_str(answer, "certificate")
        .ok_or_else(|| out("Vault's answer has no data.certificate".into()))?;
    let certificate = one_certificate(pem).map_err(|e| out(format!("data.certificate: {e}")))?;
    crate::pki::cross::check_cross(&certificate, &root.certificate, &announced.certificate)
        .and_then(|()| crate::pki::cross::check_cross_key_ids(&certificate, root, announced))
        .map_err(|e| out(e.to_string()))?;
    Ok(certificate)
}

/// What meshca gives `sign-self-issued` for `announced`: a self-issued certificate (its
/// subject as issuer too, as the endpoint demands) with the cross certificate's profile,
/// serial, dates and AKI (the root's SKI). Vault keeps all of it but the issuer name and
/// the signature: fed the announced root as it is, Vault would keep that root's own
/// serial, dates and AKI (Go keeps a template's AKI when issuer and subject names are the
/// same, as two roots of one org's default name are), and openssl would then take the
/// cross certificate for self-signed. Vault does not check the template's signature
/// (nobody could sign it: the announced root's key is not the one signing), so it carries
/// the announced root's own.
pub fn cross_template(announced: &RootCa, root: &RootCa) -> Result<String, BackendError> {
    let check = |e: String| BackendError::Check(format!("cross certificate template: {e}"));
    let plan = crate::pki::cross::cross_plan(announced, root, std::time::SystemTime::now())
        .map_err(|e| check(e.to_string()))?;
    let tbs = crate::pki::profile::cross_template_tbs(&plan, announced, root)
        .map_err(|e| check(e.to_string()))?;
    let signature = announced
        .certificate
        .signature()
        .as_bytes()
        .ok_or_else(|| check("the announced root's signature is not whole bytes".into()))?;
    let der = crate::pki::profile::assemble(&tbs, root.signature_algorithm, signature)
        .map_err(|e| check(e.to_string()))?;
    Ok(crate::pki::pem::encode("CERTIFICATE", &der))
}

/// Re-checks the intermediate Vault signed: one certificate, signed by the root key meshca
/// knows, carrying exactly meshca's profile and the policy (org, subject, key, notAfter,
/// extensions, the name constraints). From `sign-intermediate` the serial is Vault's
/// choice and notBefore its clock's, within [`not_before_finding`]'s bounds; from
/// `sign-self-issued`, which keeps what meshca built, the serial, subject, key and dates
/// must be the plan's exactly. Anything else is out of policy and never handed out.
pub fn check_intermediate(
    answer: &Value,
    request: &IssueRequest,
    root: &RootCa,
    endpoint: IssueEndpoint,
) -> Result<Certificate, BackendError> {
    let out = |m: String| BackendError::OutOfPolicy(m);
    let pem = data_str(answer, "certificate")
        .ok_or_else(|| out("Vault's answer has no data.certificate".into()))?;
    let certificate = one_certificate(pem).map_err(|e| out(format!("data.certificate: {e}")))?;
    // The refusal names what Vault signed, so that the audit log can be matched against
    // Vault's list of issued certificates (`sign-intermediate` keeps each; what
    // `sign-self-issued` signs is in the audit log only).
    let serial = crate::pki::profile::serial_hex(certificate.tbs_certificate().serial_number());
    let kept = match endpoint {
        IssueEndpoint::SignIntermediate => "Vault keeps it",
        IssueEndpoint::SignSelfIssued => "sign-self-issued, Vault stores no copy",
    };
    let out = |m: String| {
        BackendError::OutOfPolicy(format!("Vault signed serial {serial} ({kept}): {m}"))
    };
    verify_certificate_signature(&certificate, &root.verifier).map_err(|e| {
        out(format!(
            "the certificate is not signed by the root key of the configured root certificate ({e}); does vault.issuer_ref name another issuer?"
        ))
    })?;
    let tbs = certificate.tbs_certificate();
    let mut findings = Vec::new();
    let exact_plan = endpoint == IssueEndpoint::SignSelfIssued;
    if let Err(f) = lint_intermediate(tbs, &request.expectations(root, exact_plan)) {
        findings.extend(f.0);
    }
    if let Err(f) = check_subject_values(tbs, &request.plan.subject) {
        findings.extend(f.0);
    }
    if !exact_plan {
        let not_before = tbs.validity().not_before.to_system_time();
        findings.extend(not_before_finding(
            not_before,
            request.plan.not_before,
            SystemTime::now(),
        ));
    }
    if findings.is_empty() {
        return Ok(certificate);
    }
    // Vault names the fields it did not understand: say so, it explains the findings.
    let ignored: Vec<String> = warnings(answer)
        .into_iter()
        .filter(|w| w.contains("ignored"))
        .collect();
    let mut message = findings.join("; ");
    if !ignored.is_empty() {
        message.push_str(&format!(" (Vault warned: {})", ignored.join("; ")));
    }
    Err(out(message))
}

/// How much earlier than meshca's planned notBefore Vault's may be (its clock behind):
/// beyond that the clocks disagree by more than any NTP-kept pair does.
pub const VAULT_CLOCK_BEHIND_LEEWAY: Duration = Duration::from_secs(60 * 60);

/// `sign-intermediate` takes its notBefore from Vault's clock (less the [`BACKDATE`]
/// asked). Later than this signer's clock, no verifier whose clock agrees would take the
/// intermediate yet: istiod would sign with a CA its workloads refuse. Far earlier, the
/// intermediate claims a validity from before it was asked for. Either names the clocks.
pub fn not_before_finding(
    not_before: SystemTime,
    planned: SystemTime,
    now: SystemTime,
) -> Option<String> {
    let stamp = crate::pki::datetime::rfc3339;
    if let Ok(ahead) = not_before.duration_since(now)
        && ahead >= Duration::from_secs(1)
    {
        return Some(format!(
            "notBefore {} is {}s after this signer's clock ({}): a verifier whose clock agrees would not take the intermediate yet; is Vault's clock ahead by more than the {}s of backdating asked?",
            stamp(not_before),
            ahead.as_secs(),
            stamp(now),
            BACKDATE.as_secs()
        ));
    }
    if let Ok(behind) = planned.duration_since(not_before)
        && behind > VAULT_CLOCK_BEHIND_LEEWAY
    {
        return Some(format!(
            "notBefore {} is {}s before the {} meshca planned, more than the {}s allowed: is Vault's clock behind?",
            stamp(not_before),
            behind.as_secs(),
            stamp(planned),
            VAULT_CLOCK_BEHIND_LEEWAY.as_secs()
        ));
    }
    None
}

/// Checks a root certificate Vault generated or holds: self-signed, meshca's root profile,
/// the policy's org, key rule and lifetime, and the configured key type.
pub fn check_root(
    pem: &str,
    key_type: KeyType,
    org_name: &str,
    min_rsa_bits: u32,
    max_ttl: Duration,
) -> Result<RootCa, String> {
    let certificate = one_certificate(pem)?;
    lint_root_profile(
        certificate.tbs_certificate(),
        org_name,
        min_rsa_bits,
        max_ttl,
    )
    .map_err(|e| e.to_string())?;
    let root = RootCa::from_certificate(certificate).map_err(|e| e.to_string())?;
    // The exponent passed the policy's rule above (lint_root_profile).
    if !key_type.is_type_of(&root.key_kind) {
        return Err(format!(
            "the root key is {}, but root.key_type is {key_type}",
            root.key_kind
        ));
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use der::{Decode, Encode};
    use x509_cert::builder::{Builder, CertificateBuilder, Profile as BuilderProfile};
    use x509_cert::ext::Extension;
    use x509_cert::ext::pkix::{
        AuthorityKeyIdentifier, BasicConstraints, KeyUsage, KeyUsages, NameConstraints,
        SubjectKeyIdentifier,
    };
    use x509_cert::name::Name;
    use x509_cert::time::Validity;

    use super::*;
    use crate::pki::csr::build_csr;
    use crate::pki::keys::{PrivateKey, PublicKeyKind, RsaExponent};
    use crate::pki::pem::certificate_pem;
    use crate::pki::profile::{
        IntermediatePlan, intermediate_key_usage, random_serial, subject_name,
    };
    use crate::pki::testing::software_root;

    const DAY: Duration = Duration::from_secs(86_400);

    fn request(root: &RootCa) -> (IssueRequest, PrivateKey) {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let csr = build_csr(&key, subject_name("evil", "x").unwrap()).unwrap();
        let now = SystemTime::now();
        let not_after = now + 10 * DAY;
        let request = IssueRequest {
            plan: IntermediatePlan {
                subject: subject_name("acme", "cluster-a").unwrap(),
                public_key: key.public_key_info().unwrap(),
                serial: random_serial().unwrap(),
                not_before: now,
                not_after,
            },
            org_name: "acme".into(),
            latest_not_after: not_after.min(root.not_after),
            min_rsa_bits: 2048,
            trust_domains: Vec::new(),
            csr_der: csr.to_der().unwrap(),
            client_gone: Default::default(),
            signing_asked: Default::default(),
        };
        (request, key)
    }

    #[test]
    fn the_request_names_every_field_of_the_profile() {
        let (_root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let (request, _) = request(&root);
        let body = sign_intermediate_body(&request, &root).unwrap();
        assert_eq!(body["use_csr_values"], false);
        assert_eq!(body["common_name"], "cluster-a");
        assert_eq!(body["organization"], json!(["acme"]));
        assert_eq!(body["exclude_cn_from_sans"], true);
        assert_eq!(body["max_path_length"], 0);
        assert_eq!(body["not_before_duration"], "300s");
        assert_eq!(body["signature_bits"], 384);
        assert_eq!(body["use_pss"], false);
        let not_after = body["not_after"].as_str().unwrap();
        assert!(
            not_after.ends_with('Z') && not_after.len() == 20,
            "{not_after}"
        );
        let csr = crate::pki::csr::ParsedCsr::from_pem(body["csr"].as_str().unwrap()).unwrap();
        assert_eq!(csr.public_key, request.plan.public_key);
        // Without trust domains: sign-intermediate, no name constraints asked for.
        let (endpoint, called) = issue_call(&request, &root).unwrap();
        assert_eq!(endpoint, IssueEndpoint::SignIntermediate);
        assert_eq!(called, body);
        assert!(body.get("permitted_uri_domains").is_none(), "{body}");
        // Vault's names map to exactly meshca's keyUsage bits.
        let mut bits = KeyUsages::KeyCertSign & KeyUsages::CRLSign;
        for name in INTERMEDIATE_KEY_USAGE {
            bits |= match name {
                "DigitalSignature" => KeyUsages::DigitalSignature,
                "CertSign" => KeyUsages::KeyCertSign,
                "CRLSign" => KeyUsages::CRLSign,
                other => panic!("unmapped {other}"),
            };
        }
        assert_eq!(KeyUsage(bits), intermediate_key_usage());
    }

    fn constrained(request: &IssueRequest) -> IssueRequest {
        IssueRequest {
            trust_domains: vec!["pay.local".into(), "pay.remote".into()],
            ..request.clone()
        }
    }

    /// Under trust domains: sign-self-issued, given the intermediate meshca would sign on
    /// the token path (the same TBS but for the issuer, which Vault puts in), self-issued
    /// as the endpoint demands.
    #[test]
    fn name_constraints_go_to_sign_self_issued_in_meshcas_own_tbs() {
        let (_root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let (request, _) = request(&root);
        let request = constrained(&request);
        let (endpoint, body) = issue_call(&request, &root).unwrap();
        assert_eq!(endpoint, IssueEndpoint::SignSelfIssued);
        assert_eq!(body, sign_self_issued_body(&request, &root).unwrap());
        assert_eq!(body["require_matching_certificate_algorithms"], false);
        assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
        // sign-intermediate is never asked for them (OpenBao would drop them).
        let refused = sign_intermediate_body(&request, &root).unwrap_err();
        assert!(refused.contains("permitted_uri_domains"), "{refused}");

        let template = one_certificate(body["certificate"].as_str().unwrap()).unwrap();
        assert_eq!(
            template.signature_algorithm(),
            &root.signature_algorithm.algorithm_identifier()
        );
        let tbs = template.tbs_certificate();
        assert_eq!(
            tbs.to_der().unwrap(),
            crate::pki::profile::intermediate_template_tbs(
                &request.plan,
                &root,
                &request.trust_domains
            )
            .unwrap()
        );
        // Self-issued: the plan's subject as issuer too.
        assert_eq!(tbs.issuer(), &request.plan.subject);
        assert_eq!(tbs.subject(), &request.plan.subject);
        // Everything but the issuer is the intermediate the token path signs.
        let signed = crate::pki::profile::decode_tbs(
            &crate::pki::profile::intermediate_tbs(&request.plan, &root, &request.trust_domains)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(signed.issuer(), &root.subject);
        assert_eq!(tbs.serial_number(), &request.plan.serial);
        assert_eq!(tbs.serial_number(), signed.serial_number());
        assert_eq!(tbs.validity(), signed.validity());
        assert_eq!(tbs.subject_public_key_info(), &request.plan.public_key);
        assert_eq!(tbs.signature(), signed.signature());
        assert_eq!(tbs.extensions(), signed.extensions());
        let (critical, constraints) = tbs.get_extension::<NameConstraints>().unwrap().unwrap();
        assert!(critical);
        assert_eq!(constraints.permitted_subtrees.unwrap().len(), 2);
        let (_, aki) = tbs
            .get_extension::<AuthorityKeyIdentifier>()
            .unwrap()
            .unwrap();
        assert_eq!(
            aki.key_identifier.unwrap().as_bytes(),
            root.subject_key_id.as_slice()
        );
    }

    /// What sign-self-issued returns must be exactly what meshca built (serial and dates
    /// included, which sign-intermediate chooses itself), with the name constraints.
    #[test]
    fn a_self_issued_answer_must_be_the_plan_exactly() {
        let (root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let (request, _) = request(&root);
        let request = constrained(&request);
        let signed = |plan: &IntermediatePlan, trust_domains: &[String]| {
            let tbs = crate::pki::profile::intermediate_tbs(plan, &root, trust_domains).unwrap();
            let (algorithm, signature) = crate::pki::csr::sign_with(&root_key, &tbs).unwrap();
            let der = crate::pki::profile::assemble(&tbs, algorithm, &signature).unwrap();
            let cert = Certificate::from_der(&der).unwrap();
            json!({"data": {"certificate": certificate_pem(&cert)}})
        };
        let good = signed(&request.plan, &request.trust_domains);
        check_intermediate(&good, &request, &root, IssueEndpoint::SignSelfIssued).unwrap();

        let other_serial = IntermediatePlan {
            serial: random_serial().unwrap(),
            ..request.plan.clone()
        };
        let later = IntermediatePlan {
            not_before: request.plan.not_before + Duration::from_secs(60),
            ..request.plan.clone()
        };
        let cases = [
            (
                signed(&other_serial, &request.trust_domains),
                "serial differs from the plan",
            ),
            (
                signed(&later, &request.trust_domains),
                "validity differs from the plan",
            ),
            (
                signed(&request.plan, &[]),
                "nameConstraints is missing; the virtual mesh permits only the trust domains pay.local, pay.remote",
            ),
            (
                signed(&request.plan, &["pay.local".to_string()]),
                "nameConstraints permits the trust domains pay.local, the virtual mesh",
            ),
        ];
        for (answer, needle) in cases {
            match check_intermediate(&answer, &request, &root, IssueEndpoint::SignSelfIssued) {
                Err(BackendError::OutOfPolicy(m)) => {
                    assert!(m.contains(needle), "{needle:?} not in {m}");
                    assert!(m.contains("Vault stores no copy"), "{m}");
                }
                other => panic!("{needle}: {other:?}"),
            }
        }
        // sign-intermediate picks serial and notBefore: not held to the plan's.
        let unconstrained = IssueRequest {
            trust_domains: Vec::new(),
            ..request.clone()
        };
        check_intermediate(
            &signed(&other_serial, &[]),
            &unconstrained,
            &root,
            IssueEndpoint::SignIntermediate,
        )
        .unwrap();
    }

    #[test]
    fn not_after_is_rounded_down_to_the_second() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_999);
        assert_eq!(rfc3339_seconds(t).unwrap(), "2026-11-18T11:06:40Z");
    }

    /// Signs like Vault would (Go's encoding aside), with chosen extensions and subject.
    struct Fake {
        subject: Name,
        issuer: Name,
        extensions: Vec<Extension>,
    }

    impl BuilderProfile for Fake {
        fn get_issuer(&self, _: &Name) -> Name {
            self.issuer.clone()
        }
        fn get_subject(&self) -> Name {
            self.subject.clone()
        }
        fn build_extensions(
            &self,
            _: spki::SubjectPublicKeyInfoRef<'_>,
            _: spki::SubjectPublicKeyInfoRef<'_>,
            _: &x509_cert::TbsCertificate,
        ) -> x509_cert::builder::Result<Vec<Extension>> {
            Ok(self.extensions.clone())
        }
    }

    fn ext<E: const_oid::AssociatedOid + Encode>(value: &E, critical: bool) -> Extension {
        use x509_cert::ext::ToExtension;
        (critical, value)
            .to_extension(&Name::default(), &[])
            .unwrap()
    }

    fn vault_answer(
        signer: &PrivateKey,
        root: &RootCa,
        request: &IssueRequest,
        subject: Name,
        extra: Vec<Extension>,
    ) -> Value {
        let not_before = SystemTime::now() - Duration::from_secs(30);
        vault_answer_from(signer, root, request, subject, extra, not_before)
    }

    /// Vault's answer with the notBefore its clock would give.
    fn vault_answer_from(
        signer: &PrivateKey,
        root: &RootCa,
        request: &IssueRequest,
        subject: Name,
        extra: Vec<Extension>,
        not_before: SystemTime,
    ) -> Value {
        let mut extensions = vec![
            ext(
                &BasicConstraints {
                    ca: true,
                    path_len_constraint: Some(0),
                },
                true,
            ),
            ext(&intermediate_key_usage(), true),
            ext(
                &SubjectKeyIdentifier(der::asn1::OctetString::new(vec![7; 20]).unwrap()),
                false,
            ),
            ext(
                &AuthorityKeyIdentifier {
                    key_identifier: Some(
                        der::asn1::OctetString::new(root.subject_key_id.clone()).unwrap(),
                    ),
                    authority_cert_issuer: None,
                    authority_cert_serial_number: None,
                },
                false,
            ),
        ];
        extensions.extend(extra);
        let profile = Fake {
            subject,
            issuer: root.subject.clone(),
            extensions,
        };
        let validity = Validity::new(
            not_before.try_into().unwrap(),
            request.plan.not_after.try_into().unwrap(),
        );
        let PrivateKey::P384(issuer_key) = signer else {
            unreachable!()
        };
        let mut builder = CertificateBuilder::new(
            profile,
            random_serial().unwrap(),
            validity,
            request.plan.public_key.clone(),
        )
        .unwrap();
        let tbs = builder.finalize(issuer_key).unwrap();
        let (algorithm, signature) = crate::pki::csr::sign_with(signer, &tbs).unwrap();
        let der = crate::pki::profile::assemble(&tbs, algorithm, &signature).unwrap();
        let cert = Certificate::from_der(&der).unwrap();
        json!({"data": {"certificate": certificate_pem(&cert)}, "warnings": []})
    }

    #[test]
    fn a_conforming_answer_passes_and_anything_else_is_out_of_policy() {
        let (root_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let (request, _) = request(&root);
        let good = vault_answer(
            &root_key,
            &root,
            &request,
            request.plan.subject.clone(),
            vec![],
        );
        check_intermediate(&good, &request, &root, IssueEndpoint::SignIntermediate).unwrap();

        let aia = Extension {
            extn_id: const_oid::db::rfc5280::ID_PE_AUTHORITY_INFO_ACCESS,
            critical: false,
            extn_value: der::asn1::OctetString::new(vec![0x30, 0x00]).unwrap(),
        };
        let (impostor, _) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        // A conforming answer but for the notBefore Vault's clock gave it.
        let dated = |not_before: SystemTime| {
            let subject = request.plan.subject.clone();
            vault_answer_from(&root_key, &root, &request, subject, vec![], not_before)
        };
        let cases: Vec<(Value, &str)> = vec![
            (
                vault_answer(
                    &root_key,
                    &root,
                    &request,
                    request.plan.subject.clone(),
                    vec![aia],
                ),
                "unexpected extension 1.3.6.1.5.5.7.1.1",
            ),
            (
                vault_answer(
                    &root_key,
                    &root,
                    &request,
                    subject_name("evil", "cluster-a").unwrap(),
                    vec![],
                ),
                "organization",
            ),
            (
                vault_answer(
                    &root_key,
                    &root,
                    &request,
                    subject_name("acme", "cluster-b").unwrap(),
                    vec![],
                ),
                "subject is",
            ),
            (
                vault_answer(
                    &impostor,
                    &root,
                    &request,
                    request.plan.subject.clone(),
                    vec![],
                ),
                "not signed by the root key",
            ),
            (json!({"data": {}}), "no data.certificate"),
            // Vault's clock ten minutes ahead: its 300 s of backdating still in the future.
            (
                dated(SystemTime::now() + Duration::from_secs(300)),
                "after this signer's clock",
            ),
            (
                dated(request.plan.not_before - 2 * VAULT_CLOCK_BEHIND_LEEWAY),
                "is Vault's clock behind?",
            ),
        ];
        for (answer, needle) in cases {
            match check_intermediate(&answer, &request, &root, IssueEndpoint::SignIntermediate) {
                Err(BackendError::OutOfPolicy(m)) => {
                    assert!(m.contains(needle), "{needle:?} not in {m}")
                }
                other => panic!("{needle}: {other:?}"),
            }
        }
    }

    #[test]
    fn vaults_not_before_may_lag_within_the_leeway_never_lead() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let planned = now - BACKDATE;
        // Vault's clock as meshca's, a little ahead, or behind within the leeway.
        for not_before in [
            planned,
            now,
            planned - VAULT_CLOCK_BEHIND_LEEWAY,
            now + Duration::from_millis(999),
        ] {
            assert_eq!(not_before_finding(not_before, planned, now), None);
        }
        let ahead = not_before_finding(now + Duration::from_secs(61), planned, now).unwrap();
        assert!(ahead.contains("61s after this signer's clock"), "{ahead}");
        assert!(ahead.contains("(2027-01-15T08:00:00.000Z)"), "{ahead}");
        let behind = planned - VAULT_CLOCK_BEHIND_LEEWAY - Duration::from_secs(1);
        let behind = not_before_finding(behind, planned, now).unwrap();
        assert!(behind.contains("3601s before"), "{behind}");
    }

    #[test]
    fn root_bodies_ask_for_the_root_profile() {
        let body = root_generate_body(&RootRequest {
            key_type: KeyType::Rsa4096,
            org_name: "acme",
            common_name: "acme root CA",
            ttl: 30 * DAY,
            issuer_name: "meshca-root",
        });
        assert_eq!(body["key_type"], "rsa");
        assert_eq!(body["key_bits"], 4096);
        assert_eq!(body["ttl"], "2592000s");
        assert_eq!(body["not_before_duration"], "300s");
        assert_eq!(body["max_path_length"], 1);
        assert_eq!(body["signature_bits"], 256);
        assert_eq!(body["key_usage"], json!(["CertSign", "CRLSign"]));
    }

    #[test]
    fn a_root_outside_policy_is_named() {
        let (_key, root) = software_root(KeyType::EcdsaP384, "acme", 100 * DAY);
        let pem = root.pem.clone();
        check_root(&pem, KeyType::EcdsaP384, "acme", 2048, 100 * DAY).unwrap();
        let cases = [
            (
                check_root(&pem, KeyType::EcdsaP384, "other", 2048, 100 * DAY),
                "organization",
            ),
            (
                check_root(&pem, KeyType::EcdsaP384, "acme", 2048, 10 * DAY),
                "lifetime",
            ),
            (
                check_root(&pem, KeyType::Rsa4096, "acme", 2048, 100 * DAY),
                "root.key_type",
            ),
        ];
        for (result, needle) in cases {
            let err = result.unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }

    /// A root made elsewhere (an issuer adopted into Vault) in meshca's root profile, by
    /// openssl, with an RSA-2048 key of public exponent `exponent`.
    fn openssl_rsa_root(exponent: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| crate::pki::testing::openssl(dir.path(), args);
        std::fs::write(
            dir.path().join("root.cnf"),
            "[req]\ndistinguished_name = dn\nx509_extensions = root_ext\nprompt = no\n\
             [dn]\nO = acme\nCN = acme root\n\
             [root_ext]\nbasicConstraints = critical,CA:true,pathlen:1\n\
             keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid:always\n",
        )
        .unwrap();
        let public_exponent = format!("rsa_keygen_pubexp:{exponent}");
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-pkeyopt",
            &public_exponent,
            "-out",
            "root.key",
        ]);
        openssl(&[
            "req", "-x509", "-new", "-key", "root.key", "-config", "root.cnf", "-days", "30",
            "-sha256", "-out", "root.pem",
        ]);
        std::fs::read_to_string(dir.path().join("root.pem")).unwrap()
    }

    #[test]
    fn a_root_key_is_of_its_key_type_whatever_exponent_the_policy_accepts() {
        let pem = openssl_rsa_root("65539");
        let root = check_root(&pem, KeyType::Rsa2048, "acme", 2048, 30 * DAY).unwrap();
        assert_eq!(
            root.key_kind,
            PublicKeyKind::Rsa {
                modulus_bits: 2048,
                exponent: RsaExponent::Small(65539)
            }
        );
        // Another size is named as one, not as the same key twice.
        let err = check_root(&pem, KeyType::Rsa3072, "acme", 2048, 30 * DAY).unwrap_err();
        assert_eq!(
            err,
            "the root key is RSA-2048, but root.key_type is rsa3072"
        );
        // An exponent the policy refuses is refused by name.
        let err = check_root(
            &openssl_rsa_root("3"),
            KeyType::Rsa2048,
            "acme",
            2048,
            30 * DAY,
        )
        .unwrap_err();
        assert!(
            err.contains("RSA public exponent 3 is not accepted"),
            "{err}"
        );
    }
}
