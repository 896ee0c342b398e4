//! YAML of operator files (VirtualMeshes, inventories): parse errors name the line and
//! column and never quote the file, since a file passed by mistake may hold a secret.

/// Most documents one file may hold. serde-saphyr's default (1,024) refused real
/// configurations (one VirtualMesh a document); the bound stays, since the parser's memory
/// grows with it. A file read with [`options`] holds at most 1 MiB, in which the node and
/// event limits below are out of reach: the document count is the limit an operator meets.
pub const MAX_DOCUMENTS: usize = 100_000;
/// Most mappings, lists and values one file may hold.
pub const MAX_NODES: usize = 1_000_000;
/// Most parser events (a node's start and end, a document's) one file may produce.
pub const MAX_EVENTS: usize = 4_000_000;

/// serde-saphyr's budget with the limits above.
pub fn budget() -> serde_saphyr::Budget {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = MAX_DOCUMENTS;
    budget.max_nodes = MAX_NODES;
    budget.max_events = MAX_EVENTS;
    budget
}

/// serde-saphyr's options with [`budget`] and without its source snippet (it prints the
/// lines around the error by default: a PIN or token file given where YAML belongs would
/// be printed back).
pub fn options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.budget = Some(budget());
    options
}

/// A parse error, with a file past one of the parser's limits told apart.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("{0}")]
    TooLarge(Breach),
    #[error("{0}")]
    Parse(serde_saphyr::Error),
}

/// A limit of the parser a file passed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("it holds more than {limit} {what}, the most one file may hold")]
pub struct Breach {
    pub what: &'static str,
    pub limit: usize,
}

impl YamlError {
    /// `error` of a read with `budget`: serde-saphyr shows a breach as a Rust Debug string
    /// (`budget breached: Documents { documents: 1025 }`), which names neither the limit
    /// nor what to do.
    pub fn new(error: serde_saphyr::Error, budget: &serde_saphyr::Budget) -> YamlError {
        use serde_saphyr::Error;
        use serde_saphyr::budget::BudgetBreach;
        let mut inner = &error;
        while let Error::AliasError { error, .. } | Error::WithSnippet { error, .. } = inner {
            inner = error;
        }
        let (what, limit) = match inner {
            Error::Budget { breach, .. } => match breach {
                BudgetBreach::Documents { .. } => ("documents", budget.max_documents),
                BudgetBreach::Nodes { .. } => {
                    ("nodes (mappings, lists and values)", budget.max_nodes)
                }
                BudgetBreach::Events { .. } => ("parser events", budget.max_events),
                BudgetBreach::Depth { .. } => ("levels of nesting", budget.max_depth),
                BudgetBreach::Aliases { .. } => ("aliases", budget.max_aliases),
                BudgetBreach::Anchors { .. } => ("anchors", budget.max_anchors),
                BudgetBreach::ScalarBytes { .. } => {
                    ("bytes of values", budget.max_total_scalar_bytes)
                }
                BudgetBreach::MergeKeys { .. } => ("merge keys", budget.max_merge_keys),
                _ => return YamlError::Parse(error),
            },
            _ => return YamlError::Parse(error),
        };
        YamlError::TooLarge(Breach { what, limit })
    }
}

/// Every document of a multi-document YAML text, parsed with [`options`].
pub fn documents(yaml: &str) -> Result<Vec<serde_json::Value>, YamlError> {
    serde_saphyr::from_multiple_with_options(yaml, options())
        .map_err(|e| YamlError::new(e, &budget()))
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

    #[test]
    fn a_file_past_a_limit_is_told_by_the_limit() {
        let many = "---\na: 1\n".repeat(MAX_DOCUMENTS + 1);
        let err = documents(&many).unwrap_err();
        assert!(
            matches!(&err, YamlError::TooLarge(Breach { what: "documents", limit }) if *limit == MAX_DOCUMENTS),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("it holds more than {MAX_DOCUMENTS} documents, the most one file may hold")
        );
        assert_eq!(
            documents(&"---\na: 1\n".repeat(5_000)).unwrap().len(),
            5_000
        );
    }
}
