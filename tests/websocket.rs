//! WebSocket proxying with real tokio-tungstenite peers on both sides.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::{TestProxy, eventually, get, policy};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// An echo WebSocket server; `crash_after` drops the TCP connection after that many messages.
async fn echo_server(crash_after: Option<usize>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let mut seen = 0;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    seen += 1;
                    if crash_after.is_some_and(|n| seen >= n) {
                        // Drop without a close frame: the upstream "crashes".
                        return;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

fn ws_policy(name: &str, backend: SocketAddr, extra: &str) -> String {
    policy(name, &[("ws", backend)], extra)
}

#[tokio::test]
async fn text_and_large_binary_messages_echo_through() {
    let (backend, _server) = echo_server(None).await;
    let proxy = TestProxy::start(&ws_policy("ws", backend, "")).await;
    let (mut ws, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/chat", proxy.addr("ws")))
            .await
            .expect("handshake through the proxy");
    assert_eq!(response.status(), 101);

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));

    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(
        echoed.into_data().as_ref(),
        big.as_slice(),
        "1 MiB binary message must echo intact"
    );

    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("websocket_sessions_active{policy=\"default/ws\"} 1"),
        "one session should be active:\n{metrics}"
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_session_outlives_the_request_timeout_and_closes_when_idle() {
    let (backend, _server) = echo_server(None).await;
    let extra = "  timeouts: {request: 300ms}\n  websocket: {idleTimeout: 700ms}\n";
    let proxy = TestProxy::start(&ws_policy("ws", backend, extra)).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", proxy.addr("ws")))
        .await
        .unwrap();
    // Keep talking for longer than the request timeout: the tunnel is exempt from it.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("ping {i}"))
        );
    }
    // Then go quiet: the proxy closes the tunnel at the idle timeout.
    let quiet = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(msg)) if msg.is_close() => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an idle session must be closed");
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_millis(1500),
        "idle close should come at ~700ms, came after {waited:?}"
    );
}

#[tokio::test]
async fn upstream_crash_reaches_the_client_promptly() {
    let (backend, _server) = echo_server(Some(1)).await;
    let proxy = TestProxy::start(&ws_policy("ws", backend, "")).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", proxy.addr("ws")))
        .await
        .unwrap();
    ws.send(Message::text("boom")).await.unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(msg)) if msg.is_close() => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the client must learn that the upstream went away"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "promptly, not after a timeout"
    );
}

#[tokio::test]
async fn a_session_survives_a_config_reload() {
    let (backend, _server) = echo_server(None).await;
    let proxy = TestProxy::start(&ws_policy("ws", backend, "")).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", proxy.addr("ws")))
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    let version = proxy.proxy().config_version();
    std::fs::write(
        &proxy.config_path,
        ws_policy("ws", backend, "  timeouts: {request: 5s}\n"),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            proxy.proxy().config_version() > version
        })
        .await,
        "the edited policy should be applied"
    );
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("after"));
}

#[tokio::test]
async fn upgrade_with_a_bad_accept_key_is_a_502() {
    // A backend that answers 101 with a wrong Sec-WebSocket-Accept.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bogus\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let proxy = TestProxy::start(&ws_policy("ws", addr, "")).await;
    let result = tokio_tungstenite::connect_async(format!("ws://{}/", proxy.addr("ws"))).await;
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 502, "a bad upgrade answer must be a 502");
        }
        other => panic!("expected an HTTP 502 error, got {other:?}"),
    }
}
