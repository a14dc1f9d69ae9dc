//! The Redis side: one shared, auto-reconnecting connection and the key layout.
//!
//! The scripts themselves live with the concept they implement (`revoked.rs`, `rate.rs`, …), next
//! to the memory version that must agree with them.

use super::DEFAULT_PREFIX;
use crate::error::Result;
use crate::redis_conn::RedisConn;

/// Coordination state in Redis. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct RedisCoordinator {
    conn: RedisConn,
    prefix: String,
    display_url: Option<String>,
}

impl std::fmt::Debug for RedisCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCoordinator")
            .field("url", &self.display_url)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisCoordinator {
    pub(super) fn new(conn: RedisConn, display_url: Option<String>) -> Self {
        RedisCoordinator {
            conn,
            prefix: DEFAULT_PREFIX.to_owned(),
            display_url,
        }
    }

    pub(super) fn with_prefix(mut self, prefix: String) -> Self {
        self.prefix = prefix;
        self
    }

    /// A handle on the shared connection (clones are cheap and multiplexed).
    pub(super) fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// `<prefix><name>`, for the keys of which there is one (`revoked`, `limits:rate`).
    pub(super) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `<prefix><kind>:<key>`, for per-key state (`rate`, `conc`, `once`, `lock`, `fence`).
    pub(super) fn keyed(&self, kind: &str, key: &str) -> String {
        format!("{}{kind}:{key}", self.prefix)
    }

    pub(super) async fn ping(&self) -> Result<()> {
        let _: String = ::redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }
}

/// Lua that sets `now_us` and `now_ms` from the server's clock. Every script that needs the time
/// starts with it, so all workers share Redis's clock.
///
/// Numbers written back to Redis go through `string.format('%.0f', …)`: Lua's default conversion
/// keeps 14 significant digits, too few for a time in microseconds.
pub(super) const NOW: &str = r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local function int(n) return string.format('%.0f', n) end
";
