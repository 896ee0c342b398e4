//! Entry points for the fuzz targets in `fuzz/` and for the test that replays their
//! corpus on every `make test`. Each must accept any input without panicking.

use std::sync::OnceLock;
use std::time::SystemTime;

use crate::config::AuthorizationTable;
use crate::pki::csr::ParsedCsr;
use crate::pki::profile::{RootCa, random_serial};
use crate::policy::PolicySet;
use crate::policy::rules::check_public_key;
use crate::signer::decision::{DecisionContext, RequestFacts, Requester, SignRequest, decide};

/// CSR parsing and validation, from DER and (if the input is text) from PEM.
pub fn csr(data: &[u8]) {
    if let Ok(csr) = ParsedCsr::from_der(data) {
        exercise(&csr);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(csr) = ParsedCsr::from_pem(text)
    {
        exercise(&csr);
    }
}

fn exercise(csr: &ParsedCsr) {
    for min in [2048, 3072, 4096] {
        let _ = check_public_key(&csr.key_kind, min);
    }
    let _ = csr.verify_possession();
    let _ = csr.public_key_sha256();
}

struct Fixture {
    policies: PolicySet,
    authorization: AuthorizationTable,
    root: RootCa,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut policies = PolicySet::default();
        policies
            .add_yaml("seed", include_str!("../config/virtual-mesh.yaml"))
            .expect("the seed VirtualMesh loads");
        let mut authorization = AuthorizationTable::default();
        for mesh in policies
            .iter()
            .flat_map(|p| p.meshes.iter().map(|m| (p.id.clone(), m.clone())))
        {
            authorization.insert("fuzzer", mesh.0, mesh.1);
        }
        let root =
            RootCa::from_pem(include_str!("../fuzz/root-cert.pem")).expect("the fuzz root loads");
        Fixture {
            policies,
            authorization,
            root,
        }
    })
}

/// Request decoding and the whole signing decision.
pub fn sign_request(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<SignRequest>(data) else {
        return;
    };
    let f = fixture();
    let ctx = DecisionContext {
        policies: &f.policies,
        authorization: &f.authorization,
        root: &f.root,
    };
    let Ok(serial) = random_serial() else { return };
    let mut facts = RequestFacts::default();
    let _ = decide(
        &ctx,
        Requester {
            identity: Some("fuzzer"),
            ..Default::default()
        },
        &request,
        SystemTime::now(),
        serial,
        &mut facts,
    );
}

/// Splits fuzz input into `N` texts at NUL bytes (which no PEM, JSON or YAML file holds):
/// how one input carries several files.
fn texts<const N: usize>(data: &[u8]) -> Option<[String; N]> {
    let text = std::str::from_utf8(data).ok()?;
    let mut parts = text.split('\0');
    Some(std::array::from_fn(|_| {
        parts.next().unwrap_or_default().to_string()
    }))
}

/// `meshca audit verify` over a log someone may have edited: any bytes.
pub fn audit_verify(data: &[u8]) {
    use crate::signer::audit::{Follows, GENESIS, verify};
    let _ = verify(data, None, &[GENESIS.to_string()]);
    let follows = Follows {
        last_hash: GENESIS,
        last_time: None,
    };
    let _ = verify(data, Some(follows), &[]);
}

/// The agent's reading of an installed `cacerts` set (a directory or a Secret another
/// tool may have written): the four files as NUL-separated texts, in the order
/// ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem. The bundle check, then the
/// root-cert.pem composition a pass makes from it.
pub fn cacerts_bundle(data: &[u8]) {
    use crate::agent::rotation::{AnnouncedRoots, root_cert_to_write, roots_left_out};
    use crate::pki::bundle::{BundleFiles, verify_bundle};
    let Some([ca_cert, ca_key, cert_chain, root_cert]) = texts::<4>(data) else {
        return;
    };
    let files = BundleFiles {
        ca_cert,
        ca_key,
        cert_chain,
        root_cert,
    };
    let now = SystemTime::now();
    let _ = verify_bundle(&files, None, now);
    // The chain's certificates stand in for the signer's roots and its announced one.
    let announced = AnnouncedRoots {
        next: Some(files.ca_cert.clone()),
        previous: None,
    };
    let retired = crate::agent::rotation::root_fingerprints(&files.ca_cert);
    let written = root_cert_to_write(
        &files.cert_chain,
        &announced,
        Some(&files.root_cert),
        &retired,
        now,
    );
    let _ = roots_left_out(&files.root_cert, &written, &retired, now);
}

/// The agent's reading of the signer's answers: the public policy (with the roots it
/// announces) and a signing answer, whose files are checked as a new bundle is.
pub fn agent_answer(data: &[u8]) {
    use crate::agent::client::{PublicPolicy, SignResponse};
    use crate::pki::bundle::{BundleFiles, verify_bundle};
    if let Ok(policy) = serde_json::from_slice::<PublicPolicy>(data) {
        let _ = policy.check_announced_roots();
        let _ = PublicPolicy::root_end(Some(&policy));
        let _ = policy.check_authorized(&crate::policy::virtual_mesh::ObjectRef::new("a", "b"));
        let _ = crate::agent::choose_key_type(&policy.accepted_key_types, None, "a/b");
    }
    if let Ok(answer) = serde_json::from_slice::<SignResponse>(data) {
        let files = BundleFiles {
            ca_cert: answer.certificate,
            ca_key: String::new(),
            cert_chain: answer.cert_chain,
            root_cert: answer.root_cert,
        };
        let _ = verify_bundle(&files, None, SystemTime::now());
    }
}

/// A root certificate meshca did not make (an adopted issuer, Vault's, an announced next
/// root): DER, or PEM when the input is text, through the root's reading and its lint.
pub fn root_cert(data: &[u8]) {
    use der::Decode;
    fn exercise(cert: x509_cert::Certificate) {
        let _ = crate::pki::lint::lint_root_profile(
            cert.tbs_certificate(),
            "meshca",
            2048,
            std::time::Duration::from_secs(10 * 365 * 86_400),
        );
        let _ = crate::pki::bundle::fingerprint(&cert);
        let _ = RootCa::from_certificate(cert);
    }
    if let Ok(cert) = x509_cert::Certificate::from_der(data) {
        exercise(cert);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RootCa::from_pem(text);
        let _ = crate::pki::pem::decode_readable_certificates(text);
        if let Ok(certs) = crate::pki::pem::decode_certificates(text) {
            certs.into_iter().for_each(exercise);
        }
    }
}

/// The signer's client CRLs: PEM files (NUL-separated texts, two files) or, when the
/// input is not text, two DER lists split at the offset in its first two bytes.
pub fn client_crls(data: &[u8]) {
    use rustls_pki_types::CertificateRevocationListDer;
    use rustls_pki_types::pem::PemObject;
    let paths = [
        std::path::PathBuf::from("a.pem"),
        std::path::PathBuf::from("b.pem"),
    ];
    let files: [Vec<CertificateRevocationListDer<'static>>; 2] = match texts::<2>(data) {
        Some(texts) => texts.map(|text| {
            CertificateRevocationListDer::pem_slice_iter(text.as_bytes())
                .filter_map(Result::ok)
                .collect()
        }),
        None => {
            let [a, b, rest @ ..] = data else { return };
            let split = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
            let (first, second) = rest.split_at(split);
            [vec![first.to_vec().into()], vec![second.to_vec().into()]]
        }
    };
    let mut files = files.into_iter();
    let _ = crate::tlsutil::read_crls_with(&paths, |_| Ok(files.next().unwrap_or_default()));
}

/// The PKCS#11 URI of the root key (`pkcs11.uri`): parsing, and a round trip through
/// its display (the form logs and the audit trail name the key by), which must read back
/// as the same key and token. The display leaves the query (module path, PIN source) out.
pub fn pkcs11_uri(data: &[u8]) {
    use crate::backend::pkcs11_uri::Pkcs11Uri;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut uri) = text.parse::<Pkcs11Uri>() {
        let shown = uri.to_string();
        uri.module_path = None;
        uri.pin_source = None;
        assert_eq!(shown.parse::<Pkcs11Uri>().as_ref(), Ok(&uri), "{shown}");
    }
}

/// YAML documents: the signer's VirtualMesh policies, the VirtualMesh and inventory
/// files `meshca mesh` reads.
pub fn mesh_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = PolicySet::default().add_yaml("fuzz", text);
    let _ = crate::mesh::federation::parse_virtual_mesh("fuzz", text);
    let _ = crate::mesh::inventory::Inventory::from_yaml("fuzz", text);
}

/// Kubernetes objects as the API server hands them over (JSON): the agent's requests and
/// Secrets, the mesh controller's VirtualMeshes and Meshes, through what reads them.
pub fn k8s_objects(data: &[u8]) {
    use crate::agent::crd::VirtualMeshCertificateSigningRequest;
    use crate::mesh_controller::crd::{Mesh, VirtualMesh};
    use k8s_openapi::api::core::v1::Secret;
    if let Ok(request) = serde_json::from_slice::<VirtualMeshCertificateSigningRequest>(data) {
        let spec = &request.spec;
        let _ = spec.virtual_mesh.to_ref();
        let _ = spec.mesh.to_ref();
        let _ = spec.settings.target.to_ref();
        let _ = spec.settings.rotation.settings();
    }
    if let Ok(secret) = serde_json::from_slice::<Secret>(data) {
        let _ = crate::agent::k8s::meshca_owner(&secret);
        let _ = crate::agent::k8s::classify_secret(Some(&secret), "a/b");
    }
    if let Ok(mesh) = serde_json::from_slice::<VirtualMesh>(data) {
        let _ = mesh.document().into_policy("fuzz");
    }
    if let Ok(mesh) = serde_json::from_slice::<Mesh>(data) {
        let _ = mesh.spec.inventory(&mesh.id()).validate();
    }
}
