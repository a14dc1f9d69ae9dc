//! The leader lease: at most one replica fires ticks at a time, and a new one takes over soon
//! after the old one dies.
//!
//! The lease is one key (`<prefix>lease`) holding `<node id>#<fencing token>`, set with
//! `NX PX <ttl>`. Each acquisition takes a new token from `INCR <prefix>token`, so tokens grow
//! with every change of leader. The holder renews it every [`LeaseConfig::renew_every`] with a
//! compare-and-`PEXPIRE`; followers try to acquire it every [`LeaseConfig::poll_every`]. With the
//! defaults (TTL 10 s, renew 3 s, poll 1 s) a leader killed right after a renewal is replaced
//! within TTL + poll = 11 s.
//!
//! Holding the lease is necessary but not sufficient to fire: every tick's claim re-checks the
//! lease value in the same atomic script, so a replica that *thinks* it leads (a long pause, a
//! partition) cannot claim a tick once its lease has expired or passed to someone else. A leader
//! whose renewals fail steps down on its own when the lease it last renewed would have expired,
//! minus a safety margin for clock drift between it and Redis.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::{Backend, Store, lock};

/// This replica's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Not holding the lease: waiting to acquire it.
    #[default]
    Follower,
    /// Holding the lease with this fencing token.
    Leader {
        /// The fencing token of this tenure.
        token: u64,
    },
}

/// Who holds the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseHolder {
    /// The holder's node id.
    pub node_id: String,
    /// Its fencing token.
    pub token: u64,
}

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// How long the lease lives without renewal.
    pub ttl: Duration,
    /// How often the leader renews it (well under `ttl`, so a renewal can fail and be retried
    /// before the lease runs out).
    pub renew_every: Duration,
    /// How often a follower tries to acquire it.
    pub poll_every: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(10),
            renew_every: Duration::from_secs(3),
            poll_every: Duration::from_secs(1),
        }
    }
}

/// The lease value for a node and token: `<node id>#<token>`.
pub fn lease_value(node_id: &str, token: u64) -> String {
    format!("{node_id}#{token}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Store {
    /// Who holds the leader lease now, if anyone.
    pub async fn leader(&self) -> Result<Option<LeaseHolder>> {
        let value: Option<String> = match self.backend() {
            Backend::Memory(m) => {
                let m = lock(m);
                m.lease
                    .as_ref()
                    .filter(|(_, until)| *until > Instant::now())
                    .map(|(v, _)| v.clone())
            }
            Backend::Redis(r) => {
                redis::cmd("GET")
                    .arg(self.keys().lease())
                    .query_async(&mut r.conn.clone())
                    .await?
            }
        };
        value
            .map(|v| {
                v.rsplit_once('#')
                    .and_then(|(node, token)| {
                        Some(LeaseHolder {
                            node_id: node.to_owned(),
                            token: token.parse().ok()?,
                        })
                    })
                    .ok_or_else(|| Error::Corrupt(format!("lease value {v:?}")))
            })
            .transpose()
    }

    /// Takes the lease if nobody holds it; returns the new fencing token.
    pub(crate) async fn acquire_lease(&self, node_id: &str, ttl: Duration) -> Result<Option<u64>> {
        match self.backend() {
            Backend::Memory(m) => {
                let mut m = lock(m);
                let now = Instant::now();
                if m.lease.as_ref().is_some_and(|(_, until)| *until > now) {
                    return Ok(None);
                }
                m.token += 1;
                let token = m.token;
                m.lease = Some((lease_value(node_id, token), now + ttl));
                Ok(Some(token))
            }
            Backend::Redis(r) => {
                let k = self.keys();
                let mut conn = r.conn.pinned().await?;
                let token: u64 = ACQUIRE
                    .key(k.lease())
                    .key(k.token())
                    .arg(format!("{node_id}#"))
                    .arg(millis(ttl))
                    .invoke_async(&mut conn)
                    .await?;
                if token > 0 {
                    // A lease or token lost in a Sentinel failover would hand the same fencing
                    // token to the next leader. Unconfirmed, the lease is left to expire.
                    conn.wait_replicated().await?;
                }
                Ok((token > 0).then_some(token))
            }
        }
    }

    /// Extends the lease if `value` still holds it.
    pub(crate) async fn renew_lease(&self, value: &str, ttl: Duration) -> Result<bool> {
        match self.backend() {
            Backend::Memory(m) => {
                let mut m = lock(m);
                let now = Instant::now();
                match &mut m.lease {
                    Some((v, until)) if v == value && *until > now => {
                        *until = now + ttl;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
            Backend::Redis(r) => {
                let n: i64 = RENEW
                    .key(self.keys().lease())
                    .arg(value)
                    .arg(millis(ttl))
                    .invoke_async(&mut r.conn.clone())
                    .await?;
                Ok(n == 1)
            }
        }
    }

    /// Gives the lease up if `value` still holds it, so a follower takes over at once.
    pub(crate) async fn release_lease(&self, value: &str) -> Result<bool> {
        match self.backend() {
            Backend::Memory(m) => {
                let mut m = lock(m);
                if m.lease.as_ref().is_some_and(|(v, _)| v == value) {
                    m.lease = None;
                    return Ok(true);
                }
                Ok(false)
            }
            Backend::Redis(r) => {
                let n: i64 = RELEASE
                    .key(self.keys().lease())
                    .arg(value)
                    .invoke_async(&mut r.conn.clone())
                    .await?;
                Ok(n == 1)
            }
        }
    }
}

/// KEYS: lease, token. ARGV: "<node id>#", ttl ms. Returns the new token, or 0 if held.
static ACQUIRE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. token, 'PX', ARGV[2])
return token
",
    )
});

/// KEYS: lease. ARGV: value, ttl ms.
static RENEW: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// KEYS: lease. ARGV: value.
static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Acquires, renews and finally releases the lease, publishing this replica's [`Role`].
///
/// Runs until `stop` turns true (or its sender goes), then steps down and releases the lease.
pub(crate) async fn keep(
    store: Store,
    node_id: String,
    config: LeaseConfig,
    role: watch::Sender<Role>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    // Step down this long before the lease we last renewed would expire in Redis, so that
    // clock drift between us and Redis cannot make two leaders.
    let margin = (config.ttl / 10).max(Duration::from_millis(100));
    let op_timeout = config.renew_every.max(Duration::from_millis(500));
    // The token held, and the instant at which we must stop acting as leader.
    let mut held: Option<(u64, Instant)> = None;
    let mut failing = false;
    loop {
        let now = Instant::now();
        let wake = match held {
            None => {
                match tokio::time::timeout(op_timeout, store.acquire_lease(&node_id, config.ttl))
                    .await
                {
                    Ok(Ok(Some(token))) => {
                        held = Some((token, now + config.ttl - margin));
                        failing = false;
                        metrics.acquired();
                        metrics.set_leader(true);
                        tracing::info!(node_id, token, "became leader");
                        role.send_replace(Role::Leader { token });
                        now + config.renew_every
                    }
                    Ok(Ok(None)) => {
                        failing = false;
                        now + config.poll_every
                    }
                    Ok(Err(e)) => {
                        note_failure(&mut failing, &e.to_string());
                        now + config.poll_every
                    }
                    Err(_) => {
                        note_failure(&mut failing, "timed out");
                        now + config.poll_every
                    }
                }
            }
            Some((token, deadline)) => {
                // Never wait on Redis past the point where we must have stepped down.
                let budget = deadline.saturating_duration_since(now).min(op_timeout);
                let value = lease_value(&node_id, token);
                match tokio::time::timeout(budget, store.renew_lease(&value, config.ttl)).await {
                    Ok(Ok(true)) => {
                        held = Some((token, now + config.ttl - margin));
                        failing = false;
                        metrics.renewed();
                        now + config.renew_every
                    }
                    Ok(Ok(false)) => {
                        step_down(&mut held, &role, &metrics, "it was taken or expired");
                        now + config.poll_every
                    }
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        note_failure(&mut failing, &why);
                        if Instant::now() >= deadline {
                            step_down(
                                &mut held,
                                &role,
                                &metrics,
                                "renewals failed until it ran out",
                            );
                            Instant::now() + config.poll_every
                        } else {
                            (Instant::now() + config.renew_every / 3).min(deadline)
                        }
                    }
                }
            }
        };
        // However the timings are set, wake in time to step down.
        let wake = match held {
            Some((_, deadline)) => wake.min(deadline),
            None => wake,
        };
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    if let Some((token, _)) = held {
        role.send_replace(Role::Follower);
        metrics.set_leader(false);
        match store.release_lease(&lease_value(&node_id, token)).await {
            Ok(true) => tracing::info!(node_id, token, "released the lease"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not release the lease; it expires on its own")
            }
        }
    }
}

fn step_down(
    held: &mut Option<(u64, Instant)>,
    role: &watch::Sender<Role>,
    metrics: &Metrics,
    why: &str,
) {
    if let Some((token, _)) = held.take() {
        role.send_replace(Role::Follower);
        metrics.set_leader(false);
        metrics.lost();
        tracing::warn!(token, "lost the leader lease ({why}); stopped firing");
    }
}

/// Logs a store failure once per run of failures, not on every poll.
fn note_failure(failing: &mut bool, why: &str) {
    if !*failing {
        tracing::warn!(
            error = why,
            "leader lease: the store is not answering; retrying"
        );
        *failing = true;
    }
}
