//! Wall-clock time, injectable.
//!
//! ETAs and expiry times travel between processes as wall-clock times, so the worker compares them
//! with a wall clock. Tests that pause tokio's time need that clock to move with tokio's:
//! [`Clock::tokio`] is anchored to the wall clock once and then advances with
//! `tokio::time::Instant`.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// A source of the current UTC time.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock(Arc::new(Utc::now))
    }

    /// The wall time at creation, advanced by tokio's (possibly paused) clock since then.
    pub fn tokio() -> Self {
        let (wall, instant) = (Utc::now(), tokio::time::Instant::now());
        Clock(Arc::new(move || {
            wall + chrono::Duration::from_std(instant.elapsed()).unwrap_or_default()
        }))
    }

    /// A clock from any function.
    pub fn from_fn(f: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Clock(Arc::new(f))
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}
