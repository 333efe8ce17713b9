//! The applier: the only writer of Caddy's config. It reads the log, folds
//! it into [`caddy_fleet_schema::RouteState`], translates the state into a
//! Caddyfile merged with the user's base, and converges Caddy to it.
//!
//! - [`config`]: [`ApplierConfig`], the applier's settings.
//! - [`caddy`]: [`caddy::CaddyAdmin`], a small client for Caddy's admin API.
//! - [`source`]: [`source::LogSource`], where messages come from (the durable
//!   consumer, or an in-process channel).
//! - [`telemetry`]: every log line that has a metric, emitted with it.
//! - [`checkpoint`]: checkpoints of the fold in a NATS object store.
//! - [`policy`]: reading and re-reading the policy file.
//! - [`converge`]: pushing to Caddy, the sentinel, and isolating refused containers.
//! - [`status`]: `/healthz`, `/readyz`, `/metrics`, `/status`.
//! - [`dashboard`]: the page at `/`, live from the status board, with a
//!   timeline read from the log through [`dashboard::LogReads`].
//! - [`consumption`]: the consume → fold → checkpoint → ack task, which
//!   hands snapshots of the state to [`convergence`]: the task that pushes
//!   the newest state to Caddy as soon as the previous push ended.
//! - [`memory`]: giving the memory a push freed back to the system.
//! - [`upstream_dns`]: the DNS server Caddy's dynamic upstreams ask
//!   (`UPSTREAMS=dynamic`), answering from the converged state.
//! - [`run`]: both tasks joined; [`recover`]: checkpoint + the messages
//!   after it.

pub mod caddy;
pub mod checkpoint;
pub mod compose;
pub mod config;
pub mod consumption;
pub mod converge;
pub mod convergence;
pub mod dashboard;
pub mod memory;
pub mod policy;
mod reconcile;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod upstream_dns;

#[cfg(test)]
mod runtime_tests;

pub use checkpoint::{CheckpointStore, NoCheckpoints, ObjectStoreCheckpoints};
pub use config::ApplierConfig;
pub use reconcile::{recover, run, run_with_caddy, ApplierError};
pub use status::StatusBoard;
pub use telemetry::Stats;
