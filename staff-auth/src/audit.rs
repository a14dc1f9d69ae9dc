//! The audit log both staff UIs keep: every action a member of staff took, who took it, when,
//! on what, how many items it touched and why. One table, `audit_log`, in each application's
//! own schema (its migration creates it with the columns below and a trigger that refuses
//! updates and deletes, so rows are only ever added).
//!
//! An action is recorded *before* it is taken, with what it will do; when taking it then fails,
//! a second entry `<action>.failed` says why, so the log never misses an action that happened
//! and never needs a row changed. A request may carry a `request_id` (the pages put one in
//! every form): the same id twice is one action, so a double-submitted form acts once.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// Longest reason or note kept, in characters.
pub const MAX_REASON: usize = 500;

/// One action to record.
#[derive(Debug, Clone)]
pub struct Action {
    pub actor: String,
    pub action: &'static str,
    pub target: String,
    pub count: i32,
    pub reason: Option<String>,
    pub detail: Value,
    pub request_id: Option<String>,
}

/// A recorded action.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Entry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub count: i32,
    pub reason: Option<String>,
    pub detail: Value,
    pub request_id: Option<String>,
}

macro_rules! columns {
    () => {
        "id, at, actor, action, target, count, reason, detail, request_id"
    };
}

/// A reason as stored: trimmed, bounded, `None` when empty.
pub fn reason(raw: Option<&str>) -> Option<String> {
    raw.map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| r.chars().take(MAX_REASON).collect())
}

/// Records `action`. With its `request_id` already recorded, nothing is written and the
/// earlier entry is returned as `Err(earlier)`: the caller must not act again.
pub async fn record(pool: &PgPool, action: &Action) -> Result<Result<Entry, Entry>, sqlx::Error> {
    record_in(&mut *pool.acquire().await?, action).await
}

/// [`record`] inside the caller's transaction, so the entry commits with what it records, or
/// neither does.
pub async fn record_in(
    conn: &mut sqlx::PgConnection,
    action: &Action,
) -> Result<Result<Entry, Entry>, sqlx::Error> {
    let inserted: Option<Entry> = sqlx::query_as(concat!(
        "INSERT INTO audit_log (actor, action, target, count, reason, detail, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (request_id) DO NOTHING
         RETURNING ",
        columns!()
    ))
    .bind(&action.actor)
    .bind(action.action)
    .bind(&action.target)
    .bind(action.count)
    .bind(&action.reason)
    .bind(&action.detail)
    .bind(&action.request_id)
    .fetch_optional(&mut *conn)
    .await?;
    match inserted {
        Some(e) => Ok(Ok(e)),
        None => {
            let earlier: Entry = sqlx::query_as(concat!(
                "SELECT ",
                columns!(),
                " FROM audit_log WHERE request_id = $1"
            ))
            .bind(&action.request_id)
            .fetch_one(&mut *conn)
            .await?;
            Ok(Err(earlier))
        }
    }
}

/// Entries newest first, `limit` of them, older than entry `before` when given (keyset), only
/// those on `targets` when given.
pub async fn page(
    pool: &PgPool,
    before: Option<i64>,
    targets: Option<&[String]>,
    limit: i64,
) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM audit_log
         WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text[] IS NULL OR target = ANY($2))
         ORDER BY id DESC LIMIT $3"
    ))
    .bind(before)
    .bind(targets)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The header of [`csv`]'s output.
pub const CSV_HEADER: &str = "id,at_utc,actor,action,target,count,reason,detail\r\n";

/// The whole log (or the entries on `targets`) as CSV, newest first, UTC times.
pub async fn csv(pool: &PgPool, targets: Option<&[String]>) -> Result<String, sqlx::Error> {
    let mut out = String::from(CSV_HEADER);
    let mut before = None;
    loop {
        let entries = page(pool, before, targets, 1000).await?;
        for e in &entries {
            out.push_str(&csv_line(&[
                &e.id.to_string(),
                &e.at.to_rfc3339(),
                &e.actor,
                &e.action,
                &e.target,
                &e.count.to_string(),
                e.reason.as_deref().unwrap_or_default(),
                &e.detail.to_string(),
            ]));
        }
        if entries.len() < 1000 {
            return Ok(out);
        }
        before = entries.last().map(|e| e.id);
    }
}

/// A CSV field: quoted when it holds a comma, quote or line break; a leading `=`, `+`, `-` or
/// `@` is prefixed with `'` so a spreadsheet does not run it as a formula.
pub fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// One CSV record of `fields`, with its `\r\n`.
pub fn csv_line(fields: &[&str]) -> String {
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(csv_field("-5"), "'-5");
        assert_eq!(csv_line(&["1", "x,y"]), "1,\"x,y\"\r\n");
    }
}
