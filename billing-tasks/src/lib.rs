//! Billing for the online cinema, on the task queue.
//!
//! - [`money`]: amounts in integer minor units with their currency.
//! - [`secret`]: card cryptograms, tokens and API secrets that never print; [`vault`]: the
//!   cryptograms and 3-D Secure answers sealed at rest in the ledger.
//! - [`cloudpayments`]: the CloudPayments API client, reason-code classes, webhook signatures, and
//!   a faithful fake gateway for tests and the demo.
//! - [`domain`]: the state machines and the billing policy (grace, dunning, refunds).
//! - [`db`], [`ledger`]: the PostgreSQL ledger, its migrations, history and outbox.
//! - [`charging`]: exactly-once payment attempts; [`card_check`]: a new card proved by an
//!   authorisation that is voided; [`renewals`], [`refunds`], [`reconcile`],
//!   [`outbox`]: the flows built on it.
//! - [`service`]: the API the frontend and back-office call; [`backoffice`]: the staff web UI
//!   under `/admin`; [`tasks`]: the `billing.*` tasks.
//! - [`grpc`]: the `billing.v1` gRPC API over the service and the `auth.v1` outbox client;
//!   [`fake_auth`]: an `auth.v1` fake for tests and the demo.

pub mod backoffice;
pub mod card_check;
pub mod charging;
pub mod cloudpayments;
pub mod config;
pub mod context;
pub mod daily_reconciliation;
pub mod db;
pub mod domain;
pub mod error;
pub mod fake_auth;
pub mod gateway_flow;
pub mod gateway_pause;
pub mod grpc;
pub mod ledger;
pub mod ledger_metrics;
pub mod money;
pub mod outbox;
pub mod reconcile;
pub mod refunds;
pub mod renewals;
pub mod secret;
pub mod service;
pub mod tasks;
pub mod vault;
pub mod webhooks;

pub use context::Billing;
pub use error::{BillingError, Result};
pub use service::BillingService;
