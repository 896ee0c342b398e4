//! The signing decision, as a pure function: who asks, for which mesh, with which CSR,
//! against which policy. Returns the plan to issue, or the refusal with its status, code
//! and message. No I/O: the clock reading and the serial are passed in.

use std::time::{Duration, SystemTime};

use const_oid::ObjectIdentifier;
use serde::Deserialize;
use x509_cert::serial_number::SerialNumber;

use crate::backend::IssueRequest;
use crate::config::AuthorizationTable;
use crate::pki::csr::ParsedCsr;
use crate::pki::lint::subject_values;
use crate::pki::profile::{IntermediatePlan, RootCa, subject_name};
use crate::policy::rules::{check_org, check_public_key, intermediate_validity};
use crate::policy::{ObjectRef, PolicySet, Rule, ValidityError};
use crate::tlsutil::{ClientCa, NoIdentity};

/// The body of `POST /v1/sign`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignRequest {
    pub virtual_mesh: String,
    pub mesh: String,
    pub csr: String,
    /// Optional shorter lifetime; never more than the policy's ttlDays.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// HTTP status classes the API answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    BadRequest = 400,
    Forbidden = 403,
    NotFound = 404,
    RequestTimeout = 408,
    PayloadTooLarge = 413,
    UnsupportedMediaType = 415,
    TooManyRequests = 429,
    /// nginx's code for a client that closed its connection first; nobody reads the answer,
    /// the audit line is what matters.
    ClientClosedRequest = 499,
    Internal = 500,
    BadGateway = 502,
    Unavailable = 503,
}

/// A refused request: what the client is told, and what the audit log records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub code: &'static str,
    pub message: String,
    /// Seconds the client should wait before retrying (429).
    pub retry_after_secs: Option<u64>,
}

impl Refusal {
    /// Control characters in `message` (it may quote the request: a JSON field name, a
    /// client's CN) are escaped, so a client cannot start a line of its own in the signer's
    /// text log, and a long message is cut (see [`clip`]).
    pub fn new(status: Status, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: clip(&escape_control(message.into()), MAX_MESSAGE),
            retry_after_secs: None,
        }
    }

    fn policy(rule: Rule, message: String) -> Self {
        Refusal::new(Status::Forbidden, rule.code(), message)
    }

    /// `deny` for refusals of the request, `error` when the signer could not do its part.
    pub fn decision(&self) -> &'static str {
        match self.status {
            Status::Internal | Status::BadGateway | Status::Unavailable => "error",
            _ => "deny",
        }
    }
}

use crate::logging::clip;

/// Longest refusal message kept: messages quote the request (a Content-Type, a field
/// name, a reference), and each goes into an fsynced audit line and the log, so a client
/// must not choose their size (the rate limit bounds the lines, not their length).
const MAX_MESSAGE: usize = 1024;

/// Longest `virtualMesh` or `mesh` recorded as given: a valid reference is at most 507
/// characters (two names of 253 and a `/`).
const MAX_RECORDED_REF: usize = 512;

/// Most extensions a CSR asked for that a line records by OID, and the longest OID text
/// kept: a CSR of 32 KiB can ask for some 700 long OIDs (a 100 KB fsynced line, per
/// request, issued or refused). A real CSR asks for a handful.
const MAX_RECORDED_EXTENSIONS: usize = 16;
const MAX_RECORDED_OID: usize = 64;

/// Longest CSR subject recorded (RFC 4514 text): a CSR of 32 KiB can carry a subject of
/// nearly as much.
const MAX_RECORDED_SUBJECT: usize = 256;

/// The OIDs of the extensions (or attributes) a CSR asked for, as recorded: the first
/// [`MAX_RECORDED_EXTENSIONS`], each cut at [`MAX_RECORDED_OID`], then `"... and N more"`.
fn recorded_extensions(oids: &[ObjectIdentifier]) -> Vec<String> {
    let mut recorded: Vec<String> = oids
        .iter()
        .take(MAX_RECORDED_EXTENSIONS)
        .map(|oid| clip(&oid.to_string(), MAX_RECORDED_OID))
        .collect();
    if oids.len() > MAX_RECORDED_EXTENSIONS {
        recorded.push(format!(
            "... and {} more",
            oids.len() - MAX_RECORDED_EXTENSIONS
        ));
    }
    recorded
}

/// `text` with each control character written as its Rust escape (`\n`, `\u{1b}`).
fn escape_control(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Facts gathered while deciding, for the audit line, whatever the outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub virtual_mesh: Option<String>,
    pub mesh: Option<String>,
    pub csr_public_key_sha256: Option<String>,
    pub ignored_csr_extensions: Vec<String>,
    /// The subject the CSR asked for (RFC 4514, control characters escaped, cut at
    /// [`MAX_RECORDED_SUBJECT`] bytes), when its text is not the intermediate's.
    pub ignored_csr_subject: Option<String>,
    /// The OIDs of the CSR's attributes other than extensionRequest (bounded as
    /// `ignored_csr_extensions`).
    pub ignored_csr_attributes: Vec<String>,
    /// The serial the backend signs under, where it is the planned one: on the line of a
    /// request that then failed, once the root key was asked ([`Self::signing_asked`]).
    pub signing_serial: Option<String>,
    /// Whether the root key was asked to sign (noted by the backend as it asks).
    pub signing_asked: crate::backend::SigningAsked,
    /// The CA in `tls.client_ca` the client's chain led to when the request was decided.
    pub client_ca: Option<ClientCa>,
}

impl RequestFacts {
    /// The serial for the audit line of a request that failed: only once the root key was
    /// asked to sign under it (before, nothing was signed, and no certificate has it).
    pub fn signing_serial_asked(&self) -> Option<String> {
        self.signing_serial
            .clone()
            .filter(|_| self.signing_asked.was_asked())
    }
}

/// An approved request: the plan, ready for the backend.
#[derive(Debug, Clone)]
pub struct Approval {
    pub issue: IssueRequest,
    /// notAfter was shortened to the root's expiry.
    pub capped_by_root: bool,
}

/// Who asks: what its certificate names, and which client CA vouched for it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Requester<'a> {
    /// The identity its certificate names, if it names one.
    pub identity: Option<&'a str>,
    /// Why it names none (several URI SANs, ...), if known.
    pub no_identity: Option<NoIdentity>,
    /// The CA in `tls.client_ca` its chain leads to (none: to none now).
    pub client_ca: Option<&'a ClientCa>,
}

/// Everything the decision reads, borrowed from the signer's state.
pub struct DecisionContext<'a> {
    pub policies: &'a PolicySet,
    pub authorization: &'a AuthorizationTable,
    pub root: &'a RootCa,
}

/// Decides a signing request. Order: request shape, virtual mesh and membership (404),
/// the client's issuer and authorization (403), CSR syntax (400), key policy, proof of
/// possession, org, ttl (403).
pub fn decide(
    ctx: &DecisionContext<'_>,
    requester: Requester<'_>,
    request: &SignRequest,
    now: SystemTime,
    serial: SerialNumber,
    facts: &mut RequestFacts,
) -> Result<Approval, Refusal> {
    facts.virtual_mesh = Some(clip(&request.virtual_mesh, MAX_RECORDED_REF));
    facts.mesh = Some(clip(&request.mesh, MAX_RECORDED_REF));
    let bad_ref = |field: &str, e: &dyn std::fmt::Display| {
        Refusal::new(
            Status::BadRequest,
            "malformed_request",
            format!("{field}: {e}"),
        )
    };
    let vm_ref: ObjectRef = request
        .virtual_mesh
        .parse()
        .map_err(|e| bad_ref("virtualMesh", &e))?;
    let mesh_ref: ObjectRef = request.mesh.parse().map_err(|e| bad_ref("mesh", &e))?;

    let policy = ctx.policies.get(&vm_ref).ok_or_else(|| {
        Refusal::new(
            Status::NotFound,
            "unknown_virtual_mesh",
            format!("virtual mesh {vm_ref} is not configured on this signer"),
        )
    })?;
    if !policy.has_member(&mesh_ref) {
        return Err(Refusal::new(
            Status::NotFound,
            "unknown_mesh",
            format!("mesh {mesh_ref} is not a member of virtual mesh {vm_ref}"),
        ));
    }

    let identity = requester
        .identity
        .filter(|i| !i.is_empty())
        .ok_or_else(|| {
            let why = requester.no_identity.unwrap_or(NoIdentity::None);
            Refusal::new(Status::Forbidden, "not_authorized", why.to_string())
        })?;
    // Before the grants: an identity from a CA other than its own is not that client.
    if let Some(issuer) = ctx.authorization.issuer_of(identity) {
        issuer.admits(requester.client_ca).map_err(|mismatch| {
            Refusal::new(
                Status::Forbidden,
                "client_issuer",
                format!("client {identity} is refused: {mismatch}"),
            )
        })?;
    }
    if !ctx.authorization.allows(identity, &vm_ref, &mesh_ref) {
        return Err(Refusal::new(
            Status::Forbidden,
            "not_authorized",
            format!(
                "client {identity} is not authorized to request intermediates for mesh {mesh_ref} in virtual mesh {vm_ref}"
            ),
        ));
    }

    let csr = ParsedCsr::from_pem(&request.csr)
        .map_err(|e| Refusal::new(Status::BadRequest, "malformed_csr", e.to_string()))?;
    facts.csr_public_key_sha256 = Some(csr.public_key_sha256());
    facts.ignored_csr_extensions = recorded_extensions(&csr.requested_extensions);
    facts.ignored_csr_attributes = recorded_extensions(&csr.other_attributes);
    let subject = subject_name(&policy.org_name, &mesh_ref.name).map_err(|e| {
        Refusal::new(
            Status::Internal,
            "internal",
            format!("cannot build subject: {e}"),
        )
    })?;
    // As text, as a reader compares names: a PrintableString O=acme is what was issued.
    if subject_values(&csr.requested_subject) != subject_values(&subject) {
        facts.ignored_csr_subject = Some(clip(
            &escape_control(csr.requested_subject.to_string()),
            MAX_RECORDED_SUBJECT,
        ));
    }

    // Key policy before the signature check: a tiny or huge key is refused without
    // spending a verification on it.
    check_public_key(&csr.key_kind, policy.min_rsa_bits)
        .map_err(|d| Refusal::policy(d.rule, d.message))?;
    csr.verify_possession()
        .map_err(|e| Refusal::policy(Rule::ProofOfPossession, e.to_string()))?;
    check_org(&csr.requested_orgs, &policy.org_name)
        .map_err(|d| Refusal::policy(d.rule, d.message))?;

    let requested_ttl = match request.ttl_seconds {
        Some(0) => {
            return Err(Refusal::new(
                Status::BadRequest,
                "malformed_request",
                "ttlSeconds must be positive",
            ));
        }
        other => other.map(Duration::from_secs),
    };
    let window = intermediate_validity(now, requested_ttl, policy.max_ttl, ctx.root.not_after)
        .map_err(|e| match e {
            ValidityError::Denied(d) => Refusal::policy(d.rule, d.message),
            ValidityError::TooShort(m) => Refusal::new(Status::BadRequest, "malformed_request", m),
            ValidityError::RootExpired(m) => Refusal::new(Status::Unavailable, "root_expired", m),
        })?;

    let csr_der = csr.der().to_vec();
    Ok(Approval {
        capped_by_root: window.capped_by_root,
        issue: IssueRequest {
            plan: IntermediatePlan {
                subject,
                public_key: csr.public_key,
                serial,
                not_before: window.not_before,
                not_after: window.not_after,
            },
            org_name: policy.org_name.clone(),
            latest_not_after: window.not_after,
            min_rsa_bits: policy.min_rsa_bits,
            trust_domains: policy.trust_domains.clone(),
            csr_der,
            client_gone: Default::default(),
            signing_asked: Default::default(),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use der::EncodePem;

    use super::*;
    use crate::pki::csr::build_csr;
    use crate::pki::keys::{KeyType, PrivateKey};
    use crate::pki::profile::random_serial;
    use crate::pki::testing::software_root;

    /// The planned serial goes on a failed request's line only once the backend noted
    /// asking the root key (the note shared with the request it was given), and not if it
    /// withdrew it (Vault refusing the call).
    #[test]
    fn the_planned_serial_is_on_record_only_once_the_root_key_was_asked() {
        let facts = RequestFacts {
            signing_serial: Some("0a".into()),
            ..Default::default()
        };
        assert_eq!(facts.signing_serial_asked(), None);
        let given_to_the_backend = facts.signing_asked.clone();
        given_to_the_backend.note();
        assert_eq!(facts.signing_serial_asked().as_deref(), Some("0a"));
        given_to_the_backend.withdraw();
        assert_eq!(facts.signing_serial_asked(), None);
    }

    const YAML: &str = "kind: VirtualMesh\nmetadata: {name: vm, namespace: ns}\nspec:\n  certificateAuthority:\n    builtin: {ttlDays: 10, rsaKeySizeBytes: 4096, orgName: acme}\n  meshes:\n  - {name: a, namespace: ns}\n  - {name: b, namespace: ns}\n";

    struct Fixture {
        policies: PolicySet,
        authorization: AuthorizationTable,
        root: RootCa,
        client_ca: Option<ClientCa>,
    }

    fn fixture(root_ttl: Duration) -> Fixture {
        let mut policies = PolicySet::default();
        policies.add_yaml("test", YAML).unwrap();
        let mut authorization = AuthorizationTable::default();
        authorization.insert(
            "client-a",
            "ns/vm".parse().unwrap(),
            "ns/a".parse().unwrap(),
        );
        let (_key, root) = software_root(KeyType::EcdsaP384, "acme", root_ttl);
        Fixture {
            policies,
            authorization,
            root,
            client_ca: None,
        }
    }

    fn request(mesh: &str, key_type: KeyType, org: &str) -> SignRequest {
        let key = PrivateKey::generate(key_type).unwrap();
        let csr = build_csr(&key, subject_name(org, "x").unwrap())
            .unwrap()
            .to_pem(der::pem::LineEnding::LF)
            .unwrap();
        SignRequest {
            virtual_mesh: "ns/vm".into(),
            mesh: mesh.into(),
            csr,
            ttl_seconds: None,
        }
    }

    fn run(
        f: &Fixture,
        identity: Option<&str>,
        req: &SignRequest,
    ) -> (Result<Approval, Refusal>, RequestFacts) {
        let ctx = DecisionContext {
            policies: &f.policies,
            authorization: &f.authorization,
            root: &f.root,
        };
        let mut facts = RequestFacts::default();
        let requester = Requester {
            identity,
            client_ca: f.client_ca.as_ref(),
            ..Default::default()
        };
        let result = decide(
            &ctx,
            requester,
            req,
            SystemTime::now(),
            random_serial().unwrap(),
            &mut facts,
        );
        (result, facts)
    }

    /// A hostile CSR is issued as the policy says, and its line shows what it asked for:
    /// another subject, a challengePassword, extensions.
    #[test]
    fn what_a_csr_asked_for_and_did_not_get_is_recorded() {
        let f = fixture(Duration::from_secs(86_400 * 30));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("req.cnf"),
            "[req]\ndistinguished_name = dn\nattributes = attrs\nprompt = no\n\
             [dn]\nCN = *.evil.example\n[attrs]\nchallengePassword = hunter22\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| crate::pki::testing::openssl(dir.path(), args);
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            "k",
        ]);
        openssl(&[
            "req",
            "-new",
            "-key",
            "k",
            "-config",
            "req.cnf",
            "-addext",
            "subjectAltName=DNS:evil.example",
            "-out",
            "req.pem",
        ]);
        let mut req = request("ns/a", KeyType::EcdsaP384, "acme");
        req.csr = std::fs::read_to_string(dir.path().join("req.pem")).unwrap();
        let (result, facts) = run(&f, Some("client-a"), &req);
        let approval = result.unwrap();
        assert_eq!(approval.issue.plan.subject.to_string(), "CN=a,O=acme");
        assert_eq!(
            facts.ignored_csr_subject.as_deref(),
            Some("CN=*.evil.example")
        );
        assert_eq!(facts.ignored_csr_attributes, ["1.2.840.113549.1.9.7"]);
        assert_eq!(facts.ignored_csr_extensions, ["2.5.29.17"]);

        // The subject that was issued (O=acme, CN=a) is not repeated.
        let key = PrivateKey::generate(KeyType::EcdsaP384).unwrap();
        req.csr = build_csr(&key, subject_name("acme", "a").unwrap())
            .unwrap()
            .to_pem(der::pem::LineEnding::LF)
            .unwrap();
        let (result, facts) = run(&f, Some("client-a"), &req);
        assert!(result.is_ok());
        assert_eq!(facts.ignored_csr_subject, None);
        assert!(facts.ignored_csr_attributes.is_empty());

        // A long subject with control characters: escaped, and cut.
        let mut rdn = x509_cert::name::RelativeDistinguishedName::default();
        let long = format!("x\u{1b}y{}", "z".repeat(1000));
        rdn.insert(x509_cert::attr::AttributeTypeAndValue {
            oid: const_oid::db::rfc4519::CN,
            value: der::Any::new(der::Tag::Utf8String, long.as_bytes()).unwrap(),
        })
        .unwrap();
        let mut rdns = x509_cert::name::RdnSequence::default();
        rdns.push(rdn);
        let name =
            <x509_cert::name::Name as der::Decode>::from_der(&der::Encode::to_der(&rdns).unwrap())
                .unwrap();
        req.csr = build_csr(&key, name)
            .unwrap()
            .to_pem(der::pem::LineEnding::LF)
            .unwrap();
        let (_, facts) = run(&f, Some("client-a"), &req);
        let recorded = facts.ignored_csr_subject.unwrap();
        assert!(recorded.starts_with("CN=x"), "{recorded}");
        assert!(!recorded.chars().any(char::is_control), "{recorded}");
        assert!(recorded.ends_with("bytes in all)"), "{recorded}");
        assert!(recorded.len() < MAX_RECORDED_SUBJECT + 32, "{recorded}");
    }

    #[test]
    fn a_refusal_message_carries_no_control_characters() {
        let refusal = Refusal::new(
            Status::BadRequest,
            "malformed_request",
            "unknown field `x\nINFO forged line\u{1b}[2J`",
        );
        assert_eq!(
            refusal.message,
            "unknown field `x\\nINFO forged line\\u{1b}[2J`"
        );
        assert!(!refusal.message.chars().any(char::is_control));
    }

    #[test]
    fn long_text_is_clipped_at_a_character_boundary_with_its_length() {
        assert_eq!(clip("short", 8), "short");
        // "é" is two bytes: a cut inside it moves back to its start.
        assert_eq!(clip("abcé-more", 4), "abc... (10 bytes in all)");
        let refusal = Refusal::new(Status::BadRequest, "malformed_request", "x".repeat(5000));
        assert!(
            refusal.message.len() < MAX_MESSAGE + 40,
            "{}",
            refusal.message.len()
        );
        assert!(refusal.message.ends_with("(5000 bytes in all)"));
    }

    #[test]
    fn an_authorized_conforming_request_is_planned_as_the_policy_says() {
        let f = fixture(Duration::from_secs(100 * 86_400));
        let (result, facts) = run(
            &f,
            Some("client-a"),
            &request("ns/a", KeyType::EcdsaP384, "acme"),
        );
        let approval = result.unwrap();
        assert!(!approval.capped_by_root);
        assert_eq!(approval.issue.org_name, "acme");
        assert_eq!(approval.issue.min_rsa_bits, 4096);
        let ttl = approval
            .issue
            .plan
            .not_after
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            ttl <= Duration::from_secs(10 * 86_400) && ttl > Duration::from_secs(10 * 86_400 - 60)
        );
        assert_eq!(approval.issue.plan.subject.to_string(), "CN=a,O=acme");
        assert_eq!(
            facts.csr_public_key_sha256.as_ref().map(String::len),
            Some(64)
        );
    }

    #[test]
    fn refusals_come_in_order_with_their_status() {
        let f = fixture(Duration::from_secs(100 * 86_400));
        let good = request("ns/a", KeyType::EcdsaP384, "acme");
        let mut unknown_vm = good.clone();
        unknown_vm.virtual_mesh = "ns/other".into();
        let cases: Vec<(Option<&str>, SignRequest, Status, &str)> = vec![
            // Existence is checked before authorization; policy after both.
            (
                Some("stranger"),
                unknown_vm,
                Status::NotFound,
                "unknown_virtual_mesh",
            ),
            (
                Some("client-a"),
                request("ns/zzz", KeyType::EcdsaP384, "acme"),
                Status::NotFound,
                "unknown_mesh",
            ),
            (None, good.clone(), Status::Forbidden, "not_authorized"),
            (
                Some("client-a"),
                request("ns/b", KeyType::EcdsaP384, "acme"),
                Status::Forbidden,
                "not_authorized",
            ),
            (
                Some("client-a"),
                request("ns/a", KeyType::EcdsaP256, "acme"),
                Status::Forbidden,
                "policy_key_algorithm",
            ),
            (
                Some("client-a"),
                request("ns/a", KeyType::EcdsaP384, "evil"),
                Status::Forbidden,
                "policy_org",
            ),
            (
                Some("client-a"),
                SignRequest {
                    ttl_seconds: Some(11 * 86_400),
                    ..good.clone()
                },
                Status::Forbidden,
                "policy_ttl",
            ),
            (
                Some("client-a"),
                SignRequest {
                    csr: "junk".into(),
                    ..good.clone()
                },
                Status::BadRequest,
                "malformed_csr",
            ),
        ];
        for (identity, req, status, code) in cases {
            let (result, facts) = run(&f, identity, &req);
            let refusal = result.unwrap_err();
            assert_eq!(
                (refusal.status, refusal.code),
                (status, code),
                "{}",
                refusal.message
            );
            assert_eq!(
                facts.virtual_mesh.as_deref(),
                Some(req.virtual_mesh.as_str())
            );
        }
    }

    #[test]
    fn an_expiring_root_caps_or_stops_issuance() {
        let f = fixture(Duration::from_secs(5 * 86_400));
        let (result, _) = run(
            &f,
            Some("client-a"),
            &request("ns/a", KeyType::EcdsaP384, "acme"),
        );
        let approval = result.unwrap();
        assert!(approval.capped_by_root);
        assert_eq!(approval.issue.plan.not_after, f.root.not_after);

        let f = fixture(Duration::from_secs(30));
        let (result, _) = run(
            &f,
            Some("client-a"),
            &request("ns/a", KeyType::EcdsaP384, "acme"),
        );
        let refusal = result.unwrap_err();
        assert_eq!(
            (refusal.status, refusal.code),
            (Status::Unavailable, "root_expired")
        );
    }

    #[test]
    fn a_pinned_identity_from_another_client_ca_is_refused() {
        let mut f = fixture(Duration::from_secs(100 * 86_400));
        let good = request("ns/a", KeyType::EcdsaP384, "acme");
        let ca = |sha256: &str, subject: &str| ClientCa {
            sha256: sha256.into(),
            subject: subject.into(),
            sharing_subject: 1,
        };
        // Not pinned: whichever client CA it chains to.
        f.client_ca = Some(ca(&"11".repeat(32), "CN=team pay CA"));
        assert!(run(&f, Some("client-a"), &good).0.is_ok());
        f.authorization.pin_issuer(
            "client-a",
            crate::tlsutil::IssuerPin::Sha256("22".repeat(32)),
        );
        let refusal = run(&f, Some("client-a"), &good).0.unwrap_err();
        assert_eq!(
            (refusal.status, refusal.code),
            (Status::Forbidden, "client_issuer")
        );
        assert!(
            refusal
                .message
                .contains("chains to the client CA CN=team pay CA"),
            "{}",
            refusal.message
        );
        // Even for a mesh it is not granted: the identity itself is not proven.
        let other = request("ns/b", KeyType::EcdsaP384, "acme");
        assert_eq!(
            run(&f, Some("client-a"), &other).0.unwrap_err().code,
            "client_issuer"
        );
        f.client_ca = Some(ca(&"22".repeat(32), "CN=shared CA"));
        assert!(run(&f, Some("client-a"), &good).0.is_ok());
        // A chain that leads to no client CA now does not pass a pin.
        f.client_ca = None;
        assert_eq!(
            run(&f, Some("client-a"), &good).0.unwrap_err().code,
            "client_issuer"
        );
    }
}
