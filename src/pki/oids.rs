//! Names for the OIDs of algorithms and curves meshca meets but does not take, so that a
//! refusal says what it refuses: an OID alone sends the reader to a search engine.

use std::fmt;

use const_oid::ObjectIdentifier;

/// The names operators know, where const-oid's database has another spelling or none.
const COMMON_NAMES: [(ObjectIdentifier, &str); 9] = [
    (ObjectIdentifier::new_unwrap("1.3.132.0.33"), "P-224"),
    (ObjectIdentifier::new_unwrap("1.3.132.0.35"), "P-521"),
    (ObjectIdentifier::new_unwrap("1.3.132.0.10"), "secp256k1"),
    (
        ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10"),
        "RSASSA-PSS",
    ),
    (
        ObjectIdentifier::new_unwrap("1.2.840.10045.4.1"),
        "ecdsa-with-SHA1",
    ),
    (ObjectIdentifier::new_unwrap("1.3.101.112"), "Ed25519"),
    (ObjectIdentifier::new_unwrap("1.3.101.113"), "Ed448"),
    (
        ObjectIdentifier::new_unwrap("1.2.156.10197.1.501"),
        "SM2-with-SM3",
    ),
    (ObjectIdentifier::new_unwrap("1.2.840.10040.4.1"), "DSA"),
];

/// A name for `oid`, where one is known.
pub fn name(oid: &ObjectIdentifier) -> Option<&'static str> {
    COMMON_NAMES
        .iter()
        .find(|(known, _)| known == oid)
        .map(|(_, name)| *name)
        .or_else(|| const_oid::db::DB.by_oid(oid))
}

/// Shows an OID with its name where known: `1.2.840.113549.1.1.10 (RSASSA-PSS)`.
#[derive(Debug, Clone, Copy)]
pub struct Named<'a>(pub &'a ObjectIdentifier);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match name(self.0) {
            Some(name) => write!(f, "{} ({name})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_algorithms_are_named_beside_their_oid() {
        for (oid, shown) in [
            (
                "1.2.840.113549.1.1.10",
                "1.2.840.113549.1.1.10 (RSASSA-PSS)",
            ),
            (
                "1.2.840.113549.1.1.5",
                "1.2.840.113549.1.1.5 (sha1WithRSAEncryption)",
            ),
            ("1.2.840.10045.4.1", "1.2.840.10045.4.1 (ecdsa-with-SHA1)"),
            ("1.3.101.112", "1.3.101.112 (Ed25519)"),
            ("1.2.3.4", "1.2.3.4"),
        ] {
            let oid = ObjectIdentifier::new_unwrap(oid);
            assert_eq!(Named(&oid).to_string(), shown);
        }
    }
}
