//! The beat: the scheduler's entries as its store holds them (the same Redis and key prefix as
//! the `scheduler` replicas: `RESULT_BACKEND`, `SCHEDULER_KEY_PREFIX`), who leads, each entry's
//! last and next tick and the ticks it skipped; and the runtime changes operators make through
//! [`scheduler::Store`] — pause, resume, run now, add, remove — each written to the audit log
//! before it is made. The replicas hear of a change at once (the store's change channel).
//!
//! "Run now" sends the entry's task with its arguments, queue and priority under a new task id,
//! outside the schedule: the entry's ticks are not changed.

use scheduler::{EntrySpec, EntryStatus, LeaseHolder};
use serde::Serialize;
use serde_json::json;
use task_core::client::SendOptions;

use crate::AppState;
use crate::actions::{Asked, failed};
use crate::audit::Action;
use crate::error::{Error, Result};

/// What the beat page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The replica holding the leader lease, if any.
    pub leader: Option<LeaseHolder>,
    /// Every entry, by name.
    pub entries: Vec<EntryStatus>,
}

fn from_scheduler(e: scheduler::Error) -> Error {
    match e {
        scheduler::Error::NotFound(n) => Error::NotFound(format!("no schedule entry named `{n}`")),
        scheduler::Error::InvalidEntry(e) => Error::BadRequest(e.to_string()),
        e => Error::Unavailable(e.to_string()),
    }
}

/// The leader and every entry.
pub async fn overview(state: &AppState) -> Result<Overview> {
    let store = state.beat();
    Ok(Overview {
        leader: store.leader().await.map_err(from_scheduler)?,
        entries: store.list().await.map_err(from_scheduler)?,
    })
}

/// A change to the schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Pause,
    Resume,
    /// Send the task now, outside the schedule.
    RunNow,
    Remove,
    /// Add an entry, or replace the one of the same name.
    Add(Box<EntrySpec>),
}

impl Change {
    fn action(&self) -> &'static str {
        match self {
            Change::Pause => "beat.pause",
            Change::Resume => "beat.resume",
            Change::RunNow => "beat.run",
            Change::Remove => "beat.remove",
            Change::Add(_) => "beat.add",
        }
    }

    fn failed_action(&self) -> &'static str {
        match self {
            Change::Pause => "beat.pause.failed",
            Change::Resume => "beat.resume.failed",
            Change::RunNow => "beat.run.failed",
            Change::Remove => "beat.remove.failed",
            Change::Add(_) => "beat.add.failed",
        }
    }
}

/// What a change did: for "run now", the task id sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changed {
    pub entry: String,
    pub task_id: Option<String>,
    /// Whether this answers a repeated request (nothing was done again).
    pub repeated: bool,
}

/// Makes `change` to entry `name` (for `Add`, the spec's name), recorded in the audit log first.
pub async fn change(
    state: &AppState,
    name: &str,
    change: &Change,
    asked: &Asked,
) -> Result<Changed> {
    if asked.reason.is_none() {
        return Err(Error::BadRequest(
            "a reason is required to change the schedule".into(),
        ));
    }
    let store = state.beat();
    // Known before it is recorded: a change to a missing entry is refused, not logged.
    let current = store.get(name).await.map_err(from_scheduler)?;
    let mut detail = json!({});
    let mut task_id = None;
    match change {
        Change::Add(spec) => {
            scheduler::Entry::new((**spec).clone())
                .map_err(|e| Error::BadRequest(e.to_string()))?;
            detail = json!({"spec": spec, "replaces": current.as_ref().map(|c| &c.spec)});
        }
        _ if current.is_none() => {
            return Err(Error::NotFound(format!("no schedule entry named `{name}`")));
        }
        Change::RunNow => {
            let id = uuid::Uuid::new_v4().to_string();
            detail = json!({"task_id": id});
            task_id = Some(id);
        }
        _ => {}
    }
    let entry = state
        .store()
        .record(&Action {
            actor: asked.actor.clone(),
            action: change.action(),
            target: name.to_owned(),
            count: 1,
            reason: asked.reason.clone(),
            detail,
            request_id: asked.request_id.clone(),
        })
        .await?;
    let entry = match entry {
        Ok(e) => e,
        Err(earlier) => {
            return Ok(Changed {
                entry: name.to_owned(),
                task_id: earlier.detail["task_id"].as_str().map(str::to_owned),
                repeated: true,
            });
        }
    };
    let done: Result<()> = match change {
        Change::Pause => store.pause(name).await.map_err(from_scheduler),
        Change::Resume => store.resume(name).await.map_err(from_scheduler),
        Change::Remove => store.remove(name).await.map_err(from_scheduler),
        Change::Add(spec) => store
            .add((**spec).clone())
            .await
            .map(|_| ())
            .map_err(from_scheduler),
        Change::RunNow => {
            let spec = &current.as_ref().expect("checked above").spec;
            let options = SendOptions {
                task_id: task_id.clone(),
                queue: spec.queue.clone(),
                priority: spec.priority,
                ..SendOptions::default()
            };
            state
                .client()
                .send_task(&spec.task, spec.args.clone(), spec.kwargs.clone())
                .options(options)
                .send()
                .await
                .map(|_| ())
                .map_err(Error::from)
        }
    };
    if let Err(e) = done {
        failed(
            state,
            asked,
            change.failed_action(),
            name,
            entry.id,
            &e.to_string(),
        )
        .await;
        return Err(e);
    }
    tracing::info!(entry = name, action = change.action(), actor = %asked.actor, "schedule changed");
    Ok(Changed {
        entry: name.to_owned(),
        task_id,
        repeated: false,
    })
}
