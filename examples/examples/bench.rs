//! The task-queue benchmark: one run on the local RabbitMQ and Redis.
//!
//! ```sh
//! cargo build --release -p worker && cargo build --release -p examples --example bench
//! target/release/examples/bench            # or: --tasks 20000 --latency-seconds 10
//! ```
//!
//! 1. The raw broker ceiling with lapin alone: persistent publishes with confirms and a consumer
//!    acknowledging each message, same message size as a task; then the same with one `multiple`
//!    ack per 100 deliveries, the broker's own limit for the worker's way of acknowledging. Both
//!    are measured again after the task runs, and ratios are taken to the mean of the two.
//!    Each is run at every producer window (`--windows`, publishes waiting for their confirms at
//!    once: 100, 300 and 1,000) and its best is taken; so is each task run below.
//! 2. N no-op tasks produced by the client and drained by the `worker` binary with results stored
//!    in Redis: tasks per second (until every result is stored, found by polling), and the ratio
//!    to the raw ceiling. Three modes, each with a fresh worker:
//!    - `plain`: `diag.add`, task events off;
//!    - `events`: `diag.add` with task events on (`WORKER_SEND_TASK_EVENTS=true`);
//!    - `limiter`: `diag.limited(key, 0)` with a distinct key per task, so its limits (one at a
//!      time and 20 starts a second per key) never bind but every task takes the Redis path:
//!      the GCRA rate check, a leased concurrency permit, and its release.
//!
//!    `plain` runs first and again last; a mode's cost is the throughput it loses against the
//!    mean of the two plain runs (the machine is shared, so its load drifts).
//! 3. Enqueue→start latency (p50/p99) of each mode at one paced rate: half the slowest mode's
//!    maximum, so no mode is measured with a backlog, after 200 tasks have warmed the worker
//!    (`--dump-latencies PATH` writes each run's latencies over time). Beside them, the broker
//!    alone at the same rate: lapin's publish→delivery latency, the floor on this machine.
//! 4. The worker's peak RSS, during the plain runs and with 1,000 tasks in flight.
//!
//! Each throughput run and each ceiling also prints the CPU spent per message by the broker
//! (`beam.smp`), the worker, Redis and this bench (the producer), read from `/proc`, and how many
//! of the cores were busy: where the CPU goes, for processes on this host.

use examples::worker_binary;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use task_core::diag::{self, AddArgs, LimitedArgs, SleepArgs};
use task_core::{Broker, Client};
use tokio::sync::Mutex;

/// The queue bench: throughput and latency of the `worker` binary (target/release/worker) on
/// the broker and result backend below; see the module documentation.
#[derive(clap::Parser)]
#[command(name = "bench")]
struct Settings {
    /// Tasks in each throughput run.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Seconds of the fixed-rate latency run.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// The producer's windows: how many publishes may wait for their confirms at once. Every
    /// ceiling and throughput run is measured at each, and its best is taken: the broker alone
    /// does most with many in flight, a task run with fewer.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 300, 1000],
          value_parser = clap::value_parser!(u64).range(1..))]
    windows: Vec<u64>,
    /// The worker's WORKER_CONCURRENCY.
    #[arg(long, default_value_t = 32)]
    concurrency: u32,
    /// The worker's WORKER_PREFETCH.
    #[arg(long, default_value_t = 512)]
    prefetch: u32,
    /// The task modes to measure, comma-separated (`plain` is always run, first and last: the
    /// other modes' costs are taken against it).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Mode::ALL)]
    modes: Vec<Mode>,
    /// Write each latency run's (ms since the run began, enqueue→start ms) pairs to PATH.<mode>,
    /// to see when the slow starts happened.
    #[arg(long, value_name = "PATH")]
    dump_latencies: Option<PathBuf>,
    /// BROKER_URL, RESULT_BACKEND and the queue settings, as the binaries take them.
    #[command(flatten)]
    conn: task_core::cli::ConnectionArgs,
}

/// The `worker` binary next to this one (`target/release/worker`).
struct WorkerProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl WorkerProcess {
    async fn start(
        s: &Settings,
        queue: &str,
        concurrency: u32,
        prefetch: u32,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!(
            "bench-worker-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let child = tokio::process::Command::new(worker_binary()?)
            .env("BROKER_URL", &s.conn.broker_url)
            .env("METRICS_BIND", "127.0.0.1:0")
            .env("RESULT_BACKEND", &s.conn.result_backend)
            .env("WORKER_QUEUES", queue)
            .env("WORKER_TASKS", "diag")
            .env("WORKER_CONCURRENCY", concurrency.to_string())
            .env("WORKER_PREFETCH", prefetch.to_string())
            .env("RUST_LOG", "warn,task_core::worker=info")
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .kill_on_drop(true)
            .spawn()?;
        let w = WorkerProcess { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&w.log)
            .unwrap_or_default()
            .contains("worker ready")
        {
            if Instant::now() > deadline {
                bail!("worker did not start; see {}", w.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(w)
    }

    /// (current, peak) resident set size in MB.
    fn rss_mb(&self) -> (f64, f64) {
        let pid = self.child.id().unwrap_or(0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .unwrap_or(0.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Start times of finished tasks, as announced on Redis pub/sub.
#[derive(Clone, Default)]
struct Finished(Arc<Mutex<HashMap<String, Option<DateTime<Utc>>>>>);

impl Finished {
    async fn listen(backend: &str, pattern: String) -> anyhow::Result<Self> {
        let client = redis::Client::open(backend)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(&pattern).await?;
        let finished = Finished::default();
        let map = finished.0.clone();
        tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let Ok(payload) = msg.get_payload::<Vec<u8>>() else {
                    continue;
                };
                let Some(id) = msg.get_channel_name().strip_prefix("celery-task-meta-") else {
                    continue;
                };
                // Only a latency run's start times are read; elsewhere parsing every result
                // would be the bench's own load on the cores the worker shares.
                let started = if id.contains("-l-") {
                    let Ok(meta) = serde_json::from_slice::<Value>(&payload) else {
                        continue;
                    };
                    if meta["status"] != "SUCCESS" {
                        continue;
                    }
                    meta["date_started"]
                        .as_str()
                        .and_then(task_core::protocol::parse_datetime)
                } else if payload.windows(9).any(|w| w == b"\"SUCCESS\"") {
                    None
                } else {
                    continue;
                };
                map.lock().await.insert(id.to_owned(), started);
            }
        });
        Ok(finished)
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.0.lock().await.len() < n {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} tasks finished within {timeout:?}",
                    self.0.lock().await.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

/// Waits until a result is stored for every id (`EXISTS` over runs of 1,000 keys, in the order
/// they were sent), then checks that every one is a SUCCESS. The throughput runs are timed by
/// this rather than by the pub/sub listener: delivering and reading 10,000 announcements a second
/// would be the bench's own load on the cores the worker shares. Returns when the last result
/// was seen; the check after it is not timed.
async fn wait_stored(
    redis: &mut redis::aio::MultiplexedConnection,
    ids: &[String],
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    let keys: Vec<String> = ids
        .iter()
        .map(|id| format!("celery-task-meta-{id}"))
        .collect();
    let mut done = 0;
    while done < keys.len() {
        let chunk = &keys[done..(done + 1000).min(keys.len())];
        let stored: usize = redis::cmd("EXISTS").arg(chunk).query_async(redis).await?;
        if stored == chunk.len() {
            done += chunk.len();
            continue;
        }
        if Instant::now() > deadline {
            bail!(
                "only about {} of {} tasks finished within {timeout:?}",
                done + stored,
                keys.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let finished = Instant::now();
    for chunk in keys.chunks(1000) {
        let metas: Vec<Vec<u8>> = redis::cmd("MGET").arg(chunk).query_async(redis).await?;
        if let Some(i) = metas
            .iter()
            .position(|m| !m.windows(9).any(|w| w == b"\"SUCCESS\""))
        {
            bail!(
                "{} did not succeed: {}",
                chunk[i],
                String::from_utf8_lossy(&metas[i])
            );
        }
    }
    Ok(finished)
}

/// CPU seconds used so far by the processes of a run on this host: the broker (`beam.smp`),
/// Redis (`redis-server`), the worker and this bench (the producer). A broker or Redis on
/// another host counts as 0.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    broker: f64,
    redis: f64,
    worker: f64,
    bench: f64,
}

impl Cpu {
    fn now(worker: Option<u32>) -> Cpu {
        // utime + stime, in clock ticks (USER_HZ, 100 on Linux).
        let ticks = |stat: &str| -> Option<(String, f64)> {
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            let t = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            Some((stat[open + 1..close].to_owned(), t / 100.0))
        };
        let mut cpu = Cpu::default();
        let me = std::process::id();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Some((name, t)) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .as_deref()
                .and_then(ticks)
            else {
                continue;
            };
            match name.as_str() {
                "beam.smp" => cpu.broker += t,
                "redis-server" => cpu.redis += t,
                _ if pid == me => cpu.bench += t,
                _ if Some(pid) == worker => cpu.worker += t,
                _ => {}
            }
        }
        cpu
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            broker: self.broker - before.broker,
            redis: self.redis - before.redis,
            worker: self.worker - before.worker,
            bench: self.bench - before.bench,
        }
    }

    /// Microseconds of CPU per message, by process, and the cores kept busy over `seconds`.
    fn per_message(self, n: usize, seconds: f64) -> String {
        let us = |t: f64| t / n as f64 * 1e6;
        let total = self.broker + self.redis + self.worker + self.bench;
        format!(
            "CPU per message: broker {:.0} µs, worker {:.0} µs, Redis {:.0} µs, producer (bench) {:.0} µs; \
             {:.0} µs in all, {:.2} cores busy",
            us(self.broker),
            us(self.worker),
            us(self.redis),
            us(self.bench),
            us(total),
            total / seconds
        )
    }
}

/// A fresh durable queue for the raw lapin measurements: a publisher in confirm mode and a
/// consumer (prefetch as the worker's), each on a connection of its own, and the properties the
/// bench's Celery message carries.
struct RawQueue {
    name: String,
    publish: lapin::Channel,
    deliveries: lapin::Consumer,
    props: BasicProperties,
    connections: (Connection, Connection),
}

impl RawQueue {
    async fn open(
        s: &Settings,
        kind: &str,
        message: &task_core::protocol::RawMessage,
    ) -> anyhow::Result<Self> {
        let name = format!("bench.{kind}.{}", uuid::Uuid::new_v4().simple());
        let producer =
            Connection::connect(&s.conn.broker_url, ConnectionProperties::default()).await?;
        let consumer =
            Connection::connect(&s.conn.broker_url, ConnectionProperties::default()).await?;
        let publish = producer.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        publish
            .queue_declare(name.as_str().into(), opts, FieldTable::default())
            .await?;
        let consume = consumer.create_channel().await?;
        consume
            .basic_qos(
                s.prefetch.min(u32::from(u16::MAX)) as u16,
                BasicQosOptions::default(),
            )
            .await?;
        let deliveries = consume
            .basic_consume(
                name.as_str().into(),
                format!("bench-{kind}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let headers = task_core::broker::field_table::json_to_table(&message.headers)?;
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id("00000000-0000-0000-0000-000000000000".into());
        Ok(RawQueue {
            name,
            publish,
            deliveries,
            props,
            connections: (producer, consumer),
        })
    }
}

/// Raw lapin: persistent publishes with confirms, consumed and acknowledged one by one, or with
/// `ack_every` set, one `multiple` ack per that many deliveries (and one for the last), as the
/// worker folds its acknowledgements.
async fn raw_ceiling(
    s: &Settings,
    n: usize,
    message: &task_core::protocol::RawMessage,
    ack_every: Option<usize>,
    window: u64,
) -> anyhow::Result<(f64, String)> {
    let RawQueue {
        name: queue,
        publish,
        mut deliveries,
        props,
        connections: _connections,
    } = RawQueue::open(s, "raw", message).await?;

    let cpu_before = Cpu::now(None);
    let start = Instant::now();
    let drain = tokio::spawn(async move {
        let mut acks = FuturesUnordered::new();
        let mut seen = 0;
        while seen < n {
            tokio::select! {
                Some(d) = deliveries.next() => {
                    let d = d?;
                    seen += 1;
                    match ack_every {
                        None => acks.push(async move { d.acker.ack(BasicAckOptions::default()).await }),
                        // In order: a `multiple` ack sent after a later one finds its tag gone.
                        Some(every) if seen % every == 0 || seen == n => {
                            d.acker.ack(BasicAckOptions { multiple: true }).await?;
                        }
                        Some(_) => {}
                    }
                }
                Some(r) = acks.next(), if !acks.is_empty() => { r?; }
            }
        }
        while let Some(r) = acks.next().await {
            r?;
        }
        Ok::<_, lapin::Error>(())
    });
    let mut confirms = FuturesUnordered::new();
    for _ in 0..n {
        if confirms.len() as u64 >= window {
            confirms.next().await.transpose()?;
        }
        let confirm = publish
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &message.body,
                props.clone(),
            )
            .await?;
        confirms.push(confirm);
    }
    while confirms.next().await.transpose()?.is_some() {}
    drain.await??;
    let seconds = start.elapsed().as_secs_f64();
    let rate = n as f64 / seconds;
    let cpu = Cpu::now(None).since(cpu_before).per_message(n, seconds);
    publish
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok((rate, cpu))
}

/// The broker alone at a paced rate: persistent publishes with confirms at `rate` per second for
/// `seconds`, consumed and acknowledged by lapin on a second connection. The publish→delivery
/// latencies in ms, sorted: the floor under the worker's enqueue→start latency on this machine.
async fn raw_latency(
    s: &Settings,
    message: &task_core::protocol::RawMessage,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<Vec<f64>> {
    let RawQueue {
        name: queue,
        publish,
        mut deliveries,
        props,
        connections: _connections,
    } = RawQueue::open(s, "rawlat", message).await?;
    let count = (rate * seconds as f64) as usize + 200;
    let t0 = Instant::now();
    let drain = tokio::spawn(async move {
        // Each body starts with the sender's nanoseconds since t0; the first 200 warm up.
        let mut latencies = Vec::with_capacity(count);
        for seen in 0..count {
            let Some(d) = deliveries.next().await else {
                break;
            };
            let d = d?;
            let now = t0.elapsed().as_nanos() as u64;
            let sent = u64::from_le_bytes(d.data[..8].try_into().unwrap_or_default());
            if seen >= 200 {
                latencies.push(now.saturating_sub(sent) as f64 / 1e6);
            }
            d.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok::<_, lapin::Error>(latencies)
    });
    let mut confirms = FuturesUnordered::new();
    for i in 0..count {
        let due = t0 + Duration::from_secs_f64(i.saturating_sub(200) as f64 / rate);
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(due - now) => {}
                Some(r) = confirms.next(), if !confirms.is_empty() => { r?; }
            }
        }
        let mut body = (t0.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
        body.extend_from_slice(&message.body);
        let confirm = publish
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await?;
        confirms.push(confirm);
    }
    while confirms.next().await.transpose()?.is_some() {}
    let mut latencies = drain.await??;
    latencies.sort_by(f64::total_cmp);
    publish
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(latencies)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// What the tasks of a run are and how the worker is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// `diag.add`, events off.
    Plain,
    /// `diag.add`, task events on.
    Events,
    /// `diag.limited` with a distinct key per task: the limiter's Redis path, never binding.
    Limiter,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Plain, Mode::Events, Mode::Limiter];

    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Events => "events",
            Mode::Limiter => "limiter",
        }
    }

    fn task(self) -> &'static str {
        match self {
            Mode::Plain | Mode::Events => "diag.add",
            Mode::Limiter => "diag.limited (distinct key, ms 0)",
        }
    }

    /// The largest throughput cost this mode should have against `plain`.
    fn target(self) -> Option<f64> {
        match self {
            Mode::Plain => None,
            Mode::Events => Some(0.15),
            Mode::Limiter => Some(0.25),
        }
    }

    /// Publishes task `i` of this mode with the given id.
    async fn send(self, client: &Client, run: &str, id: String, i: usize) -> anyhow::Result<()> {
        match self {
            Mode::Plain | Mode::Events => {
                client
                    .task::<diag::Add>(AddArgs::new(i as i64, 1))
                    .task_id(id)
                    .send()
                    .await?;
            }
            Mode::Limiter => {
                let args = LimitedArgs {
                    key: format!("bench-{run}-{i}"),
                    ms: 0,
                };
                client
                    .task::<diag::Limited>(args)
                    .task_id(id)
                    .send()
                    .await?;
            }
        }
        Ok(())
    }
}

/// A fresh worker for `mode` on its own queue, and the client sending there.
async fn mode_worker(
    s: &Settings,
    client: &Client,
    run: &str,
    mode: Mode,
    phase: &str,
) -> anyhow::Result<(WorkerProcess, Client, String)> {
    let queue = format!("bench.{}.{phase}.{run}", mode.name());
    let prefix = format!("bench-{run}:");
    let mut env = vec![("COORDINATION_PREFIX", prefix.as_str())];
    if mode == Mode::Events {
        env.push(("WORKER_SEND_TASK_EVENTS", "true"));
    }
    let worker = WorkerProcess::start(s, &queue, s.concurrency, s.prefetch, &env).await?;
    Ok((worker, client.with_default_queue(&queue), queue))
}

/// Drains `s.tasks` tasks of `mode` through a fresh worker as fast as they come: tasks per
/// second and the worker's peak RSS.
async fn throughput(
    s: &Settings,
    client: &Client,
    redis: &mut redis::aio::MultiplexedConnection,
    run: &str,
    mode: Mode,
    round: usize,
    window: u64,
) -> anyhow::Result<(f64, f64, String)> {
    let phase = format!("t{round}w{window}");
    let (worker, client, queue) = mode_worker(s, client, run, mode, &phase).await?;
    let ids: Vec<String> = (0..s.tasks)
        .map(|i| format!("bench-{run}-t-{}-{phase}-{i}", mode.name()))
        .collect();
    let cpu_before = Cpu::now(worker.child.id());
    let start = Instant::now();
    let mut sends = FuturesUnordered::new();
    for (i, id) in ids.iter().enumerate() {
        if sends.len() as u64 >= window {
            sends.next().await.transpose()?;
        }
        sends.push(mode.send(&client, run, id.clone(), i));
    }
    while sends.next().await.transpose()?.is_some() {}
    let finished = wait_stored(redis, &ids, Duration::from_secs(600)).await?;
    let cpu = Cpu::now(worker.child.id()).since(cpu_before);
    let seconds = (finished - start).as_secs_f64();
    let tps = s.tasks as f64 / seconds;
    let (_, peak) = worker.rss_mb();
    worker.stop().await;
    client.broker().delete_queue(&queue).await?;
    Ok((tps, peak, cpu.per_message(s.tasks, seconds)))
}

/// Sends tasks of `mode` at `rate` per second for `s.latency_seconds` to a fresh worker: the
/// enqueue→start latencies in ms, sorted, and the worker's peak RSS.
async fn latency(
    s: &Settings,
    client: &Client,
    finished: &Finished,
    run: &str,
    mode: Mode,
    rate: f64,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let (worker, client, queue) = mode_worker(s, client, run, mode, "l").await?;
    // A warm worker: its connections made, its scripts loaded and its buffers grown, so what is
    // measured is the steady state rather than the first second of a new process.
    let before = finished.0.lock().await.len();
    for i in 0..200 {
        let id = format!("bench-{run}-w-{}-warm-{i}", mode.name());
        mode.send(&client, run, id, i).await?;
    }
    finished
        .wait_for(before + 200, Duration::from_secs(60))
        .await?;
    let before = finished.0.lock().await.len();
    let count = (rate * s.latency_seconds as f64) as usize;
    let mut enqueued = HashMap::with_capacity(count);
    let t0 = Instant::now();
    let mut sends = FuturesUnordered::new();
    for i in 0..count {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(due - now) => {}
                Some(r) = sends.next(), if !sends.is_empty() => { r?; }
            }
        }
        let id = format!("bench-{run}-w-{}-l-{i}", mode.name());
        enqueued.insert(id.clone(), Utc::now());
        sends.push(mode.send(&client, run, id, i));
    }
    while sends.next().await.transpose()?.is_some() {}
    finished
        .wait_for(before + count, Duration::from_secs(600))
        .await?;
    let starts = finished.0.lock().await;
    let mut latencies: Vec<f64> = enqueued
        .iter()
        .filter_map(|(id, sent)| {
            starts
                .get(id)
                .copied()
                .flatten()
                .map(|st| (st - *sent).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        })
        .collect();
    if let Some(path) = &s.dump_latencies {
        let mut rows: Vec<(f64, f64)> = enqueued
            .iter()
            .filter_map(|(id, sent)| {
                let st = starts.get(id).copied().flatten()?;
                Some((
                    (*sent - enqueued.values().min().copied()?).num_microseconds()? as f64 / 1e3,
                    (st - *sent).num_microseconds()? as f64 / 1e3,
                ))
            })
            .collect();
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let text: String = rows
            .iter()
            .map(|(a, b)| format!("{a:.1} {b:.2}\n"))
            .collect();
        std::fs::write(format!("{}.{}", path.display(), mode.name()), text)?;
    }
    drop(starts);
    latencies.sort_by(f64::total_cmp);
    let (_, peak) = worker.rss_mb();
    worker.stop().await;
    client.broker().delete_queue(&queue).await?;
    Ok((latencies, peak))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = <Settings as clap::Parser>::parse();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let client = s.conn.client().await?;
    let sample = client
        .task::<diag::Add>(AddArgs::new(123_456, 654_321))
        .message()?
        .encode()?;
    let size = sample.body.len() + serde_json::to_vec(&sample.headers)?.len();
    println!(
        "message: diag.add, {} B body + {} B of headers (JSON-equivalent)",
        sample.body.len(),
        size - sample.body.len()
    );

    // Each ceiling at its best window.
    let ceilings = || async {
        let (mut raw, mut batched) = (0f64, 0f64);
        for &window in &s.windows {
            let (r, cpu) = raw_ceiling(&s, s.tasks, &sample, None, window).await?;
            println!(
                "raw broker ceiling (lapin, persistent + confirms, consume + ack), window {window}: {r:.0} msg/s over {} messages",
                s.tasks
            );
            println!("  {cpu}");
            // The broker's own limit for the worker's traffic: it acknowledges in `multiple`
            // batches.
            let (b, cpu) = raw_ceiling(&s, s.tasks, &sample, Some(100), window).await?;
            println!(
                "broker ceiling with multiple acks every 100 (the worker's way), window {window}: {b:.0} msg/s over {} messages",
                s.tasks
            );
            println!("  {cpu}");
            raw = raw.max(r);
            batched = batched.max(b);
        }
        anyhow::Ok((raw, batched))
    };
    // Measured before and after the task runs, and the ratios taken to their mean: the machine
    // is shared, and its load drifts within a run.
    let (raw_before, batched_before) = ceilings().await?;

    // Throughput, with plain run first and last: the machine is shared, and the cost of a mode
    // is measured against the mean of the two plain runs around it.
    let finished = Finished::listen(
        &s.conn.result_backend,
        format!("celery-task-meta-bench-{run}-w-*"),
    )
    .await?;
    let mut redis = redis::Client::open(s.conn.result_backend.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| *m == Mode::Plain || s.modes.contains(m))
        .collect();
    let mut rounds = modes.clone();
    rounds.push(Mode::Plain);
    let mut tps = HashMap::<&str, Vec<f64>>::new();
    let mut rss_peak = 0f64;
    for (round, mode) in rounds.into_iter().enumerate() {
        // The round's figure is its best window.
        let mut best = 0f64;
        for &window in &s.windows {
            let (t, peak, cpu) =
                throughput(&s, &client, &mut redis, &run, mode, round, window).await?;
            if mode == Mode::Plain {
                rss_peak = rss_peak.max(peak);
            }
            println!(
                "{}, window {window}: {} {} tasks produced and drained, results in Redis: {t:.0} tasks/s",
                mode.name(),
                s.tasks,
                mode.task(),
            );
            println!("  {cpu}");
            best = best.max(t);
        }
        tps.entry(mode.name()).or_default().push(best);
    }
    let (raw_after, batched_after) = ceilings().await?;
    let raw = (raw_before + raw_after) / 2.0;
    let batched = (batched_before + batched_after) / 2.0;
    let mean = |mode: Mode| {
        let runs = &tps[mode.name()];
        runs.iter().sum::<f64>() / runs.len() as f64
    };

    // Latency, every mode at the same paced rate: half the slowest mode's maximum.
    let rate = modes.iter().map(|m| mean(*m)).fold(f64::MAX, f64::min) / 2.0;
    let floor = raw_latency(&s, &sample, rate, s.latency_seconds).await?;
    println!(
        "broker alone (lapin, persistent + confirms, consume + ack): publish→delivery latency at \
         {rate:.0} msg/s, {} messages: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        floor.len(),
        percentile(&floor, 0.5),
        percentile(&floor, 0.99),
        floor.last().copied().unwrap_or(f64::NAN)
    );
    let mut latencies = Vec::new();
    for &mode in &modes {
        let (l, peak) = latency(&s, &client, &finished, &run, mode, rate).await?;
        if mode == Mode::Plain {
            rss_peak = rss_peak.max(peak);
        }
        println!(
            "{}: enqueue→start latency at {rate:.0} tasks/s, {} tasks: p50 {:.2} ms, p99 {:.2} ms, \
             max {:.2} ms",
            mode.name(),
            l.len(),
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            l.last().copied().unwrap_or(f64::NAN)
        );
        latencies.push(l);
    }

    let plain = mean(Mode::Plain);
    println!();
    println!(
        "ceilings, mean of before and after the task runs: {raw:.0} msg/s with per-message acks \
         ({raw_before:.0}, {raw_after:.0}), {batched:.0} msg/s with multiple acks every 100 \
         ({batched_before:.0}, {batched_after:.0})"
    );
    for &mode in &modes {
        println!(
            "{}: {:.0} tasks/s, {:.2} of the per-message-ack ceiling, {:.2} of the batched-ack one{}",
            mode.name(),
            mean(mode),
            mean(mode) / raw,
            mean(mode) / batched,
            if mode == Mode::Plain {
                if plain / batched >= 0.7 {
                    " (target ≥ 0.70: met)"
                } else {
                    " (target ≥ 0.70: missed)"
                }
            } else {
                ""
            }
        );
    }
    println!();
    println!(
        "| mode | tasks/s (runs) | throughput cost vs plain | p50 / p99 enqueue→start at {rate:.0} tasks/s | target |"
    );
    println!("|---|---|---|---|---|");
    for (&mode, l) in modes.iter().zip(&latencies) {
        let cost = 1.0 - mean(mode) / plain;
        let (cost_text, target) = match mode.target() {
            None => ("—".to_owned(), "—".to_owned()),
            Some(t) => (
                format!("{:.1}%", cost * 100.0),
                format!(
                    "< {:.0}% ({})",
                    t * 100.0,
                    if cost < t { "met" } else { "missed" }
                ),
            ),
        };
        let runs: Vec<String> = tps[mode.name()].iter().map(|t| format!("{t:.0}")).collect();
        println!(
            "| {} | {:.0} ({}) | {cost_text} | {:.2} ms / {:.2} ms | {target} |",
            mode.name(),
            mean(mode),
            runs.join(", "),
            percentile(l, 0.5),
            percentile(l, 0.99),
        );
    }
    println!(
        "| broker alone | — | — | {:.2} ms / {:.2} ms | — |",
        percentile(&floor, 0.5),
        percentile(&floor, 0.99),
    );
    println!();

    // 1,000 tasks in flight.
    let done_before = finished.0.lock().await.len();
    let queue = format!("bench.inflight.{run}");
    let client = client.with_default_queue(&queue);
    let prefix = format!("bench-{run}:");
    let worker =
        WorkerProcess::start(&s, &queue, 1000, 1000, &[("COORDINATION_PREFIX", &prefix)]).await?;
    let mut results = Vec::new();
    for i in 0..1000 {
        results.push(
            client
                .task::<diag::Sleep>(SleepArgs { ms: 3000 })
                .task_id(format!("bench-{run}-w-s-{i}"))
                .send()
                .await?,
        );
    }
    let mut max_rss = 0f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while finished.0.lock().await.len() < done_before + 1000 {
        if Instant::now() > deadline {
            bail!("the in-flight phase did not finish");
        }
        let (rss, _) = worker.rss_mb();
        max_rss = max_rss.max(rss);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, peak) = worker.rss_mb();
    println!(
        "worker RSS: peak {rss_peak:.1} MB over the plain throughput and latency runs; peak {:.1} MB with 1,000 diag.sleep tasks in flight (concurrency 1000)",
        peak.max(max_rss)
    );
    worker.stop().await;
    client.broker().delete_queue(&queue).await?;
    // The results, and the workers' start counters under the run's coordination prefix (they
    // would otherwise stay for their day-long expiry: millions of keys after a few runs).
    for pattern in [
        format!("celery-task-meta-bench-{run}-*"),
        format!("bench-{run}:*"),
    ] {
        forget_results(&s.conn.result_backend, &pattern).await?;
    }
    Ok(())
}

/// Deletes the keys matching `pattern` so repeated runs do not fill Redis.
async fn forget_results(backend: &str, pattern: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(backend)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<'_, String> =
            redis::AsyncCommands::scan_match(&mut conn, pattern).await?;
        let mut keys = Vec::new();
        while let Some(k) = iter.next_item().await {
            keys.push(k?);
        }
        keys
    };
    for chunk in keys.chunks(1000) {
        let _: () = redis::AsyncCommands::del(&mut conn, chunk).await?;
    }
    Ok(())
}
