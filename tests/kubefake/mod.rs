//! An HTTP fake of the Kubernetes API endpoints the mesh controller and the agent use, one
//! per cluster (axum on 127.0.0.1): objects by path, lists (namespaced and across
//! namespaces, with `k=v` and `k in (a,b)` label selectors, paged by `limit` and
//! `continue`, whose tokens a test can make expire), server-side apply (create,
//! merge of labels and annotations, `spec` replaced and `generation` bumped when it
//! changes, `metadata.finalizers` as a set of which meshca owns its own, other maps such as
//! a Secret's `data` merged key by key; refused 409 if it holds a resourceVersion the
//! object has moved on from), status apply, merge and strategic-merge patches of existing
//! objects (a workload's rolling restart), delete (404 when absent), create (409 if it
//! exists), replace with a resourceVersion check, and a writer racing in after a read.
//! It counts the requests in flight at once, and can hold writes until several have
//! arrived (a client's concurrency, seen without timing it). Every request is recorded with its Authorization header. Each fake serves one identity
//! whose RBAC, read from deploy/'s manifests ([`rbac::Policy`]), is applied as the API
//! server would (a request it does not grant is answered 403 Forbidden) and must grant
//! every request it receives, but those a test expects refused: checked when the fake is
//! dropped, at the end of its test.

#![allow(dead_code)]

pub mod rbac;

use futures::StreamExt as _;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub use rbac::Policy;

/// The finalizer meshca applies (the fake treats it as meshca's own in applies).
pub const FINALIZER: &str = "meshca.dev/mesh-controller";

const PLURALS: [&str; 14] = [
    "virtualmeshes",
    "meshes",
    "secrets",
    "leases",
    "virtualmeshcertificatesigningrequests",
    "services",
    "serviceentries",
    "gateways",
    "destinationrules",
    "namespaces",
    "deployments",
    "statefulsets",
    "daemonsets",
    "configmaps",
];

#[derive(Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub authorization: Option<String>,
    pub body: Value,
    /// A server-side apply of an object that did not exist (dry runs included): the API
    /// server authorizes it as create as well as patch.
    pub creates: bool,
}

impl Recorded {
    pub fn param(&self, key: &str) -> Option<String> {
        query_param(&self.query, key)
    }
}

/// Without what a failed assertion must not print: the bearer token, and a Secret's data
/// (a cacerts Secret's ca-key.pem, a member's kubeconfig).
impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("content_type", &self.content_type)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("body", &redacted(&self.body))
            .field("creates", &self.creates)
            .finish()
    }
}

/// `object` with the values of a Secret's `data` and `stringData` replaced, for messages.
pub fn redacted(object: &Value) -> Value {
    let mut object = object.clone();
    if object["kind"] == "Secret" {
        for field in ["data", "stringData"] {
            if let Some(data) = object.get_mut(field).and_then(Value::as_object_mut) {
                for value in data.values_mut() {
                    *value = "<redacted>".into();
                }
            }
        }
    }
    object
}

/// What differs between two Secrets, for a failed comparison: the keys of `data` and
/// `stringData` whose values differ (never the values), and any other field with both
/// sides.
pub fn secret_differences(actual: &Value, expected: &Value) -> Vec<String> {
    let fields = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut names = fields(actual);
    names.extend(fields(expected));
    names.sort();
    names.dedup();
    let mut differences = Vec::new();
    for name in names {
        let (a, e) = (&actual[&name], &expected[&name]);
        if a == e {
            continue;
        }
        if name == "data" || name == "stringData" {
            let mut keys = fields(a);
            keys.extend(fields(e));
            keys.sort();
            keys.dedup();
            differences.extend(
                keys.into_iter()
                    .filter(|k| a[k] != e[k])
                    .map(|k| format!("{name}.{k} differs")),
            );
        } else {
            differences.push(format!("{name}: {a} instead of {e}"));
        }
    }
    differences
}

#[derive(Default)]
struct Fake {
    /// What the identity calling this fake is granted: the rest is answered 403.
    policy: Policy,
    objects: Mutex<BTreeMap<String, Value>>,
    requests: Mutex<Vec<Recorded>>,
    /// Every request since the start (`requests` is emptied by `take`).
    log: Mutex<Vec<Recorded>>,
    version: Mutex<u64>,
    /// After serving a GET of this path, change the object's resourceVersion: another
    /// writer got in between.
    race_after_get: Mutex<Option<String>>,
    /// GETs of this path are answered this long after they were read: two readers
    /// then see the same version, as two clients racing do.
    slow_get_answers: Mutex<Option<(String, std::time::Duration)>>,
    /// Once, after serving a write of this path: another client's change of the objects.
    /// The path, how many of its writes still to let pass, and the change.
    after_write: Mutex<Option<(String, usize, AfterWrite)>>,
    /// Writes of this path get this status (code, reason, message): RBAC, an admission
    /// policy or an immutable object refusing them, dry runs included (or dry runs only).
    refused_writes: Mutex<Option<Refusal>>,
    /// GETs of this path get this status (code, reason, message): RBAC refusing a read.
    refused_reads: Mutex<Option<(String, u16, String, String)>>,
    /// The next this many lists given a continue token answer 410 Expired, as the API
    /// server does once etcd compacted the revision the token reads at.
    expire_continue_tokens: Mutex<usize>,
    /// Lists never end: every page carries a continue token, the one it was given (true)
    /// or a new one (false), as a broken or hostile API server might.
    endless_lists: Mutex<Option<bool>>,
    /// Lists answer with a body that never ends, as a broken or hostile API server might:
    /// every read gets data, so no timeout ends it.
    endless_answers: Mutex<bool>,
    /// Lists of this plural (`services`) answer their first page again and again, each
    /// with a new continue token: a list that never ends and never runs dry.
    repeated_pages: Mutex<Option<String>>,
    /// Requests being served now, and the most served at once since the start.
    in_flight: Mutex<(usize, usize)>,
    /// Writes of paths under a prefix wait here until enough have arrived.
    hold: Mutex<Option<Hold>>,
    /// Deployments whose rollout does not finish by itself (see
    /// [`FakeCluster::hold_rollout`]); the others' finishes as soon as it starts.
    held_rollouts: Mutex<BTreeSet<String>>,
    hold_opened: tokio::sync::Notify,
    /// Writes of this path, this many more, are done but answered 504 (see
    /// [`FakeCluster::lose_answers`]).
    lost_answers: Mutex<Option<(String, usize)>>,
}

/// Writes under `prefix` are held and let go in batches: each time `batch` more have
/// arrived, and the last ones once `total` have (or, should they never come, after
/// [`HOLD_FALLBACK`], from when on none is held).
struct Hold {
    prefix: String,
    batch: usize,
    total: usize,
    arrived: usize,
    open: bool,
}

/// How long a held write waits at most: only so that a client writing one at a time fails
/// its test's assertion instead of hanging it; nothing is asserted about time.
const HOLD_FALLBACK: std::time::Duration = std::time::Duration::from_secs(10);

/// One request counted in flight while it lives.
struct InFlight(Arc<Fake>);

impl InFlight {
    fn enter(fake: &Arc<Fake>) -> InFlight {
        let mut counts = fake.in_flight.lock().unwrap();
        counts.0 += 1;
        counts.1 = counts.1.max(counts.0);
        InFlight(fake.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.lock().unwrap().0 -= 1;
    }
}

type AfterWrite = Box<dyn FnOnce(&mut BTreeMap<String, Value>) + Send>;

impl Fake {
    /// The resourceVersion of the next write, as the API server counts them.
    fn next_version(&self) -> String {
        let mut v = self.version.lock().unwrap();
        *v += 1;
        v.to_string()
    }
}

#[derive(Clone)]
struct Refusal {
    path: String,
    /// Writes still let through before the refusals begin.
    let_pass: usize,
    /// Refusals still to make (None: every write from then on).
    times: Option<usize>,
    dry_runs_only: bool,
    code: u16,
    reason: String,
    message: String,
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "code": code, "message": message})),
    )
        .into_response()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// JSON merge (RFC 7386): what merge and strategic-merge patches of the fields meshca
/// patches (annotations, maps) amount to.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// `k=v` and `k in (a,b)` terms joined by commas (all meshca sends).
fn matches_selector(labels: &Value, selector: &str) -> bool {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once('=') {
                labels[k.trim()] == v.trim()
            } else if let Some((k, set)) = term.split_once(" in ") {
                let set = set.trim().trim_start_matches('(').trim_end_matches(')');
                set.split(',').any(|v| labels[k.trim()] == v.trim())
            } else {
                panic!("selector term {term:?} not understood by the fake")
            }
        })
}

/// Whether `key` (an object path) is an item of the collection at `path`: directly below
/// it, or, for a list across namespaces (`/api/v1/services`), below any namespace.
fn in_collection(key: &str, path: &str) -> bool {
    if let Some(rest) = key.strip_prefix(&format!("{path}/")) {
        return !rest.contains('/');
    }
    if path.contains("/namespaces/") {
        return false;
    }
    let (prefix, plural) = path.rsplit_once('/').unwrap();
    let Some(rest) = key.strip_prefix(&format!("{prefix}/namespaces/")) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    parts.len() == 3 && parts[1] == plural
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&fake);
    if method != Method::GET {
        hold(&fake, uri.path()).await;
    }
    // A dry run writes nothing: no other client acts after it.
    let dry_run = query_param(uri.query().unwrap_or_default(), "dryRun").is_some();
    let wrote = (method != Method::GET && !dry_run).then(|| uri.path().to_string());
    let slow = match &*fake.slow_get_answers.lock().unwrap() {
        Some((path, delay)) if method == Method::GET && uri.path() == path => Some(*delay),
        _ => None,
    };
    let mut response = serve(fake.clone(), method, uri, headers, body);
    if let Some(path) = &wrote
        && let Some((lost, left)) = fake.lost_answers.lock().unwrap().as_mut()
        && lost == path
        && *left > 0
    {
        *left -= 1;
        response = status(504, "Timeout", "the answer was lost on its way back");
    }
    if let Some(delay) = slow {
        tokio::time::sleep(delay).await;
    }
    if let Some(path) = wrote {
        let mut hook = fake.after_write.lock().unwrap();
        if let Some((after, to_pass, _)) = hook.as_mut()
            && *after == path
        {
            if *to_pass > 0 {
                *to_pass -= 1;
            } else if let Some((_, _, change)) = hook.take() {
                change(&mut fake.objects.lock().unwrap());
            }
        }
    }
    response
}

/// Waits while writes of `path` are held (see [`Hold`]).
async fn hold(fake: &Fake, path: &str) {
    // Created before the check: it sees a notify_waiters that comes after it.
    let opened = fake.hold_opened.notified();
    {
        let mut hold = fake.hold.lock().unwrap();
        let Some(hold) = hold
            .as_mut()
            .filter(|h| !h.open && path.starts_with(&h.prefix))
        else {
            return;
        };
        hold.arrived += 1;
        if hold.arrived % hold.batch == 0 || hold.arrived >= hold.total {
            fake.hold_opened.notify_waiters();
            return;
        }
    }
    if tokio::time::timeout(HOLD_FALLBACK, opened).await.is_err()
        && let Some(hold) = fake.hold.lock().unwrap().as_mut()
    {
        hold.open = true;
        fake.hold_opened.notify_waiters();
    }
}

fn serve(fake: Arc<Fake>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let content_type = header("content-type").unwrap_or_default();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).expect("meshca sends JSON bodies")
    };
    let creates = method == Method::PATCH
        && content_type.starts_with("application/apply-patch")
        && !path.ends_with("/status")
        && !fake.objects.lock().unwrap().contains_key(&path);
    let recorded = Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        authorization: header("authorization"),
        body: body.clone(),
        creates,
    };
    let refused = rbac::accesses(&recorded)
        .into_iter()
        .find(|a| !fake.policy.allows(a));
    fake.log.lock().unwrap().push(recorded.clone());
    fake.requests.lock().unwrap().push(recorded);
    if let Some(access) = refused {
        // RBAC is checked before anything else, as by the API server.
        return status(403, "Forbidden", &fake.policy.forbidden_message(&access));
    }
    if method == Method::GET
        && let Some((refused, code, reason, message)) = &*fake.refused_reads.lock().unwrap()
        && *refused == path
    {
        return status(*code, reason, message);
    }
    let dry_run = query_param(&query, "dryRun").as_deref() == Some("All");
    if method != Method::GET
        && let Some(refusal) = fake.refused_writes.lock().unwrap().as_mut()
        && refusal.path == path
        && (dry_run || !refusal.dry_runs_only)
    {
        if refusal.let_pass > 0 {
            refusal.let_pass -= 1;
        } else if refusal.times != Some(0) {
            refusal.times = refusal.times.map(|left| left - 1);
            return status(refusal.code, &refusal.reason, &refusal.message);
        }
    }
    let mut objects = fake.objects.lock().unwrap();
    if method != Method::GET && dry_run {
        // A dry run is answered as if done, and changes nothing; its preconditions (a
        // create of what exists, an apply holding an old resourceVersion) fail as the
        // write would.
        let exists = |name: &str| objects.contains_key(&format!("{path}/{name}"));
        if method == Method::POST && body["metadata"]["name"].as_str().is_some_and(exists) {
            return status(409, "AlreadyExists", "exists");
        }
        let held = body["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if method == Method::PATCH
            && !held.is_empty()
            && objects.get(&path).is_some_and(|current| {
                current["metadata"]["resourceVersion"].as_str() != Some(held)
            })
        {
            return status(409, "Conflict", "the object has been modified");
        }
        return axum::Json(body).into_response();
    }
    let last = path.rsplit('/').next().unwrap_or_default();
    match method {
        Method::GET => {
            if let Some(obj) = objects.get_mut(&path) {
                let served = obj.clone();
                if fake.race_after_get.lock().unwrap().as_deref() == Some(path.as_str()) {
                    obj["metadata"]["resourceVersion"] = "changed-by-another-writer".into();
                }
                return axum::Json(served).into_response();
            }
            if PLURALS.contains(&last) && *fake.endless_answers.lock().unwrap() {
                let opening = futures::stream::once(async {
                    Ok::<_, std::convert::Infallible>(Bytes::from_static(
                        b"{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [",
                    ))
                });
                let padding =
                    futures::stream::repeat_with(|| Ok(Bytes::from_static(&[b' '; 64 * 1024])));
                return axum::body::Body::from_stream(opening.chain(padding)).into_response();
            }
            if PLURALS.contains(&last) {
                let selector = query_param(&query, "labelSelector").unwrap_or_default();
                // The continue token is the path of the last item served (the API server's
                // is opaque): the next page starts after it, in path order.
                let repeated = fake.repeated_pages.lock().unwrap().as_deref() == Some(last);
                let after = query_param(&query, "continue").filter(|_| !repeated);
                if after.is_some() {
                    let mut expire = fake.expire_continue_tokens.lock().unwrap();
                    if *expire > 0 {
                        *expire -= 1;
                        return status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                        );
                    }
                }
                let mut items: Vec<(&String, &Value)> = objects
                    .iter()
                    .filter(|(k, _)| in_collection(k, &path))
                    .filter(|(k, _)| after.as_deref().is_none_or(|a| k.as_str() > a))
                    .filter(|(_, v)| matches_selector(&v["metadata"]["labels"], &selector))
                    .collect();
                let mut metadata = json!({"resourceVersion": "1"});
                let limit = query_param(&query, "limit").and_then(|l| l.parse::<usize>().ok());
                if let Some(limit) = limit.filter(|l| *l > 0 && items.len() > *l) {
                    metadata["remainingItemCount"] = (items.len() - limit).into();
                    items.truncate(limit);
                    metadata["continue"] = items[limit - 1].0.clone().into();
                }
                if repeated {
                    let served = fake.requests.lock().unwrap().len();
                    metadata["continue"] = format!("page-{served}").into();
                }
                if let Some(same) = *fake.endless_lists.lock().unwrap() {
                    let served = fake.requests.lock().unwrap().len();
                    metadata["continue"] = match (same, after.as_deref()) {
                        (true, Some(given)) => given.to_string(),
                        _ => format!("page-{served}"),
                    }
                    .into();
                }
                let items: Vec<Value> = items.into_iter().map(|(_, v)| v.clone()).collect();
                return axum::Json(json!({"apiVersion": "v1", "kind": "List",
                    "metadata": metadata, "items": items}))
                .into_response();
            }
            status(404, "NotFound", &format!("{path} not found"))
        }
        Method::POST => {
            let name = body["metadata"]["name"].as_str().unwrap().to_string();
            let key = format!("{path}/{name}");
            if objects.contains_key(&key) {
                return status(409, "AlreadyExists", "exists");
            }
            let mut obj = body;
            obj["metadata"]["resourceVersion"] = fake.next_version().into();
            objects.insert(key, obj.clone());
            (StatusCode::CREATED, axum::Json(obj)).into_response()
        }
        Method::PUT => {
            let Some(current) = objects.get(&path) else {
                return status(404, "NotFound", "no such object");
            };
            if current["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                return status(409, "Conflict", "the object has been modified");
            }
            let mut obj = body;
            obj["metadata"]["resourceVersion"] = fake.next_version().into();
            objects.insert(path, obj.clone());
            axum::Json(obj).into_response()
        }
        Method::PATCH => {
            if content_type.starts_with("application/merge-patch+json")
                || content_type.starts_with("application/strategic-merge-patch+json")
            {
                // Patches change what exists (a Deployment's pod template annotations).
                let version = fake.next_version();
                let Some(obj) = objects.get_mut(&path) else {
                    return status(404, "NotFound", "no such object");
                };
                let spec = obj["spec"].clone();
                merge(obj, &body);
                if obj["spec"] != spec {
                    let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
                    obj["metadata"]["generation"] = (generation + 1).into();
                    // The deployment controller, done at once unless held.
                    if path.contains("/deployments/")
                        && !fake.held_rollouts.lock().unwrap().contains(&path)
                    {
                        roll_out(obj);
                    }
                }
                obj["metadata"]["resourceVersion"] = version.into();
                return axum::Json(obj.clone()).into_response();
            }
            if !content_type.starts_with("application/apply-patch") {
                return status(
                    415,
                    "UnsupportedMediaType",
                    "the fake serves apply, merge and strategic-merge patches only",
                );
            }
            if let Some(base) = path.strip_suffix("/status") {
                let Some(obj) = objects.get_mut(base) else {
                    return status(404, "NotFound", "no such object");
                };
                obj["status"] = body["status"].clone();
                return axum::Json(obj.clone()).into_response();
            }
            let version = fake.next_version();
            // An apply that holds a resourceVersion is refused if the object moved on
            // (a missing object is created, as by the API server).
            let held = body["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if let Some(current) = objects.get(&path)
                && !held.is_empty()
                && current["metadata"]["resourceVersion"].as_str() != Some(held)
            {
                return status(
                    409,
                    "Conflict",
                    "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            let Some(obj) = objects.get_mut(&path) else {
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = version.into();
                obj["metadata"]["generation"] = 1.into();
                obj["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z".into();
                objects.insert(path, obj.clone());
                return (StatusCode::CREATED, axum::Json(obj)).into_response();
            };
            let applied = body.as_object().unwrap();
            for (key, value) in applied {
                match key.as_str() {
                    "metadata" => {
                        for map in ["labels", "annotations"] {
                            if let Some(entries) = value.get(map).and_then(Value::as_object) {
                                for (k, v) in entries {
                                    obj["metadata"][map][k] = v.clone();
                                }
                            }
                        }
                        // Finalizers are a set: meshca's own follows the apply, others stay.
                        let mut finalizers: Vec<Value> = obj["metadata"]["finalizers"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|f| f != FINALIZER)
                            .collect();
                        finalizers
                            .extend(value["finalizers"].as_array().cloned().unwrap_or_default());
                        obj["metadata"]["finalizers"] = Value::Array(finalizers);
                    }
                    "spec" => {
                        if obj["spec"] != *value {
                            let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
                            obj["metadata"]["generation"] = (generation + 1).into();
                            obj["spec"] = value.clone();
                        }
                    }
                    "apiVersion" | "kind" => {}
                    // A map (a Secret's data) keeps the keys this apply does not name.
                    other => merge(&mut obj[other], value),
                }
            }
            obj["metadata"]["resourceVersion"] = version.into();
            let result = obj.clone();
            let released = !obj["metadata"]["deletionTimestamp"].is_null()
                && obj["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty());
            if released {
                objects.remove(&path);
            }
            axum::Json(result).into_response()
        }
        Method::DELETE => match objects.remove(&path) {
            Some(_) => axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Success", "code": 200}))
            .into_response(),
            None => status(404, "NotFound", &format!("{path} not found")),
        },
        _ => status(405, "MethodNotAllowed", "not in the fake"),
    }
}

/// A Deployment's status once its rollout is done: every pod of its current generation,
/// available (its replicas default to 1).
pub fn roll_out(deployment: &mut Value) {
    let replicas = deployment["spec"]["replicas"].as_i64().unwrap_or(1);
    deployment["status"] = json!({
        "observedGeneration": deployment["metadata"]["generation"].as_i64().unwrap_or(0),
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
    });
}

/// One fake API server, serving one identity.
pub struct FakeCluster {
    fake: Arc<Fake>,
    pub addr: std::net::SocketAddr,
    /// What the identity calling this fake is granted.
    policy: Policy,
    /// Paths whose refusal by RBAC the test expects (see [`FakeCluster::expect_forbidden`]).
    forbidden_expected: Mutex<Vec<String>>,
}

/// At the end of a test (not one already failing), every request the fake received must
/// have been granted by its policy, but those the test expects refused: the controllers
/// call nothing their manifests lack.
impl Drop for FakeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let expected = self.forbidden_expected.lock().unwrap().clone();
        let requests: Vec<Recorded> = self
            .all_requests()
            .into_iter()
            .filter(|r| !expected.contains(&r.path))
            .collect();
        let denied = self.policy.denied(&requests);
        assert!(
            denied.is_empty(),
            "requests the deploy/ RBAC does not grant (add them to the rbac.yaml, or stop making them):\n{}",
            denied.join("\n")
        );
    }
}

impl FakeCluster {
    /// A fake for a client granted `policy` (see [`rbac::Policy::bound_to`]).
    pub async fn start(policy: Policy) -> FakeCluster {
        let fake = Arc::new(Fake {
            policy: policy.clone(),
            ..Fake::default()
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeCluster {
            fake,
            addr,
            policy,
            forbidden_expected: Mutex::new(Vec::new()),
        }
    }

    /// Requests of `path` the policy does not grant are what the test is about: they are
    /// answered 403 as any other, and not a failure at the end.
    pub fn expect_forbidden(&self, path: &str) {
        self.forbidden_expected.lock().unwrap().push(path.into());
    }

    /// Every request received since the start.
    pub fn all_requests(&self) -> Vec<Recorded> {
        self.fake.log.lock().unwrap().clone()
    }

    /// Every grant of the fake's policy was needed by a request since the start, but
    /// `unexercised`: (grant as [`rbac::Policy::unused`] names it, why no test can use it),
    /// each of which must indeed be unused.
    pub fn assert_every_grant_used(&self, unexercised: &[(&str, &str)]) {
        let unused = self.policy.unused(&self.all_requests());
        let expected: Vec<&str> = unexercised.iter().map(|(grant, _)| *grant).collect();
        assert_eq!(
            unused, expected,
            "grants of deploy/'s RBAC no request needed (remove them from the rbac.yaml), or listed as unexercised but used"
        );
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with no credentials (the controller's own cluster).
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(kube::Config::new(self.url().parse().unwrap())).unwrap()
    }

    /// A kubeconfig for this cluster with a bearer token.
    pub fn kubeconfig(&self, token: &str) -> String {
        kubeconfig(&self.url(), token)
    }

    /// Stores an object as given (a test that needs its resourceVersion sets one).
    pub fn put(&self, path: &str, obj: Value) {
        self.fake
            .objects
            .lock()
            .unwrap()
            .insert(path.to_string(), obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.fake.objects.lock().unwrap().get(path).cloned()
    }

    /// Deletes an object (as another client would).
    pub fn remove(&self, path: &str) {
        self.fake.objects.lock().unwrap().remove(path);
    }

    /// Changes an object in place (as another client would: it gets a new
    /// resourceVersion).
    /// The Deployment at `path` rolls out only once [`FakeCluster::finish_rollout`] says
    /// so: its status stays what it was, behind its generation, as while new pods start.
    pub fn hold_rollout(&self, path: &str) {
        self.fake.held_rollouts.lock().unwrap().insert(path.into());
    }

    /// The Deployment at `path` finishes its rollout, and rolls out at once from now on.
    pub fn finish_rollout(&self, path: &str) {
        self.fake.held_rollouts.lock().unwrap().remove(path);
        self.edit(path, roll_out);
    }

    pub fn edit(&self, path: &str, change: impl FnOnce(&mut Value)) {
        let version = self.fake.next_version();
        let mut objects = self.fake.objects.lock().unwrap();
        let obj = objects
            .get_mut(path)
            .unwrap_or_else(|| panic!("{path} missing"));
        change(obj);
        obj["metadata"]["resourceVersion"] = version.into();
    }

    /// Paths of the objects stored under `prefix`.
    pub fn paths(&self, prefix: &str) -> Vec<String> {
        self.fake
            .objects
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The requests received since the last call.
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.fake.requests.lock().unwrap())
    }

    /// From now on, every GET of `path` is followed by another writer changing the
    /// object's resourceVersion (None: no more).
    pub fn race_after_get(&self, path: Option<&str>) {
        *self.fake.race_after_get.lock().unwrap() = path.map(String::from);
    }

    /// From now on, GETs of `path` are answered `delay` after the object was read.
    pub fn slow_get_answers(&self, path: &str, delay: std::time::Duration) {
        *self.fake.slow_get_answers.lock().unwrap() = Some((path.into(), delay));
    }

    /// Once, right after the next write (PUT, PATCH, POST, DELETE) of `path` is served,
    /// `change` edits the objects: another client acting at that moment.
    pub fn after_write(
        &self,
        path: &str,
        change: impl FnOnce(&mut BTreeMap<String, Value>) + Send + 'static,
    ) {
        self.after_nth_write(path, 1, change);
    }

    /// From now on, writes of `path` (dry runs included) are refused with this status.
    pub fn refuse_writes(&self, path: &str, code: u16, reason: &str, message: &str) {
        self.refuse_writes_after(path, 0, code, reason, message);
    }

    /// As [`FakeCluster::refuse_writes`], once `n` more writes of `path` have gone through.
    pub fn refuse_writes_after(
        &self,
        path: &str,
        n: usize,
        code: u16,
        reason: &str,
        message: &str,
    ) {
        self.refuse(path, n, false, (code, reason, message));
    }

    /// As [`FakeCluster::refuse_writes_after`], `times` writes only: an API server failing
    /// for a moment.
    pub fn refuse_writes_between(
        &self,
        path: &str,
        n: usize,
        times: usize,
        answer: (u16, &str, &str),
    ) {
        self.refuse(path, n, false, answer);
        if let Some(refusal) = self.fake.refused_writes.lock().unwrap().as_mut() {
            refusal.times = Some(times);
        }
    }

    /// From now on, dry runs of writes of `path` are refused with this status.
    pub fn refuse_dry_runs(&self, path: &str, code: u16, reason: &str, message: &str) {
        self.refuse(path, 0, true, (code, reason, message));
    }

    /// From now on, GETs of `path` are refused with this status (None: served again).
    pub fn refuse_reads(&self, refusal: Option<(&str, u16, &str, &str)>) {
        *self.fake.refused_reads.lock().unwrap() = refusal.map(|(path, code, reason, message)| {
            (path.into(), code, reason.into(), message.into())
        });
    }

    /// From now on every list page carries a continue token: the one given (`same`) or a
    /// new one each time (None: lists end again).
    pub fn endless_lists(&self, same: Option<bool>) {
        *self.fake.endless_lists.lock().unwrap() = same;
    }

    /// From now on lists answer with a body that never ends (false: they end again).
    pub fn endless_answers(&self, endless: bool) {
        *self.fake.endless_answers.lock().unwrap() = endless;
    }

    /// From now on lists of `plural` answer their first page again and again, each with a
    /// new continue token (None: they end again).
    pub fn repeated_pages(&self, plural: Option<&str>) {
        *self.fake.repeated_pages.lock().unwrap() = plural.map(String::from);
    }

    /// The next `n` lists given a continue token are answered 410 Expired.
    pub fn expire_continue_tokens(&self, n: usize) {
        *self.fake.expire_continue_tokens.lock().unwrap() = n;
    }

    /// The most requests this fake served at once since the start.
    pub fn max_in_flight(&self) -> usize {
        self.fake.in_flight.lock().unwrap().1
    }

    /// From now on, writes of paths under `prefix`, `total` of them expected, are let go
    /// in batches of `batch`: each waits until the batch it is in has arrived (they are
    /// then in flight at once), the last one until all `total` have.
    pub fn hold_writes(&self, prefix: &str, batch: usize, total: usize) {
        *self.fake.hold.lock().unwrap() = Some(Hold {
            prefix: prefix.into(),
            batch: batch.max(1),
            total,
            arrived: 0,
            open: false,
        });
    }

    /// The next `times` writes of `path` (dry runs aside) are done, but answered 504: a
    /// write that landed whose answer the client never saw.
    pub fn lose_answers(&self, path: &str, times: usize) {
        *self.fake.lost_answers.lock().unwrap() = Some((path.into(), times));
    }

    /// Lets every write through again.
    pub fn accept_writes(&self) {
        *self.fake.refused_writes.lock().unwrap() = None;
    }

    fn refuse(&self, path: &str, let_pass: usize, dry_runs_only: bool, answer: (u16, &str, &str)) {
        let (code, reason, message) = answer;
        *self.fake.refused_writes.lock().unwrap() = Some(Refusal {
            path: path.into(),
            let_pass,
            times: None,
            dry_runs_only,
            code,
            reason: reason.into(),
            message: message.into(),
        });
    }

    /// As [`FakeCluster::after_write`], after the `n`th write of `path` from now.
    pub fn after_nth_write(
        &self,
        path: &str,
        n: usize,
        change: impl FnOnce(&mut BTreeMap<String, Value>) + Send + 'static,
    ) {
        *self.fake.after_write.lock().unwrap() =
            Some((path.to_string(), n.saturating_sub(1), Box::new(change)));
    }
}

pub fn kubeconfig(server: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: member\nclusters:\n- name: member\n  cluster:\n    server: {server}\ncontexts:\n- name: member\n  context:\n    cluster: member\n    user: controller\nusers:\n- name: controller\n  user:\n    token: {token}\n"
    )
}

/// (method, path) of every request that is not a GET.
pub fn writes(requests: &[Recorded]) -> Vec<(String, String)> {
    requests
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect()
}
