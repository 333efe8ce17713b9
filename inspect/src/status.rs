//! A live applier's `/status`, read into the applier's own row types.

use std::time::Duration;

use caddy_fleet_schema::routes::{RefusedRow, RouteRow};

/// What a live applier reports: the sequence it has folded to, its routes
/// (what Caddy runs) and the containers it left out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct LiveRoutes {
    pub last_seq: u64,
    pub routes: Vec<RouteRow>,
    #[serde(default)]
    pub rejected: Vec<RefusedRow>,
}

/// The live routes from an applier's `/status`, if one answers at
/// `status_url` within two seconds.
pub async fn live_routes(status_url: &str) -> Option<LiveRoutes> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    client
        .get(format!("{status_url}/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}
