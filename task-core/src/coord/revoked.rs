//! Durable revokes: Celery's `revoke` that survives worker restarts and reaches workers started
//! later.
//!
//! Redis keeps two sorted sets over the same ids: `revoked` scored by expiry (ms, server time), for
//! lookups and pruning, and `revoked:seq` scored by a sequence number, for incremental sync. The
//! hash `revoked:meta` holds the last sequence number (`seq`) and an `epoch` set once, when the
//! hash is created; a cursor is `(epoch, seq)`. Every script prunes expired ids from both sets
//! first, so they stay as small as the set of live revokes.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::Script;
use tokio::time::Instant;

use super::redis::{NOW, RedisCoordinator};
use super::{Coordinator, MemoryCoordinator, millis};
use crate::error::Result;

/// Where a worker's copy of the revoked ids stands; pass it to the next
/// [`Coordinator::revoked_since`] to get only what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeCursor {
    epoch: String,
    seq: u64,
}

/// A revoked task id and how long the revoke still holds (so a worker's local copy can expire it
/// at the same time as Redis does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The task id.
    pub id: String,
    /// Time left until the revoke expires.
    pub expires_in: Duration,
}

/// Removes expired ids from both sets and makes sure there is an epoch. KEYS: revoked (by
/// expiry), revoked:seq (by sequence), revoked:meta.
const PRUNE: &str = r"
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms)
for i = 1, #gone, 500 do
  redis.call('ZREM', KEYS[2], unpack(gone, i, math.min(i + 499, #gone)))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
redis.call('HSETNX', KEYS[3], 'epoch', t[1] .. '.' .. t[2])
";

/// KEYS: revoked, revoked:seq, revoked:meta. ARGV: ttl ms, ids…
static REVOKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{PRUNE}{}",
        r"
local expiry = now_ms + tonumber(ARGV[1])
for i = 2, #ARGV do
  local old = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if not old or old < expiry then
    redis.call('ZADD', KEYS[1], int(expiry), ARGV[i])
  end
  local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
  redis.call('ZADD', KEYS[2], seq, ARGV[i])
end
return #ARGV - 1
"
    ))
});

/// KEYS: revoked. ARGV: id. 1 if revoked and not expired.
static IS_REVOKED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r"
local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if expiry and expiry > now_ms then return 1 end
return 0
"
    ))
});

/// KEYS: revoked, revoked:seq, revoked:meta. ARGV: cursor epoch ('' for none), cursor seq.
/// Returns {epoch, seq, {id, ms left, id, ms left, …}} in revoke order.
static REVOKED_SINCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{PRUNE}{}",
        r"
local epoch = redis.call('HGET', KEYS[3], 'epoch')
local seq = tonumber(redis.call('HGET', KEYS[3], 'seq') or '0')
local from = '-inf'
if ARGV[1] == epoch and tonumber(ARGV[2]) <= seq then
  from = '(' .. ARGV[2]
end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], from, '+inf')) do
  local expiry = tonumber(redis.call('ZSCORE', KEYS[1], id))
  if expiry then
    out[#out + 1] = id
    out[#out + 1] = expiry - now_ms
  end
end
return {epoch, seq, out}
"
    ))
});

impl RedisCoordinator {
    fn revoked_keys(&self) -> [String; 3] {
        [
            self.key("revoked"),
            self.key("revoked:seq"),
            self.key("revoked:meta"),
        ]
    }
}

impl Coordinator {
    /// Revokes task ids for `ttl` (Celery keeps revokes 3 hours): every worker, also one started
    /// later, sees them. Revoking an id again extends its revoke to the later expiry.
    pub async fn revoke(&self, ids: &[String], ttl: Duration) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match self {
            Coordinator::Redis(r) => {
                let mut conn = r.conn().pinned().await?;
                let _: i64 = REVOKE
                    .key(&r.revoked_keys()[..])
                    .arg(millis(ttl))
                    .arg(ids)
                    .invoke_async(&mut conn)
                    .await?;
                // A revoke lost in a Sentinel failover would let the task run after all.
                conn.wait_replicated().await?;
                Ok(())
            }
            Coordinator::Memory(m) => {
                m.revoke(ids, ttl);
                Ok(())
            }
        }
    }

    /// Whether `id` is revoked now.
    pub async fn is_revoked(&self, id: &str) -> Result<bool> {
        match self {
            Coordinator::Redis(r) => {
                let n: i64 = IS_REVOKED
                    .key(r.key("revoked"))
                    .arg(id)
                    .invoke_async(&mut r.conn())
                    .await?;
                Ok(n == 1)
            }
            Coordinator::Memory(m) => Ok(m.is_revoked(id)),
        }
    }

    /// The ids revoked after `cursor` that are still revoked (all of them for `None`), oldest
    /// revoke first, and the cursor to pass next time.
    ///
    /// An id revoked again after `cursor` comes back with its new expiry. A cursor this Redis does
    /// not know (its data was lost or restored from an older snapshot) counts as `None`.
    pub async fn revoked_since(
        &self,
        cursor: Option<RevokeCursor>,
    ) -> Result<(Vec<Revoked>, RevokeCursor)> {
        let (epoch, seq) = cursor.map_or((String::new(), 0), |c| (c.epoch, c.seq));
        match self {
            Coordinator::Redis(r) => {
                let (epoch, seq, ids): (String, u64, Vec<(String, u64)>) = REVOKED_SINCE
                    .key(&r.revoked_keys()[..])
                    .arg(epoch)
                    .arg(seq)
                    .invoke_async(&mut r.conn())
                    .await?;
                let revoked = ids
                    .into_iter()
                    .map(|(id, ms)| Revoked {
                        id,
                        expires_in: Duration::from_millis(ms),
                    })
                    .collect();
                Ok((revoked, RevokeCursor { epoch, seq }))
            }
            Coordinator::Memory(m) => Ok(m.revoked_since(&epoch, seq)),
        }
    }
}

impl MemoryCoordinator {
    fn revoke(&self, ids: &[String], ttl: Duration) {
        let now = Instant::now();
        let expiry = now + Duration::from_millis(millis(ttl));
        let mut s = self.state();
        s.revoked.retain(|_, (until, _)| *until > now);
        for id in ids {
            s.seq += 1;
            let seq = s.seq;
            let entry = s.revoked.entry(id.clone()).or_insert((expiry, seq));
            *entry = (entry.0.max(expiry), seq);
        }
    }

    fn is_revoked(&self, id: &str) -> bool {
        let now = Instant::now();
        self.state()
            .revoked
            .get(id)
            .is_some_and(|(until, _)| *until > now)
    }

    fn revoked_since(&self, epoch: &str, seq: u64) -> (Vec<Revoked>, RevokeCursor) {
        let now = Instant::now();
        let mut s = self.state();
        s.revoked.retain(|_, (until, _)| *until > now);
        let after = if epoch == s.epoch && seq <= s.seq {
            seq
        } else {
            0
        };
        let mut fresh: Vec<_> = s
            .revoked
            .iter()
            .filter(|(_, (_, n))| *n > after)
            .map(|(id, (until, n))| (*n, id.clone(), *until - now))
            .collect();
        fresh.sort_unstable();
        let revoked = fresh
            .into_iter()
            .map(|(_, id, expires_in)| Revoked { id, expires_in })
            .collect();
        let cursor = RevokeCursor {
            epoch: s.epoch.clone(),
            seq: s.seq,
        };
        (revoked, cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn names(revoked: &[Revoked]) -> Vec<&str> {
        revoked.iter().map(|r| r.id.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn revokes_are_seen_by_clones_until_they_expire() {
        let coord = Coordinator::memory();
        let other = coord.clone();
        coord
            .revoke(&ids(&["a", "b"]), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(other.is_revoked("a").await.unwrap());
        assert!(!other.is_revoked("c").await.unwrap());

        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!other.is_revoked("a").await.unwrap());
        assert!(other.revoked_since(None).await.unwrap().0.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sync_is_incremental_and_carries_the_time_left() {
        let coord = Coordinator::memory();
        let (none, start) = coord.revoked_since(None).await.unwrap();
        assert!(none.is_empty());

        coord
            .revoke(&ids(&["a"]), Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        coord
            .revoke(&ids(&["b"]), Duration::from_secs(5))
            .await
            .unwrap();

        let (first, cursor) = coord.revoked_since(Some(start)).await.unwrap();
        assert_eq!(names(&first), ["a", "b"]);
        assert_eq!(first[0].expires_in, Duration::from_secs(59));
        assert_eq!(first[1].expires_in, Duration::from_secs(5));

        let (nothing, same) = coord.revoked_since(Some(cursor.clone())).await.unwrap();
        assert!(nothing.is_empty());
        assert_eq!(same, cursor);

        // Revoking again moves the id past the cursor and never shortens the revoke.
        coord
            .revoke(&ids(&["a"]), Duration::from_secs(1))
            .await
            .unwrap();
        let (again, _) = coord.revoked_since(Some(cursor)).await.unwrap();
        assert_eq!(names(&again), ["a"]);
        assert_eq!(again[0].expires_in, Duration::from_secs(59));
    }

    #[tokio::test]
    async fn a_cursor_from_elsewhere_gets_everything() {
        let old = Coordinator::memory();
        old.revoke(&ids(&["x"]), Duration::from_secs(60))
            .await
            .unwrap();
        let (_, foreign) = old.revoked_since(None).await.unwrap();

        let coord = Coordinator::memory();
        coord
            .revoke(&ids(&["a"]), Duration::from_secs(60))
            .await
            .unwrap();
        let (all, _) = coord.revoked_since(Some(foreign)).await.unwrap();
        assert_eq!(names(&all), ["a"]);

        // A cursor ahead of this state (restored from an older snapshot) too.
        let (_, mut ahead) = coord.revoked_since(None).await.unwrap();
        ahead.seq += 10;
        let (all, _) = coord.revoked_since(Some(ahead)).await.unwrap();
        assert_eq!(names(&all), ["a"]);
    }

    #[tokio::test]
    async fn revoking_nothing_is_a_no_op() {
        let coord = Coordinator::memory();
        coord.revoke(&[], Duration::from_secs(1)).await.unwrap();
        let (_, cursor) = coord.revoked_since(None).await.unwrap();
        assert_eq!(cursor.seq, 0);
    }
}
