//! caddy-fleet's read-only debugging commands: the route table now, the
//! history of a domain, agent or container, the state at any point, the
//! difference between two points, and why a domain routes where it does.
//!
//! - [`point`]: [`Point`], a place in the log (`--at`, `--since`, …).
//! - [`log`]: [`LogReader`], reading the log and folding it from the
//!   nearest checkpoint or snapshot the applier's store keeps.
//! - [`commands`]: the commands, each a fold plus a derivation from
//!   `caddy_fleet_schema` (`routes`, `history`), and their text rendering;
//!   [`run`] answers one [`Inspect`] command.
//! - [`status`]: [`live_routes`], a live applier's `/status`.
//!
//! Everything here reads with ephemeral ordered consumers, direct gets and
//! the applier's checkpoint objects; it never creates, moves or acks the
//! applier's durable consumer, creates no bucket, and never talks to Caddy
//! except, for `replay --format json`, Caddy's side-effect-free `/adapt`.
//! What the stream and the bucket are called comes in [`InspectConfig`],
//! from the settings.
//!
//! **Dependencies:** this crate uses `schema`, `nats` and `applier` (its
//! checkpoint store and Caddy client), never the publisher, the modes or
//! the binary (`tests/architecture.rs` checks it).

use std::path::PathBuf;

use caddy_fleet_applier::checkpoint::CheckpointError;
use caddy_fleet_nats::async_nats::jetstream;
use caddy_fleet_nats::{ConnectError, ConsumeError, NatsConfig};
use caddy_fleet_schema::translate::TranslateOptions;

pub mod commands;
pub mod log;
pub mod point;
pub mod status;

pub use commands::{
    diff_between, explain_at, history, history_after, routes_at, run, Difference, Explanation,
    HistoryLine, Inspect, ReplayFormat, TimedRoutes,
};
pub use log::{FoldStart, FoldStats, LogReader, StateAt};
pub use point::Point;
pub use status::live_routes;

/// Where the debugging commands look, and how they read what they find;
/// built from the settings (`Settings::inspect_config`).
#[derive(Debug, Clone)]
pub struct InspectConfig {
    /// The fleet's NATS.
    pub nats: NatsConfig,
    /// The log's stream name.
    pub stream: String,
    /// The applier's checkpoint bucket.
    pub checkpoint_bucket: String,
    /// The applier whose checkpoint and snapshots folds start from; `None`
    /// folds from the start of the log.
    pub applier_name: Option<String>,
    /// A live applier's status endpoint, e.g. `http://127.0.0.1:9180`.
    pub status_url: String,
    /// How labels are read and what the policy grants, as the applier does.
    pub translate: TranslateOptions,
    /// The base Caddyfile (`replay --format caddyfile|json`).
    pub base_caddyfile: Option<PathBuf>,
    /// Caddy's admin API, for `/adapt` (`replay --format json`).
    pub caddy_api_url: String,
}

/// Why a debugging command could not answer.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("no stream {stream} on this NATS ({source}): is NATS_URL the fleet's NATS, and has an applier started once?")]
    NoStream {
        stream: String,
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot read the log's state: {0}")]
    Info(#[from] jetstream::stream::InfoError),
    #[error("cannot read the log: {0}")]
    Read(#[from] ConsumeError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "{point} is before the retained history, which starts at {start}; ask for a later point"
    )]
    BeforeHistory { point: String, start: String },
    #[error("{0:?} is not a point in the log: give an RFC 3339 time (2026-11-27T10:00:00Z), a stream sequence (1234), a duration back from now (2h, 30m, 90s) or `now`")]
    BadPoint(String),
    #[error("no container in the log names {domain} at sequence {seq}; `caddy-fleet routes` lists the sites")]
    UnknownDomain { domain: String, seq: u64 },
    #[error("cannot read CADDY_BASE_CADDYFILE {path}: {source}")]
    BaseCaddyfileRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CADDY_BASE_CADDYFILE {path} does not parse: {source}")]
    BaseCaddyfileParse {
        path: PathBuf,
        source: caddy_fleet_schema::caddyfile::ParseError,
    },
    #[error("--format json needs Caddy's /adapt at {url}: {source} (set CADDY_API_URL, or use --format caddyfile)")]
    AdaptClient { url: String, source: reqwest::Error },
    #[error(
        "--format json needs Caddy's /adapt: {0} (set CADDY_API_URL, or use --format caddyfile)"
    )]
    Adapt(#[from] caddy_fleet_applier::caddy::CaddyError),
}
