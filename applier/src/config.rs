//! The applier's settings.

use std::time::Duration;

use caddy_fleet_schema::translate::TranslateOptions;

/// What the applier needs to know to converge Caddy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplierConfig {
    /// Caddy's admin API, e.g. `http://127.0.0.1:2019`.
    pub caddy_admin_url: String,
    /// The user's Caddyfile (the one Caddy was started with), merged in
    /// front of the generated sites. Its global options (including `admin`)
    /// are kept.
    pub base_caddyfile: Option<String>,
    /// How labels are read.
    pub translate: TranslateOptions,
    /// A burst of events is pushed once no event arrived for this long.
    pub quiet_window: Duration,
    /// ...but never later than this after the first event of the burst.
    pub max_delay: Duration,
}

impl ApplierConfig {
    /// Settings with defaults for everything but Caddy's address.
    pub fn new(caddy_admin_url: impl Into<String>) -> Self {
        ApplierConfig {
            caddy_admin_url: caddy_admin_url.into(),
            base_caddyfile: None,
            translate: TranslateOptions::default(),
            quiet_window: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        }
    }
}
