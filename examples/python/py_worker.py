"""A Python Celery worker app whose tasks a Rust client calls (the reverse direction of interop).

    BROKER_URL=amqp://guest:guest@127.0.0.1:5672// RESULT_BACKEND=redis://127.0.0.1:6379/0 \
        celery -A py_worker worker -Q py --pool solo
"""

import json
import os

from celery import Celery

app = Celery(
    "py_worker",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    accept_content=["json", "msgpack"],
    result_accept_content=["json", "msgpack"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="py.mul")
def mul(x, y):
    return x * y


@app.task(name="py.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="py.add")
def add(x, y):
    return x + y


@app.task(name="py.tsum")
def tsum(values):
    return sum(values)


@app.task(name="py.record")
def record(value, key):
    """Appends `value` to the Redis list `key` (the tests count body and callback runs)."""
    app.backend.client.rpush(key, json.dumps(value))
    return value
