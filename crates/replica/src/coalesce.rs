//! Read-index coalescing: concurrent linearizable reads share one round of
//! "confirm leadership with a quorum and name the commit index", as etcd
//! batches its ReadIndex requests.
//!
//! Safety rests on one rule: a caller is answered only by a round that
//! *started after it called*. Such a round's index covers every write
//! committed before the call, which is what makes the read after it
//! linearizable. A round already in flight when a caller arrives may have
//! named its index before a write the caller saw complete, so the caller
//! waits for the next round instead. At most one round runs at a time; all
//! callers that arrived during it share the next.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::sync::oneshot;

type Round<T> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = T> + Send>> + Send + Sync>;

pub(crate) struct Coalesce<T> {
    round: Round<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    /// A driver task is running rounds.
    running: bool,
    /// Callers waiting for a round that has not started yet.
    next: Vec<oneshot::Sender<T>>,
}

impl<T: Clone + Send + 'static> Coalesce<T> {
    /// Coalesces runs of `round`.
    pub(crate) fn new<F, Fut>(round: F) -> Arc<Coalesce<T>>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        Arc::new(Coalesce {
            round: Box::new(move || Box::pin(round())),
            state: Mutex::new(State { running: false, next: Vec::new() }),
        })
    }

    /// The result of a round that started after this call, shared with
    /// every other caller waiting for the same round. `None` if that round
    /// panicked or the driver went away (the runtime is shutting down).
    pub(crate) async fn call(self: &Arc<Self>) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.state.lock().expect("coalesce lock");
            s.next.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.drive().await });
        }
        rx.await.ok()
    }

    /// Runs rounds while callers wait, each for everyone who arrived before it started.
    async fn drive(self: Arc<Self>) {
        loop {
            let waiting = {
                let mut s = self.state.lock().expect("coalesce lock");
                let waiting = std::mem::take(&mut s.next);
                if waiting.is_empty() {
                    s.running = false;
                    return;
                }
                waiting
            };
            // Callers that gave up (timed out) need no round.
            if waiting.iter().all(|w| w.is_closed()) {
                continue;
            }
            // A round that panicked answers nobody (its callers see `None`),
            // and the rounds go on: one bad round must not stall every
            // later read.
            let Ok(result) = AssertUnwindSafe((self.round)()).catch_unwind().await else {
                tracing::error!("a coalesced round panicked; its callers are failed");
                continue;
            };
            for w in waiting {
                let _ = w.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// Many concurrent callers share few rounds, and each gets a round that
    /// started after it called.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_share_rounds_that_started_after_they_called() {
        let rounds = Arc::new(AtomicU64::new(0));
        // A round's result is when it started, on a counter every call also reads.
        let clock = Arc::new(AtomicU64::new(0));
        let c = {
            let (rounds, clock) = (rounds.clone(), clock.clone());
            Coalesce::new(move || {
                let (rounds, clock) = (rounds.clone(), clock.clone());
                async move {
                    rounds.fetch_add(1, Ordering::SeqCst);
                    let started = clock.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    started
                }
            })
        };
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let (c, clock) = (c.clone(), clock.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(i * 50)).await;
                let called = clock.fetch_add(1, Ordering::SeqCst);
                let started = c.call().await.expect("a round ran");
                (called, started)
            }));
        }
        for t in tasks {
            let (called, started) = t.await.unwrap();
            assert!(started > called, "answered by a round that started at {started}, before the call at {called}");
        }
        let rounds = rounds.load(Ordering::SeqCst);
        assert!(rounds < 100, "200 callers over ~10 ms of 2 ms rounds ran {rounds} rounds");
        assert!(rounds >= 2);
    }

    /// A round that panics fails its callers, and later rounds still run.
    #[tokio::test]
    async fn a_panicking_round_fails_its_callers_only() {
        let n = Arc::new(AtomicU64::new(0));
        let c = {
            let n = n.clone();
            Coalesce::new(move || {
                let n = n.clone();
                async move {
                    let i = n.fetch_add(1, Ordering::SeqCst);
                    assert!(i != 0, "the first round fails");
                    i
                }
            })
        };
        assert_eq!(c.call().await, None);
        assert_eq!(c.call().await, Some(1));
    }

    /// A caller arriving after the rounds stopped starts them again.
    #[tokio::test]
    async fn rounds_restart_after_going_idle() {
        let n = Arc::new(AtomicU64::new(0));
        let c = {
            let n = n.clone();
            Coalesce::new(move || {
                let n = n.clone();
                async move { n.fetch_add(1, Ordering::SeqCst) }
            })
        };
        assert_eq!(c.call().await, Some(0));
        tokio::task::yield_now().await;
        assert_eq!(c.call().await, Some(1));
    }
}
