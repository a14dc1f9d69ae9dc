//! Pieces the benchmarks share (included with `#[path]`; not an example of its own).

use std::path::PathBuf;

use anyhow::{Context, bail};

/// The release `worker` binary next to this program's directory.
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .context("bench location")?
        .join("worker");
    if !path.exists() {
        bail!(
            "{} not found: run `cargo build --release -p worker` first",
            path.display()
        );
    }
    Ok(path)
}
