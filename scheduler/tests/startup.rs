//! The binary refuses bad configuration at start-up with one line naming the problem.

use std::path::PathBuf;
use std::process::Command;

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "scheduler-startup-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the binary with `env` (nothing else inherited that could matter) and returns its exit
/// code and the non-empty lines of its standard error.
fn run(env: &[(&str, &str)]) -> (i32, Vec<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scheduler"));
    for var in [
        "BROKER_URL",
        "RESULT_BACKEND",
        "SCHEDULE_FILE",
        "METRICS_BIND",
        "SCHEDULER_NODE_ID",
        "SCHEDULER_KEY_PREFIX",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("METRICS_BIND", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the scheduler binary");
    let lines = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

fn assert_one_line(lines: &[String], expected: &[&str]) {
    assert_eq!(lines.len(), 1, "one line expected, got {lines:?}");
    for part in expected {
        assert!(
            lines[0].contains(part),
            "{:?} must contain {part:?}",
            lines[0]
        );
    }
}

#[test]
fn a_malformed_schedule_file_is_refused_naming_the_entry_and_the_reason() {
    let dir = dir();
    let cases = [
        (
            "[[entry]]\nname = \"ok\"\ntask = \"t\"\nevery = \"1m\"\n\n[[entry]]\nname = \"bad-cron\"\ntask = \"t\"\ncron = \"61 * * * *\"\n",
            vec!["entry `bad-cron`", "cron `61 * * * *` is invalid"],
        ),
        (
            "[[entry]]\nname = \"typo\"\ntask = \"t\"\nevery = \"1m\"\nqueu = \"billing\"\n",
            vec!["entry `typo`", "unknown field `queu`"],
        ),
        (
            "[[entry]]\nname = \"zone\"\ntask = \"t\"\ncron = \"0 * * * *\"\ntimezone = \"Europe/Atlantis\"\n",
            vec!["entry `zone`", "`Europe/Atlantis` is not an IANA time zone"],
        ),
    ];
    for (text, expected) in cases {
        let path = dir.join("schedule.toml");
        std::fs::write(&path, text).unwrap();
        let (code, lines) = run(&[("SCHEDULE_FILE", path.to_str().unwrap())]);
        assert_eq!(code, 2, "{lines:?}");
        let mut parts = vec!["scheduler: schedule file", path.to_str().unwrap()];
        parts.extend(expected);
        assert_one_line(&lines, &parts);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_schedule_file_is_refused() {
    let (code, lines) = run(&[("SCHEDULE_FILE", "/nonexistent/beat.toml")]);
    assert_eq!(code, 2);
    assert_one_line(
        &lines,
        &["cannot read schedule file /nonexistent/beat.toml"],
    );
}

#[test]
fn bad_settings_are_refused_naming_the_variable() {
    let (code, lines) = run(&[("METRICS_BIND", "not-an-address")]);
    assert_eq!(code, 2);
    assert_one_line(&lines, &["not-an-address", "METRICS_BIND"]);
    let (code, lines) = run(&[("SCHEDULER_KEY_PREFIX", "")]);
    assert_eq!(code, 2);
    assert_one_line(&lines, &["SCHEDULER_KEY_PREFIX"]);
    let (code, lines) = run(&[("RESULT_BACKEND", "postgres://x")]);
    assert_eq!(code, 2);
    assert_one_line(&lines, &["RESULT_BACKEND"]);
}

#[test]
fn the_default_schedule_is_the_billing_file() {
    // Run from the workspace root, as scripts and the image do; an unreachable broker stops it
    // after the file was read and accepted.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_scheduler"))
        .current_dir(root)
        .env_remove("SCHEDULE_FILE")
        .env("BROKER_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("METRICS_BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap();
    assert!(
        last.starts_with("scheduler: cannot connect to the broker"),
        "{last}"
    );
    assert!(
        !stderr.contains("schedule file"),
        "the billing file is valid: {stderr}"
    );
}
