"""Watch one worker's Celery events the way Flower does, and print what Celery made of them.

    python capture_events.py amqp://guest:guest@127.0.0.1:5672// w1@host 60

Captures from the `celeryev` exchange with Celery's own `EventReceiver` (handlers `{"*": ...}`,
`wakeup=True`) and feeds every event to a `celery.events.State`. Prints `ready` once its receiver
queue is declared, then, on exit, one JSON document:

- `events`: every event from that node, plus the events about the tasks it handled (the client's
  `task-sent`), in arrival order and with all their fields (as the receiver hands them over: the
  timestamp localised, the clock of `task-sent` replaced, `local_received` added);
- `tasks`: for each of those task ids, the State's `name`, `state`, `runtime`, `args`, `kwargs`,
  `result`, `exception`, `retries`, `client` and `worker`;
- `worker` (after the last event) and `worker_before_offline` (just before `worker-offline`):
  the node's record in `state.workers` (`alive`, `freq`, `processed`, `active`, ...).

It exits once it has seen `worker-offline` from the node, or after the timeout (seconds).
"""

import json
import sys
import time

from celery import Celery
from celery.events.receiver import EventReceiver


def worker_record(state, node):
    worker = state.workers.get(node)
    if worker is None:
        return None
    return {
        "hostname": worker.hostname,
        "alive": worker.alive,
        "freq": worker.freq,
        "processed": worker.processed,
        "active": worker.active,
        "pid": worker.pid,
        "sw_ident": worker.sw_ident,
        "heartbeats": len(worker.heartbeats),
    }


def main() -> None:
    broker, node, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    app = Celery("capture-events", broker=broker)
    app.conf.broker_connection_retry_on_startup = True
    state = app.events.State()
    seen = []
    before_offline = {}
    deadline = time.monotonic() + timeout

    class Receiver(EventReceiver):
        def on_consume_ready(self, connection, channel, consumers, **kwargs):
            super().on_consume_ready(connection, channel, consumers, **kwargs)
            print("ready", flush=True)

        def on_iteration(self):
            if time.monotonic() > deadline:
                self.should_stop = True

    def on_event(event):
        seen.append(dict(event))
        if event.get("hostname") == node and event["type"] == "worker-offline":
            before_offline["worker"] = worker_record(state, node)
            recv.should_stop = True
        state.event(event)

    with app.connection_for_read() as conn:
        recv = Receiver(conn, handlers={"*": on_event}, app=app)
        try:
            recv.capture(limit=None, timeout=None, wakeup=True)
        except OSError:  # the connection closing under should_stop
            pass

    ids = {e["uuid"] for e in seen if e.get("hostname") == node and "uuid" in e}
    events = [e for e in seen if e.get("hostname") == node or e.get("uuid") in ids]
    tasks = {}
    for uuid in ids:
        task = state.tasks.get(uuid)
        if task is None:
            continue
        tasks[uuid] = {
            "name": task.name,
            "state": task.state,
            "runtime": task.runtime,
            "args": task.args,
            "kwargs": task.kwargs,
            "result": task.result,
            "exception": task.exception,
            "traceback": task.traceback,
            "retries": task.retries,
            "client": task.client,
            "worker": task.worker.hostname if task.worker else None,
        }
    print(
        json.dumps(
            {
                "events": events,
                "tasks": tasks,
                "worker": worker_record(state, node),
                "worker_before_offline": before_offline.get("worker"),
            },
            default=repr,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
