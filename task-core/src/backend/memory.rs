//! In-process result backend with the Redis backend's semantics (write-once SUCCESS, waiters woken
//! on every store). Uses tokio time, so tests with paused time see timeouts deterministically.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::{ResultBackend, StoreOutcome, TaskMeta, TaskState};
use crate::error::{Error, Result};

/// An in-memory result backend. Clones share the same store.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    results: Mutex<HashMap<String, TaskMeta>>,
    changed: Notify,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every stored meta, for assertions in tests.
    pub fn snapshot(&self) -> HashMap<String, TaskMeta> {
        self.inner
            .results
            .lock()
            .expect("memory backend lock")
            .clone()
    }
}

impl ResultBackend for MemoryBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<StoreOutcome> {
        {
            let mut results = self.inner.results.lock().expect("memory backend lock");
            if results
                .get(&meta.task_id)
                .is_some_and(|m| matches!(m.status, TaskState::Success | TaskState::Revoked))
            {
                return Ok(StoreOutcome::KeptSuccess);
            }
            results.insert(meta.task_id.clone(), meta.clone());
        }
        self.inner.changed.notify_waiters();
        Ok(StoreOutcome::Stored)
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>> {
        Ok(self
            .inner
            .results
            .lock()
            .expect("memory backend lock")
            .get(task_id)
            .cloned())
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<TaskMeta> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(meta) = self.get(task_id).await?
                && meta.status.is_ready()
            {
                return Ok(meta);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(Error::Timeout(timeout));
            }
        }
    }

    async fn forget(&self, task_id: &str) -> Result<()> {
        self.inner
            .results
            .lock()
            .expect("memory backend lock")
            .remove(task_id);
        Ok(())
    }
}
