"""Calling billing's gRPC API (billing.v1) from a standard client: grpcio, with stubs generated
here from our .proto files by grpcio-tools at run time (nothing of ours is imported).

Against a running demo (`scripts/demo`), as a user; the token is what the frontend gets from the
auth service at login (the demo's fake-auth mints one with the demo's signing key):

    BILLING_TOKEN=$(target/release/fake-auth issue-token \
        --signing-key target/demo/jwt-signing.pem --user <user uuid from the demo>) \
      .venv/bin/python examples/python/grpc_client.py

Settings: BILLING_TOKEN (required), BILLING_GRPC_TARGET (default 127.0.0.1:50051), PROTO_DIR
(default billing-tasks/proto of this checkout). It prints the tariffs and the user's subscription.
"""

import os
import sys
import tempfile

import grpc
import grpc_tools
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.environ.get("PROTO_DIR", os.path.join(HERE, "..", "..", "billing-tasks", "proto"))
TARGET = os.environ.get("BILLING_GRPC_TARGET", "127.0.0.1:50051")


def generate_stubs():
    """Compiles billing/v1/billing.proto into a temporary directory and puts it on sys.path."""
    out = tempfile.mkdtemp(prefix="billing-grpc-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")  # google/protobuf/*
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "billing/v1/billing.proto"])
    if rc != 0:
        sys.exit(f"grpcio-tools could not compile the protos in {PROTO}")
    sys.path.insert(0, out)


generate_stubs()
from billing.v1 import billing_pb2 as pb  # noqa: E402
from billing.v1 import billing_pb2_grpc as pb_grpc  # noqa: E402

token = os.environ.get("BILLING_TOKEN") or sys.exit("set BILLING_TOKEN to a user's access token")
metadata = [("authorization", f"Bearer {token}")]
api = pb_grpc.BillingStub(grpc.insecure_channel(TARGET))

for t in api.ListTariffs(pb.ListTariffsRequest(), metadata=metadata, timeout=5).tariffs:
    print(f"tariff {t.code:<12} {t.price.minor / 100:>8.2f} {t.price.currency} "
          f"per {t.period_count} {t.period_unit}")

try:
    s = api.GetSubscription(pb.GetSubscriptionRequest(), metadata=metadata, timeout=5)
except grpc.RpcError as e:
    # Standard codes: NOT_FOUND if this user never subscribed, UNAUTHENTICATED for a bad token.
    sys.exit(f"GetSubscription: {e.code().name}: {e.details()}")
print(f"subscription {s.id}: {s.tariff} {pb.SubscriptionStatus.Name(s.status)} "
      f"until {s.current_period_end.ToDatetime():%Y-%m-%d} card {s.card_mask or '-'} "
      f"auto_renew={s.auto_renew}")
