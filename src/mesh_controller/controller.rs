//! The mesh controller's loop: for every VirtualMesh in its namespace, read the member
//! clusters, decide ([`super::decide`]), act through [`super::k8s`], and write one status.
//!
//! One replica acts at a time (the agent's Lease code); every write is preceded by a
//! leadership check. Like the agent it lists on a timer rather than watching: what it waits
//! for (agents' status in other clusters, the retirement time) cannot be watched from here
//! anyway, and listing keeps the API surface to the calls of [`super::k8s`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use kube::Client;

use futures::StreamExt as _;

use super::crd::{
    MemberFederation, MemberPhase, MemberStatus, Mesh, VirtualMesh, VirtualMeshPhase,
    VirtualMeshStatus,
};
use super::decide::{
    self, DesiredRequest, ExistingObject, FederationOutcome, MemberReport, MemberTrust, Observed,
    RequestAction, RequestView, Valid,
};
use super::k8s::{Management, MemberCluster, member_client};
use super::metrics::{MeshControllerMetrics, Reconciled};
use crate::agent::crd::{VirtualMeshCertificateSigningRequest, VmcsrStatus};
use crate::agent::election::{Elector, LeaderLoop};
use crate::agent::k8s::{Kube, KubeError};
use crate::mesh::federation::{DEFAULT_HOST_SUFFIX, FederationConfig, ServiceSelector};
use crate::mesh::inventory::{Inventory, ServiceInventory};
use crate::mesh::istio::Kind;
use crate::policy::ObjectRef;

/// Writes (applies, deletes) into one member cluster in flight at once. A first pass into a
/// cluster importing 2,000 Services is as many applies: one at a time that is minutes per
/// cluster, and many more at once would crowd its API server, which queues one client's
/// burst (priority and fairness) behind everyone else's.
pub const WRITES_IN_FLIGHT: usize = 8;

/// Member clusters read, or former members cleaned, at once (each its lists and writes,
/// one after another): a member whose API server hangs holds only its own slot.
pub const MEMBER_READS_IN_FLIGHT: usize = 4;

/// The outputs of `futures`, at most `limit` of them running at once, in the order given
/// whatever order they finish in. Unordered underneath (`buffered` would wait for the
/// first before starting another, so one slow member or write would hold the rest).
async fn in_order<T>(
    futures: impl IntoIterator<Item = impl Future<Output = T>>,
    limit: usize,
) -> Vec<T> {
    let mut done: Vec<(usize, T)> = futures::stream::iter(
        futures
            .into_iter()
            .enumerate()
            .map(|(index, future)| async move { (index, future.await) }),
    )
    .buffer_unordered(limit)
    .collect()
    .await;
    done.sort_by_key(|(index, _)| *index);
    done.into_iter().map(|(_, output)| output).collect()
}

/// The controller's settings (flags).
#[derive(Debug, Clone)]
pub struct MeshControllerOptions {
    /// Namespace of the VirtualMeshes, Meshes, kubeconfig Secrets and the Lease.
    pub namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// Longest time between two passes.
    pub resync: Duration,
    /// How long after every member reports the new root the old ones are retired.
    pub retire_after: Duration,
    /// Longest wait for a member cluster's API server, each call.
    pub member_api_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("this replica is not the leader any more; nothing written")]
    NotLeader,
    #[error("{0}")]
    Problem(String),
}

impl From<KubeError> for StepError {
    fn from(e: KubeError) -> Self {
        StepError::Problem(e.to_string())
    }
}

/// What a VirtualMesh looks like after its pass.
enum After {
    /// Still there, with this status (written when it changed).
    Kept(Box<VirtualMeshStatus>),
    /// Cleaned up and released: the API server deletes it.
    Gone,
}

/// What was read from one member cluster.
struct MemberRead {
    cluster: Result<MemberCluster, String>,
    requests: Vec<VirtualMeshCertificateSigningRequest>,
    /// None when federation could not read it.
    services: Option<Vec<ServiceInventory>>,
    /// The Services left out of it, each with why.
    not_federated: Vec<String>,
    objects: Option<Vec<ExistingObject>>,
    /// Why the cluster or its requests could not be read: nothing is written there.
    problem: Option<String>,
    /// Why its Services or Istio objects could not be read: federation is held, its
    /// request is still applied (a cluster without Istio's CRDs yet, or without the
    /// controller's access to its Services, still gets its intermediate).
    federation_problem: Option<String>,
}

/// The management plane controller.
#[derive(Clone)]
pub struct MeshController {
    management: Management,
    elector: Elector,
    opts: MeshControllerOptions,
    metrics: Arc<MeshControllerMetrics>,
}

fn dedup(values: impl IntoIterator<Item = String>) -> Vec<String> {
    let set: BTreeSet<String> = values.into_iter().collect();
    set.into_iter().collect()
}

impl LeaderLoop for MeshController {
    const PASS_FAILED: &'static str = "cannot list VirtualMeshes or Meshes";

    fn elector(&self) -> &Elector {
        &self.elector
    }

    fn resync(&self) -> Duration {
        self.opts.resync
    }

    fn pass(&self) -> impl Future<Output = Result<Duration, KubeError>> {
        self.reconcile_all()
    }

    fn leading(&self, leading: bool) {
        self.metrics.set_leading(leading);
    }
}

impl MeshController {
    pub fn new(
        client: Client,
        opts: MeshControllerOptions,
        metrics: Arc<MeshControllerMetrics>,
    ) -> Self {
        metrics.set_resync(opts.resync);
        let elector = Elector::new(
            Kube::new(client.clone()),
            opts.namespace.clone(),
            opts.lease_name.clone(),
            opts.identity.clone(),
            opts.lease_duration,
        );
        MeshController {
            management: Management::new(client),
            elector,
            opts,
            metrics,
        }
    }

    async fn ensure_leader(&self) -> Result<(), StepError> {
        self.elector.require(StepError::NotLeader).await
    }

    /// One pass over every VirtualMesh, then the Meshes no VirtualMesh holds any more lose
    /// their finalizer.
    pub async fn reconcile_all(&self) -> Result<Duration, KubeError> {
        let ns = &self.opts.namespace;
        let virtual_meshes = self.management.list_virtual_meshes(ns).await?;
        let meshes = self.management.list_meshes(ns).await?;
        let by_id: BTreeMap<ObjectRef, &Mesh> = meshes.iter().map(|m| (m.id(), m)).collect();
        let claims = decide::claims(&virtual_meshes);
        let mut next = self.opts.resync;
        let mut held = BTreeSet::new();
        for vm in &virtual_meshes {
            let (after, delay) = self.reconcile(vm, &by_id, &claims).await;
            next = next.min(delay);
            if let After::Kept(status) = after {
                held.extend(decide::holds(vm, &status));
            }
        }
        for id in decide::meshes_to_release(&meshes, &held) {
            let result = match self.ensure_leader().await {
                Ok(()) => self
                    .management
                    .apply_finalizer::<Mesh>(&id.namespace, &id.name, false)
                    .await
                    .map_err(StepError::from),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    tracing::info!(mesh = %id, "no VirtualMesh holds this Mesh any more: finalizer removed")
                }
                Err(e) => {
                    tracing::warn!(mesh = %id, error = %e, "cannot remove the Mesh's finalizer")
                }
            }
        }
        let present: Vec<String> = virtual_meshes
            .iter()
            .map(|vm| vm.id().to_string())
            .collect();
        self.metrics.pass_completed(&present, SystemTime::now());
        Ok(next.max(Duration::from_secs(1)))
    }

    /// Reconciles one VirtualMesh and writes its status when it changed.
    async fn reconcile(
        &self,
        vm: &VirtualMesh,
        meshes: &BTreeMap<ObjectRef, &Mesh>,
        claims: &BTreeMap<ObjectRef, ObjectRef>,
    ) -> (After, Duration) {
        let id = vm.id();
        let before = vm.status.clone().unwrap_or_default();
        let now = SystemTime::now();
        let result = if vm.metadata.deletion_timestamp.is_some() {
            self.finalize(vm, meshes, claims, &before, now).await
        } else {
            self.converge(vm, meshes, claims, &before, now).await
        };
        let key = id.to_string();
        let status = match result {
            Ok(After::Gone) => {
                tracing::info!(virtual_mesh = %id, "cleaned up; finalizer removed");
                self.metrics.reconciled(&key, Reconciled::Gone);
                return (After::Gone, self.opts.resync);
            }
            Ok(After::Kept(status)) => *status,
            Err(StepError::NotLeader) => {
                tracing::info!(virtual_mesh = %id, "lost the Lease; pass stopped");
                return (After::Kept(Box::new(before)), Duration::from_secs(2));
            }
            Err(StepError::Problem(e)) => {
                tracing::error!(virtual_mesh = %id, error = %e, "reconcile failed");
                self.metrics.reconciled(&key, Reconciled::Failed);
                return (
                    After::Kept(Box::new(before)),
                    self.opts.resync.min(Duration::from_secs(15)),
                );
            }
        };
        let ready = status.phase == Some(VirtualMeshPhase::Ready);
        self.metrics.reconciled(&key, Reconciled::Kept { ready });
        let mut next = self.opts.resync;
        if let Some(at) = status
            .root_rotation
            .as_ref()
            .and_then(|r| r.retire_at.parse::<k8s_openapi::jiff::Timestamp>().ok())
        {
            // Only a time still to come: one past (the rotation held by a member that has
            // not acted on its request yet, or copied by a refused VirtualMesh's status)
            // would make every pass the next second's, against every member API server.
            if let Ok(wait) = SystemTime::from(at).duration_since(now) {
                next = next.min(wait);
            }
        }
        if status != before {
            let written = match self.ensure_leader().await {
                Ok(()) => self
                    .management
                    .apply_status(&id.namespace, &id.name, &status)
                    .await
                    .map_err(StepError::from),
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::error!(virtual_mesh = %id, error = %e, "cannot write status");
            }
        }
        (After::Kept(Box::new(status)), next)
    }

    /// A client for a Mesh's cluster: from its kubeconfig Secret, or the controller's own.
    async fn connect(&self, mesh: &Mesh) -> Result<MemberCluster, String> {
        let Some(secret_ref) = &mesh.spec.kubeconfig_secret else {
            return Ok(MemberCluster::new(self.management.client.clone()));
        };
        let ns = mesh.metadata.namespace.clone().unwrap_or_default();
        let what = format!(
            "Secret {ns}/{} key {:?} (spec.kubeconfigSecret)",
            secret_ref.name, secret_ref.key
        );
        let secret = self
            .management
            .get_secret(&ns, &secret_ref.name)
            .await
            .map_err(|e| match &e.source {
                // The shipped Role names the Secrets it may read: the example's only, so
                // re-applying it as shipped (an upgrade) takes every other name away. The
                // API server's own words are enough here (the whole answer repeats them).
                kube::Error::Api(status) if status.code == 403 => format!(
                    "{what}: the controller may not read it (403: {}); add {:?} to the resourceNames of the secrets rule of its Role (deploy/mesh-controller/rbac.yaml, by a kustomize patch that an upgrade applies too)",
                    status.message, secret_ref.name
                ),
                _ => e.to_string(),
            })?
            .ok_or_else(|| format!("{what}: the Secret does not exist"))?;
        let bytes = secret
            .data
            .and_then(|mut d| d.remove(&secret_ref.key))
            .ok_or_else(|| format!("{what}: no such key"))?;
        let text = String::from_utf8(bytes.0).map_err(|_| format!("{what}: not UTF-8 text"))?;
        let (client, credential_expiry) = member_client(
            &text,
            secret_ref.context.as_deref(),
            &what,
            self.opts.member_api_timeout,
        )
        .await?;
        let name = mesh.metadata.name.as_deref().unwrap_or_default();
        self.metrics
            .member_credential(&format!("{ns}/{name}"), credential_expiry);
        Ok(MemberCluster::new(client))
    }

    /// Reads what a member's decisions need: its requests (in its agent namespace and the
    /// one recorded before), its Services (when federating), and the Istio objects in its
    /// Istio namespace (and the one recorded before).
    async fn read_member(
        &self,
        mesh: &Mesh,
        recorded: Option<&MemberStatus>,
        config: &FederationConfig,
        inventory: &crate::mesh::inventory::ClusterInventory,
    ) -> MemberRead {
        let mut read = MemberRead {
            cluster: self.connect(mesh).await,
            requests: vec![],
            services: None,
            not_federated: vec![],
            objects: None,
            problem: None,
            federation_problem: None,
        };
        let cluster = match &read.cluster {
            Ok(cluster) => cluster.clone(),
            Err(e) => {
                read.problem = Some(e.clone());
                return read;
            }
        };
        let agent_namespaces = dedup(
            std::iter::once(mesh.spec.agent.namespace.clone())
                .chain(recorded.map(|r| r.agent_namespace.clone())),
        );
        for ns in &agent_namespaces {
            match cluster.list_requests(ns).await {
                Ok(requests) => read.requests.extend(requests),
                Err(e) => {
                    read.problem = Some(e.to_string());
                    return read;
                }
            }
        }
        let result: Result<(), KubeError> = async {
            let services = if config.mode.is_some() {
                let (namespaces, selector) = service_query(&config.selector);
                let listed = cluster.list_services(&namespaces, &selector).await?;
                let (services, skipped) =
                    decide::federated_services(&listed, inventory, &config.host_suffix);
                let skipped = decide::bounded_list(skipped);
                // Said when it changes (the status keeps it), not at every pass.
                let recorded_skipped = recorded
                    .and_then(|r| r.federation.as_ref())
                    .map(|f| f.not_federated.as_slice())
                    .unwrap_or_default();
                if skipped != recorded_skipped {
                    tracing::info!(cluster = %inventory.name, not_federated = ?skipped, "Services left out of federation changed");
                }
                read.not_federated = skipped;
                services
            } else {
                vec![]
            };
            read.services = Some(services);
            let istio_namespaces = dedup(
                std::iter::once(mesh.spec.istio_namespace.clone())
                    .chain(recorded.map(|r| r.istio_namespace.clone())),
            );
            let mut objects = Vec::new();
            for ns in &istio_namespaces {
                for kind in Kind::ALL {
                    objects.extend(cluster.list_objects(kind, ns).await?);
                }
            }
            read.objects = Some(objects);
            Ok(())
        }
        .await;
        if let Err(e) = result {
            read.federation_problem = Some(e.to_string());
            read.services = None;
            read.objects = None;
        }
        read
    }

    /// A valid (or refused) VirtualMesh that is not being deleted.
    async fn converge(
        &self,
        vm: &VirtualMesh,
        meshes: &BTreeMap<ObjectRef, &Mesh>,
        claims: &BTreeMap<ObjectRef, ObjectRef>,
        before: &VirtualMeshStatus,
        now: SystemTime,
    ) -> Result<After, StepError> {
        let id = vm.id();
        let generation = vm.metadata.generation;
        if !decide::has_finalizer(vm) {
            self.ensure_leader().await?;
            self.management
                .apply_finalizer::<VirtualMesh>(&id.namespace, &id.name, true)
                .await?;
        }
        let valid: Valid<'_> = match decide::validate(vm, meshes, claims, &self.opts.namespace) {
            Ok(valid) => valid,
            Err(rejection) => {
                if before.phase != Some(super::crd::VirtualMeshPhase::Invalid) {
                    tracing::warn!(virtual_mesh = %id, reason = rejection.reason, detail = %rejection.message, "VirtualMesh refused; clusters left as they are");
                }
                return Ok(After::Kept(Box::new(decide::rejected_status(
                    before, generation, &rejection, now,
                ))));
            }
        };
        let config = &valid.config;
        let labels = config.labels();
        let recorded = before.recorded();

        // Members keep a finalizer while they have something in their cluster.
        for member in &valid.members {
            if !decide::mesh_has_finalizer(member.mesh) {
                self.ensure_leader().await?;
                self.management
                    .apply_finalizer::<Mesh>(&member.id.namespace, &member.id.name, true)
                    .await?;
            }
        }

        // A member joins the status before anything is made in its cluster: should this
        // pass be cut short (a kill, a lost Lease, a failed status write) and the member
        // be removed again before one completes, the record is what its cleanup starts
        // from. Without it the member was never cleaned up, its Mesh let go.
        let recorded_ids: BTreeSet<ObjectRef> = before.meshes.iter().map(|m| m.id()).collect();
        let joining: Vec<MemberStatus> = valid
            .members
            .iter()
            .filter(|m| !recorded_ids.contains(&m.id))
            .map(|m| decide::unrecorded_member(&m.id, m.mesh, MemberPhase::Pending))
            .collect();
        if !joining.is_empty() {
            let mut interim = before.clone();
            interim.meshes.extend(joining);
            self.ensure_leader().await?;
            self.management
                .apply_status(&id.namespace, &id.name, &interim)
                .await?;
        }

        let reads: Vec<MemberRead> = in_order(
            valid.members.iter().map(|member| {
                self.read_member(
                    member.mesh,
                    recorded.get(&member.id).copied(),
                    config,
                    &member.inventory,
                )
            }),
            MEMBER_READS_IN_FLIGHT,
        )
        .await;
        for (member, read) in valid.members.iter().zip(&reads) {
            if let Some(problem) = &read.problem {
                tracing::warn!(virtual_mesh = %id, mesh = %member.id, %problem, "cannot read the member cluster");
            } else if let Some(problem) = &read.federation_problem {
                tracing::warn!(virtual_mesh = %id, mesh = %member.id, %problem, "cannot read the member cluster's Services or Istio objects: federation held");
            }
        }

        // Roots: only what the members' own requests report.
        let desired: Vec<DesiredRequest> = valid
            .members
            .iter()
            .map(|m| decide::desired_request(config, &m.id, m.spec(), &[]))
            .collect();
        let current: Vec<Option<&VirtualMeshCertificateSigningRequest>> = desired
            .iter()
            .zip(&reads)
            .map(|(d, read)| {
                decide::find_request(&read.requests, &d.namespace, &d.name).filter(|r| {
                    !matches!(
                        decide::request_action(d, Some(r)),
                        RequestAction::Conflict(_)
                    )
                })
            })
            .collect();
        let trusts: Vec<MemberTrust> = reads
            .iter()
            .zip(&current)
            .map(|(read, request)| match read.problem {
                Some(_) => MemberTrust {
                    unread: true,
                    ..MemberTrust::default()
                },
                None => MemberTrust::of(*request),
            })
            .collect();
        let roots = decide::decide_roots(&trusts, before, now, self.opts.retire_after);
        let member_trusts: Vec<(&ObjectRef, &MemberTrust)> =
            valid.members.iter().map(|m| &m.id).zip(&trusts).collect();
        let next_root = decide::next_root_trust(&member_trusts);
        if !roots.newly_retired.is_empty() {
            tracing::info!(virtual_mesh = %id, retired = ?roots.newly_retired, "every member is on the new root: retiring the old ones");
        }

        // Requests.
        let mut views: Vec<RequestView<'_>> = Vec::with_capacity(reads.len());
        // A federation read's problem is the member's too (phase Error, named), though its
        // request is still applied.
        let mut problems: Vec<Option<String>> = reads
            .iter()
            .map(|r| r.problem.clone().or_else(|| r.federation_problem.clone()))
            .collect();
        // Whether each member's request, and its federation objects, are where its Mesh now
        // says, nothing left under an older namespace: only then does its status record the
        // new namespaces. Recorded earlier is what makes the next passes read, and clean,
        // the old ones (a Mesh's namespace changed while a member could not be written).
        let mut request_moved = vec![false; reads.len()];
        let mut objects_moved = vec![false; reads.len()];
        for (i, member) in valid.members.iter().enumerate() {
            let read = &reads[i];
            let Ok(cluster) = &read.cluster else {
                views.push(RequestView::Error);
                continue;
            };
            if read.problem.is_some() {
                views.push(RequestView::Error);
                continue;
            }
            let desired =
                decide::desired_request(config, &member.id, member.spec(), &roots.retired);
            let existing = decide::find_request(&read.requests, &desired.namespace, &desired.name);
            let agent_status: Option<&VmcsrStatus> = existing.and_then(|r| r.status.as_ref());
            let view = match decide::request_action(&desired, existing) {
                RequestAction::Conflict(message) => {
                    problems[i] = Some(message);
                    RequestView::Conflict
                }
                RequestAction::UpToDate => RequestView::Present(agent_status),
                RequestAction::Apply => {
                    self.ensure_leader().await?;
                    match cluster.apply_request(&desired).await {
                        Ok(()) => {
                            tracing::info!(virtual_mesh = %id, mesh = %member.id, request = %format!("{}/{}", desired.namespace, desired.name), "request applied");
                            RequestView::Present(agent_status)
                        }
                        Err(e) => {
                            problems[i] = Some(e.to_string());
                            RequestView::Error
                        }
                    }
                }
            };
            let in_place = matches!(view, RequestView::Present(_));
            views.push(view);
            // The request under another name (an old agent namespace) is the one the
            // running agent uses: it goes only once the wanted one is in place.
            if !in_place {
                continue;
            }
            let stale = decide::stale_requests(
                &read.requests,
                &desired.labels,
                Some((&desired.namespace, &desired.name)),
            );
            request_moved[i] = true;
            for request in stale {
                self.ensure_leader().await?;
                let (ns, name) = (
                    request.metadata.namespace.clone().unwrap_or_default(),
                    request.metadata.name.clone().unwrap_or_default(),
                );
                match cluster.delete_request(&ns, &name).await {
                    Ok(()) => {
                        tracing::info!(virtual_mesh = %id, mesh = %member.id, request = %format!("{ns}/{name}"), "stale request deleted")
                    }
                    Err(e) => {
                        request_moved[i] = false;
                        problems[i].get_or_insert(e.to_string());
                    }
                }
            }
        }

        // Federation: all members read, or nothing changes anywhere.
        let mut federation: Vec<Option<MemberFederation>> = vec![None; reads.len()];
        let unread: Vec<String> = valid
            .members
            .iter()
            .zip(&reads)
            .filter(|(_, r)| r.services.is_none() || r.objects.is_none())
            .map(|(m, r)| {
                let problem = (r.problem.as_ref())
                    .or(r.federation_problem.as_ref())
                    .map_or("not read", String::as_str);
                format!(
                    "{} ({})",
                    m.id,
                    crate::logging::clip(problem, decide::MAX_MEMBER_MESSAGE)
                )
            })
            .collect();
        let outcome = if !unread.is_empty() {
            FederationOutcome::Held {
                reason: "MemberError",
                message: format!(
                    "cannot read {}: federation objects are left as they are in every cluster until each member can be read",
                    unread.join(", ")
                ),
            }
        } else {
            let inventory = Inventory {
                clusters: valid
                    .members
                    .iter()
                    .zip(&reads)
                    .map(|(m, r)| {
                        let mut inventory = m.inventory.clone();
                        inventory.services = r.services.clone().unwrap_or_default();
                        inventory
                    })
                    .collect(),
            };
            match crate::mesh::translate(config, &inventory) {
                Err(e) => FederationOutcome::Held {
                    reason: "TranslationFailed",
                    message: e.to_string(),
                },
                Ok(plan) => {
                    let mut services = 0u64;
                    for (i, member) in valid.members.iter().enumerate() {
                        let (Ok(cluster), Some(objects)) = (&reads[i].cluster, &reads[i].objects)
                        else {
                            continue;
                        };
                        let cluster_name = &member.inventory.name;
                        let changes = decide::object_changes(&plan, cluster_name, objects, &labels);
                        match self
                            .apply_changes(
                                cluster,
                                &changes.apply,
                                &changes.delete,
                                &id,
                                cluster_name,
                            )
                            .await?
                        {
                            // Said beside a problem the member already has (its request
                            // held by someone else, a stale request not deleted), and counted
                            // as a federation error: a conflict alone is not one.
                            Some(problem) => match &mut problems[i] {
                                Some(earlier) => {
                                    earlier.push_str(&format!(
                                        "; and its federation objects were not all written: {problem}"
                                    ));
                                    views[i] = RequestView::Error;
                                }
                                None => problems[i] = Some(problem),
                            },
                            None => objects_moved[i] = true,
                        }
                        let summary = plan.summary(cluster_name).unwrap_or_default();
                        services += summary.exported as u64;
                        if config.mode.is_some() {
                            federation[i] = Some(MemberFederation {
                                exported: summary.exported as u64,
                                imported: summary.imported as u64,
                                objects: summary.objects as u64,
                                conflicts: changes.conflicts_listed(),
                                not_federated: reads[i].not_federated.clone(),
                            });
                        }
                    }
                    if config.mode.is_some() {
                        FederationOutcome::Applied {
                            services,
                            moved_addresses: plan.moved_addresses() as u64,
                        }
                    } else {
                        FederationOutcome::Disabled
                    }
                }
            }
        };

        if matches!(outcome, FederationOutcome::Held { .. }) {
            // What each cluster held stays, and so does its record.
            for (slot, member) in federation.iter_mut().zip(&valid.members) {
                *slot = recorded.get(&member.id).and_then(|r| r.federation.clone());
            }
        }

        // Former members: their request and objects go (their services in the other
        // clusters went with the plan above).
        let member_ids: BTreeSet<ObjectRef> = valid.members.iter().map(|m| m.id.clone()).collect();
        let departed = decide::departed(before, &member_ids);
        // A former member whose cluster a member covers now (a Mesh replaced by another for
        // the same cluster) leaves the federation objects of that member's Istio
        // namespaces alone: they are the member's now (the same names, the same labels),
        // and deleting them would take its federation down until the next pass, or for as
        // long as federation is held.
        let kept_namespaces = |former: &MemberStatus| -> Vec<String> {
            valid
                .members
                .iter()
                .filter(|m| m.inventory.name == former.cluster)
                .flat_map(|m| {
                    std::iter::once(m.mesh.spec.istio_namespace.clone())
                        .chain(recorded.get(&m.id).map(|r| r.istio_namespace.clone()))
                })
                .collect()
        };
        let cleanups = in_order(
            departed.iter().map(|former| {
                self.clean_member(
                    former,
                    meshes.get(&former.id()).copied(),
                    &config.virtual_mesh,
                    kept_namespaces(former),
                )
            }),
            MEMBER_READS_IN_FLIGHT,
        )
        .await;
        let mut removing = Vec::new();
        for (former, cleanup) in departed.into_iter().zip(cleanups) {
            match cleanup {
                Ok(()) => {
                    tracing::info!(virtual_mesh = %id, mesh = %former.id(), "former member cleaned up")
                }
                Err(StepError::NotLeader) => return Err(StepError::NotLeader),
                Err(StepError::Problem(problem)) => {
                    tracing::warn!(virtual_mesh = %id, mesh = %former.id(), %problem, "cannot clean up a former member yet");
                    removing.push(MemberStatus {
                        phase: MemberPhase::Removing,
                        message: Some(problem),
                        federation: None,
                        ..former.clone()
                    });
                }
            }
        }

        let members: Vec<MemberStatus> = valid
            .members
            .iter()
            .enumerate()
            .map(|(i, member)| {
                let before = recorded.get(&member.id);
                let (agent_now, istio_now) = (
                    &member.spec().agent.namespace,
                    &member.inventory.istio_namespace,
                );
                decide::member_status(&MemberReport {
                    id: member.id.clone(),
                    cluster: member.inventory.name.clone(),
                    agent_namespace: decide::namespace_to_record(
                        agent_now,
                        before.map(|b| b.agent_namespace.as_str()),
                        request_moved[i],
                    ),
                    istio_namespace: decide::namespace_to_record(
                        istio_now,
                        before.map(|b| b.istio_namespace.as_str()),
                        objects_moved[i],
                    ),
                    request: views[i],
                    federation: federation[i].clone(),
                    problem: problems[i].clone(),
                    now,
                })
            })
            .collect();
        Ok(After::Kept(Box::new(decide::converged_status(
            before,
            generation,
            Observed {
                members,
                removing,
                roots,
                next_root,
                next_root_settle: self.opts.retire_after,
                federation: outcome,
            },
            now,
        ))))
    }

    /// Applies, then deletes, in one cluster, [`WRITES_IN_FLIGHT`] at a time; the first
    /// failure is returned as the member's problem (the rest is tried on the next pass).
    async fn apply_changes(
        &self,
        cluster: &MemberCluster,
        apply: &[crate::mesh::IstioObject],
        delete: &[crate::mesh::ObjectId],
        virtual_mesh: &ObjectRef,
        cluster_name: &str,
    ) -> Result<Option<String>, StepError> {
        let applied = apply.iter().map(|object| cluster.apply_object(object));
        if let Some(problem) = self.write_all(applied).await? {
            return Ok(Some(problem));
        }
        let deleted = delete.iter().map(|id| cluster.delete_object(id));
        if let Some(problem) = self.write_all(deleted).await? {
            return Ok(Some(problem));
        }
        if !apply.is_empty() || !delete.is_empty() {
            tracing::info!(%virtual_mesh, cluster = %cluster_name, applied = apply.len(), deleted = delete.len(), "federation objects updated");
        }
        Ok(None)
    }

    /// Runs `writes`, [`WRITES_IN_FLIGHT`] at a time, each after a leadership check. What
    /// came first in the order given decides, as if they ran one after another: a lost
    /// Lease, or the first failed write's error (the member's problem). Once one fails no
    /// other is sent.
    async fn write_all<F>(
        &self,
        writes: impl IntoIterator<Item = F>,
    ) -> Result<Option<String>, StepError>
    where
        F: Future<Output = Result<(), KubeError>>,
    {
        let stop = AtomicBool::new(false);
        let stop = &stop;
        // None is sent once one has failed (those already sent finish).
        let outcomes: Vec<Result<Option<String>, StepError>> = in_order(
            writes.into_iter().map(|write| async move {
                if stop.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                if let Err(e) = self.ensure_leader().await {
                    stop.store(true, Ordering::SeqCst);
                    return Err(e);
                }
                // Looked at again: the leadership check may have waited on an election.
                if stop.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                let problem = write.await.err().map(|e| e.to_string());
                if problem.is_some() {
                    stop.store(true, Ordering::SeqCst);
                }
                Ok(problem)
            }),
            WRITES_IN_FLIGHT,
        )
        .await;
        for outcome in outcomes {
            if let Some(problem) = outcome? {
                return Ok(Some(problem));
            }
        }
        Ok(None)
    }

    /// Removes what this VirtualMesh made in a (former) member's cluster: its requests
    /// and every labelled federation object, in the namespaces recorded and current, but
    /// `kept_namespaces` (a member's now, for the same cluster).
    async fn clean_member(
        &self,
        member: &MemberStatus,
        mesh: Option<&Mesh>,
        virtual_mesh: &ObjectRef,
        kept_namespaces: Vec<String>,
    ) -> Result<(), StepError> {
        let id = member.id();
        let Some(mesh) = mesh else {
            return Err(StepError::Problem(format!(
                "Mesh {id} is gone, so cluster {} cannot be reached: recreate the Mesh to let the controller clean up, or delete by hand the VirtualMeshCertificateSigningRequest {}/{} and the objects labelled {} in {}",
                member.cluster,
                member.agent_namespace,
                id.name,
                labels_only(virtual_mesh).label_selector(),
                member.istio_namespace
            )));
        };
        let cluster = self.connect(mesh).await.map_err(StepError::Problem)?;
        let config = labels_only(virtual_mesh);
        let request_labels = decide::request_labels(&config, &id);
        let labels = config.labels();
        for ns in dedup([
            member.agent_namespace.clone(),
            mesh.spec.agent.namespace.clone(),
        ]) {
            let requests = cluster.list_requests(&ns).await?;
            for request in decide::stale_requests(&requests, &request_labels, None) {
                self.ensure_leader().await?;
                cluster
                    .delete_request(&ns, request.metadata.name.as_deref().unwrap_or_default())
                    .await?;
            }
        }
        for ns in dedup([
            member.istio_namespace.clone(),
            mesh.spec.istio_namespace.clone(),
        ]) {
            if kept_namespaces.contains(&ns) {
                continue;
            }
            let mut existing = Vec::new();
            for kind in Kind::ALL {
                existing.extend(cluster.list_objects(kind, &ns).await?);
            }
            let delete = decide::cleanup_objects(&existing, &labels);
            if let Some(problem) = self
                .apply_changes(&cluster, &[], &delete, virtual_mesh, &member.cluster)
                .await?
            {
                return Err(StepError::Problem(problem));
            }
        }
        Ok(())
    }

    /// A VirtualMesh being deleted: clean every cluster it touched, then let it go.
    async fn finalize(
        &self,
        vm: &VirtualMesh,
        meshes: &BTreeMap<ObjectRef, &Mesh>,
        claims: &BTreeMap<ObjectRef, ObjectRef>,
        before: &VirtualMeshStatus,
        now: SystemTime,
    ) -> Result<After, StepError> {
        if !decide::has_finalizer(vm) {
            return Ok(After::Gone);
        }
        let id = vm.id();
        // What the status recorded, and members it may have touched without recording
        // them (a pass cut short before its status write).
        let mut targets: BTreeMap<ObjectRef, MemberStatus> =
            before.meshes.iter().map(|m| (m.id(), m.clone())).collect();
        for mesh_id in decide::holds(vm, &VirtualMeshStatus::default()) {
            let Some(mesh) = meshes.get(&mesh_id) else {
                continue;
            };
            if claims.get(&mesh_id) != Some(&id) || targets.contains_key(&mesh_id) {
                continue;
            }
            targets.insert(
                mesh_id.clone(),
                decide::unrecorded_member(&mesh_id, mesh, MemberPhase::Removing),
            );
        }
        let cleanups = in_order(
            targets.iter().map(|(mesh_id, target)| {
                self.clean_member(target, meshes.get(mesh_id).copied(), &id, vec![])
            }),
            MEMBER_READS_IN_FLIGHT,
        )
        .await;
        let mut remaining = Vec::new();
        for (target, cleanup) in targets.into_values().zip(cleanups) {
            match cleanup {
                Ok(()) => {}
                Err(StepError::NotLeader) => return Err(StepError::NotLeader),
                Err(StepError::Problem(problem)) => remaining.push(MemberStatus {
                    phase: MemberPhase::Removing,
                    message: Some(problem),
                    federation: None,
                    ..target
                }),
            }
        }
        if remaining.is_empty() {
            self.ensure_leader().await?;
            self.management
                .apply_finalizer::<VirtualMesh>(&id.namespace, &id.name, false)
                .await?;
            return Ok(After::Gone);
        }
        Ok(After::Kept(Box::new(decide::deleting_status(
            before,
            vm.metadata.generation,
            remaining,
            now,
        ))))
    }
}

/// A configuration carrying only the VirtualMesh's name: enough for its labels (cleanup
/// needs no more, and must work for a spec that no longer validates).
fn labels_only(virtual_mesh: &ObjectRef) -> FederationConfig {
    FederationConfig {
        virtual_mesh: virtual_mesh.clone(),
        members: BTreeSet::new(),
        mode: None,
        selector: ServiceSelector::default(),
        host_suffix: DEFAULT_HOST_SUFFIX.to_string(),
    }
}

/// Which Services to list: the selector's namespaces (none: all) and its labels as a
/// label selector, so that the API server filters.
fn service_query(selector: &ServiceSelector) -> (Vec<String>, String) {
    let namespaces = selector.namespaces.iter().cloned().collect();
    let labels = selector
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    (namespaces, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow first future does not hold the others: the fifth of five, with four at once,
    /// starts while the first still waits (here the first waits for the fifth to start, so
    /// running them head-first, as `buffered` does, never ends), and the outputs keep the
    /// order given.
    #[tokio::test]
    async fn one_slow_future_does_not_hold_the_rest_and_the_order_is_kept() {
        let (fifth_started, first_may_end) = tokio::sync::oneshot::channel::<()>();
        let fifth_started = std::sync::Mutex::new(Some(fifth_started));
        let first_may_end = std::sync::Mutex::new(Some(first_may_end));
        let (started, waiting) = (&fifth_started, &first_may_end);
        let futures = (0..5usize).map(|index| async move {
            match index {
                0 => {
                    let waiting = waiting.lock().unwrap().take().unwrap();
                    waiting.await.unwrap();
                }
                4 => {
                    let _ = started.lock().unwrap().take().unwrap().send(());
                }
                _ => {}
            }
            index
        });
        // Only a guard against hanging.
        let outputs = tokio::time::timeout(Duration::from_secs(30), in_order(futures, 4))
            .await
            .expect("the first future held the fifth back");
        assert_eq!(outputs, [0, 1, 2, 3, 4]);
    }
}
