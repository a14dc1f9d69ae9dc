//! Interop with the real Python `celery` package (from PyPI, in the test virtualenv).

mod common;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use task_core::{Broker, Client, Error, TaskState};

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
    let with = |extra: Value| {
        let mut cfg = base.clone();
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        cfg
    };

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
