//! Reading a queue one message at a time without consuming from it: for looking at a
//! dead-letter queue and moving chosen messages back (the monitor's dead-letter pages).
//!
//! A [`QueueReader`] takes messages with `basic.get` on a channel of its own and acknowledges
//! only those it is told to. Everything else it read goes back to the queue when the reader is
//! closed or dropped (the channel closes with them unacknowledged; RabbitMQ returns them to
//! their places, marked redelivered), so looking loses nothing.

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicGetOptions};

use super::{AmqpBroker, Role, raw_message, short};
use crate::error::{Error, Result};
use crate::protocol::RawMessage;

/// A message a [`QueueReader`] read and holds unacknowledged.
#[derive(Debug, Clone)]
pub struct Held {
    tag: u64,
    /// The message as it was published to the queue.
    pub message: RawMessage,
    /// Whether RabbitMQ had delivered it before (to a reader, a consumer).
    pub redelivered: bool,
}

/// Reads one queue's ready messages in order; see the module docs.
#[derive(Debug)]
pub struct QueueReader {
    channel: Option<Channel>,
    queue: String,
}

impl AmqpBroker {
    /// A reader of `queue` (which must exist) on a channel of its own.
    pub async fn read_queue(&self, queue: &str) -> Result<QueueReader> {
        let name = short(queue)?;
        let link = self.link(Role::Consume).await?;
        let channel = link.connection.create_channel().await?;
        // Fails (and closes the channel) if the queue does not exist.
        channel
            .queue_declare(
                name,
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .map_err(|e| Error::Broker(format!("queue `{queue}`: {e}")))?;
        Ok(QueueReader {
            channel: Some(channel),
            queue: queue.to_owned(),
        })
    }
}

impl QueueReader {
    fn channel(&self) -> Result<&Channel> {
        self.channel
            .as_ref()
            .ok_or_else(|| Error::Broker("the queue reader is closed".into()))
    }

    /// The next ready message, held until [`ack`](Self::ack) or the reader closes; `None` when
    /// no ready message is left.
    pub async fn next(&mut self) -> Result<Option<Held>> {
        let name = short(&self.queue)?;
        let got = self
            .channel()?
            .basic_get(name, BasicGetOptions { no_ack: false })
            .await?;
        Ok(got.map(|m| Held {
            tag: m.delivery.delivery_tag,
            message: raw_message(&m.delivery),
            redelivered: m.delivery.redelivered,
        }))
    }

    /// Removes `held` from the queue for good.
    pub async fn ack(&self, held: &Held) -> Result<()> {
        self.channel()?
            .basic_ack(held.tag, BasicAckOptions::default())
            .await?;
        Ok(())
    }

    /// Gives back everything read and not acknowledged, and closes the channel.
    pub async fn close(mut self) {
        if let Some(ch) = self.channel.take() {
            let _ = ch.close(200, "read".into()).await;
        }
    }
}

impl Drop for QueueReader {
    fn drop(&mut self) {
        if let Some(ch) = self.channel.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = ch.close(200, "read".into()).await;
            });
        }
    }
}
