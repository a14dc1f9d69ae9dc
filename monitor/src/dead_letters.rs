//! Dead letters: the `<queue>.dlq` queues workers move messages to when they cannot be run
//! (an unknown task, arguments that do not fit, a poison message, a retry that could not be
//! published), looked at without losing any, and sent back to the queue they came from.
//!
//! Looking reads the head of the queue through a [`task_core::broker::QueueReader`] and gives
//! every message back. Replaying takes the chosen messages one at a time: the worker stored a
//! FAILURE for each when it dead-lettered it, and that result is removed first (a worker takes
//! a message whose task has a finished result for a duplicate), then the message is published
//! to its queue with the dead-letter headers removed and, once RabbitMQ confirms it, removed
//! from the dead-letter queue. A message whose task has since *succeeded* is left where it is.
//! A replay is written to the audit log before it starts; a bulk replay moves at most the count
//! the operator was shown. The page's bulk replay runs as a tracked job ([`crate::jobs`]):
//! progress, each message's outcome, abort between messages, resumed after a restart.

use serde::Serialize;
use serde_json::{Value, json};
use task_core::TaskState;
use task_core::backend::ResultBackend;
use task_core::broker::{
    Broker, DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER, Held, restored_from_dead_letter,
};

use crate::AppState;
use crate::actions::{Asked, failed};
use crate::audit::Action;
use crate::broker::QueueStats;
use crate::error::{Error, Result};

/// Most messages one page shows.
pub const MAX_PEEK: usize = 500;

/// One dead-lettered message, as the page and the API show it.
#[derive(Debug, Clone, Serialize)]
pub struct Letter {
    pub task_id: Option<String>,
    pub task: Option<String>,
    pub reason: Option<String>,
    pub original_queue: Option<String>,
    pub dead_lettered_at: Option<String>,
    /// The arguments as the sender printed them (`argsrepr`, `kwargsrepr`: senders redact
    /// sensitive ones there); the body itself is not shown.
    pub args: Option<String>,
    pub kwargs: Option<String>,
    pub retries: Option<i64>,
}

impl Letter {
    fn of(held: &Held) -> Self {
        let h = &held.message.headers;
        let text = |k: &str| h.get(k).and_then(Value::as_str).map(str::to_owned);
        Letter {
            task_id: held.message.task_id().map(str::to_owned),
            task: held.message.task_name().map(str::to_owned),
            reason: text(DEAD_LETTER_REASON_HEADER),
            original_queue: text(DEAD_LETTER_QUEUE_HEADER),
            dead_lettered_at: text("x-dead-lettered-at"),
            args: text("argsrepr"),
            kwargs: text("kwargsrepr"),
            retries: h.get("retries").and_then(Value::as_i64),
        }
    }
}

/// Whether `name` is a dead-letter queue.
pub fn is_dead_letter_queue(name: &str) -> bool {
    name.ends_with(".dlq") && name.len() > 4
}

/// Every dead-letter queue with its counts: from the management API when configured, else the
/// `.dlq` of each queue the workers consume.
pub async fn list(state: &AppState) -> Result<Vec<(String, QueueStats)>> {
    if state.lists_all_queues() {
        let mut all = state.queue_stats().await?;
        all.retain(|(name, _)| is_dead_letter_queue(name));
        return Ok(all);
    }
    let mut out = Vec::new();
    for (name, _) in state.queue_stats().await? {
        if is_dead_letter_queue(&name) {
            continue;
        }
        let dlq = task_core::broker::dead_letter_queue(&name);
        if let Some(stats) = state.queue_probe().stats(&dlq).await? {
            out.push((dlq, stats));
        }
    }
    Ok(out)
}

fn check_name(dlq: &str) -> Result<()> {
    if is_dead_letter_queue(dlq) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "`{dlq}` is not a dead-letter queue (a name ending in .dlq)"
        )))
    }
}

/// The first `limit` messages of `dlq`, all left in it.
pub async fn peek(state: &AppState, dlq: &str, limit: usize) -> Result<Vec<Letter>> {
    check_name(dlq)?;
    let mut reader = state.amqp().read_queue(dlq).await.map_err(not_found)?;
    let mut out = Vec::new();
    while out.len() < limit.min(MAX_PEEK) {
        match reader.next().await? {
            Some(held) => out.push(Letter::of(&held)),
            None => break,
        }
    }
    reader.close().await;
    Ok(out)
}

fn not_found(e: task_core::Error) -> Error {
    match e {
        task_core::Error::Broker(m) if m.contains("NOT_FOUND") => Error::NotFound(m),
        e => e.into(),
    }
}

/// Which messages a replay moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    /// The message of this task.
    Task(String),
    /// From the head, at most this many (the count the operator was shown).
    Oldest(usize),
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Messages sent back to their queues.
    pub replayed: usize,
    /// Task ids left in the dead-letter queue because they have succeeded since.
    pub succeeded_since: Vec<String>,
    /// Whether this answers a repeated request (nothing was done again).
    pub repeated: bool,
}

/// Sends the chosen messages of `dlq` back to their queues (see the module docs).
pub async fn replay(state: &AppState, dlq: &str, which: &Which, asked: &Asked) -> Result<Replayed> {
    check_name(dlq)?;
    if asked.reason.is_none() {
        return Err(Error::BadRequest(
            "a reason is required to replay dead letters".into(),
        ));
    }
    let (count, detail) = match which {
        Which::Task(id) => (1, json!({"task_id": id})),
        Which::Oldest(n) => (i32::try_from(*n).unwrap_or(i32::MAX), json!({"oldest": n})),
    };
    if count == 0 {
        return Ok(Replayed::default());
    }
    let entry = state
        .store()
        .record(&Action {
            actor: asked.actor.clone(),
            action: "dead-letter.replay",
            target: dlq.to_owned(),
            count,
            reason: asked.reason.clone(),
            detail,
            request_id: asked.request_id.clone(),
        })
        .await?;
    let entry = match entry {
        Ok(e) => e,
        Err(_) => {
            return Ok(Replayed {
                repeated: true,
                ..Replayed::default()
            });
        }
    };
    match replay_now(state, dlq, which).await {
        Ok(done) => {
            if let Which::Task(id) = which
                && done.replayed == 0
                && done.succeeded_since.is_empty()
            {
                let e = format!("no message of task '{id}' in {dlq}");
                failed(state, asked, "dead-letter.replay.failed", dlq, entry.id, &e).await;
                return Err(Error::NotFound(e));
            }
            Ok(done)
        }
        Err(e) => {
            failed(
                state,
                asked,
                "dead-letter.replay.failed",
                dlq,
                entry.id,
                &e.to_string(),
            )
            .await;
            Err(e)
        }
    }
}

async fn replay_now(state: &AppState, dlq: &str, which: &Which) -> Result<Replayed> {
    let mut reader = state.amqp().read_queue(dlq).await.map_err(not_found)?;
    let mut done = Replayed::default();
    let mut taken = 0usize;
    while let Some(held) = reader.next().await? {
        let id = held.message.task_id().map(str::to_owned);
        match which {
            Which::Task(want) if id.as_deref() != Some(want.as_str()) => continue,
            Which::Oldest(n) if taken >= *n => break,
            _ => {}
        }
        taken += 1;
        match replay_held(state, dlq, &reader, &held).await? {
            Step::Replayed => done.replayed += 1,
            Step::SucceededSince => {
                done.succeeded_since.extend(id);
                if !matches!(which, Which::Task(_)) {
                    continue;
                }
            }
        }
        if matches!(which, Which::Task(_)) {
            break;
        }
    }
    reader.close().await;
    Ok(done)
}

/// What [`replay_held`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Sent back to its queue and removed from the dead-letter queue.
    Replayed,
    /// Left in the dead-letter queue (given back when the reader closes): its task has
    /// succeeded since.
    SucceededSince,
}

/// Replays one message `reader` holds (see the module docs).
pub async fn replay_held(
    state: &AppState,
    dlq: &str,
    reader: &task_core::broker::QueueReader,
    held: &Held,
) -> Result<Step> {
    let id = held.message.task_id().map(str::to_owned);
    if let Some(id) = &id {
        let backend = state.client().backend();
        match backend.get(id).await? {
            Some(meta) if meta.status == TaskState::Success => return Ok(Step::SucceededSince),
            Some(meta) if meta.status.is_ready() => backend.forget(id).await?,
            _ => {}
        }
    }
    let (queue, message) = restored_from_dead_letter(dlq, &held.message);
    state.amqp().publish(&queue, &message).await?;
    reader.ack(held).await?;
    tracing::info!(dlq, queue, task_id = ?id, "dead letter replayed");
    Ok(Step::Replayed)
}
