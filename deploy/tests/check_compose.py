#!/usr/bin/env python3
"""Checks deploy/compose.yaml beyond the Compose specification's JSON schema.

The schema (check-jsonschema's vendored compose-spec.json) says the file is well formed; this
says it works with these programs:

- every depends_on target exists, a `service_healthy` one has a health check, and a
  dependency on a service that only runs in a profile is `required: false`;
- health checks of our image are exec form (`CMD`): the image has no shell for `CMD-SHELL`;
- each program gets only variables it reads (from the source, see settings.py), and the
  billing programs get the ones they cannot start without;
- the worker listens on 0.0.0.0:9808 and the scheduler on 0.0.0.0:9809, where
  deploy/prometheus/prometheus.yml looks for them, and the rules are mounted where it loads
  them from;
- the worker's stop_grace_period outlasts WORKER_SHUTDOWN_TIMEOUT, which outlasts a gateway
  call, and BILLING_PROCESSING_LEASE >= CLOUDPAYMENTS_TIMEOUT + 10 (checked at start-up too).

Usage: check_compose.py [deploy/compose.yaml]. Needs PyYAML.
"""

import pathlib
import re
import sys

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import settings  # noqa: E402

DEPLOY = pathlib.Path(__file__).resolve().parents[1]
REQUIRED_BILLING = {"BROKER_URL", "RESULT_BACKEND", "DATABASE_URL", "CLOUDPAYMENTS_PUBLIC_ID",
                    "CLOUDPAYMENTS_API_SECRET"}
errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


def interpolate(value):
    """${VAR:-default} and ${VAR-default} as Compose would with VAR unset; ${VAR} as empty."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def seconds(duration):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(duration))
    if not m:
        raise ValueError(f"unsupported duration {duration!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return int(m.group(1)) * scale


def env_of(service):
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: interpolate(v) for k, v in env.items()}


def program_of(service):
    command = service.get("command")
    if isinstance(command, list) and command:
        return command[0]
    return None


def main():
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEPLOY / "compose.yaml"
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    image_services = {n for n, s in services.items() if "billing-platform" in interpolate(s.get("image", ""))}

    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            where = f"{name} depends_on {dep}"
            if dep not in services:
                fail(where, "no such service")
                continue
            if cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                fail(where, "service_healthy, but it has no healthcheck")
            if services[dep].get("profiles") and not svc.get("profiles") and cond.get("required", True):
                fail(where, f"only runs with profile {services[dep]['profiles']}: needs required: false")
        if name in image_services:
            test = svc.get("healthcheck", {}).get("test")
            if not test:
                fail(name, "no healthcheck")
            elif not (isinstance(test, list) and test[0] == "CMD"):
                fail(name, f"healthcheck {test!r} must be exec form [\"CMD\", ...]: the image has no shell")
            elif test[1] != "healthprobe":
                fail(name, "healthcheck should run healthprobe (the only probe in the image)")
            if not svc.get("read_only"):
                fail(name, "read_only: true expected for our image")

            program = program_of(svc)
            known = settings.program_settings(program)
            env = env_of(svc)
            if known is None:
                print(f"note: {name}: cannot check the variables of {program!r} (no source yet)")
            else:
                for var in sorted(set(env) - known - settings.HELPERS):
                    fail(name, f"{var} is not a setting {program} reads")
            if program in ("worker", "billing-api"):
                for var in sorted(REQUIRED_BILLING - set(env)):
                    fail(name, f"{var} is required by {program}")
                lease = int(env.get("BILLING_PROCESSING_LEASE") or 120)
                cp_timeout = int(env.get("CLOUDPAYMENTS_TIMEOUT") or 60)
                if lease < cp_timeout + 10:
                    fail(name, f"BILLING_PROCESSING_LEASE {lease} < CLOUDPAYMENTS_TIMEOUT {cp_timeout} + 10")
            if program == "worker":
                if env.get("METRICS_BIND") != "0.0.0.0:9808":
                    fail(name, "METRICS_BIND must be 0.0.0.0:9808 (Prometheus scrapes it)")
                timeout = int(env.get("WORKER_SHUTDOWN_TIMEOUT") or 30)
                grace = seconds(svc.get("stop_grace_period", "10s"))
                if grace <= timeout:
                    fail(name, f"stop_grace_period {grace}s must exceed WORKER_SHUTDOWN_TIMEOUT {timeout}")
                if timeout <= cp_timeout:
                    fail(name, f"WORKER_SHUTDOWN_TIMEOUT {timeout} should outlast CLOUDPAYMENTS_TIMEOUT {cp_timeout}")
                if svc.get("deploy", {}).get("replicas", 1) < 2:
                    fail(name, "two workers expected")
            if program == "scheduler":
                if env.get("METRICS_BIND") != "0.0.0.0:9809":
                    fail(name, "METRICS_BIND must be 0.0.0.0:9809 (Prometheus scrapes it)")
                if svc.get("deploy", {}).get("replicas", 1) < 2:
                    fail(name, "two scheduler replicas expected")

    prom = services.get("prometheus")
    if not prom:
        fail("prometheus", "missing")
    else:
        mounts = {v.split(":")[1]: v.split(":")[0] for v in prom.get("volumes", []) if v.startswith("./")}
        config_src = mounts.get("/etc/prometheus/prometheus.yml")
        if not config_src:
            fail("prometheus", "prometheus.yml is not mounted at /etc/prometheus/prometheus.yml")
        else:
            config = yaml.safe_load((path.parent / config_src).read_text())
            if "/etc/prometheus/rules" not in mounts:
                fail("prometheus", "the rules are not mounted at /etc/prometheus/rules")
            if "rules/*.yml" not in config.get("rule_files", []):
                fail("prometheus", "prometheus.yml does not load rules/*.yml")
            expected = {"worker": ("worker", 9808), "scheduler": ("scheduler", 9809)}
            for job in config["scrape_configs"]:
                if job["job_name"] in expected:
                    svc_name, port = expected[job["job_name"]]
                    sd = job.get("dns_sd_configs", [{}])[0]
                    if sd.get("names") != [svc_name] or sd.get("port") != port:
                        fail("prometheus.yml", f"job {job['job_name']} should find {svc_name}:{port} by DNS")
                    if svc_name not in services:
                        fail("prometheus.yml", f"job {job['job_name']}: no service {svc_name}")

    if errors:
        for e in errors:
            print(f"FAIL {path}: {e}")
        print(f"check_compose: {len(errors)} problems")
        return 1
    print(f"check_compose: {path} ok ({len(services)} services)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
