//! Retry back-off and rate-limit settings.

use std::time::Duration;

/// Exponential back-off with jitter, capped: the `n`-th retry waits `min(max, base * 2^n)`, then
/// jitter picks uniformly from the upper half of that (so waits still grow, but retries of many
/// tasks that failed together spread out instead of arriving in a burst).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Wait before the first retry.
    pub base: Duration,
    /// Longest wait.
    pub max: Duration,
    /// Randomize within `[d/2, d]`.
    pub jitter: bool,
}

impl Default for Backoff {
    /// 1 s doubling to at most 10 minutes, with jitter (Celery's `retry_backoff=True` limits).
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(600),
            jitter: true,
        }
    }
}

impl Backoff {
    /// The wait before retry number `retries + 1`.
    pub fn delay(&self, retries: u32) -> Duration {
        let factor = 2u32.saturating_pow(retries.min(30));
        let d = self.base.saturating_mul(factor).min(self.max);
        if self.jitter && !d.is_zero() {
            let half = d / 2;
            half + Duration::from_nanos(fastrand::u64(
                0..=half.as_nanos().min(u64::MAX as u128) as u64,
            ))
        } else {
            d
        }
    }
}

/// A rate limit: at most `per_second` task starts per second, per worker and task type (as in
/// Celery).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Allowed starts per second.
    pub per_second: f64,
}

impl std::str::FromStr for RateLimit {
    type Err = String;

    /// Parses Celery's forms: `10/s`, `100/m`, `5/h`, or a bare number (per second).
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
        let n: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("rate limit `{s}`: expected a number like 10/s, 100/m or 5/h"))?;
        let per = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "rate limit `{s}`: unknown unit `{other}` (use s, m or h)"
                ));
            }
        };
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("rate limit `{s}` must be positive"));
        }
        Ok(RateLimit {
            per_second: n / per,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: false,
        };
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(3), Duration::from_secs(8));
        assert_eq!(b.delay(10), Duration::from_secs(60));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let b = Backoff {
            base: Duration::from_secs(4),
            max: Duration::from_secs(600),
            jitter: true,
        };
        for _ in 0..1000 {
            let d = b.delay(2);
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(16),
                "{d:?}"
            );
        }
    }

    #[test]
    fn rate_limits_parse_like_celery() {
        assert_eq!("10/s".parse::<RateLimit>().unwrap().per_second, 10.0);
        assert_eq!("120/m".parse::<RateLimit>().unwrap().per_second, 2.0);
        assert_eq!("3600/h".parse::<RateLimit>().unwrap().per_second, 1.0);
        assert_eq!("5".parse::<RateLimit>().unwrap().per_second, 5.0);
        assert!("0/s".parse::<RateLimit>().is_err());
        assert!(
            "10/d"
                .parse::<RateLimit>()
                .unwrap_err()
                .contains("unknown unit")
        );
    }
}
