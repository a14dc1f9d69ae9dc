//! Settling AMQP deliveries: acknowledgements coalesced into `multiple` acks.
//!
//! Every acknowledgement is a frame the broker must process, and on a busy queue that is a large
//! part of its work. Deliveries are settled through one task per channel, which takes whatever
//! settlements have queued up and sends one `basic.ack` with `multiple` for the longest run of
//! delivery tags that is safe to cover, and individual frames for the rest.
//!
//! A `multiple` ack at tag `t` acknowledges every outstanding delivery up to `t`, so `t` must be
//! below every delivery still being worked on, and below every tag not yet handed to the
//! application (tags are per channel and increase by one per delivery, but deliveries from several
//! consumers can be handed over out of order). [`Tracker`] keeps both bounds. Rejections are sent
//! first, one by one, so a `multiple` ack never covers a message that should be requeued.
//! [`AmqpAcker::ack`] returns once its frame has been written, so a process that exits after
//! acknowledging has really acknowledged.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// Which delivery tags of a channel are handed over and which are still unsettled.
#[derive(Debug)]
pub(super) struct Tracker {
    /// Every tag below this has been handed to the application.
    watermark: u64,
    /// Handed-over tags at or above the watermark (out-of-order hand-overs).
    ahead: BTreeSet<u64>,
    /// Handed-over tags not yet settled.
    outstanding: BTreeSet<u64>,
}

impl Default for Tracker {
    fn default() -> Self {
        // AMQP delivery tags start at 1.
        Tracker {
            watermark: 1,
            ahead: BTreeSet::new(),
            outstanding: BTreeSet::new(),
        }
    }
}

impl Tracker {
    /// Records that `tag` was handed to the application.
    pub(super) fn handed_over(&mut self, tag: u64) {
        self.outstanding.insert(tag);
        if tag == self.watermark {
            self.watermark += 1;
            while self.ahead.remove(&self.watermark) {
                self.watermark += 1;
            }
        } else if tag > self.watermark {
            self.ahead.insert(tag);
        }
    }

    fn settle(&mut self, tag: u64) {
        self.outstanding.remove(&tag);
    }

    /// The highest tag a `multiple` ack may name: below every unsettled and every unseen tag.
    fn boundary(&self) -> u64 {
        let below_outstanding = self.outstanding.first().map_or(u64::MAX, |t| t - 1);
        below_outstanding.min(self.watermark - 1)
    }
}

#[derive(Debug)]
struct Settle {
    tag: u64,
    /// `None` = ack; `Some(requeue)` = reject.
    reject: Option<bool>,
    done: Option<oneshot::Sender<Result<()>>>,
}

/// The settling side of one channel. Dropping every handle (and every acker) ends it.
#[derive(Debug, Clone)]
pub(super) struct Settler {
    tx: mpsc::UnboundedSender<Settle>,
    tracker: Arc<Mutex<Tracker>>,
}

impl Settler {
    /// Starts the settling task for `channel`. The task ends, closing the channel, once this
    /// handle and every acker are gone.
    pub(super) fn start(channel: Channel) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let task = tokio::spawn(run(channel, rx, tracker.clone()));
        (Settler { tx, tracker }, task)
    }

    /// Registers a delivery being handed over and returns its acker.
    pub(super) fn acker(&self, tag: u64) -> AmqpAcker {
        self.tracker.lock().expect("tracker lock").handed_over(tag);
        AmqpAcker {
            tag,
            tx: self.tx.clone(),
            settled: false,
        }
    }
}

/// Settles one AMQP delivery. Dropped unsettled, it rejects the message with requeue.
#[derive(Debug)]
pub(super) struct AmqpAcker {
    tag: u64,
    tx: mpsc::UnboundedSender<Settle>,
    settled: bool,
}

impl AmqpAcker {
    async fn settle(mut self, reject: Option<bool>) -> Result<()> {
        self.settled = true;
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Settle {
                tag: self.tag,
                reject,
                done: Some(done),
            })
            .map_err(|_| Error::Broker("the delivery's channel is closed".into()))?;
        wait.await
            .map_err(|_| Error::Broker("the delivery's channel is closed".into()))?
    }

    pub(super) async fn ack(self) -> Result<()> {
        self.settle(None).await
    }

    pub(super) async fn reject(self, requeue: bool) -> Result<()> {
        self.settle(Some(requeue)).await
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.tx.send(Settle {
                tag: self.tag,
                reject: Some(true),
                done: None,
            });
        }
    }
}

const MAX_BATCH: usize = 4096;

async fn run(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<Settle>,
    tracker: Arc<Mutex<Tracker>>,
) {
    let mut batch = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let (rejects, acks): (Vec<_>, Vec<_>) = batch.drain(..).partition(|s| s.reject.is_some());
        let mut results = Vec::with_capacity(rejects.len() + acks.len());
        for s in rejects {
            tracker.lock().expect("tracker lock").settle(s.tag);
            let requeue = s.reject.unwrap_or(true);
            let r = channel
                .basic_reject(s.tag, BasicRejectOptions { requeue })
                .await
                .map_err(Error::from);
            results.push((s.done, r));
        }
        if !acks.is_empty() {
            let boundary = {
                let mut t = tracker.lock().expect("tracker lock");
                acks.iter().for_each(|s| t.settle(s.tag));
                t.boundary()
            };
            let covered = acks.iter().map(|s| s.tag).filter(|t| *t <= boundary).max();
            let mut covered_result = Ok(());
            if let Some(tag) = covered {
                covered_result = channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(Error::from);
            }
            for s in acks {
                let r = if s.tag <= boundary {
                    match &covered_result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Error::Broker(e.to_string())),
                    }
                } else {
                    channel
                        .basic_ack(s.tag, BasicAckOptions { multiple: false })
                        .await
                        .map_err(Error::from)
                };
                results.push((s.done, r));
            }
        }
        for (done, r) in results {
            if let Some(done) = done {
                let _ = done.send(r);
            }
        }
    }
    // Every delivery is settled: nothing else needs this channel.
    let _ = channel.close(200, "settled".into()).await;
}

#[cfg(test)]
mod tests {
    use super::Tracker;

    #[test]
    fn the_boundary_stays_below_unsettled_and_unseen_tags() {
        let mut t = Tracker::default();
        assert_eq!(t.boundary(), 0);
        for tag in [1, 2, 3] {
            t.handed_over(tag);
        }
        t.settle(1);
        assert_eq!(t.boundary(), 1, "2 is still running");
        t.settle(3);
        assert_eq!(t.boundary(), 1);
        t.settle(2);
        assert_eq!(t.boundary(), 3);
        // Tag 5 handed over before 4 (two consumers on one channel): 4 is unseen.
        t.handed_over(5);
        t.settle(5);
        assert_eq!(t.boundary(), 3);
        t.handed_over(4);
        assert_eq!(t.boundary(), 3, "4 is running");
        t.settle(4);
        assert_eq!(t.boundary(), 5);
    }
}
