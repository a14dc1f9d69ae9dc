//! The beat: sends periodic tasks on cron and interval schedules, exactly once per tick, from
//! any number of replicas.
//!
//! Celery beat's well-known failures are what this crate is built against: it runs as a single
//! instance, two instances duplicate every task, schedule changes need a restart, and daylight
//! saving makes cron jobs skip or run twice. Here:
//!
//! - [`schedule`] computes ticks as UTC instants from cron expressions in IANA time zones
//!   (`croner`, whose DST policy runs a fixed time once per day) or anchored intervals; pure,
//!   with "now" passed in.
//! - [`entry`] and [`config`] define and validate entries: task, arguments, queue and options,
//!   catch-up policy after downtime, overlap policy, jitter. The TOML schedule file gives the
//!   initial set and is refused as a whole, on one line naming the entry, if anything is wrong.
//! - [`store`] keeps entries and their state (cursor, last and next run) in Redis, and is the
//!   runtime API: [`Store::add`], [`Store::pause`], [`Store::resume`], [`Store::remove`],
//!   [`Store::list`]; the leader hears of changes by pub/sub, with no restart.
//! - [`lease`] elects one leader among replicas with a Redis lease and fencing token; a new
//!   leader takes over within about 11 s of the old one dying.
//! - [`beat`] is the loop: each tick's firing key is claimed atomically (with a lease check)
//!   before publishing, so a tick is published once even across a change of leader.
//! - [`metrics`] serves `/metrics` and `/healthz`.
//!
//! ```no_run
//! # async fn demo() -> scheduler::Result<()> {
//! use scheduler::{EntrySpec, Store};
//!
//! // What the monitor does: add an entry at run time, pause it, list last and next runs.
//! let store = Store::connect("redis://127.0.0.1:6379/0", scheduler::DEFAULT_KEY_PREFIX).await?;
//! store
//!     .add(EntrySpec {
//!         name: "nightly-report".into(),
//!         task: "reports.nightly".into(),
//!         cron: Some("0 2 * * *".into()),
//!         timezone: Some("Europe/London".into()),
//!         ..EntrySpec::default()
//!     })
//!     .await?;
//! store.pause("nightly-report").await?;
//! for entry in store.list().await? {
//!     println!("{} paused={} last={:?} next={:?}", entry.spec.name, entry.paused, entry.last_run, entry.next_run);
//! }
//! # Ok(()) }
//! ```

pub mod beat;
pub mod config;
pub mod entry;
mod error;
pub mod lease;
pub mod metrics;
pub mod schedule;
pub mod store;

pub use beat::{Beat, BeatConfig};
pub use config::{ConfigError, DEFAULT_SCHEDULE_FILE};
pub use entry::{CatchUp, CatchUpPolicy, Entry, EntryError, EntrySpec, Overlap};
pub use error::{Error, Result};
pub use lease::{LeaseConfig, LeaseHolder, Role};
pub use metrics::{AppState, Metrics, app};
pub use schedule::{Schedule, ScheduleError};
pub use store::{DEFAULT_KEY_PREFIX, EntryStatus, Keys, Skipped, Source, Store};
