//! Sends one task by name and prints its result: the Rust side of interop with Python workers.
//!
//! ```sh
//! cargo run -p examples --example send_task -- py.mul 6 7 --queue py
//! cargo run -p examples --example send_task -- diag.echo '{"any": "json"}'
//! ```
//! Each positional argument after the task name is parsed as JSON (falling back to a string).
//! `BROKER_URL` and `RESULT_BACKEND` choose the services (defaults: the local stack).

use std::time::Duration;

use serde_json::Value;
use task_core::ContentType;

/// Sends one task by name and prints its result.
#[derive(clap::Parser)]
#[command(name = "send_task")]
struct Args {
    /// The task's name (`py.mul`, `diag.echo`, …).
    task: String,
    /// Positional arguments, each parsed as JSON (a string when it is not JSON); `-5` is a number.
    #[arg(allow_negative_numbers = true)]
    args: Vec<String>,
    /// The queue to send to.
    #[arg(long, default_value = "celery")]
    queue: String,
    /// json or msgpack.
    #[arg(long, default_value = "json")]
    serializer: String,
    /// BROKER_URL, RESULT_BACKEND and the queue settings, as the binaries take them.
    #[command(flatten)]
    conn: task_core::cli::ConnectionArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        task,
        args,
        queue,
        serializer,
        conn,
    } = <Args as clap::Parser>::parse();
    let serializer: ContentType = serializer.parse().map_err(anyhow::Error::msg)?;
    let positional: Vec<Value> = args
        .iter()
        .map(|a| serde_json::from_str(a).unwrap_or_else(|_| Value::String(a.clone())))
        .collect();
    let client = conn.client().await?.with_serializer(serializer);
    let result = client
        .send_task(&task, positional, Default::default())
        .queue(queue)
        .send()
        .await?;
    println!("sent {task} as {}", result.id());
    match result.get(Duration::from_secs(60)).await {
        Ok(value) => println!("{value}"),
        Err(task_core::Error::TaskFailed {
            state, exception, ..
        }) => println!("{state}: {exception}"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
