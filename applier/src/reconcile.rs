//! The applier's loop: consume → fold → checkpoint → ack, and, separately,
//! coalesce → converge Caddy → watch that it stays converged.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use caddy_fleet_nats::async_nats::jetstream::stream::Stream as JsStream;
use caddy_fleet_nats::consume::{replay, ConsumeError};
use caddy_fleet_nats::Delivery;
use caddy_fleet_schema::caddyfile::{Caddyfile, ParseError};
use caddy_fleet_schema::routes::route_rows;
use caddy_fleet_schema::translate::{translate_owned, SiteOwners};
use caddy_fleet_schema::{AgentId, RouteState};
use tokio::time::Instant;

use crate::caddy::CaddyAdmin;
use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::config::ApplierConfig;
use crate::converge::{Converger, Outcome};
use crate::policy::{self, PolicyWatch};
use crate::source::LogSource;
use crate::status::{AgentView, ContainerRef, RejectedView, StatusBoard};
use crate::telemetry::Stats;

/// Why the applier stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplierError {
    #[error("invalid Caddy admin URL {url:?}: {source}")]
    CaddyClient { url: String, source: reqwest::Error },
    #[error("the base Caddyfile (CADDY_BASE_CADDYFILE) cannot be read: {0}")]
    BaseCaddyfile(#[from] ParseError),
    #[error(transparent)]
    Replay(#[from] ConsumeError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

const SUBJECTS: &str = "fleet.>";

fn fold(
    state: &mut RouteState,
    stats: &Stats,
    seq: u64,
    subject: &str,
    payload: &[u8],
) -> Option<AgentId> {
    match state.fold_message(seq, subject, payload) {
        Ok(agent) => {
            stats.folded();
            Some(agent)
        }
        Err(error) => {
            stats.decode_failed(seq, subject, &error);
            None
        }
    }
}

/// Restores the state an applier had: the newest checkpoint, then every
/// message after it up to `until` (the durable consumer's ack floor, or the
/// stream's end), folded with a read-only ordered consumer. Without a
/// checkpoint the whole stream is folded.
pub async fn recover(
    stream: &JsStream,
    checkpoints: &impl CheckpointStore,
    until: Option<u64>,
    stats: &Stats,
) -> Result<RouteState, ApplierError> {
    let started = std::time::Instant::now();
    let mut state = match checkpoints.load().await {
        Ok(Some(state)) => state,
        Ok(None) => RouteState::default(),
        Err(error) => {
            tracing::warn!(%error, "Checkpoint unreadable; rebuilding from the stream.");
            RouteState::default()
        }
    };
    let from_checkpoint = state.last_seq;
    let mut folded = 0u64;
    if until.is_none_or(|until| until > state.last_seq) {
        replay(stream, SUBJECTS, state.last_seq + 1, until, |d| {
            folded += 1;
            fold(&mut state, stats, d.seq, &d.subject, &d.payload);
        })
        .await?;
    }
    tracing::info!(
        checkpoint_seq = from_checkpoint,
        folded,
        last_seq = state.last_seq,
        containers = state.live_containers().count(),
        took_ms = started.elapsed().as_millis() as u64,
        "State recovered."
    );
    Ok(state)
}

/// Runs the applier until `shutdown` completes (or the source ends).
///
/// Messages are folded as they come and acknowledged only once a
/// checkpoint holds them. Caddy is converged from the state separately:
/// once a burst has settled, only when the config changed, and again
/// whenever Caddy is found not to run it. Failed pushes are retried with
/// capped backoff while consumption goes on.
pub async fn run<S: LogSource, C: CheckpointStore>(
    mut source: S,
    checkpoints: C,
    mut state: RouteState,
    mut config: ApplierConfig,
    board: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApplierError> {
    tokio::pin!(shutdown);
    let caddy =
        CaddyAdmin::new(&config.caddy_admin_url).map_err(|source| ApplierError::CaddyClient {
            url: config.caddy_admin_url.clone(),
            source,
        })?;
    let base = config
        .base_caddyfile
        .as_deref()
        .map(Caddyfile::parse)
        .transpose()?;
    let mut converger = Converger::new(caddy, base, &config.name);
    let stats = &board.stats;

    // Agents are given a full TTL from start before they can expire.
    let mut heard: HashMap<AgentId, Instant> = state
        .agents
        .keys()
        .map(|a| (a.clone(), Instant::now()))
        .collect();
    let mut expired: BTreeSet<AgentId> = BTreeSet::new();

    let mut unsaved = Unsaved {
        saved_seq: state.last_seq,
        ..Unsaved::default()
    };

    // The first push happens at once, so a restarted applier re-asserts its state.
    let mut push_at: Option<Instant> = Some(Instant::now());
    let mut burst_started: Option<Instant> = None;
    let mut retry = Duration::from_millis(250);
    // Which container serves each site, kept from render to render.
    let mut owners = SiteOwners::new();
    let mut policy_watch = config.policy_file.clone().map(PolicyWatch::new);
    let mut hangups = hangups();
    if !config.translate.policy.from_file() {
        tracing::warn!("No POLICY_FILE: only the local agent's containers are served; remote agents' containers are refused until a policy grants them (see SECURITY.md).");
    }
    let mut health = tokio::time::interval(config.health_check_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    board.update(|v| v.consumer_attached = true);

    loop {
        let far = Instant::now() + Duration::from_secs(3600);
        let push_deadline = push_at.unwrap_or(far);
        let checkpoint_deadline = unsaved
            .since
            .map_or(far, |t| t + config.checkpoint_interval);
        tokio::select! {
            // A message from the log: fold it, hold its ack until a
            // checkpoint covers it, and (re)start the quiet window, bounded
            // by the burst's maximum delay.
            delivery = source.next() => {
                let Some(delivery) = delivery else { break };
                if let Some(agent) = fold(&mut state, stats, delivery.seq, &delivery.subject, &delivery.payload) {
                    heard.insert(agent, Instant::now());
                }
                if delivery.seq <= unsaved.saved_seq {
                    // A redelivery of what a checkpoint already holds.
                    delivery.ack().await;
                    continue;
                }
                unsaved.hold(delivery);
                if push_at.is_none() {
                    // Caddy is about to lag behind the state.
                    board.update(|v| v.converged = false);
                }
                let now = Instant::now();
                let started = *burst_started.get_or_insert(now);
                push_at = Some((now + config.quiet_window).min(started + config.max_delay));
                if unsaved.count >= config.checkpoint_every {
                    unsaved.save(&checkpoints, &state, stats).await;
                }
            }
            // Messages wait for a checkpoint: write one, then ack.
            () = tokio::time::sleep_until(checkpoint_deadline), if unsaved.since.is_some() => {
                unsaved.save(&checkpoints, &state, stats).await;
            }
            // The burst settled (or a retry is due): converge Caddy.
            () = tokio::time::sleep_until(push_deadline), if push_at.is_some() => {
                burst_started = None;
                let (units, label_rejects, new_owners) = translate_owned(&state, &config.translate, &expired, &owners);
                owners = new_owners;
                stats.rendered(label_rejects);
                let started = std::time::Instant::now();
                match converger.converge(&units).await {
                    Ok(outcome) => {
                        if let Outcome::Pushed { .. } = outcome {
                            stats.pushed(started.elapsed(), units.len());
                        }
                        push_at = None;
                        retry = Duration::from_millis(250);
                    }
                    Err(error) => {
                        stats.push_failed(&error, retry);
                        push_at = Some(Instant::now() + retry);
                        retry = (retry * 2).min(Duration::from_secs(10));
                    }
                }
                publish_status(&board, &state, &units, &converger, &heard, &expired, &config, push_at.is_none());
            }
            // SIGHUP: re-read the policy now.
            Some(()) = hangups.recv() => {
                if let Some(watch) = &mut policy_watch {
                    watch.changed();
                    if reload_policy(watch, &mut config) {
                        push_at = Some(Instant::now());
                    }
                }
            }
            // Periodically: is Caddy still running our config, did an
            // agent go quiet or come back, did the policy file change, how
            // far behind are we.
            _ = health.tick() => {
                if let Some(watch) = &mut policy_watch {
                    if watch.changed() && reload_policy(watch, &mut config) {
                        push_at = Some(Instant::now());
                    }
                }
                if push_at.is_none() {
                    match converger.still_running().await {
                        Ok(true) => {}
                        Ok(false) => {
                            stats.caddy_lost_config();
                            converger.invalidate();
                            push_at = Some(Instant::now());
                        }
                        Err(error) => {
                            stats.push_failed(&error, retry);
                            converger.invalidate();
                            push_at = Some(Instant::now() + retry);
                        }
                    }
                }
                if let Some(ttl) = config.agent_ttl {
                    let now = Instant::now();
                    let mut now_expired = BTreeSet::new();
                    for agent in state.agents.keys() {
                        let last = *heard.entry(agent.clone()).or_insert(now);
                        if now.duration_since(last) > ttl {
                            now_expired.insert(agent.clone());
                        }
                    }
                    for agent in now_expired.difference(&expired) {
                        stats.agent_expired(agent.as_str(), now.duration_since(heard[agent]));
                    }
                    for agent in expired.difference(&now_expired) {
                        stats.agent_back(agent.as_str());
                    }
                    if now_expired != expired {
                        expired = now_expired;
                        push_at = Some(Instant::now());
                    }
                }
                let lag = source.lag().await;
                board.update(|v| {
                    v.consumer_lag = lag;
                    v.last_seq = state.last_seq;
                });
            }
            // Shutdown: checkpoint what was folded, ack it, stop.
            () = &mut shutdown => break,
        }
    }
    if unsaved.count > 0 {
        unsaved.save(&checkpoints, &state, stats).await;
    }
    board.update(|v| v.consumer_attached = false);
    Ok(())
}

/// Re-reads the policy file into `config`; on error keeps the policy in
/// force. Returns whether the policy changed.
fn reload_policy(watch: &PolicyWatch, config: &mut ApplierConfig) -> bool {
    match policy::load(watch.path()) {
        Ok(policy) => {
            let local = config.translate.policy.local().cloned();
            let policy = policy.with_local(local);
            if policy == config.translate.policy {
                return false;
            }
            tracing::info!(path = %watch.path().display(), "Policy reloaded.");
            config.translate.policy = policy;
            true
        }
        Err(error) => {
            tracing::error!(%error, "Policy not reloaded; the policy in force is kept.");
            false
        }
    }
}

/// SIGHUPs as a channel (never sends where there are no Unix signals).
fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                if tx.send(()).await.is_err() {
                    break;
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
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
        if checkpoint(store, state, stats).await {
            self.saved_seq = state.last_seq;
            self.count = 0;
            self.since = None;
            if let Some(last) = self.last.take() {
                last.ack().await;
            }
        } else {
            self.since = Some(Instant::now());
        }
    }
}

async fn checkpoint(store: &impl CheckpointStore, state: &RouteState, stats: &Stats) -> bool {
    let started = std::time::Instant::now();
    match store.save(state).await {
        Ok(()) => {
            stats.checkpointed(state.last_seq, started.elapsed());
            true
        }
        Err(error) => {
            stats.checkpoint_failed(&error);
            false
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn publish_status(
    board: &StatusBoard,
    state: &RouteState,
    units: &[caddy_fleet_schema::translate::ContainerUnit],
    converger: &Converger,
    heard: &HashMap<AgentId, Instant>,
    expired: &BTreeSet<AgentId>,
    config: &ApplierConfig,
    converged: bool,
) {
    // The routes Caddy runs: the state's table, limited to the containers
    // in the accepted config (not refused, not of an expired agent).
    let accepted = converger.accepted_ids();
    let mut routes = route_rows(state, units);
    for row in &mut routes {
        row.containers.retain(|c| {
            accepted.contains(c.container_id.as_str())
                && !expired.iter().any(|a| a.as_str() == c.agent)
        });
    }
    routes.retain(|row| !row.containers.is_empty());
    let mut rejected: Vec<RejectedView> = board
        .stats
        .rejected()
        .into_iter()
        .map(|r| RejectedView {
            container: ContainerRef {
                agent: r.agent,
                container: r.container,
                container_id: r.container_id,
            },
            by: r.by.as_str(),
            reason: r.reason,
        })
        .collect();
    rejected.extend(converger.refused().map(|r| RejectedView {
        container: ContainerRef {
            agent: r.agent.clone(),
            container: r.container.clone(),
            container_id: r.container_id.clone(),
        },
        by: if r.by_policy { "policy" } else { "caddy" },
        reason: r.reason.clone(),
    }));
    let now = Instant::now();
    let agents = state
        .agents
        .iter()
        .map(|(agent, record)| {
            let silent = heard
                .get(agent)
                .map_or(Duration::ZERO, |t| now.duration_since(*t));
            AgentView {
                agent: agent.to_string(),
                host_address: record.host_address.clone(),
                last_heartbeat_ms: record.last_heartbeat_ms,
                silent_for_secs: silent.as_secs(),
                stale: silent > config.agent_stale_after,
                expired: expired.contains(agent),
                containers: record.containers.values().filter(|c| c.listed).count(),
            }
        })
        .collect();
    board.update(|v| {
        v.converged = converged;
        v.last_seq = state.last_seq;
        v.routes = routes;
        v.rejected = rejected;
        v.agents = agents;
    });
}
