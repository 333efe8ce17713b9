//! The applier: the only writer of Caddy's config. It reads the log, folds
//! it into [`caddy_fleet_schema::RouteState`], translates the state into a
//! Caddyfile merged with the user's base, and converges Caddy to it.
//!
//! - [`config`]: [`ApplierConfig`], the applier's settings.
//! - [`caddy`]: [`caddy::CaddyAdmin`], a small client for Caddy's admin API.
//! - [`source`]: [`source::LogSource`], where messages come from (the durable
//!   consumer, or an in-process channel).
//! - [`telemetry`]: every log line that has a metric, emitted with it.
//! - [`run`]: the consume → fold → coalesce → push loop, and [`rebuild`].

pub mod caddy;
pub mod config;
mod reconcile;
pub mod source;
pub mod telemetry;

pub use config::ApplierConfig;
pub use reconcile::{rebuild, render, run, ApplierError};
pub use telemetry::Stats;
