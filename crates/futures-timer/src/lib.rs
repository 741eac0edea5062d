//! `futures_timer::Delay` on tokio's timer wheel.
//!
//! libp2p times every substream (its upgrade, and request-response's
//! whole exchange) and a connection's idle shutdown with
//! `futures_timer::Delay`. The crates.io `futures-timer` keeps every timer
//! on one helper thread of its own, and wakes that thread when a timer is
//! made and again when it is dropped. A replicated write crosses the
//! network four times (forward, append, and their answers), each on a new
//! substream with two timers at each end, so the helper thread was woken
//! several times a write: `benches/threads.sh` measured 1.75 thread switches
//! and 15 µs of CPU a create on the leader's `futures-timer` thread alone.
//!
//! This crate has the same name and API (`Delay::new`, `Delay::reset`, a
//! `Future` of `()`), and the workspace's `[patch.crates-io]` puts it in
//! place of the original for all of libp2p. A delay made on a tokio runtime
//! is a `tokio::time::Sleep`: it is registered in the runtime's timer wheel
//! by the worker that polls it, and fired by a worker as it parks, with no
//! thread of its own. A delay made off any runtime (nothing in hie does
//! that; the crate must still work) gets a thread that sleeps for it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A future that completes once its duration has passed.
pub struct Delay {
    inner: Inner,
}

enum Inner {
    Tokio(Pin<Box<tokio::time::Sleep>>),
    Thread(Arc<Shared>),
}

impl Delay {
    /// A delay that completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        let inner = match tokio::runtime::Handle::try_current() {
            // `sleep` needs the runtime's time driver; the handle tells
            // whether there is a runtime, and every runtime hie builds has
            // time enabled (`enable_all`).
            Ok(_) => Inner::Tokio(Box::pin(tokio::time::sleep(dur))),
            Err(_) => Inner::Thread(Shared::start(dur)),
        };
        Delay { inner }
    }

    /// Starts the delay again, to complete `dur` from now (also after it
    /// has completed).
    pub fn reset(&mut self, dur: Duration) {
        match &mut self.inner {
            Inner::Tokio(sleep) => {
                // tokio's clock (which a test may have paused), not the system's.
                let now = tokio::time::Instant::now().into_std();
                sleep.as_mut().reset(deadline(now, dur).into());
            }
            Inner::Thread(shared) => shared.reset(dur),
        }
    }
}

/// `now + dur`, or for a duration too long to represent, about 30 years
/// from now (as tokio does for its own far-future deadlines).
fn deadline(now: Instant, dur: Duration) -> Instant {
    now.checked_add(dur).unwrap_or_else(|| now + Duration::from_secs(86400 * 365 * 30))
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.inner {
            Inner::Tokio(sleep) => sleep.as_mut().poll(cx),
            Inner::Thread(shared) => shared.poll(cx),
        }
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let deadline = match &self.inner {
            Inner::Tokio(sleep) => sleep.deadline().into_std(),
            Inner::Thread(shared) => shared.lock().deadline,
        };
        f.debug_struct("Delay").field("deadline", &deadline).finish()
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        if let Inner::Thread(shared) = &self.inner {
            shared.lock().dropped = true;
            shared.changed.notify_one();
        }
    }
}

/// A delay off any runtime: its own thread waits for the deadline.
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    deadline: Instant,
    fired: bool,
    waker: Option<Waker>,
    dropped: bool,
}

impl Shared {
    fn start(dur: Duration) -> Arc<Shared> {
        let deadline = deadline(Instant::now(), dur);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { deadline, fired: false, waker: None, dropped: false }),
            changed: Condvar::new(),
        });
        let waiting = shared.clone();
        // If no thread can be made, the delay fires at once rather than
        // never: libp2p's timers are timeouts, and an early timeout fails
        // one exchange where a lost one would hang it.
        if std::thread::Builder::new().name("delay".into()).spawn(move || waiting.run()).is_err() {
            shared.lock().fired = true;
        }
        shared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        let mut s = self.lock();
        loop {
            if s.dropped {
                return;
            }
            let now = Instant::now();
            if !s.fired && now >= s.deadline {
                s.fired = true;
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
            s = if s.fired {
                self.changed.wait(s).unwrap_or_else(PoisonError::into_inner)
            } else {
                let wait = s.deadline - now;
                self.changed.wait_timeout(s, wait).unwrap_or_else(PoisonError::into_inner).0
            };
        }
    }

    fn reset(&self, dur: Duration) {
        let mut s = self.lock();
        s.deadline = deadline(Instant::now(), dur);
        s.fired = false;
        drop(s);
        self.changed.notify_one();
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.fired {
            return Poll::Ready(());
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn on_a_runtime_a_delay_waits_its_time_and_no_longer() {
        let started = Instant::now();
        Delay::new(Duration::from_millis(50)).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(matches!(Delay::new(Duration::ZERO).inner, Inner::Tokio(_)));
    }

    #[tokio::test]
    async fn reset_moves_the_deadline_also_after_it_fired() {
        let mut d = Delay::new(Duration::from_secs(3600));
        d.reset(Duration::from_millis(20));
        tokio::time::timeout(Duration::from_secs(2), &mut d).await.expect("the reset delay fired");
        let started = Instant::now();
        d.reset(Duration::from_millis(30));
        (&mut d).await;
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn off_a_runtime_a_delay_has_a_thread_of_its_own() {
        // Each clock starts before the delay takes its deadline: the
        // deadline counts from `new` or `reset`, and starting a thread can
        // take milliseconds on a loaded machine.
        let started = Instant::now();
        let mut d = Delay::new(Duration::from_millis(40));
        assert!(matches!(d.inner, Inner::Thread(_)));
        futures::executor::block_on(&mut d);
        assert!(started.elapsed() >= Duration::from_millis(40));
        let started = Instant::now();
        d.reset(Duration::from_millis(10));
        futures::executor::block_on(&mut d);
        assert!(started.elapsed() >= Duration::from_millis(10));
        // A long delay dropped early stops its thread (it must not keep the
        // process busy); dropping must not block.
        let long = Delay::new(Duration::from_secs(3600));
        let started = Instant::now();
        drop(long);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_delay_made_off_a_runtime_can_be_awaited_on_one() {
        let d = Delay::new(Duration::from_millis(10));
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(d);
    }
}
