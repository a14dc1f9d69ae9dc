//! Billing settings shared by the `worker` and `billing-api` binaries (ARCHITECTURE.md §3.4):
//! every one is a flag and an environment variable with the same meaning.

use std::sync::Arc;
use std::time::Duration;

use crate::cloudpayments;
use crate::context::Billing;
use crate::domain::Policy;
use crate::error::{BillingError, Result};
use crate::outbox::{HttpTarget, OutboxTarget};
use crate::secret::Secret;

/// The ledger, the gateway and the outbox target.
#[derive(Debug, Clone, clap::Args)]
pub struct BillingArgs {
    /// PostgreSQL ledger; migrations are applied at start-up.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/billing"
    )]
    pub database_url: String,

    /// Ledger connections per process.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub database_pool_size: u32,

    /// CloudPayments API base URL.
    #[arg(long, env = "CLOUDPAYMENTS_URL", default_value = cloudpayments::config::DEFAULT_URL)]
    pub cloudpayments_url: String,

    /// CloudPayments terminal Public ID (required for billing).
    #[arg(long, env = "CLOUDPAYMENTS_PUBLIC_ID")]
    pub cloudpayments_public_id: Option<String>,

    /// CloudPayments API secret (required for billing; set it in the environment, not on the
    /// command line).
    #[arg(long, env = "CLOUDPAYMENTS_API_SECRET", hide_env_values = true)]
    pub cloudpayments_api_secret: Option<String>,

    /// Seconds a gateway call may take before its outcome counts as unknown.
    #[arg(long, env = "CLOUDPAYMENTS_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub cloudpayments_timeout: u64,

    /// Queue the billing tasks are sent to (and consumed from, unless WORKER_QUEUES says otherwise).
    #[arg(long, env = "BILLING_QUEUE", default_value = crate::tasks::QUEUE)]
    pub billing_queue: String,

    /// Seconds after which a gateway call whose outcome is unknown is looked up (replayed or
    /// found by invoice); longer than CLOUDPAYMENTS_TIMEOUT.
    #[arg(long, env = "BILLING_PROCESSING_LEASE", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3000))]
    pub processing_lease: u64,

    /// Seconds the gateway may still be processing a call after it was sent: no call is replayed
    /// or looked up before this (CloudPayments documents up to 5 minutes of server-side time).
    #[arg(long, env = "BILLING_GATEWAY_MAX_PROCESSING", default_value_t = 360, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub gateway_max_processing: u64,

    /// Seconds after which an attempt the gateway still has no record of is taken as never made
    /// (and may be tried again); at least BILLING_GATEWAY_MAX_PROCESSING.
    #[arg(long, env = "BILLING_UNKNOWN_GIVE_UP", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub unknown_give_up: u64,

    /// Seconds before a renewal attempt that never reached the card is tried again.
    #[arg(long, env = "BILLING_NOT_PROCESSED_RETRY", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub not_processed_retry: u64,

    /// Calls per second allowed per gateway terminal, across every worker (`10/s`, `600/m`);
    /// unset: no limit. One charge per payer is in flight at a time regardless.
    #[arg(long, env = "BILLING_GATEWAY_RATE")]
    pub gateway_rate: Option<task_core::RateLimit>,

    /// Keys sealing card cryptograms and 3-D Secure answers in the ledger: `id:base64-of-32-bytes`,
    /// comma-separated, the first sealing and all opening (rotate by putting a new key first).
    /// Every billing process needs the same keys. Unset: one key derived from the API secret.
    #[arg(long, env = "BILLING_VAULT_KEYS", hide_env_values = true)]
    pub vault_keys: Option<String>,

    /// Where outbox messages (role grants and revocations, notifications) are POSTed as JSON.
    /// Unset: they are recorded and kept pending.
    #[arg(long, env = "OUTBOX_URL")]
    pub outbox_url: Option<String>,

    /// The auth service's gRPC address (`http://host:port`, or `https://`): role grants and
    /// revocations go there over `auth.v1` instead of OUTBOX_URL (which then only gets the other
    /// messages). Unset: everything goes to OUTBOX_URL.
    #[arg(long, env = "AUTH_GRPC_URL")]
    pub auth_grpc_url: Option<String>,

    /// The service token billing presents to the auth service (with AUTH_GRPC_URL).
    #[arg(long, env = "AUTH_GRPC_TOKEN", hide_env_values = true)]
    pub auth_grpc_token: Option<String>,
}

impl BillingArgs {
    /// The gateway client these settings describe.
    pub fn gateway(&self) -> Result<cloudpayments::Client> {
        let public_id = self
            .cloudpayments_public_id
            .clone()
            .ok_or_else(|| BillingError::invalid("CLOUDPAYMENTS_PUBLIC_ID is not set"))?;
        let secret = self
            .cloudpayments_api_secret
            .clone()
            .ok_or_else(|| BillingError::invalid("CLOUDPAYMENTS_API_SECRET is not set"))?;
        let config =
            cloudpayments::Config::new(&self.cloudpayments_url, public_id, Secret::new(secret))
                .map_err(|e| BillingError::invalid(e.to_string()))?
                .with_timeouts(
                    Duration::from_secs(10),
                    Duration::from_secs(self.cloudpayments_timeout),
                );
        cloudpayments::Client::new(config).map_err(|e| BillingError::invalid(e.to_string()))
    }

    /// The API secret webhooks are signed with.
    pub fn api_secret(&self) -> Result<Secret<String>> {
        self.cloudpayments_api_secret
            .clone()
            .map(Secret::new)
            .ok_or_else(|| BillingError::invalid("CLOUDPAYMENTS_API_SECRET is not set"))
    }

    /// The outbox target, if one is configured.
    pub fn outbox(&self) -> Result<Option<Arc<dyn OutboxTarget>>> {
        let http: Option<Arc<dyn OutboxTarget>> = match &self.outbox_url {
            Some(url) => Some(Arc::new(HttpTarget::new(url)?)),
            None => None,
        };
        Ok(match &self.auth_grpc_url {
            Some(url) => {
                let token = self.auth_grpc_token.clone().ok_or_else(|| {
                    BillingError::invalid("AUTH_GRPC_TOKEN must be set with AUTH_GRPC_URL")
                })?;
                Some(Arc::new(crate::grpc::auth_target::AuthGrpcTarget::new(
                    url,
                    Secret::new(token),
                    http,
                )?))
            }
            None => http,
        })
    }

    /// The limits on gateway calls, shared through `coordinator`.
    pub fn flow(
        &self,
        coordinator: task_core::coord::Coordinator,
    ) -> crate::gateway_flow::GatewayFlow {
        crate::gateway_flow::GatewayFlow::new(
            coordinator,
            self.cloudpayments_public_id.as_deref().unwrap_or("default"),
            self.gateway_rate,
            std::time::Duration::from_secs(self.cloudpayments_timeout),
        )
    }

    /// Connects to the ledger (applying migrations) and builds the billing context.
    pub async fn connect(&self, tasks: task_core::Client) -> Result<Billing> {
        if self.processing_lease < self.cloudpayments_timeout + 10 {
            // A lookup must never overlap the call it is looking up.
            return Err(BillingError::invalid(format!(
                "BILLING_PROCESSING_LEASE ({} s) must exceed CLOUDPAYMENTS_TIMEOUT ({} s) by at least 10 s",
                self.processing_lease, self.cloudpayments_timeout
            )));
        }
        if self.unknown_give_up < self.gateway_max_processing {
            // "No record" means nothing only once the gateway can no longer be processing it.
            return Err(BillingError::invalid(format!(
                "BILLING_UNKNOWN_GIVE_UP ({} s) must be at least BILLING_GATEWAY_MAX_PROCESSING ({} s)",
                self.unknown_give_up, self.gateway_max_processing
            )));
        }
        if let Some(spec) = &self.vault_keys {
            let vault = crate::vault::Vault::from_spec(&Secret::new(spec.clone()))?;
            // Already configured (a second context in this process): the first keys stay.
            let _ = crate::vault::configure(vault);
        }
        let gateway = self.gateway()?;
        let db = crate::db::connect(&self.database_url, self.database_pool_size).await?;
        let policy = Policy {
            processing_lease: chrono::Duration::seconds(self.processing_lease as i64),
            gateway_max_processing: chrono::Duration::seconds(self.gateway_max_processing as i64),
            unknown_give_up: chrono::Duration::seconds(self.unknown_give_up as i64),
            not_processed_retry: chrono::Duration::seconds(self.not_processed_retry as i64),
            ..Policy::default()
        };
        Ok(
            Billing::new(db, gateway, policy, task_core::Clock::system(), tasks)
                .with_queue(&self.billing_queue),
        )
    }
}
