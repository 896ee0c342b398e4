//! Bounded concurrency on the calling task: the controller's writes into a member cluster
//! and its reads of the members, a few in flight at once instead of one after another.
//!
//! The futures borrow the pass's state (the controller, what was read), so they are run
//! here rather than spawned; each is started only when a slot is free.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Runs `futures` with at most `limit` (at least 1) in flight; their outputs in the order
/// of `futures`, whatever order they finished in.
pub async fn in_order<F, T>(futures: impl IntoIterator<Item = F>, limit: usize) -> Vec<T>
where
    F: Future<Output = T>,
{
    let limit = limit.max(1);
    let mut waiting = futures.into_iter().enumerate();
    let mut running: Vec<(usize, Pin<Box<F>>)> = Vec::with_capacity(limit);
    let mut done: Vec<(usize, T)> = Vec::new();
    std::future::poll_fn(|cx| {
        loop {
            while running.len() < limit {
                let Some((i, future)) = waiting.next() else {
                    break;
                };
                running.push((i, Box::pin(future)));
            }
            if running.is_empty() {
                return Poll::Ready(());
            }
            let before = done.len();
            let mut k = 0;
            while k < running.len() {
                match running[k].1.as_mut().poll(cx) {
                    Poll::Ready(output) => {
                        let (i, _) = running.swap_remove(k);
                        done.push((i, output));
                    }
                    Poll::Pending => k += 1,
                }
            }
            // Nothing finished: every running future has registered the waker.
            if done.len() == before {
                return Poll::Pending;
            }
        }
    })
    .await;
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, output)| output).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Each future waits at a barrier that opens only when `limit` of them wait at once:
    /// they finish only if that many run together, and the count shows no more did.
    #[tokio::test]
    async fn runs_up_to_the_limit_at_once_and_keeps_the_order() {
        let limit = 3;
        let barrier = tokio::sync::Barrier::new(limit);
        let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let futures = (0..9usize).map(|i| {
            let (barrier, running, most) = (&barrier, &running, &most);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                barrier.wait().await;
                // Later ones finish first.
                for _ in 0..(9 - i) {
                    tokio::task::yield_now().await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
                i
            }
        });
        // Only a guard against hanging (fewer than `limit` at once never pass the barrier).
        let outputs =
            tokio::time::timeout(std::time::Duration::from_secs(30), in_order(futures, limit))
                .await
                .expect("fewer than the limit ran at once");
        assert_eq!(outputs, (0..9).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), limit);
    }
}
