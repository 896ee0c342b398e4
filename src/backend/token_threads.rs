//! Dedicated threads for the token's blocking calls, one per pooled session, fed from one
//! queue. Under load a thread that finishes an issuance takes the next queued one without
//! sleeping; a fresh blocking task per issuance cost two thread wake-ups each.
//!
//! A token that stops answering (a network HSM cut off) keeps its thread in the call for
//! as long as it likes: stopping the pool waits for such a call only within a bound and
//! then leaves its thread to the process exit, so a stuck token never holds up shutdown.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Work and what it is, for the log should it outlive the pool.
struct Job<T> {
    what: String,
    work: Box<dyn FnOnce(&T) + Send>,
}

/// The work did not run to its end: its thread panicked (the panic is in the log), or the
/// pool was stopped before a thread took it.
#[derive(Debug, thiserror::Error)]
#[error("the token thread stopped before the work finished")]
pub struct Stopped;

/// A call still under way when the pool stopped: its thread is left running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outstanding {
    /// What the caller called the work (`signing serial ...`).
    pub what: String,
    /// How long it had been running.
    pub running: Duration,
}

/// N threads sharing a context `T` (the token connection) and a queue of work on it.
/// [`TokenThreads::stop`] waits a while for work under way; dropping the pool drops queued
/// work, joins the threads that are not in a call and leaves those that are (logged).
pub struct TokenThreads<T> {
    queue: Arc<Queue<T>>,
    /// Taken by the first stop: a later one (the drop after [`TokenThreads::stop`]) has
    /// nothing left to wait for.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Queue<T> {
    state: Mutex<State<T>>,
    work_ready: Condvar,
    /// Told each time a thread ends a call: [`TokenThreads::stop`] waits for it.
    call_ended: tokio::sync::Notify,
}

struct State<T> {
    jobs: VecDeque<Job<T>>,
    /// Threads waiting for work: a new job wakes one only when some wait.
    idle: usize,
    closed: bool,
    /// Per thread (by its index): the call it is in, and since when.
    calls: Vec<Option<(String, Instant)>>,
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Jobs run outside the lock, so a poisoned lock holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No more work: queued work is dropped (its callers see `Stopped`), idle threads end.
    fn close(&self) {
        {
            let mut state = self.lock();
            state.closed = true;
            state.jobs.clear();
        }
        self.work_ready.notify_all();
    }
}

impl<T: Send + Sync + 'static> TokenThreads<T> {
    /// Starts `count` threads named `name`.
    pub fn start(context: Arc<T>, count: usize, name: &str) -> std::io::Result<Self> {
        let queue = Arc::new(Queue::<T> {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                idle: 0,
                closed: false,
                calls: vec![None; count.max(1)],
            }),
            work_ready: Condvar::new(),
            call_ended: tokio::sync::Notify::new(),
        });
        let pool = TokenThreads {
            queue,
            threads: Mutex::new(Vec::with_capacity(count)),
        };
        for index in 0..count.max(1) {
            let (queue, context) = (pool.queue.clone(), context.clone());
            let thread = std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || work_loop(&queue, &*context, index))?;
            // On a failed spawn, dropping `pool` stops the threads already started.
            lock(&pool.threads).push(thread);
        }
        Ok(pool)
    }

    /// Runs `work` on one of the threads and waits for its result without holding a
    /// thread of the caller; `what` names it in the log should it outlast the pool. Work
    /// whose caller stopped waiting (a readiness probe that timed out) before a thread
    /// took it is skipped.
    pub async fn run<R: Send + 'static>(
        &self,
        what: String,
        work: impl FnOnce(&T) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let job = Job {
            what,
            work: Box::new(move |context: &T| {
                if !reply.is_closed() {
                    let _ = reply.send(work(context));
                }
            }),
        };
        let wake = {
            let mut state = self.queue.lock();
            // After `stop` no thread takes work: queued, it would wait for ever.
            if state.closed {
                return Err(Stopped);
            }
            state.jobs.push_back(job);
            state.idle > 0
        };
        if wake {
            self.queue.work_ready.notify_one();
        }
        result.await.map_err(|_| Stopped)
    }

    /// Takes no more work and waits for the calls under way, each until it has run for
    /// `patience` (a call already past it is not waited for), then joins the threads that
    /// are out of their calls. Those still in one are left to the process exit (their
    /// sessions are neither closed nor logged out) and returned. Dropping the future stops
    /// the wait; the pool's drop then leaves the threads still in a call.
    pub async fn stop(&self, patience: Duration) -> Vec<Outstanding> {
        self.queue.close();
        loop {
            let ended = self.queue.call_ended.notified();
            tokio::pin!(ended);
            // Registered before the look at the calls, so an end between the two counts.
            ended.as_mut().enable();
            let wait_until = self
                .queue
                .lock()
                .calls
                .iter()
                .flatten()
                .map(|(_, started)| *started + patience)
                .max();
            let Some(wait_until) = wait_until.filter(|until| *until > Instant::now()) else {
                break;
            };
            if tokio::time::timeout_at(wait_until.into(), ended)
                .await
                .is_err()
            {
                break;
            }
        }
        self.release()
    }
}

impl<T> TokenThreads<T> {
    /// Closes the queue, joins the threads not in a call and leaves the others (the
    /// calls they are in are returned). A second call finds no thread.
    fn release(&self) -> Vec<Outstanding> {
        self.queue.close();
        let threads = std::mem::take(&mut *lock(&self.threads));
        let calls = self.queue.lock().calls.clone();
        let mut outstanding = Vec::new();
        for (thread, call) in threads.into_iter().zip(calls) {
            match call {
                // Not in a call: the closed queue ends its loop at once.
                None => {
                    let _ = thread.join();
                }
                // Detached: it ends at its call's end (the queue is closed) or with the
                // process.
                Some((what, started)) => outstanding.push(Outstanding {
                    what,
                    running: started.elapsed(),
                }),
            }
        }
        outstanding
    }
}

fn lock<V>(mutex: &Mutex<V>) -> MutexGuard<'_, V> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn work_loop<T>(queue: &Queue<T>, context: &T, index: usize) {
    let mut state = queue.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            state.calls[index] = Some((job.what, Instant::now()));
            drop(state);
            // A panicking job loses its reply (the caller sees `Stopped`), not the thread.
            let _ = catch_unwind(AssertUnwindSafe(|| (job.work)(context)));
            state = queue.lock();
            state.calls[index] = None;
            queue.call_ended.notify_waiters();
            continue;
        }
        if state.closed {
            return;
        }
        state.idle += 1;
        state = queue
            .work_ready
            .wait(state)
            .unwrap_or_else(|p| p.into_inner());
        state.idle -= 1;
    }
}

impl<T> Drop for TokenThreads<T> {
    fn drop(&mut self) {
        // Without a `stop` before (or with its wait cut short): no wait for a call.
        for call in self.release() {
            tracing::warn!(
                call = %call.what,
                running_seconds = call.running.as_secs(),
                "a token call was still under way when the token threads stopped: its thread is left to the process exit, its session neither closed nor logged out"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_work_on_its_threads_with_the_shared_context() {
        let pool = TokenThreads::start(Arc::new(AtomicUsize::new(0)), 3, "test-token").unwrap();
        let pool = Arc::new(pool);
        let mut waits = Vec::new();
        for i in 0..50usize {
            let pool = pool.clone();
            waits.push(tokio::spawn(async move {
                pool.run("test work".into(), move |count: &AtomicUsize| {
                    count.fetch_add(1, Ordering::SeqCst);
                    (i, std::thread::current().name().map(str::to_string))
                })
                .await
            }));
        }
        for (i, wait) in waits.into_iter().enumerate() {
            let (echo, thread) = wait.await.unwrap().unwrap();
            assert_eq!(echo, i);
            assert_eq!(thread.as_deref(), Some("test-token"));
        }
        let total = pool
            .run("test work".into(), |count: &AtomicUsize| {
                count.load(Ordering::SeqCst)
            })
            .await;
        assert_eq!(total.unwrap(), 50);
    }

    #[tokio::test]
    async fn a_panicking_job_reports_stopped_and_the_thread_keeps_serving() {
        let pool = TokenThreads::start(Arc::new(()), 1, "test-token").unwrap();
        let failed = pool
            .run("test work".into(), |_: &()| -> u32 {
                panic!("job failed on purpose")
            })
            .await;
        assert!(matches!(failed, Err(Stopped)));
        assert_eq!(
            pool.run("test work".into(), |_: &()| 7u32).await.unwrap(),
            7
        );
    }

    #[tokio::test]
    async fn work_whose_caller_left_before_it_started_is_skipped() {
        let ran = Arc::new(AtomicUsize::new(0));
        let pool = TokenThreads::start(Arc::new(()), 1, "test-token").unwrap();
        // Hold the only thread so the next job stays queued.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = pool.run("test work".into(), move |_: &()| {
            let _ = held.recv();
        });
        tokio::pin!(blocker);
        // Poll once so the blocking job is queued, then queue a job and abandon it.
        assert!(futures_poll_once(blocker.as_mut()).await.is_none());
        let counter = ran.clone();
        let mut abandoned = Box::pin(pool.run("test work".into(), move |_: &()| {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        assert!(futures_poll_once(abandoned.as_mut()).await.is_none());
        drop(abandoned);
        release.send(()).unwrap();
        blocker.await.unwrap();
        // A job queued after the abandoned one runs, so the abandoned one was passed over.
        pool.run("test work".into(), |_: &()| ()).await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn stop_waits_for_a_call_within_its_patience_and_leaves_a_stuck_one() {
        let pool = TokenThreads::start(Arc::new(()), 2, "test-token").unwrap();
        // Idle threads only: joined, nothing outstanding.
        pool.run("warm-up".into(), |_: &()| ()).await.unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let stuck = pool.run("signing serial 01".into(), move |_: &()| {
            let _ = started.send(());
            // Stands for a token that never answers: released only after the stop.
            let _ = held.recv();
        });
        tokio::pin!(stuck);
        assert!(futures_poll_once(stuck.as_mut()).await.is_none());
        running.await.unwrap();
        let outstanding = pool.stop(Duration::from_millis(50)).await;
        assert_eq!(outstanding.len(), 1, "{outstanding:?}");
        assert_eq!(outstanding[0].what, "signing serial 01");
        // Stopped: new work is refused rather than queued for no thread.
        assert!(matches!(
            pool.run("late".into(), |_: &()| ()).await,
            Err(Stopped)
        ));
        // Left, not lost: once its call ends, its answer still reaches its caller.
        release.send(()).unwrap();
        stuck.await.unwrap();
    }

    #[tokio::test]
    async fn stop_lets_a_call_that_ends_within_its_patience_finish() {
        let pool = TokenThreads::start(Arc::new(()), 1, "test-token").unwrap();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let slow = pool.run("readiness".into(), move |_: &()| {
            let _ = started.send(());
            std::thread::sleep(Duration::from_millis(100));
            7u32
        });
        tokio::pin!(slow);
        assert!(futures_poll_once(slow.as_mut()).await.is_none());
        running.await.unwrap();
        assert_eq!(pool.stop(Duration::from_secs(60)).await, []);
        assert_eq!(slow.await.unwrap(), 7);
    }

    /// Polls a future once: its output if ready, None if it is pending.
    async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        let mut future = future;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
