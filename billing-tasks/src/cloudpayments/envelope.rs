//! The response envelope `{"Model":…, "Success":…, "Message":…}` (§1.3) and how each method's
//! answer is told apart (§1.4): `Success` true → accepted; else a non-empty `Message` → request
//! error; else a `Model` with `PaReq` and `AcsUrl` → 3-D Secure; else a `Model` with `ReasonCode`
//! → declined. `Success` is about the request, never the money: read the model's status.

use serde_json::Value;

use super::error::GatewayError;
use super::fields::{FieldError, Fields};
use super::model::{ChargeOutcome, ThreeDsChallenge, Transaction, TransactionId};

/// A parsed envelope.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub success: bool,
    /// `Message`, when non-empty.
    pub message: Option<String>,
    /// `Model`, when it is an object.
    pub model: Option<Fields>,
    /// `Model`, when it is an array of objects (lists).
    pub models: Option<Vec<Fields>>,
}

fn malformed(detail: impl Into<String>) -> GatewayError {
    GatewayError::MalformedResponse {
        detail: detail.into(),
    }
}

fn bad_field(e: FieldError) -> GatewayError {
    malformed(e.to_string())
}

impl Envelope {
    /// Reads a 2xx body. Anything but a JSON object with a boolean `Success` is malformed.
    pub(crate) fn parse(body: &[u8]) -> Result<Envelope, GatewayError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|_| malformed("the body is not JSON"))?;
        let f =
            Fields::from_json(value).ok_or_else(|| malformed("the body is not a JSON object"))?;
        let success = f
            .bool("Success")
            .map_err(bad_field)?
            .ok_or_else(|| malformed("`Success` is missing"))?;
        Ok(Envelope {
            success,
            message: f.text("Message").filter(|m| !m.trim().is_empty()),
            model: f.object("Model"),
            models: f.objects("Model"),
        })
    }

    /// A list answer (`payments/list`): its transactions.
    pub(crate) fn into_list(self) -> Result<Vec<Transaction>, GatewayError> {
        if !self.success {
            return Err(self.into_failure());
        }
        self.models
            .unwrap_or_default()
            .iter()
            .map(|m| Transaction::from_fields(m).map_err(bad_field))
            .collect()
    }

    fn request_error(message: String) -> GatewayError {
        GatewayError::Rejected { message }
    }

    /// A payment answer (charge, auth, post3ds, token charge).
    pub(crate) fn into_charge_outcome(self) -> Result<ChargeOutcome, GatewayError> {
        if self.success {
            let model = self
                .model
                .ok_or_else(|| malformed("an accepted payment without `Model`"))?;
            return Ok(ChargeOutcome::Approved(
                Transaction::from_fields(&model).map_err(bad_field)?,
            ));
        }
        if let Some(message) = self.message {
            return Err(Envelope::request_error(message));
        }
        let model = self
            .model
            .ok_or_else(|| malformed("`Success` is false without `Message` or `Model`"))?;
        if model.has("PaReq") && model.has("AcsUrl") {
            return Ok(ChargeOutcome::ThreeDs(
                ThreeDsChallenge::from_fields(&model).map_err(bad_field)?,
            ));
        }
        if model.has("ReasonCode") {
            return Ok(ChargeOutcome::Declined(
                Transaction::from_fields(&model).map_err(bad_field)?,
            ));
        }
        Err(malformed(
            "a failed payment without a 3-D Secure or decline model",
        ))
    }

    /// A lookup answer (`get`, `find`): the transaction whatever its status. Some statuses come
    /// with `Success:false` and a full model (§3.8), so any model with a `TransactionId` counts.
    /// "Not found" is `None`.
    pub(crate) fn into_lookup(self) -> Result<Option<Transaction>, GatewayError> {
        if let Some(model) = self.model.filter(|m| m.has("TransactionId")) {
            return Transaction::from_fields(&model)
                .map(Some)
                .map_err(bad_field);
        }
        match self.message {
            Some(m) if is_not_found(&m) => Ok(None),
            Some(m) => Err(Envelope::request_error(m)),
            None if self.success => Err(malformed("a lookup answer without `Model`")),
            None => Ok(None),
        }
    }

    /// A refund answer: the new refund transaction's id.
    pub(crate) fn into_refund_id(self) -> Result<TransactionId, GatewayError> {
        if self.success {
            let model = self
                .model
                .ok_or_else(|| malformed("a refund without `Model`"))?;
            return model
                .i64("TransactionId")
                .map_err(bad_field)?
                .ok_or_else(|| malformed("a refund without `TransactionId`"));
        }
        Err(self.into_failure())
    }

    /// An answer with no model (`void`, `confirm`, `test`): `Ok` with the message, if any.
    pub(crate) fn into_unit(self) -> Result<Option<String>, GatewayError> {
        if self.success {
            Ok(self.message)
        } else {
            Err(self.into_failure())
        }
    }

    fn into_failure(self) -> GatewayError {
        match self.message {
            Some(m) => Envelope::request_error(m),
            None => malformed("`Success` is false without a `Message`"),
        }
    }
}

/// The gateway's "not found" answer. The documented text is `Not found`; a Russian culture may
/// answer in Russian, so both are recognised.
fn is_not_found(message: &str) -> bool {
    let m = message.trim().to_lowercase();
    m.starts_with("not found") || m.starts_with("не найден")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudpayments::TransactionStatus;

    fn parse(s: &str) -> Envelope {
        Envelope::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn payment_answers_are_told_apart_in_order() {
        let ok = parse(
            r#"{"Model":{"TransactionId":1,"Amount":10.00,"Status":"Completed","ReasonCode":0},"Success":true,"Message":null}"#,
        );
        assert!(
            matches!(ok.into_charge_outcome(), Ok(ChargeOutcome::Approved(t)) if t.status == TransactionStatus::Completed)
        );

        let err = parse(r#"{"Success":false,"Message":"Invalid Amount value"}"#);
        assert_eq!(
            err.into_charge_outcome(),
            Err(GatewayError::Rejected {
                message: "Invalid Amount value".into()
            })
        );

        let tds = parse(
            r#"{"Model":{"TransactionId":891463508,"PaReq":"eyJ","AcsUrl":"https://demo/acs","ThreeDsCallbackId":"7b"},"Success":false,"Message":null}"#,
        );
        assert!(
            matches!(tds.into_charge_outcome(), Ok(ChargeOutcome::ThreeDs(c)) if c.transaction_id == 891_463_508)
        );

        let declined = parse(
            r#"{"Model":{"TransactionId":2,"Amount":"10.00","ReasonCode":5051,"Status":"Declined"},"Success":false,"Message":""}"#,
        );
        assert!(
            matches!(declined.into_charge_outcome(), Ok(ChargeOutcome::Declined(t)) if t.reason_code.0 == 5051)
        );

        assert!(matches!(
            parse(r#"{"Success":false,"Message":null}"#).into_charge_outcome(),
            Err(GatewayError::MalformedResponse { .. })
        ));
        assert!(Envelope::parse(b"<html>").is_err());
        assert!(Envelope::parse(br#"{"Message":"x"}"#).is_err());
    }

    #[test]
    fn lookups_and_refunds() {
        assert_eq!(
            parse(r#"{"Success":false,"Message":"Not found"}"#).into_lookup(),
            Ok(None)
        );
        let cancelled = parse(
            r#"{"Model":{"TransactionId":5,"Amount":1,"Status":"Cancelled"},"Success":false,"Message":null}"#,
        );
        assert_eq!(
            cancelled.into_lookup().unwrap().unwrap().status,
            TransactionStatus::Cancelled
        );
        assert_eq!(
            parse(r#"{"Model":{"TransactionId":568},"Success":true,"Message":null}"#)
                .into_refund_id(),
            Ok(568)
        );
        assert_eq!(
            parse(r#"{"Success":true,"Message":null}"#).into_unit(),
            Ok(None)
        );
    }
}
