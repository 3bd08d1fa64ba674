//! Which addresses of a Service's EndpointSlices take traffic.
//!
//! The rules, in order:
//! - **Port.** A port *name* in the policy (`service: {port: http}`) matches the EndpointSlice
//!   port of that name. A port *number* matches the EndpointSlice port with that number: slices
//!   carry target (container) ports, so a number names the port the pods listen on, not the
//!   Service's front port; refer to a Service port whose target differs by its name. No port
//!   takes the slice's only port. Ports are resolved per slice (slices of one Service may differ).
//! - **Addresses.** `IPv4` and `IPv6` slices only (`FQDN` slices are skipped); every address of
//!   every endpoint is one endpoint of the backend.
//! - **Conditions.** Endpoints with `ready` (an absent `ready` counts as ready, as Kubernetes
//!   says) take traffic. Only when none is ready do endpoints that are `serving` and
//!   `terminating` take it, so a draining Service still answers. Everything else gets no new
//!   requests; requests already in flight to an endpoint that leaves the set still finish,
//!   because the endpoint's state and pool live as long as those requests hold them.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};

use crate::config::compile::ServicePort;

/// The addresses that should take traffic for `port` of a Service whose slices are `slices`,
/// sorted and without duplicates.
pub fn resolve<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: &ServicePort,
) -> Vec<SocketAddr> {
    let mut ready = Vec::new();
    let mut draining = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let Some(number) = slice_port(slice.ports.as_deref().unwrap_or_default(), port) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(is_ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let target = if is_ready {
                &mut ready
            } else if serving && terminating {
                &mut draining
            } else {
                continue;
            };
            target.extend(
                endpoint
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, number)),
            );
        }
    }
    let mut chosen = if ready.is_empty() { draining } else { ready };
    chosen.sort();
    chosen.dedup();
    chosen
}

/// How many ready endpoints (pods) a Service's slices list, each counted once however many
/// slices or addresses name it: the replicas that share a Service-scoped rate limit.
pub fn ready_count<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for slice in slices {
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if ready {
                // One pod may appear in an IPv4 and an IPv6 slice: its target ref names it in
                // both; without one, its first address stands in.
                let identity = endpoint
                    .target_ref
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .or_else(|| endpoint.addresses.first().cloned());
                if let Some(identity) = identity {
                    seen.insert(identity);
                }
            }
        }
    }
    seen.len()
}

/// The port number `port` refers to in one slice, if any.
fn slice_port(ports: &[EndpointPort], port: &ServicePort) -> Option<u16> {
    let number = |p: &EndpointPort| p.port.and_then(|n| u16::try_from(n).ok());
    match port {
        ServicePort::Name(name) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(number),
        ServicePort::Number(wanted) => ports.iter().filter_map(number).find(|n| n == wanted),
        ServicePort::Only => match ports {
            [only] => number(only),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    fn endpoint(ip: &str, ready: Option<bool>, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_owned()],
            conditions: Some(EndpointConditions {
                ready,
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            ..Endpoint::default()
        }
    }

    fn slice(ports: &[(Option<&str>, i32)], endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".to_owned(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: name.map(str::to_owned),
                        port: Some(*port),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            ..EndpointSlice::default()
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn ready_endpoints_take_traffic_and_absent_ready_counts_as_ready() {
        let mut unknown = endpoint("10.0.0.3", None, true, false);
        unknown.conditions = None;
        let s = slice(
            &[(Some("http"), 8080)],
            vec![
                endpoint("10.0.0.2", Some(true), true, false),
                endpoint("10.0.0.1", Some(false), false, false),
                unknown,
                endpoint("10.0.0.4", Some(false), true, true),
            ],
        );
        assert_eq!(
            resolve([&s], &ServicePort::Name("http".into())),
            addrs(&["10.0.0.2:8080", "10.0.0.3:8080"]),
            "ready and unknown-ready endpoints only; the terminating one is not used while others are ready"
        );
    }

    #[test]
    fn serving_terminating_endpoints_are_used_only_when_nothing_is_ready() {
        let s = slice(
            &[(None, 80)],
            vec![
                endpoint("10.0.0.1", Some(false), true, true),
                endpoint("10.0.0.2", Some(false), false, true),
                endpoint("10.0.0.3", Some(false), false, false),
            ],
        );
        assert_eq!(resolve([&s], &ServicePort::Only), addrs(&["10.0.0.1:80"]));
    }

    #[test]
    fn ports_resolve_by_name_by_number_or_as_the_only_port_per_slice() {
        let a = slice(
            &[(Some("http"), 8080), (Some("admin"), 9000)],
            vec![endpoint("10.0.0.1", Some(true), true, false)],
        );
        let b = slice(
            &[(Some("http"), 8081)],
            vec![endpoint("10.0.0.2", Some(true), true, false)],
        );
        assert_eq!(
            resolve([&a, &b], &ServicePort::Name("http".into())),
            addrs(&["10.0.0.1:8080", "10.0.0.2:8081"])
        );
        assert_eq!(
            resolve([&a, &b], &ServicePort::Number(9000)),
            addrs(&["10.0.0.1:9000"])
        );
        assert_eq!(
            resolve([&a, &b], &ServicePort::Only),
            addrs(&["10.0.0.2:8081"]),
            "a slice with two ports has no 'only' port"
        );
        assert!(resolve([&a], &ServicePort::Name("grpc".into())).is_empty());
    }

    #[test]
    fn fqdn_slices_and_unparsable_addresses_are_skipped_and_duplicates_merged() {
        let mut fqdn = slice(
            &[(None, 80)],
            vec![endpoint("db.example", Some(true), true, false)],
        );
        fqdn.address_type = "FQDN".to_owned();
        let twice = slice(
            &[(None, 80)],
            vec![
                endpoint("10.0.0.1", Some(true), true, false),
                endpoint("10.0.0.1", Some(true), true, false),
                endpoint("not-an-ip", Some(true), true, false),
            ],
        );
        assert_eq!(
            resolve([&fqdn, &twice], &ServicePort::Only),
            addrs(&["10.0.0.1:80"])
        );
    }

    #[test]
    fn ready_replicas_are_counted_once_each() {
        let a = endpoint("10.0.0.1", Some(true), true, false);
        let b = endpoint("10.0.0.2", None, true, false);
        let gone = endpoint("10.0.0.3", Some(false), true, true);
        // The same pod listed again (another slice of the Service) counts once.
        let a_again = endpoint("10.0.0.1", Some(true), true, false);
        let slices = [
            slice(&[(Some("http"), 80)], vec![a, b, gone]),
            slice(&[(Some("http"), 80)], vec![a_again]),
        ];
        assert_eq!(ready_count(slices.iter()), 2);
        assert_eq!(ready_count(std::iter::empty()), 0);
    }
}
