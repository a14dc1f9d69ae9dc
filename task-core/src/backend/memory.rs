//! In-process result backend with the Redis backend's semantics (write-once SUCCESS, waiters woken
//! on every store). Uses tokio time, so tests with paused time see timeouts deterministically.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use serde_json::Value;

use super::chord::{ChordMember, ChordPart, ChordProgress};
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
    chords: Mutex<HashMap<String, Chord>>,
    groups: Mutex<HashMap<String, Value>>,
}

/// One chord's counters, as the Redis keys `.s`, `.j`, `.d` and `.c` hold them.
#[derive(Debug, Default)]
struct Chord {
    size: Option<u64>,
    /// `(group_index, arrival)` orders like the sorted set (ties by arrival).
    parts: std::collections::BTreeMap<(i64, usize), ChordMember>,
    seen: std::collections::HashSet<String>,
    claim: Option<String>,
    done: bool,
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

/// The Redis backend's chord rules, in memory (no expiry: claims never lapse).
impl MemoryBackend {
    /// See [`crate::RedisBackend::set_chord_size`].
    pub async fn set_chord_size(&self, group_id: &str, size: u64) -> crate::Result<()> {
        let mut chords = self.inner.chords.lock().expect("memory backend lock");
        let chord = chords.entry(group_id.to_owned()).or_default();
        chord.size = Some(size);
        chord.done = false;
        chord.claim = None;
        Ok(())
    }

    /// See [`crate::RedisBackend::chord_part_return`].
    pub async fn chord_part_return(&self, part: &ChordPart<'_>) -> crate::Result<ChordProgress> {
        let mut chords = self.inner.chords.lock().expect("memory backend lock");
        let chord = chords.entry(part.group_id.to_owned()).or_default();
        if chord.done {
            return Ok(ChordProgress::AlreadyDone);
        }
        let index = part.group_index.unwrap_or(i64::MAX);
        if chord.seen.insert(format!("{}:{index}", part.task_id)) {
            let arrival = chord.parts.len();
            chord.parts.insert(
                (index, arrival),
                ChordMember {
                    task_id: part.task_id.to_owned(),
                    state: part.state.as_str().to_owned(),
                    result: part.result.clone(),
                },
            );
        }
        let ready = chord.parts.len() as u64;
        let total = chord.size.or(part.fallback_size);
        if total != Some(ready) || chord.claim.is_some() {
            return Ok(ChordProgress::Waiting { ready, total });
        }
        let claim = uuid::Uuid::new_v4().simple().to_string();
        chord.claim = Some(claim.clone());
        Ok(ChordProgress::Complete {
            members: chord.parts.values().cloned().collect(),
            claim,
        })
    }

    /// See [`crate::RedisBackend::chord_cleanup`].
    pub async fn chord_cleanup(&self, group_id: &str, claim: &str) -> crate::Result<bool> {
        let mut chords = self.inner.chords.lock().expect("memory backend lock");
        let Some(chord) = chords.get_mut(group_id) else {
            return Ok(false);
        };
        if chord.claim.as_deref() != Some(claim) {
            return Ok(false);
        }
        *chord = Chord {
            done: true,
            claim: chord.claim.take(),
            ..Chord::default()
        };
        Ok(true)
    }

    /// See [`crate::RedisBackend::chord_abandon`].
    pub async fn chord_abandon(&self, group_id: &str) -> crate::Result<()> {
        if let Some(chord) = self
            .inner
            .chords
            .lock()
            .expect("memory backend lock")
            .get_mut(group_id)
        {
            chord.size = None;
        }
        Ok(())
    }

    /// See [`crate::RedisBackend::save_group`].
    pub async fn save_group(&self, group_id: &str, tuple: &Value) -> crate::Result<()> {
        self.inner
            .groups
            .lock()
            .expect("memory backend lock")
            .insert(group_id.to_owned(), tuple.clone());
        Ok(())
    }

    /// See [`crate::RedisBackend::restore_group`].
    pub async fn restore_group(&self, group_id: &str) -> crate::Result<Option<Value>> {
        Ok(self
            .inner
            .groups
            .lock()
            .expect("memory backend lock")
            .get(group_id)
            .cloned())
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
