//! YAML of operator files (VirtualMeshes, inventories): parse errors name the line and
//! column and never quote the file, since a file passed by mistake may hold a secret.

/// serde-saphyr's options without its source snippet (it prints the lines around the
/// error by default: a PIN or token file given where YAML belongs would be printed back).
pub fn options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options
}

/// Every document of a multi-document YAML text, parsed with [`options`].
pub fn documents(yaml: &str) -> Result<Vec<serde_json::Value>, serde_saphyr::Error> {
    serde_saphyr::from_multiple_with_options(yaml, options())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_error_names_the_place_and_quotes_nothing() {
        #[derive(serde::Deserialize, Debug)]
        struct Listed {
            #[allow(dead_code)]
            items: Vec<u32>,
        }
        for text in [
            "SECRETPIN9f3a1c\n",
            "items: [SECRETPIN9f3a1c\n",
            "items: SECRETPIN9f3a1c\n",
        ] {
            let typed = serde_saphyr::from_str_with_options::<Listed>(text, options())
                .unwrap_err()
                .to_string();
            assert!(typed.contains("line 1"), "{typed}");
            assert!(!typed.contains("SECRET"), "{typed}");
        }
        let broken = documents("a: 1\n---\nb: [SECRETPIN9f3a1c\n")
            .unwrap_err()
            .to_string();
        assert!(broken.contains("line 3"), "{broken}");
        assert!(!broken.contains("SECRET"), "{broken}");
    }
}
