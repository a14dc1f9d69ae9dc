"""Sends one task with the plain `celery` package, or reads one result, and prints what Python sees
as JSON. Used by the interop tests in this directory's parent.

    python interop.py '{"task": "diag.add", "args": [2, 3], "queue": "celery"}'
    python interop.py '{"read": "<task id>"}'
    python interop.py '{"batch": [{"task": ..., "args": ..., "options": ...}, ...], "queue": ...}'
    python interop.py '{"read_many": ["<id>", ...]}'

Settings (JSON): broker, backend, queue, serializer (json or msgpack), task, args, kwargs,
options (passed to send_task: countdown, expires, priority, time_limit, soft_time_limit, ...),
uuids (true: strings in args and kwargs that are UUIDs are sent as `uuid.UUID`, which kombu
wraps as `{"__type__": "uuid", ...}`), naive_eta_in / naive_expires_in (a time zone: eta / expires as a naive local time there,
`eta_in` / `expires_in` seconds from now), timezone (the app's `timezone` setting), timeout.

`watch` records every state published for the task (`published`), subscribed before sending.
`batch` sends without waiting and prints the ids; `max_priority` declares the queue with
`x-max-priority` first (as `Queue(max_priority=…)` does); `read_many` prints one result per id.

Output: id, state, result or exception (class, module, args, str, is_* checks), traceback,
children, states (every state published while waiting, in order), elapsed (seconds from sending
to the result), date_done.
"""

import datetime
import json
import sys
import time
import uuid
import zoneinfo

import celery.exceptions
from celery import Celery


def describe(exc):
    cls = type(exc)
    return {
        "class": cls.__qualname__,
        "module": cls.__module__,
        "args": [a if isinstance(a, (int, float, str, bool, type(None))) else repr(a) for a in exc.args],
        "str": str(exc),
        "is_time_limit": isinstance(exc, celery.exceptions.TimeLimitExceeded),
        "is_value_error": isinstance(exc, ValueError),
        "is_connection_error": isinstance(exc, ConnectionError),
        "is_not_registered": isinstance(exc, celery.exceptions.NotRegistered),
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    app = Celery(
        "interop-tests",
        broker=cfg.get("broker", "amqp://guest:guest@127.0.0.1:5672//"),
        backend=cfg.get("backend", "redis://127.0.0.1:6379/0"),
    )
    serializer = cfg.get("serializer", "json")
    app.conf.update(
        task_serializer=serializer,
        accept_content=["json", "msgpack"],
        result_accept_content=["json", "msgpack"],
        broker_connection_retry_on_startup=True,
    )
    if "timezone" in cfg:
        app.conf.timezone = cfg["timezone"]
    if "max_priority" in cfg:
        from kombu import Exchange, Queue

        name = cfg["queue"]
        app.conf.task_queues = [Queue(name, Exchange(name), routing_key=name, max_priority=cfg["max_priority"])]
    if "batch" in cfg:
        ids = [send(app, dict(cfg, **one), serializer).id for one in cfg["batch"]]
        print(json.dumps({"ids": ids}))
        return
    if "read_many" in cfg:
        print(json.dumps([outcome(app.AsyncResult(i), cfg, time.time()) for i in cfg["read_many"]]))
        return
    if "read" in cfg:
        result = app.AsyncResult(cfg["read"])
        sent_at = time.time()
    elif cfg.get("watch"):
        # Every state stored, as published on the result's channel: subscribed before sending,
        # so none is missed (`get(on_message=…)` misses those published before it drains).
        task_id = str(uuid.uuid4())
        pubsub = app.backend.client.pubsub()
        pubsub.subscribe(f"celery-task-meta-{task_id}")
        while pubsub.get_message(timeout=5) is None:
            pass  # the subscribe confirmation
        sent_at = time.time()
        result = send(app, dict(cfg, options=dict(cfg.get("options", {}), task_id=task_id)), serializer)
        out = outcome(result, cfg, sent_at)
        published = []
        while not published or published[-1] not in ("SUCCESS", "FAILURE", "REVOKED"):
            message = pubsub.get_message(timeout=10)
            if message is None:
                break
            if message["type"] == "message":
                published.append(json.loads(message["data"])["status"])
        out["published"] = published
        print(json.dumps(out))
        return
    else:
        sent_at = time.time()
        result = send(app, cfg, serializer)
    print(json.dumps(outcome(result, cfg, sent_at)))


def send(app, cfg, serializer):
    options = {"queue": cfg.get("queue", "celery"), "serializer": serializer}
    options.update(cfg.get("options", {}))
    for key in ("eta", "expires"):
        zone = cfg.get(f"naive_{key}_in")
        if zone:
            local = datetime.datetime.now(zoneinfo.ZoneInfo(zone))
            at = local + datetime.timedelta(seconds=cfg[f"{key}_in"])
            options[key] = at.replace(tzinfo=None)
    args, kwargs = cfg.get("args", []), cfg.get("kwargs", {})
    if cfg.get("uuids"):
        args, kwargs = as_uuids(args), as_uuids(kwargs)
    return app.send_task(cfg["task"], args=args, kwargs=kwargs, **options)


def as_uuids(value):
    if isinstance(value, list):
        return [as_uuids(v) for v in value]
    if isinstance(value, dict):
        return {k: as_uuids(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            return value
    return value


def outcome(result, cfg, sent_at):
    states = []
    out = {"id": result.id}
    try:
        out["result"] = result.get(
            timeout=cfg.get("timeout", 30),
            on_message=lambda meta: states.append(meta["status"]),
            propagate=True,
        )
    except celery.exceptions.TimeoutError:
        out["timed_out"] = True
    except Exception as exc:  # the task's failure, as Celery rebuilds it
        out["exception"] = describe(exc)
    out["elapsed"] = time.time() - sent_at
    out["state"] = result.state
    out["states"] = states
    out["traceback"] = result.traceback
    meta = result.backend.get_task_meta(result.id)
    out["children"] = meta.get("children")
    out["queue"] = meta.get("queue")
    out["stored_result"] = None if out["state"] == "PENDING" else repr(meta.get("result"))
    for key in ("date_done", "date_started"):
        value = meta.get(key)
        out[key] = value.isoformat() if hasattr(value, "isoformat") else value
    return out


if __name__ == "__main__":
    main()
