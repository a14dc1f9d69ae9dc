//! The billing state machines (billing-design.md §3.3) and the rules around them: which status may
//! follow which, how long a period is, when a failed renewal is tried again, how much a refund is.
//!
//! Every status change in the ledger goes through [`Transition::check`] so an impossible move (a
//! paid invoice reopened, a succeeded payment declined) is refused in code before the database's
//! constraints would have to.

use chrono::{DateTime, Duration, Months, Utc};

use crate::cloudpayments::DeclineClass;
use crate::error::{BillingError, Result};

macro_rules! status_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The name stored in the ledger.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses a stored name.
            pub fn parse(s: &str) -> Result<Self> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(BillingError::Internal(format!("unknown {} status `{other}` in the ledger", stringify!($name)))),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

status_enum!(
    /// A subscription's life.
    SubscriptionStatus {
        Pending => "pending",
        Active => "active",
        PastDue => "past_due",
        Expired => "expired",
        Abandoned => "abandoned",
    }
);

status_enum!(
    /// An invoice (one per subscription and period).
    InvoiceStatus {
        Open => "open",
        Paying => "paying",
        Paid => "paid",
        Failed => "failed",
        Void => "void",
    }
);

status_enum!(
    /// One gateway attempt.
    PaymentStatus {
        Created => "created",
        Processing => "processing",
        AwaitingThreeDs => "awaiting_3ds",
        Succeeded => "succeeded",
        Declined => "declined",
        Expired => "expired",
        Failed => "failed",
    }
);

status_enum!(
    /// A refund of (part of) a payment.
    RefundStatus {
        Requested => "requested",
        Processing => "processing",
        Succeeded => "succeeded",
        Failed => "failed",
    }
);

/// A status change that the state machine must allow.
pub trait Transition: Copy + PartialEq + std::fmt::Display {
    /// Whether `self → to` is a move the machine has.
    fn allows(self, to: Self) -> bool;

    /// Refuses an impossible move with a message naming it.
    fn check(self, to: Self, what: &str) -> Result<()> {
        if self.allows(to) {
            Ok(())
        } else {
            Err(BillingError::Internal(format!(
                "{what}: {self} → {to} is not a valid transition"
            )))
        }
    }
}

impl Transition for SubscriptionStatus {
    fn allows(self, to: Self) -> bool {
        use SubscriptionStatus::*;
        matches!(
            (self, to),
            (Pending, Active)
                | (Pending, Abandoned)
                | (Active, PastDue)
                | (Active, Expired)
                | (PastDue, Active)
                | (PastDue, Expired)
        )
    }
}

impl Transition for InvoiceStatus {
    fn allows(self, to: Self) -> bool {
        use InvoiceStatus::*;
        matches!(
            (self, to),
            (Open, Paying)
                | (Open, Void)
                | (Open, Failed)
                | (Paying, Paid)
                | (Paying, Open)
                | (Paying, Failed)
                | (Open, Paid)
                | (Failed, Paid)
                // Auto-renewal resumed for the period whose renewal was voided on cancel.
                | (Void, Open)
        )
    }
}

impl Transition for PaymentStatus {
    fn allows(self, to: Self) -> bool {
        use PaymentStatus::*;
        matches!(
            (self, to),
            (Created, Processing)
                | (Created, Expired)
                | (Created, Failed)
                | (Processing, Succeeded)
                | (Processing, Declined)
                | (Processing, AwaitingThreeDs)
                | (Processing, Failed)
                | (AwaitingThreeDs, Processing)
                | (AwaitingThreeDs, Expired)
                | (AwaitingThreeDs, Succeeded)
                | (AwaitingThreeDs, Declined)
                // A late Pay notification for an attempt we had given up on, or a backup acquirer
                // approving what the first one declined: the money moved.
                | (Failed, Succeeded)
                | (Expired, Succeeded)
                | (Declined, Succeeded)
        )
    }
}

impl Transition for RefundStatus {
    fn allows(self, to: Self) -> bool {
        use RefundStatus::*;
        matches!(
            (self, to),
            (Requested, Processing)
                | (Processing, Succeeded)
                | (Processing, Failed)
                | (Requested, Failed)
                // The gateway's Refund notification for a refund we had given up on.
                | (Failed, Succeeded)
        )
    }
}

impl PaymentStatus {
    /// The attempt will not change again (except a late success notification).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PaymentStatus::Succeeded
                | PaymentStatus::Declined
                | PaymentStatus::Expired
                | PaymentStatus::Failed
        )
    }
}

/// A tariff's billing period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// `n` days.
    Days(u32),
    /// `n` calendar months (the same day of the month, clamped to the month's end).
    Months(u32),
}

impl Period {
    /// From the ledger's `period_unit` and `period_count`.
    pub fn from_parts(unit: &str, count: i32) -> Result<Self> {
        let count = u32::try_from(count)
            .map_err(|_| BillingError::Internal(format!("period count {count}")))?;
        match unit {
            "day" => Ok(Period::Days(count)),
            "month" => Ok(Period::Months(count)),
            "year" => Ok(Period::Months(count * 12)),
            other => Err(BillingError::Internal(format!(
                "unknown period unit `{other}`"
            ))),
        }
    }

    /// The end of a period starting at `start`.
    pub fn end_from(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Period::Days(d) => start + Duration::days(i64::from(d)),
            Period::Months(m) => start
                .checked_add_months(Months::new(m))
                .unwrap_or(start + Duration::days(30 * i64::from(m))),
        }
    }
}

/// Billing policy: grace, dunning and refunds. The defaults are what the cinema runs.
#[derive(Debug, Clone)]
pub struct Policy {
    /// How long a subscriber keeps access after a failed renewal.
    pub grace: Duration,
    /// How far ahead of the period end the renewal is charged.
    pub renewal_lead: Duration,
    /// Waits before renewal attempts 2, 3, … after a decline worth retrying. At least a day apart:
    /// the gateway blocks a card for 24 h after two soft declines.
    pub dunning_ladder: Vec<Duration>,
    /// Within this time of the payment, a refund is the full amount; later it is pro-rata.
    pub full_refund_window: Duration,
    /// An attempt whose gateway outcome is unknown is looked up after this long (but never before
    /// [`Policy::gateway_max_processing`]).
    pub processing_lease: Duration,
    /// How long the gateway may still be processing a call after it was sent: its documented
    /// server-side time reaches 5 minutes, far past any client timeout, and whether it blocks a
    /// duplicate of a request still in flight is not documented. No call is replayed or looked up
    /// before this has passed since it was sent.
    pub gateway_max_processing: Duration,
    /// An attempt the gateway still answers it has no record of this long after it was sent is
    /// taken as never made (and may be tried again). At least [`Policy::gateway_max_processing`].
    pub unknown_give_up: Duration,
    /// A renewal attempt that never reached the card (a refusal, no record at the gateway) is
    /// tried again after this.
    pub not_processed_retry: Duration,
    /// A 3-D Secure challenge left unanswered this long expires.
    pub three_ds_timeout: Duration,
    /// An unpaid primary payment never sent to the gateway is given up after this long.
    pub created_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            grace: Duration::days(3),
            renewal_lead: Duration::days(1),
            dunning_ladder: vec![Duration::days(1), Duration::days(2)],
            full_refund_window: Duration::days(3),
            processing_lease: Duration::minutes(2),
            gateway_max_processing: Duration::minutes(6),
            unknown_give_up: Duration::minutes(10),
            not_processed_retry: Duration::minutes(10),
            three_ds_timeout: Duration::hours(1),
            created_timeout: Duration::minutes(15),
        }
    }
}

/// What to do after a renewal attempt was declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dunning {
    /// Try again at this time.
    RetryAt(DateTime<Utc>),
    /// No more attempts: the invoice fails.
    GiveUp,
}

impl Policy {
    /// How long after a call was sent nothing else may ask the gateway about it: the lease, and
    /// at least the gateway's maximum processing time.
    pub fn in_flight_horizon(&self) -> Duration {
        self.processing_lease.max(self.gateway_max_processing)
    }

    /// The next step after decline number `attempts` (1 = the first attempt failed) of class `class`.
    /// Never-retry codes and declines that need the customer stop at once; retry-later ones follow
    /// the ladder while the next attempt still falls within the grace period.
    pub fn dunning(
        &self,
        class: DeclineClass,
        attempts: u32,
        now: DateTime<Utc>,
        grace_until: DateTime<Utc>,
    ) -> Dunning {
        match class {
            DeclineClass::NeverRetry | DeclineClass::NeedsCustomer => Dunning::GiveUp,
            DeclineClass::RetryLater | DeclineClass::Other => {
                match self.dunning_ladder.get(attempts.saturating_sub(1) as usize) {
                    Some(wait) if now + *wait <= grace_until => Dunning::RetryAt(now + *wait),
                    _ => Dunning::GiveUp,
                }
            }
        }
    }

    /// How much of `paid_minor` to refund at `now` for a period `[start, end)` paid at `paid_at`:
    /// everything within the full-refund window (or before the period starts), otherwise the unused
    /// part of the period, rounded down to a minor unit.
    pub fn refund_amount(
        &self,
        paid_minor: i64,
        paid_at: DateTime<Utc>,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> i64 {
        if now < paid_at + self.full_refund_window || now <= start {
            return paid_minor;
        }
        if now >= end {
            return 0;
        }
        let total = (end - start).num_seconds().max(1) as i128;
        let unused = (end - now).num_seconds().max(0) as i128;
        (i128::from(paid_minor) * unused / total) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
    }

    #[test]
    fn months_clamp_to_the_end_of_short_months() {
        assert_eq!(Period::Months(1).end_from(t(2027, 1, 31)), t(2027, 2, 28));
        assert_eq!(Period::Months(12).end_from(t(2028, 2, 29)), t(2029, 2, 28));
        assert_eq!(Period::Days(7).end_from(t(2027, 1, 1)), t(2027, 1, 8));
    }

    #[test]
    fn paid_is_final_and_success_is_not_undone() {
        assert!(!InvoiceStatus::Paid.allows(InvoiceStatus::Open));
        assert!(!PaymentStatus::Succeeded.allows(PaymentStatus::Declined));
        assert!(!SubscriptionStatus::Expired.allows(SubscriptionStatus::Active));
        assert!(PaymentStatus::Processing.allows(PaymentStatus::Succeeded));
        assert!(
            PaymentStatus::Failed.allows(PaymentStatus::Succeeded),
            "a late Pay notification"
        );
    }

    #[test]
    fn dunning_follows_the_ladder_within_grace() {
        let p = Policy::default();
        let now = t(2027, 1, 10);
        let grace = now + Duration::days(3);
        assert_eq!(
            p.dunning(DeclineClass::RetryLater, 1, now, grace),
            Dunning::RetryAt(now + Duration::days(1))
        );
        assert_eq!(
            p.dunning(DeclineClass::RetryLater, 2, now, grace),
            Dunning::RetryAt(now + Duration::days(2))
        );
        assert_eq!(
            p.dunning(DeclineClass::RetryLater, 3, now, grace),
            Dunning::GiveUp
        );
        assert_eq!(
            p.dunning(DeclineClass::NeverRetry, 1, now, grace),
            Dunning::GiveUp
        );
        assert_eq!(
            p.dunning(DeclineClass::RetryLater, 1, now, now + Duration::hours(5)),
            Dunning::GiveUp
        );
    }

    #[test]
    fn refunds_are_full_then_pro_rata() {
        let p = Policy::default();
        let (start, end) = (t(2027, 1, 1), t(2027, 1, 31));
        assert_eq!(
            p.refund_amount(30_000, start, start, end, start + Duration::days(2)),
            30_000
        );
        assert_eq!(
            p.refund_amount(30_000, start, start, end, t(2027, 1, 16)),
            15_000
        );
        assert_eq!(
            p.refund_amount(29_900, start, start, end, t(2027, 1, 21)),
            9_966
        );
        assert_eq!(p.refund_amount(30_000, start, start, end, end), 0);
    }
}
