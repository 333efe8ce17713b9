//! caddy-fleet's wiring: turns settings into running components.
//!
//! The components live in their own crates (`caddy-fleet-schema`,
//! `-nats`, `-publisher`, `-applier`); this crate connects them to the
//! outside world (Docker, NATS, Caddy) for the binary and the integration
//! tests, which start publishers and appliers in-process through the same
//! functions.

use std::future::Future;
use std::sync::Arc;

use caddy_fleet_applier::{ApplierConfig, Stats};
use caddy_fleet_nats::async_nats::jetstream;
use caddy_fleet_nats::{
    ConsumerSettings, DurableSource, EventPublisher, NatsConfig, StreamSettings,
};
use caddy_fleet_publisher::PublisherConfig;

pub use caddy_fleet_applier as applier;
pub use caddy_fleet_nats as nats;
pub use caddy_fleet_publisher as publisher;
pub use caddy_fleet_schema as schema;

/// Why a component could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot connect to Docker: {0} (is the Docker socket mounted and readable?)")]
    Docker(#[from] bollard_error::Error),
    #[error(transparent)]
    NatsConnect(#[from] caddy_fleet_nats::ConnectError),
    #[error(transparent)]
    Stream(#[from] caddy_fleet_nats::StreamError),
    #[error(transparent)]
    Consume(#[from] caddy_fleet_nats::ConsumeError),
    #[error(transparent)]
    Applier(#[from] caddy_fleet_applier::ApplierError),
    #[error(transparent)]
    Watch(#[from] caddy_fleet_publisher::WatchError),
}

mod bollard_error {
    pub use caddy_fleet_publisher::bollard::errors::Error;
}

/// Connects to the local Docker engine, negotiating the API version (the
/// engine may be older than the client's default).
pub async fn connect_docker() -> Result<caddy_fleet_publisher::bollard::Docker, FleetError> {
    let docker = caddy_fleet_publisher::bollard::Docker::connect_with_local_defaults()?;
    Ok(docker.negotiate_version().await?)
}

/// Runs a publisher that sends to NATS until `shutdown` completes.
pub async fn run_publisher(
    nats: &NatsConfig,
    config: PublisherConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FleetError> {
    let docker = connect_docker().await?;
    let client = caddy_fleet_nats::connect(nats).await?;
    let js = jetstream::new(client);
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    tracing::info!(agent = %config.agent, host_address = %config.host_address, "Publisher starting.");
    let sink = EventPublisher::new(js, config.agent.clone(), nonce);
    caddy_fleet_publisher::run(docker, config, sink, shutdown).await?;
    tracing::info!("Publisher stopped.");
    Ok(())
}

/// Runs an applier fed by the stream's durable consumer `durable_name`
/// until `shutdown` completes.
pub async fn run_applier(
    nats: &NatsConfig,
    stream: &StreamSettings,
    durable_name: &str,
    config: ApplierConfig,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FleetError> {
    let client = caddy_fleet_nats::connect(nats).await?;
    let js = jetstream::new(client);
    let stream = caddy_fleet_nats::ensure_stream(&js, stream).await?;
    let state = caddy_fleet_applier::rebuild(&stream, &stats).await?;
    let source = DurableSource::attach(&stream, &ConsumerSettings::new(durable_name)).await?;
    tracing::info!(durable = durable_name, caddy = %config.caddy_admin_url, "Applier attached.");
    caddy_fleet_applier::run(source, state, config, stats, shutdown).await?;
    tracing::info!("Applier stopped.");
    Ok(())
}
