//! Cluster-wide concurrency limits with leases.
//!
//! A key's permits are one sorted set, `conc:<key>`, holder → lease expiry (ms, Redis time). A
//! holder counts while its lease runs; every script first drops the expired ones, so a holder that
//! died frees its permit when its lease runs out, with nobody having to notice. The set itself
//! expires with its longest lease.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::{AsyncCommands, Script};
use tokio::time::Instant;

use super::redis::NOW;
use super::{Coordinator, MemoryCoordinator, millis};
use crate::error::Result;

/// Drops expired leases, and (after a change) makes the set expire with its longest lease.
const LEASES: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local function expire_with_last_lease()
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', KEYS[1], int(math.max(1, tonumber(last[2]) - now_ms)))
  end
end
";

/// KEYS: conc key. ARGV: limit, holder, lease ms. 1 if the holder holds a permit now.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{LEASES}{}",
        r"
local held = redis.call('ZSCORE', KEYS[1], ARGV[2])
if held or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], int(now_ms + tonumber(ARGV[3])), ARGV[2])
  expire_with_last_lease()
  return 1
end
return 0
"
    ))
});

/// KEYS: conc key. ARGV: holder, lease ms. 1 if the holder's lease was still running.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{LEASES}{}",
        r"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', int(now_ms + tonumber(ARGV[2])), ARGV[1])
  expire_with_last_lease()
  return 1
end
return 0
"
    ))
});

/// KEYS: conc key, rate key. ARGV: rate interval µs (0: none), limit, holder, lease ms.
/// 0 if admitted (a permit taken and a rate slot used), the rate wait in µs, or -1 if every
/// permit is taken.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{LEASES}{}",
        r"
local held = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not held and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return -1
end
local interval = tonumber(ARGV[1])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]))
  if tat and tat > now_us then return tat - now_us end
  redis.call('SET', KEYS[2], int(now_us + interval), 'PX', int(math.max(1, math.ceil(interval / 1000))))
end
redis.call('ZADD', KEYS[1], int(now_ms + tonumber(ARGV[4])), ARGV[3])
expire_with_last_lease()
return 0
"
    ))
});

/// What [`Coordinator::try_admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A permit is held and a rate slot was used.
    Granted,
    /// Every permit is taken.
    Busy,
    /// A permit is free but the next rate slot is this far away (nothing was taken).
    Wait(Duration),
}

impl Coordinator {
    /// Takes a permit of `key` (one of `limit`, as `holder`, for `lease`) and a start slot of
    /// the same key's `rate` together, in one round trip: the per-key limit of a task type that
    /// has both. Nothing is taken unless both are free.
    pub async fn try_admit(
        &self,
        key: &str,
        limit: u32,
        rate: Option<crate::backoff::RateLimit>,
        holder: &str,
        lease: Duration,
    ) -> Result<Admit> {
        let interval = match rate {
            Some(r) => Some(super::rate::interval(r)?),
            None => None,
        };
        match self {
            Coordinator::Redis(r) => {
                let n: i64 = ADMIT
                    .key(r.keyed("conc", key))
                    .key(r.keyed("rate", key))
                    .arg(interval.map_or(0, |i| u64::try_from(i.as_micros()).unwrap_or(u64::MAX)))
                    .arg(limit)
                    .arg(holder)
                    .arg(millis(lease))
                    .invoke_async(&mut r.conn())
                    .await?;
                Ok(match n {
                    0 => Admit::Granted,
                    n if n < 0 => Admit::Busy,
                    n => Admit::Wait(Duration::from_micros(n.unsigned_abs())),
                })
            }
            Coordinator::Memory(m) => {
                if !m.try_acquire(key, Some(limit), holder, lease) {
                    return Ok(Admit::Busy);
                }
                if let Some(interval) = interval
                    && let Some(wait) = m.rate_wait(key, interval)
                {
                    m.state()
                        .conc
                        .entry(key.to_owned())
                        .or_default()
                        .remove(holder);
                    return Ok(Admit::Wait(wait));
                }
                Ok(Admit::Granted)
            }
        }
    }

    /// Takes one of `limit` permits for `key` as `holder`, for `lease`; `false` if all are taken.
    ///
    /// A holder that already holds a permit keeps it and gets a fresh lease (acquiring is
    /// idempotent), even if `limit` was lowered since. The holder must [`renew`] well within the
    /// lease, or the permit goes to someone else.
    ///
    /// [`renew`]: Coordinator::renew
    pub async fn try_acquire(
        &self,
        key: &str,
        limit: u32,
        holder: &str,
        lease: Duration,
    ) -> Result<bool> {
        match self {
            Coordinator::Redis(r) => {
                let n: i64 = ACQUIRE
                    .key(r.keyed("conc", key))
                    .arg(limit)
                    .arg(holder)
                    .arg(millis(lease))
                    .invoke_async(&mut r.conn())
                    .await?;
                Ok(n == 1)
            }
            Coordinator::Memory(m) => Ok(m.try_acquire(key, Some(limit), holder, lease)),
        }
    }

    /// Extends `holder`'s lease on its permit for `key` to `lease` from now; `false` if it had run
    /// out (the permit may be someone else's now: stop, or acquire again).
    pub async fn renew(&self, key: &str, holder: &str, lease: Duration) -> Result<bool> {
        match self {
            Coordinator::Redis(r) => {
                let n: i64 = RENEW
                    .key(r.keyed("conc", key))
                    .arg(holder)
                    .arg(millis(lease))
                    .invoke_async(&mut r.conn())
                    .await?;
                Ok(n == 1)
            }
            Coordinator::Memory(m) => Ok(m.try_acquire(key, None, holder, lease)),
        }
    }

    /// Releases many permits (`(key, holder)` pairs) in one round trip.
    pub async fn release_many(&self, permits: &[(String, String)]) -> Result<()> {
        match self {
            Coordinator::Redis(r) => {
                if permits.is_empty() {
                    return Ok(());
                }
                let mut pipe = ::redis::pipe();
                for (key, holder) in permits {
                    pipe.zrem(r.keyed("conc", key), holder).ignore();
                }
                let () = pipe.query_async(&mut r.conn()).await?;
                Ok(())
            }
            Coordinator::Memory(_) => {
                for (key, holder) in permits {
                    Box::pin(self.release(key, holder)).await?;
                }
                Ok(())
            }
        }
    }

    /// Gives `holder`'s permit for `key` back at once (nothing happens if it holds none).
    pub async fn release(&self, key: &str, holder: &str) -> Result<()> {
        match self {
            Coordinator::Redis(r) => {
                let _: i64 = r.conn().zrem(r.keyed("conc", key), holder).await?;
                Ok(())
            }
            Coordinator::Memory(m) => {
                let mut s = m.state();
                if let Some(holders) = s.conc.get_mut(key) {
                    holders.remove(holder);
                    if holders.is_empty() {
                        s.conc.remove(key);
                    }
                }
                Ok(())
            }
        }
    }
}

impl MemoryCoordinator {
    /// Acquire (`limit` given) or renew (`None`: only a running lease is extended).
    fn try_acquire(&self, key: &str, limit: Option<u32>, holder: &str, lease: Duration) -> bool {
        let now = Instant::now();
        let mut s = self.state();
        let holders: &mut HashMap<String, Instant> = s.conc.entry(key.to_owned()).or_default();
        holders.retain(|_, until| *until > now);
        let held = holders.contains_key(holder);
        let granted = held
            || limit.is_some_and(|limit| u32::try_from(holders.len()).is_ok_and(|n| n < limit));
        if granted {
            holders.insert(
                holder.to_owned(),
                now + Duration::from_millis(millis(lease)),
            );
        }
        if holders.is_empty() {
            s.conc.remove(key);
        }
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn permits_are_limited_and_released() {
        let coord = Coordinator::memory();
        assert!(coord.try_acquire("k", 2, "a", LEASE).await.unwrap());
        assert!(coord.try_acquire("k", 2, "b", LEASE).await.unwrap());
        assert!(!coord.try_acquire("k", 2, "c", LEASE).await.unwrap());
        // Acquiring again as a holder is not a second permit.
        assert!(coord.try_acquire("k", 2, "a", LEASE).await.unwrap());
        assert!(!coord.try_acquire("k", 2, "c", LEASE).await.unwrap());
        // Other keys are independent.
        assert!(coord.try_acquire("other", 1, "c", LEASE).await.unwrap());

        coord.release("k", "a").await.unwrap();
        coord.release("k", "nobody").await.unwrap();
        assert!(coord.try_acquire("k", 2, "c", LEASE).await.unwrap());
        assert!(!coord.try_acquire("k", 0, "d", LEASE).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_lease_frees_the_permit_and_cannot_be_renewed() {
        let coord = Coordinator::memory();
        assert!(coord.try_acquire("k", 1, "dead", LEASE).await.unwrap());
        tokio::time::advance(LEASE - Duration::from_millis(1)).await;
        assert!(!coord.try_acquire("k", 1, "b", LEASE).await.unwrap());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(coord.try_acquire("k", 1, "b", LEASE).await.unwrap());
        assert!(!coord.renew("k", "dead", LEASE).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn renewing_keeps_the_permit() {
        let coord = Coordinator::memory();
        assert!(coord.try_acquire("k", 1, "a", LEASE).await.unwrap());
        for _ in 0..5 {
            tokio::time::advance(LEASE / 2).await;
            assert!(coord.renew("k", "a", LEASE).await.unwrap());
            assert!(!coord.try_acquire("k", 1, "b", LEASE).await.unwrap());
        }
        assert!(!coord.renew("k", "b", LEASE).await.unwrap());
    }
}
