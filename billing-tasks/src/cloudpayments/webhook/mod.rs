//! Gateway notifications (webhooks, §6): the primitives the receiver endpoint is built from.
//!
//! Order of work in a receiver: read the raw body bytes; [`verify`] the `Content-HMAC` header
//! against them with the API secret (never re-serialize first); then parse the typed notification
//! for the URL's type ([`Notification::parse`]); answer with a [`WebhookAnswer`] as
//! `{"code":N}`. The gateway re-delivers Pay/Fail/Refund/… until it gets `{"code":0}`, so
//! handling must be idempotent per transaction id.

mod answer;
mod notification;
mod signature;

pub use answer::WebhookAnswer;
pub use notification::{
    CancelNotification, CheckNotification, ConfirmNotification, FailNotification, Notification,
    NotificationKind, OperationType, PayNotification, PaymentDetails, RecurrentNotification,
    RefundNotification, WebhookError,
};
pub use signature::{CONTENT_HMAC, X_CONTENT_HMAC, sign, sign_decoded, verify, verify_decoded};
