//! `breakwater operator` end to end against the in-process API server: status conditions and
//! backend counts, transitions, Service resolution, Events, the admin endpoints, and two
//! replicas sharing one Lease.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use breakwater::kube::lease::LeaseOptions;
use breakwater::kube::operator::{self, FIELD_MANAGER, OperatorOptions, RunningOperator};
use breakwater::kube::{ResiliencePolicy, ResiliencePolicyStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use support::apiserver::ApiServer;
use support::{eventually, get, metric_value};

const WAIT: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(2);
const API_VERSION: &str = "breakwater.io/v1alpha1";
const KIND: &str = "ResiliencePolicy";

fn options(identity: &str, lease: Duration) -> OperatorOptions {
    let mut options = OperatorOptions::new(identity, "default");
    options.admin_addr = "127.0.0.1:0".parse().unwrap();
    options.lease = LeaseOptions {
        duration: lease,
        ..options.lease
    };
    options.retry_delay = Duration::from_millis(200);
    options
}

/// Starts an operator whose requests carry `user-agent: {identity}`.
async fn start(server: &ApiServer, identity: &str, lease: Duration) -> RunningOperator {
    operator::start(server.client_as(identity), options(identity, lease))
        .await
        .expect("operator starts")
}

async fn until_leading(op: &RunningOperator, who: &str) {
    assert!(
        eventually(WAIT, || async { op.is_leader() }).await,
        "{who} should acquire the free lease within {WAIT:?}"
    );
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80}]}
    })
}

fn endpoint_slice(service: &str, ready: &[bool]) -> Value {
    let endpoints: Vec<Value> = ready
        .iter()
        .enumerate()
        .map(|(i, r)| json!({"addresses": [format!("10.1.0.{}", i + 1)], "conditions": {"ready": r}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-x1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn stored(server: &ApiServer, name: &str) -> Value {
    server
        .get(API_VERSION, KIND, "default", name)
        .unwrap_or_else(|| panic!("policy {name} should exist"))
}

fn status_of(server: &ApiServer, name: &str) -> Option<ResiliencePolicyStatus> {
    let status = stored(server, name).get("status").cloned()?;
    serde_json::from_value(status).ok()
}

fn condition(status: &ResiliencePolicyStatus, type_: &str) -> Option<Condition> {
    status.conditions.iter().find(|c| c.type_ == type_).cloned()
}

/// Waits until `name`'s condition `type_` has `status`, and returns the whole status.
async fn until_condition(
    server: &ApiServer,
    name: &str,
    type_: &str,
    status: &str,
) -> ResiliencePolicyStatus {
    let ok = eventually(WAIT, || async {
        status_of(server, name)
            .and_then(|s| condition(&s, type_))
            .is_some_and(|c| c.status == status)
    })
    .await;
    assert!(
        ok,
        "{name} should get {type_}={status} within {WAIT:?}; status is {:#?}",
        stored(server, name).get("status")
    );
    status_of(server, name).unwrap()
}

fn status_writes_for(server: &ApiServer, name: &str) -> Vec<support::apiserver::Recorded> {
    let suffix = format!("/resiliencepolicies/{name}/status");
    server
        .status_writes()
        .into_iter()
        .filter(|r| r.path.ends_with(&suffix))
        .collect()
}

async fn merge_spec(server: &ApiServer, name: &str, spec: Value) {
    let api: Api<ResiliencePolicy> = Api::namespaced(server.client(), "default");
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": spec})),
    )
    .await
    .expect("merge patch of the spec");
}

/// Condition times are whole seconds: wait for the next one so a flip is visible.
async fn next_second() {
    let now = k8s_openapi::jiff::Timestamp::now();
    let into = now.subsec_nanosecond();
    tokio::time::sleep(Duration::from_nanos(
        1_000_000_000 - into as u64 + 10_000_000,
    ))
    .await;
}

#[tokio::test]
async fn a_valid_policy_with_ready_endpoints_is_accepted_with_counts_and_written_once() {
    let server = ApiServer::start().await;
    server.insert(service("payments"));
    server.insert(endpoint_slice("payments", &[true, false, true]));
    server.insert(policy(
        "checkout",
        json!({"backends": [
            {"name": "payments", "service": {"name": "payments", "port": "http"}},
            {"name": "local", "url": "http://127.0.0.1:3000"},
        ]}),
    ));
    let op = start(&server, "op-a", LEASE).await;

    let status = until_condition(&server, "checkout", "Accepted", "True").await;
    let generation = stored(&server, "checkout")["metadata"]["generation"].as_i64();
    assert_eq!(
        status.observed_generation, generation,
        "status.observedGeneration"
    );
    let refs = condition(&status, "ResolvedRefs").expect("ResolvedRefs is written with Accepted");
    assert_eq!(refs.status, "True", "the Service exists: {refs:?}");
    for c in &status.conditions {
        assert_eq!(
            c.observed_generation, generation,
            "{}.observedGeneration",
            c.type_
        );
    }
    let backends = status.backends.expect("status.backends");
    assert_eq!(
        (backends.ready, backends.total),
        (2, 2),
        "both backends have a ready endpoint"
    );
    let payments = backends
        .per_backend
        .iter()
        .find(|b| b.name == "payments")
        .unwrap();
    assert_eq!(
        (payments.ready_endpoints, payments.endpoints),
        (2, 3),
        "two of the three endpoints are ready"
    );

    // One write, by server-side apply with the one field manager, and no more after it: the
    // watch event the write causes finds the status already right.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = status_writes_for(&server, "checkout");
    assert_eq!(
        writes.len(),
        1,
        "exactly one status write expected: {writes:#?}"
    );
    assert_eq!(writes[0].field_manager.as_deref(), Some(FIELD_MANAGER));
    assert_eq!(
        writes[0].content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert!(
        writes[0].query.contains("force=true"),
        "{:?}",
        writes[0].query
    );

    // Events for the two conditions appearing.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(server.client(), "default");
    let listed = events
        .list(&ListParams::default())
        .await
        .expect("list events");
    let reasons: Vec<_> = listed
        .items
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(
        reasons.contains(&"Valid".to_owned()) && reasons.contains(&"Resolved".to_owned()),
        "an Event per condition transition expected, got reasons {reasons:?}"
    );

    // The admin server.
    let admin = format!("http://{}", op.admin_addr());
    assert_eq!(
        get(&format!("{admin}/ready")).await.status,
        200,
        "/ready after sync"
    );
    assert_eq!(get(&format!("{admin}/health")).await.status, 200, "/health");
    let metrics = get(&format!("{admin}/metrics")).await.text();
    assert_eq!(
        metric_value(&metrics, "operator_leader"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "operator_status_writes_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "operator_policies{accepted=\"true\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "operator_reconciles_total{result=\"written\"}") == Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_invalid_policy_is_rejected_with_the_field_path_and_a_fix_flips_it() {
    let server = ApiServer::start().await;
    server.insert(policy(
        "bad",
        json!({"backends": [{"name": "a", "url": "http://127.0.0.1:3000"}],
               "timeouts": {"connect": "banana"}}),
    ));
    let _op = start(&server, "op-a", LEASE).await;

    let rejected = until_condition(&server, "bad", "Accepted", "False").await;
    let accepted = condition(&rejected, "Accepted").unwrap();
    assert_eq!(accepted.reason, "Invalid");
    assert!(
        accepted
            .message
            .contains("spec.timeouts.connect: invalid duration \"banana\""),
        "the message should name the field path, got {:?}",
        accepted.message
    );
    assert_eq!(rejected.observed_generation, Some(1));
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(server.client(), "default");
    assert!(
        eventually(WAIT, || async {
            events.list(&ListParams::default()).await.is_ok_and(|l| {
                l.items.iter().any(|e| {
                    e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("Invalid")
                })
            })
        })
        .await,
        "a Warning event with reason Invalid expected"
    );

    next_second().await;
    merge_spec(&server, "bad", json!({"timeouts": {"connect": "1s"}})).await;
    let fixed = until_condition(&server, "bad", "Accepted", "True").await;
    let flipped = condition(&fixed, "Accepted").unwrap();
    assert!(
        flipped.last_transition_time.0 > accepted.last_transition_time.0,
        "lastTransitionTime should move on the flip: {:?} then {:?}",
        accepted.last_transition_time,
        flipped.last_transition_time
    );
    assert_eq!(fixed.observed_generation, Some(2));
    assert_eq!(flipped.observed_generation, Some(2));
    let refs_before = condition(&rejected, "ResolvedRefs").unwrap();
    assert_eq!(
        condition(&fixed, "ResolvedRefs")
            .unwrap()
            .last_transition_time,
        refs_before.last_transition_time,
        "ResolvedRefs did not flip, so its lastTransitionTime stays"
    );

    // An unrelated change: a new generation is observed, no condition flips.
    next_second().await;
    merge_spec(&server, "bad", json!({"timeouts": {"request": "20s"}})).await;
    assert!(
        eventually(WAIT, || async {
            status_of(&server, "bad").is_some_and(|s| s.observed_generation == Some(3))
        })
        .await,
        "observedGeneration 3 expected after the re-apply"
    );
    let again = status_of(&server, "bad").unwrap();
    assert_eq!(
        condition(&again, "Accepted").unwrap().last_transition_time,
        flipped.last_transition_time,
        "an unrelated re-apply must not move lastTransitionTime"
    );
    assert_eq!(
        condition(&again, "Accepted").unwrap().observed_generation,
        Some(3)
    );
}

#[tokio::test]
async fn a_missing_service_does_not_resolve_until_it_and_its_endpoints_exist() {
    let server = ApiServer::start().await;
    server.insert(policy(
        "orders",
        json!({"backends": [{"name": "db", "service": {"name": "orders-db", "port": 80}}]}),
    ));
    let _op = start(&server, "op-a", LEASE).await;

    let missing = until_condition(&server, "orders", "ResolvedRefs", "False").await;
    let refs = condition(&missing, "ResolvedRefs").unwrap();
    assert_eq!(refs.reason, "ServiceNotFound");
    assert!(
        refs.message.contains("spec.backends[0].service")
            && refs.message.contains("default/orders-db"),
        "the message should name the backend path and the Service: {:?}",
        refs.message
    );
    assert_eq!(
        condition(&missing, "Accepted").map(|c| c.status),
        Some("True".to_owned()),
        "a missing Service does not make the spec invalid"
    );
    let backends = missing.backends.unwrap();
    assert_eq!((backends.ready, backends.total), (0, 1));

    server.insert(service("orders-db"));
    server.insert(endpoint_slice("orders-db", &[true]));
    let resolved = until_condition(&server, "orders", "ResolvedRefs", "True").await;
    assert!(
        eventually(WAIT, || async {
            status_of(&server, "orders")
                .and_then(|s| s.backends)
                .is_some_and(|b| b.ready == 1 && b.per_backend[0].ready_endpoints == 1)
        })
        .await,
        "the new endpoint should be counted ready; status {resolved:#?}"
    );

    // The endpoint turning not-ready is counted too.
    server.insert(endpoint_slice("orders-db", &[false]));
    assert!(
        eventually(WAIT, || async {
            status_of(&server, "orders")
                .and_then(|s| s.backends)
                .is_some_and(|b| b.ready == 0 && b.per_backend[0].endpoints == 1)
        })
        .await,
        "a not-ready endpoint should leave the backend with 0 ready endpoints"
    );
}

#[tokio::test]
async fn two_operators_only_the_leader_writes_and_a_dead_leader_is_replaced_within_the_lease() {
    let server = ApiServer::start().await;
    server.insert(policy(
        "one",
        json!({"backends": [{"name": "a", "url": "http://127.0.0.1:3000"}]}),
    ));
    let a = start(&server, "op-a", LEASE).await;
    until_leading(&a, "op-a").await;
    let b = start(&server, "op-b", LEASE).await;
    assert!(
        eventually(WAIT, || async { b.is_synced() }).await,
        "op-b should sync its caches (it watches while following)"
    );
    until_condition(&server, "one", "Accepted", "True").await;
    server.insert(policy(
        "two",
        json!({"backends": [{"name": "a", "url": "ftp://nope"}]}),
    ));
    until_condition(&server, "two", "Accepted", "False").await;
    assert!(!b.is_leader(), "op-b must not lead while op-a renews");
    let before: Vec<_> = server.status_writes();
    assert!(
        before
            .iter()
            .all(|w| w.user_agent.as_deref() == Some("op-a")),
        "only the leader op-a may write status: {:?}",
        before.iter().map(|w| &w.user_agent).collect::<Vec<_>>()
    );
    let b_metrics = get(&format!("http://{}/metrics", b.admin_addr()))
        .await
        .text();
    assert_eq!(metric_value(&b_metrics, "operator_leader"), Some(0.0));
    // The follower derives every policy's status (warm, ready to take over) without writing it.
    assert!(
        eventually(WAIT, || async {
            let m = get(&format!("http://{}/metrics", b.admin_addr()))
                .await
                .text();
            metric_value(&m, "operator_policies{accepted=\"true\"}") == Some(1.0)
                && metric_value(&m, "operator_policies{accepted=\"false\"}") == Some(1.0)
        })
        .await,
        "op-b should count one accepted and one rejected policy: {b_metrics}"
    );
    assert_eq!(
        metric_value(&b_metrics, "operator_status_writes_total"),
        Some(0.0)
    );

    // The leader dies without releasing the lease.
    let killed = tokio::time::Instant::now();
    drop(a);
    assert!(
        eventually(WAIT, || async { b.is_leader() }).await,
        "op-b should take over after the leader died"
    );
    let handover = killed.elapsed();
    eprintln!("handover after the leader died: {handover:?} (lease {LEASE:?})");
    assert!(
        handover <= LEASE + Duration::from_secs(1),
        "handover should happen within the lease duration ({LEASE:?}) plus polling, took {handover:?}"
    );
    let lease = server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "default",
            operator::LEASE_NAME,
        )
        .expect("the lease exists");
    assert_eq!(lease["spec"]["holderIdentity"], "op-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // The new leader writes status for a policy changed after the handover.
    merge_spec(&server, "one", json!({"timeouts": {"connect": "banana"}})).await;
    until_condition(&server, "one", "Accepted", "False").await;
    let writes = server.status_writes();
    let agents: Vec<_> = writes
        .iter()
        .map(|w| w.user_agent.clone().unwrap_or_default())
        .collect();
    let first_b = agents
        .iter()
        .position(|a| a == "op-b")
        .expect("op-b wrote status");
    assert!(
        agents[..first_b].iter().all(|a| a == "op-a")
            && agents[first_b..].iter().all(|a| a == "op-b"),
        "one writer at a time: op-a's writes, then only op-b's, got {agents:?}"
    );
    assert!(
        first_b >= before.len(),
        "op-b wrote nothing before the handover"
    );
}

#[tokio::test]
async fn a_shut_down_leader_releases_the_lease_for_an_immediate_handover() {
    let server = ApiServer::start().await;
    let long = Duration::from_secs(30);
    let a = start(&server, "op-a", long).await;
    until_leading(&a, "op-a").await;
    let b = start(&server, "op-b", long).await;
    assert!(
        eventually(WAIT, || async { b.is_synced() }).await,
        "op-b syncs"
    );
    let released = tokio::time::Instant::now();
    a.shutdown().await;
    assert!(
        eventually(WAIT, || async { b.is_leader() }).await,
        "op-b should take the released lease"
    );
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "a released lease is taken at the next poll, not after the {long:?} lease; took {:?}",
        released.elapsed()
    );
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_leading_when_its_lease_runs_out() {
    let server = ApiServer::start().await;
    let a = start(&server, "op-a", LEASE).await;
    until_leading(&a, "op-a").await;
    server.pause();
    let cut = tokio::time::Instant::now();
    assert!(
        eventually(WAIT, || async { !a.is_leader() }).await,
        "op-a should stop leading once it cannot renew"
    );
    assert!(
        cut.elapsed() <= LEASE + Duration::from_millis(500),
        "leadership must end by the lease duration ({LEASE:?}) after the last renewal; took {:?}",
        cut.elapsed()
    );
    server.resume();
    assert!(
        eventually(WAIT, || async { a.is_leader() }).await,
        "op-a should lead again once the API server is back (the lease is still its own)"
    );
}

#[tokio::test]
async fn electors_racing_for_one_lease_never_lead_together() {
    use breakwater::kube::lease::LeaseElector;
    let server = ApiServer::start().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut views = Vec::new();
    for identity in ["e-1", "e-2", "e-3"] {
        let options = LeaseOptions {
            name: "race".to_owned(),
            namespace: "default".to_owned(),
            identity: identity.to_owned(),
            duration: Duration::from_secs(1),
        };
        let (elector, leadership) = LeaseElector::new(server.client_as(identity), options);
        tokio::spawn(elector.run(stop.clone()));
        views.push(leadership);
    }
    assert!(
        eventually(WAIT, || async { views.iter().any(|v| v.is_leader()) }).await,
        "one of three electors should win a free lease"
    );
    // Sample for three lease durations: never two leaders at once.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let leaders = views.iter().filter(|v| v.is_leader()).count();
        assert!(
            leaders <= 1,
            "at most one leader at any time, saw {leaders}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
}
