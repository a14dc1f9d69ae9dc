//! The store's semantics, run against both backends: the in-memory one and the real Redis
//! (`REDIS_URL`, default `redis://127.0.0.1:6379/0`, under a unique key prefix per test).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;
use crate::entry::EntrySpec;
use crate::lease::lease_value;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A Redis store under a fresh prefix; `cleanup` deletes its keys.
struct RedisFixture {
    store: Store,
    prefix: String,
}

impl RedisFixture {
    async fn new() -> Self {
        let prefix = format!("test:beat:{}:", uuid::Uuid::new_v4().simple());
        let store = Store::connect(&redis_url(), &prefix).await.unwrap();
        RedisFixture { store, prefix }
    }

    async fn cleanup(self) {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn spec(name: &str, every: &str) -> EntrySpec {
    EntrySpec {
        name: name.into(),
        task: "diag.echo".into(),
        every: Some(every.into()),
        ..EntrySpec::default()
    }
}

async fn runtime_api(store: &Store) {
    assert!(store.list().await.unwrap().is_empty());
    let entry = store.add(spec("a", "1m")).await.unwrap();
    assert_eq!(entry.name(), "a");
    let invalid = store.add(spec("b", "often")).await.unwrap_err();
    assert!(matches!(invalid, Error::InvalidEntry(_)), "{invalid}");
    assert!(
        invalid
            .to_string()
            .contains("entry `b`: every: `often` is not a duration")
    );

    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].spec, spec("a", "1m"));
    assert_eq!(listed[0].source, Source::Api);
    assert!(!listed[0].paused);
    assert_eq!(store.count().await.unwrap(), 1);

    // Skipped ticks are counted per reason, and not for an entry that is gone.
    store.count_skipped("a", "missed", 3).await.unwrap();
    store.count_skipped("a", "missed", 2).await.unwrap();
    store.count_skipped("a", "overlap", 1).await.unwrap();
    store.count_skipped("gone", "missed", 1).await.unwrap();
    let skipped = store.get("a").await.unwrap().unwrap().skipped;
    assert_eq!(
        (skipped.missed, skipped.overlap, skipped.in_doubt),
        (5, 1, 0)
    );
    assert!(store.get("gone").await.unwrap().is_none());

    store.pause("a").await.unwrap();
    assert!(store.get("a").await.unwrap().unwrap().paused);
    store.resume("a").await.unwrap();
    assert!(!store.get("a").await.unwrap().unwrap().paused);
    for missing in [
        store.pause("x").await,
        store.resume("x").await,
        store.remove("x").await,
    ] {
        assert!(
            matches!(missing, Err(Error::NotFound(ref n)) if n == "x"),
            "{missing:?}"
        );
    }
    store.remove("a").await.unwrap();
    assert!(store.get("a").await.unwrap().is_none());

    // The file: applied, re-applied (unchanged entries keep their state), pruned.
    let file = |names: &[&str]| -> Vec<Entry> {
        names
            .iter()
            .map(|n| Entry::new(spec(n, "1h")).unwrap())
            .collect()
    };
    store.add(spec("api", "1h")).await.unwrap();
    store.seed(&file(&["f1", "f2"])).await.unwrap();
    let loaded = store.load().await.unwrap();
    let cursor = loaded
        .iter()
        .find(|l| l.entry.name() == "f1")
        .unwrap()
        .state
        .cursor;
    assert!(
        cursor.is_some(),
        "a new entry starts counting from when it was added"
    );
    store.seed(&file(&["f1"])).await.unwrap();
    let names: Vec<_> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.spec.name)
        .collect();
    assert_eq!(
        names,
        ["api", "f1"],
        "f2 left the file; the API's entry stays"
    );
    let again = store.load().await.unwrap();
    assert_eq!(
        again
            .iter()
            .find(|l| l.entry.name() == "f1")
            .unwrap()
            .state
            .cursor,
        cursor
    );
}

/// State lost outside the API (a flush, a hand edit) is rebuilt, counting from now.
async fn lost_state_is_rebuilt(store: &Store) {
    store.add(spec("s", "1m")).await.unwrap();
    match store.backend() {
        Backend::Memory(m) => {
            lock(m).states.remove("s");
        }
        Backend::Redis(r) => {
            let _: i64 = redis::cmd("DEL")
                .arg(store.keys().state("s"))
                .query_async(&mut r.conn.clone())
                .await
                .unwrap();
        }
    }
    let loaded = store.load().await.unwrap().remove(0);
    assert!(loaded.state.cursor.is_some());
    assert_eq!(loaded.state.fingerprint.as_deref(), Some("every:60s@0"));
    let entry = loaded.entry;
    let next = utc("2030-01-01T00:01:00Z");
    assert!(store.advance(&entry, 1, None, Some(next)).await.unwrap());
    let again = store.load().await.unwrap().remove(0);
    assert_eq!(again.state.cursor, loaded.state.cursor);
    assert_eq!(again.state.next_run, Some(next));
}

#[tokio::test]
async fn memory_lost_state_is_rebuilt() {
    lost_state_is_rebuilt(&Store::memory("m:")).await;
}

#[tokio::test]
async fn redis_lost_state_is_rebuilt() {
    let f = RedisFixture::new().await;
    lost_state_is_rebuilt(&f.store).await;
    f.cleanup().await;
}

async fn claims_and_state_are_fenced(store: &Store) {
    let entry = store.add(spec("e", "10s")).await.unwrap();
    let t1 = utc("2030-01-01T00:00:10Z");
    let t2 = utc("2030-01-01T00:00:20Z");
    let ttl = Duration::from_secs(30);

    let a = store.acquire_lease("a", ttl).await.unwrap().unwrap();
    let lease_a = lease_value("a", a);
    assert_eq!(
        store.acquire_lease("b", ttl).await.unwrap(),
        None,
        "one holder at a time"
    );
    assert_eq!(
        store.leader().await.unwrap(),
        Some(crate::LeaseHolder {
            node_id: "a".into(),
            token: a
        })
    );
    assert!(store.renew_lease(&lease_a, ttl).await.unwrap());
    assert!(!store.renew_lease(&lease_value("b", a), ttl).await.unwrap());

    // Claim, then claim again before publishing (a failed publish): the claim is ours to
    // finish; once recorded, it is done.
    assert_eq!(
        store.claim(&lease_a, a, "e", t1).await.unwrap(),
        Claim::Fresh
    );
    assert_eq!(
        store.claim(&lease_a, a, "e", t1).await.unwrap(),
        Claim::Retry
    );
    assert!(
        store
            .record_published(&entry, a, t1, "id1", t1)
            .await
            .unwrap()
    );
    assert_eq!(
        store.claim(&lease_a, a, "e", t1).await.unwrap(),
        Claim::Done
    );
    let not_holder = lease_value("b", a);
    assert_eq!(
        store.claim(&not_holder, a, "e", t2).await.unwrap(),
        Claim::NotLeader
    );

    // `a` claims t2 and dies before recording it; `b` takes over.
    assert_eq!(
        store.claim(&lease_a, a, "e", t2).await.unwrap(),
        Claim::Fresh
    );
    assert!(!store.release_lease(&not_holder).await.unwrap());
    assert!(store.release_lease(&lease_a).await.unwrap());
    let b = store.acquire_lease("b", ttl).await.unwrap().unwrap();
    assert!(b > a, "fencing tokens grow");
    let lease_b = lease_value("b", b);
    let t3 = utc("2030-01-01T00:00:30Z");
    let t4 = utc("2030-01-01T00:00:40Z");
    assert_eq!(
        store.claim(&lease_a, a, "e", t3).await.unwrap(),
        Claim::NotLeader,
        "a deposed leader cannot claim"
    );
    assert_eq!(
        store.claim(&lease_b, b, "e", t2).await.unwrap(),
        Claim::InDoubt,
        "another leader's unfinished claim is not taken over"
    );
    assert_eq!(
        store.claim(&lease_b, b, "e", t3).await.unwrap(),
        Claim::Fresh
    );
    assert!(
        store
            .record_published(&entry, b, t3, "id3", t3)
            .await
            .unwrap()
    );

    // The deposed leader's late writes are dropped; the cursor never goes back.
    assert!(
        !store
            .record_published(&entry, a, t4, "late", t3)
            .await
            .unwrap()
    );
    assert!(!store.advance(&entry, a, Some(t4), None).await.unwrap());
    assert!(store.advance(&entry, b, Some(t1), Some(t4)).await.unwrap());
    let state = store.load().await.unwrap().remove(0).state;
    assert_eq!(state.cursor, Some(t3));
    assert_eq!(state.last_run, Some(t3));
    assert_eq!(state.last_task_id.as_deref(), Some("id3"));
    assert_eq!(state.next_run, Some(t4));
    assert_eq!(state.token, b);
    let status = store.get("e").await.unwrap().unwrap();
    assert_eq!((status.last_run, status.next_run), (Some(t3), Some(t4)));

    // A write for a schedule that has since changed is dropped too.
    store.add(spec("e", "20s")).await.unwrap();
    assert!(
        !store
            .record_published(&entry, b, t4, "old", t4)
            .await
            .unwrap()
    );
    assert!(store.release_lease(&lease_b).await.unwrap());
    assert_eq!(store.leader().await.unwrap(), None);
}

#[tokio::test]
async fn memory_runtime_api() {
    runtime_api(&Store::memory("m:")).await;
}

#[tokio::test]
async fn memory_claims_and_state_are_fenced() {
    claims_and_state_are_fenced(&Store::memory("m:")).await;
}

#[tokio::test]
async fn redis_runtime_api() {
    let f = RedisFixture::new().await;
    runtime_api(&f.store).await;
    f.cleanup().await;
}

#[tokio::test]
async fn redis_claims_and_state_are_fenced() {
    let f = RedisFixture::new().await;
    claims_and_state_are_fenced(&f.store).await;
    // Firing keys expire on their own.
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(f.store.keys().fired("e", utc("2030-01-01T00:00:10Z")))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 86_400 && ttl <= FIRED_TTL.as_secs() as i64, "{ttl}");
    f.cleanup().await;
}

#[tokio::test]
async fn redis_changes_reach_other_processes_by_pub_sub() {
    let f = RedisFixture::new().await;
    let mut changes = f.store.changes();
    // The subscription announces itself once it is listening.
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("the subscription within 5 s")
        .unwrap();
    let other = Store::connect(&redis_url(), &f.prefix).await.unwrap();
    other.add(spec("x", "1m")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("a change notification within 5 s")
        .unwrap();
    other.pause("x").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("a change notification within 5 s")
        .unwrap();
    f.cleanup().await;
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error() {
    let err = Store::connect("redis://127.0.0.1:1/0", "p:")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot connect to Redis at redis://127.0.0.1:1/0"),
        "{err}"
    );
    let err = Store::connect("http://x", "p:").await.unwrap_err();
    assert!(err.to_string().contains("is not a store URL"), "{err}");
    let lazy = Store::connect_lazy("redis://127.0.0.1:1/0", "p:").unwrap();
    assert!(lazy.ping().await.is_err());
}
