//! The monitor's PostgreSQL store: schema `monitor`, migrations embedded and applied at start-up,
//! one row per task and per worker.
//!
//! Invariants:
//! - **Every connection's `search_path` is `monitor`**, and so is the migrations table: the store
//!   can live in a database shared with other services.
//! - **A batch is one transaction.** [`Store::write_batch`] reads the batch's tasks `FOR UPDATE`,
//!   folds the events in with Celery's rules ([`crate::event`]) and writes them back; the caller
//!   acknowledges the messages only after it returns `Ok`. Replaying a batch (a redelivery after a
//!   crash) gives the same rows.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::error::{Error, Result};
use crate::event::{Event, TaskRecord, WorkerRecord};

/// The schema the monitor's tables live in.
pub const SCHEMA: &str = "monitor";

/// The store's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub(crate) const TASK_COLUMNS: &str = "uuid, name, state, args, kwargs, root_id, parent_id, retries, eta, \
    expires, sent, received, started, succeeded, failed, retried, revoked, rejected, \"timestamp\", \
    runtime, result, exception, traceback, worker, client, exchange, routing_key, queue, clock";

const WORKER_COLUMNS: &str = "hostname, last_heartbeat, freq, offline_at, first_seen, pid, clock, \
    active, processed, loadavg, sw_ident, sw_ver, sw_sys";

/// A task that reached a final stage in a batch, for the completion counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// Task name (`<unknown>` when its task-received was never seen).
    pub task: String,
    /// `success`, `failure`, `retry`, `revoked` or `rejected`.
    pub outcome: &'static str,
}

/// What one batch changed.
#[derive(Debug, Default)]
pub struct BatchSummary {
    /// Task rows written.
    pub tasks: usize,
    /// Worker rows written.
    pub workers: usize,
    /// Completion events seen, with the task's name as known after the merge.
    pub completed: Vec<Completed>,
    /// Runtimes and queue waits the batch's events told.
    pub timings: Vec<Timing>,
    /// Each task event as (worker, type, task name), for Flower's `flower_events_total`.
    pub task_events: Vec<(String, String, String)>,
}

/// How long a task ran, or waited between being received and started.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub task: String,
    pub worker: String,
    pub queue: String,
    /// `true`: the runtime (task-succeeded); `false`: received → started (task-started).
    pub runtime: bool,
    pub seconds: f64,
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

/// Filters and order of a task listing (Flower's `/api/tasks` parameters).
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    /// Exact task name.
    pub name: Option<String>,
    /// Exact state.
    pub state: Option<String>,
    /// Exact worker node name.
    pub worker: Option<String>,
    /// Received at or after (Unix seconds).
    pub received_start: Option<f64>,
    /// Received before (Unix seconds).
    pub received_end: Option<f64>,
    /// Search terms (see [`crate::search`]).
    pub search: Vec<crate::search::Term>,
    /// `name`, `state`, `received` or `started`, `-` for descending; default newest first.
    pub sort_by: Option<String>,
    /// Rows to skip.
    pub offset: u64,
    /// Rows to return (default 100, at most 10 000).
    pub limit: Option<u64>,
    /// Keyset cursor for the default order: only tasks strictly older than this
    /// (received, uuid).
    pub before: Option<(f64, String)>,
}

/// The most rows one listing returns.
pub const MAX_LIMIT: u64 = 10_000;

impl Store {
    /// Connects to `url`, creating the database if it does not exist, the schema and every
    /// pending migration.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let shown = task_core::redact_url(url);
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| Error::Config(format!("MONITOR_DATABASE_URL {shown}: {e}")))?;
        create_database_if_missing(&options, &shown).await?;
        // The schema first, on a connection of its own: the pool's search_path names it.
        let setup = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(|e| unavailable(&shown, e))?;
        sqlx::query("CREATE SCHEMA IF NOT EXISTS monitor")
            .execute(&setup)
            .await
            .map_err(|e| unavailable(&shown, e))?;
        setup.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.options([("search_path", SCHEMA)]))
            .await
            .map_err(|e| unavailable(&shown, e))?;
        MIGRATOR.run(&pool).await?;
        Ok(Store { pool })
    }

    /// The pool (for tests and ad-hoc queries).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Folds `events` into the task and worker rows in one transaction.
    pub async fn write_batch(&self, events: &[Event]) -> Result<BatchSummary> {
        let mut summary = BatchSummary::default();
        let mut task_events: Vec<&Event> = Vec::new();
        let mut workers: HashMap<String, WorkerRecord> = HashMap::new();
        for event in events {
            let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
            if kind.starts_with("task-") && event.get("uuid").and_then(Value::as_str).is_some() {
                task_events.push(event);
            } else if let Some(w) = WorkerRecord::from_event(event) {
                match workers.get_mut(&w.hostname) {
                    Some(known) => known.merge(w),
                    None => {
                        workers.insert(w.hostname.clone(), w);
                    }
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        if !task_events.is_empty() {
            let mut ids: Vec<String> = task_events
                .iter()
                .filter_map(|e| e.get("uuid").and_then(Value::as_str).map(str::to_owned))
                .collect();
            ids.sort();
            ids.dedup();
            // Locked in id order, so two writers never deadlock on the same tasks.
            let existing: Vec<TaskRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE uuid = ANY($1) ORDER BY uuid FOR UPDATE"
            )))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            let mut tasks: HashMap<String, TaskRecord> =
                existing.into_iter().map(|t| (t.uuid.clone(), t)).collect();
            let mut finished: Vec<(String, &'static str)> = Vec::new();
            for event in &task_events {
                let uuid = event.get("uuid").and_then(Value::as_str).unwrap_or("");
                let record = tasks
                    .entry(uuid.to_owned())
                    .or_insert_with(|| TaskRecord::new(uuid));
                record.apply(event);
                let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
                let task = record.name.clone().unwrap_or_else(|| "<unknown>".into());
                let worker = event
                    .get("hostname")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| record.worker.clone())
                    .unwrap_or_default();
                let timing = match kind {
                    "task-succeeded" => event
                        .get("runtime")
                        .and_then(Value::as_f64)
                        .map(|s| (true, s)),
                    "task-started" => match (record.received, record.started) {
                        (Some(r), Some(s)) if s >= r => Some((false, s - r)),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some((runtime, seconds)) = timing {
                    summary.timings.push(Timing {
                        task: task.clone(),
                        worker: worker.clone(),
                        queue: record
                            .routing_key
                            .clone()
                            .or_else(|| record.queue.clone())
                            .unwrap_or_default(),
                        runtime,
                        seconds,
                    });
                }
                summary.task_events.push((worker, kind.to_owned(), task));
                let outcome = match event.get("type").and_then(Value::as_str) {
                    Some("task-succeeded") => Some("success"),
                    Some("task-failed") => Some("failure"),
                    Some("task-retried") => Some("retry"),
                    Some("task-revoked") => Some("revoked"),
                    Some("task-rejected") => Some("rejected"),
                    _ => None,
                };
                if let Some(outcome) = outcome {
                    finished.push((uuid.to_owned(), outcome));
                }
            }
            summary.completed = finished
                .into_iter()
                .map(|(uuid, outcome)| Completed {
                    task: tasks
                        .get(&uuid)
                        .and_then(|t| t.name.clone())
                        .unwrap_or_else(|| "<unknown>".into()),
                    outcome,
                })
                .collect();
            let rows: Vec<TaskRecord> = tasks.into_values().collect();
            summary.tasks = rows.len();
            let updates = TASK_COLUMNS
                .split(", ")
                .filter(|c| *c != "uuid")
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO tasks ({TASK_COLUMNS}, updated_at) \
                 SELECT {TASK_COLUMNS}, now() FROM jsonb_populate_recordset(NULL::tasks, $1) \
                 ON CONFLICT (uuid) DO UPDATE SET {updates}, updated_at = now()"
            )))
            .bind(sqlx::types::Json(&rows))
            .execute(&mut *tx)
            .await?;
        }
        if !workers.is_empty() {
            let mut rows: Vec<WorkerRecord> = workers.into_values().collect();
            rows.sort_by(|a, b| a.hostname.cmp(&b.hostname));
            summary.workers = rows.len();
            // The newest event's fields win; the first and the last goodbye are kept.
            let newer = "EXCLUDED.last_heartbeat >= workers.last_heartbeat";
            let updates = WORKER_COLUMNS
                .split(", ")
                .filter(|c| !matches!(*c, "hostname" | "offline_at" | "first_seen"))
                .map(|c| format!("{c} = CASE WHEN {newer} THEN EXCLUDED.{c} ELSE workers.{c} END"))
                .collect::<Vec<_>>()
                .join(", ");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO workers ({WORKER_COLUMNS}, updated_at) \
                 SELECT {WORKER_COLUMNS}, now() FROM jsonb_populate_recordset(NULL::workers, $1) \
                 ON CONFLICT (hostname) DO UPDATE SET {updates}, \
                 offline_at = GREATEST(workers.offline_at, EXCLUDED.offline_at), \
                 first_seen = LEAST(workers.first_seen, EXCLUDED.first_seen), updated_at = now()"
            )))
            .bind(sqlx::types::Json(&rows))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(summary)
    }

    /// One task by id.
    pub async fn task(&self, uuid: &str) -> Result<Option<TaskRecord>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE uuid = $1"
        )))
        .bind(uuid)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The ids of the tasks whose parent is one of `parents`, per parent.
    pub async fn children(&self, parents: &[String]) -> Result<HashMap<String, Vec<String>>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT parent_id, uuid FROM tasks WHERE parent_id = ANY($1) \
             ORDER BY received NULLS LAST, uuid",
        )
        .bind(parents)
        .fetch_all(&self.pool)
        .await?;
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for (parent, child) in rows {
            out.entry(parent).or_default().push(child);
        }
        Ok(out)
    }

    /// Tasks matching `query`, in its order.
    pub async fn tasks(&self, query: &TaskQuery) -> Result<Vec<TaskRecord>> {
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE true"));
        push_filters(&mut q, query);
        let (column, descending) = match query.sort_by.as_deref() {
            None => (None, true),
            Some(s) => (Some(s.trim_start_matches('-')), s.starts_with('-')),
        };
        match column {
            None | Some("received") => {
                let newest_first = column.is_none() || descending;
                if let Some((received, uuid)) = &query.before
                    && newest_first
                {
                    q.push(" AND (received, uuid) < (")
                        .push_bind(*received)
                        .push(", ")
                        .push_bind(uuid.clone())
                        .push(")");
                }
                q.push(if newest_first {
                    " ORDER BY received DESC NULLS LAST, uuid DESC"
                } else {
                    " ORDER BY received ASC NULLS LAST, uuid ASC"
                });
            }
            Some(c @ ("name" | "state" | "started")) => {
                let dir = if descending { "DESC" } else { "ASC" };
                q.push(format!(" ORDER BY {c} {dir} NULLS LAST, uuid {dir}"));
            }
            Some(other) => {
                return Err(Error::BadRequest(format!(
                    "Invalid sort_by '{other}', expected one of name, received, started, state"
                )));
            }
        }
        let limit = query.limit.unwrap_or(100).min(MAX_LIMIT);
        q.push(" LIMIT ")
            .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
        q.push(" OFFSET ")
            .push_bind(i64::try_from(query.offset).unwrap_or(i64::MAX));
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }

    /// How many tasks `query`'s filters match (its order and pages aside).
    pub async fn count_tasks(&self, query: &TaskQuery) -> Result<i64> {
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT count(*) FROM tasks WHERE true");
        push_filters(&mut q, query);
        let (n,): (i64,) = q.build_query_as().fetch_one(&self.pool).await?;
        Ok(n)
    }

    /// Tasks per state among those received (or, lacking that, last changed) since `since`.
    pub async fn state_counts(&self, since: f64) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT state, count(*) FROM tasks WHERE COALESCE(received, \"timestamp\") >= $1 \
             GROUP BY state ORDER BY count(*) DESC, state",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Finished tasks per `bucket` seconds since `since`: (bucket start, succeeded, failed).
    pub async fn throughput(&self, since: f64, bucket: f64) -> Result<Vec<(f64, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT floor(\"timestamp\" / $2) * $2 AS t, \
                    count(*) FILTER (WHERE state = 'SUCCESS'), \
                    count(*) FILTER (WHERE state = 'FAILURE') \
             FROM tasks WHERE \"timestamp\" >= $1 AND state IN ('SUCCESS', 'FAILURE') \
             GROUP BY 1 ORDER BY 1",
        )
        .bind(since)
        .bind(bucket)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Failures since `since` grouped by task and exception class: (task, class, count, newest
    /// failure time, one task id), most frequent first.
    pub async fn failure_groups(
        &self,
        since: f64,
        limit: i64,
    ) -> Result<Vec<(String, String, i64, f64, String)>> {
        Ok(sqlx::query_as(
            "SELECT COALESCE(name, '<unknown>'), \
                    COALESCE(NULLIF(split_part(exception, '(', 1), ''), '<none>') AS class, \
                    count(*), max(COALESCE(failed, \"timestamp\", 0)), max(uuid) \
             FROM tasks WHERE state = 'FAILURE' AND COALESCE(failed, \"timestamp\") >= $1 \
             GROUP BY 1, 2 ORDER BY 3 DESC, 1 LIMIT $2",
        )
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The tasks of the workflow rooted at `root_id` (the root too), oldest first, at most
    /// `limit`.
    pub async fn workflow(&self, root_id: &str, limit: i64) -> Result<Vec<TaskRecord>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE root_id = $1 OR uuid = $1 \
             ORDER BY received NULLS FIRST, uuid LIMIT $2"
        )))
        .bind(root_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every worker seen, by name.
    pub async fn workers(&self) -> Result<Vec<WorkerRecord>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {WORKER_COLUMNS} FROM workers ORDER BY hostname"
        )))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn unavailable(shown: &str, e: sqlx::Error) -> Error {
    Error::Unavailable(format!(
        "cannot use MONITOR_DATABASE_URL {shown}: {e} (is PostgreSQL running?)"
    ))
}

/// Creates the database `options` names when the server says it does not exist (SQLSTATE 3D000),
/// through the server's `postgres` database.
async fn create_database_if_missing(options: &PgConnectOptions, shown: &str) -> Result<()> {
    match sqlx::ConnectOptions::connect(options).await {
        Ok(conn) => {
            let _ = sqlx::Connection::close(conn).await;
            Ok(())
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let name = options.get_database().unwrap_or("monitor").to_owned();
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::Config(format!(
                    "database `{name}` in MONITOR_DATABASE_URL {shown} does not exist; create it \
                     (the monitor creates only databases named with letters, digits and `_`)"
                )));
            }
            let admin = options.clone().database("postgres");
            let mut conn = sqlx::ConnectOptions::connect(&admin)
                .await
                .map_err(|e| unavailable(shown, e))?;
            let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut conn)
                .await;
            let _ = sqlx::Connection::close(conn).await;
            match created {
                Ok(_) => {
                    tracing::info!(database = name, "created the monitor's database");
                    Ok(())
                }
                // Another replica created it first.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
                Err(e) => Err(unavailable(shown, e)),
            }
        }
        Err(e) => Err(unavailable(shown, e)),
    }
}

/// The `WHERE` conditions of `query` after a `WHERE true`.
pub(crate) fn push_filters(q: &mut QueryBuilder<Postgres>, query: &TaskQuery) {
    if let Some(name) = &query.name {
        q.push(" AND name = ").push_bind(name.clone());
    }
    if let Some(state) = &query.state {
        q.push(" AND state = ").push_bind(state.clone());
    }
    if let Some(worker) = &query.worker {
        q.push(" AND worker = ").push_bind(worker.clone());
    }
    if let Some(t) = query.received_start {
        q.push(" AND received >= ").push_bind(t);
    }
    if let Some(t) = query.received_end {
        q.push(" AND received < ").push_bind(t);
    }
    for term in &query.search {
        term.push_sql(q);
    }
}
