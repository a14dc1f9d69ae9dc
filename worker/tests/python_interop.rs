//! Interop with the real Python `celery` package (from PyPI, in the test virtualenv).

mod common;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use task_core::{Broker, Client, Error, ResultBackend, TaskState};

/// Runs `examples/python/client.py` with a JSON config and returns its JSON output.
async fn python_client(cfg: Value) -> Value {
    let script = common::workspace_root().join("examples/python/client.py");
    let out = tokio::process::Command::new(common::python())
        .arg(script)
        .arg(cfg.to_string())
        .output()
        .await
        .expect("run the Python client");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

fn py_broker() -> String {
    // kombu spells the default vhost `//`.
    common::amqp_url().replace("/%2f", "//")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_run_tasks_on_the_rust_worker() {
    let queue = common::unique_queue("py2rs");
    let worker = common::WorkerProcess::spawn(&queue, &[]);
    worker.ready().await;
    let base = json!({"broker": py_broker(), "backend": common::redis_url(), "queue": queue});
    let with = |extra: Value| merged(&base, extra);

    let (json_add, msgpack_add, failure, kwargs, countdown) = tokio::join!(
        python_client(with(json!({"task": "diag.add", "args": [2, 3]}))),
        python_client(with(
            json!({"task": "diag.add", "args": [2, 3], "serializer": "msgpack"})
        )),
        python_client(with(
            json!({"task": "diag.fail", "args": ["card declined: 5051"]})
        )),
        python_client(with(
            json!({"task": "diag.echo", "kwargs": {"value": {"a": [1, 2.5, null]}}, "serializer": "msgpack"})
        )),
        python_client(with(
            json!({"task": "diag.add", "args": [40, 2], "countdown": 2})
        )),
    );
    assert_eq!(json_add["result"], json!(5), "{json_add}");
    assert_eq!(json_add["state"], "SUCCESS");
    assert_eq!(msgpack_add["result"], json!(5), "{msgpack_add}");
    assert_eq!(failure["state"], "FAILURE", "{failure}");
    assert_eq!(failure["exc_type"], "ValueError");
    assert_eq!(failure["exc_message"], "card declined: 5051");
    assert_eq!(kwargs["result"], json!({"a": [1, 2.5, null]}), "{kwargs}");
    assert_eq!(countdown["result"], json!(42), "{countdown}");

    // What Python puts on the wire that strict parsers refuse: compressed bodies, NaN and
    // Infinity from `json.dumps`, and integers beyond 64 bits (refused with a reason).
    let (zlib, nan, huge) = tokio::join!(
        python_client(with(
            json!({"task": "diag.add", "args": [2, 3], "compression": "zlib"})
        )),
        python_client(with(json!({"task": "diag.echo", "raw_args": "[NaN]"}))),
        python_client(with(
            json!({"task": "diag.echo", "raw_args": "[1180591620717411303424]"})
        )),
    );
    assert_eq!(zlib["result"], json!(5), "{zlib}");
    assert_eq!(nan["state"], "SUCCESS", "{nan}");
    assert_eq!(nan["result"], json!(null), "{nan}");
    assert_eq!(huge["state"], "FAILURE", "{huge}");
    assert!(
        huge["exc_message"]
            .as_str()
            .unwrap()
            .contains("does not fit in 64 bits"),
        "{huge}"
    );
    drop(worker);
    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    broker.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_clients_run_tasks_on_a_python_worker() {
    let queue = common::unique_queue("rs2py");
    let dir = common::workspace_root().join("examples/python");
    let mut py_worker = tokio::process::Command::new(common::python())
        .args([
            "-m",
            "celery",
            "-A",
            "py_worker",
            "worker",
            "--pool",
            "solo",
            "--loglevel",
            "INFO",
            "-Q",
            &queue,
            "-n",
            &format!("py-{queue}@%h"),
        ])
        .current_dir(&dir)
        .env("BROKER_URL", py_broker())
        .env("RESULT_BACKEND", common::redis_url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python worker");

    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue);
    let product = client
        .send_task("py.mul", vec![json!(6), json!(7)], Default::default())
        .send()
        .await
        .unwrap();
    assert_eq!(
        product.get(Duration::from_secs(60)).await.unwrap(),
        json!(42)
    );

    let msgpack = client.with_serializer(task_core::ContentType::Msgpack);
    let product = msgpack
        .send_task("py.mul", vec![json!("ab"), json!(3)], Default::default())
        .send()
        .await
        .unwrap();
    assert_eq!(
        product.get(Duration::from_secs(30)).await.unwrap(),
        json!("ababab")
    );

    let failed = client
        .send_task("py.fail", vec![json!("from python")], Default::default())
        .send()
        .await
        .unwrap();
    match failed.get(Duration::from_secs(30)).await {
        Err(Error::TaskFailed {
            state, exception, ..
        }) => {
            assert_eq!(state, TaskState::Failure);
            assert_eq!(exception.exc_type, "ValueError");
            assert_eq!(exception.message(), "from python");
        }
        other => panic!("py.fail should fail, got {other:?}"),
    }
    let _ = py_worker.kill().await;
    client.broker().delete_queue(&queue).await.unwrap();
}

/// Runs `worker/tests/python/interop.py` (sends with options, reads results with what Python
/// rebuilds from them) and returns its JSON output.
async fn python_helper(cfg: Value) -> Value {
    let script = common::workspace_root().join("worker/tests/python/interop.py");
    let mut cfg = cfg;
    let obj = cfg.as_object_mut().unwrap();
    obj.entry("broker").or_insert_with(|| py_broker().into());
    obj.entry("backend")
        .or_insert_with(|| common::redis_url().into());
    let out = tokio::process::Command::new(common::python())
        .arg(script)
        .arg(cfg.to_string())
        .output()
        .await
        .expect("run the Python helper");
    assert!(
        out.status.success(),
        "python helper failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

fn merged(base: &Value, extra: Value) -> Value {
    let mut cfg = base.clone();
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_delays_expiry_time_limits_retries_and_unknown_tasks_on_the_rust_worker() {
    let queue = common::unique_queue("pyopts");
    let worker = common::WorkerProcess::spawn(&queue, &[]);
    worker.ready().await;
    let base = json!({"queue": queue, "timeout": 30});

    let (countdown, expired, hard, soft, flaky, unknown) = tokio::join!(
        python_helper(merged(
            &base,
            json!({"task": "diag.add", "args": [40, 2], "options": {"countdown": 2}})
        )),
        // Expires before its ETA comes: discarded as REVOKED.
        python_helper(merged(
            &base,
            json!({"task": "diag.add", "args": [1, 1], "options": {"countdown": 3, "expires": 1}})
        )),
        python_helper(merged(
            &base,
            json!({"task": "diag.sleep", "args": [20000], "options": {"time_limit": 1}})
        )),
        python_helper(merged(
            &base,
            json!({"task": "diag.sleep", "args": [20000], "options": {"soft_time_limit": 1, "time_limit": 10}})
        )),
        python_helper(merged(
            &base,
            json!({"task": "diag.flaky", "args": [2], "watch": true})
        )),
        python_helper(merged(&base, json!({"task": "nosuch.task", "args": [1]}))),
    );

    assert_eq!(countdown["result"], json!(42), "{countdown}");
    let waited = countdown["elapsed"].as_f64().unwrap();
    assert!(waited >= 1.9, "countdown=2 ran after {waited} s");

    assert_eq!(expired["state"], "REVOKED", "{expired}");
    assert_eq!(
        expired["exception"]["class"], "TaskRevokedError",
        "{expired}"
    );

    // `apply_async(time_limit=1)`: TimeLimitExceeded(1) from celery.exceptions, after 1 s.
    let e = &hard["exception"];
    assert_eq!(e["class"], "TimeLimitExceeded", "{hard}");
    assert_eq!(e["is_time_limit"], true, "{hard}");
    assert_eq!(e["args"], json!([1]), "{hard}");
    let took = hard["elapsed"].as_f64().unwrap();
    assert!((1.0..15.0).contains(&took), "hard limit hit after {took} s");
    assert!(
        hard["traceback"]
            .as_str()
            .unwrap()
            .contains("in diag.sleep"),
        "{hard}"
    );
    assert_eq!(
        soft["exception"]["class"], "SoftTimeLimitExceeded",
        "{soft}"
    );

    // RETRY as Python sees it: each retry published, then SUCCESS.
    assert_eq!(flaky["result"], json!(2), "{flaky}");
    let states: Vec<&str> = flaky["published"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // The next attempt is published before this one stores RETRY (as in Celery's `Task.retry`),
    // so with no delay a later attempt can finish first, and a RETRY stored after that SUCCESS
    // is refused (a finished state is never written over): up to two RETRYs, then SUCCESS (on a
    // busy machine both attempts' RETRYs can come late); the result counts both retries.
    let (last, retries) = states.split_last().unwrap();
    assert_eq!(*last, "SUCCESS", "{flaky}");
    assert!(
        retries.len() <= 2 && retries.iter().all(|s| *s == "RETRY"),
        "{flaky}"
    );

    // An unknown task: Python gets NotRegistered naming it; the message is dead-lettered with
    // the reason.
    let e = &unknown["exception"];
    assert_eq!(e["class"], "NotRegistered", "{unknown}");
    assert_eq!(e["is_not_registered"], true, "{unknown}");
    assert!(
        e["str"].as_str().unwrap().contains("nosuch.task"),
        "{unknown}"
    );
    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    let dlq = task_core::broker::dead_letter_queue(&queue);
    let mut consumer = broker.consume(std::slice::from_ref(&dlq), 1).await.unwrap();
    let dead = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the dead-lettered message")
        .unwrap();
    assert_eq!(dead.message.task_id(), unknown["id"].as_str());
    let reason = dead.message.headers[task_core::broker::DEAD_LETTER_REASON_HEADER]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(reason, "unknown task `nosuch.task`");
    dead.ack().await.unwrap();
    consumer.cancel().await;
    eprintln!(
        "countdown=2 waited {waited:.2} s; time_limit=1 failed after {took:.2} s; dead-letter reason: {reason}"
    );
    drop(worker);
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_queue(&dlq).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_priorities_order_a_priority_queue_on_the_rust_worker() {
    let queue = common::unique_queue("pyprio");
    // Everything is queued before the worker starts, on a queue declared as Celery declares
    // `Queue(max_priority=10)`; one slot and a prefetch of one take the highest first.
    let mut batch: Vec<Value> = (0..5)
        .map(|_| json!({"task": "diag.sleep", "args": [50], "options": {"priority": 0}}))
        .collect();
    batch.push(json!({"task": "diag.sleep", "args": [50], "options": {"priority": 9}}));
    let sent = python_helper(json!({"queue": queue, "max_priority": 10, "batch": batch})).await;
    let ids = sent["ids"].as_array().unwrap().clone();
    let worker = common::WorkerProcess::spawn(
        &queue,
        &[("WORKER_CONCURRENCY", "1"), ("WORKER_PREFETCH", "1")],
    );
    let done = python_helper(json!({"queue": queue, "read_many": ids, "timeout": 30})).await;
    // `date_done` is UTC with a fixed `+00:00` suffix, so as text it sorts as time does.
    let finished: Vec<&str> = done
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["state"], "SUCCESS", "{r}");
            let at = r["date_done"].as_str().unwrap();
            assert!(at.ends_with("+00:00"), "{r}");
            at
        })
        .collect();
    let (high, low) = finished.split_last().unwrap();
    assert!(
        low.iter().all(|l| high < l),
        "priority 9 finished first: {done}"
    );
    drop(worker);
    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    broker.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_clients_see_python_retries_and_msgpack_results() {
    let queue = common::unique_queue("pyretry");
    let dir = common::workspace_root().join("worker/tests/python");
    let mut py_worker = tokio::process::Command::new(common::python())
        .args(["-m", "celery", "-A", "py_tasks", "worker", "--pool", "solo"])
        .args(["--loglevel", "WARNING", "-Q", &queue])
        .args(["-n", &format!("py-{queue}@%h")])
        .current_dir(&dir)
        .env("BROKER_URL", py_broker())
        .env("RESULT_BACKEND", common::redis_url())
        .env("RESULT_SERIALIZER", "msgpack")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python worker");
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue);

    // Results the Python worker stores as msgpack.
    let pair = client
        .send_task("py.pair", vec![json!(1), json!("b")], Default::default())
        .send()
        .await
        .unwrap();
    let value = pair.get(Duration::from_secs(60)).await.unwrap();
    assert_eq!(value["pair"], json!([1, "b"]), "{value}");
    assert_eq!(value["retries"], json!(0), "{value}");

    // RETRY with the exception that caused it, then FAILURE with it.
    let unreachable = client
        .send_task(
            "py.unreachable",
            vec![json!("gw.example")],
            Default::default(),
        )
        .send()
        .await
        .unwrap();
    let retry = common::eventually("RETRY from Python", Duration::from_secs(30), || async {
        unreachable
            .meta()
            .await
            .unwrap()
            .filter(|m| m.status == TaskState::Retry)
    })
    .await;
    let exc = retry.exception_info().unwrap();
    assert_eq!(exc.exc_type, "ConnectionError", "{retry:?}");
    assert_eq!(exc.message(), "gw.example is unreachable");
    assert!(retry.traceback.unwrap().contains("ConnectionError"));
    match unreachable.get(Duration::from_secs(30)).await {
        Err(Error::TaskFailed {
            state, exception, ..
        }) => {
            assert_eq!(state, TaskState::Failure);
            assert_eq!(exception.exc_type, "ConnectionError");
        }
        other => panic!("py.unreachable should fail, got {other:?}"),
    }
    let meta = unreachable.meta().await.unwrap().unwrap();
    assert_eq!(meta.retries, Some(2), "{meta:?}");
    let _ = py_worker.kill().await;
    client.broker().delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_worker_with_result_serializer_msgpack_stores_what_python_reads() {
    let queue = common::unique_queue("msgpackresults");
    let worker = common::WorkerProcess::spawn(&queue, &[("RESULT_SERIALIZER", "msgpack")]);
    worker.ready().await;
    // Celery reads a stored result with its own `result_serializer`, so the client says msgpack too.
    let base = json!({"broker": py_broker(), "backend": common::redis_url(), "queue": queue,
                      "result_serializer": "msgpack"});
    let with = |extra: Value| merged(&base, extra);
    let (add, failure) = tokio::join!(
        python_client(with(json!({"task": "diag.add", "args": [20, 22]}))),
        python_client(with(
            json!({"task": "diag.fail", "args": ["card declined: 5051"]})
        )),
    );
    assert_eq!(add["state"], "SUCCESS", "{add}");
    assert_eq!(add["result"], 42);
    assert_eq!(failure["state"], "FAILURE", "{failure}");
    assert_eq!(failure["exc_type"], "ValueError");
    assert_eq!(failure["exc_message"], "card declined: 5051");

    // Stored as a msgpack map, and read back by a Rust client too.
    let id = add["id"].as_str().unwrap();
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(format!("celery-task-meta-{id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(stored[0] & 0xf0 == 0x80 || stored[0] == 0xde, "{stored:?}");
    let rust = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap();
    let meta = rust.backend().get(id).await.unwrap().unwrap();
    assert_eq!((meta.status, meta.result), (TaskState::Success, json!(42)));
    rust.broker().delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_with_the_rpc_backend_gets_results_from_a_rust_worker() {
    let queue = common::unique_queue("rpcresults");
    let worker = common::WorkerProcess::spawn(&queue, &[("RESULT_BACKEND", "rpc://")]);
    worker.ready().await;
    let base = json!({"broker": py_broker(), "backend": "rpc://", "queue": queue});
    let with = |extra: Value| merged(&base, extra);
    let (add, packed, failure) = tokio::join!(
        python_client(with(json!({"task": "diag.add", "args": [2, 3]}))),
        python_client(with(
            json!({"task": "diag.echo", "kwargs": {"value": {"a": [1, 2.5, null]}}, "serializer": "msgpack"})
        )),
        python_client(with(
            json!({"task": "diag.fail", "args": ["card declined: 5051"]})
        )),
    );
    assert_eq!(add["state"], "SUCCESS", "{add}");
    assert_eq!(add["result"], 5);
    assert_eq!(packed["result"], json!({"a": [1, 2.5, null]}), "{packed}");
    assert_eq!(failure["state"], "FAILURE", "{failure}");
    assert_eq!(failure["exc_type"], "ValueError");
    assert_eq!(failure["exc_message"], "card declined: 5051");
    // Nothing was stored in Redis: the replies went to the clients' own queues.
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stored: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("celery-task-meta-{}", add["id"].as_str().unwrap()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, None);
    let log = worker.log_text();
    assert!(!log.contains("result dropped"), "{log}");
    let rust = Client::connect(&common::amqp_url(), "rpc://")
        .await
        .unwrap();
    rust.broker().delete_queue(&queue).await.unwrap();
}
