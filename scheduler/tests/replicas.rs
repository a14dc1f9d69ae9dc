//! Several `scheduler` processes against the real Redis and RabbitMQ: exactly one message per
//! tick on the broker, none missing, through a SIGKILL of the leader and through schedule
//! changes made at run time with the library API.

mod common;

use std::time::Duration;

use chrono::{Duration as Span, Utc};
use common::{EVERY_SECOND, World, assert_every_second_once, eventually, ticks};
use scheduler::EntrySpec;

async fn replicas_publish_each_tick_exactly_once(n: usize) {
    let world = World::new(&format!("replicas{n}")).await;
    let schedule = world.schedule(EVERY_SECOND);
    let replicas: Vec<_> = (1..=n)
        .map(|i| world.spawn(&format!("r{i}"), &schedule))
        .collect();
    let leader = eventually("a leader", Duration::from_secs(20), || world.leader()).await;
    assert!(replicas.iter().any(|r| r.node == leader));
    let first = eventually("a first tick", Duration::from_secs(20), || {
        world.last_run("cron")
    })
    .await;
    world
        .wait_for_tick("cron", first + Span::seconds(12), Duration::from_secs(30))
        .await;
    for r in replicas {
        r.stop().await;
    }

    let counts = world.drain().await;
    for entry in ["cron", "interval"] {
        let last = world.last_run(entry).await.unwrap();
        let ticks = ticks(&counts, entry);
        assert!(ticks.len() >= 12, "{entry}: only {} ticks", ticks.len());
        assert_every_second_once(&ticks, last, entry);
    }
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_publish_each_tick_exactly_once() {
    replicas_publish_each_tick_exactly_once(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_publish_each_tick_exactly_once() {
    replicas_publish_each_tick_exactly_once(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_15_s_and_missed_ticks_follow_the_policy() {
    let world = World::new("failover").await;
    let schedule = world.schedule(&format!(
        "{EVERY_SECOND}\n{}",
        r#"
[[entry]]
name = "skip"
task = "test.skip"
every = "1s"
queue = "{queue}"
catch_up = "skip"
"#
    ));
    let mut replicas: Vec<_> = (1..=3)
        .map(|i| world.spawn(&format!("r{i}"), &schedule))
        .collect();
    let leader = eventually("a leader", Duration::from_secs(20), || world.leader()).await;
    let first = eventually("a first tick", Duration::from_secs(20), || {
        world.last_run("cron")
    })
    .await;
    world
        .wait_for_tick("cron", first + Span::seconds(4), Duration::from_secs(20))
        .await;

    let i = replicas.iter().position(|r| r.node == leader).unwrap();
    let mut killed = replicas.remove(i);
    killed.signal("KILL");
    let killed_at = tokio::time::Instant::now();
    let killed_wall = Utc::now();
    killed.exited(Duration::from_secs(5)).await;
    let successor = eventually("another leader", Duration::from_secs(20), || async {
        world.leader().await.filter(|l| *l != leader)
    })
    .await;
    let failover = killed_at.elapsed();
    eprintln!("{successor} took over {failover:?} after {leader} was killed");
    assert!(
        failover <= Duration::from_secs(15),
        "failover took {failover:?}"
    );
    let took_over = Utc::now();
    assert!(replicas.iter().any(|r| r.node == successor));
    world
        .wait_for_tick(
            "cron",
            took_over + Span::seconds(4),
            Duration::from_secs(20),
        )
        .await;
    let in_doubt: usize = replicas
        .iter()
        .map(|r| r.log_text().matches("not sent again").count())
        .sum();
    eprintln!("ticks left in doubt by the killed leader: {in_doubt}");
    for r in replicas {
        r.stop().await;
    }

    let counts = world.drain().await;
    // `all`: the ticks of the failover are published late, but published, and once each.
    for entry in ["cron", "interval"] {
        let last = world.last_run(entry).await.unwrap();
        assert_every_second_once(&ticks(&counts, entry), last, entry);
    }
    // `skip`: once each; the ticks that fell in the failover are not run.
    let skip = ticks(&counts, "skip");
    let duplicates: Vec<_> = skip.iter().filter(|(_, n)| **n != 1).collect();
    assert!(duplicates.is_empty(), "skip: duplicates {duplicates:?}");
    let in_failover = skip
        .keys()
        .filter(|t| **t > killed_wall + Span::seconds(1) && **t < took_over - Span::seconds(3))
        .count();
    assert_eq!(in_failover, 0, "skip ran ticks missed during the failover");
    assert!(
        skip.keys().any(|t| *t > took_over),
        "skip runs again after the takeover"
    );
    drop(killed);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_added_paused_resumed_and_removed_at_run_time_reach_running_replicas() {
    let world = World::new("runtime").await;
    // `cron` is only the clock of this test; `added` is managed at run time.
    let schedule = world.schedule(EVERY_SECOND);
    let replicas: Vec<_> = (1..=2)
        .map(|i| world.spawn(&format!("r{i}"), &schedule))
        .collect();
    eventually("a first tick", Duration::from_secs(20), || {
        world.last_run("cron")
    })
    .await;

    let added_at = Utc::now();
    world
        .store
        .add(EntrySpec {
            name: "added".into(),
            task: "test.added".into(),
            every: Some("1s".into()),
            queue: Some(world.queue.clone()),
            catch_up: Some(scheduler::CatchUpPolicy::All),
            catch_up_window: Some("1m".into()),
            ..EntrySpec::default()
        })
        .await
        .unwrap();
    world
        .wait_for_tick(
            "added",
            added_at + Span::seconds(3),
            Duration::from_secs(10),
        )
        .await;

    world.store.pause("added").await.unwrap();
    let paused_at = Utc::now();
    world
        .wait_for_tick(
            "cron",
            paused_at + Span::seconds(4),
            Duration::from_secs(10),
        )
        .await;
    let status = world.store.get("added").await.unwrap().unwrap();
    assert!(status.paused && status.next_run.is_none());

    world.store.resume("added").await.unwrap();
    let resumed_at = Utc::now();
    world
        .wait_for_tick(
            "added",
            resumed_at + Span::seconds(2),
            Duration::from_secs(10),
        )
        .await;

    world.store.remove("added").await.unwrap();
    let removed_at = Utc::now();
    world
        .wait_for_tick(
            "cron",
            removed_at + Span::seconds(3),
            Duration::from_secs(10),
        )
        .await;
    for r in replicas {
        r.stop().await;
    }

    let counts = world.drain().await;
    let added = ticks(&counts, "added");
    let duplicates: Vec<_> = added.iter().filter(|(_, n)| **n != 1).collect();
    assert!(duplicates.is_empty(), "added: duplicates {duplicates:?}");
    let slack = Span::seconds(1);
    let ranges = [
        (
            "before the add",
            added.keys().filter(|t| **t <= added_at).count(),
            0,
        ),
        (
            "while paused",
            added
                .keys()
                .filter(|t| **t > paused_at + slack && **t <= resumed_at)
                .count(),
            0,
        ),
        (
            "after removal",
            added.keys().filter(|t| **t > removed_at + slack).count(),
            0,
        ),
    ];
    for (when, got, want) in ranges {
        assert_eq!(got, want, "added: ticks published {when}: {added:?}");
    }
    assert!(
        added
            .keys()
            .filter(|t| **t > added_at && **t <= paused_at)
            .count()
            >= 3
    );
    assert!(added.keys().filter(|t| **t > resumed_at).count() >= 2);
    world.cleanup().await;
}
