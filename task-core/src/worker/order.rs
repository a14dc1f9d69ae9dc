//! Messages take slots in the order they arrived.
//!
//! Every delivery joins a [`Line`] as the consumer receives it, then does its checks (the stored
//! result, revokes, the ETA, flow limits) in a task of its own; those checks take different
//! times (a Redis round trip, a permit), so without the line a message received later could take
//! a free slot before an earlier one, and a queue would not run in order. A delivery waits for
//! its [`Place::turn`] just before asking for a slot and leaves the line once it has one. A
//! delivery that leaves early (a duplicate, revoked, deferred) leaves the line when its place
//! is dropped. Before a wait of unbounded length (an ETA, a rate-limit permit, a copy of a
//! running task) a delivery gives up its place and joins again afterwards, so it never holds
//! up the messages behind it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// The deliveries waiting to take a slot, by arrival.
#[derive(Debug, Default)]
pub(crate) struct Line {
    state: Mutex<LineState>,
}

#[derive(Debug, Default)]
struct LineState {
    next: u64,
    waiting: BTreeMap<u64, Arc<Notify>>,
}

impl Line {
    /// A place at the end of the line.
    pub(crate) fn join(self: &Arc<Self>) -> Place {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let n = s.next;
        s.next += 1;
        let notify = Arc::new(Notify::new());
        s.waiting.insert(n, notify.clone());
        Place {
            n,
            notify,
            line: self.clone(),
        }
    }

    /// Deliveries in the line.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiting
            .len()
    }
}

/// One delivery's place in the [`Line`]; leaving is dropping it.
#[derive(Debug)]
pub(crate) struct Place {
    n: u64,
    notify: Arc<Notify>,
    line: Arc<Line>,
}

impl Place {
    /// Waits until every delivery that arrived earlier has taken a slot or left the line.
    pub(crate) async fn turn(&self) {
        loop {
            {
                let s = self
                    .line
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if s.waiting.keys().next() == Some(&self.n) {
                    return;
                }
            }
            // `notify_one` keeps a permit when nobody waits yet, so no wake-up is lost between
            // the check and this wait.
            self.notify.notified().await;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut s = self
            .line
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let was_first = s.waiting.keys().next() == Some(&self.n);
        s.waiting.remove(&self.n);
        if was_first && let Some((_, next)) = s.waiting.iter().next() {
            next.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn places_take_their_turn_in_arrival_order() {
        let line = Arc::new(Line::default());
        let (a, b, c) = (line.join(), line.join(), line.join());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Started in reverse: they still go in arrival order.
        for (name, place) in [("c", c), ("b", b)] {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                place.turn().await;
                order.lock().unwrap().push(name);
                drop(place);
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            order.lock().unwrap().is_empty(),
            "nobody goes before the first"
        );
        a.turn().await;
        order.lock().unwrap().push("a");
        drop(a);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a", "b", "c"]);
        assert_eq!(line.len(), 0);
    }

    #[tokio::test]
    async fn leaving_the_line_early_lets_the_next_one_go() {
        let line = Arc::new(Line::default());
        let (a, b, c) = (line.join(), line.join(), line.join());
        drop(b);
        let waiter = tokio::spawn(async move { c.turn().await });
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("c's turn comes once a and b are gone")
            .unwrap();
    }
}
