//! Helpers for tests that run the `scheduler` binary against the real RabbitMQ and Redis.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use scheduler::Store;
use task_core::protocol::TaskMessage;
use task_core::{AmqpBroker, Broker};
use tokio::process::{Child, Command};

/// Every second, as a 6-field cron and as an interval, replaying missed ticks within a minute.
pub const EVERY_SECOND: &str = r#"
[[entry]]
name = "cron"
task = "test.cron"
cron = "* * * * * *"
queue = "{queue}"
catch_up = "all"
catch_up_window = "1m"

[[entry]]
name = "interval"
task = "test.interval"
every = "1s"
queue = "{queue}"
catch_up = "all"
catch_up_window = "1m"
"#;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Polls `check` every 50 ms until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's private world: a key prefix, a queue, a directory, and clients for them.
pub struct World {
    pub prefix: String,
    pub queue: String,
    pub dir: PathBuf,
    pub store: Store,
    pub broker: AmqpBroker,
    /// The store URL the replicas get as `RESULT_BACKEND`.
    pub store_url: String,
}

impl World {
    pub async fn new(name: &str) -> Self {
        Self::with_store_url(name, &redis_url()).await
    }

    /// A world whose store (and the replicas') is at `url` (e.g. a `sentinel://` URL).
    pub async fn with_store_url(name: &str, url: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("test:beat:{name}:{id}:");
        let queue = format!("test.beat.{name}.{id}");
        let dir = std::env::temp_dir().join(format!("scheduler-{name}-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(url, &prefix).await.unwrap();
        let broker = AmqpBroker::connect(&amqp_url()).await.unwrap();
        World {
            prefix,
            queue,
            dir,
            store,
            broker,
            store_url: url.to_owned(),
        }
    }

    /// Writes a schedule file; `{queue}` in `text` becomes this world's queue.
    pub fn schedule(&self, text: &str) -> PathBuf {
        let path = self.dir.join("schedule.toml");
        std::fs::write(&path, text.replace("{queue}", &self.queue)).unwrap();
        path
    }

    pub fn spawn(&self, node: &str, schedule: &Path) -> Replica {
        Replica::spawn(
            node,
            &self.dir,
            &[
                ("SCHEDULE_FILE", schedule.to_str().unwrap()),
                ("SCHEDULER_KEY_PREFIX", &self.prefix),
                ("RESULT_BACKEND", &self.store_url),
            ],
        )
    }

    /// Every message in the queue (which must no longer be written to), by task id, with how
    /// many times each was published.
    pub async fn drain(&self) -> BTreeMap<String, usize> {
        let n = self.broker.queue_length(&self.queue).await.unwrap() as usize;
        let mut counts = BTreeMap::new();
        if n > 0 {
            let mut consumer = self
                .broker
                .consume(std::slice::from_ref(&self.queue), 200)
                .await
                .unwrap();
            for _ in 0..n {
                let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                    .await
                    .expect("a ready message is delivered")
                    .expect("the consumer is open");
                let message = TaskMessage::decode(&delivery.message).unwrap();
                *counts.entry(message.headers.id).or_default() += 1;
                delivery.ack().await.unwrap();
            }
            consumer.cancel().await;
        }
        assert_eq!(self.broker.queue_length(&self.queue).await.unwrap(), 0);
        counts
    }

    /// Deletes the queue, the keys and the directory. Also done on drop, so a failing test
    /// cleans up too; calling it states the intent and surfaces clean-up errors.
    pub async fn cleanup(mut self) {
        cleanup(&self.prefix, &self.queue, &self.dir).await;
        self.prefix.clear();
    }

    /// The entry's last published tick, per the store.
    pub async fn last_run(&self, entry: &str) -> Option<DateTime<Utc>> {
        self.store
            .get(entry)
            .await
            .unwrap()
            .and_then(|s| s.last_run)
    }

    /// Waits until `entry` has published a tick at or after `at`.
    pub async fn wait_for_tick(&self, entry: &str, at: DateTime<Utc>, timeout: Duration) {
        eventually(
            &format!("{entry} to publish the tick of {at}"),
            timeout,
            || async { self.last_run(entry).await.filter(|t| *t >= at).map(|_| ()) },
        )
        .await;
    }

    /// The current leader's node id.
    pub async fn leader(&self) -> Option<String> {
        self.store.leader().await.unwrap().map(|h| h.node_id)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self.prefix.is_empty() {
            return;
        }
        // A panicking test is unwinding inside a runtime: clean up on a thread of our own.
        let (prefix, queue, dir) = (self.prefix.clone(), self.queue.clone(), self.dir.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up")
                .block_on(cleanup(&prefix, &queue, &dir));
        })
        .join();
    }
}

async fn cleanup(prefix: &str, queue: &str, dir: &Path) {
    let broker = AmqpBroker::connect(&amqp_url()).await.unwrap();
    broker.delete_queue(queue).await.unwrap();
    broker.close().await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
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
    let _ = std::fs::remove_dir_all(dir);
}

/// The ticks of `entry` among drained task ids, with their counts.
pub fn ticks(counts: &BTreeMap<String, usize>, entry: &str) -> BTreeMap<DateTime<Utc>, usize> {
    let prefix = format!("beat:{entry}:");
    counts
        .iter()
        .filter_map(|(id, n)| {
            let tick = id.strip_prefix(&prefix)?;
            Some((
                DateTime::parse_from_rfc3339(tick)
                    .unwrap()
                    .with_timezone(&Utc),
                *n,
            ))
        })
        .collect()
}

/// Asserts each tick was published once and none is missing between the first and `last`.
pub fn assert_every_second_once(
    ticks: &BTreeMap<DateTime<Utc>, usize>,
    last: DateTime<Utc>,
    entry: &str,
) {
    let duplicates: Vec<_> = ticks.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        duplicates.is_empty(),
        "{entry}: ticks published more than once: {duplicates:?}"
    );
    let first = *ticks
        .keys()
        .next()
        .unwrap_or_else(|| panic!("{entry}: no tick published"));
    let mut t = first;
    let mut missing = Vec::new();
    while t <= last {
        if !ticks.contains_key(&t) {
            missing.push(t);
        }
        t += chrono::Duration::seconds(1);
    }
    assert!(missing.is_empty(), "{entry}: ticks missing: {missing:?}");
    assert_eq!(
        *ticks.keys().last().unwrap(),
        last,
        "{entry}: the store's last run is the last tick on the broker"
    );
}

/// A `scheduler` process, killed when dropped.
pub struct Replica {
    pub node: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Replica {
    pub fn spawn(node: &str, dir: &Path, env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{node}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scheduler"));
        cmd.env("BROKER_URL", amqp_url())
            .env("RESULT_BACKEND", redis_url())
            .env("METRICS_BIND", "127.0.0.1:0")
            .env("SCHEDULER_NODE_ID", node)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn the scheduler binary");
        Replica {
            node: node.to_owned(),
            child,
            log,
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running") as i32;
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{signal} {pid} failed");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit (bounded) and returns its status.
    pub async fn exited(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "{} did not exit within {timeout:?}; log:\n{}",
                self.node,
                self.log_text()
            ),
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) {
        self.signal("TERM");
        let status = self.exited(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "{} exited with {status}; log:\n{}",
            self.node,
            self.log_text()
        );
    }
}
