//! Wall-clock time, injectable.
//!
//! ETAs and expiry times travel between processes as wall-clock times, so the worker compares them
//! with a wall clock. Tests that pause tokio's time need that clock to move with tokio's:
//! [`Clock::tokio`] is anchored to the wall clock once and then advances with
//! `tokio::time::Instant`.
//!
//! A clock also has a time zone, Celery's `timezone` setting: the zone a naive `eta` or `expires`
//! (one without a UTC offset) is read in. It is UTC unless set.

use std::sync::Arc;

use chrono::{DateTime, Utc};
/// An IANA time zone (`Europe/Moscow`); parse one with `str::parse`.
pub use chrono_tz::Tz;

/// A source of the current UTC time, and the time zone naive times are read in.
#[derive(Clone)]
pub struct Clock {
    now: Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>,
    timezone: Tz,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock::from_fn(Utc::now)
    }

    /// The wall time at creation, advanced by tokio's (possibly paused) clock since then.
    pub fn tokio() -> Self {
        let (wall, instant) = (Utc::now(), tokio::time::Instant::now());
        Clock::from_fn(move || {
            wall + chrono::Duration::from_std(instant.elapsed()).unwrap_or_default()
        })
    }

    /// A clock from any function.
    pub fn from_fn(f: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Clock {
            now: Arc::new(f),
            timezone: chrono_tz::UTC,
        }
    }

    /// The same clock, reading naive times in `timezone` (Celery's `timezone` setting).
    pub fn with_timezone(mut self, timezone: Tz) -> Self {
        self.timezone = timezone;
        self
    }

    /// The zone naive times are read in.
    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        (self.now)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({}, {})", self.now(), self.timezone)
    }
}
