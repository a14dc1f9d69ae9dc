#!/usr/bin/env python3
"""Writes every PromQL expression of deploy/grafana/dashboards/*.json as a recording rule, so
`promtool check rules` parses them (Grafana's $__rate_interval and $variables replaced by values
they could take). Also checks each dashboard's structure: unique uid and panel ids, every panel
with a datasource and targets, a `datasource` variable that the panels use.

Usage: dashboards_as_rules.py OUT.yml   (then: promtool check rules OUT.yml)
"""

import json
import pathlib
import re
import sys

DASHBOARDS = pathlib.Path(__file__).resolve().parents[1] / "grafana" / "dashboards"


def main():
    out = pathlib.Path(sys.argv[1])
    problems, rules, uids = [], [], set()
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        uid = board.get("uid")
        if not uid or uid in uids:
            problems.append(f"{path.name}: missing or duplicate uid {uid!r}")
        uids.add(uid)
        names = [v["name"] for v in board.get("templating", {}).get("list", [])]
        if "datasource" not in names:
            problems.append(f"{path.name}: no datasource variable")
        ids = set()
        for panel in board["panels"]:
            if panel["id"] in ids:
                problems.append(f"{path.name}: duplicate panel id {panel['id']}")
            ids.add(panel["id"])
            if panel["type"] in ("row", "text"):
                continue
            if panel.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{path.name}: panel {panel['title']!r} does not use ${{datasource}}")
            if not panel.get("targets"):
                problems.append(f"{path.name}: panel {panel['title']!r} has no query")
            for t in panel.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", "5m")
                expr = re.sub(r"\$\{?(\w+)\}?", ".*", expr)
                rules.append((f"{path.stem}:{panel['id']}:{t['refId']}", expr))
    with out.open("w") as f:
        f.write("groups:\n  - name: dashboards\n    rules:\n")
        for name, expr in rules:
            record = "dashboard:" + re.sub(r"[^a-zA-Z0-9_:]", "_", name)
            f.write(f"      - record: {record}\n        expr: {json.dumps(expr)}\n")
    for p in problems:
        print(f"FAIL {p}")
    print(f"dashboards: {len(uids)} dashboards, {len(rules)} queries written to {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
