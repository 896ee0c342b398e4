//! The root key in a PKCS#11 token (an HSM; SoftHSM in tests): token setup, root key
//! generation and self-signing, and a pool of sessions that signs intermediates.
//!
//! The private key is generated on the token as CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE and
//! not CKA_EXTRACTABLE: no call exists that returns its value. `Session` is Send but not
//! Sync, so signing uses a pool of sessions and one token thread per session.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{ID_EC_PUBLIC_KEY, RSA_ENCRYPTION, SECP_256_R_1, SECP_384_R_1};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use cryptoki::types::AuthPin;
use der::asn1::{BitString, OctetString};
use der::{Any, Decode, Encode};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::Certificate;

use super::pkcs11_uri::Pkcs11Uri;
use super::token_threads::TokenThreads;
use super::{BackendError, BoxFuture, IssueRequest, RootSigner};
use crate::config::{Pkcs11Settings, SignerConfig};
use crate::pki::keys::{KeyType, PublicKeyKind, describe_public_key};
use crate::pki::lint::{check_signed_certificate, lint_intermediate, lint_root};
use crate::pki::profile::{
    IntermediatePlan, RootCa, assemble, decode_tbs, intermediate_tbs, random_serial, root_tbs,
    serial_hex, subject_name,
};
use crate::pki::sigalg::{SignatureAlgorithm, ecdsa_prehash, ecdsa_raw_to_der};
use crate::policy::rules::BACKDATE;
use crate::secret::{Secret, SecretSource};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot load PKCS#11 module {module}: {message}")]
    Module { module: String, message: String },
    #[error(
        "the PKCS#11 module {module} loaded but failed to initialize (C_Initialize): {message}; check the module's own configuration and token storage (SoftHSM: SOFTHSM2_CONF and its directories.tokendir)"
    )]
    ModuleInit { module: String, message: String },
    #[error("no token matches {uri}; tokens present: {present}")]
    NoToken { uri: String, present: String },
    #[error("more than one token matches {uri}; add serial= or slot-id= to the URI")]
    AmbiguousToken { uri: String },
    /// Only ever looked for under a root certificate that was made with the key, so
    /// `root init` is not the answer: it would make a new root, which no cluster trusts.
    #[error(
        "no private key matches {0} on the token, though the root certificate was made with one: the URI names another key (object=, id=) or another token (token=; SoftHSM: SOFTHSM2_CONF and its tokendir), the PKCS#11 module cannot read it (its files' owner and mode), or it was deleted (restore the token from its backup); `meshca root init` would make a new root, which no cluster trusts"
    )]
    NoKey(String),
    #[error("more than one private key matches {0}; add id= to the URI")]
    AmbiguousKey(String),
    /// Only ever met with no root certificate file (one there refuses `root init`
    /// first): the key may be a root's whose file was lost, which `--force` would destroy.
    #[error(
        "a key with the label or the id of {0} already exists on the token: if it is the key of a root in use (its certificate file lost), do not replace it: its certificate is in every cluster's root-cert.pem (cacerts), to put back at root.certificate (`meshca root show` then checks it is this key's); pass --force only for a key no root in use has: it destroys the key and makes a new root, which no cluster trusts"
    )]
    KeyExists(String),
    /// `pin_source` says where the PIN was read (a file, an environment variable), never
    /// the PIN: which one to correct.
    #[error(
        "the token refused the user PIN{}; meshca will not retry (each refusal counts towards locking the token)",
        pin_origin(.pin_source.as_deref())
    )]
    PinIncorrect { pin_source: Option<String> },
    #[error("the token's user PIN is locked; unlock it with the security officer PIN")]
    PinLocked,
    #[error("PKCS#11 {function} failed: {rv}")]
    Call { function: String, rv: String },
    #[error("{0}")]
    Other(String),
}

impl From<CkError> for TokenError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(RvError::PinIncorrect, _) => {
                TokenError::PinIncorrect { pin_source: None }
            }
            CkError::Pkcs11(RvError::PinLocked, _) => TokenError::PinLocked,
            CkError::Pkcs11(rv, function) => TokenError::Call {
                function: format!("{function:?}"),
                rv: format!("{rv:?}"),
            },
            other => TokenError::Other(other.to_string()),
        }
    }
}

/// " (read from pkcs11.pin_file X)", for a refused PIN whose source is known.
fn pin_origin(source: Option<&str>) -> String {
    source.map_or_else(String::new, |source| format!(" (read from {source})"))
}

/// Errors after which a session must be thrown away and a new one opened.
fn session_is_broken(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::GeneralError,
            _
        )
    )
}

fn auth_pin(pin: &Secret) -> AuthPin {
    AuthPin::from(pin.expose())
}

/// A loaded PKCS#11 module and the slot of the token named by the key URI.
/// What `root init` appends to the key's label while the new pair is not yet the root's.
const STAGING_SUFFIX: &str = ".meshca-new";

pub struct Token {
    context: Pkcs11,
    slot: Slot,
    uri: Pkcs11Uri,
    /// Where the user PIN comes from, for the error when the token refuses it.
    pin_source: SecretSource,
}

impl Token {
    /// Loads the module and finds the one token the URI names.
    pub fn open(settings: &Pkcs11Settings) -> Result<Token, TokenError> {
        let context = load_module(settings)?;
        let slot = find_token(&context, &settings.key)?;
        Ok(Token {
            context,
            slot,
            uri: settings.key.clone(),
            pin_source: settings.pin.clone(),
        })
    }

    /// Opens a session and makes sure the user is logged in (login state is shared by all
    /// sessions of this process, so most calls find it already done).
    pub fn logged_in_session(&self, pin: &Secret, read_write: bool) -> Result<Session, TokenError> {
        let session = if read_write {
            self.context.open_rw_session(self.slot)?
        } else {
            self.context.open_ro_session(self.slot)?
        };
        let state = session.get_session_info()?.session_state();
        if !matches!(state, SessionState::RoUser | SessionState::RwUser) {
            match session.login(UserType::User, Some(&auth_pin(pin))) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                    return Err(TokenError::PinIncorrect {
                        pin_source: Some(self.pin_source.to_string()),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(session)
    }

    fn key_template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(label) = &self.uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &self.uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        template
    }

    /// The private key the URI names; exactly one must exist.
    pub fn find_private_key(&self, session: &Session) -> Result<ObjectHandle, TokenError> {
        let mut found = session.find_objects(&self.key_template(ObjectClass::PRIVATE_KEY))?;
        match found.len() {
            0 => Err(TokenError::NoKey(self.uri.to_string())),
            1 => Ok(found.remove(0)),
            _ => Err(TokenError::AmbiguousKey(self.uri.to_string())),
        }
    }

    fn find_all(&self, session: &Session) -> Result<Vec<ObjectHandle>, TokenError> {
        let mut handles = session.find_objects(&self.key_template(ObjectClass::PRIVATE_KEY))?;
        handles.extend(session.find_objects(&self.key_template(ObjectClass::PUBLIC_KEY))?);
        Ok(handles)
    }

    /// The key objects a `root init` under this URI replaces, private keys first: those
    /// the URI names, and every other key under the label the new pair takes (whatever its
    /// id), since a second pair under that label would make a URI naming the key by label
    /// alone, such as the root in force's, find two.
    fn replaced_by_init(&self, session: &Session) -> Result<KeyObjects, TokenError> {
        let mut found = [Vec::new(), Vec::new()];
        let classes = [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY];
        for (handles, class) in found.iter_mut().zip(classes) {
            let under_label = [
                Attribute::Class(class),
                Attribute::Label(self.key_label().into_bytes()),
            ];
            let named = session.find_objects(&self.key_template(class))?;
            for handle in named.into_iter().chain(session.find_objects(&under_label)?) {
                if !handles.contains(&handle) {
                    handles.push(handle);
                }
            }
        }
        let [private, public] = found;
        Ok(KeyObjects { private, public })
    }

    /// Refuses an `id=` that a key outside `ours` (another label) already has: a URI
    /// naming its key by id alone (the root in force's, say) would then find two keys,
    /// and that signer could no longer start.
    fn refuse_id_of_another_key(
        &self,
        session: &Session,
        ours: &[ObjectHandle],
    ) -> Result<(), TokenError> {
        let Some(id) = &self.uri.id else {
            return Ok(());
        };
        let same_id = session.find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.clone()),
        ])?;
        if same_id.iter().any(|handle| !ours.contains(handle)) {
            return Err(TokenError::Other(format!(
                "another key on the token already has the id of {} (under another label): a URI naming a key by id alone, such as the root in force's, would find two; give this key an id of its own (or leave id= out and one is chosen)",
                self.uri
            )));
        }
        Ok(())
    }

    /// The label a generated key pair gets: the URI's `object`, else `meshca-root`.
    fn key_label(&self) -> String {
        self.uri
            .object
            .clone()
            .unwrap_or_else(|| "meshca-root".into())
    }

    /// This token, naming instead the label a key pair is generated under before it takes
    /// the URI's label and id (`<label>.meshca-new`, any id).
    fn staging(&self) -> Token {
        let mut uri = self.uri.clone();
        uri.object = Some(format!("{}{STAGING_SUFFIX}", self.key_label()));
        uri.id = None;
        Token {
            context: self.context.clone(),
            slot: self.slot,
            uri,
            pin_source: self.pin_source.clone(),
        }
    }

    /// Generates a key pair on the token: the private half sensitive, never extractable.
    fn generate_key_pair(
        &self,
        session: &Session,
        key_type: KeyType,
    ) -> Result<(ObjectHandle, ObjectHandle), TokenError> {
        let label = self.key_label();
        let id = match &self.uri.id {
            Some(id) => id.clone(),
            None => {
                let mut id = vec![0u8; 16];
                getrandom::fill(&mut id).map_err(|e| TokenError::Other(e.to_string()))?;
                id
            }
        };
        let mut public = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            // Signing only: left to the token's default, SoftHSM allows C_UnwrapKey and
            // C_SignRecover, which make an RSA root key a decryption oracle for the PIN's
            // holder.
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::SignRecover(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id),
        ];
        let mechanism = match key_type.rsa_bits() {
            Some(bits) => {
                public.push(Attribute::ModulusBits(u64::from(bits).into()));
                public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                Mechanism::RsaPkcsKeyPairGen
            }
            None => {
                let curve = if key_type == KeyType::EcdsaP256 {
                    SECP_256_R_1
                } else {
                    SECP_384_R_1
                };
                let params = curve
                    .to_der()
                    .map_err(|e| TokenError::Other(e.to_string()))?;
                public.push(Attribute::EcParams(params));
                Mechanism::EccKeyPairGen
            }
        };
        Ok(session.generate_key_pair(&mechanism, &public, &private)?)
    }

    /// Reads a public key object and builds its SubjectPublicKeyInfo.
    fn public_key_info(
        &self,
        session: &Session,
        public: ObjectHandle,
    ) -> Result<SubjectPublicKeyInfoOwned, TokenError> {
        let other = |m: String| TokenError::Other(format!("public key on token: {m}"));
        let attrs = session.get_attributes(
            public,
            &[
                AttributeType::KeyType,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::EcParams,
                AttributeType::EcPoint,
            ],
        )?;
        let mut key_type = None;
        let (mut modulus, mut exponent, mut params, mut point) = (None, None, None, None);
        for attr in attrs {
            match attr {
                Attribute::KeyType(k) => key_type = Some(k),
                Attribute::Modulus(v) => modulus = Some(v),
                Attribute::PublicExponent(v) => exponent = Some(v),
                Attribute::EcParams(v) => params = Some(v),
                Attribute::EcPoint(v) => point = Some(v),
                _ => {}
            }
        }
        if key_type == Some(CkKeyType::RSA) {
            let (Some(n), Some(e)) = (modulus, exponent) else {
                return Err(other("RSA key lacks modulus or exponent".into()));
            };
            let key = pkcs1::RsaPublicKeyRef {
                modulus: der::asn1::UintRef::new(&n).map_err(|e| other(e.to_string()))?,
                public_exponent: der::asn1::UintRef::new(&e).map_err(|e| other(e.to_string()))?,
            };
            let der = key.to_der().map_err(|e| other(e.to_string()))?;
            return Ok(SubjectPublicKeyInfoOwned {
                algorithm: AlgorithmIdentifierOwned {
                    oid: RSA_ENCRYPTION,
                    parameters: Some(Any::from(der::asn1::Null)),
                },
                subject_public_key: BitString::from_bytes(&der)
                    .map_err(|e| other(e.to_string()))?,
            });
        }
        if key_type == Some(CkKeyType::EC) {
            let (Some(params), Some(point)) = (params, point) else {
                return Err(other("EC key lacks parameters or point".into()));
            };
            let curve: ObjectIdentifier = ObjectIdentifier::from_der(&params)
                .map_err(|e| other(format!("EC parameters: {e}")))?;
            let point = unwrap_ec_point(&point);
            return Ok(SubjectPublicKeyInfoOwned {
                algorithm: AlgorithmIdentifierOwned {
                    oid: ID_EC_PUBLIC_KEY,
                    parameters: Some(Any::encode_from(&curve).map_err(|e| other(e.to_string()))?),
                },
                subject_public_key: BitString::from_bytes(&point)
                    .map_err(|e| other(e.to_string()))?,
            });
        }
        Err(other(format!("unsupported key type {key_type:?}")))
    }
}

/// CKA_EC_POINT is specified as a DER OCTET STRING around the point; some tokens return
/// the bare point. Accept both.
fn unwrap_ec_point(value: &[u8]) -> Vec<u8> {
    match OctetString::from_der(value) {
        Ok(inner) if inner.as_bytes().first() == Some(&0x04) => inner.as_bytes().to_vec(),
        _ => value.to_vec(),
    }
}

/// Signs `message` with the token key, returning the signature as X.509 carries it.
pub fn token_sign(
    session: &Session,
    key: ObjectHandle,
    kind: &PublicKeyKind,
    algorithm: SignatureAlgorithm,
    message: &[u8],
) -> Result<Vec<u8>, CkError> {
    match kind {
        PublicKeyKind::Ec(curve) => {
            // CKM_ECDSA signs a digest we compute, and returns raw r || s.
            let digest = ecdsa_prehash(algorithm, message);
            let raw = session.sign(&Mechanism::Ecdsa, key, &digest)?;
            ecdsa_raw_to_der(curve, &raw).map_err(|_| CkError::InvalidValue)
        }
        _ => session.sign(&Mechanism::Sha256RsaPkcs, key, message),
    }
}

fn load_module(settings: &Pkcs11Settings) -> Result<Pkcs11, TokenError> {
    let module = settings.module.display().to_string();
    module_file_trusted(&settings.module).map_err(|message| TokenError::Module {
        module: module.clone(),
        message,
    })?;
    let context = Pkcs11::new(&settings.module).map_err(|e| TokenError::Module {
        module: module.clone(),
        message: e.to_string(),
    })?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(context),
        // The library is there: what failed is what it reads first (SoftHSM: its token
        // directory), which "cannot load" would hide.
        Err(e) => Err(TokenError::ModuleInit {
            module,
            message: e.to_string(),
        }),
    }
}

/// Refuses a PKCS#11 module that someone other than root or this process's user could
/// replace: the module runs inside the signer with the PIN and sessions on the root key,
/// so whoever can write it, or rename a file into one of its directories, can sign with
/// the root. The file and every directory above it (as named and as resolved through
/// symlinks) must belong to root or to this user and not be writable by group or others;
/// a directory with the sticky bit (/tmp) keeps others from replacing a file there. A
/// missing file is left to the loader, which names it.
pub fn module_file_trusted(module: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(resolved) = std::fs::canonicalize(module) else {
        return Ok(());
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = unsafe { libc::geteuid() };
    let named = std::path::absolute(module).unwrap_or_else(|_| module.to_path_buf());
    for path in named.ancestors().chain(resolved.ancestors()) {
        let Ok(metadata) = std::fs::symlink_metadata(path) else {
            continue;
        };
        if metadata.file_type().is_symlink() {
            continue;
        }
        let mode = metadata.mode();
        let sticky_dir = metadata.is_dir() && mode & 0o1000 != 0;
        let what = if metadata.is_dir() {
            "directory"
        } else {
            "file"
        };
        if metadata.uid() != 0 && metadata.uid() != user {
            return Err(format!(
                "its {what} {} belongs to user {}, neither root nor the user meshca runs as: \
                 whoever owns it can replace the module that holds the root key's sessions",
                path.display(),
                metadata.uid()
            ));
        }
        if mode & 0o022 != 0 && !sticky_dir {
            return Err(format!(
                "its {what} {} can be written by {} (mode {:o}): whoever can write it can \
                 replace the module that holds the root key's sessions; run: chmod go-w {}",
                path.display(),
                if mode & 0o002 != 0 {
                    "any user"
                } else {
                    "its group"
                },
                mode & 0o7777,
                path.display()
            ));
        }
    }
    Ok(())
}

fn find_token(context: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, TokenError> {
    let mut matching = Vec::new();
    let mut present = Vec::new();
    for slot in context.get_slots_with_token()? {
        // A slot whose token cannot be read (a card pulled, one member of an HSM group
        // down) does not hide the others; it is named among the tokens present.
        let info = match context.get_token_info(slot) {
            Ok(info) => info,
            Err(e) => {
                present.push(format!(
                    "slot {} unreadable ({})",
                    slot.id(),
                    TokenError::from(e)
                ));
                continue;
            }
        };
        if !info.token_initialized() {
            continue;
        }
        present.push(format!("{:?}", info.label().trim()));
        let matches = uri
            .token
            .as_deref()
            .is_none_or(|t| info.label().trim() == t)
            && uri
                .manufacturer
                .as_deref()
                .is_none_or(|m| info.manufacturer_id().trim() == m)
            && uri
                .model
                .as_deref()
                .is_none_or(|m| info.model().trim() == m)
            && uri
                .serial
                .as_deref()
                .is_none_or(|s| info.serial_number().trim() == s)
            && uri.slot_id.is_none_or(|id| slot.id() == id);
        if matches {
            matching.push(slot);
        }
    }
    match matching.len() {
        1 => Ok(matching[0]),
        0 => Err(TokenError::NoToken {
            uri: uri.to_string(),
            present: if present.is_empty() {
                "none".into()
            } else {
                present.join(", ")
            },
        }),
        _ => Err(TokenError::AmbiguousToken {
            uri: uri.to_string(),
        }),
    }
}

/// `meshca token init`: initializes a fresh token (SoftHSM, a test or demo HSM slot) with
/// the label from the key URI, its security officer PIN and the user PIN.
pub fn init_token(
    settings: &Pkcs11Settings,
    so_pin: &Secret,
    user_pin: &Secret,
) -> Result<String, TokenError> {
    let label = settings.key.token.clone().ok_or_else(|| {
        TokenError::Other("the key URI names no token= label to initialize".into())
    })?;
    let context = load_module(settings)?;
    for slot in context.get_slots_with_initialized_token()? {
        let info = context.get_token_info(slot)?;
        if info.label().trim() == label {
            // An earlier init that stopped between C_InitToken and C_InitPIN leaves a token
            // no one can log in to as user: say so rather than only "exists".
            let half_made = if info.user_pin_initialized() {
                ""
            } else {
                " without a user PIN (an earlier token init stopped half way); delete it \
                 (for SoftHSM: softhsm2-util --delete-token --token <label>) and run token \
                 init again"
            };
            return Err(TokenError::Other(format!(
                "a token labelled {label:?} already exists{half_made}"
            )));
        }
    }
    let (free, info) = context
        .get_slots_with_token()?
        .into_iter()
        .find_map(|slot| {
            let info = context.get_token_info(slot).ok()?;
            (!info.token_initialized()).then_some((slot, info))
        })
        .ok_or_else(|| TokenError::Other("no uninitialized token slot is available".into()))?;
    // Both lengths are checked before anything is written: a PIN refused after
    // C_InitToken would leave a token with no user PIN behind.
    pin_length_fits("security officer PIN", so_pin, &info)?;
    pin_length_fits("user PIN", user_pin, &info)?;
    context
        .init_token(free, &auth_pin(so_pin), &label)
        .map_err(|e| match e {
            // SoftHSM answers a PIN it will not set with CKR_PIN_INCORRECT here.
            CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _) => {
                TokenError::Other("the token refused the security officer PIN".into())
            }
            other => other.into(),
        })?;
    // SoftHSM moves an initialized token to a new slot: look it up again by label.
    let uri = Pkcs11Uri {
        token: Some(label.clone()),
        object: Some(String::new()),
        ..Default::default()
    };
    let slot = find_token(&context, &uri)?;
    let session = context.open_rw_session(slot)?;
    session.login(UserType::So, Some(&auth_pin(so_pin)))?;
    session.init_pin(&auth_pin(user_pin))?;
    session.logout()?;
    Ok(label)
}

/// Refuses a PIN whose length the token says it does not take (its ulMinPinLen and
/// ulMaxPinLen), naming which PIN; never the PIN itself.
fn pin_length_fits(which: &str, pin: &Secret, info: &TokenInfo) -> Result<(), TokenError> {
    let (min, max, len) = (
        info.min_pin_length(),
        info.max_pin_length(),
        pin.expose().len(),
    );
    let off = if len < min {
        "shorter"
    } else if max > 0 && len > max {
        "longer"
    } else {
        return Ok(());
    };
    Err(TokenError::Other(format!(
        "the {which} is {off} than this token takes ({min} to {max} characters)"
    )))
}

/// Key objects on the token, by class.
struct KeyObjects {
    private: Vec<ObjectHandle>,
    public: Vec<ObjectHandle>,
}

impl KeyObjects {
    fn is_empty(&self) -> bool {
        self.private.is_empty() && self.public.is_empty()
    }

    fn all(&self) -> Vec<ObjectHandle> {
        self.private.iter().chain(&self.public).copied().collect()
    }
}

/// What `root init` produced.
pub struct RootInitOutcome {
    pub root: RootCa,
    pub replaced_existing_key: bool,
}

/// `meshca root init`: a key pair on the token, a self-signed root through C_Sign, linted
/// before signing and verified after, written as PEM.
pub fn root_init(
    config: &SignerConfig,
    settings: &Pkcs11Settings,
    pin: &Secret,
    force: bool,
) -> Result<RootInitOutcome, TokenError> {
    let key_type = config.root.key_type;
    config.check_root_key_type().map_err(TokenError::Other)?;
    let common_name = config.root_common_name().map_err(TokenError::Other)?;
    let certificate = &config.root.certificate;
    // Kept to be put back should the token refuse to replace the key after the file is.
    let previous_certificate = match std::fs::read(certificate) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(TokenError::Other(format!(
                "cannot read the root certificate {} (to put it back should the token refuse a step): {e}",
                certificate.display()
            )));
        }
    };
    let token = Token::open(settings)?;
    let session = token.logged_in_session(pin, true)?;
    // The new key pair is made under a label of its own and takes the URI's label (and
    // id) only once the old pair is gone: a kill at any point leaves at most one pair the
    // URI names, never two (which no start, `root show` or `--force` could tell apart).
    let staging = token.staging();
    for leftover in staging.find_all(&session)? {
        // A root init killed before it finished.
        session.destroy_object(leftover)?;
    }
    let replaced = token.replaced_by_init(&session)?;
    if !replaced.is_empty() && !force {
        return Err(TokenError::KeyExists(token.uri.to_string()));
    }
    token.refuse_id_of_another_key(&session, &replaced.all())?;

    let (public, private) = staging.generate_key_pair(&session, key_type)?;
    let staged = [private, public];
    let staging_label = staging.key_label();
    let made =
        self_sign_root(config, &common_name, &token, &session, public, private).and_then(|root| {
            relabel_allowed(&session, &staged, &staging_label)?;
            Ok(root)
        });
    let root = match made {
        Ok(root) => root,
        Err(e) => {
            // Leave the token as it was: no half-made root key behind.
            let _ = destroy_all(&session, &staged);
            return Err(e);
        }
    };
    if let Err(e) = crate::fsutil::write_public(certificate, root.pem.as_bytes()) {
        let _ = destroy_all(&session, &staged);
        return Err(TokenError::Other(format!(
            "cannot write root certificate {}: {e}",
            certificate.display()
        )));
    }

    // Until a private key being replaced is destroyed, the previous root is whole and a
    // refusal puts everything back; once one is gone, only the new root is left.
    let put_back = |failure: String| {
        TokenError::Other(format!(
            "{failure}. Nothing was replaced: the token keeps the previous key, {}, and {}",
            restore_certificate(certificate, previous_certificate.as_deref()),
            match destroy_all(&session, &staged) {
                Ok(()) => "the new key pair was removed".to_string(),
                Err(e) => format!(
                    "the new key pair is left under the label {staging_label:?} ({e}); the next root init removes it"
                ),
            }
        ))
    };
    let half_done = |failure: String| {
        TokenError::Other(format!(
            "{failure}. A key being replaced is destroyed, so nothing can be put back: {} holds the new root, whose key pair is under the label {staging_label:?}, where no URI looks; run `meshca root init --force` again for a fresh root (it removes that pair)",
            certificate.display()
        ))
    };
    for (destroyed, handle) in replaced.private.iter().enumerate() {
        if let Err(e) = session.destroy_object(*handle) {
            let failure = format!(
                "the token refused to destroy the private key being replaced ({}: it was made with CKA_DESTROYABLE false, or the token's user may not delete keys)",
                TokenError::from(e)
            );
            return Err(if destroyed == 0 {
                put_back(failure)
            } else {
                half_done(failure)
            });
        }
    }
    let mut named = vec![Attribute::Label(token.key_label().into_bytes())];
    if let Some(id) = &token.uri.id {
        named.push(Attribute::Id(id.clone()));
    }
    for handle in staged {
        if let Err(e) = session.update_attributes(handle, &named) {
            let failure = format!(
                "the token refused to give the new key pair the label of {} ({})",
                token.uri,
                TokenError::from(e)
            );
            return Err(if replaced.private.is_empty() {
                put_back(failure)
            } else {
                half_done(failure)
            });
        }
    }
    // The old public keys last: the new root is whole by now, and they sign nothing.
    for handle in &replaced.public {
        session.destroy_object(*handle).map_err(|e| {
            TokenError::Other(format!(
                "the new root is in place ({} and the key {}), but the token refused to destroy the public key of the key it replaced ({}); it is left under the label {:?}, where only root init looks (delete it with the token's tools)",
                certificate.display(),
                token.uri,
                TokenError::from(e),
                token.key_label()
            ))
        })?;
    }
    Ok(RootInitOutcome {
        root,
        replaced_existing_key: !replaced.is_empty(),
    })
}

/// Sets each staged object's label (and id) to what it already is: proves the token lets
/// the pair be relabelled (CKA_MODIFIABLE, the role's rights) before the certificate file
/// is replaced, rather than once the key it replaces is destroyed.
fn relabel_allowed(
    session: &Session,
    staged: &[ObjectHandle],
    staging_label: &str,
) -> Result<(), TokenError> {
    for handle in staged {
        let mut same = vec![Attribute::Label(staging_label.as_bytes().to_vec())];
        for attribute in session.get_attributes(*handle, &[AttributeType::Id])? {
            if let Attribute::Id(id) = attribute {
                same.push(Attribute::Id(id));
            }
        }
        session.update_attributes(*handle, &same).map_err(|e| {
            TokenError::Other(format!(
                "the token refuses to relabel the new key pair, which root init must do ({}); nothing was replaced",
                TokenError::from(e)
            ))
        })?;
    }
    Ok(())
}

fn destroy_all(session: &Session, handles: &[ObjectHandle]) -> Result<(), TokenError> {
    for handle in handles {
        session.destroy_object(*handle)?;
    }
    Ok(())
}

/// Gives the root certificate file back its previous contents (or removes it, if there was
/// none) and says how that went.
fn restore_certificate(path: &std::path::Path, previous: Option<&[u8]>) -> String {
    let shown = path.display();
    match previous {
        Some(bytes) => match crate::fsutil::write_public(path, bytes) {
            Ok(()) => format!("{shown} holds the previous root again"),
            Err(e) => format!(
                "but {shown} could not be given back the previous root ({e}): it holds a root whose key is not on the token, so restore it from a copy"
            ),
        },
        None => match std::fs::remove_file(path) {
            Ok(()) => format!("{shown} is removed again"),
            Err(e) => format!(
                "but {shown} could not be removed ({e}): it holds a root whose key is not on the token, so delete it"
            ),
        },
    }
}

fn self_sign_root(
    config: &SignerConfig,
    common_name: &str,
    token: &Token,
    session: &Session,
    public: ObjectHandle,
    private: ObjectHandle,
) -> Result<RootCa, TokenError> {
    let policy = config.root_policy();
    let other = |m: String| TokenError::Other(m);
    let public_key = token.public_key_info(session, public)?;
    let kind = describe_public_key(&public_key).map_err(|e| other(e.to_string()))?;
    let algorithm = SignatureAlgorithm::for_key_type(config.root.key_type);
    let now = SystemTime::now();
    let plan = IntermediatePlan {
        subject: subject_name(&policy.org_name, common_name).map_err(|e| other(e.to_string()))?,
        public_key,
        serial: random_serial().map_err(|e| other(e.to_string()))?,
        not_before: now.checked_sub(BACKDATE).unwrap_or(now),
        not_after: now + policy.max_ttl,
    };
    let tbs = root_tbs(&plan, algorithm).map_err(|e| other(e.to_string()))?;
    let decoded = decode_tbs(&tbs).map_err(|e| other(e.to_string()))?;
    lint_root(
        &decoded,
        &plan,
        algorithm,
        &policy.org_name,
        policy.min_rsa_bits,
    )
    .map_err(|e| other(e.to_string()))?;
    let signature = token_sign(session, private, &kind, algorithm, &tbs)?;
    let cert_der = assemble(&tbs, algorithm, &signature).map_err(|e| other(e.to_string()))?;
    let certificate = Certificate::from_der(&cert_der).map_err(|e| other(e.to_string()))?;
    if certificate.tbs_certificate().to_der().ok().as_deref() != Some(tbs.as_slice()) {
        return Err(other("signed root does not carry the linted TBS".into()));
    }
    // from_certificate verifies the self-signature with the token's public key.
    RootCa::from_certificate(certificate).map_err(|e| other(e.to_string()))
}

/// Attributes of the root private key, for `meshca root show` and the security checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAttributes {
    pub token: bool,
    pub private: bool,
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
    /// Uses besides signing, which `root init` turns off: none lets the key leave the
    /// token, but each lets the PIN's holder do more with it than sign.
    pub decrypt: bool,
    pub unwrap: bool,
    pub sign_recover: bool,
    pub derive: bool,
    /// What the token answered when asked for CKA_VALUE.
    pub value_readable: bool,
    /// Why the key is not shown to be the root certificate's (it signed a challenge that
    /// does not verify under the certificate, or could not sign); None if it is.
    pub not_the_root_key: Option<String>,
}

impl KeyAttributes {
    /// What lets the key leave the token, or shows it once could (made outside it, or
    /// extractable at some point): each is a reason `root show` fails.
    pub fn weaknesses(&self) -> Vec<&'static str> {
        [
            (!self.token, "not a token object (CKA_TOKEN false): gone when the session ends"),
            (!self.private, "readable without login (CKA_PRIVATE false)"),
            (!self.sensitive, "not sensitive (CKA_SENSITIVE false)"),
            (self.extractable, "extractable (CKA_EXTRACTABLE true)"),
            (
                !self.always_sensitive,
                "not sensitive since it was made (CKA_ALWAYS_SENSITIVE false): imported, or once readable",
            ),
            (
                !self.never_extractable,
                "once extractable (CKA_NEVER_EXTRACTABLE false): a copy may exist outside the token",
            ),
            (self.value_readable, "its private value can be read out"),
        ]
        .into_iter()
        .filter_map(|(weak, what)| weak.then_some(what))
        .collect()
    }

    /// The uses besides signing the key allows (a key made elsewhere and adopted): warned
    /// of, not refused, as the key cannot leave the token through them.
    pub fn other_uses(&self) -> Vec<&'static str> {
        [
            (self.decrypt, "CKA_DECRYPT"),
            (self.unwrap, "CKA_UNWRAP"),
            (self.sign_recover, "CKA_SIGN_RECOVER"),
            (self.derive, "CKA_DERIVE"),
        ]
        .into_iter()
        .filter_map(|(allowed, name)| allowed.then_some(name))
        .collect()
    }
}

/// Sets the root key's uses besides signing false (CKA_DECRYPT, CKA_UNWRAP,
/// CKA_SIGN_RECOVER, CKA_DERIVE: what [`KeyAttributes::other_uses`] names), as `root init`
/// makes keys now; older builds left CKA_UNWRAP and CKA_SIGN_RECOVER to the token, which
/// SoftHSM sets true. Returns those that were allowed. Only after `root` is shown to be
/// its certificate's key: the wrong key is left alone.
pub fn restrict_key_uses(
    settings: &Pkcs11Settings,
    pin: &Secret,
    root: &RootCa,
) -> Result<Vec<&'static str>, TokenError> {
    let before = inspect_key(settings, pin, root)?;
    if let Some(why) = before.not_the_root_key {
        return Err(TokenError::Other(format!(
            "the key {} is not the root certificate's ({why}); nothing was changed",
            settings.key
        )));
    }
    let allowed = before.other_uses();
    if allowed.is_empty() {
        return Ok(allowed);
    }
    let token = Token::open(settings)?;
    let session = token.logged_in_session(pin, true)?;
    let key = token.find_private_key(&session)?;
    session.update_attributes(
        key,
        &[
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::SignRecover(false),
            Attribute::Derive(false),
        ],
    )?;
    let after = inspect_key(settings, pin, root)?;
    if !after.other_uses().is_empty() {
        return Err(TokenError::Other(format!(
            "the token kept {} true on {}",
            after.other_uses().join(", "),
            settings.key
        )));
    }
    Ok(allowed)
}

/// The root key's attributes, and whether it is `root`'s key (it signs a challenge).
pub fn inspect_key(
    settings: &Pkcs11Settings,
    pin: &Secret,
    root: &RootCa,
) -> Result<KeyAttributes, TokenError> {
    let token = Token::open(settings)?;
    let session = token.logged_in_session(pin, false)?;
    let key = token.find_private_key(&session)?;
    let mut attributes = KeyAttributes {
        token: false,
        private: false,
        sensitive: false,
        extractable: true,
        always_sensitive: false,
        never_extractable: false,
        // An attribute the token does not define for the key is a use it does not have.
        decrypt: false,
        unwrap: false,
        sign_recover: false,
        derive: false,
        value_readable: true,
        not_the_root_key: prove_root_key(&token, &session, key, root)
            .err()
            .map(|e| e.to_string()),
    };
    for attr in session.get_attributes(
        key,
        &[
            AttributeType::Token,
            AttributeType::Private,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Decrypt,
            AttributeType::Unwrap,
            AttributeType::SignRecover,
            AttributeType::Derive,
        ],
    )? {
        match attr {
            Attribute::Token(v) => attributes.token = v,
            Attribute::Private(v) => attributes.private = v,
            Attribute::Sensitive(v) => attributes.sensitive = v,
            Attribute::Extractable(v) => attributes.extractable = v,
            Attribute::AlwaysSensitive(v) => attributes.always_sensitive = v,
            Attribute::NeverExtractable(v) => attributes.never_extractable = v,
            Attribute::Decrypt(v) => attributes.decrypt = v,
            Attribute::Unwrap(v) => attributes.unwrap = v,
            Attribute::SignRecover(v) => attributes.sign_recover = v,
            Attribute::Derive(v) => attributes.derive = v,
            _ => {}
        }
    }
    // Ask for the secret parts directly: a sound token answers "sensitive".
    let probes = [
        AttributeType::Value,
        AttributeType::PrivateExponent,
        AttributeType::Prime1,
    ];
    let info = session.get_attribute_info(key, &probes)?;
    attributes.value_readable = info
        .iter()
        .any(|i| matches!(i, AttributeInfo::Available(_)));
    let values = session.get_attributes(key, &probes)?;
    attributes.value_readable |= !values.is_empty();
    Ok(attributes)
}

/// The serving backend: a pool of logged-in sessions, one token thread each, signing
/// intermediates.
#[derive(Clone)]
pub struct Pkcs11Backend {
    threads: Arc<TokenThreads<Inner>>,
    inner: Arc<Inner>,
    signed: Arc<RecentSigning>,
    /// Set once every token thread is out of its call at shutdown: only then may the
    /// module be finalized (C_Finalize beside a call still in the token is not allowed).
    calls_finished: Arc<AtomicBool>,
}

/// How long a signature the token made counts as an answer to readiness: under load the
/// check would wait behind every queued signing, and a slow token with a long queue
/// would then be reported unready, and taken out of service, while it signs.
const SIGNED_RECENTLY: Duration = Duration::from_secs(5);

/// When the token last made a signature, and last failed one for being gone, each as
/// the token thread saw the call end: with several threads, a signature that ended before
/// the token went can be recorded after the failure that saw it gone.
#[derive(Default)]
struct RecentSigning(Mutex<Answers>);

#[derive(Default)]
struct Answers {
    signed: Option<Instant>,
    gone: Option<Instant>,
}

impl RecentSigning {
    /// Records what a signing call that ended `at` said about the token: a signature, the
    /// token gone, or nothing about it (a request refused after signing, say).
    fn record(&self, outcome: &Result<Certificate, BackendError>, at: Instant) {
        let mut answers = lock(&self.0);
        let latest = |slot: &mut Option<Instant>| *slot = Some(slot.map_or(at, |t| t.max(at)));
        match outcome {
            Ok(_) => latest(&mut answers.signed),
            Err(BackendError::Unavailable(_) | BackendError::PinRejected { .. }) => {
                latest(&mut answers.gone)
            }
            Err(_) => {}
        }
    }

    /// A signature within `period` of `now`, and no call that found the token gone since.
    fn within(&self, period: Duration, now: Instant) -> bool {
        let answers = lock(&self.0);
        answers.signed.is_some_and(|signed| {
            now.saturating_duration_since(signed) < period
                && answers.gone.is_none_or(|gone| gone < signed)
        })
    }
}

/// Shortest interval between two reconnects: a token that stays away is not hammered.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

struct Inner {
    settings: Pkcs11Settings,
    pin: Secret,
    root: RootCa,
    /// The loaded module and the token's slot; replaced as a whole when the token comes
    /// back after being removed (SoftHSM needs C_Finalize + C_Initialize to see it again).
    token: RwLock<Token>,
    key: Mutex<Option<ObjectHandle>>,
    sessions: Mutex<Vec<Session>>,
    /// Held to open a session while the pool is empty, which may log in. After a
    /// reconnect every token thread finds the pool empty at once: unserialised, each
    /// would send the PIN, and a PIN changed on the token meanwhile would cost one refused
    /// try per thread towards its lockout. In turn, each finds the login already done
    /// (login state is the application's, not the session's) or the PIN refused.
    login: Mutex<()>,
    /// Set once the token refused the PIN (never sent again): whether it said locked.
    pin_refusal: std::sync::OnceLock<bool>,
    last_reconnect: Mutex<Option<Instant>>,
    /// Why the last reconnect failed, until one succeeds: errors on the connection left
    /// behind (finalized) say only "not initialized", so this is what callers are told.
    reconnect_failure: Mutex<Option<String>>,
    /// Counts reconnects, so a thread that failed on an old connection retries on the new
    /// one instead of reconnecting again.
    generation: AtomicU64,
}

impl Pkcs11Backend {
    /// Opens the token, logs in, finds the key and proves it matches the root certificate
    /// by signing a random challenge: a signer never starts against the wrong key.
    pub fn start(settings: &Pkcs11Settings, pin: Secret, root: RootCa) -> Result<Self, TokenError> {
        let token = Token::open(settings)?;
        let session = token.logged_in_session(&pin, false)?;
        let key = token.find_private_key(&session)?;
        prove_root_key(&token, &session, key, &root)?;
        let mut sessions = vec![session];
        for opened in 1..settings.sessions {
            let session = token.logged_in_session(&pin, false).map_err(|e| match e {
                // Small tokens cap sessions (a YubiHSM 2 at 16): say which setting to lower.
                TokenError::Call { .. } | TokenError::Other(_) => TokenError::Other(format!(
                    "the token opened {opened} of the {} sessions asked for (pkcs11.sessions): {e}; set pkcs11.sessions to what the token allows",
                    settings.sessions
                )),
                other => other,
            })?;
            sessions.push(session);
        }
        let inner = Arc::new(Inner {
            settings: settings.clone(),
            pin,
            root,
            token: RwLock::new(token),
            key: Mutex::new(Some(key)),
            sessions: Mutex::new(sessions),
            login: Mutex::new(()),
            pin_refusal: std::sync::OnceLock::new(),
            last_reconnect: Mutex::new(None),
            reconnect_failure: Mutex::new(None),
            generation: AtomicU64::new(0),
        });
        // One thread per session: a token call never waits for a session.
        let threads = TokenThreads::start(inner.clone(), settings.sessions, "meshca-token")
            .map_err(|e| TokenError::Other(format!("cannot start the token threads: {e}")))?;
        Ok(Pkcs11Backend {
            threads: Arc::new(threads),
            inner,
            signed: Arc::default(),
            calls_finished: Arc::default(),
        })
    }
}

/// Proves that `key` is the root certificate's key: it signs a random challenge, which
/// must verify under the certificate.
fn prove_root_key(
    token: &Token,
    session: &Session,
    key: ObjectHandle,
    root: &RootCa,
) -> Result<(), TokenError> {
    let mut challenge = [0u8; 32];
    getrandom::fill(&mut challenge).map_err(|e| TokenError::Other(e.to_string()))?;
    let signature = token_sign(
        session,
        key,
        &root.key_kind,
        root.signature_algorithm,
        &challenge,
    )?;
    root.verifier
        .verify(root.signature_algorithm, &challenge, &signature)
        .map_err(|_| {
            TokenError::Other(format!(
                "the key {} on the token does not match the root certificate: was the root re-initialized without updating the certificate file, or is this another token under the same label?",
                token.uri
            ))
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// A pooled session, or a new one. A refused PIN is remembered and never tried again.
    fn checkout(&self, token: &Token) -> Result<Session, BackendError> {
        if let Some(session) = lock(&self.sessions).pop() {
            return Ok(session);
        }
        let _one_login_at_a_time = lock(&self.login);
        if let Some(refused) = self.refused_pin() {
            return Err(refused);
        }
        match token.logged_in_session(&self.pin, false) {
            Ok(session) => Ok(session),
            Err(e @ (TokenError::PinIncorrect { .. } | TokenError::PinLocked)) => {
                let locked = *self
                    .pin_refusal
                    .get_or_init(|| matches!(e, TokenError::PinLocked));
                Err(BackendError::PinRejected { locked })
            }
            Err(e) => Err(BackendError::Unavailable(e.to_string())),
        }
    }

    /// The refusal of the PIN, once the token refused it.
    fn refused_pin(&self) -> Option<BackendError> {
        self.pin_refusal
            .get()
            .map(|&locked| BackendError::PinRejected { locked })
    }

    fn checkin(&self, session: Session) {
        lock(&self.sessions).push(session);
    }

    /// The key handle, looked up again when unknown (after a reconnect) and then proven
    /// to be the root's, as at start: the token that came back may be another one under
    /// the same label (a failover, a restored token directory). A key that is not the
    /// root's is never kept, so each later attempt (and reconnect) checks again.
    fn key(&self, token: &Token, session: &Session) -> Result<ObjectHandle, BackendError> {
        if let Some(key) = *lock(&self.key) {
            return Ok(key);
        }
        let unavailable = |e: TokenError| BackendError::Unavailable(e.to_string());
        let key = token.find_private_key(session).map_err(unavailable)?;
        prove_root_key(token, session, key, &self.root).map_err(unavailable)?;
        *lock(&self.key) = Some(key);
        Ok(key)
    }

    /// One signing attempt on the current connection. The error says whether the
    /// connection looks broken.
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, (BackendError, bool)> {
        let root = &self.root;
        let token = self.token.read().unwrap_or_else(|p| p.into_inner());
        let session = self.checkout(&token).map_err(|e| (e, true))?;
        let key = match self.key(&token, &session) {
            Ok(key) => key,
            Err(e) => return Err((e, true)),
        };
        match token_sign(
            &session,
            key,
            &root.key_kind,
            root.signature_algorithm,
            message,
        ) {
            Ok(signature) => {
                self.checkin(session);
                Ok(signature)
            }
            Err(e) if session_is_broken(&e) => {
                tracing::warn!(error = %e, "PKCS#11 session failed; it will be replaced");
                Err((
                    BackendError::Unavailable(format!("token signing failed: {e}")),
                    true,
                ))
            }
            Err(e) => {
                self.checkin(session);
                Err((
                    BackendError::Unavailable(format!("token signing failed: {e}")),
                    false,
                ))
            }
        }
    }

    /// Signs with a pooled session. If the session or the token broke, the connection is
    /// rebuilt (at most once per second) and the signature tried once more.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, BackendError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let signed = match self.try_sign(message) {
            Ok(signature) => Ok(signature),
            Err((refused @ BackendError::PinRejected { .. }, _)) => Err(refused),
            Err((e, false)) => Err(e),
            Err((e, true)) => {
                if self.reconnect(generation) {
                    self.try_sign(message).map_err(|(e, _)| e)
                } else {
                    Err(self.explained(e))
                }
            }
        };
        signed.map_err(with_open_files)
    }

    /// Drops every session, finalizes the module, loads it again and finds the token.
    /// Returns whether there is a newer connection than `seen` to retry on.
    fn reconnect(&self, seen: u64) -> bool {
        if self.pin_refusal.get().is_some() {
            return false;
        }
        let mut token = self.token.write().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) != seen {
            // Another thread reconnected while this one waited for the lock.
            return true;
        }
        {
            let mut last = lock(&self.last_reconnect);
            if last.is_some_and(|t| t.elapsed() < RECONNECT_INTERVAL) {
                return false;
            }
            *last = Some(Instant::now());
        }
        lock(&self.sessions).clear();
        *lock(&self.key) = None;
        let _ = token.context.clone().finalize();
        match Token::open(&self.settings) {
            Ok(fresh) => {
                *token = fresh;
                self.generation.fetch_add(1, Ordering::SeqCst);
                *lock(&self.reconnect_failure) = None;
                tracing::info!(token = %token.uri, "reconnected to the PKCS#11 token");
                true
            }
            Err(e) => {
                match crate::process::open_files_used_up() {
                    Some(used_up) => {
                        tracing::warn!(error = %e, open_files = %used_up, "PKCS#11 token still unavailable, perhaps for want of open files")
                    }
                    None => tracing::warn!(error = %e, "PKCS#11 token still unavailable"),
                }
                *lock(&self.reconnect_failure) = Some(e.to_string());
                false
            }
        }
    }

    /// `e`, from the connection in hand, unless the PIN was refused since or the last
    /// reconnect failed: then why it did (the module, the token, the key URI), which `e`
    /// on a finalized connection hides.
    fn explained(&self, e: BackendError) -> BackendError {
        // Refused by a thread that reconnected first: nothing else will be tried.
        if let Some(refused) = self.refused_pin() {
            return refused;
        }
        match lock(&self.reconnect_failure).as_deref() {
            Some(failure) => BackendError::Unavailable(format!(
                "{failure} (key {}; tried again at most every {}s)",
                self.settings.key,
                RECONNECT_INTERVAL.as_secs()
            )),
            None => e,
        }
    }

    /// Closes the pooled sessions and finalizes the module (C_Finalize, the last call
    /// PKCS#11 expects of an application: a network HSM's client library closes its
    /// connections there). Only once no token thread is in a call.
    fn finalize(&self) {
        let token = self.token.write().unwrap_or_else(|p| p.into_inner());
        lock(&self.sessions).clear();
        *lock(&self.key) = None;
        if let Err(e) = token.context.clone().finalize() {
            tracing::warn!(error = %e, "closing the PKCS#11 module (C_Finalize) failed");
        }
    }

    /// A signing that waited `limit` for the token and got no answer.
    fn timed_out(&self, limit: Duration) -> BackendError {
        BackendError::Unavailable(format!(
            "the token did not answer within {} s (pkcs11.timeout_seconds): it hangs, or is too busy for this signer's load (key {})",
            limit.as_secs(),
            self.settings.key
        ))
    }

    /// Build, lint, sign, check: the whole issuance of one intermediate. `caller_gave_up`
    /// is set once its caller has answered without waiting for it (timed out).
    fn issue_blocking(
        &self,
        request: &IssueRequest,
        caller_gave_up: &AtomicBool,
    ) -> Result<Certificate, BackendError> {
        if request.client_gone.is_cancelled() {
            return Err(BackendError::ClientGone);
        }
        let root = &self.root;
        let tbs = intermediate_tbs(&request.plan, root, &request.trust_domains)
            .map_err(|e| BackendError::Check(e.to_string()))?;
        let decoded = decode_tbs(&tbs).map_err(|e| BackendError::Check(e.to_string()))?;
        lint_intermediate(&decoded, &request.expectations(root, true))?;
        // Noted before the look at the caller (both SeqCst): a caller that gave up first
        // gets nothing signed; one that gives up after finds the signing on record.
        request.signing_asked.note();
        if caller_gave_up.load(Ordering::SeqCst) {
            request.signing_asked.withdraw();
            return Err(BackendError::Unavailable(
                "the request timed out before the token was asked to sign; nothing was signed"
                    .into(),
            ));
        }
        let signature = self.sign(&tbs)?;
        let cert_der = assemble(&tbs, root.signature_algorithm, &signature)
            .map_err(|e| BackendError::Check(e.to_string()))?;
        check_signed_certificate(&cert_der, &tbs, root)
            .map_err(|e| BackendError::Check(e.to_string()))
    }

    /// Build, sign, check: a cross certificate for `announced` under the root key, made
    /// as intermediates are (the exact TBS built here, signed on the token).
    fn cross_sign_blocking(&self, announced: &RootCa) -> Result<Certificate, BackendError> {
        let root = &self.root;
        let check = |e: String| BackendError::Check(format!("cross certificate: {e}"));
        let plan = crate::pki::cross::cross_plan(announced, root, std::time::SystemTime::now())
            .map_err(|e| check(e.to_string()))?;
        let tbs = crate::pki::profile::cross_tbs(&plan, announced, root)
            .map_err(|e| check(e.to_string()))?;
        let signature = self.sign(&tbs)?;
        let cert_der = assemble(&tbs, root.signature_algorithm, &signature)
            .map_err(|e| check(e.to_string()))?;
        let cert =
            check_signed_certificate(&cert_der, &tbs, root).map_err(|e| check(e.to_string()))?;
        crate::pki::cross::check_cross(&cert, &root.certificate, &announced.certificate)
            .and_then(|()| crate::pki::cross::check_cross_key_ids(&cert, root, announced))
            .map_err(|e| check(e.to_string()))?;
        Ok(cert)
    }

    /// Ready means: a logged-in session exists, the key can be found on the token, and
    /// since the last reconnect it has been proven to be the root's.
    fn try_ready(&self) -> Result<(), (BackendError, bool)> {
        let token = self.token.read().unwrap_or_else(|p| p.into_inner());
        let session = self.checkout(&token).map_err(|e| (e, true))?;
        let logged_in = matches!(
            session.get_session_info().map(|i| i.session_state()),
            Ok(SessionState::RoUser | SessionState::RwUser)
        );
        if !logged_in {
            return Err((
                BackendError::Unavailable("the token session is no longer logged in".into()),
                true,
            ));
        }
        let found = token
            .find_private_key(&session)
            .map_err(|e| BackendError::Unavailable(e.to_string()));
        if let Ok(found) = &found {
            // Another key than the one proven (a `root init --force` run beside the
            // signer): proven again, or the check would pass on the handle in hand.
            let mut proven = lock(&self.key);
            if proven.is_some_and(|key| key != *found) {
                *proven = None;
            }
        }
        match found.and_then(|_| self.key(&token, &session)) {
            Ok(_) => {
                self.checkin(session);
                Ok(())
            }
            Err(e) => Err((e, true)),
        }
    }

    fn ready(&self) -> Result<(), BackendError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let ready = match self.try_ready() {
            Ok(()) => Ok(()),
            Err((refused @ BackendError::PinRejected { .. }, _)) => Err(refused),
            Err((e, _)) => {
                if self.reconnect(generation) {
                    self.try_ready().map_err(|(e, _)| e)
                } else {
                    Err(self.explained(e))
                }
            }
        };
        ready.map_err(with_open_files)
    }
}

/// A token that could not be used, led by what this process's open files say when they
/// are used up: the module's own error names another cause or none (SoftHSM, unable to
/// open its object files, finds no key, or answers "general error", as its C_Initialize
/// at a reconnect does), so the operator would look at the token, not at the files.
fn with_open_files(e: BackendError) -> BackendError {
    match e {
        BackendError::Unavailable(message) => match crate::process::open_files_used_up() {
            Some(used_up) => BackendError::Unavailable(format!(
                "{used_up}; a PKCS#11 module that cannot open a file fails as the token did here: {message}"
            )),
            None => BackendError::Unavailable(message),
        },
        other => other,
    }
}

impl Pkcs11Backend {
    /// Runs `work` on a token thread once one is free (one token operation at a time per
    /// session; waiting here costs no thread). `what` names the task in errors, and in
    /// the log should the token hold it past shutdown.
    async fn on_session<T: Send + 'static>(
        &self,
        what: String,
        work: impl FnOnce(&Inner) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let failed = format!("{what} task failed");
        self.threads
            .run(what, work)
            .await
            .map_err(|e| BackendError::Unavailable(format!("{failed}: {e}")))?
    }
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl RootSigner for Pkcs11Backend {
    fn root(&self) -> &RootCa {
        &self.inner.root
    }

    fn issue(&self, request: IssueRequest) -> BoxFuture<'_, Result<Certificate, BackendError>> {
        Box::pin(async move {
            let limit = self.inner.settings.timeout;
            let queued = Instant::now();
            // Set by whichever comes first: the token's answer or the caller giving up on it
            // (timed out, or this future dropped: the signer stopping).
            let settled = Arc::new(AtomicBool::new(false));
            let _settled_when_dropped = SetOnDrop(settled.clone());
            let answered = settled.clone();
            let what = format!("signing serial {}", serial_hex(&request.plan.serial));
            let signing = self.on_session(what, move |inner| {
                let outcome = inner.issue_blocking(&request, &answered);
                let ended = Instant::now();
                if answered.swap(true, Ordering::SeqCst) && outcome.is_ok() {
                    // Its caller has answered 503 and gone: the certificate dies here.
                    tracing::warn!(
                        serial = %serial_hex(&request.plan.serial),
                        seconds = ended.duration_since(queued).as_secs(),
                        "the token signed after the request had timed out (or the signer stopped waiting for it); the certificate is thrown away, never handed out"
                    );
                }
                Ok((outcome, ended))
            });
            tokio::pin!(signing);
            let failed = |e| (Err(e), Instant::now());
            let (outcome, ended) = match tokio::time::timeout(limit, &mut signing).await {
                Ok(done) => done.unwrap_or_else(failed),
                // A queued signing is dropped unsigned; one the token holds is thrown away
                // if it ever ends (above). Counted as the token gone, so readiness asks it.
                Err(_) if !settled.swap(true, Ordering::SeqCst) => {
                    failed(self.inner.timed_out(limit))
                }
                // The token answered as the time ran out: its answer is on its way.
                Err(_) => signing.await.unwrap_or_else(failed),
            };
            self.signed.record(&outcome, ended);
            outcome
        })
    }

    fn cross_sign<'a>(
        &'a self,
        announced: &'a RootCa,
    ) -> BoxFuture<'a, Result<Certificate, BackendError>> {
        let announced = announced.clone();
        Box::pin(async move {
            let limit = self.inner.settings.timeout;
            let what = format!("cross-signing root sha256 {}", announced.fingerprint_sha256);
            let signing = self.on_session(what, move |inner| inner.cross_sign_blocking(&announced));
            match tokio::time::timeout(limit, signing).await {
                Ok(outcome) => outcome,
                Err(_) => Err(self.inner.timed_out(limit)),
            }
        })
    }

    fn readiness(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        if self.signed.within(SIGNED_RECENTLY, Instant::now()) {
            return Box::pin(std::future::ready(Ok(())));
        }
        Box::pin(self.on_session("readiness check".into(), |inner| inner.ready()))
    }

    fn describe(&self) -> String {
        format!("pkcs11 {}", self.inner.settings.key)
    }

    /// A call gets `timeout_seconds` from its start, as a signing's caller does: one past
    /// it has been given up on already, and waiting longer for it would hold the exit
    /// for as long as the token stays away.
    fn finish_calls(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let limit = self.inner.settings.timeout;
            let outstanding = self.threads.stop(limit).await;
            self.calls_finished
                .store(outstanding.is_empty(), Ordering::SeqCst);
            for call in outstanding {
                tracing::warn!(
                    call = %call.what,
                    running_seconds = call.running.as_secs(),
                    timeout_seconds = limit.as_secs(),
                    key = %self.inner.settings.key,
                    "a token call was still under way at shutdown, past pkcs11.timeout_seconds: the exit does not wait for it; its thread is left to the process exit, its session neither closed nor logged out"
                );
            }
        })
    }

    /// Closes the sessions and finalizes the module once [`Self::finish_calls`] saw every
    /// call end; on a thread of its own, waited for at most `timeout_seconds`, so that a
    /// token that stops answering now does not hold up the exit either.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if !self.calls_finished.load(Ordering::SeqCst) {
                return;
            }
            let (done, finalized) = tokio::sync::oneshot::channel();
            let inner = self.inner.clone();
            let spawned = std::thread::Builder::new()
                .name("meshca-token-close".into())
                .spawn(move || {
                    inner.finalize();
                    let _ = done.send(());
                });
            if spawned.is_ok()
                && tokio::time::timeout(self.inner.settings.timeout, finalized)
                    .await
                    .is_err()
            {
                tracing::warn!(
                    key = %self.inner.settings.key,
                    "closing the PKCS#11 sessions and module did not end within pkcs11.timeout_seconds; left to the process exit"
                );
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key made as `root init` makes it.
    fn sound_key() -> KeyAttributes {
        KeyAttributes {
            token: true,
            private: true,
            sensitive: true,
            extractable: false,
            always_sensitive: true,
            never_extractable: true,
            decrypt: false,
            unwrap: false,
            sign_recover: false,
            derive: false,
            value_readable: false,
            not_the_root_key: None,
        }
    }

    #[test]
    fn each_way_a_key_could_leave_the_token_is_a_weakness() {
        let sound = sound_key();
        assert!(sound.weaknesses().is_empty());
        assert!(sound.other_uses().is_empty());
        let imported = KeyAttributes {
            always_sensitive: false,
            never_extractable: false,
            ..sound.clone()
        };
        assert_eq!(
            imported.weaknesses().len(),
            2,
            "{:?}",
            imported.weaknesses()
        );
        let open = KeyAttributes {
            token: false,
            private: false,
            sensitive: false,
            extractable: true,
            always_sensitive: false,
            never_extractable: false,
            decrypt: true,
            unwrap: true,
            sign_recover: true,
            derive: true,
            value_readable: true,
            not_the_root_key: None,
        };
        assert_eq!(open.weaknesses().len(), 7, "{:?}", open.weaknesses());
        assert_eq!(
            open.other_uses(),
            [
                "CKA_DECRYPT",
                "CKA_UNWRAP",
                "CKA_SIGN_RECOVER",
                "CKA_DERIVE"
            ]
        );
    }

    #[test]
    fn uses_besides_signing_are_named_but_are_no_weakness() {
        let unwraps = KeyAttributes {
            unwrap: true,
            ..sound_key()
        };
        assert!(unwraps.weaknesses().is_empty());
        assert_eq!(unwraps.other_uses(), ["CKA_UNWRAP"]);
    }

    #[test]
    fn readiness_takes_a_recent_signature_for_an_answer_until_the_token_fails() {
        let (_key, root) = crate::pki::testing::software_root(
            KeyType::EcdsaP256,
            "acme",
            Duration::from_secs(3600),
        );
        let signature = Ok(root.certificate.clone());
        let signed = RecentSigning::default();
        let start = Instant::now();
        assert!(!signed.within(SIGNED_RECENTLY, start), "nothing signed yet");
        signed.record(&signature, start);
        assert!(signed.within(SIGNED_RECENTLY, start + Duration::from_secs(4)));
        assert!(!signed.within(SIGNED_RECENTLY, start + SIGNED_RECENTLY));
        // A refusal after signing says nothing about the token; the token gone does.
        signed.record(&Err(BackendError::ClientGone), start);
        assert!(signed.within(SIGNED_RECENTLY, start));
        signed.record(&Err(BackendError::Unavailable("gone".into())), start);
        assert!(!signed.within(SIGNED_RECENTLY, start));
        signed.record(&signature, start);
        signed.record(
            &Err(BackendError::PinRejected { locked: false }),
            start + Duration::from_millis(1),
        );
        assert!(!signed.within(SIGNED_RECENTLY, start + Duration::from_millis(2)));
        // A signature that ended before the token went, recorded after the failure that
        // found it gone, does not make it ready again; a later one does.
        let gone_at = start + Duration::from_secs(10);
        signed.record(&Err(BackendError::Unavailable("gone".into())), gone_at);
        signed.record(&signature, gone_at - Duration::from_millis(5));
        assert!(!signed.within(SIGNED_RECENTLY, gone_at));
        signed.record(&signature, gone_at + Duration::from_millis(5));
        assert!(signed.within(SIGNED_RECENTLY, gone_at + Duration::from_millis(6)));
    }
}
