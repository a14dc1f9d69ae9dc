//! The `monitor` binary: it creates its database, serves the probes and the API, stops on
//! SIGTERM, and refuses a non-loopback address without authentication.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::eventually;
use tokio::process::Command;

fn monitor_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_monitor"));
    cmd.env("BROKER_URL", support::amqp_url())
        .env("RESULT_BACKEND", support::redis_url())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_creates_its_database_serves_and_stops_on_sigterm() {
    let (db_name, db_url) = support::fresh_database();
    let queue = format!("test.monitor.events-{}", uuid::Uuid::new_v4().simple());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("monitor-{}.log", uuid::Uuid::new_v4().simple()));
    let mut child = monitor_command()
        .env("MONITOR_BIND", format!("127.0.0.1:{port}"))
        .env("MONITOR_DATABASE_URL", &db_url)
        .env("MONITOR_EVENTS_QUEUE", &queue)
        .env("MONITOR_EVENTS_QUEUE_EXPIRES", "10m")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .expect("start the monitor binary");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ready = eventually(
        "the binary to answer /readyz with 200",
        Duration::from_secs(60),
        || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "monitor exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let request = http.get(format!("{base}/readyz")).send();
            async move {
                let r = request.await.ok()?;
                (r.status() == 200).then_some(r.text().await.ok()?)
            }
        },
    )
    .await;
    assert!(ready.contains(r#""intake":"ok""#), "{ready}");
    let tasks = http
        .get(format!("{base}/api/tasks?limit=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(tasks.status(), 200);

    let pid = child.id().expect("a pid").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the monitor stops within 30 s of SIGTERM")
        .unwrap();
    assert!(
        status.success(),
        "exit status {status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    support::delete_queue(&queue).await;
    support::drop_database(&db_name).await;
}

#[tokio::test]
async fn a_public_address_without_authentication_is_refused_and_says_why() {
    let out = monitor_command()
        .env("MONITOR_BIND", "0.0.0.0:0")
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "MONITOR_BIND 0.0.0.0:0 is not a loopback address and no authentication is configured"
        ),
        "{stderr}"
    );
}
