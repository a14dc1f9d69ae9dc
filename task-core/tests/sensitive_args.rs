//! A task's sensitive arguments (`TaskOptions::sensitive`) on the real RabbitMQ and Redis: sent
//! by keyword and positionally, they never show in the sent message's `argsrepr`/`kwargsrepr`,
//! the worker's events, an `inspect active` reply, the stored result's extended fields or the
//! logs, while the other arguments still do.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use task_core::events::EventSink;
use task_core::{Broker, Client, Task, TaskContext, TaskError, TaskOptions, Worker, WorkerConfig};
use tokio::sync::{Semaphore, broadcast, oneshot};

/// A charge that holds a card token: it waits for the test to let it finish.
struct Charge {
    gate: Arc<Semaphore>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChargeArgs {
    user: u32,
    card_token: String,
}

impl Task for Charge {
    const NAME: &'static str = "test.sensitive_charge";
    type Args = ChargeArgs;
    type Output = u32;

    fn options() -> TaskOptions {
        TaskOptions::default().sensitive(["card_token"])
    }

    async fn run(&self, _ctx: TaskContext, a: ChargeArgs) -> Result<u32, TaskError> {
        self.gate.acquire().await.expect("gate open").forget();
        Ok(a.user)
    }
}

/// Everything this test process logs through `tracing` (one subscriber for the process: every
/// test binary is a process of its own under nextest).
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .json()
            .with_span_list(true)
            .with_writer(move || LogWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        logs
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A worker in this process with events on, to a channel.
struct InProcessWorker {
    events: broadcast::Receiver<Value>,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<task_core::Result<Arc<task_core::worker::WorkerStats>>>,
}

impl InProcessWorker {
    async fn start(node: &str, queue: &str, gate: Arc<Semaphore>) -> Self {
        let mut registry = task_core::Registry::new();
        registry.register(Charge { gate });
        let (events_tx, events) = broadcast::channel(1024);
        let config = WorkerConfig {
            hostname: node.to_owned(),
            queues: vec![queue.to_owned()],
            concurrency: 4,
            prefetch: 8,
            task_events: true,
            result_extended: true,
            ..WorkerConfig::default()
        };
        let worker = Worker::with_events(
            config,
            registry,
            common::amqp().await,
            common::redis().await,
            EventSink::Memory(events_tx),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        InProcessWorker {
            events,
            stop: Some(stop),
            handle,
        }
    }

    /// Stops the worker and returns every event it sent.
    async fn stop(&mut self) -> Vec<Value> {
        let _ = self.stop.take().map(|s| s.send(()));
        (&mut self.handle)
            .await
            .expect("worker task")
            .expect("worker run");
        let mut events = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            events.push(e);
        }
        events
    }
}

/// A kwargs repr of the keyword call: the user shown, the token hidden (key order is not fixed).
fn assert_redacted_kwargs(repr: &Value) {
    let text = repr
        .as_str()
        .unwrap_or_else(|| panic!("not a repr string: {repr}"));
    assert!(
        text.starts_with('{')
            && text.contains("'user': 7")
            && text.contains("'card_token': '***'")
            && text.matches(": ").count() == 2,
        "kwargs repr {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_arguments_never_leave_the_worker() {
    let logs = captured_logs();
    let run = uuid::Uuid::new_v4().simple().to_string();
    // Distinct per path, so a leak names the path it came by.
    let (kw_secret, pos_secret) = (format!("tok-kw-{run}"), format!("tok-pos-{run}"));
    let queue = common::unique_queue("sensitive");
    let spy = common::unique_queue("sensitive-spy");
    let node = format!("sensitive-{run}@test");

    let amqp = common::amqp().await;
    let redis = common::redis().await;
    let gate = Arc::new(Semaphore::new(0));
    let mut worker = InProcessWorker::start(&node, &queue, gate.clone()).await;

    let client = Client::new(amqp.clone(), redis.clone()).with_default_queue(&queue);

    // By keyword, through the typed client, via a spy queue so the message is read off the wire.
    let by_keyword = client
        .task::<Charge>(ChargeArgs {
            user: 7,
            card_token: kw_secret.clone(),
        })
        .queue(&spy)
        .send()
        .await
        .unwrap();
    let mut spying = amqp.consume(std::slice::from_ref(&spy), 1).await.unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(10), spying.next())
        .await
        .expect("the sent message on the spy queue")
        .expect("a delivery");
    let h = &sent.message.headers;
    assert_eq!(h["argsrepr"], "()", "{h:?}");
    assert_redacted_kwargs(&h["kwargsrepr"]);
    amqp.publish(&queue, &sent.message).await.unwrap();
    sent.ack().await.unwrap();
    spying.cancel().await;

    // Positionally, by name, as Python's `send_task` would: the untyped client does not know
    // the task, so the worker must not trust the repr headers.
    let positional = client
        .send_task(
            Charge::NAME,
            vec![json!(8), json!(pos_secret.clone())],
            Map::new(),
        )
        .send()
        .await
        .unwrap();
    let ids = [by_keyword.id().to_owned(), positional.id().to_owned()];

    // Both are running (held by the gate): what `inspect active` shows.
    let destination = [node.clone()];
    let active = common::eventually(
        "both tasks in the `inspect active` reply",
        Duration::from_secs(20),
        || async {
            let replies = task_core::control::broadcast(
                &amqp,
                "active",
                json!({}),
                Some(&destination),
                Duration::from_secs(1),
                Some(1),
            )
            .await
            .ok()?;
            let (_, reply) = replies.into_iter().find(|(n, _)| *n == node)?;
            (reply.as_array()?.len() == 2).then_some(reply)
        },
    )
    .await;
    let text = active.to_string();
    assert!(
        !text.contains(&kw_secret) && !text.contains(&pos_secret),
        "inspect active: {text}"
    );
    let shown = |id: &str| -> Value {
        active
            .as_array()
            .and_then(|a| a.iter().find(|r| r["id"] == id).cloned())
            .unwrap_or_else(|| panic!("{id} not active: {active}"))
    };
    let kw = shown(&ids[0]);
    assert_eq!(kw["args"], "()", "{kw}");
    assert_redacted_kwargs(&kw["kwargs"]);
    let pos = shown(&ids[1]);
    assert_eq!(pos["args"], "(8, '***')", "{pos}");
    assert_eq!(pos["kwargs"], "{}", "{pos}");

    gate.add_permits(2);
    assert_eq!(by_keyword.get(Duration::from_secs(20)).await.unwrap(), 7);
    assert_eq!(positional.get(Duration::from_secs(20)).await.unwrap(), 8);
    let events = worker.stop().await;

    // The stored meta, raw from Redis.
    let mut conn = redis::Client::open(common::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (id, args, kwargs) in [
        (&ids[0], json!([]), json!({"user": 7, "card_token": "***"})),
        (&ids[1], json!([8, "***"]), json!({})),
    ] {
        let raw: String = redis::cmd("GET")
            .arg(format!("celery-task-meta-{id}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            !raw.contains(&kw_secret) && !raw.contains(&pos_secret),
            "stored meta: {raw}"
        );
        let meta: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(meta["status"], "SUCCESS", "{meta}");
        assert_eq!(meta["name"], Charge::NAME, "{meta}");
        assert_eq!(meta["args"], args, "{meta}");
        assert_eq!(meta["kwargs"], kwargs, "{meta}");
    }

    // The events, every one the worker sent (the worker has stopped: all are out).
    for e in &events {
        let text = e.to_string();
        assert!(
            !text.contains(&kw_secret) && !text.contains(&pos_secret),
            "event: {text}"
        );
    }
    let received = |id: &str| -> Value {
        events
            .iter()
            .find(|e| e["type"] == "task-received" && e["uuid"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no task-received for {id} in {events:?}"))
    };
    assert_redacted_kwargs(&received(&ids[0])["kwargs"]);
    assert_eq!(received(&ids[1])["args"], "(8, '***')");
    for kind in ["task-started", "task-succeeded"] {
        for id in &ids {
            assert!(
                events.iter().any(|e| e["type"] == kind && e["uuid"] == *id),
                "no {kind} for {id}"
            );
        }
    }

    // The logs of the whole run (the task spans included), at every level.
    let logs = String::from_utf8_lossy(&logs.lock().expect("log lock")).into_owned();
    assert!(
        logs.contains(&ids[0]) && logs.contains(&ids[1]),
        "the log capture saw the tasks"
    );
    assert!(
        !logs.contains(&kw_secret) && !logs.contains(&pos_secret),
        "a secret in the logs: {}",
        logs.lines()
            .filter(|l| l.contains(&kw_secret) || l.contains(&pos_secret))
            .collect::<Vec<_>>()
            .join("\n")
    );

    amqp.delete_queue(&queue).await.unwrap();
    amqp.delete_queue(&spy).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensitive_argument_of_the_wrong_type_is_not_echoed_in_the_error() {
    let logs = captured_logs();
    let run = uuid::Uuid::new_v4();
    // A card number sent as a number where the task wants a string: serde's error names it.
    let secret = 4_000_000_000_000_000 + (run.as_u128() % 1_000_000_000_000_000) as u64;
    let queue = common::unique_queue("sensitive-bad");
    let node = format!("sensitive-bad-{}@test", run.simple());
    let amqp = common::amqp().await;
    let redis = common::redis().await;
    let mut worker = InProcessWorker::start(&node, &queue, Arc::new(Semaphore::new(0))).await;
    let client = Client::new(amqp.clone(), redis.clone()).with_default_queue(&queue);
    let mut kwargs = Map::new();
    kwargs.insert("user".into(), json!(9));
    kwargs.insert("card_token".into(), json!(secret));
    let bad = client
        .send_task(Charge::NAME, Vec::new(), kwargs)
        .send()
        .await
        .unwrap();
    match bad.get(Duration::from_secs(20)).await {
        Err(task_core::Error::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "TypeError", "{exception:?}");
        }
        other => panic!("a wrongly typed argument is a failure, got {other:?}"),
    }
    let events = worker.stop().await;
    let secret = secret.to_string();

    let raw: String = redis::cmd("GET")
        .arg(format!("celery-task-meta-{}", bad.id()))
        .query_async(
            &mut redis::Client::open(common::redis_url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(!raw.contains(&secret), "stored meta: {raw}");
    for e in &events {
        assert!(!e.to_string().contains(&secret), "event: {e}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "task-rejected" && e["uuid"] == bad.id()),
        "no task-rejected in {events:?}"
    );
    let logs = String::from_utf8_lossy(&logs.lock().expect("log lock")).into_owned();
    assert!(logs.contains(bad.id()), "the log capture saw the task");
    assert!(
        !logs.contains(&secret),
        "a secret in the logs: {}",
        logs.lines()
            .filter(|l| l.contains(&secret))
            .collect::<Vec<_>>()
            .join("\n")
    );
    amqp.delete_queue(&queue).await.unwrap();
    amqp.delete_queue(&task_core::broker::dead_letter_queue(&queue))
        .await
        .unwrap();
}
