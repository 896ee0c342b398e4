//! The thin Kubernetes layer of the cluster agent: exactly the API calls it makes (get a
//! Secret, then create it or server-side apply it as read; list and patch Deployments,
//! StatefulSets and DaemonSets; get a ConfigMap; list requests and apply their status; a
//! Lease for leader election), plus the pure reading of what comes back (is this Secret
//! ours, who holds the Lease), and the clients' bounds: every call timed, every answer
//! read up to a size.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use super::crd::{VirtualMeshCertificateSigningRequest, VmcsrStatus};
use super::restart::{RESTARTED_FOR, Target, WorkloadKind, restart_patch};
use super::rotation::{Installed, TLS_SIGNING_CERT};
use crate::pki::bundle::{BundleFiles, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};

/// Field manager of every write (server-side apply and patches).
pub const FIELD_MANAGER: &str = "meshca";
/// Label marking a Secret meshca created.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Annotation naming the request (`namespace/name`) a Secret belongs to.
pub const OWNER: &str = "meshca.dev/owner";
/// The ConfigMap istiod writes into every namespace with the roots workloads trust.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";

#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API: {action}: {}", crate::logging::with_causes(source))]
pub struct KubeError {
    pub action: String,
    #[source]
    pub source: kube::Error,
}

impl KubeError {
    /// The HTTP status the API server answered with, if it answered.
    pub fn code(&self) -> Option<u16> {
        match &self.source {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        }
    }
}

impl KubeError {
    /// A write refused because its object was created or changed by another client since
    /// the read it was based on (409: AlreadyExists for a create, Conflict for an apply
    /// that holds a resourceVersion).
    pub fn changed_since_read(&self) -> bool {
        self.code() == Some(409)
    }

    /// Whether the same call may well succeed if sent again in a moment: no answer, or the
    /// API server failing or busy (5xx, 429). Any other answer was its word on the call.
    pub fn is_transient(&self) -> bool {
        self.code().is_none_or(|code| code >= 500 || code == 429)
    }
}

/// The cacerts Secret as a pass read it, made the precondition of the pass's write: the
/// write fails instead of overwriting a Secret another client (kubectl, a GitOps tool)
/// created or changed in between, which spans a key generation and a signer round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretAsRead {
    /// There was none: the write is a create.
    Absent,
    /// Its resourceVersion (empty only from a server that sets none: no precondition).
    Version(String),
}

impl SecretAsRead {
    pub fn of(secret: Option<&Secret>) -> Self {
        match secret {
            None => SecretAsRead::Absent,
            Some(secret) => {
                SecretAsRead::Version(secret.metadata.resource_version.clone().unwrap_or_default())
            }
        }
    }
}

/// Names the call a `kube::Error` came from (shared with the mesh controller's calls).
pub(crate) fn ctx(action: impl FnOnce() -> String) -> impl FnOnce(kube::Error) -> KubeError {
    move |source| KubeError {
        action: action(),
        source,
    }
}

/// Server-side apply as field manager `meshca`, forced (meshca owns what it applies),
/// with strict field validation: a field the object's schema does not know (a CRD older
/// than the agent, or an Istio older than meshca expects) is refused by name instead of
/// pruned with a warning no one reads. A pruned `status.nextRootFingerprint` would have
/// the mesh controller retire the next root it announces.
pub(crate) fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict()
}

/// Server-side apply of the status subresource of a meshca resource: the body carries
/// only `status`, so fields meshca no longer sets go away.
pub(crate) async fn apply_status_of<K>(
    client: &Client,
    ns: &str,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "namespace": ns},
        "status": status,
    });
    Api::<K>::namespaced(client.clone(), ns)
        .patch_status(name, &apply_params(), &Patch::Apply(body))
        .await
        .map(|_| ())
}

/// The request (`namespace/name`) a Secret meshca created belongs to: its owner
/// annotation, when it carries meshca's label.
pub fn meshca_owner(secret: &Secret) -> Option<&str> {
    let labels = secret.metadata.labels.as_ref()?;
    if labels.get(MANAGED_BY).map(String::as_str) != Some(FIELD_MANAGER) {
        return None;
    }
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(OWNER)
        .map(String::as_str)
}

/// Reads a Secret's four files if it is ours; see [`super::rotation::Installed`].
pub fn classify_secret(secret: Option<&Secret>, owner: &str) -> Installed {
    let Some(secret) = secret else {
        return Installed::None;
    };
    let id = format!(
        "Secret {}/{}",
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default()
    );
    let text = |key: &str| -> Option<String> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    if secret
        .data
        .as_ref()
        .is_some_and(|d| d.contains_key(TLS_SIGNING_CERT))
    {
        return Installed::Shadowed { what: id };
    }
    let root_cert = text(ROOT_CERT);
    let plugged = text(CA_CERT).is_some() && text(CA_KEY).is_some();
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    if labels.get(MANAGED_BY).map(String::as_str) != Some(FIELD_MANAGER) {
        return Installed::Foreign {
            what: format!("{id} (not created by meshca)"),
            root_cert,
            plugged,
        };
    }
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let holder = annotations.get(OWNER).map(String::as_str).unwrap_or("");
    if holder != owner {
        return Installed::Foreign {
            what: format!("{id} (managed by meshca request {holder:?})"),
            root_cert,
            plugged,
        };
    }
    let mut missing = Vec::new();
    let mut get = |key: &'static str| {
        text(key).unwrap_or_else(|| {
            missing.push(key);
            String::new()
        })
    };
    let files = BundleFiles {
        ca_cert: get(CA_CERT),
        ca_key: get(CA_KEY),
        cert_chain: get(CERT_CHAIN),
        root_cert: get(ROOT_CERT),
    };
    if !missing.is_empty() {
        return Installed::Unreadable {
            problem: format!("{id} lacks (or has non-UTF-8) {}", missing.join(", ")),
            root_cert,
        };
    }
    Installed::Ours(files)
}

/// The body of the cacerts Secret's create or apply: labels, owner annotation, the four
/// keys, nothing else (other fields stay with their managers).
pub fn secret_apply_body(namespace: &str, name: &str, owner: &str, files: &BundleFiles) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        (CA_CERT, &files.ca_cert),
        (CA_KEY, &files.ca_key),
        (CERT_CHAIN, &files.cert_chain),
        (ROOT_CERT, &files.root_cert),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.to_string(),
                FIELD_MANAGER.to_string(),
            )])),
            annotations: Some(BTreeMap::from([(OWNER.to_string(), owner.to_string())])),
            ..ObjectMeta::default()
        },
        // No `type`: Opaque when created, and an adopted Secret keeps its own.
        data: Some(data),
        ..Secret::default()
    }
}

/// [`secret_apply_body`] as the JSON an apply sends (with its apiVersion and kind).
fn secret_apply_value(ns: &str, name: &str, owner: &str, files: &BundleFiles) -> serde_json::Value {
    let mut value =
        serde_json::to_value(secret_apply_body(ns, name, owner, files)).unwrap_or_default();
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    value
}

/// The API calls the agent makes, on one client.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
}

impl Kube {
    pub fn new(client: Client) -> Self {
        Kube { client }
    }

    /// `GET /api/v1/namespaces/{ns}/secrets/{name}` (404 is `None`).
    pub async fn get_secret(&self, ns: &str, name: &str) -> Result<Option<Secret>, KubeError> {
        Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(ctx(|| format!("get Secret {ns}/{name}")))
    }

    /// Writes the cacerts Secret as field manager `meshca`, on the condition that it is
    /// still as the pass read it ([`SecretAsRead`]): a create when none existed, else a
    /// forced server-side apply (meshca owns the four keys once it writes them) that holds
    /// the read resourceVersion. Another client's Secret, created or changed since the
    /// read, is answered 409 ([`KubeError::changed_since_read`]) and left as it is.
    pub async fn write_secret(
        &self,
        ns: &str,
        name: &str,
        owner: &str,
        files: &BundleFiles,
        as_read: &SecretAsRead,
    ) -> Result<(), KubeError> {
        self.secret_write(ns, name, owner, files, as_read, false)
            .await
    }

    /// Whether the API server would take the cacerts Secret's write (RBAC, admission
    /// policies, an immutable Secret, a change since the read), asked with a dry run of
    /// the same write with empty files: before the signer is asked for an intermediate
    /// that could not be written.
    pub async fn check_secret_write(
        &self,
        ns: &str,
        name: &str,
        owner: &str,
        as_read: &SecretAsRead,
    ) -> Result<(), KubeError> {
        let placeholder = BundleFiles {
            ca_cert: String::new(),
            ca_key: String::new(),
            cert_chain: String::new(),
            root_cert: String::new(),
        };
        match self
            .secret_write(ns, name, owner, &placeholder, as_read, true)
            .await
        {
            // An admission webhook with side effects cannot take a dry run: the write
            // itself is the only test there.
            Err(KubeError {
                source: kube::Error::Api(answer),
                ..
            }) if answer.code == 400 && answer.message.contains("dry run") => {
                tracing::debug!(secret = %format!("{ns}/{name}"), detail = %answer.message, "the Secret's write cannot be tried with a dry run");
                Ok(())
            }
            other => other,
        }
    }

    async fn secret_write(
        &self,
        ns: &str,
        name: &str,
        owner: &str,
        files: &BundleFiles,
        as_read: &SecretAsRead,
        dry_run: bool,
    ) -> Result<(), KubeError> {
        let api = Api::<Secret>::namespaced(self.client.clone(), ns);
        let dry = if dry_run { " (dry run)" } else { "" };
        match as_read {
            SecretAsRead::Absent => {
                let params = PostParams {
                    dry_run,
                    field_manager: Some(FIELD_MANAGER.into()),
                };
                api.create(&params, &secret_apply_body(ns, name, owner, files))
                    .await
                    .map(|_| ())
                    .map_err(ctx(|| {
                        format!("create Secret {ns}/{name}{dry} (none existed when read)")
                    }))
            }
            SecretAsRead::Version(version) => {
                let mut value = secret_apply_value(ns, name, owner, files);
                // The API server refuses the apply (409) if the Secret's version moved on.
                if !version.is_empty() {
                    value["metadata"]["resourceVersion"] = version.as_str().into();
                }
                let params = if dry_run {
                    apply_params().dry_run()
                } else {
                    apply_params()
                };
                api.patch(name, &params, &Patch::Apply(value))
                    .await
                    .map(|_| ())
                    .map_err(ctx(|| {
                        format!(
                            "apply Secret {ns}/{name}{dry} (as read at resourceVersion {version})"
                        )
                    }))
            }
        }
    }

    /// Workloads of `kind` in `ns` matching `selector` (empty: all), with their restart
    /// marker.
    pub async fn list_workloads(
        &self,
        kind: WorkloadKind,
        ns: &str,
        selector: &str,
    ) -> Result<Vec<Target>, KubeError> {
        match kind {
            WorkloadKind::Deployment => self.list_of::<Deployment>(kind, ns, selector).await,
            WorkloadKind::StatefulSet => self.list_of::<StatefulSet>(kind, ns, selector).await,
            WorkloadKind::DaemonSet => self.list_of::<DaemonSet>(kind, ns, selector).await,
        }
    }

    async fn list_of<K: Workload>(
        &self,
        kind: WorkloadKind,
        ns: &str,
        selector: &str,
    ) -> Result<Vec<Target>, KubeError> {
        let mut params = ListParams::default();
        if !selector.is_empty() {
            params = params.labels(selector);
        }
        let list = Api::<K>::namespaced(self.client.clone(), ns)
            .list(&params)
            .await
            .map_err(ctx(|| {
                format!("list {}s in {ns} ({selector})", kind.name())
            }))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|workload| {
                let restarted_for = workload
                    .pod_template()
                    .and_then(|t| t.metadata.as_ref())
                    .and_then(|m| m.annotations.as_ref())
                    .and_then(|a| a.get(RESTARTED_FOR).cloned());
                Some(Target {
                    kind,
                    namespace: ns.to_string(),
                    name: workload.meta().name.clone()?,
                    restarted_for,
                    rolls_on_delete: workload.rolls_on_delete(),
                    rollout_pending: workload.rollout_pending(),
                })
            })
            .collect())
    }

    /// Rolling restart: a strategic-merge patch of the pod template annotations, as
    /// `kubectl rollout restart` does, plus the plan's key. Never deletes a pod.
    pub async fn restart_workload(
        &self,
        target: &Target,
        plan_key: &str,
        now: SystemTime,
    ) -> Result<(), KubeError> {
        let patch = Patch::Strategic(restart_patch(plan_key, &crate::signer::audit::rfc3339(now)));
        let (ns, name) = (target.namespace.as_str(), target.name.as_str());
        let patched = match target.kind {
            WorkloadKind::Deployment => self.patch_of::<Deployment>(ns, name, &patch).await,
            WorkloadKind::StatefulSet => self.patch_of::<StatefulSet>(ns, name, &patch).await,
            WorkloadKind::DaemonSet => self.patch_of::<DaemonSet>(ns, name, &patch).await,
        };
        patched.map_err(ctx(|| format!("restart {}", target.id())))
    }

    async fn patch_of<K: Workload>(
        &self,
        ns: &str,
        name: &str,
        patch: &Patch<serde_json::Value>,
    ) -> Result<(), kube::Error> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        Api::<K>::namespaced(self.client.clone(), ns)
            .patch(name, &params, patch)
            .await
            .map(|_| ())
    }

    /// root-cert.pem of `istio-ca-root-cert` in `ns` (absent ConfigMap or key: `None`).
    pub async fn root_configmap(&self, ns: &str) -> Result<Option<String>, KubeError> {
        let cm = Api::<ConfigMap>::namespaced(self.client.clone(), ns)
            .get_opt(ROOT_CONFIGMAP)
            .await
            .map_err(ctx(|| format!("get ConfigMap {ns}/{ROOT_CONFIGMAP}")))?;
        Ok(cm
            .and_then(|c| c.data)
            .and_then(|d| d.get(ROOT_CERT).cloned()))
    }

    /// The requests in `ns`.
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

    /// Server-side apply of the status subresource (fields meshca no longer sets go away).
    pub async fn apply_status(
        &self,
        ns: &str,
        name: &str,
        status: &VmcsrStatus,
    ) -> Result<(), KubeError> {
        apply_status_of::<VirtualMeshCertificateSigningRequest>(&self.client, ns, name, status)
            .await
            .map_err(ctx(|| format!("apply status of {ns}/{name}")))
    }

    pub async fn get_lease(&self, ns: &str, name: &str) -> Result<Option<Lease>, KubeError> {
        Api::<Lease>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(ctx(|| format!("get Lease {ns}/{name}")))
    }

    pub async fn create_lease(&self, ns: &str, lease: &Lease) -> Result<Lease, KubeError> {
        Api::<Lease>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), lease)
            .await
            .map_err(ctx(|| format!("create Lease in {ns}")))
    }

    /// Replace with the read resourceVersion: a concurrent change fails with 409.
    pub async fn replace_lease(
        &self,
        ns: &str,
        name: &str,
        lease: &Lease,
    ) -> Result<Lease, KubeError> {
        Api::<Lease>::namespaced(self.client.clone(), ns)
            .replace(name, &PostParams::default(), lease)
            .await
            .map_err(ctx(|| format!("replace Lease {ns}/{name}")))
    }
}

/// Longest wait for an answer from a Kubernetes API server, by default. kube's client sets
/// none for reading: an API server (or a member cluster's, behind a broken load balancer)
/// that takes the connection and never answers would hold a pass, and every cluster after
/// it, forever, and a SIGTERM behind it. meshca never watches, so no call waits longer.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds every call of clients made from `config`: connecting, sending, and each read.
/// The read timer restarts at each write: without that, the time a kept-alive connection
/// sat idle counted against the next call's answer. kube's own retries are off: on a 429,
/// 503 or 504 (a load balancer with no healthy backend, an API server mid-upgrade) they
/// try again up to 15 times, following any `Retry-After`, so one call took minutes
/// whatever the timeout, and a write could land after the Lease had passed to another
/// replica. meshca retries a failed pass itself, backing off.
pub fn bound_calls(config: &mut kube::Config, timeout: Duration) {
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    config.reset_reader_on_write = true;
    config.default_retry = false;
}

/// Most of one answer from an API server that meshca reads. A page of a list is
/// [`LIST_PAGE_SIZE`] objects, a few megabytes at most; an API server (or whatever answers
/// behind a member's kubeconfig) sending more, or a body that never ends, fails that call
/// instead of growing the controller's memory until it is killed. The timeouts do not end
/// such an answer: each read gets data.
pub const MAX_API_ANSWER: usize = 64 * 1024 * 1024;

/// A client from `config` whose every answer is read up to [`MAX_API_ANSWER`] bytes.
pub fn bounded_client(config: kube::Config) -> Result<Client, kube::Error> {
    let layer = tower::util::MapResponseLayer::new(|response: hyper::Response<_>| {
        response.map(|body| BoundedAnswer {
            body,
            left: MAX_API_ANSWER,
        })
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// An answer's body that fails once more than its bound has come.
struct BoundedAnswer<B> {
    body: B,
    left: usize,
}

/// The error that ends an answer past [`MAX_API_ANSWER`].
#[derive(Debug, thiserror::Error)]
#[error("the API server's answer is larger than {} MiB; meshca reads no more of it", MAX_API_ANSWER / (1024 * 1024))]
pub struct AnswerTooLarge;

impl<B> hyper::body::Body for BoundedAnswer<B>
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Unpin,
    B::Error: Into<tower::BoxError>,
{
    type Data = hyper::body::Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = match std::task::ready!(std::pin::Pin::new(&mut this.body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return std::task::Poll::Ready(Some(Err(e.into()))),
            None => return std::task::Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            // Outside a list the count is not asked for.
            let _ = LIST_BYTES.try_with(|read| read.set(read.get().saturating_add(data.len())));
            if data.len() > this.left {
                this.left = 0;
                return std::task::Poll::Ready(Some(Err(Box::new(AnswerTooLarge))));
            }
            this.left -= data.len();
        }
        std::task::Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A client for another cluster (the management plane reaching a remote cluster): from
/// kubeconfig YAML and an optional context name, each call bounded by `timeout`.
pub async fn client_from_kubeconfig(
    yaml: &str,
    context: Option<&str>,
    timeout: Duration,
) -> Result<Client, String> {
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(yaml).map_err(|e| format!("kubeconfig: {e}"))?;
    let options = kube::config::KubeConfigOptions {
        context: context.map(String::from),
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| format!("kubeconfig: {e}"))?;
    bound_calls(&mut config, timeout);
    bounded_client(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// What this replica should do with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it (replace with the read resourceVersion).
    Acquire,
    /// Someone else holds it and it is fresh.
    Follow { holder: String },
}

/// Leader election rule (as client-go's): another replica holds the Lease until it has
/// read the same for leaseDurationSeconds, on this replica's clock (`unchanged_for`); the
/// holder renews it by writing a new renewTime, a change every replica sees. The
/// renewTime itself is never compared with this host's clock, whose skew would decide
/// otherwise.
pub fn lease_action(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Duration) -> LeaseAction {
    let Some(spec) = spec else {
        return LeaseAction::Create;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return LeaseAction::Renew;
    }
    if holder.is_empty() {
        return LeaseAction::Acquire;
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
    if unchanged_for >= duration {
        LeaseAction::Acquire
    } else {
        LeaseAction::Follow { holder }
    }
}

/// No Lease now, where `last` was read (for `unchanged_for` since it last changed, on this
/// replica's clock): deleted by hand, say. Another replica that held it may go on acting
/// for the rest of its duration, as its renewal does not come before then: it is left to
/// create it again (its next renewal does), not created beside it, which would make two
/// leaders at once. Once that holder would have expired, or when none was seen, create.
pub fn vanished_lease_action(
    last: Option<&LeaseSpec>,
    me: &str,
    unchanged_for: Duration,
) -> LeaseAction {
    match last.map(|spec| lease_action(Some(spec), me, unchanged_for)) {
        Some(LeaseAction::Follow { holder }) => LeaseAction::Follow { holder },
        _ => LeaseAction::Create,
    }
}

/// The Lease spec this replica writes for `action` (transitions counted on takeover).
pub fn lease_spec(
    previous: Option<&LeaseSpec>,
    me: &str,
    duration: Duration,
    action: &LeaseAction,
    now: SystemTime,
) -> LeaseSpec {
    let now = Timestamp::try_from(now).ok().map(MicroTime);
    let mut spec = previous.cloned().unwrap_or_default();
    let transitions = spec.lease_transitions.unwrap_or(0);
    match action {
        LeaseAction::Create => {
            spec.acquire_time = now.clone();
            spec.lease_transitions = Some(0);
        }
        LeaseAction::Acquire => {
            spec.acquire_time = now.clone();
            // The API server refuses a negative count: past i32::MAX (a Lease edited by
            // hand) counting starts again rather than wrapping, or no replica could lead.
            spec.lease_transitions = Some(transitions.max(0).checked_add(1).unwrap_or(0));
        }
        LeaseAction::Renew | LeaseAction::Follow { .. } => {}
    }
    spec.holder_identity = Some(me.into());
    spec.lease_duration_seconds = Some(duration.as_secs().min(i32::MAX as u64) as i32);
    spec.renew_time = now;
    spec
}

/// A workload kind with a pod template (what a rolling restart patches).
trait Workload:
    kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    fn pod_template(&self) -> Option<&PodTemplateSpec>;

    /// `updateStrategy: OnDelete`: a changed pod template rolls no pod.
    fn rolls_on_delete(&self) -> bool {
        false
    }

    /// How its rollout stands while one is under way ([`Target::rollout_pending`]). Only
    /// istiod's is waited for, and istiod is a Deployment.
    fn rollout_pending(&self) -> Option<String> {
        None
    }
}

impl Workload for Deployment {
    fn pod_template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }

    fn rollout_pending(&self) -> Option<String> {
        deployment_rollout_pending(self)
    }
}

/// `kubectl rollout status`'s test of a Deployment: its controller has seen the current
/// spec, and every pod is of the current pod template and available. None once it holds.
pub fn deployment_rollout_pending(deployment: &Deployment) -> Option<String> {
    let generation = deployment.metadata.generation.unwrap_or(0);
    let none = k8s_openapi::api::apps::v1::DeploymentStatus::default();
    let status = deployment.status.as_ref().unwrap_or(&none);
    if status.observed_generation.unwrap_or(0) < generation {
        return Some("its controller has not taken the restart yet".into());
    }
    // A Deployment's replicas default to 1.
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    let running = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    if updated < wanted {
        Some(format!("{updated} of {wanted} pods updated"))
    } else if running > updated {
        Some(format!("{} old pods still running", running - updated))
    } else if available < updated {
        Some(format!("{available} of {updated} updated pods available"))
    } else {
        None
    }
}

impl Workload for StatefulSet {
    fn pod_template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }

    fn rolls_on_delete(&self) -> bool {
        let strategy = self.spec.as_ref().and_then(|s| s.update_strategy.as_ref());
        strategy.and_then(|u| u.type_.as_deref()) == Some(ON_DELETE)
    }
}

impl Workload for DaemonSet {
    fn pod_template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }

    fn rolls_on_delete(&self) -> bool {
        let strategy = self.spec.as_ref().and_then(|s| s.update_strategy.as_ref());
        strategy.and_then(|u| u.type_.as_deref()) == Some(ON_DELETE)
    }
}

/// The `updateStrategy.type` of StatefulSets and DaemonSets that rolls no pod by itself.
const ON_DELETE: &str = "OnDelete";

/// Objects per page of a list: kubectl's. One response with every object (2,000 Services
/// in a namespace) is built at once by the API server, and may be refused by its request
/// limits or priority and fairness.
pub const LIST_PAGE_SIZE: u32 = 500;

/// Most pages one list reads: 1,000 pages of [`LIST_PAGE_SIZE`] are 500,000 objects,
/// past any real collection. An API server (or whatever answers for one, behind a
/// member's kubeconfig) that never ends a list fails that list instead of holding every
/// pass, and growing the controller's memory, for ever. It bounds the pages, not what each
/// holds (`limit` is a request, which a server may answer with more): [`MAX_API_ANSWER`]
/// bounds each, [`MAX_LIST_BYTES`] all of them together.
pub const MAX_LIST_PAGES: usize = 1_000;

/// Most one list reads, all its pages' answers together (through [`bounded_client`]'s
/// clients, which every controller uses): a hundred times a large real collection
/// (10,000 Services are about 50 MiB). With
/// [`MAX_API_ANSWER`] alone a server answering every page with just under that, and a new
/// continue token, would fill a thousand of them before [`MAX_LIST_PAGES`] gave up.
pub const MAX_LIST_BYTES: usize = 256 * 1024 * 1024;

tokio::task_local! {
    /// The bytes of the answers read so far by the [`list_all`] being polled, its pages
    /// together: counted by [`BoundedAnswer`] as they come (kube reads an answer's body
    /// in the future that asked for it), so a list is not measured a second time.
    static LIST_BYTES: std::cell::Cell<usize>;
}

/// Every object `params` selects, read in pages of [`LIST_PAGE_SIZE`] following
/// `metadata.continue`, at most [`MAX_LIST_PAGES`] of them and [`MAX_LIST_BYTES`] in all,
/// each token a new one. A continue token the API server no longer honours (410 Gone,
/// reason Expired: the list was paged slower than etcd compacts) starts the list again
/// from the beginning, once; a second expiry fails the list, as a list that changes faster
/// than it can be read cannot be read whole.
pub async fn list_all<K>(
    api: &Api<K>,
    params: &ListParams,
    action: impl Fn() -> String,
) -> Result<Vec<K>, KubeError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    LIST_BYTES
        .scope(std::cell::Cell::new(0), list_pages(api, params, action))
        .await
}

/// [`list_all`], within the scope of its byte count.
async fn list_pages<K>(
    api: &Api<K>,
    params: &ListParams,
    action: impl Fn() -> String,
) -> Result<Vec<K>, KubeError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut restarted = false;
    'list: loop {
        let mut items = Vec::new();
        let mut page = params.clone().limit(LIST_PAGE_SIZE);
        let mut pages = 0;
        LIST_BYTES.with(|read| read.set(0));
        loop {
            pages += 1;
            match api.list(&page).await {
                Ok(list) => {
                    items.extend(list.items);
                    let token = list.metadata.continue_.filter(|token| !token.is_empty());
                    let endless = match token {
                        _ if LIST_BYTES.with(std::cell::Cell::get) > MAX_LIST_BYTES => format!(
                            "it held more than {} MiB after {pages} pages",
                            MAX_LIST_BYTES / (1024 * 1024)
                        ),
                        None => return Ok(items),
                        Some(token) if page.continue_token.as_ref() == Some(&token) => {
                            "it answered a page with the continue token it was given, so the list does not advance".to_string()
                        }
                        Some(_) if pages >= MAX_LIST_PAGES => format!(
                            "it was still not at its end after {MAX_LIST_PAGES} pages of {LIST_PAGE_SIZE}"
                        ),
                        Some(token) => {
                            page = page.continue_token(&token);
                            continue;
                        }
                    };
                    return Err(KubeError {
                        action: format!("{} ({endless}; the list was given up)", action()),
                        source: kube::Error::Service(Box::new(std::io::Error::other(
                            "a list too long to read",
                        ))),
                    });
                }
                Err(kube::Error::Api(status))
                    if status.code == 410
                        && status.reason == "Expired"
                        && page.continue_token.is_some() =>
                {
                    if !restarted {
                        restarted = true;
                        continue 'list;
                    }
                    return Err(KubeError {
                        action: format!(
                            "{} (its continue token expired again after the list was started over: the list changes faster than it can be read in pages of {LIST_PAGE_SIZE})",
                            action()
                        ),
                        source: kube::Error::Api(status),
                    });
                }
                Err(e) => return Err(ctx(&action)(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As `kubectl rollout status` reads a Deployment: the restart not yet seen by its
    /// controller, pods not yet of the new template, old ones still running, new ones not
    /// yet available; then done (replicas default to 1).
    #[test]
    fn a_deployments_rollout_is_done_once_every_pod_is_new_and_available() {
        let deployment = |replicas: Option<i32>, status: serde_json::Value| -> Deployment {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "istiod", "namespace": "istio-system", "generation": 4},
                "spec": {
                    "replicas": replicas,
                    "selector": {},
                    "template": {},
                },
                "status": status,
            }))
            .unwrap()
        };
        let status = |observed: i64, running: i32, updated: i32, available: i32| {
            serde_json::json!({
                "observedGeneration": observed,
                "replicas": running,
                "updatedReplicas": updated,
                "availableReplicas": available,
            })
        };
        for (replicas, status, pending) in [
            (
                Some(2),
                status(3, 2, 2, 2),
                Some("its controller has not taken the restart yet"),
            ),
            (Some(2), status(4, 3, 1, 2), Some("1 of 2 pods updated")),
            (
                Some(2),
                status(4, 3, 2, 2),
                Some("1 old pods still running"),
            ),
            (
                Some(2),
                status(4, 2, 2, 1),
                Some("1 of 2 updated pods available"),
            ),
            (Some(2), status(4, 2, 2, 2), None),
            (None, status(4, 1, 1, 1), None),
            (Some(0), status(4, 0, 0, 0), None),
            (
                Some(1),
                serde_json::Value::Null,
                Some("its controller has not taken the restart yet"),
            ),
        ] {
            assert_eq!(
                deployment_rollout_pending(&deployment(replicas, status.clone())).as_deref(),
                pending,
                "{status}"
            );
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn held(holder: &str, renewed: u64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(Timestamp::try_from(at(renewed)).unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn lease_rules() {
        let secs = Duration::from_secs;
        assert_eq!(lease_action(None, "a", secs(0)), LeaseAction::Create);
        // Gone after another replica held it: followed until it would have expired.
        assert_eq!(
            vanished_lease_action(Some(&held("b", 0, 15)), "a", secs(14)),
            LeaseAction::Follow { holder: "b".into() }
        );
        for (last, unchanged_for) in [
            (Some(held("b", 0, 15)), 15),
            (Some(held("a", 0, 15)), 0),
            (Some(held("", 0, 15)), 0),
            (None, 0),
        ] {
            assert_eq!(
                vanished_lease_action(last.as_ref(), "a", secs(unchanged_for)),
                LeaseAction::Create,
                "{last:?}"
            );
        }
        assert_eq!(
            lease_action(Some(&held("a", 0, 15)), "a", secs(100)),
            LeaseAction::Renew
        );
        assert_eq!(
            lease_action(Some(&held("b", 0, 15)), "a", secs(10)),
            LeaseAction::Follow { holder: "b".into() }
        );
        assert_eq!(
            lease_action(Some(&held("b", 0, 15)), "a", secs(15)),
            LeaseAction::Acquire
        );
        assert_eq!(
            lease_action(Some(&held("", 0, 15)), "a", secs(0)),
            LeaseAction::Acquire
        );
        // A renewTime long past on this host's clock (the holder's runs behind, or this
        // one ahead) is not an expired Lease: only one read unchanged for its duration is.
        assert_eq!(
            lease_action(Some(&held("b", 0, 15)), "a", secs(0)),
            LeaseAction::Follow { holder: "b".into() }
        );
        let never_renewed = LeaseSpec {
            holder_identity: Some("b".into()),
            ..LeaseSpec::default()
        };
        assert_eq!(
            lease_action(Some(&never_renewed), "a", secs(0)),
            LeaseAction::Acquire
        );
    }

    #[test]
    fn lease_spec_counts_takeovers() {
        let previous = held("b", 0, 15);
        let taken = lease_spec(
            Some(&previous),
            "a",
            Duration::from_secs(30),
            &LeaseAction::Acquire,
            at(20),
        );
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.lease_duration_seconds, Some(30));
        assert_eq!(SystemTime::from(taken.renew_time.unwrap().0), at(20));
        let renewed = lease_spec(
            Some(&held("a", 0, 30)),
            "a",
            Duration::from_secs(30),
            &LeaseAction::Renew,
            at(25),
        );
        assert_eq!(renewed.lease_transitions, None);
        assert_eq!(SystemTime::from(renewed.renew_time.unwrap().0), at(25));
        let worn = LeaseSpec {
            lease_transitions: Some(i32::MAX),
            ..held("b", 0, 15)
        };
        let taken = lease_spec(
            Some(&worn),
            "a",
            Duration::from_secs(30),
            &LeaseAction::Acquire,
            at(20),
        );
        assert_eq!(taken.lease_transitions, Some(0));
    }

    fn secret(labels: &[(&str, &str)], annotations: &[(&str, &str)], keys: &[&str]) -> Secret {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        Secret {
            metadata: ObjectMeta {
                name: Some("cacerts".into()),
                namespace: Some("istio-system".into()),
                labels: map(labels),
                annotations: map(annotations),
                ..ObjectMeta::default()
            },
            data: Some(
                keys.iter()
                    .map(|k| (k.to_string(), ByteString(format!("{k} text").into_bytes())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn secrets_are_classified_by_label_owner_and_keys() {
        let owner = "service-mesh-hub/cluster-a";
        assert!(matches!(classify_secret(None, owner), Installed::None));
        let all = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];
        match classify_secret(Some(&secret(&[], &[], &all)), owner) {
            Installed::Foreign {
                what,
                root_cert,
                plugged,
            } => {
                assert!(what.contains("istio-system/cacerts"), "{what}");
                assert_eq!(root_cert.as_deref(), Some("root-cert.pem text"));
                assert!(plugged);
            }
            other => panic!("{other:?}"),
        }
        let ours = [(MANAGED_BY, "meshca")];
        match classify_secret(
            Some(&secret(&ours, &[(OWNER, "other/request")], &all)),
            owner,
        ) {
            Installed::Foreign { what, .. } => assert!(what.contains("other/request")),
            other => panic!("{other:?}"),
        }
        match classify_secret(Some(&secret(&ours, &[(OWNER, owner)], &all)), owner) {
            Installed::Ours(files) => assert_eq!(files.ca_key, "ca-key.pem text"),
            other => panic!("{other:?}"),
        }
        match classify_secret(
            Some(&secret(&ours, &[(OWNER, owner)], &[CA_CERT, ROOT_CERT])),
            owner,
        ) {
            Installed::Unreadable { problem, root_cert } => {
                assert!(problem.contains("ca-key.pem, cert-chain.pem"), "{problem}");
                assert!(root_cert.is_some());
            }
            other => panic!("{other:?}"),
        }
        // With tls.crt there (cert-manager's layout, or added by hand), istiod reads it
        // instead of ca-cert.pem: meshca's or not, the Secret is left alone.
        let tls = [
            CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, "tls.crt", "tls.key", "ca.crt",
        ];
        for (labels, annotations) in [(&ours[..], &[(OWNER, owner)][..]), (&[][..], &[][..])] {
            match classify_secret(Some(&secret(labels, annotations, &tls)), owner) {
                Installed::Shadowed { what } => assert!(what.contains("istio-system/cacerts")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn the_apply_body_carries_only_what_meshca_owns() {
        let files = BundleFiles {
            ca_cert: "c".into(),
            ca_key: "k".into(),
            cert_chain: "ch".into(),
            root_cert: "r".into(),
        };
        let body = secret_apply_body("istio-system", "cacerts", "ns/req", &files);
        let value = serde_json::to_value(&body).unwrap();
        assert_eq!(value["metadata"]["labels"][MANAGED_BY], "meshca");
        assert_eq!(value["metadata"]["annotations"][OWNER], "ns/req");
        assert_eq!(value["data"].as_object().unwrap().len(), 4);
        // Classifying what was applied gives the files back.
        match classify_secret(Some(&body), "ns/req") {
            Installed::Ours(read) => assert_eq!(read.cert_chain, "ch"),
            other => panic!("{other:?}"),
        }
    }
}
