//! Broker-side delays on RabbitMQ, without plugins.
//!
//! Why this mechanism: a countdown, an ETA or a retry back-off must not sit unacknowledged in a
//! worker (RabbitMQ closes the channel after `consumer_timeout`, and a restart would replay it at
//! once), and it must survive restarts of every process. A Redis timer would make delays as durable
//! as Redis, which here keeps nothing on disk. The delayed-message plugin is not part of a stock
//! RabbitMQ. So delays use dead-lettering through queues with fixed TTLs, the scheme Celery 5.5
//! calls "native delayed delivery", under our own names.
//!
//! There are [`LEVELS`] levels. Level `L` has a topic exchange `tq.delay.L` and a quorum queue
//! `tq.delay.L` whose messages expire after 2^L seconds and are then dead-lettered (at least once)
//! to the exchange of level `L-1` (level 0 to `tq.delay.deliver`). The routing key spells the delay
//! in binary, most significant bit first, one word per level, followed by the destination queue:
//! `0.0.….1.0.1.celery`. At each level a message whose bit is 1 waits in that level's queue; one
//! whose bit is 0 passes straight to the next exchange. A delay of `d` seconds therefore waits
//! exactly `d` seconds in total, and because every message in a level's queue has the same TTL,
//! expiry happens in arrival order with no head-of-line blocking. The final exchange routes on the
//! whole key: each destination queue is bound with one single-word wildcard per level and its own name, so a
//! queue name containing dots can never match another queue's messages.
//!
//! Resolution is one second: the broker delay is the whole seconds of the wait, and the consumer
//! holds a message for the sub-second remainder at most.

use std::time::Duration;

/// Number of levels: delays up to 2^22 - 1 seconds (about 48 days) per hop. Level 21 holds messages
/// for 2^21 s; a larger level would need a TTL beyond the 2^32 ms that Erlang timers accept. Longer
/// waits take several hops: a worker receiving a message whose ETA is still far away defers it again.
pub(super) const LEVELS: u32 = 22;

/// The exchange that hands delayed messages to their destination queues.
pub(super) const DELIVER_EXCHANGE: &str = "tq.delay.deliver";

/// A quorum queue bound to [`DELIVER_EXCHANGE`] with `#` that drops everything at once (TTL 0). Quorum
/// queues dead-letter at least once: a message whose destination queue was deleted while it
/// waited would be unroutable, retried for ever, and after 32 such messages the level's
/// dead-letter worker would stop moving anything. With the sink every message is routed somewhere.
pub(super) const SINK_QUEUE: &str = "tq.delay.sink";

/// The largest delay the topology can express.
pub(super) const MAX_DELAY: Duration = Duration::from_secs((1 << LEVELS) - 1);

/// Name of level `level`'s exchange and queue.
pub(super) fn level_name(level: u32) -> String {
    format!("tq.delay.{level}")
}

/// Where level `level`'s queue dead-letters to.
pub(super) fn next_exchange(level: u32) -> String {
    if level == 0 {
        DELIVER_EXCHANGE.to_owned()
    } else {
        level_name(level - 1)
    }
}

/// The exchange a delayed message is published to.
pub(super) fn entry_exchange() -> String {
    level_name(LEVELS - 1)
}

/// The routing key for a delay of `seconds` to `queue`.
pub(super) fn routing_key(seconds: u64, queue: &str) -> String {
    let mut key = String::with_capacity(2 * LEVELS as usize + queue.len());
    for level in (0..LEVELS).rev() {
        key.push(if seconds & (1 << level) != 0 {
            '1'
        } else {
            '0'
        });
        key.push('.');
    }
    key.push_str(queue);
    key
}

/// The binding patterns at `level`: (pattern that sends a message into the level's queue, pattern
/// that passes it on to the next exchange).
pub(super) fn level_patterns(level: u32) -> (String, String) {
    let skip = "*.".repeat((LEVELS - 1 - level) as usize);
    (format!("{skip}1.#"), format!("{skip}0.#"))
}

/// The pattern binding `queue` to the delivery exchange.
pub(super) fn delivery_pattern(queue: &str) -> String {
    format!("{}{queue}", "*.".repeat(LEVELS as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Follows a routing key through the topology as RabbitMQ would and returns the total wait.
    fn simulate(key: &str) -> u64 {
        let words: Vec<&str> = key.split('.').collect();
        (0..LEVELS)
            .rev()
            .filter(|level| {
                let (wait, pass) = level_patterns(*level);
                let idx = (LEVELS - 1 - level) as usize;
                let bit = words[idx];
                assert_eq!(wait.split('.').nth(idx), Some("1"));
                assert_eq!(pass.split('.').nth(idx), Some("0"));
                bit == "1"
            })
            .map(|level| 1u64 << level)
            .sum()
    }

    #[test]
    fn a_delay_waits_exactly_its_seconds() {
        for d in [0, 1, 2, 3, 59, 60, 3_600, 86_400, 1_000_003, (1 << 22) - 1] {
            assert_eq!(simulate(&routing_key(d, "celery")), d, "delay {d}");
        }
    }

    #[test]
    fn delivery_pattern_has_one_wildcard_per_level() {
        let key = routing_key(5, "billing.renewals");
        let pattern = delivery_pattern("billing.renewals");
        assert_eq!(key.split('.').count(), pattern.split('.').count());
        assert!(pattern.ends_with(".billing.renewals"));
        assert!(key.len() <= 255);
    }

    #[test]
    fn levels_chain_to_the_delivery_exchange() {
        assert_eq!(entry_exchange(), "tq.delay.21");
        assert_eq!(next_exchange(21), "tq.delay.20");
        assert_eq!(next_exchange(0), DELIVER_EXCHANGE);
        assert_eq!(MAX_DELAY.as_secs(), 4_194_303);
    }
}
