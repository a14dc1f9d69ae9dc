//! Flow control of charges at the gateway, shared by every worker through the task queue's
//! coordinator (Redis): at most one charge in flight per payer, and at most a configured number
//! of calls per second per terminal (the gateway throttles a terminal that sends more, answering
//! 429, and a payer charged twice at once is a support call even when both are correct).
//!
//! Both waits happen right before the call, after the attempt is claimed in the ledger, so they
//! never change what is charged, only when. A payer's permit is a lease a little longer than the
//! gateway timeout, renewed while the call runs, so a worker that dies while holding one delays
//! that payer's next charge by at most the lease (and any replay of its call waits longer than
//! that anyway). If the coordinator is unreachable the call goes ahead without the limits: the
//! ledger's exactly-once rules never depended on them.

use std::time::Duration;

use task_core::RateLimit;
use task_core::coord::Coordinator;

/// A payer's permit lasts this much longer than the gateway timeout without renewal.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// The limits on gateway calls.
#[derive(Debug, Clone)]
pub struct GatewayFlow {
    coordinator: Coordinator,
    terminal: String,
    rate: Option<RateLimit>,
    lease: Duration,
}

/// A payer's permit; renewed while held, released when dropped.
#[derive(Debug)]
pub struct PayerPermit {
    coordinator: Coordinator,
    key: String,
    holder: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for PayerPermit {
    fn drop(&mut self) {
        self.renewal.abort();
        let (c, key, holder) = (
            self.coordinator.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.holder),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = c.release(&key, &holder).await {
                    tracing::warn!(key, error = %e, "could not release a payer's permit; it expires with its lease");
                }
            });
        }
    }
}

impl GatewayFlow {
    /// Limits for the terminal `terminal` (its public id): `rate` calls per second at most
    /// (`None`: no rate limit), one charge per payer at a time; `gateway_timeout` is the client's
    /// timeout for one call.
    pub fn new(
        coordinator: Coordinator,
        terminal: &str,
        rate: Option<RateLimit>,
        gateway_timeout: Duration,
    ) -> Self {
        GatewayFlow {
            coordinator,
            terminal: format!("billing:terminal:{terminal}"),
            rate,
            lease: gateway_timeout + LEASE_MARGIN,
        }
    }

    /// Limits kept in this process only.
    pub fn local() -> Self {
        GatewayFlow::new(
            Coordinator::memory(),
            "default",
            None,
            Duration::from_secs(60),
        )
    }

    /// Waits until `payer` has no other charge in flight and the terminal has a free call slot.
    pub async fn admit(&self, payer: Option<&str>) -> Option<PayerPermit> {
        let permit = match payer {
            Some(payer) => self.payer_permit(payer).await,
            None => None,
        };
        if let Some(rate) = self.rate {
            loop {
                match self.coordinator.try_rate(&self.terminal, rate).await {
                    Ok(None) => break,
                    Ok(Some(wait)) => tokio::time::sleep(wait).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "terminal rate limit unavailable; calling anyway");
                        break;
                    }
                }
            }
        }
        permit
    }

    async fn payer_permit(&self, payer: &str) -> Option<PayerPermit> {
        let key = format!("billing:payer:{payer}");
        let holder = uuid::Uuid::new_v4().to_string();
        let mut poll = Duration::from_millis(10);
        // A holder that died frees the permit within one lease.
        let deadline = tokio::time::Instant::now() + self.lease * 2;
        loop {
            match self
                .coordinator
                .try_acquire(&key, 1, &holder, self.lease)
                .await
            {
                Ok(true) => {
                    let renewal = {
                        let (c, key, holder, lease) = (
                            self.coordinator.clone(),
                            key.clone(),
                            holder.clone(),
                            self.lease,
                        );
                        tokio::spawn(async move {
                            loop {
                                tokio::time::sleep(lease / 3).await;
                                if let Err(e) = c.renew(&key, &holder, lease).await {
                                    tracing::warn!(key, error = %e, "could not renew a payer's permit");
                                }
                            }
                        })
                    };
                    return Some(PayerPermit {
                        coordinator: self.coordinator.clone(),
                        key,
                        holder,
                        renewal,
                    });
                }
                Ok(false) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(payer, "another charge of this payer is in flight; waiting");
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(Duration::from_millis(500));
                }
                Ok(false) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "payer limit unavailable; calling anyway");
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_charge_per_payer_and_a_rate_per_terminal() {
        let flow = GatewayFlow::new(
            Coordinator::memory(),
            "pk_1",
            Some(RateLimit { per_second: 10.0 }),
            Duration::from_secs(5),
        );
        let first = flow.admit(Some("payer-1")).await.expect("a permit");
        let second = {
            let flow = flow.clone();
            tokio::spawn(async move { flow.admit(Some("payer-1")).await })
        };
        // Another payer is not held up by payer-1.
        let other = flow.admit(Some("payer-2")).await.expect("a permit");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !second.is_finished(),
            "a second charge of payer-1 went ahead"
        );
        drop(first);
        let second = second.await.unwrap();
        assert!(second.is_some());
        drop((other, second));
        // A holder that never releases (a dead worker) blocks the payer for one lease at most.
        let dead = flow.lease;
        assert!(
            flow.coordinator
                .try_acquire("billing:payer:payer-3", 1, "a-dead-worker", dead)
                .await
                .unwrap()
        );
        let start = tokio::time::Instant::now();
        assert!(flow.admit(Some("payer-3")).await.is_some());
        assert!(
            start.elapsed() <= Duration::from_secs(16),
            "{:?}",
            start.elapsed()
        );
        // Ten calls at 10/s take about a second of (paused) time.
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            flow.admit(None).await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(850),
            "{:?}",
            start.elapsed()
        );
    }
}
