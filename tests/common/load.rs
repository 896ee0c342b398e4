//! Concurrent signing load against a running signer, for the concurrency and fault tests:
//! one task per request body, each posting its body up to a number of rounds; what an
//! answer means (a serial, a stop, a failed assertion) is the test's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshca::pki::keys::KeyType;
use serde_json::Value;

use super::{csr, sign_body};

/// `count` signing bodies for `mesh` of `vm` (org acme), each with its own fresh P-256 CSR,
/// all made before any request is sent so that the requests really arrive together.
pub fn fresh_bodies(count: usize, vm: &str, mesh: &str) -> Vec<Value> {
    (0..count)
        .map(|_| sign_body(vm, mesh, &csr(KeyType::EcdsaP256, "acme", "a").1))
        .collect()
}

/// Running load: the tasks and how many answers they counted so far.
pub struct Load {
    successes: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

/// Starts one task per body. Each posts its body to `url` up to `rounds` times and hands
/// what came back to `answer`, which returns the serial issued (counted) or None to stop
/// that task.
pub fn start<F, Fut>(
    client: &reqwest::Client,
    url: &str,
    bodies: Vec<Value>,
    rounds: usize,
    answer: F,
) -> Load
where
    F: Fn(Result<reqwest::Response, reqwest::Error>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<String>> + Send + 'static,
{
    let successes = Arc::new(AtomicUsize::new(0));
    let tasks = bodies
        .into_iter()
        .map(|body| {
            let (client, url, successes, answer) = (
                client.clone(),
                url.to_string(),
                successes.clone(),
                answer.clone(),
            );
            tokio::spawn(async move {
                let mut serials = Vec::new();
                for _ in 0..rounds {
                    let Some(serial) = answer(client.post(&url).json(&body).send().await).await
                    else {
                        break;
                    };
                    serials.push(serial);
                    successes.fetch_add(1, Ordering::SeqCst);
                }
                serials
            })
        })
        .collect();
    Load { successes, tasks }
}

impl Load {
    /// Returns once `count` answers were counted; fails the test if they were not within
    /// a minute (a bound, not a timing assertion: a test must not go on as if they were).
    pub async fn wait_for(&self, count: usize) {
        for _ in 0..3000 {
            if self.answered() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "only {} of {count} answers within a minute",
            self.answered()
        );
    }

    /// How many answers were counted so far.
    pub fn answered(&self) -> usize {
        self.successes.load(Ordering::SeqCst)
    }

    /// Every serial answered, once all tasks ended (a task's failed assertion fails here).
    pub async fn join(self) -> Vec<String> {
        let mut answered = Vec::new();
        for task in self.tasks {
            answered.extend(task.await.unwrap());
        }
        answered
    }
}
