//! Fault injection: what goes wrong with one request, chosen from a queue or by probability.
//!
//! A queued fault applies to the next matching request, once; a probabilistic fault applies to
//! each matching request with its probability (probabilities are not money: `f64` is fine). The
//! queue is consulted first. The random draws come from a generator seeded by
//! [`super::FakeConfig::fault_seed`] (a random seed when unset, reported by
//! [`super::FakeGateway::fault_seed`]), so a failing run is replayed with the same seed. "Before processing" faults leave no trace; "after processing" faults
//! hit a request whose effect has happened and been stored for `X-Request-ID` replay — the
//! classic unknown outcome.

use std::collections::VecDeque;
use std::time::Duration;

use crate::cloudpayments::reason::ReasonCode;

/// Something that goes wrong with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Hold the request for the configured `hang` and answer 504 without processing it.
    TimeoutBeforeProcessing,
    /// Process the request, then hold the answer for `hang`: the effect happens, the caller times
    /// out.
    TimeoutAfterProcessing,
    /// Answer with this 5xx status without processing.
    ServerErrorBeforeProcessing(u16),
    /// Process, then answer with this 5xx status instead of the result.
    ServerErrorAfterProcessing(u16),
    /// Take this much longer to process (holding the request id's claim), then answer: the
    /// gateway's documented server-side time can reach minutes, far beyond a client's timeout.
    SlowProcessing(Duration),
    /// Answer HTTP 401 without processing, as after the API secret was rotated.
    Unauthorized,
    /// Answer HTTP 200 with a body that is not the gateway's JSON (a proxy's error page), without
    /// processing.
    UnparsableBeforeProcessing,
    /// Answer 429 without processing, with an optional `Retry-After`.
    TooManyRequests {
        /// The `Retry-After` header to send.
        retry_after: Option<Duration>,
    },
    /// Decline the payment with this reason code (applies only to payment calls: card and token
    /// charge/auth and post3ds; other calls pass it by).
    Decline(ReasonCode),
}

impl Fault {
    /// A plain 500 before processing.
    pub const SERVER_ERROR_BEFORE: Fault = Fault::ServerErrorBeforeProcessing(500);
    /// A plain 500 after processing.
    pub const SERVER_ERROR_AFTER: Fault = Fault::ServerErrorAfterProcessing(500);
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target(Option<String>);

impl Target {
    pub(crate) fn new(path: Option<&str>) -> Target {
        Target(path.map(|p| format!("/{}", p.trim_start_matches('/'))))
    }

    fn matches(&self, path: &str, fault: Fault, is_payment: bool) -> bool {
        let path_ok = self
            .0
            .as_deref()
            .is_none_or(|p| p.eq_ignore_ascii_case(path));
        let kind_ok = !matches!(fault, Fault::Decline(_)) || is_payment;
        path_ok && kind_ok
    }
}

/// The queue and the random faults.
#[derive(Debug)]
pub(crate) struct FaultPlan {
    queue: VecDeque<(Target, Fault)>,
    random: Vec<(Target, Fault, f64)>,
    rng: fastrand::Rng,
    seed: u64,
    injected: u64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan::seeded(fastrand::u64(..))
    }
}

impl FaultPlan {
    /// A plan whose random faults follow `seed`.
    pub(crate) fn seeded(seed: u64) -> Self {
        FaultPlan {
            queue: VecDeque::new(),
            random: Vec::new(),
            rng: fastrand::Rng::with_seed(seed),
            seed,
            injected: 0,
        }
    }

    /// The seed of the random faults.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    pub(crate) fn push(&mut self, target: Target, fault: Fault) {
        self.queue.push_back((target, fault));
    }

    pub(crate) fn set_random(&mut self, target: Target, fault: Fault, probability: f64) {
        self.random
            .retain(|(t, f, _)| !(t == &target && f == &fault));
        if probability > 0.0 {
            self.random.push((target, fault, probability.min(1.0)));
        }
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.random.clear();
    }

    pub(crate) fn pending(&self) -> usize {
        self.queue.len()
    }

    /// How many faults requests have been given so far.
    pub(crate) fn injected(&self) -> u64 {
        self.injected
    }

    /// The fault for a request to `path`, if any.
    pub(crate) fn take(&mut self, path: &str, is_payment: bool) -> Option<Fault> {
        let fault = if let Some(i) = self
            .queue
            .iter()
            .position(|(t, f)| t.matches(path, *f, is_payment))
        {
            self.queue.remove(i).map(|(_, f)| f)
        } else {
            let rng = &mut self.rng;
            self.random
                .iter()
                .find(|(t, f, p)| t.matches(path, *f, is_payment) && rng.f64() < *p)
                .map(|(_, f, _)| *f)
        };
        self.injected += u64::from(fault.is_some());
        fault
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_faults() {
        let draws = |seed| {
            let mut plan = FaultPlan::seeded(seed);
            plan.set_random(Target::new(None), Fault::SERVER_ERROR_BEFORE, 0.5);
            (0..64)
                .map(|_| plan.take("/test", false).is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn queue_matches_path_and_kind() {
        let mut plan = FaultPlan::default();
        plan.push(
            Target::new(Some("payments/tokens/charge")),
            Fault::SERVER_ERROR_BEFORE,
        );
        plan.push(Target::new(None), Fault::Decline(ReasonCode(5091)));
        assert_eq!(plan.take("/payments/get", false), None);
        assert_eq!(
            plan.take("/payments/tokens/charge", true),
            Some(Fault::SERVER_ERROR_BEFORE)
        );
        assert_eq!(
            plan.take("/payments/cards/charge", true),
            Some(Fault::Decline(ReasonCode(5091)))
        );
        assert_eq!(plan.pending(), 0);
        plan.set_random(Target::new(None), Fault::TimeoutAfterProcessing, 1.0);
        assert_eq!(
            plan.take("/test", false),
            Some(Fault::TimeoutAfterProcessing)
        );
        plan.set_random(Target::new(None), Fault::TimeoutAfterProcessing, 0.0);
        assert_eq!(plan.take("/test", false), None);
    }
}
