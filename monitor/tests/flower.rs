//! The same fleet watched by the real Flower (2.2, from the virtualenv) and by our monitor: the
//! same requests answer JSON with the same keys (and the same values where both know them), so
//! scripts written for Flower's API work against the monitor unchanged.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use axum::Router;
use monitor::Monitor;
use serde_json::{Value, json};
use support::{TestWorker, eventually, get_json};
use tokio::process::{Child, Command};

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("INTEROP_PYTHON") {
        return p.into();
    }
    let p = support::workspace_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/test (it creates the virtualenv with celery and flower)",
        p.display()
    );
    p
}

/// A Flower process on a free local port, killed when dropped.
struct Flower {
    child: Child,
    base: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Flower {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let log =
            std::env::temp_dir().join(format!("flower-{}.log", uuid::Uuid::new_v4().simple()));
        let child = Command::new(python())
            // kombu spells the default vhost `//`.
            .args([
                "-m",
                "celery",
                "-b",
                &support::amqp_url().replace("/%2f", "//"),
            ])
            .args(["--result-backend", &support::redis_url()])
            .args(["flower", "--address=127.0.0.1", &format!("--port={port}")])
            // Flower reads `flowerconfig.py` from its working directory: give it none.
            .current_dir(std::env::temp_dir())
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&log).expect("flower log"),
            ))
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
                .unwrap(),
        };
        eventually(
            "Flower to answer /healthcheck",
            Duration::from_secs(60),
            || {
                if let Ok(Some(status)) = flower.child.try_wait() {
                    panic!(
                        "flower exited with {status}: {}",
                        std::fs::read_to_string(&flower.log).unwrap_or_default()
                    );
                }
                let request = flower.http.get(format!("{}/healthcheck", flower.base));
                async move {
                    let r = request.send().await.ok()?;
                    (r.status().is_success() && r.text().await.ok()? == "OK").then_some(())
                }
            },
        )
        .await;
        flower
    }

    /// The JSON of a 2xx answer, `None` otherwise (a busy Flower may answer 503 while an
    /// inspect fails).
    async fn try_json(&self, method: &str, path: &str, body: &str) -> Option<Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "POST" => self.http.post(url).body(body.to_owned()),
            _ => self.http.get(url),
        };
        let response = request.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        serde_json::from_str(&response.text().await.ok()?).ok()
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn assert_same_keys(what: &str, flower: &Value, ours: &Value) {
    let (f, o) = (keys(flower), keys(ours));
    eprintln!("{what}: {} keys on both sides", f.len());
    assert_eq!(
        f,
        o,
        "{what}: keys differ\n only Flower: {:?}\n only ours: {:?}\n Flower: {flower}\n ours: {ours}",
        f.difference(&o).collect::<Vec<_>>(),
        o.difference(&f).collect::<Vec<_>>()
    );
}

async fn ours_until(router: &Router, what: &str, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
    eventually(what, Duration::from_secs(30), || async {
        let v = get_json(router, path).await;
        ok(&v).then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_and_the_monitor_answer_the_same_keys_for_the_same_fleet() {
    // Both receivers first, then the worker: its events reach both.
    let flower = Flower::start().await;
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-flower"));
    let worker = TestWorker::start(&queue, 2).await;
    let node = worker.hostname.clone();
    eventually(
        "Flower to see the worker online",
        Duration::from_secs(30),
        || async {
            let s = flower.try_json("GET", "/api/workers?status=1", "").await?;
            (s[&node] == json!(true)).then_some(())
        },
    )
    .await;

    let client = support::client(&queue).await;
    let add = client
        .send_task("diag.add", vec![json!(2), json!(3)], Default::default())
        .send()
        .await
        .unwrap();
    let fail = client
        .send_task("diag.fail", vec![json!("no")], Default::default())
        .send()
        .await
        .unwrap();
    add.get(Duration::from_secs(30)).await.unwrap();
    let _ = fail.get(Duration::from_secs(30)).await;

    // GET /api/tasks and /api/task/info/<id>, for a success and a failure.
    let done = |id: &str, state: &'static str| {
        let id = id.to_owned();
        move |v: &Value| v[&id]["state"] == state
    };
    let flower_tasks = eventually(
        "Flower to list both tasks done",
        Duration::from_secs(30),
        || async {
            let v = flower.try_json("GET", "/api/tasks", "").await?;
            (done(add.id(), "SUCCESS")(&v) && done(fail.id(), "FAILURE")(&v)).then_some(v)
        },
    )
    .await;
    let our_tasks = ours_until(
        &router,
        "the monitor to list both tasks done",
        "/api/tasks",
        |v| done(add.id(), "SUCCESS")(v) && done(fail.id(), "FAILURE")(v),
    )
    .await;
    for id in [add.id(), fail.id()] {
        let (f, o) = (&flower_tasks[id], &our_tasks[id]);
        assert_same_keys(&format!("/api/tasks[{id}]"), f, o);
        for key in [
            "uuid",
            "name",
            "state",
            "args",
            "kwargs",
            "result",
            "exception",
            "worker",
            "retries",
            "root_id",
            "parent_id",
        ] {
            assert_eq!(
                f[key], o[key],
                "/api/tasks[{id}].{key}: Flower {f} ours {o}"
            );
        }
        let path = format!("/api/task/info/{id}");
        let f = flower
            .try_json("GET", &path, "")
            .await
            .expect("Flower's task info");
        let o = get_json(&router, &path).await;
        assert_same_keys(&path, &f, &o);
        let path = format!("/api/task/result/{id}");
        let f = flower
            .try_json("GET", &path, "")
            .await
            .expect("Flower's task result");
        let o = get_json(&router, &path).await;
        assert_same_keys(&path, &f, &o);
        assert_eq!(f, o, "{path}");
    }

    // GET /api/workers?refresh=1, then ?refresh=1&workername=<node>, and ?status=1.
    for path in [
        "/api/workers?refresh=1".to_owned(),
        format!("/api/workers?refresh=1&workername={node}"),
    ] {
        let f = eventually(
            &format!("Flower to answer {path}"),
            Duration::from_secs(30),
            || async {
                let v = flower.try_json("GET", &path, "").await?;
                v.get(&node)?.get("stats")?;
                Some(v[&node].clone())
            },
        )
        .await;
        let o = ours_until(
            &router,
            &format!("the monitor to answer {path}"),
            &path,
            |v| v.get(&node).and_then(|n| n.get("stats")).is_some(),
        )
        .await[&node]
            .clone();
        assert_same_keys(&path, &f, &o);
        assert_same_keys(&format!("{path} stats"), &f["stats"], &o["stats"]);
        assert_same_keys(
            &format!("{path} stats.broker"),
            &f["stats"]["broker"],
            &o["stats"]["broker"],
        );
        assert_eq!(f["registered"], o["registered"], "{path} registered");
        assert_eq!(
            f["active_queues"], o["active_queues"],
            "{path} active_queues"
        );
    }
    let f = flower
        .try_json("GET", "/api/workers?status=1", "")
        .await
        .unwrap();
    let o = get_json(&router, "/api/workers?status=1").await;
    assert_eq!((&f[&node], &o[&node]), (&json!(true), &json!(true)));

    // POST /api/task/send-task/<name>: the same reply shape.
    let body = json!({"args": [1, 2], "queue": queue}).to_string();
    let f = flower
        .try_json("POST", "/api/task/send-task/diag.add", &body)
        .await
        .expect("Flower's send-task");
    let o = support::post_json(&router, "/api/task/send-task/diag.add", &body).await;
    assert_same_keys("send-task", &f, &o);
    for reply in [&f, &o] {
        let id = reply["task-id"].as_str().unwrap().to_owned();
        let v: Value = client
            .result(id)
            .get(Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(v, json!(3));
    }

    worker.stop().await;
    monitor.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    use task_core::Broker;
    client.broker().delete_queue(&queue).await.unwrap();
    drop(flower);
    support::drop_database(&db).await;
}
