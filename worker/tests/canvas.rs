//! The canvas with the real Python `celery` 5.7: chains, link/link_error, groups and chords whose
//! tasks run on Rust and Python workers, sent from either side, with results read on both.

mod common;

use std::process::Stdio;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{Map, Value, json};
use task_core::canvas::{GroupResult, Signature, chain, chord, group};
use task_core::protocol::TaskMessage;
use task_core::{AmqpBroker, Broker, Client};

/// Runs `examples/python/canvas.py` with a JSON config and returns its JSON output.
async fn canvas_py(mut cfg: Value) -> Value {
    cfg["broker"] = py_broker().into();
    cfg["backend"] = common::redis_url().into();
    let script = common::workspace_root().join("examples/python/canvas.py");
    let out = tokio::process::Command::new(common::python())
        .arg(script)
        .arg(cfg.to_string())
        .output()
        .await
        .expect("run the Python canvas client");
    assert!(
        out.status.success(),
        "python canvas client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

fn py_broker() -> String {
    // kombu spells the default vhost `//`.
    common::amqp_url().replace("/%2f", "//")
}

/// A Python worker (`examples/python/py_worker.py`, `py.*` tasks) on `queue`.
fn python_worker(queue: &str) -> tokio::process::Child {
    tokio::process::Command::new(common::python())
        .args([
            "-m",
            "celery",
            "-A",
            "py_worker",
            "worker",
            "--pool",
            "solo",
            "--loglevel",
            "WARNING",
            "-Q",
            queue,
            "-n",
            &format!("py-{queue}@%h"),
        ])
        .current_dir(common::workspace_root().join("examples/python"))
        .env("BROKER_URL", py_broker())
        .env("RESULT_BACKEND", common::redis_url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python worker")
}

fn spec(task: &str, args: Value, queue: &str) -> Value {
    json!({"task": task, "args": args, "queue": queue})
}

fn sig(task: &str, args: Value, queue: &str) -> Signature {
    Signature::new(task)
        .args(args.as_array().cloned().unwrap_or_default())
        .queue(queue)
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(common::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The values appended by `py.record` to `key`, once there are at least `n` (then deleted).
async fn recorded(key: &str, n: usize) -> Vec<Value> {
    let conn = redis().await;
    let items = common::eventually(
        &format!("{n} entries in {key}"),
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            async move {
                let items: Vec<String> = conn.lrange(key, 0, -1).await.ok()?;
                (items.len() >= n).then_some(items)
            }
        },
    )
    .await;
    let _: () = conn.clone().del(key).await.unwrap();
    items
        .iter()
        .map(|i| serde_json::from_str(i).unwrap())
        .collect()
}

struct Services {
    rust_queue: String,
    py_queue: String,
    _rust: common::WorkerProcess,
    _py: tokio::process::Child,
    client: Client,
}

impl Services {
    async fn start(name: &str) -> Self {
        let rust_queue = common::unique_queue(&format!("{name}.rs"));
        let py_queue = common::unique_queue(&format!("{name}.py"));
        let node = format!("rs-{rust_queue}@test");
        let rust = common::WorkerProcess::spawn(&rust_queue, &[("WORKER_HOSTNAME", &node)]);
        let py = python_worker(&py_queue);
        rust.ready().await;
        let client = Client::connect(&common::amqp_url(), &common::redis_url())
            .await
            .unwrap();
        Services {
            rust_queue,
            py_queue,
            _rust: rust,
            _py: py,
            client,
        }
    }

    async fn meta(&self, id: &str) -> task_core::TaskMeta {
        let result = self.client.result::<Value>(id);
        result.get(Duration::from_secs(60)).await.ok();
        result.meta().await.unwrap().expect("a stored result")
    }

    async fn stop(self) {
        let Services {
            rust_queue,
            py_queue,
            _rust,
            mut _py,
            client,
        } = self;
        drop(_rust);
        let _ = _py.kill().await;
        for q in [&rust_queue, &py_queue] {
            let _ = client.broker().delete_queue(q).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_chains_run_through_rust_and_python_steps() {
    let s = Services::start("chain").await;
    let (rq, pq) = (s.rust_queue.clone(), s.py_queue.clone());

    // Rust first: without the chain step the Python task is never sent.
    let out = canvas_py(json!({"cmd": "apply", "canvas": {"chain": [
        spec("diag.add", json!([2, 3]), &rq), spec("py.mul", json!([10]), &pq)]}}))
    .await;
    assert_eq!(out["result"], 50, "{out}");
    let first = out["parents"][0].as_str().unwrap();
    let meta = s.meta(first).await;
    assert_eq!(meta.result, 5);
    assert_eq!(
        meta.children,
        json!([[[out["id"], null], null]]),
        "children"
    );
    let last = s.meta(out["id"].as_str().unwrap()).await;
    assert_eq!(last.parent_id.as_deref(), Some(first));
    assert_eq!(
        s.client
            .result::<i64>(out["id"].as_str().unwrap())
            .get(Duration::from_secs(5))
            .await
            .unwrap(),
        50
    );

    // Python first, a Rust step in the middle, an immutable Rust step at the end.
    let out = canvas_py(json!({"cmd": "apply", "canvas": {"chain": [
        spec("py.mul", json!([2, 3]), &pq), spec("diag.add", json!([4]), &rq),
        spec("py.mul", json!([10]), &pq),
        {"task": "diag.echo", "args": ["fixed"], "queue": rq, "immutable": true}]}}))
    .await;
    assert_eq!(out["result"], "fixed", "{out}");
    let parents: Vec<&str> = out["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let (tens, added) = (parents[0], parents[1]);
    assert_eq!(s.meta(added).await.result, 10, "diag.add got py.mul's 6");
    assert_eq!(s.meta(tens).await.result, 100, "py.mul got diag.add's 10");
    assert_eq!(s.meta(tens).await.parent_id.as_deref(), Some(added));
    let tail = s.meta(out["id"].as_str().unwrap()).await;
    assert_eq!(
        tail.args,
        Some(vec![json!("fixed")]),
        "immutable: nothing prepended"
    );
    assert_eq!(tail.parent_id.as_deref(), Some(tens));

    // A group inside the chain (Python makes it a chord with the next step) and a group at the
    // end, both sent on by the Rust worker with its result.
    let out = canvas_py(json!({"cmd": "apply", "canvas": {"chain": [
        spec("diag.add", json!([1, 1]), &rq),
        {"group": [spec("py.mul", json!([3]), &pq), spec("diag.add", json!([5]), &rq)]},
        spec("py.tsum", json!([]), &pq)]}}))
    .await;
    assert_eq!(out["result"], 13, "(2 * 3) + (2 + 5): {out}");
    let out = canvas_py(json!({"cmd": "apply", "canvas": {"chain": [
        spec("diag.add", json!([1, 1]), &rq),
        {"group": [spec("py.mul", json!([3]), &pq), spec("diag.add", json!([5]), &rq)]}]}}))
    .await;
    assert_eq!(out["result"], json!([6, 7]), "{out}");

    // A failure stops the chain and fails what is left of it, as Celery's worker does.
    let out = canvas_py(json!({"cmd": "apply", "timeout": 30, "canvas": {"chain": [
        spec("diag.fail", json!(["no card"]), &rq), spec("py.mul", json!([10]), &pq)]}}))
    .await;
    assert_eq!(out["exc_type"], "ValueError", "{out}");
    assert_eq!(out["exc_message"], "no card");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_and_link_error_fire_from_rust_tasks() {
    let s = Services::start("link").await;
    let (rq, pq) = (s.rust_queue.clone(), s.py_queue.clone());
    let ok_key = format!("canvas.link.ok.{}", uuid::Uuid::new_v4().simple());
    let err_key = format!("canvas.link.err.{}", uuid::Uuid::new_v4().simple());

    let out = canvas_py(
        json!({"cmd": "apply", "canvas": {"task": "diag.add", "args": [1, 2],
        "queue": rq, "link": spec("py.record", json!([ok_key]), &pq)}}),
    )
    .await;
    assert_eq!(out["result"], 3, "{out}");
    assert_eq!(
        recorded(&ok_key, 1).await,
        vec![json!(3)],
        "link gets the result"
    );

    let failed = canvas_py(
        json!({"cmd": "apply", "canvas": {"task": "diag.fail", "args": ["x"],
        "queue": rq, "link_error": spec("py.record", json!([err_key]), &pq),
        "link": spec("py.record", json!([ok_key]), &pq)}}),
    )
    .await;
    assert_eq!(failed["exc_type"], "ValueError", "{failed}");
    assert_eq!(
        recorded(&err_key, 1).await,
        vec![failed["id"].clone()],
        "link_error gets the failed task's id"
    );

    // From the Rust client, two callbacks (sent as one group) and a Rust callback.
    let linked = sig("diag.add", json!([20, 22]), &rq)
        .link(sig("py.record", json!([ok_key]), &pq))
        .link(sig("py.record", json!([ok_key]), &pq));
    let sent = s.client.apply(&linked).await.unwrap();
    assert_eq!(sent.get(Duration::from_secs(30)).await.unwrap(), 42);
    assert_eq!(recorded(&ok_key, 2).await, vec![json!(42), json!(42)]);
    let meta = s.meta(sent.id()).await;
    assert_eq!(
        meta.children.as_array().unwrap().len(),
        1,
        "two callbacks are one group child: {:?}",
        meta.children
    );
    let group_tuple = &meta.children[0];
    assert_eq!(group_tuple[1].as_array().unwrap().len(), 2, "{group_tuple}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chords_mix_rust_and_python_tasks_both_ways() {
    let s = Services::start("chord").await;
    let (rq, pq) = (s.rust_queue.clone(), s.py_queue.clone());

    // Header on both sides, Python body: whichever header task finishes last fires it.
    let out = canvas_py(json!({"cmd": "apply", "canvas": {"chord": {"header": [
        spec("diag.add", json!([1, 1]), &rq), spec("py.add", json!([2, 2]), &pq),
        spec("diag.add", json!([3, 3]), &rq), spec("py.add", json!([4, 4]), &pq)],
        "body": spec("py.tsum", json!([]), &pq)}}}))
    .await;
    assert_eq!(out["result"], 20, "{out}");

    // Rust header, Rust body (results in header order).
    let out = canvas_py(json!({"cmd": "apply", "canvas": {"chord": {"header": [
        spec("diag.add", json!([1, 1]), &rq), spec("diag.add", json!([2, 2]), &rq),
        spec("diag.add", json!([3, 3]), &rq)],
        "body": spec("diag.echo", json!([]), &rq)}}}))
    .await;
    assert_eq!(out["result"], json!([2, 4, 6]), "{out}");

    // Python header, Rust body.
    let out = canvas_py(json!({"cmd": "apply", "canvas": {"chord": {"header": [
        spec("py.add", json!([1, 1]), &pq), spec("py.add", json!([2, 2]), &pq)],
        "body": spec("diag.echo", json!([]), &rq)}}}))
    .await;
    assert_eq!(out["result"], json!([2, 4]), "{out}");
    let body = s.meta(out["id"].as_str().unwrap()).await;
    assert!(
        body.group_id.is_some(),
        "the body carries the chord's group id"
    );

    // Sent from Rust, read from Python.
    let c = chord(
        [
            sig("diag.add", json!([1, 2]), &rq),
            sig("py.add", json!([3, 4]), &pq),
        ],
        sig("py.tsum", json!([]), &pq),
    );
    let sent = s.client.apply(&c).await.unwrap();
    assert_eq!(sent.get(Duration::from_secs(60)).await.unwrap(), 10);
    let seen = canvas_py(json!({"cmd": "get", "ids": [sent.id()]})).await;
    assert_eq!(seen["results"][0]["result"], 10, "{seen}");

    // A failed header task fails the body with ChordError, on the Python side too.
    let out = canvas_py(
        json!({"cmd": "apply", "timeout": 30, "canvas": {"chord": {"header": [
        spec("diag.fail", json!(["bad"]), &rq), spec("diag.add", json!([1, 1]), &rq)],
        "body": spec("diag.echo", json!([]), &rq)}}}),
    )
    .await;
    // Python's `get()` raises the header's own error when it sees it first: it checks the
    // parents before waiting and after each wait. Celery 5.7 skips the wait (and the second
    // check) when the body is already failed as it starts waiting, so a header and body that
    // both failed in the moment between its first check and its first read of the body give
    // the body's ChordError, which names the header's ValueError.
    match out["exc_type"].as_str() {
        Some("ValueError") => {}
        Some("ChordError") => assert!(
            out["exc_message"]
                .as_str()
                .is_some_and(|m| m.contains("ValueError(\"bad\")")),
            "{out}"
        ),
        _ => panic!("neither the header's error nor the chord's: {out}"),
    }
    // ... and the body is stored as FAILURE with Celery's ChordError.
    let body = s.meta(out["id"].as_str().unwrap()).await;
    let exc = body.exception_info().expect("the body failed");
    assert_eq!(
        (exc.exc_module.as_str(), exc.exc_type.as_str()),
        ("celery.exceptions", "ChordError")
    );
    assert!(
        exc.message().starts_with("Dependency ") && exc.message().contains("bad"),
        "{exc}"
    );
    let seen = canvas_py(json!({"cmd": "get", "timeout": 5, "ids": [out["id"]]})).await;
    assert_eq!(seen["results"][0]["exc_type"], "ChordError", "{seen}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_group_results_on_both_sides() {
    let s = Services::start("group").await;
    let (rq, pq) = (s.rust_queue.clone(), s.py_queue.clone());

    let g = group([
        sig("diag.add", json!([1, 1]), &rq),
        sig("py.add", json!([2, 2]), &pq),
        chain([
            sig("diag.add", json!([1, 2]), &rq),
            sig("py.mul", json!([10]), &pq),
        ]),
    ]);
    let sent = s.client.apply_group(&g).await.unwrap();
    assert_eq!(
        sent.get(Duration::from_secs(60)).await.unwrap(),
        vec![json!(2), json!(4), json!(30)]
    );
    sent.save().await.unwrap();
    let restored = canvas_py(json!({"cmd": "restore", "group_id": sent.id()})).await;
    assert_eq!(restored["result"], json!([2, 4, 30]), "{restored}");
    let member = s.meta(sent.results()[0].id()).await;
    assert_eq!(member.group_id.as_deref(), Some(sent.id()));

    // From Rust, a group between two chain steps becomes a chord, as in Python.
    let c = chain([
        sig("diag.add", json!([1, 1]), &rq),
        group([
            sig("py.mul", json!([3]), &pq),
            sig("diag.add", json!([5]), &rq),
        ]),
        sig("py.tsum", json!([]), &pq),
    ]);
    let sent_chain = s.client.apply(&c).await.unwrap();
    assert_eq!(sent_chain.get(Duration::from_secs(60)).await.unwrap(), 13);

    let out = canvas_py(json!({"cmd": "apply", "save": true, "canvas": {"group": [
        spec("diag.add", json!([5, 5]), &rq), spec("py.add", json!([6, 6]), &pq)]}}))
    .await;
    assert_eq!(out["result"], json!([10, 12]), "{out}");
    let theirs = GroupResult::restore(&s.client, out["id"].as_str().unwrap())
        .await
        .unwrap()
        .expect("Python's saved group");
    assert_eq!(
        theirs.get(Duration::from_secs(10)).await.unwrap(),
        vec![json!(10), json!(12)]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_of_1000_rust_tasks_runs_its_body_once() {
    let rq = common::unique_queue("chord1k.rs");
    let pq = common::unique_queue("chord1k.py");
    // Two Rust workers race for the last header tasks.
    let (node_a, node_b) = (format!("rs-a-{rq}@test"), format!("rs-b-{rq}@test"));
    let a = common::WorkerProcess::spawn(&rq, &[("WORKER_HOSTNAME", &node_a)]);
    let b = common::WorkerProcess::spawn(&rq, &[("WORKER_HOSTNAME", &node_b)]);
    let mut py = python_worker(&pq);
    a.ready().await;
    b.ready().await;
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap();
    let key = format!("canvas.chord1k.{}", uuid::Uuid::new_v4().simple());
    let header: Vec<Signature> = (0..1000)
        .map(|i| sig("diag.add", json!([i, i]), &rq))
        .collect();
    let body = sig("py.record", json!([key]), &pq);
    let sent = client.apply(&chord(header, body)).await.unwrap();
    let value = sent.get(Duration::from_secs(240)).await.unwrap();
    let expected: Vec<Value> = (0..1000).map(|i| json!(2 * i)).collect();
    assert_eq!(
        value,
        Value::Array(expected.clone()),
        "results in header order"
    );

    let runs = recorded(&key, 1).await;
    assert_eq!(runs.len(), 1, "the body ran once");
    let fired = [&a, &b]
        .iter()
        .map(|w| {
            w.log_text()
                .matches("chord complete; sending its body")
                .count()
        })
        .sum::<usize>();
    assert_eq!(fired, 1, "one worker, once, sent the body");
    let meta = client
        .result::<Value>(sent.id())
        .meta()
        .await
        .unwrap()
        .unwrap();
    let gid = meta.group_id.expect("the body's group id");
    let mut conn = redis().await;
    // The worker marks the chord done once the body is sent, which may be after the body ran.
    common::eventually(
        "the chord marked done, so no later part can fire it again",
        Duration::from_secs(10),
        || {
            let mut conn = conn.clone();
            let key = format!("celery-taskset-meta-{gid}.c");
            async move {
                let marker: Option<String> = conn.get(key).await.unwrap();
                (marker.as_deref() == Some("done")).then_some(())
            }
        },
    )
    .await;
    let left: i64 = conn
        .exists(format!("celery-taskset-meta-{gid}.j"))
        .await
        .unwrap();
    assert_eq!(left, 0, "the chord's keys are deleted");
    let _: () = conn
        .del(format!("celery-taskset-meta-{gid}.c"))
        .await
        .unwrap();
    let _ = py.kill().await;
    drop((a, b));
    for q in [&rq, &pq] {
        let _ = client.broker().delete_queue(q).await;
    }
}

/// Replaces ids with `<id>` and drops what is per-sender (reply address, origin, language;
/// Python also puts its `reply_to` in frozen signatures, which only its RPC backend reads).
fn normalize(v: &Value) -> Value {
    match v {
        Value::String(s) if uuid::Uuid::parse_str(s).is_ok() => "<id>".into(),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !["reply_to", "origin", "lang"].contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect::<Map<_, _>>(),
        ),
        other => other.clone(),
    }
}

/// The next `n` messages on `queue`, decoded, as `{headers, args, kwargs, embed}`.
async fn take(broker: &AmqpBroker, queue: &str, n: usize) -> Vec<Value> {
    let mut consumer = broker.consume(&[queue.to_owned()], 100).await.unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no message on {queue}"))
            .unwrap();
        let m = TaskMessage::decode(&d.message).unwrap();
        out.push(
            json!({"headers": Value::Object(m.headers.to_map()), "args": m.args,
            "kwargs": m.kwargs, "embed": m.embed}),
        );
        d.ack().await.unwrap();
    }
    consumer.cancel().await;
    out.sort_by_key(|m| m["headers"]["group_index"].as_i64());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_canvas_messages_match_pythons() {
    let broker = AmqpBroker::connect(&common::amqp_url()).await.unwrap();
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap();
    let py_q = common::unique_queue("wire.py");
    let rs_q = common::unique_queue("wire.rs");
    let next_q = "wire.next";
    let cases: Vec<(&str, Value, Signature)> = vec![
        (
            "chain",
            json!({"chain": [spec("diag.add", json!([2, 3]), "@"), spec("py.mul", json!([3]), next_q),
                spec("py.neg", json!([]), next_q)]}),
            chain([
                sig("diag.add", json!([2, 3]), "@"),
                sig("py.mul", json!([3]), next_q),
                sig("py.neg", json!([]), next_q),
            ]),
        ),
        (
            "chord",
            json!({"chord": {"header": [spec("diag.add", json!([1, 1]), "@"), spec("diag.add", json!([2, 2]), "@")],
                "body": spec("py.tsum", json!([]), next_q)}}),
            chord(
                [
                    sig("diag.add", json!([1, 1]), "@"),
                    sig("diag.add", json!([2, 2]), "@"),
                ],
                sig("py.tsum", json!([]), next_q),
            ),
        ),
        (
            "link",
            json!({"task": "diag.add", "args": [1, 2], "queue": "@",
                "link": spec("py.record", json!(["k"]), next_q),
                "link_error": spec("py.record", json!(["e"]), next_q)}),
            sig("diag.add", json!([1, 2]), "@")
                .link(sig("py.record", json!(["k"]), next_q))
                .link_error(sig("py.record", json!(["e"]), next_q)),
        ),
    ];
    for (name, py_canvas, rs_canvas) in cases {
        let py_canvas: Value = serde_json::from_str(
            &py_canvas
                .to_string()
                .replace("\"@\"", &format!("\"{py_q}\"")),
        )
        .unwrap();
        let rs_canvas = Signature::from_value(
            &serde_json::from_str(
                &rs_canvas
                    .to_value()
                    .to_string()
                    .replace("\"@\"", &format!("\"{rs_q}\"")),
            )
            .unwrap(),
        )
        .unwrap();
        let n = if name == "chord" { 2 } else { 1 };
        let sent = canvas_py(json!({"cmd": "apply", "wait": false, "canvas": py_canvas})).await;
        let theirs = take(&broker, &py_q, n).await;
        client.apply(&rs_canvas).await.unwrap();
        let ours = take(&broker, &rs_q, n).await;
        for (t, o) in theirs.iter().zip(&ours) {
            assert_eq!(
                normalize(o),
                normalize(t),
                "{name}: ours vs Python's (sent {sent})"
            );
        }
        if name == "chord" {
            for m in &ours {
                assert_eq!(
                    m["headers"]["group"],
                    m["embed"]["chord"]["options"]["group_id"]
                );
            }
            let mut conn = redis().await;
            for m in theirs.iter().chain(&ours) {
                let gid = m["headers"]["group"].as_str().unwrap();
                let size: Option<i64> = conn
                    .get(format!("celery-taskset-meta-{gid}.s"))
                    .await
                    .unwrap();
                assert_eq!(size, Some(2), "{name}: header size written by the sender");
            }
        }
    }
    for q in [&py_q, &rs_q] {
        let _ = broker.delete_queue(q).await;
    }
}
