//! The answer a notification handler gives (§6.2): `{"code":N}`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A handler's answer. Only Check may answer anything but [`WebhookAnswer::Ok`]; for the other
/// types a non-zero code makes the gateway deliver again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookAnswer {
    /// `0`: registered (Check: the payment may proceed).
    Ok,
    /// `10`: wrong order number (Check; the payment is declined with 3001).
    InvalidInvoiceId,
    /// `11`: wrong AccountId (declined with 3002).
    InvalidAccountId,
    /// `12`: wrong amount (declined with 3003).
    InvalidAmount,
    /// `13`: the payment cannot be accepted (declined with 3008).
    Rejected,
    /// `20`: the payment expired (declined with 3004).
    Expired,
}

impl WebhookAnswer {
    /// The numeric code.
    pub fn code(self) -> i64 {
        match self {
            WebhookAnswer::Ok => 0,
            WebhookAnswer::InvalidInvoiceId => 10,
            WebhookAnswer::InvalidAccountId => 11,
            WebhookAnswer::InvalidAmount => 12,
            WebhookAnswer::Rejected => 13,
            WebhookAnswer::Expired => 20,
        }
    }

    /// The answer for a documented code.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => WebhookAnswer::Ok,
            10 => WebhookAnswer::InvalidInvoiceId,
            11 => WebhookAnswer::InvalidAccountId,
            12 => WebhookAnswer::InvalidAmount,
            13 => WebhookAnswer::Rejected,
            20 => WebhookAnswer::Expired,
            _ => return None,
        })
    }

    /// The decline reason the gateway records when Check gives this answer (§4.3); `None` for Ok.
    pub fn decline_reason(self) -> Option<i32> {
        match self {
            WebhookAnswer::Ok => None,
            WebhookAnswer::InvalidInvoiceId => Some(3001),
            WebhookAnswer::InvalidAccountId => Some(3002),
            WebhookAnswer::InvalidAmount => Some(3003),
            WebhookAnswer::Expired => Some(3004),
            WebhookAnswer::Rejected => Some(3008),
        }
    }

    /// The JSON body, `{"code":N}`.
    pub fn to_json(self) -> String {
        format!("{{\"code\":{}}}", self.code())
    }
}

impl fmt::Display for WebhookAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

#[derive(Serialize, Deserialize)]
struct Wire {
    code: i64,
}

impl Serialize for WebhookAnswer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Wire { code: self.code() }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for WebhookAnswer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(d)?;
        WebhookAnswer::from_code(wire.code)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown answer code {}", wire.code)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_code_object() {
        assert_eq!(
            serde_json::to_string(&WebhookAnswer::Ok).unwrap(),
            r#"{"code":0}"#
        );
        assert_eq!(WebhookAnswer::Expired.to_json(), r#"{"code":20}"#);
        for a in [
            WebhookAnswer::Ok,
            WebhookAnswer::InvalidInvoiceId,
            WebhookAnswer::InvalidAccountId,
            WebhookAnswer::InvalidAmount,
            WebhookAnswer::Rejected,
            WebhookAnswer::Expired,
        ] {
            let back: WebhookAnswer = serde_json::from_str(&a.to_json()).unwrap();
            assert_eq!(back, a);
        }
        assert!(serde_json::from_str::<WebhookAnswer>(r#"{"code":7}"#).is_err());
        assert_eq!(WebhookAnswer::Rejected.decline_reason(), Some(3008));
    }
}
