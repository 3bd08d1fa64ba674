//! Reads from plain TCP sockets with `recv(2)` made directly (through rustix), not through libc.
//!
//! As with writes (see `send.rs`): glibc's `recv` is a thread-cancellation point and brackets
//! the system call with two locked compare-and-swaps on the calling thread's cancellation
//! state, and the proxy reads twice per proxied request (the request, the response).
//!
//! rustix needs initialised memory to read into (a `BytesMut`'s spare capacity cannot be
//! marked filled without `unsafe`), so a read of ordinary size lands in a per-thread scratch
//! buffer and is copied onto the end of the caller's buffer: for the few hundred bytes of a
//! usual request or response that copy is far cheaper than the two locked operations. Large
//! reads (streamed bodies) still go through tokio straight into the buffer, where the copy
//! would cost more than the cancellation bookkeeping, spread over many kilobytes, does.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use rustix::net::RecvFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The most one read through the scratch buffer asks for; larger reads go straight into the
/// caller's buffer.
pub const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// Reads once from `stream` onto the end of `buf`, at most `want` bytes, the way
/// `tokio_util::io::poll_read_buf` does over `AsyncRead::poll_read`: `Ok(0)` is the end of the
/// stream, and a read shorter than `want` clears the socket's readiness, so the next call
/// waits for a fresh event instead of making a read that would only say "nothing more".
pub fn poll_recv_buf(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    // Nothing asked for would read as the end of the stream.
    let want = want.max(1);
    buf.reserve(want);
    if want > SCRATCH_BYTES {
        return tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf);
    }
    SCRATCH
        .try_with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => Some(poll_recv_via(stream, cx, buf, &mut scratch[..want])),
            Err(_) => None,
        })
        .ok()
        .flatten()
        // No scratch buffer on this thread (it is being torn down): read through tokio.
        .unwrap_or_else(|| tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf))
}

fn poll_recv_via(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    scratch: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        match recv_if_ready(stream, scratch) {
            // Readiness that was stale: wait for a fresh event.
            None => continue,
            Some(Err(err))
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Some(read) => {
                if let Ok(n) = read {
                    buf.extend_from_slice(&scratch[..n]);
                }
                return Poll::Ready(read);
            }
        }
    }
}

/// One `recv(2)` into `scratch`, made only if tokio knows the socket is readable (`None`: it
/// did not, and nothing was called). A read shorter than `scratch` drained the socket for now:
/// it is reported as a `WouldBlock` to tokio, which clears the readiness it saw (and only that
/// one, so an event that came since is kept), and as its count to the caller; the bytes are
/// in `scratch`.
fn recv_if_ready(stream: &TcpStream, scratch: &mut [u8]) -> Option<io::Result<usize>> {
    let mut called = false;
    let mut short = None;
    let read = stream.try_io(Interest::READABLE, || {
        called = true;
        let (n, _) = rustix::net::recv(stream, &mut *scratch, RecvFlags::empty())
            .map_err(io::Error::from)?;
        if n > 0 && n < scratch.len() {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Some(Ok(n)),
        None => called.then_some(read),
    }
}

/// What [`try_recv_into`] found.
#[derive(Debug)]
pub enum TryRecv {
    /// No readiness event since tokio last cleared it: nothing was read, and a waker registered
    /// before then is still registered.
    NotReadable,
    /// Bytes handed to the sink (`0`: the end of the stream). Fewer than asked for cleared the
    /// readiness, as [`poll_recv_buf`] does.
    Read(usize),
    /// The readiness was stale (the read found nothing), or this thread has no scratch buffer:
    /// no waker is registered any more, so the caller polls as usual.
    Unknown,
    /// The read failed.
    Failed(io::Error),
}

/// Reads once from `stream`, at most `want` bytes (capped at [`SCRATCH_BYTES`]), handing what
/// arrived to `sink`, but only if tokio already knows the socket is readable. Unlike a poll it
/// registers no waker, so a caller whose waker is already registered can look without taking
/// the readiness lock again.
pub fn try_recv_into(stream: &TcpStream, want: usize, sink: impl FnOnce(&[u8])) -> TryRecv {
    let want = want.clamp(1, SCRATCH_BYTES);
    SCRATCH
        .try_with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return TryRecv::Unknown;
            };
            let scratch = &mut scratch[..want];
            match recv_if_ready(stream, scratch) {
                None => TryRecv::NotReadable,
                Some(Ok(n)) => {
                    sink(&scratch[..n]);
                    TryRecv::Read(n)
                }
                Some(Err(err))
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    TryRecv::Unknown
                }
                Some(Err(err)) => TryRecv::Failed(err),
            }
        })
        .unwrap_or(TryRecv::Unknown)
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::proxy::send::tests::pair;

    async fn recv(stream: &mut TcpStream, buf: &mut BytesMut, want: usize) -> usize {
        tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| poll_recv_buf(stream, cx, buf, want)),
        )
        .await
        .expect("data or end of stream within 10 s")
        .unwrap()
    }

    #[tokio::test]
    async fn reads_append_whole_and_in_order_then_the_end_reads_zero() {
        let (mut writer, mut reader) = pair().await;
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = data.clone();
        let sender = tokio::spawn(async move {
            for chunk in data.chunks(100_000) {
                writer.write_all(chunk).await.unwrap();
            }
        });
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for round in 0..100_000 {
            // Some reads into an empty buffer, some after bytes already held (kept in front);
            // small ones through the scratch buffer, large ones straight in.
            if buf.len() > 64 << 10 {
                got.extend_from_slice(&buf.split());
            }
            let want = [1024, SCRATCH_BYTES, 2 * SCRATCH_BYTES][round % 3];
            if recv(&mut reader, &mut buf, want).await == 0 {
                break;
            }
        }
        sender.await.unwrap();
        got.extend_from_slice(&buf);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived altered or out of order");
    }

    #[tokio::test]
    async fn a_short_read_waits_for_new_data_and_the_end_is_seen() {
        let (mut writer, mut reader) = pair().await;
        writer.write_all(b"hello").await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(recv(&mut reader, &mut buf, 1024).await, 5);
        // The readiness was cleared: the next read waits until more arrives.
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.write_all(b" world").await.unwrap();
            writer
        });
        assert_eq!(recv(&mut reader, &mut buf, 1024).await, 6);
        assert_eq!(&buf[..], b"hello world");
        drop(later.await.unwrap());
        assert_eq!(recv(&mut reader, &mut buf, 1024).await, 0, "end of stream");
    }

    #[tokio::test]
    async fn a_try_read_looks_only_at_known_readiness_and_keeps_a_registered_waker() {
        let (mut writer, reader) = pair().await;
        let mut got = Vec::new();
        // A new socket may start out marked readable (stale: nothing was sent); the read that
        // finds nothing clears that, and from then on no read is made.
        let first = try_recv_into(&reader, 1024, |b| got.extend_from_slice(b));
        assert!(
            matches!(first, TryRecv::NotReadable | TryRecv::Unknown),
            "{first:?}"
        );
        assert!(matches!(
            try_recv_into(&reader, 1024, |b| got.extend_from_slice(b)),
            TryRecv::NotReadable
        ));
        // Register this task's interest, as the server's watch does, then send: the
        // registration made before is what wakes the wait below, which polls nothing itself.
        let registered = poll_fn(|cx| Poll::Ready(reader.poll_read_ready(cx).is_pending())).await;
        assert!(registered, "nothing to read yet");
        writer.write_all(b"ping").await.unwrap();
        let waited = tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(
                |_cx| match try_recv_into(&reader, 1024, |b| got.extend_from_slice(b)) {
                    TryRecv::NotReadable => Poll::Pending,
                    other => Poll::Ready(other),
                },
            ),
        )
        .await
        .expect("the earlier registration should wake the task");
        assert!(matches!(waited, TryRecv::Read(4)), "{waited:?}");
        assert_eq!(got, b"ping");
        // The short read cleared the readiness again.
        assert!(matches!(
            try_recv_into(&reader, 1024, |b| got.extend_from_slice(b)),
            TryRecv::NotReadable
        ));
        // A read that fills what was asked keeps the readiness: more may be waiting. When
        // nothing is, the read that finds so reports the readiness stale, and clears it.
        writer.write_all(b"abcdef").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("readable within 10 s")
            .unwrap();
        let taken = RefCell::new(Vec::new());
        let take = |want| try_recv_into(&reader, want, |b| taken.borrow_mut().extend_from_slice(b));
        assert!(matches!(take(4), TryRecv::Read(4)));
        assert!(matches!(take(2), TryRecv::Read(2)));
        assert!(matches!(take(4), TryRecv::Unknown));
        assert!(matches!(take(4), TryRecv::NotReadable));
        assert_eq!(*taken.borrow(), b"abcdef");
        // The end of the stream reads as zero bytes.
        drop(writer);
        tokio::time::timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("readable within 10 s")
            .unwrap();
        assert!(matches!(take(4), TryRecv::Read(0)));
    }

    #[tokio::test]
    async fn a_read_of_exactly_what_was_asked_leaves_the_rest_for_the_next() {
        let (mut writer, mut reader) = pair().await;
        writer.write_all(b"abcdef").await.unwrap();
        // Let both writes' bytes be there before reading.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut buf = BytesMut::new();
        assert_eq!(recv(&mut reader, &mut buf, 4).await, 4);
        assert_eq!(recv(&mut reader, &mut buf, 4).await, 2);
        assert_eq!(&buf[..], b"abcdef");
        let taken = buf.split_to(2).freeze();
        writer.write_all(b"gh").await.unwrap();
        assert_eq!(recv(&mut reader, &mut buf, 64).await, 2);
        assert_eq!(&taken[..], b"ab");
        assert_eq!(&buf[..], b"cdefgh");
    }
}
