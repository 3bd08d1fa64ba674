//! Arbitrary request bytes through the head tracker and the header rewriting: never a panic.
#![no_main]

use breakwater::config::compile::Forwarding;
use breakwater::proxy::conn::inspect_heads;
use breakwater::proxy::headers::{self, ClientSide, PeerHeaders};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = inspect_heads(data);

    let mut parsed = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut parsed);
    let Ok(httparse::Status::Complete(_)) = head.parse(data) else {
        return;
    };
    let mut builder = http::Request::builder()
        .method(head.method.unwrap_or("GET"))
        .uri(head.path.unwrap_or("/"));
    for h in head.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(mut req) = builder.body(()) else {
        return;
    };
    let authority = headers::request_authority(&req).ok().flatten();
    let forwarding = Forwarding {
        trusted_proxies: vec!["10.0.0.0/8".parse().expect("static CIDR")],
        ..Forwarding::default()
    };
    let peer = PeerHeaders::new("10.1.2.3:4567".parse().expect("static address"), 8080);
    let client = ClientSide {
        peer: &peer,
        tls: false,
        forwarding: &forwarding,
    };
    let upgrade = headers::is_upgrade_request(&req);
    let version = req.version();
    headers::prepare_request(req.headers_mut(), version, authority.as_ref(), &client, upgrade)
        .insert_into(req.headers_mut());
    headers::prepare_response(req.headers_mut(), version, &forwarding, upgrade, false);
});
