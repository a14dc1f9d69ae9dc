//! The `billing.v1.Billing` service: each call authenticates the caller, checks its fields,
//! then maps onto [`BillingService`] for the caller's own user id. Nothing is changed before the
//! input has been checked; errors carry `google.rpc` details (see `status`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::caller::{Authenticator, Caller, Scope};
use super::proto::billing::v1 as pb;
use super::status::{Violations, from_billing, invalid};
use super::timestamp;
use crate::domain::{PaymentStatus, RefundStatus, SubscriptionStatus};
use crate::money::Money;
use crate::refunds::{RefundRequest, RefundView, Requester};
use crate::secret::Secret;
use crate::service::{
    BillingService, PaymentView, StartSubscription, SubscriptionView, TariffView,
    UpdatePaymentMethod,
};

/// How long one WatchPayment follows a payment before ending with DEADLINE_EXCEEDED.
const WATCH_LIMIT: Duration = Duration::from_secs(15 * 60);
/// Longest pause between two looks at a watched payment.
const WATCH_MAX_INTERVAL: Duration = Duration::from_millis(200);

/// The service implementation.
#[derive(Debug, Clone)]
pub struct BillingApi {
    service: BillingService,
    auth: Arc<Authenticator>,
}

impl BillingApi {
    /// The API over `service`, with callers checked by `auth`.
    pub fn new(service: BillingService, auth: Arc<Authenticator>) -> Self {
        BillingApi { service, auth }
    }

    fn caller<T>(&self, req: &Request<T>, scope: Scope) -> Result<Caller, Status> {
        self.auth.authenticate(req.metadata(), scope)
    }

    async fn payment(&self, v: PaymentView) -> Result<pb::Payment, Status> {
        let answered = v.status == PaymentStatus::AwaitingThreeDs
            && self
                .service
                .three_ds_answered(v.id)
                .await
                .map_err(from_billing)?;
        Ok(payment_pb(v, answered))
    }

    async fn subscription(&self, v: SubscriptionView) -> Result<pb::Subscription, Status> {
        let next = self.service.next_tariff(v.id).await.map_err(from_billing)?;
        Ok(subscription_pb(v, next))
    }
}

fn uuid_field(field: &str, value: &str) -> Result<Uuid, Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required (a UUID)"));
    }
    Uuid::parse_str(value).map_err(|_| {
        invalid(
            field,
            format!(
                "`{}` is not a UUID",
                value.chars().take(64).collect::<String>()
            ),
        )
    })
}

/// Text fields never carry control characters (PostgreSQL refuses NUL outright, and none of them
/// has a use for the others).
fn printable(v: &mut Violations, field: &str, value: &str) {
    if value.chars().any(char::is_control) {
        v.add(field, "must not contain control characters");
    }
}

/// A tariff is named by its code (`monthly`) or its id.
fn tariff_field(v: &mut Violations, value: &str) {
    let code = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !code && Uuid::parse_str(value).is_err() {
        v.add(
            "tariff",
            "must be a tariff code (lowercase letters, digits, `-`, `_`) or a tariff id",
        );
    }
}

fn optional(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn money_pb(m: &Money) -> pb::Money {
    pb::Money {
        minor: m.minor,
        currency: m.currency.code().to_owned(),
    }
}

fn payment_status_pb(s: PaymentStatus, answered: bool) -> pb::PaymentStatus {
    match s {
        PaymentStatus::Created => pb::PaymentStatus::Created,
        PaymentStatus::Processing => pb::PaymentStatus::Processing,
        // The payer has answered: the charge is under way.
        PaymentStatus::AwaitingThreeDs if answered => pb::PaymentStatus::Processing,
        PaymentStatus::AwaitingThreeDs => pb::PaymentStatus::Awaiting3ds,
        PaymentStatus::Succeeded => pb::PaymentStatus::Succeeded,
        PaymentStatus::Declined => pb::PaymentStatus::Declined,
        PaymentStatus::Expired => pb::PaymentStatus::Expired,
        PaymentStatus::Failed => pb::PaymentStatus::Failed,
    }
}

fn payment_pb(v: PaymentView, answered: bool) -> pb::Payment {
    let status = payment_status_pb(v.status, answered);
    let decline =
        matches!(v.status, PaymentStatus::Declined | PaymentStatus::Failed).then(|| pb::Decline {
            reason_code: v.reason_code.unwrap_or(0),
            message: v
                .card_holder_message
                .clone()
                .or(v.reason.clone())
                .unwrap_or_else(|| "the payment was not accepted".to_owned()),
        });
    let three_ds = v
        .challenge
        .filter(|_| status == pb::PaymentStatus::Awaiting3ds)
        .map(|c| pb::ThreeDsChallenge {
            acs_url: c.acs_url,
            pa_req: c.pa_req,
            transaction_id: c.transaction_id,
        });
    // Payment ids are UUIDv7: their first 48 bits are the creation time in milliseconds.
    let created_at = v.id.get_timestamp().map(|ts| {
        let (secs, nanos) = ts.to_unix();
        prost_types::Timestamp {
            seconds: secs as i64,
            nanos: nanos as i32,
        }
    });
    pb::Payment {
        id: v.id.to_string(),
        subscription_id: v.subscription_id.to_string(),
        status: status as i32,
        amount: Some(money_pb(&v.amount)),
        decline,
        three_ds,
        created_at,
    }
}

fn subscription_pb(v: SubscriptionView, next_tariff: Option<String>) -> pb::Subscription {
    let status = match v.status {
        SubscriptionStatus::Pending => pb::SubscriptionStatus::Pending,
        SubscriptionStatus::Active => pb::SubscriptionStatus::Active,
        SubscriptionStatus::PastDue => pb::SubscriptionStatus::PastDue,
        SubscriptionStatus::Expired => pb::SubscriptionStatus::Expired,
        SubscriptionStatus::Abandoned => pb::SubscriptionStatus::Abandoned,
    };
    pb::Subscription {
        id: v.id.to_string(),
        user_id: v.user_id.to_string(),
        tariff: v.tariff,
        status: status as i32,
        auto_renew: v.auto_renew,
        current_period_start: v.current_period_start.map(timestamp),
        current_period_end: v.current_period_end.map(timestamp),
        grace_until: v.grace_until.map(timestamp),
        card_mask: v.card_mask.unwrap_or_default(),
        next_tariff: next_tariff.unwrap_or_default(),
    }
}

fn tariff_pb(t: TariffView) -> pb::Tariff {
    pb::Tariff {
        id: t.id.to_string(),
        code: t.code,
        name: t.name,
        description: t.description.unwrap_or_default(),
        price: Some(money_pb(&t.price)),
        period_unit: t.period_unit,
        period_count: t.period_count,
    }
}

fn refund_pb(r: RefundView) -> pb::Refund {
    let status = match r.status {
        RefundStatus::Requested => pb::RefundStatus::Requested,
        RefundStatus::Processing => pb::RefundStatus::Processing,
        RefundStatus::Succeeded => pb::RefundStatus::Succeeded,
        RefundStatus::Failed => pb::RefundStatus::Failed,
    };
    pb::Refund {
        id: r.id.to_string(),
        payment_id: r.payment_id.to_string(),
        amount: Some(money_pb(&r.amount)),
        status: status as i32,
        reason: r.reason,
    }
}

type PaymentStream = Pin<Box<dyn Stream<Item = Result<pb::Payment, Status>> + Send>>;

#[tonic::async_trait]
impl pb::billing_server::Billing for BillingApi {
    async fn list_tariffs(
        &self,
        request: Request<pb::ListTariffsRequest>,
    ) -> Result<Response<pb::ListTariffsResponse>, Status> {
        self.caller(&request, Scope::Read)?;
        let tariffs = self.service.list_tariffs().await.map_err(from_billing)?;
        Ok(Response::new(pb::ListTariffsResponse {
            tariffs: tariffs.into_iter().map(tariff_pb).collect(),
        }))
    }

    async fn start_subscription(
        &self,
        request: Request<pb::StartSubscriptionRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let user = self.caller(&request, Scope::Write)?.user();
        let r = request.into_inner();
        let mut v = Violations::default();
        tariff_field(&mut v, &r.tariff);
        printable(&mut v, "email", &r.email);
        printable(&mut v, "cardholder_name", &r.cardholder_name);
        printable(&mut v, "idempotency_key", &r.idempotency_key);
        v.check()?;
        let view = self
            .service
            .start_subscription(StartSubscription {
                user_id: user,
                tariff: r.tariff,
                cryptogram: Secret::new(r.cryptogram),
                cardholder_name: optional(r.cardholder_name),
                ip_address: r.ip_address,
                email: optional(r.email),
                idempotency_key: r.idempotency_key,
            })
            .await
            .map_err(from_billing)?;
        Ok(Response::new(self.payment(view).await?))
    }

    async fn complete3_ds(
        &self,
        request: Request<pb::Complete3DsRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let user = self.caller(&request, Scope::Write)?.user();
        let r = request.into_inner();
        let payment_id = uuid_field("payment_id", &r.payment_id)?;
        if r.transaction_id <= 0 {
            return Err(invalid(
                "transaction_id",
                "must be the challenge's transaction id",
            ));
        }
        let view = self
            .service
            .complete_3ds(user, payment_id, r.transaction_id, Secret::new(r.pa_res))
            .await
            .map_err(from_billing)?;
        Ok(Response::new(self.payment(view).await?))
    }

    async fn abandon_payment(
        &self,
        request: Request<pb::AbandonPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let user = self.caller(&request, Scope::Write)?.user();
        let payment_id = uuid_field("payment_id", &request.get_ref().payment_id)?;
        let view = self
            .service
            .abandon_payment(user, payment_id)
            .await
            .map_err(from_billing)?;
        Ok(Response::new(self.payment(view).await?))
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let user = self.caller(&request, Scope::Read)?.user();
        let payment_id = uuid_field("payment_id", &request.get_ref().payment_id)?;
        let view = self
            .service
            .get_payment(user, payment_id)
            .await
            .map_err(from_billing)?;
        Ok(Response::new(self.payment(view).await?))
    }

    type WatchPaymentStream = PaymentStream;

    async fn watch_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<Self::WatchPaymentStream>, Status> {
        let user = self.caller(&request, Scope::Read)?.user();
        let payment_id = uuid_field("payment_id", &request.get_ref().payment_id)?;
        // Not found (or another user's) fails the call itself, before any message.
        let first = self
            .service
            .get_payment(user, payment_id)
            .await
            .map_err(from_billing)?;
        let first = self.payment(first).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let api = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + WATCH_LIMIT;
            let mut last: Option<pb::Payment> = None;
            let mut current = first;
            let mut pause = Duration::from_millis(20);
            loop {
                if last.as_ref() != Some(&current) {
                    let ends = !matches!(
                        pb::PaymentStatus::try_from(current.status),
                        Ok(pb::PaymentStatus::Created | pb::PaymentStatus::Processing)
                    );
                    if tx.send(Ok(current.clone())).await.is_err() || ends {
                        return;
                    }
                    last = Some(current.clone());
                }
                if tokio::time::Instant::now() >= deadline {
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(
                            "the payment is still in progress; watch it again",
                        )))
                        .await;
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = tx.closed() => return,
                }
                pause = (pause * 3 / 2).min(WATCH_MAX_INTERVAL);
                let next = match api.service.get_payment(user, payment_id).await {
                    Ok(v) => api.payment(v).await,
                    Err(e) => Err(from_billing(e)),
                };
                match next {
                    Ok(p) => current = p,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_payments(
        &self,
        request: Request<pb::ListPaymentsRequest>,
    ) -> Result<Response<pb::ListPaymentsResponse>, Status> {
        let user = self.caller(&request, Scope::Read)?.user();
        let r = request.into_inner();
        let size = match r.page_size {
            0 => 20,
            n @ 1..=100 => n as i64,
            _ => return Err(invalid("page_size", "must be 0 (default) to 100")),
        };
        let before = match r.page_token.as_str() {
            "" => None,
            t => Some(Uuid::parse_str(t).map_err(|_| {
                invalid(
                    "page_token",
                    "is not a token from ListPaymentsResponse.next_page_token",
                )
            })?),
        };
        let views = self
            .service
            .list_payments(user, size, before)
            .await
            .map_err(from_billing)?;
        let next_page_token = if views.len() as i64 == size {
            views.last().map(|v| v.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let mut payments = Vec::with_capacity(views.len());
        for v in views {
            payments.push(self.payment(v).await?);
        }
        Ok(Response::new(pb::ListPaymentsResponse {
            payments,
            next_page_token,
        }))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let user = self.caller(&request, Scope::Read)?.user();
        let id = &request.get_ref().subscription_id;
        let view = if id.is_empty() {
            self.service.get_subscription(user).await
        } else {
            let id = uuid_field("subscription_id", id)?;
            self.service.subscription_by_id(user, id).await
        }
        .map_err(from_billing)?;
        Ok(Response::new(self.subscription(view).await?))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let user = self.caller(&request, Scope::Read)?.user();
        let views = self
            .service
            .list_subscriptions(user)
            .await
            .map_err(from_billing)?;
        let mut subscriptions = Vec::with_capacity(views.len());
        for v in views {
            subscriptions.push(self.subscription(v).await?);
        }
        Ok(Response::new(pb::ListSubscriptionsResponse {
            subscriptions,
        }))
    }

    async fn cancel_subscription(
        &self,
        request: Request<pb::CancelSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        use pb::cancel_subscription_request::When;
        let user = self.caller(&request, Scope::Write)?.user();
        let r = request.into_inner();
        if r.reason.chars().count() > 500 || r.reason.chars().any(char::is_control) {
            return Err(invalid(
                "reason",
                "must be at most 500 printable characters",
            ));
        }
        let reason = optional(r.reason);
        let view = match When::try_from(r.when) {
            Ok(When::Unspecified | When::PeriodEnd) => self.service.cancel(user, reason).await,
            Ok(When::Now) => self.service.cancel_now(user, reason).await,
            Err(_) => return Err(invalid("when", "must be WHEN_PERIOD_END or WHEN_NOW")),
        }
        .map_err(from_billing)?;
        Ok(Response::new(self.subscription(view).await?))
    }

    async fn resume_subscription(
        &self,
        request: Request<pb::ResumeSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let user = self.caller(&request, Scope::Write)?.user();
        let view = self.service.resume(user).await.map_err(from_billing)?;
        Ok(Response::new(self.subscription(view).await?))
    }

    async fn update_payment_method(
        &self,
        request: Request<pb::UpdatePaymentMethodRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let user = self.caller(&request, Scope::Write)?.user();
        let r = request.into_inner();
        let mut v = Violations::default();
        printable(&mut v, "cardholder_name", &r.cardholder_name);
        printable(&mut v, "idempotency_key", &r.idempotency_key);
        v.check()?;
        let view = self
            .service
            .update_payment_method(UpdatePaymentMethod {
                user_id: user,
                cryptogram: Secret::new(r.cryptogram),
                cardholder_name: optional(r.cardholder_name),
                ip_address: r.ip_address,
                idempotency_key: r.idempotency_key,
            })
            .await
            .map_err(from_billing)?;
        Ok(Response::new(self.payment(view).await?))
    }

    async fn change_tariff(
        &self,
        request: Request<pb::ChangeTariffRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let user = self.caller(&request, Scope::Write)?.user();
        let mut v = Violations::default();
        tariff_field(&mut v, &request.get_ref().tariff);
        v.check()?;
        let view = self
            .service
            .change_tariff(user, &request.get_ref().tariff)
            .await
            .map_err(from_billing)?;
        Ok(Response::new(self.subscription(view).await?))
    }

    async fn request_refund(
        &self,
        request: Request<pb::RequestRefundRequest>,
    ) -> Result<Response<pb::Refund>, Status> {
        let user = self.caller(&request, Scope::Write)?.user();
        let r = request.into_inner();
        let payment_id = uuid_field("payment_id", &r.payment_id)?;
        if r.reason.trim().is_empty() || r.reason.chars().count() > 500 {
            return Err(invalid("reason", "must be 1 to 500 characters"));
        }
        if r.idempotency_key.is_empty() || r.idempotency_key.len() > 200 {
            return Err(invalid("idempotency_key", "must be 1 to 200 characters"));
        }
        let mut v = Violations::default();
        printable(&mut v, "reason", &r.reason);
        printable(&mut v, "idempotency_key", &r.idempotency_key);
        v.check()?;
        let refund = self
            .service
            .request_refund(RefundRequest {
                payment_id,
                reason: r.reason,
                requested_by: Requester::User(user),
                idempotency_key: r.idempotency_key,
            })
            .await
            .map_err(from_billing)?;
        Ok(Response::new(refund_pb(refund)))
    }
}
