//! The Redis result backend, byte-compatible with Celery's `RedisBackend`.
//!
//! A store is one Lua script: read the current meta, keep it if it is a SUCCESS or a REVOKED, otherwise `SETEX`
//! the new meta and `PUBLISH` it on the channel named like the key. Doing both in one script makes
//! the write-once rule atomic between racing workers and costs one round trip per state.
//!
//! Waiting subscribes (RESP3 push on a managed connection that resubscribes after reconnects) and
//! re-reads the key after subscribing and then at a fixed interval, so a message lost during a
//! reconnect delays a waiter by at most that interval and never strands it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::{AsyncCommands, PushInfo, PushKind, Script};
use tokio::sync::{Notify, OnceCell, mpsc};

use super::chord::{self, ChordPart, ChordProgress};
use super::{DEFAULT_RESULT_TTL, ResultBackend, StoreOutcome, TaskMeta, group_key, meta_key};
use crate::error::{Error, Result};
use crate::protocol::ContentType;
use crate::redis_conn::{ConnOptions, RedisConn};

const STORE_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  -- JSON, or msgpack as a worker with result_serializer='msgpack' stores it.
  local ok, meta = pcall(cjson.decode, current)
  if not ok then ok, meta = pcall(cmsgpack.unpack, current) end
  if ok and type(meta) == 'table' and (meta['status'] == 'SUCCESS' or meta['status'] == 'REVOKED') then
    return 0
  end
end
redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#;

/// Records a chord header task's result and, when it is the last one, takes the claim to fire the
/// body, atomically (so two workers finishing at once cannot both fire it). The same keys and
/// rules as Celery 5.7's script, so Python workers count in the same chord.
/// KEYS: .j .t .s .d <group meta> .c; ARGV: member, entry, score, ttl, group ttl, claim ttl,
/// token, size to assume when `.s` is missing (0: none).
const CHORD_PART_SCRIPT: &str = r#"
if redis.call('GET', KEYS[6]) == 'done' then
  return {-1, 0, 0, 0}
end
if redis.call('SADD', KEYS[4], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
end
local ready = redis.call('ZCARD', KEYS[1])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
  if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[5], ARGV[5]) end
end
local delta = tonumber(redis.call('GET', KEYS[2]) or '0')
local size = tonumber(redis.call('GET', KEYS[3]) or ARGV[8])
local claimed = 0
if size > 0 and ready == size + delta then
  if redis.call('SET', KEYS[6], ARGV[7], 'NX', 'EX', ARGV[6]) then claimed = 1 end
end
return {ready, delta, size, claimed}
"#;

/// Drops a fired chord's keys and leaves the `done` marker, if the claim is still ours.
/// KEYS: .c .j .t .s .d; ARGV: token, marker ttl.
const CHORD_CLEANUP_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
return 1
"#;

/// How often a waiter re-reads the key even without a notification.
const RECHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Redis result backend. Cheap to clone: clones share connections.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
    ttl: Duration,
    serializer: ContentType,
}

struct Inner {
    url: String,
    conn: RedisConn,
    store: Script,
    subscriber: OnceCell<Subscriber>,
    display_url: String,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.inner.display_url)
            .field("ttl", &self.ttl)
            .field("serializer", &self.serializer)
            .finish()
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(4)
        .set_max_delay(Duration::from_secs(2))
}

impl RedisBackend {
    /// One step of a walk over every stored result (Redis `SCAN`, so the server is never held):
    /// the task ids of about `count` keys from `cursor` (0 starts a walk; a returned cursor of 0
    /// ends it). A key may be seen twice in one walk.
    pub async fn scan_task_ids(&self, cursor: u64, count: usize) -> Result<(u64, Vec<String>)> {
        let mut conn = self.inner.conn.clone();
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("celery-task-meta-*")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await?;
        let ids = keys
            .into_iter()
            .filter_map(|k| k.strip_prefix("celery-task-meta-").map(str::to_owned))
            .collect();
        Ok((next, ids))
    }

    /// Connects to `redis://host:port/db`, `rediss://…` or `sentinel://…` (see
    /// [`crate::redis_url`]). Fails if Redis cannot be reached now.
    pub async fn connect(url: &str) -> Result<Self> {
        let display_url = crate::redact_url(url);
        let conn = RedisConn::lazy(url, ConnOptions::new(manager_config()))
            .map_err(|e| Error::Config(format!("RESULT_BACKEND {e}")))?;
        conn.check().await.map_err(|e| {
            Error::Backend(format!("cannot connect to Redis at {display_url}: {e}"))
        })?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                conn,
                store: Script::new(STORE_SCRIPT),
                subscriber: OnceCell::new(),
                display_url,
            }),
            ttl: DEFAULT_RESULT_TTL,
            serializer: ContentType::Json,
        })
    }

    /// Stores results, chord parts and group results with `serializer` (Celery's
    /// `result_serializer`); what is read may be in either form.
    pub fn with_serializer(mut self, serializer: ContentType) -> Self {
        self.serializer = serializer;
        self
    }

    /// Sets how long results are kept (`SETEX` seconds, at least 1).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// A command connection to the same Redis (shared, auto-reconnecting, following a Sentinel
    /// failover), for callers that keep their own keys next to the results (locks, schedules).
    pub fn connection(&self) -> RedisConn {
        self.inner.conn.clone()
    }

    /// Writes a chord's header size (`.s`) before its header is published, as Celery's
    /// `set_chord_size`; clears a `done` marker left by an earlier run of the same group id.
    pub async fn set_chord_size(&self, group_id: &str, size: u64) -> Result<()> {
        let mut conn = self.inner.conn.pinned().await?;
        let key = group_key(group_id);
        let _: () = redis::pipe()
            .del(format!("{key}.c"))
            .set_ex(format!("{key}.s"), size, self.ttl.as_secs().max(1))
            .query_async(&mut conn)
            .await?;
        conn.wait_replicated().await?;
        Ok(())
    }

    /// Records a header task's result (`on_chord_part_return`); see [`ChordProgress`].
    pub async fn chord_part_return(&self, part: &ChordPart<'_>) -> Result<ChordProgress> {
        let key = group_key(part.group_id);
        let score = part
            .group_index
            .map_or_else(|| "+inf".to_owned(), |i| i.to_string());
        let claim = uuid::Uuid::new_v4().simple().to_string();
        let ttl = self.ttl.as_secs().max(1);
        let mut conn = self.inner.conn.pinned().await?;
        let (ready, delta, size, claimed): (i64, i64, i64, i64) = Script::new(CHORD_PART_SCRIPT)
            .key(format!("{key}.j"))
            .key(format!("{key}.t"))
            .key(format!("{key}.s"))
            .key(format!("{key}.d"))
            .key(&key)
            .key(format!("{key}.c"))
            .arg(format!("{}:{score}", part.task_id))
            .arg(super::encode_stored(
                self.serializer,
                &chord::encode_part(part),
            )?)
            .arg(&score)
            .arg(ttl)
            .arg(ttl)
            .arg(chord::CLAIM_SECS)
            .arg(&claim)
            .arg(part.fallback_size.unwrap_or(0))
            .invoke_async(&mut conn)
            .await?;
        // The part and the claim outlive a failover, or the call fails and is made again.
        conn.wait_replicated().await?;
        if ready < 0 {
            return Ok(ChordProgress::AlreadyDone);
        }
        let total = (size > 0).then(|| (size + delta).max(0) as u64);
        if claimed != 1 {
            return Ok(ChordProgress::Waiting {
                ready: ready as u64,
                total,
            });
        }
        let entries: Vec<Vec<u8>> = conn.zrange(format!("{key}.j"), 0, -1).await?;
        let members = entries
            .iter()
            .map(|e| {
                chord::decode_part(e).ok_or_else(|| {
                    Error::Backend(format!(
                        "chord {}: an entry of {key}.j is not [1, id, state, result]",
                        part.group_id
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ChordProgress::Complete { members, claim })
    }

    /// After the body was fired: deletes the chord's keys and marks it done (if `claim` still
    /// holds). `false` when the claim was lost (the keys are left to expire).
    pub async fn chord_cleanup(&self, group_id: &str, claim: &str) -> Result<bool> {
        let key = group_key(group_id);
        let mut conn = self.inner.conn.clone();
        let cleaned: i64 = Script::new(CHORD_CLEANUP_SCRIPT)
            .key(format!("{key}.c"))
            .key(format!("{key}.j"))
            .key(format!("{key}.t"))
            .key(format!("{key}.s"))
            .key(format!("{key}.d"))
            .arg(claim)
            .arg(chord::DONE_SECS)
            .invoke_async(&mut conn)
            .await?;
        Ok(cleaned == 1)
    }

    /// After a failed header task completed the chord: drops `.s`, so a late copy of a header
    /// task does not fail it again (Celery keeps the results for expiry).
    pub async fn chord_abandon(&self, group_id: &str) -> Result<()> {
        let mut conn = self.inner.conn.clone();
        let _: i64 = conn.del(format!("{}.s", group_key(group_id))).await?;
        Ok(())
    }

    /// Saves a group's result tuple as Celery's `save_group`: `{"result": tuple}` under
    /// `celery-taskset-meta-<gid>`, published on the channel of the same name.
    pub async fn save_group(&self, group_id: &str, tuple: &serde_json::Value) -> Result<()> {
        let key = group_key(group_id);
        let bytes = super::encode_stored(self.serializer, &serde_json::json!({ "result": tuple }))?;
        let mut conn = self.inner.conn.pinned().await?;
        let _: () = redis::pipe()
            .set_ex(&key, bytes.as_slice(), self.ttl.as_secs().max(1))
            .ignore()
            .publish(&key, bytes.as_slice())
            .ignore()
            .query_async(&mut conn)
            .await?;
        conn.wait_replicated().await?;
        Ok(())
    }

    /// A saved group's result tuple (`GroupResult.restore`), or `None`.
    pub async fn restore_group(&self, group_id: &str) -> Result<Option<serde_json::Value>> {
        let mut conn = self.inner.conn.clone();
        let bytes: Option<Vec<u8>> = conn.get(group_key(group_id)).await?;
        Ok(match bytes {
            Some(b) => super::decode_stored(&b)
                .ok_or_else(|| {
                    Error::Backend(format!("group {group_id}: an unreadable group result"))
                })?
                .get("result")
                .cloned(),
            None => None,
        })
    }

    async fn subscriber(&self) -> Result<&Subscriber> {
        self.inner
            .subscriber
            .get_or_try_init(|| Subscriber::start(&self.inner.url, &self.inner.display_url))
            .await
    }
}

impl ResultBackend for RedisBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<StoreOutcome> {
        let bytes = meta.encode(self.serializer)?;
        let mut conn = self.inner.conn.pinned().await?;
        let written: i64 = self
            .inner
            .store
            .key(meta_key(&meta.task_id))
            .arg(bytes)
            .arg(self.ttl.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        // Acknowledged only once a replica has it (through Sentinel): a result the old primary
        // took and lost in a failover would leave the task PENDING for ever.
        conn.wait_replicated().await?;
        Ok(if written == 1 {
            StoreOutcome::Stored
        } else {
            StoreOutcome::KeptSuccess
        })
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>> {
        let mut conn = self.inner.conn.clone();
        let bytes: Option<Vec<u8>> = conn.get(meta_key(task_id)).await?;
        bytes.map(|b| TaskMeta::from_json(&b)).transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<TaskMeta> {
        let deadline = tokio::time::Instant::now() + timeout;
        let channel = meta_key(task_id);
        let subscriber = self.subscriber().await?;
        let registration = subscriber.register(&channel).await;
        // Redis unreachable (a restart, a Sentinel failover) is waited out like a result not
        // yet there, up to the deadline, which then reports it.
        let mut unreachable = None;
        loop {
            let notified = registration.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.get(task_id).await {
                Ok(Some(meta)) if meta.status.is_ready() => return Ok(meta),
                Ok(_) => unreachable = None,
                Err(Error::Backend(e)) => {
                    if unreachable.is_none() {
                        tracing::debug!(task_id, error = %e, "result backend unreachable; still waiting");
                    }
                    unreachable = Some(e);
                }
                Err(e) => return Err(e),
            }
            let wake = tokio::time::Instant::now() + RECHECK_INTERVAL;
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake.min(deadline)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(match unreachable {
                            Some(e) => Error::Backend(format!(
                                "no result within {timeout:?}; the backend is unreachable: {e}"
                            )),
                            None => Error::Timeout(timeout),
                        });
                    }
                }
            }
        }
    }

    async fn forget(&self, task_id: &str) -> Result<()> {
        let mut conn = self.inner.conn.clone();
        let _: i64 = conn.del(meta_key(task_id)).await?;
        Ok(())
    }
}

/// One pub/sub connection per process, shared by every waiter.
struct Subscriber {
    conn: RedisConn,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

struct Channel {
    waiters: usize,
    notify: Arc<Notify>,
}

/// A waiter's interest in a channel; unsubscribes when the last one goes.
struct Registration {
    channel: String,
    notify: Arc<Notify>,
    conn: RedisConn,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut channels = self.channels.lock().expect("subscriber lock");
        let last = match channels.get_mut(&self.channel) {
            Some(c) => {
                c.waiters -= 1;
                c.waiters == 0
            }
            None => false,
        };
        if last {
            channels.remove(&self.channel);
            let conn = self.conn.clone();
            let channel = std::mem::take(&mut self.channel);
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = conn.unsubscribe(channel).await;
                });
            }
        }
    }
}

impl Subscriber {
    async fn start(url: &str, display_url: &str) -> Result<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel::<PushInfo>();
        let options = ConnOptions {
            config: manager_config()
                .set_push_sender(tx)
                .set_automatic_resubscription(),
            resp3: true,
        };
        let conn = RedisConn::connect(url, options)
            .await
            .map_err(|e| Error::Backend(format!("cannot subscribe at Redis {display_url}: {e}")))?;
        let channels: Arc<Mutex<HashMap<String, Channel>>> = Arc::default();
        let weak = Arc::downgrade(&channels);
        tokio::spawn(async move {
            while let Some(push) = rx.recv().await {
                let Some(channels) = weak.upgrade() else {
                    break;
                };
                let channels = channels.lock().expect("subscriber lock");
                match push.kind {
                    PushKind::Message => {
                        let name = push.data.first().and_then(|v| match v {
                            redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
                            redis::Value::SimpleString(s) => Some(s.as_str()),
                            _ => None,
                        });
                        if let Some(c) = name.and_then(|n| channels.get(n)) {
                            c.notify.notify_waiters();
                        }
                    }
                    // After a reconnect every waiter re-reads its key.
                    PushKind::Disconnection => {
                        channels.values().for_each(|c| c.notify.notify_waiters())
                    }
                    _ => {}
                }
            }
        });
        // A Sentinel failover moves us to a new primary, which knows none of our channels.
        let mut switches = conn.switches();
        let weak = Arc::downgrade(&channels);
        let resubscriber = conn.clone();
        tokio::spawn(async move {
            while switches.changed().await.is_ok() {
                let Some(channels) = weak.upgrade() else {
                    break;
                };
                let names: Vec<String> = {
                    let channels = channels.lock().expect("subscriber lock");
                    channels.values().for_each(|c| c.notify.notify_waiters());
                    channels.keys().cloned().collect()
                };
                if names.is_empty() {
                    continue;
                }
                let conn = resubscriber.clone();
                if let Err(e) = conn.subscribe(names).await {
                    tracing::warn!(error = %e, "resubscribing after a failover failed; polling");
                }
            }
        });
        Ok(Subscriber { conn, channels })
    }

    async fn register(&self, channel: &str) -> Registration {
        let (notify, first) = {
            let mut channels = self.channels.lock().expect("subscriber lock");
            let c = channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    waiters: 0,
                    notify: Arc::new(Notify::new()),
                });
            c.waiters += 1;
            (c.notify.clone(), c.waiters == 1)
        };
        let registration = Registration {
            channel: channel.to_owned(),
            notify,
            conn: self.conn.clone(),
            channels: self.channels.clone(),
        };
        if first {
            let conn = self.conn.clone();
            if let Err(e) = conn.subscribe(channel).await {
                // Not fatal: the waiter still re-reads the key every RECHECK_INTERVAL.
                tracing::warn!(error = %e, channel, "result subscription failed; polling instead");
            }
        }
        registration
    }
}
