"""A Python Celery worker app for the interop tests: tasks a Rust client calls.

    BROKER_URL=... RESULT_BACKEND=... RESULT_SERIALIZER=msgpack \
        celery -A py_tasks worker -Q <queue> --pool solo
"""

import os

from celery import Celery

app = Celery(
    "py_tasks",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    accept_content=["json", "msgpack"],
    result_accept_content=["json", "msgpack"],
    result_serializer=os.environ.get("RESULT_SERIALIZER", "json"),
    result_extended=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="py.pair", bind=True)
def pair(self, x, y):
    return {"pair": [x, y], "bytes": b"\x00\xff", "retries": self.request.retries}


@app.task(name="py.unreachable", bind=True, max_retries=2)
def unreachable(self, host):
    """Retried twice, one second apart, with the ConnectionError that caused it, then fails with it."""
    raise self.retry(exc=ConnectionError(f"{host} is unreachable"), countdown=1)
