//! In-process broker with RabbitMQ's delivery semantics: FIFO queues, a prefetch window per
//! consumer, acknowledgement, rejection with or without requeue, and redelivery (flagged
//! `redelivered`) of anything dropped unacknowledged. Delays use tokio time, so tests can pause it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Acker, Broker, Consumer, Delivery, dead_letter_queue, with_dead_letter_headers};
use crate::error::{Error, Result};
use crate::protocol::RawMessage;

/// An in-memory broker. Clones share the same queues.
#[derive(Clone, Debug, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    queues: Mutex<HashMap<String, VecDeque<Stored>>>,
    changed: Notify,
}

#[derive(Debug)]
struct Stored {
    message: RawMessage,
    redelivered: bool,
}

impl Inner {
    fn push(&self, queue: &str, stored: Stored, front: bool) {
        {
            let mut queues = self.queues.lock().expect("memory broker lock");
            let q = queues.entry(queue.to_owned()).or_default();
            if front {
                q.push_front(stored)
            } else {
                q.push_back(stored)
            }
        }
        self.changed.notify_waiters();
    }

    fn take(&self, queues: &[String], start: usize) -> Option<(String, Stored)> {
        let mut all = self.queues.lock().expect("memory broker lock");
        (0..queues.len())
            .map(|i| &queues[(start + i) % queues.len()])
            .find_map(|name| {
                all.get_mut(name)
                    .and_then(VecDeque::pop_front)
                    .map(|s| (name.clone(), s))
            })
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes and returns every message ready in `queue` (for tests and tools).
    pub fn drain(&self, queue: &str) -> Vec<RawMessage> {
        let mut queues = self.inner.queues.lock().expect("memory broker lock");
        queues
            .get_mut(queue)
            .map(|q| q.drain(..).map(|s| s.message).collect())
            .unwrap_or_default()
    }
}

/// Settles one in-memory delivery. Dropping it unsettled requeues the message as redelivered.
#[derive(Debug)]
pub(super) struct MemoryAcker {
    broker: Arc<Inner>,
    queue: String,
    message: Option<RawMessage>,
    in_flight: Arc<AtomicUsize>,
}

impl MemoryAcker {
    pub(super) fn ack(mut self) -> Result<()> {
        self.message = None;
        Ok(())
    }

    pub(super) fn reject(mut self, requeue: bool) -> Result<()> {
        if let Some(message) = self.message.take()
            && requeue
        {
            self.broker.push(
                &self.queue,
                Stored {
                    message,
                    redelivered: true,
                },
                true,
            );
        }
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            self.broker.push(
                &self.queue,
                Stored {
                    message,
                    redelivered: true,
                },
                true,
            );
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.broker.changed.notify_waiters();
    }
}

impl MemoryBroker {
    /// Publishes to a reply queue (see [`crate::AmqpBroker::publish_reply`]); the in-process
    /// broker has no declarations, so the queue always exists.
    pub async fn publish_reply(&self, reply_to: &str, message: &RawMessage) -> Result<bool> {
        self.publish(reply_to, message).await.map(|()| true)
    }
}

impl Broker for MemoryBroker {
    async fn publish(&self, queue: &str, message: &RawMessage) -> Result<()> {
        if queue.is_empty() {
            return Err(Error::Broker("queue name is empty".into()));
        }
        self.inner.push(
            queue,
            Stored {
                message: message.clone(),
                redelivered: false,
            },
            false,
        );
        Ok(())
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        message: &RawMessage,
        delay: Duration,
    ) -> Result<()> {
        let inner = self.inner.clone();
        let (queue, message) = (queue.to_owned(), message.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            inner.push(
                &queue,
                Stored {
                    message,
                    redelivered: false,
                },
                false,
            );
        });
        Ok(())
    }

    async fn dead_letter(&self, queue: &str, message: &RawMessage, reason: &str) -> Result<()> {
        let message = with_dead_letter_headers(message, queue, reason);
        self.publish(&dead_letter_queue(queue), &message).await
    }

    async fn consume(&self, queues: &[String], prefetch: u16) -> Result<Consumer> {
        if queues.is_empty() {
            return Err(Error::Broker("no queue to consume from".into()));
        }
        let inner = self.inner.clone();
        let queues = queues.to_vec();
        let prefetch = usize::from(prefetch.max(1));
        Ok(Consumer::new(prefetch, move |tx, mut stop| {
            tokio::spawn(async move {
                let in_flight = Arc::new(AtomicUsize::new(0));
                let mut turn = 0usize;
                loop {
                    let changed = inner.changed.notified();
                    tokio::pin!(changed);
                    changed.as_mut().enable();
                    if *stop.borrow() {
                        return;
                    }
                    if in_flight.load(Ordering::SeqCst) < prefetch
                        && let Some((queue, stored)) = inner.take(&queues, turn)
                    {
                        turn = turn.wrapping_add(1);
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        let delivery = Delivery {
                            acker: Acker::Memory(MemoryAcker {
                                broker: inner.clone(),
                                queue: queue.clone(),
                                message: Some(stored.message.clone()),
                                in_flight: in_flight.clone(),
                            }),
                            message: stored.message,
                            queue,
                            redelivered: stored.redelivered,
                        };
                        // A closed receiver drops the delivery, which requeues it.
                        if tx.send(delivery).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = stop.changed() => {}
                    }
                }
            })
        }))
    }

    async fn queue_length(&self, queue: &str) -> Result<u64> {
        let queues = self.inner.queues.lock().expect("memory broker lock");
        Ok(queues.get(queue).map(|q| q.len() as u64).unwrap_or(0))
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.inner
            .queues
            .lock()
            .expect("memory broker lock")
            .remove(queue);
        Ok(())
    }
}
