//! Billing errors as gRPC statuses, with `google.rpc` details a client can act on:
//! INVALID_ARGUMENT carries `BadRequest` field violations, FAILED_PRECONDITION a
//! `PreconditionFailure`, UNAVAILABLE a `RetryInfo`. Internal details are logged, never sent.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::BillingError;

/// A field violation collector: every bad field of a request is reported at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<(String, String)>);

impl Violations {
    /// Records that `field` is wrong and why.
    pub fn add(&mut self, field: &str, why: impl Into<String>) {
        self.0.push((field.to_owned(), why.into()));
    }

    /// `Ok` when nothing was recorded, else INVALID_ARGUMENT naming every field.
    pub fn check(self) -> Result<(), Status> {
        if self.0.is_empty() {
            return Ok(());
        }
        let message = self
            .0
            .iter()
            .map(|(f, why)| format!("{f}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        for (f, why) in self.0 {
            details.add_bad_request_violation(f, why);
        }
        Err(Status::with_error_details(
            Code::InvalidArgument,
            message,
            details,
        ))
    }
}

/// INVALID_ARGUMENT for one field.
pub fn invalid(field: &str, why: impl Into<String>) -> Status {
    let mut v = Violations::default();
    v.add(field, why);
    v.check().unwrap_err()
}

/// FAILED_PRECONDITION with a `PreconditionFailure` of type `kind` about `subject`.
pub fn precondition(kind: &str, subject: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::FailedPrecondition,
        description.clone(),
        ErrorDetails::with_precondition_failure_violation(kind, subject, description),
    )
}

/// The field a library validation message is about: its first word when that is a field name.
fn field_of(message: &str) -> &str {
    let first = message.split_whitespace().next().unwrap_or("");
    if !first.is_empty() && first.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        first
    } else {
        "request"
    }
}

/// The status a billing error answers.
pub fn from_billing(e: BillingError) -> Status {
    match e {
        BillingError::InvalidArgument(m) => {
            let field = field_of(&m).to_owned();
            invalid(&field, m)
        }
        BillingError::NotFound(m) => Status::not_found(format!("{m} not found")),
        BillingError::FailedPrecondition(m) => precondition("STATE", "subscription", m),
        BillingError::Unavailable(m) => {
            tracing::warn!(error = %m, "dependency unavailable");
            Status::with_error_details(
                Code::Unavailable,
                "billing is briefly unavailable; retry",
                ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            )
        }
        other => {
            tracing::error!(error = %other, "internal error answering a gRPC call");
            Status::internal("internal error; it has been logged")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_messages_name_their_field() {
        let s = from_billing(BillingError::invalid(
            "cryptogram must be 1 to 4096 characters",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        let br = s.get_details_bad_request().unwrap();
        assert_eq!(br.field_violations[0].field, "cryptogram");
        let s = from_billing(BillingError::precondition("already subscribed"));
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.get_details_precondition_failure().is_some());
    }
}
