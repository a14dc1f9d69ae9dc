//! Producer and worker in one process on the in-memory broker and backend: no services needed.
//!
//! ```sh
//! cargo run -p examples --example quickstart
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use task_core::{
    Client, MemoryBackend, MemoryBroker, Registry, Task, TaskContext, TaskError, Worker,
    WorkerConfig,
};

/// A task of our own: greets someone, retrying once to show retries.
struct Greet;

#[derive(Serialize, Deserialize)]
struct GreetArgs {
    name: String,
}

impl Task for Greet {
    const NAME: &'static str = "example.greet";
    type Args = GreetArgs;
    type Output = String;

    async fn run(&self, ctx: TaskContext, args: GreetArgs) -> Result<String, TaskError> {
        if ctx.retries == 0 {
            return Err(TaskError::retry_after(
                Duration::from_millis(200),
                "first attempts are shy",
            ));
        }
        Ok(format!(
            "hello, {} (attempt {})",
            args.name,
            ctx.retries + 1
        ))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    task_core::telemetry::init(Default::default());
    let (broker, backend) = (MemoryBroker::new(), MemoryBackend::new());

    let mut registry = Registry::new();
    task_core::diag::register(&mut registry).register(Greet);
    let worker = Worker::new(
        WorkerConfig::default(),
        registry,
        broker.clone(),
        backend.clone(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let client = Client::new(broker, backend);
    let sum = client
        .task::<task_core::diag::Add>(task_core::diag::AddArgs::new(2, 3))
        .send()
        .await?;
    let greeting = client
        .task::<Greet>(GreetArgs {
            name: "world".into(),
        })
        .send()
        .await?;
    let failing = client
        .task::<task_core::diag::Fail>(task_core::diag::FailArgs {
            message: "on purpose".into(),
        })
        .send()
        .await?;

    println!(
        "diag.add(2, 3) = {}",
        sum.get(Duration::from_secs(5)).await?
    );
    println!(
        "example.greet  = {}",
        greeting.get(Duration::from_secs(5)).await?
    );
    match failing.get(Duration::from_secs(5)).await {
        Err(task_core::Error::TaskFailed { exception, .. }) => {
            println!("diag.fail      -> {exception}")
        }
        other => anyhow::bail!("diag.fail should fail, got {other:?}"),
    }

    let _ = stop.send(());
    running.await??;
    Ok(())
}
