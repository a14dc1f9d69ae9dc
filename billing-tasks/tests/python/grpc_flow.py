"""The whole billing flow through the gRPC API, from a client generated here from our .proto
files with grpcio-tools (Google's generator and runtime, not our code).

Driven by billing-tasks/tests/grpc_python_flow.rs, which starts billing-api's gRPC server, the fake
gateway and a worker, and passes addresses, tokens and test cryptograms in the environment. Steps
that need the test's clock (a renewal that fails) are asked for on stdout (`NEED <step> <user>`)
and acknowledged on stdin (`OK`). The last line is `RESULT <json>`.
"""

import json
import os
import sys
import tempfile
import time
import uuid

import grpc
import grpc_tools
from grpc_tools import protoc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

PROTO = os.environ["PROTO_DIR"]
TARGET = os.environ["BILLING_GRPC_TARGET"]


def generate():
    out = tempfile.mkdtemp(prefix="billing-grpc-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for proto in ("billing/v1/billing.proto", "auth/v1/auth.proto"):
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO}", f"-I{include}",
                          f"--python_out={out}", f"--grpc_python_out={out}", proto])
        assert rc == 0, f"grpcio-tools could not compile {proto}"
    sys.path.insert(0, out)


generate()
from billing.v1 import billing_pb2 as pb  # noqa: E402
from billing.v1 import billing_pb2_grpc as pb_grpc  # noqa: E402

channel = grpc.insecure_channel(TARGET)
api = pb_grpc.BillingStub(channel)
result = {}


def md(user):
    return [("authorization", "Bearer " + os.environ[f"TOKEN_{user}"]),
            ("x-request-id", f"py-{uuid.uuid4()}")]


def need(step, user):
    print(f"NEED {step} {user}", flush=True)
    line = sys.stdin.readline().strip()
    assert line == "OK", f"the harness answered {line!r} to {step}"


def status_name(enum, value):
    return enum.Name(value)


def watch(user, payment_id):
    """WatchPayment to its end; returns the states seen."""
    seen = [p for p in api.WatchPayment(pb.GetPaymentRequest(payment_id=payment_id),
                                        metadata=md(user), timeout=60)]
    assert seen, "WatchPayment sent nothing"
    return seen


def start(user, crypto, key=None):
    return api.StartSubscription(pb.StartSubscriptionRequest(
        tariff="monthly", cryptogram=os.environ[crypto], cardholder_name="IVAN IVANOV",
        ip_address="203.0.113.7", email="ivan@example.com",
        idempotency_key=key or str(uuid.uuid4())), metadata=md(user), timeout=10)


def eventually(what, check, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# Health and reflection.
health = health_pb2_grpc.HealthStub(channel)
for service in ("", "billing.v1.Billing"):
    h = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING, (service, h)
result["health"] = "SERVING"
reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
answers = list(reflection.ServerReflectionInfo(
    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
services = sorted(s.name for s in answers[0].list_services_response.service)
assert "billing.v1.Billing" in services and "grpc.health.v1.Health" in services, services
result["reflection_services"] = services

tariffs = api.ListTariffs(pb.ListTariffsRequest(), metadata=md("A"), timeout=5).tariffs
assert [t.code for t in tariffs][:1] == ["weekly-trial"], tariffs
monthly = next(t for t in tariffs if t.code == "monthly")
assert monthly.price.minor == 29900 and monthly.price.currency == "RUB"
result["tariffs"] = [t.code for t in tariffs]

# A: a payment without 3-D Secure; the same idempotency key answers the same payment.
key = str(uuid.uuid4())
p = start("A", "CRYPTO_OK", key)
again = start("A", "CRYPTO_OK", key)
assert again.id == p.id
states = watch("A", p.id)
assert states[-1].status == pb.PAYMENT_STATUS_SUCCEEDED, states[-1]
s = api.GetSubscription(pb.GetSubscriptionRequest(), metadata=md("A"), timeout=5)
assert s.status == pb.SUBSCRIPTION_STATUS_ACTIVE and s.auto_renew, s
assert s.card_mask.endswith("3055"), s.card_mask
result["no_3ds"] = [status_name(pb.PaymentStatus, x.status) for x in states]

# ChangeTariff from the next period.
s = api.ChangeTariff(pb.ChangeTariffRequest(tariff="yearly"), metadata=md("A"), timeout=5)
assert s.next_tariff == "yearly" and s.tariff == "monthly", s

# Refund: the subscription ends.
r = api.RequestRefund(pb.RequestRefundRequest(payment_id=p.id, reason="changed my mind",
                                               idempotency_key=str(uuid.uuid4())),
                      metadata=md("A"), timeout=10)
assert r.amount.minor > 0 and r.payment_id == p.id, r
eventually("the refunded subscription to end", lambda: api.GetSubscription(
    pb.GetSubscriptionRequest(subscription_id=s.id), metadata=md("A"), timeout=5).status
    == pb.SUBSCRIPTION_STATUS_EXPIRED)
receipts = api.ListPayments(pb.ListPaymentsRequest(page_size=10), metadata=md("A"), timeout=5)
assert [x.id for x in receipts.payments] == [p.id], receipts
result["refund"] = {"amount_minor": r.amount.minor, "subscription": "EXPIRED"}

# B: 3-D Secure. WatchPayment streams to the challenge, then (after Complete3DS) to success.
p = start("B", "CRYPTO_3DS")
states = watch("B", p.id)
last = states[-1]
assert last.status == pb.PAYMENT_STATUS_AWAITING_3DS, last
assert last.three_ds.acs_url.endswith("/acs") and last.three_ds.pa_req, last
assert last.three_ds.transaction_id > 0
c = api.Complete3DS(pb.Complete3DSRequest(payment_id=p.id,
                                          transaction_id=last.three_ds.transaction_id,
                                          pa_res=os.environ["PA_RES_OK"]),
                    metadata=md("B"), timeout=10)
assert c.status in (pb.PAYMENT_STATUS_PROCESSING, pb.PAYMENT_STATUS_SUCCEEDED), (c.SerializeToString(), c.status, c.subscription_id, c.amount.minor)
after = watch("B", p.id)
assert after[-1].status == pb.PAYMENT_STATUS_SUCCEEDED, after[-1]
result["with_3ds"] = [status_name(pb.PaymentStatus, x.status) for x in states + after]

# Cancel at period end, resume, then cancel now.
s = api.CancelSubscription(pb.CancelSubscriptionRequest(
    when=pb.CancelSubscriptionRequest.WHEN_PERIOD_END, reason="too expensive"),
    metadata=md("B"), timeout=5)
assert s.status == pb.SUBSCRIPTION_STATUS_ACTIVE and not s.auto_renew, s
s = api.ResumeSubscription(pb.ResumeSubscriptionRequest(), metadata=md("B"), timeout=5)
assert s.auto_renew, s
s = api.CancelSubscription(pb.CancelSubscriptionRequest(
    when=pb.CancelSubscriptionRequest.WHEN_NOW), metadata=md("B"), timeout=5)
assert s.status == pb.SUBSCRIPTION_STATUS_EXPIRED, s
result["cancel"] = "PERIOD_END kept access, resumed, NOW expired"

# C: a decline with a user-facing reason; then an abandoned 3-D Secure attempt, then another card.
p = start("C", "CRYPTO_NSF")
last = watch("C", p.id)[-1]
assert last.status == pb.PAYMENT_STATUS_DECLINED and last.decline.message, last
result["decline"] = {"reason_code": last.decline.reason_code, "message": last.decline.message}
p = start("C", "CRYPTO_3DS")
assert watch("C", p.id)[-1].status == pb.PAYMENT_STATUS_AWAITING_3DS
try:
    start("C", "CRYPTO_OK")
    raise AssertionError("a second payment while 3-D Secure is pending must be refused")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
a = api.AbandonPayment(pb.AbandonPaymentRequest(payment_id=p.id), metadata=md("C"), timeout=5)
assert a.status == pb.PAYMENT_STATUS_EXPIRED, a
p = start("C", "CRYPTO_OK")
assert watch("C", p.id)[-1].status == pb.PAYMENT_STATUS_SUCCEEDED
result["abandon_3ds"] = "EXPIRED, then another card SUCCEEDED"

# C replaces the card of a healthy subscription (nothing due): a 1.00 authorisation, through
# 3-D Secure here, voided at once; the new card renews from then on. The same key answers the same.
key = str(uuid.uuid4())
u = api.UpdatePaymentMethod(pb.UpdatePaymentMethodRequest(
    cryptogram=os.environ["CRYPTO_3DS"], ip_address="203.0.113.7", idempotency_key=key),
    metadata=md("C"), timeout=10)
assert u.amount.minor == 100, u
last = watch("C", u.id)[-1]
assert last.status == pb.PAYMENT_STATUS_AWAITING_3DS, last
api.Complete3DS(pb.Complete3DSRequest(payment_id=u.id, transaction_id=last.three_ds.transaction_id,
                                      pa_res=os.environ["PA_RES_OK"]), metadata=md("C"), timeout=10)
assert watch("C", u.id)[-1].status == pb.PAYMENT_STATUS_SUCCEEDED
again = api.UpdatePaymentMethod(pb.UpdatePaymentMethodRequest(
    cryptogram=os.environ["CRYPTO_3DS"], ip_address="203.0.113.7", idempotency_key=key),
    metadata=md("C"), timeout=10)
assert again.id == u.id and again.status == pb.PAYMENT_STATUS_SUCCEEDED, again
s = api.GetSubscription(pb.GetSubscriptionRequest(), metadata=md("C"), timeout=5)
assert s.status == pb.SUBSCRIPTION_STATUS_ACTIVE and s.card_mask.endswith("4242"), s
result["update_card_healthy"] = "1.00 authorised through 3-D Secure, SUCCEEDED, card 4242"

# A bad request: a clear INVALID_ARGUMENT naming the field.
try:
    api.GetPayment(pb.GetPaymentRequest(payment_id="not-a-uuid"), metadata=md("C"), timeout=5)
    raise AssertionError("a malformed id must be refused")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "payment_id" in e.details(), e

# D: a renewal is declined (past due); a new card pays it.
p = start("D", "CRYPTO_TOKEN_NSF")
assert watch("D", p.id)[-1].status == pb.PAYMENT_STATUS_SUCCEEDED
need("renewal_declined", "D")
s = api.GetSubscription(pb.GetSubscriptionRequest(), metadata=md("D"), timeout=5)
assert s.status == pb.SUBSCRIPTION_STATUS_PAST_DUE and s.HasField("grace_until"), s
u = api.UpdatePaymentMethod(pb.UpdatePaymentMethodRequest(
    cryptogram=os.environ["CRYPTO_OK"], ip_address="203.0.113.7",
    idempotency_key=str(uuid.uuid4())), metadata=md("D"), timeout=10)
last = watch("D", u.id)[-1]
assert last.status == pb.PAYMENT_STATUS_SUCCEEDED, last
s = api.GetSubscription(pb.GetSubscriptionRequest(), metadata=md("D"), timeout=5)
assert s.status == pb.SUBSCRIPTION_STATUS_ACTIVE and s.card_mask.endswith("3055"), s
result["update_payment_method"] = "PAST_DUE -> new card SUCCEEDED -> ACTIVE"

print("RESULT " + json.dumps(result), flush=True)
