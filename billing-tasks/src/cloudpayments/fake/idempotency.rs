//! `X-Request-ID` replay (§5): one response per (Public ID, request id), kept for the TTL.
//!
//! The first request with a key claims it and processes; a concurrent duplicate waits for that
//! first one to finish and receives its stored response; later duplicates get the stored
//! response at once. Every completed response is stored (accepted, declined, request error),
//! whatever the body or endpoint of the repeat — the documented default. A claim that ends
//! without a response (a fault before processing) releases the key, so waiters process it
//! themselves. Whether a duplicate of a request still in flight is blocked is not documented
//! (§5); [`IdempotencyCache::set_block_in_flight`] turns the blocking off, so tests can show
//! what happens if the real gateway processes such a duplicate again. The lock is held only to look up or update the map, never across an await.
//! Expired entries are pruned on each claim, oldest first, so memory is bounded by one TTL's
//! worth of responses.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use tokio::sync::watch;

/// A response as it went out: replayed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    pub status: u16,
    pub body: Bytes,
}

type Key = (String, String);
type Shared = Arc<StoredResponse>;

enum Slot {
    InFlight(watch::Receiver<Option<Shared>>),
    Done(Shared, Instant),
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Slot>,
    /// Completion times in order, for pruning.
    order: VecDeque<(Instant, Key)>,
}

/// The replay cache.
pub(crate) struct IdempotencyCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    block_in_flight: AtomicBool,
}

impl std::fmt::Debug for IdempotencyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The right and duty to process a key; dropping it without [`Ticket::complete`] releases it.
pub(crate) struct Ticket<'a> {
    cache: &'a IdempotencyCache,
    key: Key,
    tx: Option<watch::Sender<Option<Shared>>>,
}

/// What a request with a key does.
pub(crate) enum Claim<'a> {
    /// Process it and complete the ticket.
    Process(Ticket<'a>),
    /// Send this stored response.
    Replay(Shared),
}

impl IdempotencyCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        IdempotencyCache {
            inner: Mutex::new(Inner::default()),
            ttl,
            block_in_flight: AtomicBool::new(true),
        }
    }

    /// Whether a duplicate of a request still being processed waits for it (the default) or is
    /// processed again.
    pub(crate) fn set_block_in_flight(&self, block: bool) {
        self.block_in_flight.store(block, Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (every update is one insert
        // or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `key`, waiting while another request holds it.
    pub(crate) async fn claim(&self, public_id: &str, request_id: &str) -> Claim<'_> {
        let key = (public_id.to_owned(), request_id.to_owned());
        loop {
            let mut rx = {
                let mut inner = self.lock();
                self.prune(&mut inner, Instant::now());
                match inner.map.get(&key) {
                    Some(Slot::Done(stored, _)) => return Claim::Replay(stored.clone()),
                    Some(Slot::InFlight(_)) if !self.block_in_flight.load(Ordering::Acquire) => {
                        // Processed again; the first one's waiters still get the first answer.
                        return Claim::Process(Ticket {
                            cache: self,
                            key,
                            tx: None,
                        });
                    }
                    Some(Slot::InFlight(rx)) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        inner.map.insert(key.clone(), Slot::InFlight(rx));
                        return Claim::Process(Ticket {
                            cache: self,
                            key,
                            tx: Some(tx),
                        });
                    }
                }
            };
            // Wait for the holder; if it gave up (sender dropped), claim again.
            if let Ok(stored) = rx.wait_for(Option::is_some).await
                && let Some(stored) = stored.clone()
            {
                return Claim::Replay(stored);
            }
        }
    }

    fn prune(&self, inner: &mut Inner, now: Instant) {
        while let Some((at, _)) = inner.order.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            let Some((at, key)) = inner.order.pop_front() else {
                break;
            };
            // The key may have expired and been stored again since; only drop this version.
            if matches!(inner.map.get(&key), Some(Slot::Done(_, stored_at)) if *stored_at == at) {
                inner.map.remove(&key);
            }
        }
    }

    /// Responses currently stored or in flight.
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }
}

impl Ticket<'_> {
    /// Stores the response and wakes the waiters.
    pub(crate) fn complete(mut self, response: StoredResponse) -> Shared {
        let stored = Arc::new(response);
        let now = Instant::now();
        {
            let mut inner = self.cache.lock();
            inner
                .map
                .insert(self.key.clone(), Slot::Done(stored.clone(), now));
            inner.order.push_back((now, self.key.clone()));
        }
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(stored.clone()));
        }
        stored
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Released without a response: nothing was processed; let the next request try.
            self.cache.lock().map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(n: u8) -> StoredResponse {
        StoredResponse {
            status: 200,
            body: Bytes::from(vec![n]),
        }
    }

    #[tokio::test]
    async fn first_wins_and_duplicates_replay() {
        let cache = IdempotencyCache::new(Duration::from_secs(60));
        let Claim::Process(ticket) = cache.claim("pk", "a").await else {
            panic!("first claim must process")
        };
        let waiter = async {
            match cache.claim("pk", "a").await {
                Claim::Replay(r) => r,
                Claim::Process(_) => panic!("duplicate must wait"),
            }
        };
        let completer = async {
            tokio::task::yield_now().await;
            ticket.complete(response(1))
        };
        let (replayed, stored) = tokio::join!(waiter, completer);
        assert_eq!(replayed, stored);
        assert!(matches!(cache.claim("pk", "a").await, Claim::Replay(r) if r.body[0] == 1));
        // Another terminal's key is separate.
        assert!(matches!(cache.claim("other", "a").await, Claim::Process(_)));
    }

    #[tokio::test]
    async fn in_flight_duplicates_are_processed_again_when_not_blocked() {
        let cache = IdempotencyCache::new(Duration::from_secs(60));
        cache.set_block_in_flight(false);
        let Claim::Process(first) = cache.claim("pk", "a").await else {
            panic!()
        };
        let Claim::Process(second) = cache.claim("pk", "a").await else {
            panic!("an in-flight duplicate is let through")
        };
        second.complete(response(2));
        first.complete(response(1));
        assert!(matches!(cache.claim("pk", "a").await, Claim::Replay(r) if r.body[0] == 1));
    }

    #[tokio::test]
    async fn released_claims_let_the_next_request_process() {
        let cache = IdempotencyCache::new(Duration::from_secs(60));
        let Claim::Process(ticket) = cache.claim("pk", "a").await else {
            panic!()
        };
        let waiter = async {
            match cache.claim("pk", "a").await {
                Claim::Process(t) => t.complete(response(2)),
                Claim::Replay(_) => panic!("nothing was stored"),
            }
        };
        let releaser = async {
            tokio::task::yield_now().await;
            drop(ticket);
        };
        let (stored, ()) = tokio::join!(waiter, releaser);
        assert_eq!(stored.body[0], 2);
    }

    #[tokio::test]
    async fn expired_entries_are_pruned() {
        let cache = IdempotencyCache::new(Duration::ZERO);
        let Claim::Process(t) = cache.claim("pk", "a").await else {
            panic!()
        };
        t.complete(response(1));
        assert!(matches!(cache.claim("pk", "a").await, Claim::Process(_)));
        assert_eq!(cache.len(), 0);
    }
}
