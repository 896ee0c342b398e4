//! Kubernetes name and label syntax, checked before anything becomes part of a host name, an
//! object name or a label (a bad one would be refused by the API server after half a rollout).

/// RFC 1123 label: what namespaces, cluster names and port names must be (at most 63).
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// RFC 1035 label: what Service names must be (a 1123 label starting with a letter).
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 in all.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A host name for a gateway: a DNS name whose last label is not all digits, so that a
/// mistyped IPv4 address (`10.0.0.300`) is not taken for a name. Upper case is allowed
/// (DNS is case-insensitive).
pub fn is_host_name(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    is_dns1123_subdomain(&lower)
        && lower
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63: a label name or a label value.
fn is_qualified_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_qualified_part(name),
        None => is_qualified_part(s),
    }
}

/// A label value: empty, or like a label name.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_part(s)
}

/// A SPIFFE trust domain: lowercase letters, digits, '.', '-' and '_' (e.g. cluster.local).
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        })
        && !s.starts_with('.')
        && !s.ends_with('.')
}

/// A trust domain an X.509 URI name constraint may name: [`is_trust_domain`], and as Go's
/// crypto/x509 (istiod) parses such a constraint, no empty label and not an IP address
/// (the last label not all digits). Go refuses to parse a certificate with any other, so
/// istiod could not read a cacerts whose intermediate carried one.
pub fn is_constraint_trust_domain(s: &str) -> bool {
    is_trust_domain(s)
        && s.split('.').all(|label| !label.is_empty())
        && s.rsplit('.')
            .next()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns1123_label("east-1"));
        assert!(is_dns1123_label("1st"));
        assert!(!is_dns1035_label("1st"));
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_host_name("gw.EXAMPLE.com"));
        assert!(is_host_name("localhost"));
        for bad in ["10.0.0.300", "1.2.3.4:15443", "a b", "", "a..b", "-a.com"] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn labels() {
        assert!(is_label_key("app"));
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(is_label_key("Version_2"));
        for bad in [
            "",
            "/a",
            "a/",
            "a/b/c",
            "-a",
            "Example.com/a",
            &"a".repeat(64),
        ] {
            assert!(!is_label_key(bad), "{bad:?}");
        }
        assert!(is_label_value(""));
        assert!(is_label_value("v1.2_3"));
        assert!(!is_label_value("v1 "));
        assert!(!is_label_value(&"v".repeat(64)));
        assert!(is_trust_domain("cluster.local"));
        assert!(!is_trust_domain("Cluster.local"));
        assert!(!is_trust_domain(".local"));
        assert!(is_constraint_trust_domain("pay.local"));
        assert!(is_constraint_trust_domain("td_1"));
        for bad in ["a..b", "10.0.0.1", "pay.1", "", "Pay.local", "a/b"] {
            assert!(!is_constraint_trust_domain(bad), "{bad:?}");
        }
    }
}
