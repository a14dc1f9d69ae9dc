//! A real browser: headless Chromium (the Debian package, driven through chromedriver by
//! `tests/browser/walk.py` with Selenium from `.venv`) opens the dashboard, the task list, a
//! search, a failed task, retries it through the form and sees the retry succeed, then the
//! workers, queues and audit pages, against a monitor serving HTTP on a real port over the real
//! services. The screenshots land in `target/screenshots/monitor/` for a reviewer.

mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use monitor::Monitor;
use support::{TestWorker, eventually};
use task_core::{Task, TaskContext, TaskError};

static FIXED: AtomicBool = AtomicBool::new(false);

/// Fails until [`FIXED`], as a task whose dependency is down.
#[derive(Debug, Clone, Copy)]
struct UntilFixed;

impl Task for UntilFixed {
    const NAME: &'static str = "test.until_fixed";
    type Args = (u32,);
    type Output = String;

    async fn run(&self, _ctx: TaskContext, (n,): (u32,)) -> Result<String, TaskError> {
        if FIXED.load(Ordering::SeqCst) {
            Ok(format!("ok {n}"))
        } else {
            Err(TaskError::abort(
                "ConnectionError",
                "the ledger is unreachable",
            ))
        }
    }
}

fn screenshots() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| support::workspace_root().join("target"))
        .join("screenshots")
        .join("monitor")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_walks_the_pages_and_retries_a_failed_task() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = monitor.router();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    let queue = format!("test.{}", support::unique("monitor-browser"));
    let worker = TestWorker::start_with(&queue, 2, |r| {
        r.register(UntilFixed);
    })
    .await;
    let client = support::client(&queue).await;
    let ok = client
        .send_task(
            "diag.add",
            vec![serde_json::json!(2), serde_json::json!(3)],
            Default::default(),
        )
        .send()
        .await
        .unwrap();
    ok.get(Duration::from_secs(30)).await.unwrap();
    let failed = client.task::<UntilFixed>((7,)).send().await.unwrap();
    assert!(failed.get(Duration::from_secs(30)).await.is_err());
    let router = monitor.router();
    eventually(
        "the failure in the store",
        Duration::from_secs(30),
        || async {
            let (_, page) =
                support::call(&router, "GET", &format!("/task/{}", failed.id()), "").await;
            page.contains("Retry under a new id").then_some(())
        },
    )
    .await;
    FIXED.store(true, Ordering::SeqCst);

    let out = screenshots();
    let _ = std::fs::remove_dir_all(&out);
    let python = support::workspace_root().join(".venv/bin/python");
    let script = support::workspace_root().join("monitor/tests/browser/walk.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .arg(&out)
        .arg(failed.id())
        .arg(&worker.hostname)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser walk finishes")
        .unwrap_or_else(|e| panic!("{} (run scripts/python-venv): {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    if !output.status.success() {
        // Printed last and without a backtrace after it, so that the step that failed ends
        // the test's output (CI shows the tail).
        eprintln!("the walk failed:\n{stdout}\n{stderr}");
        std::panic::resume_unwind(Box::new("the browser walk failed (its output is above)"));
    }
    for name in [
        "01-dashboard",
        "02-tasks",
        "03-tasks-search",
        "04-task-failed",
        "05-task-retried",
        "06-workers",
        "07-queues",
        "08-audit",
    ] {
        let png = std::fs::read(out.join(format!("{name}.png")))
            .unwrap_or_else(|e| panic!("{name}.png: {e}"));
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{name}.png is not a page"
        );
    }
    assert!(
        stdout.contains(&format!("retried {} as ", failed.id())),
        "{stdout}"
    );
    println!("screenshots in {}", out.display());

    let _ = stop.send(());
    let _ = server.await;
    worker.stop().await;
    monitor.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    support::drop_database(&db).await;
}
