//! RFC 7512 PKCS#11 URIs (`pkcs11:token=meshca;object=root-ca`): how keys are named in
//! configuration, as step-ca and SPIRE name them.

use std::fmt;
use std::str::FromStr;

/// The parts of a PKCS#11 URI meshca uses to find a token and a key on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub slot_id: Option<u64>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    /// `type=private` etc.; meshca only accepts private (or absent) for key URIs.
    pub object_type: Option<String>,
    pub module_path: Option<String>,
    /// `pin-source=file:/path` or a plain path.
    pub pin_source: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error("PKCS#11 URI must start with \"pkcs11:\"")]
    Scheme,
    #[error("PKCS#11 URI attribute {0:?} is not of the form name=value")]
    NotAttribute(String),
    #[error(
        "PKCS#11 URI attribute {0:?} is not supported (supported: token, manufacturer, model, serial, slot-id, object, id, type; query: module-path, pin-source)"
    )]
    Unsupported(String),
    #[error("PKCS#11 URI attribute {0:?} appears twice")]
    Repeated(String),
    #[error("PKCS#11 URI has a bad percent-encoding in {0:?}")]
    BadPercent(String),
    #[error("PKCS#11 URI attribute {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("PKCS#11 URI slot-id {0:?} is not a number")]
    BadSlotId(String),
    #[error("PKCS#11 URI must not carry pin-value: keep the PIN in a file or the environment")]
    InlinePin,
    #[error("PKCS#11 URI names neither object nor id: which key?")]
    NoKey,
    #[error("PKCS#11 URI type={0:?} does not name a private key")]
    NotPrivate(String),
}

impl FromStr for Pkcs11Uri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("pkcs11:").ok_or(UriError::Scheme)?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Pkcs11Uri::default();
        let attributes = path
            .split(';')
            .map(|a| (a, false))
            .chain(query.split('&').map(|a| (a, true)))
            .filter(|(a, _)| !a.is_empty());
        for (attribute, in_query) in attributes {
            let (name, raw_value) = attribute
                .split_once('=')
                .ok_or_else(|| UriError::NotAttribute(attribute.into()))?;
            let bytes =
                percent_decode(raw_value).ok_or_else(|| UriError::BadPercent(name.into()))?;
            let text =
                || String::from_utf8(bytes.clone()).map_err(|_| UriError::NotUtf8(name.into()));
            match (in_query, name) {
                (false, "token") => set(&mut uri.token, text()?, name)?,
                (false, "manufacturer") => set(&mut uri.manufacturer, text()?, name)?,
                (false, "model") => set(&mut uri.model, text()?, name)?,
                (false, "serial") => set(&mut uri.serial, text()?, name)?,
                (false, "object") => set(&mut uri.object, text()?, name)?,
                (false, "type") => set(&mut uri.object_type, text()?, name)?,
                (false, "id") => set(&mut uri.id, bytes.clone(), name)?,
                (false, "slot-id") => {
                    let value = text()?;
                    let id = value.parse().map_err(|_| UriError::BadSlotId(value))?;
                    set(&mut uri.slot_id, id, name)?
                }
                (true, "module-path") => set(&mut uri.module_path, text()?, name)?,
                (true, "pin-source") => set(&mut uri.pin_source, text()?, name)?,
                (true, "pin-value") => return Err(UriError::InlinePin),
                (_, other) if other.starts_with("x-") => {}
                (_, other) => return Err(UriError::Unsupported(other.into())),
            }
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err(UriError::NoKey);
        }
        if let Some(t) = &uri.object_type
            && t != "private"
        {
            return Err(UriError::NotPrivate(t.clone()));
        }
        Ok(uri)
    }
}

fn set<T>(field: &mut Option<T>, value: T, name: &str) -> Result<(), UriError> {
    if field.is_some() {
        return Err(UriError::Repeated(name.into()));
    }
    *field = Some(value);
    Ok(())
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn percent_encode(bytes: &[u8], out: &mut String) {
    use std::fmt::Write;
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(b) {
            out.push(*b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

impl fmt::Display for Pkcs11Uri {
    /// The canonical form used in logs and the audit trail (never carries a PIN).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut push = |name: &str, value: &[u8]| {
            let mut s = format!("{name}=");
            percent_encode(value, &mut s);
            parts.push(s);
        };
        if let Some(v) = &self.token {
            push("token", v.as_bytes());
        }
        if let Some(v) = &self.manufacturer {
            push("manufacturer", v.as_bytes());
        }
        if let Some(v) = &self.model {
            push("model", v.as_bytes());
        }
        if let Some(v) = &self.serial {
            push("serial", v.as_bytes());
        }
        if let Some(v) = &self.slot_id {
            push("slot-id", v.to_string().as_bytes());
        }
        if let Some(v) = &self.object {
            push("object", v.as_bytes());
        }
        if let Some(v) = &self.id {
            push("id", v);
        }
        if let Some(v) = &self.object_type {
            push("type", v.as_bytes());
        }
        write!(f, "pkcs11:{}", parts.join(";"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_common_form() {
        let uri: Pkcs11Uri = "pkcs11:token=meshca;object=root-ca".parse().unwrap();
        assert_eq!(uri.token.as_deref(), Some("meshca"));
        assert_eq!(uri.object.as_deref(), Some("root-ca"));
        assert_eq!(uri.to_string(), "pkcs11:token=meshca;object=root-ca");
    }

    #[test]
    fn percent_encoding_ids_and_queries() {
        let uri: Pkcs11Uri =
            "pkcs11:token=My%20Token;id=%01%02%ff;type=private;slot-id=3?module-path=/usr/lib/x.so&pin-source=file:/run/pin"
                .parse()
                .unwrap();
        assert_eq!(uri.token.as_deref(), Some("My Token"));
        assert_eq!(uri.id, Some(vec![1, 2, 255]));
        assert_eq!(uri.slot_id, Some(3));
        assert_eq!(uri.module_path.as_deref(), Some("/usr/lib/x.so"));
        assert_eq!(uri.pin_source.as_deref(), Some("file:/run/pin"));
        assert_eq!(
            uri.to_string(),
            "pkcs11:token=My%20Token;slot-id=3;id=%01%02%FF;type=private"
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            ("token=a;object=b", UriError::Scheme),
            ("pkcs11:token=a", UriError::NoKey),
            ("pkcs11:object=a?pin-value=1234", UriError::InlinePin),
            (
                "pkcs11:object=a;object=b",
                UriError::Repeated("object".into()),
            ),
            (
                "pkcs11:object=a;colour=red",
                UriError::Unsupported("colour".into()),
            ),
            ("pkcs11:object=a%zz", UriError::BadPercent("object".into())),
            (
                "pkcs11:object=a;type=cert",
                UriError::NotPrivate("cert".into()),
            ),
            ("pkcs11:object", UriError::NotAttribute("object".into())),
            ("pkcs11:object=a;slot-id=x", UriError::BadSlotId("x".into())),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<Pkcs11Uri>(), Err(expected), "{input}");
        }
        // The error for an inline PIN never repeats the PIN.
        let err = "pkcs11:object=a?pin-value=s3cret"
            .parse::<Pkcs11Uri>()
            .unwrap_err();
        assert!(!err.to_string().contains("s3cret"));
        // Vendor attributes are allowed and ignored.
        assert!("pkcs11:object=a;x-vendor=1".parse::<Pkcs11Uri>().is_ok());
    }
}
