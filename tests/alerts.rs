//! The Prometheus alert rules in deploy/prometheus: promtool accepts them and passes
//! their unit tests, and every metric they use is one a running signer, an agent or the
//! mesh controller exports (a renamed metric would otherwise silence its alert without
//! anyone noticing).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::SystemTime;

use common::*;
use meshca::agent::client::SignerContact;
use meshca::agent::metrics::{AgentMetrics, Exposition, Reconciled};
use meshca::mesh_controller::metrics::{MeshControllerMetrics, Reconciled as MeshReconciled};

fn rules_dir() -> PathBuf {
    repo().join("deploy/prometheus")
}

/// `promtool ARGS` in deploy/prometheus, with the promtool `scripts/install-deps.sh`
/// fetched (var/tools/bin) or one on PATH; asserts it succeeds and returns its stdout.
fn promtool(args: &[&str]) -> String {
    let promtool = installed_tool("var/tools/bin/promtool", "promtool");
    text(&run_ok(Command::new(promtool).current_dir(rules_dir()).args(args)).stdout)
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "meshca-alerts.yaml"]);
    assert!(checked.contains("SUCCESS: 44 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "meshca-alerts.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The metric names in an exposition, as PromQL sees them: a counter `x` is `x_total`,
/// a histogram `x` is `x_bucket`, `x_sum` and `x_count`.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// Every `meshca_...` name in the rules file.
fn names_in_rules() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(rules_dir().join("meshca-alerts.yaml")).unwrap();
    let mut names = BTreeSet::new();
    let mut rest = rules.as_str();
    while let Some(at) = rest.find("meshca_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The refusal codes of a signing request that are neither a policy rule's nor a
/// handshake reason's (the rules' `prefix_.*` matchers are checked against these too).
const OTHER_OUTCOMES: [&str; 16] = [
    "issued",
    "issuance_check_failed",
    "backend_out_of_policy",
    "backend_refused",
    "backend_unavailable",
    "root_expired",
    "not_authorized",
    "client_issuer",
    "unknown_virtual_mesh",
    "unknown_mesh",
    "malformed_request",
    "malformed_csr",
    "rate_limited",
    "audit_unavailable",
    "client_gone",
    "internal",
];

/// Every `meshca_sign_requests_total` outcome a rule's matcher selects: its literal
/// alternatives, and each known outcome a `prefix.*` alternative matches.
fn outcomes_the_rules_select() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(rules_dir().join("meshca-alerts.yaml")).unwrap();
    let known: Vec<&str> = OTHER_OUTCOMES
        .into_iter()
        .chain(meshca::policy::rules::Rule::ALL.map(|rule| rule.code()))
        .chain(meshca::tlsutil::HANDSHAKE_REFUSAL_REASONS)
        .collect();
    let mut selected = BTreeSet::new();
    let selector = "meshca_sign_requests_total{outcome=";
    let mut rest = rules.as_str();
    while let Some(at) = rest.find(selector) {
        let tail = &rest[at + selector.len()..];
        let tail = tail.strip_prefix('~').unwrap_or(tail);
        let value = tail.strip_prefix('"').unwrap();
        let value = &value[..value.find('"').unwrap()];
        for alternative in value.split('|') {
            if let Some(prefix) = alternative.strip_suffix(".*") {
                let matched: Vec<&&str> = known.iter().filter(|o| o.starts_with(prefix)).collect();
                assert!(
                    !matched.is_empty(),
                    "{alternative} matches no known outcome"
                );
                selected.extend(matched.into_iter().map(|o| o.to_string()));
            } else {
                assert!(
                    alternative
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_'),
                    "a matcher this test does not read: {alternative}"
                );
                selected.insert(alternative.to_string());
            }
        }
        rest = tail;
    }
    // The rate-limit alert's, and the policy and client certificate refusals'.
    for outcome in ["rate_limited", "policy_org", "client_certificate_revoked"] {
        assert!(selected.contains(outcome), "{outcome}: {selected:?}");
    }
    selected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_use_is_exported() {
    let env = Env::new();
    // With a client CRL: its nextUpdate is exported only when there is one.
    env.check_client_crls();
    // With a next root announced: its notAfter too.
    env.init_next_root();
    env.announce_next_root(Some("next-root-cert.pem"));
    let signer = env.start_signer();
    let fresh = signer.metrics(&env.client("cluster-a")).await;
    // Before any request, the outcomes the rules select are there at 0: a series that
    // first appeared at 1 would not show in increase(), and its alert would miss it.
    for outcome in outcomes_the_rules_select() {
        let zero = format!("meshca_sign_requests_total{{outcome=\"{outcome}\"}} 0");
        assert!(fresh.contains(&zero), "{zero} missing from\n{fresh}");
    }
    let mut exported = exported_names(&fresh);
    let agent = AgentMetrics::new();
    agent.reconciled(
        "ns/request",
        Reconciled {
            outcome: "ok",
            installed: Some((SystemTime::now(), SystemTime::now())),
            signer: SignerContact::Answered,
            ends_with_root: Some(false),
            restart_timed_out: Some(false),
        },
    );
    agent.pass_completed(&["ns/request".into()], SystemTime::now());
    exported.extend(exported_names(&agent.render()));
    let mesh_controller = MeshControllerMetrics::new();
    mesh_controller.reconciled("ns/vm", MeshReconciled::Kept { ready: true });
    mesh_controller.member_credential("ns/mesh", Some(SystemTime::now()));
    exported.extend(exported_names(&mesh_controller.render()));

    let used = names_in_rules();
    assert!(used.len() >= 10, "too few names found: {used:?}");
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the alert rules use metrics nobody exports: {missing:?}\nexported: {exported:?}"
    );
    drop(signer);
}

/// The body of a `/metrics` answer, which must say it is OpenMetrics: prometheus-client
/// writes that format, and Prometheus parses a body by its Content-Type (as the older
/// text format, every counter would be untyped and without its HELP).
async fn openmetrics_body(client: &reqwest::Client, url: String) -> String {
    let answer = client.get(url).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    answer.text().await.unwrap()
}

/// promtool reads `body` as OpenMetrics (its strict parser: `# EOF`, each sample named
/// after its family's type). It backfills only samples with a timestamp, so each gets
/// the current time.
fn assert_promtool_reads_openmetrics(dir: &Path, name: &str, body: &str) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let stamped: String = body
        .lines()
        .map(|line| {
            if line.starts_with('#') || line.is_empty() {
                format!("{line}\n")
            } else {
                format!("{line} {now}\n")
            }
        })
        .collect();
    let file = write(dir, &format!("{name}.om"), &stamped);
    let blocks = dir.join(format!("{name}-blocks"));
    promtool(&[
        "tsdb",
        "create-blocks-from",
        "openmetrics",
        file.to_str().unwrap(),
        blocks.to_str().unwrap(),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_openmetrics() {
    let env = Env::new();
    let signer = env.start_signer();
    let body = openmetrics_body(&env.client("cluster-a"), signer.url("/metrics")).await;
    assert!(
        body.contains("# TYPE meshca_sign_requests counter"),
        "{body}"
    );
    assert_promtool_reads_openmetrics(env.dir.path(), "signer", &body);
    drop(signer);

    // The agents' and the mesh controller's endpoint (one server for both).
    let agent = Arc::new(AgentMetrics::new());
    agent.reconciled(
        "ns/request",
        Reconciled {
            outcome: "ok",
            installed: Some((SystemTime::now(), SystemTime::now())),
            signer: SignerContact::Answered,
            ends_with_root: Some(false),
            restart_timed_out: Some(false),
        },
    );
    let addr = meshca::agent::metrics::serve("127.0.0.1:0".parse().unwrap(), agent)
        .await
        .unwrap();
    // Plain HTTP; the test client has TLS set up, which plain requests leave aside.
    let body = openmetrics_body(&env.client("cluster-a"), format!("http://{addr}/metrics")).await;
    assert!(
        body.contains("# TYPE meshca_agent_reconciles counter"),
        "{body}"
    );
    assert_promtool_reads_openmetrics(env.dir.path(), "agent", &body);
}
