//! The applier's observable happenings: each function logs one line and
//! bumps its counter together, so logs and metrics cannot drift apart.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use caddy_fleet_schema::translate::Rejected;
use caddy_fleet_schema::DecodeError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::converge::PushStages;

/// A metric's one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Reason {
    pub reason: String,
}

/// A stage of a push ([`PushStages`], and the render before it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Stage {
    /// `render`, `assemble`, `compose`, `adapt` (part of `compose`) or
    /// `load`.
    pub stage: String,
}

/// What a convergence did.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Outcome {
    /// `loaded` (Caddy accepted a config) or `failed`.
    pub outcome: String,
}

/// Who left a container out.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct By {
    pub by: String,
}

/// How the upstream DNS server answered a query.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Answer {
    /// `answered`, `empty`, `no_such_name`, `refused` or `malformed`.
    pub answer: String,
}

/// Every metric of one applier, in one registry: the only source of each
/// figure `/metrics` shows and [`Stats::snapshot`] reads.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub registry: Registry,
    pub events_folded: Counter,
    pub decode_errors: Counter,
    pub messages_skipped: Family<Reason, Counter>,
    pub pushes: Family<Outcome, Counter>,
    pub push_duration: Histogram,
    pub push_stage: Family<Stage, Histogram, fn() -> Histogram>,
    pub change_to_pushed: Histogram,
    pub checkpoints: Counter,
    pub source_restarts: Family<Reason, Counter>,
    pub log_answers: Gauge,
    pub rejected_containers: Gauge,
    pub refused_containers: Family<By, Gauge>,
    pub consumer_lag: Gauge,
    pub last_seq: Gauge,
    pub converged: Gauge,
    pub composed_configs: Counter,
    pub whole_adapts: Family<Reason, Counter>,
    pub site_adapts: Counter,
    pub dns_queries: Family<Answer, Counter>,
    pub dns_updates: Counter,
    pub dns_names: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("caddy_fleet");
        // 1 ms … about 33 s, doubling.
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let metrics = Metrics {
            registry: Registry::default(),
            events_folded: Counter::default(),
            decode_errors: Counter::default(),
            messages_skipped: Family::default(),
            pushes: Family::default(),
            push_duration: seconds(),
            push_stage: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            change_to_pushed: seconds(),
            checkpoints: Counter::default(),
            source_restarts: Family::default(),
            log_answers: Gauge::default(),
            rejected_containers: Gauge::default(),
            refused_containers: Family::default(),
            consumer_lag: Gauge::default(),
            last_seq: Gauge::default(),
            converged: Gauge::default(),
            composed_configs: Counter::default(),
            whole_adapts: Family::default(),
            site_adapts: Counter::default(),
            dns_queries: Family::default(),
            dns_updates: Counter::default(),
            dns_names: Gauge::default(),
        };
        registry.register(
            "events_folded",
            "Messages folded into the route state",
            metrics.events_folded.clone(),
        );
        registry.register(
            "decode_errors",
            "Messages skipped because they could not be decoded",
            metrics.decode_errors.clone(),
        );
        registry.register(
            "messages_skipped",
            "Messages skipped and acked: undecodable, too large, or not matching their subject (forged)",
            metrics.messages_skipped.clone(),
        );
        registry.register(
            "pushes",
            "Convergences that loaded a config into Caddy (outcome=loaded) or failed (outcome=failed)",
            metrics.pushes.clone(),
        );
        registry.register(
            "push_duration_seconds",
            "How long a convergence that loaded a config took (translate, adapt, load, isolation)",
            metrics.push_duration.clone(),
        );
        registry.register(
            "push_stage_seconds",
            "Where a push's time went: render (the state translated), assemble (the Caddyfile), compose (the JSON; adapt is its part waiting for Caddy to adapt sites alone), load (Caddy's /load)",
            metrics.push_stage.clone(),
        );
        registry.register(
            "change_to_pushed_seconds",
            "From the oldest change a push carries being folded to Caddy running it",
            metrics.change_to_pushed.clone(),
        );
        registry.register(
            "checkpoints",
            "Checkpoints written",
            metrics.checkpoints.clone(),
        );
        // Answering until a look says otherwise.
        metrics.log_answers.set(1);
        registry.register(
            "log_answers",
            "1 while the log answers (it has a leader: a majority of its NATS nodes), 0 while it does not",
            metrics.log_answers.clone(),
        );
        registry.register(
            "log_source_restarts",
            "Restarts of the log's sourcing of an ingest stream that stalled (log owner only), by why it was called stalled",
            metrics.source_restarts.clone(),
        );
        registry.register(
            "rejected_containers",
            "Containers left out of the config",
            metrics.rejected_containers.clone(),
        );
        registry.register(
            "refused_containers",
            "Containers left out of the config, by who refused them (labels, policy, caddy)",
            metrics.refused_containers.clone(),
        );
        registry.register(
            "consumer_lag",
            "Messages waiting in the durable consumer",
            metrics.consumer_lag.clone(),
        );
        registry.register(
            "last_seq",
            "Stream sequence of the last message folded",
            metrics.last_seq.clone(),
        );
        registry.register(
            "converged",
            "1 when Caddy runs the config for the current state",
            metrics.converged.clone(),
        );
        registry.register(
            "composed_configs",
            "Configs composed from per-site adapted shares instead of adapting the whole Caddyfile",
            metrics.composed_configs.clone(),
        );
        registry.register(
            "whole_adapts",
            "Configs adapted whole instead of composed, by reason",
            metrics.whole_adapts.clone(),
        );
        registry.register(
            "site_adapts",
            "Caddy adapts of one site alone (or of the global options), to compose configs from",
            metrics.site_adapts.clone(),
        );
        registry.register(
            "upstream_dns_queries",
            "Queries the upstream DNS server answered (UPSTREAMS=dynamic), by answer",
            metrics.dns_queries.clone(),
        );
        registry.register(
            "upstream_dns_updates",
            "Changes of the upstream DNS answers: upstream changes served with no push",
            metrics.dns_updates.clone(),
        );
        registry.register(
            "upstream_dns_names",
            "Names the upstream DNS server answers, one per dynamic handler",
            metrics.dns_names.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

/// Counters of one applier, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) metrics: Metrics,
    /// The containers left out at the last render, with their reasons.
    rejected: Mutex<Vec<Rejected>>,
    /// Which (subject agent, reason) pairs of skipped messages were logged.
    skipped: Mutex<SkippedMessages>,
    /// The kinds of whole-adapt reasons already logged at info.
    whole_kinds: Mutex<HashSet<&'static str>>,
    /// The latest pushes, newest last (at most [`RECENT_PUSHES`]).
    recent: Mutex<VecDeque<PushRecord>>,
}

/// How many pushes [`Stats::recent_pushes`] remembers.
pub const RECENT_PUSHES: usize = 50;

/// One push to Caddy, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PushRecord {
    /// When it ended, in unix milliseconds.
    pub at_ms: u64,
    /// `loaded` (Caddy runs the config) or `failed` (retried).
    pub outcome: &'static str,
    /// How long the convergence took (loaded).
    pub took_ms: Option<u64>,
    /// When it is tried again (failed).
    pub retry_in_ms: Option<u64>,
    /// Containers in the config pushed (loaded).
    pub containers: Option<usize>,
    /// From the oldest change it carried being folded to Caddy running it.
    pub since_change_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Each (agent, reason) pair of skipped messages is logged once, so an
/// agent that floods forgeries cannot flood the log too.
#[derive(Debug, Default)]
struct SkippedMessages {
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
        let m = &self.metrics;
        let outcome = |outcome: &str| {
            m.pushes
                .get_or_create(&Outcome {
                    outcome: outcome.to_string(),
                })
                .get()
        };
        StatsSnapshot {
            events_folded: m.events_folded.get(),
            decode_errors: m.decode_errors.get(),
            pushes: outcome("loaded"),
            push_failures: outcome("failed"),
            rejected_containers: m.rejected_containers.get().max(0) as u64,
            checkpoints: m.checkpoints.get(),
        }
    }

    /// How the configs of a convergence were made: composed from sites'
    /// shares, or adapted whole (each reason logged once per kind at info,
    /// then at debug).
    pub(crate) fn composed(&self, report: crate::converge::ComposeReport) {
        let m = &self.metrics;
        m.composed_configs.inc_by(report.composed);
        m.site_adapts.inc_by(report.site_adapts);
        for reason in report.whole {
            m.whole_adapts
                .get_or_create(&Reason {
                    reason: reason.kind.to_string(),
                })
                .inc();
            let first = self
                .whole_kinds
                .lock()
                .map(|mut kinds| kinds.insert(reason.kind))
                .unwrap_or(false);
            if first {
                tracing::info!(reason = %reason, "The config is adapted whole instead of composed from its sites.");
            } else {
                tracing::debug!(reason = %reason, "The config is adapted whole instead of composed from its sites.");
            }
        }
    }

    /// The upstream DNS answers changed (a deploy served with no push when
    /// the config did not change).
    pub(crate) fn answers_changed(&self, names: usize, upstreams: usize) {
        self.metrics.dns_updates.inc();
        self.metrics.dns_names.set(names as i64);
        tracing::debug!(names, upstreams, "Upstream DNS answers changed.");
    }

    /// The counter the upstream DNS server counts its answers with.
    pub(crate) fn dns_queries(&self) -> Family<Answer, Counter> {
        self.metrics.dns_queries.clone()
    }

    pub(crate) fn folded(&self) {
        self.metrics.events_folded.inc();
    }

    pub(crate) fn decode_failed(&self, seq: u64, subject: &str, error: &DecodeError) {
        self.metrics.decode_errors.inc();
        let reason = error.kind();
        self.metrics
            .messages_skipped
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
        let Ok(mut skipped) = self.skipped.lock() else {
            return;
        };
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

    /// Messages skipped for `reason` (a [`DecodeError::kind`]).
    pub fn skipped(&self, reason: &str) -> u64 {
        self.metrics
            .messages_skipped
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .get()
    }

    /// The latest pushes (at most [`RECENT_PUSHES`]), oldest first.
    pub fn recent_pushes(&self) -> Vec<PushRecord> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn remember_push(&self, record: PushRecord) {
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT_PUSHES {
                recent.pop_front();
            }
            recent.push_back(record);
        }
    }

    /// The containers left out of the config at the last render, and why.
    pub fn rejected(&self) -> Vec<Rejected> {
        self.rejected.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Records the containers left out of this render; logs each one when
    /// it is first left out and when it is back, not on every render.
    pub(crate) fn rendered(&self, rejected: Vec<Rejected>) {
        self.metrics.rejected_containers.set(rejected.len() as i64);
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
    pub(crate) fn caddy_check_timed_out(&self, error: &crate::caddy::CaddyError) {
        tracing::warn!(%error, "Caddy did not answer the check of its config in time (busy with a long load?); the config is checked again at the next tick.");
    }

    pub(crate) fn converged(
        &self,
        pushed: bool,
        took: Duration,
        latency: Option<Duration>,
        containers: usize,
        render: Duration,
        stages: PushStages,
    ) {
        if !pushed {
            return;
        }
        self.count_push("loaded");
        self.remember_push(PushRecord {
            at_ms: unix_ms(),
            outcome: "loaded",
            took_ms: Some(took.as_millis() as u64),
            retry_in_ms: None,
            containers: Some(containers),
            since_change_ms: latency.map(|l| l.as_millis() as u64),
            error: None,
        });
        self.metrics.push_duration.observe(took.as_secs_f64());
        if let Some(latency) = latency {
            self.metrics.change_to_pushed.observe(latency.as_secs_f64());
        }
        for (stage, spent) in [
            ("render", render),
            ("assemble", stages.assemble),
            ("compose", stages.compose),
            ("adapt", stages.adapt),
            ("load", stages.load),
        ] {
            self.metrics
                .push_stage
                .get_or_create(&Stage {
                    stage: stage.to_string(),
                })
                .observe(spent.as_secs_f64());
        }
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::info!(
            containers,
            took_ms = ms(took),
            since_change_ms = latency.map(ms),
            render_ms = ms(render),
            assemble_ms = ms(stages.assemble),
            compose_ms = ms(stages.compose),
            adapt_ms = ms(stages.adapt),
            load_ms = ms(stages.load),
            "Caddy config pushed."
        );
    }

    fn count_push(&self, outcome: &str) {
        self.metrics
            .pushes
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub(crate) fn checkpointed(&self, seq: u64, took: Duration) {
        self.metrics.checkpoints.inc();
        tracing::debug!(
            seq,
            took_ms = took.as_millis() as u64,
            "Checkpoint written."
        );
    }

    pub(crate) fn checkpoint_failed(&self, error: &dyn std::fmt::Display) {
        tracing::warn!(%error, "Checkpoint failed; messages stay unacked and will be retried.");
    }

    pub(crate) fn gap_filled(&self, from: u64, to: u64, read: usize) {
        tracing::warn!(from, to, read, "The consumer skipped messages (a leader change?); read them from the log in order before going on.");
    }

    pub(crate) fn gap_unfilled(&self, from: u64, to: u64, error: &dyn std::fmt::Display) {
        tracing::warn!(from, to, %error, "The consumer skipped messages and the log cannot be read now; waiting for the next delivery to try again.");
    }

    pub(crate) fn agent_expired(&self, agent: &str, silent: Duration) {
        tracing::warn!(%agent, silent_secs = silent.as_secs(), "Agent silent longer than AGENT_TTL: its routes are removed until it is heard again.");
    }

    /// The log's owner restarted its sourcing of `source` (an agent's
    /// ingest stream), which had stalled (`stall`) for `stalled_for` with
    /// `lag` messages pending.
    pub fn log_source_restarted(&self, source: &str, stall: &str, stalled_for: Duration, lag: u64) {
        self.metrics
            .source_restarts
            .get_or_create(&Reason {
                reason: stall.to_string(),
            })
            .inc();
        tracing::warn!(source, stall, stalled_for_ms = stalled_for.as_millis() as u64, lag,
            "The log's sourcing of an ingest stream had stopped (silent or no_progress: a leader change or partition? unsourced: its source entry lost to another writer of the log's configuration); restarted it, resuming after what the log holds.");
    }

    /// The log was looked at and answered or not (each consumption tick).
    pub(crate) fn log_answered(&self, answers: bool) {
        let before = self.metrics.log_answers.set(i64::from(answers));
        if before == 1 && !answers {
            tracing::warn!("The log does not answer (no majority of its NATS nodes, or none reachable): Caddy keeps serving what it runs, and agents' silence does not count against AGENT_TTL until it answers again.");
        } else if before == 0 && answers {
            tracing::info!("The log answers again.");
        }
    }

    /// The log's owner could not read or update the log to watch its sources.
    pub fn log_source_watch_failed(&self, error: &dyn std::fmt::Display) {
        tracing::warn!(%error, "Cannot watch the log's sources now (no log leader?); trying again.");
    }

    pub(crate) fn agent_back(&self, agent: &str) {
        tracing::info!(%agent, "Agent heard again: its routes are restored.");
    }

    pub(crate) fn caddy_lost_config(&self) {
        tracing::warn!("Caddy no longer runs the pushed config (restarted or changed by someone else); re-pushing.");
    }

    pub(crate) fn push_failed(&self, error: &dyn std::fmt::Display, retry_in: Duration) {
        self.count_push("failed");
        self.remember_push(PushRecord {
            at_ms: unix_ms(),
            outcome: "failed",
            took_ms: None,
            retry_in_ms: Some(retry_in.as_millis() as u64),
            containers: None,
            since_change_ms: None,
            error: Some(
                caddy_fleet_schema::limits::shortened(&error.to_string(), 1000).to_string(),
            ),
        });
        tracing::warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "Caddy push failed; will retry.");
    }
}

/// Now, in unix milliseconds.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
