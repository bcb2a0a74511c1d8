//! A token bucket: at most `per_second` admissions a second on average, `per_second` at once
//! after a quiet second. Admission waits instead of failing, so a client over its rate is
//! slowed (its stream is read no faster), never answered with an error.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A rate a tenant's requests of one kind are admitted at.
pub struct RateLimit {
    per_second: f64,
    /// Tokens available, and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// `None` for 0 (no limit).
    pub fn new(per_second: u32) -> Option<RateLimit> {
        (per_second > 0).then(|| RateLimit {
            per_second: f64::from(per_second),
            bucket: Mutex::new((f64::from(per_second), Instant::now())),
        })
    }

    /// Waits until one more admission fits the rate, and takes it.
    pub async fn admit(&self) {
        while let Some(wait) = self.try_admit(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes an admission at `now` if one is available; otherwise how long until one is.
    fn try_admit(&self, now: Instant) -> Option<Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, counted) = *bucket;
        let tokens = (tokens
            + now.saturating_duration_since(counted).as_secs_f64() * self.per_second)
            .min(self.per_second);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            None
        } else {
            *bucket = (tokens, now);
            Some(Duration::from_secs_f64((1.0 - tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_no_limit() {
        assert!(RateLimit::new(0).is_none());
    }

    #[test]
    fn a_full_bucket_admits_a_second_of_requests_then_makes_them_wait() {
        let rate = RateLimit::new(100).expect("a limit");
        let start = Instant::now();
        for _ in 0..100 {
            assert_eq!(rate.try_admit(start), None);
        }
        let wait = rate.try_admit(start).expect("the 101st waits");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(10),
            "{wait:?}"
        );
        // Refilled at the rate: 10 ms later, one more.
        assert_eq!(rate.try_admit(start + Duration::from_millis(10)), None);
        assert!(rate.try_admit(start + Duration::from_millis(10)).is_some());
        // Never more than a second's worth.
        let later = start + Duration::from_secs(60);
        for _ in 0..100 {
            assert_eq!(rate.try_admit(later), None);
        }
        assert!(rate.try_admit(later).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn admissions_past_the_burst_follow_the_rate() {
        let rate = RateLimit::new(1000).expect("a limit");
        let start = tokio::time::Instant::now();
        for _ in 0..1500 {
            rate.admit().await;
        }
        // 1,000 at once, then 500 at 1,000 a second.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(490) && elapsed <= Duration::from_millis(600),
            "{elapsed:?}"
        );
    }
}
