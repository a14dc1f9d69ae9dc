//! The worker's copy of revoked task ids, kept in step with the coordinator.
//!
//! A revoke reaches a worker two ways: the `revoke` control broadcast (at once, to workers that
//! are up) and the coordinator's set in Redis (loaded at start-up, then polled every
//! [`SYNC_INTERVAL`] for what changed), so a worker that was down or disconnected during the
//! broadcast still learns of it. Checking a message is a lookup in memory; nothing waits for
//! Redis on the delivery path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::State;
use crate::coord::RevokeCursor;

/// How often the worker asks the coordinator for revokes (and rate limits) changed elsewhere.
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub(crate) struct RevokedSet {
    ids: Mutex<HashMap<String, Instant>>,
    cursor: Mutex<Option<RevokeCursor>>,
}

impl RevokedSet {
    /// Adds ids, each holding for `ttl`.
    pub(crate) fn add(&self, ids: &[String], ttl: Duration) {
        let until = Instant::now() + ttl;
        let mut map = self.ids.lock().expect("revoked lock");
        for id in ids {
            map.insert(id.clone(), until);
        }
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        let map = self.ids.lock().expect("revoked lock");
        map.get(id).is_some_and(|until| *until > Instant::now())
    }

    /// Ids still revoked, sorted.
    pub(crate) fn ids(&self) -> Vec<String> {
        let now = Instant::now();
        let mut map = self.ids.lock().expect("revoked lock");
        map.retain(|_, until| *until > now);
        let mut ids: Vec<String> = map.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Takes what the coordinator knows that this copy does not.
    pub(crate) async fn load(&self, state: &State) {
        let coord = &state.coordinator;
        let cursor = self.cursor.lock().expect("cursor lock").clone();
        match coord.revoked_since(cursor).await {
            Ok((revoked, cursor)) => {
                if !revoked.is_empty() {
                    let now = Instant::now();
                    let mut map = self.ids.lock().expect("revoked lock");
                    for r in revoked {
                        map.insert(r.id, now + r.expires_in);
                    }
                }
                *self.cursor.lock().expect("cursor lock") = Some(cursor);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read revokes from the coordinator"),
        }
    }
}

/// Polls the coordinator for revokes and rate limits until stopped.
pub(super) async fn sync_loop(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    if matches!(state.coordinator, crate::coord::Coordinator::Memory(_)) {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        state.revoked.load(&state).await;
        state.apply_shared_rate_limits().await;
    }
}
