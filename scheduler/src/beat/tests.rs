//! The beat loop on paused tokio time, with the in-memory store, broker and backend: every
//! scenario here is deterministic and runs in milliseconds of real time.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Duration as Span;
use serde_json::json;
use task_core::protocol::TaskMessage;
use task_core::{MemoryBackend, MemoryBroker, TaskMeta};
use tokio::sync::oneshot;

use super::*;
use crate::entry::{CatchUpPolicy, EntrySpec};
use crate::schedule::Schedule;
use crate::store::lock;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A wall clock that starts at `start` and follows tokio's (paused) time.
fn clock_from(start: &str) -> Clock {
    let base = utc(start);
    let t0 = Instant::now();
    Clock::from_fn(move || base + Span::from_std(t0.elapsed()).unwrap())
}

struct World {
    store: Store,
    broker: MemoryBroker,
    backend: MemoryBackend,
    client: Client,
    clock: Clock,
    /// Every message published so far, by queue.
    seen: Vec<TaskMessage>,
}

struct Replica {
    handle: tokio::task::JoinHandle<Result<()>>,
    stop: Option<oneshot::Sender<()>>,
    metrics: Metrics,
    role: watch::Receiver<Role>,
}

impl Replica {
    /// Ends the replica without any clean-up, as SIGKILL would: the lease is not released.
    fn kill(self) {
        self.handle.abort();
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }

    fn leads(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader { .. })
    }
}

const Q: &str = "beat-test";

impl World {
    fn new(start: &str) -> Self {
        let clock = clock_from(start);
        let store = Store::memory("t:").with_clock(clock.clone());
        let broker = MemoryBroker::new();
        let backend = MemoryBackend::new();
        let client = Client::new(broker.clone(), backend.clone());
        World {
            store,
            broker,
            backend,
            client,
            clock,
            seen: Vec::new(),
        }
    }

    fn spawn(&self, node: &str) -> Replica {
        let beat = Beat::new(
            self.store.clone(),
            self.client.clone(),
            BeatConfig::new(node),
        )
        .with_clock(self.clock.clone());
        let (metrics, role) = (beat.metrics().clone(), beat.role());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(beat.run(async {
            let _ = rx.await;
        }));
        Replica {
            handle,
            stop: Some(tx),
            metrics,
            role,
        }
    }

    async fn add(&self, spec: EntrySpec) {
        self.store.add(spec).await.unwrap();
    }

    /// Collects what was published since the last call.
    fn collect(&mut self) {
        for raw in self.broker.drain(Q) {
            self.seen.push(TaskMessage::decode(&raw).unwrap());
        }
    }

    /// The ticks published for `entry`, with how many times each was.
    fn ticks(&mut self, entry: &str) -> BTreeMap<DateTime<Utc>, usize> {
        self.collect();
        let prefix = format!("beat:{entry}:");
        let mut out = BTreeMap::new();
        for m in &self.seen {
            if let Some(tick) = m.headers.id.strip_prefix(&prefix) {
                *out.entry(utc(tick)).or_default() += 1;
            }
        }
        out
    }
}

fn every(name: &str, period: &str) -> EntrySpec {
    EntrySpec {
        name: name.into(),
        task: format!("test.{name}"),
        every: Some(period.into()),
        queue: Some(Q.into()),
        ..EntrySpec::default()
    }
}

fn with_policy(mut spec: EntrySpec, policy: CatchUpPolicy, window: Option<&str>) -> EntrySpec {
    spec.catch_up = Some(policy);
    spec.catch_up_window = window.map(str::to_owned);
    spec
}

/// Waits (in paused time) until `cond` holds, failing after `limit`.
async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
}

fn assert_once_each(ticks: &BTreeMap<DateTime<Utc>, usize>, entry: &str) {
    for (tick, n) in ticks {
        assert_eq!(*n, 1, "{entry}: tick {tick} published {n} times");
    }
}

fn assert_contiguous(ticks: &BTreeMap<DateTime<Utc>, usize>, step: i64, entry: &str) {
    assert_once_each(ticks, entry);
    let keys: Vec<_> = ticks.keys().collect();
    for w in keys.windows(2) {
        assert_eq!(
            *w[1] - *w[0],
            Span::seconds(step),
            "{entry}: gap between {} and {}",
            w[0],
            w[1]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn each_tick_is_published_once_and_the_state_shows_last_and_next_run() {
    let mut w = World::new("2026-05-05T10:00:00Z");
    w.add(every("sec", "1s")).await;
    let a = w.spawn("a");
    advance(Duration::from_secs(30)).await;

    let ticks = w.ticks("sec");
    assert_contiguous(&ticks, 1, "sec");
    assert!(ticks.len() >= 29, "only {} ticks in 30 s", ticks.len());
    let last = *ticks.keys().last().unwrap();
    let status = w.store.get("sec").await.unwrap().unwrap();
    assert_eq!(status.last_run, Some(last));
    assert_eq!(
        status.last_task_id.as_deref(),
        Some(format!("beat:sec:{}", crate::entry::format_tick(last)).as_str())
    );
    assert_eq!(status.next_run, Some(last + Span::seconds(1)));
    assert_eq!(a.metrics.ticks_fired("sec"), ticks.len() as u64);
    assert_eq!(a.metrics.ticks_late("sec"), 0);
    assert!(a.metrics.lease_renewals() >= 9, "renewed every 3 s");
    assert!(a.leads());

    a.stop().await;
    assert_eq!(
        w.store.leader().await.unwrap(),
        None,
        "a clean stop releases the lease"
    );
}

#[tokio::test(start_paused = true)]
async fn cron_ticks_cross_a_dst_change_without_skips_or_doubles() {
    // New York springs forward at 07:00Z on 2026-03-08: 01:59:59 EST is followed by 03:00 EDT.
    let mut w = World::new("2026-03-08T06:59:40Z");
    let cron = |name: &str, expr: &str| EntrySpec {
        name: name.into(),
        task: "test.cron".into(),
        cron: Some(expr.into()),
        timezone: Some("America/New_York".into()),
        queue: Some(Q.into()),
        ..EntrySpec::default()
    };
    w.add(cron("every-second", "* * * * * *")).await;
    w.add(cron("at-0230", "30 2 * * *")).await;
    w.add(cron("at-0300", "0 3 * * *")).await;
    let a = w.spawn("a");
    advance(Duration::from_secs(40)).await;
    let seconds = w.ticks("every-second");
    assert_contiguous(&seconds, 1, "every-second");
    assert!(
        seconds.contains_key(&utc("2026-03-08T06:59:59Z"))
            && seconds.contains_key(&utc("2026-03-08T07:00:00Z"))
    );
    // 02:30 does not exist that night: it runs once, right after the gap, at 03:00 EDT.
    assert_eq!(
        w.ticks("at-0230").into_keys().collect::<Vec<_>>(),
        [utc("2026-03-08T07:00:00Z")]
    );
    assert_eq!(
        w.ticks("at-0300").into_keys().collect::<Vec<_>>(),
        [utc("2026-03-08T07:00:00Z")]
    );
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_follower_takes_over_a_killed_leader_within_15_s_without_duplicates() {
    let mut w = World::new("2026-05-05T10:00:00Z");
    w.add(with_policy(
        every("all", "1s"),
        CatchUpPolicy::All,
        Some("1m"),
    ))
    .await;
    w.add(with_policy(every("skip", "1s"), CatchUpPolicy::Skip, None))
        .await;
    let a = w.spawn("a");
    wait_for("a to lead", Duration::from_secs(5), || a.leads()).await;
    let mut b = w.spawn("b");
    advance(Duration::from_secs(10)).await;
    assert!(!b.leads(), "one leader at a time");

    let killed_at = w.clock.now();
    let last_before = *w.ticks("all").keys().last().unwrap();
    a.kill();
    b.role.changed().await.unwrap();
    let took_over = w.clock.now();
    assert!(b.leads());
    let failover = (took_over - killed_at).to_std().unwrap();
    assert!(
        failover <= Duration::from_secs(15),
        "failover took {failover:?}"
    );
    assert!(
        failover >= Duration::from_secs(5),
        "the lease must be left to expire ({failover:?})"
    );
    advance(Duration::from_secs(10)).await;
    b.stop().await;

    // `all`: every tick, the ones missed during the failover included, each once.
    let all = w.ticks("all");
    assert_contiguous(&all, 1, "all");
    assert!(*all.keys().last().unwrap() >= took_over + Span::seconds(9));
    // `skip`: each once, and the ticks of the failover (older than the grace) are not run.
    let skip = w.ticks("skip");
    assert_once_each(&skip, "skip");
    let grace = Span::seconds(2);
    let missed: Vec<_> = skip
        .keys()
        .filter(|t| **t > last_before && **t < took_over - grace)
        .collect();
    assert!(missed.is_empty(), "skip ran missed ticks {missed:?}");
    assert!(
        skip.keys().any(|t| *t > took_over),
        "skip runs again after the takeover"
    );
    let first_new = *w.ticks("all").keys().find(|t| **t > last_before).unwrap();
    assert_eq!(
        first_new,
        last_before + Span::seconds(1),
        "all resumes right after the last tick"
    );
}

#[tokio::test(start_paused = true)]
async fn after_downtime_each_catch_up_policy_does_what_it_says() {
    let mut w = World::new("2026-05-05T10:00:00Z");
    w.add(with_policy(every("skip", "5s"), CatchUpPolicy::Skip, None))
        .await;
    w.add(with_policy(every("once", "5s"), CatchUpPolicy::Once, None))
        .await;
    w.add(with_policy(
        every("all", "5s"),
        CatchUpPolicy::All,
        Some("20s"),
    ))
    .await;
    w.add(with_policy(
        every("once-window", "5s"),
        CatchUpPolicy::Once,
        Some("3s"),
    ))
    .await;
    let a = w.spawn("a");
    advance(Duration::from_secs(20)).await;
    let before: BTreeMap<_, _> = ["skip", "once", "all", "once-window"]
        .into_iter()
        .map(|e| (e, *w.ticks(e).keys().last().unwrap()))
        .collect();
    a.kill();
    // Down for two minutes, then a replica starts and takes over once the lease expires.
    advance(Duration::from_secs(120)).await;
    let mut b = w.spawn("b");
    b.role.changed().await.unwrap();
    let t = w.clock.now();
    advance(Duration::from_secs(12)).await;
    let skipped_all = b.metrics.ticks_skipped("all", "missed");
    b.stop().await;

    let grace = Span::seconds(2);
    let in_gap = |w: &mut World, e: &str| -> Vec<DateTime<Utc>> {
        w.ticks(e)
            .into_keys()
            .filter(|k| *k > before[e] && *k <= t)
            .collect()
    };
    let schedule = Schedule::interval(Duration::from_secs(5), DateTime::UNIX_EPOCH).unwrap();
    let latest = schedule.latest_at_or_before(t).unwrap();
    let skip = in_gap(&mut w, "skip");
    assert!(
        skip.iter().all(|k| *k >= t - grace),
        "skip: missed ticks ran: {skip:?}"
    );
    assert_eq!(
        in_gap(&mut w, "once"),
        [latest],
        "once: one run, for the latest missed tick"
    );
    let all = in_gap(&mut w, "all");
    let expected: Vec<_> = schedule
        .iter_after(t - Span::seconds(20) - Span::nanoseconds(1))
        .take_while(|k| *k <= t)
        .collect();
    assert_eq!(
        all, expected,
        "all: every missed tick within the 20 s window"
    );
    let once_window = in_gap(&mut w, "once-window");
    assert!(
        once_window.iter().all(|k| *k >= t - Span::seconds(3)),
        "once with a 3 s window: nothing older runs: {once_window:?}"
    );
    assert!(skipped_all >= 15, "{skipped_all}");
    // The store counts them too, for the monitor's beat page.
    let status = w.store.get("all").await.unwrap().unwrap();
    assert_eq!(status.skipped.missed, skipped_all);
    for e in ["skip", "once", "all", "once-window"] {
        let ticks = w.ticks(e);
        assert_once_each(&ticks, e);
        // After the takeover, the regular ticks run as usual.
        let after: Vec<_> = ticks.into_keys().filter(|k| *k > t).collect();
        assert!(after.len() >= 2, "{e}: {after:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn overlap_skip_waits_for_the_previous_run() {
    let mut w = World::new("2026-05-05T10:00:00Z");
    let mut spec = every("slow", "1s");
    spec.overlap = Some(Overlap::Skip);
    spec.expires = Some("5s".into());
    w.add(spec).await;
    let a = w.spawn("a");
    advance(Duration::from_millis(3500)).await;
    // Nobody ran the first run (PENDING): the next ticks are skipped while it could still start.
    let first: Vec<_> = w.ticks("slow").into_keys().collect();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(a.metrics.ticks_skipped("slow", "overlap") >= 2);
    let status = w.store.get("slow").await.unwrap().unwrap();
    assert_eq!(
        status.skipped.overlap,
        a.metrics.ticks_skipped("slow", "overlap")
    );

    // A worker picks it up (STARTED): still skipped, even past its expiry.
    let id = format!("beat:slow:{}", crate::entry::format_tick(first[0]));
    w.backend
        .store(&TaskMeta::new(&id, TaskState::Started, json!(null)))
        .await
        .unwrap();
    advance(Duration::from_secs(6)).await;
    assert_eq!(w.ticks("slow").len(), 1);

    // It finishes: the next tick fires.
    w.backend
        .store(&TaskMeta::new(&id, TaskState::Success, json!(1)))
        .await
        .unwrap();
    advance(Duration::from_millis(1500)).await;
    let ticks = w.ticks("slow");
    assert_eq!(ticks.len(), 2, "{ticks:?}");

    // Left PENDING, a run stops blocking once it has expired (5 s).
    advance(Duration::from_secs(7)).await;
    assert_eq!(w.ticks("slow").len(), 3);
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn messages_carry_the_entrys_task_arguments_and_options() {
    let mut w = World::new("2026-05-05T10:00:00Z");
    w.add(EntrySpec {
        name: "full".into(),
        task: "billing.reconcile_payments".into(),
        cron: Some("*/10 * * * * *".into()),
        args: vec![json!(1), json!("a")],
        kwargs: [("dry_run".to_owned(), json!(true))].into_iter().collect(),
        queue: Some(Q.into()),
        priority: Some(7),
        expires: Some("8s".into()),
        soft_time_limit: Some("3s".into()),
        time_limit: Some("5s".into()),
        jitter: Some("4s".into()),
        ..EntrySpec::default()
    })
    .await;
    let a = w.spawn("a");
    advance(Duration::from_secs(25)).await;
    a.stop().await;
    w.collect();
    assert!(w.seen.len() >= 2);
    let entry = Entry::new(w.store.list().await.unwrap()[0].spec.clone()).unwrap();
    for m in &w.seen {
        let tick = utc(m.headers.id.strip_prefix("beat:full:").unwrap());
        assert_eq!(tick.timestamp() % 10, 0);
        assert_eq!(m.headers.task, "billing.reconcile_payments");
        assert_eq!(m.args, [json!(1), json!("a")]);
        assert_eq!(m.kwargs["dry_run"], json!(true));
        assert_eq!(m.priority, Some(7));
        assert_eq!(m.headers.expires, Some(tick + Span::seconds(8)));
        assert_eq!(m.headers.soft_time_limit, Some(3.0));
        assert_eq!(m.headers.time_limit, Some(5.0));
        let jitter = Span::from_std(entry.jitter_for(tick)).unwrap();
        assert!(jitter <= Span::seconds(4));
        if jitter.is_zero() {
            assert_eq!(m.headers.eta, None);
        } else {
            assert_eq!(
                m.headers.eta,
                Some(tick + jitter),
                "the eta is the tick plus its jitter"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn entries_added_paused_resumed_and_removed_at_run_time_take_effect_without_restart() {
    let mut w = World::new("2026-05-05T10:00:00Z");
    let a = w.spawn("a");
    wait_for("a to lead", Duration::from_secs(5), || a.leads()).await;

    // Added while running: fires from its next tick.
    let added_at = w.clock.now();
    w.add(every("late", "1s")).await;
    advance(Duration::from_secs(5)).await;
    let ticks = w.ticks("late");
    assert!(ticks.len() >= 4, "{ticks:?}");
    assert!(*ticks.keys().next().unwrap() <= added_at + Span::seconds(1));

    // Paused: nothing fires, and `list` shows it paused with no next run.
    w.store.pause("late").await.unwrap();
    let paused_at = w.clock.now();
    advance(Duration::from_secs(10)).await;
    let status = w.store.get("late").await.unwrap().unwrap();
    assert!(status.paused && status.next_run.is_none());
    let during: Vec<_> = w
        .ticks("late")
        .into_keys()
        .filter(|t| *t > paused_at)
        .collect();
    assert!(during.is_empty(), "ticks while paused: {during:?}");

    // Resumed: fires again from now on; the paused ticks are not caught up.
    let resumed_at = w.clock.now();
    w.store.resume("late").await.unwrap();
    advance(Duration::from_secs(3)).await;
    let after: Vec<_> = w
        .ticks("late")
        .into_keys()
        .filter(|t| *t > paused_at)
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|t| *t > resumed_at),
        "{after:?}"
    );

    // Changed: the new schedule applies at once.
    w.add(every("late", "2s")).await;
    let changed_at = w.clock.now();
    advance(Duration::from_secs(6)).await;
    let new: Vec<_> = w
        .ticks("late")
        .into_keys()
        .filter(|t| *t > changed_at)
        .collect();
    assert!(
        new.len() >= 2 && new.iter().all(|t| t.timestamp() % 2 == 0),
        "{new:?}"
    );

    // Removed: it stops, and so does its state.
    w.store.remove("late").await.unwrap();
    let removed_at = w.clock.now();
    advance(Duration::from_secs(5)).await;
    assert!(w.ticks("late").keys().all(|t| *t <= removed_at));
    assert!(w.store.get("late").await.unwrap().is_none());
    assert!(matches!(
        w.store.pause("late").await,
        Err(Error::NotFound(_))
    ));
    a.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_tick_claimed_by_a_leader_that_died_is_never_sent_by_another() {
    let mut w = World::new("2026-05-05T10:00:00Z");
    w.add(with_policy(
        every("t", "1s"),
        CatchUpPolicy::All,
        Some("1m"),
    ))
    .await;
    // A leader takes the lease, claims the 10:00:10 tick and dies: whether its message reached
    // the broker is unknown.
    advance(Duration::from_secs(10)).await;
    let token = w
        .store
        .acquire_lease("dead", Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let tick = utc("2026-05-05T10:00:10Z");
    let claim = w
        .store
        .claim(&lease_value("dead", token), token, "t", tick)
        .await
        .unwrap();
    assert_eq!(claim, Claim::Fresh);

    // The next leader catches up on every missed tick (`all`) but that one.
    let b = w.spawn("b");
    advance(Duration::from_secs(20)).await;
    assert!(b.leads());
    let in_doubt = b.metrics.ticks_skipped("t", "in_doubt");
    b.stop().await;
    let ticks = w.ticks("t");
    assert_once_each(&ticks, "t");
    assert!(
        !ticks.contains_key(&tick),
        "the claimed tick was sent again"
    );
    let expected: Vec<_> = (1..=28)
        .map(|s| utc("2026-05-05T10:00:00Z") + Span::seconds(s))
        .filter(|t| *t != tick)
        .collect();
    let got: Vec<_> = ticks.into_keys().take(expected.len()).collect();
    assert_eq!(got, expected);
    assert_eq!(in_doubt, 1);
    assert_eq!(w.store.get("t").await.unwrap().unwrap().skipped.in_doubt, 1);
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_lease_is_taken_stops_firing_at_once() {
    let mut w = World::new("2026-05-05T10:00:00Z");
    w.add(every("s", "1s")).await;
    let a = w.spawn("a");
    wait_for("a to lead", Duration::from_secs(5), || a.leads()).await;
    advance(Duration::from_secs(3)).await;
    // Someone else holds the lease now (as after a partition that outlived the TTL).
    if let crate::store::Backend::Memory(m) = w.store.backend() {
        let mut m = lock(m);
        m.token += 1;
        let token = m.token;
        m.lease = Some((
            lease_value("intruder", token),
            Instant::now() + Duration::from_secs(3600),
        ));
    }
    let taken_at = w.clock.now();
    wait_for("a to step down", Duration::from_secs(4), || !a.leads()).await;
    assert!(
        w.clock.now() - taken_at <= Span::seconds(3),
        "noticed at the next renewal"
    );
    assert_eq!(a.metrics.lease_lost(), 1);
    advance(Duration::from_secs(5)).await;
    let after: BTreeSet<_> = w
        .ticks("s")
        .into_keys()
        .filter(|t| *t > taken_at + Span::seconds(1))
        .collect();
    assert!(after.is_empty(), "fired after losing the lease: {after:?}");
    a.stop().await;
}
