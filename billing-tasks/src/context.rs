//! Everything a billing flow needs, shared by the service API, the tasks and the webhook receiver.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::cloudpayments;
use crate::domain::Policy;

/// The billing context: ledger, gateway, policy, clock and a task-queue client.
#[derive(Clone)]
pub struct Billing {
    inner: Arc<Inner>,
}

struct Inner {
    db: PgPool,
    gateway: cloudpayments::Client,
    policy: Policy,
    clock: task_core::Clock,
    tasks: task_core::Client,
    queue: String,
    flow: crate::gateway_flow::GatewayFlow,
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing")
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl Billing {
    /// Builds the context. `tasks` enqueues billing tasks (its broker and backend are shared).
    pub fn new(
        db: PgPool,
        gateway: cloudpayments::Client,
        policy: Policy,
        clock: task_core::Clock,
        tasks: task_core::Client,
    ) -> Self {
        Billing {
            inner: Arc::new(Inner {
                db,
                gateway,
                policy,
                clock,
                tasks,
                queue: crate::tasks::QUEUE.to_owned(),
                flow: crate::gateway_flow::GatewayFlow::local(),
            }),
        }
    }

    /// The same context sending billing tasks to `queue` instead of `billing`.
    pub fn with_queue(self, queue: impl Into<String>) -> Self {
        let i = &self.inner;
        Billing {
            inner: Arc::new(Inner {
                db: i.db.clone(),
                gateway: i.gateway.clone(),
                policy: i.policy.clone(),
                clock: i.clock.clone(),
                tasks: i.tasks.clone(),
                queue: queue.into(),
                flow: i.flow.clone(),
            }),
        }
    }

    /// The same context with another policy.
    pub fn with_policy(self, policy: Policy) -> Self {
        let i = &self.inner;
        Billing {
            inner: Arc::new(Inner {
                db: i.db.clone(),
                gateway: i.gateway.clone(),
                policy,
                clock: i.clock.clone(),
                tasks: i.tasks.clone(),
                queue: i.queue.clone(),
                flow: i.flow.clone(),
            }),
        }
    }

    /// The same context with other limits on gateway calls (shared through the coordinator).
    pub fn with_flow(self, flow: crate::gateway_flow::GatewayFlow) -> Self {
        let i = &self.inner;
        Billing {
            inner: Arc::new(Inner {
                db: i.db.clone(),
                gateway: i.gateway.clone(),
                policy: i.policy.clone(),
                clock: i.clock.clone(),
                tasks: i.tasks.clone(),
                queue: i.queue.clone(),
                flow,
            }),
        }
    }

    /// The limits on gateway calls.
    pub fn flow(&self) -> &crate::gateway_flow::GatewayFlow {
        &self.inner.flow
    }

    /// The queue billing tasks are sent to.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// The ledger.
    pub fn db(&self) -> &PgPool {
        &self.inner.db
    }

    /// The CloudPayments client.
    pub fn gateway(&self) -> &cloudpayments::Client {
        &self.inner.gateway
    }

    /// Grace, dunning and refund rules.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The current time (injected in tests).
    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// The task-queue client used to enqueue billing tasks.
    pub fn tasks(&self) -> &task_core::Client {
        &self.inner.tasks
    }
}
