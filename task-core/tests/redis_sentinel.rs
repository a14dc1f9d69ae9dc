//! `sentinel://` against a real primary, replica and three sentinels (`scripts/redis-sentinel`),
//! with the primary SIGKILLed: connections follow the promoted replica, a waiter's subscription
//! moves with them, and a write that lands on the dead primary restarted empty is never
//! confirmed.
//!
//! `chaos_broker` names: `scripts/test` runs these alone (each test starts and stops the set).

mod common;

use std::time::{Duration, Instant};

use common::sentinel::SentinelSet;
use redis::aio::ConnectionManagerConfig;
use task_core::redis_conn::{ConnOptions, RedisConn};
use task_core::{RedisBackend, ResultBackend, TaskMeta, TaskState};

fn options() -> ConnOptions {
    ConnOptions::new(
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1),
    )
}

/// `Some` once the server `backend` talks to now counts one subscriber of `channel`.
async fn subscribed(backend: &RedisBackend, channel: &str) -> Option<()> {
    let n: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut backend.connection())
        .await
        .ok()?;
    (n.first().map(|(_, n)| *n) == Some(1)).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_broker_sentinel_results_and_waiters_follow_the_promoted_replica() {
    let set = SentinelSet::start();
    let first = set.primary();
    let backend = RedisBackend::connect(&set.url).await.unwrap();
    let stored = TaskMeta::new("before", TaskState::Success, serde_json::json!(1));
    backend.store(&stored).await.unwrap();

    // A waiter subscribed before the failover is told of a result stored after it.
    let waiter = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.wait("after", Duration::from_secs(60)).await })
    };
    common::eventually("the waiter's subscription", Duration::from_secs(10), || {
        subscribed(&backend, "celery-task-meta-after")
    })
    .await;

    let killed = set.kill_primary();
    assert_eq!(killed, first);
    let t = Instant::now();
    let promoted = set.wait_failover(&killed);
    // The result written before the kill was confirmed by a replica: it is there.
    let read = common::eventually(
        "the old result on the new primary",
        Duration::from_secs(20),
        || async { backend.get("before").await.ok().flatten() },
    )
    .await;
    assert_eq!(read.status, TaskState::Success);
    assert_eq!(
        backend.connection().current_addr(),
        Some(format!("127.0.0.1:{promoted}"))
    );
    // The subscriber moved too: the new primary counts it.
    common::eventually(
        "the resubscription on the new primary",
        Duration::from_secs(20),
        || subscribed(&backend, "celery-task-meta-after"),
    )
    .await;
    backend
        .store(&TaskMeta::new(
            "after",
            TaskState::Success,
            serde_json::json!(2),
        ))
        .await
        .unwrap();
    let woke = waiter.await.unwrap().unwrap();
    assert_eq!(woke.result, serde_json::json!(2));
    println!(
        "primary {killed} killed; {promoted} promoted and followed {:.1?} later; the waiter \
         resubscribed there and got its result",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_broker_sentinel_a_write_to_the_dead_primary_restarted_empty_is_never_confirmed() {
    let set = SentinelSet::start();
    let conn = RedisConn::connect(&set.url, options()).await.unwrap();
    // A clone held by a write in flight at the kill: it keeps talking to the old server.
    let mut stale = conn.pinned().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v0")
        .query_async(&mut stale)
        .await
        .unwrap();
    stale.wait_replicated().await.unwrap();

    let killed = set.kill_primary();
    let promoted = set.wait_failover(&killed);
    // Back before the sentinels demote it: an empty server that calls itself a primary.
    set.restart(&killed);
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let write: redis::RedisResult<()> = redis::cmd("SET")
            .arg("k")
            .arg("stale")
            .query_async(&mut stale)
            .await;
        let outcome = match write {
            Err(e) => format!("write refused: {e}"),
            Ok(()) => match stale.wait_replicated().await {
                Ok(()) => panic!("a write to {killed} (restarted empty) was confirmed"),
                Err(e) => format!("written, not confirmed: {e}"),
            },
        };
        if !outcomes.contains(&outcome) {
            outcomes.push(outcome);
        }
        // Until the sentinels make the restarted server a replica (READONLY from then on).
        if outcomes.iter().any(|o| o.contains("READONLY")) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        outcomes.iter().any(|o| o.contains("no longer name")),
        "the empty primary was never written to, so the guard was not exercised: {outcomes:?}"
    );

    // The shared connection follows the sentinels; its write is confirmed and kept.
    let mut live = conn.clone();
    common::eventually(
        "a confirmed write on the promoted primary",
        Duration::from_secs(20),
        || {
            let mut live = live.clone();
            async move {
                let _: () = redis::cmd("SET")
                    .arg("k")
                    .arg("v1")
                    .query_async(&mut live)
                    .await
                    .ok()?;
                live.wait_replicated().await.ok()
            }
        },
    )
    .await;
    assert_eq!(live.current_addr(), Some(format!("127.0.0.1:{promoted}")));
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut live)
        .await
        .unwrap();
    assert_eq!(v, "v1");
    println!("writes to {killed} while it was an empty primary: {outcomes:?}");
}
