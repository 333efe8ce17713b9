//! The one retry policy every loop of caddy-fleet uses: exponential,
//! jittered, capped, and optionally bounded by a deadline.
//!
//! Every place that waits before trying again (a Caddy push, a checkpoint,
//! a publish, the durable consumer, the Docker event stream, a NATS
//! reconnect) takes a [`RetryPolicy`] constant and keeps a [`Retry`] for the
//! attempt in progress, so the constants live in one place and all of them
//! get jitter (appliers and publishers restarted together do not retry in
//! lockstep) and a deadline where giving up is the right answer.
//!
//! The delays come from `backon`'s exponential backoff with jitter: each
//! lies between the current base delay and twice it; the base starts at
//! `first` and doubles; no delay is longer than the cap, nor than what is
//! left before the deadline.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

/// How to wait between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first delay.
    pub first: Duration,
    /// No delay is longer than this.
    pub cap: Duration,
    /// Give up this long after the first failure (`None`: never).
    pub deadline: Option<Duration>,
}

impl RetryPolicy {
    /// A policy starting at `first`, doubling up to `cap`, never giving up.
    pub const fn new(first: Duration, cap: Duration) -> Self {
        RetryPolicy {
            first,
            cap,
            deadline: None,
        }
    }

    /// The same policy, giving up `deadline` after the first failure.
    pub const fn with_deadline(self, deadline: Duration) -> Self {
        RetryPolicy {
            deadline: Some(deadline),
            ..self
        }
    }

    /// Pushes to Caddy and its health checks: Caddy restarts in about a
    /// second, so retries start fast and stay frequent.
    pub const CADDY: RetryPolicy =
        RetryPolicy::new(Duration::from_millis(250), Duration::from_secs(10));
    /// NATS operations (publishing, consuming, checkpoints, reconnects).
    pub const NATS: RetryPolicy =
        RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(5));
    /// Restarting the log's sourcing of an ingest stream that stays
    /// stalled ([`crate::sources`]): a restart is given seconds to work.
    pub const SOURCE_RESTART: RetryPolicy =
        RetryPolicy::new(Duration::from_secs(5), Duration::from_secs(60));
    /// The Docker event stream: the engine restarting takes a while.
    pub const DOCKER: RetryPolicy =
        RetryPolicy::new(Duration::from_millis(250), Duration::from_secs(30));

    /// The delay before attempt `attempt` (1-based) of a run that keeps no
    /// state of its own (e.g. a client library's reconnect callback).
    pub fn nth_delay(&self, attempt: usize) -> Duration {
        let mut delays = self.delays();
        let mut delay = self.first;
        for _ in 0..attempt.clamp(1, 64) {
            delay = delays.next().unwrap_or(self.cap);
        }
        delay.min(self.cap)
    }

    /// A fresh sequence of delays.
    pub fn start(&self) -> Retry {
        Retry {
            policy: *self,
            delays: self.delays(),
            deadline: None,
            attempts: 0,
        }
    }

    fn delays(&self) -> ExponentialBackoff {
        // backon's jitter adds up to the delay itself, so the base delay
        // stops at half the cap: every delay lies in [base, 2·base] ≤ cap.
        ExponentialBuilder::new()
            .with_min_delay(self.first.min(self.cap / 2))
            .with_max_delay(self.cap / 2)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// The delays of one run of failures.
#[derive(Debug)]
pub struct Retry {
    policy: RetryPolicy,
    delays: ExponentialBackoff,
    /// When the first failure of this run plus the policy's deadline ends.
    deadline: Option<Instant>,
    attempts: u32,
}

impl Retry {
    /// How long to wait after a failure, or `None` once the deadline has
    /// passed (give up).
    pub fn next_delay(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self.deadline.is_none() {
            self.deadline = self.policy.deadline.map(|d| now + d);
        }
        self.attempts = self.attempts.saturating_add(1);
        let delay = self
            .delays
            .next()
            .unwrap_or(self.policy.cap)
            .min(self.policy.cap);
        match self.deadline {
            Some(deadline) if now >= deadline => None,
            Some(deadline) => Some(delay.min(deadline - now)),
            None => Some(delay),
        }
    }

    /// Waits [`Retry::next_delay`]; returns false (at once) once the
    /// deadline has passed.
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            None => false,
        }
    }

    /// Failures since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// A success: the next failure starts from the first delay again.
    pub fn reset(&mut self) {
        *self = self.policy.start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_grow_are_jittered_capped_and_stop_at_the_deadline() {
        let policy = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(1))
            .with_deadline(Duration::from_secs(5));
        let mut retry = policy.start();
        let first = retry.next_delay().unwrap();
        assert!(
            first >= Duration::from_millis(100) && first <= Duration::from_millis(200),
            "{first:?}"
        );
        let mut waited = Duration::ZERO;
        let mut seen = Vec::new();
        while let Some(delay) = retry.next_delay() {
            assert!(delay <= Duration::from_secs(1), "{delay:?}");
            seen.push(delay);
            tokio::time::advance(delay).await;
            waited += delay;
            assert!(seen.len() < 100, "the deadline never came");
        }
        // Gave up at the deadline, not before, and not much after.
        assert!(
            waited >= Duration::from_secs(5) - Duration::from_millis(1),
            "{waited:?}"
        );
        assert!(waited <= Duration::from_secs(5), "{waited:?}");
        // Jittered: not every capped delay is the same.
        assert!(seen.iter().any(|d| *d > Duration::from_millis(400)));
        retry.reset();
        assert_eq!(retry.attempts(), 0);
        assert!(retry.next_delay().unwrap() <= Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_it_never_gives_up() {
        let mut retry =
            RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(50)).start();
        for _ in 0..1000 {
            let delay = retry.next_delay().unwrap();
            assert!(delay <= Duration::from_millis(50));
            tokio::time::advance(delay).await;
        }
        assert_eq!(retry.attempts(), 1000);
    }
}
