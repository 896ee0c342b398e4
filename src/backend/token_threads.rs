//! Dedicated threads for the token's blocking calls, one per pooled session, fed from one
//! queue. Under load a thread that finishes an issuance takes the next queued one without
//! sleeping; a fresh blocking task per issuance cost two thread wake-ups each.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

type Job<T> = Box<dyn FnOnce(&T) + Send>;

/// The work did not run to its end: its thread panicked (the panic is in the log).
#[derive(Debug, thiserror::Error)]
#[error("the token thread stopped before the work finished")]
pub struct Stopped;

/// N threads sharing a context `T` (the token connection) and a queue of work on it.
/// Dropping the pool lets running work finish, drops queued work and joins the threads.
pub struct TokenThreads<T> {
    queue: Arc<Queue<T>>,
    threads: Vec<JoinHandle<()>>,
}

struct Queue<T> {
    state: Mutex<State<T>>,
    work_ready: Condvar,
}

struct State<T> {
    jobs: VecDeque<Job<T>>,
    /// Threads waiting for work: a new job wakes one only when some wait.
    idle: usize,
    closed: bool,
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Jobs run outside the lock, so a poisoned lock holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
            }),
            work_ready: Condvar::new(),
        });
        let mut pool = TokenThreads {
            queue,
            threads: Vec::with_capacity(count),
        };
        for _ in 0..count.max(1) {
            let (queue, context) = (pool.queue.clone(), context.clone());
            let thread = std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || work_loop(&queue, &*context))?;
            // On a failed spawn, dropping `pool` stops the threads already started.
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Runs `work` on one of the threads and waits for its result without holding a
    /// thread of the caller. Work whose caller stopped waiting (a readiness probe that
    /// timed out) before a thread took it is skipped.
    pub async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce(&T) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let job: Job<T> = Box::new(move |context| {
            if !reply.is_closed() {
                let _ = reply.send(work(context));
            }
        });
        // No `closed` check: the pool cannot be dropped while `run` borrows it.
        let wake = {
            let mut state = self.queue.lock();
            state.jobs.push_back(job);
            state.idle > 0
        };
        if wake {
            self.queue.work_ready.notify_one();
        }
        result.await.map_err(|_| Stopped)
    }
}

fn work_loop<T>(queue: &Queue<T>, context: &T) {
    let mut state = queue.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            // A panicking job loses its reply (the caller sees `Stopped`), not the thread.
            let _ = catch_unwind(AssertUnwindSafe(|| job(context)));
            state = queue.lock();
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
        {
            let mut state = self.queue.lock();
            state.closed = true;
            state.jobs.clear();
        }
        self.queue.work_ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
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
                pool.run(move |count: &AtomicUsize| {
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
            .run(|count: &AtomicUsize| count.load(Ordering::SeqCst))
            .await;
        assert_eq!(total.unwrap(), 50);
    }

    #[tokio::test]
    async fn a_panicking_job_reports_stopped_and_the_thread_keeps_serving() {
        let pool = TokenThreads::start(Arc::new(()), 1, "test-token").unwrap();
        let failed = pool
            .run(|_: &()| -> u32 { panic!("job failed on purpose") })
            .await;
        assert!(matches!(failed, Err(Stopped)));
        assert_eq!(pool.run(|_: &()| 7u32).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn work_whose_caller_left_before_it_started_is_skipped() {
        let ran = Arc::new(AtomicUsize::new(0));
        let pool = TokenThreads::start(Arc::new(()), 1, "test-token").unwrap();
        // Hold the only thread so the next job stays queued.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = pool.run(move |_: &()| {
            let _ = held.recv();
        });
        tokio::pin!(blocker);
        // Poll once so the blocking job is queued, then queue a job and abandon it.
        assert!(futures_poll_once(blocker.as_mut()).await.is_none());
        let counter = ran.clone();
        let mut abandoned = Box::pin(pool.run(move |_: &()| {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        assert!(futures_poll_once(abandoned.as_mut()).await.is_none());
        drop(abandoned);
        release.send(()).unwrap();
        blocker.await.unwrap();
        // A job queued after the abandoned one runs, so the abandoned one was passed over.
        pool.run(|_: &()| ()).await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
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
