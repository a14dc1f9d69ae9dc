//! The in-process side: the same state as the Redis keys, in maps behind one mutex, on tokio's
//! clock (so tests can pause it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::backoff::RateLimit;

/// Coordination state in this process. Cheap to clone: clones share the state.
#[derive(Clone, Default)]
pub struct MemoryCoordinator {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemoryCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCoordinator").finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(super) struct State {
    /// Identifies this state in cursors, like `tq:revoked:meta` `epoch`.
    pub(super) epoch: String,
    /// Last revoke sequence number handed out.
    pub(super) seq: u64,
    /// Revoked id → (expiry, sequence number).
    pub(super) revoked: HashMap<String, (Instant, u64)>,
    /// Rate key → theoretical arrival time of the next start.
    pub(super) rate: HashMap<String, Instant>,
    /// Concurrency key → holder → lease expiry.
    pub(super) conc: HashMap<String, HashMap<String, Instant>>,
    /// Rate limits set at run time.
    pub(super) limits: HashMap<String, RateLimit>,
    /// Idempotency key → expiry.
    pub(super) once: HashMap<String, Instant>,
    /// Lock key → (value `<token>:<fence>`, expiry).
    pub(super) locks: HashMap<String, (String, Instant)>,
    /// Counter key → (count, expiry).
    pub(super) counters: HashMap<String, (u64, Instant)>,
    /// Lock key → last fencing number.
    pub(super) fences: HashMap<String, u64>,
}

impl Default for State {
    fn default() -> Self {
        State {
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            seq: 0,
            revoked: HashMap::new(),
            rate: HashMap::new(),
            conc: HashMap::new(),
            limits: HashMap::new(),
            once: HashMap::new(),
            locks: HashMap::new(),
            fences: HashMap::new(),
            counters: HashMap::new(),
        }
    }
}

impl MemoryCoordinator {
    /// The state, locked. Never held across an `.await`.
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than losing the whole state, so keep going with what is there.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
