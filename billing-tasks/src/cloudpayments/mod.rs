//! CloudPayments: the API client billing uses, the reason-code classes that drive dunning, the
//! webhook primitives the receiver uses, and a faithful fake gateway for tests and the demo.
//!
//! The wire format is described in `shared/reference/cloudpayments-api.md`; section numbers in
//! comments (§1.3, §4.4, …) refer to it.
//!
//! - [`client`]: [`Client`] and its [`Config`]; every state-changing call carries the caller's
//!   `X-Request-ID`, so a call whose outcome is unknown ([`GatewayError::outcome_unknown`]) is
//!   retried with the same id and never charges twice.
//! - [`model`]: what goes in ([`CryptogramCharge`], [`TokenCharge`]) and what comes back
//!   ([`ChargeOutcome`], [`Transaction`], [`ThreeDsChallenge`]).
//! - [`reason`]: the reason-code table (§4.3) and [`DeclineClass`] (§4.4).
//! - [`webhook`]: `Content-HMAC` signing and verification, typed notifications, answer codes.
//! - [`fake`]: an in-process (and stand-alone) gateway that follows the documented API, with
//!   counters and fault injection.
//!
//! Invariants held throughout:
//! - Money is never a float: [`Money`](crate::money::Money) inside, `rust_decimal` at the wire,
//!   amounts written as JSON numbers with exactly two decimals.
//! - Cryptograms, tokens and the API secret travel as [`Secret`](crate::secret::Secret) and never
//!   reach `Debug`, `Display`, errors or logs.
//! - Transaction ids are `i64` (production ids already exceed 2³¹).

pub mod client;
pub mod config;
mod envelope;
pub mod error;
pub mod fake;
mod fields;
pub mod form;
pub mod model;
pub mod reason;
pub mod webhook;
mod wire;

pub use client::Client;
pub use config::{Config, ConfigError};
pub use error::GatewayError;
pub use model::{
    CardInfo, ChargeOutcome, CryptogramCharge, ThreeDsChallenge, TokenCharge, TokenInitiator,
    Transaction, TransactionId, TransactionStatus,
};
pub use reason::{DeclineClass, ReasonCode};
