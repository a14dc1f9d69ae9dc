//! Pieces the examples, the benchmarks and their tests share: where the built binaries are, and
//! the billing chaos run ([`billing_chaos`]), which the `billing_chaos` example runs at full size
//! and a test runs small.

pub mod billing_chaos;

use std::path::PathBuf;

use anyhow::{Context, bail};

/// The `worker` binary of the build this program belongs to: next to the directory holding it
/// (`target/release/examples/bench` → `target/release/worker`; a test in `target/debug/deps`
/// → `target/debug/worker`).
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .context("program location")?
        .join("worker");
    if !path.exists() {
        bail!(
            "{} not found: run `cargo build --release -p worker` first",
            path.display()
        );
    }
    Ok(path)
}
