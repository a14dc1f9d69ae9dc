//! The audit log: every action taken through the monitor, who took it and why (table
//! `audit_log`, append-only: a trigger refuses updates and deletes).
//!
//! The log itself is [`staff_auth::audit`], shared with billing's back-office. The actor is the
//! signed-in user; without sign-in, what an authenticating proxy in front of the monitor says
//! (`X-Forwarded-User`, else `X-Forwarded-Email`, as oauth2-proxy and most ingress
//! authenticators send), or `anonymous`. The pages put a `request_id` in every form, so a
//! double-submitted form retries a task once.

use axum::http::HeaderMap;

pub use staff_auth::audit::{Action, Entry, MAX_REASON, reason};

use crate::error::Result;
use crate::store::Store;

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

impl Store {
    /// Records `action`. With a `request_id` already recorded, nothing is written and the
    /// earlier entry is returned as `Err(earlier)`: the caller must not act again.
    pub async fn record(&self, action: &Action) -> Result<std::result::Result<Entry, Entry>> {
        Ok(staff_auth::audit::record(self.pool(), action).await?)
    }

    /// Entries newest first, `limit` of them, older than entry `before` when given (keyset).
    pub async fn audit(&self, before: Option<i64>, limit: i64) -> Result<Vec<Entry>> {
        Ok(staff_auth::audit::page(self.pool(), before, None, limit).await?)
    }
}
