"""Send a task to the Rust worker with the plain `celery` package and print the outcome as JSON.

    python client.py '{"task": "diag.add", "args": [2, 3]}'

Settings (all optional) come from the JSON argument: broker, backend, queue, serializer
(json or msgpack), result_serializer (the worker's RESULT_SERIALIZER), compression (zlib), args (or raw_args, JSON text), kwargs, countdown, expires, timeout. The defaults match the local stack.
"""

import json
import sys

from celery import Celery


def main() -> None:
    cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"task": "diag.add", "args": [2, 3]}
    app = Celery(
        "interop-client",
        broker=cfg.get("broker", "amqp://guest:guest@127.0.0.1:5672//"),
        backend=cfg.get("backend", "redis://127.0.0.1:6379/0"),
    )
    serializer = cfg.get("serializer", "json")
    app.conf.update(
        task_serializer=serializer,
        accept_content=["json", "msgpack"],
        result_accept_content=["json", "msgpack"],
        # Celery decodes a stored result with its own result_serializer: it must match the worker's.
        result_serializer=cfg.get("result_serializer", "json"),
        broker_connection_retry_on_startup=True,
    )
    options = {"queue": cfg.get("queue", "celery"), "serializer": serializer}
    for key in ("countdown", "expires", "priority", "time_limit", "soft_time_limit", "compression"):
        if key in cfg:
            options[key] = cfg[key]
    # `raw_args`: arguments as JSON text, for values JSON itself cannot carry (NaN, huge integers).
    args = json.loads(cfg["raw_args"]) if "raw_args" in cfg else cfg.get("args", [])
    result = app.send_task(cfg["task"], args=args, kwargs=cfg.get("kwargs", {}), **options)
    out = {"id": result.id}
    try:
        out["result"] = result.get(timeout=cfg.get("timeout", 30))
    except Exception as exc:  # the task's own failure, re-raised by Celery
        out["exc_type"] = type(exc).__name__
        out["exc_message"] = str(exc)
    out["state"] = result.state
    print(json.dumps(out))


if __name__ == "__main__":
    main()
