//! Two `scheduler` replicas keep their lease, claims and state in Redis behind Sentinel
//! (`scripts/redis-sentinel`); the Redis primary is SIGKILLed while they tick every second, and
//! started again later: every tick reaches the broker exactly once.
//!
//! `chaos_broker` name: `scripts/test` runs it alone (it times a failover).

mod common;
#[path = "../../task-core/tests/common/sentinel.rs"]
mod sentinel;

use std::time::{Duration, Instant};

use chrono::{Duration as Span, Utc};
use common::{EVERY_SECOND, World, assert_every_second_once, eventually, ticks};
use sentinel::SentinelSet;

/// The entry's last published tick, or `None` also while the store does not answer.
async fn last_run(world: &World, entry: &str) -> Option<chrono::DateTime<Utc>> {
    world.store.get(entry).await.ok().flatten()?.last_run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_broker_the_redis_primary_killed_under_the_beat_loses_and_repeats_no_tick() {
    let set = SentinelSet::start();
    let world = World::with_store_url("sentinel", &set.url).await;
    let schedule = world.schedule(EVERY_SECOND);
    let replicas: Vec<_> = (1..=2)
        .map(|i| world.spawn(&format!("r{i}"), &schedule))
        .collect();
    let leader = eventually("a leader", Duration::from_secs(20), || async {
        world.store.leader().await.ok().flatten().map(|h| h.node_id)
    })
    .await;
    let first = eventually("a first tick", Duration::from_secs(20), || async {
        last_run(&world, "cron").await
    })
    .await;
    let until = first + Span::seconds(4);
    eventually("four ticks", Duration::from_secs(20), || async {
        last_run(&world, "cron").await.filter(|t| *t >= until)
    })
    .await;

    let killed = set.kill_primary();
    let killed_at = Instant::now();
    let promoted = set.wait_failover(&killed);
    let failover = killed_at.elapsed();
    // Ticks continue on the promoted replica; then the old primary comes back (empty) and the
    // sentinels make it a replica.
    let resumed = Utc::now();
    let until = resumed + Span::seconds(4);
    eventually(
        "ticks after the failover",
        Duration::from_secs(40),
        || async { last_run(&world, "cron").await.filter(|t| *t >= until) },
    )
    .await;
    let caught_up = killed_at.elapsed();
    set.restart(&killed);
    let until = Utc::now() + Span::seconds(4);
    eventually(
        "ticks after the restart",
        Duration::from_secs(40),
        || async { last_run(&world, "cron").await.filter(|t| *t >= until) },
    )
    .await;
    let after = world.leader().await;
    let in_doubt: usize = replicas
        .iter()
        .map(|r| r.log_text().matches("not sent again").count())
        .sum();
    for r in replicas {
        r.stop().await;
    }

    let counts = world.drain().await;
    let mut published = 0;
    for entry in ["cron", "interval"] {
        let last = world.last_run(entry).await.unwrap();
        let ticks = ticks(&counts, entry);
        published += ticks.len();
        assert_every_second_once(&ticks, last, entry);
    }
    assert_eq!(in_doubt, 0, "ticks left in doubt");
    println!(
        "primary {killed} killed under leader {leader}; {promoted} promoted in {failover:.1?}; \
         ticking again {caught_up:.1?} after the kill; leader after the restart {after:?}; \
         {published} ticks on the broker, each once, none missing"
    );
    world.cleanup().await;
}
