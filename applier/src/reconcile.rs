//! The applier: recovery (checkpoint + the messages after it) and the two
//! tasks it runs, consumption (consume → fold → checkpoint → ack) and
//! convergence (translate → push → watch that Caddy stays converged).

use std::future::Future;
use std::sync::Arc;

use caddy_fleet_nats::async_nats::jetstream::stream::Stream as JsStream;
use caddy_fleet_nats::consume::{replay, ConsumeError};
use caddy_fleet_schema::caddyfile::{Caddyfile, ParseError};
use caddy_fleet_schema::{AgentId, RouteState};

use crate::caddy::{CaddyAdmin, CaddyApi};
use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::config::ApplierConfig;
use crate::consumption::{self, ConsumptionConfig};
use crate::converge::Converger;
use crate::convergence;
use crate::source::LogSource;
use crate::status::StatusBoard;
use crate::telemetry::Stats;
use crate::upstream_dns::{AnswerBoard, UpstreamDns};

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
    #[error(transparent)]
    UpstreamDns(#[from] crate::upstream_dns::DnsError),
}

const SUBJECTS: &str = "fleet.>";

pub(crate) fn fold(
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
/// Two tasks joined by a [`consumption::hand_over`]: consumption (fold,
/// checkpoint, ack; on this task) and convergence (translate, push,
/// isolate, self-heal; spawned). Messages are acknowledged only once a
/// checkpoint holds them; Caddy is pushed the newest state as soon as the
/// previous push ended. At shutdown consumption writes its last checkpoint
/// and convergence is dropped wherever it is (Caddy keeps the config it
/// runs).
pub async fn run<S: LogSource, C: CheckpointStore>(
    source: S,
    checkpoints: C,
    state: RouteState,
    config: ApplierConfig,
    board: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApplierError> {
    let caddy =
        CaddyAdmin::new(&config.caddy_admin_url).map_err(|source| ApplierError::CaddyClient {
            url: config.caddy_admin_url.clone(),
            source,
        })?;
    run_with_caddy(source, checkpoints, state, config, caddy, board, shutdown).await
}

/// [`run`], converging the given Caddy.
pub async fn run_with_caddy<S: LogSource, C: CheckpointStore, A: CaddyApi + 'static>(
    source: S,
    checkpoints: C,
    state: RouteState,
    mut config: ApplierConfig,
    caddy: A,
    board: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApplierError> {
    // Dynamic upstreams: answer DNS before the first push names it.
    let mut dns = None;
    if let Some(dynamic) = config.translate.dynamic_upstreams.as_mut() {
        let answers = AnswerBoard::new(dynamic.refresh);
        let server =
            UpstreamDns::bind(dynamic.resolver, &answers, board.stats.dns_queries()).await?;
        // Port 0 asked for any free port: Caddy must dial the one bound.
        dynamic.resolver = server.local_addr();
        tracing::info!(listen = %server.local_addr(), "Answering DNS for dynamic upstreams (UPSTREAMS=dynamic).");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        dns = Some((answers, stop, task));
    }
    let answers = dns.as_ref().map(|(answers, _, _)| answers.clone());
    let base = config
        .base_caddyfile
        .as_deref()
        .map(Caddyfile::parse)
        .transpose()?;
    let converger = Converger::new(caddy, base, &config.name);
    let (owner, handle) = consumption::hand_over();
    let consumption_config = ConsumptionConfig {
        checkpoint_interval: config.checkpoint_interval,
        checkpoint_every: config.checkpoint_every,
        tick: config.health_check_interval,
        agent_ttl: config.agent_ttl,
        agent_stale_after: config.agent_stale_after,
    };
    let convergence = tokio::spawn({
        let board = board.clone();
        async move { convergence::run(converger, handle, config, &board, answers).await }
    });
    consumption::run(
        source,
        checkpoints,
        state,
        consumption_config,
        owner,
        board,
        shutdown,
    )
    .await;
    convergence.abort();
    let _ = convergence.await;
    if let Some((_, stop, task)) = dns {
        let _ = stop.send(());
        let _ = task.await;
    }
    Ok(())
}
