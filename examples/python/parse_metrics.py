"""Parses a worker's /metrics (OpenMetrics text on stdin) with prometheus_client's strict parser.

Prints one JSON object: family name -> {"type": ..., "samples": [{"name", "labels", "value"}]}.
Exits non-zero, with the parser's message, when the text is not valid OpenMetrics, which is what
a Prometheus server would reject. `worker/tests/metrics.rs` runs it:

    curl -s 127.0.0.1:9808/metrics | .venv/bin/python examples/python/parse_metrics.py
"""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> None:
    families = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        families[family.name] = {
            "type": family.type,
            "samples": [
                {"name": s.name, "labels": s.labels, "value": s.value}
                for s in family.samples
            ],
        }
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
