//! The real `celery inspect` and `celery control` (Python, from PyPI) against a Rust worker: what
//! an operator of a Celery fleet types, answered and acted on.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use task_core::{Broker, Client, TaskState};

fn py_broker() -> String {
    // kombu spells the default vhost `//`.
    common::amqp_url().replace("/%2f", "//")
}

/// Runs `celery <args…>` against the test broker and backend; returns its stdout.
async fn celery(args: &[&str]) -> String {
    let out = tokio::process::Command::new(common::python())
        .args(["-m", "celery", "-b", &py_broker(), "--result-backend"])
        .arg(common::redis_url())
        .args(args)
        .output()
        .await
        .expect("run celery");
    assert!(
        out.status.success(),
        "celery {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `celery inspect <method> [args] -d node -j`: the node's reply.
async fn inspect(node: &str, method: &str, args: &[&str]) -> Value {
    let mut argv = vec!["inspect", method];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["-d", node, "-j", "-t", "5"]);
    let out = celery(&argv).await;
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("inspect {method}: not JSON ({e}): {out}"));
    v[node].clone()
}

/// `celery control <method> [args] -d node -j`: the node's reply.
async fn control(node: &str, method: &str, args: &[&str]) -> Value {
    let mut argv = vec!["control", method];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["-d", node, "-j", "-t", "5"]);
    let out = celery(&argv).await;
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("control {method}: not JSON ({e}): {out}"));
    // `control` prints a list of {node: reply}.
    v.as_array()
        .and_then(|a| a.iter().find_map(|r| r.get(node).cloned()))
        .unwrap_or_else(|| panic!("no reply from {node} to {method}: {v}"))
}

fn node_name(prefix: &str) -> String {
    format!("{prefix}-{}@test", uuid::Uuid::new_v4().simple())
}

async fn state_of(client: &Client, id: &str) -> TaskState {
    client.result::<Value>(id.to_owned()).state().await.unwrap()
}

async fn wait_state(client: &Client, id: &str, want: TaskState, within: Duration) {
    common::eventually(&format!("task {id} to be {want}"), within, || async {
        (state_of(client, id).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_inspect_and_control_see_and_steer_a_rust_worker() {
    let queue = common::unique_queue("inspect");
    let other = common::unique_queue("inspect-added");
    let node = node_name("rs");
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let mut worker = common::WorkerProcess::spawn(
        &queue,
        &[
            ("WORKER_HOSTNAME", node.as_str()),
            ("WORKER_CONCURRENCY", "2"),
            ("WORKER_PREFETCH", "8"),
            ("COORDINATION_PREFIX", prefix.as_str()),
        ],
    );
    worker.ready().await;
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue);

    // ping, stats, registered, active_queues.
    assert_eq!(inspect(&node, "ping", &[]).await, json!({"ok": "pong"}));
    let stats = inspect(&node, "stats", &[]).await;
    assert_eq!(stats["pool"]["max-concurrency"], json!(2), "{stats}");
    assert_eq!(stats["prefetch_count"], json!(8), "{stats}");
    assert_eq!(stats["broker"]["transport"], "amqp", "{stats}");
    assert!(stats["total"].is_object(), "{stats}");
    let registered = inspect(&node, "registered", &[]).await;
    for name in ["diag.add", "diag.sleep", "diag.fail", "diag.echo"] {
        assert!(
            registered.as_array().unwrap().contains(&json!(name)),
            "{registered}"
        );
    }
    let queues = inspect(&node, "active_queues", &[]).await;
    assert_eq!(queues[0]["name"], json!(queue), "{queues}");

    // Two long tasks fill the pool; a third waits in `reserved`.
    let sleep = |ms: u64| {
        client
            .send_task("diag.sleep", vec![json!(ms)], Default::default())
            .send()
    };
    let long1 = sleep(60_000).await.unwrap();
    // Long enough to outlast the CLI calls below (each a Python start-up, over a second on a
    // loaded machine): `waiting` must still be reserved when it is inspected and revoked.
    let long2 = sleep(15_000).await.unwrap();
    let waiting = client
        .send_task("diag.add", vec![json!(1), json!(2)], Default::default())
        .send()
        .await
        .unwrap();
    let active = common::eventually("two active tasks", Duration::from_secs(20), || async {
        let a = inspect(&node, "active", &[]).await;
        (a.as_array().map(Vec::len) == Some(2)).then_some(a)
    })
    .await;
    let ids: Vec<&str> = active
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&long1.id()) && ids.contains(&long2.id()),
        "{active}"
    );
    let one = active
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == long1.id())
        .unwrap();
    assert_eq!(one["name"], "diag.sleep");
    assert_eq!(one["args"], "(60000,)");
    assert_eq!(one["hostname"], json!(node));
    assert!(one["time_start"].as_f64().unwrap() > 0.0);
    let reserved = inspect(&node, "reserved", &[]).await;
    assert_eq!(reserved[0]["id"], json!(waiting.id()), "{reserved}");
    let q = inspect(&node, "query_task", &[waiting.id()]).await;
    assert_eq!(q[waiting.id()][0], "reserved", "{q}");
    let q = inspect(&node, "query_task", &[long1.id()]).await;
    assert_eq!(q[long1.id()][0], "active", "{q}");

    // `revoke` before it starts: it is never run.
    let r = control(&node, "revoke", &[waiting.id()]).await;
    assert!(r["ok"].as_str().unwrap().contains("revoked"), "{r}");
    let revoked = inspect(&node, "revoked", &[]).await;
    assert!(
        revoked.as_array().unwrap().contains(&json!(waiting.id())),
        "{revoked}"
    );
    // `terminate` (what `revoke --terminate` sends) stops the running one.
    let r = control(&node, "terminate", &["SIGTERM", long1.id()]).await;
    assert!(r["ok"].as_str().unwrap().contains("revoked"), "{r}");
    wait_state(
        &client,
        long1.id(),
        TaskState::Revoked,
        Duration::from_secs(10),
    )
    .await;
    wait_state(
        &client,
        waiting.id(),
        TaskState::Revoked,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        long2.get(Duration::from_secs(40)).await.unwrap(),
        json!(15_000)
    );
    let meta = client
        .result::<Value>(long1.id().to_owned())
        .meta()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        meta.exception_info().unwrap().exc_type,
        "TaskRevokedError",
        "{meta:?}"
    );

    // Python's `app.control.revoke(id, terminate=True)` (what Flower sends) stops a running one.
    let long3 = sleep(60_000).await.unwrap();
    common::eventually(
        "the third sleep to start",
        Duration::from_secs(20),
        || async {
            let a = inspect(&node, "active", &[]).await;
            a.as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == long3.id())
                .then_some(())
        },
    )
    .await;
    let script = format!(
        "from celery import Celery; app = Celery(broker={:?}); \
         app.control.revoke({:?}, terminate=True, destination=[{:?}])",
        py_broker(),
        long3.id(),
        node
    );
    let out = tokio::process::Command::new(common::python())
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_state(
        &client,
        long3.id(),
        TaskState::Revoked,
        Duration::from_secs(10),
    )
    .await;

    // `rate_limit`: 4 starts per second spaces five echoes over at least a second.
    let r = control(&node, "rate_limit", &["diag.echo", "4/s"]).await;
    assert_eq!(r, json!({"ok": "new rate limit set successfully"}));
    let started = std::time::Instant::now();
    let mut echoes = Vec::new();
    for i in 0..5 {
        echoes.push(
            client
                .send_task("diag.echo", vec![json!(i)], Default::default())
                .send()
                .await
                .unwrap(),
        );
    }
    for e in echoes {
        e.get(Duration::from_secs(20)).await.unwrap();
    }
    let spread = started.elapsed();
    assert!(
        spread >= Duration::from_millis(900),
        "five echoes at 4/s finished in {spread:?}"
    );
    let r = control(&node, "rate_limit", &["diag.nope", "4/s"]).await;
    assert_eq!(r, json!({"error": "unknown task"}));

    // `pool_grow`: the pool and the prefetch window follow.
    let r = control(&node, "pool_grow", &["2"]).await;
    assert_eq!(r, json!({"ok": "pool will grow"}));
    let stats = inspect(&node, "stats", &[]).await;
    assert_eq!(stats["pool"]["max-concurrency"], json!(4), "{stats}");
    assert_eq!(stats["prefetch_count"], json!(16), "{stats}");
    let total = &stats["total"];
    assert_eq!(total["diag.echo"], json!(5), "{stats}");

    // `add_consumer`: a task sent to the new queue runs.
    let r = control(&node, "add_consumer", &[&other]).await;
    assert_eq!(r, json!({"ok": format!("add consumer {other}")}));
    let added = client
        .send_task("diag.add", vec![json!(20), json!(22)], Default::default())
        .queue(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(added.get(Duration::from_secs(20)).await.unwrap(), json!(42));
    let queues = inspect(&node, "active_queues", &[]).await;
    let names: Vec<&Value> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| &q["name"])
        .collect();
    assert!(names.contains(&&json!(other)), "{queues}");

    // An unknown command answers with an error; `shutdown` stops the worker gracefully.
    let r = control(&node, "election", &[]).await;
    assert!(r["error"].is_string(), "{r}");
    let r = control(&node, "shutdown", &[]).await;
    assert_eq!(r, json!({"ok": "shutting down"}));
    let status = tokio::time::timeout(Duration::from_secs(30), worker.child.wait())
        .await
        .expect("the worker exits after a remote shutdown")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        worker
            .log_text()
            .contains("shutdown requested by remote control")
    );

    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_queue(&other).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_survives_a_worker_restart_and_a_delay_hop() {
    let queue = common::unique_queue("revoke");
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let env = [("COORDINATION_PREFIX", prefix.as_str())];
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue);
    let first = common::WorkerProcess::spawn(&queue, &env);
    first.ready().await;
    // Due in 4 s: the worker hands it to the broker's delay queues at once.
    let delayed = client
        .send_task("diag.add", vec![json!(1), json!(1)], Default::default())
        .countdown(Duration::from_secs(4))
        .send()
        .await
        .unwrap();
    let control_node = first_node(&first).await;
    let r = control(&control_node, "revoke", &[delayed.id()]).await;
    assert!(r["ok"].is_string(), "{r}");
    first.signal("TERM");
    drop(first);

    // A worker started after the revoke (a new process) still refuses it when it comes back.
    let second = common::WorkerProcess::spawn(&queue, &env);
    second.ready().await;
    wait_state(
        &client,
        delayed.id(),
        TaskState::Revoked,
        Duration::from_secs(30),
    )
    .await;
    let node = first_node(&second).await;
    let revoked = inspect(&node, "revoked", &[]).await;
    assert!(
        revoked.as_array().unwrap().contains(&json!(delayed.id())),
        "{revoked}"
    );

    // A REVOKED written by anyone is final: a later SUCCESS does not replace it.
    let mut meta = client
        .result::<Value>(delayed.id().to_owned())
        .meta()
        .await
        .unwrap()
        .unwrap();
    meta.status = TaskState::Success;
    meta.result = json!(2);
    task_core::ResultBackend::store(client.backend(), &meta)
        .await
        .unwrap();
    assert_eq!(state_of(&client, delayed.id()).await, TaskState::Revoked);

    // Revoked through the client API while no worker is up: the stored copy reaches the next.
    drop(second);
    let later = client
        .send_task("diag.add", vec![json!(2), json!(2)], Default::default())
        .send()
        .await
        .unwrap();
    let coordinator = task_core::coord::Coordinator::connect(&common::redis_url())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    client
        .revoke_in(
            &coordinator,
            &[later.id().to_owned()],
            false,
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let third = common::WorkerProcess::spawn(&queue, &env);
    third.ready().await;
    wait_state(
        &client,
        later.id(),
        TaskState::Revoked,
        Duration::from_secs(20),
    )
    .await;
    drop(third);
    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    broker.delete_queue(&queue).await.unwrap();
}

/// The node name a worker logged at start-up.
async fn first_node(worker: &common::WorkerProcess) -> String {
    common::eventually(
        "the worker's node name",
        Duration::from_secs(10),
        || async {
            worker.log_text().lines().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["message"] == "worker ready")
                    .then(|| v["hostname"].as_str().map(str::to_owned))?
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_the_default_name_on_one_host_get_distinct_names() {
    let queue = common::unique_queue("names");
    let node = node_name("same");
    let a = common::WorkerProcess::spawn(&queue, &[("WORKER_HOSTNAME", node.as_str())]);
    a.ready().await;
    // The second is started with the same explicit name: it keeps it and warns.
    let b = common::WorkerProcess::spawn(&queue, &[("WORKER_HOSTNAME", node.as_str())]);
    b.ready().await;
    assert!(
        b.log_text().contains("is already using this mailbox"),
        "{}",
        b.log_text()
    );
    drop(b);
    // Without an explicit name, a clash on the default name is resolved with the pid.
    let default_name = format!("celery@{}", task_core::hostname());
    let c = common::WorkerProcess::spawn(&queue, &[]);
    c.ready().await;
    let d = common::WorkerProcess::spawn(&queue, &[]);
    d.ready().await;
    let (name_c, name_d) = (first_node(&c).await, first_node(&d).await);
    assert_ne!(name_c, name_d, "two default-named workers share a name");
    assert!(
        [&name_c, &name_d].contains(&&default_name) || name_c.starts_with("celery-"),
        "{name_c} {name_d}"
    );
    let replies = celery(&[
        "inspect",
        "ping",
        "-d",
        &format!("{name_c},{name_d}"),
        "-j",
        "-t",
        "5",
    ])
    .await;
    let v: Value = serde_json::from_str(replies.trim()).unwrap();
    assert_eq!(v[&name_c], json!({"ok": "pong"}), "{v}");
    assert_eq!(v[&name_d], json!({"ok": "pong"}), "{v}");
    drop((a, c, d));
    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    broker.delete_queue(&queue).await.unwrap();
}
