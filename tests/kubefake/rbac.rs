//! Kubernetes RBAC as the API server applies it, over the requests the fake records: each
//! request is turned into what RBAC authorizes (verb, API group, resource and subresource,
//! namespace, name) and checked against the rules deploy/'s rbac.yaml files bind to a
//! ServiceAccount. A fake given a [`Policy`] fails its test, when dropped, if a request was
//! not granted (see `FakeCluster::start`); [`Policy::unused`] names the grants a test's
//! requests never needed. Together they keep the manifests equal to what the code calls.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Recorded;

/// What the API server authorizes for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`, as RBAC rules name them.
    pub resource: String,
    /// None: cluster-scoped, or a list across all namespaces.
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in {ns}"),
            None => write!(f, " in all namespaces"),
        }
    }
}

/// What RBAC checks for `request` (Kubernetes' request info rules): the verb from the
/// method (GET of a collection is list, or watch with `watch=true`), group and resource
/// from the path. A server-side apply that creates its object is authorized as create
/// too (the API server's patch handler checks it before creating).
pub fn accesses(request: &Recorded) -> Vec<Access> {
    let parts: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("not an API path: {}", request.path),
    };
    let (group, mut rest) = rest;
    let mut namespace = None;
    if rest.len() >= 3 && rest[0] == "namespaces" {
        namespace = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(name.to_string()), None),
        [resource, name, sub] => (*resource, Some(name.to_string()), Some(*sub)),
        _ => panic!("not a resource path: {}", request.path),
    };
    let verb = match (request.method.as_str(), &name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if request.param("watch").as_deref() == Some("true") => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        (other, _) => panic!("method {other} of {}", request.path),
    };
    let access = |verb: &str, name: Option<String>| Access {
        verb: verb.into(),
        group: group.into(),
        resource: match subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.into(),
        },
        namespace: namespace.clone(),
        name,
    };
    let mut out = vec![access(verb, name.clone())];
    if request.creates {
        // A create is never authorized by name: the name is in the body.
        out.push(access("create", None));
    }
    out
}

/// One rule of a Role or ClusterRole bound to the identity.
#[derive(Debug, Clone)]
pub struct Grant {
    /// `Role service-mesh-hub/meshca-agent` or `ClusterRole meshca-...`, for messages.
    pub role: String,
    /// The Role's namespace; None for a ClusterRole bound cluster-wide.
    pub namespace: Option<String>,
    pub groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub names: Vec<String>,
}

fn matches(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

impl Grant {
    /// Whether this rule alone grants `access` with `verb` (the access's own, or one of
    /// the rule's when checking use).
    fn allows(&self, access: &Access) -> bool {
        let in_scope = match (&self.namespace, &access.namespace) {
            (None, _) => true,
            (Some(role), Some(ns)) => role == ns,
            (Some(_), None) => false,
        };
        let named =
            self.names.is_empty() || access.name.as_ref().is_some_and(|n| self.names.contains(n));
        in_scope
            && named
            && matches(&self.verbs, &access.verb)
            && matches(&self.groups, &access.group)
            && matches(&self.resources, &access.resource)
    }
}

/// The RBAC rules bound to one ServiceAccount.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub grants: Vec<Grant>,
    /// The user RBAC sees, `system:serviceaccount:<namespace>:<name>`, for refusals.
    pub user: String,
}

/// Every YAML document of a file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split("\n---")
        .filter(|d| {
            d.lines().any(|l| {
                let l = l.trim();
                !l.is_empty() && !l.starts_with('#') && l != "---"
            })
        })
        .map(|d| {
            serde_saphyr::from_str::<Value>(d.trim_start_matches("---"))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// A manifest of the repository, by its path there.
pub fn manifest(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

impl Policy {
    /// The rules the RoleBindings and ClusterRoleBindings of `files` bind to the
    /// ServiceAccount `namespace/name` (a Role bound by a RoleBinding of its namespace, a
    /// ClusterRole by a ClusterRoleBinding).
    pub fn bound_to(service_account: (&str, &str), files: &[&str]) -> Policy {
        let docs: Vec<Value> = files.iter().flat_map(|f| documents(&manifest(f))).collect();
        let (sa_ns, sa_name) = service_account;
        let meta = |d: &Value, key: &str| d["metadata"][key].as_str().unwrap_or("").to_string();
        let mut grants = Vec::new();
        for binding in docs
            .iter()
            .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
        {
            let binds_us = binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount" && s["name"] == sa_name && s["namespace"] == sa_ns
                });
            if !binds_us {
                continue;
            }
            let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
            let role_name = binding["roleRef"]["name"].as_str().unwrap();
            let cluster_wide = binding["kind"] == "ClusterRoleBinding";
            let binding_ns = meta(binding, "namespace");
            let role = docs
                .iter()
                .find(|d| {
                    d["kind"] == role_kind
                        && meta(d, "name") == role_name
                        && (role_kind == "ClusterRole" || meta(d, "namespace") == binding_ns)
                })
                .unwrap_or_else(|| {
                    panic!("{files:?}: {role_kind} {role_name} bound but not defined")
                });
            assert!(
                !(cluster_wide && role_kind == "Role"),
                "a ClusterRoleBinding cannot bind a Role"
            );
            for rule in role["rules"].as_array().into_iter().flatten() {
                grants.push(Grant {
                    role: if role_kind == "Role" {
                        format!("Role {binding_ns}/{role_name}")
                    } else {
                        format!("ClusterRole {role_name}")
                    },
                    namespace: (!cluster_wide).then(|| binding_ns.clone()),
                    groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    verbs: strings(&rule["verbs"]),
                    names: strings(&rule["resourceNames"]),
                });
            }
        }
        assert!(
            !grants.is_empty(),
            "{files:?} bind nothing to {sa_ns}/{sa_name}"
        );
        Policy {
            grants,
            user: format!("system:serviceaccount:{sa_ns}:{sa_name}"),
        }
    }

    /// The Roles of namespace `from` installed in `to` instead (kustomize's `namespace:`,
    /// or a copy of a per-namespace file, as the manifests' comments say to make).
    pub fn moved(mut self, from: &str, to: &str) -> Policy {
        for grant in &mut self.grants {
            if grant.namespace.as_deref() == Some(from) {
                grant.namespace = Some(to.into());
                grant.role = grant.role.replace(&format!(" {from}/"), &format!(" {to}/"));
            }
        }
        self.user = self.user.replace(&format!(":{from}:"), &format!(":{to}:"));
        self
    }

    /// The rules granting `resource` by name grant these names instead (the kustomize
    /// patch the manifests' comments ask for: each Mesh's kubeconfig Secret, another
    /// target Secret).
    pub fn named(mut self, resource: &str, names: &[&str]) -> Policy {
        for grant in &mut self.grants {
            if !grant.names.is_empty() && grant.resources.iter().any(|r| r == resource) {
                grant.names = names.iter().map(|n| n.to_string()).collect();
            }
        }
        self
    }

    pub fn and(mut self, other: Policy) -> Policy {
        self.grants.extend(other.grants);
        self
    }

    pub fn allows(&self, access: &Access) -> bool {
        self.grants.iter().any(|g| g.allows(access))
    }

    /// The API server's 403 message for `access`, which no rule grants.
    pub fn forbidden_message(&self, access: &Access) -> String {
        let qualified = if access.group.is_empty() {
            access.resource.clone()
        } else {
            let (resource, sub) = match access.resource.split_once('/') {
                Some((resource, sub)) => (resource, format!("/{sub}")),
                None => (access.resource.as_str(), String::new()),
            };
            format!("{resource}.{}{sub}", access.group)
        };
        let object = match &access.name {
            Some(name) => format!("{qualified} {name:?}"),
            None => qualified,
        };
        let scope = match &access.namespace {
            Some(ns) => format!("in the namespace {ns:?}"),
            None => "at the cluster scope".to_string(),
        };
        format!(
            "{object} is forbidden: User {:?} cannot {} resource {:?} in API group {:?} {scope}",
            self.user, access.verb, access.resource, access.group
        )
    }

    /// The requests (with what RBAC checks) that no rule grants.
    pub fn denied(&self, requests: &[Recorded]) -> Vec<String> {
        requests
            .iter()
            .flat_map(|r| accesses(r).into_iter().map(move |a| (r, a)))
            .filter(|(_, a)| !self.allows(a))
            .map(|(r, a)| format!("{} {}: {a}", r.method, r.path))
            .collect()
    }

    /// Each (rule, verb, resource) granted that none of `requests` needed, as
    /// `Role ns/name: verb group/resource`; a rule with resourceNames counts as used when
    /// any of its names was.
    pub fn unused(&self, requests: &[Recorded]) -> Vec<String> {
        let used: Vec<Access> = requests.iter().flat_map(accesses).collect();
        let mut unused = Vec::new();
        for grant in &self.grants {
            for verb in &grant.verbs {
                for group in &grant.groups {
                    for resource in &grant.resources {
                        let one = Grant {
                            verbs: vec![verb.clone()],
                            groups: vec![group.clone()],
                            resources: vec![resource.clone()],
                            ..grant.clone()
                        };
                        if !used.iter().any(|a| one.allows(a)) {
                            let group = if group.is_empty() { "core" } else { group };
                            unused.push(format!("{}: {verb} {group}/{resource}", grant.role));
                        }
                    }
                }
            }
        }
        unused
    }
}
