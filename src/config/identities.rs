//! `[[clients]]` identities that no certificate can ever carry, and identities two clients
//! would share but for case: both refused when the config is read, since the first
//! silently grants nothing and the second gives one certificate two entries (RFC 3986
//! makes a URI's scheme and host case-insensitive; a CA may write either form).

/// Why no client certificate can ever have `identity` (as [`crate::tlsutil::identity_of`]
/// takes it: a URI SAN, else a DNS SAN or CN without ':'), if none can.
pub(super) fn never_matches(identity: &str) -> Option<String> {
    if let Some(c) = identity.chars().find(|c| !c.is_ascii()) {
        return Some(format!(
            "it has the non-ASCII character {c:?} (U+{:04X}): a URI or DNS SAN is ASCII (IA5String), so no certificate's can be it, and a look-alike of an ASCII letter is a trap; write it in ASCII",
            u32::from(c)
        ));
    }
    if let Some(c) = identity
        .chars()
        .find(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Some(format!(
            "it has the whitespace or control character {c:?}: no URI or DNS name has one"
        ));
    }
    if identity.contains('*') {
        return Some(
            "it has '*': an identity is compared as it is written, never as a pattern, so it names no group of clients"
                .into(),
        );
    }
    if identity.contains(':') && uri_parts(identity).is_none() {
        return Some(
            "it has ':' but is no URI (scheme://host/..., or urn:...): a DNS SAN or CN with ':' is no identity (it could pass for a URI), so no certificate can be it; a host:port is not an identity"
                .into(),
        );
    }
    None
}

/// A URI identity's scheme, authority (empty for a URN) and rest, if `identity` is a URI
/// with an authority (`spiffe://trust.domain/path`) or a URN (`urn:nid:nss`).
fn uri_parts(identity: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = identity.split_once(':')?;
    let mut chars = scheme.chars();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return None;
    }
    if let Some(after) = rest.strip_prefix("//") {
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, rest) = after.split_at(end);
        return (!authority.is_empty()).then_some((scheme, authority, rest));
    }
    // A URN: its namespace identifier is case-insensitive too (RFC 8141).
    let (nid, _) = rest.split_once(':')?;
    (scheme.eq_ignore_ascii_case("urn") && !nid.is_empty()).then_some((scheme, "", rest))
}

/// `identity` as two identities are compared for a collision: a URI's scheme and
/// authority (a URN's namespace identifier) lowercased, a DNS or CN identity lowercased
/// whole.
pub(super) fn folded(identity: &str) -> String {
    match uri_parts(identity) {
        Some((scheme, "", rest)) => {
            let (nid, nss) = rest.split_once(':').unwrap_or((rest, ""));
            format!(
                "{}:{}:{nss}",
                scheme.to_ascii_lowercase(),
                nid.to_ascii_lowercase()
            )
        }
        Some((scheme, authority, rest)) => format!(
            "{}://{}{rest}",
            scheme.to_ascii_lowercase(),
            authority.to_ascii_lowercase()
        ),
        None => identity.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_no_certificate_can_have_are_named() {
        for (identity, why) in [
            // A Cyrillic 'е' in place of the Latin one.
            (
                "spiffe://meshca.t/cluster/w\u{0435}b-1",
                "non-ASCII character",
            ),
            ("web 1", "whitespace"),
            ("spiffe://meshca.t/cluster/web-1\t", "whitespace"),
            ("*", "'*'"),
            ("spiffe://meshca.t/cluster/*", "'*'"),
            ("web-1:8443", "no URI"),
            ("10.0.0.1:8443", "no URI"),
            ("spiffe:", "no URI"),
            ("spiffe://", "no URI"),
            ("urn:", "no URI"),
        ] {
            let refused = never_matches(identity).unwrap_or_default();
            assert!(refused.contains(why), "{identity:?}: {refused:?}");
        }
        for fine in [
            "spiffe://meshca.t/cluster/web-1",
            "SPIFFE://MESHCA.T/cluster/web-1",
            "https://meshca.t:8443/cluster/web-1",
            "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
            "web-1",
            "web-1.clusters.meshca.t",
        ] {
            assert_eq!(never_matches(fine), None, "{fine}");
        }
    }

    #[test]
    fn a_uris_scheme_and_host_are_folded_its_path_is_not() {
        assert_eq!(
            folded("SPIFFE://MESHCA.T/cluster/Web-1"),
            "spiffe://meshca.t/cluster/Web-1"
        );
        assert_eq!(
            folded("spiffe://meshca.t/cluster/Web-1"),
            folded("SPIFFE://Meshca.T/cluster/Web-1")
        );
        assert_ne!(
            folded("spiffe://meshca.t/cluster/web-1"),
            folded("spiffe://meshca.t/cluster/Web-1")
        );
        assert_eq!(folded("URN:UUID:ABC"), "urn:uuid:ABC");
        assert_eq!(folded("Web-1"), "web-1");
    }
}
