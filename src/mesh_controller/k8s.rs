//! The thin Kubernetes layer of the mesh controller: exactly the API calls it makes.
//!
//! Management cluster: list VirtualMeshes and Meshes, get a kubeconfig Secret, apply a
//! VirtualMesh's status and its finalizer (the Lease is the agent's code). Each member
//! cluster: list, apply and delete requests; list Services; list, apply and delete
//! Gateways, DestinationRules and ServiceEntries. Writes are server-side applies with field
//! manager `meshca`. Lists are read in pages ([`crate::agent::k8s::list_all`]).

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch};
use kube::{Api, Client};

use super::crd::{Mesh, VirtualMesh, VirtualMeshStatus};
use super::decide::{DesiredRequest, ExistingObject, FINALIZER};
use crate::agent::crd::VirtualMeshCertificateSigningRequest;
use crate::agent::k8s::{Kube, KubeError, apply_params, apply_status_of, ctx, list_all};
use crate::mesh::istio::{API_VERSION, IstioObject, Kind, ObjectId};

/// Calls on the management cluster.
#[derive(Clone)]
pub struct Management {
    pub client: Client,
}

impl Management {
    pub fn new(client: Client) -> Self {
        Management { client }
    }

    pub async fn list_virtual_meshes(&self, ns: &str) -> Result<Vec<VirtualMesh>, KubeError> {
        let api = Api::<VirtualMesh>::namespaced(self.client.clone(), ns);
        list_all(&api, &ListParams::default(), || {
            format!("list VirtualMeshes in {ns}")
        })
        .await
    }

    pub async fn list_meshes(&self, ns: &str) -> Result<Vec<Mesh>, KubeError> {
        let api = Api::<Mesh>::namespaced(self.client.clone(), ns);
        list_all(&api, &ListParams::default(), || {
            format!("list Meshes in {ns}")
        })
        .await
    }

    /// `GET /api/v1/namespaces/{ns}/secrets/{name}` (404 is `None`): the agent's call.
    pub async fn get_secret(&self, ns: &str, name: &str) -> Result<Option<Secret>, KubeError> {
        Kube::new(self.client.clone()).get_secret(ns, name).await
    }

    /// Server-side apply of the status subresource.
    pub async fn apply_status(
        &self,
        ns: &str,
        name: &str,
        status: &VirtualMeshStatus,
    ) -> Result<(), KubeError> {
        apply_status_of::<VirtualMesh>(&self.client, ns, name, status)
            .await
            .map_err(ctx(|| format!("apply status of VirtualMesh {ns}/{name}")))
    }

    /// Adds (`present`) or removes meshca's finalizer on a VirtualMesh or a Mesh.
    /// Server-side apply treats `metadata.finalizers` as a set: applying it adds ours,
    /// applying without it removes only ours (others' finalizers stay).
    pub async fn apply_finalizer<K>(
        &self,
        ns: &str,
        name: &str,
        present: bool,
    ) -> Result<(), KubeError>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let kind = K::kind(&());
        let mut metadata = serde_json::json!({"name": name, "namespace": ns});
        if present {
            metadata["finalizers"] = serde_json::json!([FINALIZER]);
        }
        let body = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": kind,
            "metadata": metadata,
        });
        Api::<K>::namespaced(self.client.clone(), ns)
            .patch(name, &apply_params(), &Patch::Apply(body))
            .await
            .map(|_| ())
            .map_err(ctx(|| {
                format!(
                    "{} the finalizer of {kind} {ns}/{name}",
                    if present { "add" } else { "remove" }
                )
            }))
    }
}

fn istio_resource(kind: Kind) -> ApiResource {
    let (group, version) = API_VERSION.split_once('/').unwrap_or(("", API_VERSION));
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: API_VERSION.into(),
        kind: kind.as_str().into(),
        plural: kind.plural().into(),
    }
}

/// Calls on one member cluster.
#[derive(Clone)]
pub struct MemberCluster {
    pub client: Client,
}

impl MemberCluster {
    pub fn new(client: Client) -> Self {
        MemberCluster { client }
    }

    /// Every request in `ns` (labelled or not: a foreign one may hold a wanted name).
    pub async fn list_requests(
        &self,
        ns: &str,
    ) -> Result<Vec<VirtualMeshCertificateSigningRequest>, KubeError> {
        let api = Api::<VirtualMeshCertificateSigningRequest>::namespaced(self.client.clone(), ns);
        list_all(&api, &ListParams::default(), || {
            format!("list VirtualMeshCertificateSigningRequests in {ns}")
        })
        .await
    }

    pub async fn apply_request(&self, request: &DesiredRequest) -> Result<(), KubeError> {
        let (ns, name) = (&request.namespace, &request.name);
        Api::<VirtualMeshCertificateSigningRequest>::namespaced(self.client.clone(), ns)
            .patch(name, &apply_params(), &Patch::Apply(request.body()))
            .await
            .map(|_| ())
            .map_err(ctx(|| {
                format!("apply VirtualMeshCertificateSigningRequest {ns}/{name}")
            }))
    }

    /// Deletes a request (already gone is fine).
    pub async fn delete_request(&self, ns: &str, name: &str) -> Result<(), KubeError> {
        let result =
            Api::<VirtualMeshCertificateSigningRequest>::namespaced(self.client.clone(), ns)
                .delete(name, &DeleteParams::default())
                .await;
        gone_is_fine(result.map(|_| ())).map_err(ctx(|| {
            format!("delete VirtualMeshCertificateSigningRequest {ns}/{name}")
        }))
    }

    /// Services in `namespaces` (empty: all namespaces), filtered by `label_selector`
    /// (empty: all).
    pub async fn list_services(
        &self,
        namespaces: &[String],
        label_selector: &str,
    ) -> Result<Vec<Service>, KubeError> {
        let mut params = ListParams::default();
        if !label_selector.is_empty() {
            params = params.labels(label_selector);
        }
        if namespaces.is_empty() {
            let api = Api::<Service>::all(self.client.clone());
            return list_all(&api, &params, || {
                "list Services in all namespaces".to_string()
            })
            .await;
        }
        let mut services = Vec::new();
        for ns in namespaces {
            let api = Api::<Service>::namespaced(self.client.clone(), ns);
            services.extend(list_all(&api, &params, || format!("list Services in {ns}")).await?);
        }
        Ok(services)
    }

    /// Every object of `kind` in `ns`.
    pub async fn list_objects(
        &self,
        kind: Kind,
        ns: &str,
    ) -> Result<Vec<ExistingObject>, KubeError> {
        let resource = istio_resource(kind);
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &resource);
        let listed = list_all(&api, &ListParams::default(), || {
            format!("list {}s in {ns}", kind.as_str())
        })
        .await;
        let items = match listed {
            Ok(items) => items,
            // The kind is not served: Istio's CRDs are not installed (yet: Istio's plug-in
            // CA has cacerts made first), so none of ours is there. A missing namespace
            // lists empty; only a missing resource answers 404.
            Err(e) if e.code() == Some(404) => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        Ok(items
            .into_iter()
            .filter_map(|item| {
                let value = serde_json::to_value(item).ok()?;
                ExistingObject::from_value(kind, value)
            })
            .collect())
    }

    pub async fn apply_object(&self, object: &IstioObject) -> Result<(), KubeError> {
        let id = object.id();
        let resource = istio_resource(id.kind);
        let body = serde_json::to_value(object).unwrap_or_default();
        Api::<DynamicObject>::namespaced_with(self.client.clone(), &id.namespace, &resource)
            .patch(&id.name, &apply_params(), &Patch::Apply(body))
            .await
            .map(|_| ())
            .map_err(|source| {
                // The API server's own words say which: the kind or the namespace.
                let hint = match &source {
                    kube::Error::Api(status) if status.code == 404 => {
                        " (not found: Istio's CRDs are not installed in this cluster, or its namespace is not there)"
                    }
                    _ => "",
                };
                KubeError {
                    action: format!("apply {id}{hint}"),
                    source,
                }
            })
    }

    /// Deletes an object (already gone is fine).
    pub async fn delete_object(&self, id: &ObjectId) -> Result<(), KubeError> {
        let resource = istio_resource(id.kind);
        let result =
            Api::<DynamicObject>::namespaced_with(self.client.clone(), &id.namespace, &resource)
                .delete(&id.name, &DeleteParams::default())
                .await;
        gone_is_fine(result.map(|_| ())).map_err(ctx(|| format!("delete {id}")))
    }
}

fn gone_is_fine(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other,
    }
}

/// A client for a member cluster from its kubeconfig text, and when the credentials it
/// uses run out ([`credential_expiry`]). The parser's own error is not passed on: it may
/// quote the file, and the file holds credentials. A kubeconfig that would have the
/// controller read its own files or run a command is refused
/// ([`refuse_local_credentials`]).
pub async fn member_client(
    kubeconfig: &str,
    context: Option<&str>,
    source: &str,
    timeout: std::time::Duration,
) -> Result<(Client, Option<std::time::SystemTime>), String> {
    let Ok(parsed) = kube::config::Kubeconfig::from_yaml(kubeconfig) else {
        return Err(format!("{source} is not a valid kubeconfig"));
    };
    refuse_local_credentials(&parsed).map_err(|e| format!("{source}: {e}"))?;
    let expiry = credential_expiry(&parsed, context);
    crate::agent::k8s::client_from_kubeconfig(kubeconfig, context, timeout)
        .await
        .map(|client| (client, expiry))
        .map_err(|e| format!("{source}: {e}"))
}

/// When the credentials of `context` (else the current context) run out, as far as they
/// say: a bearer token's `exp` if it is a JWT (`kubectl create token` makes one that ends,
/// 720 hours with `member-kubeconfig.sh`), a client certificate's notAfter; the earlier of
/// the two. None when neither says: a token that is not a JWT or has no `exp` (a legacy
/// ServiceAccount token Secret's), or a user with neither. Reads only the claim and the
/// date; the token is not kept.
pub fn credential_expiry(
    kubeconfig: &kube::config::Kubeconfig,
    context: Option<&str>,
) -> Option<std::time::SystemTime> {
    use base64::Engine;
    use secrecy::ExposeSecret;
    let context_name = context.or(kubeconfig.current_context.as_deref())?;
    let user_name = kubeconfig
        .contexts
        .iter()
        .find(|named| named.name == context_name)?
        .context
        .as_ref()?
        .user
        .as_deref()?;
    let user = kubeconfig
        .auth_infos
        .iter()
        .find(|named| named.name == user_name)?
        .auth_info
        .as_ref()?;
    let token_end = user.token.as_ref().and_then(|token| {
        let payload = token.expose_secret().split('.').nth(1)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
        let exp = claims.get("exp")?.as_u64()?;
        std::time::SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(exp))
    });
    let certificate_end = user.client_certificate_data.as_ref().and_then(|data| {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .ok()?;
        let pem = String::from_utf8(pem).ok()?;
        let certificates = crate::pki::pem::decode_certificates(&pem).ok()?;
        let certificate = certificates.first()?;
        Some(
            certificate
                .tbs_certificate()
                .validity()
                .not_after
                .to_system_time(),
        )
    });
    match (token_end, certificate_end) {
        (Some(token), Some(certificate)) => Some(token.min(certificate)),
        (one, other) => one.or(other),
    }
}

/// A member's kubeconfig comes from a Secret anyone allowed to write Secrets in a Mesh's
/// namespace can fill, and the controller acts on it with its own filesystem: a
/// `tokenFile` naming the controller's ServiceAccount token would send that token to
/// whatever `server` says, a file path would read the controller's files, and `exec` or
/// an `auth-provider` would run a command in it. So credentials and the CA must be inline
/// (`token`, `client-certificate-data` / `client-key-data`, `certificate-authority-data`),
/// and TLS verification on. Names the entry and the field, never a value.
pub fn refuse_local_credentials(kubeconfig: &kube::config::Kubeconfig) -> Result<(), String> {
    let mut found = Vec::new();
    for named in &kubeconfig.auth_infos {
        let Some(user) = &named.auth_info else {
            continue;
        };
        let fields = [
            ("tokenFile", user.token_file.is_some()),
            ("client-certificate", user.client_certificate.is_some()),
            ("client-key", user.client_key.is_some()),
            ("exec", user.exec.is_some()),
            ("auth-provider", user.auth_provider.is_some()),
        ];
        for (field, present) in fields {
            if present {
                found.push(format!("user {:?} uses {field}", named.name));
            }
        }
    }
    for named in &kubeconfig.clusters {
        let Some(cluster) = &named.cluster else {
            continue;
        };
        if cluster.certificate_authority.is_some() {
            found.push(format!(
                "cluster {:?} uses certificate-authority",
                named.name
            ));
        }
        if cluster.insecure_skip_tls_verify == Some(true) {
            found.push(format!(
                "cluster {:?} sets insecure-skip-tls-verify",
                named.name
            ));
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}: a member's kubeconfig must carry its credentials and CA inline (token, client-certificate-data and client-key-data, certificate-authority-data) with TLS verification on; file paths, exec and auth-provider plugins are refused, since the controller would read its own files or run the command",
        found.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use base64::Engine;

    use super::credential_expiry;
    use crate::pki::keys::KeyType;
    use crate::pki::testing::software_root;

    /// A kubeconfig whose current context's user is `user` (YAML lines of its fields).
    fn kubeconfig(user: &[String]) -> kube::config::Kubeconfig {
        let fields: String = user.iter().map(|f| format!("    {f}\n")).collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: member\nclusters:\n- name: member\n  cluster:\n    server: https://member.example:6443\ncontexts:\n- name: member\n  context:\n    cluster: member\n    user: controller\nusers:\n- name: controller\n  user:\n{fields}"
        );
        kube::config::Kubeconfig::from_yaml(&yaml).unwrap()
    }

    /// A JWT (unsigned: only its claims are read) whose `exp` is `end`.
    fn token_ending(end: SystemTime) -> String {
        let b64 = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let exp = end
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        format!(
            "token: {}.{}.c2lnbmF0dXJl",
            b64(r#"{"alg":"RS256"}"#),
            b64(&format!(
                r#"{{"sub":"system:serviceaccount:x:y","exp":{exp}}}"#
            ))
        )
    }

    /// The client-certificate branch: a certificate's notAfter alone, and the earlier of it
    /// and a token's `exp` when the user has both.
    #[test]
    fn a_client_certificate_ends_the_credential_at_its_not_after_or_a_token_before() {
        let (_, certificate) =
            software_root(KeyType::EcdsaP256, "acme", Duration::from_secs(10 * 86_400));
        let not_after = certificate.not_after;
        let certificate_data = format!(
            "client-certificate-data: {}",
            base64::engine::general_purpose::STANDARD.encode(&certificate.pem)
        );
        let key_data = "client-key-data: a2V5".to_string();

        let certificate_only = kubeconfig(&[certificate_data.clone(), key_data.clone()]);
        assert_eq!(credential_expiry(&certificate_only, None), Some(not_after));

        let later = not_after + Duration::from_secs(86_400);
        let both = kubeconfig(&[
            certificate_data.clone(),
            key_data.clone(),
            token_ending(later),
        ]);
        assert_eq!(credential_expiry(&both, None), Some(not_after));

        let earlier = not_after - Duration::from_secs(86_400);
        let both = kubeconfig(&[certificate_data, key_data, token_ending(earlier)]);
        assert_eq!(credential_expiry(&both, None), Some(earlier));
    }
}
