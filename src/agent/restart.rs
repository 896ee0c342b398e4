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
    /// Only when istiod switches from its self-signed CA to the plugged-in one (the first
    /// install): Istio 1.19+ reloads plugged-in files by itself after that.
    #[default]
    Auto,
    /// After every new intermediate.
    Always,
    /// Never: the operator restarts.
    Never,
}

/// What the installation that just happened was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallKind {
    /// There was no cacerts: istiod runs its self-signed CA until restarted.
    FirstInstall,
    /// A new intermediate replaced meshca's or an adopted one (istiod reloads it).
    Replacement,
    /// Only root-cert.pem changed.
    RootsOnly,
}

/// Whether an installation starts a restart plan.
pub fn restart_needed(policy: RestartPolicy, kind: InstallKind) -> bool {
    match (policy, kind) {
        (RestartPolicy::Never, _) => false,
        (_, InstallKind::RootsOnly) => false,
        (RestartPolicy::Always, _) => true,
        (RestartPolicy::Auto, InstallKind::FirstInstall) => true,
        (RestartPolicy::Auto, InstallKind::Replacement) => false,
    }
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
    /// A namespace's ConfigMap did not carry the new root in time; nothing more happens
    /// for this serial.
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
    /// SHA-256 of the root the namespaces must carry before their pods restart.
    pub root_fingerprint: String,
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
    let pending: Vec<&Target> = view
        .targets
        .iter()
        .filter(|t| {
            !record.restarted.contains(&t.id())
                && t.restarted_for.as_deref() != Some(record.serial.as_str())
        })
        .collect();
    if pending.is_empty() {
        return Step::Advance(record.stage.next());
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
    if now.duration_since(stage_started).unwrap_or(Duration::ZERO) > bound {
        Step::TimeOut { namespaces }
    } else {
        Step::Wait { namespaces }
    }
}

/// The strategic-merge patch a rolling restart sends: both annotations on the pod
/// template, nothing else (as `kubectl rollout restart`, plus the serial).
pub fn restart_patch(serial: &str, now_rfc3339: &str) -> serde_json::Value {
    serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {
            RESTARTED_AT: now_rfc3339,
            RESTARTED_FOR: serial,
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
        }
    }

    fn record(stage: Stage) -> RestartRecord {
        RestartRecord {
            serial: "aa01".into(),
            root_fingerprint: "ff".into(),
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
        let cases = [
            (Auto, FirstInstall, true),
            (Auto, Replacement, false),
            (Auto, RootsOnly, false),
            (Always, FirstInstall, true),
            (Always, Replacement, true),
            (Always, RootsOnly, false),
            (Never, FirstInstall, false),
            (Never, Replacement, false),
            (Never, RootsOnly, false),
        ];
        for (policy, kind, expect) in cases {
            assert_eq!(restart_needed(policy, kind), expect, "{policy:?} {kind:?}");
        }
        assert_eq!(RestartPolicy::default(), Auto);
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
                Step::TimeOut { .. } => panic!("no time passes here"),
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

    #[test]
    fn an_empty_stage_advances() {
        let start = SystemTime::UNIX_EPOCH;
        for (stage, next) in [
            (Stage::Istiod, Stage::Gateways),
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
