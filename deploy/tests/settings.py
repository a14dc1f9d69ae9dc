"""The settings each program reads, taken from the source (clap's `env = "NAME"` attributes).

Used by check_compose.py and check_k8s.py to catch a misspelt or misplaced variable: a program
ignores a variable it does not know, so a typo would otherwise go unnoticed until production.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Which argument structs each binary flattens (task_core::cli::ConnectionArgs,
# billing_tasks::config::BillingArgs, billing_tasks::backoffice::BackofficeArgs) plus its own main.
PROGRAM_SOURCES = {
    "worker": ["task-core/src/cli.rs", "billing-tasks/src/config.rs", "worker/src/main.rs"],
    "billing-api": ["task-core/src/cli.rs", "billing-tasks/src/config.rs", "billing-tasks/src/bin/billing-api.rs",
                    "billing-tasks/src/backoffice/mod.rs"],
    "scheduler": ["task-core/src/cli.rs", "scheduler/src/main.rs"],
    "fake-cloudpayments": ["billing-tasks/src/bin/fake-cloudpayments.rs"],
}
# Read outside clap: tracing's EnvFilter.
ALWAYS = {"RUST_LOG"}
# Helpers a manifest defines for other variables, e.g. SCHEDULER_NODE_ID=beat@$(POD_NAME).
HELPERS = {"POD_NAME"}

ENV_ATTR = re.compile(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"')


def program_settings(program):
    """The variables `program` reads, or None when its source is not there to tell (the
    monitor before its crate lands)."""
    if program == "monitor":
        files = sorted((ROOT / "monitor" / "src").rglob("*.rs")) if (ROOT / "monitor" / "src").is_dir() else []
        if not files:
            return None
    elif program in PROGRAM_SOURCES:
        files = [ROOT / f for f in PROGRAM_SOURCES[program]]
    else:
        return None
    names = set(ALWAYS)
    for f in files:
        names.update(ENV_ATTR.findall(f.read_text()))
    return names


def all_settings():
    names = set(ALWAYS)
    for program in list(PROGRAM_SOURCES) + ["monitor"]:
        names |= program_settings(program) or set()
    return names
