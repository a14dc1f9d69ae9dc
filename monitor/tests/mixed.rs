//! A mixed fleet: a Python Celery worker (`examples/python/py_worker.py`, prefork-free `solo`
//! pool, `-E`) and a Rust worker. Their tasks appear side by side in `/api/tasks` with the right
//! states, and both workers in `/api/workers?status=1`. Celery sends its task events as
//! `task.multi` lists, so this is also the intake reading real Celery batches.

mod support;

use std::process::Stdio;
use std::time::Duration;

use monitor::Monitor;
use serde_json::json;
use support::{TestWorker, eventually, get_json};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_rust_tasks_appear_side_by_side() {
    let python = std::env::var("INTEROP_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| support::workspace_root().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/test",
        python.display()
    );
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let py_queue = format!("test.{}", support::unique("monitor-py"));
    let rs_queue = format!("test.{}", support::unique("monitor-rs"));
    let py_node = format!("{}@test", support::unique("py"));
    let log = std::env::temp_dir().join(format!("py-worker-{}.log", uuid::Uuid::new_v4()));
    let mut py_worker = Command::new(&python)
        .args([
            "-m",
            "celery",
            "-A",
            "py_worker",
            "worker",
            "--pool",
            "solo",
            "-E",
        ])
        .args(["--loglevel", "INFO", "-Q", &py_queue, "-n", &py_node])
        .current_dir(support::workspace_root().join("examples/python"))
        .env("BROKER_URL", support::amqp_url().replace("/%2f", "//"))
        .env("RESULT_BACKEND", support::redis_url())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python worker");
    let rs_worker = TestWorker::start(&rs_queue, 2).await;
    eventually(
        "the Python worker to be ready",
        Duration::from_secs(60),
        || {
            if let Ok(Some(status)) = py_worker.try_wait() {
                panic!(
                    "the Python worker exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let ready = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("{py_node} ready"));
            async move { ready.then_some(()) }
        },
    )
    .await;

    let client = support::client(&rs_queue).await;
    let py_ok = client
        .send_task("py.mul", vec![json!(6), json!(7)], Default::default())
        .queue(&py_queue)
        .send()
        .await
        .unwrap();
    let py_bad = client
        .send_task("py.fail", vec![json!("python says no")], Default::default())
        .queue(&py_queue)
        .send()
        .await
        .unwrap();
    let rs_ok = client
        .send_task("diag.add", vec![json!(2), json!(3)], Default::default())
        .send()
        .await
        .unwrap();
    assert_eq!(py_ok.get(Duration::from_secs(60)).await.unwrap(), json!(42));
    assert!(py_bad.get(Duration::from_secs(60)).await.is_err());
    assert_eq!(rs_ok.get(Duration::from_secs(60)).await.unwrap(), json!(5));

    let tasks = eventually(
        "the three tasks in /api/tasks",
        Duration::from_secs(30),
        || async {
            let t = get_json(&router, "/api/tasks?limit=1000").await;
            (t[py_ok.id()]["state"] == "SUCCESS"
                && t[py_bad.id()]["state"] == "FAILURE"
                && t[rs_ok.id()]["state"] == "SUCCESS")
                .then_some(t)
        },
    )
    .await;
    let (ok, bad, rs) = (&tasks[py_ok.id()], &tasks[py_bad.id()], &tasks[rs_ok.id()]);
    assert_eq!(
        (ok["name"].as_str(), ok["worker"].as_str()),
        (Some("py.mul"), Some(py_node.as_str())),
        "{ok}"
    );
    assert_eq!(ok["result"], "42", "{ok}");
    assert_eq!(ok["args"], "(6, 7)", "{ok}");
    assert!(
        bad["exception"]
            .as_str()
            .is_some_and(|e| e.contains("python says no")),
        "{bad}"
    );
    assert!(
        bad["traceback"]
            .as_str()
            .is_some_and(|t| t.contains("Traceback")),
        "{bad}"
    );
    assert_eq!(rs["worker"], rs_worker.hostname.as_str(), "{rs}");

    let status = eventually("both workers online", Duration::from_secs(30), || async {
        let s = get_json(&router, "/api/workers?status=1").await;
        (s[&py_node] == json!(true) && s[&rs_worker.hostname] == json!(true)).then_some(s)
    })
    .await;
    assert_eq!(status[&py_node], json!(true));
    let sw: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT hostname, sw_ident FROM workers WHERE hostname = ANY($1) ORDER BY sw_ident",
    )
    .bind(vec![py_node.clone(), rs_worker.hostname.clone()])
    .fetch_all(monitor.state().store().pool())
    .await
    .unwrap();
    assert_eq!(
        sw.iter().map(|(_, s)| s.as_deref()).collect::<Vec<_>>(),
        vec![Some("py-celery"), Some("rs-task-core")],
        "{sw:?}"
    );

    let _ = py_worker.kill().await;
    rs_worker.stop().await;
    monitor.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    use task_core::Broker;
    for q in [&py_queue, &rs_queue] {
        let _ = client.broker().delete_queue(q).await;
    }
    support::drop_database(&db).await;
}
