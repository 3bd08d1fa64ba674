//! The in-process API server against a real `kube::Client` and kube-runtime's watcher: list,
//! watch, re-list after `410 Expired`, reconnect after the server vanished, server-side apply of
//! status, conflicts and label selectors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use breakwater::kube::{ResiliencePolicy, ResiliencePolicyStatus};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use support::apiserver::ApiServer;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);
const API_VERSION: &str = "breakwater.io/v1alpha1";
const KIND: &str = "ResiliencePolicy";

fn policy(name: &str, namespace: &str, port: u16) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "listener": {"port": port},
            "backends": [{"name": "app", "url": "http://127.0.0.1:3000"}]
        }
    })
}

/// Runs a watcher over `default`'s policies and forwards every event as a short string
/// (`Init`, `InitApply(a)`, `InitDone`, `Apply(a:8080)`, `Delete(a)`).
fn watch_policies(server: &ApiServer) -> mpsc::UnboundedReceiver<String> {
    let api: Api<ResiliencePolicy> = Api::namespaced(server.client(), "default");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            let text = match event {
                Ok(Event::Init) => "Init".to_owned(),
                Ok(Event::InitApply(p)) => format!("InitApply({})", name_port(&p)),
                Ok(Event::InitDone) => "InitDone".to_owned(),
                Ok(Event::Apply(p)) => format!("Apply({})", name_port(&p)),
                Ok(Event::Delete(p)) => format!("Delete({})", p.metadata.name.unwrap_or_default()),
                // Errors while the server is paused are expected; the watcher backs off.
                Err(_) => continue,
            };
            if tx.send(text).is_err() {
                return;
            }
        }
    });
    rx
}

fn name_port(policy: &ResiliencePolicy) -> String {
    format!(
        "{}:{}",
        policy.metadata.name.as_deref().unwrap_or("?"),
        policy.spec.listener.port.unwrap_or(0)
    )
}

/// Collects events until `done` holds for the events seen so far; panics naming `what` on timeout.
async fn events_until(
    rx: &mut mpsc::UnboundedReceiver<String>,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        while !done(&seen) {
            match rx.recv().await {
                Some(event) => seen.push(event),
                None => break,
            }
        }
    })
    .await;
    assert!(
        result.is_ok() && done(&seen),
        "expected {what} within {WAIT:?}; events seen: {seen:?}"
    );
    seen
}

/// The watcher's view after replaying `events`: an `Init` … `InitDone` block replaces the whole
/// view (so deletes missed while disconnected are applied), as the sidecar index will do.
fn view(events: &[String]) -> BTreeMap<String, String> {
    let mut view = BTreeMap::new();
    let mut buffer: Option<BTreeMap<String, String>> = None;
    for event in events {
        let (verb, arg) = event
            .split_once('(')
            .map_or((event.as_str(), ""), |(v, a)| (v, a.trim_end_matches(')')));
        let (name, port) = arg.split_once(':').unwrap_or((arg, ""));
        match verb {
            "Init" => buffer = Some(BTreeMap::new()),
            "InitApply" => {
                buffer
                    .as_mut()
                    .expect("InitApply inside Init")
                    .insert(name.to_owned(), port.to_owned());
            }
            "InitDone" => view = buffer.take().expect("InitDone after Init"),
            "Apply" => {
                view.insert(name.to_owned(), port.to_owned());
            }
            "Delete" => {
                view.remove(name);
            }
            other => panic!("unexpected event {other}"),
        }
    }
    view
}

fn expected_view(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(n, p)| ((*n).to_owned(), (*p).to_owned()))
        .collect()
}

#[tokio::test]
async fn watcher_lists_then_sees_additions_changes_and_deletions() {
    let server = ApiServer::start().await;
    server.insert(policy("a", "default", 8080));
    server.insert(policy("b", "default", 8081));
    server.insert(policy("elsewhere", "other", 9000));
    let mut rx = watch_policies(&server);

    let initial = events_until(&mut rx, "the initial list", |e| {
        e.last().is_some_and(|l| l == "InitDone")
    })
    .await;
    assert_eq!(
        initial,
        ["Init", "InitApply(a:8080)", "InitApply(b:8081)", "InitDone"],
        "the initial list holds exactly the namespace's policies"
    );

    server.insert(policy("c", "default", 8082));
    server.insert(policy("a", "default", 9090));
    server.insert(policy("ignored", "other", 9001));
    assert!(server.delete(API_VERSION, KIND, "default", "b"));
    let live = events_until(&mut rx, "add, modify and delete events", |e| e.len() >= 3).await;
    assert_eq!(
        live,
        ["Apply(c:8082)", "Apply(a:9090)", "Delete(b)"],
        "live changes arrive in order, other namespaces filtered out"
    );
    let mut all = initial;
    all.extend(live);
    assert_eq!(view(&all), expected_view(&[("a", "9090"), ("c", "8082")]));
}

#[tokio::test]
async fn watcher_relists_after_410_and_applies_deletes_it_missed() {
    let server = ApiServer::start().await;
    server.insert(policy("a", "default", 8080));
    server.insert(policy("b", "default", 8081));
    let mut rx = watch_policies(&server);
    let mut all = events_until(&mut rx, "the initial list", |e| {
        e.last().is_some_and(|l| l == "InitDone")
    })
    .await;

    // The server vanishes; meanwhile b is deleted, c added, and the history compacted.
    server.pause();
    server.delete(API_VERSION, KIND, "default", "b");
    server.insert(policy("c", "default", 8082));
    server.expire_history();
    let watches_before = server.watch_count();
    server.resume();

    let relist = events_until(&mut rx, "a re-list after 410 Expired", |e| {
        e.iter().filter(|x| *x == "InitDone").count() >= 1
    })
    .await;
    assert_eq!(
        relist.first().map(String::as_str),
        Some("Init"),
        "the watcher must start over with a list, not resume: {relist:?}"
    );
    assert!(
        !relist.iter().any(|e| e == "Delete(b)"),
        "the delete happened while disconnected, so no Delete event exists: {relist:?}"
    );
    all.extend(relist);
    assert_eq!(
        view(&all),
        expected_view(&[("a", "8080"), ("c", "8082")]),
        "after the re-list the view equals the server's state, b gone"
    );
    assert!(
        support::eventually(WAIT, || async { server.watch_count() > watches_before }).await,
        "the watcher should reconnect after resume"
    );

    // And it keeps watching from the new list.
    server.insert(policy("d", "default", 8083));
    let next = events_until(&mut rx, "a live event after the re-list", |e| !e.is_empty()).await;
    assert_eq!(next, ["Apply(d:8083)"]);
}

#[tokio::test]
async fn a_cleanly_ended_stream_resumes_or_relists_by_resource_version() {
    let server = ApiServer::start().await;
    server.insert(policy("a", "default", 8080));
    let mut rx = watch_policies(&server);
    events_until(&mut rx, "the initial list", |e| {
        e.last().is_some_and(|l| l == "InitDone")
    })
    .await;

    // Ending the stream with history intact: the watcher resumes without a re-list.
    server.insert(policy("b", "default", 8081));
    events_until(&mut rx, "b", |e| e.iter().any(|x| x == "Apply(b:8081)")).await;
    let watches = server.watch_count();
    server.end_watches();
    server.insert(policy("c", "default", 8082));
    let resumed = events_until(&mut rx, "c after the re-watch", |e| !e.is_empty()).await;
    assert_eq!(
        resumed,
        ["Apply(c:8082)"],
        "a resumed watch replays, no re-list"
    );
    assert!(
        support::eventually(WAIT, || async { server.watch_count() > watches }).await,
        "the watcher should re-open its stream after it ended"
    );

    // A change the watcher never saw (another namespace), then compaction: its
    // resourceVersion is now too old, so the next watch is answered 410 and it re-lists.
    server.insert(policy("x", "other", 9000));
    server.expire_history();
    server.end_watches();
    let relist = events_until(&mut rx, "a re-list", |e| {
        e.last().is_some_and(|l| l == "InitDone")
    })
    .await;
    assert_eq!(
        relist,
        [
            "Init",
            "InitApply(a:8080)",
            "InitApply(b:8081)",
            "InitApply(c:8082)",
            "InitDone"
        ]
    );
}

#[tokio::test]
async fn server_side_apply_of_status_is_stored_merged_by_condition_type_and_logged() {
    let server = ApiServer::start().await;
    server.insert(policy("checkout", "default", 8080));
    let api: Api<ResiliencePolicy> = Api::default_namespaced(server.client());
    let params = PatchParams::apply("breakwater-operator").force();
    let status = |accepted: &str, reason: &str| {
        json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "status": {
                "observedGeneration": 1,
                "conditions": [{
                    "type": "Accepted", "status": accepted, "reason": reason, "message": "",
                    "lastTransitionTime": "2025-01-01T00:00:00Z"
                }],
                "backends": {"ready": 1, "total": 1}
            }
        })
    };
    api.patch_status("checkout", &params, &Patch::Apply(status("True", "Valid")))
        .await
        .expect("status apply");

    let stored = api.get_status("checkout").await.expect("get_status");
    let got: ResiliencePolicyStatus = stored.status.expect("status stored");
    assert_eq!(got.observed_generation, Some(1));
    assert_eq!(got.conditions.len(), 1);
    assert_eq!(got.conditions[0].type_, "Accepted");
    assert_eq!(got.conditions[0].status, "True");
    assert_eq!(
        got.backends.as_ref().map(|b| (b.ready, b.total)),
        Some((1, 1))
    );
    assert_eq!(
        stored.spec.listener.port,
        Some(8080),
        "a status apply leaves the spec alone"
    );

    // Another manager's condition merges in; re-applying Accepted replaces it by type.
    let other = json!({
        "apiVersion": API_VERSION, "kind": KIND,
        "status": {"conditions": [{
            "type": "ResolvedRefs", "status": "True", "reason": "Resolved", "message": "",
            "lastTransitionTime": "2025-01-01T00:00:00Z"
        }]}
    });
    api.patch_status(
        "checkout",
        &PatchParams::apply("another"),
        &Patch::Apply(other),
    )
    .await
    .expect("second manager");
    api.patch_status(
        "checkout",
        &params,
        &Patch::Apply(status("False", "Invalid")),
    )
    .await
    .expect("re-apply");
    let got = api.get_status("checkout").await.unwrap().status.unwrap();
    let conditions: Vec<(&str, &str)> = got
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str()))
        .collect();
    assert_eq!(
        conditions,
        [("Accepted", "False"), ("ResolvedRefs", "True")],
        "conditions merge by type"
    );

    let writes = server.status_writes();
    let managers: Vec<Option<&str>> = writes.iter().map(|w| w.field_manager.as_deref()).collect();
    assert_eq!(
        managers,
        [
            Some("breakwater-operator"),
            Some("another"),
            Some("breakwater-operator")
        ],
        "every status write is logged with its field manager"
    );
    assert!(
        writes
            .iter()
            .all(|w| w.content_type.as_deref() == Some("application/apply-patch+yaml")),
        "status writes are server-side applies: {writes:?}"
    );
    assert!(writes.iter().all(|w| w.status.is_success()));
}

#[tokio::test]
async fn crud_label_selectors_and_conflicts_through_a_typed_api() {
    let server = ApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "shop");
    let service = |name: &str, app: &str| -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap()
    };
    let created = api
        .create(&PostParams::default(), &service("payments", "pay"))
        .await
        .expect("create");
    api.create(&PostParams::default(), &service("orders", "orders"))
        .await
        .expect("create");
    let err = api
        .create(&PostParams::default(), &service("orders", "orders"))
        .await
        .expect_err("a second create of the same name conflicts");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "expected 409 AlreadyExists, got {err:?}"
    );

    let selected = api
        .list(&ListParams::default().labels("app=pay"))
        .await
        .unwrap();
    let names: Vec<_> = selected
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["payments"], "the label selector filters the list");

    // A replace carrying an old resourceVersion is a conflict; the current one succeeds.
    let mut stale = created.clone();
    api.patch(
        "payments",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "gold"}}})),
    )
    .await
    .expect("merge patch");
    stale.metadata.labels = Some([("app".to_owned(), "x".to_owned())].into());
    let err = api
        .replace("payments", &PostParams::default(), &stale)
        .await
        .expect_err("stale resourceVersion");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "expected 409 Conflict, got {err:?}"
    );
    let fresh = api.get("payments").await.unwrap();
    assert_eq!(
        fresh
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("tier"))
            .map(String::as_str),
        Some("gold"),
        "the merge patch was stored"
    );
    api.replace("payments", &PostParams::default(), &fresh)
        .await
        .expect("replace with the current resourceVersion");

    api.delete("orders", &Default::default())
        .await
        .expect("delete");
    let left = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(left.items.len(), 1, "one service left after the delete");
    assert!(
        server.get("v1", "Service", "shop", "orders").is_none(),
        "the delete reached the store"
    );
}
