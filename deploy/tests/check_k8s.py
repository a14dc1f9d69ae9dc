#!/usr/bin/env python3
"""Checks a rendered overlay (`kubectl kustomize deploy/k8s/overlays/X`) beyond its schema.

kubernetes-validate checks the built-in kinds against Kubernetes' schemas; it has none for KEDA.
This script:

- validates every ScaledObject and TriggerAuthentication against KEDA's own CRD schemas
  (copied from kedacore/keda into keda/, Apache-2.0, see keda/README.md), with unknown fields
  refused as the API server would prune them, plus the rules KEDA enforces in code: the CEL
  rule min <= max, the fallback's need for an AverageValue trigger, and each scaler's known
  metadata keys and modes (pkg/scalers/rabbitmq_scaler.go, prometheus_scaler.go);
- checks what this project promises about its pods (deploy/README.md, ARCHITECTURE.md §3.3):
  liveness never on /readyz (so never on the broker), readiness present, probes on declared
  ports, requests and memory limits set, the worker's grace period longer than
  WORKER_SHUTDOWN_TIMEOUT, metrics ports and scrape annotations agreeing, non-root and
  read-only root file systems, every PDB and the ScaledObject selecting a real Deployment,
  every referenced ConfigMap and Secret key present (or declared external with --external),
  and every variable one a program reads (settings.py, from the source).

Usage: check_k8s.py RENDERED.yaml [--external SECRET ...]
Needs PyYAML and jsonschema (deploy/check installs both into its venv).
"""

import argparse
import copy
import pathlib
import re
import sys

import jsonschema
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import settings  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
KEDA_CRDS = {
    "ScaledObject": HERE / "keda" / "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": HERE / "keda" / "keda.sh_triggerauthentications.yaml",
}

# Trigger metadata keys each scaler reads (the `keda:"name=..."` tags with order=triggerMetadata
# in kedacore/keda pkg/scalers at the commit named in keda/README.md).
SCALER_METADATA = {
    "rabbitmq": {
        "queueName", "mode", "queueLength", "value", "activationValue", "host", "hostFromEnv",
        "protocol", "vhostName", "useRegex", "excludeUnacknowledged", "pageSize", "operation",
        "timeout", "unsafeSsl", "usernameFromEnv", "passwordFromEnv",
    },
    "prometheus": {
        "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
        "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
        "identityOwner", "authModes",
    },
}
RABBITMQ_MODES = {
    "QueueLength", "MessageRate", "DeliverGetRate", "PublishedToDeliveredRatio",
    "ExpectedQueueConsumptionTime",
}
RABBITMQ_HTTP_ONLY_MODES = RABBITMQ_MODES - {"QueueLength"}
METRIC_TYPES = {"AverageValue", "Value", "Utilization"}

# Measured worker RSS (README "Performance"): 49.7 MB peak in the renewal benchmark.
WORKER_PEAK_RSS_BYTES = 49.7e6
WORKER_SHUTDOWN_DEFAULT = 30

errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


def closed(schema):
    """The schema with unknown properties refused wherever the API server would prune them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(path):
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return crd["spec"]["group"] + "/" + version["name"], closed(version["schema"]["openAPIV3Schema"])


def quantity_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(f"unsupported quantity {q!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)


def number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_keda(docs, by_kind):
    for kind, path in KEDA_CRDS.items():
        api_version, schema = crd_schema(path)
        for doc in by_kind.get(kind, []):
            where = f"{kind}/{doc['metadata']['name']}"
            if doc.get("apiVersion") != api_version:
                fail(where, f"apiVersion {doc.get('apiVersion')}, the CRD serves {api_version}")
            validator = jsonschema.Draft7Validator(schema)
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                fail(where, f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}")

    auths = {d["metadata"]["name"]: d for d in by_kind.get("TriggerAuthentication", [])}
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    for so in by_kind.get("ScaledObject", []):
        where = f"ScaledObject/{so['metadata']['name']}"
        spec = so["spec"]
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if lo > hi:
            fail(where, f"minReplicaCount {lo} > maxReplicaCount {hi}")
        target = spec["scaleTargetRef"]
        if target.get("kind", "Deployment") != "Deployment" or target["name"] not in deployments:
            fail(where, f"scaleTargetRef {target} is not a Deployment of this overlay")
        triggers = spec.get("triggers", [])
        for i, t in enumerate(triggers):
            tw = f"{where} trigger {t.get('name', i)}"
            metric_type = t.get("metricType", "AverageValue")
            if metric_type not in METRIC_TYPES:
                fail(tw, f"metricType {metric_type!r} is not one of {sorted(METRIC_TYPES)}")
            if metric_type == "Utilization" and t["type"] not in ("cpu", "memory"):
                fail(tw, "Utilization is only for the cpu and memory scalers")
            allowed = SCALER_METADATA.get(t["type"])
            if allowed is None:
                fail(tw, f"scaler {t['type']!r} is not one this check knows")
                continue
            meta = t.get("metadata", {})
            for key in sorted(set(meta) - allowed):
                fail(tw, f"metadata key {key!r} is not read by the {t['type']} scaler")
            auth = t.get("authenticationRef")
            auth_params = set()
            if auth:
                ta = auths.get(auth["name"])
                if ta is None:
                    fail(tw, f"authenticationRef {auth['name']!r} is not in this overlay")
                else:
                    auth_params = {r["parameter"] for r in ta["spec"].get("secretTargetRef", [])}
            if t["type"] == "rabbitmq":
                if "host" not in meta and "hostFromEnv" not in meta and "host" not in auth_params:
                    fail(tw, "no host: set metadata host/hostFromEnv or a TriggerAuthentication host")
                mode = meta.get("mode")
                if mode not in RABBITMQ_MODES:
                    fail(tw, f"mode {mode!r} is not one of {sorted(RABBITMQ_MODES)}")
                if meta.get("protocol", "auto") == "amqp" and mode in RABBITMQ_HTTP_ONLY_MODES:
                    fail(tw, f"mode {mode} needs protocol http (the management API)")
                value = number(meta.get("value"))
                if not value or value <= 0:
                    fail(tw, f"value {meta.get('value')!r} must be a positive number")
                if not meta.get("queueName"):
                    fail(tw, "queueName is required")
            if t["type"] == "prometheus":
                for key in ("serverAddress", "query", "threshold"):
                    if not meta.get(key):
                        fail(tw, f"{key} is required")
                if number(meta.get("threshold")) is None:
                    fail(tw, f"threshold {meta.get('threshold')!r} is not a number")
                if not re.match(r"https?://", meta.get("serverAddress", "")):
                    fail(tw, "serverAddress must be an http(s) URL")
        if "fallback" in spec:
            if not any(
                t.get("metricType", "AverageValue") == "AverageValue"
                and t["type"] not in ("cpu", "memory")
                for t in triggers
            ):
                fail(where, "fallback needs at least one (non cpu/memory) AverageValue trigger")


def env_of(container, configmaps):
    """The container's environment as Kubernetes builds it: envFrom first, then env."""
    env = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmaps.get(src["configMapRef"]["name"], {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def check_pods(by_kind, external):
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind.get("ConfigMap", [])}
    secrets = {s["metadata"]["name"]: set(s.get("data", {})) | set(s.get("stringData", {}))
               for s in by_kind.get("Secret", [])}
    deployments = by_kind.get("Deployment", [])
    every_setting = settings.all_settings()
    for name, data in configmaps.items():
        for key in sorted(set(data) - every_setting):
            fail(f"ConfigMap/{name}", f"{key} is not a setting any program reads")
    if not deployments:
        fail("overlay", "no Deployment rendered")

    def check_ref(where, name, key=None, optional=False):
        if name in external:
            keys = external[name]
            if keys is not None and key is not None and key not in keys:
                fail(where, f"external Secret {name!r}: its example env file has no key {key!r}")
            return
        if name not in secrets:
            if not optional:
                fail(where, f"Secret {name!r} is neither in this overlay nor declared external")
        elif key is not None and key not in secrets[name] and not optional:
            fail(where, f"Secret {name!r} has no key {key!r}")

    for d in deployments:
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        sel = d["spec"]["selector"]["matchLabels"]
        if any(labels.get(k) != v for k, v in sel.items()):
            fail(f"Deployment/{name}", "selector does not match the pod labels")
        psc = pod.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            fail(f"Deployment/{name}", "pod securityContext.runAsNonRoot is not true")
        if pod.get("automountServiceAccountToken") is not False:
            fail(f"Deployment/{name}", "automountServiceAccountToken should be false (no API access needed)")
        for c in pod["containers"]:
            where = f"Deployment/{name} container {c['name']}"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe_name in ("livenessProbe", "readinessProbe"):
                if probe_name not in c:
                    fail(where, f"no {probe_name}")
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                if not action:
                    fail(where, f"{probe_name} is neither httpGet nor tcpSocket")
                    continue
                port = action["port"]
                if isinstance(port, str) and port not in ports:
                    fail(where, f"{probe_name} names port {port!r}, not declared")
                if probe_name == "livenessProbe" and probe.get("httpGet", {}).get("path") == "/readyz":
                    fail(where, "liveness on /readyz would restart pods when the broker blips")
            res = c.get("resources", {})
            if not res.get("requests", {}).get("cpu") or not res.get("requests", {}).get("memory"):
                fail(where, "cpu and memory requests must be set")
            if not res.get("limits", {}).get("memory"):
                fail(where, "a memory limit must be set")
            csc = c.get("securityContext", {})
            if csc.get("allowPrivilegeEscalation") is not False or not csc.get("readOnlyRootFilesystem"):
                fail(where, "allowPrivilegeEscalation false and readOnlyRootFilesystem true expected")
            for src in c.get("envFrom", []):
                if "configMapRef" in src and src["configMapRef"]["name"] not in configmaps:
                    fail(where, f"ConfigMap {src['configMapRef']['name']!r} is not in this overlay")
                if "secretRef" in src:
                    check_ref(where, src["secretRef"]["name"], optional=src["secretRef"].get("optional", False))
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    check_ref(f"{where} env {e['name']}", ref["name"], ref["key"], ref.get("optional", False))
            env = env_of(c, configmaps)
            program = (c.get("command") or [""])[0]
            known = settings.program_settings(program)
            if known is not None:
                for e in c.get("env", []):
                    if e["name"] not in known | settings.HELPERS:
                        fail(where, f"{e['name']} is not a setting {program} reads")
            scrape_port = annotations.get("prometheus.io/port")
            if scrape_port and int(scrape_port) not in ports.values():
                fail(where, f"prometheus.io/port {scrape_port} is not a container port")
            command = program
            if command == "worker":
                live = c.get("livenessProbe", {}).get("httpGet", {}).get("path")
                ready = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
                if live != "/livez" or ready != "/readyz":
                    fail(where, f"worker probes should be /livez and /readyz, are {live} and {ready}")
                if env.get("METRICS_BIND") != "0.0.0.0:9808" or ports.get("metrics") != 9808:
                    fail(where, "worker must bind METRICS_BIND=0.0.0.0:9808 and declare port 9808")
                timeout = int(env.get("WORKER_SHUTDOWN_TIMEOUT") or WORKER_SHUTDOWN_DEFAULT)
                grace = pod.get("terminationGracePeriodSeconds", 30)
                if grace <= timeout:
                    fail(where, f"terminationGracePeriodSeconds {grace} must exceed WORKER_SHUTDOWN_TIMEOUT {timeout}")
                cp_timeout = int(env.get("CLOUDPAYMENTS_TIMEOUT") or 60)
                if timeout <= cp_timeout:
                    fail(where, f"WORKER_SHUTDOWN_TIMEOUT {timeout} should outlast CLOUDPAYMENTS_TIMEOUT {cp_timeout}")
                mem = quantity_bytes(res.get("requests", {}).get("memory", "0"))
                if mem < WORKER_PEAK_RSS_BYTES:
                    fail(where, f"memory request {mem / 2**20:.0f}Mi is below the measured peak RSS 49.7 MB")
            if command == "scheduler":
                if env.get("METRICS_BIND") != "0.0.0.0:9809" or ports.get("metrics") != 9809:
                    fail(where, "scheduler must bind METRICS_BIND=0.0.0.0:9809 and declare port 9809")
                if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                    fail(where, "scheduler readiness should be /healthz (the routes in scheduler/src/metrics.rs)")
                if d["spec"].get("replicas", 1) < 2:
                    fail(f"Deployment/{name}", "the scheduler runs at least 2 replicas (one leader, one standby)")

    by_name = {d["metadata"]["name"]: d for d in deployments}
    for pdb in by_kind.get("PodDisruptionBudget", []):
        where = f"PodDisruptionBudget/{pdb['metadata']['name']}"
        sel = pdb["spec"]["selector"]["matchLabels"]
        matched = [d for d in deployments
                   if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if not matched:
            fail(where, "selects no Deployment")
        for d in matched:
            min_available = pdb["spec"].get("minAvailable")
            if isinstance(min_available, int) and min_available >= d["spec"].get("replicas", 1):
                fail(where, f"minAvailable {min_available} >= replicas of {d['metadata']['name']}: drains would block")
    for name in ("worker", "scheduler", "billing-api"):
        if name in by_name and not any(
            p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == name
            for p in by_kind.get("PodDisruptionBudget", [])
        ):
            fail(f"Deployment/{name}", "has no PodDisruptionBudget")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered")
    parser.add_argument("--external", action="append", default=[], metavar="SECRET[=ENVFILE]",
                        help="a Secret created outside the overlay, with an example env file "
                             "naming its keys (# KEY= lines are optional keys); may be repeated")
    args = parser.parse_args()
    docs = [d for d in yaml.safe_load_all(pathlib.Path(args.rendered).read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    check_keda(docs, by_kind)
    external = {}
    for spec in args.external:
        name, _, env_file = spec.partition("=")
        keys = None
        if env_file:
            keys = set()
            for line in pathlib.Path(env_file).read_text().splitlines():
                m = re.match(r"#?\s*([A-Z_][A-Z0-9_]*)=", line)
                if m:
                    keys.add(m.group(1))
        external[name] = keys
    check_pods(by_kind, external)
    kinds = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
    if errors:
        for e in errors:
            print(f"FAIL {args.rendered}: {e}")
        print(f"check_k8s: {len(errors)} problems in {kinds}")
        return 1
    print(f"check_k8s: {args.rendered} ok ({kinds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
