//! The Redis result backend against the real server, in Celery's format.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::json;
use task_core::backend::{ExceptionInfo, StoreOutcome, meta_key};
use task_core::{Error, ResultBackend, TaskMeta, TaskState};

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_publishes_the_same_bytes_and_sets_a_ttl() {
    let backend = common::redis().await.with_ttl(Duration::from_secs(120));
    let task_id = id();
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(meta_key(&task_id)).await.unwrap();

    let meta = TaskMeta::new(&task_id, TaskState::Success, json!({"sum": 5}));
    assert_eq!(backend.store(&meta).await.unwrap(), StoreOutcome::Stored);

    let msg = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    let published: Vec<u8> = msg.get_payload().unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stored: Vec<u8> = conn.get(meta_key(&task_id)).await.unwrap();
    assert_eq!(published, stored);
    let ttl: i64 = conn.ttl(meta_key(&task_id)).await.unwrap();
    assert!((100..=120).contains(&ttl), "ttl {ttl}");

    // Celery's field names and order.
    let text = String::from_utf8(stored).unwrap();
    assert!(
        text.starts_with(
            r#"{"status":"SUCCESS","result":{"sum":5},"traceback":null,"children":[],"date_done":""#
        ),
        "{text}"
    );
    assert!(
        text.ends_with(&format!(r#""task_id":"{task_id}"}}"#)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_is_never_overwritten() {
    let backend = common::redis().await;
    let task_id = id();
    backend
        .store(&TaskMeta::new(&task_id, TaskState::Started, json!(null)))
        .await
        .unwrap();
    backend
        .store(&TaskMeta::new(&task_id, TaskState::Success, json!(1)))
        .await
        .unwrap();
    let failure = TaskMeta::exception(
        &task_id,
        TaskState::Failure,
        &ExceptionInfo::new("builtins", "ValueError", "late"),
    );
    assert_eq!(
        backend.store(&failure).await.unwrap(),
        StoreOutcome::KeptSuccess
    );
    let meta = backend.get(&task_id).await.unwrap().unwrap();
    assert_eq!((meta.status, meta.result), (TaskState::Success, json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_results_are_stored_read_and_never_overwritten_by_json_ones() {
    use task_core::protocol::ContentType;
    let msgpack = common::redis().await.with_serializer(ContentType::Msgpack);
    let json_backend = common::redis().await;
    let task_id = id();
    msgpack
        .store(&TaskMeta::new(
            &task_id,
            TaskState::Success,
            json!({"sum": 5}),
        ))
        .await
        .unwrap();
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stored: Vec<u8> = conn.get(meta_key(&task_id)).await.unwrap();
    // A msgpack map (fixmap 0x80–0x8f, map16 0xde), as Celery's `result_serializer='msgpack'`.
    assert!(stored[0] & 0xf0 == 0x80 || stored[0] == 0xde, "{stored:?}");
    // The write-once rule reads msgpack too: a JSON FAILURE from another worker changes nothing.
    let failure = TaskMeta::exception(
        &task_id,
        TaskState::Failure,
        &ExceptionInfo::new("builtins", "ValueError", "late"),
    );
    assert_eq!(
        json_backend.store(&failure).await.unwrap(),
        StoreOutcome::KeptSuccess
    );
    for b in [&msgpack, &json_backend] {
        let meta = b.get(&task_id).await.unwrap().unwrap();
        assert_eq!(
            (meta.status, meta.result),
            (TaskState::Success, json!({"sum": 5}))
        );
    }
    // Group results and chord parts are written with the serializer and read in either form.
    let group = id();
    msgpack
        .save_group(&group, &json!([[["a", null], null]]))
        .await
        .unwrap();
    assert_eq!(
        json_backend.restore_group(&group).await.unwrap(),
        Some(json!([[["a", null], null]]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_sees_a_later_store_and_times_out_otherwise() {
    let backend = common::redis().await;
    let task_id = id();
    let writer = backend.clone();
    let tid = task_id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        writer
            .store(&TaskMeta::new(&tid, TaskState::Retry, json!(null)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        writer
            .store(&TaskMeta::new(&tid, TaskState::Success, json!("done")))
            .await
            .unwrap();
    });
    let started = std::time::Instant::now();
    let meta = backend
        .wait(&task_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(meta.result, json!("done"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "woken by the publish, not by polling late"
    );

    match backend.wait(&id(), Duration::from_millis(300)).await {
        Err(Error::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(
        backend.get(&id()).await.unwrap(),
        None,
        "unknown ids read as PENDING"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_written_by_python_celery_reads_back() {
    let backend = common::redis().await;
    let task_id = id();
    let python = format!(
        r#"{{"status": "FAILURE", "result": {{"exc_type": "ValueError", "exc_message": ["bad value", 7], "exc_module": "builtins"}}, "traceback": "Traceback (most recent call last):\n  ...", "children": [], "date_done": "2026-11-27T11:05:46.374650+00:00", "name": "tasks.add", "args": [2, 3], "kwargs": {{}}, "worker": "w1@research", "retries": 0, "queue": "celery", "task_id": "{task_id}"}}"#
    );
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = conn.set_ex(meta_key(&task_id), python, 60).await.unwrap();
    let meta = backend.get(&task_id).await.unwrap().unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    let exc = meta.exception_info().unwrap();
    assert_eq!(exc.exc_message, vec![json!("bad value"), json!(7)]);
    assert_eq!(
        meta.date_done.unwrap().to_rfc3339(),
        "2026-11-27T11:05:46.374650+00:00"
    );
    assert_eq!(meta.worker.as_deref(), Some("w1@research"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_state_from_python_is_read_and_waited_past() {
    let backend = common::redis().await;
    let task_id = id();
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // What Python's `self.update_state(state='PROGRESS', meta={'done': 3})` stores.
    let progress = json!({"status": "PROGRESS", "result": {"done": 3}, "traceback": null,
        "children": [], "date_done": null, "task_id": task_id});
    let _: () = conn
        .set_ex(meta_key(&task_id), progress.to_string(), 60)
        .await
        .unwrap();
    let meta = backend.get(&task_id).await.unwrap().unwrap();
    assert_eq!(meta.status, TaskState::Custom);
    assert!(!meta.status.is_ready());
    assert_eq!(meta.result, json!({"done": 3}));
    let waiter = {
        let backend = backend.clone();
        let task_id = task_id.clone();
        tokio::spawn(async move { backend.wait(&task_id, Duration::from_secs(10)).await })
    };
    backend
        .store(&TaskMeta::new(&task_id, TaskState::Success, json!(7)))
        .await
        .unwrap();
    let done = waiter.await.unwrap().unwrap();
    assert_eq!((done.status, done.result), (TaskState::Success, json!(7)));
}

/// Header tasks finishing at once on many workers: exactly one of them gets to fire the body,
/// with every result in header order, and a redelivered copy neither counts twice nor fires it
/// again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_completes_once_under_concurrent_parts() {
    use task_core::backend::{ChordPart, ChordProgress};
    let backend = common::redis().await.with_ttl(Duration::from_secs(120));
    let gid = id();
    let n = 200;
    backend.set_chord_size(&gid, n).await.unwrap();
    let ids: Vec<String> = (0..n).map(|_| id()).collect();
    let parts = (0..n as usize).flat_map(|i| [i, i]).map(|i| {
        let (backend, gid, tid) = (backend.clone(), gid.clone(), ids[i].clone());
        tokio::spawn(async move {
            let result = json!(i);
            let part = ChordPart {
                group_id: &gid,
                task_id: &tid,
                group_index: Some(i as i64),
                state: TaskState::Success,
                result: &result,
                fallback_size: None,
            };
            backend.chord_part_return(&part).await.unwrap()
        })
    });
    let mut complete = Vec::new();
    for p in parts.collect::<Vec<_>>() {
        if let ChordProgress::Complete { members, claim } = p.await.unwrap() {
            complete.push((members, claim));
        }
    }
    assert_eq!(complete.len(), 1, "one caller fires the body");
    let (members, claim) = complete.pop().unwrap();
    let results: Vec<_> = members.iter().map(|m| m.result.clone()).collect();
    assert_eq!(results, (0..n).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(backend.chord_cleanup(&gid, &claim).await.unwrap());
    let late = json!(0);
    let again = ChordPart {
        group_id: &gid,
        task_id: &ids[0],
        group_index: Some(0),
        state: TaskState::Success,
        result: &late,
        fallback_size: None,
    };
    assert_eq!(
        backend.chord_part_return(&again).await.unwrap(),
        ChordProgress::AlreadyDone
    );
    let mut conn = redis::Client::open(common::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let left: i64 = conn
        .exists(format!("celery-taskset-meta-{gid}.j"))
        .await
        .unwrap();
    assert_eq!(left, 0);
    let _: () = conn
        .del(format!("celery-taskset-meta-{gid}.c"))
        .await
        .unwrap();
}
