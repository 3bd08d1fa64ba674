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
//!
//! The thread is started by the first line and ends after [`IDLE_EXIT`] without one (the next
//! line starts it again). A proxy that logs nothing for a while (access log off, the startup
//! lines written) then runs on one thread, which the kernel and glibc both reward on every
//! system call (see `Shared::start`).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Most bytes waiting to be written before new lines are dropped.
pub const MAX_PENDING_BYTES: usize = 16 << 20;
/// How long the writer lets lines gather after being woken.
const GATHER: Duration = Duration::from_millis(5);
/// How long the writer thread waits for a line before it ends.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);

type Output = Box<dyn Write + Send>;

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    dropped: AtomicU64,
    /// Whether the first line has started the writer (or found it cannot be started).
    started: AtomicBool,
    /// Set when no writer thread could be started: lines are then written by the caller.
    direct: AtomicBool,
    /// The output while no writer holds it, and the writer last started.
    writer: Mutex<Writer>,
    /// How long a writer waits for a line before it ends.
    idle_exit: Duration,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closing: bool,
}

struct Writer {
    out: Option<Output>,
    thread: Option<JoinHandle<()>>,
}

/// A lock that a panic elsewhere does not make unusable (what it guards stays consistent:
/// bytes and handles).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }

    /// Starts the writer thread, once. A process that never logs a line never starts it and
    /// stays single-threaded: the kernel then looks file descriptors up without taking a
    /// reference per system call, and glibc skips its thread-cancellation bookkeeping, on
    /// every read and write the proxy makes.
    fn start(self: &Arc<Self>) {
        let mut writer = lock(&self.writer);
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                // Waits for `start` to let go of the lock, then owns the output.
                let out = lock(&shared.writer).out.take();
                if let Some(out) = out {
                    write_loop(&shared, out);
                }
            });
        let failed = match spawned {
            Ok(thread) => {
                // An earlier writer that ended idle has let go of everything: detached.
                writer.thread = Some(thread);
                None
            }
            Err(err) => Some(err),
        };
        self.started.store(true, Ordering::Release);
        drop(writer);
        if let Some(err) = failed {
            // Lines are then written by the caller (`direct`), these first ones here. The
            // pending lock is taken without holding the writer's: the writer thread takes them
            // the other way round.
            self.direct.store(true, Ordering::Release);
            let pending = std::mem::take(&mut self.lock().bytes);
            if let Some(out) = lock(&self.writer).out.as_mut() {
                // Nowhere else to say it: stderr is where the lines go.
                let _ = writeln!(
                    out,
                    "breakwater: no log writer thread ({err}); writing lines directly"
                );
                let _ = out.write_all(&pending).and_then(|()| out.flush());
            }
        }
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
}

impl LineWriter {
    /// A writer over `out`; its thread is started by the first line written and ends after
    /// [`IDLE_EXIT`] without one.
    pub fn new<W: Write + Send + 'static>(out: W) -> (LineWriter, WriterGuard) {
        Self::with_idle_exit(out, IDLE_EXIT)
    }

    fn with_idle_exit<W: Write + Send + 'static>(
        out: W,
        idle_exit: Duration,
    ) -> (LineWriter, WriterGuard) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
            started: AtomicBool::new(false),
            direct: AtomicBool::new(false),
            writer: Mutex::new(Writer {
                out: Some(Box::new(out)),
                thread: None,
            }),
            idle_exit,
        });
        (
            LineWriter {
                shared: Arc::clone(&shared),
            },
            WriterGuard { shared },
        )
    }

    /// Lines dropped so far because too much was waiting to be written.
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Whether a writer thread runs (started by a line, not yet ended idle).
    pub fn started(&self) -> bool {
        self.shared.started.load(Ordering::Acquire)
    }

    /// Queues one or more whole lines (dropped and counted past [`MAX_PENDING_BYTES`]).
    pub fn write_line(&self, line: &[u8]) {
        if self.shared.direct.load(Ordering::Acquire) {
            let mut writer = lock(&self.shared.writer);
            if let Some(out) = writer.out.as_mut() {
                let _ = out.write_all(line).and_then(|()| out.flush());
            }
            return;
        }
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
            if !self.shared.started.load(Ordering::Acquire) {
                self.shared.start();
            }
            self.shared.wake.notify_one();
        }
    }
}

fn write_loop(shared: &Shared, mut out: Output) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut pending = shared.lock();
            while pending.bytes.is_empty() && !pending.closing {
                let (guard, waited) = shared
                    .wake
                    .wait_timeout(pending, shared.idle_exit)
                    .unwrap_or_else(PoisonError::into_inner);
                pending = guard;
                if waited.timed_out() && pending.bytes.is_empty() && !pending.closing {
                    // Quiet for a while: hand the output back and end. Decided under the
                    // pending lock, so a line appended from now on sees `started` false and
                    // starts a writer again.
                    lock(&shared.writer).out = Some(out);
                    shared.started.store(false, Ordering::Release);
                    return;
                }
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
        let thread = lock(&self.shared.writer).thread.take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        // Left only if no writer runs (none could be started): written here.
        let pending = std::mem::take(&mut self.shared.lock().bytes);
        if !pending.is_empty() {
            if let Some(out) = lock(&self.shared.writer).out.as_mut() {
                let _ = out.write_all(&pending).and_then(|()| out.flush());
            }
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
        let (writer, guard) = LineWriter::new(out.clone());
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
    fn the_thread_starts_with_the_first_line_and_not_before() {
        let out = Out::default();
        let (mut writer, guard) = LineWriter::new(out.clone());
        assert!(!writer.started(), "no line yet, no thread");
        writer.write_all(b"first\n").unwrap();
        assert!(writer.started());
        writer.write_all(b"second\n").unwrap();
        drop(guard);
        assert_eq!(&out.bytes.lock().unwrap()[..], b"first\nsecond\n");
    }

    #[test]
    fn a_quiet_writer_ends_its_thread_and_the_next_line_starts_one() {
        let out = Out::default();
        let (mut writer, guard) =
            LineWriter::with_idle_exit(out.clone(), Duration::from_millis(30));
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !done() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        for round in 0..3 {
            writer
                .write_all(format!("line {round}\n").as_bytes())
                .unwrap();
            assert!(writer.started());
            wait_for("the line is written", &|| {
                String::from_utf8_lossy(&out.bytes.lock().unwrap())
                    .contains(&format!("line {round}\n"))
            });
            wait_for("the thread ends when quiet", &|| !writer.started());
        }
        writer.write_all(b"last\n").unwrap();
        drop(guard);
        assert_eq!(
            &out.bytes.lock().unwrap()[..],
            b"line 0\nline 1\nline 2\nlast\n"
        );
    }

    #[test]
    fn a_writer_that_never_wrote_stops_without_a_thread() {
        let out = Out::default();
        let (writer, guard) = LineWriter::new(out.clone());
        drop(guard);
        assert!(!writer.started());
        assert!(out.bytes.lock().unwrap().is_empty());
    }

    #[test]
    fn lines_are_written_while_running_not_only_at_exit() {
        let out = Out::default();
        let (mut writer, _guard) = LineWriter::new(out.clone());
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
        let (mut writer, guard) = LineWriter::new(out.clone());
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
