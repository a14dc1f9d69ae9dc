//! Redis behind Sentinel (`scripts/redis-sentinel`: a primary, a replica, three sentinels): the
//! primary is SIGKILLed while two workers store results through `sentinel://`, and started again
//! later as a replica.
//!
//! Runs in `scripts/test`'s alone phase (`chaos_broker` prefix): it times a failover.

mod common;
#[path = "../../task-core/tests/common/sentinel.rs"]
mod sentinel;

use sentinel::SentinelSet;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use task_core::diag::{self, SleepArgs};
use task_core::{Broker, Client, RedisBackend, ResultBackend, TaskState};

const TASKS: usize = 3_000;

/// How many of `ids` have a SUCCESS stored, read through `backend` in one `MGET`; `None` while
/// Redis does not answer (mid-failover).
async fn done(backend: &RedisBackend, ids: &[String]) -> Option<usize> {
    let keys: Vec<String> = ids
        .iter()
        .map(|id| format!("celery-task-meta-{id}"))
        .collect();
    let mut conn = backend.connection();
    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(
        values
            .iter()
            .flatten()
            .filter(|v| {
                serde_json::from_slice::<serde_json::Value>(v)
                    .is_ok_and(|m| m["status"] == "SUCCESS")
            })
            .count(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_broker_the_redis_primary_killed_mid_run_loses_no_result_and_reruns_nothing() {
    let set = SentinelSet::start();
    let url = set.url.clone();
    let first_primary = set.primary();
    let queue = common::unique_queue("sentinel");

    let client = Client::connect(&common::amqp_url(), &url)
        .await
        .expect("a client through Sentinel")
        .with_default_queue(&queue);
    let reader = RedisBackend::connect(&url)
        .await
        .expect("a reader through Sentinel");
    assert_eq!(
        reader.connection().current_addr().as_deref(),
        Some(format!("127.0.0.1:{first_primary}").as_str())
    );

    let mut ids = Vec::with_capacity(TASKS);
    for _ in 0..TASKS {
        let sent = client
            .task::<diag::Sleep>(SleepArgs { ms: 10 })
            .send()
            .await
            .unwrap();
        ids.push(sent.id().to_owned());
    }
    const LOG: (&str, &str) = ("RUST_LOG", "info,task_core::worker=debug");
    let workers: Vec<_> = (0..2)
        .map(|_| {
            common::WorkerProcess::spawn(
                &queue,
                &[
                    ("RESULT_BACKEND", url.as_str()),
                    ("WORKER_CONCURRENCY", "8"),
                    LOG,
                ],
            )
        })
        .collect();

    common::eventually(
        "a fifth of the run done",
        Duration::from_secs(120),
        || async { done(&reader, &ids).await.filter(|n| *n >= TASKS / 5) },
    )
    .await;
    let killed = set.kill_primary();
    let killed_at = Instant::now();
    let at_kill = TASKS / 5;
    let promoted = set.wait_failover(&killed);
    let failover = killed_at.elapsed();
    assert_ne!(promoted, killed);
    // The clients follow within a watchdog round; then the old primary comes back (empty, no
    // persistence) and the sentinels make it a replica.
    common::eventually(
        "the reader to follow the primary",
        Duration::from_secs(20),
        || async {
            let _ = done(&reader, &ids[..1]).await;
            (reader.connection().current_addr() == Some(format!("127.0.0.1:{promoted}")))
                .then_some(())
        },
    )
    .await;
    let during = done(&reader, &ids).await.unwrap_or(0);
    set.restart(&killed);

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = done(&reader, &ids).await;
        if n == Some(TASKS) {
            break;
        }
        if Instant::now() > deadline {
            let mut missing = Vec::new();
            for id in &ids {
                match reader.get(id).await {
                    Ok(Some(m)) if m.status == TaskState::Success => {}
                    other => missing.push(format!("{id}: {other:?}")),
                }
            }
            panic!(
                "{n:?} of {TASKS} done after 120 s; reader at {:?}; {} missing, first {:?}; \
                 {killed}: {}; {promoted}: {}",
                reader.connection().current_addr(),
                missing.len(),
                missing.iter().take(5).collect::<Vec<_>>(),
                set.info(&killed, "keyspace"),
                set.info(&promoted, "keyspace")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let finished = killed_at.elapsed();

    // Every task ran once: a result the dead primary took but had not replicated was never
    // acknowledged (WAIT), so the worker kept the message and stored it again on the new one.
    let mut started: HashMap<String, u32> = HashMap::new();
    for w in &workers {
        for (id, n) in common::starts(&w.log_text()) {
            *started.entry(id).or_default() += n;
        }
    }
    let twice: Vec<_> = ids
        .iter()
        .filter(|id| started.get(*id).copied().unwrap_or(0) != 1)
        .map(|id| (id, started.get(id).copied().unwrap_or(0)))
        .collect();
    assert!(
        twice.is_empty(),
        "tasks not started exactly once: {twice:?}"
    );
    for id in ids.iter().step_by(97) {
        let meta = reader.get(id).await.unwrap().expect("a stored result");
        assert_eq!(meta.status, TaskState::Success, "{id}");
    }
    let retried: usize = workers
        .iter()
        .map(|w| w.log_text().matches("result backend unavailable").count())
        .sum();

    // A Python Celery client reads a result through the same sentinels, with Celery's own URL
    // form and transport option.
    let celery_url = url.split('?').next().unwrap().to_owned();
    let script = r#"
import sys
from celery import Celery
app = Celery(broker="memory://", backend=sys.argv[1])
app.conf.result_backend_transport_options = {"master_name": sys.argv[2]}
print(app.AsyncResult(sys.argv[3]).get(timeout=20))
"#;
    let out = tokio::process::Command::new(common::python())
        .args(["-c", script, &celery_url, "tq-primary", &ids[TASKS - 1]])
        .output()
        .await
        .expect("run Python");
    assert!(
        out.status.success(),
        "Python could not read the result: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10");

    println!(
        "primary {killed} killed with {at_kill}+ of {TASKS} done; sentinels promoted {promoted} in \
         {failover:.1?}; {during} done when the clients had followed; all {TASKS} done \
         {finished:.1?} after the kill, each started once; {retried} result stores retried"
    );
    for w in workers {
        drop(w);
    }
    client.broker().delete_queue(&queue).await.unwrap();
}
