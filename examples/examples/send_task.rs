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
use task_core::{Client, ContentType};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(task) = args.next() else {
        anyhow::bail!(
            "usage: send_task <task name> [json args…] [--queue Q] [--serializer json|msgpack]"
        );
    };
    let (mut positional, mut queue, mut serializer) =
        (Vec::new(), "celery".to_owned(), ContentType::Json);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--queue" => {
                queue = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--queue needs a value"))?
            }
            "--serializer" => {
                serializer = args
                    .next()
                    .unwrap_or_default()
                    .parse()
                    .map_err(anyhow::Error::msg)?;
            }
            other => positional.push(
                serde_json::from_str(other).unwrap_or_else(|_| Value::String(other.to_owned())),
            ),
        }
    }
    let broker = std::env::var("BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let backend =
        std::env::var("RESULT_BACKEND").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let client = Client::connect(&broker, &backend)
        .await?
        .with_serializer(serializer);
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
