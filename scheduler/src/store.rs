//! Scheduler state in Redis, and the runtime API the monitor uses to change schedules.
//!
//! Layout, under a prefix (default [`DEFAULT_KEY_PREFIX`], `tq:beat:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `entries` | hash | entry name → `{"source": "file"\|"api", "spec": {..}}` (JSON [`EntrySpec`]) |
//! | `paused` | set | names of paused entries |
//! | `state:<name>` | hash | `cursor` (last tick dealt with), `last_run`, `last_task_id`, `last_published_at`, `next_run` (RFC 3339 UTC), `spec` (the schedule's fingerprint), `token` (fencing token of the last leader that wrote), `skipped_missed`, `skipped_overlap`, `skipped_in_doubt` (ticks not published, by reason) |
//! | `fired:<name>:<unix secs>` | string, TTL [`FIRED_TTL`] | `claimed:<token>` then `published:<token>`: the tick's firing key |
//! | `lease`, `token` | string, counter | the leader lease (see [`crate::lease`]) |
//! | `changed` | pub/sub channel | an entry name, each time the API changes something |
//!
//! Invariants the scripts keep, each in one atomic step:
//! - A firing key is claimed only by the current lease holder (the claim script checks the lease
//!   value, which carries the fencing token), so a deposed leader cannot claim a tick.
//! - A tick is published only by the leader that claimed it. If its publish fails, that leader
//!   retries it (same token, same task id) while the catch-up policy still wants it. A claim
//!   left `claimed:` by an earlier leader is never published by another: the earlier leader may
//!   have died after the broker took the message, and a second copy is the worse outcome.
//! - State writes from the beat carry the writer's fencing token and the schedule fingerprint;
//!   a write from an older token, or for a schedule that has since been changed or removed, is
//!   dropped, and the cursor only moves forward.
//! - Adding an entry whose schedule changed resets its cursor to "now": a new schedule does not
//!   catch up on ticks from before it existed. Resuming does the same: a pause is not downtime.
//!
//! `memory://` gives the same semantics in-process for a single replica (tests, the demo).
//! Under Redis Cluster the scripts need all keys in one slot: use a prefix with a hash tag,
//! e.g. `{tq:beat}:`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use redis::Script;
use redis::aio::ConnectionManagerConfig;
use serde::{Deserialize, Serialize};
use task_core::Clock;
use task_core::redis_conn::{ConnOptions, RedisConn};
use tokio::sync::watch;

use crate::entry::{Entry, EntrySpec, format_tick};
use crate::error::{Error, Result};

/// The default prefix of every key the scheduler writes.
pub const DEFAULT_KEY_PREFIX: &str = "tq:beat:";

/// How long a firing key is kept: longer than any catch-up a leader could attempt for a tick
/// it has already seen, short enough that keys of every-second entries do not pile up.
pub const FIRED_TTL: Duration = Duration::from_secs(3 * 86_400);

/// The key names under a prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (e.g. `tq:beat:`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }
    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The leader lease.
    pub fn lease(&self) -> String {
        format!("{}lease", self.prefix)
    }
    /// The fencing-token counter.
    pub fn token(&self) -> String {
        format!("{}token", self.prefix)
    }
    /// The hash of entry definitions.
    pub fn entries(&self) -> String {
        format!("{}entries", self.prefix)
    }
    /// The set of paused entries.
    pub fn paused(&self) -> String {
        format!("{}paused", self.prefix)
    }
    /// An entry's state hash.
    pub fn state(&self, name: &str) -> String {
        format!("{}state:{name}", self.prefix)
    }
    /// A tick's firing key.
    pub fn fired(&self, name: &str, tick: DateTime<Utc>) -> String {
        format!("{}fired:{name}:{}", self.prefix, tick.timestamp())
    }
    /// The change-notification channel.
    pub fn changed(&self) -> String {
        format!("{}changed", self.prefix)
    }
}

/// Where an entry came from: the schedule file (re-applied at each start) or the runtime API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The schedule file.
    File,
    /// The runtime API.
    Api,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stored {
    source: Source,
    spec: EntrySpec,
}

/// An entry's progress, as the leader records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryState {
    /// The last tick dealt with (fired, skipped or dropped); the next tick considered is after it.
    pub cursor: Option<DateTime<Utc>>,
    /// The last tick published.
    pub last_run: Option<DateTime<Utc>>,
    /// The task id of that run.
    pub last_task_id: Option<String>,
    /// When it was published (wall clock of the leader).
    pub last_published_at: Option<DateTime<Utc>>,
    /// The next tick, as last computed by the leader.
    pub next_run: Option<DateTime<Utc>>,
    /// Fingerprint of the schedule the state belongs to.
    pub fingerprint: Option<String>,
    /// Fencing token of the last leader that wrote.
    pub token: u64,
    /// Ticks not published, by reason.
    pub skipped: Skipped,
}

/// Ticks of an entry the beat did not publish, by reason (counted since the entry was added).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Dropped by the catch-up policy (no scheduler was running, or it fell behind).
    pub missed: u64,
    /// The previous run had not finished (`overlap = "skip"`).
    pub overlap: u64,
    /// Claimed by an earlier leader that stopped before confirming its publish.
    pub in_doubt: u64,
}

/// An entry as the monitor shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntryStatus {
    /// The definition.
    pub spec: EntrySpec,
    /// Where it came from.
    pub source: Source,
    /// Whether it is paused.
    pub paused: bool,
    /// The last tick published.
    pub last_run: Option<DateTime<Utc>>,
    /// The task id of that run.
    pub last_task_id: Option<String>,
    /// When that run was published.
    pub last_published_at: Option<DateTime<Utc>>,
    /// The next tick (none while paused).
    pub next_run: Option<DateTime<Utc>>,
    /// Ticks not published, by reason.
    pub skipped: Skipped,
}

/// An entry loaded for the beat loop.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub entry: Entry,
    pub paused: bool,
    pub state: EntryState,
}

/// The answer of a claim on a tick's firing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Claimed now: publish it.
    Fresh,
    /// Claimed earlier under the same token and not marked published (the publish failed):
    /// publish it again, with the same task id.
    Retry,
    /// Already published.
    Done,
    /// Claimed by an earlier leader that never marked it published: whether its message
    /// reached the broker is unknown, so it is left alone rather than risk a second copy.
    InDoubt,
    /// The caller does not hold the lease.
    NotLeader,
}

/// Scheduler state and the runtime API. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    clock: Clock,
}

struct Inner {
    keys: Keys,
    backend: Backend,
    changes: Arc<watch::Sender<u64>>,
    subscriber: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.subscriber.lock().expect("subscriber lock").take() {
            task.abort();
        }
    }
}

pub(crate) enum Backend {
    Redis(RedisStore),
    Memory(Mutex<Mem>),
}

pub(crate) struct RedisStore {
    pub(crate) conn: RedisConn,
    url: String,
}

/// The in-process state of `memory://`, mirroring the Redis keys.
#[derive(Debug, Default)]
pub(crate) struct Mem {
    entries: BTreeMap<String, Stored>,
    paused: BTreeSet<String>,
    states: HashMap<String, EntryState>,
    fired: HashMap<(String, i64), (bool, u64)>,
    pub(crate) lease: Option<(String, tokio::time::Instant)>,
    pub(crate) token: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner.backend {
            Backend::Redis(r) => r.url.clone(),
            Backend::Memory(_) => "memory://".to_owned(),
        };
        f.debug_struct("Store")
            .field("backend", &kind)
            .field("prefix", &self.inner.keys.prefix)
            .finish()
    }
}

/// Checks a Redis URL and prefix and sets up the connection (not connected yet).
fn open(url: &str, prefix: &str) -> Result<RedisStore> {
    if prefix.is_empty() {
        return Err(Error::Store("the key prefix is empty".into()));
    }
    let shown = task_core::redact_url(url);
    if !task_core::redis_url::is_redis_url(url) {
        return Err(Error::Store(format!(
            "`{shown}` is not a store URL (use redis://host:port/db, sentinel://… or memory://)"
        )));
    }
    let conn = RedisConn::lazy(url, ConnOptions::new(manager_config()))
        .map_err(|e| Error::Store(format!("invalid Redis URL {e}")))?;
    Ok(RedisStore { conn, url: shown })
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

impl Store {
    /// Connects to the store a URL names: `redis://…` (shared by all replicas) or `memory://`
    /// (this process only). Fails if Redis cannot be reached now.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        if url.starts_with("memory://") {
            return Ok(Self::memory(prefix));
        }
        let store = open(url, prefix)?;
        store
            .conn
            .check()
            .await
            .map_err(|e| Error::Store(format!("cannot connect to Redis at {}: {e}", store.url)))?;
        Ok(Self::with_backend(prefix, Backend::Redis(store)))
    }

    /// Like [`Store::connect`], but connects on first use instead of now, so a caller can
    /// start while Redis is briefly unavailable (each call fails until it is back).
    pub fn connect_lazy(url: &str, prefix: &str) -> Result<Self> {
        if url.starts_with("memory://") {
            return Ok(Self::memory(prefix));
        }
        let store = open(url, prefix)?;
        Ok(Self::with_backend(prefix, Backend::Redis(store)))
    }

    /// An in-process store (one replica only).
    pub fn memory(prefix: &str) -> Self {
        Self::with_backend(prefix, Backend::Memory(Mutex::new(Mem::default())))
    }

    fn with_backend(prefix: &str, backend: Backend) -> Self {
        let (tx, _) = watch::channel(0);
        Store {
            inner: Arc::new(Inner {
                keys: Keys::new(prefix),
                backend,
                changes: Arc::new(tx),
                subscriber: Mutex::new(None),
            }),
            clock: Clock::system(),
        }
    }

    /// The same store, reading "now" from `clock` (for tests on paused time).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn is_memory(&self) -> bool {
        matches!(self.inner.backend, Backend::Memory(_))
    }

    fn notify(&self) {
        self.inner.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Checks that the store answers (for `/healthz`).
    pub async fn ping(&self) -> Result<()> {
        let Backend::Redis(r) = &self.inner.backend else {
            return Ok(());
        };
        let pong: String = redis::cmd("PING").query_async(&mut r.conn.clone()).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(Error::Store(format!("unexpected PING answer {pong:?}")))
        }
    }

    /// A receiver that changes each time an entry is added, paused, resumed or removed, by this
    /// process or (with Redis) any other. It also changes after a lost subscription comes back,
    /// since changes may have been missed meanwhile.
    pub fn changes(&self) -> watch::Receiver<u64> {
        if let Backend::Redis(r) = &self.inner.backend {
            let mut task = self.inner.subscriber.lock().expect("subscriber lock");
            if task.is_none() {
                *task = Some(tokio::spawn(listen(
                    r.conn.clone(),
                    self.inner.keys.changed(),
                    self.inner.changes.clone(),
                )));
            }
        }
        self.inner.changes.subscribe()
    }

    // ----- the runtime API -----

    /// Adds an entry, or replaces the one of the same name, with no restart. If its schedule
    /// changed, its ticks count from now. Returns the validated entry.
    pub async fn add(&self, spec: EntrySpec) -> Result<Entry> {
        let entry = Entry::new(spec)?;
        self.upsert(&entry, Source::Api).await?;
        tracing::info!(entry = entry.name(), "schedule entry added");
        Ok(entry)
    }

    /// Pauses an entry: no tick fires until it is resumed.
    pub async fn pause(&self, name: &str) -> Result<()> {
        let found = match &self.inner.backend {
            Backend::Memory(m) => {
                let mut m = lock(m);
                let found = m.entries.contains_key(name);
                if found {
                    m.paused.insert(name.to_owned());
                }
                found
            }
            Backend::Redis(r) => {
                let k = self.keys();
                let n: i64 = PAUSE
                    .key(k.entries())
                    .key(k.paused())
                    .arg(name)
                    .arg(k.changed())
                    .invoke_async(&mut r.conn.clone())
                    .await?;
                n == 1
            }
        };
        self.changed(name, found, "paused")
    }

    /// Resumes a paused entry. Ticks that fell in the pause are not caught up: it continues
    /// with the first tick after now.
    pub async fn resume(&self, name: &str) -> Result<()> {
        let now = format_tick(self.now());
        let found = match &self.inner.backend {
            Backend::Memory(m) => {
                let mut m = lock(m);
                let found = m.entries.contains_key(name);
                if found && m.paused.remove(name) {
                    let state = m.states.entry(name.to_owned()).or_default();
                    state.cursor = parse_time(&now);
                    state.next_run = None;
                }
                found
            }
            Backend::Redis(r) => {
                let k = self.keys();
                let n: i64 = RESUME
                    .key(k.entries())
                    .key(k.paused())
                    .key(k.state(name))
                    .arg(name)
                    .arg(&now)
                    .arg(k.changed())
                    .invoke_async(&mut r.conn.clone())
                    .await?;
                n == 1
            }
        };
        self.changed(name, found, "resumed")
    }

    /// Removes an entry and its state.
    pub async fn remove(&self, name: &str) -> Result<()> {
        let found = match &self.inner.backend {
            Backend::Memory(m) => {
                let mut m = lock(m);
                m.paused.remove(name);
                m.states.remove(name);
                m.entries.remove(name).is_some()
            }
            Backend::Redis(r) => {
                let k = self.keys();
                let n: i64 = REMOVE
                    .key(k.entries())
                    .key(k.paused())
                    .key(k.state(name))
                    .arg(name)
                    .arg(k.changed())
                    .invoke_async(&mut r.conn.clone())
                    .await?;
                n == 1
            }
        };
        self.changed(name, found, "removed")
    }

    fn changed(&self, name: &str, found: bool, what: &str) -> Result<()> {
        if !found {
            return Err(Error::NotFound(name.to_owned()));
        }
        if self.is_memory() {
            self.notify();
        }
        tracing::info!(entry = name, "schedule entry {what}");
        Ok(())
    }

    /// Every entry with its last and next run, by name.
    pub async fn list(&self) -> Result<Vec<EntryStatus>> {
        Ok(self
            .read_all()
            .await?
            .into_iter()
            .map(|(stored, paused, state)| EntryStatus {
                spec: stored.spec,
                source: stored.source,
                paused,
                last_run: state.last_run,
                last_task_id: state.last_task_id,
                last_published_at: state.last_published_at,
                next_run: if paused { None } else { state.next_run },
                skipped: state.skipped,
            })
            .collect())
    }

    /// One entry with its last and next run.
    pub async fn get(&self, name: &str) -> Result<Option<EntryStatus>> {
        Ok(self.list().await?.into_iter().find(|s| s.spec.name == name))
    }

    /// The number of entries.
    pub async fn count(&self) -> Result<usize> {
        match &self.inner.backend {
            Backend::Memory(m) => Ok(lock(m).entries.len()),
            Backend::Redis(r) => Ok(redis::cmd("HLEN")
                .arg(self.keys().entries())
                .query_async(&mut r.conn.clone())
                .await?),
        }
    }

    /// Applies the schedule file: adds or updates its entries, and removes entries that an
    /// earlier file added but this one no longer has. Entries added through the API stay.
    pub async fn seed(&self, entries: &[Entry]) -> Result<()> {
        for entry in entries {
            self.upsert(entry, Source::File).await?;
        }
        let wanted: HashSet<&str> = entries.iter().map(Entry::name).collect();
        for (stored, _, _) in self.read_all().await? {
            if stored.source == Source::File && !wanted.contains(stored.spec.name.as_str()) {
                match self.remove(&stored.spec.name).await {
                    Ok(()) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn upsert(&self, entry: &Entry, source: Source) -> Result<()> {
        let stored = Stored {
            source,
            spec: entry.spec().clone(),
        };
        let json = serde_json::to_string(&stored).map_err(|e| Error::Corrupt(e.to_string()))?;
        let fingerprint = entry.schedule().fingerprint();
        let now = format_tick(self.now());
        let name = entry.name();
        let r = match &self.inner.backend {
            Backend::Redis(r) => r,
            Backend::Memory(m) => {
                let mut m = lock(m);
                let mut changed = m.entries.get(name) != Some(&stored);
                m.entries.insert(name.to_owned(), stored);
                let state = m.states.entry(name.to_owned()).or_default();
                if state.fingerprint.as_deref() != Some(fingerprint.as_str()) {
                    state.fingerprint = Some(fingerprint);
                    state.cursor = parse_time(&now);
                    state.next_run = None;
                    changed = true;
                }
                drop(m);
                if changed {
                    self.notify();
                }
                return Ok(());
            }
        };
        let k = self.keys();
        let _: i64 = UPSERT
            .key(k.entries())
            .key(k.state(name))
            .arg(name)
            .arg(json)
            .arg(fingerprint)
            .arg(now)
            .arg(k.changed())
            .invoke_async(&mut r.conn.clone())
            .await?;
        Ok(())
    }

    async fn read_all(&self) -> Result<Vec<(Stored, bool, EntryState)>> {
        let (raw, paused, states): (HashMap<String, String>, HashSet<String>, Vec<_>) =
            match &self.inner.backend {
                Backend::Memory(m) => {
                    let m = lock(m);
                    let raw = m
                        .entries
                        .iter()
                        .map(|(n, s)| Ok((n.clone(), serde_json::to_string(s)?)))
                        .collect::<serde_json::Result<_>>()
                        .map_err(|e| Error::Corrupt(e.to_string()))?;
                    let states = m
                        .entries
                        .keys()
                        .map(|n| m.states.get(n).cloned().unwrap_or_default())
                        .collect();
                    (raw, m.paused.iter().cloned().collect(), states)
                }
                Backend::Redis(r) => {
                    let k = self.keys();
                    let mut conn = r.conn.clone();
                    let (raw, paused): (HashMap<String, String>, HashSet<String>) = redis::pipe()
                        .hgetall(k.entries())
                        .smembers(k.paused())
                        .query_async(&mut conn)
                        .await?;
                    let mut names: Vec<&String> = raw.keys().collect();
                    names.sort();
                    let mut pipe = redis::pipe();
                    for n in &names {
                        pipe.hgetall(k.state(n));
                    }
                    let hashes: Vec<HashMap<String, String>> = if names.is_empty() {
                        Vec::new()
                    } else {
                        pipe.query_async(&mut conn).await?
                    };
                    let mut states = Vec::with_capacity(names.len());
                    for h in hashes {
                        states.push(state_from_hash(&h));
                    }
                    (raw, paused, states)
                }
            };
        let mut names: Vec<&String> = raw.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for (name, state) in names.into_iter().zip(states) {
            match serde_json::from_str::<Stored>(&raw[name]) {
                Ok(stored) => out.push((stored, paused.contains(name), state)),
                Err(e) => {
                    tracing::error!(entry = %name, error = %e, "unreadable entry definition in the store; ignored")
                }
            }
        }
        Ok(out)
    }

    // ----- used by the beat loop -----

    /// Every valid entry with its state (invalid stored definitions are logged and left out).
    pub(crate) async fn load(&self) -> Result<Vec<Loaded>> {
        let mut out = Vec::new();
        for (stored, paused, mut state) in self.read_all().await? {
            match Entry::new(stored.spec) {
                Ok(entry) => {
                    let fingerprint = entry.schedule().fingerprint();
                    if state.fingerprint.as_deref() != Some(fingerprint.as_str()) {
                        // State deleted or written for another schedule by something other
                        // than the API: start this schedule from now, as `add` would.
                        let now = self.reset_state(&entry, &fingerprint).await?;
                        state.fingerprint = Some(fingerprint);
                        state.cursor = Some(now);
                        state.next_run = None;
                    }
                    out.push(Loaded {
                        entry,
                        paused,
                        state,
                    });
                }
                Err(e) => tracing::error!(error = %e, "invalid entry in the store; ignored"),
            }
        }
        Ok(out)
    }

    /// Points an entry's state at its current schedule, counting from now, unless it already
    /// is. Returns the "now" used.
    async fn reset_state(&self, entry: &Entry, fingerprint: &str) -> Result<DateTime<Utc>> {
        let now = format_tick(self.now());
        match &self.inner.backend {
            Backend::Memory(m) => {
                let mut m = lock(m);
                let state = m.states.entry(entry.name().to_owned()).or_default();
                if state.fingerprint.as_deref() != Some(fingerprint) {
                    state.fingerprint = Some(fingerprint.to_owned());
                    state.cursor = parse_time(&now);
                    state.next_run = None;
                }
            }
            Backend::Redis(r) => {
                let _: i64 = RESET_STATE
                    .key(self.keys().state(entry.name()))
                    .arg(fingerprint)
                    .arg(&now)
                    .invoke_async(&mut r.conn.clone())
                    .await?;
            }
        }
        parse_time(&now).ok_or_else(|| Error::Corrupt(format!("time {now}")))
    }

    /// Claims a tick's firing key for the leader holding `lease_value` (which carries `token`).
    pub(crate) async fn claim(
        &self,
        lease_value: &str,
        token: u64,
        name: &str,
        tick: DateTime<Utc>,
    ) -> Result<Claim> {
        let r = match &self.inner.backend {
            Backend::Redis(r) => r,
            Backend::Memory(m) => {
                let mut m = lock(m);
                let now = tokio::time::Instant::now();
                let holds =
                    matches!(&m.lease, Some((v, until)) if v == lease_value && *until > now);
                if !holds {
                    return Ok(Claim::NotLeader);
                }
                let key = (name.to_owned(), tick.timestamp());
                let answer = match m.fired.get(&key) {
                    None => Claim::Fresh,
                    Some((true, _)) => Claim::Done,
                    Some((false, by)) if *by == token => Claim::Retry,
                    Some((false, _)) => Claim::InDoubt,
                };
                if answer == Claim::Fresh {
                    m.fired.insert(key, (false, token));
                    prune_fired(&mut m, tick);
                }
                return Ok(answer);
            }
        };
        let k = self.keys();
        let mut conn = r.conn.pinned().await?;
        let n: i64 = CLAIM
            .key(k.lease())
            .key(k.fired(name, tick))
            .arg(lease_value)
            .arg(token)
            .arg(FIRED_TTL.as_secs())
            .invoke_async(&mut conn)
            .await?;
        if n == 1 || n == 2 {
            // Published only once a replica holds the claim (through Sentinel): a claim lost in a
            // failover would let the next leader fire the tick again.
            conn.wait_replicated().await?;
        }
        Ok(match n {
            1 => Claim::Fresh,
            2 => Claim::Retry,
            0 => Claim::Done,
            3 => Claim::InDoubt,
            _ => Claim::NotLeader,
        })
    }

    /// Marks a tick published and records it as the entry's last run (fenced; see the module
    /// docs). Returns whether the state was written.
    pub(crate) async fn record_published(
        &self,
        entry: &Entry,
        token: u64,
        tick: DateTime<Utc>,
        task_id: &str,
        published_at: DateTime<Utc>,
    ) -> Result<bool> {
        let name = entry.name();
        let fingerprint = entry.schedule().fingerprint();
        let r = match &self.inner.backend {
            Backend::Redis(r) => r,
            Backend::Memory(m) => {
                let mut m = lock(m);
                m.fired
                    .insert((name.to_owned(), tick.timestamp()), (true, token));
                let Some(state) = m.states.get_mut(name) else {
                    return Ok(false);
                };
                if state.fingerprint.as_deref() != Some(fingerprint.as_str()) || token < state.token
                {
                    return Ok(false);
                }
                if state.cursor.is_none_or(|c| tick > c) {
                    state.cursor = Some(tick);
                }
                if state.last_run.is_none_or(|l| tick >= l) {
                    state.last_run = Some(tick);
                    state.last_task_id = Some(task_id.to_owned());
                    state.last_published_at = Some(published_at);
                }
                state.token = token;
                return Ok(true);
            }
        };
        let k = self.keys();
        let n: i64 = PUBLISHED
            .key(k.fired(name, tick))
            .key(k.state(name))
            .arg(token)
            .arg(fingerprint)
            .arg(format_tick(tick))
            .arg(task_id)
            .arg(published_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .arg(FIRED_TTL.as_secs())
            .invoke_async(&mut r.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// Counts `n` ticks of `name` not published for `reason` (`missed`, `overlap`,
    /// `in_doubt`), if the entry still exists.
    pub(crate) async fn count_skipped(&self, name: &str, reason: &str, n: u64) -> Result<()> {
        match &self.inner.backend {
            Backend::Memory(m) => {
                let mut m = lock(m);
                if m.entries.contains_key(name) {
                    let s = &mut m.states.entry(name.to_owned()).or_default().skipped;
                    match reason {
                        "missed" => s.missed += n,
                        "overlap" => s.overlap += n,
                        _ => s.in_doubt += n,
                    }
                }
            }
            Backend::Redis(r) => {
                let k = self.keys();
                let _: i64 = COUNT_SKIPPED
                    .key(k.entries())
                    .key(k.state(name))
                    .arg(name)
                    .arg(format!("skipped_{reason}"))
                    .arg(n)
                    .invoke_async(&mut r.conn.clone())
                    .await?;
            }
        }
        Ok(())
    }

    /// Moves the cursor forward to `cursor` (never back) and records the next tick (fenced).
    pub(crate) async fn advance(
        &self,
        entry: &Entry,
        token: u64,
        cursor: Option<DateTime<Utc>>,
        next_run: Option<DateTime<Utc>>,
    ) -> Result<bool> {
        let name = entry.name();
        let fingerprint = entry.schedule().fingerprint();
        let r = match &self.inner.backend {
            Backend::Redis(r) => r,
            Backend::Memory(m) => {
                let mut m = lock(m);
                let Some(state) = m.states.get_mut(name) else {
                    return Ok(false);
                };
                if state.fingerprint.as_deref() != Some(fingerprint.as_str()) || token < state.token
                {
                    return Ok(false);
                }
                if let Some(c) = cursor
                    && state.cursor.is_none_or(|old| c > old)
                {
                    state.cursor = Some(c);
                }
                state.next_run = next_run;
                state.token = token;
                return Ok(true);
            }
        };
        let k = self.keys();
        let n: i64 = ADVANCE
            .key(k.state(name))
            .arg(token)
            .arg(fingerprint)
            .arg(cursor.map(format_tick).unwrap_or_default())
            .arg(next_run.map(format_tick).unwrap_or_default())
            .invoke_async(&mut r.conn.clone())
            .await?;
        Ok(n == 1)
    }
}

pub(crate) fn lock(m: &Mutex<Mem>) -> std::sync::MutexGuard<'_, Mem> {
    m.lock().expect("memory store lock")
}

/// Keeps the memory store's firing keys bounded the way the Redis TTL does.
fn prune_fired(m: &mut Mem, now: DateTime<Utc>) {
    if m.fired.len() > 100_000 {
        let horizon = (now - chrono::Duration::from_std(FIRED_TTL).unwrap_or_default()).timestamp();
        m.fired.retain(|(_, secs), _| *secs >= horizon);
    }
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn state_from_hash(h: &HashMap<String, String>) -> EntryState {
    let time = |f: &str| h.get(f).and_then(|s| parse_time(s));
    let count = |f: &str| h.get(f).and_then(|s| s.parse().ok()).unwrap_or(0);
    EntryState {
        cursor: time("cursor"),
        last_run: time("last_run"),
        last_task_id: h.get("last_task_id").cloned(),
        last_published_at: time("last_published_at"),
        next_run: time("next_run"),
        fingerprint: h.get("spec").cloned(),
        token: h.get("token").and_then(|t| t.parse().ok()).unwrap_or(0),
        skipped: Skipped {
            missed: count("skipped_missed"),
            overlap: count("skipped_overlap"),
            in_doubt: count("skipped_in_doubt"),
        },
    }
}

/// Forwards change notifications from Redis pub/sub, resubscribing after a lost connection.
async fn listen(conn: RedisConn, channel: String, changes: Arc<watch::Sender<u64>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // Through Sentinel, each attempt asks for the primary again.
        let pubsub = match conn.client().await {
            Ok(client) => client.get_async_pubsub().await,
            Err(e) => Err(e),
        };
        match pubsub {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    // Whatever changed while we were not listening is picked up by a reload.
                    changes.send_modify(|g| *g = g.wrapping_add(1));
                    let mut messages = pubsub.into_on_message();
                    while messages.next().await.is_some() {
                        changes.send_modify(|g| *g = g.wrapping_add(1));
                    }
                    tracing::warn!(%channel, "change subscription lost; resubscribing");
                }
                Err(e) => {
                    tracing::warn!(%channel, error = %e, "cannot subscribe to schedule changes")
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot open the change subscription"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

// Every script takes all its keys in KEYS (Redis Cluster needs them in one slot: see the module
// docs); the channel name is an argument because channels are not keys.

/// KEYS: entries, state. ARGV: name, json, fingerprint, now, channel.
static UPSERT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local changed = redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2]
if changed then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
if redis.call('HGET', KEYS[2], 'spec') ~= ARGV[3] then
  redis.call('HSET', KEYS[2], 'spec', ARGV[3], 'cursor', ARGV[4])
  redis.call('HDEL', KEYS[2], 'next_run')
  changed = true
end
if changed then redis.call('PUBLISH', ARGV[5], ARGV[1]) end
return changed and 1 or 0
",
    )
});

/// KEYS: state. ARGV: fingerprint, now.
static RESET_STATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'spec') == ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'cursor', ARGV[2])
redis.call('HDEL', KEYS[1], 'next_run')
return 1
",
    )
});

/// KEYS: entries, state. ARGV: name, field, n.
static COUNT_SKIPPED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[2], ARGV[2], ARGV[3])
",
    )
});

/// KEYS: entries, paused. ARGV: name, channel.
static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
",
    )
});

/// KEYS: entries, paused, state. ARGV: name, now, channel.
static RESUME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('SREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[3], 'cursor', ARGV[2])
  redis.call('HDEL', KEYS[3], 'next_run')
end
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
",
    )
});

/// KEYS: entries, paused, state. ARGV: name, channel.
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
if n == 1 then redis.call('PUBLISH', ARGV[2], ARGV[1]) end
return n
",
    )
});

/// KEYS: lease, fired. ARGV: lease value, token, ttl secs.
/// Returns -1 not leader, 0 already published, 1 claimed now, 2 our own unfinished claim,
/// 3 an earlier leader's unfinished claim.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local current = redis.call('GET', KEYS[2])
if not current then
  redis.call('SET', KEYS[2], 'claimed:' .. ARGV[2], 'EX', ARGV[3])
  return 1
end
if current == 'claimed:' .. ARGV[2] then return 2 end
if string.sub(current, 1, 8) == 'claimed:' then return 3 end
return 0
",
    )
});

/// KEYS: fired, state. ARGV: token, fingerprint, tick, task id, published at, ttl secs.
static PUBLISHED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], 'published:' .. ARGV[1], 'EX', ARGV[6])
if redis.call('HGET', KEYS[2], 'spec') ~= ARGV[2] then return 0 end
if tonumber(ARGV[1]) < tonumber(redis.call('HGET', KEYS[2], 'token') or '0') then return 0 end
local cursor = redis.call('HGET', KEYS[2], 'cursor')
if (not cursor) or ARGV[3] > cursor then redis.call('HSET', KEYS[2], 'cursor', ARGV[3]) end
local last = redis.call('HGET', KEYS[2], 'last_run')
if (not last) or ARGV[3] >= last then
  redis.call('HSET', KEYS[2], 'last_run', ARGV[3], 'last_task_id', ARGV[4], 'last_published_at', ARGV[5])
end
redis.call('HSET', KEYS[2], 'token', ARGV[1])
return 1
",
    )
});

/// KEYS: state. ARGV: token, fingerprint, cursor (or ''), next run (or '').
static ADVANCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'spec') ~= ARGV[2] then return 0 end
if tonumber(ARGV[1]) < tonumber(redis.call('HGET', KEYS[1], 'token') or '0') then return 0 end
local cursor = redis.call('HGET', KEYS[1], 'cursor')
if ARGV[3] ~= '' and ((not cursor) or ARGV[3] > cursor) then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'next_run', ARGV[4])
else
  redis.call('HDEL', KEYS[1], 'next_run')
end
redis.call('HSET', KEYS[1], 'token', ARGV[1])
return 1
",
    )
});

#[cfg(test)]
mod tests;
