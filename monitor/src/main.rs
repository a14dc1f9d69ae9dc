//! `monitor`: the task monitor. Reads Celery events into PostgreSQL and serves Flower's HTTP API,
//! `/metrics`, `/livez` and `/readyz` on `MONITOR_BIND`.
//!
//! Every setting is a flag and an environment variable (`monitor --help`). A bad setting stops it
//! at start-up with one line naming the problem (exit code 2). SIGTERM or SIGINT stops it after
//! the batch being written is committed and acknowledged.

use std::process::ExitCode;

use clap::Parser;
use task_core::cli::parse_or_exit;
use task_core::telemetry::LogFormat;

/// Task monitor: durable event history and a Flower-compatible API.
#[derive(Debug, Parser)]
#[command(name = "monitor", version)]
struct Cli {
    #[command(flatten)]
    config: monitor::Config,

    /// Read a password from standard input, print its Argon2id hash for a MONITOR_USERS
    /// entry (`name role hash`), and exit.
    #[arg(long)]
    hash_password: bool,

    /// Log lines as `pretty` text or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    if cli.hash_password {
        return staff_auth::print_hash_from_stdin("monitor");
    }
    task_core::telemetry::init(cli.log_format);
    match monitor::run(cli.config, task_core::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("monitor: {e}");
            if matches!(e, monitor::Error::Config(_)) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
