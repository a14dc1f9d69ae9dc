//! The billing tasks, run by workers from the `billing` queue. They take ids, never card data
//! (ARCHITECTURE.md §3.5), so Python services can enqueue them too:
//! `send_task('billing.charge_payment', (payment_id,), queue='billing')`.
//!
//! | task | args | what |
//! |---|---|---|
//! | `billing.charge_payment` | payment_id | one gateway attempt (cryptogram, token or 3-D Secure completion) |
//! | `billing.check_card` | card_check_id | a new card's authorisation (or its lookup), then the void of its hold |
//! | `billing.charge_invoice` | invoice_id | the next attempt on a renewal invoice |
//! | `billing.charge_invoices` | invoice_ids | the same for a batch of invoices, in parallel |
//! | `billing.enqueue_renewals` | – | renewal invoices for periods ending soon, and their charges |
//! | `billing.retry_due_invoices` | – | charges for invoices whose dunning step is due |
//! | `billing.expire_subscriptions` | – | grace periods and expiries, with role revocation |
//! | `billing.refund` | refund_id | one refund at the gateway |
//! | `billing.reconcile_payments` | – | unknown outcomes, stale 3-D Secure, lost charge tasks, card checks and holds left unfinished |
//! | `billing.reconcile_refunds` | – | refunds whose task was lost or whose outcome is unknown |
//! | `billing.reconcile_day` | day (optional) | the gateway's operations of a day (yesterday) against the ledger |
//! | `billing.purge_cryptograms` | – | cryptograms never used in time are wiped |
//! | `billing.deliver_outbox` | – | role changes and notifications, with retries |

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use task_core::{Registry, Task, TaskContext, TaskError, TaskOptions};
use uuid::Uuid;

use crate::charging::{self, Step};
use crate::context::Billing;
use crate::daily_reconciliation;
use crate::error::BillingError;
use crate::outbox::{self, OutboxTarget};
use crate::reconcile;
use crate::refunds::{self, RefundRun};
use crate::renewals::{self, InvoiceRun};

/// The queue billing tasks are sent to.
pub const QUEUE: &str = "billing";

/// Registers every billing task. Without an outbox target, `billing.deliver_outbox` keeps messages
/// pending (and says so).
pub fn register(registry: &mut Registry, billing: Billing, outbox: Option<Arc<dyn OutboxTarget>>) {
    registry
        .register(ChargePayment(billing.clone()))
        .register(CheckCard(billing.clone()))
        .register(ChargeInvoice(billing.clone()))
        .register(ChargeInvoices(billing.clone()))
        .register(EnqueueRenewals(billing.clone()))
        .register(RetryDueInvoices(billing.clone()))
        .register(ExpireSubscriptions(billing.clone()))
        .register(Refund(billing.clone()))
        .register(ReconcilePayments(billing.clone()))
        .register(ReconcileRefunds(billing.clone()))
        .register(ReconcileDay(billing.clone()))
        .register(PurgeCryptograms(billing.clone()))
        .register(DeliverOutbox(billing, outbox));
}

/// Maps a billing failure to what the worker should do with the task.
fn task_error(e: BillingError) -> TaskError {
    match e {
        BillingError::InvalidArgument(m) => TaskError::abort("billing.InvalidArgument", m),
        BillingError::NotFound(m) => TaskError::abort("billing.NotFound", m),
        BillingError::FailedPrecondition(m) => TaskError::abort("billing.FailedPrecondition", m),
        BillingError::Unavailable(m) => TaskError::retry(m),
        other => TaskError::retry(other.to_string()),
    }
}

fn options() -> TaskOptions {
    TaskOptions::default().queue(QUEUE).max_retries(Some(5))
}

/// Options of tasks that wait out unknown gateway outcomes: many retries, each told how long.
fn charge_options() -> TaskOptions {
    options().max_retries(Some(100)).ignore_result(false)
}

/// One id argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentArgs {
    /// The payment.
    pub payment_id: Uuid,
}

/// One id argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceArgs {
    /// The invoice.
    pub invoice_id: Uuid,
}

/// A batch of invoices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceBatchArgs {
    /// The invoices (at most [`MAX_BATCH`]).
    pub invoice_ids: Vec<Uuid>,
}

/// Invoices per `billing.charge_invoices` task.
pub const BATCH: usize = 100;
/// The most invoices one `billing.charge_invoices` accepts.
pub const MAX_BATCH: usize = 1_000;
/// Charges in flight at once within one batch task.
pub const BATCH_PARALLELISM: usize = 50;

/// One id argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundArgs {
    /// The refund.
    pub refund_id: Uuid,
}

/// Enqueues `billing.charge_payment`.
pub async fn enqueue_charge_payment(billing: &Billing, payment_id: Uuid) -> task_core::Result<()> {
    enqueue::<ChargePayment>(billing, PaymentArgs { payment_id }).await
}

/// One id argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardCheckArgs {
    /// The card check.
    pub card_check_id: Uuid,
}

/// Enqueues `billing.check_card`.
pub async fn enqueue_check_card(billing: &Billing, card_check_id: Uuid) -> task_core::Result<()> {
    enqueue::<CheckCard>(billing, CardCheckArgs { card_check_id }).await
}

/// Enqueues `billing.refund`.
pub async fn enqueue_refund(billing: &Billing, refund_id: Uuid) -> task_core::Result<()> {
    enqueue::<Refund>(billing, RefundArgs { refund_id }).await
}

/// Enqueues one billing task on the billing queue.
pub async fn enqueue<T: Task>(billing: &Billing, args: T::Args) -> task_core::Result<()> {
    billing
        .tasks()
        .task::<T>(args)
        .queue(billing.queue())
        .send()
        .await
        .map(|_| ())
}

/// Enqueues many tasks with a window of unconfirmed publishes.
async fn enqueue_all<T: Task>(billing: &Billing, args: Vec<T::Args>) -> Result<u64, TaskError> {
    let client = billing.tasks();
    let fail = |e: task_core::Error| TaskError::retry(format!("enqueue {}: {e}", T::NAME));
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut n = 0u64;
    for a in args {
        in_flight.push(client.task::<T>(a).queue(billing.queue()).send());
        if in_flight.len() >= 256
            && let Some(r) = in_flight.next().await
        {
            r.map_err(fail)?;
            n += 1;
        }
    }
    while let Some(r) = in_flight.next().await {
        r.map_err(fail)?;
        n += 1;
    }
    Ok(n)
}

/// `billing.charge_payment(payment_id)`.
#[derive(Debug, Clone)]
pub struct ChargePayment(pub Billing);

impl Task for ChargePayment {
    const NAME: &'static str = "billing.charge_payment";
    type Args = PaymentArgs;
    type Output = String;

    fn options() -> TaskOptions {
        charge_options()
    }

    async fn run(&self, _ctx: TaskContext, a: PaymentArgs) -> Result<String, TaskError> {
        match charging::charge_payment(&self.0, a.payment_id)
            .await
            .map_err(task_error)?
        {
            Step::Settled(status) => Ok(status.to_string()),
            Step::RetryAfter(d) => Err(TaskError::retry_after(d, "gateway outcome pending")),
        }
    }
}

/// `billing.check_card(card_check_id)`.
#[derive(Debug, Clone)]
pub struct CheckCard(pub Billing);

impl Task for CheckCard {
    const NAME: &'static str = "billing.check_card";
    type Args = CardCheckArgs;
    type Output = String;

    fn options() -> TaskOptions {
        charge_options()
    }

    async fn run(&self, _ctx: TaskContext, a: CardCheckArgs) -> Result<String, TaskError> {
        match crate::card_check::run(&self.0, a.card_check_id)
            .await
            .map_err(task_error)?
        {
            Step::Settled(status) => Ok(status.to_string()),
            Step::RetryAfter(d) => Err(TaskError::retry_after(
                d,
                "card check outcome or void pending",
            )),
        }
    }
}

/// `billing.charge_invoice(invoice_id)`.
#[derive(Debug, Clone)]
pub struct ChargeInvoice(pub Billing);

impl Task for ChargeInvoice {
    const NAME: &'static str = "billing.charge_invoice";
    type Args = InvoiceArgs;
    type Output = String;

    /// Renewals come by the hundred thousand and the ledger records their outcome, so only
    /// failures are stored as results.
    fn options() -> TaskOptions {
        // Its failures are still stored (Celery's store_errors_even_if_ignored): a caller and the
        // monitor see why an invoice could not be charged.
        charge_options()
            .ignore_result(true)
            .store_errors_even_if_ignored(true)
    }

    async fn run(&self, _ctx: TaskContext, a: InvoiceArgs) -> Result<String, TaskError> {
        match renewals::charge_invoice(&self.0, a.invoice_id)
            .await
            .map_err(task_error)?
        {
            InvoiceRun::Finished(status) => Ok(format!("invoice {status}")),
            InvoiceRun::NotDue(at) => Ok(format!("next attempt at {at}")),
            InvoiceRun::Attempt(Step::Settled(status)) => Ok(format!("payment {status}")),
            InvoiceRun::Attempt(Step::RetryAfter(d)) => {
                Err(TaskError::retry_after(d, "gateway outcome pending"))
            }
        }
    }
}

/// Enqueues `billing.charge_invoices` for `ids`, [`BATCH`] at a time.
async fn enqueue_batches(billing: &Billing, ids: &[Uuid]) -> Result<u64, TaskError> {
    enqueue_all::<ChargeInvoices>(
        billing,
        ids.chunks(BATCH)
            .map(|c| InvoiceBatchArgs {
                invoice_ids: c.to_vec(),
            })
            .collect(),
    )
    .await
}

/// `billing.charge_invoices(invoice_ids)`: a renewal run's unit of work. Charging is per invoice
/// exactly as in `billing.charge_invoice`; batching only saves a message, a delivery and a result
/// per invoice. An invoice whose attempt must wait (unknown outcome, another run on it) or whose
/// run failed is handed on to its own `billing.charge_invoice`, so one invoice never holds up the
/// others or makes them run twice.
#[derive(Debug, Clone)]
pub struct ChargeInvoices(pub Billing);

/// What a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReport {
    /// Invoices paid.
    pub paid: u64,
    /// Attempts declined or failed (dunning continues).
    pub declined: u64,
    /// Invoices with nothing to do (paid, void, failed, not due).
    pub skipped: u64,
    /// Invoices handed on to their own task.
    pub handed_on: u64,
    /// Invoices that cannot be charged (unknown id, not a renewal invoice); logged as errors.
    pub rejected: u64,
}

impl Task for ChargeInvoices {
    const NAME: &'static str = "billing.charge_invoices";
    type Args = InvoiceBatchArgs;
    type Output = BatchReport;

    fn options() -> TaskOptions {
        options()
    }

    async fn run(&self, _ctx: TaskContext, a: InvoiceBatchArgs) -> Result<BatchReport, TaskError> {
        if a.invoice_ids.len() > MAX_BATCH {
            return Err(TaskError::abort(
                "billing.InvalidArgument",
                format!(
                    "{} invoices in one batch; at most {MAX_BATCH}",
                    a.invoice_ids.len()
                ),
            ));
        }
        let billing = &self.0;
        let mut report = BatchReport::default();
        let mut hand_on = Vec::new();
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut ids = a.invoice_ids.into_iter();
        loop {
            while in_flight.len() < BATCH_PARALLELISM {
                let Some(id) = ids.next() else { break };
                in_flight.push(charge_one(billing, id));
            }
            let Some((id, result)) = in_flight.next().await else {
                break;
            };
            match result {
                Ok(InvoiceRun::Attempt(Step::Settled(crate::domain::PaymentStatus::Succeeded))) => {
                    report.paid += 1
                }
                Ok(InvoiceRun::Attempt(Step::Settled(_))) => report.declined += 1,
                Ok(InvoiceRun::Finished(_) | InvoiceRun::NotDue(_)) => report.skipped += 1,
                Ok(InvoiceRun::Attempt(Step::RetryAfter(d))) => hand_on.push((id, d)),
                Err(
                    e @ (BillingError::InvalidArgument(_)
                    | BillingError::NotFound(_)
                    | BillingError::FailedPrecondition(_)),
                ) => {
                    tracing::error!(invoice_id = %id, error = %e, "renewal cannot be charged");
                    report.rejected += 1;
                }
                Err(e) => {
                    tracing::warn!(invoice_id = %id, error = %e, "renewal charge failed; handing it to its own task");
                    hand_on.push((id, Duration::from_secs(30)));
                }
            }
        }
        for (invoice_id, after) in hand_on {
            billing
                .tasks()
                .task::<ChargeInvoice>(InvoiceArgs { invoice_id })
                .queue(billing.queue())
                .countdown(after)
                .send()
                .await
                .map_err(|e| TaskError::retry(format!("enqueue billing.charge_invoice: {e}")))?;
            report.handed_on += 1;
        }
        Ok(report)
    }
}

async fn charge_one(billing: &Billing, id: Uuid) -> (Uuid, crate::error::Result<InvoiceRun>) {
    (id, renewals::charge_invoice(billing, id).await)
}

/// `billing.enqueue_renewals()`.
#[derive(Debug, Clone)]
pub struct EnqueueRenewals(pub Billing);

impl Task for EnqueueRenewals {
    const NAME: &'static str = "billing.enqueue_renewals";
    type Args = ();
    type Output = Value;

    fn options() -> TaskOptions {
        options()
    }

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<Value, TaskError> {
        let created = renewals::create_renewal_invoices(&self.0)
            .await
            .map_err(task_error)?;
        let batches = enqueue_batches(&self.0, &created).await?;
        Ok(json!({"invoices": created.len(), "enqueued": created.len(), "batches": batches}))
    }
}

/// `billing.retry_due_invoices()`.
#[derive(Debug, Clone)]
pub struct RetryDueInvoices(pub Billing);

impl Task for RetryDueInvoices {
    const NAME: &'static str = "billing.retry_due_invoices";
    type Args = ();
    type Output = Value;

    fn options() -> TaskOptions {
        options()
    }

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<Value, TaskError> {
        let due = renewals::due_invoices(&self.0, 50_000)
            .await
            .map_err(task_error)?;
        let batches = enqueue_batches(&self.0, &due).await?;
        Ok(json!({"enqueued": due.len(), "batches": batches}))
    }
}

/// `billing.expire_subscriptions()`.
#[derive(Debug, Clone)]
pub struct ExpireSubscriptions(pub Billing);

impl Task for ExpireSubscriptions {
    const NAME: &'static str = "billing.expire_subscriptions";
    type Args = ();
    type Output = renewals::ExpiryReport;

    fn options() -> TaskOptions {
        options()
    }

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<renewals::ExpiryReport, TaskError> {
        renewals::expire_subscriptions(&self.0)
            .await
            .map_err(task_error)
    }
}

/// `billing.refund(refund_id)`.
#[derive(Debug, Clone)]
pub struct Refund(pub Billing);

impl Task for Refund {
    const NAME: &'static str = "billing.refund";
    type Args = RefundArgs;
    type Output = String;

    fn options() -> TaskOptions {
        charge_options()
    }

    async fn run(&self, _ctx: TaskContext, a: RefundArgs) -> Result<String, TaskError> {
        match refunds::execute(&self.0, a.refund_id)
            .await
            .map_err(task_error)?
        {
            RefundRun::Settled(status) => Ok(status.to_string()),
            RefundRun::RetryAfter(d) => Err(TaskError::retry_after(d, "refund outcome pending")),
            RefundRun::NeedsAttention => Ok("outcome unknown; accounting notified".to_owned()),
        }
    }
}

/// `billing.reconcile_payments()`.
#[derive(Debug, Clone)]
pub struct ReconcilePayments(pub Billing);

impl Task for ReconcilePayments {
    const NAME: &'static str = "billing.reconcile_payments";
    type Args = ();
    type Output = reconcile::ReconcileReport;

    fn options() -> TaskOptions {
        options()
    }

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<reconcile::ReconcileReport, TaskError> {
        let (report, lost) = reconcile::reconcile_payments(&self.0)
            .await
            .map_err(task_error)?;
        enqueue_all::<ChargePayment>(
            &self.0,
            lost.into_iter()
                .map(|payment_id| PaymentArgs { payment_id })
                .collect(),
        )
        .await?;
        let expired = crate::card_check::expire_stale(&self.0)
            .await
            .map_err(task_error)?;
        if expired > 0 {
            tracing::info!(expired, "card checks the payer left were expired");
        }
        let checks = crate::card_check::unfinished(&self.0)
            .await
            .map_err(task_error)?;
        enqueue_all::<CheckCard>(
            &self.0,
            checks
                .into_iter()
                .map(|card_check_id| CardCheckArgs { card_check_id })
                .collect(),
        )
        .await?;
        Ok(report)
    }
}

/// `billing.reconcile_refunds()`.
#[derive(Debug, Clone)]
pub struct ReconcileRefunds(pub Billing);

impl Task for ReconcileRefunds {
    const NAME: &'static str = "billing.reconcile_refunds";
    type Args = ();
    type Output = Value;

    fn options() -> TaskOptions {
        options()
    }

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<Value, TaskError> {
        let ids = refunds::unsettled(&self.0).await.map_err(task_error)?;
        let enqueued = enqueue_all::<Refund>(
            &self.0,
            ids.into_iter()
                .map(|refund_id| RefundArgs { refund_id })
                .collect(),
        )
        .await?;
        Ok(json!({"enqueued": enqueued}))
    }
}

/// The day to reconcile; unset, yesterday (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayArgs {
    /// The day, `YYYY-MM-DD`.
    #[serde(default)]
    pub day: Option<chrono::NaiveDate>,
}

/// `billing.reconcile_day(day=None)`: the gateway's operations of a day compared with the ledger.
#[derive(Debug, Clone)]
pub struct ReconcileDay(pub Billing);

impl Task for ReconcileDay {
    const NAME: &'static str = "billing.reconcile_day";
    type Args = DayArgs;
    type Output = daily_reconciliation::DayReport;

    fn options() -> TaskOptions {
        options()
    }

    async fn run(
        &self,
        _ctx: TaskContext,
        a: DayArgs,
    ) -> Result<daily_reconciliation::DayReport, TaskError> {
        let day = a
            .day
            .unwrap_or_else(|| (self.0.now() - chrono::Duration::days(1)).date_naive());
        daily_reconciliation::reconcile_day(&self.0, day)
            .await
            .map_err(task_error)
    }
}

/// `billing.purge_cryptograms()`.
#[derive(Debug, Clone)]
pub struct PurgeCryptograms(pub Billing);

impl Task for PurgeCryptograms {
    const NAME: &'static str = "billing.purge_cryptograms";
    type Args = ();
    type Output = Value;

    fn options() -> TaskOptions {
        options()
    }

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<Value, TaskError> {
        let purged = reconcile::purge_cryptograms(&self.0)
            .await
            .map_err(task_error)?;
        Ok(json!({"purged": purged}))
    }
}

/// `billing.deliver_outbox()`.
#[derive(Clone)]
pub struct DeliverOutbox(pub Billing, pub Option<Arc<dyn OutboxTarget>>);

impl std::fmt::Debug for DeliverOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliverOutbox")
            .field("target", &self.1.is_some())
            .finish()
    }
}

impl Task for DeliverOutbox {
    const NAME: &'static str = "billing.deliver_outbox";
    type Args = ();
    type Output = outbox::DeliveryReport;

    fn options() -> TaskOptions {
        options().expires(Duration::from_secs(60))
    }

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<outbox::DeliveryReport, TaskError> {
        let Some(target) = &self.1 else {
            tracing::warn!("no OUTBOX_URL configured: outbox messages stay pending until one is");
            return Ok(outbox::DeliveryReport::default());
        };
        outbox::deliver_due(&self.0, target.as_ref(), 500)
            .await
            .map_err(task_error)
    }
}
