//! What task code uses for exactly-once effects: idempotency keys and per-key locks.
//!
//! An idempotency key is `once:<key>`, set with `NX PX`. A lock is `lock:<key>` holding
//! `<random token>:<fencing number>` with `PX`; only a caller that shows the whole value can
//! extend or delete it. The fencing number comes from `fence:<key>`, which outlives the lock (a
//! week after its last use): each new holder gets `max(last + 1, Redis time in µs)`, so numbers
//! grow with every holder while the counter lives and, once it has expired, still start above
//! every number handed out before.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::Script;
use tokio::time::Instant;

use super::redis::{NOW, RedisCoordinator};
use super::{Coordinator, MemoryCoordinator, millis};
use crate::error::Result;

/// How long a key's last fencing number is kept after the lock was last taken.
const FENCE_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// KEYS: lock, fence. ARGV: token, ttl ms, fence retention ms. The fencing number, or 0 if taken.
static LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fence = math.max((tonumber(redis.call('GET', KEYS[2])) or 0) + 1, now_us)
redis.call('SET', KEYS[2], int(fence), 'PX', ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. int(fence), 'PX', ARGV[2])
return fence
"
    ))
});

/// KEYS: lock. ARGV: value, ttl ms. 1 if the value still held the lock.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// KEYS: lock. ARGV: value. 1 if the value still held the lock.
static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// INCR that sets the expiry on the first count. KEYS: counter; ARGV: ttl in ms.
static COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
",
    )
});

/// [`COUNT`], and the value of a second key in the same round trip (`false`, a nil reply, when
/// it is not there: a nil would end the Lua table).
static COUNT_AND_GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return {n, redis.call('GET', KEYS[2]) or false}
",
    )
});

impl Coordinator {
    /// Claims the idempotency key `key` for `ttl`: `true` for the first caller, `false` for every
    /// later one until `ttl` has passed (or [`unclaim`] was called).
    ///
    /// [`unclaim`]: Coordinator::unclaim
    pub async fn claim_once(&self, key: &str, ttl: Duration) -> Result<bool> {
        match self {
            Coordinator::Redis(r) => {
                let set: Option<String> = ::redis::cmd("SET")
                    .arg(r.keyed("once", key))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl))
                    .query_async(&mut r.conn())
                    .await?;
                Ok(set.is_some())
            }
            Coordinator::Memory(m) => {
                let now = Instant::now();
                let mut s = m.state();
                s.once.retain(|_, until| *until > now);
                if s.once.contains_key(key) {
                    return Ok(false);
                }
                s.once
                    .insert(key.to_owned(), now + Duration::from_millis(millis(ttl)));
                Ok(true)
            }
        }
    }

    /// Adds one to the counter `key` and returns its new value; the counter disappears `ttl`
    /// after it was first counted. The worker counts deliveries of a message with it.
    pub async fn count(&self, key: &str, ttl: Duration) -> Result<u64> {
        match self {
            Coordinator::Redis(r) => {
                let n: u64 = COUNT
                    .key(r.keyed("count", key))
                    .arg(millis(ttl))
                    .invoke_async(&mut r.conn())
                    .await?;
                Ok(n)
            }
            Coordinator::Memory(m) => {
                let now = Instant::now();
                let mut s = m.state();
                s.counters.retain(|_, (_, until)| *until > now);
                let entry = s
                    .counters
                    .entry(key.to_owned())
                    .or_insert((0, now + Duration::from_millis(millis(ttl))));
                entry.0 += 1;
                Ok(entry.0)
            }
        }
    }

    /// [`count`](Coordinator::count), reading `other_key` of `other` in the same round trip;
    /// `None` when `other` is not this coordinator's Redis database (the caller then reads it
    /// itself). The worker counts a start and reads the task's stored result with it.
    pub(crate) async fn count_and_get(
        &self,
        key: &str,
        ttl: Duration,
        other: &crate::redis_conn::RedisConn,
        other_key: &str,
    ) -> Option<Result<(u64, Option<Vec<u8>>)>> {
        let Coordinator::Redis(r) = self else {
            return None;
        };
        let mut conn = r.conn();
        if !conn.same_database(other) {
            return None;
        }
        let reply: ::redis::RedisResult<(u64, Option<Vec<u8>>)> = COUNT_AND_GET
            .key(r.keyed("count", key))
            .key(other_key)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await;
        Some(reply.map_err(Into::into))
    }

    /// Undoes a claim, so the next [`claim_once`] of `key` succeeds: for an effect that failed
    /// and should be tried again.
    ///
    /// [`claim_once`]: Coordinator::claim_once
    pub async fn unclaim(&self, key: &str) -> Result<()> {
        match self {
            Coordinator::Redis(r) => {
                let _: i64 = ::redis::cmd("DEL")
                    .arg(r.keyed("once", key))
                    .query_async(&mut r.conn())
                    .await?;
            }
            Coordinator::Memory(m) => {
                m.state().once.remove(key);
            }
        }
        Ok(())
    }

    /// Takes the lock on `key` for `ttl`, or `None` if someone holds it.
    ///
    /// The lock expires after `ttl` unless [extended](KeyLock::extend), and is released by
    /// [`KeyLock::release`] or, in the background, when the guard is dropped. Work that must not
    /// outlive the lock should hand [`KeyLock::fence`] to whatever it writes to.
    pub async fn lock(&self, key: &str, ttl: Duration) -> Result<Option<KeyLock>> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let fence = match self {
            Coordinator::Redis(r) => {
                let fence: u64 = LOCK
                    .key(r.keyed("lock", key))
                    .key(r.keyed("fence", key))
                    .arg(&token)
                    .arg(millis(ttl))
                    .arg(millis(FENCE_RETENTION.max(ttl)))
                    .invoke_async(&mut r.conn())
                    .await?;
                (fence > 0).then_some(fence)
            }
            Coordinator::Memory(m) => m.lock(key, &token, ttl),
        };
        Ok(fence.map(|fence| KeyLock {
            coord: self.clone(),
            key: key.to_owned(),
            value: format!("{token}:{fence}"),
            fence,
            released: false,
        }))
    }
}

/// A held per-key lock. Released by [`release`](KeyLock::release), or in the background when
/// dropped; expires on its own after its time-to-live.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct KeyLock {
    coord: Coordinator,
    key: String,
    /// `<token>:<fence>`, the value stored under the lock key.
    value: String,
    fence: u64,
    released: bool,
}

impl std::fmt::Debug for KeyLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is what lets a caller release the lock: it stays out of logs.
        f.debug_struct("KeyLock")
            .field("key", &self.key)
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl KeyLock {
    /// The locked key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing number: greater than that of every earlier holder of this key, so a system
    /// that remembers the highest one it has seen can refuse writes from a holder whose lock
    /// expired while it was paused.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// Sets the lock to expire `ttl` from now; `false` if it had already expired (someone else may
    /// hold it now: stop the work it protects).
    pub async fn extend(&self, ttl: Duration) -> Result<bool> {
        match &self.coord {
            Coordinator::Redis(r) => {
                let n: i64 = EXTEND
                    .key(r.keyed("lock", &self.key))
                    .arg(&self.value)
                    .arg(millis(ttl))
                    .invoke_async(&mut r.conn())
                    .await?;
                Ok(n == 1)
            }
            Coordinator::Memory(m) => Ok(m.extend(&self.key, &self.value, ttl)),
        }
    }

    /// Releases the lock now; `false` if it had already expired.
    pub async fn release(mut self) -> Result<bool> {
        self.released = true;
        match &self.coord {
            Coordinator::Redis(r) => unlock(r, &self.key, &self.value).await,
            Coordinator::Memory(m) => Ok(m.unlock(&self.key, &self.value)),
        }
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        match &self.coord {
            Coordinator::Memory(m) => {
                m.unlock(&self.key, &self.value);
            }
            Coordinator::Redis(r) => {
                // Without a runtime the lock simply expires.
                let Ok(handle) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let (r, key, value) = (r.clone(), self.key.clone(), self.value.clone());
                handle.spawn(async move {
                    if let Err(e) = unlock(&r, &key, &value).await {
                        tracing::warn!(error = %e, key, "could not release a lock; it expires on its own");
                    }
                });
            }
        }
    }
}

async fn unlock(r: &RedisCoordinator, key: &str, value: &str) -> Result<bool> {
    let n: i64 = UNLOCK
        .key(r.keyed("lock", key))
        .arg(value)
        .invoke_async(&mut r.conn())
        .await?;
    Ok(n == 1)
}

impl MemoryCoordinator {
    fn lock(&self, key: &str, token: &str, ttl: Duration) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.state();
        if s.locks.get(key).is_some_and(|(_, until)| *until > now) {
            return None;
        }
        let fence = s.fences.entry(key.to_owned()).or_default();
        *fence += 1;
        let fence = *fence;
        let until = now + Duration::from_millis(millis(ttl));
        s.locks
            .insert(key.to_owned(), (format!("{token}:{fence}"), until));
        Some(fence)
    }

    fn extend(&self, key: &str, value: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        match self.state().locks.get_mut(key) {
            Some((held, until)) if held == value && *until > now => {
                *until = now + Duration::from_millis(millis(ttl));
                true
            }
            _ => false,
        }
    }

    fn unlock(&self, key: &str, value: &str) -> bool {
        let now = Instant::now();
        let mut s = self.state();
        match s.locks.get(key) {
            Some((held, until)) if held == value => {
                let live = *until > now;
                s.locks.remove(key);
                live
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_key_is_claimed_once_per_ttl() {
        let coord = Coordinator::memory();
        assert!(coord.claim_once("k", TTL).await.unwrap());
        assert!(!coord.clone().claim_once("k", TTL).await.unwrap());
        assert!(coord.claim_once("other", TTL).await.unwrap());
        tokio::time::advance(TTL).await;
        assert!(coord.claim_once("k", TTL).await.unwrap());
        coord.unclaim("k").await.unwrap();
        assert!(coord.claim_once("k", TTL).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn locks_exclude_and_fences_grow() {
        let coord = Coordinator::memory();
        let first = coord.lock("k", TTL).await.unwrap().unwrap();
        assert!(coord.lock("k", TTL).await.unwrap().is_none());
        assert!(coord.lock("other", TTL).await.unwrap().is_some());
        let fence = first.fence();
        assert!(first.release().await.unwrap());

        let second = coord.lock("k", TTL).await.unwrap().unwrap();
        assert!(second.fence() > fence);
        drop(second);
        let third = coord.lock("k", TTL).await.unwrap().unwrap();
        assert!(format!("{third:?}").contains("fence"));
        assert!(!format!("{third:?}").contains(&third.value));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lock_goes_to_the_next_caller() {
        let coord = Coordinator::memory();
        let stale = coord.lock("k", TTL).await.unwrap().unwrap();
        tokio::time::advance(TTL / 2).await;
        assert!(stale.extend(TTL).await.unwrap());
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        assert!(coord.lock("k", TTL).await.unwrap().is_none());
        tokio::time::advance(Duration::from_millis(1)).await;

        let fresh = coord.lock("k", TTL).await.unwrap().unwrap();
        assert!(fresh.fence() > stale.fence());
        // The old holder can neither extend nor release the new holder's lock.
        assert!(!stale.extend(TTL).await.unwrap());
        assert!(!stale.release().await.unwrap());
        assert!(coord.lock("k", TTL).await.unwrap().is_none());
        assert!(fresh.release().await.unwrap());
    }
}
