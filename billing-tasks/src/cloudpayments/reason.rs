//! Reason codes (§4.3) and what billing may do after a decline (§4.4).
//!
//! [`ReasonCode::class`] decides whether a declined charge is retried by the dunning ladder, left
//! to the customer, or never retried. The documentation names three groups: "unconditionally
//! negative" (never retry; stop charging the token), "conditionally negative" and "temporarily
//! negative" (after two failed attempts from these groups the gateway itself blocks the card for
//! 24 hours, so the merchant must pause). We refine them into [`DeclineClass`]:
//!
//! - [`DeclineClass::NeverRetry`]: the documented unconditional set (5001, 5003, 5005, 5012,
//!   5017, 5033, 5034, 5057) plus codes that say the card itself is gone or barred for us: pick-up,
//!   lost and stolen cards (5004, 5007, 5041, 5043), no such issuer (5015, 5031), restricted or
//!   unsupported cards (5036, 5058, 5062, 5113), a fraud decline (5059), a token used on another
//!   terminal (6025), and our own Check handler's refusals (3001–3004, 3008) — retrying the same
//!   invoice would be refused the same way.
//! - [`DeclineClass::NeedsCustomer`]: only the customer can fix it — 3-D Secure failed or
//!   unavailable (5206, 5207; a token charge cannot do 3-D Secure), card data wrong or expired
//!   (5014, 5054, 5055, 5082), the card blocked for security (5063), a phone needed (5761–5763).
//!   Ask for a new card or a customer-initiated payment; do not retry the token.
//! - [`DeclineClass::RetryLater`]: temporary — the documented temporary set (5051, 5065, 5096), the
//!   issuer or network unreachable (5091, 5092), the acquirer's "try later" format error (5030),
//!   amount limits that reset (5061, 5303), and our Check handler being down (3006, 3007).
//!   Respect the two-attempts-per-24-hours rule ([`ReasonCode::counts_toward_daily_limit`]).
//! - [`DeclineClass::Other`]: everything else, including codes not in the table: the caller's
//!   generic policy applies (a bounded ladder).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A gateway reason code (`ReasonCode`); `0` is approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReasonCode(pub i32);

/// What billing may do after a decline. See the module docs for the codes in each class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeclineClass {
    /// The card or the issuer refuses for good: stop charging this token.
    NeverRetry,
    /// A temporary condition: retry later within the daily limit.
    RetryLater,
    /// Only the customer can fix it (3-D Secure, new or corrected card data).
    NeedsCustomer,
    /// Not classified: apply the generic bounded policy.
    Other,
}

/// One row of the §4.3 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonInfo {
    /// The code.
    pub code: i32,
    /// The `Reason` name as the gateway writes it (words without spaces).
    pub name: &'static str,
    /// What it means, in English.
    pub meaning: &'static str,
}

const fn row(code: i32, name: &'static str, meaning: &'static str) -> ReasonInfo {
    ReasonInfo {
        code,
        name,
        meaning,
    }
}

/// The §4.3 table plus the Check-handler codes (3001–3008), sorted by code.
pub const REASONS: &[ReasonInfo] = &[
    row(0, "Approved", "approved"),
    row(
        3001,
        "InvalidInvoiceId",
        "the Check handler refused the invoice id (answer 10)",
    ),
    row(
        3002,
        "InvalidAccountId",
        "the Check handler refused the account id (answer 11)",
    ),
    row(
        3003,
        "InvalidAmount",
        "the Check handler refused the amount (answer 12)",
    ),
    row(
        3004,
        "OutOfDate",
        "the Check handler said the payment expired (answer 20)",
    ),
    row(
        3005,
        "FormatError",
        "the Check handler gave an unexpected answer",
    ),
    row(3006, "Unavailable", "the Check handler was unavailable"),
    row(
        3007,
        "UnableToConnect",
        "the Check handler could not be reached (404, 504, …)",
    ),
    row(
        3008,
        "NotAccepted",
        "the Check handler refused the payment (answer 13)",
    ),
    row(
        5001,
        "ReferToCardIssuer",
        "the issuer refuses the online operation",
    ),
    row(
        5003,
        "InvalidMerchant",
        "the issuer refuses the online operation",
    ),
    row(5004, "PickUpCard", "the card is lost"),
    row(5005, "DoNotHonor", "the issuer refuses without a reason"),
    row(5006, "Error", "the network refuses or the CVV is wrong"),
    row(5007, "PickUpCardSpecialConditions", "the card is lost"),
    row(
        5012,
        "InvalidTransaction",
        "the card is not for online payments",
    ),
    row(5013, "AmountError", "the amount is too small or too large"),
    row(5014, "InvalidCardNumber", "the card number is wrong"),
    row(5015, "NoSuchIssuer", "the issuer was not found"),
    row(5017, "CustomerCancellation", "the cardholder refused"),
    row(
        5019,
        "TransactionError",
        "the issuer refuses without a reason",
    ),
    row(
        5030,
        "FormatError",
        "the acquirer received a malformed transaction; try later",
    ),
    row(5031, "BankNotSupportedBySwitch", "unknown issuer"),
    row(5033, "ExpiredCardPickup", "the card-loss period expired"),
    row(5034, "SuspectedFraud", "the issuer suspects fraud"),
    row(5036, "RestrictedCard", "the card is not for payments"),
    row(5041, "LostCard", "the card is lost"),
    row(5043, "StolenCard", "the card is stolen"),
    row(5051, "InsufficientFunds", "not enough money on the card"),
    row(
        5054,
        "ExpiredCard",
        "the card expired or the expiry date is wrong",
    ),
    row(5055, "InvalidPIN", "wrong PIN"),
    row(5057, "TransactionNotPermitted", "card restriction"),
    row(
        5058,
        "TransactionNotPermittedToCard",
        "not allowed for this card",
    ),
    row(
        5059,
        "SuspectedFraudDecline",
        "the bank declined on suspicion of fraud",
    ),
    row(
        5061,
        "ExceedsApprovalAmount",
        "the card's amount limit is exceeded",
    ),
    row(5062, "RestrictedCard2", "the card is not for payments"),
    row(
        5063,
        "SecurityViolation",
        "the card is blocked for security reasons",
    ),
    row(
        5065,
        "ExceedWithdrawalFrequency",
        "the card's operation-count limit is exceeded",
    ),
    row(5082, "IncorrectCVV", "wrong CVV"),
    row(5091, "Timeout", "the issuer is unavailable; try later"),
    row(
        5092,
        "CannotReachNetwork",
        "the issuer is unavailable; try later",
    ),
    row(5096, "SystemError", "acquirer or network error; try later"),
    row(
        5113,
        "GatewaysDoNotSupportTheCurrentlySelectedPaymentCard",
        "the card's issuer is not supported",
    ),
    row(5204, "UnableToProcess", "the operation cannot be processed"),
    row(
        5206,
        "AuthenticationFailed",
        "3-D Secure authentication failed",
    ),
    row(
        5207,
        "AuthenticationUnavailable",
        "3-D Secure authentication is unavailable",
    ),
    row(5300, "AntiFraud", "acquirer limits"),
    row(
        5303,
        "AcquirerTerminalLimitsExceeded",
        "the terminal's limit is exceeded",
    ),
    row(5761, "NoPhone", "a payer phone is required"),
    row(5762, "InvalidPhone", "the payer phone is invalid"),
    row(5763, "DifferentPhones", "the payer phones differ"),
    row(
        6001,
        "SaveCardRefused",
        "fast payments: saving the card refused",
    ),
    row(
        6002,
        "InvalidErrorCode",
        "fast payments: invalid error code",
    ),
    row(
        6003,
        "AgentIdNotExists",
        "fast payments: agent id does not exist",
    ),
    row(
        6004,
        "CurrencyNotValid",
        "fast payments: currency not valid",
    ),
    row(
        6005,
        "InvalidPaymentLink",
        "fast payments: invalid payment link",
    ),
    row(
        6006,
        "AmountCurrencyNotValid",
        "fast payments: amount or currency not valid",
    ),
    row(
        6007,
        "InvalidRedirectUrl",
        "fast payments: invalid redirect URL",
    ),
    row(
        6008,
        "InvalidParamsId",
        "fast payments: invalid parameters id",
    ),
    row(6009, "InvalidTtl", "fast payments: invalid TTL"),
    row(
        6010,
        "SubscriptionNotFound",
        "fast payments: subscription not found",
    ),
    row(
        6011,
        "InvalidSubscription",
        "fast payments: invalid subscription",
    ),
    row(6013, "InvalidRefund", "fast payments: invalid refund"),
    row(
        6014,
        "OriginalDetailsIncorrect",
        "fast payments: original details incorrect",
    ),
    row(
        6015,
        "TransactionNotFound",
        "fast payments: transaction not found",
    ),
    row(6016, "InvalidMemberId", "fast payments: invalid member id"),
    row(6017, "IncorrectMCCategory", "fast payments: incorrect MCC"),
    row(
        6021,
        "ReceiverAccountError",
        "payout receiver account error",
    ),
    row(6022, "ReceiverNameError", "payout receiver name error"),
    row(
        6025,
        "CrossTerminalTokenRestriction",
        "the token belongs to another terminal",
    ),
];

impl ReasonCode {
    /// Approved.
    pub const APPROVED: ReasonCode = ReasonCode(0);
    /// Do not honor (5005).
    pub const DO_NOT_HONOR: ReasonCode = ReasonCode(5005);
    /// Insufficient funds (5051).
    pub const INSUFFICIENT_FUNDS: ReasonCode = ReasonCode(5051);
    /// Expired card (5054).
    pub const EXPIRED_CARD: ReasonCode = ReasonCode(5054);
    /// 3-D Secure failed (5206).
    pub const AUTHENTICATION_FAILED: ReasonCode = ReasonCode(5206);
    /// 3-D Secure unavailable (5207).
    pub const AUTHENTICATION_UNAVAILABLE: ReasonCode = ReasonCode(5207);
    /// A token used on a terminal that did not issue it (6025).
    pub const CROSS_TERMINAL_TOKEN: ReasonCode = ReasonCode(6025);

    /// The code as a number.
    pub fn get(self) -> i32 {
        self.0
    }

    /// Whether this is the approval code.
    pub fn is_approved(self) -> bool {
        self.0 == 0
    }

    /// The table row, if the code is documented.
    pub fn info(self) -> Option<&'static ReasonInfo> {
        REASONS
            .binary_search_by_key(&self.0, |r| r.code)
            .ok()
            .map(|i| &REASONS[i])
    }

    /// The `Reason` name (`"InsufficientFunds"`), if documented.
    pub fn name(self) -> Option<&'static str> {
        self.info().map(|r| r.name)
    }

    /// What the code means, if documented.
    pub fn meaning(self) -> Option<&'static str> {
        self.info().map(|r| r.meaning)
    }

    /// What billing may do after a decline with this code (see the module docs).
    pub fn class(self) -> DeclineClass {
        match self.0 {
            5001 | 5003 | 5005 | 5012 | 5017 | 5033 | 5034 | 5057 => DeclineClass::NeverRetry,
            5004 | 5007 | 5041 | 5043 | 5015 | 5031 | 5036 | 5058 | 5062 | 5113 | 5059 | 6025 => {
                DeclineClass::NeverRetry
            }
            3001..=3004 | 3008 => DeclineClass::NeverRetry,
            5206 | 5207 | 5014 | 5054 | 5055 | 5082 | 5063 | 5761..=5763 => {
                DeclineClass::NeedsCustomer
            }
            5051 | 5065 | 5096 | 5091 | 5092 | 5030 | 5061 | 5303 | 3006 | 3007 => {
                DeclineClass::RetryLater
            }
            _ => DeclineClass::Other,
        }
    }

    /// Whether a decline with this code is in the documented "conditional" or "temporary" groups:
    /// after two such declines the gateway blocks the card for 24 hours, so billing must not try a
    /// third time within a day.
    pub fn counts_toward_daily_limit(self) -> bool {
        matches!(
            self.0,
            5013 | 5014 | 5030 | 5054 | 5055 | 5063 | 5051 | 5065 | 5096
        )
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{} {}", self.0, name),
            None => write!(f, "{}", self.0),
        }
    }
}

impl From<i32> for ReasonCode {
    fn from(code: i32) -> Self {
        ReasonCode(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        assert!(REASONS.windows(2).all(|w| w[0].code < w[1].code));
        assert!(REASONS.iter().all(|r| !r.name.contains(' ')));
    }

    #[test]
    fn lookups() {
        assert_eq!(ReasonCode(5051).name(), Some("InsufficientFunds"));
        assert_eq!(
            ReasonCode(6025).name(),
            Some("CrossTerminalTokenRestriction")
        );
        assert_eq!(ReasonCode(4242).info(), None);
        assert_eq!(ReasonCode(5051).to_string(), "5051 InsufficientFunds");
        assert!(ReasonCode::APPROVED.is_approved());
    }

    #[test]
    fn classes_follow_the_documented_groups() {
        for c in [5001, 5003, 5005, 5012, 5017, 5033, 5034, 5057] {
            assert_eq!(ReasonCode(c).class(), DeclineClass::NeverRetry, "{c}");
            assert!(!ReasonCode(c).counts_toward_daily_limit());
        }
        for c in [5051, 5065, 5091, 5092, 5096] {
            assert_eq!(ReasonCode(c).class(), DeclineClass::RetryLater, "{c}");
        }
        for c in [5206, 5207, 5054] {
            assert_eq!(ReasonCode(c).class(), DeclineClass::NeedsCustomer, "{c}");
        }
        // Every conditional or temporary code is retryable by someone, never "never".
        for c in [5013, 5014, 5030, 5054, 5055, 5063, 5051, 5065, 5096] {
            assert!(ReasonCode(c).counts_toward_daily_limit());
            assert_ne!(ReasonCode(c).class(), DeclineClass::NeverRetry, "{c}");
        }
        assert_eq!(ReasonCode(5204).class(), DeclineClass::Other);
        assert_eq!(ReasonCode(9999).class(), DeclineClass::Other);
    }
}
