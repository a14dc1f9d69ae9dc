//! The CloudPayments API client.
//!
//! Every method is a POST of a PascalCase JSON body with HTTP Basic auth (Public ID, API secret).
//! State-changing methods take a `request_id` that goes out as `X-Request-ID`: billing passes its
//! payment-attempt id, so a repeat after an unknown outcome is answered with the first response
//! and never charges twice (§5). Lookups (`get`, `find`, `test`) change nothing and carry none.
//!
//! Nothing here retries: whether and when to retry is the billing task's decision, informed by
//! [`GatewayError::outcome_unknown`], [`GatewayError::is_retryable`] and
//! [`GatewayError::retry_after`]. Logs carry the path, request id, HTTP status and timing, never
//! a body or a header value.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{HeaderValue, RETRY_AFTER};
use serde::Serialize;

use super::config::{Config, ConfigError};
use super::envelope::Envelope;
use super::error::GatewayError;
use super::model::{
    ChargeOutcome, CryptogramCharge, FindBody, Post3dsBody, RefundBody, TokenCharge, Transaction,
    TransactionId, TransactionIdBody,
};
use super::wire::WireAmount;
use crate::money::Money;
use crate::secret::Secret;

/// The header that makes a call idempotent (§5).
pub const REQUEST_ID_HEADER: &str = "X-Request-ID";

/// Longest request id accepted; ours are UUIDs (36 characters) or a UUID with an attempt number.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A client for one terminal. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Base URL without a trailing `/`.
    base: String,
    public_id: String,
    api_secret: Secret<String>,
}

/// `/payments/confirm` body.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ConfirmBody {
    transaction_id: TransactionId,
    amount: WireAmount,
}

/// The body of `/test`: nothing.
#[derive(Serialize)]
struct Empty {}

impl Client {
    /// Builds the client (rustls, the configured timeouts).
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .user_agent(concat!("billing-tasks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::HttpClient(e.to_string()))?;
        Ok(Client {
            http,
            base: config.base_url.as_str().trim_end_matches('/').to_owned(),
            public_id: config.public_id,
            api_secret: config.api_secret,
        })
    }

    /// Builds the client from `CLOUDPAYMENTS_URL`, `CLOUDPAYMENTS_PUBLIC_ID` and
    /// `CLOUDPAYMENTS_API_SECRET`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Client::new(Config::from_env()?)
    }

    /// The terminal's Public ID.
    pub fn public_id(&self) -> &str {
        &self.public_id
    }

    /// The terminal's API secret (the vault's default key is derived from it).
    pub(crate) fn api_secret(&self) -> &Secret<String> {
        &self.api_secret
    }

    /// Checks connectivity and credentials (`/test`); returns the gateway's `Message` (a GUID).
    pub async fn test(&self) -> Result<String, GatewayError> {
        let env = self.call("/test", &Empty {}, None).await?;
        Ok(env.into_unit()?.unwrap_or_default())
    }

    /// One-stage payment by cryptogram (`/payments/cards/charge`).
    pub async fn charge_cryptogram(
        &self,
        charge: &CryptogramCharge,
        request_id: &str,
    ) -> Result<ChargeOutcome, GatewayError> {
        check_amount(charge.amount)?;
        self.call("/payments/cards/charge", &charge.body(), Some(request_id))
            .await?
            .into_charge_outcome()
    }

    /// Two-stage authorization by cryptogram (`/payments/cards/auth`); capture with
    /// [`Client::confirm`] or release with [`Client::void`].
    pub async fn auth_cryptogram(
        &self,
        charge: &CryptogramCharge,
        request_id: &str,
    ) -> Result<ChargeOutcome, GatewayError> {
        check_amount(charge.amount)?;
        self.call("/payments/cards/auth", &charge.body(), Some(request_id))
            .await?
            .into_charge_outcome()
    }

    /// Finishes 3-D Secure (`/payments/cards/post3ds`) with the `PaRes` the ACS returned.
    /// The answer is approved or declined (5206 when authentication failed).
    pub async fn post3ds(
        &self,
        transaction_id: TransactionId,
        pa_res: &str,
        request_id: &str,
    ) -> Result<ChargeOutcome, GatewayError> {
        let body = Post3dsBody {
            transaction_id,
            pa_res,
        };
        self.call("/payments/cards/post3ds", &body, Some(request_id))
            .await?
            .into_charge_outcome()
    }

    /// One-stage payment by token (`/payments/tokens/charge`).
    pub async fn charge_token(
        &self,
        charge: &TokenCharge,
        request_id: &str,
    ) -> Result<ChargeOutcome, GatewayError> {
        check_amount(charge.amount)?;
        self.call("/payments/tokens/charge", &charge.body(), Some(request_id))
            .await?
            .into_charge_outcome()
    }

    /// Two-stage authorization by token (`/payments/tokens/auth`).
    pub async fn auth_token(
        &self,
        charge: &TokenCharge,
        request_id: &str,
    ) -> Result<ChargeOutcome, GatewayError> {
        check_amount(charge.amount)?;
        self.call("/payments/tokens/auth", &charge.body(), Some(request_id))
            .await?
            .into_charge_outcome()
    }

    /// Captures an authorized payment, fully or partly (`/payments/confirm`).
    pub async fn confirm(
        &self,
        transaction_id: TransactionId,
        amount: Money,
        request_id: &str,
    ) -> Result<(), GatewayError> {
        check_amount(amount)?;
        let body = ConfirmBody {
            transaction_id,
            amount: WireAmount::of(amount),
        };
        self.call("/payments/confirm", &body, Some(request_id))
            .await?
            .into_unit()
            .map(drop)
    }

    /// Refunds a completed payment, fully or partly (`/payments/refund`); returns the new refund
    /// transaction's id. Each partial refund needs its own request id.
    pub async fn refund(
        &self,
        transaction_id: TransactionId,
        amount: Money,
        request_id: &str,
    ) -> Result<TransactionId, GatewayError> {
        check_amount(amount)?;
        let body = RefundBody {
            transaction_id,
            amount: WireAmount::of(amount),
        };
        self.call("/payments/refund", &body, Some(request_id))
            .await?
            .into_refund_id()
    }

    /// Cancels an authorized (not yet captured) payment (`/payments/void`).
    pub async fn void(
        &self,
        transaction_id: TransactionId,
        request_id: &str,
    ) -> Result<(), GatewayError> {
        self.call(
            "/payments/void",
            &TransactionIdBody { transaction_id },
            Some(request_id),
        )
        .await?
        .into_unit()
        .map(drop)
    }

    /// A transaction by id (`/payments/get`), whatever its status; `None` if the gateway does not
    /// know it.
    pub async fn get(
        &self,
        transaction_id: TransactionId,
    ) -> Result<Option<Transaction>, GatewayError> {
        self.call("/payments/get", &TransactionIdBody { transaction_id }, None)
            .await?
            .into_lookup()
    }

    /// The latest payment with this InvoiceId (`/payments/find`), approved or declined; `None` if
    /// there is none. The recovery tool after an unknown outcome, not something to poll.
    pub async fn find(&self, invoice_id: &str) -> Result<Option<Transaction>, GatewayError> {
        self.call("/payments/find", &FindBody { invoice_id }, None)
            .await?
            .into_lookup()
    }

    /// The latest operation with this InvoiceId, refunds included (`/v2/payments/find`); `None`
    /// if there is none. How a refund whose answer was lost is found.
    pub async fn find_operation(
        &self,
        invoice_id: &str,
    ) -> Result<Option<Transaction>, GatewayError> {
        self.call("/v2/payments/find", &FindBody { invoice_id }, None)
            .await?
            .into_lookup()
    }

    /// Every operation (payments and refunds, any status) created on `date`, a day in UTC
    /// (`/payments/list`), for the daily reconciliation.
    pub async fn list(&self, date: chrono::NaiveDate) -> Result<Vec<Transaction>, GatewayError> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct ListBody {
            date: String,
            time_zone: &'static str,
        }
        self.call(
            "/payments/list",
            &ListBody {
                date: date.format("%Y-%m-%d").to_string(),
                time_zone: "UTC",
            },
            None,
        )
        .await?
        .into_list()
    }

    /// Sends one call and reads the envelope, mapping HTTP-level failures to [`GatewayError`].
    async fn call<B: Serialize>(
        &self,
        path: &'static str,
        body: &B,
        request_id: Option<&str>,
    ) -> Result<Envelope, GatewayError> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(&self.public_id, Some(self.api_secret.expose()))
            .json(body);
        if let Some(id) = request_id {
            request = request.header(REQUEST_ID_HEADER, request_id_header(id)?);
        }
        let started = Instant::now();
        let result = self.exchange(request).await;
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &result {
            Ok(_) => tracing::debug!(path, request_id, elapsed_ms, "cloudpayments call answered"),
            Err(error) => tracing::debug!(
                path,
                request_id,
                elapsed_ms,
                %error,
                outcome_unknown = error.outcome_unknown(),
                "cloudpayments call failed"
            ),
        }
        result
    }

    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<Envelope, GatewayError> {
        let response = request
            .send()
            .await
            .map_err(|e| GatewayError::from_transport(&e))?;
        let status = response.status();
        match status {
            StatusCode::UNAUTHORIZED => return Err(GatewayError::Unauthorized),
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(GatewayError::TooManyRequests {
                    retry_after: parse_retry_after(response.headers().get(RETRY_AFTER)),
                });
            }
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                return Err(GatewayError::ServerError { status: s.as_u16() });
            }
            s if !s.is_success() => {
                return Err(GatewayError::UnexpectedStatus { status: s.as_u16() });
            }
            _ => {}
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| GatewayError::from_transport(&e))
            .map_err(|e| match e {
                // The answer had begun: whatever stopped it, the request was processed or not.
                GatewayError::Connect { detail } => GatewayError::Transport { detail },
                other => other,
            })?;
        Envelope::parse(&body)
    }
}

fn check_amount(amount: Money) -> Result<(), GatewayError> {
    if amount.minor <= 0 {
        return Err(GatewayError::InvalidRequest {
            detail: format!("amount must be positive, got {amount}"),
        });
    }
    Ok(())
}

fn request_id_header(id: &str) -> Result<HeaderValue, GatewayError> {
    let bad = |why: &str| GatewayError::InvalidRequest {
        detail: format!("X-Request-ID {why}"),
    };
    if id.trim().is_empty() {
        return Err(bad("is empty"));
    }
    if id.len() > MAX_REQUEST_ID_LEN {
        return Err(bad("is too long"));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("must be printable ASCII without spaces"));
    }
    HeaderValue::from_str(id).map_err(|_| bad("is not a valid header value"))
}

/// `Retry-After` in seconds; an HTTP-date (which the gateway is not known to send) is ignored.
fn parse_retry_after(v: Option<&HeaderValue>) -> Option<Duration> {
    let secs: u64 = v?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_checked_before_sending() {
        assert!(request_id_header("018f6b1c-7a2b-7c3d-8e4f-0123456789ab").is_ok());
        for bad in ["", "  ", "has space", "ünïcode", &"x".repeat(129)] {
            assert!(
                matches!(
                    request_id_header(bad),
                    Err(GatewayError::InvalidRequest { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static("3"))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static(
                "Wed, 21 Oct 2015 07:28:00 GMT"
            ))),
            None
        );
        assert_eq!(parse_retry_after(None), None);
    }
}
