//! Bulk actions by filter, as tracked jobs: retry or revoke every task a task-list filter
//! matches. The operator first sees how many tasks the filter matches; starting the job with
//! that count fixes its items (the matching task ids, oldest first, in `job_items`) in one
//! statement, and refuses if the filter now matches more than was shown. The job then takes the
//! items one at a time through the same actions as a single retry or revoke (each in the audit
//! log, with a request id made from the job and the task, so a resumed job does nothing twice),
//! records each item's outcome, and stops between items when aborted. The job itself is in the
//! audit log before it starts. Jobs left running by a stopped monitor resume when it starts.
//!
//! A bulk dead-letter replay is a job as well ([`start_replay`]): its total is the number of
//! messages the operator was shown, its items the messages as it replays them, oldest first.

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{Postgres, QueryBuilder};

use crate::AppState;
use crate::actions::{self, Asked};
use crate::audit::Action;
use crate::error::{Error, Result};
use crate::store::{TaskQuery, push_filters};

/// Most tasks one job may take.
pub const MAX_ITEMS: i64 = 100_000;

/// What a job does to each task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Send a failed or revoked task again under a new id (tasks in other states are skipped).
    Retry,
    /// Revoke the task (finished tasks are skipped).
    Revoke,
    /// Send the oldest messages of a dead-letter queue back to their queues (tasks that have
    /// succeeded since are skipped and stay).
    Replay,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "retry" => Some(Kind::Retry),
            "revoke" => Some(Kind::Revoke),
            "replay" => Some(Kind::Replay),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Retry => "retry",
            Kind::Revoke => "revoke",
            Kind::Replay => "replay",
        }
    }

    /// The states a task must be in for this action to apply.
    pub fn states(self) -> &'static [&'static str] {
        match self {
            Kind::Retry => &["FAILURE", "REVOKED"],
            Kind::Revoke => &["PENDING", "RECEIVED", "STARTED", "RETRY"],
            Kind::Replay => &[],
        }
    }
}

/// The task list's filter, as its URL gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub search: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub taskname: String,
    #[serde(default)]
    pub workername: String,
    /// A replay's dead-letter queue.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dlq: String,
}

impl Filter {
    /// The store query of this filter, restricted to the states `kind` applies to.
    fn query(&self, kind: Kind) -> Result<TaskQuery> {
        let search = crate::search::parse(&self.search).map_err(Error::BadRequest)?;
        let nonempty = |s: &String| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        if let Some(state) = nonempty(&self.state)
            && !kind.states().contains(&state.as_str())
        {
            return Err(Error::BadRequest(format!(
                "a bulk {} takes tasks in {}; the filter asks for {state}",
                kind.name(),
                kind.states().join(", ")
            )));
        }
        Ok(TaskQuery {
            name: nonempty(&self.taskname),
            state: nonempty(&self.state),
            worker: nonempty(&self.workername),
            search,
            ..TaskQuery::default()
        })
    }

    fn push(&self, kind: Kind, q: &mut QueryBuilder<Postgres>) -> Result<()> {
        push_filters(q, &self.query(kind)?);
        q.push(" AND state = ANY(")
            .push_bind(
                kind.states()
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
            .push(")");
        Ok(())
    }
}

/// How many tasks a job of `kind` over `filter` would take now.
pub async fn preview(state: &AppState, kind: Kind, filter: &Filter) -> Result<i64> {
    let mut q = QueryBuilder::new("SELECT count(*) FROM tasks WHERE true");
    filter.push(kind, &mut q)?;
    let (n,): (i64,) = q.build_query_as().fetch_one(state.store().pool()).await?;
    Ok(n)
}

/// The first `limit` tasks a job of `kind` over `filter` would take, oldest first.
pub async fn sample(
    state: &AppState,
    kind: Kind,
    filter: &Filter,
    limit: i64,
) -> Result<Vec<crate::event::TaskRecord>> {
    let mut q = QueryBuilder::new(format!(
        "SELECT {} FROM tasks WHERE true",
        crate::store::TASK_COLUMNS
    ));
    filter.push(kind, &mut q)?;
    q.push(" ORDER BY received ASC NULLS FIRST, uuid ASC LIMIT ")
        .push_bind(limit);
    Ok(q.build_query_as().fetch_all(state.store().pool()).await?)
}

/// A job and its progress.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub filter: serde_json::Value,
    pub total: i32,
    pub actor: String,
    pub reason: String,
    pub state: String,
    pub abort_requested: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub done: i64,
    pub skipped: i64,
    pub failed: i64,
    pub pending: i64,
}

const JOB_COLUMNS: &str = "j.id, j.kind, j.filter, j.total, j.actor, j.reason, j.state, \
    j.abort_requested, j.created_at, j.finished_at, \
    count(i.*) FILTER (WHERE i.status = 'done') AS done, \
    count(i.*) FILTER (WHERE i.status = 'skipped') AS skipped, \
    count(i.*) FILTER (WHERE i.status = 'failed') AS failed, \
    (j.total - count(i.*) FILTER (WHERE i.status IN ('done', 'skipped', 'failed')))::bigint AS pending";

/// One job with its counts.
pub async fn get(state: &AppState, id: i64) -> Result<Option<Job>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN job_items i ON i.job_id = j.id \
         WHERE j.id = $1 GROUP BY j.id"
    )))
    .bind(id)
    .fetch_optional(state.store().pool())
    .await?)
}

/// The latest jobs, newest first.
pub async fn list(state: &AppState, limit: i64) -> Result<Vec<Job>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN job_items i ON i.job_id = j.id \
         GROUP BY j.id ORDER BY j.created_at DESC, j.id DESC LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(state.store().pool())
    .await?)
}

/// An item that did not end `done`, with why.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Item {
    pub seq: i32,
    pub task_id: String,
    pub status: String,
    pub message: Option<String>,
}

/// The items of job `id` that were skipped or failed, in order.
pub async fn problems(state: &AppState, id: i64, limit: i64) -> Result<Vec<Item>> {
    Ok(sqlx::query_as(
        "SELECT seq, task_id, status, message FROM job_items \
         WHERE job_id = $1 AND status IN ('skipped', 'failed') ORDER BY seq LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(state.store().pool())
    .await?)
}

/// Starts a job of `kind` over `filter`, expecting the `expected` tasks the operator was shown;
/// recorded in the audit log first. A repeated `request_id` returns the job it started.
pub async fn start(
    state: &AppState,
    kind: Kind,
    filter: &Filter,
    expected: i64,
    asked: &Asked,
) -> Result<i64> {
    if kind == Kind::Replay {
        return Err(Error::BadRequest(
            "a replay job is started from its dead-letter queue".into(),
        ));
    }
    let Some(reason) = asked.reason.clone() else {
        return Err(Error::BadRequest(
            "a reason is required for a bulk action".into(),
        ));
    };
    if let Some(rid) = &asked.request_id {
        let earlier: Option<(i64,)> = sqlx::query_as("SELECT id FROM jobs WHERE request_id = $1")
            .bind(rid)
            .fetch_optional(state.store().pool())
            .await?;
        if let Some((id,)) = earlier {
            return Ok(id);
        }
    }
    if expected > MAX_ITEMS {
        return Err(Error::BadRequest(format!(
            "a job takes at most {MAX_ITEMS} tasks; narrow the filter"
        )));
    }
    let mut tx = state.store().pool().begin().await?;
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO jobs (kind, filter, total, actor, reason, request_id) \
         VALUES ($1, $2, 0, $3, $4, $5) RETURNING id",
    )
    .bind(kind.name())
    .bind(json!(filter))
    .bind(&asked.actor)
    .bind(&reason)
    .bind(&asked.request_id)
    .fetch_one(&mut *tx)
    .await?;
    let mut q = QueryBuilder::new("INSERT INTO job_items (job_id, seq, task_id) SELECT ");
    q.push_bind(id).push(
        ", (row_number() OVER (ORDER BY received ASC NULLS FIRST, uuid ASC))::integer, uuid \
         FROM tasks WHERE true",
    );
    filter.push(kind, &mut q)?;
    q.push(" LIMIT ").push_bind(MAX_ITEMS + 1);
    let taken = q.build().execute(&mut *tx).await?.rows_affected();
    let taken = i64::try_from(taken).unwrap_or(i64::MAX);
    if taken > expected {
        tx.rollback().await?;
        return Err(Error::Conflict(format!(
            "the filter matches {taken} tasks now, more than the {expected} you were shown: look again"
        )));
    }
    sqlx::query(
        "UPDATE jobs SET total = $2, state = CASE WHEN $2 = 0 THEN 'done' ELSE state END, \
                 finished_at = CASE WHEN $2 = 0 THEN now() END WHERE id = $1",
    )
    .bind(id)
    .bind(i32::try_from(taken).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    state
        .store()
        .record(&Action {
            actor: asked.actor.clone(),
            action: match kind {
                Kind::Retry => "tasks.bulk_retry",
                Kind::Revoke => "tasks.bulk_revoke",
                Kind::Replay => "dead-letter.bulk_replay",
            },
            target: format!("job {id}"),
            count: i32::try_from(taken).unwrap_or(i32::MAX),
            reason: Some(reason),
            detail: json!({"job": id, "filter": filter, "shown": expected}),
            request_id: asked.request_id.as_ref().map(|r| format!("job:{r}")),
        })
        .await?
        .ok();
    tracing::info!(job = id, kind = kind.name(), tasks = taken, actor = %asked.actor, "bulk job started");
    spawn(state.clone(), id);
    Ok(id)
}

/// Starts a job replaying the oldest `expected` messages of `dlq` (the count the operator was
/// shown; fewer if fewer are there when it runs), recorded in the audit log first. A repeated
/// `request_id` returns the job it started.
pub async fn start_replay(
    state: &AppState,
    dlq: &str,
    expected: i64,
    asked: &Asked,
) -> Result<i64> {
    let Some(reason) = asked.reason.clone() else {
        return Err(Error::BadRequest(
            "a reason is required to replay dead letters".into(),
        ));
    };
    if !crate::dead_letters::is_dead_letter_queue(dlq) {
        return Err(Error::BadRequest(format!(
            "{dlq} is not a dead-letter queue"
        )));
    }
    if !(1..=MAX_ITEMS).contains(&expected) {
        return Err(Error::BadRequest(format!(
            "a replay job takes 1 to {MAX_ITEMS} messages"
        )));
    }
    if let Some(rid) = &asked.request_id {
        let earlier: Option<(i64,)> = sqlx::query_as("SELECT id FROM jobs WHERE request_id = $1")
            .bind(rid)
            .fetch_optional(state.store().pool())
            .await?;
        if let Some((id,)) = earlier {
            return Ok(id);
        }
    }
    let filter = Filter {
        dlq: dlq.to_owned(),
        ..Filter::default()
    };
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO jobs (kind, filter, total, actor, reason, request_id) \
         VALUES ('replay', $1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(json!(filter))
    .bind(i32::try_from(expected).unwrap_or(i32::MAX))
    .bind(&asked.actor)
    .bind(&reason)
    .bind(&asked.request_id)
    .fetch_one(state.store().pool())
    .await?;
    state
        .store()
        .record(&Action {
            actor: asked.actor.clone(),
            action: "dead-letter.bulk_replay",
            target: dlq.to_owned(),
            count: i32::try_from(expected).unwrap_or(i32::MAX),
            reason: Some(reason),
            detail: json!({"job": id, "shown": expected}),
            request_id: asked.request_id.as_ref().map(|r| format!("job:{r}")),
        })
        .await?
        .ok();
    tracing::info!(job = id, dlq, messages = expected, actor = %asked.actor, "replay job started");
    spawn(state.clone(), id);
    Ok(id)
}

/// Asks job `id` to stop after the item it is on.
pub async fn abort(state: &AppState, id: i64, asked: &Asked) -> Result<()> {
    let updated =
        sqlx::query("UPDATE jobs SET abort_requested = true WHERE id = $1 AND state = 'running'")
            .bind(id)
            .execute(state.store().pool())
            .await?
            .rows_affected();
    if updated == 0 {
        return Err(match get(state, id).await? {
            None => Error::NotFound(format!("no job {id}")),
            Some(j) => Error::Conflict(format!("job {id} is {} already", j.state)),
        });
    }
    state
        .store()
        .record(&Action {
            actor: asked.actor.clone(),
            action: "tasks.bulk_abort",
            target: format!("job {id}"),
            count: 1,
            reason: asked.reason.clone(),
            detail: json!({"job": id}),
            request_id: asked.request_id.clone(),
        })
        .await?
        .ok();
    Ok(())
}

/// Runs the jobs a stopped monitor left running.
pub async fn resume_all(state: &AppState) -> Result<()> {
    let running: Vec<(i64,)> =
        sqlx::query_as("SELECT id FROM jobs WHERE state = 'running' ORDER BY id")
            .fetch_all(state.store().pool())
            .await?;
    for (id,) in running {
        tracing::info!(job = id, "resuming a bulk job");
        spawn(state.clone(), id);
    }
    Ok(())
}

fn spawn(state: AppState, id: i64) {
    tokio::spawn(async move {
        if let Err(e) = run(&state, id).await {
            tracing::error!(job = id, error = %e, "a bulk job stopped; it resumes when the monitor restarts");
        }
    });
}

async fn finish(state: &AppState, id: i64, how: &str) -> Result<()> {
    sqlx::query("UPDATE jobs SET state = $2, finished_at = now() WHERE id = $1")
        .bind(id)
        .bind(how)
        .execute(state.store().pool())
        .await?;
    tracing::info!(job = id, state = how, "bulk job finished");
    Ok(())
}

async fn abort_requested(state: &AppState, id: i64) -> Result<bool> {
    let (abort,): (bool,) = sqlx::query_as("SELECT abort_requested FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(state.store().pool())
        .await?;
    Ok(abort)
}

/// A replay job: one pass over the head of the dead-letter queue, one message at a time, each
/// recorded as an item. Messages left there (their task succeeded since) come back to the head
/// when the pass ends, or after a restart; a resumed job passes over the ones it has recorded.
async fn run_replay(state: &AppState, id: i64, dlq: &str, total: i32) -> Result<()> {
    let pool = state.store().pool();
    let recorded: Vec<(i32, String)> =
        sqlx::query_as("SELECT seq, task_id FROM job_items WHERE job_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(pool)
            .await?;
    let mut seq = recorded.last().map_or(0, |r| r.0);
    let seen: std::collections::HashSet<String> = recorded.into_iter().map(|r| r.1).collect();
    let mut reader = state.amqp().read_queue(dlq).await?;
    let mut how = "done";
    while seq < total {
        if abort_requested(state, id).await? {
            how = "aborted";
            break;
        }
        let Some(held) = reader.next().await? else {
            break;
        };
        let task_id = held.message.task_id().unwrap_or_default().to_owned();
        if seen.contains(&task_id) {
            continue;
        }
        seq += 1;
        let (status, message) =
            match crate::dead_letters::replay_held(state, dlq, &reader, &held).await {
                Ok(crate::dead_letters::Step::Replayed) => ("done", "replayed".to_owned()),
                Ok(crate::dead_letters::Step::SucceededSince) => (
                    "skipped",
                    "the task has succeeded since; left in the dead-letter queue".to_owned(),
                ),
                Err(e) => ("failed", e.to_string()),
            };
        sqlx::query(
            "INSERT INTO job_items (job_id, seq, task_id, status, message) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(seq)
        .bind(&task_id)
        .bind(status)
        .bind(message)
        .execute(pool)
        .await?;
    }
    reader.close().await;
    finish(state, id, how).await
}

async fn run(state: &AppState, id: i64) -> Result<()> {
    let pool = state.store().pool();
    let (kind, actor, reason, filter, total): (String, String, String, serde_json::Value, i32) =
        sqlx::query_as("SELECT kind, actor, reason, filter, total FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?;
    let kind =
        Kind::parse(&kind).ok_or_else(|| Error::Unavailable(format!("job {id}: kind {kind}")))?;
    if kind == Kind::Replay {
        let dlq = filter
            .get("dlq")
            .and_then(|d| d.as_str())
            .unwrap_or_default()
            .to_owned();
        return run_replay(state, id, &dlq, total).await;
    }
    loop {
        let (abort,): (bool,) = sqlx::query_as("SELECT abort_requested FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?;
        if abort {
            sqlx::query("UPDATE jobs SET state = 'aborted', finished_at = now() WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?;
            tracing::info!(job = id, "bulk job aborted");
            return Ok(());
        }
        let next: Option<(i32, String)> = sqlx::query_as(
            "SELECT seq, task_id FROM job_items WHERE job_id = $1 AND status = 'pending' \
             ORDER BY seq LIMIT 1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        let Some((seq, task_id)) = next else {
            sqlx::query("UPDATE jobs SET state = 'done', finished_at = now() WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?;
            tracing::info!(job = id, "bulk job done");
            return Ok(());
        };
        let asked = Asked {
            actor: actor.clone(),
            reason: Some(format!("{reason} (job {id})")),
            request_id: Some(format!("job-{id}-{seq}")),
        };
        let outcome = match kind {
            Kind::Retry => actions::retry(state, &task_id, &asked)
                .await
                .map(|r| format!("sent as {}", r.task_id)),
            Kind::Revoke => actions::revoke(state, &task_id, false, &asked)
                .await
                .map(|_| "revoked".to_owned()),
            Kind::Replay => unreachable!("replay jobs run in run_replay"),
        };
        let (status, message) = match outcome {
            Ok(m) => ("done", Some(m)),
            Err(e @ (Error::Conflict(_) | Error::NotFound(_))) => ("skipped", Some(e.to_string())),
            Err(e) => ("failed", Some(e.to_string())),
        };
        sqlx::query(
            "UPDATE job_items SET status = $3, message = $4 WHERE job_id = $1 AND seq = $2",
        )
        .bind(id)
        .bind(seq)
        .bind(status)
        .bind(message)
        .execute(pool)
        .await?;
    }
}
