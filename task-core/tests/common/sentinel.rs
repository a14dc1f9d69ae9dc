//! `scripts/redis-sentinel` from tests: a Redis primary, a replica and three sentinels on
//! loopback, stopped (and their data deleted) when the [`SentinelSet`] is dropped. Shared by the
//! task-core, worker and scheduler tests (`#[path]`).
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

/// The running set; dropping it stops every process.
pub struct SentinelSet {
    /// The `sentinel://…?master_name=…` URL.
    pub url: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-sentinel")
}

/// Runs `scripts/redis-sentinel <args>`, failing the test with its stderr if it fails; the
/// trimmed stdout.
pub fn run(args: &[&str]) -> String {
    let out = std::process::Command::new(script())
        .args(args)
        .output()
        .expect("run scripts/redis-sentinel");
    assert!(
        out.status.success(),
        "scripts/redis-sentinel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl SentinelSet {
    /// Starts a fresh set and waits until the replica and the sentinels agree.
    pub fn start() -> Self {
        run(&["start"]);
        SentinelSet { url: run(&["url"]) }
    }

    /// The primary's port, as the sentinels name it now.
    pub fn primary(&self) -> String {
        run(&["primary"])
    }

    /// SIGKILLs the primary; its port.
    pub fn kill_primary(&self) -> String {
        run(&["kill-primary"])
    }

    /// Waits until the sentinels name a primary other than `killed`; its port.
    pub fn wait_failover(&self, killed: &str) -> String {
        run(&["wait-failover", killed])
    }

    /// Starts a killed server again (it comes back empty; the sentinels make it a replica).
    pub fn restart(&self, port: &str) {
        run(&["restart", port]);
    }

    /// `INFO <section>` of the server on `port`, one line.
    pub fn info(&self, port: &str, section: &str) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", port, "info", section])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).replace("\r\n", " ")
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script()).arg("stop").status();
    }
}
