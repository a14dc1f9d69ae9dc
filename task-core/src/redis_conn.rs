//! One shared Redis connection that follows the primary.
//!
//! [`RedisConn`] is what the result backend, the coordinator and the beat's store talk through.
//! For `redis://` and `rediss://` it is a [`ConnectionManager`] (reconnects to the same address).
//! For `sentinel://` it asks the sentinels for the primary, connects there, and moves when the
//! primary does:
//!
//! - a command that fails the way a lost or demoted primary fails (I/O, refused, timed out,
//!   `READONLY`, `MASTERDOWN`) wakes a watchdog; the watchdog also checks `INFO replication` once a second,
//!   so an idle connection (a subscriber) notices a failover too;
//! - the watchdog asks the sentinels again and, when they name another address, swaps in a new
//!   connection there and bumps [`RedisConn::switches`], which subscribers watch to subscribe
//!   again on the new primary;
//! - the command that failed is not repeated (it may have been applied): it returns its error and
//!   the caller's own retry reaches the new primary.
//!
//! Redis replicates asynchronously, so a write the old primary acknowledged can vanish in a
//! failover. [`RedisConn::wait_replicated`] (`WAIT`) closes that window where it matters: a
//! worker stores a result, the beat claims a tick or takes the lease, and only then acknowledges or
//! publishes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{Cmd, ErrorKind, Pipeline, ProtocolVersion, RedisError, RedisFuture, RedisResult};
use redis::{ServerErrorKind, Value};
use tokio::sync::{Notify, watch};

use crate::redis_url::{SentinelTarget, Target};

/// How often the watchdog checks the primary of a Sentinel connection when nothing fails.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest time between two checks, however many commands fail.
const MIN_CHECK_GAP: Duration = Duration::from_millis(100);
/// How often the watchdog asks the sentinels even when the server looks like a primary.
const SENTINEL_RECHECK: Duration = Duration::from_secs(5);
/// How long a check's `INFO replication` may take before the primary counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long [`RedisConn::wait_replicated`] waits for a replica's acknowledgement.
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(2);

/// A shared, reconnecting Redis connection (see the module documentation). Cheap to clone;
/// clones share one multiplexed connection. Use it wherever a connection is expected
/// (`query_async(&mut conn)`, `AsyncCommands`, scripts).
#[derive(Clone)]
pub struct RedisConn {
    inner: Arc<Inner>,
    // Kept per clone so `ConnectionLike::get_db` needs no lock.
    db: i64,
    /// Set by [`RedisConn::pinned`]: every command of this clone goes to this server.
    pinned: Option<Current>,
}

struct Inner {
    display: String,
    config: ConnectionManagerConfig,
    current: RwLock<Option<Current>>,
    direct: Option<redis::Client>,
    sentinel: Option<SentinelSide>,
}

#[derive(Clone)]
struct Current {
    manager: ConnectionManager,
    addr: String,
}

/// What the watchdog last saw, for [`RedisConn::wait_replicated`] to skip a round trip.
#[derive(Default)]
struct Health {
    /// The server looked at, whether it was a primary, its replicas in sync, and when.
    server: Option<(String, bool, usize, tokio::time::Instant)>,
    /// The primary the sentinels named last, and when.
    named: Option<(String, tokio::time::Instant)>,
}

impl Health {
    fn online_for(&self, addr: &str) -> Option<usize> {
        match &self.server {
            Some((a, true, n, at)) if a == addr && at.elapsed() < HEALTH_FRESH => Some(*n),
            _ => None,
        }
    }
}

/// How long the watchdog's look at a server stands in for a fresh one.
const HEALTH_FRESH: Duration = Duration::from_secs(2);
/// How long the sentinels' answer stands when a primary has no replica in sync.
const NAMED_FRESH: Duration = Duration::from_secs(1);

/// A server's `INFO replication`, as far as failover cares.
struct Replication {
    primary: bool,
    online: usize,
}

impl Replication {
    /// The replicas in sync, or the error a write to a replica gets.
    fn online(&self, side: &SentinelSide) -> RedisResult<usize> {
        if self.primary {
            Ok(self.online)
        } else {
            side.wake.notify_one();
            Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::ReadOnly),
                "the server written to is no longer a primary",
            )))
        }
    }
}

fn parse_replication(info: &str) -> Replication {
    let mut primary = false;
    let mut online = 0;
    for line in info.lines().map(str::trim) {
        if line == "role:master" {
            primary = true;
        } else if line.starts_with("slave") && line.contains("state=online") {
            online += 1;
        }
    }
    Replication { primary, online }
}

async fn replication(conn: &mut impl ConnectionLike) -> RedisResult<Replication> {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await?;
    Ok(parse_replication(&info))
}

/// The primary the sentinels name (asked at most once per [`NAMED_FRESH`]).
async fn named_primary(side: &SentinelSide) -> RedisResult<String> {
    if let Some((addr, at)) = &side.health.lock().expect("health lock").named
        && at.elapsed() < NAMED_FRESH
    {
        return Ok(addr.clone());
    }
    let named = resolve(side)
        .await?
        .get_connection_info()
        .addr()
        .to_string();
    side.health.lock().expect("health lock").named =
        Some((named.clone(), tokio::time::Instant::now()));
    Ok(named)
}

struct SentinelSide {
    health: std::sync::Mutex<Health>,
    target: SentinelTarget,
    node: SentinelNodeConnectionInfo,
    sentinel: tokio::sync::Mutex<Sentinel>,
    wake: Notify,
    switches: watch::Sender<u64>,
    unreplicated_warned: AtomicBool,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn")
            .field("url", &self.inner.display)
            .field("sentinel", &self.inner.sentinel.is_some())
            .finish()
    }
}

/// How a [`RedisConn`] is made.
#[derive(Clone, Debug)]
pub struct ConnOptions {
    /// Reconnect and timeout settings (and a push sender for subscribers).
    pub config: ConnectionManagerConfig,
    /// Speak RESP3 (needed for pushes on a multiplexed connection).
    pub resp3: bool,
}

impl ConnOptions {
    /// The given manager settings, RESP2.
    pub fn new(config: ConnectionManagerConfig) -> Self {
        ConnOptions {
            config,
            resp3: false,
        }
    }
}

impl RedisConn {
    /// Connects now to the server `url` names (`redis://`, `rediss://` or `sentinel://`).
    /// Errors are one line, with the password hidden.
    pub async fn connect(url: &str, options: ConnOptions) -> Result<Self, String> {
        let conn = Self::lazy(url, options)?;
        conn.check()
            .await
            .map_err(|e| format!("cannot connect to Redis at {}: {e}", conn.inner.display))?;
        Ok(conn)
    }

    /// Connects now if not connected yet (through Sentinel: finds the primary), and checks that
    /// the server answers.
    pub async fn check(&self) -> RedisResult<()> {
        let mut m = self.ensure().await?;
        let _: String = redis::cmd("PING").query_async(&mut m).await?;
        Ok(())
    }

    /// Like [`RedisConn::connect`], but connects on first use.
    pub fn lazy(url: &str, options: ConnOptions) -> Result<Self, String> {
        let display = crate::redact_url(url);
        let target = crate::redis_url::target(url).map_err(|e| format!("`{display}`: {e}"))?;
        let ConnOptions { config, resp3 } = options;
        match target {
            Target::Direct(client) => {
                let client = if resp3 { with_resp3(&client)? } else { client };
                let db = client.get_connection_info().redis_settings().db();
                let addr = client.get_connection_info().addr().to_string();
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                        .map_err(|e| format!("`{display}`: {e}"))?;
                Ok(RedisConn {
                    inner: Arc::new(Inner {
                        display,
                        config,
                        current: RwLock::new(Some(Current { manager, addr })),
                        direct: Some(client),
                        sentinel: None,
                    }),
                    db,
                    pinned: None,
                })
            }
            Target::Sentinel(target) => {
                let mut redis = target.redis.clone();
                if resp3 {
                    redis = redis.set_protocol(ProtocolVersion::RESP3);
                }
                let db = redis.db();
                let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis);
                let sentinel =
                    Sentinel::build(target.addrs()).map_err(|e| format!("`{display}`: {e}"))?;
                let (switches, _) = watch::channel(0);
                let inner = Arc::new(Inner {
                    display,
                    config,
                    current: RwLock::new(None),
                    direct: None,
                    sentinel: Some(SentinelSide {
                        health: Default::default(),
                        target,
                        node,
                        sentinel: tokio::sync::Mutex::new(sentinel),
                        wake: Notify::new(),
                        switches,
                        unreplicated_warned: AtomicBool::new(false),
                    }),
                });
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(watchdog(Arc::downgrade(&inner)));
                }
                Ok(RedisConn {
                    inner,
                    db,
                    pinned: None,
                })
            }
        }
    }

    /// The URL, password hidden.
    pub fn display_url(&self) -> &str {
        &self.inner.display
    }

    /// Whether this connection goes through Sentinel.
    pub fn is_sentinel(&self) -> bool {
        self.inner.sentinel.is_some()
    }

    /// The address of the server commands go to now, if connected.
    pub fn current_addr(&self) -> Option<String> {
        self.current().map(|c| c.addr)
    }

    /// A clone whose commands all go to the server of now, even if the shared connection
    /// moves meanwhile: a write and its [`RedisConn::wait_replicated`] must meet the same
    /// server, or the `WAIT` confirms nothing.
    pub async fn pinned(&self) -> RedisResult<RedisConn> {
        let manager = self.manager().await?;
        let addr = self.current().map(|c| c.addr).unwrap_or_default();
        Ok(RedisConn {
            inner: self.inner.clone(),
            db: self.db,
            pinned: Some(Current { manager, addr }),
        })
    }

    /// Changes each time a Sentinel connection moves to another primary (never for a direct
    /// one). What lives on the connection rather than in the data (subscriptions) must be set up
    /// again after a change.
    pub fn switches(&self) -> watch::Receiver<u64> {
        match &self.inner.sentinel {
            Some(s) => s.switches.subscribe(),
            None => watch::channel(0).1,
        }
    }

    /// A client for the server commands go to now (for a dedicated connection such as a
    /// pub/sub one); through Sentinel, asks for the primary.
    pub async fn client(&self) -> RedisResult<redis::Client> {
        match (&self.inner.sentinel, &self.inner.direct) {
            (Some(side), _) => resolve(side).await,
            (None, Some(client)) => Ok(client.clone()),
            (None, None) => unreachable!("a direct connection keeps its client"),
        }
    }

    /// Whether `other` is a clone of this connection to the same database, so one script can
    /// read and write the keys of both.
    pub fn same_database(&self, other: &RedisConn) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) && self.db == other.db
    }

    /// Waits until the writes sent on this connection so far are on a replica (`WAIT 1`), when
    /// the primary has one; a no-op for a direct connection. Call it on a
    /// [`RedisConn::pinned`] clone that made the writes. A primary with no replica connected
    /// cannot do better, and is allowed (with a warning, once): refusing every write then would
    /// stop the fleet exactly when it has lost a node.
    pub async fn wait_replicated(&self) -> RedisResult<()> {
        let Some(side) = &self.inner.sentinel else {
            return Ok(());
        };
        let mut conn = self.clone();
        let written = match &self.pinned {
            Some(p) => p.addr.clone(),
            None => self.current_addr().unwrap_or_default(),
        };
        // The watchdog's last look at this server, if recent; else a fresh one.
        let cached = side
            .health
            .lock()
            .expect("health lock")
            .online_for(&written);
        let online = match cached {
            Some(n) => n,
            None => replication(&mut conn).await?.online(side)?,
        };
        if online > 0 {
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(REPLICATION_TIMEOUT.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            if acked >= 1 {
                side.unreplicated_warned.store(false, Ordering::Relaxed);
                return Ok(());
            }
            let now = replication(&mut conn).await?.online(side)?;
            if now > 0 {
                return Err(RedisError::from((
                    ErrorKind::Server(ServerErrorKind::TryAgain),
                    "no replica acknowledged the write in time",
                    format!("{now} online, WAIT {REPLICATION_TIMEOUT:?}"),
                )));
            }
        }
        // A primary without a replica in sync is either the one the sentinels promoted (nothing
        // to wait for) or a crashed one restarted empty before they demote it, whose writes
        // its resync is about to wipe. Only the sentinels can tell the two apart.
        let named = named_primary(side).await?;
        if written != named {
            side.wake.notify_one();
            return Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::TryAgain),
                "written to a server the sentinels no longer name as the primary",
                named,
            )));
        }
        if !side.unreplicated_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                url = %self.inner.display,
                primary = %named,
                "the Redis primary has no replica in sync: writes are not replicated until one is"
            );
        }
        Ok(())
    }

    /// Subscribes to channels on the current server (pushes go to the push sender of the
    /// options). The subscriptions come back after a reconnect to the same server; after a
    /// [`RedisConn::switches`] change, subscribe again.
    pub async fn subscribe(&self, channels: impl redis::ToRedisArgs) -> RedisResult<()> {
        let mut m = self.manager().await?;
        let r = m.subscribe(channels).await;
        if let Err(e) = &r {
            self.failed(e);
        }
        r
    }

    /// Unsubscribes from channels on the current server.
    pub async fn unsubscribe(&self, channels: impl redis::ToRedisArgs) -> RedisResult<()> {
        let mut m = self.manager().await?;
        m.unsubscribe(channels).await
    }

    fn current(&self) -> Option<Current> {
        self.inner
            .current
            .read()
            .expect("redis connection lock")
            .clone()
    }

    /// The manager to send a command to, connecting through Sentinel first if needed.
    async fn ensure(&self) -> RedisResult<ConnectionManager> {
        if let Some(c) = self.current() {
            return Ok(c.manager);
        }
        let side = self.inner.sentinel.as_ref().expect("sentinel side");
        switch_to_primary(&self.inner, side).await?;
        self.current()
            .map(|c| c.manager)
            .ok_or_else(|| RedisError::from((ErrorKind::Client, "no Redis primary")))
    }

    async fn manager(&self) -> RedisResult<ConnectionManager> {
        if let Some(p) = &self.pinned {
            return Ok(p.manager.clone());
        }
        self.ensure().await
    }

    fn failed(&self, e: &RedisError) {
        if let Some(side) = &self.inner.sentinel
            && lost_primary(e)
        {
            side.wake.notify_one();
        }
    }
}

fn with_resp3(client: &redis::Client) -> Result<redis::Client, String> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings)).map_err(|e| e.to_string())
}

/// Whether an error is how a lost or demoted primary shows.
fn lost_primary(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

async fn resolve(side: &SentinelSide) -> RedisResult<redis::Client> {
    let mut sentinel = side.sentinel.lock().await;
    sentinel
        .async_master_for(&side.target.master_name, Some(&side.node))
        .await
}

/// Asks the sentinels for the primary and moves there if it is not where we are.
async fn switch_to_primary(inner: &Inner, side: &SentinelSide) -> RedisResult<bool> {
    let client = resolve(side).await?;
    let addr = client.get_connection_info().addr().to_string();
    side.health.lock().expect("health lock").named =
        Some((addr.clone(), tokio::time::Instant::now()));
    let same = inner
        .current
        .read()
        .expect("redis connection lock")
        .as_ref()
        .is_some_and(|c| c.addr == addr);
    if same {
        return Ok(false);
    }
    let manager = ConnectionManager::new_with_config(client, inner.config.clone()).await?;
    let previous = inner
        .current
        .write()
        .expect("redis connection lock")
        .replace(Current {
            manager,
            addr: addr.clone(),
        });
    match previous {
        Some(p) => tracing::warn!(
            url = %inner.display,
            from = %p.addr,
            to = %addr,
            "Redis primary moved; following it"
        ),
        None => {
            tracing::info!(url = %inner.display, primary = %addr, "Redis primary found through Sentinel")
        }
    }
    side.switches.send_modify(|n| *n += 1);
    Ok(true)
}

/// Checks that the connection still reaches a primary; if not, asks the sentinels where it went.
/// Also asks them every [`SENTINEL_RECHECK`] however healthy the server looks: a crashed primary
/// restarted before its clients moved answers `ROLE` as a primary until the sentinels demote it.
/// Ends when the last clone is dropped.
async fn watchdog(inner: Weak<Inner>) {
    let mut asked = tokio::time::Instant::now();
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let side = strong.sentinel.as_ref().expect("sentinel side");
        let current = strong
            .current
            .read()
            .expect("redis connection lock")
            .clone();
        let connected = current.is_some();
        let healthy = match current {
            Some(c) => {
                let mut m = c.manager;
                let seen = tokio::time::timeout(CHECK_TIMEOUT, replication(&mut m))
                    .await
                    .ok()
                    .and_then(Result::ok);
                let primary = seen.as_ref().is_some_and(|r| r.primary);
                side.health.lock().expect("health lock").server = Some((
                    c.addr,
                    primary,
                    seen.map_or(0, |r| r.online),
                    tokio::time::Instant::now(),
                ));
                primary
            }
            // Not connected yet: the first command connects.
            None => true,
        };
        if connected && (!healthy || asked.elapsed() >= SENTINEL_RECHECK) {
            asked = tokio::time::Instant::now();
            if let Err(e) = switch_to_primary(&strong, side).await {
                tracing::debug!(url = %strong.display, error = %e, "no Redis primary from Sentinel yet");
            }
        }
        let wait = if healthy {
            CHECK_INTERVAL
        } else {
            Duration::from_millis(250)
        };
        {
            let woken = side.wake.notified();
            tokio::pin!(woken);
            tokio::select! {
                _ = &mut woken => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        drop(strong);
        tokio::time::sleep(MIN_CHECK_GAP).await;
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut m = self.manager().await?;
            let r = m.req_packed_command(cmd).await;
            if let Err(e) = &r {
                self.failed(e);
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut m = self.manager().await?;
            let r = m.req_packed_commands(cmd, offset, count).await;
            if let Err(e) = &r {
                self.failed(e);
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_info_counts_replicas_in_sync_only() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=6392,state=online,offset=42,lag=0\r\n\
            slave1:ip=127.0.0.1,port=6393,state=wait_bgsave,offset=0,lag=0\r\n";
        let r = parse_replication(info);
        assert!(r.primary);
        assert_eq!(r.online, 1);
        let replica = parse_replication("# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\n");
        assert!(!replica.primary);
    }

    #[test]
    fn lost_primaries_are_told_from_other_errors() {
        let ro = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "READONLY You can't write against a read only replica.",
        ));
        assert!(lost_primary(&ro));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(lost_primary(&io));
        let script = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "ERR x"));
        assert!(!lost_primary(&script));
    }
}
