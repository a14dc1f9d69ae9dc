#!/usr/bin/env python3
"""Every alert's runbook_url points at a section of deploy/README.md, and every alert has one.

GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens.
"""

import pathlib
import re
import sys

DEPLOY = pathlib.Path(__file__).resolve().parents[1]


def slug(heading):
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def main():
    readme = (DEPLOY / "README.md").read_text()
    anchors = {slug(h) for h in re.findall(r"^#+\s+(.*)$", readme, re.M)}
    problems, count = [], 0
    for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")):
        text = path.read_text()
        for block in re.split(r"\n\s*- alert:", text)[1:]:
            name = block.split()[0]
            count += 1
            m = re.search(r'runbook_url:\s*"deploy/README\.md#([^"]+)"', block)
            if not m:
                problems.append(f"{path.name} {name}: no runbook_url into deploy/README.md")
            elif m.group(1) not in anchors:
                problems.append(f"{path.name} {name}: README has no section #{m.group(1)}")
    for p in problems:
        print(f"FAIL {p}")
    print(f"check_runbook: {count} alerts, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
