//! Token buckets. [`RateLimit`]: at most `per_second` admissions a second on average,
//! `per_second` at once after a quiet second. [`WorkBudget`]: units of work (rows read, bytes
//! written) a second, charged as they are spent. Both wait instead of failing, so a client over
//! its rate is slowed, never answered with an error.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A rate a tenant's requests of one kind are admitted at. A request past the rate reserves
/// the next admission and sleeps once until it (first come, first admitted): waiters that
/// woke every admission to race for it cost a timer and a wake-up each per admission (64 a
/// keep-alive stream may have waiting).
pub struct RateLimit {
    per_second: f64,
    /// Tokens available (negative: reserved ahead), and when they were counted.
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
        if let Some(wait) = self.reserve(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes an admission at `now`: `None` when one was available, otherwise how long until
    /// the one reserved.
    fn reserve(&self, now: Instant) -> Option<Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, counted) = *bucket;
        let tokens = (tokens
            + now.saturating_duration_since(counted).as_secs_f64() * self.per_second)
            .min(self.per_second)
            - 1.0;
        *bucket = (tokens, now);
        (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / self.per_second))
    }
}

/// Work (rows read, bytes written) a tenant may make the datastore do per second. A request
/// waits while the tenant is in debt, then runs whole and is charged what it cost, so one
/// request larger than a second's budget still runs; the tenant's next ones wait until the
/// debt is paid off. Waiting requests hold no datastore connection.
pub struct WorkBudget {
    per_second: f64,
    /// Units available (negative: owed), and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

impl WorkBudget {
    /// `None` for 0 (no limit).
    pub fn new(per_second: u64) -> Option<WorkBudget> {
        (per_second > 0).then(|| WorkBudget {
            per_second: per_second as f64,
            bucket: Mutex::new((per_second as f64, Instant::now())),
        })
    }

    /// Waits until the tenant owes nothing.
    pub async fn wait(&self) {
        while let Some(wait) = self.debt_wait(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Charges `units` of work done (or about to be done).
    pub fn charge(&self, units: u64) {
        self.charge_at(units, Instant::now());
    }

    fn refill(&self, bucket: &mut (f64, Instant), now: Instant) {
        let (units, counted) = *bucket;
        let units = (units
            + now.saturating_duration_since(counted).as_secs_f64() * self.per_second)
            .min(self.per_second);
        *bucket = (units, now);
    }

    fn charge_at(&self, units: u64, now: Instant) {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut bucket, now);
        bucket.0 -= units as f64;
    }

    /// `None` when nothing is owed at `now`; otherwise how long until it is paid off.
    fn debt_wait(&self, now: Instant) -> Option<Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut bucket, now);
        (bucket.0 < 0.0).then(|| Duration::from_secs_f64(-bucket.0 / self.per_second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_of_zero_is_no_limit() {
        assert!(WorkBudget::new(0).is_none());
    }

    #[test]
    fn a_budget_lets_one_large_request_run_and_makes_the_next_wait_off_its_debt() {
        let budget = WorkBudget::new(1000).expect("a budget");
        let start = Instant::now();
        assert_eq!(budget.debt_wait(start), None);
        // A second's worth and as much again: runs (it was not in debt), owes 1,000.
        budget.charge_at(2000, start);
        let wait = budget.debt_wait(start).expect("in debt");
        assert_eq!(wait, Duration::from_secs(1));
        // Paid off at the rate.
        assert!(
            budget
                .debt_wait(start + Duration::from_millis(500))
                .is_some()
        );
        assert_eq!(budget.debt_wait(start + Duration::from_millis(1000)), None);
        // Savings never exceed a second's worth.
        let later = start + Duration::from_secs(60);
        budget.charge_at(1000, later);
        assert_eq!(budget.debt_wait(later), None);
        budget.charge_at(1, later);
        assert!(budget.debt_wait(later).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn work_past_the_budget_follows_its_rate() {
        let budget = WorkBudget::new(10_000).expect("a budget");
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            budget.wait().await;
            budget.charge(1000);
        }
        // 10,000 saved, then 20,000 more at 10,000 a second (the last charge is owed).
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1800) && elapsed <= Duration::from_millis(2100),
            "{elapsed:?}"
        );
    }

    #[test]
    fn zero_is_no_limit() {
        assert!(RateLimit::new(0).is_none());
    }

    #[test]
    fn a_full_bucket_admits_a_second_of_requests_then_reserves_in_turn() {
        let rate = RateLimit::new(100).expect("a limit");
        let start = Instant::now();
        for _ in 0..100 {
            assert_eq!(rate.reserve(start), None);
        }
        // The 101st and 102nd reserve the next two admissions, 10 ms apart.
        let first = rate.reserve(start).expect("the 101st waits");
        assert!(
            first > Duration::from_millis(9) && first <= Duration::from_millis(10),
            "{first:?}"
        );
        let second = rate.reserve(start).expect("the 102nd waits");
        assert!(
            second > Duration::from_millis(19) && second <= Duration::from_millis(20),
            "{second:?}"
        );
        // 10 ms later the first reserved is due; a new request comes after the second.
        let next = rate
            .reserve(start + Duration::from_millis(10))
            .expect("after those reserved");
        assert!(
            next > Duration::from_millis(19) && next <= Duration::from_millis(20),
            "{next:?}"
        );
        // Never more than a second's worth.
        let later = start + Duration::from_secs(60);
        for _ in 0..100 {
            assert_eq!(rate.reserve(later), None);
        }
        assert!(rate.reserve(later).is_some());
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
