//! An in-process Kubernetes API server for controller tests: a real `kube::Client` talks to it
//! over a loopback socket.
//!
//! It keeps a generic object store keyed by (group/version/plural, namespace, name) with one
//! global, monotonically increasing resourceVersion, and speaks what kube-runtime's watcher and
//! kube's `Api` send: LIST (label selectors), WATCH (newline-delimited events, replay from a
//! recent resourceVersion, `410 Expired` as an ERROR event once the history is gone), GET,
//! POST, PUT (resourceVersion conflicts), DELETE and PATCH (server-side apply, merge patch).
//! Tests drive it through [`ApiServer::insert`] / [`ApiServer::delete`], force re-lists with
//! [`ApiServer::expire_history`], cut it off with [`ApiServer::pause`], and read the request log.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

/// Events kept for watches that resume from an older resourceVersion.
const HISTORY: usize = 512;

/// The resources the server knows: (apiVersion, plural, kind, namespaced).
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    (
        "breakwater.io/v1alpha1",
        "resiliencepolicies",
        "ResiliencePolicy",
        true,
    ),
    (
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    ("v1", "services", "Service", true),
    ("v1", "pods", "Pod", true),
    ("v1", "events", "Event", true),
    ("events.k8s.io/v1", "events", "Event", true),
    ("coordination.k8s.io/v1", "leases", "Lease", true),
    ("v1", "namespaces", "Namespace", false),
];

/// One request the server answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Request path.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// `content-type`, if any.
    pub content_type: Option<String>,
    /// `fieldManager` query parameter, if any.
    pub field_manager: Option<String>,
    /// `user-agent`, if any (tests tell clients apart by it; see [`ApiServer::client_as`]).
    pub user_agent: Option<String>,
    /// Answer status.
    pub status: StatusCode,
}

impl Recorded {
    /// True for a write to a `/status` subresource.
    pub fn is_status_write(&self) -> bool {
        self.path.ends_with("/status") && self.method != Method::GET
    }

    /// True for a WATCH request.
    pub fn is_watch(&self) -> bool {
        self.query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1")
    }
}

/// A running test API server.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change in the store, as kept in the history and sent to live watches.
#[derive(Debug)]
struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    kind: EventType,
    old: Option<Value>,
    new: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches from a resourceVersion below this one have missed events: 410.
    compacted: u64,
    objects: BTreeMap<(String, String, String), Value>,
    history: VecDeque<Arc<Change>>,
}

struct State {
    store: Mutex<Store>,
    changes: broadcast::Sender<Arc<Change>>,
    paused: watch::Sender<bool>,
    /// Bumped to end every open watch stream cleanly.
    watch_epoch: watch::Sender<u64>,
    log: Mutex<Vec<Recorded>>,
}

/// What a request is about, parsed from its path.
struct Target {
    resource: String,
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

type Body = BoxBody<Bytes, Infallible>;

impl ApiServer {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub async fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind apiserver");
        let addr = listener.local_addr().expect("apiserver addr");
        let (changes, _) = broadcast::channel(1024);
        let state = Arc::new(State {
            store: Mutex::new(Store::default()),
            changes,
            paused: watch::Sender::new(false),
            watch_epoch: watch::Sender::new(0),
            log: Mutex::new(Vec::new()),
        });
        let accept_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if *accept_state.paused.borrow() {
                    // The server "is gone": the connection closes without an answer.
                    drop(stream);
                    continue;
                }
                let state = Arc::clone(&accept_state);
                tokio::spawn(async move {
                    let mut paused = state.paused.subscribe();
                    let service_state = Arc::clone(&state);
                    let service = service_fn(move |req: Request<Incoming>| {
                        let state = Arc::clone(&service_state);
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        // Dropping the connection closes the socket mid-whatever.
                        _ = until_paused(&mut paused) => {}
                    }
                });
            }
        });
        ApiServer { addr, state, task }
    }

    /// A `kube::Client` for this server, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        let uri = format!("http://{}", self.addr).parse().expect("server uri");
        let config = kube::Config::new(uri);
        kube::Client::try_from(config).expect("kube client")
    }

    /// A `kube::Client` for this server whose requests carry `user-agent: {user_agent}`, so
    /// the request log tells several clients apart.
    pub fn client_as(&self, user_agent: &str) -> kube::Client {
        let uri = format!("http://{}", self.addr).parse().expect("server uri");
        let mut config = kube::Config::new(uri);
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_str(user_agent).expect("user agent"),
        ));
        kube::Client::try_from(config).expect("kube client")
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.state.store).rv
    }

    /// Creates or replaces an object given with `apiVersion`, `kind` and `metadata.name`
    /// (namespace `default` when absent for namespaced kinds); returns the stored object.
    pub fn insert(&self, object: Value) -> Value {
        let (resource, namespaced) =
            resource_of(&object).expect("insert: apiVersion/kind the server knows");
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let namespace = if namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let mut object = object;
        if namespaced {
            object["metadata"]["namespace"] = json!(namespace);
        }
        let key = (resource, namespace, name);
        let mut store = lock(&self.state.store);
        let old = store.objects.get(&key).cloned();
        let object = prepare_write(old.as_ref(), object);
        commit(&self.state, &mut store, key, old, Some(object.clone()));
        object
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let (resource, namespaced) =
            resource_of(&json!({"apiVersion": api_version, "kind": kind})).expect("known kind");
        let namespace = if namespaced { namespace } else { "" };
        let key = (resource, namespace.to_owned(), name.to_owned());
        let mut store = lock(&self.state.store);
        let Some(old) = store.objects.get(&key).cloned() else {
            return false;
        };
        commit(&self.state, &mut store, key, Some(old), None);
        true
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let (resource, namespaced) =
            resource_of(&json!({"apiVersion": api_version, "kind": kind}))?;
        let namespace = if namespaced { namespace } else { "" };
        lock(&self.state.store)
            .objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Forgets the event history: a watch resuming from any resourceVersion older than the
    /// current one gets `410 Expired` and has to re-list.
    pub fn expire_history(&self) {
        let mut store = lock(&self.state.store);
        store.history.clear();
        store.compacted = store.rv;
    }

    /// Ends every open watch stream cleanly (as the API server does at `timeoutSeconds`).
    pub fn end_watches(&self) {
        self.state.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Simulates the API server vanishing: open connections (and so watch streams) are cut,
    /// new connections are closed unanswered, until [`ApiServer::resume`].
    pub fn pause(&self) {
        self.state.paused.send_replace(true);
    }

    /// Serves again after [`ApiServer::pause`].
    pub fn resume(&self) {
        self.state.paused.send_replace(false);
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.log).clone()
    }

    /// Writes to `/status` subresources, with the field manager of each.
    pub fn status_writes(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(Recorded::is_status_write)
            .collect()
    }

    /// WATCH requests answered so far.
    pub fn watch_count(&self) -> usize {
        self.requests().iter().filter(|r| r.is_watch()).count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        self.state.paused.send_replace(true);
    }
}

/// Resolves once the server is paused (the `Ref` that `wait_for` returns is not `Send`).
async fn until_paused(paused: &mut watch::Receiver<bool>) {
    let _ = paused.wait_for(|p| *p).await.map(|_| ());
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn resource_of(object: &Value) -> Option<(String, bool)> {
    let api_version = object["apiVersion"].as_str()?;
    let kind = object["kind"].as_str()?;
    RESOURCES
        .iter()
        .find(|(v, _, k, _)| *v == api_version && *k == kind)
        .map(|(v, plural, _, namespaced)| (format!("{v}/{plural}"), *namespaced))
}

fn parse_target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some((*ns).to_owned()), {
            let mut v = vec![*plural];
            v.extend_from_slice(rest);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some(*sub)),
        _ => return None,
    };
    let (_, _, kind, _) = RESOURCES
        .iter()
        .find(|(v, p, _, _)| *v == api_version && *p == plural)?;
    Some(Target {
        resource: format!("{api_version}/{plural}"),
        api_version,
        kind: (*kind).to_owned(),
        namespace,
        name,
        status: sub == Some("status"),
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters; tolerates the empty pair of kube's `?&...`.
fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

/// Equality- and existence-based label selector terms: `k=v`, `k==v`, `k!=v`, `k`, `!k`.
fn selector_matches(selector: Option<&str>, object: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &object["metadata"]["labels"];
    selector.split(',').map(str::trim).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k.trim()].as_str() == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k.trim()).is_none()
        } else {
            labels.get(term).is_some()
        }
    })
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("response")
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()
        }),
    )
}

/// Stamps server-owned metadata on an object about to be stored over `old`.
fn prepare_write(old: Option<&Value>, mut object: Value) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let created = old
        .and_then(|o| {
            o["metadata"]["creationTimestamp"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| {
            k8s_openapi::jiff::Timestamp::from_second(now)
                .map(|t| t.to_string())
                .unwrap_or_default()
        });
    let uid = old
        .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("uid-{:016x}", rand::random::<u64>()));
    let generation = match old {
        None => 1,
        Some(old) => {
            let previous = old["metadata"]["generation"].as_i64().unwrap_or(1);
            if old.get("spec") != object.get("spec") {
                previous + 1
            } else {
                previous
            }
        }
    };
    let metadata = object["metadata"].as_object_mut().expect("metadata object");
    metadata.insert("creationTimestamp".into(), json!(created));
    metadata.insert("uid".into(), json!(uid));
    metadata.insert("generation".into(), json!(generation));
    if let Some(managed) = old.and_then(|o| o["metadata"].get("managedFields")) {
        metadata
            .entry("managedFields")
            .or_insert_with(|| managed.clone());
    }
    object
}

/// Stores (or deletes, with `new == None`) one object under a fresh resourceVersion and
/// publishes the change. Called with the store locked, so watchers see changes in order.
fn commit(
    state: &State,
    store: &mut Store,
    key: (String, String, String),
    old: Option<Value>,
    new: Option<Value>,
) -> Value {
    store.rv += 1;
    let rv = store.rv;
    let (kind, mut object) = match (&old, new) {
        (_, Some(new)) => (
            if old.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            },
            new,
        ),
        (Some(old), None) => (EventType::Deleted, old.clone()),
        (None, None) => unreachable!("nothing to commit"),
    };
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    if kind == EventType::Deleted {
        store.objects.remove(&key);
    } else {
        store.objects.insert(key.clone(), object.clone());
    }
    let change = Arc::new(Change {
        rv,
        resource: key.0,
        namespace: key.1,
        kind,
        old,
        new: object.clone(),
    });
    store.history.push_back(Arc::clone(&change));
    while store.history.len() > HISTORY {
        if let Some(dropped) = store.history.pop_front() {
            store.compacted = dropped.rv;
        }
    }
    // No receivers is fine: nobody is watching.
    let _ = state.changes.send(change);
    object
}

/// The event line a watch with this filter sends for `change`, if any. An object that starts
/// or stops matching the label selector is ADDED or DELETED for that watch, as the real API
/// server does.
fn event_for(change: &Change, target: &Target, selector: Option<&str>) -> Option<Bytes> {
    if change.resource != target.resource {
        return None;
    }
    if let Some(ns) = &target.namespace {
        if &change.namespace != ns {
            return None;
        }
    }
    let was = change
        .old
        .as_ref()
        .is_some_and(|o| selector_matches(selector, o));
    let is = selector_matches(selector, &change.new);
    let kind = match (change.kind, was, is) {
        (EventType::Added, _, true) => "ADDED",
        (EventType::Modified, true, true) => "MODIFIED",
        (EventType::Modified, false, true) => "ADDED",
        (EventType::Modified, true, false) | (EventType::Deleted, true, _) => "DELETED",
        _ => return None,
    };
    let mut line = json!({"type": kind, "object": change.new}).to_string();
    line.push('\n');
    Some(Bytes::from(line))
}

async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let user_agent = req
        .headers()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let params = query_params(&query);
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let response = route(
        state,
        &method,
        &path,
        &params,
        content_type.as_deref(),
        &body,
    );
    lock(&state.log).push(Recorded {
        method,
        path,
        query,
        content_type,
        field_manager: params.get("fieldManager").cloned(),
        user_agent,
        status: response.status(),
    });
    response
}

fn route(
    state: &Arc<State>,
    method: &Method,
    path: &str,
    params: &BTreeMap<String, String>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Response<Body> {
    let Some(target) = parse_target(path) else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route {path}"),
        );
    };
    let selector = params.get("labelSelector").map(String::as_str);
    match (method, &target.name) {
        (&Method::GET, None) if params.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(state, target, params)
        }
        (&Method::GET, None) => list(state, &target, selector),
        (&Method::GET, Some(name)) => {
            let store = lock(&state.store);
            match store.objects.get(&key(&target, name)) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(&target, name),
            }
        }
        (&Method::POST, None) => create(state, &target, body),
        (&Method::PUT, Some(name)) => replace(state, &target, name, body),
        (&Method::DELETE, Some(name)) => {
            let mut store = lock(&state.store);
            let key = key(&target, name);
            match store.objects.get(&key).cloned() {
                Some(old) => {
                    let deleted = commit(state, &mut store, key, Some(old), None);
                    json_response(StatusCode::OK, &deleted)
                }
                None => not_found(&target, name),
            }
        }
        (&Method::PATCH, Some(name)) => patch(state, &target, name, params, content_type, body),
        _ => status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{method} {path} is not supported"),
        ),
    }
}

fn key(target: &Target, name: &str) -> (String, String, String) {
    (
        target.resource.clone(),
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    )
}

fn not_found(target: &Target, name: &str) -> Response<Body> {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", target.resource),
    )
}

fn list(state: &State, target: &Target, selector: Option<&str>) -> Response<Body> {
    let store = lock(&state.store);
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((resource, ns, _), object)| {
            *resource == target.resource
                && target.namespace.as_ref().is_none_or(|t| t == ns)
                && selector_matches(selector, object)
        })
        .map(|(_, object)| object)
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": target.api_version,
            "kind": format!("{}List", target.kind),
            "metadata": {"resourceVersion": store.rv.to_string(), "continue": ""},
            "items": items,
        }),
    )
}

fn watch(state: &Arc<State>, target: Target, params: &BTreeMap<String, String>) -> Response<Body> {
    let selector = params.get("labelSelector").cloned();
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut replay = Vec::new();
    let mut live;
    {
        // Replay and subscription happen under one lock, so no change falls between them.
        let store = lock(&state.store);
        let from: Option<u64> = params
            .get("resourceVersion")
            .filter(|rv| !rv.is_empty() && *rv != "0")
            .and_then(|rv| rv.parse().ok());
        match from {
            Some(rv) if rv < store.compacted => {
                let expired = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {rv} ({})", store.compacted),
                    "reason": "Expired", "code": 410
                }});
                let body = Bytes::from(format!("{expired}\n"));
                return Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Full::new(body).boxed())
                    .expect("response");
            }
            Some(rv) => {
                for change in store.history.iter().filter(|c| c.rv > rv) {
                    replay.extend(event_for(change, &target, selector.as_deref()));
                }
            }
            // No resourceVersion: the current state as ADDED events, then changes.
            None => {
                for ((resource, ns, _), object) in &store.objects {
                    let in_scope = *resource == target.resource
                        && target.namespace.as_ref().is_none_or(|t| t == ns);
                    if in_scope && selector_matches(selector.as_deref(), object) {
                        replay.push(Bytes::from(format!(
                            "{}\n",
                            json!({"type": "ADDED", "object": object})
                        )));
                    }
                }
            }
        }
        live = state.changes.subscribe();
    }
    let mut epoch = state.watch_epoch.subscribe();
    epoch.mark_unchanged();
    let mut paused = state.paused.subscribe();
    tokio::spawn(async move {
        for line in replay {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            // Biased: a stream told to end must not slip in one more event first.
            tokio::select! {
                biased;
                _ = &mut deadline => break,
                _ = epoch.changed() => break,
                _ = until_paused(&mut paused) => break,
                _ = tx.closed() => break,
                change = live.recv() => match change {
                    Ok(change) => {
                        if let Some(line) = event_for(&change, &target, selector.as_deref()) {
                            if tx.send(line).await.is_err() {
                                break;
                            }
                        }
                    }
                    // Lagged or closed: end the stream; the client re-watches from its last
                    // resourceVersion and the history replays what it missed.
                    Err(_) => break,
                },
            }
        }
    });
    let events = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(events)))
        .expect("response")
}

fn parse_body(body: &Bytes) -> Result<Value, Box<Response<Body>>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("body is not JSON: {e}"),
        ))
    })
}

fn create(state: &State, target: &Target, body: &Bytes) -> Response<Body> {
    let mut object = match parse_body(body) {
        Ok(object) => object,
        Err(response) => return *response,
    };
    let name = match object["metadata"]["name"].as_str() {
        Some(name) => name.to_owned(),
        None => match object["metadata"]["generateName"].as_str() {
            Some(prefix) => format!("{prefix}{:05x}", rand::random::<u32>() & 0xfffff),
            None => {
                return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "name required");
            }
        },
    };
    object["metadata"]["name"] = json!(name);
    object["apiVersion"] = json!(target.api_version);
    object["kind"] = json!(target.kind);
    if let Some(ns) = &target.namespace {
        object["metadata"]["namespace"] = json!(ns);
    }
    let key = key(target, &name);
    let mut store = lock(&state.store);
    if store.objects.contains_key(&key) {
        return status_error(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", target.resource),
        );
    }
    let object = prepare_write(None, object);
    let stored = commit(state, &mut store, key, None, Some(object));
    json_response(StatusCode::CREATED, &stored)
}

fn replace(state: &State, target: &Target, name: &str, body: &Bytes) -> Response<Body> {
    let mut object = match parse_body(body) {
        Ok(object) => object,
        Err(response) => return *response,
    };
    let key = key(target, name);
    let mut store = lock(&state.store);
    let Some(old) = store.objects.get(&key).cloned() else {
        return not_found(target, name);
    };
    if let Some(rv) = object["metadata"]["resourceVersion"].as_str() {
        if Some(rv) != old["metadata"]["resourceVersion"].as_str() {
            return status_error(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    target.resource
                ),
            );
        }
    }
    // The status subresource changes only status; the main resource never changes status.
    let merged = if target.status {
        let mut merged = old.clone();
        merged["status"] = object["status"].take();
        merged
    } else {
        object["status"] = old.get("status").cloned().unwrap_or(Value::Null);
        if object["status"].is_null() {
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
        }
        object
    };
    let merged = prepare_write(Some(&old), merged);
    let stored = commit(state, &mut store, key, Some(old), Some(merged));
    json_response(StatusCode::OK, &stored)
}

fn patch(
    state: &State,
    target: &Target,
    name: &str,
    params: &BTreeMap<String, String>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Response<Body> {
    let patch = match parse_body(body) {
        Ok(patch) => patch,
        Err(response) => return *response,
    };
    let apply = match content_type.map(|c| c.split(';').next().unwrap_or(c).trim()) {
        Some("application/apply-patch+yaml") => true,
        Some("application/merge-patch+json" | "application/strategic-merge-patch+json") => false,
        other => {
            return status_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("patch type {other:?} is not supported"),
            );
        }
    };
    let manager = params.get("fieldManager").cloned();
    if apply && manager.is_none() {
        return status_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "fieldManager is required for apply patch",
        );
    }
    let key = key(target, name);
    let mut store = lock(&state.store);
    let old = store.objects.get(&key).cloned();
    let mut object = match (&old, apply && !target.status) {
        (Some(old), _) => old.clone(),
        // Apply creates what does not exist yet (not through /status).
        (None, true) => json!({
            "apiVersion": target.api_version, "kind": target.kind,
            "metadata": {"name": name, "namespace": target.namespace},
        }),
        (None, false) => return not_found(target, name),
    };
    let scope = if target.status { "status" } else { "" };
    let mut patch = patch;
    if let Some(map) = patch.as_object_mut() {
        // apiVersion/kind are required in an apply body but are not fields to merge.
        map.remove("apiVersion");
        map.remove("kind");
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
            meta.remove("managedFields");
        }
    }
    if target.status {
        let status_patch = patch.get("status").cloned().unwrap_or(Value::Null);
        let mut status = object.get("status").cloned().unwrap_or_else(|| json!({}));
        merge(&mut status, &status_patch, apply);
        object["status"] = status;
    } else {
        if let Some(map) = patch.as_object_mut() {
            map.remove("status");
        }
        merge(&mut object, &patch, apply);
    }
    if let Some(manager) = &manager {
        record_manager(
            &mut object,
            manager,
            if apply { "Apply" } else { "Update" },
            scope,
        );
    }
    let object = prepare_write(old.as_ref(), object);
    let stored = commit(state, &mut store, key, old, Some(object));
    json_response(StatusCode::OK, &stored)
}

/// RFC 7386 merge; with `apply`, lists of objects with a `type` or `name` key merge by that key
/// (what `x-kubernetes-list-type: map` asks of server-side apply) instead of being replaced.
fn merge(target: &mut Value, patch: &Value, apply: bool) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    target.remove(k);
                } else {
                    merge(target.entry(k.clone()).or_insert(Value::Null), v, apply);
                }
            }
        }
        (Value::Array(target), Value::Array(patch)) if apply && list_map_key(patch).is_some() => {
            let key = list_map_key(patch).unwrap_or("type");
            for item in patch {
                match target.iter_mut().find(|t| t[key] == item[key]) {
                    Some(existing) => *existing = item.clone(),
                    None => target.push(item.clone()),
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn list_map_key(items: &[Value]) -> Option<&'static str> {
    ["type", "name"].into_iter().find(|k| {
        !items.is_empty()
            && items
                .iter()
                .all(|i| i.get(*k).is_some_and(Value::is_string))
    })
}

fn record_manager(object: &mut Value, manager: &str, operation: &str, subresource: &str) {
    let entry = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": object["apiVersion"],
        "fieldsType": "FieldsV1",
        "subresource": subresource,
    });
    let managed = object["metadata"]
        .as_object_mut()
        .map(|m| m.entry("managedFields").or_insert_with(|| json!([])));
    if let Some(Value::Array(list)) = managed {
        list.retain(|e| {
            !(e["manager"] == manager
                && e["operation"] == operation
                && e["subresource"] == subresource)
        });
        list.push(entry);
    }
}
