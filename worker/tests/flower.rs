//! The real Flower (Python, from PyPI) watching and steering a Rust worker, and the real
//! `celery inspect` reaching Python and Rust workers with one broadcast: the Celery events and
//! remote control of the Rust worker are what these tools expect (reference
//! `celery-protocol.md` §4 and §6).
//!
//! Other tests share the broker, so every assertion picks out this test's node names and task ids.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value, json};
use task_core::{Broker, Client, TaskState};
use tokio::process::{Child, Command};

fn py_broker() -> String {
    // kombu spells the default vhost `//`.
    common::amqp_url().replace("/%2f", "//")
}

fn node_name(prefix: &str) -> String {
    format!("{prefix}-{}@test", uuid::Uuid::new_v4().simple())
}

/// A Flower process on a free local port, killed when dropped.
struct Flower {
    child: Child,
    base: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Flower {
    /// Starts Flower and waits until it answers `/healthcheck`. Its event receiver comes up with
    /// it; [`Flower::wait_online`] confirms that events from a given worker arrive.
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let log =
            std::env::temp_dir().join(format!("flower-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("flower log file");
        let child = Command::new(common::python())
            .args(["-m", "celery", "-b", &py_broker(), "--result-backend"])
            .arg(common::redis_url())
            .args(["flower", "--address=127.0.0.1", &format!("--port={port}")])
            // Flower reads `flowerconfig.py` from its working directory: give it none.
            .current_dir(std::env::temp_dir())
            // Flower 2.x refuses /api/* without auth unless this is set.
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("start flower");
        let mut flower = Flower {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("http client"),
        };
        common::eventually(
            "Flower to answer /healthcheck",
            Duration::from_secs(60),
            || {
                if let Ok(Some(status)) = flower.child.try_wait() {
                    panic!("flower exited with {status}: {}", flower.log_text());
                }
                let request = flower.http.get(format!("{}/healthcheck", flower.base));
                async move {
                    let response = request.send().await.ok()?;
                    (response.status().is_success() && response.text().await.ok()? == "OK")
                        .then_some(())
                }
            },
        )
        .await;
        flower
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path`: the body of a 2xx reply, `None` otherwise (for polls: a busy Flower may answer
    /// 503 while its inspect of the workers fails).
    async fn try_get(&self, path: &str) -> Option<String> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    }

    async fn try_get_json(&self, path: &str) -> Option<Value> {
        serde_json::from_str(&self.try_get(path).await?).ok()
    }

    async fn post_json(&self, path: &str) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .body("")
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status();
        let body = response.text().await.expect("a text body");
        assert!(status.is_success(), "POST {path}: {status}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {body}"))
    }

    /// Waits until Flower's event state holds `node` as alive (its heartbeats reach Flower).
    async fn wait_online(&self, node: &str) {
        common::eventually(
            &format!("Flower to see {node} online from its events"),
            Duration::from_secs(30),
            || async {
                let status = self.try_get_json("/api/workers?status=1").await?;
                (status[node] == json!(true)).then_some(())
            },
        )
        .await;
    }

    /// Waits until Flower knows task `id` in `state` (from events) and returns its record.
    async fn wait_task(&self, id: &str, state: &str) -> Value {
        common::eventually(
            &format!("Flower to show task {id} as {state}"),
            Duration::from_secs(30),
            || async {
                let task = self.try_get_json(&format!("/api/task/info/{id}")).await?;
                (task["state"] == state).then_some(task)
            },
        )
        .await
    }
}

/// The samples of `metric` in Prometheus text, as (labels, value).
fn samples(text: &str, metric: &str) -> Vec<(Map<String, Value>, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|pair| {
                    let (k, v) = pair.split_once("=\"")?;
                    Some((k.to_owned(), Value::from(v.trim_end_matches('"'))))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_shows_and_revokes_rust_tasks() {
    let queue = common::unique_queue("flower");
    let node = node_name("rs");
    // Events reach Flower only once its receiver is up: Flower first, then the worker.
    let flower = Flower::start().await;
    let worker = common::WorkerProcess::spawn(
        &queue,
        &[
            ("WORKER_HOSTNAME", node.as_str()),
            ("WORKER_SEND_TASK_EVENTS", "true"),
            ("WORKER_CONCURRENCY", "1"),
        ],
    );
    worker.ready().await;
    flower.wait_online(&node).await;

    // 1. The worker page's data: stats and registered tasks from remote control.
    let info = common::eventually(
        "Flower to inspect the Rust worker (stats and registered)",
        Duration::from_secs(30),
        || async {
            let workers = flower.try_get_json("/api/workers?refresh=1").await?;
            let info = workers.get(&node)?;
            (info["stats"].is_object() && info["registered"].is_array()).then(|| info.clone())
        },
    )
    .await;
    let stats = &info["stats"];
    assert_eq!(stats["pool"]["max-concurrency"], json!(1), "{stats}");
    assert_eq!(stats["broker"]["transport"], "amqp", "{stats}");
    assert!(stats["broker"]["hostname"].is_string(), "{stats}");
    assert!(stats["total"].is_object(), "{stats}");
    let registered = info["registered"].as_array().unwrap();
    assert!(
        registered.iter().any(|t| t == "diag.add"),
        "registered: {registered:?}"
    );
    assert!(
        info["active_queues"]
            .as_array()
            .is_some_and(|qs| qs.iter().any(|q| q["name"] == queue.as_str())),
        "active_queues: {}",
        info["active_queues"]
    );

    // A finished Rust task, as the task list shows it.
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue);
    let add = client
        .send_task("diag.add", vec![json!(2), json!(3)], Default::default())
        .send()
        .await
        .unwrap();
    assert_eq!(add.get(Duration::from_secs(30)).await.unwrap(), json!(5));
    let task = common::eventually(
        "GET /api/tasks to list the finished diag.add",
        Duration::from_secs(30),
        || async {
            let tasks = flower.try_get_json("/api/tasks").await?;
            let task = tasks.get(add.id())?;
            (task["state"] == "SUCCESS").then(|| task.clone())
        },
    )
    .await;
    assert_eq!(task["name"], "diag.add", "{task}");
    assert_eq!(task["args"], "(2, 3)", "{task}");
    assert_eq!(task["kwargs"], "{}", "{task}");
    assert_eq!(task["result"], "5", "{task}");
    assert_eq!(task["worker"], node.as_str(), "{task}");
    assert!(
        task["runtime"].as_f64().is_some_and(|r| r >= 0.0),
        "runtime: {task}"
    );

    // 2. Revoke through Flower a task waiting behind a busy slot.
    let sleep = client
        .send_task("diag.sleep", Vec::new(), json_map(json!({"ms": 4000})))
        .send()
        .await
        .unwrap();
    flower.wait_task(sleep.id(), "STARTED").await;
    let waiting = client
        .send_task("diag.add", vec![json!(20), json!(22)], Default::default())
        .send()
        .await
        .unwrap();
    flower.wait_task(waiting.id(), "RECEIVED").await;
    let reply = flower
        .post_json(&format!("/api/task/revoke/{}", waiting.id()))
        .await;
    assert_eq!(
        reply["message"],
        format!("Revoked '{}'", waiting.id()),
        "{reply}"
    );
    common::eventually(
        "the revoked task's result to be REVOKED",
        Duration::from_secs(30),
        || async { (waiting.state().await.unwrap() == TaskState::Revoked).then_some(()) },
    )
    .await;
    let meta = waiting.meta().await.unwrap().expect("a stored result");
    assert_eq!(meta.status, TaskState::Revoked, "{meta:?}");
    assert!(
        sleep.get(Duration::from_secs(30)).await.is_ok(),
        "the sleep ran to the end"
    );
    let revoked = flower.wait_task(waiting.id(), "REVOKED").await;
    assert_eq!(
        revoked["started"],
        Value::Null,
        "a revoked waiting task never starts: {revoked}"
    );
    assert_eq!(
        waiting.state().await.unwrap(),
        TaskState::Revoked,
        "it never ran"
    );

    // 3. Flower's Prometheus metrics count the Rust events.
    let succeeded = common::eventually(
        "flower_events_total to count the Rust diag.add",
        Duration::from_secs(30),
        || async {
            let text = flower.try_get("/metrics").await?;
            samples(&text, "flower_events_total")
                .into_iter()
                .find(|(labels, _)| {
                    labels.get("task") == Some(&json!("diag.add"))
                        && labels.get("type") == Some(&json!("task-succeeded"))
                        && labels.get("worker") == Some(&json!(node))
                })
                .map(|(_, value)| value)
        },
    )
    .await;
    assert!(succeeded >= 1.0, "flower_events_total = {succeeded}");
    let text = flower.try_get("/metrics").await.expect("GET /metrics");
    let online = samples(&text, "flower_worker_online")
        .into_iter()
        .find(|(labels, _)| labels.get("worker") == Some(&json!(node)))
        .map(|(_, v)| v);
    assert_eq!(online, Some(1.0), "flower_worker_online for {node}");

    drop(worker);
    drop(flower);
    client.broker().delete_queue(&queue).await.unwrap();
}

fn json_map(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

/// Runs `celery inspect ping` to `nodes` once and returns its JSON reply (empty when none replied).
async fn inspect_ping(nodes: &[&str]) -> Map<String, Value> {
    let out = Command::new(common::python())
        .args(["-m", "celery", "-b", &py_broker(), "inspect", "ping", "-d"])
        .arg(nodes.join(","))
        .args(["-j", "-t", "5"])
        .output()
        .await
        .expect("run celery inspect ping");
    let stdout = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<Value>(stdout.trim()) {
        Ok(Value::Object(replies)) => replies,
        _ => {
            assert!(
                !out.status.success(),
                "unexpected output of inspect ping: {stdout}"
            );
            Map::new()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_inspect_ping_reaches_python_and_rust_workers() {
    let py_queue = common::unique_queue("ping-py");
    let rs_queue = common::unique_queue("ping-rs");
    let py_node = node_name("py");
    let rs_node = node_name("rs");
    let py_log = std::env::temp_dir().join(format!("py-worker-{}.log", uuid::Uuid::new_v4()));
    let mut py_worker = Command::new(common::python())
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
            &py_queue,
            "-n",
            &py_node,
        ])
        .current_dir(common::workspace_root().join("examples/python"))
        .env("BROKER_URL", py_broker())
        .env("RESULT_BACKEND", common::redis_url())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(&py_log).expect("python worker log"),
        ))
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python worker");
    let rs_worker =
        common::WorkerProcess::spawn(&rs_queue, &[("WORKER_HOSTNAME", rs_node.as_str())]);
    rs_worker.ready().await;
    common::eventually(
        "the Python worker to be ready",
        Duration::from_secs(60),
        || {
            if let Ok(Some(status)) = py_worker.try_wait() {
                panic!(
                    "the Python worker exited with {status}: {}",
                    std::fs::read_to_string(&py_log).unwrap_or_default()
                );
            }
            let log = std::fs::read_to_string(&py_log).unwrap_or_default();
            let ready = log.contains(&format!("{py_node} ready"));
            async move { ready.then_some(()) }
        },
    )
    .await;

    // Each attempt is one broadcast; a retry covers a mailbox still being declared.
    let mut attempts = 0;
    let replies = common::eventually(
        "one inspect ping answered by both workers",
        Duration::from_secs(45),
        || {
            attempts += 1;
            async {
                let replies = inspect_ping(&[&py_node, &rs_node]).await;
                (replies.contains_key(&py_node) && replies.contains_key(&rs_node))
                    .then_some(replies)
            }
        },
    )
    .await;
    assert_eq!(replies[&py_node], json!({"ok": "pong"}), "{replies:?}");
    assert_eq!(replies[&rs_node], json!({"ok": "pong"}), "{replies:?}");
    assert_eq!(
        replies.len(),
        2,
        "only the two named nodes answer: {replies:?}"
    );
    eprintln!("inspect ping: {replies:?} after {attempts} broadcast(s)");

    let _ = py_worker.kill().await;
    drop(rs_worker);
    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    broker.delete_queue(&py_queue).await.unwrap();
    broker.delete_queue(&rs_queue).await.unwrap();
}
