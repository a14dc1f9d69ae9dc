//! Settings shared by the binaries (ARCHITECTURE.md §3.4), and start-up errors on one line.
//!
//! Every setting is a flag and an environment variable with the same meaning. A missing or
//! malformed one stops the program with a single line that names both.

use clap::{Args, Parser};

use crate::telemetry::LogFormat;

/// Where the broker and the result backend are, and how to log.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Broker URL: amqp://user:pass@host:port/vhost, or memory:// for a single process.
    #[arg(long, env = "BROKER_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", value_parser = broker_url, hide_default_value = false)]
    pub broker_url: String,

    /// Result backend URL: redis://host:port/db, or memory:// for a single process.
    #[arg(long, env = "RESULT_BACKEND", default_value = "redis://127.0.0.1:6379/0", value_parser = backend_url)]
    pub result_backend: String,

    /// Log format: pretty or json (filter with RUST_LOG, default info).
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
}

fn broker_url(s: &str) -> Result<String, String> {
    if s.starts_with("amqp://") || s.starts_with("amqps://") || s == "memory://" {
        Ok(s.to_owned())
    } else {
        Err("expected amqp://user:pass@host:port/vhost or memory://".into())
    }
}

fn backend_url(s: &str) -> Result<String, String> {
    if s.starts_with("redis://") || s.starts_with("rediss://") || s == "memory://" {
        Ok(s.to_owned())
    } else {
        Err("expected redis://host:port/db or memory://".into())
    }
}

/// Parses the command line and environment; on a bad setting prints one line and exits with 2.
/// `--help` and `--version` print as usual. Meant for `main`, before anything else runs.
#[allow(clippy::exit)]
pub fn parse_or_exit<T: Parser>() -> T {
    let mut cmd = T::command();
    let parsed = cmd
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|mut m| T::from_arg_matches_mut(&mut m));
    match parsed {
        Ok(v) => v,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}: {}", cmd.get_name(), one_line(&e, &cmd));
            std::process::exit(2)
        }
    }
}

/// The first line of a clap error, with the environment variable of the offending flag named.
fn one_line(e: &clap::Error, cmd: &clap::Command) -> String {
    let rendered = e.render().to_string();
    let line = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    let mut line = line.trim_start_matches("error: ").to_owned();
    let named: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| Some((a.get_long()?, a.get_env()?)))
        .filter(|(long, _)| line.contains(&format!("--{long}")))
        .map(|(_, env)| env.to_string_lossy().into_owned())
        .collect();
    if !named.is_empty() {
        line.push_str(&format!(" (environment variable {})", named.join(", ")));
    }
    line
}
