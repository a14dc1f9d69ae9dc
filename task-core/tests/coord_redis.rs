//! The coordinator against the real Redis: two connections stand for two workers.
//!
//! Every test works under its own key prefix, so the tests run in parallel with each other and
//! with anything else using the same Redis, and deletes its keys when it passes.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use task_core::RateLimit;
use task_core::coord::{Coordinator, Revoked};

/// Two coordinators on separate connections sharing one fresh prefix, and a raw connection.
struct Cluster {
    prefix: String,
    a: Coordinator,
    b: Coordinator,
    raw: MultiplexedConnection,
}

impl Cluster {
    async fn new() -> Self {
        let prefix = format!("tq:test:{}:", uuid::Uuid::new_v4().simple());
        let connect = || async {
            Coordinator::connect(&common::redis_url())
                .await
                .expect("Redis must be running on 127.0.0.1:6379 (scripts/test starts it)")
                .with_prefix(prefix.clone())
        };
        let (a, b) = (connect().await, connect().await);
        a.ping().await.unwrap();
        let raw = redis::Client::open(common::redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Cluster { prefix, a, b, raw }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Redis's clock, in microseconds.
    async fn redis_time_us(&mut self) -> u64 {
        let (secs, micros): (u64, u64) =
            redis::cmd("TIME").query_async(&mut self.raw).await.unwrap();
        secs * 1_000_000 + micros
    }

    /// Deletes this test's keys.
    async fn clean_up(mut self) {
        let keys: Vec<String> = self
            .raw
            .scan_match::<_, String>(format!("{}*", self.prefix))
            .await
            .unwrap()
            .map(|key| key.unwrap())
            .collect()
            .await;
        if !keys.is_empty() {
            let _: i64 = self.raw.del(keys).await.unwrap();
        }
    }
}

fn unique(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

fn ids(revoked: &[Revoked]) -> Vec<&str> {
    revoked.iter().map(|r| r.id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_spaces_starts_across_two_connections() {
    let mut cluster = Cluster::new().await;
    let rate = RateLimit { per_second: 20.0 };
    let interval = Duration::from_millis(50);

    // A grant, then the other worker is told to wait (almost) a whole interval, and asking did
    // not reserve anything: asking again right away is told the same or less.
    assert_eq!(cluster.a.try_rate("probe", rate).await.unwrap(), None);
    let wait = cluster.b.try_rate("probe", rate).await.unwrap().unwrap();
    assert!(wait <= interval && wait > interval / 2, "{wait:?}");
    let again = cluster.b.try_rate("probe", rate).await.unwrap().unwrap();
    assert!(again <= wait, "{again:?} after {wait:?}");

    // Two workers compete for 40 starts, each sleeping exactly the waits it is given.
    let start_us = cluster.redis_time_us().await;
    let worker = |coord: Coordinator| async move {
        let mut waits = Vec::new();
        for _ in 0..20 {
            while let Some(wait) = coord.try_rate("spaced", rate).await.unwrap() {
                waits.push(wait);
                tokio::time::sleep(wait).await;
            }
        }
        waits
    };
    let (wa, wb) = tokio::join!(
        tokio::spawn(worker(cluster.a.clone())),
        tokio::spawn(worker(cluster.b.clone()))
    );
    let waits: Vec<Duration> = wa.unwrap().into_iter().chain(wb.unwrap()).collect();
    assert!(
        waits.iter().all(|w| !w.is_zero() && *w <= interval),
        "every wait is at most one interval: {waits:?}"
    );
    assert!(waits.len() >= 38, "the workers had to wait: {waits:?}");

    // The key holds the last grant's time plus one interval, in Redis time: the 40 grants took
    // 39 intervals (the spacing is exact; the slack is for two busy workers waking late).
    let tat_us: u64 = cluster.raw.get(cluster.key("rate:spaced")).await.unwrap();
    let span = Duration::from_micros(tat_us - start_us) - interval;
    assert!(
        span >= interval * 39 && span < interval * 39 + Duration::from_millis(700),
        "40 grants at 20/s took {span:?} of Redis time"
    );
    cluster.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_of_one_holds_across_connections_and_leases_lapse() {
    let mut cluster = Cluster::new().await;
    let (a, b) = (cluster.a.clone(), cluster.b.clone());
    let long = Duration::from_secs(30);

    assert!(a.try_acquire("gw", 1, "worker-a", long).await.unwrap());
    assert!(!b.try_acquire("gw", 1, "worker-b", long).await.unwrap());
    assert!(a.renew("gw", "worker-a", long).await.unwrap());
    assert!(!b.renew("gw", "worker-b", long).await.unwrap());
    // The set expires with its lease.
    let pttl: i64 = cluster.raw.pttl(cluster.key("conc:gw")).await.unwrap();
    assert!(pttl > 29_000 && pttl <= 30_000, "pttl {pttl}");

    a.release("gw", "worker-a").await.unwrap();
    let short = Duration::from_millis(300);
    assert!(b.try_acquire("gw", 1, "worker-b", short).await.unwrap());
    assert!(!a.try_acquire("gw", 1, "worker-a", long).await.unwrap());

    // worker-b "dies": its permit comes free when the lease runs out.
    common::eventually("worker-b's lease to lapse", Duration::from_secs(5), || {
        let a = a.clone();
        async move {
            a.try_acquire("gw", 1, "worker-a", long)
                .await
                .unwrap()
                .then_some(())
        }
    })
    .await;
    assert!(!b.renew("gw", "worker-b", short).await.unwrap());
    assert!(!b.try_acquire("gw", 1, "worker-b", short).await.unwrap());

    // Many racing for the permits of a limit of 3: exactly 3 win.
    let racers = (0..12).map(|i| {
        let coord = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move {
            coord
                .try_acquire("race", 3, &format!("holder-{i}"), long)
                .await
                .unwrap()
        })
    });
    let mut winners = 0;
    for racer in racers.collect::<Vec<_>>() {
        winners += usize::from(racer.await.unwrap());
    }
    assert_eq!(winners, 3);
    cluster.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revokes_reach_another_connection_incrementally_and_expire() {
    let mut cluster = Cluster::new().await;
    let (a, b) = (cluster.a.clone(), cluster.b.clone());
    let (kept, brief1, brief2) = (unique("kept"), unique("brief"), unique("brief"));

    a.revoke(std::slice::from_ref(&kept), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(b.is_revoked(&kept).await.unwrap());
    assert!(!b.is_revoked(&brief1).await.unwrap());

    // A worker starting now gets everything, with the time left.
    let (all, cursor) = b.revoked_since(None).await.unwrap();
    assert_eq!(ids(&all), [kept.as_str()]);
    assert!(
        all[0].expires_in > Duration::from_secs(58) && all[0].expires_in <= Duration::from_secs(60),
        "{:?}",
        all[0]
    );

    // Then only what changed, in revoke order.
    a.revoke(
        &[brief1.clone(), brief2.clone()],
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let (fresh, cursor) = b.revoked_since(Some(cursor)).await.unwrap();
    assert_eq!(ids(&fresh), [brief1.as_str(), brief2.as_str()]);
    let (nothing, same) = b.revoked_since(Some(cursor.clone())).await.unwrap();
    assert!(nothing.is_empty());
    assert_eq!(same, cursor);

    // Expired revokes are gone everywhere, and pruned from both sets.
    common::eventually(
        "the brief revokes to expire",
        Duration::from_secs(5),
        || {
            let b = b.clone();
            let brief1 = brief1.clone();
            async move { (!b.is_revoked(&brief1).await.unwrap()).then_some(()) }
        },
    )
    .await;
    let (all, cursor) = a.revoked_since(None).await.unwrap();
    assert_eq!(ids(&all), [kept.as_str()]);
    for set in ["revoked", "revoked:seq"] {
        let n: u64 = cluster.raw.zcard(cluster.key(set)).await.unwrap();
        assert_eq!(n, 1, "{set} was pruned");
    }

    // If Redis loses its data, a worker's old cursor still gets everything revoked since.
    let lost: Vec<String> = ["revoked", "revoked:seq", "revoked:meta"]
        .iter()
        .map(|k| cluster.key(k))
        .collect();
    let _: i64 = cluster.raw.del(lost).await.unwrap();
    let after_loss = unique("after-loss");
    a.revoke(std::slice::from_ref(&after_loss), Duration::from_secs(60))
        .await
        .unwrap();
    let (all, cursor) = b.revoked_since(Some(cursor)).await.unwrap();
    assert_eq!(ids(&all), [after_loss.as_str()]);

    // Likewise if Redis was restored from a snapshot older than the cursor.
    let _: i64 = cluster
        .raw
        .hincr(cluster.key("revoked:meta"), "seq", -1)
        .await
        .unwrap();
    let (all, _) = b.revoked_since(Some(cursor)).await.unwrap();
    assert_eq!(ids(&all), [after_loss.as_str()]);
    cluster.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_once_is_true_for_one_caller_per_ttl() {
    let mut cluster = Cluster::new().await;
    let (a, b) = (cluster.a.clone(), cluster.b.clone());
    let ttl = Duration::from_millis(400);

    assert!(a.claim_once("charge:inv-1", ttl).await.unwrap());
    assert!(!b.claim_once("charge:inv-1", ttl).await.unwrap());
    assert!(b.claim_once("charge:inv-2", ttl).await.unwrap());
    let pttl: i64 = cluster
        .raw
        .pttl(cluster.key("once:charge:inv-1"))
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 400, "pttl {pttl}");

    b.unclaim("charge:inv-1").await.unwrap();
    assert!(b.claim_once("charge:inv-1", ttl).await.unwrap());
    common::eventually("the claim to expire", Duration::from_secs(5), || {
        let a = a.clone();
        async move {
            a.claim_once("charge:inv-1", ttl)
                .await
                .unwrap()
                .then_some(())
        }
    })
    .await;

    // Racing deliveries of one message: exactly one claims it.
    let racers: Vec<_> = (0..12)
        .map(|i| {
            let coord = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                coord
                    .claim_once("receipt:inv-9", Duration::from_secs(60))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for racer in racers {
        winners += usize::from(racer.await.unwrap());
    }
    assert_eq!(winners, 1);
    cluster.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_exclusive_and_fencing_numbers_grow() {
    let mut cluster = Cluster::new().await;
    let (a, b) = (cluster.a.clone(), cluster.b.clone());
    let ttl = Duration::from_secs(30);

    let first = a.lock("invoice:7", ttl).await.unwrap().unwrap();
    assert!(b.lock("invoice:7", ttl).await.unwrap().is_none());
    assert!(b.lock("invoice:8", ttl).await.unwrap().is_some());
    assert!(first.extend(ttl).await.unwrap());
    let mut fences = vec![first.fence()];
    assert!(first.release().await.unwrap());

    // Released explicitly: the other connection gets it at once, with a greater fence.
    let second = b.lock("invoice:7", ttl).await.unwrap().unwrap();
    fences.push(second.fence());
    // Dropped: released in the background.
    drop(second);
    let third = common::eventually(
        "the dropped lock to be released",
        Duration::from_secs(5),
        || {
            let a = a.clone();
            async move { a.lock("invoice:7", ttl).await.unwrap() }
        },
    )
    .await;
    fences.push(third.fence());
    assert!(third.release().await.unwrap());

    // Expired: the next holder gets it, and the stale one can neither extend nor release it.
    let stale = a
        .lock("invoice:7", Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    fences.push(stale.fence());
    let fresh = common::eventually("the lock to expire", Duration::from_secs(5), || {
        let b = b.clone();
        async move { b.lock("invoice:7", ttl).await.unwrap() }
    })
    .await;
    fences.push(fresh.fence());
    assert!(!stale.extend(ttl).await.unwrap());
    assert!(!stale.release().await.unwrap());
    assert!(a.lock("invoice:7", ttl).await.unwrap().is_none());
    assert!(fresh.release().await.unwrap());

    // Even after the fence counter itself is gone, numbers keep growing.
    let _: i64 = cluster
        .raw
        .del(cluster.key("fence:invoice:7"))
        .await
        .unwrap();
    let after = a.lock("invoice:7", ttl).await.unwrap().unwrap();
    fences.push(after.fence());
    assert!(after.release().await.unwrap());
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences grow: {fences:?}"
    );

    // Racing for one lock: exactly one wins.
    let racers: Vec<_> = (0..12)
        .map(|i| {
            let coord = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { coord.lock("contended", ttl).await.unwrap() })
        })
        .collect();
    let mut held = Vec::new();
    for racer in racers {
        held.extend(racer.await.unwrap());
    }
    assert_eq!(held.len(), 1);
    for lock in held {
        assert!(lock.release().await.unwrap());
    }
    cluster.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_set_at_run_time_are_shared() {
    let mut cluster = Cluster::new().await;
    let (a, b) = (cluster.a.clone(), cluster.b.clone());

    a.set_rate_limit("billing.charge", Some("120/m".parse().unwrap()))
        .await
        .unwrap();
    a.set_rate_limit("diag.add", Some(RateLimit { per_second: 0.1 }))
        .await
        .unwrap();
    // Something else wrote garbage: it is skipped, the rest still applies.
    let _: i64 = cluster
        .raw
        .hset(cluster.key("limits:rate"), "broken", "fast")
        .await
        .unwrap();
    let limits = b.rate_limits().await.unwrap();
    assert_eq!(limits.len(), 2, "{limits:?}");
    assert_eq!(limits["billing.charge"].per_second, 2.0);
    assert_eq!(limits["diag.add"].per_second, 0.1);

    b.set_rate_limit("billing.charge", None).await.unwrap();
    let limits = a.rate_limits().await.unwrap();
    assert!(!limits.contains_key("billing.charge"), "{limits:?}");
    cluster.clean_up().await;
}
