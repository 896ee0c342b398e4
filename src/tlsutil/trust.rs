//! The transport trust a server's TLS settings hold (the certificate it presents, the
//! client CAs it trusts, the CRLs it enforces, what an overdue CRL means), as the audit
//! log records it: an investigator reads from the log alone which client CAs a decision
//! was made under, as the rules' digest tells which rules.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::CrlOverdue;

/// What a server trusts and presents. Every field defaults, so a record of an older or
/// newer build still reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TransportTrust {
    pub server_certificate: ServerCertificate,
    /// In the order of the `client_ca` file.
    pub client_cas: Vec<TrustedCa>,
    /// The CRLs enforced (superseded ones left out), in the order first met.
    pub client_crls: Vec<EnforcedCrl>,
    pub client_crl_overdue: CrlOverdue,
}

/// The certificate the server presents (the first of its chain).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerCertificate {
    /// SHA-256 of its DER, lowercase hex.
    pub sha256: String,
    pub not_after: String,
}

/// A certificate of the `client_ca` bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrustedCa {
    pub subject: String,
    /// SHA-256 of its DER, lowercase hex.
    pub sha256: String,
}

/// A CRL in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnforcedCrl {
    pub issuer: String,
    /// Decimal (hex beyond 128 bits), as `openssl crl -text` shows it; none if it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl_number: Option<String>,
    pub this_update: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_update: Option<String>,
    /// SHA-256 of its DER, lowercase hex.
    pub sha256: String,
}

/// A setting replaced by a reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switched<T> {
    pub old: T,
    pub new: T,
}

/// How one [`TransportTrust`] differs from another: certificates and CRLs told apart by
/// their SHA-256 (a PEM rewritten is the same), a CRL replaced by a newer one of its issuer
/// as one removed and one added. Empty when nothing differs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrustChange {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_cas_added: Vec<TrustedCa>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_cas_removed: Vec<TrustedCa>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_crls_added: Vec<EnforcedCrl>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_crls_removed: Vec<EnforcedCrl>,
    /// The server certificate's SHA-256 before and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<Switched<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_crl_overdue: Option<Switched<CrlOverdue>>,
}

impl TrustChange {
    pub fn between(old: &TransportTrust, new: &TransportTrust) -> Self {
        let switched = |old: &String, new: &String| {
            (old != new).then(|| Switched {
                old: old.clone(),
                new: new.clone(),
            })
        };
        TrustChange {
            client_cas_added: missing(&new.client_cas, &old.client_cas),
            client_cas_removed: missing(&old.client_cas, &new.client_cas),
            client_crls_added: missing(&new.client_crls, &old.client_crls),
            client_crls_removed: missing(&old.client_crls, &new.client_crls),
            server_certificate: switched(
                &old.server_certificate.sha256,
                &new.server_certificate.sha256,
            ),
            client_crl_overdue: (old.client_crl_overdue != new.client_crl_overdue).then_some(
                Switched {
                    old: old.client_crl_overdue,
                    new: new.client_crl_overdue,
                },
            ),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == TrustChange::default()
    }
}

/// What is told apart by the SHA-256 of its DER.
trait Fingerprinted: Clone {
    fn sha256(&self) -> &str;
}

impl Fingerprinted for TrustedCa {
    fn sha256(&self) -> &str {
        &self.sha256
    }
}

impl Fingerprinted for EnforcedCrl {
    fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// The items of `from` that `in_` does not hold.
fn missing<T: Fingerprinted>(from: &[T], in_: &[T]) -> Vec<T> {
    from.iter()
        .filter(|item| !in_.iter().any(|other| other.sha256() == item.sha256()))
        .cloned()
        .collect()
}

impl fmt::Display for TrustChange {
    /// One statement per change, `; `-separated, as a `reload` record's message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut statements = Vec::new();
        for (cas, what) in [
            (&self.client_cas_added, "added"),
            (&self.client_cas_removed, "removed"),
        ] {
            for ca in cas {
                statements.push(format!(
                    "client CA {} sha256 {} {what}",
                    ca.subject, ca.sha256
                ));
            }
        }
        for (crls, what) in [
            (&self.client_crls_added, "added"),
            (&self.client_crls_removed, "removed"),
        ] {
            for crl in crls {
                let number = crl
                    .crl_number
                    .as_deref()
                    .map(|n| format!("number {n}, "))
                    .unwrap_or_default();
                statements.push(format!(
                    "client CRL of {} ({number}thisUpdate {}) sha256 {} {what}",
                    crl.issuer, crl.this_update, crl.sha256
                ));
            }
        }
        if let Some(Switched { old, new }) = &self.server_certificate {
            statements.push(format!("server certificate sha256 {old} -> {new}"));
        }
        if let Some(Switched { old, new }) = &self.client_crl_overdue {
            statements.push(format!(
                "client_crl_overdue {} -> {}",
                old.name(),
                new.name()
            ));
        }
        f.write_str(&statements.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(name: &str) -> TrustedCa {
        TrustedCa {
            subject: format!("CN={name}"),
            sha256: format!("{name}-sha"),
        }
    }

    fn crl(issuer: &str, number: &str) -> EnforcedCrl {
        EnforcedCrl {
            issuer: format!("CN={issuer}"),
            crl_number: Some(number.into()),
            this_update: "2026-12-01T00:00:00.000Z".into(),
            next_update: None,
            sha256: format!("{issuer}-{number}-sha"),
        }
    }

    fn trust(cas: &[&str], crls: &[(&str, &str)], server: &str) -> TransportTrust {
        TransportTrust {
            server_certificate: ServerCertificate {
                sha256: server.into(),
                not_after: "2027-01-01T00:00:00.000Z".into(),
            },
            client_cas: cas.iter().map(|name| ca(name)).collect(),
            client_crls: crls.iter().map(|(i, n)| crl(i, n)).collect(),
            client_crl_overdue: CrlOverdue::Accept,
        }
    }

    #[test]
    fn the_same_trust_is_no_change_and_every_difference_is_named() {
        let before = trust(&["a"], &[("a", "1")], "s1");
        assert!(TrustChange::between(&before, &before.clone()).is_empty());
        let mut after = trust(&["a", "b"], &[("a", "2")], "s2");
        after.client_crl_overdue = CrlOverdue::Refuse;
        let change = TrustChange::between(&before, &after);
        assert_eq!(change.client_cas_added, [ca("b")]);
        assert!(change.client_cas_removed.is_empty());
        assert_eq!(change.client_crls_added, [crl("a", "2")]);
        assert_eq!(change.client_crls_removed, [crl("a", "1")]);
        assert_eq!(
            change.to_string(),
            "client CA CN=b sha256 b-sha added; \
             client CRL of CN=a (number 2, thisUpdate 2026-12-01T00:00:00.000Z) sha256 a-2-sha added; \
             client CRL of CN=a (number 1, thisUpdate 2026-12-01T00:00:00.000Z) sha256 a-1-sha removed; \
             server certificate sha256 s1 -> s2; client_crl_overdue accept -> refuse"
        );
        // Structured, as the audit log holds it: what is the same is left out.
        let json = serde_json::to_value(&change).unwrap();
        assert_eq!(json["clientCasAdded"][0]["sha256"], "b-sha");
        assert_eq!(json["serverCertificate"]["old"], "s1");
        assert_eq!(json["clientCrlOverdue"]["new"], "refuse");
        assert!(json.get("clientCasRemoved").is_none(), "{json}");
        let back: TrustChange = serde_json::from_value(json).unwrap();
        assert_eq!(back, change);
    }
}
