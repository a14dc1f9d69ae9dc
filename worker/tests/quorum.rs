//! Quorum task queues with the worker process: declared from `BROKER_QUEUE_TYPE`, consumed with
//! per-consumer windows, and reached by Celery's own native delayed delivery.

mod common;

use std::time::Duration;

use serde_json::Value;

/// The bindings of `queue`, from the management API.
async fn bindings(queue: &str) -> Vec<Value> {
    let found = common::management_get(15672, &format!("queues/%2F/{queue}/bindings"))
        .await
        .expect("the management API answers (scripts/services enables it)");
    serde_json::from_value(found).unwrap()
}

/// A Celery 5.5 client configured for quorum queues sends a countdown through
/// `celery_delayed_27`; only a Rust worker consumes the queue, and it runs the task once the
/// countdown is over. The Python side's own declaration of the delay levels agrees with the one
/// the Rust worker made first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_countdown_to_a_quorum_queue_goes_through_celerys_delay_levels() {
    let queue = common::unique_queue("quorum-countdown");
    let worker = common::WorkerProcess::spawn(&queue, &[("BROKER_QUEUE_TYPE", "quorum")]);
    worker.ready().await;
    let from_celery = common::eventually(
        "the queue bound to celery_delayed_delivery",
        Duration::from_secs(30),
        || async {
            bindings(&queue)
                .await
                .into_iter()
                .find(|b| b["source"] == "celery_delayed_delivery")
        },
    )
    .await;
    println!("binding: {from_celery}");
    assert!(
        from_celery["routing_key"]
            .as_str()
            .unwrap()
            .ends_with(&format!("*.{queue}"))
    );

    let script = common::workspace_root().join("worker/tests/python/quorum_countdown.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(common::python())
            .arg(&script)
            .arg(common::amqp_url())
            .arg(common::redis_url())
            .arg(&queue)
            .arg("3")
            .output(),
    )
    .await
    .expect("the Python client finishes")
    .unwrap();
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("python countdown: {report}");
    assert_eq!(report["result"], 5);
    let seconds = report["seconds"].as_f64().unwrap();
    assert!(seconds >= 2.9, "ran {seconds:.2} s after a 3 s countdown");
    drop(worker);
    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    task_core::Broker::delete_queue(&broker, &queue)
        .await
        .unwrap();
}
