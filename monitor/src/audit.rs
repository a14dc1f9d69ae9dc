//! The audit log: every action taken through the monitor, who took it and why (table
//! `audit_log`, append-only: a trigger refuses updates and deletes).
//!
//! Until sign-in exists, the actor is what an authenticating proxy in front of the monitor says
//! (`X-Forwarded-User`, else `X-Forwarded-Email`, as oauth2-proxy and most ingress
//! authenticators send), or `anonymous`. A request may carry a `request_id` (the pages put one
//! in every form): the same id twice is one action, so a double-submitted form retries a task
//! once.
//!
//! An action is recorded *before* it is taken, with what it will do (a retry's new task id is
//! chosen first); when taking it then fails, a second entry `<action>.failed` says why. So the
//! log never misses an action that happened, and never needs a row changed.

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::store::Store;

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

/// The actor of a request (see the module docs).
pub fn actor(headers: &HeaderMap) -> String {
    ["x-forwarded-user", "x-forwarded-email"]
        .iter()
        .find_map(|h| {
            headers
                .get(*h)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        })
        .map_or_else(|| "anonymous".to_owned(), |v| v.chars().take(200).collect())
}

/// A reason as stored: trimmed, bounded, `None` when empty.
pub fn reason(raw: Option<&str>) -> Option<String> {
    raw.map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| r.chars().take(MAX_REASON).collect())
}

impl Store {
    /// Records `action`. With a `request_id` already recorded, nothing is written and the
    /// earlier entry is returned as `Err(earlier)`: the caller must not act again.
    pub async fn record(&self, action: &Action) -> Result<std::result::Result<Entry, Entry>> {
        let inserted: Option<Entry> = sqlx::query_as(
            "INSERT INTO audit_log (actor, action, target, count, reason, detail, request_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (request_id) DO NOTHING
             RETURNING id, at, actor, action, target, count, reason, detail, request_id",
        )
        .bind(&action.actor)
        .bind(action.action)
        .bind(&action.target)
        .bind(action.count)
        .bind(&action.reason)
        .bind(&action.detail)
        .bind(&action.request_id)
        .fetch_optional(self.pool())
        .await?;
        match inserted {
            Some(e) => Ok(Ok(e)),
            None => {
                let earlier: Entry = sqlx::query_as(
                    "SELECT id, at, actor, action, target, count, reason, detail, request_id
                     FROM audit_log WHERE request_id = $1",
                )
                .bind(&action.request_id)
                .fetch_one(self.pool())
                .await?;
                Ok(Err(earlier))
            }
        }
    }

    /// Entries newest first, `limit` of them, older than entry `before` when given (keyset).
    pub async fn audit(&self, before: Option<i64>, limit: i64) -> Result<Vec<Entry>> {
        Ok(sqlx::query_as(
            "SELECT id, at, actor, action, target, count, reason, detail, request_id
             FROM audit_log WHERE ($1::bigint IS NULL OR id < $1)
             ORDER BY id DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }
}
