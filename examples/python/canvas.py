"""Build a canvas (chain, group, chord, link, link_error) with the plain `celery` package, send it
and print the outcome as JSON; or read results a Rust client sent.

    python canvas.py '{"cmd": "apply", "canvas": {"chain": [{"task": "diag.add", "args": [2, 3],
        "queue": "rs"}, {"task": "py.mul", "args": [10], "queue": "py"}]}}'

A task spec is {"task", "args", "kwargs", "queue", "immutable", "link": spec, "link_error": spec};
a canvas is a spec, {"chain": [...]}, {"group": [...]} or {"chord": {"header": [...], "body": ...}}.
Commands: apply (send, wait unless "wait": false, print results), get (ids), restore (a group id).
"""

import json
import sys

from celery import Celery, chain, chord, group, signature
from celery.result import AsyncResult, GroupResult


def build(spec):
    if "chain" in spec:
        return chain(*[build(s) for s in spec["chain"]])
    if "group" in spec:
        return group([build(s) for s in spec["group"]])
    if "chord" in spec:
        return chord([build(s) for s in spec["chord"]["header"]], build(spec["chord"]["body"]))
    options = {"queue": spec["queue"]} if "queue" in spec else {}
    sig = signature(spec["task"], args=tuple(spec.get("args", [])), kwargs=spec.get("kwargs", {}),
                    immutable=spec.get("immutable", False), **options)
    if "link" in spec:
        sig.link(build(spec["link"]))
    if "link_error" in spec:
        sig.link_error(build(spec["link_error"]))
    return sig


def outcome(result, timeout):
    out = {"id": result.id}
    try:
        out["result"] = result.get(timeout=timeout)
    except Exception as exc:  # the task's own failure, re-raised by Celery
        out["exc_type"] = type(exc).__name__
        out["exc_message"] = str(exc)
    if isinstance(result, GroupResult):
        out["children"] = [r.id for r in result.results]
    else:
        out["state"] = result.state
        parents, node = [], result.parent
        while node is not None:
            parents.append(node.id)
            node = node.parent
        out["parents"] = parents
    return out


def main() -> None:
    cfg = json.loads(sys.argv[1])
    app = Celery("canvas-client", broker=cfg.get("broker", "amqp://guest:guest@127.0.0.1:5672//"),
                 backend=cfg.get("backend", "redis://127.0.0.1:6379/0"))
    app.conf.update(accept_content=["json", "msgpack"], result_accept_content=["json", "msgpack"],
                    broker_connection_retry_on_startup=True)
    timeout = cfg.get("timeout", 60)
    cmd = cfg["cmd"]
    if cmd == "apply":
        result = build(cfg["canvas"]).apply_async()
        if cfg.get("save"):
            result.save()
        out = outcome(result, timeout) if cfg.get("wait", True) else {"id": result.id}
    elif cmd == "get":
        out = {"results": [outcome(AsyncResult(i, app=app), timeout) for i in cfg["ids"]]}
    elif cmd == "restore":
        saved = GroupResult.restore(cfg["group_id"], app=app)
        out = {"found": saved is not None}
        if saved is not None:
            out.update(outcome(saved, timeout))
    else:
        raise SystemExit(f"unknown cmd {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
