//! The restart plan after a new bundle is installed, as pure functions: whether restarts
//! are needed (policy auto | always | never), and the next step of the ordered, bounded
//! rollout (istiod, then gateways, then workloads, each namespace only once its
//! `istio-ca-root-cert` ConfigMap carries the new root).
//!
//! It never loops: a plan belongs to one certificate serial, a workload (Deployment,
//! StatefulSet or DaemonSet) is restarted at most once per serial (recorded in status and
//! on the pod template), and a finished or timed-out plan does nothing until a new serial
//! is installed.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pod template annotation `kubectl rollout restart` sets; changing it rolls the pods.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// Pod template annotation naming the serial a restart was for (the loop guard that
/// survives a lost status).
pub const RESTARTED_FOR: &str = "meshca.dev/restarted-for-serial";

/// When the agent restarts Istio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    /// What Istio needs: everything on the first install (istiod switches from its
    /// self-signed CA to the plugged-in one), istiod alone whenever root-cert.pem changed
    /// (istiod reloads plugged-in files by itself only while root-cert.pem stays the same
    /// bytes), nothing for a renewal under the same roots.
    #[default]
    Auto,
    /// Everything after every new intermediate; istiod alone after a change of
    /// root-cert.pem alone.
    Always,
    /// Never: the operator restarts.
    Never,
}

/// What the installation that just happened was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallKind {
    /// There was no cacerts: istiod runs its self-signed CA until restarted.
    FirstInstall,
    /// A new intermediate replaced meshca's or an adopted one; `roots_changed`: the new
    /// root-cert.pem differs from the one it replaced (by a byte).
    Replacement { roots_changed: bool },
    /// Only root-cert.pem changed.
    RootsOnly,
}

/// What a restart plan restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum RestartScope {
    /// istiod, then gateways, then workloads.
    #[default]
    Full,
    /// istiod alone: it loads a changed root-cert.pem (and whatever came with it) only
    /// when it starts. Workloads learn the new roots from istiod with their next
    /// certificate.
    Istiod,
}

impl RestartScope {
    fn is_full(&self) -> bool {
        *self == RestartScope::Full
    }
}

/// Whether an installation starts a restart plan, and of what. istiod's file watcher
/// takes new plugged-in files only when root-cert.pem is the same bytes as the one it
/// loaded (or, with `ISTIO_MULTIROOT_MESH`, one contains the other byte for byte);
/// otherwise it keeps its old intermediate and roots, silently, until it restarts.
pub fn restart_scope(policy: RestartPolicy, kind: InstallKind) -> Option<RestartScope> {
    match (policy, kind) {
        (RestartPolicy::Never, _) => None,
        (_, InstallKind::FirstInstall) => Some(RestartScope::Full),
        (RestartPolicy::Always, InstallKind::Replacement { .. }) => Some(RestartScope::Full),
        (_, InstallKind::RootsOnly)
        | (
            RestartPolicy::Auto,
            InstallKind::Replacement {
                roots_changed: true,
            },
        ) => Some(RestartScope::Istiod),
        (
            RestartPolicy::Auto,
            InstallKind::Replacement {
                roots_changed: false,
            },
        ) => None,
    }
}

/// The plan to record for an installation of `kind`, or None. A plan still under way
/// that restarts more than the new one would is widened to it rather than cut short (a
/// first install's gateways and workloads still restart).
pub fn plan_for(
    policy: RestartPolicy,
    kind: InstallKind,
    serial: &str,
    root_fingerprint: &str,
    root_cert: &str,
    under_way: Option<&RestartRecord>,
    now_rfc3339: &str,
) -> Option<RestartRecord> {
    let mut scope = restart_scope(policy, kind)?;
    if under_way.is_some_and(|r| !r.stage.is_final() && r.scope.is_full()) {
        scope = RestartScope::Full;
    }
    Some(RestartRecord {
        serial: serial.to_string(),
        roots_sha256: match kind {
            InstallKind::RootsOnly => Some(short_digest(root_cert)),
            _ => None,
        },
        root_fingerprint: root_fingerprint.to_string(),
        root_set: super::rotation::root_fingerprints(root_cert),
        scope,
        stage: Stage::Istiod,
        stage_started: now_rfc3339.to_string(),
        restarted: vec![],
        rolls_on_delete: vec![],
        message: None,
    })
}

/// The first 16 hex digits of SHA-256 of `text`: tells root-cert.pem versions apart.
fn short_digest(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The stages, in order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Stage {
    Istiod,
    Gateways,
    Workloads,
    /// Everything restarted.
    Complete,
    /// istiod's rollout did not finish, or a namespace's ConfigMap did not carry the new
    /// root, in time; nothing more happens for this serial.
    TimedOut,
}

impl Stage {
    fn next(self) -> Stage {
        match self {
            Stage::Istiod => Stage::Gateways,
            Stage::Gateways => Stage::Workloads,
            other => Stage::Complete.max(other),
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Stage::Complete | Stage::TimedOut)
    }
}

/// The plan's progress, kept in status (`status.restart`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartRecord {
    /// The certificate serial these restarts are for.
    pub serial: String,
    /// For a change of root-cert.pem alone (the serial stays): the first 16 hex digits of
    /// its SHA-256, so each version of the roots has its own plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots_sha256: Option<String>,
    /// SHA-256 of the root the new intermediate chains to.
    pub root_fingerprint: String,
    /// SHA-256 of each root of the new root-cert.pem, in its order: what a namespace's
    /// `istio-ca-root-cert` must carry, in that order, before its pods restart (see
    /// [`RestartRecord::namespace_ready`]). Absent from plans recorded before it: the
    /// namespace then needs only `root_fingerprint`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_set: Vec<String>,
    /// What the plan restarts (`Full` when absent).
    #[serde(default, skip_serializing_if = "RestartScope::is_full")]
    pub scope: RestartScope,
    pub stage: Stage,
    /// When the current stage started (RFC 3339): the wait bound counts from here.
    pub stage_started: String,
    /// `<Kind> <namespace>/<name>` of every workload restarted for this serial.
    #[serde(default)]
    pub restarted: Vec<String>,
    /// Those among them whose `updateStrategy` is `OnDelete`: patched, but their pods keep
    /// the old files until someone deletes them (meshca never deletes a pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolls_on_delete: Vec<String>,
    /// What the plan waits for or why it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl RestartRecord {
    /// What the restarts are for, as the pod template annotation records it: the serial,
    /// plus the roots' digest for a change of root-cert.pem alone.
    pub fn plan_key(&self) -> String {
        match &self.roots_sha256 {
            Some(roots) => format!("{}+roots-{roots}", self.serial),
            None => self.serial.clone(),
        }
    }

    /// Whether a namespace whose `istio-ca-root-cert` holds `pem` has what the new istiod
    /// writes there: the new root-cert.pem's roots in their order (other anchors besides
    /// them allowed). Carrying the new root alone is not enough: a root announced ahead of
    /// a switch is in every ConfigMap already, in second place, before the switch's istiod
    /// starts, and an announcement adds a root to what the old istiod still writes.
    pub fn namespace_ready(&self, pem: &str) -> bool {
        if self.root_set.is_empty() {
            return super::rotation::carries_root(pem, &self.root_fingerprint);
        }
        let mut carried: Vec<String> = Vec::new();
        for fp in super::rotation::root_fingerprints(pem) {
            if self.root_set.contains(&fp) && !carried.contains(&fp) {
                carried.push(fp);
            }
        }
        carried == self.root_set
    }

    /// The stage after `stage` in this plan.
    fn after(&self, stage: Stage) -> Stage {
        match (self.scope, stage) {
            (RestartScope::Istiod, Stage::Istiod) => Stage::Complete,
            _ => stage.next(),
        }
    }
}

/// The kinds of workload a rolling restart applies to (each rolls its pods when its pod
/// template changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }

    /// The kinds a stage restarts: istiod and the gateways are Deployments in every Istio
    /// installation; a namespace's workloads may be any of the three.
    pub fn of_stage(stage: Stage) -> &'static [WorkloadKind] {
        match stage {
            Stage::Istiod | Stage::Gateways => &[WorkloadKind::Deployment],
            Stage::Workloads => &[
                WorkloadKind::Deployment,
                WorkloadKind::StatefulSet,
                WorkloadKind::DaemonSet,
            ],
            Stage::Complete | Stage::TimedOut => &[],
        }
    }
}

/// A workload the current stage covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
    /// The pod template's [`RESTARTED_FOR`] annotation.
    pub restarted_for: Option<String>,
    /// A StatefulSet or DaemonSet with `updateStrategy: OnDelete`: a patched pod template
    /// rolls no pod.
    pub rolls_on_delete: bool,
    /// How a Deployment's rollout stands while its pods are not all of its current pod
    /// template and available (`kubectl rollout status`'s test); None once they are.
    pub rollout_pending: Option<String>,
}

impl Target {
    /// `<Kind> <namespace>/<name>`, as recorded in `status.restart.restarted`.
    pub fn id(&self) -> String {
        format!("{} {}/{}", self.kind.name(), self.namespace, self.name)
    }
}

/// What the current stage looks like now.
#[derive(Debug, Clone, Default)]
pub struct StageView {
    pub targets: Vec<Target>,
    /// Namespaces whose `istio-ca-root-cert` carries the new root.
    pub ready_namespaces: BTreeSet<String>,
}

/// The next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Restart these (rolling, by annotation) and record them.
    Restart(Vec<Target>),
    /// Nothing to restart yet: these namespaces' ConfigMaps lack the new root.
    Wait { namespaces: Vec<String> },
    /// The stage is done: move on to this one (its start time is now).
    Advance(Stage),
    /// Waited longer than the bound for these namespaces: stop for this serial.
    TimeOut { namespaces: Vec<String> },
    /// istiod restarted, its new pods not all serving yet (each `<workload> (how it
    /// stands)`): the next stage, or the plan's end, waits for them.
    WaitRollout { workloads: Vec<String> },
    /// Waited longer than the bound for istiod's rollout: stop for this serial.
    RolloutTimeOut { workloads: Vec<String> },
    /// No istiod Deployment matches the selector: istiod not restarted is no success (at
    /// a first install it stays on its self-signed CA), so the plan waits for one, the
    /// same bound as a namespace (`timed_out` past it: stop for this serial).
    NoIstiod { timed_out: bool },
    /// Nothing more, ever, for this serial.
    Done,
}

/// The next step of the plan, given the current stage's workloads.
///
/// Istiod restarts without a gate (it is what puts the new root into the ConfigMaps).
/// Gateways and workloads restart only in namespaces that carry the new root; those that
/// wait longer than `bound` from the stage start time the plan out.
pub fn next_step(
    record: &RestartRecord,
    view: &StageView,
    stage_started: SystemTime,
    now: SystemTime,
    bound: Duration,
) -> Step {
    if record.stage.is_final() {
        return Step::Done;
    }
    let waited_too_long = now.duration_since(stage_started).unwrap_or(Duration::ZERO) > bound;
    if record.stage == Stage::Istiod && view.targets.is_empty() {
        return Step::NoIstiod {
            timed_out: waited_too_long,
        };
    }
    let key = record.plan_key();
    let pending: Vec<&Target> = view
        .targets
        .iter()
        .filter(|t| !record.restarted.contains(&t.id()) && t.restarted_for.as_deref() != Some(&key))
        .collect();
    if pending.is_empty() {
        // istiod's restart is done once its new pods serve: the gateways restarted before
        // would get their certificates from the old ones, and a plan reported complete
        // would let a root be retired (or switched to) while the old istiod still runs.
        if record.stage == Stage::Istiod {
            let rolling: Vec<String> = view
                .targets
                .iter()
                .filter_map(|t| {
                    let how = t.rollout_pending.as_ref()?;
                    Some(format!("{} ({how})", t.id()))
                })
                .collect();
            if !rolling.is_empty() {
                return match waited_too_long {
                    true => Step::RolloutTimeOut { workloads: rolling },
                    false => Step::WaitRollout { workloads: rolling },
                };
            }
        }
        return Step::Advance(record.after(record.stage));
    }
    let gated = record.stage != Stage::Istiod;
    let (ready, waiting): (Vec<&Target>, Vec<&Target>) = pending
        .into_iter()
        .partition(|t| !gated || view.ready_namespaces.contains(&t.namespace));
    if !ready.is_empty() {
        return Step::Restart(ready.into_iter().cloned().collect());
    }
    let namespaces: Vec<String> = waiting
        .iter()
        .map(|t| t.namespace.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if waited_too_long {
        Step::TimeOut { namespaces }
    } else {
        Step::Wait { namespaces }
    }
}

/// The strategic-merge patch a rolling restart sends: both annotations on the pod
/// template, nothing else (as `kubectl rollout restart`, plus the plan's key).
pub fn restart_patch(plan_key: &str, now_rfc3339: &str) -> serde_json::Value {
    serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {
            RESTARTED_AT: now_rfc3339,
            RESTARTED_FOR: plan_key,
        }}}}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn t(ns: &str, name: &str) -> Target {
        Target {
            kind: WorkloadKind::Deployment,
            namespace: ns.into(),
            name: name.into(),
            restarted_for: None,
            rolls_on_delete: false,
            rollout_pending: None,
        }
    }

    fn record(stage: Stage) -> RestartRecord {
        RestartRecord {
            serial: "aa01".into(),
            roots_sha256: None,
            root_fingerprint: "ff".into(),
            root_set: vec![],
            scope: RestartScope::Full,
            stage,
            stage_started: "2026-01-01T00:00:00Z".into(),
            restarted: vec![],
            rolls_on_delete: vec![],
            message: None,
        }
    }

    fn ready(namespaces: &[&str]) -> BTreeSet<String> {
        namespaces.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn policy_table() {
        use InstallKind::*;
        use RestartPolicy::*;
        use RestartScope::{Full, Istiod};
        let same_roots = Replacement {
            roots_changed: false,
        };
        let new_roots = Replacement {
            roots_changed: true,
        };
        let cases = [
            (Auto, FirstInstall, Some(Full)),
            (Auto, same_roots, None),
            (Auto, new_roots, Some(Istiod)),
            (Auto, RootsOnly, Some(Istiod)),
            (Always, FirstInstall, Some(Full)),
            (Always, same_roots, Some(Full)),
            (Always, new_roots, Some(Full)),
            (Always, RootsOnly, Some(Istiod)),
            (Never, FirstInstall, None),
            (Never, new_roots, None),
            (Never, RootsOnly, None),
        ];
        for (policy, kind, expect) in cases {
            assert_eq!(restart_scope(policy, kind), expect, "{policy:?} {kind:?}");
        }
        assert_eq!(RestartPolicy::default(), Auto);
    }

    #[test]
    fn a_namespace_is_ready_when_its_configmap_holds_the_new_roots_in_their_order() {
        use crate::pki::keys::KeyType;
        use crate::pki::testing::software_root;
        let day = std::time::Duration::from_secs(86_400);
        let root = || software_root(KeyType::EcdsaP256, "acme", day).1;
        let (r1, r2, other) = (root(), root(), root());
        let pem = |roots: &[&crate::pki::profile::RootCa]| -> String {
            roots.iter().map(|r| r.pem.as_str()).collect()
        };
        let plan = |kind, roots: &str, issuing: &crate::pki::profile::RootCa| {
            plan_for(
                RestartPolicy::Always,
                kind,
                "aa01",
                &issuing.fingerprint_sha256,
                roots,
                None,
                "2026-01-01T00:00:00Z",
            )
            .unwrap()
        };
        // The switch: the new istiod writes R2 then R1; R1 then R2 is still the old one's
        // (it took the announced R2 at the announcement), though it carries R2.
        let switch = plan(
            InstallKind::Replacement {
                roots_changed: true,
            },
            &pem(&[&r2, &r1]),
            &r2,
        );
        assert!(!switch.namespace_ready(&pem(&[&r1, &r2])));
        assert!(!switch.namespace_ready(&pem(&[&r2])));
        assert!(switch.namespace_ready(&pem(&[&r2, &r1])));
        // Anchors istiod adds besides them (mesh config), or a root twice, do not hold it up.
        assert!(switch.namespace_ready(&pem(&[&other, &r2, &r1])));
        assert!(switch.namespace_ready(&pem(&[&r2, &r2, &r1])));
        // The announcement: the issuing root stays R1; ready once R2 is there too.
        let announcement = plan(InstallKind::RootsOnly, &pem(&[&r1, &r2]), &r1);
        assert!(!announcement.namespace_ready(&pem(&[&r1])));
        assert!(announcement.namespace_ready(&pem(&[&r1, &r2])));
        // A plan recorded before the root set was: the issuing root is enough, as then.
        let mut older = switch.clone();
        older.root_set.clear();
        assert!(older.namespace_ready(&pem(&[&r1, &r2])));
        assert!(!older.namespace_ready(&pem(&[&r1])));
    }

    #[test]
    fn a_roots_plan_restarts_istiod_once_per_version_of_the_roots_and_ends() {
        let now = "2026-01-01T00:00:00Z";
        let plan = |roots: &str, under_way: Option<&RestartRecord>| {
            plan_for(
                RestartPolicy::Auto,
                InstallKind::RootsOnly,
                "aa01",
                "ff",
                roots,
                under_way,
                now,
            )
            .unwrap()
        };
        let first = plan("ROOT-A\nROOT-B\n", None);
        let second = plan("ROOT-B\n", None);
        assert_eq!(first.scope, RestartScope::Istiod);
        // The serial stays, so the key tells the versions of the roots apart: istiod,
        // restarted for the first (or for the serial's install), restarts for the second.
        assert!(first.plan_key().starts_with("aa01+roots-"));
        assert_ne!(first.plan_key(), second.plan_key());
        let mut istiod = t("istio-system", "istiod");
        istiod.restarted_for = Some(first.plan_key());
        let view = StageView {
            targets: vec![istiod.clone()],
            ready_namespaces: ready(&[]),
        };
        let start = SystemTime::UNIX_EPOCH;
        assert_eq!(
            next_step(&second, &view, start, start, MIN),
            Step::Restart(vec![istiod.clone()])
        );
        // Done with istiod, the plan ends: no gateway or workload stage.
        assert_eq!(
            next_step(&first, &view, start, start, MIN),
            Step::Advance(Stage::Complete)
        );
        // A serial's new intermediate keeps the plain serial as its key.
        let renewal = plan_for(
            RestartPolicy::Auto,
            InstallKind::Replacement {
                roots_changed: true,
            },
            "bb02",
            "ff",
            "ROOT-B\n",
            None,
            now,
        )
        .unwrap();
        assert_eq!(
            (renewal.plan_key().as_str(), renewal.scope),
            ("bb02", RestartScope::Istiod)
        );
        // A first install's plan still under way is widened to, not cut short.
        let mut first_install = record(Stage::Gateways);
        let widened = plan("ROOT-A\n", Some(&first_install));
        assert_eq!(
            (widened.scope, widened.stage),
            (RestartScope::Full, Stage::Istiod)
        );
        first_install.stage = Stage::Complete;
        assert_eq!(
            plan("ROOT-A\n", Some(&first_install)).scope,
            RestartScope::Istiod
        );
    }

    #[test]
    fn istiod_restarts_without_waiting_for_configmaps() {
        let view = StageView {
            targets: vec![t("istio-system", "istiod")],
            ready_namespaces: ready(&[]),
        };
        let start = SystemTime::UNIX_EPOCH;
        assert_eq!(
            next_step(&record(Stage::Istiod), &view, start, start, 10 * MIN),
            Step::Restart(vec![t("istio-system", "istiod")])
        );
    }

    /// istiod restarted is done once its rollout is: the gateways (or, for a plan of istiod
    /// alone, the plan's end) wait for its new pods, as long as for a namespace's
    /// ConfigMap, then the plan stops naming how the rollout stood.
    #[test]
    fn the_istiod_stage_ends_once_its_rollout_has() {
        let mut istiod = t("istio-system", "istiod");
        istiod.restarted_for = Some("aa01".into());
        istiod.rollout_pending = Some("1 of 2 pods updated".into());
        let rolling = StageView {
            targets: vec![istiod.clone()],
            ready_namespaces: ready(&[]),
        };
        let start = SystemTime::UNIX_EPOCH;
        let waiting = vec!["Deployment istio-system/istiod (1 of 2 pods updated)".to_string()];
        for scope in [RestartScope::Full, RestartScope::Istiod] {
            let plan = RestartRecord {
                scope,
                ..record(Stage::Istiod)
            };
            assert_eq!(
                next_step(&plan, &rolling, start, start + MIN, 10 * MIN),
                Step::WaitRollout {
                    workloads: waiting.clone()
                }
            );
            assert_eq!(
                next_step(&plan, &rolling, start, start + 11 * MIN, 10 * MIN),
                Step::RolloutTimeOut {
                    workloads: waiting.clone()
                }
            );
            let rolled = StageView {
                targets: vec![Target {
                    rollout_pending: None,
                    ..istiod.clone()
                }],
                ready_namespaces: ready(&[]),
            };
            let next = match scope {
                RestartScope::Istiod => Stage::Complete,
                _ => Stage::Gateways,
            };
            assert_eq!(
                next_step(&plan, &rolled, start, start + MIN, 10 * MIN),
                Step::Advance(next)
            );
        }
        // Gateways and workloads are not waited for: the plan ends once they are asked.
        let mut gateway = t("istio-system", "istio-ingressgateway");
        gateway.restarted_for = Some("aa01".into());
        gateway.rollout_pending = Some("0 of 1 updated pods available".into());
        let gateways = StageView {
            targets: vec![gateway],
            ready_namespaces: ready(&["istio-system"]),
        };
        assert_eq!(
            next_step(&record(Stage::Gateways), &gateways, start, start, 10 * MIN),
            Step::Advance(Stage::Workloads)
        );
    }

    /// An istiod selector that matches nothing is not a restart done: the plan waits for
    /// one as long as for a namespace's ConfigMap, then stops (before, it advanced, and a
    /// first install reported Complete with istiod still on its self-signed CA).
    #[test]
    fn no_istiod_to_restart_holds_the_plan_then_times_it_out() {
        let view = StageView::default();
        let start = SystemTime::UNIX_EPOCH;
        for scope in [RestartScope::Full, RestartScope::Istiod] {
            let mut plan = record(Stage::Istiod);
            plan.scope = scope;
            assert_eq!(
                next_step(&plan, &view, start, start + MIN, 10 * MIN),
                Step::NoIstiod { timed_out: false }
            );
            assert_eq!(
                next_step(&plan, &view, start, start + 11 * MIN, 10 * MIN),
                Step::NoIstiod { timed_out: true }
            );
        }
    }

    #[test]
    fn a_full_plan_runs_in_order_and_then_never_acts_again() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut rec = record(Stage::Istiod);
        let istiod = vec![t("istio-system", "istiod")];
        let gateways = vec![
            t("istio-system", "istio-ingressgateway"),
            t("istio-gateways", "east-west"),
        ];
        let workloads = vec![t("shop", "cart"), t("shop", "web"), t("bank", "ledger")];
        // The simulated cluster: which namespaces carry the new root at each round.
        let rounds: Vec<&[&str]> = vec![
            &[],
            &["istio-system"],
            &["istio-system", "istio-gateways"],
            &["istio-system", "istio-gateways", "shop"],
            &["istio-system", "istio-gateways", "shop", "bank"],
        ];
        let mut order: Vec<String> = Vec::new();
        let mut steps = 0;
        for carried in rounds.iter().cycle().take(40) {
            let targets = match rec.stage {
                Stage::Istiod => istiod.clone(),
                Stage::Gateways => gateways.clone(),
                Stage::Workloads => workloads.clone(),
                _ => vec![],
            };
            let view = StageView {
                targets,
                ready_namespaces: ready(carried),
            };
            match next_step(&rec, &view, start, start + MIN, 10 * MIN) {
                Step::Restart(ts) => {
                    for target in ts {
                        // Gateways and workloads only where the root has arrived.
                        if rec.stage != Stage::Istiod {
                            assert!(carried.contains(&target.namespace.as_str()));
                        }
                        assert!(!order.contains(&target.id()), "restarted twice");
                        order.push(target.id());
                        rec.restarted.push(target.id());
                    }
                }
                Step::Advance(stage) => rec.stage = stage,
                Step::Wait { .. } => {}
                Step::Done => break,
                Step::TimeOut { .. } | Step::RolloutTimeOut { .. } => {
                    panic!("no time passes here")
                }
                Step::WaitRollout { .. } => panic!("istiod's rollout is done here"),
                Step::NoIstiod { .. } => panic!("istiod is there"),
            }
            steps += 1;
        }
        assert!(steps < 40);
        assert_eq!(rec.stage, Stage::Complete);
        assert_eq!(order[0], "Deployment istio-system/istiod");
        let pos = |id: &str| order.iter().position(|o| o == id).unwrap();
        assert!(pos("Deployment istio-system/istio-ingressgateway") < pos("Deployment shop/cart"));
        assert!(pos("Deployment istio-gateways/east-west") < pos("Deployment bank/ledger"));
        assert_eq!(order.len(), 6);
        // Re-running a complete plan any number of times restarts nothing.
        let everything = StageView {
            targets: [istiod, gateways, workloads].concat(),
            ready_namespaces: ready(&["istio-system", "istio-gateways", "shop", "bank"]),
        };
        for _ in 0..5 {
            assert_eq!(
                next_step(&rec, &everything, start, start + MIN, 10 * MIN),
                Step::Done
            );
        }
    }

    #[test]
    fn deployments_already_restarted_for_the_serial_are_skipped_even_without_status() {
        // The status was lost (e.g. a failed status write), the annotation remains.
        let mut done = t("istio-system", "istiod");
        done.restarted_for = Some("aa01".into());
        let view = StageView {
            targets: vec![done.clone()],
            ready_namespaces: ready(&[]),
        };
        let start = SystemTime::UNIX_EPOCH;
        assert_eq!(
            next_step(&record(Stage::Istiod), &view, start, start, MIN),
            Step::Advance(Stage::Gateways)
        );
        // An annotation from an older serial does not count.
        done.restarted_for = Some("0001".into());
        let view = StageView {
            targets: vec![done.clone()],
            ready_namespaces: ready(&[]),
        };
        assert_eq!(
            next_step(&record(Stage::Istiod), &view, start, start, MIN),
            Step::Restart(vec![done])
        );
    }

    #[test]
    fn waiting_is_bounded() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(5_000);
        let view = StageView {
            targets: vec![t("shop", "web"), t("bank", "ledger"), t("shop", "cart")],
            ready_namespaces: ready(&[]),
        };
        let rec = record(Stage::Workloads);
        assert_eq!(
            next_step(&rec, &view, start, start + 10 * MIN, 10 * MIN),
            Step::Wait {
                namespaces: vec!["bank".into(), "shop".into()]
            }
        );
        assert_eq!(
            next_step(&rec, &view, start, start + 11 * MIN, 10 * MIN),
            Step::TimeOut {
                namespaces: vec!["bank".into(), "shop".into()]
            }
        );
        // A clock that went backwards waits rather than timing out.
        assert!(matches!(
            next_step(&rec, &view, start, start - MIN, 10 * MIN),
            Step::Wait { .. }
        ));
        // Ready namespaces go ahead even while others wait.
        let partly = StageView {
            ready_namespaces: ready(&["bank"]),
            ..view
        };
        assert_eq!(
            next_step(&rec, &partly, start, start + 11 * MIN, 10 * MIN),
            Step::Restart(vec![t("bank", "ledger")])
        );
        // A timed-out plan never acts again.
        let mut stopped = rec.clone();
        stopped.stage = Stage::TimedOut;
        assert_eq!(
            next_step(&stopped, &partly, start, start + 60 * MIN, 10 * MIN),
            Step::Done
        );
    }

    /// No gateways or no workloads is nothing to wait for (no istiod is: see
    /// [`no_istiod_to_restart_holds_the_plan_then_times_it_out`]).
    #[test]
    fn an_empty_gateway_or_workload_stage_advances() {
        let start = SystemTime::UNIX_EPOCH;
        for (stage, next) in [
            (Stage::Gateways, Stage::Workloads),
            (Stage::Workloads, Stage::Complete),
        ] {
            assert_eq!(
                next_step(&record(stage), &StageView::default(), start, start, MIN),
                Step::Advance(next)
            );
        }
    }

    #[test]
    fn the_patch_only_touches_pod_template_annotations() {
        let patch = restart_patch("aa01", "2026-01-01T00:00:00Z");
        assert_eq!(
            patch,
            serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z",
                "meshca.dev/restarted-for-serial": "aa01"
            }}}}})
        );
    }
}
