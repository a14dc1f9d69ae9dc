//! A real Prometheus (Debian's, from `scripts/prometheus`) scrapes a worker, a scheduler and a
//! monitor on loopback, configured as `deploy/prometheus/prometheus.yml` configures it (same job
//! names), and its query API agrees with the work done.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::{Child, Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A port nothing listens on now (bound and released: the process started next takes it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(bin: PathBuf, args: &[String], env: &[(&str, String)], log: &std::path::Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()))
}

async fn get_json(url: &str) -> Option<Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

/// Polls `check` every 250 ms until it gives `Some`, failing with `what` after `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The value of an instant query's single series (None while it has none).
async fn query(prom: &str, promql: &str) -> Option<f64> {
    let url = format!("{prom}/api/v1/query?query={}", url_escape(promql));
    let body = get_json(&url).await?;
    let series = body["data"]["result"].as_array()?;
    let first = series.first()?;
    first["value"][1].as_str()?.parse().ok()
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_worker_scheduler_and_monitor_and_counts_the_work() {
    let prometheus = std::process::Command::new(root().join("scripts/prometheus"))
        .output()
        .expect("scripts/prometheus");
    assert!(
        prometheus.status.success(),
        "scripts/prometheus: {}",
        String::from_utf8_lossy(&prometheus.stderr)
    );
    let prometheus = PathBuf::from(String::from_utf8(prometheus.stdout).unwrap().trim());

    let amqp = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let redis = env_or("REDIS_URL", "redis://127.0.0.1:6379/0");
    let pg = env_or(
        "PG_ADMIN_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("test.prometheus.{id}");
    let db = format!("prometheus_{id}");
    let admin = sqlx::PgPool::connect(&pg).await.expect("PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await
        .unwrap();
    let monitor_db = pg.rsplit_once('/').unwrap().0.to_owned() + "/" + &db;

    let dir = std::env::temp_dir().join(format!("prometheus-test-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (worker_port, beat_port, monitor_port, prom_port) =
        (free_port(), free_port(), free_port(), free_port());
    let schedule = dir.join("schedule.toml");
    std::fs::write(
        &schedule,
        format!(
            "[[entry]]\nname = \"prometheus.add\"\ntask = \"diag.add\"\nevery = \"1s\"\n\
             queue = \"{queue}\"\nargs = [1, 2]\n"
        ),
    )
    .unwrap();
    let common = [
        ("BROKER_URL", amqp.clone()),
        ("RESULT_BACKEND", redis.clone()),
        ("LOG_FORMAT", "json".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ];
    let with = |extra: &[(&'static str, String)]| {
        let mut v: Vec<(&str, String)> = common.to_vec();
        v.extend(extra.iter().cloned());
        v
    };
    let _worker = spawn(
        examples::built_binary("worker").unwrap(),
        &[],
        &with(&[
            ("WORKER_QUEUES", queue.clone()),
            ("WORKER_TASKS", "diag".to_owned()),
            ("WORKER_HOSTNAME", format!("prom-{id}@%h")),
            ("WORKER_SEND_TASK_EVENTS", "true".to_owned()),
            ("METRICS_BIND", format!("127.0.0.1:{worker_port}")),
        ]),
        &dir.join("worker.log"),
    );
    let _scheduler = spawn(
        examples::built_binary("scheduler").unwrap(),
        &[],
        &with(&[
            ("SCHEDULE_FILE", schedule.display().to_string()),
            ("SCHEDULER_KEY_PREFIX", format!("test-{id}:beat:")),
            ("METRICS_BIND", format!("127.0.0.1:{beat_port}")),
        ]),
        &dir.join("scheduler.log"),
    );
    let _monitor = spawn(
        examples::built_binary("monitor").unwrap(),
        &[],
        &with(&[
            ("MONITOR_BIND", format!("127.0.0.1:{monitor_port}")),
            ("MONITOR_DATABASE_URL", monitor_db.clone()),
            (
                "MONITOR_EVENTS_QUEUE",
                format!("test.prometheus.events.{id}"),
            ),
            ("MONITOR_ALLOW_UNAUTHENTICATED", "true".to_owned()),
        ]),
        &dir.join("monitor.log"),
    );

    // The job names of deploy/prometheus/prometheus.yml, scraped every second here.
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
             \x20 - job_name: worker\n    static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]\n\
             \x20 - job_name: scheduler\n    static_configs: [{{targets: ['127.0.0.1:{beat_port}']}}]\n\
             \x20 - job_name: monitor\n    static_configs: [{{targets: ['127.0.0.1:{monitor_port}']}}]\n"
        ),
    )
    .unwrap();
    // Prometheus takes its settings as flags.
    let _prometheus = spawn(
        prometheus,
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        &[],
        &dir.join("prometheus.log"),
    );
    let prom = format!("http://127.0.0.1:{prom_port}");

    let last = std::sync::Mutex::new(Value::Null);
    let targets = tokio::time::timeout(
        Duration::from_secs(60),
        eventually("every target up", Duration::from_secs(120), || async {
            let body = get_json(&format!("{prom}/api/v1/targets")).await?;
            let active = body["data"]["activeTargets"].as_array()?.clone();
            *last.lock().unwrap() = Value::Array(active.clone());
            (active.len() == 3 && active.iter().all(|t| t["health"] == "up")).then_some(active)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("not every target up after 60 s: {}", last.lock().unwrap()));
    for t in &targets {
        println!(
            "target {} {} up, last scrape {} s",
            t["labels"]["job"], t["scrapeUrl"], t["lastScrapeDuration"]
        );
    }

    // The beat sends diag.add every second; the worker runs them. Prometheus's counters must
    // agree with the results stored for those runs.
    let fired = eventually(
        "ten ticks fired and run",
        Duration::from_secs(90),
        || async {
            let fired = query(
                &prom,
                "sum({__name__=~\"(tq_)?beat_ticks_fired_total\", job=\"scheduler\"})",
            )
            .await?;
            let done = query(
            &prom,
            "sum(tq_tasks_completed_total{job=\"worker\", task=\"diag.add\", outcome=\"success\"})",
        )
        .await?;
            (fired >= 10.0 && done >= 10.0).then_some((fired, done))
        },
    )
    .await;
    println!(
        "Prometheus: beat ticks fired {}, worker completions {}",
        fired.0, fired.1
    );
    // Every tick became one completion (a scrape may see the worker a tick behind the beat).
    assert!(
        (fired.0 - fired.1).abs() <= 2.0,
        "ticks {} against completions {}",
        fired.0,
        fired.1
    );
    let up = query(&prom, "sum(up)").await.unwrap();
    assert_eq!(up, 3.0);
    let monitor_seen = eventually(
        "the monitor's completions in Prometheus",
        Duration::from_secs(60),
        || async {
            let v = query(
                &prom,
                "sum({__name__=~\"tq_monitor_tasks_completed(_total)?\", job=\"monitor\"})",
            )
            .await?;
            (v >= 5.0).then_some(v)
        },
    )
    .await;
    println!("Prometheus: monitor counted {monitor_seen} completions from events");

    // Every metric a rule or dashboard names is in the live expositions of the programs.
    let check = std::process::Command::new(root().join("deploy/check-metrics"))
        .args([
            "--scrape",
            &format!("worker=http://127.0.0.1:{worker_port}/metrics"),
            "--scrape",
            &format!("scheduler=http://127.0.0.1:{beat_port}/metrics"),
            "--scrape",
            &format!("monitor=http://127.0.0.1:{monitor_port}/metrics"),
        ])
        .output()
        .expect("run deploy/check-metrics");
    let report = String::from_utf8_lossy(&check.stdout);
    println!("{}", report.trim());
    assert!(
        check.status.success(),
        "deploy/check-metrics --scrape:\n{report}"
    );

    drop((_worker, _scheduler, _monitor, _prometheus));
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
