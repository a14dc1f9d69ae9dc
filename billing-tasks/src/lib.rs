//! Billing for the online cinema, on the task queue.
//!
//! - [`money`]: amounts in integer minor units with their currency.
//! - [`secret`]: card cryptograms, tokens and API secrets that never print.
//! - [`cloudpayments`]: the CloudPayments API client, reason-code classes, webhook signatures, and
//!   a faithful fake gateway for tests and the demo.

pub mod cloudpayments;
pub mod money;
pub mod secret;
