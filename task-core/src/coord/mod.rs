//! Coordination through Redis: the cluster-wide state that workers and tasks share.
//!
//! A worker alone can keep revokes, rate limits and concurrency limits in memory; a cluster of them
//! needs one place that every worker, including one started later, sees. [`Coordinator`] is that
//! place: Redis in production (the same server as `RESULT_BACKEND`), or an in-process map with the
//! same semantics for tests ([`Coordinator::memory`]).
//!
//! | capability | methods | Redis keys (default prefix `tq:`) |
//! |---|---|---|
//! | durable revokes | [`revoke`], [`is_revoked`], [`revoked_since`] | `tq:revoked` (zset id → expiry ms), `tq:revoked:seq` (zset id → sequence), `tq:revoked:meta` (hash: `epoch`, `seq`) |
//! | rate limit (GCRA) | [`try_rate`] | `tq:rate:<key>` (theoretical arrival time, µs) |
//! | concurrency limit | [`try_acquire`], [`renew`], [`release`] | `tq:conc:<key>` (zset holder → lease expiry ms) |
//! | rate limits set at run time | [`set_rate_limit`], [`rate_limits`] | `tq:limits:rate` (hash task → starts per second) |
//! | idempotency keys | [`claim_once`], [`unclaim`] | `tq:once:<key>` |
//! | per-key locks | [`lock`], [`KeyLock`] | `tq:lock:<key>` (`<token>:<fence>`), `tq:fence:<key>` (last fencing number) |
//!
//! # Invariants
//!
//! - **One clock.** Every expiry, lease and rate-limit slot is computed from the Redis server's
//!   `TIME` inside the Lua script that reads or writes it, so clock skew between workers never
//!   matters. (The memory implementation uses tokio's clock, so tests can pause it.)
//! - **Atomic steps.** Each operation is one command or one Lua script: two workers racing for the
//!   last permit, the same lock or the same rate slot cannot both win.
//! - **Revokes** stay valid until their expiry (a repeated revoke extends it, never shortens it),
//!   then disappear everywhere. [`revoked_since`] returns every id revoked after the cursor that is
//!   still valid, with its remaining time; a cursor from a Redis that lost its data (a new epoch) or
//!   went back in time makes the next call return everything still valid, so a worker never misses
//!   a revoke because Redis was restored.
//! - **Rate limits** are GCRA with a burst of one, as Celery's token bucket of capacity one: grants
//!   for the same key are at least `1 / rate` apart, across all workers. [`try_rate`] never
//!   reserves a slot it did not grant, so a worker that gives up costs nobody a slot.
//! - **Concurrency permits** are leases: a holder counts until its lease runs out, so a worker that
//!   dies frees its permits within one lease. Acquiring again as the same holder renews, never
//!   takes a second permit. A renewal after the lease ran out fails even if the permit is free.
//! - **Locks** carry a random token (only the holder can extend or release them) and a fencing
//!   number that is strictly greater than that of every earlier holder of the same key, so the
//!   system a lock protects can reject a holder whose lock expired while it was paused.
//! - [`claim_once`] is an idempotency key: `true` to exactly one caller per `ttl`. On its own it
//!   gives *at most once*: a crash between the claim and the effect loses the effect. Pair it with
//!   [`unclaim`] on failure and, for effects that must survive crashes, an idempotency key at the
//!   receiving end (the fencing number or the task id).
//!
//! All keys share one prefix ([`Coordinator::with_prefix`]). Scripts touch several keys of one
//! concept at once; on Redis Cluster use a prefix with a hash tag, such as `{tq}:`, so they share
//! a slot.
//!
//! # Example
//!
//! A task's exactly-once side effect: two deliveries of the same message, even running at the
//! same time on two workers, send one receipt.
//!
//! ```
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use task_core::TaskError;
//! use task_core::coord::Coordinator;
//!
//! /// Where receipts go; it keeps the highest fencing number it has seen per invoice.
//! #[derive(Default)]
//! struct Mailer(Mutex<Vec<(String, u64)>>);
//!
//! impl Mailer {
//!     fn send(&self, invoice: &str, fence: u64) -> Result<(), TaskError> {
//!         let mut sent = self.0.lock().unwrap();
//!         if sent.iter().any(|(i, f)| i == invoice && *f > fence) {
//!             return Err(TaskError::abort("StaleLock", "a later lock holder has sent it"));
//!         }
//!         sent.push((invoice.to_owned(), fence));
//!         Ok(())
//!     }
//! }
//!
//! /// The body of a `billing.send_receipt` task, with the worker's coordinator
//! /// (`ctx.coordinator()`).
//! async fn send_receipt(coord: &Coordinator, mailer: &Mailer, invoice: &str) -> Result<(), TaskError> {
//!     let unavailable = |e: task_core::Error| TaskError::retry(e.to_string());
//!     let key = format!("receipt:{invoice}");
//!     // Deliveries of the same invoice take turns; one that finds the lock taken retries later.
//!     let Some(lock) = coord.lock(&key, Duration::from_secs(30)).await.map_err(unavailable)? else {
//!         return Err(TaskError::retry_after(Duration::from_secs(1), "another delivery is sending it"));
//!     };
//!     // Under the lock, the first delivery claims the effect; later ones find it done.
//!     if coord.claim_once(&key, Duration::from_secs(86_400)).await.map_err(unavailable)? {
//!         if let Err(e) = mailer.send(invoice, lock.fence()) {
//!             // Not sent: let a retry send it.
//!             coord.unclaim(&key).await.map_err(unavailable)?;
//!             return Err(e);
//!         }
//!     }
//!     lock.release().await.map_err(unavailable)?;
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let coord = Coordinator::memory(); // Coordinator::connect("redis://127.0.0.1:6379/0") in production
//! let mailer = Mailer::default();
//! send_receipt(&coord, &mailer, "inv-1").await?;
//! send_receipt(&coord, &mailer, "inv-1").await?; // redelivered: nothing sent
//! assert_eq!(mailer.0.lock().unwrap().len(), 1);
//!
//! // The worker side: a revoke reaches every worker, also one that syncs later.
//! coord.revoke(&["t-42".to_owned()], Duration::from_secs(3 * 3600)).await?;
//! assert!(coord.is_revoked("t-42").await?);
//! let (revoked, cursor) = coord.revoked_since(None).await?;
//! assert_eq!(revoked[0].id, "t-42");
//! assert!(coord.revoked_since(Some(cursor)).await?.0.is_empty());
//!
//! // At most 10 starts a second across the cluster, and at most 2 running at once.
//! let rate = "10/s".parse()?;
//! assert_eq!(coord.try_rate("billing.charge", rate).await?, None);
//! assert!(coord.try_rate("billing.charge", rate).await?.is_some());
//! assert!(coord.try_acquire("gateway", 2, "worker-a", Duration::from_secs(60)).await?);
//! assert!(coord.try_acquire("gateway", 2, "worker-b", Duration::from_secs(60)).await?);
//! assert!(!coord.try_acquire("gateway", 2, "worker-c", Duration::from_secs(60)).await?);
//! coord.release("gateway", "worker-a").await?;
//! assert!(coord.try_acquire("gateway", 2, "worker-c", Duration::from_secs(60)).await?);
//! # Ok(())
//! # }
//! ```
//!
//! [`revoke`]: Coordinator::revoke
//! [`is_revoked`]: Coordinator::is_revoked
//! [`revoked_since`]: Coordinator::revoked_since
//! [`try_rate`]: Coordinator::try_rate
//! [`try_acquire`]: Coordinator::try_acquire
//! [`renew`]: Coordinator::renew
//! [`release`]: Coordinator::release
//! [`set_rate_limit`]: Coordinator::set_rate_limit
//! [`rate_limits`]: Coordinator::rate_limits
//! [`claim_once`]: Coordinator::claim_once
//! [`unclaim`]: Coordinator::unclaim
//! [`lock`]: Coordinator::lock

mod concurrency;
mod locks;
mod memory;
mod rate;
mod redis;
mod revoked;

use std::time::Duration;

pub use self::concurrency::Admit;
pub use self::locks::KeyLock;
pub use self::memory::MemoryCoordinator;
pub use self::redis::RedisCoordinator;
pub use self::revoked::{RevokeCursor, Revoked};
use crate::backend::RedisBackend;
use crate::error::{Error, Result};

/// The prefix of every key unless [`Coordinator::with_prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "tq:";

/// Cluster-wide revokes, rate limits, concurrency limits, idempotency keys and locks.
///
/// Cheap to clone: clones share the connection (or the in-process state).
#[derive(Clone, Debug)]
pub enum Coordinator {
    /// Shared by every process using the same Redis and prefix.
    Redis(RedisCoordinator),
    /// Shared by the clones of one value, in this process only.
    Memory(MemoryCoordinator),
}

impl Coordinator {
    /// Connects to the coordinator a URL names: `redis://…` or `rediss://…` (the same URL as
    /// `RESULT_BACKEND`), or `memory://` for a fresh in-process one. Fails if Redis cannot be
    /// reached now.
    pub async fn connect(url: &str) -> Result<Self> {
        if url.starts_with("memory://") {
            Ok(Coordinator::memory())
        } else if crate::redis_url::is_redis_url(url) {
            let backend = RedisBackend::connect(url).await?;
            Ok(Coordinator::Redis(RedisCoordinator::new(
                backend.connection(),
                Some(crate::redact_url(url)),
            )))
        } else {
            Err(Error::Config(format!(
                "coordination URL `{}` is not supported (use redis://host:port/db, \
                 sentinel://…, the RESULT_BACKEND, or memory://)",
                crate::redact_url(url)
            )))
        }
    }

    /// Shares the connection of a result backend, so a worker keeps one connection to Redis.
    pub fn from_backend(backend: &RedisBackend) -> Self {
        Coordinator::Redis(RedisCoordinator::new(backend.connection(), None))
    }

    /// A fresh in-process coordinator with the same semantics, for tests without services.
    pub fn memory() -> Self {
        Coordinator::Memory(MemoryCoordinator::default())
    }

    /// Puts every key under `prefix` instead of `tq:` (tests, several clusters on one Redis, a
    /// hash tag for Redis Cluster). No effect on a memory coordinator, which shares nothing anyway.
    pub fn with_prefix(self, prefix: impl Into<String>) -> Self {
        match self {
            Coordinator::Redis(r) => Coordinator::Redis(r.with_prefix(prefix.into())),
            m @ Coordinator::Memory(_) => m,
        }
    }

    /// Checks that Redis answers, for readiness probes.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Coordinator::Redis(r) => r.ping().await,
            Coordinator::Memory(_) => Ok(()),
        }
    }
}

impl From<MemoryCoordinator> for Coordinator {
    fn from(m: MemoryCoordinator) -> Self {
        Coordinator::Memory(m)
    }
}

impl From<RedisCoordinator> for Coordinator {
    fn from(r: RedisCoordinator) -> Self {
        Coordinator::Redis(r)
    }
}

/// Whole milliseconds, at least 1 (Redis rejects a `PX` of 0).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_pick_the_implementation() {
        let memory = Coordinator::connect("memory://").await.unwrap();
        assert!(matches!(memory, Coordinator::Memory(_)));
        memory.ping().await.unwrap();

        let err = Coordinator::connect("amqp://guest:secret@h/")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("amqp://guest:***@h/"), "{text}");
        assert!(text.contains("memory://"), "{text}");
    }
}
