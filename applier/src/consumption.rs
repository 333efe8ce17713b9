//! The consumption task: read the log, fold it, checkpoint, ack; and keep
//! the agents' liveness. It never talks to Caddy, so nothing Caddy does
//! (hanging, refusing, restarting, a long isolation) can delay reading,
//! acking, checkpointing or stopping.
//!
//! It hands the state to the convergence task through a [`StateHandle`]:
//! a `watch` of a change counter, bumped by every fold and every change of
//! the set of expired agents, and a request channel on which convergence
//! asks for a [`Snapshot`] once it is ready to push. The state is copied
//! only then, once per push rather than once per message, and convergence
//! always gets the newest state.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use caddy_fleet_nats::{Delivery, LogHealth};
use caddy_fleet_schema::{AgentId, RouteState};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::checkpoint::CheckpointStore;
use crate::reconcile::fold;
use crate::source::LogSource;
use crate::status::{AgentView, StatusBoard};
use crate::telemetry::Stats;

/// What convergence works from: the state at one moment, and which agents'
/// routes are removed for being silent.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: RouteState,
    /// Agents silent for longer than `AGENT_TTL`.
    pub expired: BTreeSet<AgentId>,
    /// When the oldest change not in an earlier snapshot was folded.
    pub changed_since: Option<Instant>,
}

/// Convergence's side of the hand-over.
pub struct StateHandle {
    changes: watch::Receiver<u64>,
    requests: mpsc::Sender<oneshot::Sender<Snapshot>>,
}

impl StateHandle {
    /// Waits until the state changed since the last snapshot taken; `false`
    /// once consumption has stopped.
    pub async fn changed(&mut self) -> bool {
        self.changes.changed().await.is_ok()
    }

    /// The newest state; `None` once consumption has stopped.
    pub async fn snapshot(&mut self) -> Option<Snapshot> {
        // Whatever changed up to now is in this snapshot.
        self.changes.borrow_and_update();
        let (reply, answer) = oneshot::channel();
        self.requests.send(reply).await.ok()?;
        answer.await.ok()
    }

    /// Whether the state changed since the last snapshot taken.
    pub fn has_changed(&self) -> bool {
        self.changes.has_changed().unwrap_or(false)
    }
}

/// Consumption's side of the hand-over.
pub struct StateOwner {
    changes: watch::Sender<u64>,
    requests: mpsc::Receiver<oneshot::Sender<Snapshot>>,
}

/// A linked [`StateOwner`] and [`StateHandle`].
pub fn hand_over() -> (StateOwner, StateHandle) {
    let (changes_tx, changes_rx) = watch::channel(0);
    let (requests_tx, requests_rx) = mpsc::channel(1);
    (
        StateOwner {
            changes: changes_tx,
            requests: requests_rx,
        },
        StateHandle {
            changes: changes_rx,
            requests: requests_tx,
        },
    )
}

/// How consumption behaves.
#[derive(Debug, Clone)]
pub struct ConsumptionConfig {
    pub checkpoint_interval: Duration,
    pub checkpoint_every: u64,
    /// How often agents' liveness and the consumer's lag are looked at.
    pub tick: Duration,
    pub agent_ttl: Option<Duration>,
    pub agent_stale_after: Duration,
}

/// Runs consumption until `shutdown` completes or the source ends; then
/// writes a last checkpoint of what was folded and acks it.
pub async fn run<S: LogSource, C: CheckpointStore>(
    mut source: S,
    checkpoints: C,
    mut state: RouteState,
    config: ConsumptionConfig,
    mut owner: StateOwner,
    board: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let stats = &board.stats;
    // Agents are given a full TTL from start before they can expire.
    let mut liveness = Liveness::new(&state, config.tick);
    let mut unsaved = Unsaved {
        saved_seq: state.last_seq,
        ..Unsaved::default()
    };
    let mut changed_since: Option<Instant> = None;
    let mut last_delivery = Instant::now();
    let mut tick = tokio::time::interval(config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    board.update(|v| v.consumer_attached = true);
    board.folded(state.last_seq);
    loop {
        let checkpoint_due = unsaved
            .since
            .map(|t| t + config.checkpoint_interval)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // A message from the log: fold it, tell convergence, and hold
            // its ack until a checkpoint covers it.
            delivery = source.next() => {
                let Some(delivery) = delivery else { break };
                last_delivery = Instant::now();
                // Everything before it first, in order: a durable consumer
                // may deliver past messages it redelivers only later.
                if delivery.seq > state.last_seq + 1 {
                    match source.read_range(state.last_seq + 1, delivery.seq - 1).await {
                        Ok(missing) => {
                            if !missing.is_empty() {
                                stats.gap_filled(state.last_seq + 1, delivery.seq - 1, missing.len());
                            }
                            fold_all(&mut state, &mut liveness, stats, missing);
                        }
                        Err(error) => {
                            // Not folded, not held: the next delivery
                            // tries again, this one included.
                            stats.gap_unfilled(state.last_seq + 1, delivery.seq, &error);
                            continue;
                        }
                    }
                }
                if let Some(agent) = fold(&mut state, stats, delivery.seq, &delivery.subject, &delivery.payload) {
                    liveness.heard(agent);
                }
                board.folded(state.last_seq);
                changed_since.get_or_insert_with(Instant::now);
                owner.changes.send_modify(|n| *n += 1);
                if delivery.seq <= unsaved.saved_seq {
                    // A redelivery of what a checkpoint already holds.
                    delivery.ack().await;
                    continue;
                }
                unsaved.hold(delivery);
                if unsaved.count >= config.checkpoint_every {
                    tokio::select! {
                        // Written (or failed, to be tried again).
                        () = unsaved.save(&checkpoints, &state, stats) => {}
                        // Shutdown while NATS is slow: stop trying here.
                        () = &mut shutdown => break,
                    }
                }
            }
            // Convergence is ready to push: hand it the newest state.
            Some(reply) = owner.requests.recv() => {
                let _ = reply.send(Snapshot {
                    state: state.clone(),
                    expired: liveness.expired.clone(),
                    changed_since: changed_since.take(),
                });
            }
            // Messages wait for a checkpoint: write one, then ack.
            () = tokio::time::sleep_until(checkpoint_due), if unsaved.since.is_some() => {
                tokio::select! {
                    // Written (or failed, to be tried again).
                    () = unsaved.save(&checkpoints, &state, stats) => {}
                    // Shutdown while NATS is slow: stop trying here.
                    () = &mut shutdown => break,
                }
            }
            // Periodically: did an agent go quiet or come back, how far
            // behind are we.
            _ = tick.tick() => {
                // Quiet, yet the log goes further than the state: a
                // delivery was lost in flight and would come back only
                // after `ack_wait`. Read the rest from the log now.
                if last_delivery.elapsed() >= STALLED {
                    let end = tokio::time::timeout(LAG_TIMEOUT, source.log_end()).await.ok().flatten();
                    if let Some(end) = end.filter(|end| *end > state.last_seq) {
                        let from = state.last_seq + 1;
                        if let Ok(Ok(missing)) = tokio::time::timeout(LAG_TIMEOUT * 5, source.read_range(from, end)).await {
                            if !missing.is_empty() {
                                stats.gap_filled(from, end, missing.len());
                                fold_all(&mut state, &mut liveness, stats, missing);
                                board.folded(state.last_seq);
                                changed_since.get_or_insert_with(Instant::now);
                                owner.changes.send_modify(|n| *n += 1);
                            }
                        }
                    }
                }
                // NATS down must not hold the loop (or shutdown) for long.
                let lag = tokio::time::timeout(LAG_TIMEOUT, source.lag()).await.ok().flatten();
                // Whether the log has a majority (a consumer's answer alone
                // does not say: a replica can answer without one).
                let health = tokio::time::timeout(LAG_TIMEOUT, source.log_health())
                    .await
                    .unwrap_or_default();
                liveness.looked(&health);
                stats.log_answered(health.answers);
                if liveness.expire(&state, config.agent_ttl, stats) {
                    changed_since.get_or_insert_with(Instant::now);
                    owner.changes.send_modify(|n| *n += 1);
                }
                let agents = liveness.views(&state, config.agent_stale_after);
                board.update(|v| {
                    v.consumer_lag = lag;
                    v.agents = agents;
                });
            }
            // Shutdown: checkpoint what was folded, ack it, stop.
            () = &mut shutdown => break,
        }
    }
    if unsaved.count > 0 {
        // Bounded: with NATS down, what is not saved stays unacked and is
        // redelivered to the next run, which ignores what it already holds.
        let saved =
            tokio::time::timeout(LAST_CHECKPOINT, unsaved.save(&checkpoints, &state, stats));
        if saved.await.is_err() {
            tracing::warn!(
                unsaved = unsaved.count,
                "Last checkpoint not written in time; those messages will be redelivered."
            );
        }
    }
    board.update(|v| v.consumer_attached = false);
}

/// Folds messages read from the log past the consumer, in order.
fn fold_all(
    state: &mut RouteState,
    liveness: &mut Liveness,
    stats: &Stats,
    messages: Vec<Delivery>,
) {
    for m in messages {
        if let Some(agent) = fold(state, stats, m.seq, &m.subject, &m.payload) {
            liveness.heard(agent);
        }
    }
}

/// No delivery for this long while the log goes further than the state:
/// the rest is read from the log.
const STALLED: Duration = Duration::from_secs(3);
/// How long asking NATS for the consumer's lag may take.
const LAG_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the last checkpoint at shutdown may take: stopping stays
/// within 5 s (`docker stop` kills at 10) with NATS down.
const LAST_CHECKPOINT: Duration = Duration::from_secs(3);

/// When each agent was last heard from, and which are expired. Time while
/// the log does not answer is not silence: an agent cannot be heard then,
/// so its clock stops (an outage of the log's majority expires nobody).
struct Liveness {
    heard: HashMap<AgentId, Instant>,
    expired: BTreeSet<AgentId>,
    /// When the log was last looked at ([`Liveness::looked`]).
    last_look: Instant,
    /// How it stood then.
    last_health: LogHealth,
    /// The most of one gap between looks that counts as silence: twice
    /// the look interval.
    counted: Duration,
}

impl Liveness {
    fn new(state: &RouteState, look_interval: Duration) -> Self {
        let now = Instant::now();
        Liveness {
            heard: state.agents.keys().map(|a| (a.clone(), now)).collect(),
            expired: BTreeSet::new(),
            last_look: now,
            last_health: LogHealth {
                answers: true,
                waiting: Vec::new(),
            },
            counted: look_interval * 2,
        }
    }

    /// The log was looked at now and stood as `health` says. The time
    /// since the last look counts as an agent's silence only when the log
    /// answered, and sourced the agent, at both looks, and only up to
    /// [`Liveness::counted`]: looks can be far apart (the loop waits on a
    /// checkpoint write while NATS is down, and the first look after it
    /// may find the log back), and what happened in between is not known.
    fn looked(&mut self, health: &LogHealth) {
        let now = Instant::now();
        let gap = now.duration_since(self.last_look);
        let unknown = if health.answers && self.last_health.answers {
            gap.saturating_sub(self.counted)
        } else {
            gap
        };
        let pause = |heard: &mut Instant, by: Duration| *heard = (*heard + by).min(now);
        self.heard
            .values_mut()
            .for_each(|heard| pause(heard, unknown));
        for agent in health.waiting.iter().chain(&self.last_health.waiting) {
            if let Some(heard) = self.heard.get_mut(agent) {
                pause(heard, gap);
            }
        }
        self.last_look = now;
        self.last_health = health.clone();
    }

    fn heard(&mut self, agent: AgentId) {
        self.heard.insert(agent, Instant::now());
    }

    /// Recomputes which agents are expired; whether that changed.
    fn expire(&mut self, state: &RouteState, ttl: Option<Duration>, stats: &Stats) -> bool {
        let Some(ttl) = ttl else { return false };
        let now = Instant::now();
        let mut expired = BTreeSet::new();
        for agent in state.agents.keys() {
            let last = *self.heard.entry(agent.clone()).or_insert(now);
            if now.duration_since(last) > ttl {
                expired.insert(agent.clone());
            }
        }
        for agent in expired.difference(&self.expired) {
            stats.agent_expired(agent.as_str(), now.duration_since(self.heard[agent]));
        }
        for agent in self.expired.difference(&expired) {
            stats.agent_back(agent.as_str());
        }
        if expired == self.expired {
            return false;
        }
        self.expired = expired;
        true
    }

    fn views(&self, state: &RouteState, stale_after: Duration) -> Vec<AgentView> {
        let now = Instant::now();
        state
            .agents
            .iter()
            .map(|(agent, record)| {
                let silent = self
                    .heard
                    .get(agent)
                    .map_or(Duration::ZERO, |t| now.duration_since(*t));
                AgentView {
                    agent: agent.to_string(),
                    host_address: record.host_address.clone(),
                    last_heartbeat_ms: record.last_heartbeat_ms,
                    silent_for_secs: silent.as_secs(),
                    stale: silent > stale_after,
                    expired: self.expired.contains(agent),
                    containers: record.containers.values().filter(|c| c.listed).count(),
                }
            })
            .collect()
    }
}

/// Messages folded but not yet held by a checkpoint, and the cumulative ack
/// that will cover them once one is written.
#[derive(Default)]
struct Unsaved {
    /// The sequence the newest checkpoint holds.
    saved_seq: u64,
    /// The last message folded; acking it acks every one before it.
    last: Option<Delivery>,
    /// How many messages wait.
    count: u64,
    /// Since when the oldest of them waits (or the last failed write).
    since: Option<Instant>,
}

impl Unsaved {
    fn hold(&mut self, delivery: Delivery) {
        self.last = Some(delivery);
        self.count += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    /// Writes a checkpoint of `state` and acks what it holds; on failure
    /// keeps everything and tries again one interval later.
    async fn save(&mut self, store: &impl CheckpointStore, state: &RouteState, stats: &Stats) {
        let started = std::time::Instant::now();
        match store.save(state).await {
            Ok(()) => {
                stats.checkpointed(state.last_seq, started.elapsed());
                self.saved_seq = state.last_seq;
                self.count = 0;
                self.since = None;
                if let Some(last) = self.last.take() {
                    last.ack().await;
                }
            }
            Err(error) => {
                stats.checkpoint_failed(&error);
                self.since = Some(Instant::now());
            }
        }
    }
}
