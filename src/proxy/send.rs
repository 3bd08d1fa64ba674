//! Writes to plain TCP sockets with `send(2)` made directly (through rustix), not through libc.
//!
//! glibc's `send` is a thread-cancellation point: in a process with more than one thread it
//! brackets the system call with two locked compare-and-swaps on the calling thread's
//! cancellation state. The proxy never cancels a thread, and at two writes per proxied request
//! (one upstream, one back to the client) that was four atomic read-modify-writes and about 120
//! instructions per request. Readiness is tokio's as for its own writes: wait until writable,
//! and let a `WouldBlock` clear the readiness so the next wait is for a fresh event.

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll, ready};

use rustix::net::SendFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Writes some of `buf` to `stream`, the way `AsyncWrite::poll_write` does.
pub fn poll_send(stream: &TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        // `NOSIGNAL`: a peer that closed gets EPIPE, not a SIGPIPE (as std's own writes).
        let sent = stream.try_io(Interest::WRITABLE, || {
            rustix::net::send(stream, buf, SendFlags::NOSIGNAL).map_err(io::Error::from)
        });
        match sent {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            sent => return Poll::Ready(sent),
        }
    }
}

/// Writes all of `buf` to `stream`; `Ok(true)` when it had to wait for the socket to take it.
pub async fn send_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<bool> {
    let mut waited = false;
    while !buf.is_empty() {
        let sent = poll_fn(|cx| {
            let sent = poll_send(stream, cx, buf);
            waited |= sent.is_pending();
            sent
        })
        .await?;
        match sent {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => buf = &buf[n..],
        }
    }
    Ok(waited)
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Two ends of a loopback TCP connection (also for `recv.rs`'s tests).
    pub(in crate::proxy) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn more_than_the_socket_buffers_hold_arrives_whole_and_in_order() {
        let (sender, mut receiver) = pair().await;
        // Several times what loopback buffers hold, so the writer waits for writability.
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0; 64 << 10];
            loop {
                match receiver.read(&mut chunk).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&chunk[..n]),
                }
                // A slow reader: the sender must see its socket fill up.
                if got.len() % (1 << 20) < (64 << 10) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        send_all(&sender, &data).await.unwrap();
        drop(sender);
        let got = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived altered or out of order");
    }

    #[tokio::test]
    async fn writing_to_a_peer_that_closed_fails_with_its_io_error_kind() {
        let (sender, receiver) = pair().await;
        drop(receiver);
        // The first writes may still be accepted before the peer's reset arrives.
        let mut failed = None;
        for _ in 0..100 {
            if let Err(err) = send_all(&sender, b"data").await {
                failed = Some(err);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let err = failed.expect("writing to a closed peer kept succeeding");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
    }
}
