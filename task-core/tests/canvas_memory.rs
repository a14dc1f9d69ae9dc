//! The canvas on the in-memory broker and backend: chains, callbacks, errbacks, groups and
//! chords run by an in-process worker, with no services.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use task_core::canvas::{Signature, chain, chord, group};
use task_core::{Client, MemoryBackend, MemoryBroker, ResultBackend, TaskState};

const Q: &str = "celery";
const WAIT: Duration = Duration::from_secs(10);

fn sig(task: &str, args: Value) -> Signature {
    Signature::new(task).args(args.as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canvases_run_on_the_memory_backend() {
    let (broker, backend) = (MemoryBroker::new(), MemoryBackend::new());
    let client = Client::new(broker.clone(), backend.clone());
    let worker = common::RunningWorker::start(
        common::config(Q),
        common::diag_registry(),
        broker,
        backend.clone(),
    );

    let c = chain([
        sig("diag.add", json!([1, 2])),
        sig("diag.add", json!([10])),
        sig("diag.echo", json!(["fixed"])).immutable(),
    ]);
    let tail = client.apply(&c).await.unwrap();
    assert_eq!(tail.get(WAIT).await.unwrap(), "fixed");
    let tail_meta = tail.meta().await.unwrap().unwrap();
    let middle = backend
        .get(tail_meta.parent_id.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(middle.result, 13, "3 prepended to (10,)");

    let failing = sig("diag.fail", json!(["no"])).link_error(sig("diag.echo", json!([])));
    let failed = client.apply(&failing).await.unwrap();
    assert!(failed.get(WAIT).await.is_err());
    let echoed = common::eventually("the errback", WAIT, || {
        let backend = backend.clone();
        let id = failed.id().to_owned();
        async move {
            backend
                .snapshot()
                .into_values()
                .find(|m| m.parent_id.as_deref() == Some(id.as_str()))
        }
    })
    .await;
    assert_eq!(echoed.status, TaskState::Success);
    assert_eq!(echoed.result, json!(failed.id()), "errbacks get (task_id,)");

    let g = client
        .apply_group(&group((0..5).map(|i| sig("diag.add", json!([i, i])))))
        .await
        .unwrap();
    assert_eq!(
        g.get(WAIT).await.unwrap(),
        (0..5).map(|i| json!(2 * i)).collect::<Vec<_>>()
    );

    let header: Vec<Signature> = (0..50).map(|i| sig("diag.add", json!([i, 1]))).collect();
    let body = client
        .apply(&chord(header, sig("diag.echo", json!([]))))
        .await
        .unwrap();
    assert_eq!(
        body.get(WAIT).await.unwrap(),
        Value::Array((0..50).map(|i| json!(i + 1)).collect())
    );
    worker.stop().await;
}
