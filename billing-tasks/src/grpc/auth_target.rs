//! Outbox delivery to the auth service over `auth.v1`: `auth.grant` becomes GrantRole and
//! `auth.revoke` RevokeRole, each with the message's per-user sequence number and its id as the
//! idempotency key. Other topics (notifications, accounting) go to the JSON target when one is
//! configured, and wait otherwise.
//!
//! A FAILED_PRECONDITION `STALE_SEQUENCE` answer means the auth service already applied a later
//! change for the user: this message is obsolete, so it counts as delivered (and is logged).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};

use super::proto::auth::v1 as pb;
use crate::error::{BillingError, Result};
use crate::ledger::topic;
use crate::outbox::{OutboxMessage, OutboxTarget};
use crate::secret::Secret;

/// The auth service's `auth.v1` client as an outbox target.
#[derive(Clone)]
pub struct AuthGrpcTarget {
    client: pb::auth_client::AuthClient<Channel>,
    token: Secret<String>,
    others: Option<Arc<dyn OutboxTarget>>,
}

impl std::fmt::Debug for AuthGrpcTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGrpcTarget").finish_non_exhaustive()
    }
}

impl AuthGrpcTarget {
    /// A target calling the auth service at `url` (`http://host:port`, or `https://`) with the
    /// service token `token`; messages of other topics go to `others`. Connects lazily.
    pub fn new(
        url: &str,
        token: Secret<String>,
        others: Option<Arc<dyn OutboxTarget>>,
    ) -> Result<Self> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| BillingError::invalid(format!("AUTH_GRPC_URL `{url}`: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        Ok(AuthGrpcTarget {
            client: pb::auth_client::AuthClient::new(endpoint.connect_lazy()),
            token,
            others,
        })
    }

    fn request<T>(&self, message: T) -> std::result::Result<tonic::Request<T>, String> {
        let mut r = tonic::Request::new(message);
        let value = format!("Bearer {}", self.token.expose())
            .parse()
            .map_err(|_| "AUTH_GRPC_TOKEN is not valid metadata".to_owned())?;
        r.metadata_mut().insert("authorization", value);
        Ok(r)
    }
}

fn text(m: &OutboxMessage, key: &str) -> std::result::Result<String, String> {
    m.payload
        .get(key)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{} message {} has no `{key}`", m.topic, m.id))
}

fn is_stale(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    status.code() == tonic::Code::FailedPrecondition
        && status
            .get_details_precondition_failure()
            .is_some_and(|p| p.violations.iter().any(|v| v.r#type == "STALE_SEQUENCE"))
}

impl OutboxTarget for AuthGrpcTarget {
    fn deliver<'a>(
        &'a self,
        message: &'a OutboxMessage,
    ) -> BoxFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let user_seq = message.user_seq.unwrap_or(0);
            let answer = match message.topic.as_str() {
                topic::AUTH_GRANT => {
                    let expires_at = message
                        .payload
                        .get("until")
                        .and_then(|v| {
                            serde_json::from_value::<chrono::DateTime<chrono::Utc>>(v.clone()).ok()
                        })
                        .map(super::timestamp);
                    client
                        .grant_role(self.request(pb::GrantRoleRequest {
                            user_id: text(message, "user_id")?,
                            role: text(message, "role")?,
                            user_seq,
                            idempotency_key: message.id.to_string(),
                            expires_at,
                        })?)
                        .await
                }
                topic::AUTH_REVOKE => {
                    client
                        .revoke_role(self.request(pb::RevokeRoleRequest {
                            user_id: text(message, "user_id")?,
                            role: text(message, "role")?,
                            user_seq,
                            idempotency_key: message.id.to_string(),
                            reason: text(message, "reason").unwrap_or_default(),
                        })?)
                        .await
                }
                _ => {
                    return match &self.others {
                        Some(target) => target.deliver(message).await,
                        None => Err(format!(
                            "no OUTBOX_URL for `{}` messages (only auth.* go over gRPC)",
                            message.topic
                        )),
                    };
                }
            };
            match answer {
                Ok(_) => Ok(()),
                Err(status) if is_stale(&status) => {
                    tracing::warn!(id = %message.id, user_seq, "auth service applied a later change already; message obsolete");
                    Ok(())
                }
                Err(status) => Err(format!(
                    "auth service answered {:?}: {}",
                    status.code(),
                    status.message()
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::config::BillingArgs;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        billing: BillingArgs,
    }

    #[tokio::test]
    async fn auth_grpc_url_selects_the_grpc_target_and_needs_a_token() {
        let cli = Cli::try_parse_from(["t", "--auth-grpc-url", "http://127.0.0.1:1"]).unwrap();
        let err = cli.billing.outbox().err().expect("refused").to_string();
        assert!(err.contains("AUTH_GRPC_TOKEN"), "{err}");
        let cli = Cli::try_parse_from([
            "t",
            "--auth-grpc-url",
            "http://127.0.0.1:1",
            "--auth-grpc-token",
            "a-token",
            "--outbox-url",
            "http://127.0.0.1:2/outbox",
        ])
        .unwrap();
        assert!(cli.billing.outbox().unwrap().is_some());
        let cli = Cli::try_parse_from([
            "t",
            "--auth-grpc-url",
            "not a url",
            "--auth-grpc-token",
            "x",
        ])
        .unwrap();
        assert!(cli.billing.outbox().is_err());
    }
}
