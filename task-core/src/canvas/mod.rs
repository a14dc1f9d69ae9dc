//! The canvas: chains, groups, chords and callbacks, in Celery's wire form, so that workflows
//! built in Python run through Rust workers and the other way round.
//!
//! - [`Signature`] and [`chain`], [`group`], [`chord`] build the same dicts as Python's
//!   `celery.canvas`; [`Client::apply`] and [`Client::apply_group`] send them as
//!   `apply_async` does (`apply.rs`).
//! - The worker runs a message's `embed` as Celery's tracer does (`tracer.rs`), counting chord
//!   parts in the result backend's chord keys (`backend/chord.rs`).
//! - [`GroupResult`] reads a group's results and saves it as Celery's `save_group`.

mod apply;
mod signature;
pub(crate) mod tracer;

use std::time::Duration;

use serde_json::{Map, Value};

pub use signature::{Signature, chain, chord, group};

use crate::client::{AsyncResult, Client};
use crate::error::{Error, Result};

impl Client {
    /// Sends a task, chain or chord signature; the result is the last task's (a chain) or the
    /// body's (a chord). A group is sent too, and its first result returned: use
    /// [`Client::apply_group`] for all of them.
    pub async fn apply(&self, sig: &Signature) -> Result<AsyncResult<Value>> {
        let tuple = apply::apply(self, sig, Vec::new(), Map::new()).await?;
        Ok(self.result(tuple_id(&tuple)?))
    }

    /// Sends a group signature; the handle reads every member's result in order.
    pub async fn apply_group(&self, sig: &Signature) -> Result<GroupResult> {
        if sig.subtask_type.as_deref() != Some("group") {
            return Err(Error::Config(format!(
                "apply_group needs a group signature, got `{}`",
                sig.task
            )));
        }
        let tuple = apply::apply(self, sig, Vec::new(), Map::new()).await?;
        GroupResult::from_tuple(self, &tuple)
    }
}

fn tuple_id(tuple: &Value) -> Result<String> {
    tuple[0][0]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Backend(format!("not a result tuple: {tuple}")))
}

/// The results of a group's members (Python's `GroupResult`).
#[derive(Debug, Clone)]
pub struct GroupResult {
    id: String,
    results: Vec<AsyncResult<Value>>,
    client: Client,
}

impl GroupResult {
    fn from_tuple(client: &Client, tuple: &Value) -> Result<Self> {
        let id = tuple_id(tuple)?;
        let results = tuple[1]
            .as_array()
            .ok_or_else(|| Error::Backend(format!("group {id} has no member list")))?
            .iter()
            .map(|t| tuple_id(t).map(|id| client.result(id)))
            .collect::<Result<_>>()?;
        Ok(GroupResult {
            id,
            results,
            client: client.clone(),
        })
    }

    /// The group id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The members' results, in order.
    pub fn results(&self) -> &[AsyncResult<Value>] {
        &self.results
    }

    /// Celery's `as_tuple()`: `[[gid, null], [[[id, null], null], ...]]`.
    pub fn as_tuple(&self) -> Value {
        let members: Vec<Value> = self
            .results
            .iter()
            .map(|r| serde_json::json!([[r.id(), null], null]))
            .collect();
        serde_json::json!([[self.id, null], members])
    }

    /// Saves the group under `celery-taskset-meta-<gid>` (Python's `GroupResult.save()`), so
    /// `GroupResult.restore(gid)` finds it on either side.
    pub async fn save(&self) -> Result<()> {
        self.client
            .backend()
            .save_group(&self.id, &self.as_tuple())
            .await
    }

    /// A group saved by either side, or `None`.
    pub async fn restore(client: &Client, group_id: &str) -> Result<Option<Self>> {
        match client.backend().restore_group(group_id).await? {
            Some(tuple) => Self::from_tuple(client, &tuple).map(Some),
            None => Ok(None),
        }
    }

    /// Waits for every member and returns their values in order; the first failure is the
    /// error, as Python's `GroupResult.get()`.
    pub async fn get(&self, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(self.results.len());
        for r in &self.results {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            out.push(r.get(left).await?);
        }
        Ok(out)
    }
}
