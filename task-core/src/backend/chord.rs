//! Chord bookkeeping in the result backend, as Celery's Redis backend keeps it
//! (`RedisBackend.on_chord_part_return`, the path without `celery.chord_unlock`).
//!
//! Under `celery-taskset-meta-<gid>`: `.s` holds the header size (written by the client that
//! applies the chord), `.t` a size delta, `.j` a sorted set of `[1, task_id, state, result]`
//! scored by `group_index`, `.d` the members already counted (a redelivered header task counts
//! once), and `.c` the claim of the one worker that fires the body, then `"done"`. Python 5.7
//! workers and this crate's workers count in the same keys, so a chord whose header runs on
//! both kinds of workers fires its body exactly once, on whichever finishes last.

use serde_json::Value;

use super::TaskState;

/// One finished header task.
#[derive(Debug, Clone, Copy)]
pub struct ChordPart<'a> {
    /// The chord's group id (the header tasks' `group` header).
    pub group_id: &'a str,
    /// The header task.
    pub task_id: &'a str,
    /// Its position in the header (orders the results handed to the body).
    pub group_index: Option<i64>,
    /// How it ended.
    pub state: TaskState,
    /// Its return value, or the exception dict.
    pub result: &'a Value,
    /// Header size to use when the client did not write `.s` (a `chord_size` in the body).
    pub fallback_size: Option<u64>,
}

/// A header task's entry, as read back when the chord completes.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordMember {
    /// Header task id.
    pub task_id: String,
    /// Its state name (`SUCCESS`, `FAILURE`, ...).
    pub state: String,
    /// Its result (exception dict for exception states).
    pub result: Value,
}

/// What recording a header task's result led to.
#[derive(Debug, Clone, PartialEq)]
pub enum ChordProgress {
    /// The body was already fired (or the chord cleaned up): nothing to do.
    AlreadyDone,
    /// Not every header task has finished (or another worker holds the claim).
    Waiting {
        /// Results recorded so far.
        ready: u64,
        /// Expected results, when known.
        total: Option<u64>,
    },
    /// This caller holds the claim: it must fire the body with `members` (in header order)
    /// and then call `chord_cleanup` with `claim`.
    Complete {
        /// Every header task's entry, in `group_index` order.
        members: Vec<ChordMember>,
        /// The claim token.
        claim: String,
    },
}

/// The `[1, task_id, state, result]` entry Celery stores in `.j`.
pub(crate) fn encode_part(part: &ChordPart<'_>) -> Value {
    serde_json::json!([1, part.task_id, part.state.as_str(), part.result])
}

/// Reads an entry of `.j`; `None` if it is not one.
pub(crate) fn decode_part(bytes: &[u8]) -> Option<ChordMember> {
    let v: Value = super::decode_stored(bytes)?;
    let a = v.as_array()?;
    Some(ChordMember {
        task_id: a.get(1)?.as_str()?.to_owned(),
        state: a.get(2)?.as_str()?.to_owned(),
        result: a.get(3).cloned().unwrap_or(Value::Null),
    })
}

/// How long a claim holds before another worker may take over a crashed one (Celery: twice the
/// default join timeout of 5 s).
pub(crate) const CLAIM_SECS: u64 = 10;
/// How long the `done` marker keeps late duplicates from re-firing the body.
pub(crate) const DONE_SECS: u64 = 300;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chord_entries_read_in_json_and_in_msgpack() {
        let result = serde_json::json!({"n": 1});
        let p = ChordPart {
            group_id: "g",
            task_id: "t1",
            group_index: Some(0),
            state: crate::TaskState::Success,
            result: &result,
            fallback_size: None,
        };
        for ct in [
            crate::protocol::ContentType::Json,
            crate::protocol::ContentType::Msgpack,
        ] {
            let bytes = crate::backend::encode_stored(ct, &encode_part(&p)).unwrap();
            let m = decode_part(&bytes).unwrap();
            assert_eq!((m.task_id.as_str(), m.state.as_str()), ("t1", "SUCCESS"));
            assert_eq!(m.result, result);
        }
    }
    use crate::MemoryBackend;

    fn part<'a>(task_id: &'a str, index: i64, result: &'a Value) -> ChordPart<'a> {
        ChordPart {
            group_id: "g",
            task_id,
            group_index: Some(index),
            state: TaskState::Success,
            result,
            fallback_size: None,
        }
    }

    #[tokio::test]
    async fn the_last_part_claims_once_and_a_duplicate_counts_once() {
        let backend = MemoryBackend::new();
        backend.set_chord_size("g", 2).await.unwrap();
        let (one, two) = (Value::from(1), Value::from(2));
        let first = backend
            .chord_part_return(&part("b", 1, &two))
            .await
            .unwrap();
        assert!(matches!(
            first,
            ChordProgress::Waiting {
                ready: 1,
                total: Some(2)
            }
        ));
        // A redelivered copy of the same header task does not complete the chord.
        let again = backend
            .chord_part_return(&part("b", 1, &two))
            .await
            .unwrap();
        assert!(matches!(again, ChordProgress::Waiting { ready: 1, .. }));
        let ChordProgress::Complete { members, claim } = backend
            .chord_part_return(&part("a", 0, &one))
            .await
            .unwrap()
        else {
            panic!("the last part completes the chord");
        };
        let results: Vec<_> = members.iter().map(|m| m.result.clone()).collect();
        assert_eq!(
            results,
            vec![one.clone(), two.clone()],
            "in group_index order"
        );
        assert!(backend.chord_cleanup("g", &claim).await.unwrap());
        let late = backend
            .chord_part_return(&part("a", 0, &one))
            .await
            .unwrap();
        assert_eq!(late, ChordProgress::AlreadyDone);
    }

    #[test]
    fn entries_are_celerys() {
        let result = Value::from(5);
        let entry = encode_part(&part("t", 0, &result));
        assert_eq!(entry, serde_json::json!([1, "t", "SUCCESS", 5]));
        let back = decode_part(&serde_json::to_vec(&entry).unwrap()).unwrap();
        assert_eq!(
            (back.task_id.as_str(), back.state.as_str()),
            ("t", "SUCCESS")
        );
    }
}
