//! The applier's settings.

use std::path::PathBuf;
use std::time::Duration;

use caddy_fleet_schema::translate::TranslateOptions;

/// What the applier needs to know to converge Caddy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplierConfig {
    /// The applier's name: its durable consumer and checkpoint are named
    /// after it, and it tags the config it pushes.
    pub name: String,
    /// Caddy's admin API, e.g. `http://127.0.0.1:2019`.
    pub caddy_admin_url: String,
    /// The user's Caddyfile (the one Caddy was started with). Generated
    /// sites are merged into it; its global options (including `admin`)
    /// are kept.
    pub base_caddyfile: Option<String>,
    /// How labels are read, and the policy in force at start.
    pub translate: TranslateOptions,
    /// The policy's file, re-read when it changes and on SIGHUP.
    pub policy_file: Option<PathBuf>,
    /// A checkpoint is written at most this long after the first message
    /// it does not yet hold…
    pub checkpoint_interval: Duration,
    /// …or as soon as this many messages are not yet in one.
    pub checkpoint_every: u64,
    /// How often Caddy is checked for still running the pushed config.
    pub health_check_interval: Duration,
    /// Remove an agent's routes when nothing was heard from it for this
    /// long; `None` (the default) keeps them and only marks the agent stale.
    pub agent_ttl: Option<Duration>,
    /// An agent unheard of for this long is shown as stale in `/status`.
    pub agent_stale_after: Duration,
}

impl ApplierConfig {
    /// Settings with defaults for everything but the name and Caddy's address.
    pub fn new(name: impl Into<String>, caddy_admin_url: impl Into<String>) -> Self {
        ApplierConfig {
            name: name.into(),
            caddy_admin_url: caddy_admin_url.into(),
            base_caddyfile: None,
            translate: TranslateOptions::default(),
            policy_file: None,
            checkpoint_interval: Duration::from_secs(5),
            checkpoint_every: 10_000,
            health_check_interval: Duration::from_secs(2),
            agent_ttl: None,
            agent_stale_after: Duration::from_secs(30),
        }
    }
}
