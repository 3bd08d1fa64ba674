//! Where log lines go: a buffer the request path appends whole lines to, and a thread that
//! writes what has gathered in batches.
//!
//! With one access-log line per request, a queue of one allocated message per line (and a
//! wake-up of the writer for most of them) cost more than formatting the line. Here a line is
//! one short critical section and a copy; the writer is woken only when the buffer goes from
//! empty to not empty, then lets lines gather for a few milliseconds and writes them with one
//! call. Lines are never split or interleaved, because every log line goes through this one
//! writer. Past [`MAX_PENDING_BYTES`] waiting to be written (the reader of stderr has stalled)
//! lines are dropped, not queued without bound, and counted.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Most bytes waiting to be written before new lines are dropped.
pub const MAX_PENDING_BYTES: usize = 16 << 20;
/// How long the writer lets lines gather after being woken.
const GATHER: Duration = Duration::from_millis(5);

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves a byte buffer, which is still usable.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A cloneable handle that log layers write whole lines to.
#[derive(Clone)]
pub struct LineWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it has written every line still pending.
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LineWriter {
    /// Starts the writer thread over `out`.
    pub fn spawn<W: Write + Send + 'static>(out: W) -> io::Result<(LineWriter, WriterGuard)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_loop(&for_thread, out))?;
        Ok((
            LineWriter {
                shared: Arc::clone(&shared),
            },
            WriterGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Lines dropped so far because too much was waiting to be written.
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Queues one or more whole lines (dropped and counted past [`MAX_PENDING_BYTES`]).
    pub fn write_line(&self, line: &[u8]) {
        let mut pending = self.shared.lock();
        if pending.bytes.len() + line.len() > MAX_PENDING_BYTES {
            drop(pending);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        drop(pending);
        if was_empty {
            self.shared.wake.notify_one();
        }
    }
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut pending = shared.lock();
            while pending.bytes.is_empty() && !pending.closing {
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            pending.closing
        };
        if !closing {
            std::thread::sleep(GATHER);
        }
        {
            let mut pending = shared.lock();
            std::mem::swap(&mut pending.bytes, &mut batch);
        }
        if !batch.is_empty() {
            // Nowhere to report a failing stderr; the lines are lost either way.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            // Keep a moderate buffer for the next batch, not the largest ever seen.
            batch.shrink_to(64 << 10);
        }
        if closing && shared.lock().bytes.is_empty() {
            return;
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Write for LineWriter {
    /// Takes `buf` whole: log layers hand over one complete line per call.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read back, optionally stalled.
    #[derive(Clone, Default)]
    struct Out {
        bytes: Arc<Mutex<Vec<u8>>>,
        stall: Arc<Mutex<()>>,
    }

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _held = self.stall.lock().unwrap();
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_are_flushed_on_drop() {
        let out = Out::default();
        let (writer, guard) = LineWriter::spawn(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        writer
                            .write_all(format!("thread {t} line {i} end\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2000);
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with("thread ") && l.ends_with(" end"))
        );
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            assert_eq!(mine.len(), 500);
            assert_eq!(mine[499], format!("thread {t} line 499 end"), "in order");
        }
        assert_eq!(writer.dropped_lines(), 0);
    }

    #[test]
    fn lines_are_written_while_running_not_only_at_exit() {
        let out = Out::default();
        let (mut writer, _guard) = LineWriter::spawn(out.clone()).unwrap();
        writer.write_all(b"early\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.bytes.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(&out.bytes.lock().unwrap()[..], b"early\n");
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_instead_of_growing() {
        let out = Out::default();
        let stall = out.stall.lock().unwrap();
        let (mut writer, guard) = LineWriter::spawn(out.clone()).unwrap();
        let line = vec![b'x'; 1 << 20];
        // The writer takes at most one batch before blocking on the stalled output; the rest
        // must fit the bound or be dropped.
        for _ in 0..64 {
            writer.write_all(&line).unwrap();
        }
        assert!(writer.dropped_lines() >= 64 - 2 * (MAX_PENDING_BYTES >> 20) as u64);
        drop(stall);
        drop(guard);
        let written = out.bytes.lock().unwrap().len();
        assert!(written <= 2 * MAX_PENDING_BYTES, "{written}");
        assert_eq!(written % (1 << 20), 0, "whole lines only");
    }
}
