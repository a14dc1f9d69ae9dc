//! The beat loop: while this replica holds the lease, publish every due tick exactly once.
//!
//! For each entry the store keeps a *cursor*, the last tick dealt with. When the leader wakes it
//! takes, per entry, the due ticks in `(cursor, now]` and lets the catch-up policy choose which
//! to fire: on-time ticks (within [`BeatConfig::grace`]) always fire; older ones ("missed", as
//! after downtime or a leader change) are dropped (`skip`), collapsed into one run for the
//! latest (`once`), or all fired oldest first within a window (`all`). Each fired tick goes
//! through the same three steps:
//!
//! 1. **claim** its firing key in Redis, atomically with a check that we still hold the lease;
//! 2. **publish** the task with a deterministic id (`beat:<entry>:<tick>`), waiting for the
//!    broker's confirm;
//! 3. **record** it published and move the cursor past it (fenced by our token).
//!
//! Only the claimer ever publishes a tick, so no tick is published twice across replicas or
//! leader changes. A publish that fails is retried by the same leader (same claim, same task
//! id) for as long as the catch-up policy still selects the tick; if the broker had in fact
//! taken the message and only its confirm was lost, the retry makes a second copy with the same
//! task id, the one case where a consumer may see a tick twice. A leader killed between steps
//! 1 and 3 leaves the key `claimed`, and its successor leaves that tick alone (counted as
//! `beat_ticks_skipped{reason="in_doubt"}`): its message may already be on the broker, and
//! sending a second copy would break the promise downstream relies on. The cost is that a
//! tick can be lost if a leader dies in the microseconds between its claim and handing the
//! message to the broker; exactly-once across a crash would need deduplication in the broker.
//!
//! The loop sleeps until the earliest next tick, and wakes early when the lease is lost, when
//! the runtime API changes an entry (pub/sub), or for a periodic reload that covers a missed
//! notification. Time comes from an injected [`Clock`]; sleeps are tokio's, so tests run this
//! loop on paused time.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use task_core::{Client, Clock, ResultBackend, TaskState};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::entry::{CatchUp, DEFAULT_OVERLAP_HORIZON, Entry, Overlap};
use crate::error::{Error, Result};
use crate::lease::{self, LeaseConfig, Role, lease_value};
use crate::metrics::Metrics;
use crate::store::{Claim, EntryState, Loaded, Store};

/// Settings of one beat replica.
#[derive(Debug, Clone)]
pub struct BeatConfig {
    /// This replica's name in the lease (unique per replica).
    pub node_id: String,
    /// Lease timing.
    pub lease: LeaseConfig,
    /// A tick at most this old counts as on time: it fires whatever the catch-up policy.
    pub grace: Duration,
    /// A tick published more than this after its time counts as late (`beat_ticks_late`).
    pub late_after: Duration,
    /// Entries are reloaded from the store at least this often, in case a change notification
    /// was lost.
    pub resync_every: Duration,
}

impl BeatConfig {
    /// The defaults for a node id: lease TTL 10 s renewed every 3 s, followers polling every
    /// second, grace 2 s, late after 1 s, reload every 5 s.
    pub fn new(node_id: impl Into<String>) -> Self {
        BeatConfig {
            node_id: node_id.into(),
            lease: LeaseConfig::default(),
            grace: Duration::from_secs(2),
            late_after: Duration::from_secs(1),
            resync_every: Duration::from_secs(5),
        }
    }
}

/// One scheduler replica.
#[derive(Debug)]
pub struct Beat {
    store: Store,
    client: Client,
    config: BeatConfig,
    clock: Clock,
    metrics: Metrics,
    role: watch::Sender<Role>,
}

/// How a leadership tenure ended.
enum Led {
    Shutdown,
    Deposed,
}

/// Why handling an entry stopped early.
enum Step {
    /// The lease is gone: stop firing at once.
    Deposed,
    /// Something failed; the entry is retried after a back-off.
    Failed(Error),
}

impl From<Error> for Step {
    fn from(e: Error) -> Self {
        Step::Failed(e)
    }
}

/// An entry as the leader tracks it between reloads.
struct Live {
    entry: Entry,
    paused: bool,
    state: EntryState,
    /// After a failure: when to try again, and the back-off used.
    retry: Option<(DateTime<Utc>, Duration)>,
    /// A tick this leader published but could not record (the store failed right after the
    /// broker took it): its retry records it instead of sending a second copy.
    unrecorded: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// The first back-off after a failed publish; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

impl Beat {
    /// A replica firing the entries in `store` through `client`.
    pub fn new(store: Store, client: Client, config: BeatConfig) -> Self {
        Beat {
            store,
            client,
            config,
            clock: Clock::system(),
            metrics: Metrics::default(),
            role: watch::channel(Role::Follower).0,
        }
    }

    /// Reads "now" from `clock` (tests use [`Clock::tokio`] on paused time).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Records into `metrics` (registered by the caller).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The metrics this replica records.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This replica's role, as it changes.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Runs until `shutdown` resolves: follows, leads when it gets the lease, and on shutdown
    /// releases the lease so another replica takes over at once.
    ///
    /// The lease is kept by a future polled inside this one, not by a spawned task: dropping
    /// (aborting) `run` stops the renewals too, exactly as if the process had been killed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut keeper = std::pin::pin!(lease::keep(
            self.store.clone(),
            self.config.node_id.clone(),
            self.config.lease,
            self.role.clone(),
            self.metrics.clone(),
            stop_rx,
        ));
        tracing::info!(node_id = %self.config.node_id, "scheduler started; waiting for the lease");
        tokio::select! {
            () = &mut keeper => {}
            () = self.follow_and_lead(shutdown) => {}
        }
        let _ = stop_tx.send(true);
        keeper.await;
        tracing::info!(node_id = %self.config.node_id, "scheduler stopped");
        Ok(())
    }

    async fn follow_and_lead(&self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut role = self.role.subscribe();
        let mut changes = self.store.changes();
        // A tenure the store has refused (a claim found the lease gone) is not resumed, even
        // while the lease keeper has not noticed yet: wait for a new role instead.
        let mut refused: Option<u64> = None;
        loop {
            let token = loop {
                match *role.borrow_and_update() {
                    Role::Leader { token } if refused != Some(token) => break token,
                    _ => {}
                }
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = role.changed() => {}
                }
            };
            match self
                .lead(token, &mut role, &mut changes, shutdown.as_mut())
                .await
            {
                Led::Shutdown => return,
                Led::Deposed => refused = Some(token),
            }
        }
    }

    fn leads(&self, token: u64) -> bool {
        *self.role.borrow() == Role::Leader { token }
    }

    /// The tokio instant at which the clock reads `t`.
    fn instant_of(&self, t: DateTime<Utc>) -> Instant {
        Instant::now() + (t - self.clock.now()).to_std().unwrap_or_default()
    }

    async fn lead(
        &self,
        token: u64,
        role: &mut watch::Receiver<Role>,
        changes: &mut watch::Receiver<u64>,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Led {
        let lease = lease_value(&self.config.node_id, token);
        let mut entries: Vec<Live> = Vec::new();
        let mut loaded = false;
        let mut reload_at = Instant::now();
        changes.borrow_and_update();
        loop {
            if Instant::now() >= reload_at {
                match self.store.load().await {
                    Ok(fresh) => {
                        for l in &fresh {
                            self.metrics.track(l.entry.name());
                        }
                        entries = merge(entries, fresh);
                        loaded = true;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot load the schedule; retrying"),
                }
                reload_at = Instant::now()
                    + if loaded {
                        self.config.resync_every
                    } else {
                        FIRST_RETRY
                    };
            }
            let mut wake = reload_at;
            let now = self.clock.now();
            for live in &mut entries {
                if !self.leads(token) {
                    return Led::Deposed;
                }
                match self.process(live, now, token, &lease).await {
                    Ok(Some(next)) => wake = wake.min(self.instant_of(next)),
                    Ok(None) => {}
                    Err(Step::Deposed) => {
                        tracing::warn!(
                            entry = live.entry.name(),
                            "the lease is no longer ours; stopped firing"
                        );
                        return Led::Deposed;
                    }
                    Err(Step::Failed(e)) => {
                        let backoff = live
                            .retry
                            .map(|(_, b)| (b * 2).min(MAX_RETRY))
                            .unwrap_or(FIRST_RETRY);
                        let at = now + chrono::Duration::from_std(backoff).unwrap_or_default();
                        live.retry = Some((at, backoff));
                        wake = wake.min(self.instant_of(at));
                        tracing::warn!(entry = live.entry.name(), error = %e, retry_in = ?backoff, "tick not handled; retrying");
                    }
                }
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => return Led::Shutdown,
                _ = role.changed() => {
                    if *role.borrow_and_update() != (Role::Leader { token }) {
                        return Led::Deposed;
                    }
                }
                changed = changes.changed() => {
                    if changed.is_ok() {
                        reload_at = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Fires what is due for one entry; returns when it next needs attention.
    async fn process(
        &self,
        live: &mut Live,
        now: DateTime<Utc>,
        token: u64,
        lease: &str,
    ) -> Result<Option<DateTime<Utc>>, Step> {
        if live.paused {
            return Ok(None);
        }
        if let Some((at, _)) = live.retry
            && at > now
        {
            return Ok(Some(at));
        }
        let schedule = live.entry.schedule().clone();
        // An entry always gets a cursor when it is added; without one (state deleted by hand)
        // it starts from now rather than from the beginning of time.
        let cursor = live.state.cursor.unwrap_or(now);
        let Some(first) = schedule.next_after(cursor) else {
            return Ok(None);
        };
        if first > now {
            if live.state.next_run != Some(first) || live.state.cursor.is_none() {
                self.store
                    .advance(&live.entry, token, Some(cursor), Some(first))
                    .await?;
                live.state.cursor = Some(cursor);
                live.state.next_run = Some(first);
            }
            live.retry = None;
            return Ok(Some(first));
        }
        let latest = schedule
            .latest_at_or_before(now)
            .filter(|l| *l >= first)
            .unwrap_or(first);
        let selected = self.select(&live.entry, first, latest, now);

        let dropped = schedule
            .count_between(first, latest)
            .saturating_sub(selected.len() as u64);
        if dropped > 0 {
            self.skipped(live.entry.name(), "missed", dropped).await;
            tracing::info!(
                entry = live.entry.name(),
                dropped,
                from = %first,
                to = %latest,
                policy = ?live.entry.catch_up(),
                "missed ticks not run, per the catch-up policy"
            );
        }
        for tick in selected {
            if !self.leads(token) {
                return Err(Step::Deposed);
            }
            self.fire(live, tick, now, token, lease).await?;
        }
        let next = schedule.next_after(latest.max(now));
        self.store
            .advance(&live.entry, token, Some(latest), next)
            .await?;
        live.state.cursor = Some(live.state.cursor.map_or(latest, |c| c.max(latest)));
        live.state.next_run = next;
        live.retry = None;
        Ok(next)
    }

    /// The due ticks in `[first, latest]` that the catch-up policy fires, oldest first.
    fn select(
        &self,
        entry: &Entry,
        first: DateTime<Utc>,
        latest: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        let schedule = entry.schedule();
        let since = |window: Duration| {
            let lower = now - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
            let mut ticks = Vec::new();
            let mut t = schedule.first_at_or_after(lower).map(|t| t.max(first));
            while let Some(tick) = t.filter(|t| *t <= latest) {
                ticks.push(tick);
                t = schedule.next_after(tick);
            }
            ticks
        };
        match entry.catch_up() {
            CatchUp::Skip => since(self.config.grace),
            CatchUp::Once { window } => {
                let age = (now - latest).to_std().unwrap_or_default();
                if age <= self.config.grace || window.is_none_or(|w| age <= w) {
                    vec![latest]
                } else {
                    Vec::new()
                }
            }
            CatchUp::All { window } => since(window.max(self.config.grace)),
        }
    }

    /// Counts ticks not published, in the metrics and in the store (for the monitor's beat
    /// page); a store that cannot take the count does not hold up the beat.
    async fn skipped(&self, entry: &str, reason: &str, n: u64) {
        self.metrics.skipped(entry, reason, n);
        if let Err(e) = self.store.count_skipped(entry, reason, n).await {
            tracing::warn!(entry, reason, error = %e, "could not record skipped ticks in the store");
        }
    }

    /// Fires one tick: overlap check, claim, publish, record.
    async fn fire(
        &self,
        live: &mut Live,
        tick: DateTime<Utc>,
        now: DateTime<Utc>,
        token: u64,
        lease: &str,
    ) -> Result<(), Step> {
        if live.entry.overlap() == Overlap::Skip && self.previous_running(live, now).await? {
            self.skipped(live.entry.name(), "overlap", 1).await;
            tracing::info!(
                entry = live.entry.name(),
                %tick,
                previous = live.state.last_task_id.as_deref().unwrap_or_default(),
                "tick skipped: the previous run has not finished"
            );
            return Ok(());
        }
        match self
            .store
            .claim(lease, token, live.entry.name(), tick)
            .await?
        {
            Claim::NotLeader => Err(Step::Deposed),
            Claim::Done => Ok(()),
            Claim::InDoubt => {
                self.skipped(live.entry.name(), "in_doubt", 1).await;
                tracing::warn!(
                    entry = live.entry.name(),
                    %tick,
                    "tick claimed by an earlier leader that stopped before confirming its \
                     publish; not sent again (it may or may not have reached the broker)"
                );
                Ok(())
            }
            Claim::Fresh => self.publish(live, tick, token, false).await,
            Claim::Retry => self.publish(live, tick, token, true).await,
        }
    }

    /// Whether the entry's previous run is still queued or running, per the result backend.
    async fn previous_running(&self, live: &Live, now: DateTime<Utc>) -> Result<bool> {
        let (Some(id), Some(last)) = (&live.state.last_task_id, live.state.last_run) else {
            return Ok(false);
        };
        let meta = self.client.backend().get(id).await?;
        Ok(match meta.map(|m| m.status) {
            Some(s) if s.is_ready() => false,
            Some(TaskState::Ignored | TaskState::Rejected) => false,
            // Nothing stored: queued (or running without `track_started`) — unless it can no
            // longer start (expired) or its result would have been dropped by now anyway.
            Some(TaskState::Pending) | None => {
                let horizon = live.entry.expires().unwrap_or(DEFAULT_OVERLAP_HORIZON);
                now < last + chrono::Duration::from_std(horizon).unwrap_or(chrono::Duration::MAX)
            }
            Some(_) => true,
        })
    }

    /// Publishes the run for `tick` and records it.
    async fn publish(
        &self,
        live: &mut Live,
        tick: DateTime<Utc>,
        token: u64,
        retry: bool,
    ) -> Result<(), Step> {
        let entry = &live.entry;
        let task_id = entry.task_id(tick);
        let to_chrono = |d: Duration| chrono::Duration::from_std(d).unwrap_or_default();
        let mut call = self
            .client
            .send_task(entry.task(), entry.args().to_vec(), entry.kwargs().clone())
            .task_id(task_id.clone())
            .queue(entry.queue());
        if let Some(expires) = entry.expires() {
            call = call.expires_at(tick + to_chrono(expires));
        }
        if let Some(priority) = entry.priority() {
            call = call.priority(priority);
        }
        let (soft, hard) = entry.time_limits();
        if soft.is_some() || hard.is_some() {
            call = call.time_limits(soft, hard);
        }
        let jitter = entry.jitter_for(tick);
        if !jitter.is_zero() {
            call = call.eta(tick + to_chrono(jitter));
        }
        let published_at = match live.unrecorded {
            Some((t, at)) if t == tick => at,
            _ => {
                if let Err(e) = call.send().await {
                    self.metrics.publish_error(entry.name());
                    return Err(Step::Failed(e.into()));
                }
                self.clock.now()
            }
        };
        if let Err(e) = self
            .store
            .record_published(entry, token, tick, &task_id, published_at)
            .await
        {
            live.unrecorded = Some((tick, published_at));
            return Err(e.into());
        }
        live.unrecorded = None;
        let state = &mut live.state;
        state.cursor = Some(state.cursor.map_or(tick, |c| c.max(tick)));
        if state.last_run.is_none_or(|l| tick >= l) {
            state.last_run = Some(tick);
            state.last_task_id = Some(task_id.clone());
            state.last_published_at = Some(published_at);
        }
        let late = (published_at - tick).to_std().unwrap_or_default() > self.config.late_after;
        self.metrics.fired(entry.name(), late);
        tracing::info!(
            entry = entry.name(),
            task = entry.task(),
            %tick,
            task_id,
            late,
            retry,
            "tick published"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// Replaces the tracked entries with freshly loaded ones, keeping retry back-offs and ticks
/// published but not yet recorded.
fn merge(old: Vec<Live>, fresh: Vec<Loaded>) -> Vec<Live> {
    type Kept = (
        Option<(DateTime<Utc>, Duration)>,
        Option<(DateTime<Utc>, DateTime<Utc>)>,
    );
    let mut kept: std::collections::HashMap<String, Kept> = old
        .into_iter()
        .filter(|l| l.retry.is_some() || l.unrecorded.is_some())
        .map(|l| (l.entry.name().to_owned(), (l.retry, l.unrecorded)))
        .collect();
    fresh
        .into_iter()
        .map(|l| {
            let (retry, unrecorded) = kept.remove(l.entry.name()).unwrap_or_default();
            Live {
                retry,
                unrecorded,
                entry: l.entry,
                paused: l.paused,
                state: l.state,
            }
        })
        .collect()
}
