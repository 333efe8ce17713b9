//! What the applier shows the world: `/healthz`, `/readyz`, `/metrics`
//! (Prometheus text), `/status` (JSON) and the dashboard at `/` (see
//! [`crate::dashboard`]), served on `STATUS_LISTEN`.

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::dashboard::Dashboard;
use crate::telemetry::{By, Stats};

/// The applier's state as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusView {
    /// The durable consumer is attached and reading.
    pub consumer_attached: bool,
    /// Caddy runs the config for the current state.
    pub converged: bool,
    /// The stream sequence of the state `routes` and `rejected` describe
    /// (the last one pushed to Caddy, or tried).
    pub last_seq: u64,
    /// The last stream sequence folded (consumption may be ahead of Caddy).
    pub folded_seq: u64,
    /// Messages waiting in the consumer.
    pub consumer_lag: Option<u64>,
    /// Every agent the log knows.
    pub agents: Vec<AgentView>,
    /// Every site in the config Caddy runs.
    pub routes: Vec<caddy_fleet_schema::routes::RouteRow>,
    /// Containers left out, with the reason.
    pub rejected: Vec<RejectedView>,
    /// The host patterns this applier serves (`APPLIER_DOMAINS`); `None`
    /// when it serves every site.
    pub shard: Option<Vec<String>>,
    /// Site addresses of served containers left to other shards.
    pub sites_outside_shard: usize,
}

/// One agent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentView {
    pub agent: String,
    pub host_address: Option<String>,
    /// The `sent_at_ms` of its latest heartbeat.
    pub last_heartbeat_ms: Option<u64>,
    /// Seconds since the applier last heard from it.
    pub silent_for_secs: u64,
    /// Unheard of for longer than `agent_stale_after`.
    pub stale: bool,
    /// Unheard of for longer than `agent_ttl`: its routes are removed.
    pub expired: bool,
    /// Its containers the log lists.
    pub containers: usize,
}

/// A container, as status names it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerRef {
    pub agent: String,
    pub container: String,
    pub container_id: String,
}

/// A container left out of the config.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RejectedView {
    #[serde(flatten)]
    pub container: ContainerRef,
    /// `labels` (translation failed), `policy` (not granted to its agent) or
    /// `caddy` (Caddy refused its blocks).
    pub by: &'static str,
    pub reason: String,
}

/// The shared status: written by the applier loop, read by the server.
#[derive(Debug, Default)]
pub struct StatusBoard {
    view: Mutex<StatusView>,
    /// The last sequence folded: set after every message, without a lock.
    folded_seq: std::sync::atomic::AtomicU64,
    pub stats: Stats,
    /// Counts changes, so readers (the dashboard's live updates) wait for
    /// one instead of polling.
    changes: tokio::sync::watch::Sender<u64>,
}

impl StatusBoard {
    /// A copy of the current view.
    pub fn view(&self) -> StatusView {
        let mut view = self.view.lock().map(|v| v.clone()).unwrap_or_default();
        view.folded_seq = self.folded_seq.load(std::sync::atomic::Ordering::Relaxed);
        view
    }

    /// Records that the log is folded up to `seq` (cheap: once per message).
    pub fn folded(&self, seq: u64) {
        self.folded_seq
            .store(seq, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes the view.
    pub fn update(&self, change: impl FnOnce(&mut StatusView)) {
        if let Ok(mut view) = self.view.lock() {
            change(&mut view);
        }
        self.notify();
    }

    /// Tells the readers waiting in [`StatusBoard::subscribe`] that
    /// something they show changed.
    pub fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that wakes at every change of the board.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The metrics in the OpenMetrics text format (Prometheus reads it).
    /// The gauges that describe the view are set from it here, so each
    /// figure has one source.
    pub fn metrics(&self) -> String {
        let view = self.view();
        let m = &self.stats.metrics;
        m.consumer_lag
            .set(view.consumer_lag.unwrap_or(0).min(i64::MAX as u64) as i64);
        m.last_seq.set(view.folded_seq.min(i64::MAX as u64) as i64);
        m.converged.set(i64::from(view.converged));
        m.rejected_containers.set(view.rejected.len() as i64);
        for by in ["labels", "policy", "caddy"] {
            let count = view.rejected.iter().filter(|r| r.by == by).count();
            m.refused_containers
                .get_or_create(&By { by: by.to_string() })
                .set(count as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
        out
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(board): State<Arc<StatusBoard>>) -> impl IntoResponse {
    let view = board.view();
    if view.consumer_attached && view.converged {
        (StatusCode::OK, "ready\n")
    } else if !view.consumer_attached {
        (StatusCode::SERVICE_UNAVAILABLE, "consumer not attached\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "Caddy not converged\n")
    }
}

async fn metrics(State(board): State<Arc<StatusBoard>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        board.metrics(),
    )
}

async fn status(State(board): State<Arc<StatusBoard>>) -> Json<StatusView> {
    Json(board.view())
}

/// Serves the status endpoints on `listener` until `shutdown` completes,
/// with a dashboard that has no log to read (no timeline).
pub async fn serve(
    listener: tokio::net::TcpListener,
    board: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, board, Dashboard::default(), shutdown).await
}

/// Serves the status endpoints and `dashboard` on `listener` until
/// `shutdown` completes. The dashboard's live streams end at shutdown, so
/// they never hold it up.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    board: Arc<StatusBoard>,
    dashboard: Dashboard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (closing, closed) = tokio::sync::watch::channel(false);
    let status = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(board.clone());
    let app = status.merge(crate::dashboard::router(board, dashboard, closed));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = closing.send(true);
        })
        .await
}
