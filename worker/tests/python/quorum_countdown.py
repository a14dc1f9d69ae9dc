"""Sends `diag.add(2, 3)` with a countdown to a quorum queue as a Celery 5.5+ client set up for
quorum queues does: through Celery's native delayed delivery (exchange `celery_delayed_27`).

    quorum_countdown.py <broker url> <backend url> <queue> <countdown seconds>

First declares kombu's delay levels itself, as a Python worker would on start (they exist
already, declared by the Rust worker: the declaration must agree). Prints one JSON line.
"""

import json
import sys
import time

from celery import Celery
from kombu import Exchange, Queue
from kombu.transport.native_delayed_delivery import (
    declare_native_delayed_delivery_exchanges_and_queues,
)

broker, backend, queue, countdown = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
app = Celery("quorum-client", broker=broker, backend=backend)
app.conf.update(
    task_default_queue=queue,
    task_default_queue_type="quorum",
    task_default_exchange_type="topic",
    task_queues=[Queue(queue, Exchange(queue, type="topic"), routing_key=queue,
                       queue_arguments={"x-queue-type": "quorum"})],
    broker_connection_retry_on_startup=True,
)

with app.connection_for_write() as conn:
    declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")

sent = time.time()
result = app.send_task("diag.add", args=(2, 3), countdown=countdown)
value = result.get(timeout=90)
print(json.dumps({"result": value, "seconds": time.time() - sent, "id": result.id}))
