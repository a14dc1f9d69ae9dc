//! Settings shared by the binaries (ARCHITECTURE.md §3.4), and start-up errors on one line.
//!
//! Every setting is a flag and an environment variable with the same meaning. A missing or
//! malformed one stops the program with a single line that names both.

use clap::{Args, Parser};

use crate::telemetry::LogFormat;

/// Where the broker and the result backend are, and how to log.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Broker URL: amqp://user:pass@host:port/vhost (a cluster's nodes `;`-separated), or
    /// memory:// for a single process.
    #[arg(long, env = "BROKER_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", value_parser = broker_url, hide_default_value = false)]
    pub broker_url: String,

    /// Result backend URL: redis://host:port/db, or memory:// for a single process.
    #[arg(long, env = "RESULT_BACKEND", default_value = "redis://127.0.0.1:6379/0", value_parser = backend_url)]
    pub result_backend: String,

    /// Log format: pretty or json (filter with RUST_LOG, default info).
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,

    /// Type of the task queues this process declares: classic or quorum (Celery's
    /// task_default_queue_type). Every process of a deployment should say the same.
    #[arg(long, env = "BROKER_QUEUE_TYPE", default_value = "classic", value_parser = ["classic", "quorum"])]
    pub broker_queue_type: String,

    /// Queues declared quorum whatever BROKER_QUEUE_TYPE says (comma-separated).
    #[arg(long, env = "BROKER_QUORUM_QUEUES", value_delimiter = ',')]
    pub broker_quorum_queues: Vec<String>,

    /// x-delivery-limit of quorum queues: a message redelivered that often is dropped.
    #[arg(long, env = "BROKER_DELIVERY_LIMIT", value_parser = clap::value_parser!(u32).range(1..))]
    pub broker_delivery_limit: Option<u32>,

    /// For amqps:// URLs: a PEM CA trusted besides the system's store.
    #[arg(long, env = "BROKER_TLS_CA_FILE")]
    pub broker_tls_ca_file: Option<String>,

    /// For amqps:// URLs: a PEM client certificate chain (with BROKER_TLS_KEY_FILE).
    #[arg(long, env = "BROKER_TLS_CERT_FILE", requires = "broker_tls_key_file")]
    pub broker_tls_cert_file: Option<String>,

    /// For amqps:// URLs: the client certificate's PKCS#8 key, PEM.
    #[arg(long, env = "BROKER_TLS_KEY_FILE", requires = "broker_tls_cert_file")]
    pub broker_tls_key_file: Option<String>,
}

impl ConnectionArgs {
    /// How task queues are declared, from the three `BROKER_*` queue settings.
    pub fn queue_options(&self) -> crate::broker::QueueOptions {
        let quorum = self.broker_quorum_queues.join(",");
        let limit = self.broker_delivery_limit.map(|n| n.to_string());
        crate::broker::QueueOptions::parse(
            Some(&self.broker_queue_type),
            Some(&quorum),
            limit.as_deref(),
        )
        .unwrap_or_default()
    }

    /// Connects to the broker these settings name.
    pub async fn broker(&self) -> crate::Result<crate::AnyBroker> {
        if self.broker_url.starts_with("amqp://") || self.broker_url.starts_with("amqps://") {
            let tls = crate::broker::BrokerTls::from_files(
                self.broker_tls_ca_file.as_deref(),
                self.broker_tls_cert_file.as_deref(),
                self.broker_tls_key_file.as_deref(),
            )?;
            let broker = crate::AmqpBroker::connect_with_tls(&self.broker_url, tls).await?;
            return Ok(crate::AnyBroker::Amqp(
                broker.with_queue_options(self.queue_options()),
            ));
        }
        crate::AnyBroker::connect_with(&self.broker_url, self.queue_options()).await
    }

    /// A client of the broker and the result backend these settings name.
    pub async fn client(&self) -> crate::Result<crate::Client> {
        let broker = self.broker().await?;
        let backend = crate::AnyBackend::connect_with_broker(&self.result_backend, &broker).await?;
        Ok(crate::Client::new(broker, backend))
    }
}

fn broker_url(s: &str) -> Result<String, String> {
    let amqp = |u: &str| u.starts_with("amqp://") || u.starts_with("amqps://");
    if s == "memory://" || s.split([';', ',']).map(str::trim).all(amqp) {
        Ok(s.to_owned())
    } else {
        Err("expected amqp://user:pass@host:port/vhost (several `;`-separated for a cluster) or memory://".into())
    }
}

fn backend_url(s: &str) -> Result<String, String> {
    if crate::redis_url::is_redis_url(s) || s == "memory://" || s == "rpc://" {
        Ok(s.to_owned())
    } else {
        Err(
            "expected redis://host:port/db, rediss://…, sentinel://host:26379;sentinel://…, \
             rpc:// or memory://"
                .into(),
        )
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
