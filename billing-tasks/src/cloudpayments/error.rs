//! What can go wrong talking to the gateway, phrased as what the caller can do about it.
//!
//! The one question that matters for money is [`GatewayError::outcome_unknown`]: if the request
//! may have reached the gateway and been processed, the caller must not treat the attempt as
//! failed. It retries with the **same** `X-Request-ID` (the gateway answers a repeat with the first
//! response, §5) or reconciles through `payments/find` by InvoiceId. Declines are not errors:
//! they are [`ChargeOutcome::Declined`](super::ChargeOutcome::Declined).
//!
//! Error texts never contain a request body, a header value or a secret.

use std::time::Duration;

/// A failed gateway call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The connection could not be established (refused, DNS, TLS, connect timeout): nothing was
    /// sent. Safe to retry.
    #[error("cannot connect to CloudPayments: {detail}")]
    Connect {
        /// What the transport said.
        detail: String,
    },
    /// No complete answer within the timeout after the request was (possibly) sent: the outcome
    /// is unknown. Retry with the same request id, or look the invoice up.
    #[error("CloudPayments did not answer in time; the outcome is unknown: {detail}")]
    Timeout {
        /// What the transport said.
        detail: String,
    },
    /// The connection broke after the request was (possibly) sent: the outcome is unknown.
    #[error("connection to CloudPayments failed mid-request; the outcome is unknown: {detail}")]
    Transport {
        /// What the transport said.
        detail: String,
    },
    /// HTTP 401: the Public ID or API secret is wrong. Nothing was processed; fix the
    /// configuration, retrying will not help.
    #[error(
        "CloudPayments refused the credentials (HTTP 401); check CLOUDPAYMENTS_PUBLIC_ID and CLOUDPAYMENTS_API_SECRET"
    )]
    Unauthorized,
    /// HTTP 429: too many requests in flight for this terminal (§8). Nothing was processed; retry
    /// after `retry_after` if given, otherwise after a short back-off.
    #[error("CloudPayments is rate limiting this terminal (HTTP 429){}", retry_after_text(.retry_after))]
    TooManyRequests {
        /// The `Retry-After` the gateway sent, if any.
        retry_after: Option<Duration>,
    },
    /// HTTP 5xx (or 408): the gateway failed, possibly after processing. The outcome is unknown.
    #[error("CloudPayments answered HTTP {status}; the outcome is unknown")]
    ServerError {
        /// The HTTP status.
        status: u16,
    },
    /// Another HTTP status (404, 405, 400 …): the request did not reach an API method, so nothing
    /// was processed. Usually a wrong `CLOUDPAYMENTS_URL`.
    #[error("CloudPayments answered HTTP {status}; check CLOUDPAYMENTS_URL")]
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
    },
    /// The gateway refused the request itself (`Success:false` with a `Message`, §1.4), e.g.
    /// `"Invalid Amount value"`. Nothing was processed; the request must be fixed.
    #[error("CloudPayments rejected the request: {message}")]
    Rejected {
        /// The gateway's `Message`.
        message: String,
    },
    /// A 2xx answer that is not the documented envelope. The request reached the gateway, so the
    /// outcome is unknown.
    #[error("CloudPayments answered something unexpected; the outcome is unknown: {detail}")]
    MalformedResponse {
        /// What did not fit (never the body itself).
        detail: String,
    },
    /// The call was refused before sending (an empty request id, an amount of zero): nothing was
    /// sent. A bug in the caller.
    #[error("invalid CloudPayments request: {detail}")]
    InvalidRequest {
        /// What is wrong.
        detail: String,
    },
}

fn retry_after_text(d: &Option<Duration>) -> String {
    match d {
        Some(d) => format!("; retry after {} s", d.as_secs_f64()),
        None => String::new(),
    }
}

impl GatewayError {
    /// True when the request may have reached the gateway and its effect is unknown (timeout after
    /// sending, broken connection, 5xx, an unreadable 2xx answer). False when it certainly did
    /// nothing (connection refused, 401, 429, another 4xx, a request error, a local refusal).
    pub fn outcome_unknown(&self) -> bool {
        match self {
            GatewayError::Timeout { .. }
            | GatewayError::Transport { .. }
            | GatewayError::ServerError { .. }
            | GatewayError::MalformedResponse { .. } => true,
            GatewayError::Connect { .. }
            | GatewayError::Unauthorized
            | GatewayError::TooManyRequests { .. }
            | GatewayError::UnexpectedStatus { .. }
            | GatewayError::Rejected { .. }
            | GatewayError::InvalidRequest { .. } => false,
        }
    }

    /// True when repeating the same call (with the same request id) may succeed: transport
    /// failures, 429 and 5xx. Configuration errors and rejected requests are not retryable.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            GatewayError::Connect { .. }
                | GatewayError::Timeout { .. }
                | GatewayError::Transport { .. }
                | GatewayError::TooManyRequests { .. }
                | GatewayError::ServerError { .. }
                | GatewayError::MalformedResponse { .. }
        )
    }

    /// True when the gateway refused the call because of *our* setup, not the card: wrong
    /// credentials (401), a wrong URL (404 and other statuses), a request it rejects, or one we
    /// refused to send. Nothing was processed; such an answer is never a decline.
    pub fn is_our_fault(&self) -> bool {
        matches!(
            self,
            GatewayError::Unauthorized
                | GatewayError::UnexpectedStatus { .. }
                | GatewayError::Rejected { .. }
                | GatewayError::InvalidRequest { .. }
        )
    }

    /// The wait the gateway asked for (429 with `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::TooManyRequests { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// Classifies a transport error from reqwest. Only the error kind and its source chain are
    /// kept: reqwest's texts name the URL, never headers or bodies.
    pub(crate) fn from_transport(e: &reqwest::Error) -> Self {
        let detail = error_chain(e);
        if e.is_connect() {
            // Includes a connect timeout: the request was never written.
            GatewayError::Connect { detail }
        } else if e.is_timeout() {
            GatewayError::Timeout { detail }
        } else if e.is_builder() {
            GatewayError::InvalidRequest { detail }
        } else {
            GatewayError::Transport { detail }
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_versus_certainly_nothing() {
        let d = || "x".to_owned();
        assert!(GatewayError::Timeout { detail: d() }.outcome_unknown());
        assert!(GatewayError::Transport { detail: d() }.outcome_unknown());
        assert!(GatewayError::ServerError { status: 503 }.outcome_unknown());
        assert!(GatewayError::MalformedResponse { detail: d() }.outcome_unknown());
        assert!(!GatewayError::Connect { detail: d() }.outcome_unknown());
        assert!(!GatewayError::Unauthorized.outcome_unknown());
        assert!(!GatewayError::TooManyRequests { retry_after: None }.outcome_unknown());
        assert!(!GatewayError::Rejected { message: d() }.outcome_unknown());
        assert!(!GatewayError::Unauthorized.is_retryable());
        let e = GatewayError::TooManyRequests {
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(
            e.to_string(),
            "CloudPayments is rate limiting this terminal (HTTP 429); retry after 2 s"
        );
    }
}
