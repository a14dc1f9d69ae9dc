//! When an entry fires: cron expressions in an IANA time zone, and fixed intervals.
//!
//! Everything here is pure: the caller passes "now", so tests drive it with any instant and
//! the beat loop passes its injected clock. Occurrences ("ticks") are UTC instants on whole
//! seconds; a tick's identity everywhere else (firing keys, task ids) is its Unix second.
//!
//! Invariants, checked by the property tests below:
//! - [`Schedule::next_after`] is strictly after its argument, so iterating it yields strictly
//!   increasing ticks, and no tick lies between an argument and its answer.
//! - Cron is evaluated on the zone's wall clock by `croner`, whose daylight-saving policy we keep:
//!   a fixed time that falls in a spring-forward gap runs right after the gap (02:30 becomes
//!   03:00), and one that falls in a fall-back overlap runs once, on its first occurrence.
//!   Patterns with a wildcard or step in the second, minute or hour field follow real time
//!   instead (`0 * * * *` runs every real hour, twice at 01:00 on a fall-back night).
//!   The "runs once" half of that policy is what keeps a daily job from running twice on a
//!   fall-back day, so it is also enforced here (a fixed-time answer on the second fold of a
//!   repeated hour is passed over) rather than left to a detail of the dependency.
//! - Intervals are anchored (by default on the Unix epoch), not on process start, so every
//!   replica computes the same ticks: `every = "15m"` fires at :00, :15, :30 and :45 UTC.

use std::time::Duration;

use chrono::{DateTime, LocalResult, SubsecRound, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::{Cron, JobType};

/// Why a schedule could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The cron expression does not parse, or never matches.
    #[error("cron `{expr}` is invalid: {reason}")]
    Cron {
        /// The expression as written.
        expr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The time zone is not in the IANA database.
    #[error("`{0}` is not an IANA time zone (e.g. UTC, Europe/London, America/New_York)")]
    TimeZone(String),
    /// The interval is not a positive whole number of seconds.
    #[error("interval {0:?} is invalid: it must be a whole number of seconds, at least 1s")]
    Interval(Duration),
}

/// A compiled schedule: cron in a time zone, or a fixed interval.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron expression evaluated on a time zone's wall clock.
    Cron(Box<CronSchedule>),
    /// Every `period`, at `anchor + k × period`.
    Interval(IntervalSchedule),
}

/// A cron expression (5 fields, or 6 with seconds first) and its time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: String,
    tz: Tz,
    cron: Cron,
    fixed_time: bool,
}

/// Ticks at `anchor + k × period` for every integer `k`.
#[derive(Debug, Clone, Copy)]
pub struct IntervalSchedule {
    period: i64,
    anchor: i64,
}

/// How many occurrences [`Schedule::count_between`] enumerates before it stops counting.
pub const COUNT_CAP: u64 = 10_000;

impl Schedule {
    /// A cron schedule. `expr` has 5 fields (minute first) or 6 (second first) and may use
    /// ranges, steps, names, `L`, `W`, `#` and nicknames such as `@hourly`; `tz` is an IANA name.
    pub fn cron(expr: &str, tz: &str) -> Result<Self, ScheduleError> {
        let tz: Tz = tz
            .parse()
            .map_err(|_| ScheduleError::TimeZone(tz.to_owned()))?;
        let bad = |reason: String| ScheduleError::Cron {
            expr: expr.to_owned(),
            reason,
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| bad(e.to_string()))?;
        let fixed_time = cron.determine_job_type() == JobType::FixedTime;
        let schedule = Schedule::Cron(Box::new(CronSchedule {
            expr: expr.trim().to_owned(),
            tz,
            cron,
            fixed_time,
        }));
        // A pattern such as `0 0 31 2 *` parses but can never run; refuse it up front rather
        // than have an entry that silently never fires.
        if schedule.next_after(Utc::now()).is_none() {
            return Err(bad("it never matches a real date".into()));
        }
        Ok(schedule)
    }

    /// An interval schedule ticking at `anchor + k × period`; `period` is whole seconds, ≥ 1 s.
    pub fn interval(period: Duration, anchor: DateTime<Utc>) -> Result<Self, ScheduleError> {
        if period < Duration::from_secs(1) || period.subsec_nanos() != 0 {
            return Err(ScheduleError::Interval(period));
        }
        let period =
            i64::try_from(period.as_secs()).map_err(|_| ScheduleError::Interval(period))?;
        Ok(Schedule::Interval(IntervalSchedule {
            period,
            anchor: anchor.timestamp(),
        }))
    }

    /// A stable description of *when* this schedule fires. Two schedules with the same
    /// fingerprint have the same ticks; the store resets an entry's progress when it changes.
    pub fn fingerprint(&self) -> String {
        match self {
            Schedule::Cron(c) => format!("cron:{}@{}", c.expr, c.tz.name()),
            Schedule::Interval(i) => format!("every:{}s@{}", i.period, i.anchor),
        }
    }

    /// The first tick strictly after `t`, or `None` if there is none (a cron that ran out).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron(c) => c.next_after(t),
            Schedule::Interval(i) => {
                let k = (t.timestamp() - i.anchor).div_euclid(i.period) + 1;
                from_secs(i.anchor.checked_add(k.checked_mul(i.period)?)?)
            }
        }
    }

    /// The first tick at or after `t`.
    pub fn first_at_or_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Ticks are whole seconds, so "strictly after a nanosecond earlier" is "at or after".
        self.next_after(t - chrono::Duration::nanoseconds(1))
    }

    /// The last tick at or before `t`, or `None` if there is none.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let candidate = match self {
            Schedule::Cron(c) => c.latest_at_or_before(t)?,
            Schedule::Interval(i) => {
                let k = (t.timestamp() - i.anchor).div_euclid(i.period);
                from_secs(i.anchor.checked_add(k.checked_mul(i.period)?)?)?
            }
        };
        // Forward search is the reference: walk on in case the backward answer was early.
        let mut latest = candidate;
        while let Some(n) = self.next_after(latest).filter(|n| *n <= t) {
            latest = n;
        }
        Some(latest)
    }

    /// The ticks strictly after `t`, in order.
    pub fn iter_after(&self, t: DateTime<Utc>) -> Occurrences<'_> {
        Occurrences {
            schedule: self,
            last: t,
        }
    }

    /// How many ticks lie in `[from, to]`, counting at most [`COUNT_CAP`] for cron schedules.
    pub fn count_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
        if to < from {
            return 0;
        }
        match self {
            Schedule::Interval(i) => {
                match (self.first_at_or_after(from), self.latest_at_or_before(to)) {
                    (Some(a), Some(b)) if a <= b => {
                        u64::try_from((b.timestamp() - a.timestamp()) / i.period + 1).unwrap_or(0)
                    }
                    _ => 0,
                }
            }
            Schedule::Cron(_) => self
                .iter_after(from - chrono::Duration::nanoseconds(1))
                .take_while(|t| *t <= to)
                .take(COUNT_CAP as usize)
                .count() as u64,
        }
    }
}

impl CronSchedule {
    fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut from = t.trunc_subsecs(0).with_timezone(&self.tz);
        loop {
            let next = self.cron.find_next_occurrence(&from, false).ok()?;
            if self.fixed_time && self.is_second_fold(&next) {
                from = next;
                continue;
            }
            return Some(next.with_timezone(&Utc));
        }
    }

    fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut from = t.trunc_subsecs(0).with_timezone(&self.tz);
        let mut inclusive = true;
        loop {
            let prev = self.cron.find_previous_occurrence(&from, inclusive).ok()?;
            if (self.fixed_time && self.is_second_fold(&prev)) || prev.with_timezone(&Utc) > t {
                from = prev;
                inclusive = false;
                continue;
            }
            return Some(prev.with_timezone(&Utc));
        }
    }

    /// Whether `t` is the later of two instants that share its wall-clock time (fall-back).
    fn is_second_fold(&self, t: &DateTime<Tz>) -> bool {
        match self.tz.from_local_datetime(&t.naive_local()) {
            LocalResult::Ambiguous(earlier, _) => earlier != *t,
            _ => false,
        }
    }
}

/// An iterator over a schedule's ticks after a given instant.
#[derive(Debug)]
pub struct Occurrences<'a> {
    schedule: &'a Schedule,
    last: DateTime<Utc>,
}

impl Iterator for Occurrences<'_> {
    type Item = DateTime<Utc>;
    fn next(&mut self) -> Option<DateTime<Utc>> {
        let next = self.schedule.next_after(self.last)?;
        self.last = next;
        Some(next)
    }
}

fn from_secs(secs: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(secs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration as Span, NaiveDate, NaiveTime, Timelike};
    use proptest::prelude::*;

    /// Zones with daylight saving on both hemispheres, and Moscow (none) as the control.
    const ZONES: [&str; 4] = [
        "America/New_York",
        "Europe/London",
        "Australia/Sydney",
        "Europe/Moscow",
    ];

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn cron(expr: &str, tz: &str) -> Schedule {
        Schedule::cron(expr, tz).unwrap()
    }

    /// Instants where `tz`'s UTC offset changes during `year`, found by scanning.
    fn transitions(tz: Tz, year: i32) -> Vec<DateTime<Utc>> {
        let offset = |t: DateTime<Utc>| t.with_timezone(&tz).naive_local() - t.naive_utc();
        let mut t = Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap();
        let end = Utc.with_ymd_and_hms(year + 1, 1, 1, 0, 0, 0).unwrap();
        let mut found = Vec::new();
        while t < end {
            let next = t + Span::minutes(30);
            if offset(t) != offset(next) {
                found.push(next);
            }
            t = next;
        }
        found
    }

    /// A start instant within a day and a half of a DST change (or anywhere, for Moscow).
    fn near_transition() -> impl Strategy<Value = (&'static str, DateTime<Utc>)> {
        (
            0..ZONES.len(),
            2024..2031i32,
            0..2usize,
            -129_600..129_600i64,
        )
            .prop_map(|(z, year, which, offset)| {
                let zone = ZONES[z];
                let list = transitions(zone.parse().unwrap(), year);
                let base = list.get(which).copied().unwrap_or_else(|| {
                    Utc.with_ymd_and_hms(year, 3 + which as u32 * 7, 15, 0, 0, 0)
                        .unwrap()
                });
                (
                    zone,
                    base + Span::seconds(offset) + Span::milliseconds(offset.rem_euclid(1000)),
                )
            })
    }

    /// The expected run of a daily fixed-time job on a local date: the time itself; the first
    /// of two when the clock repeats it; the end of the gap when the clock skips it.
    fn expected_daily(tz: Tz, date: NaiveDate, h: u32, m: u32) -> DateTime<Utc> {
        let mut local = date.and_time(NaiveTime::from_hms_opt(h, m, 0).unwrap());
        loop {
            match tz.from_local_datetime(&local) {
                LocalResult::Single(t) => return t.with_timezone(&Utc),
                LocalResult::Ambiguous(first, _) => return first.with_timezone(&Utc),
                LocalResult::None => local += Span::minutes(1),
            }
        }
    }

    fn assert_strictly_increasing(ticks: &[DateTime<Utc>]) {
        for w in ticks.windows(2) {
            assert!(
                w[0] < w[1],
                "ticks must strictly increase: {} then {}",
                w[0],
                w[1]
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// `M * * * *` runs every real hour at minute M, through both DST changes: never
        /// skipped (the 02:30 that does not exist is replaced by the real hour's 03:30) and never
        /// doubled beyond the real hours (both 01:30s of a fall-back night are real hours).
        #[test]
        fn hourly_cron_runs_every_real_hour((zone, start) in near_transition(), minute in 0..60u32) {
            let s = cron(&format!("{minute} * * * *"), zone);
            let ticks: Vec<_> = s.iter_after(start).take(60).collect();
            assert_strictly_increasing(&ticks);
            // Every zone here has whole-hour offsets, so the local minute is the UTC minute.
            let mut expected = start.trunc_subsecs(0).with_minute(minute).unwrap().with_second(0).unwrap();
            if expected <= start { expected += Span::hours(1); }
            for t in &ticks {
                prop_assert_eq!(*t, expected);
                expected += Span::hours(1);
            }
        }

        /// Stepped minutes and seconds follow real time too (6-field patterns included).
        #[test]
        fn stepped_cron_never_skips_or_doubles((zone, start) in near_transition(), six in any::<bool>()) {
            let (expr, step) = if six { ("*/20 * * * * *", 20) } else { ("*/15 * * * *", 900) };
            let s = cron(expr, zone);
            let ticks: Vec<_> = s.iter_after(start).take(400).collect();
            assert_strictly_increasing(&ticks);
            prop_assert!(ticks[0] > start && ticks[0] - start <= Span::seconds(step));
            for w in ticks.windows(2) {
                prop_assert_eq!(w[1] - w[0], Span::seconds(step));
            }
        }

        /// A daily fixed time runs exactly once per local date, DST days included.
        #[test]
        fn daily_cron_runs_once_per_local_day((zone, start) in near_transition(), hour in 0..24u32, minute in 0..60u32) {
            let tz: Tz = zone.parse().unwrap();
            let s = cron(&format!("{minute} {hour} * * *"), zone);
            let ticks: Vec<_> = s.iter_after(start).take(4).collect();
            assert_strictly_increasing(&ticks);
            let mut date = start.with_timezone(&tz).date_naive() - Span::days(1);
            let mut expected = Vec::new();
            while expected.len() < 4 {
                let t = expected_daily(tz, date, hour, minute);
                if t > start { expected.push(t); }
                date = date.succ_opt().unwrap();
            }
            prop_assert_eq!(ticks, expected);
        }

        /// Intervals tick every period from their anchor, whatever the wall clock does.
        #[test]
        fn intervals_tick_every_period((_zone, start) in near_transition(), period in 1..7200u64, anchor in 0..100_000i64) {
            let anchor = DateTime::from_timestamp(anchor, 0).unwrap();
            let s = Schedule::interval(Duration::from_secs(period), anchor).unwrap();
            let ticks: Vec<_> = s.iter_after(start).take(50).collect();
            assert_strictly_increasing(&ticks);
            prop_assert!(ticks[0] > start && ticks[0] - start <= Span::seconds(period as i64));
            for t in &ticks {
                prop_assert_eq!((t.timestamp() - anchor.timestamp()).rem_euclid(period as i64), 0);
            }
            for w in ticks.windows(2) {
                prop_assert_eq!(w[1] - w[0], Span::seconds(period as i64));
            }
        }

        /// `latest_at_or_before` and `count_between` agree with forward enumeration.
        #[test]
        fn backward_search_agrees_with_forward((zone, start) in near_transition(), pick in 0..4usize, span in 0..200_000i64) {
            let s = match pick {
                0 => cron("30 2 * * *", zone),
                1 => cron("0 */2 * * *", zone),
                2 => cron("*/7 * * * * *", zone),
                _ => Schedule::interval(Duration::from_secs(90), DateTime::UNIX_EPOCH).unwrap(),
            };
            let end = start + Span::seconds(span.min(if pick == 2 { 20_000 } else { 200_000 }));
            let latest = s.latest_at_or_before(end).unwrap();
            prop_assert!(latest <= end);
            prop_assert!(s.next_after(latest).unwrap() > end);
            let forward: Vec<_> = s.iter_after(start).take_while(|t| *t <= end).collect();
            if let Some(last) = forward.last() {
                prop_assert_eq!(*last, latest);
            }
            prop_assert_eq!(s.count_between(start + Span::nanoseconds(1), end), forward.len() as u64);
        }
    }

    /// Runs of `s` whose local date in `zone` is `date`.
    fn runs_on(s: &Schedule, zone: &str, date: &str) -> Vec<DateTime<Utc>> {
        let tz: Tz = zone.parse().unwrap();
        let date: NaiveDate = date.parse().unwrap();
        let from = expected_daily(tz, date - Span::days(1), 12, 0);
        s.iter_after(from)
            .skip_while(|t| t.with_timezone(&tz).date_naive() < date)
            .take_while(|t| t.with_timezone(&tz).date_naive() == date)
            .collect()
    }

    #[test]
    fn new_york_dst_days() {
        // Spring forward, 2026-03-08: 02:30 does not exist and runs once, at 03:00 EDT.
        let s = cron("30 2 * * *", "America/New_York");
        assert_eq!(
            runs_on(&s, "America/New_York", "2026-03-08"),
            [utc("2026-03-08T07:00:00Z")]
        );
        // Fall back, 2026-11-01: 01:30 happens twice and runs once, the first time (EDT).
        let s = cron("30 1 * * *", "America/New_York");
        assert_eq!(
            runs_on(&s, "America/New_York", "2026-11-01"),
            [utc("2026-11-01T05:30:00Z")]
        );
        // Asked from inside the repeated hour, the daily job does not run a second time,
        // forwards or backwards.
        assert_eq!(
            s.next_after(utc("2026-11-01T06:10:00Z")),
            Some(utc("2026-11-02T06:30:00Z"))
        );
        assert_eq!(
            s.latest_at_or_before(utc("2026-11-01T07:00:00Z")),
            Some(utc("2026-11-01T05:30:00Z"))
        );
        // Hourly: 23 real hours on the short day, 25 on the long one.
        let s = cron("0 * * * *", "America/New_York");
        assert_eq!(runs_on(&s, "America/New_York", "2026-03-08").len(), 23);
        assert_eq!(runs_on(&s, "America/New_York", "2026-11-01").len(), 25);
        // The seconds form of the same thing.
        let s = cron("0 30 2 * * *", "America/New_York");
        assert_eq!(
            runs_on(&s, "America/New_York", "2026-03-08"),
            [utc("2026-03-08T07:00:00Z")]
        );
    }

    #[test]
    fn london_dst_days() {
        // 2026-03-29: 01:00 GMT jumps to 02:00 BST.
        let s = cron("30 1 * * *", "Europe/London");
        assert_eq!(
            runs_on(&s, "Europe/London", "2026-03-29"),
            [utc("2026-03-29T01:00:00Z")]
        );
        // 2026-10-25: 02:00 BST goes back to 01:00 GMT; 01:30 runs once, in BST.
        assert_eq!(
            runs_on(&s, "Europe/London", "2026-10-25"),
            [utc("2026-10-25T00:30:00Z")]
        );
    }

    #[test]
    fn sydney_dst_days() {
        // 2026-10-04: 02:00 AEST jumps to 03:00 AEDT.
        let s = cron("30 2 * * *", "Australia/Sydney");
        assert_eq!(
            runs_on(&s, "Australia/Sydney", "2026-10-04"),
            [utc("2026-10-03T16:00:00Z")]
        );
        // 2026-04-05: 03:00 AEDT goes back to 02:00 AEST; 02:30 runs once, in AEDT.
        assert_eq!(
            runs_on(&s, "Australia/Sydney", "2026-04-05"),
            [utc("2026-04-04T15:30:00Z")]
        );
        let s = cron("0 * * * *", "Australia/Sydney");
        assert_eq!(runs_on(&s, "Australia/Sydney", "2026-10-04").len(), 23);
        assert_eq!(runs_on(&s, "Australia/Sydney", "2026-04-05").len(), 25);
    }

    #[test]
    fn moscow_has_no_dst_and_is_the_control() {
        let s = cron("0 * * * *", "Europe/Moscow");
        for day in ["2026-03-08", "2026-03-29", "2026-10-25", "2026-11-01"] {
            assert_eq!(runs_on(&s, "Europe/Moscow", day).len(), 24, "{day}");
        }
        let s = cron("30 2 * * *", "Europe/Moscow");
        assert_eq!(
            runs_on(&s, "Europe/Moscow", "2026-03-29"),
            [utc("2026-03-28T23:30:00Z")]
        );
    }

    #[test]
    fn an_interval_ignores_the_wall_clock() {
        let s = Schedule::interval(Duration::from_secs(3600), DateTime::UNIX_EPOCH).unwrap();
        // 25 hourly ticks during New York's 25-hour fall-back day.
        assert_eq!(runs_on(&s, "America/New_York", "2026-11-01").len(), 25);
        let s = Schedule::interval(Duration::from_secs(30), utc("2026-01-01T00:00:10Z")).unwrap();
        assert_eq!(
            s.next_after(utc("2026-05-05T10:00:00.5Z")),
            Some(utc("2026-05-05T10:00:10Z"))
        );
        assert_eq!(
            s.latest_at_or_before(utc("2026-05-05T10:00:10Z")),
            Some(utc("2026-05-05T10:00:10Z"))
        );
        assert_eq!(
            s.first_at_or_after(utc("2026-05-05T10:00:10Z")),
            Some(utc("2026-05-05T10:00:10Z"))
        );
    }

    #[test]
    fn cron_extensions_compute() {
        // Last day of February 2028 (leap year), nearest weekday to the 15th, last Friday.
        let s = cron("0 0 L * *", "UTC");
        assert_eq!(
            s.next_after(utc("2028-02-10T00:00:00Z")),
            Some(utc("2028-02-29T00:00:00Z"))
        );
        let s = cron("0 9 15W * *", "UTC");
        // 2026-08-15 is a Saturday: the nearest weekday is Friday the 14th.
        assert_eq!(
            s.next_after(utc("2026-08-01T00:00:00Z")),
            Some(utc("2026-08-14T09:00:00Z"))
        );
        let s = cron("0 9 * * 5#L", "UTC");
        assert_eq!(
            s.next_after(utc("2026-08-01T00:00:00Z")),
            Some(utc("2026-08-28T09:00:00Z"))
        );
        let s = cron("0 9 * * MON#2", "UTC");
        assert_eq!(
            s.next_after(utc("2026-08-01T00:00:00Z")),
            Some(utc("2026-08-10T09:00:00Z"))
        );
    }
}
