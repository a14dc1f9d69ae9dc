//! Celery's `rpc://` result backend, worker side: each state of a task is sent as a message to
//! the caller's own reply queue (the task message's `reply_to`), with the message's correlation
//! id (or the task id), as Celery's `RPCBackend.store_result` does. Nothing is stored: a Python
//! client configured with `backend='rpc://'` gets its results from that queue.
//!
//! What this side cannot do, it says: a Rust client cannot wait on an `rpc://` result (it has
//! no reply queue of its own here), and `get` finds nothing (so a duplicate delivery cannot be
//! recognised by its stored result; the worker's in-process duplicate check still applies).

use std::time::Duration;

use serde_json::Map;

use super::{ResultBackend, StoreOutcome, TaskMeta};
use crate::broker::AnyBroker;
use crate::error::{Error, Result};
use crate::protocol::{ContentType, Properties, RawMessage};

/// Sends results to reply queues (see the module documentation). Cheap to clone.
#[derive(Clone, Debug)]
pub struct RpcBackend {
    broker: AnyBroker,
    persistent: bool,
    serializer: ContentType,
}

impl RpcBackend {
    /// Replies through `broker`, transient (Celery's `result_persistent=False`) and in JSON.
    pub fn new(broker: AnyBroker) -> Self {
        RpcBackend {
            broker,
            persistent: false,
            serializer: ContentType::Json,
        }
    }

    /// Replies as persistent messages (`result_persistent=True`).
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Encodes replies with `serializer` (Celery's `result_serializer`).
    pub fn with_serializer(mut self, serializer: ContentType) -> Self {
        self.serializer = serializer;
        self
    }
}

impl ResultBackend for RpcBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<StoreOutcome> {
        // A caller that gave no reply queue asked for no result (Celery returns quietly too).
        let Some(reply) = &meta.reply_to else {
            return Ok(StoreOutcome::Stored);
        };
        let (content_type, encoding) = match self.serializer {
            ContentType::Json => ("application/json", "utf-8"),
            ContentType::Msgpack => ("application/x-msgpack", "binary"),
        };
        let message = RawMessage {
            headers: Map::new(),
            properties: Properties {
                content_type: Some(content_type.to_owned()),
                content_encoding: Some(encoding.to_owned()),
                correlation_id: Some(reply.correlation_id.clone()),
                delivery_mode: Some(if self.persistent { 2 } else { 1 }),
                ..Properties::default()
            },
            body: meta.encode(self.serializer)?,
        };
        if !self.broker.publish_reply(&reply.queue, &message).await? {
            tracing::info!(
                task_id = %meta.task_id,
                reply_to = %reply.queue,
                "the caller's reply queue is gone; result dropped"
            );
        }
        Ok(StoreOutcome::Stored)
    }

    async fn get(&self, _task_id: &str) -> Result<Option<TaskMeta>> {
        Ok(None)
    }

    async fn wait(&self, task_id: &str, _timeout: Duration) -> Result<TaskMeta> {
        Err(Error::Config(format!(
            "task {task_id}: rpc:// results go to the caller's own reply queue; a Rust client \
             cannot wait on them (use redis:// to read results)"
        )))
    }

    async fn forget(&self, _task_id: &str) -> Result<()> {
        Ok(())
    }
}
