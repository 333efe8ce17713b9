//! The applier's observable happenings: each function logs one line and
//! bumps its counter together, so logs and metrics cannot drift apart.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use caddy_fleet_schema::translate::Rejected;
use caddy_fleet_schema::DecodeError;

/// Counters of one applier, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages folded into the state.
    pub events_folded: AtomicU64,
    /// Messages that could not be decoded (skipped and acked).
    pub decode_errors: AtomicU64,
    /// Configs Caddy accepted.
    pub pushes: AtomicU64,
    /// Pushes Caddy or the network refused.
    pub push_failures: AtomicU64,
    /// Containers left out of the config because of their labels, at the last render.
    pub rejected_containers: AtomicU64,
    /// Duration of the last successful push, in microseconds.
    pub last_push_micros: AtomicU64,
    /// Checkpoints written.
    pub checkpoints: AtomicU64,
    /// The containers left out at the last render, with their reasons.
    rejected: Mutex<Vec<Rejected>>,
    /// Skipped messages by reason ([`DecodeError::kind`]), and which
    /// (subject agent, reason) pairs were already logged.
    skipped: Mutex<SkippedMessages>,
}

/// Skipped messages by reason; each (agent, reason) pair is logged once, so
/// an agent that floods forgeries cannot flood the log too.
#[derive(Debug, Default)]
struct SkippedMessages {
    by_reason: BTreeMap<&'static str, u64>,
    logged: HashSet<(String, &'static str)>,
}

/// How many (agent, reason) pairs are remembered as logged; beyond it,
/// skipped messages are only counted.
const LOGGED_PAIRS: usize = 4096;

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub events_folded: u64,
    pub decode_errors: u64,
    pub pushes: u64,
    pub push_failures: u64,
    pub rejected_containers: u64,
    pub checkpoints: u64,
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            events_folded: self.events_folded.load(Ordering::Relaxed),
            decode_errors: self.decode_errors.load(Ordering::Relaxed),
            pushes: self.pushes.load(Ordering::Relaxed),
            push_failures: self.push_failures.load(Ordering::Relaxed),
            rejected_containers: self.rejected_containers.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn folded(&self) {
        self.events_folded.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn decode_failed(&self, seq: u64, subject: &str, error: &DecodeError) {
        self.decode_errors.fetch_add(1, Ordering::Relaxed);
        let reason = error.kind();
        let Ok(mut skipped) = self.skipped.lock() else {
            return;
        };
        *skipped.by_reason.entry(reason).or_default() += 1;
        // The agent token of the subject, whatever the payload claims.
        let agent = subject.split('.').nth(1).unwrap_or("");
        let agent = caddy_fleet_schema::limits::shortened(agent, 64);
        if skipped.logged.len() < LOGGED_PAIRS && skipped.logged.insert((agent.to_string(), reason))
        {
            let subject = caddy_fleet_schema::limits::shortened(subject, 200);
            tracing::error!(seq, %subject, %agent, reason, %error,
                "Message skipped and acked; further ones from this agent for this reason are only counted (caddy_fleet_messages_skipped_total).");
        }
    }

    /// Skipped messages by reason.
    pub fn skipped_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.skipped
            .lock()
            .map(|s| s.by_reason.clone())
            .unwrap_or_default()
    }

    /// The containers left out of the config at the last render, and why.
    pub fn rejected(&self) -> Vec<Rejected> {
        self.rejected.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Records the containers left out of this render; logs each one when
    /// it is first left out and when it is back, not on every render.
    pub(crate) fn rendered(&self, rejected: Vec<Rejected>) {
        self.rejected_containers
            .store(rejected.len() as u64, Ordering::Relaxed);
        let Ok(mut previous) = self.rejected.lock() else {
            return;
        };
        for r in rejected.iter().filter(|r| !previous.contains(r)) {
            tracing::warn!(agent = %r.agent, container = %r.container, container_id = %r.container_id,
                by = r.by.as_str(), reason = %r.reason, "Container left out of the Caddy config.");
        }
        for r in previous
            .iter()
            .filter(|p| !rejected.iter().any(|r| r.container_id == p.container_id))
        {
            tracing::info!(agent = %r.agent, container = %r.container, container_id = %r.container_id,
                "Container no longer left out of the Caddy config.");
        }
        *previous = rejected;
    }

    /// A convergence ended well: `pushed` when a config was loaded (else
    /// Caddy already ran it); `took` is the convergence, `latency` the time
    /// from the oldest change it holds being folded to now.
    pub(crate) fn converged(
        &self,
        pushed: bool,
        took: Duration,
        latency: Option<Duration>,
        containers: usize,
    ) {
        if !pushed {
            return;
        }
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.last_push_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
        tracing::info!(
            containers,
            took_ms = took.as_millis() as u64,
            since_change_ms = latency.map(|l| l.as_millis() as u64),
            "Caddy config pushed."
        );
    }

    pub(crate) fn checkpointed(&self, seq: u64, took: Duration) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            seq,
            took_ms = took.as_millis() as u64,
            "Checkpoint written."
        );
    }

    pub(crate) fn checkpoint_failed(&self, error: &dyn std::fmt::Display) {
        tracing::warn!(%error, "Checkpoint failed; messages stay unacked and will be retried.");
    }

    pub(crate) fn agent_expired(&self, agent: &str, silent: Duration) {
        tracing::warn!(%agent, silent_secs = silent.as_secs(), "Agent silent longer than AGENT_TTL: its routes are removed until it is heard again.");
    }

    pub(crate) fn agent_back(&self, agent: &str) {
        tracing::info!(%agent, "Agent heard again: its routes are restored.");
    }

    pub(crate) fn caddy_lost_config(&self) {
        tracing::warn!("Caddy no longer runs the pushed config (restarted or changed by someone else); re-pushing.");
    }

    pub(crate) fn push_failed(&self, error: &dyn std::fmt::Display, retry_in: Duration) {
        self.push_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "Caddy push failed; will retry.");
    }
}
